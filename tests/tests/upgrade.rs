//! Upgrades: a second daemon takes the listening sockets over from the running one
//! while clients resolve names only the daemon knows (glibc loops and a UDP sender
//! through the redirect), in node mode (a captured pod, fake API server) and in local
//! mode. With a handoff nothing reaches the fail-open path and every answer is the
//! daemon's; with the old daemon killed instead, the fail-open path covers the gap
//! and the new daemon adopts the pins.
use std::{
    path::PathBuf,
    process::{Child, Command},
    time::{Duration, Instant},
};

use dnsproxy_e2e::*;
use serde_json::json;

/// UDP queries for `name` at `rate` a second for `secs` to the cluster DNS; prints
/// how many were sent, answered with `want` (the daemon's answer), answered otherwise,
/// and the rate reached. Replies are counted once per ID; stragglers get 1.5 s.
const SENDER: &str = r"
import socket, struct, sys, time
name, want, rate, secs = sys.argv[1], socket.inet_aton(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
qname = b''.join(bytes([len(l)]) + l.encode() for l in name.split('.')) + b'\0'
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
s.setblocking(False)
sent = ours = other = 0
seen = set()
def drain():
    global ours, other
    while True:
        try:
            r = s.recv(4096)
        except BlockingIOError:
            return
        i = struct.unpack('>H', r[:2])[0]
        if i in seen:
            continue
        seen.add(i)
        if r[3] & 0xf == 0 and r[6:8] != b'\0\0' and want in r[12:]:
            ours += 1
        else:
            other += 1
t0 = time.time()
while time.time() - t0 < secs:
    due = int((time.time() - t0) * rate)
    while sent < due:
        q = struct.pack('>HHHHHH', sent & 0xffff, 0x0100, 1, 0, 0, 0) + qname + struct.pack('>HH', 1, 1)
        try:
            s.sendto(q, ('10.96.0.10', 53))
        except OSError:
            pass
        sent += 1
    drain()
    time.sleep(0.001)
end = time.time() + 1.5
while time.time() < end:
    drain()
    time.sleep(0.01)
print(sent, ours, other, int(sent / secs))
";

/// glibc lookups of `$2` in a loop for `$1` seconds: prints how many returned `$3`
/// (the daemon's address), another address, or nothing.
const GETENT_LOOP: &str = r#"end=$(($(date +%s) + $1)); ours=0; other=0; failed=0
while [ "$(date +%s)" -lt "$end" ]; do
  if out=$(getent ahostsv4 "$2"); then
    case "$out" in *"$3"*) ours=$((ours + 1));; *) other=$((other + 1));; esac
  else failed=$((failed + 1)); fi
done
echo "$ours $other $failed""#;

const LOAD_SECS: u64 = 8;
const RATE: u32 = 2500;
/// When the old daemon goes (is taken over or killed), into the load.
const SWITCH_AFTER: Duration = Duration::from_millis(2500);

/// The load's length, rate and switch time for this machine's [`time_scale`]: in an
/// emulated VM as many queries over a longer time.
fn load_secs() -> u64 {
    LOAD_SECS * u64::from(time_scale())
}

fn rate() -> u32 {
    RATE / time_scale()
}

/// UDP datagrams the kernel dropped in the current netns because a socket's receive
/// buffer was full (`Udp: RcvbufErrors` of /proc/net/snmp), read by `cat` run as
/// `captured` runs it.
fn rcvbuf_errors(captured: &impl Fn(&[&str]) -> Command) -> u64 {
    let out = run_with_timeout(
        &mut captured(&["cat", "/proc/net/snmp"]),
        Duration::from_secs(10),
    );
    let text = stdout(&out);
    let mut udp = text.lines().filter(|l| l.starts_with("Udp: "));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// What the clients saw.
#[derive(Debug, Default)]
struct Seen {
    sent: u64,
    udp_ours: u64,
    udp_other: u64,
    rate: u64,
    lookups_ours: u64,
    lookups_other: u64,
    lookups_failed: u64,
    /// Of the lost queries, those a full socket receive buffer dropped (a daemon that
    /// could not keep up, not one that was gone).
    rcvbuf_errors: u64,
}

/// One UDP sender and two glibc loops, running.
struct Load {
    sender: Child,
    lookups: Vec<Child>,
}

impl Load {
    /// `captured(args)` is the command that runs `args` as a captured client.
    fn start(captured: impl Fn(&[&str]) -> Command, name: &str, want: &str) -> Self {
        let secs = load_secs().to_string();
        let sender = captured(&[
            "python3",
            "-c",
            SENDER,
            name,
            want,
            &rate().to_string(),
            &secs,
        ])
        .spawn()
        .unwrap();
        let lookups = (0..2)
            .map(|_| {
                captured(&["sh", "-c", GETENT_LOOP, "sh", &secs, name, want])
                    .spawn()
                    .unwrap()
            })
            .collect();
        Load { sender, lookups }
    }

    fn finish(self) -> Seen {
        let numbers = |child: Child| -> Vec<u64> {
            stdout(&child.wait_with_output().unwrap())
                .split_whitespace()
                .map(|n| n.parse().unwrap_or(u64::MAX))
                .collect()
        };
        let udp = numbers(self.sender);
        assert_eq!(udp.len(), 4, "the sender failed");
        let mut seen = Seen {
            sent: udp[0],
            udp_ours: udp[1],
            udp_other: udp[2],
            rate: udp[3],
            ..Seen::default()
        };
        for child in self.lookups {
            let n = numbers(child);
            assert_eq!(n.len(), 3, "a lookup loop failed");
            seen.lookups_ours += n[0];
            seen.lookups_other += n[1];
            seen.lookups_failed += n[2];
        }
        seen
    }
}

/// How the old daemon goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Switch {
    /// A second daemon starts and takes the sockets over.
    Handoff,
    /// The old daemon is killed (`SIGKILL`), then a second one starts.
    Kill,
    /// The old daemon gets SIGTERM first (its pod deleted while the new one starts),
    /// waits for a successor, and hands over to the one that starts then.
    TermFirst,
    /// The old daemon is stopped (`SIGSTOP`: hung), then a second one starts: it gets no
    /// answer, kills the old one and starts as after a crash.
    Hang,
}

/// The node of a node-mode test: one captured pod, a `ServiceEntry` only the daemon
/// knows.
const MESH_HOST: &str = "payments.mesh.internal";
const MESH_VIP: &str = "240.240.7.7";

fn node_env() -> (NodeEnv, usize) {
    let mut env = NodeEnv::new(&[("default", Some("enabled"))]);
    env.api.apply(
        Resource::ServiceEntries,
        json!({"metadata": {"name": "payments", "namespace": "default"},
               "spec": {"hosts": [MESH_HOST], "addresses": [MESH_VIP], "resolution": "STATIC",
                        "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}],
                        "endpoints": [{"address": "203.0.113.10"}]}}),
    );
    let pod = env.add_pod("client", "default", &[]);
    std::fs::write(
        env.dir.join("resolv.conf"),
        "nameserver 10.96.0.10\noptions timeout:1 attempts:3\n",
    )
    .unwrap();
    (env, pod)
}

/// Starts the old daemon, the load, switches daemons as `switch` says, and returns
/// what the clients saw with the new daemon (still running) and the fail-open count.
fn upgrade(
    start: impl Fn() -> Daemon,
    captured: impl Fn(&[&str]) -> Command,
    (name, want): (&str, &str),
    switch: Switch,
) -> (Seen, Daemon, u64) {
    let mut old = start();
    let fail_open_before = old.counter("fail_open");
    let rcvbuf_before = rcvbuf_errors(&captured);
    let load = Load::start(&captured, name, want);
    std::thread::sleep(scaled(SWITCH_AFTER));
    match switch {
        Switch::Kill => {
            old.kill();
            std::thread::sleep(Duration::from_millis(500));
        }
        // SAFETY: kill(2) on our child.
        Switch::Hang => unsafe {
            libc::kill(old.pid() as i32, libc::SIGSTOP);
        },
        Switch::TermFirst => {
            old.terminate();
            std::thread::sleep(Duration::from_millis(300));
        }
        Switch::Handoff => {}
    }
    let switched = Instant::now();
    let new = start();
    if switch == Switch::Hang {
        // Killed by the new daemon; its pins are the new daemon's.
        let _ = old.wait_handed_over(Duration::from_secs(10));
    }
    if matches!(switch, Switch::Handoff | Switch::TermFirst) {
        wait_for_log(&new, "handoff complete");
        // Local mode exits by itself; node mode idles until its pod is deleted.
        wait_for_log(&old, "handed over");
        if old.log_text().contains("idle until SIGTERM") {
            assert!(old.stop_and_hand_over().success());
        } else {
            assert!(old.wait_handed_over(Duration::from_secs(10)).success());
        }
        println!(
            "the new daemon started, took over, and the old one exited within {:?}",
            switched.elapsed()
        );
    }
    let mut seen = load.finish();
    seen.rcvbuf_errors = rcvbuf_errors(&captured) - rcvbuf_before;
    let fail_open = new.counter("fail_open") - fail_open_before;
    (seen, new, fail_open)
}

fn wait_for_log(daemon: &Daemon, needle: &str) {
    let deadline = Instant::now() + scaled(Duration::from_secs(20));
    while !daemon.log_text().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn check_handoff(mode: &str, seen: &Seen, fail_open: u64, metrics: &str) {
    println!(
        "{mode} handoff under load: UDP {} sent at {} qps, {} answered by the daemon, {} otherwise, {} lost \
         ({} dropped by a full socket receive buffer); \
         glibc lookups {} by the daemon, {} otherwise, {} failed; fail-open {fail_open}",
        seen.sent,
        seen.rate,
        seen.udp_ours,
        seen.udp_other,
        seen.sent - seen.udp_ours - seen.udp_other,
        seen.rcvbuf_errors,
        seen.lookups_ours,
        seen.lookups_other,
        seen.lookups_failed,
    );
    assert!(
        seen.rate >= u64::from(rate()) * 4 / 5,
        "the sender reached only {} qps",
        seen.rate
    );
    assert_eq!(fail_open, 0, "queries went to the fail-open path");
    assert_eq!(seen.udp_other, 0, "answers that are not the daemon's");
    assert_eq!(seen.udp_ours, seen.sent, "UDP queries lost");
    assert!(seen.lookups_ours > 0);
    assert_eq!((seen.lookups_other, seen.lookups_failed), (0, 0));
    assert!(
        metrics.contains("dnsproxy_handoffs_total{role=\"received\"} 1"),
        "{metrics}"
    );
}

fn check_fallback(mode: &str, seen: &Seen, fail_open: u64, metrics: &str, log: &str) {
    println!(
        "{mode} SIGKILL under load: UDP {} sent at {} qps, {} answered by the daemon, {} by fail-open; \
         glibc lookups {} by the daemon, {} by fail-open, {} failed; fail-open {fail_open}",
        seen.sent,
        seen.rate,
        seen.udp_ours,
        seen.udp_other,
        seen.lookups_ours,
        seen.lookups_other,
        seen.lookups_failed,
    );
    assert!(fail_open > 0, "the fail-open path covered the gap");
    assert!(
        seen.udp_other > 0,
        "fail-open answers (the fake cluster DNS's)"
    );
    assert_eq!(seen.lookups_failed, 0, "lookups failed");
    assert!(
        log.contains("reason=\"crashed\"") || log.contains("reason=crashed"),
        "{log}"
    );
    assert!(log.contains("adopted pinned maps"), "{log}");
    assert!(
        metrics.contains("dnsproxy_handoff_fallbacks_total{reason=\"crashed\"} 1"),
        "{metrics}"
    );
}

fn check_hang(seen: &Seen, fail_open: u64, metrics: &str, log: &str) {
    println!(
        "local SIGSTOP under load: UDP {} sent, {} answered by the daemon, {} by fail-open, {} lost; \
         glibc lookups {} by the daemon, {} by fail-open, {} failed; fail-open {fail_open}",
        seen.sent,
        seen.udp_ours,
        seen.udp_other,
        seen.sent - seen.udp_ours - seen.udp_other,
        seen.lookups_ours,
        seen.lookups_other,
        seen.lookups_failed,
    );
    assert!(
        log.contains("killed the unresponsive previous daemon"),
        "{log}"
    );
    assert!(log.contains("adopted pinned maps"), "{log}");
    assert!(
        metrics.contains("dnsproxy_handoff_fallbacks_total{reason=\"timeout\"} 1"),
        "{metrics}"
    );
    // The new daemon answers once it is up: the last lookups and queries are its own.
    assert!(seen.udp_ours > 0 && seen.lookups_ours > 0);
}

fn node_upgrade(switch: Switch) {
    let (env, pod) = node_env();
    let pin_dir = PathBuf::from("/sys/fs/bpf").join(unique_name("p"));
    let start = || Daemon::start(env.daemon_options(pin_dir.clone()));
    let p = &env.pods[pod];
    let resolv = env.dir.join("resolv.conf");
    let captured = |args: &[&str]| captured_command(&p.netns, &p.cgroup, &resolv, args);
    let (seen, new, fail_open) = upgrade(start, captured, (MESH_HOST, MESH_VIP), switch);
    match switch {
        Switch::Handoff => {
            check_handoff("node", &seen, fail_open, &env.metrics());
            assert!(
                new.log_text()
                    .contains("serving the sockets the previous daemon handed over"),
                "{}",
                new.log_text()
            );
        }
        Switch::Kill => check_fallback("node", &seen, fail_open, &env.metrics(), &new.log_text()),
        Switch::Hang | Switch::TermFirst => unreachable!("tested in local mode"),
    }
    drop(new);
}

fn local_upgrade(switch: Switch) {
    let env = TestEnv::new();
    env.write_resolv_conf("nameserver 10.96.0.10\noptions timeout:1 attempts:3\n");
    let pin_dir = env.daemon_options().pin_dir;
    let start = || {
        let mut opts = env.daemon_options();
        opts.pin_dir.clone_from(&pin_dir);
        if switch == Switch::TermFirst {
            opts.extra_args.extend([
                "--handoff-wait-ms".into(),
                (5000 * time_scale()).to_string(),
            ]);
        }
        Daemon::start(opts)
    };
    let captured = |args: &[&str]| env.captured_with_resolv_conf_command(args);
    let (seen, new, fail_open) = upgrade(start, captured, ("registry.test", "240.240.1.1"), switch);
    let metrics = env.admin("/metrics");
    match switch {
        Switch::Handoff | Switch::TermFirst => {
            check_handoff("local", &seen, fail_open, &metrics);
        }
        Switch::Kill => check_fallback("local", &seen, fail_open, &metrics, &new.log_text()),
        Switch::Hang => check_hang(&seen, fail_open, &metrics, &new.log_text()),
    }
    drop(new);
}

/// Runs `test` when privileged, one at a time (the tests here load both cores).
fn serially(test: impl FnOnce()) {
    if privileged() {
        let _serial = one_at_a_time();
        test();
    }
}

#[test]
fn node_mode_a_new_daemon_takes_the_pods_sockets_over_without_a_gap() {
    serially(|| node_upgrade(Switch::Handoff));
}

#[test]
fn local_mode_a_new_daemon_takes_the_listener_over_without_a_gap() {
    serially(|| local_upgrade(Switch::Handoff));
}

#[test]
fn node_mode_after_a_sigkill_pods_fail_open_until_the_new_daemon_adopts() {
    serially(|| node_upgrade(Switch::Kill));
}

#[test]
fn local_mode_after_a_sigkill_clients_fail_open_until_the_new_daemon_adopts() {
    serially(|| local_upgrade(Switch::Kill));
}

#[test]
fn local_mode_a_hung_daemon_is_killed_and_the_new_one_adopts() {
    serially(|| local_upgrade(Switch::Hang));
}

#[test]
fn local_mode_a_daemon_told_to_stop_waits_and_hands_over_to_the_next_one() {
    serially(|| local_upgrade(Switch::TermFirst));
}

/// A process that is not dnsproxy (python, run by root as the daemon is) connects to
/// the handoff socket and says hello, three times: each is refused before a byte is
/// read or sent, the pods keep resolving through the daemon, and a real successor
/// still takes over afterwards. The state directory is the daemon's alone (0700).
#[test]
fn node_mode_a_forged_handoff_peer_gets_nothing_and_a_real_successor_still_takes_over() {
    serially(|| {
        let (env, pod) = node_env();
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(unique_name("p"));
        let start = || Daemon::start(env.daemon_options(pin_dir.clone()));
        let old = start();
        env.wait_for_answer(pod, MESH_HOST, MESH_VIP);
        let state_dir = env.daemon_options(pin_dir.clone()).state_dir;
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&state_dir).unwrap().permissions(),
        ) & 0o7777;
        assert_eq!(mode, 0o700, "the state directory is private");
        let forged = Command::new("python3")
            .arg("-c")
            .arg(
                "import socket,struct,sys\n\
                 got = []\n\
                 for _ in range(3):\n\
                 \x20   s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(10)\n\
                 \x20   try:\n\
                 \x20       s.sendall(b'HELO' + struct.pack('>I', 1)); got.append(len(s.recv(65536)))\n\
                 \x20   except (ConnectionResetError, BrokenPipeError): got.append(0)\n\
                 print(sum(got))",
            )
            .arg(state_dir.join("handoff.sock"))
            .output()
            .unwrap();
        assert!(forged.status.success(), "{forged:?}");
        assert_eq!(
            String::from_utf8_lossy(&forged.stdout).trim(),
            "0",
            "the forged successor received nothing"
        );
        let metrics = env.metrics();
        assert!(
            metrics.contains("dnsproxy_handoff_refused_total{reason=\"executable\"} 3"),
            "{metrics}"
        );
        assert!(
            old.log_text().contains("handoff: refused a peer"),
            "{}",
            old.log_text()
        );
        env.wait_for_answer(pod, MESH_HOST, MESH_VIP);
        let new = start();
        wait_for_log(&new, "handoff complete");
        wait_for_log(&old, "handed over");
        env.wait_for_answer(pod, MESH_HOST, MESH_VIP);
        println!(
            "three forged hellos refused; the pod resolved before and after; a real successor took over"
        );
        drop(new);
        drop(old);
    });
}

/// A successor whose Kubernetes API never answers takes the pods' sockets and cannot
/// sync. Meanwhile `/readyz`, answered by either daemon on the shared admin listener,
/// says 503 (the old one has handed over, the new one is not ready). The old daemon is
/// then sent SIGTERM, as a rollout does: the successor gives up after
/// `--handoff-timeout-ms`, closes what it received and exits non-zero, and the pod's
/// lookups fail open to the cluster DNS within 3 s of both being gone instead of
/// vanishing into sockets nobody reads.
#[test]
fn node_mode_a_successor_that_never_syncs_exits_and_pods_fail_open() {
    serially(|| {
        let (env, pod) = node_env();
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(unique_name("p"));
        let timeout_ms = (3000 * time_scale()).to_string();
        let options = || {
            let mut o = env.daemon_options(pin_dir.clone());
            o.extra_args
                .extend(["--handoff-timeout-ms".into(), timeout_ms.clone()]);
            o
        };
        let mut old = Daemon::start(options());
        env.wait_for_answer(pod, MESH_HOST, MESH_VIP);
        env.pods[pod]
            .fake
            .set("fallback.test", &["198.51.100.7"], 30);

        // An API server that accepts connections and never answers.
        let (_udp, silent) = bind_in(&env.node, "127.0.0.1:0".parse().unwrap());
        let kubeconfig = env.dir.join("silent-kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: silent\n  cluster: {{server: \"http://{}\"}}\n\
                 users:\n- name: test\n  user: {{}}\ncontexts:\n- name: silent\n  context: {{cluster: silent, user: test}}\n\
                 current-context: silent\n",
                silent.local_addr().unwrap()
            ),
        )
        .unwrap();
        let mut stuck = options();
        stuck.env.retain(|(k, _)| k != "KUBECONFIG");
        stuck
            .env
            .push(("KUBECONFIG".into(), kubeconfig.display().to_string()));
        let mut new = Daemon::spawn(stuck);
        wait_for_log(&old, "handoff: sockets sent");

        let probes: Vec<String> = (0..10)
            .map(|_| {
                let status = env
                    .node
                    .within(|| http_get(ADMIN_ADDR, "/readyz"))
                    .unwrap_or_default();
                std::thread::sleep(Duration::from_millis(20));
                status.lines().next().unwrap_or_default().to_owned()
            })
            .collect();
        assert!(
            probes.iter().all(|p| p.starts_with("HTTP/1.1 503")),
            "readiness while the handoff is pending: {probes:?}"
        );

        old.terminate();
        let status = new.wait_exit(Duration::from_secs(30));
        assert!(!status.success(), "{status}");
        assert!(
            new.log_text()
                .contains("the first sync did not complete within --handoff-timeout-ms"),
            "{}",
            new.log_text()
        );
        old.wait_exit(Duration::from_secs(30));
        let gone = Instant::now();
        let mut answer = String::new();
        while gone.elapsed() < Duration::from_secs(3) {
            answer = env.dig(pod, "fallback.test");
            if answer == "198.51.100.7" {
                break;
            }
        }
        assert_eq!(
            answer, "198.51.100.7",
            "the pod fails open to the cluster DNS"
        );
        println!(
            "readiness during the pending handoff: {probes:?}; the stuck successor exited ({status}); \
             the pod resolved through the cluster DNS {:?} after both daemons were gone",
            gone.elapsed()
        );
        drop(new);
        drop(old);
    });
}
