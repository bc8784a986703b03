//! Small servers inside a test netns: a TCP banner and a UDP echo.
use std::{
    io::Write as _,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::Duration,
};

use crate::{Netns, bind_in};

/// Shared stop flag + counter, used by the fake servers.
#[derive(Clone, Default)]
pub struct Signal {
    pub stop: Arc<AtomicBool>,
    pub count: Arc<AtomicUsize>,
}

/// A TCP server at `addr` inside `netns` that writes `hello from <addr>` to every
/// connection and closes it; stops when dropped.
pub struct BannerServer {
    signal: Signal,
    thread: Option<thread::JoinHandle<()>>,
}

/// Accepts TCP connections at `addr` inside `netns` until `signal` stops, writing
/// `reply(connection, address)` to each in one write (the client may read a single
/// segment) and closing it.
fn serve_tcp(
    netns: &Netns,
    addr: &str,
    reply: fn(&std::net::TcpStream, SocketAddr) -> String,
) -> (Signal, thread::JoinHandle<()>) {
    let addr: SocketAddr = addr.parse().unwrap();
    let (_udp, tcp) = bind_in(netns, addr);
    tcp.set_nonblocking(true).unwrap();
    let signal = Signal::default();
    let s = signal.clone();
    let thread = thread::spawn(move || {
        while !s.stop.load(Ordering::SeqCst) {
            match tcp.accept() {
                Ok((mut stream, _)) => {
                    s.count.fetch_add(1, Ordering::SeqCst);
                    let _ = stream.write_all(reply(&stream, addr).as_bytes());
                }
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    (signal, thread)
}

impl BannerServer {
    pub fn start(netns: &Netns, addr: &str) -> Self {
        let (signal, thread) = serve_tcp(netns, addr, |stream, addr| {
            let peer = stream
                .peer_addr()
                .map_or_else(|e| e.to_string(), |p| p.to_string());
            format!("hello from {addr} to {peer}\n")
        });
        BannerServer {
            signal,
            thread: Some(thread),
        }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.signal.count.load(Ordering::SeqCst)
    }
}

impl Drop for BannerServer {
    fn drop(&mut self) {
        self.signal.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A sidecar proxy's outbound listener, as Envoy's on 15001 behind Istio's iptables
/// REDIRECT: at `addr` inside `netns`, it writes `envoy saw <original destination>` to
/// each connection, read with `SO_ORIGINAL_DST` as Envoy does.
pub struct EnvoyStub {
    signal: Signal,
    thread: Option<thread::JoinHandle<()>>,
}

impl EnvoyStub {
    pub fn start(netns: &Netns, addr: &str) -> Self {
        let (signal, thread) = serve_tcp(netns, addr, |stream, _| {
            let seen = original_dst(stream).map_or_else(
                |e| format!("no original destination: {e}"),
                |d| d.to_string(),
            );
            format!("envoy saw {seen}\n")
        });
        EnvoyStub {
            signal,
            thread: Some(thread),
        }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.signal.count.load(Ordering::SeqCst)
    }
}

impl Drop for EnvoyStub {
    fn drop(&mut self) {
        self.signal.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The address a connection that iptables redirected was sent to (`SO_ORIGINAL_DST`).
fn original_dst(stream: &std::net::TcpStream) -> std::io::Result<SocketAddr> {
    use std::os::fd::AsRawFd as _;
    const SO_ORIGINAL_DST: libc::c_int = 80;
    // SAFETY: an all-zero sockaddr_in is valid.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: valid fd; out-pointers of the right size.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            (&raw mut addr).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let ip = std::net::Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
    Ok(SocketAddr::new(ip.into(), u16::from_be(addr.sin_port)))
}

/// A UDP server at `addr` inside `netns` answering `echo from <addr>: <data>`.
pub struct UdpEcho {
    signal: Signal,
    thread: Option<thread::JoinHandle<()>>,
}

impl UdpEcho {
    pub fn start(netns: &Netns, addr: &str) -> Self {
        let addr: SocketAddr = addr.parse().unwrap();
        let (udp, _tcp) = bind_in(netns, addr);
        udp.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let signal = Signal::default();
        let s = signal.clone();
        let thread = thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.stop.load(Ordering::SeqCst) {
                if let Ok((n, from)) = udp.recv_from(&mut buf) {
                    let mut reply = format!("echo from {addr}: ").into_bytes();
                    reply.extend_from_slice(&buf[..n]);
                    let _ = udp.send_to(&reply, from);
                }
            }
        });
        UdpEcho {
            signal,
            thread: Some(thread),
        }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.signal.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
