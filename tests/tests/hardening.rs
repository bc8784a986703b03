//! The daemon protecting itself and the node: damaged state, ... (issue-by-issue
//! fault injection, each in its own netns with bounded loops).
use std::collections::HashSet;

use dnsproxy_e2e::*;

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
