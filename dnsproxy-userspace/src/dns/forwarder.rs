//! Forwarding to upstream servers: UDP with EDNS (1232-byte payload) first, TCP when
//! the answer is truncated; a per-server timeout; failover in configured order, or all
//! servers at once in parallel mode. A reply must carry our query's ID and question;
//! SERVFAIL and REFUSED count as failures so the next server is asked.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use hickory_proto::{
    ProtoError,
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::RecordType,
};
use tokio::{
    net::{TcpStream, UdpSocket},
    time::{Instant, timeout_at},
};

use super::{
    EDNS_PAYLOAD,
    framing::{read_frame, write_frame},
    metrics::Metrics,
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

    /// Resolves `question` upstream (recursion desired).
    pub async fn forward(&self, question: &Query) -> Result<Forwarded, ForwardError> {
        if self.upstreams.is_empty() {
            return Err(ForwardError::NoUpstream);
        }
        let outgoing = upstream_query(question)?;
        if self.parallel {
            self.forward_parallel(outgoing).await
        } else {
            self.forward_in_order(&outgoing).await
        }
    }

    /// One server after the other, in the configured order.
    async fn forward_in_order(&self, out: &Outgoing) -> Result<Forwarded, ForwardError> {
        let mut last = None;
        for (index, &server) in self.upstreams.iter().enumerate() {
            match exchange_counted(index, server, out, self.timeout, &self.metrics).await {
                Ok(reply) => {
                    return Ok(Forwarded {
                        reply,
                        upstream: server,
                    });
                }
                Err(e) => {
                    tracing::debug!(target: "dns", %server, error = %crate::report(&e), "upstream failed, trying the next");
                    last = Some((server, e));
                }
            }
        }
        Err(self.all_failed(last))
    }

    /// Every server at once; the first good answer wins (the others are dropped with
    /// the set that owns them).
    async fn forward_parallel(&self, out: Outgoing) -> Result<Forwarded, ForwardError> {
        let mut set = tokio::task::JoinSet::new();
        for (index, &server) in self.upstreams.iter().enumerate() {
            let (out, timeout, metrics) = (out.clone(), self.timeout, Arc::clone(&self.metrics));
            set.spawn(async move {
                let result = exchange_counted(index, server, &out, timeout, &metrics).await;
                (server, result)
            });
        }
        let mut last = None;
        while let Some(joined) = set.join_next().await {
            let Ok((server, result)) = joined else {
                continue;
            };
            match result {
                Ok(reply) => {
                    return Ok(Forwarded {
                        reply,
                        upstream: server,
                    });
                }
                Err(e) => last = Some((server, e)),
            }
        }
        Err(self.all_failed(last))
    }

    fn all_failed(&self, last: Option<(SocketAddr, ExchangeError)>) -> ForwardError {
        match last {
            Some((server, last)) => ForwardError::AllFailed {
                count: self.upstreams.len(),
                server,
                last,
            },
            None => ForwardError::NoUpstream,
        }
    }
}

/// Our query for `question`: a fresh random ID, RD set, EDNS with our payload size.
fn upstream_query(question: &Query) -> Result<Outgoing, ForwardError> {
    let mut query = Message::new(rand::random(), MessageType::Query, OpCode::Query);
    query.metadata.recursion_desired = true;
    query.add_query(question.clone());
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_PAYLOAD);
    query.set_edns(edns);
    let bytes = query.to_vec().map_err(ForwardError::Encode)?;
    Ok(Outgoing {
        query: Arc::new(query),
        bytes: bytes.into(),
    })
}

async fn exchange_counted(
    index: usize,
    server: SocketAddr,
    out: &Outgoing,
    timeout: Duration,
    metrics: &Metrics,
) -> Result<Message, ExchangeError> {
    let started = std::time::Instant::now();
    let result = exchange(server, &out.bytes, &out.query, timeout).await;
    let qtype = out
        .query
        .queries
        .first()
        .map_or(RecordType::NULL, Query::query_type);
    metrics.upstream(index, qtype, started.elapsed(), result.is_err());
    result
}

async fn exchange(
    server: SocketAddr,
    bytes: &[u8],
    query: &Message,
    timeout: Duration,
) -> Result<Message, ExchangeError> {
    let reply = udp_exchange(server, bytes, query, Instant::now() + timeout).await?;
    let reply = if reply.metadata.truncation {
        tcp_exchange(server, bytes, query, Instant::now() + timeout).await?
    } else {
        reply
    };
    match reply.metadata.response_code {
        ResponseCode::ServFail | ResponseCode::Refused => {
            Err(ExchangeError::Refused(reply.metadata.response_code))
        }
        _ => Ok(reply),
    }
}

/// The parsed reply if it answers `query`: same ID, a response, same question.
fn matching(reply: &[u8], query: &Message) -> Option<Message> {
    let msg = Message::from_vec(reply).ok()?;
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

async fn udp_exchange(
    server: SocketAddr,
    bytes: &[u8],
    query: &Message,
    deadline: Instant,
) -> Result<Message, ExchangeError> {
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .expect("literal");
    let sock = UdpSocket::bind(bind).await?;
    sock.connect(server).await?;
    sock.send(bytes).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = timeout_at(deadline, sock.recv(&mut buf))
            .await
            .map_err(|_| ExchangeError::Timeout)??;
        if let Some(msg) = matching(&buf[..n], query) {
            return Ok(msg);
        }
        // A stray or spoofed datagram: keep waiting for the real answer.
        tracing::debug!(target: "dns", %server, "ignored a reply that does not match the query");
    }
}

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
