//! Who may take part in a handoff, and what may be handed over.
//!
//! The socket sits in a private state directory, but a pod with a hostPath over it, or
//! any process of the node's root, could still connect. Both ends therefore check the
//! other with `SO_PEERCRED`: the daemon's own uid, and the same executable path as the
//! kernel names it (`/proc/<pid>/exe`, the same inside each image of a rollout), so a
//! shell, a python or another program can neither take the listeners, nor freeze the
//! daemon, nor feed it descriptors. What arrives is checked too: counts within bounds
//! before anything is allocated, and each descriptor of the kind and network namespace
//! its description claims.
use std::{
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    os::unix::net::UnixStream,
    path::Path,
};

/// Most pods a description may list (kubelet allows 110 by default, large nodes a few hundred).
pub const MAX_PODS: usize = 4096;
/// Most sockets of one kind one listener may have.
pub const MAX_SOCKETS: usize = 64;

/// Why a peer was not trusted (also the metric's label).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Its credentials could not be read.
    Unknown(String),
    /// Another user.
    Uid { pid: u32, uid: u32, ours: u32 },
    /// Another program.
    Executable { pid: u32, exe: String, ours: String },
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Unknown(_) => "credentials",
            Refusal::Uid { .. } => "uid",
            Refusal::Executable { .. } => "executable",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Unknown(why) => write!(f, "the peer's credentials are unknown: {why}"),
            Refusal::Uid { pid, uid, ours } => {
                write!(f, "the peer (pid {pid}) runs as uid {uid}, not {ours}")
            }
            Refusal::Executable { pid, exe, ours } => {
                write!(f, "the peer (pid {pid}) runs {exe}, not {ours}")
            }
        }
    }
}

/// The executable's path as the kernel names it, without the mark of a replaced file
/// (an upgrade in place keeps the path).
fn executable(pid: &str) -> std::io::Result<String> {
    let link = std::fs::read_link(format!("/proc/{pid}/exe"))?;
    let text = link.to_string_lossy();
    Ok(text.strip_suffix(" (deleted)").unwrap_or(&text).to_owned())
}

/// Checks the process at the other end of `stream`; its pid when trusted.
pub fn check_peer(stream: &UnixStream) -> Result<u32, Refusal> {
    let cred: libc::ucred = crate::sockopt::get(stream.as_raw_fd(), libc::SO_PEERCRED)
        .map_err(|e| Refusal::Unknown(e.to_string()))?;
    let Some(pid) = u32::try_from(cred.pid).ok().filter(|p| *p > 0) else {
        return Err(Refusal::Unknown("no pid".into()));
    };
    // SAFETY: geteuid cannot fail.
    let ours = unsafe { libc::geteuid() };
    if cred.uid != ours {
        return Err(Refusal::Uid {
            pid,
            uid: cred.uid,
            ours,
        });
    }
    let exe = executable(&pid.to_string())
        .map_err(|e| Refusal::Unknown(format!("/proc/{pid}/exe: {e}")))?;
    let own = executable("self").map_err(|e| Refusal::Unknown(format!("/proc/self/exe: {e}")))?;
    if exe != own {
        return Err(Refusal::Executable {
            pid,
            exe,
            ours: own,
        });
    }
    Ok(pid)
}

/// What a handed descriptor must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A listening TCP socket (admin, debug, a DNS listener's TCP).
    Tcp,
    /// A UDP socket.
    Udp,
}

/// A socket's network namespace, as (device, inode) of its nsfs file.
fn socket_netns(fd: BorrowedFd<'_>) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    // SAFETY: SIOCGSKNS returns a new descriptor of the socket's namespace, or -1.
    let ns = unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGSKNS) };
    if ns < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor we own from here on.
    let ns = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(ns) });
    let meta = ns.metadata()?;
    Ok((meta.dev(), meta.ino()))
}

fn sockopt(fd: BorrowedFd<'_>, name: libc::c_int) -> std::io::Result<libc::c_int> {
    crate::sockopt::get(fd.as_raw_fd(), name)
}

/// This process's network namespace.
pub fn own_netns() -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata("/proc/self/ns/net")?;
    Ok((meta.dev(), meta.ino()))
}

/// Checks that `fd` is a `kind` (in `netns`, for sockets); says what it is otherwise.
pub fn check_descriptor(fd: BorrowedFd<'_>, kind: Kind, netns: (u64, u64)) -> Result<(), String> {
    let (want_type, name) = match kind {
        Kind::Tcp => (libc::SOCK_STREAM, "a TCP socket"),
        Kind::Udp => (libc::SOCK_DGRAM, "a UDP socket"),
    };
    let is = |t: std::io::Result<libc::c_int>| t.map_err(|e| format!("not {name}: {e}"));
    let ty = is(sockopt(fd, libc::SO_TYPE))?;
    let domain = is(sockopt(fd, libc::SO_DOMAIN))?;
    if ty != want_type || !(domain == libc::AF_INET || domain == libc::AF_INET6) {
        return Err(format!("not {name} (type {ty}, family {domain})"));
    }
    if kind == Kind::Tcp && is(sockopt(fd, libc::SO_ACCEPTCONN))? == 0 {
        return Err(format!("not a listening {name}"));
    }
    let got = socket_netns(fd).map_err(|e| format!("its network namespace: {e}"))?;
    if got != netns {
        return Err(format!(
            "{name} of network namespace {got:?}, not {netns:?} as described"
        ));
    }
    Ok(())
}

/// Checks that the handed lock is the pin directory this daemon was asked to use
/// (the same directory, not just the same name), and the daemon's own.
pub fn check_lock(fd: BorrowedFd<'_>, pin_dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt as _;
    let handed = std::fs::File::from(fd.try_clone_to_owned().map_err(|e| e.to_string())?);
    let handed = handed.metadata().map_err(|e| e.to_string())?;
    let ours = std::fs::metadata(pin_dir).map_err(|e| format!("{}: {e}", pin_dir.display()))?;
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    if !handed.is_dir()
        || (handed.dev(), handed.ino()) != (ours.dev(), ours.ino())
        || handed.uid() != uid
    {
        return Err(format!(
            "the pin directory's lock is not {} (owned by uid {uid})",
            pin_dir.display()
        ));
    }
    Ok(())
}
