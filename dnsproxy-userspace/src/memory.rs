//! Giving freed memory back to the system. Start-up and every table rebuild parse and
//! build far more than they keep (the YAML or API objects, the old table, the kernel's
//! BTF read by the loader); the allocator keeps what was freed for later use, so the
//! daemon's resident size would stay at the peak. Trimming after those moments brings
//! it down to what the daemon holds.
//!
//! A trim walks the allocator's free lists, which costs more than a small rebuild: a
//! burst of rebuilds (a rollout behind a `workloadSelector`) is trimmed once, at most
//! every [`SPACING`], and the last one of the burst by the loop that rebuilt, when it
//! is next idle ([`trim_due`], [`trim_if_due`]).
use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// Shortest time between two trims after rebuilds.
pub const SPACING: Duration = Duration::from_secs(5);

/// When the last trim was, and when a deferred one is due.
struct Trims {
    last: Option<Instant>,
    due: Option<Instant>,
}

static TRIMS: Mutex<Trims> = Mutex::new(Trims {
    last: None,
    due: None,
});

fn trims() -> std::sync::MutexGuard<'static, Trims> {
    TRIMS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Returns the allocator's free memory to the system now (glibc; a no-op elsewhere).
pub fn release_free() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory; no pointer is involved.
    unsafe {
        libc::malloc_trim(0);
    }
    let mut t = trims();
    t.last = Some(Instant::now());
    t.due = None;
}

/// After freeing a lot: trims now, unless the last trim was less than [`SPACING`] ago;
/// then a trim is due at that distance from it (see [`trim_if_due`]).
pub fn release_free_soon() {
    {
        let mut t = trims();
        if let Some(last) = t.last
            && Instant::now() < last + SPACING
        {
            t.due = Some(last + SPACING);
            return;
        }
    }
    release_free();
}

/// Bytes the allocator has handed out and not had back (glibc; 0 elsewhere).
pub fn heap_in_use() -> usize {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallinfo2 only reads the allocator's counters.
    return unsafe { libc::mallinfo2().uordblks };
    #[cfg(not(target_env = "gnu"))]
    0
}

/// When a deferred trim is due, if one is.
pub fn trim_due() -> Option<Instant> {
    trims().due
}

/// Makes a deferred trim that is due.
pub fn trim_if_due() {
    if trim_due().is_some_and(|due| due <= Instant::now()) {
        release_free();
    }
}
