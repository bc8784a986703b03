//! The objects the name table is built from. Kubernetes kinds are k8s-openapi's own
//! types (`Service`, `EndpointSlice`, `Pod`, `Namespace`), but for the Pods that
//! selectors select (`WorkloadPod`, their few fields); Istio's (`ServiceEntry`,
//! `WorkloadEntry`, which k8s-openapi does not have) are typed here, with the same
//! `ObjectMeta`, as far as the table reads them. The same types are read from YAML
//! files (local mode) and from the Kubernetes API (node mode, `crate::state`), so
//! everything after the source is shared. Fields we do not use are tolerated, as
//! kubectl does.
use std::{borrow::Cow, collections::BTreeMap, net::IpAddr, sync::Arc};

pub use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::core::{ApiResource, NamespaceResourceScope};
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

/// What the table reads of any object's `metadata`.
pub trait Meta {
    /// The namespace, `default` when unset (as kubectl applies it).
    fn ns(&self) -> &str;
    /// The name (empty when unset).
    fn name_str(&self) -> &str;
    /// The value of label `key`.
    fn label(&self, key: &str) -> Option<&str>;
    /// The value of annotation `key`.
    fn annotation(&self, key: &str) -> Option<&str>;
    /// Every label (none when unset).
    fn label_map(&self) -> &BTreeMap<String, String>;
}

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

impl Meta for ObjectMeta {
    fn ns(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }

    fn name_str(&self) -> &str {
        self.name.as_deref().unwrap_or("")
    }

    fn label(&self, key: &str) -> Option<&str> {
        self.labels.as_ref()?.get(key).map(String::as_str)
    }

    fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.as_ref()?.get(key).map(String::as_str)
    }

    fn label_map(&self) -> &BTreeMap<String, String> {
        self.labels.as_ref().unwrap_or(&NO_LABELS)
    }
}

/// `kube::Resource` for an Istio kind: its group and version come from the
/// [`ApiResource`] the cluster serves (`v1`, else `v1beta1`).
macro_rules! istio_resource {
    ($ty:ty) => {
        impl kube::Resource for $ty {
            type DynamicType = ApiResource;
            type Scope = NamespaceResourceScope;

            fn kind(dt: &ApiResource) -> Cow<'_, str> {
                dt.kind.as_str().into()
            }

            fn group(dt: &ApiResource) -> Cow<'_, str> {
                dt.group.as_str().into()
            }

            fn version(dt: &ApiResource) -> Cow<'_, str> {
                dt.version.as_str().into()
            }

            fn api_version(dt: &ApiResource) -> Cow<'_, str> {
                dt.api_version.as_str().into()
            }

            fn plural(dt: &ApiResource) -> Cow<'_, str> {
                dt.plural.as_str().into()
            }

            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }

            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
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

    /// The selector as the API's `labelSelector` parameter (`k=v,k2=v2`).
    pub fn to_query(&self) -> String {
        self.labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
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

istio_resource!(ServiceEntry);
istio_resource!(WorkloadEntryObject);

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
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
                        name: format!("{}/{}", self.metadata.ns(), self.metadata.name_str()),
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
            && self.metadata.label(AUTOALLOCATE_LABEL) != Some("false")
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

// === Kubernetes kinds (k8s-openapi's types) ===

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

/// What a Service resolves to.
pub fn service_kind(svc: &Service) -> ServiceKind {
    let Some(spec) = &svc.spec else {
        return ServiceKind::Headless;
    };
    if spec.type_.as_deref() == Some("ExternalName")
        && let Some(target) = &spec.external_name
    {
        return ServiceKind::ExternalName(target.trim_end_matches('.').to_ascii_lowercase());
    }
    let mut ips: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if ips.is_empty() {
        ips.extend(spec.cluster_ip.as_deref());
    }
    if ips.is_empty() || ips.iter().any(|ip| ip.eq_ignore_ascii_case("none")) {
        return ServiceKind::Headless;
    }
    ServiceKind::ClusterIp(ips.iter().filter_map(|ip| ip.parse().ok()).collect())
}

/// Label naming the Service an `EndpointSlice` belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Label the `EndpointSlice` controller puts on the slices of headless Services: the
/// only slices the table reads (a `ClusterIP` Service is answered with its `ClusterIP`).
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// The Service an `EndpointSlice` belongs to.
pub fn slice_service(slice: &EndpointSlice) -> Option<&str> {
    slice.metadata.label(SERVICE_NAME_LABEL)
}

// === Pods that workload selectors select ===

/// A Pod as a `workloadSelector` backend: its name, namespace and labels, phase,
/// readiness and IP, and nothing else. Its own type rather than k8s-openapi's `Pod`, so
/// that a watch event's containers, volumes and statuses are skipped while parsing
/// instead of built and then dropped: selected Pods are the one collection that
/// changes all the time (a rollout behind a selector).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct WorkloadPod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<WorkloadPodStatus>,
}

/// The part of `status` a backend is judged on.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadPodStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, rename = "podIP", skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<PodCondition>,
}

/// One of `status.conditions`: its type and status.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct PodCondition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
}

impl WorkloadPod {
    /// Running with condition Ready: a backend for a `workloadSelector`.
    pub fn is_ready(&self) -> bool {
        let Some(status) = &self.status else {
            return false;
        };
        status.phase.as_deref() == Some("Running")
            && status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
    }

    /// The pod's IP (its first, `status.podIP`).
    pub fn ip(&self) -> Option<&str> {
        self.status.as_ref()?.pod_ip.as_deref()
    }
}

/// The API serves it as what it is: core `v1` `pods`.
impl kube::Resource for WorkloadPod {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind((): &()) -> Cow<'_, str> {
        "Pod".into()
    }

    fn group((): &()) -> Cow<'_, str> {
        "".into()
    }

    fn version((): &()) -> Cow<'_, str> {
        "v1".into()
    }

    fn api_version((): &()) -> Cow<'_, str> {
        "v1".into()
    }

    fn plural((): &()) -> Cow<'_, str> {
        "pods".into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

// === documents ===

/// Every object the name table is built from, shared with the stores they come from
/// (a reflector's, or the files just read).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Objects {
    pub service_entries: Vec<Arc<ServiceEntry>>,
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    /// Backends of `workloadSelector` entries.
    pub workload_entries: Vec<Arc<WorkloadEntryObject>>,
    /// Pods a `workloadSelector` selects.
    pub pods: Vec<Arc<WorkloadPod>>,
}

/// What says which kind a document is, and its name for errors.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: NameOnly,
}

#[derive(Default, Deserialize)]
struct NameOnly {
    #[serde(default)]
    name: Option<String>,
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

/// Below this size a text is parsed on the calling thread alone.
const PARALLEL_FROM: usize = 256 * 1024;

/// Adds the objects of a (multi-document) YAML text to `objects`; returns how many
/// were used. `kind: List` documents are unpacked. Documents are counted from 0,
/// empty ones not counted.
///
/// A large text (thousands of entries) is cut at its document markers and parsed on
/// every core: YAML parsing is most of a large registry's start-up. A part that fails
/// sends the whole text through the one-thread parse, whose error names the document
/// and line as they are in the file.
pub fn parse_into(text: &str, objects: &mut Objects) -> Result<usize, ManifestError> {
    if text.len() >= PARALLEL_FROM
        && let Some((parsed, used)) = parse_in_parts(text)
    {
        objects.service_entries.extend(parsed.service_entries);
        objects.services.extend(parsed.services);
        objects.endpoint_slices.extend(parsed.endpoint_slices);
        objects.workload_entries.extend(parsed.workload_entries);
        objects.pods.extend(parsed.pods);
        return Ok(used);
    }
    parse_sequentially(text, objects)
}

/// `text` cut at document markers into about one part per core, parsed side by side;
/// `None` when a part fails (the caller parses it again, in one go, for the error).
fn parse_in_parts(text: &str) -> Option<(Objects, usize)> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    let parts = document_parts(text, threads);
    if parts.len() < 2 {
        return None;
    }
    let results: Vec<Option<(Objects, usize)>> = std::thread::scope(|s| {
        let handles: Vec<_> = parts
            .iter()
            .map(|part| {
                s.spawn(move || {
                    let mut objects = Objects::default();
                    let used = parse_sequentially(part, &mut objects).ok()?;
                    Some((objects, used))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().ok().flatten())
            .collect()
    });
    let mut all = Objects::default();
    let mut used = 0;
    for result in results {
        let (objects, n) = result?;
        all.service_entries.extend(objects.service_entries);
        all.services.extend(objects.services);
        all.endpoint_slices.extend(objects.endpoint_slices);
        all.workload_entries.extend(objects.workload_entries);
        all.pods.extend(objects.pods);
        used += n;
    }
    Some((all, used))
}

/// `text` cut into at most `n` parts of about equal size, each cut just before a
/// document marker (`---` at the start of a line, alone or before a space): YAML
/// allows no such line inside a document, so every part is whole documents.
fn document_parts(text: &str, n: usize) -> Vec<&str> {
    let target = text.len() / n.max(1) + 1;
    let mut parts = Vec::with_capacity(n);
    let mut start = 0;
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        let is_marker = line
            .strip_prefix("---")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']));
        if is_marker && at - start >= target && parts.len() + 1 < n {
            parts.push(&text[start..at]);
            start = at;
        }
        at += line.len();
    }
    parts.push(&text[start..]);
    parts
}

/// [`parse_into`] on the calling thread, document by document.
fn parse_sequentially(text: &str, objects: &mut Objects) -> Result<usize, ManifestError> {
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

fn add_value(
    index: usize,
    mut value: Value,
    objects: &mut Objects,
) -> Result<usize, ManifestError> {
    if value.is_null() {
        return Ok(0);
    }
    // Read from the document in place: it is converted once, into its kind.
    let meta =
        TypeMeta::deserialize(&value).map_err(|source| ManifestError::Object { index, source })?;
    let spec_err = |source| ManifestError::Spec {
        index,
        kind: meta.kind.clone(),
        name: meta.metadata.name.clone().unwrap_or_default(),
        source,
    };
    let group = meta.api_version.split('/').next().unwrap_or("");
    match (group, meta.kind.as_str()) {
        (_, "List") => {
            let items = match value.get_mut("items").map(Value::take) {
                Some(Value::Array(items)) => items,
                _ => Vec::new(),
            };
            let mut used = 0;
            for item in items {
                used += add_value(index, item, objects)?;
            }
            Ok(used)
        }
        ("networking.istio.io", "ServiceEntry") => {
            let se: ServiceEntry = serde_json::from_value(value).map_err(spec_err)?;
            se.spec_addresses()?;
            objects.service_entries.push(Arc::new(se));
            Ok(1)
        }
        ("v1", "Service") => {
            let svc = serde_json::from_value(value).map_err(spec_err)?;
            objects.services.push(Arc::new(svc));
            Ok(1)
        }
        ("discovery.k8s.io", "EndpointSlice") => {
            let slice = serde_json::from_value(value).map_err(spec_err)?;
            objects.endpoint_slices.push(Arc::new(slice));
            Ok(1)
        }
        ("networking.istio.io", "WorkloadEntry") => {
            let we = serde_json::from_value(value).map_err(spec_err)?;
            objects.workload_entries.push(Arc::new(we));
            Ok(1)
        }
        ("v1", "Pod") => {
            let pod = serde_json::from_value(value).map_err(spec_err)?;
            objects.pods.push(Arc::new(pod));
            Ok(1)
        }
        _ => {
            tracing::debug!(kind = %meta.kind, name = ?meta.metadata.name, "manifest object not used");
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
            service_kind(&o.services[0]),
            ServiceKind::ClusterIp(vec![
                "10.0.0.5".parse().unwrap(),
                "fd00::5".parse().unwrap()
            ])
        );
        assert_eq!(slice_service(&o.endpoint_slices[0]), Some("db"));
        assert_eq!(o.endpoint_slices[0].metadata.ns(), "default");
    }

    #[test]
    fn a_large_text_parses_in_parts_to_the_same_objects_and_errors() {
        let mut text = String::new();
        for i in 0..3000 {
            use std::fmt::Write as _;
            let _ = write!(
                text,
                "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: e{i}}}\n\
                 spec: {{hosts: [h{i}.example], resolution: STATIC, endpoints: [{{address: 192.0.2.1}}]}}\n"
            );
        }
        text.push_str("--- # the same line holds a comment\napiVersion: v1\nkind: Service\nmetadata: {name: s}\n");
        assert!(text.len() >= PARALLEL_FROM / 2);
        let parts = document_parts(&text, 4);
        assert_eq!(parts.len(), 4);
        assert_eq!(parts.concat(), text);
        assert!(parts.iter().all(|p| p.starts_with("---")));
        let big = text.repeat(2);
        let (mut one, mut many) = (Objects::default(), Objects::default());
        let used_one = parse_sequentially(&big, &mut one).unwrap();
        let used_many = parse_into(&big, &mut many).unwrap();
        assert_eq!((used_one, &one), (used_many, &many));
        assert_eq!(many.service_entries.len(), 6000);
        // A broken document deep inside: the error is the one-thread parse's.
        let broken = format!("{big}---\nkind: [\n");
        let err = parse_into(&broken, &mut Objects::default()).unwrap_err();
        let want = parse_sequentially(&broken, &mut Objects::default()).unwrap_err();
        assert_eq!(
            crate::report(&err).to_string(),
            crate::report(&want).to_string()
        );
    }

    #[test]
    fn yaml_1_1_booleans_stay_strings() {
        let mut o = Objects::default();
        let text = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: n, namespace: y, labels: {on: yes}}\nspec: {hosts: [a.b]}\n";
        assert_eq!(parse_into(text, &mut o).unwrap(), 1);
        let meta = &o.service_entries[0].metadata;
        assert_eq!((meta.name_str(), meta.ns()), ("n", "y"));
        assert_eq!(meta.label("on"), Some("yes"));
    }

    #[test]
    fn service_kinds() {
        let svc = |yaml: &str| -> Service { from_yaml(yaml).unwrap() };
        assert_eq!(
            service_kind(&svc("spec: {clusterIP: None}")),
            ServiceKind::Headless
        );
        assert_eq!(
            service_kind(&svc(
                "spec: {type: ExternalName, externalName: Api.Example.COM.}"
            )),
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
