//! The resolver end to end, through the eBPF redirect: the ASM guide's checks
//! (auto-allocated VIPs, search-suffix CNAMEs), TCP, truncation, NODATA, upstream
//! failover, the cache, registry reloads and VIPs that survive restarts.
use std::time::{Duration, Instant};

use dnsproxy_e2e::*;

/// The ASM guide's registry: two external hosts without addresses (auto-allocated), a
/// `ClusterIP` Service and a headless Service with its `EndpointSlice`, and a host with
/// many addresses for truncation.
const SEED: &str = r"
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: aliyun, namespace: default}
spec:
  hosts: [aliyun.com]
  location: MESH_EXTERNAL
  ports: [{number: 443, name: https, protocol: TLS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: alibabacloud, namespace: default}
spec:
  hosts: [alibabacloud.com]
  location: MESH_EXTERNAL
  ports: [{number: 443, name: https, protocol: TLS}]
  resolution: DNS
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec: {clusterIP: 10.100.0.5, ports: [{port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec: {clusterIP: None, ports: [{port: 5432}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-x1, namespace: default, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
endpoints:
- {addresses: [10.244.0.7], hostname: db-0, conditions: {ready: true}}
- {addresses: [10.244.0.8], hostname: db-1, conditions: {ready: false}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: v4only, namespace: default}
spec: {hosts: [v4only.test], addresses: [240.241.0.9], resolution: STATIC}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: big, namespace: default}
spec:
  hosts: [big.test]
  resolution: STATIC
  addresses: [240.242.0.1, 240.242.0.2, 240.242.0.3, 240.242.0.4, 240.242.0.5, 240.242.0.6, 240.242.0.7, 240.242.0.8,
              240.242.0.9, 240.242.0.10, 240.242.0.11, 240.242.0.12, 240.242.0.13, 240.242.0.14, 240.242.0.15, 240.242.0.16,
              240.242.0.17, 240.242.0.18, 240.242.0.19, 240.242.0.20, 240.242.0.21, 240.242.0.22, 240.242.0.23, 240.242.0.24,
              240.242.0.25, 240.242.0.26, 240.242.0.27, 240.242.0.28, 240.242.0.29, 240.242.0.30, 240.242.0.31, 240.242.0.32,
              240.242.0.33, 240.242.0.34, 240.242.0.35, 240.242.0.36, 240.242.0.37, 240.242.0.38, 240.242.0.39, 240.242.0.40]
";

const POD_RESOLV_CONF: &str = "nameserver 10.96.0.10\n\
search default.svc.cluster.local svc.cluster.local cluster.local\n\
options ndots:5 timeout:2 attempts:1\n";

/// The answer-section lines of dig's output ("name ttl IN type data", whitespace folded).
fn answer_lines(out: &std::process::Output) -> Vec<String> {
    let text = stdout(out);
    let Some(start) = text.find(";; ANSWER SECTION:") else {
        return vec![];
    };
    text[start..]
        .lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

fn vip_of(env: &TestEnv, host: &str) -> String {
    let out = env.dig(&["+short", host, "A"]);
    let vip = stdout(&out).trim().to_owned();
    assert!(vip.starts_with("240.240."), "{host} → {vip:?}");
    vip
}

#[test]
fn seed_scenario_auto_allocated_vips_and_search_suffix_cnames() {
    if !privileged() {
        return;
    }
    let env = TestEnv::with_registry(SEED);
    // The real aliyun.com has IPv4 addresses only (so its IPv6 VIP is not answered).
    env.fake.set("aliyun.com", &["203.0.113.10"], 30);
    let daemon = env.start_daemon();
    env.write_resolv_conf(POD_RESOLV_CONF);
    // The daemon resolved the VIP hosts' backends upstream before it became ready.
    let backend_lookups = env.fake.queries();

    // getent hosts aliyun.com → an address in 240.240.0.0/16.
    let out = env.captured_getent(&["hosts", "aliyun.com"]);
    let line = stdout(&out);
    assert!(
        out.status.success(),
        "getent: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let aliyun_vip = line.split_whitespace().next().unwrap_or("").to_owned();
    assert!(
        aliyun_vip.starts_with("240.240."),
        "getent hosts aliyun.com: {line}"
    );

    // dig alibabacloud.com.default.svc.cluster.local A → CNAME + A 30, AA.
    let out = env.dig(&["alibabacloud.com.default.svc.cluster.local", "A"]);
    let answers = answer_lines(&out);
    assert_eq!(answers.len(), 2, "{}", stdout(&out));
    assert_eq!(
        answers[0],
        "alibabacloud.com.default.svc.cluster.local. 30 IN CNAME alibabacloud.com."
    );
    assert!(
        answers[1].starts_with("alibabacloud.com. 30 IN A 240.240."),
        "{}",
        answers[1]
    );
    assert!(
        stdout(&out).contains("flags: qr aa"),
        "authoritative: {}",
        stdout(&out)
    );
    assert_eq!(
        dig_server(&out),
        ";; SERVER: 10.96.0.10#53(10.96.0.10) (UDP)"
    );

    // The debug log (target dns) shows the query, found=true and the answer.
    let log = daemon.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("question=alibabacloud.com.default.svc.cluster.local."))
        .unwrap_or_else(|| panic!("no log line for the query:\n{log}"));
    assert!(
        line.contains(" dns: ")
            && line.contains("found=true")
            && line.contains("alibabacloud.com."),
        "{line}"
    );

    // Kubernetes names: ClusterIP, short name, headless (ready endpoints only), pod hostname.
    assert_eq!(
        dig_answers(&env.dig(&["reviews.default.svc.cluster.local", "A"])),
        ["10.100.0.5"]
    );
    assert_eq!(dig_answers(&env.dig(&["reviews", "A"])), ["10.100.0.5"]);
    assert_eq!(
        dig_answers(&env.dig(&["db.default.svc.cluster.local", "A"])),
        ["10.244.0.7"]
    );
    assert_eq!(
        dig_answers(&env.dig(&["db-0.db.default.svc.cluster.local", "A"])),
        ["10.244.0.7"]
    );
    // PTR of the VIP.
    let vip = vip_of(&env, "alibabacloud.com");
    let out = env.dig(&["+short", "-x", &vip]);
    assert_eq!(stdout(&out).trim(), "alibabacloud.com.");
    assert_eq!(
        env.fake.queries(),
        backend_lookups,
        "all answered by dnsproxy"
    );
}

#[test]
fn tcp_truncation_and_nodata() {
    if !privileged() {
        return;
    }
    let env = TestEnv::with_registry(SEED);
    let daemon = env.start_daemon();

    let tcp = env.dig(&["+tcp", "aliyun.com", "A"]);
    assert_eq!(
        dig_server(&tcp),
        ";; SERVER: 10.96.0.10#53(10.96.0.10) (TCP)"
    );
    assert!(dig_answers(&tcp)[0].starts_with("240.240."));

    // 40 A records do not fit in 512 bytes: TC, and dig retries over TCP by itself.
    let big = env.dig(&["+noedns", "big.test", "A"]);
    assert!(
        stdout(&big).contains(";; Truncated, retrying in TCP mode."),
        "{}",
        stdout(&big)
    );
    assert_eq!(dig_answers(&big).len(), 40, "{}", stdout(&big));
    assert_eq!(
        dig_server(&big),
        ";; SERVER: 10.96.0.10#53(10.96.0.10) (TCP)"
    );
    // Without the TCP retry: the records that fit in 512 bytes, with TC set.
    let cut = env.dig(&["+noedns", "+ignore", "big.test", "A"]);
    let text = stdout(&cut);
    assert!(text.contains("flags: qr aa tc rd ra;"), "{text}");
    assert_eq!(dig_answers(&cut).len(), (512 - 12 - 14) / 16, "{text}");

    // A known host without the asked family: NOERROR, no answer, SOA in authority.
    let nodata = env.dig(&["v4only.test", "AAAA"]);
    let text = stdout(&nodata);
    assert!(
        text.contains("status: NOERROR") && text.contains("ANSWER: 0, AUTHORITY: 1"),
        "{text}"
    );
    assert!(
        text.contains("IN\tSOA\tns.dnsproxy. hostmaster.dnsproxy."),
        "{text}"
    );
    assert!(daemon.counter("redirected") >= 4);
}

#[test]
fn upstream_failover_servfail_and_cache_hits_in_metrics() {
    if !privileged() {
        return;
    }
    // A registry without DNS-resolved hosts: the only upstream traffic is the test's.
    let env = TestEnv::new();
    // 10.96.0.11:53 accepts queries and never answers: the first upstream is dead.
    let _silent = bind_in(&env.netns, "10.96.0.11:53".parse().unwrap());
    let mut opts = env.daemon_options();
    opts.extra_args = ["--upstream", "10.96.0.11", "--upstream", "10.96.0.10"]
        .map(String::from)
        .to_vec();
    let _daemon = Daemon::start(opts);
    let backend_lookups = env.fake.queries();

    let started = Instant::now();
    let out = env.dig(&["elsewhere.example", "A"]);
    assert_eq!(
        dig_answers(&out),
        [FAKE_A],
        "answered by the second upstream: {}",
        stdout(&out)
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    let again = env.dig(&["elsewhere.example", "A"]);
    assert_eq!(dig_answers(&again), [FAKE_A]);
    assert_eq!(
        env.fake.queries(),
        backend_lookups + 1,
        "the second answer came from the cache"
    );

    let metrics = env.admin("/metrics");
    for want in [
        "dns_cache_hits_total 1",
        "dns_upstream_failures_total{server=\"10.96.0.11:53\",type=\"A\"} 1",
        "dns_upstream_requests_total{server=\"10.96.0.10:53\",type=\"A\"} 1",
        "dns_requests_total{type=\"A\",protocol=\"udp\",result=\"cached\"} 1",
        "dns_requests_total{type=\"A\",protocol=\"udp\",result=\"forwarded\"} 1",
        "dnsproxy_ebpf_decisions_total{decision=\"redirected\"}",
    ] {
        assert!(metrics.contains(want), "missing {want} in\n{metrics}");
    }
}

#[test]
fn servfail_when_every_upstream_is_dead() {
    if !privileged() {
        return;
    }
    let env = TestEnv::new();
    let _silent = bind_in(&env.netns, "10.96.0.11:53".parse().unwrap());
    let mut opts = env.daemon_options();
    opts.extra_args = ["--upstream", "10.96.0.11"].map(String::from).to_vec();
    let _daemon = Daemon::start(opts);
    let started = Instant::now();
    let out = env.dig(&["nowhere.example", "A"]);
    assert!(
        stdout(&out).contains("status: SERVFAIL"),
        "{}",
        stdout(&out)
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "within the upstream timeout, never a hang"
    );
}

#[test]
fn vips_survive_restarts_and_registry_churn_and_reloads_apply_live() {
    if !privileged() {
        return;
    }
    let env = TestEnv::with_registry(SEED);
    let mut daemon = env.start_daemon();
    let before = vip_of(&env, "aliyun.com");
    let ndsz = env.admin("/debug/ndsz");
    assert!(
        ndsz.contains("\"aliyun.com\"") && ndsz.contains(&before),
        "{ndsz}"
    );

    // Other entries come and go (the directory is reloaded live): aliyun.com stays put.
    let extra = env.dir.join("registry/extra.yaml");
    std::fs::write(
        &extra,
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: more}\n\
         spec: {hosts: [a.example, b.example, c.example, new.example], resolution: DNS}\n",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while dig_answers(&env.dig(&["new.example", "A"]))
        .first()
        .is_none_or(|a| !a.starts_with("240.240."))
    {
        assert!(
            Instant::now() < deadline,
            "reload not applied:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(vip_of(&env, "aliyun.com"), before);

    // A broken file: reported with its path, the last good table stays in service.
    std::fs::write(env.dir.join("registry/zz-broken.yaml"), "kind: [").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !daemon.log_text().contains("zz-broken.yaml") {
        assert!(
            Instant::now() < deadline,
            "broken file not reported:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    vip_of(&env, "new.example");
    std::fs::remove_file(env.dir.join("registry/zz-broken.yaml")).unwrap();
    std::fs::remove_file(&extra).unwrap();

    // Restart: the same address from the state directory.
    assert!(daemon.stop().success());
    drop(daemon);
    let _daemon = env.start_daemon();
    assert_eq!(vip_of(&env, "aliyun.com"), before);
}
