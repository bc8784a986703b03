//! Sockets of the local listener: UDP and TCP on 127.0.0.1 and ::1. Binding is separate
//! from serving so that "port in use" is reported before the data path is attached.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
};

use super::{Protocol, handler::Handler};

/// How long a TCP client may stay idle between queries.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// Errors binding the listener.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The port is taken.
    #[error("{addr} ({protocol}) is already in use: is another DNS proxy running? choose another --listen-port")]
    InUse { addr: SocketAddr, protocol: Protocol },
    /// Any other bind failure.
    #[error("cannot listen on {addr} ({protocol}): {source}")]
    Other {
        addr: SocketAddr,
        protocol: Protocol,
        source: std::io::Error,
    },
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
        BindError::Other { addr, protocol, source }
    }
}

impl Listeners {
    /// Binds UDP+TCP on 127.0.0.1:`port` (required) and [::1]:`port` (skipped, with a
    /// warning, when the network namespace has no IPv6 loopback).
    pub async fn bind(port: u16) -> Result<Self, BindError> {
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        for ip in [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)] {
            let addr = SocketAddr::new(ip, port);
            let u = UdpSocket::bind(addr).await;
            let t = TcpListener::bind(addr).await;
            match (u, t) {
                (Ok(u), Ok(t)) => {
                    udp.push(u);
                    tcp.push(t);
                }
                (Err(e), _) if ip.is_ipv6() && e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                    tracing::warn!(%addr, "no IPv6 loopback here: serving IPv4 only");
                }
                (Err(e), _) => return Err(bind_error(addr, Protocol::Udp, e)),
                (_, Err(e)) => return Err(bind_error(addr, Protocol::Tcp, e)),
            }
        }
        Ok(Self { udp, tcp })
    }

    /// Addresses actually bound, for the start-up log.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.udp.iter().filter_map(|s| s.local_addr().ok()).collect()
    }

    /// Serves until the task is dropped.
    pub async fn serve(self, handler: Arc<Handler>) {
        let mut tasks = tokio::task::JoinSet::new();
        for sock in self.udp {
            tasks.spawn(serve_udp(Arc::new(sock), handler.clone()));
        }
        for listener in self.tcp {
            tasks.spawn(serve_tcp(listener, handler.clone()));
        }
        while tasks.join_next().await.is_some() {}
    }
}

async fn serve_udp(sock: Arc<UdpSocket>, handler: Arc<Handler>) {
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
        let sock = sock.clone();
        let handler = handler.clone();
        // Each query on its own task: a slow upstream must not hold up local answers.
        tokio::spawn(async move {
            if let Some(reply) = handler.handle(&query, Protocol::Udp, client).await
                && let Err(e) = sock.send_to(&reply, client).await
            {
                tracing::debug!(target: "dns", %client, error = %e, "UDP send failed");
            }
        });
    }
}

async fn serve_tcp(listener: TcpListener, handler: Arc<Handler>) {
    loop {
        match listener.accept().await {
            Ok((stream, client)) => {
                tokio::spawn(serve_tcp_client(stream, client, handler.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_tcp_client(mut stream: TcpStream, client: SocketAddr, handler: Arc<Handler>) {
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let Some(reply) = handler.handle(&query, Protocol::Tcp, client).await else {
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
