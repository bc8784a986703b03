//! Istio's ServiceEntry model, as a user moving from the sidecar expects it: CIDR
//! addresses, wildcards without addresses, and VIPs never shared by two hosts.
use std::time::{Duration, Instant};

use dnsproxy_e2e::*;

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
fn backends_of(daemon: &Daemon, vip: &str) -> Vec<String> {
    let maps: serde_json::Value = serde_json::from_str(&daemon.maps_json()).unwrap();
    maps["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["vip"] == vip)
        .flat_map(|s| s["backends"].as_array().cloned().unwrap_or_default())
        .filter_map(|b| b.as_str().map(str::to_owned))
        .collect()
}

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
    while backends_of(&daemon, "2001:2::909").is_empty() {
        assert!(Instant::now() < deadline, "{}", daemon.maps_json());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(backends_of(&daemon, "2001:2::909"), ["[2001:db8::10]:443"]);
    assert_eq!(backends_of(&daemon, "240.240.9.9"), ["203.0.113.10:443"]);

    // AAAA now fails upstream for several refreshes: the IPv6 backend stays.
    env.fake.fail_aaaa("dual.example", true);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        backends_of(&daemon, "2001:2::909"),
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
    while backends_of(&daemon, "2001:2::909") != ["203.0.113.10:443"] {
        assert!(Instant::now() < deadline, "{}", daemon.maps_json());
        std::thread::sleep(Duration::from_millis(200));
    }
}
