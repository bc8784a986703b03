//! Batched UDP I/O for the receive loops: `recvmmsg` reads every queued query (up to
//! [`BATCH`]) in one system call and `sendmmsg` sends their answers in one more. The
//! buffers belong to the thread (each UDP thread serves its loops one at a time, and a
//! batch is never held across an await), so a pod's listener costs no buffer of its own,
//! and a batch allocates nothing.
use std::{
    cell::RefCell,
    io,
    mem::{MaybeUninit, size_of},
    net::SocketAddr,
    os::fd::RawFd,
    ptr,
};

use socket2::SockAddr;

use super::fast::MAX_KEPT;

/// Most datagrams read or sent per system call.
pub const BATCH: usize = 32;

/// Longest query read; a longer datagram is cut short by the kernel and dropped here
/// (no DNS client sends a query this long over UDP).
pub const MAX_QUERY: usize = 4096;

/// A thread's receive buffers: [`BATCH`] queries and their senders.
pub struct Received {
    bufs: Box<[[u8; MAX_QUERY]]>,
    addrs: Box<[libc::sockaddr_storage]>,
    iovecs: Box<[libc::iovec]>,
    headers: Box<[libc::mmsghdr]>,
}

impl Received {
    fn new() -> Self {
        let mut bufs = vec![[0u8; MAX_QUERY]; BATCH].into_boxed_slice();
        // SAFETY: an all-zero sockaddr_storage is a valid (unspecified) address.
        let mut addrs: Box<[libc::sockaddr_storage]> = (0..BATCH)
            .map(|_| unsafe { MaybeUninit::zeroed().assume_init() })
            .collect();
        let mut iovecs: Box<[libc::iovec]> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: MAX_QUERY,
            })
            .collect();
        let headers = iovecs
            .iter_mut()
            .zip(addrs.iter_mut())
            .map(|(iov, addr)| {
                // SAFETY: an all-zero msghdr is valid; the pointers set below stay valid
                // as long as the boxed slices they point into, which live with `self`
                // and never move their contents.
                let mut h: libc::mmsghdr = unsafe { MaybeUninit::zeroed().assume_init() };
                h.msg_hdr.msg_name = ptr::from_mut(addr).cast();
                h.msg_hdr.msg_iov = ptr::from_mut(iov);
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        Received {
            bufs,
            addrs,
            iovecs,
            headers,
        }
    }

    /// Reads what is queued on `fd` (non-blocking), at most [`BATCH`] datagrams.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        for (h, iov) in self.headers.iter_mut().zip(self.iovecs.iter()) {
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
            debug_assert_eq!(iov.iov_len, MAX_QUERY);
        }
        // SAFETY: `headers` holds BATCH valid mmsghdr whose buffers and names are ours.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.headers.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                ptr::null_mut(),
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// The `i`th datagram read and its sender; `None` when it was cut short or its
    /// sender is not an IP address.
    pub fn get(&self, i: usize) -> Option<(&[u8], SocketAddr)> {
        let h = &self.headers[i];
        if h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
            return None;
        }
        let len = usize::try_from(h.msg_len).ok()?.min(MAX_QUERY);
        Some((&self.bufs[i][..len], socket_addr(&self.addrs[i])?))
    }
}

/// The IP address and port in a sockaddr the kernel wrote.
fn socket_addr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says a sockaddr_in is there; storage is large enough
            // and aligned for every sockaddr type.
            let sin = unsafe { &*ptr::from_ref(storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::from((
                u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &*ptr::from_ref(storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                sin6.sin6_addr.s6_addr.into(),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// A thread's send buffers: up to [`BATCH`] answers, sent with as few system calls as
/// the kernel allows. Built in place, so a batch allocates nothing.
pub struct Outbox {
    addrs: Box<[libc::sockaddr_storage]>,
    iovecs: Box<[libc::iovec]>,
    headers: Box<[libc::mmsghdr]>,
    len: usize,
}

impl Outbox {
    fn new() -> Self {
        Outbox {
            // SAFETY: an all-zero sockaddr_storage is a valid (unspecified) address.
            addrs: (0..BATCH)
                .map(|_| unsafe { MaybeUninit::zeroed().assume_init() })
                .collect(),
            iovecs: (0..BATCH)
                .map(|_| libc::iovec {
                    iov_base: ptr::null_mut(),
                    iov_len: 0,
                })
                .collect(),
            // SAFETY: an all-zero mmsghdr is valid; `push` fills what it sends.
            headers: (0..BATCH)
                .map(|_| unsafe { MaybeUninit::zeroed().assume_init() })
                .collect(),
            len: 0,
        }
    }

    /// Queues `bytes` for `to`; false when the outbox is full.
    ///
    /// # Safety
    /// `bytes` must stay valid and unchanged until the next [`Outbox::flush`].
    pub unsafe fn push(&mut self, bytes: &[u8], to: SocketAddr) -> bool {
        let i = self.len;
        if i == BATCH {
            return false;
        }
        let addr = SockAddr::from(to);
        // SAFETY: a SockAddr's bytes fit a sockaddr_storage.
        unsafe {
            ptr::copy_nonoverlapping(
                addr.as_ptr().cast::<u8>(),
                ptr::from_mut(&mut self.addrs[i]).cast::<u8>(),
                addr.len() as usize,
            );
        }
        self.iovecs[i] = libc::iovec {
            iov_base: bytes.as_ptr().cast_mut().cast(),
            iov_len: bytes.len(),
        };
        let h = &mut self.headers[i].msg_hdr;
        h.msg_name = ptr::from_mut(&mut self.addrs[i]).cast();
        h.msg_namelen = addr.len();
        h.msg_iov = ptr::from_mut(&mut self.iovecs[i]);
        h.msg_iovlen = 1;
        self.len += 1;
        true
    }

    /// Sends what is queued on `fd` (non-blocking) and empties the outbox. A full
    /// socket buffer drops the rest, as the kernel drops queries when ours is full
    /// (the clients retry).
    pub fn flush(&mut self, fd: RawFd) {
        let mut sent = 0;
        while sent < self.len {
            let rest = &mut self.headers[sent..self.len];
            // SAFETY: `rest` holds mmsghdr filled by `push`, whose buffers the caller
            // keeps valid until now.
            let n = unsafe {
                libc::sendmmsg(
                    fd,
                    rest.as_mut_ptr(),
                    libc::c_uint::try_from(rest.len()).unwrap_or(libc::c_uint::MAX),
                    libc::MSG_DONTWAIT,
                )
            };
            match usize::try_from(n) {
                Ok(0) => break,
                Ok(n) => sent += n,
                Err(_) => {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    // One bad destination must not cost the others their answers.
                    tracing::debug!(target: "dns", to = ?socket_addr(&self.addrs[sent]), error = %e, "UDP send failed");
                    if e.kind() == io::ErrorKind::WouldBlock {
                        break;
                    }
                    sent += 1;
                }
            }
        }
        self.len = 0;
    }
}

/// Output slots for the answers of one batch, one per query.
pub type Answers = [[u8; MAX_KEPT]; BATCH];

/// A thread's buffers for one batch at a time.
pub struct Scratch {
    pub received: Received,
    pub answers: Box<Answers>,
    pub outbox: Outbox,
}

thread_local! {
    static SCRATCH: RefCell<Option<Scratch>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's receive buffers, answer slots and outbox (made on first
/// use).
pub fn with_scratch<T>(f: impl FnOnce(&mut Scratch) -> T) -> T {
    SCRATCH.with_borrow_mut(|scratch| {
        let scratch = scratch.get_or_insert_with(|| Scratch {
            received: Received::new(),
            answers: Box::new([[0; MAX_KEPT]; BATCH]),
            outbox: Outbox::new(),
        });
        f(scratch)
    })
}
