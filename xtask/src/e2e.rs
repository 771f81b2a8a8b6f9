//! `cargo xtask e2e`: a real Linux guest under QEMU talks vsock through a vhost-user
//! back-end; every check moves checksummed data or provokes a refusal.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use crate::host::{self, Control, Done, Gen, SeqListener, Transfer};
use crate::util::{self, Result};
use crate::vm::{Backend, Vm};

const MIB: u64 = 1 << 20;
/// How long one transfer command may take in the guest.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the guest may take to boot and answer the control port.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// Sizes of the checks, from the environment so a developer can shrink them.
pub struct Sizes {
    /// Bytes of each bulk stream (one each way).
    pub bulk: u64,
    /// Concurrent connections per direction.
    pub conns: u32,
    /// Bytes per concurrent connection.
    pub per_conn: u64,
    /// Bytes of each stream that runs across the live upgrades.
    pub upgrade_bulk: u64,
}

impl Sizes {
    /// 256 MiB each way and 32 connections of 2 MiB, unless `OUTBOARD_E2E_BULK_MIB` says
    /// otherwise; 512 MiB each way across the live upgrades unless
    /// `OUTBOARD_E2E_UPGRADE_MIB` says otherwise.
    pub fn from_env() -> Sizes {
        let bulk = std::env::var("OUTBOARD_E2E_BULK_MIB")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(256);
        let upgrade = std::env::var("OUTBOARD_E2E_UPGRADE_MIB")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(512);
        Sizes {
            bulk: bulk * MIB,
            conns: 32,
            per_conn: 2 * MIB,
            upgrade_bulk: upgrade * MIB,
        }
    }
}

/// One check's outcome for the summary.
pub struct Check {
    name: String,
    detail: String,
    took: Duration,
    ok: bool,
}

/// Collects the checks of a run.
#[derive(Default)]
pub struct Report {
    checks: Vec<Check>,
}

impl Report {
    /// Runs one check, recording its outcome; returns whether it passed.
    pub fn check(&mut self, name: &str, f: impl FnOnce() -> Result<String>) -> bool {
        println!("e2e: {name} ...");
        let start = Instant::now();
        let r = f();
        let took = start.elapsed();
        let (ok, detail) = match r {
            Ok(d) => (true, d),
            Err(e) => (false, e),
        };
        println!(
            "e2e: {name}: {} ({:.1}s) {detail}",
            if ok { "ok" } else { "FAILED" },
            took.as_secs_f64()
        );
        self.checks.push(Check {
            name: name.to_string(),
            detail,
            took,
            ok,
        });
        ok
    }

    /// Prints the table; returns whether everything passed.
    pub fn print(&self) -> bool {
        println!("\n==> e2e summary");
        for c in &self.checks {
            println!(
                "  {:<44} {:<4} {:>7.1}s  {}",
                c.name,
                if c.ok { "ok" } else { "FAIL" },
                c.took.as_secs_f64(),
                c.detail
            );
        }
        let failed = self.checks.iter().filter(|c| !c.ok).count();
        println!(
            "e2e: {} passed, {failed} failed",
            self.checks.len() - failed
        );
        failed == 0 && !self.checks.is_empty()
    }
}

fn mib_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / MIB as f64 / took.as_secs_f64().max(1e-9)
}

/// Guest -> host: the guest opens `n` connections to host `port` and sends `bytes` on
/// each; the host verifies each transfer and the guest's reported checksums.
pub fn guest_to_host(
    ctl: &mut Control,
    uds: &std::path::Path,
    port: u32,
    n: u32,
    bytes: u64,
) -> Result<(Vec<Transfer>, Done, Duration)> {
    let listener = host::listen(uds, port)?;
    let start = Instant::now();
    let handle = {
        let l = listener
            .try_clone()
            .map_err(|e| format!("clone listener: {e}"))?;
        thread::spawn(move || {
            host::accept_each(&l, n as usize, TRANSFER_TIMEOUT, host::receive_transfer)
        })
    };
    let answer = ctl.command(&format!("SOURCE {port} {n} {bytes}"), TRANSFER_TIMEOUT);
    let took = start.elapsed();
    let results = handle
        .join()
        .map_err(|_| "host receiver panicked".to_string())?;
    let _ = std::fs::remove_file(host::host_port_path(uds, port));
    let done = Done::parse(&answer?)?;
    let mut transfers = Vec::new();
    for (i, r) in results?.into_iter().enumerate() {
        transfers.push(r.map_err(|e| format!("host side of connection {i}: {e}"))?);
    }
    verify(&transfers, &done, n, bytes)?;
    Ok((transfers, done, took))
}

/// Host -> guest: the guest listens on `port`, the host opens `n` connections and sends
/// `bytes` on each.
pub fn host_to_guest(
    ctl: &mut Control,
    uds: &std::path::Path,
    port: u32,
    n: u32,
    bytes: u64,
) -> Result<(Vec<Transfer>, Done, Duration)> {
    ctl.command_ready(&format!("SINK {port} {n}"), Duration::from_secs(30))?;
    let start = Instant::now();
    let mut threads = Vec::new();
    for i in 0..n {
        let uds = uds.to_path_buf();
        threads.push(thread::spawn(move || -> Result<Transfer> {
            let (mut s, _) = host::connect_guest(&uds, port, Duration::from_secs(30))?;
            host::send_transfer(&mut s, bytes, Gen::for_port(port + i))
        }));
    }
    let mut transfers = Vec::new();
    let mut first_err = None;
    for (i, t) in threads.into_iter().enumerate() {
        match t.join() {
            Ok(Ok(tr)) => transfers.push(tr),
            Ok(Err(e)) => {
                first_err.get_or_insert(format!("host connection {i}: {e}"));
            }
            Err(_) => {
                first_err.get_or_insert(format!("host connection {i}: sender panicked"));
            }
        }
    }
    let took = start.elapsed();
    let answer = ctl.answer(TRANSFER_TIMEOUT);
    if let Some(e) = first_err {
        return Err(match answer {
            Ok(_) => e,
            Err(g) => format!("{e}; guest: {g}"),
        });
    }
    let done = Done::parse(&answer?)?;
    verify(&transfers, &done, n, bytes)?;
    Ok((transfers, done, took))
}

fn verify(transfers: &[Transfer], done: &Done, n: u32, bytes: u64) -> Result<()> {
    let total: u64 = transfers.iter().map(|t| t.bytes).sum();
    let xor = transfers.iter().fold(0, |x, t| x ^ t.checksum);
    if transfers.len() != n as usize || done.ok != n {
        return Err(format!(
            "{} transfers on the host, {} in the guest, expected {n}",
            transfers.len(),
            done.ok
        ));
    }
    if total != u64::from(n) * bytes || done.bytes != total {
        return Err(format!(
            "host counted {total} bytes, guest {} bytes, expected {}",
            done.bytes,
            u64::from(n) * bytes
        ));
    }
    if xor != done.checksum {
        return Err(format!(
            "host checksums {xor:016x}, guest checksums {:016x}",
            done.checksum
        ));
    }
    Ok(())
}

fn describe(transfers: &[Transfer], done: &Done, took: Duration) -> String {
    let total: u64 = transfers.iter().map(|t| t.bytes).sum();
    format!(
        "{} conn, {} bytes, checksum {:016x} both sides, {:.1} MiB/s ({:.1}s in the guest)",
        transfers.len(),
        total,
        done.checksum,
        mib_s(total, took),
        done.usec as f64 / 1e6
    )
}

/// Where a run keeps its sockets and logs.
pub fn run_dir(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("outboard-{tag}-{}", std::process::id()))
}

/// Runs every check against `backend`; returns whether all passed.
pub fn run(backend: Backend, sizes: &Sizes) -> Result<bool> {
    let whole = Instant::now();
    let assets = crate::setup::prepare(&crate::setup::cache_dir())?;
    let dir = run_dir("e2e");
    println!(
        "e2e: booting the guest ({}) with {} as the vhost-user back-end; logs in {}",
        assets.accel,
        backend.name(),
        dir.display()
    );
    let mut vm = Vm::boot(&assets, backend, &dir)?;
    let mut report = Report::default();
    let passed = checks(&mut vm, sizes, &mut report);
    let all = report.print() && passed;
    if !all {
        vm.dump_logs();
    }
    println!("e2e: whole run {:.1}s", whole.elapsed().as_secs_f64());
    drop(vm);
    if all {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(all)
}

fn checks(vm: &mut Vm, sizes: &Sizes, report: &mut Report) -> bool {
    let mut ctl = None;
    let booted = report.check("guest boots, agent answers over vsock", || {
        let c = vm.control(BOOT_TIMEOUT)?;
        ctl = Some(c);
        Ok(format!(
            "{:.1}s after QEMU started",
            vm.started.elapsed().as_secs_f64()
        ))
    });
    let Some(mut ctl) = ctl.filter(|_| booted) else {
        return false;
    };
    let uds = vm.uds.clone();
    let mut ok = true;
    ok &= report.check(
        "migration: QEMU's blockers do not name the back-end",
        || migration_blockers(vm),
    );
    ok &= report.check("guest -> host stream, checksummed", || {
        let (t, d, took) = guest_to_host(&mut ctl, &uds, 5001, 1, sizes.bulk)?;
        Ok(describe(&t, &d, took))
    });
    ok &= report.check("host -> guest stream, checksummed", || {
        let (t, d, took) = host_to_guest(&mut ctl, &uds, 5002, 1, sizes.bulk)?;
        Ok(describe(&t, &d, took))
    });
    ok &= report.check("guest -> host concurrent connections", || {
        let (t, d, took) = guest_to_host(&mut ctl, &uds, 5003, sizes.conns, sizes.per_conn)?;
        Ok(describe(&t, &d, took))
    });
    ok &= report.check("host -> guest concurrent connections", || {
        let (t, d, took) = host_to_guest(&mut ctl, &uds, 5004, sizes.conns, sizes.per_conn)?;
        Ok(describe(&t, &d, took))
    });
    if let Backend::Outboard(_) = vm.kind {
        // Other back-ends (vhost-device-vsock 0.3) offer no dirty log for QEMU to start.
        ok &= report.check("dirty log: QEMU logs while data reaches the guest", || {
            dirty_log_under_qemu(vm, &mut ctl, &uds, sizes.bulk)
        });
    }
    ok &= report.check("SEQPACKET message boundaries", || {
        let l = SeqListener::bind(&uds, 5005)?;
        let echo = thread::spawn(move || l.echo_one(Duration::from_secs(20)));
        let answer = ctl.command("SEQ 5005 300", TRANSFER_TIMEOUT);
        let echoed = echo
            .join()
            .map_err(|_| "echo thread panicked".to_string())?;
        let done = Done::parse(&answer?)?;
        let (messages, bytes) = echoed?;
        if messages != u64::from(done.ok) || bytes != done.bytes {
            return Err(format!(
                "host echoed {messages} messages / {bytes} bytes, guest sent {} / {}",
                done.ok, done.bytes
            ));
        }
        Ok(format!(
            "{messages} messages of 1..60000 bytes, {bytes} bytes, each echoed whole"
        ))
    });
    ok &= report.check("no listener: refused both ways, others undisturbed", || {
        no_listener(vm, &mut ctl)
    });
    if matches!(vm.kind, Backend::Outboard(_)) {
        ok &= report.check(
            &format!(
                "live upgrade: {} in a row under load, nothing lost, no reset",
                crate::live_upgrade::UPGRADES
            ),
            || crate::live_upgrade::check(vm, sizes.upgrade_bulk),
        );
        ok &= report.check(
            "live upgrade refused or abandoned: the old process serves on",
            || crate::live_upgrade::check_refusals(vm),
        );
    }
    ok &= report.check("SIGTERM: back-end exits cleanly", || {
        vm.stop_backend(Duration::from_secs(15))?;
        if !vm.qemu.running() {
            return Err("QEMU died with the back-end".into());
        }
        Ok("exit status 0, QEMU still running".into())
    });
    if vm.backend.is_some() {
        return false;
    }
    drop(ctl);
    ok &= report.check("restart: QEMU reconnects, new connections work", || {
        // QEMU's vhost-user-vsock does not replay the device setup on reconnection: the
        // guest gives the dead device up, and it is plugged again once the chardev has
        // reconnected to the new back-end.
        vm.unplug()?;
        let start = Instant::now();
        let tx_buf = large_tx_buffer(&vm.kind);
        vm.restart_backend()?;
        vm.replug()?;
        let mut c = vm.control(Duration::from_secs(120))?;
        let reconnect = start.elapsed();
        let (t1, d1, _) = guest_to_host(&mut c, &uds, 5007, 4, 4 * MIB)?;
        let (t2, d2, _) = host_to_guest(&mut c, &uds, 5008, 4, 4 * MIB)?;
        Ok(format!(
            "agent reachable {:.1}s after restart{tx_buf}; 4+4 connections, {} + {} bytes, checksums {:016x} {:016x}",
            reconnect.as_secs_f64(),
            t1.iter().map(|t| t.bytes).sum::<u64>(),
            t2.iter().map(|t| t.bytes).sum::<u64>(),
            d1.checksum,
            d2.checksum
        ))
    });
    ok &= report.check(
        "back-end log: no worker died (seccomp or otherwise)",
        || {
            let log = util::read_log(&vm.backend_log);
            let deaths = util::worker_deaths(&log);
            let jailed = log.matches("worker runs jailed").count();
            if !deaths.is_empty() {
                Err(deaths.join("\n"))
            } else if crate::vm::jailed() && jailed == 0 {
                Err("OUTBOARD_E2E_JAIL is set but no worker reported running jailed".into())
            } else if crate::vm::jailed() {
                Ok(format!(
                    "{jailed} jailed workers (one per daemon start) served every check"
                ))
            } else {
                Ok("no jailed workers in this run".into())
            }
        },
    );
    ok
}

/// Asks QEMU what blocks migrating the VM (`query-migrate`'s `blocked-reasons`). QEMU
/// marks its vhost-user-vsock device itself non-migratable, which stays; a reason that
/// names the vhost back-end (it lacks `VHOST_USER_PROTOCOL_F_LOG_SHMFD` or
/// `VHOST_F_LOG_ALL`, the dirty page log) fails the check for outboard and is only
/// reported for other back-ends.
fn migration_blockers(vm: &mut Vm) -> Result<String> {
    let answer = vm.qmp.execute(r#"{"execute":"query-migrate"}"#)?;
    let reasons = blocked_reasons(&answer)?;
    let ours: Vec<&String> = reasons
        .iter()
        .filter(|r| {
            // QEMU's vhost blockers ("Migration disabled: vhost-user backend lacks
            // VHOST_USER_PROTOCOL_F_LOG_SHMFD feature.", "Migration disabled: vhost lacks
            // VHOST_F_LOG_ALL feature."); not the device's "non-migratable device:
            // .../vhost-user-vsock".
            r.starts_with("Migration disabled: vhost")
                || r.contains("LOG_SHMFD")
                || r.contains("LOG_ALL")
        })
        .collect();
    let listed = format!("blocked-reasons: {reasons:?}");
    match (&vm.kind, ours.is_empty()) {
        (_, true) => Ok(listed),
        (crate::vm::Backend::Outboard(_), false) => {
            Err(format!("QEMU blames the back-end: {ours:?} ({listed})"))
        }
        (_, false) => Ok(format!("(not outboard's) {listed}")),
    }
}

/// Has QEMU log dirty pages the way a migration does while a host -> guest stream runs:
/// `calc-dirty-rate` in `dirty-bitmap` mode starts QEMU's global dirty logging, which
/// makes every vhost device log (`SET_LOG_BASE` with QEMU's log memfd, `SET_FEATURES`
/// with `VHOST_F_LOG_ALL`, the running rings' addresses with `VHOST_VRING_F_LOG`),
/// reads the log while it measures, and turns logging off again. The stream and one
/// after it must arrive intact, and outboard must have taken QEMU's log.
fn dirty_log_under_qemu(
    vm: &mut Vm,
    ctl: &mut Control,
    uds: &std::path::Path,
    bytes: u64,
) -> Result<String> {
    vm.qmp.execute(
        r#"{"execute":"calc-dirty-rate","arguments":{"calc-time":2,"mode":"dirty-bitmap"}}"#,
    )?;
    let (t, d, took) = host_to_guest(ctl, uds, 5011, 1, bytes)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let rate = loop {
        let r = vm.qmp.execute(r#"{"execute":"query-dirty-rate"}"#)?;
        if r.contains("\"measured\"") {
            break r;
        }
        if Instant::now() >= deadline {
            return Err(format!("dirty rate not measured within 30 s: {r}"));
        }
        thread::sleep(Duration::from_millis(200));
    };
    // Verified like every transfer (byte count and checksum on both sides).
    let (_, after, _) = host_to_guest(ctl, uds, 5012, 1, bytes / 4)?;
    let log = util::read_log(&vm.backend_log);
    let lines: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split("dirty log: ").nth(1))
        .collect();
    // QEMU sizes its log for its memory regions and used rings: nothing the device
    // wrote may fall outside it.
    let expected = ["0x", "logging on", "logging off"];
    let missing: Vec<&str> = expected
        .iter()
        .filter(|e| !lines.iter().any(|l| l.starts_with(**e)))
        .copied()
        .collect();
    let outside: Vec<&&str> = lines.iter().filter(|l| l.contains("beyond")).collect();
    if !missing.is_empty() || !outside.is_empty() {
        return Err(format!(
            "the back-end's dirty log lines {lines:?} lack {missing:?} or report pages \
             outside QEMU's log {outside:?}; QEMU: {rate}"
        ));
    }
    Ok(format!(
        "{} while logging; {} bytes intact after it; back-end: {}",
        describe(&t, &d, took),
        after.bytes,
        lines.join("; ")
    ))
}

/// The strings of `"blocked-reasons": [...]` in a `query-migrate` answer (none when the
/// key is absent: nothing blocks).
fn blocked_reasons(answer: &str) -> Result<Vec<String>> {
    const KEY: &str = "\"blocked-reasons\":";
    let Some(at) = answer.find(KEY) else {
        return Ok(Vec::new());
    };
    let rest = answer[at + KEY.len()..].trim_start();
    let mut chars = rest
        .strip_prefix('[')
        .ok_or_else(|| format!("not a list: {answer}"))?
        .chars();
    let mut out = Vec::new();
    loop {
        match chars.by_ref().find(|c| !c.is_whitespace() && *c != ',') {
            Some(']') => return Ok(out),
            Some('"') => {
                let mut s = String::new();
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => s.extend(chars.next()),
                        Some(c) => s.push(c),
                        None => return Err(format!("unterminated string: {answer}")),
                    }
                }
                out.push(s);
            }
            _ => return Err(format!("unexpected blocked-reasons: {answer}")),
        }
    }
}

/// Makes the restarted `outboard` use a 1 MiB TX buffer (unless the extra flags choose
/// one): Linux guests keep at most their own 256 KiB socket buffer in flight, so guest
/// -> host streams stalled after 256 KiB when the device announced credit only once half
/// its buffer looked used. Returns a note for the report.
fn large_tx_buffer(kind: &Backend) -> &'static str {
    const VAR: &str = "OUTBOARD_E2E_BACKEND_ARGS";
    let extra = std::env::var(VAR).unwrap_or_default();
    if !matches!(kind, Backend::Outboard(_)) || extra.contains("tx-buffer-size") {
        return "";
    }
    // The e2e runs its checks one after another: no other thread reads the environment.
    std::env::set_var(VAR, format!("{extra} --tx-buffer-size 1048576"));
    " (tx buffer 1 MiB)"
}

/// A host connection to a guest port without listener is closed; a guest connection to
/// a host port without listener gets ECONNRESET; a transfer running meanwhile on
/// another connection completes intact.
fn no_listener(vm: &mut Vm, ctl: &mut Control) -> Result<String> {
    let uds = vm.uds.clone();
    let mut ctl2 = vm.control(Duration::from_secs(30))?;
    ctl2.command_ready("SINK 5006 1", Duration::from_secs(30))?;
    let sender = {
        let uds = uds.clone();
        thread::spawn(move || -> Result<Transfer> {
            let (mut s, _) = host::connect_guest(&uds, 5006, Duration::from_secs(30))?;
            host::send_transfer(&mut s, 32 * MIB, Gen::for_port(5006))
        })
    };
    // Host -> guest port 7777, where nobody listens: the muxer must close the socket,
    // never answer OK.
    let refused_h2g = refused_by_guest(&uds, 7777);
    // Guest -> host port 7778, where nobody listens.
    let _ = std::fs::remove_file(host::host_port_path(&uds, 7778));
    let refused_g2h = ctl.command("REFUSED 7778", Duration::from_secs(60));
    let sent = sender.join().map_err(|_| "sender panicked".to_string())?;
    let done = ctl2.answer(TRANSFER_TIMEOUT);
    let refused_h2g = refused_h2g?;
    let refused_g2h = refused_g2h?;
    if refused_g2h != "DONE ECONNRESET" {
        return Err(format!(
            "guest connect to a host port with no listener: {refused_g2h}, expected ECONNRESET"
        ));
    }
    let sent = sent.map_err(|e| format!("concurrent transfer: {e}"))?;
    let done = Done::parse(&done?)?;
    verify(&[sent], &done, 1, 32 * MIB)?;
    Ok(format!(
        "host->guest closed ({refused_h2g}); guest->host ECONNRESET; concurrent 32 MiB transfer intact ({:016x})",
        done.checksum
    ))
}

fn refused_by_guest(uds: &std::path::Path, port: u32) -> Result<String> {
    use std::io::{ErrorKind, Read, Write};
    let mut s = UnixStream::connect(uds).map_err(|e| format!("connect {}: {e}", uds.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| format!("set timeout: {e}"))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| format!("CONNECT {port}: {e}"))?;
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => Ok("closed".into()),
        Ok(n) => Err(format!(
            "CONNECT {port} with no listener was answered {:?}",
            String::from_utf8_lossy(&buf[..n])
        )),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok("reset".into()),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Err(format!(
            "CONNECT {port} with no listener was neither answered nor closed within 30 s"
        )),
        Err(e) => Err(format!("CONNECT {port}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::blocked_reasons;

    #[test]
    fn blocked_reasons_are_read_from_query_migrate() {
        // QEMU 10.0.2 with outboard before LOG_SHMFD, verbatim.
        let before = r#"{"return": {"blocked-reasons": ["Migration disabled: vhost-user backend lacks VHOST_USER_PROTOCOL_F_LOG_SHMFD feature.", "non-migratable device: 0000:00:01.0:00.0/vhost-user-vsock"]}}"#;
        assert_eq!(
            blocked_reasons(before).unwrap(),
            [
                "Migration disabled: vhost-user backend lacks VHOST_USER_PROTOCOL_F_LOG_SHMFD feature.",
                "non-migratable device: 0000:00:01.0:00.0/vhost-user-vsock"
            ]
        );
        assert_eq!(
            blocked_reasons(r#"{"return": {"blocked-reasons": ["a \"q\" b"]}}"#).unwrap(),
            [r#"a "q" b"#]
        );
        assert!(blocked_reasons(r#"{"return": {}}"#).unwrap().is_empty());
        assert!(blocked_reasons(r#"{"return": {"blocked-reasons": ["x"#).is_err());
    }
}
