//! Sockets of a local listener: UDP and TCP on 127.0.0.1 and ::1. UDP uses one
//! SO_REUSEPORT socket per core, so queries spread over cores without a shared lock.
//! Sockets are created synchronously ([`bind_std`]), so that node mode can create them
//! on a thread that entered a pod's network namespace, and so that "port in use" is
//! reported before the data path is attached.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use socket2::{Domain, Socket, Type};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
};

use super::{Protocol, handler::Handler, local::ClientContext};

/// How long a TCP client may stay idle between queries.
const TCP_IDLE: Duration = Duration::from_secs(10);

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
    #[error("cannot listen on {addr} ({protocol}): {source}")]
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

fn udp_reuseport(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    sock.set_reuse_port(true)?;
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

/// Binds UDP (one socket per core) and TCP on 127.0.0.1:`port` (required) and
/// [::1]:`port` (skipped, with a warning, when the netns has no IPv6 loopback), in the
/// calling thread's network namespace. The TCP listener does not share its port, so a
/// second daemon fails here.
pub fn bind_std(port: u16) -> Result<StdListeners, BindError> {
    let per_core = std::thread::available_parallelism().map_or(1, usize::from);
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
        for _ in 0..per_core {
            udp.push(udp_reuseport(addr).map_err(|e| bind_error(addr, Protocol::Udp, e))?);
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

    /// Serves until the task is dropped (dropping closes the sockets).
    pub async fn serve(self, handler: Arc<Handler>, ctx: SharedContext) {
        let mut tasks = tokio::task::JoinSet::new();
        for sock in self.udp {
            tasks.spawn(serve_udp(Arc::new(sock), handler.clone(), ctx.clone()));
        }
        for listener in self.tcp {
            tasks.spawn(serve_tcp(listener, handler.clone(), ctx.clone()));
        }
        while tasks.join_next().await.is_some() {}
    }
}

async fn serve_udp(sock: Arc<UdpSocket>, handler: Arc<Handler>, ctx: SharedContext) {
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, client) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "UDP receive failed");
                continue;
            }
        };
        let query = buf[..n].to_vec();
        let (sock, handler, ctx) = (sock.clone(), handler.clone(), ctx.load_full());
        // Each query on its own task: a slow upstream must not hold up local answers.
        tokio::spawn(async move {
            if let Some(reply) = handler.handle(&query, Protocol::Udp, client, &ctx).await
                && let Err(e) = sock.send_to(&reply, client).await
            {
                tracing::debug!(target: "dns", %client, error = %e, "UDP send failed");
            }
        });
    }
}

async fn serve_tcp(listener: TcpListener, handler: Arc<Handler>, ctx: SharedContext) {
    loop {
        match listener.accept().await {
            Ok((stream, client)) => {
                tokio::spawn(serve_tcp_client(
                    stream,
                    client,
                    handler.clone(),
                    ctx.clone(),
                ));
            }
            Err(e) => {
                tracing::warn!(error = %e, "TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_tcp_client(
    mut stream: TcpStream,
    client: SocketAddr,
    handler: Arc<Handler>,
    ctx: SharedContext,
) {
    loop {
        let mut len = [0u8; 2];
        if !matches!(
            tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if !matches!(
            tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let Some(reply) = handler
            .handle(&query, Protocol::Tcp, client, &ctx.load())
            .await
        else {
            continue;
        };
        let Ok(reply_len) = u16::try_from(reply.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&reply_len.to_be_bytes());
        framed.extend_from_slice(&reply);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}
