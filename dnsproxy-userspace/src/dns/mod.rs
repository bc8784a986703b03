//! The DNS server, as a request path of layers that only look down (checked by the
//! `layers` test):
//!
//! * transports: `server` (sockets and their tasks), `workers` (per-core UDP loops),
//!   `batch` (batched UDP I/O), `tcp` (DNS over TCP connections) — they call the
//!   handler and the fast path and are never called back;
//! * `handler`: one query in, one answer out — admission (FORMERR, NOTIMP, BADVERS),
//!   then the name table (`local`), then the upstream path;
//! * `upstream`: the cache (`cache`), the in-flight bounds and merging (`inflight`),
//!   then the forwarder (`forwarder`); `fast` keeps encoded table and cache answers
//!   for the UDP loops;
//! * at the bottom, what every layer names: `client` (who asks), `question` (what is
//!   asked upstream), `metrics`, `framing`.
//!
//! The protocol facts that several of them share live here.
pub mod batch;
pub mod cache;
pub mod client;
pub mod fast;
pub mod forwarder;
pub mod framing;
pub mod handler;
pub mod inflight;
pub mod local;
pub mod metrics;
pub mod question;
pub mod receive_queue;
pub mod server;
pub mod tcp;
pub mod upstream;
pub mod workers;

#[cfg(test)]
mod layers;
#[cfg(test)]
pub(crate) mod testing;

use std::fmt;

/// Transport a query arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Udp,
    Tcp,
}

impl Protocol {
    /// Both, in the order metrics list them.
    pub const ALL: [Protocol; 2] = [Protocol::Udp, Protocol::Tcp];

    /// Lower-case label, as in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Udp => "udp",
            Protocol::Tcp => "tcp",
        }
    }

    /// The protocol of an IP protocol number (as in map keys); anything but UDP is TCP.
    pub fn from_ip_proto(number: u8) -> Self {
        if number == dnsproxy_common::ip_proto::UDP {
            Protocol::Udp
        } else {
            Protocol::Tcp
        }
    }

    /// The IP protocol number (as in map keys).
    pub fn ip_proto(self) -> u8 {
        match self {
            Protocol::Udp => dnsproxy_common::ip_proto::UDP,
            Protocol::Tcp => dnsproxy_common::ip_proto::TCP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Largest UDP answer for a client that sent no EDNS (RFC 1035).
pub const MIN_UDP_PAYLOAD: u16 = 512;

/// UDP payload size we advertise in EDNS answers and upstream queries (the DNS flag
/// day 2020 value: no IP fragmentation on common paths).
pub const EDNS_PAYLOAD: u16 = 1232;
