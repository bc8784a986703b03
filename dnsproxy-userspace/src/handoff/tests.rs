use std::{
    net::{TcpListener, UdpSocket},
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

fn tcp_listener() -> OwnedFd {
    OwnedFd::from(TcpListener::bind("127.0.0.1:0").unwrap())
}

/// The pin directory of a state directory's tests (a plain directory: the lock is
/// checked to be that directory).
fn pins(dir: &Path) -> PathBuf {
    let pins = dir.join("pins");
    std::fs::create_dir_all(&pins).unwrap();
    pins
}

/// A node-mode inventory: the pin directory's lock, admin listeners (`admin`, real
/// TCP listeners unless a test forges them), one pod with one UDP socket in this
/// process's network namespace.
fn inventory_with(pin_dir: &Path, pod: &UdpSocket, admin: [OwnedFd; 2]) -> Inventory {
    let lock = OwnedFd::from(std::fs::File::open(pin_dir).unwrap());
    let inventory = Inventory::new(pin_dir.to_path_buf(), 15053, lock, admin, None);
    inventory.add_pod(
        "uid-1",
        PodSockets {
            netns: trust::own_netns().unwrap(),
            cookie: 7,
            sockets: Sockets {
                udp: vec![fd(pod)],
                tcp: Vec::new(),
            },
        },
    );
    inventory
}

/// A predecessor for pin directory `<dir>/pins` serving one successor on a thread;
/// joins with how it ended and whether its pod listeners stayed frozen.
fn predecessor(dir: &Path, pod: &UdpSocket) -> std::thread::JoinHandle<(Given, bool)> {
    predecessor_with(
        dir,
        inventory_with(&pins(dir), pod, [tcp_listener(), tcp_listener()]),
    )
}

fn predecessor_with(dir: &Path, inventory: Inventory) -> std::thread::JoinHandle<(Given, bool)> {
    let _ = std::fs::remove_file(dir.join(SOCKET_NAME));
    let listener = UnixListener::bind(dir.join(SOCKET_NAME)).unwrap();
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
    let Start::Taken(mut taken) = take(&dir, &pins(&dir), 15053, true) else {
        panic!("no handoff");
    };
    assert_eq!(taken.predecessor, std::process::id());
    assert!(taken.local.is_none() && taken.lock.is_some() && taken.admin.is_some());
    let handed = taken.pods.remove("uid-1").expect("the pod's sockets");
    assert_eq!(
        (handed.netns, handed.cookie),
        (trust::own_netns().unwrap(), 7)
    );
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
    assert!(fallback.to_string().contains("/pins"), "{fallback}");
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

#[test]
fn a_descriptor_that_is_not_what_its_description_says_is_refused() {
    let dir = state_dir("forged-fd");
    let pod = udp();
    // A UDP socket where the admin listener belongs.
    let forged = inventory_with(&pins(&dir), &pod, [fd(&udp()), tcp_listener()]);
    let giver = predecessor_with(&dir, forged);
    let Start::Fallback(fallback) = take(&dir, &pins(&dir), 15053, true) else {
        panic!("took a UDP socket for the admin listener");
    };
    assert_eq!(fallback.reason(), "failed");
    assert!(
        fallback
            .to_string()
            .contains("the admin listener: not a TCP socket"),
        "{fallback}"
    );
    assert_eq!(giver.join().unwrap().0, Given::Abandoned);

    // The lock of another directory than the one asked for.
    let other = dir.join("other-pins");
    std::fs::create_dir_all(&other).unwrap();
    let giver = predecessor_with(
        &dir,
        inventory_with(&other, &pod, [tcp_listener(), tcp_listener()]),
    );
    let Start::Fallback(fallback) = take(&dir, &other.with_file_name("pins"), 15053, true) else {
        panic!("took another directory's lock");
    };
    // The description names the other directory: refused as a mismatch before any
    // descriptor is used.
    assert_eq!(fallback.reason(), "mismatch");
    giver.join().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn counts_beyond_their_bounds_are_refused_before_anything_is_allocated() {
    let description = |udp: usize, pods: usize| Description {
        pid: 1,
        pin_dir: PathBuf::from("/p"),
        listen_port: 53,
        local: None,
        pods: (0..pods)
            .map(|i| PodDescription {
                uid: i.to_string(),
                netns: (0, 0),
                cookie: 0,
                sockets: Counts { udp, tcp: 1 },
            })
            .collect(),
    };
    assert_eq!(description(2, 3).descriptors().unwrap(), 3 + 3 * 3);
    // usize::MAX would wrap a sum; it is refused instead.
    let e = description(usize::MAX, 1).descriptors().unwrap_err();
    assert!(e.to_string().contains("more than 64 of a kind"), "{e}");
    let e = description(1, trust::MAX_PODS + 1)
        .descriptors()
        .unwrap_err();
    assert!(e.to_string().contains("pods described"), "{e}");
}

/// A process that is not this program: python, connecting or listening.
fn python(script: &str, socket: &Path) -> std::process::Child {
    std::process::Command::new("python3")
        .args(["-c", script])
        .arg(socket)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3")
}

#[test]
fn a_peer_running_another_program_is_refused_on_both_sides() {
    // As a predecessor: a forged successor says hello and gets nothing, and the pod
    // listeners are not frozen.
    let dir = state_dir("forged-peer");
    let pod = udp();
    let giver = predecessor(&dir, &pod);
    let client = python(
        "import socket,struct,sys\n\
         s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n\
         s.settimeout(5)\n\
         try: s.sendall(b'HELO'+struct.pack('>I',1)); n=len(s.recv(65536))\n\
         except (ConnectionResetError, BrokenPipeError): n=0\n\
         print(n)",
        &dir.join(SOCKET_NAME),
    );
    let (given, frozen) = giver.join().unwrap();
    let Given::Refused(refusal) = given else {
        panic!("a python successor was served: {given:?}");
    };
    assert_eq!(refusal.reason(), "executable", "{refusal}");
    assert!(refusal.to_string().contains("python"), "{refusal}");
    assert!(!frozen);
    let out = client.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "it got no byte"
    );

    // As a successor: a forged predecessor listening on the path gets no hello.
    std::fs::remove_file(dir.join(SOCKET_NAME)).unwrap();
    let mut server = python(
        "import socket,sys\n\
         s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1)\n\
         print('ready', flush=True)\n\
         c,_=s.accept(); c.settimeout(5)\n\
         print(len(c.recv(64)), flush=True)",
        &dir.join(SOCKET_NAME),
    );
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(server.stdout.take().unwrap()));
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    let Start::Fallback(fallback) = take(&dir, &pins(&dir), 15053, true) else {
        panic!("took sockets from a python");
    };
    assert_eq!(fallback.reason(), "untrusted", "{fallback}");
    assert!(fallback.to_string().contains("python"), "{fallback}");
    assert_eq!(lines.next().unwrap().unwrap(), "0", "it was sent nothing");
    server.wait().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
