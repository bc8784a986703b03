//! The fast path of UDP answers from the name table: each receive loop keeps the
//! encoded replies the handler produced, keyed by question and EDNS shape, and answers
//! a repeated question by copying those bytes and patching what differs between two
//! askers: the ID, the RD and CD bits, the question's letter case, and the order of the
//! address records (shuffled, as the handler does). No parsing into records, no
//! encoding, no allocation, no task.
//!
//! A kept reply is valid for one table generation ([`super::handler::Handler::answers_generation`])
//! and one client context; it is only kept when it answers every client the same way
//! for that key: at most 512 bytes (so no client's limit truncates it) and carrying the
//! query's own question. Anything the strict query parser does not recognise goes to the
//! handler, which answers as before.
use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use rand::Rng as _;

use super::client::ClientContext;

/// Largest reply kept: it fits every client's UDP limit (RFC 1035's 512).
pub const MAX_KEPT: usize = 512;

/// Most replies one loop keeps; past it, the store starts over (a client asking for
/// ever new names costs at most this much memory per loop).
const MAX_ENTRIES: usize = 4096;

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
/// EDNS options a query may carry and still be answered here: they do not change the
/// answer (the handler does not echo them). COOKIE (RFC 7873), PADDING (RFC 7830).
const IGNORED_OPTIONS: [u16; 2] = [10, 12];

/// What the fast path needs from a query: where its question ends, its type, and the
/// key of its answer.
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed {
    /// End of the question (header + name + type + class).
    pub question_end: usize,
    pub qtype: u16,
    /// What the answer depends on besides the question: EDNS present (bit 0), DO
    /// (bit 1), RD (bit 2) and CD (bit 3); the upstream is asked with the client's
    /// flags, so a cached answer is one per combination.
    shape: u8,
}

/// Parses a plain query strictly: QR=0, opcode QUERY, one question with an
/// uncompressed name, no answer or authority records, and at most an EDNS version 0 OPT
/// record with only [`IGNORED_OPTIONS`]. `None`: leave it to the handler.
pub fn parse(query: &[u8]) -> Option<Parsed> {
    let header = query.get(..12)?;
    // QR=0, opcode 0 (byte 2 bits 3..7), QDCOUNT=1, ANCOUNT=NSCOUNT=0, ARCOUNT<=1.
    if header[2] & 0xf8 != 0 || header[4..10] != [0, 1, 0, 0, 0, 0] || header[10] != 0 {
        return None;
    }
    let additional = header[11];
    let mut at = 12;
    loop {
        let len = usize::from(*query.get(at)?);
        if len > 63 {
            return None;
        }
        at += 1 + len;
        if len == 0 {
            break;
        }
    }
    if at - 12 > 255 {
        return None;
    }
    let fixed = query.get(at..at + 4)?;
    let qtype = u16::from_be_bytes([fixed[0], fixed[1]]);
    let question_end = at + 4;
    let edns = match additional {
        0 if question_end == query.len() => 0,
        1 => opt_flags(&query[question_end..])?,
        _ => return None,
    };
    let recursion_desired = header[2] & 0x01;
    let checking_disabled = (header[3] >> 4) & 0x01;
    Some(Parsed {
        question_end,
        qtype,
        shape: edns | (recursion_desired << 2) | (checking_disabled << 3),
    })
}

/// The EDNS shape of `rest`, which must be exactly one version-0 OPT record of the root
/// name with only ignorable options.
fn opt_flags(rest: &[u8]) -> Option<u8> {
    // name(1) type(2) class(2) ext-rcode(1) version(1) flags(2) rdlen(2)
    let fixed = rest.get(..11)?;
    if fixed[0] != 0
        || u16::from_be_bytes([fixed[1], fixed[2]]) != TYPE_OPT
        || fixed[5..7] != [0, 0]
    {
        return None;
    }
    let rdlen = usize::from(u16::from_be_bytes([fixed[9], fixed[10]]));
    let mut options = rest.get(11..)?;
    if options.len() != rdlen {
        return None;
    }
    while !options.is_empty() {
        let code = u16::from_be_bytes([*options.first()?, *options.get(1)?]);
        let len = usize::from(u16::from_be_bytes([*options.get(2)?, *options.get(3)?]));
        if !IGNORED_OPTIONS.contains(&code) {
            return None;
        }
        options = options.get(4 + len..)?;
    }
    let dnssec_ok = fixed[7] & 0x80 != 0;
    Some(1 | (u8::from(dnssec_ok) << 1))
}

/// A kept reply.
struct Entry {
    bytes: Box<[u8]>,
    /// Groups of address RDATA offsets of one type: shuffled on the way out.
    addresses: Box<[(usize, usize)]>,
    /// A cached upstream answer, right until then; a table answer has no end but its
    /// generation's.
    until: Option<Instant>,
}

/// A reply written by [`Answers::reply`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    pub len: usize,
    /// A cached upstream answer (else a table answer).
    pub cached: bool,
}

/// One receive loop's kept replies, for one table generation and client context.
#[derive(Default)]
pub struct Answers {
    generation: u64,
    ctx: Option<Arc<ClientContext>>,
    entries: HashMap<Box<[u8]>, Entry>,
    key: Vec<u8>,
}

impl Answers {
    /// Empties the store when the generation or the client context moved on.
    fn refresh(&mut self, generation: u64, ctx: &Arc<ClientContext>) {
        let same_ctx = self.ctx.as_ref().is_some_and(|c| Arc::ptr_eq(c, ctx));
        if generation != self.generation || !same_ctx {
            self.entries.clear();
            self.generation = generation;
            self.ctx = Some(Arc::clone(ctx));
        }
    }

    /// Fills `self.key`: the question in lower case, then the shape of the query.
    fn make_key(&mut self, query: &[u8], parsed: &Parsed) {
        self.key.clear();
        self.key.extend(
            query[12..parsed.question_end]
                .iter()
                .map(u8::to_ascii_lowercase),
        );
        self.key.push(parsed.shape);
    }

    /// Writes the reply to `query` into `out` and returns its length, when one is kept
    /// for this generation and context.
    pub fn reply(
        &mut self,
        query: &[u8],
        parsed: &Parsed,
        generation: u64,
        ctx: &Arc<ClientContext>,
        out: &mut [u8; MAX_KEPT],
    ) -> Option<Written> {
        self.refresh(generation, ctx);
        if self.entries.is_empty() {
            return None;
        }
        self.make_key(query, parsed);
        let entry = self.entries.get(self.key.as_slice())?;
        if entry.until.is_some_and(|until| until <= Instant::now()) {
            self.entries.remove(self.key.as_slice());
            return None;
        }
        let reply = &mut out[..entry.bytes.len()];
        reply.copy_from_slice(&entry.bytes);
        patch(reply, query, parsed.question_end);
        shuffle(reply, &entry.addresses);
        Some(Written {
            len: entry.bytes.len(),
            cached: entry.until.is_some(),
        })
    }

    /// Keeps `reply`, the handler's answer to `query` computed under `generation`,
    /// when it answers every asker of this key alike: a table answer for the
    /// generation, a cached one for `cached_for`. True when the store was full and
    /// started over.
    pub fn keep(
        &mut self,
        query: &[u8],
        parsed: &Parsed,
        reply: &[u8],
        generation: u64,
        ctx: &Arc<ClientContext>,
        cached_for: Option<Duration>,
    ) -> bool {
        self.refresh(generation, ctx);
        let question = 12..parsed.question_end;
        // A truncated reply (TC) depends on the asker's limit: never kept.
        if reply.len() > MAX_KEPT
            || reply.get(2).is_none_or(|flags| flags & 0x02 != 0)
            || reply
                .get(question.clone())
                .is_none_or(|q| !q.eq_ignore_ascii_case(&query[question]))
        {
            return false;
        }
        let Some(addresses) = address_groups(reply, parsed.question_end) else {
            return false;
        };
        let reset = self.entries.len() >= MAX_ENTRIES;
        if reset {
            self.entries.clear();
        }
        self.make_key(query, parsed);
        self.entries.insert(
            self.key.as_slice().into(),
            Entry {
                bytes: reply.into(),
                addresses,
                until: cached_for.map(|d| Instant::now() + d),
            },
        );
        reset
    }
}

/// What differs between two askers of one key: the ID, RD and CD (copied from the
/// query, as the handler does), and the question's letter case.
pub fn patch(reply: &mut [u8], query: &[u8], question_end: usize) {
    reply[..2].copy_from_slice(&query[..2]);
    reply[2] = (reply[2] & !0x01) | (query[2] & 0x01);
    reply[3] = (reply[3] & !0x10) | (query[3] & 0x10);
    reply[12..question_end].copy_from_slice(&query[12..question_end]);
}

/// Shuffles the RDATA of each group of same-type address records, as the handler
/// shuffles them (each group: first offset, count; all of one length).
fn shuffle(reply: &mut [u8], groups: &[(usize, usize)]) {
    let mut rng = rand::rng();
    for group in groups.chunk_by(|a, b| a.1 == b.1) {
        let len = group[0].1;
        for i in (1..group.len()).rev() {
            let j = rng.random_range(0..=i);
            if i != j {
                let (a, b) = (group[i].0, group[j].0);
                for k in 0..len {
                    reply.swap(a + k, b + k);
                }
            }
        }
    }
}

/// The offsets and lengths of the A and AAAA RDATA in the answer section of `reply`
/// (grouped by length, so a group is one type), or `None` when the reply does not walk
/// cleanly (then it is not kept).
fn address_groups(reply: &[u8], question_end: usize) -> Option<Box<[(usize, usize)]>> {
    let answers = usize::from(u16::from_be_bytes([*reply.get(6)?, *reply.get(7)?]));
    let mut at = question_end;
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for _ in 0..answers {
        at = skip_name(reply, at)?;
        let fixed = reply.get(at..at + 10)?;
        let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        let rdlen = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        let rdata = at + 10;
        reply.get(rdata..rdata + rdlen)?;
        match (rtype, rdlen) {
            (TYPE_A, 4) => v4.push((rdata, 4)),
            (TYPE_AAAA, 16) => v6.push((rdata, 16)),
            _ => {}
        }
        at = rdata + rdlen;
    }
    v4.extend(v6);
    Some(v4.into_boxed_slice())
}

/// The offset after the (possibly compressed) name at `at`.
fn skip_name(msg: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *msg.get(at)?;
        match len {
            0 => return Some(at + 1),
            1..=63 => at += 1 + usize::from(len),
            0xc0..=0xff => return msg.get(at + 1).map(|_| at + 2),
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests;
