//! Virtual IPs, in two halves a newcomer finds by their names:
//!
//! * `assign` — who gets a VIP: the hosts that need one, the slot each gets, kept
//!   across restarts and agreed between nodes;
//! * `translate` — what the kernel translates: the backends of every VIP, written to
//!   the pinned maps, and what DNS may hand out because of it.
pub mod assign;
pub mod translate;
