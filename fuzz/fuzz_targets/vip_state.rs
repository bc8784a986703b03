//! The VIP state file loader: a whole file either parses into slots in range that no
//! two hosts share, or is salvaged line by line into the same.
#![no_main]
use std::collections::HashSet;

use dnsproxy::vip::assign::state_file::{parse, salvage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let salvaged = salvage(text);
    let unique: HashSet<u32> = salvaged.values().copied().collect();
    assert_eq!(
        unique.len(),
        salvaged.len(),
        "salvage gave one slot to two hosts"
    );
    if let Ok(hosts) = parse(text) {
        let unique: HashSet<u32> = hosts.values().copied().collect();
        assert_eq!(
            unique.len(),
            hosts.len(),
            "parse gave one slot to two hosts"
        );
        assert!(
            hosts.values().all(|s| *s >= 1),
            "slot 0 is never handed out"
        );
    }
});
