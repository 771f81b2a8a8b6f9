//! `vsock_config`: the `outboard vsock` configuration parsers in
//! `vmm-glue/src/vsock_cli.rs`: the `--vm key=value,...` spec (`parse_vm_spec`) and the
//! YAML-subset config file (`parse_config`), both fed the same fuzzed text.
//!
//! Asserts: nothing panics; every VM either parser accepts is valid (CID in
//! 3..u32::MAX, queue size a power of two up to 32768, TX buffer size in
//! 1..=MAX_TX_BUF_SIZE, at least one group, each 1..=64 of `[A-Za-z0-9_-]`; a forward
//! CID and distinct ports that are not the wildcard, at most 64); and a VM
//! accepted from either parser, written back as a `--vm` spec, parses to the same VM
//! (when its paths can be written in that syntax at all: no `,`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use outboard_devices::vsock::{VsockBackend, MAX_FORWARD_LISTEN_PORTS, MAX_TX_BUF_SIZE};
use outboard_vmm_glue::vsock_cli::{parse_config, parse_vm_spec, VmConfig};

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
    let host = match &vm.backend {
        VsockBackend::Unix(path) => match path.to_str() {
            Some(uds) if !uds.contains(',') => format!("uds-path={uds}"),
            _ => return,
        },
        VsockBackend::Vsock(f) => {
            assert!(f.cid != u32::MAX, "{vm:?}");
            assert!(f.listen_ports.len() <= MAX_FORWARD_LISTEN_PORTS, "{vm:?}");
            for (i, p) in f.listen_ports.iter().enumerate() {
                assert!(*p != u32::MAX && !f.listen_ports[..i].contains(p), "{vm:?}");
            }
            let ports: Vec<String> = f.listen_ports.iter().map(u32::to_string).collect();
            if ports.is_empty() {
                format!("forward-cid={}", f.cid)
            } else {
                format!("forward-cid={},forward-listen={}", f.cid, ports.join("+"))
            }
        }
    };
    let Some(socket) = vm.socket.to_str() else {
        return;
    };
    if socket.contains(',') {
        return;
    }
    let spec = format!(
        "guest-cid={},socket={socket},{host},tx-buffer-size={},queue-size={},groups={}",
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
