//! The registry source for local mode: a YAML file, or every `*.yaml`/`*.yml` file of a
//! directory (sorted by name). A broken file fails the whole load, naming the file.
use std::path::{Path, PathBuf};

use super::{NameTable, manifest};

/// Errors loading manifests from disk.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The path or a file in it could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file's content is wrong.
    #[error("{path}: {source}")]
    Manifest {
        path: PathBuf,
        source: manifest::ManifestError,
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

/// Builds a name table from `path`.
pub fn load(path: &Path) -> Result<NameTable, LoadError> {
    let mut table = NameTable::default();
    for file in manifest_files(path)? {
        let text = std::fs::read_to_string(&file).map_err(|source| LoadError::Read {
            path: file.clone(),
            source,
        })?;
        let used = manifest::load_into(&text, &mut table).map_err(|source| {
            LoadError::Manifest {
                path: file.clone(),
                source,
            }
        })?;
        tracing::debug!(file = %file.display(), objects = used, "loaded manifests");
    }
    Ok(table)
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
        assert_eq!(load(&dir).unwrap().len(), 1);
        std::fs::write(dir.join("b.yml"), "spec: [").unwrap();
        let err = load(&dir).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(err.contains("b.yml"), "{err}");
    }
}
