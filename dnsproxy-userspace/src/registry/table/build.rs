//! Building one shard of the name table: a namespace's Services (with the endpoints of
//! its headless ones), or the `ServiceEntries` (with their VIPs, and the workloads
//! their selectors select).
use std::{collections::HashMap, net::IpAddr, sync::Arc};

use super::{
    Addrs, Allocation, EntryShared, Host, Kind, Owner, Shard, Target, VipService,
    addresses::{Reason, Refusal, Reserved},
};
use crate::{
    name::normalize,
    registry::{
        export::{Rank, Visibility},
        manifest::{
            EndpointSlice, Meta as _, ObjectMeta, Objects, Resolution, Service, ServiceEntry,
            ServiceEntryPort, ServiceKind, WorkloadEntry, WorkloadPod, WorkloadSelector,
            service_kind, slice_service,
        },
        quota::OverQuota,
    },
};

/// The shard of namespace `ns`'s `services`, with the endpoints `slices` list for
/// its headless ones; their names end in `<ns>.svc.<cluster_domain>`.
pub(super) fn services(
    ns: &str,
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
    (cluster_domain, default_export): (&str, &[String]),
) -> Shard {
    let mut b = Builder {
        default_export: default_export.to_vec(),
        ..Builder::default()
    };
    b.add_services(ns, services, slices, cluster_domain);
    b.finish();
    b.shard
}

/// The shard of the `ServiceEntries` of `objects`; hosts without declared addresses
/// get their VIPs from `vips`.
pub(super) fn entries(
    objects: &Objects,
    vips: &Allocation,
    (reserved, default_export, quota): (&Reserved<'_>, &[String], usize),
) -> Shard {
    let mut b = Builder {
        default_export: default_export.to_vec(),
        ..Builder::default()
    };
    b.add_service_entries(objects, vips, reserved, &OverQuota::of(objects, quota));
    b.finish();
    b.shard
}

/// A Service's ready endpoint addresses, and (hostname, address) for those with a name.
type Ready = (Vec<IpAddr>, Vec<(String, IpAddr)>);

#[derive(Default)]
struct Builder {
    shard: Shard,
    /// One copy of each namespace's name, shared by its objects' entries.
    namespaces: HashMap<String, Arc<str>>,
    /// One copy of each distinct list of ports.
    ports: HashMap<Vec<ServiceEntryPort>, Arc<[ServiceEntryPort]>>,
    /// `exportTo` of an object that says none (`--default-export-to`; empty: `*`).
    default_export: Vec<String>,
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
            &mut self.shard.wildcards
        } else {
            &mut self.shard.exact
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
            self.shard.reverse.extend(
                addrs
                    .iter()
                    .map(|ip| (*ip, Arc::clone(name), Arc::clone(owner))),
            );
        }
        let map = if wildcard.is_some() {
            &mut self.shard.wildcards
        } else {
            &mut self.shard.exact
        };
        map.get_mut(wildcard.unwrap_or(name))
            .and_then(|c| c.get_mut(at))
    }

    /// Entries without an address are not the table's (wildcards included): such names
    /// are forwarded, as Istio does. Entries go in precedence order, and of two VIP
    /// services on one VIP only the first translates it.
    fn finish(&mut self) {
        let taken = self.refuse_claimed();
        self.shard.declared.sort_unstable();
        self.shard.declared.dedup();
        self.shard.declared.shrink_to_fit();
        self.shard.cluster_ips.sort_unstable();
        self.shard.cluster_ips.dedup();
        self.shard.cluster_ips.shrink_to_fit();
        self.shard.refused.shrink_to_fit();

        for map in [&mut self.shard.exact, &mut self.shard.wildcards] {
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
        // Every name of an address, in precedence order (a stable sort keeps the
        // order names were given it in): a PTR answer is the first a client may see.
        let reverse = &mut self.shard.reverse;
        reverse.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.2.rank.cmp(&b.2.rank)));
        reverse.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
        reverse.shrink_to_fit();
        self.shard.vip_services.retain(|s| !s.vips.is_empty());
        self.shard.vip_services.shrink_to_fit();
        let mut translated: Vec<IpAddr> = taken.into_keys().collect();
        translated.sort_unstable();
        self.shard.translated_vips = translated;
    }

    /// Sorts the VIP services by precedence and gives each address to the first that
    /// declares it: another entry that declares it too, and is seen nowhere the first
    /// is not, is refused it, in its translation and its answers (never merged).
    /// An auto-allocated VIP (one host in several namespaces), or an address whose
    /// entries are seen in different namespaces, stays with each: the data path
    /// translates it, in each namespace's view, to the entry that namespace sees.
    /// Returns every address held, with its first holder.
    fn refuse_claimed(&mut self) -> HashMap<IpAddr, Arc<Owner>> {
        self.shard
            .vip_services
            .sort_by(|a, b| a.owner.rank.cmp(&b.owner.rank));
        let mut taken: HashMap<IpAddr, Arc<Owner>> = HashMap::new();
        let mut claimed = Vec::new();
        for svc in &mut self.shard.vip_services {
            svc.vips.retain(|vip| match taken.get(vip) {
                None => {
                    taken.insert(*vip, Arc::clone(&svc.owner));
                    true
                }
                // One entry's hosts sharing its addresses: the first translates.
                Some(holder) if Arc::ptr_eq(holder, &svc.owner) => false,
                // One host in several namespaces, one auto-allocated VIP: each
                // namespace's view translates it to the entry that namespace sees.
                Some(_) if !svc.declared => true,
                // Another's address, declared where the holder is seen too: refused.
                Some(holder) if holder.export_to.covers(&svc.owner.export_to) => {
                    claimed.push((
                        Arc::clone(&svc.host),
                        Arc::clone(&svc.owner),
                        *vip,
                        holder.source(),
                    ));
                    false
                }
                // Seen where the holder is not: each view's first (the plan).
                Some(_) => true,
            });
        }
        for (host, owner, vip, holder) in claimed {
            if let Some(h) = self
                .shard
                .exact
                .get_mut(&host)
                .and_then(|c| c.iter_mut().find(|h| Arc::ptr_eq(&h.owner, &owner)))
                && let Target::Addresses(a) = &mut h.target
            {
                a.0.retain(|ip| *ip != vip);
            }
            self.shard
                .reverse
                .retain(|(ip, name, _)| !(*ip == vip && *name == host));
            self.shard.refused.push(Refusal {
                source: owner.source(),
                host,
                address: Some(vip),
                reason: Reason::Claimed,
                holder: Some(holder),
            });
        }
        taken
    }

    fn add_services(
        &mut self,
        ns: &str,
        services: &[Arc<Service>],
        slices: &[Arc<EndpointSlice>],
        cd: &str,
    ) {
        // Ready endpoint addresses and hostnames per service.
        let mut endpoints: HashMap<String, Ready> = HashMap::new();
        for slice in slices.iter().filter(|s| s.metadata.ns() == ns) {
            let Some(svc) = slice_service(slice) else {
                continue;
            };
            let entry = endpoints.entry(svc.to_owned()).or_default();
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
        for svc in services.iter().filter(|s| s.metadata.ns() == ns) {
            let name = normalize(svc.metadata.name_str());
            self.shard.service_names.insert(name.as_str().into());
            let fqdn: Arc<str> = format!("{name}.{ns}.svc.{cd}").into();
            let export_to = Visibility::from_annotation(&svc.metadata, &self.default_export);
            let owner = self.owner(Kind::Service, &svc.metadata, export_to);
            let own = match service_kind(svc) {
                ServiceKind::ClusterIp(ips) => {
                    self.shard.cluster_ips.extend(ips.iter().copied());
                    self.add_addrs(&fqdn, &ips, &owner, true)
                }
                ServiceKind::Headless => {
                    let Some((ips, hostnames)) = endpoints.get(&name) else {
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
                        .shard
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

    fn add_service_entries(
        &mut self,
        objects: &Objects,
        vips: &Allocation,
        reserved: &Reserved<'_>,
        over_quota: &OverQuota,
    ) {
        for (index, se) in objects.service_entries.iter().enumerate() {
            let ns = se.metadata.ns();
            let export_to = Visibility::parse_or(
                se.spec.export_to.iter().map(String::as_str),
                ns,
                &self.default_export,
            );
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
                if over_quota.contains(index, &host) {
                    self.shard.refused.push(Refusal {
                        source: owner.source(),
                        host,
                        address: None,
                        reason: Reason::Quota,
                        holder: None,
                    });
                    continue;
                }
                self.add_service_entry_host(se, &shared, &host, (vips, reserved), &owner);
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
        (vips, reserved): (&Allocation, &Reserved<'_>),
        owner: &Arc<Owner>,
    ) {
        let mut addrs = declared_addresses(se, host);
        let declared = !addrs.is_empty();
        if !reserved.may_name(host, owner.namespace()) {
            self.shard.refused.push(Refusal {
                source: owner.source(),
                host: Arc::clone(host),
                address: None,
                reason: Reason::ClusterName,
                holder: None,
            });
            return;
        }
        addrs.retain(|ip| match reserved.check(*ip) {
            Ok(()) => true,
            Err(reason) => {
                self.shard.refused.push(Refusal {
                    source: owner.source(),
                    host: Arc::clone(host),
                    address: Some(*ip),
                    reason,
                    holder: None,
                });
                false
            }
        });
        if declared && addrs.is_empty() {
            // Every address it declared is someone else's: it gets none, not a VIP of
            // ours either (its name goes to upstream DNS).
            return;
        }
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
        if !auto_allocated {
            self.shard.declared.extend(addrs.iter().copied());
        }
        if let Some(h) = self.add_addrs(host, &addrs, owner, true)
            && auto_allocated
        {
            h.auto_allocated = true;
        }
        // NONE means "pass through to the address asked for"; wildcards have no single
        // name to resolve backends from.
        if se.spec.resolution != Resolution::None && !host.starts_with("*.") {
            self.shard.vip_services.push(VipService {
                host: Arc::clone(host),
                vips: addrs,
                entry: Arc::clone(shared),
                resolution: se.spec.resolution,
                owner: Arc::clone(owner),
                declared: !auto_allocated,
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
    pods: &[Arc<WorkloadPod>],
    selectors: &[(String, WorkloadSelector)],
) -> Vec<Arc<WorkloadPod>> {
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
        .filter(|p| p.metadata.ns() == ns && p.is_ready())
        .filter(|p| selector.matches(p.metadata.label_map()))
        .filter_map(|p| {
            Some(WorkloadEntry {
                address: p.ip()?.to_owned(),
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
