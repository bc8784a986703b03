//! End-to-end harness: the real `dnsproxy` binary on the real kernel. Each test gets
//! its own network namespace (fake cluster DNS 10.96.0.10 / `fd00::10` on its `lo`), its
//! own cgroup v2 directory and its own bpffs pin directory, all with unique names and
//! all removed on drop, even when the test fails. Nothing is sent outside the netns.
use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
};

mod cgroup;
pub mod clients;
mod daemon;
mod dig;
mod env;
pub mod fake_dns;
pub mod fake_kube;
pub mod load;
mod netns;
pub mod node;
mod process;
pub mod rbac;
mod servers;

pub use cgroup::{Cgroup, cgroup2_root};
pub use daemon::{Daemon, DaemonOptions, http_get, json_counter, log_gap};
pub use dig::{dig_answers, dig_authority, dig_server, dig_status};
pub use env::{TestEnv, captured_command};
pub use fake_dns::FakeDns;
pub use fake_kube::{FakeKube, Resource};
pub use netns::{Netns, bind_in};
pub use node::{FakePod, NodeEnv, remote_pod, vm_entry};
pub(crate) use process::must;
pub use process::{run_with_timeout, stdout};
pub use servers::{BannerServer, EnvoyStub, Signal, UdpEcho};

/// The fake cluster DNS addresses every test netns has.
pub const CLUSTER_DNS_V4: &str = "10.96.0.10";
pub const CLUSTER_DNS_V6: &str = "fd00::10";

/// The daemon's admin endpoint (probes, metrics) and debug endpoint, in its netns.
pub const ADMIN_ADDR: &str = "127.0.0.1:15191";
pub const DEBUG_ADDR: &str = "127.0.0.1:15192";

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

/// A registry of `hosts` names (`h<i>.scale.example`) in one STATIC entry backed by
/// 203.0.113.10: each gets an auto-allocated VIP and its IPv6 twin.
pub fn scale_registry(hosts: usize) -> String {
    let names: Vec<String> = (0..hosts).map(|i| format!("h{i}.scale.example")).collect();
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: scale}}\n\
         spec:\n  hosts: [{}]\n  ports: [{{number: 443, name: tls, protocol: TLS}}]\n  \
         resolution: STATIC\n  endpoints: [{{address: 203.0.113.10}}]\n",
        names.join(", ")
    )
}

/// A registry of `hosts` ServiceEntries (`e<i>`) of one host each (`h<i>.scale.example`,
/// STATIC, one endpoint of its own in 198.18.0.0/15, an auto-allocated VIP), in 100
/// namespaces: the shape clusters have.
pub fn entry_per_host_registry(hosts: usize) -> String {
    use std::fmt::Write as _;
    let mut text = String::with_capacity(hosts * 230);
    for i in 0..hosts {
        let _ = write!(
            text,
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
             metadata: {{name: e{i}, namespace: ns-{}}}\n\
             spec: {{hosts: [h{i}.scale.example], ports: [{{number: 443, name: tls, protocol: TLS}}], \
             resolution: STATIC, endpoints: [{{address: 198.{}.{}.{}}}]}}\n",
            i % 100,
            18 + i / 65_536,
            (i / 256) % 256,
            i % 256
        );
    }
    text
}

/// How many times slower than this machine the tests run: `DNSPROXY_TEST_TIME_SCALE`,
/// 1 unless set. `cargo xtask test --kernel` sets it for its VMs, where QEMU emulates
/// the CPU (no KVM) and everything takes ten times longer or more. Deadlines that tests
/// wait on are multiplied by it ([`scaled`]) and load rates divided; what is asserted
/// besides time stays the same.
pub fn time_scale() -> u32 {
    static SCALE: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *SCALE.get_or_init(|| {
        std::env::var("DNSPROXY_TEST_TIME_SCALE")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|s| *s >= 1)
            .unwrap_or(1)
    })
}

/// `d` times [`time_scale`].
pub fn scaled(d: std::time::Duration) -> std::time::Duration {
    d * time_scale()
}

/// For tests that load both cores on purpose: one at a time within their test binary,
/// so that their figures measure the daemon and not each other.
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

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
        missing.extend(kernel_features_missing());
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

/// What `dnsproxy check` says this kernel lacks (its `missing:` line), asked once.
fn kernel_features_missing() -> Option<String> {
    static MISSING: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    MISSING
        .get_or_init(|| {
            let out = std::process::Command::new(dnsproxy_bin())
                .arg("check")
                .output()
                .ok()?;
            if out.status.success() {
                return None;
            }
            let text = String::from_utf8_lossy(&out.stdout);
            let line = text.lines().find(|l| l.starts_with("missing: "))?;
            Some(format!("kernel features ({line})"))
        })
        .clone()
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
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
