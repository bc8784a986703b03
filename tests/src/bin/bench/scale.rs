//! Scale rows: a registry of N auto-allocated hosts, in one `ServiceEntry` or in N of
//! one host each (the shape clusters have). Time to ready, time until every VIP is
//! translatable (start to the first VIP map sync, from the daemon's log), RSS at ready,
//! and qps over 1,000 random names of the table.
use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use dnsproxy_e2e::{Daemon, TestEnv, entry_per_host_registry, load, log_gap, scale_registry};

use crate::dnsperf;

/// How the hosts are spread over entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// One `ServiceEntry` with every host.
    OneEntry,
    /// One `ServiceEntry` per host.
    EntryPerHost,
}

impl Shape {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Shape::OneEntry => "in one entry",
            Shape::EntryPerHost => "an entry each",
        }
    }
}

/// The rows: each shape at 10k, 30k and 50k hosts. `BENCH_SCALE_ROWS`
/// (`entry:30000,one:50000`) picks others, to profile one.
pub(crate) fn rows() -> Vec<(Shape, usize)> {
    let Ok(rows) = std::env::var("BENCH_SCALE_ROWS") else {
        return [Shape::OneEntry, Shape::EntryPerHost]
            .into_iter()
            .flat_map(|shape| [10_000, 30_000, 50_000].map(|hosts| (shape, hosts)))
            .collect();
    };
    rows.split(',')
        .filter_map(|r| {
            let (shape, hosts) = r.split_once(':')?;
            let shape = match shape {
                "one" => Shape::OneEntry,
                "entry" => Shape::EntryPerHost,
                _ => return None,
            };
            Some((shape, hosts.parse().ok()?))
        })
        .collect()
}

/// One scale row.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scale {
    pub(crate) shape: Shape,
    pub(crate) hosts: usize,
    pub(crate) ready: Duration,
    pub(crate) translatable: Duration,
    pub(crate) rss_mib: f64,
    /// What the allocator had handed out at ready (the daemon logs it).
    pub(crate) heap_mib: f64,
    pub(crate) qps: f64,
}

/// 1,000 names drawn (deterministically) from the table, for dnsperf.
fn random_names(dir: &Path, hosts: usize) -> PathBuf {
    let path = dir.join("scale-names.txt");
    let mut file = std::fs::File::create(&path).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..1000 {
        // xorshift: spread over the whole table, the same names every run.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        writeln!(file, "h{}.scale.example A", x % hosts as u64).unwrap();
    }
    path
}

/// Starts a daemon on `hosts` names and measures it.
pub(crate) fn row(shape: Shape, hosts: usize, secs: u64) -> Scale {
    let registry = match shape {
        Shape::OneEntry => scale_registry(hosts),
        Shape::EntryPerHost => entry_per_host_registry(hosts),
    };
    let env = TestEnv::with_registry(&registry);
    env.netns.add_addr("203.0.113.10/32");
    let mut opts = env.daemon_options();
    opts.env.push(("RUST_LOG".into(), "info".into()));
    let started = Instant::now();
    let daemon = Daemon::start(opts);
    let ready = started.elapsed();
    let rss = load::rss_bytes(daemon.pid());
    let heap = ready_heap(&daemon);

    let translatable = wait_translatable(&daemon);
    let names = random_names(&env.dir, hosts);
    let netns = env.netns.path.clone();
    let prefix = move || {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", netns.display()));
        c
    };
    let run = dnsperf::dnsperf(&prefix, ("127.0.0.1", 15053), &names, secs, None);
    Scale {
        shape,
        hosts,
        ready,
        translatable,
        rss_mib: rss as f64 / f64::from(1 << 20),
        heap_mib: heap / f64::from(1 << 20),
        qps: run.qps,
    }
}

/// The heap the daemon's "ready" line reports (the line follows `/readyz` by moments).
fn ready_heap(daemon: &Daemon) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let heap = daemon
            .log_text()
            .lines()
            .find(|l| l.contains(" ready "))
            .and_then(|l| l.split("heap_bytes=").nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok());
        if let Some(heap) = heap {
            return heap;
        }
        if Instant::now() > deadline {
            return f64::NAN;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Start to the first VIP map sync, from the daemon's log.
fn wait_translatable(daemon: &Daemon) -> Duration {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = daemon.log_text();
        if log.contains("VIP translation maps updated") {
            return log_gap(&log, "starting dnsproxy", "VIP translation maps updated");
        }
        assert!(Instant::now() < deadline, "no VIP map sync in 30 s:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
