//! The name table: built from [`Objects`] (whatever their source), read on every query.
//! Lookups are hash-map hits: exact names, then Kubernetes short names, then search
//! suffixes, then wildcard suffixes (one probe per label). A name defined by several
//! objects keeps one entry per object, in precedence order; a client sees the one its
//! namespace may see, its own namespace's first ([`super::export`]).
//!
//! The table is made of shards (`build`), each built from its own objects and shared
//! between tables: one per namespace for its Services (a Service's names live under
//! `<ns>.svc.<cluster domain>`), and one for the `ServiceEntries` and what backs them.
//! A change rebuilds only its shard: a Service or a headless Service's endpoints, its
//! namespace's; a `ServiceEntry`, a `WorkloadEntry` or a selected Pod, the entries'.
pub mod addresses;
mod build;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use serde::Serialize;

use super::{
    export::{Rank, Visibility},
    manifest::{
        EndpointSlice, Meta as _, Objects, Resolution, Service, ServiceEntryPort, WorkloadEntry,
    },
};
use crate::name::normalize;
use addresses::{AddressPolicy, Refusal, Reserved};
pub use build::{selectable_pods, workload_selectors};

/// Addresses of a name, both families in one allocation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Addrs(Vec<IpAddr>);

impl Addrs {
    fn add(&mut self, ip: IpAddr) {
        if !self.0.contains(&ip) {
            self.0.push(ip);
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The IPv4 addresses, in the order they were given.
    pub fn ipv4(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.0.iter().filter_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
    }

    /// The IPv6 addresses, in the order they were given.
    pub fn ipv6(&self) -> impl Iterator<Item = Ipv6Addr> + '_ {
        self.0.iter().filter_map(|ip| match ip {
            IpAddr::V6(v6) => Some(*v6),
            IpAddr::V4(_) => None,
        })
    }
}

impl Serialize for Addrs {
    /// `{"ipv4": [...], "ipv6": [...]}`, as the debug dump shows them.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let mut s = serializer.serialize_struct("Addrs", 2)?;
        s.serialize_field("ipv4", &self.ipv4().collect::<Vec<_>>())?;
        s.serialize_field("ipv6", &self.ipv6().collect::<Vec<_>>())?;
        s.end()
    }
}

/// A host's auto-allocated addresses (one slot: `240.240.a.b` and `2001:2::ab`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vips {
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

impl Vips {
    pub fn addrs(&self) -> [IpAddr; 2] {
        [IpAddr::V4(self.v4), IpAddr::V6(self.v6)]
    }
}

/// Host → its auto-allocated VIPs, as `crate::vip::assign` assigned them.
pub type Allocation = BTreeMap<String, Vips>;

/// What a name resolves to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Target {
    Addresses(Addrs),
    /// An alias (`ExternalName` Service): answered with CNAME, then the target.
    Cname(String),
}

/// One name of the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// Canonical name: lower case, no trailing dot (for a wildcard, `*.suffix`).
    pub name: Arc<str>,
    pub target: Target,
    /// Its only addresses are auto-allocated VIPs (pods may opt out of those).
    pub auto_allocated: bool,
    /// A Service's own name: its Kubernetes short names reach it too.
    short_names: bool,
    /// The object it came from, shared by every host of that object.
    pub owner: Arc<Owner>,
}

impl Host {
    /// It comes from a Kubernetes Service (not a `ServiceEntry`).
    pub fn is_kubernetes_service(&self) -> bool {
        self.owner.kind == Kind::Service
    }

    /// Names that also reach it from a client in the same namespace (a Service's
    /// short names: `svc`, `svc.ns`, `svc.ns.svc`), for the debug dump.
    fn alt_hosts(&self) -> Vec<String> {
        if !self.short_names {
            return Vec::new();
        }
        let labels: Vec<&str> = self.name.splitn(4, '.').collect();
        (1..=3)
            .filter(|n| *n < labels.len())
            .map(|n| labels[..n].join("."))
            .collect()
    }
}

impl Serialize for Host {
    /// The debug dump's form (`/debug/ndsz`), as Istio's lists a name's origin.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let alt_hosts = self.alt_hosts();
        let export_to = (!self.owner.export_to.is_all()).then_some(&self.owner.export_to);
        let mut s = serializer.serialize_struct("Host", 7)?;
        s.serialize_field("name", &*self.name)?;
        s.serialize_field("target", &self.target)?;
        s.serialize_field("sources", &[self.owner.source()])?;
        if !alt_hosts.is_empty() {
            s.serialize_field("altHosts", &alt_hosts)?;
        }
        s.serialize_field("autoAllocated", &self.auto_allocated)?;
        s.serialize_field("namespace", self.owner.namespace())?;
        if let Some(export_to) = export_to {
            s.serialize_field("exportTo", export_to)?;
        }
        s.end()
    }
}

/// What kind of object an entry comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Service,
    ServiceEntry,
}

/// Where an entry comes from: the object (its kind, namespace and name), who may see
/// it, and its precedence. One per object, shared by its hosts (there may be
/// thousands).
#[derive(Debug, PartialEq, Eq)]
pub struct Owner {
    pub kind: Kind,
    pub export_to: Visibility,
    /// Precedence among the entries for one name; holds the namespace and name.
    pub rank: Rank,
}

impl Owner {
    /// The object's namespace.
    pub fn namespace(&self) -> &str {
        self.rank.namespace()
    }

    /// `ServiceEntry <namespace>/<name>`, `Service <namespace>/<name>`: for logs and
    /// the debug dump.
    pub fn source(&self) -> String {
        let kind = match self.kind {
            Kind::Service => "Service",
            Kind::ServiceEntry => "ServiceEntry",
        };
        format!("{kind} {}/{}", self.namespace(), self.rank.name())
    }

    /// A new entry for `name` from this owner.
    fn host(self: &Arc<Self>, name: Arc<str>, target: Target) -> Host {
        Host {
            name,
            target,
            auto_allocated: false,
            short_names: false,
            owner: Arc::clone(self),
        }
    }
}

/// The entry a client in `namespace` sees among `candidates` (a name's entries in its
/// shards: the Services', then the entries'): a Service it may see always wins its own
/// name; else its own namespace's first, else the first it may see, in precedence
/// order.
fn pick<'a>(candidates: [&'a [Host]; 2], namespace: &str) -> Option<&'a Host> {
    pick_in(candidates[0], namespace).or_else(|| pick_in(candidates[1], namespace))
}

fn pick_in<'a>(candidates: &'a [Host], namespace: &str) -> Option<&'a Host> {
    let (mut own, mut any): (Option<&Host>, Option<&Host>) = (None, None);
    for host in candidates {
        if !host.owner.export_to.allows(namespace) {
            continue;
        }
        let before = |best: Option<&Host>| best.is_none_or(|b| host.owner.rank < b.owner.rank);
        if host.owner.namespace() == namespace && before(own) {
            own = Some(host);
        }
        if before(any) {
            any = Some(host);
        }
    }
    own.or(any)
}

/// What precedes `.svc.<cluster domain>` in `name` (`web.shop` of
/// `web.shop.svc.cluster.local`; empty for `svc.cluster.local` itself), if it is under
/// it: the Services' names.
pub(crate) fn under_services<'a>(name: &'a str, cluster_domain: &str) -> Option<&'a str> {
    let rest = name.strip_suffix(cluster_domain)?.strip_suffix('.')?;
    if rest == "svc" {
        return Some("");
    }
    rest.strip_suffix(".svc")
}

/// `name` without the domain whose labels are `labels` (and the dot before it), if it
/// ends in that domain: no domain string is made for the check.
fn strip_domain<'a>(name: &'a str, labels: &[&str]) -> Option<&'a str> {
    let mut rest = name;
    for label in labels.iter().rev() {
        rest = rest.strip_suffix(label)?.strip_suffix('.')?;
    }
    Some(rest)
}

/// How a query name was matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Match<'a> {
    /// The name itself (or a short name of it, or a wildcard): answered under the
    /// question name.
    Direct(&'a Host),
    /// `base.<search domain>`: answered as CNAME to `base`, then `base`'s records.
    SearchSuffix { base: &'a str, host: &'a Host },
}

/// A `ServiceEntry` host whose VIPs the data path translates to real backends.
#[derive(Clone, Debug, PartialEq)]
pub struct VipService {
    pub host: Arc<str>,
    /// Auto-allocated, `status.addresses` or `spec.addresses`.
    pub vips: Vec<IpAddr>,
    /// Ports and endpoints, shared by every host of the entry.
    pub entry: Arc<EntryShared>,
    pub resolution: Resolution,
    /// Its source and precedence: of two entries on one VIP, the first translates it.
    pub owner: Arc<Owner>,
    /// Its VIPs are its own declared addresses (not auto-allocated).
    pub declared: bool,
}

impl VipService {
    /// The entry's declared ports.
    pub fn ports(&self) -> &[ServiceEntryPort] {
        &self.entry.ports
    }

    /// The entry's endpoints (or the workloads its selector selects).
    pub fn endpoints(&self) -> &[WorkloadEntry] {
        &self.entry.endpoints
    }
}

/// What every host of one `ServiceEntry` shares.
#[derive(Debug, PartialEq)]
pub struct EntryShared {
    /// One copy per distinct list in the table (most entries declare the same few).
    pub ports: Arc<[ServiceEntryPort]>,
    pub endpoints: Box<[WorkloadEntry]>,
}

/// Names, and what they resolve to, from one set of objects: a namespace's Services,
/// or the `ServiceEntries`.
#[derive(Debug, Default)]
pub struct Shard {
    /// Name → its entries, in precedence order.
    exact: HashMap<Arc<str>, Vec<Host>>,
    /// `*.example.com` is stored under `example.com`.
    wildcards: HashMap<Arc<str>, Vec<Host>>,
    /// Address → the names it belongs to, with their owners, sorted by address then
    /// precedence: PTR answers are rare, a sorted array costs a third of a map.
    reverse: Vec<(IpAddr, Arc<str>, Arc<Owner>)>,
    vip_services: Vec<VipService>,
    /// Every VIP of `vip_services`, sorted: addresses the data path must translate.
    translated_vips: Vec<IpAddr>,
    /// A namespace's Services: their `ClusterIPs`, sorted (no entry may declare one).
    cluster_ips: Vec<IpAddr>,
    /// The entries': declared addresses refused ([`addresses`]).
    refused: Vec<Refusal>,
    /// The entries': declared addresses they hold, sorted.
    declared: Vec<IpAddr>,
    /// A namespace's: the names of its Services, whatever their kind and endpoints.
    service_names: HashSet<Box<str>>,
}

impl Shard {
    fn exact(&self, name: &str) -> &[Host] {
        self.exact.get(name).map_or(&[], Vec::as_slice)
    }

    /// The first name of `ip` a client in `namespace` may see.
    fn reverse(&self, ip: IpAddr, namespace: &str) -> Option<&Arc<str>> {
        let from = self.reverse.partition_point(|(addr, _, _)| *addr < ip);
        self.reverse[from..]
            .iter()
            .take_while(|(addr, _, _)| *addr == ip)
            .find(|(_, _, owner)| owner.export_to.allows(namespace))
            .map(|(_, name, _)| name)
    }

    /// Names, exact and wildcard.
    fn len(&self) -> usize {
        self.exact.len() + self.wildcards.len()
    }
}

/// The table.
#[derive(Clone, Debug, Default)]
pub struct NameTable {
    cluster_domain: String,
    /// Each namespace's Services.
    services: HashMap<Arc<str>, Arc<Shard>>,
    /// The `ServiceEntries`, with their VIPs and backends.
    entries: Arc<Shard>,
    /// Where declared addresses may be.
    policy: Arc<AddressPolicy>,
    /// `exportTo` of objects that say none.
    default_export: Arc<[String]>,
    /// `--max-hosts-per-namespace` (0: no bound).
    max_hosts_per_namespace: usize,
    /// Built from every Service of the cluster: names under `svc.<cluster domain>`
    /// are all known. Never so for an empty table (before the first sync).
    every_service: bool,
}

/// A namespace's Services and `EndpointSlices`.
type NamespaceObjects = (Vec<Arc<Service>>, Vec<Arc<EndpointSlice>>);

/// Settings of the table that do not come from objects.
#[derive(Clone, Debug)]
pub struct TableConfig {
    pub cluster_domain: String,
    pub addresses: AddressPolicy,
    /// `exportTo` of a `ServiceEntry` or Service that says none, as Istio's mesh-wide
    /// `defaultServiceExportTo` (`--default-export-to`); empty: every namespace.
    pub default_export_to: Vec<String>,
    /// Most `ServiceEntry` hosts of one namespace (`--max-hosts-per-namespace`; 0: no
    /// bound), the oldest entries first.
    pub max_hosts_per_namespace: usize,
    /// The objects a table is built from hold every Service of the cluster (node mode,
    /// `--cluster-nxdomain`): a name of the cluster domain that names no Service does
    /// not exist ([`NameTable::no_such_cluster_name`]).
    pub every_service: bool,
}

impl Default for TableConfig {
    fn default() -> Self {
        TableConfig {
            cluster_domain: "cluster.local".into(),
            addresses: AddressPolicy::default(),
            default_export_to: Vec::new(),
            max_hosts_per_namespace: 0,
            every_service: false,
        }
    }
}

impl NameTable {
    /// A table without names.
    pub fn empty(cfg: &TableConfig) -> Self {
        NameTable {
            cluster_domain: normalize(&cfg.cluster_domain),
            policy: Arc::new(cfg.addresses.clone()),
            default_export: cfg.default_export_to.clone().into(),
            max_hosts_per_namespace: cfg.max_hosts_per_namespace,
            ..Default::default()
        }
    }

    /// Builds the table; `ServiceEntry` hosts without declared addresses get their
    /// VIPs from `vips` (`crate::vip::assign` decides who gets which).
    pub fn build(objects: &Objects, vips: &Allocation, cfg: &TableConfig) -> Self {
        let mut table = NameTable::empty(cfg);
        table.every_service = cfg.every_service;
        let mut by_namespace: BTreeMap<&str, NamespaceObjects> = BTreeMap::new();
        for svc in &objects.services {
            by_namespace
                .entry(svc.metadata.ns())
                .or_default()
                .0
                .push(Arc::clone(svc));
        }
        for slice in &objects.endpoint_slices {
            let ns = slice.metadata.ns();
            by_namespace
                .entry(ns)
                .or_default()
                .1
                .push(Arc::clone(slice));
        }
        for (ns, (services, slices)) in by_namespace {
            table.set_namespace(ns, &services, &slices);
        }
        table.entries = Arc::new(build::entries(
            objects,
            vips,
            (
                &table.reserved(objects),
                &table.default_export,
                table.max_hosts_per_namespace,
            ),
        ));
        table
    }

    /// What the entries of `objects` may not declare: the policy's blocks, every
    /// Service's `ClusterIPs`, the pods `objects` holds.
    fn reserved<'a>(&'a self, objects: &'a Objects) -> Reserved<'a> {
        Reserved {
            policy: Some(&self.policy),
            cluster_domain: &self.cluster_domain,
            cluster_ips: self
                .services
                .values()
                .flat_map(|s| s.cluster_ips.iter().copied())
                .collect(),
            pod_ips: addresses::PodIps::of(&objects.pods),
        }
    }

    /// Namespace `ns`'s `ClusterIPs` (a change to them rebuilds the entries).
    pub fn cluster_ips(&self, ns: &str) -> &[IpAddr] {
        self.services.get(ns).map_or(&[], |s| &s.cluster_ips)
    }

    /// Whether `ClusterIPs` that came (`added`) or went (`removed`) change what the
    /// entries may declare: one of theirs is now a `ClusterIP`, or one refused as a
    /// `ClusterIP` is free again. Else the entries' shard stays as it is.
    pub fn entries_affected(&self, added: &[IpAddr], removed: &[IpAddr]) -> bool {
        added
            .iter()
            .any(|ip| self.entries.declared.binary_search(ip).is_ok())
            || self.entries.refused.iter().any(|r| {
                r.reason == addresses::Reason::ClusterIp
                    && r.address.is_some_and(|a| removed.contains(&a))
            })
    }

    /// Declared addresses the entries do not get, and why.
    pub fn refused(&self) -> &[Refusal] {
        &self.entries.refused
    }

    /// This table with namespace `ns`'s Services (and their `EndpointSlices`) built
    /// again from `services` and `slices`, every other shard shared.
    #[must_use]
    pub fn with_namespace(
        &self,
        ns: &str,
        services: &[Arc<Service>],
        slices: &[Arc<EndpointSlice>],
    ) -> Self {
        let mut table = self.clone();
        table.set_namespace(ns, services, slices);
        table
    }

    /// This table with the `ServiceEntries` (and what backs them: `WorkloadEntries`,
    /// selected Pods) built again from `objects`, with the VIPs of `vips`.
    #[must_use]
    pub fn with_entries(&self, objects: &Objects, vips: &Allocation) -> Self {
        NameTable {
            entries: Arc::new(build::entries(
                objects,
                vips,
                (
                    &self.reserved(objects),
                    &self.default_export,
                    self.max_hosts_per_namespace,
                ),
            )),
            ..self.clone()
        }
    }

    fn set_namespace(
        &mut self,
        ns: &str,
        services: &[Arc<Service>],
        slices: &[Arc<EndpointSlice>],
    ) {
        if services.is_empty() {
            self.services.remove(ns);
            return;
        }
        let shard = build::services(
            ns,
            services,
            slices,
            (&self.cluster_domain, &self.default_export),
        );
        self.services.insert(ns.into(), Arc::new(shard));
    }

    /// The namespaces that have Services in the table.
    pub fn service_namespaces(&self) -> impl Iterator<Item = &str> {
        self.services.keys().map(|ns| &**ns)
    }

    /// The shard of the `ServiceEntries`: the same `Arc` while they did not change.
    pub fn entries(&self) -> &Arc<Shard> {
        &self.entries
    }

    /// The cluster domain (e.g. `cluster.local`).
    /// `--max-hosts-per-namespace` (0: no bound): the VIP demand follows it too.
    pub fn max_hosts_per_namespace(&self) -> usize {
        self.max_hosts_per_namespace
    }

    pub fn cluster_domain(&self) -> &str {
        &self.cluster_domain
    }

    /// True when the table holds no name.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of names (exact and wildcard; a name in two shards counts twice).
    pub fn len(&self) -> usize {
        self.services.values().map(|s| s.len()).sum::<usize>() + self.entries.len()
    }

    /// The shard that holds the Services of the namespace `name` is under
    /// (`….<ns>.svc.<cluster domain>`).
    fn services_of(&self, name: &str) -> Option<&Shard> {
        let under = name
            .strip_suffix(self.cluster_domain.as_str())?
            .strip_suffix('.')?
            .strip_suffix(".svc")?;
        let ns = under.rsplit('.').next()?;
        self.services.get(ns).map(|s| &**s)
    }

    /// A name's entries, in the shards that can hold it.
    fn candidates(&self, name: &str) -> [&[Host]; 2] {
        let services = self.services_of(name).map_or(&[][..], |s| s.exact(name));
        [services, self.entries.exact(name)]
    }

    /// The entry a client in `namespace` sees for `name`: exact, else the most
    /// specific wildcard covering it.
    pub fn get_for(&self, name: &str, namespace: &str) -> Option<&Host> {
        pick(self.candidates(name), namespace).or_else(|| self.wildcard_for(name, namespace))
    }

    /// The most specific wildcard entry covering `name` that a client in `namespace`
    /// sees.
    fn wildcard_for(&self, name: &str, namespace: &str) -> Option<&Host> {
        // Below `svc.<cluster domain>` the names are the Services' (a headless
        // Service's pods, a StatefulSet's peers without ready endpoints): a wildcard
        // never answers there.
        if under_services(name, &self.cluster_domain).is_some() {
            return None;
        }
        let mut rest = name;
        while let Some((_, suffix)) = rest.split_once('.') {
            if let Some(c) = self.entries.wildcards.get(suffix)
                && let Some(h) = pick([c, &[]], namespace)
            {
                return Some(h);
            }
            rest = suffix;
        }
        None
    }

    /// Whether `name` (normalized) is a name of the cluster domain that the cluster
    /// DNS does not have: under `svc.<cluster domain>`, one that no Service has
    /// (`<service>.<namespace>.svc.<cluster domain>` and every name below it, SRV's
    /// `_port._proto.` and a headless Service's pods, exist only where the Service
    /// does); elsewhere below the cluster domain, any name but those under
    /// `pod.<cluster domain>` (the kubernetes plugin serves nothing else there). Never
    /// for the names with nothing of their own but names below them (the cluster
    /// domain, `svc.`, `<namespace>.svc.`), and never unless the table was built from
    /// every Service of the cluster.
    pub fn no_such_cluster_name(&self, name: &str) -> bool {
        if !self.every_service {
            return false;
        }
        let cd = self.cluster_domain.as_str();
        if let Some(under) = under_services(name, cd) {
            // `<service>.<namespace>`, then anything below the Service.
            let mut labels = under.rsplit('.');
            let (Some(ns), Some(service)) = (labels.next(), labels.next()) else {
                return false;
            };
            return !self
                .services
                .get(ns)
                .is_some_and(|s| s.service_names.contains(service));
        }
        name.strip_suffix(cd)
            .and_then(|rest| rest.strip_suffix('.'))
            .and_then(|below| below.rsplit('.').next())
            .is_some_and(|top| top != "pod")
    }

    /// The entry a client of the `default` namespace sees (for tests and tools).
    pub fn get(&self, name: &str) -> Option<&Host> {
        self.get_for(name, "default")
    }

    /// Matches a (normalized) query name from a client in `namespace`.
    pub fn resolve<'a>(
        &'a self,
        name: &'a str,
        namespace: &str,
        extra_search: &[String],
    ) -> Option<Match<'a>> {
        if let Some(h) = pick(self.candidates(name), namespace) {
            return Some(Match::Direct(h));
        }
        if let Some(h) = self.short_name(name, namespace) {
            return Some(Match::Direct(h));
        }
        // The Kubernetes search domains of a client in `namespace`, then the others.
        let cd = self.cluster_domain.as_str();
        let kubernetes = [
            strip_domain(name, &[namespace, "svc", cd]),
            strip_domain(name, &["svc", cd]),
            strip_domain(name, &[cd]),
        ];
        let others = extra_search
            .iter()
            .map(|d| strip_domain(name, &[d.as_str()]));
        for base in kubernetes.into_iter().chain(others).flatten() {
            if let Some(host) = self.get_for(base, namespace) {
                return Some(Match::SearchSuffix { base, host });
            }
        }
        // The exact name was looked up first.
        self.wildcard_for(name, namespace).map(Match::Direct)
    }

    /// `svc`, `svc.ns`, `svc.ns.svc` → the Service `svc.ns.svc.<cluster domain>`.
    fn short_name(&self, name: &str, namespace: &str) -> Option<&Host> {
        let cd = &self.cluster_domain;
        let full = match name.matches('.').count() {
            0 => format!("{name}.{namespace}.svc.{cd}"),
            1 => format!("{name}.svc.{cd}"),
            2 if name.rsplit_once('.').is_some_and(|(_, last)| last == "svc") => {
                format!("{name}.{cd}")
            }
            _ => return None,
        };
        pick(self.candidates(&full), namespace)
    }

    /// `ServiceEntry` hosts with VIPs to translate (`ClusterIPs` are kube-proxy's).
    pub fn vip_services(&self) -> &[VipService] {
        &self.entries.vip_services
    }

    /// Whether `ip` is a VIP the data path translates (not a `ClusterIP` or an
    /// endpoint address).
    pub fn is_translated_vip(&self, ip: IpAddr) -> bool {
        self.entries.translated_vips.binary_search(&ip).is_ok()
    }

    /// The name a VIP or `ClusterIP` belongs to (PTR) for a client in `namespace`,
    /// among those it may see (`exportTo`): a Service's first (of two namespaces' on
    /// one address, the first name in order), else an entry's, in precedence order.
    pub fn reverse(&self, ip: IpAddr, namespace: &str) -> Option<&str> {
        self.services
            .values()
            .filter_map(|s| s.reverse(ip, namespace))
            .min()
            .or_else(|| self.entries.reverse(ip, namespace))
            .map(|n| &**n)
    }

    /// Every name, sorted, for `/debug/ndsz`: every entry of each, or with
    /// `namespace` the one a client there sees.
    pub fn dump(&self, namespace: Option<&str>) -> BTreeMap<&str, Vec<&Host>> {
        let shards = self.services.values().chain(std::iter::once(&self.entries));
        let mut out: BTreeMap<&str, Vec<&Host>> = BTreeMap::new();
        for shard in shards {
            for (key, wild) in shard
                .exact
                .keys()
                .map(|k| (k, false))
                .chain(shard.wildcards.keys().map(|k| (k, true)))
            {
                let candidates = if wild {
                    [
                        self.entries
                            .wildcards
                            .get(&**key)
                            .map_or(&[][..], Vec::as_slice),
                        &[],
                    ]
                } else {
                    self.candidates(key)
                };
                let Some(first) = candidates.iter().flat_map(|c| c.iter()).next() else {
                    continue;
                };
                let shown: Vec<&Host> = match namespace {
                    Some(ns) => pick(candidates, ns).into_iter().collect(),
                    None => candidates.iter().flat_map(|c| c.iter()).collect(),
                };
                if !shown.is_empty() {
                    out.insert(&first.name, shown);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
