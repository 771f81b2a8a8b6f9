//! Live upgrade of `outboard vsock`: a new process takes every running VM over from
//! the old one, with the front-ends' sessions, guest memory, rings and every vsock
//! connection, and the old one exits. QEMU sees nothing: its vhost-user connection,
//! eventfds and memory stay the same kernel objects, only the process behind them
//! changes.
//!
//! The old daemon (started with `--upgrade-socket PATH`) listens on `PATH`. The new one
//! (the same command line plus `--take-over`) connects and they speak in frames (below):
//!
//! 1. new -> old `HELLO`: [`UPGRADE_MAGIC`], [`UPGRADE_VERSION`], its pid.
//! 2. old: pauses every worker between two batches of events (each hands over its
//!    parcel: see `vhost_user::daemon::UpgradeHandle`), then old -> new `STATE`: the
//!    magic, version and pid, a count, then per VM its guest CID, its vhost-user
//!    socket path and its worker record, with the count of its fds; every fd follows.
//!    If a worker cannot pause, or the version is not one the old process speaks, it
//!    answers `REFUSE` with the reason and resumes every worker.
//! 3. new: checks everything against its own configuration and sets every VM up (maps
//!    memory, checks each ring's position against guest memory, rebuilds every
//!    connection) without touching a ring, then new -> old `ACCEPT`, or `REFUSE` with
//!    the reason and exits.
//! 4. old: on `ACCEPT`, tells each worker to let go (it closes its copies without a
//!    reset), answers `DONE` and exits with status 0. On `REFUSE`, end of file, an
//!    error or [`TAKER_TIMEOUT`], it resumes every worker and serves on: the new
//!    process owns nothing until `DONE`.
//! 5. new: on `DONE` (or end of file after `ACCEPT`: the old process is gone) starts its
//!    workers, which carry on from the rings' own indices, and listens on `PATH` for
//!    the next upgrade.
//!
//! A frame is a `u8` kind, a `u64` body length, a `u32` fd count (all little-endian),
//! the body, then the fds in messages of one byte each carrying up to 32 fds
//! (`SCM_RIGHTS`). Bodies are [`outboard_protocol::record`] records; `REFUSE`'s is the
//! reason in UTF-8.

use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use outboard_protocol::record::{RecordReader, RecordWriter};

use crate::supervisor::handover;
use crate::vhost_user::daemon::{Parcel, UpgradeHandle};
use crate::vhost_user::frames::{
    kind_name, recv_frame, send_frame, ACCEPT, DONE, HELLO, MAX_BODY, REFUSE, STATE,
};

/// First field of `HELLO` and `STATE` ("OBUPGRAD").
pub const UPGRADE_MAGIC: u64 = u64::from_le_bytes(*b"OBUPGRAD");
/// The upgrade conversation this build speaks.
pub const UPGRADE_VERSION: u32 = 1;
/// How long either side waits for the other's next frame (the old process resumes
/// its workers after this; the new one gives up).
pub const TAKER_TIMEOUT: Duration = Duration::from_secs(30);
/// How many times the workers are asked to pause before the upgrade is refused.
const PAUSE_ATTEMPTS: u32 = 5;
/// How long a worker may take to pause.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a worker may take to let go after `ACCEPT`.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most VMs in a `STATE` frame.
const MAX_VMS: usize = 4096;

fn hello() -> Vec<u8> {
    let mut w = RecordWriter::new();
    w.u64(UPGRADE_MAGIC)
        .u32(UPGRADE_VERSION)
        .u32(std::process::id());
    w.as_bytes().to_vec()
}

/// Reads the magic, version and pid that start `HELLO` and `STATE`.
fn check_hello(r: &mut RecordReader<'_>, what: &str) -> Result<u32, String> {
    let magic = r.u64("magic").map_err(|e| e.to_string())?;
    if magic != UPGRADE_MAGIC {
        return Err(format!("{what} is not an outboard upgrade frame"));
    }
    let version = r.u32("version").map_err(|e| e.to_string())?;
    if version != UPGRADE_VERSION {
        return Err(format!(
            "{what} speaks upgrade version {version}, this build {UPGRADE_VERSION}"
        ));
    }
    r.u32("pid").map_err(|e| e.to_string())
}

/// One VM's worker in the old process, as the upgrade server sees it.
#[derive(Debug)]
pub struct UpgradableVm {
    /// The guest CID (identifies the VM to the new process).
    pub guest_cid: u64,
    /// The vhost-user socket path (checked by the new process).
    pub socket: PathBuf,
    /// The worker's upgrade handle.
    pub handle: UpgradeHandle,
}

/// Serves upgrade requests on `listener` (bound at `path`) until one succeeds: then
/// the workers have let go and the process exits with status 0 (without removing any
/// socket: the new process serves them). Runs on its own thread.
pub fn serve_upgrades(listener: UnixListener, path: PathBuf, vms: Vec<UpgradableVm>) {
    log::info!(
        "live upgrade: a new process started with --take-over can take over at {}",
        path.display()
    );
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                log::warn!("live upgrade: accept on {}: {e}", path.display());
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        // Whoever takes over gets every VM's memory: only this user (or root) may.
        match peer_allowed(&stream) {
            Ok(()) => {}
            Err(e) => {
                log::warn!(
                    "live upgrade: refused a connection on {}: {e}",
                    path.display()
                );
                let _ = send_frame(&stream, REFUSE, e.as_bytes(), &[]);
                continue;
            }
        }
        let started = Instant::now();
        match hand_over(&stream, &vms) {
            Ok(pid) => {
                // Under systemd this process is the unit's main process: name the new
                // one before exiting, so that the unit is not taken for dead (the new
                // one needs to run in the unit's cgroup; see README).
                crate::systemd::Notifier::from_env()
                    .notify(&format!("MAINPID={pid}\nSTATUS=handed over to pid {pid}"));
                log::info!(
                    "live upgrade: {} VM(s) handed over to pid {pid} in {:.1} ms; exiting",
                    vms.len(),
                    started.elapsed().as_secs_f64() * 1e3
                );
                log::logger().flush();
                std::process::exit(0);
            }
            Err(e) => log::warn!("live upgrade: not handed over, serving on: {e}"),
        }
    }
}

/// Whether the process at the other end of `stream` may take the VMs over: it must run
/// as this process's user, or as root.
fn peer_allowed(stream: &UnixStream) -> Result<(), String> {
    let cred = rustix::net::sockopt::socket_peercred(stream)
        .map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
    let me = rustix::process::geteuid();
    if cred.uid == me || cred.uid.is_root() {
        Ok(())
    } else {
        Err(format!(
            "pid {} runs as uid {}, this process as uid {}: only the same user or root may \
             take over",
            cred.pid.as_raw_nonzero(),
            cred.uid.as_raw(),
            me.as_raw()
        ))
    }
}

/// Binds the upgrade socket at `path` (a stale socket there is replaced), readable and
/// writable by this user only.
pub fn bind_upgrade_socket(path: &Path) -> Result<UnixListener, String> {
    use std::os::unix::fs::PermissionsExt;
    crate::supervisor::remove_stale_socket(path)?;
    // Bound under a temporary name, made 0600, then renamed into place (atomically): at
    // its path the socket never has the umask's mode, not even for a moment.
    let name = path
        .file_name()
        .ok_or_else(|| format!("{}: not a file path", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let l =
        UnixListener::bind(&tmp).map_err(|e| format!("cannot listen on {}: {e}", tmp.display()))?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("chmod 600 {}: {e}", tmp.display()))
        .and_then(|()| {
            std::fs::rename(&tmp, path)
                .map_err(|e| format!("rename {} to {}: {e}", tmp.display(), path.display()))
        });
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(l)
}

/// Pauses every worker; if one cannot, resumes those paused and says why.
fn pause_all(vms: &[UpgradableVm]) -> Result<Vec<Parcel>, String> {
    let mut parcels = Vec::with_capacity(vms.len());
    for vm in vms {
        match vm.handle.pause(PAUSE_TIMEOUT) {
            Ok(p) => parcels.push(p),
            Err(e) => {
                for done in &vms[..parcels.len()] {
                    done.handle.resume();
                }
                return Err(format!("guest CID {}: {e}", vm.guest_cid));
            }
        }
    }
    Ok(parcels)
}

/// One upgrade conversation; `Ok(pid)` once every worker let go.
fn hand_over(stream: &UnixStream, vms: &[UpgradableVm]) -> Result<u32, String> {
    stream
        .set_read_timeout(Some(TAKER_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TAKER_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    let hello_frame = recv_frame(stream)?;
    if hello_frame.kind != HELLO {
        return Err(format!(
            "expected HELLO, got {}",
            kind_name(hello_frame.kind)
        ));
    }
    let pid = match check_hello(&mut RecordReader::new(&hello_frame.body), "the new process") {
        Ok(pid) => pid,
        Err(e) => {
            let _ = send_frame(stream, REFUSE, e.as_bytes(), &[]);
            return Err(e);
        }
    };
    if !handover::begin() {
        let reason = "this outboard is stopping".to_string();
        let _ = send_frame(stream, REFUSE, reason.as_bytes(), &[]);
        return Err(reason);
    }
    let outcome = hand_over_paused(stream, vms, pid);
    if outcome.is_err() {
        handover::end(false);
    }
    outcome
}

/// The rest of [`hand_over`], between `handover::begin` and its end.
fn hand_over_paused(stream: &UnixStream, vms: &[UpgradableVm], pid: u32) -> Result<u32, String> {
    log::info!("live upgrade: pid {pid} asks to take over; pausing the workers");
    // Pause every worker; if one cannot (a front-end in the middle of a message, a
    // back-end channel request in flight: states that pass in microseconds), the
    // others resume and all are asked again a little later.
    let mut attempt = 0;
    let parcels = loop {
        attempt += 1;
        match pause_all(vms) {
            Ok(p) => break p,
            Err(e) if attempt < PAUSE_ATTEMPTS => {
                log::info!("live upgrade: attempt {attempt}: {e}; trying again");
                std::thread::sleep(Duration::from_millis(20 * u64::from(attempt)));
            }
            Err(e) => {
                let reason = format!("after {attempt} attempts: {e}");
                let _ = send_frame(stream, REFUSE, reason.as_bytes(), &[]);
                return Err(reason);
            }
        }
    };
    let resume_all = || vms.iter().for_each(|vm| vm.handle.resume());
    let mut w = RecordWriter::new();
    w.u64(UPGRADE_MAGIC)
        .u32(UPGRADE_VERSION)
        .u32(std::process::id())
        .count(vms.len());
    let mut fds = Vec::new();
    for (vm, p) in vms.iter().zip(parcels) {
        w.u64(vm.guest_cid)
            .bytes(vm.socket.as_os_str().as_bytes())
            .bytes(&p.record)
            .count(p.fds.len());
        fds.extend(p.fds);
    }
    let body = match w.into_bytes() {
        Ok(b) => b,
        Err(e) => {
            resume_all();
            return Err(e.to_string());
        }
    };
    let sent = send_frame(stream, STATE, &body, &fds);
    // Our duplicates: the new process has its own now (or never will).
    drop(fds);
    if let Err(e) = sent {
        resume_all();
        return Err(e);
    }
    let answer = match recv_frame(stream) {
        Ok(f) => f,
        Err(e) => {
            resume_all();
            return Err(format!("pid {pid} did not answer STATE: {e}"));
        }
    };
    match answer.kind {
        ACCEPT => {}
        REFUSE => {
            resume_all();
            return Err(format!(
                "pid {pid} refused: {}",
                String::from_utf8_lossy(&answer.body)
            ));
        }
        k => {
            resume_all();
            return Err(format!("pid {pid} answered {}", kind_name(k)));
        }
    }
    // The point of no return: the new process owns the devices (unless this daemon
    // began to stop meanwhile: then the workers serve on until they stop).
    if !handover::end(true) {
        resume_all();
        let reason = "this outboard began to stop".to_string();
        let _ = send_frame(stream, REFUSE, reason.as_bytes(), &[]);
        return Err(reason);
    }
    for vm in vms {
        if let Err(e) = vm.handle.commit(COMMIT_TIMEOUT) {
            log::error!(
                "live upgrade: guest CID {}: {e}; exiting anyway (the new process owns it)",
                vm.guest_cid
            );
        }
    }
    let _ = send_frame(stream, DONE, &[], &[]);
    Ok(pid)
}

/// One VM's state received by the new process.
#[derive(Debug)]
pub struct TakenVm {
    /// The guest CID.
    pub guest_cid: u64,
    /// The vhost-user socket path the old process served it on.
    pub socket: PathBuf,
    /// The worker's parcel.
    pub parcel: Parcel,
}

/// The new process's side, between `STATE` and `ACCEPT`.
#[derive(Debug)]
pub struct TakeOver {
    stream: UnixStream,
    /// The old process's pid.
    pub pid: u32,
    /// Every VM it served.
    pub vms: Vec<TakenVm>,
}

/// Connects to the old process at `path`, says `HELLO` and receives its state.
pub fn request_take_over(path: &Path) -> Result<TakeOver, String> {
    let stream = UnixStream::connect(path).map_err(|e| {
        format!(
            "cannot reach the running outboard at {}: {e} (is it running with \
             --upgrade-socket {}?)",
            path.display(),
            path.display()
        )
    })?;
    stream
        .set_read_timeout(Some(TAKER_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TAKER_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    send_frame(&stream, HELLO, &hello(), &[])?;
    let frame = recv_frame(&stream)?;
    match frame.kind {
        STATE => {}
        REFUSE => {
            return Err(format!(
                "the running outboard refused: {}",
                String::from_utf8_lossy(&frame.body)
            ))
        }
        k => return Err(format!("expected STATE, got {}", kind_name(k))),
    }
    let refuse = |stream: &UnixStream, e: String| {
        let _ = send_frame(stream, REFUSE, e.as_bytes(), &[]);
        e
    };
    let parsed = parse_state(&frame.body, frame.fds);
    match parsed {
        Ok((pid, vms)) => Ok(TakeOver { stream, pid, vms }),
        Err(e) => Err(refuse(&stream, e)),
    }
}

fn parse_state(body: &[u8], fds: Vec<OwnedFd>) -> Result<(u32, Vec<TakenVm>), String> {
    let e = |e: outboard_protocol::record::RecordError| e.to_string();
    let mut r = RecordReader::new(body);
    let pid = check_hello(&mut r, "the running outboard")?;
    let n = r.count("VMs", MAX_VMS, 16).map_err(e)?;
    let mut fds = fds.into_iter();
    let mut vms = Vec::with_capacity(n);
    for _ in 0..n {
        let guest_cid = r.u64("guest CID").map_err(e)?;
        let socket = r.bytes("socket path", 4096).map_err(e)?;
        let socket = PathBuf::from(std::ffi::OsStr::from_bytes(socket));
        let record = r
            .bytes("worker record", MAX_BODY as usize)
            .map_err(e)?
            .to_vec();
        let nfds = r.u32("worker fds").map_err(e)? as usize;
        let mine: Vec<OwnedFd> = fds.by_ref().take(nfds).collect();
        if mine.len() != nfds {
            return Err(format!(
                "guest CID {guest_cid}: {nfds} fds named, {} came",
                mine.len()
            ));
        }
        vms.push(TakenVm {
            guest_cid,
            socket,
            parcel: Parcel { record, fds: mine },
        });
    }
    r.finish().map_err(e)?;
    if fds.next().is_some() {
        return Err("STATE came with more fds than it names".into());
    }
    Ok((pid, vms))
}

impl TakeOver {
    /// Tells the old process everything is set up (`ACCEPT`) and waits for it to let
    /// go (`DONE`). From `Ok` on this process owns every VM: start the workers.
    pub fn accept(self) -> Result<(), String> {
        send_frame(&self.stream, ACCEPT, &[], &[])?;
        match recv_frame(&self.stream) {
            Ok(f) if f.kind == DONE => Ok(()),
            Ok(f) => Err(format!(
                "the old process answered ACCEPT with {}",
                kind_name(f.kind)
            )),
            // It exits right after DONE; an end of file without it means it died
            // after ACCEPT, when it had stopped touching the devices already.
            Err(e) if e.contains("closed the connection") => {
                log::warn!(
                    "live upgrade: pid {} closed without DONE; taking over",
                    self.pid
                );
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Tells the old process why this one will not take over (it resumes serving).
    pub fn refuse(self, reason: &str) {
        let _ = send_frame(&self.stream, REFUSE, reason.as_bytes(), &[]);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn fds(n: usize) -> Vec<OwnedFd> {
        (0..n)
            .map(|_| OwnedFd::from(std::fs::File::open("/dev/null").unwrap()))
            .collect()
    }

    #[test]
    fn frames_carry_their_body_and_any_number_of_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        let body: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let sender = std::thread::spawn(move || send_frame(&a, STATE, &body, &fds(70)));
        let f = recv_frame(&b).unwrap();
        sender.join().unwrap().unwrap();
        assert_eq!(f.kind, STATE);
        assert_eq!(f.body.len(), 100_000);
        assert_eq!(f.body[99_999], (99_999u32) as u8);
        assert_eq!(f.fds.len(), 70);
    }

    #[test]
    fn a_frame_beyond_the_limits_or_cut_short_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut head = vec![STATE];
        head.extend_from_slice(&(MAX_BODY + 1).to_le_bytes());
        head.extend_from_slice(&0u32.to_le_bytes());
        (&a).write_all(&head).unwrap();
        let e = recv_frame(&b).err().unwrap();
        assert!(e.contains("beyond the limits"), "{e}");
        let (a, b) = UnixStream::pair().unwrap();
        let mut head = vec![STATE];
        head.extend_from_slice(&10u64.to_le_bytes());
        head.extend_from_slice(&0u32.to_le_bytes());
        (&a).write_all(&head).unwrap();
        (&a).write_all(b"short").unwrap();
        drop(a);
        assert!(recv_frame(&b).is_err());
    }

    fn state(vms: &[(u64, &str, &[u8], u32)]) -> Vec<u8> {
        let mut w = RecordWriter::new();
        w.u64(UPGRADE_MAGIC)
            .u32(UPGRADE_VERSION)
            .u32(42)
            .count(vms.len());
        for (cid, path, record, nfds) in vms {
            w.u64(*cid).bytes(path.as_bytes()).bytes(record).u32(*nfds);
        }
        w.into_bytes().unwrap()
    }

    #[test]
    fn state_is_split_per_vm_and_checked() {
        let body = state(&[
            (3, "/run/a.sock", b"rec-a", 2),
            (4, "/run/b.sock", b"rec-b", 1),
        ]);
        let (pid, vms) = parse_state(&body, fds(3)).unwrap();
        assert_eq!(pid, 42);
        assert_eq!(vms.len(), 2);
        assert_eq!(vms[0].guest_cid, 3);
        assert_eq!(vms[0].socket, PathBuf::from("/run/a.sock"));
        assert_eq!(vms[0].parcel.fds.len(), 2);
        assert_eq!(vms[1].parcel.record, b"rec-b");
        assert_eq!(vms[1].parcel.fds.len(), 1);
        // Too few fds, too many, a truncated record, another version.
        let e = parse_state(&body, fds(2)).unwrap_err();
        assert!(e.contains("1 fds named, 0 came"), "{e}");
        let e = parse_state(&body, fds(4)).unwrap_err();
        assert!(e.contains("more fds"), "{e}");
        let e = parse_state(&body[..body.len() - 1], fds(3)).unwrap_err();
        assert!(e.contains("ends inside"), "{e}");
        let mut other = body.clone();
        other[8] = 2;
        let e = parse_state(&other, fds(3)).unwrap_err();
        assert!(e.contains("upgrade version 2"), "{e}");
    }
}
