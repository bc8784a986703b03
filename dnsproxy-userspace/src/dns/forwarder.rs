//! Forwarding to upstream servers: UDP with EDNS (1232-byte payload) first, TCP when
//! the answer is truncated; a per-server timeout; failover in configured order, or all
//! servers at once in parallel mode. A reply must carry our query's ID and question;
//! SERVFAIL and REFUSED count as failures so the next server is asked.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::RecordType,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
    time::{Instant, timeout_at},
};

use super::{handler::EDNS_PAYLOAD, metrics::Metrics};

/// Why forwarding failed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// No upstream is configured.
    #[error("no upstream configured")]
    NoUpstream,
    /// The query could not be encoded.
    #[error("cannot encode the upstream query: {0}")]
    Encode(String),
    /// Every upstream failed; the last error is kept.
    #[error("all {count} upstreams failed, last: {last}")]
    AllFailed { count: usize, last: String },
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

#[derive(Debug, thiserror::Error)]
enum ExchangeError {
    #[error("timed out")]
    Timeout,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("answered {0}")]
    Refused(ResponseCode),
    #[error("reply does not match the query")]
    Mismatch,
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
        let mut query = Message::new(rand::random(), MessageType::Query, OpCode::Query);
        query.metadata.recursion_desired = true;
        query.add_query(question.clone());
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        query.set_edns(edns);
        let bytes = query
            .to_vec()
            .map_err(|e| ForwardError::Encode(e.to_string()))?;
        let query = Arc::new(query);
        let bytes: Arc<[u8]> = bytes.into();

        if self.parallel {
            let mut set = tokio::task::JoinSet::new();
            for (index, &server) in self.upstreams.iter().enumerate() {
                let (q, b, timeout, metrics) = (
                    query.clone(),
                    bytes.clone(),
                    self.timeout,
                    self.metrics.clone(),
                );
                set.spawn(async move {
                    (
                        server,
                        exchange_counted(index, server, &b, &q, timeout, &metrics).await,
                    )
                });
            }
            let mut last = String::new();
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
                    Err(e) => last = format!("{server}: {e}"),
                }
            }
            return Err(ForwardError::AllFailed {
                count: self.upstreams.len(),
                last,
            });
        }

        let mut last = String::new();
        for (index, &server) in self.upstreams.iter().enumerate() {
            match exchange_counted(index, server, &bytes, &query, self.timeout, &self.metrics).await
            {
                Ok(reply) => {
                    return Ok(Forwarded {
                        reply,
                        upstream: server,
                    });
                }
                Err(e) => {
                    tracing::debug!(target: "dns", %server, error = %e, "upstream failed, trying the next");
                    last = format!("{server}: {e}");
                }
            }
        }
        Err(ForwardError::AllFailed {
            count: self.upstreams.len(),
            last,
        })
    }
}

async fn exchange_counted(
    index: usize,
    server: SocketAddr,
    bytes: &[u8],
    query: &Message,
    timeout: Duration,
    metrics: &Metrics,
) -> Result<Message, ExchangeError> {
    let started = std::time::Instant::now();
    let result = exchange(server, bytes, query, timeout).await;
    let qtype = query
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
    let len = u16::try_from(bytes.len()).map_err(|_| ExchangeError::Mismatch)?;
    let mut framed = Vec::with_capacity(bytes.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(bytes);
    timeout_at(deadline, stream.write_all(&framed))
        .await
        .map_err(|_| ExchangeError::Timeout)??;
    let mut len = [0u8; 2];
    timeout_at(deadline, stream.read_exact(&mut len))
        .await
        .map_err(|_| ExchangeError::Timeout)??;
    let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
    timeout_at(deadline, stream.read_exact(&mut reply))
        .await
        .map_err(|_| ExchangeError::Timeout)??;
    matching(&reply, query).ok_or(ExchangeError::Mismatch)
}
