//! A handle on one process that stays that process (pidfd, Linux 5.3): checks made
//! through `/proc/<pid>` are about it only while it is alive, and a signal or a
//! `setns` through the handle can never reach a process that reused its pid.
use std::os::fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};

/// An open pidfd.
#[derive(Debug)]
pub struct Pidfd {
    fd: OwnedFd,
    pid: u32,
}

impl Pidfd {
    /// Opens the process `pid` now is.
    pub fn open(pid: u32) -> std::io::Result<Self> {
        let raw = i32::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
        if raw <= 0 {
            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
        }
        // SAFETY: pidfd_open(2) on a pid, no flags; a negative result is an error.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = i32::try_from(fd).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
        // SAFETY: a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Pidfd { fd, pid })
    }

    /// Another handle on the same process.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Pidfd {
            fd: self.fd.try_clone()?,
            pid: self.pid,
        })
    }

    /// The pid it was opened by (the process's as long as [`Pidfd::is_alive`]).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The process has not exited: what `/proc/<pid>` said before this call was said of
    /// it.
    pub fn is_alive(&self) -> bool {
        self.signal(0)
    }

    /// Sends `signal` to the process; false when it has exited.
    pub fn signal(&self, signal: i32) -> bool {
        // SAFETY: pidfd_send_signal(2) on our pidfd, no siginfo, no flags.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        rc == 0
    }

    /// Waits at most `timeout_ms` until every thread of the process has exited (the
    /// pidfd turns readable then); true when it has.
    pub fn wait_exited(&self, timeout_ms: i32) -> bool {
        let mut poll = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&raw mut poll, 1, timeout_ms) == 1 }
    }
}

impl AsFd for Pidfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
