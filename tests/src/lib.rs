//! End-to-end harness: the real `dnsproxy` binary on the real kernel. Each test gets
//! its own network namespace (fake cluster DNS 10.96.0.10 / `fd00::10` on its `lo`), its
//! own cgroup v2 directory and its own bpffs pin directory, all with unique names and
//! all removed on drop, even when the test fails. Nothing is sent outside the netns.
use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

pub mod fake_dns;
pub mod fake_kube;
pub mod node;

pub use fake_dns::FakeDns;
pub use fake_kube::{FakeKube, Resource};
pub use node::{FakePod, NodeEnv};

/// The fake cluster DNS addresses every test netns has.
pub const CLUSTER_DNS_V4: &str = "10.96.0.10";
pub const CLUSTER_DNS_V6: &str = "fd00::10";

/// What the fake cluster DNS answers to every A / AAAA question.
pub const FAKE_A: &str = "10.99.99.99";
pub const FAKE_AAAA: &str = "fd00::99";

/// The registry every test daemon loads.
pub const REGISTRY_YAML: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: registry-test, namespace: default}
spec:
  hosts: [registry.test]
  addresses: [240.240.1.1, "2001:2::1:1"]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: STATIC
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: v4-only, namespace: default}
spec:
  hosts: [v4.registry.test]
  addresses: [240.240.1.2]
  resolution: STATIC
"#;

/// True when privileged tests can run. Outside CI, a missing privilege skips the test
/// with a message; under `CI=true` it fails the test, naming what is missing.
pub fn privileged() -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root".to_owned());
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        missing.push("kernel BTF (/sys/kernel/btf/vmlinux)".to_owned());
    }
    if cgroup2_root().is_none() {
        missing.push("a cgroup v2 mount".to_owned());
    }
    for tool in ["ip", "nsenter", "unshare", "dig", "python3", "getent"] {
        if !on_path(tool) {
            missing.push(format!("`{tool}` (run `cargo xtask setup --test-tools`)"));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("privileged e2e test needs: {}", missing.join(", "));
    assert!(
        !std::env::var("CI").is_ok_and(|v| v == "true"),
        "{msg} (CI=true: privileged tests must run here)"
    );
    eprintln!("SKIPPED: {msg}");
    false
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// The cgroup v2 mount point.
pub fn cgroup2_root() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

/// The dnsproxy binary: `$DNSPROXY_BIN` (set by `cargo xtask test`) or target/debug.
pub fn dnsproxy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("DNSPROXY_BIN") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let bin = target.join("debug/dnsproxy");
    assert!(
        bin.exists(),
        "{} missing: run `cargo xtask test` (it builds the binary first)",
        bin.display()
    );
    bin
}

/// A name unique to this process and call, short enough for every kernel name limit.
pub fn unique_name(tag: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "dpt{}{}{}",
        tag,
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `cmd`, killing it after `limit`. Panics if it cannot start.
pub fn run_with_timeout(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err_reader = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    }
}

fn must(cmd: &mut Command) {
    let out = run_with_timeout(cmd, Duration::from_secs(20));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// === impl Netns ===

/// A network namespace with `lo` up and the fake cluster DNS addresses on it.
pub struct Netns {
    pub name: String,
    pub path: PathBuf,
}

impl Netns {
    pub fn new() -> Self {
        let name = unique_name("n");
        must(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns {
            path: PathBuf::from(format!("/run/netns/{name}")),
            name,
        };
        must(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
        must(Command::new("ip").args([
            "-n",
            &ns.name,
            "addr",
            "add",
            "10.96.0.10/32",
            "dev",
            "lo",
        ]));
        // A second "cluster DNS" address, for upstream failover tests.
        must(Command::new("ip").args([
            "-n",
            &ns.name,
            "addr",
            "add",
            "10.96.0.11/32",
            "dev",
            "lo",
        ]));
        must(Command::new("ip").args([
            "-n",
            &ns.name,
            "-6",
            "addr",
            "add",
            "fd00::10/128",
            "dev",
            "lo",
            "nodad",
        ]));
        ns
    }

    /// Puts `cidr` (e.g. `203.0.113.10/32`, `2001:db8::10/128`) on this netns's `lo`.
    pub fn add_addr(&self, cidr: &str) {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", &self.name, "addr", "add", cidr, "dev", "lo"]);
        if cidr.contains(':') {
            cmd.arg("nodad");
        }
        must(&mut cmd);
    }

    /// `program` run inside this netns (`nsenter --net`, which keeps /sys mounts intact).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path.display()))
            .arg(program);
        cmd
    }

    /// Runs `f` on a thread that has entered this netns: sockets it creates live here.
    pub fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file = File::open(&self.path).expect("open netns");
        thread::spawn(move || {
            // SAFETY: setns on a valid netns fd; affects only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread panicked")
    }
}

impl Default for Netns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
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
}

impl Daemon {
    pub fn start(opts: DaemonOptions<'_>) -> Self {
        let log = std::env::temp_dir().join(format!("{}.log", unique_name("log")));
        let bin = dnsproxy_bin();
        let mut cmd = opts.netns.command(&bin);
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
            .args(["--upstream-timeout-ms", "1000", "--registry-poll-ms", "200"])
            .args(&opts.extra_args)
            .env("RUST_LOG", "info,dns=debug")
            .envs(opts.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(File::create(&log).unwrap())
            .stderr(File::create(&log).unwrap());
        let child = cmd.spawn().expect("start dnsproxy");
        let mut daemon = Daemon {
            child: Some(child),
            log,
            pin_dir: opts.pin_dir,
            hand_over: false,
        };
        daemon.wait_ready(opts.netns);
        daemon
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_ready(&mut self, netns: &Netns) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("dnsproxy exited early ({status}):\n{}", self.log_text());
            }
            let ready = netns.within(|| http_get("127.0.0.1:15021", "/readyz"));
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
        let mut child = self.child.take().expect("daemon running");
        // SAFETY: plain kill(2) on our child (nsenter execs dnsproxy in place).
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("dnsproxy did not stop on SIGTERM:\n{}", self.log_text());
            }
            thread::sleep(Duration::from_millis(20));
        }
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
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

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
        }
    }

    pub fn start_daemon(&self) -> Daemon {
        Daemon::start(self.daemon_options())
    }

    /// Replaces the resolv.conf that [`TestEnv::captured_getent`] mounts.
    pub fn write_resolv_conf(&self, text: &str) {
        std::fs::write(self.dir.join("resolv.conf"), text).unwrap();
    }

    /// GET `path` on the daemon's admin endpoint (inside the netns); the body.
    pub fn admin(&self, path: &'static str) -> String {
        let response = self
            .netns
            .within(move || http_get("127.0.0.1:15021", path))
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
        let mut cmd = self.netns.command("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount --bind "$1" /etc/resolv.conf && shift && exec "$@""#)
            .arg("sh")
            .arg(self.dir.join("resolv.conf"))
            .arg(dnsproxy_bin())
            .args(["exec", "--cgroup"])
            .arg(&self.cgroup.path)
            .arg("--")
            .args(args);
        run_with_timeout(&mut cmd, Duration::from_secs(20))
    }
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

/// stdout as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The addresses in dig's ANSWER section (A/AAAA records), in order.
pub fn dig_answers(out: &Output) -> Vec<String> {
    stdout(out)
        .lines()
        .filter(|l| !l.starts_with(';'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 5 && (f[3] == "A" || f[3] == "AAAA")).then(|| f[4].to_owned())
        })
        .collect()
}

/// dig's `;; SERVER:` line.
pub fn dig_server(out: &Output) -> String {
    stdout(out)
        .lines()
        .find(|l| l.starts_with(";; SERVER:"))
        .unwrap_or("")
        .to_owned()
}

/// Shared stop flag + counter, used by the fake servers.
#[derive(Clone, Default)]
pub struct Signal {
    pub stop: Arc<AtomicBool>,
    pub count: Arc<AtomicUsize>,
}

/// A TCP server at `addr` inside `netns` that writes `hello from <addr>` to every
/// connection and closes it; stops when dropped.
pub struct BannerServer {
    signal: Signal,
    thread: Option<thread::JoinHandle<()>>,
}

impl BannerServer {
    pub fn start(netns: &Netns, addr: &str) -> Self {
        let addr: SocketAddr = addr.parse().unwrap();
        let (_udp, tcp) = bind_in(netns, addr);
        tcp.set_nonblocking(true).unwrap();
        let signal = Signal::default();
        let s = signal.clone();
        let thread = thread::spawn(move || {
            while !s.stop.load(Ordering::SeqCst) {
                match tcp.accept() {
                    Ok((mut stream, peer)) => {
                        s.count.fetch_add(1, Ordering::SeqCst);
                        // One write: the client may read a single segment.
                        let _ =
                            stream.write_all(format!("hello from {addr} to {peer}\n").as_bytes());
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        BannerServer {
            signal,
            thread: Some(thread),
        }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.signal.count.load(Ordering::SeqCst)
    }
}

impl Drop for BannerServer {
    fn drop(&mut self) {
        self.signal.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A UDP server at `addr` inside `netns` answering `echo from <addr>: <data>`.
pub struct UdpEcho {
    signal: Signal,
    thread: Option<thread::JoinHandle<()>>,
}

impl UdpEcho {
    pub fn start(netns: &Netns, addr: &str) -> Self {
        let addr: SocketAddr = addr.parse().unwrap();
        let (udp, _tcp) = bind_in(netns, addr);
        udp.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let signal = Signal::default();
        let s = signal.clone();
        let thread = thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.stop.load(Ordering::SeqCst) {
                if let Ok((n, from)) = udp.recv_from(&mut buf) {
                    let mut reply = format!("echo from {addr}: ").into_bytes();
                    reply.extend_from_slice(&buf[..n]);
                    let _ = udp.send_to(&reply, from);
                }
            }
        });
        UdpEcho {
            signal,
            thread: Some(thread),
        }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.signal.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Binds a UDP socket and a TCP listener at `addr` inside `netns`.
pub fn bind_in(netns: &Netns, addr: SocketAddr) -> (UdpSocket, TcpListener) {
    netns.within(move || {
        let u = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
        let t = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind tcp {addr}: {e}"));
        (u, t)
    })
}
