//! The vsock device with the AF_VSOCK backend (`outboard vsock --forward-cid`), driven
//! by the simulated guest driver against the host kernel's own AF_VSOCK.
//!
//! What runs depends on the host kernel, and each test says on stderr what it could
//! not run and why:
//! - any AF_VSOCK transport (a VM's `/dev/vsock`, `vsock_loopback`, `vhost_vsock`):
//!   the forward ports are bound, and a guest connect the host side refuses ends in
//!   RST;
//! - `vsock_loopback` (CID 1): data both ways through the host kernel, host-initiated
//!   through a forward port and guest-initiated through the forward CID.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

use outboard_devices::vsock::{Vsock, VsockBackend, VsockDeviceConfig, VsockError, VsockForward};
use outboard_protocol::vsock::VsockType;
use outboard_tests::{temp_dir, Guest, GuestOptions, GuestState, Watchdog};

const T: Duration = Duration::from_secs(5);
const VMADDR_CID_LOCAL: u32 = 1;
const VMADDR_CID_HOST: u32 = 2;

/// An AF_VSOCK stream socket (blocking), or why there is none.
fn vsock_socket() -> io::Result<OwnedFd> {
    vsock_socket_of(libc::SOCK_STREAM)
}

/// An AF_VSOCK socket of type `ty` (blocking).
fn vsock_socket_of(ty: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, ty | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr_vm(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zeroes is valid.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

fn vsock_call(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A listener on `(cid, port)`; `port` `u32::MAX` picks a free one. Returns it and its
/// port.
fn vsock_listen(cid: u32, port: u32) -> io::Result<(OwnedFd, u32)> {
    vsock_listen_of(libc::SOCK_STREAM, cid, port)
}

/// [`vsock_listen`] for sockets of type `ty`.
fn vsock_listen_of(ty: libc::c_int, cid: u32, port: u32) -> io::Result<(OwnedFd, u32)> {
    use std::os::fd::AsRawFd;
    let fd = vsock_socket_of(ty)?;
    let addr = sockaddr_vm(cid, port);
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_vm of `len` bytes.
    vsock_call(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            len,
        )
    })?;
    // SAFETY: listen on an owned socket.
    vsock_call(unsafe { libc::listen(fd.as_raw_fd(), 16) })?;
    let mut got = sockaddr_vm(0, 0);
    let mut got_len = len;
    // SAFETY: `got` has room for a sockaddr_vm, `got_len` says so.
    vsock_call(unsafe {
        libc::getsockname(
            fd.as_raw_fd(),
            (&mut got as *mut libc::sockaddr_vm).cast(),
            &mut got_len,
        )
    })?;
    Ok((fd, got.svm_port))
}

fn vsock_connect(cid: u32, port: u32) -> io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let fd = vsock_socket()?;
    let addr = sockaddr_vm(cid, port);
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_vm of `len` bytes.
    vsock_call(unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            len,
        )
    })?;
    Ok(std::fs::File::from(fd))
}

fn vsock_accept(listener: &OwnedFd) -> io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    // SAFETY: accept on an owned listening socket; no address is asked for.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    vsock_call(fd)?;
    // SAFETY: `fd` is a new socket nobody else owns.
    Ok(std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// A port well away from the ones services use.
fn test_port(n: u32) -> u32 {
    0x4f00_0000 + (std::process::id() % 0x10000) * 16 + n
}

fn skip(test: &str, why: impl std::fmt::Display) {
    eprintln!("SKIPPED {test}: {why}");
}

fn forward_guest(name: &str, cid: u32, listen_ports: Vec<u32>) -> Guest {
    let dir = temp_dir(name);
    let opts = GuestOptions {
        forward: Some(VsockForward { cid, listen_ports }),
        ..GuestOptions::default()
    };
    Guest::new(&dir.join("unused"), opts)
}

/// Forward settings that can never work are refused before anything is bound.
#[test]
fn forward_settings_are_checked() {
    let cfg = |cid, ports: Vec<u32>| {
        VsockDeviceConfig::with_backend(
            3,
            VsockBackend::Vsock(VsockForward {
                cid,
                listen_ports: ports,
            }),
        )
    };
    let e = Vsock::new(cfg(u32::MAX, vec![])).unwrap_err();
    assert!(matches!(e, VsockError::ForwardCid(u32::MAX)), "{e}");
    let e = Vsock::new(cfg(1, vec![7, 8, 7])).unwrap_err();
    assert!(e.to_string().contains("port 7 is given twice"), "{e}");
    let e = Vsock::new(cfg(1, vec![u32::MAX])).unwrap_err();
    assert!(e.to_string().contains("VMADDR_PORT_ANY"), "{e}");
    let e = Vsock::new(cfg(1, (1..=65).collect())).unwrap_err();
    assert!(e.to_string().contains("65 ports, at most 64"), "{e}");
}

/// The forward ports are bound when the device is created; a port taken already is an
/// error that names it.
#[test]
fn forward_ports_are_bound() {
    if let Err(e) = vsock_socket() {
        return skip(
            "forward_ports_are_bound",
            format!("no AF_VSOCK on this host ({e})"),
        );
    }
    let (a, b) = (test_port(1), test_port(2));
    let cfg = |ports: Vec<u32>| {
        VsockDeviceConfig::with_backend(
            3,
            VsockBackend::Vsock(VsockForward {
                cid: VMADDR_CID_LOCAL,
                listen_ports: ports,
            }),
        )
    };
    let first = match Vsock::new(cfg(vec![a, b])) {
        Ok(d) => d,
        Err(VsockError::ForwardListen { source, .. })
            if source.raw_os_error() == Some(libc::EADDRNOTAVAIL) =>
        {
            return skip(
                "forward_ports_are_bound",
                format!("AF_VSOCK has no transport to bind with on this host ({source})"),
            );
        }
        Err(e) => panic!("binding the forward ports: {e}"),
    };
    match Vsock::new(cfg(vec![test_port(3), b])) {
        Err(VsockError::ForwardListen { port, source }) => {
            assert_eq!(port, b);
            assert_eq!(source.raw_os_error(), Some(libc::EADDRINUSE), "{source}");
        }
        other => panic!("a taken port must be refused: {other:?}"),
    }
    drop(first);
    // Freed with the device.
    Vsock::new(cfg(vec![b])).unwrap();
}

/// A guest connect that the host side refuses (nobody listens at the forward CID's
/// port) ends in RST, and nothing is left behind.
#[test]
fn refused_forward_connect_gets_rst() {
    if let Err(e) = vsock_socket() {
        return skip(
            "refused_forward_connect_gets_rst",
            format!("no AF_VSOCK on this host ({e})"),
        );
    }
    // CID 2 is the host as a VM sees it, the machine itself otherwise; either way
    // nothing listens on this port.
    let mut g = forward_guest("fwd-refused", VMADDR_CID_HOST, vec![]);
    let key = g.connect(test_port(4), VsockType::Stream);
    assert!(
        g.pump_until(T, |g| g.conns[&key].state == GuestState::Reset),
        "no RST for a refused forward connect: {:?}",
        g.conns[&key].state
    );
    assert!(g.pump_until(T, |g| g.dev.connection_count() == 0));
    let m = g.dev.metrics().snapshot();
    assert_eq!(m.err_connect_failed, 1, "{m:?}");
    assert_eq!(g.bad_packets, 0);
}

/// Whether `vsock_loopback` serves CID 1 here; why not otherwise.
fn loopback() -> Result<(), String> {
    match vsock_listen(VMADDR_CID_LOCAL, u32::MAX) {
        Ok(_) => Ok(()),
        Err(e) => Err(format!(
            "the host kernel has no vsock_loopback (binding CID 1: {e}); \
             `modprobe vsock_loopback` where the kernel has the module"
        )),
    }
}

/// Reads exactly `n` bytes from `host` while pumping the guest (the device runs on
/// this thread, so a blocking read would wait for itself).
fn host_read(g: &mut Guest, host: &mut std::fs::File, n: usize) -> Vec<u8> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on an owned fd.
    unsafe { libc::fcntl(host.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    let mut out = Vec::new();
    let mut buf = vec![0u8; n];
    let end = std::time::Instant::now() + T;
    while out.len() < n && std::time::Instant::now() < end {
        match host.read(&mut buf[..n - out.len()]) {
            Ok(0) => break,
            Ok(k) => out.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => g.pump(Duration::from_millis(10)),
            Err(e) => panic!("host read: {e}"),
        }
    }
    out
}

/// Both directions through the host kernel's loopback: a guest connect to host port
/// `P` reaches a listener on `(1, P)`; a host client of forward port `L` reaches the
/// guest's listener on `L`, with no `CONNECT` line and no `OK` answer.
#[test]
fn data_both_ways_over_vsock_loopback() {
    use std::io::Write;
    if let Err(why) = loopback() {
        return skip("data_both_ways_over_vsock_loopback", why);
    }
    let _w = Watchdog::arm(
        "data_both_ways_over_vsock_loopback",
        Duration::from_secs(30),
    );
    let fwd_port = test_port(5);
    let mut g = forward_guest("fwd-loop", VMADDR_CID_LOCAL, vec![fwd_port]);

    // Guest -> host.
    let (listener, port) = vsock_listen(VMADDR_CID_LOCAL, test_port(6)).unwrap();
    let key = g.connect(port, VsockType::Stream);
    g.wait_established(key, T);
    let mut host = vsock_accept(&listener).unwrap();
    g.send_all(key, b"hello from the guest", T);
    assert_eq!(host_read(&mut g, &mut host, 20), b"hello from the guest");
    host.write_all(b"hello from the host").unwrap();
    assert!(g.pump_until(T, |g| g.conns[&key].data == b"hello from the host"));
    assert!(g.close(key), "no RST after the guest's SHUTDOWN");

    // Host -> guest, through the forward port.
    g.listen(fwd_port);
    let mut client = vsock_connect(VMADDR_CID_LOCAL, fwd_port).unwrap();
    client.write_all(b"early bytes").unwrap();
    assert!(g.pump_until(T, |g| g.conns.keys().any(|k| k.0 == fwd_port)));
    let key = *g.conns.keys().find(|k| k.0 == fwd_port).unwrap();
    g.wait_established(key, T);
    assert!(g.pump_until(T, |g| g.conns[&key].data == b"early bytes"));
    g.send_all(key, b"pong", T);
    assert_eq!(
        host_read(&mut g, &mut client, 4),
        b"pong",
        "no OK line before the data"
    );
    // A half close is SHUTDOWN SEND (2) only: the guest may still send. (AF_VSOCK shows a
    // peer's close and its half close alike, as EPOLLRDHUP; the device tells them
    // apart.)
    {
        use std::os::fd::AsRawFd;
        // SAFETY: shutdown(2) on an fd the File owns.
        let r = unsafe { libc::shutdown(client.as_raw_fd(), libc::SHUT_WR) };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
    }
    assert!(g.pump_until(T, |g| g.conns[&key].peer_shutdown == 2));
    g.pump(Duration::from_millis(100));
    assert_eq!(
        g.conns[&key].peer_shutdown, 2,
        "a half close is not a close"
    );
    g.send_all(key, b"after", T);
    assert_eq!(host_read(&mut g, &mut client, 5), b"after");
    // The whole close: SHUTDOWN with both flags.
    drop(client);
    assert!(g.pump_until(T, |g| g.conns[&key].peer_shutdown == 3));
    let m = g.dev.metrics().snapshot();
    assert_eq!(m.err_connect_failed, 0, "{m:?}");
    assert_eq!(g.bad_packets, 0);
}

/// A guest SEQPACKET connect forwards to an AF_VSOCK SEQPACKET listener, and message
/// boundaries hold both ways. Host messages need `MSG_PEEK` on AF_VSOCK seqpacket
/// sockets (Linux 6.3): on an older kernel the device must reset the connection at the
/// first host message (counted as unsupported), never loop or deliver it broken.
#[test]
fn seqpacket_over_vsock_loopback() {
    use std::os::fd::AsRawFd;
    if let Err(why) = loopback() {
        return skip("seqpacket_over_vsock_loopback", why);
    }
    let _w = Watchdog::arm("seqpacket_over_vsock_loopback", Duration::from_secs(30));
    let mut g = forward_guest("fwd-seq", VMADDR_CID_LOCAL, vec![]);
    let (listener, port) =
        vsock_listen_of(libc::SOCK_SEQPACKET, VMADDR_CID_LOCAL, test_port(7)).unwrap();
    let key = g.connect(port, VsockType::Seqpacket);
    g.wait_established(key, T);
    let host = vsock_accept(&listener).unwrap();
    let fd = host.as_raw_fd();
    // SAFETY: fcntl on an owned fd.
    unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) };
    let msg: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    g.send_message(key, &msg, 4096);
    g.send_message(key, b"second", 4096);
    // Guest -> host (any kernel): whole messages, in order. The first is peeked at
    // first, as the device does, to learn whether this kernel can.
    let mut peek = [0u8; 1];
    let mut peek_ok = None;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let end = std::time::Instant::now() + T;
    while got.len() < 2 && std::time::Instant::now() < end {
        if peek_ok.is_none() {
            // SAFETY: `peek` is writable for its length.
            let n = unsafe {
                libc::recv(
                    fd,
                    peek.as_mut_ptr().cast(),
                    1,
                    libc::MSG_PEEK | libc::MSG_TRUNC,
                )
            };
            let err = io::Error::last_os_error();
            if n >= 0 {
                peek_ok = Some(n as usize == msg.len());
                eprintln!("seqpacket_over_vsock_loopback: MSG_PEEK|MSG_TRUNC gave {n}");
            } else if err.kind() == io::ErrorKind::WouldBlock {
                g.pump(Duration::from_millis(10));
                continue;
            } else {
                eprintln!("seqpacket_over_vsock_loopback: MSG_PEEK failed: {err}");
                peek_ok = Some(false);
            }
        }
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 0 {
            got.push(buf[..n as usize].to_vec());
        } else {
            g.pump(Duration::from_millis(10));
        }
    }
    let lens: Vec<usize> = got.iter().map(Vec::len).collect();
    assert!(
        got == [msg.clone(), b"second".to_vec()],
        "messages must arrive whole, in order: got lengths {lens:?}, peek {peek_ok:?}, \
         guest state {:?}, {:?}",
        g.conns[&key].state,
        g.dev.metrics().snapshot()
    );
    // Host -> guest.
    for m in [&b"one"[..], &msg[..3000]] {
        // SAFETY: `m` is readable for its length.
        let n = unsafe { libc::send(fd, m.as_ptr().cast(), m.len(), 0) };
        assert_eq!(n, m.len() as isize);
    }
    if peek_ok == Some(true) {
        assert!(g.pump_until(T, |g| g.conns[&key].messages.len() == 2));
        let got: Vec<&[u8]> = g.conns[&key].messages.iter().map(|(m, _)| &m[..]).collect();
        assert_eq!(got, vec![&b"one"[..], &msg[..3000]]);
    } else {
        eprintln!(
            "seqpacket_over_vsock_loopback: this kernel cannot peek at AF_VSOCK seqpacket \
             messages (Linux < 6.3); checking that the device resets the connection"
        );
        assert!(
            g.pump_until(T, |g| g.conns[&key].state == GuestState::Reset),
            "no RST: {:?}",
            g.conns[&key].state
        );
        assert!(
            g.conns[&key].messages.is_empty(),
            "nothing broken delivered"
        );
        assert_eq!(g.dev.metrics().snapshot().err_unsupported, 1);
    }
    assert_eq!(g.bad_packets, 0);
}
