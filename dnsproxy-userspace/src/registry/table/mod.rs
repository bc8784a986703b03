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
        Meta as _, Objects, Pod, Resolution, ServiceEntry, ServiceEntryPort, ServiceKind,
        WorkloadEntry, WorkloadSelector, pod_ip, pod_is_ready, service_kind, slice_service,
    },
};
use crate::name::normalize;

/// Addresses of a name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Addrs {
    pub ipv4: Vec<Ipv4Addr>,
    pub ipv6: Vec<Ipv6Addr>,
}

impl Addrs {
    fn add(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(v4) if !self.ipv4.contains(&v4) => self.ipv4.push(v4),
            IpAddr::V6(v6) if !self.ipv6.contains(&v6) => self.ipv6.push(v6),
            _ => {}
        }
    }

    fn is_empty(&self) -> bool {
        self.ipv4.is_empty() && self.ipv6.is_empty()
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Host {
    /// Canonical name: lower case, no trailing dot (for a wildcard, `*.suffix`).
    pub name: String,
    pub target: Target,
    /// Where it came from, e.g. `ServiceEntry default/aliyun`.
    pub sources: Vec<Arc<str>>,
    /// Names that also reach it from a client in the same namespace (Kubernetes
    /// short names), for the debug dump.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub alt_hosts: Vec<String>,
    /// Its only addresses are auto-allocated VIPs (pods may opt out of those).
    pub auto_allocated: bool,
    /// Namespace of the object it came from (shared by the entry's hosts).
    pub namespace: Arc<str>,
    /// Who may see it (`exportTo`).
    #[serde(skip_serializing_if = "Visibility::is_all")]
    pub export_to: Visibility,
    /// Precedence among the entries for its name.
    #[serde(skip)]
    pub rank: Arc<Rank>,
}

impl Host {
    /// It comes from a Kubernetes Service (not a `ServiceEntry`).
    pub fn is_kubernetes_service(&self) -> bool {
        self.sources
            .first()
            .is_some_and(|s| s.starts_with(SERVICE_SOURCE))
    }
}

/// How a Service's entries name their source: `Service <namespace>/<name>`.
const SERVICE_SOURCE: &str = "Service ";

/// Where an entry comes from: the object's name for logs, namespace, visibility and
/// precedence.
pub struct Owner {
    /// Shared by every host of the entry: one copy per entry, not per host.
    pub source: Arc<str>,
    pub namespace: Arc<str>,
    pub export_to: Visibility,
    pub rank: Arc<Rank>,
}

impl Owner {
    /// A new entry for `name` from this owner.
    fn host(&self, name: &str, target: Target) -> Host {
        Host {
            name: name.to_owned(),
            target,
            sources: vec![Arc::clone(&self.source)],
            alt_hosts: Vec::new(),
            auto_allocated: false,
            namespace: Arc::clone(&self.namespace),
            export_to: self.export_to.clone(),
            rank: Arc::clone(&self.rank),
        }
    }
}

/// The entry a client in `namespace` sees among `candidates` (in precedence order):
/// its own namespace's, else the first it may see.
fn pick<'a>(candidates: &'a [Host], namespace: &str) -> Option<&'a Host> {
    candidates
        .iter()
        .find(|h| &*h.namespace == namespace && h.export_to.allows(namespace))
        .or_else(|| candidates.iter().find(|h| h.export_to.allows(namespace)))
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
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VipService {
    pub host: String,
    /// Auto-allocated, `status.addresses` or `spec.addresses`.
    pub vips: Vec<IpAddr>,
    /// Shared by every host of the entry.
    pub ports: Arc<[ServiceEntryPort]>,
    pub resolution: Resolution,
    pub endpoints: Arc<[WorkloadEntry]>,
    pub source: Arc<str>,
    /// Precedence: of two entries on one VIP, the first translates it.
    #[serde(skip)]
    pub rank: Arc<Rank>,
}

/// The table.
#[derive(Clone, Debug, Default)]
pub struct NameTable {
    cluster_domain: String,
    /// Name → its entries, in precedence order.
    exact: HashMap<String, Vec<Host>>,
    /// `*.example.com` is stored under `example.com`.
    wildcards: HashMap<String, Vec<Host>>,
    reverse: HashMap<IpAddr, String>,
    vip_services: Vec<VipService>,
    /// Every VIP of `vip_services`: addresses the data path must translate.
    translated_vips: HashSet<IpAddr>,
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
        self.exact.get(&full).and_then(|c| pick(c, namespace))
    }

    /// `ServiceEntry` hosts with VIPs to translate (`ClusterIPs` are kube-proxy's).
    pub fn vip_services(&self) -> &[VipService] {
        &self.vip_services
    }

    /// Whether `ip` is a VIP the data path translates (not a `ClusterIP` or an
    /// endpoint address).
    pub fn is_translated_vip(&self, ip: IpAddr) -> bool {
        self.translated_vips.contains(&ip)
    }

    /// The name a VIP or `ClusterIP` belongs to (PTR).
    pub fn reverse(&self, ip: IpAddr) -> Option<&str> {
        self.reverse.get(&ip).map(String::as_str)
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
                Some((candidates.first()?.name.as_str(), shown)).filter(|(_, s)| !s.is_empty())
            })
            .collect()
    }
}

/// A Service's ready endpoint addresses, and (hostname, address) for those with a name.
type Ready = (Vec<IpAddr>, Vec<(String, IpAddr)>);

struct Builder {
    table: NameTable,
}

impl Builder {
    /// Adds `addrs` to `owner`'s entry for `name` (made when it has none yet).
    fn add_addrs(&mut self, name: &str, addrs: &[IpAddr], owner: &Owner, ptr: bool) {
        let wildcard = name.strip_prefix("*.");
        let map = if wildcard.is_some() {
            &mut self.table.wildcards
        } else {
            &mut self.table.exact
        };
        // Nearly every name has one entry: a Vec's first growth would reserve four.
        let candidates = map
            .entry(wildcard.unwrap_or(name).to_owned())
            .or_insert_with(|| Vec::with_capacity(1));
        let at = candidates
            .iter()
            .position(|h| h.sources.first() == Some(&owner.source))
            .unwrap_or_else(|| {
                candidates.push(owner.host(name, Target::Addresses(Addrs::default())));
                candidates.len() - 1
            });
        match &mut candidates[at].target {
            Target::Addresses(a) => addrs.iter().for_each(|ip| a.add(*ip)),
            Target::Cname(t) => {
                tracing::warn!(%name, cname = %t, source = %owner.source, "name is an alias already: addresses ignored");
                return;
            }
        }
        if ptr && wildcard.is_none() {
            for ip in addrs {
                self.table
                    .reverse
                    .entry(*ip)
                    .or_insert_with(|| name.to_owned());
            }
        }
    }

    /// `owner`'s entry for the exact `name`.
    fn entry_mut(&mut self, name: &str, owner: &Owner) -> Option<&mut Host> {
        self.table
            .exact
            .get_mut(name)?
            .iter_mut()
            .find(|h| h.sources.first() == Some(&owner.source))
    }

    /// Entries without an address are not the table's (wildcards included): such names
    /// are forwarded, as Istio does. Entries go in precedence order, and of two VIP
    /// services on one VIP only the first translates it.
    fn finish(&mut self) {
        for map in [&mut self.table.exact, &mut self.table.wildcards] {
            for candidates in map.values_mut() {
                candidates.retain(|h| !matches!(&h.target, Target::Addresses(a) if a.is_empty()));
                candidates.sort_by(|a, b| a.rank.cmp(&b.rank));
                candidates.shrink_to_fit();
            }
            map.retain(|_, candidates| !candidates.is_empty());
        }
        self.table.vip_services.sort_by(|a, b| a.rank.cmp(&b.rank));
        let mut taken = HashSet::new();
        for svc in &mut self.table.vip_services {
            svc.vips.retain(|vip| taken.insert(*vip));
        }
        self.table.vip_services.retain(|s| !s.vips.is_empty());
        self.table.vip_services.shrink_to_fit();
        self.table.translated_vips = taken;
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
            let fqdn = format!("{name}.{ns}.svc.{cd}");
            let owner = Owner {
                source: format!("{SERVICE_SOURCE}{ns}/{name}").into(),
                namespace: ns.into(),
                export_to: Visibility::from_annotation(&svc.metadata),
                rank: Arc::new(Rank::of(&svc.metadata)),
            };
            match service_kind(svc) {
                ServiceKind::ClusterIp(ips) => self.add_addrs(&fqdn, &ips, &owner, true),
                ServiceKind::Headless => {
                    let Some((ips, hostnames)) = endpoints.get(&(ns.to_owned(), name.clone()))
                    else {
                        continue;
                    };
                    if ips.is_empty() {
                        continue;
                    }
                    self.add_addrs(&fqdn, ips, &owner, false);
                    for (hostname, ip) in hostnames {
                        self.add_addrs(&format!("{hostname}.{fqdn}"), &[*ip], &owner, true);
                    }
                }
                ServiceKind::ExternalName(target) => {
                    self.table
                        .exact
                        .entry(fqdn.clone())
                        .or_insert_with(|| Vec::with_capacity(1))
                        .push(owner.host(&fqdn, Target::Cname(target)));
                }
            }
            if let Some(h) = self.entry_mut(&fqdn, &owner) {
                h.alt_hosts = vec![
                    name.clone(),
                    format!("{name}.{ns}"),
                    format!("{name}.{ns}.svc"),
                ];
            }
        }
    }

    fn add_service_entries(&mut self, objects: &Objects, vips: &Allocation) {
        for se in &objects.service_entries {
            let ns = se.metadata.ns();
            let owner = Owner {
                source: format!("ServiceEntry {ns}/{}", se.metadata.name_str()).into(),
                namespace: ns.into(),
                export_to: Visibility::parse(se.spec.export_to.iter().map(String::as_str), ns),
                rank: Arc::new(Rank::of(&se.metadata)),
            };
            // Computed once for all the entry's hosts (there may be thousands).
            let shared = EntryShared {
                ports: se.spec.ports.clone().into(),
                workloads: endpoints_of(se, objects).into(),
            };
            for host in &se.spec.hosts {
                self.add_service_entry_host(se, &shared, &normalize(host), vips, &owner);
            }
        }
    }

    /// One host of a `ServiceEntry`: its addresses (declared, else auto-allocated, else
    /// for STATIC its endpoints), and the VIP service the data path translates.
    fn add_service_entry_host(
        &mut self,
        se: &ServiceEntry,
        shared: &EntryShared,
        host: &str,
        vips: &Allocation,
        owner: &Owner,
    ) {
        let workloads = &shared.workloads;
        let mut addrs = declared_addresses(se, host);
        let mut auto_allocated = false;
        if addrs.is_empty()
            && let Some(v) = vips.get(host)
        {
            addrs = v.addrs().to_vec();
            auto_allocated = true;
        }
        if addrs.is_empty() && se.spec.resolution == Resolution::Static {
            // No VIP: answer with the endpoints themselves, like a headless Service.
            let endpoints: Vec<IpAddr> = workloads
                .iter()
                .filter_map(|e| e.address.parse().ok())
                .collect();
            self.add_addrs(host, &endpoints, owner, false);
            return;
        }
        if addrs.is_empty() {
            tracing::debug!(%host, source = %owner.source, "no address: left to upstream DNS");
            return;
        }
        self.add_addrs(host, &addrs, owner, true);
        if auto_allocated && let Some(h) = self.entry_mut(host, owner) {
            h.auto_allocated = true;
        }
        // NONE means "pass through to the address asked for"; wildcards have no single
        // name to resolve backends from.
        if se.spec.resolution != Resolution::None && !host.starts_with("*.") {
            self.table.vip_services.push(VipService {
                host: host.to_owned(),
                vips: addrs,
                ports: Arc::clone(&shared.ports),
                resolution: se.spec.resolution,
                endpoints: Arc::clone(workloads),
                source: Arc::clone(&owner.source),
                rank: Arc::clone(&owner.rank),
            });
        }
    }
}

/// What every host of one `ServiceEntry` shares.
struct EntryShared {
    ports: Arc<[ServiceEntryPort]>,
    workloads: Arc<[WorkloadEntry]>,
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
