//! `dp_listeners`: the daemon's listening sockets, four per slot (UDP and TCP, IPv4
//! and IPv6). Slot 0 is local mode's; in node mode each captured pod's network
//! namespace has its own, named in its `dp_policy` entry. The programs redirect DNS to
//! a namespace's listener only while its socket is in the map, and the kernel removes a
//! socket from the map when it closes: a daemon that dies leaves no entry behind, so
//! its pods fail open at once, and another program on the same port is never taken
//! for it. An array read costs the programs far less than a socket lookup.
use std::{
    collections::HashSet,
    os::fd::{AsRawFd, BorrowedFd},
    path::Path,
};

use aya::maps::{MapData, SockMap};
use dnsproxy_common::{LISTENERS_PER_SLOT, MAX_LISTENER_SLOTS, listener_index, map_names};

use super::{BpfError, map_err, pinned};

/// Local mode's slot.
pub const LOCAL_SLOT: u32 = 0;

/// Node mode's slots, one per captured network namespace.
pub const NODE_SLOTS: std::ops::Range<u32> = 1..MAX_LISTENER_SLOTS;

/// Puts `sockets` (bound UDP sockets and listening TCP sockets of one network
/// namespace) in `slot` of the pinned `dp_listeners` of `pin_dir`; the slot's entries
/// for a family or protocol `sockets` lack are cleared. Of a `SO_REUSEPORT` group the
/// first socket stands for all (they close together).
pub fn register(pin_dir: &Path, slot: u32, sockets: &[BorrowedFd<'_>]) -> Result<(), BpfError> {
    if slot >= MAX_LISTENER_SLOTS {
        let e = std::io::Error::other(format!("listener slot {slot} out of range"));
        return Err(BpfError::Listener(e));
    }
    let name = map_names::LISTENERS;
    let mut map: SockMap<MapData> =
        SockMap::try_from(pinned::open(pin_dir, name)?).map_err(map_err(name))?;
    let mut done = HashSet::new();
    for fd in sockets {
        let index = index(slot, *fd).map_err(BpfError::Listener)?;
        if done.insert(index) {
            map.set(index, &fd.as_raw_fd(), 0).map_err(map_err(name))?;
        }
    }
    for index in slot * LISTENERS_PER_SLOT..(slot + 1) * LISTENERS_PER_SLOT {
        if !done.contains(&index) {
            // Nothing there is the usual case.
            let _ = map.clear_index(&index);
        }
    }
    Ok(())
}

/// The index of a listener in `slot`: by its family and protocol.
fn index(slot: u32, fd: BorrowedFd<'_>) -> std::io::Result<u32> {
    let sock = socket2::SockRef::from(&fd);
    let ipv6 = sock.local_addr()?.is_ipv6();
    let tcp = sock.r#type()? == socket2::Type::STREAM;
    Ok(listener_index(slot, ipv6, tcp))
}

/// The lowest node-mode slot (1 and up) not in `used`.
pub fn free_slot(used: &HashSet<u32>) -> Option<u32> {
    NODE_SLOTS.into_iter().find(|s| !used.contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_slots_start_at_one_and_skip_used_ones() {
        assert_eq!(free_slot(&HashSet::new()), Some(1));
        assert_eq!(free_slot(&HashSet::from([1, 2, 4])), Some(3));
        let all: HashSet<u32> = (1..MAX_LISTENER_SLOTS).collect();
        assert_eq!(free_slot(&all), None);
    }

    #[test]
    fn slots_do_not_overlap() {
        let last = listener_index(1, true, true);
        assert_eq!(last, 7);
        assert_eq!(listener_index(2, false, false), last + 1);
    }
}
