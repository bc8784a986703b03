//! Resolvers other than glibc's, as the autopath test runs them: small programs in
//! `tests/clients/`, built on first use (musl's getaddrinfo, statically with
//! `musl-gcc`; c-ares's `ares_getaddrinfo`, with `cc -lcares`), each reading
//! /etc/resolv.conf itself as an application linked against it does.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// A resolver client: `(name, command)`, run as `command NAME`; it prints one address
/// per line.
#[derive(Clone, Copy, Debug)]
pub enum Client {
    /// `getent ahosts` (glibc's getaddrinfo).
    Glibc,
    Musl,
    CAres,
}

impl Client {
    pub const ALL: [Client; 3] = [Client::Glibc, Client::Musl, Client::CAres];

    pub fn name(self) -> &'static str {
        match self {
            Client::Glibc => "glibc",
            Client::Musl => "musl",
            Client::CAres => "c-ares",
        }
    }

    /// The command line that looks `name` up.
    pub fn command(self, name: &str) -> Vec<String> {
        match self {
            Client::Glibc => vec!["getent".into(), "ahosts".into(), name.into()],
            Client::Musl => {
                let built = built("getaddrinfo.c", "musl", &["musl-gcc", "-static"], &[]);
                vec![built.display().to_string(), name.into()]
            }
            Client::CAres => {
                let built = built("ares_getaddrinfo.c", "c-ares", &["cc"], &["-lcares"]);
                vec![built.display().to_string(), name.into()]
            }
        }
    }
}

/// `tests/clients/<source>` built with `compiler` (and linked with `libraries`) for
/// `kind` under `target/`, again only when the source is newer: built under a name of
/// its own and renamed into place, so tests running side by side never see half a
/// binary.
fn built(source: &str, kind: &str, compiler: &[&str], libraries: &[&str]) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/e2e-clients");
    std::fs::create_dir_all(&dir).expect("a directory for the built clients");
    let out = dir.join(format!("client-{kind}"));
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("clients")
        .join(source);
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if modified(&out).is_some_and(|built| modified(&src).is_some_and(|src| built >= src)) {
        return out;
    }
    let partial = dir.join(format!("client-{kind}.{}", std::process::id()));
    let mut cmd = Command::new(compiler[0]);
    cmd.args(&compiler[1..])
        .args(["-O1", "-o"])
        .arg(&partial)
        .arg(&src)
        .args(libraries);
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("build {source} for {kind} (cargo xtask setup --test-tools): {e}")
    });
    assert!(status.success(), "build {source} for {kind}: {status}");
    std::fs::rename(&partial, &out).expect("put the client in place");
    out
}
