//! Kubernetes and Istio objects as far as the name table needs them, in the shape of
//! their JSON/YAML (camelCase). The same types are read from YAML files and, in node
//! mode, from the Kubernetes API, so everything after the source is shared. Fields we
//! do not use are tolerated, as kubectl does.
use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Errors in one manifest document.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not YAML (the parser's message says where).
    #[error("document {index}")]
    Yaml {
        index: usize,
        source: serde_saphyr::Error,
    },
    /// YAML, but not the shape of a Kubernetes object.
    #[error("document {index}")]
    Object {
        index: usize,
        source: serde_json::Error,
    },
    /// A `kind` we use, with a field of the wrong shape.
    #[error("document {index} ({kind} {name})")]
    Spec {
        index: usize,
        kind: String,
        name: String,
        source: serde_json::Error,
    },
    /// An address in `spec.addresses` is neither an IP nor a CIDR.
    #[error("ServiceEntry {name}: address `{address}` is not an IP or a CIDR")]
    BadAddress { name: String, address: String },
}

/// `metadata` of any object.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub uid: Option<String>,
    /// When the API server created it (RFC 3339); decides which of several entries
    /// for one name wins.
    #[serde(default)]
    pub creation_timestamp: Option<String>,
}

impl ObjectMeta {
    /// The namespace, `default` when unset (as kubectl applies it).
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }
}

// === ServiceEntry ===

/// Istio `ServiceEntry` (`networking.istio.io/v1` and `v1beta1`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntry {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceEntrySpec,
    #[serde(default)]
    pub status: Option<ServiceEntryStatus>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntrySpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub ports: Vec<ServiceEntryPort>,
    #[serde(default)]
    pub resolution: Resolution,
    #[serde(default)]
    pub endpoints: Vec<WorkloadEntry>,
    #[serde(default)]
    pub export_to: Vec<String>,
    /// Backends are the entry's namespace's WorkloadEntries and ready Pods whose labels
    /// match (instead of `endpoints`).
    #[serde(default)]
    pub workload_selector: Option<WorkloadSelector>,
}

/// `spec.workloadSelector`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl WorkloadSelector {
    /// Every label of the selector is on `labels` (an empty selector selects nothing).
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        !self.labels.is_empty() && self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// Istio `WorkloadEntry` (`networking.istio.io/v1`, `v1beta1`): a VM or other
/// non-Kubernetes workload.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEntryObject {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: WorkloadEntry,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntryPort {
    pub number: u16,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub target_port: Option<u16>,
}

/// `spec.resolution`.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    #[default]
    None,
    Static,
    Dns,
    DnsRoundRobin,
}

/// An endpoint of a `ServiceEntry` (a `WorkloadEntry` spec).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEntry {
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub ports: BTreeMap<String, u16>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntryStatus {
    #[serde(default)]
    pub addresses: Vec<StatusAddress>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StatusAddress {
    #[serde(default)]
    pub value: String,
    #[serde(default)]
    pub host: Option<String>,
}

/// Label that opts a `ServiceEntry` out of auto-allocation.
pub const AUTOALLOCATE_LABEL: &str = "networking.istio.io/enable-autoallocate-ip";

impl ServiceEntry {
    /// `spec.addresses`: single addresses (an IP, or a /32 or /128), and whether any
    /// is a wider CIDR (Istio allows those for TCP; DNS answers only single
    /// addresses, and such an entry never gets auto-allocated VIPs). An entry that is
    /// neither is an error.
    pub fn spec_addresses(&self) -> Result<SpecAddresses, ManifestError> {
        let mut out = SpecAddresses::default();
        for a in &self.spec.addresses {
            match parse_address(a) {
                Some(Address::Single(ip)) => out.single.push(ip),
                Some(Address::Range) => out.has_range = true,
                None => {
                    return Err(ManifestError::BadAddress {
                        name: format!("{}/{}", self.metadata.namespace(), self.metadata.name),
                        address: a.clone(),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Addresses Istio already allocated for `host` (`status.addresses`).
    pub fn status_addresses(&self, host: &str) -> Vec<IpAddr> {
        self.status
            .iter()
            .flat_map(|s| &s.addresses)
            .filter(|a| {
                a.host
                    .as_deref()
                    .is_none_or(|h| h.eq_ignore_ascii_case(host))
            })
            .filter_map(|a| parse_host_address(&a.value))
            .collect()
    }

    /// Whether hosts of this entry without addresses get VIPs: resolution not NONE and
    /// not opted out by label (wildcards are excluded per host).
    pub fn wants_autoallocation(&self) -> bool {
        self.spec.resolution != Resolution::None
            && self
                .metadata
                .labels
                .get(AUTOALLOCATE_LABEL)
                .map(String::as_str)
                != Some("false")
    }
}

/// The addresses `spec.addresses` declares.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecAddresses {
    /// IPs, and /32 or /128 CIDRs.
    pub single: Vec<IpAddr>,
    /// Some address is a wider CIDR.
    pub has_range: bool,
}

impl SpecAddresses {
    /// Nothing declared at all.
    pub fn is_empty(&self) -> bool {
        self.single.is_empty() && !self.has_range
    }
}

/// One address of `spec.addresses`.
enum Address {
    Single(IpAddr),
    Range,
}

fn parse_address(s: &str) -> Option<Address> {
    let Some((ip, len)) = s.split_once('/') else {
        return s.parse().ok().map(Address::Single);
    };
    let ip: IpAddr = ip.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let full = if ip.is_ipv4() { 32 } else { 128 };
    match len.cmp(&full) {
        std::cmp::Ordering::Equal => Some(Address::Single(ip)),
        std::cmp::Ordering::Less => Some(Address::Range),
        std::cmp::Ordering::Greater => None,
    }
}

/// An IP, or a single-host CIDR.
pub fn parse_host_address(s: &str) -> Option<IpAddr> {
    match parse_address(s)? {
        Address::Single(ip) => Some(ip),
        Address::Range => None,
    }
}

// === Service ===

/// Kubernetes `Service` (v1).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceSpec,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Vec<String>,
    #[serde(default)]
    pub external_name: Option<String>,
}

/// What a Service resolves to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceKind {
    /// Virtual IPs (one per family).
    ClusterIp(Vec<IpAddr>),
    /// No virtual IP: the ready endpoints' addresses.
    Headless,
    /// A CNAME to another name.
    ExternalName(String),
}

impl Service {
    pub fn kind(&self) -> ServiceKind {
        if self.spec.type_.as_deref() == Some("ExternalName")
            && let Some(target) = &self.spec.external_name
        {
            return ServiceKind::ExternalName(target.trim_end_matches('.').to_ascii_lowercase());
        }
        let mut ips: Vec<&str> = self.spec.cluster_ips.iter().map(String::as_str).collect();
        if ips.is_empty() {
            ips.extend(self.spec.cluster_ip.as_deref());
        }
        if ips.is_empty() || ips.iter().any(|ip| ip.eq_ignore_ascii_case("none")) {
            return ServiceKind::Headless;
        }
        ServiceKind::ClusterIp(ips.iter().filter_map(|ip| ip.parse().ok()).collect())
    }
}

// === EndpointSlice ===

/// Kubernetes `EndpointSlice` (discovery.k8s.io/v1).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub conditions: EndpointConditions,
    #[serde(default)]
    pub hostname: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EndpointConditions {
    /// Unset means ready (the API's documented default).
    #[serde(default)]
    pub ready: Option<bool>,
}

/// Label naming the Service an `EndpointSlice` belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

impl EndpointSlice {
    pub fn service_name(&self) -> Option<&str> {
        self.metadata
            .labels
            .get(SERVICE_NAME_LABEL)
            .map(String::as_str)
    }
}

// === Pod, Namespace (node mode: capture policy) ===

/// Kubernetes `Pod` (v1), slimmed to what the capture policy reads.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default)]
    pub status: PodStatus,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub host_network: bool,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(default)]
    pub conditions: Vec<PodCondition>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodCondition {
    #[serde(default, rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub status: String,
}

impl Pod {
    /// Running with condition Ready: a backend for a `workloadSelector`.
    pub fn is_ready(&self) -> bool {
        self.status.phase.as_deref() == Some("Running")
            && self
                .status
                .conditions
                .iter()
                .any(|c| c.kind == "Ready" && c.status == "True")
    }
}

/// Kubernetes `Namespace` (v1): its labels carry the namespace capture policy.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Namespace {
    #[serde(default)]
    pub metadata: ObjectMeta,
}

// === documents ===

/// Every object the name table is built from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Objects {
    pub service_entries: Vec<ServiceEntry>,
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    /// Backends of `workloadSelector` entries.
    pub workload_entries: Vec<WorkloadEntryObject>,
    pub pods: Vec<Pod>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: ObjectMeta,
}

/// YAML as manifests mean it: only YAML 1.2 core booleans (`true`, `false`), so that
/// names such as `n`, `y` or `on` stay strings.
fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! { strict_booleans: true }
}

/// One YAML document into `T`, read as manifests are.
pub fn from_yaml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, serde_saphyr::Error> {
    serde_saphyr::from_str_with_options(text, yaml_options())
}

/// Adds the objects of a (multi-document) YAML text to `objects`; returns how many
/// were used. `kind: List` documents are unpacked. Documents are counted from 0,
/// empty ones not counted.
pub fn parse_into(text: &str, objects: &mut Objects) -> Result<usize, ManifestError> {
    let mut used = 0;
    let mut reader = text.as_bytes();
    for (index, doc) in
        serde_saphyr::read_with_options::<_, Value>(&mut reader, yaml_options()).enumerate()
    {
        let value = doc.map_err(|source| ManifestError::Yaml { index, source })?;
        used += add_value(index, value, objects)?;
    }
    Ok(used)
}

fn add_value(index: usize, value: Value, objects: &mut Objects) -> Result<usize, ManifestError> {
    if value.is_null() {
        return Ok(0);
    }
    let meta: TypeMeta = serde_json::from_value(value.clone())
        .map_err(|source| ManifestError::Object { index, source })?;
    let spec_err = |source| ManifestError::Spec {
        index,
        kind: meta.kind.clone(),
        name: meta.metadata.name.clone(),
        source,
    };
    let group = meta.api_version.split('/').next().unwrap_or("");
    match (group, meta.kind.as_str()) {
        (_, "List") => {
            let items = value
                .get("items")
                .and_then(|i| i.as_array())
                .cloned()
                .unwrap_or_default();
            let mut used = 0;
            for item in items {
                used += add_value(index, item, objects)?;
            }
            Ok(used)
        }
        ("networking.istio.io", "ServiceEntry") => {
            let se: ServiceEntry = serde_json::from_value(value).map_err(spec_err)?;
            se.spec_addresses()?;
            objects.service_entries.push(se);
            Ok(1)
        }
        ("v1", "Service") => {
            objects
                .services
                .push(serde_json::from_value(value).map_err(spec_err)?);
            Ok(1)
        }
        ("discovery.k8s.io", "EndpointSlice") => {
            objects
                .endpoint_slices
                .push(serde_json::from_value(value).map_err(spec_err)?);
            Ok(1)
        }
        ("networking.istio.io", "WorkloadEntry") => {
            objects
                .workload_entries
                .push(serde_json::from_value(value).map_err(spec_err)?);
            Ok(1)
        }
        ("v1", "Pod") => {
            objects
                .pods
                .push(serde_json::from_value(value).map_err(spec_err)?);
            Ok(1)
        }
        _ => {
            tracing::debug!(kind = %meta.kind, name = %meta.metadata.name, "manifest object not used");
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_kind_we_use() {
        let text = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: aliyun, namespace: default}
spec:
  hosts: [aliyun.com]
  addresses: [240.240.0.10/32, "2001:2::a"]
  ports: [{number: 443, name: tls, protocol: TLS, targetPort: 8443}]
  resolution: DNS_ROUND_ROBIN
  unknownField: tolerated
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec: {clusterIP: 10.0.0.5, clusterIPs: [10.0.0.5, "fd00::5"], ports: [{port: 9080}]}
---
apiVersion: v1
kind: List
items:
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: db-abc, labels: {kubernetes.io/service-name: db}}
  addressType: IPv4
  endpoints: [{addresses: [10.1.0.7], hostname: db-0, conditions: {ready: true}}]
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: ignored}
"#;
        let mut o = Objects::default();
        assert_eq!(parse_into(text, &mut o).unwrap(), 3);
        assert_eq!(
            o.service_entries[0].spec.resolution,
            Resolution::DnsRoundRobin
        );
        assert_eq!(o.service_entries[0].spec.ports[0].target_port, Some(8443));
        assert_eq!(
            o.service_entries[0].spec_addresses().unwrap().single.len(),
            2
        );
        assert_eq!(
            o.services[0].kind(),
            ServiceKind::ClusterIp(vec![
                "10.0.0.5".parse().unwrap(),
                "fd00::5".parse().unwrap()
            ])
        );
        assert_eq!(o.endpoint_slices[0].service_name(), Some("db"));
        assert_eq!(o.endpoint_slices[0].metadata.namespace(), "default");
    }

    #[test]
    fn yaml_1_1_booleans_stay_strings() {
        let mut o = Objects::default();
        let text = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: n, namespace: y, labels: {on: yes}}\nspec: {hosts: [a.b]}\n";
        assert_eq!(parse_into(text, &mut o).unwrap(), 1);
        let meta = &o.service_entries[0].metadata;
        assert_eq!((meta.name.as_str(), meta.namespace()), ("n", "y"));
        assert_eq!(meta.labels["on"], "yes");
    }

    #[test]
    fn service_kinds() {
        let svc = |yaml: &str| -> Service { from_yaml(yaml).unwrap() };
        assert_eq!(svc("spec: {clusterIP: None}").kind(), ServiceKind::Headless);
        assert_eq!(
            svc("spec: {type: ExternalName, externalName: Api.Example.COM.}").kind(),
            ServiceKind::ExternalName("api.example.com".into())
        );
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
                want: "document 0: unclosed bracket '[' at line 1",
            },
            Case {
                name: "second document broken",
                text: "kind: ConfigMap\n---\nkind: [\n",
                want: "document 1: unclosed bracket '[' at line 3",
            },
            Case {
                name: "not an address",
                text: "apiVersion: networking.istio.io/v1beta1\nkind: ServiceEntry\nmetadata: {name: x}\nspec: {hosts: [a.b], addresses: [10.0.0.0/33]}\n",
                want: "address `10.0.0.0/33` is not an IP or a CIDR",
            },
            Case {
                name: "hosts not a list",
                text: "---\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: x}\nspec: {hosts: 5}\n",
                want: "(ServiceEntry x): invalid type: integer `5`",
            },
            Case {
                name: "unknown resolution",
                text: "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: y}\nspec: {resolution: MAGIC}\n",
                want: "unknown variant `MAGIC`",
            },
        ];
        for c in cases {
            let err = parse_into(c.text, &mut Objects::default()).unwrap_err();
            let err = crate::report(&err).to_string();
            assert!(err.contains(c.want), "{}: {err}", c.name);
        }
    }
}
