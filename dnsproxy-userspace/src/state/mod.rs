//! Node mode: the cluster as this node's daemon needs it, and nothing more.
//!
//! Typed reflectors (`watch`, trimmed by `trim`) follow what pods on this node can
//! see: Services, the `EndpointSlices` of headless Services, `ServiceEntries` and
//! `WorkloadEntries`, Namespaces (their capture label), the VIP store — and Pods in
//! two ways only: this node's own (`spec.nodeName`, for capture) and those a
//! `workloadSelector` selects (`selectors`, one label-selected watch per distinct
//! selector). Pods of other nodes that no entry selects are never listed, so the
//! daemon's cost follows its node, not the cluster.
//!
//! Events drive everything and touch only what they name: a Pod event re-decides that
//! Pod's capture (`crate::capture`), a Namespace event the capture of its Pods here,
//! and a change to a table input rebuilds the name table (with the VIPs
//! `crate::vip::assign` agrees on), paced by `pace` (100 ms after a quiet spell, up to
//! a second apart under sustained churn). Nothing runs on a
//! timer: the only timed work is a Pod whose process is not there yet, or a VIP store
//! that is backing off.
mod pace;
mod selectors;
mod trim;
mod watch;

use std::{collections::HashSet, sync::Arc};

use anyhow::Context as _;
use k8s_openapi::api::{
    core::v1::{ConfigMap, Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    api::ListParams,
    core::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use tokio::{sync::mpsc, task::JoinSet, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    capture::{CaptureConfig, Handoff, PodCapture},
    dns::server::Shared,
    registry::{
        Allocation, Built, NameTable, Registry,
        manifest::{HEADLESS_LABEL, Meta as _, Objects, ServiceEntry, WorkloadEntryObject},
        table::{selectable_pods, workload_selectors},
    },
    vip::assign::{Assignment, Demand},
};
use selectors::SelectedPods;
use watch::{Signal, Spec};

/// Signals waiting to be acted on, at most (the watches wait beyond it).
const SIGNALS: usize = 4096;

/// The version of Istio's `kind` the cluster serves: `v1`, else `v1beta1`, else none
/// (Istio not installed).
async fn istio_resource(
    client: &Client,
    kind: &str,
    plural: &str,
) -> anyhow::Result<Option<ApiResource>> {
    for version in ["v1", "v1beta1"] {
        let gvk = GroupVersionKind::gvk("networking.istio.io", version, kind);
        let ar = ApiResource::from_gvk_with_plural(&gvk, plural);
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        match api.list(&ListParams::default().limit(1)).await {
            Ok(_) => return Ok(Some(ar)),
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => return Err(e).with_context(|| format!("listing {plural}")),
        }
    }
    tracing::info!("the cluster serves no networking.istio.io {kind}");
    Ok(None)
}

/// The reflectors of node mode and their stores; dropping it stops them.
struct Watches {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    namespaces: Store<Namespace>,
    /// This node's Pods.
    pods: Store<Pod>,
    /// `None` when the cluster serves no `ServiceEntries` (Istio not installed).
    service_entries: Option<Store<ServiceEntry>>,
    workload_entries: Option<Store<WorkloadEntryObject>>,
    /// The ConfigMap of shared VIPs (watched, so that its changes start a round).
    vip_store: Option<Store<ConfigMap>>,
    tasks: JoinSet<()>,
}

impl Watches {
    async fn start(
        client: &Client,
        node_name: &str,
        store: Option<(&str, &str)>,
        signals: &mpsc::Sender<Signal>,
    ) -> anyhow::Result<Self> {
        let mut tasks = JoinSet::new();
        let all = watcher::Config::default();
        let mut start = watch::Reflectors {
            signals,
            tasks: &mut tasks,
        };
        let services = start.start(Spec {
            api: Api::<Service>::all(client.clone()),
            config: all.clone(),
            dyntype: (),
            trim: trim::service,
            signal: watch::services,
            kind: "Services",
        });
        // A ClusterIP Service is answered with its ClusterIP: only headless ones read
        // their endpoints, and the controller labels their slices.
        let slices = start.start(Spec {
            api: Api::<EndpointSlice>::all(client.clone()),
            config: all.clone().labels(HEADLESS_LABEL),
            dyntype: (),
            trim: trim::endpoint_slice,
            signal: watch::services,
            kind: "EndpointSlices",
        });
        let namespaces = start.start(Spec {
            api: Api::<Namespace>::all(client.clone()),
            config: all.clone(),
            dyntype: (),
            trim: trim::namespace,
            signal: Signal::Namespace,
            kind: "Namespaces",
        });
        let pods = start.start(Spec {
            api: Api::<Pod>::all(client.clone()),
            config: all.clone().fields(&format!("spec.nodeName={node_name}")),
            dyntype: (),
            trim: trim::local_pod,
            signal: Signal::LocalPod,
            kind: "Pods of this node",
        });
        let service_entries = istio_resource(client, "ServiceEntry", "serviceentries")
            .await?
            .map(|ar| {
                start.start(Spec {
                    api: Api::<ServiceEntry>::all_with(client.clone(), &ar),
                    config: all.clone(),
                    dyntype: ar,
                    trim: trim::service_entry,
                    signal: watch::entries,
                    kind: "ServiceEntries",
                })
            });
        let workload_entries = istio_resource(client, "WorkloadEntry", "workloadentries")
            .await?
            .map(|ar| {
                start.start(Spec {
                    api: Api::<WorkloadEntryObject>::all_with(client.clone(), &ar),
                    config: all.clone(),
                    dyntype: ar,
                    trim: trim::workload_entry,
                    signal: watch::entries,
                    kind: "WorkloadEntries",
                })
            });
        // The shared VIP store: another daemon's write starts a round here too.
        let vip_store = store.map(|(ns, name)| {
            start.start(Spec {
                api: Api::<ConfigMap>::namespaced(client.clone(), ns),
                config: all.clone().fields(&format!("metadata.name={name}")),
                dyntype: (),
                trim: trim::vip_store,
                signal: watch::entries,
                kind: "the VIP store",
            })
        });
        Ok(Watches {
            services,
            slices,
            namespaces,
            pods,
            service_entries,
            workload_entries,
            vip_store,
            tasks,
        })
    }

    /// Waits until every store holds its first full list.
    async fn synced(&self) -> anyhow::Result<()> {
        async fn ready<K>(kind: &str, store: &Store<K>) -> anyhow::Result<()>
        where
            K: kube::Resource + Clone + 'static,
            K::DynamicType: Clone + Eq + std::hash::Hash,
        {
            store
                .wait_until_ready()
                .await
                .with_context(|| format!("{kind} watch stopped before its first sync"))?;
            tracing::info!(kind, objects = store.state().len(), "synced");
            Ok(())
        }
        ready("Services", &self.services).await?;
        ready("EndpointSlices of headless Services", &self.slices).await?;
        ready("Namespaces", &self.namespaces).await?;
        ready("Pods of this node", &self.pods).await?;
        if let Some(s) = &self.service_entries {
            ready("ServiceEntries", s).await?;
        }
        if let Some(s) = &self.workload_entries {
            ready("WorkloadEntries", s).await?;
        }
        if let Some(s) = &self.vip_store {
            ready("the VIP store", s).await?;
        }
        Ok(())
    }

    /// What the entries' shard is built from (the selected Pods are `selected`'s).
    fn objects(&self, selected: &SelectedPods) -> Objects {
        let service_entries: Vec<Arc<ServiceEntry>> = self
            .service_entries
            .as_ref()
            .map(Store::state)
            .unwrap_or_default();
        let selectors = workload_selectors(&service_entries);
        Objects {
            pods: selectable_pods(&selected.pods(), &selectors),
            service_entries,
            workload_entries: self
                .workload_entries
                .as_ref()
                .map(Store::state)
                .unwrap_or_default(),
            ..Objects::default()
        }
    }

    /// Namespace `ns`'s Services and `EndpointSlices` (of headless Services).
    fn services_in(&self, ns: &str) -> (Vec<Arc<Service>>, Vec<Arc<EndpointSlice>>) {
        let of = |meta: &kube::api::ObjectMeta| meta.ns() == ns;
        (
            self.services
                .state()
                .into_iter()
                .filter(|s| of(&s.metadata))
                .collect(),
            self.slices
                .state()
                .into_iter()
                .filter(|s| of(&s.metadata))
                .collect(),
        )
    }

    /// The Pod of this node with `key` (`namespace/name`).
    fn pod(&self, key: &str) -> Option<Arc<Pod>> {
        let (ns, name) = key.split_once('/')?;
        self.pods.get(&ObjectRef::new(name).within(ns))
    }

    fn namespace(&self, name: &str) -> Option<Arc<Namespace>> {
        self.namespaces.get(&ObjectRef::new(name))
    }

    /// Keys of this node's Pods in namespace `ns`.
    fn pods_in(&self, ns: &str) -> Vec<String> {
        self.pods
            .state()
            .iter()
            .filter(|p| p.metadata.ns() == ns)
            .map(|p| crate::capture::key_of(p))
            .collect()
    }
}

/// What the name table needs built again.
#[derive(Default)]
struct Dirty {
    /// Namespaces whose Services (or their slices) changed.
    namespaces: HashSet<String>,
    /// Every namespace's (after Services or slices were listed again).
    all_namespaces: bool,
    /// The `ServiceEntries`' shard.
    entries: bool,
}

impl Dirty {
    fn any(&self) -> bool {
        self.entries || self.all_namespaces || !self.namespaces.is_empty()
    }
}

/// The name table's side: when to build what, and the VIPs it is built with.
struct TableBuilder {
    registry: Arc<Registry>,
    assignment: Assignment,
    selected: SelectedPods,
    /// What changed since the last build.
    dirty: Dirty,
    /// When the next build may come.
    pace: pace::Pace,
    /// The VIP store backs off until then: build the entries again at that time.
    store_retry: Option<Instant>,
}

impl TableBuilder {
    /// When the table is due to be built, if it is.
    fn due_at(&self) -> Option<Instant> {
        let dirty = self.dirty.any().then(|| self.pace.due());
        [dirty, self.store_retry].into_iter().flatten().min()
    }

    /// Builds what is due.
    async fn build_if_due(&mut self, watches: &Watches) {
        let now = Instant::now();
        if self.due_at().is_none_or(|at| at > now) {
            return;
        }
        if self.store_retry.is_some_and(|at| at <= now) {
            self.dirty.entries = true;
        }
        self.pace.built(now);
        let dirty = std::mem::take(&mut self.dirty);
        let mut table = NameTable::clone(&self.registry.table());
        let namespaces: Vec<String> = if dirty.all_namespaces {
            // Every namespace that has Services now, or had some before.
            let mut all: HashSet<String> = watches
                .services
                .state()
                .iter()
                .map(|s| s.metadata.ns().to_owned())
                .collect();
            all.extend(table.service_namespaces().map(ToOwned::to_owned));
            all.into_iter().collect()
        } else {
            dirty.namespaces.into_iter().collect()
        };
        let (mut added, mut removed) = (Vec::new(), Vec::new());
        for ns in &namespaces {
            let (services, slices) = watches.services_in(ns);
            let before = table.cluster_ips(ns).to_vec();
            table = table.with_namespace(ns, &services, &slices);
            let after = table.cluster_ips(ns);
            added.extend(after.iter().filter(|ip| before.binary_search(ip).is_err()));
            removed.extend(before.iter().filter(|ip| after.binary_search(ip).is_err()));
        }
        // No entry may declare a `ClusterIP`: the entries are built again only when a
        // `ClusterIP` that came or went is one they declare or were refused.
        let cluster_ips_moved = table.entries_affected(&added, &removed);
        if dirty.entries || cluster_ips_moved {
            let (objects, vips) = self.entries(watches).await;
            table = table.with_entries(&objects, &vips);
        }
        let built = Built {
            namespaces: namespaces.len() as u64,
            entries: dirty.entries || cluster_ips_moved,
        };
        self.registry.publish(table, built);
    }

    /// The first table, whole: every namespace's Services and the entries.
    async fn build_all(&mut self, watches: &Watches) {
        self.dirty = Dirty::default();
        self.pace.built(Instant::now());
        let (mut objects, vips) = self.entries(watches).await;
        objects.services = watches.services.state();
        objects.endpoint_slices = watches.slices.state();
        self.registry.rebuild(&objects, &vips);
    }

    /// What the entries' shard is built from, with the VIPs agreed for it: the entries'
    /// selectors followed, the VIPs agreed through the store (hosts past the last free
    /// VIP get none, and the table is built all the same).
    async fn entries(&mut self, watches: &Watches) -> (Objects, Allocation) {
        self.store_retry = None;
        let service_entries = watches
            .service_entries
            .as_ref()
            .map(Store::state)
            .unwrap_or_default();
        self.selected.follow(&workload_selectors(&service_entries));
        let objects = watches.objects(&self.selected);
        let demand = Demand::within(&objects, self.registry.table().max_hosts_per_namespace());
        let watched = watches
            .vip_store
            .as_ref()
            .and_then(|s| s.state().into_iter().next());
        let (vips, retry_at) = self.assignment.agree(&demand, watched.as_deref()).await;
        self.store_retry = retry_at;
        (objects, vips)
    }
}

/// What signals asked for, not acted on yet.
#[derive(Default)]
struct Pending {
    /// Every Pod of this node (after a list, or a list of Namespaces).
    all_pods: bool,
    pods: HashSet<String>,
    namespaces: HashSet<String>,
}

impl Pending {
    fn add(&mut self, signal: Signal, table: &mut TableBuilder) {
        match signal {
            Signal::Services(Some(ns)) => {
                table.dirty.namespaces.insert(ns);
            }
            Signal::Services(None) => table.dirty.all_namespaces = true,
            Signal::Entries => table.dirty.entries = true,
            Signal::LocalPod(Some(key)) => {
                self.pods.insert(key);
            }
            Signal::Namespace(Some(name)) => {
                self.namespaces.insert(name);
            }
            Signal::LocalPod(None) | Signal::Namespace(None) => self.all_pods = true,
        }
    }

    fn is_empty(&self) -> bool {
        !self.all_pods && self.pods.is_empty() && self.namespaces.is_empty()
    }
}

/// Node mode's settings.
pub struct NodeSettings {
    pub node_name: String,
    pub capture: CaptureConfig,
}

/// Watches the cluster and keeps the name table and the captured pods current until
/// `shutdown`. Fires `ready` after the first full sync; an error is fatal.
pub async fn run(
    client: Client,
    settings: NodeSettings,
    (registry, assignment): (Arc<Registry>, Assignment),
    (shared, handoff): (Shared, Handoff),
    ready: tokio::sync::oneshot::Sender<()>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (signals, mut signalled) = mpsc::channel(SIGNALS);
    let mut watches =
        Watches::start(&client, &settings.node_name, assignment.store(), &signals).await?;
    watches.synced().await?;
    let mut frozen = handoff.inventory.subscribe_frozen();
    let mut capture = PodCapture::new(settings.capture, shared, handoff, shutdown.clone());
    let mut table = TableBuilder {
        registry,
        assignment,
        selected: SelectedPods::new(client, signals),
        dirty: Dirty::default(),
        pace: pace::Pace::default(),
        store_retry: None,
    };
    // The first table waits for the Pods its selectors select.
    let service_entries = watches
        .service_entries
        .as_ref()
        .map(Store::state)
        .unwrap_or_default();
    table.selected.follow(&workload_selectors(&service_entries));
    table.selected.synced().await;
    table.build_all(&watches).await;
    // The signals of the first lists are acted on here, at once.
    while signalled.try_recv().is_ok() {}
    capture
        .apply_all(&watches.pods.state(), |ns| watches.namespace(ns))
        .await;
    tracing::info!(
        captured = capture.len(),
        selectors = table.selected.watches(),
        names = table.registry.table().len(),
        "first sync done"
    );
    let _ = ready.send(());
    let mut pending = Pending::default();
    let followed = shutdown
        .run_until_cancelled(async {
            loop {
                let wake = [
                    table.due_at(),
                    capture.next_retry(),
                    crate::memory::trim_due().map(Instant::from_std),
                ]
                .into_iter()
                .flatten()
                .min();
                tokio::select! {
                    signal = signalled.recv() => {
                        let signal = signal.context("the watches stopped")?;
                        pending.add(signal, &mut table);
                        while let Ok(more) = signalled.try_recv() {
                            pending.add(more, &mut table);
                        }
                    }
                    () = sleep_until(wake) => {}
                    changed = frozen.changed() => changed.context("the handoff inventory went away")?,
                    ended = watches.tasks.join_next() => {
                        anyhow::bail!("a watch task ended: {ended:?}");
                    }
                }
                table.build_if_due(&watches).await;
                crate::memory::trim_if_due();
                // While a successor takes the sockets over, listeners stay as they are.
                if !capture.frozen() {
                    apply_pods(&mut capture, &watches, &mut pending).await;
                }
            }
        })
        .await;
    capture.close_all().await;
    followed.unwrap_or(Ok(()))
}

/// Acts on the pending pod and namespace signals, and on the pods due for a retry.
async fn apply_pods(capture: &mut PodCapture, watches: &Watches, pending: &mut Pending) {
    let namespace = |ns: &str| watches.namespace(ns);
    if std::mem::take(&mut pending.all_pods) {
        capture.apply_all(&watches.pods.state(), namespace).await;
        pending.pods.clear();
        pending.namespaces.clear();
    }
    let mut keys: HashSet<String> = std::mem::take(&mut pending.pods);
    for ns in std::mem::take(&mut pending.namespaces) {
        keys.extend(watches.pods_in(&ns));
    }
    keys.extend(capture.due());
    debug_assert!(pending.is_empty());
    for key in keys {
        let pod = watches.pod(&key);
        let ns = pod.as_ref().and_then(|p| namespace(p.metadata.ns()));
        capture.apply(&key, pod.as_deref(), ns.as_deref()).await;
    }
}

/// Sleeps until `at`, or forever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
