//! The live-upgrade check of `cargo xtask e2e`: `outboard vsock` is replaced by a new
//! process (`--take-over`) ten times in a row while a checksummed stream runs each way,
//! a SEQPACKET conversation goes on and 32 idle connections stay open; everything must
//! survive with no byte lost and QEMU must never see its back-end go away.
//!
//! The data path's stall during each handover is measured from the outside: a 64-byte
//! ping-pong runs over one more connection the whole time, and the longest round trip
//! that overlaps a handover (from the new process's start to the old one's exit) is
//! that handover's stall, next to the round trips outside handovers.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::e2e::{guest_to_host, host_to_guest};
use crate::host::{self, Control, Done, SeqListener};
use crate::util::Result;
use crate::vm::Vm;

/// Upgrades in a row.
pub const UPGRADES: usize = 10;
/// Idle connections that must survive every upgrade.
const IDLE: u32 = 32;
/// Guest ports: idle connections, the pinger, the streams, the SEQPACKET conversation.
const IDLE_PORT: u32 = 6200;
const PING_PORT: u32 = 6300;
const G2H_PORT: u32 = 6400;
const H2G_PORT: u32 = 6401;
const SEQ_PORT: u32 = 6402;
const SHELL_PORT: u32 = 6403;
/// Messages of the SEQPACKET conversation (1 to 60000 bytes each, echoed).
const SEQ_MESSAGES: u32 = 3000;
const T: Duration = Duration::from_secs(30);
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(600);

fn roundtrip(s: &mut UnixStream, msg: &[u8]) -> Result<()> {
    s.write_all(msg).map_err(|e| format!("send: {e}"))?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).map_err(|e| format!("echo: {e}"))?;
    if back != msg {
        return Err("the echo differs from what was sent".into());
    }
    Ok(())
}

/// An echo connection to a guest port (the agent's `ECHO`), with its control
/// connection kept open (the agent's thread serves it until the connection closes).
fn echo_conn(uds: &Path, port: u32) -> Result<(Control, UnixStream)> {
    let mut c = Control::connect(uds, T)?;
    c.command_ready(&format!("ECHO {port}"), T)?;
    let (mut s, _) = host::connect_guest(uds, port, T)?;
    s.set_read_timeout(Some(T))
        .map_err(|e| format!("set timeout: {e}"))?;
    roundtrip(&mut s, format!("hello {port}").as_bytes())?;
    Ok((c, s))
}

/// What a stream check returns (`e2e::guest_to_host`, `e2e::host_to_guest`).
type StreamResult = Result<(Vec<host::Transfer>, Done, Duration)>;
/// A stream check.
type StreamFn = fn(&mut Control, &Path, u32, u32, u64) -> StreamResult;
/// A stream check running on its thread.
type StreamThread = thread::JoinHandle<StreamResult>;

/// The guest kernel's log (`dmesg` through the agent's `SHELL`).
fn guest_dmesg(uds: &Path, port: u32) -> Result<Vec<String>> {
    let mut c = Control::connect(uds, T)?;
    c.command_ready(&format!("SHELL {port}"), T)?;
    let (mut s, _) = host::connect_guest(uds, port, T)?;
    s.set_read_timeout(Some(T))
        .map_err(|e| format!("set timeout: {e}"))?;
    s.write_all(b"dmesg; exit\n")
        .map_err(|e| format!("run dmesg: {e}"))?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .map_err(|e| format!("dmesg output: {e}"))?;
    let _ = c.answer(T);
    Ok(String::from_utf8_lossy(&out)
        .lines()
        .filter(|l| l.starts_with('['))
        .map(str::to_string)
        .collect())
}

/// The device's counters in the daemon's metrics file.
fn counters(vm: &Vm) -> Result<std::collections::BTreeMap<String, u64>> {
    let path = vm.socket.with_file_name("metrics.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (_, mut vms) = crate::vsock_suite::parse_metrics(&text);
    vms.remove(&crate::vm::GUEST_CID).ok_or_else(|| {
        format!(
            "no counters of guest CID {} in {}",
            crate::vm::GUEST_CID,
            path.display()
        )
    })
}

/// Round trips: when each was sent and how long it took.
type Pings = Arc<Mutex<Vec<(Instant, Duration)>>>;

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i]
}

/// Runs the check; returns the figures for the report.
pub fn check(vm: &mut Vm, bulk: u64) -> Result<String> {
    let uds = vm.uds.clone();
    let qemu_before = vm.qemu_vhost_lines().len();
    let log_before = crate::util::read_log(&vm.backend_log).len();
    let dmesg_before = guest_dmesg(&uds, SHELL_PORT)?;
    if dmesg_before.is_empty() {
        return Err("the guest's dmesg printed nothing".into());
    }
    let mut idle = Vec::new();
    for i in 0..IDLE {
        idle.push(echo_conn(&uds, IDLE_PORT + i)?);
    }
    // The pinger.
    let (_ping_ctl, mut ping) = echo_conn(&uds, PING_PORT)?;
    let pings: Pings = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let pinger = {
        let (pings, stop) = (pings.clone(), stop.clone());
        thread::spawn(move || -> Result<u64> {
            let msg = [0x5au8; 64];
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                roundtrip(&mut ping, &msg).map_err(|e| format!("ping {n}: {e}"))?;
                pings
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((t, t.elapsed()));
                n += 1;
                thread::sleep(Duration::from_millis(2));
            }
            Ok(n)
        })
    };
    // The streams and the conversation, each on its own control connection.
    let ends: Arc<Mutex<Vec<(&'static str, Instant)>>> = Arc::default();
    let stream = |name: &'static str, f: StreamFn, port: u32| -> Result<StreamThread> {
        let mut c = Control::connect(&uds, T)?;
        let (uds, ends) = (uds.clone(), ends.clone());
        Ok(thread::spawn(move || {
            let r = f(&mut c, &uds, port, 1, bulk);
            ends.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((name, Instant::now()));
            r
        }))
    };
    let g2h = stream("guest -> host stream", guest_to_host, G2H_PORT)?;
    let h2g = stream("host -> guest stream", host_to_guest, H2G_PORT)?;
    let seq = {
        let mut c = Control::connect(&uds, T)?;
        let l = SeqListener::bind(&uds, SEQ_PORT)?;
        let echo = thread::spawn(move || l.echo_one(TRANSFER_TIMEOUT));
        let ends = ends.clone();
        thread::spawn(move || -> Result<(u64, u64, Done)> {
            let answer = c.command(&format!("SEQ {SEQ_PORT} {SEQ_MESSAGES}"), TRANSFER_TIMEOUT);
            ends.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(("SEQPACKET conversation", Instant::now()));
            let echoed = echo
                .join()
                .map_err(|_| "echo thread panicked".to_string())??;
            let done = Done::parse(&answer?)?;
            Ok((echoed.0, echoed.1, done))
        })
    };
    // Let the streams get going, then upgrade again and again.
    thread::sleep(Duration::from_millis(1500));
    let counters_before = counters(vm)?;
    let mut windows = Vec::new();
    let mut handovers = Vec::new();
    for n in 0..UPGRADES {
        let start = Instant::now();
        let handover = vm.upgrade_backend(n)?;
        windows.push((start, Instant::now()));
        handovers.push(handover);
        thread::sleep(Duration::from_millis(300));
    }
    let last = windows.last().map(|w| w.1).ok_or("no upgrade ran")?;
    let g2h = g2h
        .join()
        .map_err(|_| "guest -> host stream panicked".to_string())??;
    let h2g = h2g
        .join()
        .map_err(|_| "host -> guest stream panicked".to_string())??;
    let (messages, seq_bytes, seq_done) = seq
        .join()
        .map_err(|_| "SEQPACKET thread panicked".to_string())??;
    if messages != u64::from(seq_done.ok) || seq_bytes != seq_done.bytes {
        return Err(format!(
            "SEQPACKET: the host echoed {messages} messages / {seq_bytes} bytes, the guest \
             sent {} / {}",
            seq_done.ok, seq_done.bytes
        ));
    }
    // Each ran across every upgrade, or the check proves less than it says.
    for (name, end) in ends.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        if *end < last {
            return Err(format!(
                "the {name} ended before the last upgrade: make it longer \
                 (OUTBOARD_E2E_BULK_MIB)"
            ));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let pinged = pinger.join().map_err(|_| "pinger panicked".to_string())??;
    for (i, (_, s)) in idle.iter_mut().enumerate() {
        roundtrip(s, format!("still here {i}").as_bytes())
            .map_err(|e| format!("idle connection {i} after {UPGRADES} upgrades: {e}"))?;
    }
    let pings = pings.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut stalls = Vec::new();
    let mut outside = Vec::new();
    for (sent, rtt) in &pings {
        let end = *sent + *rtt;
        if windows.iter().any(|(a, b)| end >= *a && *sent <= *b) {
            continue;
        }
        outside.push(*rtt);
    }
    for (a, b) in &windows {
        let worst = pings
            .iter()
            .filter(|(sent, rtt)| *sent + *rtt >= *a && sent <= b)
            .map(|(_, rtt)| *rtt)
            .max()
            .unwrap_or_default();
        stalls.push(worst);
    }
    let max_stall = stalls.iter().max().copied().unwrap_or_default();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let outside_p50 = percentile(&mut outside.clone(), 0.5);
    let outside_max = percentile(&mut outside, 1.0);
    let stall_list: Vec<String> = stalls.iter().map(|d| format!("{:.0}", ms(*d))).collect();
    let handover_list: Vec<String> = handovers.iter().map(|d| format!("{:.0}", ms(*d))).collect();
    let reconnects: Vec<String> = vm.qemu_vhost_lines().split_off(qemu_before);
    if !reconnects.is_empty() {
        return Err(format!(
            "QEMU saw the back-end go: {}",
            reconnects.join(" | ")
        ));
    }
    // The counters carried on: none went back (the metrics file is rewritten every
    // second by whichever process serves).
    thread::sleep(Duration::from_millis(1500));
    let counters_after = counters(vm)?;
    let back: Vec<String> = counters_before
        .iter()
        .filter(|(k, v)| counters_after.get(*k).is_none_or(|a| a < *v))
        .map(|(k, v)| format!("{k} {v} -> {:?}", counters_after.get(k)))
        .collect();
    if !back.is_empty() {
        return Err(format!(
            "counters went back across the upgrades: {}",
            back.join(", ")
        ));
    }
    // Every old process said it handed over and exited; every new one took the
    // device over with the connections open and never saw a new front-end.
    let log = crate::util::read_log(&vm.backend_log);
    let log = log.get(log_before..).unwrap_or_default();
    let handed = log.matches("VM(s) handed over to pid").count();
    let conns: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split("taken over with ").nth(1))
        .filter_map(|rest| rest.split(' ').next())
        .collect();
    let new_sessions = log.matches("front-end connected").count();
    if handed != UPGRADES || conns.len() != UPGRADES || new_sessions != 0 {
        return Err(format!(
            "back-end log: {handed} handovers, {} take-overs, {new_sessions} new front-end \
             sessions (expected {UPGRADES}, {UPGRADES}, 0)",
            conns.len()
        ));
    }
    // The guest's kernel said nothing about its vsock device or transport meanwhile.
    let dmesg_after = guest_dmesg(&uds, SHELL_PORT + 1)?;
    let new_kernel: Vec<&String> = dmesg_after.iter().skip(dmesg_before.len()).collect();
    let about_vsock: Vec<&&String> = new_kernel
        .iter()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("vsock") || l.contains("virtio")
        })
        .collect();
    if !about_vsock.is_empty() {
        return Err(format!(
            "the guest kernel logged during the upgrades: {about_vsock:?}"
        ));
    }
    if max_stall > Duration::from_secs(2) {
        return Err(format!(
            "the data path stalled {:.0} ms during a handover (stalls per upgrade, ms: {})",
            ms(max_stall),
            stall_list.join(" ")
        ));
    }
    Ok(format!(
        "{UPGRADES} upgrades mid-stream; {} + {} bytes checksummed ({:016x}, {:016x}); \
         SEQPACKET {messages} messages / {seq_bytes} bytes echoed whole; {IDLE} idle \
         connections answer; QEMU never reconnected; counters carried on (tx_bytes {} -> \
         {}); the guest kernel log ({} lines \
         before) gained {} line(s), none about vsock or virtio; connections carried per upgrade: {}. Ping RTT during handovers (ms): {} \
         (max {:.0}); outside them p50 {:.1} / max {:.0} ms over {pinged} pings; new \
         process start to old process exit (ms): {}",
        g2h.1.bytes,
        h2g.1.bytes,
        g2h.1.checksum,
        h2g.1.checksum,
        counters_before.get("tx_bytes").copied().unwrap_or_default(),
        counters_after.get("tx_bytes").copied().unwrap_or_default(),
        dmesg_before.len(),
        new_kernel.len(),
        conns.join(" "),
        stall_list.join(" "),
        ms(max_stall),
        ms(outside_p50),
        ms(outside_max),
        handover_list.join(" ")
    ))
}

/// Frame kinds of the upgrade conversation (`outboard_vmm_glue::upgrade`).
const HELLO: u8 = 1;
const STATE: u8 = 2;
const REFUSE: u8 = 4;

/// Says `HELLO` with `version` on the old process's upgrade socket; returns the kind
/// of its answer and the socket.
fn fake_taker(socket: &Path, version: u32) -> Result<(u8, Vec<u8>, UnixStream)> {
    let mut s =
        UnixStream::connect(socket).map_err(|e| format!("connect {}: {e}", socket.display()))?;
    s.set_read_timeout(Some(T))
        .map_err(|e| format!("set timeout: {e}"))?;
    let mut body = Vec::new();
    body.extend_from_slice(b"OBUPGRAD");
    body.extend_from_slice(&version.to_le_bytes());
    body.extend_from_slice(&std::process::id().to_le_bytes());
    let mut frame = vec![HELLO];
    frame.extend_from_slice(&(body.len() as u64).to_le_bytes());
    frame.extend_from_slice(&0u32.to_le_bytes());
    frame.extend_from_slice(&body);
    s.write_all(&frame)
        .map_err(|e| format!("send HELLO: {e}"))?;
    let mut head = [0u8; 13];
    s.read_exact(&mut head)
        .map_err(|e| format!("the answer to HELLO: {e}"))?;
    let mut len = [0u8; 8];
    len.copy_from_slice(&head[1..9]);
    let len = u64::from_le_bytes(len).min(1 << 20) as usize;
    let mut answer = vec![0u8; len];
    s.read_exact(&mut answer)
        .map_err(|e| format!("the answer's body: {e}"))?;
    Ok((head[0], answer, s))
}

/// The failure rules of a live upgrade, each followed by a check that the old process
/// still serves (the same pid, data both ways over a connection opened before):
/// a new process that refuses (a TX buffer size the guest was not promised), a taker
/// that vanishes after receiving the state, and one of another protocol version.
pub fn check_refusals(vm: &mut Vm) -> Result<String> {
    let uds = vm.uds.clone();
    let socket = crate::vm::upgrade_socket(&vm.socket);
    let pid = vm
        .backend
        .as_ref()
        .ok_or("the back-end is not running")?
        .pid();
    let (_ctl, mut conn) = echo_conn(&uds, PING_PORT + 1)?;
    let mut serving = |what: &str, vm: &mut Vm| -> Result<()> {
        let b = vm.backend.as_mut().ok_or("the back-end is gone")?;
        if !b.running() || b.pid() != pid {
            return Err(format!(
                "after {what}, the old back-end (pid {pid}) is not running"
            ));
        }
        roundtrip(&mut conn, format!("after {what}").as_bytes())
            .map_err(|e| format!("after {what}, the open connection: {e}"))
    };
    // 1. The new process refuses: it exits with an error, the old one serves on.
    let mut cmd = vm.kind.command(&vm.socket, &vm.uds);
    cmd.args(["--take-over", "--tx-buffer-size", "4096"]);
    let out = cmd
        .output()
        .map_err(|e| format!("start the refusing back-end: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || !stderr.contains("TX buffer size") {
        return Err(format!(
            "a take-over with another TX buffer size: exit {}, log:\n{stderr}",
            out.status
        ));
    }
    serving("a refusing new process", vm)?;
    // 2. A taker that receives the state and vanishes.
    let (kind, _, s) = fake_taker(&socket, 1)?;
    if kind != STATE {
        return Err(format!("HELLO was answered with frame {kind}, not STATE"));
    }
    drop(s);
    std::thread::sleep(Duration::from_millis(200));
    serving("a taker that vanished after STATE", vm)?;
    // 3. Another protocol version is refused with the reason.
    let (kind, body, _) = fake_taker(&socket, 99)?;
    let reason = String::from_utf8_lossy(&body).to_string();
    if kind != REFUSE || !reason.contains("version 99") {
        return Err(format!(
            "HELLO of version 99 was answered {kind}: {reason:?}"
        ));
    }
    serving("a taker of version 99", vm)?;
    let first = stderr
        .lines()
        .find(|l| l.contains("TX buffer size"))
        .unwrap_or_default()
        .trim()
        .to_string();
    Ok(format!(
        "pid {pid} served on after each: a new process that refused ({first:?}), a taker \
         gone after STATE, and REFUSE {reason:?} to version 99"
    ))
}
