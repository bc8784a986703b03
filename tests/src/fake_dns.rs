//! A fake cluster DNS server inside a test netns (10.96.0.10:53 and [fd00::10]:53, UDP
//! and TCP). It answers every A question with `FAKE_A` and every AAAA with `FAKE_AAAA`,
//! so a test can tell its answers from dnsproxy's, and counts the queries it got.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, UdpSocket},
    sync::atomic::Ordering,
    thread,
    time::Duration,
};

use crate::{FAKE_A, FAKE_AAAA, Netns, Signal, bind_in};

pub struct FakeDns {
    signal: Signal,
    threads: Vec<thread::JoinHandle<()>>,
}

impl FakeDns {
    pub fn start(netns: &Netns) -> Self {
        let signal = Signal::default();
        let mut threads = Vec::new();
        for addr in ["10.96.0.10:53", "[fd00::10]:53"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let (udp, tcp) = bind_in(netns, addr);
            let s = signal.clone();
            threads.push(thread::spawn(move || serve_udp(udp, s)));
            let s = signal.clone();
            threads.push(thread::spawn(move || serve_tcp(tcp, s)));
        }
        FakeDns { signal, threads }
    }

    /// Queries answered so far.
    pub fn queries(&self) -> usize {
        self.signal.count.load(Ordering::SeqCst)
    }
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        self.signal.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve_udp(sock: UdpSocket, signal: Signal) {
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 4096];
    while !signal.stop.load(Ordering::SeqCst) {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        if let Some(reply) = answer(&buf[..n]) {
            signal.count.fetch_add(1, Ordering::SeqCst);
            let _ = sock.send_to(&reply, from);
        }
    }
}

fn serve_tcp(listener: TcpListener, signal: Signal) {
    listener.set_nonblocking(true).unwrap();
    while !signal.stop.load(Ordering::SeqCst) {
        let Ok((mut stream, _)) = listener.accept() else {
            thread::sleep(Duration::from_millis(20));
            continue;
        };
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut len = [0u8; 2];
        if stream.read_exact(&mut len).is_err() {
            continue;
        }
        let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if stream.read_exact(&mut q).is_err() {
            continue;
        }
        if let Some(reply) = answer(&q) {
            signal.count.fetch_add(1, Ordering::SeqCst);
            let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&reply);
            let _ = stream.write_all(&framed);
        }
    }
}

/// Builds the reply to a one-question query: header, the question as sent, and one
/// A/AAAA record (none for other types).
pub fn answer(q: &[u8]) -> Option<Vec<u8>> {
    if q.len() < 12 || q[2] & 0x80 != 0 {
        return None;
    }
    let mut i = 12;
    while i < q.len() && q[i] != 0 {
        i += 1 + usize::from(q[i]);
    }
    let question_end = i + 5;
    if question_end > q.len() {
        return None;
    }
    let qtype = u16::from_be_bytes([q[i + 1], q[i + 2]]);
    let rdata: Vec<u8> = match qtype {
        1 => FAKE_A
            .parse::<std::net::Ipv4Addr>()
            .unwrap()
            .octets()
            .to_vec(),
        28 => FAKE_AAAA
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets()
            .to_vec(),
        _ => Vec::new(),
    };
    let mut r = Vec::with_capacity(question_end + 32);
    r.extend_from_slice(&q[..2]);
    r.push(0x80 | (q[2] & 0x01)); // QR, RD copied, not authoritative
    r.push(0x80); // RA
    r.extend_from_slice(&[0, 1, 0, u8::from(!rdata.is_empty()), 0, 0, 0, 0]);
    r.extend_from_slice(&q[12..question_end]);
    if !rdata.is_empty() {
        r.extend_from_slice(&[0xc0, 0x0c]);
        r.extend_from_slice(&qtype.to_be_bytes());
        r.extend_from_slice(&[0, 1, 0, 0, 0, 60]);
        r.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        r.extend_from_slice(&rdata);
    }
    Some(r)
}
