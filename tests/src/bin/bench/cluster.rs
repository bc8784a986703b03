//! Node mode at cluster scale: one node's daemon against a fake API server holding a
//! cluster — 100 namespaces, 200 Services, 50 `ServiceEntries`, and N Pods on other
//! nodes — and what the daemon costs for it: CPU while the cluster is quiet and while
//! other nodes' Pods change at 50 and 500 updates a second, its RSS, how soon a Pod
//! of its own node is captured after its Running event, and how many API requests it
//! makes while idle. A last row has a `workloadSelector` entry that selects 1,000 Pods
//! of other nodes, which change at 50 a second.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use dnsproxy_e2e::{NodeEnv, Resource, fake_kube, load, remote_pod, vm_entry};
use serde_json::{Value, json};

use crate::dnsperf::{cpu_micros_between, thread_cpu};

/// Namespaces, Services and `ServiceEntries` of the bench's cluster.
const NAMESPACES: usize = 100;
const SERVICES: usize = 200;
const SERVICE_ENTRIES: usize = 50;

/// Pods a `workloadSelector` selects, in the selector row.
pub(crate) const SELECTED: usize = 1_000;

/// The rows: (pods on other nodes, of them selected). `BENCH_CLUSTER_ROWS`
/// (`30000:1000,0:0`) picks others, to profile one.
pub(crate) fn rows() -> Vec<(usize, usize)> {
    let Ok(rows) = std::env::var("BENCH_CLUSTER_ROWS") else {
        return vec![(0, 0), (30_000, 0), (100_000, 0), (30_000, SELECTED)];
    };
    rows.split(',')
        .filter_map(|r| {
            let (remote, selected) = r.split_once(':')?;
            Some((remote.parse().ok()?, selected.parse().ok()?))
        })
        .collect()
}

/// One row.
#[derive(Clone, Debug)]
pub(crate) struct ClusterRow {
    /// Pods on other nodes that no entry selects.
    pub(crate) remote_pods: usize,
    /// Of them, selected by a `workloadSelector` (and changing, in the churn windows).
    pub(crate) selected: usize,
    /// Share of one core, in percent.
    pub(crate) idle_cpu: f64,
    pub(crate) churn_50: f64,
    pub(crate) churn_500: Option<f64>,
    pub(crate) rss_mib: f64,
    /// From a local Pod's Running event in the API to its capture (the daemon's log).
    pub(crate) capture: Duration,
    pub(crate) idle_requests_per_min: f64,
}

/// How long each window lasts.
#[derive(Clone, Copy)]
pub(crate) struct Windows {
    pub(crate) idle: Duration,
    pub(crate) churn: Duration,
}

/// The cluster every row shares, plus `remote` Pods of other nodes, `selected` of
/// them selected by the `vm` entry.
fn populate(env: &NodeEnv, remote: usize, selected: usize) {
    let api = &env.api;
    api.apply_many(
        Resource::Namespaces,
        (0..NAMESPACES).map(|i| json!({"metadata": {"name": format!("ns-{i}")}})),
    );
    api.apply_many(
        Resource::Services,
        (0..SERVICES).map(|i| {
            json!({"metadata": {"name": format!("svc-{i}"), "namespace": format!("ns-{}", i % NAMESPACES)},
                   "spec": {"clusterIP": format!("10.100.{}.{}", i / 250, i % 250 + 1),
                            "ports": [{"port": 80}], "selector": {"app": format!("app-{i}")}}})
        }),
    );
    api.apply_many(
        Resource::ServiceEntries,
        (0..SERVICE_ENTRIES).map(|i| {
            json!({"metadata": {"name": format!("se-{i}"), "namespace": format!("ns-{}", i % NAMESPACES)},
                   "spec": {"hosts": [format!("ext-{i}.example.com")], "resolution": "STATIC",
                            "endpoints": [{"address": "192.0.2.10"}],
                            "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}]}})
        }),
    );
    if selected > 0 {
        api.apply(Resource::ServiceEntries, vm_entry("vm"));
    }
    // In batches: the server wakes its watches once per batch.
    let mut made = 0;
    while made < remote {
        let batch = (made..remote.min(made + 5_000)).map(|i| remote_object(i, selected, 0));
        api.apply_many(Resource::Pods, batch.collect::<Vec<_>>());
        made = remote.min(made + 5_000);
    }
}

/// Remote Pod `i`: the first `selected` are the `vm` entry's, in namespace `vms`.
fn remote_object(i: usize, selected: usize, generation: u32) -> Value {
    let ip = format!("10.{}.{}.{}", 64 + i / 65_536, (i / 256) % 256, i % 256);
    if i < selected {
        // Selected Pods flip readiness as they change: each change moves a backend.
        return remote_pod(
            &format!("vm-{i}"),
            "vms",
            "vm",
            &ip,
            generation.is_multiple_of(2),
            generation,
        );
    }
    remote_pod(
        &format!("pod-{i}"),
        &format!("ns-{}", i % NAMESPACES),
        &format!("app-{}", i % SERVICES),
        &ip,
        true,
        generation,
    )
}

/// Changes `per_second` random Pods among `targets` (indices of [`remote_object`])
/// until stopped; returns how many changes it made.
struct Churn {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<u64>,
}

impl Churn {
    fn start(
        api: fake_kube::Writer,
        targets: std::ops::Range<usize>,
        selected: usize,
        per_second: u32,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let mut x: u64 = 0x2545_f491_4f6c_dd1d;
            let mut changes = 0u64;
            let started = Instant::now();
            let tick = Duration::from_millis(20);
            let per_tick = f64::from(per_second) * tick.as_secs_f64();
            let (mut due, mut ticks) = (0.0, 0u32);
            while !flag.load(Ordering::Relaxed) {
                ticks += 1;
                due += per_tick;
                let n = due.floor();
                due -= n;
                let batch: Vec<Value> = (0..n as u64)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let i = targets.start + (x % (targets.len() as u64)) as usize;
                        changes += 1;
                        remote_object(i, selected, changes as u32)
                    })
                    .collect();
                api.apply_many(Resource::Pods, batch);
                if let Some(wait) = (started + tick * ticks).checked_duration_since(Instant::now())
                {
                    thread::sleep(wait);
                }
            }
            changes
        });
        Churn { stop, thread }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

/// The daemon's CPU over `window`, in percent of one core.
fn cpu_percent(pid: u32, window: Duration) -> f64 {
    let before = thread_cpu(pid);
    let started = Instant::now();
    thread::sleep(window);
    let micros = cpu_micros_between(&before, &thread_cpu(pid));
    micros / started.elapsed().as_micros() as f64 * 100.0
}

/// Seconds of the day of a log line's RFC 3339 timestamp (`2026-11-26T06:14:33.017Z`).
fn log_seconds(line: &str) -> Option<f64> {
    let time = line.split_whitespace().next()?.split('T').nth(1)?;
    let mut parts = time.trim_end_matches('Z').split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

fn now_seconds_of_day() -> f64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (now.as_secs() % 86_400) as f64 + f64::from(now.subsec_micros()) / 1e6
}

/// Adds a captured Pod of this node and returns the time from its Running event in
/// the API to the daemon's "DNS capture started" for it.
fn capture_latency(env: &mut NodeEnv, daemon: &dnsproxy_e2e::Daemon) -> Duration {
    let name = format!("probe-{}", env.pods.len());
    // The pod's netns, cgroup and process first, as the runtime starts them before
    // the kubelet reports Running; then the Running Pod is published.
    let pod = env.start_pod(&name, "bench");
    let published = now_seconds_of_day();
    env.annotate(pod, &[]);
    let needle = format!("pod=bench/{name}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = daemon.log_text();
        if let Some(at) = log
            .lines()
            .filter(|l| l.contains("DNS capture started") && l.contains(&needle))
            .find_map(log_seconds)
        {
            return Duration::from_secs_f64((at - published).max(0.0));
        }
        assert!(Instant::now() < deadline, "{name} never captured:\n{log}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// One row: a fresh cluster and daemon, measured.
pub(crate) fn row(remote_pods: usize, selected: usize, windows: Windows) -> ClusterRow {
    let options = fake_kube::Options {
        // What the API server does: a bookmark about once a minute.
        bookmark_every: Duration::from_mins(1),
    };
    let mut env = NodeEnv::with_api(&[("bench", Some("enabled")), ("vms", None)], options);
    let started = Instant::now();
    populate(&env, remote_pods, selected);
    eprintln!(
        "bench:   cluster of {remote_pods} remote pods in {:?}",
        started.elapsed()
    );
    let pin_dir = std::path::PathBuf::from("/sys/fs/bpf").join(dnsproxy_e2e::unique_name("p"));
    let mut opts = env.daemon_options(pin_dir);
    opts.env.push(("RUST_LOG".into(), "info".into()));
    let daemon = dnsproxy_e2e::Daemon::start(opts);
    let pid = daemon.pid();
    // Settle: the watches follow their lists, the first VIP sync is written.
    thread::sleep(Duration::from_secs(2));
    let requests = env.api.requests_total();
    let idle_cpu = cpu_percent(pid, windows.idle);
    let idle_requests = env.api.requests_total() - requests;
    let idle_requests_per_min = idle_requests as f64 * 60.0 / windows.idle.as_secs_f64();
    let rss_mib = load::rss_bytes(pid) as f64 / f64::from(1 << 20);
    let api = env.api.writer();
    let targets = if selected > 0 {
        0..selected
    } else {
        0..remote_pods
    };
    let churn = |per_second| {
        if targets.is_empty() {
            return cpu_percent(pid, windows.churn);
        }
        let churn = Churn::start(api.clone(), targets.clone(), selected, per_second);
        let cpu = cpu_percent(pid, windows.churn);
        let changes = churn.stop();
        eprintln!("bench:   {changes} changes at {per_second}/s: daemon {cpu:.2}% of a core");
        cpu
    };
    let churn_50 = churn(50);
    let churn_500 = (selected == 0).then(|| churn(500));
    let capture = capture_latency(&mut env, &daemon);
    ClusterRow {
        remote_pods,
        selected,
        idle_cpu,
        churn_50,
        churn_500,
        rss_mib,
        capture,
        idle_requests_per_min,
    }
}
