//! The vhost-user daemon driven by outboard-transport's `Frontend`, as QEMU drives it:
//! memory through ADD_MEM_REG, a ring started by SET_VRING_KICK and stopped by
//! GET_VRING_BASE, a chain processed with the used ring and call eventfd updated, config
//! space, and a front-end that disconnects and comes back.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

mod common;

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixListener;
use std::time::Duration;

use common::{bfd, GuestMem};
use outboard_devices::testing::{EchoDevice, EchoEvent, EchoLog};
use outboard_devices::virtio::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use outboard_protocol::vhost_user::{
    VhostUserConfigFlags, VhostUserMemoryRegion, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures, VhostUserVringAddr,
};
use outboard_transport::{Frontend, MemoryRegionRef};
use outboard_vmm_glue::vhost_user::daemon;
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 0x10000;
const UVA: u64 = 0x7f00_0000_0000;

fn wait_readable(fd: BorrowedFd<'_>, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the call.
    unsafe { libc::poll(&mut p, 1, ms) == 1 }
}

/// Negotiates as QEMU does and sets up ring 0 (desc 0x1000, avail 0x2000, used 0x3000).
fn bring_up(fe: &mut Frontend, mem: &GuestMem, kick: &EventFd, call: &EventFd) {
    let offered = fe.get_features().unwrap();
    assert_ne!(
        offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        0
    );
    let proto = fe.get_protocol_features().unwrap();
    let want = VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::MQ;
    assert!(proto.contains(want));
    fe.set_protocol_features(want).unwrap();
    assert_eq!(fe.get_queue_num().unwrap(), 2);
    assert_eq!(
        fe.get_max_mem_slots().unwrap(),
        outboard_vmm_glue::vhost_user::memory::MAX_MEM_SLOTS as u64
    );
    fe.set_owner().unwrap();
    fe.set_features(offered).unwrap();
    fe.add_mem_region(&MemoryRegionRef {
        region: VhostUserMemoryRegion::new(0, MEM as u64, UVA, 0),
        fd: mem.fd.as_fd(),
    })
    .unwrap();
    fe.set_vring_num(0, 8).unwrap();
    fe.set_vring_addr(&VhostUserVringAddr {
        index: 0,
        flags: 0,
        descriptor: UVA + 0x1000,
        used: UVA + 0x3000,
        available: UVA + 0x2000,
        log: 0,
    })
    .unwrap();
    fe.set_vring_base(0, 0).unwrap();
    fe.set_vring_call(0, Some(bfd(call))).unwrap();
    fe.set_vring_kick(0, Some(bfd(kick))).unwrap();
    fe.set_vring_enable(0, true).unwrap();
}

/// Makes descriptor `head` (100 readable bytes) available as avail entry `slot`.
fn offer_chain(mem: &GuestMem, head: u16, slot: u16) {
    let d = 0x1000 + 16 * usize::from(head);
    mem.write(d, 0x8000u64);
    mem.write(d + 8, 100u32);
    mem.write(d + 12, 0u16);
    mem.write(0x2004 + 2 * usize::from(slot % 8), head);
    mem.write(0x2002, slot.wrapping_add(1));
}

/// The daemon serving an [`EchoDevice`] (two queues, each chain returned with its
/// readable length as the used length, config space `echo-cfg`) on `vu.sock` in a scratch directory, on a
/// worker thread.
struct Served {
    dir: std::path::PathBuf,
    path: std::path::PathBuf,
    log: EchoLog,
    stop: EventFd,
    worker: std::thread::JoinHandle<Result<(), daemon::WorkerError>>,
}

impl Served {
    fn start(name: &str) -> Served {
        let dir = std::env::temp_dir().join(format!("outboard-vu-{name}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vu.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let device = EchoDevice::new(&[16, 16])
            .with_features(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX)
            .with_config(b"echo-cfg");
        let log = device.log();
        let stop = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let worker_stop = stop.try_clone().unwrap();
        let worker = std::thread::spawn(move || {
            daemon::serve(device, listener, 256, &worker_stop, "test").map(|_| ())
        });
        Served {
            dir,
            path,
            log,
            stop,
            worker,
        }
    }

    /// Stops the worker, which must end cleanly, and removes the directory.
    fn finish(self) {
        self.stop.write(1).unwrap();
        self.worker.join().unwrap().unwrap();
        std::fs::remove_dir_all(&self.dir).unwrap();
    }
}

#[test]
fn frontend_drives_a_device_through_the_daemon() {
    let served = Served::start("");
    let (path, log) = (served.path.clone(), served.log.clone());

    let mem = GuestMem::new(MEM);
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut fe = Frontend::connect(&path).unwrap();
    bring_up(&mut fe, &mem, &kick, &call);
    assert_eq!(
        fe.get_config(0, 8, VhostUserConfigFlags::Frontend).unwrap(),
        b"echo-cfg"
    );
    // A ring size above the limit given to the daemon is refused.
    assert!(fe.set_vring_num(1, 512).is_err());

    offer_chain(&mem, 0, 0);
    kick.write(1).unwrap();
    assert!(wait_readable(bfd(&call), 5000), "no used-buffer call");
    assert_eq!(mem.read::<u16>(0x3002), 1);
    assert_eq!(mem.read::<u32>(0x3008), 100);
    assert_eq!(fe.get_vring_base(0).unwrap(), 1);
    assert_eq!(
        log.events(),
        vec![
            EchoEvent::AckFeatures(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX),
            EchoEvent::Activated { queues: 2 }
        ]
    );

    // The front-end goes away: the device is reset and the daemon listens again.
    drop(fe);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !log.contains(&EchoEvent::Reset) {
        assert!(
            std::time::Instant::now() < deadline,
            "no reset after disconnect"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut fe = Frontend::connect(&path).unwrap();
    let call2 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    // Fresh guest memory state: the rings start from zero again.
    mem.write(0x3002, 0u16);
    mem.write(0x2002, 0u16);
    bring_up(&mut fe, &mem, &kick, &call2);
    offer_chain(&mem, 3, 0);
    kick.write(1).unwrap();
    assert!(
        wait_readable(bfd(&call2), 5000),
        "no call after reconnecting"
    );
    assert_eq!(mem.read::<u16>(0x3004), 3); // used ring entry 0: head 3
    assert_eq!(fe.get_vring_base(0).unwrap(), 1);

    served.finish();
}

/// A ring stopped and restarted where it stopped (a paused VM) keeps the device's state;
/// one restarted from elsewhere (a reset driver) resets the device.
#[test]
fn resume_keeps_the_device_and_a_driver_reset_resets_it() {
    let served = Served::start("resume-");
    let (path, log) = (served.path.clone(), served.log.clone());
    let mem = GuestMem::new(MEM);
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut fe = Frontend::connect(&path).unwrap();
    bring_up(&mut fe, &mem, &kick, &call);
    offer_chain(&mem, 0, 0);
    kick.write(1).unwrap();
    assert!(wait_readable(bfd(&call), 5000));
    let base = fe.get_vring_base(0).unwrap();
    assert_eq!(base, 1);

    // Resume: same base, same addresses. The next chain is served, no reset.
    fe.set_vring_base(0, base).unwrap();
    fe.set_vring_kick(0, Some(bfd(&kick))).unwrap();
    call.read().unwrap();
    offer_chain(&mem, 1, 1);
    kick.write(1).unwrap();
    assert!(wait_readable(bfd(&call), 5000), "no call after resume");
    assert_eq!(mem.read::<u16>(0x3002), 2);
    assert!(!log.contains(&EchoEvent::Reset));

    // A reset driver starts over at index 0: the device is reset and activated again.
    assert_eq!(fe.get_vring_base(0).unwrap(), 2);
    mem.write(0x2002, 0u16);
    mem.write(0x3002, 0u16);
    fe.set_vring_base(0, 0).unwrap();
    fe.set_vring_kick(0, Some(bfd(&kick))).unwrap();
    let entries = log.events();
    assert_eq!(
        entries[entries.len() - 2..],
        [EchoEvent::Reset, EchoEvent::Activated { queues: 2 }]
    );

    drop(fe);
    served.finish();
}

/// A ring whose available index is more than the ring size ahead of the device's (a
/// hostile guest writing 9 on an 8-entry ring, or a front-end whose SET_VRING_BASE is
/// 300 while the guest's index is 0) is stopped and reported on the ring's
/// SET_VRING_ERR eventfd; it stays stopped until the front-end restarts it, and then
/// serves again. The worker never spins on it.
#[test]
fn a_broken_ring_is_stopped_and_reported_on_the_error_eventfd() {
    let served = Served::start("broken-");
    let path = served.path.clone();
    let mem = GuestMem::new(MEM);
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let err = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut fe = Frontend::connect(&path).unwrap();
    bring_up(&mut fe, &mem, &kick, &call);
    fe.set_vring_err(0, Some(bfd(&err))).unwrap();

    // The guest's index jumps 9 entries ahead on an 8-entry ring.
    mem.write(0x2002, 9u16);
    kick.write(1).unwrap();
    assert!(wait_readable(bfd(&err), 5000), "no error eventfd signal");
    assert_eq!(err.read().unwrap(), 1);
    // Stopped where the device was: nothing was consumed.
    assert_eq!(fe.get_vring_base(0).unwrap(), 0);
    // Kicks on the stopped ring do nothing (and the worker still answers).
    kick.write(1).unwrap();
    assert!(!wait_readable(bfd(&call), 100));
    assert_eq!(
        fe.get_config(0, 8, VhostUserConfigFlags::Frontend).unwrap(),
        b"echo-cfg"
    );

    // The front-end restarts the ring at a base 300 ahead of the guest's index 0.
    mem.write(0x2002, 0u16);
    fe.set_vring_base(0, 300).unwrap();
    fe.set_vring_kick(0, Some(bfd(&kick))).unwrap();
    assert!(wait_readable(bfd(&err), 5000), "no error for base 300");
    assert_eq!(err.read().unwrap(), 1);
    assert_eq!(fe.get_vring_base(0).unwrap(), 300);

    // Restarted consistently, the ring serves again.
    fe.set_vring_base(0, 0).unwrap();
    fe.set_vring_kick(0, Some(bfd(&kick))).unwrap();
    offer_chain(&mem, 2, 0);
    kick.write(1).unwrap();
    assert!(wait_readable(bfd(&call), 5000), "no call after the restart");
    assert_eq!(mem.read::<u16>(0x3004), 2);
    assert!(!wait_readable(bfd(&err), 50));

    drop(fe);
    served.finish();
}

/// An available ring at guest address 0 (which virtio-queue takes for "not configured",
/// so its iterator would fail on every pass: the busy loop of hostile-peer defect 1) is
/// refused with an error reply when the ring starts; the ring stays stopped, the worker
/// answers, and the ring starts once its addresses are sane.
#[test]
fn an_available_ring_at_guest_address_0_is_refused() {
    let served = Served::start("avail0-");
    let path = served.path.clone();
    let mem = GuestMem::new(MEM);
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut fe = Frontend::connect(&path).unwrap();
    bring_up(&mut fe, &mem, &kick, &call);
    assert_eq!(fe.get_vring_base(0).unwrap(), 0);
    let addr = |available| VhostUserVringAddr {
        index: 0,
        flags: 0,
        descriptor: UVA + 0x1000,
        used: UVA + 0x3000,
        available,
        log: 0,
    };
    fe.set_vring_addr(&addr(UVA)).unwrap();
    fe.set_vring_base(0, 0).unwrap();
    let e = fe.set_vring_kick(0, Some(bfd(&kick))).unwrap_err();
    assert!(format!("{e}").contains("answered with status"), "{e}");
    offer_chain(&mem, 2, 0);
    kick.write(1).unwrap();
    assert!(!wait_readable(bfd(&call), 200), "the ring at 0 ran");
    assert_eq!(
        fe.get_config(0, 8, VhostUserConfigFlags::Frontend).unwrap(),
        b"echo-cfg"
    );
    fe.set_vring_addr(&addr(UVA + 0x2000)).unwrap();
    fe.set_vring_kick(0, Some(bfd(&kick))).unwrap();
    kick.write(1).unwrap();
    assert!(
        wait_readable(bfd(&call), 5000),
        "no call once the ring is sane"
    );
    drop(fe);
    served.finish();
}

/// Ring fds must be eventfds: a pipe (whose reader is gone, so a write would raise
/// SIGPIPE in an embedding process that does not ignore it), a socket or a regular file
/// as the kick, call or error fd is refused with an error reply, and the session goes on.
#[test]
fn ring_fds_that_are_not_eventfds_are_refused() {
    let served = Served::start("fds-");
    let path = served.path.clone();
    let mem = GuestMem::new(MEM);
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut fe = Frontend::connect(&path).unwrap();
    bring_up(&mut fe, &mem, &kick, &call);
    let (pipe_r, pipe_w) = std::io::pipe().unwrap();
    drop(pipe_r);
    let (sock, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let file = std::fs::File::create(served.dir.join("plain")).unwrap();
    for fd in [pipe_w.as_fd(), sock.as_fd(), file.as_fd()] {
        assert!(fe.set_vring_call(1, Some(fd)).is_err());
        assert!(fe.set_vring_err(1, Some(fd)).is_err());
        assert!(fe.set_vring_kick(1, Some(fd)).is_err());
    }
    // The session goes on, and ring 0 still serves.
    assert_eq!(
        fe.get_config(0, 8, VhostUserConfigFlags::Frontend).unwrap(),
        b"echo-cfg"
    );
    offer_chain(&mem, 0, 0);
    kick.write(1).unwrap();
    assert!(wait_readable(bfd(&call), 5000));
    drop(fe);
    served.finish();
}

/// The protocol features follow the device: no `CONFIG` for a device without a config
/// space (QEMU warns at start about a back-end that offers it for such a device), and
/// `without_protocol_features` removes what the daemon offers for every device.
#[test]
fn protocol_features_follow_the_device_and_can_be_removed() {
    let offered = |device: EchoDevice, remove: VhostUserProtocolFeatures| {
        let dir = std::env::temp_dir().join(format!(
            "outboard-vu-proto-{}-{}",
            remove.bits(),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vu.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let stop = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let worker_stop = stop.try_clone().unwrap();
        let worker = std::thread::spawn(move || {
            daemon::serve_with(device, listener, 256, &worker_stop, "test", |b| {
                b.without_protocol_features(remove)
            })
            .map(|_| ())
        });
        let mut fe = Frontend::connect(&path).unwrap();
        fe.get_features().unwrap();
        let proto = fe.get_protocol_features().unwrap();
        drop(fe);
        stop.write(1).unwrap();
        worker.join().unwrap().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        proto
    };
    let none = VhostUserProtocolFeatures::empty();
    let without_config = offered(EchoDevice::new(&[16]), none);
    assert!(!without_config.contains(VhostUserProtocolFeatures::CONFIG));
    assert!(without_config.contains(VhostUserProtocolFeatures::REPLY_ACK));
    let with_config = offered(EchoDevice::new(&[16]).with_config(b"cfg"), none);
    assert!(with_config.contains(VhostUserProtocolFeatures::CONFIG));
    let removed = offered(
        EchoDevice::new(&[16]).with_config(b"cfg"),
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::BACKEND_REQ,
    );
    assert!(!removed.contains(VhostUserProtocolFeatures::CONFIG));
    assert!(!removed.contains(VhostUserProtocolFeatures::BACKEND_REQ));
    assert!(removed.contains(VhostUserProtocolFeatures::MQ));
}
