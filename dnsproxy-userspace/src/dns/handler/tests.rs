use std::time::{Duration, Instant};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{
        Name, RData, Record, rdata,
        rdata::opt::{ClientSubnet, EdnsOption},
    },
};

use super::*;
use crate::dns::testing::{client, ctx, handler_with, handler_with_limits, node_handler};

fn query(name: &str, qtype: RecordType, edns: bool) -> Message {
    let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(4096);
        m.set_edns(e);
    }
    m
}

async fn ask(h: &Handler, m: &Message, proto: Protocol) -> Message {
    let bytes = h
        .handle(&m.to_vec().unwrap(), proto, client(), &ctx())
        .await
        .expect("an answer");
    Message::from_vec(&bytes).unwrap()
}

/// Answer records as "owner TYPE data" strings, sorted (answers are shuffled).
fn records(m: &Message) -> Vec<String> {
    let mut v: Vec<String> = m
        .answers
        .iter()
        .map(|r| format!("{} {} {}", r.name, r.record_type(), r.data))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn local_answer_rules() {
    struct Case {
        name: &'static str,
        query: Message,
        want: Vec<String>,
        want_soa: bool,
    }
    let h = handler_with(vec![], false);
    let vip = |host: &str| -> String {
        match &h.registry.table().get(host).unwrap().target {
            crate::registry::table::Target::Addresses(a) => a.ipv4().next().unwrap().to_string(),
            t @ crate::registry::table::Target::Cname(_) => panic!("{t:?}"),
        }
    };
    let aliyun = vip("aliyun.com");
    let alibaba = vip("alibabacloud.com");
    let s = |v: &[&str]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
    let cases = vec![
        Case {
            name: "A for an auto-allocated host",
            query: query("aliyun.com.", RecordType::A, false),
            want: vec![format!("aliyun.com. A {aliyun}")],
            want_soa: false,
        },
        Case {
            name: "question echoed as sent (case kept)",
            query: query("AliYun.COM.", RecordType::A, false),
            want: vec![format!("AliYun.COM. A {aliyun}")],
            want_soa: false,
        },
        Case {
            name: "search-suffix query answered with CNAME + A",
            query: query(
                "alibabacloud.com.default.svc.cluster.local.",
                RecordType::A,
                true,
            ),
            want: {
                let mut v = vec![
                    "alibabacloud.com.default.svc.cluster.local. CNAME alibabacloud.com."
                        .to_owned(),
                    format!("alibabacloud.com. A {alibaba}"),
                ];
                v.sort();
                v
            },
            want_soa: false,
        },
        Case {
            name: "every search domain, not only the first",
            query: query("fixed.test.cluster.local.", RecordType::A, false),
            want: s(&[
                "fixed.test. A 240.241.0.1",
                "fixed.test. A 240.241.0.2",
                "fixed.test.cluster.local. CNAME fixed.test.",
            ]),
            want_soa: false,
        },
        Case {
            name: "AAAA of an auto-allocated host with IPv6 backends",
            query: query("aliyun.com.", RecordType::AAAA, false),
            want: vec![format!("aliyun.com. AAAA 2001:2::{}", {
                let o: std::net::Ipv4Addr = aliyun.parse().unwrap();
                format!("{:x}", u16::from_be_bytes([o.octets()[2], o.octets()[3]]))
            })],
            want_soa: false,
        },
        Case {
            name: "no AAAA for an auto-allocated host without IPv6 backends",
            query: query("alibabacloud.com.", RecordType::AAAA, false),
            want: vec![],
            want_soa: true,
        },
        Case {
            name: "NODATA with SOA for the missing family",
            query: query("v4only.test.", RecordType::AAAA, false),
            want: vec![],
            want_soa: true,
        },
        Case {
            name: "Kubernetes short name in the client's namespace",
            query: query("reviews.", RecordType::A, false),
            want: s(&["reviews. A 10.0.0.5"]),
            want_soa: false,
        },
        Case {
            name: "svc.ns form",
            query: query("reviews.default.", RecordType::A, false),
            want: s(&["reviews.default. A 10.0.0.5"]),
            want_soa: false,
        },
        Case {
            name: "ExternalName: CNAME then the target's records",
            query: query("ext.default.svc.cluster.local.", RecordType::A, false),
            want: s(&[
                "ext.default.svc.cluster.local. CNAME fixed.test.",
                "fixed.test. A 240.241.0.1",
                "fixed.test. A 240.241.0.2",
            ]),
            want_soa: false,
        },
        Case {
            name: "PTR of a ClusterIP",
            query: query("5.0.0.10.in-addr.arpa.", RecordType::PTR, false),
            want: s(&["5.0.0.10.in-addr.arpa. PTR reviews.default.svc.cluster.local."]),
            want_soa: false,
        },
        Case {
            name: "PTR of an auto-allocated VIP",
            query: query(
                &{
                    let o: std::net::Ipv4Addr = aliyun.parse().unwrap();
                    let o = o.octets();
                    format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
                },
                RecordType::PTR,
                false,
            ),
            want: vec![format!("{} PTR aliyun.com.", {
                let o: std::net::Ipv4Addr = aliyun.parse().unwrap();
                let o = o.octets();
                format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
            })],
            want_soa: false,
        },
    ];
    for c in cases {
        let reply = ask(&h, &c.query, Protocol::Udp).await;
        assert_eq!(reply.metadata.id, 0x1234, "{}", c.name);
        assert_eq!(
            reply.metadata.response_code,
            ResponseCode::NoError,
            "{}",
            c.name
        );
        assert!(reply.metadata.authoritative, "{}: AA", c.name);
        assert_eq!(reply.queries, c.query.queries, "{}: question", c.name);
        assert_eq!(
            reply.edns.is_some(),
            c.query.edns.is_some(),
            "{}: EDNS echoed",
            c.name
        );
        assert_eq!(records(&reply), c.want, "{}", c.name);
        assert!(reply.answers.iter().all(|r| r.ttl == 30), "{}: TTL", c.name);
        assert_eq!(
            reply
                .authorities
                .iter()
                .any(|r| r.record_type() == RecordType::SOA),
            c.want_soa,
            "{}: SOA",
            c.name
        );
    }
}

#[tokio::test]
async fn rejects_what_it_cannot_answer() {
    let h = handler_with(vec![], false);

    let mut two = query("aliyun.com.", RecordType::A, false);
    two.add_query(Query::query(
        Name::from_ascii("v4only.test.").unwrap(),
        RecordType::A,
    ));
    assert_eq!(
        ask(&h, &two, Protocol::Udp).await.metadata.response_code,
        ResponseCode::FormErr
    );

    let mut status = query("aliyun.com.", RecordType::A, false);
    status.metadata.op_code = OpCode::Status;
    assert_eq!(
        ask(&h, &status, Protocol::Tcp).await.metadata.response_code,
        ResponseCode::NotImp
    );

    // A header followed by garbage: FORMERR with the same ID.
    let garbage = [
        0xab, 0xcd, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0xff, 0xff,
    ];
    let reply = h
        .handle(&garbage, Protocol::Udp, client(), &ctx())
        .await
        .expect("formerr");
    let reply = Message::from_vec(&reply).unwrap();
    assert_eq!(reply.metadata.id, 0xabcd);
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);

    // Too short to be a header: dropped.
    assert!(
        h.handle(&[1, 2, 3], Protocol::Udp, client(), &ctx())
            .await
            .is_none()
    );
    // A response is never answered.
    let mut resp = query("aliyun.com.", RecordType::A, false);
    resp.metadata.message_type = MessageType::Response;
    assert!(
        h.handle(&resp.to_vec().unwrap(), Protocol::Udp, client(), &ctx())
            .await
            .is_none()
    );
}

#[tokio::test]
async fn udp_answers_over_the_limit_are_truncated() {
    let h = handler_with(vec![], false);
    let small_query = query("big.test.", RecordType::A, false);
    let bytes = h
        .handle(
            &small_query.to_vec().unwrap(),
            Protocol::Udp,
            client(),
            &ctx(),
        )
        .await
        .unwrap();
    assert!(bytes.len() <= 512, "{} bytes", bytes.len());
    let small = Message::from_vec(&bytes).unwrap();
    assert!(small.metadata.truncation, "32 A records exceed 512 bytes");
    // The records that fit stay (a client without TCP still gets addresses), and no
    // more would: 16 bytes an A record, 12 + 14 of header and question.
    assert_eq!(small.answers.len(), (512 - 12 - 14) / 16, "{small:?}");
    assert_eq!(small.queries, small_query.queries);
    let edns = ask(&h, &query("big.test.", RecordType::A, true), Protocol::Udp).await;
    assert!(!edns.metadata.truncation);
    assert_eq!(edns.answers.len(), 32);
    let tcp = ask(&h, &query("big.test.", RecordType::A, false), Protocol::Tcp).await;
    assert_eq!(tcp.answers.len(), 32);
}

#[tokio::test]
async fn servfail_within_the_timeout_when_every_upstream_fails() {
    // A bound but silent loopback socket: the query times out.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let h = handler_with(vec![silent.local_addr().unwrap()], false);
    let started = Instant::now();
    let reply = ask(
        &h,
        &query("unknown.test.", RecordType::A, false),
        Protocol::Udp,
    )
    .await;
    assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(reply.metadata.id, 0x1234);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "bounded by the timeout"
    );
}

/// A loopback UDP upstream: `answer` makes the reply to each datagram (`None`: none).
async fn upstream_with(
    mut answer: impl FnMut(&[u8]) -> Option<Vec<u8>> + Send + 'static,
) -> SocketAddr {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        loop {
            let (n, from) = sock.recv_from(&mut buf).await.unwrap();
            if let Some(reply) = answer(&buf[..n]) {
                sock.send_to(&reply, from).await.unwrap();
            }
        }
    });
    addr
}

/// The reply to `q` with one A record `ip` (TTL 60).
fn a_reply(q: &Message, ip: &str) -> Message {
    let mut r = response_to(q);
    r.add_answer(Record::from_rdata(
        q.queries[0].name().clone(),
        60,
        RData::A(rdata::A(ip.parse().unwrap())),
    ));
    r
}

/// A loopback upstream answering every query with 198.51.100.7 (TTL 60), counting them.
async fn answering_upstream() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = Arc::clone(&count);
    let addr = upstream_with(move |bytes| {
        seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let q = Message::from_vec(bytes).unwrap();
        assert!(q.edns.is_some(), "upstream queries carry EDNS");
        Some(a_reply(&q, "198.51.100.7").to_vec().unwrap())
    })
    .await;
    (addr, count)
}

#[tokio::test]
async fn forwards_with_the_clients_id_fails_over_and_caches() {
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let (upstream, count) = answering_upstream().await;
    let h = handler_with(vec![silent.local_addr().unwrap(), upstream], false);

    let reply = ask(
        &h,
        &query("elsewhere.test.", RecordType::A, false),
        Protocol::Udp,
    )
    .await;
    assert_eq!(reply.metadata.id, 0x1234);
    assert_eq!(records(&reply), ["elsewhere.test. A 198.51.100.7"]);
    assert!(!reply.metadata.authoritative);
    assert!(reply.edns.is_none(), "no EDNS to a client that sent none");

    let again = ask(
        &h,
        &query("ELSEWHERE.test.", RecordType::A, false),
        Protocol::Tcp,
    )
    .await;
    assert_eq!(
        records(&again),
        ["ELSEWHERE.test. A 198.51.100.7"],
        "cached, question as sent"
    );
    assert_eq!(
        count.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "second answer from the cache"
    );
    assert_eq!(h.cache().len(), 1);
}

#[tokio::test]
async fn parallel_mode_takes_the_first_good_answer() {
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let (upstream, _) = answering_upstream().await;
    let h = handler_with(vec![silent.local_addr().unwrap(), upstream], true);
    let started = Instant::now();
    let reply = ask(
        &h,
        &query("fast.test.", RecordType::A, false),
        Protocol::Udp,
    )
    .await;
    assert_eq!(records(&reply), ["fast.test. A 198.51.100.7"]);
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "did not wait for the silent server"
    );
}

#[tokio::test]
async fn external_name_to_an_unknown_target_is_chased_upstream() {
    let (upstream, _) = answering_upstream().await;
    let h = handler_with(vec![upstream], false);
    let reply = ask(
        &h,
        &query("outside.default.svc.cluster.local.", RecordType::A, false),
        Protocol::Udp,
    )
    .await;
    assert_eq!(
        records(&reply),
        [
            "outside.default.svc.cluster.local. CNAME upstream-only.test.",
            "upstream-only.test. A 198.51.100.7"
        ]
    );
}

#[tokio::test]
async fn cluster_names_that_no_service_has_are_nxdomain_in_node_mode_only() {
    let (upstream, asked) = answering_upstream().await;
    let node = node_handler(vec![upstream]);
    for name in [
        // The walk of a Kubernetes search list.
        "api.example.org.default.svc.cluster.local.",
        "api.example.org.svc.cluster.local.",
        "api.example.org.cluster.local.",
        // No such Service, and so nothing below it either.
        "nope.default.svc.cluster.local.",
        "_http._tcp.nope.default.svc.cluster.local.",
        "web.no-such-namespace.svc.cluster.local.",
    ] {
        for qtype in [RecordType::A, RecordType::AAAA, RecordType::SRV] {
            let reply = ask(&node, &query(name, qtype, false), Protocol::Udp).await;
            assert_eq!(
                reply.metadata.response_code,
                ResponseCode::NXDomain,
                "{name} {qtype}"
            );
            assert!(reply.metadata.authoritative, "{name}");
            assert!(reply.answers.is_empty(), "{name}");
            let soa: Vec<String> = reply
                .authorities
                .iter()
                .map(|r| r.name.to_string())
                .collect();
            assert_eq!(
                soa,
                ["cluster.local."],
                "{name}: the zone's SOA, for the client to cache"
            );
        }
    }
    assert_eq!(count(&asked), 0, "none of them went upstream");
    // What exists, or may: a Service's own names below it, the names with nothing of
    // their own, and every name elsewhere, go where they went.
    for name in [
        "_http._tcp.reviews.default.svc.cluster.local.",
        "pod-0.reviews.default.svc.cluster.local.",
        "default.svc.cluster.local.",
        "svc.cluster.local.",
        "10-0-0-1.default.pod.cluster.local.",
        "example.org.",
    ] {
        let reply = ask(&node, &query(name, RecordType::A, false), Protocol::Udp).await;
        assert_eq!(
            reply.metadata.response_code,
            ResponseCode::NoError,
            "{name}"
        );
    }
    assert_eq!(count(&asked), 6);
    // A Service's own name is the table's, and a search-suffixed table name is still
    // its CNAME.
    let reply = ask(
        &node,
        &query("reviews.default.svc.cluster.local.", RecordType::A, false),
        Protocol::Udp,
    )
    .await;
    assert_eq!(
        records(&reply),
        ["reviews.default.svc.cluster.local. A 10.0.0.5"]
    );
    let reply = ask(
        &node,
        &query(
            "aliyun.com.default.svc.cluster.local.",
            RecordType::CNAME,
            false,
        ),
        Protocol::Udp,
    )
    .await;
    assert_eq!(
        records(&reply),
        ["aliyun.com.default.svc.cluster.local. CNAME aliyun.com."]
    );
    // Local mode's table does not hold every Service: the same name goes upstream.
    let local = handler_with(vec![upstream], false);
    let reply = ask(
        &local,
        &query("nope.default.svc.cluster.local.", RecordType::A, false),
        Protocol::Udp,
    )
    .await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    assert_eq!(count(&asked), 7);
}

/// An upstream for the search walks: names under `cluster.local` and `corp.example` do
/// not exist but for `wiki.intranet.corp.example` (198.51.100.20), every other name is
/// 198.51.100.7; it keeps the names it was asked.
async fn walk_upstream() -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
    let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&asked);
    let addr = upstream_with(move |bytes| {
        let q = Message::from_vec(bytes).unwrap();
        let name = q.queries[0].name().to_ascii();
        seen.lock()
            .unwrap()
            .push(format!("{name} {}", q.queries[0].query_type()));
        let reply = if name == "wiki.intranet.corp.example." {
            a_reply(&q, "198.51.100.20")
        } else if name.ends_with(".corp.example.") || name.ends_with(".cluster.local.") {
            let mut r = response_to(&q);
            r.metadata.response_code = ResponseCode::NXDomain;
            r
        } else {
            a_reply(&q, "198.51.100.7")
        };
        Some(reply.to_vec().unwrap())
    })
    .await;
    (addr, asked)
}

#[tokio::test]
async fn autopath_walks_the_pods_search_list_once_and_answers_with_a_cname() {
    let (upstream, asked) = walk_upstream().await;
    let h = node_handler(vec![upstream]);
    let search = [
        "default.svc.cluster.local",
        "svc.cluster.local",
        "cluster.local",
        "corp.example",
    ];
    let walker = ClientContext {
        autopath: search.iter().map(ToString::to_string).collect(),
        ..ctx()
    };
    let ask_as = async |ctx: &ClientContext, name: &str, qtype| {
        let q = query(name, qtype, false);
        let bytes = h
            .handle(&q.to_vec().unwrap(), Protocol::Udp, client(), ctx)
            .await
            .unwrap();
        Message::from_vec(&bytes).unwrap()
    };
    // An external name: the cluster's steps from the table, corp.example and the name
    // itself upstream; one answer.
    let reply = ask_as(
        &walker,
        "api.example.org.default.svc.cluster.local.",
        RecordType::A,
    )
    .await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    assert_eq!(
        reply.answers[0].record_type(),
        RecordType::CNAME,
        "the CNAME comes first"
    );
    assert_eq!(
        records(&reply),
        [
            "api.example.org. A 198.51.100.7",
            "api.example.org.default.svc.cluster.local. CNAME api.example.org."
        ]
    );
    assert_eq!(
        *asked.lock().unwrap(),
        ["api.example.org.corp.example. A", "api.example.org. A"]
    );
    assert_eq!(
        h.metrics().autopath_counts(),
        (1, 4),
        "svc, cluster, corp, the name"
    );
    // A name under the non-cluster search domain resolves there first.
    let reply = ask_as(
        &walker,
        "wiki.intranet.default.svc.cluster.local.",
        RecordType::A,
    )
    .await;
    assert_eq!(
        records(&reply),
        [
            "wiki.intranet.corp.example. A 198.51.100.20",
            "wiki.intranet.default.svc.cluster.local. CNAME wiki.intranet.corp.example."
        ]
    );
    // A table name is the table's CNAME (no walk), as is a Service.
    let reply = ask_as(
        &walker,
        "aliyun.com.default.svc.cluster.local.",
        RecordType::CNAME,
    )
    .await;
    assert_eq!(
        records(&reply),
        ["aliyun.com.default.svc.cluster.local. CNAME aliyun.com."]
    );
    let reply = ask_as(&walker, "reviews.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(
        records(&reply),
        ["reviews.default.svc.cluster.local. A 10.0.0.5"]
    );
    // Not the first search domain, or a pod that walks itself: NXDOMAIN, no walk.
    let before = asked.lock().unwrap().len();
    for (ctx, name) in [
        (&walker, "other.example.org.svc.cluster.local."),
        (&ctx(), "other.example.org.default.svc.cluster.local."),
    ] {
        let reply = ask_as(ctx, name, RecordType::A).await;
        assert_eq!(
            reply.metadata.response_code,
            ResponseCode::NXDomain,
            "{name}"
        );
    }
    assert_eq!(asked.lock().unwrap().len(), before, "nothing went upstream");
    assert_eq!(h.metrics().autopath_counts(), (2, 7));
    // The fast path leaves a question it may walk to the task that walks it.
    let q = query(
        "api.example.org.default.svc.cluster.local.",
        RecordType::AAAA,
        false,
    );
    assert!(
        h.answer_now(&q.to_vec().unwrap(), Protocol::Udp, client(), &walker)
            .is_none()
    );
    assert!(
        h.answer_now(&q.to_vec().unwrap(), Protocol::Udp, client(), &ctx())
            .is_some()
    );
}

#[tokio::test]
async fn a_walk_that_takes_longer_than_one_questions_timeout_falls_back_to_nxdomain() {
    // Every name is NXDOMAIN, each 200 ms late: two steps upstream outlast the
    // handler's 300 ms upstream timeout.
    let sock = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let upstream = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        loop {
            let (n, from) = sock.recv_from(&mut buf).await.unwrap();
            let q = Message::from_vec(&buf[..n]).unwrap();
            let sock = Arc::clone(&sock);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let mut r = response_to(&q);
                r.metadata.response_code = ResponseCode::NXDomain;
                let _ = sock.send_to(&r.to_vec().unwrap(), from).await;
            });
        }
    });
    let h = node_handler(vec![upstream]);
    let walker = ClientContext {
        autopath: ["default.svc.cluster.local", "a.example", "b.example"]
            .iter()
            .map(ToString::to_string)
            .collect(),
        ..ctx()
    };
    let q = query("x.default.svc.cluster.local.", RecordType::A, false);
    let started = Instant::now();
    let bytes = h
        .handle(&q.to_vec().unwrap(), Protocol::Udp, client(), &walker)
        .await
        .unwrap();
    let took = started.elapsed();
    let reply = Message::from_vec(&bytes).unwrap();
    assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
    assert!(
        reply.answers.is_empty(),
        "the question's own answer, no CNAME"
    );
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(550),
        "{took:?}: bounded by one question's timeout (the walk alone takes 600 ms)"
    );
    assert_eq!(h.metrics().autopath_counts(), (0, 0));
}

#[tokio::test]
async fn pods_that_opt_out_of_auto_allocation_are_forwarded() {
    let (upstream, count) = answering_upstream().await;
    let h = handler_with(vec![upstream], false);
    let opted_out = ClientContext {
        auto_allocate: false,
        ..ctx()
    };
    let q = query("aliyun.com.", RecordType::A, false);
    let bytes = h
        .handle(&q.to_vec().unwrap(), Protocol::Udp, client(), &opted_out)
        .await
        .unwrap();
    let reply = Message::from_vec(&bytes).unwrap();
    assert_eq!(
        records(&reply),
        ["aliyun.com. A 198.51.100.7"],
        "the real answer, not the VIP"
    );
    // Addresses given in the ServiceEntry are still answered locally.
    let q = query("fixed.test.", RecordType::A, false);
    let bytes = h
        .handle(&q.to_vec().unwrap(), Protocol::Udp, client(), &opted_out)
        .await
        .unwrap();
    assert!(Message::from_vec(&bytes).unwrap().metadata.authoritative);
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// A loopback upstream that answers A queries with 198.51.100.9 (TTL `ttl`) after
/// `delay`, while `answering` holds; it counts the distinct queries it receives (a
/// retransmission carries the same ID).
struct FakeUpstream {
    addr: SocketAddr,
    queries: Arc<std::sync::atomic::AtomicUsize>,
    answering: Arc<std::sync::atomic::AtomicBool>,
}

async fn fake_upstream(delay: Duration, ttl: u32) -> FakeUpstream {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
    let sock = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = sock.local_addr().unwrap();
    let (queries, answering) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(true)),
    );
    let (seen, on) = (Arc::clone(&queries), Arc::clone(&answering));
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        let mut ids = std::collections::HashSet::new();
        loop {
            let (n, from) = sock.recv_from(&mut buf).await.unwrap();
            let q = Message::from_vec(&buf[..n]).unwrap();
            if ids.insert(q.metadata.id) {
                seen.fetch_add(1, SeqCst);
            }
            if !on.load(SeqCst) {
                continue;
            }
            let mut r = response_to(&q);
            r.add_answer(Record::from_rdata(
                q.queries[0].name().clone(),
                ttl,
                RData::A(rdata::A("198.51.100.9".parse().unwrap())),
            ));
            let sock = Arc::clone(&sock);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = sock.send_to(&r.to_vec().unwrap(), from).await;
            });
        }
    });
    FakeUpstream {
        addr,
        queries,
        answering,
    }
}

fn count(c: &std::sync::atomic::AtomicUsize) -> usize {
    c.load(std::sync::atomic::Ordering::SeqCst)
}

#[tokio::test]
async fn identical_questions_in_flight_go_upstream_once() {
    let up = fake_upstream(Duration::from_millis(150), 60).await;
    let h = handler_with(vec![up.addr], false);
    let q = query("merged.test.", RecordType::A, false);
    let replies = futures::future::join_all((0..5).map(|_| ask(&h, &q, Protocol::Udp))).await;
    for r in &replies {
        assert_eq!(records(r), ["merged.test. A 198.51.100.9"]);
    }
    assert_eq!(count(&up.queries), 1, "one upstream query for five clients");
}

#[tokio::test]
async fn over_a_bound_servfail_at_once_but_the_table_still_answers() {
    // Slow, within the handler's 300 ms upstream timeout.
    let up = fake_upstream(Duration::from_millis(200), 60).await;
    let limits = inflight::Limits {
        total: 100,
        per_client: 1,
    };
    let h = handler_with_limits(vec![up.addr], false, limits, false);
    let first = query("one.test.", RecordType::A, false);
    let second = query("two.test.", RecordType::A, false);
    let local = query("fixed.test.", RecordType::A, false);
    let (slow, refused, table) = tokio::join!(
        ask(&h, &first, Protocol::Udp),
        async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let started = Instant::now();
            (ask(&h, &second, Protocol::Udp).await, started.elapsed())
        },
        async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            ask(&h, &local, Protocol::Udp).await
        },
    );
    assert_eq!(records(&slow), ["one.test. A 198.51.100.9"]);
    assert_eq!(refused.0.metadata.response_code, ResponseCode::ServFail);
    assert!(
        refused.1 < Duration::from_millis(100),
        "refused at once: {:?}",
        refused.1
    );
    assert_eq!(table.answers.len(), 2, "table answers are never refused");
    assert_eq!(count(&up.queries), 1);
}

#[tokio::test]
async fn a_failed_question_is_answered_from_memory_for_a_moment() {
    let up = fake_upstream(Duration::ZERO, 60).await;
    up.answering
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let h = handler_with(vec![up.addr], false);
    let q = query("down.test.", RecordType::A, false);
    let first = ask(&h, &q, Protocol::Udp).await;
    assert_eq!(first.metadata.response_code, ResponseCode::ServFail);
    let sent = count(&up.queries);
    let started = Instant::now();
    let again = ask(&h, &q, Protocol::Udp).await;
    assert_eq!(again.metadata.response_code, ResponseCode::ServFail);
    assert!(started.elapsed() < Duration::from_millis(50));
    assert_eq!(count(&up.queries), sent, "not asked upstream again");
}

#[tokio::test]
async fn serve_stale_answers_from_the_expired_cache_while_upstreams_fail() {
    let up = fake_upstream(Duration::ZERO, 1).await;
    let limits = inflight::Limits {
        total: 100,
        per_client: 100,
    };
    let h = handler_with_limits(vec![up.addr], false, limits, true);
    let q = query("stale.test.", RecordType::A, false);
    assert_eq!(
        records(&ask(&h, &q, Protocol::Udp).await),
        ["stale.test. A 198.51.100.9"]
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    up.answering
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let stale = ask(&h, &q, Protocol::Udp).await;
    assert_eq!(stale.metadata.response_code, ResponseCode::NoError);
    assert_eq!(records(&stale), ["stale.test. A 198.51.100.9"]);
    assert_eq!(stale.answers[0].ttl, cache::STALE_TTL);
}

#[tokio::test]
async fn a_lost_datagram_is_retransmitted_within_the_timeout() {
    // Drops the first datagram of every query, answers the retransmission.
    let mut seen = std::collections::HashSet::new();
    let addr = upstream_with(move |bytes| {
        let q = Message::from_vec(bytes).unwrap();
        (!seen.insert(q.metadata.id)).then(|| a_reply(&q, "198.51.100.3").to_vec().unwrap())
    })
    .await;
    let h = handler_with(vec![addr], false);
    let started = Instant::now();
    let reply = ask(
        &h,
        &query("lossy.test.", RecordType::A, false),
        Protocol::Udp,
    )
    .await;
    assert_eq!(records(&reply), ["lossy.test. A 198.51.100.3"]);
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "answered within the 300 ms timeout: {:?}",
        started.elapsed()
    );
}

/// An upstream for the conformance cases: `nx.*` is NXDOMAIN (with an SOA), `fail.*`
/// SERVFAIL, anything else one A record (198.51.100.7) in the question's class.
async fn conformance_upstream() -> SocketAddr {
    upstream_with(|bytes| {
        let q = Message::from_vec(bytes).unwrap();
        let name = q.queries[0].name().clone();
        let label = name.to_ascii();
        let r = if label.starts_with("nx.") {
            let mut r = response_to(&q);
            r.metadata.response_code = ResponseCode::NXDomain;
            r.add_authority(local_soa(&name));
            r
        } else if label.starts_with("fail.") {
            let mut r = response_to(&q);
            r.metadata.response_code = ResponseCode::ServFail;
            r
        } else {
            let mut r = a_reply(&q, "198.51.100.7");
            r.answers[0].dns_class = q.queries[0].query_class();
            r
        };
        Some(r.to_vec().unwrap())
    })
    .await
}

fn local_soa(owner: &Name) -> Record {
    let soa = rdata::SOA::new(
        Name::from_ascii("ns.upstream.test.").unwrap(),
        Name::from_ascii("hostmaster.upstream.test.").unwrap(),
        1,
        60,
        60,
        60,
        60,
    );
    Record::from_rdata(owner.clone(), 60, RData::SOA(soa))
}

/// A loopback upstream answering every query with 198.51.100.7 (TTL 60), keeping what
/// `see` makes of each query it got.
/// The Client Subnet option of a message.
fn subnet_of(m: &Message) -> Option<ClientSubnet> {
    match cache::client_subnet(m)? {
        EdnsOption::Subnet(s) => Some(*s),
        _ => None,
    }
}

async fn recording_upstream<T: Send + 'static>(
    see: impl Fn(&Message) -> T + Send + 'static,
) -> (SocketAddr, Arc<std::sync::Mutex<Vec<T>>>) {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    let addr = upstream_with(move |bytes| {
        let q = Message::from_vec(bytes).unwrap();
        log.lock().unwrap().push(see(&q));
        let mut r = a_reply(&q, "198.51.100.7");
        // As an ECS-aware server: the client's subnet back, with a scope.
        if let Some(subnet) = subnet_of(&q) {
            let scoped = ClientSubnet::new(subnet.addr(), subnet.source_prefix(), 20);
            let edns = r.edns.as_mut().unwrap().options_mut();
            edns.insert(EdnsOption::Subnet(scoped));
        }
        Some(r.to_vec().unwrap())
    })
    .await;
    (addr, seen)
}

/// One query shape and the answer a careful resolver gives it.
struct Shape {
    what: &'static str,
    query: Message,
    rcode: ResponseCode,
    /// Authoritative (from the table) or not (relayed).
    aa: bool,
    /// Answer records as "owner TYPE data", sorted.
    answers: Vec<String>,
    /// An SOA in the authority section (NODATA, NXDOMAIN).
    soa: bool,
}

fn with_class(mut m: Message, class: hickory_proto::rr::DNSClass) -> Message {
    let q = m.queries[0].clone();
    m.queries[0] = Query::query(q.name().clone(), q.query_type());
    m.queries[0].set_query_class(class);
    m
}

#[tokio::test]
async fn every_query_shape_gets_the_rfc_answer() {
    let h = handler_with(vec![conformance_upstream().await], false);
    let fixed = ["fixed.test. A 240.241.0.1", "fixed.test. A 240.241.0.2"];
    let s = |v: &[&str]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
    let nodata = |what, name: &str, qtype| Shape {
        what,
        query: query(name, qtype, false),
        rcode: ResponseCode::NoError,
        aa: true,
        answers: vec![],
        soa: true,
    };
    let mut edns1 = query("fixed.test.", RecordType::A, true);
    edns1.edns.as_mut().unwrap().set_version(1);
    let upstream_a = |name: &str| vec![format!("{name} A 198.51.100.7")];
    let cases = vec![
        Shape {
            what: "EDNS version 1: BADVERS",
            query: edns1,
            rcode: ResponseCode::BADVERS,
            aa: false,
            answers: vec![],
            soa: false,
        },
        Shape {
            what: "class CH of a table name: relayed, not the table's IN answer",
            query: with_class(
                query("fixed.test.", RecordType::A, false),
                hickory_proto::rr::DNSClass::CH,
            ),
            rcode: ResponseCode::NoError,
            aa: false,
            answers: upstream_a("fixed.test."),
            soa: false,
        },
        Shape {
            what: "AXFR: NOTIMP",
            query: query("fixed.test.", RecordType::AXFR, false),
            rcode: ResponseCode::NotImp,
            aa: false,
            answers: vec![],
            soa: false,
        },
        Shape {
            what: "IXFR: NOTIMP",
            query: query("fixed.test.", RecordType::IXFR, false),
            rcode: ResponseCode::NotImp,
            aa: false,
            answers: vec![],
            soa: false,
        },
        Shape {
            what: "ANY: the addresses (RFC 8482)",
            query: query("fixed.test.", RecordType::ANY, false),
            rcode: ResponseCode::NoError,
            aa: true,
            answers: s(&fixed),
            soa: false,
        },
        nodata(
            "TXT of a table name: NODATA",
            "fixed.test.",
            RecordType::TXT,
        ),
        nodata("MX of a table name: NODATA", "fixed.test.", RecordType::MX),
        nodata(
            "HTTPS of a table name: NODATA (no ipv4hint past the VIP)",
            "fixed.test.",
            RecordType::HTTPS,
        ),
        nodata(
            "SVCB of a table name: NODATA",
            "fixed.test.",
            RecordType::SVCB,
        ),
        nodata(
            "SRV of a ServiceEntry host: NODATA",
            "fixed.test.",
            RecordType::SRV,
        ),
        Shape {
            what: "SRV of a Kubernetes Service: the cluster DNS's",
            query: query("reviews.default.svc.cluster.local.", RecordType::SRV, false),
            rcode: ResponseCode::NoError,
            aa: false,
            answers: upstream_a("reviews.default.svc.cluster.local."),
            soa: false,
        },
        Shape {
            what: "ExternalName whose target does not exist: CNAME, then NXDOMAIN",
            query: query("gone.default.svc.cluster.local.", RecordType::A, false),
            rcode: ResponseCode::NXDomain,
            aa: true,
            answers: s(&["gone.default.svc.cluster.local. CNAME nx.upstream.test."]),
            soa: true,
        },
        Shape {
            what: "ExternalName whose target fails: SERVFAIL, not a dangling CNAME",
            query: query("broken.default.svc.cluster.local.", RecordType::A, false),
            rcode: ResponseCode::ServFail,
            aa: false,
            answers: vec![],
            soa: false,
        },
        nodata(
            "NODATA with SOA for the missing family",
            "v4only.test.",
            RecordType::AAAA,
        ),
        Shape {
            what: "case kept",
            query: query("FiXeD.TeSt.", RecordType::A, false),
            rcode: ResponseCode::NoError,
            aa: true,
            answers: s(&["FiXeD.TeSt. A 240.241.0.1", "FiXeD.TeSt. A 240.241.0.2"]),
            soa: false,
        },
    ];
    for case in cases {
        let reply = ask(&h, &case.query, Protocol::Udp).await;
        assert_eq!(reply.metadata.id, case.query.metadata.id, "{}", case.what);
        assert_eq!(
            reply.queries, case.query.queries,
            "{}: question echoed",
            case.what
        );
        // Compared as numbers: BADVERS shares 16 with BADSIG, which hickory decodes.
        assert_eq!(
            u16::from(reply.metadata.response_code),
            u16::from(case.rcode),
            "{}",
            case.what
        );
        assert_eq!(reply.metadata.authoritative, case.aa, "{}: aa", case.what);
        assert_eq!(records(&reply), case.answers, "{}", case.what);
        let soa = reply
            .authorities
            .iter()
            .any(|r| r.record_type() == RecordType::SOA);
        assert_eq!(soa, case.soa, "{}: SOA", case.what);
    }
}

#[tokio::test]
async fn the_clients_flags_are_relayed_and_key_the_cache() {
    let (upstream, seen) = recording_upstream(|q| {
        let dnssec_ok = q.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok);
        (
            q.metadata.recursion_desired,
            q.metadata.checking_disabled,
            dnssec_ok,
        )
    })
    .await;
    let h = handler_with(vec![upstream], false);
    let mut q = query("relay.test.", RecordType::A, true);
    q.metadata.recursion_desired = false;
    q.metadata.checking_disabled = true;
    q.edns.as_mut().unwrap().set_dnssec_ok(true);
    let reply = ask(&h, &q, Protocol::Udp).await;
    assert!(!reply.metadata.recursion_desired && reply.metadata.checking_disabled);
    assert!(reply.edns.as_ref().unwrap().flags().dnssec_ok, "DO echoed");
    // The same question with other flags is other upstream work, not a cache hit; the
    // same flags again are.
    let plain = query("relay.test.", RecordType::A, true);
    ask(&h, &plain, Protocol::Udp).await;
    ask(&h, &plain, Protocol::Udp).await;
    ask(&h, &q, Protocol::Udp).await;
    assert_eq!(
        *seen.lock().unwrap(),
        [(false, true, true), (true, false, false)],
        "(RD, CD, DO) as each client set them, each asked once"
    );
}

#[tokio::test]
async fn client_subnet_is_relayed_and_keys_the_cache_and_cookies_are_not() {
    let (upstream, seen) = recording_upstream(|q| -> Vec<u16> {
        q.edns
            .as_ref()
            .map(|e| {
                e.options()
                    .as_ref()
                    .iter()
                    .map(|(c, _)| u16::from(*c))
                    .collect()
            })
            .unwrap_or_default()
    })
    .await;
    let h = handler_with(vec![upstream], false);
    let with = |subnet: &str, cookie: bool| {
        let mut q = query("ecs.test.", RecordType::A, true);
        let opts = q.edns.as_mut().unwrap().options_mut();
        opts.insert(EdnsOption::Subnet(ClientSubnet::new(
            subnet.parse().unwrap(),
            24,
            0,
        )));
        if cookie {
            opts.insert(EdnsOption::Unknown(10, vec![1, 2, 3, 4, 5, 6, 7, 8]));
        }
        q
    };
    let first = ask(&h, &with("192.0.2.0", true), Protocol::Udp).await;
    let cached = ask(&h, &with("192.0.2.0", false), Protocol::Udp).await;
    let other = ask(&h, &with("198.51.100.0", false), Protocol::Udp).await;
    let none = ask(&h, &query("ecs.test.", RecordType::A, true), Protocol::Udp).await;
    assert_eq!(
        *seen.lock().unwrap(),
        [vec![8], vec![8], vec![]],
        "ECS (8) relayed, the cookie (10) not; one upstream query per subnet"
    );
    // The upstream's option (its scope) reaches the client that sent one, also from
    // the cache (RFC 7871 §7.2.2); a client without ECS gets none.
    let scope = |m: &Message| subnet_of(m).map(|s| (s.addr().to_string(), s.scope_prefix()));
    assert_eq!(scope(&first), Some(("192.0.2.0".to_owned(), 20)));
    assert_eq!(scope(&cached), Some(("192.0.2.0".to_owned(), 20)));
    assert_eq!(scope(&other), Some(("198.51.100.0".to_owned(), 20)));
    assert_eq!(scope(&none), None);
}

/// An upstream that answers every query with `records` (type, RDATA) owned by the
/// question name, written by hand on the wire.
async fn raw_upstream(records: Vec<(u16, Vec<u8>)>) -> SocketAddr {
    upstream_with(move |q| {
        let mut end = 12;
        while q[end] != 0 {
            end += 1 + usize::from(q[end]);
        }
        end += 5;
        let mut r = q[..end].to_vec();
        r[2] |= 0x80;
        r[3] = 0x80;
        r[6..8].copy_from_slice(&u16::try_from(records.len()).unwrap().to_be_bytes());
        r[8..12].fill(0);
        for (rtype, rdata) in &records {
            r.extend_from_slice(&[0xc0, 0x0c]);
            r.extend_from_slice(&rtype.to_be_bytes());
            r.extend_from_slice(&[0, 1, 0, 0, 0, 60]);
            r.extend_from_slice(&u16::try_from(rdata.len()).unwrap().to_be_bytes());
            r.extend_from_slice(rdata);
        }
        Some(r)
    })
    .await
}

#[tokio::test]
async fn records_hickory_has_no_type_for_pass_through_intact() {
    // An empty NULL record, and an RRSIG and a DNSKEY with arbitrary bytes.
    let rrsig: Vec<u8> = (0u8..40).collect();
    let dnskey = vec![1, 1, 3, 13, 0xaa, 0xbb, 0xcc];
    let upstream = raw_upstream(vec![(46, rrsig.clone()), (48, dnskey.clone())]).await;
    let h = handler_with(vec![upstream], false);
    let mut q = query("signed.test.", RecordType::A, true);
    q.edns.as_mut().unwrap().set_dnssec_ok(true);
    let bytes = h
        .handle(&q.to_vec().unwrap(), Protocol::Udp, client(), &ctx())
        .await
        .expect("an answer");
    let reply = Message::from_vec(&bytes).unwrap();
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    let types: Vec<u16> = reply
        .answers
        .iter()
        .map(|r| u16::from(r.record_type()))
        .collect();
    assert_eq!(types, [46, 48], "every record relayed, in order");
    // The RDATA bytes are the upstream's own.
    let wire = |rdata: &[u8]| bytes.windows(rdata.len()).any(|w| w == rdata);
    assert!(wire(&rrsig) && wire(&dnskey), "RRSIG and DNSKEY intact");
}

#[tokio::test]
async fn an_answer_with_an_empty_record_is_relayed_not_dropped() {
    let upstream = raw_upstream(vec![(10, vec![])]).await;
    let h = handler_with(vec![upstream], false);
    let q = query("empty.test.", RecordType::NULL, false);
    let bytes = h
        .handle(&q.to_vec().unwrap(), Protocol::Udp, client(), &ctx())
        .await
        .expect("an answer");
    // hickory itself would not read this reply back (an empty record outside an UPDATE),
    // so the wire is checked: NOERROR, one answer, NULL, RDLENGTH 0.
    assert_eq!(bytes[..2], [0x12, 0x34], "the client's ID");
    assert_eq!(bytes[3] & 0x0f, 0, "NOERROR, not SERVFAIL");
    assert_eq!(bytes[6..8], [0, 1], "one answer");
    let question_end = 12 + "empty.test.".len() + 1 + 4;
    assert_eq!(
        bytes[question_end..question_end + 12],
        [0xc0, 0x0c, 0, 10, 0, 1, 0, 0, 0, 60, 0, 0],
        "the empty NULL record"
    );
}

/// Found by fuzzing (fuzz/artifacts handler crash-9336bea3…): a query with six long
/// questions got a FORMERR echoing all six, 558 bytes for a client that takes 512.
#[tokio::test]
async fn an_error_for_many_long_questions_still_fits_the_clients_limit() {
    let h = handler_with(vec![], false);
    let long = format!(
        "{}.{}.{}.test.",
        "a".repeat(60),
        "b".repeat(60),
        "c".repeat(10)
    );
    let mut m = query(&long, RecordType::A, false);
    for _ in 0..5 {
        m.add_query(Query::query(
            Name::from_ascii(&long).unwrap(),
            RecordType::A,
        ));
    }
    let bytes = h
        .handle(&m.to_vec().unwrap(), Protocol::Udp, client(), &ctx())
        .await
        .expect("FORMERR");
    assert!(bytes.len() <= 512, "{} bytes", bytes.len());
    let reply = Message::from_vec(&bytes).unwrap();
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
    assert_eq!(reply.metadata.id, m.metadata.id);
    // Over TCP there is room: the questions are echoed.
    let tcp = ask(&h, &m, Protocol::Tcp).await;
    assert_eq!(tcp.queries.len(), 6);
}

#[tokio::test]
async fn a_question_the_bounds_refuse_is_answered_at_once_without_a_task() {
    // No upstream slot at all: every forwarded question is over the bound.
    let limits = inflight::Limits {
        total: 0,
        per_client: 0,
    };
    let h = handler_with_limits(vec![client()], false, limits, false);
    let q = query("flood.test.", RecordType::A, false).to_vec().unwrap();
    let now = h
        .answer_now(&q, Protocol::Udp, client(), &ctx())
        .expect("refused on the caller's thread");
    assert_eq!(now.keep, Keep::No);
    let reply = Message::from_vec(&now.bytes.unwrap()).unwrap();
    assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    // A question the bounds would admit still goes to the async path.
    let h = handler_with(vec![client()], false);
    assert!(h.answer_now(&q, Protocol::Udp, client(), &ctx()).is_none());
}
