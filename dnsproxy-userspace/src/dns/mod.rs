//! The DNS server: `server` (sockets and their tasks), `handler` (one query → one
//! answer), `local` (answers from the name table), `cache` and `forwarder` (upstream),
//! `framing` (DNS over TCP), `metrics` (counters for /metrics). The protocol facts that
//! several of them share live here.
pub mod batch;
pub mod cache;
pub mod fast;
pub mod forwarder;
pub mod framing;
pub mod handler;
pub mod inflight;
pub mod local;
pub mod metrics;
pub mod server;
pub mod tcp;
pub mod upstream;
pub mod workers;

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
