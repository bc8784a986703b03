//! The query handler, over UDP (with the fast path) and TCP, on arbitrary bytes, with
//! an upstream whose replies the fuzzer chooses too.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| dnsproxy_fuzz::run_handler(data));
