//! Interop with code nobody here wrote: rust-vmm's `vhost` crate (0.18).
//!
//! - their `Frontend` drives our `BackendReqHandler`, and our `BackendReqSender` talks to
//!   their `FrontendReqHandler` on the back-end request channel;
//! - our `Frontend` drives their `BackendReqHandler`, and their `Backend` sender talks to
//!   our `FrontendReqHandler`.
//!
//! Both sessions carry fds (memory tables, inflight areas, vring eventfds, the log, the
//! channel socket, device state, shared memory maps).
//!
//! Spec divergences of rust-vmm found here (each is asserted below, so a fix on their
//! side shows up as a test failure to revisit):
//! - `VhostUserConfigFlags` are bits `WRITABLE = 0x1`, `LIVE_MIGRATION = 0x2`; the spec
//!   defines *values* 0 (front-end write) and 1 (migration). Their "writable" arrives
//!   here as the spec's "migration", and their `LIVE_MIGRATION` is refused.
//! - `SET_LOG_BASE`: their back-end replies with the `VhostUserLog` body echoed (16
//!   bytes) and their front-end reads exactly 16 bytes; libvhost-user (and our
//!   back-end) reply with a `u64`, and QEMU reads whatever size comes. Our front-end
//!   accepts both; their front-end against a `u64` reply blocks waiting for 8 more
//!   bytes, so that pairing is not exercised.
//! - `SHARED_OBJECT_LOOKUP`: their back-end attaches an fd to the *request* and their
//!   front-end demands one, and the reply carries none; the spec has the front-end
//!   return the dma-buf fd in the reply. Not exercised across implementations.

// Test code: a failed setup step should panic with its error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;

use outboard_protocol::vhost_user as ob;
use outboard_transport as ours;
use vhost::vhost_user as rv;
use vhost::vhost_user::message as rvm;
use vhost::vhost_user::{VhostUserFrontend, VhostUserFrontendReqHandlerMut};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

const FEATURES: u64 = (1 << 32) | (1 << 30) | 0x3;

fn memfd(size: u64, marker: &[u8]) -> OwnedFd {
    let fd = rustix::fs::memfd_create("interop", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, size).unwrap();
    rustix::io::pwrite(&fd, marker, 0).unwrap();
    fd
}

fn marker(fd: impl AsFd) -> Vec<u8> {
    let mut buf = [0u8; 4];
    rustix::io::pread(fd, &mut buf, 0).unwrap();
    buf.to_vec()
}

/// Our back-end, for their front-end.
struct OurDevice {
    log: Vec<String>,
    config: Vec<u8>,
    channel: mpsc::Sender<ours::BackendReqSender>,
}

impl ours::VhostUserBackendReqHandler for OurDevice {
    fn max_queues(&self) -> u32 {
        2
    }
    fn set_owner(&mut self) -> ours::HandlerResult<()> {
        self.log.push("set_owner".into());
        Ok(())
    }
    fn get_features(&mut self) -> ours::HandlerResult<u64> {
        Ok(FEATURES)
    }
    fn set_features(&mut self, f: u64) -> ours::HandlerResult<()> {
        self.log.push(format!("set_features {f:#x}"));
        Ok(())
    }
    fn get_protocol_features(&mut self) -> ours::HandlerResult<ob::VhostUserProtocolFeatures> {
        Ok(ob::VhostUserProtocolFeatures::all())
    }
    fn set_mem_table(&mut self, regions: Vec<ours::MemoryRegion>) -> ours::HandlerResult<()> {
        let m: Vec<String> = regions
            .iter()
            .map(|r| format!("{:#x}:{:?}", r.region.guest_phys_addr, marker(&r.fd)))
            .collect();
        self.log.push(format!("set_mem_table {}", m.join(",")));
        Ok(())
    }
    fn set_vring_num(&mut self, i: u32, n: u32) -> ours::HandlerResult<()> {
        self.log.push(format!("set_vring_num {i} {n}"));
        Ok(())
    }
    fn set_vring_addr(&mut self, a: &ob::VhostUserVringAddr) -> ours::HandlerResult<()> {
        self.log.push(format!(
            "set_vring_addr {} {:#x} {:#x} {:#x}",
            a.index, a.descriptor, a.used, a.available
        ));
        Ok(())
    }
    fn set_vring_base(&mut self, i: u32, b: u32) -> ours::HandlerResult<()> {
        self.log.push(format!("set_vring_base {i} {b}"));
        Ok(())
    }
    fn get_vring_base(&mut self, _i: u32) -> ours::HandlerResult<u32> {
        Ok(7)
    }
    fn set_vring_kick(&mut self, i: u32, fd: Option<OwnedFd>) -> ours::HandlerResult<()> {
        self.log.push(format!("kick {i} {}", fd.is_some()));
        Ok(())
    }
    fn set_vring_call(&mut self, i: u32, fd: Option<OwnedFd>) -> ours::HandlerResult<()> {
        self.log.push(format!("call {i} {}", fd.is_some()));
        Ok(())
    }
    fn set_vring_err(&mut self, i: u32, fd: Option<OwnedFd>) -> ours::HandlerResult<()> {
        self.log.push(format!("err {i} {}", fd.is_some()));
        Ok(())
    }
    fn set_vring_enable(&mut self, i: u32, e: bool) -> ours::HandlerResult<()> {
        self.log.push(format!("set_vring_enable {i} {e}"));
        Ok(())
    }
    fn get_config(&mut self, offset: u32, size: u32, flags: u32) -> ours::HandlerResult<Vec<u8>> {
        self.log.push(format!("get_config {offset} {size} {flags}"));
        Ok(self.config[offset as usize..(offset + size) as usize].to_vec())
    }
    fn set_config(&mut self, offset: u32, data: &[u8], flags: u32) -> ours::HandlerResult<()> {
        self.log
            .push(format!("set_config {offset} {} {flags}", data.len()));
        self.config[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn set_backend_req_fd(&mut self, backend: ours::BackendReqSender) -> ours::HandlerResult<()> {
        self.log.push("set_backend_req_fd".into());
        self.channel.send(backend).unwrap();
        Ok(())
    }
    fn get_max_mem_slots(&mut self) -> ours::HandlerResult<u64> {
        Ok(16)
    }
    fn add_mem_region(&mut self, r: ours::MemoryRegion) -> ours::HandlerResult<()> {
        self.log.push(format!(
            "add_mem_region {:#x} {:?}",
            r.region.guest_phys_addr,
            marker(&r.fd)
        ));
        Ok(())
    }
    fn remove_mem_region(&mut self, r: &ob::VhostUserMemoryRegion) -> ours::HandlerResult<()> {
        self.log
            .push(format!("remove_mem_region {:#x}", { r.guest_phys_addr }));
        Ok(())
    }
    fn get_inflight_fd(
        &mut self,
        i: &ob::VhostUserInflight,
    ) -> ours::HandlerResult<(ob::VhostUserInflight, OwnedFd)> {
        self.log
            .push(format!("get_inflight_fd {} {}", i.num_queues, i.queue_size));
        Ok((
            ob::VhostUserInflight {
                mmap_size: 0x2000,
                ..*i
            },
            memfd(0x2000, b"INFL"),
        ))
    }
    fn set_inflight_fd(
        &mut self,
        i: &ob::VhostUserInflight,
        fd: OwnedFd,
    ) -> ours::HandlerResult<()> {
        self.log.push(format!(
            "set_inflight_fd {:#x} {:?}",
            i.mmap_size,
            marker(&fd)
        ));
        Ok(())
    }
    fn get_shmem_config(&mut self) -> ours::HandlerResult<ob::VhostUserShmemConfig> {
        Ok(ob::VhostUserShmemConfig::new(&[0x4000, 0x8000]))
    }
    fn set_device_state_fd(
        &mut self,
        d: ob::TransferDirection,
        _p: ob::TransferPhase,
        _fd: OwnedFd,
    ) -> ours::HandlerResult<Option<OwnedFd>> {
        self.log.push(format!("set_device_state_fd {d:?}"));
        Ok(None)
    }
    fn check_device_state(&mut self) -> ours::HandlerResult<()> {
        self.log.push("check_device_state".into());
        Ok(())
    }
    fn reset_device(&mut self) -> ours::HandlerResult<()> {
        self.log.push("reset_device".into());
        Ok(())
    }
}

/// Their front-end's handler for the back-end request channel.
#[derive(Default)]
struct TheirVmm {
    log: Vec<String>,
}

impl VhostUserFrontendReqHandlerMut for TheirVmm {
    fn handle_config_change(&mut self) -> rv::HandlerResult<u64> {
        self.log.push("config_change".into());
        Ok(0)
    }
    fn shmem_map(
        &mut self,
        req: &rvm::VhostUserMMap,
        fd: &dyn std::os::fd::AsRawFd,
    ) -> rv::HandlerResult<u64> {
        // SAFETY: `fd` is a live descriptor owned by the caller for this call.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd.as_raw_fd()) };
        self.log.push(format!(
            "shmem_map {} {:#x} {:?}",
            { req.shmid },
            { req.len },
            marker(fd)
        ));
        Ok(0)
    }
    fn shmem_unmap(&mut self, req: &rvm::VhostUserMMap) -> rv::HandlerResult<u64> {
        self.log
            .push(format!("shmem_unmap {:#x}", { req.shm_offset }));
        Ok(0)
    }
}

#[test]
fn their_frontend_drives_our_backend() {
    let (a, b) = UnixStream::pair().unwrap();
    let (tx, rx) = mpsc::channel();
    let device = OurDevice {
        log: Vec::new(),
        config: vec![0; 256],
        channel: tx,
    };
    let server = thread::spawn(move || {
        let mut h = ours::BackendReqHandler::new(ours::Connection::new(b), device);
        // Their LIVE_MIGRATION config write is refused (see the module docs); run()
        // answers it with a failure status and goes on.
        h.run().unwrap();
        h.into_backend().log
    });

    let mut fe = rv::Frontend::from_stream(a, 2);
    fe.set_owner().unwrap();
    assert_eq!(fe.get_features().unwrap(), FEATURES);
    let pf = fe.get_protocol_features().unwrap();
    assert_eq!(pf.bits(), ob::VhostUserProtocolFeatures::all().bits());
    // Every request from here on asks for a REPLY_ACK status, SET_PROTOCOL_FEATURES
    // included: rust-vmm waits for that ack by the newly negotiated state.
    fe.set_hdr_flags(rvm::VhostUserHeaderFlag::NEED_REPLY);
    fe.set_protocol_features(pf).unwrap();
    fe.set_features(FEATURES & !1).unwrap();
    assert_eq!(fe.get_queue_num().unwrap(), 2);
    assert_eq!(fe.get_max_mem_slots().unwrap(), 16);

    let (inflight, file) = fe
        .get_inflight_fd(&rvm::VhostUserInflight {
            num_queues: 2,
            queue_size: 128,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(inflight.mmap_size, 0x2000);
    assert_eq!(marker(&file), b"INFL");
    fe.set_inflight_fd(&inflight, file.as_raw_fd()).unwrap();

    let m0 = memfd(0x10000, b"RV-0");
    let m1 = memfd(0x10000, b"RV-1");
    let regions = [
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: 0x10000,
            userspace_addr: 0x7000_0000,
            mmap_offset: 0,
            mmap_handle: m0.as_raw_fd(),
        },
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0x10000,
            memory_size: 0x10000,
            userspace_addr: 0x7001_0000,
            mmap_offset: 0,
            mmap_handle: m1.as_raw_fd(),
        },
    ];
    fe.set_mem_table(&regions).unwrap();

    // Their WRITABLE (0x1) is the spec's value 1 (migration); their LIVE_MIGRATION
    // (0x2) is not a value the spec defines, and is refused.
    fe.set_config(0x8, rvm::VhostUserConfigFlags::WRITABLE, &[1, 2, 3, 4])
        .unwrap();
    assert!(fe
        .set_config(0x8, rvm::VhostUserConfigFlags::LIVE_MIGRATION, &[9])
        .is_err());
    let (_, payload) = fe
        .get_config(0x8, 4, rvm::VhostUserConfigFlags::empty(), &[0; 4])
        .unwrap();
    assert_eq!(payload, [1, 2, 3, 4]);

    // The back-end request channel: their handler, our sender.
    let vmm = Arc::new(Mutex::new(TheirVmm::default()));
    let mut channel = rv::FrontendReqHandler::new(vmm.clone()).unwrap();
    channel.set_reply_ack_flag(true);
    // SAFETY: the handler keeps its tx socket open while it lives; we only borrow it.
    let tx_fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(channel.get_tx_raw_fd()) };
    fe.set_backend_request_fd(&tx_fd).unwrap();
    let backend = rx.recv().unwrap();
    let chan = thread::spawn(move || {
        // config change, map, unmap
        for _ in 0..3 {
            channel.handle_request().unwrap();
        }
    });
    backend.config_change().unwrap();
    let shm = memfd(0x1000, b"SHM1");
    let map = ob::VhostUserMMap::new(2, 0, 0x3000, 0x1000, ob::VhostUserMMapFlags::RW);
    backend.shmem_map(&map, shm.as_fd()).unwrap();
    backend.shmem_unmap(&map).unwrap();
    chan.join().unwrap();
    assert_eq!(
        vmm.lock().unwrap().log,
        [
            "config_change",
            "shmem_map 2 0x1000 [83, 72, 77, 49]",
            "shmem_unmap 0x3000"
        ]
    );

    fe.set_vring_enable(0, true).unwrap();
    fe.set_vring_num(0, 128).unwrap();
    fe.set_vring_base(0, 3).unwrap();
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: 256,
            queue_size: 128,
            flags: 0,
            desc_table_addr: 0x1000,
            used_ring_addr: 0x2000,
            avail_ring_addr: 0x3000,
            log_addr: None,
        },
    )
    .unwrap();
    let ev = EventFd::new(0).unwrap();
    fe.set_vring_call(0, &ev).unwrap();
    fe.set_vring_kick(0, &ev).unwrap();
    fe.set_vring_err(0, &ev).unwrap();

    let m2 = memfd(0x10000, b"RV-2");
    let extra = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0x20000,
        memory_size: 0x10000,
        userspace_addr: 0x7002_0000,
        mmap_offset: 0,
        mmap_handle: m2.as_raw_fd(),
    };
    fe.add_mem_region(&extra).unwrap();
    fe.remove_mem_region(&extra).unwrap();

    let shmem = fe.get_shmem_config().unwrap();
    assert_eq!(shmem.nregions, 2);
    assert_eq!(shmem.memory_sizes[1], 0x8000);

    let state = memfd(0, b"");
    let got = fe
        .set_device_state_fd(
            rvm::VhostTransferStateDirection::SAVE,
            rvm::VhostTransferStatePhase::STOPPED,
            state,
        )
        .unwrap();
    assert!(got.is_none());
    fe.check_device_state().unwrap();

    assert_eq!(fe.get_vring_base(0).unwrap(), 7);
    fe.reset_device().unwrap();
    drop(backend);
    drop(fe);

    let log = server.join().unwrap();
    assert_eq!(
        log,
        [
            "set_owner",
            "set_features 0x140000002",
            "get_inflight_fd 2 128",
            "set_inflight_fd 0x2000 [73, 78, 70, 76]",
            "set_mem_table 0x0:[82, 86, 45, 48],0x10000:[82, 86, 45, 49]",
            "set_config 8 4 1",
            "get_config 8 4 0",
            "set_backend_req_fd",
            "set_vring_enable 0 true",
            "set_vring_num 0 128",
            "set_vring_base 0 3",
            "set_vring_addr 0 0x1000 0x2000 0x3000",
            "call 0 true",
            "kick 0 true",
            "err 0 true",
            "add_mem_region 0x20000 [82, 86, 45, 50]",
            "remove_mem_region 0x20000",
            "set_device_state_fd Save",
            "check_device_state",
            "reset_device",
        ]
    );
}

/// Their back-end, for our front-end.
struct TheirDevice {
    log: Vec<String>,
    config: [u8; 64],
}

impl rv::VhostUserBackendReqHandlerMut for TheirDevice {
    fn set_owner(&mut self) -> rv::Result<()> {
        self.log.push("set_owner".into());
        Ok(())
    }
    fn reset_owner(&mut self) -> rv::Result<()> {
        Ok(())
    }
    fn reset_device(&mut self) -> rv::Result<()> {
        self.log.push("reset_device".into());
        Ok(())
    }
    fn get_features(&mut self) -> rv::Result<u64> {
        Ok(FEATURES)
    }
    fn set_features(&mut self, f: u64) -> rv::Result<()> {
        self.log.push(format!("set_features {f:#x}"));
        Ok(())
    }
    fn set_mem_table(
        &mut self,
        ctx: &[rvm::VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> rv::Result<Option<Vec<u64>>> {
        let m: Vec<String> = ctx
            .iter()
            .zip(&files)
            .map(|(r, f)| format!("{:#x}:{:?}", { r.guest_phys_addr }, marker(f)))
            .collect();
        self.log.push(format!("set_mem_table {}", m.join(",")));
        Ok(None)
    }
    fn set_vring_num(&mut self, i: u32, n: u32) -> rv::Result<()> {
        self.log.push(format!("set_vring_num {i} {n}"));
        Ok(())
    }
    fn set_vring_addr(
        &mut self,
        i: u32,
        _flags: rvm::VhostUserVringAddrFlags,
        d: u64,
        u: u64,
        a: u64,
        _log: u64,
    ) -> rv::Result<()> {
        self.log
            .push(format!("set_vring_addr {i} {d:#x} {u:#x} {a:#x}"));
        Ok(())
    }
    fn set_vring_base(&mut self, i: u32, b: u32) -> rv::Result<()> {
        self.log.push(format!("set_vring_base {i} {b}"));
        Ok(())
    }
    fn get_vring_base(&mut self, i: u32) -> rv::Result<rvm::VhostUserVringState> {
        Ok(rvm::VhostUserVringState::new(i, 9))
    }
    fn set_vring_kick(&mut self, i: u8, fd: Option<File>) -> rv::Result<()> {
        self.log.push(format!("kick {i} {}", fd.is_some()));
        Ok(())
    }
    fn set_vring_call(&mut self, i: u8, fd: Option<File>) -> rv::Result<()> {
        self.log.push(format!("call {i} {}", fd.is_some()));
        Ok(())
    }
    fn set_vring_err(&mut self, i: u8, fd: Option<File>) -> rv::Result<()> {
        self.log.push(format!("err {i} {}", fd.is_some()));
        Ok(())
    }
    fn get_protocol_features(&mut self) -> rv::Result<rvm::VhostUserProtocolFeatures> {
        Ok(rvm::VhostUserProtocolFeatures::all())
    }
    fn set_protocol_features(&mut self, f: u64) -> rv::Result<()> {
        self.log.push(format!("set_protocol_features {f:#x}"));
        Ok(())
    }
    fn get_queue_num(&mut self) -> rv::Result<u64> {
        Ok(2)
    }
    fn set_vring_enable(&mut self, i: u32, e: bool) -> rv::Result<()> {
        self.log.push(format!("set_vring_enable {i} {e}"));
        Ok(())
    }
    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: rvm::VhostUserConfigFlags,
    ) -> rv::Result<Vec<u8>> {
        Ok(self.config[offset as usize..(offset + size) as usize].to_vec())
    }
    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        flags: rvm::VhostUserConfigFlags,
    ) -> rv::Result<()> {
        self.log.push(format!(
            "set_config {offset} {} {:#x}",
            buf.len(),
            flags.bits()
        ));
        self.config[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn set_backend_req_fd(&mut self, backend: rv::Backend) {
        self.log.push("set_backend_req_fd".into());
        backend.set_reply_ack_flag(true);
        backend.set_shmem_flag(true);
        let shm = memfd(0x1000, b"SHM2");
        let map = rvm::VhostUserMMap {
            shmid: 1,
            padding: [0; 7],
            fd_offset: 0,
            shm_offset: 0x5000,
            len: 0x1000,
            flags: 0,
        };
        // Talk to our front-end's handler right away, from another thread: this
        // thread is inside their handle_request.
        thread::spawn(move || {
            use vhost::vhost_user::VhostUserFrontendReqHandler;
            backend.shmem_map(&map, &shm).unwrap();
            backend.shmem_unmap(&map).unwrap();
        });
    }
    fn set_gpu_socket(&mut self, _gpu: rv::GpuBackend) -> rv::Result<()> {
        Err(rv::Error::InvalidOperation("no gpu"))
    }
    fn get_shared_object(&mut self, _uuid: rvm::VhostUserSharedMsg) -> rv::Result<File> {
        Err(rv::Error::InvalidOperation("no shared objects"))
    }
    fn get_inflight_fd(
        &mut self,
        i: &rvm::VhostUserInflight,
    ) -> rv::Result<(rvm::VhostUserInflight, File)> {
        self.log
            .push(format!("get_inflight_fd {} {}", i.num_queues, i.queue_size));
        let reply = rvm::VhostUserInflight {
            mmap_size: 0x3000,
            mmap_offset: 0,
            num_queues: i.num_queues,
            queue_size: i.queue_size,
        };
        Ok((reply, File::from(memfd(0x3000, b"RVIF"))))
    }
    fn set_inflight_fd(&mut self, i: &rvm::VhostUserInflight, file: File) -> rv::Result<()> {
        self.log.push(format!(
            "set_inflight_fd {:#x} {:?}",
            i.mmap_size,
            marker(&file)
        ));
        Ok(())
    }
    fn get_max_mem_slots(&mut self) -> rv::Result<u64> {
        Ok(8)
    }
    fn add_mem_region(
        &mut self,
        r: &rvm::VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy: Option<bool>,
    ) -> rv::Result<Option<u64>> {
        self.log.push(format!(
            "add_mem_region {:#x} {:?}",
            { r.guest_phys_addr },
            marker(&fd)
        ));
        Ok(None)
    }
    fn remove_mem_region(&mut self, r: &rvm::VhostUserSingleMemoryRegion) -> rv::Result<()> {
        self.log
            .push(format!("remove_mem_region {:#x}", { r.guest_phys_addr }));
        Ok(())
    }
    fn set_device_state_fd(
        &mut self,
        d: rvm::VhostTransferStateDirection,
        _p: rvm::VhostTransferStatePhase,
        _fd: File,
    ) -> rv::Result<Option<File>> {
        self.log.push(format!("set_device_state_fd {}", d as u32));
        Ok(Some(File::from(memfd(0, b""))))
    }
    fn check_device_state(&mut self) -> rv::Result<()> {
        self.log.push("check_device_state".into());
        Ok(())
    }
    fn get_shmem_config(&mut self) -> rv::Result<rvm::VhostUserShMemConfig> {
        Ok(rvm::VhostUserShMemConfig::new(1, &[0x10_0000]))
    }
    fn set_log_base(&mut self, log: &rvm::VhostUserLog, file: File) -> rv::Result<()> {
        self.log.push(format!(
            "set_log_base {:#x} {:?}",
            log.mmap_size,
            marker(&file)
        ));
        Ok(())
    }
}

/// Our front-end's handler for their back-end's requests.
#[derive(Clone, Default)]
struct OurVmm {
    log: Arc<Mutex<Vec<String>>>,
}

impl ours::VhostUserFrontendReqHandler for OurVmm {
    fn shmem_map(&mut self, map: &ob::VhostUserMMap, fd: OwnedFd) -> ours::HandlerResult<()> {
        self.log.lock().unwrap().push(format!(
            "shmem_map {} {:#x} {:?}",
            map.shmid,
            map.shm_offset,
            marker(&fd)
        ));
        Ok(())
    }
    fn shmem_unmap(&mut self, map: &ob::VhostUserMMap) -> ours::HandlerResult<()> {
        self.log
            .lock()
            .unwrap()
            .push(format!("shmem_unmap {:#x}", map.shm_offset));
        Ok(())
    }
}

#[test]
fn our_frontend_drives_their_backend() {
    let (a, b) = UnixStream::pair().unwrap();
    let device = Arc::new(Mutex::new(TheirDevice {
        log: Vec::new(),
        config: [0; 64],
    }));
    let server_device = device.clone();
    let server = thread::spawn(move || {
        let mut h = rv::BackendReqHandler::from_stream(b, server_device);
        loop {
            match h.handle_request() {
                Ok(()) => {}
                Err(rv::Error::Disconnected) | Err(rv::Error::PartialMessage) => return,
                Err(e) => panic!("their back-end refused a request: {e:?}"),
            }
        }
    });

    let mut fe = ours::Frontend::new(ours::Connection::new(a));
    assert_eq!(fe.get_features().unwrap(), FEATURES);
    fe.set_owner().unwrap();
    let pf = fe.get_protocol_features().unwrap();
    // Their back-end speaks every protocol feature bit we know, at the same numbers.
    assert_eq!(pf, ob::VhostUserProtocolFeatures::all());
    fe.set_protocol_features(pf).unwrap();
    fe.set_features(FEATURES & !1).unwrap();
    assert_eq!(fe.get_queue_num().unwrap(), 2);
    assert_eq!(fe.get_max_mem_slots().unwrap(), 8);

    let (inflight, fd) = fe
        .get_inflight_fd(&ob::VhostUserInflight {
            num_queues: 2,
            queue_size: 64,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(inflight.mmap_size, 0x3000);
    assert_eq!(marker(&fd), b"RVIF");
    fe.set_inflight_fd(&inflight, fd.as_fd()).unwrap();

    let m0 = memfd(0x10000, b"OB-0");
    let m1 = memfd(0x10000, b"OB-1");
    fe.set_mem_table(&[
        ours::MemoryRegionRef {
            region: ob::VhostUserMemoryRegion::new(0, 0x10000, 0x7000_0000, 0),
            fd: m0.as_fd(),
        },
        ours::MemoryRegionRef {
            region: ob::VhostUserMemoryRegion::new(0x10000, 0x10000, 0x7001_0000, 0),
            fd: m1.as_fd(),
        },
    ])
    .unwrap();

    // Our "front-end write" (value 0) arrives as their empty flags; "migration"
    // (value 1) arrives as their WRITABLE bit.
    fe.set_config(0x4, &[5, 6], ob::VhostUserConfigFlags::Frontend)
        .unwrap();
    fe.set_config(0x6, &[7], ob::VhostUserConfigFlags::Migration)
        .unwrap();
    assert_eq!(
        fe.get_config(0x4, 3, ob::VhostUserConfigFlags::Frontend)
            .unwrap(),
        [5, 6, 7]
    );

    // The back-end request channel: our handler, their sender.
    let vmm = OurVmm::default();
    let mut channel = ours::FrontendReqHandler::new(vmm.clone(), fe.protocol_features()).unwrap();
    let backend_end = channel.take_backend_fd().unwrap();
    fe.set_backend_req_fd(backend_end.as_fd()).unwrap();
    drop(backend_end);
    channel.handle_request().unwrap();
    channel.handle_request().unwrap();
    assert_eq!(
        *vmm.log.lock().unwrap(),
        ["shmem_map 1 0x5000 [83, 72, 77, 50]", "shmem_unmap 0x5000"]
    );

    fe.set_vring_enable(0, true).unwrap();
    fe.set_vring_num(0, 64).unwrap();
    fe.set_vring_base(0, 1).unwrap();
    fe.set_vring_addr(&ob::VhostUserVringAddr {
        index: 0,
        flags: 0,
        descriptor: 0x1000,
        used: 0x2000,
        available: 0x3000,
        log: 0,
    })
    .unwrap();
    let ev = memfd(0, b"");
    fe.set_vring_call(0, Some(ev.as_fd())).unwrap();
    fe.set_vring_kick(0, Some(ev.as_fd())).unwrap();
    fe.set_vring_err(0, Some(ev.as_fd())).unwrap();

    // Their back-end echoes the log body as the reply; we accept that too.
    let log = memfd(0x1000, b"LOG2");
    fe.set_log_base(
        &ob::VhostUserLog {
            mmap_size: 0x1000,
            mmap_offset: 0,
        },
        log.as_fd(),
    )
    .unwrap();

    let m2 = memfd(0x10000, b"OB-2");
    let region = ob::VhostUserMemoryRegion::new(0x20000, 0x10000, 0x7002_0000, 0);
    fe.add_mem_region(&ours::MemoryRegionRef {
        region,
        fd: m2.as_fd(),
    })
    .unwrap();
    fe.remove_mem_region(&region).unwrap();

    let shmem = fe.get_shmem_config().unwrap();
    assert_eq!(shmem.num_regions, 1);
    assert_eq!(shmem.mem_size[0], 0x10_0000);

    let state = memfd(0, b"");
    let back = fe
        .set_device_state_fd(
            ob::TransferDirection::Load,
            ob::TransferPhase::Stopped,
            state.as_fd(),
        )
        .unwrap();
    assert!(back.is_some(), "their back-end returns an fd of its own");
    fe.check_device_state().unwrap();
    assert_eq!(fe.get_vring_base(0).unwrap(), 9);
    fe.reset_device().unwrap();
    drop(fe);
    server.join().unwrap();

    let log = device.lock().unwrap().log.clone();
    assert_eq!(
        log,
        [
            "set_owner",
            &format!(
                "set_protocol_features {:#x}",
                ob::VhostUserProtocolFeatures::all().bits()
            ),
            "set_features 0x140000002",
            "get_inflight_fd 2 64",
            "set_inflight_fd 0x3000 [82, 86, 73, 70]",
            "set_mem_table 0x0:[79, 66, 45, 48],0x10000:[79, 66, 45, 49]",
            "set_config 4 2 0x0",
            "set_config 6 1 0x1",
            "set_backend_req_fd",
            "set_vring_enable 0 true",
            "set_vring_num 0 64",
            "set_vring_base 0 1",
            "set_vring_addr 0 0x1000 0x2000 0x3000",
            "call 0 true",
            "kick 0 true",
            "err 0 true",
            "set_log_base 0x1000 [76, 79, 71, 50]",
            "add_mem_region 0x20000 [79, 66, 45, 50]",
            "remove_mem_region 0x20000",
            "set_device_state_fd 1",
            "check_device_state",
            "reset_device",
        ]
    );
    // The fds we lent stayed ours: their marker reads still work.
    assert_eq!(marker(&m0), b"OB-0");
}
