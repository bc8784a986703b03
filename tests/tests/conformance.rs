//! Every query shape, end to end through the eBPF redirect with real `dig` (and raw
//! Python sockets for what dig cannot send): the answer a careful resolver gives it.
use dnsproxy_e2e::*;

/// A host with an address, a Kubernetes Service, an `ExternalName` whose target fails
/// upstream, and a host with too many addresses for 512 bytes.
const REGISTRY: &str = r"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: conf, namespace: default}
spec: {hosts: [conf.test], addresses: [240.240.3.1], resolution: STATIC}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec: {clusterIP: 10.100.0.5, ports: [{port: 9080, name: http}]}
---
apiVersion: v1
kind: Service
metadata: {name: gone, namespace: default}
spec: {type: ExternalName, externalName: gone.example}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: big, namespace: default}
spec:
  hosts: [big.test]
  resolution: STATIC
  addresses: [240.242.0.1, 240.242.0.2, 240.242.0.3, 240.242.0.4, 240.242.0.5, 240.242.0.6,
              240.242.0.7, 240.242.0.8, 240.242.0.9, 240.242.0.10, 240.242.0.11, 240.242.0.12,
              240.242.0.13, 240.242.0.14, 240.242.0.15, 240.242.0.16, 240.242.0.17, 240.242.0.18,
              240.242.0.19, 240.242.0.20, 240.242.0.21, 240.242.0.22, 240.242.0.23, 240.242.0.24,
              240.242.0.25, 240.242.0.26, 240.242.0.27, 240.242.0.28, 240.242.0.29, 240.242.0.30,
              240.242.0.31, 240.242.0.32, 240.242.0.33]
";

/// What dig showed: status, header flags, and the section counts.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    status: String,
    flags: Vec<String>,
    answer: usize,
    authority: usize,
}

fn seen(text: &str) -> Seen {
    let status = text
        .lines()
        .find_map(|l| l.split("status: ").nth(1))
        .and_then(|s| s.split(',').next())
        .unwrap_or("none")
        .to_owned();
    let flag_line = text
        .lines()
        .find(|l| l.starts_with(";; flags:"))
        .unwrap_or("");
    let flags = flag_line
        .trim_start_matches(";; flags:")
        .split(';')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let count = |section: &str| {
        flag_line
            .split(&format!("{section}: "))
            .nth(1)
            .and_then(|s| s.split(',').next())
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(usize::MAX)
    };
    Seen {
        status,
        flags,
        answer: count("ANSWER"),
        authority: count("AUTHORITY"),
    }
}

/// One shape: dig's arguments, the status, whether `aa` (from the table) and `tc`, and
/// the section counts.
struct Case {
    what: &'static str,
    args: &'static [&'static str],
    status: &'static str,
    aa: bool,
    tc: bool,
    answer: usize,
    authority: usize,
}

const fn case(
    what: &'static str,
    args: &'static [&'static str],
    status: &'static str,
    aa: bool,
    answer: usize,
    authority: usize,
) -> Case {
    Case {
        what,
        args,
        status,
        aa,
        tc: false,
        answer,
        authority,
    }
}

const CASES: &[Case] = &[
    case(
        "A from the table",
        &["conf.test", "A"],
        "NOERROR",
        true,
        1,
        0,
    ),
    case("case kept", &["CoNf.TeSt", "A"], "NOERROR", true, 1, 0),
    case(
        "NODATA with SOA (no IPv6 address)",
        &["conf.test", "AAAA"],
        "NOERROR",
        true,
        0,
        1,
    ),
    case(
        "EDNS version 1: BADVERS",
        &["+edns=1", "+noednsneg", "conf.test", "A"],
        "BADVERS",
        false,
        0,
        0,
    ),
    case(
        "class CH: relayed, not the table's",
        &["conf.test", "CH", "TXT"],
        "NOERROR",
        false,
        0,
        0,
    ),
    case(
        "ANY: the addresses (RFC 8482)",
        &["conf.test", "ANY"],
        "NOERROR",
        true,
        1,
        0,
    ),
    case(
        "TXT of a table name: NODATA",
        &["conf.test", "TXT"],
        "NOERROR",
        true,
        0,
        1,
    ),
    case(
        "MX of a table name: NODATA",
        &["conf.test", "MX"],
        "NOERROR",
        true,
        0,
        1,
    ),
    case(
        "HTTPS of a table name: NODATA",
        &["conf.test", "HTTPS"],
        "NOERROR",
        true,
        0,
        1,
    ),
    case(
        "SVCB of a table name: NODATA",
        &["conf.test", "SVCB"],
        "NOERROR",
        true,
        0,
        1,
    ),
    case(
        "SRV of a Kubernetes Service: the cluster DNS's",
        &["_http._tcp.reviews.default.svc.cluster.local", "SRV"],
        "NOERROR",
        false,
        0,
        0,
    ),
    case(
        "ExternalName whose target fails upstream: SERVFAIL",
        &["gone.default.svc.cluster.local", "AAAA"],
        "SERVFAIL",
        false,
        0,
        0,
    ),
    case(
        "other opcodes: NOTIMP",
        &["+opcode=status", "conf.test"],
        "NOTIMP",
        false,
        0,
        0,
    ),
    Case {
        what: "over 512 bytes without EDNS: TC, the addresses that fit",
        args: &["+noedns", "+ignore", "big.test", "A"],
        status: "NOERROR",
        aa: true,
        tc: true,
        answer: 30,
        authority: 0,
    },
];

#[test]
fn every_query_shape_gets_the_rfc_answer_through_the_redirect() {
    if !privileged() {
        return;
    }
    let env = TestEnv::with_registry(REGISTRY);
    env.fake.set("gone.example", &["192.0.2.9"], 60);
    env.fake.fail_aaaa("gone.example", true);
    let _daemon = env.start_daemon();
    let mut wrong = Vec::new();
    for c in CASES {
        let text = stdout(&env.dig(c.args));
        let got = seen(&text);
        let flag = |f: &str| got.flags.iter().any(|g| g == f);
        let ok = got.status == c.status
            && flag("aa") == c.aa
            && flag("tc") == c.tc
            && (got.answer, got.authority) == (c.answer, c.authority);
        println!(
            "{:<56} {} {:?}",
            c.what,
            if ok { "ok" } else { "WRONG" },
            got
        );
        if !ok {
            wrong.push(format!("{}: {got:?}\n{text}", c.what));
        }
    }
    // AXFR goes over TCP, and dig reports a refused transfer instead of a status.
    let axfr = stdout(&env.dig(&["conf.test", "AXFR"]));
    if !axfr.contains("Transfer failed") {
        wrong.push(format!("AXFR: {axfr}"));
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// What dig cannot send (or not over UDP): two questions (FORMERR), IXFR over UDP
/// (NOTIMP), and a response (never answered).
#[test]
fn two_questions_get_formerr_ixfr_notimp_and_a_response_gets_nothing() {
    if !privileged() {
        return;
    }
    let env = TestEnv::with_registry(REGISTRY);
    let _daemon = env.start_daemon();
    let script = r#"
import socket
def name(n):
    return b"".join(bytes([len(l)]) + l.encode() for l in n.split(".")) + b"\0"
q = name("conf.test") + b"\x00\x01\x00\x01"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.0)
s.sendto(b"\x12\x34\x01\x00\x00\x02\x00\x00\x00\x00\x00\x00" + q + q, ("10.96.0.10", 53))
r = s.recv(512)
print("two", r[0:2].hex(), r[3] & 0x0f)
s.sendto(b"\x12\x36\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + name("conf.test") + b"\x00\xfb\x00\x01", ("10.96.0.10", 53))
r = s.recv(512)
print("ixfr", r[0:2].hex(), r[3] & 0x0f)
s.sendto(b"\x12\x35\x81\x00\x00\x01\x00\x00\x00\x00\x00\x00" + q, ("10.96.0.10", 53))
try:
    s.recv(512)
    print("response answered")
except socket.timeout:
    print("response dropped")
"#;
    let out = env.python(script, false);
    assert_eq!(
        out, "two 1234 1\nixfr 1236 4\nresponse dropped",
        "FORMERR is 1, NOTIMP 4: {out}"
    );
}
