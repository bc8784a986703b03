use std::{net::IpAddr, time::Duration};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RData, RecordType},
};

use super::*;
use crate::{dns::forwarder::Forwarder, registry::NameTable};

fn client() -> SocketAddr {
    "127.0.0.1:40000".parse().unwrap()
}

fn handler_with(upstreams: Vec<SocketAddr>) -> Handler {
    let mut table = NameTable::default();
    let ips: Vec<IpAddr> = ["240.240.0.1", "240.240.0.2", "2001:2::1"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    table.add("aliyun.com", ips);
    table.add("v4only.test", ["240.240.0.9".parse().unwrap()]);
    let big: Vec<IpAddr> = (1..=60).map(|i| format!("240.240.1.{i}").parse().unwrap()).collect();
    table.add("big.test", big);
    let metrics = Arc::new(Metrics::default());
    let forwarder = Forwarder::new(upstreams, Duration::from_millis(300), metrics.clone());
    Handler::new(Arc::new(RwLock::new(Arc::new(table))), forwarder, 30, metrics)
}

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
    let bytes = h.handle(&m.to_vec().unwrap(), proto, client()).await.expect("an answer");
    Message::from_vec(&bytes).unwrap()
}

#[tokio::test]
async fn local_answers() {
    struct Case {
        name: &'static str,
        query: Message,
        want_rcode: ResponseCode,
        want_answers: Vec<&'static str>,
        want_edns: bool,
    }
    let cases = [
        Case {
            name: "A for a known host, case-insensitive, question echoed as sent",
            query: query("AliYun.Com.", RecordType::A, false),
            want_rcode: ResponseCode::NoError,
            want_answers: vec!["240.240.0.1", "240.240.0.2"],
            want_edns: false,
        },
        Case {
            name: "AAAA for a known host",
            query: query("aliyun.com.", RecordType::AAAA, true),
            want_rcode: ResponseCode::NoError,
            want_answers: vec!["2001:2::1"],
            want_edns: true,
        },
        Case {
            name: "AAAA for a v4-only host is NODATA",
            query: query("v4only.test.", RecordType::AAAA, false),
            want_rcode: ResponseCode::NoError,
            want_answers: vec![],
            want_edns: false,
        },
    ];
    let h = handler_with(vec![]);
    for c in cases {
        let reply = ask(&h, &c.query, Protocol::Udp).await;
        assert_eq!(reply.metadata.id, 0x1234, "{}", c.name);
        assert_eq!(reply.metadata.response_code, c.want_rcode, "{}", c.name);
        assert!(reply.metadata.authoritative, "{}: AA", c.name);
        assert_eq!(reply.queries, c.query.queries, "{}: question", c.name);
        assert_eq!(reply.edns.is_some(), c.want_edns, "{}: edns", c.name);
        let mut got: Vec<String> = reply
            .answers
            .iter()
            .map(|r| {
                assert_eq!(r.ttl, 30, "{}: ttl", c.name);
                match &r.data {
                    RData::A(a) => a.0.to_string(),
                    RData::AAAA(a) => a.0.to_string(),
                    other => panic!("{}: unexpected {other:?}", c.name),
                }
            })
            .collect();
        got.sort();
        assert_eq!(got, c.want_answers, "{}", c.name);
    }
}

#[tokio::test]
async fn rejects_what_it_cannot_answer() {
    let h = handler_with(vec![]);

    let mut two = query("aliyun.com.", RecordType::A, false);
    two.add_query(Query::query(Name::from_ascii("v4only.test.").unwrap(), RecordType::A));
    assert_eq!(ask(&h, &two, Protocol::Udp).await.metadata.response_code, ResponseCode::FormErr);

    let mut status = query("aliyun.com.", RecordType::A, false);
    status.metadata.op_code = OpCode::Status;
    assert_eq!(ask(&h, &status, Protocol::Tcp).await.metadata.response_code, ResponseCode::NotImp);

    // A header followed by garbage: FORMERR with the same ID.
    let garbage = [0xab, 0xcd, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
    let reply = h.handle(&garbage, Protocol::Udp, client()).await.expect("formerr");
    let reply = Message::from_vec(&reply).unwrap();
    assert_eq!(reply.metadata.id, 0xabcd);
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);

    // Too short to be a header: dropped.
    assert!(h.handle(&[1, 2, 3], Protocol::Udp, client()).await.is_none());
    // A response is never answered.
    let mut resp = query("aliyun.com.", RecordType::A, false);
    resp.metadata.message_type = MessageType::Response;
    assert!(h.handle(&resp.to_vec().unwrap(), Protocol::Udp, client()).await.is_none());
}

#[tokio::test]
async fn udp_answers_over_the_limit_are_truncated() {
    let h = handler_with(vec![]);
    let small = ask(&h, &query("big.test.", RecordType::A, false), Protocol::Udp).await;
    assert!(small.metadata.truncation, "60 A records exceed 512 bytes");
    assert!(small.answers.is_empty());
    let edns = ask(&h, &query("big.test.", RecordType::A, true), Protocol::Udp).await;
    assert!(!edns.metadata.truncation);
    assert_eq!(edns.answers.len(), 60);
    let tcp = ask(&h, &query("big.test.", RecordType::A, false), Protocol::Tcp).await;
    assert_eq!(tcp.answers.len(), 60);
}

#[tokio::test]
async fn servfail_when_every_upstream_fails() {
    // A bound but silent loopback socket: the query times out.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let h = handler_with(vec![silent.local_addr().unwrap()]);
    let started = std::time::Instant::now();
    let reply = ask(&h, &query("unknown.test.", RecordType::A, false), Protocol::Udp).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(reply.metadata.id, 0x1234);
    assert!(started.elapsed() < Duration::from_secs(2), "bounded by the timeout");
}

#[tokio::test]
async fn forwards_with_the_clients_id_and_fails_over() {
    // First upstream silent, second answers on loopback with a fixed address.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let upstream = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        let (n, from) = upstream.recv_from(&mut buf).await.unwrap();
        let q = Message::from_vec(&buf[..n]).unwrap();
        let mut r = response_to(&q);
        r.add_answer(Record::from_rdata(
            q.queries[0].name().clone(),
            60,
            RData::A(rdata::A("198.51.100.7".parse().unwrap())),
        ));
        upstream.send_to(&r.to_vec().unwrap(), from).await.unwrap();
    });
    let h = handler_with(vec![silent.local_addr().unwrap(), upstream_addr]);
    let reply = ask(&h, &query("elsewhere.test.", RecordType::A, false), Protocol::Udp).await;
    assert_eq!(reply.metadata.id, 0x1234);
    assert_eq!(reply.answers.len(), 1);
    assert!(!reply.metadata.authoritative);
}
