//! In-pod listeners (ztunnel's in-pod model): the daemon stays on the host network,
//! and for each captured pod opens its DNS listeners *inside* the pod's network
//! namespace — on a dedicated thread that enters the namespace (setns), binds, and
//! ends — then serves them from the shared runtime. The namespace is found through a
//! process of the pod (its cgroup path names the pod UID).
use std::{
    collections::HashMap,
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use crate::dns::server::{BindError, StdListeners, UdpSockets, bind_std};

/// `SO_NETNS_COOKIE` (include/uapi/asm-generic/socket.h).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Errors opening listeners in a pod.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace file could not be opened.
    #[error("cannot open network namespace {path}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    /// setns(2) failed.
    #[error("cannot enter network namespace {path}")]
    Enter {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The pod shares the daemon's own network namespace (hostNetwork).
    #[error("{path} is the daemon's own network namespace: not capturing the node")]
    HostNamespace { path: PathBuf },
    /// Binding failed inside the namespace.
    #[error("in network namespace {path}")]
    Bind { path: PathBuf, source: BindError },
    /// The namespace cookie could not be read.
    #[error("cannot read the netns cookie in {path}")]
    Cookie {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The UID as it appears in cgroup paths: `pod<uid>` with `-` (cgroupfs) or `_`
/// (systemd) separators.
fn uid_forms(uid: &str) -> [String; 2] {
    [format!("pod{uid}"), format!("pod{}", uid.replace('-', "_"))]
}

/// A pod's network namespace: a path to open it by, and its identity (device and
/// inode of the nsfs file), which changes when the runtime recreates the sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNetns {
    pub path: PathBuf,
    pub id: (u64, u64),
}

/// The network namespaces of the pods `uids`, each through a process whose cgroup
/// path names it, in one scan of `proc_root` (normally /proc; needs the host PID
/// namespace). Pods without a process yet are missing.
pub fn find_pods_netns<'a>(
    proc_root: &Path,
    uids: impl IntoIterator<Item = &'a str>,
) -> HashMap<String, PodNetns> {
    use std::os::unix::fs::MetadataExt as _;
    let mut wanted: Vec<(String, [String; 2])> = uids
        .into_iter()
        .map(|uid| (uid.to_owned(), uid_forms(uid)))
        .collect();
    let mut found = HashMap::new();
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return found;
    };
    for entry in entries.filter_map(Result::ok) {
        if wanted.is_empty() {
            break;
        }
        let name = entry.file_name();
        if !name
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        {
            continue;
        }
        let Ok(cgroup) = std::fs::read_to_string(entry.path().join("cgroup")) else {
            continue;
        };
        let Some(at) = wanted.iter().position(|(_, forms)| {
            cgroup
                .lines()
                .any(|l| forms.iter().any(|f| l.contains(f.as_str())))
        }) else {
            continue;
        };
        let path = entry.path().join("ns/net");
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        let (uid, _) = wanted.swap_remove(at);
        let id = (meta.dev(), meta.ino());
        found.insert(uid, PodNetns { path, id });
    }
    found
}

fn same_namespace(a: &File, b: &File) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (a.metadata(), b.metadata()) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// The network namespace cookie of the namespace `sock` lives in.
pub fn netns_cookie(sock: &impl AsRawFd) -> std::io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd and out-pointers of the right size.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Binds the DNS listeners on `127.0.0.1/::1`:`port` inside the namespace at `netns`;
/// returns them with the namespace's cookie (the key of the policy map). Blocking: call
/// from `spawn_blocking`.
pub fn bind_in_netns(netns: &Path, port: u16) -> Result<(StdListeners, u64), NetnsError> {
    let target = File::open(netns).map_err(|source| NetnsError::Open {
        path: netns.to_path_buf(),
        source,
    })?;
    let own = File::open("/proc/thread-self/ns/net").map_err(|source| NetnsError::Open {
        path: PathBuf::from("/proc/thread-self/ns/net"),
        source,
    })?;
    if same_namespace(&target, &own) {
        return Err(NetnsError::HostNamespace {
            path: netns.to_path_buf(),
        });
    }
    let path = netns.to_path_buf();
    // A thread of its own: setns changes only the calling thread, which ends here, so
    // no runtime thread is ever left in a pod's namespace.
    std::thread::spawn(move || {
        // SAFETY: setns on a valid namespace fd, for this thread only.
        if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(NetnsError::Enter {
                path,
                source: std::io::Error::last_os_error(),
            });
        }
        let listeners = bind_std(port, UdpSockets::One).map_err(|source| NetnsError::Bind {
            path: path.clone(),
            source,
        })?;
        let sock = listeners
            .any_socket()
            .expect("bind_std binds at least one UDP socket");
        let cookie = netns_cookie(sock).map_err(|source| NetnsError::Cookie { path, source })?;
        Ok((listeners, cookie))
    })
    .join()
    .expect("netns thread panicked")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_process_by_pod_uid() {
        let root = std::env::temp_dir().join(format!("proc-{}", std::process::id()));
        let uid = "0f1e2d3c-aaaa-bbbb-cccc-123456789abc";
        for (pid, cgroup) in [
            ("1", "0::/init.scope\n"),
            (
                "42",
                "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0f1e2d3c_aaaa_bbbb_cccc_123456789abc.slice/cri-containerd-1.scope\n",
            ),
            ("self", "0::/ignored\n"),
        ] {
            std::fs::create_dir_all(root.join(pid)).unwrap();
            std::fs::write(root.join(pid).join("cgroup"), cgroup).unwrap();
        }
        // Stands in for the nsfs file (its identity is what the daemon compares).
        std::fs::create_dir_all(root.join("42/ns")).unwrap();
        std::fs::write(root.join("42/ns/net"), "").unwrap();
        let other = "ffffffff-0000-0000-0000-000000000000";
        let found = find_pods_netns(&root, [uid, other]);
        assert_eq!(found[uid].path, root.join("42/ns/net"));
        assert!(!found.contains_key(other));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
