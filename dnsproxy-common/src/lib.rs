//! Types shared by the dnsproxy eBPF programs and the userspace daemon: map keys and
//! values (`#[repr(C)]`, explicit padding, integer flags), counter indices and
//! constants. Every address in a map is 16 bytes in network order; an IPv4 address is
//! stored IPv4-mapped (`::ffff:a.b.c.d`), so one key type serves both families.
//! Ports in maps are in host order, so `bpftool map dump` prints them readably.
#![cfg_attr(not(test), no_std)]

/// Version of the pinned map/program layout. Pins live under
/// `/sys/fs/bpf/dnsproxy/v{LAYOUT_VERSION}/`, so a layout change never reuses an old pin.
pub const LAYOUT_VERSION: u32 = 5;

/// Default port the userspace DNS server listens on (127.0.0.1 and `::1`).
pub const DEFAULT_LISTEN_PORT: u16 = 15053;

/// The DNS port the programs intercept.
pub const DNS_PORT: u16 = 53;

/// IP protocol numbers, as `bpf_sock_addr.protocol` and `ServiceKey::protocol` hold them.
/// Taken from `network-types`, so that both sides name them as the IP header does.
pub mod ip_proto {
    use network_types::ip::IpProto;

    pub const TCP: u8 = IpProto::Tcp as u8;
    pub const UDP: u8 = IpProto::Udp as u8;
}

/// Map names in the object, also their pin file names (bpffs refuses names with `.`;
/// the kernel keeps 15 characters of a map name).
pub mod map_names {
    pub const CONFIG: &str = "dp_config";
    pub const DNS_SERVERS: &str = "dp_dns_servers";
    pub const POLICY: &str = "dp_policy";
    pub const STATS: &str = "dp_stats";
    pub const SOCK_ORIG: &str = "dp_sock_orig";
    pub const VIPS: &str = "dp_vips";
    pub const SERVICES: &str = "dp_services";
    pub const VIP_FILTER: &str = "dp_vip_filter";
    pub const LISTENERS: &str = "dp_listeners";
    /// Every map the daemon pins.
    pub const ALL: [&str; 9] = [
        CONFIG,
        DNS_SERVERS,
        POLICY,
        STATS,
        SOCK_ORIG,
        VIPS,
        SERVICES,
        VIP_FILTER,
        LISTENERS,
    ];
}

/// The netns cookie probe (kernels without `SO_NETNS_COOKIE`): its program, attached to
/// a probe cgroup of the daemon's only, and its map, neither pinned.
pub const NETNS_PROBE_PROGRAM: &str = "dnsproxy_netns_probe";
pub const NETNS_PROBE_MAP: &str = "dp_netns_probe";
/// Probes in flight at once, at most (each is removed once read).
pub const MAX_NETNS_PROBES: u32 = 1024;

/// Program names as they appear in the object (function names) and as pin file names.
pub const PROGRAMS: [&str; 8] = [
    "dnsproxy_connect4",
    "dnsproxy_connect6",
    "dnsproxy_sendmsg4",
    "dnsproxy_sendmsg6",
    "dnsproxy_recvmsg4",
    "dnsproxy_recvmsg6",
    "dnsproxy_getpeername4",
    "dnsproxy_getpeername6",
];

/// Buckets of `dp_vip_filter`, and the u64 words that hold them.
pub const VIP_FILTER_BITS: u32 = 4096;
pub const VIP_FILTER_WORDS: u32 = VIP_FILTER_BITS / 64;

/// A 16-byte address in network byte order; IPv4 is IPv4-mapped. Held as the words the
/// kernel's `user_ip6` uses (network-order bytes in memory), so that the data path
/// builds, stores and compares it with 4-byte moves: built byte by byte, the compiler
/// zero-fills it with a `memset` subprogram (a BPF-to-BPF call and a byte loop).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Addr {
    words: [u32; 4],
}

/// The third word of an IPv4-mapped address (`::ffff:0:0/96`).
const MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl Addr {
    /// `::ffff:a.b.c.d` for an IPv4 address given as the kernel's network-order u32.
    #[inline(always)]
    pub const fn from_ipv4_be(ip4_be: u32) -> Self {
        Addr {
            words: [0, 0, MAPPED_WORD, ip4_be],
        }
    }

    /// The address from the kernel's `user_ip6` words (network order in memory).
    #[inline(always)]
    pub const fn from_ipv6_words(words: [u32; 4]) -> Self {
        Addr { words }
    }

    /// The address of 16 network-order bytes.
    #[inline(always)]
    pub const fn from_octets(o: [u8; 16]) -> Self {
        Addr {
            words: [
                u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
                u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
                u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
                u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
            ],
        }
    }

    /// Words as `user_ip6` wants them.
    #[inline(always)]
    pub const fn ipv6_words(&self) -> [u32; 4] {
        self.words
    }

    /// The 16 network-order bytes.
    #[inline(always)]
    pub const fn octets(&self) -> [u8; 16] {
        let [a, b, c, d] = self.words;
        let (a, b, c, d) = (
            a.to_ne_bytes(),
            b.to_ne_bytes(),
            c.to_ne_bytes(),
            d.to_ne_bytes(),
        );
        [
            a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
            d[2], d[3],
        ]
    }

    /// This address's bucket in `dp_vip_filter` (0..[`VIP_FILTER_BITS`]): its /12 for
    /// IPv4, its /48 folded to 12 bits for IPv6. A destination whose bucket holds no
    /// VIP is no VIP: the pass path skips the `dp_vips` lookup.
    #[inline(always)]
    pub const fn vip_filter_bit(&self) -> u32 {
        let o = self.octets();
        if self.is_ipv4_mapped() {
            ((o[12] as u32) << 4) | ((o[13] as u32) >> 4)
        } else {
            (((o[0] ^ o[2] ^ o[4]) as u32) << 4) ^ ((o[1] ^ o[3] ^ o[5]) as u32)
        }
    }

    /// True for `::ffff:a.b.c.d`.
    #[inline(always)]
    pub const fn is_ipv4_mapped(&self) -> bool {
        self.words[0] == 0 && self.words[1] == 0 && self.words[2] == MAPPED_WORD
    }

    /// The IPv4 address as the kernel's network-order u32 (meaningful when mapped).
    #[inline(always)]
    pub const fn ipv4_be(&self) -> u32 {
        self.words[3]
    }
}

impl core::fmt::Debug for Addr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Addr({})", core::net::Ipv6Addr::from(self.octets()))
    }
}

/// `127.0.0.1` as stored in maps.
pub const LOOPBACK4: Addr =
    Addr::from_octets([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1]);
/// `::1`.
pub const LOOPBACK6: Addr = Addr::from_octets([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);

/// Value of the single-entry `dp_config` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Port of the userspace DNS listener (host order). 0 = redirect disabled.
    pub listen_port: u16,
    /// Port intercepted on the DNS servers (host order), normally 53.
    pub dns_port: u16,
    /// 1: capture every socket in the attached cgroup (local/dev mode);
    /// 0: capture only network namespaces present in `dp_policy`.
    pub capture_all: u32,
    /// Process id (tgid, as the kernel sees it) of the daemon: its own sockets are never
    /// rewritten, so its upstream queries cannot loop back into it.
    pub daemon_tgid: u32,
    pub _pad: u32,
    /// Local mode: the cookie of the daemon's network namespace, whose listeners are
    /// slot 0 of `dp_listeners` (sockets of other namespaces in the cgroup have none).
    pub local_netns: u64,
    /// The sidecar proxy's user and group ids (Istio's 1337): in a pod with a sidecar
    /// ([`NetnsPolicy::sidecar`]) their DNS is never captured, as Istio's own capture
    /// exempts them. [`NO_ID`] fills unused slots.
    pub proxy_uids: [u32; MAX_PROXY_IDS],
    pub proxy_gids: [u32; MAX_PROXY_IDS],
}

/// Slots of [`Config::proxy_uids`] and [`Config::proxy_gids`].
pub const MAX_PROXY_IDS: usize = 4;
/// An unused proxy id slot.
pub const NO_ID: u32 = u32::MAX;

/// Slots of `dp_dns_servers`: at most this many DNS servers are captured.
pub const MAX_DNS_SERVERS: u32 = 8;

/// A slot of `dp_dns_servers`, an array the programs scan in order up to the first
/// disabled slot: for the one to three servers a node has, cheaper than a hash lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsServer {
    /// An address whose port-53 traffic is redirected.
    pub addr: Addr,
    /// 1: a server; 0: this slot and the ones after it are unused.
    pub enabled: u32,
    pub _pad: u32,
}

/// Listener slots of `dp_listeners`: slot 0 is local mode's; node mode gives each
/// captured network namespace one of its own, as many as `dp_policy` holds.
pub const MAX_LISTENER_SLOTS: u32 = 16384;

/// Listeners in a slot: UDP and TCP, IPv4 and IPv6.
pub const LISTENERS_PER_SLOT: u32 = 4;

/// Index in `dp_listeners` (a socket array) of `slot`'s listener for the family and
/// protocol. The daemon puts its listening sockets there; the kernel removes a socket
/// when it closes, so an entry means a live listener.
#[inline(always)]
pub const fn listener_index(slot: u32, ipv6: bool, tcp: bool) -> u32 {
    slot * LISTENERS_PER_SLOT + (ipv6 as u32) * 2 + tcp as u32
}

/// Value of `dp_policy`, keyed by network-namespace cookie (u64).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetnsPolicy {
    /// 1: redirect DNS of sockets in this netns (and translate their VIPs).
    pub capture_dns: u32,
    /// The slot of this netns's listeners in `dp_listeners` (1 and up).
    pub listener_slot: u32,
    /// The view of this netns's namespace (1 and up; 0: the view every namespace
    /// shares): its own `dp_services` entries, looked up first on a VIP whose
    /// [`VipInfo::scoped`] says it has some.
    pub view: u32,
    /// 1: the pod has a sidecar proxy (Istio's): the proxy's own DNS is not captured,
    /// and a VIP the proxy knows ([`VIP_DECLARED`]) is left to it, not translated.
    pub sidecar: u32,
}

/// Per-socket memory of the last rewrite (socket-local storage, freed with the socket):
/// traffic from `rewritten` is reported as coming from `original`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOrig {
    pub original: Addr,
    pub rewritten: Addr,
    pub original_port: u16,
    pub rewritten_port: u16,
}

/// Default size of `dp_vips`: every auto-allocated VIP (240.240.0.1 to 240.240.255.254)
/// and its IPv6 twin (`--max-vips`).
pub const MAX_VIPS: u32 = 131_072;

/// Default size of `dp_services`: two ports for every VIP (`--max-vip-services`).
pub const MAX_VIP_SERVICES: u32 = 262_144;

/// Most backends one service (VIP, port, protocol) holds, inline in its map value.
/// A power of two, so the kernel side can bound an index with a mask.
pub const MAX_BACKENDS: usize = 16;

/// Key of `dp_vips`: an address that is a virtual IP handed out by dnsproxy (or
/// declared in a `ServiceEntry`). Its presence makes unknown ports and missing backends
/// decisions of their own.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipKey {
    pub addr: Addr,
}

/// Value of `dp_vips`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipInfo {
    /// Number of (port, protocol) services declared on this VIP: `dnsproxy maps` shows
    /// it, so that a `vip_port_unknown` count can be matched against what is declared.
    /// Those of view 0, the entry every namespace sees.
    pub ports: u32,
    /// [`VIP_SCOPED`], [`VIP_DECLARED`].
    pub flags: u32,
}

/// [`VipInfo::flags`]: some namespace's view holds other services on this VIP (an entry
/// only it sees, or its own that comes first): a client in a view looks there first.
pub const VIP_SCOPED: u32 = 1;
/// [`VipInfo::flags`]: an address an entry declares (`spec.addresses`, or Istio's own
/// allocation in `status.addresses`), which a sidecar proxy has a listener for; not one
/// dnsproxy allocated.
pub const VIP_DECLARED: u32 = 2;

/// Key of `dp_services`: a VIP, a declared port (host order), the IP protocol, and
/// the view it is translated for (0: every namespace's; node mode's namespaces have
/// their own, [`NetnsPolicy::view`], for what they see differently).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceKey {
    pub addr: Addr,
    pub port: u16,
    /// [`ip_proto::TCP`] or [`ip_proto::UDP`].
    pub protocol: u8,
    pub _pad: u8,
    pub view: u32,
}

/// [`ServiceValue::count`] of a port that a view's own entry does not declare, while the
/// entry of view 0 does: the client's view says "not a service here", and its connect
/// is left alone instead of falling back to view 0.
pub const PORT_UNDECLARED: u32 = u32::MAX;

/// One backend of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: Addr,
    /// Host order.
    pub port: u16,
    pub _pad: u16,
}

/// Value of `dp_services`: the backends inline, so an update replaces the whole set
/// at once and the kernel never sees half of it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Valid entries at the front of `backends`; 0 = the VIP fails closed;
    /// [`PORT_UNDECLARED`]: not a service in this view.
    pub count: u32,
    pub _pad: u32,
    pub backends: [Backend; MAX_BACKENDS],
}

/// Indices of the per-CPU counters in `dp_stats`. Every decision a program takes
/// increments exactly one of these.
pub mod stat {
    /// Not DNS to a configured server (nothing to do).
    pub const PASSED: u32 = 0;
    /// DNS to a configured server, rewritten to the local listener.
    pub const REDIRECTED: u32 = 1;
    /// DNS to a configured server, captured, but no listener in the netns: left alone.
    pub const FAIL_OPEN: u32 = 2;
    /// DNS to a configured server from a netns that is not captured.
    pub const NOT_CAPTURED: u32 = 3;
    /// Socket storage could not be allocated: left alone (the reply could not be restored).
    pub const NO_STORAGE: u32 = 4;
    /// recvmsg/getpeername source rewritten back to the original address.
    pub const RESTORED: u32 = 5;
    /// recvmsg/getpeername from the listener, but no remembered original.
    pub const RESTORE_MISS: u32 = 6;
    /// Configuration missing (listen port 0): left alone.
    pub const UNCONFIGURED: u32 = 7;
    /// DNS from the daemon itself (its upstream queries): left alone.
    pub const OWN_TRAFFIC: u32 = 8;
    /// connect/sendmsg to a VIP rewritten to a backend.
    pub const TRANSLATED: u32 = 9;
    /// VIP with no backend: the syscall fails at once (EPERM).
    pub const NO_BACKEND: u32 = 10;
    /// VIP on a port its `ServiceEntry` does not declare: left alone.
    pub const VIP_PORT_UNKNOWN: u32 = 11;
    /// DNS from the sidecar proxy's user or group in a pod with a sidecar: left alone.
    pub const PROXY_EXEMPT: u32 = 12;
    /// A declared VIP from a pod with a sidecar: left to the proxy, not translated.
    pub const SIDECAR_PASSTHROUGH: u32 = 13;
    /// Number of counters.
    pub const COUNT: u32 = 14;

    /// Names, indexed by counter, as shown by `dnsproxy maps` and `/metrics`.
    pub const NAMES: [&str; COUNT as usize] = [
        "passed",
        "redirected",
        "fail_open",
        "not_captured",
        "no_storage",
        "restored",
        "restore_miss",
        "unconfigured",
        "own_traffic",
        "translated",
        "no_backend",
        "vip_port_unknown",
        "proxy_exempt",
        "sidecar_passthrough",
    ];
}

#[cfg(feature = "user")]
mod user {
    use super::{
        Addr, Backend, Config, DnsServer, NetnsPolicy, ServiceKey, ServiceValue, SockOrig, VipInfo,
        VipKey,
    };
    // SAFETY: all are #[repr(C)], Copy, with explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for Addr {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for DnsServer {}
    unsafe impl aya::Pod for NetnsPolicy {}
    unsafe impl aya::Pod for SockOrig {}
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipInfo {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for ServiceValue {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_mapped_round_trip() {
        let be = u32::from_ne_bytes([10, 96, 0, 10]);
        let a = Addr::from_ipv4_be(be);
        assert!(a.is_ipv4_mapped());
        assert_eq!(a.ipv4_be(), be);
        assert_eq!(&a.octets()[10..], &[0xff, 0xff, 10, 96, 0, 10]);
        assert!(LOOPBACK4.is_ipv4_mapped());
        assert!(!LOOPBACK6.is_ipv4_mapped());
    }

    #[test]
    fn ipv6_words_round_trip() {
        let octets = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
        let a = Addr::from_octets(octets);
        assert_eq!(Addr::from_ipv6_words(a.ipv6_words()), a);
        assert_eq!(a.ipv6_words()[0].to_ne_bytes(), [0xfd, 0, 0, 0]);
    }

    #[test]
    fn vip_filter_buckets_are_prefixes_in_range() {
        let v4 = |a: u8, b: u8, c: u8, d: u8| Addr::from_ipv4_be(u32::from_ne_bytes([a, b, c, d]));
        // Every auto-allocated IPv4 VIP shares one bucket (240.240.0.0/12)...
        let auto = v4(240, 240, 0, 1).vip_filter_bit();
        assert_eq!(auto, v4(240, 255, 255, 254).vip_filter_bit());
        // ...which the usual pod and service ranges are not in.
        for other in [v4(10, 96, 0, 10), v4(10, 244, 1, 5), v4(203, 0, 113, 10)] {
            assert_ne!(other.vip_filter_bit(), auto);
        }
        let v6 = |s: &str| Addr::from_octets(s.parse::<std::net::Ipv6Addr>().unwrap().octets());
        assert_eq!(
            v6("2001:2::1").vip_filter_bit(),
            v6("2001:2::ffff").vip_filter_bit(),
            "one /48, one bucket"
        );
        for a in [
            v6("2001:2::1"),
            v6("fd00::10"),
            v6("ffff:ffff:ffff::"),
            LOOPBACK6,
        ] {
            assert!(a.vip_filter_bit() < VIP_FILTER_BITS);
        }
        assert!(v4(255, 255, 255, 255).vip_filter_bit() < VIP_FILTER_BITS);
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<Config>(), 56);
        assert_eq!(size_of::<DnsServer>(), 24);
        assert_eq!(size_of::<SockOrig>(), 36);
        assert_eq!(size_of::<NetnsPolicy>(), 16);
        assert_eq!(size_of::<ServiceKey>(), 24);
        assert_eq!(size_of::<VipInfo>(), 8);
        assert_eq!(size_of::<Backend>(), 20);
        assert_eq!(size_of::<ServiceValue>(), 8 + 20 * MAX_BACKENDS);
        assert!(MAX_BACKENDS.is_power_of_two());
        assert_eq!((ip_proto::TCP, ip_proto::UDP), (6, 17));
        assert_eq!(stat::NAMES.len(), stat::COUNT as usize);
    }
}
