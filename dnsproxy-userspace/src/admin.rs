//! Admin HTTP endpoint, served with hyper: `/healthz` (alive), `/readyz` (serving, with
//! the data path attached and the first registry sync done), `/metrics` (`OpenMetrics`
//! text from `prometheus-client`: DNS, cache and eBPF counters), `/debug/ndsz` (the
//! name table as JSON, like Istio's). Only GET and HEAD; nothing here changes state.
use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    header::{ALLOW, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry as MetricsRegistry,
};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    bpf::pinned,
    dns::server::Shared,
    registry::{Registry, table::addresses::Reason},
    vip::{assign, translate::Translated},
};

/// How long a client may take to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the admin endpoint reports on.
pub struct AdminState {
    pub ready: AtomicBool,
    /// This daemon has handed its sockets to a successor (which may not serve yet):
    /// `/readyz` speaks for the process that answers it, and the admin listener is
    /// shared with the successor, so this one says 503 until the handoff is abandoned.
    pub handing_over: AtomicBool,
    /// Every metric: the DNS server's, plus the collectors added by [`AdminState::new`].
    pub metrics: MetricsRegistry,
    pub registry: Arc<Registry>,
}

impl AdminState {
    /// Adds the collectors read at scrape time (cache size, eBPF decision counters) to
    /// `metrics`.
    pub fn new(
        mut metrics: MetricsRegistry,
        shared: Shared,
        registry: Arc<Registry>,
        (assigned, translated): (Arc<assign::Counters>, Arc<Translated>),
        pin_dir: PathBuf,
    ) -> Self {
        metrics.register_collector(Box::new(ServerCollector { shared }));
        metrics.register_collector(Box::new(EbpfCollector { pin_dir }));
        metrics.register_collector(Box::new(NamesCollector {
            registry: Arc::clone(&registry),
            assigned,
            translated,
        }));
        AdminState {
            ready: AtomicBool::new(false),
            handing_over: AtomicBool::new(false),
            metrics,
            registry,
        }
    }
}

/// What an endpoint serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Surface {
    /// `/healthz`, `/readyz`, `/metrics`.
    Probes,
    /// `/debug/*`.
    Debug,
}

/// The bound admin and debug listeners.
pub struct Listeners {
    admin: TcpListener,
    debug: TcpListener,
}

impl Listeners {
    /// Binds both (errors are reported before anything is attached). The debug address
    /// must be a loopback address.
    pub async fn bind(admin: SocketAddr, debug: SocketAddr) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        anyhow::ensure!(
            debug.ip().is_loopback(),
            "--debug-addr {debug} is not a loopback address: the debug dumps are for the node's operator only"
        );
        let bind = |addr: SocketAddr, flag: &'static str| async move {
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (choose another {flag})"))
        };
        Ok(Listeners {
            admin: bind(admin, "--admin").await?,
            debug: bind(debug, "--debug-addr").await?,
        })
    }

    /// Listeners a predecessor handed over (admin, then debug).
    pub fn from_fds(fds: [std::os::fd::OwnedFd; 2]) -> std::io::Result<Self> {
        let [admin, debug] = fds.map(std::net::TcpListener::from);
        admin.set_nonblocking(true)?;
        debug.set_nonblocking(true)?;
        Ok(Listeners {
            admin: TcpListener::from_std(admin)?,
            debug: TcpListener::from_std(debug)?,
        })
    }

    /// New descriptors for both, kept for a successor.
    pub fn dup(&self) -> std::io::Result<[std::os::fd::OwnedFd; 2]> {
        use std::os::fd::AsFd as _;
        Ok([
            self.admin.as_fd().try_clone_to_owned()?,
            self.debug.as_fd().try_clone_to_owned()?,
        ])
    }

    /// Each listener with what it serves.
    pub fn with_surfaces(self) -> [(TcpListener, Surface); 2] {
        [(self.admin, Surface::Probes), (self.debug, Surface::Debug)]
    }
}

/// Serves `surface` until `shutdown`; connections then finish their request and close.
pub async fn serve(
    listener: TcpListener,
    surface: Surface,
    state: Arc<AdminState>,
    shutdown: CancellationToken,
) {
    let connections = TaskTracker::new();
    while let Some(accepted) = shutdown.run_until_cancelled(listener.accept()).await {
        let Ok((stream, _)) = accepted else {
            continue;
        };
        let (state, shutdown) = (Arc::clone(&state), shutdown.clone());
        connections.spawn(async move {
            let service = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(respond(&req, surface, &state)) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    connections.close();
    connections.wait().await;
}

fn respond(req: &Request<Incoming>, surface: Surface, state: &AdminState) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut res = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        );
        res.headers_mut()
            .insert(ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
        return res;
    }
    match (surface, req.uri().path()) {
        (Surface::Debug, "/debug/ndsz") => {
            let namespace = req
                .uri()
                .query()
                .into_iter()
                .flat_map(|q| q.split('&'))
                .find_map(|kv| kv.strip_prefix("namespace="));
            reply(
                StatusCode::OK,
                "application/json",
                render_ndsz(state, namespace),
            )
        }
        (Surface::Debug, _) => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        (Surface::Probes, path) => respond_probe(path, state),
    }
}

fn respond_probe(path: &str, state: &AdminState) -> Response<Full<Bytes>> {
    match path {
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" if state.handing_over.load(Ordering::Acquire) => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "handing over to a successor\n".into(),
        ),
        "/readyz" if state.ready.load(Ordering::Acquire) => {
            reply(StatusCode::OK, "text/plain", "ready\n".into())
        }
        "/readyz" => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready\n".into(),
        ),
        "/metrics" => match render_metrics(state) {
            Ok(text) => reply(StatusCode::OK, OPENMETRICS, text),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("{e}\n"),
            ),
        },
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    res
}

fn render_metrics(state: &AdminState) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &state.metrics)?;
    Ok(out)
}

/// The name table: host → its entries (addresses or alias, source, namespace,
/// `exportTo`), or with `namespace` the one entry a client there sees.
fn render_ndsz(state: &AdminState, namespace: Option<&str>) -> String {
    let table = state.registry.table();
    let dump = serde_json::json!({
        "clusterDomain": table.cluster_domain(),
        "namespace": namespace,
        "hosts": table.dump(namespace),
        "refused": table.refused(),
    });
    serde_json::to_string_pretty(&dump).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}")) + "\n"
}

// === collectors read at scrape time ===

/// What the DNS server holds right now: `dns_cache_entries`, `dns_cache_bytes`,
/// `dns_cache_evictions_total`, `dns_upstream_inflight`, `dns_tcp_connections`,
/// `dnsproxy_udp_receive_drops_total`, `dnsproxy_udp_query_tasks`.
struct ServerCollector {
    shared: Shared,
}

impl std::fmt::Debug for ServerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerCollector")
    }
}

impl Collector for ServerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let cache = self.shared.handler.cache();
        encode_all(
            &mut encoder,
            [
                (
                    "dns_cache_entries",
                    "Answers held in the cache.",
                    MetricType::Gauge,
                    cache.len() as u64,
                ),
                (
                    "dns_cache_bytes",
                    "Memory the cache holds, as weighed.",
                    MetricType::Gauge,
                    cache.bytes(),
                ),
                (
                    "dns_upstream_inflight",
                    "Questions with the upstreams right now.",
                    MetricType::Gauge,
                    self.shared.handler.in_flight() as u64,
                ),
                (
                    "dns_tcp_connections",
                    "DNS-over-TCP connections open right now.",
                    MetricType::Gauge,
                    self.shared.tcp.len() as u64,
                ),
                (
                    "dnsproxy_udp_query_tasks",
                    "UDP queries on tasks of their own right now (at most 9 x --max-inflight; past it, SERVFAIL overload).",
                    MetricType::Gauge,
                    self.shared.query_tasks.live() as u64,
                ),
                (
                    "dnsproxy_udp_receive_drops",
                    "Queries the kernel dropped because a UDP listener's receive queue was full (--udp-receive-buffer).",
                    MetricType::Counter,
                    self.shared.queue_drops.total(),
                ),
                (
                    "dns_cache_evictions",
                    "Answers evicted to keep the cache within --cache-bytes and --cache-size.",
                    MetricType::Counter,
                    cache.evictions(),
                ),
            ],
        )
    }
}

/// `dnsproxy_vip_moves_total`: auto-allocated VIPs moved because a declared address
/// claimed them (two hosts never share a VIP); `dnsproxy_vips_left_out`;
/// `dnsproxy_name_table_builds_total`; `dnsproxy_vip_store_{conflicts,failures}_total`.
struct NamesCollector {
    registry: Arc<Registry>,
    assigned: Arc<assign::Counters>,
    translated: Arc<Translated>,
}

impl std::fmt::Debug for NamesCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NamesCollector")
    }
}

impl Collector for NamesCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        encode_all(
            &mut encoder,
            [
                (
                    "dnsproxy_vips_left_out",
                    "VIPs that do not translate because the translation maps are full.",
                    MetricType::Gauge,
                    self.translated.left_out() as u64,
                ),
                (
                    "dnsproxy_name_table_builds",
                    "Name tables built (after a change to what the table is built from; in node mode a Pod change only when a workloadSelector selects it).",
                    MetricType::Counter,
                    self.registry.builds(),
                ),
                (
                    "dnsproxy_name_table_namespace_builds",
                    "Namespaces whose Services' shard of the name table was built (one namespace's Service changes build its shard only).",
                    MetricType::Counter,
                    self.registry.shard_builds().0,
                ),
                (
                    "dnsproxy_name_table_entries_builds",
                    "Builds of the ServiceEntries' shard of the name table (ServiceEntries, WorkloadEntries, selected Pods, the VIP store).",
                    MetricType::Counter,
                    self.registry.shard_builds().1,
                ),
                (
                    "dnsproxy_vip_resolutions_deferred",
                    "DNS-resolution hosts that waited for a slot under --dns-refresh-concurrency.",
                    MetricType::Counter,
                    self.translated.refresh.deferred.load(Relaxed),
                ),
                (
                    "dnsproxy_vip_refresh_floored",
                    "Resolutions whose TTL was shorter than --dns-refresh-floor-secs: refreshed after the floor instead.",
                    MetricType::Counter,
                    self.translated.refresh.floored.load(Relaxed),
                ),
                (
                    "dnsproxy_vip_resolution_failures",
                    "Failed resolutions of DNS-resolution hosts (each retried with exponential backoff from 5 s to 5 min).",
                    MetricType::Counter,
                    self.translated.refresh.failures.load(Relaxed),
                ),
            ],
        )?;
        self.encode_assignment(&mut encoder)?;
        self.encode_refused(&mut encoder)
    }
}

impl NamesCollector {
    /// The VIP assignment's counters: moves, the allocator's bound, the store's rounds.
    fn encode_assignment(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let assigned = &self.assigned;
        encode_all(
            encoder,
            [
                (
                    "dnsproxy_vip_moves",
                    "Auto-allocated VIPs moved because a declared address claimed them.",
                    MetricType::Counter,
                    assigned.moves.load(Relaxed),
                ),
                (
                    "dnsproxy_vip_store_conflicts",
                    "Node mode: writes of the VIP store that lost a race to another daemon (then read again and retried).",
                    MetricType::Counter,
                    assigned.store_conflicts.load(Relaxed),
                ),
                (
                    "dnsproxy_vip_hosts_unallocated",
                    "Hosts the last allocation left without an auto-allocated VIP: every one of the 65,534 was taken (they are forwarded to upstream DNS; everything else is built).",
                    MetricType::Gauge,
                    assigned.unallocated.load(Relaxed),
                ),
                (
                    "dnsproxy_vip_store_moves_refused",
                    "Node mode: hosts in use that the VIP store moved to another VIP, with no declared address claiming theirs: refused, the host keeps its VIP.",
                    MetricType::Counter,
                    assigned.store_moves_refused.load(Relaxed),
                ),
                (
                    "dnsproxy_vip_store_failures",
                    "Node mode: rounds without agreement through the VIP store (VIPs allocated locally until the next try).",
                    MetricType::Counter,
                    assigned.store_failures.load(Relaxed),
                ),
            ],
        )
    }

    /// `dnsproxy_entries_refused_total{reason}`.
    fn encode_refused(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "dnsproxy_entries_refused",
            "Addresses a ServiceEntry declared and did not get (a ClusterIP, a pod IP, loopback, link-local, multicast, outside --declared-address-cidrs, or held by an entry first in precedence), and hosts it named under another namespace's svc.<cluster domain>.",
            None,
            MetricType::Counter,
        )?;
        for reason in Reason::ALL {
            let labels = [("reason", reason.label())];
            ConstCounter::new(self.registry.refused_total(reason))
                .encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Unlabelled gauges and counters: (name, help, type, value).
fn encode_all<const N: usize>(
    encoder: &mut DescriptorEncoder,
    metrics: [(&str, &str, MetricType, u64); N],
) -> Result<(), std::fmt::Error> {
    for (name, help, kind, value) in metrics {
        let counter = matches!(kind, MetricType::Counter);
        let metric = encoder.encode_descriptor(name, help, None, kind)?;
        if counter {
            ConstCounter::new(value).encode(metric)?;
        } else {
            ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(metric)?;
        }
    }
    Ok(())
}

/// `dnsproxy_ebpf_decisions_total{decision}`: the data path's per-CPU counters, summed.
#[derive(Debug)]
struct EbpfCollector {
    pin_dir: PathBuf,
}

impl Collector for EbpfCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = match pinned::read_stats(&self.pin_dir) {
            Ok(stats) => stats,
            Err(e) => {
                tracing::debug!("eBPF counters unavailable: {}", crate::report(&e));
                return Ok(());
            }
        };
        let mut family = encoder.encode_descriptor(
            "dnsproxy_ebpf_decisions",
            "Data-path decisions, summed over CPUs.",
            None,
            MetricType::Counter,
        )?;
        for (decision, value) in stats {
            let labels = [("decision", decision)];
            ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
