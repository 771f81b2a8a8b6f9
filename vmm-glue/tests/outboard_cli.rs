//! The `outboard` binary as users run it: bad input exits 2 naming the value, the
//! capabilities are printed, and SIGTERM ends a serving daemon cleanly.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

mod common;

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::vsock_guest::connect_frontend as frontend;

fn outboard() -> Command {
    Command::new(env!("CARGO_BIN_EXE_outboard"))
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("outboard-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn usage_error(args: &[&str]) -> String {
    let out = outboard().args(args).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "args {args:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Waits up to 10 s for the daemon to create `path`.
fn wait_for_path(path: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends SIGTERM to `child`.
fn sigterm(child: &std::process::Child) {
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child, which has not been reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
}

/// Waits up to 10 s for `child` to exit; `what` names it for the failure.
fn wait_exit(child: &mut std::process::Child, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "{what} did not exit within 10 s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn bad_input_exits_2_and_names_the_value() {
    let e = usage_error(&[
        "vsock",
        "--guest-cid",
        "2",
        "--socket",
        "/tmp/x",
        "--uds-path",
        "/tmp/y",
    ]);
    assert!(e.contains("guest CID 2"), "{e}");
    let e = usage_error(&[
        "vsock",
        "--vm",
        "guest-cid=3,socket=/a,uds-path=/b,queue-size=3",
    ]);
    assert!(e.contains("queue size 3"), "{e}");
    let e = usage_error(&[
        "vsock",
        "--vm",
        "guest-cid=3,socket=/a,uds-path=/b",
        "--vm",
        "guest-cid=3,socket=/c,uds-path=/d",
    ]);
    assert!(e.contains("guest CID 3 is used by more than one VM"), "{e}");
    let e = usage_error(&["vsock", "--config", "/nonexistent/outboard.yaml"]);
    assert!(e.contains("/nonexistent/outboard.yaml"), "{e}");
    let e = usage_error(&["vsock", "--bogus"]);
    assert!(e.contains("--bogus"), "{e}");
    let e = usage_error(&["vsock"]);
    assert!(e.contains("no VM given"), "{e}");
}

#[test]
fn media_source_errors_exit_2_and_name_the_value() {
    let e = usage_error(&["media", "--socket-path", "/tmp/x"]);
    assert!(
        e.contains("exactly one of --camera and --v4l2-device"),
        "{e}"
    );
    let e = usage_error(&[
        "media",
        "--socket-path",
        "/tmp/x",
        "--camera",
        "--v4l2-device",
        "/dev/video0",
    ]);
    assert!(
        e.contains("exactly one of --camera and --v4l2-device"),
        "{e}"
    );
    let e = usage_error(&[
        "media",
        "--socket-path",
        "/tmp/x",
        "--v4l2-device",
        "/nonexistent/video9",
    ]);
    assert!(e.contains("/nonexistent/video9"), "{e}");
    if cfg!(feature = "v4l2-proxy") {
        assert!(e.contains("cannot open"), "{e}");
        // A file that is not a V4L2 node.
        let e = usage_error(&[
            "media",
            "--socket-path",
            "/tmp/x",
            "--v4l2-device",
            "/dev/null",
        ]);
        assert!(e.contains("/dev/null: not a V4L2 device"), "{e}");
    } else {
        assert!(e.contains("built without the `v4l2-proxy` feature"), "{e}");
    }
}

#[test]
fn prints_capabilities() {
    for (cmd, ty) in [("vsock", "vsock"), ("media", "media")] {
        let out = outboard()
            .args([cmd, "--print-capabilities"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{cmd}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["type"], ty);
    }
}

#[test]
fn sigterm_stops_cleanly_and_removes_the_sockets() {
    let dir = scratch("sigterm");
    let socket = dir.join("vhost.sock");
    let uds = dir.join("vsock.sock");
    let metrics = dir.join("metrics.json");
    let prom = dir.join("outboard.prom");
    let mut child = outboard()
        .args(["vsock", "--guest-cid", "3", "--socket"])
        .arg(&socket)
        .arg("--uds-path")
        .arg(&uds)
        .arg("--metrics")
        .arg(&metrics)
        .arg("--metrics-prometheus")
        .arg(&prom)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_path(&socket);
    // A front-end that connects and goes away does not end the daemon.
    drop(UnixStream::connect(&socket).unwrap());
    std::thread::sleep(Duration::from_millis(100));
    assert!(child.try_wait().unwrap().is_none());
    sigterm(&child);
    let status = wait_exit(&mut child, "outboard after SIGTERM");
    assert!(status.success(), "{status}");
    assert!(!socket.exists());
    assert!(!uds.exists());
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    assert_eq!(m["vms"][0]["guest_cid"], 3);
    assert!(m["vms"][0]["counters"]["rx_packets"].is_u64());
    let text = std::fs::read_to_string(&prom).unwrap();
    let sample = format!(
        "outboard_vsock_rx_packets{{guest_cid=\"3\",socket=\"{}\"}} 0",
        socket.display()
    );
    assert!(text.lines().any(|l| l == sample), "{text}");
    assert!(
        text.contains("# TYPE outboard_vsock_err_queue counter"),
        "{text}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn serves_an_inherited_listening_fd() {
    let dir = scratch("fd");
    let uds = dir.join("vsock.sock");
    serves_inherited_fd(&dir, |fd| {
        let mut cmd = outboard();
        cmd.args([
            "vsock",
            "--guest-cid",
            "3",
            "--fd",
            &fd.to_string(),
            "--uds-path",
        ])
        .arg(&uds);
        cmd
    });
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn media_serves_an_inherited_listening_fd() {
    let dir = scratch("media-fd");
    serves_inherited_fd(&dir, |fd| {
        let mut cmd = outboard();
        cmd.args(["media", "--camera", "--fd", &fd.to_string()]);
        cmd
    });
    // A socket the daemon did not bind is not its to remove.
    assert!(dir.join("vhost.sock").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs the daemon `command(fd)` makes with a listening socket it inherits as `fd`,
/// checks that a front-end reaching that socket is served, and stops it with SIGTERM.
fn serves_inherited_fd(dir: &std::path::Path, command: impl Fn(i32) -> Command) {
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixListener;
    use std::os::unix::process::CommandExt;

    let socket = dir.join("vhost.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let fd = listener.as_raw_fd();
    let mut cmd = command(fd);
    cmd.stderr(Stdio::null());
    // SAFETY: runs between fork and exec and only calls fcntl(2), which is
    // async-signal-safe: the listener must survive exec in the child.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(listener);
    // The daemon accepts on the inherited socket: a front-end connects and is served.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut fe = loop {
        if let Ok(fe) = outboard_transport::Frontend::connect(&socket) {
            break fe;
        }
        assert!(Instant::now() < deadline, "no front-end connection");
        std::thread::sleep(Duration::from_millis(10));
    };
    let features = fe.get_features().unwrap();
    assert_ne!(features & (1 << 32), 0, "VERSION_1 offered: {features:#x}");
    drop(fe);
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child, which has not been reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}

/// Waits for `path` to accept a vhost-user front-end and checks that it answers.
fn answers(path: &std::path::Path) {
    let mut fe = frontend(path);
    let features = fe.get_features().unwrap();
    assert_ne!(features & (1 << 32), 0, "VERSION_1 offered: {features:#x}");
}

fn stop(mut child: std::process::Child) {
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child, which has not been reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn serves_several_vms_from_flags_and_from_a_config_file() {
    let dir = scratch("multi");
    let p = |n: &str| dir.join(n).display().to_string();
    let child = outboard()
        .args(["vsock", "--vm"])
        .arg(format!(
            "guest-cid=3,socket={},uds-path={}",
            p("a.sock"),
            p("a.vsock")
        ))
        .arg("--vm")
        .arg(format!(
            "guest-cid=4,socket={},uds-path={},tx-buffer-size=131072,groups=g1+g2",
            p("b.sock"),
            p("b.vsock")
        ))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    answers(&dir.join("a.sock"));
    answers(&dir.join("b.sock"));
    stop(child);

    let config = dir.join("vms.yaml");
    std::fs::write(
        &config,
        format!(
            "vms:\n  - guest_cid: 5\n    socket: {}\n    uds_path: {}\n  - guest_cid: 6\n    socket: {}\n    uds_path: {}\n    queue_size: 256\n",
            p("c.sock"),
            p("c.vsock"),
            p("d.sock"),
            p("d.vsock")
        ),
    )
    .unwrap();
    let child = outboard()
        .args(["vsock", "--config"])
        .arg(&config)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    answers(&dir.join("c.sock"));
    answers(&dir.join("d.sock"));
    stop(child);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `groups=`: the daemon links the devices of VMs that share a group and no others.
#[test]
fn links_the_vms_of_a_group() {
    use std::io::Read;
    let dir = scratch("groups");
    let p = |n: &str| dir.join(n).display().to_string();
    let vm = |cid: u32, groups: &str| {
        format!(
            "guest-cid={cid},socket={},uds-path={},groups={groups}",
            p(&format!("{cid}.sock")),
            p(&format!("{cid}.vsock"))
        )
    };
    let mut child = outboard()
        .args(["vsock", "--vm", &vm(3, "a+b"), "--vm", &vm(4, "b")])
        .args(["--vm", &vm(5, "c")])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    for cid in [3, 4, 5] {
        answers(&dir.join(format!("{cid}.sock")));
    }
    stop(child);
    let mut log = String::new();
    stderr.read_to_string(&mut log).unwrap();
    assert!(
        log.contains("guest CID 4: reaches 1 sibling VM(s) of groups b"),
        "{log}"
    );
    assert!(!log.contains("guest CID 3: reaches"), "{log}");
    assert!(!log.contains("guest CID 5: reaches"), "{log}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The guest CID the vsock device behind `path` reports in its config space.
fn guest_cid_at(path: &std::path::Path) -> u64 {
    use outboard_protocol::vhost_user::{VhostUserConfigFlags, VhostUserProtocolFeatures};
    let mut fe = frontend(path);
    fe.get_features().unwrap();
    let offered = fe.get_protocol_features().unwrap();
    assert!(offered.contains(VhostUserProtocolFeatures::CONFIG));
    fe.set_protocol_features(VhostUserProtocolFeatures::CONFIG)
        .unwrap();
    let cfg = fe.get_config(0, 8, VhostUserConfigFlags::Frontend).unwrap();
    u64::from_le_bytes(cfg.try_into().unwrap())
}

/// Waits up to 10 s for a datagram on `sock` that contains `want`.
fn wait_notification(sock: &std::os::unix::net::UnixDatagram, want: &str) -> String {
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 512];
    loop {
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no {want:?} notification ({e}); saw {seen:?}"));
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        if text.lines().any(|l| l == want) {
            return text;
        }
        seen.push_str(&text);
        seen.push('|');
    }
}

/// Run as systemd runs a socket-activated service, by systemd's own
/// `systemd-socket-activate` (Debian's systemd package): two listening sockets passed
/// with LISTEN_FDS in the other order than the VMs are given (each goes to the VM whose
/// socket path it is bound to), READY=1 once serving and STOPPING=1 on SIGTERM through
/// NOTIFY_SOCKET.
#[test]
fn runs_socket_activated_by_systemd_and_notifies() {
    let activate = std::path::Path::new("/usr/bin/systemd-socket-activate");
    if !activate.exists() {
        eprintln!("skipped: no systemd-socket-activate (Debian package systemd; cargo xtask ci installs it)");
        return;
    }
    let dir = scratch("systemd");
    let (s3, s4) = (dir.join("vhost3.sock"), dir.join("vhost4.sock"));
    let notify_path = dir.join("notify");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    let vm = |cid: u64, socket: &std::path::Path| {
        format!(
            "guest-cid={cid},socket={},uds-path={}",
            socket.display(),
            dir.join(format!("vsock{cid}")).display()
        )
    };
    let mut child = Command::new(activate)
        .arg("-l")
        .arg(&s4)
        .arg("-l")
        .arg(&s3)
        .arg("-E")
        .arg(format!("NOTIFY_SOCKET={}", notify_path.display()))
        .arg(env!("CARGO_BIN_EXE_outboard"))
        .args(["vsock", "--vm", &vm(3, &s3), "--vm", &vm(4, &s4)])
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(s3.exists() && s4.exists()) {
        assert!(
            Instant::now() < deadline,
            "systemd-socket-activate made no sockets"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The first connection starts the service; each socket reaches its own VM.
    assert_eq!(guest_cid_at(&s3), 3);
    assert_eq!(guest_cid_at(&s4), 4);
    let ready = wait_notification(&notify, "READY=1");
    assert!(ready.contains("STATUS=serving 2 worker(s)"), "{ready}");
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child (systemd-socket-activate exec'd the daemon in
    // place, so the pid is the daemon's), which has not been reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    wait_notification(&notify, "STOPPING=1");
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// More sockets from systemd than VMs is a configuration error, said in one line.
#[test]
fn socket_activation_needs_one_socket_per_vm() {
    let activate = std::path::Path::new("/usr/bin/systemd-socket-activate");
    if !activate.exists() {
        eprintln!("skipped: no systemd-socket-activate (Debian package systemd)");
        return;
    }
    let dir = scratch("systemd-count");
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let child = Command::new(activate)
        .arg("-l")
        .arg(&a)
        .arg("-l")
        .arg(&b)
        .arg(env!("CARGO_BIN_EXE_outboard"))
        .args(["vsock", "--uds-path"])
        .arg(dir.join("vsock"))
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !a.exists() {
        assert!(
            Instant::now() < deadline,
            "systemd-socket-activate made no socket"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let _c = UnixStream::connect(&a).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("systemd passed 2 listening socket(s) (LISTEN_FDS) for 1 VM(s)"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The man pages come from the flag definitions themselves: every flag `--help` lists is
/// in the page, with the same defaults and units.
#[test]
fn man_pages_are_generated_from_the_flags() {
    let dir = scratch("man");
    let out = outboard()
        .args(["man", "--out-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (sub, page) in [("vsock", "outboard-vsock.1"), ("media", "outboard-media.1")] {
        let text = std::fs::read_to_string(dir.join(page)).unwrap();
        assert!(text.starts_with(".ie") || text.starts_with(".TH"), "{page}");
        assert!(text.contains(&format!(".TH outboard-{sub} 1")), "{page}");
        let help = outboard().args([sub, "--help"]).output().unwrap();
        let help = String::from_utf8_lossy(&help.stdout).into_owned();
        let flags: Vec<&str> = help
            .split_whitespace()
            .filter(|w| w.starts_with("--") && w.len() > 2)
            .map(|w| w.trim_end_matches([',', '.', ')', ':']))
            .filter(|w| {
                w.chars()
                    .skip(2)
                    .all(|c| c.is_ascii_lowercase() || c == '-')
            })
            .collect();
        assert!(flags.len() > 5, "{help}");
        for flag in flags {
            // roff escapes every '-' as '\-'.
            let roff = flag.replace('-', "\\-");
            assert!(text.contains(&roff), "{page} lacks {flag}");
        }
    }
    let vsock = std::fs::read_to_string(dir.join("outboard-vsock.1")).unwrap();
    assert!(
        vsock.contains("<SECS>") && vsock.contains("[default: 5]"),
        "{vsock}"
    );
    let media = std::fs::read_to_string(dir.join("outboard-media.1")).unwrap();
    assert!(
        media.contains("<MIB>") && media.contains("[default: 256]"),
        "{media}"
    );
    assert!(dir.join("outboard.1").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--log-format json`: every line is one JSON object, and the worker's lines name it.
#[test]
fn json_logs_name_the_worker_on_every_line() {
    let dir = scratch("json-log");
    let socket = dir.join("vhost.sock");
    let log = dir.join("log");
    let mut child = outboard()
        .args(["vsock", "--log-format", "json", "--socket"])
        .arg(&socket)
        .arg("--uds-path")
        .arg(dir.join("vsock"))
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    answers(&socket);
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child, which has not been reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert!(child.wait().unwrap().success());
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    // The default guest CID is 3.
    let worker: Vec<_> = lines
        .iter()
        .filter(|v| v["worker"] == "vsock cid 3")
        .collect();
    assert!(
        worker.iter().any(|v| v["msg"]
            .as_str()
            .is_some_and(|m| m.contains("waiting for a front-end"))),
        "{text}"
    );
    assert!(lines
        .iter()
        .all(|v| v["level"].is_string() && v["ts"].is_string()));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Context switches of every thread of process `pid` so far (voluntary: it slept and
/// was woken; involuntary: it was preempted while running).
fn context_switches(pid: u32) -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status =
            std::fs::read_to_string(task.unwrap().path().join("status")).unwrap_or_default();
        total += status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
    }
    total
}

/// A daemon whose guests are idle makes no wake-ups at all, with or without a
/// front-end connected: no thread polls on a timer (without `--metrics`).
#[test]
fn an_idle_daemon_never_wakes_up() {
    let dir = scratch("idle");
    let socket = dir.join("vhost.sock");
    let child = outboard()
        .args(["vsock", "--vm"])
        .arg(format!(
            "guest-cid=3,socket={},uds-path={}",
            socket.display(),
            dir.join("a.vsock").display()
        ))
        .arg("--vm")
        .arg(format!(
            "guest-cid=4,socket={},uds-path={}",
            dir.join("b.sock").display(),
            dir.join("b.vsock").display()
        ))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let fe = frontend(&socket);
    let wakeups = || {
        // Let start-up and the front-end's messages settle, then watch.
        std::thread::sleep(Duration::from_millis(300));
        let before = context_switches(child.id());
        std::thread::sleep(Duration::from_secs(2));
        context_switches(child.id()) - before
    };
    let connected = wakeups();
    drop(fe);
    let alone = wakeups();
    // Stopped before asserting, so a failure leaves no daemon behind.
    stop(child);
    assert_eq!(
        connected, 0,
        "a front-end connected: {connected} wake-ups in 2 s"
    );
    assert_eq!(alone, 0, "no front-end: {alone} wake-ups in 2 s");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A daemon serving a running guest with many open, idle connections makes no wake-ups
/// either: no timer is armed for an established connection, only for one that waits
/// for an answer (issue 18's "zero wake-ups while idle"). 96 connections opened by host
/// clients and 32 by the guest carry a byte each way, go quiet for 2 s with no context
/// switch of the daemon, then carry data again.
#[test]
fn open_idle_connections_make_no_wake_ups() {
    use common::vsock_guest::{OpenConnections, SimGuest};

    let dir = scratch("idle-conns");
    let socket = dir.join("vhost.sock");
    let uds = dir.join("v.sock");
    let child = outboard()
        .args(["vsock", "--guest-cid", "3", "--socket"])
        .arg(&socket)
        .arg("--uds-path")
        .arg(&uds)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut guest = SimGuest::up(&socket);
    wait_for_path(&uds);
    let mut conns = OpenConnections::open(&mut guest, &uds, 96, 32);
    conns.traffic(&mut guest);
    std::thread::sleep(Duration::from_millis(300));
    let before = context_switches(child.id());
    std::thread::sleep(Duration::from_secs(2));
    let woke = context_switches(child.id()) - before;
    // Still open and serving after the quiet spell.
    conns.traffic(&mut guest);
    drop(conns);
    drop(guest);
    stop(child);
    assert_eq!(woke, 0, "128 idle connections: {woke} wake-ups in 2 s");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Live upgrade from the command line: the flags' rules, a take-over with nothing to
/// take over, and an idle daemon replaced by a second one that then serves its
/// sockets, replaced in turn by a third, and stops cleanly.
#[test]
fn live_upgrade_from_the_command_line() {
    let e = usage_error(&[
        "vsock",
        "--socket",
        "/tmp/a",
        "--uds-path",
        "/tmp/b",
        "--take-over",
    ]);
    assert!(e.contains("--upgrade-socket"), "{e}");
    let e = usage_error(&[
        "vsock",
        "--vm",
        "guest-cid=3,socket=/tmp/a,uds-path=/tmp/b,groups=g",
        "--vm",
        "guest-cid=4,socket=/tmp/c,uds-path=/tmp/d,groups=g",
        "--upgrade-socket",
        "/tmp/e",
    ]);
    assert!(e.contains("share a sibling group"), "{e}");

    let dir = scratch("upgrade");
    let socket = dir.join("vhost.sock");
    let uds = dir.join("vsock.sock");
    let upgrade = dir.join("upgrade.sock");
    let start = |take_over: bool| {
        let mut cmd = outboard();
        cmd.args(["vsock", "--guest-cid", "3", "--socket"])
            .arg(&socket)
            .arg("--uds-path")
            .arg(&uds)
            .arg("--upgrade-socket")
            .arg(&upgrade)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if take_over {
            cmd.arg("--take-over");
        }
        cmd.spawn().unwrap()
    };
    // Nothing to take over: a clear error, exit 1.
    let mut lone = start(true);
    let status = wait_exit(&mut lone, "a take-over with nothing to take over");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut lone.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("cannot reach the running outboard"), "{err}");

    let mut old = start(false);
    wait_for_path(&upgrade);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&upgrade).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the upgrade socket is {mode:o}");
    for round in 0..2 {
        let mut new = start(true);
        let status = wait_exit(&mut old, "the old daemon");
        assert!(
            status.success(),
            "round {round}: the old daemon exited {status}"
        );
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            new.try_wait().unwrap().is_none(),
            "round {round}: the new one exited"
        );
        // It serves the sockets it took over.
        assert!(socket.exists() && uds.exists());
        drop(UnixStream::connect(&socket).unwrap());
        drop(UnixStream::connect(&uds).unwrap());
        old = new;
    }
    sigterm(&old);
    assert!(wait_exit(&mut old, "the last daemon").success());
    assert!(!socket.exists() && !uds.exists() && !upgrade.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A daemon told to stop (SIGTERM) while its workers are paused for a handover: the
/// new process's ACCEPT is refused, the workers resume and stop, and the daemon exits
/// 0 having removed its sockets; nothing is owned by both.
#[test]
fn sigterm_during_a_handover_refuses_the_commit_and_stops_cleanly() {
    use std::io::{Read, Write};
    let dir = scratch("upgrade-stop");
    let socket = dir.join("vhost.sock");
    let uds = dir.join("vsock.sock");
    let upgrade = dir.join("upgrade.sock");
    let mut old = outboard()
        .args(["vsock", "--guest-cid", "3", "--socket"])
        .arg(&socket)
        .arg("--uds-path")
        .arg(&uds)
        .arg("--upgrade-socket")
        .arg(&upgrade)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_path(&upgrade);
    let frame = |kind: u8, body: &[u8]| {
        let mut f = vec![kind];
        f.extend_from_slice(&(body.len() as u64).to_le_bytes());
        f.extend_from_slice(&0u32.to_le_bytes());
        f.extend_from_slice(body);
        f
    };
    let read_frame = |s: &mut UnixStream| {
        let mut head = [0u8; 13];
        s.read_exact(&mut head).unwrap();
        let len = u64::from_le_bytes(head[1..9].try_into().unwrap()) as usize;
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).unwrap();
        // The fds ride on one byte per 32 of them (dropped here, unread).
        let nfds = u32::from_le_bytes(head[9..13].try_into().unwrap()) as usize;
        let mut carrier = vec![0u8; nfds.div_ceil(32)];
        s.read_exact(&mut carrier).unwrap();
        (head[0], body)
    };
    let mut taker = UnixStream::connect(&upgrade).unwrap();
    taker
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut hello = b"OBUPGRAD".to_vec();
    hello.extend_from_slice(&1u32.to_le_bytes());
    hello.extend_from_slice(&std::process::id().to_le_bytes());
    taker.write_all(&frame(1, &hello)).unwrap();
    // STATE: the workers are paused now (its fds stay unread).
    let (kind, _) = read_frame(&mut taker);
    assert_eq!(kind, 2, "HELLO was not answered with STATE");
    sigterm(&old);
    std::thread::sleep(Duration::from_millis(300));
    taker.write_all(&frame(3, &[])).unwrap();
    // The commit is refused, with the reason.
    let (kind, body) = loop {
        let (k, b) = read_frame(&mut taker);
        if k != 2 {
            break (k, b);
        }
    };
    let reason = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(kind, 4, "ACCEPT answered with frame {kind}: {reason}");
    assert!(reason.contains("began to stop"), "{reason}");
    let status = wait_exit(&mut old, "the daemon stopping during a handover");
    assert!(status.success(), "{status}");
    assert!(!socket.exists() && !uds.exists() && !upgrade.exists());
    let _ = std::fs::remove_dir_all(&dir);
}
