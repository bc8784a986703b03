//! Scale rows: a registry of N auto-allocated hosts. Time to ready, time until every VIP
//! is translatable (start to the first VIP map sync, from the daemon's log), RSS at
//! ready, and qps over 1,000 random names of the table.
use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use dnsproxy_e2e::{Daemon, TestEnv, load, log_gap, scale_registry};

use crate::dnsperf;

/// One scale row.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scale {
    pub(crate) hosts: usize,
    pub(crate) ready: Duration,
    pub(crate) translatable: Duration,
    pub(crate) rss_mib: f64,
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
pub(crate) fn row(hosts: usize, secs: u64) -> Scale {
    let env = TestEnv::with_registry(&scale_registry(hosts));
    env.netns.add_addr("203.0.113.10/32");
    let mut opts = env.daemon_options();
    opts.env.push(("RUST_LOG".into(), "info".into()));
    let started = Instant::now();
    let daemon = Daemon::start(opts);
    let ready = started.elapsed();
    let rss = load::rss_bytes(daemon.pid());
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
        hosts,
        ready,
        translatable,
        rss_mib: rss as f64 / f64::from(1 << 20),
        qps: run.qps,
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
