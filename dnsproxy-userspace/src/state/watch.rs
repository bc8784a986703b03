//! One reflector per watched collection: a typed kube-rs `watcher`, trimmed with
//! `.modify()` (`super::trim`), reflected into a store that the rest of the daemon
//! reads, and a [`Signal`] for each event that changes what the daemon reads — an
//! update to fields the trim drops signals nothing.
use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash as _, Hasher as _},
};

use futures::StreamExt as _;
use kube::{
    Api, Resource, ResourceExt as _,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use serde::{Serialize, de::DeserializeOwned};
use tokio::{
    sync::mpsc,
    task::{AbortHandle, JoinSet},
};

/// What changed, as the daemon's loop acts on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Signal {
    /// A Service or a headless Service's `EndpointSlice` of this namespace, or of every
    /// namespace after a list (`None`): that namespace's shard of the name table.
    Services(Option<String>),
    /// What the `ServiceEntries`' shard is built from (`ServiceEntries`,
    /// `WorkloadEntries`, selected Pods, the VIP store).
    Entries,
    /// A Pod of this node (`namespace/name`), or all of them after a list (`None`).
    LocalPod(Option<String>),
    /// A Namespace (its name), or all of them after a list (`None`).
    Namespace(Option<String>),
}

/// How a collection's events become signals: the signal for one object's key
/// (`namespace/name`), or for a whole new list (`None`).
pub(super) type ToSignal = fn(Option<String>) -> Signal;

/// A watch to start: its API, watcher settings, trim and signal.
pub(super) struct Spec<K: Resource> {
    pub(super) api: Api<K>,
    pub(super) config: watcher::Config,
    pub(super) dyntype: K::DynamicType,
    pub(super) trim: fn(&mut K),
    pub(super) signal: ToSignal,
    /// For logs.
    pub(super) kind: &'static str,
}

/// Starts reflectors, each signalling into the same channel, owned by one task set.
pub(super) struct Reflectors<'a> {
    pub(super) signals: &'a mpsc::Sender<Signal>,
    pub(super) tasks: &'a mut JoinSet<()>,
}

impl Reflectors<'_> {
    /// Starts the reflector of `spec`; returns its store.
    pub(super) fn start<K>(&mut self, spec: Spec<K>) -> Store<K>
    where
        K: Resource
            + Clone
            + DeserializeOwned
            + Serialize
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
        K::DynamicType: Clone + Eq + std::hash::Hash + Send + Sync,
    {
        reflect(spec, self.signals.clone(), self.tasks).0
    }
}

/// [`Signal::Services`] for an object's key: its namespace.
pub(super) fn services(key: Option<String>) -> Signal {
    Signal::Services(key.map(|k| k.split_once('/').map_or(k.clone(), |(ns, _)| ns.to_owned())))
}

/// [`Signal::Entries`], whatever the object.
pub(super) fn entries(_: Option<String>) -> Signal {
    Signal::Entries
}

/// The key of an object: `namespace/name` (`name` for cluster-scoped ones).
fn key_of<K: Resource>(obj: &K) -> String {
    match obj.namespace() {
        Some(ns) => format!("{ns}/{}", obj.name_any()),
        None => obj.name_any(),
    }
}

/// A fingerprint of a trimmed object: equal when nothing the daemon reads changed.
fn fingerprint<K: Serialize>(obj: &K) -> u64 {
    let mut h = DefaultHasher::new();
    serde_json::to_vec(obj).unwrap_or_default().hash(&mut h);
    h.finish()
}

/// Starts the reflector of `spec` in `tasks`; returns its store and the handle that
/// stops it. Each event that changes a trimmed object (or ends a list) sends its
/// signal to `signals`.
pub(super) fn reflect<K>(
    spec: Spec<K>,
    signals: mpsc::Sender<Signal>,
    tasks: &mut JoinSet<()>,
) -> (Store<K>, AbortHandle)
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Clone + Eq + std::hash::Hash + Send + Sync,
{
    let writer = reflector::store::Writer::new(spec.dyntype.clone());
    let reader = writer.as_reader();
    let stream = watcher(spec.api, spec.config)
        .default_backoff()
        .modify(spec.trim)
        .reflect(writer);
    let (kind, to_signal) = (spec.kind, spec.signal);
    let task = tasks.spawn(async move {
        futures::pin_mut!(stream);
        // What each object was the last time it signalled.
        let mut seen: HashMap<String, u64> = HashMap::new();
        let mut listing: Option<HashMap<String, u64>> = None;
        while let Some(event) = stream.next().await {
            let signal = match event {
                Ok(watcher::Event::Apply(obj)) => {
                    let (key, print) = (key_of(&obj), fingerprint(&obj));
                    if seen.insert(key.clone(), print) == Some(print) {
                        continue;
                    }
                    to_signal(Some(key))
                }
                Ok(watcher::Event::Delete(obj)) => {
                    let key = key_of(&obj);
                    seen.remove(&key);
                    to_signal(Some(key))
                }
                Ok(watcher::Event::Init) => {
                    listing = Some(HashMap::new());
                    continue;
                }
                Ok(watcher::Event::InitApply(obj)) => {
                    if let Some(listed) = listing.as_mut() {
                        listed.insert(key_of(&obj), fingerprint(&obj));
                    }
                    continue;
                }
                Ok(watcher::Event::InitDone) => {
                    let listed = listing.take().unwrap_or_default();
                    if listed == seen && !seen.is_empty() {
                        // A relist that found everything as it was (a watch that
                        // expired, say) changes nothing.
                        continue;
                    }
                    seen = listed;
                    to_signal(None)
                }
                Err(e) => {
                    tracing::warn!(%kind, error = %e, "watch failed, retrying with backoff");
                    continue;
                }
            };
            if signals.send(signal).await.is_err() {
                return;
            }
        }
    });
    (reader, task)
}
