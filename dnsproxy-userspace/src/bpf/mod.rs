//! The kernel side as the daemon sees it: environment checks (`system`), loading,
//! attaching and pinning the programs (`datapath`), and reading pinned maps (`pinned`).
pub mod datapath;
pub mod features;
mod link;
pub mod listeners;
pub mod netns_cookie;
pub mod pinned;
pub mod system;

use std::net::IpAddr;

use dnsproxy_common::Addr;

/// The 16-byte map form of an address (IPv4 becomes IPv4-mapped).
pub fn to_map_addr(ip: IpAddr) -> Addr {
    let octets = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    Addr::from_octets(octets)
}

/// The address a map holds, IPv4-mapped shown as IPv4.
pub fn from_map_addr(addr: &Addr) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(addr.octets());
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// Errors of the kernel side, each saying what is missing and how to get it.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// Not running as root.
    #[error("dnsproxy run needs root (CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN): run it with sudo")]
    NotRoot,
    /// No cgroup v2 hierarchy is mounted.
    #[error(
        "no cgroup v2 (cgroup2) mount found in /proc/self/mountinfo: mount one, e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified`"
    )]
    NoCgroup2,
    /// The kernel lacks features the data path needs (`dnsproxy check` lists all).
    #[error(
        "kernel {kernel} lacks what the data path needs: {missing} (`dnsproxy check` lists every feature)"
    )]
    MissingFeatures { kernel: String, missing: String },
    /// bpffs is not mounted and could not be mounted.
    #[error("bpffs is not mounted at {path} and mounting it failed")]
    BpffsMount {
        path: String,
        source: std::io::Error,
    },
    /// The pin directory is not on bpffs.
    #[error("{path} is not on a bpf filesystem (bpffs)")]
    NotBpffs { path: String },
    /// The pin directory is not the daemon's own (owner, mode, symlink).
    #[error(transparent)]
    PinDir(#[from] crate::private_dir::PrivateDirError),
    /// Another daemon holds the pin directory.
    #[error("another dnsproxy is running with pin directory {path}")]
    PinDirBusy { path: String },
    /// The cgroup could not be opened or created.
    #[error("cgroup {path}")]
    Cgroup {
        path: String,
        source: std::io::Error,
    },
    /// The path given as cgroup is not in a cgroup v2 hierarchy.
    #[error("{path} is not a cgroup v2 directory (no cgroup.procs)")]
    NotCgroup2 { path: String },
    /// Loading the object failed.
    #[error("loading the eBPF object")]
    Load(#[source] aya::EbpfError),
    /// Loading one program into the kernel failed (the verifier log is in the source).
    #[error("loading program {program}")]
    LoadProgram {
        program: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    /// The embedded object lacks a program or map this daemon expects.
    #[error("{what} missing from the eBPF object (a build from another version?)")]
    Missing { what: String },
    /// Attaching a program failed.
    #[error("attaching {program} to {cgroup}")]
    Attach {
        program: String,
        cgroup: String,
        #[source]
        source: Cause,
    },
    /// More DNS servers than the programs scan.
    #[error(
        "{count} DNS servers to capture, at most {max} are supported (--dns-server, or the nameservers of --resolv-conf)",
        max = dnsproxy_common::MAX_DNS_SERVERS
    )]
    TooManyDnsServers { count: usize },
    /// A socket's address or network namespace cookie could not be read (for
    /// `dp_listeners`, or the daemon's own namespace for `dp_config`).
    #[error("reading a socket's address or network namespace cookie")]
    Listener(#[source] std::io::Error),
    /// A map operation failed.
    #[error("map {map}")]
    Map {
        map: String,
        #[source]
        source: aya::maps::MapError,
    },
    /// Pinning, unpinning or the pin directory failed.
    #[error("pin {path}")]
    Pin {
        path: String,
        #[source]
        source: Cause,
    },
}

/// The cause of an attach or pin failure: aya's program, link and pin errors, or the
/// system's.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Turns a map operation's error into [`BpfError::Map`] naming the map.
pub fn map_err(map: &str) -> impl Fn(aya::maps::MapError) -> BpfError + '_ {
    move |source| BpfError::Map {
        map: map.to_owned(),
        source,
    }
}

/// A [`BpfError::Pin`] for `path`.
pub fn pin_err(path: &std::path::Path) -> impl Fn(std::io::Error) -> BpfError + '_ {
    move |source| BpfError::Pin {
        path: path.display().to_string(),
        source: source.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_addresses_round_trip() {
        for ip in [
            "10.96.0.10",
            "127.0.0.1",
            "fd00::10",
            "::1",
            "::ffff:1.2.3.4",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let back = from_map_addr(&to_map_addr(ip));
            let want = match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
                IpAddr::V4(_) => ip,
            };
            assert_eq!(back, want);
        }
        assert_eq!(
            to_map_addr("127.0.0.1".parse().unwrap()),
            dnsproxy_common::LOOPBACK4
        );
        assert_eq!(
            to_map_addr("::1".parse().unwrap()),
            dnsproxy_common::LOOPBACK6
        );
        assert_eq!(
            to_map_addr("10.96.0.10".parse().unwrap()),
            Addr::from_ipv4_be(u32::from_ne_bytes([10, 96, 0, 10]))
        );
    }
}
