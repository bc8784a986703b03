//! Helpers shared by the DNS server's unit tests: a handler over a fixed name table.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use super::{
    cache,
    client::ClientContext,
    handler::{Handler, Settings},
    inflight,
    metrics::Metrics,
};
use crate::{
    registry::{
        TableConfig,
        manifest::{Objects, parse_into},
    },
    vip::{assign::in_memory_registry, translate::Translated},
};

pub(crate) const REGISTRY: &str = r"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: aliyun, namespace: default}
spec: {hosts: [aliyun.com, alibabacloud.com], ports: [{number: 443, name: tls, protocol: TLS}], resolution: DNS}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: fixed}
spec: {hosts: [fixed.test], addresses: [240.241.0.1, 240.241.0.2], resolution: STATIC}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: v4only}
spec: {hosts: [v4only.test], addresses: [240.241.0.9], resolution: STATIC}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec: {clusterIP: 10.0.0.5}
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: default}
spec: {type: ExternalName, externalName: fixed.test}
---
apiVersion: v1
kind: Service
metadata: {name: outside, namespace: default}
spec: {type: ExternalName, externalName: upstream-only.test}
---
apiVersion: v1
kind: Service
metadata: {name: gone, namespace: default}
spec: {type: ExternalName, externalName: nx.upstream.test}
---
apiVersion: v1
kind: Service
metadata: {name: broken, namespace: default}
spec: {type: ExternalName, externalName: fail.upstream.test}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: big}
spec:
  hosts: [big.test]
  addresses: [240.242.0.1, 240.242.0.2, 240.242.0.3, 240.242.0.4, 240.242.0.5, 240.242.0.6, 240.242.0.7, 240.242.0.8,
              240.242.0.9, 240.242.0.10, 240.242.0.11, 240.242.0.12, 240.242.0.13, 240.242.0.14, 240.242.0.15, 240.242.0.16,
              240.242.0.17, 240.242.0.18, 240.242.0.19, 240.242.0.20, 240.242.0.21, 240.242.0.22, 240.242.0.23, 240.242.0.24,
              240.242.0.25, 240.242.0.26, 240.242.0.27, 240.242.0.28, 240.242.0.29, 240.242.0.30, 240.242.0.31, 240.242.0.32]
  resolution: STATIC
";

pub(crate) fn client() -> SocketAddr {
    "127.0.0.1:40000".parse().unwrap()
}

pub(crate) fn ctx() -> ClientContext {
    ClientContext::local("default", vec![])
}

/// The in-flight bounds of the helpers' handlers, unless a test gives its own.
const LIMITS: inflight::Limits = inflight::Limits {
    total: 100,
    per_client: 100,
};

pub(crate) fn handler_with(upstreams: Vec<SocketAddr>, parallel: bool) -> Handler {
    handler_with_limits(upstreams, parallel, LIMITS, false)
}

pub(crate) fn handler_with_limits(
    upstreams: Vec<SocketAddr>,
    parallel: bool,
    limits: inflight::Limits,
    serve_stale: bool,
) -> Handler {
    handler_over(
        TableConfig::default(),
        upstreams,
        parallel,
        limits,
        serve_stale,
    )
}

/// A handler as node mode has it: its table built from every Service of the cluster.
pub(crate) fn node_handler(upstreams: Vec<SocketAddr>) -> Handler {
    let config = TableConfig {
        every_service: true,
        ..TableConfig::default()
    };
    handler_over(config, upstreams, false, LIMITS, false)
}

fn handler_over(
    config: TableConfig,
    upstreams: Vec<SocketAddr>,
    parallel: bool,
    limits: inflight::Limits,
    serve_stale: bool,
) -> Handler {
    let mut objects = Objects::default();
    parse_into(REGISTRY, &mut objects).unwrap();
    let registry = in_memory_registry(&objects, config);
    let translated = Translated::default();
    // As if the backend sync had found IPv6 addresses for aliyun.com only, and written
    // every VIP to the data path.
    translated.set_ipv6_backed(["aliyun.com".to_owned()].into());
    translated.assume_all_translated(&registry.table());
    let metrics = Arc::new(Metrics::new(
        &upstreams,
        &mut prometheus_client::registry::Registry::default(),
        false,
    ));
    let settings = Settings {
        upstreams,
        upstream_timeout: Duration::from_millis(300),
        upstream_parallel: parallel,
        cache: cache::Limits {
            bytes: 1 << 20,
            entries: 100,
            max_ttl: 86_400,
            serve_stale,
        },
        inflight: limits,
        ttl: 30,
        vip_wait: Duration::from_millis(300),
    };
    Handler::new(settings, Arc::new(registry), Arc::new(translated), metrics)
}
