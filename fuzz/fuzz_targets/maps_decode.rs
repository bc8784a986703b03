//! The decoding `dnsproxy maps` applies to a `dp_services` entry, on arbitrary bytes
//! as the kernel could hold them.
#![no_main]
use dnsproxy::bpf::pinned::ServiceDump;
use dnsproxy_common::{ServiceKey, ServiceValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (k, v) = (size_of::<ServiceKey>(), size_of::<ServiceValue>());
    if data.len() < k + v {
        return;
    }
    // SAFETY: both are plain-old-data map types (every bit pattern is a value); the
    // reads are unaligned and within `data`.
    let (key, value) = unsafe {
        (
            data.as_ptr().cast::<ServiceKey>().read_unaligned(),
            data[k..].as_ptr().cast::<ServiceValue>().read_unaligned(),
        )
    };
    let dump = ServiceDump::decode(&key, &value);
    assert!(dump.backends.len() <= value.backends.len());
    let _ = format!(
        "{} {} {} {:?}",
        dump.vip, dump.port, dump.protocol, dump.backends
    );
});
