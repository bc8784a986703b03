//! The RBAC check the node tests run against `deploy/rbac.yaml`, checked itself: what a
//! logged request asks the authorizer, and how roles grant by scope and name.
use dnsproxy_e2e::rbac::{attributes, refused};

#[test]
fn requests_map_to_attributes() {
    let a = attributes("GET /api/v1/pods?fieldSelector=spec.nodeName=n&watch=true").unwrap();
    assert_eq!(
        (a.verb.as_str(), a.resource.as_str(), a.name),
        ("watch", "pods", None)
    );
    let a = attributes(
        "GET /api/v1/namespaces/dnsproxy-system/configmaps?fieldSelector=metadata.name=dnsproxy-vips",
    )
    .unwrap();
    assert_eq!(a.name.as_deref(), Some("dnsproxy-vips"));
    assert_eq!(a.verb, "list");
    assert_eq!(a.namespace.as_deref(), Some("dnsproxy-system"));
    let a = attributes("GET /apis/networking.istio.io/v1/serviceentries?limit=1").unwrap();
    assert_eq!(a.group, "networking.istio.io");
    let a = attributes("PUT /api/v1/namespaces/dnsproxy-system/configmaps/dnsproxy-vips?").unwrap();
    assert_eq!(
        (a.verb.as_str(), a.name.as_deref()),
        ("update", Some("dnsproxy-vips"))
    );
    assert!(attributes("GET /apis/networking.istio.io/v1?").is_none());
    assert!(attributes("GET /version?").is_none());
}

#[test]
fn roles_grant_by_scope_verb_and_name() {
    let yaml = "kind: Role\nmetadata: {name: r, namespace: kube-system}\nrules:\n- apiGroups: [\"\"]\n  resources: [services]\n  resourceNames: [kube-dns]\n  verbs: [get]\n---\nkind: ClusterRole\nmetadata: {name: c}\nrules:\n- apiGroups: [\"\"]\n  resources: [pods]\n  verbs: [list, watch]\n";
    let granted = |line: &str| refused(yaml, &[line.to_owned()]).is_empty();
    assert!(granted(
        "GET /api/v1/namespaces/kube-system/services/kube-dns?"
    ));
    assert!(!granted(
        "GET /api/v1/namespaces/kube-system/services/other?"
    ));
    assert!(!granted(
        "GET /api/v1/namespaces/default/services/kube-dns?"
    ));
    assert!(!granted("GET /api/v1/services?"));
    assert!(granted("GET /api/v1/pods?watch=true"));
    assert!(granted("GET /api/v1/namespaces/a/pods?labelSelector=app=x"));
    assert!(!granted("GET /api/v1/namespaces/a/pods/p?"), "no get");
}

#[test]
fn the_shipped_rbac_parses_and_grants_nothing_to_writes_but_the_vip_store() {
    let yaml = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/rbac.yaml"))
        .unwrap();
    let writes = [
        "PUT /api/v1/namespaces/dnsproxy-system/configmaps/other?",
        "POST /api/v1/namespaces/dnsproxy-system/configmaps?",
        "PUT /api/v1/namespaces/default/pods/p?",
        "GET /api/v1/namespaces/kube-system/secrets/s?",
        "GET /api/v1/namespaces/kube-system/configmaps/x?",
    ];
    let lines: Vec<String> = writes.iter().map(|s| (*s).to_owned()).collect();
    assert_eq!(refused(&yaml, &lines), lines);
    let store = ["PUT /api/v1/namespaces/dnsproxy-system/configmaps/dnsproxy-vips?".to_owned()];
    assert!(refused(&yaml, &store).is_empty());
}
