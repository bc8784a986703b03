//! The capture policy of a pod, at three scopes: the global default, a namespace label,
//! and a pod annotation (ours, or Istio's `proxy.istio.io/config` proxyMetadata); the
//! most specific setting wins.
use serde::Deserialize;

use crate::registry::manifest::{Meta as _, Namespace, Pod, from_yaml};

/// Pod annotation: `"true"` / `"false"`.
pub const POD_ANNOTATION: &str = "dnsproxy.io/capture";
/// Namespace label: `enabled` / `disabled`.
pub const NAMESPACE_LABEL: &str = "dnsproxy.io/capture";
/// Istio's per-pod proxy configuration (YAML).
pub const ISTIO_PROXY_CONFIG: &str = "proxy.istio.io/config";
/// Istio's agent log level, e.g. `dns:debug` or `default:info,dns:debug`.
pub const ISTIO_LOG_LEVEL: &str = "sidecar.istio.io/agentLogLevel";
/// Set by Istio's injector on a pod it gave a sidecar.
pub const ISTIO_SIDECAR_STATUS: &str = "sidecar.istio.io/status";
/// Pod annotation overriding sidecar detection: `"true"` / `"false"`.
pub const SIDECAR_ANNOTATION: &str = "dnsproxy.io/sidecar";
/// Pod annotation: `"false"` opts the pod out of autopath (its resolver walks its
/// search list itself).
pub const AUTOPATH_ANNOTATION: &str = "dnsproxy.io/autopath";
/// The injected proxy's container (a container, or a native sidecar init container).
pub const ISTIO_PROXY_CONTAINER: &str = "istio-proxy";

/// What applies to one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPolicy {
    pub capture: bool,
    /// Which setting decided, for logs: `pod annotation`, `istio proxyMetadata`,
    /// `namespace label`, `default`, `hostNetwork`, `not running`.
    pub decided_by: &'static str,
    /// Auto-allocated VIPs answered for this pod.
    pub auto_allocate: bool,
    /// Log every query of this pod.
    pub dns_debug: bool,
}

/// Whether `pod` has an Istio sidecar: [`SIDECAR_ANNOTATION`] says so, else the
/// injector's [`ISTIO_SIDECAR_STATUS`] annotation or an [`ISTIO_PROXY_CONTAINER`]
/// container does.
pub fn sidecar(pod: &Pod) -> bool {
    let meta = &pod.metadata;
    if let Some(v) = meta.annotation(SIDECAR_ANNOTATION).and_then(parse_bool) {
        return v;
    }
    let containers = pod.spec.iter().flat_map(|s| {
        s.containers
            .iter()
            .chain(s.init_containers.iter().flatten())
    });
    meta.annotation(ISTIO_SIDECAR_STATUS).is_some()
        || containers
            .into_iter()
            .any(|c| c.name == ISTIO_PROXY_CONTAINER)
}

/// Whether the daemon walks `pod`'s search list for it: unless
/// [`AUTOPATH_ANNOTATION`] says no.
pub fn autopath(pod: &Pod) -> bool {
    pod.metadata
        .annotation(AUTOPATH_ANNOTATION)
        .and_then(parse_bool)
        .unwrap_or(true)
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProxyConfig {
    #[serde(default)]
    proxy_metadata: std::collections::BTreeMap<String, String>,
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "enabled" | "on" | "1" => Some(true),
        "false" | "disabled" | "off" | "0" => Some(false),
        _ => None,
    }
}

/// Decides for `pod` in `namespace` (None when the Namespace is not known yet).
pub fn decide(pod: &Pod, namespace: Option<&Namespace>, capture_default: bool) -> PodPolicy {
    let meta = &pod.metadata;
    let proxy_metadata = meta
        .annotation(ISTIO_PROXY_CONFIG)
        .and_then(|yaml| match from_yaml::<ProxyConfig>(yaml) {
            Ok(cfg) => Some(cfg.proxy_metadata),
            Err(e) => {
                tracing::warn!(pod = %meta.name_str(), error = %e, "unreadable {ISTIO_PROXY_CONFIG} annotation: ignored");
                None
            }
        })
        .unwrap_or_default();
    let auto_allocate = proxy_metadata
        .get("ISTIO_META_DNS_AUTO_ALLOCATE")
        .and_then(|v| parse_bool(v))
        .unwrap_or(true);
    let dns_debug = meta
        .annotation(ISTIO_LOG_LEVEL)
        .is_some_and(|levels| levels.split(',').any(|l| l.trim() == "dns:debug"));
    let policy = |capture, decided_by| PodPolicy {
        capture,
        decided_by,
        auto_allocate,
        dns_debug,
    };

    if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
        // Its network namespace is the node's: capturing it would capture the node.
        return policy(false, "hostNetwork");
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if phase != Some("Running") {
        return policy(false, "not running");
    }
    if let Some(v) = meta.annotation(POD_ANNOTATION).and_then(parse_bool) {
        return policy(v, "pod annotation");
    }
    if let Some(v) = proxy_metadata
        .get("ISTIO_META_DNS_CAPTURE")
        .and_then(|v| parse_bool(v))
    {
        return policy(v, "istio proxyMetadata");
    }
    if let Some(v) = namespace
        .and_then(|ns| ns.metadata.label(NAMESPACE_LABEL))
        .and_then(parse_bool)
    {
        return policy(v, "namespace label");
    }
    policy(capture_default, "default")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        from_yaml(yaml).unwrap()
    }

    fn ns(label: Option<&str>) -> Namespace {
        let mut n = Namespace::default();
        if let Some(v) = label {
            n.metadata.labels = Some([(NAMESPACE_LABEL.into(), v.into())].into());
        }
        n
    }

    #[test]
    fn a_sidecar_is_seen_by_the_injectors_annotation_or_container_and_can_be_overridden() {
        let cases = [
            ("spec: {containers: [{name: app}]}", false),
            (
                "metadata: {annotations: {sidecar.istio.io/status: '{}'}}\nspec: {containers: [{name: app}]}",
                true,
            ),
            (
                "spec: {containers: [{name: app}, {name: istio-proxy}]}",
                true,
            ),
            (
                "spec: {containers: [{name: app}], initContainers: [{name: istio-proxy, restartPolicy: Always}]}",
                true,
            ),
            (
                "metadata: {annotations: {dnsproxy.io/sidecar: 'false'}}\nspec: {containers: [{name: istio-proxy}]}",
                false,
            ),
            (
                "metadata: {annotations: {dnsproxy.io/sidecar: 'true'}}\nspec: {containers: [{name: app}]}",
                true,
            ),
        ];
        for (yaml, want) in cases {
            assert_eq!(sidecar(&pod(yaml)), want, "{yaml}");
        }
    }

    #[test]
    fn most_specific_wins() {
        struct Case {
            name: &'static str,
            pod: &'static str,
            ns: Option<&'static str>,
            default: bool,
            want: (bool, &'static str),
        }
        let running = "status: {phase: Running}";
        let cases = [
            Case {
                name: "global default on",
                pod: running,
                ns: None,
                default: true,
                want: (true, "default"),
            },
            Case {
                name: "global default off",
                pod: running,
                ns: None,
                default: false,
                want: (false, "default"),
            },
            Case {
                name: "namespace enables",
                pod: running,
                ns: Some("enabled"),
                default: false,
                want: (true, "namespace label"),
            },
            Case {
                name: "namespace disables",
                pod: running,
                ns: Some("disabled"),
                default: true,
                want: (false, "namespace label"),
            },
            Case {
                name: "pod annotation beats namespace",
                pod: "metadata: {annotations: {dnsproxy.io/capture: \"false\"}}\nstatus: {phase: Running}",
                ns: Some("enabled"),
                default: true,
                want: (false, "pod annotation"),
            },
            Case {
                name: "istio proxyMetadata on the pod",
                pod: "metadata:\n  annotations:\n    proxy.istio.io/config: |\n      proxyMetadata:\n        ISTIO_META_DNS_CAPTURE: \"true\"\n        ISTIO_META_DNS_AUTO_ALLOCATE: \"true\"\nstatus: {phase: Running}",
                ns: Some("disabled"),
                default: false,
                want: (true, "istio proxyMetadata"),
            },
            Case {
                name: "our annotation beats istio's",
                pod: "metadata:\n  annotations:\n    dnsproxy.io/capture: \"false\"\n    proxy.istio.io/config: '{proxyMetadata: {ISTIO_META_DNS_CAPTURE: \"true\"}}'\nstatus: {phase: Running}",
                ns: None,
                default: true,
                want: (false, "pod annotation"),
            },
            Case {
                name: "pending pod",
                pod: "status: {phase: Pending}",
                ns: Some("enabled"),
                default: true,
                want: (false, "not running"),
            },
            Case {
                name: "hostNetwork pod",
                pod: "spec: {hostNetwork: true}\nstatus: {phase: Running}",
                ns: Some("enabled"),
                default: true,
                want: (false, "hostNetwork"),
            },
        ];
        for c in cases {
            let namespace = c.ns.map(|v| ns(Some(v)));
            let got = decide(&pod(c.pod), namespace.as_ref(), c.default);
            assert_eq!((got.capture, got.decided_by), c.want, "{}", c.name);
        }
    }

    #[test]
    fn auto_allocate_and_debug_log() {
        let p = pod(
            "metadata:\n  annotations:\n    proxy.istio.io/config: '{proxyMetadata: {ISTIO_META_DNS_CAPTURE: \"true\", ISTIO_META_DNS_AUTO_ALLOCATE: \"false\"}}'\n    sidecar.istio.io/agentLogLevel: \"default:info,dns:debug\"\nstatus: {phase: Running}",
        );
        let got = decide(&p, None, false);
        assert!(got.capture && !got.auto_allocate && got.dns_debug);
        let plain = decide(&pod("status: {phase: Running}"), None, true);
        assert!(plain.auto_allocate && !plain.dns_debug);
    }
}
