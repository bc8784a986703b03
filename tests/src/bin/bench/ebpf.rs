//! eBPF program cost per run, by path, from the kernel's own accounting
//! (`kernel.bpf_stats_enabled`, restored afterwards): a probe process in the captured
//! cgroup drives one path at a time and the bench reads the programs' run time and
//! run count before and after.
use std::{
    net::{SocketAddr, UdpSocket},
    path::Path,
    process::Command,
    time::Duration,
};

use dnsproxy_e2e::{run_with_timeout, stdout};

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Turns the kernel's BPF run-time accounting on until dropped, then back to what it was.
pub(crate) struct StatsOn {
    before: String,
}

impl StatsOn {
    pub(crate) fn new() -> Self {
        let before = std::fs::read_to_string(STATS_SYSCTL).unwrap_or_else(|_| "0".into());
        std::fs::write(STATS_SYSCTL, "1").expect("enable kernel.bpf_stats_enabled");
        StatsOn { before }
    }
}

impl Drop for StatsOn {
    fn drop(&mut self) {
        let _ = std::fs::write(STATS_SYSCTL, self.before.trim());
    }
}

/// One path's cost.
#[derive(Debug, Clone)]
pub(crate) struct PathCost {
    pub(crate) path: &'static str,
    pub(crate) program: &'static str,
    pub(crate) runs: u64,
    pub(crate) ns_per_run: f64,
}

/// The id of the program attached to `cgroup` at `attach_type`.
fn program_id(cgroup: &Path, attach_type: &str) -> u64 {
    let out = run_with_timeout(
        Command::new("bpftool")
            .args(["-j", "cgroup", "show"])
            .arg(cgroup),
        Duration::from_secs(10),
    );
    let list: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("bpftool json");
    list.as_array()
        .into_iter()
        .flatten()
        .find(|p| p["attach_type"] == attach_type)
        .and_then(|p| p["id"].as_u64())
        .unwrap_or_else(|| panic!("no {attach_type} program on {}", cgroup.display()))
}

/// A program's (run time in ns, run count) so far.
fn program_stats(id: u64) -> (u64, u64) {
    let out = run_with_timeout(
        Command::new("bpftool").args(["-j", "prog", "show", "id", &id.to_string()]),
        Duration::from_secs(10),
    );
    let prog: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("bpftool json");
    (
        prog["run_time_ns"].as_u64().unwrap_or(0),
        prog["run_cnt"].as_u64().unwrap_or(0),
    )
}

/// The paths measured: what the probe does, and which program's cost that shows.
const PATHS: [(&str, &str, &str, &str); 5] = [
    (
        "pass (not DNS, not a VIP)",
        "connect",
        "127.0.0.1:9",
        "cgroup_inet4_connect",
    ),
    (
        "DNS redirect (connect)",
        "connect",
        "10.96.0.10:53",
        "cgroup_inet4_connect",
    ),
    (
        "DNS redirect (sendmsg)",
        "sendto",
        "10.96.0.10:53",
        "cgroup_udp4_sendmsg",
    ),
    (
        "VIP translate (TCP connect)",
        "tcpconnect",
        "240.240.1.1:443",
        "cgroup_inet4_connect",
    ),
    (
        "restore (recvmsg)",
        "pingpong",
        "10.96.0.10:53",
        "cgroup_udp4_recvmsg",
    ),
];

/// Runs every path `runs` times from `probe` (a command in the captured cgroup that
/// takes `probe OP ADDR N`).
pub(crate) fn measure(cgroup: &Path, probe: &dyn Fn() -> Command, runs: u64) -> Vec<PathCost> {
    let _stats = StatsOn::new();
    PATHS
        .iter()
        .map(|(path, op, addr, attach)| {
            let id = program_id(cgroup, attach);
            let (t0, c0) = program_stats(id);
            let mut cmd = probe();
            cmd.args(["probe", op, addr, &runs.to_string()]);
            let out = run_with_timeout(&mut cmd, Duration::from_mins(1));
            assert!(
                out.status.success(),
                "probe {op} {addr}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let (t1, c1) = program_stats(id);
            let n = (c1 - c0).max(1);
            PathCost {
                path,
                program: attach,
                runs: c1 - c0,
                ns_per_run: (t1 - t0) as f64 / n as f64,
            }
        })
        .collect()
}

/// `probe` mode: `n` times `op` towards `addr` from this process (in the captured
/// cgroup): `connect` a UDP socket, `tcpconnect`, `sendto` a query, or `pingpong` (send, then wait
/// for the answer).
pub(crate) fn run_probe(op: &str, addr: &str, n: u64) {
    let addr: SocketAddr = addr.parse().expect("probe address");
    let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let query = dnsproxy_e2e::load::query(1, "n0.bench.example", false);
    let mut buf = [0u8; 1500];
    for _ in 0..n {
        match op {
            "connect" => sock.connect(addr).expect("connect"),
            // Refused at once (nothing listens behind the VIP): the hook ran all the same.
            "tcpconnect" => {
                let _ = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1));
            }
            "sendto" => {
                let _ = sock.send_to(&query, addr);
            }
            "pingpong" => {
                sock.send_to(&query, addr).expect("send");
                sock.recv_from(&mut buf).expect("an answer");
            }
            other => panic!("unknown probe {other}"),
        }
    }
}
