//! Load for the fault-injection tests: paced UDP query floods (bounded in count and
//! time), latency sampling, and the daemon's descriptors and memory read from /proc.
use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use crate::Netns;

/// A DNS query for `name` (A, RD set), with ID `id` and EDNS (4096) when `edns`.
pub fn query(id: u16, name: &str, edns: bool) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns)]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    if edns {
        q.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
    }
    q
}

/// The response code of a reply.
pub fn rcode(reply: &[u8]) -> u8 {
    reply.get(3).map_or(0xff, |b| b & 0x0f)
}

/// A UDP socket inside `netns`, connected to `to`.
pub fn udp_client(netns: &Netns, to: SocketAddr) -> UdpSocket {
    netns.within(move || {
        let s = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).unwrap();
        s.connect(to).unwrap();
        s
    })
}

/// A flood running on its own threads: `rate` queries a second from `make(n)` for at
/// most `limit`, until stopped or dropped.
pub struct Flood {
    stop: Arc<AtomicBool>,
    /// Returns how many it sent and for how long: the rate is over that time, not
    /// until `stop`, which may come later than `limit`.
    sender: Option<thread::JoinHandle<(u64, Duration)>>,
    reader: Option<thread::JoinHandle<()>>,
}

impl Flood {
    pub fn start(
        sock: UdpSocket,
        rate: u32,
        limit: Duration,
        make: impl Fn(u64) -> Vec<u8> + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sock = Arc::new(sock);
        let sender = {
            let (stop, sock) = (Arc::clone(&stop), Arc::clone(&sock));
            thread::spawn(move || {
                let started = Instant::now();
                let per_ms = f64::from(rate) / 1000.0;
                let mut sent = 0;
                while !stop.load(Ordering::Relaxed) && started.elapsed() < limit {
                    let due = (started.elapsed().as_secs_f64() * 1000.0 * per_ms) as u64;
                    while sent < due {
                        let _ = sock.send(&make(sent));
                        sent += 1;
                    }
                    thread::sleep(Duration::from_micros(500));
                }
                (sent, started.elapsed())
            })
        };
        // Replies are read and dropped, so the socket never fills.
        let reader = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                sock.set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let _ = sock.recv(&mut buf);
                }
            })
        };
        Flood {
            stop,
            sender: Some(sender),
            reader: Some(reader),
        }
    }

    /// Stops; returns (queries sent, achieved rate per second while sending).
    pub fn stop(mut self) -> (u64, f64) {
        self.stop.store(true, Ordering::SeqCst);
        let sender = self.sender.take().expect("joined only here or on drop");
        let (sent, ran_for) = sender.join().expect("the flood's sender panicked");
        (sent, sent as f64 / ran_for.as_secs_f64().max(1e-6))
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.sender.take() {
            let _ = t.join();
        }
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
    }
}

/// Asks `make(i)` one at a time (each with `timeout`), `count` times, `gap` apart;
/// returns the latencies of the answers whose response code `ok` accepts.
pub fn probe(
    sock: &UdpSocket,
    count: u16,
    gap: Duration,
    timeout: Duration,
    make: impl Fn(u16) -> Vec<u8>,
    ok: impl Fn(&[u8]) -> bool,
) -> Vec<Duration> {
    sock.set_read_timeout(Some(timeout)).unwrap();
    let mut latencies = Vec::new();
    let mut buf = [0u8; 4096];
    for i in 0..count {
        let q = make(i);
        let started = Instant::now();
        sock.send(&q).unwrap();
        while let Ok(n) = sock.recv(&mut buf) {
            if buf[..2] == q[..2] {
                if ok(&buf[..n]) {
                    latencies.push(started.elapsed());
                }
                break;
            }
        }
        thread::sleep(gap);
    }
    latencies
}

/// The `p`-th percentile (0..=100) of `samples`.
pub fn percentile(samples: &[Duration], p: usize) -> Duration {
    let mut v = samples.to_vec();
    v.sort();
    v.get((v.len().saturating_sub(1)) * p / 100)
        .copied()
        .unwrap_or_default()
}

/// Open descriptors of process `pid`.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// Resident memory of process `pid`, in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// An upstream DNS server for fault injection, in a netns: answers every A question
/// with 192.0.2.53 (TTL 60) after `delay`, or nothing while it is black-holed. Stops
/// when dropped.
pub struct Upstream {
    pub black_hole: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Upstream {
    pub fn start(netns: &Netns, addr: SocketAddr, delay: Duration) -> Self {
        let sock = Arc::new(netns.within(move || UdpSocket::bind(addr).unwrap()));
        sock.set_read_timeout(Some(Duration::from_millis(5)))
            .unwrap();
        let (black_hole, stop) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let (hole, halt) = (Arc::clone(&black_hole), Arc::clone(&stop));
        let thread = thread::spawn(move || {
            let mut due: std::collections::VecDeque<(Instant, Vec<u8>, SocketAddr)> =
                std::collections::VecDeque::new();
            let mut buf = [0u8; 1500];
            while !halt.load(Ordering::SeqCst) {
                while due.front().is_some_and(|(at, _, _)| *at <= Instant::now()) {
                    let (_, reply, to) = due.pop_front().unwrap();
                    let _ = sock.send_to(&reply, to);
                }
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                if hole.load(Ordering::SeqCst) || n < 17 {
                    continue;
                }
                due.push_back((Instant::now() + delay, answer_a(&buf[..n]), from));
            }
        });
        Upstream {
            black_hole,
            stop,
            threads: vec![thread],
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The answer to `query`: its question, and A 192.0.2.53 (TTL 60).
fn answer_a(query: &[u8]) -> Vec<u8> {
    reply_with(query, &[0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 53])
}

/// A response to `query` (header and question, EDNS dropped) with one answer record
/// owned by the question name: `record` is its type, class, TTL, length and data.
pub fn reply_with(query: &[u8], record: &[u8]) -> Vec<u8> {
    let qend = 12 + query[12..].iter().position(|b| *b == 0).unwrap_or(0) + 5;
    let mut reply = query[..qend.min(query.len())].to_vec();
    reply[2] |= 0x80;
    reply[3] = 0x80;
    reply[6..8].copy_from_slice(&1u16.to_be_bytes());
    reply[8..12].fill(0);
    reply.extend_from_slice(&[0xc0, 0x0c]);
    reply.extend_from_slice(record);
    reply
}
