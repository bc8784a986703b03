//! The cookie of a network namespace: what `dp_policy` is keyed by and what the data
//! path compares (`bpf_get_netns_cookie`).
//!
//! From a socket, `SO_NETNS_COOKIE` gives it (Linux 5.14). Older kernels (5.10 LTS:
//! Alibaba Cloud Linux 3, Amazon Linux 2) have the helper but not the socket option, so
//! the kernel is asked through a probe: the daemon attaches `dnsproxy_netns_probe`
//! (`cgroup/sock_create`) to a cgroup of its own; to learn the cookie of the namespace
//! the calling thread is in, a child process of that thread joins the cgroup and opens
//! one socket, and the program records the socket's netns cookie under the child's pid
//! in `dp_netns_probe`, which the daemon reads and removes.
use std::{
    ffi::CString,
    os::{fd::AsRawFd, unix::ffi::OsStrExt as _},
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData},
    programs::{CgroupAttachMode, CgroupSock},
};
use dnsproxy_common::{NETNS_PROBE_MAP, NETNS_PROBE_PROGRAM};

use super::BpfError;

/// `SO_NETNS_COOKIE` (include/uapi/asm-generic/socket.h).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// How the daemon learns netns cookies (`--netns-cookie`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CookieSource {
    /// `SO_NETNS_COOKIE` when the kernel has it (5.14), else the probe.
    Auto,
    /// `SO_NETNS_COOKIE` only.
    Sockopt,
    /// The probe cgroup and program (any kernel from 5.7).
    Probe,
}

/// The network namespace cookie of the namespace `sock` lives in (`SO_NETNS_COOKIE`).
pub fn sockopt_cookie(sock: &impl AsRawFd) -> std::io::Result<u64> {
    crate::sockopt::get(sock.as_raw_fd(), SO_NETNS_COOKIE)
}

/// Whether this kernel has `SO_NETNS_COOKIE` (5.14).
pub fn has_sockopt() -> bool {
    let Ok(sock) = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None) else {
        return false;
    };
    sockopt_cookie(&sock).is_ok()
}

/// Where netns cookies come from in this daemon.
#[derive(Debug)]
pub enum NetnsCookies {
    Sockopt,
    Probe(Probe),
}

impl NetnsCookies {
    /// `source` made real: with the probe, its program is attached to a new cgroup
    /// below `cgroup2` (removed when this is dropped).
    pub fn new(source: CookieSource, ebpf: &mut Ebpf, cgroup2: &Path) -> Result<Self, BpfError> {
        let probe = match source {
            CookieSource::Sockopt => false,
            CookieSource::Probe => true,
            CookieSource::Auto => !has_sockopt(),
        };
        if !probe {
            if !has_sockopt() {
                return Err(BpfError::Listener(std::io::Error::other(
                    "--netns-cookie sockopt: the kernel has no SO_NETNS_COOKIE (Linux 5.14); use auto or probe",
                )));
            }
            return Ok(NetnsCookies::Sockopt);
        }
        if source == CookieSource::Probe {
            // Without the socket option the start-up feature check has said so already.
            tracing::info!(
                "--netns-cookie probe: netns cookies come from a probe program (cgroup/sock_create)"
            );
        }
        Ok(NetnsCookies::Probe(Probe::attach(ebpf, cgroup2)?))
    }

    /// The cookie of the network namespace `sock` lives in, which is the calling
    /// thread's.
    pub fn of_socket(&self, sock: &impl AsRawFd) -> std::io::Result<u64> {
        match self {
            NetnsCookies::Sockopt => sockopt_cookie(sock),
            NetnsCookies::Probe(probe) => probe.current(),
        }
    }

    /// How cookies are learned, for logs and `dnsproxy check`.
    pub fn source(&self) -> &'static str {
        match self {
            NetnsCookies::Sockopt => "SO_NETNS_COOKIE",
            NetnsCookies::Probe(_) => "probe (cgroup/sock_create)",
        }
    }
}

/// The probe: its cgroup, its map; the program stays attached while the object that
/// loaded it lives (the daemon's data path).
pub struct Probe {
    cgroup: PathBuf,
    procs: CString,
    map: Mutex<BpfHashMap<MapData, u32, u64>>,
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probe")
            .field("cgroup", &self.cgroup)
            .finish_non_exhaustive()
    }
}

impl Probe {
    fn attach(ebpf: &mut Ebpf, cgroup2: &Path) -> Result<Self, BpfError> {
        remove_stale_cgroups(cgroup2);
        let cgroup = cgroup2.join(format!("dnsproxy-netns-probe-{}", std::process::id()));
        let cgroup_err = |source| BpfError::Cgroup {
            path: cgroup.display().to_string(),
            source,
        };
        std::fs::create_dir_all(&cgroup).map_err(cgroup_err)?;
        let dir = std::fs::File::open(&cgroup).map_err(cgroup_err)?;
        let program: &mut CgroupSock = ebpf
            .program_mut(NETNS_PROBE_PROGRAM)
            .ok_or_else(|| BpfError::Missing {
                what: format!("program {NETNS_PROBE_PROGRAM}"),
            })?
            .try_into()
            .map_err(|source| BpfError::LoadProgram {
                program: NETNS_PROBE_PROGRAM.to_owned(),
                source,
            })?;
        let load = |source| BpfError::LoadProgram {
            program: NETNS_PROBE_PROGRAM.to_owned(),
            source,
        };
        program.load().map_err(load)?;
        program
            .attach(&dir, CgroupAttachMode::Single)
            .map_err(load)?;
        let map = ebpf
            .take_map(NETNS_PROBE_MAP)
            .ok_or_else(|| BpfError::Missing {
                what: format!("map {NETNS_PROBE_MAP}"),
            })?;
        let map = BpfHashMap::try_from(map).map_err(super::map_err(NETNS_PROBE_MAP))?;
        let procs = CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes())
            .map_err(|e| cgroup_err(std::io::Error::other(e)))?;
        Ok(Probe {
            cgroup,
            procs,
            map: Mutex::new(map),
        })
    }

    /// The cookie of the calling thread's network namespace.
    fn current(&self) -> std::io::Result<u64> {
        let procs = self.procs.as_ptr();
        // SAFETY: fork duplicates the calling thread only; the child makes nothing but
        // system calls (open, write, close, socket, _exit) on memory prepared before
        // the fork, so no lock another thread held can be waited on.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: the child, as above: join the probe cgroup ("0": the writer),
            // open one socket (the program records its netns cookie), exit.
            unsafe {
                let fd = libc::open(procs, libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    libc::_exit(2);
                }
                libc::close(fd);
                let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
                libc::_exit(if sock >= 0 { 0 } else { 3 });
            }
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        if unsafe { libc::waitpid(pid, &raw mut status, 0) } != pid {
            return Err(std::io::Error::last_os_error());
        }
        let mut map = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = pid.unsigned_abs();
        let cookie = map.get(&key, 0);
        let _ = map.remove(&key);
        match (
            libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
            cookie,
        ) {
            (Some(0), Ok(cookie)) => Ok(cookie),
            (code, _) => Err(std::io::Error::other(format!(
                "the netns cookie probe found nothing (child exit {code:?}, cgroup {})",
                self.cgroup.display()
            ))),
        }
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        // Empty once its children exited: a cgroup directory goes with rmdir.
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

/// Probe cgroups of daemons that are gone (a crash leaves its directory behind).
fn remove_stale_cgroups(cgroup2: &Path) {
    let Ok(entries) = std::fs::read_dir(cgroup2) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("dnsproxy-netns-probe-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}
