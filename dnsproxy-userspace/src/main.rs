//! `dnsproxy`: the eBPF-based transparent DNS interceptor.
mod admin;
mod bpf;
mod cli;
mod dns;
mod exec;
mod registry;
mod resolv_conf;
mod upstream_addr;
mod vip;

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::Context as _;
use clap::Parser as _;

use crate::{
    bpf::{
        datapath::{DataPath, DataPathOptions},
        pinned, system,
    },
    cli::{Cli, Command, RunArgs},
    dns::{
        cache::Cache, forwarder::Forwarder, handler::Handler, local::ClientContext,
        metrics::Metrics, server::Listeners,
    },
    registry::{
        Registry, TableConfig, allocator::VipAllocator, manifest::Objects, table::normalize,
    },
};

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Exec(args) => system::default_cgroup()
            .map_err(anyhow::Error::from)
            .and_then(|default| {
                exec::exec_in_cgroup(args.cgroup.as_deref().unwrap_or(&default), &args.command)
            })
            .map(|()| 127),
        Command::Maps(args) => pinned::dump(&args.pin_dir)
            .map_err(anyhow::Error::from)
            .and_then(|dump| {
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&dump)?);
                } else {
                    print!("{dump}");
                }
                Ok(0)
            }),
        Command::Cleanup(args) => pinned::remove_pins(&args.pin_dir)
            .map(|n| {
                let _ = std::fs::remove_dir(&args.pin_dir);
                println!("removed {n} pins from {}", args.pin_dir.display());
                0
            })
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("dnsproxy: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<u8> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run_async(args))
}

async fn run_async(args: RunArgs) -> anyhow::Result<u8> {
    system::require_root()?;
    system::require_btf()?;
    let objects = match &args.registry {
        Some(path) => registry::files::load(path)
            .with_context(|| format!("loading the registry {}", path.display()))?,
        None => Objects::default(),
    };
    let allocator = VipAllocator::load(&args.state_dir)?;
    let registry = Arc::new(Registry::new(
        &objects,
        allocator,
        TableConfig {
            cluster_domain: args.cluster_domain.clone(),
        },
    )?);
    let cgroup = match &args.cgroup {
        Some(c) => c.clone(),
        None => system::default_cgroup()?,
    };
    system::ensure_cgroup(&cgroup)?;
    let dns_servers = if args.dns_servers.is_empty() {
        resolv_conf::read_nameservers(&args.resolv_conf)?
    } else {
        args.dns_servers.clone()
    };
    let upstreams: Vec<SocketAddr> = if args.upstreams.is_empty() {
        dns_servers
            .iter()
            .map(|ip| SocketAddr::new(*ip, 53))
            .collect()
    } else {
        args.upstreams.iter().map(|u| u.0).collect()
    };

    let listeners = Listeners::bind(args.listen_port).await?;
    let admin_listener = admin::bind(args.admin).await?;

    tracing::info!(
        cgroup = %cgroup.display(),
        dns_servers = ?dns_servers,
        upstreams = ?upstreams,
        listen = ?listeners.local_addrs(),
        admin = %args.admin,
        pin_dir = %args.pin_dir.display(),
        vip_state = %args.state_dir.join("vips.json").display(),
        namespace = %args.namespace,
        hosts = registry.table().len(),
        "starting dnsproxy (local mode)"
    );

    let datapath = DataPath::start(&DataPathOptions {
        cgroup: cgroup.clone(),
        pin_dir: args.pin_dir.clone(),
        listen_port: args.listen_port,
        dns_servers: dns_servers.clone(),
        capture_all: true,
    })?;

    let metrics = Arc::new(Metrics::new(&upstreams));
    let forwarder = Arc::new(Forwarder::new(
        upstreams,
        Duration::from_millis(args.upstream_timeout_ms),
        args.upstream_parallel,
        metrics.clone(),
    ));
    let handler = Arc::new(Handler::new(
        registry.clone(),
        forwarder.clone(),
        Cache::new(args.cache_size),
        args.ttl,
        metrics.clone(),
    ));
    let admin_state = Arc::new(admin::AdminState {
        ready: Default::default(),
        metrics,
        handler: handler.clone(),
        registry: registry.clone(),
        pin_dir: args.pin_dir.clone(),
    });
    let ctx = Arc::new(ClientContext {
        namespace: args.namespace.clone(),
        extra_search: args.search_domains.iter().map(|d| normalize(d)).collect(),
    });

    let watch_task = args.registry.clone().map(|path| {
        let registry = registry.clone();
        tokio::spawn(registry::files::watch(
            path,
            Duration::from_millis(args.registry_poll_ms),
            move |objects| {
                if let Err(e) = registry.update(&objects) {
                    tracing::error!(
                        "registry not updated, the last good table stays in service: {e}"
                    );
                }
            },
        ))
    });
    let dns_task = tokio::spawn(listeners.serve(handler, ctx));
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin_state.clone()));
    let (first_sync, synced) = tokio::sync::oneshot::channel();
    let vip_task = tokio::spawn(
        vip::sync::BackendSync {
            registry: registry.clone(),
            forwarder,
            pin_dir: args.pin_dir.clone(),
        }
        .run(first_sync),
    );
    // Ready once VIPs have their first backends (bounded: resolution has timeouts).
    let _ = synced.await;
    admin_state.ready.store(true, Ordering::Release);
    tracing::info!(
        "ready: DNS to {dns_servers:?} from {} is redirected here",
        cgroup.display()
    );

    let signal = shutdown_signal().await;
    tracing::info!("{signal}: shutting down");
    admin_state.ready.store(false, Ordering::Release);
    dns_task.abort();
    admin_task.abort();
    vip_task.abort();
    if let Some(t) = watch_task {
        t.abort();
    }
    datapath.shutdown(args.keep_pins)?;
    Ok(0)
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
