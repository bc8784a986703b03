//! One query in, one answer out. The handler composes the two resolvers: the name table
//! (`local`) first, then the cache and the upstream forwarder. Malformed input gets
//! FORMERR (or is dropped when not even a header), other opcodes NOTIMP.
use std::{net::SocketAddr, sync::Arc, time::Instant};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::RecordType,
};

use super::{
    MIN_UDP_PAYLOAD, Protocol,
    cache::{Cache, CachedAnswer, Key},
    forwarder::Forwarder,
    local::{self, ClientContext},
    metrics::{Metrics, Outcome},
};
use crate::registry::{Registry, table::normalize};

/// Logs one query under target `dns`: at debug level, or at info level for a client
/// whose pod asked for `dns:debug`, so its queries show without a global debug level.
macro_rules! query_log {
    ($ctx:expr, $($field:tt)+) => {
        if $ctx.debug_log {
            tracing::info!(target: "dns", pod = %$ctx.pod.as_deref().unwrap_or(""), $($field)+)
        } else {
            tracing::debug!(target: "dns", $($field)+)
        }
    };
}

/// UDP payload size we advertise in EDNS answers and upstream queries.
pub const EDNS_PAYLOAD: u16 = 1232;

/// Answers queries.
pub struct Handler {
    registry: Arc<Registry>,
    forwarder: Arc<Forwarder>,
    cache: Cache,
    ttl: u32,
    metrics: Arc<Metrics>,
}

/// An answer from the upstream path; `server` is `None` when the cache gave it.
struct Upstream {
    answer: CachedAnswer,
    server: Option<SocketAddr>,
}

impl Handler {
    pub fn new(
        registry: Arc<Registry>,
        forwarder: Arc<Forwarder>,
        cache: Cache,
        ttl: u32,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            registry,
            forwarder,
            cache,
            ttl,
            metrics,
        }
    }

    /// Answers held in the cache.
    pub fn cache_len(&self) -> usize {
        self.cache.len()
    }

    /// The answer to `query` from `client`, or `None` when nothing should be sent.
    pub async fn handle(
        &self,
        query: &[u8],
        protocol: Protocol,
        client: SocketAddr,
        ctx: &ClientContext,
    ) -> Option<Vec<u8>> {
        let request = match Message::from_vec(query) {
            Ok(m) => m,
            Err(e) => {
                query_log!(ctx, %client, %protocol, error = %e, "malformed query");
                self.metrics
                    .request(RecordType::NULL, protocol, Outcome::Rejected);
                return formerr_from_header(query);
            }
        };
        if request.metadata.message_type != MessageType::Query {
            return None;
        }
        let qtype = request
            .queries
            .first()
            .map_or(RecordType::NULL, Query::query_type);
        if request.metadata.op_code != OpCode::Query {
            self.metrics.request(qtype, protocol, Outcome::Rejected);
            return encode(&error_reply(&request, ResponseCode::NotImp));
        }
        if request.queries.len() != 1 {
            self.metrics.request(qtype, protocol, Outcome::Rejected);
            return encode(&error_reply(&request, ResponseCode::FormErr));
        }
        let question = &request.queries[0];
        let edns = request.edns.as_ref().map(Edns::max_payload);

        // The table guard lives only for the lookup, never across an await.
        let local = local::answer(
            &self.registry.current(),
            &self.registry.ipv6_backed(),
            question.name(),
            qtype,
            ctx,
            self.ttl,
        );
        let (reply, outcome) = if let Some(local) = local {
            let mut reply = response_to(&request);
            reply.metadata.authoritative = true;
            reply.add_answers(local.answers);
            if let Some(target) = local.chase {
                // An alias to a name we do not know: append the target's records.
                let chased = Query::query(target, qtype);
                if let Some(upstream) = self.upstream(&chased).await {
                    reply.add_answers(upstream.answer.answers);
                }
            }
            if let Some(soa) = local.soa {
                reply.add_authority(soa);
            }
            let answers: Vec<String> = reply.answers.iter().map(|r| r.data.to_string()).collect();
            query_log!(ctx, %client, %protocol, question = %question.name(), %qtype, ?edns, found = true, ?answers, "answered locally");
            (reply, Outcome::Local)
        } else {
            match self.upstream(question).await {
                Some(Upstream { answer, server }) => {
                    let outcome = if server.is_some() {
                        Outcome::Forwarded
                    } else {
                        Outcome::Cached
                    };
                    let via = server.map_or_else(|| "cache".to_owned(), |s| s.to_string());
                    let code = answer.response_code;
                    let mut reply = response_to(&request);
                    reply.metadata.response_code = code;
                    let CachedAnswer {
                        mut answers,
                        authorities,
                        additionals,
                        ..
                    } = answer;
                    // Owner names in the case the client used (the cache holds the
                    // first asker's spelling).
                    for r in answers.iter_mut().filter(|r| r.name == *question.name()) {
                        r.name = question.name().clone();
                    }
                    reply.add_answers(answers);
                    reply.add_authorities(authorities);
                    reply.add_additionals(additionals);
                    query_log!(ctx, %client, %protocol, question = %question.name(), %qtype, ?edns, found = false, upstream = %via, rcode = %code, answers = reply.answers.len(), "forwarded");
                    (reply, outcome)
                }
                None => {
                    query_log!(ctx, %client, %protocol, question = %question.name(), %qtype, ?edns, found = false, "SERVFAIL: every upstream failed");
                    self.metrics.request(qtype, protocol, Outcome::ServFail);
                    return encode(&error_reply(&request, ResponseCode::ServFail));
                }
            }
        };
        self.metrics.request(qtype, protocol, outcome);
        let bytes = encode(&reply)?;
        Some(match protocol {
            Protocol::Tcp => bytes,
            Protocol::Udp if bytes.len() <= udp_limit(&request) => bytes,
            // Too large for the client's UDP limit: question only, TC set, so the
            // client retries over TCP.
            Protocol::Udp => encode(&reply.truncate()).unwrap_or(bytes),
        })
    }

    /// The cache, else the upstream servers (whose answer is then cached);
    /// `None` when every upstream failed.
    async fn upstream(&self, question: &Query) -> Option<Upstream> {
        let key = Key {
            name: normalize(&question.name().to_ascii()),
            qtype: question.query_type(),
            qclass: question.query_class(),
        };
        if let Some(hit) = self.cache.get(&key, Instant::now()) {
            self.metrics
                .cache_hits
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Some(Upstream {
                answer: hit,
                server: None,
            });
        }
        self.metrics
            .cache_misses
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match self.forwarder.forward(question).await {
            Ok(fwd) => {
                self.cache.insert(key, &fwd.reply, Instant::now());
                Some(Upstream {
                    answer: CachedAnswer::from(fwd.reply),
                    server: Some(fwd.upstream),
                })
            }
            Err(e) => {
                tracing::debug!(target: "dns", question = %question.name(), error = %e, "upstream failed");
                None
            }
        }
    }
}

/// A response skeleton: same ID, opcode, RD and question as sent; RA set; EDNS echoed.
pub fn response_to(request: &Message) -> Message {
    let mut reply = Message::response(request.metadata.id, request.metadata.op_code);
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.checking_disabled = request.metadata.checking_disabled;
    reply.add_queries(request.queries.iter().cloned());
    if let Some(req_edns) = &request.edns {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        edns.set_dnssec_ok(req_edns.flags().dnssec_ok);
        reply.set_edns(edns);
    }
    reply
}

fn error_reply(request: &Message, code: ResponseCode) -> Message {
    let mut reply = response_to(request);
    reply.metadata.response_code = code;
    reply
}

fn encode(msg: &Message) -> Option<Vec<u8>> {
    match msg.to_vec() {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            tracing::warn!(target: "dns", error = %e, "could not encode an answer");
            None
        }
    }
}

/// FORMERR for bytes that are not a message but start with a header; nothing otherwise.
fn formerr_from_header(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return None;
    }
    let mut reply = vec![0u8; 12];
    reply[..2].copy_from_slice(&query[..2]);
    // QR=1, opcode and RD copied; RCODE=FORMERR(1); all counts zero.
    reply[2] = 0x80 | (query[2] & 0x79);
    reply[3] = 0x01;
    Some(reply)
}

/// The client's UDP limit: 512 without EDNS, else its advertised size (at least 512).
fn udp_limit(request: &Message) -> usize {
    usize::from(
        request
            .edns
            .as_ref()
            .map_or(MIN_UDP_PAYLOAD, |e| e.max_payload().max(MIN_UDP_PAYLOAD)),
    )
}

#[cfg(test)]
mod tests;
