//! Guest-to-guest vsock between sibling devices: two simulated guests, each with its
//! own device, linked as one group; a third device outside the group. Every test runs
//! with the devices linked in one process (`VsockSibling::link`) and through a socket
//! pair as devices in two processes are (`Vsock::link_sibling_socket`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use outboard_devices::vsock::sibling_socket_pair;
use outboard_protocol::vsock::{VsockHeader, VsockOp, VsockType};
use outboard_tests::{temp_dir, Guest, GuestOptions, GuestState, Key, Pattern, Sink};

const T: Duration = Duration::from_secs(5);

fn guest(cid: u64, opts: GuestOptions) -> Guest {
    let dir = temp_dir(&format!("sibling-{cid}"));
    Guest::new(
        &dir.join("v.sock"),
        GuestOptions {
            guest_cid: cid,
            ..opts
        },
    )
}

/// How two sibling devices are linked.
#[derive(Debug, Clone, Copy)]
enum Link {
    /// In one process.
    Local,
    /// Through a `SOCK_SEQPACKET` pair, as in two processes.
    Socket,
}

fn link(a: &mut Guest, b: &mut Guest, how: Link) {
    match how {
        Link::Local => a.dev.sibling().link(&b.dev.sibling()).unwrap(),
        Link::Socket => {
            let (x, y) = sibling_socket_pair().unwrap();
            let (ca, cb) = (a.dev.guest_cid(), b.dev.guest_cid());
            a.dev.link_sibling_socket(cb, x).unwrap();
            b.dev.link_sibling_socket(ca, y).unwrap();
        }
    }
}

/// Pumps both guests until `cond` holds; false after `T`.
fn pump2(a: &mut Guest, b: &mut Guest, mut cond: impl FnMut(&Guest, &Guest) -> bool) -> bool {
    let end = Instant::now() + T;
    while !cond(a, b) {
        if Instant::now() >= end {
            return false;
        }
        a.pump(Duration::ZERO);
        b.pump(Duration::from_millis(1));
    }
    true
}

/// Guest 3 connects to guest 4 and keys the connection on both sides.
fn connected(a: &mut Guest, b: &mut Guest, port: u32) -> (Key, Key) {
    let ka = a.connect_cid(4, port, VsockType::Stream);
    assert!(
        pump2(a, b, |a, _| a.conns[&ka].state == GuestState::Established),
        "sibling connection not established: {:?}",
        a.conns[&ka].state
    );
    let kb = *b.conns.keys().find(|k| k.0 == port).unwrap();
    assert_eq!(b.conns[&kb].peer_cid, 3);
    (ka, kb)
}

/// Two guests in one group move 8 MiB each way at once on one connection, checksummed
/// on arrival; a third guest outside the group gets RST; the host still serves.
#[test]
fn siblings_exchange_data_both_ways_and_outsiders_get_rst() {
    exchange_data_both_ways_and_outsiders_get_rst(Link::Local);
}

#[test]
fn siblings_in_two_processes_exchange_data_both_ways_and_outsiders_get_rst() {
    exchange_data_both_ways_and_outsiders_get_rst(Link::Socket);
}

fn exchange_data_both_ways_and_outsiders_get_rst(how: Link) {
    let mut a = guest(3, GuestOptions::default());
    let mut b = guest(4, GuestOptions::default());
    let mut c = guest(5, GuestOptions::default());
    link(&mut a, &mut b, how);
    assert!(a.dev.sibling().link(&a.dev.sibling()).is_err());
    let (x, _) = sibling_socket_pair().unwrap();
    assert!(a.dev.link_sibling_socket(3, x).is_err());

    const TOTAL: u64 = 8 << 20;
    let (seed_ab, seed_ba) = (31, 32);
    b.listen_verify(7000, seed_ab);
    let (ka, kb) = connected(&mut a, &mut b, 7000);
    a.conns.get_mut(&ka).unwrap().sink = Sink::Verify { seed: seed_ba };
    let (mut sent_a, mut sent_b) = (0u64, 0u64);
    let start = Instant::now();
    loop {
        a.queue_stream(
            ka,
            TOTAL,
            64 * 1024,
            |p, buf| Pattern::get().fill(seed_ab, p, buf),
            &mut sent_a,
        );
        a.kick_tx();
        b.queue_stream(
            kb,
            TOTAL,
            4096,
            |p, buf| Pattern::get().fill(seed_ba, p, buf),
            &mut sent_b,
        );
        b.kick_tx();
        for (g, k) in [(&a, ka), (&b, kb)] {
            let conn = &g.conns[&k];
            assert_eq!(conn.state, GuestState::Established);
            assert_eq!(conn.corrupt, 0, "corrupt data");
            assert_eq!(conn.overruns, 0, "credit overrun");
        }
        if sent_a == TOTAL
            && sent_b == TOTAL
            && a.conns[&ka].received == TOTAL
            && b.conns[&kb].received == TOTAL
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(8),
            "stalled: a sent {sent_a}, got {}; b sent {sent_b}, got {}",
            a.conns[&ka].received,
            b.conns[&kb].received
        );
        a.pump(Duration::ZERO);
        b.pump(Duration::ZERO);
    }
    // The guests' credit fields went end to end: the packets they received carried the
    // other guest's buffer size, not the device's TX buffer.
    assert_eq!(a.conns[&ka].peer_buf_alloc, b.conns[&kb].buf_alloc);
    assert!(a.dev.metrics().snapshot().sibling_packets > 0);
    assert!(b.dev.metrics().snapshot().sibling_packets > 0);
    for g in [&a, &b] {
        let m = g.dev.metrics().snapshot();
        assert_eq!(
            (m.err_sibling_invalid, m.err_sibling_overrun),
            (0, 0),
            "{m:?}"
        );
    }

    // Closing: an RST reaches the other guest.
    a.send_ctrl(ka, VsockType::Stream, VsockOp::Rst, 0);
    assert!(pump2(&mut a, &mut b, |_, b| b.conns[&kb].state
        == GuestState::Reset));

    // Guest 5 is in no group with 4: RST from CID 4, at once.
    let kc = c.connect_cid(4, 7000, VsockType::Stream);
    assert!(c.pump_until(T, |c| c.conns[&kc].state == GuestState::Reset));
    assert_eq!(c.dev.metrics().snapshot().err_tx_bad_cid, 1);
    assert!(b.conns.keys().all(|k| k.0 == 7000));
    // Nor can 3 reach 5.
    let k = a.connect_cid(5, 7001, VsockType::Stream);
    assert!(a.pump_until(T, |a| a.conns[&k].state == GuestState::Reset));
}

/// A guest that sends beyond the credit its sibling announced is reset on both sides;
/// a new connection between the two works afterwards.
#[test]
fn sibling_flooding_beyond_credit_is_reset() {
    flooding_beyond_credit_is_reset(Link::Local);
}

#[test]
fn sibling_in_another_process_flooding_beyond_credit_is_reset() {
    flooding_beyond_credit_is_reset(Link::Socket);
}

fn flooding_beyond_credit_is_reset(how: Link) {
    let small = GuestOptions {
        buf_alloc: 8192,
        ..GuestOptions::default()
    };
    let mut a = guest(3, GuestOptions::default());
    let mut b = guest(4, small);
    link(&mut a, &mut b, how);
    b.listen(7100);
    let (ka, kb) = connected(&mut a, &mut b, 7100);
    b.conns.get_mut(&kb).unwrap().auto_consume = false;
    assert_eq!(a.conns[&ka].peer_buf_alloc, 8192);
    let chunk = [0x5a; 4096];
    for _ in 0..3 {
        // Straight onto the ring: the third packet is beyond b's 8 KiB.
        let hdr = VsockHeader {
            src_cid: 3,
            dst_cid: 4,
            src_port: ka.0,
            dst_port: ka.1,
            len: chunk.len() as u32,
            type_: VsockType::Stream as u16,
            op: VsockOp::Rw as u16,
            flags: 0,
            buf_alloc: 256 * 1024,
            fwd_cnt: 0,
        };
        assert!(a.queue_packet(&hdr, &chunk));
    }
    a.kick_tx();
    assert!(pump2(&mut a, &mut b, |a, b| {
        a.conns[&ka].state == GuestState::Reset && b.conns[&kb].state == GuestState::Reset
    }));
    assert_eq!(b.conns[&kb].received, 8192, "b got what its credit allowed");
    assert_eq!(a.dev.metrics().snapshot().err_sibling_overrun, 1);

    b.listen(7101);
    let (ka, kb) = connected(&mut a, &mut b, 7101);
    b.conns.get_mut(&kb).unwrap().sink = Sink::Keep;
    a.queue_stream(ka, 100, 100, |_, buf| buf.fill(7), &mut 0);
    a.kick_tx();
    assert!(pump2(&mut a, &mut b, |_, b| b.conns[&kb].data.len() == 100));
}
