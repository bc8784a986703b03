//! Giving freed memory back to the system. Start-up and every table rebuild parse and
//! build far more than they keep (the YAML or API objects, the old table, the kernel's
//! BTF read by the loader); the allocator keeps what was freed for later use, so the
//! daemon's resident size would stay at the peak. Trimming after those moments brings
//! it down to what the daemon holds.

/// Returns the allocator's free memory to the system (glibc; a no-op elsewhere).
pub fn release_free() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory; no pointer is involved.
    unsafe {
        libc::malloc_trim(0);
    }
}
