//! `outboard vsock --jail` as users run it: a front-end (our transport's `Frontend`
//! playing QEMU, with a small virtio-vsock driver on the rings) runs a full session
//! through the jailed worker — a host connection to a guest port, data both ways — then
//! the test checks in /proc that the worker really is confined, kills the worker and
//! sees the daemon report it and serve a new front-end, and stops the daemon with
//! SIGTERM. With `--metrics`, the jailed worker's counters reach the daemon's metrics
//! file and stay monotonic across a restart.
//!
//! The daemon is a separate process (the binary), so this test process never forks.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

mod common;

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::vsock_guest::*;
use common::{children, jails_unavailable, worker_pid, GuestMem};

/// Starts the daemon `cmd` describes with `RUST_LOG=info`, its log (stderr) in `log`
/// and stdout discarded.
fn spawn_logged(cmd: &mut Command, log: &Path) -> std::process::Child {
    cmd.env("RUST_LOG", "info")
        .stderr(File::create(log).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

fn status_field(pid: i32, key: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_owned()))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

fn ns(pid: impl std::fmt::Display, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

/// A fresh directory `<tmp>/<prefix><pid>` with permission bits `mode` (0o777 lets a
/// jailed worker, uid 65534 outside its namespace when the test runs as root, create
/// its sockets there).
fn scratch_dir(prefix: &str, mode: u32) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{prefix}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
    dir
}

fn wait_for_log(log: &Path, needle: &str) -> String {
    let deadline = Instant::now() + T;
    loop {
        let s = std::fs::read_to_string(log).unwrap_or_default();
        if s.contains(needle) {
            return s;
        }
        assert!(Instant::now() < deadline, "{needle:?} not in the log:\n{s}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A host connection to guest port 1234 over the jailed worker: handshake, data both
/// ways, with the dirty page log on.
fn session(socket: &Path, uds: &Path) {
    OpenSession::open(socket, uds).exchange(0);
}

#[test]
fn jailed_worker_serves_a_session_is_confined_and_is_restarted() {
    // As root the worker is uid 65534 outside its namespace: let it create the host
    // socket here.
    let dir = scratch_dir("outboard-jail-", 0o777);
    let socket = dir.join("vhost.sock");
    let uds = dir.join("vsock.sock");
    let log = dir.join("daemon.log");
    let mut daemon = spawn_logged(
        Command::new(env!("CARGO_BIN_EXE_outboard"))
            .args([
                "vsock",
                "--jail",
                "--jail-memory-mib",
                "300",
                "--jail-max-tasks",
                "3",
            ])
            .args(["--guest-cid", "3", "--socket"])
            .arg(&socket)
            .arg("--uds-path")
            .arg(&uds),
        &log,
    );
    let pid = i32::try_from(daemon.id()).unwrap();

    session(&socket, &uds);

    // The jail, seen from outside.
    let worker = worker_pid(pid);
    assert_eq!(status_field(worker, "Seccomp:"), "2", "seccomp filter mode");
    assert_eq!(status_field(worker, "NoNewPrivs:"), "1");
    assert_eq!(status_field(worker, "CapEff:"), "0000000000000000");
    assert_eq!(status_field(worker, "CapPrm:"), "0000000000000000");
    assert_eq!(status_field(worker, "CapBnd:"), "0000000000000000");
    assert_eq!(
        status_field(worker, "NSpid:").split_whitespace().last(),
        Some("1")
    );
    // SAFETY: getuid cannot fail.
    let outside_uid = if unsafe { libc::getuid() } == 0 {
        65534
    } else {
        // SAFETY: as above.
        unsafe { libc::getuid() }
    };
    let uid = status_field(worker, "Uid:");
    assert_eq!(
        uid.split_whitespace().next(),
        Some(outside_uid.to_string().as_str())
    );
    for kind in ["user", "mnt", "net", "pid", "ipc", "uts", "cgroup"] {
        assert_ne!(
            ns(worker, kind),
            ns("self", kind),
            "{kind} namespace shared"
        );
    }
    // Its memory and task ceilings, as configured.
    let limits = std::fs::read_to_string(format!("/proc/{worker}/limits")).unwrap();
    let limit = |name: &str| -> Vec<String> {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in {limits}"))[name.len()..]
            .split_whitespace()
            .take(2)
            .map(str::to_string)
            .collect()
    };
    assert_eq!(limit("Max data size"), ["314572800", "314572800"]);
    assert_eq!(limit("Max processes"), ["3", "3"]);
    // The pid-namespace relay above it runs under a filter of its own.
    let relay = children(pid)[0];
    assert_eq!(status_field(relay, "Seccomp:"), "2", "relay seccomp");
    // Only the uds directory is visible in its root.
    let root: Vec<String> = std::fs::read_dir(format!("/proc/{worker}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let top = dir
        .components()
        .nth(1)
        .unwrap()
        .as_os_str()
        .to_string_lossy()
        .into_owned();
    assert_eq!(root, vec![top]);

    // A worker that dies is reported with its signal and replaced on the same socket.
    // SAFETY: kill(2) on the worker, a descendant of our child.
    assert_eq!(unsafe { libc::kill(worker, libc::SIGKILL) }, 0);
    wait_for_log(&log, "killed by signal 9 (SIGKILL); starting a new one");
    session(&socket, &uds);
    let replacement = worker_pid(pid);
    assert_ne!(replacement, worker);

    // SIGTERM stops the worker and the daemon cleanly.
    let text = terminate(&mut daemon, &log);
    assert!(text.contains("stopped cleanly"), "{text}");
    assert!(!Path::new(&format!("/proc/{replacement}")).exists());
    assert!(!socket.exists() && !uds.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Guest `a` (CID 3) opens a connection to guest `b` (CID 4) port `port` and they
/// exchange data both ways.
fn sibling_session(a: &mut SimGuest, b: &mut SimGuest, port: u32) {
    let (ca, cb) = (GUEST_CID, GUEST_CID + 1);
    let src = port + 1000;
    a.send(header_cids(ca, cb, src, port, 0, OP_REQUEST), &[]);
    let req = b.recv_op(OP_REQUEST);
    assert_eq!((req.src_cid, req.src_port, req.dst_port), (ca, src, port));
    b.send(header_cids(cb, ca, port, src, 0, OP_RESPONSE), &[]);
    let resp = a.recv_op(OP_RESPONSE);
    assert_eq!(
        (resp.src_cid, resp.src_port, resp.dst_port),
        (cb, port, src)
    );
    let there: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
    a.send(header_cids(ca, cb, src, port, 3000, OP_RW), &there);
    let p = b.recv_op(OP_RW);
    assert_eq!((p.src_cid, p.payload.as_slice()), (ca, there.as_slice()));
    let back: Vec<u8> = (0..2000u32).map(|i| (i * 13 % 241) as u8).collect();
    b.send(header_cids(cb, ca, port, src, 2000, OP_RW), &back);
    let p = a.recv_op(OP_RW);
    assert_eq!((p.src_cid, p.payload.as_slice()), (cb, back.as_slice()));
}

/// `outboard vsock --jail` with two VMs in one group: each VM's device runs in its own
/// jailed worker, and the guests reach each other by CID through the link the daemon
/// made between the two workers. A killed worker is replaced and the link still
/// serves the new one; the counters show no invalid sibling message.
#[test]
fn jailed_workers_of_one_group_reach_each_other_across_a_restart() {
    if let Some(why) = jails_unavailable() {
        eprintln!("skipped: jails cannot be made here: {why}");
        return;
    }
    let dir = scratch_dir("outboard-jail-group-", 0o777);
    let vm = |cid: u64| {
        format!(
            "guest-cid={cid},socket={},uds-path={},groups=g",
            dir.join(format!("vhost{cid}.sock")).display(),
            dir.join(format!("vsock{cid}.sock")).display()
        )
    };
    let log = dir.join("daemon.log");
    let metrics = dir.join("metrics.json");
    let mut daemon = spawn_logged(
        Command::new(env!("CARGO_BIN_EXE_outboard"))
            .args(["vsock", "--jail", "--metrics-interval", "1", "--metrics"])
            .arg(&metrics)
            .args(["--vm", &vm(3), "--vm", &vm(4)]),
        &log,
    );
    let pid = i32::try_from(daemon.id()).unwrap();
    let (sock3, sock4) = (dir.join("vhost3.sock"), dir.join("vhost4.sock"));
    assert!(wait_for_path(&sock3) && wait_for_path(&sock4));
    let text = wait_for_log(&log, "reaches 1 sibling VM(s) of groups g");
    assert!(!text.contains("cannot reach"), "{text}");

    let mut a = SimGuest::up(&sock3);
    let mut b = SimGuest::up(&sock4);
    sibling_session(&mut a, &mut b, 6000);

    // Two workers, each in its own process: kill CID 4's.
    let workers: Vec<i32> = children(pid).into_iter().flat_map(children).collect();
    assert_eq!(workers.len(), 2, "{workers:?}");
    let comm = |p: i32| std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
    let w4 = *workers
        .iter()
        .find(|&&p| comm(p).trim() == "vsock-cid-4")
        .unwrap_or_else(|| {
            panic!(
                "no worker named vsock-cid-4: {:?}",
                workers.iter().map(|&p| comm(p)).collect::<Vec<_>>()
            )
        });
    // SAFETY: kill(2) of a process of this test's daemon, by pid.
    assert_eq!(unsafe { libc::kill(w4, libc::SIGKILL) }, 0);
    wait_for_log(&log, "vsock cid 4: worker pid");
    drop(b);
    // The new worker of CID 4 serves a new front-end, and the link still joins them.
    let mut b = SimGuest::up(&sock4);
    sibling_session(&mut a, &mut b, 6001);

    drop((a, b));
    let text = terminate(&mut daemon, &log);
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    for vm in doc["vms"].as_array().unwrap() {
        let c = &vm["counters"];
        assert!(c["sibling_packets"].as_u64().unwrap() >= 3, "{vm}");
        assert_eq!(c["err_sibling_invalid"].as_u64(), Some(0), "{vm}");
        assert_eq!(c["err_sibling_overrun"].as_u64(), Some(0), "{vm}");
    }
    assert!(text.contains("stopped cleanly"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The `counters` object of the metrics file's only VM, once the file exists and
/// parses (it is replaced atomically, so a read never sees half a document).
fn read_counters(path: &Path) -> Option<serde_json::Map<String, serde_json::Value>> {
    let text = std::fs::read_to_string(path).ok()?;
    let doc: serde_json::Value = serde_json::from_str(&text).ok()?;
    assert_eq!(doc["vms"].as_array().map(Vec::len), Some(1), "{doc}");
    assert_eq!(doc["vms"][0]["guest_cid"], GUEST_CID);
    doc["vms"][0]["counters"].as_object().cloned()
}

/// Reads the metrics file until `done` holds for its counters (within 10 s: the daemon
/// writes it every second), checking on every read that no counter went below the
/// highest value seen so far in `seen`.
fn wait_for_counters(
    path: &Path,
    seen: &mut std::collections::BTreeMap<String, u64>,
    what: &str,
    done: impl Fn(&dyn Fn(&str) -> u64) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(c) = read_counters(path) {
            for (name, value) in &c {
                let v = value.as_u64().unwrap_or_else(|| panic!("{name}: {value}"));
                let before = seen.entry(name.clone()).or_default();
                assert!(v >= *before, "{name} went backwards: {before} -> {v}");
                *before = v;
            }
            let get = |name: &str| {
                c.get(name)
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or_else(|| panic!("no counter {name} in {c:?}"))
            };
            if done(&get) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {c:?}");
        } else {
            assert!(Instant::now() < deadline, "{what}: no metrics file");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `--metrics` with `--jail`: the jailed worker publishes its device's counters, the
/// daemon writes them; they count a real session's packets, survive a killed worker
/// without going backwards, count the restart, and keep counting in the new worker.
#[test]
fn jailed_worker_counters_reach_the_metrics_file_across_a_restart() {
    if let Some(why) = jails_unavailable() {
        eprintln!("skipped: jails cannot be made here: {why}");
        return;
    }
    let dir = scratch_dir("outboard-jail-metrics-", 0o777);
    let socket = dir.join("vhost.sock");
    let uds = dir.join("vsock.sock");
    let log = dir.join("daemon.log");
    let metrics = dir.join("metrics.json");
    let prom = dir.join("outboard.prom");
    let mut daemon = spawn_logged(
        Command::new(env!("CARGO_BIN_EXE_outboard"))
            .args(["vsock", "--jail", "--metrics-interval", "1", "--metrics"])
            .arg(&metrics)
            .arg("--metrics-prometheus")
            .arg(&prom)
            .args(["--guest-cid", "3", "--socket"])
            .arg(&socket)
            .arg("--uds-path")
            .arg(&uds),
        &log,
    );
    let pid = i32::try_from(daemon.id()).unwrap();
    // A jail the kernel refuses shows as a daemon that exits or a worker that dies at
    // once: skip, with the daemon's words.
    std::thread::sleep(Duration::from_millis(300));
    let early = std::fs::read_to_string(&log).unwrap_or_default();
    if daemon.try_wait().unwrap().is_some() || early.contains("starting a new one") {
        let _ = daemon.kill();
        let _ = daemon.wait();
        eprintln!("skipped: the jailed worker could not start here:\n{early}");
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let mut seen = std::collections::BTreeMap::new();

    // Written at the start, before any traffic.
    wait_for_counters(&metrics, &mut seen, "first write", |c| {
        c("worker_restarts") == 0 && c("rx_packets") == 0
    });

    // One session: REQUEST and 3000 bytes to the guest, RESPONSE and 3000 bytes back.
    session(&socket, &uds);
    wait_for_counters(&metrics, &mut seen, "the first session", |c| {
        c("rx_packets") >= 2
            && c("rx_bytes") >= 3000
            && c("tx_packets") >= 2
            && c("tx_bytes") >= 3000
            && c("conns_added") >= 1
    });
    let first = seen.clone();

    // A killed worker's counters stay; the restart is counted.
    let worker = worker_pid(pid);
    // SAFETY: kill(2) on the worker, a descendant of our child.
    assert_eq!(unsafe { libc::kill(worker, libc::SIGKILL) }, 0);
    wait_for_log(&log, "killed by signal 9 (SIGKILL); starting a new one");
    wait_for_counters(&metrics, &mut seen, "the restart", |c| {
        c("worker_restarts") == 1
    });
    for name in ["rx_packets", "rx_bytes", "tx_packets", "tx_bytes"] {
        assert!(
            seen[name] >= first[name],
            "{name}: {seen:?} after {first:?}"
        );
    }

    // The new worker counts on top of the old one's.
    session(&socket, &uds);
    wait_for_counters(&metrics, &mut seen, "the second session", |c| {
        c("rx_bytes") >= first["rx_bytes"] + 3000
            && c("tx_bytes") >= first["tx_bytes"] + 3000
            && c("tx_packets") >= first["tx_packets"] + 2
            && c("conns_added") > first["conns_added"]
    });

    // The file written at exit keeps every counter; a stop is no restart.
    let text = terminate(&mut daemon, &log);
    assert!(text.contains("stopped cleanly"), "{text}");
    wait_for_counters(&metrics, &mut seen, "the file at exit", |c| {
        c("worker_restarts") == 1
    });
    // The Prometheus exposition carries the same counters, restarts included.
    let prom_text = std::fs::read_to_string(&prom).unwrap();
    let sample = format!(
        "outboard_vsock_worker_restarts{{guest_cid=\"3\",socket=\"{}\"}} 1",
        socket.display()
    );
    assert!(prom_text.lines().any(|l| l == sample), "{prom_text}");
    assert!(
        prom_text.contains("# HELP outboard_vsock_worker_restarts "),
        "{prom_text}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A `uds-path` directory the jailed worker's uid cannot write is a configuration
/// error found before any worker is forked: one message saying what to change, not a
/// worker that dies and is restarted forever.
#[test]
fn a_uds_dir_the_worker_cannot_write_is_refused_at_start() {
    let dir = scratch_dir("outboard-jail-ro-", 0o555);
    let sockets = std::env::temp_dir().join(format!("outboard-jail-ro-s-{}", std::process::id()));
    std::fs::create_dir_all(&sockets).unwrap();
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_outboard"))
        .args(["vsock", "--jail", "--guest-cid", "3", "--socket"])
        .arg(sockets.join("vhost.sock"))
        .arg("--uds-path")
        .arg(dir.join("vsock.sock"))
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(err.contains("cannot create its sockets in"), "{err}");
    assert!(err.contains("mode 0555"), "{err}");
    assert!(
        !err.contains("worker runs jailed"),
        "a worker was forked: {err}"
    );
    assert!(!sockets.join("vhost.sock").exists());
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&sockets).unwrap();
}

#[test]
fn jail_flags_are_checked() {
    let out = Command::new(env!("CARGO_BIN_EXE_outboard"))
        .args([
            "vsock",
            "--jail",
            "--jail-seccomp",
            "trap",
            "--guest-cid",
            "3",
            "--socket",
            "/nonexistent/a",
            "--uds-path",
            "/nonexistent/b",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("\"trap\""), "{e}");
    for (flag, value) in [("--jail-memory-mib", "8"), ("--jail-max-tasks", "1")] {
        let out = Command::new(env!("CARGO_BIN_EXE_outboard"))
            .args(["vsock", "--jail", flag, value, "--guest-cid", "3"])
            .args(["--socket", "/tmp/a", "--uds-path", "/tmp/b"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.contains(flag) && e.contains(value), "{e}");
    }
}

#[test]
fn jailed_media_worker_answers_and_dies_with_the_daemon() {
    let dir = scratch_dir("outboard-jail-media-", 0o755);
    let socket = dir.join("media.sock");
    let log = dir.join("daemon.log");
    let mut daemon = spawn_logged(
        Command::new(env!("CARGO_BIN_EXE_outboard"))
            .args([
                "media",
                "--camera",
                "--jail",
                "--shm-size-mib",
                "16",
                "--socket-path",
            ])
            .arg(&socket),
        &log,
    );
    let pid = i32::try_from(daemon.id()).unwrap();
    let mut fe = connect_frontend(&socket);
    let features = fe.get_features().unwrap();
    assert_ne!(features & (1 << 32), 0, "VERSION_1 offered: {features:#x}");
    let worker = worker_pid(pid);
    assert_eq!(status_field(worker, "Seccomp:"), "2");
    assert_ne!(ns(worker, "mnt"), ns("self", "mnt"));
    drop(fe);
    let relay = children(pid)[0];
    // A daemon killed outright takes its worker along (parent-death signals), even
    // though the worker's uid changed inside its user namespace.
    // SAFETY: kill(2) on our own child, which has not been reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    daemon.wait().unwrap();
    let gone = |p: i32| {
        std::fs::read_to_string(format!("/proc/{p}/status"))
            .map(|s| {
                s.lines()
                    .any(|l| l.starts_with("State:") && l.contains('Z'))
            })
            .unwrap_or(true)
    };
    let deadline = Instant::now() + T;
    while !(gone(relay) && gone(worker)) {
        assert!(
            Instant::now() < deadline,
            "jailed worker {worker} outlived its daemon"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `outboard media --camera --jail` driven as a guest uses it: frames streamed through
/// the jailed worker and checked byte for byte (the worker's first `clock_gettime` once
/// died of seccomp, which a test that only asked for the features never saw), no worker
/// death in the log; then the worker is killed mid-stream: the front-end must notice (the
/// connection lived in the worker and closes with it: a restarted worker could not
/// restore the rings, so a silent replacement would leave a dead device), the daemon
/// reports the death, and a new front-end gets a working camera from the replacement.
#[test]
fn jailed_camera_streams_and_a_killed_worker_closes_the_connection() {
    use outboard_devices::media::v4l2::PIX_FMT_YUYV;
    use outboard_tests::media::vhost::VhostMediaDriver;

    let dir = scratch_dir("outboard-jail-cam-", 0o755);
    let socket = dir.join("media.sock");
    let log = dir.join("daemon.log");
    let mut daemon = spawn_logged(
        Command::new(env!("CARGO_BIN_EXE_outboard"))
            .args(["media", "--camera", "--jail", "--socket-path"])
            .arg(&socket),
        &log,
    );
    let pid = i32::try_from(daemon.id()).unwrap();
    assert!(
        wait_for_path(&socket),
        "no socket: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    let mut driver = VhostMediaDriver::connect(&socket);
    let seen = driver.capture_mmap(4);
    assert_eq!(seen.len(), 4);
    let text = std::fs::read_to_string(&log).unwrap();
    for bad in ["SIGSYS", "signal 31", "starting a new one"] {
        assert!(!text.contains(bad), "{bad:?} in the daemon's log:\n{text}");
    }

    // Mid-stream: two frames of a second capture, then the worker is killed.
    let capture = driver.start_mmap_capture(PIX_FMT_YUYV, 640, 480);
    driver.check_frames(&capture, 2);
    let worker = common::kill_worker_under(pid, &mut driver, T);
    wait_for_log(&log, "killed by signal 9 (SIGKILL); starting a new one");
    drop(driver);
    let mut driver = VhostMediaDriver::connect(&socket);
    assert_eq!(driver.capture_mmap(3).len(), 3);
    assert_ne!(worker_pid(pid), worker);
    drop(driver);

    let text = terminate(&mut daemon, &log);
    assert!(!text.contains("SIGSYS"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Sends SIGTERM to the daemon, waits (10 s at most) for it to exit successfully and
/// returns its log.
fn terminate(daemon: &mut std::process::Child, log: &Path) -> String {
    let pid = i32::try_from(daemon.id()).unwrap();
    // SAFETY: kill(2) on our own child, which has not been reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = daemon.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "outboard ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    };
    let text = std::fs::read_to_string(log).unwrap();
    assert!(status.success(), "{status}\n{text}");
    text
}

fn wait_for_path(path: &Path) -> bool {
    let deadline = Instant::now() + T;
    while !path.exists() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Whether this host has AF_VSOCK with a transport to bind with; why not otherwise.
fn af_vsock_unavailable() -> Option<String> {
    vsock_bind(libc::VMADDR_PORT_ANY)
        .err()
        .map(|e| format!("AF_VSOCK cannot bind here ({e})"))
}

/// An AF_VSOCK stream socket bound to `port` on every local CID.
fn vsock_bind(port: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain old data; all-zeroes is valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    addr.svm_port = port;
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_vm of `len` bytes; `fd` is ours.
    let bound = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            len,
        )
    };
    if bound < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// `--forward-cid` with `--jail`: the jailed worker binds its AF_VSOCK forward port
/// and makes the AF_VSOCK connect a guest asks for, inside its namespaces and under
/// seccomp. Nothing listens at the forward CID's port, so the guest gets RST; the
/// worker must survive it (no restart), and the port must be bound (a second bind of
/// it here fails).
#[test]
fn jailed_worker_forwards_over_af_vsock() {
    if let Some(why) = jails_unavailable().or_else(af_vsock_unavailable) {
        eprintln!("SKIPPED jailed_worker_forwards_over_af_vsock: {why}");
        return;
    }
    let dir = scratch_dir("outboard-jail-fwd-", 0o755);
    let socket = dir.join("vhost.sock");
    let log = dir.join("daemon.log");
    let listen_port = 0x4e00_0000 + std::process::id() % 0x10000;
    let mut daemon = spawn_logged(
        Command::new(env!("CARGO_BIN_EXE_outboard"))
            .args(["vsock", "--jail", "--guest-cid", "3", "--socket"])
            .arg(&socket)
            .args(["--forward-cid", "2", "--forward-listen"])
            .arg(listen_port.to_string()),
        &log,
    );

    let mem = GuestMem::new(MEM);
    let mut rx = Ring::new(0x1000);
    let mut tx = Ring::new(0x20000);
    let mut fe = connect_frontend(&socket);
    bring_up(&mut fe, &mem, &rx, &tx);
    for id in 0..QSIZE {
        rx.offer(&mem, id, 0x1000, true);
    }
    let text = wait_for_log(&log, "AF_VSOCK forward to CID 2");
    assert!(
        text.contains(&format!("listening on ports {listen_port}")),
        "{text}"
    );
    // The worker bound the forward port.
    assert_eq!(
        vsock_bind(listen_port)
            .map(drop)
            .map_err(|e| e.raw_os_error()),
        Err(Some(libc::EADDRINUSE)),
        "the jailed worker did not bind port {listen_port}"
    );

    // A guest connect nobody at the forward CID accepts: RST from the port asked for.
    let port = listen_port + 1;
    send(&mem, &mut tx, header(1234, port, 0, OP_REQUEST), &[]);
    let p = recv(&mem, &mut rx);
    assert_eq!(
        (p.op, p.src_port, p.dst_port),
        (3, port, 1234),
        "RST expected"
    );
    // The worker is alive and still answers: a second connect gets its RST too.
    send(&mem, &mut tx, header(1235, port, 0, OP_REQUEST), &[]);
    let p = recv(&mem, &mut rx);
    assert_eq!((p.op, p.dst_port), (3, 1235));
    let text = terminate(&mut daemon, &log);
    assert_eq!(
        text.matches("worker runs jailed").count(),
        1,
        "the worker died and was restarted:\n{text}"
    );

    // A forward port the worker could not bind is a configuration error found before
    // any worker is forked, not a worker that dies at every start.
    let taken = vsock_bind(listen_port).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_outboard"))
        .args(["vsock", "--jail", "--socket"])
        .arg(&socket)
        .args(["--forward-cid", "2", "--forward-listen"])
        .arg(listen_port.to_string())
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    drop(taken);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!("cannot listen on AF_VSOCK port {listen_port}")),
        "{err}"
    );
    assert!(
        !err.contains("worker runs jailed"),
        "a worker was forked: {err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Context switches so far of every thread of `pid` and of all its descendants.
fn tree_context_switches(pid: i32) -> u64 {
    let mut total = 0;
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
                total += status
                    .lines()
                    .filter(|l| l.contains("ctxt_switches:"))
                    .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                    .sum::<u64>();
            }
        }
        todo.extend(children(p));
    }
    total
}

/// With `--jail` too, an idle daemon makes no wake-ups: not the supervisor, not the
/// pid-namespace relay, not the worker; nor once a guest runs with 64 open connections
/// that went quiet.
#[test]
fn an_idle_jailed_daemon_never_wakes_up() {
    if let Some(why) = jails_unavailable() {
        eprintln!("SKIPPED an_idle_jailed_daemon_never_wakes_up: {why}");
        return;
    }
    let dir = scratch_dir("outboard-jail-idle-", 0o777);
    let log = dir.join("daemon.log");
    let mut daemon = spawn_logged(
        Command::new(env!("CARGO_BIN_EXE_outboard"))
            .args(["vsock", "--jail", "--socket"])
            .arg(dir.join("vhost.sock"))
            .arg("--uds-path")
            .arg(dir.join("vsock.sock")),
        &log,
    );
    let pid = i32::try_from(daemon.id()).unwrap();
    wait_for_log(&log, "worker runs jailed");
    assert!(
        wait_for_path(&dir.join("vsock.sock")),
        "the worker never listened"
    );
    let quiet = || {
        std::thread::sleep(Duration::from_millis(300));
        let before = tree_context_switches(pid);
        std::thread::sleep(Duration::from_secs(2));
        tree_context_switches(pid) - before
    };
    let woke = quiet();
    let mut guest = SimGuest::up(&dir.join("vhost.sock"));
    let mut conns = OpenConnections::open(&mut guest, &dir.join("vsock.sock"), 48, 16);
    conns.traffic(&mut guest);
    let woke_with_conns = quiet();
    conns.traffic(&mut guest);
    drop(conns);
    drop(guest);
    terminate(&mut daemon, &log);
    assert_eq!(woke, 0, "{woke} wake-ups in 2 s while idle");
    assert_eq!(
        woke_with_conns, 0,
        "{woke_with_conns} wake-ups in 2 s with 64 idle connections"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A live upgrade of a jailed daemon in the middle of a session: a connection carries
/// data both ways, the daemon is replaced by `outboard vsock --jail --take-over`, and
/// the same front-end session and connection go on through the new daemon's jailed
/// worker (confined as the first was), with the dirty log still marked.
#[test]
fn a_jailed_daemon_is_upgraded_in_the_middle_of_a_session() {
    if let Some(why) = jails_unavailable() {
        println!("SKIPPED a_jailed_daemon_is_upgraded_in_the_middle_of_a_session: {why}");
        return;
    }
    let dir = scratch_dir("outboard-jail-upgrade-", 0o777);
    let socket = dir.join("vhost.sock");
    let uds = dir.join("vsock.sock");
    let upgrade = dir.join("upgrade.sock");
    let daemon = |take_over: bool, log: &Path| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_outboard"));
        cmd.args(["vsock", "--jail", "--guest-cid", "3", "--socket"])
            .arg(&socket)
            .arg("--uds-path")
            .arg(&uds)
            .arg("--upgrade-socket")
            .arg(&upgrade);
        if take_over {
            cmd.arg("--take-over");
        }
        spawn_logged(&mut cmd, log)
    };
    let mut old = daemon(false, &dir.join("old.log"));
    let mut session = OpenSession::open(&socket, &uds);
    session.exchange(0);

    let new_log = dir.join("new.log");
    let mut new = daemon(true, &new_log);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = old.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the old daemon did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "the old daemon exited {status}");
    let taken = wait_for_log(&new_log, "worker runs jailed");
    assert!(
        taken.contains("taken over with 1 connection(s) (jailed)"),
        "{taken}"
    );
    // The same connection through the new worker, which marks the log too.
    session.exchange(1);
    // The new worker is jailed and answers on the same session.
    let worker = worker_pid(i32::try_from(new.id()).unwrap());
    assert_eq!(status_field(worker, "Seccomp:"), "2");
    assert_eq!(status_field(worker, "NoNewPrivs:"), "1");
    assert!(session.fe.get_features().is_ok());
    let log_text = std::fs::read_to_string(&new_log).unwrap();
    assert!(!log_text.contains("front-end connected"), "{log_text}");

    drop(session);
    let pid = i32::try_from(new.id()).unwrap();
    // SAFETY: kill(2) on our own child, which has not been reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = new.try_wait().unwrap() {
            assert!(s.success(), "{s}");
            break;
        }
        assert!(Instant::now() < deadline, "the new daemon ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Hostile-peer defect 6: a guest that makes its jailed worker grow hits the worker's
/// memory ceiling (`--jail-memory-mib`). Here the guest of CID 4 pushes data for a host
/// connection that never reads, with a 64 MiB TX buffer (credit) its VM was configured
/// with: the buffered data passes the 48 MiB ceiling, that worker dies of it (the
/// allocation fails and it aborts: `SIGABRT`, not a seccomp kill) and is reported and
/// replaced, and CID 3's worker keeps its connection open and serving.
#[test]
fn a_worker_over_its_memory_ceiling_dies_alone() {
    if let Some(why) = jails_unavailable() {
        eprintln!("skipped: jails cannot be made here: {why}");
        return;
    }
    let dir = scratch_dir("outboard-jail-ceiling-", 0o777);
    let vm = |cid: u64, extra: &str| {
        format!(
            "guest-cid={cid},socket={},uds-path={}{extra}",
            dir.join(format!("vhost{cid}.sock")).display(),
            dir.join(format!("vsock{cid}.sock")).display()
        )
    };
    let log = dir.join("daemon.log");
    let mut daemon = spawn_logged(
        Command::new(env!("CARGO_BIN_EXE_outboard"))
            .args(["vsock", "--jail", "--jail-memory-mib", "48"])
            .args([
                "--vm",
                &vm(3, ""),
                "--vm",
                &vm(4, ",tx-buffer-size=67108864"),
            ]),
        &log,
    );
    let (sock3, sock4) = (dir.join("vhost3.sock"), dir.join("vhost4.sock"));
    assert!(wait_for_path(&sock3) && wait_for_path(&sock4));
    let mut good = OpenSession::open(&sock3, &dir.join("vsock3.sock"));
    good.exchange(0);

    // CID 4: a host connection to guest port 5000 whose host end never reads.
    let mut greedy = SimGuest::up(&sock4);
    let mut host = UnixStream::connect(dir.join("vsock4.sock")).unwrap();
    host.write_all(b"CONNECT 5000\n").unwrap();
    let req = greedy.recv_op(OP_REQUEST);
    let host_port = req.src_port;
    greedy.send(header_cids(4, 2, 5000, host_port, 0, OP_RESPONSE), &[]);
    // Every TX descriptor carries 4,000 bytes; all of them are offered at once and taken
    // back as the worker uses them, until it stops using them.
    const CHUNK: usize = 4000;
    let payload = vec![0x5au8; CHUNK];
    let hdr = header_cids(4, 2, 5000, host_port, CHUNK as u32, OP_RW);
    let (mem, tx) = (&greedy.mem, &mut greedy.tx);
    for id in 0..QSIZE {
        mem.write_bytes(tx.buf(id), &hdr);
        mem.write_bytes(tx.buf(id) + HDR, &payload);
    }
    let mut pushed = 0usize;
    let mut stuck_since = None;
    let start = Instant::now();
    while pushed < 64 << 20 {
        let in_flight = tx.next_avail.wrapping_sub(mem.read::<u16>(tx.used + 2));
        for _ in in_flight..QSIZE {
            let id = tx.next_avail % QSIZE;
            tx.offer(mem, id, (HDR + CHUNK) as u32, false);
            pushed += CHUNK;
        }
        if mem.read::<u16>(tx.used + 2) == tx.next_avail.wrapping_sub(QSIZE) {
            // Nothing used since the last round: the worker is gone, or busy.
            let since = *stuck_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(3) {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        } else {
            stuck_since = None;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "pushed {pushed}");
    }
    let text = wait_for_log(&log, "starting a new one");
    let death = text
        .lines()
        .find(|l| l.contains("starting a new one"))
        .unwrap_or_default();
    assert!(
        death.contains("vsock cid 4") && death.contains("aborted (SIGABRT"),
        "after {pushed} bytes: {death}\n{text}"
    );
    // It died over its ceiling, not before: it had taken well over 16 MiB.
    assert!(pushed > 16 << 20, "died after only {pushed} bytes: {text}");
    assert!(text.contains("memory allocation of"), "{text}");
    assert!(!text.contains("vsock cid 3: worker pid"), "{text}");
    // CID 3's connection lives on, and CID 4 gets a working device again.
    good.exchange(1);
    drop((greedy, host));
    let mut fresh = SimGuest::up(&sock4);
    let mut host = UnixStream::connect(dir.join("vsock4.sock")).unwrap();
    host.write_all(b"CONNECT 5001\n").unwrap();
    assert_eq!(fresh.recv_op(OP_REQUEST).dst_port, 5001);
    drop((good, fresh, host));
    let text = terminate(&mut daemon, &log);
    assert!(text.contains("stopped cleanly"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}
