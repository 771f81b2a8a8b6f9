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

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::marker::PhantomData;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use rustix::time::{
    clock_gettime, timerfd_create, timerfd_settime, ClockId, Itimerspec, TimerfdClockId,
    TimerfdFlags, TimerfdTimerFlags, Timespec as RxTimespec,
};
use zerocopy::IntoBytes;

use super::ioctl::{
    dispatch_ioctl, BufferDesc, ExtControls, GuestBuffer, IoctlHandler, IoctlResult,
};
use super::memfd::MemfdBuffer;
use super::v4l2::*;
use super::{
    page_align, ChainReader, ChainWriter, Errno, EventQueue, GuestMemoryMapper, GuestMemoryRange,
    HostMemoryMapper, MediaDevice, MediaError, MediaEvent, MediaMetrics, MediaSession,
    MAX_MAPPINGS,
};
use outboard_protocol::media::{SgEntry, MMAP_FLAG_RW};
use outboard_protocol::v4l2::V4l2Ioctl;

/// The card name.
pub const CARD_NAME: &str = "Outboard software camera";
/// The `device_caps` the camera advertises (config space).
pub const DEVICE_CAPS: u32 = CAP_VIDEO_CAPTURE | CAP_STREAMING | CAP_EXT_PIX_FORMAT;
/// The `device_caps` of the multi-planar camera.
pub const DEVICE_CAPS_MPLANE: u32 = CAP_VIDEO_CAPTURE_MPLANE | CAP_STREAMING;
/// Pixel formats of the single-planar camera and their descriptions.
pub const FORMATS: [(u32, &str); 3] = [
    (PIX_FMT_YUYV, "YUYV 4:2:2"),
    (PIX_FMT_NV12, "Y/CbCr 4:2:0"),
    (PIX_FMT_RGB24, "24-bit RGB 8-8-8"),
];
/// Pixel formats of the multi-planar camera and their descriptions.
pub const FORMATS_MPLANE: [(u32, &str); 5] = [
    (PIX_FMT_YUYV, "YUYV 4:2:2"),
    (PIX_FMT_NV12, "Y/CbCr 4:2:0"),
    (PIX_FMT_RGB24, "24-bit RGB 8-8-8"),
    (PIX_FMT_NV12M, "Y/CbCr 4:2:0 (N-C)"),
    (PIX_FMT_YUV420M, "Planar YUV 4:2:0 (N-C)"),
];
/// Supported frame sizes.
pub const SIZES: [(u32, u32); 3] = [(320, 240), (640, 480), (1280, 720)];
/// Supported frame intervals (seconds per frame), fastest first.
pub const INTERVALS: [(u32, u32); 3] = [(1, 60), (1, 30), (1, 15)];
/// Most buffers a session may allocate (`VIDEO_MAX_FRAME`): `REQBUFS` and
/// `CREATE_BUFS` counts are cut down to it, as vb2 does, and a `CREATE_BUFS` on a full
/// queue is refused with `ENOBUFS`.
pub const MAX_BUFFERS: u32 = 32;
/// Most MMAP buffer memory (memfds, page-rounded) a session may hold: 256 MiB. A full
/// queue of the largest frame (1280x720 RGB24, 2.7 MiB) needs 85 MiB; the rest leaves
/// `CREATE_BUFS` room for larger buffers. Counts are cut down to what fits, and a
/// request of which nothing fits is refused with `ENOMEM`. The memfds are host memory
/// the guest can fill through its mappings, hence a cap below the 4 GiB that the
/// 32-bit `mem_offset`s could address.
pub const MAX_SESSION_BUFFER_BYTES: u64 = 256 << 20;
/// Height of the frame-number band at the top of every frame.
pub const BAND_HEIGHT: u32 = 16;

/// `V4L2_EVENT_CTRL_CH_VALUE`.
const EVENT_CTRL_CH_VALUE: u32 = 1;
/// `V4L2_EVENT_CTRL_CH_FLAGS`.
const EVENT_CTRL_CH_FLAGS: u32 = 2;
/// `V4L2_EVENT_SUB_FL_SEND_INITIAL`.
const EVENT_SUB_FL_SEND_INITIAL: u32 = 1;
/// `V4L2_EVENT_SUB_FL_ALLOW_FEEDBACK`.
const EVENT_SUB_FL_ALLOW_FEEDBACK: u32 = 2;

/// A camera control: id, name, type, min, max, step, default.
struct Ctrl {
    id: u32,
    name: &'static str,
    type_: u32,
    min: i32,
    max: i32,
    step: i32,
    default: i32,
    flags: u32,
}

/// `V4L2_CID_USER_CLASS`: the class control every control class needs.
const CID_USER_CLASS: u32 = CTRL_CLASS_USER | 1;
/// `V4L2_CTRL_TYPE_CTRL_CLASS`.
const CTRL_TYPE_CTRL_CLASS: u32 = 6;
/// `V4L2_CTRL_FLAG_READ_ONLY`.
const CTRL_FLAG_READ_ONLY: u32 = 0x4;
/// `V4L2_CTRL_FLAG_SLIDER`.
const CTRL_FLAG_SLIDER: u32 = 0x20;
/// `V4L2_CTRL_FLAG_WRITE_ONLY`.
const CTRL_FLAG_WRITE_ONLY: u32 = 0x40;
/// `V4L2_PIX_FMT_PRIV_MAGIC`: the extended `v4l2_pix_format` fields are valid.
const PIX_FMT_PRIV_MAGIC: u32 = 0xfeed_cafe;

/// The user class control, listed by the control queries but neither readable nor
/// writable.
const USER_CLASS: Ctrl = Ctrl {
    id: CID_USER_CLASS,
    name: "User Controls",
    type_: CTRL_TYPE_CTRL_CLASS,
    min: 0,
    max: 0,
    step: 0,
    default: 0,
    flags: CTRL_FLAG_READ_ONLY | CTRL_FLAG_WRITE_ONLY,
};

const CTRLS: [Ctrl; 3] = [
    Ctrl {
        id: CID_BRIGHTNESS,
        name: "Brightness",
        type_: CTRL_TYPE_INTEGER,
        min: 0,
        max: 255,
        step: 1,
        default: 128,
        flags: CTRL_FLAG_SLIDER,
    },
    Ctrl {
        id: CID_CONTRAST,
        name: "Contrast",
        type_: CTRL_TYPE_INTEGER,
        min: 0,
        max: 255,
        step: 1,
        default: 128,
        flags: CTRL_FLAG_SLIDER,
    },
    Ctrl {
        id: CID_HFLIP,
        name: "Horizontal Flip",
        type_: CTRL_TYPE_BOOLEAN,
        min: 0,
        max: 1,
        step: 1,
        default: 0,
        flags: 0,
    },
];

fn ctrl_index(id: u32) -> Option<usize> {
    CTRLS.iter().position(|c| c.id == id)
}

/// Bytes per line and image size of a frame, or `None` for an unsupported format or
/// odd dimensions.
pub fn frame_layout(fourcc: u32, width: u32, height: u32) -> Option<(u32, u32)> {
    if width == 0 || height == 0 || (width | height) & 1 != 0 {
        return None;
    }
    let (bpl, size) = match fourcc {
        PIX_FMT_YUYV => (
            width.checked_mul(2)?,
            width.checked_mul(2)?.checked_mul(height)?,
        ),
        PIX_FMT_NV12 => (width, width.checked_mul(height)?.checked_mul(3)? / 2),
        PIX_FMT_RGB24 => (
            width.checked_mul(3)?,
            width.checked_mul(3)?.checked_mul(height)?,
        ),
        _ => return None,
    };
    Some((bpl, size))
}

/// Bytes per line and size of each memory plane of a frame, or `None` for an
/// unsupported format or odd dimensions. NV12M and YUV420M have 2 and 3 planes, every
/// other format 1 (as [`frame_layout`]).
pub fn plane_layout(fourcc: u32, width: u32, height: u32) -> Option<Vec<(u32, u32)>> {
    let (luma_bpl, size) = frame_layout(PIX_FMT_NV12, width, height)?;
    let luma = width.checked_mul(height)?;
    match fourcc {
        PIX_FMT_NV12M => Some(vec![(luma_bpl, luma), (luma_bpl, size - luma)]),
        PIX_FMT_YUV420M => Some(vec![
            (luma_bpl, luma),
            (width / 2, luma / 4),
            (width / 2, luma / 4),
        ]),
        _ => frame_layout(fourcc, width, height).map(|l| vec![l]),
    }
}

/// Draws frame `frame` as its memory planes (see [`plane_layout`]).
pub fn render_planes(
    fourcc: u32,
    width: u32,
    height: u32,
    frame: u32,
    a: &Adjust,
) -> Option<Vec<Vec<u8>>> {
    let contiguous = match fourcc {
        PIX_FMT_NV12M | PIX_FMT_YUV420M => PIX_FMT_NV12,
        other => other,
    };
    let (_, size) = frame_layout(contiguous, width, height)?;
    let mut buf = vec![0u8; size as usize];
    render_frame(contiguous, width, height, frame, a, &mut buf)?;
    let luma = (width * height) as usize;
    Some(match fourcc {
        PIX_FMT_NV12M => {
            let chroma = buf.split_off(luma);
            vec![buf, chroma]
        }
        PIX_FMT_YUV420M => {
            let chroma = buf.split_off(luma);
            let u = chroma.iter().step_by(2).copied().collect();
            let v = chroma.iter().skip(1).step_by(2).copied().collect();
            vec![buf, u, v]
        }
        _ => vec![buf],
    })
}

/// Picture adjustments applied to the pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Adjust {
    /// Brightness, 0..=255 (128 = neutral).
    pub brightness: i32,
    /// Contrast, 0..=255 (128 = neutral).
    pub contrast: i32,
    /// Mirror the bars horizontally.
    pub hflip: bool,
}

impl Default for Adjust {
    fn default() -> Self {
        Adjust {
            brightness: 128,
            contrast: 128,
            hflip: false,
        }
    }
}

const BARS: [[u8; 3]; 8] = [
    [255, 255, 255],
    [255, 255, 0],
    [0, 255, 255],
    [0, 255, 0],
    [255, 0, 255],
    [255, 0, 0],
    [0, 0, 255],
    [0, 0, 0],
];

fn adjust(v: u8, a: &Adjust) -> u8 {
    let v = (i32::from(v) - 128) * a.contrast / 128 + 128 + (a.brightness - 128);
    v.clamp(0, 255) as u8
}

/// The RGB of pixel `x` of the band row and of a bar row of frame `frame`.
fn pattern_rows(width: u32, frame: u32, a: &Adjust) -> (Vec<[u8; 3]>, Vec<[u8; 3]>) {
    let cell = (width / 32).max(1);
    let shift = (u64::from(frame) * 4 % u64::from(width)) as u32;
    let mut band = Vec::with_capacity(width as usize);
    let mut bars = Vec::with_capacity(width as usize);
    for x in 0..width {
        let bit = (x / cell).min(31);
        let on = frame >> (31 - bit) & 1 == 1;
        let v = if on { 255 } else { 0 };
        band.push([v; 3]);
        let xs = if a.hflip { width - 1 - x } else { x };
        let pos = (xs + width - shift) % width;
        let bar = BARS[(pos * 8 / width) as usize % 8];
        bars.push(bar.map(|c| adjust(c, a)));
    }
    (band, bars)
}

fn yuv(p: [u8; 3]) -> (u8, u8, u8) {
    let (r, g, b) = (i32::from(p[0]), i32::from(p[1]), i32::from(p[2]));
    let y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16;
    let u = ((-38 * r - 74 * g + 112 * b + 128) >> 8) + 128;
    let v = ((112 * r - 94 * g - 18 * b + 128) >> 8) + 128;
    (y as u8, u as u8, v as u8)
}

/// Draws frame `frame` into `dst` (at least [`frame_layout`]'s size bytes). Returns the
/// number of bytes written, or `None` for an unsupported layout or a short `dst`.
pub fn render_frame(
    fourcc: u32,
    width: u32,
    height: u32,
    frame: u32,
    a: &Adjust,
    dst: &mut [u8],
) -> Option<usize> {
    let (bpl, size) = frame_layout(fourcc, width, height)?;
    let (bpl, size) = (bpl as usize, size as usize);
    let dst = dst.get_mut(..size)?;
    let (band, bars) = pattern_rows(width, frame, a);
    let band_rows = BAND_HEIGHT.min(height) as usize;
    match fourcc {
        PIX_FMT_RGB24 | PIX_FMT_YUYV => {
            let encode = |src: &[[u8; 3]], row: &mut [u8]| {
                if fourcc == PIX_FMT_RGB24 {
                    for (d, p) in row.chunks_exact_mut(3).zip(src) {
                        d.copy_from_slice(p);
                    }
                } else {
                    for (d, p) in row.chunks_exact_mut(4).zip(src.chunks_exact(2)) {
                        let (y0, u, v) = yuv(p[0]);
                        let (y1, _, _) = yuv(p[1]);
                        d.copy_from_slice(&[y0, u, y1, v]);
                    }
                }
            };
            let (top, rest) = dst.split_at_mut(band_rows * bpl);
            for (src, area) in [(&band, top), (&bars, rest)] {
                if area.is_empty() {
                    continue;
                }
                let (first, others) = area.split_at_mut(bpl);
                encode(src, first);
                for row in others.chunks_exact_mut(bpl) {
                    row.copy_from_slice(first);
                }
            }
        }
        PIX_FMT_NV12 => {
            // Rows repeat within the band and within the bars: convert one luma and one
            // chroma row of each, then copy.
            let luma_row = |src: &[[u8; 3]]| src.iter().map(|p| yuv(*p).0).collect::<Vec<u8>>();
            let chroma_row = |src: &[[u8; 3]]| {
                src.chunks_exact(2)
                    .flat_map(|p| {
                        let (_, u, v) = yuv(p[0]);
                        [u, v]
                    })
                    .collect::<Vec<u8>>()
            };
            let (band_y, bars_y) = (luma_row(&band), luma_row(&bars));
            let (band_uv, bars_uv) = (chroma_row(&band), chroma_row(&bars));
            let (luma, chroma) = dst.split_at_mut(bpl * height as usize);
            for (y, row) in luma.chunks_exact_mut(bpl).enumerate() {
                row.copy_from_slice(if y < band_rows { &band_y } else { &bars_y });
            }
            for (cy, row) in chroma.chunks_exact_mut(bpl).enumerate() {
                row.copy_from_slice(if cy * 2 < band_rows {
                    &band_uv
                } else {
                    &bars_uv
                });
            }
        }
        _ => return None,
    }
    Some(size)
}

/// Reads the frame number back from a frame drawn by [`render_frame`] (with neutral
/// brightness and contrast).
///
/// For NV12M and YUV420M, `data` is the first (luma) plane.
pub fn decode_frame_number(fourcc: u32, width: u32, height: u32, data: &[u8]) -> Option<u32> {
    let (fourcc, (bpl, size)) = match fourcc {
        PIX_FMT_NV12M | PIX_FMT_YUV420M => (
            PIX_FMT_NV12,
            plane_layout(fourcc, width, height)?.first().copied()?,
        ),
        _ => (fourcc, frame_layout(fourcc, width, height)?),
    };
    let data = data.get(..size as usize)?;
    let row = (BAND_HEIGHT.min(height) / 2) as usize * bpl as usize;
    let cell = (width / 32).max(1);
    let mut n = 0u32;
    for bit in 0..32 {
        let x = (bit * cell + cell / 2) as usize;
        let luma = match fourcc {
            PIX_FMT_YUYV => *data.get(row + x * 2)?,
            PIX_FMT_NV12 => *data.get(row + x)?,
            _ => *data.get(row + x * 3)?,
        };
        n = n << 1 | u32::from(luma > 128);
    }
    Some(n)
}

fn timespec_now() -> Timeval {
    let t = clock_gettime(ClockId::Monotonic);
    Timeval {
        tv_sec: t.tv_sec,
        tv_usec: t.tv_nsec / 1000,
    }
}

/// Where a buffer's memory lives.
enum Backing {
    /// A memfd (MMAP memory), page-rounded, and the plane length the buffer was
    /// allocated for (what `QUERYBUF` reports, as vb2 reports the size `REQBUFS` or
    /// `CREATE_BUFS` asked for, not the page-rounded allocation).
    Mmap { mem: MemfdBuffer, length: u32 },
    /// Guest memory (USERPTR): the SG list the guest queued the buffer with. It is
    /// mapped when a frame is written (within one device call, as guest memory
    /// translations must be), not held across calls.
    UserPtr {
        sgs: Vec<SgEntry>,
        userptr: u64,
        length: u32,
    },
}

/// One memory plane of a buffer.
struct PlaneBuf {
    backing: Backing,
    /// `mem_offset` of MMAP planes (buffers may differ in size: CREATE_BUFS).
    offset: u64,
    bytesused: u32,
}

impl PlaneBuf {
    fn length(&self) -> u32 {
        match &self.backing {
            Backing::Mmap { length, .. } | Backing::UserPtr { length, .. } => *length,
        }
    }

    fn m(&self) -> u64 {
        match &self.backing {
            Backing::Mmap { .. } => self.offset,
            Backing::UserPtr { userptr, .. } => *userptr,
        }
    }
}

struct CamBuffer {
    planes: Vec<PlaneBuf>,
    queued: bool,
    sequence: u32,
    timestamp: Timeval,
    flags: u32,
}

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

    fn describe(&self, index: u32) -> Option<BufferDesc> {
        let b = self.buffers.get(index as usize)?;
        let mut buffer = V4l2Buffer {
            index,
            type_: self.buf_type,
            flags: b.flags | BUF_FLAG_TIMESTAMP_MONOTONIC | BUF_FLAG_TSTAMP_SRC_SOE,
            field: FIELD_NONE,
            timestamp: b.timestamp,
            sequence: b.sequence,
            memory: self.memory,
            ..Default::default()
        };
        if b.queued {
            buffer.flags |= BUF_FLAG_QUEUED;
        }
        let mut planes = Vec::new();
        if is_multiplanar(self.buf_type) {
            buffer.length = b.planes.len() as u32;
            planes = b
                .planes
                .iter()
                .map(|p| V4l2Plane {
                    bytesused: p.bytesused,
                    length: p.length(),
                    m: p.m(),
                    ..Default::default()
                })
                .collect();
        } else {
            let p = b.planes.first()?;
            buffer.bytesused = p.bytesused;
            buffer.length = p.length();
            buffer.m = p.m();
        }
        Some(BufferDesc {
            buffer,
            planes,
            ..Default::default()
        })
    }
}

/// A format the camera can be set to and its answer to the format ioctls.
struct FormatEntry {
    /// The single-planar form (the layout frames are rendered in).
    pix: V4l2PixFormat,
    /// As the served buffer type shows it.
    format: V4l2Format,
}

/// The software camera device.
pub struct SoftwareCamera<E: EventQueue, H: HostMemoryMapper, G: GuestMemoryMapper> {
    events: E,
    host: H,
    guest: G,
    /// Shared memory offset -> (session, buffer index).
    mappings: BTreeMap<u64, (u32, u32)>,
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
            mappings: BTreeMap::new(),
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

    /// Index in `table` of format `fourcc_index` of `formats()` at `SIZES[size_index]`.
    fn format_index(fourcc_index: usize, size_index: usize) -> usize {
        fourcc_index * SIZES.len() + size_index
    }

    /// The current format.
    fn current(&self) -> &FormatEntry {
        // `current` is only ever set to an index `snap_format` found in `table`.
        &self.table[self.current]
    }

    /// The current single-planar format (the layout frames are rendered in).
    fn pix(&self) -> V4l2PixFormat {
        self.current().pix
    }

    /// The `device_caps` to advertise: [`DEVICE_CAPS`] or [`DEVICE_CAPS_MPLANE`].
    pub fn device_caps(&self) -> u32 {
        if self.mplane {
            DEVICE_CAPS_MPLANE
        } else {
            DEVICE_CAPS
        }
    }

    /// The one buffer type served.
    fn buf_type(&self) -> u32 {
        if self.mplane {
            BUF_TYPE_VIDEO_CAPTURE_MPLANE
        } else {
            BUF_TYPE_VIDEO_CAPTURE
        }
    }

    fn formats(&self) -> &'static [(u32, &'static str)] {
        if self.mplane {
            &FORMATS_MPLANE
        } else {
            &FORMATS
        }
    }

    /// The format as the served buffer type shows it.
    fn format_of(&self, pix: &V4l2PixFormat) -> V4l2Format {
        if !self.mplane {
            return V4l2Format::from_pix(BUF_TYPE_VIDEO_CAPTURE, pix);
        }
        let mut mp = V4l2PixFormatMplane {
            width: pix.width,
            height: pix.height,
            pixelformat: pix.pixelformat,
            field: pix.field,
            colorspace: pix.colorspace,
            ycbcr_enc: pix.ycbcr_enc as u8,
            quantization: pix.quantization as u8,
            xfer_func: pix.xfer_func as u8,
            ..Default::default()
        };
        let layout = plane_layout(pix.pixelformat, pix.width, pix.height).unwrap_or_default();
        mp.num_planes = layout.len() as u8;
        for (dst, (bpl, size)) in mp.plane_fmt.iter_mut().zip(layout) {
            dst.bytesperline = bpl;
            dst.sizeimage = size;
        }
        V4l2Format::from_pix_mp(BUF_TYPE_VIDEO_CAPTURE_MPLANE, &mp)
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
        self.mappings.values().any(|(s, _)| *s == id)
    }

    /// The supported format nearest to `f` (unknown pixel formats become YUYV, sizes
    /// snap to the nearest of [`SIZES`]), as an index into `table`.
    #[inline]
    fn snap_format(&self, f: &V4l2Format) -> IoctlResult<usize> {
        if f.type_ != self.buf_type() {
            return Err(libc::EINVAL);
        }
        // `v4l2_pix_format` and `v4l2_pix_format_mplane` both begin with width, height
        // and pixelformat: read just those rather than either whole structure.
        // One u32 at a time: a single 12-byte read compiled to a load straddling two
        // stores of the copied payload (a store-forwarding stall on every S_FMT).
        let word = |i: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&f.fmt[4 * i..4 * i + 4]);
            u32::from_ne_bytes(b)
        };
        let (width, height, fourcc) = (word(0), word(1), word(2));
        // YUYV is the first entry of both format lists.
        let fi = self
            .formats()
            .iter()
            .position(|(c, _)| *c == fourcc)
            .unwrap_or(0);
        let si = match SIZES.iter().position(|s| *s == (width, height)) {
            Some(i) => i,
            None => SIZES
                .iter()
                .enumerate()
                .min_by_key(|(_, (w, h))| {
                    u64::from(w.abs_diff(width)) + u64::from(h.abs_diff(height))
                })
                .map_or(1, |(i, _)| i),
        };
        // Below `formats().len() * SIZES.len()`, the length of `table`.
        Ok(Self::format_index(fi, si))
    }

    fn send_ctrl_event(&mut self, s: &mut CameraSession<G>, idx: usize, changes: u32) {
        let Some(c) = CTRLS.get(idx) else { return };
        if !s
            .subscriptions
            .iter()
            .any(|sub| sub.type_ == EVENT_CTRL && sub.id == c.id)
        {
            return;
        }
        let mut ev = V4l2Event {
            type_: EVENT_CTRL,
            id: c.id,
            sequence: s.event_sequence,
            ..Default::default()
        };
        s.event_sequence = s.event_sequence.wrapping_add(1);
        let t = clock_gettime(ClockId::Monotonic);
        ev.timestamp = Timespec {
            tv_sec: t.tv_sec,
            tv_nsec: t.tv_nsec,
        };
        // struct v4l2_event_ctrl: changes, type, value (8), flags, min, max, step, default.
        let words: [i32; 10] = [
            changes as i32,
            c.type_ as i32,
            s.ctrls[idx],
            0,
            0,
            c.min,
            c.max,
            c.step,
            c.default,
            0,
        ];
        ev.u[..40].copy_from_slice(words.as_bytes());
        self.events.send_event(MediaEvent::v4l2(s.id, &ev));
    }

    fn set_ctrl(&mut self, s: &mut CameraSession<G>, idx: usize, value: i32) {
        let Some(c) = CTRLS.get(idx) else { return };
        let v = value.clamp(c.min, c.max);
        if s.ctrls[idx] != v {
            s.ctrls[idx] = v;
            self.send_ctrl_event(s, idx, EVENT_CTRL_CH_VALUE);
        }
    }

    fn ext_ctrls(
        &mut self,
        s: &mut CameraSession<G>,
        ctrls: &mut ExtControls,
        op: ExtOp,
    ) -> IoctlResult<()> {
        let which = ctrls.header.which;
        let by_class = which & 0xffff != 0 || which == CTRL_CLASS_USER;
        let valid_which = which == CTRL_WHICH_CUR_VAL
            || (which == CTRL_WHICH_DEF_VAL && op == ExtOp::Get)
            || (by_class && which & 0xffff == 0 && which < CTRL_WHICH_DEF_VAL);
        if !valid_which {
            ctrls.header.error_idx = ctrls.header.count;
            return Err(libc::EINVAL);
        }
        let mut idxs = Vec::with_capacity(ctrls.controls.len());
        for (i, c) in ctrls.controls.iter().enumerate() {
            if c.id == CID_USER_CLASS {
                // Write-only for G, read-only for S/TRY: the V4L2 core reports this
                // with error_idx == count, except TRY, which names the control.
                ctrls.header.error_idx = if op == ExtOp::Try {
                    i as u32
                } else {
                    ctrls.header.count
                };
                return Err(libc::EACCES);
            }
            match ctrl_index(c.id) {
                Some(idx) if c.size == 0 => idxs.push(idx),
                _ => {
                    ctrls.header.error_idx = if op == ExtOp::Try {
                        i as u32
                    } else {
                        ctrls.header.count
                    };
                    return Err(libc::EINVAL);
                }
            }
        }
        for (c, idx) in ctrls.controls.iter_mut().zip(idxs) {
            let def = &CTRLS[idx];
            match op {
                ExtOp::Get if which == CTRL_WHICH_DEF_VAL => c.set_value(def.default),
                ExtOp::Get => c.set_value(s.ctrls[idx]),
                ExtOp::Try => c.set_value(c.value().clamp(def.min, def.max)),
                ExtOp::Set => {
                    let v = c.value().clamp(def.min, def.max);
                    c.set_value(v);
                    self.set_ctrl(s, idx, v);
                }
            }
        }
        Ok(())
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
        if self.mappings.values().any(|m| *m == (s.id, index)) {
            b.flags |= BUF_FLAG_MAPPED;
        }
        if let Some(desc) = s.describe(index) {
            self.events
                .send_event(MediaEvent::dqbuf(s.id, &desc.buffer, &desc.planes));
        }
    }

    fn free_buffers(&mut self, s: &mut CameraSession<G>) {
        self.busy.remove(&s.id);
        s.buffers.clear();
        s.queue.clear();
    }
}

/// Appends up to `count` buffers with planes of `sizes` bytes; returns how many were
/// added. At most [`MAX_BUFFERS`] buffers and [`MAX_SESSION_BUFFER_BYTES`] of MMAP
/// memory in all: a request is cut down to what fits (counted in `metrics`), and one of
/// which nothing fits is refused (`ENOBUFS` for a full queue, `ENOMEM` for memory).
/// MMAP planes get consecutive page-aligned offsets, which must fit the 32-bit
/// `mem_offset`.
fn add_buffers<M>(
    s: &mut CameraSession<M>,
    metrics: &MediaMetrics,
    memory: u32,
    count: u32,
    sizes: &[u32],
) -> IoctlResult<u32> {
    let asked = count;
    let have = s.buffers.len() as u32;
    let room = MAX_BUFFERS.saturating_sub(have);
    let mut count = count.min(room);
    let mut per_buffer = 0u64;
    for size in sizes {
        // A memfd has at least one page (MemfdBuffer::new).
        per_buffer += page_align(u64::from(*size).max(1)).ok_or(libc::EINVAL)?;
    }
    if memory == MEMORY_MMAP {
        let held: u64 = s
            .buffers
            .iter()
            .flat_map(|b| &b.planes)
            .map(|p| match &p.backing {
                Backing::Mmap { mem, .. } => mem.size(),
                Backing::UserPtr { .. } => 0,
            })
            .sum();
        let fit = MAX_SESSION_BUFFER_BYTES.saturating_sub(held) / per_buffer.max(1);
        count = count.min(u32::try_from(fit).unwrap_or(u32::MAX));
    }
    if count < asked {
        MediaMetrics::inc(&metrics.err_buffer_limit);
        outboard_protocol::log_limited!(
            log::Level::Warn,
            "camera: session {}: {asked} buffers of {per_buffer} bytes asked for, {count} \
             within the caps ({have} held)",
            s.id
        );
        if count == 0 {
            return Err(if room == 0 {
                libc::ENOBUFS
            } else {
                libc::ENOMEM
            });
        }
    }
    let mut offset = s
        .buffers
        .iter()
        .flat_map(|b| &b.planes)
        .map(|p| match &p.backing {
            Backing::Mmap { mem, .. } => p.offset + mem.size(),
            Backing::UserPtr { .. } => 0,
        })
        .max()
        .unwrap_or(0);
    if offset.saturating_add(u64::from(count).saturating_mul(per_buffer)) > u64::from(u32::MAX) {
        return Err(libc::ENOMEM);
    }
    for _ in 0..count {
        let mut planes = Vec::with_capacity(sizes.len());
        for &size in sizes {
            let backing = if memory == MEMORY_MMAP {
                Backing::Mmap {
                    mem: MemfdBuffer::new("outboard-camera", size.into())
                        .map_err(|e| e.raw_os_error().unwrap_or(libc::ENOMEM))?,
                    length: size,
                }
            } else {
                Backing::UserPtr {
                    sgs: Vec::new(),
                    userptr: 0,
                    length: size,
                }
            };
            let plane_offset = offset;
            if let Backing::Mmap { mem, .. } = &backing {
                offset += mem.size();
            }
            planes.push(PlaneBuf {
                backing,
                offset: plane_offset,
                bytesused: 0,
            });
        }
        s.buffers.push(CamBuffer {
            planes,
            queued: false,
            sequence: 0,
            timestamp: Timeval::default(),
            flags: 0,
        });
    }
    Ok(count)
}

/// The memory plane sizes of `pix` (one for single-plane formats).
fn plane_sizes(pix: &V4l2PixFormat) -> Vec<u32> {
    plane_layout(pix.pixelformat, pix.width, pix.height)
        .map(|l| l.into_iter().map(|(_, size)| size).collect())
        .unwrap_or_else(|| vec![pix.sizeimage])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExtOp {
    Get,
    Set,
    Try,
}

/// The single-planar format for `fourcc` at `width` x `height` (a supported layout).
pub fn pix_format(fourcc: u32, width: u32, height: u32) -> V4l2PixFormat {
    let (bytesperline, sizeimage) = frame_layout(fourcc, width, height).unwrap_or((0, 0));
    V4l2PixFormat {
        width,
        height,
        pixelformat: fourcc,
        field: FIELD_NONE,
        bytesperline,
        sizeimage,
        colorspace: if fourcc == PIX_FMT_RGB24 {
            COLORSPACE_SRGB
        } else {
            COLORSPACE_SMPTE170M
        },
        priv_: PIX_FMT_PRIV_MAGIC,
        ..Default::default()
    }
}

impl<E: EventQueue, H: HostMemoryMapper, G: GuestMemoryMapper> IoctlHandler
    for SoftwareCamera<E, H, G>
{
    type Session = CameraSession<G>;

    fn metrics(&self) -> Option<&MediaMetrics> {
        Some(&self.metrics)
    }

    fn enum_fmt(&mut self, _: &mut Self::Session, d: V4l2Fmtdesc) -> IoctlResult<V4l2Fmtdesc> {
        if d.type_ != self.buf_type() {
            return Err(libc::EINVAL);
        }
        let (fourcc, desc) = self.formats().get(d.index as usize).ok_or(libc::EINVAL)?;
        let mut out = V4l2Fmtdesc {
            index: d.index,
            type_: d.type_,
            pixelformat: *fourcc,
            ..Default::default()
        };
        set_name(&mut out.description, desc);
        Ok(out)
    }

    #[inline]
    fn g_fmt(&mut self, _: &mut Self::Session, buf_type: u32) -> IoctlResult<V4l2Format> {
        if buf_type != self.buf_type() {
            return Err(libc::EINVAL);
        }
        Ok(self.current().format)
    }

    #[inline]
    fn try_fmt(&mut self, _: &mut Self::Session, f: V4l2Format) -> IoctlResult<V4l2Format> {
        let i = self.snap_format(&f)?;
        self.table.get(i).map(|e| e.format).ok_or(libc::EINVAL)
    }

    #[inline]
    fn s_fmt(&mut self, s: &mut Self::Session, f: V4l2Format) -> IoctlResult<V4l2Format> {
        let i = self.snap_format(&f)?;
        if !self.busy.is_empty() || s.streaming {
            return Err(libc::EBUSY);
        }
        let format = self.table.get(i).ok_or(libc::EINVAL)?.format;
        self.current = i;
        Ok(format)
    }

    fn reqbufs(
        &mut self,
        s: &mut Self::Session,
        req: V4l2Requestbuffers,
    ) -> IoctlResult<V4l2Requestbuffers> {
        if req.type_ != self.buf_type() || !matches!(req.memory, MEMORY_MMAP | MEMORY_USERPTR) {
            return Err(libc::EINVAL);
        }
        if s.streaming || self.session_mapped(s.id) || self.busy_elsewhere(s.id) {
            return Err(libc::EBUSY);
        }
        self.free_buffers(s);
        s.pix = self.pix();
        let count = add_buffers(
            s,
            &self.metrics,
            req.memory,
            req.count,
            &plane_sizes(&s.pix),
        )?;
        s.memory = if count > 0 { req.memory } else { 0 };
        if count > 0 {
            self.busy.insert(s.id);
        }
        Ok(V4l2Requestbuffers {
            count,
            type_: req.type_,
            memory: req.memory,
            capabilities: BUF_CAP_SUPPORTS_MMAP | BUF_CAP_SUPPORTS_USERPTR,
            ..Default::default()
        })
    }

    fn create_bufs(
        &mut self,
        s: &mut Self::Session,
        c: V4l2CreateBuffers,
    ) -> IoctlResult<V4l2CreateBuffers> {
        if c.format.type_ != self.buf_type()
            || !matches!(c.memory, MEMORY_MMAP | MEMORY_USERPTR)
            || (!s.buffers.is_empty() && c.memory != s.memory)
        {
            return Err(libc::EINVAL);
        }
        if self.busy_elsewhere(s.id) {
            return Err(libc::EBUSY);
        }
        // Buffers may be larger than the current format needs, never smaller.
        let need = plane_sizes(&self.pix());
        let want: Vec<u32> = if self.mplane {
            let mp = c.format.pix_mp();
            if usize::from(mp.num_planes) != need.len() {
                return Err(libc::EINVAL);
            }
            mp.plane_fmt
                .iter()
                .take(need.len())
                .map(|p| p.sizeimage)
                .collect()
        } else {
            vec![c.format.pix().sizeimage]
        };
        if want.iter().zip(&need).any(|(w, n)| w < n) {
            return Err(libc::EINVAL);
        }
        if s.buffers.is_empty() {
            s.pix = self.pix();
        }
        let index = s.buffers.len() as u32;
        let count = add_buffers(s, &self.metrics, c.memory, c.count, &want)?;
        if !s.buffers.is_empty() {
            s.memory = c.memory;
            self.busy.insert(s.id);
        }
        Ok(V4l2CreateBuffers {
            index,
            count,
            capabilities: BUF_CAP_SUPPORTS_MMAP | BUF_CAP_SUPPORTS_USERPTR,
            // No cache hints (so no V4L2_MEMORY_FLAG_NON_COHERENT); reserved words are
            // zero.
            flags: 0,
            reserved: [0; 6],
            ..c
        })
    }

    fn querybuf(
        &mut self,
        s: &mut Self::Session,
        buf_type: u32,
        index: u32,
    ) -> IoctlResult<BufferDesc> {
        if buf_type != self.buf_type() {
            return Err(libc::EINVAL);
        }
        let mut desc = s.describe(index).ok_or(libc::EINVAL)?;
        if self.mappings.values().any(|m| *m == (s.id, index)) {
            desc.buffer.flags |= BUF_FLAG_MAPPED;
        }
        Ok(desc)
    }

    fn qbuf(&mut self, s: &mut Self::Session, gb: GuestBuffer) -> IoctlResult<BufferDesc> {
        let b = gb.desc.buffer;
        if b.type_ != self.buf_type() || b.memory != s.memory || s.memory == 0 {
            return Err(libc::EINVAL);
        }
        let need = plane_sizes(&s.pix);
        let buf = s.buffers.get_mut(b.index as usize).ok_or(libc::EINVAL)?;
        if buf.queued {
            return Err(libc::EINVAL);
        }
        // What the guest gives for each plane: its user pointer and length.
        let given: Vec<(u64, u32)> = if self.mplane {
            gb.desc.planes.iter().map(|p| (p.m, p.length)).collect()
        } else {
            vec![(b.m, b.length)]
        };
        if given.len() != buf.planes.len() {
            return Err(libc::EINVAL);
        }
        if b.memory == MEMORY_USERPTR {
            if given.iter().zip(&need).any(|((_, len), n)| len < n)
                || gb.userptr.len() != given.len()
            {
                return Err(libc::EINVAL);
            }
            // Check the lists now (EFAULT for memory outside the guest's), map them
            // again when the frame is written.
            for ((sgs, n), (_, len)) in gb.userptr.iter().zip(&need).zip(&given) {
                let m = self.guest.new_mapping(sgs)?;
                if m.len() < *n as usize || m.len() < *len as usize {
                    return Err(libc::EINVAL);
                }
            }
            for ((p, sgs), (ptr, len)) in buf.planes.iter_mut().zip(&gb.userptr).zip(&given) {
                if let Backing::UserPtr {
                    sgs: queued_sgs,
                    userptr,
                    length,
                } = &mut p.backing
                {
                    *queued_sgs = sgs.clone();
                    *userptr = *ptr;
                    *length = *len;
                }
            }
        }
        buf.queued = true;
        buf.flags = 0;
        s.queue.push_back(b.index);
        let mut desc = s.describe(b.index).ok_or(libc::EINVAL)?;
        if self.mappings.values().any(|m| *m == (s.id, b.index)) {
            desc.buffer.flags |= BUF_FLAG_MAPPED;
        }
        Ok(desc)
    }

    fn streamon(&mut self, s: &mut Self::Session, buf_type: u32) -> IoctlResult<()> {
        if buf_type != self.buf_type() || s.buffers.is_empty() {
            return Err(libc::EINVAL);
        }
        if !s.streaming {
            s.sequence = 0;
            s.interval = self.interval;
            s.arm_timer(true)?;
            s.streaming = true;
        }
        Ok(())
    }

    fn streamoff(&mut self, s: &mut Self::Session, buf_type: u32) -> IoctlResult<()> {
        if buf_type != self.buf_type() {
            return Err(libc::EINVAL);
        }
        s.arm_timer(false)?;
        s.streaming = false;
        // Every queued buffer returns to the driver without being filled.
        for index in std::mem::take(&mut s.queue) {
            if let Some(b) = s.buffers.get_mut(index as usize) {
                b.queued = false;
            }
        }
        Ok(())
    }

    fn g_parm(&mut self, _: &mut Self::Session, buf_type: u32) -> IoctlResult<V4l2Streamparm> {
        if buf_type != self.buf_type() {
            return Err(libc::EINVAL);
        }
        let mut p = V4l2Streamparm {
            type_: buf_type,
            ..Default::default()
        };
        p.set_capture(&V4l2Captureparm {
            capability: CAP_TIMEPERFRAME,
            timeperframe: V4l2Fract {
                numerator: self.interval.0,
                denominator: self.interval.1,
            },
            ..Default::default()
        });
        Ok(p)
    }

    fn s_parm(&mut self, s: &mut Self::Session, p: V4l2Streamparm) -> IoctlResult<V4l2Streamparm> {
        if p.type_ != self.buf_type() {
            return Err(libc::EINVAL);
        }
        let t = p.capture().timeperframe;
        if t.numerator != 0 && t.denominator != 0 {
            // Nearest supported interval, compared in microseconds.
            let want = u64::from(t.numerator) * 1_000_000 / u64::from(t.denominator);
            if let Some(best) = INTERVALS
                .iter()
                .copied()
                .min_by_key(|(n, d)| (u64::from(*n) * 1_000_000 / u64::from(*d)).abs_diff(want))
            {
                self.interval = best;
                s.interval = best;
            }
            if s.streaming {
                s.arm_timer(true)?;
            }
        }
        self.g_parm(s, p.type_)
    }

    fn enuminput(&mut self, _: &mut Self::Session, index: u32) -> IoctlResult<V4l2Input> {
        if index != 0 {
            return Err(libc::EINVAL);
        }
        let mut i = V4l2Input {
            index,
            type_: INPUT_TYPE_CAMERA,
            ..Default::default()
        };
        set_name(&mut i.name, "Camera");
        Ok(i)
    }

    fn g_input(&mut self, _: &mut Self::Session) -> IoctlResult<i32> {
        Ok(0)
    }

    fn s_input(&mut self, _: &mut Self::Session, input: i32) -> IoctlResult<i32> {
        if input == 0 {
            Ok(0)
        } else {
            Err(libc::EINVAL)
        }
    }

    fn g_ctrl(&mut self, s: &mut Self::Session, id: u32) -> IoctlResult<V4l2Control> {
        if id == CID_USER_CLASS {
            return Err(libc::EACCES);
        }
        let idx = ctrl_index(id).ok_or(libc::EINVAL)?;
        Ok(V4l2Control {
            id,
            value: s.ctrls[idx],
        })
    }

    fn s_ctrl(&mut self, s: &mut Self::Session, c: V4l2Control) -> IoctlResult<V4l2Control> {
        if c.id == CID_USER_CLASS {
            return Err(libc::EACCES);
        }
        let idx = ctrl_index(c.id).ok_or(libc::EINVAL)?;
        self.set_ctrl(s, idx, c.value);
        Ok(V4l2Control {
            id: c.id,
            value: s.ctrls[idx],
        })
    }

    fn queryctrl(&mut self, _: &mut Self::Session, q: V4l2Queryctrl) -> IoctlResult<V4l2Queryctrl> {
        let next = q.id & (CTRL_FLAG_NEXT_CTRL | CTRL_FLAG_NEXT_COMPOUND) != 0;
        let id = q.id & !(CTRL_FLAG_NEXT_CTRL | CTRL_FLAG_NEXT_COMPOUND);
        let c = if next {
            if q.id & CTRL_FLAG_NEXT_CTRL == 0 {
                // Only compound controls requested; the camera has none.
                return Err(libc::EINVAL);
            }
            std::iter::once(&USER_CLASS)
                .chain(CTRLS.iter())
                .filter(|c| c.id > id)
                .min_by_key(|c| c.id)
        } else {
            std::iter::once(&USER_CLASS)
                .chain(CTRLS.iter())
                .find(|c| c.id == id)
        }
        .ok_or(libc::EINVAL)?;
        let mut out = V4l2Queryctrl {
            id: c.id,
            type_: c.type_,
            minimum: c.min,
            maximum: c.max,
            step: c.step,
            default_value: c.default,
            flags: c.flags,
            ..Default::default()
        };
        set_name(&mut out.name, c.name);
        Ok(out)
    }

    fn query_ext_ctrl(
        &mut self,
        s: &mut Self::Session,
        q: V4l2QueryExtCtrl,
    ) -> IoctlResult<V4l2QueryExtCtrl> {
        let base = self.queryctrl(
            s,
            V4l2Queryctrl {
                id: q.id,
                ..Default::default()
            },
        )?;
        Ok(V4l2QueryExtCtrl {
            id: base.id,
            type_: base.type_,
            name: base.name,
            minimum: base.minimum.into(),
            maximum: base.maximum.into(),
            step: base.step as u64,
            default_value: base.default_value.into(),
            flags: base.flags,
            elem_size: if base.type_ == CTRL_TYPE_CTRL_CLASS {
                0
            } else {
                4
            },
            elems: 1,
            ..Default::default()
        })
    }

    fn g_ext_ctrls(&mut self, s: &mut Self::Session, c: &mut ExtControls) -> IoctlResult<()> {
        self.ext_ctrls(s, c, ExtOp::Get)
    }

    fn s_ext_ctrls(&mut self, s: &mut Self::Session, c: &mut ExtControls) -> IoctlResult<()> {
        self.ext_ctrls(s, c, ExtOp::Set)
    }

    fn try_ext_ctrls(&mut self, s: &mut Self::Session, c: &mut ExtControls) -> IoctlResult<()> {
        self.ext_ctrls(s, c, ExtOp::Try)
    }

    fn enum_framesizes(
        &mut self,
        _: &mut Self::Session,
        q: V4l2Frmsizeenum,
    ) -> IoctlResult<V4l2Frmsizeenum> {
        if !self.formats().iter().any(|(c, _)| *c == q.pixel_format) {
            return Err(libc::EINVAL);
        }
        let (w, h) = SIZES.get(q.index as usize).ok_or(libc::EINVAL)?;
        Ok(V4l2Frmsizeenum {
            index: q.index,
            pixel_format: q.pixel_format,
            type_: FRMSIZE_TYPE_DISCRETE,
            size: [*w, *h, 0, 0, 0, 0],
            ..Default::default()
        })
    }

    fn enum_frameintervals(
        &mut self,
        _: &mut Self::Session,
        q: V4l2Frmivalenum,
    ) -> IoctlResult<V4l2Frmivalenum> {
        if !self.formats().iter().any(|(c, _)| *c == q.pixel_format)
            || !SIZES.contains(&(q.width, q.height))
        {
            return Err(libc::EINVAL);
        }
        let (n, d) = INTERVALS.get(q.index as usize).ok_or(libc::EINVAL)?;
        Ok(V4l2Frmivalenum {
            index: q.index,
            pixel_format: q.pixel_format,
            width: q.width,
            height: q.height,
            type_: FRMIVAL_TYPE_DISCRETE,
            interval: [*n, *d, 0, 0, 0, 0],
            ..Default::default()
        })
    }

    fn subscribe_event(
        &mut self,
        s: &mut Self::Session,
        sub: V4l2EventSubscription,
    ) -> IoctlResult<()> {
        if sub.type_ != EVENT_CTRL {
            return Err(libc::EINVAL);
        }
        // The class control can be subscribed to; it never changes, so it has no events.
        let idx = ctrl_index(sub.id);
        if idx.is_none() && sub.id != CID_USER_CLASS {
            return Err(libc::EINVAL);
        }
        if sub.flags & !(EVENT_SUB_FL_SEND_INITIAL | EVENT_SUB_FL_ALLOW_FEEDBACK) != 0 {
            return Err(libc::EINVAL);
        }
        if !s
            .subscriptions
            .iter()
            .any(|x| x.type_ == sub.type_ && x.id == sub.id)
        {
            s.subscriptions.push(sub);
        }
        if let (Some(idx), true) = (idx, sub.flags & EVENT_SUB_FL_SEND_INITIAL != 0) {
            self.send_ctrl_event(s, idx, EVENT_CTRL_CH_VALUE | EVENT_CTRL_CH_FLAGS);
        }
        Ok(())
    }

    fn unsubscribe_event(
        &mut self,
        s: &mut Self::Session,
        sub: V4l2EventSubscription,
    ) -> IoctlResult<()> {
        if sub.type_ == EVENT_ALL {
            s.subscriptions.clear();
        } else {
            s.subscriptions
                .retain(|x| !(x.type_ == sub.type_ && x.id == sub.id));
        }
        Ok(())
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
        let addrs: Vec<u64> = self
            .mappings
            .iter()
            .filter(|(_, (s, _))| *s == session.id)
            .map(|(a, _)| *a)
            .collect();
        for a in addrs {
            self.mappings.remove(&a);
            if let Err(e) = self.host.remove_mapping(a) {
                outboard_protocol::log_limited!(
                    log::Level::Warn,
                    "camera: unmapping {a:#x} on close: errno {e}"
                );
            }
        }
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
        if self.mappings.len() >= MAX_MAPPINGS {
            MediaMetrics::inc(&self.metrics.err_mapping_limit);
            outboard_protocol::log_limited!(
                log::Level::Warn,
                "camera: MMAP refused: {MAX_MAPPINGS} mappings, the cap"
            );
            return Err(libc::ENOMEM);
        }
        let addr = self
            .host
            .add_mapping(m.as_fd(), m.size(), 0, flags & MMAP_FLAG_RW != 0)?;
        self.mappings.insert(addr, (s.id, index));
        Ok((addr, m.size()))
    }

    fn do_munmap(&mut self, driver_addr: u64) -> Result<(), Errno> {
        if !self.mappings.contains_key(&driver_addr) {
            return Err(libc::EINVAL);
        }
        self.host.remove_mapping(driver_addr)?;
        self.mappings.remove(&driver_addr);
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_recognisable_in_every_format() {
        for (fourcc, _) in FORMATS {
            for (w, h) in SIZES {
                let (_, size) = frame_layout(fourcc, w, h).unwrap();
                let mut buf = vec![0u8; size as usize];
                for n in [0u32, 1, 77, 0xdead_beef] {
                    assert_eq!(
                        render_frame(fourcc, w, h, n, &Adjust::default(), &mut buf),
                        Some(size as usize)
                    );
                    assert_eq!(decode_frame_number(fourcc, w, h, &buf), Some(n));
                }
            }
        }
    }

    #[test]
    fn the_pattern_moves() {
        let (_, size) = frame_layout(PIX_FMT_RGB24, 320, 240).unwrap();
        let mut a = vec![0u8; size as usize];
        let mut b = vec![0u8; size as usize];
        render_frame(PIX_FMT_RGB24, 320, 240, 1, &Adjust::default(), &mut a).unwrap();
        render_frame(PIX_FMT_RGB24, 320, 240, 2, &Adjust::default(), &mut b).unwrap();
        let row = 100 * 320 * 3;
        assert_ne!(a[row..row + 960], b[row..row + 960]);
        // Bars shift right by 4 pixels per frame.
        assert_eq!(
            a[row + 40 * 3..row + 100 * 3],
            b[row + 44 * 3..row + 104 * 3]
        );
        assert_eq!(
            render_frame(PIX_FMT_RGB24, 320, 240, 1, &Adjust::default(), &mut a[..10]),
            None
        );
        assert_eq!(frame_layout(PIX_FMT_NV12, 321, 240), None);
        assert_eq!(frame_layout(0, 320, 240), None);
    }
}
