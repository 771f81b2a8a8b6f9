//! The `outboard vsock` binary against a hostile front-end, as an attacker would drive
//! it: a ring whose available index runs ahead of the ring, a front-end that sends half
//! a message and stalls, one that never reads its replies, and one that truncates its
//! memory. In each case the daemon's other VM keeps serving, a fresh front-end is
//! served, the daemon does not burn CPU, and SIGTERM ends it within 2 s with its sockets
//! removed; repeated, the attacks leave no fd and no memory behind.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

mod common;

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::vsock_guest::OpenSession;
use common::{bfd, GuestMem};
use outboard_protocol::vhost_user::{
    VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserVirtioFeatures, VhostUserVringAddr,
};
use outboard_transport::{Frontend, MemoryRegionRef};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 0x40000;
const UVA: u64 = 0x7f00_0000_0000;
/// vsock's TX ring.
const TX: u32 = 1;
const RING: u16 = 256;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("outboard-hostile-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `outboard vsock` serving two VMs (CID 3 on `a.sock`, CID 4 on `b.sock`).
struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Daemon {
    fn start(name: &str) -> Daemon {
        let dir = scratch(name);
        let vm = |cid: u32, s: &str| {
            format!(
                "guest-cid={cid},socket={},uds-path={}",
                dir.join(format!("{s}.sock")).display(),
                dir.join(format!("{s}.vsock")).display()
            )
        };
        let child = Command::new(env!("CARGO_BIN_EXE_outboard"))
            .args(["vsock", "--vm", &vm(3, "a"), "--vm", &vm(4, "b")])
            .env("RUST_LOG", "warn")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let d = Daemon { child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(d.socket("a").exists() && d.socket("b").exists()) {
            assert!(Instant::now() < deadline, "the daemon did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }

    /// `outboard media --camera` on `m.sock`, with `max_sessions` sessions at most.
    fn media(name: &str, max_sessions: usize) -> Daemon {
        let dir = scratch(name);
        let child = Command::new(env!("CARGO_BIN_EXE_outboard"))
            .args(["media", "--camera", "--shm-size-mib", "16", "--socket"])
            .arg(dir.join("m.sock"))
            .args(["--max-sessions", &max_sessions.to_string()])
            .env("RUST_LOG", "warn")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let d = Daemon { child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !d.socket("m").exists() {
            assert!(Instant::now() < deadline, "the daemon did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }

    fn socket(&self, vm: &str) -> PathBuf {
        self.dir.join(format!("{vm}.sock"))
    }

    /// User + system CPU time of the daemon so far.
    fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // Fields after the command name (which is in parentheses): utime is the 14th
        // field of the line, stime the 15th.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        // SAFETY: sysconf with a valid name.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_millis(ticks * 1000 / hz)
    }

    /// Open fds of the daemon.
    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .count()
    }

    /// Resident memory of the daemon, KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// Waits up to 3 s for the daemon's fd count to come back to `baseline` (a dropped
    /// front-end's fds are closed as its worker notices), and returns the last count.
    fn fds_settle(&self, baseline: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let n = self.fds();
            if n <= baseline || Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Checks that the idle daemon burns at most `limit` of CPU over one second.
    fn assert_idle(&self, limit: Duration) {
        let burnt = self.cpu_over(Duration::from_secs(1));
        assert!(burnt <= limit, "idle daemon CPU {burnt:?}/s");
    }

    /// [`Daemon::sigterm`], and the log (returned) has fewer than `max` lines: every
    /// line a peer causes is rate-limited.
    fn sigterm_with_log_under(self, max: usize) -> String {
        let log = self.sigterm();
        let n = log.lines().count();
        assert!(n < max, "{n} log lines:\n{log}");
        log
    }

    /// CPU the daemon burns over `span` while nothing legitimate happens.
    fn cpu_over(&self, span: Duration) -> Duration {
        let before = self.cpu();
        std::thread::sleep(span);
        self.cpu().saturating_sub(before)
    }

    /// Sends SIGTERM and expects a clean exit within 2 s with the sockets removed;
    /// returns what the daemon logged.
    fn sigterm(mut self) -> String {
        let pid = i32::try_from(self.child.id()).unwrap();
        let start = Instant::now();
        // SAFETY: kill(2) on our own child, which has not been reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > Duration::from_secs(2) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("SIGTERM did not end the daemon within 2 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut log = String::new();
        let _ = self.child.stderr.take().unwrap().read_to_string(&mut log);
        assert!(status.success(), "{status}: {log}");
        for vm in ["a", "b", "m"] {
            assert!(!self.socket(vm).exists(), "{vm}.sock left behind");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        log
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A well-behaved front-end's first exchange: the daemon answers.
fn answers(socket: &Path) -> bool {
    let Ok(mut fe) = Frontend::connect(socket) else {
        return false;
    };
    fe.get_features()
        .is_ok_and(|f| f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0)
}

/// Negotiates, hands over guest memory and starts the TX ring (desc 0x1000, avail
/// 0x2000, used 0x3000) as QEMU does.
fn start_tx(fe: &mut Frontend, mem: &GuestMem, kick: &EventFd, call: &EventFd, err: &EventFd) {
    let offered = fe.get_features().unwrap();
    fe.get_protocol_features().unwrap();
    fe.set_protocol_features(
        VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
    )
    .unwrap();
    fe.set_owner().unwrap();
    fe.set_features(offered).unwrap();
    fe.add_mem_region(&MemoryRegionRef {
        region: VhostUserMemoryRegion::new(0, MEM as u64, UVA, 0),
        fd: mem.fd.as_fd(),
    })
    .unwrap();
    fe.set_vring_num(TX, u32::from(RING)).unwrap();
    fe.set_vring_addr(&VhostUserVringAddr {
        index: TX,
        flags: 0,
        descriptor: UVA + 0x1000,
        used: UVA + 0x3000,
        available: UVA + 0x2000,
        log: 0,
    })
    .unwrap();
    fe.set_vring_base(TX, 0).unwrap();
    fe.set_vring_call(TX as u8, Some(bfd(call))).unwrap();
    fe.set_vring_err(TX as u8, Some(bfd(err))).unwrap();
    fe.set_vring_kick(TX as u8, Some(bfd(kick))).unwrap();
    fe.set_vring_enable(TX, true).unwrap();
}

/// Three fresh eventfds for a ring: kick, call, error.
fn ring_eventfds() -> (EventFd, EventFd, EventFd) {
    (
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    )
}

/// The front-end cuts its (unsealed) memory file to `len` bytes under the daemon.
fn truncate(mem: &GuestMem, len: u64) {
    std::fs::File::from(mem.fd.try_clone().unwrap())
        .set_len(len)
        .unwrap();
}

/// Whether the daemon drops `fe` (its requests start failing) within `limit`.
fn dropped_within(fe: &mut Frontend, limit: Duration) -> bool {
    let start = Instant::now();
    while fe.get_features().is_ok() {
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

fn wait_readable(fd: std::os::fd::BorrowedFd<'_>, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(&fd),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the call.
    unsafe { libc::poll(&mut p, 1, ms) == 1 }
}

/// Defect 1: a guest (or front-end) whose available index is 257 on a 256-entry ring
/// made the worker spin at 100% CPU forever, logging a line per pass, and SIGTERM
/// could not stop it.
#[test]
fn avail_index_beyond_the_ring() {
    let d = Daemon::start("ring");
    let mem = GuestMem::new(MEM);
    let (kick, call, err) = ring_eventfds();
    let mut fe = Frontend::connect(d.socket("a")).unwrap();
    start_tx(&mut fe, &mem, &kick, &call, &err);
    mem.write(0x2002, RING + 1);
    kick.write(1).unwrap();
    assert!(
        wait_readable(bfd(&err), 5000),
        "the broken ring was not reported on its error eventfd"
    );
    d.assert_idle(Duration::from_millis(200));
    // The same front-end is still served, and so is the other VM.
    assert_eq!(fe.get_vring_base(TX).unwrap(), 0);
    assert!(answers(&d.socket("b")));
    drop(fe);
    let log = d.sigterm_with_log_under(50);
    assert!(log.contains("ring 1 is broken"), "{log}");
}

/// Defect 3: a front-end that sent 5 bytes of a header and waited blocked the worker in
/// recv forever (that VM's data path stopped, SIGTERM hung).
#[test]
fn a_front_end_that_stalls_mid_message() {
    let d = Daemon::start("stall");
    let mut stalled = UnixStream::connect(d.socket("a")).unwrap();
    stalled.write_all(&[1, 0, 0, 0, 1]).unwrap();
    // The other VM is served meanwhile; the stalled one is dropped after its bound.
    assert!(answers(&d.socket("b")));
    stalled
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 16];
    match stalled.read(&mut buf) {
        Ok(0) => {}
        other => panic!("the stalled front-end was not dropped: {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(4));
    assert!(d.cpu_over(Duration::from_millis(500)) < Duration::from_millis(100));
    // A fresh front-end is served on the same socket.
    assert!(answers(&d.socket("a")));

    // Stalled again, then SIGTERM: the daemon does not wait for the peer.
    let mut again = UnixStream::connect(d.socket("a")).unwrap();
    again.write_all(&[1, 0, 0, 0, 1, 0, 0, 0, 8]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let log = d.sigterm();
    assert!(log.contains("stalled"), "{log}");
}

/// Defect 3, the other direction: a front-end that sends requests and never reads the
/// replies fills its socket buffer; the worker must not block on the send.
#[test]
fn a_front_end_that_never_reads_its_replies() {
    let d = Daemon::start("noread");
    let mut fe = UnixStream::connect(d.socket("a")).unwrap();
    fe.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    // GET_FEATURES (code 1, version 1, no body), over and over.
    let req = [1u8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
    let start = Instant::now();
    let mut sent = 0usize;
    while start.elapsed() < Duration::from_secs(3) {
        match fe.write_all(&req) {
            Ok(_) => sent += 1,
            Err(_) => break,
        }
    }
    // The daemon dropped it (the write failed or the socket reached EOF), and the
    // other VM never noticed.
    assert!(answers(&d.socket("b")));
    assert!(
        answers(&d.socket("a")),
        "a fresh front-end after {sent} requests"
    );
    let log = d.sigterm();
    assert!(log.contains("does not read its replies"), "{log}");
}

/// Defect 2: a front-end that shrank its (unsealed) memory file after handing it over,
/// then had the device touch the cut-off part, killed the whole daemon with SIGBUS, every
/// VM in it. Now only that VM's device stops, with an error naming the region.
#[test]
fn a_front_end_that_truncates_its_memory() {
    let d = Daemon::start("truncate");
    let mem = GuestMem::new(MEM);
    let (kick, call, err) = ring_eventfds();
    let mut fe = Frontend::connect(d.socket("a")).unwrap();
    start_tx(&mut fe, &mem, &kick, &call, &err);
    // Keep the rings (at 0x1000..0x4000) out of the file, then kick.
    truncate(&mem, 0x1000);
    kick.write(1).unwrap();
    // The daemon drops this front-end...
    assert!(
        dropped_within(&mut fe, Duration::from_secs(5)),
        "the front-end was not dropped"
    );
    // ...and lives on: the other VM and a fresh front-end for this one are served.
    assert!(answers(&d.socket("b")));
    assert!(answers(&d.socket("a")));
    let log = d.sigterm();
    assert!(log.contains("cut short"), "{log}");
    assert!(log.contains("guest address 0x0"), "{log}");
}

/// Defect 2, what the neighbours keep: CID 3 has a host connection open, with data
/// flowing, when CID 4's front-end truncates its memory under the daemon (its rings in
/// the cut-off part) and kicks. The daemon is one process for both VMs, so without the
/// guard this SIGBUS ended CID 3's connection too. Now CID 4's front-end is dropped and
/// CID 3's connection, the same one and not a new one, carries data both ways before,
/// during and after; SIGTERM still ends the daemon in time with it open.
#[test]
fn a_neighbours_truncation_leaves_open_connections_alone() {
    let d = Daemon::start("truncate-neighbour");
    let mut good = OpenSession::open(&d.socket("a"), &d.dir.join("a.vsock"));
    good.exchange(0);
    let mem = GuestMem::new(MEM);
    let (kick, call, err) = ring_eventfds();
    let mut fe = Frontend::connect(d.socket("b")).unwrap();
    start_tx(&mut fe, &mem, &kick, &call, &err);
    good.exchange(1);
    truncate(&mem, 0x1000);
    kick.write(1).unwrap();
    good.exchange(2);
    assert!(
        dropped_within(&mut fe, Duration::from_secs(5)),
        "the front-end was not dropped"
    );
    for round in 3..20 {
        good.exchange(round);
    }
    // The attacker's VM is served again, and its old memory is not touched again.
    assert!(answers(&d.socket("b")));
    good.exchange(20);
    let log = d.sigterm_with_log_under(50);
    assert!(log.contains("cut short"), "{log}");
    assert!(log.contains("vsock cid 4"), "{log}");
    drop(good);
}

/// Every attack above, repeated: afterwards the daemon holds the fds and about the
/// memory it held before (each dropped front-end's memory table, eventfds and socket
/// are gone), burns no CPU while idle, and serves both VMs.
#[test]
fn repeated_attacks_leave_nothing_behind() {
    let d = Daemon::start("repeat");
    assert!(answers(&d.socket("a")) && answers(&d.socket("b")));
    let fds = d.fds_settle(0);
    let rss = d.rss_kib();
    for round in 0..20 {
        // A broken ring, reported; the front-end goes away.
        let mem = GuestMem::new(MEM);
        let (kick, call, err) = ring_eventfds();
        let mut fe = Frontend::connect(d.socket("a")).unwrap();
        start_tx(&mut fe, &mem, &kick, &call, &err);
        mem.write(0x2002, RING + 1);
        kick.write(1).unwrap();
        assert!(
            wait_readable(bfd(&err), 5000),
            "round {round}: not reported"
        );
        drop(fe);
        // Memory cut short under the device: the daemon drops the front-end.
        let mem = GuestMem::new(MEM);
        let (kick, call, err) = ring_eventfds();
        let mut fe = Frontend::connect(d.socket("b")).unwrap();
        start_tx(&mut fe, &mem, &kick, &call, &err);
        truncate(&mem, 0x1000);
        kick.write(1).unwrap();
        assert!(
            dropped_within(&mut fe, Duration::from_secs(5)),
            "round {round}: not dropped"
        );
        // Requests whose replies are never read, until the daemon drops it or for a
        // burst of 1,000.
        let mut noread = UnixStream::connect(d.socket("a")).unwrap();
        for _ in 0..1000 {
            if noread
                .write_all(&[1u8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0])
                .is_err()
            {
                break;
            }
        }
        drop(noread);
    }
    // One stall to its bound (2 s).
    let mut stalled = UnixStream::connect(d.socket("a")).unwrap();
    stalled.write_all(&[1, 0, 0, 0, 1]).unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert!(matches!(stalled.read(&mut [0u8; 16]), Ok(0)));
    drop(stalled);

    assert!(answers(&d.socket("a")) && answers(&d.socket("b")));
    let after = d.fds_settle(fds);
    assert!(after <= fds, "fds: {fds} before the attacks, {after} after");
    let grown = d.rss_kib().saturating_sub(rss);
    assert!(grown < 8 << 10, "RSS grew by {grown} KiB (from {rss} KiB)");
    d.assert_idle(Duration::from_millis(20));
    d.sigterm_with_log_under(200);
}

/// Defect 5 against the binary: a guest that opens the media device without end (the
/// attack sent 20,000 OPENs, each costing the daemon fds until its table was full) gets
/// the configured number of sessions and ENFILE for every further OPEN, which costs the
/// daemon no fd and no memory; a closed session makes room again.
#[test]
fn opens_without_end_against_outboard_media() {
    use outboard_protocol::media::{CloseCmd, CmdHeader, MediaCmd, OpenResp, RespHeader};
    use outboard_tests::media::vhost::VhostMediaDriver;
    use zerocopy::{FromBytes, IntoBytes};

    const CAP: usize = 16;
    let d = Daemon::media("media-opens", CAP);
    let mut driver = VhostMediaDriver::connect(&d.socket("m"));
    let open = |driver: &mut VhostMediaDriver| {
        let r = driver.command(CmdHeader::new(MediaCmd::Open).as_bytes(), 64);
        match OpenResp::read_from_bytes(&r) {
            Ok(o) if o.hdr.status == 0 => Ok(o.session_id),
            _ => Err(RespHeader::read_from_bytes(&r).unwrap().status),
        }
    };
    let sessions: Vec<u32> = (0..CAP).map(|_| open(&mut driver).unwrap()).collect();
    let (fds, rss) = (d.fds(), d.rss_kib());
    for i in 0..5000 {
        assert_eq!(
            open(&mut driver),
            Err(libc::ENFILE as u32),
            "OPEN {i} beyond the cap"
        );
    }
    assert_eq!(d.fds(), fds, "refused OPENs hold fds");
    let grown = d.rss_kib().saturating_sub(rss);
    assert!(
        grown < 4 << 10,
        "RSS grew by {grown} KiB over 5,000 refused OPENs"
    );
    let mut close = CmdHeader::new(MediaCmd::Close).as_bytes().to_vec();
    close.extend_from_slice(
        CloseCmd {
            session_id: sessions[3],
            reserved: 0,
        }
        .as_bytes(),
    );
    assert!(driver.command(&close, 16).is_empty());
    assert_eq!(open(&mut driver), Ok(sessions[3]));
    assert_eq!(open(&mut driver), Err(libc::ENFILE as u32));
    d.assert_idle(Duration::from_millis(20));
    driver.disconnect();
    d.sigterm_with_log_under(50);
}

/// Defect 7 against the binary: a USERPTR capture buffer is queued in guest memory
/// that the front-end then takes out of the memory table (`SET_MEM_TABLE` without that
/// region, as on memory hot-unplug or from a hostile front-end). The frame written
/// later must not land in the removed memory (whose file the front-end still has, and
/// may have given to something else): the buffer comes back with the error flag and
/// nothing written, and once the memory is back a buffer there is filled again.
#[test]
fn a_capture_into_memory_the_front_end_took_away() {
    use outboard_devices::media::camera::decode_frame_number;
    use outboard_devices::media::v4l2::*;
    use outboard_protocol::media::{CmdHeader, MediaCmd, OpenResp, SgEntry};
    use outboard_protocol::v4l2::V4l2Ioctl;
    use outboard_tests::media::vhost::VhostMediaDriver;
    use outboard_tests::media::REGION_END;
    use vm_memory::{Bytes, GuestAddress};
    use zerocopy::{FromBytes, IntoBytes};

    let d = Daemon::media("media-memtable", 16);
    let mut driver = VhostMediaDriver::connect(&d.socket("m"));
    let r = driver.command(CmdHeader::new(MediaCmd::Open).as_bytes(), 64);
    let s = OpenResp::read_from_bytes(&r).unwrap().session_id;
    let want = V4l2PixFormat {
        width: 320,
        height: 240,
        pixelformat: PIX_FMT_RGB24,
        ..Default::default()
    };
    let fmt: V4l2Format = driver.ioctl(
        s,
        V4l2Ioctl::VIDIOC_S_FMT,
        &V4l2Format::from_pix(BUF_TYPE_VIDEO_CAPTURE, &want),
    );
    let len = fmt.pix().sizeimage;
    let rb = V4l2Requestbuffers {
        count: 1,
        type_: BUF_TYPE_VIDEO_CAPTURE,
        memory: MEMORY_USERPTR,
        ..Default::default()
    };
    let rb: V4l2Requestbuffers = driver.ioctl(s, V4l2Ioctl::VIDIOC_REQBUFS, &rb);
    assert_eq!(rb.count, 1);
    // The buffer lives in the second region, above REGION_END.
    let base = REGION_END + (1 << 20);
    let pages = u64::from(len).div_ceil(4096);
    let sgs: Vec<SgEntry> = (0..pages)
        .map(|k| SgEntry {
            start: base + k * 4096,
            len: (u64::from(len) - k * 4096).min(4096) as u32,
            reserved: 0,
        })
        .collect();
    let qbuf = |driver: &mut VhostMediaDriver| {
        let b = V4l2Buffer {
            index: 0,
            type_: BUF_TYPE_VIDEO_CAPTURE,
            memory: MEMORY_USERPTR,
            length: len,
            ..Default::default()
        };
        let mut arg = b.as_bytes().to_vec();
        for sg in &sgs {
            arg.extend_from_slice(sg.as_bytes());
        }
        assert_eq!(driver.ioctl_raw(s, V4l2Ioctl::VIDIOC_QBUF, &arg).0, 0);
    };
    let frame = |driver: &VhostMediaDriver| {
        let mut data = vec![0u8; len as usize];
        driver
            .mem
            .read_slice(&mut data, GuestAddress(base))
            .unwrap();
        data
    };
    let zeros = vec![0u8; len as usize];

    qbuf(&mut driver);
    // The front-end takes the second region away, and the memory is cleared.
    driver.set_memory_table(|gpa| gpa < REGION_END);
    driver.mem.write_slice(&zeros, GuestAddress(base)).unwrap();
    let _: () = driver.ioctl(s, V4l2Ioctl::VIDIOC_STREAMON, &BUF_TYPE_VIDEO_CAPTURE);
    let b = driver.next_dqbuf();
    assert_eq!(
        (b.flags & BUF_FLAG_ERROR, b.bytesused),
        (BUF_FLAG_ERROR, 0),
        "a frame into removed memory: {b:?}"
    );
    assert!(frame(&driver) == zeros, "the removed memory was written");
    let _: () = driver.ioctl(s, V4l2Ioctl::VIDIOC_STREAMOFF, &BUF_TYPE_VIDEO_CAPTURE);

    // The memory is back: the same buffer is filled.
    driver.set_memory_table(|_| true);
    qbuf(&mut driver);
    let _: () = driver.ioctl(s, V4l2Ioctl::VIDIOC_STREAMON, &BUF_TYPE_VIDEO_CAPTURE);
    let b = driver.next_dqbuf();
    assert_eq!((b.flags & BUF_FLAG_ERROR, b.bytesused), (0, len), "{b:?}");
    assert_eq!(
        decode_frame_number(PIX_FMT_RGB24, 320, 240, &frame(&driver)),
        Some(b.sequence)
    );
    driver.disconnect();
    d.sigterm();
}

/// Defect 2, the other direction: the device *writes* into memory the front-end cut
/// off. The RX ring itself stays in the file, its buffers do not; a host client's
/// `CONNECT` makes the device write a REQUEST header into the first RX buffer. Only
/// that VM's front-end is dropped, with an error naming the region.
#[test]
fn rx_buffers_in_memory_the_front_end_cut_off() {
    let d = Daemon::start("truncate-rx");
    let mem = GuestMem::new(MEM);
    let (kick, call, err) = ring_eventfds();
    let mut fe = Frontend::connect(d.socket("a")).unwrap();
    start_tx(&mut fe, &mem, &kick, &call, &err);
    // The RX ring (queue 0) at 0x4000..0x7000, eight 4 KiB buffers from 0x20000.
    const RX: u32 = 0;
    let (rx_kick, rx_call) = (
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    );
    for i in 0..8u16 {
        let desc = 0x4000 + 16 * usize::from(i);
        mem.write(desc, 0x20000u64 + 0x1000 * u64::from(i));
        mem.write(desc + 8, 0x1000u32);
        mem.write(desc + 12, 2u16); // VRING_DESC_F_WRITE
        mem.write(0x5004 + 2 * usize::from(i), i);
    }
    mem.write(0x5002, 8u16);
    fe.set_vring_num(RX, u32::from(RING)).unwrap();
    fe.set_vring_addr(&VhostUserVringAddr {
        index: RX,
        flags: 0,
        descriptor: UVA + 0x4000,
        used: UVA + 0x6000,
        available: UVA + 0x5000,
        log: 0,
    })
    .unwrap();
    fe.set_vring_base(RX, 0).unwrap();
    fe.set_vring_call(RX as u8, Some(bfd(&rx_call))).unwrap();
    fe.set_vring_kick(RX as u8, Some(bfd(&rx_kick))).unwrap();
    fe.set_vring_enable(RX, true).unwrap();
    // Everything from 0x10000 on is gone: the rings stay, the RX buffers do not.
    truncate(&mem, 0x10000);
    let mut host = UnixStream::connect(d.dir.join("a.vsock")).unwrap();
    host.write_all(b"CONNECT 1234\n").unwrap();
    assert!(
        dropped_within(&mut fe, Duration::from_secs(5)),
        "the front-end was not dropped"
    );
    assert!(answers(&d.socket("b")));
    assert!(answers(&d.socket("a")));
    drop(host);
    let log = d.sigterm_with_log_under(50);
    assert!(log.contains("cut short"), "{log}");
    assert!(log.contains("guest address 0x0"), "{log}");
}
