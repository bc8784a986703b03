//! Autopath, seen from a glibc client: external names looked up with `getaddrinfo`
//! (Python's `socket.getaddrinfo`, which is glibc's) from two pods of one node-mode
//! daemon with the same resolv.conf (`ndots:5`, three cluster search domains and the
//! node's own), one of them opted out. Every name is asked once first (the daemon's
//! cache is then warm for both), then the pods take turns, so that what is measured is
//! the pod's search walk: one round trip with autopath, five without.
use dnsproxy_e2e::{NodeEnv, stdout};

/// One pod's lookups.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct AutopathRow {
    pub(crate) autopath: bool,
    pub(crate) lookups_per_sec: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    /// Queries the pod's resolver sent per lookup.
    pub(crate) queries_per_lookup: f64,
}

/// The external names looked up.
const NAMES: usize = 50;

/// Looks every name up, again until `secs` seconds have passed; prints `count p50 p99`
/// (seconds).
const LOOKUPS: &str = r#"
import socket, sys, time
names = [f"api-{i}.example.org" for i in range(int(sys.argv[1]))]
end = time.monotonic() + float(sys.argv[2])
took = []
while not took or time.monotonic() < end:
    for name in names:
        t = time.monotonic()
        socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
        took.append(time.monotonic() - t)
took.sort()
print(len(took), took[len(took) // 2], took[len(took) * 99 // 100])
"#;

/// With and without autopath, `rounds` turns each of `secs` seconds.
pub(crate) fn rows(secs: u64, rounds: usize) -> Vec<AutopathRow> {
    let mut env = NodeEnv::new(&[("default", None)]);
    let (resolv, on, off) = env.autopath_pods();
    let mut opts = env.daemon_options(
        std::path::PathBuf::from("/sys/fs/bpf").join(dnsproxy_e2e::unique_name("p")),
    );
    opts.extra_args
        .extend(["--capture-default".to_owned(), "on".to_owned()]);
    let _daemon = dnsproxy_e2e::Daemon::start(opts);
    for pod in [on, off] {
        env.wait_for_answer(pod, "api-0.example.org", dnsproxy_e2e::FAKE_A);
    }
    let run = |pod: usize, secs: f64| -> (usize, f64, f64, f64) {
        let before = env.pod_queries(pod);
        let out = env.in_pod_with_resolv_conf(
            pod,
            &resolv,
            &[
                "python3",
                "-c",
                LOOKUPS,
                &NAMES.to_string(),
                &secs.to_string(),
            ],
        );
        let text = stdout(&out);
        let f: Vec<f64> = text
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        assert_eq!(f.len(), 3, "the lookups did not finish: {text} {out:?}");
        let queries = env.pod_queries(pod) - before;
        (f[0] as usize, f[1], f[2], queries as f64)
    };
    // Every name once, so that the daemon's cache holds them for both pods.
    run(on, 0.0);
    run(off, 0.0);
    // The pods take turns, round after round: a noisy moment hits both.
    let mut turns: [Vec<(usize, f64, f64, f64)>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..rounds {
        turns[0].push(run(on, secs as f64));
        turns[1].push(run(off, secs as f64));
    }
    let mut rows = Vec::new();
    for (turns, autopath) in turns.iter().zip([true, false]) {
        let lookups: usize = turns.iter().map(|t| t.0).sum();
        let queries: f64 = turns.iter().map(|t| t.3).sum();
        let median = |pick: fn(&(usize, f64, f64, f64)) -> f64| {
            let mut v: Vec<f64> = turns.iter().map(pick).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2] * 1000.0
        };
        rows.push(AutopathRow {
            autopath,
            lookups_per_sec: lookups as f64 / (secs as f64 * rounds as f64),
            p50_ms: median(|t| t.1),
            p99_ms: median(|t| t.2),
            queries_per_lookup: queries / lookups.max(1) as f64,
        });
    }
    rows
}
