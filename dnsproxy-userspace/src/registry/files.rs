//! The registry source for local mode: a YAML file, or every `*.yaml`/`*.yml` file of a
//! directory (sorted by name), polled for changes. A broken file is reported with its
//! path and reason, and the last good objects stay in service.
use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use super::manifest::{self, Objects};

/// Errors loading manifests from disk.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The path or a file in it could not be read.
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file's content is wrong.
    #[error("{path}")]
    Manifest {
        path: PathBuf,
        source: Box<manifest::ManifestError>,
    },
}

/// The manifest files `path` stands for.
fn manifest_files(path: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let read_err = |source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    };
    if !path.metadata().map_err(read_err)?.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(read_err)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) && p.is_file()
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Reads every object under `path`; fails on the first broken file.
pub fn load(path: &Path) -> Result<Objects, LoadError> {
    let mut objects = Objects::default();
    for file in manifest_files(path)? {
        let text = std::fs::read_to_string(&file).map_err(|source| LoadError::Read {
            path: file.clone(),
            source,
        })?;
        let used =
            manifest::parse_into(&text, &mut objects).map_err(|source| LoadError::Manifest {
                path: file.clone(),
                source: Box::new(source),
            })?;
        tracing::debug!(file = %file.display(), objects = used, "loaded manifests");
    }
    Ok(objects)
}

/// What changes when a manifest file changes: names, sizes, modification times.
fn fingerprint(path: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    manifest_files(path)
        .unwrap_or_default()
        .into_iter()
        .map(|f| {
            let meta = std::fs::metadata(&f).ok();
            let len = meta.as_ref().map_or(0, std::fs::Metadata::len);
            let mtime = meta.and_then(|m| m.modified().ok());
            (f, len, mtime)
        })
        .collect()
}

/// Polls `path` every `interval` and calls `apply` with the new objects after each
/// change that loads cleanly. Runs until the task is dropped.
pub async fn watch(path: PathBuf, interval: Duration, mut apply: impl FnMut(Objects)) {
    let mut seen = fingerprint(&path);
    loop {
        tokio::time::sleep(interval).await;
        crate::memory::trim_if_due();
        let now = fingerprint(&path);
        if now == seen {
            continue;
        }
        seen = now;
        match load(&path) {
            Ok(objects) => {
                tracing::info!(path = %path.display(), "registry changed: reloaded");
                apply(objects);
            }
            Err(e) => {
                tracing::error!(
                    "registry not reloaded, the last good table stays in service: {}",
                    crate::report(&e)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broken_file_is_named() {
        let dir = std::env::temp_dir().join(format!("registry-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("a.yaml"),
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: a}\nspec: {hosts: [a.test], addresses: [240.240.0.1]}\n",
        )
        .unwrap();
        std::fs::write(dir.join("notes.txt"), "not a manifest").unwrap();
        assert_eq!(load(&dir).unwrap().service_entries.len(), 1);
        let before = fingerprint(&dir);
        std::fs::write(dir.join("b.yml"), "spec: [").unwrap();
        assert_ne!(before, fingerprint(&dir));
        let err = crate::report(&load(&dir).unwrap_err()).to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(err.contains("b.yml"), "{err}");
    }
}
