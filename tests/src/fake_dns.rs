//! A fake cluster DNS server inside a test netns (10.96.0.10:53 and [`fd00::10`]:53, UDP
//! and TCP). It answers every A question with `FAKE_A` and every AAAA with `FAKE_AAAA`,
//! so a test can tell its answers from dnsproxy's, unless a test set the records of a
//! name with [`FakeDns::set`]; it notes the questions it got.
use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, UdpSocket},
    sync::{Arc, Mutex, atomic::Ordering},
    thread,
    time::Duration,
};

use crate::{FAKE_A, FAKE_AAAA, Netns, Signal, bind_in};

/// What the fake says of one name.
#[derive(Clone)]
struct Entry {
    addrs: Vec<IpAddr>,
    ttl: u32,
    /// AAAA questions get SERVFAIL.
    aaaa_fails: bool,
    /// UDP answers are sent this late.
    delay: Duration,
    /// The name does not exist (NXDOMAIN).
    nxdomain: bool,
}

/// Name (lower case, no trailing dot; `*.domain` for every name below it) → what is
/// answered.
type Records = Arc<Mutex<HashMap<String, Entry>>>;

/// The questions received, `name type`.
type Asked = Arc<Mutex<Vec<String>>>;

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

pub struct FakeDns {
    signal: Signal,
    records: Records,
    asked: Asked,
    threads: Vec<thread::JoinHandle<()>>,
}

impl FakeDns {
    pub fn start(netns: &Netns) -> Self {
        let signal = Signal::default();
        let records = Records::default();
        let asked = Asked::default();
        let mut threads = Vec::new();
        for addr in ["10.96.0.10:53", "[fd00::10]:53"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let (udp, tcp) = bind_in(netns, addr);
            let (s, r, a) = (signal.clone(), Arc::clone(&records), Arc::clone(&asked));
            threads.push(thread::spawn(move || serve_udp(&udp, &s, &(r, a))));
            let (s, r, a) = (signal.clone(), Arc::clone(&records), Arc::clone(&asked));
            threads.push(thread::spawn(move || serve_tcp(&tcp, &s, &(r, a))));
        }
        FakeDns {
            signal,
            records,
            asked,
            threads,
        }
    }

    /// From now on, `name` resolves to `addrs` (A and AAAA by family; none = NODATA).
    pub fn set(&self, name: &str, addrs: &[&str], ttl: u32) {
        let addrs = addrs.iter().map(|a| a.parse().unwrap()).collect();
        let entry = Entry {
            addrs,
            ttl,
            aaaa_fails: false,
            delay: Duration::ZERO,
            nxdomain: false,
        };
        self.records.lock().unwrap().insert(key(name), entry);
    }

    /// From now on, every name below `domain` that was not [`FakeDns::set`] does not
    /// exist (NXDOMAIN), as the cluster DNS says of its own zone.
    pub fn nxdomain_below(&self, domain: &str) {
        let entry = Entry {
            addrs: Vec::new(),
            ttl: 60,
            aaaa_fails: false,
            delay: Duration::ZERO,
            nxdomain: true,
        };
        self.records
            .lock()
            .unwrap()
            .insert(format!("*.{}", key(domain)), entry);
    }

    /// The questions it got, as `name type` (`api.example.org A`), in order.
    pub fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }

    /// From now on, AAAA questions for `name` (set before) get SERVFAIL, or not.
    pub fn fail_aaaa(&self, name: &str, failing: bool) {
        if let Some(entry) = self.records.lock().unwrap().get_mut(&key(name)) {
            entry.aaaa_fails = failing;
        }
    }

    /// From now on, UDP answers for `name` (set before) are sent `delay` late.
    pub fn delay(&self, name: &str, delay: Duration) {
        if let Some(entry) = self.records.lock().unwrap().get_mut(&key(name)) {
            entry.delay = delay;
        }
    }

    /// Queries answered so far.
    pub fn queries(&self) -> usize {
        self.asked.lock().unwrap().len()
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

fn serve_udp(sock: &UdpSocket, signal: &Signal, records: &(Records, Asked)) {
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 4096];
    while !signal.stop.load(Ordering::SeqCst) {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        if let Some((reply, delay)) = answer(&buf[..n], records) {
            if delay.is_zero() {
                let _ = sock.send_to(&reply, from);
            } else if let Ok(late) = sock.try_clone() {
                thread::spawn(move || {
                    thread::sleep(delay);
                    let _ = late.send_to(&reply, from);
                });
            }
        }
    }
}

fn serve_tcp(listener: &TcpListener, signal: &Signal, records: &(Records, Asked)) {
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
        if let Some((reply, _)) = answer(&q, records) {
            let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&reply);
            let _ = stream.write_all(&framed);
        }
    }
}

/// Builds the reply to a one-question query: header, the question as sent, and the
/// A/AAAA records of the name (none for other types); with the delay to send it after.
/// The question is noted in `asked`.
fn answer(q: &[u8], (records, asked): &(Records, Asked)) -> Option<(Vec<u8>, Duration)> {
    if q.len() < 12 || q[2] & 0x80 != 0 {
        return None;
    }
    let mut i = 12;
    let mut labels = Vec::new();
    while i < q.len() && q[i] != 0 {
        let len = usize::from(q[i]);
        labels.push(String::from_utf8_lossy(q.get(i + 1..i + 1 + len)?).to_ascii_lowercase());
        i += 1 + len;
    }
    let question_end = i + 5;
    if question_end > q.len() {
        return None;
    }
    let name = labels.join(".");
    let qtype = u16::from_be_bytes([q[i + 1], q[i + 2]]);
    let qtype_name = match qtype {
        1 => "A".to_owned(),
        28 => "AAAA".to_owned(),
        other => other.to_string(),
    };
    asked.lock().unwrap().push(format!("{name} {qtype_name}"));
    let entry = {
        let records = records.lock().unwrap();
        records.get(&name).cloned().or_else(|| {
            let mut rest = name.as_str();
            while let Some((_, parent)) = rest.split_once('.') {
                if let Some(e) = records.get(&format!("*.{parent}")) {
                    return Some(e.clone());
                }
                rest = parent;
            }
            None
        })
    };
    let Entry {
        addrs,
        ttl,
        aaaa_fails,
        delay,
        nxdomain,
    } = entry.unwrap_or_else(|| Entry {
        addrs: vec![FAKE_A.parse().unwrap(), FAKE_AAAA.parse().unwrap()],
        ttl: 60,
        aaaa_fails: false,
        delay: Duration::ZERO,
        nxdomain: false,
    });
    if aaaa_fails && qtype == 28 {
        let mut r = q[..question_end].to_vec();
        r[2] = 0x80 | (q[2] & 0x01);
        r[3] = 0x82; // RA, SERVFAIL
        r[6..12].fill(0);
        return Some((r, delay));
    }
    let rdatas: Vec<Vec<u8>> = addrs
        .iter()
        .filter_map(|ip| match (qtype, ip) {
            (1, IpAddr::V4(v4)) => Some(v4.octets().to_vec()),
            (28, IpAddr::V6(v6)) => Some(v6.octets().to_vec()),
            _ => None,
        })
        .collect();
    let mut r = Vec::with_capacity(question_end + 32 * rdatas.len());
    r.extend_from_slice(&q[..2]);
    r.push(0x80 | (q[2] & 0x01)); // QR, RD copied, not authoritative
    r.push(if nxdomain { 0x83 } else { 0x80 }); // RA, NXDOMAIN or NOERROR
    r.extend_from_slice(&[0, 1]);
    r.extend_from_slice(&(rdatas.len() as u16).to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]);
    r.extend_from_slice(&q[12..question_end]);
    for rdata in rdatas {
        r.extend_from_slice(&[0xc0, 0x0c]);
        r.extend_from_slice(&qtype.to_be_bytes());
        r.extend_from_slice(&[0, 1]);
        r.extend_from_slice(&ttl.to_be_bytes());
        r.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        r.extend_from_slice(&rdata);
    }
    Some((r, delay))
}
