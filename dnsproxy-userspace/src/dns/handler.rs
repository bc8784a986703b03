//! One query in, one answer out: local answers from the name table, everything else
//! forwarded. Malformed input gets FORMERR (or is dropped when not even a header).
use std::{
    net::SocketAddr,
    sync::{Arc, RwLock},
};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, ResponseCode},
    rr::{RData, Record, RecordType, rdata},
};
use rand::seq::SliceRandom as _;

use super::{
    MIN_UDP_PAYLOAD, Protocol,
    forwarder::Forwarder,
    metrics::{Metrics, Outcome},
};
use crate::registry::NameTable;

/// UDP payload size we advertise in EDNS answers.
pub const EDNS_PAYLOAD: u16 = 1232;

/// Shared, swappable name table: readers clone the `Arc` and never wait for a reload.
pub type SharedTable = Arc<RwLock<Arc<NameTable>>>;

/// Answers queries.
pub struct Handler {
    table: SharedTable,
    forwarder: Forwarder,
    ttl: u32,
    metrics: Arc<Metrics>,
}

impl Handler {
    pub fn new(table: SharedTable, forwarder: Forwarder, ttl: u32, metrics: Arc<Metrics>) -> Self {
        Self { table, forwarder, ttl, metrics }
    }

    /// The answer to `query` from `client`, or `None` when nothing should be sent.
    pub async fn handle(&self, query: &[u8], protocol: Protocol, client: SocketAddr) -> Option<Vec<u8>> {
        let request = match Message::from_vec(query) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(target: "dns", %client, %protocol, error = %e, "malformed query");
                self.metrics.request(protocol, Outcome::Rejected);
                return formerr_from_header(query);
            }
        };
        if request.metadata.message_type != MessageType::Query {
            return None;
        }
        if request.metadata.op_code != OpCode::Query {
            self.metrics.request(protocol, Outcome::Rejected);
            return encode(&error_reply(&request, ResponseCode::NotImp));
        }
        if request.queries.len() != 1 {
            self.metrics.request(protocol, Outcome::Rejected);
            return encode(&error_reply(&request, ResponseCode::FormErr));
        }
        let question = &request.queries[0];
        let name = question.name().to_ascii();
        let qtype = question.query_type();
        let edns = request.edns.as_ref().map(Edns::max_payload);

        let local = self.local_answer(&request);
        let (reply, outcome) = match local {
            Some(msg) => {
                let answers = msg.answers.len();
                tracing::debug!(target: "dns", %client, %protocol, question = %name, %qtype, ?edns, found = true, answers, "answered locally");
                (encode(&msg)?, Outcome::Local)
            }
            None => match self.forwarder.forward(&request, protocol).await {
                Ok(fwd) => {
                    tracing::debug!(target: "dns", %client, %protocol, question = %name, %qtype, ?edns, found = false, upstream = %fwd.upstream, "forwarded");
                    (fwd.reply, Outcome::Forwarded)
                }
                Err(e) => {
                    tracing::debug!(target: "dns", %client, %protocol, question = %name, %qtype, ?edns, found = false, error = %e, "SERVFAIL");
                    self.metrics.request(protocol, Outcome::ServFail);
                    return encode(&error_reply(&request, ResponseCode::ServFail));
                }
            },
        };
        self.metrics.request(protocol, outcome);
        Some(match protocol {
            Protocol::Tcp => reply,
            Protocol::Udp => fit_udp(reply, &request),
        })
    }

    /// A/AAAA for a known host (NODATA for the family it lacks); `None` to forward.
    fn local_answer(&self, request: &Message) -> Option<Message> {
        let question = &request.queries[0];
        let qtype = question.query_type();
        if !matches!(qtype, RecordType::A | RecordType::AAAA) {
            return None;
        }
        let table = self.table.read().expect("name table lock").clone();
        let record = table.lookup(&question.name().to_ascii())?;
        let mut reply = response_to(request);
        reply.metadata.authoritative = true;
        let name = question.name().clone();
        let mut answers: Vec<Record> = match qtype {
            RecordType::A => record
                .v4
                .iter()
                .map(|ip| Record::from_rdata(name.clone(), self.ttl, RData::A(rdata::A(*ip))))
                .collect(),
            _ => record
                .v6
                .iter()
                .map(|ip| Record::from_rdata(name.clone(), self.ttl, RData::AAAA(rdata::AAAA(*ip))))
                .collect(),
        };
        answers.shuffle(&mut rand::rng());
        reply.add_answers(answers);
        Some(reply)
    }
}

/// A response skeleton: same ID, opcode, RD and question; RA set; EDNS echoed.
fn response_to(request: &Message) -> Message {
    let mut reply = Message::response(request.metadata.id, request.metadata.op_code);
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_queries(request.queries.iter().cloned());
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
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
    // QR=1, opcode copied, RD copied; RCODE=FORMERR(1); all counts zero.
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

/// Answers too large for the client's UDP limit are cut to the question with TC set,
/// so the client retries over TCP.
fn fit_udp(reply: Vec<u8>, request: &Message) -> Vec<u8> {
    if reply.len() <= udp_limit(request) {
        return reply;
    }
    match Message::from_vec(&reply) {
        Ok(msg) => encode(&msg.truncate()).unwrap_or(reply),
        Err(_) => reply,
    }
}

#[cfg(test)]
mod tests;
