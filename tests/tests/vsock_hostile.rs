//! A hostile guest: malformed chains and packets, protocol violations and floods. Each
//! is handled (dropped or answered with RST, and counted), and the device keeps serving
//! a healthy connection throughout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use outboard_devices::vsock::Vsock;
use outboard_protocol::vsock::{VsockHeader, VsockOp, VsockType};
use outboard_tests::{
    temp_dir, Guest, GuestOptions, GuestState, Key, Watchdog, GUEST_CID, REGION_BOUNDARY,
};
use zerocopy::IntoBytes;

const T: Duration = Duration::from_secs(5);

fn hdr(src_port: u32, dst_port: u32, op: u16, len: u32) -> VsockHeader {
    VsockHeader {
        src_cid: GUEST_CID,
        dst_cid: 2,
        src_port,
        dst_port,
        len,
        type_: VsockType::Stream as u16,
        op,
        flags: 0,
        buf_alloc: 256 * 1024,
        fwd_cnt: 0,
    }
}

fn packet(h: &VsockHeader, payload: &[u8]) -> Vec<u8> {
    let mut v = h.as_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

struct Setup {
    g: Guest,
    key: Key,
    host: UnixStream,
    listener: UnixListener,
    round: u8,
}

impl Setup {
    fn new() -> Setup {
        let dir = temp_dir("hostile");
        let uds = dir.join("v.sock");
        let mut g = Guest::new(&uds, GuestOptions::default());
        let listener = UnixListener::bind(format!("{}_1", uds.display())).unwrap();
        let key = g.connect(1, VsockType::Stream);
        assert!(g.pump_until(T, |g| g.conns[&key].state == GuestState::Established));
        let (host, _) = listener.accept().unwrap();
        host.set_read_timeout(Some(T)).unwrap();
        Setup {
            g,
            key,
            host,
            listener,
            round: 0,
        }
    }

    /// The healthy connection still moves data both ways.
    fn healthy(&mut self) {
        self.round += 1;
        let msg = [self.round; 100];
        let c = &self.g.conns[&self.key];
        assert_eq!(c.state, GuestState::Established);
        let mut h = hdr(self.key.0, self.key.1, VsockOp::Rw as u16, 100);
        h.fwd_cnt = c.fwd_cnt.0;
        assert!(self.g.queue_packet(&h, &msg));
        self.g.kick_tx();
        let mut buf = [0u8; 100];
        self.host.read_exact(&mut buf).unwrap();
        assert_eq!(buf, msg);
        self.host.write_all(&msg).unwrap();
        let key = self.key;
        assert!(self.g.pump_until(T, |g| g.conns[&key].data.ends_with(&msg)));
        assert_eq!(self.g.bad_packets, 0);
    }

    fn metrics(&self) -> outboard_devices::vsock::VsockMetricsSnapshot {
        self.g.dev.metrics().snapshot()
    }

    fn expect_stray_rst(&mut self, key: Key) {
        assert!(
            self.g.pump_until(T, |g| g.stray_rsts.contains(&key)),
            "no RST for {key:?}"
        );
    }
}

#[test]
fn malformed_packets_are_refused_and_the_device_keeps_serving() {
    let mut s = Setup::new();
    s.healthy();

    // len above 64 KiB.
    let used =
        s.g.send_raw(&[(packet(&hdr(9001, 1, 5, 70_000), &[1; 10]), false)]);
    assert_eq!(used, 0);
    assert_eq!(s.metrics().err_tx_bad_len, 1);
    s.expect_stray_rst((9001, 1));
    s.healthy();

    // len beyond the chain.
    s.g.send_raw(&[(packet(&hdr(9002, 1, 5, 1000), &[1; 10]), false)]);
    assert_eq!(s.metrics().err_tx_bad_len, 2);
    s.expect_stray_rst((9002, 1));
    s.healthy();

    // The header in a write-only descriptor.
    s.g.send_raw(&[(packet(&hdr(9003, 1, 1, 0), &[]), true)]);
    assert_eq!(s.metrics().err_tx_write_only_header, 1);
    s.healthy();

    // A header shorter than 44 bytes.
    s.g.send_raw(&[(packet(&hdr(9004, 1, 1, 0), &[])[..43].to_vec(), false)]);
    assert_eq!(s.metrics().err_tx_short_header, 1);
    s.healthy();

    // A wrong source CID: dropped without an answer. A destination CID that is neither
    // the host nor a sibling: RST from that CID (an RST to it gets no answer).
    let mut h = hdr(9005, 1, 1, 0);
    h.src_cid = 99;
    s.g.send_raw(&[(packet(&h, &[]), false)]);
    let mut h = hdr(9006, 1, 1, 0);
    h.dst_cid = 7;
    s.g.send_raw(&[(packet(&h, &[]), false)]);
    let mut h = hdr(9099, 1, VsockOp::Rst as u16, 0);
    h.dst_cid = 7;
    s.g.send_raw(&[(packet(&h, &[]), false)]);
    assert_eq!(s.metrics().err_tx_bad_cid, 3);
    s.expect_stray_rst((9006, 1));
    s.healthy();
    assert!(!s.g.stray_rsts.iter().any(|k| k.0 == 9005 || k.0 == 9099));
    let i = s.g.stray_rsts.iter().position(|k| k.0 == 9006).unwrap();
    assert_eq!(
        s.g.stray_rst_cids[i], 7,
        "the RST comes from the CID addressed"
    );

    // Unknown op, unknown type, op INVALID: RST.
    s.g.send_raw(&[(packet(&hdr(9007, 1, 42, 0), &[]), false)]);
    let mut h = hdr(9008, 1, 1, 0);
    h.type_ = 9;
    s.g.send_raw(&[(packet(&h, &[]), false)]);
    s.expect_stray_rst((9007, 1));
    s.expect_stray_rst((9008, 1));
    assert_eq!(s.metrics().err_tx_invalid, 2);
    s.healthy();

    // RW, SHUTDOWN, RESPONSE for connections that do not exist: RST.
    for (port, op) in [
        (9009, VsockOp::Rw),
        (9010, VsockOp::Shutdown),
        (9011, VsockOp::Response),
    ] {
        let len = if op == VsockOp::Rw { 5 } else { 0 };
        s.g.send_raw(&[(
            packet(&hdr(port, 1, op as u16, len), &[0; 5][..len as usize]),
            false,
        )]);
        s.expect_stray_rst((port, 1));
    }
    assert_eq!(s.metrics().err_no_connection, 3);
    s.healthy();

    // A descriptor outside guest memory.
    let used = s.g.send_raw_descs(&[(0xffff_0000_0000, 44, false)]);
    assert_eq!(used, 0);
    assert_eq!(s.metrics().err_queue, 1);
    s.healthy();

    // A descriptor chain with a readable descriptor after a writable one.
    s.g.send_raw(&[
        (vec![0; 44], true),
        (packet(&hdr(9012, 1, 1, 0), &[]), false),
    ]);
    assert_eq!(s.metrics().err_queue, 2);
    s.healthy();

    assert_eq!(s.g.dev.connection_count(), 1);
}

#[test]
fn header_split_over_44_one_byte_descriptors() {
    let mut s = Setup::new();
    let key = s.key;
    let mut h = hdr(key.0, key.1, VsockOp::Rw as u16, 7);
    h.fwd_cnt = s.g.conns[&key].fwd_cnt.0;
    let mut descs: Vec<(Vec<u8>, bool)> = h.as_bytes().iter().map(|b| (vec![*b], false)).collect();
    descs.push((b"ab".to_vec(), false));
    descs.push((b"c".to_vec(), false));
    descs.push((b"defg".to_vec(), false));
    // Trailing bytes beyond `len` are ignored.
    descs.push((b"XYZ".to_vec(), false));
    s.g.send_raw(&descs);
    s.g.conns.get_mut(&key).unwrap().tx_cnt += std::num::Wrapping(7);
    let mut buf = [0u8; 7];
    s.host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"abcdefg");
    s.healthy();
}

#[test]
fn credit_overrun_resets_only_that_connection() {
    let mut s = Setup::new();
    let uds = s.g.uds_path.clone();
    let l2 = UnixListener::bind(format!("{}_2", uds.display())).unwrap();
    let k2 = s.g.connect(2, VsockType::Stream);
    assert!(s
        .g
        .pump_until(T, |g| g.conns[&k2].state == GuestState::Established));
    let (mut host2, _) = l2.accept().unwrap();
    // The guest ignores credit and sends 4 MiB while the host does not read.
    let chunk = vec![7u8; 64 * 1024];
    for _ in 0..64 {
        let h = hdr(k2.0, k2.1, VsockOp::Rw as u16, chunk.len() as u32);
        while !s.g.queue_packet(&h, &chunk) {
            s.g.kick_tx();
        }
        s.g.kick_tx();
    }
    assert!(s
        .g
        .pump_until(T, |g| g.conns[&k2].state == GuestState::Reset));
    assert_eq!(s.metrics().err_credit_overrun, 1);
    assert_eq!(s.metrics().conns_killed, 1);
    // The host socket of the reset connection is closed; what it got was at most the
    // credit the device had announced.
    host2.set_read_timeout(Some(T)).unwrap();
    let mut got = Vec::new();
    let _ = host2.read_to_end(&mut got);
    assert!(got.len() <= 4 << 20);
    s.healthy();
    drop(s.listener);
}

#[test]
fn duplicate_request_resets_the_connection() {
    let mut s = Setup::new();
    let uds = s.g.uds_path.clone();
    let l3 = UnixListener::bind(format!("{}_3", uds.display())).unwrap();
    let k3 = s.g.connect(3, VsockType::Stream);
    assert!(s
        .g
        .pump_until(T, |g| g.conns[&k3].state == GuestState::Established));
    let (_host3, _) = l3.accept().unwrap();
    s.g.send_ctrl(k3, VsockType::Stream, VsockOp::Request, 0);
    assert!(s
        .g
        .pump_until(T, |g| g.conns[&k3].state == GuestState::Reset));
    s.healthy();
}

#[test]
fn rst_flood_is_bounded() {
    let mut s = Setup::new();
    // 2000 packets for nonexistent connections without the guest reading its RX queue:
    // the RX ring fills, then the device's RST backlog, then replies are dropped.
    for i in 0..2000u32 {
        let h = hdr(20_000 + i, 1, VsockOp::Rw as u16, 0);
        while !s.g.queue_packet(&h, &[]) {
            s.g.kick_tx();
        }
        if i % 64 == 0 {
            s.g.kick_tx();
        }
    }
    s.g.kick_tx();
    let m = s.metrics();
    assert_eq!(m.err_no_connection, 2000);
    assert!(m.err_rst_dropped > 0, "{m:?}");
    s.healthy();
    assert!(s.g.stray_rsts.len() < 2000);
}

#[test]
fn request_timeout_ends_in_rst() {
    // A guest that never answers a host-initiated REQUEST: after the timeout the host
    // socket is closed and the guest gets RST.
    let dir = temp_dir("timeout");
    let uds = dir.join("v.sock");
    let mut g = Guest::new(&uds, GuestOptions::default());
    g.silent = true;
    let mut host = UnixStream::connect(&uds).unwrap();
    host.write_all(b"CONNECT 4000\n").unwrap();
    host.set_read_timeout(Some(T)).unwrap();
    let done = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = host.read_to_end(&mut v);
        v
    });
    assert!(g.pump_until(T, |g| g.stray_rsts.iter().any(|k| k.0 == 4000)));
    assert!(g.pump_until(T, |_| done.is_finished()));
    assert!(done.join().unwrap().is_empty(), "no OK after a timeout");
    let m = g.dev.metrics().snapshot();
    assert_eq!(m.err_timeout, 1, "{m:?}");
    assert_eq!(g.dev.connection_count(), 0);
}

#[test]
fn shutdown_timeout_ends_in_rst() {
    // The host closes; the guest never answers the device's SHUTDOWN with RST: after
    // the timeout the device sends RST and forgets the connection.
    let mut s = Setup::new();
    let key = s.key;
    drop(std::mem::replace(
        &mut s.host,
        UnixStream::pair().unwrap().0,
    ));
    assert!(s.g.pump_until(T, |g| g.conns[&key].peer_shutdown == 3));
    assert_eq!(s.g.dev.connection_count(), 1);
    assert!(s
        .g
        .pump_until(T, |g| g.conns[&key].state == GuestState::Reset));
    assert_eq!(s.metrics().err_timeout, 1);
    assert_eq!(s.g.dev.connection_count(), 0);
    drop(s.listener);
}

#[test]
fn unusable_rx_buffers_are_returned_empty() {
    let dir = temp_dir("badrx");
    let uds = dir.join("v.sock");
    let opts = GuestOptions {
        bad_rx_buffers: true,
        ..GuestOptions::default()
    };
    let mut g = Guest::new(&uds, opts);
    let listener = UnixListener::bind(format!("{}_1", uds.display())).unwrap();
    let key = g.connect(1, VsockType::Stream);
    assert!(g.pump_until(T, |g| g.conns[&key].state == GuestState::Established));
    let (mut host, _) = listener.accept().unwrap();
    host.write_all(b"fine").unwrap();
    assert!(g.pump_until(T, |g| g.conns[&key].data == b"fine"));
    assert_eq!(g.bad_rx_returned, vec![0, 0]);
    assert_eq!(g.dev.metrics().snapshot().err_rx_bad_buffer, 2);
    assert_eq!(g.bad_packets, 0);
}

#[test]
fn connection_cap_is_enforced_with_rst() {
    let dir = temp_dir("cap");
    let uds = dir.join("v.sock");
    let opts = GuestOptions {
        max_connections: 2,
        ..GuestOptions::default()
    };
    let mut g = Guest::new(&uds, opts);
    let listener = UnixListener::bind(format!("{}_1", uds.display())).unwrap();
    let a = g.connect(1, VsockType::Stream);
    let b = g.connect(1, VsockType::Stream);
    assert!(
        g.pump_until(T, |g| g.conns[&a].state == GuestState::Established
            && g.conns[&b].state == GuestState::Established)
    );
    let c = g.connect(1, VsockType::Stream);
    assert!(g.pump_until(T, |g| g.conns[&c].state == GuestState::Reset));
    // A host client beyond the cap is closed without a connection.
    g.listen(7);
    let mut host = UnixStream::connect(&uds).unwrap();
    let _ = host.write_all(b"CONNECT 7\n");
    host.set_read_timeout(Some(T)).unwrap();
    let done = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = host.read_to_end(&mut v);
        v
    });
    assert!(g.pump_until(T, |_| done.is_finished()));
    assert!(done.join().unwrap().is_empty());
    assert_eq!(g.dev.metrics().snapshot().err_conn_limit, 2);
    assert_eq!(g.dev.connection_count(), 2);
    // Closing one makes room again.
    assert!(g.close(a));
    let d = g.connect(1, VsockType::Stream);
    assert!(g.pump_until(T, |g| g.conns[&d].state == GuestState::Established));
    drop(listener);
}

#[test]
fn payload_descriptor_across_memory_regions() {
    // One descriptor whose bytes lie in both guest memory regions (two separate host
    // mappings): the adapter splits it into two host regions and no byte is lost.
    use vm_memory::{Bytes, GuestAddress};
    let mut s = Setup::new();
    let key = s.key;
    let mut h = hdr(key.0, key.1, VsockOp::Rw as u16, 6);
    h.fwd_cnt = s.g.conns[&key].fwd_cnt.0;
    let at = REGION_BOUNDARY - 3;
    s.g.mem.write_slice(b"across", GuestAddress(at)).unwrap();
    let hdr_at = 0x1f_0000;
    s.g.mem
        .write_slice(h.as_bytes(), GuestAddress(hdr_at))
        .unwrap();
    s.g.send_raw_descs(&[(hdr_at, 44, false), (at, 6, false)]);
    s.g.conns.get_mut(&key).unwrap().tx_cnt += std::num::Wrapping(6);
    let mut buf = [0u8; 6];
    s.host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"across");
    s.healthy();
}

#[test]
fn random_garbage_never_breaks_the_device() {
    // Thousands of random packets with random splits, directions, ops, types, flags
    // and lengths (ports chosen away from the healthy connection): no panic, every
    // chain comes back, and the healthy connection keeps working.
    let mut s = Setup::new();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut rnd = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for i in 0..3000 {
        let mut h = hdr(
            40_000 + rnd(8) as u32,
            7 + rnd(3) as u32,
            rnd(9) as u16,
            [0, 1, 5, 100, 4096, 65536, 65537, 1 << 31][rnd(8) as usize],
        );
        h.type_ = rnd(4) as u16;
        h.flags = [0, 1, 2, 3, 0xffff][rnd(5) as usize];
        h.buf_alloc = rnd(1 << 20) as u32;
        h.fwd_cnt = rnd(1 << 20) as u32;
        if rnd(10) == 0 {
            h.src_cid = rnd(5);
        }
        let body_len = rnd(300) as usize;
        let mut bytes = h.as_bytes().to_vec();
        bytes.extend((0..body_len).map(|_| rnd(256) as u8));
        if rnd(4) == 0 {
            bytes.truncate(rnd(bytes.len() as u64 + 1) as usize);
        }
        let mut descs = Vec::new();
        let mut rest = &bytes[..];
        while !rest.is_empty() && descs.len() < 40 {
            let take = (1 + rnd(rest.len() as u64) as usize).min(rest.len());
            descs.push((rest[..take].to_vec(), rnd(8) == 0));
            rest = &rest[take..];
        }
        if descs.is_empty() {
            descs.push((Vec::new(), false));
        }
        let used = s.g.send_raw(&descs);
        assert_eq!(used, 0, "the device writes nothing into TX chains");
        if i % 100 == 0 {
            s.g.pump(Duration::from_millis(1));
        }
        if i % 1000 == 999 {
            s.healthy();
        }
    }
    s.healthy();
    let m = s.metrics();
    // Every chain was either parsed or refused as malformed.
    assert!(m.tx_packets + m.err_queue >= 3000, "{m:?}");
    assert!(
        m.err_tx_invalid + m.err_tx_bad_len + m.err_tx_short_header > 0,
        "{m:?}"
    );
    assert!(s.g.pump_until(T, |g| g.dev.connection_count() == 1));
}

/// A driver that moves a queue's available index more than the ring size ahead (257 on
/// a 256-entry ring) breaks that queue: every device pass over it returns at once and
/// counts the error, instead of spinning (virtio-queue's iterator fails on such an
/// index, which a device loop used to take for "empty" while `enable_notification`
/// kept reporting work). Each queue in turn: TX (a kick), RX (host data to deliver),
/// event (a transport reset to deliver).
#[test]
fn avail_index_beyond_the_ring_stops_the_queue_without_spinning() {
    for queue in [1usize, 0, 2] {
        let mut s = Setup::new();
        s.healthy();
        let before = s.metrics().err_queue;
        let size = s.g.skip_avail_idx(queue, 0);
        s.g.skip_avail_idx(queue, size + 1);
        let dog = Watchdog::arm("a device pass over a broken ring", Duration::from_secs(10));
        for _ in 0..3 {
            match queue {
                1 => s.g.device(Vsock::handle_tx_kick),
                0 => {
                    s.host
                        .write_all(b"to a guest whose RX ring is broken")
                        .unwrap();
                    std::thread::sleep(Duration::from_millis(20));
                    s.g.device(Vsock::handle_backend_event);
                    s.g.device(Vsock::handle_rx_kick);
                }
                _ => s.g.device(Vsock::transport_reset),
            }
        }
        drop(dog);
        assert!(
            s.metrics().err_queue > before,
            "queue {queue}: the broken ring was not counted"
        );
    }
}
