//! Who gets a VIP. The objects say which hosts need an auto-allocated one and which
//! addresses are declared ([`Demand`]); the allocator gives each host a slot that
//! never moves while the host exists (`allocator`), kept across restarts in
//! `<state-dir>/vips.json` (`state_file`) and, in node mode, agreed with every other
//! node's daemon through one ConfigMap (`store`). [`Assignment`] is the one place that
//! turns a demand into the host → VIP map the name table is built with.
pub mod allocator;
pub mod state_file;
pub mod store;

use std::{
    collections::{BTreeSet, HashSet},
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

pub use allocator::VipAllocator;
use k8s_openapi::api::core::v1::ConfigMap;
use tokio::time::Instant;

pub use crate::registry::{Allocation, table::Vips};
use crate::{
    name::normalize,
    registry::{Registry, TableConfig, manifest::Objects},
};

/// Backoff of the VIP store after a failed round: first and longest.
const STORE_RETRY_MIN: Duration = Duration::from_secs(2);
const STORE_RETRY_MAX: Duration = Duration::from_mins(5);

/// What the objects ask of the allocator.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Demand {
    /// Hosts that need an auto-allocated VIP: no declared address, allocation not
    /// turned off, not a wildcard.
    pub wanted: BTreeSet<String>,
    /// Every declared address (spec or Istio's status): no allocated VIP may take one.
    pub reserved: HashSet<IpAddr>,
}

impl Demand {
    /// The demand of the `ServiceEntries` in `objects`.
    pub fn of(objects: &Objects) -> Self {
        Demand::within(objects, 0)
    }

    /// The demand of the `ServiceEntries` in `objects`, without the hosts past `quota`
    /// per namespace (`--max-hosts-per-namespace`; 0: no bound): the table refuses
    /// them, so they get no VIP either.
    pub fn within(objects: &Objects, quota: usize) -> Self {
        let over = crate::registry::quota::OverQuota::of(objects, quota);
        let mut demand = Demand::default();
        for (index, se) in objects.service_entries.iter().enumerate() {
            let spec = se.spec_addresses().unwrap_or_default();
            demand.reserved.extend(&spec.single);
            for host in se.spec.hosts.iter().map(|h| normalize(h)) {
                let status = se.status_addresses(&host);
                // A CIDR is declared too: such an entry never gets a VIP.
                let declared = !spec.is_empty() || !status.is_empty();
                demand.reserved.extend(status);
                if !declared
                    && se.wants_autoallocation()
                    && !host.starts_with("*.")
                    && !over.contains(index, &host)
                {
                    demand.wanted.insert(host);
                }
            }
        }
        demand
    }
}

/// What `/metrics` counts of the assignment.
#[derive(Debug, Default)]
pub struct Counters {
    /// Hosts moved because a declared address claimed their VIP.
    pub moves: AtomicU64,
    /// Node mode: writes of the VIP store that lost a race, and rounds that ended
    /// without agreement.
    pub store_conflicts: AtomicU64,
    pub store_failures: AtomicU64,
    /// Hosts left without a VIP by the last allocation: every slot was taken.
    pub unallocated: AtomicU64,
    /// Node mode: moves of hosts in use that the store held and no declared address
    /// explained, refused.
    pub store_moves_refused: AtomicU64,
}

/// Node mode's agreement through the store, and when it may be asked again.
struct Agreement {
    store: store::VipStore,
    /// After a failed round: when to try again, and the backoff that led there.
    backoff: Option<(Instant, Duration)>,
    /// The demand and store version of the last round that agreed: the same again
    /// needs no round (the store is not even parsed).
    agreed: Option<(Demand, Option<String>)>,
    /// Host → slot as last agreed: the store may not move them behind our back.
    last: Option<std::collections::BTreeMap<String, u32>>,
}

impl Agreement {
    /// The store's `slots` as this daemon follows them after a round that agreed:
    /// moves of hosts agreed before that no declared address explains are refused
    /// (counted); the result is what the next round is checked against.
    fn follow(
        &mut self,
        mut slots: std::collections::BTreeMap<String, u32>,
        demand: &Demand,
        counters: &Counters,
    ) -> std::collections::BTreeMap<String, u32> {
        if let Some(last) = &self.last {
            let refused =
                allocator::refuse_moves(&mut slots, last, &demand.wanted, &demand.reserved);
            counters
                .store_moves_refused
                .fetch_add(refused as u64, Relaxed);
        }
        self.last = Some(slots.clone());
        self.backoff = None;
        slots
    }
}

/// The assignment of VIPs to hosts.
pub struct Assignment {
    allocator: VipAllocator,
    agreement: Option<Agreement>,
    counters: Arc<Counters>,
}

impl Assignment {
    /// Allocation by this daemon alone (local mode, or node mode without a store).
    pub fn local(allocator: VipAllocator) -> Self {
        Assignment {
            allocator,
            agreement: None,
            counters: Arc::default(),
        }
    }

    /// Allocation agreed with the other daemons through `store` (node mode).
    pub fn agreed_through(allocator: VipAllocator, store: store::VipStore) -> Self {
        Assignment {
            agreement: Some(Agreement {
                store,
                backoff: None,
                agreed: None,
                last: None,
            }),
            ..Assignment::local(allocator)
        }
    }

    /// The counters, for `/metrics`.
    pub fn counters(&self) -> Arc<Counters> {
        Arc::clone(&self.counters)
    }

    /// The store this daemon agrees through, if any: `(namespace, name)`.
    pub fn store(&self) -> Option<(&str, &str)> {
        let store = &self.agreement.as_ref()?.store;
        Some((store.namespace(), store.name()))
    }

    /// Rebuilds `registry`'s table from `objects` with VIPs allocated by this daemon
    /// (local mode).
    pub fn rebuild(&mut self, registry: &Registry, objects: &Objects) {
        let quota = registry.table().max_hosts_per_namespace();
        let vips = self.allocate(&Demand::within(objects, quota));
        registry.rebuild(objects, &vips);
    }

    /// The VIPs for `demand`, allocated by this daemon. Hosts past the last free slot
    /// get none (counted); the others are allocated whatever their number.
    pub fn allocate(&mut self, demand: &Demand) -> Allocation {
        let moved_before = self.allocator.moved();
        let vips = self.allocator.sync(&demand.wanted, &demand.reserved);
        self.counters
            .moves
            .fetch_add(self.allocator.moved() - moved_before, Relaxed);
        self.counters
            .unallocated
            .store(self.allocator.unallocated() as u64, Relaxed);
        vips
    }

    /// The VIPs for `demand`, agreed with the other daemons through the store first
    /// (`watched` is the watch cache's copy of it), then allocated. After a failed
    /// round the store is left alone for a backoff (2 s, doubling up to 5 min): VIPs
    /// are allocated locally meanwhile, and a store that is full or down is not asked
    /// again on every change by every node. Returns when the store must be asked again
    /// (a backoff), if it must.
    pub async fn agree(
        &mut self,
        demand: &Demand,
        watched: Option<&ConfigMap>,
    ) -> (Allocation, Option<Instant>) {
        let Some(agreement) = self.agreement.as_mut() else {
            return (self.allocate(demand), None);
        };
        let now = Instant::now();
        let version = watched.and_then(|cm| cm.metadata.resource_version.clone());
        let unchanged = agreement
            .agreed
            .as_ref()
            .is_some_and(|(d, v)| d == demand && *v == version);
        let backing_off = agreement.backoff.is_some_and(|(at, _)| now < at);
        if !unchanged && !backing_off {
            let round = agreement
                .store
                .agree(
                    &demand.wanted,
                    &demand.reserved,
                    self.allocator.slots(),
                    watched.cloned(),
                )
                .await;
            match round {
                Ok((slots, lost)) => {
                    self.counters
                        .store_conflicts
                        .fetch_add(lost as u64, Relaxed);
                    if lost > 0 {
                        tracing::info!(
                            lost,
                            "VIP store: other daemons wrote first, agreed after re-reading"
                        );
                    }
                    let slots = agreement.follow(slots, demand, &self.counters);
                    self.allocator.adopt(slots);
                    // The version our own write made is seen through the watch: one
                    // more round, which then changes nothing and writes nothing.
                    agreement.agreed = Some((demand.clone(), version));
                }
                Err(e) => {
                    let lost = match e {
                        store::StoreError::Contended(_) => store::ATTEMPTS,
                        store::StoreError::Api(..) => 0,
                    };
                    self.counters
                        .store_conflicts
                        .fetch_add(lost as u64, Relaxed);
                    self.counters.store_failures.fetch_add(1, Relaxed);
                    let backoff = agreement
                        .backoff
                        .map_or(STORE_RETRY_MIN, |(_, b)| (b * 2).min(STORE_RETRY_MAX));
                    agreement.backoff = Some((now + backoff, backoff));
                    agreement.agreed = None;
                    tracing::warn!(
                        ?backoff,
                        "no agreement on VIPs with the other daemons, allocating locally until the next try: {}",
                        crate::report(&e)
                    );
                }
            }
        }
        let retry_at = self
            .agreement
            .as_ref()
            .and_then(|a| a.backoff)
            .map(|(at, _)| at);
        (self.allocate(demand), retry_at)
    }
}

/// A registry serving `objects`, their VIPs allocated in memory (tests, fuzzing).
pub fn in_memory_registry(objects: &Objects, config: TableConfig) -> Registry {
    let registry = Registry::new(config);
    Assignment::local(VipAllocator::in_memory()).rebuild(&registry, objects);
    registry
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::manifest::parse_into;

    #[test]
    fn demand_wants_hosts_without_addresses_and_reserves_declared_ones() {
        let mut objects = Objects::default();
        parse_into(
            r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: auto}
spec: {hosts: [Auto.Example, "*.wild.example"], resolution: DNS}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: declared}
spec: {hosts: [declared.example], addresses: [240.240.0.7], resolution: STATIC}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: by-istio}
spec: {hosts: [istio.example], resolution: DNS}
status: {addresses: [{value: 240.240.9.9, host: istio.example}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: none}
spec: {hosts: [none.example], resolution: NONE}
"#,
            &mut objects,
        )
        .unwrap();
        let demand = Demand::of(&objects);
        assert_eq!(demand.wanted, BTreeSet::from(["auto.example".to_owned()]));
        let reserved: HashSet<IpAddr> = ["240.240.0.7", "240.240.9.9"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(demand.reserved, reserved);
    }
}
