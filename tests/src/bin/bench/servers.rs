//! The servers the bench compares, each a child process inside the bench's netns: the
//! floor (this binary's `floor` mode), dnsmasq and unbound, all answering [`NAMES`]
//! table names with one A record each.
use std::{
    fmt::Write as _,
    net::{SocketAddr, UdpSocket},
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use dnsproxy_e2e::Netns;

/// How many distinct names the load asks for.
pub(crate) const NAMES: usize = 100;

/// The `i`th name the table, dnsmasq and unbound answer.
pub(crate) fn table_name(i: usize) -> String {
    format!("n{i}.bench.example")
}

/// The `i`th name only an upstream answers (cache and forwarding rows).
pub(crate) fn forwarded_name(i: usize) -> String {
    format!("f{i}.forward.example")
}

/// The address dnsmasq and unbound give the `i`th name.
fn address(i: usize) -> String {
    format!("240.241.{}.{}", i / 250, i % 250 + 1)
}

/// A server process, killed on drop.
pub(crate) struct Server {
    pub(crate) name: &'static str,
    pub(crate) addr: SocketAddr,
    child: Child,
}

impl Server {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    fn spawn(name: &'static str, addr: SocketAddr, mut cmd: Command) -> Self {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Server { name, addr, child }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The floor: this binary in `floor` mode, the simplest recv/send loop.
pub(crate) fn floor(netns: &Netns, addr: SocketAddr) -> Server {
    let mut cmd = netns.command(std::env::current_exe().expect("own path"));
    cmd.arg("floor").arg(addr.to_string());
    Server::spawn("floor responder", addr, cmd)
}

/// `floor` mode: answers every query with its question and one A record, as fast as a
/// single-threaded blocking loop can.
pub(crate) fn serve_floor(addr: &str) -> ! {
    let sock = UdpSocket::bind(addr).expect("bind the floor responder");
    let mut buf = [0u8; 1500];
    loop {
        let Ok((n, client)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let Some(qend) = buf[12..n].iter().position(|b| *b == 0).map(|p| 12 + p + 5) else {
            continue;
        };
        if qend > n {
            continue;
        }
        buf[2] |= 0x80;
        buf[3] = 0x80;
        buf[6..12].copy_from_slice(&[0, 1, 0, 0, 0, 0]);
        let record = [0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 240, 241, 0, 1];
        buf[qend..qend + record.len()].copy_from_slice(&record);
        let _ = sock.send_to(&buf[..qend + record.len()], client);
    }
}

/// dnsmasq answering the table names and the forwarded names from a hosts file (it is
/// also the upstream of the forwarding rows).
pub(crate) fn dnsmasq(netns: &Netns, dir: &Path, addr: SocketAddr) -> Server {
    let hosts = dir.join("dnsmasq.hosts");
    let mut text = String::new();
    for i in 0..NAMES {
        let _ = writeln!(text, "{} {}", address(i), table_name(i));
        let _ = writeln!(text, "{} {}", address(i), forwarded_name(i));
    }
    std::fs::write(&hosts, text).unwrap();
    let mut cmd = netns.command("dnsmasq");
    cmd.args([
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--pid-file=",
        "--user=root",
        "--listen-address=127.0.0.1",
        // Answers from the hosts file carry a TTL, so the daemon may cache them.
        "--local-ttl=300",
    ])
    .arg(format!("--port={}", addr.port()))
    .arg(format!("--addn-hosts={}", hosts.display()));
    Server::spawn("dnsmasq", addr, cmd)
}

/// unbound (one thread) answering the table names from `local-data`.
pub(crate) fn unbound(netns: &Netns, dir: &Path, addr: SocketAddr) -> Server {
    let conf = dir.join("unbound.conf");
    let mut text = format!(
        "server:\n  interface: {}@{}\n  port: {}\n  num-threads: 1\n  do-daemonize: no\n  \
         chroot: \"\"\n  username: \"\"\n  directory: \"{}\"\n  pidfile: \"\"\n  use-syslog: no\n  \
         logfile: \"\"\n  verbosity: 0\n  do-ip6: no\n  access-control: 127.0.0.0/8 allow\n  \
         local-zone: \"bench.example.\" static\n",
        addr.ip(),
        addr.port(),
        addr.port(),
        dir.display()
    );
    for i in 0..NAMES {
        let _ = writeln!(
            text,
            "  local-data: \"{}. 30 IN A {}\"",
            table_name(i),
            address(i)
        );
    }
    text += "remote-control:\n  control-enable: no\n";
    std::fs::write(&conf, text).unwrap();
    let mut cmd = netns.command("unbound");
    cmd.arg("-d").arg("-c").arg(&conf);
    Server::spawn("unbound", addr, cmd)
}

/// Waits until `addr` answers a query for `name` (servers take a moment to bind).
pub(crate) fn wait_answering(netns: &Netns, addr: SocketAddr, name: &str) {
    let query = dnsproxy_e2e::load::query(7, name, false);
    let answered = netns.within(move || {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 1500];
        while Instant::now() < deadline {
            let _ = sock.send_to(&query, addr);
            if sock.recv_from(&mut buf).is_ok() {
                return true;
            }
            thread::sleep(Duration::from_millis(50));
        }
        false
    });
    assert!(answered, "{addr} does not answer {name}");
}
