//! Kubernetes RBAC, as far as the daemon's requests need it: which of the requests a
//! fake API server logged (`METHOD path?query`) the roles of `deploy/rbac.yaml` would
//! refuse. A `ClusterRole` grants in every namespace, a `Role` in its own; a rule
//! with `resourceNames` grants list and watch only for a `metadata.name` field
//! selector, as the API server's authorizer sees it.
use serde_json::Value;

/// What the authorizer is asked for one request.
#[derive(Debug, PartialEq, Eq)]
pub struct Attributes {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

/// The attributes of a logged request; `None` for a non-resource URL (discovery,
/// `/version`), which every authenticated client may read.
pub fn attributes(line: &str) -> Option<Attributes> {
    let (method, url) = line.split_once(' ')?;
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => (String::new(), rest),
        ["apis", group, _version, rest @ ..] => ((*group).to_owned(), rest),
        _ => return None,
    };
    let (namespace, resource, name) = match rest {
        [] => return None,
        ["namespaces", ns, resource, tail @ ..] => {
            (Some((*ns).to_owned()), *resource, tail.first().copied())
        }
        [resource, tail @ ..] => (None, *resource, tail.first().copied()),
    };
    let param = |key: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    };
    let verb = match (method, name) {
        ("GET", Some(_)) => "get",
        ("GET", None) if param("watch") == Some("true") => "watch",
        ("GET", None) => "list",
        ("PUT", _) => "update",
        ("POST", _) => "create",
        ("PATCH", _) => "patch",
        ("DELETE", _) => "delete",
        _ => return None,
    };
    let name = name.map(str::to_owned).or_else(|| {
        param("fieldSelector")?
            .split(',')
            .find_map(|s| s.strip_prefix("metadata.name="))
            .map(str::to_owned)
    });
    Some(Attributes {
        verb: verb.to_owned(),
        group,
        resource: resource.to_owned(),
        namespace,
        name,
    })
}

fn has(list: &Value, want: &str) -> bool {
    list.as_array()
        .is_some_and(|l| l.iter().any(|v| v == want || v == "*"))
}

/// Whether one of the roles in `docs` grants `a`.
pub fn allowed(docs: &[Value], a: &Attributes) -> bool {
    docs.iter().any(|doc| {
        let scope_ok = match doc["kind"].as_str() {
            Some("ClusterRole") => true,
            Some("Role") => a.namespace.as_deref() == doc["metadata"]["namespace"].as_str(),
            _ => false,
        };
        scope_ok
            && doc["rules"].as_array().into_iter().flatten().any(|rule| {
                has(&rule["apiGroups"], &a.group)
                    && has(&rule["resources"], &a.resource)
                    && has(&rule["verbs"], &a.verb)
                    && match rule["resourceNames"].as_array() {
                        None => true,
                        Some(names) => a
                            .name
                            .as_deref()
                            .is_some_and(|n| names.iter().any(|v| v == n)),
                    }
            })
    })
}

/// The requests of `log` that the roles of `rbac_yaml` do not grant.
pub fn refused(rbac_yaml: &str, log: &[String]) -> Vec<String> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(rbac_yaml).expect("rbac.yaml parses");
    log.iter()
        .filter(|line| attributes(line).is_some_and(|a| !allowed(&docs, &a)))
        .cloned()
        .collect()
}
