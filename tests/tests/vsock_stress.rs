//! 16 concurrent connections moving 64 MiB each, both directions at once, every byte
//! checked, none lost or reordered.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use outboard_tests::{run_streams, temp_dir, Direction, Guest, GuestOptions};

#[test]
fn sixteen_connections_64_mib_each_both_directions() {
    let dir = temp_dir("stress");
    let uds = dir.join("v.sock");
    let opts = GuestOptions {
        rx_buf_payload: 64 * 1024,
        ..GuestOptions::default()
    };
    let mut g = Guest::new(&uds, opts);
    let took = run_streams(&mut g, 16, 64 << 20, 64 * 1024, Direction::Both);
    eprintln!("16 x 64 MiB each way in {took:?}");
    let m = g.dev.metrics().snapshot();
    assert_eq!(m.tx_bytes, 16 * (64 << 20));
    assert!(m.rx_bytes >= 16 * (64 << 20));
    assert_eq!(m.conns_added, 16);
    assert_eq!(m.conns_removed, 16);
    assert_eq!(m.conns_killed, 0);
    assert_eq!(m.err_credit_overrun + m.err_host_io + m.err_queue, 0);
    assert_eq!(g.dev.connection_count(), 0);
    assert_eq!(g.bad_packets, 0);
}

/// The same with Linux's 4 KiB receive buffers and smaller packets, less data, and
/// receive buffers of two descriptors that split the header.
#[test]
fn small_buffers_many_connections() {
    let dir = temp_dir("stress4k");
    let uds = dir.join("v.sock");
    let opts = GuestOptions {
        rx_split: true,
        ..GuestOptions::default()
    };
    let mut g = Guest::new(&uds, opts);
    run_streams(&mut g, 16, 4 << 20, 4096, Direction::Both);
    assert_eq!(g.dev.connection_count(), 0);
    assert_eq!(g.bad_packets, 0);
}
