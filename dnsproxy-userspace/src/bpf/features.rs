//! What the kernel offers the data path, probed one feature at a time and each named
//! with the Linux release that brought it: `dnsproxy check` prints the table, `dnsproxy
//! run` refuses to start without a required feature (naming it) and degrades, with a
//! log line and a metric, without an optional one.
//!
//! Each probe asks the kernel directly: a file, a socket option, a tiny program loaded
//! with the attach type or helper in question (the way libbpf and aya probe), a link
//! made to a cgroup of the probe's own. None leaves anything behind.
use std::{
    fmt,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use aya::{
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_program_supported},
};

use super::{BpfError, netns_cookie, system};

/// `enum bpf_prog_type` and `enum bpf_attach_type` values the probes load with
/// (include/uapi/linux/bpf.h).
const PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const ATTACH_INET4_CONNECT: u32 = 10;
const ATTACH_UDP4_RECVMSG: u32 = 19;
const ATTACH_INET4_GETPEERNAME: u32 = 29;
/// `enum bpf_map_type::BPF_MAP_TYPE_SOCKMAP`.
const MAP_TYPE_SOCKMAP: u32 = 15;
/// `enum bpf_cmd` values.
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
/// Helper ids (`enum bpf_func_id`).
const FUNC_MAP_LOOKUP_ELEM: i32 = 1;
const FUNC_SK_RELEASE: i32 = 86;

/// A feature of the kernel the daemon uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feature {
    Btf,
    Cgroup2,
    SockAddrHooks,
    RecvmsgHooks,
    GetpeernameHooks,
    NetnsCookieHelper,
    SocketStorage,
    SockMap,
    CgroupLinks,
    NetnsCookieSockopt,
    PidfdOpen,
    SetnsPidfd,
}

impl Feature {
    /// Every feature, in the order `dnsproxy check` lists them.
    pub const ALL: [Feature; 12] = [
        Feature::Btf,
        Feature::Cgroup2,
        Feature::SockAddrHooks,
        Feature::RecvmsgHooks,
        Feature::GetpeernameHooks,
        Feature::NetnsCookieHelper,
        Feature::SocketStorage,
        Feature::SockMap,
        Feature::CgroupLinks,
        Feature::NetnsCookieSockopt,
        Feature::PidfdOpen,
        Feature::SetnsPidfd,
    ];

    /// What it is, as the table names it.
    pub fn name(self) -> &'static str {
        match self {
            Feature::Btf => "kernel BTF (/sys/kernel/btf/vmlinux)",
            Feature::Cgroup2 => "a cgroup v2 hierarchy",
            Feature::SockAddrHooks => "cgroup connect/sendmsg hooks",
            Feature::RecvmsgHooks => "cgroup recvmsg hooks",
            Feature::GetpeernameHooks => "cgroup getpeername hooks",
            Feature::NetnsCookieHelper => "bpf_get_netns_cookie in sock_addr programs",
            Feature::SocketStorage => "socket local storage in sock_addr programs",
            Feature::SockMap => "SOCKMAP (lookup from programs)",
            Feature::CgroupLinks => "cgroup bpf_links",
            Feature::NetnsCookieSockopt => "SO_NETNS_COOKIE",
            Feature::PidfdOpen => "pidfd_open",
            Feature::SetnsPidfd => "setns through a pidfd",
        }
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Feature::Btf => "btf",
            Feature::Cgroup2 => "cgroup2",
            Feature::SockAddrHooks => "sock_addr_hooks",
            Feature::RecvmsgHooks => "recvmsg_hooks",
            Feature::GetpeernameHooks => "getpeername_hooks",
            Feature::NetnsCookieHelper => "netns_cookie_helper",
            Feature::SocketStorage => "socket_storage",
            Feature::SockMap => "sockmap",
            Feature::CgroupLinks => "cgroup_links",
            Feature::NetnsCookieSockopt => "so_netns_cookie",
            Feature::PidfdOpen => "pidfd_open",
            Feature::SetnsPidfd => "setns_pidfd",
        }
    }

    /// The Linux release that brought it.
    pub fn since(self) -> &'static str {
        match self {
            Feature::Btf => "5.4",
            Feature::Cgroup2 | Feature::SockAddrHooks => "4.18",
            Feature::RecvmsgHooks => "5.2",
            Feature::GetpeernameHooks | Feature::SetnsPidfd | Feature::SockMap => "5.8",
            Feature::NetnsCookieHelper | Feature::CgroupLinks => "5.7",
            Feature::SocketStorage | Feature::PidfdOpen => "5.3",
            Feature::NetnsCookieSockopt => "5.14",
        }
    }

    /// What the daemon does without it: `None` when it cannot run.
    pub fn without(self) -> Option<&'static str> {
        match self {
            Feature::NetnsCookieSockopt => Some(
                "netns cookies come from a probe program in a cgroup of the daemon's (cgroup/sock_create, 5.7)",
            ),
            _ => None,
        }
    }

    fn probe(self) -> Result<(), String> {
        match self {
            Feature::Btf => Path::new("/sys/kernel/btf/vmlinux")
                .exists()
                .then_some(())
                .ok_or_else(|| "needs CONFIG_DEBUG_INFO_BTF=y".to_owned()),
            Feature::Cgroup2 => system::cgroup2_mount().map(drop).map_err(|e| e.to_string()),
            Feature::SockAddrHooks => supported(is_program_supported(ProgramType::CgroupSockAddr)),
            Feature::RecvmsgHooks => load_sock_addr(ATTACH_UDP4_RECVMSG).map(drop),
            Feature::GetpeernameHooks => load_sock_addr(ATTACH_INET4_GETPEERNAME).map(drop),
            Feature::NetnsCookieHelper => supported(is_helper_supported(
                ProgramType::CgroupSockAddr,
                BpfHelper::BPF_FUNC_get_netns_cookie,
            )),
            Feature::SocketStorage => supported(is_helper_supported(
                ProgramType::CgroupSockAddr,
                BpfHelper::BPF_FUNC_sk_storage_get,
            )),
            Feature::SockMap => sockmap_lookup(),
            Feature::CgroupLinks => link_to_a_cgroup(),
            Feature::NetnsCookieSockopt => netns_cookie::has_sockopt()
                .then_some(())
                .ok_or_else(|| "ENOPROTOOPT".to_owned()),
            Feature::PidfdOpen => crate::pidfd::Pidfd::open(std::process::id())
                .map(drop)
                .map_err(|e| e.to_string()),
            Feature::SetnsPidfd => setns_through_pidfd(),
        }
    }
}

fn supported<E: fmt::Display>(probe: Result<bool, E>) -> Result<(), String> {
    match probe {
        Ok(true) => Ok(()),
        Ok(false) => Err("not supported".to_owned()),
        Err(e) => Err(e.to_string()),
    }
}

/// `bpf_attr` for `BPF_PROG_LOAD`, as far as the probes fill it.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// One instruction: opcode, destination and source registers, offset, immediate.
const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    (code as u64)
        | ((dst as u64 & 0xf) << 8)
        | ((src as u64 & 0xf) << 12)
        | ((off as u16 as u64) << 16)
        | ((imm as u32 as u64) << 32)
}

/// `r0 = 1; exit`: a `sock_addr` program that allows everything.
const ALLOW_ALL: [u64; 2] = [
    insn(0xb7, 0, 0, 0, 1), // BPF_ALU64 | BPF_MOV | BPF_K: r0 = 1
    insn(0x95, 0, 0, 0, 0), // BPF_JMP | BPF_EXIT
];

/// A `sock_addr` program that allows everything, loaded for `attach_type`.
fn load_sock_addr(attach_type: u32) -> Result<OwnedFd, String> {
    load_program(&ALLOW_ALL, attach_type)
}

/// A `sock_addr` program of `insns`, loaded for `attach_type`.
fn load_program(insns: &[u64], attach_type: u32) -> Result<OwnedFd, String> {
    let license = c"GPL";
    let attr = ProgLoadAttr {
        prog_type: PROG_TYPE_CGROUP_SOCK_ADDR,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type: attach_type,
        ..ProgLoadAttr::default()
    };
    // SAFETY: bpf(2) with an attr of the size passed; the program and license outlive
    // the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &raw const attr,
            size_of::<ProgLoadAttr>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A connect program that looks a socket up in a SOCKMAP and releases it, as the data
/// path's listener check does (the verifier refuses the lookup before Linux 5.8).
fn sockmap_lookup() -> Result<(), String> {
    let attr: [u32; 5] = [MAP_TYPE_SOCKMAP, 4, 4, 1, 0];
    // SAFETY: bpf(2) BPF_MAP_CREATE with map_type, key_size, value_size, max_entries,
    // map_flags.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            attr.as_ptr(),
            size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(format!("SOCKMAP: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a new descriptor that nothing else owns.
    let map = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let program = [
        // r1 = the map (BPF_LD | BPF_IMM | BPF_DW, BPF_PSEUDO_MAP_FD), two slots.
        insn(0x18, 1, 1, 0, map.as_raw_fd()),
        insn(0, 0, 0, 0, 0),
        insn(0x62, 10, 0, -4, 0), // *(u32 *)(r10 - 4) = 0: the key
        insn(0xbf, 2, 10, 0, 0),  // r2 = r10
        insn(0x07, 2, 0, 0, -4),  // r2 -= 4
        insn(0x85, 0, 0, 0, FUNC_MAP_LOOKUP_ELEM),
        insn(0x15, 0, 0, 2, 0), // if r0 == 0 goto +2
        insn(0xbf, 1, 0, 0, 0), // r1 = r0
        insn(0x85, 0, 0, 0, FUNC_SK_RELEASE),
        insn(0xb7, 0, 0, 0, 1), // r0 = 1
        insn(0x95, 0, 0, 0, 0), // exit
    ];
    load_program(&program, ATTACH_INET4_CONNECT).map(drop)
}

/// A `bpf_link` from a probe program to a cgroup made for it, then both removed.
fn link_to_a_cgroup() -> Result<(), String> {
    let program = load_sock_addr(ATTACH_INET4_CONNECT)?;
    let root = system::cgroup2_mount().map_err(|e| e.to_string())?;
    let dir = root.join(format!("dnsproxy-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let linked = (|| {
        let cgroup = std::fs::File::open(&dir).map_err(|e| e.to_string())?;
        let attr: [u32; 4] = [
            program.as_raw_fd().cast_unsigned(),
            cgroup.as_raw_fd().cast_unsigned(),
            ATTACH_INET4_CONNECT,
            0,
        ];
        // SAFETY: bpf(2) BPF_LINK_CREATE with prog_fd, target_fd, attach_type, flags.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_LINK_CREATE,
                attr.as_ptr(),
                size_of_val(&attr),
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        // SAFETY: a new descriptor that nothing else owns; closing it detaches.
        drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        Ok(())
    })();
    let _ = std::fs::remove_dir(&dir);
    linked
}

/// Enters the daemon's own network namespace through a pidfd of itself, on a thread
/// of its own (Linux 5.8 takes a pidfd in setns).
fn setns_through_pidfd() -> Result<(), String> {
    let me = crate::pidfd::Pidfd::open(std::process::id()).map_err(|e| e.to_string())?;
    std::thread::scope(|s| {
        s.spawn(|| {
            use std::os::fd::AsFd as _;
            // SAFETY: setns on a pidfd, for this thread only, into its own namespace.
            let rc = unsafe { libc::setns(me.as_fd().as_raw_fd(), libc::CLONE_NEWNET) };
            if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error().to_string())
            }
        })
        .join()
        .unwrap_or_else(|_| Err("the probe thread panicked".to_owned()))
    })
}

/// One feature as probed.
#[derive(Clone, Debug)]
pub struct Probed {
    pub feature: Feature,
    /// `Err`: why it is missing.
    pub result: Result<(), String>,
}

/// Every feature, probed.
#[derive(Clone, Debug)]
pub struct Report {
    pub kernel: String,
    pub features: Vec<Probed>,
}

impl Report {
    /// Probes every feature.
    pub fn probe() -> Self {
        Report {
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            features: Feature::ALL
                .into_iter()
                .map(|feature| Probed {
                    feature,
                    result: feature.probe(),
                })
                .collect(),
        }
    }

    /// Whether `feature` is there.
    pub fn has(&self, feature: Feature) -> bool {
        self.features
            .iter()
            .any(|p| p.feature == feature && p.result.is_ok())
    }

    /// Required features that are missing.
    pub fn missing_required(&self) -> Vec<&Probed> {
        self.features
            .iter()
            .filter(|p| p.result.is_err() && p.feature.without().is_none())
            .collect()
    }

    /// Fails naming every required feature that is missing, with the release that
    /// brought it.
    pub fn require(&self) -> Result<(), BpfError> {
        let missing = self.missing_required();
        if missing.is_empty() {
            return Ok(());
        }
        let missing = missing
            .iter()
            .map(|p| {
                let why = p.result.as_ref().err().map_or("", String::as_str);
                format!("{} (Linux {}): {why}", p.feature.name(), p.feature.since())
            })
            .collect::<Vec<_>>()
            .join("; ");
        Err(BpfError::MissingFeatures {
            kernel: self.kernel.clone(),
            missing,
        })
    }

    /// Optional features that are missing (the daemon degrades).
    pub fn degraded(&self) -> Vec<Feature> {
        self.features
            .iter()
            .filter(|p| p.result.is_err() && p.feature.without().is_some())
            .map(|p| p.feature)
            .collect()
    }
}

impl Report {
    /// The start-up log: the kernel, then one warning per missing optional feature.
    pub fn log(&self) {
        tracing::info!(kernel = %self.kernel, "every kernel feature the data path needs is there");
        for feature in self.degraded() {
            tracing::warn!(
                feature = feature.label(),
                since = feature.since(),
                "the kernel has no {}: {}",
                feature.name(),
                feature.without().unwrap_or_default()
            );
        }
    }

    /// `dnsproxy_kernel_feature_missing{feature}`: 1 for each optional feature this
    /// kernel lacks (the daemon runs degraded), 0 for the others.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        let family = prometheus_client::metrics::family::Family::<
            [(&'static str, &'static str); 1],
            prometheus_client::metrics::gauge::Gauge,
        >::default();
        for feature in Feature::ALL.into_iter().filter(|f| f.without().is_some()) {
            let missing = i64::from(!self.has(feature));
            family
                .get_or_create(&[("feature", feature.label())])
                .set(missing);
        }
        registry.register(
            "dnsproxy_kernel_feature_missing",
            "Optional kernel features this kernel lacks (1): the data path runs without them, as `dnsproxy check` says.",
            family,
        );
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "kernel {}", self.kernel)?;
        writeln!(f, "{:<46} {:>6}  status", "feature", "since")?;
        for p in &self.features {
            let status = match (&p.result, p.feature.without()) {
                (Ok(()), _) => "yes".to_owned(),
                (Err(why), Some(without)) => format!("no ({why}): {without}"),
                (Err(why), None) => format!("NO ({why}): required"),
            };
            writeln!(
                f,
                "{:<46} {:>6}  {status}",
                p.feature.name(),
                p.feature.since()
            )?;
        }
        let missing = self.missing_required();
        if missing.is_empty() {
            write!(f, "every required feature is there")
        } else {
            let names: Vec<String> = missing
                .iter()
                .map(|p| format!("{} (Linux {})", p.feature.name(), p.feature.since()))
                .collect();
            write!(f, "missing: {}", names.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(missing: &[Feature]) -> Report {
        Report {
            kernel: "5.10.0-32-amd64".to_owned(),
            features: Feature::ALL
                .into_iter()
                .map(|feature| Probed {
                    feature,
                    result: if missing.contains(&feature) {
                        Err("Invalid argument (os error 22)".to_owned())
                    } else {
                        Ok(())
                    },
                })
                .collect(),
        }
    }

    #[test]
    fn a_missing_optional_feature_degrades_and_a_missing_required_one_refuses_by_name() {
        let degraded = report(&[Feature::NetnsCookieSockopt]);
        assert!(degraded.require().is_ok());
        assert_eq!(degraded.degraded(), vec![Feature::NetnsCookieSockopt]);
        let text = degraded.to_string();
        assert!(text.contains("SO_NETNS_COOKIE"), "{text}");
        assert!(text.contains("probe program"), "{text}");
        assert!(text.ends_with("every required feature is there"), "{text}");

        let old = report(&[Feature::SockMap, Feature::GetpeernameHooks]);
        let err = old.require().unwrap_err().to_string();
        assert!(err.contains("kernel 5.10.0-32-amd64"), "{err}");
        assert!(
            err.contains("SOCKMAP (lookup from programs) (Linux 5.8)"),
            "{err}"
        );
        assert!(
            err.contains("cgroup getpeername hooks (Linux 5.8)"),
            "{err}"
        );
        assert!(
            old.to_string()
                .contains("NO (Invalid argument (os error 22)): required")
        );
    }

    #[test]
    fn every_feature_has_a_release_and_a_distinct_label() {
        let labels: std::collections::HashSet<_> = Feature::ALL.iter().map(|f| f.label()).collect();
        assert_eq!(labels.len(), Feature::ALL.len());
        for f in Feature::ALL {
            let (major, minor) = f.since().split_once('.').unwrap();
            assert!(major.parse::<u32>().is_ok() && minor.parse::<u32>().is_ok());
        }
    }
}
