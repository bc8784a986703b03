//! A pod's network namespace, and listeners bound inside it (ztunnel's in-pod model):
//! the daemon stays on the host network, and for each captured pod opens its DNS
//! listeners *inside* the pod's network namespace, from a thread that enters it,
//! binds, and ends.
//!
//! The namespace is found when the pod changes, never by a scan on a timer: the pod's
//! cgroup (a directory whose name carries the pod UID, below the cgroup the daemon
//! attaches at) lists its processes; one of them is opened as a pidfd, and the
//! identity of its network namespace is read while the pidfd proves the pid still is
//! that process. The bind thread enters the namespace through the pidfd and checks
//! the identity again from inside, so a pid that was reused meanwhile can never get
//! a listener bound into another pod. Everything here blocks: callers run it off the
//! async runtime (`spawn_blocking`).
use std::{
    collections::VecDeque,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use super::resolv;
use crate::{
    bpf::netns_cookie::NetnsCookies,
    dns::server::{BindError, StdListeners, UdpSockets, bind_std},
    pidfd::Pidfd,
};

/// How deep below the attach cgroup a pod's cgroup is looked for
/// (`kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice` is 3).
const MAX_DEPTH: usize = 6;

/// Errors finding a pod's namespace or opening listeners in it.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// No cgroup directory names the pod.
    #[error("no cgroup of pod {uid} below {root}")]
    NoCgroup { uid: String, root: PathBuf },
    /// Its cgroup holds no process (yet, or any more).
    #[error("no process in the cgroup {cgroup}")]
    NoProcess { cgroup: PathBuf },
    /// The namespace of a process could not be read.
    #[error("cannot read the network namespace of pid {pid}")]
    Read {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    /// setns(2) failed.
    #[error("cannot enter the network namespace of pid {pid}")]
    Enter {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    /// The namespace entered is not the one located: the process changed under us.
    #[error("pid {pid} left the network namespace it was located in")]
    Moved { pid: u32 },
    /// The pod shares the daemon's own network namespace (hostNetwork).
    #[error("pid {pid} is in the daemon's own network namespace: not capturing the node")]
    HostNamespace { pid: u32 },
    /// Binding failed inside the namespace.
    #[error("in the network namespace of pid {pid}")]
    Bind {
        pid: u32,
        #[source]
        source: BindError,
    },
    /// The namespace cookie could not be read.
    #[error("cannot read the netns cookie in the namespace of pid {pid}")]
    Cookie {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
}

impl NetnsError {
    /// The pod has no process yet: worth trying again soon, not worth a warning.
    pub fn is_not_yet(&self) -> bool {
        matches!(
            self,
            NetnsError::NoCgroup { .. } | NetnsError::NoProcess { .. }
        )
    }
}

/// The UID as it appears in cgroup paths: `pod<uid>` with `-` (cgroupfs) or `_`
/// (systemd) separators.
fn uid_forms(uid: &str) -> [String; 2] {
    [format!("pod{uid}"), format!("pod{}", uid.replace('-', "_"))]
}

/// The identity of a network namespace: device and inode of its nsfs file. It changes
/// when the runtime recreates a pod's sandbox.
pub type NetnsId = (u64, u64);

/// A pod's network namespace, held through one of its processes.
#[derive(Debug)]
pub struct PodNetns {
    process: Pidfd,
    pub id: NetnsId,
    /// The pod's search list, from the resolv.conf of the first of its processes
    /// that has one (`super::resolv`); empty when none has.
    pub search: Arc<[String]>,
}

impl PodNetns {
    /// Another handle on the same namespace (for the thread that binds in it).
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(PodNetns {
            process: self.process.try_clone()?,
            id: self.id,
            search: Arc::clone(&self.search),
        })
    }
}

/// Where pods' processes are found.
#[derive(Clone, Debug)]
pub struct Locator {
    /// The cgroup v2 directory the pods' cgroups are below (the attach point).
    pub cgroup_root: PathBuf,
    /// Where `/proc` is (the host's, with the host PID namespace).
    pub proc_root: PathBuf,
}

impl Locator {
    /// The network namespace of pod `uid`, through a process of its cgroup.
    pub fn locate(&self, uid: &str) -> Result<PodNetns, NetnsError> {
        let cgroup =
            find_pod_cgroup(&self.cgroup_root, uid).ok_or_else(|| NetnsError::NoCgroup {
                uid: uid.to_owned(),
                root: self.cgroup_root.clone(),
            })?;
        let forms = uid_forms(uid);
        // A process caught between its container's cgroup and its namespaces (a
        // runtime starting it) may still be in the host's: never a pod's namespace.
        let host = netns_id(Path::new("/proc/thread-self/ns/net")).ok();
        let pids = processes_below(&cgroup);
        for &pid in &pids {
            let Some((process, id)) =
                self.read_in_pod(pid, &forms, |proc| netns_id(&proc.join("ns/net")))
            else {
                continue;
            };
            let id = id.map_err(|source| NetnsError::Read { pid, source })?;
            if Some(id) == host {
                continue;
            }
            // The resolv.conf is the containers' (the sandbox's pause process has none).
            let search = pids
                .iter()
                .find_map(|&pid| {
                    self.read_in_pod(pid, &forms, |proc| resolv::search_under(&proc.join("root")))?
                        .1
                })
                .unwrap_or_else(|| Arc::new([]));
            return Ok(PodNetns {
                process,
                id,
                search,
            });
        }
        Err(NetnsError::NoProcess { cgroup })
    }

    /// `read` of the /proc directory of `pid`, when `pid` is a process of the pod
    /// (`forms` of its UID in its cgroup) from before the read until after it: read
    /// through /proc while a pidfd holds the process, so that if it is still alive
    /// afterwards the pid was that process all along.
    fn read_in_pod<T>(
        &self,
        pid: u32,
        forms: &[String],
        read: impl FnOnce(&Path) -> T,
    ) -> Option<(Pidfd, T)> {
        let process = Pidfd::open(pid).ok()?;
        let proc = self.proc_root.join(pid.to_string());
        let in_pod = std::fs::read_to_string(proc.join("cgroup")).is_ok_and(|c| {
            c.lines()
                .any(|l| forms.iter().any(|f| l.contains(f.as_str())))
        });
        let value = read(&proc);
        (process.is_alive() && in_pod).then_some((process, value))
    }
}

/// The cgroup directory of pod `uid` below `root`, breadth first.
fn find_pod_cgroup(root: &Path, uid: &str) -> Option<PathBuf> {
    let forms = uid_forms(uid);
    let mut queue = VecDeque::from([(root.to_path_buf(), 0)]);
    while let Some((dir, depth)) = queue.pop_front() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if forms.iter().any(|f| name.contains(f.as_str())) {
                return Some(entry.path());
            }
            if depth + 1 < MAX_DEPTH {
                queue.push_back((entry.path(), depth + 1));
            }
        }
    }
    None
}

/// The processes of `cgroup` and of the cgroups below it (a pod's processes live in
/// its containers' cgroups).
fn processes_below(cgroup: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    let mut queue = VecDeque::from([cgroup.to_path_buf()]);
    while let Some(dir) = queue.pop_front() {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            queue.extend(
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    pids
}

fn netns_id(path: &Path) -> std::io::Result<NetnsId> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

/// Binds the DNS listeners on `127.0.0.1/::1`:`port` inside `netns`; returns them with
/// the namespace's cookie (the key of the policy map).
pub fn bind_in(
    netns: &PodNetns,
    port: u16,
    cookies: &Arc<NetnsCookies>,
) -> Result<(StdListeners, u64), NetnsError> {
    let pid = netns.process.pid();
    if netns_id(Path::new("/proc/thread-self/ns/net")).is_ok_and(|own| own == netns.id) {
        return Err(NetnsError::HostNamespace { pid });
    }
    let target = netns
        .process
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| NetnsError::Enter { pid, source })?;
    let expected = netns.id;
    let cookies = Arc::clone(cookies);
    // A thread of its own: setns changes only the calling thread, which ends here, so
    // no runtime thread is ever left in a pod's namespace.
    std::thread::spawn(move || {
        // SAFETY: setns on a pidfd, for this thread's network namespace only.
        if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(NetnsError::Enter {
                pid,
                source: std::io::Error::last_os_error(),
            });
        }
        // The namespace entered is the one located, or nothing is bound.
        let entered = netns_id(Path::new("/proc/thread-self/ns/net"))
            .map_err(|source| NetnsError::Read { pid, source })?;
        if entered != expected {
            return Err(NetnsError::Moved { pid });
        }
        let listeners =
            bind_std(port, UdpSockets::One).map_err(|source| NetnsError::Bind { pid, source })?;
        let sock = listeners
            .any_socket()
            .expect("bind_std binds at least one UDP socket");
        let cookie = cookies
            .of_socket(sock)
            .map_err(|source| NetnsError::Cookie { pid, source })?;
        Ok((listeners, cookie))
    })
    .join()
    .expect("netns thread panicked")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_pods_cgroup_in_either_layout() {
        let root = std::env::temp_dir().join(format!("cg-{}", std::process::id()));
        let uid = "0f1e2d3c-aaaa-bbbb-cccc-123456789abc";
        let systemd = root.join(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0f1e2d3c_aaaa_bbbb_cccc_123456789abc.slice",
        );
        std::fs::create_dir_all(systemd.join("cri-containerd-1.scope")).unwrap();
        std::fs::write(systemd.join("cri-containerd-1.scope/cgroup.procs"), "42\n").unwrap();
        let other = "11111111-0000-0000-0000-000000000000";
        std::fs::create_dir_all(root.join(format!("kubepods/burstable/pod{other}"))).unwrap();
        let found = find_pod_cgroup(&root, uid);
        let found_other = find_pod_cgroup(&root, other);
        let missing = find_pod_cgroup(&root, "22222222-0000-0000-0000-000000000000");
        let pids = processes_below(&systemd);
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(found, Some(systemd));
        assert_eq!(
            found_other,
            Some(root.join(format!("kubepods/burstable/pod{other}")))
        );
        assert_eq!(missing, None);
        assert_eq!(pids, [42]);
    }

    #[test]
    fn a_pod_without_a_process_is_not_located_yet() {
        let root = std::env::temp_dir().join(format!("cg-empty-{}", std::process::id()));
        let uid = "33333333-0000-0000-0000-000000000000";
        std::fs::create_dir_all(root.join(format!("pod{uid}"))).unwrap();
        let locator = Locator {
            cgroup_root: root.clone(),
            proc_root: PathBuf::from("/proc"),
        };
        let err = locator.locate(uid).unwrap_err();
        let gone = locator.locate("44444444-0000-0000-0000-000000000000");
        std::fs::remove_dir_all(&root).unwrap();
        assert!(matches!(err, NetnsError::NoProcess { .. }), "{err}");
        assert!(err.is_not_yet());
        assert!(matches!(gone, Err(NetnsError::NoCgroup { .. })));
    }
}
