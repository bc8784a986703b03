//! The name table: built from [`Objects`] (whatever their source), read on every query.
//! Lookups are hash-map hits: exact names, then Kubernetes short names, then search
//! suffixes, then wildcard suffixes (one probe per label). A name defined by several
//! objects keeps one entry per object, in precedence order; a client sees the one its
//! namespace may see, its own namespace's first ([`super::export`]).
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use serde::Serialize;

use super::{
    export::{Rank, Visibility},
    manifest::{
        Meta as _, ObjectMeta, Objects, Pod, Resolution, ServiceEntry, ServiceEntryPort,
        ServiceKind, WorkloadEntry, WorkloadSelector, pod_ip, pod_is_ready, service_kind,
        slice_service,
    },
};
use crate::name::normalize;

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

/// The entry a client in `namespace` sees among `candidates` (in precedence order):
/// its own namespace's, else the first it may see.
fn pick<'a>(candidates: &'a [Host], namespace: &str) -> Option<&'a Host> {
    candidates
        .iter()
        .find(|h| h.owner.namespace() == namespace && h.owner.export_to.allows(namespace))
        .or_else(|| {
            candidates
                .iter()
                .find(|h| h.owner.export_to.allows(namespace))
        })
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

/// The table.
#[derive(Clone, Debug, Default)]
pub struct NameTable {
    cluster_domain: String,
    /// Name → its entries, in precedence order.
    exact: HashMap<Arc<str>, Vec<Host>>,
    /// `*.example.com` is stored under `example.com`.
    wildcards: HashMap<Arc<str>, Vec<Host>>,
    /// Address → the name it belongs to, sorted by address (the first name given an
    /// address keeps it): PTR answers are rare, a sorted array costs a third of a map.
    reverse: Vec<(IpAddr, Arc<str>)>,
    vip_services: Vec<VipService>,
    /// Every VIP of `vip_services`, sorted: addresses the data path must translate.
    translated_vips: Vec<IpAddr>,
}

/// Settings of the table that do not come from objects.
#[derive(Clone, Debug)]
pub struct TableConfig {
    pub cluster_domain: String,
}

impl Default for TableConfig {
    fn default() -> Self {
        TableConfig {
            cluster_domain: "cluster.local".into(),
        }
    }
}

impl NameTable {
    /// A table without names.
    pub fn empty(cfg: &TableConfig) -> Self {
        NameTable {
            cluster_domain: normalize(&cfg.cluster_domain),
            ..Default::default()
        }
    }

    /// Builds the table; `ServiceEntry` hosts without declared addresses get their
    /// VIPs from `vips` (`crate::vip::assign` decides who gets which).
    pub fn build(objects: &Objects, vips: &Allocation, cfg: &TableConfig) -> Self {
        let mut b = Builder {
            table: NameTable::empty(cfg),
            namespaces: HashMap::new(),
            ports: HashMap::new(),
        };
        b.add_services(objects);
        b.add_service_entries(objects, vips);
        b.finish();
        b.table
    }

    /// The cluster domain (e.g. `cluster.local`).
    pub fn cluster_domain(&self) -> &str {
        &self.cluster_domain
    }

    /// True when the table holds no name.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of names (exact and wildcard).
    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcards.len()
    }

    /// The Kubernetes search domains of a client in `namespace`.
    pub fn search_domains(&self, namespace: &str) -> [String; 3] {
        let cd = &self.cluster_domain;
        [
            format!("{namespace}.svc.{cd}"),
            format!("svc.{cd}"),
            cd.clone(),
        ]
    }

    /// The entry a client in `namespace` sees for `name`: exact, else the most
    /// specific wildcard covering it.
    pub fn get_for(&self, name: &str, namespace: &str) -> Option<&Host> {
        self.exact
            .get(name)
            .and_then(|c| pick(c, namespace))
            .or_else(|| self.wildcard_for(name, namespace))
    }

    /// The most specific wildcard entry covering `name` that a client in `namespace`
    /// sees.
    fn wildcard_for(&self, name: &str, namespace: &str) -> Option<&Host> {
        let mut rest = name;
        while let Some((_, suffix)) = rest.split_once('.') {
            if let Some(h) = self.wildcards.get(suffix).and_then(|c| pick(c, namespace)) {
                return Some(h);
            }
            rest = suffix;
        }
        None
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
        if let Some(h) = self.exact.get(name).and_then(|c| pick(c, namespace)) {
            return Some(Match::Direct(h));
        }
        if let Some(h) = self.short_name(name, namespace) {
            return Some(Match::Direct(h));
        }
        let search = self.search_domains(namespace);
        for domain in search.iter().chain(extra_search) {
            let Some(base) = name
                .strip_suffix(domain.as_str())
                .and_then(|b| b.strip_suffix('.'))
            else {
                continue;
            };
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
        self.exact
            .get(full.as_str())
            .and_then(|c| pick(c, namespace))
    }

    /// `ServiceEntry` hosts with VIPs to translate (`ClusterIPs` are kube-proxy's).
    pub fn vip_services(&self) -> &[VipService] {
        &self.vip_services
    }

    /// Whether `ip` is a VIP the data path translates (not a `ClusterIP` or an
    /// endpoint address).
    pub fn is_translated_vip(&self, ip: IpAddr) -> bool {
        self.translated_vips.binary_search(&ip).is_ok()
    }

    /// The name a VIP or `ClusterIP` belongs to (PTR).
    pub fn reverse(&self, ip: IpAddr) -> Option<&str> {
        self.reverse
            .binary_search_by(|(addr, _)| addr.cmp(&ip))
            .ok()
            .map(|at| &*self.reverse[at].1)
    }

    /// Every name, sorted, for `/debug/ndsz`: every entry of each, or with
    /// `namespace` the one a client there sees.
    pub fn dump(&self, namespace: Option<&str>) -> BTreeMap<&str, Vec<&Host>> {
        self.exact
            .values()
            .chain(self.wildcards.values())
            .filter_map(|candidates| {
                let shown: Vec<&Host> = match namespace {
                    Some(ns) => pick(candidates, ns).into_iter().collect(),
                    None => candidates.iter().collect(),
                };
                Some((&*candidates.first()?.name, shown)).filter(|(_, s)| !s.is_empty())
            })
            .collect()
    }
}

/// A Service's ready endpoint addresses, and (hostname, address) for those with a name.
type Ready = (Vec<IpAddr>, Vec<(String, IpAddr)>);

struct Builder {
    table: NameTable,
    /// One copy of each namespace's name, shared by its objects' entries.
    namespaces: HashMap<String, Arc<str>>,
    /// One copy of each distinct list of ports.
    ports: HashMap<Vec<ServiceEntryPort>, Arc<[ServiceEntryPort]>>,
}

impl Builder {
    /// The shared copy of namespace `ns`.
    fn namespace(&mut self, ns: &str) -> Arc<str> {
        if let Some(shared) = self.namespaces.get(ns) {
            return Arc::clone(shared);
        }
        let shared: Arc<str> = ns.into();
        self.namespaces.insert(ns.to_owned(), Arc::clone(&shared));
        shared
    }

    /// The owner of `meta`'s entries.
    fn owner(&mut self, kind: Kind, meta: &ObjectMeta, export_to: Visibility) -> Arc<Owner> {
        let namespace = self.namespace(meta.ns());
        Arc::new(Owner {
            kind,
            export_to,
            rank: Rank::of(meta, namespace),
        })
    }

    /// Adds `addrs` to `owner`'s entry for `name` (made when it has none yet); returns
    /// it.
    fn add_addrs(
        &mut self,
        name: &Arc<str>,
        addrs: &[IpAddr],
        owner: &Arc<Owner>,
        ptr: bool,
    ) -> Option<&mut Host> {
        let wildcard = name.strip_prefix("*.");
        let map = if wildcard.is_some() {
            &mut self.table.wildcards
        } else {
            &mut self.table.exact
        };
        let key: Arc<str> = wildcard.map_or_else(|| Arc::clone(name), Arc::from);
        // Nearly every name has one entry: a Vec's first growth would reserve four.
        let candidates = map.entry(key).or_insert_with(|| Vec::with_capacity(1));
        let at = candidates
            .iter()
            .position(|h| Arc::ptr_eq(&h.owner, owner))
            .unwrap_or_else(|| {
                candidates.push(owner.host(Arc::clone(name), Target::Addresses(Addrs::default())));
                candidates.len() - 1
            });
        match &mut candidates[at].target {
            Target::Addresses(a) => addrs.iter().for_each(|ip| a.add(*ip)),
            Target::Cname(t) => {
                tracing::warn!(%name, cname = %t, source = %owner.source(), "name is an alias already: addresses ignored");
                return None;
            }
        }
        if ptr && wildcard.is_none() {
            self.table
                .reverse
                .extend(addrs.iter().map(|ip| (*ip, Arc::clone(name))));
        }
        let map = if wildcard.is_some() {
            &mut self.table.wildcards
        } else {
            &mut self.table.exact
        };
        map.get_mut(wildcard.unwrap_or(name))
            .and_then(|c| c.get_mut(at))
    }

    /// Entries without an address are not the table's (wildcards included): such names
    /// are forwarded, as Istio does. Entries go in precedence order, and of two VIP
    /// services on one VIP only the first translates it.
    fn finish(&mut self) {
        for map in [&mut self.table.exact, &mut self.table.wildcards] {
            for candidates in map.values_mut() {
                candidates.retain(|h| !matches!(&h.target, Target::Addresses(a) if a.is_empty()));
                candidates.sort_by(|a, b| a.owner.rank.cmp(&b.owner.rank));
                candidates.shrink_to_fit();
                for h in candidates {
                    if let Target::Addresses(a) = &mut h.target {
                        a.0.shrink_to_fit();
                    }
                }
            }
            map.retain(|_, candidates| !candidates.is_empty());
            map.shrink_to_fit();
        }
        // The first name given an address keeps it (a stable sort keeps the order).
        let reverse = &mut self.table.reverse;
        reverse.sort_by_key(|(ip, _)| *ip);
        reverse.dedup_by_key(|(ip, _)| *ip);
        reverse.shrink_to_fit();
        self.table
            .vip_services
            .sort_by(|a, b| a.owner.rank.cmp(&b.owner.rank));
        let mut taken = HashSet::new();
        for svc in &mut self.table.vip_services {
            svc.vips.retain(|vip| taken.insert(*vip));
        }
        self.table.vip_services.retain(|s| !s.vips.is_empty());
        self.table.vip_services.shrink_to_fit();
        let mut translated: Vec<IpAddr> = taken.into_iter().collect();
        translated.sort_unstable();
        self.table.translated_vips = translated;
    }

    fn add_services(&mut self, objects: &Objects) {
        let cd = self.table.cluster_domain.clone();
        // Ready endpoint addresses and hostnames per (namespace, service).
        let mut endpoints: HashMap<(String, String), Ready> = HashMap::new();
        for slice in &objects.endpoint_slices {
            let Some(svc) = slice_service(slice) else {
                continue;
            };
            let entry = endpoints
                .entry((slice.metadata.ns().to_owned(), svc.to_owned()))
                .or_default();
            for ep in &slice.endpoints {
                if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                    continue;
                }
                for ip in ep.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()) {
                    entry.0.push(ip);
                    if let Some(h) = &ep.hostname {
                        entry.1.push((normalize(h), ip));
                    }
                }
            }
        }
        for svc in &objects.services {
            let ns = svc.metadata.ns();
            let name = normalize(svc.metadata.name_str());
            let fqdn: Arc<str> = format!("{name}.{ns}.svc.{cd}").into();
            let export_to = Visibility::from_annotation(&svc.metadata);
            let owner = self.owner(Kind::Service, &svc.metadata, export_to);
            let own = match service_kind(svc) {
                ServiceKind::ClusterIp(ips) => self.add_addrs(&fqdn, &ips, &owner, true),
                ServiceKind::Headless => {
                    let Some((ips, hostnames)) = endpoints.get(&(ns.to_owned(), name.clone()))
                    else {
                        continue;
                    };
                    if ips.is_empty() {
                        continue;
                    }
                    for (hostname, ip) in hostnames {
                        let pod: Arc<str> = format!("{hostname}.{fqdn}").into();
                        self.add_addrs(&pod, &[*ip], &owner, true);
                    }
                    self.add_addrs(&fqdn, ips, &owner, false)
                }
                ServiceKind::ExternalName(target) => {
                    let candidates = self
                        .table
                        .exact
                        .entry(Arc::clone(&fqdn))
                        .or_insert_with(|| Vec::with_capacity(1));
                    candidates.push(owner.host(Arc::clone(&fqdn), Target::Cname(target)));
                    candidates.last_mut()
                }
            };
            if let Some(h) = own {
                h.short_names = true;
            }
        }
    }

    fn add_service_entries(&mut self, objects: &Objects, vips: &Allocation) {
        for se in &objects.service_entries {
            let ns = se.metadata.ns();
            let export_to = Visibility::parse(se.spec.export_to.iter().map(String::as_str), ns);
            let owner = self.owner(Kind::ServiceEntry, &se.metadata, export_to);
            // Computed once for all the entry's hosts (there may be thousands).
            let ports = Arc::clone(
                self.ports
                    .entry(se.spec.ports.clone())
                    .or_insert_with(|| se.spec.ports.clone().into()),
            );
            let shared = Arc::new(EntryShared {
                ports,
                endpoints: endpoints_of(se, objects).into(),
            });
            for host in &se.spec.hosts {
                let host: Arc<str> = normalize(host).into();
                self.add_service_entry_host(se, &shared, &host, vips, &owner);
            }
        }
    }

    /// One host of a `ServiceEntry`: its addresses (declared, else auto-allocated, else
    /// for STATIC its endpoints), and the VIP service the data path translates.
    fn add_service_entry_host(
        &mut self,
        se: &ServiceEntry,
        shared: &Arc<EntryShared>,
        host: &Arc<str>,
        vips: &Allocation,
        owner: &Arc<Owner>,
    ) {
        let mut addrs = declared_addresses(se, host);
        let mut auto_allocated = false;
        if addrs.is_empty()
            && let Some(v) = vips.get(&**host)
        {
            addrs = v.addrs().to_vec();
            auto_allocated = true;
        }
        if addrs.is_empty() && se.spec.resolution == Resolution::Static {
            // No VIP: answer with the endpoints themselves, like a headless Service.
            let endpoints: Vec<IpAddr> = shared
                .endpoints
                .iter()
                .filter_map(|e| e.address.parse().ok())
                .collect();
            self.add_addrs(host, &endpoints, owner, false);
            return;
        }
        if addrs.is_empty() {
            tracing::debug!(%host, source = %owner.source(), "no address: left to upstream DNS");
            return;
        }
        if let Some(h) = self.add_addrs(host, &addrs, owner, true)
            && auto_allocated
        {
            h.auto_allocated = true;
        }
        // NONE means "pass through to the address asked for"; wildcards have no single
        // name to resolve backends from.
        if se.spec.resolution != Resolution::None && !host.starts_with("*.") {
            self.table.vip_services.push(VipService {
                host: Arc::clone(host),
                vips: addrs,
                entry: Arc::clone(shared),
                resolution: se.spec.resolution,
                owner: Arc::clone(owner),
            });
        }
    }
}

/// The namespace and selector of every `ServiceEntry` with a `workloadSelector`.
pub fn workload_selectors(
    service_entries: &[Arc<ServiceEntry>],
) -> Vec<(String, WorkloadSelector)> {
    service_entries
        .iter()
        .filter_map(|se| {
            let selector = se.spec.workload_selector.clone()?;
            Some((se.metadata.ns().to_owned(), selector))
        })
        .collect()
}

/// The Pods some `selectors` entry selects, ready or not: the only Pods the name table
/// reads, so a change to any other Pod does not rebuild it.
pub fn selectable_pods(
    pods: &[Arc<Pod>],
    selectors: &[(String, WorkloadSelector)],
) -> Vec<Arc<Pod>> {
    pods.iter()
        .filter(|p| {
            selectors.iter().any(|(ns, selector)| {
                p.metadata.ns() == ns && selector.matches(p.metadata.label_map())
            })
        })
        .cloned()
        .collect()
}

/// A `ServiceEntry`'s endpoints: with a `workloadSelector`, the WorkloadEntries and
/// ready Pods of its namespace whose labels match (a workload's `ports` override the
/// target port by port name, as Istio does); else `spec.endpoints`.
fn endpoints_of(se: &ServiceEntry, objects: &Objects) -> Vec<WorkloadEntry> {
    let Some(selector) = &se.spec.workload_selector else {
        return se.spec.endpoints.clone();
    };
    let ns = se.metadata.ns();
    let entries = objects
        .workload_entries
        .iter()
        .filter(|w| w.metadata.ns() == ns)
        .filter(|w| selector.matches(&w.spec.labels) || selector.matches(w.metadata.label_map()))
        .map(|w| w.spec.clone());
    let pods = objects
        .pods
        .iter()
        .filter(|p| p.metadata.ns() == ns && pod_is_ready(p))
        .filter(|p| selector.matches(p.metadata.label_map()))
        .filter_map(|p| {
            Some(WorkloadEntry {
                address: pod_ip(p)?.to_owned(),
                ..Default::default()
            })
        });
    entries.chain(pods).collect()
}

/// The addresses a `ServiceEntry` itself gives `host`: `spec.addresses`, else the ones
/// Istio allocated (`status.addresses`).
fn declared_addresses(se: &ServiceEntry, host: &str) -> Vec<IpAddr> {
    let spec = se.spec_addresses().unwrap_or_default();
    if spec.is_empty() {
        se.status_addresses(host)
    } else {
        spec.single
    }
}

#[cfg(test)]
mod tests;
