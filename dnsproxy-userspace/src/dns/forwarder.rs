//! Forwarding to upstream servers: UDP first, TCP when the answer is truncated (or the
//! client came over TCP), per-server timeout, failover in order. The reply must carry
//! our query's ID and question; the caller gets the reply with the client's ID back.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use hickory_proto::op::Message;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
    time::{Instant, timeout_at},
};

use super::{Protocol, metrics::Metrics};

/// Why forwarding failed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// No upstream is configured.
    #[error("no upstream configured")]
    NoUpstream,
    /// Every upstream failed; the last error is kept.
    #[error("all {count} upstreams failed, last: {last}")]
    AllFailed { count: usize, last: String },
}

/// A relayed answer and who gave it.
pub struct Forwarded {
    pub reply: Vec<u8>,
    pub upstream: SocketAddr,
}

/// Sends queries upstream.
pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Forwarder {
    pub fn new(upstreams: Vec<SocketAddr>, timeout: Duration, metrics: Arc<Metrics>) -> Self {
        Self { upstreams, timeout, metrics }
    }

    /// Forwards `query` (a parsed, valid query) and returns the reply bytes with the
    /// client's ID. UDP clients are served over UDP first, TCP clients over TCP.
    pub async fn forward(&self, query: &Message, protocol: Protocol) -> Result<Forwarded, ForwardError> {
        if self.upstreams.is_empty() {
            return Err(ForwardError::NoUpstream);
        }
        let client_id = query.metadata.id;
        let mut last = String::new();
        for &server in &self.upstreams {
            let mut upstream_query = query.clone();
            upstream_query.metadata.id = rand::random();
            let bytes = match upstream_query.to_vec() {
                Ok(b) => b,
                Err(e) => return Err(ForwardError::AllFailed { count: 0, last: e.to_string() }),
            };
            let deadline = Instant::now() + self.timeout;
            let result = match protocol {
                Protocol::Udp => match udp_exchange(server, &bytes, &upstream_query, deadline).await {
                    Ok(reply) if is_truncated(&reply) => {
                        tcp_exchange(server, &bytes, &upstream_query, Instant::now() + self.timeout).await
                    }
                    other => other,
                },
                Protocol::Tcp => tcp_exchange(server, &bytes, &upstream_query, deadline).await,
            };
            self.metrics.upstream(&server.to_string(), result.is_err());
            match result {
                Ok(mut reply) => {
                    reply[..2].copy_from_slice(&client_id.to_be_bytes());
                    return Ok(Forwarded { reply, upstream: server });
                }
                Err(e) => {
                    tracing::debug!(target: "dns", %server, error = %e, "upstream failed");
                    last = format!("{server}: {e}");
                }
            }
        }
        Err(ForwardError::AllFailed { count: self.upstreams.len(), last })
    }
}

fn is_truncated(reply: &[u8]) -> bool {
    reply.len() > 2 && reply[2] & 0x02 != 0
}

/// True when `reply` answers `query`: same ID, a response, same question.
fn matches(reply: &[u8], query: &Message) -> bool {
    let Ok(msg) = Message::from_vec(reply) else {
        return false;
    };
    if msg.metadata.id != query.metadata.id
        || msg.metadata.message_type != hickory_proto::op::MessageType::Response
    {
        return false;
    }
    match (msg.queries.first(), query.queries.first()) {
        (Some(a), Some(b)) => {
            a.query_type() == b.query_type()
                && a.query_class() == b.query_class()
                && a.name() == b.name()
        }
        (None, None) => true,
        _ => false,
    }
}

async fn udp_exchange(
    server: SocketAddr,
    bytes: &[u8],
    query: &Message,
    deadline: Instant,
) -> std::io::Result<Vec<u8>> {
    let bind: SocketAddr = if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("literal");
    let sock = UdpSocket::bind(bind).await?;
    sock.connect(server).await?;
    sock.send(bytes).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = timeout_at(deadline, sock.recv(&mut buf))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"))??;
        if matches(&buf[..n], query) {
            return Ok(buf[..n].to_vec());
        }
        tracing::debug!(target: "dns", %server, "ignored a reply that does not match the query");
    }
}

async fn tcp_exchange(
    server: SocketAddr,
    bytes: &[u8],
    query: &Message,
    deadline: Instant,
) -> std::io::Result<Vec<u8>> {
    let timed_out = |_| std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out");
    let mut stream = timeout_at(deadline, TcpStream::connect(server)).await.map_err(timed_out)??;
    let len = u16::try_from(bytes.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "query too long"))?;
    let mut framed = Vec::with_capacity(bytes.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(bytes);
    timeout_at(deadline, stream.write_all(&framed)).await.map_err(timed_out)??;
    let mut len = [0u8; 2];
    timeout_at(deadline, stream.read_exact(&mut len)).await.map_err(timed_out)??;
    let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
    timeout_at(deadline, stream.read_exact(&mut reply)).await.map_err(timed_out)??;
    if !matches(&reply, query) {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "reply does not match the query"));
    }
    Ok(reply)
}
