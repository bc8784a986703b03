//! A pod's own search list, for autopath: its `/etc/resolv.conf` as its containers see
//! it (the kubelet writes it from the pod's `dnsPolicy` and `dnsConfig`), read through
//! the root of one of its processes when the pod is captured.
//!
//! The file is the pod's, so it is untrusted: it is opened relative to the process's
//! root with `openat2(RESOLVE_IN_ROOT)` (an absolute symlink in the pod cannot point
//! the daemon at a host file), only as a regular file (never a FIFO that would block
//! the reading thread), and read up to [`MAX_BYTES`].
use std::{
    ffi::CString,
    fs::File,
    io::Read as _,
    os::fd::{FromRawFd as _, OwnedFd},
    path::Path,
    sync::Arc,
};

use crate::resolv_conf::parse_search;

/// Most bytes of a pod's resolv.conf read (the kubelet's are a few hundred).
pub const MAX_BYTES: u64 = 64 * 1024;

/// `path` (relative, e.g. `etc/resolv.conf`) inside the directory `root`, resolved as
/// if `root` were `/`: symlinks, `..` and absolute ones included, cannot leave it.
pub fn read_in_root(root: &Path, path: &str) -> std::io::Result<String> {
    let root = File::open(root)?;
    let path = CString::new(path).map_err(std::io::Error::other)?;
    // SAFETY: `open_how` is plain data; zeroed is valid, then the fields are set.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: valid directory fd, NUL-terminated path, `how` of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            std::os::fd::AsRawFd::as_raw_fd(&root),
            path.as_ptr(),
            &raw const how,
            size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openat2 returned a new descriptor that nothing else owns.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut text = String::new();
    file.take(MAX_BYTES).read_to_string(&mut text)?;
    Ok(text)
}

/// The search list of the resolv.conf under the process root `root`
/// (`/proc/<pid>/root`); `None` when there is none to read (a sandbox's pause
/// process has no `/etc`).
pub fn search_under(root: &Path) -> Option<Arc<[String]>> {
    let text = read_in_root(root, "etc/resolv.conf").ok()?;
    Some(parse_search(&text).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_inside_the_root_only_and_only_regular_files() {
        let dir = std::env::temp_dir().join(format!("resolv-root-{}", std::process::id()));
        let etc = dir.join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(
            etc.join("resolv.conf"),
            "search Shop.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\n",
        )
        .unwrap();
        assert_eq!(
            search_under(&dir).as_deref(),
            Some(
                &[
                    "shop.svc.cluster.local".to_owned(),
                    "svc.cluster.local".to_owned()
                ][..]
            )
        );
        // An absolute symlink points inside the root, not at the host's file.
        std::fs::write(dir.join("host-looking"), "search inside.example\n").unwrap();
        std::fs::remove_file(etc.join("resolv.conf")).unwrap();
        std::os::unix::fs::symlink("/host-looking", etc.join("resolv.conf")).unwrap();
        assert_eq!(
            search_under(&dir).as_deref(),
            Some(&["inside.example".to_owned()][..])
        );
        std::fs::remove_file(etc.join("resolv.conf")).unwrap();
        std::os::unix::fs::symlink("../../../../../../etc/hostname", etc.join("resolv.conf"))
            .unwrap();
        assert!(search_under(&dir).is_none(), "`..` stops at the root");
        // A FIFO is refused without blocking.
        std::fs::remove_file(etc.join("resolv.conf")).unwrap();
        let fifo = CString::new(etc.join("resolv.conf").to_str().unwrap()).unwrap();
        // SAFETY: a valid path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        assert!(search_under(&dir).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(search_under(&dir).is_none(), "no root, no list");
    }
}
