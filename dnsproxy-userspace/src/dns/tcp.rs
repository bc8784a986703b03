//! DNS over TCP, as RFC 7766 asks and bounded: a registry of the daemon's connections
//! (at most `--max-tcp-connections`, and `--max-tcp-connections-per-client` for one
//! client, a pod in node mode), and the loop that serves one connection.
//!
//! At a bound, the connection that has been quiet longest (of the same client when the
//! client's bound is reached) is closed to make room (RFC 7766 §6.2.2); when none has
//! been quiet for [`EVICTABLE_AFTER`], the new connection is refused. A connection
//! reads queries while at most [`MAX_PIPELINED`] are being answered, answers them in
//! the order they are ready, and closes on: an idle timeout between queries, a read
//! timeout inside a frame (slowloris), a write timeout (a client that does not read),
//! a cap on queries, a zero-length frame, or the listener stopping.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, tcp::OwnedReadHalf},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

use super::{
    Protocol,
    client::ClientContext,
    framing::write_frame,
    handler::Handler,
    metrics::{Metrics, TcpReason},
};

/// Queries of one connection being answered at once.
pub const MAX_PIPELINED: usize = 16;

/// A connection quiet for less than this is not closed to make room for another.
pub const EVICTABLE_AFTER: Duration = Duration::from_millis(500);

/// Bounds and timeouts of DNS over TCP.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub total: usize,
    pub per_client: usize,
    /// Between queries.
    pub idle: Duration,
    /// From the first byte of a frame to its last.
    pub read: Duration,
    /// For one answer to be taken by the client.
    pub write: Duration,
    /// Queries one connection may send; then it is closed after the answers.
    pub max_queries: u32,
}

struct Entry {
    client: Arc<str>,
    last_active: Instant,
    close: CancellationToken,
}

/// The daemon's TCP connections.
pub struct Connections {
    limits: Limits,
    metrics: Arc<Metrics>,
    state: Mutex<(u64, HashMap<u64, Entry>)>,
}

/// A connection's place in the registry; dropping it frees the place.
pub struct Registration {
    id: u64,
    connections: Arc<Connections>,
    /// Cancelled when the connection is evicted.
    pub closed: CancellationToken,
}

impl Connections {
    pub fn new(limits: Limits, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Connections {
            limits,
            metrics,
            state: Mutex::new((0, HashMap::new())),
        })
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Connections open now.
    pub fn len(&self) -> usize {
        self.lock().1.len()
    }

    /// True when none is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, HashMap<u64, Entry>)> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A place for a new connection of `client`, making room when a bound is reached;
    /// `None` (counted) when there is none.
    pub fn admit(self: &Arc<Self>, client: &Arc<str>, now: Instant) -> Option<Registration> {
        let mut state = self.lock();
        let (next_id, entries) = &mut *state;
        let mine = entries.values().filter(|e| e.client == *client).count();
        let full = if mine >= self.limits.per_client {
            Some(TcpReason::PerClient)
        } else if entries.len() >= self.limits.total {
            Some(TcpReason::Total)
        } else {
            None
        };
        if let Some(reason) = full {
            let quietest = entries
                .iter()
                .filter(|(_, e)| reason == TcpReason::Total || e.client == *client)
                .filter(|(_, e)| now.duration_since(e.last_active) >= EVICTABLE_AFTER)
                .min_by_key(|(_, e)| e.last_active)
                .map(|(id, _)| *id);
            let Some(victim) = quietest else {
                self.metrics.tcp_refused(reason);
                return None;
            };
            if let Some(e) = entries.remove(&victim) {
                e.close.cancel();
                self.metrics.tcp_closed(TcpReason::Evicted);
            }
        }
        *next_id += 1;
        let closed = CancellationToken::new();
        entries.insert(
            *next_id,
            Entry {
                client: Arc::clone(client),
                last_active: now,
                close: closed.clone(),
            },
        );
        Some(Registration {
            id: *next_id,
            connections: Arc::clone(self),
            closed,
        })
    }

    fn touch(&self, id: u64, now: Instant) {
        if let Some(e) = self.lock().1.get_mut(&id) {
            e.last_active = now;
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.connections.lock().1.remove(&self.id);
    }
}

/// A frame being read: the read half travels with the future, so that a frame half
/// read is never dropped when another branch of the loop wins.
type PendingRead = std::pin::Pin<
    Box<dyn Future<Output = (OwnedReadHalf, Result<Vec<u8>, Option<TcpReason>>)> + Send>,
>;

/// Serves one connection until it closes, is closed by a bound or a timeout, or
/// `shutdown` (then the queries at hand are answered first).
pub async fn serve(
    stream: TcpStream,
    client: SocketAddr,
    registration: Registration,
    handler: Arc<Handler>,
    ctx: Arc<ClientContext>,
    shutdown: CancellationToken,
) {
    let limits = registration.connections.limits;
    let metrics = Arc::clone(&registration.connections.metrics);
    let (reader, mut writer) = stream.into_split();
    let mut idle_reader = Some(reader);
    let mut pending: Option<PendingRead> = None;
    let mut answering: JoinSet<Option<Vec<u8>>> = JoinSet::new();
    let (mut queries, mut last_active) = (0u32, Instant::now());
    // Why reading stopped (`None`: the client closed, or the listener is stopping).
    let mut stopped: Option<Option<TcpReason>> = None;
    let closed = loop {
        if let Some(reason) = stopped
            && answering.is_empty()
        {
            break reason;
        }
        if stopped.is_none()
            && pending.is_none()
            && answering.len() < MAX_PIPELINED
            && let Some(reader) = idle_reader.take()
        {
            pending = Some(Box::pin(read_frame(reader, limits.read)));
        }
        tokio::select! {
            () = shutdown.cancelled(), if stopped.is_none() => {
                stopped = Some(None);
                pending = None;
            }
            () = registration.closed.cancelled() => break None,
            (reader, frame) = async { pending.as_mut().expect("guarded").await }, if pending.is_some() => {
                pending = None;
                idle_reader = Some(reader);
                match frame {
                    Ok(query) => {
                        last_active = Instant::now();
                        registration.connections.touch(registration.id, last_active);
                        queries += 1;
                        let (handler, ctx) = (Arc::clone(&handler), Arc::clone(&ctx));
                        answering.spawn(async move { handler.handle(&query, Protocol::Tcp, client, &ctx).await });
                        if queries >= limits.max_queries {
                            stopped = Some(Some(TcpReason::MaxQueries));
                        }
                    }
                    Err(reason) => stopped = Some(reason),
                }
            }
            Some(answered) = answering.join_next() => {
                let Ok(Some(reply)) = answered else { continue };
                match tokio::time::timeout(limits.write, write_frame(&mut writer, &reply)).await {
                    Ok(Ok(())) => {
                        last_active = Instant::now();
                        registration.connections.touch(registration.id, last_active);
                    }
                    Ok(Err(_)) => break None,
                    Err(_) => break Some(TcpReason::WriteTimeout),
                }
            }
            () = tokio::time::sleep_until((last_active + limits.idle).into()), if answering.is_empty() => {
                break Some(TcpReason::Idle);
            }
        }
    };
    if let Some(reason) = closed {
        metrics.tcp_closed(reason);
    }
    let _ = writer.shutdown().await;
}

/// Reads one framed query, waiting as long as it takes for its first byte and at most
/// `read_timeout` for the rest (slowloris). `Err(None)`: the client closed;
/// `Err(Some(reason))`: close the connection for `reason`.
async fn read_frame(
    mut reader: OwnedReadHalf,
    read_timeout: Duration,
) -> (OwnedReadHalf, Result<Vec<u8>, Option<TcpReason>>) {
    let mut len = [0u8; 2];
    let result = match reader.read(&mut len[..1]).await {
        Ok(0) | Err(_) => Err(None),
        Ok(_) => tokio::time::timeout(read_timeout, async {
            reader.read_exact(&mut len[1..]).await?;
            let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
            reader.read_exact(&mut query).await?;
            Ok::<_, std::io::Error>(query)
        })
        .await
        .map_err(|_| Some(TcpReason::ReadTimeout))
        .and_then(|read| read.map_err(|_| None))
        // RFC 7766 §8 leaves a zero-length frame undefined; it is closed here.
        .and_then(|query| {
            if query.is_empty() {
                Err(Some(TcpReason::ZeroLength))
            } else {
                Ok(query)
            }
        }),
    };
    (reader, result)
}

#[cfg(test)]
mod tests {
    use hickory_proto::{
        op::{Message, MessageType, OpCode, Query},
        rr::{Name, RecordType},
    };
    use tokio::net::TcpListener;

    use super::*;
    use crate::dns::testing::{ctx, handler_with};

    fn limits() -> Limits {
        Limits {
            total: 100,
            per_client: 100,
            idle: Duration::from_millis(300),
            read: Duration::from_millis(200),
            write: Duration::from_millis(200),
            max_queries: 100,
        }
    }

    /// Serves TCP on 127.0.0.1 with `limits`, forwarding to `upstreams`.
    async fn serve_on_loopback(
        limits: Limits,
        upstreams: Vec<SocketAddr>,
    ) -> (SocketAddr, Arc<Connections>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new(
            &[],
            &mut prometheus_client::registry::Registry::default(),
            false,
        ));
        let connections = Connections::new(limits, metrics);
        let registry = Arc::clone(&connections);
        let handler = Arc::new(handler_with(upstreams, false));
        tokio::spawn(async move {
            loop {
                let (stream, client) = listener.accept().await.unwrap();
                let ctx = Arc::new(ctx());
                let Some(registration) = registry.admit(&ctx.client, Instant::now()) else {
                    continue;
                };
                let handler = Arc::clone(&handler);
                tokio::spawn(serve(
                    stream,
                    client,
                    registration,
                    handler,
                    ctx,
                    CancellationToken::new(),
                ));
            }
        });
        (addr, connections)
    }

    fn query(id: u16, name: &str) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        let bytes = m.to_vec().unwrap();
        let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
        framed.extend(bytes);
        framed
    }

    async fn reply_id(stream: &mut TcpStream) -> Option<u16> {
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await.ok()?;
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut reply).await.ok()?;
        Some(Message::from_vec(&reply).unwrap().metadata.id)
    }

    /// True when the server closed the connection within `within`.
    async fn closed(stream: &mut TcpStream, within: Duration) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(within, stream.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn pipelined_queries_are_answered_as_they_are_ready() {
        // Silent upstream: the forwarded query waits; the table's answer does not.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (addr, _) = serve_on_loopback(limits(), vec![silent.local_addr().unwrap()]).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut both = query(1, "slow.elsewhere.");
        both.extend(query(2, "fixed.test."));
        s.write_all(&both).await.unwrap();
        assert_eq!(reply_id(&mut s).await, Some(2), "the table's answer first");
        assert_eq!(reply_id(&mut s).await, Some(1), "then the SERVFAIL");
    }

    #[tokio::test]
    async fn a_zero_length_frame_closes() {
        let (addr, connections) = serve_on_loopback(limits(), vec![]).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&query(1, "fixed.test.")).await.unwrap();
        assert_eq!(reply_id(&mut s).await, Some(1));
        s.write_all(&[0, 0]).await.unwrap();
        assert!(closed(&mut s, Duration::from_secs(1)).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(connections.is_empty());
    }

    #[tokio::test]
    async fn idle_and_slowloris_connections_are_closed_by_their_timeouts() {
        let (addr, connections) = serve_on_loopback(limits(), vec![]).await;
        let started = Instant::now();
        let mut idle = TcpStream::connect(addr).await.unwrap();
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(&[0]).await.unwrap(); // half a length, then nothing
        assert!(closed(&mut slow, Duration::from_secs(1)).await);
        assert!(
            started.elapsed() < Duration::from_millis(300),
            "read timeout: {:?}",
            started.elapsed()
        );
        assert!(closed(&mut idle, Duration::from_secs(1)).await);
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "idle timeout"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(connections.is_empty());
    }

    #[tokio::test]
    async fn at_the_client_bound_the_quietest_connection_makes_room() {
        let mut l = limits();
        l.per_client = 2;
        l.idle = Duration::from_secs(30);
        let (addr, connections) = serve_on_loopback(l, vec![]).await;
        let mut first = TcpStream::connect(addr).await.unwrap();
        let mut second = TcpStream::connect(addr).await.unwrap();
        second.write_all(&query(2, "fixed.test.")).await.unwrap();
        assert_eq!(reply_id(&mut second).await, Some(2));
        // Nothing has been quiet for long enough yet: refused.
        let mut refused = TcpStream::connect(addr).await.unwrap();
        assert!(closed(&mut refused, Duration::from_secs(1)).await);
        tokio::time::sleep(EVICTABLE_AFTER).await;
        second.write_all(&query(3, "fixed.test.")).await.unwrap();
        assert_eq!(reply_id(&mut second).await, Some(3));
        // Now the quiet first connection is closed for the new one.
        let mut third = TcpStream::connect(addr).await.unwrap();
        third.write_all(&query(4, "fixed.test.")).await.unwrap();
        assert_eq!(reply_id(&mut third).await, Some(4));
        assert!(closed(&mut first, Duration::from_secs(1)).await);
        assert_eq!(connections.len(), 2);
    }
}
