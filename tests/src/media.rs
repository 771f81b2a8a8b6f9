//! A simulated virtio-media guest driver for any [`MediaDevice`]: command and event
//! queues in guest memory, the device behind a [`VirtioMedia`], a shared memory region
//! ([`TestShm`]) that maps MMAP buffers the way a front-end would, and helpers to send
//! commands and collect events.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outboard_devices::media::device::VirtioMedia;
use outboard_devices::media::v4l2::*;
use outboard_devices::media::{EventBuffer, GuestMemoryRegions, HostMemoryMapper, MediaDevice};
use outboard_devices::virtio::VirtioDevice;
use outboard_protocol::media::{
    CloseCmd, CmdHeader, IoctlCmd, MediaCmd, MediaConfig, MmapCmd, MmapResp, MunmapCmd, OpenResp,
    RespHeader, SgEntry, EVENT_DQBUF, EVENT_EVENT, MMAP_FLAG_RW,
};
use outboard_protocol::v4l2::V4l2Ioctl;
use outboard_vmm_glue::rust_vmm::{boxed_queues, RustVmmMemory};
use vm_memory::{Bytes, GuestAddress};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::{guest_memory, CountingInterrupt, DriverQueue, Mem};

/// How long [`MediaGuest::pump_until`] waits.
pub const PUMP_TIMEOUT: Duration = Duration::from_secs(5);
const CMD_Q: u64 = 0x1000;
const EVT_Q: u64 = 0x2_0000;
const REQ: u64 = 0x10_0000;
const RESP: u64 = 0x18_0000;
const EVT_BUFS: u64 = 0x20_0000;
const EVT_BUF_SIZE: u32 = 1024;
const EVT_BUF_COUNT: u64 = 16;
/// Region 0 ends at 48 MiB: USERPTR pages are placed on both sides of it.
pub const REGION_END: u64 = 48 << 20;
/// Where the shared memory region's mappings start.
pub const SHM_BASE: u64 = 0x1_0000_0000;

/// The shared memory region: remembers which fd is mapped where, so the test reads
/// what the guest would see at that offset (through `mmap`, which works for memfds and
/// dma-bufs alike).
#[derive(Clone, Default)]
pub struct TestShm(Arc<Mutex<TestShmInner>>);

#[derive(Default)]
struct TestShmInner {
    next: u64,
    maps: BTreeMap<u64, (File, u64)>,
}

impl HostMemoryMapper for TestShm {
    fn add_mapping(
        &mut self,
        fd: BorrowedFd<'_>,
        len: u64,
        offset: u64,
        _rw: bool,
    ) -> Result<u64, i32> {
        assert_eq!(len % 4096, 0, "unaligned mapping length {len:#x}");
        assert_eq!(offset % 4096, 0);
        let file = File::from(fd.try_clone_to_owned().map_err(|_| libc::EIO)?);
        assert!(
            file.metadata().unwrap().len() >= len,
            "backing fd smaller than the mapping"
        );
        let mut s = self.0.lock().unwrap();
        let addr = s.next;
        s.next += len;
        s.maps.insert(addr, (file, len));
        Ok(addr)
    }

    fn remove_mapping(&mut self, shm_offset: u64) -> Result<(), i32> {
        self.0
            .lock()
            .unwrap()
            .maps
            .remove(&shm_offset)
            .map(|_| ())
            .ok_or(libc::EINVAL)
    }
}

impl TestShm {
    /// Reads the first `len` bytes of the mapping at `addr`.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let s = self.0.lock().unwrap();
        let (file, size) = &s.maps[&addr];
        assert!(len as u64 <= *size);
        read_mapped(file, 0, len)
    }

    /// Number of live mappings.
    pub fn count(&self) -> usize {
        self.0.lock().unwrap().maps.len()
    }
}

/// A dequeued buffer as the guest saw it in a DQBUF event.
#[derive(Debug, Clone)]
pub struct Dequeued {
    /// The session.
    pub session: u32,
    /// The buffer.
    pub buffer: V4l2Buffer,
    /// Its planes (multi-planar types: `buffer.length` of them).
    pub planes: Vec<V4l2Plane>,
}

/// The simulated guest driver.
pub struct MediaGuest<D: MediaDevice> {
    /// Guest memory.
    pub mem: Mem,
    /// The device.
    pub dev: VirtioMedia<D>,
    cmdq: DriverQueue,
    evq: DriverQueue,
    /// The shared memory region.
    pub shm: TestShm,
    /// DQBUF events not consumed yet.
    pub dqbufs: VecDeque<Dequeued>,
    /// V4L2 events (session, event) not consumed yet.
    pub v4l2_events: VecDeque<(u32, V4l2Event)>,
    /// Error events (session, errno).
    pub error_events: Vec<(u32, u32)>,
}

/// The bytes of `v`.
pub fn bytes_of<T: IntoBytes + Immutable>(v: &T) -> Vec<u8> {
    v.as_bytes().to_vec()
}

impl<D: MediaDevice> MediaGuest<D> {
    /// A driver for the device `make` builds from its event buffer, shared memory region
    /// and guest memory, with config space `config`.
    pub fn new(
        config: MediaConfig,
        make: impl FnOnce(EventBuffer, TestShm, GuestMemoryRegions) -> D,
    ) -> Self {
        let caps = config.device_caps;
        let mem = guest_memory();
        let shm = TestShm(Arc::new(Mutex::new(TestShmInner {
            next: SHM_BASE,
            maps: BTreeMap::new(),
        })));
        let events = EventBuffer::new();
        let guest = GuestMemoryRegions(Arc::new(RustVmmMemory::new(mem.clone())));
        let device = make(events.clone(), shm.clone(), guest);
        let mut dev = VirtioMedia::new(device, events, config).unwrap();
        let cmdq = DriverQueue::new(CMD_Q, 64);
        let mut evq = DriverQueue::new(EVT_Q, 64);
        let queues = vec![
            cmdq.device_queue(&mem, false),
            evq.device_queue(&mem, false),
        ];
        dev.activate(
            boxed_queues(queues, &mem),
            Arc::new(CountingInterrupt::default()),
        )
        .unwrap();
        for i in 0..EVT_BUF_COUNT {
            evq.add(
                &mem,
                &[(EVT_BUFS + i * u64::from(EVT_BUF_SIZE), EVT_BUF_SIZE, true)],
            )
            .unwrap();
        }
        dev.handle_queue(1);
        let mut cfg = [0u8; 40];
        dev.read_config(0, &mut cfg);
        assert_eq!(&cfg[..4], &caps.to_le_bytes());
        MediaGuest {
            mem,
            dev,
            cmdq,
            evq,
            shm,
            dqbufs: VecDeque::new(),
            v4l2_events: VecDeque::new(),
            error_events: Vec::new(),
        }
    }

    /// Sends a raw command: the request split in two readable descriptors (header, rest)
    /// and a writable response buffer of `resp_len`. Returns the written bytes.
    pub fn raw(&mut self, req: &[u8], resp_len: u32) -> Vec<u8> {
        self.mem.write_slice(req, GuestAddress(REQ)).unwrap();
        let mut bufs = Vec::new();
        let split = req.len().min(8);
        bufs.push((REQ, split as u32, false));
        if req.len() > split {
            bufs.push((REQ + 0x100, (req.len() - split) as u32, false));
            self.mem
                .write_slice(&req[split..], GuestAddress(REQ + 0x100))
                .unwrap();
        }
        if resp_len > 0 {
            bufs.push((RESP, resp_len, true));
        }
        let head = self.cmdq.add(&self.mem, &bufs).unwrap();
        self.dev.handle_queue(0);
        let (used, len) = self.cmdq.pop_used(&self.mem).expect("no response");
        assert_eq!(used, head);
        assert!(len <= resp_len);
        let mut out = vec![0u8; len as usize];
        self.mem.read_slice(&mut out, GuestAddress(RESP)).unwrap();
        out
    }

    /// Opens a session; panics unless the device answers OK.
    pub fn open(&mut self) -> u32 {
        let r = self.raw(CmdHeader::new(MediaCmd::Open).as_bytes(), 64);
        let resp = OpenResp::read_from_bytes(&r).unwrap();
        assert_eq!(resp.hdr.status, 0);
        resp.session_id
    }

    /// Closes a session.
    pub fn close(&mut self, session: u32) {
        let mut req = bytes_of(&CmdHeader::new(MediaCmd::Close));
        req.extend_from_slice(
            CloseCmd {
                session_id: session,
                reserved: 0,
            }
            .as_bytes(),
        );
        // CLOSE has no response: the device returns the chain with nothing written.
        assert!(self.raw(&req, 16).is_empty());
    }

    /// Runs an ioctl; returns the status and the payload after the response header.
    pub fn ioctl_raw(
        &mut self,
        session: u32,
        code: u32,
        payload: &[u8],
        resp_len: u32,
    ) -> (u32, Vec<u8>) {
        let mut req = bytes_of(&CmdHeader::new(MediaCmd::Ioctl));
        req.extend_from_slice(
            IoctlCmd {
                session_id: session,
                code,
            }
            .as_bytes(),
        );
        req.extend_from_slice(payload);
        let r = self.raw(&req, resp_len);
        let hdr = RespHeader::read_from_prefix(&r).unwrap().0;
        (hdr.status, r[8..].to_vec())
    }

    /// Runs an ioctl whose answer is an `O`.
    pub fn ioctl<I: IntoBytes + Immutable, O: FromBytes>(
        &mut self,
        session: u32,
        ioctl: V4l2Ioctl,
        arg: &I,
    ) -> Result<O, u32> {
        let (status, out) = self.ioctl_raw(session, ioctl.nr().into(), arg.as_bytes(), 4096);
        if status != 0 {
            assert!(out.is_empty());
            return Err(status);
        }
        Ok(O::read_from_prefix(&out).unwrap().0)
    }

    /// Runs an ioctl whose answer is ignored.
    pub fn ioctl_void<I: IntoBytes + Immutable>(
        &mut self,
        session: u32,
        ioctl: V4l2Ioctl,
        arg: &I,
    ) -> Result<(), u32> {
        let (status, _) = self.ioctl_raw(session, ioctl.nr().into(), arg.as_bytes(), 4096);
        if status != 0 {
            return Err(status);
        }
        Ok(())
    }

    /// MMAP command: (driver address, length) or the errno.
    pub fn mmap(&mut self, session: u32, offset: u32) -> Result<(u64, u64), u32> {
        let mut req = bytes_of(&CmdHeader::new(MediaCmd::Mmap));
        req.extend_from_slice(
            MmapCmd {
                session_id: session,
                flags: MMAP_FLAG_RW,
                offset,
            }
            .as_bytes(),
        );
        let r = self.raw(&req, 64);
        let hdr = RespHeader::read_from_prefix(&r).unwrap().0;
        if hdr.status != 0 {
            return Err(hdr.status);
        }
        let m = MmapResp::read_from_bytes(&r).unwrap();
        Ok((m.driver_addr, m.len))
    }

    /// MUNMAP command: the status.
    pub fn munmap(&mut self, addr: u64) -> u32 {
        let mut req = bytes_of(&CmdHeader::new(MediaCmd::Munmap));
        req.extend_from_slice(MunmapCmd { driver_addr: addr }.as_bytes());
        let r = self.raw(&req, 64);
        RespHeader::read_from_bytes(&r).unwrap().status
    }

    /// Lets the device process its sessions and collects events until `cond` holds or
    /// [`PUMP_TIMEOUT`] passes; returns whether `cond` held.
    pub fn pump_until(&mut self, mut cond: impl FnMut(&Self) -> bool) -> bool {
        let start = Instant::now();
        loop {
            self.dev.handle_event();
            while let Some((head, len)) = self.evq.pop_used(&self.mem) {
                self.take_event(head, len);
            }
            if cond(self) {
                return true;
            }
            if start.elapsed() > PUMP_TIMEOUT {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn take_event(&mut self, head: u16, len: u32) {
        // Each event buffer is a single descriptor: its address is in the table.
        let desc_at = GuestAddress(EVT_Q + 16 * u64::from(head));
        let addr: u64 = self.mem.read_obj(desc_at).unwrap();
        let mut buf = vec![0u8; len as usize];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        let kind = u32::from_le_bytes(buf[0..4].try_into().unwrap());
        let session = u32::from_le_bytes(buf[4..8].try_into().unwrap());
        match kind {
            EVENT_DQBUF => {
                assert_eq!(len, 608);
                let buffer = V4l2Buffer::read_from_prefix(&buf[8..]).unwrap().0;
                let planes = if is_multiplanar(buffer.type_) {
                    (0..(buffer.length as usize).min(VIDEO_MAX_PLANES))
                        .map(|i| V4l2Plane::read_from_prefix(&buf[96 + 64 * i..]).unwrap().0)
                        .collect()
                } else {
                    Vec::new()
                };
                self.dqbufs.push_back(Dequeued {
                    session,
                    buffer,
                    planes,
                });
            }
            EVENT_EVENT => {
                assert_eq!(len, 144);
                let ev = V4l2Event::read_from_prefix(&buf[8..]).unwrap().0;
                self.v4l2_events.push_back((session, ev));
            }
            _ => {
                let errno = u32::from_le_bytes(buf[8..12].try_into().unwrap());
                self.error_events.push((session, errno));
            }
        }
        // Give the buffer back.
        self.evq
            .add(&self.mem, &[(addr, EVT_BUF_SIZE, true)])
            .unwrap();
        self.dev.handle_queue(1);
    }

    /// Reads the guest memory an SG list describes.
    pub fn read_sg(&self, sgs: &[SgEntry]) -> Vec<u8> {
        let mut out = Vec::new();
        for sg in sgs {
            let mut buf = vec![0u8; sg.len as usize];
            self.mem
                .read_slice(&mut buf, GuestAddress(sg.start))
                .unwrap();
            out.extend_from_slice(&buf);
        }
        out
    }

    /// Fills the guest memory an SG list describes with `byte`.
    pub fn fill_sg(&self, sgs: &[SgEntry], byte: u8) {
        for sg in sgs {
            let buf = vec![byte; sg.len as usize];
            self.mem.write_slice(&buf, GuestAddress(sg.start)).unwrap();
        }
    }
}

/// Page-granular SG entries for a buffer of `len` bytes, pages in reverse order, every
/// other page, from `base_page` (a guest address) on.
pub fn scattered_sg(base_page: u64, len: u32) -> Vec<SgEntry> {
    let pages = u64::from(len).div_ceil(4096);
    (0..pages)
        .rev()
        .map(|i| {
            let remaining = u64::from(len) - (pages - 1 - i) * 4096;
            SgEntry {
                start: base_page + i * 2 * 4096,
                len: remaining.min(4096) as u32,
                reserved: 0,
            }
        })
        .collect()
}

/// Reads `len` bytes at `offset` of `file` through a shared read-only mapping (what a
/// front-end does with the fds of `SHMEM_MAP`; works for memfds and dma-bufs alike).
pub fn read_mapped(file: &File, offset: u64, len: usize) -> Vec<u8> {
    let map_len = (offset as usize + len).next_multiple_of(4096);
    // SAFETY: a new shared read-only mapping of `map_len` bytes of `file`, checked
    // below; nothing else is at the address the kernel picks.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap of a shared memory mapping");
    // SAFETY: `p` maps `map_len >= offset + len` readable bytes until the munmap below.
    let out =
        unsafe { std::slice::from_raw_parts((p as *const u8).add(offset as usize), len) }.to_vec();
    // SAFETY: `p` is the mapping made above and nothing refers to it any more.
    unsafe { libc::munmap(p, map_len) };
    out
}

/// A virtio-media driver talking to a vhost-user back-end through our transport's
/// `Frontend`, which plays QEMU: memory table from memfds, rings, kick and call eventfds,
/// and the back-end channel answering `SHMEM_MAP`/`SHMEM_UNMAP` by keeping the fds.
pub mod vhost {
    use std::collections::BTreeMap;
    use std::fs::File;
    use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
    use std::path::Path;
    use std::sync::{Arc, Mutex};
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use outboard_devices::media::camera::{render_frame, Adjust};
    use outboard_devices::media::v4l2::{
        V4l2Buffer, V4l2Captureparm, V4l2Format, V4l2Fract, V4l2PixFormat, V4l2Requestbuffers,
        V4l2Streamparm, BUF_FLAG_ERROR, BUF_TYPE_VIDEO_CAPTURE, MEMORY_MMAP, PIX_FMT_YUYV,
    };
    use outboard_protocol::media::{
        CloseCmd, CmdHeader, IoctlCmd, MediaCmd, MmapCmd, MmapResp, MunmapCmd, OpenResp,
        RespHeader, EVENT_DQBUF, MMAP_FLAG_RW,
    };
    use outboard_protocol::v4l2::V4l2Ioctl;
    use outboard_protocol::vhost_user::{
        VhostUserConfigFlags, VhostUserMMap, VhostUserMemoryRegion, VhostUserProtocolFeatures,
        VhostUserVirtioFeatures, VhostUserVringAddr,
    };
    use outboard_transport::{
        Frontend, FrontendReqHandler, HandlerResult, MemoryRegionRef, VhostUserFrontendReqHandler,
    };
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
    use vmm_sys_util::eventfd::EventFd;
    use zerocopy::{FromBytes, Immutable, IntoBytes};

    use crate::{guest_memory, DriverQueue, Mem};

    /// How long a command or an event may take.
    pub const TIMEOUT: Duration = Duration::from_secs(10);
    const QSIZE: u16 = 64;
    const CMD_Q: u64 = 0x1000;
    const EVT_Q: u64 = 0x2_0000;
    const REQ: u64 = 0x10_0000;
    const RESP: u64 = 0x18_0000;
    const EVT_BUFS: u64 = 0x20_0000;

    /// What the back-end mapped into shared memory region 0: offset -> (fd, fd offset,
    /// length).
    pub type ShmMaps = Arc<Mutex<BTreeMap<u64, (File, u64, u64)>>>;

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

    /// A streaming MMAP capture session ([`VhostMediaDriver::start_mmap_capture`]).
    #[derive(Debug)]
    pub struct MmapCapture {
        /// The session id.
        pub session: u32,
        /// Its format.
        pub pix: V4l2PixFormat,
        /// The shared memory address of each buffer's mapping.
        pub shm: Vec<u64>,
    }

    /// The driver and the front-end it runs on.
    pub struct VhostMediaDriver {
        /// Guest memory.
        pub mem: Mem,
        cmdq: DriverQueue,
        evq: DriverQueue,
        kicks: [EventFd; 2],
        _calls: [EventFd; 2],
        fe: Option<Frontend>,
        /// Live shared memory mappings.
        pub maps: ShmMaps,
        /// Offsets the back-end unmapped.
        pub unmaps: Arc<Mutex<Vec<u64>>>,
        /// Size of shared memory region 0.
        pub shm_size: u64,
        /// The first 40 bytes of the config space.
        pub config: Vec<u8>,
        channel_thread: Option<JoinHandle<()>>,
    }

    /// Sends `SET_MEM_TABLE` with the regions of `mem` (memfd-backed, at their file
    /// offsets) whose guest address `keep` accepts.
    fn send_memory_table(fe: &mut Frontend, mem: &Mem, keep: impl Fn(u64) -> bool) {
        let regions: Vec<(VhostUserMemoryRegion, Arc<File>)> = mem
            .iter()
            .filter(|r| keep(r.start_addr().0))
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
    }

    impl VhostMediaDriver {
        /// Connects to the back-end at `sock` and sets the device up: features, back-end
        /// channel, shared memory, memory table, both rings, event buffers.
        pub fn connect(sock: &Path) -> VhostMediaDriver {
            let mut fe = Frontend::connect(sock).unwrap();
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
            let channel_thread =
                std::thread::spawn(move || while channel.handle_request().is_ok() {});

            let shm = fe.get_shmem_config().unwrap();
            assert_eq!(shm.num_regions, 1);
            let config = fe
                .get_config(0, 40, VhostUserConfigFlags::Frontend)
                .unwrap();

            // The memory table: both memfd-backed regions, at their file offsets.
            let mem = guest_memory();
            send_memory_table(&mut fe, &mem, |_| true);

            let mut driver = VhostMediaDriver {
                mem: mem.clone(),
                cmdq: DriverQueue::new(CMD_Q, QSIZE),
                evq: DriverQueue::new(EVT_Q, QSIZE),
                kicks: [
                    EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                    EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                ],
                _calls: [
                    EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                    EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                ],
                fe: None,
                maps,
                unmaps,
                shm_size: shm.mem_size[0],
                config,
                channel_thread: Some(channel_thread),
            };
            for i in 0..8 {
                driver
                    .evq
                    .add(&mem, &[(EVT_BUFS + i * 1024, 1024, true)])
                    .unwrap();
            }
            for (i, base) in [(0u32, CMD_Q), (1, EVT_Q)] {
                fe.set_vring_num(i, QSIZE.into()).unwrap();
                fe.set_vring_addr(&ring_addrs(&mem, base, i)).unwrap();
                fe.set_vring_base(i, 0).unwrap();
                let idx = i as u8;
                fe.set_vring_call(idx, Some(borrow(&driver._calls[i as usize])))
                    .unwrap();
                // The back-end gets its own copy of the kick eventfd.
                let kick = driver.kicks[i as usize].try_clone().unwrap();
                fe.set_vring_kick(idx, Some(borrow(&kick))).unwrap();
                fe.set_vring_enable(i, true).unwrap();
            }
            driver.kicks[1].write(1).unwrap();
            driver.fe = Some(fe);
            driver
        }

        /// Replaces the back-end's memory table with the guest regions whose guest
        /// address `keep` accepts, as a front-end does on memory hot-unplug (or a hostile
        /// one at any time); the driver's own view of guest memory is unchanged.
        pub fn set_memory_table(&mut self, keep: impl Fn(u64) -> bool) {
            let fe = self.fe.as_mut().expect("connected");
            send_memory_table(fe, &self.mem, keep);
        }

        /// Sends a command; returns the response.
        pub fn command(&mut self, req: &[u8], resp_len: u32) -> Vec<u8> {
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
                assert!(start.elapsed() < TIMEOUT, "no response from the daemon");
                std::thread::sleep(Duration::from_millis(1));
            }
        }

        /// Runs an ioctl with a raw payload; returns the status and the answer.
        pub fn ioctl_raw(&mut self, session: u32, ioctl: V4l2Ioctl, arg: &[u8]) -> (u32, Vec<u8>) {
            let mut req = CmdHeader::new(MediaCmd::Ioctl).as_bytes().to_vec();
            req.extend_from_slice(
                IoctlCmd {
                    session_id: session,
                    code: ioctl.nr().into(),
                }
                .as_bytes(),
            );
            req.extend_from_slice(arg);
            let r = self.command(&req, 4096);
            let status = RespHeader::read_from_prefix(&r).unwrap().0.status;
            (status, r[8..].to_vec())
        }

        /// Runs an ioctl that must succeed; returns its answer.
        pub fn ioctl<I: IntoBytes + Immutable, O: FromBytes>(
            &mut self,
            session: u32,
            ioctl: V4l2Ioctl,
            arg: &I,
        ) -> O {
            let (status, out) = self.ioctl_raw(session, ioctl, arg.as_bytes());
            assert_eq!(status, 0, "{ioctl}");
            O::read_from_prefix(&out).unwrap().0
        }

        /// Waits for the next DQBUF event, skipping other events; returns its buffer.
        pub fn next_dqbuf(&mut self) -> V4l2Buffer {
            loop {
                let ev = self.next_event();
                if u32::from_le_bytes(ev[0..4].try_into().unwrap()) == EVENT_DQBUF {
                    return V4l2Buffer::read_from_prefix(&ev[8..]).unwrap().0;
                }
            }
        }

        /// Waits for the next event; returns its bytes.
        pub fn next_event(&mut self) -> Vec<u8> {
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
                assert!(start.elapsed() < TIMEOUT, "no event from the daemon");
                std::thread::sleep(Duration::from_millis(1));
            }
        }

        /// Reads `len` bytes of the shared memory mapping at `addr`, through its fd
        /// (waiting for the back-end channel to deliver the map, as [`Self::settle`]).
        pub fn read_shm(&self, addr: u64, len: usize) -> Vec<u8> {
            let start = Instant::now();
            loop {
                if let Some((file, off, _)) = self.maps.lock().unwrap().get(&addr) {
                    return super::read_mapped(file, *off, len);
                }
                assert!(start.elapsed() < TIMEOUT, "{addr:#x} was never mapped");
                std::thread::sleep(Duration::from_millis(1));
            }
        }

        /// Waits until the front-end side holds `mapped` mappings and has seen
        /// `unmapped` unmaps in all; false if that does not happen within [`TIMEOUT`].
        ///
        /// The back-end posts its maps and unmaps on the back-end channel without waiting
        /// for the answers (it must keep answering the front-end meanwhile), and this
        /// front-end serves that channel on a thread of its own, so they land a little
        /// after the command that caused them (QEMU handles them in order in its main
        /// loop, long before a guest application touches the mapping).
        pub fn settle(&self, mapped: usize, unmapped: usize) -> bool {
            let start = Instant::now();
            while self.maps.lock().unwrap().len() != mapped
                || self.unmaps.lock().unwrap().len() != unmapped
            {
                if start.elapsed() > TIMEOUT {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            true
        }

        /// Disconnects the front-end (the back-end resets the device).
        pub fn disconnect(&mut self) {
            self.fe = None;
        }

        /// Whether the back-end still answers on the vhost-user connection (a
        /// `GET_FEATURES` round trip); `false` once it has closed the connection.
        pub fn answers(&mut self) -> bool {
            self.fe.as_mut().is_some_and(|fe| fe.get_features().is_ok())
        }

        /// The MMAP capture flow on a new session, as a guest application runs it: 640x480
        /// YUYV, two buffers mapped through `SHMEM_MAP`, `STREAMON`, `frames` frames
        /// dequeued and each checked byte for byte against the camera's pattern, then
        /// `STREAMOFF`, the mappings undone and the session closed. Returns the
        /// sequence numbers checked.
        pub fn capture_mmap(&mut self, frames: usize) -> Vec<u32> {
            let c = self.start_mmap_capture(PIX_FMT_YUYV, 640, 480);
            let seen = self.check_frames(&c, frames);
            self.stop_mmap_capture(c);
            seen
        }

        /// Opens a session, sets the format (`fourcc`, `w` x `h`, at 60 frames a second),
        /// maps two MMAP buffers through `SHMEM_MAP`, queues them and starts streaming.
        pub fn start_mmap_capture(&mut self, fourcc: u32, w: u32, h: u32) -> MmapCapture {
            let r = self.command(CmdHeader::new(MediaCmd::Open).as_bytes(), 64);
            let session = OpenResp::read_from_bytes(&r).unwrap().session_id;
            let fmt = V4l2Format::from_pix(
                BUF_TYPE_VIDEO_CAPTURE,
                &V4l2PixFormat {
                    width: w,
                    height: h,
                    pixelformat: fourcc,
                    ..Default::default()
                },
            );
            let fmt: V4l2Format = self.ioctl(session, V4l2Ioctl::VIDIOC_S_FMT, &fmt);
            let pix = fmt.pix();
            assert_eq!((pix.width, pix.height, pix.pixelformat), (w, h, fourcc));
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
            let _: V4l2Streamparm = self.ioctl(session, V4l2Ioctl::VIDIOC_S_PARM, &parm);
            let rb = V4l2Requestbuffers {
                count: 2,
                type_: BUF_TYPE_VIDEO_CAPTURE,
                memory: MEMORY_MMAP,
                ..Default::default()
            };
            let rb: V4l2Requestbuffers = self.ioctl(session, V4l2Ioctl::VIDIOC_REQBUFS, &rb);
            let mut shm = Vec::new();
            for index in 0..rb.count {
                let q = V4l2Buffer {
                    index,
                    type_: BUF_TYPE_VIDEO_CAPTURE,
                    ..Default::default()
                };
                let b: V4l2Buffer = self.ioctl(session, V4l2Ioctl::VIDIOC_QUERYBUF, &q);
                let mut req = CmdHeader::new(MediaCmd::Mmap).as_bytes().to_vec();
                req.extend_from_slice(
                    MmapCmd {
                        session_id: session,
                        flags: MMAP_FLAG_RW,
                        offset: b.mem_offset(),
                    }
                    .as_bytes(),
                );
                let m = MmapResp::read_from_bytes(&self.command(&req, 64)).unwrap();
                assert_eq!(m.hdr.status, 0, "MMAP of buffer {index}");
                shm.push(m.driver_addr);
                self.queue_mmap(session, index);
            }
            let _: () = self.ioctl(session, V4l2Ioctl::VIDIOC_STREAMON, &BUF_TYPE_VIDEO_CAPTURE);
            MmapCapture { session, pix, shm }
        }

        fn queue_mmap(&mut self, session: u32, index: u32) {
            let q = V4l2Buffer {
                index,
                type_: BUF_TYPE_VIDEO_CAPTURE,
                memory: MEMORY_MMAP,
                ..Default::default()
            };
            let _: V4l2Buffer = self.ioctl(session, V4l2Ioctl::VIDIOC_QBUF, &q);
        }

        /// Dequeues `frames` frames of `c`, checks each byte for byte against the
        /// camera's pattern and queues its buffer again; returns their sequence numbers.
        pub fn check_frames(&mut self, c: &MmapCapture, frames: usize) -> Vec<u32> {
            let pix = c.pix;
            let mut seen = Vec::new();
            let mut want = vec![0u8; pix.sizeimage as usize];
            while seen.len() < frames {
                let ev = self.next_event();
                if u32::from_le_bytes(ev[0..4].try_into().unwrap()) != EVENT_DQBUF {
                    continue;
                }
                let b = V4l2Buffer::read_from_prefix(&ev[8..]).unwrap().0;
                assert_eq!(b.flags & BUF_FLAG_ERROR, 0, "frame {}", b.sequence);
                let data = self.read_shm(c.shm[b.index as usize], pix.sizeimage as usize);
                let adjust = Adjust::default();
                let (w, h, fourcc) = (pix.width, pix.height, pix.pixelformat);
                render_frame(fourcc, w, h, b.sequence, &adjust, &mut want).unwrap();
                assert!(
                    data == want,
                    "frame {} differs from the pattern",
                    b.sequence
                );
                seen.push(b.sequence);
                self.queue_mmap(c.session, b.index);
            }
            seen
        }

        /// Stops streaming `c`, undoes its mappings and closes its session.
        pub fn stop_mmap_capture(&mut self, c: MmapCapture) {
            let s = c.session;
            let _: () = self.ioctl(s, V4l2Ioctl::VIDIOC_STREAMOFF, &BUF_TYPE_VIDEO_CAPTURE);
            for addr in c.shm {
                let mut req = CmdHeader::new(MediaCmd::Munmap).as_bytes().to_vec();
                req.extend_from_slice(MunmapCmd { driver_addr: addr }.as_bytes());
                let r = self.command(&req, 64);
                assert_eq!(RespHeader::read_from_bytes(&r).unwrap().status, 0);
            }
            let mut req = CmdHeader::new(MediaCmd::Close).as_bytes().to_vec();
            req.extend_from_slice(
                CloseCmd {
                    session_id: s,
                    reserved: 0,
                }
                .as_bytes(),
            );
            self.command(&req, 64);
        }
    }

    impl Drop for VhostMediaDriver {
        /// Waits for the back-end channel to close (the back-end must be gone or
        /// disconnected by then).
        fn drop(&mut self) {
            self.fe = None;
            if let Some(t) = self.channel_thread.take() {
                let _ = t.join();
            }
        }
    }
}
