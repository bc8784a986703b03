//! Sockets of a listener and the tasks that serve them: UDP and TCP on 127.0.0.1 and
//! `::1`. UDP uses one `SO_REUSEPORT` socket per core, so queries spread over cores without
//! a shared lock. Sockets are created synchronously ([`bind_std`]), so that node mode
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
    sync::Arc,
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use socket2::{Domain, Socket, Type};
use tokio::{
    net::{TcpListener, UdpSocket},
    task::JoinSet,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{Protocol, handler::Handler, local::ClientContext, tcp};

/// Most queued datagrams a stopping UDP socket still answers (a default receive buffer
/// holds a few hundred queries).
const DRAIN_QUEUED: usize = 4096;

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

/// Bound, not yet serving.
pub struct Listeners {
    udp: Vec<UdpSocket>,
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
    /// One `SO_REUSEPORT` socket per core (the local listener): queries spread over
    /// cores without a shared lock.
    PerCore,
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
    let per_address = match udp_sockets {
        UdpSockets::PerCore => std::thread::available_parallelism().map_or(1, usize::from),
        UdpSockets::One => 1,
    };
    let reuse_port = udp_sockets == UdpSockets::PerCore;
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
}

impl Listeners {
    /// Registers bound sockets with the runtime (call inside it).
    pub fn from_std(std: StdListeners) -> std::io::Result<Self> {
        Ok(Listeners {
            udp: std
                .udp
                .into_iter()
                .map(UdpSocket::from_std)
                .collect::<Result<_, _>>()?,
            tcp: std
                .tcp
                .into_iter()
                .map(TcpListener::from_std)
                .collect::<Result<_, _>>()?,
        })
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
            loops.spawn(serving.clone().udp(sock));
        }
        for listener in self.tcp {
            loops.spawn(serving.clone().tcp(listener));
        }
        while loops.join_next().await.is_some() {}
        in_flight.close();
        in_flight.wait().await;
    }
}

/// What every listener of the daemon shares: the handler and the TCP connection
/// registry (its bounds are the daemon's, not a listener's).
#[derive(Clone)]
pub struct Shared {
    pub handler: Arc<Handler>,
    pub tcp: Arc<tcp::Connections>,
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
    async fn udp(self, sock: UdpSocket) {
        let sock = Arc::new(sock);
        let mut buf = vec![0u8; 65535];
        loop {
            let received = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break,
                received = sock.recv_from(&mut buf) => received,
            };
            match received {
                Ok((n, client)) => self.answer_udp(&sock, buf[..n].to_vec(), client),
                Err(e) => tracing::warn!(error = %e, "UDP receive failed"),
            }
        }
        // Queries the kernel queued before the stop were sent to us: answer them too
        // (bounded: a flood must not keep a stopping listener reading).
        for _ in 0..DRAIN_QUEUED {
            let Ok((n, client)) = sock.try_recv_from(&mut buf) else {
                break;
            };
            self.answer_udp(&sock, buf[..n].to_vec(), client);
        }
    }

    /// Answers one datagram on its own task: a slow upstream must not hold up local
    /// answers.
    fn answer_udp(&self, sock: &Arc<UdpSocket>, query: Vec<u8>, client: SocketAddr) {
        let (sock, handler, ctx) = (
            Arc::clone(sock),
            Arc::clone(&self.shared.handler),
            self.ctx.load_full(),
        );
        self.in_flight.spawn(async move {
            if let Some(reply) = handler.handle(&query, Protocol::Udp, client, &ctx).await
                && let Err(e) = sock.send_to(&reply, client).await
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
