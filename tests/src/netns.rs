//! A network namespace per test, and sockets bound inside it.
use std::{
    fs::File,
    net::{SocketAddr, TcpListener, UdpSocket},
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::Command,
    thread,
};

use crate::{must, unique_name};

// === impl Netns ===

/// A network namespace with `lo` up and the fake cluster DNS addresses on it.
pub struct Netns {
    pub name: String,
    pub path: PathBuf,
}

impl Netns {
    pub fn new() -> Self {
        let name = unique_name("n");
        must(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns {
            path: PathBuf::from(format!("/run/netns/{name}")),
            name,
        };
        must(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
        must(Command::new("ip").args([
            "-n",
            &ns.name,
            "addr",
            "add",
            "10.96.0.10/32",
            "dev",
            "lo",
        ]));
        // A second "cluster DNS" address, for upstream failover tests.
        must(Command::new("ip").args([
            "-n",
            &ns.name,
            "addr",
            "add",
            "10.96.0.11/32",
            "dev",
            "lo",
        ]));
        must(Command::new("ip").args([
            "-n",
            &ns.name,
            "-6",
            "addr",
            "add",
            "fd00::10/128",
            "dev",
            "lo",
            "nodad",
        ]));
        ns
    }

    /// Puts `cidr` (e.g. `203.0.113.10/32`, `2001:db8::10/128`) on this netns's `lo`.
    pub fn add_addr(&self, cidr: &str) {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", &self.name, "addr", "add", cidr, "dev", "lo"]);
        if cidr.contains(':') {
            cmd.arg("nodad");
        }
        must(&mut cmd);
    }

    /// Links this netns with `other` by a veth pair, `ours` and `theirs` (CIDRs such
    /// as `10.201.0.1/30`) on each end: two test hosts, nothing outside them.
    pub fn link(&self, other: &Netns, ours: &str, theirs: &str) {
        let (a, b) = (unique_name("va"), unique_name("vb"));
        must(Command::new("ip").args([
            "-n",
            &self.name,
            "link",
            "add",
            &a,
            "type",
            "veth",
            "peer",
            "name",
            &b,
            "netns",
            &other.name,
        ]));
        for (ns, dev, cidr) in [(&self.name, &a, ours), (&other.name, &b, theirs)] {
            must(Command::new("ip").args(["-n", ns, "addr", "add", cidr, "dev", dev]));
            must(Command::new("ip").args(["-n", ns, "link", "set", dev, "up"]));
        }
    }

    /// `program` run inside this netns (`nsenter --net`, which keeps /sys mounts intact).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path.display()))
            .arg(program);
        cmd
    }

    /// Runs `f` on a thread that has entered this netns: sockets it creates live here.
    pub fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file = File::open(&self.path).expect("open netns");
        thread::spawn(move || {
            // SAFETY: setns on a valid netns fd; affects only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread panicked")
    }
}

impl Default for Netns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Binds a UDP socket and a TCP listener at `addr` inside `netns`.
pub fn bind_in(netns: &Netns, addr: SocketAddr) -> (UdpSocket, TcpListener) {
    netns.within(move || {
        let u = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
        let t = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind tcp {addr}: {e}"));
        (u, t)
    })
}
