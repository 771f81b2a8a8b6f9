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
use outboard_glue::rust_vmm::{boxed_queues, RustVmmMemory};
use outboard_protocol::media::{
    CloseCmd, CmdHeader, IoctlCmd, MediaCmd, MediaConfig, MmapCmd, MmapResp, MunmapCmd, OpenResp,
    RespHeader, SgEntry, EVENT_DQBUF, EVENT_EVENT, MMAP_FLAG_RW,
};
use outboard_protocol::v4l2::V4l2Ioctl;
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
        // SAFETY: a new shared read-only mapping of `size` bytes of `file`, checked
        // below; nothing else is at the address the kernel picks.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                *size as usize,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap of the shared memory mapping");
        // SAFETY: `p` maps `size >= len` readable bytes until the munmap below.
        let out = unsafe { std::slice::from_raw_parts(p as *const u8, len) }.to_vec();
        // SAFETY: `p` is the mapping made above and nothing refers to it any more.
        unsafe { libc::munmap(p, *size as usize) };
        out
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
