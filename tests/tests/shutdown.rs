//! Stopping under load: a SIGTERM during a query flood stops the listeners, answers
//! every query the daemon had received (table hits, and forwarded queries still
//! waiting on a slow upstream), and exits within 2 s.
use std::{
    net::UdpSocket,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use dnsproxy_e2e::{
    load::{Upstream, query},
    *,
};

/// Table hits per second: well within what a debug build answers on two cores, so
/// that nothing is lost to a full socket buffer before the signal.
const TABLE_RATE: u32 = 3000;
/// Forwarded queries per second, each for a new name (no cache hit).
const FORWARD_RATE: u32 = 500;
/// How long the slow upstream takes to answer: queries are in flight at the signal.
const UPSTREAM_DELAY: Duration = Duration::from_millis(300);
/// Where the slow upstream listens, inside the test netns.
const SLOW_UPSTREAM: &str = "127.0.0.1:5399";
/// How long the flood runs before the signal, and after it.
const BEFORE: Duration = Duration::from_millis(1500);
const AFTER: Duration = Duration::from_millis(700);

/// A table hit (IDs 0..32768) or a forwarded name (IDs from 32768), by sequence number.
fn table_query(n: u16) -> (u16, Vec<u8>) {
    let id = n % 32768;
    (id, query(id, "registry.test", false))
}

fn forwarded_query(n: u16) -> (u16, Vec<u8>) {
    let id = 32768 + n % 32768;
    (id, query(id, &format!("q{n}.slow.test"), false))
}

/// What the flood saw: when each ID was sent, and which IDs got a NOERROR answer.
struct Flood {
    sent: Vec<(u16, Instant)>,
    answered: Vec<bool>,
}

/// Sends `rate` queries a second on `sock` until `stop`, recording each send.
fn send_loop(
    sock: &UdpSocket,
    rate: u32,
    make: fn(u16) -> (u16, Vec<u8>),
    stop: &AtomicBool,
    flood: &Mutex<Flood>,
) {
    let burst = rate / 100;
    let mut n: u16 = 0;
    let start = Instant::now();
    let mut tick = 0u32;
    while !stop.load(Ordering::SeqCst) {
        for _ in 0..burst {
            let (id, q) = make(n);
            if sock.send(&q).is_ok() {
                flood.lock().unwrap().sent.push((id, Instant::now()));
            }
            n = n.wrapping_add(1);
        }
        tick += 1;
        let next = start + Duration::from_millis(10) * tick;
        thread::sleep(next.saturating_duration_since(Instant::now()));
    }
}

/// Marks every response with NOERROR and at least one answer record.
fn receive_loop(sock: &UdpSocket, stop: &AtomicBool, flood: &Mutex<Flood>) {
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::SeqCst) {
        let Ok(n) = sock.recv(&mut buf) else {
            continue;
        };
        let (response, rcode) = (buf[2] & 0x80 != 0, buf[3] & 0x0f);
        let answers = u16::from_be_bytes([buf[6], buf[7]]);
        if n > 12 && response && rcode == 0 && answers > 0 {
            let id = u16::from_be_bytes([buf[0], buf[1]]);
            flood.lock().unwrap().answered[usize::from(id)] = true;
        }
    }
}

fn spawn<T: Send + Sync + 'static>(
    state: &Arc<T>,
    f: impl FnOnce(&T) + Send + 'static,
) -> thread::JoinHandle<()> {
    let state = Arc::clone(state);
    thread::spawn(move || f(&state))
}

#[test]
fn sigterm_during_a_query_flood_answers_what_was_received_and_exits_within_2s() {
    if !privileged() {
        return;
    }
    let env = TestEnv::new();
    let _upstream = Upstream::start(&env.netns, SLOW_UPSTREAM.parse().unwrap(), UPSTREAM_DELAY);
    let mut opts = env.daemon_options();
    // Per-query debug lines would turn the flood into a logging benchmark.
    opts.env.push(("RUST_LOG".into(), "info".into()));
    // ~150 forwarded queries are in flight at any time: above the default per-client
    // bound, which is not what this test is about.
    opts.extra_args.extend([
        "--upstream".into(),
        SLOW_UPSTREAM.into(),
        "--max-inflight-per-client".into(),
        "1024".into(),
    ]);
    let mut daemon = Daemon::start(opts);

    let client = || {
        env.netns.within(|| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.connect("127.0.0.1:15053").unwrap();
            s
        })
    };
    let (table_sock, forward_sock) = (Arc::new(client()), Arc::new(client()));
    let flood = Arc::new(Mutex::new(Flood {
        sent: Vec::new(),
        answered: vec![false; 65536],
    }));
    let stop_sending = Arc::new(AtomicBool::new(false));
    let stop_receiving = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for (sock, rate, make) in [
        (&table_sock, TABLE_RATE, table_query as fn(u16) -> _),
        (&forward_sock, FORWARD_RATE, forwarded_query),
    ] {
        let (stop, seen) = (Arc::clone(&stop_sending), Arc::clone(&flood));
        threads.push(spawn(sock, move |s| send_loop(s, rate, make, &stop, &seen)));
        let (stop, seen) = (Arc::clone(&stop_receiving), Arc::clone(&flood));
        threads.push(spawn(sock, move |s| receive_loop(s, &stop, &seen)));
    }

    thread::sleep(BEFORE);
    let signalled = daemon.terminate();
    let status = daemon.wait_exit(Duration::from_secs(10));
    let exit_after = signalled.elapsed();
    thread::sleep(AFTER.saturating_sub(exit_after));
    stop_sending.store(true, Ordering::SeqCst);
    // Late answers to early queries still count: give the sockets a moment.
    thread::sleep(Duration::from_millis(300));
    stop_receiving.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }

    let flood = flood.lock().unwrap();
    let before: Vec<u16> = flood
        .sent
        .iter()
        .filter(|(_, at)| *at < signalled)
        .map(|(id, _)| *id)
        .collect();
    let unanswered: Vec<u16> = before
        .iter()
        .copied()
        .filter(|id| !flood.answered[usize::from(*id)])
        .collect();
    let forwarded = before.iter().filter(|id| **id >= 32768).count();
    println!(
        "flood: {} queries sent before SIGTERM ({forwarded} forwarded to a {UPSTREAM_DELAY:?} upstream), \
         {} answered, {} unanswered; {} sent after; exit {exit_after:?} after the signal ({status})",
        before.len(),
        before.len() - unanswered.len(),
        unanswered.len(),
        flood.sent.len() - before.len(),
    );
    assert!(
        forwarded as u32 >= FORWARD_RATE && before.len() as u32 >= TABLE_RATE,
        "the flood did not get going: {} queries before the signal",
        before.len()
    );
    assert!(
        status.success(),
        "exit status {status}:\n{}",
        daemon.log_text()
    );
    assert!(
        exit_after < Duration::from_secs(2),
        "took {exit_after:?} to exit:\n{}",
        daemon.log_text()
    );
    assert!(
        unanswered.is_empty(),
        "{} queries received before SIGTERM were not answered (first IDs {:?})",
        unanswered.len(),
        &unanswered[..unanswered.len().min(10)]
    );
}
