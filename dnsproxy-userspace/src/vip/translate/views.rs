//! Node mode's views: an id for each namespace with captured pods on this node, written
//! in its pods' `dp_policy` entries. The translation writes, under that id, the
//! services a namespace sees differently from everyone (`plan`), and the data path
//! looks there first.
//!
//! An id is never given to another namespace while the daemon runs (they only grow),
//! and a successor adopts its predecessor's ids from the policy entries of the pods it
//! is handed: a map entry left from before can never serve another namespace.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

/// The views, shared by the capture (which writes a pod's view) and the backend sync
/// (which writes each view's services).
#[derive(Debug)]
pub struct Views {
    inner: Mutex<Inner>,
    changed: tokio::sync::watch::Sender<u64>,
}

#[derive(Debug)]
struct Inner {
    by_namespace: HashMap<Arc<str>, View>,
    /// Never below an id the maps held at start.
    next: u32,
}

#[derive(Debug)]
struct View {
    id: u32,
    /// Captured pods of the namespace.
    pods: usize,
}

impl Views {
    /// Views that give no id in `taken` (those the policy entries hold at start) to a
    /// namespace that does not adopt it.
    pub fn new(taken: impl IntoIterator<Item = u32>) -> Self {
        let next = taken.into_iter().max().unwrap_or(0).saturating_add(1);
        Views {
            inner: Mutex::new(Inner {
                by_namespace: HashMap::new(),
                next,
            }),
            changed: tokio::sync::watch::Sender::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The view of `namespace` for one more of its pods: the one it has, else `adopt`
    /// (the id a handed-over pod's policy entry holds) when no other namespace has it,
    /// else a new one.
    pub fn acquire(&self, namespace: &str, adopt: Option<u32>) -> u32 {
        let mut inner = self.lock();
        if let Some(view) = inner.by_namespace.get_mut(namespace) {
            view.pods += 1;
            return view.id;
        }
        let adoptable = adopt.filter(|id| {
            *id != 0 && *id < inner.next && !inner.by_namespace.values().any(|v| v.id == *id)
        });
        let id = adoptable.unwrap_or_else(|| {
            let id = inner.next;
            inner.next = inner.next.saturating_add(1);
            id
        });
        inner
            .by_namespace
            .insert(namespace.into(), View { id, pods: 1 });
        drop(inner);
        self.changed.send_modify(|g| *g += 1);
        id
    }

    /// One pod of `namespace` is no longer captured: its view goes with its last pod.
    pub fn release(&self, namespace: &str) {
        let mut inner = self.lock();
        let Some(view) = inner.by_namespace.get_mut(namespace) else {
            return;
        };
        view.pods = view.pods.saturating_sub(1);
        if view.pods == 0 {
            inner.by_namespace.remove(namespace);
            drop(inner);
            self.changed.send_modify(|g| *g += 1);
        }
    }

    /// Every namespace with captured pods and its view, by namespace.
    pub fn list(&self) -> Vec<(Arc<str>, u32)> {
        let mut views: Vec<(Arc<str>, u32)> = self
            .lock()
            .by_namespace
            .iter()
            .map(|(ns, v)| (Arc::clone(ns), v.id))
            .collect();
        views.sort_unstable();
        views
    }

    /// Fires when a namespace gains or loses its view.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_namespaces_and_are_never_handed_to_another() {
        let views = Views::new([4, 2]);
        assert_eq!(views.acquire("shop", None), 5, "past what the maps hold");
        assert_eq!(views.acquire("shop", Some(9)), 5, "one id per namespace");
        assert_eq!(
            views.acquire("handed", Some(2)),
            2,
            "a predecessor's id, adopted"
        );
        assert_eq!(
            views.acquire("other", Some(2)),
            6,
            "not one another namespace has"
        );
        assert_eq!(
            views.acquire("forged", Some(77)),
            7,
            "not one past what was taken"
        );
        views.release("shop");
        assert_eq!(
            views
                .list()
                .iter()
                .find(|(n, _)| &**n == "shop")
                .map(|v| v.1),
            Some(5)
        );
        views.release("shop");
        assert!(
            views.list().iter().all(|(n, _)| &**n != "shop"),
            "gone with its last pod"
        );
        assert_eq!(
            views.acquire("shop", None),
            8,
            "a released id is not given again"
        );
        let rx = views.subscribe();
        views.acquire("shop", None);
        assert!(!rx.has_changed().unwrap(), "a second pod changes no view");
        views.acquire("new", None);
        assert!(rx.has_changed().unwrap());
    }
}
