use std::{
    net::UdpSocket,
    os::{fd::OwnedFd, unix::net::UnixListener},
    time::Duration,
};

use super::*;

fn state_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("handoff-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn udp() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").unwrap()
}

fn fd(sock: &UdpSocket) -> OwnedFd {
    OwnedFd::from(sock.try_clone().unwrap())
}

/// A node-mode inventory: the "lock" and admin descriptors are sockets too (any
/// descriptor crosses), one pod with one UDP socket.
fn inventory(pin_dir: &Path, pod: &UdpSocket) -> Inventory {
    let (lock, a, b) = (udp(), udp(), udp());
    let inventory = Inventory::new(
        pin_dir.to_path_buf(),
        15053,
        fd(&lock),
        [fd(&a), fd(&b)],
        None,
    );
    inventory.add_pod(
        "uid-1",
        PodSockets {
            netns: (4, 4_026_531_840),
            cookie: 7,
            sockets: Sockets {
                udp: vec![fd(pod)],
                tcp: Vec::new(),
            },
        },
    );
    inventory
}

/// A predecessor for pin directory /sys/fs/bpf/x serving one successor on a thread;
/// joins with how it ended and whether its pod listeners stayed frozen.
fn predecessor(dir: &Path, pod: &UdpSocket) -> std::thread::JoinHandle<(Given, bool)> {
    let listener = UnixListener::bind(dir.join(SOCKET_NAME)).unwrap();
    let inventory = inventory(Path::new("/sys/fs/bpf/x"), pod);
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let given = give(&mut stream, &inventory, Duration::from_secs(5)).unwrap();
        (given, inventory.frozen())
    })
}

#[test]
fn a_successor_gets_every_socket_with_its_pod_and_the_predecessor_stops_after_stop() {
    let dir = state_dir("ok");
    let pod = udp();
    let giver = predecessor(&dir, &pod);
    let Start::Taken(mut taken) = take(&dir, Path::new("/sys/fs/bpf/x"), 15053, true) else {
        panic!("no handoff");
    };
    assert_eq!(taken.predecessor, std::process::id());
    assert!(taken.local.is_none() && taken.lock.is_some() && taken.admin.is_some());
    let handed = taken.pods.remove("uid-1").expect("the pod's sockets");
    assert_eq!((handed.netns, handed.cookie), ((4, 4_026_531_840), 7));
    // The same socket: what is sent to the pod's address arrives on the handed copy.
    let handed = UdpSocket::from(handed.sockets.udp.into_iter().next().unwrap());
    assert_eq!(handed.local_addr().unwrap(), pod.local_addr().unwrap());
    udp().send_to(b"q", pod.local_addr().unwrap()).unwrap();
    handed
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(handed.recv(&mut buf).unwrap(), 1);
    taken.finish().unwrap();
    let (given, frozen) = giver.join().unwrap();
    assert_eq!(
        given,
        Given::TakenOver {
            successor: std::process::id()
        }
    );
    assert!(frozen, "pod listeners stay frozen once handed over");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_successor_for_another_pin_directory_is_refused_and_the_predecessor_carries_on() {
    let dir = state_dir("mismatch");
    let pod = udp();
    let giver = predecessor(&dir, &pod);
    let Start::Fallback(fallback) = take(&dir, Path::new("/sys/fs/bpf/y"), 15053, true) else {
        panic!("took another daemon's sockets");
    };
    assert_eq!(fallback.reason(), "mismatch");
    assert!(fallback.to_string().contains("/sys/fs/bpf/x"), "{fallback}");
    let (given, frozen) = giver.join().unwrap();
    assert_eq!(given, Given::Abandoned);
    assert!(!frozen, "an abandoned handoff unfreezes the pod listeners");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn no_socket_is_a_fresh_start_and_a_dead_one_a_crash() {
    let dir = state_dir("dead");
    let pin = Path::new("/sys/fs/bpf/x");
    assert!(matches!(take(&dir, pin, 15053, false), Start::Fresh));
    // A listener that is gone leaves its path behind, as a SIGKILL does.
    drop(UnixListener::bind(dir.join(SOCKET_NAME)).unwrap());
    let Start::Fallback(fallback) = take(&dir, pin, 15053, false) else {
        panic!("a dead socket answered");
    };
    assert_eq!(fallback, Fallback::Crashed);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_predecessor_that_does_not_answer_is_a_timeout() {
    let dir = state_dir("hung");
    // Listening, never accepting: a stopped or hung process.
    let _listener = UnixListener::bind(dir.join(SOCKET_NAME)).unwrap();
    let started = std::time::Instant::now();
    let Start::Fallback(fallback) = take(&dir, Path::new("/sys/fs/bpf/x"), 15053, false) else {
        panic!("a hung daemon answered");
    };
    assert_eq!(
        fallback,
        Fallback::Timeout {
            pid: Some(std::process::id())
        },
        "the listener's owner is named"
    );
    assert!(started.elapsed() < STEP_TIMEOUT * 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_socket_path_is_left_to_a_successor_that_replaced_it() {
    let dir = state_dir("path");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let first = Giver::bind(&dir).unwrap();
        let second = Giver::bind(&dir).unwrap();
        first.remove();
        assert!(
            dir.join(SOCKET_NAME).exists(),
            "the successor's socket stays"
        );
        second.remove();
        assert!(!dir.join(SOCKET_NAME).exists());
    });
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn only_a_dnsproxy_is_killed_and_the_kill_returns_once_it_is_gone() {
    let dir = state_dir("kill");
    let sleep = which_sleep();
    let mut other = std::process::Command::new(&sleep)
        .arg("30")
        .spawn()
        .unwrap();
    assert!(!kill_unresponsive(other.id()), "a process of another name");
    assert!(other.try_wait().unwrap().is_none(), "left alone");
    other.kill().unwrap();
    other.wait().unwrap();

    let named = dir.join("dnsproxy");
    std::fs::copy(&sleep, &named).unwrap();
    let mut daemon = std::process::Command::new(&named)
        .arg("30")
        .spawn()
        .unwrap();
    // spawn may return before exec has renamed the child (a vfork parent resumes first).
    let comm = format!("/proc/{}/comm", daemon.id());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(&comm).unwrap_or_default().trim() != "dnsproxy" {
        assert!(
            std::time::Instant::now() < deadline,
            "the child never became dnsproxy"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(kill_unresponsive(daemon.id()));
    // Gone already when the call returns: waiting does not block.
    let status = daemon.try_wait().unwrap().expect("exited");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn which_sleep() -> PathBuf {
    ["/usr/bin/sleep", "/bin/sleep"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("sleep(1)")
}
