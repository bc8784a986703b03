//! Node-mode harness: a "node" netns where the daemon runs (as on the host network)
//! with the fake cluster DNS and the fake API server, and "pods", each its own netns
//! (with its own view of the cluster DNS at 10.96.0.10, answering `FAKE_A`) and its own
//! cgroup `pod<uid>` below the test's root cgroup, with a process in it.
use std::{
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use serde_json::{Value, json};

use crate::{
    ADMIN_ADDR, Cgroup, Daemon, DaemonOptions, FakeDns, FakeKube, Netns, Resource, dnsproxy_bin,
    http_get, run_with_timeout, unique_name,
};

/// The node this test plays.
pub const NODE_NAME: &str = "node-a";

/// A pod: netns, cgroup, a sleeping process, its own cluster DNS.
pub struct FakePod {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// Times its sandbox was recreated (its containers' restart count, as the kubelet
    /// reports it).
    pub restarts: u32,
    sleeper: Child,
    pub fake: FakeDns,
    pub cgroup: Cgroup,
    pub netns: Netns,
}

impl Drop for FakePod {
    fn drop(&mut self) {
        let _ = self.sleeper.kill();
        let _ = self.sleeper.wait();
    }
}

/// A pod's process: `sleep` in `netns` and `cgroup`.
fn start_sleeper(netns: &Netns, cgroup: &Cgroup) -> Child {
    netns
        .command(dnsproxy_bin())
        .arg("exec")
        .arg("--cgroup")
        .arg(&cgroup.path)
        .args(["--", "sleep", "600"])
        .stdin(Stdio::null())
        .spawn()
        .expect("start the pod's process")
}

/// Waits until a process is in `cgroup` (before the daemon looks for it).
fn wait_in_cgroup(cgroup: &Cgroup) {
    let deadline = std::time::Instant::now() + crate::scaled(Duration::from_secs(5));
    while std::fs::read_to_string(cgroup.path.join("cgroup.procs"))
        .unwrap_or_default()
        .trim()
        .is_empty()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "pod process never joined its cgroup"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A Pod of another node, as the API serves it (no process behind it): labelled
/// `app`, with IP `ip`, Ready or not, and an annotation that `generation` changes.
pub fn remote_pod(
    name: &str,
    namespace: &str,
    app: &str,
    ip: &str,
    ready: bool,
    generation: u32,
) -> Value {
    json!({"metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{namespace}-{name}"),
                        "labels": {"app": app, "pod-template-hash": "5d8f7c9b4"},
                        "annotations": {"generation": generation.to_string()}},
           "spec": {"nodeName": "another-node", "serviceAccountName": "default",
                    "containers": [{"name": "app", "image": format!("registry.example/{app}:1.0"),
                                    "ports": [{"containerPort": 8080}],
                                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}]},
           "status": {"phase": "Running", "podIP": ip, "hostIP": "192.168.0.2",
                      "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }},
                                     {"type": "PodScheduled", "status": "True"}],
                      "containerStatuses": [{"name": "app", "image": format!("registry.example/{app}:1.0"),
                                             "imageID": "", "ready": ready, "restartCount": 0,
                                             "containerID": format!("containerd://{name}")}]}})
}

/// The `vm` ServiceEntry of namespace `vms`: VIP 240.240.8.8 (port 443), backed by the
/// Pods of `vms` labelled `app: <app>` (its `workloadSelector`).
pub fn vm_entry(app: &str) -> Value {
    json!({"metadata": {"name": "vm", "namespace": "vms"},
           "spec": {"hosts": ["vm.example"], "addresses": ["240.240.8.8"],
                    "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}],
                    "resolution": "STATIC", "workloadSelector": {"labels": {"app": app}}}})
}

/// A pod's resolv.conf as the kubelet writes it for `dnsPolicy: ClusterFirst` in
/// namespace `default` on a node whose own search domain is `corp.example`.
pub const KUBELET_RESOLV_CONF: &str = "search default.svc.cluster.local svc.cluster.local cluster.local corp.example\nnameserver 10.96.0.10\noptions ndots:5\n";

/// Everything of one node-mode test.
pub struct NodeEnv {
    pub pods: Vec<FakePod>,
    pub api: FakeKube,
    pub fake: FakeDns,
    pub root: Cgroup,
    pub node: Netns,
    pub dir: PathBuf,
}

fn uid() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{:08x}-0000-4000-8000-{:012x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

impl NodeEnv {
    /// Node netns, root cgroup, fake DNS and API with the given namespaces
    /// (name, capture label or none).
    pub fn new(namespaces: &[(&str, Option<&str>)]) -> Self {
        Self::with_api(namespaces, crate::fake_kube::Options::default())
    }

    /// [`NodeEnv::new`] with an API server that behaves as `options` say.
    pub fn with_api(
        namespaces: &[(&str, Option<&str>)],
        options: crate::fake_kube::Options,
    ) -> Self {
        let node = Netns::new();
        let root = Cgroup::new();
        let fake = FakeDns::start(&node);
        let api = FakeKube::start_with(&node, options);
        let dir = std::env::temp_dir().join(unique_name("k"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("kubeconfig"), api.kubeconfig()).unwrap();
        // The VIP store, as `kubectl apply -k deploy/` ships it (empty): the daemons
        // only ever update it, which is all the RBAC grants.
        let store = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/vip-store.yaml"
        ))
        .expect("deploy/vip-store.yaml");
        let store: Value = serde_saphyr::from_str(&store).expect("deploy/vip-store.yaml parses");
        api.apply(Resource::ConfigMaps, store);
        for (name, label) in namespaces {
            let mut ns = json!({"metadata": {"name": name, "labels": {}}});
            if let Some(v) = label {
                ns["metadata"]["labels"]["dnsproxy.io/capture"] = json!(v);
            }
            api.apply(Resource::Namespaces, ns);
        }
        NodeEnv {
            pods: Vec::new(),
            api,
            fake,
            root,
            node,
            dir,
        }
    }

    /// The Pod object of `pod` with `annotations`.
    pub fn pod_object(pod: &FakePod, annotations: &[(&str, &str)]) -> Value {
        let annotations: serde_json::Map<String, Value> = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        json!({
            "metadata": {"name": pod.name, "namespace": pod.namespace, "uid": pod.uid, "annotations": annotations},
            "spec": {"nodeName": NODE_NAME, "containers": [{"name": "app", "image": "app"}]},
            "status": {"phase": "Running", "podIP": "10.244.0.10",
                       "containerStatuses": [{"name": "app", "image": "app", "imageID": "", "ready": true,
                                              "restartCount": pod.restarts,
                                              "containerID": format!("containerd://{}-{}", pod.uid, pod.restarts)}]}
        })
    }

    /// Creates a pod (netns, cgroup, process) and publishes it in the API; returns its
    /// index in `pods`.
    pub fn add_pod(&mut self, name: &str, namespace: &str, annotations: &[(&str, &str)]) -> usize {
        let pod = self.start_pod(name, namespace);
        self.annotate(pod, annotations);
        pod
    }

    /// Creates a pod's netns, cgroup and process, as the runtime does before the
    /// kubelet reports the pod Running, without publishing it; returns its index.
    pub fn start_pod(&mut self, name: &str, namespace: &str) -> usize {
        self.start_pod_with(name, namespace, None)
    }

    /// [`NodeEnv::add_pod`] for a pod whose containers see `resolv_conf` as their
    /// /etc/resolv.conf (its process runs in a mount namespace of its own).
    pub fn add_pod_with_resolv_conf(
        &mut self,
        name: &str,
        namespace: &str,
        annotations: &[(&str, &str)],
        resolv_conf: &std::path::Path,
    ) -> usize {
        let pod = self.start_pod_with(name, namespace, Some(resolv_conf));
        self.annotate(pod, annotations);
        pod
    }

    fn start_pod_with(
        &mut self,
        name: &str,
        namespace: &str,
        resolv_conf: Option<&std::path::Path>,
    ) -> usize {
        let netns = Netns::new();
        let fake = FakeDns::start(&netns);
        let uid = uid();
        let cgroup = self.root.child(&format!("pod{uid}"));
        let sleeper = match resolv_conf {
            None => start_sleeper(&netns, &cgroup),
            Some(path) => crate::captured_command(&netns, &cgroup, path, &["sleep", "600"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start the pod's process"),
        };
        let pod = FakePod {
            name: name.into(),
            namespace: namespace.into(),
            uid,
            restarts: 0,
            sleeper,
            fake,
            cgroup,
            netns,
        };
        wait_in_cgroup(&pod.cgroup);
        self.pods.push(pod);
        self.pods.len() - 1
    }

    /// Recreates a pod's sandbox, as the runtime does when the pause container dies:
    /// same UID and cgroup, a new network namespace and a new process; then the kubelet
    /// reports the containers restarted (new container IDs, restart count + 1), with
    /// `annotations`. The old netns is deleted (it lives on while something still holds
    /// it).
    pub fn recreate_sandbox(&mut self, pod: usize, annotations: &[(&str, &str)]) {
        let p = &mut self.pods[pod];
        let _ = p.sleeper.kill();
        let _ = p.sleeper.wait();
        let netns = Netns::new();
        p.fake = FakeDns::start(&netns);
        p.sleeper = start_sleeper(&netns, &p.cgroup);
        p.netns = netns;
        p.restarts += 1;
        wait_in_cgroup(&p.cgroup);
        self.annotate(pod, annotations);
    }

    /// Publishes pod `pod` with `phase` (`Succeeded`: its containers finished).
    pub fn set_phase(&self, pod: usize, phase: &str, annotations: &[(&str, &str)]) {
        let mut obj = Self::pod_object(&self.pods[pod], annotations);
        obj["status"]["phase"] = json!(phase);
        self.api.apply(Resource::Pods, obj);
    }

    /// Replaces pod `pod` as a `StatefulSet` does: the Pod object is deleted, and a new
    /// Pod with the same name and a new UID starts (new netns, cgroup and process).
    /// Returns the new pod's index; the old one's process stops.
    pub fn replace_pod(&mut self, pod: usize, annotations: &[(&str, &str)]) -> usize {
        let (name, namespace) = (
            self.pods[pod].name.clone(),
            self.pods[pod].namespace.clone(),
        );
        self.api.delete(Resource::Pods, &namespace, &name);
        let old = &mut self.pods[pod];
        let _ = old.sleeper.kill();
        let _ = old.sleeper.wait();
        self.add_pod(&name, &namespace, annotations)
    }

    /// Sets (or removes) namespace `name`'s capture label.
    pub fn label_namespace(&self, name: &str, label: Option<&str>) {
        let mut ns = json!({"metadata": {"name": name, "labels": {}}});
        if let Some(v) = label {
            ns["metadata"]["labels"]["dnsproxy.io/capture"] = json!(v);
        }
        self.api.apply(Resource::Namespaces, ns);
    }

    /// Replaces a pod's annotations in the API (a live change: the pod keeps running).
    pub fn annotate(&self, pod: usize, annotations: &[(&str, &str)]) {
        self.api.apply(
            Resource::Pods,
            Self::pod_object(&self.pods[pod], annotations),
        );
    }

    pub fn daemon_options(&self, pin_dir: PathBuf) -> DaemonOptions<'_> {
        DaemonOptions {
            netns: &self.node,
            cgroup: &self.root,
            pin_dir,
            registry: None,
            env: vec![
                (
                    "KUBECONFIG".into(),
                    self.dir.join("kubeconfig").display().to_string(),
                ),
                ("NODE_NAME".into(), NODE_NAME.into()),
            ],
            state_dir: self.dir.join("state"),
            inside_cgroup: false,
            dns_server_flags: true,
            extra_args: vec!["--mode".into(), "node".into()],
            wrapper: Vec::new(),
        }
    }

    /// A node-mode daemon with a fresh pin directory.
    pub fn start_daemon(&self, extra_args: &[&str]) -> Daemon {
        let mut opts = self.daemon_options(PathBuf::from("/sys/fs/bpf").join(unique_name("p")));
        opts.extra_args
            .extend(extra_args.iter().map(ToString::to_string));
        Daemon::start(opts)
    }

    /// `args` run inside pod `pod` (its netns and cgroup).
    pub fn in_pod(&self, pod: usize, args: &[&str]) -> Output {
        let p = &self.pods[pod];
        let mut cmd: Command = p.netns.command(dnsproxy_bin());
        cmd.arg("exec")
            .arg("--cgroup")
            .arg(&p.cgroup.path)
            .arg("--")
            .args(args);
        run_with_timeout(&mut cmd, Duration::from_secs(20))
    }

    /// The autopath scene: the cluster DNS has nothing under `cluster.local` and
    /// `corp.example` but what a test sets, and two pods of `default` see
    /// [`KUBELET_RESOLV_CONF`], the second opted out of autopath. Returns the
    /// resolv.conf's path and the two pods.
    pub fn autopath_pods(&mut self) -> (PathBuf, usize, usize) {
        self.fake.nxdomain_below("cluster.local");
        self.fake.nxdomain_below("corp.example");
        let resolv = self.dir.join("pod-resolv.conf");
        std::fs::write(&resolv, KUBELET_RESOLV_CONF).unwrap();
        let walker = self.add_pod_with_resolv_conf("walker", "default", &[], &resolv);
        let walks_itself = self.add_pod_with_resolv_conf(
            "walks-itself",
            "default",
            &[("dnsproxy.io/autopath", "false")],
            &resolv,
        );
        (resolv, walker, walks_itself)
    }

    /// The queries pod `pod` sent so far: the sum of its `dns_requests_total` series.
    pub fn pod_queries(&self, pod: usize) -> u64 {
        let needle = format!("pod=\"{}\"", self.pods[pod].name);
        self.metrics()
            .lines()
            .filter(|l| l.starts_with("dns_requests_total{") && l.contains(&needle))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// `args` run inside pod `pod` with `resolv_conf` as its /etc/resolv.conf.
    pub fn in_pod_with_resolv_conf(
        &self,
        pod: usize,
        resolv_conf: &std::path::Path,
        args: &[&str],
    ) -> Output {
        let p = &self.pods[pod];
        run_with_timeout(
            &mut crate::captured_command(&p.netns, &p.cgroup, resolv_conf, args),
            Duration::from_secs(20),
        )
    }

    /// The daemon's `/metrics` (on the node's loopback).
    pub fn metrics(&self) -> String {
        self.node
            .within(|| http_get(ADMIN_ADDR, "/metrics"))
            .unwrap_or_default()
    }

    /// `dig +short` of `name` (A) from inside pod `pod`, to the cluster DNS.
    pub fn dig(&self, pod: usize, name: &str) -> String {
        self.dig_short(pod, &[name, "A"])
    }

    /// `dig +short <query>` from inside pod `pod`, to the cluster DNS (one try).
    pub fn dig_short(&self, pod: usize, query: &[&str]) -> String {
        let mut args = vec!["dig", "+short", "+time=2", "+tries=1", "@10.96.0.10"];
        args.extend_from_slice(query);
        let out = self.in_pod(pod, &args);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Waits until `dig` from `pod` answers `want` (the policy applies asynchronously).
    pub fn wait_for_answer(&self, pod: usize, name: &str, want: &str) {
        let deadline = std::time::Instant::now() + crate::scaled(Duration::from_secs(15));
        loop {
            let got = self.dig(pod, name);
            if got == want {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "pod {} still gets {got:?} for {name}, want {want:?}",
                self.pods[pod].name
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for NodeEnv {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
