//! Manifests, from arbitrary YAML documents to the name table: never a panic, and
//! never one VIP for two hosts.
#![no_main]
use std::collections::HashMap;

use dnsproxy::{
    registry::{
        TableConfig,
        manifest::{Objects, parse_into},
        table::NameTable,
    },
    vip::assign::{Assignment, Demand, VipAllocator},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut objects = Objects::default();
    if parse_into(text, &mut objects).is_err() {
        return;
    }
    let mut assignment = Assignment::local(VipAllocator::in_memory());
    let vips = assignment.allocate(&Demand::of(&objects));
    let table = NameTable::build(&objects, &vips, &TableConfig::default());
    let mut owners: HashMap<std::net::IpAddr, (&str, String)> = HashMap::new();
    for service in table.vip_services() {
        for vip in &service.vips {
            let source = service.owner.source();
            if let Some((host, other)) = owners.insert(*vip, (&service.host, source.clone())) {
                // Two entries may declare one address for one host; two hosts never share.
                assert!(
                    host == &*service.host || other != source,
                    "{vip} given to {host} and {}",
                    service.host
                );
            }
        }
    }
});
