//! A host V4L2 proxy: every virtio-media session opens the host node (`/dev/videoN`) and
//! every ioctl the guest sends is forwarded to it (feature `v4l2-proxy`).
//!
//! # Forwarding
//!
//! The typed structures of [`super::v4l2`] are the kernel's 64-bit layouts (checked at
//! compile time against v4l2r's bindgen output of the kernel headers), so an argument
//! the dispatcher parsed is passed to the host `ioctl(2)` as it is. Only the pointers
//! inside arguments are rewritten:
//!
//! - multi-planar `v4l2_buffer`s point at a host copy of their planes;
//! - USERPTR planes point at a host shadow buffer (page-aligned, one per buffer plane,
//!   kept until the buffers are freed so the host driver's pinning stays valid). The
//!   guest's SG list is kept while the buffer is queued and mapped with the
//!   [`GuestMemoryMapper`] each time it is used: output data is copied from the guest at
//!   `QBUF`, capture data to the guest at `DQBUF`. A mapping is never kept across calls
//!   (the type forbids it: it borrows the mapper), because the front-end may replace
//!   the guest's memory table in between; a capture buffer whose SG list is no longer
//!   guest memory at `DQBUF` comes back with `V4L2_BUF_FLAG_ERROR` and nothing written.
//!   A shadow copy is used because a [`GuestMemoryRange`] need not be one linear host
//!   range;
//! - extended control payloads point at host copies of the guest's payload.
//!
//! Pointers are never returned to the guest: responses carry the guest's own values.
//!
//! # MMAP buffers
//!
//! The host driver allocates MMAP buffers in host kernel memory, as large as the
//! format (and, with `CREATE_BUFS`, as large as the guest asks). The proxy counts them
//! against [`MAX_DEVICE_DRIVER_BUFFERS`] and grants fewer buffers than asked, or none
//! (`ENOMEM`), before the driver could exhaust the host's memory.
//!
//! `QUERYBUF` answers record each plane's `mem_offset`; a virtio-media `MMAP` of that
//! offset exports the plane with `VIDIOC_EXPBUF` (a dma-buf) and maps it into the shared
//! memory region with the [`HostMemoryMapper`].
//!
//! # Events
//!
//! A session's poll fd is its own epoll instance watching the host fd: `EPOLLPRI`
//! (V4L2 events) always, `EPOLLIN | EPOLLOUT` (done buffers) only while a queue streams
//! with buffers queued, because vb2 reports `EPOLLERR` for a queue that cannot produce
//! buffers and a level-triggered poller would spin on it.
//! [`MediaDevice::process_events`] dequeues events (`VIDIOC_DQEVENT`) and buffers
//! (`VIDIOC_DQBUF`) without blocking and sends them as virtio-media events.
//!
//! # Host errors
//!
//! Every host errno goes back to the guest unchanged. A host node that goes away
//! (`ENODEV`, as a USB camera unplugged) fails the session: the runner reports it to the
//! driver as an error event.
//!
//! # What is not carried
//!
//! What virtio-media cannot carry is refused and not advertised, so that a guest sees a
//! consistent device (and no guest value is ever taken by the host kernel as a host
//! pointer or fd):
//!
//! - DMABUF memory (`EINVAL`; virtio objects are not carried): `V4L2_BUF_CAP_SUPPORTS_DMABUF`
//!   is cleared from `REQBUFS`/`CREATE_BUFS` answers;
//! - requests (there is no media device, and a request fd would be looked up in the
//!   host's fd table): `V4L2_BUF_FLAG_REQUEST_FD` buffers and `V4L2_CTRL_WHICH_REQUEST_VAL`
//!   controls are refused as the V4L2 core refuses them without request support, and
//!   `V4L2_BUF_CAP_SUPPORTS_REQUESTS` is cleared;
//! - overlays (`v4l2_window` holds clip and bitmap pointers the host kernel would
//!   follow, and the framebuffer ioctls are not carried): the overlay buffer types get
//!   `EINVAL` and the overlay capabilities are cleared;
//! - read/write I/O: `V4L2_CAP_READWRITE` is cleared, and so are `readbuffers` and
//!   `writebuffers` in `G_PARM`/`S_PARM` answers.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use outboard_protocol::media::{SgEntry, MMAP_FLAG_RW};
use outboard_protocol::v4l2::*;
use rustix::event::epoll;
use thiserror::Error;
use zerocopy::{FromBytes, IntoBytes};

use super::ioctl::{
    dispatch_ioctl, BufferDesc, ExtControls, GuestBuffer, IoctlHandler, IoctlResult,
};
use super::mappings::ShmMappings;
use super::{
    page_align, ChainReader, ChainWriter, Errno, EventQueue, GuestMemoryMapper, GuestMemoryRange,
    HostMemoryMapper, MediaDevice, MediaError, MediaEvent, MediaMetrics, MediaSession,
};

// The typed structures are passed to the host kernel as they are: they must have the
// kernel's layout, which v4l2r's bindings are generated from.
const _: () = {
    use v4l2r::bindings as b;
    assert!(size_of::<V4l2Format>() == size_of::<b::v4l2_format>());
    assert!(size_of::<V4l2Fmtdesc>() == size_of::<b::v4l2_fmtdesc>());
    assert!(size_of::<V4l2Requestbuffers>() == size_of::<b::v4l2_requestbuffers>());
    assert!(size_of::<V4l2Buffer>() == size_of::<b::v4l2_buffer>());
    assert!(size_of::<V4l2Plane>() == size_of::<b::v4l2_plane>());
    assert!(size_of::<V4l2CreateBuffers>() == size_of::<b::v4l2_create_buffers>());
    assert!(size_of::<V4l2Streamparm>() == size_of::<b::v4l2_streamparm>());
    assert!(size_of::<V4l2ExtControls>() == size_of::<b::v4l2_ext_controls>());
    assert!(size_of::<V4l2ExtControl>() == size_of::<b::v4l2_ext_control>());
    assert!(size_of::<V4l2QueryExtCtrl>() == size_of::<b::v4l2_query_ext_ctrl>());
    assert!(size_of::<V4l2Event>() == size_of::<b::v4l2_event>());
    assert!(size_of::<V4l2EventSubscription>() == size_of::<b::v4l2_event_subscription>());
    assert!(size_of::<V4l2Selection>() == size_of::<b::v4l2_selection>());
    assert!(size_of::<V4l2Input>() == size_of::<b::v4l2_input>());
    assert!(size_of::<V4l2Frmsizeenum>() == size_of::<b::v4l2_frmsizeenum>());
    assert!(size_of::<V4l2Frmivalenum>() == size_of::<b::v4l2_frmivalenum>());
    assert!(std::mem::offset_of!(V4l2Buffer, m) == std::mem::offset_of!(b::v4l2_buffer, m));
    assert!(
        std::mem::offset_of!(V4l2ExtControls, controls)
            == std::mem::offset_of!(b::v4l2_ext_controls, controls)
    );
};

/// The overlay buffer types (not carried: see the module documentation).
const OVERLAY_TYPES: [u32; 2] = [BUF_TYPE_VIDEO_OVERLAY, BUF_TYPE_VIDEO_OUTPUT_OVERLAY];
/// `EBADR`: what vb2 answers for a request buffer on a queue without request support.
const EBADR: Errno = libc::EBADR;
/// Offset of `readbuffers` in `v4l2_captureparm`, and of `writebuffers` in
/// `v4l2_outputparm` (both after capability, mode, timeperframe, extendedmode).
const PARM_BUFFERS_OFFSET: usize = std::mem::offset_of!(V4l2Captureparm, readbuffers);
/// Largest USERPTR plane, and largest total of the control payloads of one call, a
/// guest may ask for (256 MiB): the shadow copy is host memory.
pub const MAX_SHADOW_LEN: usize = 256 << 20;
/// Most USERPTR shadow memory one session may hold (1 GiB).
pub const MAX_SESSION_SHADOW: usize = 1 << 30;
/// Most USERPTR shadow buffers one session may hold: 256, a full vb2 queue
/// (`VIDEO_MAX_FRAME`, 32 buffers) of `VIDEO_MAX_PLANES` (8) planes each. Past it a
/// QBUF or PREPARE_BUF that needs a new shadow gets `ENOMEM`.
pub const MAX_SESSION_SHADOWS: usize = 256;
/// Most USERPTR shadow memory all sessions of one proxy may hold together (1 GiB): the
/// per-session budget alone would let a guest hold it once per session. Past it a QBUF
/// or PREPARE_BUF that needs more gets `ENOMEM`.
pub const MAX_DEVICE_SHADOW: usize = 1 << 30;
/// Most memory the host driver may hold for the MMAP buffers of all sessions of one
/// proxy together (1 GiB). vb2 lets `CREATE_BUFS` ask for buffers of any size at least
/// the format's (uvcvideo and vivid take any larger `sizeimage`), and the host kernel
/// allocates them when asked, if it must by invoking the OOM killer on the largest
/// host process (the fuzzer found it: 32 buffers of 4 GiB against vivid). So the proxy
/// counts what `REQBUFS` and `CREATE_BUFS` make the driver allocate and grants fewer
/// buffers than asked (as V4L2 lets a driver do) when the budget would be passed, or
/// answers `ENOMEM` when not one fits.
pub const MAX_DEVICE_DRIVER_BUFFERS: usize = 1 << 30;

/// `V4L2_BUF_TYPE_SDR_CAPTURE` and `V4L2_BUF_TYPE_META_CAPTURE` (the output types
/// are one more).
const BUF_TYPE_SDR_CAPTURE: u32 = 11;
const BUF_TYPE_META_CAPTURE: u32 = 13;

/// Bytes of one buffer of format `f` as vb2 allocates it (each plane a whole number of
/// pages); 0 for a type whose format names no size (VBI: small, sized by the driver).
fn format_bytes(f: &V4l2Format) -> usize {
    let page = |n: u32| page_align(u64::from(n)).map_or(usize::MAX, |n| n as usize);
    match f.type_ {
        BUF_TYPE_VIDEO_CAPTURE | BUF_TYPE_VIDEO_OUTPUT => page(f.pix().sizeimage),
        BUF_TYPE_VIDEO_CAPTURE_MPLANE | BUF_TYPE_VIDEO_OUTPUT_MPLANE => {
            let mp = f.pix_mp();
            mp.plane_fmt
                .iter()
                .take(usize::from(mp.num_planes).min(VIDEO_MAX_PLANES))
                .fold(0usize, |a, p| a.saturating_add(page(p.sizeimage)))
        }
        // `v4l2_sdr_format` and `v4l2_meta_format`: a u32 then `buffersize`.
        BUF_TYPE_SDR_CAPTURE
        | BUF_TYPE_SDR_OUTPUT
        | BUF_TYPE_META_CAPTURE
        | BUF_TYPE_META_OUTPUT => f
            .fmt
            .get(4..8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, |b| page(u32::from_le_bytes(b))),
        _ => 0,
    }
}

/// How many of `count` buffers of `per` bytes fit in [`MAX_DEVICE_DRIVER_BUFFERS`]
/// beside `others` bytes the driver holds already (a buffer counts as a page at least).
fn buffers_that_fit(count: u32, per: usize, others: usize) -> u32 {
    let room = MAX_DEVICE_DRIVER_BUFFERS.saturating_sub(others);
    let fit = room / per.max(4096);
    count.min(u32::try_from(fit).unwrap_or(u32::MAX))
}

/// A session's share of [`MAX_DEVICE_DRIVER_BUFFERS`], given back when dropped.
#[derive(Debug)]
struct DriverCharge {
    bytes: usize,
    total: Arc<AtomicUsize>,
}

impl DriverCharge {
    fn set(&mut self, bytes: usize) {
        if bytes >= self.bytes {
            self.total.fetch_add(bytes - self.bytes, Ordering::Relaxed);
        } else {
            self.total.fetch_sub(self.bytes - bytes, Ordering::Relaxed);
        }
        self.bytes = bytes;
    }
}

impl Drop for DriverCharge {
    fn drop(&mut self) {
        self.total.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Errors opening the host node.
#[cfg_attr(test, remain::sorted)]
#[derive(Debug, Error)]
pub enum ProxyError {
    /// The node is not a V4L2 video capture or mem-to-mem node with streaming I/O.
    #[error("{path}: not a V4L2 streaming capture or mem-to-mem node (device_caps {caps:#x})")]
    NotCaptureOrM2m {
        /// The node.
        path: PathBuf,
        /// Its device capabilities.
        caps: u32,
    },
    /// `VIDIOC_QUERYCAP` failed: not a V4L2 node.
    #[error("{path}: not a V4L2 device (VIDIOC_QUERYCAP: {source})")]
    NotV4l2 {
        /// The node.
        path: PathBuf,
        /// The ioctl's error.
        source: std::io::Error,
    },
    /// The node could not be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The node.
        path: PathBuf,
        /// The open error.
        source: std::io::Error,
    },
}

/// What `VIDIOC_QUERYCAP` says about the host node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostNode {
    /// The node's path.
    pub path: PathBuf,
    /// The driver name.
    pub driver: String,
    /// The card name (the guest sees it in the config space).
    pub card: String,
    /// The node's device capabilities, without `V4L2_CAP_READWRITE` and the overlay
    /// capabilities (not carried by virtio-media, see the module documentation).
    pub device_caps: u32,
}

fn open_node(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
}

impl HostNode {
    /// Opens `path` once and checks it is a V4L2 capture or mem-to-mem node with
    /// streaming I/O.
    pub fn probe(path: &Path) -> Result<HostNode, ProxyError> {
        let file = open_node(path).map_err(|source| ProxyError::Open {
            path: path.to_owned(),
            source,
        })?;
        let cap: v4l2r::bindings::v4l2_capability =
            v4l2r::ioctl::querycap(&file).map_err(|e| ProxyError::NotV4l2 {
                path: path.to_owned(),
                source: std::io::Error::from_raw_os_error(v4l2r::nix::errno::Errno::from(e) as i32),
            })?;
        let caps = if cap.capabilities & CAP_DEVICE_CAPS != 0 {
            cap.device_caps
        } else {
            cap.capabilities
        };
        let video =
            CAP_VIDEO_CAPTURE | CAP_VIDEO_CAPTURE_MPLANE | CAP_VIDEO_M2M | CAP_VIDEO_M2M_MPLANE;
        if caps & video == 0 || caps & CAP_STREAMING == 0 {
            return Err(ProxyError::NotCaptureOrM2m {
                path: path.to_owned(),
                caps,
            });
        }
        let name = |b: &[u8]| {
            let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
            String::from_utf8_lossy(&b[..end]).into_owned()
        };
        Ok(HostNode {
            path: path.to_owned(),
            driver: name(&cap.driver),
            card: name(&cap.card),
            device_caps: caps & !(CAP_READWRITE | CAP_VIDEO_OVERLAY | CAP_VIDEO_OUTPUT_OVERLAY),
        })
    }
}

/// Ioctls whose argument holds pointers the kernel follows.
fn has_pointers(ioctl: V4l2Ioctl) -> bool {
    use V4l2Ioctl::*;
    matches!(
        ioctl,
        VIDIOC_QUERYBUF
            | VIDIOC_QBUF
            | VIDIOC_DQBUF
            | VIDIOC_PREPARE_BUF
            | VIDIOC_G_EXT_CTRLS
            | VIDIOC_S_EXT_CTRLS
            | VIDIOC_TRY_EXT_CTRLS
            | VIDIOC_G_EDID
            | VIDIOC_S_EDID
            | VIDIOC_G_FBUF
            | VIDIOC_S_FBUF
    )
}

fn last_errno() -> Errno {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Runs `ioctl` on the host fd with `arg`.
///
/// The generic forwarding is written here rather than with v4l2r's typed wrappers:
/// those convert to and from v4l2r's own types per call, and v4l2r 0.0.7 has no wrapper
/// for many ioctls virtio-media carries (tuner, audio, DV timings, encoder index, ...).
///
/// # Safety
///
/// Every pointer inside `arg` that the kernel follows for `ioctl` must point to memory
/// that is valid (and writable where the kernel writes) for the length given next to it,
/// for the duration of the call.
unsafe fn raw_ioctl<T: IntoBytes + FromBytes>(
    fd: BorrowedFd<'_>,
    ioctl: V4l2Ioctl,
    arg: &mut T,
) -> IoctlResult<()> {
    if size_of::<T>() != ioctl.arg_size() {
        outboard_protocol::log_limited!(
            log::Level::Error,
            "v4l2 proxy: {ioctl} with a {}-byte argument",
            size_of::<T>()
        );
        return Err(libc::EINVAL);
    }
    // SAFETY: the request code encodes `size_of::<T>()` (checked above), so the kernel
    // reads and writes at most the bytes `arg` exclusively borrows; any bytes it writes
    // form a valid `T` (`FromBytes`); embedded pointers are the caller's contract.
    let r = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            ioctl.request_code() as libc::c_ulong,
            arg as *mut T,
        )
    };
    if r < 0 {
        Err(last_errno())
    } else {
        Ok(())
    }
}

/// Runs an ioctl whose argument has no pointers.
fn plain_ioctl<T: IntoBytes + FromBytes>(
    fd: BorrowedFd<'_>,
    ioctl: V4l2Ioctl,
    arg: &mut T,
) -> IoctlResult<()> {
    if has_pointers(ioctl) {
        outboard_protocol::log_limited!(
            log::Level::Error,
            "v4l2 proxy: {ioctl} forwarded without its pointers"
        );
        return Err(libc::EINVAL);
    }
    // SAFETY: `ioctl`'s argument holds no pointer the kernel follows (checked above).
    unsafe { raw_ioctl(fd, ioctl, arg) }
}

/// Refuses the overlay buffer types (not carried: see the module documentation).
fn no_overlay(buf_type: u32) -> IoctlResult<()> {
    if OVERLAY_TYPES.contains(&buf_type) {
        return Err(libc::EINVAL);
    }
    Ok(())
}

/// The `V4L2_BUF_CAP_*` the guest may see: without what is not carried.
fn carried_buf_caps(caps: u32) -> u32 {
    caps & !(BUF_CAP_SUPPORTS_DMABUF | BUF_CAP_SUPPORTS_REQUESTS)
}

/// Clears `readbuffers`/`writebuffers` of a capture or output `v4l2_streamparm` (read
/// and write I/O are not carried).
fn clear_rw_buffers(p: &mut V4l2Streamparm) {
    if matches!(
        p.type_,
        BUF_TYPE_VIDEO_CAPTURE
            | BUF_TYPE_VIDEO_OUTPUT
            | BUF_TYPE_VIDEO_CAPTURE_MPLANE
            | BUF_TYPE_VIDEO_OUTPUT_MPLANE
    ) {
        p.parm[PARM_BUFFERS_OFFSET..PARM_BUFFERS_OFFSET + 4].fill(0);
    }
}

/// A page-aligned host buffer standing in for a guest USERPTR plane. Its length is
/// charged to its proxy's shadow total while it lives.
#[derive(Debug)]
struct Shadow {
    storage: Vec<u8>,
    offset: usize,
    len: usize,
    charged: Arc<AtomicUsize>,
}

impl Shadow {
    fn new(len: usize, charged: &Arc<AtomicUsize>) -> IoctlResult<Shadow> {
        if len == 0 || len > MAX_SHADOW_LEN {
            return Err(libc::EINVAL);
        }
        let storage = vec![0u8; len + 4095];
        let offset = storage.as_ptr().align_offset(4096);
        charged.fetch_add(len, Ordering::Relaxed);
        Ok(Shadow {
            storage,
            offset,
            len,
            charged: charged.clone(),
        })
    }

    fn bytes(&self) -> &[u8] {
        &self.storage[self.offset..self.offset + self.len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.offset..self.offset + self.len]
    }

    fn addr(&mut self) -> u64 {
        self.bytes_mut().as_mut_ptr() as u64
    }
}

impl Drop for Shadow {
    fn drop(&mut self) {
        self.charged.fetch_sub(self.len, Ordering::Relaxed);
    }
}

/// A buffer queued on the host.
struct Queued {
    /// The guest's `m` (single-planar) and plane `m`s, returned instead of host values.
    guest_m: u64,
    guest_planes_m: Vec<u64>,
    /// USERPTR: the guest's SG list of each plane (index = plane). Mapped again when
    /// the buffer comes back: the guest memory map may have changed meanwhile, and a
    /// mapping kept from QBUF could point into memory the front-end took away.
    userptr: Vec<Option<Vec<SgEntry>>>,
}

/// One host queue (buffer type) of a session.
#[derive(Default)]
struct QueueState {
    memory: u32,
    /// Buffers the host allocated (REQBUFS, CREATE_BUFS): valid indices are below.
    buffers: u32,
    /// MMAP buffers the host driver allocated, by index: their bytes (what
    /// [`MAX_DEVICE_DRIVER_BUFFERS`] counts).
    driver_bytes: BTreeMap<u32, usize>,
    streaming: bool,
    queued: BTreeMap<u32, Queued>,
    /// USERPTR shadow buffers by (index, plane).
    shadows: BTreeMap<(u32, u32), Shadow>,
    /// USERPTR: the guest's `m` and plane `m`s of the last successful QBUF or
    /// PREPARE_BUF of each index (vb2 keeps a buffer's user pointer until it is queued
    /// with another or freed, and QUERYBUF reports it).
    guest_ptrs: BTreeMap<u32, (u64, Vec<u64>)>,
    /// USERPTR buffers prepared (PREPARE_BUF) and not queued yet, with their guest SG
    /// lists: a QBUF of a prepared buffer uses them (vb2 ignores the pointers QBUF
    /// passes for a prepared buffer).
    prepared: BTreeMap<u32, Queued>,
}

/// An MMAP plane the guest may map: where it is and how long.
#[derive(Debug, Clone, Copy)]
struct MmapPlane {
    buf_type: u32,
    index: u32,
    plane: u32,
    length: u32,
}

/// A session: one open host fd.
pub struct ProxySession {
    id: u32,
    // Declared before the queues: the host fd is closed (releasing the host's pins on
    // the USERPTR shadows) before the shadows are freed.
    device: File,
    /// The bytes of the host driver's MMAP buffers for this session.
    driver: DriverCharge,
    poller: OwnedFd,
    polling_buffers: bool,
    queues: BTreeMap<u32, QueueState>,
    mmap_planes: BTreeMap<u32, MmapPlane>,
}

impl std::fmt::Debug for ProxySession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxySession")
            .field("id", &self.id)
            .field("device", &self.device)
            .field("polling_buffers", &self.polling_buffers)
            .finish()
    }
}

impl MediaSession for ProxySession {
    fn poll_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.poller.as_fd())
    }
}

impl ProxySession {
    fn fd(&self) -> BorrowedFd<'_> {
        self.device.as_fd()
    }

    /// Bytes of the host driver's MMAP buffers on queue `buf_type`.
    fn driver_bytes(&self, buf_type: u32) -> usize {
        self.queues
            .get(&buf_type)
            .map_or(0, |q| q.driver_bytes.values().sum())
    }

    /// Charges the session's driver buffers again after a queue's changed.
    fn recharge(&mut self) {
        let bytes = self
            .queues
            .values()
            .flat_map(|q| q.driver_bytes.values())
            .fold(0usize, |a, b| a.saturating_add(*b));
        self.driver.set(bytes);
    }

    /// USERPTR shadow buffers the session holds.
    fn shadow_count(&self) -> usize {
        self.queues.values().map(|q| q.shadows.len()).sum()
    }

    /// Bytes of USERPTR shadow memory the session holds.
    fn shadow_bytes(&self) -> usize {
        self.queues
            .values()
            .flat_map(|q| q.shadows.values())
            .map(|s| s.len)
            .sum()
    }

    /// The host node went away (it answers `ENODEV` from now on, and polls ready
    /// forever): stops watching it, so the session's poll fd goes quiet once the error
    /// is reported. Returns `ENODEV`.
    fn gone(&mut self) -> Errno {
        outboard_protocol::log_limited!(
            log::Level::Warn,
            "v4l2 proxy: session {}: the host node is gone",
            self.id
        );
        if let Err(e) = epoll::delete(&self.poller, &self.device) {
            outboard_protocol::log_limited!(
                log::Level::Warn,
                "v4l2 proxy: session {}: epoll_ctl: {e}",
                self.id
            );
        }
        libc::ENODEV
    }

    /// Watches done buffers only while some queue streams with buffers queued.
    fn update_polling(&mut self) {
        let want = self
            .queues
            .values()
            .any(|q| q.streaming && !q.queued.is_empty());
        if want == self.polling_buffers {
            return;
        }
        let mut flags = epoll::EventFlags::PRI;
        if want {
            flags |= epoll::EventFlags::IN | epoll::EventFlags::OUT;
        }
        match epoll::modify(
            &self.poller,
            &self.device,
            epoll::EventData::new_u64(0),
            flags,
        ) {
            Ok(()) => self.polling_buffers = want,
            Err(e) => outboard_protocol::log_limited!(
                log::Level::Warn,
                "v4l2 proxy: session {}: epoll_ctl: {e}",
                self.id
            ),
        }
    }

    fn queue(&mut self, buf_type: u32) -> &mut QueueState {
        self.queues.entry(buf_type).or_default()
    }

    /// Drops what the host freed: buffers of `buf_type` after REQBUFS or STREAMOFF.
    fn forget_buffers(&mut self, buf_type: u32, free: bool) {
        let q = self.queue(buf_type);
        q.queued.clear();
        // STREAMOFF and REQBUFS unprepare every buffer.
        q.prepared.clear();
        if free {
            q.shadows.clear();
            q.guest_ptrs.clear();
            self.mmap_planes.retain(|_, p| p.buf_type != buf_type);
        }
        self.update_polling();
    }

    fn remember_mmap(&mut self, desc: &BufferDesc) {
        let b = &desc.buffer;
        if b.memory != MEMORY_MMAP {
            return;
        }
        if is_multiplanar(b.type_) {
            for (i, p) in desc.planes.iter().enumerate() {
                self.mmap_planes.insert(
                    p.m as u32,
                    MmapPlane {
                        buf_type: b.type_,
                        index: b.index,
                        plane: i as u32,
                        length: p.length,
                    },
                );
            }
        } else {
            self.mmap_planes.insert(
                b.mem_offset(),
                MmapPlane {
                    buf_type: b.type_,
                    index: b.index,
                    plane: 0,
                    length: b.length,
                },
            );
        }
    }
}

/// The V4L2 proxy device.
pub struct V4l2Proxy<Q: EventQueue, H: HostMemoryMapper, G: GuestMemoryMapper> {
    node: HostNode,
    events: Q,
    host: H,
    guest: G,
    /// Shared memory mappings and the sessions that made them.
    mappings: ShmMappings<()>,
    /// Bytes of USERPTR shadow memory all sessions hold ([`MAX_DEVICE_SHADOW`]).
    shadow_total: Arc<AtomicUsize>,
    /// Bytes of MMAP buffers the host driver holds for all sessions
    /// ([`MAX_DEVICE_DRIVER_BUFFERS`]).
    driver_total: Arc<AtomicUsize>,
    /// Where cap refusals are counted (the runner's, once attached).
    metrics: Arc<MediaMetrics>,
}

impl<Q: EventQueue, H: HostMemoryMapper, G: GuestMemoryMapper> std::fmt::Debug
    for V4l2Proxy<Q, H, G>
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("V4l2Proxy")
            .field("node", &self.node)
            .field("mappings", &self.mappings.len())
            .finish()
    }
}

impl<Q: EventQueue, H: HostMemoryMapper, G: GuestMemoryMapper> V4l2Proxy<Q, H, G> {
    /// A proxy for `node` ([`HostNode::probe`]) sending events to `events`, mapping MMAP
    /// buffers with `host` and USERPTR buffers with `guest`.
    pub fn new(node: HostNode, events: Q, host: H, guest: G) -> Self {
        V4l2Proxy {
            node,
            events,
            host,
            guest,
            mappings: ShmMappings::new("v4l2 proxy"),
            shadow_total: Arc::default(),
            driver_total: Arc::default(),
            metrics: Arc::default(),
        }
    }

    /// Bytes of USERPTR shadow memory all sessions hold.
    pub fn shadow_bytes(&self) -> usize {
        self.shadow_total.load(Ordering::Relaxed)
    }

    /// Counts and logs a USERPTR shadow or control payload copy refused by a budget;
    /// returns `errno`.
    fn shadow_refused(&self, session: u32, what: &str, errno: Errno) -> Errno {
        MediaMetrics::inc(&self.metrics.err_shadow_limit);
        outboard_protocol::log_limited!(
            log::Level::Warn,
            "v4l2 proxy: session {session}: {what}: refused (host memory budget)"
        );
        errno
    }

    /// Bytes of MMAP buffers the host driver holds for all sessions (as the proxy
    /// counts them, see [`MAX_DEVICE_DRIVER_BUFFERS`]).
    pub fn driver_bytes(&self) -> usize {
        self.driver_total.load(Ordering::Relaxed)
    }

    /// The bytes of one buffer of the driver's current format for `buf_type` (0 when
    /// the driver does not say).
    fn driver_format_bytes(s: &ProxySession, buf_type: u32) -> usize {
        let f = V4l2Format {
            type_: buf_type,
            ..Default::default()
        };
        fwd(s, V4l2Ioctl::VIDIOC_G_FMT, f).map_or(0, |f| format_bytes(&f))
    }

    /// How many of `count` MMAP buffers of `per` bytes session `s` may have the driver
    /// allocate on queue `buf_type` (whose buffers REQBUFS frees first: `replacing`);
    /// counts and logs a cut.
    fn grant_buffers(
        &self,
        s: &ProxySession,
        what: &str,
        buf_type: u32,
        count: u32,
        per: usize,
        replacing: bool,
    ) -> u32 {
        let held = self.driver_total.load(Ordering::Relaxed);
        let freed = if replacing {
            s.driver_bytes(buf_type)
        } else {
            0
        };
        let granted = buffers_that_fit(count, per, held.saturating_sub(freed));
        if granted < count {
            MediaMetrics::inc(&self.metrics.err_buffer_limit);
            outboard_protocol::log_limited!(
                log::Level::Warn,
                "v4l2 proxy: session {}: {what} of {count} MMAP buffers of {per} bytes: \
                 {granted} granted (host driver memory budget, {held} bytes held)",
                s.id
            );
        }
        granted
    }

    /// The host node.
    pub fn node(&self) -> &HostNode {
        &self.node
    }

    /// Number of live shared memory mappings.
    pub fn mapping_count(&self) -> usize {
        self.mappings.len()
    }

    /// Maps a guest SG list of at least `len` bytes.
    fn map_guest(&self, sgs: &[SgEntry], len: usize) -> IoctlResult<G::Mapping<'_>> {
        let m = self.guest.new_mapping(sgs)?;
        if m.len() < len {
            return Err(libc::EFAULT);
        }
        Ok(m)
    }

    /// QBUF or PREPARE_BUF.
    fn queue_buffer(
        &mut self,
        s: &mut ProxySession,
        ioctl: V4l2Ioctl,
        guest: GuestBuffer,
    ) -> IoctlResult<BufferDesc> {
        let GuestBuffer { desc, userptr } = guest;
        let BufferDesc {
            mut buffer,
            mut planes,
            ..
        } = desc;
        let mplane = is_multiplanar(buffer.type_);
        match buffer.memory {
            MEMORY_MMAP | MEMORY_USERPTR => {}
            _ => return Err(libc::EINVAL),
        }
        // No requests (the host would take the request fd from its own fd table): vb2's
        // answers on a queue without request support.
        if buffer.flags & BUF_FLAG_REQUEST_FD != 0 {
            return Err(if ioctl == V4l2Ioctl::VIDIOC_QBUF {
                EBADR
            } else {
                libc::EINVAL
            });
        }
        let mut guest_m = buffer.m;
        let mut guest_planes_m: Vec<u64> = planes.iter().map(|p| p.m).collect();
        let mut mappings: Vec<Option<Vec<SgEntry>>> = Vec::new();
        let prepared = match (buffer.memory, ioctl) {
            (MEMORY_USERPTR, V4l2Ioctl::VIDIOC_QBUF) => s
                .queues
                .get_mut(&buffer.type_)
                .and_then(|q| q.prepared.remove(&buffer.index)),
            _ => None,
        };
        let from_prepared = prepared.is_some();
        if let Some(prep) = prepared {
            // QBUF of a prepared buffer: the host keeps what PREPARE_BUF gave it and
            // ignores the pointers passed now. The shadows are passed anyway, with
            // their lengths, so that only a shadow can ever reach the host.
            let q = s.queue(buffer.type_);
            let nplanes = if mplane { planes.len() } else { 1 };
            for plane in 0..nplanes {
                let (addr, len) = q
                    .shadows
                    .get_mut(&(buffer.index, plane as u32))
                    .map_or((0, 0), |sh| (sh.addr(), sh.len as u32));
                if let (Some(Some(sgs)), Some(sh)) = (
                    prep.userptr.get(plane),
                    q.shadows.get_mut(&(buffer.index, plane as u32)),
                ) {
                    if is_output(buffer.type_) {
                        // Mapped now: the memory map may have changed since PREPARE_BUF.
                        let m = self.guest.new_mapping(sgs)?;
                        m.read_at(0, sh.bytes_mut());
                    }
                }
                if mplane {
                    if let Some(p) = planes.get_mut(plane) {
                        p.m = addr;
                        p.length = len;
                    }
                } else {
                    buffer.m = addr;
                    buffer.length = len;
                }
            }
            guest_m = prep.guest_m;
            guest_planes_m = prep.guest_planes_m;
            mappings = prep.userptr;
        } else if buffer.memory == MEMORY_USERPTR {
            // (plane, length, bytesused) of every plane; the dispatcher gave one SG list
            // per plane with a non-zero length, in order.
            let lens: Vec<(u32, u32, u32)> = if mplane {
                planes
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (i as u32, p.length, p.bytesused))
                    .collect()
            } else {
                vec![(0, buffer.length, buffer.bytesused)]
            };
            let mut sgs = userptr.iter();
            let mut shadow_bytes = s.shadow_bytes();
            let mut shadow_count = s.shadow_count();
            let id = s.id;
            let q = s.queues.entry(buffer.type_).or_default();
            // Shadows are host memory: only for buffers the host has, within a budget.
            if buffer.index >= q.buffers {
                return Err(libc::EINVAL);
            }
            // The host has the shadows of a queued or prepared buffer pinned (its device
            // may be writing them): they must not be replaced, and vb2 refuses to queue
            // or prepare such a buffer again anyway.
            if q.queued.contains_key(&buffer.index) || q.prepared.contains_key(&buffer.index) {
                return Err(libc::EINVAL);
            }
            for (plane, len, used) in lens {
                if len == 0 {
                    mappings.push(None);
                    continue;
                }
                let sg = sgs.next().ok_or(libc::EINVAL)?;
                let m = self.map_guest(sg, len as usize)?;
                let key = (buffer.index, plane);
                let old = q.shadows.get(&key).map(|sh| sh.len);
                if old != Some(len as usize) {
                    let (len, old_len) = (len as usize, old.unwrap_or(0));
                    if len > MAX_SHADOW_LEN {
                        return Err(self.shadow_refused(id, "USERPTR plane", libc::EINVAL));
                    }
                    if old.is_none() {
                        shadow_count += 1;
                    }
                    shadow_bytes = shadow_bytes - old_len + len;
                    let device_bytes = self.shadow_bytes() - old_len + len;
                    if shadow_count > MAX_SESSION_SHADOWS
                        || shadow_bytes > MAX_SESSION_SHADOW
                        || device_bytes > MAX_DEVICE_SHADOW
                    {
                        return Err(self.shadow_refused(id, "USERPTR shadow", libc::ENOMEM));
                    }
                    q.shadows.insert(key, Shadow::new(len, &self.shadow_total)?);
                }
                let shadow = q.shadows.get_mut(&key).ok_or(libc::EINVAL)?;
                if is_output(buffer.type_) {
                    let n = if used == 0 { len } else { used.min(len) } as usize;
                    m.read_at(0, &mut shadow.bytes_mut()[..n]);
                }
                let addr = shadow.addr();
                if mplane {
                    if let Some(p) = planes.get_mut(plane as usize) {
                        p.m = addr;
                    }
                } else {
                    buffer.m = addr;
                }
                drop(m);
                mappings.push(Some(sg.clone()));
            }
        }
        if mplane {
            buffer.m = planes.as_mut_ptr() as u64;
            buffer.length = planes.len() as u32;
        }
        // SAFETY: the plane pointer points at `planes` (`buffer.length` entries) and
        // USERPTR planes at shadow buffers of their `length`, all alive across the call
        // (the shadows until the host frees its buffers).
        let res = unsafe { raw_ioctl(s.fd(), ioctl, &mut buffer) };
        if let Err(e) = res {
            if from_prepared {
                // Still prepared on the host.
                s.queue(buffer.type_).prepared.insert(
                    buffer.index,
                    Queued {
                        guest_m,
                        guest_planes_m,
                        userptr: mappings,
                    },
                );
            }
            return Err(e);
        }
        // No host pointer goes back: the guest's own values (MMAP offsets stay).
        if mplane || buffer.memory == MEMORY_USERPTR {
            buffer.m = guest_m;
        }
        if buffer.memory == MEMORY_USERPTR {
            for (p, m) in planes.iter_mut().zip(&guest_planes_m) {
                p.m = *m;
            }
            s.queue(buffer.type_)
                .guest_ptrs
                .insert(buffer.index, (guest_m, guest_planes_m.clone()));
        }
        if ioctl == V4l2Ioctl::VIDIOC_QBUF {
            let q = s.queue(buffer.type_);
            q.memory = buffer.memory;
            q.queued.insert(
                buffer.index,
                Queued {
                    guest_m,
                    guest_planes_m,
                    userptr: mappings,
                },
            );
            s.update_polling();
        } else if buffer.memory == MEMORY_USERPTR {
            // Prepared: the host pinned the shadows; the guest mappings are kept for the
            // QBUF that queues the buffer.
            s.queue(buffer.type_).prepared.insert(
                buffer.index,
                Queued {
                    guest_m,
                    guest_planes_m,
                    userptr: mappings,
                },
            );
        }
        Ok(BufferDesc {
            buffer,
            planes,
            ..Default::default()
        })
    }

    /// Dequeues every done buffer of `buf_type`; returns whether the queue is empty.
    fn dequeue_buffers(&mut self, s: &mut ProxySession, buf_type: u32) -> IoctlResult<()> {
        let Some(memory) = s.queues.get(&buf_type).map(|q| q.memory) else {
            return Ok(());
        };
        loop {
            let mut planes = [V4l2Plane::default(); VIDEO_MAX_PLANES];
            let mut buffer = V4l2Buffer {
                type_: buf_type,
                memory,
                ..Default::default()
            };
            if is_multiplanar(buf_type) {
                buffer.m = planes.as_mut_ptr() as u64;
                buffer.length = VIDEO_MAX_PLANES as u32;
            }
            // SAFETY: the plane pointer (multi-planar types) points at `planes`, whose
            // `VIDEO_MAX_PLANES` entries live across the call.
            match unsafe { raw_ioctl(s.fd(), V4l2Ioctl::VIDIOC_DQBUF, &mut buffer) } {
                Ok(()) => {}
                Err(libc::EAGAIN) | Err(libc::EPIPE) => return Ok(()),
                Err(e) => return Err(e),
            }
            let nplanes = if is_multiplanar(buf_type) {
                (buffer.length as usize).min(VIDEO_MAX_PLANES)
            } else {
                0
            };
            let mut planes = planes[..nplanes].to_vec();
            let sid = s.id;
            let q = s.queue(buf_type);
            let queued = q.queued.remove(&buffer.index);
            if let Some(qd) = &queued {
                if buffer.memory == MEMORY_USERPTR {
                    let capture = !is_output(buf_type);
                    for (i, sgs) in qd.userptr.iter().enumerate() {
                        let (Some(sgs), Some(sh)) = (sgs, q.shadows.get(&(buffer.index, i as u32)))
                        else {
                            continue;
                        };
                        if capture {
                            let used = if is_multiplanar(buf_type) {
                                planes.get(i).map_or(0, |p| p.bytesused)
                            } else {
                                buffer.bytesused
                            };
                            let n = (used as usize).min(sh.len);
                            // Mapped now, not at QBUF: what the guest's addresses mean
                            // today. Memory the guest no longer has gets nothing, and
                            // the buffer comes back marked as an error.
                            let written = self
                                .guest
                                .new_mapping(sgs)
                                .map(|m| m.write_at(0, &sh.bytes()[..n]));
                            if written != Ok(n) {
                                outboard_protocol::log_limited!(
                                    log::Level::Warn,
                                    "v4l2 proxy: session {}: USERPTR buffer {} plane {i} is \
                                     no longer guest memory; returned with the error flag",
                                    sid,
                                    buffer.index
                                );
                                buffer.flags |= BUF_FLAG_ERROR;
                                buffer.bytesused = 0;
                                planes.iter_mut().for_each(|p| p.bytesused = 0);
                            }
                        }
                    }
                    buffer.m = qd.guest_m;
                    for (p, gm) in planes.iter_mut().zip(&qd.guest_planes_m) {
                        p.m = *gm;
                    }
                }
            } else if buffer.memory == MEMORY_USERPTR {
                buffer.m = 0;
                planes.iter_mut().for_each(|p| p.m = 0);
            }
            if is_multiplanar(buf_type) {
                buffer.m = 0;
            }
            self.events
                .send_event(MediaEvent::dqbuf(s.id, &buffer, &planes));
        }
    }

    /// Forwards extended controls with their payloads copied to and from the guest.
    fn ext_ctrls(
        &mut self,
        s: &mut ProxySession,
        ioctl: V4l2Ioctl,
        ctrls: &mut ExtControls,
    ) -> IoctlResult<()> {
        // Without request support the V4L2 core answers EINVAL; the host would look the
        // guest's request fd up in its own fd table.
        if ctrls.header.which == CTRL_WHICH_REQUEST_VAL {
            return Err(libc::EINVAL);
        }
        let mut payloads = ctrls.payloads.iter();
        let mut host: Vec<Option<(G::Mapping<'_>, Vec<u8>)>> = Vec::new();
        let saved: Vec<[u8; 8]> = ctrls.controls.iter().map(|c| c.value).collect();
        let total = ctrls
            .controls
            .iter()
            .fold(0usize, |a, c| a.saturating_add(c.size as usize));
        if total > MAX_SHADOW_LEN {
            return Err(self.shadow_refused(s.id, "control payloads", libc::ENOMEM));
        }
        for c in ctrls.controls.iter_mut() {
            if c.size == 0 {
                host.push(None);
                continue;
            }
            let size = c.size as usize;
            let sg = payloads.next().ok_or(libc::EINVAL)?;
            let m = self.map_guest(sg, size)?;
            let mut buf = vec![0u8; size];
            m.read_at(0, &mut buf);
            c.value = (buf.as_mut_ptr() as u64).to_ne_bytes();
            host.push(Some((m, buf)));
        }
        let mut header = ctrls.header;
        header.count = ctrls.controls.len() as u32;
        header.controls = ctrls.controls.as_mut_ptr() as u64;
        // SAFETY: `controls` points at `header.count` controls, and every control with a
        // size points at a host buffer of that size; all live across the call.
        let res = unsafe { raw_ioctl(s.fd(), ioctl, &mut header) };
        header.controls = 0;
        ctrls.header = header;
        for ((c, h), v) in ctrls.controls.iter_mut().zip(&host).zip(saved) {
            if let Some((m, buf)) = h {
                if ioctl == V4l2Ioctl::VIDIOC_G_EXT_CTRLS || res.is_ok() {
                    m.write_at(0, &buf[..(c.size as usize).min(buf.len())]);
                }
                c.value = v;
            }
        }
        res
    }
}

fn fwd<T: IntoBytes + FromBytes>(s: &ProxySession, ioctl: V4l2Ioctl, mut arg: T) -> IoctlResult<T> {
    plain_ioctl(s.fd(), ioctl, &mut arg)?;
    Ok(arg)
}

impl<Q: EventQueue, H: HostMemoryMapper, G: GuestMemoryMapper> IoctlHandler for V4l2Proxy<Q, H, G> {
    type Session = ProxySession;

    fn metrics(&self) -> Option<&MediaMetrics> {
        Some(&self.metrics)
    }

    fn enum_fmt(&mut self, s: &mut Self::Session, d: V4l2Fmtdesc) -> IoctlResult<V4l2Fmtdesc> {
        no_overlay(d.type_)?;
        fwd(s, V4l2Ioctl::VIDIOC_ENUM_FMT, d)
    }

    fn g_fmt(&mut self, s: &mut Self::Session, buf_type: u32) -> IoctlResult<V4l2Format> {
        no_overlay(buf_type)?;
        let f = V4l2Format {
            type_: buf_type,
            ..Default::default()
        };
        fwd(s, V4l2Ioctl::VIDIOC_G_FMT, f)
    }

    fn s_fmt(&mut self, s: &mut Self::Session, f: V4l2Format) -> IoctlResult<V4l2Format> {
        no_overlay(f.type_)?;
        fwd(s, V4l2Ioctl::VIDIOC_S_FMT, f)
    }

    fn try_fmt(&mut self, s: &mut Self::Session, f: V4l2Format) -> IoctlResult<V4l2Format> {
        no_overlay(f.type_)?;
        fwd(s, V4l2Ioctl::VIDIOC_TRY_FMT, f)
    }

    fn reqbufs(
        &mut self,
        s: &mut Self::Session,
        req: V4l2Requestbuffers,
    ) -> IoctlResult<V4l2Requestbuffers> {
        if req.memory == MEMORY_DMABUF {
            return Err(libc::EINVAL);
        }
        let mut req = req;
        let mut per = 0;
        if req.memory == MEMORY_MMAP && req.count > 0 {
            per = Self::driver_format_bytes(s, req.type_);
            req.count = self.grant_buffers(s, "REQBUFS", req.type_, req.count, per, true);
            if req.count == 0 {
                return Err(libc::ENOMEM);
            }
        }
        let mut out = fwd(s, V4l2Ioctl::VIDIOC_REQBUFS, req)?;
        out.capabilities = carried_buf_caps(out.capabilities);
        s.forget_buffers(req.type_, true);
        let q = s.queue(req.type_);
        q.memory = req.memory;
        q.buffers = out.count;
        // What the driver allocated (it may grant more than asked: vb2's minimum).
        q.driver_bytes = if req.memory == MEMORY_MMAP {
            (0..out.count).map(|i| (i, per)).collect()
        } else {
            BTreeMap::new()
        };
        if req.count == 0 {
            q.streaming = false;
        }
        s.recharge();
        s.update_polling();
        Ok(out)
    }

    fn querybuf(
        &mut self,
        s: &mut Self::Session,
        buf_type: u32,
        index: u32,
    ) -> IoctlResult<BufferDesc> {
        let mut planes = [V4l2Plane::default(); VIDEO_MAX_PLANES];
        let mut buffer = V4l2Buffer {
            type_: buf_type,
            index,
            ..Default::default()
        };
        if is_multiplanar(buf_type) {
            buffer.m = planes.as_mut_ptr() as u64;
            buffer.length = VIDEO_MAX_PLANES as u32;
        }
        // SAFETY: the plane pointer (multi-planar types) points at `planes`, whose
        // `VIDEO_MAX_PLANES` entries live across the call.
        unsafe { raw_ioctl(s.fd(), V4l2Ioctl::VIDIOC_QUERYBUF, &mut buffer) }?;
        let n = if is_multiplanar(buf_type) {
            (buffer.length as usize).min(VIDEO_MAX_PLANES)
        } else {
            0
        };
        let mut desc = BufferDesc {
            buffer,
            planes: planes[..n].to_vec(),
            ..Default::default()
        };
        if is_multiplanar(buf_type) {
            desc.buffer.m = 0;
        }
        s.remember_mmap(&desc);
        if desc.buffer.memory == MEMORY_USERPTR {
            let ptrs = s
                .queues
                .get(&buf_type)
                .and_then(|q| q.guest_ptrs.get(&index));
            desc.buffer.m = ptrs.map_or(0, |p| p.0);
            for (i, p) in desc.planes.iter_mut().enumerate() {
                p.m = ptrs.and_then(|g| g.1.get(i).copied()).unwrap_or(0);
            }
            if is_multiplanar(buf_type) {
                desc.buffer.m = 0;
            }
        }
        Ok(desc)
    }

    fn qbuf(&mut self, s: &mut Self::Session, b: GuestBuffer) -> IoctlResult<BufferDesc> {
        self.queue_buffer(s, V4l2Ioctl::VIDIOC_QBUF, b)
    }

    fn prepare_buf(&mut self, s: &mut Self::Session, b: GuestBuffer) -> IoctlResult<BufferDesc> {
        self.queue_buffer(s, V4l2Ioctl::VIDIOC_PREPARE_BUF, b)
    }

    fn create_bufs(
        &mut self,
        s: &mut Self::Session,
        c: V4l2CreateBuffers,
    ) -> IoctlResult<V4l2CreateBuffers> {
        if c.memory == MEMORY_DMABUF {
            return Err(libc::EINVAL);
        }
        // The format's window would hold pointers (vb2 has no overlay queue anyway).
        no_overlay(c.format.type_)?;
        let mut c = c;
        let mut per = 0;
        if c.memory == MEMORY_MMAP && c.count > 0 {
            // vb2 allocates the larger of what the guest asks and what the format needs.
            per = format_bytes(&c.format).max(Self::driver_format_bytes(s, c.format.type_));
            let granted = self.grant_buffers(s, "CREATE_BUFS", c.format.type_, c.count, per, false);
            if granted == 0 {
                return Err(libc::ENOMEM);
            }
            c.count = granted;
        }
        let mut out = fwd(s, V4l2Ioctl::VIDIOC_CREATE_BUFS, c)?;
        out.capabilities = carried_buf_caps(out.capabilities);
        if c.count > 0 {
            let q = s.queue(c.format.type_);
            q.memory = c.memory;
            q.buffers = q.buffers.max(out.index.saturating_add(out.count));
            if c.memory == MEMORY_MMAP {
                for i in 0..out.count {
                    q.driver_bytes.insert(out.index.saturating_add(i), per);
                }
            }
            s.recharge();
        }
        Ok(out)
    }

    fn remove_bufs(
        &mut self,
        s: &mut Self::Session,
        r: V4l2RemoveBuffers,
    ) -> IoctlResult<V4l2RemoveBuffers> {
        let out = fwd(s, V4l2Ioctl::VIDIOC_REMOVE_BUFS, r)?;
        let q = s.queue(r.type_);
        let end = r.index.saturating_add(r.count);
        q.shadows.retain(|(i, _), _| *i < r.index || *i >= end);
        q.guest_ptrs.retain(|i, _| *i < r.index || *i >= end);
        q.prepared.retain(|i, _| *i < r.index || *i >= end);
        q.driver_bytes.retain(|i, _| *i < r.index || *i >= end);
        s.recharge();
        s.mmap_planes
            .retain(|_, p| p.buf_type != r.type_ || p.index < r.index || p.index >= end);
        Ok(out)
    }

    fn streamon(&mut self, s: &mut Self::Session, buf_type: u32) -> IoctlResult<()> {
        fwd(s, V4l2Ioctl::VIDIOC_STREAMON, buf_type)?;
        s.queue(buf_type).streaming = true;
        s.update_polling();
        Ok(())
    }

    fn streamoff(&mut self, s: &mut Self::Session, buf_type: u32) -> IoctlResult<()> {
        fwd(s, V4l2Ioctl::VIDIOC_STREAMOFF, buf_type)?;
        s.queue(buf_type).streaming = false;
        // STREAMOFF returns every queued buffer to the application, undone.
        s.forget_buffers(buf_type, false);
        Ok(())
    }

    fn g_parm(&mut self, s: &mut Self::Session, buf_type: u32) -> IoctlResult<V4l2Streamparm> {
        let p = V4l2Streamparm {
            type_: buf_type,
            ..Default::default()
        };
        let mut out = fwd(s, V4l2Ioctl::VIDIOC_G_PARM, p)?;
        clear_rw_buffers(&mut out);
        Ok(out)
    }

    fn s_parm(&mut self, s: &mut Self::Session, p: V4l2Streamparm) -> IoctlResult<V4l2Streamparm> {
        let mut out = fwd(s, V4l2Ioctl::VIDIOC_S_PARM, p)?;
        clear_rw_buffers(&mut out);
        Ok(out)
    }

    fn g_std(&mut self, s: &mut Self::Session) -> IoctlResult<u64> {
        fwd(s, V4l2Ioctl::VIDIOC_G_STD, 0u64)
    }

    fn s_std(&mut self, s: &mut Self::Session, std: u64) -> IoctlResult<()> {
        fwd(s, V4l2Ioctl::VIDIOC_S_STD, std).map(drop)
    }

    fn querystd(&mut self, s: &mut Self::Session) -> IoctlResult<u64> {
        fwd(s, V4l2Ioctl::VIDIOC_QUERYSTD, 0u64)
    }

    fn enumstd(&mut self, s: &mut Self::Session, index: u32) -> IoctlResult<V4l2Standard> {
        let e = V4l2Standard {
            index,
            ..Default::default()
        };
        fwd(s, V4l2Ioctl::VIDIOC_ENUMSTD, e)
    }

    fn enuminput(&mut self, s: &mut Self::Session, index: u32) -> IoctlResult<V4l2Input> {
        let i = V4l2Input {
            index,
            ..Default::default()
        };
        fwd(s, V4l2Ioctl::VIDIOC_ENUMINPUT, i)
    }

    fn g_input(&mut self, s: &mut Self::Session) -> IoctlResult<i32> {
        fwd(s, V4l2Ioctl::VIDIOC_G_INPUT, 0i32)
    }

    fn s_input(&mut self, s: &mut Self::Session, input: i32) -> IoctlResult<i32> {
        fwd(s, V4l2Ioctl::VIDIOC_S_INPUT, input)
    }

    fn enumoutput(&mut self, s: &mut Self::Session, index: u32) -> IoctlResult<V4l2Output> {
        let o = V4l2Output {
            index,
            ..Default::default()
        };
        fwd(s, V4l2Ioctl::VIDIOC_ENUMOUTPUT, o)
    }

    fn g_output(&mut self, s: &mut Self::Session) -> IoctlResult<i32> {
        fwd(s, V4l2Ioctl::VIDIOC_G_OUTPUT, 0i32)
    }

    fn s_output(&mut self, s: &mut Self::Session, output: i32) -> IoctlResult<i32> {
        fwd(s, V4l2Ioctl::VIDIOC_S_OUTPUT, output)
    }

    fn g_ctrl(&mut self, s: &mut Self::Session, id: u32) -> IoctlResult<V4l2Control> {
        fwd(s, V4l2Ioctl::VIDIOC_G_CTRL, V4l2Control { id, value: 0 })
    }

    fn s_ctrl(&mut self, s: &mut Self::Session, c: V4l2Control) -> IoctlResult<V4l2Control> {
        fwd(s, V4l2Ioctl::VIDIOC_S_CTRL, c)
    }

    fn queryctrl(&mut self, s: &mut Self::Session, q: V4l2Queryctrl) -> IoctlResult<V4l2Queryctrl> {
        fwd(s, V4l2Ioctl::VIDIOC_QUERYCTRL, q)
    }

    fn query_ext_ctrl(
        &mut self,
        s: &mut Self::Session,
        q: V4l2QueryExtCtrl,
    ) -> IoctlResult<V4l2QueryExtCtrl> {
        fwd(s, V4l2Ioctl::VIDIOC_QUERY_EXT_CTRL, q)
    }

    fn querymenu(
        &mut self,
        s: &mut Self::Session,
        id: u32,
        index: u32,
    ) -> IoctlResult<V4l2Querymenu> {
        let q = V4l2Querymenu {
            id,
            index,
            ..Default::default()
        };
        fwd(s, V4l2Ioctl::VIDIOC_QUERYMENU, q)
    }

    fn g_ext_ctrls(&mut self, s: &mut Self::Session, c: &mut ExtControls) -> IoctlResult<()> {
        self.ext_ctrls(s, V4l2Ioctl::VIDIOC_G_EXT_CTRLS, c)
    }

    fn s_ext_ctrls(&mut self, s: &mut Self::Session, c: &mut ExtControls) -> IoctlResult<()> {
        self.ext_ctrls(s, V4l2Ioctl::VIDIOC_S_EXT_CTRLS, c)
    }

    fn try_ext_ctrls(&mut self, s: &mut Self::Session, c: &mut ExtControls) -> IoctlResult<()> {
        self.ext_ctrls(s, V4l2Ioctl::VIDIOC_TRY_EXT_CTRLS, c)
    }

    fn enum_framesizes(
        &mut self,
        s: &mut Self::Session,
        q: V4l2Frmsizeenum,
    ) -> IoctlResult<V4l2Frmsizeenum> {
        fwd(s, V4l2Ioctl::VIDIOC_ENUM_FRAMESIZES, q)
    }

    fn enum_frameintervals(
        &mut self,
        s: &mut Self::Session,
        q: V4l2Frmivalenum,
    ) -> IoctlResult<V4l2Frmivalenum> {
        fwd(s, V4l2Ioctl::VIDIOC_ENUM_FRAMEINTERVALS, q)
    }

    fn subscribe_event(
        &mut self,
        s: &mut Self::Session,
        sub: V4l2EventSubscription,
    ) -> IoctlResult<()> {
        fwd(s, V4l2Ioctl::VIDIOC_SUBSCRIBE_EVENT, sub).map(drop)
    }

    fn unsubscribe_event(
        &mut self,
        s: &mut Self::Session,
        sub: V4l2EventSubscription,
    ) -> IoctlResult<()> {
        fwd(s, V4l2Ioctl::VIDIOC_UNSUBSCRIBE_EVENT, sub).map(drop)
    }

    fn g_selection(
        &mut self,
        s: &mut Self::Session,
        q: V4l2Selection,
    ) -> IoctlResult<V4l2Selection> {
        fwd(s, V4l2Ioctl::VIDIOC_G_SELECTION, q)
    }

    fn s_selection(
        &mut self,
        s: &mut Self::Session,
        q: V4l2Selection,
    ) -> IoctlResult<V4l2Selection> {
        fwd(s, V4l2Ioctl::VIDIOC_S_SELECTION, q)
    }

    fn g_tuner(&mut self, s: &mut Self::Session, a: RawArg<84>) -> IoctlResult<RawArg<84>> {
        fwd(s, V4l2Ioctl::VIDIOC_G_TUNER, a)
    }

    fn s_tuner(&mut self, s: &mut Self::Session, a: RawArg<84>) -> IoctlResult<()> {
        fwd(s, V4l2Ioctl::VIDIOC_S_TUNER, a).map(drop)
    }

    fn g_audio(&mut self, s: &mut Self::Session) -> IoctlResult<RawArg<52>> {
        fwd(s, V4l2Ioctl::VIDIOC_G_AUDIO, [0u8; 52])
    }

    fn s_audio(&mut self, s: &mut Self::Session, a: RawArg<52>) -> IoctlResult<()> {
        fwd(s, V4l2Ioctl::VIDIOC_S_AUDIO, a).map(drop)
    }

    fn enumaudio(&mut self, s: &mut Self::Session, a: RawArg<52>) -> IoctlResult<RawArg<52>> {
        fwd(s, V4l2Ioctl::VIDIOC_ENUMAUDIO, a)
    }

    fn g_audout(&mut self, s: &mut Self::Session) -> IoctlResult<RawArg<52>> {
        fwd(s, V4l2Ioctl::VIDIOC_G_AUDOUT, [0u8; 52])
    }

    fn s_audout(&mut self, s: &mut Self::Session, a: RawArg<52>) -> IoctlResult<()> {
        fwd(s, V4l2Ioctl::VIDIOC_S_AUDOUT, a).map(drop)
    }

    fn enumaudout(&mut self, s: &mut Self::Session, a: RawArg<52>) -> IoctlResult<RawArg<52>> {
        fwd(s, V4l2Ioctl::VIDIOC_ENUMAUDOUT, a)
    }

    fn g_modulator(&mut self, s: &mut Self::Session, a: RawArg<68>) -> IoctlResult<RawArg<68>> {
        fwd(s, V4l2Ioctl::VIDIOC_G_MODULATOR, a)
    }

    fn s_modulator(&mut self, s: &mut Self::Session, a: RawArg<68>) -> IoctlResult<()> {
        fwd(s, V4l2Ioctl::VIDIOC_S_MODULATOR, a).map(drop)
    }

    fn g_frequency(&mut self, s: &mut Self::Session, a: RawArg<44>) -> IoctlResult<RawArg<44>> {
        fwd(s, V4l2Ioctl::VIDIOC_G_FREQUENCY, a)
    }

    fn s_frequency(&mut self, s: &mut Self::Session, a: RawArg<44>) -> IoctlResult<()> {
        fwd(s, V4l2Ioctl::VIDIOC_S_FREQUENCY, a).map(drop)
    }

    fn enum_freq_bands(&mut self, s: &mut Self::Session, a: RawArg<64>) -> IoctlResult<RawArg<64>> {
        fwd(s, V4l2Ioctl::VIDIOC_ENUM_FREQ_BANDS, a)
    }

    fn s_hw_freq_seek(&mut self, s: &mut Self::Session, a: RawArg<48>) -> IoctlResult<()> {
        fwd(s, V4l2Ioctl::VIDIOC_S_HW_FREQ_SEEK, a).map(drop)
    }

    fn g_sliced_vbi_cap(
        &mut self,
        s: &mut Self::Session,
        a: RawArg<116>,
    ) -> IoctlResult<RawArg<116>> {
        fwd(s, V4l2Ioctl::VIDIOC_G_SLICED_VBI_CAP, a)
    }

    fn s_dv_timings(&mut self, s: &mut Self::Session, a: RawArg<132>) -> IoctlResult<RawArg<132>> {
        fwd(s, V4l2Ioctl::VIDIOC_S_DV_TIMINGS, a)
    }

    fn g_dv_timings(&mut self, s: &mut Self::Session, a: RawArg<132>) -> IoctlResult<RawArg<132>> {
        fwd(s, V4l2Ioctl::VIDIOC_G_DV_TIMINGS, a)
    }

    fn query_dv_timings(&mut self, s: &mut Self::Session) -> IoctlResult<RawArg<132>> {
        fwd(s, V4l2Ioctl::VIDIOC_QUERY_DV_TIMINGS, [0u8; 132])
    }

    fn enum_dv_timings(
        &mut self,
        s: &mut Self::Session,
        a: RawArg<148>,
    ) -> IoctlResult<RawArg<148>> {
        fwd(s, V4l2Ioctl::VIDIOC_ENUM_DV_TIMINGS, a)
    }

    fn dv_timings_cap(
        &mut self,
        s: &mut Self::Session,
        a: RawArg<144>,
    ) -> IoctlResult<RawArg<144>> {
        fwd(s, V4l2Ioctl::VIDIOC_DV_TIMINGS_CAP, a)
    }

    fn g_enc_index(&mut self, s: &mut Self::Session) -> IoctlResult<RawArg<2072>> {
        fwd(s, V4l2Ioctl::VIDIOC_G_ENC_INDEX, [0u8; 2072])
    }

    fn encoder_cmd(&mut self, s: &mut Self::Session, a: RawArg<40>) -> IoctlResult<RawArg<40>> {
        fwd(s, V4l2Ioctl::VIDIOC_ENCODER_CMD, a)
    }

    fn try_encoder_cmd(&mut self, s: &mut Self::Session, a: RawArg<40>) -> IoctlResult<RawArg<40>> {
        fwd(s, V4l2Ioctl::VIDIOC_TRY_ENCODER_CMD, a)
    }

    fn decoder_cmd(&mut self, s: &mut Self::Session, a: RawArg<72>) -> IoctlResult<RawArg<72>> {
        fwd(s, V4l2Ioctl::VIDIOC_DECODER_CMD, a)
    }

    fn try_decoder_cmd(&mut self, s: &mut Self::Session, a: RawArg<72>) -> IoctlResult<RawArg<72>> {
        fwd(s, V4l2Ioctl::VIDIOC_TRY_DECODER_CMD, a)
    }
}

impl<Q: EventQueue, H: HostMemoryMapper, G: GuestMemoryMapper> MediaDevice for V4l2Proxy<Q, H, G> {
    type Session = ProxySession;

    fn new_session(&mut self, session_id: u32) -> Result<Self::Session, Errno> {
        let device = open_node(&self.node.path).map_err(|e| {
            outboard_protocol::log_limited!(
                log::Level::Warn,
                "v4l2 proxy: opening {}: {e}",
                self.node.path.display()
            );
            e.raw_os_error().unwrap_or(libc::EIO)
        })?;
        let poller = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(|e| e.raw_os_error())?;
        epoll::add(
            &poller,
            &device,
            epoll::EventData::new_u64(0),
            epoll::EventFlags::PRI,
        )
        .map_err(|e| e.raw_os_error())?;
        Ok(ProxySession {
            id: session_id,
            device,
            driver: DriverCharge {
                bytes: 0,
                total: self.driver_total.clone(),
            },
            poller,
            polling_buffers: false,
            queues: BTreeMap::new(),
            mmap_planes: BTreeMap::new(),
        })
    }

    fn close_session(&mut self, session: Self::Session) {
        self.mappings.unmap_session(&mut self.host, session.id);
        // Dropping the session closes the host fd before the shadows are freed.
        drop(session);
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
        let plane = *s.mmap_planes.get(&offset).ok_or(libc::EINVAL)?;
        // Before the export: a refused MMAP costs the host nothing.
        self.mappings.check_room(&self.metrics)?;
        let rw = flags & MMAP_FLAG_RW != 0;
        let queue = v4l2r::QueueType::n(plane.buf_type).ok_or(libc::EINVAL)?;
        let mut eflags = v4l2r::ioctl::ExpbufFlags::CLOEXEC;
        eflags |= if rw {
            v4l2r::ioctl::ExpbufFlags::RDWR
        } else {
            v4l2r::ioctl::ExpbufFlags::RDONLY
        };
        let fd: OwnedFd = v4l2r::ioctl::expbuf(
            &s.device,
            queue,
            plane.index as usize,
            plane.plane as usize,
            eflags,
        )
        .map_err(|e| v4l2r::nix::errno::Errno::from(e) as i32)?;
        let len = page_align(plane.length.into())
            .filter(|l| *l > 0)
            .ok_or(libc::EINVAL)?;
        let addr =
            self.mappings
                .map(&mut self.host, &self.metrics, s.id, (), fd.as_fd(), len, rw)?;
        Ok((addr, len))
    }

    fn do_munmap(&mut self, driver_addr: u64) -> Result<(), Errno> {
        self.mappings.unmap(&mut self.host, driver_addr)
    }

    fn attach_metrics(&mut self, metrics: Arc<MediaMetrics>) {
        self.metrics = metrics;
    }

    fn process_events(&mut self, s: &mut Self::Session) -> Result<(), Errno> {
        // V4L2 events first: a source change precedes the buffers it affects.
        loop {
            let mut ev = V4l2Event::default();
            match plain_ioctl(s.fd(), V4l2Ioctl::VIDIOC_DQEVENT, &mut ev) {
                Ok(()) => self.events.send_event(MediaEvent::v4l2(s.id, &ev)),
                Err(libc::ENOENT) => break,
                Err(libc::ENODEV) => return Err(s.gone()),
                Err(e) => {
                    outboard_protocol::log_limited!(
                        log::Level::Warn,
                        "v4l2 proxy: session {}: DQEVENT: errno {e}",
                        s.id
                    );
                    break;
                }
            }
        }
        let types: Vec<u32> = s
            .queues
            .iter()
            .filter(|(_, q)| q.streaming && !q.queued.is_empty())
            .map(|(t, _)| *t)
            .collect();
        let mut result = Ok(());
        for t in types {
            if let Err(e) = self.dequeue_buffers(s, t) {
                outboard_protocol::log_limited!(
                    log::Level::Warn,
                    "v4l2 proxy: session {}: DQBUF type {t}: errno {e}",
                    s.id
                );
                // Stop watching a queue that fails: a level-triggered poller would spin.
                s.queue(t).streaming = false;
                result = Err(e);
            }
        }
        s.update_polling();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_non_v4l2_nodes_are_refused_by_name() {
        let e = HostNode::probe(Path::new("/nonexistent/video7")).unwrap_err();
        assert!(matches!(e, ProxyError::Open { .. }), "{e}");
        assert!(e.to_string().contains("/nonexistent/video7"), "{e}");
        let e = HostNode::probe(Path::new("/dev/null")).unwrap_err();
        assert!(matches!(e, ProxyError::NotV4l2 { .. }), "{e}");
        assert!(e.to_string().contains("/dev/null"), "{e}");
    }

    #[test]
    fn shadows_are_page_aligned_and_bounded() {
        let charged = Arc::new(AtomicUsize::new(0));
        let mut s = Shadow::new(5000, &charged).unwrap();
        assert_eq!(s.addr() % 4096, 0);
        assert_eq!(s.bytes().len(), 5000);
        assert_eq!(charged.load(Ordering::Relaxed), 5000);
        assert_eq!(Shadow::new(0, &charged).unwrap_err(), libc::EINVAL);
        assert_eq!(
            Shadow::new(MAX_SHADOW_LEN + 1, &charged).unwrap_err(),
            libc::EINVAL
        );
        drop(s);
        assert_eq!(charged.load(Ordering::Relaxed), 0);
    }

    /// Guest memory of any size, all zeros, costing nothing.
    struct AnyGuest;

    struct Zeros(usize);

    impl GuestMemoryRange for Zeros {
        fn len(&self) -> usize {
            self.0
        }
        fn write_at(&self, _: usize, src: &[u8]) -> usize {
            src.len()
        }
        fn read_at(&self, _: usize, dst: &mut [u8]) -> usize {
            dst.fill(0);
            dst.len()
        }
    }

    impl GuestMemoryMapper for AnyGuest {
        type Mapping<'m> = Zeros;
        fn new_mapping(&self, sgs: &[SgEntry]) -> Result<Zeros, Errno> {
            Ok(Zeros(sgs.iter().map(|e| e.len as usize).sum()))
        }
    }

    type TestProxy = V4l2Proxy<super::super::EventBuffer, (), AnyGuest>;

    fn proxy() -> TestProxy {
        let node = HostNode {
            path: "/dev/null".into(),
            driver: "null".into(),
            card: "null".into(),
            device_caps: 0,
        };
        V4l2Proxy::new(node, super::super::EventBuffer::new(), (), AnyGuest)
    }

    /// A session on `/dev/null`, which answers every V4L2 ioctl `ENOTTY` (past the
    /// proxy's own checks), whose capture queue has `buffers` USERPTR buffers.
    fn session(id: u32, buffers: u32) -> ProxySession {
        let mut queues = BTreeMap::new();
        queues.insert(
            BUF_TYPE_VIDEO_CAPTURE,
            QueueState {
                memory: MEMORY_USERPTR,
                buffers,
                ..Default::default()
            },
        );
        ProxySession {
            id,
            device: open_node(Path::new("/dev/null")).unwrap(),
            driver: DriverCharge {
                bytes: 0,
                total: Arc::default(),
            },
            poller: epoll::create(epoll::CreateFlags::CLOEXEC).unwrap(),
            polling_buffers: false,
            queues,
            mmap_planes: BTreeMap::new(),
        }
    }

    /// QBUF of capture buffer `index`, USERPTR, `len` bytes in one SG entry.
    fn qbuf(p: &mut TestProxy, s: &mut ProxySession, index: u32, len: u32) -> Errno {
        let b = GuestBuffer {
            desc: BufferDesc {
                buffer: V4l2Buffer {
                    index,
                    type_: BUF_TYPE_VIDEO_CAPTURE,
                    memory: MEMORY_USERPTR,
                    length: len,
                    ..Default::default()
                },
                ..Default::default()
            },
            userptr: vec![vec![SgEntry {
                start: 0,
                len,
                reserved: 0,
            }]],
        };
        p.qbuf(s, b).unwrap_err()
    }

    #[test]
    fn shadow_memory_is_capped_for_all_sessions_together() {
        let mut p = proxy();
        let metrics = Arc::new(MediaMetrics::default());
        p.attach_metrics(metrics.clone());
        let (mut a, mut b) = (session(0, 32), session(1, 32));
        // Capture shadows are allocated, never written: the test costs no memory.
        let big = MAX_SHADOW_LEN as u32;
        for index in 0..(MAX_DEVICE_SHADOW / MAX_SHADOW_LEN) as u32 {
            // Past the proxy's checks: the host (here /dev/null) answers.
            assert_eq!(qbuf(&mut p, &mut a, index, big), libc::ENOTTY);
        }
        assert_eq!(p.shadow_bytes(), MAX_DEVICE_SHADOW);
        // Another session may not add to it, however little it asks for.
        assert_eq!(qbuf(&mut p, &mut b, 0, 4096), libc::ENOMEM);
        assert_eq!(metrics.snapshot().err_shadow_limit, 1);
        // A plane longer than a shadow may be is refused as such.
        assert_eq!(qbuf(&mut p, &mut b, 0, big + 1), libc::EINVAL);
        assert_eq!(metrics.snapshot().err_shadow_limit, 2);
        // Closing the session that holds them gives them back.
        p.close_session(a);
        assert_eq!(p.shadow_bytes(), 0);
        assert_eq!(qbuf(&mut p, &mut b, 0, 4096), libc::ENOTTY);
        assert_eq!(p.shadow_bytes(), 4096);
    }

    #[test]
    fn buffer_sizes_are_read_from_the_format_as_vb2_allocates_them() {
        let mut f = V4l2Format {
            type_: BUF_TYPE_VIDEO_CAPTURE,
            ..Default::default()
        };
        f.set_pix(&V4l2PixFormat {
            sizeimage: 4097,
            ..Default::default()
        });
        assert_eq!(format_bytes(&f), 8192);
        let mut mp = V4l2PixFormatMplane {
            num_planes: 2,
            ..Default::default()
        };
        mp.plane_fmt[0].sizeimage = 100;
        mp.plane_fmt[1].sizeimage = u32::MAX;
        // A plane past num_planes does not count.
        mp.plane_fmt[2].sizeimage = 1 << 30;
        let mut f = V4l2Format {
            type_: BUF_TYPE_VIDEO_CAPTURE_MPLANE,
            ..Default::default()
        };
        f.fmt[..size_of::<V4l2PixFormatMplane>()].copy_from_slice(mp.as_bytes());
        assert_eq!(format_bytes(&f), 4096 + (1 << 32));
        let mut meta = V4l2Format {
            type_: BUF_TYPE_META_CAPTURE,
            ..Default::default()
        };
        meta.fmt[4..8].copy_from_slice(&10_000u32.to_le_bytes());
        assert_eq!(format_bytes(&meta), 12288);
        meta.type_ = 4; // VBI capture: sized by the driver.
        assert_eq!(format_bytes(&meta), 0);
    }

    #[test]
    fn driver_buffers_are_granted_within_the_budget() {
        const MIB: usize = 1 << 20;
        assert_eq!(buffers_that_fit(32, 4 * MIB, 0), 32);
        assert_eq!(buffers_that_fit(32, 64 * MIB, 0), 16);
        assert_eq!(buffers_that_fit(32, 4 << 30, 0), 0);
        assert_eq!(
            buffers_that_fit(4, 4 * MIB, MAX_DEVICE_DRIVER_BUFFERS - 10 * MIB),
            2
        );
        assert_eq!(buffers_that_fit(4, 0, MAX_DEVICE_DRIVER_BUFFERS - 8192), 2);
        assert_eq!(buffers_that_fit(1, 1, MAX_DEVICE_DRIVER_BUFFERS + 1), 0);
    }

    /// CREATE_BUFS of MMAP buffers: cut down to what the budget holds, refused when not
    /// one fits, before the host is asked (/dev/null answers ENOTTY past the checks).
    #[test]
    fn create_bufs_is_held_to_the_driver_budget() {
        let mut p = proxy();
        let metrics = Arc::new(MediaMetrics::default());
        p.attach_metrics(metrics.clone());
        let mut s = session(0, 0);
        let create = |count: u32, sizeimage: u32| {
            let mut c = V4l2CreateBuffers {
                count,
                memory: MEMORY_MMAP,
                ..Default::default()
            };
            c.format.type_ = BUF_TYPE_VIDEO_CAPTURE;
            c.format.set_pix(&V4l2PixFormat {
                sizeimage,
                ..Default::default()
            });
            c
        };
        // What the fuzzer sent vivid: 32 buffers of almost 4 GiB.
        assert_eq!(
            p.create_bufs(&mut s, create(32, u32::MAX - 4096))
                .unwrap_err(),
            libc::ENOMEM
        );
        assert_eq!(metrics.snapshot().err_buffer_limit, 1);
        // Buffers that fit reach the host.
        assert_eq!(
            p.create_bufs(&mut s, create(8, 1 << 20)).unwrap_err(),
            libc::ENOTTY
        );
        assert_eq!(metrics.snapshot().err_buffer_limit, 1);
        // With the budget nearly spent (by other sessions), fewer are granted, then none.
        p.driver_total
            .store(MAX_DEVICE_DRIVER_BUFFERS - (3 << 20), Ordering::Relaxed);
        assert_eq!(
            p.create_bufs(&mut s, create(8, 1 << 20)).unwrap_err(),
            libc::ENOTTY
        );
        assert_eq!(metrics.snapshot().err_buffer_limit, 2);
        assert_eq!(
            p.create_bufs(&mut s, create(1, 4 << 20)).unwrap_err(),
            libc::ENOMEM
        );
        // A query (count 0) and USERPTR buffers are not the driver's memory.
        let mut query = create(0, u32::MAX);
        assert_eq!(p.create_bufs(&mut s, query).unwrap_err(), libc::ENOTTY);
        query.count = 32;
        query.memory = MEMORY_USERPTR;
        assert_eq!(p.create_bufs(&mut s, query).unwrap_err(), libc::ENOTTY);
        assert_eq!(metrics.snapshot().err_buffer_limit, 3);
    }

    #[test]
    fn a_sessions_driver_charge_is_given_back() {
        let total = Arc::new(AtomicUsize::new(0));
        let mut c = DriverCharge {
            bytes: 0,
            total: total.clone(),
        };
        c.set(5000);
        c.set(3000);
        assert_eq!(total.load(Ordering::Relaxed), 3000);
        c.set(9000);
        assert_eq!(total.load(Ordering::Relaxed), 9000);
        drop(c);
        assert_eq!(total.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn shadow_buffers_are_capped_in_number_per_session() {
        let mut p = proxy();
        let mut s = session(0, 2 * MAX_SESSION_SHADOWS as u32);
        for index in 0..MAX_SESSION_SHADOWS as u32 {
            assert_eq!(qbuf(&mut p, &mut s, index, 4096), libc::ENOTTY);
        }
        assert_eq!(
            qbuf(&mut p, &mut s, MAX_SESSION_SHADOWS as u32, 4096),
            libc::ENOMEM
        );
        // A buffer that has its shadow already may be queued again.
        assert_eq!(qbuf(&mut p, &mut s, 0, 4096), libc::ENOTTY);
        assert_eq!(s.shadow_count(), MAX_SESSION_SHADOWS);
    }

    #[test]
    fn pointer_ioctls_never_go_through_the_plain_path() {
        let f = File::open("/dev/null").unwrap();
        let mut b = V4l2Buffer::default();
        assert_eq!(
            plain_ioctl(f.as_fd(), V4l2Ioctl::VIDIOC_QBUF, &mut b),
            Err(libc::EINVAL)
        );
        // A plain ioctl reaches the host, which answers with its own errno.
        let mut d = V4l2Fmtdesc::default();
        assert_eq!(
            plain_ioctl(f.as_fd(), V4l2Ioctl::VIDIOC_ENUM_FMT, &mut d),
            Err(libc::ENOTTY)
        );
        // A mismatched argument size is refused before the kernel sees it.
        let mut small = 0u32;
        assert_eq!(
            plain_ioctl(f.as_fd(), V4l2Ioctl::VIDIOC_ENUM_FMT, &mut small),
            Err(libc::EINVAL)
        );
    }
}
