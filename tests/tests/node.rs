//! Node mode end to end: the real daemon with kube-rs's real client against a fake API
//! server over real HTTP (list + watch, bookmarks, 410 Gone), "pods" that are real
//! network namespaces and cgroups with a process, real dig inside them.
use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use dnsproxy_e2e::{clients::Client, *};
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

/// dig from pod `pod` for `name` (A): its reply code, answers and authority owners.
fn dig_full(env: &NodeEnv, pod: usize, name: &str) -> (String, Vec<String>, Vec<String>) {
    let out = env.in_pod(
        pod,
        &["dig", "+time=2", "+tries=1", "@10.96.0.10", name, "A"],
    );
    (dig_status(&out), dig_answers(&out), dig_authority(&out))
}

#[test]
fn cluster_names_that_no_service_has_are_nxdomain_without_the_cluster_dns() {
    if !privileged() {
        return;
    }
    let mut env = NodeEnv::new(&[("default", None)]);
    publish_registry(&env);
    let pod = env.add_pod("walker", "default", &[]);
    let daemon = env.start_daemon(&["--capture-default", "on"]);
    assert_eq!(env.dig(pod, "reviews"), REVIEWS_IP);
    let asked = env.fake.queries();
    // A Kubernetes search list's three steps for an external name, and a Service that
    // is not there.
    for name in [
        "api.example.org.default.svc.cluster.local",
        "api.example.org.svc.cluster.local",
        "api.example.org.cluster.local",
        "nope.default.svc.cluster.local",
    ] {
        let (status, answers, authority) = dig_full(&env, pod, name);
        assert_eq!(status, "NXDOMAIN", "{name}");
        assert!(answers.is_empty(), "{name}: {answers:?}");
        assert_eq!(
            authority,
            ["cluster.local."],
            "{name}: the SOA that makes it cached"
        );
    }
    assert_eq!(env.fake.queries(), asked, "the cluster DNS was not asked");
    // Below a Service that exists (a headless Service's pods, SRV): the cluster DNS's.
    let (status, answers, _) = dig_full(&env, pod, "pod-0.reviews.default.svc.cluster.local");
    assert_eq!(
        (status.as_str(), answers),
        ("NOERROR", vec![FAKE_A.to_owned()])
    );
    assert_eq!(env.fake.queries(), asked + 1);
    // A Service that comes exists from the next table on.
    env.api.apply(
        Resource::Services,
        json!({"metadata": {"name": "late", "namespace": "default"},
               "spec": {"clusterIP": "10.100.0.9", "ports": [{"port": 80}]}}),
    );
    env.wait_for_answer(pod, "late.default.svc.cluster.local", "10.100.0.9");
    drop(daemon);

    // `--cluster-nxdomain off`: the cluster DNS answers them as before.
    let _daemon = env.start_daemon(&["--capture-default", "on", "--cluster-nxdomain", "off"]);
    env.wait_for_answer(pod, "reviews", REVIEWS_IP);
    let (status, answers, _) = dig_full(&env, pod, "nope.default.svc.cluster.local");
    assert_eq!(
        (status.as_str(), answers),
        ("NOERROR", vec![FAKE_A.to_owned()])
    );
}

#[test]
fn autopath_answers_a_pods_search_walk_in_one_round_trip() {
    if !privileged() {
        return;
    }
    let mut env = NodeEnv::new(&[("default", None)]);
    publish_registry(&env);
    // The cluster DNS: its zone has nothing but the Services, corp.example only the
    // intranet's wiki, and api.example.org an IPv4 address.
    let (resolv, walker, walks_itself) = env.autopath_pods();
    env.fake
        .set("wiki.intranet.corp.example", &["198.51.100.20"], 60);
    env.fake.set("api.example.org", &["198.51.100.7"], 60);
    let daemon = env.start_daemon(&["--capture-default", "on"]);
    env.wait_for_answer(walker, "reviews", REVIEWS_IP);
    env.wait_for_answer(walks_itself, "reviews", REVIEWS_IP);
    let log = daemon.log_text();
    assert!(
        log.lines().any(|l| l.contains("DNS capture started")
            && l.contains("pod=default/walker")
            && l.contains("corp.example")),
        "the pod's search list is read from its resolv.conf: {log}"
    );

    // Each resolver (A and AAAA for each search step) from each pod: the addresses it
    // found, the queries it sent, what the cluster DNS was asked.
    let lookup = |client: Client, pod: usize, name: &str| {
        let (queries, asked) = (env.pod_queries(pod), env.fake.asked().len());
        let command = client.command(name);
        let args: Vec<&str> = command.iter().map(String::as_str).collect();
        let out = env.in_pod_with_resolv_conf(pod, &resolv, &args);
        let found: std::collections::BTreeSet<String> = stdout(&out)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(ToOwned::to_owned))
            .collect();
        let upstream = env.fake.asked()[asked..].to_vec();
        (found, env.pod_queries(pod) - queries, upstream)
    };
    let mut saved_by_now = 0;
    for client in Client::ALL {
        let who = client.name();
        // Cold caches: a name of its own for each client and pod.
        let name = format!("api-{who}.example.org");
        let (off, off_queries, off_upstream) = lookup(client, walks_itself, &name);
        eprintln!(
            "{who} {name}, autopath off, cold cache: {off_queries} client queries, upstream {off_upstream:?}"
        );
        assert!(off.contains(FAKE_A), "{who}: {off:?}");
        let name = format!("www-{who}.example.net");
        let (on, on_queries, on_upstream) = lookup(client, walker, &name);
        eprintln!(
            "{who} {name}, autopath on, cold cache: {on_queries} client queries, upstream {on_upstream:?}"
        );
        assert!(on.contains(FAKE_A), "{who}: {on:?}");
        // Without autopath: A and AAAA for each of the 4 search domains, then the name.
        assert_eq!(
            off_queries, 10,
            "{who}: the pod walks its whole list itself"
        );
        assert_eq!(
            on_queries, 2,
            "{who}: one round trip, A and AAAA of the first step"
        );
        let real = on_upstream
            .iter()
            .filter(|q| q.starts_with(&format!("{name} ")))
            .count();
        assert_eq!(
            real, 2,
            "{who}: A and AAAA of the real name: {on_upstream:?}"
        );
        assert!(
            on_upstream
                .iter()
                .chain(&off_upstream)
                .all(|q| !q.contains("cluster.local")),
            "{who}: the cluster's steps never leave the node: {on_upstream:?} {off_upstream:?}"
        );
        // A name that exists under the node's search domain resolves there first,
        // with autopath as without; an IPv4-only name too.
        let (on, on_queries, _) = lookup(client, walker, "wiki.intranet");
        let (off, _, _) = lookup(client, walks_itself, "wiki.intranet");
        assert!(
            on.contains("198.51.100.20") && on == off,
            "{who}: {on:?} {off:?}"
        );
        assert_eq!(on_queries, 2, "{who}");
        let (on, on_queries, _) = lookup(client, walker, "api.example.org");
        assert_eq!(on.iter().collect::<Vec<_>>(), ["198.51.100.7"], "{who}");
        assert_eq!(on_queries, 2, "{who}");
        // Names the table has are answered as before.
        let (reviews, _, _) = lookup(client, walker, "reviews");
        assert!(reviews.contains(REVIEWS_IP), "{who}: {reviews:?}");
        // Saved: 4 steps (3 search domains and the name) for A and AAAA of each of
        // the two external names, 3 (up to corp.example) for wiki.intranet's.
        saved_by_now += 2 * 8 + 6;
        let saved = metric_value(&env.metrics(), "dns_autopath_round_trips_saved_total");
        assert_eq!(saved, saved_by_now, "{who}");
    }
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

    // Deletions arrive through the watch too: the Service's name is gone.
    env.api.delete(Resource::Services, "default", "reviews");
    let deadline = Instant::now() + scaled(Duration::from_secs(15));
    while dig_full(&env, pod, "reviews.default.svc.cluster.local").0 != "NXDOMAIN" {
        assert!(
            Instant::now() < deadline,
            "reviews still answered after its deletion"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
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
    assert_rbac_grants_every_request(&env);
}

/// Every request the daemon made of the API is one `deploy/rbac.yaml` grants: the
/// narrowed roles are enough, and the daemon asks for nothing they leave out.
fn assert_rbac_grants_every_request(env: &NodeEnv) {
    let rbac = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/rbac.yaml"))
        .unwrap();
    let log = env.api.request_log();
    assert!(!log.is_empty());
    let refused = rbac::refused(&rbac, &log);
    assert!(
        refused.is_empty(),
        "requests deploy/rbac.yaml does not grant: {refused:#?}"
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
    assert_rbac_grants_every_request(&env);
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

/// Kernels before 5.14 (5.10 LTS) have no `SO_NETNS_COOKIE`: the daemon learns each
/// pod's netns cookie from its probe program instead. Forced here on a kernel that has
/// both, the probe's cookies must be the ones the socket option reports in each pod,
/// and capture must work as usual.
#[test]
fn netns_cookies_from_the_probe_are_the_kernels_own() {
    if !privileged() {
        return;
    }
    let mut env = NodeEnv::new(&[("default", Some("enabled"))]);
    publish_registry(&env);
    let pods = [
        env.add_pod("p1", "default", &[]),
        env.add_pod("p2", "default", &[]),
    ];
    let mut daemon = env.start_daemon(&["--netns-cookie", "probe"]);
    for pod in pods {
        assert_eq!(env.dig(pod, "reviews"), REVIEWS_IP);
    }
    daemon.assert_logged("netns cookies come from a probe program");
    let json: serde_json::Value = serde_json::from_str(&daemon.maps_json()).unwrap();
    let mut from_probe: Vec<u64> = json["policy"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["netns_cookie"].as_u64().unwrap())
        .collect();
    let sockopt = "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
                   print(int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 71, 8), 'little'))";
    let mut from_sockopt: Vec<u64> = pods
        .iter()
        .map(|pod| {
            let out = env.in_pod(*pod, &["python3", "-c", sockopt]);
            stdout(&out).trim().parse().unwrap()
        })
        .collect();
    from_probe.sort_unstable();
    from_sockopt.sort_unstable();
    assert_eq!(
        from_probe, from_sockopt,
        "the probe's cookies are the kernel's"
    );
    let metrics = env.metrics();
    assert!(
        metrics.contains("dnsproxy_kernel_feature_missing{feature=\"so_netns_cookie\"} 0"),
        "{metrics}"
    );
    // The probe's cgroup goes with the daemon.
    let probe_cgroup = cgroup2_root()
        .unwrap()
        .join(format!("dnsproxy-netns-probe-{}", daemon.pid()));
    assert!(probe_cgroup.exists());
    assert!(daemon.stop().success());
    assert!(!probe_cgroup.exists(), "{} is left", probe_cgroup.display());
}

/// The capabilities `deploy/daemonset.yaml` adds (its `capabilities.add` list).
fn daemonset_capabilities() -> Vec<String> {
    let yaml = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml"),
    )
    .unwrap();
    let mut lines = yaml.lines().skip_while(|l| l.trim() != "add:").skip(1);
    let mut caps = Vec::new();
    for line in lines.by_ref() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let Some(cap) = line.strip_prefix("- ") else {
            break;
        };
        caps.push(cap.to_owned());
    }
    caps
}

/// The capability mask of `names` (as /proc/<pid>/status prints `CapEff`).
fn capability_mask(names: &[String]) -> u64 {
    names
        .iter()
        .map(|n| match n.as_str() {
            "DAC_OVERRIDE" => 1,
            "NET_ADMIN" => 12,
            "SYS_PTRACE" => 19,
            "SYS_ADMIN" => 21,
            "SYS_RESOURCE" => 24,
            "PERFMON" => 38,
            "BPF" => 39,
            other => panic!("a capability this test does not know: {other}"),
        })
        .fold(0, |mask, bit| mask | 1 << bit)
}

/// The daemon under exactly the DaemonSet's capabilities (a bounding set of those
/// alone, no new privileges, as `allowPrivilegeEscalation: false`): it starts, finds and
/// captures a pod, answers from the table, and a second daemon under the same set takes
/// the sockets over. So the list in the manifest is enough, not a guess.
#[test]
fn node_mode_runs_with_only_the_daemonsets_capabilities() {
    if !privileged() {
        return;
    }
    let caps = daemonset_capabilities();
    assert!(caps.contains(&"SYS_ADMIN".to_owned()), "{caps:?}");
    let bounding = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{}", c.to_lowercase())))
        .collect::<Vec<_>>()
        .join(",");
    let mut env = NodeEnv::new(&[("default", Some("enabled"))]);
    publish_registry(&env);
    let pod = env.add_pod("p", "default", &[]);
    let pin_dir = PathBuf::from("/sys/fs/bpf").join(unique_name("p"));
    let start = || {
        let mut opts = env.daemon_options(pin_dir.clone());
        opts.wrapper = vec![
            "setpriv".into(),
            format!("--bounding-set={bounding}"),
            "--inh-caps=-all".into(),
            "--no-new-privs".into(),
            "--".into(),
        ];
        Daemon::start(opts)
    };
    let mut first = start();
    let status = std::fs::read_to_string(format!("/proc/{}/status", first.pid())).unwrap();
    let mask = |status: &str, field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
            .unwrap()
    };
    let effective = mask(&status, "CapEff:");
    // What this machine grants root at all (a sandbox may withhold some).
    let available = mask(
        &std::fs::read_to_string("/proc/self/status").unwrap(),
        "CapBnd:",
    );
    assert_eq!(
        effective,
        capability_mask(&caps) & available,
        "the daemon holds exactly {caps:?} (of those this machine grants)"
    );
    assert_eq!(env.dig(pod, "reviews"), REVIEWS_IP);
    let vip = env.dig(pod, "aliyun.com");
    assert!(vip.starts_with("240.240."), "{vip}");
    assert_eq!(policy_entries(&first), 1);
    let second = start();
    let deadline = Instant::now() + scaled(Duration::from_secs(10));
    while !second.log_text().contains("handoff complete") {
        assert!(Instant::now() < deadline, "{}", second.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(first.stop_and_hand_over().success());
    assert_eq!(env.dig(pod, "aliyun.com"), vip);
    println!("capabilities {caps:?} (CapEff {effective:#x}): captured, answered, handed over");
}

/// What a pod reads from a TCP connection to `addr` (port 80), or why it read nothing.
fn read_from(env: &NodeEnv, pod: usize, addr: &str) -> String {
    let p = &env.pods[pod];
    let resolv = env.dir.join("resolv.conf");
    let script = format!(
        "import socket\n\
         try:\n\
         \x20   s = socket.create_connection(('{addr}', 80), timeout=2)\n\
         \x20   print(s.recv(200).decode().strip())\n\
         except OSError as e:\n\
         \x20   print('no connection:', e)"
    );
    let out = run_with_timeout(
        &mut captured_command(&p.netns, &p.cgroup, &resolv, &["python3", "-c", &script]),
        Duration::from_secs(20),
    );
    stdout(&out).trim().to_owned()
}

/// The issue's reproduction: namespace `evil` declares shop's Service `ClusterIP` and
/// the cloud metadata address in a `ServiceEntry` exported everywhere, with an endpoint
/// of its own. A pod in `shop` connecting to either never reaches evil's endpoint;
/// both are refused, counted and listed, while an address of evil's own (the control)
/// still translates to that endpoint.
#[test]
fn a_tenant_cannot_declare_a_service_clusterip_or_the_metadata_address() {
    if !privileged() {
        return;
    }
    let mut env = NodeEnv::new(&[("shop", Some("enabled")), ("evil", Some("enabled"))]);
    std::fs::write(env.dir.join("resolv.conf"), "nameserver 10.96.0.10\n").unwrap();
    env.api.apply(
        Resource::Services,
        json!({"metadata": {"name": "web", "namespace": "shop"},
               "spec": {"clusterIP": "10.96.40.40", "ports": [{"port": 80}]}}),
    );
    env.api.apply(
        Resource::ServiceEntries,
        json!({"metadata": {"name": "takeover", "namespace": "evil", "creationTimestamp": "2020-01-01T00:00:00Z"},
               "spec": {"hosts": ["web.evil.example"], "addresses": ["10.96.40.40", "169.254.169.254", "192.0.2.90"],
                        "exportTo": ["*"], "resolution": "STATIC",
                        "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                        "endpoints": [{"address": "203.0.113.66"}]}}),
    );
    let shop = env.add_pod("shopper", "shop", &[]);
    let p = &env.pods[shop];
    p.netns.add_addr("203.0.113.66/32");
    let _evil = BannerServer::start(&p.netns, "203.0.113.66:80");
    let daemon = env.start_daemon(&[]);
    let deadline = Instant::now() + scaled(Duration::from_secs(10));
    while !daemon.maps_json().contains("192.0.2.90") {
        assert!(Instant::now() < deadline, "{}", daemon.maps_json());
        std::thread::sleep(Duration::from_millis(50));
    }
    let control = read_from(&env, shop, "192.0.2.90");
    assert!(
        control.starts_with("hello from 203.0.113.66:80"),
        "{control}"
    );
    for taken in ["10.96.40.40", "169.254.169.254"] {
        let got = read_from(&env, shop, taken);
        assert!(
            !got.contains("203.0.113.66"),
            "{taken} reached evil's endpoint: {got}"
        );
        println!("shop → {taken}:80: {got}");
    }
    let maps = daemon.maps_json();
    assert!(
        !maps.contains("10.96.40.40") && !maps.contains("169.254.169.254"),
        "{maps}"
    );
    let metrics = env.metrics();
    for reason in ["cluster_ip", "link_local"] {
        let series = format!("dnsproxy_entries_refused_total{{reason=\"{reason}\"}} 1");
        assert!(metrics.contains(&series), "{series} in:\n{metrics}");
    }
    let ndsz = env
        .node
        .within(|| http_get(DEBUG_ADDR, "/debug/ndsz"))
        .unwrap_or_default();
    assert!(
        ndsz.contains("\"reason\": \"cluster_ip\"") && ndsz.contains("\"reason\": \"link_local\""),
        "{ndsz}"
    );
    daemon.assert_logged("refused: it is not the entry's to take");
    // A Service that comes later with evil's remaining address as its ClusterIP takes
    // it back: the entries are checked again.
    env.api.apply(
        Resource::Services,
        json!({"metadata": {"name": "late", "namespace": "shop"},
               "spec": {"clusterIP": "192.0.2.90", "ports": [{"port": 80}]}}),
    );
    let deadline = Instant::now() + scaled(Duration::from_secs(10));
    while daemon.maps_json().contains("192.0.2.90") {
        assert!(Instant::now() < deadline, "{}", daemon.maps_json());
        std::thread::sleep(Duration::from_millis(50));
    }
    let got = read_from(&env, shop, "192.0.2.90");
    assert!(!got.contains("203.0.113.66"), "{got}");
}

/// Names under the cluster domain are the Services': namespace `evil` made, before
/// shop's Service existed, an entry naming it and a wildcard over every Service name.
/// Neither ever answers a shop pod: first the name does not exist, then the Service
/// answers. A name below `svc.cluster.local` nobody defined is not the wildcard's
/// either. A PTR sweep from shop does not find evil's private entry, while
/// evil's own pods do.
#[test]
fn a_squatter_under_the_cluster_domain_loses_to_the_service_and_ptr_follows_export_to() {
    if !privileged() {
        return;
    }
    let mut env = NodeEnv::new(&[("shop", Some("enabled")), ("evil", Some("enabled"))]);
    env.api.apply(
        Resource::ServiceEntries,
        json!({"metadata": {"name": "squat", "namespace": "evil", "creationTimestamp": "2020-01-01T00:00:00Z"},
               "spec": {"hosts": ["web.shop.svc.cluster.local", "*.svc.cluster.local"], "addresses": ["192.0.2.66"],
                        "resolution": "STATIC", "endpoints": [{"address": "203.0.113.66"}]}}),
    );
    env.api.apply(
        Resource::ServiceEntries,
        json!({"metadata": {"name": "private", "namespace": "evil"},
               "spec": {"hosts": ["secret.evil.example"], "addresses": ["192.0.2.68"], "exportTo": ["."],
                        "resolution": "STATIC", "endpoints": [{"address": "203.0.113.68"}]}}),
    );
    let shop = env.add_pod("shopper", "shop", &[]);
    let evil = env.add_pod("mallory", "evil", &[]);
    let daemon = env.start_daemon(&[]);
    env.wait_for_answer(evil, "secret.evil.example", "192.0.2.68");
    // No such Service yet: NXDOMAIN (the daemon holds every Service), not the squatter.
    let (status, answers, _) = dig_full(&env, shop, "web.shop.svc.cluster.local");
    assert_eq!(
        (status.as_str(), answers),
        ("NXDOMAIN", vec![]),
        "not the squatter"
    );
    env.api.apply(
        Resource::Services,
        json!({"metadata": {"name": "web", "namespace": "shop", "creationTimestamp": "2024-01-01T00:00:00Z"},
               "spec": {"clusterIP": "10.96.50.50", "ports": [{"port": 80}]}}),
    );
    env.wait_for_answer(shop, "web.shop.svc.cluster.local", "10.96.50.50");
    env.wait_for_answer(evil, "web.shop.svc.cluster.local", "10.96.50.50");
    let (status, answers, _) = dig_full(&env, shop, "nope.shop.svc.cluster.local");
    assert_eq!(
        (status.as_str(), answers),
        ("NXDOMAIN", vec![]),
        "not the wildcard"
    );
    let ptr = |pod: usize| env.dig_short(pod, &["-x", "192.0.2.68"]);
    assert_eq!(ptr(evil), "secret.evil.example.");
    assert_ne!(
        ptr(shop),
        "secret.evil.example.",
        "a sweep from shop finds it"
    );
    let metrics = env.metrics();
    assert!(
        metrics.contains("dnsproxy_entries_refused_total{reason=\"cluster_name\"} 2"),
        "{metrics}"
    );
    drop(daemon);
}

/// The issue's first reproduction, kept in the kernel: one host in three namespaces,
/// one auto-allocated VIP. `old`'s entry is exported everywhere, `shop`'s and `evil`'s
/// (the oldest) to their own namespace only; evil also declares, for itself, an
/// external address shop's pods use. Each pod's `connect()` to the VIP reaches the entry
/// its namespace sees (its own first, then the oldest exported to it), and shop's
/// connect to the external address reaches the real host. Before views, every pod
/// reached evil's endpoint (the oldest entry held the VIP, and every address, for all).
#[test]
fn each_namespace_connects_to_the_entry_it_sees_and_never_to_anothers_private_one() {
    if !privileged() {
        return;
    }
    let mut env = NodeEnv::new(&[
        ("shop", Some("enabled")),
        ("evil", Some("enabled")),
        ("other", Some("enabled")),
    ]);
    std::fs::write(env.dir.join("resolv.conf"), "nameserver 10.96.0.10\n").unwrap();
    let entry = |ns: &str, created: &str, export_to: &str, endpoint: &str| {
        json!({"metadata": {"name": "api", "namespace": ns, "creationTimestamp": created},
               "spec": {"hosts": ["api.example"], "exportTo": [export_to], "resolution": "STATIC",
                        "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                        "endpoints": [{"address": endpoint}]}})
    };
    env.api.apply(
        Resource::ServiceEntries,
        entry("old", "2020-01-01T00:00:00Z", "*", "203.0.113.1"),
    );
    env.api.apply(
        Resource::ServiceEntries,
        entry("shop", "2024-01-01T00:00:00Z", ".", "203.0.113.2"),
    );
    env.api.apply(
        Resource::ServiceEntries,
        entry("evil", "2019-01-01T00:00:00Z", ".", "203.0.113.66"),
    );
    env.api.apply(
        Resource::ServiceEntries,
        json!({"metadata": {"name": "ext", "namespace": "evil", "creationTimestamp": "2019-01-01T00:00:00Z"},
               "spec": {"hosts": ["ext.evil.example"], "addresses": ["198.51.100.10"], "exportTo": ["."],
                        "resolution": "STATIC", "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                        "endpoints": [{"address": "203.0.113.66"}]}}),
    );
    let pods = [
        env.add_pod("shopper", "shop", &[]),
        env.add_pod("mallory", "evil", &[]),
        env.add_pod("bystander", "other", &[]),
    ];
    // Every address a connection may end at, live in every pod: a wrong translation
    // answers with the wrong banner instead of failing.
    let mut servers = Vec::new();
    for pod in pods {
        for addr in [
            "203.0.113.1",
            "203.0.113.2",
            "203.0.113.66",
            "198.51.100.10",
        ] {
            env.pods[pod].netns.add_addr(&format!("{addr}/32"));
            servers.push(BannerServer::start(
                &env.pods[pod].netns,
                &format!("{addr}:80"),
            ));
        }
    }
    let daemon = env.start_daemon(&[]);
    env.wait_for_answer(pods[1], "ext.evil.example", "198.51.100.10");
    let vip = env.dig(pods[0], "api.example");
    assert!(vip.starts_with("240.240."), "{vip}");
    for pod in pods {
        assert_eq!(env.dig(pod, "api.example"), vip, "one VIP for the host");
    }
    let banner = |pod: usize, addr: &str| {
        let got = read_from(&env, pod, addr);
        println!("{} → {addr}:80: {got}", env.pods[pod].namespace);
        got
    };
    let reached = |got: &str| {
        got.strip_prefix("hello from ")
            .and_then(|r| r.split(':').next())
            .unwrap_or("")
            .to_owned()
    };
    assert_eq!(reached(&banner(pods[0], &vip)), "203.0.113.2", "shop's own");
    assert_eq!(
        reached(&banner(pods[1], &vip)),
        "203.0.113.66",
        "evil's own"
    );
    assert_eq!(
        reached(&banner(pods[2], &vip)),
        "203.0.113.1",
        "the oldest exported to other (evil's is older, but private)"
    );
    assert_eq!(
        reached(&banner(pods[0], "198.51.100.10")),
        "198.51.100.10",
        "the real host, not evil's endpoint"
    );
    assert_eq!(reached(&banner(pods[1], "198.51.100.10")), "203.0.113.66");
    let maps: serde_json::Value = serde_json::from_str(&daemon.maps_json()).unwrap();
    let views: Vec<u64> = maps["policy"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["view"].as_u64().unwrap())
        .collect();
    assert!(
        views.iter().all(|v| *v != 0),
        "every pod has a view: {views:?}"
    );
    let scoped = maps["vips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vip"] == vip.as_str())
        .map(|v| v["scoped"].clone());
    assert_eq!(scoped, Some(json!(true)), "{maps}");
}

/// Another node (or anyone who can write the ConfigMap) swaps two hosts' VIPs in the
/// VIP store. This daemon, which agreed on them before and hands them out, refuses
/// both moves and counts them: its answers do not change. Before, it adopted the
/// store as it was, and every client's cached VIP of one host reached the other.
#[test]
fn a_swapped_vip_store_is_not_adopted() {
    if !privileged() {
        return;
    }
    let env = NodeEnv::new(&[("default", None)]);
    let _daemon = env.start_daemon(&[]);
    apply_concurrently(&env.api, 0..2);
    let before = wait_hosts(&env.node, DEBUG_ADDR, 2);
    let stored = || {
        env.api
            .get(Resource::ConfigMaps, "dnsproxy-system", "dnsproxy-vips")
            .and_then(|cm| cm["data"]["vips.json"].as_str().map(str::to_owned))
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .map(|v| v["hosts"].clone())
            .unwrap_or_default()
    };
    let deadline = Instant::now() + scaled(Duration::from_secs(10));
    while stored().as_object().map_or(0, serde_json::Map::len) < 2 {
        assert!(Instant::now() < deadline, "the store: {}", stored());
        std::thread::sleep(Duration::from_millis(50));
    }
    let hosts = stored();
    let (a, b) = ("h0.agree.example", "h1.agree.example");
    let swapped = json!({"hosts": {a: hosts[b], b: hosts[a]}});
    let mut cm = env
        .api
        .get(Resource::ConfigMaps, "dnsproxy-system", "dnsproxy-vips")
        .unwrap();
    cm["data"]["vips.json"] = json!(swapped.to_string());
    env.api.apply(Resource::ConfigMaps, cm);
    // Until the daemon has acted on the swap: refused it (counted), or followed it.
    let refused = || {
        env.metrics()
            .lines()
            .find_map(|l| l.strip_prefix("dnsproxy_vip_store_moves_refused_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + scaled(Duration::from_secs(10));
    while refused() < 2 && vips_seen(&env.node, DEBUG_ADDR) == before {
        assert!(Instant::now() < deadline, "{}", env.metrics());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(vips_seen(&env.node, DEBUG_ADDR), before, "VIPs moved");
    assert_eq!(refused(), 2);
    println!("store swapped {a} and {b}: refused, answers unchanged: {before:?}");
    assert_rbac_grants_every_request(&env);
}

/// 65,540 auto-allocated hosts, more than the 65,534 VIPs: the table still builds,
/// the hosts past the last slot are counted, and Services keep answering. Before, the
/// allocator failed and the whole table stayed as it was (here: never built, so not
/// even the Service answered).
#[test]
fn more_hosts_than_vips_still_answer_services() {
    if !privileged() {
        return;
    }
    let mut env = NodeEnv::new(&[("default", Some("enabled"))]);
    let hosts: Vec<String> = (0..65_540).map(|i| format!("h{i}.many.example")).collect();
    env.api.apply(
        Resource::ServiceEntries,
        json!({"metadata": {"name": "many", "namespace": "default"},
               "spec": {"hosts": hosts, "resolution": "STATIC",
                        "endpoints": [{"address": "192.0.2.1"}],
                        "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}]}}),
    );
    env.api.apply(
        Resource::Services,
        json!({"metadata": {"name": "reviews", "namespace": "default"}, "spec": {"clusterIP": REVIEWS_IP}}),
    );
    let pod = env.add_pod("client", "default", &[]);
    let _daemon = env.start_daemon(&[]);
    env.wait_for_answer(pod, "reviews.default.svc.cluster.local", REVIEWS_IP);
    let metrics = env.metrics();
    assert_eq!(
        metric_value(&metrics, "dnsproxy_vip_hosts_unallocated"),
        6,
        "{metrics}"
    );
    println!("65,540 hosts: Service answered, 6 hosts without a VIP counted");
}

/// `--max-hosts-per-namespace 2`: namespace `greedy` asks for five hosts, its oldest
/// entry's come first; the three past the bound are refused and counted, get no VIP
/// and go to the cluster DNS, while another namespace's hosts are untouched.
#[test]
fn a_namespace_past_its_host_quota_is_refused_the_rest() {
    if !privileged() {
        return;
    }
    let mut env = NodeEnv::new(&[("greedy", Some("enabled")), ("team", Some("enabled"))]);
    let entry = |ns: &str, name: &str, created: &str, hosts: &[&str]| {
        json!({"metadata": {"name": name, "namespace": ns, "creationTimestamp": created},
               "spec": {"hosts": hosts, "resolution": "STATIC",
                        "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                        "endpoints": [{"address": "192.0.2.1"}]}})
    };
    env.api.apply(
        Resource::ServiceEntries,
        entry(
            "greedy",
            "new",
            "2025-01-01T00:00:00Z",
            &["g2.example", "g3.example", "g4.example", "g5.example"],
        ),
    );
    env.api.apply(
        Resource::ServiceEntries,
        entry("greedy", "old", "2020-01-01T00:00:00Z", &["g1.example"]),
    );
    env.api.apply(
        Resource::ServiceEntries,
        entry(
            "team",
            "mine",
            "2025-06-01T00:00:00Z",
            &["t1.example", "t2.example"],
        ),
    );
    let pod = env.add_pod("client", "team", &[]);
    let _daemon = env.start_daemon(&["--max-hosts-per-namespace", "2"]);
    for host in ["g1.example", "g2.example", "t1.example", "t2.example"] {
        let got = env.dig(pod, host);
        assert!(got.starts_with("240.240."), "{host}: {got}");
    }
    for host in ["g3.example", "g4.example", "g5.example"] {
        assert_eq!(env.dig(pod, host), FAKE_A, "{host} goes to the cluster DNS");
    }
    let metrics = env.metrics();
    assert!(
        metrics.contains("dnsproxy_entries_refused_total{reason=\"quota\"} 3"),
        "{metrics}"
    );
}

/// `args` as the sidecar proxy's user (uid and gid 1337), inside pod `pod`.
fn as_proxy(env: &NodeEnv, pod: usize, args: &[&str]) -> String {
    let mut all = vec![
        "setpriv",
        "--reuid",
        "1337",
        "--regid",
        "1337",
        "--clear-groups",
    ];
    all.extend_from_slice(args);
    let out = env.in_pod(pod, &all);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Istio's outbound capture in pod `pod`'s netns, as its init container writes it: TCP
/// goes to the proxy's 15001, except the proxy's own (uid 1337) and loopback.
fn istio_iptables(env: &NodeEnv, pod: usize) {
    let netns = &env.pods[pod].netns;
    // A pod's netns routes everywhere (its eth0); here a default route on lo stands for
    // it, so that a connect to a VIP is routed, then redirected to the proxy.
    let out = run_with_timeout(
        netns
            .command("ip")
            .args(["route", "add", "default", "dev", "lo"]),
        Duration::from_secs(10),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for rule in [
        &["-t", "nat", "-N", "ISTIO_OUTPUT"][..],
        &[
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-j",
            "ISTIO_OUTPUT",
        ],
        &[
            "-t",
            "nat",
            "-A",
            "ISTIO_OUTPUT",
            "-m",
            "owner",
            "--uid-owner",
            "1337",
            "-j",
            "RETURN",
        ],
        &[
            "-t",
            "nat",
            "-A",
            "ISTIO_OUTPUT",
            "-d",
            "127.0.0.1/32",
            "-j",
            "RETURN",
        ],
        &[
            "-t",
            "nat",
            "-A",
            "ISTIO_OUTPUT",
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        ],
    ] {
        let out = run_with_timeout(
            netns.command("iptables").args(rule),
            Duration::from_secs(10),
        );
        assert!(
            out.status.success(),
            "iptables {rule:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A pod with an Istio sidecar, built as the injector builds one (its annotation, the
/// init step's iptables, a proxy listening on 15001 that reads `SO_ORIGINAL_DST`),
/// beside a plain pod. In the sidecar pod the app resolves the VIP Istio allocated
/// (`status.addresses`) and its connection reaches the proxy with that VIP as the
/// original destination; the proxy's own user gets the cluster DNS's real answer. The
/// plain pod keeps today's behaviour: its connect is translated to the backend, and
/// uid 1337 there is captured like anyone. Without sidecar mode, the sidecar pod's
/// connect was translated before the proxy's capture (the proxy saw the backend) and
/// its proxy got the VIP.
#[test]
fn a_sidecar_pod_keeps_its_proxy_in_the_loop() {
    if !privileged() {
        return;
    }
    let mut env = NodeEnv::new(&[("shop", Some("enabled"))]);
    std::fs::write(env.dir.join("resolv.conf"), "nameserver 10.96.0.10\n").unwrap();
    env.api.apply(
        Resource::ServiceEntries,
        json!({"metadata": {"name": "pay", "namespace": "shop"},
               "spec": {"hosts": ["pay.example"], "resolution": "STATIC",
                        "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                        "endpoints": [{"address": "203.0.113.20"}]},
               "status": {"addresses": [{"value": "240.240.50.50", "host": "pay.example"}]}}),
    );
    let sidecar = env.add_pod(
        "with-sidecar",
        "shop",
        &[(
            "sidecar.istio.io/status",
            r#"{"containers":["istio-proxy"]}"#,
        )],
    );
    let plain = env.add_pod("plain", "shop", &[]);
    let mut servers = Vec::new();
    for pod in [sidecar, plain] {
        env.pods[pod].netns.add_addr("203.0.113.20/32");
        servers.push(BannerServer::start(&env.pods[pod].netns, "203.0.113.20:80"));
    }
    istio_iptables(&env, sidecar);
    let envoy = EnvoyStub::start(&env.pods[sidecar].netns, "0.0.0.0:15001");
    let daemon = env.start_daemon(&[]);
    env.wait_for_answer(sidecar, "pay.example", "240.240.50.50");

    let app = read_from(&env, sidecar, "pay.example");
    println!("sidecar pod, app → pay.example:80: {app}");
    assert_eq!(app, "envoy saw 240.240.50.50:80", "the proxy sees the VIP");
    assert_eq!(envoy.connections(), 1);
    let proxy = as_proxy(
        &env,
        sidecar,
        &[
            "dig",
            "+short",
            "+time=2",
            "+tries=1",
            "@10.96.0.10",
            "pay.example",
        ],
    );
    println!("sidecar pod, uid 1337 → pay.example: {proxy}");
    assert_eq!(
        proxy, FAKE_A,
        "the proxy's own lookups reach the cluster DNS"
    );

    let app = read_from(&env, plain, "pay.example");
    println!("plain pod, app → pay.example:80: {app}");
    assert!(app.starts_with("hello from 203.0.113.20:80"), "{app}");
    let uid_1337 = as_proxy(
        &env,
        plain,
        &[
            "dig",
            "+short",
            "+time=2",
            "+tries=1",
            "@10.96.0.10",
            "pay.example",
        ],
    );
    assert_eq!(
        uid_1337, "240.240.50.50",
        "no sidecar: captured like anyone"
    );

    let maps: serde_json::Value = serde_json::from_str(&daemon.maps_json()).unwrap();
    let sidecars = maps["policy"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["sidecar"] == true)
        .count();
    assert_eq!(sidecars, 1, "{maps}");
    for counter in ["proxy_exempt", "sidecar_passthrough"] {
        assert!(
            maps["counters"][counter].as_u64().unwrap_or(0) >= 1,
            "{counter}: {maps}"
        );
    }
}
