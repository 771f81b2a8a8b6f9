//! Live migration's dirty page log (`LOG_SHMFD`), read back by a front-end: the real
//! vsock device behind the daemon receives a host connection and host data while the
//! log is on, writing the packets into the guest's RX buffers (by `recvmsg` straight
//! into guest memory) and their used entries, and every page it wrote must have its bit
//! in the log; while the log is off, none may.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

mod common;

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{bfd, GuestMem};
use outboard_devices::vsock::{Vsock, VsockDeviceConfig};
use outboard_protocol::vhost_user::{
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
    VhostUserVringAddr, VhostUserVringAddrFlags, LOG_PAGE_SIZE,
};
use outboard_protocol::vsock::{VsockHeader, VsockOp, VsockType};
use outboard_transport::{Frontend, MemoryRegionRef};
use outboard_vmm_glue::vhost_user::daemon;
use vmm_sys_util::eventfd::EventFd;
use zerocopy::{FromBytes, IntoBytes};

/// 1 MiB of guest memory: 256 pages, 32 bytes of log.
const MEM: usize = 0x10_0000;
const UVA: u64 = 0x7f00_0000_0000;
const RING: u16 = 8;
const GUEST_CID: u64 = 3;
const T: Duration = Duration::from_secs(5);

/// Ring `i`'s descriptor table, available ring and used ring: one page each, ring 0 at
/// pages 1-3, ring 1 at pages 4-6.
fn ring_at(i: u64) -> (u64, u64, u64) {
    let base = 0x1000 + 0x3000 * i;
    (base, base + 0x1000, base + 0x2000)
}

/// RX buffer `n`: 0x3000 bytes, starting 0x800 into a page, four pages apart, so that
/// each buffer has pages of its own and a packet's bytes cross page boundaries.
fn rx_buffer(n: u16) -> u64 {
    0x2_0800 + 0x4000 * u64::from(n)
}
const RX_LEN: u32 = 0x3000;
/// Where the guest's TX packets are.
const TX_BUF: u64 = 0x8_0000;

fn wait_readable(fd: BorrowedFd<'_>, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the call.
    unsafe { libc::poll(&mut p, 1, ms) == 1 }
}

fn memfd(len: u64) -> File {
    // SAFETY: memfd_create with a valid C string; returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"log".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a new fd nobody else owns.
    let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.set_len(len).unwrap();
    f
}

/// The guest's side: rings in [`GuestMem`], driven through the daemon.
struct Guest {
    mem: GuestMem,
    kicks: [EventFd; 2],
    calls: [EventFd; 2],
    /// Next available index per ring.
    avail: [u16; 2],
    /// Used entries consumed per ring.
    used_seen: [u16; 2],
}

impl Guest {
    fn new() -> Guest {
        let e = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        Guest {
            mem: GuestMem::new(MEM),
            kicks: [e(), e()],
            calls: [e(), e()],
            avail: [0; 2],
            used_seen: [0; 2],
        }
    }

    /// Offers descriptor `head` (one descriptor of `len` bytes at `addr`) on ring `q`.
    fn offer(&mut self, q: usize, head: u16, addr: u64, len: u32, writable: bool) {
        let (desc, avail, _) = ring_at(q as u64);
        let d = (desc + 16 * u64::from(head)) as usize;
        self.mem.write(d, addr);
        self.mem.write(d + 8, len);
        self.mem.write(d + 12, if writable { 2u16 } else { 0 });
        let slot = self.avail[q] % RING;
        self.mem
            .write(avail as usize + 4 + 2 * usize::from(slot), head);
        self.avail[q] = self.avail[q].wrapping_add(1);
        self.mem.write(avail as usize + 2, self.avail[q]);
    }

    /// Waits until ring `q` has used entries it did not consume; returns them as (head,
    /// len).
    fn used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let (_, _, used) = ring_at(q as u64);
        let deadline = Instant::now() + T;
        loop {
            let idx: u16 = self.mem.read(used as usize + 2);
            if idx != self.used_seen[q] {
                let mut out = Vec::new();
                while self.used_seen[q] != idx {
                    let e = used as usize + 4 + 8 * usize::from(self.used_seen[q] % RING);
                    out.push((self.mem.read::<u32>(e) as u16, self.mem.read::<u32>(e + 4)));
                    self.used_seen[q] = self.used_seen[q].wrapping_add(1);
                }
                return out;
            }
            assert!(Instant::now() < deadline, "no used entry on ring {q}");
            wait_readable(bfd(&self.calls[q]), 50);
            let _ = self.calls[q].read();
        }
    }

    fn header(&self, addr: u64) -> VsockHeader {
        let bytes = self.mem.read_bytes(addr as usize, VsockHeader::SIZE);
        VsockHeader::read_from_bytes(&bytes).unwrap()
    }
}

/// The guest answers the host's REQUEST `req` with RESPONSE (TX descriptor 0), as
/// its driver does for a listening socket; returns the RESPONSE header.
fn guest_accepts(g: &mut Guest, req: &VsockHeader) -> VsockHeader {
    let resp = VsockHeader {
        src_cid: GUEST_CID,
        dst_cid: req.src_cid,
        src_port: req.dst_port,
        dst_port: req.src_port,
        type_: VsockType::Stream as u16,
        op: VsockOp::Response as u16,
        buf_alloc: 1 << 20,
        ..Default::default()
    };
    g.mem.write_bytes(TX_BUF as usize, resp.as_bytes());
    g.offer(1, 0, TX_BUF, VsockHeader::SIZE as u32, false);
    g.kicks[1].write(1).unwrap();
    resp
}

/// The page numbers of `[gpa, gpa + len)`.
fn pages(gpa: u64, len: u64) -> std::ops::RangeInclusive<u64> {
    assert!(len > 0);
    gpa / LOG_PAGE_SIZE..=(gpa + len - 1) / LOG_PAGE_SIZE
}

/// The pages whose bits are set in the log.
fn logged(log: &File, size: usize) -> BTreeSet<u64> {
    let mut bits = vec![0u8; size];
    log.read_exact_at(&mut bits, 0).unwrap();
    let mut set = BTreeSet::new();
    for (i, b) in bits.iter().enumerate() {
        for bit in 0..8 {
            if b & (1 << bit) != 0 {
                set.insert(i as u64 * 8 + bit);
            }
        }
    }
    set
}

/// Sets ring `i`'s addresses, with `VHOST_VRING_F_LOG` when `log` (as QEMU does when a
/// migration starts and ends).
fn set_addr(fe: &mut Frontend, i: u32, log: bool) {
    let (desc, avail, used) = ring_at(u64::from(i));
    fe.set_vring_addr(&VhostUserVringAddr {
        index: i,
        flags: if log {
            VhostUserVringAddrFlags::LOG.bits()
        } else {
            0
        },
        descriptor: UVA + desc,
        used: UVA + used,
        available: UVA + avail,
        log: if log { used } else { 0 },
    })
    .unwrap();
}

struct Served {
    dir: PathBuf,
    uds: PathBuf,
    stop: EventFd,
    worker: std::thread::JoinHandle<()>,
}

fn serve(name: &str) -> (Served, PathBuf) {
    let dir =
        std::env::temp_dir().join(format!("outboard-dirty-log-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("vu.sock");
    let uds = dir.join("v.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let device = Vsock::new(VsockDeviceConfig::new(GUEST_CID, &uds)).unwrap();
    let stop = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let worker_stop = stop.try_clone().unwrap();
    let worker = std::thread::spawn(move || {
        daemon::serve(device, listener, 256, &worker_stop, "vsock")
            .map(drop)
            .unwrap();
    });
    (
        Served {
            dir,
            uds,
            stop,
            worker,
        },
        sock,
    )
}

/// Negotiates as QEMU does (with `LOG_SHMFD`, logging off), maps guest memory, starts
/// the RX and TX rings and offers the eight RX buffers; returns the offered features.
fn bring_up(fe: &mut Frontend, g: &mut Guest) -> u64 {
    // Negotiation: the daemon offers what QEMU needs to allow a migration.
    let offered = fe.get_features().unwrap();
    let log_all = VhostUserVirtioFeatures::LOG_ALL.bits();
    assert_ne!(offered & log_all, 0, "VHOST_F_LOG_ALL not offered");
    let proto = fe.get_protocol_features().unwrap();
    assert!(proto.contains(VhostUserProtocolFeatures::LOG_SHMFD));
    let want = VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::LOG_SHMFD;
    fe.set_protocol_features(want).unwrap();
    fe.set_owner().unwrap();
    fe.set_features(offered & !log_all).unwrap();
    fe.set_mem_table(&[MemoryRegionRef {
        region: VhostUserMemoryRegion::new(0, MEM as u64, UVA, 0),
        fd: g.mem.fd.as_fd(),
    }])
    .unwrap();
    for i in 0..2u32 {
        fe.set_vring_num(i, u32::from(RING)).unwrap();
        set_addr(fe, i, false);
        fe.set_vring_base(i, 0).unwrap();
        fe.set_vring_call(i as u8, Some(bfd(&g.calls[i as usize])))
            .unwrap();
        fe.set_vring_kick(i as u8, Some(bfd(&g.kicks[i as usize])))
            .unwrap();
        fe.set_vring_enable(i, true).unwrap();
    }
    // Eight RX buffers.
    for n in 0..RING {
        g.offer(0, n, rx_buffer(n), RX_LEN, true);
    }
    g.kicks[0].write(1).unwrap();
    offered
}

#[test]
fn every_page_the_vsock_device_writes_is_logged_while_logging_is_on() {
    let (served, sock) = serve("vsock");
    let mut g = Guest::new();
    let mut fe = Frontend::connect(&sock).unwrap();

    let offered = bring_up(&mut fe, &mut g);
    let log_all = VhostUserVirtioFeatures::LOG_ALL.bits();

    // The log, handed over before logging starts (QEMU sends SET_LOG_BASE, then the
    // features with LOG_ALL, then the rings' addresses with VHOST_VRING_F_LOG).
    let log_size = MEM / LOG_PAGE_SIZE as usize / 8;
    let log = memfd(4096);
    fe.set_log_base(
        &VhostUserLog {
            mmap_size: log_size as u64,
            mmap_offset: 0,
        },
        log.as_fd(),
    )
    .unwrap();

    // Logging off: the host connects; the device writes a REQUEST into RX buffer 0.
    let mut host = UnixStream::connect(&served.uds).unwrap();
    host.set_read_timeout(Some(T)).unwrap();
    host.write_all(b"CONNECT 1234\n").unwrap();
    let used = g.used(0);
    assert_eq!(used, vec![(0, VsockHeader::SIZE as u32)]);
    let req = g.header(rx_buffer(0));
    assert_eq!(req.op().unwrap(), VsockOp::Request);
    assert!(
        logged(&log, log_size).is_empty(),
        "pages logged while logging was off: {:?}",
        logged(&log, log_size)
    );

    // The guest accepts.
    guest_accepts(&mut g, &req);
    let mut line = String::new();
    BufReader::new(host.try_clone().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("OK "), "{line:?}");
    assert_eq!(g.used(1), vec![(0, 0)]);
    assert!(logged(&log, log_size).is_empty());

    // The migration starts, as QEMU's vhost_migration_log() starts it.
    fe.set_features(offered).unwrap();
    set_addr(&mut fe, 0, true);
    set_addr(&mut fe, 1, true);

    // Host data: 30000 bytes, more than two RX buffers hold.
    let data: Vec<u8> = (0..30_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    host.write_all(&data).unwrap();
    let mut got = Vec::new();
    let mut written: Vec<(u16, u32)> = Vec::new();
    while got.len() < data.len() {
        for (head, len) in g.used(0) {
            let hdr = g.header(rx_buffer(head));
            assert_eq!(hdr.op().unwrap(), VsockOp::Rw);
            assert_eq!(len as usize, VsockHeader::SIZE + hdr.len as usize);
            got.extend(g.mem.read_bytes(
                rx_buffer(head) as usize + VsockHeader::SIZE,
                hdr.len as usize,
            ));
            written.push((head, len));
        }
    }
    assert_eq!(got, data);
    assert!(written.len() >= 3, "{written:?}");

    // Every page the device wrote has its bit: the bytes of each used buffer, its used
    // element and the used index.
    let (_, _, rx_used) = ring_at(0);
    let mut expect = BTreeSet::new();
    for (k, &(head, len)) in written.iter().enumerate() {
        expect.extend(pages(rx_buffer(head), u64::from(len)));
        expect.extend(pages(rx_used + 4 + 8 * (k as u64 + 1), 8));
    }
    expect.extend(pages(rx_used, 4));
    let got_log = logged(&log, log_size);
    let missing: Vec<_> = expect.difference(&got_log).collect();
    assert!(
        missing.is_empty(),
        "pages written but not logged: {missing:?}"
    );
    // Nothing the device did not write: not buffer 0 (written before logging), not
    // the pages past the last used byte of a buffer, not the rings it only reads. (The
    // TX ring's used page may be written too: its notification fields.)
    let (_, _, tx_used) = ring_at(1);
    let mut allowed = expect.clone();
    allowed.extend(pages(tx_used, 4));
    let extra: Vec<_> = got_log.difference(&allowed).collect();
    assert!(extra.is_empty(), "pages logged but not written: {extra:?}");

    // The migration is cancelled: logging off, the log cleared by the front-end, more
    // data written by the device, and no bit comes back.
    fe.set_features(offered & !log_all).unwrap();
    set_addr(&mut fe, 0, false);
    set_addr(&mut fe, 1, false);
    log.write_all_at(&vec![0u8; log_size], 0).unwrap();
    for n in 0..RING {
        if written.iter().any(|(h, _)| *h == n) || n == 0 {
            g.offer(0, n, rx_buffer(n), RX_LEN, true);
        }
    }
    g.kicks[0].write(1).unwrap();
    host.write_all(b"after the migration").unwrap();
    let after = g.used(0);
    assert!(!after.is_empty());
    assert!(logged(&log, log_size).is_empty());

    drop(host);
    drop(fe);
    served.stop.write(1).unwrap();
    served.worker.join().unwrap();
    std::fs::remove_dir_all(&served.dir).unwrap();
}

/// A log that is smaller than guest memory, and one that cannot be mapped: the first
/// is taken (pages beyond it are counted, not written), the second refused with an
/// error reply; the device carries on either way.
#[test]
fn a_short_or_unmappable_log_is_handled_without_harm() {
    let (served, sock) = serve("short");
    let g = Guest::new();
    let mut fe = Frontend::connect(&sock).unwrap();
    let offered = fe.get_features().unwrap();
    fe.set_protocol_features(
        VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::LOG_SHMFD,
    )
    .unwrap();
    fe.set_owner().unwrap();
    fe.set_features(offered).unwrap();
    fe.set_mem_table(&[MemoryRegionRef {
        region: VhostUserMemoryRegion::new(0, MEM as u64, UVA, 0),
        fd: g.mem.fd.as_fd(),
    }])
    .unwrap();
    // A socket is no log.
    let (a, _b) = UnixStream::pair().unwrap();
    let err = fe
        .set_log_base(
            &VhostUserLog {
                mmap_size: 32,
                mmap_offset: 0,
            },
            a.as_fd(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("SET_LOG_BASE"), "{err}");
    // A file shorter than the log it claims to hold.
    let short = memfd(16);
    assert!(fe
        .set_log_base(
            &VhostUserLog {
                mmap_size: 32,
                mmap_offset: 0,
            },
            short.as_fd(),
        )
        .is_err());
    // One byte: the first 8 pages only. Accepted.
    let tiny = memfd(1);
    fe.set_log_base(
        &VhostUserLog {
            mmap_size: 1,
            mmap_offset: 0,
        },
        tiny.as_fd(),
    )
    .unwrap();
    // The session is still usable.
    assert_eq!(fe.get_features().unwrap(), offered);
    drop(fe);
    served.stop.write(1).unwrap();
    served.worker.join().unwrap();
    std::fs::remove_dir_all(&served.dir).unwrap();
}

/// A front-end that truncates its log file after handing it over: the device's next
/// mark faults, the fault is contained (see the guard module), and the daemon drops that
/// front-end and serves the next one.
#[test]
fn a_log_cut_short_under_the_daemon_drops_that_front_end_only() {
    let (served, sock) = serve("cut");
    let mut g = Guest::new();
    let mut fe = Frontend::connect(&sock).unwrap();
    let offered = bring_up(&mut fe, &mut g);
    let log = memfd(4096);
    fe.set_log_base(
        &VhostUserLog {
            mmap_size: (MEM / LOG_PAGE_SIZE as usize / 8) as u64,
            mmap_offset: 0,
        },
        log.as_fd(),
    )
    .unwrap();
    fe.set_features(offered).unwrap();
    log.set_len(0).unwrap();
    // The device writes a REQUEST into an RX buffer and marks its page.
    let mut host = UnixStream::connect(&served.uds).unwrap();
    host.write_all(b"CONNECT 1234\n").unwrap();
    let deadline = Instant::now() + T;
    while fe.get_features().is_ok() {
        assert!(Instant::now() < deadline, "the front-end was not dropped");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The daemon lives on and serves the next front-end.
    let mut fe = Frontend::connect(&sock).unwrap();
    assert_eq!(fe.get_features().unwrap(), offered);
    drop(fe);
    served.stop.write(1).unwrap();
    served.worker.join().unwrap();
    std::fs::remove_dir_all(&served.dir).unwrap();
}

/// A live upgrade in the middle of a migration: a worker with an open vsock connection,
/// logging on, is paused, handed over (`Worker::take_over` from its parcel) and lets go;
/// the new worker answers the same front-end connection, carries the connection on and
/// marks the log. Before that, a handover that is called off leaves the first worker
/// serving.
#[test]
fn a_live_handover_keeps_the_session_the_connection_and_the_log() {
    use outboard_devices::vsock::VsockHandover;
    use outboard_vmm_glue::vhost_user::daemon::{upgrade_channel, Parcel, Worker};

    let dir = std::env::temp_dir().join(format!("outboard-handover-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("vu.sock");
    let uds = dir.join("v.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let cfg = VsockDeviceConfig::new(GUEST_CID, &uds);
    let device = Vsock::new(cfg.clone()).unwrap();
    let save = |d: &Vsock| {
        d.handover()
            .map(|h| Parcel {
                record: h.record,
                fds: h.fds,
            })
            .map_err(|e| e.to_string())
    };
    let (handle, hooks) = upgrade_channel(save).unwrap();
    let stop_a = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let worker_a = Worker::new(device, listener, 256, "old", |b| b).unwrap();
    let a_stop = stop_a.try_clone().unwrap();
    std::thread::spawn(move || {
        let _ = worker_a.run(&a_stop, Some(hooks));
    });

    let mut g = Guest::new();
    let mut fe = Frontend::connect(&sock).unwrap();
    let offered = bring_up(&mut fe, &mut g);
    let log_size = MEM / LOG_PAGE_SIZE as usize / 8;
    let log = memfd(4096);
    fe.set_log_base(
        &VhostUserLog {
            mmap_size: log_size as u64,
            mmap_offset: 0,
        },
        log.as_fd(),
    )
    .unwrap();
    fe.set_features(offered).unwrap();
    set_addr(&mut fe, 0, true);
    set_addr(&mut fe, 1, true);

    // A host connection, accepted by the guest.
    let mut host = UnixStream::connect(&uds).unwrap();
    host.set_read_timeout(Some(T)).unwrap();
    host.write_all(b"CONNECT 1234\n").unwrap();
    assert_eq!(g.used(0), vec![(0, VsockHeader::SIZE as u32)]);
    let req = g.header(rx_buffer(0));
    let resp = guest_accepts(&mut g, &req);
    let mut reader = BufReader::new(host.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("OK "), "{line:?}");
    assert_eq!(g.used(1), vec![(0, 0)]);

    // Called off: the old worker serves on.
    let parcel = handle.pause(T).unwrap();
    assert!(!parcel.fds.is_empty());
    drop(parcel);
    handle.resume();
    host.write_all(b"one").unwrap();
    let used = g.used(0);
    assert_eq!(used.len(), 1);
    let hdr = g.header(rx_buffer(used[0].0));
    assert_eq!({ hdr.len }, 3);

    // Handed over for real.
    let parcel = handle.pause(T).unwrap();
    let worker_b = Worker::take_over(
        parcel,
        |p| {
            Vsock::take_over(
                cfg,
                VsockHandover {
                    record: p.record,
                    fds: p.fds,
                },
            )
            .map_err(|e| e.to_string())
        },
        256,
        "new",
        |b| b,
    )
    .unwrap();
    assert_eq!(worker_b.device().map(Vsock::connection_count), Some(1));
    handle.commit(T).unwrap();
    let stop_b = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let b_stop = stop_b.try_clone().unwrap();
    let b = std::thread::spawn(move || worker_b.run(&b_stop, None).map(drop));

    // The same front-end connection, answered by the new worker.
    assert_eq!(fe.get_features().unwrap(), offered);
    // The connection goes on, and what the new worker writes is logged.
    log.write_all_at(&vec![0u8; log_size], 0).unwrap();
    // The two buffers used so far come back (the other six are still offered).
    for n in [0, used[0].0] {
        g.offer(0, n, rx_buffer(n), RX_LEN, true);
    }
    g.kicks[0].write(1).unwrap();
    host.write_all(b"after the handover").unwrap();
    let mut got = Vec::new();
    let mut written = Vec::new();
    while got.len() < 18 {
        for (head, len) in g.used(0) {
            let hdr = g.header(rx_buffer(head));
            assert_eq!(hdr.op().unwrap(), VsockOp::Rw);
            got.extend(g.mem.read_bytes(
                rx_buffer(head) as usize + VsockHeader::SIZE,
                hdr.len as usize,
            ));
            written.push((head, len));
        }
    }
    assert_eq!(got, b"after the handover");
    let logged_now = logged(&log, log_size);
    for (head, len) in &written {
        for p in pages(rx_buffer(*head), u64::from(*len)) {
            assert!(
                logged_now.contains(&p),
                "page {p} written after the handover, not logged"
            );
        }
    }
    // The guest's data reaches the host through the new worker too.
    let rw = VsockHeader {
        len: 5,
        op: VsockOp::Rw as u16,
        ..resp
    };
    let mut pkt = rw.as_bytes().to_vec();
    pkt.extend_from_slice(b"guest");
    g.mem.write_bytes(TX_BUF as usize, &pkt);
    g.offer(1, 1, TX_BUF, pkt.len() as u32, false);
    g.kicks[1].write(1).unwrap();
    let mut buf = [0u8; 5];
    std::io::Read::read_exact(&mut reader, &mut buf).unwrap();
    assert_eq!(&buf, b"guest");

    drop(host);
    drop(fe);
    stop_b.write(1).unwrap();
    b.join().unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
