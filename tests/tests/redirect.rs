//! The DNS redirect end to end: real kernel programs, the real daemon, real clients.
//! Each test runs in its own netns + cgroup (see the harness in `tests/src/lib.rs`).
use std::time::Duration;

use dnsproxy_e2e::*;

const PY_QUERY: &str = r#"
import socket, struct, sys
def query(name, qtype=1, qid=0x4242):
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\x00" + struct.pack(">HH", qtype, 1)
def last_a(reply):
    return socket.inet_ntoa(reply[-4:])
"#;

fn python(env: &TestEnv, body: &str) -> String {
    env.python(&format!("{PY_QUERY}\n{body}"), false)
}

#[test]
fn dig_udp_and_tcp_are_answered_by_dnsproxy_as_if_from_the_cluster_dns() {
    if !privileged() {
        return;
    }
    let env = TestEnv::new();
    let daemon = env.start_daemon();

    let udp = env.dig(&["registry.test", "A"]);
    assert_eq!(dig_answers(&udp), ["240.240.1.1"], "{}", stdout(&udp));
    assert!(
        stdout(&udp).contains(" aa "),
        "authoritative local answer: {}",
        stdout(&udp)
    );
    assert_eq!(
        dig_server(&udp),
        ";; SERVER: 10.96.0.10#53(10.96.0.10) (UDP)"
    );

    let tcp = env.dig(&["+tcp", "registry.test", "A"]);
    assert_eq!(dig_answers(&tcp), ["240.240.1.1"], "{}", stdout(&tcp));
    assert_eq!(
        dig_server(&tcp),
        ";; SERVER: 10.96.0.10#53(10.96.0.10) (TCP)"
    );

    assert_eq!(env.fake.queries(), 0, "the fake cluster DNS saw nothing");
    assert!(daemon.counter("redirected") >= 2);
    assert!(daemon.counter("restored") >= 1);
    let log = daemon.log_text();
    assert!(
        log.contains("question=registry.test.") && log.contains("found=true"),
        "debug log of target dns shows the query: {log}"
    );
}

#[test]
fn ipv6_and_dual_stack_mapped_destinations_are_redirected() {
    if !privileged() {
        return;
    }
    let env = TestEnv::new();
    let daemon = env.start_daemon();

    let v6 = env.captured(&[
        "dig",
        "+time=3",
        "+tries=1",
        "@fd00::10",
        "registry.test",
        "AAAA",
    ]);
    assert_eq!(dig_answers(&v6), ["2001:2::1:1"], "{}", stdout(&v6));
    assert_eq!(dig_server(&v6), ";; SERVER: fd00::10#53(fd00::10) (UDP)");

    let v6tcp = env.captured(&[
        "dig",
        "+tcp",
        "+time=3",
        "+tries=1",
        "@fd00::10",
        "registry.test",
        "A",
    ]);
    assert_eq!(dig_answers(&v6tcp), ["240.240.1.1"], "{}", stdout(&v6tcp));

    let mapped = python(
        &env,
        r#"
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.settimeout(3)
s.sendto(query("registry.test"), ("::ffff:10.96.0.10", 53))
reply, peer = s.recvfrom(4096)
print(peer[0], peer[1], last_a(reply))
"#,
    );
    assert_eq!(mapped, "::ffff:10.96.0.10 53 240.240.1.1");
    assert_eq!(env.fake.queries(), 0);
    assert!(daemon.counter("redirected") >= 3);
}

#[test]
fn python_sockets_see_the_cluster_dns_as_their_peer() {
    if !privileged() {
        return;
    }
    let env = TestEnv::new();
    let _daemon = env.start_daemon();

    let unconnected = python(
        &env,
        r#"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.sendto(query("registry.test"), ("10.96.0.10", 53))
reply, peer = s.recvfrom(4096)
print(peer[0], peer[1], last_a(reply))
"#,
    );
    assert_eq!(unconnected, "10.96.0.10 53 240.240.1.1");

    let connected_udp = python(
        &env,
        r#"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.connect(("10.96.0.10", 53))
peer = s.getpeername()
s.send(query("registry.test"))
reply = s.recv(4096)
print(peer[0], peer[1], last_a(reply))
"#,
    );
    assert_eq!(connected_udp, "10.96.0.10 53 240.240.1.1");

    let tcp = python(
        &env,
        r#"
s = socket.create_connection(("10.96.0.10", 53), timeout=3)
peer = s.getpeername()
q = query("registry.test")
s.sendall(struct.pack(">H", len(q)) + q)
n = struct.unpack(">H", s.recv(2))[0]
reply = b""
while len(reply) < n:
    reply += s.recv(n - len(reply))
print(peer[0], peer[1], last_a(reply))
"#,
    );
    assert_eq!(tcp, "10.96.0.10 53 240.240.1.1");
    assert_eq!(env.fake.queries(), 0);
}

#[test]
fn glibc_getent_resolves_through_dnsproxy() {
    if !privileged() {
        return;
    }
    let env = TestEnv::new();
    let daemon = env.start_daemon();

    // v4.registry.test has no AAAA: glibc gets NODATA for AAAA and uses the A answer.
    let out = env.captured_getent(&["hosts", "v4.registry.test"]);
    assert!(
        out.status.success(),
        "getent: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout(&out).starts_with("240.240.1.2 "), "{}", stdout(&out));

    let out = env.captured_getent(&["ahostsv4", "registry.test"]);
    assert!(stdout(&out).starts_with("240.240.1.1 "), "{}", stdout(&out));
    assert_eq!(env.fake.queries(), 0);
    assert!(daemon.counter("redirected") >= 2);
}

#[test]
fn unknown_names_are_forwarded_to_the_cluster_dns() {
    if !privileged() {
        return;
    }
    let env = TestEnv::new();
    let daemon = env.start_daemon();

    let out = env.dig(&["elsewhere.test", "A"]);
    assert_eq!(dig_answers(&out), [FAKE_A], "{}", stdout(&out));
    assert_eq!(
        dig_server(&out),
        ";; SERVER: 10.96.0.10#53(10.96.0.10) (UDP)"
    );
    assert!(!stdout(&out).contains(" aa "), "relayed, not authoritative");
    assert_eq!(env.fake.queries(), 1, "dnsproxy forwarded exactly once");
    assert!(daemon.counter("redirected") >= 1);
    assert!(daemon.log_text().contains("found=false"));
}

#[test]
fn processes_outside_the_cgroup_are_not_redirected() {
    if !privileged() {
        return;
    }
    let env = TestEnv::new();
    let daemon = env.start_daemon();
    let before = daemon.counter("redirected");

    let out = env.uncaptured(&[
        "dig",
        "+time=3",
        "+tries=1",
        "@10.96.0.10",
        "registry.test",
        "A",
    ]);
    assert_eq!(
        dig_answers(&out),
        [FAKE_A],
        "answered by the fake cluster DNS: {}",
        stdout(&out)
    );
    assert_eq!(env.fake.queries(), 1);
    assert_eq!(daemon.counter("redirected"), before);
}

#[test]
fn with_the_daemon_stopped_captured_processes_fail_open_to_the_cluster_dns() {
    if !privileged() {
        return;
    }
    let env = TestEnv::new();
    let mut opts = env.daemon_options();
    opts.extra_args.push("--keep-pins".into());
    let mut daemon = Daemon::start(opts);
    let answered = env.dig(&["registry.test"]);
    assert_eq!(dig_answers(&answered), ["240.240.1.1"]);

    let status = daemon.stop();
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    assert_eq!(daemon.counter("fail_open"), 0);

    // Programs still attached (pinned links), no listener: the query goes to the real
    // (fake) cluster DNS instead of timing out.
    let out = env.dig(&["registry.test", "A"]);
    assert_eq!(dig_answers(&out), [FAKE_A], "{}", stdout(&out));
    assert_eq!(env.fake.queries(), 1);
    assert!(daemon.counter("fail_open") >= 1, "{}", daemon.maps_json());

    // Another program on the daemon's port (Istio's agent listens on 15053 too) is not
    // the daemon: the query still fails open, and that program never sees it.
    let squatter = env
        .netns
        .within(|| std::net::UdpSocket::bind("127.0.0.1:15053").unwrap());
    squatter.set_nonblocking(true).unwrap();
    let out = env.dig(&["registry.test", "A"]);
    assert_eq!(dig_answers(&out), [FAKE_A], "{}", stdout(&out));
    assert_eq!(env.fake.queries(), 2);
    let mut buf = [0u8; 512];
    assert!(
        squatter.recv(&mut buf).is_err(),
        "a query went to another program's socket"
    );
}

#[test]
fn a_process_of_the_cgroup_in_another_netns_fails_open_there() {
    if !privileged() {
        return;
    }
    let env = TestEnv::new();
    let daemon = env.start_daemon();
    // Local mode captures the whole cgroup, but the daemon listens in its own netns
    // only: a member of the cgroup in another netns (with its own cluster DNS) is
    // left to that DNS, not sent to a loopback where nothing of ours listens.
    let other = Netns::new();
    let other_dns = FakeDns::start(&other);
    let mut cmd = other.command(dnsproxy_bin());
    let dig = ["dig", "+time=3", "+tries=1", "@10.96.0.10", "registry.test"];
    cmd.args(["exec", "--cgroup"])
        .arg(&env.cgroup.path)
        .arg("--")
        .args(dig);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(20));
    assert_eq!(dig_answers(&out), [FAKE_A], "{}", stdout(&out));
    assert_eq!(other_dns.queries(), 1);
    assert!(daemon.counter("fail_open") >= 1, "{}", daemon.maps_json());
    // In the daemon's netns, the same cgroup is redirected as ever.
    assert_eq!(dig_answers(&env.dig(&["registry.test"])), ["240.240.1.1"]);
}

#[test]
fn sigterm_without_keep_pins_detaches_everything() {
    if !privileged() {
        return;
    }
    let env = TestEnv::new();
    let mut daemon = env.start_daemon();
    assert!(daemon.pin_dir.join("links/dnsproxy_connect4").exists());
    assert!(daemon.stop().success());
    assert!(!daemon.pin_dir.exists(), "pins removed on SIGTERM");
    let out = env.dig(&["registry.test", "A"]);
    assert_eq!(
        dig_answers(&out),
        [FAKE_A],
        "no program left to redirect: {}",
        stdout(&out)
    );
}

#[test]
fn the_daemons_own_upstream_queries_are_not_captured() {
    if !privileged() {
        return;
    }
    let env = TestEnv::new();
    // The daemon runs inside the very cgroup it captures: its upstream query to
    // 10.96.0.10:53 must reach the cluster DNS, not loop back into itself.
    let mut opts = env.daemon_options();
    opts.inside_cgroup = true;
    let daemon = Daemon::start(opts);

    let out = env.dig(&["elsewhere.test", "A"]);
    assert_eq!(dig_answers(&out), [FAKE_A], "{}", stdout(&out));
    assert_eq!(env.fake.queries(), 1);
    assert!(daemon.counter("own_traffic") >= 1, "{}", daemon.maps_json());
    assert!(daemon.counter("redirected") >= 1);
}

#[test]
fn clear_errors_for_a_taken_port_and_a_broken_registry() {
    if !privileged() {
        return;
    }
    let env = TestEnv::new();
    let _daemon = env.start_daemon();

    // Second daemon in the same netns: port 15053 is taken.
    let mut cmd = env.netns.command(dnsproxy_bin());
    cmd.args([
        "run",
        "--dns-server",
        "10.96.0.10",
        "--admin",
        "127.0.0.1:15022",
        "--pin-dir",
    ])
    .arg(format!("/sys/fs/bpf/{}", unique_name("p")))
    .arg("--cgroup")
    .arg(&env.cgroup.path);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(20));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("127.0.0.1:15053 (tcp) is already in use"),
        "{err}"
    );

    let broken = env.dir.join("broken.yaml");
    std::fs::write(
        &broken,
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nspec: {hosts: [",
    )
    .unwrap();
    let mut cmd = env.netns.command(dnsproxy_bin());
    cmd.args([
        "run",
        "--dns-server",
        "10.96.0.10",
        "--listen-port",
        "15054",
        "--registry",
    ])
    .arg(&broken)
    .arg("--cgroup")
    .arg(&env.cgroup.path);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(20));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("broken.yaml") && err.contains("document 0"),
        "{err}"
    );

    // More DNS servers than the programs' slots: refused, and no pins stay behind.
    let pin_dir = std::path::PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("p")));
    let servers: Vec<String> = (1..=9).map(|i| format!("10.96.0.{i}")).collect();
    let mut cmd = env.netns.command(dnsproxy_bin());
    cmd.args(["run", "--dns-server", &servers.join(",")])
        .args(["--listen-port", "15055", "--admin", "127.0.0.1:15023"])
        .arg("--pin-dir")
        .arg(&pin_dir)
        .arg("--cgroup")
        .arg(&env.cgroup.path);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(20));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("9 DNS servers to capture, at most 8 are supported"),
        "{err}"
    );
    assert!(
        !pin_dir.exists(),
        "pins left behind in {}",
        pin_dir.display()
    );
}

/// Whether this kernel answers `SO_NETNS_COOKIE` (71), asked of a socket of our own.
fn has_so_netns_cookie() -> bool {
    // SAFETY: a new socket, closed below; getsockopt with out-pointers of the right size.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        let mut cookie = 0u64;
        let mut len = size_of::<u64>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            71,
            (&raw mut cookie).cast(),
            &raw mut len,
        );
        libc::close(fd);
        rc == 0
    }
}

/// `dnsproxy check` names every kernel feature the data path uses with its release;
/// on the kernels we support every required one is there. With netns cookies forced to come
/// from the probe program (what 5.10 does), local mode redirects as usual.
#[test]
fn the_feature_check_passes_here_and_the_netns_cookie_probe_redirects_as_on_5_10() {
    if !privileged() {
        return;
    }
    let out = run_with_timeout(
        std::process::Command::new(dnsproxy_bin()).arg("check"),
        Duration::from_secs(20),
    );
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    // SO_NETNS_COOKIE (5.14) is optional: 5.10 degrades to the probe.
    let sockopt = if has_so_netns_cookie() {
        "SO_NETNS_COOKIE                                  5.14  yes"
    } else {
        "SO_NETNS_COOKIE                                  5.14  no (ENOPROTOOPT): netns cookies come from a probe program"
    };
    for line in [
        "cgroup getpeername hooks                          5.8  yes",
        "SOCKMAP (lookup from programs)                    5.8  yes",
        sockopt,
    ] {
        assert!(text.contains(line), "{line:?} in:\n{text}");
    }
    assert!(
        text.ends_with("every required feature is there\n"),
        "{text}"
    );

    let env = TestEnv::new();
    let mut opts = env.daemon_options();
    opts.extra_args
        .extend(["--netns-cookie".to_owned(), "probe".to_owned()]);
    let daemon = Daemon::start(opts);
    let udp = env.dig(&["registry.test", "A"]);
    assert_eq!(dig_answers(&udp), ["240.240.1.1"], "{}", stdout(&udp));
    let tcp = env.dig(&["+tcp", "registry.test", "A"]);
    assert_eq!(dig_answers(&tcp), ["240.240.1.1"], "{}", stdout(&tcp));
    assert_eq!(env.fake.queries(), 0);
    daemon.assert_logged("netns cookies come from a probe program");
}
