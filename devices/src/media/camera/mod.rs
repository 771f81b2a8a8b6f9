//! A software capture camera: a deterministic moving test pattern in YUYV, NV12 and
//! RGB24, several frame sizes and intervals, brightness/contrast/hflip controls, MMAP
//! (memfd) and USERPTR (guest SG lists) memory.
//!
//! A camera serves one buffer type, which its `device_caps` advertise alone:
//! [`SoftwareCamera::new`] single-planar capture ([`DEVICE_CAPS`], [`FORMATS`]),
//! [`SoftwareCamera::new_mplane`] multi-planar capture ([`DEVICE_CAPS_MPLANE`],
//! [`FORMATS_MPLANE`]: the same formats as one plane each, plus NV12M in two planes and
//! YUV420M in three).
//!
//! # The pattern
//!
//! Frame `N` (its `v4l2_buffer.sequence`) has a top band of [`BAND_HEIGHT`] rows that
//! encodes `N` in 32 black/white cells, most significant bit first, and below it eight
//! colour bars scrolled right by `4 * N` pixels. [`render_frame`] draws a frame,
//! [`decode_frame_number`] reads `N` back, so a client can check any frame it receives.
//!
//! # Timing
//!
//! Every session has a timerfd (its poll fd) armed at the frame interval while
//! streaming. Each expiry produces one frame: the oldest queued buffer is filled, stamped
//! (`CLOCK_MONOTONIC`, start of exposure) and returned with a DQBUF event; when no buffer
//! is queued the frame is dropped and the sequence number still advances, as V4L2
//! requires.
//!
//! # Layout
//!
//! - `formats`: the format, size and interval tables, frame layouts, format negotiation;
//! - `pattern`: the test pattern renderer and decoder;
//! - `controls`: the controls and their events;
//! - `buffers`: the MMAP and USERPTR buffers of the capture queue and their caps;
//! - `handler`: the V4L2 ioctls, on top of the above;
//! - this module: the device and its sessions (timers, frame production, MMAP).

mod buffers;
mod controls;
mod formats;
mod handler;
mod pattern;

use std::collections::{BTreeSet, VecDeque};
use std::marker::PhantomData;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use rustix::time::{
    timerfd_create, timerfd_settime, Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags,
    Timespec as RxTimespec,
};

use outboard_protocol::media::MMAP_FLAG_RW;
use outboard_protocol::v4l2::*;

pub use buffers::{MAX_BUFFERS, MAX_SESSION_BUFFER_BYTES};
pub use formats::{
    frame_layout, pix_format, plane_layout, FORMATS, FORMATS_MPLANE, INTERVALS, SIZES,
};
pub use pattern::{decode_frame_number, render_frame, render_planes, Adjust, BAND_HEIGHT};

use super::ioctl::dispatch_ioctl;
use super::mappings::ShmMappings;
use super::{
    ChainReader, ChainWriter, Errno, EventQueue, GuestMemoryMapper, GuestMemoryRange,
    HostMemoryMapper, MediaDevice, MediaError, MediaEvent, MediaMetrics, MediaSession,
};
use buffers::{timespec_now, Backing, CamBuffer};
use controls::CTRLS;
use formats::FormatEntry;

/// The card name.
pub const CARD_NAME: &str = "Outboard software camera";
/// The `device_caps` the camera advertises (config space).
pub const DEVICE_CAPS: u32 = CAP_VIDEO_CAPTURE | CAP_STREAMING | CAP_EXT_PIX_FORMAT;
/// The `device_caps` of the multi-planar camera.
pub const DEVICE_CAPS_MPLANE: u32 = CAP_VIDEO_CAPTURE_MPLANE | CAP_STREAMING;

/// Per-session camera state.
pub struct CameraSession<M> {
    id: u32,
    buf_type: u32,
    pix: V4l2PixFormat,
    interval: (u32, u32),
    memory: u32,
    buffers: Vec<CamBuffer>,
    queue: VecDeque<u32>,
    streaming: bool,
    sequence: u32,
    timer: OwnedFd,
    ctrls: [i32; 3],
    subscriptions: Vec<V4l2EventSubscription>,
    event_sequence: u32,
    scratch: Vec<u8>,
    _mapping: PhantomData<fn() -> M>,
}

impl<M> std::fmt::Debug for CameraSession<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CameraSession")
            .field("id", &self.id)
            .field("streaming", &self.streaming)
            .field("buffers", &self.buffers.len())
            .finish()
    }
}

impl<M> MediaSession for CameraSession<M> {
    fn poll_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.timer.as_fd())
    }
}

impl<M> CameraSession<M> {
    fn adjust(&self) -> Adjust {
        Adjust {
            brightness: self.ctrls[0],
            contrast: self.ctrls[1],
            hflip: self.ctrls[2] != 0,
        }
    }

    fn arm_timer(&self, on: bool) -> Result<(), Errno> {
        let (num, den) = self.interval;
        let period_ns = u64::from(num) * 1_000_000_000 / u64::from(den.max(1));
        let ts = RxTimespec {
            tv_sec: (period_ns / 1_000_000_000) as i64,
            tv_nsec: (period_ns % 1_000_000_000) as i64,
        };
        let zero = RxTimespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let spec = Itimerspec {
            it_interval: if on { ts } else { zero },
            it_value: if on { ts } else { zero },
        };
        timerfd_settime(&self.timer, TimerfdTimerFlags::empty(), &spec)
            .map(|_| ())
            .map_err(|e| e.raw_os_error())
    }
}

/// The software camera device.
pub struct SoftwareCamera<E: EventQueue, H: HostMemoryMapper, G: GuestMemoryMapper> {
    events: E,
    host: H,
    guest: G,
    /// MMAP mappings in the shared memory region, each of a buffer index of a session.
    mappings: ShmMappings<u32>,
    /// Every format the camera can be set to: each of `formats()` at each of [`SIZES`],
    /// fourcc-major, with its G_FMT/S_FMT/TRY_FMT answer built once here rather than
    /// on every call.
    table: Box<[FormatEntry]>,
    /// The format (an index into `table`), shared by every session as V4L2 requires
    /// of a capture node.
    current: usize,
    /// The frame interval, shared likewise.
    interval: (u32, u32),
    /// Sessions that hold buffers (the format cannot change meanwhile).
    busy: BTreeSet<u32>,
    /// Serves `VIDEO_CAPTURE_MPLANE` instead of `VIDEO_CAPTURE`.
    mplane: bool,
    /// Where cap refusals are counted (the runner's, once attached).
    metrics: Arc<MediaMetrics>,
}

impl<E: EventQueue, H: HostMemoryMapper, G: GuestMemoryMapper> std::fmt::Debug
    for SoftwareCamera<E, H, G>
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftwareCamera")
            .field("mappings", &self.mappings)
            .finish()
    }
}

impl<E: EventQueue, H: HostMemoryMapper, G: GuestMemoryMapper> SoftwareCamera<E, H, G> {
    /// A single-planar camera sending events to `events`, mapping MMAP buffers with
    /// `host` and USERPTR buffers with `guest`.
    pub fn new(events: E, host: H, guest: G) -> Self {
        Self::with_mode(events, host, guest, false)
    }

    /// A multi-planar camera (see the module docs).
    pub fn new_mplane(events: E, host: H, guest: G) -> Self {
        Self::with_mode(events, host, guest, true)
    }

    fn with_mode(events: E, host: H, guest: G, mplane: bool) -> Self {
        let mut camera = SoftwareCamera {
            events,
            host,
            guest,
            mappings: ShmMappings::new("camera"),
            table: Box::default(),
            current: 0,
            interval: (1, 30),
            busy: BTreeSet::new(),
            mplane,
            metrics: Arc::default(),
        };
        let table: Vec<FormatEntry> = camera
            .formats()
            .iter()
            .flat_map(|(fourcc, _)| SIZES.iter().map(move |(w, h)| (*fourcc, *w, *h)))
            .map(|(fourcc, w, h)| {
                let pix = pix_format(fourcc, w, h);
                FormatEntry {
                    pix,
                    format: camera.format_of(&pix),
                }
            })
            .collect();
        camera.table = table.into_boxed_slice();
        camera.current = Self::format_index(0, 1);
        camera
    }

    /// The `device_caps` to advertise: [`DEVICE_CAPS`] or [`DEVICE_CAPS_MPLANE`].
    pub fn device_caps(&self) -> u32 {
        if self.mplane {
            DEVICE_CAPS_MPLANE
        } else {
            DEVICE_CAPS
        }
    }

    /// The host memory mapper.
    pub fn host_mapper(&self) -> &H {
        &self.host
    }

    /// Produces one frame now, as a timer expiry would (frame-accurate tests, benchmarks):
    /// fills the oldest queued buffer and sends its DQBUF event. Does nothing when the
    /// session is not streaming.
    pub fn capture_now(&mut self, session: &mut CameraSession<G>) {
        if session.streaming {
            self.produce_frame(session);
        }
    }

    /// Whether another session holds buffers: the one capture queue belongs to the
    /// session that allocated them until it frees them (V4L2's queue owner).
    fn busy_elsewhere(&self, id: u32) -> bool {
        self.busy.iter().any(|b| *b != id)
    }

    fn session_mapped(&self, id: u32) -> bool {
        self.mappings.session_has_mappings(id)
    }

    fn produce_frame(&mut self, s: &mut CameraSession<G>) {
        let sequence = s.sequence;
        s.sequence = s.sequence.wrapping_add(1);
        let Some(index) = s.queue.pop_front() else {
            return;
        };
        let adjust = s.adjust();
        let pix = s.pix;
        let (w, h, fourcc) = (pix.width, pix.height, pix.pixelformat);
        let planar = plane_layout(fourcc, w, h).is_some_and(|l| l.len() > 1);
        // One plane is drawn into the session's scratch buffer (no allocation per
        // frame); several are drawn and split by render_planes.
        let mut scratch = std::mem::take(&mut s.scratch);
        let mut split = Vec::new();
        let rendered = if planar {
            render_planes(fourcc, w, h, sequence, &adjust).map(|p| split = p)
        } else {
            scratch.resize(pix.sizeimage as usize, 0);
            render_frame(fourcc, w, h, sequence, &adjust, &mut scratch).map(|n| scratch.truncate(n))
        };
        let timestamp = timespec_now();
        let Some(b) = s.buffers.get_mut(index as usize) else {
            s.scratch = scratch;
            return;
        };
        let data: Vec<&[u8]> = if planar {
            split.iter().map(Vec::as_slice).collect()
        } else {
            vec![scratch.as_slice()]
        };
        let mut ok = rendered.is_some() && data.len() == b.planes.len();
        for (p, d) in b.planes.iter_mut().zip(&data) {
            let written = ok
                && match &p.backing {
                    Backing::Mmap { mem, .. } => mem.write_at(0, d).is_ok(),
                    Backing::UserPtr { sgs, .. } => self
                        .guest
                        .new_mapping(sgs)
                        .is_ok_and(|m| m.write_at(0, d) == d.len()),
                };
            ok &= written;
            p.bytesused = if written { d.len() as u32 } else { 0 };
        }
        if !ok {
            b.planes.iter_mut().for_each(|p| p.bytesused = 0);
        }
        s.scratch = scratch;
        b.queued = false;
        b.sequence = sequence;
        b.timestamp = timestamp;
        b.flags = if ok {
            BUF_FLAG_DONE
        } else {
            BUF_FLAG_DONE | BUF_FLAG_ERROR
        };
        if self.mappings.is_mapped(s.id, index) {
            b.flags |= BUF_FLAG_MAPPED;
        }
        if let Some(desc) = s.describe(index) {
            self.events
                .send_event(MediaEvent::dqbuf(s.id, &desc.buffer, &desc.planes));
        }
    }
}

impl<E: EventQueue, H: HostMemoryMapper, G: GuestMemoryMapper> MediaDevice
    for SoftwareCamera<E, H, G>
{
    type Session = CameraSession<G>;

    fn new_session(&mut self, session_id: u32) -> Result<Self::Session, Errno> {
        let timer = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )
        .map_err(|e| e.raw_os_error())?;
        Ok(CameraSession {
            id: session_id,
            buf_type: self.buf_type(),
            pix: self.pix(),
            interval: (1, 30),
            memory: 0,
            buffers: Vec::new(),
            queue: VecDeque::new(),
            streaming: false,
            sequence: 0,
            timer,
            ctrls: [CTRLS[0].default, CTRLS[1].default, CTRLS[2].default],
            subscriptions: Vec::new(),
            event_sequence: 0,
            scratch: Vec::new(),
            _mapping: PhantomData,
        })
    }

    fn close_session(&mut self, mut session: Self::Session) {
        self.mappings.unmap_session(&mut self.host, session.id);
        self.free_buffers(&mut session);
    }

    fn do_ioctl(
        &mut self,
        session: &mut Self::Session,
        ioctl: V4l2Ioctl,
        reader: &mut ChainReader<'_>,
        writer: &mut ChainWriter<'_>,
    ) -> Result<(), MediaError> {
        dispatch_ioctl(self, session, ioctl, reader, writer)
    }

    fn do_mmap(
        &mut self,
        s: &mut Self::Session,
        flags: u32,
        offset: u32,
    ) -> Result<(u64, u64), Errno> {
        let found = s.buffers.iter().enumerate().find_map(|(i, b)| {
            b.planes.iter().find_map(|p| match &p.backing {
                Backing::Mmap { mem: m, .. } if p.offset == u64::from(offset) => {
                    Some((i as u32, m))
                }
                _ => None,
            })
        });
        let Some((index, m)) = found else {
            return Err(libc::EINVAL);
        };
        let addr = self.mappings.map(
            &mut self.host,
            &self.metrics,
            s.id,
            index,
            m.as_fd(),
            m.size(),
            flags & MMAP_FLAG_RW != 0,
        )?;
        Ok((addr, m.size()))
    }

    fn do_munmap(&mut self, driver_addr: u64) -> Result<(), Errno> {
        self.mappings.unmap(&mut self.host, driver_addr)
    }

    fn attach_metrics(&mut self, metrics: Arc<MediaMetrics>) {
        self.metrics = metrics;
    }

    fn process_events(&mut self, s: &mut Self::Session) -> Result<(), Errno> {
        let mut buf = [0u8; 8];
        let expirations = match rustix::io::read(&s.timer, &mut buf) {
            Ok(8) => u64::from_ne_bytes(buf),
            Ok(_) => 0,
            Err(rustix::io::Errno::AGAIN) => 0,
            Err(e) => return Err(e.raw_os_error()),
        };
        if !s.streaming {
            return Ok(());
        }
        // A late wake-up drops the missed frames (their sequence numbers are skipped).
        for _ in 0..expirations.min(u64::from(MAX_BUFFERS)) {
            self.produce_frame(s);
        }
        Ok(())
    }
}
