//! Kubernetes-style manifests as far as the name table needs them. Objects we do not
//! use, and fields we do not use, are tolerated (as kubectl does).
use std::net::IpAddr;

use serde::Deserialize;

use super::NameTable;

/// Errors in one manifest document.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not YAML, or not the shape of a Kubernetes object.
    #[error("document {index}: {source}")]
    Yaml {
        index: usize,
        source: serde_yaml::Error,
    },
    /// An address in `spec.addresses` is neither an IP nor a host CIDR.
    #[error("ServiceEntry {name}: address `{address}` is not an IP or a /32 or /128 CIDR")]
    BadAddress { name: String, address: String },
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Object {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: Metadata,
    #[serde(default)]
    spec: serde_yaml::Value,
}

#[derive(Debug, Default, Deserialize)]
struct Metadata {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct ServiceEntrySpec {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    addresses: Vec<String>,
}

/// Parses an address of `spec.addresses`: an IP, or a single-host CIDR.
fn parse_address(s: &str) -> Option<IpAddr> {
    match s.split_once('/') {
        None => s.parse().ok(),
        Some((ip, len)) => {
            let ip: IpAddr = ip.parse().ok()?;
            let full = if ip.is_ipv4() { "32" } else { "128" };
            (len == full).then_some(ip)
        }
    }
}

/// Adds the objects of a (multi-document) YAML text to `table`.
/// Returns how many objects were used.
pub fn load_into(text: &str, table: &mut NameTable) -> Result<usize, ManifestError> {
    let mut used = 0;
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(doc)
            .map_err(|source| ManifestError::Yaml { index, source })?;
        if value.is_null() {
            continue;
        }
        let obj: Object = serde_yaml::from_value(value)
            .map_err(|source| ManifestError::Yaml { index, source })?;
        let is_istio = obj.api_version.starts_with("networking.istio.io/");
        if !(is_istio && obj.kind == "ServiceEntry") {
            tracing::debug!(kind = %obj.kind, name = %obj.metadata.name, "manifest object not used");
            continue;
        }
        let spec: ServiceEntrySpec = serde_yaml::from_value(obj.spec)
            .map_err(|source| ManifestError::Yaml { index, source })?;
        let mut addrs = Vec::with_capacity(spec.addresses.len());
        for a in &spec.addresses {
            addrs.push(parse_address(a).ok_or_else(|| ManifestError::BadAddress {
                name: format!(
                    "{}/{}",
                    obj.metadata.namespace.as_deref().unwrap_or("default"),
                    obj.metadata.name
                ),
                address: a.clone(),
            })?);
        }
        if addrs.is_empty() {
            // Without addresses the host is left to upstream DNS until auto-allocation
            // gives it a VIP (an empty record would answer NODATA for a real host).
            tracing::debug!(name = %obj.metadata.name, "ServiceEntry without addresses: not answered locally");
            continue;
        }
        for host in &spec.hosts {
            table.add(host, addrs.iter().copied());
        }
        used += 1;
    }
    Ok(used)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_entry_hosts_and_addresses() {
        let text = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: aliyun, namespace: default}
spec:
  hosts: [aliyun.com, www.aliyun.com]
  addresses: [240.240.0.10/32, "2001:2::a"]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
  unknownField: tolerated
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: no-addresses}
spec: {hosts: [forwarded.example], resolution: DNS}
---
"#;
        let mut t = NameTable::default();
        assert_eq!(load_into(text, &mut t).unwrap(), 1);
        assert!(t.lookup("forwarded.example").is_none());
        let r = t.lookup("www.aliyun.com").unwrap();
        assert_eq!(r.v4.len(), 1);
        assert_eq!(r.v6.len(), 1);
    }

    #[test]
    fn errors_say_what() {
        struct Case {
            name: &'static str,
            text: &'static str,
            want: &'static str,
        }
        let cases = [
            Case {
                name: "not yaml",
                text: "kind: [unclosed",
                want: "document 0",
            },
            Case {
                name: "wide cidr",
                text: "apiVersion: networking.istio.io/v1beta1\nkind: ServiceEntry\nmetadata: {name: x}\nspec: {hosts: [a.b], addresses: [10.0.0.0/8]}\n",
                want: "address `10.0.0.0/8` is not an IP",
            },
            Case {
                name: "hosts not a list",
                text: "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: x}\nspec: {hosts: 5}\n",
                want: "document 0",
            },
        ];
        for c in cases {
            let err = load_into(c.text, &mut NameTable::default()).unwrap_err().to_string();
            assert!(err.contains(c.want), "{}: {err}", c.name);
        }
    }
}
