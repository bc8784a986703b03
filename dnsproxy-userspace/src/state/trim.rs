//! What the stores keep of each object: the fields the daemon reads, nothing else
//! (kube-rs `.modify()`, applied before an object reaches its store). Trimmed objects
//! are also what "changed" is judged on: an update that touches only fields dropped
//! here (a heartbeat, a status the daemon does not read, a resourceVersion) wakes
//! nothing up.
use k8s_openapi::api::{
    core::v1::{ConfigMap, Container, Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};

use crate::{
    capture::policy,
    registry::{
        export::EXPORT_TO_ANNOTATION,
        manifest::{
            AUTOALLOCATE_LABEL, ObjectMeta, SERVICE_NAME_LABEL, ServiceEntry, WorkloadEntryObject,
            WorkloadPod,
        },
    },
};

/// Labels: all, only these, or none.
enum Labels<'a> {
    All,
    Only(&'a [&'a str]),
}

/// Keeps name, namespace, UID, creation and deletion time, the `labels` asked for and
/// the `annotations` named; drops the rest (managed fields, owner references, the
/// resourceVersion, ...).
fn meta(meta: &mut ObjectMeta, labels: &Labels<'_>, annotations: &[&str]) {
    let kept = ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        uid: meta.uid.take(),
        creation_timestamp: meta.creation_timestamp.take(),
        deletion_timestamp: meta.deletion_timestamp.take(),
        labels: match labels {
            Labels::All => meta.labels.take(),
            Labels::Only(keys) => only(meta.labels.take(), keys),
        },
        annotations: only(meta.annotations.take(), annotations),
        ..ObjectMeta::default()
    };
    *meta = kept;
}

fn only(
    map: Option<std::collections::BTreeMap<String, String>>,
    keys: &[&str],
) -> Option<std::collections::BTreeMap<String, String>> {
    let mut map = map?;
    map.retain(|k, _| keys.contains(&k.as_str()));
    (!map.is_empty()).then_some(map)
}

/// A Service: its type, cluster IPs, external name, and who may see it.
pub(super) fn service(svc: &mut Service) {
    meta(
        &mut svc.metadata,
        &Labels::Only(&[]),
        &[EXPORT_TO_ANNOTATION],
    );
    if let Some(spec) = svc.spec.take() {
        svc.spec = Some(k8s_openapi::api::core::v1::ServiceSpec {
            type_: spec.type_,
            cluster_ip: spec.cluster_ip,
            cluster_ips: spec.cluster_ips,
            external_name: spec.external_name,
            ..Default::default()
        });
    }
    svc.status = None;
}

/// A headless Service's `EndpointSlice`: its Service, and each endpoint's addresses,
/// readiness and hostname.
pub(super) fn endpoint_slice(slice: &mut EndpointSlice) {
    meta(
        &mut slice.metadata,
        &Labels::Only(&[SERVICE_NAME_LABEL]),
        &[],
    );
    slice.ports = None;
    for ep in &mut slice.endpoints {
        *ep = k8s_openapi::api::discovery::v1::Endpoint {
            addresses: std::mem::take(&mut ep.addresses),
            conditions: ep.conditions.take().map(|c| {
                k8s_openapi::api::discovery::v1::EndpointConditions {
                    ready: c.ready,
                    ..Default::default()
                }
            }),
            hostname: ep.hostname.take(),
            ..Default::default()
        };
    }
}

/// A `ServiceEntry`: its spec and status as typed (unknown fields are never kept), and
/// the auto-allocation label.
pub(super) fn service_entry(se: &mut ServiceEntry) {
    meta(&mut se.metadata, &Labels::Only(&[AUTOALLOCATE_LABEL]), &[]);
}

/// A `WorkloadEntry`: its labels (selectors match them) and spec.
pub(super) fn workload_entry(we: &mut WorkloadEntryObject) {
    meta(&mut we.metadata, &Labels::All, &[]);
}

/// A Namespace: its capture label.
pub(super) fn namespace(ns: &mut Namespace) {
    meta(
        &mut ns.metadata,
        &Labels::Only(&[policy::NAMESPACE_LABEL]),
        &[],
    );
    ns.spec = None;
    ns.status = None;
}

/// A Pod of this node: what the capture policy reads (annotations, host network,
/// phase), what says its containers (a new sandbox restarts them), and its containers'
/// names.
pub(super) fn local_pod(pod: &mut Pod) {
    meta(
        &mut pod.metadata,
        &Labels::Only(&[]),
        &[
            policy::POD_ANNOTATION,
            policy::ISTIO_PROXY_CONFIG,
            policy::ISTIO_LOG_LEVEL,
            policy::ISTIO_SIDECAR_STATUS,
            policy::SIDECAR_ANNOTATION,
            policy::AUTOPATH_ANNOTATION,
        ],
    );
    if let Some(spec) = pod.spec.take() {
        pod.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            node_name: spec.node_name,
            host_network: spec.host_network,
            containers: spec
                .containers
                .into_iter()
                .map(|c| Container {
                    name: c.name,
                    ..Default::default()
                })
                .collect(),
            init_containers: spec.init_containers.map(|list| {
                list.into_iter()
                    .map(|c| Container {
                        name: c.name,
                        ..Default::default()
                    })
                    .collect()
            }),
            ..Default::default()
        });
    }
    if let Some(status) = pod.status.take() {
        let containers = |list: Option<Vec<k8s_openapi::api::core::v1::ContainerStatus>>| {
            list.map(|list| {
                list.into_iter()
                    .map(|c| k8s_openapi::api::core::v1::ContainerStatus {
                        name: c.name,
                        container_id: c.container_id,
                        restart_count: c.restart_count,
                        ..Default::default()
                    })
                    .collect()
            })
        };
        pod.status = Some(k8s_openapi::api::core::v1::PodStatus {
            phase: status.phase,
            container_statuses: containers(status.container_statuses),
            init_container_statuses: containers(status.init_container_statuses),
            ..Default::default()
        });
    }
}

/// A Pod a `workloadSelector` selects: its labels, phase, IP and readiness (the rest
/// of the Pod was never parsed: [`WorkloadPod`]).
pub(super) fn selected_pod(pod: &mut WorkloadPod) {
    meta(&mut pod.metadata, &Labels::All, &[]);
    if let Some(status) = &mut pod.status {
        status.conditions.retain(|c| c.type_ == "Ready");
    }
}

/// The VIP store's ConfigMap: its data, and the resourceVersion its agreement is
/// written against (optimistic concurrency needs it).
pub(super) fn vip_store(cm: &mut ConfigMap) {
    let version = cm.metadata.resource_version.take();
    meta(&mut cm.metadata, &Labels::Only(&[]), &[]);
    cm.metadata.resource_version = version;
    cm.binary_data = None;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::manifest::from_yaml;

    #[test]
    fn a_local_pod_keeps_what_capture_reads_and_loses_the_rest() {
        let mut pod: Pod = from_yaml(
            r#"
metadata:
  name: web
  namespace: shop
  uid: u1
  resourceVersion: "42"
  labels: {app: web}
  annotations: {dnsproxy.io/capture: "true", kubectl.kubernetes.io/last-applied-configuration: "{...}"}
  managedFields: [{manager: kubectl}]
spec:
  nodeName: node-a
  containers: [{name: app, image: app:1, env: [{name: A, value: b}]}]
  volumes: [{name: v, emptyDir: {}}]
status:
  phase: Running
  podIP: 10.0.0.1
  conditions: [{type: Ready, status: "True", lastProbeTime: null}]
  containerStatuses: [{name: app, containerID: "containerd://1", restartCount: 2, image: app:1, imageID: x, ready: true}]
"#,
        )
        .unwrap();
        local_pod(&mut pod);
        let meta = &pod.metadata;
        assert_eq!(meta.resource_version, None);
        assert_eq!(meta.labels, None);
        assert_eq!(
            meta.annotations
                .as_ref()
                .map(|a| a.keys().cloned().collect::<Vec<_>>()),
            Some(vec!["dnsproxy.io/capture".to_owned()])
        );
        let spec = pod.spec.unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("node-a"));
        assert_eq!(spec.containers[0].image, None);
        assert_eq!(spec.volumes, None);
        let status = pod.status.unwrap();
        assert_eq!(status.pod_ip, None);
        let c = &status.container_statuses.unwrap()[0];
        assert_eq!(
            (c.container_id.as_deref(), c.restart_count),
            (Some("containerd://1"), 2)
        );
        assert_eq!(c.image, "");
    }

    #[test]
    fn a_selected_pod_keeps_labels_ip_and_readiness() {
        let mut pod: WorkloadPod = from_yaml(
            r#"
metadata: {name: vm-1, namespace: vms, labels: {app: vm}, annotations: {a: b}}
spec: {nodeName: other, containers: [{name: app}]}
status:
  phase: Running
  podIP: 10.2.0.7
  hostIP: 192.168.0.1
  conditions: [{type: Ready, status: "True"}, {type: PodScheduled, status: "True"}]
"#,
        )
        .unwrap();
        selected_pod(&mut pod);
        assert!(pod.metadata.annotations.is_none());
        assert!(pod.is_ready());
        assert_eq!(pod.ip(), Some("10.2.0.7"));
        // Only what it holds is kept (and fingerprinted for changes): no spec, no
        // host IP, one condition.
        let kept = serde_json::to_value(&pod).unwrap();
        assert_eq!(kept.get("spec"), None);
        assert_eq!(kept["status"].get("hostIP"), None);
        assert_eq!(
            kept["status"]["conditions"].as_array().map(Vec::len),
            Some(1)
        );
        assert_eq!(kept["metadata"]["labels"]["app"], "vm");
    }
}
