//! Who asks: the context a query is answered in (the client's namespace, per-pod
//! settings, its share of the bounds). Set by the transport that received the query,
//! read by every layer of the request path.
use std::sync::Arc;

use super::metrics::PodRequests;

/// Who asks: the client's namespace decides short names and search domains; per-pod
/// settings (node mode) decide auto-allocated VIPs and per-query logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientContext {
    pub namespace: String,
    /// Search domains beyond the Kubernetes ones.
    pub extra_search: Vec<String>,
    /// Answer hosts whose only addresses are auto-allocated VIPs (else forward them).
    pub auto_allocate: bool,
    /// Log every query of this client at info level (`dns:debug` for one pod).
    pub debug_log: bool,
    /// `namespace/name` of the pod, for logs (node mode).
    pub pod: Option<String>,
    /// Who shares a bound on upstream work: the pod in node mode, everyone in local
    /// mode.
    pub client: Arc<str>,
    /// The pod's `dns_requests_total` series (node mode).
    pub requests: Option<Arc<PodRequests>>,
    /// The pod's own search list, from its resolv.conf, when the daemon walks it for
    /// the pod (autopath, node mode); empty: the pod walks it itself.
    pub autopath: Arc<[String]>,
}

impl ClientContext {
    /// A client of local mode.
    pub fn local(namespace: &str, extra_search: Vec<String>) -> Self {
        ClientContext {
            namespace: namespace.to_owned(),
            extra_search,
            auto_allocate: true,
            debug_log: false,
            pod: None,
            client: Arc::from("local"),
            requests: None,
            autopath: Arc::new([]),
        }
    }
}
