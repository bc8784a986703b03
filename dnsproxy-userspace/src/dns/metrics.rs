//! Request counters, rendered as Prometheus text by the admin server.
use std::{
    collections::BTreeMap,
    sync::Mutex,
};

use super::Protocol;

/// How a query ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Answered from the name table.
    Local,
    /// Answered by an upstream.
    Forwarded,
    /// Every upstream failed: SERVFAIL.
    ServFail,
    /// Malformed or unsupported query: FORMERR/NOTIMP.
    Rejected,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Local => "local",
            Outcome::Forwarded => "forwarded",
            Outcome::ServFail => "servfail",
            Outcome::Rejected => "rejected",
        }
    }
}

/// Counters of the DNS server. A mutex-guarded map is enough at this stage: it is
/// touched once per query, after the answer is sent.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    upstream_requests: Mutex<BTreeMap<String, u64>>,
    upstream_failures: Mutex<BTreeMap<String, u64>>,
}

impl Metrics {
    /// Counts one answered query.
    pub fn request(&self, protocol: Protocol, outcome: Outcome) {
        let mut m = self.requests.lock().expect("metrics lock");
        *m.entry((protocol.as_str(), outcome.as_str())).or_default() += 1;
    }

    /// Counts one query sent to `server`, and whether it failed.
    pub fn upstream(&self, server: &str, failed: bool) {
        *self
            .upstream_requests
            .lock()
            .expect("metrics lock")
            .entry(server.to_owned())
            .or_default() += 1;
        if failed {
            *self
                .upstream_failures
                .lock()
                .expect("metrics lock")
                .entry(server.to_owned())
                .or_default() += 1;
        }
    }

    /// Prometheus text exposition of the counters.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        out.push_str("# HELP dns_requests_total DNS queries answered, by protocol and result.\n");
        out.push_str("# TYPE dns_requests_total counter\n");
        for ((proto, result), n) in self.requests.lock().expect("metrics lock").iter() {
            let _ = writeln!(out, "dns_requests_total{{protocol=\"{proto}\",result=\"{result}\"}} {n}");
        }
        for (metric, help, map) in [
            ("dns_upstream_requests_total", "Queries sent upstream.", &self.upstream_requests),
            ("dns_upstream_failures_total", "Upstream queries that failed.", &self.upstream_failures),
        ] {
            let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} counter");
            for (server, n) in map.lock().expect("metrics lock").iter() {
                let _ = writeln!(out, "{metric}{{server=\"{server}\"}} {n}");
            }
        }
    }
}
