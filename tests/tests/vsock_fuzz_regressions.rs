//! Findings of the fuzz targets in `fuzz/` (`cargo xtask fuzz`), kept as stable tests.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use outboard_devices::vsock::Vsock;
use outboard_tests::{temp_dir, Guest, GuestOptions, Watchdog};

/// `fuzz/vsock_queue` (a timeout): RX buffers with room for a header and none for
/// payload while a host connection has stream data. `Muxer::gather_rx` un-pops the
/// chain (no payload room), `read_stream` reports the queue starved,
/// `enable_notification` sees the un-popped chain as new work, and `Vsock::fill_rx`
/// goes round its loop forever: a guest can pin the device's thread at 100% CPU. With
/// such buffers the loop starts as soon as the connection is set up.
///
/// Fixed: `Vsock::fill_rx` goes round again only after a pass that used a buffer (or
/// once, right after enabling notifications); the data waits for a usable buffer, the
/// header-only ones stay available for control packets.
#[test]
fn header_only_rx_buffers_with_host_data_do_not_spin() {
    let dir = temp_dir("fuzz-rx-header-only");
    let uds = dir.join("v.sock");
    let opts = GuestOptions {
        rx_buf_payload: 0,
        ..GuestOptions::default()
    };
    let _dog = Watchdog::arm(
        "a device pass over header-only RX buffers",
        Duration::from_secs(10),
    );
    let mut g = Guest::new(&uds, opts);
    g.listen(4000);
    let mut host = UnixStream::connect(&uds).unwrap();
    host.write_all(b"CONNECT 4000\n").unwrap();
    assert!(g.pump_until(Duration::from_secs(5), |g| !g.conns.is_empty()));
    host.write_all(b"data for a guest that left no room for it")
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    g.device(Vsock::handle_backend_event);
    g.device(Vsock::handle_rx_kick);
}
