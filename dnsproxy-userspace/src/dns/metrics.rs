//! Counters of the DNS server, lock-free (one atomic per label set, fixed at start-up),
//! rendered as Prometheus text with Istio's metric names.
use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

use hickory_proto::rr::RecordType;

use super::Protocol;

/// Query types counted by name; everything else is `other`.
const TYPES: [&str; 9] = [
    "A", "AAAA", "PTR", "CNAME", "SRV", "TXT", "MX", "HTTPS", "other",
];

fn type_index(t: RecordType) -> usize {
    match t {
        RecordType::A => 0,
        RecordType::AAAA => 1,
        RecordType::PTR => 2,
        RecordType::CNAME => 3,
        RecordType::SRV => 4,
        RecordType::TXT => 5,
        RecordType::MX => 6,
        RecordType::HTTPS => 7,
        _ => 8,
    }
}

/// How a query ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Answered from the name table.
    Local,
    /// Answered from the cache of upstream answers.
    Cached,
    /// Answered by an upstream.
    Forwarded,
    /// Every upstream failed: SERVFAIL.
    ServFail,
    /// Malformed or unsupported query: FORMERR/NOTIMP.
    Rejected,
}

const OUTCOMES: [&str; 5] = ["local", "cached", "forwarded", "servfail", "rejected"];
const PROTOCOLS: [&str; 2] = ["udp", "tcp"];

/// Upper bounds (seconds) of the upstream duration histogram.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

fn counters(n: usize) -> Box<[AtomicU64]> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

/// Per-upstream counters.
struct Upstream {
    label: String,
    requests: Box<[AtomicU64]>,
    failures: Box<[AtomicU64]>,
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_micros: AtomicU64,
}

/// Counters of one daemon.
pub struct Metrics {
    requests: Box<[AtomicU64]>,
    upstreams: Vec<Upstream>,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
}

impl Metrics {
    /// Counters for the given upstream servers.
    pub fn new(upstreams: &[SocketAddr]) -> Self {
        Metrics {
            requests: counters(TYPES.len() * PROTOCOLS.len() * OUTCOMES.len()),
            upstreams: upstreams
                .iter()
                .map(|s| Upstream {
                    label: s.to_string(),
                    requests: counters(TYPES.len()),
                    failures: counters(TYPES.len()),
                    buckets: counters(BUCKETS.len()),
                    count: AtomicU64::new(0),
                    sum_micros: AtomicU64::new(0),
                })
                .collect(),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
        }
    }

    /// Counts an upstream answer served from the cache.
    pub fn cache_hit(&self) {
        self.cache_hits.fetch_add(1, Relaxed);
    }

    /// Counts a lookup the cache could not serve.
    pub fn cache_miss(&self) {
        self.cache_misses.fetch_add(1, Relaxed);
    }

    /// Counts one answered query.
    pub fn request(&self, qtype: RecordType, protocol: Protocol, outcome: Outcome) {
        let p = match protocol {
            Protocol::Udp => 0,
            Protocol::Tcp => 1,
        };
        let i = (type_index(qtype) * PROTOCOLS.len() + p) * OUTCOMES.len() + outcome as usize;
        self.requests[i].fetch_add(1, Relaxed);
    }

    /// Counts one exchange with upstream number `server` (index in the start-up list).
    pub fn upstream(&self, server: usize, qtype: RecordType, elapsed: Duration, failed: bool) {
        let Some(u) = self.upstreams.get(server) else {
            return;
        };
        let t = type_index(qtype);
        u.requests[t].fetch_add(1, Relaxed);
        if failed {
            u.failures[t].fetch_add(1, Relaxed);
        }
        let secs = elapsed.as_secs_f64();
        for (b, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                u.buckets[b].fetch_add(1, Relaxed);
            }
        }
        u.count.fetch_add(1, Relaxed);
        u.sum_micros.fetch_add(elapsed.as_micros() as u64, Relaxed);
    }

    /// Prometheus text exposition; `cache_entries` is read from the cache by the caller.
    pub fn render(&self, out: &mut String, cache_entries: usize) {
        out.push_str("# HELP dns_requests_total Total number of DNS requests.\n# TYPE dns_requests_total counter\n");
        for (t, ty) in TYPES.iter().enumerate() {
            for (p, proto) in PROTOCOLS.iter().enumerate() {
                for (o, outcome) in OUTCOMES.iter().enumerate() {
                    let n =
                        self.requests[(t * PROTOCOLS.len() + p) * OUTCOMES.len() + o].load(Relaxed);
                    if n > 0 {
                        let _ = writeln!(
                            out,
                            "dns_requests_total{{type=\"{ty}\",protocol=\"{proto}\",result=\"{outcome}\"}} {n}"
                        );
                    }
                }
            }
        }
        for (metric, help, pick) in [
            (
                "dns_upstream_requests_total",
                "Total number of DNS requests forwarded upstream.",
                0,
            ),
            (
                "dns_upstream_failures_total",
                "Total number of upstream DNS requests that failed.",
                1,
            ),
        ] {
            let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} counter");
            for u in &self.upstreams {
                let series = if pick == 0 { &u.requests } else { &u.failures };
                for (t, ty) in TYPES.iter().enumerate() {
                    let n = series[t].load(Relaxed);
                    if n > 0 {
                        let _ =
                            writeln!(out, "{metric}{{server=\"{}\",type=\"{ty}\"}} {n}", u.label);
                    }
                }
            }
        }
        let metric = "dns_upstream_request_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {metric} Duration of upstream DNS exchanges.\n# TYPE {metric} histogram"
        );
        for u in &self.upstreams {
            let s = &u.label;
            for (b, bound) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "{metric}_bucket{{server=\"{s}\",le=\"{bound}\"}} {}",
                    u.buckets[b].load(Relaxed)
                );
            }
            let count = u.count.load(Relaxed);
            let _ = writeln!(out, "{metric}_bucket{{server=\"{s}\",le=\"+Inf\"}} {count}");
            let _ = writeln!(
                out,
                "{metric}_sum{{server=\"{s}\"}} {}",
                u.sum_micros.load(Relaxed) as f64 / 1e6
            );
            let _ = writeln!(out, "{metric}_count{{server=\"{s}\"}} {count}");
        }
        let _ = writeln!(
            out,
            "# HELP dns_cache_hits_total Upstream answers served from the cache.\n# TYPE dns_cache_hits_total counter\ndns_cache_hits_total {}",
            self.cache_hits.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP dns_cache_misses_total Lookups the cache could not serve.\n# TYPE dns_cache_misses_total counter\ndns_cache_misses_total {}",
            self.cache_misses.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP dns_cache_entries Answers held in the cache.\n# TYPE dns_cache_entries gauge\ndns_cache_entries {cache_entries}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_labels_and_histogram() {
        let m = Metrics::new(&["10.96.0.10:53".parse().unwrap()]);
        m.request(RecordType::A, Protocol::Udp, Outcome::Local);
        m.request(RecordType::A, Protocol::Udp, Outcome::Local);
        m.request(RecordType::NULL, Protocol::Tcp, Outcome::ServFail);
        m.upstream(0, RecordType::AAAA, Duration::from_millis(3), false);
        m.upstream(0, RecordType::AAAA, Duration::from_secs(2), true);
        let mut out = String::new();
        m.render(&mut out, 7);
        for want in [
            "dns_requests_total{type=\"A\",protocol=\"udp\",result=\"local\"} 2",
            "dns_requests_total{type=\"other\",protocol=\"tcp\",result=\"servfail\"} 1",
            "dns_upstream_requests_total{server=\"10.96.0.10:53\",type=\"AAAA\"} 2",
            "dns_upstream_failures_total{server=\"10.96.0.10:53\",type=\"AAAA\"} 1",
            "dns_upstream_request_duration_seconds_bucket{server=\"10.96.0.10:53\",le=\"0.005\"} 1",
            "dns_upstream_request_duration_seconds_bucket{server=\"10.96.0.10:53\",le=\"+Inf\"} 2",
            "dns_upstream_request_duration_seconds_count{server=\"10.96.0.10:53\"} 2",
            "dns_cache_entries 7",
        ] {
            assert!(out.contains(want), "missing {want} in\n{out}");
        }
    }
}
