//! What is asked upstream: a question as the cache keys it and the in-flight
//! bookkeeping merges it (normalised name, type, class), with what the client relays
//! along (its flags and end-to-end EDNS options). The lowest layer of the request
//! path: every layer above may name a question, none below it exists.
use hickory_proto::{
    op::Query,
    rr::{DNSClass, RecordType, rdata::opt::EdnsOption},
};

use crate::name::normalize_name;

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

/// One unit of upstream work: two questions equal here get the same answer, so they
/// share a cache entry and are merged while in flight.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Question {
    /// Normalised (lower-case) name.
    pub name: String,
    pub qtype: RecordType,
    pub qclass: DNSClass,
    /// RD, DO, CD and the end-to-end EDNS options as the client set them.
    pub relay: Relay,
}

impl Question {
    /// `query` relayed with `relay`.
    pub fn of(query: &Query, relay: &Relay) -> Self {
        Question {
            name: normalize_name(query.name()),
            qtype: query.query_type(),
            qclass: query.query_class(),
            relay: relay.clone(),
        }
    }
}
