//! The admin endpoint: probes, metrics (`OpenMetrics` text with the eBPF counters), 404
//! for unknown paths and 405 for anything but GET/HEAD; the name table dump only on the
//! loopback debug endpoint.
use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use dnsproxy_e2e::*;

/// Sends `request` (a whole HTTP/1.1 request) to the admin port inside `netns`.
fn raw(netns: &Netns, request: &'static str) -> String {
    netns.within(move || {
        let mut s = TcpStream::connect(ADMIN_ADDR).expect("admin port");
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    })
}

#[test]
fn admin_routes_status_codes_and_metrics() {
    if !privileged() {
        return;
    }
    let env = TestEnv::new();
    let _daemon = env.start_daemon();
    let answer = env.dig(&["registry.test", "A"]);
    assert_eq!(dig_answers(&answer), ["240.240.1.1"]);

    let get_from = |addr: &'static str, path: &'static str| {
        env.netns
            .within(move || http_get(addr, path))
            .unwrap_or_default()
    };
    let get = |path: &'static str| get_from(ADMIN_ADDR, path);
    assert!(
        get("/healthz").starts_with("HTTP/1.1 200"),
        "{}",
        get("/healthz")
    );
    assert!(get("/readyz").starts_with("HTTP/1.1 200"));
    let metrics = get("/metrics");
    for want in [
        "HTTP/1.1 200",
        "content-type: application/openmetrics-text",
        "dns_requests_total{type=\"A\",protocol=\"udp\",result=\"local\"} 1",
        "dnsproxy_ebpf_decisions_total{decision=\"redirected\"} ",
        "dns_cache_entries 0",
        "# EOF",
    ] {
        assert!(metrics.contains(want), "missing {want} in\n{metrics}");
    }
    // The name table only on the loopback debug endpoint, and nothing else there.
    let ndsz = get_from(DEBUG_ADDR, "/debug/ndsz");
    assert!(
        ndsz.contains("application/json") && ndsz.contains("\"registry.test\""),
        "{ndsz}"
    );
    assert!(get("/debug/ndsz").starts_with("HTTP/1.1 404"));
    assert!(get_from(DEBUG_ADDR, "/metrics").starts_with("HTTP/1.1 404"));
    let missing = get("/nope");
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    let post = raw(
        &env.netns,
        "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    assert!(
        post.to_ascii_lowercase().contains("allow: get, head"),
        "{post}"
    );
    let head = raw(
        &env.netns,
        "HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}
