//! Directories only the daemon may write: the state directory (handoff socket, VIP
//! state) and the pin directory (programs, maps, links). Whoever can write there can
//! take the listening sockets over or swap a map, so a directory that is not the
//! daemon's own is refused, never adopted.
//!
//! A missing directory is created 0700. An existing one must be a real directory (not
//! a symbolic link), owned by the daemon's user and writable by nobody else; one that
//! others can only read (an older daemon's 0755) is tightened to 0700.
use std::{
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

/// Why a directory is not the daemon's own.
#[derive(Debug, thiserror::Error)]
pub enum PrivateDirError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path} is a symbolic link; point the flag at the directory itself")]
    Symlink { what: &'static str, path: PathBuf },
    #[error("{what} {path} is not a directory")]
    NotDirectory { what: &'static str, path: PathBuf },
    #[error(
        "{what} {path} belongs to uid {owner}, not to the daemon's uid {ours}: whoever owns it could take the daemon's sockets or maps"
    )]
    Owner {
        what: &'static str,
        path: PathBuf,
        owner: u32,
        ours: u32,
    },
    #[error(
        "{what} {path} is writable by its group or by everyone (mode {mode:04o}); make it 0700 (chmod 700 {path})"
    )]
    Writable {
        what: &'static str,
        path: PathBuf,
        mode: u32,
    },
}

/// Creates `path` (0700) or checks that it is the daemon's own; `what` names it in
/// errors ("state directory", "pin directory").
pub fn ensure(path: &Path, what: &'static str) -> Result<(), PrivateDirError> {
    let io = |source| PrivateDirError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
    {
        Ok(()) => {}
        // A symbolic link to nowhere, for one, is reported below as what it is.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(e)),
    }
    let meta = std::fs::symlink_metadata(path).map_err(io)?;
    let path_buf = || path.to_path_buf();
    if meta.file_type().is_symlink() {
        return Err(PrivateDirError::Symlink {
            what,
            path: path_buf(),
        });
    }
    if !meta.is_dir() {
        return Err(PrivateDirError::NotDirectory {
            what,
            path: path_buf(),
        });
    }
    // SAFETY: geteuid cannot fail.
    let ours = unsafe { libc::geteuid() };
    if meta.uid() != ours {
        return Err(PrivateDirError::Owner {
            what,
            path: path_buf(),
            owner: meta.uid(),
            ours,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(PrivateDirError::Writable {
            what,
            path: path_buf(),
            mode,
        });
    }
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        tracing::info!(path = %path.display(), from = format!("{mode:04o}"), "{what}: made private (0700)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("private-dir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_file(&dir);
        dir
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn a_missing_directory_is_created_private_and_a_readable_one_tightened() {
        let dir = scratch("new");
        ensure(&dir.join("a/b"), "state directory").unwrap();
        assert_eq!(mode(&dir.join("a/b")), 0o700);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        ensure(&dir, "state directory").unwrap();
        assert_eq!(mode(&dir), 0o700);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn writable_by_others_a_symlink_or_a_file_is_refused() {
        let dir = scratch("open");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let e = ensure(&dir, "state directory").unwrap_err();
        assert!(
            matches!(e, PrivateDirError::Writable { mode: 0o1777, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("chmod 700"), "{e}");
        assert_eq!(mode(&dir), 0o1777, "a refused directory is left as it was");

        let link = scratch("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let e = ensure(&link, "pin directory").unwrap_err();
        assert!(matches!(e, PrivateDirError::Symlink { .. }), "{e}");
        std::fs::remove_file(&link).unwrap();
        // A dangling link too: nothing is created where it points.
        std::os::unix::fs::symlink(dir.join("nowhere"), &link).unwrap();
        assert!(matches!(
            ensure(&link, "pin directory"),
            Err(PrivateDirError::Symlink { .. })
        ));
        assert!(!dir.join("nowhere").exists());
        std::fs::remove_file(&link).unwrap();

        let file = dir.join("file");
        std::fs::write(&file, "").unwrap();
        assert!(matches!(
            ensure(&file, "state directory"),
            Err(PrivateDirError::NotDirectory { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn another_users_directory_is_refused() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 && std::env::var("CI").as_deref() != Ok("true") {
            return; // only root can give a directory away (CI runs as root)
        }
        let dir = scratch("owner");
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
        let e = ensure(&dir, "state directory").unwrap_err();
        assert!(
            matches!(
                e,
                PrivateDirError::Owner {
                    owner: 65534,
                    ours: 0,
                    ..
                }
            ),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
