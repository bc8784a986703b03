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
