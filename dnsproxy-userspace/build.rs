//! Builds the eBPF object (dnsproxy-ebpf) with the pinned nightly and bpf-linker, so the
//! daemon embeds it with `include_bytes_aligned!`. `cargo xtask` installs both.
use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir.join("../dnsproxy-ebpf");
    let common_dir = manifest_dir.join("../dnsproxy-common");
    let toolchain_file = ebpf_dir.join("bpf-toolchain");
    let toolchain = std::fs::read_to_string(&toolchain_file)
        .with_context(|| format!("reading {}", toolchain_file.display()))?;
    let toolchain = toolchain.trim();
    println!("cargo:rerun-if-changed={}", common_dir.display());
    println!("cargo:rerun-if-changed={}", toolchain_file.display());
    let root_dir = ebpf_dir
        .canonicalize()
        .with_context(|| format!("locating {}", ebpf_dir.display()))?;
    let root_dir = root_dir.to_str().context("non-UTF-8 path")?;
    aya_build::build_ebpf(
        [Package {
            name: "dnsproxy-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::Custom(toolchain),
    )
    .context(
        "building the eBPF object failed: run `cargo xtask setup` (pinned nightly + bpf-linker)",
    )
}
