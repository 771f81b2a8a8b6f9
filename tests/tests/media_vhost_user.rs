//! The software camera over vhost-user: our transport's `Frontend` plays QEMU (memory
//! table from memfds, rings, kick eventfds, the back-end channel answering
//! `SHMEM_MAP`/`SHMEM_UNMAP` by keeping the fds), a simulated driver runs the MMAP
//! capture flow on the rings, and a frame is read through the fd the back-end mapped.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outboard_devices::media::camera::{decode_frame_number, render_frame, Adjust, DEVICE_CAPS};
use outboard_devices::media::v4l2::*;
use outboard_glue::media::serve_camera;
use outboard_protocol::media::{
    CloseCmd, CmdHeader, IoctlCmd, MediaCmd, MmapCmd, MmapResp, MunmapCmd, OpenResp, RespHeader,
    SgEntry, EVENT_DQBUF, MMAP_FLAG_RW,
};
use outboard_protocol::v4l2::V4l2Ioctl;
use outboard_protocol::vhost_user::{
    VhostUserConfigFlags, VhostUserMMap, VhostUserMemoryRegion, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures, VhostUserVringAddr,
};
use outboard_tests::{guest_memory, temp_dir, DriverQueue, Mem};
use outboard_transport::{
    Frontend, FrontendReqHandler, HandlerResult, MemoryRegionRef, VhostUserFrontendReqHandler,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use zerocopy::{FromBytes, IntoBytes};

const T: Duration = Duration::from_secs(10);
const QSIZE: u16 = 64;
const CMD_Q: u64 = 0x1000;
const EVT_Q: u64 = 0x2_0000;
const REQ: u64 = 0x10_0000;
const RESP: u64 = 0x18_0000;
const EVT_BUFS: u64 = 0x20_0000;
const USERPTR_AREA: u64 = 0x40_0000;

/// What the back-end mapped into shared memory region 0: offset -> (fd, fd offset, len).
type ShmMaps = Arc<Mutex<BTreeMap<u64, (File, u64, u64)>>>;

struct Vmm {
    maps: ShmMaps,
    unmaps: Arc<Mutex<Vec<u64>>>,
}

impl VhostUserFrontendReqHandler for Vmm {
    fn shmem_map(&mut self, map: &VhostUserMMap, fd: OwnedFd) -> HandlerResult<()> {
        assert_eq!(map.shmid, 0);
        assert_eq!(map.len % 4096, 0);
        assert_eq!(map.shm_offset % 4096, 0);
        let file = File::from(fd);
        // QEMU refuses a backing fd smaller than the mapping.
        assert!(file.metadata().unwrap().len() >= map.fd_offset + map.len);
        self.maps
            .lock()
            .unwrap()
            .insert(map.shm_offset, (file, map.fd_offset, map.len));
        Ok(())
    }

    fn shmem_unmap(&mut self, map: &VhostUserMMap) -> HandlerResult<()> {
        self.maps.lock().unwrap().remove(&map.shm_offset);
        self.unmaps.lock().unwrap().push(map.shm_offset);
        Ok(())
    }
}

fn borrow(e: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the fd belongs to `e`, which outlives the returned borrow.
    unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) }
}

fn ring_addrs(mem: &Mem, base: u64, index: u32) -> VhostUserVringAddr {
    let avail = base + 16 * u64::from(QSIZE);
    let used = (avail + 6 + 2 * u64::from(QSIZE) + 3) & !3;
    let host = |gpa: u64| mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
    VhostUserVringAddr {
        index,
        flags: 0,
        descriptor: host(base),
        used: host(used),
        available: host(avail),
        log: 0,
    }
}

struct Driver {
    mem: Mem,
    cmdq: DriverQueue,
    evq: DriverQueue,
    kicks: [EventFd; 2],
}

impl Driver {
    fn command(&mut self, req: &[u8], resp_len: u32) -> Vec<u8> {
        self.mem.write_slice(req, GuestAddress(REQ)).unwrap();
        let head = self
            .cmdq
            .add(
                &self.mem,
                &[(REQ, req.len() as u32, false), (RESP, resp_len, true)],
            )
            .unwrap();
        self.kicks[0].write(1).unwrap();
        let start = Instant::now();
        loop {
            if let Some((h, len)) = self.cmdq.pop_used(&self.mem) {
                assert_eq!(h, head);
                let mut out = vec![0u8; len as usize];
                self.mem.read_slice(&mut out, GuestAddress(RESP)).unwrap();
                return out;
            }
            assert!(start.elapsed() < T, "no response from the daemon");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn ioctl<I: IntoBytes + zerocopy::Immutable, O: FromBytes>(
        &mut self,
        session: u32,
        ioctl: V4l2Ioctl,
        arg: &I,
    ) -> O {
        let mut req = CmdHeader::new(MediaCmd::Ioctl).as_bytes().to_vec();
        req.extend_from_slice(
            IoctlCmd {
                session_id: session,
                code: ioctl.nr().into(),
            }
            .as_bytes(),
        );
        req.extend_from_slice(arg.as_bytes());
        let r = self.command(&req, 4096);
        assert_eq!(
            RespHeader::read_from_prefix(&r).unwrap().0.status,
            0,
            "{ioctl}"
        );
        O::read_from_prefix(&r[8..]).unwrap().0
    }

    fn next_event(&mut self) -> Vec<u8> {
        let start = Instant::now();
        loop {
            if let Some((head, len)) = self.evq.pop_used(&self.mem) {
                let addr: u64 = self
                    .mem
                    .read_obj(GuestAddress(EVT_Q + 16 * u64::from(head)))
                    .unwrap();
                let mut buf = vec![0u8; len as usize];
                self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
                self.evq.add(&self.mem, &[(addr, 1024, true)]).unwrap();
                self.kicks[1].write(1).unwrap();
                return buf;
            }
            assert!(start.elapsed() < T, "no event from the daemon");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[test]
fn camera_capture_over_vhost_user() {
    let dir = temp_dir("media-vhost-user");
    let sock = dir.join("media.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let stop = Arc::new(EventFd::new(0).unwrap());
    let worker_stop = stop.clone();
    let worker = std::thread::spawn(move || {
        serve_camera(listener, 64 << 20, &worker_stop, "media-test").unwrap()
    });

    let mut fe = Frontend::connect(&sock).unwrap();
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    assert_ne!(
        features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        0
    );
    fe.set_features(features).unwrap();
    let offered = fe.get_protocol_features().unwrap();
    let wanted = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::BACKEND_SEND_FD
        | VhostUserProtocolFeatures::SHMEM;
    assert!(offered.contains(wanted), "offered {offered:?}");
    fe.set_protocol_features(wanted).unwrap();

    let maps: ShmMaps = Arc::default();
    let unmaps = Arc::new(Mutex::new(Vec::new()));
    let vmm = Vmm {
        maps: maps.clone(),
        unmaps: unmaps.clone(),
    };
    let mut channel = FrontendReqHandler::new(vmm, wanted).unwrap();
    let backend_fd = channel.take_backend_fd().unwrap();
    fe.set_backend_req_fd(backend_fd.as_fd()).unwrap();
    // The back-end holds its end now; ours would keep the channel open.
    drop(backend_fd);
    let channel_thread = std::thread::spawn(move || while channel.handle_request().is_ok() {});

    let shm = fe.get_shmem_config().unwrap();
    assert_eq!(shm.num_regions, 1);
    assert_eq!(shm.mem_size[0], 64 << 20);
    let cfg = fe
        .get_config(0, 40, VhostUserConfigFlags::Frontend)
        .unwrap();
    assert_eq!(&cfg[..4], &DEVICE_CAPS.to_le_bytes());

    // The memory table: both memfd-backed regions, at their file offsets.
    let mem = guest_memory();
    let regions: Vec<(VhostUserMemoryRegion, Arc<File>)> = mem
        .iter()
        .map(|r| {
            let fo = r.file_offset().unwrap();
            let host = mem.get_host_address(r.start_addr()).unwrap() as u64;
            (
                VhostUserMemoryRegion {
                    guest_phys_addr: r.start_addr().0,
                    memory_size: r.len(),
                    user_addr: host,
                    mmap_offset: fo.start(),
                },
                fo.arc().clone(),
            )
        })
        .collect();
    let refs: Vec<MemoryRegionRef<'_>> = regions
        .iter()
        .map(|(region, file)| MemoryRegionRef {
            region: *region,
            fd: file.as_fd(),
        })
        .collect();
    fe.set_mem_table(&refs).unwrap();

    let mut driver = Driver {
        mem: mem.clone(),
        cmdq: DriverQueue::new(CMD_Q, QSIZE),
        evq: DriverQueue::new(EVT_Q, QSIZE),
        kicks: [
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ],
    };
    for i in 0..8 {
        driver
            .evq
            .add(&mem, &[(EVT_BUFS + i * 1024, 1024, true)])
            .unwrap();
    }
    let calls = [
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    ];
    for (i, base) in [(0u32, CMD_Q), (1, EVT_Q)] {
        fe.set_vring_num(i, QSIZE.into()).unwrap();
        fe.set_vring_addr(&ring_addrs(&mem, base, i)).unwrap();
        fe.set_vring_base(i, 0).unwrap();
        let idx = i as u8;
        fe.set_vring_call(idx, Some(borrow(&calls[i as usize])))
            .unwrap();
        // The back-end gets its own copy of the kick eventfd.
        let kick = driver.kicks[i as usize].try_clone().unwrap();
        fe.set_vring_kick(idx, Some(borrow(&kick))).unwrap();
        fe.set_vring_enable(i, true).unwrap();
    }
    driver.kicks[1].write(1).unwrap();

    // The capture flow.
    let r = driver.command(CmdHeader::new(MediaCmd::Open).as_bytes(), 64);
    let s = OpenResp::read_from_bytes(&r).unwrap().session_id;
    let fmt = V4l2Format::from_pix(
        BUF_TYPE_VIDEO_CAPTURE,
        &V4l2PixFormat {
            width: 320,
            height: 240,
            pixelformat: PIX_FMT_RGB24,
            ..Default::default()
        },
    );
    let fmt: V4l2Format = driver.ioctl(s, V4l2Ioctl::VIDIOC_S_FMT, &fmt);
    let pix = fmt.pix();
    assert_eq!((pix.width, pix.sizeimage), (320, 320 * 240 * 3));
    let mut parm = V4l2Streamparm {
        type_: BUF_TYPE_VIDEO_CAPTURE,
        ..Default::default()
    };
    parm.set_capture(&V4l2Captureparm {
        timeperframe: V4l2Fract {
            numerator: 1,
            denominator: 60,
        },
        ..Default::default()
    });
    let _: V4l2Streamparm = driver.ioctl(s, V4l2Ioctl::VIDIOC_S_PARM, &parm);
    let rb = V4l2Requestbuffers {
        count: 2,
        type_: BUF_TYPE_VIDEO_CAPTURE,
        memory: MEMORY_MMAP,
        ..Default::default()
    };
    let rb: V4l2Requestbuffers = driver.ioctl(s, V4l2Ioctl::VIDIOC_REQBUFS, &rb);
    assert_eq!(rb.count, 2);
    let mut shm_addrs = Vec::new();
    for index in 0..2 {
        let q = V4l2Buffer {
            index,
            type_: BUF_TYPE_VIDEO_CAPTURE,
            ..Default::default()
        };
        let b: V4l2Buffer = driver.ioctl(s, V4l2Ioctl::VIDIOC_QUERYBUF, &q);
        let mut req = CmdHeader::new(MediaCmd::Mmap).as_bytes().to_vec();
        req.extend_from_slice(
            MmapCmd {
                session_id: s,
                flags: MMAP_FLAG_RW,
                offset: b.mem_offset(),
            }
            .as_bytes(),
        );
        let m = MmapResp::read_from_bytes(&driver.command(&req, 64)).unwrap();
        assert_eq!(m.hdr.status, 0);
        assert_eq!(m.len, u64::from(b.length));
        assert_eq!(maps.lock().unwrap()[&m.driver_addr].2, m.len);
        shm_addrs.push(m.driver_addr);
        let q = V4l2Buffer {
            index,
            type_: BUF_TYPE_VIDEO_CAPTURE,
            memory: MEMORY_MMAP,
            ..Default::default()
        };
        let _: V4l2Buffer = driver.ioctl(s, V4l2Ioctl::VIDIOC_QBUF, &q);
    }
    let _: () = driver.ioctl(s, V4l2Ioctl::VIDIOC_STREAMON, &BUF_TYPE_VIDEO_CAPTURE);
    let mut checked = 0;
    while checked < 3 {
        let ev = driver.next_event();
        if u32::from_le_bytes(ev[0..4].try_into().unwrap()) != EVENT_DQBUF {
            continue;
        }
        let b = V4l2Buffer::read_from_prefix(&ev[8..]).unwrap().0;
        assert_eq!(b.flags & BUF_FLAG_ERROR, 0);
        // Read the frame where the guest would: through the fd mapped at that offset.
        let data = {
            let maps = maps.lock().unwrap();
            let (file, off, _) = &maps[&shm_addrs[b.index as usize]];
            let mut data = vec![0u8; pix.sizeimage as usize];
            file.read_exact_at(&mut data, *off).unwrap();
            data
        };
        assert_eq!(
            decode_frame_number(PIX_FMT_RGB24, 320, 240, &data),
            Some(b.sequence)
        );
        let mut want = vec![0u8; data.len()];
        render_frame(
            PIX_FMT_RGB24,
            320,
            240,
            b.sequence,
            &Adjust::default(),
            &mut want,
        )
        .unwrap();
        assert!(data == want, "frame {} differs", b.sequence);
        checked += 1;
        let q = V4l2Buffer {
            index: b.index,
            type_: BUF_TYPE_VIDEO_CAPTURE,
            memory: MEMORY_MMAP,
            ..Default::default()
        };
        let _: V4l2Buffer = driver.ioctl(s, V4l2Ioctl::VIDIOC_QBUF, &q);
    }
    let _: () = driver.ioctl(s, V4l2Ioctl::VIDIOC_STREAMOFF, &BUF_TYPE_VIDEO_CAPTURE);
    for addr in &shm_addrs {
        let mut req = CmdHeader::new(MediaCmd::Munmap).as_bytes().to_vec();
        req.extend_from_slice(MunmapCmd { driver_addr: *addr }.as_bytes());
        let r = driver.command(&req, 64);
        assert_eq!(RespHeader::read_from_bytes(&r).unwrap().status, 0);
    }
    assert_eq!(unmaps.lock().unwrap().len(), 2);
    assert!(maps.lock().unwrap().is_empty());

    // USERPTR through the front-end's memory table: pages in reverse order, the frame is
    // written into guest memory.
    let rb = V4l2Requestbuffers {
        count: 1,
        type_: BUF_TYPE_VIDEO_CAPTURE,
        memory: MEMORY_USERPTR,
        ..Default::default()
    };
    let rb: V4l2Requestbuffers = driver.ioctl(s, V4l2Ioctl::VIDIOC_REQBUFS, &rb);
    assert_eq!(rb.count, 1);
    let len = pix.sizeimage;
    let pages = u64::from(len).div_ceil(4096);
    let sgs: Vec<SgEntry> = (0..pages)
        .map(|k| SgEntry {
            start: USERPTR_AREA + (pages - 1 - k) * 4096,
            len: (u64::from(len) - k * 4096).min(4096) as u32,
            reserved: 0,
        })
        .collect();
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
    let mut req = CmdHeader::new(MediaCmd::Ioctl).as_bytes().to_vec();
    req.extend_from_slice(
        IoctlCmd {
            session_id: s,
            code: V4l2Ioctl::VIDIOC_QBUF.nr().into(),
        }
        .as_bytes(),
    );
    req.extend_from_slice(&arg);
    let r = driver.command(&req, 4096);
    assert_eq!(RespHeader::read_from_prefix(&r).unwrap().0.status, 0);
    let _: () = driver.ioctl(s, V4l2Ioctl::VIDIOC_STREAMON, &BUF_TYPE_VIDEO_CAPTURE);
    let b = loop {
        let ev = driver.next_event();
        if u32::from_le_bytes(ev[0..4].try_into().unwrap()) == EVENT_DQBUF {
            break V4l2Buffer::read_from_prefix(&ev[8..]).unwrap().0;
        }
    };
    assert_eq!((b.memory, b.flags & BUF_FLAG_ERROR), (MEMORY_USERPTR, 0));
    let mut data = Vec::new();
    for sg in &sgs {
        let mut chunk = vec![0u8; sg.len as usize];
        mem.read_slice(&mut chunk, GuestAddress(sg.start)).unwrap();
        data.extend_from_slice(&chunk);
    }
    assert_eq!(
        decode_frame_number(PIX_FMT_RGB24, 320, 240, &data),
        Some(b.sequence)
    );
    let _: () = driver.ioctl(s, V4l2Ioctl::VIDIOC_STREAMOFF, &BUF_TYPE_VIDEO_CAPTURE);

    let mut req = CmdHeader::new(MediaCmd::Close).as_bytes().to_vec();
    req.extend_from_slice(
        CloseCmd {
            session_id: s,
            reserved: 0,
        }
        .as_bytes(),
    );
    assert!(driver.command(&req, 16).is_empty());

    drop(fe);
    stop.write(1).unwrap();
    worker.join().unwrap();
    channel_thread.join().unwrap();
    drop(calls);
}
