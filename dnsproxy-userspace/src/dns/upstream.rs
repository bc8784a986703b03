//! The upstream path of a query the name table does not answer: the cache, then the
//! failure memory, the in-flight bounds and merging ([`super::inflight`]), the
//! forwarder; when every upstream fails, a stale answer if serve-stale is on.
use std::{net::SocketAddr, sync::Arc, time::Instant};

use hickory_proto::{
    op::{Message, Query},
    rr::rdata::opt::EdnsOption,
};

use super::{
    cache::{Cache, CachedAnswer, Key},
    forwarder::Forwarder,
    inflight::{Admission, InFlight, Question},
    metrics::Metrics,
};
use crate::name::normalize_name;

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

/// The client's flags, relayed upstream as it set them: each makes its question
/// different upstream work (and a different answer to cache).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Bits {
    pub recursion_desired: bool,
    pub dnssec_ok: bool,
    pub checking_disabled: bool,
}

impl Bits {
    /// What the daemon asks for itself (backend resolution): recursion, no DNSSEC.
    pub const RECURSIVE: Bits = Bits {
        recursion_desired: true,
        dnssec_ok: false,
        checking_disabled: false,
    };
}

/// What is relayed upstream with a question: the client's flags and its end-to-end
/// EDNS options (Client Subnet and others; never the hop-by-hop COOKIE, TCP keepalive,
/// padding, NSID). Both change the answer, so both key the cache and the merging.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Relay {
    pub bits: Bits,
    pub options: Vec<EdnsOption>,
}

impl Relay {
    /// What the daemon asks for itself: recursion, no DNSSEC, no options.
    pub const RECURSIVE: Relay = Relay {
        bits: Bits::RECURSIVE,
        options: Vec::new(),
    };
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

    /// The cache of upstream answers.
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// Questions with the upstreams right now.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// The cached answer to `question`, if there is one (counted as a hit; a miss is
    /// counted by [`UpstreamPath::answer`], which the caller goes on to).
    pub fn cached(&self, question: &Query, relay: &Relay) -> Option<Upstream> {
        let hit = self.cache.get(&key_of(question, relay), Instant::now())?;
        self.metrics.cache_hit();
        Some(Upstream {
            answer: hit,
            source: Source::Cache,
        })
    }

    /// The answer to `question` for `client`.
    pub async fn answer(
        &self,
        question: &Query,
        relay: &Relay,
        client: &Arc<str>,
    ) -> Result<Upstream, Refusal> {
        let key = key_of(question, relay);
        if let Some(hit) = self.cache.get(&key, Instant::now()) {
            self.metrics.cache_hit();
            return Ok(Upstream {
                answer: hit,
                source: Source::Cache,
            });
        }
        self.metrics.cache_miss();
        let asked = self.ask(question, &key, client).await;
        if asked.as_ref().err() == Some(&Refusal::Failed)
            && let Some(stale) = self.cache.stale(&key, Instant::now())
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
        key: &Key,
        client: &Arc<str>,
    ) -> Result<Upstream, Refusal> {
        let work = Question {
            name: key.name.clone(),
            qtype: key.qtype,
            qclass: key.qclass,
            relay: key.relay.clone(),
        };
        let lead = match self.inflight.admit(work, client, Instant::now()) {
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

/// The cache key of a question relayed with `relay`.
fn key_of(question: &Query, relay: &Relay) -> Key {
    Key {
        name: normalize_name(question.name()),
        qtype: question.query_type(),
        qclass: question.query_class(),
        relay: relay.clone(),
    }
}
