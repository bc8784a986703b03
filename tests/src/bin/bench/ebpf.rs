//! eBPF program cost per run, by path, from the kernel's own accounting
//! (`kernel.bpf_stats_enabled`, restored afterwards): a probe process in the captured
//! cgroup drives one path at a time and the bench reads the programs' run time and
//! run count before and after.
use std::{
    net::{SocketAddr, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
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

/// The id of the program named `name` attached to `cgroup` at `attach_type`.
fn program_id(cgroup: &Path, attach_type: &str, name: &str) -> u64 {
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
        .find(|p| p["attach_type"] == attach_type && p["name"] == name)
        .and_then(|p| p["id"].as_u64())
        .unwrap_or_else(|| panic!("no {attach_type} program {name} on {}", cgroup.display()))
}

/// Name of [`EmptyProgram`].
const EMPTY_NAME: &str = "bench_empty";

/// A connect4 program that only returns "allow" (two instructions), attached to the
/// cgroup beside the daemon's while it lives: its cost per run is what the kernel's
/// accounting itself adds (a clock read around every run), the floor under every row.
struct EmptyProgram {
    _program: OwnedFd,
    _link: OwnedFd,
}

impl EmptyProgram {
    fn attach(cgroup: &Path) -> std::io::Result<Self> {
        const BPF_PROG_LOAD: libc::c_long = 5;
        const BPF_LINK_CREATE: libc::c_long = 28;
        const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
        const BPF_CGROUP_INET4_CONNECT: u32 = 10;
        // r0 = 1; exit
        let insns: [u64; 2] = [0x0000_0001_0000_00b7, 0x95];
        let license = c"GPL";
        let mut load = [0u8; 128];
        put(&mut load, 0, &BPF_PROG_TYPE_CGROUP_SOCK_ADDR.to_ne_bytes());
        put(&mut load, 4, &2u32.to_ne_bytes());
        put(&mut load, 8, &(insns.as_ptr() as u64).to_ne_bytes());
        put(&mut load, 16, &(license.as_ptr() as u64).to_ne_bytes());
        put(&mut load, 48, EMPTY_NAME.as_bytes());
        put(&mut load, 68, &BPF_CGROUP_INET4_CONNECT.to_ne_bytes());
        let program = bpf(BPF_PROG_LOAD, &mut load)?;
        let dir = std::fs::File::open(cgroup)?;
        let mut link = [0u8; 64];
        put(&mut link, 0, &(program.as_raw_fd() as u32).to_ne_bytes());
        put(&mut link, 4, &(dir.as_raw_fd() as u32).to_ne_bytes());
        put(&mut link, 8, &BPF_CGROUP_INET4_CONNECT.to_ne_bytes());
        let link = bpf(BPF_LINK_CREATE, &mut link)?;
        Ok(EmptyProgram {
            _program: program,
            _link: link,
        })
    }
}

fn put(attr: &mut [u8], at: usize, bytes: &[u8]) {
    attr[at..at + bytes.len()].copy_from_slice(bytes);
}

/// The bpf(2) command `cmd` with `attr`; the descriptor it returns.
fn bpf(cmd: libc::c_long, attr: &mut [u8]) -> std::io::Result<OwnedFd> {
    // SAFETY: attr is a zeroed bpf_attr prefix of its own length, with the fields the
    // command reads set; the pointers in it (instructions, license) outlive the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
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

/// One measured path: what the probe does, and which program's cost that shows.
pub(crate) struct HookPath {
    pub(crate) name: &'static str,
    op: &'static str,
    addr: &'static str,
    attach_type: &'static str,
    program: &'static str,
}

const fn hook(
    name: &'static str,
    op: &'static str,
    addr: &'static str,
    attach_type: &'static str,
    program: &'static str,
) -> HookPath {
    HookPath {
        name,
        op,
        addr,
        attach_type,
        program,
    }
}

const CONNECT4: &str = "cgroup_inet4_connect";

/// The paths of a local-mode daemon (everything in the cgroup captured).
pub(crate) const LOCAL_PATHS: [HookPath; 7] = [
    hook(
        "empty program (accounting floor)",
        "connect",
        "127.0.0.1:9",
        CONNECT4,
        EMPTY_NAME,
    ),
    hook(
        "pass (not DNS, not a VIP)",
        "connect",
        "127.0.0.1:9",
        CONNECT4,
        "dnsproxy_connect4",
    ),
    hook(
        "DNS redirect (connect)",
        "connect",
        "10.96.0.10:53",
        CONNECT4,
        "dnsproxy_connect4",
    ),
    hook(
        "DNS redirect (connect, new socket)",
        "newconnect",
        "10.96.0.10:53",
        CONNECT4,
        "dnsproxy_connect4",
    ),
    hook(
        "DNS redirect (sendmsg)",
        "sendto",
        "10.96.0.10:53",
        "cgroup_udp4_sendmsg",
        "dnsproxy_sendmsg4",
    ),
    hook(
        "VIP translate (TCP connect)",
        "tcpconnect",
        "240.240.1.1:443",
        CONNECT4,
        "dnsproxy_connect4",
    ),
    hook(
        "restore (recvmsg)",
        "pingpong",
        "10.96.0.10:53",
        "cgroup_udp4_recvmsg",
        "dnsproxy_recvmsg4",
    ),
];

/// The DNS redirect and VIP translation of a node-mode daemon, from a captured pod:
/// the DaemonSet's case, where the pod's netns is looked up in `dp_policy`. The VIP
/// rows: a VIP no namespace sees differently (one `dp_services` lookup), one the pod's
/// namespace has its own entry on (its view first, found), and one another namespace
/// sees differently (its view first, missed, then view 0).
pub(crate) const NODE_PATHS: [HookPath; 5] = [
    hook(
        "DNS redirect (connect, node-mode pod)",
        "connect",
        "10.96.0.10:53",
        CONNECT4,
        "dnsproxy_connect4",
    ),
    hook(
        "DNS redirect (sendmsg, node-mode pod)",
        "sendto",
        "10.96.0.10:53",
        "cgroup_udp4_sendmsg",
        "dnsproxy_sendmsg4",
    ),
    hook(
        "VIP translate (TCP connect, node-mode pod)",
        "tcpconnect",
        "240.240.1.1:443",
        CONNECT4,
        "dnsproxy_connect4",
    ),
    hook(
        "VIP translate (node-mode pod, its view's own)",
        "tcpconnect",
        "240.240.1.2:443",
        CONNECT4,
        "dnsproxy_connect4",
    ),
    hook(
        "VIP translate (node-mode pod, view 0 after a miss)",
        "tcpconnect",
        "240.240.1.3:443",
        CONNECT4,
        "dnsproxy_connect4",
    ),
];

/// Runs every one of `paths` `runs` times from `probe` (a command in a captured cgroup
/// below `cgroup`, where the programs are attached, that takes `probe OP ADDR N`).
pub(crate) fn measure(
    cgroup: &Path,
    probe: &dyn Fn() -> Command,
    runs: u64,
    paths: &[HookPath],
) -> Vec<PathCost> {
    let _stats = StatsOn::new();
    let _empty = paths
        .iter()
        .any(|p| p.program == EMPTY_NAME)
        .then(|| EmptyProgram::attach(cgroup).expect("load and attach an empty program"));
    paths
        .iter()
        .map(|p| {
            let id = program_id(cgroup, p.attach_type, p.program);
            let (t0, c0) = program_stats(id);
            let mut cmd = probe();
            cmd.args(["probe", p.op, p.addr, &runs.to_string()]);
            let out = run_with_timeout(&mut cmd, Duration::from_mins(1));
            assert!(
                out.status.success(),
                "probe {} {}: {}",
                p.op,
                p.addr,
                String::from_utf8_lossy(&out.stderr)
            );
            let (t1, c1) = program_stats(id);
            let n = (c1 - c0).max(1);
            PathCost {
                path: p.name,
                program: p.attach_type,
                runs: c1 - c0,
                ns_per_run: (t1 - t0) as f64 / n as f64,
            }
        })
        .collect()
}

/// `probe` mode: `n` times `op` towards `addr` from this process (in the captured
/// cgroup): `connect` a UDP socket (the same one each time), `newconnect` (a new one
/// each time), `tcpconnect`, `sendto` a query, or `pingpong` (send, then wait
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
            // What a glibc lookup does: a new socket, connected, closed.
            "newconnect" => UdpSocket::bind("0.0.0.0:0")
                .and_then(|s| s.connect(addr))
                .expect("connect a new socket"),
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
