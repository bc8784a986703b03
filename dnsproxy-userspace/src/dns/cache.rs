//! A cache of upstream answers, bounded by memory. Positive answers live for their
//! smallest TTL, negative ones (NXDOMAIN, NODATA) for the SOA's negative TTL (RFC 2308:
//! the smaller of the SOA record's TTL and its MINIMUM), both at most `--max-ttl`;
//! answers without an SOA, SERVFAIL and truncated answers are not cached. Hits come back
//! with TTLs reduced by their age.
//!
//! Entries are weighed by the memory they hold (at least `--cache-bytes /
//! --cache-size`, so the entry count is bounded too) in a sharded `quick_cache`: reads
//! from every core do not meet on one lock, and eviction is S3-FIFO (recency and
//! frequency), never "closest to expiry first" — a flood of long-TTL junk does not push
//! out the answers that are asked for. With serve-stale (RFC 8767) expired entries are
//! kept until evicted, for the time every upstream fails.
use std::{
    hash::RandomState,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, ResponseCode},
    rr::{RData, Record, rdata::opt::EdnsOption},
};
use quick_cache::{Lifecycle, Weighter};

use super::question::Question;

/// What the cache keeps of an answer.
#[derive(Clone, Debug)]
pub struct CachedAnswer {
    pub response_code: ResponseCode,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
    /// The upstream's Client Subnet option (its scope says for which clients the
    /// answer holds), relayed to a client that sent one (RFC 7871 §7.2.2).
    pub client_subnet: Option<EdnsOption>,
}

/// EDNS Client Subnet (RFC 7871).
const CLIENT_SUBNET: u16 = 8;

/// The Client Subnet option of `msg`, if it carries one.
pub fn client_subnet(msg: &Message) -> Option<&EdnsOption> {
    msg.edns
        .as_ref()?
        .options()
        .as_ref()
        .iter()
        .find(|(code, _)| u16::from(*code) == CLIENT_SUBNET)
        .map(|(_, option)| option)
}

impl From<Message> for CachedAnswer {
    /// The sections of an answer (EDNS apart: each client gets its own, with the
    /// upstream's Client Subnet option only).
    fn from(msg: Message) -> Self {
        let client_subnet = client_subnet(&msg).cloned();
        CachedAnswer {
            response_code: msg.metadata.response_code,
            answers: msg.answers,
            authorities: msg.authorities,
            additionals: msg.additionals,
            client_subnet,
        }
    }
}

impl CachedAnswer {
    /// The shortest TTL among its records (`None`: it has none, nothing to time it by).
    pub fn min_ttl(&self) -> Option<u32> {
        self.answers
            .iter()
            .chain(&self.authorities)
            .chain(&self.additionals)
            .map(|r| r.ttl)
            .min()
    }

    fn records_mut(&mut self) -> impl Iterator<Item = &mut Record> {
        self.answers
            .iter_mut()
            .chain(&mut self.authorities)
            .chain(&mut self.additionals)
    }

    /// No record claims to live longer than `max_ttl`.
    pub fn clamp_ttls(&mut self, max_ttl: u32) {
        for r in self.records_mut() {
            r.ttl = r.ttl.min(max_ttl);
        }
    }

    /// Every record's TTL set to `ttl` (stale answers, RFC 8767 §4).
    fn set_ttls(&mut self, ttl: u32) {
        for r in self.records_mut() {
            r.ttl = ttl;
        }
    }

    /// Bytes this answer holds, an upper bound: the records themselves, what their
    /// names and data point to (three times their wire size: parsed forms, several
    /// allocations, the allocator's own overhead), and [`RECORD_OVERHEAD`] each.
    /// Measured: a flood of 1 kB TXT answers stays within the budget in RSS.
    fn footprint(&self) -> usize {
        let records = self.answers.len() + self.authorities.len() + self.additionals.len();
        let wire: usize = self
            .answers
            .iter()
            .chain(&self.authorities)
            .chain(&self.additionals)
            .map(|r| r.name.len() + 10 + rdata_len(&r.data))
            .sum();
        records * (size_of::<Record>() + RECORD_OVERHEAD) + 3 * wire
    }
}

/// The wire size of record data, without encoding it (the cache weighs every insert).
fn rdata_len(data: &RData) -> usize {
    match data {
        RData::A(_) => 4,
        RData::AAAA(_) => 16,
        RData::CNAME(n) => n.0.len(),
        RData::PTR(n) => n.0.len(),
        RData::NS(n) => n.0.len(),
        // Everything else (TXT, SOA, HTTPS, ...): its text form is a fair upper bound.
        other => other.to_string().len(),
    }
}

/// Allocator overhead of a record's heap parts, in bytes.
const RECORD_OVERHEAD: usize = 64;
/// What an entry costs besides its answer: the key, the `Arc`, the cache's slot.
const ENTRY_OVERHEAD: usize = 256;

struct Entry {
    answer: CachedAnswer,
    stored: Instant,
    expires: Instant,
    weight: u64,
}

#[derive(Clone)]
struct ByWeight;

impl Weighter<Question, Arc<Entry>> for ByWeight {
    fn weight(&self, _key: &Question, entry: &Arc<Entry>) -> u64 {
        entry.weight
    }
}

/// Counts evictions (a bound acting) for `/metrics`.
#[derive(Clone, Default)]
struct CountEvictions(Arc<AtomicU64>);

impl Lifecycle<Question, Arc<Entry>> for CountEvictions {
    type RequestState = ();

    fn on_evict(&self, _state: &mut (), _key: Question, _entry: Arc<Entry>) {
        self.0.fetch_add(1, Relaxed);
    }
}

type Entries =
    quick_cache::sync::Cache<Question, Arc<Entry>, ByWeight, RandomState, CountEvictions>;

/// How the cache is bounded.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most bytes held (0 disables the cache).
    pub bytes: u64,
    /// Most answers held (0 disables the cache).
    pub entries: u64,
    /// Longest time an answer is kept and the largest TTL a client is told.
    pub max_ttl: u32,
    /// Keep expired answers to serve while every upstream fails (RFC 8767).
    pub serve_stale: bool,
}

/// The cache.
pub struct Cache {
    entries: Option<Entries>,
    limits: Limits,
    /// Every entry weighs at least this, so that `limits.entries` holds too.
    min_weight: u64,
    evictions: CountEvictions,
}

/// TTL of a stale answer (RFC 8767 §4 recommends 30 s).
pub const STALE_TTL: u32 = 30;

/// How long `msg` may be cached, if at all (before `--max-ttl`).
pub fn cacheable_ttl(msg: &Message) -> Option<u32> {
    if msg.metadata.truncation {
        return None;
    }
    let negative = match msg.metadata.response_code {
        ResponseCode::NXDomain => true,
        ResponseCode::NoError => msg.answers.is_empty(),
        _ => return None,
    };
    let ttl = if negative {
        msg.authorities.iter().find_map(|r| match &r.data {
            RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
            _ => None,
        })?
    } else {
        msg.answers.iter().map(|r| r.ttl).min()?
    };
    (ttl > 0).then_some(ttl)
}

impl Cache {
    pub fn new(limits: Limits) -> Self {
        let enabled = limits.bytes > 0 && limits.entries > 0;
        let min_weight = if enabled {
            limits.bytes.div_ceil(limits.entries)
        } else {
            1
        };
        let evictions = CountEvictions::default();
        let entries = enabled.then(|| {
            let estimated = usize::try_from(limits.entries.min(1 << 20)).unwrap_or(1 << 20);
            Entries::with(
                estimated,
                limits.bytes,
                ByWeight,
                RandomState::default(),
                evictions.clone(),
            )
        });
        Cache {
            entries,
            limits,
            min_weight,
            evictions,
        }
    }

    /// Answers held.
    pub fn len(&self) -> usize {
        self.entries.as_ref().map_or(0, Entries::len)
    }

    /// True when no answer is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held, as weighed.
    pub fn bytes(&self) -> u64 {
        self.entries.as_ref().map_or(0, Entries::weight)
    }

    /// Answers evicted to stay within the limits.
    pub fn evictions(&self) -> u64 {
        self.evictions.0.load(Relaxed)
    }

    /// The largest TTL clients are told.
    pub fn max_ttl(&self) -> u32 {
        self.limits.max_ttl
    }

    /// The cached answer for `key`, TTLs reduced by its age; an expired entry is gone
    /// (or, with serve-stale, left for [`Cache::stale`]).
    pub fn get(&self, key: &Question, now: Instant) -> Option<CachedAnswer> {
        let entries = self.entries.as_ref()?;
        let entry = entries.get(key)?;
        if entry.expires <= now {
            if !self.limits.serve_stale {
                entries.remove(key);
            }
            return None;
        }
        let age = u32::try_from(now.duration_since(entry.stored).as_secs()).unwrap_or(u32::MAX);
        let mut answer = entry.answer.clone();
        for r in answer.records_mut() {
            r.ttl = r.ttl.saturating_sub(age);
        }
        Some(answer)
    }

    /// An expired answer for `key`, every TTL [`STALE_TTL`]: for when every upstream
    /// fails and serve-stale is on.
    pub fn stale(&self, key: &Question, now: Instant) -> Option<CachedAnswer> {
        if !self.limits.serve_stale {
            return None;
        }
        let entry = self.entries.as_ref()?.get(key)?;
        let mut answer = entry.answer.clone();
        if entry.expires <= now {
            answer.set_ttls(STALE_TTL);
        }
        Some(answer)
    }

    /// Stores `msg` under `key` if it is cacheable.
    pub fn insert(&self, key: Question, msg: &Message, now: Instant) {
        let Some(entries) = &self.entries else {
            return;
        };
        let Some(ttl) = cacheable_ttl(msg) else {
            return;
        };
        let ttl = ttl.min(self.limits.max_ttl);
        let mut answer = CachedAnswer::from(msg.clone());
        answer.clamp_ttls(self.limits.max_ttl);
        let weight =
            (answer.footprint() + 2 * key.name.len() + size_of::<Entry>() + ENTRY_OVERHEAD) as u64;
        let entry = Entry {
            answer,
            stored: now,
            expires: now + Duration::from_secs(u64::from(ttl)),
            weight: weight.max(self.min_weight),
        };
        entries.insert(key, Arc::new(entry));
    }
}

#[cfg(test)]
mod tests {
    use hickory_proto::{
        op::{MessageType, OpCode},
        rr::{Name, rdata},
    };

    use super::*;
    use hickory_proto::rr::{DNSClass, RecordType};

    fn key(n: &str) -> Question {
        Question {
            name: n.into(),
            qtype: RecordType::A,
            qclass: DNSClass::IN,
            relay: crate::dns::question::Relay::RECURSIVE,
        }
    }

    fn answer(ttls: &[u32]) -> Message {
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        for (i, ttl) in ttls.iter().enumerate() {
            m.add_answer(Record::from_rdata(
                Name::from_ascii("a.test.").unwrap(),
                *ttl,
                RData::A(rdata::A([192, 0, 2, i as u8 + 1].into())),
            ));
        }
        m
    }

    fn txt(size: usize, ttl: u32) -> Message {
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        m.add_answer(Record::from_rdata(
            Name::from_ascii("t.test.").unwrap(),
            ttl,
            RData::TXT(rdata::TXT::new(vec!["x".repeat(size)])),
        ));
        m
    }

    fn negative(code: ResponseCode, soa_ttl: u32, minimum: u32) -> Message {
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        m.metadata.response_code = code;
        let soa = rdata::SOA::new(
            Name::from_ascii("ns.test.").unwrap(),
            Name::from_ascii("host.test.").unwrap(),
            1,
            60,
            60,
            60,
            minimum,
        );
        m.add_authority(Record::from_rdata(
            Name::from_ascii("test.").unwrap(),
            soa_ttl,
            RData::SOA(soa),
        ));
        m
    }

    fn limits(bytes: u64, entries: u64) -> Limits {
        Limits {
            bytes,
            entries,
            max_ttl: 86_400,
            serve_stale: false,
        }
    }

    #[test]
    fn ttls() {
        struct Case {
            name: &'static str,
            msg: Message,
            want: Option<u32>,
        }
        let mut servfail = answer(&[60]);
        servfail.metadata.response_code = ResponseCode::ServFail;
        let mut truncated = answer(&[60]);
        truncated.metadata.truncation = true;
        let cases = [
            Case {
                name: "smallest answer TTL",
                msg: answer(&[300, 20, 100]),
                want: Some(20),
            },
            Case {
                name: "zero TTL",
                msg: answer(&[0]),
                want: None,
            },
            Case {
                name: "NXDOMAIN uses SOA minimum",
                msg: negative(ResponseCode::NXDomain, 900, 30),
                want: Some(30),
            },
            Case {
                name: "NODATA uses SOA TTL when smaller",
                msg: negative(ResponseCode::NoError, 10, 30),
                want: Some(10),
            },
            Case {
                name: "negative without SOA",
                msg: answer(&[]),
                want: None,
            },
            Case {
                name: "SERVFAIL",
                msg: servfail,
                want: None,
            },
            Case {
                name: "truncated",
                msg: truncated,
                want: None,
            },
        ];
        for c in cases {
            assert_eq!(cacheable_ttl(&c.msg), c.want, "{}", c.name);
        }
    }

    #[test]
    fn ages_and_expires() {
        let cache = Cache::new(limits(1 << 20, 1000));
        let t0 = Instant::now();
        cache.insert(key("a"), &answer(&[30]), t0);
        let hit = cache.get(&key("a"), t0 + Duration::from_secs(12)).unwrap();
        assert_eq!(hit.answers[0].ttl, 18, "TTL decremented by age");
        assert!(
            cache.get(&key("a"), t0 + Duration::from_secs(30)).is_none(),
            "expired"
        );
        assert_eq!(cache.len(), 0, "an expired entry goes without serve-stale");
    }

    #[test]
    fn max_ttl_clamps_lifetime_and_what_clients_are_told() {
        let mut l = limits(1 << 20, 1000);
        l.max_ttl = 60;
        let cache = Cache::new(l);
        let t0 = Instant::now();
        cache.insert(key("a"), &answer(&[3600]), t0);
        assert_eq!(cache.get(&key("a"), t0).unwrap().answers[0].ttl, 60);
        assert!(cache.get(&key("a"), t0 + Duration::from_secs(61)).is_none());
    }

    #[test]
    fn bounded_by_bytes_and_by_entries_and_evictions_counted() {
        let budget = 256 * 1024;
        let cache = Cache::new(limits(budget, 100_000));
        let t0 = Instant::now();
        for i in 0..2000 {
            cache.insert(key(&format!("junk{i}")), &txt(2000, 86_400), t0);
        }
        assert!(cache.bytes() <= budget, "{} bytes held", cache.bytes());
        assert!(cache.evictions() > 0);
        assert!(cache.len() < 200, "{} big answers held", cache.len());

        let by_count = Cache::new(limits(1 << 30, 10));
        for i in 0..100 {
            by_count.insert(key(&format!("n{i}")), &answer(&[60]), t0);
        }
        assert!(by_count.len() <= 10, "{}", by_count.len());
    }

    #[test]
    fn answers_asked_for_survive_a_flood_of_long_lived_junk() {
        let cache = Cache::new(limits(512 * 1024, 100_000));
        let t0 = Instant::now();
        cache.insert(key("useful"), &answer(&[5]), t0);
        for i in 0..5000 {
            // The useful answer keeps being asked for while the junk streams in.
            if i % 10 == 0 {
                assert!(cache.get(&key("useful"), t0).is_some(), "evicted after {i}");
            }
            cache.insert(key(&format!("junk{i}")), &txt(500, 86_400), t0);
        }
    }

    #[test]
    fn serve_stale_keeps_expired_answers_with_a_short_ttl() {
        let mut l = limits(1 << 20, 1000);
        l.serve_stale = true;
        let cache = Cache::new(l);
        let t0 = Instant::now();
        cache.insert(key("a"), &answer(&[10]), t0);
        let later = t0 + Duration::from_secs(100);
        assert!(cache.get(&key("a"), later).is_none(), "not fresh");
        let stale = cache.stale(&key("a"), later).unwrap();
        assert_eq!(stale.answers[0].ttl, STALE_TTL);
        assert!(
            Cache::new(limits(1 << 20, 1000))
                .stale(&key("a"), later)
                .is_none()
        );
    }

    #[test]
    fn zero_disables() {
        let cache = Cache::new(limits(0, 1000));
        cache.insert(key("a"), &answer(&[30]), Instant::now());
        assert!(cache.get(&key("a"), Instant::now()).is_none());
    }
}
