//! Session tests: our `Frontend` drives our `BackendReqHandler` through a whole vhost-user
//! session (with a recording test back-end), the back-end -> front-end channel runs in
//! both directions, and hostile input is refused without panics or fd leaks.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;

use outboard_protocol::vhost_user::*;
use outboard_protocol::ProtocolError;
use zerocopy::IntoBytes;

use crate::sock::tests::{probe_count, probe_fd};
use crate::*;

use outboard_protocol::virtio::VIRTIO_F_VERSION_1;

const FEATURES: u64 = VIRTIO_F_VERSION_1 | (1 << 30) | 0x3;

/// A memfd of `size` bytes whose first bytes are `marker`.
fn memfd(tag: &str, size: u64, marker: &[u8]) -> OwnedFd {
    let fd = probe_fd(tag);
    rustix::fs::ftruncate(&fd, size).unwrap();
    rustix::io::pwrite(&fd, marker, 0).unwrap();
    fd
}

fn read_marker(fd: &OwnedFd, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    rustix::io::pread(fd, &mut buf, 0).unwrap();
    buf
}

/// A back-end that records every call and keeps what it was given.
#[derive(Default)]
struct Recorder {
    log: Vec<String>,
    protocol: VhostUserProtocolFeatures,
    config: Vec<u8>,
    regions: Vec<(VhostUserMemoryRegion, Vec<u8>)>,
    vring_fds: Vec<(String, u32, bool)>,
    status: u8,
    channel: Option<mpsc::Sender<BackendReqSender>>,
    fail_get_config: bool,
}

impl Recorder {
    fn new() -> Self {
        Recorder {
            protocol: VhostUserProtocolFeatures::all(),
            config: (0..=255).collect(),
            ..Default::default()
        }
    }
}

impl VhostUserBackendReqHandler for Recorder {
    fn max_queues(&self) -> u32 {
        2
    }
    fn set_owner(&mut self) -> HandlerResult<()> {
        self.log.push("set_owner".into());
        Ok(())
    }
    fn get_features(&mut self) -> HandlerResult<u64> {
        self.log.push("get_features".into());
        Ok(FEATURES)
    }
    fn set_features(&mut self, features: u64) -> HandlerResult<()> {
        self.log.push(format!("set_features {features:#x}"));
        Ok(())
    }
    fn get_protocol_features(&mut self) -> HandlerResult<VhostUserProtocolFeatures> {
        self.log.push("get_protocol_features".into());
        Ok(self.protocol)
    }
    fn set_protocol_features(&mut self, f: VhostUserProtocolFeatures) -> HandlerResult<()> {
        self.log
            .push(format!("set_protocol_features {:#x}", f.bits()));
        Ok(())
    }
    fn set_mem_table(&mut self, regions: Vec<MemoryRegion>) -> HandlerResult<()> {
        self.log.push(format!("set_mem_table {}", regions.len()));
        self.regions = regions
            .iter()
            .map(|r| (r.region, read_marker(&r.fd, 4)))
            .collect();
        Ok(())
    }
    fn set_vring_num(&mut self, index: u32, num: u32) -> HandlerResult<()> {
        self.log.push(format!("set_vring_num {index} {num}"));
        Ok(())
    }
    fn set_vring_addr(&mut self, a: &VhostUserVringAddr) -> HandlerResult<()> {
        self.log.push(format!(
            "set_vring_addr {} {:#x} {:#x} {:#x} {:#x} {}",
            a.index, a.descriptor, a.used, a.available, a.log, a.flags
        ));
        Ok(())
    }
    fn set_vring_base(&mut self, index: u32, base: u32) -> HandlerResult<()> {
        self.log.push(format!("set_vring_base {index} {base}"));
        Ok(())
    }
    fn get_vring_base(&mut self, index: u32) -> HandlerResult<u32> {
        self.log.push(format!("get_vring_base {index}"));
        if index == 1 {
            return Err(std::io::Error::from_raw_os_error(libc::EBUSY));
        }
        Ok(42)
    }
    fn set_vring_kick(&mut self, index: u32, fd: Option<OwnedFd>) -> HandlerResult<()> {
        self.vring_fds.push(("kick".into(), index, fd.is_some()));
        Ok(())
    }
    fn set_vring_call(&mut self, index: u32, fd: Option<OwnedFd>) -> HandlerResult<()> {
        self.vring_fds.push(("call".into(), index, fd.is_some()));
        Ok(())
    }
    fn set_vring_err(&mut self, index: u32, fd: Option<OwnedFd>) -> HandlerResult<()> {
        self.vring_fds.push(("err".into(), index, fd.is_some()));
        Ok(())
    }
    fn set_vring_enable(&mut self, index: u32, enable: bool) -> HandlerResult<()> {
        self.log.push(format!("set_vring_enable {index} {enable}"));
        Ok(())
    }
    fn get_config(&mut self, offset: u32, size: u32, flags: u32) -> HandlerResult<Vec<u8>> {
        self.log.push(format!("get_config {offset} {size} {flags}"));
        if self.fail_get_config {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(self.config[offset as usize..(offset + size) as usize].to_vec())
    }
    fn set_config(&mut self, offset: u32, data: &[u8], flags: u32) -> HandlerResult<()> {
        self.log
            .push(format!("set_config {offset} {} {flags}", data.len()));
        self.config[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn set_backend_req_fd(&mut self, backend: BackendReqSender) -> HandlerResult<()> {
        self.log.push("set_backend_req_fd".into());
        if let Some(tx) = &self.channel {
            let _ = tx.send(backend);
        }
        Ok(())
    }
    fn get_max_mem_slots(&mut self) -> HandlerResult<u64> {
        self.log.push("get_max_mem_slots".into());
        Ok(32)
    }
    fn add_mem_region(&mut self, r: MemoryRegion) -> HandlerResult<()> {
        self.log.push(format!(
            "add_mem_region {:#x} {:?}",
            r.region.guest_phys_addr,
            read_marker(&r.fd, 4)
        ));
        Ok(())
    }
    fn remove_mem_region(&mut self, r: &VhostUserMemoryRegion) -> HandlerResult<()> {
        self.log
            .push(format!("remove_mem_region {:#x}", r.guest_phys_addr));
        Ok(())
    }
    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> HandlerResult<(VhostUserInflight, OwnedFd)> {
        self.log.push(format!(
            "get_inflight_fd {} {}",
            inflight.num_queues, inflight.queue_size
        ));
        let reply = VhostUserInflight {
            mmap_size: 0x1000,
            mmap_offset: 0,
            ..*inflight
        };
        Ok((reply, memfd("session-inflight", 0x1000, b"INFL")))
    }
    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, fd: OwnedFd) -> HandlerResult<()> {
        self.log.push(format!(
            "set_inflight_fd {:#x} {:?}",
            inflight.mmap_size,
            read_marker(&fd, 4)
        ));
        Ok(())
    }
    fn set_log_base(&mut self, log: &VhostUserLog, fd: OwnedFd) -> HandlerResult<()> {
        self.log.push(format!(
            "set_log_base {:#x} {}",
            log.mmap_size,
            fd.as_raw_fd() >= 0
        ));
        Ok(())
    }
    fn set_log_fd(&mut self, _fd: OwnedFd) -> HandlerResult<()> {
        self.log.push("set_log_fd".into());
        Ok(())
    }
    fn set_status(&mut self, status: u8) -> HandlerResult<()> {
        self.log.push(format!("set_status {status:#x}"));
        self.status = status;
        Ok(())
    }
    fn get_status(&mut self) -> HandlerResult<u8> {
        Ok(self.status)
    }
    fn reset_device(&mut self) -> HandlerResult<()> {
        self.log.push("reset_device".into());
        Ok(())
    }
    fn get_shmem_config(&mut self) -> HandlerResult<VhostUserShmemConfig> {
        self.log.push("get_shmem_config".into());
        Ok(VhostUserShmemConfig::new(&[0x10_0000, 0, 0x2000]))
    }
    fn set_device_state_fd(
        &mut self,
        direction: TransferDirection,
        phase: TransferPhase,
        _fd: OwnedFd,
    ) -> HandlerResult<Option<OwnedFd>> {
        self.log
            .push(format!("set_device_state_fd {direction:?} {phase:?}"));
        Ok(None)
    }
    fn check_device_state(&mut self) -> HandlerResult<()> {
        self.log.push("check_device_state".into());
        Ok(())
    }
}

/// Records what the front-end was asked over the back-end request channel.
#[derive(Default)]
struct VmmSide {
    log: Arc<Mutex<Vec<String>>>,
}

impl VhostUserFrontendReqHandler for VmmSide {
    fn config_change(&mut self) -> HandlerResult<()> {
        self.log.lock().unwrap().push("config_change".into());
        Ok(())
    }
    fn shmem_map(&mut self, map: &VhostUserMMap, fd: OwnedFd) -> HandlerResult<()> {
        self.log.lock().unwrap().push(format!(
            "shmem_map {} {:#x} {:#x} {:?}",
            map.shmid,
            map.shm_offset,
            map.len,
            read_marker(&fd, 4)
        ));
        Ok(())
    }
    fn shmem_unmap(&mut self, map: &VhostUserMMap) -> HandlerResult<()> {
        self.log
            .lock()
            .unwrap()
            .push(format!("shmem_unmap {} {:#x}", map.shmid, map.shm_offset));
        Ok(())
    }
    fn shared_object_add(&mut self, uuid: &VhostUserShared) -> HandlerResult<()> {
        self.log
            .lock()
            .unwrap()
            .push(format!("shared_object_add {}", uuid.uuid[0]));
        Ok(())
    }
    fn shared_object_lookup(&mut self, uuid: &VhostUserShared) -> HandlerResult<OwnedFd> {
        self.log
            .lock()
            .unwrap()
            .push(format!("shared_object_lookup {}", uuid.uuid[0]));
        Ok(memfd("session-dmabuf", 0x1000, b"DBUF"))
    }
    fn vring_call(&mut self, index: u32) -> HandlerResult<()> {
        self.log.lock().unwrap().push(format!("vring_call {index}"));
        Ok(())
    }
    #[cfg(feature = "crosvm")]
    fn gpu_map(&mut self, msg: &VhostUserGpuMapMsg, _fd: OwnedFd) -> HandlerResult<()> {
        self.log
            .lock()
            .unwrap()
            .push(format!("gpu_map {} {:#x}", msg.shmid, msg.len));
        Ok(())
    }
    #[cfg(feature = "crosvm")]
    fn external_map(&mut self, msg: &VhostUserExternalMapMsg) -> HandlerResult<()> {
        self.log
            .lock()
            .unwrap()
            .push(format!("external_map {:#x}", msg.ptr));
        Ok(())
    }
}

fn uuid(first: u8) -> VhostUserShared {
    let mut u = [7u8; 16];
    u[0] = first;
    VhostUserShared { uuid: u }
}

#[test]
fn full_session() {
    let (fe_conn, be_conn) = Connection::pair().unwrap();
    let (tx, rx) = mpsc::channel();
    let mut recorder = Recorder::new();
    recorder.channel = Some(tx);
    let server = thread::spawn(move || {
        let mut h = BackendReqHandler::new(be_conn, recorder);
        h.run().unwrap();
        (h.acked_features(), h.protocol_features(), h.into_backend())
    });

    let mut fe = Frontend::new(fe_conn);
    assert_eq!(fe.get_features().unwrap(), FEATURES);
    fe.set_owner().unwrap();
    let offered = fe.get_protocol_features().unwrap();
    assert_eq!(offered, VhostUserProtocolFeatures::all());
    fe.set_protocol_features(offered).unwrap();
    fe.set_features(FEATURES & !0x1).unwrap();

    let (inflight, inflight_fd) = fe
        .get_inflight_fd(&VhostUserInflight {
            num_queues: 2,
            queue_size: 256,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(inflight.mmap_size, 0x1000);
    assert_eq!(read_marker(&inflight_fd, 4), b"INFL");
    fe.set_inflight_fd(&inflight, inflight_fd.as_fd()).unwrap();
    assert_eq!(fe.get_queue_num().unwrap(), 2);

    let mem0 = memfd("session-mem", 0x10_0000, b"MEM0");
    let mem1 = memfd("session-mem", 0x10_0000, b"MEM1");
    fe.set_mem_table(&[
        MemoryRegionRef {
            region: VhostUserMemoryRegion::new(0, 0x10_0000, 0x7f00_0000_0000, 0),
            fd: mem0.as_fd(),
        },
        MemoryRegionRef {
            region: VhostUserMemoryRegion::new(0x10_0000, 0x10_0000, 0x7f00_0010_0000, 0),
            fd: mem1.as_fd(),
        },
    ])
    .unwrap();

    fe.set_config(0x10, &[0xa5, 0x5a], VhostUserConfigFlags::Frontend)
        .unwrap();
    assert_eq!(
        fe.get_config(0x10, 4, VhostUserConfigFlags::Frontend)
            .unwrap(),
        [0xa5, 0x5a, 0x12, 0x13]
    );

    // The back-end request channel, served by the VMM side on its own thread.
    let vmm_log = Arc::new(Mutex::new(Vec::new()));
    let mut channel = FrontendReqHandler::new(
        VmmSide {
            log: vmm_log.clone(),
        },
        fe.protocol_features(),
    )
    .unwrap();
    let backend_end = channel.take_backend_fd().unwrap();
    assert!(channel.take_backend_fd().is_none());
    fe.set_backend_req_fd(backend_end.as_fd()).unwrap();
    drop(backend_end);
    let vmm = thread::spawn(move || loop {
        match channel.handle_request() {
            Ok(()) => {}
            Err(Error::Disconnect) => return,
            // What the VMM side does not implement was answered with -ENOSYS.
            Err(Error::ReqHandlerError(e)) => assert_eq!(e.raw_os_error(), Some(libc::ENOSYS)),
            Err(e) => panic!("back-end channel: {e}"),
        }
    });

    fe.set_vring_enable(0, true).unwrap();
    let log_fd = memfd("session-log", 0x1000, b"LOG!");
    fe.set_log_base(
        &VhostUserLog {
            mmap_size: 0x1000,
            mmap_offset: 0,
        },
        log_fd.as_fd(),
    )
    .unwrap();
    fe.set_log_fd(log_fd.as_fd()).unwrap();

    fe.set_vring_num(0, 256).unwrap();
    fe.set_vring_base(0, 0).unwrap();
    fe.set_vring_addr(&VhostUserVringAddr {
        index: 0,
        flags: VhostUserVringAddrFlags::LOG.bits(),
        descriptor: 0x1000,
        used: 0x2000,
        available: 0x3000,
        log: 0x4000,
    })
    .unwrap();
    let ev = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
    fe.set_vring_call(0, Some(ev.as_fd())).unwrap();
    fe.set_vring_kick(0, Some(ev.as_fd())).unwrap();
    fe.set_vring_err(0, Some(ev.as_fd())).unwrap();
    fe.set_vring_call(1, None).unwrap();

    assert_eq!(fe.get_max_mem_slots().unwrap(), 32);
    let mem2 = memfd("session-mem", 0x10_0000, b"MEM2");
    let region = VhostUserMemoryRegion::new(0x20_0000, 0x10_0000, 0x7f00_0020_0000, 0);
    fe.add_mem_region(&MemoryRegionRef {
        region,
        fd: mem2.as_fd(),
    })
    .unwrap();
    fe.remove_mem_region(&region).unwrap();

    let shmem = fe.get_shmem_config().unwrap();
    assert_eq!(shmem.num_regions, 2);
    assert_eq!(shmem.mem_size[0], 0x10_0000);
    assert_eq!(shmem.mem_size[2], 0x2000);

    let state = memfd("session-state", 0, b"");
    assert!(fe
        .set_device_state_fd(
            TransferDirection::Save,
            TransferPhase::Stopped,
            state.as_fd()
        )
        .unwrap()
        .is_none());
    fe.check_device_state().unwrap();
    fe.set_status(0xf).unwrap();
    assert_eq!(fe.get_status().unwrap(), 0xf);
    // Not implemented by the recorder: the ENOSYS comes back as a REPLY_ACK status.
    let err = fe.send_rarp([1, 2, 3, 4, 5, 6]).unwrap_err();
    assert!(
        matches!(err, Error::PeerStatus { request: "SEND_RARP", status } if status == (-(libc::ENOSYS as i64)) as u64),
        "{err}"
    );

    // Back-end -> front-end requests, from the back-end's sender.
    let backend = rx.recv().unwrap();
    backend.config_change().unwrap();
    let shm = memfd("session-shm", 0x1000, b"SHM!");
    let map = VhostUserMMap::new(1, 0, 0x2000, 0x1000, VhostUserMMapFlags::RW);
    backend.shmem_map(&map, shm.as_fd()).unwrap();
    backend.shmem_unmap(&map).unwrap();
    backend.shared_object_add(&uuid(3)).unwrap();
    let dmabuf = backend.shared_object_lookup(&uuid(3)).unwrap();
    assert_eq!(read_marker(&dmabuf, 4), b"DBUF");
    backend.vring_call(1).unwrap();
    // The VMM side does not implement shared_object_remove: an error status.
    assert!(matches!(
        backend.shared_object_remove(&uuid(3)),
        Err(Error::PeerStatus { .. })
    ));
    #[cfg(feature = "crosvm")]
    {
        let gpu = VhostUserGpuMapMsg {
            shmid: 0,
            len: 0x3000,
            ..Default::default()
        };
        backend.gpu_map(&gpu, shm.as_fd()).unwrap();
        let ext = VhostUserExternalMapMsg {
            len: 0x1000,
            ptr: 0xdead_0000,
            ..Default::default()
        };
        backend.external_map(&ext).unwrap();
    }

    assert_eq!(fe.get_vring_base(0).unwrap(), 42);
    fe.reset_device().unwrap();
    drop(backend);
    drop(fe);
    vmm.join().unwrap();
    let (acked, protocol, rec) = server.join().unwrap();
    assert_eq!(acked, FEATURES & !0x1);
    assert_eq!(protocol, VhostUserProtocolFeatures::all());

    let expected = [
        "get_features".to_string(),
        "set_owner".into(),
        "get_protocol_features".into(),
        format!(
            "set_protocol_features {:#x}",
            VhostUserProtocolFeatures::all().bits()
        ),
        format!("set_features {:#x}", FEATURES & !0x1),
        "get_inflight_fd 2 256".into(),
        "set_inflight_fd 0x1000 [73, 78, 70, 76]".into(),
        "set_mem_table 2".into(),
        "set_config 16 2 0".into(),
        "get_config 16 4 0".into(),
        "set_backend_req_fd".into(),
        "set_vring_enable 0 true".into(),
        "set_log_base 0x1000 true".into(),
        "set_log_fd".into(),
        "set_vring_num 0 256".into(),
        "set_vring_base 0 0".into(),
        "set_vring_addr 0 0x1000 0x2000 0x3000 0x4000 1".into(),
        "get_max_mem_slots".into(),
        "add_mem_region 0x200000 [77, 69, 77, 50]".into(),
        "remove_mem_region 0x200000".into(),
        "get_shmem_config".into(),
        "set_device_state_fd Save Stopped".into(),
        "check_device_state".into(),
        "set_status 0xf".into(),
        "get_vring_base 0".into(),
        "reset_device".into(),
    ];
    assert_eq!(rec.log, expected);
    assert_eq!(rec.regions.len(), 2);
    assert_eq!(rec.regions[0].1, b"MEM0");
    assert_eq!(rec.regions[1].1, b"MEM1");
    assert_eq!(rec.regions[1].0.guest_phys_addr, 0x10_0000);
    assert_eq!(
        rec.vring_fds,
        [
            ("call".into(), 0, true),
            ("kick".into(), 0, true),
            ("err".into(), 0, true),
            ("call".into(), 1, false)
        ]
    );
    let mut want_vmm = vec![
        "config_change".to_string(),
        "shmem_map 1 0x2000 0x1000 [83, 72, 77, 33]".into(),
        "shmem_unmap 1 0x2000".into(),
        "shared_object_add 3".into(),
        "shared_object_lookup 3".into(),
        "vring_call 1".into(),
    ];
    if cfg!(feature = "crosvm") {
        want_vmm.push("gpu_map 0 0x3000".into());
        want_vmm.push("external_map 0xdead0000".into());
    }
    assert_eq!(*vmm_log.lock().unwrap(), want_vmm);
    // Every fd the session handed around is closed again.
    drop((inflight_fd, dmabuf, mem0, mem1, mem2, log_fd, state, shm));
    for tag in [
        "session-inflight",
        "session-dmabuf",
        "session-mem",
        "session-log",
        "session-state",
        "session-shm",
    ] {
        assert_eq!(probe_count(tag), 0, "{tag}");
    }
}

#[test]
fn frontend_refuses_ungated_requests_locally() {
    let (fe_conn, be_conn) = Connection::pair().unwrap();
    let mut fe = Frontend::new(fe_conn);
    // Nothing negotiated: these fail before anything is sent.
    assert!(matches!(
        fe.get_queue_num(),
        Err(Error::FeatureMismatch { request: "GET_QUEUE_NUM", feature }) if feature == VhostUserProtocolFeatures::MQ
    ));
    assert!(matches!(
        fe.get_protocol_features(),
        Err(Error::InvalidOperation(_))
    ));
    assert!(matches!(
        fe.set_features(1 << 5),
        Err(Error::InvalidParam(_))
    ));
    assert!(matches!(fe.set_mem_table(&[]), Err(Error::InvalidParam(_))));
    // The back-end saw nothing: its first message is the GET_FEATURES sent now.
    let server = thread::spawn(move || {
        let mut h = BackendReqHandler::new(be_conn, Recorder::new());
        h.handle_request().unwrap();
        h.into_backend().log
    });
    assert_eq!(fe.get_features().unwrap(), FEATURES);
    assert_eq!(server.join().unwrap(), ["get_features"]);
}

/// A client that writes raw messages at a back-end handled on the same thread.
struct Hostile {
    raw: Connection,
    handler: BackendReqHandler<Recorder>,
}

impl Hostile {
    fn new() -> Self {
        let (raw, be) = Connection::pair().unwrap();
        Hostile {
            raw,
            handler: BackendReqHandler::new(be, Recorder::new()),
        }
    }

    fn send(&self, header: Header, body: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]) {
        let iov = [
            std::io::IoSlice::new(header.as_bytes()),
            std::io::IoSlice::new(body),
        ];
        crate::sock::send_with_fds(self.raw.socket(), &iov, fds).unwrap();
    }

    fn request(
        &mut self,
        req: FrontendReq,
        body: &[u8],
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<()> {
        self.send(
            Header::request(req.code(), body.len() as u32, false),
            body,
            fds,
        );
        self.handler.handle_request()
    }

    /// The handler is still in step: a valid request is answered.
    fn assert_in_step(&mut self) {
        self.request(FrontendReq::GET_FEATURES, &[], &[]).unwrap();
        let m = self.raw.recv().unwrap();
        assert!(m.header.is_reply());
        assert_eq!(m.body, FEATURES.to_ne_bytes());
    }

    fn negotiate(&mut self) {
        self.request(FrontendReq::SET_OWNER, &[], &[]).unwrap();
        let all = VhostUserProtocolFeatures::all().bits().to_ne_bytes();
        self.request(FrontendReq::GET_FEATURES, &[], &[]).unwrap();
        self.raw.recv().unwrap();
        self.request(FrontendReq::SET_PROTOCOL_FEATURES, &all, &[])
            .unwrap();
    }
}

#[test]
fn hostile_headers_are_refused_and_the_stream_stays_in_step() {
    let mut h = Hostile::new();
    let tag = "hostile-hdr";
    let fd = probe_fd(tag);

    // Wrong version.
    h.send(
        Header {
            request: 1,
            flags: 0x2,
            size: 0,
        },
        &[],
        &[fd.as_fd()],
    );
    let err = h.handler.handle_request().unwrap_err();
    assert!(
        matches!(err, Error::InvalidMessage(ProtocolError::Version(2))),
        "{err}"
    );
    h.assert_in_step();

    // REPLY flag on a request.
    h.send(Header::reply(FrontendReq::GET_FEATURES.code(), 0), &[], &[]);
    let err = h.handler.handle_request().unwrap_err();
    assert!(
        matches!(err, Error::InvalidMessage(ProtocolError::Unknown { .. })),
        "{err}"
    );
    h.assert_in_step();

    // Reserved flag bits.
    h.send(
        Header {
            request: 1,
            flags: 0x1 | 0x100,
            size: 0,
        },
        &[],
        &[],
    );
    let err = h.handler.handle_request().unwrap_err();
    assert!(
        matches!(err, Error::InvalidMessage(ProtocolError::Reserved { .. })),
        "{err}"
    );

    // Unknown request code, with a body and an fd.
    h.send(Header::request(99, 4, false), &[1, 2, 3, 4], &[fd.as_fd()]);
    let err = h.handler.handle_request().unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidMessage(ProtocolError::Unknown { value: 99, .. })
        ),
        "{err}"
    );
    h.assert_in_step();

    // Request before SET_OWNER.
    let state = VhostUserVringState::new(0, 256);
    let err = h
        .request(FrontendReq::SET_VRING_NUM, state.as_bytes(), &[])
        .unwrap_err();
    assert!(matches!(err, Error::InvalidOperation(_)), "{err}");

    // Feature-gated request without the feature.
    h.request(FrontendReq::SET_OWNER, &[], &[]).unwrap();
    let err = h.request(FrontendReq::GET_QUEUE_NUM, &[], &[]).unwrap_err();
    assert!(
        matches!(err, Error::FeatureMismatch { request: "GET_QUEUE_NUM", feature } if feature == VhostUserProtocolFeatures::MQ),
        "{err}"
    );
    // A second SET_OWNER.
    let err = h.request(FrontendReq::SET_OWNER, &[], &[]).unwrap_err();
    assert!(matches!(err, Error::InvalidOperation(_)), "{err}");
    h.assert_in_step();
    assert_eq!(probe_count(tag), 1);
}

#[test]
fn hostile_bodies_and_fds_are_refused_without_leaks() {
    let mut h = Hostile::new();
    h.negotiate();
    let tag = "hostile-body";
    let a = probe_fd(tag);
    let b = probe_fd(tag);

    // Size mismatch: SET_FEATURES with 4 bytes.
    let err = h
        .request(FrontendReq::SET_FEATURES, &[0; 4], &[])
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidMessage(ProtocolError::Size {
                got: 4,
                want: 8,
                ..
            })
        ),
        "{err}"
    );

    // Too many fds: SET_VRING_CALL with two.
    let call = vring_fd_u64(0, true).to_ne_bytes();
    let err = h
        .request(FrontendReq::SET_VRING_CALL, &call, &[a.as_fd(), b.as_fd()])
        .unwrap_err();
    assert!(matches!(err, Error::IncorrectFds { got: 2, .. }), "{err}");
    // NOFD set but an fd attached.
    let nofd = vring_fd_u64(0, false).to_ne_bytes();
    let err = h
        .request(FrontendReq::SET_VRING_KICK, &nofd, &[a.as_fd()])
        .unwrap_err();
    assert!(matches!(err, Error::IncorrectFds { got: 1, .. }), "{err}");
    // Too few fds: a two-region memory table with one fd.
    let mut table = VhostUserMemory::new(2).as_bytes().to_vec();
    table.extend_from_slice(VhostUserMemoryRegion::new(0, 0x1000, 0, 0).as_bytes());
    table.extend_from_slice(VhostUserMemoryRegion::new(0x1000, 0x1000, 0, 0).as_bytes());
    let err = h
        .request(FrontendReq::SET_MEM_TABLE, &table, &[a.as_fd()])
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::IncorrectFds {
                got: 1,
                want: "one per region",
                ..
            }
        ),
        "{err}"
    );
    // A region count that disagrees with the size.
    let mut bad = table.clone();
    bad[0] = 3;
    let err = h
        .request(FrontendReq::SET_MEM_TABLE, &bad, &[a.as_fd(), b.as_fd()])
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidMessage(ProtocolError::Size { .. })),
        "{err}"
    );
    // Ring index out of range.
    let err = h
        .request(
            FrontendReq::SET_VRING_NUM,
            VhostUserVringState::new(5, 256).as_bytes(),
            &[],
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidMessage(ProtocolError::OutOfBounds { value: 5, .. })
        ),
        "{err}"
    );
    // A back-end request fd that is not a socket.
    let err = h
        .request(FrontendReq::SET_BACKEND_REQ_FD, &[], &[a.as_fd()])
        .unwrap_err();
    assert!(matches!(err, Error::InvalidParam(_)), "{err}");
    // Config access past the config space.
    let cfg = VhostUserConfig {
        offset: 250,
        size: 10,
        flags: 0,
    };
    let mut body = cfg.as_bytes().to_vec();
    body.extend_from_slice(&[0; 10]);
    let err = h.request(FrontendReq::SET_CONFIG, &body, &[]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidMessage(ProtocolError::OutOfBounds { .. })
        ),
        "{err}"
    );

    h.assert_in_step();
    drop((a, b));
    assert_eq!(probe_count(tag), 0, "the handler kept or leaked an fd");
}

#[test]
fn refused_requests_are_nacked_when_the_front_end_asked() {
    let mut h = Hostile::new();
    h.negotiate();
    // NEED_REPLY with REPLY_ACK negotiated: a refused request gets a failure status.
    h.send(
        Header::request(FrontendReq::SET_FEATURES.code(), 4, true),
        &[0; 4],
        &[],
    );
    assert!(h.handler.handle_request().is_err());
    let m = h.raw.recv().unwrap();
    assert_eq!(m.header.request, FrontendReq::SET_FEATURES.code());
    assert!(m.header.is_reply());
    assert_eq!(m.body, ((-libc::EINVAL) as i64 as u64).to_ne_bytes());
    // A failing GET_CONFIG gets the spec's failure reply (head only, size 0).
    h.handler.backend_mut().fail_get_config = true;
    let mut body = VhostUserConfig {
        offset: 0,
        size: 4,
        flags: 0,
    }
    .as_bytes()
    .to_vec();
    body.extend_from_slice(&[0; 4]);
    let err = h.request(FrontendReq::GET_CONFIG, &body, &[]).unwrap_err();
    assert!(matches!(err, Error::ReqHandlerError(_)), "{err}");
    let m = h.raw.recv().unwrap();
    assert_eq!(m.body.len(), 12);
    assert!(!h.handler.peer_waiting());
    h.assert_in_step();
    // A failing GET_VRING_BASE has no way to report the failure: the handler says so,
    // and run() ends the session instead of leaving the front-end waiting.
    let err = h
        .request(
            FrontendReq::GET_VRING_BASE,
            VhostUserVringState::new(1, 0).as_bytes(),
            &[],
        )
        .unwrap_err();
    assert!(matches!(err, Error::ReqHandlerError(_)), "{err}");
    assert!(h.handler.peer_waiting());
    h.send(
        Header::request(FrontendReq::GET_VRING_BASE.code(), 8, false),
        VhostUserVringState::new(1, 0).as_bytes(),
        &[],
    );
    assert!(matches!(h.handler.run(), Err(Error::ReqHandlerError(_))));
}

#[test]
fn fatal_input_is_reported_as_fatal() {
    // Oversized size: refused before anything is allocated.
    let mut h = Hostile::new();
    let fd = probe_fd("hostile-fatal");
    h.send(Header::request(1, 0x10_0000, false), &[], &[fd.as_fd()]);
    drop(fd);
    let err = h.handler.handle_request().unwrap_err();
    assert!(
        matches!(
            err,
            Error::OversizedMessage {
                size: 0x10_0000,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.is_fatal());
    assert_eq!(probe_count("hostile-fatal"), 0);

    // Truncated body: the peer announced 8 bytes, sent 3 and left.
    let mut h = Hostile::new();
    h.raw
        .socket()
        .write_all(Header::request(2, 8, false).as_bytes())
        .unwrap();
    h.raw.socket().write_all(&[1, 2, 3]).unwrap();
    drop(h.raw);
    let err = h.handler.handle_request().unwrap_err();
    assert!(
        matches!(err, Error::PartialMessage { done: 3, want: 8 }),
        "{err}"
    );

    // A clean close between messages is a disconnect, and run() returns Ok.
    let (raw, be) = Connection::pair().unwrap();
    drop(raw);
    let mut handler = BackendReqHandler::new(be, Recorder::new());
    handler.run().unwrap();
}

/// A raw back-end writing at our FrontendReqHandler.
fn channel_pair(features: VhostUserProtocolFeatures) -> (Connection, FrontendReqHandler<VmmSide>) {
    let (raw, fe) = Connection::pair().unwrap();
    (
        raw,
        FrontendReqHandler::from_connection(fe, VmmSide::default(), features),
    )
}

#[test]
fn back_end_channel_refuses_hostile_requests() {
    let all = VhostUserProtocolFeatures::all();
    let (raw, mut h) = channel_pair(all);
    let tag = "hostile-chan";
    let a = probe_fd(tag);
    let b = probe_fd(tag);
    let send = |hdr: Header, body: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]| {
        let iov = [
            std::io::IoSlice::new(hdr.as_bytes()),
            std::io::IoSlice::new(body),
        ];
        crate::sock::send_with_fds(raw.socket(), &iov, fds).unwrap();
    };
    let map = VhostUserMMap::new(0, 0, 0, 0x1000, VhostUserMMapFlags::empty());
    let code = BackendReq::SHMEM_MAP.code();

    // SHMEM_MAP without its fd, with NEED_REPLY: refused, and the back-end gets -EINVAL.
    send(Header::request(code, 40, true), map.as_bytes(), &[]);
    let err = h.handle_request().unwrap_err();
    assert!(matches!(err, Error::IncorrectFds { got: 0, .. }), "{err}");
    let m = raw.recv().unwrap();
    assert_eq!(m.body, ((-libc::EINVAL) as i64 as u64).to_ne_bytes());
    // With two fds.
    send(
        Header::request(code, 40, false),
        map.as_bytes(),
        &[a.as_fd(), b.as_fd()],
    );
    assert!(matches!(
        h.handle_request(),
        Err(Error::IncorrectFds { got: 2, .. })
    ));
    // Wrong body size.
    send(Header::request(code, 8, false), &[0; 8], &[a.as_fd()]);
    assert!(matches!(
        h.handle_request(),
        Err(Error::InvalidMessage(ProtocolError::Size { .. }))
    ));
    // crosvm's GPU_MAP code: only known with the `crosvm` feature.
    send(Header::request(1006, 64, false), &[0; 64], &[a.as_fd()]);
    let r = h.handle_request();
    if cfg!(feature = "crosvm") {
        // Known, but a zero length is refused by validation; crosvm replies always.
        assert!(
            matches!(r, Err(Error::InvalidMessage(ProtocolError::Zero(_)))),
            "{r:?}"
        );
        let m = raw.recv().unwrap();
        assert_eq!(m.header.request, 1006);
    } else {
        assert!(
            matches!(
                r,
                Err(Error::InvalidMessage(ProtocolError::Unknown {
                    value: 1006,
                    ..
                }))
            ),
            "{r:?}"
        );
    }
    // A request whose feature was not negotiated.
    let (raw2, mut h2) = channel_pair(VhostUserProtocolFeatures::BACKEND_REQ);
    raw2.send(
        &Header::request(BackendReq::CONFIG_CHANGE_MSG.code(), 0, false),
        &[],
        &[],
        &[],
    )
    .unwrap();
    assert!(matches!(
        h2.handle_request(),
        Err(Error::FeatureMismatch {
            request: "CONFIG_CHANGE_MSG",
            ..
        })
    ));
    // Still in step: a valid SHMEM_MAP goes through and is acked.
    send(
        Header::request(code, 40, true),
        map.as_bytes(),
        &[a.as_fd()],
    );
    h.handle_request().unwrap();
    assert_eq!(raw.recv().unwrap().body, 0u64.to_ne_bytes());
    drop((a, b));
    assert_eq!(probe_count(tag), 0);
}

#[test]
fn backend_sender_checks_features_locally() {
    let (ours, theirs) = Connection::pair().unwrap();
    let backend = BackendReqSender::new(ours, VhostUserProtocolFeatures::BACKEND_REQ);
    assert!(matches!(
        backend.config_change(),
        Err(Error::FeatureMismatch { request: "CONFIG_CHANGE_MSG", feature }) if feature == VhostUserProtocolFeatures::CONFIG
    ));
    let fd = probe_fd("sender-gate");
    let map = VhostUserMMap::new(0, 0, 0, 0x1000, VhostUserMMapFlags::empty());
    assert!(matches!(
        backend.shmem_map(&map, fd.as_fd()),
        Err(Error::FeatureMismatch { feature, .. }) if feature == VhostUserProtocolFeatures::SHMEM
    ));
    backend.set_protocol_features(
        VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::SHMEM
            | VhostUserProtocolFeatures::HOST_NOTIFIER,
    );
    // SHMEM_MAP always carries its fd: SHMEM is enough (no REPLY_ACK: no reply awaited).
    backend.shmem_map(&map, fd.as_fd()).unwrap();
    // An optional fd needs BACKEND_SEND_FD.
    assert!(matches!(
        backend.vring_host_notifier(0, 0x1000, 0, Some(fd.as_fd())),
        Err(Error::FeatureMismatch { feature, .. }) if feature == VhostUserProtocolFeatures::BACKEND_SEND_FD
    ));
    backend.vring_host_notifier(0, 0, 0, None).unwrap();
    // What went out: the map with its fd, then the notifier without.
    let m = theirs.recv().unwrap();
    assert_eq!(
        (m.header.request, m.fds.len()),
        (BackendReq::SHMEM_MAP.code(), 1)
    );
    let m = theirs.recv().unwrap();
    assert_eq!(
        (m.header.request, m.fds.len()),
        (BackendReq::VRING_HOST_NOTIFIER_MSG.code(), 0)
    );
}

#[test]
fn listener_accepts_front_ends_and_cleans_up() {
    let path = std::env::temp_dir().join(format!("outboard-transport-{}.sock", std::process::id()));
    // A stale file at the path is replaced.
    std::fs::write(&path, b"stale").unwrap();
    let listener = backend::Listener::bind(&path, true).unwrap();
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().unwrap().is_none());
    let client = thread::spawn({
        let path = path.clone();
        move || {
            let mut fe = Frontend::connect(&path).unwrap();
            fe.get_features().unwrap()
        }
    });
    let conn = loop {
        if let Some(c) = listener.accept().unwrap() {
            break c;
        }
        thread::sleep(std::time::Duration::from_millis(1));
    };
    let mut h = BackendReqHandler::new(conn, Recorder::new());
    h.run().unwrap();
    assert_eq!(client.join().unwrap(), FEATURES);
    assert_eq!(listener.path(), path.as_path());
    drop(listener);
    assert!(!path.exists());
    assert!(matches!(
        Frontend::connect(&path),
        Err(Error::SocketConnect(_))
    ));
}

#[test]
fn renegotiating_protocol_features_keeps_acks_in_step() {
    let (fe_conn, be_conn) = Connection::pair().unwrap();
    // A missing ack would block forever; make it a timeout error instead.
    fe_conn
        .socket()
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let server = thread::spawn(move || {
        let mut h = BackendReqHandler::new(be_conn, Recorder::new());
        h.run().unwrap();
        h.protocol_features()
    });
    let mut fe = Frontend::new(fe_conn);
    fe.get_features().unwrap();
    fe.set_owner().unwrap();
    fe.set_protocol_features(VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::MQ)
        .unwrap();
    // Sent with NEED_REPLY (REPLY_ACK is negotiated), and it turns REPLY_ACK off: the
    // back-end still acks, by the state before the request.
    fe.set_protocol_features(VhostUserProtocolFeatures::MQ)
        .unwrap();
    assert_eq!(fe.get_queue_num().unwrap(), 2);
    fe.set_vring_num(0, 64).unwrap();
    drop(fe);
    assert_eq!(server.join().unwrap(), VhostUserProtocolFeatures::MQ);
}

/// A small deterministic generator (xorshift64*), so that a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Drains whatever the handler replied, so that its sends never block.
fn drain(raw: &Connection) {
    let mut buf = [0u8; 8192];
    while let Ok(r) = crate::sock::recv_with_fds_flags(
        raw.socket().as_fd(),
        &mut [std::io::IoSliceMut::new(&mut buf)],
        8,
        rustix::net::RecvFlags::DONTWAIT,
    ) {
        drop(r.fds);
    }
}

#[test]
fn random_messages_never_panic_or_leak() {
    let tag = "fuzz";
    let fds: Vec<OwnedFd> = (0..4).map(|_| probe_fd(tag)).collect();
    let mut rng = Rng(0x5eed_0bad_cafe_f00d);
    let all = VhostUserProtocolFeatures::all().bits().to_ne_bytes();
    let fresh = || {
        let (raw, be) = Connection::pair().unwrap();
        let mut h = BackendReqHandler::new(be, Recorder::new());
        // Half the sessions are negotiated, so that gated requests get parsed too.
        for (req, body) in [
            (FrontendReq::SET_OWNER, &[][..]),
            (FrontendReq::GET_FEATURES, &[][..]),
            (FrontendReq::SET_PROTOCOL_FEATURES, &all[..]),
        ] {
            raw.send(
                &Header::request(req.code(), body.len() as u32, false),
                body,
                &[],
                &[],
            )
            .unwrap();
            h.handle_request().unwrap();
        }
        drain(&raw);
        (raw, h)
    };
    let (mut raw, mut h) = fresh();
    let (mut ok, mut refused, mut fatal) = (0, 0, 0);
    for _ in 0..3000 {
        // Mostly known codes, sometimes garbage; sizes around the real ones.
        let code = match rng.below(10) {
            0 => rng.next() as u32,
            1 => 45 + rng.below(5) as u32,
            _ => 1 + rng.below(44) as u32,
        };
        let rules = FrontendReq::from_code(code).map(|r| r.rules());
        let size = match rng.below(8) {
            0 => rng.below(5000) as usize,
            1 => [0, 8, 12, 16, 24, 40, 72, 264, 268][rng.below(9) as usize],
            2..=4 => match rules {
                Ok(r) => match r.body {
                    BodySize::MemTable => 8 + 32 * (1 + rng.below(8) as usize),
                    BodySize::Config => 12 + 1 + rng.below(16) as usize,
                    other => other.nominal().min(64),
                },
                Err(_) => 0,
            },
            _ => rng.below(300) as usize,
        };
        let flags = match rng.below(6) {
            0 => rng.next() as u32,
            1 => 0x1 | 0x8,
            _ => 0x1,
        };
        let mut body = vec![0u8; size.min(MAX_MSG_SIZE + 16)];
        for b in body.iter_mut() {
            // Small values make plausible indexes, sizes and flags.
            *b = if rng.below(4) == 0 {
                rng.next() as u8
            } else {
                rng.below(3) as u8
            };
        }
        let nfds = match (rng.below(2), rules.map(|r| r.fds)) {
            (0, Ok(FdCount::None)) => 0,
            (0, Ok(FdCount::One)) => 1,
            _ => rng.below(4) as usize,
        };
        let borrowed: Vec<_> = fds[..nfds].iter().map(|f| f.as_fd()).collect();
        let header = Header {
            request: code,
            flags,
            size: size as u32,
        };
        let iov = [
            std::io::IoSlice::new(header.as_bytes()),
            std::io::IoSlice::new(&body),
        ];
        let sent = crate::sock::send_with_fds(raw.socket(), &iov, &borrowed);
        match sent.and_then(|_| h.handle_request()) {
            Ok(()) => ok += 1,
            Err(e) if e.is_fatal() || h.peer_waiting() => {
                fatal += 1;
                (raw, h) = fresh();
            }
            Err(_) => refused += 1,
        }
        drain(&raw);
    }
    drop((raw, h));
    // Every outcome was exercised: handled, refused in step, and fatal.
    assert!(
        ok > 100 && refused > 500 && fatal > 10,
        "{ok} {refused} {fatal}"
    );
    assert_eq!(probe_count(tag), 4, "the handler leaked or kept an fd");
}

#[test]
fn random_back_end_requests_never_panic_or_leak() {
    let tag = "fuzz-chan";
    let fds: Vec<OwnedFd> = (0..3).map(|_| probe_fd(tag)).collect();
    let mut rng = Rng(0xfeed_face_dead_beef);
    let fresh = || {
        let (raw, fe) = Connection::pair().unwrap();
        let h = FrontendReqHandler::from_connection(
            fe,
            VmmSide::default(),
            VhostUserProtocolFeatures::all(),
        );
        (raw, h)
    };
    let (mut raw, mut h) = fresh();
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..2000 {
        let code = match rng.below(8) {
            0 => rng.next() as u32,
            1 => 1006 + rng.below(2) as u32,
            _ => 1 + rng.below(10) as u32,
        };
        let size = match rng.below(3) {
            0 => rng.below(100) as usize,
            _ => [0, 8, 16, 24, 32, 40, 64][rng.below(7) as usize],
        };
        let flags = if rng.below(5) == 0 {
            rng.next() as u32
        } else {
            0x1 | 0x8
        };
        let mut body = vec![0u8; size];
        for b in body.iter_mut() {
            *b = if rng.below(4) == 0 {
                rng.next() as u8
            } else {
                rng.below(2) as u8
            };
        }
        let nfds = rng.below(3) as usize;
        let borrowed: Vec<_> = fds[..nfds].iter().map(|f| f.as_fd()).collect();
        let header = Header {
            request: code,
            flags,
            size: size as u32,
        };
        let iov = [
            std::io::IoSlice::new(header.as_bytes()),
            std::io::IoSlice::new(&body),
        ];
        crate::sock::send_with_fds(raw.socket(), &iov, &borrowed).unwrap();
        match h.handle_request() {
            Ok(()) => ok += 1,
            Err(e) if e.is_fatal() => (raw, h) = fresh(),
            Err(_) => refused += 1,
        }
        drain(&raw);
    }
    drop((raw, h));
    // Both outcomes were exercised (most random bodies fail validation).
    assert!(ok > 5 && refused > 500, "{ok} {refused}");
    // The dma-bufs the lookups returned went to the peer and were drained.
    assert_eq!(probe_count(tag), 3, "the handler leaked or kept an fd");
    assert_eq!(probe_count("session-dmabuf"), 0);
}
