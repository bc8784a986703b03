//! The bench's table, its ratios against the goals of the performance issue, and the
//! same as JSON.
use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::{
    autopath::AutopathRow,
    cluster::ClusterRow,
    dnsperf::Measured,
    ebpf::PathCost,
    scale::{Scale, Shape},
};

pub(crate) struct Report {
    pub(crate) quick: bool,
    /// Rounds of the side-by-side rows (each figure is their median).
    pub(crate) rounds: usize,
    pub(crate) rows: Vec<(&'static str, Measured)>,
    pub(crate) costs: Vec<PathCost>,
    pub(crate) scales: Vec<Scale>,
    pub(crate) clusters: Vec<ClusterRow>,
    pub(crate) autopath: Vec<AutopathRow>,
}

/// A ratio, its goal, and whether it met it.
pub(crate) struct Goal {
    pub(crate) what: &'static str,
    pub(crate) value: f64,
    pub(crate) target: &'static str,
    pub(crate) met: bool,
}

impl Report {
    fn row(&self, name: &str) -> Measured {
        self.rows
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, m)| *m)
            .unwrap_or_default()
    }

    fn cost(&self, path: &str) -> f64 {
        self.costs
            .iter()
            .find(|c| c.path.starts_with(path))
            .map_or(f64::NAN, |c| c.ns_per_run)
    }

    fn scale(&self, shape: Shape, hosts: usize) -> Option<Scale> {
        self.scales
            .iter()
            .find(|s| s.shape == shape && s.hosts == hosts)
            .copied()
    }

    fn cluster(&self, remote_pods: usize, selected: usize) -> Option<&ClusterRow> {
        self.clusters
            .iter()
            .find(|c| c.remote_pods == remote_pods && c.selected == selected)
    }

    /// Every goal of the issue, computed from this run.
    pub(crate) fn goals(&self) -> Vec<Goal> {
        let (floor, dnsmasq, unbound) = (
            self.row("floor responder"),
            self.row("dnsmasq"),
            self.row("unbound"),
        );
        let direct = self.row("dnsproxy, direct");
        let redirect = self.row("dnsproxy, eBPF redirect");
        let iptables = self.row("dnsproxy, iptables REDIRECT");
        let cached = self.row("dnsproxy, cache hits");
        let best_cpu = dnsmasq.cpu_us_per_query.min(unbound.cpu_us_per_query);
        let best_qps = dnsmasq.max.qps.max(unbound.max.qps);
        let cpu = direct.cpu_us_per_query;
        let mut goals = Vec::new();
        if !self.rows.is_empty() {
            goals.extend([
                goal(
                    "local CPU/query vs min(dnsmasq, unbound)",
                    cpu / best_cpu,
                    "<= 1.00",
                    |v| v <= 1.0,
                ),
                goal(
                    "local CPU/query vs floor (stretch)",
                    cpu / floor.cpu_us_per_query,
                    "<= 1.15",
                    |v| v <= 1.15,
                ),
                goal(
                    "local max qps vs max(dnsmasq, unbound)",
                    direct.max.qps / best_qps,
                    ">= 1.00",
                    |v| v >= 1.0,
                ),
                goal(
                    "cache-hit qps vs local qps",
                    cached.max.qps / direct.max.qps,
                    ">= 0.90",
                    |v| v >= 0.9,
                ),
                goal(
                    "eBPF redirect qps vs direct",
                    redirect.max.qps / direct.max.qps,
                    ">= 0.97",
                    |v| v >= 0.97,
                ),
                goal(
                    "eBPF redirect qps vs iptables REDIRECT",
                    redirect.max.qps / iptables.max.qps,
                    ">= 1.20",
                    |v| v >= 1.2,
                ),
                goal("hook: pass path, ns/run", self.cost("pass"), "<= 50", |v| {
                    v <= 50.0
                }),
                goal(
                    "hook: DNS redirect (connect), ns/run",
                    self.cost("DNS redirect (connect)"),
                    "<= 120",
                    |v| v <= 120.0,
                ),
                goal(
                    "hook: DNS redirect (sendmsg), ns/run",
                    self.cost("DNS redirect (sendmsg)"),
                    "<= 120",
                    |v| v <= 120.0,
                ),
                goal(
                    "hook: DNS redirect (connect, node mode), ns/run",
                    self.cost("DNS redirect (connect, node-mode pod)"),
                    "<= 120",
                    |v| v <= 120.0,
                ),
            ]);
        }
        for (shape, what_rss, what_ready) in [
            (
                Shape::OneEntry,
                "30k hosts in one entry: RSS MB",
                "50k hosts in one entry: ready and translatable, s",
            ),
            (
                Shape::EntryPerHost,
                "30k one-host entries: RSS MB",
                "50k one-host entries: ready and translatable, s",
            ),
        ] {
            if let Some(s) = self.scale(shape, 30_000) {
                goals.push(goal(what_rss, s.rss_mib * 1.048_576, "<= 64", |v| {
                    v <= 64.0
                }));
            }
            if let Some(s) = self.scale(shape, 50_000) {
                let worst = s.ready.max(s.translatable).as_secs_f64();
                goals.push(goal(what_ready, worst, "< 2", |v| v < 2.0));
            }
        }
        goals.extend(self.cluster_goals());
        if let [on, off] = self.autopath[..] {
            goals.extend([
                goal(
                    "autopath: glibc queries per external lookup",
                    on.queries_per_lookup,
                    "<= 2",
                    |v| v <= 2.0,
                ),
                goal(
                    "autopath: glibc external lookups/s, on vs off",
                    on.lookups_per_sec / off.lookups_per_sec,
                    "> 1",
                    |v| v > 1.0,
                ),
            ]);
        }
        goals
    }

    /// The goals of node mode at cluster scale.
    fn cluster_goals(&self) -> Vec<Goal> {
        let mut goals = Vec::new();
        let empty = self.cluster(0, 0).map(|c| c.rss_mib);
        for (n, rss, idle, churn) in [
            (
                30_000,
                "30k remote pods: RSS over the empty cluster's, MiB",
                "30k remote pods: idle CPU, % of a core",
                "30k remote pods, 50 updates/s: CPU, % of a core",
            ),
            (
                100_000,
                "100k remote pods: RSS over the empty cluster's, MiB",
                "100k remote pods: idle CPU, % of a core",
                "100k remote pods, 50 updates/s: CPU, % of a core",
            ),
        ] {
            let Some(c) = self.cluster(n, 0) else {
                continue;
            };
            if let Some(empty) = empty {
                goals.push(goal(rss, c.rss_mib - empty, "<= 16", |v| v <= 16.0));
            }
            goals.push(goal(idle, c.idle_cpu, "<= 0.5", |v| v <= 0.5));
            goals.push(goal(churn, c.churn_50, "<= 2", |v| v <= 2.0));
        }
        if let Some(c) = self.clusters.iter().find(|c| c.selected > 0) {
            goals.push(goal(
                "1,000 selected remote pods, 50 updates/s: CPU, % of a core",
                c.churn_50,
                "<= 5",
                |v| v <= 5.0,
            ));
        }
        if let Some(worst) = self.clusters.iter().map(|c| c.capture).max() {
            goals.push(goal(
                "local pod captured after its Running event, s (worst row)",
                worst.as_secs_f64(),
                "<= 1",
                |v| v <= 1.0,
            ));
        }
        goals
    }

    pub(crate) fn text(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "\n{:<44} {:>10} {:>8} {:>14}",
            "server (100 table names, dnsperf -c 4 -q 200)", "max qps", "lost", "CPU µs/query"
        );
        for (name, m) in &self.rows {
            let _ = writeln!(
                t,
                "{name:<44} {:>10.0} {:>8} {:>14.2}",
                m.max.qps, m.max.lost, m.cpu_us_per_query
            );
        }
        let _ = writeln!(
            t,
            "(CPU per query: the server's user+sys CPU at a fixed {} qps; each figure the \
             median of {} rounds, the servers taking turns)",
            crate::dnsperf::FIXED_QPS,
            self.rounds
        );
        let _ = writeln!(
            t,
            "\n{:<37} {:<22} {:>10} {:>10}",
            "eBPF path", "program", "runs", "ns/run"
        );
        for c in &self.costs {
            let _ = writeln!(
                t,
                "{:<37} {:<22} {:>10} {:>10.1}",
                c.path, c.program, c.runs, c.ns_per_run
            );
        }
        if !self.scales.is_empty() {
            let _ = writeln!(
                t,
                "\n{:>8} {:<14} {:>10} {:>14} {:>10} {:>10} {:>22}",
                "hosts",
                "entries",
                "ready",
                "translatable",
                "RSS MiB",
                "heap MiB",
                "qps (1000 random names)"
            );
        }
        for s in &self.scales {
            let _ = writeln!(
                t,
                "{:>8} {:<14} {:>10.3?} {:>14.3?} {:>10.1} {:>10.1} {:>22.0}",
                s.hosts,
                s.shape.label(),
                s.ready,
                s.translatable,
                s.rss_mib,
                s.heap_mib,
                s.qps
            );
        }
        if !self.clusters.is_empty() {
            let _ = writeln!(
                t,
                "\nnode mode: 100 namespaces, 200 Services, 50 ServiceEntries, and pods on other nodes\n\
                 {:>11} {:>9} {:>10} {:>10} {:>11} {:>8} {:>12} {:>14}",
                "remote pods",
                "selected",
                "idle CPU%",
                "50/s CPU%",
                "500/s CPU%",
                "RSS MiB",
                "capture ms",
                "API req/min"
            );
        }
        for c in &self.clusters {
            let _ = writeln!(
                t,
                "{:>11} {:>9} {:>10.2} {:>10.2} {:>11} {:>8.1} {:>12.1} {:>14.1}",
                c.remote_pods,
                c.selected,
                c.idle_cpu,
                c.churn_50,
                c.churn_500
                    .map_or_else(|| "-".to_owned(), |v| format!("{v:.2}")),
                c.rss_mib,
                c.capture.as_secs_f64() * 1000.0,
                c.idle_requests_per_min
            );
        }
        if !self.clusters.is_empty() {
            let _ = writeln!(
                t,
                "(CPU: the daemon's user+sys over the window, in % of one core; the selected \
                 row's changes are to its selected pods, each flipping readiness; capture: a \
                 pod of this node from its Running event to \"DNS capture started\")"
            );
        }
        if !self.autopath.is_empty() {
            let _ = writeln!(
                t,
                "\nglibc getaddrinfo of external names from a pod (ndots:5, 4 search domains, warm cache)\n\
                 {:<10} {:>10} {:>9} {:>9} {:>16}",
                "autopath", "lookups/s", "p50 ms", "p99 ms", "queries/lookup"
            );
        }
        for a in &self.autopath {
            let _ = writeln!(
                t,
                "{:<10} {:>10.0} {:>9.3} {:>9.3} {:>16.2}",
                if a.autopath { "on" } else { "off" },
                a.lookups_per_sec,
                a.p50_ms,
                a.p99_ms,
                a.queries_per_lookup
            );
        }
        let _ = writeln!(t, "\n{:<60} {:>10} {:>9}  met", "ratio", "value", "goal");
        for g in self.goals() {
            let _ = writeln!(
                t,
                "{:<60} {:>10.3} {:>9}  {}",
                g.what,
                g.value,
                g.target,
                if g.met { "yes" } else { "NO" }
            );
        }
        if self.quick {
            let _ = writeln!(t, "(--quick: 1 s runs, figures are rough)");
        }
        t
    }

    pub(crate) fn json(&self) -> Value {
        json!({
            "quick": self.quick,
            "rounds": self.rounds,
            "servers": self.rows.iter().map(|(name, m)| json!({
                "server": name,
                "max_qps": m.max.qps,
                "max_lost": m.max.lost,
                "cpu_us_per_query": m.cpu_us_per_query,
                "fixed_qps_completed": m.fixed.completed,
            })).collect::<Vec<_>>(),
            "ebpf": self.costs.iter().map(|c| json!({
                "path": c.path, "program": c.program, "runs": c.runs, "ns_per_run": c.ns_per_run,
            })).collect::<Vec<_>>(),
            "cluster": self.clusters.iter().map(|c| json!({
                "remote_pods": c.remote_pods,
                "selected": c.selected,
                "idle_cpu_percent": c.idle_cpu,
                "churn_50_cpu_percent": c.churn_50,
                "churn_500_cpu_percent": c.churn_500,
                "rss_mib": c.rss_mib,
                "capture_s": c.capture.as_secs_f64(),
                "idle_api_requests_per_min": c.idle_requests_per_min,
            })).collect::<Vec<_>>(),
            "scale": self.scales.iter().map(|s| json!({
                "shape": s.shape.label(),
                "hosts": s.hosts,
                "ready_s": s.ready.as_secs_f64(),
                "translatable_s": s.translatable.as_secs_f64(),
                "rss_mib": s.rss_mib,
                "heap_mib": s.heap_mib,
                "qps": s.qps,
            })).collect::<Vec<_>>(),
            "autopath": self.autopath.iter().map(|a| json!({
                "autopath": a.autopath,
                "lookups_per_sec": a.lookups_per_sec,
                "p50_ms": a.p50_ms,
                "p99_ms": a.p99_ms,
                "queries_per_lookup": a.queries_per_lookup,
            })).collect::<Vec<_>>(),
            "goals": self.goals().iter().map(|g| json!({
                "ratio": g.what, "value": g.value, "goal": g.target, "met": g.met,
            })).collect::<Vec<_>>(),
        })
    }
}

fn goal(what: &'static str, value: f64, target: &'static str, met: fn(f64) -> bool) -> Goal {
    Goal {
        what,
        value,
        target,
        met: met(value),
    }
}
