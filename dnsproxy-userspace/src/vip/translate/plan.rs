//! From VIP services and resolved names to the content of the translation maps.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use dnsproxy_common::{
    Backend, MAX_BACKENDS, PORT_UNDECLARED, ServiceKey, ServiceValue, VIP_DECLARED, VIP_SCOPED,
    VipInfo,
};

use crate::{
    bpf::to_map_addr,
    dns::Protocol,
    name::normalize,
    registry::{
        manifest::{Resolution, ServiceEntryPort, WorkloadEntry},
        table::VipService,
    },
};

/// The transport of a `ServiceEntry` port: UDP only when declared so, else TCP (HTTP,
/// HTTPS, TLS, GRPC, TCP, MONGO, ... all run over TCP).
pub fn port_protocol(port: &ServiceEntryPort) -> Protocol {
    match port.protocol.as_deref() {
        Some(p) if p.eq_ignore_ascii_case("UDP") => Protocol::Udp,
        _ => Protocol::Tcp,
    }
}

/// Backend port for an endpoint: its named port, else the target port, else the port.
fn backend_port(port: &ServiceEntryPort, endpoint: Option<&WorkloadEntry>) -> u16 {
    endpoint
        .and_then(|e| e.ports.get(&port.name).copied())
        .or(port.target_port)
        .unwrap_or(port.number)
}

/// Names whose addresses a service needs from DNS: its endpoints' addresses that are
/// not IPs, or the host itself when it has no endpoints.
pub fn names_to_resolve(service: &VipService) -> Vec<String> {
    match service.resolution {
        Resolution::Dns | Resolution::DnsRoundRobin => {
            if service.endpoints().is_empty() {
                vec![service.host.to_string()]
            } else {
                service
                    .endpoints()
                    .iter()
                    .filter(|e| e.address.parse::<IpAddr>().is_err())
                    .map(|e| normalize(&e.address))
                    .collect()
            }
        }
        Resolution::Static | Resolution::None => Vec::new(),
    }
}

/// The translation maps' desired content.
#[derive(Debug, Default)]
pub struct Plan {
    pub vips: BTreeMap<IpAddr, VipInfo>,
    /// Only the backends in use: an inline [`ServiceValue`] is 328 bytes, and two
    /// plans of 100,000 services are held at once during a sync.
    pub services: BTreeMap<ServiceKeyOrd, Backends>,
    /// Hosts with at least one IPv6 backend (their IPv6 VIP is worth answering).
    pub ipv6_backed: HashSet<String>,
    /// The VIPs in precedence order of their first entry: what full maps keep first.
    pub precedence: Vec<IpAddr>,
}

/// A service's backends, at most [`MAX_BACKENDS`]; `None`: the port is not a service
/// in this view ([`PORT_UNDECLARED`]), though view 0's entry declares it.
pub type Backends = Option<Box<[Backend]>>;

/// The map value holding `backends`.
pub fn service_value(backends: &Backends) -> ServiceValue {
    let mut value = ServiceValue::default();
    match backends {
        Some(backends) => {
            let n = backends.len().min(MAX_BACKENDS);
            value.backends[..n].copy_from_slice(&backends[..n]);
            value.count = n as u32;
        }
        None => value.count = PORT_UNDECLARED,
    }
    value
}

/// The backends a map value holds.
pub fn backends_of(value: &ServiceValue) -> Backends {
    if value.count == PORT_UNDECLARED {
        return None;
    }
    let n = (value.count as usize).min(MAX_BACKENDS);
    Some(value.backends[..n].into())
}

/// How many entries the translation maps take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub vips: usize,
    pub services: usize,
}

/// The views a plan translates for: `None` in local mode, one view (0) that sees every
/// entry; in node mode, the namespaces with captured pods on this node, each with its
/// view id ([`dnsproxy_common::NetnsPolicy::view`]), beside view 0 which holds what
/// every namespace sees.
pub type Views<'a> = Option<&'a [(Arc<str>, u32)]>;

impl Plan {
    /// Whether the maps `self` and `other` describe are the same.
    pub fn same_maps(&self, other: &Plan) -> bool {
        self.vips == other.vips && self.services == other.services
    }

    /// Keeps what fits in `capacity`, whole VIPs in precedence order of their entries
    /// (oldest first, as the table orders them; VIPs in their grace period after, in
    /// address order), so that a newcomer's many ports or low addresses never push an
    /// older entry out; returns how many VIPs were left out.
    pub fn fit(&mut self, capacity: Capacity) -> usize {
        if self.vips.len() <= capacity.vips && self.services.len() <= capacity.services {
            return 0;
        }
        let mut per_vip: BTreeMap<IpAddr, usize> = BTreeMap::new();
        for key in self.services.keys() {
            *per_vip.entry(key.vip).or_default() += 1;
        }
        let ranked: HashSet<IpAddr> = self.precedence.iter().copied().collect();
        let rest = self.vips.keys().filter(|v| !ranked.contains(*v));
        let (mut vips, mut services) = (0, 0);
        let mut kept = HashSet::new();
        for vip in self.precedence.iter().chain(rest) {
            let n = per_vip.get(vip).copied().unwrap_or(0);
            if vips < capacity.vips && services + n <= capacity.services {
                vips += 1;
                services += n;
                kept.insert(*vip);
            }
        }
        let dropped = self.vips.len() - kept.len();
        self.vips.retain(|vip, _| kept.contains(vip));
        self.services.retain(|key, _| kept.contains(&key.vip));
        self.precedence.retain(|vip| kept.contains(vip));
        dropped
    }
}

/// The addresses a service's backends may have: its endpoint IPs, and what its names
/// resolved to.
fn backend_ips<'a>(
    svc: &'a VipService,
    resolved: &'a HashMap<String, Vec<IpAddr>>,
) -> impl Iterator<Item = IpAddr> + 'a {
    let literal = svc
        .endpoints()
        .iter()
        .filter_map(|e| e.address.parse::<IpAddr>().ok());
    let named = names_to_resolve(svc)
        .into_iter()
        .flat_map(move |n| resolved.get(&n).cloned().unwrap_or_default());
    literal.chain(named)
}

/// `ServiceKey` with an order, for deterministic diffs: a VIP's keys are adjacent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceKeyOrd {
    pub vip: IpAddr,
    pub view: u32,
    pub port: u16,
    pub protocol: u8,
}

impl ServiceKeyOrd {
    /// The smallest key of `vip`.
    pub fn first_of(vip: IpAddr) -> Self {
        ServiceKeyOrd {
            vip,
            view: 0,
            port: 0,
            protocol: 0,
        }
    }

    /// The largest key of `vip`.
    pub fn last_of(vip: IpAddr) -> Self {
        ServiceKeyOrd {
            vip,
            view: u32::MAX,
            port: u16::MAX,
            protocol: u8::MAX,
        }
    }

    pub fn key(&self) -> ServiceKey {
        ServiceKey {
            addr: to_map_addr(self.vip),
            port: self.port,
            protocol: self.protocol,
            _pad: 0,
            view: self.view,
        }
    }

    /// The map key `key` stands for.
    pub fn of(key: &ServiceKey) -> Self {
        ServiceKeyOrd {
            vip: crate::bpf::from_map_addr(&key.addr),
            view: key.view,
            port: key.port,
            protocol: key.protocol,
        }
    }
}

/// The entry that translates a VIP for a client in namespace `ns`, of `candidates`
/// (the VIP's entries in precedence order): its own namespace's first, then the oldest
/// that it sees.
fn winner<'a>(candidates: &[&'a VipService], ns: &str) -> Option<&'a VipService> {
    let visible = || candidates.iter().filter(|s| s.owner.export_to.allows(ns));
    visible()
        .find(|s| &**s.owner.rank.namespace() == ns)
        .or_else(|| visible().next())
        .copied()
}

/// Computes the maps from `services` (in precedence order, as the table holds them),
/// the addresses resolved so far (`resolved`: name → addresses; a name missing from it
/// has not been resolved yet), for `views`.
///
/// View 0 holds, for each VIP, the first entry that every namespace sees (local mode:
/// the first entry). A namespace's view holds the VIP's services only where its winner
/// is another entry (its own, or one exported to it alone), with the ports view 0
/// declares and it does not marked undeclared: a client never reaches an entry that is
/// not exported to it, and never an older one where its own namespace has one.
pub fn plan(
    services: &[VipService],
    resolved: &HashMap<String, Vec<IpAddr>>,
    views: Views<'_>,
) -> Plan {
    let mut out = Plan::default();
    // (VIP, position): a VIP's candidates together, in precedence order.
    let mut claims: Vec<(IpAddr, usize)> = Vec::new();
    for (at, svc) in services.iter().enumerate() {
        if backend_ips(svc, resolved).any(|ip| ip.is_ipv6()) {
            out.ipv6_backed.insert(svc.host.to_string());
        }
        claims.extend(svc.vips.iter().map(|vip| (*vip, at)));
    }
    claims.sort_unstable();
    let mut first_claim: Vec<(usize, IpAddr)> = Vec::new();
    for group in claims.chunk_by(|a, b| a.0 == b.0) {
        let vip = group[0].0;
        let candidates: Vec<&VipService> = group.iter().map(|(_, at)| &services[*at]).collect();
        let shared = match views {
            None => candidates.first().copied(),
            Some(_) => candidates
                .iter()
                .copied()
                .find(|s| s.owner.export_to.is_all()),
        };
        let mut info = VipInfo::default();
        let mut held = false;
        if let Some(svc) = shared {
            info.ports = svc.ports().len() as u32;
            add_services(&mut out.services, (vip, 0), svc, resolved);
            held = true;
        }
        for (ns, view) in views.into_iter().flatten() {
            let Some(own) = winner(&candidates, ns) else {
                continue;
            };
            if shared.is_some_and(|s| std::ptr::eq(s, own)) {
                continue;
            }
            add_services(&mut out.services, (vip, *view), own, resolved);
            for port in shared.iter().flat_map(|s| s.ports()) {
                let key = ServiceKeyOrd {
                    vip,
                    view: *view,
                    port: port.number,
                    protocol: port_protocol(port).ip_proto(),
                };
                out.services.entry(key).or_insert(None);
            }
            info.flags |= VIP_SCOPED;
            held = true;
        }
        if held {
            if candidates.iter().any(|s| s.declared) {
                info.flags |= VIP_DECLARED;
            }
            out.vips.insert(vip, info);
            first_claim.push((group[0].1, vip));
        }
    }
    first_claim.sort_unstable();
    out.precedence = first_claim.into_iter().map(|(_, vip)| vip).collect();
    out
}

/// `svc`'s services on `vip` in `view`: each declared port with its backends.
fn add_services(
    out: &mut BTreeMap<ServiceKeyOrd, Backends>,
    (vip, view): (IpAddr, u32),
    svc: &VipService,
    resolved: &HashMap<String, Vec<IpAddr>>,
) {
    for port in svc.ports() {
        // Candidate backends (address, port), same family as the VIP.
        let mut backends: BTreeSet<(IpAddr, u16)> = BTreeSet::new();
        match svc.resolution {
            Resolution::Static => {
                for ep in svc.endpoints() {
                    if let Ok(ip) = ep.address.parse::<IpAddr>() {
                        backends.insert((ip, backend_port(port, Some(ep))));
                    }
                }
            }
            Resolution::Dns | Resolution::DnsRoundRobin => {
                if svc.endpoints().is_empty() {
                    for ip in resolved.get(&*svc.host).into_iter().flatten() {
                        backends.insert((*ip, backend_port(port, None)));
                    }
                }
                for ep in svc.endpoints() {
                    let ips: Vec<IpAddr> = match ep.address.parse::<IpAddr>() {
                        Ok(ip) => vec![ip],
                        Err(_) => resolved
                            .get(&normalize(&ep.address))
                            .cloned()
                            .unwrap_or_default(),
                    };
                    for ip in ips {
                        backends.insert((ip, backend_port(port, Some(ep))));
                    }
                }
            }
            Resolution::None => {}
        }
        // An IPv6 VIP whose host has only IPv4 backends gets them IPv4-mapped:
        // a dual-stack socket reaches them, and AAAA answers stay usable.
        let same_family = |ip: &IpAddr| ip.is_ipv4() == vip.is_ipv4();
        let v4_for_v6 = vip.is_ipv6() && !backends.iter().any(|(ip, _)| ip.is_ipv6());
        let value: Box<[Backend]> = backends
            .iter()
            .filter(|(ip, _)| same_family(ip) || v4_for_v6)
            .take(MAX_BACKENDS)
            .map(|(ip, p)| Backend {
                addr: to_map_addr(*ip),
                port: *p,
                _pad: 0,
            })
            .collect();
        let key = ServiceKeyOrd {
            vip,
            view,
            port: port.number,
            protocol: port_protocol(port).ip_proto(),
        };
        out.insert(key, Some(value));
    }
}

#[cfg(test)]
mod tests {
    use dnsproxy_common::ip_proto::{TCP, UDP};

    use super::*;
    use crate::registry::manifest::ServiceEntryPort;

    fn port(number: u16, name: &str, protocol: &str, target: Option<u16>) -> ServiceEntryPort {
        ServiceEntryPort {
            number,
            name: name.into(),
            protocol: Some(protocol.into()),
            target_port: target,
        }
    }

    fn svc(
        resolution: Resolution,
        endpoints: Vec<WorkloadEntry>,
        ports: Vec<ServiceEntryPort>,
    ) -> VipService {
        VipService {
            host: "aliyun.com".into(),
            vips: vec!["240.240.0.5".parse().unwrap(), "2001:2::5".parse().unwrap()],
            entry: Arc::new(crate::registry::table::EntryShared {
                ports: ports.into(),
                endpoints: endpoints.into(),
            }),
            resolution,
            owner: Arc::new(crate::registry::table::Owner {
                kind: crate::registry::table::Kind::ServiceEntry,
                export_to: crate::registry::export::Visibility::All,
                rank: crate::registry::export::Rank::default(),
            }),
            declared: false,
        }
    }

    fn backends_in(plan: &Plan, vip: &str, view: u32, port: u16, protocol: u8) -> Vec<String> {
        plan.services[&ServiceKeyOrd {
            vip: vip.parse().unwrap(),
            view,
            port,
            protocol,
        }]
            .as_deref()
            .expect("a declared port")
            .iter()
            .map(|b| format!("{} {}", crate::bpf::from_map_addr(&b.addr), b.port))
            .collect()
    }

    fn backends(plan: &Plan, vip: &str, port: u16, protocol: u8) -> Vec<String> {
        backends_in(plan, vip, 0, port, protocol)
    }

    /// An entry of `namespace`, created `age` seconds after the epoch, exported to
    /// `export_to`, with one STATIC endpoint and port 80 on `vip`.
    fn entry(
        namespace: &str,
        age: i64,
        export_to: &[&str],
        vip: &str,
        endpoint: &str,
    ) -> VipService {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let meta = crate::registry::manifest::ObjectMeta {
            name: Some("e".into()),
            namespace: Some(namespace.into()),
            creation_timestamp: Some(Time(
                k8s_openapi::jiff::Timestamp::from_second(age).unwrap(),
            )),
            ..Default::default()
        };
        let mut s = svc(
            Resolution::Static,
            vec![WorkloadEntry {
                address: endpoint.into(),
                ..Default::default()
            }],
            vec![port(80, "http", "HTTP", None)],
        );
        s.vips = vec![vip.parse().unwrap()];
        s.owner = Arc::new(crate::registry::table::Owner {
            kind: crate::registry::table::Kind::ServiceEntry,
            export_to: crate::registry::export::Visibility::parse(
                export_to.iter().copied(),
                namespace,
            ),
            rank: crate::registry::export::Rank::of(&meta, namespace.into()),
        });
        s
    }

    #[test]
    fn each_namespace_translates_a_vip_to_the_entry_it_sees() {
        // One host in three namespaces, one auto-allocated VIP: `old` (exported to
        // all, oldest), `shop` (its own only), `evil` (its own only).
        let vip = "240.240.0.9";
        let services = [
            entry("old", 1, &["*"], vip, "192.0.2.1"),
            entry("shop", 2, &["."], vip, "192.0.2.2"),
            entry("evil", 3, &["."], vip, "192.0.2.66"),
        ];
        let views: Vec<(Arc<str>, u32)> =
            vec![("shop".into(), 1), ("evil".into(), 2), ("other".into(), 3)];
        let p = plan(&services, &HashMap::new(), Some(&views));
        assert_eq!(
            backends_in(&p, vip, 0, 80, TCP),
            ["192.0.2.1 80"],
            "everyone's"
        );
        assert_eq!(
            backends_in(&p, vip, 1, 80, TCP),
            ["192.0.2.2 80"],
            "shop's own first"
        );
        assert_eq!(
            backends_in(&p, vip, 2, 80, TCP),
            ["192.0.2.66 80"],
            "evil's for evil only"
        );
        assert!(
            !p.services.keys().any(|k| k.view == 3),
            "a namespace that sees only view 0's entry gets nothing of its own"
        );
        assert_eq!(p.vips[&vip.parse().unwrap()].flags, VIP_SCOPED);
        // Local mode: one view, the oldest entry.
        let local = plan(&services, &HashMap::new(), None);
        assert_eq!(backends(&local, vip, 80, TCP), ["192.0.2.1 80"]);
        assert_eq!(local.services.len(), 1);
        assert_eq!(local.vips[&vip.parse().unwrap()].flags, 0);
    }

    #[test]
    fn an_address_exported_to_its_own_namespace_translates_there_only() {
        // evil declares an address (say, an external one shop's pods use) for itself:
        // view 0 has nothing there, so shop's connect to it is left alone.
        let services = [entry("evil", 1, &["."], "203.0.113.10", "192.0.2.66")];
        let views: Vec<(Arc<str>, u32)> = vec![("shop".into(), 1), ("evil".into(), 2)];
        let p = plan(&services, &HashMap::new(), Some(&views));
        let keys: Vec<(u32, u16)> = p.services.keys().map(|k| (k.view, k.port)).collect();
        assert_eq!(keys, [(2, 80)], "evil's view only");
        assert_eq!(p.vips[&"203.0.113.10".parse().unwrap()].ports, 0);
    }

    #[test]
    fn a_port_only_view_0_declares_is_undeclared_in_a_view_with_its_own_entry() {
        let vip = "240.240.0.9";
        let mut everyone = entry("old", 1, &["*"], vip, "192.0.2.1");
        everyone.entry = Arc::new(crate::registry::table::EntryShared {
            ports: vec![
                port(80, "http", "HTTP", None),
                port(443, "tls", "TLS", None),
            ]
            .into(),
            endpoints: everyone.endpoints().into(),
        });
        let services = [everyone, entry("shop", 2, &["."], vip, "192.0.2.2")];
        let views: Vec<(Arc<str>, u32)> = vec![("shop".into(), 1)];
        let p = plan(&services, &HashMap::new(), Some(&views));
        let key = ServiceKeyOrd {
            vip: vip.parse().unwrap(),
            view: 1,
            port: 443,
            protocol: TCP,
        };
        assert_eq!(p.services[&key], None, "shop's entry has no 443");
        assert_eq!(service_value(&None).count, PORT_UNDECLARED);
        assert_eq!(backends_of(&service_value(&None)), None);
    }

    #[test]
    fn full_maps_keep_the_older_entries_not_the_lower_addresses() {
        // The newest entry holds the lowest addresses, many of them.
        let mut services: Vec<VipService> = (1..=3)
            .map(|i| {
                entry(
                    "team",
                    i,
                    &["*"],
                    &format!("240.240.0.{}", 100 + i),
                    "192.0.2.1",
                )
            })
            .collect();
        for i in 1..=5u8 {
            services.push(entry(
                "newcomer",
                10,
                &["*"],
                &format!("10.1.0.{i}"),
                "192.0.2.9",
            ));
        }
        let mut p = plan(&services, &HashMap::new(), None);
        let dropped = p.fit(Capacity {
            vips: 4,
            services: 100,
        });
        assert_eq!(dropped, 4);
        let kept: Vec<String> = p.vips.keys().map(ToString::to_string).collect();
        assert_eq!(
            kept,
            [
                "10.1.0.1",
                "240.240.0.101",
                "240.240.0.102",
                "240.240.0.103"
            ]
        );
    }

    #[test]
    fn a_plan_too_large_keeps_whole_vips() {
        let mut p = Plan::default();
        for i in 1..=10u8 {
            let vip: IpAddr = format!("240.240.0.{i}").parse().unwrap();
            p.vips.insert(vip, VipInfo { ports: 2, flags: 0 });
            for port in [80, 443] {
                let key = ServiceKeyOrd {
                    vip,
                    view: 0,
                    port,
                    protocol: TCP,
                };
                p.services.insert(key, Backends::default());
            }
        }
        let dropped = p.fit(Capacity {
            vips: 100,
            services: 7,
        });
        assert_eq!(dropped, 7, "3 whole VIPs (6 services) fit");
        let kept: Vec<String> = p.vips.keys().map(ToString::to_string).collect();
        assert_eq!(
            kept,
            ["240.240.0.1", "240.240.0.2", "240.240.0.3"],
            "without precedence, by address"
        );
        assert_eq!(p.services.len(), 6);
        assert_eq!(
            p.fit(Capacity {
                vips: 3,
                services: 6
            }),
            0
        );
    }

    #[test]
    fn dns_resolution_maps_the_host_by_family() {
        let s = svc(
            Resolution::Dns,
            vec![],
            vec![
                port(443, "tls", "TLS", None),
                port(53, "dns", "UDP", Some(5353)),
            ],
        );
        let resolved: HashMap<String, Vec<IpAddr>> = [(
            "aliyun.com".into(),
            vec![
                "203.0.113.10".parse().unwrap(),
                "2001:db8::10".parse().unwrap(),
            ],
        )]
        .into();
        let p = plan(&[s], &resolved, None);
        assert_eq!(backends(&p, "240.240.0.5", 443, TCP), ["203.0.113.10 443"]);
        assert_eq!(backends(&p, "2001:2::5", 443, TCP), ["2001:db8::10 443"]);
        assert!(p.ipv6_backed.contains("aliyun.com"));
        assert_eq!(
            backends(&p, "240.240.0.5", 53, UDP),
            ["203.0.113.10 5353"],
            "targetPort"
        );
        assert_eq!(p.vips.len(), 2);
    }

    #[test]
    fn unresolved_or_empty_means_no_backend() {
        let s = svc(Resolution::Dns, vec![], vec![port(443, "tls", "TLS", None)]);
        let p = plan(&[s], &HashMap::new(), None);
        assert_eq!(backends(&p, "240.240.0.5", 443, TCP), Vec::<String>::new());
    }

    #[test]
    fn static_endpoints_with_named_ports() {
        let eps = vec![
            WorkloadEntry {
                address: "192.0.2.1".into(),
                ports: [("http".to_string(), 8080)].into(),
                ..Default::default()
            },
            WorkloadEntry {
                address: "192.0.2.2".into(),
                ..Default::default()
            },
        ];
        let s = svc(
            Resolution::Static,
            eps,
            vec![port(80, "http", "HTTP", Some(9090))],
        );
        let p = plan(&[s], &HashMap::new(), None);
        assert_eq!(
            backends(&p, "240.240.0.5", 80, TCP),
            ["192.0.2.1 8080", "192.0.2.2 9090"]
        );
        assert!(
            p.ipv6_backed.is_empty(),
            "no IPv6 endpoint: no AAAA for the VIP"
        );
        assert_eq!(
            backends(&p, "2001:2::5", 80, TCP),
            ["192.0.2.1 8080", "192.0.2.2 9090"],
            "no IPv6 endpoint: the IPv4 ones, mapped, for dual-stack sockets"
        );
    }

    #[test]
    fn dns_endpoints_are_resolved_by_name() {
        let eps = vec![WorkloadEntry {
            address: "Backend.Example.".into(),
            ..Default::default()
        }];
        let s = svc(
            Resolution::DnsRoundRobin,
            eps,
            vec![port(443, "tls", "TLS", None)],
        );
        assert_eq!(names_to_resolve(&s), ["backend.example"]);
        let resolved: HashMap<String, Vec<IpAddr>> = [(
            "backend.example".into(),
            vec!["198.51.100.1".parse().unwrap()],
        )]
        .into();
        let p = plan(&[s], &resolved, None);
        assert_eq!(backends(&p, "240.240.0.5", 443, TCP), ["198.51.100.1 443"]);
    }

    #[test]
    fn at_most_max_backends() {
        let eps: Vec<WorkloadEntry> = (1..=40)
            .map(|i| WorkloadEntry {
                address: format!("192.0.2.{i}"),
                ..Default::default()
            })
            .collect();
        let s = svc(
            Resolution::Static,
            eps,
            vec![port(80, "http", "HTTP", None)],
        );
        let p = plan(&[s], &HashMap::new(), None);
        assert_eq!(backends(&p, "240.240.0.5", 80, TCP).len(), MAX_BACKENDS);
    }
}
