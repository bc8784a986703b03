//! `--max-hosts-per-namespace`: an optional bound on the `ServiceEntry` hosts one
//! namespace puts in the table, and so on the auto-allocated VIPs and translation
//! entries it can take. A namespace's oldest entries come first (creationTimestamp,
//! then name), each entry's hosts in their order; the hosts past the bound are refused
//! (`reason="quota"`), in the table and in the VIP demand alike, so one namespace
//! cannot use up the 65,534 VIPs or the maps that every other namespace shares.
use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use super::{
    export::Rank,
    manifest::{Meta as _, Objects},
};
use crate::name::normalize;

/// The hosts past the bound: (index in `Objects::service_entries`, normalized host).
#[derive(Debug, Default)]
pub struct OverQuota(HashSet<(usize, String)>);

impl OverQuota {
    /// Of `objects`, the hosts past `max` per namespace (none when `max` is 0).
    pub fn of(objects: &Objects, max: usize) -> Self {
        let entries = &objects.service_entries;
        if max == 0 {
            return OverQuota::default();
        }
        let mut order: Vec<(Rank, usize)> = entries
            .iter()
            .enumerate()
            .map(|(i, se)| (Rank::of(&se.metadata, Arc::from(se.metadata.ns())), i))
            .collect();
        order.sort();
        let mut used: HashMap<&str, usize> = HashMap::new();
        let mut over = HashSet::new();
        for (_, i) in order {
            let se = &entries[i];
            let count = used.entry(se.metadata.ns()).or_default();
            for host in &se.spec.hosts {
                if *count < max {
                    *count += 1;
                } else {
                    over.insert((i, normalize(host)));
                }
            }
        }
        OverQuota(over)
    }

    /// Whether host `host` (normalized) of entry `index` is past the bound.
    pub fn contains(&self, index: usize, host: &str) -> bool {
        !self.0.is_empty() && self.0.contains(&(index, host.to_owned()))
    }
}
