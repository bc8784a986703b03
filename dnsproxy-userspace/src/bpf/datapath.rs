//! Loads the embedded eBPF object, fills its maps, attaches the eight programs to the
//! capture cgroup with `bpf_links` and pins links and maps under the pin directory.
//!
//! With `adopt`, pinned state of an earlier daemon is taken over instead of replaced:
//! its maps (policy entries, VIP translations) are reused as they are, and each pinned
//! link is switched to the new program in one step (`BPF_LINK_UPDATE`), so the data path
//! never goes away during a restart.
use std::{
    fs::File,
    net::IpAddr,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap},
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink},
};
use dnsproxy_common::{
    Config, DnsServer, MAX_DNS_SERVERS, MAX_PROXY_IDS, NO_ID, PROGRAMS, VipInfo, VipKey, map_names,
};

use super::{
    BpfError, Cause, map_err,
    netns_cookie::{CookieSource, NetnsCookies},
    pin_err, pinned,
    system::{self, PinDirLock},
    to_map_addr,
};

/// The object built by build.rs from dnsproxy-ebpf.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dnsproxy-bpf"));

/// What the data path needs to know.
#[derive(Clone, Debug)]
pub struct DataPathOptions {
    /// cgroup v2 directory the programs attach to.
    pub cgroup: PathBuf,
    /// bpffs directory for pins.
    pub pin_dir: PathBuf,
    /// Port of the local DNS listener.
    pub listen_port: u16,
    /// Addresses whose port-53 traffic is redirected.
    pub dns_servers: Vec<IpAddr>,
    /// Capture every socket in the cgroup (local mode).
    pub capture_all: bool,
    /// Take over pinned maps and links of an earlier daemon (node mode, and a
    /// successor in local mode).
    pub adopt: bool,
    /// Sizes of `dp_vips` and `dp_services` (maps pinned already keep theirs).
    pub max_vips: u32,
    pub max_vip_services: u32,
    /// How netns cookies are learned (`SO_NETNS_COOKIE`, or the probe).
    pub netns_cookie: CookieSource,
    /// The sidecar proxy's user and group ids, at most [`MAX_PROXY_IDS`] each.
    pub proxy_uids: Vec<u32>,
    pub proxy_gids: Vec<u32>,
}

/// `ids` in the map's fixed slots, the rest [`NO_ID`].
fn proxy_ids(ids: &[u32]) -> [u32; MAX_PROXY_IDS] {
    let mut slots = [NO_ID; MAX_PROXY_IDS];
    for (slot, id) in slots.iter_mut().zip(ids) {
        *slot = *id;
    }
    slots
}

/// The kernel's log records (`aya-log`), waiting to be forwarded.
type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// The attached data path. Dropping it leaves pins in place; call [`DataPath::shutdown`].
pub struct DataPath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    logger: Option<KernelLogger>,
    lock: PinDirLock,
    cookies: Arc<NetnsCookies>,
}

impl DataPath {
    /// Loads, configures, attaches and pins. Stale pins of an earlier run in the same
    /// pin directory are removed first (the lock guarantees no live daemon owns them).
    pub fn start(
        opts: &DataPathOptions,
        handed_lock: Option<std::os::fd::OwnedFd>,
    ) -> Result<Self, BpfError> {
        system::ensure_bpffs(&opts.pin_dir)?;
        let lock = system::lock_pin_dir(&opts.pin_dir, handed_lock)?;
        if !opts.adopt {
            let stale = pinned::remove_pins(&opts.pin_dir)?;
            if stale > 0 {
                tracing::info!(pin_dir = %opts.pin_dir.display(), removed = stale, "removed stale pins of an earlier run");
            }
        }
        Self::load_and_attach(opts, lock).inspect_err(|_| {
            if !opts.adopt {
                // Nothing half-done stays behind: no maps pinned without programs.
                let _ = pinned::remove_pins(&opts.pin_dir);
                let _ = std::fs::remove_dir(&opts.pin_dir);
            }
        })
    }

    fn load_and_attach(opts: &DataPathOptions, lock: PinDirLock) -> Result<Self, BpfError> {
        // Every map lives at its pin path: reused when pinned already, else created there.
        let mut loader = EbpfLoader::new();
        let adopted = map_names::ALL
            .iter()
            .filter(|name| opts.pin_dir.join(name).exists())
            .count();
        for name in map_names::ALL {
            loader.map_pin_path(name, opts.pin_dir.join(name));
        }
        loader
            .map_max_entries(map_names::VIPS, opts.max_vips)
            .map_max_entries(map_names::SERVICES, opts.max_vip_services);
        let mut ebpf = loader.load(OBJECT).map_err(BpfError::Load)?;
        if adopted > 0 {
            tracing::info!(maps = adopted, pin_dir = %opts.pin_dir.display(), "adopted pinned maps of an earlier daemon");
        }
        let logger = aya_log::EbpfLogger::init(&mut ebpf)
            .inspect_err(|e| tracing::debug!("no eBPF logger: {e}"))
            .ok();
        let cookies = NetnsCookies::new(opts.netns_cookie, &mut ebpf, &system::cgroup2_mount()?)?;
        let local_netns = own_netns_cookie(&cookies).map_err(BpfError::Listener)?;
        let mut dp = DataPath {
            ebpf,
            pin_dir: opts.pin_dir.clone(),
            logger,
            lock,
            cookies: Arc::new(cookies),
        };
        dp.write_config(Config {
            listen_port: opts.listen_port,
            dns_port: dnsproxy_common::DNS_PORT,
            capture_all: u32::from(opts.capture_all),
            daemon_tgid: std::process::id(),
            _pad: 0,
            local_netns,
            proxy_uids: proxy_ids(&opts.proxy_uids),
            proxy_gids: proxy_ids(&opts.proxy_gids),
        })?;
        dp.set_dns_servers(&opts.dns_servers)?;
        // Adopted VIPs (perhaps from a daemon without the filter) stay translated.
        let vips: HashMap<_, VipKey, VipInfo> = pinned::open_hash(&opts.pin_dir, map_names::VIPS)?;
        let adopted: Vec<_> = vips.keys().filter_map(Result::ok).map(|k| k.addr).collect();
        pinned::mark_vips(&opts.pin_dir, adopted)?;
        dp.attach(&opts.cgroup)?;
        Ok(dp)
    }

    fn write_config(&mut self, cfg: Config) -> Result<(), BpfError> {
        let name = map_names::CONFIG;
        let map = self.ebpf.map_mut(name).ok_or_else(|| missing(name))?;
        let mut array: Array<_, Config> = Array::try_from(map).map_err(map_err(name))?;
        array.set(0, cfg, 0).map_err(map_err(name))
    }

    /// Replaces the set of captured DNS server addresses: slot `i` holds the `i`th,
    /// the slots after the last are cleared.
    pub fn set_dns_servers(&mut self, servers: &[IpAddr]) -> Result<(), BpfError> {
        check_dns_servers(servers)?;
        let name = map_names::DNS_SERVERS;
        let map = self.ebpf.map_mut(name).ok_or_else(|| missing(name))?;
        let mut slots: Array<_, DnsServer> = Array::try_from(map).map_err(map_err(name))?;
        for i in 0..MAX_DNS_SERVERS {
            let slot = servers
                .get(i as usize)
                .map_or_else(DnsServer::default, |ip| DnsServer {
                    addr: to_map_addr(*ip),
                    enabled: 1,
                    _pad: 0,
                });
            slots.set(i, slot, 0).map_err(map_err(name))?;
        }
        Ok(())
    }

    /// Attaches every program to `cgroup` through a pinned link (or switches the
    /// pinned link of an earlier daemon to it).
    fn attach(&mut self, cgroup: &Path) -> Result<(), BpfError> {
        let cgroup_file = File::open(cgroup).map_err(|source| BpfError::Cgroup {
            path: cgroup.display().to_string(),
            source,
        })?;
        let links_dir = self.pin_dir.join(pinned::LINKS_DIR);
        std::fs::create_dir_all(&links_dir).map_err(pin_err(&links_dir))?;
        for name in PROGRAMS {
            let program: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .ok_or_else(|| BpfError::Missing {
                    what: format!("program {name}"),
                })?
                .try_into()
                .map_err(|source| load_program_err(name, source))?;
            program
                .load()
                .map_err(|source| load_program_err(name, source))?;
            attach_program(program, &cgroup_file, &links_dir.join(name)).map_err(|source| {
                BpfError::Attach {
                    program: name.to_owned(),
                    cgroup: cgroup.display().to_string(),
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// Where netns cookies come from (for the in-pod listeners' policy entries).
    pub fn netns_cookies(&self) -> &Arc<NetnsCookies> {
        &self.cookies
    }

    /// A descriptor of the pin directory's lock, to hand to a successor.
    pub fn lock_fd(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        self.lock.dup()
    }

    /// The task that forwards the programs' log records, for the caller to own (once).
    pub fn kernel_logger(&mut self) -> Option<impl Future<Output = ()> + Send + 'static> {
        self.logger.take().map(forward_kernel_logs)
    }

    /// Stops: with `keep_pins` the programs stay attached (the data path fails open
    /// while no daemon listens); otherwise links and maps are unpinned, which detaches.
    pub fn shutdown(self, keep_pins: bool) -> Result<(), BpfError> {
        if keep_pins {
            tracing::info!(pin_dir = %self.pin_dir.display(), "leaving the data path attached and pinned (--keep-pins)");
            return Ok(());
        }
        let removed = pinned::remove_pins(&self.pin_dir)?;
        let _ = std::fs::remove_dir(&self.pin_dir);
        tracing::info!(removed, "detached and unpinned the data path");
        Ok(())
    }
}

fn missing(name: &str) -> BpfError {
    BpfError::Missing {
        what: format!("map {name}"),
    }
}

fn load_program_err(program: &str, source: aya::programs::ProgramError) -> BpfError {
    BpfError::LoadProgram {
        program: program.to_owned(),
        source,
    }
}

/// Attaches `program` with a link pinned at `path`; when a link of an earlier daemon
/// is pinned there, switches it to this program in place (`BPF_LINK_UPDATE`), so the
/// hook never runs without a program.
fn attach_program(program: &mut CgroupSockAddr, cgroup: &File, path: &Path) -> Result<(), Cause> {
    if path.exists() {
        let link = super::link::obj_get(path)?;
        let prog_fd = program.fd()?;
        super::link::update(link.as_fd(), prog_fd.as_fd())?;
        tracing::debug!(link = %path.display(), "pinned link now runs the new program");
        return Ok(());
    }
    let id = program.attach(cgroup, CgroupAttachMode::Single)?;
    let link: FdLink = program.take_link(id)?.try_into()?;
    link.pin(path)?;
    Ok(())
}

/// Forwards `aya-log-ebpf` records from the kernel to the `log`/`tracing` pipeline
/// until the future is dropped.
async fn forward_kernel_logs(logger: KernelLogger) {
    // SAFETY: the logger owns its ring buffer fd for as long as the AsyncFd owns the
    // logger, and always reports that same fd.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let Ok(mut fd) = registered else {
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

/// The cookie of the daemon's own network namespace (read from a socket made for it).
fn own_netns_cookie(cookies: &NetnsCookies) -> std::io::Result<u64> {
    let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    cookies.of_socket(&probe)
}

/// The programs scan at most [`MAX_DNS_SERVERS`] slots: more servers are an error.
pub fn check_dns_servers(servers: &[IpAddr]) -> Result<(), BpfError> {
    if servers.len() > MAX_DNS_SERVERS as usize {
        return Err(BpfError::TooManyDnsServers {
            count: servers.len(),
        });
    }
    Ok(())
}
