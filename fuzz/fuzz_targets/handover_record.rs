//! `handover_record`: the vsock handover record a new `outboard vsock --take-over`
//! reads (`Vsock::take_over`, `devices/src/vsock/device/handover.rs` and the muxer's
//! and connections' parts) from a process it must not trust blindly: a newer or older
//! build, or a damaged one.
//!
//! Input: the record's bytes. The fds that come with it are eight socket pairs' ends
//! (stream and seqpacket), enough for every seed; a record that names more is refused.
//!
//! Asserts: nothing panics; a device that is taken over hands itself over again (the
//! record it writes is read back the same way) with the same connections.
#![no_main]

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;
use outboard_devices::vsock::{Vsock, VsockDeviceConfig, VsockHandover};

fn fds() -> Vec<OwnedFd> {
    let mut v = Vec::new();
    for _ in 0..8 {
        let (a, b) = UnixStream::pair().unwrap();
        v.push(OwnedFd::from(a));
        v.push(OwnedFd::from(b));
    }
    v
}

fn config() -> VsockDeviceConfig {
    // Nothing is bound by a take-over: the path only names the host side.
    let mut c = VsockDeviceConfig::new(3, "/nonexistent/outboard-fuzz.vsock");
    c.max_connections = 64;
    c
}

fuzz_target!(|data: &[u8]| {
    let Ok(dev) = Vsock::take_over(
        config(),
        VsockHandover {
            record: data.to_vec(),
            fds: fds().into_iter().take(16).collect(),
        },
    ) else {
        return;
    };
    let conns = dev.connection_count();
    let again = dev.handover().expect("a device taken over hands itself over");
    let back = Vsock::take_over(config(), again).expect("its own record is read back");
    assert_eq!(back.connection_count(), conns);
});
