//! `vsock_config`: the `outboard vsock` configuration parsers in
//! `vmm-glue/src/vsock_cli.rs`: the `--vm key=value,...` spec (`parse_vm_spec`) and the
//! YAML-subset config file (`parse_config`), both fed the same fuzzed text.
//!
//! Asserts: nothing panics; every VM either parser accepts is valid (CID in
//! 3..u32::MAX, queue size a power of two up to 32768, TX buffer size in
//! 1..=MAX_TX_BUF_SIZE, at least one group, each 1..=64 of `[A-Za-z0-9_-]`); and a VM
//! accepted from either parser, written back as a `--vm` spec, parses to the same VM
//! (when its paths can be written in that syntax at all: no `,`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use outboard_devices::vsock::MAX_TX_BUF_SIZE;
use outboard_glue::vsock_cli::{parse_config, parse_vm_spec, VmConfig};

fn check(vm: &VmConfig) {
    assert!((3..u64::from(u32::MAX)).contains(&vm.guest_cid), "{vm:?}");
    assert!(
        vm.queue_size.is_power_of_two() && vm.queue_size <= 32768,
        "{vm:?}"
    );
    assert!((1..=MAX_TX_BUF_SIZE).contains(&vm.tx_buffer_size), "{vm:?}");
    assert!(!vm.groups.is_empty(), "{vm:?}");
    for g in &vm.groups {
        assert!(
            !g.is_empty()
                && g.len() <= 64
                && g.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-'),
            "{vm:?}"
        );
    }
    let (Some(socket), Some(uds)) = (vm.socket.to_str(), vm.uds_path.to_str()) else {
        return;
    };
    if socket.contains(',') || uds.contains(',') {
        return;
    }
    let spec = format!(
        "guest-cid={},socket={socket},uds-path={uds},tx-buffer-size={},queue-size={},groups={}",
        vm.guest_cid,
        vm.tx_buffer_size,
        vm.queue_size,
        vm.groups.join("+")
    );
    let back = parse_vm_spec(&spec).unwrap_or_else(|e| panic!("{spec:?} does not parse back: {e}"));
    assert_eq!(&back, vm, "{spec:?}");
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(vm) = parse_vm_spec(text) {
        check(&vm);
    }
    if let Ok(vms) = parse_config(text) {
        assert!(!vms.is_empty());
        for vm in &vms {
            check(vm);
        }
    }
});
