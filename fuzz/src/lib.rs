//! What the fuzz targets share: a handler over a fixed name table whose upstream
//! replies with fuzzer-chosen bytes, and the invariants every reply must keep.
use std::{
    net::{SocketAddr, UdpSocket},
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use dnsproxy::{
    dns::{
        Protocol,
        cache,
        client::ClientContext,
        fast,
        handler::{Handler, Settings},
        inflight,
        metrics::Metrics,
    },
    name::normalize_name,
    registry::{
        Registry, TableConfig,
        manifest::{Objects, parse_into},
    },
    vip::{assign::in_memory_registry, translate::Translated},
};
use hickory_proto::{
    op::{Message, MessageType},
    serialize::binary::DecodeError,
};

/// The fixed table: the bundled example registry.
pub const REGISTRY: [&str; 2] = [
    include_str!("../../examples/aliyun.yaml"),
    include_str!("../../examples/internal.yaml"),
];

/// The handler under test, its registry, and the bytes its upstream replies with.
pub struct Fixture {
    pub runtime: tokio::runtime::Runtime,
    pub handler: Handler,
    pub registry: Arc<Registry>,
    pub ctx: Arc<ClientContext>,
    /// What the fake upstream sends back to the next query; the first byte says
    /// whether to put the query's ID in it (bit 0).
    pub reply: Arc<Mutex<Vec<u8>>>,
}

/// The fixture, made once per process.
pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let reply = Arc::new(Mutex::new(Vec::new()));
        let upstream = fake_upstream(Arc::clone(&reply));
        let mut objects = Objects::default();
        for file in REGISTRY {
            parse_into(file, &mut objects).expect("the example registry parses");
        }
        let registry = Arc::new(in_memory_registry(&objects, TableConfig::default()));
        // As if every VIP were translated already: answers never wait.
        let translated = Arc::new(Translated::default());
        translated.assume_all_translated(&registry.table());
        let metrics = Arc::new(Metrics::new(
            &[upstream],
            &mut prometheus_client::registry::Registry::default(),
            false,
        ));
        let settings = Settings {
            upstreams: vec![upstream],
            // A short timeout: a reply the forwarder rejects costs this much per input.
            upstream_timeout: Duration::from_millis(2),
            upstream_parallel: false,
            cache: cache::Limits {
                bytes: 1 << 20,
                entries: 1000,
                max_ttl: 86_400,
                serve_stale: true,
            },
            inflight: inflight::Limits {
                total: 64,
                per_client: 64,
            },
            ttl: 30,
            vip_wait: Duration::from_millis(5),
        };
        let handler = Handler::new(settings, Arc::clone(&registry), translated, metrics);
        Fixture {
            runtime,
            handler,
            registry,
            ctx: Arc::new(ClientContext::local("default", vec![])),
            reply,
        }
    })
}

/// A loopback upstream that answers every datagram with the current fuzzer bytes.
fn fake_upstream(reply: Arc<Mutex<Vec<u8>>>) -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind the fake upstream");
    let addr = sock.local_addr().expect("its address");
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let mut out = reply.lock().map(|r| r.clone()).unwrap_or_default();
            if out.first().is_some_and(|b| b & 1 == 1) && out.len() >= 3 && n >= 2 {
                out.remove(0);
                out[..2].copy_from_slice(&buf[..2]);
            }
            let _ = sock.send_to(&out, from);
        }
    });
    addr
}

/// Input of the handler target: a flags byte (bit 0: TCP), the query's length (two
/// bytes), the query, then what the upstream replies.
pub fn run_handler(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Some((len, rest)) = rest.split_first_chunk::<2>() else {
        return;
    };
    let len = usize::from(u16::from_be_bytes(*len)).min(rest.len());
    let (query, upstream) = rest.split_at(len);
    let f = fixture();
    if let Ok(mut reply) = f.reply.lock() {
        *reply = upstream.to_vec();
    }
    let protocol = if flags & 1 == 1 {
        Protocol::Tcp
    } else {
        Protocol::Udp
    };
    let client: SocketAddr = "127.0.0.1:40000".parse().expect("literal");
    let reply = f
        .runtime
        .block_on(f.handler.handle(query, protocol, client, &f.ctx));
    if let Some(reply) = &reply {
        check_reply(query, reply, protocol, f);
    }
    if protocol == Protocol::Udp {
        fast_path(query, client, f);
    }
}

/// The UDP fast path on the same query: what it answers at once, and a kept reply
/// patched for it, keep the same invariants.
fn fast_path(query: &[u8], client: SocketAddr, f: &Fixture) {
    let Some(parsed) = fast::parse(query) else {
        return;
    };
    let Some(bytes) = f
        .handler
        .answer_now(query, Protocol::Udp, client, &f.ctx)
        .and_then(|now| now.bytes)
    else {
        return;
    };
    check_reply(query, &bytes, Protocol::Udp, f);
    let mut answers = fast::Answers::default();
    let generation = f.handler.answers_generation();
    answers.keep(query, &parsed, &bytes, generation, &f.ctx, None);
    let mut out = [0u8; fast::MAX_KEPT];
    if let Some(written) = answers.reply(query, &parsed, generation, &f.ctx, &mut out) {
        check_reply(query, &out[..written.len], Protocol::Udp, f);
    }
}

/// What every reply keeps: the query's ID and question, a UDP size within the
/// client's limit, and no answer from the table for a name the table does not know.
pub fn check_reply(query: &[u8], reply: &[u8], protocol: Protocol, f: &Fixture) {
    assert!(reply.len() >= 12, "a reply has a header");
    assert_eq!(reply[..2], query[..2], "the reply carries the query's ID");
    assert_ne!(reply[2] & 0x80, 0, "QR is set");
    let Ok(request) = Message::from_vec(query) else {
        return;
    };
    let limit = request
        .edns
        .as_ref()
        .map_or(512, |e| usize::from(e.max_payload().max(512)));
    if protocol == Protocol::Udp {
        assert!(
            reply.len() <= limit,
            "{} bytes over the client's {limit}",
            reply.len()
        );
    }
    let answer = match Message::from_vec(reply) {
        Ok(answer) => answer,
        // A relayed record with empty RDATA: valid on the wire, refused by hickory
        // outside UPDATE messages (the daemon reads such upstream replies as one).
        Err(DecodeError::InvalidEmptyRecord) => return,
        Err(e) => panic!("the reply does not parse ({e}): {reply:02x?}"),
    };
    assert_eq!(answer.metadata.message_type, MessageType::Response);
    if !answer.queries.is_empty() {
        assert_eq!(
            answer.queries, request.queries,
            "the question is echoed as asked"
        );
    }
    if answer.metadata.authoritative && !answer.answers.is_empty() {
        let question = &request.queries[0];
        let name = normalize_name(question.name());
        let known = f
            .registry
            .current()
            .resolve(&name, "default", &[])
            .is_some();
        assert!(
            known || question.query_type() == hickory_proto::rr::RecordType::PTR,
            "a table answer for {name}, which the table does not know"
        );
    }
}
