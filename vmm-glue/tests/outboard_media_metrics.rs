//! `outboard media --metrics` as an operator runs it: the daemon serves the camera with
//! a session cap of 4, a front-end (a small virtio-media driver on the rings) opens 4
//! sessions and then 10 more that the daemon refuses with `ENFILE`, and the metrics
//! files (`--metrics` JSON and `--metrics-prometheus`, written every second) show
//! `sessions_opened` 4 and `err_session_limit` 10 for the device on that socket, with a
//! worker thread and with `--jail` (where the counters also survive a killed worker and
//! `worker_restarts` counts it).
//!
//! The daemon is a separate process (the binary), so this test process never forks.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

mod common;

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{jails_unavailable, worker_pid};
use outboard_protocol::media::{CmdHeader, MediaCmd, OpenResp, RespHeader};
use outboard_tests::media::vhost::VhostMediaDriver;
use zerocopy::{FromBytes, IntoBytes};

/// How long the daemon gets for anything (a metrics write is due every second).
const T: Duration = Duration::from_secs(10);

/// The session cap the daemon runs with.
const CAP: usize = 4;

/// A scratch directory the jailed worker's user can traverse.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "outboard-media-metrics-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// A running `outboard media --camera --max-sessions 4` with both metrics files.
struct Daemon {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
    json: PathBuf,
    prom: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Starts the daemon (with `extra` flags) and waits for its socket.
    fn start(name: &str, extra: &[&str]) -> Daemon {
        let dir = scratch_dir(name);
        let socket = dir.join("media.sock");
        let json = dir.join("metrics.json");
        let prom = dir.join("outboard.prom");
        let log = dir.join("daemon.log");
        let child = Command::new(env!("CARGO_BIN_EXE_outboard"))
            .args(["media", "--camera", "--shm-size-mib", "16"])
            .args(["--max-sessions", &CAP.to_string()])
            .arg("--metrics")
            .arg(&json)
            .arg("--metrics-prometheus")
            .arg(&prom)
            .args(["--metrics-interval", "1"])
            .args(extra)
            .arg("--socket-path")
            .arg(&socket)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let d = Daemon {
            child,
            dir,
            socket,
            json,
            prom,
            log,
        };
        let deadline = Instant::now() + T;
        while !d.socket.exists() {
            assert!(Instant::now() < deadline, "no socket:\n{}", d.log_text());
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }

    /// The device's counters in the JSON file, once it exists and parses (it is
    /// replaced atomically, so a read never sees half a document), after checking
    /// that its only entry names the media device on our socket.
    fn counters(&self) -> Option<serde_json::Map<String, serde_json::Value>> {
        let text = std::fs::read_to_string(&self.json).ok()?;
        let doc: serde_json::Value = serde_json::from_str(&text).ok()?;
        assert!(doc["timestamp_ms"].is_u64(), "{doc}");
        assert_eq!(doc["vms"].as_array().map(Vec::len), Some(1), "{doc}");
        let vm = &doc["vms"][0];
        assert_eq!(vm["device"], "media", "{doc}");
        assert_eq!(vm["socket"], self.socket.display().to_string(), "{doc}");
        assert!(vm.get("guest_cid").is_none(), "{doc}");
        vm["counters"].as_object().cloned()
    }

    /// Reads the JSON file until `want` holds for its counters (within [`T`]), checking
    /// on every read that no counter went below the highest value seen so far in
    /// `seen`; returns the counters.
    fn wait_for(
        &self,
        seen: &mut serde_json::Map<String, serde_json::Value>,
        what: &str,
        want: &[(&str, u64)],
    ) -> serde_json::Map<String, serde_json::Value> {
        let deadline = Instant::now() + T;
        loop {
            if let Some(c) = self.counters() {
                for (name, value) in &c {
                    let now = value.as_u64().unwrap();
                    let before = seen.get(name).and_then(|v| v.as_u64()).unwrap_or(0);
                    assert!(now >= before, "{what}: {name} went from {before} to {now}");
                    seen.insert(name.clone(), value.clone());
                }
                if want
                    .iter()
                    .all(|(name, v)| c.get(*name).and_then(|x| x.as_u64()) == Some(*v))
                {
                    return c;
                }
                assert!(
                    Instant::now() < deadline,
                    "{what}: want {want:?}, the metrics file has {c:?}\n{}",
                    self.log_text()
                );
            } else {
                assert!(
                    Instant::now() < deadline,
                    "{what}: no metrics file\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Checks that the Prometheus file has `value` for `outboard_media_<counter>` on
    /// our socket, with the family's `# HELP` and `# TYPE counter` lines (the file is
    /// written right after the JSON one: waits for it to catch up).
    fn check_prometheus(&self, counter: &str, value: u64) {
        let metric = format!("outboard_media_{counter}");
        let sample = format!("{metric}{{socket=\"{}\"}} {value}", self.socket.display());
        let deadline = Instant::now() + T;
        loop {
            let text = std::fs::read_to_string(&self.prom).unwrap_or_default();
            if text.lines().any(|l| l == sample) {
                let help = format!("# HELP {metric} ");
                assert!(
                    text.lines()
                        .any(|l| l.starts_with(&help) && l.len() > help.len()),
                    "no help for {metric}:\n{text}"
                );
                assert!(
                    text.lines()
                        .any(|l| l == format!("# TYPE {metric} counter")),
                    "no type for {metric}:\n{text}"
                );
                return;
            }
            assert!(Instant::now() < deadline, "no line {sample:?} in:\n{text}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM; the daemon must exit 0 within [`T`]. Returns its log and the JSON
    /// document it wrote last (at exit).
    fn stop(mut self) -> (String, serde_json::Value) {
        // SAFETY: kill(2) on our own child, which has not been reaped.
        assert_eq!(unsafe { libc::kill(self.pid(), libc::SIGTERM) }, 0);
        let deadline = Instant::now() + T;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "outboard ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        };
        let text = self.log_text();
        assert!(status.success(), "{status}\n{text}");
        let doc = serde_json::from_str(&std::fs::read_to_string(&self.json).unwrap()).unwrap();
        (text, doc)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends OPEN; the new session's id, or the error status.
fn open(driver: &mut VhostMediaDriver) -> Result<u32, u32> {
    let r = driver.command(CmdHeader::new(MediaCmd::Open).as_bytes(), 64);
    match OpenResp::read_from_bytes(&r) {
        Ok(o) if o.hdr.status == 0 => Ok(o.session_id),
        _ => Err(RespHeader::read_from_bytes(&r).unwrap().status),
    }
}

/// Opens `ok` sessions, which must succeed, then `refused` more, which must be refused
/// with `ENFILE`.
fn open_beyond_the_cap(driver: &mut VhostMediaDriver, ok: usize, refused: usize) {
    for i in 0..ok {
        assert!(open(driver).is_ok(), "open {i} of {ok} was refused");
    }
    for _ in 0..refused {
        assert_eq!(open(driver), Err(libc::ENFILE as u32));
    }
}

#[test]
fn session_cap_refusals_reach_the_metrics_files() {
    let daemon = Daemon::start("thread", &[]);
    let mut seen = serde_json::Map::new();
    // Written at the start, before any front-end.
    daemon.wait_for(
        &mut seen,
        "the first write",
        &[("sessions_opened", 0), ("err_session_limit", 0)],
    );
    let mut driver = VhostMediaDriver::connect(&daemon.socket);
    open_beyond_the_cap(&mut driver, CAP, 10);
    // Written periodically while the daemon serves.
    let c = daemon.wait_for(
        &mut seen,
        "4 sessions and 10 refused",
        &[("sessions_opened", 4), ("err_session_limit", 10)],
    );
    assert_eq!(c["sessions_closed"], 0, "{c:?}");
    assert_eq!(c["err_buffer_limit"], 0, "{c:?}");
    // A worker thread is never restarted: no such counter.
    assert!(c.get("worker_restarts").is_none(), "{c:?}");
    daemon.check_prometheus("sessions_opened", 4);
    daemon.check_prometheus("err_session_limit", 10);
    daemon.check_prometheus("err_mapping_limit", 0);
    // The front-end leaves: the device is reset, which closes its sessions.
    driver.disconnect();
    drop(driver);
    daemon.wait_for(&mut seen, "the reset", &[("sessions_closed", 4)]);
    let (log, doc) = daemon.stop();
    // The file written at exit keeps the counts.
    assert_eq!(doc["vms"][0]["counters"]["sessions_opened"], 4, "{log}");
    assert_eq!(doc["vms"][0]["counters"]["err_session_limit"], 10, "{log}");
}

#[test]
fn jailed_session_cap_refusals_reach_the_metrics_files_across_a_restart() {
    if let Some(why) = jails_unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let daemon = Daemon::start("jail", &["--jail"]);
    let mut seen = serde_json::Map::new();
    let mut driver = VhostMediaDriver::connect(&daemon.socket);
    open_beyond_the_cap(&mut driver, CAP, 10);
    let c = daemon.wait_for(
        &mut seen,
        "4 sessions and 10 refused",
        &[
            ("sessions_opened", 4),
            ("err_session_limit", 10),
            ("worker_restarts", 0),
        ],
    );
    assert_eq!(c["sessions_closed"], 0, "{c:?}");
    daemon.check_prometheus("sessions_opened", 4);
    daemon.check_prometheus("err_session_limit", 10);
    daemon.check_prometheus("worker_restarts", 0);

    // The worker dies with its sessions open; the next one starts from zero, and the
    // daemon keeps the dead worker's counts.
    let worker = common::kill_worker_under(daemon.pid(), &mut driver, T);
    drop(driver);
    daemon.wait_for(
        &mut seen,
        "the restart",
        &[
            ("sessions_opened", 4),
            ("err_session_limit", 10),
            ("worker_restarts", 1),
        ],
    );
    // The new worker has the whole cap again.
    let mut driver = VhostMediaDriver::connect(&daemon.socket);
    assert_ne!(worker_pid(daemon.pid()), worker);
    open_beyond_the_cap(&mut driver, CAP, 2);
    daemon.wait_for(
        &mut seen,
        "the second front-end",
        &[
            ("sessions_opened", 8),
            ("err_session_limit", 12),
            ("worker_restarts", 1),
        ],
    );
    daemon.check_prometheus("sessions_opened", 8);
    daemon.check_prometheus("err_session_limit", 12);
    daemon.check_prometheus("worker_restarts", 1);
    drop(driver);
    let (log, doc) = daemon.stop();
    assert!(!log.contains("SIGSYS"), "{log}");
    assert_eq!(doc["vms"][0]["counters"]["sessions_opened"], 8, "{log}");
    assert_eq!(doc["vms"][0]["counters"]["worker_restarts"], 1, "{log}");
}

/// The metrics flags are `outboard media`'s own, with the same checks as vsock's.
#[test]
fn media_metrics_flags_are_checked() {
    let out = Command::new(env!("CARGO_BIN_EXE_outboard"))
        .args([
            "media",
            "--camera",
            "--socket-path",
            "/nonexistent/media.sock",
            "--metrics",
            "/nonexistent/m.json",
            "--metrics-interval",
            "0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("--metrics-interval 0"), "{e}");
    let help = Command::new(env!("CARGO_BIN_EXE_outboard"))
        .args(["media", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in ["--metrics ", "--metrics-prometheus", "--metrics-interval"] {
        assert!(help.contains(flag), "{flag} not in:\n{help}");
    }
}
