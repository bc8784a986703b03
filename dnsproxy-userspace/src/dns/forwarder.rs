//! Forwarding to upstream servers: UDP with EDNS (1232-byte payload) first, TCP when
//! the answer is truncated, all within one timeout per question. Lost datagrams are
//! retransmitted within it, to the next upstream in configured order (or to every
//! upstream at once in parallel mode). A reply must carry our query's ID and
//! question; SERVFAIL and REFUSED count as failures, so the next server is asked.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use hickory_proto::{
    ProtoError,
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::RecordType,
    serialize::binary::DecodeError,
};
use tokio::{
    net::{TcpStream, UdpSocket},
    time::{Instant, timeout_at},
};

use super::{
    EDNS_PAYLOAD,
    framing::{read_frame, write_frame},
    metrics::Metrics,
    question::Relay,
};

/// Why forwarding failed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// No upstream is configured.
    #[error("no upstream configured")]
    NoUpstream,
    /// The query could not be encoded.
    #[error("cannot encode the upstream query")]
    Encode(#[source] ProtoError),
    /// Every upstream failed; the last failure is the source.
    #[error("all {count} upstreams failed, the last was {server}")]
    AllFailed {
        count: usize,
        server: SocketAddr,
        #[source]
        last: ExchangeError,
    },
}

/// Why one exchange with one upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// No answer before the deadline.
    #[error("timed out")]
    Timeout,
    /// A socket operation failed.
    #[error("socket error")]
    Io(#[from] std::io::Error),
    /// The upstream answered SERVFAIL or REFUSED.
    #[error("answered {0}")]
    Refused(ResponseCode),
    /// The reply was not an answer to our query (ID, question) or could not be parsed.
    #[error("reply does not match the query")]
    Mismatch,
}

/// An upstream answer and who gave it.
pub struct Forwarded {
    pub reply: Message,
    pub upstream: SocketAddr,
}

/// Sends queries upstream.
pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
    parallel: bool,
    metrics: Arc<Metrics>,
}

/// One upstream query, parsed (to check replies against) and encoded (to send).
#[derive(Clone)]
struct Outgoing {
    query: Arc<Message>,
    bytes: Arc<[u8]>,
}

impl Forwarder {
    pub fn new(
        upstreams: Vec<SocketAddr>,
        timeout: Duration,
        parallel: bool,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            upstreams,
            timeout,
            parallel,
            metrics,
        }
    }

    /// Resolves `question` upstream (recursion desired), within one timeout.
    pub async fn forward(
        &self,
        question: &Query,
        relay: &Relay,
    ) -> Result<Forwarded, ForwardError> {
        if self.upstreams.is_empty() {
            return Err(ForwardError::NoUpstream);
        }
        let out = upstream_query(question, relay)?;
        let mut exchange = Exchange::new(self, &out);
        let result = exchange.run().await;
        exchange.settle_unanswered();
        result
    }
}

// === impl Exchange ===

/// One upstream asked within an exchange: its socket (connected, so an ICMP refusal
/// comes back as an error at once), when it was first asked, and whether its outcome
/// is counted already.
struct Attempt {
    index: usize,
    sock: UdpSocket,
    sent: std::time::Instant,
    settled: bool,
}

/// One question's exchange with the upstreams: a datagram to the first upstream (to
/// all of them in parallel mode), retransmitted every third of the timeout to the next
/// upstream that has not failed, until one answers or the deadline passes. Answers
/// to any datagram sent count. SERVFAIL, REFUSED or an ICMP refusal fail that upstream
/// over to the next one at once. A truncated answer is asked again over TCP, within
/// the same deadline.
struct Exchange<'a> {
    forwarder: &'a Forwarder,
    out: &'a Outgoing,
    deadline: Instant,
    attempts: Vec<Attempt>,
    failed: Vec<bool>,
    /// The upstream the next datagram goes to (rotating).
    next: usize,
    last: Option<(SocketAddr, ExchangeError)>,
}

impl<'a> Exchange<'a> {
    fn new(forwarder: &'a Forwarder, out: &'a Outgoing) -> Self {
        Exchange {
            forwarder,
            out,
            deadline: Instant::now() + forwarder.timeout,
            attempts: Vec::new(),
            failed: vec![false; forwarder.upstreams.len()],
            next: 0,
            last: None,
        }
    }

    async fn run(&mut self) -> Result<Forwarded, ForwardError> {
        let retransmit = (self.forwarder.timeout / 3).max(Duration::from_millis(10));
        let first = if self.forwarder.parallel {
            self.forwarder.upstreams.len()
        } else {
            1
        };
        for _ in 0..first {
            self.send_next().await;
        }
        let mut buf = vec![0u8; 65535];
        let mut resend_at = Instant::now() + retransmit;
        loop {
            if self.failed.iter().all(|f| *f) {
                return Err(self.all_failed());
            }
            tokio::select! {
                (i, received) = recv_any(&self.attempts, &mut buf) => {
                    if let Some(done) = self.received(i, received.map(|n| &buf[..n])).await {
                        return done;
                    }
                    if self.attempts.iter().all(|a| a.settled) {
                        // Failed over: the next upstream at once.
                        self.send_next().await;
                        resend_at = Instant::now() + retransmit;
                    }
                }
                () = tokio::time::sleep_until(resend_at.min(self.deadline)) => {
                    if Instant::now() >= self.deadline {
                        self.last.get_or_insert((self.forwarder.upstreams[0], ExchangeError::Timeout));
                        return Err(self.all_failed());
                    }
                    self.send_next().await;
                    resend_at = Instant::now() + retransmit;
                }
            }
        }
    }

    /// Sends the query to the next upstream that has not failed (again, when it was
    /// asked before: the datagram may have been lost).
    async fn send_next(&mut self) {
        let n = self.forwarder.upstreams.len();
        let Some(index) = (0..n)
            .map(|k| (self.next + k) % n)
            .find(|i| !self.failed[*i])
        else {
            return;
        };
        self.next = (index + 1) % n;
        let server = self.forwarder.upstreams[index];
        let sent = match self.attempts.iter().position(|a| a.index == index) {
            Some(at) => self.attempts[at]
                .sock
                .send(&self.out.bytes)
                .await
                .map(|_| ()),
            None => match connected(server).await {
                Ok(sock) => {
                    let sent = sock.send(&self.out.bytes).await.map(|_| ());
                    self.attempts.push(Attempt {
                        index,
                        sock,
                        sent: std::time::Instant::now(),
                        settled: false,
                    });
                    sent
                }
                Err(e) => Err(e),
            },
        };
        if let Err(e) = sent {
            self.fail(index, ExchangeError::Io(e));
        }
    }

    /// Handles a datagram (or a socket error) from attempt `i`; `Some` when the
    /// exchange is over.
    async fn received(
        &mut self,
        i: usize,
        received: std::io::Result<&[u8]>,
    ) -> Option<Result<Forwarded, ForwardError>> {
        let index = self.attempts[i].index;
        let server = self.forwarder.upstreams[index];
        let bytes = match received {
            Ok(bytes) => bytes,
            Err(e) => {
                self.fail(index, ExchangeError::Io(e));
                return None;
            }
        };
        let Some(reply) = matching(bytes, &self.out.query) else {
            // A stray or spoofed datagram: keep waiting for the real answer.
            tracing::debug!(target: "dns", %server, "ignored a reply that does not match the query");
            return None;
        };
        let reply = if reply.metadata.truncation {
            match tcp_exchange(server, &self.out.bytes, &self.out.query, self.deadline).await {
                Ok(reply) => reply,
                Err(e) => {
                    self.fail(index, e);
                    return None;
                }
            }
        } else {
            reply
        };
        let code = reply.metadata.response_code;
        if matches!(code, ResponseCode::ServFail | ResponseCode::Refused) {
            self.fail(index, ExchangeError::Refused(code));
            return None;
        }
        self.settle(index, false);
        Some(Ok(Forwarded {
            reply,
            upstream: server,
        }))
    }

    /// Upstream `index` failed this exchange: counted, and not asked again.
    fn fail(&mut self, index: usize, error: ExchangeError) {
        let server = self.forwarder.upstreams[index];
        tracing::debug!(target: "dns", %server, error = %crate::report(&error), "upstream failed, trying the next");
        self.failed[index] = true;
        self.settle(index, true);
        self.last = Some((server, error));
    }

    /// Counts the outcome of upstream `index`'s attempt, once.
    fn settle(&mut self, index: usize, failed: bool) {
        let qtype = self
            .out
            .query
            .queries
            .first()
            .map_or(RecordType::NULL, Query::query_type);
        for a in self
            .attempts
            .iter_mut()
            .filter(|a| a.index == index && !a.settled)
        {
            a.settled = true;
            self.forwarder
                .metrics
                .upstream(index, qtype, a.sent.elapsed(), failed);
        }
    }

    /// Upstreams asked that never answered count as failed.
    fn settle_unanswered(&mut self) {
        let unanswered: Vec<usize> = self
            .attempts
            .iter()
            .filter(|a| !a.settled)
            .map(|a| a.index)
            .collect();
        for index in unanswered {
            self.settle(index, true);
        }
    }

    fn all_failed(&mut self) -> ForwardError {
        match self.last.take() {
            Some((server, last)) => ForwardError::AllFailed {
                count: self.forwarder.upstreams.len(),
                server,
                last,
            },
            None => ForwardError::NoUpstream,
        }
    }
}

/// A UDP socket connected to `server`.
async fn connected(server: SocketAddr) -> std::io::Result<UdpSocket> {
    let any: SocketAddr = if server.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(any).await?;
    sock.connect(server).await?;
    Ok(sock)
}

/// The next datagram (or error) on any unsettled attempt's socket, with its position.
async fn recv_any(attempts: &[Attempt], buf: &mut [u8]) -> (usize, std::io::Result<usize>) {
    std::future::poll_fn(|cx| {
        for (i, a) in attempts.iter().enumerate().filter(|(_, a)| !a.settled) {
            let mut read = tokio::io::ReadBuf::new(&mut buf[..]);
            if let std::task::Poll::Ready(result) = a.sock.poll_recv(cx, &mut read) {
                let n = read.filled().len();
                return std::task::Poll::Ready((i, result.map(|()| n)));
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// Our query for `question`: a fresh random ID, the client's RD, CD, DO and end-to-end
/// EDNS options relayed as it set them, EDNS with our payload size.
fn upstream_query(question: &Query, relay: &Relay) -> Result<Outgoing, ForwardError> {
    let bits = relay.bits;
    let mut query = Message::new(rand::random(), MessageType::Query, OpCode::Query);
    query.metadata.recursion_desired = bits.recursion_desired;
    query.metadata.checking_disabled = bits.checking_disabled;
    query.add_query(question.clone());
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_PAYLOAD);
    edns.set_dnssec_ok(bits.dnssec_ok);
    for option in &relay.options {
        edns.options_mut().insert(option.clone());
    }
    query.set_edns(edns);
    let bytes = query.to_vec().map_err(ForwardError::Encode)?;
    Ok(Outgoing {
        query: Arc::new(query),
        bytes: bytes.into(),
    })
}

/// The parsed reply if it answers `query`: same ID, a response, same question.
fn matching(reply: &[u8], query: &Message) -> Option<Message> {
    let msg = parse_reply(reply)?;
    let same_question = match (msg.queries.first(), query.queries.first()) {
        (Some(a), Some(b)) => {
            a.query_type() == b.query_type()
                && a.query_class() == b.query_class()
                && a.name() == b.name()
        }
        _ => false,
    };
    (msg.metadata.id == query.metadata.id
        && msg.metadata.message_type == MessageType::Response
        && same_question)
        .then_some(msg)
}

/// An upstream reply, parsed. A record with empty RDATA (an empty NULL record, say) is
/// valid in an answer, but hickory accepts it only in UPDATE messages: such a reply is
/// read as one (the sections have the same layout), then set back to a QUERY response,
/// so that it is relayed instead of dropped.
fn parse_reply(reply: &[u8]) -> Option<Message> {
    match Message::from_vec(reply) {
        Ok(msg) => Some(msg),
        Err(DecodeError::InvalidEmptyRecord) => {
            let mut as_update = reply.to_vec();
            let op_code = as_update[2] & OPCODE_BITS;
            as_update[2] = (as_update[2] & !OPCODE_BITS) | (UPDATE << 3);
            let mut msg = Message::from_vec(&as_update).ok()?;
            msg.metadata.op_code = OpCode::from_u8(op_code >> 3);
            Some(msg)
        }
        Err(_) => None,
    }
}

/// The opcode's bits in the third header byte, and UPDATE's value (RFC 2136).
const OPCODE_BITS: u8 = 0x78;
const UPDATE: u8 = 5;

async fn tcp_exchange(
    server: SocketAddr,
    bytes: &[u8],
    query: &Message,
    deadline: Instant,
) -> Result<Message, ExchangeError> {
    let mut stream = timeout_at(deadline, TcpStream::connect(server))
        .await
        .map_err(|_| ExchangeError::Timeout)??;
    timeout_at(deadline, write_frame(&mut stream, bytes))
        .await
        .map_err(|_| ExchangeError::Timeout)??;
    let reply = timeout_at(deadline, read_frame(&mut stream))
        .await
        .map_err(|_| ExchangeError::Timeout)??
        .ok_or(ExchangeError::Mismatch)?;
    matching(&reply, query).ok_or(ExchangeError::Mismatch)
}
