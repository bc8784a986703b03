//! `dnsproxy run`, start to stop, as three named steps:
//!
//! 1. [`Settings::resolve`]: flags, environment and (node mode) the cluster give what
//!    the daemon needs; everything that can fail on bad input fails here, before
//!    anything is attached to the kernel.
//! 2. [`Daemon::start`]: sockets bound (or taken over from a running daemon, see
//!    [`crate::handoff`]), data path attached, every task started under one owner,
//!    ready once the registry and the VIP backends had their first sync; then a
//!    predecessor is told to stop.
//! 3. [`Daemon::serve_until_signal`]: serve until SIGTERM/SIGINT, a successor's
//!    takeover (or a fatal task error), then stop accepting, answer what is in flight
//!    within `--shutdown-grace-ms`, and exit.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    os::fd::OwnedFd,
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{
    admin::{self, AdminState},
    bpf::{
        self,
        datapath::{DataPath, DataPathOptions},
        features,
        netns_cookie::NetnsCookies,
        system,
    },
    capture::{self, CaptureConfig},
    cli::{Mode, RunArgs, Switch},
    dns::{
        cache,
        client::ClientContext,
        forwarder::Forwarder,
        handler::{self, Handler},
        inflight,
        metrics::Metrics,
        server::{self, Listeners, Shared, StdListeners},
        tcp,
        workers::UdpWorkers,
    },
    handoff::{self, Inventory, PodSockets, Sockets, Start, Taken},
    name::normalize,
    registry::{self, Registry, TableConfig, manifest::Objects},
    resolv_conf, state,
    vip::{
        assign::{Assignment, VipAllocator, store::VipStore},
        translate::{
            Translated,
            plan::Capacity,
            sync::{BackendSync, Refresh},
            views::Views,
        },
    },
};

/// Runs the daemon on its own multi-threaded runtime until it stops.
pub fn run_blocking(args: RunArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run(args))
}

/// `dnsproxy run`.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    system::require_root()?;
    let kernel = features::Report::probe();
    kernel.require()?;
    kernel.log();
    match system::raise_nofile_limit() {
        Ok(limit) => tracing::debug!(limit, "open-files limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
    }
    // Caught from here on: a SIGTERM while the daemon starts stops it once it serves,
    // instead of killing it half-started with the default action.
    let mut signals = Signals::catch().context("cannot install the SIGTERM/SIGINT handlers")?;
    let settings = Settings::resolve(args, kernel).await?;
    crate::private_dir::ensure(&settings.args.state_dir, "state directory")?;
    let start = settings.ask_predecessor().await;
    let daemon = Daemon::start(settings, start).await?;
    daemon.serve_until_signal(&mut signals).await
}

// === impl Settings ===

/// Node mode's connection to the cluster.
struct ClusterSettings {
    client: kube::Client,
    node_name: String,
}

/// What the daemon needs, resolved before anything is attached.
struct Settings {
    args: RunArgs,
    /// `Some` in node mode.
    cluster: Option<ClusterSettings>,
    /// Local mode's manifests at start (node mode reads the API instead), until the
    /// first table is built from them: they are not kept after.
    objects: Option<Objects>,
    cgroup: PathBuf,
    dns_servers: Vec<IpAddr>,
    upstreams: Vec<SocketAddr>,
    extra_search: Vec<String>,
    /// What the kernel offers, probed at start.
    kernel: features::Report,
}

impl Settings {
    async fn resolve(args: RunArgs, kernel: features::Report) -> anyhow::Result<Self> {
        let objects = initial_objects(&args)?;
        let cluster = match args.mode {
            Mode::Node => Some(ClusterSettings::connect(&args).await?),
            Mode::Local => None,
        };
        let cgroup = match &args.cgroup {
            Some(c) => c.clone(),
            None if cluster.is_some() => system::cgroup2_mount()?,
            None => system::default_cgroup()?,
        };
        system::ensure_cgroup(&cgroup)?;
        let dns_servers = match (&cluster, args.dns_servers.is_empty()) {
            (_, false) => args.dns_servers.clone(),
            (Some(c), true) => vec![cluster_dns_ip(&c.client).await?],
            (None, true) => resolv_conf::read_nameservers(&args.resolv_conf)?,
        };
        // Refused before anything is bound or attached.
        bpf::datapath::check_dns_servers(&dns_servers)?;
        for (flag, ids) in [
            ("--proxy-uids", &args.proxy_uids),
            ("--proxy-gids", &args.proxy_gids),
        ] {
            anyhow::ensure!(
                ids.len() <= dnsproxy_common::MAX_PROXY_IDS,
                "{flag}: at most {} ids",
                dnsproxy_common::MAX_PROXY_IDS
            );
        }
        let upstreams = if args.upstreams.is_empty() {
            dns_servers
                .iter()
                .map(|ip| SocketAddr::new(*ip, 53))
                .collect()
        } else {
            args.upstreams.iter().map(|u| u.0).collect()
        };
        let extra_search = args.search_domains.iter().map(|d| normalize(d)).collect();
        Ok(Settings {
            args,
            cluster,
            objects: Some(objects),
            cgroup,
            dns_servers,
            upstreams,
            extra_search,
            kernel,
        })
    }

    fn node(&self) -> bool {
        self.cluster.is_some()
    }

    /// Asks a daemon running with this state directory for its sockets.
    async fn ask_predecessor(&self) -> Start {
        let a = &self.args;
        let (state_dir, pin_dir, port, node) = (
            a.state_dir.clone(),
            a.pin_dir.clone(),
            a.listen_port,
            self.node(),
        );
        let start =
            tokio::task::spawn_blocking(move || handoff::take(&state_dir, &pin_dir, port, node))
                .await
                .unwrap_or_else(|e| Start::Fallback(handoff::Fallback::Failed(e.to_string())));
        match &start {
            Start::Fresh => {}
            Start::Taken(t) => tracing::info!(
                predecessor = t.predecessor,
                pods = t.pods.len(),
                "handoff: took the listening sockets over from the running daemon"
            ),
            Start::Fallback(f) => tracing::warn!(
                reason = f.reason(),
                "handoff not possible, starting on our own (captured pods fail open until our listeners are up): {f}"
            ),
        }
        if let Start::Fallback(handoff::Fallback::Timeout { pid: Some(pid) }) = start {
            let killed = tokio::task::spawn_blocking(move || handoff::kill_unresponsive(pid));
            if killed.await.unwrap_or(false) {
                tracing::warn!(pid, "killed the unresponsive previous daemon");
            }
        }
        start
    }

    fn datapath_options(&self) -> DataPathOptions {
        DataPathOptions {
            cgroup: self.cgroup.clone(),
            pin_dir: self.args.pin_dir.clone(),
            listen_port: self.args.listen_port,
            dns_servers: self.dns_servers.clone(),
            capture_all: !self.node(),
            adopt: self.node(),
            max_vips: self.args.max_vips,
            max_vip_services: self.args.max_vip_services,
            netns_cookie: self.args.netns_cookie,
            proxy_uids: self.args.proxy_uids.clone(),
            proxy_gids: self.args.proxy_gids.clone(),
        }
    }

    fn handler_settings(&self) -> handler::Settings {
        let a = &self.args;
        let upstream_timeout = Duration::from_millis(a.upstream_timeout_ms);
        handler::Settings {
            upstreams: self.upstreams.clone(),
            upstream_timeout,
            upstream_parallel: a.upstream_parallel,
            cache: cache::Limits {
                bytes: a.cache_bytes,
                entries: a.cache_size,
                max_ttl: a.max_ttl,
                serve_stale: a.serve_stale,
            },
            inflight: inflight::Limits {
                total: a.max_inflight,
                per_client: a.max_inflight_per_client,
            },
            ttl: a.ttl,
            // A fresh VIP's first answer waits for its translation as long as a
            // forwarded question may take.
            vip_wait: upstream_timeout,
        }
    }

    /// The registry, with local mode's table built (node mode's comes with the first
    /// sync), and the assignment of VIPs that rebuilds it: agreed through the VIP
    /// store in node mode (unless `--vip-store ""`), this daemon's alone in local mode.
    fn registry(&mut self) -> (Registry, Assignment) {
        let allocator = VipAllocator::load(&self.args.state_dir);
        let registry = Registry::new(TableConfig {
            cluster_domain: self.args.cluster_domain.clone(),
            addresses: registry::table::addresses::AddressPolicy {
                allowed: self.args.declared_address_cidrs.clone(),
                cluster: self.args.cluster_cidrs.clone(),
            },
            default_export_to: self.args.default_export_to.clone(),
            max_hosts_per_namespace: self.args.max_hosts_per_namespace,
            every_service: self.node() && self.args.cluster_nxdomain == Switch::On,
        });
        let store = self.cluster.as_ref().and_then(|c| {
            let location = self.args.vip_store.as_str();
            (!location.is_empty())
                .then(|| VipStore::new(c.client.clone(), location))
                .flatten()
        });
        let mut assignment = match store {
            Some(store) => Assignment::agreed_through(allocator, store),
            None => Assignment::local(allocator),
        };
        if let Some(objects) = self.objects.take()
            && !self.node()
        {
            assignment.rebuild(&registry, &objects);
        }
        (registry, assignment)
    }

    fn node_settings(&self, cookies: Arc<NetnsCookies>, views: Arc<Views>) -> state::NodeSettings {
        let node_name = self
            .cluster
            .as_ref()
            .map(|c| c.node_name.clone())
            .unwrap_or_default();
        state::NodeSettings {
            capture: CaptureConfig {
                node_name: node_name.clone(),
                capture_default: self.args.capture_default == Switch::On,
                listen_port: self.args.listen_port,
                extra_search: self.extra_search.clone(),
                autopath: self.args.autopath == Switch::On,
                pin_dir: self.args.pin_dir.clone(),
                locator: capture::netns::Locator {
                    cgroup_root: self.cgroup.clone(),
                    proc_root: self.args.proc_root.clone(),
                },
                cookies,
                views,
            },
            node_name,
        }
    }

    /// The whole configuration, once, at start-up.
    fn log_start(&self, listeners: Option<&Listeners>, hosts: usize) {
        let a = &self.args;
        tracing::info!(
            mode = ?a.mode,
            cgroup = %self.cgroup.display(),
            dns_servers = ?self.dns_servers,
            upstreams = ?self.upstreams,
            listen = ?listeners.map(Listeners::local_addrs),
            admin = %a.admin_addr(),
            debug = %a.debug_addr,
            pin_dir = %a.pin_dir.display(),
            vip_state = %a.state_dir.join("vips.json").display(),
            namespace = %a.namespace,
            node = %self.cluster.as_ref().map_or("", |c| c.node_name.as_str()),
            capture_default = ?a.capture_default,
            shutdown_grace_ms = a.shutdown_grace_ms,
            hosts,
            "starting dnsproxy"
        );
    }
}

impl ClusterSettings {
    async fn connect(args: &RunArgs) -> anyhow::Result<Self> {
        let node_name = args.node_name.clone().context(
            "node mode needs --node-name or NODE_NAME (the downward API's spec.nodeName)",
        )?;
        let client = kube::Client::try_default().await.context(
            "connecting to the Kubernetes API (in-cluster service account, or KUBECONFIG)",
        )?;
        Ok(ClusterSettings { client, node_name })
    }
}

/// Local mode's manifests; none in node mode, which reads the Kubernetes API.
fn initial_objects(args: &RunArgs) -> anyhow::Result<Objects> {
    match (&args.registry, args.mode) {
        (Some(_), Mode::Node) => {
            anyhow::bail!("--registry is for local mode; node mode reads the Kubernetes API")
        }
        (Some(path), Mode::Local) => registry::files::load(path)
            .with_context(|| format!("loading the registry {}", path.display())),
        (None, _) => Ok(Objects::default()),
    }
}

/// The `ClusterIP` of kube-system/kube-dns, the cluster DNS that pods are given.
async fn cluster_dns_ip(client: &kube::Client) -> anyhow::Result<IpAddr> {
    let api: kube::Api<k8s_openapi::api::core::v1::Service> =
        kube::Api::namespaced(client.clone(), "kube-system");
    let svc = api
        .get("kube-dns")
        .await
        .context("reading kube-system/kube-dns (or pass --dns-server)")?;
    svc.spec
        .and_then(|spec| spec.cluster_ip)
        .and_then(|ip| ip.parse().ok())
        .context("kube-system/kube-dns has no clusterIP (pass --dns-server)")
}

// === impl Daemon ===

/// A started daemon: the data path attached and every task running under `tasks`.
struct Daemon {
    settings: Settings,
    datapath: DataPath,
    admin: Arc<AdminState>,
    registry: Arc<Registry>,
    /// Who gets a VIP: taken by the task that rebuilds the table (the registry files'
    /// watch, or node mode's cluster state).
    assignment: Option<Assignment>,
    /// What the data path translates, for DNS answers.
    translated: Arc<Translated>,
    /// Node mode's namespace views (the capture writes them, the translation follows).
    views: Option<Arc<Views>>,
    forwarder: Arc<Forwarder>,
    /// What every DNS listener shares: the handler and the TCP connection registry.
    shared: Shared,
    /// What a successor would get.
    inventory: Arc<Inventory>,
    handoff_counters: handoff::Counters,
    /// Cancelled when a successor has taken the sockets over.
    handed_over: CancellationToken,
    /// Set while a predecessor still serves (a handoff not yet complete): stopping
    /// then leaves the data path to it.
    predecessor_serving: bool,
    /// Every long-running task. A task that ends before shutdown is a fatal error.
    tasks: JoinSet<anyhow::Result<()>>,
    /// Cancelled once, at shutdown; every task holds a child of it.
    shutdown: CancellationToken,
}

/// The sockets a daemon serves: bound here, or handed over by its predecessor.
struct OpenSockets {
    local: Option<Listeners>,
    admin: admin::Listeners,
    /// Copies kept for a successor.
    local_kept: Option<Sockets>,
    admin_kept: [OwnedFd; 2],
}

impl Daemon {
    async fn start(mut settings: Settings, start: Start) -> anyhow::Result<Self> {
        let counters = handoff::Counters::default();
        let (mut taken, predecessor) = match start {
            Start::Fresh => (None, false),
            Start::Taken(t) => (Some(t), true),
            Start::Fallback(f) => {
                counters.fallback(&f);
                (None, !matches!(f, handoff::Fallback::Mismatch(_)))
            }
        };
        let udp = match settings.args.udp_threads {
            0 => UdpWorkers::start(UdpWorkers::auto_threads()),
            n => UdpWorkers::start(n),
        }
        .context("cannot start the UDP threads")?;
        // Sockets first: "port in use" is reported before anything is attached.
        let sockets = open_sockets(&settings, taken.as_mut(), udp.threads()).await?;
        let (registry, assignment) = settings.registry();
        settings.log_start(sockets.local.as_ref(), registry.table().len());

        // A predecessor's pins are adopted (node mode always does).
        let mut options = settings.datapath_options();
        options.adopt |= predecessor;
        let datapath = DataPath::start(&options, taken.as_mut().and_then(|t| t.lock.take()))?;
        if let Some(local) = &sockets.local {
            bpf::listeners::register(
                &settings.args.pin_dir,
                bpf::listeners::LOCAL_SLOT,
                &local.fds(),
            )
            .context("cannot enter the local listener in dp_listeners")?;
        }
        let inventory = Arc::new(Inventory::new(
            settings.args.pin_dir.clone(),
            settings.args.listen_port,
            datapath
                .lock_fd()
                .context("keeping the pin directory lock")?,
            sockets.admin_kept,
            sockets.local_kept,
        ));
        let handed_pods = taken
            .as_mut()
            .map(|t| std::mem::take(&mut t.pods))
            .unwrap_or_default();
        let mut daemon = Daemon::assemble(
            settings,
            datapath,
            (registry, assignment),
            udp,
            (inventory, counters),
        );
        daemon.predecessor_serving = taken.is_some();
        daemon.spawn_admin(sockets.admin);
        if let Some(listeners) = sockets.local {
            daemon.spawn_local(listeners);
        }
        let first_sync = daemon.spawn_cluster(handed_pods);
        if let Err(e) = daemon
            .become_ready_within(first_sync, taken.is_some())
            .await
        {
            daemon.stop().await?;
            return Err(e);
        }
        if let Err(e) = daemon.complete_start(taken).await {
            daemon.stop().await?;
            return Err(e);
        }
        Ok(daemon)
    }

    /// Serving: a predecessor is told to stop, and the handoff socket opens for a
    /// successor.
    async fn complete_start(&mut self, taken: Option<Taken>) -> anyhow::Result<()> {
        if let Some(taken) = taken {
            let predecessor = taken.predecessor;
            tokio::task::spawn_blocking(move || taken.finish())
                .await?
                .with_context(|| format!("handoff: the previous daemon (pid {predecessor}) did not confirm it stopped; exiting so that it carries on alone"))?;
            self.predecessor_serving = false;
            self.handoff_counters.handoff("received");
            tracing::info!(
                predecessor,
                "handoff complete: the previous daemon stopped, this one serves every socket"
            );
        }
        let giver = handoff::Giver::bind(&self.settings.args.state_dir).with_context(|| {
            format!(
                "cannot open the handoff socket in {}",
                self.settings.args.state_dir.display()
            )
        })?;
        let inventory = Arc::clone(&self.inventory);
        let stop_wait = Duration::from_millis(self.settings.args.handoff_timeout_ms);
        let outcome = (self.handed_over.clone(), self.handoff_counters.clone());
        // Readiness follows the handoff: not ready from the moment the sockets are sent.
        let (mut frozen, admin) = (self.inventory.subscribe_frozen(), Arc::clone(&self.admin));
        let token = self.shutdown.child_token();
        self.tasks.spawn(async move {
            token
                .run_until_cancelled(async move {
                    while frozen.changed().await.is_ok() {
                        let now = *frozen.borrow_and_update();
                        admin.handing_over.store(now, Ordering::Release);
                    }
                })
                .await;
            Ok(())
        });
        let token = self.shutdown.child_token();
        self.tasks.spawn(async move {
            handoff::serve(giver, inventory, stop_wait, outcome, token).await;
            Ok(())
        });
        Ok(())
    }

    /// The shared parts: metrics, forwarder, cache, handler, admin state.
    fn assemble(
        settings: Settings,
        datapath: DataPath,
        (registry, assignment): (Registry, Assignment),
        udp: UdpWorkers,
        (inventory, handoff_counters): (Arc<Inventory>, handoff::Counters),
    ) -> Self {
        let registry = Arc::new(registry);
        let translated = Arc::new(Translated::default());
        let args = &settings.args;
        let mut metrics_registry = prometheus_client::registry::Registry::default();
        handoff_counters.register(&mut metrics_registry);
        settings.kernel.register(&mut metrics_registry);
        let metrics = Arc::new(Metrics::new(
            &settings.upstreams,
            &mut metrics_registry,
            settings.node(),
        ));
        let handler = Arc::new(Handler::new(
            settings.handler_settings(),
            Arc::clone(&registry),
            Arc::clone(&translated),
            Arc::clone(&metrics),
        ));
        let forwarder = Arc::clone(handler.forwarder());
        let tcp = tcp::Connections::new(
            tcp::Limits {
                total: args.max_tcp_connections,
                per_client: args.max_tcp_connections_per_client,
                idle: Duration::from_millis(args.tcp_idle_timeout_ms),
                read: Duration::from_millis(args.tcp_read_timeout_ms),
                write: Duration::from_millis(args.tcp_write_timeout_ms),
                max_queries: args.tcp_max_queries,
            },
            Arc::clone(&metrics),
        );
        let shared = Shared {
            handler,
            tcp,
            udp,
            queue_drops: Arc::default(),
            query_tasks: server::TaskBudget::new(args.max_inflight),
        };
        let admin = Arc::new(AdminState::new(
            metrics_registry,
            shared.clone(),
            Arc::clone(&registry),
            (assignment.counters(), Arc::clone(&translated)),
            args.pin_dir.clone(),
        ));
        let views = settings
            .node()
            .then(|| Arc::new(Views::new(policy_views(&settings.args.pin_dir))));
        Daemon {
            settings,
            datapath,
            admin,
            registry,
            assignment: Some(assignment),
            translated,
            views,
            forwarder,
            shared,
            inventory,
            handoff_counters,
            handed_over: CancellationToken::new(),
            predecessor_serving: false,
            tasks: JoinSet::new(),
            shutdown: CancellationToken::new(),
        }
    }

    /// The admin and debug endpoints, and the kernel log forwarder.
    fn spawn_admin(&mut self, listeners: admin::Listeners) {
        for (listener, surface) in listeners.with_surfaces() {
            let (state, token) = (Arc::clone(&self.admin), self.shutdown.child_token());
            self.tasks.spawn(async move {
                admin::serve(listener, surface, state, token).await;
                Ok(())
            });
        }
        if let Some(logger) = self.datapath.kernel_logger() {
            let token = self.shutdown.child_token();
            self.tasks.spawn(async move {
                token.run_until_cancelled(logger).await;
                Ok(())
            });
        }
    }

    /// Local mode: the listener in this netns, and the registry directory followed.
    fn spawn_local(&mut self, listeners: Listeners) {
        let args = &self.settings.args;
        let ctx = Arc::new(ArcSwap::from_pointee(ClientContext::local(
            &args.namespace,
            self.settings.extra_search.clone(),
        )));
        let (shared, token) = (self.shared.clone(), self.shutdown.child_token());
        self.tasks.spawn(async move {
            listeners.serve(shared, ctx, token).await;
            Ok(())
        });
        let Some(path) = args.registry.clone() else {
            return;
        };
        let (registry, token) = (Arc::clone(&self.registry), self.shutdown.child_token());
        let mut assignment = self
            .assignment
            .take()
            .expect("the assignment is taken once");
        let interval = Duration::from_millis(args.registry_poll_ms);
        self.tasks.spawn(async move {
            let watch = registry::files::watch(path, interval, move |objects| {
                assignment.rebuild(&registry, &objects);
            });
            token.run_until_cancelled(watch).await;
            Ok(())
        });
    }

    /// Node mode: the cluster watch; the receiver fires after its first full sync.
    fn spawn_cluster(
        &mut self,
        handed: HashMap<String, PodSockets>,
    ) -> Option<tokio::sync::oneshot::Receiver<()>> {
        let client = self.settings.cluster.as_ref()?.client.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let handoff = capture::Handoff {
            inventory: Arc::clone(&self.inventory),
            handed,
        };
        let assignment = self
            .assignment
            .take()
            .expect("the assignment is taken once");
        let watch = state::run(
            client,
            self.settings.node_settings(
                Arc::clone(self.datapath.netns_cookies()),
                Arc::clone(self.views.as_ref().expect("node mode has views")),
            ),
            (Arc::clone(&self.registry), assignment),
            (self.shared.clone(), handoff),
            tx,
            self.shutdown.child_token(),
        );
        self.tasks
            .spawn(async move { watch.await.context("watching the Kubernetes API") });
        Some(rx)
    }

    /// [`Daemon::become_ready`], bounded by `--handoff-timeout-ms` when this daemon
    /// holds sockets a predecessor `handed` it: a successor that cannot sync (an API
    /// it cannot reach) would otherwise hold the pods' sockets unread once its
    /// predecessor stops, and DNS would vanish instead of failing open. It exits
    /// instead, closing its copies; the predecessor carries on, or, stopping too,
    /// leaves the pods to fail open.
    async fn become_ready_within(
        &mut self,
        cluster_synced: Option<tokio::sync::oneshot::Receiver<()>>,
        handed: bool,
    ) -> anyhow::Result<()> {
        if !handed {
            return self.become_ready(cluster_synced).await;
        }
        let bound = Duration::from_millis(self.settings.args.handoff_timeout_ms);
        tokio::time::timeout(bound, self.become_ready(cluster_synced))
            .await
            .unwrap_or_else(|_| {
                Err(anyhow::anyhow!(
                    "handoff: the first sync did not complete within --handoff-timeout-ms ({bound:?}); \
                     closing the sockets the previous daemon handed over (it carries on, or captured \
                     pods fail open) and exiting"
                ))
            })
    }

    /// Ready after the first full registry sync and the first VIP backend sync
    /// (bounded: resolution has timeouts).
    async fn become_ready(
        &mut self,
        cluster_synced: Option<tokio::sync::oneshot::Receiver<()>>,
    ) -> anyhow::Result<()> {
        if let Some(rx) = cluster_synced {
            self.until(rx)
                .await
                .context("first sync with the Kubernetes API")?;
        }
        let (tx, vips_synced) = tokio::sync::oneshot::channel();
        let sync = BackendSync {
            registry: Arc::clone(&self.registry),
            translated: Arc::clone(&self.translated),
            forwarder: Arc::clone(&self.forwarder),
            pin_dir: self.settings.args.pin_dir.clone(),
            retire_after: Duration::from_secs(2 * u64::from(self.settings.args.ttl)),
            capacity: Capacity {
                vips: self.settings.args.max_vips as usize,
                services: self.settings.args.max_vip_services as usize,
            },
            refresh: Refresh {
                concurrency: self.settings.args.dns_refresh_concurrency,
                floor: Duration::from_secs(self.settings.args.dns_refresh_floor_secs),
            },
            views: self.views.clone(),
        };
        let token = self.shutdown.child_token();
        self.tasks.spawn(async move {
            token.run_until_cancelled(sync.run(tx)).await;
            Ok(())
        });
        self.until(vips_synced)
            .await
            .context("first sync of the VIP backends")?;
        // What start-up freed goes back to the system before the daemon says ready.
        crate::memory::release_free();
        self.admin.ready.store(true, Ordering::Release);
        tracing::info!(
            dns_servers = ?self.settings.dns_servers,
            cgroup = %self.settings.cgroup.display(),
            heap_bytes = crate::memory::heap_in_use(),
            "ready"
        );
        Ok(())
    }

    /// Waits for `rx`, or fails with the error of a task that ended first.
    async fn until(&mut self, rx: tokio::sync::oneshot::Receiver<()>) -> anyhow::Result<()> {
        tokio::select! {
            fired = rx => fired.context("the task that was to report it ended"),
            ended = self.tasks.join_next() => Err(task_ended(ended)),
        }
    }

    async fn serve_until_signal(mut self, signals: &mut Signals) -> anyhow::Result<()> {
        let outcome = tokio::select! {
            biased;
            () = self.handed_over.cancelled() => Ok(None),
            signal = signals.next() => Ok(Some(signal)),
            ended = self.tasks.join_next() => Err(task_ended(ended)),
        };
        if let Ok(Some(signal)) = &outcome {
            self.wait_for_successor(signal).await;
            tracing::info!("{signal}: stopping, answering what is in flight");
        }
        let node = self.settings.node();
        let handed_over = self.handed_over.clone();
        self.stop().await?;
        match outcome? {
            Some(signal) if handed_over.is_cancelled() => {
                tracing::info!("{signal}: handed over, stopped");
            }
            Some(signal) => tracing::info!("{signal}: stopped"),
            // A DaemonSet pod's container that exits is restarted: it stays, idle,
            // until its pod is deleted.
            None if node => {
                tracing::info!("handed over: idle until SIGTERM (the pod is being replaced)");
                let signal = signals.next().await;
                tracing::info!("{signal}: stopped");
            }
            None => tracing::info!("handed over: stopped"),
        }
        Ok(())
    }

    /// On SIGTERM, a successor that is taking over (or, within `--handoff-wait-ms`,
    /// one that comes: a rollout's new pod) gets the sockets before this daemon stops.
    async fn wait_for_successor(&self, signal: &str) {
        let args = &self.settings.args;
        let wait = if self.inventory.frozen() {
            Duration::from_millis(args.handoff_timeout_ms)
        } else {
            args.handoff_wait()
        };
        if wait.is_zero() {
            return;
        }
        tracing::info!("{signal}: waiting up to {wait:?} for a successor to take the sockets over");
        if tokio::time::timeout(wait, self.handed_over.cancelled())
            .await
            .is_err()
        {
            tracing::warn!(
                "no successor took over: stopping without one (captured pods fail open until the next daemon)"
            );
        }
    }

    /// Stops accepting, lets every task finish what it has in flight within the grace
    /// period (then drops what is left), and detaches or keeps the data path.
    async fn stop(mut self) -> anyhow::Result<()> {
        self.admin.ready.store(false, Ordering::Release);
        self.shutdown.cancel();
        let grace = Duration::from_millis(self.settings.args.shutdown_grace_ms);
        let drained = tokio::time::timeout(grace, async {
            while let Some(ended) = self.tasks.join_next().await {
                if let Ok(Err(e)) = ended {
                    tracing::warn!("while stopping: {e:#}");
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                tasks = self.tasks.len(),
                "grace period over: dropping what is still in flight"
            );
            self.tasks.shutdown().await;
        }
        // A successor serves the data path now; node mode keeps it for the next daemon
        // (it adopts it; meanwhile captured pods fail open to the cluster DNS).
        let keep_pins = self.settings.args.keep_pins
            || self.settings.node()
            || self.handed_over.is_cancelled()
            || self.predecessor_serving;
        self.datapath.shutdown(keep_pins)?;
        Ok(())
    }
}

/// The error for a task that ended while the daemon still needed it.
fn task_ended(ended: Option<Result<anyhow::Result<()>, tokio::task::JoinError>>) -> anyhow::Error {
    match ended {
        Some(Ok(Err(e))) => e,
        Some(Ok(Ok(()))) => anyhow::anyhow!("a daemon task ended before shutdown"),
        Some(Err(e)) => anyhow::anyhow!("a daemon task panicked: {e}"),
        None => anyhow::anyhow!("no daemon task is running"),
    }
}

/// SIGTERM and SIGINT, caught from the start of `run`.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn catch() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The next one's name.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// The local listener (local mode) and the admin listeners: a predecessor's, else new.
async fn open_sockets(
    settings: &Settings,
    mut taken: Option<&mut Taken>,
    udp_threads: usize,
) -> anyhow::Result<OpenSockets> {
    let args = &settings.args;
    let local = match args.mode {
        Mode::Local => Some(match taken.as_mut().and_then(|t| t.local.take()) {
            Some(sockets) => StdListeners::from_sockets(sockets),
            None => server::bind_std(args.listen_port, server::UdpSockets::ReusePort(udp_threads))?,
        }),
        Mode::Node => None,
    };
    if let Some(local) = &local
        && args.udp_receive_buffer > 0
    {
        let granted = local
            .set_udp_receive_buffer(args.udp_receive_buffer)
            .context("sizing the local listener's UDP receive queues (--udp-receive-buffer)")?;
        tracing::debug!(granted, "UDP receive queue of the local listener");
    }
    let local_kept = local
        .as_ref()
        .map(StdListeners::dup)
        .transpose()
        .context("keeping the local listener for a successor")?;
    let local = local.map(Listeners::from_std).transpose()?;
    let admin = match taken.and_then(|t| t.admin.take()) {
        Some(fds) => admin::Listeners::from_fds(fds).context("the handed-over admin listeners")?,
        None => admin::Listeners::bind(args.admin_addr(), args.debug_addr).await?,
    };
    let admin_kept = admin
        .dup()
        .context("keeping the admin listeners for a successor")?;
    Ok(OpenSockets {
        local,
        admin,
        local_kept,
        admin_kept,
    })
}

/// The views the pinned policy entries hold (a predecessor's): new namespaces get
/// none of them.
fn policy_views(pin_dir: &std::path::Path) -> Vec<u32> {
    match bpf::pinned::open_hash::<u64, dnsproxy_common::NetnsPolicy>(
        pin_dir,
        dnsproxy_common::map_names::POLICY,
    ) {
        Ok(map) => map
            .iter()
            .filter_map(Result::ok)
            .map(|(_, p)| p.view)
            .collect(),
        Err(e) => {
            tracing::warn!(
                "cannot read the policy entries' views: {}",
                crate::report(&e)
            );
            Vec::new()
        }
    }
}
