//! A `dnsproxy run` per test, its admin endpoint and its pinned maps.
use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{
    ADMIN_ADDR, CLUSTER_DNS_V4, CLUSTER_DNS_V6, Cgroup, Netns, dnsproxy_bin, run_with_timeout,
    unique_name,
};

// === impl Daemon ===

/// A running `dnsproxy run` inside a test netns.
pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
    pub pin_dir: PathBuf,
    /// Leave the pins to the next daemon instead of cleaning up on drop.
    hand_over: bool,
}

/// How to start a daemon.
pub struct DaemonOptions<'a> {
    pub netns: &'a Netns,
    pub cgroup: &'a Cgroup,
    pub pin_dir: PathBuf,
    /// Local mode's registry (node mode reads the fake API instead).
    pub registry: Option<PathBuf>,
    /// Extra environment (KUBECONFIG, `NODE_NAME`, `RUST_LOG` overrides).
    pub env: Vec<(String, String)>,
    /// State directory (auto-allocated VIPs).
    pub state_dir: PathBuf,
    /// Run the daemon itself inside the captured cgroup.
    pub inside_cgroup: bool,
    /// Pass `--dns-server 10.96.0.10 --dns-server fd00::10` (else the daemon finds them).
    pub dns_server_flags: bool,
    pub extra_args: Vec<String>,
    /// A program the daemon runs under (`setpriv …`), inside the netns.
    pub wrapper: Vec<String>,
}

impl Daemon {
    pub fn start(opts: DaemonOptions<'_>) -> Self {
        let netns = opts.netns;
        // The admin address the test chose, else the default.
        let admin = opts
            .extra_args
            .iter()
            .position(|a| a == "--admin")
            .and_then(|i| opts.extra_args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| ADMIN_ADDR.to_owned());
        let mut daemon = Self::spawn(opts);
        daemon.wait_ready(netns, &admin);
        daemon
    }

    /// Starts the daemon without waiting for it to be ready (one that is not to be).
    pub fn spawn(opts: DaemonOptions<'_>) -> Self {
        let log = std::env::temp_dir().join(format!("{}.log", unique_name("log")));
        let bin = dnsproxy_bin();
        let mut cmd = match opts.wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = opts.netns.command(program);
                cmd.args(args).arg(&bin);
                cmd
            }
            None => opts.netns.command(&bin),
        };
        if opts.inside_cgroup {
            cmd.arg("exec")
                .arg("--cgroup")
                .arg(&opts.cgroup.path)
                .arg("--")
                .arg(&bin);
        }
        cmd.arg("run")
            .arg("--cgroup")
            .arg(&opts.cgroup.path)
            .args(if opts.dns_server_flags {
                &[
                    "--dns-server",
                    CLUSTER_DNS_V4,
                    "--dns-server",
                    CLUSTER_DNS_V6,
                ][..]
            } else {
                &[][..]
            })
            .args(
                opts.registry
                    .iter()
                    .flat_map(|r| [std::ffi::OsStr::new("--registry"), r.as_os_str()]),
            )
            .arg("--pin-dir")
            .arg(&opts.pin_dir)
            .arg("--state-dir")
            .arg(&opts.state_dir)
            .args(["--registry-poll-ms", "200"])
            // A short upstream timeout keeps failure tests quick, unless a test sets one.
            .args(
                (!opts.extra_args.iter().any(|a| a == "--upstream-timeout-ms"))
                    .then_some(["--upstream-timeout-ms", "1000"])
                    .into_iter()
                    .flatten(),
            )
            // Upstream TTLs of a second or two are followed, unless a test sets a floor.
            .args(
                (!opts
                    .extra_args
                    .iter()
                    .any(|a| a == "--dns-refresh-floor-secs"))
                .then_some(["--dns-refresh-floor-secs", "0"])
                .into_iter()
                .flatten(),
            )
            // SIGTERM stops at once unless a test waits for a successor.
            .args(
                (!opts.extra_args.iter().any(|a| a == "--handoff-wait-ms"))
                    .then_some(["--handoff-wait-ms", "0"])
                    .into_iter()
                    .flatten(),
            )
            .args(&opts.extra_args)
            .env("RUST_LOG", "info,dns=debug")
            .envs(opts.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(File::create(&log).unwrap())
            .stderr(File::create(&log).unwrap());
        let child = cmd.spawn().expect("start dnsproxy");
        Daemon {
            child: Some(child),
            log,
            pin_dir: opts.pin_dir,
            hand_over: false,
        }
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with the log unless it holds `needle`.
    pub fn assert_logged(&self, needle: &str) {
        let log = self.log_text();
        assert!(log.contains(needle), "no {needle:?} in the log:\n{log}");
    }

    fn wait_ready(&mut self, netns: &Netns, admin: &str) {
        let deadline = Instant::now() + crate::scaled(Duration::from_secs(30));
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("dnsproxy exited early ({status}):\n{}", self.log_text());
            }
            let addr = admin.to_owned();
            let ready = netns.within(move || http_get(&addr, "/readyz"));
            if ready
                .as_deref()
                .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "dnsproxy not ready in 30 s:\n{}",
                self.log_text()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and waits for the exit; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.terminate();
        self.wait_exit(Duration::from_secs(10))
    }

    /// The daemon's process id (nsenter and `dnsproxy exec` exec it in place).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// SIGKILL, as a crash or an OOM kill would: no cleanup; the pins stay.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("daemon running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Sends SIGTERM (without waiting); returns the instant it was sent.
    pub fn terminate(&mut self) -> Instant {
        let child = self.child.as_ref().expect("daemon running");
        let sent = Instant::now();
        // SAFETY: plain kill(2) on our child (nsenter execs dnsproxy in place).
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        sent
    }

    /// Waits for the daemon to exit; panics with its log after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        let deadline = Instant::now() + crate::scaled(limit);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("dnsproxy did not stop on SIGTERM:\n{}", self.log_text());
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for a daemon that handed its sockets to a successor to exit (local mode
    /// exits by itself); its pins are the successor's now.
    pub fn wait_handed_over(&mut self, limit: Duration) -> std::process::ExitStatus {
        self.hand_over = true;
        self.wait_exit(limit)
    }

    /// Stops the daemon and leaves its pinned state for a successor (node mode).
    pub fn stop_and_hand_over(&mut self) -> std::process::ExitStatus {
        self.hand_over = true;
        self.stop()
    }

    /// `dnsproxy maps --json` for this daemon's pins.
    pub fn maps_json(&self) -> String {
        let out = run_with_timeout(
            Command::new(dnsproxy_bin())
                .args(["maps", "--json", "--pin-dir"])
                .arg(&self.pin_dir),
            Duration::from_secs(10),
        );
        assert!(
            out.status.success(),
            "maps: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The backends (`ip:port`) translated for `vip`, every port, from `dnsproxy maps --json`.
    pub fn backends(&self, vip: &str) -> Vec<String> {
        let maps: serde_json::Value = serde_json::from_str(&self.maps_json()).unwrap();
        maps["services"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["vip"] == vip)
            .flat_map(|s| s["backends"].as_array().cloned().unwrap_or_default())
            .filter_map(|b| b.as_str().map(str::to_owned))
            .collect()
    }

    /// One eBPF counter from `dnsproxy maps --json`.
    pub fn counter(&self, name: &str) -> u64 {
        json_counter(&self.maps_json(), name)
    }
}

/// Reads `"name": N` from the `counters` object of `dnsproxy maps --json`.
pub fn json_counter(json: &str, name: &str) -> u64 {
    let counters = &json[json.find("\"counters\"").expect("counters in maps output")..];
    let key = format!("\"{name}\":");
    let at = counters
        .find(&key)
        .unwrap_or_else(|| panic!("no counter {name} in {json}"));
    counters[at + key.len()..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if !self.hand_over {
            let _ = Command::new(dnsproxy_bin())
                .args(["cleanup", "--pin-dir"])
                .arg(&self.pin_dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = std::fs::remove_dir_all(&self.pin_dir);
        }
        if thread::panicking() {
            eprintln!("dnsproxy log kept at {}", self.log.display());
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// A minimal HTTP GET (the admin endpoint); the whole response as text.
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    let addr: SocketAddr = addr.parse().ok()?;
    let mut s =
        TcpStream::connect_timeout(&addr, crate::scaled(Duration::from_millis(500))).ok()?;
    s.set_read_timeout(Some(crate::scaled(Duration::from_secs(2))))
        .ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// The time between the first log lines containing `from` and `to`.
pub fn log_gap(log: &str, from: &str, to: &str) -> Duration {
    let at = |needle: &str| {
        log.lines()
            .find(|l| l.contains(needle))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|ts| {
                // 2026-11-26T06:14:33.017226Z: seconds of the day are enough here.
                let time = ts.split('T').nth(1)?.trim_end_matches('Z');
                let mut parts = time.split(':');
                let (h, m, s): (f64, f64, f64) = (
                    parts.next()?.parse().ok()?,
                    parts.next()?.parse().ok()?,
                    parts.next()?.parse().ok()?,
                );
                Some(h * 3600.0 + m * 60.0 + s)
            })
    };
    match (at(from), at(to)) {
        (Some(a), Some(b)) if b >= a => Duration::from_secs_f64(b - a),
        _ => Duration::ZERO,
    }
}
