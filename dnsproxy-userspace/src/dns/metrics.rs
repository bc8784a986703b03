//! Counters of the DNS server with Istio's metric names, kept by `prometheus-client`.
//! Every label set is created once, at start-up, and held by index, so that counting a
//! query is one atomic add with no lookup and no lock.
use std::{
    net::SocketAddr,
    sync::{Arc, OnceLock},
    time::Duration,
};

use hickory_proto::rr::RecordType;
use prometheus_client::{
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

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
    /// A bound on upstream work was reached: SERVFAIL at once.
    Overload,
    /// Every upstream failed; an expired answer served (serve-stale).
    Stale,
}

impl Outcome {
    const ALL: [Outcome; 7] = [
        Outcome::Local,
        Outcome::Cached,
        Outcome::Forwarded,
        Outcome::ServFail,
        Outcome::Rejected,
        Outcome::Overload,
        Outcome::Stale,
    ];

    /// The `result` label.
    fn label(self) -> &'static str {
        match self {
            Outcome::Local => "local",
            Outcome::Cached => "cached",
            Outcome::Forwarded => "forwarded",
            Outcome::ServFail => "servfail",
            Outcome::Rejected => "rejected",
            Outcome::Overload => "overload",
            Outcome::Stale => "stale",
        }
    }
}

/// Label sets of `dns_requests_total`: query types × protocols × outcomes.
const REQUEST_SERIES: usize = TYPES.len() * Protocol::ALL.len() * Outcome::ALL.len();

fn request_index(qtype: RecordType, protocol: Protocol, outcome: Outcome) -> usize {
    let p = Protocol::ALL
        .iter()
        .position(|x| *x == protocol)
        .unwrap_or(0);
    let o = Outcome::ALL.iter().position(|x| *x == outcome).unwrap_or(0);
    (type_index(qtype) * Protocol::ALL.len() + p) * Outcome::ALL.len() + o
}

/// The `type`, `protocol` and `result` labels of series `i`.
fn request_labels(i: usize) -> Labels {
    let o = i % Outcome::ALL.len();
    let p = (i / Outcome::ALL.len()) % Protocol::ALL.len();
    let t = i / (Outcome::ALL.len() * Protocol::ALL.len());
    vec![
        ("type", TYPES[t].to_owned()),
        ("protocol", Protocol::ALL[p].as_str().to_owned()),
        ("result", Outcome::ALL[o].label().to_owned()),
    ]
}

/// Why a connection was refused or closed, as `/metrics` labels it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpReason {
    /// Refused: `--max-tcp-connections` reached, nothing quiet to close.
    Total,
    /// Refused: the client's bound reached, nothing of its own quiet to close.
    PerClient,
    /// Closed to make room for a new connection.
    Evicted,
    Idle,
    ReadTimeout,
    WriteTimeout,
    MaxQueries,
    ZeroLength,
}

impl TcpReason {
    pub const REFUSED: [TcpReason; 2] = [TcpReason::Total, TcpReason::PerClient];
    pub const CLOSED: [TcpReason; 6] = [
        TcpReason::Evicted,
        TcpReason::Idle,
        TcpReason::ReadTimeout,
        TcpReason::WriteTimeout,
        TcpReason::MaxQueries,
        TcpReason::ZeroLength,
    ];

    pub fn label(self) -> &'static str {
        match self {
            TcpReason::Total => "total",
            TcpReason::PerClient => "per_client",
            TcpReason::Evicted => "evicted",
            TcpReason::Idle => "idle",
            TcpReason::ReadTimeout => "read_timeout",
            TcpReason::WriteTimeout => "write_timeout",
            TcpReason::MaxQueries => "max_queries",
            TcpReason::ZeroLength => "zero_length",
        }
    }
}

/// One pod's `dns_requests_total` series (node mode): each made on first use, so the
/// output holds only what a pod asked; all removed when the pod's listener goes, so
/// the series stay bounded by the pods on the node.
pub struct PodRequests {
    family: Family<Labels, Counter>,
    namespace: String,
    pod: String,
    series: Box<[OnceLock<Counter>]>,
}

impl PodRequests {
    fn labels(&self, i: usize) -> Labels {
        let mut labels = request_labels(i);
        labels.push(("namespace", self.namespace.clone()));
        labels.push(("pod", self.pod.clone()));
        labels
    }

    fn counter(&self, i: usize) -> &Counter {
        self.series[i].get_or_init(|| self.family.get_or_create(&self.labels(i)).clone())
    }
}

impl PartialEq for PodRequests {
    fn eq(&self, other: &Self) -> bool {
        (&self.namespace, &self.pod) == (&other.namespace, &other.pod)
    }
}

impl Eq for PodRequests {}

impl std::fmt::Debug for PodRequests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PodRequests({}/{})", self.namespace, self.pod)
    }
}

impl Drop for PodRequests {
    fn drop(&mut self) {
        for (i, slot) in self.series.iter().enumerate() {
            if slot.get().is_some() {
                self.family.remove(&self.labels(i));
            }
        }
    }
}

/// Upper bounds (seconds) of the upstream duration histogram.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

type Labels = Vec<(&'static str, String)>;

/// The series of one upstream server.
struct Upstream {
    /// By query type.
    requests: Vec<Counter>,
    failures: Vec<Counter>,
    duration: Histogram,
}

/// Counters of one daemon.
pub struct Metrics {
    /// By (query type, protocol, outcome): see [`request_index`].
    requests: Vec<Counter>,
    /// Node mode: `dns_requests_total` with `namespace` and `pod`.
    pod_requests: Option<Family<Labels, Counter>>,
    upstreams: Vec<Upstream>,
    cache_hits: Counter,
    cache_misses: Counter,
    merged: Counter,
    failure_cache_hits: Counter,
    fast_resets: Counter,
    autopath_answers: Counter,
    autopath_saved: Counter,
    /// By [`TcpReason::REFUSED`] / [`TcpReason::CLOSED`] position.
    tcp_refused: Vec<Counter>,
    tcp_closed: Vec<Counter>,
}

impl Metrics {
    /// Counters for the given upstream servers, registered in `registry`.
    /// Counters for the given upstream servers, registered in `registry`. With
    /// `per_pod` (node mode) `dns_requests_total` also carries `namespace` and `pod`,
    /// counted through [`Metrics::pod_requests`].
    pub fn new(upstreams: &[SocketAddr], registry: &mut Registry, per_pod: bool) -> Self {
        let requests = Family::<Labels, Counter>::default();
        let requests_by_index = (0..REQUEST_SERIES)
            .map(|i| requests.get_or_create(&request_labels(i)).clone())
            .collect();
        let pod_requests = Family::<Labels, Counter>::default();
        let help = "Total number of DNS requests.";
        if per_pod {
            registry.register("dns_requests", help, pod_requests.clone());
        } else {
            registry.register("dns_requests", help, requests.clone());
        }
        let metrics = Metrics {
            requests: requests_by_index,
            pod_requests: per_pod.then_some(pod_requests),
            upstreams: register_upstreams(upstreams, registry),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            merged: Counter::default(),
            failure_cache_hits: Counter::default(),
            fast_resets: Counter::default(),
            autopath_answers: Counter::default(),
            autopath_saved: Counter::default(),
            tcp_refused: by_reason(
                registry,
                "dns_tcp_connections_refused",
                "TCP connections refused at a bound (nothing quiet to close).",
                &TcpReason::REFUSED,
            ),
            tcp_closed: by_reason(
                registry,
                "dns_tcp_connections_closed",
                "TCP connections closed by the daemon: to make room, or by a timeout or cap.",
                &TcpReason::CLOSED,
            ),
        };
        let counters = [
            (
                "dns_upstream_merged",
                "Questions merged into an identical one already in flight upstream.",
                &metrics.merged,
            ),
            (
                "dns_failure_cache_hits",
                "Questions answered SERVFAIL from the memory of a recent upstream failure.",
                &metrics.failure_cache_hits,
            ),
            (
                "dns_cache_hits",
                "Upstream answers served from the cache.",
                &metrics.cache_hits,
            ),
            (
                "dns_cache_misses",
                "Lookups the cache could not serve.",
                &metrics.cache_misses,
            ),
            (
                "dns_fast_path_resets",
                "Times a UDP loop's kept answers reached their bound and started over.",
                &metrics.fast_resets,
            ),
            (
                "dns_autopath_answers",
                "Queries answered by walking the pod's search list for it (autopath).",
                &metrics.autopath_answers,
            ),
            (
                "dns_autopath_round_trips_saved",
                "Queries the pods' resolvers did not send because autopath answered their walk.",
                &metrics.autopath_saved,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        metrics
    }

    /// The `dns_requests_total` series of one pod (node mode only).
    pub fn pod_requests(&self, namespace: &str, pod: &str) -> Option<Arc<PodRequests>> {
        let family = self.pod_requests.clone()?;
        Some(Arc::new(PodRequests {
            family,
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            series: (0..REQUEST_SERIES).map(|_| OnceLock::new()).collect(),
        }))
    }

    /// Counts one answered query, for `pod` when it is a pod's.
    pub fn request(
        &self,
        qtype: RecordType,
        protocol: Protocol,
        outcome: Outcome,
        pod: Option<&PodRequests>,
    ) {
        let i = request_index(qtype, protocol, outcome);
        match pod {
            Some(pod) => pod.counter(i).inc(),
            None => self.requests[i].inc(),
        };
    }

    /// Counts an upstream answer served from the cache.
    pub fn cache_hit(&self) {
        self.cache_hits.inc();
    }

    /// Counts a question merged into one in flight.
    pub fn merged(&self) {
        self.merged.inc();
    }

    /// Counts a UDP loop's kept answers starting over at their bound.
    pub fn fast_reset(&self) {
        self.fast_resets.inc();
    }

    /// (autopath answers, round trips they saved), for tests.
    #[cfg(test)]
    pub(crate) fn autopath_counts(&self) -> (u64, u64) {
        (self.autopath_answers.get(), self.autopath_saved.get())
    }

    /// Counts an autopath answer that spared the client `saved` queries.
    pub fn autopath(&self, saved: usize) {
        self.autopath_answers.inc();
        self.autopath_saved.inc_by(saved as u64);
    }

    /// Counts a SERVFAIL from the failure memory.
    pub fn failure_cache_hit(&self) {
        self.failure_cache_hits.inc();
    }

    /// Counts a TCP connection refused at a bound.
    pub fn tcp_refused(&self, reason: TcpReason) {
        if let Some(i) = TcpReason::REFUSED.iter().position(|r| *r == reason) {
            self.tcp_refused[i].inc();
        }
    }

    /// Counts a TCP connection the daemon closed.
    pub fn tcp_closed(&self, reason: TcpReason) {
        if let Some(i) = TcpReason::CLOSED.iter().position(|r| *r == reason) {
            self.tcp_closed[i].inc();
        }
    }

    /// Counts a lookup the cache could not serve.
    pub fn cache_miss(&self) {
        self.cache_misses.inc();
    }

    /// Counts one exchange with upstream number `server` (index in the start-up list).
    pub fn upstream(&self, server: usize, qtype: RecordType, elapsed: Duration, failed: bool) {
        let Some(u) = self.upstreams.get(server) else {
            return;
        };
        let t = type_index(qtype);
        u.requests[t].inc();
        if failed {
            u.failures[t].inc();
        }
        u.duration.observe(elapsed.as_secs_f64());
    }
}

/// A counter family labelled `reason`, one series per reason, in `reasons` order.
fn by_reason(
    registry: &mut Registry,
    name: &str,
    help: &str,
    reasons: &[TcpReason],
) -> Vec<Counter> {
    let family = Family::<Labels, Counter>::default();
    let series = reasons
        .iter()
        .map(|r| {
            family
                .get_or_create(&vec![("reason", r.label().to_owned())])
                .clone()
        })
        .collect();
    registry.register(name, help, family);
    series
}

/// The per-upstream families, and each upstream's series by index.
fn register_upstreams(upstreams: &[SocketAddr], registry: &mut Registry) -> Vec<Upstream> {
    let requests = Family::<Labels, Counter>::default();
    let failures = Family::<Labels, Counter>::default();
    let duration = Family::<Labels, Histogram>::new_with_constructor(
        (|| Histogram::new(BUCKETS)) as fn() -> Histogram,
    );
    let by_type = |family: &Family<Labels, Counter>, server: &str| -> Vec<Counter> {
        TYPES
            .iter()
            .map(|ty| {
                let labels = vec![("server", server.to_owned()), ("type", (*ty).to_owned())];
                family.get_or_create(&labels).clone()
            })
            .collect()
    };
    let out = upstreams
        .iter()
        .map(|s| {
            let server = s.to_string();
            Upstream {
                requests: by_type(&requests, &server),
                failures: by_type(&failures, &server),
                duration: duration.get_or_create(&vec![("server", server)]).clone(),
            }
        })
        .collect();
    registry.register(
        "dns_upstream_requests",
        "Total number of DNS requests forwarded upstream.",
        requests,
    );
    registry.register(
        "dns_upstream_failures",
        "Total number of upstream DNS requests that failed.",
        failures,
    );
    registry.register(
        "dns_upstream_request_duration_seconds",
        "Duration of upstream DNS exchanges.",
        duration,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_labels_and_histogram() {
        let mut registry = Registry::default();
        let m = Metrics::new(&["10.96.0.10:53".parse().unwrap()], &mut registry, false);
        m.request(RecordType::A, Protocol::Udp, Outcome::Local, None);
        m.request(RecordType::A, Protocol::Udp, Outcome::Local, None);
        m.request(RecordType::NULL, Protocol::Tcp, Outcome::ServFail, None);
        m.cache_hit();
        m.upstream(0, RecordType::AAAA, Duration::from_millis(3), false);
        m.upstream(0, RecordType::AAAA, Duration::from_secs(2), true);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        for want in [
            "dns_requests_total{type=\"A\",protocol=\"udp\",result=\"local\"} 2",
            "dns_requests_total{type=\"other\",protocol=\"tcp\",result=\"servfail\"} 1",
            "dns_requests_total{type=\"AAAA\",protocol=\"tcp\",result=\"cached\"} 0",
            "dns_upstream_requests_total{server=\"10.96.0.10:53\",type=\"AAAA\"} 2",
            "dns_upstream_failures_total{server=\"10.96.0.10:53\",type=\"AAAA\"} 1",
            "dns_upstream_request_duration_seconds_bucket{le=\"0.005\",server=\"10.96.0.10:53\"} 1",
            "dns_upstream_request_duration_seconds_bucket{le=\"+Inf\",server=\"10.96.0.10:53\"} 2",
            "dns_upstream_request_duration_seconds_count{server=\"10.96.0.10:53\"} 2",
            "dns_cache_hits_total 1",
        ] {
            assert!(out.contains(want), "missing {want} in\n{out}");
        }
    }
}
