//! Load from dnsperf (`-c 4 -q 200`, as the issue measured), and the server's CPU read
//! from /proc around it.
use std::{collections::HashMap, path::Path, process::Command, time::Duration};

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

/// CPU time of each thread of process `pid` so far, in nanoseconds, from the
/// scheduler's own accounting (`/proc/<pid>/task/<tid>/schedstat`: exact, where
/// `/proc/<pid>/stat` counts 10 ms ticks, a tenth of a microsecond per query here).
pub(crate) fn thread_cpu(pid: u32) -> HashMap<u32, u64> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return HashMap::new();
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| {
            let tid = task.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            Some((tid, stat.split_whitespace().next()?.parse().ok()?))
        })
        .collect()
}

/// Microseconds of CPU the threads used between two readings of [`thread_cpu`] (a
/// thread that ended in between loses its share).
pub(crate) fn cpu_micros_between(before: &HashMap<u32, u64>, after: &HashMap<u32, u64>) -> f64 {
    let ns: u64 = after
        .iter()
        .map(|(tid, t)| t.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum();
    ns as f64 / 1000.0
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
    let before = thread_cpu(pid);
    let fixed = dnsperf(prefix, server, names, secs, Some(FIXED_QPS));
    let cpu = cpu_micros_between(&before, &thread_cpu(pid));
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
