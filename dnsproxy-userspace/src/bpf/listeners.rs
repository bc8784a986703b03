//! `dp_listeners`: the daemon's listening sockets by network namespace, family and
//! protocol. The programs redirect DNS to a namespace's listener only while its socket
//! is in the map, and the kernel removes a socket from the map when it closes: a daemon
//! that dies leaves no entry behind, so its pods fail open at once. A map lookup costs
//! the programs far less than a socket lookup in the namespace.
use std::{
    os::fd::{AsRawFd, BorrowedFd},
    path::Path,
};

use aya::maps::{MapData, SockHash};
use dnsproxy_common::{ListenerKey, ip_proto, map_names};

use super::{BpfError, map_err, pinned};
use crate::netns::netns_cookie;

/// Puts `sockets` (bound UDP sockets and listening TCP sockets) in the pinned
/// `dp_listeners` of `pin_dir`, one per key: of a `SO_REUSEPORT` group the first
/// stands for all (they close together). A socket already there is put again, which
/// changes nothing.
pub fn register(pin_dir: &Path, sockets: &[BorrowedFd<'_>]) -> Result<(), BpfError> {
    let name = map_names::LISTENERS;
    let mut map: SockHash<MapData, ListenerKey> =
        SockHash::try_from(pinned::open(pin_dir, name)?).map_err(map_err(name))?;
    let mut done: Vec<ListenerKey> = Vec::with_capacity(4);
    for fd in sockets {
        let key = key(*fd).map_err(BpfError::Listener)?;
        if done.contains(&key) {
            continue;
        }
        map.insert(key, fd.as_raw_fd(), 0).map_err(map_err(name))?;
        done.push(key);
    }
    Ok(())
}

/// The map key of a listener: its namespace, family and protocol.
fn key(fd: BorrowedFd<'_>) -> std::io::Result<ListenerKey> {
    let sock = socket2::SockRef::from(&fd);
    let family = if sock.local_addr()?.is_ipv6() { 6 } else { 4 };
    let protocol = match sock.r#type()? {
        socket2::Type::STREAM => ip_proto::TCP,
        _ => ip_proto::UDP,
    };
    Ok(ListenerKey {
        netns_cookie: netns_cookie(&fd)?,
        family,
        protocol: u32::from(protocol),
    })
}
