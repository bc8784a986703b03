//! `dnsproxy`: the eBPF-based transparent DNS interceptor. Parses the command line and
//! hands each subcommand to the library.
use std::process::ExitCode;

use clap::Parser as _;
use dnsproxy::{
    bpf::{features, pinned, system},
    cli::{CleanupArgs, Cli, Command, ExecArgs, MapsArgs},
    daemon, exec,
};

fn main() -> ExitCode {
    init_tracing();
    let result = match Cli::parse().command {
        Command::Run(args) => daemon::run_blocking(*args).map(|()| 0),
        Command::Exec(args) => exec_command(&args),
        Command::Maps(args) => maps(&args),
        Command::Cleanup(args) => cleanup(&args),
        Command::Check(_) => Ok(check()),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("dnsproxy: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Returns only when the command could not be started.
fn exec_command(args: &ExecArgs) -> anyhow::Result<u8> {
    let default = system::default_cgroup()?;
    exec::exec_in_cgroup(args.cgroup.as_deref().unwrap_or(&default), &args.command)?;
    Ok(127)
}

fn maps(args: &MapsArgs) -> anyhow::Result<u8> {
    let dump = pinned::dump(&args.pin_dir)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&dump)?);
    } else {
        print!("{dump}");
    }
    Ok(0)
}

/// Prints the feature table; 1 when a required feature is missing.
fn check() -> u8 {
    if system::require_root().is_err() {
        println!("not root: the probes that load programs or make cgroups fail with EPERM");
    }
    let report = features::Report::probe();
    println!("{report}");
    u8::from(!report.missing_required().is_empty())
}

fn cleanup(args: &CleanupArgs) -> anyhow::Result<u8> {
    let removed = pinned::remove_pins(&args.pin_dir)?;
    // The directory goes too when empty; a non-empty one is someone else's.
    let _ = std::fs::remove_dir(&args.pin_dir);
    println!("removed {removed} pins from {}", args.pin_dir.display());
    Ok(0)
}
