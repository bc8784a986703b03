//! Upstream work in flight: bounded, shared fairly, merged, and remembered when it
//! failed.
//!
//! * At most `--max-inflight` questions are with the upstreams at once, and at most
//!   `--max-inflight-per-client` of them for one client (a pod's network namespace in
//!   node mode), so one pod's flood cannot take every slot from the others. A question
//!   over a bound is refused at once (the handler answers SERVFAIL, counted as
//!   `overload`); answers from the table and the cache never come here.
//! * Identical questions in flight (name, type, class, DO and CD bits) are merged: the
//!   first asker leads, the others wait for its answer and take no slot — at most
//!   [`FOLLOWERS_PER_SLOT`] times `--max-inflight` of them wait at once.
//! * A question whose upstreams all failed is answered from memory for
//!   [`FAILURE_TTL`] (RFC 9520) instead of going upstream again.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hickory_proto::op::Message;
use tokio::sync::watch;

use super::question::Question;

/// How long a failed question is answered SERVFAIL from memory (RFC 9520 §3.2: at
/// least 1 s).
pub const FAILURE_TTL: Duration = Duration::from_secs(1);

/// Questions that may wait on merged ones, per slot of `--max-inflight`.
pub const FOLLOWERS_PER_SLOT: usize = 8;

/// Most remembered failures; past it, expired ones are dropped first and new ones are
/// not remembered (the bound on in-flight work bounds how fast failures arrive anyway).
const MAX_FAILURES: usize = 10_000;

/// The outcome a leader shares with the questions merged into it: the upstream's
/// answer, or `None` when every upstream failed.
pub type Shared = Option<Arc<Message>>;

/// Limits of [`InFlight`].
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub total: usize,
    pub per_client: usize,
}

/// Why a question would be refused at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// It failed a moment ago.
    RecentlyFailed,
    /// A bound is reached.
    Overloaded,
}

/// Whether a question may go upstream.
pub enum Admission {
    /// Ask the upstreams, then [`Lead::finish`].
    Lead(Lead),
    /// The same question is in flight: wait for its outcome.
    Follow(Follower),
    /// It failed a moment ago: SERVFAIL from memory.
    RecentlyFailed,
    /// A bound is reached: refuse at once.
    Overloaded,
}

#[derive(Default)]
struct State {
    total: usize,
    followers: usize,
    per_client: HashMap<Arc<str>, usize>,
    pending: HashMap<Question, watch::Receiver<Option<Shared>>>,
    failed: HashMap<Question, Instant>,
}

/// The in-flight bookkeeping of one daemon.
pub struct InFlight {
    limits: Limits,
    state: Arc<Mutex<State>>,
}

/// The right and duty to ask the upstreams for one question. Dropping it without
/// [`Lead::finish`] (the query was cancelled) releases the slot and tells followers
/// the question failed.
pub struct Lead {
    question: Question,
    client: Arc<str>,
    outcome: watch::Sender<Option<Shared>>,
    state: Arc<Mutex<State>>,
}

/// A question merged into one in flight; dropping it frees its place.
pub struct Follower {
    outcome: watch::Receiver<Option<Shared>>,
    state: Arc<Mutex<State>>,
}

/// The state, also after a panic elsewhere (its counters stay consistent: every
/// change is made whole under the lock).
fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl InFlight {
    pub fn new(limits: Limits) -> Self {
        InFlight {
            limits,
            state: Arc::default(),
        }
    }

    /// Questions with the upstreams right now.
    pub fn len(&self) -> usize {
        self.lock().total
    }

    /// True when nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Whether [`InFlight::admit`] would refuse `question` from `client` now, and why;
    /// `None` when it would let it lead or follow. Reserves nothing: a slot freed in
    /// between only means a question is refused that might have gone.
    pub fn refusal(&self, question: &Question, client: &Arc<str>, now: Instant) -> Option<Refused> {
        let state = self.lock();
        if state.failed.get(question).is_some_and(|until| *until > now) {
            return Some(Refused::RecentlyFailed);
        }
        if state.pending.contains_key(question) {
            let full = state.followers >= self.limits.total.saturating_mul(FOLLOWERS_PER_SLOT);
            return full.then_some(Refused::Overloaded);
        }
        let mine = state.per_client.get(client).copied().unwrap_or(0);
        (state.total >= self.limits.total || mine >= self.limits.per_client)
            .then_some(Refused::Overloaded)
    }

    /// Decides whether `question` from `client` goes upstream, waits for an identical
    /// one, is answered from the failure memory, or is refused.
    pub fn admit(&self, question: Question, client: &Arc<str>, now: Instant) -> Admission {
        let mut state = self.lock();
        if let Some(until) = state.failed.get(&question) {
            if *until > now {
                return Admission::RecentlyFailed;
            }
            state.failed.remove(&question);
        }
        if let Some(outcome) = state.pending.get(&question) {
            if state.followers >= self.limits.total.saturating_mul(FOLLOWERS_PER_SLOT) {
                return Admission::Overloaded;
            }
            let outcome = outcome.clone();
            state.followers += 1;
            return Admission::Follow(Follower {
                outcome,
                state: Arc::clone(&self.state),
            });
        }
        let mine = state.per_client.get(client).copied().unwrap_or(0);
        if state.total >= self.limits.total || mine >= self.limits.per_client {
            return Admission::Overloaded;
        }
        state.total += 1;
        *state.per_client.entry(Arc::clone(client)).or_default() += 1;
        let (outcome, waiting) = watch::channel(None);
        state.pending.insert(question.clone(), waiting);
        Admission::Lead(Lead {
            question,
            client: Arc::clone(client),
            outcome,
            state: Arc::clone(&self.state),
        })
    }
}

impl Lead {
    /// Shares the outcome with the followers; a failure is remembered for
    /// [`FAILURE_TTL`].
    pub fn finish(self, outcome: Shared, now: Instant) {
        if outcome.is_none() {
            let mut state = lock(&self.state);
            if state.failed.len() >= MAX_FAILURES {
                state.failed.retain(|_, until| *until > now);
            }
            if state.failed.len() < MAX_FAILURES {
                state
                    .failed
                    .insert(self.question.clone(), now + FAILURE_TTL);
            }
        }
        self.outcome.send_replace(Some(outcome));
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        let mut state = lock(&self.state);
        state.total -= 1;
        if let Some(n) = state.per_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                state.per_client.remove(&self.client);
            }
        }
        state.pending.remove(&self.question);
    }
}

impl Follower {
    /// The leader's outcome; `None` when it failed or was cancelled.
    pub async fn outcome(mut self) -> Shared {
        match self.outcome.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone().flatten(),
            Err(_) => None,
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let mut state = lock(&self.state);
        state.followers -= 1;
    }
}

#[cfg(test)]
mod tests {
    use hickory_proto::{
        op::{MessageType, OpCode},
        rr::{DNSClass, RecordType},
    };

    use super::*;

    fn q(name: &str) -> Question {
        Question {
            name: name.to_owned(),
            qtype: RecordType::A,
            qclass: DNSClass::IN,
            relay: crate::dns::question::Relay::RECURSIVE,
        }
    }

    fn lead(a: Admission) -> Lead {
        match a {
            Admission::Lead(l) => l,
            _ => panic!("not a lead"),
        }
    }

    #[tokio::test]
    async fn identical_questions_merge_and_share_the_answer() {
        let f = InFlight::new(Limits {
            total: 10,
            per_client: 10,
        });
        let (pod, now) = (Arc::from("a"), Instant::now());
        let leader = lead(f.admit(q("x"), &pod, now));
        let Admission::Follow(follower) = f.admit(q("x"), &pod, now) else {
            panic!("not merged");
        };
        let mut other_bits = q("x");
        other_bits.relay.bits.dnssec_ok = true;
        let distinct = lead(f.admit(other_bits, &pod, now));
        assert_eq!(f.len(), 2, "the follower takes no slot");
        let answer = Arc::new(Message::new(7, MessageType::Response, OpCode::Query));
        leader.finish(Some(Arc::clone(&answer)), now);
        assert_eq!(follower.outcome().await.unwrap().metadata.id, 7);
        drop(distinct);
        assert!(f.is_empty());
    }

    #[tokio::test]
    async fn bounds_total_and_per_client() {
        let f = InFlight::new(Limits {
            total: 3,
            per_client: 2,
        });
        let (a, b, now) = (Arc::from("a"), Arc::from("b"), Instant::now());
        let _a1 = lead(f.admit(q("1"), &a, now));
        let _a2 = lead(f.admit(q("2"), &a, now));
        assert!(
            matches!(f.admit(q("3"), &a, now), Admission::Overloaded),
            "per client"
        );
        let b1 = lead(f.admit(q("4"), &b, now));
        assert!(
            matches!(f.admit(q("5"), &b, now), Admission::Overloaded),
            "total"
        );
        drop(b1);
        let _b2 = lead(f.admit(q("5"), &b, now));
        // Followers of one question: at most FOLLOWERS_PER_SLOT per slot.
        let waiting: Vec<Admission> = (0..3 * FOLLOWERS_PER_SLOT)
            .map(|_| f.admit(q("1"), &a, now))
            .collect();
        assert!(waiting.iter().all(|w| matches!(w, Admission::Follow(_))));
        assert!(
            matches!(f.admit(q("1"), &a, now), Admission::Overloaded),
            "followers"
        );
    }

    #[tokio::test]
    async fn failures_are_remembered_briefly_and_cancellation_fails_followers() {
        let f = InFlight::new(Limits {
            total: 10,
            per_client: 10,
        });
        let (pod, now) = (Arc::from("a"), Instant::now());
        lead(f.admit(q("x"), &pod, now)).finish(None, now);
        assert!(matches!(
            f.admit(q("x"), &pod, now),
            Admission::RecentlyFailed
        ));
        let later = now + FAILURE_TTL;
        let cancelled = lead(f.admit(q("x"), &pod, later));
        let Admission::Follow(follower) = f.admit(q("x"), &pod, later) else {
            panic!("not merged");
        };
        drop(cancelled);
        assert!(follower.outcome().await.is_none());
        assert!(f.is_empty());
    }
}
