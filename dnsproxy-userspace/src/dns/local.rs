//! Answers from the name table: A/AAAA (NODATA with an SOA for the missing family),
//! ANY (its addresses, RFC 8482), NODATA for every other type of a name the table owns,
//! CNAME for search-suffixed names and aliases, PTR for VIPs and `ClusterIPs`, NXDOMAIN
//! for names of the cluster domain that no Service has (node mode). Other names
//! the table does not know, and SRV of Kubernetes Services, are left to upstream.
use std::collections::HashSet;

use hickory_proto::rr::{Name, RData, Record, RecordType, rdata};
use rand::seq::SliceRandom as _;

use super::client::ClientContext;
use crate::{
    name::{fqdn, normalize_name, reverse_ip},
    registry::{
        NameTable,
        table::{Host, Match, Target},
    },
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
    /// The name does not exist (NXDOMAIN, with `soa`).
    pub nxdomain: bool,
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
    let name = normalize_name(qname);
    if qtype == RecordType::PTR {
        return ptr_answer(table, &name, qname, ttl, &client.namespace);
    }
    let Some(matched) = table.resolve(&name, &client.namespace, &client.extra_search) else {
        return no_such_cluster_name(table, &name, ttl);
    };
    let (Match::Direct(host) | Match::SearchSuffix { host, .. }) = matched;
    if host.auto_allocated && !client.auto_allocate {
        // This pod opted out of auto-allocation: the real name servers answer.
        return None;
    }
    // SRV of a Kubernetes Service: its ports are the cluster DNS's to tell (the
    // Kubernetes DNS specification), so it goes there.
    if qtype == RecordType::SRV && host.is_kubernetes_service() {
        return None;
    }
    let chain = Chain::start(matched, qname, ttl)?;
    chain.follow(table, ipv6_backed, qtype, ttl, &client.namespace)
}

/// NXDOMAIN for a name of the cluster domain that no Service has, with the cluster
/// domain's SOA so that the client caches it (RFC 2308) for `ttl`: the walk of a
/// Kubernetes search list (`name.<ns>.svc.<cd>`, `name.svc.<cd>`, `name.<cd>`) is
/// answered here instead of by the cluster DNS.
fn no_such_cluster_name(table: &NameTable, name: &str, ttl: u32) -> Option<LocalAnswer> {
    if !table.no_such_cluster_name(name) {
        return None;
    }
    let zone = fqdn(table.cluster_domain())?;
    Some(LocalAnswer {
        soa: Some(soa(&zone, ttl)),
        nxdomain: true,
        ..Default::default()
    })
}

/// PTR for a VIP or `ClusterIP` the table knows.
fn ptr_answer(
    table: &NameTable,
    name: &str,
    qname: &Name,
    ttl: u32,
    namespace: &str,
) -> Option<LocalAnswer> {
    let host = table.reverse(reverse_ip(name)?, namespace)?;
    let target = fqdn(host)?;
    Some(LocalAnswer {
        answers: vec![Record::from_rdata(
            qname.clone(),
            ttl,
            RData::PTR(rdata::PTR(target)),
        )],
        ..Default::default()
    })
}

/// An answer being built along a chain of aliases: the name records are owned by
/// now, and the host it stands for.
struct Chain<'a> {
    owner: Name,
    host: &'a Host,
    out: LocalAnswer,
}

impl<'a> Chain<'a> {
    /// A direct match answers under the question name; a search-suffixed one starts
    /// with a CNAME from the question to the base name.
    fn start(matched: Match<'a>, qname: &Name, ttl: u32) -> Option<Self> {
        Some(match matched {
            Match::Direct(host) => Chain {
                owner: qname.clone(),
                host,
                out: LocalAnswer::default(),
            },
            Match::SearchSuffix { base, host } => {
                let target = fqdn(base)?;
                let cname = Record::from_rdata(
                    qname.clone(),
                    ttl,
                    RData::CNAME(rdata::CNAME(target.clone())),
                );
                Chain {
                    owner: target,
                    host,
                    out: LocalAnswer {
                        answers: vec![cname],
                        ..Default::default()
                    },
                }
            }
        })
    }

    /// Follows aliases inside the table (as `namespace` sees it, at most
    /// [`MAX_CNAME_HOPS`]) to addresses, or to a target to chase upstream.
    fn follow(
        mut self,
        table: &'a NameTable,
        ipv6_backed: &HashSet<String>,
        qtype: RecordType,
        ttl: u32,
        namespace: &str,
    ) -> Option<LocalAnswer> {
        for _ in 0..MAX_CNAME_HOPS {
            let alias = match &self.host.target {
                Target::Addresses(_) => {
                    let ipv6 = !self.host.auto_allocated || ipv6_backed.contains(&*self.host.name);
                    add_addresses(&mut self.out, &self.owner, self.host, qtype, ipv6, ttl);
                    return Some(self.out);
                }
                Target::Cname(alias) => alias,
            };
            let target = fqdn(alias)?;
            self.out.answers.push(Record::from_rdata(
                self.owner.clone(),
                ttl,
                RData::CNAME(rdata::CNAME(target.clone())),
            ));
            if qtype == RecordType::CNAME {
                return Some(self.out);
            }
            let Some(next) = table.get_for(alias, namespace) else {
                self.out.chase = Some(target);
                return Some(self.out);
            };
            self.owner = target;
            self.host = next;
        }
        tracing::warn!(target: "dns", question = %self.owner, "alias chain longer than {MAX_CNAME_HOPS} hops");
        None
    }
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
    let v4 = || {
        let mut r: Vec<Record> = addrs
            .ipv4()
            .map(|ip| Record::from_rdata(owner.clone(), ttl, RData::A(rdata::A(ip))))
            .collect();
        r.shuffle(&mut rand::rng());
        r
    };
    let v6 = || {
        let mut r: Vec<Record> = addrs
            .ipv6()
            .filter(|_| ipv6)
            .map(|ip| Record::from_rdata(owner.clone(), ttl, RData::AAAA(rdata::AAAA(ip))))
            .collect();
        r.shuffle(&mut rand::rng());
        r
    };
    let records: Vec<Record> = match qtype {
        RecordType::A => v4(),
        RecordType::AAAA => v6(),
        // RFC 8482: the minimal answer to ANY, the addresses.
        RecordType::ANY => v4().into_iter().chain(v6()).collect(),
        // TXT, MX, HTTPS, SVCB…: a name the table owns has none (RFC 8020: the name
        // exists, so NODATA, not the upstream's NXDOMAIN; and no HTTPS hint can bypass
        // the VIP).
        _ => Vec::new(),
    };
    if records.is_empty() {
        // Known name, no record of this type: NODATA, with an SOA so that resolvers
        // cache the negative answer (RFC 2308) instead of asking again at once.
        out.soa = Some(soa(owner, ttl));
        return;
    }
    out.answers.extend(records);
}
