//! `dnsproxy exec`: move this process into the capture cgroup, then become the command.
use std::{os::unix::process::CommandExt as _, path::Path};

use anyhow::{Context as _, bail};

/// Joins `cgroup` and executes `command`; returns only on failure.
pub fn exec_in_cgroup(cgroup: &Path, command: &[std::ffi::OsString]) -> anyhow::Result<()> {
    let procs = cgroup.join("cgroup.procs");
    if !procs.exists() {
        bail!(
            "{} is not a cgroup v2 directory: is `dnsproxy run` running (it creates the cgroup)?",
            cgroup.display()
        );
    }
    std::fs::write(&procs, std::process::id().to_string())
        .with_context(|| format!("cannot join {} (needs root)", cgroup.display()))?;
    let (program, args) = command.split_first().context("no command given")?;
    let err = std::process::Command::new(program).args(args).exec();
    Err(err).with_context(|| format!("cannot execute {}", program.to_string_lossy()))
}
