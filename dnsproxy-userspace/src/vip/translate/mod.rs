//! What the kernel translates: the content of the `dp_vips`/`dp_services` maps
//! (`plan`, pure), the task that resolves backends and keeps the maps equal to the
//! plan (`sync`), and [`Translated`], what DNS reads of it: a VIP is handed out only
//! once it translates, and an IPv6 VIP only for a host with IPv6 backends.
pub mod plan;
pub mod sync;
pub mod views;

use std::{
    collections::HashSet,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;

use crate::registry::NameTable;

/// What the data path translates right now, as the backend sync last wrote it.
#[derive(Default)]
pub struct Translated {
    /// VIPs in `dp_vips`.
    programmed: ArcSwap<HashSet<IpAddr>>,
    /// Bumped when `programmed` changes, for answers waiting on their VIP.
    programmed_changed: tokio::sync::watch::Sender<u64>,
    /// Auto-allocated hosts with IPv6 backends (their IPv6 VIP is worth answering).
    ipv6_backed: ArcSwap<HashSet<String>>,
    /// VIPs left out of the maps because they are full.
    left_out: AtomicUsize,
    /// The refresh of DNS-resolution hosts: how often its bounds acted.
    pub refresh: RefreshCounters,
    /// Bumped after every change that can change a table answer.
    generation: AtomicU64,
}

/// `dnsproxy_vip_resolutions_deferred_total` (a due name waited for a slot under
/// `--dns-refresh-concurrency`), `dnsproxy_vip_refresh_floored_total` (a TTL shorter than
/// `--dns-refresh-floor-secs` was stretched to it), `dnsproxy_vip_resolution_failures_total`
/// (each failure, retried with exponential backoff).
#[derive(Debug, Default)]
pub struct RefreshCounters {
    pub deferred: AtomicU64,
    pub floored: AtomicU64,
    pub failures: AtomicU64,
}

impl Translated {
    /// Bumped after every change that can change a table answer (the translated VIPs,
    /// the hosts with IPv6 backends), once the change is visible.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Auto-allocated hosts that get AAAA answers: those with IPv6 backends.
    pub fn ipv6_backed(&self) -> arc_swap::Guard<Arc<HashSet<String>>> {
        self.ipv6_backed.load()
    }

    /// Replaces the set of hosts with IPv6 backends.
    pub fn set_ipv6_backed(&self, hosts: HashSet<String>) {
        if **self.ipv6_backed.load() != hosts {
            self.ipv6_backed.store(Arc::new(hosts));
            self.changed();
        }
    }

    /// Replaces the set of VIPs the data path translates.
    pub fn set_programmed(&self, vips: HashSet<IpAddr>) {
        if **self.programmed.load() != vips {
            self.programmed.store(Arc::new(vips));
            self.changed();
            self.programmed_changed.send_modify(|g| *g += 1);
        }
    }

    /// VIPs left out of the translation maps because they are full.
    pub fn left_out(&self) -> usize {
        self.left_out.load(Ordering::Relaxed)
    }

    /// Records how many VIPs the last sync left out.
    pub fn set_left_out(&self, n: usize) {
        self.left_out.store(n, Ordering::Relaxed);
    }

    /// Every VIP of `table` taken as translated, as if the backend sync had written
    /// them all (tests and fuzzing, whose answers must not wait for a data path).
    pub fn assume_all_translated(&self, table: &NameTable) {
        let vips = table
            .vip_services()
            .iter()
            .flat_map(|s| s.vips.iter().copied())
            .collect();
        self.set_programmed(vips);
    }

    /// Of `ips`, those `table` declares as VIPs to translate that the data path does
    /// not translate yet: a client given one would connect into a black hole.
    pub fn untranslated(&self, table: &NameTable, ips: &[IpAddr]) -> Vec<IpAddr> {
        let programmed = self.programmed.load();
        ips.iter()
            .filter(|ip| table.is_translated_vip(**ip) && !programmed.contains(*ip))
            .copied()
            .collect()
    }

    /// Waits, at most `limit`, until every one of `vips` is translated; false if not.
    pub async fn wait_translated(&self, vips: &[IpAddr], limit: Duration) -> bool {
        let mut changed = self.programmed_changed.subscribe();
        let all_in = |p: &HashSet<IpAddr>| vips.iter().all(|v| p.contains(v));
        let wait = async {
            while !all_in(&self.programmed.load()) {
                if changed.changed().await.is_err() {
                    return false;
                }
            }
            true
        };
        tokio::time::timeout(limit, wait).await.unwrap_or(false)
    }
}
