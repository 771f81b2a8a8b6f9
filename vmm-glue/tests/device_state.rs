//! vhost-user device state transfer (`SET_DEVICE_STATE_FD`, `CHECK_DEVICE_STATE`) of the
//! vsock device, between two daemons, driven by outboard-transport's `Frontend` and by
//! rust-vmm `vhost`'s `Frontend` (a front-end nobody here wrote): SAVE from one daemon,
//! LOAD into another, whose device then has the saved CID and features and tells the
//! guest TRANSPORT_RESET on the event ring; a LOAD into a device of another CID fails its
//! check; a LOAD into a device with a live host connection closes that connection; a
//! transfer while a ring runs is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{bfd, GuestMem};
use outboard_devices::virtio::VIRTIO_F_VERSION_1;
use outboard_devices::vsock::{Vsock, VsockDeviceConfig, VsockSnapshot};
use outboard_protocol::vhost_user::{
    TransferDirection, TransferPhase, VhostUserMemoryRegion, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures, VhostUserVringAddr,
};
use outboard_protocol::vsock::{VsockOp, VIRTIO_VSOCK_F_STREAM};
use outboard_transport::{Frontend, MemoryRegionRef};
use outboard_vmm_glue::vhost_user::daemon;
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 0x10000;
const UVA: u64 = 0x7f00_0000_0000;
const QSIZE: u16 = 8;
const RX: usize = 0;
const EVENT: usize = 2;
/// What the tests' drivers accept: VERSION_1 and stream sockets (no SEQPACKET, no
/// EVENT_IDX), so the saved features are not simply everything offered.
const ACKED: u64 = VIRTIO_F_VERSION_1 | VIRTIO_VSOCK_F_STREAM;

/// Descriptor table, available ring and used ring of queue `q`.
fn ring(q: usize) -> (usize, usize, usize) {
    let base = 0x1000 * (q + 1);
    (base, base + 0x200, base + 0x400)
}
const RX_BUFS: usize = 0x8000;
const RX_BUF_LEN: u32 = 0x100;
const EVENT_BUFS: usize = 0xc000;

/// The driver's side of the three rings in guest memory.
#[derive(Default)]
struct Rings {
    next_desc: [u16; 3],
    avail: [u16; 3],
}

impl Rings {
    fn offer(&mut self, mem: &GuestMem, q: usize, addr: usize, len: u32, writable: bool) {
        let (desc, avail, _) = ring(q);
        let id = self.next_desc[q];
        self.next_desc[q] = (id + 1) % QSIZE;
        let d = desc + 16 * usize::from(id);
        mem.write(d, addr as u64);
        mem.write(d + 8, len);
        mem.write(d + 12, if writable { 2u16 } else { 0 });
        mem.write(d + 14, 0u16);
        mem.write(avail + 4 + 2 * usize::from(self.avail[q] % QSIZE), id);
        self.avail[q] = self.avail[q].wrapping_add(1);
        mem.write(avail + 2, self.avail[q]);
    }

    /// Four RX buffers and two event buffers (filled with 0xff, so a written event
    /// shows).
    fn post_buffers(&mut self, mem: &GuestMem) {
        for i in 0..4 {
            self.offer(mem, RX, RX_BUFS + i * RX_BUF_LEN as usize, RX_BUF_LEN, true);
        }
        for i in 0..2 {
            mem.write_bytes(EVENT_BUFS + 16 * i, &[0xff; 8]);
            self.offer(mem, EVENT, EVENT_BUFS + 16 * i, 8, true);
        }
    }
}

fn used_idx(mem: &GuestMem, q: usize) -> u16 {
    mem.read(ring(q).2 + 2)
}

/// Waits until queue `q`'s used index reaches `n`.
fn wait_used(mem: &GuestMem, q: usize, n: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while used_idx(mem, q) < n {
        assert!(
            Instant::now() < deadline,
            "{what}: used index of queue {q} stays below {n}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The first event buffer holds TRANSPORT_RESET (event id 0) and was returned.
fn assert_transport_reset(mem: &GuestMem) {
    wait_used(mem, EVENT, 1, "TRANSPORT_RESET");
    let (_, _, used) = ring(EVENT);
    assert_eq!(mem.read::<u32>(used + 4), 0, "used entry 0 is descriptor 0");
    assert_eq!(mem.read::<u32>(used + 8), 4, "4 bytes written");
    assert_eq!(
        mem.read_bytes(EVENT_BUFS, 8),
        [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]
    );
}

/// One `outboard vsock`-style worker serving a [`Vsock`] of `cid` on a thread.
struct Served {
    socket: PathBuf,
    uds: PathBuf,
    stop: EventFd,
    worker: std::thread::JoinHandle<Result<(), daemon::WorkerError>>,
}

impl Served {
    fn start(dir: &Path, name: &str, cid: u64) -> Served {
        let socket = dir.join(format!("{name}.sock"));
        let uds = dir.join(format!("{name}.vsock"));
        let listener = UnixListener::bind(&socket).unwrap();
        let device = Vsock::new(VsockDeviceConfig::new(cid, &uds)).unwrap();
        let stop = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let worker_stop = stop.try_clone().unwrap();
        let worker = std::thread::spawn(move || {
            daemon::serve(device, listener, 256, &worker_stop, "state").map(|_| ())
        });
        Served {
            socket,
            uds,
            stop,
            worker,
        }
    }

    fn finish(self) {
        self.stop.write(1).unwrap();
        self.worker.join().unwrap().unwrap();
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("outboard-state-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two fds pipe2 writes.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds are new and owned by nobody else.
    unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}

/// Outboard's front-end with the device's rings and memory.
struct Ours {
    fe: Frontend,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
}

impl Ours {
    /// Negotiates as QEMU does (DEVICE_STATE included) and hands over the memory.
    fn connect(served: &Served, mem: &GuestMem) -> Ours {
        let mut fe = Frontend::connect(&served.socket).unwrap();
        let offered = fe.get_features().unwrap();
        let proto = fe.get_protocol_features().unwrap();
        assert!(
            proto.contains(VhostUserProtocolFeatures::DEVICE_STATE),
            "{proto:?}"
        );
        fe.set_protocol_features(
            VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
                | VhostUserProtocolFeatures::DEVICE_STATE,
        )
        .unwrap();
        fe.set_owner().unwrap();
        assert_eq!(offered & ACKED, ACKED);
        fe.set_features(ACKED | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
            .unwrap();
        fe.add_mem_region(&MemoryRegionRef {
            region: VhostUserMemoryRegion::new(0, MEM as u64, UVA, 0),
            fd: mem.fd.as_fd(),
        })
        .unwrap();
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        Ours {
            fe,
            kicks: (0..3).map(|_| eventfd()).collect(),
            calls: (0..3).map(|_| eventfd()).collect(),
        }
    }

    /// Starts the three rings at `bases`.
    fn start_rings(&mut self, bases: [u32; 3]) {
        for (q, base) in bases.into_iter().enumerate() {
            let (desc, avail, used) = ring(q);
            let i = q as u32;
            self.fe.set_vring_num(i, QSIZE.into()).unwrap();
            self.fe
                .set_vring_addr(&VhostUserVringAddr {
                    index: i,
                    flags: 0,
                    descriptor: UVA + desc as u64,
                    used: UVA + used as u64,
                    available: UVA + avail as u64,
                    log: 0,
                })
                .unwrap();
            self.fe.set_vring_base(i, base).unwrap();
            self.fe
                .set_vring_call(q as u8, Some(bfd(&self.calls[q])))
                .unwrap();
            self.fe
                .set_vring_kick(q as u8, Some(bfd(&self.kicks[q])))
                .unwrap();
            self.fe.set_vring_enable(i, true).unwrap();
        }
    }

    fn stop_rings(&mut self) -> [u32; 3] {
        [0, 1, 2].map(|q| self.fe.get_vring_base(q).unwrap())
    }

    /// SAVE: the back-end answers with the read end of a pipe of its own holding the
    /// state (ours is closed unused).
    fn save(&mut self) -> Vec<u8> {
        let (_r, w) = pipe();
        let back = self
            .fe
            .set_device_state_fd(TransferDirection::Save, TransferPhase::Stopped, w.as_fd())
            .unwrap();
        let mut r = File::from(back.expect("the back-end's own pipe end"));
        let mut state = Vec::new();
        r.read_to_end(&mut state).unwrap();
        self.fe.check_device_state().unwrap();
        state
    }

    /// LOAD: the back-end answers with the write end of a pipe of its own.
    fn load(&mut self, state: &[u8]) -> Result<(), outboard_transport::Error> {
        let (r, _w) = pipe();
        let back = self.fe.set_device_state_fd(
            TransferDirection::Load,
            TransferPhase::Stopped,
            r.as_fd(),
        )?;
        let mut w = File::from(back.expect("the back-end's own pipe end"));
        w.write_all(state).unwrap();
        drop(w);
        self.fe.check_device_state()
    }
}

fn wait_readable(fd: BorrowedFd<'_>, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the call.
    unsafe { libc::poll(&mut p, 1, ms) == 1 }
}

#[test]
fn outboard_frontend_saves_from_one_daemon_and_loads_into_another() {
    let dir = scratch("ours");
    let a = Served::start(&dir, "a", 3);
    let b = Served::start(&dir, "b", 3);
    let c = Served::start(&dir, "c", 4);

    // VM A runs; a host client connects to guest port 1234, the guest hears REQUEST.
    let mem_a = GuestMem::new(MEM);
    let mut rings = Rings::default();
    rings.post_buffers(&mem_a);
    let mut fa = Ours::connect(&a, &mem_a);
    fa.start_rings([0; 3]);
    let mut host = UnixStream::connect(&a.uds).unwrap();
    host.write_all(b"CONNECT 1234\n").unwrap();
    wait_used(&mem_a, RX, 1, "REQUEST");
    let op: u16 = mem_a.read(RX_BUFS + 30);
    assert_eq!(op, VsockOp::Request as u16);
    assert_eq!(used_idx(&mem_a, EVENT), 0, "no event yet");

    // A transfer while rings run is refused (the device must be stopped).
    let (_r, w) = pipe();
    let err = fa
        .fe
        .set_device_state_fd(TransferDirection::Save, TransferPhase::Stopped, w.as_fd())
        .unwrap_err();
    assert!(err.to_string().contains("SET_DEVICE_STATE_FD"), "{err}");

    // Stop, SAVE: the vsock state, 32 bytes.
    let bases = fa.stop_rings();
    assert_eq!(bases, [1, 0, 0]);
    let state = fa.save();
    assert_eq!(
        VsockSnapshot::from_bytes(&state).unwrap(),
        VsockSnapshot {
            guest_cid: 3,
            offered_features: Vsock::FEATURES,
            acked_features: ACKED
        }
    );

    // LOAD into B (a copy of A's memory, as after a migration), then start its rings
    // where A's stopped: the guest hears TRANSPORT_RESET on the event ring.
    let mem_b = GuestMem::new(MEM);
    mem_b.write_bytes(0, &mem_a.read_bytes(0, MEM));
    let mut fb = Ours::connect(&b, &mem_b);
    fb.load(&state).unwrap();
    fb.start_rings(bases);
    assert!(wait_readable(bfd(&fb.calls[EVENT]), 5000), "no event call");
    assert_transport_reset(&mem_b);
    assert_eq!(used_idx(&mem_b, RX), 1, "B goes on after A's REQUEST");
    assert_eq!(fb.stop_rings(), [1, 0, 1]);
    assert_eq!(fb.save(), state, "B has A's CID and features");

    // C serves CID 4: the load fails its check, naming no success.
    let mem_c = GuestMem::new(MEM);
    let mut fc = Ours::connect(&c, &mem_c);
    let err = fc.load(&state).unwrap_err();
    assert!(err.to_string().contains("CHECK_DEVICE_STATE"), "{err}");
    // Garbage too.
    assert!(fc.load(b"not a state").is_err());

    // LOAD back into A, whose host connection is live: it is closed (EOF), and the
    // restarted rings give the guest TRANSPORT_RESET.
    fa.load(&state).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(host.read(&mut buf).unwrap(), 0, "host socket closed");
    fa.start_rings(bases);
    assert_transport_reset(&mem_a);

    drop((fa, fb, fc));
    for s in [a, b, c] {
        s.finish();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A front-end that starts a LOAD and never closes its end of the pipe: the check
/// fails after the 1 s bound, naming why, and the worker answers the next request.
#[test]
fn a_stalled_load_fails_its_check_within_the_bound() {
    let dir = scratch("stall");
    let a = Served::start(&dir, "a", 3);
    let mem = GuestMem::new(MEM);
    let mut fa = Ours::connect(&a, &mem);
    let (r, _w) = pipe();
    let back = fa
        .fe
        .set_device_state_fd(TransferDirection::Load, TransferPhase::Stopped, r.as_fd())
        .unwrap();
    let mut w = File::from(back.unwrap());
    w.write_all(&[0x4f; 10]).unwrap(); // part of a state, and the end stays open
    let started = Instant::now();
    assert!(fa.fe.check_device_state().is_err());
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // The worker is free again: a SAVE works, and the device kept its state.
    let state = fa.save();
    assert_eq!(
        VsockSnapshot::from_bytes(&state).unwrap().acked_features,
        ACKED
    );
    drop((w, fa));
    a.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same with rust-vmm's front-end, which takes the back-end's pipe ends from the
/// replies and checks them its own way.
#[test]
fn rust_vmm_frontend_saves_and_loads() {
    use vhost::vhost_user::message::{VhostTransferStateDirection, VhostTransferStatePhase};
    use vhost::vhost_user::{Frontend as RvFrontend, VhostUserFrontend};
    use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};

    struct Theirs {
        fe: RvFrontend,
        kicks: Vec<EventFd>,
        calls: Vec<EventFd>,
    }

    fn connect(served: &Served, mem: &GuestMem) -> Theirs {
        let mut fe = RvFrontend::connect(&served.socket, 3).unwrap();
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        let proto = fe.get_protocol_features().unwrap();
        assert!(proto.contains(vhost::vhost_user::VhostUserProtocolFeatures::DEVICE_STATE));
        fe.set_protocol_features(
            vhost::vhost_user::VhostUserProtocolFeatures::MQ
                | vhost::vhost_user::VhostUserProtocolFeatures::DEVICE_STATE,
        )
        .unwrap();
        assert_eq!(offered & ACKED, ACKED);
        fe.set_features(ACKED | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
            .unwrap();
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM as u64,
            userspace_addr: UVA,
            mmap_offset: 0,
            mmap_handle: mem.fd.as_raw_fd(),
        }])
        .unwrap();
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        Theirs {
            fe,
            kicks: (0..3).map(|_| eventfd()).collect(),
            calls: (0..3).map(|_| eventfd()).collect(),
        }
    }

    fn start_rings(t: &mut Theirs, bases: [u32; 3]) {
        for (q, base) in bases.into_iter().enumerate() {
            let (desc, avail, used) = ring(q);
            t.fe.set_vring_num(q, QSIZE).unwrap();
            t.fe.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: 256,
                    queue_size: QSIZE,
                    flags: 0,
                    desc_table_addr: UVA + desc as u64,
                    used_ring_addr: UVA + used as u64,
                    avail_ring_addr: UVA + avail as u64,
                    log_addr: None,
                },
            )
            .unwrap();
            t.fe.set_vring_base(q, base as u16).unwrap();
            t.fe.set_vring_call(q, &t.calls[q]).unwrap();
            t.fe.set_vring_kick(q, &t.kicks[q]).unwrap();
            t.fe.set_vring_enable(q, true).unwrap();
        }
    }

    fn stop_rings(t: &mut Theirs) -> [u32; 3] {
        [0, 1, 2].map(|q| t.fe.get_vring_base(q).unwrap())
    }

    fn save(t: &mut Theirs) -> Vec<u8> {
        let (_r, w) = pipe();
        let back =
            t.fe.set_device_state_fd(
                VhostTransferStateDirection::SAVE,
                VhostTransferStatePhase::STOPPED,
                OwnedFd::from(w),
            )
            .unwrap();
        let mut r = back.expect("the back-end's own pipe end");
        let mut state = Vec::new();
        r.read_to_end(&mut state).unwrap();
        t.fe.check_device_state().unwrap();
        state
    }

    fn load(t: &mut Theirs, state: &[u8]) -> bool {
        let (r, _w) = pipe();
        let back =
            t.fe.set_device_state_fd(
                VhostTransferStateDirection::LOAD,
                VhostTransferStatePhase::STOPPED,
                OwnedFd::from(r),
            )
            .unwrap();
        let mut w = back.expect("the back-end's own pipe end");
        w.write_all(state).unwrap();
        drop(w);
        t.fe.check_device_state().is_ok()
    }

    let dir = scratch("theirs");
    let a = Served::start(&dir, "a", 5);
    let b = Served::start(&dir, "b", 5);
    let c = Served::start(&dir, "c", 6);

    let mem_a = GuestMem::new(MEM);
    let mut rings = Rings::default();
    rings.post_buffers(&mem_a);
    let mut ta = connect(&a, &mem_a);
    start_rings(&mut ta, [0; 3]);
    let bases = stop_rings(&mut ta);
    assert_eq!(bases, [0, 0, 0]);
    let state = save(&mut ta);
    assert_eq!(
        VsockSnapshot::from_bytes(&state).unwrap(),
        VsockSnapshot {
            guest_cid: 5,
            offered_features: Vsock::FEATURES,
            acked_features: ACKED
        }
    );

    let mem_b = GuestMem::new(MEM);
    mem_b.write_bytes(0, &mem_a.read_bytes(0, MEM));
    let mut tb = connect(&b, &mem_b);
    assert!(load(&mut tb, &state));
    start_rings(&mut tb, bases);
    assert_transport_reset(&mem_b);
    stop_rings(&mut tb);
    assert_eq!(save(&mut tb), state);

    let mem_c = GuestMem::new(MEM);
    let mut tc = connect(&c, &mem_c);
    assert!(!load(&mut tc, &state), "CID 6 refuses CID 5's state");

    drop((ta, tb, tc));
    for s in [a, b, c] {
        s.finish();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same through `outboard vsock --jail`: the transfer runs in jailed workers under
/// their seccomp allow-list (a missing system call would kill the worker), SAVE from one
/// daemon's worker and LOAD into another's.
#[cfg(all(feature = "cli", feature = "jail"))]
#[test]
fn jailed_workers_save_and_load() {
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};

    let dir = scratch("jail");
    // As root the worker is uid 65534 outside its namespace: let it create its sockets.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let spawn = |name: &str| {
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_outboard"))
            .args(["vsock", "--jail", "--guest-cid", "3", "--socket"])
            .arg(dir.join(format!("{name}.sock")))
            .arg("--uds-path")
            .arg(dir.join(format!("{name}.vsock")))
            .env("RUST_LOG", "info")
            .stderr(File::create(&log).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !dir.join(format!("{name}.sock")).exists() {
            assert!(Instant::now() < deadline, "{name}: no socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        (child, log)
    };
    let served = |name: &str| Served {
        socket: dir.join(format!("{name}.sock")),
        uds: dir.join(format!("{name}.vsock")),
        stop: EventFd::new(0).unwrap(),
        worker: std::thread::spawn(|| Ok(())),
    };
    let (mut da, log_a) = spawn("a");
    let (mut db, log_b) = spawn("b");

    let mem_a = GuestMem::new(MEM);
    let mut rings = Rings::default();
    rings.post_buffers(&mem_a);
    let mut fa = Ours::connect(&served("a"), &mem_a);
    fa.start_rings([0; 3]);
    let bases = fa.stop_rings();
    let state = fa.save();
    assert_eq!(VsockSnapshot::from_bytes(&state).unwrap().guest_cid, 3);

    let mem_b = GuestMem::new(MEM);
    mem_b.write_bytes(0, &mem_a.read_bytes(0, MEM));
    let mut fb = Ours::connect(&served("b"), &mem_b);
    fb.load(&state).unwrap();
    fb.start_rings(bases);
    assert_transport_reset(&mem_b);
    drop((fa, fb));

    for (daemon, log) in [(&mut da, &log_a), (&mut db, &log_b)] {
        let pid = i32::try_from(daemon.id()).unwrap();
        // SAFETY: kill(2) on our own child, which has not been reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let status = daemon.wait().unwrap();
        let text = std::fs::read_to_string(log).unwrap();
        assert!(status.success(), "{status}\n{text}");
        assert!(!text.contains("died") && !text.contains("SIGSYS"), "{text}");
    }
    let a = std::fs::read_to_string(&log_a).unwrap();
    let b = std::fs::read_to_string(&log_b).unwrap();
    assert!(a.contains("device state saved (32 bytes)"), "{a}");
    assert!(b.contains("device state loaded (32 bytes)"), "{b}");
    let _ = std::fs::remove_dir_all(&dir);
}
