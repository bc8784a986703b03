//! The upstream path of a query the name table does not answer: the cache, then the
//! failure memory, the in-flight bounds and merging ([`super::inflight`]), the
//! forwarder; when every upstream fails, a stale answer if serve-stale is on.
use std::{net::SocketAddr, sync::Arc, time::Instant};

use hickory_proto::op::{Message, Query};

use super::{
    cache::{Cache, CachedAnswer},
    forwarder::Forwarder,
    inflight::{Admission, InFlight, Refused},
    metrics::Metrics,
    question::{Question, Relay},
};

/// Where an upstream answer came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// This upstream server, just now.
    Server(SocketAddr),
    /// The cache.
    Cache,
    /// The same question in flight for another client.
    Merged,
    /// An expired cache entry, every upstream having failed (serve-stale).
    Stale,
}

/// An answer from the upstream path.
pub struct Upstream {
    pub answer: CachedAnswer,
    pub source: Source,
}

/// Why there is no answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A bound on in-flight work was reached: refused at once.
    Overloaded,
    /// Every upstream failed (now, or a moment ago).
    Failed,
}

/// The cache, the in-flight bookkeeping and the forwarder, composed.
pub struct UpstreamPath {
    forwarder: Arc<Forwarder>,
    cache: Cache,
    inflight: InFlight,
    metrics: Arc<Metrics>,
}

impl UpstreamPath {
    pub fn new(
        forwarder: Arc<Forwarder>,
        cache: Cache,
        inflight: InFlight,
        metrics: Arc<Metrics>,
    ) -> Self {
        UpstreamPath {
            forwarder,
            cache,
            inflight,
            metrics,
        }
    }

    /// The forwarder behind the cache and the bounds.
    pub fn forwarder(&self) -> &Arc<Forwarder> {
        &self.forwarder
    }

    /// The cache of upstream answers.
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// Questions with the upstreams right now.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// The answer to `question` that needs no upstream now: a cached one, or the
    /// refusal the failure memory or a bound gives at once (with serve-stale, a stale
    /// answer instead of a failure). `None`: it goes upstream ([`UpstreamPath::answer`],
    /// which counts the cache miss then).
    pub fn answer_now(
        &self,
        question: &Query,
        relay: &Relay,
        client: &Arc<str>,
    ) -> Option<Result<Upstream, Refusal>> {
        let key = Question::of(question, relay);
        let now = Instant::now();
        if let Some(hit) = self.cache.get(&key, now) {
            self.metrics.cache_hit();
            return Some(Ok(Upstream {
                answer: hit,
                source: Source::Cache,
            }));
        }
        let refused = self.inflight.refusal(&key, client, now)?;
        self.metrics.cache_miss();
        let refusal = match refused {
            Refused::RecentlyFailed => {
                self.metrics.failure_cache_hit();
                Refusal::Failed
            }
            Refused::Overloaded => Refusal::Overloaded,
        };
        Some(self.or_stale(Err(refusal), &key, now))
    }

    /// The answer to `question` for `client`.
    pub async fn answer(
        &self,
        question: &Query,
        relay: &Relay,
        client: &Arc<str>,
    ) -> Result<Upstream, Refusal> {
        let key = Question::of(question, relay);
        if let Some(hit) = self.cache.get(&key, Instant::now()) {
            self.metrics.cache_hit();
            return Ok(Upstream {
                answer: hit,
                source: Source::Cache,
            });
        }
        self.metrics.cache_miss();
        let asked = self.ask(question, &key, client).await;
        self.or_stale(asked, &key, Instant::now())
    }

    /// `asked`, or when every upstream failed and serve-stale is on, the expired
    /// answer the cache still holds.
    fn or_stale(
        &self,
        asked: Result<Upstream, Refusal>,
        key: &Question,
        now: Instant,
    ) -> Result<Upstream, Refusal> {
        if asked.as_ref().err() == Some(&Refusal::Failed)
            && let Some(stale) = self.cache.stale(key, now)
        {
            return Ok(Upstream {
                answer: stale,
                source: Source::Stale,
            });
        }
        asked
    }

    /// Asks the upstreams, within the bounds, merged with identical questions.
    async fn ask(
        &self,
        question: &Query,
        key: &Question,
        client: &Arc<str>,
    ) -> Result<Upstream, Refusal> {
        let lead = match self.inflight.admit(key.clone(), client, Instant::now()) {
            Admission::Lead(lead) => lead,
            Admission::Follow(follower) => {
                self.metrics.merged();
                let shared = follower.outcome().await.ok_or(Refusal::Failed)?;
                return Ok(self.fresh(Message::clone(&shared), Source::Merged));
            }
            Admission::RecentlyFailed => {
                self.metrics.failure_cache_hit();
                return Err(Refusal::Failed);
            }
            Admission::Overloaded => return Err(Refusal::Overloaded),
        };
        match self.forwarder.forward(question, &key.relay).await {
            Ok(fwd) => {
                self.cache.insert(key.clone(), &fwd.reply, Instant::now());
                let shared = Arc::new(fwd.reply);
                lead.finish(Some(Arc::clone(&shared)), Instant::now());
                let reply = Arc::try_unwrap(shared).unwrap_or_else(|s| Message::clone(&s));
                Ok(self.fresh(reply, Source::Server(fwd.upstream)))
            }
            Err(e) => {
                tracing::debug!(target: "dns", question = %question.name(), error = %crate::report(&e), "upstream failed");
                lead.finish(None, Instant::now());
                Err(Refusal::Failed)
            }
        }
    }

    /// A just-received answer as clients may be told it (`--max-ttl`).
    fn fresh(&self, reply: Message, source: Source) -> Upstream {
        let mut answer = CachedAnswer::from(reply);
        answer.clamp_ttls(self.cache.max_ttl());
        Upstream { answer, source }
    }
}
