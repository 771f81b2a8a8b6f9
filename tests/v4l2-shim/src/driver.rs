//! The guest driver's part: open files and their sessions, the ioctls the Linux
//! virtio-media driver (and the V4L2 core above it) answers itself, the state it keeps
//! per queue, and the translation of everything else into virtio-media commands run
//! through Outboard's [`MediaRunner`] and its device (the software camera, or the V4L2
//! proxy over a real node).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use outboard_devices::media::runner::{EpollSessionPoller, MediaRunner};
use outboard_devices::media::v4l2::*;
use outboard_devices::media::{
    ChainReader, ChainWriter, Errno, EventBuffer, EventQueue, MediaDevice, MediaEvent,
};
use outboard_devices::virtio::IoRegion;
use outboard_protocol::media::{
    CmdHeader, IoctlCmd, MediaCmd, MmapCmd, MmapResp, MunmapCmd, OpenResp, RespHeader, MMAP_FLAG_RW,
};
use outboard_protocol::v4l2::V4l2Ioctl;
use zerocopy::{FromBytes, IntoBytes};

use crate::memory::{user_read, user_sgs, user_write, PAGE};

/// Room for any response (the largest is an extended-controls answer).
const RESP_LEN: usize = 64 * 1024;
/// `V4L2_CAP_DEVICE_CAPS`.
const CAP_DEVICE_CAPS: u32 = 0x8000_0000;
/// `V4L2_CAP_*_MPLANE` bits that make the driver's poll look at the MPLANE queues.
const CAP_MPLANE_ANY: u32 = 0x1000 | 0x2000 | 0x4000;
/// `V4L2_PRIORITY_DEFAULT` (interactive), given to every new file.
const PRIORITY_DEFAULT: u32 = 2;
/// `V4L2_PRIORITY_RECORD`, the highest.
const PRIORITY_RECORD: u32 = 3;
/// Size of `struct v4l2_capability`.
const CAPABILITY_SIZE: usize = 104;
/// `V4L2_SEL_TGT_COMPOSE`, `_DEFAULT`, `_BOUNDS`.
const SEL_TGT_COMPOSE: u32 = 0x100;
/// The V4L2 ioctls the V4L2 core runs only after a priority check (`INFO_FL_PRIO`).
const PRIO_CHECKED: &[V4l2Ioctl] = {
    use V4l2Ioctl::*;
    &[
        VIDIOC_S_FMT,
        VIDIOC_REQBUFS,
        VIDIOC_S_FBUF,
        VIDIOC_OVERLAY,
        VIDIOC_STREAMON,
        VIDIOC_STREAMOFF,
        VIDIOC_S_PARM,
        VIDIOC_S_STD,
        VIDIOC_S_CTRL,
        VIDIOC_S_AUDIO,
        VIDIOC_S_INPUT,
        VIDIOC_S_OUTPUT,
        VIDIOC_S_AUDOUT,
        VIDIOC_S_TUNER,
        VIDIOC_S_MODULATOR,
        VIDIOC_S_CROP,
        VIDIOC_S_SELECTION,
        VIDIOC_S_FREQUENCY,
        VIDIOC_S_EXT_CTRLS,
        VIDIOC_S_HW_FREQ_SEEK,
        VIDIOC_CREATE_BUFS,
        VIDIOC_S_DV_TIMINGS,
        VIDIOC_S_JPEGCOMP,
        VIDIOC_S_PRIORITY,
        VIDIOC_ENCODER_CMD,
        VIDIOC_DECODER_CMD,
    ]
};

/// A dequeued buffer waiting for `VIDIOC_DQBUF`.
type Done = (V4l2Buffer, Vec<V4l2Plane>);

/// What the driver tracks per queue of a session.
#[derive(Debug, Default)]
struct QueueState {
    streaming: bool,
    allocated: u32,
    queued: u32,
    pending: VecDeque<Done>,
}

/// One `open()` of the device node (shared by its `dup`s).
#[derive(Debug)]
struct OpenFile {
    /// The eventfd the client's fds are duplicates of: readable while a capture buffer
    /// waits to be dequeued, so `epoll` on a client fd works.
    eventfd: OwnedFd,
    signalled: bool,
    refs: u32,
    prio: u32,
    queues: BTreeMap<u32, QueueState>,
    /// Subscribed (type, id) pairs.
    subscriptions: Vec<(u32, u32)>,
    events: VecDeque<V4l2Event>,
    event_sequence: u32,
    /// The device reported an unrecoverable error (this errno): the session is closed.
    /// `ENODEV` means the device itself is gone: the client then sees what the V4L2
    /// core shows for an unregistered node (ioctls fail with `ENODEV`, poll reports
    /// `POLLERR | POLLHUP | POLLPRI`), where the Linux driver only logs the error.
    failed: Option<Errno>,
}

impl OpenFile {
    fn queue(&mut self, buf_type: u32) -> &mut QueueState {
        self.queues.entry(buf_type).or_default()
    }
}

/// Outcome of a DQBUF or DQEVENT attempt.
pub enum Dequeue {
    /// Done (the answer is written to the client).
    Done,
    /// Nothing yet: the caller waits and tries again.
    Wait,
}

/// What the driver needs of the runner, whatever device it runs (the device is picked
/// at run time, the driver lives in a `static`).
trait Runner: Send {
    fn handle_command(&mut self, r: &mut ChainReader<'_>, w: &mut ChainWriter<'_>) -> usize;
    fn close(&mut self, session: u32);
    fn process_ready_sessions(&mut self) -> Vec<(u32, Errno)>;
    fn poll_fd(&self) -> RawFd;
    #[cfg(test)]
    fn session_count(&self) -> usize;
}

impl<D: MediaDevice> Runner for MediaRunner<D, EpollSessionPoller> {
    fn handle_command(&mut self, r: &mut ChainReader<'_>, w: &mut ChainWriter<'_>) -> usize {
        MediaRunner::handle_command(self, r, w)
    }

    fn close(&mut self, session: u32) {
        MediaRunner::close(self, session);
    }

    fn process_ready_sessions(&mut self) -> Vec<(u32, Errno)> {
        MediaRunner::process_ready_sessions(self)
    }

    fn poll_fd(&self) -> RawFd {
        self.poller().as_fd().as_raw_fd()
    }

    #[cfg(test)]
    fn session_count(&self) -> usize {
        MediaRunner::session_count(self)
    }
}

/// The emulated guest driver with its device.
pub struct Driver {
    runner: Box<dyn Runner>,
    events: EventBuffer,
    device_caps: u32,
    /// The card name of the config space (what QUERYCAP reports).
    card: String,
    /// The driver name QUERYCAP reports.
    driver_name: String,
    fds: HashMap<RawFd, u32>,
    files: BTreeMap<u32, OpenFile>,
    prios: [u32; 4],
    /// Client mappings: address -> length.
    maps: BTreeMap<u64, u64>,
}

fn ioctl_cmd(session: u32, ioctl: V4l2Ioctl, payload: &[u8]) -> Vec<u8> {
    let mut v = CmdHeader::new(MediaCmd::Ioctl).as_bytes().to_vec();
    v.extend_from_slice(
        IoctlCmd {
            session_id: session,
            code: ioctl.nr().into(),
        }
        .as_bytes(),
    );
    v.extend_from_slice(payload);
    v
}

fn read_obj<T: FromBytes>(bytes: &[u8]) -> Result<T, Errno> {
    T::read_from_prefix(bytes)
        .map(|(t, _)| t)
        .map_err(|_| libc::EIO)
}

fn user_obj<T: FromBytes>(addr: u64) -> Result<T, Errno> {
    read_obj(&user_read(addr, std::mem::size_of::<T>())?)
}

fn monotonic_now() -> Timespec {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, which lives on the stack.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Timespec {
        tv_sec: ts.tv_sec,
        tv_nsec: ts.tv_nsec,
    }
}

/// The running kernel's version as `KERNEL_VERSION(a, b, c)` (what QUERYCAP reports).
fn kernel_version() -> u32 {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let a = parts.next().unwrap_or(0).min(255);
    let b = parts.next().unwrap_or(0).min(255);
    let c = parts.next().unwrap_or(0).min(255);
    a << 16 | b << 8 | c
}

impl Driver {
    /// The driver and its device, which sends its events to `events`; the config space
    /// holds `device_caps` and `card`, as `outboard media` fills it for that device.
    pub fn new<D: MediaDevice + 'static>(
        device: D,
        events: EventBuffer,
        device_caps: u32,
        card: &str,
    ) -> std::io::Result<Self> {
        Ok(Driver {
            runner: Box::new(MediaRunner::new(device, EpollSessionPoller::new()?)),
            events,
            device_caps,
            card: card.to_owned(),
            driver_name: "virtio-media".into(),
            fds: HashMap::new(),
            files: BTreeMap::new(),
            prios: [0; 4],
            maps: BTreeMap::new(),
        })
    }

    /// Reports `name` (at most 15 bytes are kept) as the driver name in QUERYCAP instead
    /// of the Linux driver's "virtio-media". `v4l2-compliance` has rules for some
    /// drivers by name (for vivid it skips vivid's test controls, one of which,
    /// "Disconnect", unregisters the node): to compare a proxied node with the node
    /// itself, the proxied node must be tested under the same rules.
    pub fn set_driver_name(&mut self, name: &str) {
        let mut end = name.len().min(15);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        self.driver_name = name[..end].to_owned();
    }

    /// The fd that is readable when a session has device work pending (frame timers).
    pub fn device_fd(&self) -> RawFd {
        self.runner.poll_fd()
    }

    /// Whether `fd` is a client fd of the device.
    pub fn owns(&self, fd: RawFd) -> bool {
        self.fds.contains_key(&fd)
    }

    /// Whether `addr` is a client mapping of a device buffer.
    pub fn owns_mapping(&self, addr: u64) -> bool {
        self.maps.contains_key(&addr)
    }

    fn run(&mut self, req: &mut [u8]) -> Vec<u8> {
        let mut resp = vec![0u8; RESP_LEN];
        // SAFETY: `req` and `resp` are owned buffers that outlive `handle_command`, and
        // no reference to them is used while the regions are.
        let rr = [unsafe { IoRegion::new(req.as_mut_ptr(), req.len()) }];
        // SAFETY: as above.
        let wr = [unsafe { IoRegion::new(resp.as_mut_ptr(), resp.len()) }];
        let n = self
            .runner
            .handle_command(&mut ChainReader::new(&rr), &mut ChainWriter::new(&wr));
        resp.truncate(n);
        resp
    }

    /// Runs an IOCTL command; returns the status and the payload after the header.
    fn ioctl_raw(&mut self, session: u32, ioctl: V4l2Ioctl, payload: &[u8]) -> (u32, Vec<u8>) {
        let mut req = ioctl_cmd(session, ioctl, payload);
        let resp = self.run(&mut req);
        match RespHeader::read_from_prefix(&resp) {
            Ok((hdr, rest)) => (hdr.status, rest.to_vec()),
            Err(_) => (libc::EIO as u32, Vec::new()),
        }
    }

    fn ioctl_ok(
        &mut self,
        session: u32,
        ioctl: V4l2Ioctl,
        payload: &[u8],
    ) -> Result<Vec<u8>, Errno> {
        match self.ioctl_raw(session, ioctl, payload) {
            (0, body) => Ok(body),
            (e, _) => Err(e as Errno),
        }
    }

    /// `open()` of the device node: a new session; returns the client fd.
    pub fn open(&mut self, flags: i32) -> Result<RawFd, Errno> {
        let mut req = CmdHeader::new(MediaCmd::Open).as_bytes().to_vec();
        let resp = self.run(&mut req);
        let open: OpenResp = read_obj(&resp).or_else(|_| {
            let hdr: RespHeader = read_obj(&resp)?;
            Err(hdr.status as Errno)
        })?;
        if open.hdr.status != 0 {
            return Err(open.hdr.status as Errno);
        }
        let session = open.session_id;
        let efd_flags = if flags & libc::O_NONBLOCK != 0 {
            libc::EFD_NONBLOCK
        } else {
            0
        };
        // SAFETY: eventfd(2) has no memory arguments; a valid fd is owned below.
        let efd = unsafe { libc::eventfd(0, efd_flags | libc::EFD_CLOEXEC) };
        if efd < 0 {
            let e = crate::real::errno();
            self.runner.close(session);
            return Err(e);
        }
        // SAFETY: `efd` was just created and is owned by nothing else.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        let cloexec = flags & libc::O_CLOEXEC != 0;
        let cmd = if cloexec {
            libc::F_DUPFD_CLOEXEC
        } else {
            libc::F_DUPFD
        };
        // SAFETY: F_DUPFD(_CLOEXEC) duplicates a valid fd; no memory arguments.
        let fd = unsafe { libc::fcntl(eventfd.as_raw_fd(), cmd, 0) };
        if fd < 0 {
            let e = crate::real::errno();
            self.runner.close(session);
            return Err(e);
        }
        self.prios[PRIORITY_DEFAULT as usize] += 1;
        self.files.insert(
            session,
            OpenFile {
                eventfd,
                signalled: false,
                refs: 1,
                prio: PRIORITY_DEFAULT,
                queues: BTreeMap::new(),
                subscriptions: Vec::new(),
                events: VecDeque::new(),
                event_sequence: 0,
                failed: None,
            },
        );
        self.fds.insert(fd, session);
        Ok(fd)
    }

    /// A new client fd `new` duplicates `fd`.
    pub fn dup(&mut self, fd: RawFd, new: RawFd) {
        if let Some(&s) = self.fds.get(&fd) {
            self.fds.insert(new, s);
            if let Some(f) = self.files.get_mut(&s) {
                f.refs += 1;
            }
        }
    }

    /// `close()` of a client fd (the caller closes the fd itself).
    pub fn close(&mut self, fd: RawFd) {
        let Some(s) = self.fds.remove(&fd) else {
            return;
        };
        let Some(f) = self.files.get_mut(&s) else {
            return;
        };
        f.refs -= 1;
        if f.refs > 0 {
            return;
        }
        if let Some(f) = self.files.remove(&s) {
            self.prios[f.prio as usize] = self.prios[f.prio as usize].saturating_sub(1);
            if f.failed.is_none() {
                self.runner.close(s);
            }
        }
    }

    fn session(&self, fd: RawFd) -> Result<u32, Errno> {
        let s = *self.fds.get(&fd).ok_or(libc::EBADF)?;
        match self.files.get(&s) {
            Some(OpenFile {
                failed: Some(libc::ENODEV),
                ..
            }) => Err(libc::ENODEV),
            Some(f) if f.failed.is_some() => Err(libc::EIO),
            Some(_) => Ok(s),
            None => Err(libc::EBADF),
        }
    }

    fn file(&mut self, s: u32) -> Result<&mut OpenFile, Errno> {
        self.files.get_mut(&s).ok_or(libc::EBADF)
    }

    fn prio_max(&self) -> u32 {
        (1..=PRIORITY_RECORD)
            .rev()
            .find(|p| self.prios[*p as usize] > 0)
            .unwrap_or(0)
    }

    /// Lets the device run its timers and takes its events into the sessions' queues.
    pub fn pump(&mut self) {
        for (session, errno) in self.runner.process_ready_sessions() {
            self.events.clone().send_error(session, errno);
        }
        while let Some(ev) = self.events.pop() {
            let s = ev.session_id();
            let Some(f) = self.files.get_mut(&s) else {
                continue;
            };
            match ev {
                MediaEvent::Error(e) => {
                    // The driver closes a session the device gave up on.
                    f.failed = Some(e.errno as Errno);
                    self.runner.close(s);
                }
                MediaEvent::Dqbuf(e) => {
                    let Ok(mut b) = V4l2Buffer::read_from_bytes(&e.buffer) else {
                        continue;
                    };
                    let mut planes = Vec::new();
                    if is_multiplanar(b.type_) {
                        if b.length as usize > VIDEO_MAX_PLANES {
                            continue;
                        }
                        for p in e.planes.iter().take(b.length as usize) {
                            if let Ok(p) = V4l2Plane::read_from_bytes(p) {
                                planes.push(p);
                            }
                        }
                    }
                    b.flags |= BUF_FLAG_DONE;
                    let q = f.queue(b.type_);
                    q.queued = q.queued.saturating_sub(1);
                    q.pending.push_back((b, planes));
                }
                MediaEvent::Event(e) => {
                    let Ok(mut ev) = V4l2Event::read_from_bytes(&e.event) else {
                        continue;
                    };
                    if !f.subscriptions.contains(&(ev.type_, ev.id)) {
                        continue;
                    }
                    // Subscriptions hold one event: a newer one replaces it.
                    f.events.retain(|x| (x.type_, x.id) != (ev.type_, ev.id));
                    ev.sequence = f.event_sequence;
                    f.event_sequence = f.event_sequence.wrapping_add(1);
                    ev.timestamp = monotonic_now();
                    ev.reserved = [0; 8];
                    f.events.push_back(ev);
                }
            }
        }
        self.update_eventfds();
    }

    fn capture_type(&self) -> u32 {
        if self.device_caps & CAP_MPLANE_ANY != 0 {
            BUF_TYPE_VIDEO_CAPTURE_MPLANE
        } else {
            BUF_TYPE_VIDEO_CAPTURE
        }
    }

    fn update_eventfds(&mut self) {
        let cap = self.capture_type();
        for f in self.files.values_mut() {
            let want = f.queues.get(&cap).is_some_and(|q| !q.pending.is_empty());
            if want == f.signalled {
                continue;
            }
            let mut v: libc::eventfd_t = 1;
            // SAFETY: eventfd_write/read move one u64 through `v` on the stack; the
            // read only runs when the counter is non-zero, so it never blocks.
            let r = unsafe {
                if want {
                    libc::eventfd_write(f.eventfd.as_raw_fd(), v)
                } else {
                    libc::eventfd_read(f.eventfd.as_raw_fd(), &mut v)
                }
            };
            if r == 0 {
                f.signalled = want;
            }
        }
    }

    /// The `poll` mask of client fd `fd` for the requested events `req` (the Linux
    /// driver's poll: `POLLERR` for a capture queue that cannot produce, `POLLIN` for a
    /// done buffer, `POLLPRI` for a pending V4L2 event).
    pub fn poll_mask(&self, fd: RawFd, req: i16) -> i16 {
        let Some(f) = self.fds.get(&fd).and_then(|s| self.files.get(s)) else {
            return libc::POLLNVAL;
        };
        match f.failed {
            Some(libc::ENODEV) => return libc::POLLERR | libc::POLLHUP | libc::POLLPRI,
            Some(_) => return libc::POLLERR,
            None => {}
        }
        let mut rc = 0;
        let (cap, out) = if self.capture_type() == BUF_TYPE_VIDEO_CAPTURE_MPLANE {
            (BUF_TYPE_VIDEO_CAPTURE_MPLANE, BUF_TYPE_VIDEO_OUTPUT_MPLANE)
        } else {
            (BUF_TYPE_VIDEO_CAPTURE, BUF_TYPE_VIDEO_OUTPUT)
        };
        let empty = QueueState::default();
        if req & (libc::POLLIN | libc::POLLRDNORM) != 0 {
            let q = f.queues.get(&cap).unwrap_or(&empty);
            if !q.streaming || (q.queued == 0 && q.pending.is_empty()) {
                rc |= libc::POLLERR;
            } else if !q.pending.is_empty() {
                rc |= libc::POLLIN | libc::POLLRDNORM;
            }
        }
        if req & (libc::POLLOUT | libc::POLLWRNORM) != 0 {
            let q = f.queues.get(&out).unwrap_or(&empty);
            if !q.streaming {
                rc |= libc::POLLERR;
            } else if q.queued < q.allocated {
                rc |= libc::POLLOUT | libc::POLLWRNORM;
            }
        }
        if !f.events.is_empty() {
            rc |= libc::POLLPRI;
        }
        rc
    }

    /// `mmap()` of a client fd.
    pub fn mmap(
        &mut self,
        fd: RawFd,
        len: usize,
        prot: i32,
        flags: i32,
        offset: i64,
    ) -> Result<u64, Errno> {
        let s = self.session(fd)?;
        if flags & libc::MAP_SHARED == 0 || prot & (libc::PROT_READ | libc::PROT_WRITE) == 0 {
            return Err(libc::EINVAL);
        }
        let offset = u32::try_from(offset).map_err(|_| libc::EINVAL)?;
        if u64::from(offset) % PAGE != 0 || len == 0 {
            return Err(libc::EINVAL);
        }
        let cmd = MmapCmd {
            session_id: s,
            flags: if prot & libc::PROT_WRITE != 0 {
                MMAP_FLAG_RW
            } else {
                0
            },
            offset,
        };
        let mut req = CmdHeader::new(MediaCmd::Mmap).as_bytes().to_vec();
        req.extend_from_slice(cmd.as_bytes());
        let resp = self.run(&mut req);
        let r: MmapResp = read_obj(&resp).or_else(|_| {
            let hdr: RespHeader = read_obj(&resp)?;
            Err(hdr.status as Errno)
        })?;
        if r.hdr.status != 0 {
            return Err(r.hdr.status as Errno);
        }
        // The mapping may not be larger than the buffer.
        let want = (len as u64).div_ceil(PAGE) * PAGE;
        if want > r.len.div_ceil(PAGE) * PAGE {
            self.munmap_cmd(r.driver_addr);
            return Err(libc::EINVAL);
        }
        self.maps.insert(r.driver_addr, r.len);
        Ok(r.driver_addr)
    }

    fn munmap_cmd(&mut self, addr: u64) {
        let mut req = CmdHeader::new(MediaCmd::Munmap).as_bytes().to_vec();
        req.extend_from_slice(MunmapCmd { driver_addr: addr }.as_bytes());
        let resp = self.run(&mut req);
        if let Ok(hdr) = read_obj::<RespHeader>(&resp) {
            if hdr.status != 0 {
                eprintln!(
                    "outboard-v4l2-shim: MUNMAP {addr:#x} failed: errno {}",
                    hdr.status
                );
            }
        }
    }

    /// `munmap()` of a client mapping (the whole mapping goes, as the driver's VMA).
    pub fn munmap(&mut self, addr: u64) {
        if self.maps.remove(&addr).is_some() {
            self.munmap_cmd(addr);
        }
    }

    /// An ioctl on client fd `fd` other than DQBUF/DQEVENT (see [`Driver::dequeue`]).
    pub fn ioctl(&mut self, fd: RawFd, code: u32, arg: u64) -> Result<(), Errno> {
        use V4l2Ioctl::*;
        let s = self.session(fd)?;
        // Only full request codes of the V4L2 table are ioctls of a video node.
        let ioctl = match V4l2Ioctl::from_code(code) {
            Ok(i) if code > 0xff => i,
            _ => return Err(libc::ENOTTY),
        };
        if PRIO_CHECKED.contains(&ioctl) {
            let local = self.file(s)?.prio;
            if local < self.prio_max() {
                return Err(libc::EBUSY);
            }
        }
        match ioctl {
            VIDIOC_QUERYCAP => self.querycap(arg),
            VIDIOC_G_PRIORITY => user_write(arg, self.prio_max().as_bytes()),
            VIDIOC_S_PRIORITY => {
                let p: u32 = user_obj(arg)?;
                if !(1..=PRIORITY_RECORD).contains(&p) {
                    return Err(libc::EINVAL);
                }
                let f = self.file(s)?;
                let old = std::mem::replace(&mut f.prio, p);
                self.prios[old as usize] = self.prios[old as usize].saturating_sub(1);
                self.prios[p as usize] += 1;
                Ok(())
            }
            // Not implemented by the driver (no op): the V4L2 core answers ENOTTY.
            VIDIOC_LOG_STATUS
            | VIDIOC_G_FBUF
            | VIDIOC_S_FBUF
            | VIDIOC_OVERLAY
            | VIDIOC_EXPBUF
            | VIDIOC_G_EDID
            | VIDIOC_S_EDID
            | VIDIOC_G_JPEGCOMP
            | VIDIOC_S_JPEGCOMP
            | VIDIOC_DBG_G_REGISTER
            | VIDIOC_DBG_S_REGISTER
            | VIDIOC_DBG_G_CHIP_INFO => Err(libc::ENOTTY),
            VIDIOC_CROPCAP | VIDIOC_G_CROP | VIDIOC_S_CROP => self.crop(s, ioctl, arg),
            // Served by `dequeue`, which may wait without the lock.
            VIDIOC_DQBUF | VIDIOC_DQEVENT => Err(libc::EINVAL),
            VIDIOC_QBUF | VIDIOC_PREPARE_BUF | VIDIOC_QUERYBUF => self.buffer_ioctl(s, ioctl, arg),
            VIDIOC_G_EXT_CTRLS | VIDIOC_S_EXT_CTRLS | VIDIOC_TRY_EXT_CTRLS => {
                self.ext_ctrls(s, ioctl, arg)
            }
            VIDIOC_SUBSCRIBE_EVENT => {
                let sub: V4l2EventSubscription = user_obj(arg)?;
                let key = (sub.type_, sub.id);
                let f = self.file(s)?;
                let new = !f.subscriptions.contains(&key);
                if new {
                    f.subscriptions.push(key);
                }
                let r = self.plain(s, ioctl, arg);
                if r.is_err() && new {
                    self.file(s)?.subscriptions.retain(|k| *k != key);
                }
                // An initial event may already be waiting.
                self.pump();
                r
            }
            VIDIOC_UNSUBSCRIBE_EVENT => {
                let sub: V4l2EventSubscription = user_obj(arg)?;
                self.plain(s, ioctl, arg)?;
                let f = self.file(s)?;
                if sub.type_ == EVENT_ALL {
                    f.subscriptions.clear();
                    f.events.clear();
                } else {
                    f.subscriptions.retain(|k| *k != (sub.type_, sub.id));
                    f.events.retain(|e| (e.type_, e.id) != (sub.type_, sub.id));
                }
                Ok(())
            }
            _ => {
                self.plain(s, ioctl, arg)?;
                self.track(s, ioctl, arg);
                self.pump();
                Ok(())
            }
        }
    }

    /// Queue state the driver keeps after a successful ioctl.
    fn track(&mut self, s: u32, ioctl: V4l2Ioctl, arg: u64) {
        use V4l2Ioctl::*;
        let Ok(f) = self.file(s) else { return };
        match ioctl {
            VIDIOC_REQBUFS => {
                if let Ok(r) = user_obj::<V4l2Requestbuffers>(arg) {
                    let q = f.queue(r.type_);
                    q.allocated = r.count;
                    q.queued = 0;
                    q.pending.clear();
                    if r.count == 0 {
                        q.streaming = false;
                    }
                }
            }
            VIDIOC_CREATE_BUFS => {
                if let Ok(c) = user_obj::<V4l2CreateBuffers>(arg) {
                    let q = f.queue(c.format.type_);
                    q.allocated = q.allocated.saturating_add(c.count);
                }
            }
            VIDIOC_STREAMON => {
                if let Ok(t) = user_obj::<u32>(arg) {
                    f.queue(t).streaming = true;
                }
            }
            VIDIOC_STREAMOFF => {
                if let Ok(t) = user_obj::<u32>(arg) {
                    let q = f.queue(t);
                    q.streaming = false;
                    q.queued = 0;
                    q.pending.clear();
                }
            }
            _ => {}
        }
    }

    /// An ioctl whose argument is one fixed-size structure.
    fn plain(&mut self, s: u32, ioctl: V4l2Ioctl, arg: u64) -> Result<(), Errno> {
        let size = ioctl.arg_size();
        let payload = if ioctl.dir().has_input() {
            user_read(arg, size)?
        } else {
            vec![0u8; size]
        };
        let body = self.ioctl_ok(s, ioctl, &payload)?;
        if ioctl.dir().has_output() {
            let n = size.min(body.len());
            user_write(arg, &body[..n])?;
        }
        Ok(())
    }

    fn querycap(&mut self, arg: u64) -> Result<(), Errno> {
        let mut cap = [0u8; CAPABILITY_SIZE];
        let driver = self.driver_name.as_bytes();
        cap[..driver.len()].copy_from_slice(driver);
        let card = self.card.as_bytes();
        let n = card.len().min(31);
        cap[16..16 + n].copy_from_slice(&card[..n]);
        let bus = b"platform:virtio-media";
        cap[48..48 + bus.len()].copy_from_slice(bus);
        cap[80..84].copy_from_slice(&kernel_version().to_le_bytes());
        // The V4L2 core adds EXT_PIX_FORMAT to what the driver reports.
        let caps = self.device_caps | CAP_EXT_PIX_FORMAT;
        cap[84..88].copy_from_slice(&(caps | CAP_DEVICE_CAPS).to_le_bytes());
        cap[88..92].copy_from_slice(&caps.to_le_bytes());
        user_write(arg, &cap)
    }

    /// The crop ioctls, which the V4L2 core emulates with the selection API.
    fn crop(&mut self, s: u32, ioctl: V4l2Ioctl, arg: u64) -> Result<(), Errno> {
        // struct v4l2_crop: type, rect; struct v4l2_cropcap: type, bounds, defrect,
        // pixelaspect.
        let buf_type: u32 = user_obj(arg)?;
        let base = if buf_type == BUF_TYPE_VIDEO_OUTPUT || buf_type == BUF_TYPE_VIDEO_OUTPUT_MPLANE
        {
            SEL_TGT_COMPOSE
        } else {
            SEL_TGT_CROP
        };
        let get = |drv: &mut Self, target: u32| -> Result<V4l2Rect, Errno> {
            let sel = V4l2Selection {
                type_: buf_type,
                target,
                ..Default::default()
            };
            let body = drv.ioctl_ok(s, V4l2Ioctl::VIDIOC_G_SELECTION, sel.as_bytes())?;
            Ok(read_obj::<V4l2Selection>(&body)?.r)
        };
        match ioctl {
            V4l2Ioctl::VIDIOC_CROPCAP => {
                let bounds = get(self, base | SEL_TGT_CROP_BOUNDS)?;
                let def = get(self, base | SEL_TGT_CROP_DEFAULT)?;
                let mut out = buf_type.as_bytes().to_vec();
                out.extend_from_slice(bounds.as_bytes());
                out.extend_from_slice(def.as_bytes());
                out.extend_from_slice(1u32.as_bytes());
                out.extend_from_slice(1u32.as_bytes());
                user_write(arg, &out)
            }
            V4l2Ioctl::VIDIOC_G_CROP => {
                let r = get(self, base)?;
                user_write(arg + 4, r.as_bytes())
            }
            _ => {
                let r: V4l2Rect = user_obj(arg + 4)?;
                let sel = V4l2Selection {
                    type_: buf_type,
                    target: base,
                    r,
                    ..Default::default()
                };
                self.ioctl_ok(s, V4l2Ioctl::VIDIOC_S_SELECTION, sel.as_bytes())
                    .map(|_| ())
            }
        }
    }

    /// QBUF, PREPARE_BUF, QUERYBUF: the buffer, its planes (multi-planar) and the
    /// USERPTR SG lists go to the device; the device's answer is the client's, user
    /// pointers included (as the Linux driver copies it), but for the client's own
    /// planes pointer.
    fn buffer_ioctl(&mut self, s: u32, ioctl: V4l2Ioctl, arg: u64) -> Result<(), Errno> {
        let mut b: V4l2Buffer = user_obj(arg)?;
        if !is_valid_buf_type(b.type_) {
            return Err(libc::EINVAL);
        }
        let user_m = b.m;
        let mplane = is_multiplanar(b.type_);
        let mut planes: Vec<V4l2Plane> = Vec::new();
        if mplane {
            if b.length as usize > VIDEO_MAX_PLANES
                || (b.length == 0 && ioctl != V4l2Ioctl::VIDIOC_QUERYBUF)
            {
                return Err(libc::EINVAL);
            }
            let raw = user_read(b.m, b.length as usize * std::mem::size_of::<V4l2Plane>())?;
            for c in raw.chunks_exact(std::mem::size_of::<V4l2Plane>()) {
                planes.push(read_obj(c)?);
            }
        }
        let mut payload = b.as_bytes().to_vec();
        if ioctl != V4l2Ioctl::VIDIOC_QUERYBUF {
            for p in &planes {
                payload.extend_from_slice(p.as_bytes());
            }
            if b.memory == MEMORY_USERPTR {
                let ranges: Vec<(u64, u32)> = if mplane {
                    planes.iter().map(|p| (p.m, p.length)).collect()
                } else {
                    vec![(b.m, b.length)]
                };
                for (addr, len) in ranges.into_iter().filter(|(_, l)| *l > 0) {
                    for sg in user_sgs(addr, len)? {
                        payload.extend_from_slice(sg.as_bytes());
                    }
                }
            }
        }
        let body = self.ioctl_ok(s, ioctl, &payload)?;
        b = read_obj(&body)?;
        let size = std::mem::size_of::<V4l2Buffer>();
        if mplane {
            b.m = user_m;
            let mut out = Vec::new();
            // The device answers with its own plane count (at most the client's).
            let n = (b.length as usize).min(planes.len());
            for i in 0..n {
                let off = size + i * std::mem::size_of::<V4l2Plane>();
                let np: V4l2Plane = read_obj(body.get(off..).unwrap_or_default())?;
                out.extend_from_slice(np.as_bytes());
            }
            user_write(user_m, &out)?;
        }
        user_write(arg, b.as_bytes())?;
        if ioctl == V4l2Ioctl::VIDIOC_QBUF {
            let f = self.file(s)?;
            f.queue(b.type_).queued += 1;
        }
        Ok(())
    }

    fn ext_ctrls(&mut self, s: u32, ioctl: V4l2Ioctl, arg: u64) -> Result<(), Errno> {
        let hdr: V4l2ExtControls = user_obj(arg)?;
        if hdr.count > 1024 {
            return Err(libc::EINVAL);
        }
        let csize = std::mem::size_of::<V4l2ExtControl>();
        let user_ctrls = hdr.controls;
        let raw = user_read(user_ctrls, hdr.count as usize * csize)?;
        let mut ctrls: Vec<V4l2ExtControl> = Vec::new();
        for c in raw.chunks_exact(csize) {
            ctrls.push(read_obj(c)?);
        }
        let mut payload = hdr.as_bytes().to_vec();
        for c in &ctrls {
            payload.extend_from_slice(c.as_bytes());
        }
        for c in ctrls.iter().filter(|c| c.size > 0) {
            for sg in user_sgs(c.value64() as u64, c.size)? {
                payload.extend_from_slice(sg.as_bytes());
            }
        }
        let (status, body) = self.ioctl_raw(s, ioctl, &payload);
        // The answer (also on error, for error_idx): the header and the controls.
        if let Ok(mut h) = read_obj::<V4l2ExtControls>(&body) {
            h.controls = user_ctrls;
            let mut out = Vec::new();
            for (i, c) in ctrls.iter().enumerate() {
                let off = std::mem::size_of::<V4l2ExtControls>() + i * csize;
                let mut nc: V4l2ExtControl = body.get(off..).map(read_obj).unwrap_or(Ok(*c))?;
                if c.size > 0 {
                    nc.value = c.value;
                }
                out.extend_from_slice(nc.as_bytes());
            }
            user_write(user_ctrls, &out)?;
            user_write(arg, h.as_bytes())?;
        }
        if status != 0 {
            return Err(status as Errno);
        }
        Ok(())
    }

    /// One DQBUF or DQEVENT attempt on client fd `fd`; `nonblock` is the fd's
    /// `O_NONBLOCK`.
    pub fn dequeue(
        &mut self,
        fd: RawFd,
        ioctl: V4l2Ioctl,
        arg: u64,
        nonblock: bool,
    ) -> Result<Dequeue, Errno> {
        let s = self.session(fd)?;
        self.pump();
        if ioctl == V4l2Ioctl::VIDIOC_DQEVENT {
            let f = self.file(s)?;
            let Some(mut ev) = f.events.pop_front() else {
                return if nonblock {
                    Err(libc::ENOENT)
                } else {
                    Ok(Dequeue::Wait)
                };
            };
            ev.pending = f.events.len() as u32;
            user_write(arg, ev.as_bytes())?;
            self.update_eventfds();
            return Ok(Dequeue::Done);
        }
        let b: V4l2Buffer = user_obj(arg)?;
        if !is_valid_buf_type(b.type_) {
            return Err(libc::EINVAL);
        }
        let f = self.file(s)?;
        let q = f.queue(b.type_);
        let Some((mut done, planes)) = q.pending.pop_front() else {
            if nonblock {
                return Err(libc::EAGAIN);
            }
            if q.allocated == 0 || !q.streaming {
                return Err(libc::EINVAL);
            }
            return Ok(Dequeue::Wait);
        };
        done.flags &= !BUF_FLAG_DONE;
        if is_multiplanar(b.type_) {
            let n = (b.length as usize).min(VIDEO_MAX_PLANES).min(planes.len());
            let mut out = Vec::new();
            for p in &planes[..n] {
                out.extend_from_slice(p.as_bytes());
            }
            user_write(b.m, &out)?;
            done.m = b.m;
        }
        user_write(arg, done.as_bytes())?;
        self.update_eventfds();
        Ok(Dequeue::Done)
    }
}

#[cfg(test)]
mod tests {
    use outboard_devices::media::camera::{pix_format, SoftwareCamera, CARD_NAME};

    use super::*;
    use crate::memory::{ProcessMemory, ProcessShm};

    fn driver(mplane: bool) -> Driver {
        let events = EventBuffer::new();
        let cam = if mplane {
            SoftwareCamera::new_mplane(events.clone(), ProcessShm::default(), ProcessMemory)
        } else {
            SoftwareCamera::new(events.clone(), ProcessShm::default(), ProcessMemory)
        };
        let caps = cam.device_caps();
        Driver::new(cam, events, caps, CARD_NAME).unwrap()
    }

    fn ptr<T>(v: &mut T) -> u64 {
        v as *mut T as u64
    }

    #[test]
    fn driver_side_ioctls_follow_the_v4l2_core() {
        use V4l2Ioctl::*;
        let mut d = driver(true);
        let a = d.open(0).unwrap();
        let b = d.open(libc::O_NONBLOCK).unwrap();
        let mut cap = [0u8; CAPABILITY_SIZE];
        d.ioctl(a, VIDIOC_QUERYCAP.request_code(), ptr(&mut cap))
            .unwrap();
        assert!(cap.starts_with(b"virtio-media\0"));
        assert!(cap[16..].starts_with(CARD_NAME.as_bytes()));
        d.set_driver_name("a-rather-long-driver-name");
        d.ioctl(a, VIDIOC_QUERYCAP.request_code(), ptr(&mut cap))
            .unwrap();
        assert!(cap.starts_with(b"a-rather-long-d\0"));
        let device_caps = u32::from_le_bytes(cap[88..92].try_into().unwrap());
        assert_eq!(
            device_caps,
            CAP_VIDEO_CAPTURE_MPLANE | CAP_STREAMING | CAP_EXT_PIX_FORMAT
        );
        // Only full request codes are ioctls.
        assert_eq!(
            d.ioctl(a, VIDIOC_QUERYCAP.nr().into(), ptr(&mut cap)),
            Err(libc::ENOTTY)
        );
        assert_eq!(d.ioctl(a, 0x1234_5678, 0), Err(libc::ENOTTY));
        // A bad argument pointer is EFAULT.
        assert_eq!(
            d.ioctl(a, VIDIOC_QUERYCAP.request_code(), 8),
            Err(libc::EFAULT)
        );

        // Priorities: `a` records, so `b` may neither change settings nor its priority.
        let mut p: u32 = PRIORITY_RECORD;
        d.ioctl(a, VIDIOC_S_PRIORITY.request_code(), ptr(&mut p))
            .unwrap();
        let mut fmt = V4l2Format::from_pix(
            BUF_TYPE_VIDEO_CAPTURE_MPLANE,
            &pix_format(PIX_FMT_NV12, 320, 240),
        );
        assert_eq!(
            d.ioctl(b, VIDIOC_S_FMT.request_code(), ptr(&mut fmt)),
            Err(libc::EBUSY)
        );
        let mut p2: u32 = PRIORITY_DEFAULT;
        assert_eq!(
            d.ioctl(b, VIDIOC_S_PRIORITY.request_code(), ptr(&mut p2)),
            Err(libc::EBUSY)
        );
        let mut got: u32 = 0;
        d.ioctl(b, VIDIOC_G_PRIORITY.request_code(), ptr(&mut got))
            .unwrap();
        assert_eq!(got, PRIORITY_RECORD);
        let mut bad: u32 = 0;
        assert_eq!(
            d.ioctl(a, VIDIOC_S_PRIORITY.request_code(), ptr(&mut bad)),
            Err(libc::EINVAL)
        );
        // Closing `a` gives the device back.
        d.close(a);
        d.ioctl(b, VIDIOC_G_PRIORITY.request_code(), ptr(&mut got))
            .unwrap();
        assert_eq!(got, PRIORITY_DEFAULT);

        // Not streaming: POLLERR for readers, nothing to dequeue (non-blocking: EAGAIN).
        assert_eq!(d.poll_mask(b, libc::POLLIN), libc::POLLERR);
        assert_eq!(d.poll_mask(b, libc::POLLPRI), 0);
        let mut buf = V4l2Buffer {
            type_: BUF_TYPE_VIDEO_CAPTURE_MPLANE,
            ..Default::default()
        };
        assert!(matches!(
            d.dequeue(b, VIDIOC_DQBUF, ptr(&mut buf), true),
            Err(libc::EAGAIN)
        ));
        let mut ev = V4l2Event::default();
        assert!(matches!(
            d.dequeue(b, VIDIOC_DQEVENT, ptr(&mut ev), true),
            Err(libc::ENOENT)
        ));
        d.close(b);
        assert_eq!(d.poll_mask(b, libc::POLLIN), libc::POLLNVAL);
        assert_eq!(d.runner.session_count(), 0);
        for fd in [a, b] {
            // SAFETY: the client fds the driver created above, closed once.
            unsafe { crate::real::close()(fd) };
        }
    }
}
