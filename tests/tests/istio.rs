//! Istio's ServiceEntry model, as a user moving from the sidecar expects it: CIDR
//! addresses, wildcards without addresses, and VIPs never shared by two hosts.
use std::time::{Duration, Instant};

use dnsproxy_e2e::{load, *};

const ENTRIES: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: range, namespace: default}
spec:
  hosts: [range.example]
  addresses: [10.20.0.0/16]
  ports: [{number: 5432, name: pg, protocol: TCP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: mixed, namespace: default}
spec:
  hosts: [mixed.example]
  addresses: [10.30.0.0/16, 10.40.0.7/32]
  resolution: STATIC
  endpoints: [{address: 192.0.2.9}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: corp, namespace: default}
spec: {hosts: ["*.corp.example"], resolution: STATIC}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: auto, namespace: default}
spec: {hosts: [auto.example], ports: [{number: 443, name: tls, protocol: TLS}], resolution: DNS}
"#;

fn answer(env: &TestEnv, name: &str) -> (Vec<String>, bool) {
    let out = env.dig(&[name, "A"]);
    let text = stdout(&out);
    (dig_answers(&out), text.contains(" aa "))
}

#[test]
fn cidr_addresses_wildcards_without_addresses_and_vips_never_shared() {
    if !privileged() {
        return;
    }
    let env = TestEnv::with_registry(ENTRIES);
    let daemon = env.start_daemon();

    // A CIDR does not reject the file; only single addresses are answered, and an
    // entry with only a range is forwarded (no auto-allocated VIP).
    assert_eq!(
        answer(&env, "mixed.example"),
        (vec!["10.40.0.7".to_owned()], true)
    );
    assert_eq!(
        answer(&env, "range.example"),
        (vec![FAKE_A.to_owned()], false)
    );
    // A wildcard without addresses is forwarded, not NODATA.
    assert_eq!(
        answer(&env, "db.corp.example"),
        (vec![FAKE_A.to_owned()], false)
    );

    // An explicit address that claims auto.example's VIP: auto.example moves.
    let (auto, _) = answer(&env, "auto.example");
    let vip = auto[0].clone();
    assert!(vip.starts_with("240.240."), "{vip}");
    std::fs::write(
        env.dir.join("registry/claim.yaml"),
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: claim}}\n\
             spec: {{hosts: [claim.example], addresses: [{vip}], resolution: STATIC, endpoints: [{{address: 192.0.2.10}}]}}\n"
        ),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while answer(&env, "claim.example").0 != [vip.clone()] {
        assert!(
            Instant::now() < deadline,
            "reload not applied:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (moved, _) = answer(&env, "auto.example");
    println!(
        "auto.example: {vip} claimed by claim.example, now {}",
        moved[0]
    );
    assert_ne!(moved[0], vip, "two hosts on one VIP");
    assert!(moved[0].starts_with("240.240."));
    let metrics = env.admin("/metrics");
    assert!(metrics.contains("dnsproxy_vip_moves_total 1"), "{metrics}");
    assert!(daemon.log_text().contains("claims this auto-allocated VIP"));
}

/// The backends `dnsproxy maps` shows for `vip` (any port), as "addr:port".
#[test]
fn a_failing_address_family_keeps_its_last_backends() {
    if !privileged() {
        return;
    }
    let env = TestEnv::with_registry(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: dual}\n\
         spec: {hosts: [dual.example], addresses: [240.240.9.9, \"2001:2::909\"], ports: [{number: 443, name: tls, protocol: TLS}], resolution: DNS}\n",
    );
    // TTL 1: re-resolved every second.
    env.fake
        .set("dual.example", &["203.0.113.10", "2001:db8::10"], 1);
    let daemon = env.start_daemon();
    let deadline = Instant::now() + Duration::from_secs(10);
    while daemon.backends("2001:2::909").is_empty() {
        assert!(Instant::now() < deadline, "{}", daemon.maps_json());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(daemon.backends("2001:2::909"), ["[2001:db8::10]:443"]);
    assert_eq!(daemon.backends("240.240.9.9"), ["203.0.113.10:443"]);

    // AAAA now fails upstream for several refreshes: the IPv6 backend stays.
    env.fake.fail_aaaa("dual.example", true);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        daemon.backends("2001:2::909"),
        ["[2001:db8::10]:443"],
        "{}",
        daemon.log_text()
    );
    assert!(
        daemon
            .log_text()
            .contains("one address family failed upstream")
    );

    // A definitive answer without AAAA (NODATA) empties that family: the IPv6 VIP
    // then reaches the IPv4 backend, IPv4-mapped (shown as IPv4).
    env.fake.set("dual.example", &["203.0.113.10"], 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while daemon.backends("2001:2::909") != ["203.0.113.10:443"] {
        assert!(Instant::now() < deadline, "{}", daemon.maps_json());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Connects from the captured cgroup to `vip:443` and returns the banner (or the error).
fn banner(env: &TestEnv, vip: &str) -> String {
    let out = env.captured(&[
        "python3",
        "-c",
        &format!(
            "import socket\ntry:\n  s = socket.create_connection(('{vip}', 443), timeout=2)\n  print(s.recv(100).decode().strip())\nexcept OSError as e:\n  print('error', e)"
        ),
    ]);
    stdout(&out).trim().to_owned()
}

#[test]
fn a_vip_is_handed_out_only_once_it_translates_and_outlives_its_host_for_two_ttls() {
    if !privileged() {
        return;
    }
    let env = TestEnv::with_registry(ENTRIES);
    env.netns.add_addr("203.0.113.10/32");
    let _server = BannerServer::start(&env.netns, "203.0.113.10:443");
    // The host's first resolution upstream takes 1.5 s: longer than a client takes
    // from its answer to connect().
    env.fake.set("fresh.example", &["203.0.113.10"], 60);
    env.fake.delay("fresh.example", Duration::from_millis(1500));
    let mut opts = env.daemon_options();
    opts.extra_args
        .extend(["--ttl", "2", "--upstream-timeout-ms", "3000"].map(String::from));
    let daemon = Daemon::start(opts);

    let entry = env.dir.join("registry/fresh.yaml");
    std::fs::write(
        &entry,
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: fresh}\n\
         spec: {hosts: [fresh.example], ports: [{number: 443, name: tls, protocol: TLS}], resolution: DNS}\n",
    )
    .unwrap();
    // Ask as soon as the name is the table's: the first VIP given must already work.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !daemon.log_text().contains("registry changed: reloaded") {
        assert!(Instant::now() < deadline, "{}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(10));
    }
    let started = Instant::now();
    let (answers, aa) = answer(&env, "fresh.example");
    let waited = started.elapsed();
    assert!(
        aa && answers.first().is_some_and(|a| a.starts_with("240.240.")),
        "{answers:?}"
    );
    let vip = answers[0].clone();
    let first = banner(&env, &vip);
    println!("fresh.example: first answer {vip} after {waited:?}; connect: {first}");
    assert!(first.starts_with("hello from 203.0.113.10:443"), "{first}");

    // The host goes: its VIP keeps translating for twice the TTL (2 s), then not.
    std::fs::remove_file(&entry).unwrap();
    let gone = Instant::now();
    let deadline = gone + Duration::from_secs(10);
    while answer(&env, "fresh.example").1 {
        assert!(Instant::now() < deadline, "the host was not removed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let during = banner(&env, &vip);
    assert!(
        during.starts_with("hello from 203.0.113.10:443"),
        "within 2 TTLs: {during}"
    );
    let maps_hold = |vip: &str| daemon.maps_json().contains(&format!("\"vip\": \"{vip}\""));
    while maps_hold(&vip) {
        assert!(
            Instant::now() < deadline,
            "the VIP outlived its grace period"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = gone.elapsed();
    println!("fresh.example gone: {vip} still translated, removed after {after:?}");
    assert!(
        after >= Duration::from_secs(4),
        "removed after {after:?}, before 2 x TTL"
    );
}

/// Hosts of the scale test: each gets a VIP and its IPv6 twin.
const HOSTS: usize = 50_000;

#[test]
fn fifty_thousand_auto_allocated_hosts_all_translate() {
    if !privileged() {
        return;
    }
    let env = TestEnv::with_registry(&scale_registry(HOSTS));
    env.netns.add_addr("203.0.113.10/32");
    let _server = BannerServer::start(&env.netns, "203.0.113.10:443");
    let mut opts = env.daemon_options();
    opts.env.push(("RUST_LOG".into(), "info".into()));
    let started = Instant::now();
    let daemon = Daemon::start(opts);
    let ready = started.elapsed();
    let rss = load::rss_bytes(daemon.pid());
    let sync = log_gap(
        &daemon.log_text(),
        "starting dnsproxy",
        "VIP translation maps updated",
    );
    let maps: serde_json::Value = serde_json::from_str(&daemon.maps_json()).unwrap();
    let (vips, services) = (
        maps["vips"].as_array().map_or(0, Vec::len),
        maps["services"].as_array().map_or(0, Vec::len),
    );
    let left_out = env
        .admin("/metrics")
        .lines()
        .find(|l| l.starts_with("dnsproxy_vips_left_out "))
        .unwrap_or_default()
        .to_owned();
    let (answers, _) = answer(&env, "h49999.scale.example");
    let reached = banner(&env, &answers[0]);
    println!(
        "scale: {HOSTS} hosts; ready in {ready:?} (start to first map sync {sync:?}); RSS {} MiB; \
         {vips} VIPs and {services} services translated; {left_out}; h49999 -> {} -> {reached}",
        rss >> 20,
        answers[0]
    );
    assert_eq!(
        (vips, services),
        (2 * HOSTS, 2 * HOSTS),
        "every host and its IPv6 twin"
    );
    assert_eq!(left_out, "dnsproxy_vips_left_out 0");
    assert!(
        reached.starts_with("hello from 203.0.113.10:443"),
        "{reached}"
    );
}

#[test]
fn a_static_entry_with_a_workload_selector_reaches_its_workloads() {
    if !privileged() {
        return;
    }
    let env = TestEnv::with_registry(
        r"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: vm, namespace: default}
spec:
  hosts: [vm.example]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: STATIC
  workloadSelector: {labels: {app: vm}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-1, namespace: default}
spec: {address: 203.0.113.20, labels: {app: vm}, ports: {tls: 8443}}
",
    );
    env.netns.add_addr("203.0.113.20/32");
    let _server = BannerServer::start(&env.netns, "203.0.113.20:8443");
    let _daemon = env.start_daemon();
    let (answers, aa) = answer(&env, "vm.example");
    assert!(aa && answers[0].starts_with("240.240."), "{answers:?}");
    let reached = banner(&env, &answers[0]);
    println!("vm.example -> {} -> {reached}", answers[0]);
    assert!(
        reached.starts_with("hello from 203.0.113.20:8443"),
        "{reached}"
    );
}
