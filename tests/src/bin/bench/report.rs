//! The bench's table, its ratios against the goals of the performance issue, and the
//! same as JSON.
use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::{dnsperf::Measured, ebpf::PathCost, scale::Scale};

pub(crate) struct Report {
    pub(crate) quick: bool,
    /// Rounds of the side-by-side rows (each figure is their median).
    pub(crate) rounds: usize,
    pub(crate) rows: Vec<(&'static str, Measured)>,
    pub(crate) costs: Vec<PathCost>,
    pub(crate) scales: Vec<Scale>,
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

    fn scale(&self, hosts: usize) -> Option<Scale> {
        self.scales.iter().find(|s| s.hosts == hosts).copied()
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
        let mut goals = vec![
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
        ];
        if let Some(s) = self.scale(30_000) {
            goals.push(goal(
                "30k hosts: RSS MB",
                s.rss_mib * 1.048_576,
                "<= 64",
                |v| v <= 64.0,
            ));
        }
        if let Some(s) = self.scale(50_000) {
            let worst = s.ready.max(s.translatable).as_secs_f64();
            goals.push(goal(
                "50k hosts: ready and translatable, s",
                worst,
                "< 2",
                |v| v < 2.0,
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
        let _ = writeln!(
            t,
            "\n{:>8} {:>10} {:>14} {:>10} {:>22}",
            "hosts", "ready", "translatable", "RSS MiB", "qps (1000 random names)"
        );
        for s in &self.scales {
            let _ = writeln!(
                t,
                "{:>8} {:>10.3?} {:>14.3?} {:>10.1} {:>22.0}",
                s.hosts, s.ready, s.translatable, s.rss_mib, s.qps
            );
        }
        let _ = writeln!(t, "\n{:<48} {:>10} {:>9}  met", "ratio", "value", "goal");
        for g in self.goals() {
            let _ = writeln!(
                t,
                "{:<48} {:>10.3} {:>9}  {}",
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
            "scale": self.scales.iter().map(|s| json!({
                "hosts": s.hosts,
                "ready_s": s.ready.as_secs_f64(),
                "translatable_s": s.translatable.as_secs_f64(),
                "rss_mib": s.rss_mib,
                "qps": s.qps,
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
