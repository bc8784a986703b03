//! `cargo xtask bench`: dnsproxy side by side with a floor responder, dnsmasq, unbound
//! and an iptables REDIRECT, in one run, inside network namespaces of its own (nothing
//! is sent outside them). Prints a table and the ratios the performance goals are
//! stated in, and writes them as JSON under `target/bench/`.
//!
//! `bench [--quick] [--out DIR]` runs the comparison; `floor ADDR` and
//! `probe OP ADDR N` are the helper processes it starts.
use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use dnsproxy_e2e::{Daemon, NodeEnv, Resource, TestEnv, privileged};

mod autopath;
mod cluster;
mod dnsperf;
mod ebpf;
mod report;
mod scale;
mod servers;

use dnsperf::Measured;
use servers::{NAMES, forwarded_name, table_name};

/// Where the helper servers listen in the bench netns.
const FLOOR: &str = "127.0.0.1:5300";
const DNSMASQ: &str = "127.0.0.1:5301";
const UNBOUND: &str = "127.0.0.1:5302";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("floor") => servers::serve_floor(&args[1]),
        Some("probe") => ebpf::run_probe(&args[1], &args[2], args[3].parse().unwrap()),
        _ => bench(&args),
    }
}

fn bench(args: &[String]) {
    let quick = args.iter().any(|a| a == "--quick");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map_or_else(|| PathBuf::from("target/bench"), PathBuf::from);
    // `--only servers|scale|cluster|autopath`: one part of the bench (the others are skipped).
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str);
    let part = |name: &str| only.is_none_or(|o| o == name);
    assert!(privileged(), "the bench needs root, cgroup v2 and BPF");
    let (secs, rounds) = if quick { (1, 1) } else { (3, 5) };
    let (rows, costs) = if part("servers") {
        compare(secs, rounds, quick)
    } else {
        (Vec::new(), Vec::new())
    };
    let mut scales = Vec::new();
    if part("scale") {
        for (shape, hosts) in scale::rows() {
            eprintln!("bench: {hosts} hosts, {} ...", shape.label());
            scales.push(scale::row(shape, hosts, secs));
        }
    }
    let mut clusters = Vec::new();
    if part("cluster") {
        let windows = if quick {
            cluster::Windows {
                idle: Duration::from_secs(3),
                churn: Duration::from_secs(2),
            }
        } else {
            cluster::Windows {
                idle: Duration::from_secs(20),
                churn: Duration::from_secs(10),
            }
        };
        for (remote, selected) in cluster::rows() {
            eprintln!("bench: node mode, {remote} pods on other nodes, {selected} selected ...");
            clusters.push(cluster::row(remote, selected, windows));
        }
    }
    let autopath = if part("autopath") {
        eprintln!("bench: autopath, glibc lookups of external names from two pods ...");
        autopath::rows(secs, rounds)
    } else {
        Vec::new()
    };
    let report = report::Report {
        quick,
        rounds,
        rows,
        costs,
        scales,
        clusters,
        autopath,
    };
    print!("{}", report.text());
    std::fs::create_dir_all(&out).expect("create the bench output directory");
    let file = out.join("bench.json");
    std::fs::write(&file, serde_json::to_string_pretty(&report.json()).unwrap()).unwrap();
    println!("\nwritten: {}", file.display());
}

/// The servers that answer the [`NAMES`] table names, side by side: each round runs
/// every one of them once, so that a noisy moment of the machine hits one round of all
/// of them rather than all rounds of one.
const ROWS: [&str; 7] = [
    "floor responder",
    "dnsmasq",
    "unbound",
    "dnsproxy, direct",
    "dnsproxy, eBPF redirect",
    "dnsproxy, iptables REDIRECT",
    "dnsproxy, cache hits",
];

/// The side-by-side rows (median of `rounds`), the cold-forwarding row, and the eBPF
/// costs, all in one netns.
fn compare(
    secs: u64,
    rounds: usize,
    quick: bool,
) -> (Vec<(&'static str, Measured)>, Vec<ebpf::PathCost>) {
    let env = TestEnv::with_registry(&registry());
    env.netns.add_addr("203.0.113.10/32");
    let names = names_file(&env.dir, "table.txt", table_name);
    let forwarded = names_file(&env.dir, "forwarded.txt", forwarded_name);
    let dnsmasq = servers::dnsmasq(&env.netns, &env.dir, DNSMASQ.parse().unwrap());
    let floor = servers::floor(&env.netns, FLOOR.parse().unwrap());
    let unbound = servers::unbound(&env.netns, &env.dir, UNBOUND.parse().unwrap());
    for s in [&floor, &dnsmasq, &unbound] {
        servers::wait_answering(&env.netns, s.addr, &table_name(0));
        eprintln!("bench: {} answers on {}", s.name, s.addr);
    }
    let daemon = start_daemon(&env, &[]);
    let uncaptured = || in_netns(&env);
    let captured = || in_cgroup(&env);
    let direct = ("127.0.0.1", 15053);
    let cluster = ("10.96.0.10", 53);
    // Warm the cache once; the cache row then measures hits.
    dnsperf::dnsperf(&uncaptured, direct, &forwarded, 1, None);
    let mut samples: Vec<Vec<Measured>> = vec![Vec::new(); ROWS.len()];
    for round in 1..=rounds {
        eprintln!("bench: round {round} of {rounds} ...");
        for (row, samples) in ROWS.iter().zip(&mut samples) {
            let (prefix, server, file, pid): (&dyn Fn() -> Command, _, _, _) = match *row {
                "floor responder" => (&uncaptured, port_of(&floor), &names, floor.pid()),
                "dnsmasq" => (&uncaptured, port_of(&dnsmasq), &names, dnsmasq.pid()),
                "unbound" => (&uncaptured, port_of(&unbound), &names, unbound.pid()),
                "dnsproxy, direct" => (&uncaptured, direct, &names, daemon.pid()),
                "dnsproxy, eBPF redirect" => (&captured, cluster, &names, daemon.pid()),
                "dnsproxy, iptables REDIRECT" => (&uncaptured, cluster, &names, daemon.pid()),
                _ => (&uncaptured, direct, &forwarded, daemon.pid()),
            };
            let iptables = row.contains("iptables");
            if iptables {
                iptables_redirect(&env, "-A");
            }
            samples.push(dnsperf::measure(prefix, server, file, pid, secs));
            if iptables {
                iptables_redirect(&env, "-D");
            }
        }
    }
    let mut rows: Vec<(&'static str, Measured)> = ROWS
        .iter()
        .zip(&samples)
        .map(|(row, samples)| (*row, dnsperf::median(samples)))
        .collect();
    eprintln!("bench: eBPF programs ...");
    let probe = || {
        let mut cmd = in_cgroup(&env);
        cmd.arg(std::env::current_exe().expect("own path"));
        cmd
    };
    let runs = if quick { 20_000 } else { 200_000 };
    let mut costs = ebpf::measure(&env.cgroup.path, &probe, runs, &ebpf::LOCAL_PATHS);
    drop(daemon);
    eprintln!("bench: eBPF programs, node mode ...");
    costs.extend(node_costs(runs));
    eprintln!("bench: forwarding without a cache ...");
    let cold = start_daemon(&env, &["--cache-size", "0"]);
    rows.push((
        "dnsproxy, forwarding to dnsmasq (no cache)",
        dnsperf::measure(&uncaptured, direct, &forwarded, cold.pid(), secs),
    ));
    (rows, costs)
}

/// The node-mode DNS redirect's cost: a node-mode daemon (fake API server) and one
/// captured pod, whose process runs the probe.
fn node_costs(runs: u64) -> Vec<ebpf::PathCost> {
    let mut env = NodeEnv::new(&[("bench", Some("enabled")), ("other", Some("enabled"))]);
    // 240.240.1.1: everyone's. 240.240.1.2: bench's own only. 240.240.1.3: everyone's
    // (third's), and other's own in other's view.
    let entry = |name: &str, ns: &str, vip: &str, export_to: &str, created: &str| {
        serde_json::json!({"metadata": {"name": name, "namespace": ns, "creationTimestamp": created},
               "spec": {"hosts": [format!("{name}.example")], "addresses": [vip], "exportTo": [export_to],
                        "resolution": "STATIC", "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}],
                        "endpoints": [{"address": "203.0.113.10"}]}})
    };
    env.api.apply_many(
        Resource::ServiceEntries,
        [
            entry(
                "shared",
                "bench",
                "240.240.1.1",
                "*",
                "2024-01-01T00:00:00Z",
            ),
            entry("own", "bench", "240.240.1.2", ".", "2024-01-01T00:00:00Z"),
            entry(
                "private",
                "other",
                "240.240.1.3",
                ".",
                "2020-01-01T00:00:00Z",
            ),
            entry(
                "public",
                "third",
                "240.240.1.3",
                "*",
                "2024-01-01T00:00:00Z",
            ),
        ],
    );
    let pod = env.add_pod("probe", "bench", &[]);
    let _peer = env.add_pod("peer", "other", &[]);
    let daemon = env.start_daemon(&[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !daemon.maps_json().contains("\"scoped\": true") {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            daemon.maps_json()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let pod = &env.pods[pod];
    // The backend exists (nothing listens: each connect is refused at once).
    pod.netns.add_addr("203.0.113.10/32");
    let probe = || {
        let mut cmd = pod.netns.command(dnsproxy_e2e::dnsproxy_bin());
        cmd.args(["exec", "--cgroup"])
            .arg(&pod.cgroup.path)
            .arg("--")
            .arg(std::env::current_exe().expect("own path"));
        cmd
    };
    ebpf::measure(&env.root.path, &probe, runs, &ebpf::NODE_PATHS)
}

/// A helper server's address for dnsperf.
fn port_of(server: &servers::Server) -> (&'static str, u16) {
    ("127.0.0.1", server.addr.port())
}

/// The bench's registry: [`NAMES`] auto-allocated hosts and one explicit VIP (the eBPF
/// VIP path), all backed by 203.0.113.10 inside the netns.
fn registry() -> String {
    let hosts: Vec<String> = (0..NAMES).map(table_name).collect();
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: bench}}\n\
         spec:\n  hosts: [{}]\n  ports: [{{number: 443, name: tls, protocol: TLS}}]\n  \
         resolution: STATIC\n  endpoints: [{{address: 203.0.113.10}}]\n---\n\
         apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: vip}}\n\
         spec:\n  hosts: [vip.example]\n  addresses: [240.240.1.1]\n  \
         ports: [{{number: 443, name: tls, protocol: TLS}}]\n  resolution: STATIC\n  \
         endpoints: [{{address: 203.0.113.10}}]\n",
        hosts.join(", ")
    )
}

/// A dnsperf input file of the [`NAMES`] names `name` gives, type A.
fn names_file(dir: &Path, file: &str, name: fn(usize) -> String) -> PathBuf {
    let path = dir.join(file);
    let mut f = std::fs::File::create(&path).unwrap();
    for i in 0..NAMES {
        writeln!(f, "{} A", name(i)).unwrap();
    }
    path
}

/// The release daemon in `env`, forwarding to dnsmasq, with only warnings and the
/// start-up lines logged; returns once every VIP is translatable.
fn start_daemon(env: &TestEnv, extra: &[&str]) -> Daemon {
    let mut opts = env.daemon_options();
    opts.env.push(("RUST_LOG".into(), "info".into()));
    opts.extra_args.extend(
        ["--upstream", DNSMASQ]
            .iter()
            .chain(extra)
            .map(|s| (*s).to_owned()),
    );
    let daemon = Daemon::start(opts);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !daemon.log_text().contains("VIP translation maps updated") {
        assert!(
            std::time::Instant::now() < deadline,
            "VIPs never translated"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    daemon
}

/// A command prefix that runs in the bench netns, outside the captured cgroup.
fn in_netns(env: &TestEnv) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", env.netns.path.display()));
    cmd
}

/// A command prefix that runs in the bench netns and the captured cgroup.
fn in_cgroup(env: &TestEnv) -> Command {
    let mut cmd = in_netns(env);
    cmd.arg(dnsproxy_e2e::dnsproxy_bin())
        .args(["exec", "--cgroup"])
        .arg(&env.cgroup.path)
        .arg("--");
    cmd
}

/// Adds (`-A`) or deletes (`-D`) the iptables REDIRECT of the cluster DNS to the
/// daemon's port, in the bench netns only (what a sidecar's init container installs).
fn iptables_redirect(env: &TestEnv, op: &str) {
    for proto in ["udp", "tcp"] {
        let mut cmd = in_netns(env);
        cmd.args([
            "iptables",
            "-t",
            "nat",
            op,
            "OUTPUT",
            "-d",
            "10.96.0.10/32",
            "-p",
            proto,
        ])
        .args(["--dport", "53", "-j", "REDIRECT", "--to-ports", "15053"]);
        let out = dnsproxy_e2e::run_with_timeout(&mut cmd, Duration::from_secs(20));
        assert!(
            out.status.success(),
            "iptables {op}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
