//! A bounded cache of upstream answers. Positive answers live for their smallest TTL,
//! negative ones (NXDOMAIN, NODATA) for the SOA's negative TTL (RFC 2308: the smaller
//! of the SOA record's TTL and its MINIMUM); answers without an SOA, SERVFAIL and
//! truncated answers are not cached. Hits come back with TTLs reduced by their age.
use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, ResponseCode},
    rr::{DNSClass, RData, Record, RecordType},
};

/// No answer is kept longer than this, whatever its TTL.
const MAX_TTL: u32 = 86_400;

/// Cache key: lower-case name, type, class.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub name: String,
    pub qtype: RecordType,
    pub qclass: DNSClass,
}

/// What the cache keeps of an answer.
#[derive(Clone, Debug)]
pub struct CachedAnswer {
    pub response_code: ResponseCode,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
}

impl From<Message> for CachedAnswer {
    /// The sections of an answer (EDNS excluded: hickory keeps it apart, and each
    /// client gets its own).
    fn from(msg: Message) -> Self {
        CachedAnswer {
            response_code: msg.metadata.response_code,
            answers: msg.answers,
            authorities: msg.authorities,
            additionals: msg.additionals,
        }
    }
}

struct Entry {
    answer: CachedAnswer,
    stored: Instant,
    expires: Instant,
    seq: u64,
}

struct Inner {
    map: HashMap<Key, Entry>,
    /// Expiry order, for purging and for evicting the entry closest to expiry.
    by_expiry: BTreeMap<(Instant, u64), Key>,
    seq: u64,
}

/// The cache.
pub struct Cache {
    inner: Mutex<Inner>,
    capacity: usize,
}

/// How long `msg` may be cached, if at all.
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
    (ttl > 0).then_some(ttl.min(MAX_TTL))
}

impl Cache {
    /// A cache of at most `capacity` answers (0 disables it).
    pub fn new(capacity: usize) -> Self {
        Cache {
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                by_expiry: BTreeMap::new(),
                seq: 0,
            }),
            capacity,
        }
    }

    /// True when no answer is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of answers held.
    pub fn len(&self) -> usize {
        self.inner.lock().expect("cache lock").map.len()
    }

    /// The cached answer for `key`, TTLs reduced by its age; expired entries go away.
    pub fn get(&self, key: &Key, now: Instant) -> Option<CachedAnswer> {
        let mut inner = self.inner.lock().expect("cache lock");
        let entry = inner.map.get(key)?;
        if entry.expires <= now {
            let (expires, seq) = (entry.expires, entry.seq);
            inner.map.remove(key);
            inner.by_expiry.remove(&(expires, seq));
            return None;
        }
        let age = u32::try_from(now.duration_since(entry.stored).as_secs()).unwrap_or(u32::MAX);
        let mut answer = entry.answer.clone();
        drop(inner);
        for r in answer
            .answers
            .iter_mut()
            .chain(&mut answer.authorities)
            .chain(&mut answer.additionals)
        {
            r.ttl = r.ttl.saturating_sub(age);
        }
        Some(answer)
    }

    /// Stores `msg` under `key` if it is cacheable.
    pub fn insert(&self, key: Key, msg: &Message, now: Instant) {
        if self.capacity == 0 {
            return;
        }
        let Some(ttl) = cacheable_ttl(msg) else {
            return;
        };
        let expires = now + Duration::from_secs(u64::from(ttl));
        let mut inner = self.inner.lock().expect("cache lock");
        if let Some(old) = inner.map.remove(&key) {
            inner.by_expiry.remove(&(old.expires, old.seq));
        }
        // Expired entries first, then the one closest to expiry.
        while inner.map.len() >= self.capacity {
            let Some((&(when, seq), _)) = inner.by_expiry.iter().next() else {
                break;
            };
            let victim = inner.by_expiry.remove(&(when, seq)).expect("present");
            inner.map.remove(&victim);
        }
        inner.seq += 1;
        let seq = inner.seq;
        inner.by_expiry.insert((expires, seq), key.clone());
        let answer = CachedAnswer::from(msg.clone());
        inner.map.insert(
            key,
            Entry {
                answer,
                stored: now,
                expires,
                seq,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use hickory_proto::{
        op::{MessageType, OpCode},
        rr::{Name, rdata},
    };

    use super::*;

    fn key(n: &str) -> Key {
        Key {
            name: n.into(),
            qtype: RecordType::A,
            qclass: DNSClass::IN,
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
    fn ages_expires_and_stays_bounded() {
        let cache = Cache::new(2);
        let t0 = Instant::now();
        cache.insert(key("a"), &answer(&[30]), t0);
        let hit = cache.get(&key("a"), t0 + Duration::from_secs(12)).unwrap();
        assert_eq!(hit.answers[0].ttl, 18, "TTL decremented by age");
        assert!(
            cache.get(&key("a"), t0 + Duration::from_secs(30)).is_none(),
            "expired"
        );
        assert_eq!(cache.len(), 0);

        cache.insert(key("short"), &answer(&[5]), t0);
        cache.insert(key("long"), &answer(&[500]), t0);
        cache.insert(key("new"), &answer(&[100]), t0);
        assert_eq!(cache.len(), 2);
        assert!(
            cache.get(&key("short"), t0).is_none(),
            "closest to expiry evicted"
        );
        assert!(cache.get(&key("long"), t0).is_some());
        assert!(cache.get(&key("new"), t0).is_some());
    }
}
