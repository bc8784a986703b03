//! The Pods that back `workloadSelector` entries, wherever they run: one watch per
//! distinct (namespace, selector), label-selected by the API server, so the daemon
//! holds and hears of only the Pods some visible entry selects — never the rest of
//! the cluster's. Watches start when an entry brings a new selector and stop when no
//! entry has it any more.
use std::{collections::HashMap, sync::Arc};

use kube::{
    Api, Client,
    runtime::{reflector::Store, watcher},
};
use tokio::{
    sync::mpsc,
    task::{AbortHandle, JoinSet},
};

use super::{
    trim,
    watch::{self, Signal},
};
use crate::registry::manifest::{Meta as _, WorkloadPod, WorkloadSelector};

/// One selector's watch: its store, and the task that feeds it.
struct SelectorWatch {
    selector: WorkloadSelector,
    store: Store<WorkloadPod>,
    task: AbortHandle,
}

impl SelectorWatch {
    /// The Pods of its store that its selector selects in namespace `ns`.
    fn selected<'a>(&'a self, ns: &'a str) -> impl Iterator<Item = Arc<WorkloadPod>> + 'a {
        self.store.state().into_iter().filter(move |pod| {
            pod.metadata.ns() == ns && self.selector.matches(pod.metadata.label_map())
        })
    }
}

/// The watches of every distinct selector.
pub(super) struct SelectedPods {
    client: Client,
    signals: mpsc::Sender<Signal>,
    /// By (namespace, `labelSelector`).
    watches: HashMap<(String, String), SelectorWatch>,
    tasks: JoinSet<()>,
}

impl SelectedPods {
    pub(super) fn new(client: Client, signals: mpsc::Sender<Signal>) -> Self {
        SelectedPods {
            client,
            signals,
            watches: HashMap::new(),
            tasks: JoinSet::new(),
        }
    }

    /// Watches exactly the distinct `selectors` (namespace, selector): new ones start,
    /// those no entry has any more stop. Returns how many started.
    pub(super) fn follow(&mut self, selectors: &[(String, WorkloadSelector)]) -> usize {
        let wanted: HashMap<(String, String), &WorkloadSelector> = selectors
            .iter()
            .filter(|(_, s)| !s.labels.is_empty())
            .map(|(ns, s)| ((ns.clone(), s.to_query()), s))
            .collect();
        self.watches.retain(|key, w| {
            let keep = wanted.contains_key(key);
            if !keep {
                tracing::info!(namespace = %key.0, selector = %key.1, "workloadSelector gone: its Pod watch stops");
                w.task.abort();
            }
            keep
        });
        // Reap the tasks stopped above (and any that ended).
        while self.tasks.try_join_next().is_some() {}
        let mut started = 0;
        for (key, selector) in wanted {
            if self.watches.contains_key(&key) {
                continue;
            }
            tracing::info!(namespace = %key.0, selector = %key.1, "watching the Pods of a workloadSelector");
            let api: Api<WorkloadPod> = Api::namespaced(self.client.clone(), &key.0);
            let spec = watch::Spec {
                api,
                config: watcher::Config::default().labels(&key.1),
                dyntype: (),
                trim: trim::selected_pod,
                signal: watch::entries,
                kind: "selected Pods",
            };
            let (store, task) = watch::reflect(spec, self.signals.clone(), &mut self.tasks);
            self.watches.insert(
                key,
                SelectorWatch {
                    selector: selector.clone(),
                    store,
                    task,
                },
            );
            started += 1;
        }
        started
    }

    /// Waits until every watch holds its first list.
    pub(super) async fn synced(&self) {
        for w in self.watches.values() {
            let _ = w.store.wait_until_ready().await;
        }
    }

    /// Every Pod a selector selects (in the selector's namespace, all its labels on
    /// the Pod), once each.
    pub(super) fn pods(&self) -> Vec<Arc<WorkloadPod>> {
        fn key(pod: &WorkloadPod) -> (&str, &str) {
            (pod.metadata.ns(), pod.metadata.name_str())
        }
        let mut pods: Vec<Arc<WorkloadPod>> = self
            .watches
            .iter()
            .flat_map(|((ns, _), w)| w.selected(ns))
            .collect();
        // A Pod two selectors select is in both stores: keep one.
        pods.sort_unstable_by(|a, b| key(a).cmp(&key(b)));
        pods.dedup_by(|a, b| key(a) == key(b));
        pods
    }

    /// Pods watched now, for logs.
    pub(super) fn watches(&self) -> usize {
        self.watches.len()
    }
}
