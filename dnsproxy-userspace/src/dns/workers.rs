//! Threads for the UDP receive loops, each with a current-thread runtime. A loop
//! answers from the name table and the cache on its own thread, woken by its own
//! epoll: no hand-off between threads, no futex wake-up per query (on the shared
//! multi-thread runtime, half the CPU of a table answer went to those). Queries that go
//! upstream run on the same runtime as the loop that received them.
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
};

use tokio::runtime::{Builder, Handle};
use tokio_util::sync::CancellationToken;

/// The UDP threads; cheap to clone. They stop when the last clone is dropped.
#[derive(Clone)]
pub struct UdpWorkers {
    inner: Arc<Inner>,
}

struct Inner {
    handles: Box<[Handle]>,
    next: AtomicUsize,
    stop: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl UdpWorkers {
    /// Starts `threads` threads (at least one), each driving its own runtime.
    pub fn start(threads: usize) -> std::io::Result<Self> {
        let stop = CancellationToken::new();
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let runtime = Builder::new_current_thread().enable_all().build()?;
            handles.push(runtime.handle().clone());
            let stop = stop.clone();
            thread::Builder::new()
                .name(format!("dns-udp-{i}"))
                .spawn(move || runtime.block_on(stop.cancelled()))?;
        }
        Ok(UdpWorkers {
            inner: Arc::new(Inner {
                handles: handles.into_boxed_slice(),
                next: AtomicUsize::new(0),
                stop,
            }),
        })
    }

    /// How many threads `--udp-threads 0` means: half the cores, 1 to 8.
    pub fn auto_threads() -> usize {
        (thread::available_parallelism().map_or(1, usize::from) / 2).clamp(1, 8)
    }

    /// How many threads there are.
    pub fn threads(&self) -> usize {
        self.inner.handles.len()
    }

    /// The runtime for the next loop (round robin).
    pub fn next(&self) -> Handle {
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed) % self.inner.handles.len();
        self.inner.handles[i].clone()
    }
}
