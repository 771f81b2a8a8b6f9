//! The vsock device driven by the simulated guest driver: connections both ways, data,
//! shutdown, RST, credit, SEQPACKET, TRANSPORT_RESET.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use outboard_protocol::vsock::{SeqpacketFlags, ShutdownFlags, VsockOp, VsockType};
use outboard_tests::{temp_dir, Guest, GuestOptions, GuestState, Pattern, Sink};

const T: Duration = Duration::from_secs(5);

fn host_read(host: &mut UnixStream, n: usize) -> Vec<u8> {
    host.set_read_timeout(Some(T)).unwrap();
    let mut buf = vec![0u8; n];
    host.read_exact(&mut buf).unwrap();
    buf
}

/// Guest -> host: connect, data both ways, half close from the host, close from the
/// guest.
#[test]
fn guest_connects_to_host_listener() {
    let dir = temp_dir("g2h");
    let uds = dir.join("v.sock");
    let mut g = Guest::new(&uds, GuestOptions::default());
    let listener = UnixListener::bind(format!("{}_1234", uds.display())).unwrap();
    let key = g.connect(1234, VsockType::Stream);
    g.wait_established(key, T);
    let (mut host, _) = listener.accept().unwrap();

    g.send_all(key, b"hello from the guest", T);
    assert_eq!(host_read(&mut host, 20), b"hello from the guest");

    host.write_all(b"hello from the host").unwrap();
    assert!(g.pump_until(T, |g| g.conns[&key].data == b"hello from the host"));

    // The host shuts down its sending side: the guest hears SHUTDOWN SEND and can
    // still send.
    host.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(g.pump_until(T, |g| g.conns[&key].peer_shutdown
        & ShutdownFlags::SEND.bits()
        != 0));
    assert_eq!(g.conns[&key].peer_shutdown & ShutdownFlags::RCV.bits(), 0);
    g.send_all(key, b"still here", T);
    assert_eq!(host_read(&mut host, 10), b"still here");

    // The guest closes: SHUTDOWN both, the device answers RST and closes the socket.
    assert!(g.close(key), "no RST after the guest's SHUTDOWN");
    let mut rest = Vec::new();
    host.set_read_timeout(Some(T)).unwrap();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    let m = g.dev.metrics().snapshot();
    assert_eq!(m.conns_added, 1);
    assert_eq!(m.conns_removed, 1);
    assert_eq!(m.conns_killed, 0);
    assert_eq!(g.dev.connection_count(), 0);
    assert_eq!(g.bad_packets, 0);
}

/// Host -> guest: `CONNECT <port>\n`, REQUEST, RESPONSE, `OK <host port>\n`.
#[test]
fn host_connects_to_guest_listener() {
    let dir = temp_dir("h2g");
    let uds = dir.join("v.sock");
    let mut g = Guest::new(&uds, GuestOptions::default());
    g.listen(5000);
    let mut host = UnixStream::connect(&uds).unwrap();
    // Case-insensitive, as Firecracker accepts it; data right after the line is stream
    // data, not part of the handshake.
    host.write_all(b"cOnNeCt 5000\nearly bytes").unwrap();
    assert!(g.pump_until(T, |g| g.conns.keys().any(|k| k.0 == 5000)));
    let key = *g.conns.keys().find(|k| k.0 == 5000).unwrap();
    assert!(key.1 >= outboard_devices::vsock::HOST_PORT_BASE);
    host.set_read_timeout(Some(T)).unwrap();
    let mut reader = BufReader::new(host.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, format!("OK {}\n", key.1));
    assert!(g.pump_until(T, |g| g.conns[&key].data == b"early bytes"));
    g.send_all(key, b"pong", T);
    let mut buf = [0u8; 4];
    reader.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");

    // The host closes: the guest hears SHUTDOWN (both) and answers RST.
    drop(reader);
    drop(host);
    assert!(g.pump_until(T, |g| g.conns[&key].peer_shutdown == 3));
    g.send_ctrl(key, VsockType::Stream, VsockOp::Rst, 0);
    assert!(g.pump_until(T, |g| g.dev.connection_count() == 0));

    // A second client gets a different host-side port.
    let mut h2 = UnixStream::connect(&uds).unwrap();
    h2.write_all(b"CONNECT 5000\n").unwrap();
    assert!(g.pump_until(T, |g| g.conns.keys().filter(|k| k.0 == 5000).count() == 2));
}

/// A CONNECT to a guest port nobody listens on: the guest RSTs, the host socket closes.
#[test]
fn host_connect_refused_by_guest_and_bad_lines() {
    let dir = temp_dir("h2g-refused");
    let uds = dir.join("v.sock");
    let mut g = Guest::new(&uds, GuestOptions::default());
    let mut host = UnixStream::connect(&uds).unwrap();
    host.write_all(b"CONNECT 7777\n").unwrap();
    host.set_read_timeout(Some(T)).unwrap();
    let mut out = Vec::new();
    let reader = std::thread::spawn(move || {
        host.read_to_end(&mut out).unwrap();
        out
    });
    assert!(g.pump_until(T, |g| g.dev.metrics().snapshot().conns_removed == 1));
    assert!(
        reader.join().unwrap().is_empty(),
        "no OK for a refused connect"
    );

    for bad in [
        &b"HELLO 5000\n"[..],
        b"CONNECT\n",
        b"CONNECT 5000 6000\n",
        b"CONNECT 99999999999\n",
        b"CONNECT 1234567890123456789012345678901234567890",
    ] {
        let mut host = UnixStream::connect(&uds).unwrap();
        host.write_all(bad).unwrap();
        host.set_read_timeout(Some(T)).unwrap();
        let done = std::thread::spawn(move || {
            let mut out = Vec::new();
            host.read_to_end(&mut out).map(|_| out)
        });
        assert!(
            g.pump_until(T, |_| done.is_finished()),
            "{bad:?} not refused"
        );
        // Closed: end-of-file, or a reset when the device dropped unread bytes.
        match done.join().unwrap() {
            Ok(out) => assert!(out.is_empty()),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        }
    }
    assert_eq!(g.dev.metrics().snapshot().err_bad_connect_line, 5);
    assert_eq!(g.dev.connection_count(), 0);
}

/// No listener at `<uds>_<port>`: RST.
#[test]
fn rst_when_no_host_listener() {
    let dir = temp_dir("rst");
    let uds = dir.join("v.sock");
    let mut g = Guest::new(&uds, GuestOptions::default());
    let key = g.connect(4242, VsockType::Stream);
    assert!(g.pump_until(T, |g| g.conns[&key].state == GuestState::Reset));
    let m = g.dev.metrics().snapshot();
    assert_eq!(m.err_connect_failed, 1);
    assert_eq!(m.conns_added, 0);
}

/// A guest socket with an 8 KiB receive buffer that reads slowly is never sent more
/// than it has room for, and receives every byte in order.
#[test]
fn small_guest_buffer_is_never_overrun() {
    let dir = temp_dir("credit");
    let uds = dir.join("v.sock");
    let opts = GuestOptions {
        buf_alloc: 8192,
        ..GuestOptions::default()
    };
    let mut g = Guest::new(&uds, opts);
    let listener = UnixListener::bind(format!("{}_80", uds.display())).unwrap();
    let key = g.connect(80, VsockType::Stream);
    g.wait_established(key, T);
    g.conns.get_mut(&key).unwrap().auto_consume = false;
    let (mut host, _) = listener.accept().unwrap();
    const TOTAL: usize = 1 << 20;
    let writer = std::thread::spawn(move || {
        let mut data = vec![0u8; TOTAL];
        Pattern::get().fill(1, 0, &mut data);
        host.write_all(&data).unwrap();
        host
    });
    let mut got = Vec::new();
    while got.len() < TOTAL {
        g.pump(Duration::from_millis(2));
        let c = &g.conns[&key];
        assert_eq!(c.overruns, 0, "device overran the guest's buffer");
        assert!(c.data.len() <= 8192);
        if c.data.len() >= 4096 || (c.data.len() + got.len() == TOTAL && !c.data.is_empty()) {
            let n = c.data.len().min(3000);
            got.extend(g.consume(key, n));
        }
    }
    assert!(Pattern::get().check(1, 0, &got));
    assert_eq!(g.conns[&key].overruns, 0);
    drop(writer.join().unwrap());
}

fn seq_socket() -> i32 {
    // SAFETY: plain socket call; checked below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0);
    fd
}

fn sockaddr(path: &str) -> (libc::sockaddr_un, libc::socklen_t) {
    // SAFETY: all-zero sockaddr_un is valid.
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    a.sun_family = libc::AF_UNIX as _;
    for (d, s) in a.sun_path.iter_mut().zip(path.as_bytes()) {
        *d = *s as _;
    }
    (a, (2 + path.len() + 1) as _)
}

fn seq_listen(path: &str) -> i32 {
    let fd = seq_socket();
    let (a, l) = sockaddr(path);
    // SAFETY: `a` is a valid sockaddr_un of `l` bytes.
    let r = unsafe { libc::bind(fd, (&a as *const libc::sockaddr_un).cast(), l) };
    assert_eq!(r, 0);
    // SAFETY: plain call.
    assert_eq!(unsafe { libc::listen(fd, 8) }, 0);
    fd
}

fn seq_connect(path: &str) -> i32 {
    let fd = seq_socket();
    let (a, l) = sockaddr(path);
    // SAFETY: `a` is a valid sockaddr_un of `l` bytes.
    let r = unsafe { libc::connect(fd, (&a as *const libc::sockaddr_un).cast(), l) };
    assert_eq!(r, 0);
    fd
}

fn seq_send(fd: i32, msg: &[u8]) {
    // SAFETY: `msg` is valid for reading.
    let n = unsafe { libc::send(fd, msg.as_ptr().cast(), msg.len(), 0) };
    assert_eq!(n, msg.len() as isize);
}

fn seq_recv(fd: i32) -> Vec<u8> {
    let mut buf = vec![0u8; 256 * 1024];
    // SAFETY: `buf` is valid for writing.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    assert!(n >= 0);
    buf.truncate(n as usize);
    buf
}

fn message(seed: u64, len: usize) -> Vec<u8> {
    let mut m = vec![0u8; len];
    Pattern::get().fill(seed, 0, &mut m);
    m
}

const SIZES: [usize; 6] = [1, 100, 4052, 4053, 70_000, 120_000];

/// SEQPACKET guest -> host and back: every message arrives whole, with its boundary.
#[test]
fn seqpacket_keeps_message_boundaries() {
    let dir = temp_dir("seq");
    let uds = dir.join("v.sock");
    let mut g = Guest::new(&uds, GuestOptions::default());
    let lfd = seq_listen(&format!("{}_77", uds.display()));
    let key = g.connect(77, VsockType::Seqpacket);
    g.wait_established(key, T);
    // SAFETY: plain accept on a listening socket.
    let host = unsafe { libc::accept(lfd, std::ptr::null_mut(), std::ptr::null_mut()) };
    assert!(host >= 0);
    for (i, &len) in SIZES.iter().enumerate() {
        let msg = message(i as u64, len);
        g.send_message(key, &msg, 4096);
        assert_eq!(seq_recv(host), msg, "guest message {i} of {len} bytes");
    }
    let mut host_sizes = SIZES.to_vec();
    host_sizes.push(0);
    // From a thread: the messages exceed the socket's send buffer.
    let sizes = host_sizes.clone();
    let sender = std::thread::spawn(move || {
        for (i, &len) in sizes.iter().enumerate() {
            seq_send(host, &message(100 + i as u64, len));
        }
    });
    assert!(
        g.pump_until(T, |g| g.conns[&key].messages.len() == host_sizes.len()),
        "got {:?} messages, {:?}, {:?}",
        g.conns[&key]
            .messages
            .iter()
            .map(|m| m.0.len())
            .collect::<Vec<_>>(),
        g.conns[&key],
        g.dev.metrics().snapshot()
    );
    for (i, (msg, flags)) in g.conns[&key].messages.iter().enumerate() {
        assert_eq!(msg.len(), host_sizes[i], "host message {i}");
        assert_eq!(*msg, message(100 + i as u64, host_sizes[i]));
        assert_ne!(flags & SeqpacketFlags::EOM.bits(), 0);
    }
    sender.join().unwrap();

    // Host -> guest seqpacket through `<uds>_seqpacket`.
    g.listen(6000);
    let h2 = seq_connect(&format!("{}_seqpacket", uds.display()));
    seq_send(h2, b"CONNECT 6000\n");
    assert!(g.pump_until(T, |g| g.conns.keys().any(|k| k.0 == 6000)));
    let k2 = *g.conns.keys().find(|k| k.0 == 6000).unwrap();
    assert_eq!(g.conns[&k2].ty, VsockType::Seqpacket);
    assert_eq!(seq_recv(h2), format!("OK {}\n", k2.1).into_bytes());
    seq_send(h2, b"one");
    seq_send(h2, b"two");
    assert!(g.pump_until(T, |g| g.conns[&k2].messages.len() == 2));
    assert_eq!(g.conns[&k2].messages[0].0, b"one");
    assert_eq!(g.conns[&k2].messages[1].0, b"two");
    g.send_message(k2, b"three", 4096);
    assert_eq!(seq_recv(h2), b"three");
    // SAFETY: closing fds this test opened.
    unsafe {
        libc::close(h2);
        libc::close(host);
        libc::close(lfd);
    }
}

/// A driver that did not negotiate SEQPACKET gets RST for seqpacket packets.
#[test]
fn seqpacket_needs_the_feature() {
    let dir = temp_dir("seq-off");
    let uds = dir.join("v.sock");
    let opts = GuestOptions {
        seqpacket: false,
        ..GuestOptions::default()
    };
    let mut g = Guest::new(&uds, opts);
    let _lfd = seq_listen(&format!("{}_77", uds.display()));
    let key = g.connect(77, VsockType::Seqpacket);
    assert!(g.pump_until(T, |g| g.conns[&key].state == GuestState::Reset));
    assert_eq!(g.dev.metrics().snapshot().err_unsupported, 1);
}

/// After a (simulated) snapshot restore the VMM calls transport_reset: host sockets
/// close, the guest gets TRANSPORT_RESET, and new connections work.
#[test]
fn transport_reset_after_restore() {
    let dir = temp_dir("reset");
    let uds = dir.join("v.sock");
    let mut g = Guest::new(&uds, GuestOptions::default());
    let listener = UnixListener::bind(format!("{}_99", uds.display())).unwrap();
    let key = g.connect(99, VsockType::Stream);
    g.wait_established(key, T);
    let (mut host, _) = listener.accept().unwrap();
    g.send_all(key, b"before", T);
    assert_eq!(host_read(&mut host, 6), b"before");

    g.dev.transport_reset();
    g.process_used();
    assert_eq!(g.events, vec![0], "TRANSPORT_RESET (0) delivered");
    assert_eq!(g.dev.connection_count(), 0);
    let mut rest = Vec::new();
    host.set_read_timeout(Some(T)).unwrap();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "host socket closed by the reset");

    // The guest drops its sockets (as Linux does on the event) and reconnects.
    g.conns.clear();
    let key = g.connect(99, VsockType::Stream);
    g.wait_established(key, T);
    let (mut host, _) = listener.accept().unwrap();
    g.send_all(key, b"after", T);
    assert_eq!(host_read(&mut host, 5), b"after");
}

/// Data verified against the pattern through a Verify sink, both ways, one
/// connection, without EVENT_IDX.
#[test]
fn stream_without_event_idx() {
    let dir = temp_dir("noevidx");
    let uds = dir.join("v.sock");
    let opts = GuestOptions {
        event_idx: false,
        ..GuestOptions::default()
    };
    let mut g = Guest::new(&uds, opts);
    let listener = UnixListener::bind(format!("{}_5", uds.display())).unwrap();
    let key = g.connect(5, VsockType::Stream);
    g.wait_established(key, T);
    g.conns.get_mut(&key).unwrap().sink = Sink::Verify { seed: 9 };
    let (host, _) = listener.accept().unwrap();
    // A stalled device must fail the test, not leave its host threads blocked forever.
    host.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    host.set_write_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    const TOTAL: u64 = 4 << 20;
    let mut h = host.try_clone().unwrap();
    let w = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        let mut pos = 0;
        while pos < TOTAL {
            Pattern::get().fill(9, pos, &mut buf);
            h.write_all(&buf).unwrap();
            pos += buf.len() as u64;
        }
    });
    let mut hr = host;
    // What the host read so far: the device must be driven until then, not only until
    // the guest queued its last packet (the end of it may still wait in the device for
    // the host socket to drain).
    let host_got = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let got = host_got.clone();
    let r = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        let mut pos = 0u64;
        while pos < TOTAL {
            let n = hr.read(&mut buf).unwrap();
            assert!(n > 0);
            assert!(Pattern::get().check(10, pos, &buf[..n]));
            pos += n as u64;
            got.store(pos, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let mut sent = 0;
    let start = std::time::Instant::now();
    let host_read = || host_got.load(std::sync::atomic::Ordering::Relaxed);
    while sent < TOTAL || g.conns[&key].received < TOTAL || host_read() < TOTAL {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "sent {sent} host read {} received {} {:?} {:?} kicks {:?}",
            host_read(),
            g.conns[&key].received,
            g.conns[&key],
            g.dev.metrics().snapshot(),
            g.kicks
        );
        g.queue_stream(
            key,
            TOTAL,
            65536,
            |p, b| Pattern::get().fill(10, p, b),
            &mut sent,
        );
        g.kick_tx();
        g.pump(Duration::from_millis(1));
    }
    w.join().unwrap();
    r.join().unwrap();
    assert_eq!(g.conns[&key].corrupt, 0);
    assert_eq!(g.conns[&key].overruns, 0);
}

/// Guest -> host with a host that does not read: the guest runs out of credit (the
/// device's TX buffer stays bounded), then everything arrives once the host reads.
#[test]
fn backpressure_from_a_slow_host() {
    let dir = temp_dir("backpressure");
    let uds = dir.join("v.sock");
    let opts = GuestOptions {
        tx_buf_size: 64 * 1024,
        ..GuestOptions::default()
    };
    let mut g = Guest::new(&uds, opts);
    let listener = UnixListener::bind(format!("{}_3", uds.display())).unwrap();
    let key = g.connect(3, VsockType::Stream);
    g.wait_established(key, T);
    let (host, _) = listener.accept().unwrap();
    assert_eq!(g.conns[&key].peer_buf_alloc, 64 * 1024);
    const TOTAL: u64 = 8 << 20;
    let mut sent = 0;
    for _ in 0..50 {
        g.queue_stream(
            key,
            TOTAL,
            4096,
            |p, b| Pattern::get().fill(3, p, b),
            &mut sent,
        );
        g.kick_tx();
        g.pump(Duration::from_millis(2));
    }
    assert!(sent < TOTAL, "the guest was never stopped by credit");
    let stalled_at = sent;
    g.pump(Duration::from_millis(20));
    g.queue_stream(
        key,
        TOTAL,
        4096,
        |p, b| Pattern::get().fill(3, p, b),
        &mut sent,
    );
    assert_eq!(sent, stalled_at, "credit grew while the host did not read");
    let mut host = host;
    let reader = std::thread::spawn(move || {
        host.set_read_timeout(Some(T)).unwrap();
        let mut buf = vec![0u8; 65536];
        let mut pos = 0;
        while pos < TOTAL {
            let n = host.read(&mut buf).unwrap();
            assert!(n > 0);
            assert!(Pattern::get().check(3, pos, &buf[..n]));
            pos += n as u64;
        }
    });
    while sent < TOTAL {
        g.queue_stream(
            key,
            TOTAL,
            4096,
            |p, b| Pattern::get().fill(3, p, b),
            &mut sent,
        );
        g.kick_tx();
        g.pump(Duration::from_millis(1));
    }
    while !reader.is_finished() {
        g.pump(Duration::from_millis(1));
    }
    reader.join().unwrap();
    let m = g.dev.metrics().snapshot();
    assert_eq!(m.err_credit_overrun, 0);
    assert_eq!(m.tx_bytes, TOTAL);
    assert_eq!(g.conns[&key].state, GuestState::Established);
}

/// Host data that trickles in pieces (each read comes up short of the guest's buffers,
/// which ends the connection's turn without a read that would say EAGAIN) and a close
/// right after the last piece: every byte and the SHUTDOWN still reach the guest, in
/// order, whether the EOF comes with the last bytes or after them.
#[test]
fn trickling_host_data_then_close() {
    let dir = temp_dir("trickle");
    let uds = dir.join("v.sock");
    let mut g = Guest::new(&uds, GuestOptions::default());
    g.listen(5001);
    for (round, pause) in [(0u64, true), (1, false)] {
        let mut host = UnixStream::connect(&uds).unwrap();
        host.write_all(b"CONNECT 5001\n").unwrap();
        assert!(g.pump_until(T, |g| g.conns.keys().any(|k| k.0 == 5001)));
        let key = *g.conns.keys().find(|k| k.0 == 5001).unwrap();
        g.wait_established(key, T);
        host.set_read_timeout(Some(T)).unwrap();
        let mut line = String::new();
        BufReader::new(host.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, format!("OK {}\n", key.1));
        let mut expect = Vec::new();
        for (i, len) in [1usize, 100, 4095, 4097, 70_000, 3].into_iter().enumerate() {
            let mut piece = vec![0u8; len];
            Pattern::get().fill(round, expect.len() as u64, &mut piece);
            host.write_all(&piece).unwrap();
            expect.extend_from_slice(&piece);
            if pause {
                // Each piece is read (short) before the next is written.
                let want = expect.len();
                assert!(
                    g.pump_until(T, |g| g.conns[&key].data.len() == want),
                    "piece {i}: the guest has {} of {want} bytes",
                    g.conns[&key].data.len()
                );
            }
        }
        drop(host);
        assert!(
            g.pump_until(T, |g| g.conns[&key].peer_shutdown == 3),
            "round {round}: no SHUTDOWN after {} of {} bytes",
            g.conns[&key].data.len(),
            expect.len()
        );
        assert!(g.conns[&key].data == expect, "round {round}: data differs");
        g.send_ctrl(key, VsockType::Stream, VsockOp::Rst, 0);
        assert!(g.pump_until(T, |g| g.dev.connection_count() == 0));
        g.conns.remove(&key);
    }
}
