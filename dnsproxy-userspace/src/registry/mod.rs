//! The registry: the name table in service, and what it is built from — Kubernetes and
//! Istio objects (`manifest`), read from YAML files (`files`, local mode) or the
//! Kubernetes API (`crate::state`, node mode), their visibility (`export`) — and the
//! table itself (`table`), which does not know its source. Which host gets which VIP
//! is `crate::vip::assign`'s business; the table is built with its answer (this module
//! knows nothing of VIPs beyond that answer).
pub mod export;
pub mod files;
pub mod manifest;
pub mod quota;
pub mod table;

use std::sync::Arc;

use arc_swap::ArcSwap;
pub use table::{Allocation, NameTable, TableConfig};

use manifest::Objects;

/// The name table in service. Readers get it without locks; a rebuild swaps in a whole
/// new table, so a query never sees half an update.
pub struct Registry {
    table: ArcSwap<NameTable>,
    config: TableConfig,
    /// Bumped on every new table, for those who follow changes (the VIP backends).
    generation: tokio::sync::watch::Sender<u64>,
    /// The same count, read without a lock on every batch of queries (answers kept
    /// encoded are stale once it moves).
    builds: std::sync::atomic::AtomicU64,
    /// Shards built: a namespace's Services, and the `ServiceEntries`'.
    shard_builds: [std::sync::atomic::AtomicU64; 2],
    /// Declared addresses refused, by [`table::addresses::Reason`].
    refused: [std::sync::atomic::AtomicU64; table::addresses::Reason::ALL.len()],
}

/// Which shards a new table built again.
#[derive(Clone, Copy, Debug, Default)]
pub struct Built {
    /// Namespaces whose Services' shard was built.
    pub namespaces: u64,
    /// The `ServiceEntries`' shard was built.
    pub entries: bool,
}

impl Registry {
    /// A registry whose table is still empty.
    pub fn new(config: TableConfig) -> Self {
        Registry {
            table: ArcSwap::from_pointee(NameTable::empty(&config)),
            config,
            generation: tokio::sync::watch::Sender::new(0),
            builds: std::sync::atomic::AtomicU64::new(0),
            shard_builds: Default::default(),
            refused: Default::default(),
        }
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

    /// Builds the table from `objects`, with the auto-allocated VIPs of `vips`, and
    /// puts it in service.
    pub fn rebuild(&self, objects: &Objects, vips: &Allocation) {
        let table = NameTable::build(objects, vips, &self.config);
        let built = Built {
            namespaces: table.service_namespaces().count() as u64,
            entries: true,
        };
        self.publish(table, built);
    }

    /// Puts `table` in service (one made from the current one by `with_*`, say), which
    /// built the shards `built` says.
    pub fn publish(&self, table: NameTable, built: Built) {
        use std::sync::atomic::Ordering::Relaxed;
        self.shard_builds[0].fetch_add(built.namespaces, Relaxed);
        self.shard_builds[1].fetch_add(u64::from(built.entries), Relaxed);
        self.count_refused(&self.table.load(), &table);
        // The old table goes (once no query holds it): give its memory back.
        drop(self.table.swap(Arc::new(table)));
        // Bumped only after the new table is visible: an answer kept under a
        // generation was never computed from an older table.
        self.builds
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.generation.send_modify(|g| *g += 1);
        crate::memory::release_free_soon();
    }

    /// Counts and logs the declared addresses `new` refuses that `old` did not.
    fn count_refused(&self, old: &NameTable, new: &NameTable) {
        use std::sync::atomic::Ordering::Relaxed;
        /// Lines per table: the rest are counted and in `/debug/ndsz`.
        const LOGGED: usize = 10;
        if std::ptr::eq(old.refused(), new.refused()) || new.refused().is_empty() {
            return;
        }
        let before: std::collections::HashSet<&table::addresses::Refusal> =
            old.refused().iter().collect();
        let fresh: Vec<_> = new
            .refused()
            .iter()
            .filter(|r| !before.contains(r))
            .collect();
        for r in &fresh {
            self.refused[r.reason as usize].fetch_add(1, Relaxed);
        }
        for r in fresh.iter().take(LOGGED) {
            tracing::warn!(
                source = %r.source,
                host = %r.host,
                address = ?r.address,
                reason = r.reason.label(),
                holder = r.holder.as_deref().unwrap_or(""),
                "declared address or name refused: it is not the entry's to take"
            );
        }
        if fresh.len() > LOGGED {
            tracing::warn!(
                more = fresh.len() - LOGGED,
                "more declared addresses refused (all of them in /debug/ndsz)"
            );
        }
    }

    /// Declared addresses refused so far, by reason (`Reason as usize`).
    pub fn refused_total(&self, reason: table::addresses::Reason) -> u64 {
        self.refused[reason as usize].load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Name tables built so far (lock-free: read on the query path).
    pub fn builds(&self) -> u64 {
        self.builds.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Shards built so far: namespaces' Services, and the `ServiceEntries`'.
    pub fn shard_builds(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.shard_builds[0].load(Relaxed),
            self.shard_builds[1].load(Relaxed),
        )
    }

    /// A receiver that wakes up after each table change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }
}
