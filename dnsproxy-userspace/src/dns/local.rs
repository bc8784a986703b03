//! Answers from the name table: A/AAAA (NODATA with an SOA for the missing family),
//! CNAME for search-suffixed names and aliases, PTR for VIPs and ClusterIPs. Names the
//! table does not know, and other record types, are left to upstream.
use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use hickory_proto::rr::{Name, RData, Record, RecordType, rdata};
use rand::seq::SliceRandom as _;

use crate::registry::{
    NameTable,
    table::{Host, Match, Target, normalize},
};

/// Longest alias chain followed inside the table.
const MAX_CNAME_HOPS: usize = 8;

/// A local answer.
#[derive(Debug, Default)]
pub struct LocalAnswer {
    pub answers: Vec<Record>,
    /// SOA for the authority section of a NODATA answer.
    pub soa: Option<Record>,
    /// An alias target the table does not know: resolve it upstream and append.
    pub chase: Option<Name>,
}

/// Who asks: the client's namespace decides short names and search domains; per-pod
/// settings (node mode) decide auto-allocated VIPs and per-query logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientContext {
    pub namespace: String,
    /// Search domains beyond the Kubernetes ones.
    pub extra_search: Vec<String>,
    /// Answer hosts whose only addresses are auto-allocated VIPs (else forward them).
    pub auto_allocate: bool,
    /// Log every query of this client at info level (`dns:debug` for one pod).
    pub debug_log: bool,
    /// `namespace/name` of the pod, for logs (node mode).
    pub pod: Option<String>,
}

impl ClientContext {
    /// A client of local mode.
    pub fn local(namespace: &str, extra_search: Vec<String>) -> Self {
        ClientContext {
            namespace: namespace.to_owned(),
            extra_search,
            auto_allocate: true,
            debug_log: false,
            pod: None,
        }
    }
}

fn fqdn(name: &str) -> Option<Name> {
    Name::from_ascii(format!("{name}.")).ok()
}

/// The address a reverse name (`d.c.b.a.in-addr.arpa`, nibbles `.ip6.arpa`) stands for.
pub fn reverse_ip(name: &str) -> Option<IpAddr> {
    if let Some(rest) = name.strip_suffix(".in-addr.arpa") {
        let mut octets: Vec<u8> = rest
            .split('.')
            .map(|p| p.parse().ok())
            .collect::<Option<_>>()?;
        if octets.len() != 4 {
            return None;
        }
        octets.reverse();
        return Some(IpAddr::V4(Ipv4Addr::new(
            octets[0], octets[1], octets[2], octets[3],
        )));
    }
    let rest = name.strip_suffix(".ip6.arpa")?;
    let nibbles: Vec<u8> = rest
        .split('.')
        .map(|p| {
            (p.len() == 1)
                .then(|| u8::from_str_radix(p, 16).ok())
                .flatten()
        })
        .collect::<Option<_>>()?;
    if nibbles.len() != 32 {
        return None;
    }
    let mut octets = [0u8; 16];
    for (i, pair) in nibbles.rchunks(2).enumerate() {
        octets[i] = pair[1] << 4 | pair[0];
    }
    Some(IpAddr::V6(Ipv6Addr::from(octets)))
}

fn soa(owner: &Name, ttl: u32) -> Record {
    let soa = rdata::SOA::new(
        Name::from_ascii("ns.dnsproxy.").expect("literal"),
        Name::from_ascii("hostmaster.dnsproxy.").expect("literal"),
        1,
        i32::try_from(ttl).unwrap_or(i32::MAX),
        i32::try_from(ttl).unwrap_or(i32::MAX),
        i32::try_from(ttl).unwrap_or(i32::MAX),
        ttl,
    );
    Record::from_rdata(owner.clone(), ttl, RData::SOA(soa))
}

/// The local answer to (`qname`, `qtype`), or `None` to forward. `ipv6_backed`: the
/// auto-allocated hosts that have IPv6 backends; the others get no AAAA (NODATA), as
/// Istio allocates IPv6 VIPs only where IPv6 is reachable, so clients that prefer
/// AAAA (glibc `getent hosts`, curl) take the IPv4 VIP.
pub fn answer(
    table: &NameTable,
    ipv6_backed: &HashSet<String>,
    qname: &Name,
    qtype: RecordType,
    client: &ClientContext,
    ttl: u32,
) -> Option<LocalAnswer> {
    let name = normalize(&qname.to_ascii());
    if qtype == RecordType::PTR {
        let host = table.reverse(reverse_ip(&name)?)?;
        let target = fqdn(host)?;
        return Some(LocalAnswer {
            answers: vec![Record::from_rdata(
                qname.clone(),
                ttl,
                RData::PTR(rdata::PTR(target)),
            )],
            ..Default::default()
        });
    }
    if !matches!(qtype, RecordType::A | RecordType::AAAA | RecordType::CNAME) {
        return None;
    }
    let matched = table.resolve(&name, &client.namespace, &client.extra_search)?;
    let (Match::Direct(matched_host)
    | Match::SearchSuffix {
        host: matched_host, ..
    }) = matched;
    if matched_host.auto_allocated && !client.auto_allocate {
        // This pod opted out of auto-allocation: the real name servers answer.
        return None;
    }
    let (mut owner, mut host, mut out) = match matched {
        Match::Direct(host) => (qname.clone(), host, LocalAnswer::default()),
        Match::SearchSuffix { base, host } => {
            let target = fqdn(base)?;
            let cname = Record::from_rdata(
                qname.clone(),
                ttl,
                RData::CNAME(rdata::CNAME(target.clone())),
            );
            (
                target,
                host,
                LocalAnswer {
                    answers: vec![cname],
                    ..Default::default()
                },
            )
        }
    };
    for _ in 0..MAX_CNAME_HOPS {
        match &host.target {
            Target::Cname(alias) => {
                let target = fqdn(alias)?;
                out.answers.push(Record::from_rdata(
                    owner.clone(),
                    ttl,
                    RData::CNAME(rdata::CNAME(target.clone())),
                ));
                if qtype == RecordType::CNAME {
                    return Some(out);
                }
                match table.get(alias) {
                    Some(next) => {
                        owner = target;
                        host = next;
                    }
                    None => {
                        out.chase = Some(target);
                        return Some(out);
                    }
                }
            }
            Target::Addresses(_) => {
                let ipv6 = !host.auto_allocated || ipv6_backed.contains(&host.name);
                add_addresses(&mut out, &owner, host, qtype, ipv6, ttl);
                return Some(out);
            }
        }
    }
    tracing::warn!(target: "dns", question = %qname, "alias chain longer than {MAX_CNAME_HOPS} hops");
    None
}

fn add_addresses(
    out: &mut LocalAnswer,
    owner: &Name,
    host: &Host,
    qtype: RecordType,
    ipv6: bool,
    ttl: u32,
) {
    let Target::Addresses(addrs) = &host.target else {
        return;
    };
    let mut records: Vec<Record> = match qtype {
        RecordType::A => addrs
            .ipv4
            .iter()
            .map(|ip| Record::from_rdata(owner.clone(), ttl, RData::A(rdata::A(*ip))))
            .collect(),
        RecordType::AAAA if ipv6 => addrs
            .ipv6
            .iter()
            .map(|ip| Record::from_rdata(owner.clone(), ttl, RData::AAAA(rdata::AAAA(*ip))))
            .collect(),
        _ => Vec::new(),
    };
    if records.is_empty() {
        // Known name, no record of this type: NODATA, with an SOA so that resolvers
        // cache the negative answer (RFC 2308) instead of asking again at once.
        out.soa = Some(soa(owner, ttl));
        return;
    }
    records.shuffle(&mut rand::rng());
    out.answers.extend(records);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverse_names() {
        assert_eq!(
            reverse_ip("5.0.240.240.in-addr.arpa"),
            Some("240.240.0.5".parse().unwrap())
        );
        let v6 = "5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.2.0.0.0.1.0.0.2.ip6.arpa";
        assert_eq!(reverse_ip(v6), Some("2001:2::5".parse().unwrap()));
        assert_eq!(reverse_ip("1.2.3.in-addr.arpa"), None);
        assert_eq!(reverse_ip("example.com"), None);
    }
}
