//! `dnsproxy`: the eBPF-based transparent DNS interceptor.
mod admin;
mod bpf;
mod cli;
mod cluster;
mod dns;
mod exec;
mod netns;
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
use arc_swap::ArcSwap;
use clap::Parser as _;

use crate::{
    bpf::{
        datapath::{DataPath, DataPathOptions},
        pinned, system,
    },
    cli::{Cli, Command, Mode, RunArgs, Switch},
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
    let node = args.mode == Mode::Node;

    // Everything that can fail on bad input is checked before anything is attached.
    let objects = match (&args.registry, node) {
        (Some(_), true) => {
            anyhow::bail!("--registry is for local mode; node mode reads the Kubernetes API")
        }
        (Some(path), false) => registry::files::load(path)
            .with_context(|| format!("loading the registry {}", path.display()))?,
        (None, _) => Objects::default(),
    };
    let kube_client = if node {
        Some(kube::Client::try_default().await.context(
            "connecting to the Kubernetes API (in-cluster service account, or KUBECONFIG)",
        )?)
    } else {
        None
    };
    let node_name = match (&args.node_name, node) {
        (Some(n), _) => n.clone(),
        (None, true) => anyhow::bail!(
            "node mode needs --node-name or NODE_NAME (the downward API's spec.nodeName)"
        ),
        (None, false) => String::new(),
    };
    let cgroup = match &args.cgroup {
        Some(c) => c.clone(),
        None if node => system::cgroup2_mount()?,
        None => system::default_cgroup()?,
    };
    system::ensure_cgroup(&cgroup)?;
    let dns_servers = match (&kube_client, args.dns_servers.is_empty()) {
        (_, false) => args.dns_servers.clone(),
        (Some(client), true) => vec![cluster_dns_ip(client).await?],
        (None, true) => resolv_conf::read_nameservers(&args.resolv_conf)?,
    };
    let upstreams: Vec<SocketAddr> = if args.upstreams.is_empty() {
        dns_servers
            .iter()
            .map(|ip| SocketAddr::new(*ip, 53))
            .collect()
    } else {
        args.upstreams.iter().map(|u| u.0).collect()
    };
    let allocator = VipAllocator::load(&args.state_dir)?;
    let registry = Arc::new(Registry::new(
        &objects,
        allocator,
        TableConfig {
            cluster_domain: args.cluster_domain.clone(),
        },
    )?);
    let extra_search: Vec<String> = args.search_domains.iter().map(|d| normalize(d)).collect();

    // Local mode serves in the current netns; node mode inside each captured pod.
    let listeners = if node {
        None
    } else {
        Some(Listeners::from_std(dns::server::bind_std(
            args.listen_port,
        )?)?)
    };
    let admin_listener = admin::bind(args.admin).await?;

    tracing::info!(
        mode = ?args.mode,
        cgroup = %cgroup.display(),
        dns_servers = ?dns_servers,
        upstreams = ?upstreams,
        listen = ?listeners.as_ref().map(Listeners::local_addrs),
        admin = %args.admin,
        pin_dir = %args.pin_dir.display(),
        vip_state = %args.state_dir.join("vips.json").display(),
        namespace = %args.namespace,
        node = %node_name,
        capture_default = ?args.capture_default,
        hosts = registry.table().len(),
        "starting dnsproxy"
    );

    let datapath = DataPath::start(&DataPathOptions {
        cgroup: cgroup.clone(),
        pin_dir: args.pin_dir.clone(),
        listen_port: args.listen_port,
        dns_servers: dns_servers.clone(),
        capture_all: !node,
        adopt: node,
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
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin_state.clone()));

    let mut tasks = Vec::new();
    let mut synced_source = None;
    if let Some(listeners) = listeners {
        let ctx = Arc::new(ArcSwap::from_pointee(ClientContext::local(
            &args.namespace,
            extra_search.clone(),
        )));
        tasks.push(tokio::spawn(listeners.serve(handler.clone(), ctx)));
        if let Some(path) = args.registry.clone() {
            let registry = registry.clone();
            tasks.push(tokio::spawn(registry::files::watch(
                path,
                Duration::from_millis(args.registry_poll_ms),
                move |objects| {
                    if let Err(e) = registry.update(&objects) {
                        tracing::error!(
                            "registry not updated, the last good table stays in service: {e}"
                        );
                    }
                },
            )));
        }
    }
    let mut cluster_task = None;
    if let Some(client) = kube_client {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let config = cluster::NodeConfig {
            node_name: node_name.clone(),
            capture_default: args.capture_default == Switch::On,
            listen_port: args.listen_port,
            extra_search,
            pin_dir: args.pin_dir.clone(),
            proc_root: args.proc_root.clone(),
        };
        cluster_task = Some(tokio::spawn(cluster::run(
            client,
            config,
            registry.clone(),
            handler.clone(),
            tx,
        )));
        synced_source = Some(rx);
    }
    // Ready only after the first full sync of the registry source...
    if let Some(rx) = synced_source
        && rx.await.is_err()
    {
        let err = match cluster_task.take().expect("node mode").await {
            Ok(Err(e)) => e,
            Ok(Ok(())) => anyhow::anyhow!("the cluster watch ended"),
            Err(e) => anyhow::anyhow!("the cluster watch panicked: {e}"),
        };
        datapath.shutdown(true)?;
        return Err(err.context("first sync with the Kubernetes API"));
    }
    // ... and once VIPs have their first backends (bounded: resolution has timeouts).
    let (first_sync, synced) = tokio::sync::oneshot::channel();
    tasks.push(tokio::spawn(
        vip::sync::BackendSync {
            registry: registry.clone(),
            forwarder,
            pin_dir: args.pin_dir.clone(),
        }
        .run(first_sync),
    ));
    let _ = synced.await;
    admin_state.ready.store(true, Ordering::Release);
    tracing::info!(dns_servers = ?dns_servers, cgroup = %cgroup.display(), "ready");

    let outcome = match cluster_task.as_mut() {
        Some(task) => tokio::select! {
            signal = shutdown_signal() => Ok(signal),
            res = task => Err(match res {
                Ok(Err(e)) => e,
                Ok(Ok(())) => anyhow::anyhow!("the cluster watch ended"),
                Err(e) => anyhow::anyhow!("the cluster watch panicked: {e}"),
            }),
        },
        None => Ok(shutdown_signal().await),
    };
    admin_state.ready.store(false, Ordering::Release);
    if let Some(t) = cluster_task {
        t.abort();
    }
    for t in tasks {
        t.abort();
    }
    admin_task.abort();
    // Node mode keeps the data path for the next daemon (it adopts it); meanwhile
    // captured pods fail open to the cluster DNS.
    datapath.shutdown(args.keep_pins || node)?;
    let signal = outcome?;
    tracing::info!("{signal}: stopped");
    Ok(0)
}

/// The ClusterIP of kube-system/kube-dns, the cluster DNS that pods are given.
async fn cluster_dns_ip(client: &kube::Client) -> anyhow::Result<std::net::IpAddr> {
    let api: kube::Api<kube::api::DynamicObject> = kube::Api::namespaced_with(
        client.clone(),
        "kube-system",
        &kube::core::ApiResource::from_gvk_with_plural(
            &kube::core::GroupVersionKind::gvk("", "v1", "Service"),
            "services",
        ),
    );
    let svc = api
        .get("kube-dns")
        .await
        .context("reading kube-system/kube-dns (or pass --dns-server)")?;
    let ip = svc.data["spec"]["clusterIP"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .context("kube-system/kube-dns has no clusterIP (pass --dns-server)")?;
    Ok(ip)
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
