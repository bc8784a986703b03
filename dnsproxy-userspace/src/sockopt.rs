//! `getsockopt`/`setsockopt(SOL_SOCKET, …)` for the options socket2 does not offer
//! (`SO_NETNS_COOKIE`, `SO_PEERCRED`, `SO_DOMAIN`, ...).
use std::os::fd::RawFd;

/// The value of socket option `name` (level `SOL_SOCKET`) of `fd`, as a `T` (a plain
/// C value the kernel fills: an int, a u64, a `ucred`).
pub fn get<T: Copy>(fd: RawFd, name: libc::c_int) -> std::io::Result<T> {
    let mut value = std::mem::MaybeUninit::<T>::zeroed();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` has room for `len` bytes; the kernel writes at most that.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            value.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: zero-initialised, then filled by the kernel; every T used is plain data.
    Ok(unsafe { value.assume_init() })
}

/// Sets socket option `name` (level `SOL_SOCKET`) of `fd` to `value` (a plain C value).
pub fn set<T: Copy>(fd: RawFd, name: libc::c_int, value: T) -> std::io::Result<()> {
    // SAFETY: `value` is a live T of the length given; the kernel only reads it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (&raw const value).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
