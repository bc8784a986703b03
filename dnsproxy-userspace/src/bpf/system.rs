//! Checks and preparation of the host: privileges, cgroup v2, bpffs (kernel features: `features`).
use std::{
    ffi::CString,
    os::fd::AsRawFd as _,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use super::BpfError;

/// bpffs magic number (statfs `f_type`).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Fails unless the effective user is root.
pub fn require_root() -> Result<(), BpfError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(BpfError::NotRoot);
    }
    Ok(())
}

/// Raises the open-files limit to its hard limit: one daemon serves every pod of a node,
/// and each pod costs a few descriptors. Returns the limit now in force.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: a valid, initialised rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}

/// The mount point of the cgroup v2 hierarchy, from a mountinfo text.
pub fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "36 35 0:30 / /sys/fs/cgroup/unified rw,... shared:9 - cgroup2 cgroup2 rw"
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// The mount point of the cgroup v2 hierarchy of this process.
pub fn cgroup2_mount() -> Result<PathBuf, BpfError> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    cgroup2_mount_in(&mountinfo).ok_or(BpfError::NoCgroup2)
}

/// The default capture cgroup: `dnsproxy` under the cgroup2 mount.
pub fn default_cgroup() -> Result<PathBuf, BpfError> {
    Ok(cgroup2_mount()?.join("dnsproxy"))
}

/// Creates `path` if missing and checks it is a cgroup v2 directory.
pub fn ensure_cgroup(path: &Path) -> Result<(), BpfError> {
    std::fs::create_dir_all(path).map_err(|source| BpfError::Cgroup {
        path: path.display().to_string(),
        source,
    })?;
    if !path.join("cgroup.procs").exists() {
        return Err(BpfError::NotCgroup2 {
            path: path.display().to_string(),
        });
    }
    Ok(())
}

fn statfs_type(path: &Path) -> Option<i64> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: zeroed statfs is valid; c is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers for the duration of the call.
    let rc = unsafe { libc::statfs(c.as_ptr(), &raw mut st) };
    (rc == 0).then_some(st.f_type as i64)
}

/// Makes sure `pin_dir` exists on bpffs, mounting bpffs at `/sys/fs/bpf` if needed.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), BpfError> {
    let root = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(root) && statfs_type(root) != Some(BPF_FS_MAGIC) {
        std::fs::create_dir_all(root).map_err(|source| BpfError::BpffsMount {
            path: root.display().to_string(),
            source,
        })?;
        let src = CString::new("bpffs").expect("no NUL");
        let target = CString::new("/sys/fs/bpf").expect("no NUL");
        let fstype = CString::new("bpf").expect("no NUL");
        // Root only, as systemd mounts it: pins are the data path's controls.
        let data = CString::new("mode=0700").expect("no NUL");
        // SAFETY: valid NUL-terminated strings.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                data.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(BpfError::BpffsMount {
                path: root.display().to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        tracing::info!("mounted bpffs at /sys/fs/bpf");
    }
    crate::private_dir::ensure(pin_dir, "pin directory")?;
    if statfs_type(pin_dir) != Some(BPF_FS_MAGIC) {
        return Err(BpfError::NotBpffs {
            path: pin_dir.display().to_string(),
        });
    }
    Ok(())
}

/// An exclusive lock on the pin directory, held while the daemon runs.
pub struct PinDirLock {
    file: std::fs::File,
}

/// Locks `pin_dir` so two daemons never share pins. `handed` is the lock of a
/// predecessor that handed its sockets over: the same open file, so the lock is
/// already ours through it (and stays when the predecessor exits).
pub fn lock_pin_dir(
    pin_dir: &Path,
    handed: Option<std::os::fd::OwnedFd>,
) -> Result<PinDirLock, BpfError> {
    let file = match handed {
        Some(fd) => std::fs::File::from(fd),
        None => std::fs::File::open(pin_dir).map_err(super::pin_err(pin_dir))?,
    };
    // SAFETY: valid fd.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(BpfError::PinDirBusy {
            path: pin_dir.display().to_string(),
        });
    }
    Ok(PinDirLock { file })
}

impl PinDirLock {
    /// A new descriptor of the locked file, to hand to a successor.
    pub fn dup(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd as _;
        self.file.as_fd().try_clone_to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_mount() {
        let mountinfo = "\
30 1 0:27 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
36 30 0:30 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu
41 30 0:35 / /sys/fs/cgroup/unified rw,relatime shared:14 - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mount_in(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_mount_in("30 1 0:27 / /x rw - tmpfs tmpfs rw"), None);
    }
}
