//! Node mode's cluster-wide store of auto-allocated VIPs, so that every daemon gives
//! a host the same VIP: one ConfigMap (`--vip-store NAMESPACE/NAME`, key `vips.json`,
//! the state file's form), read from the watch cache and written with optimistic
//! concurrency: a write carries the resourceVersion it was computed from, and a
//! conflict means another daemon wrote first, so the daemon reads again, merges and
//! retries. What the store holds wins over the local `vips.json`, which stays as the
//! start-up cache; Istio's `status.addresses` win over both (they are declared
//! addresses, never allocated).
//!
//! A ConfigMap holds at most 1 MiB: about 25,000 hosts.
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};

use super::{allocator, state_file};

/// The key of the ConfigMap that holds the allocations.
pub const KEY: &str = "vips.json";

/// Writes that may lose a race before the daemon gives up for this round.
pub const ATTEMPTS: usize = 8;

/// Why no agreement was reached this round (the daemon then allocates locally, and
/// tries again at the next change).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The API refused or failed.
    #[error("the VIP store {0} could not be read or written")]
    Api(String, #[source] kube::Error),
    /// Other daemons kept writing first.
    #[error("{ATTEMPTS} writes of the VIP store {0} lost a race")]
    Contended(String),
}

/// The store.
pub struct VipStore {
    api: Api<ConfigMap>,
    namespace: String,
    name: String,
}

impl VipStore {
    /// `location` is `NAMESPACE/NAME`.
    pub fn new(client: Client, location: &str) -> Option<Self> {
        let (namespace, name) = location.split_once('/')?;
        Some(VipStore {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Agrees with the other daemons on the allocation that covers `wanted`, never
    /// giving a `reserved` address: the store's allocations are kept, what is missing
    /// is allocated (the same rule every daemon applies) and written back. `local` seeds
    /// a store that does not exist yet. The first try starts from `watched` (the watch
    /// cache's copy, so a round that changes nothing costs the API nothing); after a
    /// lost race the store is read again. Returns host → slot and how many writes lost
    /// a race.
    pub async fn agree(
        &self,
        wanted: &BTreeSet<String>,
        reserved: &HashSet<IpAddr>,
        local: &BTreeMap<String, u32>,
        mut watched: Option<ConfigMap>,
    ) -> Result<(BTreeMap<String, u32>, usize), StoreError> {
        let what = format!("{}/{}", self.namespace, self.name);
        let mut lost = 0;
        for _ in 0..ATTEMPTS {
            let current = match watched.take() {
                Some(cm) => Some(cm),
                None => self
                    .api
                    .get_opt(&self.name)
                    .await
                    .map_err(|e| StoreError::Api(what.clone(), e))?,
            };
            // A store not written yet (missing, or shipped empty) starts from this
            // daemon's cache, so that VIPs given before the store existed stay.
            let stored = current.as_ref().and_then(stored_slots);
            let written_before = stored.is_some();
            let mut slots = stored.unwrap_or_else(|| local.clone());
            let before = slots.clone();
            allocator::allocate(&mut slots, wanted, reserved);
            if written_before && slots == before {
                return Ok((slots, lost));
            }
            let written = self.write(current, &slots).await;
            match written {
                Ok(()) => return Ok((slots, lost)),
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    lost += 1;
                    tracing::debug!(store = %what, "another daemon wrote the VIP store first: reading it again");
                }
                Err(e) => return Err(StoreError::Api(what, e)),
            }
        }
        Err(StoreError::Contended(what))
    }

    /// Creates the ConfigMap, or replaces it at the resourceVersion `current` was read at.
    async fn write(
        &self,
        current: Option<ConfigMap>,
        slots: &BTreeMap<String, u32>,
    ) -> Result<(), kube::Error> {
        let data = BTreeMap::from([(KEY.to_owned(), state_file::encode(slots))]);
        let params = PostParams::default();
        if let Some(mut cm) = current {
            cm.data = Some(data);
            return self.api.replace(&self.name, &params, &cm).await.map(drop);
        }
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                ..Default::default()
            },
            data: Some(data),
            ..Default::default()
        };
        self.api.create(&params, &cm).await.map(drop)
    }
}

/// The allocations a store holds (what it can still read, when damaged); `None` when
/// it was never written.
fn stored_slots(cm: &ConfigMap) -> Option<BTreeMap<String, u32>> {
    let text = cm.data.as_ref()?.get(KEY)?;
    Some(state_file::parse(text).unwrap_or_else(|e| {
        tracing::warn!(error = %crate::report(&e), "the VIP store is damaged: keeping what it still holds");
        state_file::salvage(text)
    }))
}
