//! The kernel's receive queues of the UDP listeners: how much a shared listener may
//! queue (`--udp-receive-buffer`), and how many datagrams the kernel dropped because a
//! queue was full (`dnsproxy_udp_receive_drops_total`).
//!
//! Every client of the local listener shares its queues: a burst from one client (a
//! scheduler stall of the daemon is enough) fills a default queue of ~200 KiB, a few
//! hundred queries, in milliseconds, and the others' queries are dropped with it. A
//! pod's own listener (node mode) queues only that pod's queries and keeps the kernel's
//! default.
use std::{
    collections::HashMap,
    os::fd::{AsRawFd, RawFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

/// Asks for a receive buffer of `bytes` on `sock`. As root the kernel's
/// `net.core.rmem_max` does not cap it (`SO_RCVBUFFORCE`); otherwise it does
/// (`SO_RCVBUF`). Returns the size the kernel granted (it doubles what is asked, for
/// its bookkeeping).
pub fn set_buffer(sock: &impl AsRawFd, bytes: usize) -> std::io::Result<usize> {
    let fd = sock.as_raw_fd();
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    if crate::sockopt::set(fd, libc::SO_RCVBUFFORCE, value).is_err() {
        crate::sockopt::set(fd, libc::SO_RCVBUF, value)?;
    }
    let granted: libc::c_int = crate::sockopt::get(fd, libc::SO_RCVBUF)?;
    Ok(usize::try_from(granted).unwrap_or(0))
}

/// Datagrams the kernel dropped on `fd` (`SO_MEMINFO`'s `SK_MEMINFO_DROPS`).
fn dropped(fd: RawFd) -> u64 {
    /// `SK_MEMINFO_DROPS`, the last of the values (kernel 4.4 on).
    const DROPS: usize = 8;
    crate::sockopt::get::<[u32; DROPS + 1]>(fd, libc::SO_MEMINFO)
        .map_or(0, |info| u64::from(info[DROPS]))
}

/// The drop counts of every serving UDP listener socket, and of those already closed.
#[derive(Debug, Default)]
pub struct Drops {
    /// Drops of sockets no longer served.
    closed: AtomicU64,
    /// Sockets served right now, by registration.
    live: Mutex<HashMap<u64, RawFd>>,
    next: AtomicU64,
}

impl Drops {
    /// Counts `sock`'s drops until the returned guard is dropped, which must happen
    /// before the socket is closed.
    pub fn watch(self: &Arc<Self>, sock: &impl AsRawFd) -> Watched {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, sock.as_raw_fd());
        Watched {
            drops: Arc::clone(self),
            id,
        }
    }

    /// Every drop so far, of the sockets served now and of those closed.
    pub fn total(&self) -> u64 {
        let live: u64 = self.lock().values().map(|&fd| dropped(fd)).sum();
        self.closed.load(Ordering::Relaxed) + live
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, RawFd>> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A socket whose drops are counted; dropping this keeps its count among the closed.
#[derive(Debug)]
pub struct Watched {
    drops: Arc<Drops>,
    id: u64,
}

impl Drop for Watched {
    fn drop(&mut self) {
        // Under the lock, so that no scrape reads the descriptor after it is closed.
        let mut live = self.drops.lock();
        if let Some(fd) = live.remove(&self.id) {
            self.drops.closed.fetch_add(dropped(fd), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_counts_its_drops_and_a_closed_socket_keeps_them() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // The smallest queue the kernel allows: a burst overflows it.
        crate::sockopt::set(sock.as_raw_fd(), libc::SO_RCVBUF, 0).unwrap();
        let to = sock.local_addr().unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let drops = Arc::new(Drops::default());
        let watched = drops.watch(&sock);
        assert_eq!(drops.total(), 0);
        for _ in 0..200 {
            client.send_to(&[0u8; 64], to).unwrap();
        }
        let seen = drops.total();
        assert!(seen > 0, "a full queue dropped nothing");
        drop(watched);
        drop(sock);
        assert_eq!(drops.total(), seen, "a closed socket's drops stay counted");
    }

    #[test]
    fn root_gets_a_buffer_past_rmem_max() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let granted = set_buffer(&sock, 4 << 20).unwrap();
        // SAFETY: no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // The kernel reports double what it granted.
            assert_eq!(granted, 8 << 20);
        } else {
            assert!(granted > 0);
        }
    }
}
