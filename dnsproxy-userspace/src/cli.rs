//! Command-line interface: every flag of every subcommand, with its default.
use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{bpf::netns_cookie::CookieSource, upstream_addr::UpstreamAddr};

/// Port of the admin endpoint unless `--admin` says otherwise.
pub const ADMIN_PORT: u16 = 15191;

/// Default directory for pinned maps and links (versioned by layout).
/// A proxy user or group id: any but `u32::MAX`, which marks an unused slot.
fn proxy_id(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(id) if id != dnsproxy_common::NO_ID => Ok(id),
        Ok(_) => Err(format!("{s} is not a user or group id")),
        Err(e) => Err(format!("{s}: {e}")),
    }
}

pub fn default_pin_dir() -> PathBuf {
    PathBuf::from(format!(
        "/sys/fs/bpf/dnsproxy/v{}",
        dnsproxy_common::LAYOUT_VERSION
    ))
}

#[derive(Debug, Parser)]
#[command(
    name = "dnsproxy",
    version,
    about = "eBPF-based transparent DNS interceptor: redirects DNS aimed at the cluster DNS \
             server to a local proxy that answers service names and forwards the rest"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load and attach the data path and serve DNS until SIGINT/SIGTERM: local mode on
    /// `127.0.0.1/::1` for one cgroup, node mode inside every captured pod of a node.
    Run(Box<RunArgs>),
    /// Run a command inside the captured cgroup (its exit code is passed through).
    Exec(ExecArgs),
    /// Decode the pinned maps (config, DNS servers, per-netns policy, counters, links,
    /// VIPs and their backends).
    Maps(MapsArgs),
    /// Detach and remove pinned state left by `run --keep-pins` or a crashed daemon.
    Cleanup(CleanupArgs),
    /// Probe the kernel features the data path uses, each with the Linux release that
    /// brought it; exits 1 when a required one is missing (what `run` refuses with).
    Check(CheckArgs),
}

/// Where the daemon runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// A developer's kernel: capture everything in one cgroup, registry from files.
    Local,
    /// A Kubernetes node (DaemonSet): registry and capture policy from the API,
    /// listeners inside each captured pod.
    Node,
}

/// On or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// local (default) or node.
    #[arg(long, value_enum, default_value_t = Mode::Local, env = "DNSPROXY_MODE")]
    pub mode: Mode,

    /// cgroup v2 directory to attach to (created if missing).
    /// Default: local mode a `dnsproxy` directory under the cgroup2 mount, node mode
    /// the cgroup2 root.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,

    /// Node mode: this node's name (its pods are the ones served).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// Node mode: capture pods that neither a namespace label nor a pod annotation
    /// decides for.
    #[arg(long, value_enum, default_value_t = Switch::Off, env = "DNSPROXY_CAPTURE_DEFAULT")]
    pub capture_default: Switch,

    /// Node mode: where pod processes are found (the host's /proc: run with hostPID).
    #[arg(long, default_value = "/proc", env = "DNSPROXY_PROC_ROOT")]
    pub proc_root: PathBuf,

    /// How network namespace cookies are learned: `SO_NETNS_COOKIE` (Linux 5.14), or a
    /// probe program in a cgroup of the daemon's (older kernels); `auto` picks the
    /// socket option when the kernel has it.
    #[arg(
        long,
        value_enum,
        default_value = "auto",
        env = "DNSPROXY_NETNS_COOKIE"
    )]
    pub netns_cookie: CookieSource,

    /// DNS server address whose port-53 traffic is captured (repeatable).
    /// Default: local mode the nameservers of --resolv-conf, node mode the `ClusterIP`
    /// of kube-system/kube-dns.
    #[arg(
        long = "dns-server",
        value_name = "IP",
        env = "DNSPROXY_DNS_SERVERS",
        value_delimiter = ','
    )]
    pub dns_servers: Vec<std::net::IpAddr>,

    /// Upstream server, IP or IP:PORT or [IPv6]:PORT (repeatable, tried in order).
    /// Default: the DNS servers on port 53.
    #[arg(
        long = "upstream",
        value_name = "IP[:PORT]",
        env = "DNSPROXY_UPSTREAMS",
        value_delimiter = ','
    )]
    pub upstreams: Vec<UpstreamAddr>,

    /// A YAML file or a directory of Kubernetes-style manifests (`ServiceEntry`, ...).
    #[arg(long, value_name = "PATH")]
    pub registry: Option<PathBuf>,

    /// Port of the local DNS listener on 127.0.0.1 and `::1`.
    #[arg(long, default_value_t = dnsproxy_common::DEFAULT_LISTEN_PORT, env = "DNSPROXY_LISTEN_PORT")]
    pub listen_port: u16,

    /// Admin HTTP address: /healthz, /readyz, /metrics. Default: local mode
    /// 127.0.0.1:15191, node mode 0.0.0.0:15191 (the kubelet probes the node's
    /// address; no Istio component uses the port, so gateways on hostNetwork can share
    /// the node).
    #[arg(long, value_name = "ADDR", env = "DNSPROXY_ADMIN")]
    pub admin: Option<SocketAddr>,

    /// Debug HTTP address: /debug/ndsz (the name table). Loopback only: what it shows
    /// is for the node's operator, not for pods or the network.
    #[arg(long, default_value = "127.0.0.1:15192", env = "DNSPROXY_DEBUG_ADDR")]
    pub debug_addr: SocketAddr,

    /// bpffs directory for pinned maps and links.
    #[arg(long, value_name = "DIR", default_value_os_t = default_pin_dir(), env = "DNSPROXY_PIN_DIR")]
    pub pin_dir: PathBuf,

    /// On exit, leave programs attached and maps pinned (the data path then fails open
    /// to the real DNS server until a daemon listens again). `dnsproxy cleanup` removes
    /// them. Always on in node mode, where a restarted daemon adopts them.
    #[arg(long)]
    pub keep_pins: bool,

    /// resolv.conf read for the default DNS servers.
    #[arg(long, default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,

    /// How long a question may take upstream, in milliseconds: lost datagrams are
    /// retransmitted within it (to the next upstream when there is one), and a TCP
    /// retry after a truncated answer shares it. Then the client gets SERVFAIL.
    #[arg(long, default_value_t = 2000, env = "DNSPROXY_UPSTREAM_TIMEOUT_MS")]
    pub upstream_timeout_ms: u64,

    /// Most questions with the upstreams at once, across the daemon (identical ones
    /// in flight count once). Past it a query gets SERVFAIL at once (`overload`).
    #[arg(long, default_value_t = 1024, env = "DNSPROXY_MAX_INFLIGHT")]
    pub max_inflight: usize,

    /// Most of those for one client (a pod in node mode), so that one pod's flood
    /// leaves the rest for the others.
    #[arg(long, default_value_t = 128, env = "DNSPROXY_MAX_INFLIGHT_PER_CLIENT")]
    pub max_inflight_per_client: usize,

    /// Most `resolution: DNS` hosts the VIP backend refresh resolves at once (A and
    /// AAAA, two sockets each); the others wait their turn, the longest due first.
    #[arg(long, default_value_t = 16, env = "DNSPROXY_DNS_REFRESH_CONCURRENCY")]
    pub dns_refresh_concurrency: usize,

    /// Shortest time between two resolutions of a `resolution: DNS` host, in seconds,
    /// whatever its TTL (each wait spread by ±10%). Failures are retried after 5 s,
    /// doubling to 5 min.
    #[arg(long, default_value_t = 30, env = "DNSPROXY_DNS_REFRESH_FLOOR_SECS")]
    pub dns_refresh_floor_secs: u64,

    /// Node mode: the ConfigMap, `NAMESPACE/NAME`, in which the daemons of every node
    /// agree on auto-allocated VIPs (empty: each node allocates alone, from its
    /// `vips.json`).
    #[arg(
        long,
        default_value = "dnsproxy-system/dnsproxy-vips",
        env = "DNSPROXY_VIP_STORE"
    )]
    pub vip_store: String,

    /// Size of the VIP map (`dp_vips`): VIPs that translate at once. The default holds
    /// every auto-allocated VIP and its IPv6 twin. VIPs past it do not translate
    /// (counted in `dnsproxy_vips_left_out`).
    #[arg(long, default_value_t = dnsproxy_common::MAX_VIPS, env = "DNSPROXY_MAX_VIPS")]
    pub max_vips: u32,

    /// Size of the service map (`dp_services`): (VIP, port, protocol) entries.
    #[arg(long, default_value_t = dnsproxy_common::MAX_VIP_SERVICES, env = "DNSPROXY_MAX_VIP_SERVICES")]
    pub max_vip_services: u32,

    /// Most DNS-over-TCP connections open at once, across the daemon. At the bound the
    /// quietest connection is closed to make room, else the new one is refused.
    #[arg(long, default_value_t = 1024, env = "DNSPROXY_MAX_TCP_CONNECTIONS")]
    pub max_tcp_connections: usize,

    /// Most of those for one client (a pod in node mode).
    #[arg(
        long,
        default_value_t = 128,
        env = "DNSPROXY_MAX_TCP_CONNECTIONS_PER_CLIENT"
    )]
    pub max_tcp_connections_per_client: usize,

    /// A TCP connection with nothing pending is closed after this, in milliseconds.
    #[arg(long, default_value_t = 10_000, env = "DNSPROXY_TCP_IDLE_TIMEOUT_MS")]
    pub tcp_idle_timeout_ms: u64,

    /// A TCP query frame must arrive whole within this of its first byte, in
    /// milliseconds (slowloris).
    #[arg(long, default_value_t = 2000, env = "DNSPROXY_TCP_READ_TIMEOUT_MS")]
    pub tcp_read_timeout_ms: u64,

    /// A TCP client must take an answer within this, in milliseconds.
    #[arg(long, default_value_t = 2000, env = "DNSPROXY_TCP_WRITE_TIMEOUT_MS")]
    pub tcp_write_timeout_ms: u64,

    /// Queries one TCP connection may send; then it is closed after the answers.
    #[arg(long, default_value_t = 1000, env = "DNSPROXY_TCP_MAX_QUERIES")]
    pub tcp_max_queries: u32,

    /// Threads that receive and answer UDP queries, each with its own runtime (and, in
    /// local mode, its own `SO_REUSEPORT` socket). 0: half the cores, 1 to 8 (a thread
    /// answers well over 100k queries a second; fewer threads wake up less often).
    #[arg(long, default_value_t = 0, env = "DNSPROXY_UDP_THREADS")]
    pub udp_threads: usize,

    /// Receive queue of each UDP socket of the local listener, in bytes (0: the
    /// kernel's default, ~200 KiB). Every client shares those queues: a larger one rides
    /// out a burst, or a stall of the daemon, without dropping the other clients'
    /// queries. Drops are counted (`dnsproxy_udp_receive_drops_total`). A pod's own
    /// listener (node mode) keeps the kernel's default: only that pod queues there.
    #[arg(long, default_value_t = 4 << 20, env = "DNSPROXY_UDP_RECEIVE_BUFFER")]
    pub udp_receive_buffer: usize,

    /// TTL of locally answered records, in seconds.
    #[arg(long, default_value_t = 30, env = "DNSPROXY_TTL")]
    pub ttl: u32,

    /// Ask every upstream at once and take the first good answer (default: one after
    /// the other, in order).
    #[arg(long, env = "DNSPROXY_UPSTREAM_PARALLEL")]
    pub upstream_parallel: bool,

    /// Most upstream answers kept in the cache (0 disables caching).
    #[arg(long, default_value_t = 10_000, env = "DNSPROXY_CACHE_SIZE")]
    pub cache_size: u64,

    /// Most memory the cache of upstream answers holds, in bytes (0 disables caching).
    /// The default fits well inside the DaemonSet's 256 Mi limit.
    #[arg(long, default_value_t = 32 << 20, env = "DNSPROXY_CACHE_BYTES")]
    pub cache_bytes: u64,

    /// Largest TTL a client is told, and longest time an answer is cached, in seconds.
    #[arg(long, default_value_t = 86_400, env = "DNSPROXY_MAX_TTL")]
    pub max_ttl: u32,

    /// While every upstream fails, answer from expired cache entries with a 30 s TTL
    /// (RFC 8767) instead of SERVFAIL.
    #[arg(long, env = "DNSPROXY_SERVE_STALE")]
    pub serve_stale: bool,

    /// The sidecar proxy's user ids (comma-separated, at most 4): in a pod with an
    /// Istio sidecar their DNS is not captured, as Istio's own capture exempts them.
    #[arg(
        long,
        value_name = "UID",
        env = "DNSPROXY_PROXY_UIDS",
        value_delimiter = ',',
        default_value = "1337",
        value_parser = proxy_id
    )]
    pub proxy_uids: Vec<u32>,

    /// The sidecar proxy's group ids (comma-separated, at most 4), as `--proxy-uids`.
    #[arg(
        long,
        value_name = "GID",
        env = "DNSPROXY_PROXY_GIDS",
        value_delimiter = ',',
        default_value = "1337",
        value_parser = proxy_id
    )]
    pub proxy_gids: Vec<u32>,

    /// Most `ServiceEntry` hosts one namespace may put in the table (and so VIPs it may
    /// take), its oldest entries first; the rest are refused (`reason="quota"`).
    /// 0: no bound.
    #[arg(
        long,
        value_name = "N",
        env = "DNSPROXY_MAX_HOSTS_PER_NAMESPACE",
        default_value_t = 0
    )]
    pub max_hosts_per_namespace: usize,

    /// Who sees a `ServiceEntry` or Service whose `exportTo` says nothing, as Istio's
    /// mesh-wide `defaultServiceExportTo`: `*` (everyone), `.` (its own namespace),
    /// namespaces, comma-separated. Clusters that rely on the mesh setting for
    /// isolation must set it here too.
    #[arg(
        long,
        value_name = "NAMESPACES",
        env = "DNSPROXY_DEFAULT_EXPORT_TO",
        value_delimiter = ',',
        default_value = "*"
    )]
    pub default_export_to: Vec<String>,

    /// Where a `ServiceEntry`'s declared addresses may be (comma-separated blocks).
    /// Empty: anywhere but loopback, link-local, multicast, a Service's `ClusterIP`, a
    /// known pod's IP and --cluster-cidrs, which are always refused.
    #[arg(
        long,
        value_name = "CIDR",
        env = "DNSPROXY_DECLARED_ADDRESS_CIDRS",
        value_delimiter = ','
    )]
    pub declared_address_cidrs: Vec<crate::registry::table::addresses::Cidr>,

    /// The cluster's pod and Service blocks (comma-separated): no `ServiceEntry` may
    /// declare an address in them.
    #[arg(
        long,
        value_name = "CIDR",
        env = "DNSPROXY_CLUSTER_CIDRS",
        value_delimiter = ','
    )]
    pub cluster_cidrs: Vec<crate::registry::table::addresses::Cidr>,

    /// Kubernetes cluster domain.
    #[arg(long, default_value = "cluster.local", env = "DNSPROXY_CLUSTER_DOMAIN")]
    pub cluster_domain: String,

    /// Node mode: answer NXDOMAIN (authoritative, with an SOA the client caches) for a
    /// name of the cluster domain that no Service has (under `svc.`: no Service of that
    /// name in that namespace; elsewhere: any name but under `pod.`), instead of asking
    /// the cluster DNS. `off` where CoreDNS serves more names there than the
    /// kubernetes plugin does.
    #[arg(long, value_enum, default_value_t = Switch::On, env = "DNSPROXY_CLUSTER_NXDOMAIN")]
    pub cluster_nxdomain: Switch,

    /// Node mode: walk each captured pod's search list (its resolv.conf) for it when
    /// the first search step of a name does not exist, and answer that first query
    /// with a CNAME to the first name that does (CoreDNS's autopath): one round trip
    /// instead of one per search domain. A pod opts out with the annotation
    /// `dnsproxy.io/autopath: "false"`.
    #[arg(long, value_enum, default_value_t = Switch::On, env = "DNSPROXY_AUTOPATH")]
    pub autopath: Switch,

    /// Namespace of the clients (local mode): decides Kubernetes short names and the
    /// search domains `<ns>.svc.<domain>`, `svc.<domain>`, `<domain>`.
    #[arg(long, default_value = "default")]
    pub namespace: String,

    /// Further search domain whose suffixed queries are answered with a CNAME to the
    /// known host (repeatable).
    #[arg(long = "search-domain", value_name = "DOMAIN")]
    pub search_domains: Vec<String>,

    /// Directory for state kept across restarts (auto-allocated VIPs in vips.json).
    #[arg(long, default_value = "/var/lib/dnsproxy", env = "DNSPROXY_STATE_DIR")]
    pub state_dir: PathBuf,

    /// How often the --registry path is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub registry_poll_ms: u64,

    /// On SIGTERM/SIGINT, how long queries in flight may still be answered before the
    /// daemon exits anyway, in milliseconds. Listeners stop reading at once.
    #[arg(long, default_value_t = 1500, env = "DNSPROXY_SHUTDOWN_GRACE_MS")]
    pub shutdown_grace_ms: u64,

    /// After handing its sockets to a successor, how long this daemon waits for the
    /// successor to serve them (its first sync included) before it carries on alone,
    /// in milliseconds. A successor whose first sync takes longer closes the sockets
    /// it was handed and exits 1 (pods then fail open rather than go unanswered).
    #[arg(long, default_value_t = 30_000, env = "DNSPROXY_HANDOFF_TIMEOUT_MS")]
    pub handoff_timeout_ms: u64,

    /// On SIGTERM, how long to wait for a successor to take the sockets over before
    /// stopping without one (pods then fail open until the next daemon), in
    /// milliseconds. Default: 10000 in node mode (a rollout's new pod may still be
    /// starting), 0 in local mode.
    #[arg(long, env = "DNSPROXY_HANDOFF_WAIT_MS")]
    pub handoff_wait_ms: Option<u64>,
}

impl RunArgs {
    /// `--admin`, else the mode's default: loopback in local mode, every address in
    /// node mode (the kubelet probes the node's address).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.unwrap_or_else(|| {
            let ip = match self.mode {
                Mode::Local => std::net::Ipv4Addr::LOCALHOST,
                Mode::Node => std::net::Ipv4Addr::UNSPECIFIED,
            };
            SocketAddr::from((ip, ADMIN_PORT))
        })
    }

    /// `--handoff-wait-ms`, else the mode's default.
    pub fn handoff_wait(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.handoff_wait_ms.unwrap_or(match self.mode {
            Mode::Local => 0,
            Mode::Node => 10_000,
        }))
    }
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// cgroup v2 directory to run in. Default: the same as `run`'s default.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,

    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<std::ffi::OsString>,
}

#[derive(Debug, Args)]
pub struct MapsArgs {
    /// bpffs directory of the pinned maps.
    #[arg(long, value_name = "DIR", default_value_os_t = default_pin_dir())]
    pub pin_dir: PathBuf,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CheckArgs {}

#[derive(Debug, Args)]
pub struct CleanupArgs {
    /// bpffs directory of the pinned maps and links.
    #[arg(long, value_name = "DIR", default_value_os_t = default_pin_dir())]
    pub pin_dir: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flags the deploy/ `ConfigMap` sets through the environment parse.
    #[test]
    fn deploy_configmap_keys_are_flags() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/configmap.yaml"
        ))
        .unwrap();
        let cm: serde_json::Value = crate::registry::manifest::from_yaml(&text).unwrap();
        let data = cm["data"].as_object().expect("data");
        let cmd = <Cli as clap::CommandFactory>::command();
        let run = cmd.find_subcommand("run").unwrap();
        let envs: Vec<String> = run
            .get_arguments()
            .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
            .collect();
        for key in data.keys().cloned() {
            if key == "RUST_LOG" {
                continue;
            }
            assert!(
                envs.contains(&key),
                "{key} in deploy/configmap.yaml is no `dnsproxy run` flag"
            );
        }
    }
}
