//! The handoff's wire messages as a successor reads them from whatever listens on the
//! socket: a description of any bytes, then descriptors that never come. Whatever the
//! bytes, the reader refuses them with an error (never a panic, never an allocation
//! sized by the peer's word) and takes no descriptor it was not sent.
#![no_main]
use std::{io::Write as _, os::unix::net::UnixStream};

use dnsproxy::handoff::{parse_description, wire};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Within one socket buffer, so the write completes before the read starts.
    let data = &data[..data.len().min(100_000)];
    let (mut ours, mut theirs) = UnixStream::pair().expect("socketpair");
    theirs.write_all(data).expect("write");
    drop(theirs);
    let received = wire::receive(&mut ours, parse_description);
    // At least the lock and the admin listeners are announced, and no descriptor was
    // sent: a complete handoff cannot come out of bytes alone.
    assert!(received.is_err(), "a handoff without descriptors: {received:?}");
});
