use super::*;
use crate::{
    registry::manifest::parse_into,
    vip::assign::{Assignment, Demand, VipAllocator},
};

/// The table of `objects`, with VIPs from `assignment`.
fn build_with(objects: &Objects, assignment: &mut Assignment) -> NameTable {
    let vips = assignment.allocate(&Demand::of(objects));
    NameTable::build(objects, &vips, &TableConfig::default())
}

/// The table of `objects` under `cfg`, its VIPs allocated in memory for the demand the
/// configured quota leaves.
fn build_cfg(objects: &Objects, cfg: &TableConfig) -> NameTable {
    let vips = Assignment::local(VipAllocator::in_memory())
        .allocate(&Demand::within(objects, cfg.max_hosts_per_namespace));
    NameTable::build(objects, &vips, cfg)
}

/// (host, reason) of every refusal of `t`, in order.
fn refused_hosts(t: &NameTable) -> Vec<(String, addresses::Reason)> {
    t.refused()
        .iter()
        .map(|r| (r.host.to_string(), r.reason))
        .collect()
}

const OBJECTS: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: aliyun, namespace: default}
spec: {hosts: [aliyun.com], ports: [{number: 443, name: tls, protocol: TLS}], resolution: DNS, location: MESH_EXTERNAL}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: alibabacloud, namespace: default}
spec: {hosts: [alibabacloud.com], ports: [{number: 443, name: tls, protocol: TLS}], resolution: DNS}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: opted-out, labels: {networking.istio.io/enable-autoallocate-ip: "false"}}
spec: {hosts: [no-vip.example], resolution: DNS}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: none}
spec: {hosts: [none.example], resolution: NONE}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wild}
spec: {hosts: ["*.wild.example"], addresses: [240.241.0.1], resolution: NONE}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: by-istio}
spec: {hosts: [istio.example], resolution: DNS}
status: {addresses: [{value: 240.240.9.9, host: istio.example}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: static-eps, labels: {networking.istio.io/enable-autoallocate-ip: "false"}}
spec: {hosts: [static.example], resolution: STATIC, endpoints: [{address: 192.0.2.1}, {address: 192.0.2.2}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: static-vip}
spec: {hosts: [static-vip.example], resolution: STATIC, endpoints: [{address: 192.0.2.3}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec: {clusterIP: 10.0.0.5}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: data}
spec: {clusterIP: None}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-1, namespace: data, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
endpoints:
- {addresses: [10.1.0.7], hostname: db-0, conditions: {ready: true}}
- {addresses: [10.1.0.8], hostname: db-1}
- {addresses: [10.1.0.9], hostname: db-2, conditions: {ready: false}}
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: default}
spec: {type: ExternalName, externalName: aliyun.com}
"#;

fn table() -> NameTable {
    let mut objects = Objects::default();
    parse_into(OBJECTS, &mut objects).unwrap();
    build_with(&objects, &mut Assignment::local(VipAllocator::in_memory()))
}

fn v4s(h: &Host) -> Vec<String> {
    match &h.target {
        Target::Addresses(a) => {
            let mut v: Vec<String> = a.ipv4().map(|ip| ip.to_string()).collect();
            v.sort();
            v
        }
        Target::Cname(t) => vec![format!("CNAME {t}")],
    }
}

#[test]
fn resolution_rules() {
    #[derive(Debug, PartialEq)]
    enum Want {
        Direct(&'static str),
        Search(&'static str),
        Nothing,
    }
    struct Case {
        name: &'static str,
        query: &'static str,
        namespace: &'static str,
        want: Want,
    }
    let cases = [
        Case {
            name: "exact SE host",
            query: "aliyun.com",
            namespace: "default",
            want: Want::Direct("aliyun.com"),
        },
        Case {
            name: "search suffix, own namespace",
            query: "alibabacloud.com.default.svc.cluster.local",
            namespace: "default",
            want: Want::Search("alibabacloud.com"),
        },
        Case {
            name: "search suffix, svc domain",
            query: "alibabacloud.com.svc.cluster.local",
            namespace: "default",
            want: Want::Search("alibabacloud.com"),
        },
        Case {
            name: "search suffix, cluster domain",
            query: "aliyun.com.cluster.local",
            namespace: "other",
            want: Want::Search("aliyun.com"),
        },
        Case {
            name: "search suffix of another namespace is not ours",
            query: "aliyun.com.other.svc.cluster.local",
            namespace: "default",
            want: Want::Nothing,
        },
        Case {
            name: "service FQDN",
            query: "reviews.default.svc.cluster.local",
            namespace: "other",
            want: Want::Direct("reviews.default.svc.cluster.local"),
        },
        Case {
            name: "short name in own namespace",
            query: "reviews",
            namespace: "default",
            want: Want::Direct("reviews.default.svc.cluster.local"),
        },
        Case {
            name: "short name elsewhere",
            query: "reviews",
            namespace: "other",
            want: Want::Nothing,
        },
        Case {
            name: "svc.ns",
            query: "reviews.default",
            namespace: "other",
            want: Want::Direct("reviews.default.svc.cluster.local"),
        },
        Case {
            name: "svc.ns.svc",
            query: "reviews.default.svc",
            namespace: "other",
            want: Want::Direct("reviews.default.svc.cluster.local"),
        },
        Case {
            name: "wildcard one level",
            query: "a.wild.example",
            namespace: "default",
            want: Want::Direct("*.wild.example"),
        },
        Case {
            name: "wildcard two levels",
            query: "a.b.wild.example",
            namespace: "default",
            want: Want::Direct("*.wild.example"),
        },
        Case {
            name: "wildcard apex is not covered",
            query: "wild.example",
            namespace: "default",
            want: Want::Nothing,
        },
        Case {
            name: "wildcard via search suffix",
            query: "x.wild.example.default.svc.cluster.local",
            namespace: "default",
            want: Want::Search("x.wild.example"),
        },
        Case {
            name: "opted out of auto-allocation",
            query: "no-vip.example",
            namespace: "default",
            want: Want::Nothing,
        },
        Case {
            name: "resolution NONE without addresses",
            query: "none.example",
            namespace: "default",
            want: Want::Nothing,
        },
        Case {
            name: "unknown",
            query: "example.org",
            namespace: "default",
            want: Want::Nothing,
        },
    ];
    let t = table();
    for c in cases {
        let got = match t.resolve(c.query, c.namespace, &[]) {
            Some(Match::Direct(h)) => Want::Direct(Box::leak(h.name.to_string().into_boxed_str())),
            Some(Match::SearchSuffix { base, .. }) => {
                Want::Search(Box::leak(base.to_owned().into_boxed_str()))
            }
            None => Want::Nothing,
        };
        assert_eq!(got, c.want, "{}", c.name);
    }
}

#[test]
fn addresses_by_kind() {
    let t = table();
    let get = |n: &str| v4s(t.get(n).unwrap_or_else(|| panic!("{n} missing")));
    let aliyun = get("aliyun.com");
    assert_eq!(aliyun.len(), 1);
    assert!(aliyun[0].starts_with("240.240."), "{aliyun:?}");
    assert_eq!(
        get("istio.example"),
        ["240.240.9.9"],
        "status.addresses honoured"
    );
    assert_eq!(
        get("static.example"),
        ["192.0.2.1", "192.0.2.2"],
        "opted out: the endpoints"
    );
    assert!(
        get("static-vip.example")[0].starts_with("240.240."),
        "STATIC gets a VIP too"
    );
    assert_eq!(get("reviews.default.svc.cluster.local"), ["10.0.0.5"]);
    assert_eq!(
        get("db.data.svc.cluster.local"),
        ["10.1.0.7", "10.1.0.8"],
        "ready endpoints only"
    );
    assert_eq!(get("db-0.db.data.svc.cluster.local"), ["10.1.0.7"]);
    assert!(
        t.get("db-2.db.data.svc.cluster.local").is_none(),
        "not ready"
    );
    assert_eq!(get("ext.default.svc.cluster.local"), ["CNAME aliyun.com"]);
    // PTR for VIPs and ClusterIPs.
    let vip: IpAddr = aliyun[0].parse().unwrap();
    assert_eq!(t.reverse(vip, "default"), Some("aliyun.com"));
    assert_eq!(
        t.reverse("10.0.0.5".parse().unwrap(), "default"),
        Some("reviews.default.svc.cluster.local")
    );
    match &t.get("aliyun.com").unwrap().target {
        Target::Addresses(a) => assert_eq!(a.ipv6().count(), 1),
        other @ Target::Cname(_) => panic!("{other:?}"),
    }
}

#[test]
fn other_entries_do_not_move_a_vip() {
    let mut objects = Objects::default();
    parse_into(OBJECTS, &mut objects).unwrap();
    let mut alloc = Assignment::local(VipAllocator::in_memory());
    let before = v4s(build_with(&objects, &mut alloc).get("aliyun.com").unwrap());
    objects
        .service_entries
        .retain(|se| se.metadata.name.as_deref() != Some("alibabacloud"));
    let mut more = Objects::default();
    parse_into(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: n}\nspec: {hosts: [a.new, b.new, c.new], resolution: DNS}\n",
        &mut more,
    )
    .unwrap();
    objects.service_entries.extend(more.service_entries);
    let after = v4s(build_with(&objects, &mut alloc).get("aliyun.com").unwrap());
    assert_eq!(before, after);
}

fn build(yaml: &str) -> NameTable {
    let mut objects = Objects::default();
    parse_into(yaml, &mut objects).unwrap();
    build_with(&objects, &mut Assignment::local(VipAllocator::in_memory()))
}

#[test]
fn cidr_addresses_answer_single_addresses_and_never_get_vips() {
    let t = build(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: range}\n\
         spec: {hosts: [range.example], addresses: [10.20.0.0/16], ports: [{number: 5432, name: pg, protocol: TCP}], resolution: DNS}\n\
         ---\n\
         apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: mixed}\n\
         spec: {hosts: [mixed.example], addresses: [10.30.0.0/16, 10.40.0.7/32], resolution: STATIC, endpoints: [{address: 192.0.2.9}]}\n",
    );
    assert!(
        t.get("range.example").is_none(),
        "only a range: no address to answer, no VIP; forwarded"
    );
    assert_eq!(v4s(t.get("mixed.example").unwrap()), ["10.40.0.7"]);
    assert!(t.vip_services().iter().all(|s| &*s.host != "range.example"));
}

#[test]
fn a_wildcard_without_addresses_is_left_to_upstream() {
    let t = build(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: corp}\n\
         spec: {hosts: [\"*.corp.example\"], resolution: STATIC}\n\
         ---\n\
         apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: dns}\n\
         spec: {hosts: [\"*.dns.example\"], resolution: DNS}\n",
    );
    assert!(t.get("db.corp.example").is_none());
    assert!(t.get("x.dns.example").is_none());
    assert!(t.is_empty());
}

const EXPORTS: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: stripe, namespace: payments, creationTimestamp: "2024-05-01T00:00:00Z"}
spec: {hosts: [api.stripe.com], addresses: [240.240.5.5], exportTo: ["*"], resolution: STATIC, endpoints: [{address: 192.0.2.5}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: mine, namespace: evil, creationTimestamp: "2023-01-01T00:00:00Z"}
spec: {hosts: [api.stripe.com], addresses: [240.240.6.6], exportTo: ["."], resolution: STATIC, endpoints: [{address: 192.0.2.6}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: newer, namespace: team-b, creationTimestamp: "2025-01-01T00:00:00Z"}
spec: {hosts: [api.stripe.com], addresses: [240.240.7.7], resolution: STATIC, endpoints: [{address: 192.0.2.7}]}
---
apiVersion: v1
kind: Service
metadata: {name: private, namespace: team-b, annotations: {networking.istio.io/exportTo: "."}}
spec: {clusterIP: 10.0.0.9}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: one, namespace: a, creationTimestamp: "2024-01-01T00:00:00Z"}
spec: {hosts: [shared.example], ports: [{number: 443, name: tls, protocol: TLS}], resolution: STATIC, endpoints: [{address: 192.0.2.10}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: two, namespace: b, creationTimestamp: "2024-06-01T00:00:00Z"}
spec: {hosts: [shared.example], ports: [{number: 443, name: tls, protocol: TLS}], resolution: STATIC, endpoints: [{address: 192.0.2.20}]}
"#;

#[test]
fn export_to_and_one_entry_per_client_namespace_never_a_union() {
    let t = build(EXPORTS);
    let seen = |name: &str, ns: &str| t.get_for(name, ns).map(v4s);
    // Own namespace first: even a private entry wins inside its namespace.
    assert_eq!(
        seen("api.stripe.com", "evil"),
        Some(vec!["240.240.6.6".into()])
    );
    assert_eq!(
        seen("api.stripe.com", "team-b"),
        Some(vec!["240.240.7.7".into()])
    );
    // Elsewhere: the oldest entry the namespace may see (evil's is older, but private).
    assert_eq!(
        seen("api.stripe.com", "payments"),
        Some(vec!["240.240.5.5".into()])
    );
    assert_eq!(
        seen("api.stripe.com", "default"),
        Some(vec!["240.240.5.5".into()])
    );
    // A Service exported to its own namespace only.
    assert!(
        t.resolve("private.team-b.svc.cluster.local", "default", &[])
            .is_none()
    );
    assert!(t.resolve("private", "team-b", &[]).is_some());
    // Every entry keeps its own VIPs in the data path.
    let vips: Vec<String> = t
        .vip_services()
        .iter()
        .flat_map(|s| s.vips.iter().map(ToString::to_string))
        .collect();
    for vip in ["240.240.5.5", "240.240.6.6", "240.240.7.7"] {
        assert!(vips.contains(&vip.to_owned()), "{vip} in {vips:?}");
    }
}

#[test]
fn one_auto_allocated_vip_is_translated_in_each_namespace_to_the_entry_it_sees() {
    use crate::vip::translate::plan::{ServiceKeyOrd, plan};
    let t = build(EXPORTS);
    let shared: Vec<&VipService> = t
        .vip_services()
        .iter()
        .filter(|s| &*s.host == "shared.example")
        .collect();
    let sources: Vec<String> = shared.iter().map(|s| s.owner.source()).collect();
    assert_eq!(sources, ["ServiceEntry a/one", "ServiceEntry b/two"]);
    assert_eq!(shared[0].vips, shared[1].vips, "one VIP for the host");
    assert_eq!(
        v4s(t.get_for("shared.example", "b").unwrap()),
        v4s(t.get_for("shared.example", "a").unwrap()),
        "the same VIP"
    );
    // b's pods reach b's backends, everyone else the oldest entry's: never b's
    // backends for a, which an older test asserted.
    let views: Vec<(Arc<str>, u32)> = vec![("a".into(), 1), ("b".into(), 2), ("c".into(), 3)];
    let p = plan(t.vip_services(), &HashMap::new(), Some(&views));
    let vip = shared[0]
        .vips
        .iter()
        .find(|v| v.is_ipv4())
        .copied()
        .unwrap();
    let backend = |view: u32| {
        let key = ServiceKeyOrd {
            vip,
            view,
            port: 443,
            protocol: dnsproxy_common::ip_proto::TCP,
        };
        p.services.get(&key).map(|b| {
            b.as_deref()
                .unwrap()
                .iter()
                .map(|b| crate::bpf::from_map_addr(&b.addr).to_string())
                .collect::<Vec<_>>()
        })
    };
    assert_eq!(backend(0), Some(vec!["192.0.2.10".to_owned()]));
    assert_eq!(backend(2), Some(vec!["192.0.2.20".to_owned()]));
    assert_eq!(backend(1), None, "a sees view 0's entry: its own");
    assert_eq!(backend(3), None);
}

/// A STATIC entry selecting `app: vm` in `vms`, and workloads in and out of it.
const SELECTED: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: vms, namespace: vms}
spec:
  hosts: [vm.example]
  addresses: [240.240.8.8]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  workloadSelector: {labels: {app: vm}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-1, namespace: vms}
spec: {address: 10.1.0.5, labels: {app: vm}, ports: {http: 8080}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: elsewhere, namespace: other}
spec: {address: 10.1.0.6, labels: {app: vm}}
---
apiVersion: v1
kind: Pod
metadata: {name: ready, namespace: vms, labels: {app: vm}}
status: {phase: Running, podIP: 10.2.0.7, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: starting, namespace: vms, labels: {app: vm}}
status: {phase: Running, podIP: 10.2.0.8, conditions: [{type: Ready, status: "False"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: unrelated, namespace: vms, labels: {app: web}}
status: {phase: Running, podIP: 10.2.0.9, conditions: [{type: Ready, status: "True"}]}
"#;

#[test]
fn workload_selector_backends_are_the_matching_workload_entries_and_ready_pods() {
    let t = build(SELECTED);
    let svc = &t.vip_services()[0];
    let got: Vec<(String, Option<u16>)> = svc
        .endpoints()
        .iter()
        .map(|e| (e.address.clone(), e.ports.get("http").copied()))
        .collect();
    assert_eq!(
        got,
        [
            ("10.1.0.5".to_owned(), Some(8080)),
            ("10.2.0.7".to_owned(), None)
        ]
    );
}

#[test]
fn only_pods_a_workload_selector_selects_are_read_ready_or_not() {
    let mut objects = Objects::default();
    parse_into(SELECTED, &mut objects).unwrap();
    let selectors = workload_selectors(&objects.service_entries);
    assert_eq!(selectors.len(), 1);
    let names: Vec<String> = selectable_pods(&objects.pods, &selectors)
        .into_iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    assert_eq!(names, ["ready", "starting"]);
    assert!(selectable_pods(&objects.pods, &[]).is_empty());
}

#[test]
fn a_change_rebuilds_only_its_shard_and_names_resolve_across_shards() {
    let objects = |yaml: &str| {
        let mut o = Objects::default();
        parse_into(yaml, &mut o).unwrap();
        o
    };
    let all = objects(
        r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: a}
spec: {clusterIP: 10.0.0.1}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: b, creationTimestamp: "2025-01-01T00:00:00Z"}
spec: {clusterIP: 10.0.0.2}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: a}
spec: {hosts: [ext.example], addresses: [240.241.0.1], resolution: STATIC, endpoints: [{address: 192.0.2.1}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: squat, namespace: c, creationTimestamp: "2024-01-01T00:00:00Z"}
spec: {hosts: [db.b.svc.cluster.local], addresses: [240.241.0.9], resolution: STATIC}
"#,
    );
    let t = build_with(&all, &mut Assignment::local(VipAllocator::in_memory()));
    assert_eq!(v4s(t.get("web.a.svc.cluster.local").unwrap()), ["10.0.0.1"]);
    assert_eq!(v4s(t.get("ext.example").unwrap()), ["240.241.0.1"]);
    // An older entry of namespace c naming b's Service: refused, the Service answers.
    assert_eq!(v4s(t.get("db.b.svc.cluster.local").unwrap()), ["10.0.0.2"]);
    assert_eq!(t.refused()[0].reason, addresses::Reason::ClusterName);
    assert_eq!(
        t.reverse("10.0.0.2".parse().unwrap(), "default"),
        Some("db.b.svc.cluster.local")
    );
    let mut names: Vec<&str> = t.service_namespaces().collect();
    names.sort_unstable();
    assert_eq!(names, ["a", "b"]);

    // Namespace a's Service changes: its shard only is built again.
    let changed = objects(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: a}\nspec: {clusterIP: 10.0.0.7}\n",
    );
    let t2 = t.with_namespace("a", &changed.services, &[]);
    assert_eq!(
        v4s(t2.get("web.a.svc.cluster.local").unwrap()),
        ["10.0.0.7"]
    );
    assert!(
        Arc::ptr_eq(t.entries(), t2.entries()),
        "the entries' shard is shared"
    );
    assert!(
        Arc::ptr_eq(&t.services["b"], &t2.services["b"]),
        "namespace b's shard is shared"
    );
    // Its last Service goes: so does its shard.
    let t3 = t2.with_namespace("a", &[], &[]);
    assert!(t3.get("web.a.svc.cluster.local").is_none());
    assert_eq!(t3.service_namespaces().count(), 1);
    // The entries change: the namespaces' shards are shared.
    let t4 = t3.with_entries(&Objects::default(), &Allocation::new());
    assert!(t4.get("ext.example").is_none());
    assert_eq!(v4s(t4.get("db.b.svc.cluster.local").unwrap()), ["10.0.0.2"]);
    assert!(Arc::ptr_eq(&t3.services["b"], &t4.services["b"]));
}

/// shop's Service, and entries of evil's and of team-a's declaring what is not theirs.
const SQUATTERS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.40.40, ports: [{port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: takeover, namespace: evil, creationTimestamp: "2020-01-01T00:00:00Z"}
spec: {hosts: [shop.evil.example], addresses: [10.96.40.40], exportTo: ["."], resolution: STATIC, endpoints: [{address: 203.0.113.66}], ports: [{number: 80, name: http, protocol: HTTP}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: metadata, namespace: evil, creationTimestamp: "2020-01-01T00:00:00Z"}
spec: {hosts: [md.evil.example], addresses: [169.254.169.254, 127.0.0.1, 224.0.0.1, "fe80::1"], resolution: STATIC, endpoints: [{address: 203.0.113.66}], ports: [{number: 80, name: http, protocol: HTTP}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: team-a, creationTimestamp: "2021-01-01T00:00:00Z"}
spec: {hosts: [db.team-a.example], addresses: [192.0.2.80], resolution: STATIC, endpoints: [{address: 198.51.100.1}], ports: [{number: 5432, name: pg, protocol: TCP}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db-too, namespace: evil, creationTimestamp: "2022-01-01T00:00:00Z"}
spec: {hosts: [db.evil.example], addresses: [192.0.2.80, 192.0.2.81], resolution: STATIC, endpoints: [{address: 203.0.113.66}], ports: [{number: 5432, name: pg, protocol: TCP}]}
"#;

#[test]
fn declared_addresses_that_are_someone_elses_are_refused_never_merged() {
    use super::addresses::Reason;
    let t = build(SQUATTERS);
    let refused: Vec<(String, String, Reason)> = t
        .refused()
        .iter()
        .map(|r| {
            let address = r.address.map(|a| a.to_string()).unwrap_or_default();
            (r.host.to_string(), address, r.reason)
        })
        .collect();
    for want in [
        ("shop.evil.example", "10.96.40.40", Reason::ClusterIp),
        ("md.evil.example", "169.254.169.254", Reason::LinkLocal),
        ("md.evil.example", "127.0.0.1", Reason::Loopback),
        ("md.evil.example", "224.0.0.1", Reason::Multicast),
        ("md.evil.example", "fe80::1", Reason::LinkLocal),
        ("db.evil.example", "192.0.2.80", Reason::Claimed),
    ] {
        let want = (want.0.to_owned(), want.1.to_owned(), want.2);
        assert!(refused.contains(&want), "{want:?} in {refused:?}");
    }
    assert_eq!(refused.len(), 6, "{refused:?}");
    let claimed = t
        .refused()
        .iter()
        .find(|r| r.reason == Reason::Claimed)
        .unwrap();
    assert_eq!(claimed.holder.as_deref(), Some("ServiceEntry team-a/db"));
    // Nothing of theirs translates, and the loser keeps only its own address.
    let mut translated: Vec<String> = t
        .vip_services()
        .iter()
        .flat_map(|s| s.vips.iter().map(|v| format!("{} {v}", s.host)))
        .collect();
    translated.sort();
    assert_eq!(
        translated,
        ["db.evil.example 192.0.2.81", "db.team-a.example 192.0.2.80"],
        "{translated:?}"
    );
    assert!(t.get_for("shop.evil.example", "evil").is_none());
    assert!(t.get_for("md.evil.example", "evil").is_none());
    assert_eq!(
        v4s(t.get_for("db.evil.example", "evil").unwrap()),
        ["192.0.2.81"]
    );
    // The Service keeps its ClusterIP for everyone.
    assert_eq!(
        v4s(t.get_for("web.shop.svc.cluster.local", "shop").unwrap()),
        ["10.96.40.40"]
    );
}

#[test]
fn declared_address_blocks_restrict_further() {
    use super::addresses::{AddressPolicy, Reason};
    let mut objects = Objects::default();
    parse_into(SQUATTERS, &mut objects).unwrap();
    let cfg = TableConfig {
        addresses: AddressPolicy {
            allowed: vec!["192.0.2.80/31".parse().unwrap()],
            cluster: vec!["192.0.2.81/32".parse().unwrap()],
        },
        ..TableConfig::default()
    };
    let t = build_cfg(&objects, &cfg);
    let reasons: Vec<(String, Reason)> = t
        .refused()
        .iter()
        .map(|r| {
            (
                r.address.map(|a| a.to_string()).unwrap_or_default(),
                r.reason,
            )
        })
        .collect();
    assert!(
        reasons.contains(&("192.0.2.81".into(), Reason::ClusterCidr)),
        "{reasons:?}"
    );
    assert!(
        t.get_for("db.evil.example", "evil").is_none(),
        "nothing left"
    );
    assert_eq!(
        v4s(t.get_for("db.team-a.example", "team-a").unwrap()),
        ["192.0.2.80"]
    );
}

/// Squatters under the cluster domain: an older entry of evil's naming shop's Service,
/// a wildcard over every Service name, shop's own older entry for its own Service's
/// name, and a private entry whose VIP a PTR sweep would find.
const NAME_SQUATTERS: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: squat, namespace: evil, creationTimestamp: "2020-01-01T00:00:00Z"}
spec: {hosts: [web.shop.svc.cluster.local, "*.svc.cluster.local", api.evil.svc.cluster.local], addresses: [192.0.2.66], resolution: STATIC, endpoints: [{address: 203.0.113.66}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: own, namespace: shop, creationTimestamp: "2020-01-01T00:00:00Z"}
spec: {hosts: [web.shop.svc.cluster.local], addresses: [192.0.2.67], resolution: STATIC, endpoints: [{address: 203.0.113.67}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: private, namespace: evil}
spec: {hosts: [secret.evil.example], addresses: [192.0.2.68], exportTo: ["."], resolution: STATIC, endpoints: [{address: 203.0.113.68}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, creationTimestamp: "2024-01-01T00:00:00Z"}
spec: {clusterIP: 10.96.50.50, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {clusterIP: None, ports: [{port: 5432}]}
"#;

#[test]
fn names_under_the_cluster_domain_are_the_services_and_ptr_follows_export_to() {
    use super::addresses::Reason;
    let t = build(NAME_SQUATTERS);
    let refused = refused_hosts(&t);
    assert_eq!(
        refused,
        [
            ("web.shop.svc.cluster.local".to_owned(), Reason::ClusterName),
            ("*.svc.cluster.local".to_owned(), Reason::ClusterName),
        ],
        "evil may name only its own namespace's names"
    );
    // The Service wins its name for everyone, its own namespace's older entry included.
    for ns in ["shop", "evil", "default"] {
        let h = t.get_for("web.shop.svc.cluster.local", ns).unwrap();
        assert_eq!(v4s(h), ["10.96.50.50"], "{ns}");
        assert!(h.is_kubernetes_service());
    }
    // No wildcard answers below svc.cluster.local: a headless Service without ready
    // endpoints, a name nobody defined.
    for name in [
        "db.shop.svc.cluster.local",
        "db-0.db.shop.svc.cluster.local",
        "nope.shop.svc.cluster.local",
    ] {
        assert!(t.resolve(name, "shop", &[]).is_none(), "{name}");
    }
    // An entry may name its own namespace's names.
    assert_eq!(
        v4s(t.get_for("api.evil.svc.cluster.local", "evil").unwrap()),
        ["192.0.2.66"]
    );
    // PTR: a private entry's VIP is named only to its own namespace.
    let vip = "192.0.2.68".parse().unwrap();
    assert_eq!(t.reverse(vip, "evil"), Some("secret.evil.example"));
    assert_eq!(t.reverse(vip, "shop"), None);
    assert_eq!(
        t.reverse("10.96.50.50".parse().unwrap(), "evil"),
        Some("web.shop.svc.cluster.local")
    );
}

#[test]
fn default_export_to_hides_what_says_nothing_as_the_mesh_setting_does() {
    let mut objects = Objects::default();
    parse_into(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: quiet, namespace: team-a}\n\
         spec: {hosts: [quiet.example], addresses: [192.0.2.1], resolution: STATIC, endpoints: [{address: 198.51.100.1}]}\n\
         ---\n\
         apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: loud, namespace: team-a}\n\
         spec: {hosts: [loud.example], addresses: [192.0.2.2], exportTo: [\"*\"], resolution: STATIC, endpoints: [{address: 198.51.100.2}]}\n\
         ---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: team-a}\nspec: {clusterIP: 10.0.0.1}\n",
        &mut objects,
    )
    .unwrap();
    let cfg = TableConfig {
        default_export_to: vec![".".into()],
        ..TableConfig::default()
    };
    let t = build_cfg(&objects, &cfg);
    assert!(t.get_for("quiet.example", "team-a").is_some());
    assert!(
        t.get_for("quiet.example", "team-b").is_none(),
        "nothing said: its own namespace only"
    );
    assert!(
        t.get_for("loud.example", "team-b").is_some(),
        "`*` said: everyone"
    );
    assert!(
        t.get_for("web.team-a.svc.cluster.local", "team-b")
            .is_none()
    );
    assert!(
        t.get_for("web.team-a.svc.cluster.local", "team-a")
            .is_some()
    );
    // The default: everyone.
    let t = build_cfg(&objects, &TableConfig::default());
    assert!(t.get_for("quiet.example", "team-b").is_some());
}

#[test]
fn a_namespace_past_its_quota_gets_no_more_hosts_or_vips_and_the_oldest_stay() {
    use super::addresses::Reason;
    use crate::registry::quota::OverQuota;
    let mut objects = Objects::default();
    parse_into(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: new, namespace: greedy, creationTimestamp: \"2025-01-01T00:00:00Z\"}\n\
         spec: {hosts: [n1.example, n2.example, n3.example], resolution: STATIC, endpoints: [{address: 198.51.100.1}]}\n\
         ---\n\
         apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: old, namespace: greedy, creationTimestamp: \"2020-01-01T00:00:00Z\"}\n\
         spec: {hosts: [o1.example], resolution: STATIC, endpoints: [{address: 198.51.100.1}]}\n\
         ---\n\
         apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: modest, namespace: team-a, creationTimestamp: \"2025-06-01T00:00:00Z\"}\n\
         spec: {hosts: [a1.example, a2.example], resolution: STATIC, endpoints: [{address: 198.51.100.1}]}\n",
        &mut objects,
    )
    .unwrap();
    let demand = Demand::within(&objects, 2);
    let wanted: Vec<&str> = demand.wanted.iter().map(String::as_str).collect();
    assert_eq!(
        wanted,
        ["a1.example", "a2.example", "n1.example", "o1.example"]
    );
    let cfg = TableConfig {
        max_hosts_per_namespace: 2,
        ..TableConfig::default()
    };
    let t = build_cfg(&objects, &cfg);
    for host in ["o1.example", "n1.example", "a1.example", "a2.example"] {
        assert!(t.get(host).is_some(), "{host}");
    }
    let refused = refused_hosts(&t);
    assert_eq!(
        refused,
        [
            ("n2.example".to_owned(), Reason::Quota),
            ("n3.example".to_owned(), Reason::Quota)
        ]
    );
    assert!(t.get("n2.example").is_none());
    assert!(
        !OverQuota::of(&objects, 0).contains(0, "n3.example"),
        "0: no bound"
    );
}

#[test]
fn no_such_cluster_name_only_where_no_service_can_be_and_only_from_every_service() {
    let mut objects = Objects::default();
    parse_into(
        r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.7.7}
---
apiVersion: v1
kind: Service
metadata: {name: peers, namespace: shop}
spec: {clusterIP: None}
---
apiVersion: v1
kind: Service
metadata: {name: Hidden, namespace: shop, annotations: {networking.istio.io/exportTo: shop}}
spec: {clusterIP: 10.96.7.8}
",
        &mut objects,
    )
    .unwrap();
    let every = TableConfig {
        every_service: true,
        ..TableConfig::default()
    };
    let t = build_cfg(&objects, &every);
    for name in [
        "nope.shop.svc.cluster.local",
        "_dns._udp.nope.shop.svc.cluster.local",
        "web.empty.svc.cluster.local",
        "api.example.org.shop.svc.cluster.local",
        // The third step of a Kubernetes search list.
        "api.example.org.cluster.local",
        "nope.shop.cluster.local",
    ] {
        assert!(t.no_such_cluster_name(name), "{name}");
    }
    for name in [
        "web.shop.svc.cluster.local",
        "_http._tcp.web.shop.svc.cluster.local",
        // A headless Service without ready endpoints exists all the same.
        "peers.shop.svc.cluster.local",
        "peers-0.peers.shop.svc.cluster.local",
        // Whoever may see it, it exists: those who may not are forwarded as before.
        "hidden.shop.svc.cluster.local",
        "shop.svc.cluster.local",
        "svc.cluster.local",
        "cluster.local",
        // The cluster DNS's own pod names.
        "10-0-0-1.shop.pod.cluster.local",
        "example.org",
    ] {
        assert!(!t.no_such_cluster_name(name), "{name}");
    }
    assert!(
        !build_cfg(&objects, &TableConfig::default())
            .no_such_cluster_name("nope.shop.svc.cluster.local")
    );
    assert!(!NameTable::empty(&every).no_such_cluster_name("nope.shop.svc.cluster.local"));
}
