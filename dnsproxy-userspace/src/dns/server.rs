//! Sockets of a listener and the tasks that serve them: UDP and TCP on 127.0.0.1 and
//! `::1`. The local listener has one `SO_REUSEPORT` UDP socket per UDP thread
//! ([`super::workers`]), so queries spread over threads without a shared lock; UDP
//! queries are read and answered in batches ([`super::batch`]), table answers from
//! encoded replies ([`super::fast`]). Sockets are created synchronously ([`bind_std`]), so that node mode
//! can create them on a thread that entered a pod's network namespace, and so that
//! "port in use" is reported before the data path is attached.
//!
//! Every task has an owner: a listener's receive loops sit in a `JoinSet`, and the
//! per-query and per-connection tasks they start in a `TaskTracker`. One cancellation
//! token stops a listener: the loops stop reading (UDP first answers what the kernel
//! had already queued), TCP connections ([`super::tcp`]) finish the queries at hand
//! and close, and [`Listeners::serve`] returns once every query in flight is answered.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use socket2::{Domain, Socket, Type};
use tokio::{
    io::{Interest, unix::AsyncFd},
    net::TcpListener,
    task::JoinSet,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::handoff::Sockets;

use super::{
    Protocol, batch,
    client::ClientContext,
    fast,
    handler::{Handler, Keep},
    receive_queue, tcp,
    workers::UdpWorkers,
};

/// Most queued datagrams a stopping UDP socket still answers (a default receive buffer
/// holds a few hundred queries).
const DRAIN_QUEUED: usize = 4096;

/// Batches a loop reads per wake-up before it lets the other loops of its thread run.
const DRAIN_ROUNDS: usize = 4;

/// What became of one datagram.
enum Reply {
    /// Answered from the loop's kept replies: this many bytes of its output slot.
    Kept(usize),
    /// Answered at once by the handler.
    Now(Vec<u8>),
    /// Answered later, by a task of its own, or not at all (as the handler decides).
    Later,
}

/// A UDP listener as its loop holds it: registered for reading only. Registered for
/// writing too (as `tokio::net::UdpSocket` is), every batch of answers made the socket
/// writable again and woke the loop's epoll for nothing: an extra `epoll_wait` per
/// batch. Answers are sent without waiting ([`batch::Outbox`], [`Serving::answer_udp`]):
/// a full send buffer drops the datagram, as the network may, and the client retries.
type UdpListener = AsyncFd<std::net::UdpSocket>;

/// The client context of a listener, replaceable while it serves.
pub type SharedContext = Arc<ArcSwap<ClientContext>>;

/// Errors binding the listener.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The port is taken.
    #[error(
        "{addr} ({protocol}) is already in use: is another DNS proxy running? choose another --listen-port"
    )]
    InUse {
        addr: SocketAddr,
        protocol: Protocol,
    },
    /// Any other bind failure.
    #[error("cannot listen on {addr} ({protocol})")]
    Other {
        addr: SocketAddr,
        protocol: Protocol,
        source: std::io::Error,
    },
}

/// Bound standard sockets, not yet registered with the runtime.
pub struct StdListeners {
    udp: Vec<std::net::UdpSocket>,
    tcp: Vec<std::net::TcpListener>,
}

/// Bound, not yet serving: TCP registered with the runtime; UDP is registered by the
/// UDP thread that will serve it ([`super::workers`]).
pub struct Listeners {
    udp: Vec<std::net::UdpSocket>,
    tcp: Vec<TcpListener>,
}

fn bind_error(addr: SocketAddr, protocol: Protocol, source: std::io::Error) -> BindError {
    if source.kind() == std::io::ErrorKind::AddrInUse {
        BindError::InUse { addr, protocol }
    } else {
        BindError::Other {
            addr,
            protocol,
            source,
        }
    }
}

/// How many UDP sockets a listener binds per address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UdpSockets {
    /// This many `SO_REUSEPORT` sockets (the local listener: one per UDP thread), so
    /// that queries spread over the threads without a shared lock.
    ReusePort(usize),
    /// One socket, no `SO_REUSEPORT` (inside pods: a root process in the pod could
    /// otherwise join the group and read or answer other containers' queries).
    One,
}

fn udp_socket(addr: SocketAddr, reuse_port: bool) -> std::io::Result<std::net::UdpSocket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    sock.set_reuse_port(reuse_port)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

fn tcp_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    Ok(sock.into())
}

/// Binds UDP (as `udp_sockets` says) and TCP on 127.0.0.1:`port` (required) and
/// [`::1`]:`port` (skipped when the netns has no IPv6 loopback), in the calling
/// thread's network namespace. The TCP listener does not share its port, so a second
/// daemon fails here.
pub fn bind_std(port: u16, udp_sockets: UdpSockets) -> Result<StdListeners, BindError> {
    let (per_address, reuse_port) = match udp_sockets {
        // One socket needs no group (and the data path's listener lookup is cheaper
        // without one).
        UdpSockets::ReusePort(n) => (n.max(1), n > 1),
        UdpSockets::One => (1, false),
    };
    let mut udp = Vec::new();
    let mut tcp = Vec::new();
    for ip in [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ] {
        let addr = SocketAddr::new(ip, port);
        let listener = match tcp_listener(addr) {
            Ok(l) => l,
            Err(e) if ip.is_ipv6() && e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                tracing::debug!(%addr, "no IPv6 loopback here: serving IPv4 only");
                continue;
            }
            Err(e) => return Err(bind_error(addr, Protocol::Tcp, e)),
        };
        tcp.push(listener);
        for _ in 0..per_address {
            let sock =
                udp_socket(addr, reuse_port).map_err(|e| bind_error(addr, Protocol::Udp, e))?;
            udp.push(sock);
        }
    }
    Ok(StdListeners { udp, tcp })
}

impl StdListeners {
    /// One of the sockets, e.g. to read its network namespace cookie.
    pub fn any_socket(&self) -> Option<&std::net::UdpSocket> {
        self.udp.first()
    }

    /// Gives each UDP socket a receive queue of `bytes` ([`receive_queue::set_buffer`]);
    /// returns what the kernel granted.
    pub fn set_udp_receive_buffer(&self, bytes: usize) -> std::io::Result<usize> {
        let mut granted = 0;
        for sock in &self.udp {
            granted = receive_queue::set_buffer(sock, bytes)?;
        }
        Ok(granted)
    }

    /// New descriptors for the same sockets, kept for a successor ([`crate::handoff`]).
    pub fn dup(&self) -> std::io::Result<Sockets> {
        let udp = self.udp.iter().map(|s| Ok(OwnedFd::from(s.try_clone()?)));
        let tcp = self.tcp.iter().map(|s| Ok(OwnedFd::from(s.try_clone()?)));
        Ok(Sockets {
            udp: udp.collect::<std::io::Result<_>>()?,
            tcp: tcp.collect::<std::io::Result<_>>()?,
        })
    }

    /// Sockets a predecessor handed over: bound and listening already.
    pub fn from_sockets(sockets: Sockets) -> Self {
        StdListeners {
            udp: sockets.udp.into_iter().map(Into::into).collect(),
            tcp: sockets.tcp.into_iter().map(Into::into).collect(),
        }
    }
}

impl Listeners {
    /// Registers the bound TCP listeners with the runtime (call inside it).
    pub fn from_std(std: StdListeners) -> std::io::Result<Self> {
        Ok(Listeners {
            udp: std.udp,
            tcp: std
                .tcp
                .into_iter()
                .map(TcpListener::from_std)
                .collect::<Result<_, _>>()?,
        })
    }

    /// Every socket, for `dp_listeners` ([`crate::bpf::listeners`]).
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        let udp = self.udp.iter().map(|s| s.as_fd());
        udp.chain(self.tcp.iter().map(|s| s.as_fd())).collect()
    }

    /// Addresses actually bound, for the start-up log.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.tcp
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect()
    }

    /// Serves until `shutdown` is cancelled, then answers what is in flight and returns
    /// (dropping the sockets closes them).
    pub async fn serve(self, shared: Shared, ctx: SharedContext, shutdown: CancellationToken) {
        let in_flight = TaskTracker::new();
        let mut loops = JoinSet::new();
        let serving = Serving {
            shared,
            ctx,
            in_flight: in_flight.clone(),
            shutdown,
        };
        for sock in self.udp {
            loops.spawn_on(serving.clone().udp(sock), &serving.shared.udp.next());
        }
        for listener in self.tcp {
            loops.spawn(serving.clone().tcp(listener));
        }
        while loops.join_next().await.is_some() {}
        in_flight.close();
        in_flight.wait().await;
    }
}

/// What every listener of the daemon shares: the handler, the TCP connection registry
/// (its bounds are the daemon's, not a listener's) and the UDP threads.
#[derive(Clone)]
pub struct Shared {
    pub handler: Arc<Handler>,
    pub tcp: Arc<tcp::Connections>,
    pub udp: UdpWorkers,
    /// Datagrams the kernel dropped at the UDP listeners' full receive queues.
    pub queue_drops: Arc<receive_queue::Drops>,
    /// UDP queries answered on tasks of their own, at most.
    pub query_tasks: Arc<TaskBudget>,
}

/// A bound on the UDP queries waiting on tasks of their own (upstream questions,
/// merged ones, table answers that wait for a VIP). Every such task admits its
/// question only when it first runs, so a loop that reads faster than the tasks run
/// (a flood while the daemon is short of CPU) would otherwise start one task per query
/// read, without end. Past it a query gets SERVFAIL at once (`overload`).
#[derive(Debug)]
pub struct TaskBudget {
    live: AtomicUsize,
    max: usize,
}

impl TaskBudget {
    /// Room for `max` tasks: what `--max-inflight` admits, leaders and the followers
    /// merged into them.
    pub fn new(max_inflight: usize) -> Arc<Self> {
        Arc::new(TaskBudget {
            live: AtomicUsize::new(0),
            max: max_inflight.saturating_mul(1 + super::inflight::FOLLOWERS_PER_SLOT),
        })
    }

    /// A place for one more task, if there is one.
    fn take(self: &Arc<Self>) -> Option<TaskPermit> {
        self.live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| TaskPermit(Arc::clone(self)))
    }

    /// Tasks holding a place now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }
}

/// One task's place in a [`TaskBudget`], given back when dropped.
#[derive(Debug)]
pub struct TaskPermit(Arc<TaskBudget>);

impl Drop for TaskPermit {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What every loop of one listener shares.
#[derive(Clone)]
struct Serving {
    shared: Shared,
    ctx: SharedContext,
    /// Queries being answered and TCP connections being served.
    in_flight: TaskTracker,
    shutdown: CancellationToken,
}

impl Serving {
    /// A UDP receive loop, on the UDP thread it was spawned on (which the socket is
    /// registered with here).
    async fn udp(self, sock: std::net::UdpSocket) {
        // SAFETY: the AsyncFd owns the socket, so its descriptor stays open and the
        // same for the AsyncFd's whole life.
        let sock = match unsafe { AsyncFd::register_with_interest(sock, Interest::READABLE) } {
            Ok(sock) => Arc::new(sock),
            Err(e) => {
                tracing::error!(error = %e, "cannot register a UDP listener socket");
                return;
            }
        };
        // Dropped before the socket: declared after it.
        let _drops = self.shared.queue_drops.watch(sock.get_ref());
        let mut fast = fast::Answers::default();
        loop {
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break,
                ready = sock.readable() => if let Err(e) = ready {
                    tracing::warn!(error = %e, "UDP receive failed");
                    continue;
                },
            }
            // A few batches per wake-up, then back to the runtime: the other loops of
            // this thread (other pods) get their turn.
            for _ in 0..DRAIN_ROUNDS {
                if !self.receive_batch(&sock, &mut fast) {
                    break;
                }
            }
        }
        // Queries the kernel queued before the stop were sent to us: answer them too
        // (bounded: a flood must not keep a stopping listener reading).
        for _ in 0..DRAIN_QUEUED / batch::BATCH {
            if !self.receive_batch(&sock, &mut fast) {
                break;
            }
        }
    }

    /// Reads one batch of queries and answers it; false when the socket had no more.
    fn receive_batch(&self, sock: &Arc<UdpListener>, fast: &mut fast::Answers) -> bool {
        batch::with_scratch(|scratch| {
            let batch::Scratch {
                received,
                answers,
                outbox,
            } = scratch;
            let fd = sock.as_raw_fd();
            let mut read = 0;
            // A short batch drained the socket: report WouldBlock so that the runtime
            // clears readiness now, instead of one more empty read.
            let outcome = sock.try_io(Interest::READABLE, |_| {
                read = received.recv(fd)?;
                if read < batch::BATCH {
                    return Err(std::io::ErrorKind::WouldBlock.into());
                }
                Ok(())
            });
            if let Err(e) = &outcome
                && e.kind() != std::io::ErrorKind::WouldBlock
            {
                tracing::warn!(error = %e, "UDP receive failed");
            }
            // Answers made for this batch only; they live until the flush.
            let mut owned: Vec<(Vec<u8>, SocketAddr)> = Vec::new();
            for (i, out) in answers.iter_mut().enumerate().take(read) {
                let Some((query, client)) = received.get(i) else {
                    continue;
                };
                let bytes: &[u8] = match self.answer_datagram(sock, query, client, fast, out) {
                    Reply::Kept(len) => &out[..len],
                    Reply::Now(bytes) => {
                        owned.push((bytes, client));
                        &owned.last().expect("just pushed").0
                    }
                    Reply::Later => continue,
                };
                // SAFETY: `out` is not written again, and `owned`'s buffers do not move
                // (the Vecs may, their heap bytes do not), until the flush below.
                unsafe { outbox.push(bytes, client) };
            }
            outbox.flush(fd);
            drop(owned);
            outcome.is_ok()
        })
    }

    /// The reply to one datagram when it needs no waiting (a reply this loop kept,
    /// written into `out`, or one the handler gives at once); else the query goes on a
    /// task of its own, so that a slow upstream never holds up the others.
    fn answer_datagram(
        &self,
        sock: &Arc<UdpListener>,
        query: &[u8],
        client: SocketAddr,
        fast: &mut fast::Answers,
        out: &mut [u8; fast::MAX_KEPT],
    ) -> Reply {
        let handler = &self.shared.handler;
        let ctx = self.ctx.load();
        if let Some(parsed) = fast::parse(query)
            && !ctx.debug_log
        {
            let generation = handler.answers_generation();
            if let Some(written) = fast.reply(query, &parsed, generation, &ctx, out) {
                handler.count_kept(parsed.qtype, written.cached, Protocol::Udp, &ctx);
                return Reply::Kept(written.len);
            }
            if let Some(now) = handler.answer_now(query, Protocol::Udp, client, &ctx) {
                let Some(bytes) = now.bytes else {
                    return Reply::Later;
                };
                let cached_for = match now.keep {
                    Keep::Table => None,
                    Keep::Cached(d) => Some(d),
                    Keep::No => return Reply::Now(bytes),
                };
                if fast.keep(query, &parsed, &bytes, generation, &ctx, cached_for) {
                    handler.metrics().fast_reset();
                }
                return Reply::Now(bytes);
            }
        }
        // A task admits its question only when it runs: while tasks wait for a thread
        // (a loop that reads faster than they run), only the budget bounds them.
        let Some(permit) = self.shared.query_tasks.take() else {
            return handler
                .overloaded(query, Protocol::Udp, client, &ctx)
                .map_or(Reply::Later, Reply::Now);
        };
        self.answer_udp(sock, query.to_vec(), client, permit);
        Reply::Later
    }

    /// Answers one datagram on its own task.
    fn answer_udp(
        &self,
        sock: &Arc<UdpListener>,
        query: Vec<u8>,
        client: SocketAddr,
        permit: TaskPermit,
    ) {
        let (sock, handler, ctx) = (
            Arc::clone(sock),
            Arc::clone(&self.shared.handler),
            self.ctx.load_full(),
        );
        self.in_flight.spawn(async move {
            let _permit = permit;
            if let Some(reply) = handler.handle(&query, Protocol::Udp, client, &ctx).await
                && let Err(e) = sock.get_ref().send_to(&reply, client)
            {
                tracing::debug!(target: "dns", %client, error = %e, "UDP send failed");
            }
        });
    }

    async fn tcp(self, listener: TcpListener) {
        loop {
            let accepted = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, client)) => {
                    let ctx = self.ctx.load_full();
                    // At a bound: refused (counted); dropping the stream closes it.
                    let Some(registration) = self.shared.tcp.admit(&ctx.client, Instant::now())
                    else {
                        continue;
                    };
                    let handler = Arc::clone(&self.shared.handler);
                    let shutdown = self.shutdown.clone();
                    self.in_flight.spawn(tcp::serve(
                        stream,
                        client,
                        registration,
                        handler,
                        ctx,
                        shutdown,
                    ));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_task_budget_refuses_past_its_bound_and_frees_a_place_when_a_task_ends() {
        // One in-flight slot: one leader and its followers.
        let budget = TaskBudget::new(1);
        let mut held: Vec<TaskPermit> = std::iter::from_fn(|| budget.take()).collect();
        assert_eq!(held.len(), 1 + super::super::inflight::FOLLOWERS_PER_SLOT);
        assert!(budget.take().is_none());
        held.pop();
        assert_eq!(budget.live(), super::super::inflight::FOLLOWERS_PER_SLOT);
        assert!(budget.take().is_some());
    }
}
