//! Node mode: the Kubernetes API as the registry source, and per-pod capture.
//!
//! kube-rs reflectors (watcher → store, default backoff, objects slimmed) follow
//! Services, `EndpointSlices`, `ServiceEntries`, `WorkloadEntries`, Namespaces and Pods
//! (cluster-wide and slimmed to labels, IP and readiness: this node's are captured,
//! any may back a `workloadSelector`); the rest
//! of the daemon reads the stores, never the API. Every change rebuilds the name table
//! (the same code as for YAML files) and reconciles the in-pod listeners and the
//! netns policy map with the capture policy (`policy`).
pub mod policy;
pub mod vip_store;

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use aya::maps::{HashMap as BpfHashMap, MapData};
use dnsproxy_common::{NetnsPolicy, map_names};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client,
    api::{DynamicObject, ListParams},
    core::{ApiResource, GroupVersionKind},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::task::JoinSet;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    bpf::{self, BpfError, pinned},
    dns::{
        client::ClientContext,
        server::{Listeners, Shared, SharedContext, StdListeners},
    },
    handoff::{Inventory, PodSockets},
    netns,
    registry::{
        Registry,
        manifest::{Namespace, Objects, Pod, ServiceEntry, WorkloadSelector},
        table::{selectable_pods, workload_selectors},
    },
};

/// Backoff of the VIP store after a failed round: first and longest.
const STORE_RETRY_MIN: Duration = Duration::from_secs(2);
const STORE_RETRY_MAX: Duration = Duration::from_mins(5);

/// The pinned `dp_policy` map: netns cookie → capture policy.
type PolicyMap = BpfHashMap<MapData, u64, NetnsPolicy>;

/// Settings of node mode.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This node's name: only its pods are captured.
    pub node_name: String,
    /// `NAMESPACE/NAME` of the ConfigMap the daemons share their VIPs in (none: local
    /// allocation only).
    pub vip_store: Option<String>,
    /// Capture pods that no namespace label or pod annotation decides for.
    pub capture_default: bool,
    /// Port of the in-pod listeners.
    pub listen_port: u16,
    /// Search domains beyond the Kubernetes ones.
    pub extra_search: Vec<String>,
    /// bpffs directory of the pinned maps.
    pub pin_dir: PathBuf,
    /// Where processes are looked up to find a pod's network namespace.
    pub proc_root: PathBuf,
}

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

/// The version of Istio's `kind` the cluster serves: `v1`, else `v1beta1`, else none
/// (Istio not installed).
async fn istio_resource(
    client: &Client,
    kind: &str,
    plural: &str,
) -> anyhow::Result<Option<ApiResource>> {
    for version in ["v1", "v1beta1"] {
        let ar = resource("networking.istio.io", version, kind, plural);
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

/// Keeps of a Pod what the daemon reads: labels, the capture annotations, node,
/// host network, phase, IP and readiness (the watch is cluster-wide, for
/// `workloadSelector` backends, so its memory is kept small).
fn slim_pod(pod: &mut DynamicObject) {
    const READ: [&str; 3] = [
        policy::POD_ANNOTATION,
        policy::ISTIO_PROXY_CONFIG,
        policy::ISTIO_LOG_LEVEL,
    ];
    if let Some(a) = pod.metadata.annotations.as_mut() {
        a.retain(|k, _| READ.contains(&k.as_str()));
    }
    pod.metadata.owner_references = None;
    let keep = |value: &serde_json::Value, keys: &[&str]| -> serde_json::Value {
        let mut kept = serde_json::Map::new();
        for key in keys {
            if let Some(v) = value.get(*key) {
                kept.insert((*key).to_owned(), v.clone());
            }
        }
        serde_json::Value::Object(kept)
    };
    let spec = keep(&pod.data["spec"], &["nodeName", "hostNetwork"]);
    let status = keep(&pod.data["status"], &["phase", "podIP", "conditions"]);
    pod.data = serde_json::json!({ "spec": spec, "status": status });
}

/// A reflector's store and the task that feeds it (owned by [`Watches`]).
fn reflect(
    client: &Client,
    ar: &ApiResource,
    namespace: Option<&str>,
    config: watcher::Config,
    changes: &tokio::sync::watch::Sender<u64>,
    reflectors: &mut JoinSet<()>,
) -> Store<DynamicObject> {
    let is_pod = ar.kind == "Pod";
    let writer = reflector::store::Writer::new(ar.clone());
    let reader = writer.as_reader();
    let api: Api<DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, ar),
        None => Api::all_with(client.clone(), ar),
    };
    let kind = ar.kind.clone();
    let changes = changes.clone();
    let stream = watcher(api, config)
        .default_backoff()
        .modify(move |obj| {
            // Slim objects: the store keeps only what the table reads.
            obj.metadata.managed_fields = None;
            if let Some(a) = obj.metadata.annotations.as_mut() {
                a.remove("kubectl.kubernetes.io/last-applied-configuration");
            }
            if is_pod {
                slim_pod(obj);
            }
        })
        .reflect(writer);
    reflectors.spawn(async move {
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => changes.send_modify(|g| *g += 1),
                Err(e) => tracing::warn!(%kind, error = %e, "watch failed, retrying with backoff"),
            }
        }
    });
    reader
}

/// The store's objects in our types; an object that does not fit is skipped, named.
fn convert<T: DeserializeOwned>(store: &Store<DynamicObject>) -> Vec<T> {
    store
        .state()
        .iter()
        .filter_map(|obj| {
            let value = serde_json::to_value(&**obj).ok()?;
            match serde_json::from_value(value) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!(name = ?obj.metadata.name, namespace = ?obj.metadata.namespace, error = %e, "object skipped");
                    None
                }
            }
        })
        .collect()
}

// === impl Watches ===

/// The reflectors of node mode and the stores they keep; dropping it stops them.
struct Watches {
    services: Store<DynamicObject>,
    slices: Store<DynamicObject>,
    namespaces: Store<DynamicObject>,
    /// Every Pod of the cluster, slimmed: this node's are captured, any may be a
    /// `workloadSelector` backend.
    pods: Store<DynamicObject>,
    /// `None` when the cluster serves no `ServiceEntries` (Istio not installed).
    service_entries: Option<Store<DynamicObject>>,
    workload_entries: Option<Store<DynamicObject>>,
    /// The ConfigMap of shared VIPs (only watched, so that its changes start a round).
    vip_store: Option<Store<DynamicObject>>,
    /// Changes of what the name table is built from (Pods aside).
    changed: tokio::sync::watch::Receiver<u64>,
    /// Changes of Pods and Namespaces: capture policy, and maybe `workloadSelector`
    /// backends.
    pods_changed: tokio::sync::watch::Receiver<u64>,
    /// The change generation the name table was last built from.
    built: Option<u64>,
    /// The `workloadSelectors` of that build and the Pods they selected: a Pod
    /// change rebuilds the table only when it changes these.
    selectors: Vec<(String, WorkloadSelector)>,
    selected: Vec<Pod>,
    /// After a failed agreement through the VIP store: when to try again, and the
    /// backoff that led there.
    store_backoff: Option<(tokio::time::Instant, Duration)>,
    reflectors: JoinSet<()>,
}

impl Watches {
    /// Services, `EndpointSlices`, Namespaces, Pods (slimmed), and `ServiceEntries` and
    /// `WorkloadEntries` when the cluster serves them.
    async fn start(client: &Client, store: Option<(&str, &str)>) -> anyhow::Result<Self> {
        let (changes, changed) = tokio::sync::watch::channel(0u64);
        let (pod_changes, pods_changed) = tokio::sync::watch::channel(0u64);
        let mut reflectors = JoinSet::new();
        let default = watcher::Config::default();
        // Pods and Namespaces signal apart: most of their changes concern the capture
        // policy only, not the name table.
        let mut watch = |ar: ApiResource, changes: &tokio::sync::watch::Sender<u64>| {
            reflect(client, &ar, None, default.clone(), changes, &mut reflectors)
        };
        let services = watch(resource("", "v1", "Service", "services"), &changes);
        let slices = watch(
            resource("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices"),
            &changes,
        );
        let namespaces = watch(resource("", "v1", "Namespace", "namespaces"), &pod_changes);
        let pods = watch(resource("", "v1", "Pod", "pods"), &pod_changes);
        let service_entries = istio_resource(client, "ServiceEntry", "serviceentries")
            .await?
            .map(|ar| watch(ar, &changes));
        let workload_entries = istio_resource(client, "WorkloadEntry", "workloadentries")
            .await?
            .map(|ar| watch(ar, &changes));
        // The shared VIP store: another daemon's write starts a round here too.
        let vip_store = store.map(|(ns, name)| {
            let ar = resource("", "v1", "ConfigMap", "configmaps");
            let only = default.fields(&format!("metadata.name={name}"));
            reflect(client, &ar, Some(ns), only, &changes, &mut reflectors)
        });
        Ok(Watches {
            services,
            slices,
            namespaces,
            pods,
            service_entries,
            workload_entries,
            vip_store,
            changed,
            pods_changed,
            built: None,
            selectors: Vec::new(),
            selected: Vec::new(),
            store_backoff: None,
            reflectors,
        })
    }

    /// Waits until every store holds its first full list.
    async fn synced(&self) -> anyhow::Result<()> {
        let stores = [
            ("Services", &self.services),
            ("EndpointSlices", &self.slices),
            ("Namespaces", &self.namespaces),
            ("Pods", &self.pods),
        ];
        let istio = [
            self.service_entries.as_ref().map(|s| ("ServiceEntries", s)),
            self.workload_entries
                .as_ref()
                .map(|s| ("WorkloadEntries", s)),
            self.vip_store.as_ref().map(|s| ("the VIP store", s)),
        ];
        for (kind, store) in stores.into_iter().chain(istio.into_iter().flatten()) {
            store
                .wait_until_ready()
                .await
                .with_context(|| format!("{kind} watch stopped before its first sync"))?;
            tracing::info!(kind, objects = store.state().len(), "synced");
        }
        Ok(())
    }

    /// Rebuilds the name table when something it is built from changed since the last
    /// build (of `pods`, only those a `workloadSelector` selects), with the VIPs agreed
    /// with the other daemons through `store`.
    async fn update_registry(
        &mut self,
        registry: &Registry,
        store: Option<&vip_store::VipStore>,
        pods: &[Pod],
    ) {
        let generation = *self.changed.borrow_and_update();
        let store_due = self
            .store_backoff
            .is_some_and(|(retry_at, _)| tokio::time::Instant::now() >= retry_at);
        if self.built == Some(generation)
            && !store_due
            && selectable_pods(pods, &self.selectors) == self.selected
        {
            return;
        }
        self.built = Some(generation);
        let service_entries: Vec<ServiceEntry> = self
            .service_entries
            .as_ref()
            .map(convert)
            .unwrap_or_default();
        self.selectors = workload_selectors(&service_entries);
        self.selected = selectable_pods(pods, &self.selectors);
        let objects = Objects {
            service_entries,
            services: convert(&self.services),
            endpoint_slices: convert(&self.slices),
            workload_entries: self
                .workload_entries
                .as_ref()
                .map(convert)
                .unwrap_or_default(),
            pods: self.selected.clone(),
        };
        if let Some(store) = store {
            self.agree_vips(registry, store, &objects).await;
        }
        if let Err(e) = registry.update(&objects) {
            tracing::error!(
                "name table not updated, the last one stays in service: {}",
                crate::report(&e)
            );
        }
    }

    /// Agrees on the auto-allocated VIPs of `objects` with the other daemons through
    /// `store`. After a failed round the store is left alone for a backoff (2 s,
    /// doubling up to 5 min): VIPs are allocated locally meanwhile, and a store that
    /// is full or down is not asked again on every change by every node.
    async fn agree_vips(
        &mut self,
        registry: &Registry,
        store: &vip_store::VipStore,
        objects: &Objects,
    ) {
        let now = tokio::time::Instant::now();
        if self
            .store_backoff
            .is_some_and(|(retry_at, _)| now < retry_at)
        {
            return;
        }
        let (wanted, reserved) = crate::registry::table::vip_demand(objects);
        let watched = self
            .vip_store
            .as_ref()
            .and_then(|s| convert::<ConfigMap>(s).into_iter().next());
        match store
            .agree(&wanted, &reserved, &registry.allocations(), watched)
            .await
        {
            Ok((slots, lost)) => {
                registry.count_vip_store_round(lost, false);
                if lost > 0 {
                    tracing::info!(
                        lost,
                        "VIP store: other daemons wrote first, agreed after re-reading"
                    );
                }
                registry.adopt_allocations(slots);
                self.store_backoff = None;
            }
            Err(e) => {
                let lost = match e {
                    vip_store::StoreError::Contended(_) => vip_store::ATTEMPTS,
                    _ => 0,
                };
                registry.count_vip_store_round(lost, true);
                let backoff = self
                    .store_backoff
                    .map_or(STORE_RETRY_MIN, |(_, b)| (b * 2).min(STORE_RETRY_MAX));
                self.store_backoff = Some((now + backoff, backoff));
                tracing::warn!(
                    ?backoff,
                    "no agreement on VIPs with the other daemons, allocating locally until the next try: {}",
                    crate::report(&e)
                );
            }
        }
    }

    fn pods(&self) -> Vec<Pod> {
        convert(&self.pods)
    }

    fn namespaces(&self) -> HashMap<String, Namespace> {
        convert::<Namespace>(&self.namespaces)
            .into_iter()
            .map(|n| (n.metadata.name.clone(), n))
            .collect()
    }

    /// Waits for the next change (a burst settles into one), or `retry`.
    async fn next_change(&mut self, retry: Duration) -> anyhow::Result<()> {
        tokio::select! {
            res = self.changed.changed() => {
                res.context("the watchers stopped")?;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            res = self.pods_changed.changed() => {
                res.context("the watchers stopped")?;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            ended = self.reflectors.join_next() => {
                anyhow::bail!("a watch task ended: {ended:?}");
            }
            () = tokio::time::sleep(retry) => {}
        }
        Ok(())
    }
}

/// Watches the cluster and keeps the registry and the in-pod listeners current until
/// `shutdown`. Fires `ready` after the first full sync; an error is fatal.
pub async fn run(
    client: Client,
    config: NodeConfig,
    registry: Arc<Registry>,
    (shared, handoff): (Shared, Handoff),
    ready: tokio::sync::oneshot::Sender<()>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let store = config
        .vip_store
        .as_deref()
        .filter(|l| !l.is_empty())
        .and_then(|location| vip_store::VipStore::new(client.clone(), location));
    let watched = store.as_ref().map(|s| (s.namespace(), s.name()));
    let mut watches = Watches::start(&client, watched).await?;
    watches.synced().await?;
    let mut listeners = PodListeners::new(config, shared, handoff, shutdown.clone());
    let mut ready = Some(ready);
    let followed = shutdown
        .run_until_cancelled(async {
            loop {
                let pods = watches.pods();
                watches
                    .update_registry(&registry, store.as_ref(), &pods)
                    .await;
                // While a successor takes the sockets over, they stay as they are.
                let pending = listeners.handoff.inventory.frozen()
                    || listeners.reconcile(&pods, &watches.namespaces()).await;
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
                // Pods whose process is not there yet are retried every second; every
                // two seconds anyway, to see sandboxes the runtime recreated.
                let retry = Duration::from_secs(if pending { 1 } else { 2 });
                watches.next_change(retry).await?;
            }
        })
        .await;
    listeners.close_all().await;
    followed.unwrap_or(Ok(()))
}

// === impl PodListeners ===

/// A captured pod's listener; dropping it stops the listener (its in-flight queries
/// are answered first).
struct PodListener {
    uid: String,
    inventory: Arc<Inventory>,
    name: String,
    cookie: u64,
    /// Its slot in `dp_listeners`.
    slot: u32,
    /// Identity of the network namespace it listens in.
    netns_id: (u64, u64),
    ctx: SharedContext,
    stop: CancellationToken,
}

impl Drop for PodListener {
    fn drop(&mut self) {
        self.stop.cancel();
        // The copies kept for a successor go too, so the sockets really close.
        self.inventory.remove_pod(&self.uid);
    }
}

/// Node mode's part in a handoff: what this daemon keeps for a successor, and what
/// its predecessor handed over (by pod UID), used instead of new sockets while the
/// pod's network namespace is the same.
pub struct Handoff {
    pub inventory: Arc<Inventory>,
    pub handed: HashMap<String, PodSockets>,
}

/// What a captured pod should get: its name and the context its queries are answered in.
type Desired = HashMap<String, (String, ClientContext)>;

/// The in-pod listeners of this node's captured pods, by pod UID.
struct PodListeners {
    config: NodeConfig,
    shared: Shared,
    by_uid: HashMap<String, PodListener>,
    handoff: Handoff,
    /// Last decision per pod, to log changes once.
    decisions: HashMap<String, (bool, &'static str)>,
    /// The serving tasks of every listener.
    serving: TaskTracker,
    shutdown: CancellationToken,
}

impl PodListeners {
    fn new(
        config: NodeConfig,
        shared: Shared,
        handoff: Handoff,
        shutdown: CancellationToken,
    ) -> Self {
        PodListeners {
            config,
            shared,
            by_uid: HashMap::new(),
            handoff,
            decisions: HashMap::new(),
            serving: TaskTracker::new(),
            shutdown,
        }
    }

    fn policy_map(&self) -> Result<PolicyMap, BpfError> {
        pinned::open_hash(&self.config.pin_dir, map_names::POLICY)
    }

    /// Brings listeners and policy entries in line with `pods`; true when some
    /// captured pod could not be served yet (to retry).
    async fn reconcile(&mut self, pods: &[Pod], namespaces: &HashMap<String, Namespace>) -> bool {
        let desired = self.desired(pods, namespaces);
        let mut policy_map = match self.policy_map() {
            Ok(m) => m,
            Err(e) => {
                tracing::error!("cannot open the policy map: {}", crate::report(&e));
                return true;
            }
        };
        self.close_stale(&desired, &mut policy_map);
        let pending = self.open_new(desired, &mut policy_map).await;
        // Handed-over sockets of pods that are gone (or not captured) close now.
        self.handoff.handed.clear();
        self.remove_orphans(&mut policy_map);
        pending
    }

    /// The captured pods of this node, by UID, with the decision logged when it changes.
    fn desired(&mut self, pods: &[Pod], namespaces: &HashMap<String, Namespace>) -> Desired {
        let mut desired = Desired::new();
        for pod in pods {
            let Some(uid) = pod.metadata.uid.clone() else {
                continue;
            };
            if pod.spec.node_name.as_deref() != Some(self.config.node_name.as_str()) {
                continue;
            }
            let ns = pod.metadata.namespace().to_owned();
            let name = format!("{ns}/{}", pod.metadata.name);
            let decision = policy::decide(pod, namespaces.get(&ns), self.config.capture_default);
            if self.decisions.get(&uid) != Some(&(decision.capture, decision.decided_by)) {
                tracing::info!(pod = %name, capture = decision.capture, decided_by = decision.decided_by, "capture policy");
                self.decisions
                    .insert(uid.clone(), (decision.capture, decision.decided_by));
            }
            if decision.capture {
                let ctx = ClientContext {
                    namespace: ns,
                    extra_search: self.config.extra_search.clone(),
                    auto_allocate: decision.auto_allocate,
                    debug_log: decision.dns_debug,
                    client: Arc::from(name.as_str()),
                    pod: Some(name.clone()),
                    requests: None,
                };
                desired.insert(uid, (name, ctx));
            }
        }
        let present: HashSet<&String> = pods
            .iter()
            .filter_map(|p| p.metadata.uid.as_ref())
            .collect();
        self.decisions.retain(|uid, _| present.contains(uid));
        desired
    }

    /// Gone, or capture turned off: close the listener, then drop the entry.
    fn close_stale(&mut self, desired: &Desired, policy_map: &mut PolicyMap) {
        let stale: Vec<String> = self
            .by_uid
            .keys()
            .filter(|uid| !desired.contains_key(*uid))
            .cloned()
            .collect();
        for uid in stale {
            let listener = self.by_uid.remove(&uid).expect("present");
            if let Err(e) = policy_map.remove(&listener.cookie) {
                tracing::warn!(pod = %listener.name, error = %crate::report(&e), "cannot remove the policy entry");
            }
            tracing::info!(pod = %listener.name, netns_cookie = listener.cookie, "DNS capture stopped: listener closed, policy entry removed");
        }
    }

    /// New captured pods get a listener and a policy entry; known ones their current
    /// settings. True when some pod could not be served yet.
    async fn open_new(&mut self, desired: Desired, policy_map: &mut PolicyMap) -> bool {
        let located =
            netns::find_pods_netns(&self.config.proc_root, desired.keys().map(String::as_str));
        self.close_recreated(&located, policy_map);
        let mut pending = false;
        for (uid, (name, mut ctx)) in desired {
            if let Some(existing) = self.by_uid.get(&uid) {
                // The pod keeps its metric series across settings changes.
                ctx.requests.clone_from(&existing.ctx.load().requests);
                if **existing.ctx.load() != ctx {
                    tracing::info!(pod = %name, auto_allocate = ctx.auto_allocate, dns_debug = ctx.debug_log, "pod settings changed");
                    existing.ctx.store(Arc::new(ctx));
                }
                continue;
            }
            let Some(netns) = located.get(&uid) else {
                tracing::debug!(pod = %name, "no process of the pod yet: will retry");
                pending = true;
                continue;
            };
            match self.open(&uid, netns, &name, ctx, policy_map).await {
                Ok(listener) => {
                    self.by_uid.insert(uid, listener);
                }
                Err(e) => {
                    tracing::warn!(pod = %name, "not captured yet, will retry: {e:#}");
                    pending = true;
                }
            }
        }
        pending
    }

    /// Pods whose sandbox the runtime recreated (same UID, a new network namespace):
    /// the listener in the old, dead namespace closes and its policy entry goes, so
    /// the new namespace is captured in this round.
    fn close_recreated(
        &mut self,
        located: &HashMap<String, netns::PodNetns>,
        policy_map: &mut PolicyMap,
    ) {
        let recreated: Vec<String> = self
            .by_uid
            .iter()
            .filter(|(uid, l)| located.get(*uid).is_some_and(|n| n.id != l.netns_id))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in recreated {
            let old = self.by_uid.remove(&uid).expect("present");
            let _ = policy_map.remove(&old.cookie);
            tracing::info!(pod = %old.name, netns_cookie = old.cookie, "pod sandbox recreated: the old network namespace's listener closed");
        }
    }

    /// Opens the listener inside the pod's network namespace, starts serving it, and
    /// writes the policy entry that turns capture on for that namespace.
    async fn open(
        &mut self,
        uid: &str,
        netns: &netns::PodNetns,
        name: &str,
        ctx: ClientContext,
        policy_map: &mut PolicyMap,
    ) -> anyhow::Result<PodListener> {
        let (std_listeners, cookie) = self.bind(uid, netns, name).await?;
        let kept = std_listeners
            .dup()
            .context("cannot keep the in-pod sockets for a successor")?;
        let listeners =
            Listeners::from_std(std_listeners).context("cannot register the in-pod listener")?;
        let slot = self.slot_for(cookie, policy_map)?;
        bpf::listeners::register(&self.config.pin_dir, slot, &listeners.fds())
            .context("cannot enter the in-pod listener in dp_listeners")?;
        let (namespace, pod) = name.split_once('/').unwrap_or(("", name));
        let mut ctx = ctx;
        ctx.requests = self.shared.handler.metrics().pod_requests(namespace, pod);
        let ctx = Arc::new(ArcSwap::from_pointee(ctx));
        let stop = self.shutdown.child_token();
        let entry = NetnsPolicy {
            capture_dns: 1,
            listener_slot: slot,
        };
        policy_map
            .insert(cookie, entry, 0)
            .context("cannot write the policy entry")?;
        self.handoff.inventory.add_pod(
            uid,
            PodSockets {
                netns: netns.id,
                cookie,
                sockets: kept,
            },
        );
        self.serving
            .spawn(listeners.serve(self.shared.clone(), Arc::clone(&ctx), stop.clone()));
        tracing::info!(pod = %name, netns = %netns.path.display(), netns_cookie = cookie, "DNS capture started: in-pod listener open, policy entry written");
        Ok(PodListener {
            uid: uid.to_owned(),
            inventory: Arc::clone(&self.handoff.inventory),
            name: name.to_owned(),
            cookie,
            slot,
            netns_id: netns.id,
            ctx,
            stop,
        })
    }

    /// The listener slot for the netns with `cookie`: the one its policy entry names
    /// already (a pod the predecessor handed over), else the lowest slot that neither
    /// a listener of ours nor any policy entry holds.
    fn slot_for(&self, cookie: u64, policy_map: &PolicyMap) -> anyhow::Result<u32> {
        let mut used: HashSet<u32> = self.by_uid.values().map(|l| l.slot).collect();
        if let Ok(entry) = policy_map.get(&cookie, 0)
            && bpf::listeners::NODE_SLOTS.contains(&entry.listener_slot)
            && !used.contains(&entry.listener_slot)
        {
            return Ok(entry.listener_slot);
        }
        used.extend(
            policy_map
                .iter()
                .filter_map(Result::ok)
                .map(|(_, p)| p.listener_slot),
        );
        bpf::listeners::free_slot(&used).context("every listener slot of dp_listeners is taken")
    }

    /// The pod's sockets: those the predecessor handed over when they live in the
    /// pod's current network namespace, else new ones bound inside it.
    async fn bind(
        &mut self,
        uid: &str,
        netns: &netns::PodNetns,
        name: &str,
    ) -> anyhow::Result<(StdListeners, u64)> {
        if let Some(handed) = self.handoff.handed.remove(uid) {
            if handed.netns == netns.id {
                tracing::info!(pod = %name, netns_cookie = handed.cookie, "serving the sockets the previous daemon handed over");
                return Ok((StdListeners::from_sockets(handed.sockets), handed.cookie));
            }
            tracing::info!(pod = %name, "handed-over sockets are in a network namespace the pod left: binding new ones");
        }
        let (port, path) = (self.config.listen_port, netns.path.clone());
        Ok(
            tokio::task::spawn_blocking(move || netns::bind_in_netns(&path, port))
                .await
                .context("the listener thread failed")??,
        )
    }

    /// Entries nobody serves (an earlier daemon's pods that are gone) go away.
    fn remove_orphans(&self, policy_map: &mut PolicyMap) {
        let live: HashSet<u64> = self.by_uid.values().map(|l| l.cookie).collect();
        let orphans: Vec<u64> = policy_map
            .keys()
            .filter_map(Result::ok)
            .filter(|c| !live.contains(c))
            .collect();
        for cookie in orphans {
            let _ = policy_map.remove(&cookie);
            tracing::info!(netns_cookie = cookie, "removed a policy entry no pod uses");
        }
    }

    /// Stops every listener and waits until their in-flight queries are answered. The
    /// policy entries stay: the next daemon adopts them.
    async fn close_all(&mut self) {
        self.by_uid.clear();
        self.serving.close();
        self.serving.wait().await;
    }
}
