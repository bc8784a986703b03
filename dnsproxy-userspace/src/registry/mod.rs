//! The registry: Kubernetes and Istio objects (`manifest`), read from YAML files
//! (`files`, local mode) or the Kubernetes API (`crate::cluster`, node mode), the VIP
//! allocator (`allocator`) and the name table built from them (`table`), which does
//! not know its source.
pub mod allocator;
pub mod export;
pub mod files;
pub mod manifest;
pub mod table;
pub mod vip_state;

pub use table::{NameTable, TableConfig};

use std::sync::{Arc, Mutex};

use allocator::{AllocatorError, VipAllocator};
use arc_swap::ArcSwap;
use manifest::Objects;

/// The current name table and what rebuilds it. Readers get the table without locks;
/// a rebuild swaps in a whole new table, so a query never sees half an update.
pub struct Registry {
    table: ArcSwap<NameTable>,
    allocator: Mutex<VipAllocator>,
    config: TableConfig,
    /// Bumped on every new table, for those who follow changes (the VIP backends).
    generation: tokio::sync::watch::Sender<u64>,
    /// Auto-allocated hosts with IPv6 backends (kept by the VIP backend sync).
    ipv6_backed: ArcSwap<std::collections::HashSet<String>>,
    /// VIPs the data path translates right now (written to `dp_vips`), and a
    /// generation bumped at each change, for answers waiting on their VIP.
    programmed: ArcSwap<std::collections::HashSet<std::net::IpAddr>>,
    programmed_changed: tokio::sync::watch::Sender<u64>,
    /// VIPs left out of the translation maps because they are full.
    vips_left_out: std::sync::atomic::AtomicUsize,
    /// Node mode: writes of the VIP store that lost a race, and rounds that ended
    /// without agreement.
    vip_store_conflicts: std::sync::atomic::AtomicU64,
    vip_store_failures: std::sync::atomic::AtomicU64,
    /// Bumped after every change that can change a table answer (the table, the hosts
    /// with IPv6 backends, the translated VIPs): answers encoded under an older value
    /// are stale.
    answers_generation: std::sync::atomic::AtomicU64,
}

impl Registry {
    /// A registry built from `objects`.
    pub fn new(
        objects: &Objects,
        mut allocator: VipAllocator,
        config: TableConfig,
    ) -> Result<Self, AllocatorError> {
        let table = NameTable::build(objects, &mut allocator, &config)?;
        Ok(Registry {
            table: ArcSwap::from_pointee(table),
            allocator: Mutex::new(allocator),
            config,
            generation: tokio::sync::watch::Sender::new(0),
            ipv6_backed: ArcSwap::default(),
            programmed: ArcSwap::default(),
            programmed_changed: tokio::sync::watch::Sender::new(0),
            vips_left_out: std::sync::atomic::AtomicUsize::new(0),
            answers_generation: std::sync::atomic::AtomicU64::new(0),
            vip_store_conflicts: std::sync::atomic::AtomicU64::new(0),
            vip_store_failures: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The table in service.
    pub fn table(&self) -> Arc<NameTable> {
        self.table.load_full()
    }

    /// The table in service, for the query hot path: no reference-count traffic
    /// shared between cores (arc-swap's guard), held only while one query is answered.
    pub fn current(&self) -> arc_swap::Guard<Arc<NameTable>> {
        self.table.load()
    }

    /// Rebuilds from `objects`; on error the previous table stays.
    pub fn update(&self, objects: &Objects) -> Result<(), AllocatorError> {
        let mut allocator = self.allocator.lock().expect("allocator lock");
        let table = NameTable::build(objects, &mut allocator, &self.config)?;
        // The old table goes (once no query holds it): give its memory back.
        drop(self.table.swap(Arc::new(table)));
        self.answers_changed();
        self.generation.send_modify(|g| *g += 1);
        crate::memory::release_free();
        Ok(())
    }

    /// Host → slot of the auto-allocated VIPs now.
    pub fn allocations(&self) -> std::collections::BTreeMap<String, u32> {
        self.allocator
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .slots()
            .clone()
    }

    /// Takes the allocation agreed with the other daemons (before the next update).
    pub fn adopt_allocations(&self, slots: std::collections::BTreeMap<String, u32>) {
        self.allocator
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .adopt(slots);
    }

    /// Auto-allocated VIPs moved because a declared address claimed them.
    pub fn vip_moves(&self) -> u64 {
        self.allocator
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .moved()
    }

    /// The generation of table answers: read it before answering, and an answer kept
    /// under it is stale once it moves. Bumped only after the change is visible, so an
    /// answer is never kept under a generation newer than what it was computed from.
    pub fn answers_generation(&self) -> u64 {
        self.answers_generation
            .load(std::sync::atomic::Ordering::Acquire)
    }

    fn answers_changed(&self) {
        self.answers_generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Auto-allocated hosts that get AAAA answers: those with IPv6 backends.
    pub fn ipv6_backed(&self) -> arc_swap::Guard<Arc<std::collections::HashSet<String>>> {
        self.ipv6_backed.load()
    }

    /// Replaces the set of hosts with IPv6 backends.
    pub fn set_ipv6_backed(&self, hosts: std::collections::HashSet<String>) {
        if **self.ipv6_backed.load() != hosts {
            self.ipv6_backed.store(Arc::new(hosts));
            self.answers_changed();
        }
    }

    /// VIPs left out of the translation maps because they are full.
    pub fn vips_left_out(&self) -> usize {
        self.vips_left_out
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records how many VIPs the last sync left out.
    pub fn set_vips_left_out(&self, n: usize) {
        self.vips_left_out
            .store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts a round of agreement through the VIP store: writes that lost a race,
    /// and whether it failed.
    pub fn count_vip_store_round(&self, conflicts: usize, failed: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        self.vip_store_conflicts
            .fetch_add(conflicts as u64, Relaxed);
        self.vip_store_failures
            .fetch_add(u64::from(failed), Relaxed);
    }

    /// Writes of the VIP store that lost a race, and rounds without agreement.
    pub fn vip_store_counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.vip_store_conflicts.load(Relaxed),
            self.vip_store_failures.load(Relaxed),
        )
    }

    /// Replaces the set of VIPs the data path translates.
    pub fn set_programmed(&self, vips: std::collections::HashSet<std::net::IpAddr>) {
        if **self.programmed.load() != vips {
            self.programmed.store(Arc::new(vips));
            self.answers_changed();
            self.programmed_changed.send_modify(|g| *g += 1);
        }
    }

    /// Of `ips`, those the table declares as VIPs to translate that the data path does
    /// not translate yet: a client given one would connect into a black hole.
    pub fn untranslated(
        &self,
        table: &NameTable,
        ips: &[std::net::IpAddr],
    ) -> Vec<std::net::IpAddr> {
        let programmed = self.programmed.load();
        ips.iter()
            .filter(|ip| table.is_translated_vip(**ip) && !programmed.contains(*ip))
            .copied()
            .collect()
    }

    /// Waits, at most `limit`, until every one of `vips` is translated; false if not.
    pub async fn wait_translated(
        &self,
        vips: &[std::net::IpAddr],
        limit: std::time::Duration,
    ) -> bool {
        let mut changed = self.programmed_changed.subscribe();
        let all_in =
            |p: &std::collections::HashSet<std::net::IpAddr>| vips.iter().all(|v| p.contains(v));
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

    /// Name tables built so far.
    pub fn builds(&self) -> u64 {
        *self.generation.borrow()
    }

    /// A receiver that wakes up after each table change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }
}
