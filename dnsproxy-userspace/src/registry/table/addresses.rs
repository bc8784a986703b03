//! Which addresses a `ServiceEntry` may declare (`spec.addresses`, `status.addresses`).
//! A declared address becomes a VIP that the kernel translates for every captured
//! pod, so a tenant's entry must never claim an address that is already someone
//! else's: a Kubernetes Service's `ClusterIP`, a pod of the cluster, the node's loopback,
//! a link-local address (169.254.169.254, the cloud metadata service) or a multicast
//! one. Such an address is refused: dropped from the entry, named in the log and in
//! `/debug/ndsz`, counted in `dnsproxy_entries_refused_total{reason}`. Of two entries
//! declaring one address, the first in precedence holds it and the other is refused.
use std::{
    cell::OnceCell,
    collections::HashSet,
    net::{IpAddr, Ipv4Addr},
    str::FromStr,
    sync::Arc,
};

use crate::registry::manifest::WorkloadPod;

use serde::Serialize;

/// An address block, `10.0.0.0/8` or `fd00::/8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an address block (10.0.0.0/8, fd00::/8)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if prefix.is_empty() {
            max
        } else {
            prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?
        };
        Ok(Cidr { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The operator's settings: where declared addresses may be, and the cluster's own
/// blocks (pods, Services) they may not be in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressPolicy {
    /// `--declared-address-cidrs`: when not empty, a declared address must be in one.
    pub allowed: Vec<Cidr>,
    /// `--cluster-cidrs`: the pod and Service blocks of the cluster.
    pub cluster: Vec<Cidr>,
}

/// Why a declared address was refused (the metric's `reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Loopback,
    LinkLocal,
    Multicast,
    Unspecified,
    ClusterIp,
    PodIp,
    ClusterCidr,
    NotAllowed,
    /// Another entry earlier in precedence declares it.
    Claimed,
    /// A host under `svc.<cluster domain>` outside the entry's own namespace: those
    /// names are the Services'.
    ClusterName,
    /// Past `--max-hosts-per-namespace` (the namespace's oldest entries first).
    Quota,
}

impl Reason {
    pub const ALL: [Reason; 11] = [
        Reason::Loopback,
        Reason::LinkLocal,
        Reason::Multicast,
        Reason::Unspecified,
        Reason::ClusterIp,
        Reason::PodIp,
        Reason::ClusterCidr,
        Reason::NotAllowed,
        Reason::Claimed,
        Reason::ClusterName,
        Reason::Quota,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reason::Loopback => "loopback",
            Reason::LinkLocal => "link_local",
            Reason::Multicast => "multicast",
            Reason::Unspecified => "unspecified",
            Reason::ClusterIp => "cluster_ip",
            Reason::PodIp => "pod_ip",
            Reason::ClusterCidr => "cluster_cidr",
            Reason::NotAllowed => "not_allowed",
            Reason::Claimed => "claimed",
            Reason::ClusterName => "cluster_name",
            Reason::Quota => "quota",
        }
    }
}

/// A declared address (or, for `cluster_name`, a host) an entry does not get.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Refusal {
    /// `ServiceEntry <namespace>/<name>`.
    pub source: String,
    pub host: Arc<str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<IpAddr>,
    pub reason: Reason,
    /// Who holds it (for `claimed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
}

/// What declared addresses (and hosts) are checked against when the entries are built.
#[derive(Debug, Default)]
pub struct Reserved<'a> {
    pub policy: Option<&'a AddressPolicy>,
    /// Names under `svc.<cluster domain>` are the Services' (empty: not checked).
    pub cluster_domain: &'a str,
    /// Every Service's `ClusterIPs`.
    pub cluster_ips: HashSet<IpAddr>,
    /// Pod IPs the daemon knows (its node's pods, the pods selectors select).
    pub pod_ips: PodIps<'a>,
}

/// Pod IPs, parsed at the first check: most builds check no declared address, and a
/// selected Pod's readiness flip must not cost a parse of every Pod's IP.
#[derive(Debug, Default)]
pub struct PodIps<'a> {
    pods: &'a [Arc<WorkloadPod>],
    parsed: OnceCell<HashSet<IpAddr>>,
}

impl<'a> PodIps<'a> {
    pub fn of(pods: &'a [Arc<WorkloadPod>]) -> Self {
        PodIps {
            pods,
            parsed: OnceCell::new(),
        }
    }

    fn contains(&self, ip: IpAddr) -> bool {
        self.parsed
            .get_or_init(|| {
                self.pods
                    .iter()
                    .filter_map(|p| p.ip()?.parse().ok())
                    .collect()
            })
            .contains(&ip)
    }
}

impl From<HashSet<IpAddr>> for PodIps<'_> {
    fn from(ips: HashSet<IpAddr>) -> Self {
        PodIps {
            pods: &[],
            parsed: OnceCell::from(ips),
        }
    }
}

impl Reserved<'_> {
    /// Whether an entry of namespace `ns` may name `host` (normalized; `*.` for a
    /// wildcard): under `svc.<cluster domain>` only its own namespace's names.
    pub fn may_name(&self, host: &str, ns: &str) -> bool {
        let cd = self.cluster_domain;
        if cd.is_empty() || super::under_services(host, cd).is_none() {
            return true;
        }
        host.strip_suffix(cd)
            .and_then(|r| r.strip_suffix(".svc."))
            .and_then(|r| r.strip_suffix(ns))
            .is_some_and(|r| r.ends_with('.'))
    }

    /// Why `ip` may not be declared, if it may not.
    pub fn check(&self, ip: IpAddr) -> Result<(), Reason> {
        let ip = ip.to_canonical();
        if ip.is_unspecified() || ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
            return Err(Reason::Unspecified);
        }
        if ip.is_loopback() {
            return Err(Reason::Loopback);
        }
        if ip.is_multicast() {
            return Err(Reason::Multicast);
        }
        let link_local = match ip {
            IpAddr::V4(v4) => v4.is_link_local(),
            IpAddr::V6(v6) => v6.is_unicast_link_local(),
        };
        if link_local {
            return Err(Reason::LinkLocal);
        }
        if self.cluster_ips.contains(&ip) {
            return Err(Reason::ClusterIp);
        }
        if self.pod_ips.contains(ip) {
            return Err(Reason::PodIp);
        }
        if let Some(policy) = self.policy {
            if policy.cluster.iter().any(|c| c.contains(ip)) {
                return Err(Reason::ClusterCidr);
            }
            if !policy.allowed.is_empty() && !policy.allowed.iter().any(|c| c.contains(ip)) {
                return Err(Reason::NotAllowed);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_node_and_the_cluster_are_never_declared() {
        let policy = AddressPolicy {
            allowed: vec![
                "203.0.113.0/24".parse().unwrap(),
                "240.240.0.0/16".parse().unwrap(),
                "2001:db8::/32".parse().unwrap(),
            ],
            cluster: vec!["10.244.0.0/16".parse().unwrap()],
        };
        let reserved = Reserved {
            policy: Some(&policy),
            cluster_ips: [ip("10.96.12.34")].into(),
            pod_ips: HashSet::from([ip("10.1.2.3")]).into(),
            ..Reserved::default()
        };
        let cases = [
            ("169.254.169.254", Err(Reason::LinkLocal)),
            ("fe80::1", Err(Reason::LinkLocal)),
            ("::ffff:169.254.169.254", Err(Reason::LinkLocal)),
            ("127.0.0.53", Err(Reason::Loopback)),
            ("::1", Err(Reason::Loopback)),
            ("224.0.0.251", Err(Reason::Multicast)),
            ("ff02::fb", Err(Reason::Multicast)),
            ("0.0.0.0", Err(Reason::Unspecified)),
            ("255.255.255.255", Err(Reason::Unspecified)),
            ("10.96.12.34", Err(Reason::ClusterIp)),
            ("10.1.2.3", Err(Reason::PodIp)),
            ("10.244.9.9", Err(Reason::ClusterCidr)),
            ("198.51.100.1", Err(Reason::NotAllowed)),
            ("203.0.113.10", Ok(())),
            ("240.240.1.1", Ok(())),
            ("2001:db8::10", Ok(())),
        ];
        for (addr, want) in cases {
            assert_eq!(reserved.check(ip(addr)), want, "{addr}");
        }
        // Without --declared-address-cidrs anything else goes.
        let open = Reserved::default();
        assert_eq!(open.check(ip("198.51.100.1")), Ok(()));
        assert_eq!(open.check(ip("169.254.169.254")), Err(Reason::LinkLocal));
    }

    #[test]
    fn blocks_parse_and_say_what_is_wrong() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains(ip("10.255.0.1")) && !c.contains(ip("11.0.0.1")));
        assert!(!c.contains(ip("fd00::1")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("8.8.8.8")));
        let one: Cidr = "fd00::10".parse().unwrap();
        assert_eq!(one.to_string(), "fd00::10/128");
        assert!(one.contains(ip("fd00::10")) && !one.contains(ip("fd00::11")));
        assert!(
            "10.0.0.0/33"
                .parse::<Cidr>()
                .unwrap_err()
                .contains("0 to 32")
        );
        assert!(
            "ten/8"
                .parse::<Cidr>()
                .unwrap_err()
                .contains("not an address block")
        );
    }
}
