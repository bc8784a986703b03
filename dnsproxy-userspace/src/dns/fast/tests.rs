//! The fast path against the handler's own answers to the same questions.
use std::{sync::Arc, time::Duration};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query},
    rr::{Name, RecordType},
};

use super::*;
use crate::dns::{
    Protocol,
    handler::Handler,
    testing::{client, ctx, handler_with},
};

struct Shape {
    id: u16,
    rd: bool,
    cd: bool,
    /// EDNS payload size and DO, or no EDNS.
    edns: Option<(u16, bool)>,
}

/// A plain query: ID 1, RD, no EDNS.
const PLAIN: Shape = Shape {
    id: 1,
    rd: true,
    cd: false,
    edns: None,
};

fn wire(name: &str, qtype: RecordType, shape: &Shape) -> Vec<u8> {
    let mut m = Message::new(shape.id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = shape.rd;
    m.metadata.checking_disabled = shape.cd;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some((payload, dnssec_ok)) = shape.edns {
        let mut e = Edns::new();
        e.set_max_payload(payload);
        e.set_dnssec_ok(dnssec_ok);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

/// The handler's own answer (the async path).
fn slow(h: &Handler, query: &[u8]) -> Vec<u8> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(h.handle(query, Protocol::Udp, client(), &ctx()))
        .expect("an answer")
}

/// Keeps the handler's answer to `first`, then answers `second` from the store.
fn kept_then_fast(h: &Handler, first: &[u8], second: &[u8]) -> Option<Vec<u8>> {
    let ctx = Arc::new(ctx());
    let mut answers = Answers::default();
    let generation = h.answers_generation();
    let parsed = parse(first).expect("a plain query");
    let now = h
        .answer_now(first, Protocol::Udp, client(), &ctx)
        .expect("answered at once");
    assert_eq!(now.keep, crate::dns::handler::Keep::Table);
    let bytes = now.bytes.expect("a reply");
    assert!(!answers.keep(first, &parsed, &bytes, generation, &ctx, None));
    let parsed = parse(second).expect("a plain query");
    let mut out = [0u8; MAX_KEPT];
    let written = answers.reply(second, &parsed, generation, &ctx, &mut out)?;
    assert!(!written.cached);
    Some(out[..written.len].to_vec())
}

/// A message with its answer records sorted (addresses are shuffled on both paths).
fn sorted(bytes: &[u8]) -> Message {
    let mut m = Message::from_vec(bytes).unwrap();
    m.answers.sort_by_key(|r| r.data.to_string());
    m
}

#[test]
fn patched_replies_equal_the_handlers_answer_to_the_same_question() {
    let h = handler_with(vec![], false);
    let plain = PLAIN;
    let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        (
            "another ID",
            wire("aliyun.com.", RecordType::A, &plain),
            wire(
                "aliyun.com.",
                RecordType::A,
                &Shape {
                    id: 0xbeef,
                    ..plain
                },
            ),
        ),
        (
            "the question's case as the second asker wrote it",
            wire("aliyun.com.", RecordType::A, &plain),
            wire("AliYun.COM.", RecordType::A, &Shape { id: 7, ..plain }),
        ),
        (
            "EDNS echoed, whatever payload size the client offers",
            wire(
                "aliyun.com.",
                RecordType::A,
                &Shape {
                    edns: Some((1232, false)),
                    ..plain
                },
            ),
            wire(
                "ALIYUN.com.",
                RecordType::A,
                &Shape {
                    id: 3,
                    edns: Some((4096, false)),
                    ..plain
                },
            ),
        ),
        (
            "EDNS with DO echoed",
            wire(
                "aliyun.com.",
                RecordType::A,
                &Shape {
                    edns: Some((512, true)),
                    ..plain
                },
            ),
            wire(
                "aliyun.com.",
                RecordType::A,
                &Shape {
                    id: 4,
                    edns: Some((4096, true)),
                    ..plain
                },
            ),
        ),
        (
            "NODATA with its SOA",
            wire("v4only.test.", RecordType::AAAA, &plain),
            wire("V4ONLY.test.", RecordType::AAAA, &Shape { id: 5, ..plain }),
        ),
        (
            "a CNAME and its target, two addresses shuffled",
            wire("ext.default.svc.cluster.local.", RecordType::A, &plain),
            wire(
                "Ext.Default.svc.cluster.local.",
                RecordType::A,
                &Shape { id: 6, ..plain },
            ),
        ),
    ];
    for (what, first, second) in cases {
        let fast =
            kept_then_fast(&h, &first, &second).unwrap_or_else(|| panic!("{what}: not kept"));
        let slow = slow(&h, &second);
        assert_eq!(fast.len(), slow.len(), "{what}");
        assert_eq!(sorted(&fast), sorted(&slow), "{what}");
        assert_eq!(fast[..12], slow[..12], "{what}: header");
    }
}

#[test]
fn other_flags_edns_shapes_and_truncated_replies_are_not_shared() {
    let h = handler_with(vec![], false);
    let plain = PLAIN;
    // Kept without EDNS: a query with EDNS (or DO) is another key.
    let first = wire("aliyun.com.", RecordType::A, &plain);
    for edns in [(4096, false), (4096, true)] {
        let second = wire(
            "aliyun.com.",
            RecordType::A,
            &Shape {
                edns: Some(edns),
                ..plain
            },
        );
        assert_eq!(kept_then_fast(&h, &first, &second), None, "{edns:?}");
    }
    // RD clear or CD set: relayed upstream as set, so another key too.
    for (rd, cd) in [(false, false), (true, true)] {
        let second = wire("aliyun.com.", RecordType::A, &Shape { rd, cd, ..plain });
        assert_eq!(kept_then_fast(&h, &first, &second), None, "rd {rd} cd {cd}");
    }
    // 32 addresses do not fit 512 bytes: truncated (TC), so never kept.
    let truncated = wire("big.test.", RecordType::A, &plain);
    let now = h
        .answer_now(&truncated, Protocol::Udp, client(), &ctx())
        .unwrap();
    assert_ne!(now.bytes.unwrap()[2] & 0x02, 0, "TC set");
    assert_eq!(kept_then_fast(&h, &truncated, &truncated), None);
}

#[test]
fn addresses_are_shuffled_on_the_fast_path_too() {
    let h = handler_with(vec![], false);
    let q = wire(
        "fixed.test.",
        RecordType::A,
        &Shape {
            id: 1,
            rd: true,
            cd: false,
            edns: None,
        },
    );
    let mut firsts = std::collections::HashSet::new();
    for _ in 0..64 {
        let reply = kept_then_fast(&h, &q, &q).unwrap();
        firsts.insert(
            Message::from_vec(&reply).unwrap().answers[0]
                .data
                .to_string(),
        );
    }
    assert_eq!(
        firsts.len(),
        2,
        "both addresses come first sometimes: {firsts:?}"
    );
}

#[test]
fn a_new_table_generation_or_context_empties_the_store() {
    let h = handler_with(vec![], false);
    let q = wire("aliyun.com.", RecordType::A, &PLAIN);
    let parsed = parse(&q).unwrap();
    let ctx = Arc::new(ctx());
    let mut answers = Answers::default();
    let now = h
        .answer_now(&q, Protocol::Udp, client(), &ctx)
        .unwrap()
        .bytes
        .unwrap();
    let mut out = [0u8; MAX_KEPT];
    assert!(!answers.keep(&q, &parsed, &now, 1, &ctx, None));
    assert!(answers.reply(&q, &parsed, 1, &ctx, &mut out).is_some());
    assert!(
        answers.reply(&q, &parsed, 2, &ctx, &mut out).is_none(),
        "generation moved"
    );
    assert!(!answers.keep(&q, &parsed, &now, 2, &ctx, None));
    let other = Arc::new(ClientContext::local("other", vec![]));
    assert!(
        answers.reply(&q, &parsed, 2, &other, &mut out).is_none(),
        "another context"
    );
}

#[test]
fn the_registry_moves_the_generation_on_each_change_that_alters_answers() {
    let h = handler_with(vec![], false);
    let before = h.answers_generation();
    h.translated()
        .set_ipv6_backed(std::collections::HashSet::new());
    assert!(h.answers_generation() > before);
}

#[test]
fn only_plain_queries_parse() {
    let plain = PLAIN;
    let ok = wire("aliyun.com.", RecordType::A, &plain);
    assert_eq!(
        parse(&ok).map(|p| (p.question_end, p.qtype)),
        Some((12 + 12 + 4, 1))
    );
    let with_cookie = {
        let mut q = wire(
            "aliyun.com.",
            RecordType::A,
            &Shape {
                edns: Some((1232, false)),
                ..plain
            },
        );
        let n = q.len();
        q[n - 2..].copy_from_slice(&12u16.to_be_bytes());
        q.extend_from_slice(&[0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
        q
    };
    assert!(
        parse(&with_cookie).is_some(),
        "a COOKIE option changes nothing"
    );
    let edit = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut q = ok.clone();
        f(&mut q);
        q
    };
    let edns = wire(
        "aliyun.com.",
        RecordType::A,
        &Shape {
            edns: Some((1232, false)),
            ..plain
        },
    );
    let rejected: Vec<(&str, Vec<u8>)> = vec![
        ("a response (QR=1)", edit(&|q| q[2] |= 0x80)),
        ("opcode NOTIFY", edit(&|q| q[2] |= 4 << 3)),
        ("two questions", edit(&|q| q[5] = 2)),
        ("an answer record", edit(&|q| q[7] = 1)),
        ("trailing bytes", edit(&|q| q.push(0))),
        ("a compressed name", edit(&|q| q[12] = 0xc0)),
        ("cut short", ok[..ok.len() - 1].to_vec()),
        ("EDNS version 1", {
            let mut q = edns.clone();
            let n = q.len();
            q[n - 5] = 1;
            q
        }),
        ("a Client Subnet option", {
            let mut q = edns.clone();
            let n = q.len();
            q[n - 2..].copy_from_slice(&8u16.to_be_bytes());
            q.extend_from_slice(&[0, 8, 0, 4, 0, 1, 0, 0]);
            q
        }),
        ("a header only", ok[..12].to_vec()),
    ];
    for (what, q) in rejected {
        assert_eq!(parse(&q), None, "{what}");
    }
}

#[test]
fn a_kept_cached_answer_ends_with_its_time() {
    let h = handler_with(vec![], false);
    let q = wire("aliyun.com.", RecordType::A, &PLAIN);
    let parsed = parse(&q).unwrap();
    let ctx = Arc::new(ctx());
    let now = h.answer_now(&q, Protocol::Udp, client(), &ctx).unwrap();
    let bytes = now.bytes.unwrap();
    let mut answers = Answers::default();
    let mut out = [0u8; MAX_KEPT];
    let reset = answers.keep(
        &q,
        &parsed,
        &bytes,
        1,
        &ctx,
        Some(Duration::from_millis(50)),
    );
    assert!(!reset);
    let written = answers.reply(&q, &parsed, 1, &ctx, &mut out).expect("kept");
    assert!(written.cached);
    std::thread::sleep(Duration::from_millis(60));
    assert_eq!(
        answers.reply(&q, &parsed, 1, &ctx, &mut out),
        None,
        "expired"
    );
}

#[test]
fn rejections_are_answered_at_once_and_never_kept() {
    let h = handler_with(vec![], false);
    let plain = Shape { id: 9, ..PLAIN };
    for (qtype, rcode) in [(RecordType::IXFR, 4), (RecordType::AXFR, 4)] {
        let q = wire("fixed.test.", qtype, &plain);
        assert!(parse(&q).is_some(), "a plain query on the wire");
        let now = h.answer_now(&q, Protocol::Udp, client(), &ctx()).unwrap();
        assert_eq!(now.keep, crate::dns::handler::Keep::No, "{qtype}");
        assert_eq!(now.bytes.unwrap()[3] & 0x0f, rcode, "{qtype}");
    }
}
