//! The DNS server on the local listener: `server` (sockets), `handler` (one query →
//! one answer), `local` (answers from the name table), `cache` and `forwarder`
//! (upstream), `metrics` (counters for /metrics).
pub mod cache;
pub mod forwarder;
pub mod handler;
pub mod local;
pub mod metrics;
pub mod server;

use std::fmt;

/// Transport a query arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Udp,
    Tcp,
}

impl Protocol {
    /// Lower-case label, as in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Udp => "udp",
            Protocol::Tcp => "tcp",
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
