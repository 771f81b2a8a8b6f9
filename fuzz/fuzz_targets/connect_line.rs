//! `connect_line`: the host side's `CONNECT <port>\n` line, through the real muxer.
//!
//! A host client connects to the vsock device's `<uds_path>` (stream) or
//! `<uds_path>_seqpacket` listener and sends the fuzzed bytes in two writes; the device
//! (`Vsock::handle_event`, the muxer's accept / peek / parse path in
//! `devices/src/vsock/muxer.rs`) runs after each. The line parser itself is
//! crate-private; this drives it the way a host process does, with the reading logic
//! (MSG_PEEK up to the newline, the 32-byte bound, message boundaries) included.
//!
//! Input: byte 0 bit 0 picks stream or seqpacket, byte 1 the length of the first write,
//! the rest is the bytes.
//!
//! Asserts the documented convention as an oracle: the first line (stream: up to a
//! newline within the first 32 bytes; seqpacket: the first message of at most 32 bytes,
//! one trailing newline dropped) is accepted (one more connection) exactly when it is
//! `CONNECT` (any case), ASCII whitespace, a decimal `u32` and nothing else; otherwise it
//! is refused (the bad-line counter moves and the client gets end of file) or, for a
//! stream with no newline yet in fewer than 32 bytes, the client is still waited for.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use outboard_devices::virtio::VirtioDevice;
use outboard_devices::vsock::{Vsock, VsockDeviceConfig, CONN_TIMEOUT, MAX_CONNECT_LINE};
use outboard_fuzz::Input;

static DEVICE: Mutex<Option<(Vsock, PathBuf)>> = Mutex::new(None);

fn device() -> std::sync::MutexGuard<'static, Option<(Vsock, PathBuf)>> {
    let mut g = DEVICE.lock().unwrap();
    if g.is_none() {
        let dir =
            std::env::temp_dir().join(format!("outboard-fuzz-connect-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let uds = dir.join("v.sock");
        let _ = std::fs::remove_file(&uds);
        let _ = std::fs::remove_file(dir.join("v.sock_seqpacket"));
        let dev = Vsock::new(VsockDeviceConfig::new(3, &uds)).unwrap();
        *g = Some((dev, uds));
    }
    g
}

/// The convention, written from the module docs.
fn expected_port(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let words: Vec<&str> = s.split_ascii_whitespace().collect();
    match words.as_slice() {
        [cmd, port] if cmd.eq_ignore_ascii_case("CONNECT") => port.parse().ok(),
        _ => None,
    }
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Accepted,
    Refused,
    Waiting,
}

fn stream_expectation(sent: &[u8]) -> Outcome {
    let window = &sent[..sent.len().min(MAX_CONNECT_LINE)];
    match window.iter().position(|b| *b == b'\n') {
        Some(i) => match expected_port(&window[..i]) {
            Some(_) => Outcome::Accepted,
            None => Outcome::Refused,
        },
        None if window.len() < MAX_CONNECT_LINE => Outcome::Waiting,
        None => Outcome::Refused,
    }
}

fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let seqpacket = input.u8() & 1 != 0;
    let split = usize::from(input.u8());
    let bytes = input.rest();
    let (first, second) = bytes.split_at(split.min(bytes.len()));
    let mut guard = device();
    let (dev, uds) = guard.as_mut().unwrap();
    dev.reset();
    dev.ack_features(dev.features());
    let before = (
        dev.connection_count(),
        dev.metrics().snapshot().err_bad_connect_line,
    );

    let expect = if seqpacket {
        let path = PathBuf::from(format!("{}_seqpacket", uds.display()));
        // SAFETY: socket(2) with constant arguments; checked.
        let fd =
            unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0);
        // SAFETY: a new fd we own.
        let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as _;
        for (d, s) in addr
            .sun_path
            .iter_mut()
            .zip(path.as_os_str().as_encoded_bytes())
        {
            *d = *s as libc::c_char;
        }
        // SAFETY: a valid sockaddr_un for the call.
        let r = unsafe {
            libc::connect(
                fd,
                (&addr as *const libc::sockaddr_un).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as u32,
            )
        };
        assert_eq!(r, 0, "connect to the seqpacket listener");
        let client = UnixStream::from(sock);
        client.set_nonblocking(true).unwrap();
        let _ = (&client).write(first);
        settle(dev);
        let line = if first.len() <= MAX_CONNECT_LINE && !first.is_empty() {
            Some(first.strip_suffix(b"\n").unwrap_or(first))
        } else {
            None
        };
        let expect = match line.and_then(expected_port) {
            Some(_) => Outcome::Accepted,
            None => Outcome::Refused,
        };
        check(dev, before, &expect, &client, first);
        expect
    } else {
        let client = UnixStream::connect(&*uds).unwrap();
        let connected = Instant::now();
        client.set_nonblocking(true).unwrap();
        let mut sent = Vec::new();
        let mut outcome = Outcome::Waiting;
        for chunk in [first, second] {
            if chunk.is_empty() {
                continue;
            }
            let n = (&client).write(chunk).unwrap_or(0);
            sent.extend_from_slice(&chunk[..n]);
            settle(dev);
            outcome = stream_expectation(&sent);
            if outcome != Outcome::Waiting {
                break;
            }
        }
        if sent.is_empty() {
            settle(dev);
        }
        // A client that has not finished its line within CONN_TIMEOUT is dropped and
        // counted as a bad line, the documented outcome, which a starved fuzzing process
        // (a loaded machine, a slow sanitizer build) can reach between two writes: then
        // it may be either, but never accepted.
        if outcome == Outcome::Waiting && connected.elapsed() >= CONN_TIMEOUT {
            assert_eq!(dev.connection_count(), before.0, "{sent:?} was accepted");
            return;
        }
        check(dev, before, &outcome, &client, &sent);
        outcome
    };
    let _ = expect;
}

/// Lets the muxer run until it has nothing more to do (accept, then read the line).
fn settle(dev: &mut Vsock) {
    for _ in 0..3 {
        dev.handle_event();
    }
}

fn check(
    dev: &Vsock,
    before: (usize, u64),
    expect: &Outcome,
    mut client: &UnixStream,
    sent: &[u8],
) {
    let conns = dev.connection_count();
    let bad = dev.metrics().snapshot().err_bad_connect_line;
    match expect {
        Outcome::Accepted => {
            assert_eq!(conns, before.0 + 1, "{sent:?} was not accepted");
            assert_eq!(bad, before.1);
        }
        Outcome::Refused => {
            assert_eq!(conns, before.0, "{sent:?} was accepted");
            assert_eq!(bad, before.1 + 1, "{sent:?} was not counted as a bad line");
            let mut b = [0u8; 8];
            // End of file, or a reset when the muxer closed with bytes unread.
            let r = client.read(&mut b);
            assert!(
                matches!(&r, Ok(0))
                    || matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
                "a refused client was not closed: {r:?}"
            );
        }
        Outcome::Waiting => {
            assert_eq!(
                (conns, bad),
                before,
                "{sent:?} was decided before its line ended"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| run(data));
