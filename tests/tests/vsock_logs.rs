//! The vsock device's log lines name the connection they are about (its host and guest
//! ports and type), so one connection's trouble can be found in a daemon with many; the
//! worker's name (`vsock cid N`, added by the daemon's logger) names the VM.
//!
//! Its own test binary: it installs a process-wide logger that records every line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Mutex;
use std::time::Duration;

use outboard_protocol::vsock::{VsockOp, VsockType};
use outboard_tests::{temp_dir, Guest, GuestOptions, GuestState};

const T: Duration = Duration::from_secs(5);

static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let line = format!("{} {}", record.level(), record.args());
        LINES.lock().unwrap().push(line);
    }

    fn flush(&self) {}
}

static CAPTURE: Capture = Capture;

fn lines_with(needle: &str) -> Vec<String> {
    LINES
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains(needle))
        .cloned()
        .collect()
}

#[test]
fn connection_events_name_the_connection() {
    log::set_logger(&CAPTURE).unwrap();
    log::set_max_level(log::LevelFilter::Debug);
    let dir = temp_dir("logs");
    let uds = dir.join("v.sock");
    let mut g = Guest::new(&uds, GuestOptions::default());

    // Guest-initiated, then reset by the device for a packet out of place.
    let listener = UnixListener::bind(format!("{}_1234", uds.display())).unwrap();
    let key = g.connect(1234, VsockType::Stream);
    assert!(g.pump_until(T, |g| g.conns[&key].state == GuestState::Established));
    let (_host, _) = listener.accept().unwrap();
    let name = format!("connection host port 1234 / guest port {} (stream)", key.0);
    assert_eq!(
        lines_with(&name),
        vec![format!("DEBUG vsock: {name}: opened by the guest")]
    );
    g.send_ctrl(key, VsockType::Stream, VsockOp::Response, 0);
    assert!(g.pump_until(T, |g| g.conns[&key].state == GuestState::Reset));
    g.send_ctrl(key, VsockType::Stream, VsockOp::Rst, 0);
    assert!(g.pump_until(T, |g| g.dev.connection_count() == 0));
    assert_eq!(
        lines_with(&name),
        vec![
            format!("DEBUG vsock: {name}: opened by the guest"),
            format!(
                "INFO vsock: {name}: reset by the device: a guest packet out of place for \
                 the connection's state"
            ),
            format!("DEBUG vsock: {name}: closed"),
        ]
    );

    // Host-initiated.
    g.listen(5000);
    let mut host = UnixStream::connect(&uds).unwrap();
    host.write_all(b"CONNECT 5000\n").unwrap();
    assert!(g.pump_until(T, |g| g.conns.keys().any(|k| k.0 == 5000)));
    let key = *g.conns.keys().find(|k| k.0 == 5000).unwrap();
    let name = format!("connection host port {} / guest port 5000 (stream)", key.1);
    assert_eq!(
        lines_with(&name),
        vec![format!("DEBUG vsock: {name}: opened by a host client")]
    );
}
