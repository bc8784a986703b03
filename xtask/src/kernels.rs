//! `cargo xtask test --kernel 5.10|6.1|6.12|all`: the kernel-facing end-to-end suites
//! inside QEMU virtual machines booted with Debian's kernels, the way production nodes
//! run older LTS kernels than a developer's.
//!
//! Everything it needs is installed here, idempotently: QEMU, busybox and kmod from the
//! machine's apt sources; virtme-ng (which boots a kernel with the host's root file
//! system, read-only, and runs one command) in a virtualenv under target/; and each
//! kernel package, found and downloaded with an apt configuration of our own under
//! target/kernels/apt (bullseye for 5.10, bookworm for 6.1, bookworm-backports for
//! 6.12; the machine's own sources are never touched), unpacked with its modules under
//! target/kernels/<package>/.
//!
//! The host builds the daemon and the test binaries; each VM runs them as root with
//! `CI=true` (so a test that cannot run there fails, naming the kernel feature it lacks)
//! and `DNSPROXY_TEST_TIME_SCALE` (QEMU emulates the CPU: no KVM on these machines),
//! writes each suite's log and exit code into target/kernels/runs/<kernel>/, and a
//! summary per kernel is printed and written to target/kernels/summary.txt.
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};

use crate::{as_root, ensure_packages, ensure_python_venv, output_of, run, target_dir};

/// A kernel series of the matrix and where Debian ships it.
struct Series {
    name: &'static str,
    /// The Debian suite of its package.
    suite: &'static str,
    /// `apt-cache search --names-only` pattern of its image packages.
    pattern: &'static str,
}

const SERIES: [Series; 3] = [
    Series {
        name: "5.10",
        suite: "bullseye",
        pattern: r"^linux-image-5\.10\.0-[0-9]+-amd64(-unsigned)?$",
    },
    Series {
        name: "6.1",
        suite: "bookworm",
        pattern: r"^linux-image-6\.1\.0-[0-9]+-amd64(-unsigned)?$",
    },
    Series {
        name: "6.12",
        suite: "bookworm-backports",
        pattern: r"^linux-image-6\.12\.[0-9]+\+deb12-amd64(-unsigned)?$",
    },
];

/// The Debian mirror and the keyring that signs it (from `debian-archive-keyring`).
const MIRROR: &str = "http://deb.debian.org/debian";
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// Commands the VMs need on the host, and the Debian package of each.
const VM_TOOLS: [(&str, &str); 4] = [
    ("qemu-system-x86_64", "qemu-system-x86"),
    (KEYRING, "debian-archive-keyring"),
    ("busybox", "busybox-static"),
    // virtme-ng runs depmod on an unpacked kernel's modules.
    ("depmod", "kmod"),
];

/// virtme-ng, pinned.
const VIRTME_NG: &str = "virtme-ng==1.42";

/// How much slower than the host the VMs run (QEMU in TCG), unless
/// `DNSPROXY_TEST_TIME_SCALE` says otherwise.
const DEFAULT_TIME_SCALE: u32 = 4;

/// A suite: its test binary (tests/tests/<binary>.rs) and which of its tests run in a
/// VM (all when empty).
struct Suite {
    name: &'static str,
    tests: &'static [&'static str],
}

/// The kernel-facing suites. Node mode's subset is what crosses the kernel (capture
/// into pods' network namespaces, per-pod listeners and policy, VIPs per pod, the
/// pinned data path adopted across a restart); its other tests exercise the API
/// watches and the name table, which no kernel changes.
const SUITES: [Suite; 5] = [
    Suite {
        name: "redirect",
        tests: &[],
    },
    Suite {
        name: "vip",
        tests: &[],
    },
    Suite {
        name: "conformance",
        tests: &[],
    },
    Suite {
        name: "node",
        tests: &[
            "capture_policy_per_pod_namespace_and_istio_with_live_changes",
            "global_default_on_and_a_pod_that_goes_away",
            "per_pod_auto_allocation_opt_out_and_dns_debug_logs",
            "a_daemon_restart_keeps_pods_resolving_and_adopts_the_pinned_data_path",
            "a_recreated_pod_sandbox_is_captured_again_within_5s",
            "every_capture_change_a_pod_can_undergo_is_followed_from_its_own_events",
        ],
    },
    Suite {
        name: "upgrade",
        tests: &[],
    },
];

/// Longest a VM may run before it is killed (its unfinished suites then fail).
const VM_TIMEOUT: Duration = Duration::from_hours(1);

/// Runs `suites` (all when empty) on each kernel of `kernels` ("5.10", "6.1", "6.12",
/// "all", or a comma-separated list); fails when a suite failed anywhere.
pub(crate) fn test(root: &Path, kernels: &str, suites: &[String]) -> anyhow::Result<()> {
    let series = select_series(kernels)?;
    let suites = select_suites(suites)?;
    ensure_packages("VM tools", &VM_TOOLS)?;
    let vng = ensure_virtme(root)?;
    let apt = Apt::new(&target_dir(root).join("kernels/apt"))?;
    let kernels: Vec<Kernel> = series
        .iter()
        .map(|s| Kernel::fetch(root, &apt, s))
        .collect::<anyhow::Result<_>>()?;

    crate::cargo(root, &["build", "--package", "dnsproxy-userspace"])?;
    let binaries = test_binaries(root, &suites)?;
    let daemon = target_dir(root).join("debug/dnsproxy");

    let mut results = Vec::new();
    for kernel in &kernels {
        let out = target_dir(root).join("kernels/runs").join(kernel.series);
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        let script = guest_script(root, &out, &daemon, &suites, &binaries);
        let script_path = out.join("guest.sh");
        std::fs::write(&script_path, script)
            .with_context(|| format!("writing {}", script_path.display()))?;
        eprintln!(
            "xtask: booting {} ({}) and running {} in it",
            kernel.series,
            kernel.package,
            suites.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
        );
        boot(&vng, kernel, &out, &script_path)?;
        let result = KernelResult::read(kernel, &out, &suites);
        print!("{}", result.details());
        results.push(result);
    }
    let summary = summary(&results, &suites);
    print!("{summary}");
    let file = target_dir(root).join("kernels/summary.txt");
    std::fs::write(&file, &summary).with_context(|| format!("writing {}", file.display()))?;
    let failed: Vec<&str> = results
        .iter()
        .filter(|r| !r.passed())
        .map(|r| r.series)
        .collect();
    if !failed.is_empty() {
        bail!(
            "the kernel matrix failed on {} (logs in target/kernels/runs/)",
            failed.join(", ")
        );
    }
    Ok(())
}

fn select_series(kernels: &str) -> anyhow::Result<Vec<&'static Series>> {
    if kernels == "all" {
        return Ok(SERIES.iter().collect());
    }
    kernels
        .split(',')
        .map(|k| {
            SERIES.iter().find(|s| s.name == k.trim()).with_context(|| {
                let names: Vec<&str> = SERIES.iter().map(|s| s.name).collect();
                format!("no kernel {k}: one of {} or all", names.join(", "))
            })
        })
        .collect()
}

fn select_suites(names: &[String]) -> anyhow::Result<Vec<&'static Suite>> {
    if names.is_empty() {
        return Ok(SUITES.iter().collect());
    }
    names
        .iter()
        .flat_map(|n| n.split(','))
        .map(|n| {
            SUITES.iter().find(|s| s.name == n.trim()).with_context(|| {
                let all: Vec<&str> = SUITES.iter().map(|s| s.name).collect();
                format!("no suite {n}: one of {}", all.join(", "))
            })
        })
        .collect()
}

/// virtme-ng in target/vm-venv; returns the venv's bin directory.
fn ensure_virtme(root: &Path) -> anyhow::Result<PathBuf> {
    let venv = target_dir(root).join("vm-venv");
    let bin = venv.join("bin");
    let version = output_of(Command::new(bin.join("vng")).arg("--version")).unwrap_or_default();
    let want = VIRTME_NG.trim_start_matches("virtme-ng==");
    if version.contains(want) {
        eprintln!("xtask: virtme-ng {want}: present");
        return Ok(bin);
    }
    ensure_python_venv()?;
    eprintln!("xtask: installing {VIRTME_NG} into {}", venv.display());
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run(Command::new(bin.join("pip"))
        .args(["install", "-q"])
        .arg(VIRTME_NG))?;
    Ok(bin)
}

/// apt, pointed at target/kernels/apt and nothing else.
struct Apt {
    dir: PathBuf,
}

impl Apt {
    /// Writes the sources (every suite of the matrix) and refreshes the package lists
    /// when they are missing or a day old.
    fn new(dir: &Path) -> anyhow::Result<Self> {
        for sub in ["lists/partial", "cache/archives/partial", "debs"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        let mut sources = String::new();
        for s in &SERIES {
            let _ = writeln!(
                sources,
                "deb [signed-by={KEYRING}] {MIRROR} {} main",
                s.suite
            );
        }
        let list = dir.join("sources.list");
        let changed = std::fs::read_to_string(&list).ok().as_deref() != Some(sources.as_str());
        if changed {
            std::fs::write(&list, &sources)
                .with_context(|| format!("writing {}", list.display()))?;
        }
        let apt = Apt {
            dir: dir.to_path_buf(),
        };
        let stamp = dir.join("updated");
        let fresh = std::fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age < Duration::from_hours(24));
        if changed || !fresh {
            eprintln!(
                "xtask: refreshing the kernel package lists in {}",
                dir.display()
            );
            run(&mut apt.command("apt-get", &["update", "-q"]))?;
            std::fs::write(&stamp, "").with_context(|| format!("writing {}", stamp.display()))?;
        }
        Ok(apt)
    }

    /// `program` (apt-get, apt-cache) with this configuration, as root.
    fn command(&self, program: &str, args: &[&str]) -> Command {
        let d = |sub: &str| self.dir.join(sub).display().to_string();
        let mut cmd = as_root(Path::new(program));
        cmd.arg("-o")
            .arg(format!("Dir::Etc::sourcelist={}", d("sources.list")))
            .args(["-o", "Dir::Etc::sourceparts=/nonexistent"])
            .arg("-o")
            .arg(format!("Dir::State::Lists={}", d("lists")))
            .arg("-o")
            .arg(format!("Dir::Cache={}", d("cache")))
            .arg("-o")
            .arg(format!("Dir::Cache::archives={}", d("cache/archives")))
            .args(["-o", "APT::Sandbox::User=root"])
            .args(args);
        cmd
    }

    /// The newest image package of `series` in the lists.
    fn newest(&self, series: &Series) -> anyhow::Result<String> {
        let out =
            output_of(&mut self.command("apt-cache", &["search", "--names-only", series.pattern]))
                .with_context(|| format!("apt-cache search for {}", series.name))?;
        out.lines()
            .filter_map(|l| l.split_whitespace().next())
            .max_by_key(|name| version_key(name))
            .map(str::to_owned)
            .with_context(|| {
                format!(
                    "no package matches {} in {} {}",
                    series.pattern, MIRROR, series.suite
                )
            })
    }
}

/// The numbers of a package name, in order, then signed before unsigned: what makes
/// one kernel package newer than another of its series.
fn version_key(name: &str) -> (Vec<u64>, bool) {
    let numbers = name
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect();
    (numbers, !name.ends_with("-unsigned"))
}

/// A kernel unpacked under target/kernels/.
struct Kernel {
    series: &'static str,
    package: String,
    /// The image (`boot/vmlinuz-<release>`); its modules are in `lib/modules/` beside.
    image: PathBuf,
}

impl Kernel {
    /// The newest package of `series`, downloaded and unpacked unless it already is.
    fn fetch(root: &Path, apt: &Apt, series: &'static Series) -> anyhow::Result<Self> {
        let package = apt.newest(series)?;
        let tree = target_dir(root).join("kernels").join(&package);
        if let Some(image) = image_in(&tree) {
            eprintln!("xtask: kernel {} ({package}): present", series.name);
            return Ok(Kernel {
                series: series.name,
                package,
                image,
            });
        }
        let debs = apt.dir.join("debs");
        if find_deb(&debs, &package).is_none() {
            eprintln!(
                "xtask: downloading {package} from {MIRROR} {}",
                series.suite
            );
            run(apt
                .command("apt-get", &["download", "-q", &package])
                .current_dir(&debs))?;
        }
        let deb = find_deb(&debs, &package)
            .with_context(|| format!("apt-get download left no {package}_*.deb"))?;
        let partial = tree.with_extension("partial");
        let _ = std::fs::remove_dir_all(&partial);
        run(as_root(Path::new("dpkg-deb"))
            .arg("-x")
            .arg(&deb)
            .arg(&partial))?;
        std::fs::rename(&partial, &tree)
            .with_context(|| format!("moving {} into place", partial.display()))?;
        let image = image_in(&tree).with_context(|| format!("{package} has no boot/vmlinuz-*"))?;
        Ok(Kernel {
            series: series.name,
            package,
            image,
        })
    }
}

fn image_in(tree: &Path) -> Option<PathBuf> {
    std::fs::read_dir(tree.join("boot"))
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
}

fn find_deb(dir: &Path, package: &str) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with(&format!("{package}_")) && n.ends_with(".deb")
            })
        })
}

/// Builds the e2e test binaries of `suites`; returns (suite, executable).
fn test_binaries(
    root: &Path,
    suites: &[&'static Suite],
) -> anyhow::Result<Vec<(&'static str, PathBuf)>> {
    let mut cmd = Command::new(crate::env_or("CARGO", "cargo"));
    cmd.current_dir(root)
        .env("PATH", crate::path_with_cargo_bin())
        .args([
            "test",
            "--package",
            "dnsproxy-e2e",
            "--no-run",
            "--message-format=json",
        ]);
    for suite in suites {
        cmd.args(["--test", suite.name]);
    }
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "building the test binaries failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(exe)) = (msg["target"]["name"].as_str(), msg["executable"].as_str())
        else {
            continue;
        };
        if let Some(suite) = suites.iter().find(|s| s.name == name) {
            found.push((suite.name, PathBuf::from(exe)));
        }
    }
    for suite in suites {
        if !found.iter().any(|(n, _)| n == &suite.name) {
            bail!("cargo built no test binary for the {} suite", suite.name);
        }
    }
    Ok(found)
}

/// What the VM runs: bpffs, `dnsproxy check`, then each suite one test at a time (with
/// what passing tests print: their figures),
/// each writing `<suite>.log` and `<suite>.rc` ("<exit code> <seconds>") into `out`.
fn guest_script(
    root: &Path,
    out: &Path,
    daemon: &Path,
    suites: &[&'static Suite],
    binaries: &[(&'static str, PathBuf)],
) -> String {
    let scale = std::env::var("DNSPROXY_TEST_TIME_SCALE")
        .unwrap_or_else(|_| DEFAULT_TIME_SCALE.to_string());
    let mut s = format!(
        "#!/bin/sh\n\
         out='{out}'\n\
         export CI=true DNSPROXY_BIN='{daemon}' DNSPROXY_TEST_TIME_SCALE={scale}\n\
         export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
         mountpoint -q /sys/fs/bpf || mount -t bpf bpffs /sys/fs/bpf\n\
         uname -r > \"$out/release\"\n\
         \"$DNSPROXY_BIN\" check > \"$out/check.txt\" 2>&1; echo $? > \"$out/check.rc\"\n\
         cd '{tests}'\n",
        out = out.display(),
        daemon = daemon.display(),
        tests = root.join("tests").display(),
    );
    for suite in suites {
        let exe = binaries
            .iter()
            .find(|(n, _)| *n == suite.name)
            .map(|(_, e)| e.display().to_string())
            .unwrap_or_default();
        let filter = if suite.tests.is_empty() {
            String::new()
        } else {
            format!(" --exact {}", suite.tests.join(" "))
        };
        let _ = writeln!(
            s,
            "start=$(date +%s)\n\
             '{exe}' --test-threads=1 --show-output{filter} > \"$out/{name}.log\" 2>&1\n\
             echo \"$? $(( $(date +%s) - start ))\" > \"$out/{name}.rc\"",
            name = suite.name,
        );
    }
    s.push_str("echo done > \"$out/done\"\n");
    s
}

/// Boots `kernel` and runs `script` in it; the VM's console goes to `out/console.log`.
fn boot(vng_bin: &Path, kernel: &Kernel, out: &Path, script: &Path) -> anyhow::Result<()> {
    let path = std::env::join_paths(std::iter::once(vng_bin.to_path_buf()).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))
    .context("PATH")?;
    let console = std::fs::File::create(out.join("console.log")).context("console.log")?;
    let mut cmd = as_root(Path::new("env"));
    cmd.arg(format!("PATH={}", path.to_string_lossy()))
        .args([
            "timeout",
            "--kill-after=30",
            &VM_TIMEOUT.as_secs().to_string(),
        ])
        .arg(vng_bin.join("vng"))
        .arg("--run")
        .arg(&kernel.image)
        // No KVM on these machines: QEMU emulates the CPU (TCG).
        .args(["--disable-microvm", "--disable-kvm"])
        .args(["--memory", "2G", "--cpus", "2"])
        .arg(format!("--rwdir={}", out.display()))
        .arg("--exec")
        .arg(format!("sh {}", script.display()))
        .stdin(std::process::Stdio::null())
        .stdout(console.try_clone().context("console.log")?)
        .stderr(console);
    let started = std::time::Instant::now();
    // vng's own exit code is not the script's: the results are read from `out`.
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    eprintln!(
        "xtask: the {} VM ran {:.0?} ({status})",
        kernel.series,
        started.elapsed()
    );
    Ok(())
}

/// One suite's outcome in one VM.
struct SuiteResult {
    name: &'static str,
    passed: u64,
    failed: u64,
    /// `None`: it never finished (the VM stopped or timed out).
    exit: Option<i32>,
    secs: u64,
    failures: Vec<String>,
}

impl SuiteResult {
    fn ok(&self) -> bool {
        self.exit == Some(0) && self.failed == 0 && self.passed > 0
    }

    fn cell(&self) -> String {
        match self.exit {
            None => "did not finish".to_owned(),
            Some(_) if self.ok() => format!("{}/{} ok", self.passed, self.passed),
            Some(code) if self.passed + self.failed == 0 => format!("exit {code}"),
            Some(_) => format!("{}/{} FAILED", self.passed, self.passed + self.failed),
        }
    }
}

/// One kernel's outcome.
struct KernelResult {
    series: &'static str,
    package: String,
    release: String,
    check: String,
    check_ok: bool,
    suites: Vec<SuiteResult>,
}

impl KernelResult {
    fn read(kernel: &Kernel, out: &Path, suites: &[&'static Suite]) -> Self {
        let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap_or_default();
        let suites = suites
            .iter()
            .map(|suite| {
                let log = read(&format!("{}.log", suite.name));
                let rc = read(&format!("{}.rc", suite.name));
                let mut rc = rc.split_whitespace().map(str::parse::<i64>);
                let exit = rc
                    .next()
                    .and_then(Result::ok)
                    .and_then(|c| i32::try_from(c).ok());
                let secs = rc.next().and_then(Result::ok).unwrap_or(0);
                let (mut passed, mut failed) = (0, 0);
                for line in log.lines() {
                    if let Some(rest) = line.strip_prefix("test result: ") {
                        passed += crate::count_before(rest, " passed");
                        failed += crate::count_before(rest, " failed");
                    }
                }
                let failures = log
                    .lines()
                    .filter_map(|l| l.strip_prefix("test ")?.strip_suffix(" ... FAILED"))
                    .map(str::to_owned)
                    .collect();
                SuiteResult {
                    name: suite.name,
                    passed,
                    failed,
                    exit,
                    secs: secs.unsigned_abs(),
                    failures,
                }
            })
            .collect();
        KernelResult {
            series: kernel.series,
            package: kernel.package.clone(),
            release: read("release").trim().to_owned(),
            check: read("check.txt"),
            check_ok: read("check.rc").trim() == "0",
            suites,
        }
    }

    fn passed(&self) -> bool {
        self.check_ok && self.suites.iter().all(SuiteResult::ok)
    }

    /// `dnsproxy check` as the kernel answered it, and each suite's failures.
    fn details(&self) -> String {
        let mut s = format!(
            "\n=== {} ({}, running {}) ===\n$ dnsproxy check\n{}\n",
            self.series,
            self.package,
            if self.release.is_empty() {
                "?"
            } else {
                &self.release
            },
            self.check.trim_end()
        );
        for suite in &self.suites {
            let _ = writeln!(s, "{:<12} {} in {} s", suite.name, suite.cell(), suite.secs);
            for f in &suite.failures {
                let _ = writeln!(s, "    failed: {f}");
            }
        }
        s
    }
}

fn summary(results: &[KernelResult], suites: &[&'static Suite]) -> String {
    let mut s = String::from("\nkernel matrix (QEMU TCG, 2 vCPUs, tests one at a time)\n");
    let _ = write!(s, "{:<7} {:<22} {:<7}", "kernel", "release", "check");
    for suite in suites {
        let _ = write!(s, " {:<14}", suite.name);
    }
    s.push('\n');
    for r in results {
        let release = if r.release.is_empty() {
            "?"
        } else {
            &r.release
        };
        let check = if r.check_ok { "ok" } else { "FAILED" };
        let _ = write!(s, "{:<7} {release:<22} {check:<7}", r.series);
        for suite in &r.suites {
            let _ = write!(s, " {:<14}", suite.cell());
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_package_wins_and_signed_beats_unsigned() {
        let mut names = [
            "linux-image-6.12.57+deb12-amd64",
            "linux-image-6.12.95+deb12-amd64-unsigned",
            "linux-image-6.12.43+deb12-amd64",
        ];
        names.sort_by_key(|n| version_key(n));
        assert_eq!(names[2], "linux-image-6.12.95+deb12-amd64-unsigned");
        assert!(
            version_key("linux-image-5.10.0-32-amd64")
                > version_key("linux-image-5.10.0-32-amd64-unsigned")
        );
        assert!(
            version_key("linux-image-5.10.0-32-amd64") > version_key("linux-image-5.10.0-9-amd64")
        );
    }
}
