//! A cgroup v2 directory per test.
use std::{path::PathBuf, thread, time::Duration};

use crate::unique_name;

/// The cgroup v2 mount point, read the way the daemon reads it.
pub fn cgroup2_root() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    dnsproxy::bpf::system::cgroup2_mount_in(&mountinfo)
}

// === impl Cgroup ===

/// A cgroup v2 directory; its processes are killed and the directory removed on drop.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new() -> Self {
        let path = cgroup2_root()
            .expect("cgroup2 mount")
            .join(unique_name("c"));
        std::fs::create_dir(&path).expect("create cgroup");
        Cgroup { path }
    }
}

impl Cgroup {
    /// A cgroup below this one, removed on drop (before its parent).
    #[must_use]
    pub fn child(&self, name: &str) -> Cgroup {
        let path = self.path.join(name);
        std::fs::create_dir(&path).expect("create child cgroup");
        Cgroup { path }
    }
}

impl Default for Cgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            let procs = std::fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                // SAFETY: plain kill(2).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}
