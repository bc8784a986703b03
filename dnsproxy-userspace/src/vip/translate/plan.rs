//! From VIP services and resolved names to the content of the translation maps.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
};

use dnsproxy_common::{Backend, MAX_BACKENDS, ServiceKey, ServiceValue};

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
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub vips: BTreeMap<IpAddr, u32>,
    /// Only the backends in use: an inline [`ServiceValue`] is 328 bytes, and two
    /// plans of 100,000 services are held at once during a sync.
    pub services: BTreeMap<ServiceKeyOrd, Backends>,
    /// Hosts with at least one IPv6 backend (their IPv6 VIP is worth answering).
    pub ipv6_backed: HashSet<String>,
}

/// A service's backends, at most [`MAX_BACKENDS`].
pub type Backends = Box<[Backend]>;

/// The map value holding `backends`.
pub fn service_value(backends: &[Backend]) -> ServiceValue {
    let mut value = ServiceValue::default();
    let n = backends.len().min(MAX_BACKENDS);
    value.backends[..n].copy_from_slice(&backends[..n]);
    value.count = n as u32;
    value
}

/// The backends a map value holds.
pub fn backends_of(value: &ServiceValue) -> Backends {
    let n = (value.count as usize).min(MAX_BACKENDS);
    value.backends[..n].into()
}

/// How many entries the translation maps take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub vips: usize,
    pub services: usize,
}

impl Plan {
    /// Keeps what fits in `capacity`, whole VIPs in address order (so the same VIPs
    /// translate whatever the order of the objects); returns how many VIPs were left
    /// out.
    pub fn fit(&mut self, capacity: Capacity) -> usize {
        if self.vips.len() <= capacity.vips && self.services.len() <= capacity.services {
            return 0;
        }
        let mut per_vip: BTreeMap<IpAddr, usize> = BTreeMap::new();
        for key in self.services.keys() {
            *per_vip.entry(key.vip).or_default() += 1;
        }
        let (mut vips, mut services) = (0, 0);
        let mut kept = HashSet::new();
        for vip in self.vips.keys() {
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

/// `ServiceKey` with an order, for deterministic diffs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceKeyOrd {
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: u8,
}

impl ServiceKeyOrd {
    /// The smallest key of `vip`.
    pub fn first_of(vip: IpAddr) -> Self {
        ServiceKeyOrd {
            vip,
            port: 0,
            protocol: 0,
        }
    }

    /// The largest key of `vip`.
    pub fn last_of(vip: IpAddr) -> Self {
        ServiceKeyOrd {
            vip,
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
        }
    }
}

/// Computes the maps from `services` and the addresses resolved so far (`resolved`:
/// name → addresses; a name missing from it has not been resolved yet).
pub fn plan(services: &[VipService], resolved: &HashMap<String, Vec<IpAddr>>) -> Plan {
    let mut out = Plan::default();
    for svc in services {
        if backend_ips(svc, resolved).any(|ip| ip.is_ipv6()) {
            out.ipv6_backed.insert(svc.host.to_string());
        }
        for vip in &svc.vips {
            *out.vips.entry(*vip).or_default() += svc.ports().len() as u32;
            for port in svc.ports() {
                // Candidate backends (address, port), same family as the VIP.
                let mut backends: BTreeSet<(IpAddr, u16)> = BTreeSet::new();
                let same_family = |ip: &IpAddr| ip.is_ipv4() == vip.is_ipv4();
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
                let v4_for_v6 = vip.is_ipv6() && !backends.iter().any(|(ip, _)| ip.is_ipv6());
                let value: Backends = backends
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
                    vip: *vip,
                    port: port.number,
                    protocol: port_protocol(port).ip_proto(),
                };
                out.services.insert(key, value);
            }
        }
    }
    out
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
            entry: std::sync::Arc::new(crate::registry::table::EntryShared {
                ports: ports.into(),
                endpoints: endpoints.into(),
            }),
            resolution,
            owner: std::sync::Arc::new(crate::registry::table::Owner {
                kind: crate::registry::table::Kind::ServiceEntry,
                export_to: crate::registry::export::Visibility::All,
                rank: crate::registry::export::Rank::default(),
            }),
            declared: false,
        }
    }

    fn backends(plan: &Plan, vip: &str, port: u16, protocol: u8) -> Vec<String> {
        plan.services[&ServiceKeyOrd {
            vip: vip.parse().unwrap(),
            port,
            protocol,
        }]
            .iter()
            .map(|b| format!("{} {}", crate::bpf::from_map_addr(&b.addr), b.port))
            .collect()
    }

    #[test]
    fn a_plan_too_large_keeps_whole_vips_in_address_order() {
        let mut p = Plan::default();
        for i in 1..=10u8 {
            let vip: IpAddr = format!("240.240.0.{i}").parse().unwrap();
            p.vips.insert(vip, 2);
            for port in [80, 443] {
                let key = ServiceKeyOrd {
                    vip,
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
        assert_eq!(kept, ["240.240.0.1", "240.240.0.2", "240.240.0.3"]);
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
        let p = plan(&[s], &resolved);
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
        let p = plan(&[s], &HashMap::new());
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
        let p = plan(&[s], &HashMap::new());
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
        let p = plan(&[s], &resolved);
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
        let p = plan(&[s], &HashMap::new());
        assert_eq!(backends(&p, "240.240.0.5", 80, TCP).len(), MAX_BACKENDS);
    }
}
