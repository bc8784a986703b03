//! The handoff's bytes on a Unix stream socket: fixed four-byte words, a
//! length-prefixed JSON description, and descriptors passed with `SCM_RIGHTS` in
//! chunks, each chunk riding on one byte of payload.
use std::{
    io::{Read as _, Write as _},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
};

/// The successor's first word, followed by its pid (u32, big endian).
pub const HELLO: &[u8; 4] = b"HELO";
/// The successor serves the sockets: the predecessor is to stop.
pub const STOP: &[u8; 4] = b"STOP";
/// The predecessor has stopped taking new work.
pub const DONE: &[u8; 4] = b"DONE";

/// Most descriptors in one message (the kernel's `SCM_MAX_FD` is 253).
const FDS_PER_MESSAGE: usize = 200;

/// Most descriptors one handoff may announce (the bounds of its description allow
/// fewer; this holds whatever a parser says).
pub const MAX_DESCRIPTORS: usize = 1 << 20;

/// Largest description accepted (a node's pods and their sockets fit many times).
const MAX_DESCRIPTION: u32 = 4 << 20;

/// Reads exactly one four-byte word and checks it.
pub fn expect_word(stream: &mut UnixStream, want: &[u8; 4]) -> std::io::Result<()> {
    let mut got = [0u8; 4];
    stream.read_exact(&mut got)?;
    if &got != want {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "expected {:?}, got {:?}",
                String::from_utf8_lossy(want),
                String::from_utf8_lossy(&got)
            ),
        ));
    }
    Ok(())
}

/// Writes a word and a big-endian u32.
pub fn write_word(stream: &mut UnixStream, word: &[u8; 4], value: u32) -> std::io::Result<()> {
    let mut buf = [0u8; 8];
    buf[..4].copy_from_slice(word);
    buf[4..].copy_from_slice(&value.to_be_bytes());
    stream.write_all(&buf)
}

/// Reads a big-endian u32.
pub fn read_u32(stream: &mut UnixStream) -> std::io::Result<u32> {
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf)?;
    Ok(u32::from_be_bytes(buf))
}

/// Sends `description` (length-prefixed) and then `fds`, in order.
pub fn send(stream: &mut UnixStream, description: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let len = u32::try_from(description.len())
        .ok()
        .filter(|l| *l <= MAX_DESCRIPTION)
        .ok_or_else(|| std::io::Error::other("handoff description too large"))?;
    stream.write_all(&len.to_be_bytes())?;
    stream.write_all(description)?;
    for chunk in fds.chunks(FDS_PER_MESSAGE) {
        send_fds(stream, chunk)?;
    }
    Ok(())
}

/// Receives a description (as [`send`] sent it) and then `count(description)`
/// descriptors.
pub fn receive<T>(
    stream: &mut UnixStream,
    parse: impl FnOnce(&[u8]) -> std::io::Result<(T, usize)>,
) -> std::io::Result<(T, Vec<OwnedFd>)> {
    let len = read_u32(stream)?;
    if len > MAX_DESCRIPTION {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "handoff description too large",
        ));
    }
    let mut description = vec![0u8; len as usize];
    stream.read_exact(&mut description)?;
    let (value, count) = parse(&description)?;
    if count > MAX_DESCRIPTORS {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{count} descriptors announced, more than {MAX_DESCRIPTORS}"),
        ));
    }
    // Grown as descriptors arrive, not reserved on the peer's word.
    let mut fds = Vec::with_capacity(count.min(FDS_PER_MESSAGE));
    while fds.len() < count {
        let want = (count - fds.len()).min(FDS_PER_MESSAGE);
        receive_fds(stream, want, &mut fds)?;
    }
    Ok((value, fds))
}

fn cmsg_space(fds: usize) -> usize {
    // SAFETY: CMSG_SPACE is a pure size computation.
    unsafe { libc::CMSG_SPACE((fds * size_of::<RawFd>()) as u32) as usize }
}

/// One message: a byte of payload with `fds` attached.
fn send_fds(stream: &UnixStream, fds: &[RawFd]) -> std::io::Result<()> {
    let mut payload = [b'F'];
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // u64 words keep the control buffer aligned for cmsghdr.
    let mut control = vec![0u64; cmsg_space(fds.len()).div_ceil(8)];
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = cmsg_space(fds.len()) as _;
    // SAFETY: the control buffer holds one header and `fds.len()` descriptors.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of_val(fds) as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), fds.len());
    }
    loop {
        // SAFETY: a valid socket and message.
        let rc = unsafe { libc::sendmsg(stream.as_raw_fd(), &raw const msg, libc::MSG_NOSIGNAL) };
        if rc >= 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Receives one message of [`send_fds`], expecting `want` descriptors, into `out`.
fn receive_fds(stream: &UnixStream, want: usize, out: &mut Vec<OwnedFd>) -> std::io::Result<()> {
    let mut payload = [0u8];
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control = vec![0u64; cmsg_space(want).div_ceil(8)];
    // SAFETY: as in send_fds.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = cmsg_space(want) as _;
    let rc = loop {
        // SAFETY: a valid socket and message; CLOEXEC so no child inherits them.
        let rc = unsafe { libc::recvmsg(stream.as_raw_fd(), &raw mut msg, libc::MSG_CMSG_CLOEXEC) };
        if rc >= 0 {
            break rc;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    if rc == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let before = out.len();
    // SAFETY: walking the control messages the kernel wrote into our buffer.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..bytes / size_of::<RawFd>() {
                    let at = data.add(i * size_of::<RawFd>()).cast::<[u8; 4]>();
                    out.push(OwnedFd::from_raw_fd(RawFd::from_ne_bytes(at.read())));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 || out.len() - before != want {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("expected {want} descriptors, got {}", out.len() - before),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn descriptors_cross_in_chunks_with_their_description() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        // 450 descriptors: three messages.
        let files: Vec<std::fs::File> = (0..450)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        let raw: Vec<RawFd> = files.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
        let sender = std::thread::spawn(move || send(&mut a, b"450", &raw).unwrap());
        let (n, fds) = receive(&mut b, |d| {
            let n: usize = std::str::from_utf8(d).unwrap().parse().unwrap();
            Ok((n, n))
        })
        .unwrap();
        sender.join().unwrap();
        assert_eq!(n, 450);
        assert_eq!(fds.len(), 450);
        // Each received descriptor is a new one for the same open file.
        let null = std::fs::metadata("/dev/null").unwrap().rdev();
        for fd in fds {
            let file = std::fs::File::from(fd);
            assert_eq!(file.metadata().unwrap().rdev(), null);
        }
        drop(files);
    }
}
