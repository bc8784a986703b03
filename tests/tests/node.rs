//! Node mode end to end: the real daemon with kube-rs's real client against a fake API
//! server over real HTTP (list + watch, bookmarks, 410 Gone), "pods" that are real
//! network namespaces and cgroups with a process, real dig inside them.
use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use dnsproxy_e2e::*;
use serde_json::json;

const REVIEWS_IP: &str = "10.100.0.5";
const ISTIO_CAPTURE: &str = "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n  ISTIO_META_DNS_AUTO_ALLOCATE: \"true\"\n";
const ISTIO_CAPTURE_NO_ALLOC: &str = "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n  ISTIO_META_DNS_AUTO_ALLOCATE: \"false\"\n";

/// The cluster's objects: Service reviews (default), a `ServiceEntry` for aliyun.com.
fn publish_registry(env: &NodeEnv) {
    env.api.apply(
        Resource::Services,
        json!({"metadata": {"name": "reviews", "namespace": "default"},
               "spec": {"clusterIP": REVIEWS_IP, "ports": [{"port": 9080}]}}),
    );
    env.api.apply(
        Resource::ServiceEntries,
        json!({"metadata": {"name": "aliyun", "namespace": "default"},
               "spec": {"hosts": ["aliyun.com"], "location": "MESH_EXTERNAL", "resolution": "DNS",
                        "ports": [{"number": 443, "name": "https", "protocol": "TLS"}]}}),
    );
}

fn policy_entries(daemon: &Daemon) -> usize {
    let json: serde_json::Value = serde_json::from_str(&daemon.maps_json()).unwrap();
    json["policy"].as_array().map_or(0, Vec::len)
}

fn wait_policy_entries(daemon: &Daemon, want: usize) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while policy_entries(daemon) != want {
        assert!(
            Instant::now() < deadline,
            "policy entries {} != {want}:\n{}",
            policy_entries(daemon),
            daemon.maps_json()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn capture_policy_per_pod_namespace_and_istio_with_live_changes() {
    if !privileged() {
        return;
    }
    let mut env = NodeEnv::new(&[
        ("default", None),
        ("team-a", Some("enabled")),
        ("team-b", Some("disabled")),
    ]);
    publish_registry(&env);
    let annotated = env.add_pod("annotated", "default", &[("dnsproxy.io/capture", "true")]);
    let plain = env.add_pod("plain", "default", &[]);
    let by_namespace = env.add_pod("by-namespace", "team-a", &[]);
    let istio = env.add_pod(
        "istio",
        "team-b",
        &[("proxy.istio.io/config", ISTIO_CAPTURE)],
    );
    let opted_out = env.add_pod("opted-out", "team-a", &[("dnsproxy.io/capture", "false")]);
    let daemon = env.start_daemon(&[]);
    let fqdn = "reviews.default.svc.cluster.local";

    // Ready means synced: the policy holds right away.
    assert_eq!(env.dig(annotated, fqdn), REVIEWS_IP, "pod annotation");
    assert_eq!(env.dig(plain, fqdn), FAKE_A, "global default off");
    assert_eq!(env.dig(by_namespace, fqdn), REVIEWS_IP, "namespace label");
    assert_eq!(
        env.dig(istio, fqdn),
        REVIEWS_IP,
        "Istio proxyMetadata beats the namespace label"
    );
    assert_eq!(
        env.dig(opted_out, fqdn),
        FAKE_A,
        "pod annotation beats the namespace label"
    );
    // The short name uses the pod's own namespace.
    assert_eq!(env.dig(annotated, "reviews"), REVIEWS_IP);
    // The ServiceEntry's auto-allocated VIP.
    assert!(env.dig(istio, "aliyun.com").starts_with("240.240."));
    assert_eq!(policy_entries(&daemon), 3);
    // A pod costs one UDP socket and one TCP listener per loopback family, and no
    // SO_REUSEPORT group a process in the pod could join.
    let sockets = stdout(&env.in_pod(annotated, &["ss", "-Htuln", "sport = :15053"]));
    let udp = sockets.lines().filter(|l| l.starts_with("udp")).count();
    let tcp = sockets.lines().filter(|l| l.starts_with("tcp")).count();
    assert_eq!((udp, tcp), (2, 2), "{sockets}");
    let joined = env.in_pod(
        annotated,
        &["python3", "-c", "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEPORT,1)\ns.bind(('127.0.0.1',15053))"],
    );
    assert!(
        !joined.status.success(),
        "a pod process joined the listener's port"
    );

    // Live changes, no pod restart: capture on for `plain`, off for `annotated`.
    env.annotate(plain, &[("dnsproxy.io/capture", "true")]);
    env.annotate(annotated, &[("dnsproxy.io/capture", "false")]);
    env.wait_for_answer(plain, fqdn, REVIEWS_IP);
    env.wait_for_answer(annotated, fqdn, FAKE_A);
    wait_policy_entries(&daemon, 3);
    let log = daemon.log_text();
    assert!(
        log.contains("pod=default/plain") && log.contains("DNS capture started"),
        "{log}"
    );
    assert!(
        log.contains("pod=default/annotated") && log.contains("DNS capture stopped"),
        "{log}"
    );
}

#[test]
fn global_default_on_and_a_pod_that_goes_away() {
    if !privileged() {
        return;
    }
    let mut env = NodeEnv::new(&[("default", None), ("quiet", Some("disabled"))]);
    publish_registry(&env);
    let p1 = env.add_pod("p1", "default", &[]);
    let p2 = env.add_pod("p2", "default", &[]);
    let quiet = env.add_pod("q", "quiet", &[]);
    let daemon = env.start_daemon(&["--capture-default", "on"]);
    assert_eq!(env.dig(p1, "reviews"), REVIEWS_IP);
    assert_eq!(env.dig(p2, "reviews.default"), REVIEWS_IP);
    assert_eq!(
        env.dig(quiet, "reviews.default.svc.cluster.local"),
        FAKE_A,
        "namespace off beats default on"
    );
    assert_eq!(policy_entries(&daemon), 2);

    // p2 is deleted from the API (its process still runs here): listener and policy
    // entry go, so its queries reach the cluster DNS again.
    let series = "dns_requests_total{type=\"A\",protocol=\"udp\",result=\"local\",namespace=\"default\",pod=\"p2\"} 1";
    let metrics = env.metrics();
    assert!(metrics.contains(series), "per-pod series: {metrics}");
    env.api.delete(Resource::Pods, "default", "p2");
    wait_policy_entries(&daemon, 1);
    env.wait_for_answer(p2, "reviews.default.svc.cluster.local", FAKE_A);
    assert_eq!(
        env.dig(p1, "reviews"),
        REVIEWS_IP,
        "the other pod is untouched"
    );
    // The pod's series went with it; the other pod's stay.
    let metrics = env.metrics();
    assert!(!metrics.contains("pod=\"p2\""), "{metrics}");
    assert!(metrics.contains("pod=\"p1\""), "{metrics}");
}

#[test]
fn per_pod_auto_allocation_opt_out_and_dns_debug_logs() {
    if !privileged() {
        return;
    }
    let mut env = NodeEnv::new(&[("default", None)]);
    publish_registry(&env);
    let debug = env.add_pod(
        "debug",
        "default",
        &[
            ("proxy.istio.io/config", ISTIO_CAPTURE),
            ("sidecar.istio.io/agentLogLevel", "dns:debug"),
        ],
    );
    let no_alloc = env.add_pod(
        "no-alloc",
        "default",
        &[("proxy.istio.io/config", ISTIO_CAPTURE_NO_ALLOC)],
    );
    let mut opts = env.daemon_options(PathBuf::from("/sys/fs/bpf").join(unique_name("p")));
    opts.env.push(("RUST_LOG".into(), "info".into()));
    let daemon = Daemon::start(opts);

    assert!(env.dig(debug, "aliyun.com").starts_with("240.240."));
    // No auto-allocated VIPs for this pod: the name is resolved for real (here: the
    // node's cluster DNS, which answers FAKE_A).
    assert_eq!(env.dig(no_alloc, "aliyun.com"), FAKE_A);
    assert_eq!(env.dig(no_alloc, "reviews"), REVIEWS_IP, "still captured");

    let log = daemon.log_text();
    let debug_lines: Vec<&str> = log.lines().filter(|l| l.contains(" dns: ")).collect();
    assert!(
        debug_lines.iter().any(|l| l.contains("pod=default/debug")
            && l.contains("question=aliyun.com.")
            && l.contains("found=true")),
        "{log}"
    );
    assert!(
        !debug_lines.iter().any(|l| l.contains("default/no-alloc")),
        "only the dns:debug pod is logged: {log}"
    );
}

#[test]
fn watch_relists_after_410_gone_and_follows_changes() {
    if !privileged() {
        return;
    }
    let mut env = NodeEnv::new(&[("default", Some("enabled"))]);
    publish_registry(&env);
    let pod = env.add_pod("p", "default", &[]);
    let _daemon = env.start_daemon(&[]);
    assert_eq!(env.dig(pod, "reviews"), REVIEWS_IP);
    let (lists_before, _, _) = env.api.requests();

    // History is compacted and every watch dropped: the client's resourceVersion is
    // now too old, it gets 410 Gone and relists; a change made meanwhile still lands.
    env.api.compact();
    env.api.apply(
        Resource::Services,
        json!({"metadata": {"name": "reviews", "namespace": "default"}, "spec": {"clusterIP": "10.100.0.6"}}),
    );
    env.wait_for_answer(pod, "reviews", "10.100.0.6");
    let (lists, watches, gone) = env.api.requests();
    assert!(
        gone >= 1,
        "a watch was answered 410 Gone (lists {lists}, watches {watches})"
    );
    assert!(
        lists > lists_before,
        "the watchers relisted (lists {lists_before} → {lists})"
    );

    // Deletions arrive through the watch too.
    env.api.delete(Resource::Services, "default", "reviews");
    env.wait_for_answer(pod, "reviews.default.svc.cluster.local", FAKE_A);
}

#[test]
fn a_daemon_restart_keeps_pods_resolving_and_adopts_the_pinned_data_path() {
    if !privileged() {
        return;
    }
    let mut env = NodeEnv::new(&[("default", Some("enabled"))]);
    publish_registry(&env);
    let pod = env.add_pod("p", "default", &[]);
    let pin_dir = PathBuf::from("/sys/fs/bpf").join(unique_name("p"));
    let mut first = Daemon::start(env.daemon_options(pin_dir.clone()));
    assert_eq!(env.dig(pod, "reviews"), REVIEWS_IP);
    let vip = env.dig(pod, "aliyun.com");
    let link_before = std::fs::metadata(pin_dir.join("links/dnsproxy_connect4")).is_ok();
    assert!(link_before);

    // The pod resolves in a loop (dig retries a lost query) while the daemon restarts.
    let p = &env.pods[pod];
    let mut cmd = p.netns.command(dnsproxy_bin());
    cmd.arg("exec").arg("--cgroup").arg(&p.cgroup.path).args([
        "--",
        "sh",
        "-c",
        "for i in $(seq 60); do a=$(dig +short +time=1 +tries=3 @10.96.0.10 reviews.default.svc.cluster.local A); \
         [ -n \"$a\" ] || { echo FAIL; exit 1; }; echo \"$a\"; sleep 0.05; done",
    ]);
    let resolver = std::thread::spawn(move || run_with_timeout(&mut cmd, Duration::from_mins(1)));

    std::thread::sleep(Duration::from_millis(500));
    assert!(first.stop_and_hand_over().success());
    assert!(
        pin_dir.join("links/dnsproxy_connect4").exists(),
        "node mode keeps the pinned data path"
    );
    std::thread::sleep(Duration::from_millis(500));
    let second = Daemon::start(env.daemon_options(pin_dir.clone()));
    let out = resolver.join().unwrap();
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "a query failed during the restart:\n{text}"
    );
    let answers: Vec<&str> = text.lines().collect();
    assert_eq!(answers.len(), 60);
    assert!(
        answers.iter().all(|a| *a == REVIEWS_IP || *a == FAKE_A),
        "{text}"
    );
    assert!(
        answers.contains(&FAKE_A),
        "the gap was covered by fail-open: {text}"
    );

    assert!(
        second.log_text().contains("adopted pinned maps"),
        "{}",
        second.log_text()
    );
    assert_eq!(env.dig(pod, "reviews"), REVIEWS_IP, "captured again");
    assert_eq!(
        env.dig(pod, "aliyun.com"),
        vip,
        "same VIP after the restart"
    );
    assert_eq!(policy_entries(&second), 1);
    assert!(second.counter("fail_open") >= 1);
}

#[test]
fn the_cluster_dns_is_discovered_from_kube_dns() {
    if !privileged() {
        return;
    }
    let mut env = NodeEnv::new(&[
        ("default", Some("enabled")),
        ("kube-system", Some("disabled")),
    ]);
    publish_registry(&env);
    env.api.apply(
        Resource::Services,
        json!({"metadata": {"name": "kube-dns", "namespace": "kube-system"}, "spec": {"clusterIP": "10.96.0.10"}}),
    );
    let pod = env.add_pod("p", "default", &[]);
    let mut opts = env.daemon_options(PathBuf::from("/sys/fs/bpf").join(unique_name("p")));
    opts.dns_server_flags = false;
    let daemon = Daemon::start(opts);
    assert_eq!(
        env.dig(pod, "reviews"),
        REVIEWS_IP,
        "captured: 10.96.0.10 came from kube-dns"
    );
    assert_eq!(
        env.dig(pod, "elsewhere.example"),
        FAKE_A,
        "forwarded to kube-dns"
    );
    let maps = daemon.maps_json();
    assert!(
        maps.contains("\"10.96.0.10\"") && !maps.contains("fd00::10"),
        "{maps}"
    );
}

#[test]
fn a_recreated_pod_sandbox_is_captured_again_within_5s() {
    if !privileged() {
        return;
    }
    let mut env = NodeEnv::new(&[("default", None)]);
    publish_registry(&env);
    let pod = env.add_pod("web", "default", &[("dnsproxy.io/capture", "true")]);
    let daemon = env.start_daemon(&[]);
    assert_eq!(env.dig(pod, "reviews"), REVIEWS_IP);
    let before: serde_json::Value = serde_json::from_str(&daemon.maps_json()).unwrap();
    let old_cookie = before["policy"][0]["netns_cookie"].clone();

    // The pause container dies; the runtime builds a new sandbox for the same pod.
    env.recreate_sandbox(pod, &[("dnsproxy.io/capture", "true")]);
    let recreated = Instant::now();
    env.wait_for_answer(pod, "reviews", REVIEWS_IP);
    let took = recreated.elapsed();
    let after: serde_json::Value = serde_json::from_str(&daemon.maps_json()).unwrap();
    let cookies: Vec<_> = after["policy"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["netns_cookie"].clone())
        .collect();
    println!(
        "sandbox recreated: captured again after {took:?}; policy cookies {old_cookie} -> {cookies:?}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!(
        cookies.len(),
        1,
        "the old namespace's entry is gone: {cookies:?}"
    );
    assert_ne!(cookies[0], old_cookie);
    assert!(daemon.log_text().contains("pod sandbox recreated"));
}

#[test]
fn export_to_keeps_a_namespace_from_capturing_another_teams_name() {
    if !privileged() {
        return;
    }
    let mut env = NodeEnv::new(&[("payments", None), ("evil", None), ("default", None)]);
    env.api.apply(
        Resource::ServiceEntries,
        json!({"metadata": {"name": "stripe", "namespace": "payments", "creationTimestamp": "2024-05-01T00:00:00Z"},
               "spec": {"hosts": ["api.stripe.com"], "addresses": ["240.240.5.5"], "exportTo": ["*"],
                        "resolution": "STATIC", "endpoints": [{"address": "192.0.2.5"}]}}),
    );
    // Older, but exported to its own namespace only.
    env.api.apply(
        Resource::ServiceEntries,
        json!({"metadata": {"name": "mine", "namespace": "evil", "creationTimestamp": "2023-01-01T00:00:00Z"},
               "spec": {"hosts": ["api.stripe.com"], "addresses": ["240.240.6.6"], "exportTo": ["."],
                        "resolution": "STATIC", "endpoints": [{"address": "192.0.2.6"}]}}),
    );
    let attacker = env.add_pod("attacker", "evil", &[("dnsproxy.io/capture", "true")]);
    let victim = env.add_pod("victim", "default", &[("dnsproxy.io/capture", "true")]);
    let _daemon = env.start_daemon(&[]);
    assert_eq!(
        env.dig(attacker, "api.stripe.com"),
        "240.240.6.6",
        "its own entry"
    );
    assert_eq!(
        env.dig(victim, "api.stripe.com"),
        "240.240.5.5",
        "never the other team's"
    );
    let view = env
        .node
        .within(|| http_get(DEBUG_ADDR, "/debug/ndsz?namespace=default"))
        .unwrap_or_default();
    assert!(
        view.contains("240.240.5.5") && !view.contains("240.240.6.6"),
        "{view}"
    );
}

/// Host → VIP as the debug endpoint at `debug` in `node` shows them (auto-allocated
/// `*.agree.example` hosts only).
fn vips_seen(node: &Netns, debug: &'static str) -> std::collections::BTreeMap<String, String> {
    let body = node
        .within(move || http_get(debug, "/debug/ndsz?namespace=default"))
        .unwrap_or_default();
    let json = body.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let dump: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    dump["hosts"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(name, _)| name.ends_with(".agree.example"))
        .filter_map(|(name, entries)| {
            let v4 = entries[0]["target"]["addresses"]["ipv4"][0].as_str()?;
            Some((name.clone(), v4.to_owned()))
        })
        .collect()
}

/// Applies `hosts` ServiceEntries from two threads at once, in opposite orders.
fn apply_concurrently(api: &FakeKube, range: std::ops::Range<usize>) {
    let entry = |i: usize| {
        json!({"metadata": {"name": format!("e{i}"), "namespace": "default"},
               "spec": {"hosts": [format!("h{i}.agree.example")], "resolution": "STATIC",
                        "endpoints": [{"address": "192.0.2.1"}], "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}]}})
    };
    std::thread::scope(|s| {
        let forward: Vec<usize> = range.clone().filter(|i| i % 2 == 0).collect();
        let backward: Vec<usize> = range.filter(|i| i % 2 == 1).rev().collect();
        for order in [forward, backward] {
            s.spawn(move || {
                for i in order {
                    api.apply(Resource::ServiceEntries, entry(i));
                }
            });
        }
    });
}

fn wait_hosts(
    node: &Netns,
    debug: &'static str,
    n: usize,
) -> std::collections::BTreeMap<String, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = vips_seen(node, debug);
        if seen.len() == n {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} hosts at {debug}",
            seen.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_daemons_of_two_nodes_give_every_host_the_same_vip() {
    if !privileged() {
        return;
    }
    let env = NodeEnv::new(&[("default", None)]);
    let _a = env.start_daemon(&[]);
    apply_concurrently(&env.api, 0..150);

    // Node B: its own network namespace (linked to node A's, where the API server
    // is), cgroup, pins and state; its vips.json cache holds other slots for the same
    // hosts, as a node with another history would.
    let node_b = Netns::new();
    env.node.link(&node_b, "10.201.0.1/30", "10.201.0.2/30");
    let kubeconfig_b = env.dir.join("kubeconfig-b");
    std::fs::write(
        &kubeconfig_b,
        env.api.kubeconfig_via("10.201.0.1".parse().unwrap()),
    )
    .unwrap();
    let b_cgroup = Cgroup::new();
    let b_state = env.dir.join("state-b");
    std::fs::create_dir_all(&b_state).unwrap();
    let cache: String = (0..150)
        .map(|i| format!("    \"h{i}.agree.example\": {},\n", 60_000 + i))
        .collect::<Vec<_>>()
        .concat();
    std::fs::write(
        b_state.join("vips.json"),
        format!("{{\n  \"hosts\": {{\n{cache}    \"z\": 1\n  }}\n}}\n"),
    )
    .unwrap();
    let mut opts = env.daemon_options(PathBuf::from("/sys/fs/bpf").join(unique_name("p")));
    opts.netns = &node_b;
    opts.cgroup = &b_cgroup;
    opts.state_dir = b_state;
    opts.env = vec![
        ("KUBECONFIG".into(), kubeconfig_b.display().to_string()),
        ("NODE_NAME".into(), "node-b".into()),
    ];
    let _b = Daemon::start(opts);

    // Both run; 150 more arrive, from two writers at once.
    apply_concurrently(&env.api, 150..300);
    let on_a = wait_hosts(&env.node, DEBUG_ADDR, 300);
    let on_b = wait_hosts(&node_b, DEBUG_ADDR, 300);
    let distinct: std::collections::HashSet<&String> = on_a.values().collect();
    let store = env
        .api
        .get(Resource::ConfigMaps, "dnsproxy-system", "dnsproxy-vips");
    let stored = store.as_ref().map_or(0, |cm| {
        cm["data"]["vips.json"]
            .as_str()
            .unwrap_or("")
            .matches(".agree.example")
            .count()
    });
    println!(
        "two nodes: {} hosts, identical VIPs on both: {}, {} distinct VIPs, {stored} in the store, {} writes lost a race",
        on_a.len(),
        on_a == on_b,
        distinct.len(),
        env.api.conflicts()
    );
    assert_eq!(on_a, on_b, "the nodes disagree");
    assert_eq!(distinct.len(), 300, "a VIP is shared");
    assert_eq!(stored, 300);
    // Every lost race is counted by the daemon that lost it; no round failed.
    let metrics_b = node_b
        .within(|| http_get(ADMIN_ADDR, "/metrics"))
        .unwrap_or_default();
    let counted = |name: &str| {
        [env.metrics(), metrics_b.clone()]
            .iter()
            .map(|m| metric_value(m, name))
            .sum::<u64>()
    };
    assert_eq!(
        counted("dnsproxy_vip_store_conflicts_total"),
        env.api.conflicts() as u64
    );
    assert_eq!(counted("dnsproxy_vip_store_failures_total"), 0);
}

/// The value of the series `name` (no labels) in `metrics`.
fn metric_value(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {metrics}"))
}

/// Namespaces `vms` and `default`, the `vm` entry, and `vm-1`, a Pod of another node
/// its selector selects (10.2.0.7, ready).
fn vm_cluster() -> NodeEnv {
    let env = NodeEnv::new(&[("vms", None), ("default", None)]);
    env.api.apply(Resource::ServiceEntries, vm_entry("vm"));
    env.api.apply(
        Resource::Pods,
        remote_pod("vm-1", "vms", "vm", "10.2.0.7", true, 0),
    );
    env
}

fn table_builds(env: &NodeEnv) -> u64 {
    metric_value(&env.metrics(), "dnsproxy_name_table_builds_total")
}

fn wait_backends(daemon: &Daemon, vip: &str, want: &[&str]) -> Duration {
    let started = Instant::now();
    loop {
        let got = daemon.backends(vip);
        if got == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "backends of {vip}: {got:?}, want {want:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn pods_back_a_workload_selector_and_other_pod_churn_does_not_rebuild_the_table() {
    if !privileged() {
        return;
    }
    let env = vm_cluster();
    env.api.apply(
        Resource::Pods,
        remote_pod("web-1", "default", "web", "10.2.0.9", true, 0),
    );
    let daemon = env.start_daemon(&[]);
    wait_backends(&daemon, "240.240.8.8", &["10.2.0.7:443"]);
    // The last watch's initial events may still start one round after ready.
    std::thread::sleep(Duration::from_millis(2500));
    let before = table_builds(&env);
    // Churn of a Pod no selector selects: capture policy only, no table build (the
    // 2 s round included).
    for generation in 1..=10 {
        env.api.apply(
            Resource::Pods,
            remote_pod(
                "web-1",
                "default",
                "web",
                "10.2.0.9",
                generation % 2 == 0,
                generation,
            ),
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let after_churn = table_builds(&env);
    // The selected Pod turns unready: its backend goes. The round agrees on VIPs from
    // the watched VIP store, without reading it from the API.
    let reads = env.api.reads();
    env.api.apply(
        Resource::Pods,
        remote_pod("vm-1", "vms", "vm", "10.2.0.7", false, 1),
    );
    let gone = wait_backends(&daemon, "240.240.8.8", &[]);
    let after_flip = table_builds(&env);
    assert_eq!(
        env.api.reads(),
        reads,
        "the VIP store was read from the API"
    );
    println!(
        "table builds: {before} settled after ready, {after_churn} after 10 changes of an unselected pod, \
         {after_flip} after the selected pod turned unready (backend gone after {gone:?})"
    );
    assert_eq!(after_churn, before, "an unselected pod rebuilt the table");
    assert!(after_flip > after_churn);
}

#[test]
fn a_vip_store_the_api_refuses_is_retried_with_backoff_and_vips_are_allocated_locally() {
    if !privileged() {
        return;
    }
    let mut env = NodeEnv::new(&[("default", None)]);
    // 40,000 auto-allocated hosts: the store would be over the API's 1 MiB.
    let hosts: Vec<String> = (0..40_000).map(|i| format!("h{i}.full.example")).collect();
    env.api.apply(
        Resource::ServiceEntries,
        json!({"metadata": {"name": "full", "namespace": "default"},
               "spec": {"hosts": hosts, "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}],
                        "resolution": "STATIC", "endpoints": [{"address": "192.0.2.1"}]}}),
    );
    let client = env.add_pod("client", "default", &[("dnsproxy.io/capture", "true")]);
    let _daemon = env.start_daemon(&[]);
    let vip = env.dig(client, "h39999.full.example");
    assert!(vip.starts_with("240.240."), "allocated locally: {vip:?}");
    let (_, refused_at_ready) = env.api.writes();
    std::thread::sleep(Duration::from_secs(12));
    let (writes, refused) = env.api.writes();
    let failures = metric_value(&env.metrics(), "dnsproxy_vip_store_failures_total");
    println!(
        "store over 1 MiB: h39999 -> {vip}; {refused} writes refused ({refused_at_ready} by ready, \
         {writes} in all) in 12 s after ready; dnsproxy_vip_store_failures_total {failures}"
    );
    assert!(
        refused_at_ready >= 1 && failures >= 2,
        "{refused} refused, {failures} failures"
    );
    // Backoff 2 s, 4 s, 8 s: three more tries in 12 s at most (every 2 s would be six).
    assert!(refused - refused_at_ready <= 3, "{refused} refused writes");
    assert_eq!(env.dig(client, "h39999.full.example"), vip, "the VIP stays");
}

/// Waits until `dig` from `pod` answers `want`; returns how long it took.
fn time_to_answer(env: &NodeEnv, pod: usize, name: &str, want: &str) -> Duration {
    let started = Instant::now();
    env.wait_for_answer(pod, name, want);
    started.elapsed()
}

#[test]
fn every_capture_change_a_pod_can_undergo_is_followed_from_its_own_events() {
    if !privileged() {
        return;
    }
    let mut env = NodeEnv::new(&[("default", None), ("team", Some("enabled"))]);
    publish_registry(&env);
    let fqdn = "reviews.default.svc.cluster.local";
    let daemon = env.start_daemon(&[]);
    // Each watch follows its first list within moments of ready.
    std::thread::sleep(Duration::from_millis(500));
    let settled = env.api.requests_total();

    // New: a pod that starts after the daemon is ready is captured from its event.
    let web = env.add_pod("web", "team", &[]);
    let new = time_to_answer(&env, web, fqdn, REVIEWS_IP);
    wait_policy_entries(&daemon, 1);

    // Replaced: same name, a new UID (a StatefulSet's pod), its own namespace.
    let replacement = env.replace_pod(web, &[]);
    let replaced = time_to_answer(&env, replacement, fqdn, REVIEWS_IP);
    wait_policy_entries(&daemon, 1);

    // Namespace label: capture off for every pod of the namespace, then on again.
    env.label_namespace("team", Some("disabled"));
    let ns_off = time_to_answer(&env, replacement, fqdn, FAKE_A);
    wait_policy_entries(&daemon, 0);
    env.label_namespace("team", Some("enabled"));
    let ns_on = time_to_answer(&env, replacement, fqdn, REVIEWS_IP);

    // Annotation: the pod opts out while its namespace is on.
    env.annotate(replacement, &[("dnsproxy.io/capture", "false")]);
    let annotated = time_to_answer(&env, replacement, fqdn, FAKE_A);
    env.annotate(replacement, &[]);
    time_to_answer(&env, replacement, fqdn, REVIEWS_IP);

    // Finished: its containers ended (a Job's pod): capture ends with it.
    env.set_phase(replacement, "Succeeded", &[]);
    let finished = time_to_answer(&env, replacement, fqdn, FAKE_A);
    wait_policy_entries(&daemon, 0);

    println!(
        "captured after: new {new:?}, replaced {replaced:?}; released after: namespace label {ns_off:?}, \
         annotation {annotated:?}, finished {finished:?}; namespace label on again {ns_on:?}"
    );
    let log = daemon.log_text();
    assert!(
        log.contains("pod=team/web") && log.contains("DNS capture stopped"),
        "{log}"
    );
    // Every change came through the watches opened at start: nothing was listed or
    // watched again.
    let requests = env.api.request_log();
    assert_eq!(
        env.api.requests_total(),
        settled,
        "requests after ready: {:?}",
        &requests[settled.min(requests.len())..]
    );
}

#[test]
fn the_daemon_asks_the_api_only_for_its_own_pods_and_the_selected_ones() {
    if !privileged() {
        return;
    }
    // Pods of other nodes: one the selector selects, many it does not.
    let env = vm_cluster();
    env.api.apply_many(
        Resource::Pods,
        (0..500).map(|i| remote_pod(&format!("web-{i}"), "default", "web", "10.3.0.1", true, 0)),
    );
    let daemon = env.start_daemon(&[]);
    wait_backends(&daemon, "240.240.8.8", &["10.2.0.7:443"]);
    let pod_requests: Vec<String> = env
        .api
        .request_log()
        .into_iter()
        .filter(|r| r.contains("/pods"))
        .collect();
    println!("Pod requests: {pod_requests:#?}");
    for r in &pod_requests {
        let own = r.contains("fieldSelector=spec.nodeName=node-a");
        let selected = r.contains("/namespaces/vms/pods") && r.contains("labelSelector=app=vm");
        assert!(
            own || selected,
            "a Pod request beyond this node and the selector: {r}"
        );
    }
    // A selected pod's churn reaches the daemon through its selector's watch.
    env.api.apply(
        Resource::Pods,
        remote_pod("vm-2", "vms", "vm", "10.2.0.8", true, 0),
    );
    wait_backends(&daemon, "240.240.8.8", &["10.2.0.7:443", "10.2.0.8:443"]);
    // The selector goes: its watch stops, and the entry has no backend.
    env.api.apply(Resource::ServiceEntries, vm_entry("other"));
    wait_backends(&daemon, "240.240.8.8", &[]);
    assert!(
        daemon
            .log_text()
            .contains("workloadSelector gone: its Pod watch stops"),
        "{}",
        daemon.log_text()
    );
}

#[test]
fn a_change_builds_only_the_shard_of_the_table_it_names() {
    if !privileged() {
        return;
    }
    let mut env = NodeEnv::new(&[("default", Some("enabled")), ("other", None)]);
    publish_registry(&env);
    env.api.apply(
        Resource::Services,
        json!({"metadata": {"name": "db", "namespace": "other"}, "spec": {"clusterIP": "10.100.0.9"}}),
    );
    let pod = env.add_pod("p", "default", &[]);
    let _daemon = env.start_daemon(&[]);
    assert_eq!(env.dig(pod, "reviews"), REVIEWS_IP);
    let builds = |env: &NodeEnv| {
        let m = env.metrics();
        (
            metric_value(&m, "dnsproxy_name_table_namespace_builds_total"),
            metric_value(&m, "dnsproxy_name_table_entries_builds_total"),
        )
    };
    // The first sync's signals may still be settling.
    std::thread::sleep(Duration::from_millis(500));
    let before = builds(&env);

    // A Service of `other` changes: that namespace's shard, nothing else.
    env.api.apply(
        Resource::Services,
        json!({"metadata": {"name": "db", "namespace": "other"}, "spec": {"clusterIP": "10.100.0.10"}}),
    );
    env.wait_for_answer(pod, "db.other.svc.cluster.local", "10.100.0.10");
    let after_service = builds(&env);
    // A ServiceEntry changes: the entries' shard, no namespace's.
    env.api.apply(
        Resource::ServiceEntries,
        json!({"metadata": {"name": "fixed", "namespace": "default"},
               "spec": {"hosts": ["fixed.example"], "addresses": ["240.240.3.3"], "resolution": "STATIC",
                        "endpoints": [{"address": "192.0.2.3"}]}}),
    );
    env.wait_for_answer(pod, "fixed.example", "240.240.3.3");
    let after_entry = builds(&env);
    println!(
        "shard builds (namespaces, entries): {before:?} -> a Service changed {after_service:?} -> a ServiceEntry changed {after_entry:?}"
    );
    assert_eq!(after_service, (before.0 + 1, before.1));
    assert_eq!(after_entry, (after_service.0, after_service.1 + 1));
}
