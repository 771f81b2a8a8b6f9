//! A running vsock device handed to a new device (`Vsock::handover`,
//! `Vsock::take_over`), as `outboard vsock --take-over` does between processes:
//! connections in every direction keep working with no byte lost, bytes the host had
//! not read yet survive, a host client that had not sent its `CONNECT` line yet is
//! served by the new device, and a record that does not fit is refused with the old
//! device still serving.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use outboard_devices::vsock::{Vsock, VsockDeviceConfig, VsockError, VsockHandover};
use outboard_protocol::vsock::VsockType;
use outboard_tests::{temp_dir, Guest, GuestOptions, Pattern};

const T: Duration = Duration::from_secs(5);

fn read_n(host: &mut impl Read, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    host.read_exact(&mut buf).unwrap();
    buf
}

fn pattern(seed: u64, pos: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Pattern::get().fill(seed, pos, &mut v);
    v
}

#[test]
fn connections_survive_a_handover_with_no_byte_lost() {
    let dir = temp_dir("handover");
    let uds = dir.join("v.sock");
    let mut g = Guest::new(&uds, GuestOptions::default());

    // Guest -> host, with bytes the host has not read yet: they wait in the host
    // socket and in the device's TX buffer (the host socket's buffer is small).
    let listener = UnixListener::bind(format!("{}_1234", uds.display())).unwrap();
    let g2h = g.connect(1234, VsockType::Stream);
    g.wait_established(g2h, T);
    let (mut host_a, _) = listener.accept().unwrap();
    host_a.set_read_timeout(Some(T)).unwrap();
    let first = pattern(1, 0, 200_000);
    g.send_all(g2h, &first[..100_000], T);

    // Host -> guest, established, with data the guest has not consumed.
    g.listen(5000);
    let mut host_b = UnixStream::connect(&uds).unwrap();
    host_b.set_read_timeout(Some(T)).unwrap();
    host_b.write_all(b"CONNECT 5000\n").unwrap();
    assert!(g.pump_until(T, |g| g.conns.keys().any(|k| k.0 == 5000)));
    let h2g = *g.conns.keys().find(|k| k.0 == 5000).unwrap();
    let mut reader_b = BufReader::new(host_b.try_clone().unwrap());
    let mut line = String::new();
    reader_b.read_line(&mut line).unwrap();
    assert_eq!(line, format!("OK {}\n", h2g.1));
    host_b.write_all(b"before").unwrap();
    assert!(g.pump_until(T, |g| g.conns[&h2g].data == b"before"));

    // A host client that has connected but not sent its line yet.
    g.listen(6000);
    let mut host_c = UnixStream::connect(&uds).unwrap();
    host_c.set_read_timeout(Some(T)).unwrap();
    g.pump(Duration::from_millis(50));

    let before = g.dev.connection_count();
    let counters = g.dev.metrics().snapshot();
    assert!(
        counters.tx_bytes > 0 && counters.conns_added >= 2,
        "{counters:?}"
    );
    let record = g.hand_over().unwrap();
    assert!(record > 0);
    assert_eq!(g.dev.connection_count(), before);
    // The counters carry on.
    assert_eq!(g.dev.metrics().snapshot(), counters);

    // Everything goes on with the new device.
    g.send_all(g2h, &first[100_000..], T);
    let got = {
        let mut got = Vec::new();
        while got.len() < first.len() {
            // The host reads while the guest side is pumped (the device forwards
            // buffered bytes as the socket drains).
            let mut buf = vec![0u8; 65536];
            match host_a.read(&mut buf) {
                Ok(0) => panic!("host socket closed after {} bytes", got.len()),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => panic!("host read: {e} after {} bytes", got.len()),
            }
            g.pump(Duration::from_millis(1));
        }
        got
    };
    assert!(
        got == first,
        "guest -> host bytes differ after the handover"
    );
    host_a.write_all(b"answer").unwrap();
    assert!(g.pump_until(T, |g| g.conns[&g2h].data == b"answer"));

    host_b.write_all(b" and after").unwrap();
    assert!(g.pump_until(T, |g| g.conns[&h2g].data == b"before and after"));
    g.send_all(h2g, b"pong", T);
    assert_eq!(read_n(&mut reader_b, 4), b"pong");

    host_c.write_all(b"CONNECT 6000\n").unwrap();
    assert!(g.pump_until(T, |g| g.conns.keys().any(|k| k.0 == 6000)));
    let mut reader_c = BufReader::new(host_c);
    let mut line = String::new();
    reader_c.read_line(&mut line).unwrap();
    assert!(line.starts_with("OK "), "{line:?}");

    // New connections both ways on the new device's listeners.
    let g2h2 = g.connect(1234, VsockType::Stream);
    g.wait_established(g2h2, T);
    let (mut host_d, _) = listener.accept().unwrap();
    host_d.set_read_timeout(Some(T)).unwrap();
    g.send_all(g2h2, b"new", T);
    assert_eq!(read_n(&mut host_d, 3), b"new");

    // An orderly close still works: the guest closes, the host sees end-of-file.
    assert!(g.close(g2h), "no RST after the guest's SHUTDOWN");
    let mut rest = Vec::new();
    host_a.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert_eq!(g.bad_packets, 0);
    assert!(g.stray_rsts.is_empty(), "{:?}", g.stray_rsts);
}

fn config(g: &Guest) -> VsockDeviceConfig {
    let mut cfg = VsockDeviceConfig::new(g.options().guest_cid, &g.uds_path);
    cfg.tx_buf_size = g.options().tx_buf_size;
    cfg.max_connections = g.options().max_connections;
    cfg
}

#[test]
fn a_record_that_does_not_fit_is_refused_and_the_old_device_serves_on() {
    let dir = temp_dir("handover-refused");
    let uds = dir.join("v.sock");
    let mut g = Guest::new(&uds, GuestOptions::default());
    let listener = UnixListener::bind(format!("{}_1234", uds.display())).unwrap();
    let key = g.connect(1234, VsockType::Stream);
    g.wait_established(key, T);
    let (mut host, _) = listener.accept().unwrap();
    host.set_read_timeout(Some(T)).unwrap();

    let take = |g: &Guest, edit: &dyn Fn(&mut VsockHandover, &mut VsockDeviceConfig)| {
        let mut h = g.dev.handover().unwrap();
        let mut cfg = config(g);
        edit(&mut h, &mut cfg);
        Vsock::take_over(cfg, h).map(drop)
    };
    let err = take(&g, &|h, _| h.record[8] = 2).unwrap_err();
    assert!(
        err.to_string()
            .contains("version 2 is not one this build reads"),
        "{err}"
    );
    let err = take(&g, &|h, _| h.record[0] ^= 1).unwrap_err();
    assert!(err.to_string().contains("magic"), "{err}");
    let err = take(&g, &|h, _| {
        h.record.pop();
    })
    .unwrap_err();
    assert!(err.to_string().contains("ends inside"), "{err}");
    let err = take(&g, &|h, _| h.record.push(0)).unwrap_err();
    assert!(
        err.to_string().contains("1 bytes after the last field"),
        "{err}"
    );
    let err = take(&g, &|h, _| {
        h.fds.pop();
    })
    .unwrap_err();
    assert!(matches!(err, VsockError::HandoverFds(_)), "{err}");
    let err = take(&g, &|h, _| {
        let extra = h.fds[0].try_clone().unwrap();
        h.fds.push(extra);
    })
    .unwrap_err();
    assert!(err.to_string().contains("1 fds more"), "{err}");
    let err = take(&g, &|_, cfg| cfg.guest_cid += 1).unwrap_err();
    assert!(err.to_string().contains("guest CID"), "{err}");
    let err = take(&g, &|_, cfg| cfg.tx_buf_size /= 2).unwrap_err();
    assert!(err.to_string().contains("TX buffer size"), "{err}");
    let err = take(&g, &|_, cfg| cfg.max_connections = 0).unwrap_err();
    assert!(matches!(err, VsockError::MaxConnections(0)), "{err}");

    // The old device never stopped serving: both directions still work.
    g.send_all(key, b"still here", T);
    assert_eq!(read_n(&mut host, 10), b"still here");
    host.write_all(b"me too").unwrap();
    assert!(g.pump_until(T, |g| g.conns[&key].data == b"me too"));
}

#[test]
fn a_device_linked_to_siblings_refuses_the_handover() {
    let dir = temp_dir("handover-siblings");
    let a = Guest::new(&dir.join("a.sock"), GuestOptions::default());
    let b = Guest::new(
        &dir.join("b.sock"),
        GuestOptions {
            guest_cid: a.options().guest_cid + 1,
            ..GuestOptions::default()
        },
    );
    a.dev.sibling().link(&b.dev.sibling()).unwrap();
    let err = a.dev.handover().unwrap_err();
    assert!(err.to_string().contains("sibling"), "{err}");
}
