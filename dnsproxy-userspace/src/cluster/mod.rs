//! Node mode: the Kubernetes API as the registry source, and per-pod capture.
//!
//! kube-rs reflectors (watcher → store, default backoff, objects slimmed) follow
//! Services, EndpointSlices, ServiceEntries, Namespaces and this node's Pods; the rest
//! of the daemon reads the stores, never the API. Every change rebuilds the name table
//! (the same code as for YAML files) and reconciles the in-pod listeners and the
//! netns policy map with the capture policy (`policy`).
pub mod policy;

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use dnsproxy_common::{NetnsPolicy, map_names};
use futures::StreamExt as _;
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
use tokio::task::JoinHandle;

use crate::{
    bpf::{BpfError, pinned},
    dns::{handler::Handler, local::ClientContext, server::Listeners},
    netns,
    registry::{
        Registry,
        manifest::{Namespace, Objects, Pod},
    },
};

/// Settings of node mode.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This node's name: only its pods are watched.
    pub node_name: String,
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

/// The ServiceEntry version this cluster serves: `v1`, else `v1beta1`, else none
/// (Istio not installed: Services only).
async fn service_entry_resource(client: &Client) -> anyhow::Result<Option<ApiResource>> {
    for version in ["v1", "v1beta1"] {
        let ar = resource(
            "networking.istio.io",
            version,
            "ServiceEntry",
            "serviceentries",
        );
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        match api.list(&ListParams::default().limit(1)).await {
            Ok(_) => return Ok(Some(ar)),
            Err(kube::Error::Api(status)) if status.code == 404 => continue,
            Err(e) => return Err(e).context("listing ServiceEntries"),
        }
    }
    tracing::info!("the cluster serves no networking.istio.io ServiceEntries: Services only");
    Ok(None)
}

/// Starts a reflector for `ar`; each event bumps `changes`.
fn reflect(
    client: &Client,
    ar: &ApiResource,
    config: watcher::Config,
    changes: &tokio::sync::watch::Sender<u64>,
) -> (Store<DynamicObject>, JoinHandle<()>) {
    let writer = reflector::store::Writer::new(ar.clone());
    let reader = writer.as_reader();
    let api: Api<DynamicObject> = Api::all_with(client.clone(), ar);
    let kind = ar.kind.clone();
    let changes = changes.clone();
    let stream = watcher(api, config)
        .default_backoff()
        .modify(|obj| {
            // Slim objects: the store keeps only what the table reads.
            obj.metadata.managed_fields = None;
            if let Some(a) = obj.metadata.annotations.as_mut() {
                a.remove("kubectl.kubernetes.io/last-applied-configuration");
            }
        })
        .reflect(writer);
    let task = tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => changes.send_modify(|g| *g += 1),
                Err(e) => tracing::warn!(%kind, error = %e, "watch failed, retrying with backoff"),
            }
        }
    });
    (reader, task)
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

/// Watches the cluster and keeps the registry and the in-pod listeners current. Fires
/// `ready` after the first full sync; returns only on a fatal error.
pub async fn run(
    client: Client,
    config: NodeConfig,
    registry: Arc<Registry>,
    handler: Arc<Handler>,
    ready: tokio::sync::oneshot::Sender<()>,
) -> anyhow::Result<()> {
    let (changes, mut changed) = tokio::sync::watch::channel(0u64);
    let default = watcher::Config::default();
    let (services, _t1) = reflect(
        &client,
        &resource("", "v1", "Service", "services"),
        default.clone(),
        &changes,
    );
    let (slices, _t2) = reflect(
        &client,
        &resource("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices"),
        default.clone(),
        &changes,
    );
    let (namespaces, _t3) = reflect(
        &client,
        &resource("", "v1", "Namespace", "namespaces"),
        default.clone(),
        &changes,
    );
    let pods_config = default
        .clone()
        .fields(&format!("spec.nodeName={}", config.node_name));
    let (pods, _t4) = reflect(
        &client,
        &resource("", "v1", "Pod", "pods"),
        pods_config,
        &changes,
    );
    let service_entries = service_entry_resource(&client)
        .await?
        .map(|ar| reflect(&client, &ar, default, &changes));

    for (kind, store) in [
        ("Services", &services),
        ("EndpointSlices", &slices),
        ("Namespaces", &namespaces),
        ("Pods", &pods),
    ]
    .into_iter()
    .chain(service_entries.as_ref().map(|(s, _)| ("ServiceEntries", s)))
    {
        store
            .wait_until_ready()
            .await
            .with_context(|| format!("{kind} watch stopped before its first sync"))?;
        tracing::info!(kind, objects = store.state().len(), "synced");
    }

    let mut listeners = PodListeners::new(config.clone(), handler);
    let mut ready = Some(ready);
    let mut seen = None;
    loop {
        let generation = *changed.borrow_and_update();
        if seen != Some(generation) {
            seen = Some(generation);
            let objects = Objects {
                service_entries: service_entries
                    .as_ref()
                    .map(|(s, _)| convert(s))
                    .unwrap_or_default(),
                services: convert(&services),
                endpoint_slices: convert(&slices),
            };
            if let Err(e) = registry.update(&objects) {
                tracing::error!("name table not updated, the last one stays in service: {e}");
            }
        }
        let pods: Vec<Pod> = convert(&pods);
        let namespaces: HashMap<String, Namespace> = convert::<Namespace>(&namespaces)
            .into_iter()
            .map(|n| (n.metadata.name.clone(), n))
            .collect();
        let pending = listeners.reconcile(&pods, &namespaces).await;
        if let Some(r) = ready.take() {
            let _ = r.send(());
        }
        // Pods whose process is not there yet are retried every second.
        let retry = if pending {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(3600)
        };
        tokio::select! {
            res = changed.changed() => {
                res.context("the watchers stopped")?;
                // Let a burst of events settle into one rebuild.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            () = tokio::time::sleep(retry) => {}
        }
    }
}

// === impl PodListeners ===

struct PodListener {
    name: String,
    cookie: u64,
    ctx: Arc<ArcSwap<ClientContext>>,
    task: JoinHandle<()>,
}

impl Drop for PodListener {
    fn drop(&mut self) {
        // Dropping the serving task closes the pod's sockets.
        self.task.abort();
    }
}

/// The in-pod listeners of this node's captured pods, by pod UID.
struct PodListeners {
    config: NodeConfig,
    handler: Arc<Handler>,
    by_uid: HashMap<String, PodListener>,
    /// Last decision per pod, to log changes once.
    decisions: HashMap<String, (bool, &'static str)>,
}

impl PodListeners {
    fn new(config: NodeConfig, handler: Arc<Handler>) -> Self {
        PodListeners {
            config,
            handler,
            by_uid: HashMap::new(),
            decisions: HashMap::new(),
        }
    }

    fn policy_map(
        &self,
    ) -> Result<aya::maps::HashMap<aya::maps::MapData, u64, NetnsPolicy>, BpfError> {
        pinned::open_hash(&self.config.pin_dir, map_names::POLICY)
    }

    /// Brings listeners and policy entries in line with `pods`; true when some
    /// captured pod could not be served yet (to retry).
    async fn reconcile(&mut self, pods: &[Pod], namespaces: &HashMap<String, Namespace>) -> bool {
        let mut desired: HashMap<String, (String, ClientContext)> = HashMap::new();
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
                    pod: Some(name.clone()),
                };
                desired.insert(uid, (name, ctx));
            }
        }
        let present: HashSet<&String> = pods
            .iter()
            .filter_map(|p| p.metadata.uid.as_ref())
            .collect();
        self.decisions.retain(|uid, _| present.contains(uid));

        let mut policy_map = match self.policy_map() {
            Ok(m) => m,
            Err(e) => {
                tracing::error!("cannot open the policy map: {e}");
                return true;
            }
        };
        // Gone, or capture turned off: close the listener, then drop the entry.
        let stale: Vec<String> = self
            .by_uid
            .keys()
            .filter(|uid| !desired.contains_key(*uid))
            .cloned()
            .collect();
        for uid in stale {
            let listener = self.by_uid.remove(&uid).expect("present");
            if let Err(e) = policy_map.remove(&listener.cookie) {
                tracing::warn!(pod = %listener.name, error = %e, "cannot remove the policy entry");
            }
            tracing::info!(pod = %listener.name, netns_cookie = listener.cookie, "DNS capture stopped: listener closed, policy entry removed");
        }

        let mut pending = false;
        for (uid, (name, ctx)) in desired {
            if let Some(existing) = self.by_uid.get(&uid) {
                if **existing.ctx.load() != ctx {
                    tracing::info!(pod = %name, auto_allocate = ctx.auto_allocate, dns_debug = ctx.debug_log, "pod settings changed");
                    existing.ctx.store(Arc::new(ctx));
                }
                continue;
            }
            let Some(netns) = netns::find_pod_netns(&self.config.proc_root, &uid) else {
                tracing::debug!(pod = %name, "no process of the pod yet: will retry");
                pending = true;
                continue;
            };
            let port = self.config.listen_port;
            let path = netns.clone();
            let bound =
                tokio::task::spawn_blocking(move || netns::bind_in_netns(&path, port)).await;
            let (std_listeners, cookie) = match bound {
                Ok(Ok(x)) => x,
                Ok(Err(e)) => {
                    tracing::warn!(pod = %name, "cannot open the in-pod listener: {e}");
                    pending = true;
                    continue;
                }
                Err(e) => {
                    tracing::error!(pod = %name, "listener thread failed: {e}");
                    pending = true;
                    continue;
                }
            };
            let listeners = match Listeners::from_std(std_listeners) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(pod = %name, "cannot register the in-pod listener: {e}");
                    pending = true;
                    continue;
                }
            };
            let ctx = Arc::new(ArcSwap::from_pointee(ctx));
            let task = tokio::spawn(listeners.serve(self.handler.clone(), ctx.clone()));
            let entry = NetnsPolicy {
                capture_dns: 1,
                flags: 0,
            };
            if let Err(e) = policy_map.insert(cookie, entry, 0) {
                tracing::error!(pod = %name, error = %e, "cannot write the policy entry");
                task.abort();
                pending = true;
                continue;
            }
            tracing::info!(pod = %name, netns = %netns.display(), netns_cookie = cookie, "DNS capture started: in-pod listener open, policy entry written");
            self.by_uid.insert(
                uid,
                PodListener {
                    name,
                    cookie,
                    ctx,
                    task,
                },
            );
        }

        // Entries nobody serves (an earlier daemon's pods that are gone) go away.
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
        pending
    }
}
