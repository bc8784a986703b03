//! dnsproxy, the daemon as a library: the `dnsproxy` binary is a thin command-line
//! front over it, and the end-to-end harness reuses its helpers.
//!
//! One module per concern: `bpf` (the kernel side: checks, load, attach, pinned maps),
//! `dns` (the request path: transports, handler, table answers, cache, forwarder),
//! `name` (DNS names), `registry` (objects and the name table built from them), `vip`
//! (`assign`: who gets a VIP; `translate`: what the kernel translates), `state` (node
//! mode: the cluster as this node needs it, typed and event-driven), `capture` (node
//! mode: per-pod listeners and policy entries), `handoff` (a successor takes the
//! listening sockets over), `pidfd` (a process handle), `admin` (HTTP probes, metrics,
//! debug dumps), `daemon` (`dnsproxy run` start to stop), and `cli` (flags).
pub mod admin;
pub mod bpf;
pub mod capture;
pub mod cli;
pub mod daemon;
pub mod dns;
pub mod exec;
pub mod handoff;
pub mod memory;
pub mod name;
pub mod pidfd;
pub mod private_dir;
pub mod registry;
pub mod resolv_conf;
pub mod sockopt;
pub mod state;
pub mod upstream_addr;
pub mod vip;

/// An error and its causes, as `{:#}` prints an `anyhow::Error`: `what: why: root`.
/// For log lines about errors that are handled where they happen, not returned.
pub fn report<'a>(error: &'a (dyn std::error::Error + 'static)) -> impl std::fmt::Display + 'a {
    struct Report<'a>(&'a (dyn std::error::Error + 'static));
    impl std::fmt::Display for Report<'_> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{}", self.0)?;
            let mut cause = self.0.source();
            while let Some(c) = cause {
                write!(f, ": {c}")?;
                cause = c.source();
            }
            Ok(())
        }
    }
    Report(error)
}
