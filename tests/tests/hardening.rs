//! Fault injection: the daemon protecting itself and the node. Each test runs in its
//! own netns, with loops bounded in count and time, prints its figures and asserts
//! bounds that do not depend on timing luck.
use std::{
    collections::HashSet,
    net::UdpSocket,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use dnsproxy_e2e::{load::*, *};

/// Four hosts whose VIPs are auto-allocated.
const AUTO: &str = r"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: auto, namespace: default}
spec:
  hosts: [h1.example, h2.example, h3.example, h4.example]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
";

fn vip(env: &TestEnv, host: &str) -> String {
    let out = env.dig(&[host, "A"]);
    let answers = dig_answers(&out);
    assert!(
        answers.len() == 1 && answers[0].starts_with("240.240."),
        "{host}: {}",
        stdout(&out)
    );
    answers[0].clone()
}

fn vips(env: &TestEnv) -> Vec<String> {
    ["h1", "h2", "h3", "h4"]
        .iter()
        .map(|h| vip(env, &format!("{h}.example")))
        .collect()
}

#[test]
fn a_damaged_vip_state_file_keeps_the_vips_it_still_holds() {
    if !privileged() {
        return;
    }
    let _serial = one_at_a_time();
    let env = TestEnv::with_registry(AUTO);
    let state = env.dir.join("state/vips.json");
    let mut daemon = env.start_daemon();
    let first = vips(&env);
    assert!(daemon.stop().success());
    drop(daemon);

    // Truncated in the middle of h3's line: h1 and h2 keep their VIPs.
    let text = std::fs::read_to_string(&state).unwrap();
    let cut = text.find("h3.example").unwrap() + 6;
    std::fs::write(&state, &text[..cut]).unwrap();
    let mut daemon = env.start_daemon();
    let second = vips(&env);
    println!("VIPs before: {first:?}; after truncation: {second:?}");
    assert_eq!(second[..2], first[..2], "surviving VIPs moved");
    let log = daemon.log_text();
    assert!(
        log.contains("VIP state file is damaged") && log.contains(&state.display().to_string()),
        "{log}"
    );
    assert!(daemon.stop().success());
    drop(daemon);

    // Overwritten with garbage: the daemon starts anyway, four distinct VIPs.
    std::fs::write(&state, b"\x00\x01 not json at all").unwrap();
    let _daemon = env.start_daemon();
    let third = vips(&env);
    let distinct: HashSet<&String> = third.iter().collect();
    assert_eq!(distinct.len(), 4, "{third:?}");
    // The file is whole again.
    let rewritten = std::fs::read_to_string(&state).unwrap();
    assert!(rewritten.contains("h4.example"), "{rewritten}");
}

#[test]
fn a_black_holed_upstream_under_a_flood_stays_bounded_and_table_answers_flow() {
    if !privileged() {
        return;
    }
    let _serial = one_at_a_time();
    let env = TestEnv::new();
    let upstream = Upstream::start(
        &env.netns,
        "127.0.0.1:5399".parse().unwrap(),
        Duration::ZERO,
    );
    upstream.black_hole.store(true, Ordering::SeqCst);
    let mut opts = env.daemon_options();
    opts.env.push(("RUST_LOG".into(), "info".into()));
    opts.extra_args
        .extend(["--upstream".into(), "127.0.0.1:5399".into()]);
    let daemon = Daemon::start(opts);
    let pid = daemon.pid();
    let listener: std::net::SocketAddr = "127.0.0.1:15053".parse().unwrap();
    let (fds_idle, rss_idle) = (open_fds(pid), rss_bytes(pid));

    // Unique names, so that neither the cache nor merging helps.
    let flood = Flood::start(
        udp_client(&env.netns, listener),
        FLOOD_RATE,
        FLOOD_FOR,
        |n| query(n as u16, &format!("n{n}.flood.example"), false),
    );
    let sampler = {
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            let (mut f, mut r) = (0, 0);
            while !s.load(Ordering::SeqCst) {
                f = f.max(open_fds(pid));
                r = r.max(rss_bytes(pid));
                std::thread::sleep(Duration::from_millis(100));
            }
            (f, r)
        });
        (stop, handle)
    };
    // A second client asks names from the table meanwhile.
    let probe_sock = udp_client(&env.netns, listener);
    let latencies = probe(
        &probe_sock,
        PROBES,
        FLOOD_FOR / u32::from(PROBES),
        Duration::from_secs(1),
        |i| query(i, "registry.test", false),
        |r| rcode(r) == 0,
    );
    let (sent, rate) = flood.stop();
    sampler.0.store(true, Ordering::SeqCst);
    let (fds_max, rss_max) = sampler.1.join().unwrap();
    let answered = latencies.len() as f64 / f64::from(PROBES) * 100.0;
    let metrics = env.admin("/metrics");
    let overload = metric_sum(&metrics, "result=\"overload\"");
    let dropped = metric_sum(&metrics, "dnsproxy_udp_receive_drops_total");
    println!(
        "black hole + flood: {sent} queries at {rate:.0} qps; table client {answered:.1}% answered, \
         p50 {:?} p99 {:?}; descriptors {fds_idle} idle -> {fds_max} max; RSS {} MiB idle -> {} MiB max; \
         overload SERVFAILs {overload}; dropped at the full receive queue {dropped}",
        percentile(&latencies, 50),
        percentile(&latencies, 99),
        rss_idle >> 20,
        rss_max >> 20,
    );
    assert!(rate >= 20_000.0, "the flood reached only {rate:.0} qps");
    assert!(answered >= 99.0, "table client answered {answered:.1}%");
    // Every in-flight upstream query holds one socket: bounded by --max-inflight.
    assert!(fds_max <= fds_idle + 1024 + 64, "{fds_max} descriptors");
    assert!(
        rss_max <= rss_idle + (64 << 20),
        "RSS {} MiB",
        rss_max >> 20
    );
    assert!(
        overload > 0.0,
        "the bound acted and was counted:\n{metrics}"
    );

    // The upstream comes back: the daemon recovers by itself (the black-holed
    // questions time out and free their slots), and forwards again.
    upstream.black_hole.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric_sum(&env.admin("/metrics"), "dns_upstream_inflight ") > 0.0 {
        assert!(Instant::now() < deadline, "in-flight work drained");
        std::thread::sleep(Duration::from_millis(100));
    }
    let recovered = probe(
        &probe_sock,
        1,
        Duration::ZERO,
        Duration::from_secs(5),
        |_| query(7, "after.flood.example", false),
        |r| rcode(r) == 0,
    );
    assert_eq!(recovered.len(), 1, "forwarding works again");
}

/// Offered load of the floods, and how long they last.
const FLOOD_RATE: u32 = 21_000;
const FLOOD_FOR: Duration = Duration::from_secs(10);
/// Queries the second client asks during a flood, spread over it.
const PROBES: u16 = 500;

/// The sum of the values of every `/metrics` line containing `needle`.
fn metric_sum(metrics: &str, needle: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Raises this process's open-files limit to its hard limit (the test holds 1000
/// connections).
fn raise_nofile() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out-pointer, then a valid rlimit.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit);
    }
}

#[test]
fn stalled_and_slowloris_tcp_clients_cannot_crowd_out_others() {
    use std::{
        io::{Read as _, Write as _},
        net::TcpStream,
    };
    if !privileged() {
        return;
    }
    raise_nofile();
    let env = TestEnv::new();
    let mut opts = env.daemon_options();
    opts.env.push(("RUST_LOG".into(), "info".into()));
    opts.extra_args.extend(
        [
            "--tcp-idle-timeout-ms",
            "2000",
            "--tcp-read-timeout-ms",
            "1000",
            "--tcp-write-timeout-ms",
            "1000",
        ]
        .map(String::from),
    );
    let _daemon = Daemon::start(opts);
    let listener: std::net::SocketAddr = "127.0.0.1:15053".parse().unwrap();

    // 1000 connections: half pipeline 16 queries and never read, half send one byte
    // of a length and nothing more (slowloris).
    let stalled: Vec<TcpStream> = env.netns.within(move || {
        let pipeline: Vec<u8> = (0..16u16)
            .flat_map(|i| {
                let q = query(i, "registry.test", false);
                let mut framed = (q.len() as u16).to_be_bytes().to_vec();
                framed.extend(q);
                framed
            })
            .collect();
        (0..1000)
            .filter_map(|i| {
                let mut s = TcpStream::connect_timeout(&listener, Duration::from_secs(2)).ok()?;
                let _ = if i % 2 == 0 {
                    s.write_all(&pipeline)
                } else {
                    s.write_all(&[0])
                };
                Some(s)
            })
            .collect()
    });
    std::thread::sleep(Duration::from_millis(700));
    let peak = metric_sum(&env.admin("/metrics"), "dns_tcp_connections ");

    // UDP and a fresh TCP client are answered at once.
    let udp = probe(
        &udp_client(&env.netns, listener),
        20,
        Duration::from_millis(10),
        Duration::from_millis(100),
        |i| query(i, "registry.test", false),
        |r| rcode(r) == 0,
    );
    let (tcp_ok, tcp_latency) = env.netns.within(move || {
        let started = Instant::now();
        let mut s = TcpStream::connect(listener).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let q = query(42, "registry.test", false);
        let mut framed = (q.len() as u16).to_be_bytes().to_vec();
        framed.extend(q);
        s.write_all(&framed).unwrap();
        let mut reply = [0u8; 512];
        let ok = s
            .read(&mut reply)
            .is_ok_and(|n| n > 4 && reply[2..4] == [0, 42]);
        (ok, started.elapsed())
    });

    // The stalled ones are reaped by the timeouts.
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut open = peak;
    while open > 1.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        open = metric_sum(&env.admin("/metrics"), "dns_tcp_connections ");
    }
    let metrics = env.admin("/metrics");
    let closed = |reason: &str| {
        metric_sum(
            &metrics,
            &format!("dns_tcp_connections_closed_total{{reason=\"{reason}\"}}"),
        )
    };
    let refused = metric_sum(&metrics, "dns_tcp_connections_refused_total");
    println!(
        "stalled TCP: {} connections opened, {peak} held at once (bound 128 per client); \
         refused {refused}, evicted {}, read timeouts {}, idle {}, write timeouts {}; \
         UDP {}/20 within 100 ms (p99 {:?}); fresh TCP client answered {tcp_ok} in {tcp_latency:?}; \
         {open} open after the timeouts",
        stalled.len(),
        closed("evicted"),
        closed("read_timeout"),
        closed("idle"),
        closed("write_timeout"),
        udp.len(),
        percentile(&udp, 99),
    );
    assert_eq!(stalled.len(), 1000);
    assert!(peak <= 128.0, "{peak} connections held");
    assert_eq!(udp.len(), 20, "UDP answered within 100 ms");
    assert!(
        tcp_ok && tcp_latency < Duration::from_millis(100),
        "fresh TCP client: {tcp_latency:?}"
    );
    assert!(open <= 1.0, "{open} connections still open");
    assert!(
        closed("read_timeout") > 0.0 && closed("idle") + closed("evicted") > 0.0,
        "{metrics}"
    );
    drop(stalled);
}

/// A UDP upstream in `netns` at `addr` answering every question with one TXT record
/// of `size` bytes (TTL one day), until `stop`.
fn txt_upstream(
    netns: &Netns,
    addr: &str,
    size: usize,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let sock = netns.within({
        let addr = addr.to_owned();
        move || UdpSocket::bind(addr).unwrap()
    });
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        let text = vec![b'x'; size];
        while !stop.load(Ordering::SeqCst) {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            let strings: Vec<u8> = text
                .chunks(255)
                .flat_map(|c| [&[c.len() as u8][..], c].concat())
                .collect();
            // TXT, IN, one day, the strings.
            let mut record = vec![0, 16, 0, 1, 0, 1, 0x51, 0x80];
            record.extend_from_slice(&(strings.len() as u16).to_be_bytes());
            record.extend_from_slice(&strings);
            let reply = reply_with(&buf[..n], &record);
            let _ = sock.send_to(&reply, from);
        }
    })
}

/// The cache budget of the cache flood, and how many distinct large answers it sends.
const BUDGET: u64 = 8 << 20;
const NAMES: u64 = 20_000;

#[test]
fn a_cache_flood_of_large_answers_stays_within_the_cache_budget() {
    if !privileged() {
        return;
    }
    let _serial = one_at_a_time();
    let env = TestEnv::new();
    let stop = Arc::new(AtomicBool::new(false));
    let upstream = txt_upstream(&env.netns, "127.0.0.1:5399", 1000, Arc::clone(&stop));
    let mut opts = env.daemon_options();
    opts.env.push(("RUST_LOG".into(), "info".into()));
    opts.extra_args.extend(
        [
            "--upstream",
            "127.0.0.1:5399",
            "--cache-bytes",
            &BUDGET.to_string(),
            "--cache-size",
            "1000000",
        ]
        .map(String::from),
    );
    let daemon = Daemon::start(opts);
    let pid = daemon.pid();
    let listener: std::net::SocketAddr = "127.0.0.1:15053".parse().unwrap();
    // Warm up every path once, then take the idle baseline.
    let warm = udp_client(&env.netns, listener);
    probe(
        &warm,
        20,
        Duration::ZERO,
        Duration::from_secs(1),
        |i| query(i, &format!("w{i}.big.example"), true),
        |_| true,
    );
    let rss_idle = rss_bytes(pid);

    let flood = Flood::start(
        udp_client(&env.netns, listener),
        5000,
        Duration::from_secs(20),
        |n| query(n as u16, &format!("t{n}.big.example"), true),
    );
    let mut rss_max = 0;
    while flood_sent(&env) < NAMES as f64 {
        rss_max = rss_max.max(rss_bytes(pid));
        std::thread::sleep(Duration::from_millis(100));
    }
    let (sent, rate) = flood.stop();
    std::thread::sleep(Duration::from_millis(300));
    rss_max = rss_max.max(rss_bytes(pid));
    let metrics = env.admin("/metrics");
    let (entries, bytes, evictions) = (
        metric_sum(&metrics, "dns_cache_entries "),
        metric_sum(&metrics, "dns_cache_bytes "),
        metric_sum(&metrics, "dns_cache_evictions_total"),
    );
    println!(
        "cache flood: {sent} large TXT answers at {rate:.0} qps; cache holds {entries} answers, \
         {:.1} MiB weighed (budget {} MiB), {evictions} evicted; RSS {:.1} MiB idle -> {:.1} MiB max",
        bytes / f64::from(1 << 20),
        BUDGET >> 20,
        rss_idle as f64 / f64::from(1 << 20),
        rss_max as f64 / f64::from(1 << 20),
    );
    assert!(bytes <= BUDGET as f64 && evictions > 0.0, "{metrics}");
    // The budget weighs answer bytes only; keys, entry overhead, allocator slack and the
    // flood's in-flight buffers come on top: the peak over idle is 7 to 8 MiB in most
    // runs and up to 12.2 in one of ten (the same with the daemon before the
    // cluster-state work), so allow the budget twice. Without the byte budget the 20k
    // answers (over 20 MiB weighed) would still exceed this bound.
    let allowed = rss_idle + 2 * BUDGET;
    assert!(
        rss_max < allowed,
        "RSS {rss_max} over {rss_idle} + 2 x {BUDGET}"
    );
    stop.store(true, Ordering::SeqCst);
    upstream.join().unwrap();
}

/// Queries the daemon forwarded so far (cache misses).
fn flood_sent(env: &TestEnv) -> f64 {
    metric_sum(&env.admin("/metrics"), "dns_cache_misses_total")
}

#[test]
fn one_pod_flooding_forwarded_names_leaves_the_others_their_share() {
    if !privileged() {
        return;
    }
    let _serial = one_at_a_time();
    let mut env = NodeEnv::new(&[("default", None)]);
    let flooder = env.add_pod("flooder", "default", &[("dnsproxy.io/capture", "true")]);
    let neighbour = env.add_pod("neighbour", "default", &[("dnsproxy.io/capture", "true")]);
    // Every forwarded question takes 400 ms upstream: the flooder's would fill every
    // slot of the daemon.
    let _upstream = Upstream::start(
        &env.node,
        "127.0.0.1:5399".parse().unwrap(),
        Duration::from_millis(400),
    );
    let _daemon = env.start_daemon(&["--upstream", "127.0.0.1:5399", "--max-inflight", "256"]);
    let listener: std::net::SocketAddr = "127.0.0.1:15053".parse().unwrap();
    let flood = Flood::start(
        udp_client(&env.pods[flooder].netns, listener),
        2000,
        Duration::from_secs(10),
        |n| query(n as u16, &format!("f{n}.flood.example"), false),
    );
    std::thread::sleep(Duration::from_millis(500));
    let theirs = probe(
        &udp_client(&env.pods[neighbour].netns, listener),
        20,
        Duration::from_millis(50),
        Duration::from_secs(2),
        |i| query(i, &format!("n{i}.calm.example"), false),
        |r| rcode(r) == 0,
    );
    let (sent, rate) = flood.stop();
    let metrics = env.metrics();
    let overload = |pod: &str| {
        metric_sum(
            &metrics,
            &format!("result=\"overload\",namespace=\"default\",pod=\"{pod}\""),
        )
    };
    println!(
        "unfair client: the flooder sent {sent} forwarded names at {rate:.0} qps, {} refused (overload); \
         the neighbour's forwarded queries: {}/20 answered, p99 {:?}, {} refused",
        overload("flooder"),
        theirs.len(),
        percentile(&theirs, 99),
        overload("neighbour"),
    );
    assert!(
        overload("flooder") > 0.0,
        "the flooder hit its share:\n{metrics}"
    );
    assert_eq!(theirs.len(), 20, "the neighbour kept its share");
    assert!(overload("neighbour") < 1.0, "the neighbour was refused");
}

/// A UDP flood through the redirect: `rate` queries a second for `registry.test` to the
/// cluster DNS for `secs`, from Python inside the captured cgroup; prints its rate.
const REDIRECT_FLOOD: &str = r"
import socket, struct, sys, time
rate, secs = int(sys.argv[1]), float(sys.argv[2])
q = bytes.fromhex('0000010000010000000000000872656769737472790474657374000001000001')
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
n, t0 = 0, time.time()
while time.time() - t0 < secs:
    due = int((time.time() - t0) * rate)
    while n < due:
        try:
            s.sendto(struct.pack('>H', n & 0xffff) + q[2:], ('10.96.0.10', 53))
        except BlockingIOError:
            pass
        n += 1
    try:
        while True:
            s.recv(4096)
    except BlockingIOError:
        pass
    time.sleep(0.001)
print(int(n / (time.time() - t0)))
";

/// glibc lookups in a loop for `secs`: prints how many succeeded and failed.
const GETENT_LOOP: &str = r#"end=$(($(date +%s) + $1)); ok=0; fail=0
while [ "$(date +%s)" -lt "$end" ]; do
  if getent hosts registry.test >/dev/null; then ok=$((ok + 1)); else fail=$((fail + 1)); fi
done
echo "$ok $fail""#;

/// How long the load runs in the SIGKILL and restart tests, and when the daemon goes.
const LOAD_SECS: u64 = 8;
const STOP_AFTER: Duration = Duration::from_secs(3);

/// Load through the redirect: one flood, two glibc lookup loops.
struct RedirectLoad {
    flood: std::process::Child,
    lookups: Vec<std::process::Child>,
}

impl RedirectLoad {
    fn start(env: &TestEnv) -> Self {
        // glibc retries a lost query after a second, as a pod's resolver does.
        env.write_resolv_conf("nameserver 10.96.0.10\noptions timeout:1 attempts:3\n");
        let secs = LOAD_SECS.to_string();
        let flood = env
            .captured_with_resolv_conf_command(&["python3", "-c", REDIRECT_FLOOD, "6000", &secs])
            .spawn()
            .unwrap();
        let lookups = (0..2)
            .map(|_| {
                env.captured_with_resolv_conf_command(&["sh", "-c", GETENT_LOOP, "sh", &secs])
                    .spawn()
                    .unwrap()
            })
            .collect();
        RedirectLoad { flood, lookups }
    }

    /// Waits for the end; returns (flood rate, lookups that succeeded, that failed).
    fn finish(self) -> (u64, u64, u64) {
        let rate = stdout(&self.flood.wait_with_output().unwrap())
            .trim()
            .parse()
            .unwrap_or(0);
        let (mut ok, mut failed) = (0, 0);
        for child in self.lookups {
            let out = stdout(&child.wait_with_output().unwrap());
            let mut counts = out
                .split_whitespace()
                .map(|n| n.parse::<u64>().unwrap_or(0));
            ok += counts.next().unwrap_or(0);
            failed += counts.next().unwrap_or(u64::MAX / 4);
        }
        (rate, ok, failed)
    }
}

#[test]
fn sigkill_under_load_every_lookup_succeeds_by_the_proxy_or_fail_open() {
    if !privileged() {
        return;
    }
    let _serial = one_at_a_time();
    let env = TestEnv::new();
    let mut daemon = env.start_daemon();
    let fail_open_before = daemon.counter("fail_open");
    let load = RedirectLoad::start(&env);
    std::thread::sleep(STOP_AFTER);
    daemon.kill();
    let (rate, ok, failed) = load.finish();
    let fail_open = daemon.counter("fail_open") - fail_open_before;
    let redirected = daemon.counter("redirected");
    println!(
        "SIGKILL under load: flood {rate} qps through the redirect; lookups {ok} succeeded, \
         {failed} failed; redirected {redirected}, then fail-open {fail_open}"
    );
    assert!(rate >= 5000, "the flood reached only {rate} qps");
    assert!(ok > 0);
    assert_eq!(failed, 0, "lookups failed = 0");
    assert!(fail_open > 0, "the fail-open path answered after the kill");
}

#[test]
fn restart_under_load_every_lookup_succeeds() {
    if !privileged() {
        return;
    }
    let _serial = one_at_a_time();
    let env = TestEnv::new();
    let mut daemon = env.start_daemon();
    let load = RedirectLoad::start(&env);
    std::thread::sleep(STOP_AFTER);
    assert!(daemon.stop().success());
    drop(daemon);
    let daemon = env.start_daemon();
    let (rate, ok, failed) = load.finish();
    let redirected = daemon.counter("redirected");
    println!(
        "restart under load: flood {rate} qps; lookups {ok} succeeded, {failed} failed; \
         the new daemon redirected {redirected}"
    );
    assert!(rate >= 5000, "the flood reached only {rate} qps");
    assert_eq!(failed, 0, "lookups failed = 0");
    assert!(redirected > 0, "the new daemon took over");
}
