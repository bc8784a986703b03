//! One query in, one answer out. The handler composes the two resolvers: the name table
//! (`local`) first, then the cache and the upstream forwarder. Malformed input gets
//! FORMERR (or is dropped when not even a header), other opcodes NOTIMP.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RData, Record, RecordType, rdata},
};

use super::{
    EDNS_PAYLOAD, MIN_UDP_PAYLOAD, Protocol,
    cache::{self, Cache, CachedAnswer},
    client::ClientContext,
    forwarder::Forwarder,
    inflight::{self, InFlight},
    local,
    metrics::{Metrics, Outcome},
    question::{Bits, Relay},
    upstream::{Refusal, Source, Upstream, UpstreamPath},
};
use crate::{
    name::{fqdn, normalize_name},
    registry::Registry,
    vip::translate::Translated,
};

/// Logs one query under target `dns`: at debug level, or at info level for a client
/// whose pod asked for `dns:debug`, so its queries show without a global debug level.
macro_rules! query_log {
    ($ctx:expr, $($field:tt)+) => {
        if $ctx.debug_log {
            tracing::info!(target: "dns", pod = %$ctx.pod.as_deref().unwrap_or(""), $($field)+)
        } else {
            tracing::debug!(target: "dns", $($field)+)
        }
    };
}

/// [`query_log!`] for an admitted query: who asked what, then `$field`s.
macro_rules! answer_log {
    ($asked:expr, $question:expr, $($field:tt)+) => {
        query_log!($asked.ctx, client = %$asked.client, protocol = %$asked.protocol, question = %$question, qtype = %$asked.qtype, edns = ?$asked.edns, $($field)+)
    };
}

/// Answers queries.
pub struct Handler {
    registry: Arc<Registry>,
    /// What the data path translates: a VIP is answered only once it does.
    translated: Arc<Translated>,
    upstream: UpstreamPath,
    ttl: u32,
    /// How long an answer may wait for its VIP to be translated.
    vip_wait: std::time::Duration,
    /// Longest an autopath walk may take, all its steps together: one question's
    /// upstream timeout.
    walk_budget: std::time::Duration,
    metrics: Arc<Metrics>,
}

/// A reply given at once ([`Handler::answer_now`]).
pub struct Immediate {
    /// `None`: nothing is sent (a response, or not even a header).
    pub bytes: Option<Vec<u8>>,
    /// How long the fast path may give these bytes to the next asker.
    pub keep: Keep,
}

/// How long an immediate reply stays right for the next asker of the same question.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// A table answer: for this table generation.
    Table,
    /// A cached answer: for this long (its TTLs are then at most this much too high,
    /// never past the cache's own expiry).
    Cached(std::time::Duration),
    /// Not at all.
    No,
}

/// Longest a cached answer is kept encoded: its TTLs are stated in whole seconds.
const KEEP_CACHED: std::time::Duration = std::time::Duration::from_secs(1);

/// Who asked what, for logs and metrics.
struct Asked<'a> {
    client: SocketAddr,
    protocol: Protocol,
    ctx: &'a ClientContext,
    qtype: RecordType,
    edns: Option<u16>,
}

impl<'a> Asked<'a> {
    fn new(
        request: &Message,
        client: SocketAddr,
        protocol: Protocol,
        ctx: &'a ClientContext,
    ) -> Self {
        Asked {
            client,
            protocol,
            ctx,
            qtype: request.queries[0].query_type(),
            edns: request.edns.as_ref().map(Edns::max_payload),
        }
    }
}

/// What the request path is built from besides the name table: the upstreams, the
/// bounds and the timings. The daemon, the tests and the fuzz targets each fill one in
/// and get the same assembly from [`Handler::new`].
#[derive(Clone, Debug)]
pub struct Settings {
    pub upstreams: Vec<SocketAddr>,
    /// How long a question may take upstream, retransmissions and TCP retry included.
    pub upstream_timeout: std::time::Duration,
    /// Ask every upstream at once instead of one after the other.
    pub upstream_parallel: bool,
    pub cache: cache::Limits,
    pub inflight: inflight::Limits,
    /// TTL of table answers.
    pub ttl: u32,
    /// How long a table answer may wait for its VIP to be translated.
    pub vip_wait: std::time::Duration,
}

impl Handler {
    /// The request path, assembled: admission, then the name table, then the cache,
    /// the in-flight bounds and merging, and the forwarder.
    pub fn new(
        settings: Settings,
        registry: Arc<Registry>,
        translated: Arc<Translated>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let forwarder = Arc::new(Forwarder::new(
            settings.upstreams,
            settings.upstream_timeout,
            settings.upstream_parallel,
            Arc::clone(&metrics),
        ));
        let upstream = UpstreamPath::new(
            forwarder,
            Cache::new(settings.cache),
            InFlight::new(settings.inflight),
            Arc::clone(&metrics),
        );
        Self {
            registry,
            translated,
            upstream,
            ttl: settings.ttl,
            vip_wait: settings.vip_wait,
            walk_budget: settings.upstream_timeout,
            metrics,
        }
    }

    /// The forwarder, for the daemon's own lookups (VIP backends of DNS hosts): the
    /// same upstreams and timeouts as the clients' questions.
    pub fn forwarder(&self) -> &Arc<Forwarder> {
        self.upstream.forwarder()
    }

    /// The cache of upstream answers (for its gauges).
    pub fn cache(&self) -> &Cache {
        self.upstream.cache()
    }

    /// The counters it keeps.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Questions with the upstreams right now.
    pub fn in_flight(&self) -> usize {
        self.upstream.in_flight()
    }

    /// The answer to `query` from `client`, or `None` when nothing should be sent.
    pub async fn handle(
        &self,
        query: &[u8],
        protocol: Protocol,
        client: SocketAddr,
        ctx: &ClientContext,
    ) -> Option<Vec<u8>> {
        let request = match self.admit(query, protocol, client, ctx) {
            Ok(request) => request,
            Err(rejection) => return rejection,
        };
        let question = &request.queries[0];
        let asked = Asked::new(&request, client, protocol, ctx);
        let answered = match self.local(question, ctx) {
            Some((local, untranslated)) => {
                self.answer_local(&request, local, &untranslated, &asked)
                    .await
            }
            None => self.answer_forwarded(&request, &asked).await,
        };
        let answered = if answered.0.metadata.response_code == ResponseCode::NXDomain
            && let Ok(Some(walked)) =
                tokio::time::timeout(self.walk_budget, self.autopath(&request, &asked)).await
        {
            walked
        } else {
            answered
        };
        self.counted_reply(&request, &asked, answered)
    }

    /// The `base` of a query `base.<the pod's first search domain>` (A or AAAA, class
    /// IN) when the daemon walks the pod's search list for it.
    fn autopath_base(question: &Query, ctx: &ClientContext) -> Option<String> {
        let first = ctx.autopath.first()?;
        if !matches!(question.query_type(), RecordType::A | RecordType::AAAA)
            || question.query_class() != hickory_proto::rr::DNSClass::IN
        {
            return None;
        }
        let name = normalize_name(question.name());
        let base = name.strip_suffix(first.as_str())?.strip_suffix('.')?;
        (!base.is_empty()).then(|| base.to_owned())
    }

    /// Autopath: the query is `base.<the pod's first search domain>` and does not
    /// exist, so the pod's resolver is walking its search list. The daemon walks the
    /// rest of it (the table's names from the table, the others through the cache and
    /// the upstreams), then `base` itself, and answers with a CNAME to the first name
    /// that exists followed by its records, as CoreDNS's autopath does: the pod's walk
    /// ends after one round trip. `None`: no walk applies, no name along it exists, or
    /// a step failed (the pod's own walk then goes on as without autopath). The caller
    /// bounds the whole walk by one question's upstream timeout, with the same
    /// fallback.
    async fn autopath(&self, request: &Message, asked: &Asked<'_>) -> Option<(Message, Outcome)> {
        let question = &request.queries[0];
        let base = Self::autopath_base(question, asked.ctx)?;
        let rest = asked.ctx.autopath[1..]
            .iter()
            .map(|d| format!("{base}.{d}"));
        for (saved, name) in rest.chain(std::iter::once(base.clone())).enumerate() {
            let target = fqdn(&name)?;
            let mut step = request.clone();
            step.queries[0] = Query::query(target.clone(), question.query_type());
            let (reply, outcome) = match self.local(&step.queries[0], asked.ctx) {
                Some((local, untranslated)) => {
                    self.answer_local(&step, local, &untranslated, asked).await
                }
                None => self.answer_forwarded(&step, asked).await,
            };
            match reply.metadata.response_code {
                ResponseCode::NXDomain => {}
                ResponseCode::NoError => {
                    self.metrics.autopath(saved + 1);
                    answer_log!(asked, question.name(), found = true, autopath = %target, "answered by walking the search list");
                    return Some((self.walked_reply(request, target, reply), outcome));
                }
                _ => return None,
            }
        }
        None
    }

    /// The reply to the first query of a walk whose step `target` answered `found`: a
    /// CNAME from the question to `target`, then `found`'s records (its SOA too, when
    /// it has no record of the type).
    fn walked_reply(&self, request: &Message, target: Name, found: Message) -> Message {
        let mut reply = response_to(request);
        reply.metadata.authoritative = found.metadata.authoritative;
        let ttl = found
            .answers
            .iter()
            .map(|r| r.ttl)
            .min()
            .unwrap_or(self.ttl)
            .min(self.ttl);
        reply.add_answer(Record::from_rdata(
            request.queries[0].name().clone(),
            ttl,
            RData::CNAME(rdata::CNAME(target)),
        ));
        reply.add_answers(found.answers);
        reply.add_authorities(found.authorities);
        reply
    }

    /// Counts how a query ended and gives its reply, fitted to its transport.
    fn counted_reply(
        &self,
        request: &Message,
        asked: &Asked<'_>,
        (reply, outcome): (Message, Outcome),
    ) -> Option<Vec<u8>> {
        let pod = asked.ctx.requests.as_deref();
        self.metrics
            .request(asked.qtype, asked.protocol, outcome, pod);
        fit_to_transport(&reply, request, asked.protocol)
    }

    /// Answers at once, on the caller's thread, what needs no waiting: a query it
    /// rejects (FORMERR, NOTIMP, BADVERS), a table answer whose VIPs are translated and
    /// that has no alias to chase upstream, or a cached upstream answer. `None`: the
    /// query takes [`Handler::handle`].
    pub fn answer_now(
        &self,
        query: &[u8],
        protocol: Protocol,
        client: SocketAddr,
        ctx: &ClientContext,
    ) -> Option<Immediate> {
        let request = match self.admit(query, protocol, client, ctx) {
            Ok(request) => request,
            Err(rejection) => {
                return Some(Immediate {
                    bytes: rejection,
                    keep: Keep::No,
                });
            }
        };
        let question = &request.queries[0];
        let asked = Asked::new(&request, client, protocol, ctx);
        // A question the daemon may walk the pod's search list for, if its name does
        // not exist, is answered on a task ([`Handler::handle`]).
        let walks = Self::autopath_base(question, ctx).is_some();
        let (reply, outcome, keep) = if let Some((local, untranslated)) = self.local(question, ctx)
        {
            if !untranslated.is_empty() || local.chase.is_some() || (walks && local.nxdomain) {
                return None;
            }
            let reply = Self::local_message(&request, local, Vec::new(), &asked);
            (reply, Outcome::Local, Keep::Table)
        } else if walks {
            return None;
        } else {
            match self
                .upstream
                .answer_now(question, &relay(&request), &ctx.client)?
            {
                Ok(hit) => {
                    let keep = match hit.source {
                        Source::Cache => hit.answer.min_ttl().map_or(Keep::No, |ttl| {
                            Keep::Cached(
                                KEEP_CACHED.min(std::time::Duration::from_secs(ttl.into())),
                            )
                        }),
                        _ => Keep::No,
                    };
                    let (reply, outcome) = Self::forwarded_reply(&request, hit, &asked);
                    (reply, outcome, keep)
                }
                // A bound or the failure memory refuses it now, on this thread: a
                // flood of questions the upstreams cannot take costs no task.
                Err(refusal) => {
                    let (reply, outcome) = Self::refused(&request, refusal, &asked);
                    (reply, outcome, Keep::No)
                }
            }
        };
        self.metrics
            .request(asked.qtype, protocol, outcome, ctx.requests.as_deref());
        Some(Immediate {
            bytes: Some(fit_to_transport(&reply, &request, protocol)?),
            keep,
        })
    }

    /// SERVFAIL at once, counted as `overload`: the server has no room for another
    /// query on a task of its own. `None`: no reply (a malformed query, or a response).
    pub fn overloaded(
        &self,
        query: &[u8],
        protocol: Protocol,
        client: SocketAddr,
        ctx: &ClientContext,
    ) -> Option<Vec<u8>> {
        let request = match self.admit(query, protocol, client, ctx) {
            Ok(request) => request,
            Err(rejection) => return rejection,
        };
        let asked = Asked::new(&request, client, protocol, ctx);
        let refused = Self::refused(&request, Refusal::Overloaded, &asked);
        self.counted_reply(&request, &asked, refused)
    }

    /// Counts a reply the fast path gave: a table answer, or a cached one (`cached`).
    pub fn count_kept(&self, qtype: u16, cached: bool, protocol: Protocol, ctx: &ClientContext) {
        let outcome = if cached {
            self.metrics.cache_hit();
            Outcome::Cached
        } else {
            Outcome::Local
        };
        self.metrics.request(
            RecordType::from(qtype),
            protocol,
            outcome,
            ctx.requests.as_deref(),
        );
    }

    /// What it knows is translated (tests change it under the handler).
    #[cfg(test)]
    pub(crate) fn translated(&self) -> &Translated {
        &self.translated
    }

    /// The generation of table answers: it moves after every change that can change
    /// one (a new table, VIPs translated or not, hosts with IPv6 backends), once the
    /// change is visible, so an answer kept under it is stale once it moves.
    pub fn answers_generation(&self) -> u64 {
        self.registry.builds() + self.translated.generation()
    }

    /// The reply from the name table. Never hands out a VIP the data path does not
    /// translate yet (`connect()` would go into a black hole): a fresh host's first
    /// answer waits for its first backend resolution, else SERVFAIL.
    async fn answer_local(
        &self,
        request: &Message,
        local: local::LocalAnswer,
        untranslated: &[IpAddr],
        asked: &Asked<'_>,
    ) -> (Message, Outcome) {
        if untranslated.is_empty()
            || self
                .translated
                .wait_translated(untranslated, self.vip_wait)
                .await
        {
            return self.local_reply(request, local, asked).await;
        }
        let question = &request.queries[0];
        answer_log!(
            asked,
            question.name(),
            found = true,
            ?untranslated,
            "SERVFAIL: VIP not translated yet"
        );
        (
            error_reply(request, ResponseCode::ServFail),
            Outcome::ServFail,
        )
    }

    /// The reply from the upstreams, or SERVFAIL when they fail or a bound refuses.
    async fn answer_forwarded(&self, request: &Message, asked: &Asked<'_>) -> (Message, Outcome) {
        let question = &request.queries[0];
        match self
            .upstream
            .answer(question, &relay(request), &asked.ctx.client)
            .await
        {
            Ok(upstream) => Self::forwarded_reply(request, upstream, asked),
            Err(refusal) => Self::refused(request, refusal, asked),
        }
    }

    /// SERVFAIL for a question the upstream path refused.
    fn refused(request: &Message, refusal: Refusal, asked: &Asked<'_>) -> (Message, Outcome) {
        let (why, outcome) = match refusal {
            Refusal::Overloaded => ("overload: a bound on upstream work", Outcome::Overload),
            Refusal::Failed => ("every upstream failed", Outcome::ServFail),
        };
        answer_log!(
            asked,
            request.queries[0].name(),
            found = false,
            why,
            "SERVFAIL"
        );
        (error_reply(request, ResponseCode::ServFail), outcome)
    }

    /// The parsed query if it is one we answer; else the reply to send instead
    /// (FORMERR, NOTIMP, or nothing at all).
    fn admit(
        &self,
        query: &[u8],
        protocol: Protocol,
        client: SocketAddr,
        ctx: &ClientContext,
    ) -> Result<Message, Option<Vec<u8>>> {
        let request = match Message::from_vec(query) {
            Ok(m) => m,
            Err(e) => {
                query_log!(ctx, %client, %protocol, error = %e, "malformed query");
                let pod = ctx.requests.as_deref();
                self.metrics
                    .request(RecordType::NULL, protocol, Outcome::Rejected, pod);
                return Err(formerr_from_header(query));
            }
        };
        if request.metadata.message_type != MessageType::Query {
            return Err(None);
        }
        let qtype = request
            .queries
            .first()
            .map_or(RecordType::NULL, Query::query_type);
        let code = if request.metadata.op_code != OpCode::Query {
            ResponseCode::NotImp
        } else if request.queries.len() != 1 {
            ResponseCode::FormErr
        } else if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            // RFC 6891 §6.1.3: only version 0 is spoken here.
            ResponseCode::BADVERS
        } else if matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
            // Zone transfers are not a stub resolver's business (RFC 5936 §4.2).
            ResponseCode::NotImp
        } else {
            return Ok(request);
        };
        let pod = ctx.requests.as_deref();
        self.metrics
            .request(qtype, protocol, Outcome::Rejected, pod);
        let mut reply = error_reply(&request, code);
        let bytes = encode(&reply);
        if protocol == Protocol::Udp
            && bytes
                .as_ref()
                .is_some_and(|b| b.len() > udp_limit(&request))
        {
            // Many long questions (found by fuzzing: six of them made a 558-byte FORMERR
            // for a 512-byte client): the error goes without its question section.
            reply.queries.clear();
            return Err(encode(&reply));
        }
        Err(bytes)
    }

    /// The name table's answer. The table guard lives only for the lookup, never
    /// across an await.
    ///
    /// Also returns the VIPs in the answer that the data path does not translate yet.
    fn local(
        &self,
        question: &Query,
        ctx: &ClientContext,
    ) -> Option<(local::LocalAnswer, Vec<IpAddr>)> {
        // The table holds Internet-class names only: CH, HS and the rest go upstream.
        if question.query_class() != hickory_proto::rr::DNSClass::IN {
            return None;
        }
        let table = self.registry.current();
        let answer = local::answer(
            &table,
            &self.translated.ipv6_backed(),
            question.name(),
            question.query_type(),
            ctx,
            self.ttl,
        )?;
        let ips: Vec<IpAddr> = answer
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect();
        let untranslated = self.translated.untranslated(&table, &ips);
        Some((answer, untranslated))
    }

    /// An authoritative reply from the table; an alias to a name the table does not
    /// know gets the target's records from upstream appended, and the target's fate:
    /// its NXDOMAIN (RFC 6604: the CNAME, then the name error), or SERVFAIL when the
    /// upstreams fail (never a dangling CNAME with NOERROR).
    async fn local_reply(
        &self,
        request: &Message,
        mut local: local::LocalAnswer,
        asked: &Asked<'_>,
    ) -> (Message, Outcome) {
        let Some(target) = local.chase.take() else {
            return (
                Self::local_message(request, local, Vec::new(), asked),
                Outcome::Local,
            );
        };
        let chase = Query::query(target, asked.qtype);
        let chased = self
            .upstream
            .answer(&chase, &relay(request), &asked.ctx.client)
            .await;
        let Ok(Upstream {
            answer: upstream, ..
        }) = chased
        else {
            let question = request.queries[0].name();
            answer_log!(asked, question, found = true, chase = %chase.name(), "SERVFAIL: the alias target failed upstream");
            return (
                error_reply(request, ResponseCode::ServFail),
                Outcome::ServFail,
            );
        };
        let mut reply = Self::local_message(request, local, upstream.answers, asked);
        match upstream.response_code {
            ResponseCode::NoError => {}
            ResponseCode::NXDomain => {
                reply.metadata.response_code = ResponseCode::NXDomain;
                reply.add_authorities(upstream.authorities);
            }
            _ => {
                return (
                    error_reply(request, ResponseCode::ServFail),
                    Outcome::ServFail,
                );
            }
        }
        (reply, Outcome::Local)
    }

    /// The authoritative reply: the table's records, then `chased` (an alias target's
    /// records from upstream), and the SOA of a NODATA answer.
    fn local_message(
        request: &Message,
        local: local::LocalAnswer,
        chased: Vec<Record>,
        asked: &Asked<'_>,
    ) -> Message {
        let mut reply = response_to(request);
        reply.metadata.authoritative = true;
        if local.nxdomain {
            reply.metadata.response_code = ResponseCode::NXDomain;
        }
        reply.add_answers(local.answers);
        reply.add_answers(chased);
        if let Some(soa) = local.soa {
            reply.add_authority(soa);
        }
        if asked.ctx.debug_log || tracing::enabled!(target: "dns", tracing::Level::DEBUG) {
            let answers: Vec<String> = reply.answers.iter().map(|r| r.data.to_string()).collect();
            answer_log!(
                asked,
                request.queries[0].name(),
                found = true,
                ?answers,
                "answered locally"
            );
        }
        reply
    }

    /// The reply carrying an upstream (or cached) answer, owner names in the case the
    /// client used (the cache holds the first asker's spelling).
    fn forwarded_reply(
        request: &Message,
        upstream: Upstream,
        asked: &Asked<'_>,
    ) -> (Message, Outcome) {
        let Upstream { answer, source } = upstream;
        let question = request.queries[0].name();
        let mut reply = response_to(request);
        reply.metadata.response_code = answer.response_code;
        let CachedAnswer {
            mut answers,
            authorities,
            additionals,
            response_code: code,
            client_subnet,
        } = answer;
        if let (Some(option), Some(edns)) = (client_subnet, reply.edns.as_mut())
            && cache::client_subnet(request).is_some()
        {
            edns.options_mut().insert(option);
        }
        for r in answers.iter_mut().filter(|r| r.name == *question) {
            r.name = question.clone();
        }
        reply.add_answers(answers);
        reply.add_authorities(authorities);
        reply.add_additionals(additionals);
        let (via, outcome) = match source {
            Source::Server(server) => (server.to_string(), Outcome::Forwarded),
            Source::Merged => ("merged".to_owned(), Outcome::Forwarded),
            Source::Cache => ("cache".to_owned(), Outcome::Cached),
            Source::Stale => ("stale cache".to_owned(), Outcome::Stale),
        };
        answer_log!(asked, question, found = false, upstream = %via, rcode = %code, answers = reply.answers.len(), "forwarded");
        (reply, outcome)
    }
}

/// EDNS options that concern one hop only: never relayed. COOKIE (RFC 7873), TCP
/// keepalive (RFC 7828), padding (RFC 7830), NSID (RFC 5001: this server's identity).
const HOP_BY_HOP: [u16; 4] = [10, 11, 12, 3];

/// What is relayed upstream: the client's flags and end-to-end EDNS options.
fn relay(request: &Message) -> Relay {
    let options = request.edns.as_ref().map_or_else(Vec::new, |edns| {
        edns.options()
            .as_ref()
            .iter()
            .filter(|(code, _)| !HOP_BY_HOP.contains(&u16::from(*code)))
            .map(|(_, option)| option.clone())
            .collect()
    });
    Relay {
        bits: bits(request),
        options,
    }
}

/// The client's flags, relayed upstream.
fn bits(request: &Message) -> Bits {
    Bits {
        recursion_desired: request.metadata.recursion_desired,
        dnssec_ok: request.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok),
        checking_disabled: request.metadata.checking_disabled,
    }
}

/// The encoded reply within what the transport carries: the client's UDP limit, or a
/// TCP frame's 65535 bytes; a larger one is truncated (never dropped), so a UDP client
/// retries over TCP and a TCP client still gets what fits.
fn fit_to_transport(reply: &Message, request: &Message, protocol: Protocol) -> Option<Vec<u8>> {
    let bytes = encode(reply)?;
    let limit = match protocol {
        Protocol::Udp => udp_limit(request),
        Protocol::Tcp => usize::from(u16::MAX),
    };
    if bytes.len() > limit {
        truncate_to(reply, limit)
    } else {
        Some(bytes)
    }
}

/// `reply` within `limit` bytes, as CoreDNS and Istio truncate: the answer records
/// that fit, in order, with TC set when some did not (the client retries over TCP, and
/// one without TCP still has addresses); when every answer fits, the authority and
/// then the additional records that fit, without TC (RFC 2181 §9).
fn truncate_to(reply: &Message, limit: usize) -> Option<Vec<u8>> {
    let mut out = reply.clone();
    out.answers.clear();
    out.authorities.clear();
    out.additionals.clear();
    let fits = |m: &Message| m.to_vec().is_ok_and(|b| b.len() <= limit);
    let answers = longest_fitting_prefix(reply.answers.len(), |k| {
        out.answers = reply.answers[..k].to_vec();
        fits(&out)
    });
    out.answers = reply.answers[..answers].to_vec();
    if answers < reply.answers.len() {
        out.metadata.truncation = true;
        return encode(&out);
    }
    let authorities = longest_fitting_prefix(reply.authorities.len(), |k| {
        out.authorities = reply.authorities[..k].to_vec();
        fits(&out)
    });
    out.authorities = reply.authorities[..authorities].to_vec();
    let additionals = longest_fitting_prefix(reply.additionals.len(), |k| {
        out.additionals = reply.additionals[..k].to_vec();
        fits(&out)
    });
    out.additionals = reply.additionals[..additionals].to_vec();
    encode(&out)
}

/// The largest `k` in `0..=n` with `fits(k)`, for a `fits` that holds up to some `k`
/// and not past it (binary search: each probe encodes a message).
fn longest_fitting_prefix(n: usize, mut fits: impl FnMut(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

/// A response skeleton: same ID, opcode, RD and question as sent; RA set; EDNS echoed.
pub fn response_to(request: &Message) -> Message {
    let mut reply = Message::response(request.metadata.id, request.metadata.op_code);
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.checking_disabled = request.metadata.checking_disabled;
    reply.add_queries(request.queries.iter().cloned());
    if let Some(req_edns) = &request.edns {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        edns.set_dnssec_ok(req_edns.flags().dnssec_ok);
        reply.set_edns(edns);
    }
    reply
}

fn error_reply(request: &Message, code: ResponseCode) -> Message {
    let mut reply = response_to(request);
    reply.metadata.response_code = code;
    reply
}

fn encode(msg: &Message) -> Option<Vec<u8>> {
    match msg.to_vec() {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            tracing::warn!(target: "dns", error = %e, "could not encode an answer");
            None
        }
    }
}

/// FORMERR for bytes that are not a message but start with a header; nothing otherwise.
fn formerr_from_header(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return None;
    }
    let mut reply = vec![0u8; 12];
    reply[..2].copy_from_slice(&query[..2]);
    // QR=1, opcode and RD copied; RCODE=FORMERR(1); all counts zero.
    reply[2] = 0x80 | (query[2] & 0x79);
    reply[3] = 0x01;
    Some(reply)
}

/// The client's UDP limit: 512 without EDNS, else its advertised size (at least 512).
fn udp_limit(request: &Message) -> usize {
    usize::from(
        request
            .edns
            .as_ref()
            .map_or(MIN_UDP_PAYLOAD, |e| e.max_payload().max(MIN_UDP_PAYLOAD)),
    )
}

#[cfg(test)]
mod tests;
