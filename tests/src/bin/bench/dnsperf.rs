//! Load from dnsperf (`-c 4 -q 200`, as the issue measured), and the server's CPU read
//! from /proc around it.
use std::{path::Path, process::Command, time::Duration};

use dnsproxy_e2e::{run_with_timeout, stdout};

/// Offered load of the CPU-per-query runs: fixed, so the figure does not depend on how
/// fast dnsperf is.
pub(crate) const FIXED_QPS: u32 = 30_000;

/// What one dnsperf run reported.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Run {
    pub(crate) completed: u64,
    pub(crate) lost: u64,
    pub(crate) qps: f64,
}

/// A dnsperf run: `prefix` places it (netns, cgroup), then the server, the names file,
/// the duration and an optional rate limit.
pub(crate) fn dnsperf(
    prefix: &dyn Fn() -> Command,
    server: (&str, u16),
    names: &Path,
    secs: u64,
    max_qps: Option<u32>,
) -> Run {
    let mut cmd = prefix();
    cmd.args(["dnsperf", "-s", server.0, "-p"])
        .arg(server.1.to_string())
        .arg("-d")
        .arg(names)
        .args(["-c", "4", "-q", "200", "-t", "2", "-l"])
        .arg(secs.to_string());
    if let Some(q) = max_qps {
        cmd.arg("-Q").arg(q.to_string());
    }
    let out = run_with_timeout(&mut cmd, Duration::from_secs(secs + 30));
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "dnsperf failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |label: &str| -> f64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("dnsperf printed no {label:?}:\n{text}"))
    };
    Run {
        completed: field("Queries completed:") as u64,
        lost: field("Queries lost:") as u64,
        qps: field("Queries per second:"),
    }
}

/// User + system CPU time process `pid` (all its threads) has used, in microseconds.
pub(crate) fn cpu_micros(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 12th, stime
    // the 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| {
        f.iter().filter_map(|v| v.parse::<f64>().ok()).sum()
    });
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks * 1e6 / hz
}

/// A server's figures: its most queries a second, and its CPU per query at
/// [`FIXED_QPS`] (medians over the rounds).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Measured {
    pub(crate) max: Run,
    pub(crate) fixed: Run,
    pub(crate) cpu_us_per_query: f64,
}

/// One round of a server with process `pid` at `server` through `prefix`.
pub(crate) fn measure(
    prefix: &dyn Fn() -> Command,
    server: (&str, u16),
    names: &Path,
    pid: u32,
    secs: u64,
) -> Measured {
    let max = dnsperf(prefix, server, names, secs, None);
    let before = cpu_micros(pid);
    let fixed = dnsperf(prefix, server, names, secs, Some(FIXED_QPS));
    let cpu = cpu_micros(pid) - before;
    Measured {
        max,
        fixed,
        cpu_us_per_query: cpu / fixed.completed.max(1) as f64,
    }
}

/// The median round of `rounds` by CPU per query, with the median max qps: this
/// machine is shared, so one round can be off either way.
pub(crate) fn median(rounds: &[Measured]) -> Measured {
    let mut by_cpu = rounds.to_vec();
    by_cpu.sort_by(|a, b| a.cpu_us_per_query.total_cmp(&b.cpu_us_per_query));
    let mut qps: Vec<f64> = rounds.iter().map(|m| m.max.qps).collect();
    qps.sort_by(f64::total_cmp);
    let mut out = by_cpu.get(by_cpu.len() / 2).copied().unwrap_or_default();
    out.max.qps = qps.get(qps.len() / 2).copied().unwrap_or_default();
    out
}
