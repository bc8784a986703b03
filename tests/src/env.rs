//! [`TestEnv`]: everything one local-mode test needs.
use std::{
    path::PathBuf,
    process::{Command, Output, Stdio},
    time::Duration,
};

use crate::{
    ADMIN_ADDR, Cgroup, DEBUG_ADDR, Daemon, DaemonOptions, FakeDns, Netns, REGISTRY_YAML,
    dnsproxy_bin, http_get, run_with_timeout, stdout, unique_name,
};

// === impl TestEnv ===

/// Everything one test needs: netns, cgroup, fake cluster DNS, registry, pin dir.
pub struct TestEnv {
    pub fake: FakeDns,
    pub cgroup: Cgroup,
    pub netns: Netns,
    pub dir: PathBuf,
}

impl TestEnv {
    /// An environment whose registry holds [`REGISTRY_YAML`].
    pub fn new() -> Self {
        Self::with_registry(REGISTRY_YAML)
    }

    /// An environment whose registry directory holds `registry_yaml` as services.yaml.
    pub fn with_registry(registry_yaml: &str) -> Self {
        let netns = Netns::new();
        let cgroup = Cgroup::new();
        let fake = FakeDns::start(&netns);
        let dir = std::env::temp_dir().join(unique_name("d"));
        std::fs::create_dir_all(dir.join("registry")).unwrap();
        std::fs::write(dir.join("registry/services.yaml"), registry_yaml).unwrap();
        std::fs::write(
            dir.join("resolv.conf"),
            "nameserver 10.96.0.10\noptions timeout:2 attempts:1\n",
        )
        .unwrap();
        TestEnv {
            fake,
            cgroup,
            netns,
            dir,
        }
    }

    pub fn daemon_options(&self) -> DaemonOptions<'_> {
        DaemonOptions {
            netns: &self.netns,
            cgroup: &self.cgroup,
            pin_dir: PathBuf::from("/sys/fs/bpf").join(unique_name("p")),
            registry: Some(self.dir.join("registry")),
            env: Vec::new(),
            state_dir: self.dir.join("state"),
            inside_cgroup: false,
            dns_server_flags: true,
            extra_args: Vec::new(),
            wrapper: Vec::new(),
        }
    }

    pub fn start_daemon(&self) -> Daemon {
        Daemon::start(self.daemon_options())
    }

    /// Replaces the resolv.conf that [`TestEnv::captured_getent`] mounts.
    pub fn write_resolv_conf(&self, text: &str) {
        std::fs::write(self.dir.join("resolv.conf"), text).unwrap();
    }

    /// GET `path` on the daemon's admin endpoint, or for `/debug/*` its debug
    /// endpoint (inside the netns); the body.
    pub fn admin(&self, path: &'static str) -> String {
        let addr = if path.starts_with("/debug/") {
            DEBUG_ADDR
        } else {
            ADMIN_ADDR
        };
        let response = self
            .netns
            .within(move || http_get(addr, path))
            .unwrap_or_else(|| panic!("admin {path} did not answer"));
        response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default()
    }

    /// `dig` to the cluster DNS (10.96.0.10, 3 s, one try) from the captured cgroup;
    /// `args` follow the server.
    pub fn dig(&self, args: &[&str]) -> Output {
        let mut all = vec!["dig", "+time=3", "+tries=1", "@10.96.0.10"];
        all.extend_from_slice(args);
        self.captured(&all)
    }

    /// `python3 -c script` in the captured cgroup (with this env's resolv.conf when
    /// `resolv_conf`); its stdout, trimmed. A failing script fails the test.
    pub fn python(&self, script: &str, resolv_conf: bool) -> String {
        let args = ["python3", "-c", script];
        let out = if resolv_conf {
            self.captured_with_resolv_conf(&args)
        } else {
            self.captured(&args)
        };
        assert!(
            out.status.success(),
            "python failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            stdout(&out)
        );
        stdout(&out).trim().to_owned()
    }

    /// `args` run inside the netns and the captured cgroup.
    pub fn captured(&self, args: &[&str]) -> Output {
        let mut cmd = self.netns.command(dnsproxy_bin());
        cmd.arg("exec")
            .arg("--cgroup")
            .arg(&self.cgroup.path)
            .arg("--")
            .args(args);
        run_with_timeout(&mut cmd, Duration::from_secs(20))
    }

    /// `args` run inside the netns but outside the captured cgroup.
    pub fn uncaptured(&self, args: &[&str]) -> Output {
        let mut cmd = self.netns.command(args[0]);
        cmd.args(&args[1..]);
        run_with_timeout(&mut cmd, Duration::from_secs(20))
    }

    /// glibc `getent` inside the captured cgroup, see [`TestEnv::captured_with_resolv_conf`].
    pub fn captured_getent(&self, args: &[&str]) -> Output {
        let mut all = vec!["getent"];
        all.extend_from_slice(args);
        self.captured_with_resolv_conf(&all)
    }

    /// `args` inside the netns and the captured cgroup, with this env's resolv.conf
    /// bind-mounted over /etc/resolv.conf in a private mount namespace (glibc clients).
    pub fn captured_with_resolv_conf(&self, args: &[&str]) -> Output {
        run_with_timeout(
            &mut self.captured_with_resolv_conf_command(args),
            Duration::from_secs(20),
        )
    }

    /// The command [`TestEnv::captured_with_resolv_conf`] runs, to start in the
    /// background (stdout piped).
    pub fn captured_with_resolv_conf_command(&self, args: &[&str]) -> Command {
        captured_command(
            &self.netns,
            &self.cgroup,
            &self.dir.join("resolv.conf"),
            args,
        )
    }
}

/// `args` inside `netns` and `cgroup`, with `resolv_conf` bind-mounted over
/// /etc/resolv.conf in a private mount namespace (for glibc clients); stdout piped.
pub fn captured_command(
    netns: &Netns,
    cgroup: &Cgroup,
    resolv_conf: &std::path::Path,
    args: &[&str],
) -> Command {
    let mut cmd = netns.command("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount --bind "$1" /etc/resolv.conf && shift && exec "$@""#)
        .arg("sh")
        .arg(resolv_conf)
        .arg(dnsproxy_bin())
        .args(["exec", "--cgroup"])
        .arg(&cgroup.path)
        .arg("--")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

impl Default for TestEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
