//! Program entry points (thin) and the logic behind them: `rewrite_destination` for
//! connect/sendmsg (DNS redirect, VIP translation), `restore_peer` for
//! recvmsg/getpeername.

use core::ptr;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST, bpf_sock_addr},
    btf_maps::{Array, HashMap, PerCpuArray, SkStorage, SockMap},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_get_netns_cookie,
        bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_map_lookup_elem, bpf_sk_release,
    },
    macros::{btf_map, cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use aya_log_ebpf::warn;
use dnsproxy_common::{
    Addr, Config, DnsServer, LISTENERS_PER_SLOT, LOOPBACK4, LOOPBACK6, MAX_BACKENDS,
    MAX_DNS_SERVERS, MAX_LISTENER_SLOTS, MAX_NETNS_PROBES, MAX_PROXY_IDS, MAX_VIP_SERVICES,
    MAX_VIPS, NetnsPolicy, PORT_UNDECLARED, ServiceKey, ServiceValue, SockOrig, VIP_DECLARED,
    VIP_FILTER_WORDS, VIP_SCOPED, VipInfo, VipKey, ip_proto, stat,
};

/// Verdict: let the syscall proceed (possibly rewritten).
const ALLOW: i32 = 1;
/// Verdict: fail the syscall at once with EPERM (a VIP without backends).
const DENY: i32 = 0;

#[btf_map(name = "dp_config")]
static CONFIG: Array<Config, 1> = Array::new();

#[btf_map(name = "dp_dns_servers")]
static DNS_SERVERS: Array<DnsServer, { MAX_DNS_SERVERS as usize }> = Array::new();

#[btf_map(name = "dp_policy")]
static POLICY: HashMap<u64, NetnsPolicy, 16384> = HashMap::new();

#[btf_map(name = "dp_stats")]
static STATS: PerCpuArray<u64, { stat::COUNT as usize }> = PerCpuArray::new();

#[btf_map(name = "dp_sock_orig")]
static SOCK_ORIG: SkStorage<SockOrig> = SkStorage::new();

// Not preallocated: sized for every auto-allocated VIP and its IPv6 twin (the daemon
// may set other sizes at load), they take kernel memory only for what they hold.
#[btf_map(name = "dp_vips")]
static VIPS: HashMap<VipKey, VipInfo, { MAX_VIPS as usize }, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

/// Buckets ([`Addr::vip_filter_bit`]) that hold some VIP: set by the daemon before it
/// adds a VIP to `dp_vips`, never cleared while pinned.
#[btf_map(name = "dp_vip_filter")]
static VIP_FILTER: Array<u64, { VIP_FILTER_WORDS as usize }> = Array::new();

/// The daemon's live listeners, four per slot ([`dnsproxy_common::listener_index`]):
/// the daemon puts them in, the kernel removes a socket when it closes.
#[btf_map(name = "dp_listeners")]
static LISTENERS: SockMap<{ (MAX_LISTENER_SLOTS * LISTENERS_PER_SLOT) as usize }> = SockMap::new();

#[btf_map(name = "dp_services")]
static SERVICES: HashMap<
    ServiceKey,
    ServiceValue,
    { MAX_VIP_SERVICES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Netns cookies learned by [`dnsproxy_netns_probe`], by the pid of the process that
/// asked (kernels without `SO_NETNS_COOKIE`; the daemon reads and removes each).
#[btf_map(name = "dp_netns_probe")]
static NETNS_PROBE: HashMap<u32, u64, { MAX_NETNS_PROBES as usize }> = HashMap::new();

// === entry points ===

#[cgroup_sock_addr(connect4)]
fn dnsproxy_connect4(ctx: SockAddrContext) -> i32 {
    rewrite_destination(&ctx, Family::V4)
}

#[cgroup_sock_addr(connect6)]
fn dnsproxy_connect6(ctx: SockAddrContext) -> i32 {
    rewrite_destination(&ctx, Family::V6)
}

#[cgroup_sock_addr(sendmsg4)]
fn dnsproxy_sendmsg4(ctx: SockAddrContext) -> i32 {
    rewrite_destination(&ctx, Family::V4)
}

#[cgroup_sock_addr(sendmsg6)]
fn dnsproxy_sendmsg6(ctx: SockAddrContext) -> i32 {
    rewrite_destination(&ctx, Family::V6)
}

#[cgroup_sock_addr(recvmsg4)]
fn dnsproxy_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, Family::V4);
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
fn dnsproxy_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, Family::V6);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
fn dnsproxy_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, Family::V4);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
fn dnsproxy_getpeername6(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, Family::V6);
    ALLOW
}

/// Records the network namespace cookie of a socket being created, under its process
/// id: attached only to the daemon's probe cgroup, where a short-lived child of the
/// daemon opens one socket in the namespace whose cookie the daemon needs (Linux before
/// 5.14 has no `SO_NETNS_COOKIE`).
#[cgroup_sock(sock_create)]
fn dnsproxy_netns_probe(ctx: SockContext) -> i32 {
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: helper accepted for cgroup sock programs (Linux 5.7).
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let _ = NETNS_PROBE.insert(pid, cookie, u64::from(BPF_NOEXIST));
    ALLOW
}

// === shared logic ===

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

#[inline(always)]
fn count(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU's program writes it while running.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
fn sock_addr(ctx: &SockAddrContext) -> *mut bpf_sock_addr {
    ctx.sock_addr
}

/// Reads the destination (connect/sendmsg) or peer (recvmsg/getpeername) address.
/// `user_ip6` is read word by word: the verifier only takes 4-byte context loads.
#[inline(always)]
fn read_addr(ctx: &SockAddrContext, family: Family) -> Addr {
    let sa = sock_addr(ctx);
    // SAFETY: ctx points to the kernel's bpf_sock_addr for this call.
    unsafe {
        match family {
            Family::V4 => Addr::from_ipv4_be(ptr::read_volatile(&(*sa).user_ip4)),
            Family::V6 => Addr::from_ipv6_words([
                ptr::read_volatile(&(*sa).user_ip6[0]),
                ptr::read_volatile(&(*sa).user_ip6[1]),
                ptr::read_volatile(&(*sa).user_ip6[2]),
                ptr::read_volatile(&(*sa).user_ip6[3]),
            ]),
        }
    }
}

/// Port in host order; `user_port` holds the network-order u16 in a u32.
#[inline(always)]
fn read_port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: as in read_addr.
    let raw = unsafe { ptr::read_volatile(&(*sock_addr(ctx)).user_port) };
    u16::from_be(raw as u16)
}

/// Writes address and port. For V4 the address must be IPv4-mapped.
#[inline(always)]
fn write_addr_port(ctx: &SockAddrContext, family: Family, addr: &Addr, port: u16) {
    let sa = sock_addr(ctx);
    // SAFETY: as in read_addr; 4-byte stores only.
    unsafe {
        match family {
            Family::V4 => ptr::write_volatile(&mut (*sa).user_ip4, addr.ipv4_be()),
            Family::V6 => {
                let w = addr.ipv6_words();
                ptr::write_volatile(&mut (*sa).user_ip6[0], w[0]);
                ptr::write_volatile(&mut (*sa).user_ip6[1], w[1]);
                ptr::write_volatile(&mut (*sa).user_ip6[2], w[2]);
                ptr::write_volatile(&mut (*sa).user_ip6[3], w[3]);
            }
        }
        ptr::write_volatile(&mut (*sa).user_port, u32::from(port.to_be()));
    }
}

#[inline(always)]
fn config() -> Option<Config> {
    CONFIG.get(0).copied()
}

/// The socket's network namespace (its cookie).
#[inline(always)]
fn netns_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: helper accepted for cgroup sock_addr programs.
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
}

/// A captured netns: its listener slot, its namespace's view, whether its pod has a
/// sidecar proxy.
#[derive(Clone, Copy)]
struct Captured {
    slot: u32,
    view: u32,
    sidecar: bool,
}

/// Netns `cookie` when it is captured: local mode captures everything in the attached
/// cgroup, in the one view 0, and the daemon's own netns has slot 0 (another netns gets
/// [`MAX_LISTENER_SLOTS`], which holds no listener); node mode captures a netns whose
/// `dp_policy` entry asks for it, with the slot and view written there.
#[inline(always)]
fn captured(cookie: u64, cfg: &Config) -> Option<Captured> {
    if cfg.capture_all != 0 {
        let slot = if cookie == cfg.local_netns {
            0
        } else {
            MAX_LISTENER_SLOTS
        };
        return Some(Captured {
            slot,
            view: 0,
            sidecar: false,
        });
    }
    // SAFETY: the value is only read, and copied at once.
    match unsafe { POLICY.get(cookie) } {
        Some(policy) if policy.capture_dns != 0 => Some(Captured {
            slot: policy.listener_slot,
            view: policy.view,
            sidecar: policy.sidecar != 0,
        }),
        _ => None,
    }
}

/// The calling process is the daemon, forwarding upstream. Asked only in the daemon's
/// own netns: elsewhere it has only its per-pod listeners, which answer and never
/// send to a DNS server, so node mode's pods skip the helper call.
#[inline(always)]
fn own_traffic(cookie: u64, cfg: &Config) -> bool {
    cookie == cfg.local_netns
        && cfg.daemon_tgid != 0
        && (bpf_get_current_pid_tgid() >> 32) as u32 == cfg.daemon_tgid
}

/// The calling process runs as the sidecar proxy's user or group (Istio's 1337).
#[inline(always)]
fn proxy_process(cfg: &Config) -> bool {
    // Accepted for cgroup sock_addr programs: sockets are made in a process context.
    let ids = bpf_get_current_uid_gid();
    let (uid, gid) = (ids as u32, (ids >> 32) as u32);
    let mut i = 0;
    while i < MAX_PROXY_IDS {
        if cfg.proxy_uids[i] == uid || cfg.proxy_gids[i] == gid {
            return true;
        }
        i += 1;
    }
    false
}

/// The daemon's listener of `slot` for `local`'s family and `protocol` is open right
/// now: its socket is in `dp_listeners`.
#[inline(always)]
fn listener_exists(slot: u32, local: &Addr, protocol: u32) -> bool {
    if slot >= MAX_LISTENER_SLOTS {
        return false;
    }
    let index = dnsproxy_common::listener_index(
        slot,
        !local.is_ipv4_mapped(),
        protocol == u32::from(ip_proto::TCP),
    );
    // SAFETY: the map pointer is the map's definition; the key lives on the stack. A
    // socket map lookup returns a referenced socket (or null), released just below.
    let sk = unsafe {
        bpf_map_lookup_elem(
            ptr::from_ref(&LISTENERS).cast_mut().cast(),
            ptr::from_ref(&index).cast(),
        )
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: sk came from the lookup and is released exactly once.
    unsafe { bpf_sk_release(sk.cast()) };
    true
}

/// connect/sendmsg: DNS to a configured server goes to the local listener, a VIP to
/// one of its backends; everything else passes untouched.
#[inline(always)]
fn rewrite_destination(ctx: &SockAddrContext, family: Family) -> i32 {
    let Some(cfg) = config() else {
        count(stat::UNCONFIGURED);
        return ALLOW;
    };
    if cfg.listen_port == 0 {
        count(stat::UNCONFIGURED);
        return ALLOW;
    }
    let port = read_port(ctx);
    let dst = read_addr(ctx, family);
    if port == cfg.dns_port && is_dns_server(&dst) {
        redirect_dns(ctx, family, &cfg, dst);
        return ALLOW;
    }
    if may_be_vip(&dst) {
        // SAFETY: the value is copied out at once.
        if let Some(vip) = unsafe { VIPS.get(VipKey { addr: dst }) }.copied() {
            return translate_vip(ctx, family, &cfg, (dst, port), vip);
        }
    }
    count(stat::PASSED);
    ALLOW
}

/// False when `dst`'s bucket holds no VIP (an array read instead of a hash lookup).
#[inline(always)]
fn may_be_vip(dst: &Addr) -> bool {
    let bit = dst.vip_filter_bit();
    match VIP_FILTER.get(bit / 64) {
        Some(word) => word & (1u64 << (bit % 64)) != 0,
        None => true,
    }
}

/// `dst` is in one of the enabled slots of `dp_dns_servers` (filled from slot 0 on).
#[inline(always)]
fn is_dns_server(dst: &Addr) -> bool {
    let want = dst.ipv6_words();
    for i in 0..MAX_DNS_SERVERS {
        let Some(slot) = DNS_SERVERS.get(i) else {
            return false;
        };
        if slot.enabled == 0 {
            return false;
        }
        if slot.addr.ipv6_words() == want {
            return true;
        }
    }
    false
}

/// Remembers, in the socket's own storage, what `rewritten` stands for.
#[inline(always)]
fn remember(ctx: &SockAddrContext, orig: SockOrig) -> bool {
    // SAFETY: the storage belongs to this socket; the kernel frees it with the socket.
    let slot = unsafe { SOCK_ORIG.get_or_insert_ptr_mut(ctx, None) };
    if slot.is_null() {
        warn!(ctx, "dnsproxy: no socket storage");
        return false;
    }
    // SAFETY: non-null pointer into this socket's storage; written whole.
    unsafe { *slot = orig };
    true
}

#[inline(always)]
fn protocol(ctx: &SockAddrContext) -> u32 {
    // SAFETY: 4-byte context read.
    unsafe { ptr::read_volatile(&(*sock_addr(ctx)).protocol) }
}

/// DNS to a configured server → the local listener, if one listens in this netns.
#[inline(always)]
fn redirect_dns(ctx: &SockAddrContext, family: Family, cfg: &Config, dst: Addr) {
    let cookie = netns_cookie(ctx);
    if own_traffic(cookie, cfg) {
        count(stat::OWN_TRAFFIC);
        return;
    }
    let Some(Captured { slot, sidecar, .. }) = captured(cookie, cfg) else {
        count(stat::NOT_CAPTURED);
        return;
    };
    // As Istio's own capture: the proxy resolves its DNS clusters itself.
    if sidecar && proxy_process(cfg) {
        count(stat::PROXY_EXEMPT);
        return;
    }
    // A v4-mapped destination on a dual-stack socket travels over IPv4: the IPv4
    // listener serves it, written back as ::ffff:127.0.0.1.
    let local = if dst.is_ipv4_mapped() {
        LOOPBACK4
    } else {
        LOOPBACK6
    };
    if !listener_exists(slot, &local, protocol(ctx)) {
        count(stat::FAIL_OPEN);
        return;
    }
    let orig = SockOrig {
        original: dst,
        rewritten: local,
        original_port: cfg.dns_port,
        rewritten_port: cfg.listen_port,
    };
    if !remember(ctx, orig) {
        // Without the memory the reply could not be restored: leave DNS alone.
        count(stat::NO_STORAGE);
        return;
    }
    write_addr_port(ctx, family, &local, cfg.listen_port);
    count(stat::REDIRECTED);
}

/// The service `key` names in `view`, else in view 0 (every namespace's); only a VIP
/// that some view holds services of its own on (`scoped`) costs a second lookup.
#[inline(always)]
fn service(mut key: ServiceKey, view: u32, scoped: bool) -> Option<&'static ServiceValue> {
    if scoped && view != 0 {
        key.view = view;
        // SAFETY: the value is read at once; updates replace it whole.
        if let Some(own) = unsafe { SERVICES.get(key) } {
            return Some(own);
        }
        key.view = 0;
    }
    // SAFETY: as above.
    unsafe { SERVICES.get(key) }
}

/// A VIP → one of its backends, as the client's view translates it: random per
/// connection for TCP, stable per socket for UDP. No backend → the syscall fails at
/// once; a port the view does not declare → untouched.
#[inline(always)]
fn translate_vip(
    ctx: &SockAddrContext,
    family: Family,
    cfg: &Config,
    (dst, port): (Addr, u16),
    vip: VipInfo,
) -> i32 {
    let Some(Captured { view, sidecar, .. }) = captured(netns_cookie(ctx), cfg) else {
        count(stat::NOT_CAPTURED);
        return ALLOW;
    };
    // The proxy has a listener for a declared VIP: its capture must see the VIP as the
    // original destination, so the connect goes through untouched.
    if sidecar && vip.flags & VIP_DECLARED != 0 {
        count(stat::SIDECAR_PASSTHROUGH);
        return ALLOW;
    }
    let protocol = protocol(ctx);
    let key = ServiceKey {
        addr: dst,
        port,
        protocol: protocol as u8,
        _pad: 0,
        view: 0,
    };
    let service = match service(key, view, vip.flags & VIP_SCOPED != 0) {
        Some(s) if s.count != PORT_UNDECLARED => s,
        _ => {
            count(stat::VIP_PORT_UNKNOWN);
            return ALLOW;
        }
    };
    let n = service.count as usize;
    if n == 0 || n > MAX_BACKENDS {
        count(stat::NO_BACKEND);
        return DENY;
    }
    let pick = if protocol == u32::from(ip_proto::TCP) {
        // SAFETY: helper without arguments.
        unsafe { bpf_get_prandom_u32() }
    } else {
        // SAFETY: helper accepted for cgroup sock_addr programs.
        unsafe { bpf_get_socket_cookie(ctx.as_ptr()) as u32 }
    };
    let index = pick.checked_rem(n as u32).unwrap_or(0);
    // The verifier does not bound `%`; the mask does, and the volatile read keeps the
    // compiler from dropping the mask it can prove redundant.
    // SAFETY: reading a local.
    let index = unsafe { ptr::read_volatile(&index) } as usize & (MAX_BACKENDS - 1);
    let Some(backend) = service.backends.get(index).copied() else {
        count(stat::NO_BACKEND);
        return DENY;
    };
    if family == Family::V4 && !backend.addr.is_ipv4_mapped() {
        count(stat::NO_BACKEND);
        return DENY;
    }
    let orig = SockOrig {
        original: dst,
        rewritten: backend.addr,
        original_port: port,
        rewritten_port: backend.port,
    };
    // Connectivity first: translate even when getpeername could not be restored.
    let remembered = remember(ctx, orig);
    write_addr_port(ctx, family, &backend.addr, backend.port);
    count(if remembered {
        stat::TRANSLATED
    } else {
        stat::NO_STORAGE
    });
    ALLOW
}

/// recvmsg/getpeername: traffic from the address we rewrote to is reported as coming
/// from the address the application asked for.
#[inline(always)]
fn restore_peer(ctx: &SockAddrContext, family: Family) {
    let peer = read_addr(ctx, family);
    let port = read_port(ctx);
    // SAFETY: lookup without create; the storage belongs to this socket.
    let slot = unsafe { SOCK_ORIG.get_ptr_mut(ctx) };
    if slot.is_null() {
        let from_listener = match config() {
            Some(cfg) => {
                cfg.listen_port != 0
                    && port == cfg.listen_port
                    && (peer == LOOPBACK4 || peer == LOOPBACK6)
            }
            None => false,
        };
        count(if from_listener {
            stat::RESTORE_MISS
        } else {
            stat::PASSED
        });
        return;
    }
    // SAFETY: non-null pointer into this socket's storage; copied out whole.
    let orig = unsafe { *slot };
    if orig.rewritten != peer || orig.rewritten_port != port {
        count(stat::PASSED);
        return;
    }
    write_addr_port(ctx, family, &orig.original, orig.original_port);
    count(stat::RESTORED);
}
