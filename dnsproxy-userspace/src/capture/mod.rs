//! Node mode's per-pod capture: for each running pod of this node that the capture
//! policy selects (`policy`), DNS listeners inside the pod's network namespace
//! (`netns`) and the `dp_policy` entry that turns the redirect on for that namespace.
//!
//! Driven by the pod's own events (`crate::state`): a change to one pod touches that
//! pod only. A pod whose process is not there yet is tried again on a backoff of its
//! own; nothing runs while no pod changes.
pub mod netns;
pub mod policy;
pub mod resolv;

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
use tokio::time::Instant;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    bpf::{self, BpfError, netns_cookie::NetnsCookies, pinned},
    dns::{
        client::ClientContext,
        server::{Listeners, Shared, SharedContext, StdListeners},
    },
    handoff::{Inventory, PodSockets},
    registry::manifest::{Meta as _, Namespace, Pod},
    vip::translate::views::Views,
};
use netns::{Locator, NetnsId, PodNetns};

/// The pinned `dp_policy` map: netns cookie → capture policy.
type PolicyMap = BpfHashMap<MapData, u64, NetnsPolicy>;

/// First and longest wait before a pod that could not be captured is tried again.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Settings of the capture.
#[derive(Clone, Debug)]
pub struct CaptureConfig {
    /// This node's name: only its pods are captured.
    pub node_name: String,
    /// Capture pods that no namespace label or pod annotation decides for.
    pub capture_default: bool,
    /// Port of the in-pod listeners.
    pub listen_port: u16,
    /// Search domains beyond the Kubernetes ones.
    pub extra_search: Vec<String>,
    /// Walk each pod's search list for it (`--autopath`), unless the pod opts out.
    pub autopath: bool,
    /// bpffs directory of the pinned maps.
    pub pin_dir: PathBuf,
    /// Where pods' processes are found.
    pub locator: Locator,
    /// How the netns cookie of a pod's namespace is learned.
    pub cookies: Arc<NetnsCookies>,
    /// Each namespace's view, written in its pods' policy entries.
    pub views: Arc<Views>,
}

/// Node mode's part in a handoff: what this daemon keeps for a successor, and what
/// its predecessor handed over (by pod UID), used instead of new sockets while the
/// pod's network namespace is the same.
pub struct Handoff {
    pub inventory: Arc<Inventory>,
    pub handed: HashMap<String, PodSockets>,
}

/// The pinned `dp_policy` map under `pin_dir`.
fn policy_map(pin_dir: &std::path::Path) -> Result<PolicyMap, BpfError> {
    pinned::open_hash(pin_dir, map_names::POLICY)
}

/// Rewrites the policy entry of pod `key`'s netns (`cookie`) for a sidecar that came or
/// went.
fn set_sidecar(pin_dir: &std::path::Path, key: &str, cookie: u64, sidecar: bool) {
    let updated =
        policy_map(pin_dir)
            .map_err(anyhow::Error::from)
            .and_then(|mut map: PolicyMap| {
                let mut entry = map.get(&cookie, 0)?;
                entry.sidecar = u32::from(sidecar);
                map.insert(cookie, entry, 0)?;
                Ok(())
            });
    match updated {
        Ok(()) => tracing::info!(pod = %key, sidecar, "sidecar mode changed"),
        Err(e) => tracing::warn!(pod = %key, "cannot update the policy entry: {e:#}"),
    }
}

/// What the pod's containers are: a new sandbox restarts them all, so a change here is
/// when the pod's network namespace is looked at again.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Containers(Vec<(String, Option<String>, i32)>);

impl Containers {
    fn of(pod: &Pod) -> Self {
        let mut ids: Vec<(String, Option<String>, i32)> = pod
            .status
            .iter()
            .flat_map(|s| {
                s.init_container_statuses
                    .iter()
                    .flatten()
                    .chain(s.container_statuses.iter().flatten())
            })
            .map(|c| (c.name.clone(), c.container_id.clone(), c.restart_count))
            .collect();
        ids.sort();
        Containers(ids)
    }
}

/// What a captured pod should get.
struct Desired {
    uid: String,
    ctx: ClientContext,
    containers: Containers,
    /// It has a sidecar proxy.
    sidecar: bool,
    /// The daemon walks its search list for it.
    autopath: bool,
}

impl Desired {
    /// Its client context, with the pod's search list when the daemon walks it.
    fn ctx_with(&self, search: &Arc<[String]>) -> ClientContext {
        ClientContext {
            autopath: if self.autopath {
                Arc::clone(search)
            } else {
                Arc::new([])
            },
            ..self.ctx.clone()
        }
    }
}

/// A captured pod's listener; dropping it stops the listener (its in-flight queries
/// are answered first).
struct PodListener {
    uid: String,
    inventory: Arc<Inventory>,
    cookie: u64,
    /// Its slot in `dp_listeners`.
    slot: u32,
    /// Identity of the network namespace it listens in.
    netns_id: NetnsId,
    /// Its namespace, whose view it holds while it lives.
    view: (Arc<Views>, String),
    /// Its policy entry says the pod has a sidecar proxy.
    sidecar: bool,
    /// The containers it was opened or last checked for.
    containers: Containers,
    /// The containers changed and the namespace was not found since: look again.
    verify: bool,
    /// The pod's search list, read when the listener opened.
    search: Arc<[String]>,
    ctx: SharedContext,
    stop: CancellationToken,
}

impl Drop for PodListener {
    fn drop(&mut self) {
        self.view.0.release(&self.view.1);
        self.stop.cancel();
        // The copies kept for a successor go too, so the sockets really close.
        self.inventory.remove_pod(&self.uid);
    }
}

/// A pod to try again: when, and how many tries so far.
#[derive(Clone, Copy, Debug)]
struct Retry {
    at: Instant,
    attempt: u32,
}

/// The in-pod listeners of this node's captured pods, by `namespace/name`.
pub struct PodCapture {
    config: CaptureConfig,
    shared: Shared,
    by_key: HashMap<String, PodListener>,
    retry: HashMap<String, Retry>,
    handoff: Handoff,
    /// Last decision per pod, to log changes once.
    decisions: HashMap<String, (String, bool, &'static str)>,
    /// The serving tasks of every listener.
    serving: TaskTracker,
    shutdown: CancellationToken,
}

impl PodCapture {
    pub fn new(
        config: CaptureConfig,
        shared: Shared,
        handoff: Handoff,
        shutdown: CancellationToken,
    ) -> Self {
        PodCapture {
            config,
            shared,
            by_key: HashMap::new(),
            retry: HashMap::new(),
            handoff,
            decisions: HashMap::new(),
            serving: TaskTracker::new(),
            shutdown,
        }
    }

    /// True while a successor takes the sockets over: listeners stay as they are.
    pub fn frozen(&self) -> bool {
        self.handoff.inventory.frozen()
    }

    /// Pods captured now.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// True when no pod is captured.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// When the next pod is due to be tried again, if one is.
    pub fn next_retry(&self) -> Option<Instant> {
        self.retry.values().map(|r| r.at).min()
    }

    /// The pods due to be tried again now.
    pub fn due(&self) -> Vec<String> {
        let now = Instant::now();
        self.retry
            .iter()
            .filter(|(_, r)| r.at <= now)
            .map(|(key, _)| key.clone())
            .collect()
    }

    fn policy_map(&self) -> Result<PolicyMap, BpfError> {
        policy_map(&self.config.pin_dir)
    }

    /// Brings the capture of pod `key` (`namespace/name`) in line with `pod` (`None`:
    /// it is gone) in `namespace`.
    pub async fn apply(&mut self, key: &str, pod: Option<&Pod>, namespace: Option<&Namespace>) {
        let want = pod.and_then(|p| self.desired(key, p, namespace));
        if pod.is_none() {
            self.decisions.remove(key);
        }
        let replaced = self
            .by_key
            .get(key)
            .is_some_and(|l| want.as_ref().is_none_or(|w| w.uid != l.uid));
        if replaced {
            self.close(
                key,
                "DNS capture stopped: listener closed, policy entry removed",
            );
        }
        let Some(want) = want else {
            self.retry.remove(key);
            return;
        };
        if let Some(listener) = self.by_key.get_mut(key) {
            // The pod keeps its metric series across settings changes.
            let mut ctx = want.ctx_with(&listener.search);
            ctx.requests.clone_from(&listener.ctx.load().requests);
            if **listener.ctx.load() != ctx {
                tracing::info!(pod = %key, auto_allocate = ctx.auto_allocate, dns_debug = ctx.debug_log, autopath = !ctx.autopath.is_empty(), "pod settings changed");
                listener.ctx.store(Arc::new(ctx.clone()));
            }
            if listener.sidecar != want.sidecar {
                let cookie = listener.cookie;
                listener.sidecar = want.sidecar;
                set_sidecar(&self.config.pin_dir, key, cookie, want.sidecar);
            }
            if listener.containers == want.containers && !listener.verify {
                return;
            }
            listener.containers = want.containers.clone();
            listener.verify = true;
            let listening_in = listener.netns_id;
            // Its containers changed: a recreated sandbox is a new network namespace.
            match self.locate(&want.uid).await {
                Ok(netns) if netns.id == listening_in => {
                    if let Some(listener) = self.by_key.get_mut(key) {
                        listener.verify = false;
                    }
                    self.retry.remove(key);
                }
                Ok(netns) => {
                    self.close(
                        key,
                        "pod sandbox recreated: the old network namespace's listener closed",
                    );
                    let want = Desired { ctx, ..want };
                    self.open_located(key, want, &netns).await;
                }
                Err(e) => self.try_later(key, &e),
            }
            return;
        }
        match self.locate(&want.uid).await {
            Ok(netns) => self.open_located(key, want, &netns).await,
            Err(e) => self.try_later(key, &e),
        }
    }

    /// Brings every pod in line with `pods` (at start, and after the pods were listed
    /// again): pods that are not there any more lose their capture.
    pub async fn apply_all(
        &mut self,
        pods: &[Arc<Pod>],
        namespace: impl Fn(&str) -> Option<Arc<Namespace>>,
    ) {
        let listed: HashMap<String, &Arc<Pod>> = pods.iter().map(|p| (key_of(p), p)).collect();
        let mut keys: HashSet<String> = listed.keys().cloned().collect();
        keys.extend(self.by_key.keys().cloned());
        keys.extend(self.retry.keys().cloned());
        for key in keys {
            let pod = listed.get(&key).map(|p| &***p);
            let ns = pod.and_then(|p| namespace(p.metadata.ns()));
            self.apply(&key, pod, ns.as_deref()).await;
        }
        self.decisions.retain(|key, _| listed.contains_key(key));
        // Handed-over sockets of pods that are gone (or not captured) close now.
        self.handoff.handed.clear();
        self.remove_orphans();
    }

    /// The pod's desired capture, with the decision logged when it changes.
    fn desired(&mut self, key: &str, pod: &Pod, namespace: Option<&Namespace>) -> Option<Desired> {
        let uid = pod.metadata.uid.clone()?;
        let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
        if node != Some(self.config.node_name.as_str()) {
            return None;
        }
        let decision = policy::decide(pod, namespace, self.config.capture_default);
        let logged = (uid.clone(), decision.capture, decision.decided_by);
        if self.decisions.get(key) != Some(&logged) {
            tracing::info!(pod = %key, capture = decision.capture, decided_by = decision.decided_by, "capture policy");
            self.decisions.insert(key.to_owned(), logged);
        }
        decision.capture.then(|| Desired {
            uid,
            ctx: ClientContext {
                namespace: pod.metadata.ns().to_owned(),
                extra_search: self.config.extra_search.clone(),
                auto_allocate: decision.auto_allocate,
                debug_log: decision.dns_debug,
                client: Arc::from(key),
                pod: Some(key.to_owned()),
                requests: None,
                autopath: Arc::new([]),
            },
            containers: Containers::of(pod),
            sidecar: policy::sidecar(pod),
            autopath: self.config.autopath && policy::autopath(pod),
        })
    }

    /// The pod's network namespace, found off the async runtime's threads.
    async fn locate(&self, uid: &str) -> Result<PodNetns, netns::NetnsError> {
        let (locator, uid) = (self.config.locator.clone(), uid.to_owned());
        tokio::task::spawn_blocking(move || locator.locate(&uid))
            .await
            .expect("the locating thread panicked")
    }

    /// The pod is tried again after a backoff of its own.
    fn try_later(&mut self, key: &str, why: &dyn std::fmt::Display) {
        let attempt = self.retry.get(key).map_or(0, |r| r.attempt + 1);
        let wait = RETRY_MIN
            .saturating_mul(1 << attempt.min(16))
            .min(RETRY_MAX);
        if attempt == 0 {
            tracing::debug!(pod = %key, "not captured yet, trying again: {why}");
        } else if wait == RETRY_MAX {
            tracing::warn!(pod = %key, attempt, "still not captured, trying again in {wait:?}: {why}");
        }
        self.retry.insert(
            key.to_owned(),
            Retry {
                at: Instant::now() + wait,
                attempt,
            },
        );
    }

    /// Opens the listener of a located pod, or schedules another try.
    async fn open_located(&mut self, key: &str, want: Desired, netns: &PodNetns) {
        match self.open(key, want, netns).await {
            Ok(listener) => {
                self.retry.remove(key);
                self.by_key.insert(key.to_owned(), listener);
            }
            Err(e) => {
                tracing::warn!(pod = %key, "not captured yet: {e:#}");
                self.try_later(key, &format!("{e:#}"));
            }
        }
    }

    /// Closes pod `key`'s listener and removes its policy entry.
    fn close(&mut self, key: &str, why: &str) {
        let Some(listener) = self.by_key.remove(key) else {
            return;
        };
        match self.policy_map() {
            Ok(mut map) => {
                if let Err(e) = map.remove(&listener.cookie) {
                    tracing::warn!(pod = %key, error = %crate::report(&e), "cannot remove the policy entry");
                }
            }
            Err(e) => tracing::error!("cannot open the policy map: {}", crate::report(&e)),
        }
        tracing::info!(pod = %key, netns_cookie = listener.cookie, "{why}");
    }

    /// Opens the listener inside the pod's network namespace, starts serving it, and
    /// writes the policy entry that turns capture on for that namespace.
    async fn open(
        &mut self,
        key: &str,
        want: Desired,
        netns: &PodNetns,
    ) -> anyhow::Result<PodListener> {
        let (std_listeners, cookie) = self.bind(&want.uid, netns, key).await?;
        let kept = std_listeners
            .dup()
            .context("cannot keep the in-pod sockets for a successor")?;
        let listeners =
            Listeners::from_std(std_listeners).context("cannot register the in-pod listener")?;
        let mut policy_map = self.policy_map()?;
        // A handed-over pod's entry names its slot and its namespace's view already.
        let handed = policy_map.get(&cookie, 0).ok();
        let slot = self.slot_for(handed.as_ref(), &policy_map)?;
        bpf::listeners::register(&self.config.pin_dir, slot, &listeners.fds())
            .context("cannot enter the in-pod listener in dp_listeners")?;
        let (namespace, pod) = key.split_once('/').unwrap_or(("", key));
        let mut ctx = want.ctx_with(&netns.search);
        ctx.requests = self.shared.handler.metrics().pod_requests(namespace, pod);
        let ctx = Arc::new(ArcSwap::from_pointee(ctx));
        let stop = self.shutdown.child_token();
        let views = &self.config.views;
        let view = views.acquire(namespace, handed.map(|p| p.view));
        let entry = NetnsPolicy {
            capture_dns: 1,
            listener_slot: slot,
            view,
            sidecar: u32::from(want.sidecar),
        };
        if let Err(e) = policy_map.insert(cookie, entry, 0) {
            views.release(namespace);
            return Err(e).context("cannot write the policy entry");
        }
        self.handoff.inventory.add_pod(
            &want.uid,
            PodSockets {
                netns: netns.id,
                cookie,
                sockets: kept,
            },
        );
        self.serving
            .spawn(listeners.serve(self.shared.clone(), Arc::clone(&ctx), stop.clone()));
        tracing::info!(pod = %key, netns_cookie = cookie, sidecar = want.sidecar, autopath = ?ctx.load().autopath, "DNS capture started: in-pod listener open, policy entry written");
        Ok(PodListener {
            uid: want.uid,
            inventory: Arc::clone(&self.handoff.inventory),
            cookie,
            slot,
            netns_id: netns.id,
            view: (Arc::clone(views), namespace.to_owned()),
            sidecar: want.sidecar,
            containers: want.containers,
            verify: false,
            search: Arc::clone(&netns.search),
            ctx,
            stop,
        })
    }

    /// The listener slot for a netns: the one its policy entry (`handed`) names already
    /// (a pod the predecessor handed over), else the lowest slot that neither a
    /// listener of ours nor any policy entry holds.
    fn slot_for(
        &self,
        handed: Option<&NetnsPolicy>,
        policy_map: &PolicyMap,
    ) -> anyhow::Result<u32> {
        let mut used: HashSet<u32> = self.by_key.values().map(|l| l.slot).collect();
        if let Some(entry) = handed
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
    /// pod's current network namespace, else new ones bound inside it (off the async
    /// runtime's threads).
    async fn bind(
        &mut self,
        uid: &str,
        netns: &PodNetns,
        key: &str,
    ) -> anyhow::Result<(StdListeners, u64)> {
        if let Some(handed) = self.handoff.handed.remove(uid) {
            if handed.netns == netns.id {
                tracing::info!(pod = %key, netns_cookie = handed.cookie, "serving the sockets the previous daemon handed over");
                return Ok((StdListeners::from_sockets(handed.sockets), handed.cookie));
            }
            tracing::info!(pod = %key, "handed-over sockets are in a network namespace the pod left: binding new ones");
        }
        let port = self.config.listen_port;
        let cookies = Arc::clone(&self.config.cookies);
        let netns = netns
            .try_clone()
            .context("keeping the pod's process handle")?;
        Ok(
            tokio::task::spawn_blocking(move || netns::bind_in(&netns, port, &cookies))
                .await
                .context("the listener thread failed")??,
        )
    }

    /// Entries nobody serves (an earlier daemon's pods that are gone) go away.
    fn remove_orphans(&self) {
        let mut policy_map = match self.policy_map() {
            Ok(m) => m,
            Err(e) => {
                tracing::error!("cannot open the policy map: {}", crate::report(&e));
                return;
            }
        };
        let live: HashSet<u64> = self.by_key.values().map(|l| l.cookie).collect();
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
    pub async fn close_all(&mut self) {
        self.by_key.clear();
        self.serving.close();
        self.serving.wait().await;
    }
}

/// A pod's key: `namespace/name`.
pub fn key_of(pod: &Pod) -> String {
    format!("{}/{}", pod.metadata.ns(), pod.metadata.name_str())
}
