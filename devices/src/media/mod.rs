//! virtio-media (device type 48): the runner, V4L2 ioctl dispatch, memfd buffers and the
//! devices (a software camera).
//!
//! # Layers
//!
//! - The VMM-facing traits (this module): commands are read from the device-readable
//!   half of a chain with a [`ChainReader`] and answered into the device-writable half
//!   with a [`ChainWriter`]; [`EventQueue`] sends events; [`GuestMemoryMapper`] turns a
//!   guest scatter-gather list into one linear view of host memory (USERPTR buffers);
//!   [`HostMemoryMapper`] maps a host buffer fd into the device's shared memory region
//!   (MMAP buffers; the `()` implementation answers `ENOTTY`); [`MediaSession`] exposes
//!   an optional fd to poll; [`MediaDevice`] is what a device implements.
//! - [`runner::MediaRunner`]: OPEN/CLOSE/IOCTL/MMAP/MUNMAP, session ids (recycled),
//!   session polling with an epoll [`runner::EpollSessionPoller`].
//! - [`ioctl`]: a handler trait with one method per V4L2 ioctl virtio-media carries and
//!   the dispatcher that parses and writes each ioctl's payload, variable parts included.
//! - [`v4l2`]: the V4L2 structures in their 64-bit layouts.
//! - [`memfd`]: page-aligned memfd buffers for MMAP memory.
//! - [`mappings`]: [`mappings::ShmMappings`], the record of a device's MMAP mappings in
//!   the shared memory region (capped at [`MAX_MAPPINGS`]), kept by the camera and the proxy.
//! - [`camera`]: a software capture device producing a deterministic test pattern.
//! - `proxy` (feature `v4l2-proxy`): forwards every session to a host V4L2 node.
//! - [`device`]: [`device::VirtioMedia`], a [`crate::virtio::VirtioDevice`] that runs a
//!   [`MediaDevice`] on the command and event queues.
//!
//! # Hostile input
//!
//! Every read from a chain is bounds-checked; a short or malformed command is answered
//! with an error response carrying a Linux errno and the runner carries on. Errnos are
//! positive `i32` values (`libc::EINVAL`, ...), as in virtio-media's response header.
//!
//! # Caps
//!
//! Every resource a guest can make the device hold has a cap (DESIGN.md, "Hostile-input
//! rules"). Hitting one is an error response with the errno the V4L2 call would give
//! on Linux, never an exhausted fd table or heap; the guest's other sessions keep
//! working. Every refusal is counted in [`MediaMetrics`] (the runner's
//! [`runner::MediaRunner::metrics`], shared with the device and its [`EventBuffer`])
//! and logged at a limited rate.
//!
//! | Resource | Cap | What the guest gets | Metric |
//! |---|---|---|---|
//! | Sessions (each holds fds: the camera's timerfd, the proxy's host node and epoll fds) | [`runner::DEFAULT_MAX_SESSIONS`] (128) per device, configurable up to [`runner::MAX_SESSIONS_LIMIT`] (`outboard media --max-sessions`); CLOSE frees the slot | `OPEN` answered `ENFILE` (no fd, no memory taken) | `err_session_limit` |
//! | SG entries of one command (USERPTR planes of one buffer, payloads of one `*_EXT_CTRLS`) | [`ioctl::MAX_SG_ENTRIES`] (16384: a 64 MiB buffer given page by page), on top of each list's own bound of one entry per page of its length plus two | the ioctl answered `ENOMEM` (`EINVAL` for a list longer than its length allows) | `err_sg_limit` |
//! | Extended controls of one call | [`ioctl::MAX_EXT_CTRLS`] (1024, `V4L2_CID_MAX_CTRLS`) | `EINVAL` | - |
//! | MMAP mappings in the shared memory region | [`MAX_MAPPINGS`] (1024) per device; their total size is the region's (`--shm-size-mib`, refused by the VMM's [`HostMemoryMapper`]); MUNMAP or CLOSE frees them | `MMAP` answered `ENOMEM` (as `mmap(2)` past `vm.max_map_count`) | `err_mapping_limit` |
//! | Camera buffers per session (only one session owns the queue) | [`camera::MAX_BUFFERS`] (32, `VIDEO_MAX_FRAME`) | `REQBUFS`/`CREATE_BUFS` counts cut down (as vb2); `CREATE_BUFS` with the queue full: `ENOBUFS` | `err_buffer_limit` |
//! | Camera MMAP buffer memory (memfds) per session | [`camera::MAX_SESSION_BUFFER_BYTES`] (256 MiB; 32 of the largest frame need 85 MiB) | counts cut down to what fits; nothing fits: `ENOMEM` | `err_buffer_limit` |
//! | Camera USERPTR buffers | the SG entry cap above (the list is kept while queued; the memory is the guest's) | as above | `err_sg_limit` |
//! | Proxy buffers per session | the host driver's (vb2: `VIDEO_MAX_FRAME` or its `max_num_buffers`) | the host's answer | - |
//! | Proxy MMAP buffer memory the host driver allocates | `proxy::MAX_DEVICE_DRIVER_BUFFERS` (1 GiB) for all sessions, counted from the formats (`REQBUFS`: the driver's; `CREATE_BUFS`: the larger of the guest's and the driver's); `REQBUFS 0`, `REMOVE_BUFS` or CLOSE gives it back | `REQBUFS`/`CREATE_BUFS` counts cut down to what fits; nothing fits: `ENOMEM` (the driver is not asked) | `err_buffer_limit` |
//! | Proxy USERPTR shadow buffers | `proxy::MAX_SHADOW_LEN` (256 MiB) per plane; `proxy::MAX_SESSION_SHADOWS` (256) and `proxy::MAX_SESSION_SHADOW` (1 GiB) per session; `proxy::MAX_DEVICE_SHADOW` (1 GiB) for all sessions | `QBUF`/`PREPARE_BUF` answered `EINVAL` (plane too long) or `ENOMEM` | `err_shadow_limit` |
//! | Proxy control payload copies of one call | `proxy::MAX_SHADOW_LEN` (256 MiB) in all | `ENOMEM` | `err_shadow_limit` |
//! | V4L2 events waiting in the device for one session (the driver gives no event buffers) | [`MAX_SESSION_PENDING_V4L2_EVENTS`] (32): past it a new event replaces the oldest of the same type and id (control changes merged, as V4L2 does for a full subscription), else the session's oldest V4L2 event is dropped | fewer, merged events | `events_coalesced`, `events_dropped` |
//! | Error events waiting for one session | 1 (the driver closes a failed session once) | one error event | `events_coalesced` |
//! | Events waiting in the device, all sessions | [`MAX_PENDING_EVENTS`] (16384; DQBUF events are bounded by the buffers anyway) | the newest event is dropped | `events_dropped` |

pub mod camera;
pub mod device;
pub mod ioctl;
pub mod mappings;
pub mod memfd;
#[cfg(feature = "v4l2-proxy")]
pub mod proxy;
pub mod runner;
pub mod v4l2;

use std::collections::VecDeque;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use outboard_protocol::media::{
    DqbufEvent, ErrorEvent, RespHeader, SessionEvent, SgEntry, EVENT_DQBUF, EVENT_EVENT,
};
use outboard_protocol::v4l2::V4l2Ioctl;
use outboard_protocol::Validate;
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes};

use crate::virtio::{read_regions, write_regions, GuestMemoryAccess, IoRegion, MemoryPin};

/// A positive Linux errno, as carried in virtio-media's response header.
pub type Errno = i32;

/// Most MMAP mappings a device keeps in its shared memory region, all sessions
/// together (see the module docs' table of caps). Each is a `SHMEM_MAP` the front-end
/// turns into an `mmap` of its own, so an unbounded count would spend the VMM's
/// `vm.max_map_count` even when the region has room: 1024 is ten times what a full
/// camera queue needs (32 buffers of up to 3 planes).
pub const MAX_MAPPINGS: usize = 1024;
/// Most V4L2 events one session may have waiting in an [`EventBuffer`] (the driver gave
/// no event buffers to carry them); see [`EventBuffer`] for what happens past it.
pub const MAX_SESSION_PENDING_V4L2_EVENTS: usize = 32;
/// Most events of all sessions waiting in an [`EventBuffer`] (at most 10 MiB of them):
/// a backstop, above what the other caps allow with the default session cap (128
/// sessions, each with a full V4L2 event backlog, an error and the DQBUFs of two full
/// queues of 32 buffers, make 12416). Past it the newest event is dropped.
pub const MAX_PENDING_EVENTS: usize = 16384;

macro_rules! metrics {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        /// Live counters of one virtio-media device (shared by its runner, its device
        /// and its [`EventBuffer`]; relaxed atomics).
        #[derive(Debug, Default)]
        pub struct MediaMetrics {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
        }

        /// A point-in-time copy of [`MediaMetrics`].
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct MediaMetricsSnapshot {
            $($(#[doc = $doc])* pub $name: u64,)*
        }

        impl MediaMetrics {
            /// Reads every counter.
            pub fn snapshot(&self) -> MediaMetricsSnapshot {
                MediaMetricsSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }

        impl MediaMetricsSnapshot {
            /// Every counter's name, in declaration order (the order of
            /// [`MediaMetricsSnapshot::values`]).
            pub const NAMES: &'static [&'static str] = &[$(stringify!($name),)*];
            /// How many counters there are.
            pub const COUNT: usize = Self::NAMES.len();
            /// Every counter's description (its doc comment, lines joined), in the order
            /// of [`MediaMetricsSnapshot::NAMES`]: help text for metrics exporters.
            pub const HELP: &'static [&'static str] = &[$(concat!($($doc),*),)*];

            /// Every counter's value, in the order of [`MediaMetricsSnapshot::NAMES`].
            pub fn values(&self) -> [u64; Self::COUNT] {
                [$(self.$name,)*]
            }
        }
    };
}

metrics! {
    /// Sessions opened (OPEN answered with a session).
    sessions_opened,
    /// Sessions closed (CLOSE, or every session at a device reset).
    sessions_closed,
    /// OPENs refused because the device had its maximum number of sessions (`ENFILE`).
    err_session_limit,
    /// `REQBUFS`/`CREATE_BUFS` that got fewer buffers than asked for, or none
    /// (`ENOBUFS`, `ENOMEM`), because of a buffer cap.
    err_buffer_limit,
    /// MMAPs refused because the device had [`MAX_MAPPINGS`] (1024) mappings
    /// (`ENOMEM`).
    err_mapping_limit,
    /// Commands refused because their SG lists had more than
    /// [`ioctl::MAX_SG_ENTRIES`] (16384) entries (`ENOMEM`).
    err_sg_limit,
    /// USERPTR shadow buffers and control payload copies the V4L2 proxy refused
    /// because of its host memory budgets (`ENOMEM`).
    err_shadow_limit,
    /// Pending events merged into a newer one of the same session (V4L2 events of the
    /// same type and id, error events).
    events_coalesced,
    /// Pending events dropped because a session or the device had too many waiting.
    events_dropped,
}

impl MediaMetrics {
    /// Adds one to `counter`.
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Errors of the chain reader and writer: the virtio module's [`ChainError`], under the
/// name media code has always used; [`ChainError::errno`] is the errno a guest sees.
///
/// [`ChainError`]: crate::virtio::ChainError
/// [`ChainError::errno`]: crate::virtio::ChainError::errno
pub use crate::virtio::ChainError as MediaError;
/// Commands are read with the virtio module's [`ChainReader`] and answered with its
/// [`ChainWriter`]; the methods below add virtio-media's SG lists and response headers.
pub use crate::virtio::{ChainReader, ChainWriter};

/// virtio-media's scatter-gather lists (USERPTR buffers, extended control payloads).
impl ChainReader<'_> {
    /// Reads a scatter-gather list describing `len` bytes of guest memory: entries are
    /// read until they cover `len` bytes. Each entry is validated (non-zero length, no
    /// address overflow); at most `max_entries` entries are accepted.
    pub fn read_sg_list(&mut self, len: u64, max_entries: usize) -> Result<Vec<SgEntry>, Errno> {
        let mut unbounded = usize::MAX;
        self.read_sg_list_within(len, max_entries, &mut unbounded)
    }

    /// [`ChainReader::read_sg_list`] charged to `budget`, the entries the command may
    /// still carry: the entries read are taken from it, and a list that needs more is
    /// refused with `ENOMEM` (a cap, where a list longer than `max_entries` is
    /// malformed: `EINVAL`).
    pub fn read_sg_list_within(
        &mut self,
        len: u64,
        max_entries: usize,
        budget: &mut usize,
    ) -> Result<Vec<SgEntry>, Errno> {
        let mut covered = 0u64;
        let mut out = Vec::new();
        while covered < len {
            if out.len() >= max_entries {
                return Err(libc::EINVAL);
            }
            if out.len() >= *budget {
                return Err(libc::ENOMEM);
            }
            let e: SgEntry = self.read_obj("SG entry").map_err(|e| e.errno())?;
            e.validate().map_err(|_| libc::EINVAL)?;
            covered = covered.saturating_add(e.len.into());
            out.push(e);
        }
        *budget -= out.len();
        Ok(out)
    }
}

/// virtio-media's response headers.
impl ChainWriter<'_> {
    /// Writes a success response header followed by `obj`. When both fit in the current
    /// region they are written in one step, the payload first so that nothing is
    /// stored between the handler's copy of the answer and this one.
    #[inline]
    pub fn write_ok_obj<T: IntoBytes + Immutable>(&mut self, obj: &T) -> Result<(), MediaError> {
        self.write_obj_pair(&RespHeader::ok(), obj)
    }

    /// Writes an error response header, replacing anything written before.
    pub fn write_err(&mut self, errno: Errno) -> Result<(), MediaError> {
        self.rewind();
        self.write_obj(&RespHeader::err(errno.unsigned_abs()))
    }
}

/// An event the device sends on the event queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaEvent {
    /// A session hit an unrecoverable error.
    Error(ErrorEvent),
    /// A buffer was dequeued (the answer to `VIDIOC_DQBUF`).
    Dqbuf(Box<DqbufEvent>),
    /// A V4L2 event (the answer to `VIDIOC_DQEVENT`).
    Event(Box<SessionEvent>),
}

impl MediaEvent {
    /// A dequeue-buffer event for `buffer` and, for multi-planar buffers, its planes.
    ///
    /// The event has a fixed size and carries no USERPTR SG lists or DMABUF virtio
    /// objects: the driver keeps the backing it queued the buffer with.
    pub fn dqbuf(session_id: u32, buffer: &v4l2::V4l2Buffer, planes: &[v4l2::V4l2Plane]) -> Self {
        let mut ev = DqbufEvent::new_zeroed();
        ev.hdr.event = EVENT_DQBUF;
        ev.hdr.session_id = session_id;
        ev.buffer.copy_from_slice(buffer.as_bytes());
        for (dst, p) in ev.planes.iter_mut().zip(planes) {
            dst.copy_from_slice(p.as_bytes());
        }
        MediaEvent::Dqbuf(Box::new(ev))
    }

    /// A V4L2 event.
    pub fn v4l2(session_id: u32, event: &v4l2::V4l2Event) -> Self {
        let mut ev = SessionEvent::new_zeroed();
        ev.hdr.event = EVENT_EVENT;
        ev.hdr.session_id = session_id;
        ev.event.copy_from_slice(event.as_bytes());
        MediaEvent::Event(Box::new(ev))
    }

    /// The event's bytes on the wire.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            MediaEvent::Error(e) => e.as_bytes(),
            MediaEvent::Dqbuf(e) => e.as_bytes(),
            MediaEvent::Event(e) => e.as_bytes(),
        }
    }

    /// The session the event belongs to.
    pub fn session_id(&self) -> u32 {
        match self {
            MediaEvent::Error(e) => e.hdr.session_id,
            MediaEvent::Dqbuf(e) => e.hdr.session_id,
            MediaEvent::Event(e) => e.hdr.session_id,
        }
    }
}

/// Sends events to the driver.
pub trait EventQueue: Send {
    /// Queues an event for the driver.
    fn send_event(&mut self, event: MediaEvent);

    /// Tells the driver that `session_id` hit an unrecoverable error.
    fn send_error(&mut self, session_id: u32, errno: Errno) {
        self.send_event(MediaEvent::Error(ErrorEvent::new(
            session_id,
            errno.unsigned_abs(),
        )));
    }
}

/// An [`EventQueue`] that buffers events in memory until the transport takes them
/// (cloning gives another handle to the same buffer).
///
/// The buffer is bounded, as a driver that gives no event buffers must not make it
/// grow: a session has at most [`MAX_SESSION_PENDING_V4L2_EVENTS`] V4L2 events waiting.
/// Past that a new V4L2 event replaces the session's oldest waiting event of the same
/// type and id, with a control event's `changes` merged into it (what the V4L2 core
/// does for a subscription whose queue is full), or else the session's oldest waiting
/// V4L2 event is dropped. A session has at most one error event waiting (the driver
/// closes the session at the first). Past [`MAX_PENDING_EVENTS`] in all, the newest
/// event is dropped. DQBUF events are otherwise never dropped: the buffers bound them
/// (each is dequeued once per QBUF). Merges and drops are counted in the buffer's
/// [`MediaMetrics`].
#[derive(Debug, Clone, Default)]
pub struct EventBuffer(Arc<Mutex<PendingEvents>>);

/// The events of an [`EventBuffer`] and its counters.
#[derive(Debug, Default)]
struct PendingEvents {
    events: VecDeque<MediaEvent>,
    metrics: Arc<MediaMetrics>,
}

/// Type and id of a V4L2 event (what a V4L2 subscription is for).
fn v4l2_event_key(e: &SessionEvent) -> Option<(u32, u32)> {
    v4l2::V4l2Event::read_from_bytes(&e.event)
        .ok()
        .map(|ev| (ev.type_, ev.id))
}

impl PendingEvents {
    fn push(&mut self, mut event: MediaEvent) {
        let session = event.session_id();
        let of_session = |e: &MediaEvent| e.session_id() == session;
        match &mut event {
            MediaEvent::Error(_) => {
                if self
                    .events
                    .iter()
                    .any(|e| of_session(e) && matches!(e, MediaEvent::Error(_)))
                {
                    MediaMetrics::inc(&self.metrics.events_coalesced);
                    return;
                }
            }
            MediaEvent::Event(new) => {
                let is_v4l2 = |e: &MediaEvent| of_session(e) && matches!(e, MediaEvent::Event(_));
                let waiting = self.events.iter().filter(|e| is_v4l2(e)).count();
                if waiting >= MAX_SESSION_PENDING_V4L2_EVENTS {
                    let key = v4l2_event_key(new);
                    let same = self.events.iter().position(|e| match e {
                        MediaEvent::Event(old) => {
                            of_session(e) && key.is_some() && v4l2_event_key(old) == key
                        }
                        _ => false,
                    });
                    if let Some(i) = same {
                        if let Some(MediaEvent::Event(old)) = self.events.remove(i) {
                            if key.is_some_and(|(t, _)| t == v4l2::EVENT_CTRL) {
                                merge_ctrl_changes(&old, new);
                            }
                        }
                        MediaMetrics::inc(&self.metrics.events_coalesced);
                    } else if let Some(i) = self.events.iter().position(is_v4l2) {
                        self.events.remove(i);
                        MediaMetrics::inc(&self.metrics.events_dropped);
                        outboard_protocol::log_limited!(
                            log::Level::Warn,
                            "virtio-media: session {session} has {waiting} V4L2 events \
                             waiting: dropping the oldest"
                        );
                    }
                }
            }
            MediaEvent::Dqbuf(_) => {}
        }
        if self.events.len() >= MAX_PENDING_EVENTS {
            MediaMetrics::inc(&self.metrics.events_dropped);
            outboard_protocol::log_limited!(
                log::Level::Warn,
                "virtio-media: {} events waiting for the driver: dropping one for \
                 session {session}",
                self.events.len()
            );
            return;
        }
        self.events.push_back(event);
    }
}

/// ORs the `changes` of control event `old` into `new` (`struct v4l2_event_ctrl`
/// starts with `changes`, at the start of the event's union).
fn merge_ctrl_changes(old: &SessionEvent, new: &mut SessionEvent) {
    let at = std::mem::offset_of!(v4l2::V4l2Event, u);
    let word = |e: &SessionEvent| {
        e.event
            .get(at..at + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_ne_bytes)
    };
    if let (Some(o), Some(n)) = (word(old), word(new)) {
        if let Some(dst) = new.event.get_mut(at..at + 4) {
            dst.copy_from_slice(&(o | n).to_ne_bytes());
        }
    }
}

impl EventBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PendingEvents> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the oldest event.
    pub fn pop(&self) -> Option<MediaEvent> {
        self.lock().events.pop_front()
    }

    /// Puts an event back at the front (the transport could not deliver it).
    pub fn push_front(&self, event: MediaEvent) {
        self.lock().events.push_front(event);
    }

    /// Number of buffered events.
    pub fn len(&self) -> usize {
        self.lock().events.len()
    }

    /// Whether no event is buffered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The counters merges and drops are counted in.
    pub fn metrics(&self) -> Arc<MediaMetrics> {
        self.lock().metrics.clone()
    }

    /// Counts merges and drops in `metrics` from now on (the device's, see
    /// [`device::VirtioMedia::new`]).
    pub fn set_metrics(&self, metrics: Arc<MediaMetrics>) {
        self.lock().metrics = metrics;
    }
}

impl EventQueue for EventBuffer {
    fn send_event(&mut self, event: MediaEvent) {
        self.lock().push(event);
    }
}

/// A linear view of guest memory given as a scatter-gather list.
pub trait GuestMemoryRange: Send {
    /// Length in bytes.
    fn len(&self) -> usize;

    /// Whether the range is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies `src` to `offset`; returns the bytes copied.
    fn write_at(&self, offset: usize, src: &[u8]) -> usize;

    /// Copies from `offset` into `dst`; returns the bytes copied.
    fn read_at(&self, offset: usize, dst: &mut [u8]) -> usize;
}

/// Maps guest scatter-gather lists into host memory (USERPTR buffers, control payloads).
///
/// A mapping borrows its mapper, so a device cannot keep one beyond the call that made
/// it: the guest's memory map may change between calls (the front-end replaces its
/// memory table), and a mapping kept across that would write through a stale view. A
/// device that needs guest memory again later (a USERPTR buffer written when a frame is
/// done) keeps the guest's SG list and maps it again then.
pub trait GuestMemoryMapper: Send {
    /// The mapping; it stays valid while it is held.
    type Mapping<'m>: GuestMemoryRange
    where
        Self: 'm;

    /// Maps `sgs`; fails with `EFAULT` when any entry is outside guest memory.
    fn new_mapping(&self, sgs: &[SgEntry]) -> Result<Self::Mapping<'_>, Errno>;
}

/// A [`GuestMemoryRange`] over the host regions that back a guest SG list: a linear view
/// without copying (the regions are concatenated in list order). It holds the
/// [`MemoryPin`]s of its regions, so the memory it points into stays mapped while it
/// lives, and borrows its mapper for `'m` (see [`GuestMemoryMapper`]).
#[derive(Debug, Clone, Default)]
pub struct RegionMapping<'m> {
    regions: Vec<IoRegion>,
    len: usize,
    pins: Vec<MemoryPin>,
    mapper: std::marker::PhantomData<&'m ()>,
}

impl RegionMapping<'_> {
    /// A mapping of `regions` (memory that stays mapped while `pin` is held; for
    /// mappers of memory the device owns, [`MemoryPin::none`]).
    pub fn new(regions: Vec<IoRegion>, pin: MemoryPin) -> Self {
        let len = regions
            .iter()
            .fold(0usize, |a, r| a.saturating_add(r.len()));
        RegionMapping {
            regions,
            len,
            pins: vec![pin],
            mapper: std::marker::PhantomData,
        }
    }
}

impl GuestMemoryRange for RegionMapping<'_> {
    fn len(&self) -> usize {
        self.len
    }

    fn write_at(&self, offset: usize, src: &[u8]) -> usize {
        write_regions(&self.regions, offset, src)
    }

    fn read_at(&self, offset: usize, dst: &mut [u8]) -> usize {
        read_regions(&self.regions, offset, dst)
    }
}

/// Guest memory mapping through a [`GuestMemoryAccess`] (the VMM's memory map).
///
/// Each mapping holds the [`MemoryPin`]s of its regions: the memory it points into
/// stays mapped while the mapping lives, whatever the VMM does to its memory map.
#[derive(Clone)]
pub struct GuestMemoryRegions(pub Arc<dyn GuestMemoryAccess>);

impl std::fmt::Debug for GuestMemoryRegions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GuestMemoryRegions")
    }
}

impl GuestMemoryMapper for GuestMemoryRegions {
    type Mapping<'m> = RegionMapping<'m>;

    fn new_mapping(&self, sgs: &[SgEntry]) -> Result<RegionMapping<'_>, Errno> {
        let mut m = RegionMapping::default();
        for sg in sgs {
            sg.validate().map_err(|_| libc::EINVAL)?;
            let pin = self
                .0
                .host_regions(sg.start, sg.len.into(), &mut m.regions)
                .map_err(|_| libc::EFAULT)?;
            m.len = m.len.saturating_add(sg.len as usize);
            // One pin per memory map: consecutive entries share it.
            if !m.pins.iter().any(|p| p.same(&pin)) {
                m.pins.push(pin);
            }
        }
        Ok(m)
    }
}

/// Maps host buffers into the device's shared memory region (MMAP buffers).
pub trait HostMemoryMapper: Send {
    /// Maps `length` bytes of `buffer` from `offset` (both page-aligned) into the shared
    /// memory region, writable if `rw`; returns the offset of the mapping in the region.
    fn add_mapping(
        &mut self,
        buffer: BorrowedFd<'_>,
        length: u64,
        offset: u64,
        rw: bool,
    ) -> Result<u64, Errno>;

    /// Removes the mapping at `shm_offset`.
    fn remove_mapping(&mut self, shm_offset: u64) -> Result<(), Errno>;
}

/// No shared memory region: every mapping fails with `ENOTTY`.
impl HostMemoryMapper for () {
    fn add_mapping(&mut self, _: BorrowedFd<'_>, _: u64, _: u64, _: bool) -> Result<u64, Errno> {
        Err(libc::ENOTTY)
    }

    fn remove_mapping(&mut self, _: u64) -> Result<(), Errno> {
        Err(libc::ENOTTY)
    }
}

/// One open session (one guest `open()` of the device node).
pub trait MediaSession {
    /// An fd that becomes readable when the session has work for
    /// [`MediaDevice::process_events`] (for example a frame timer), if any.
    fn poll_fd(&self) -> Option<BorrowedFd<'_>>;
}

/// A virtio-media device.
pub trait MediaDevice: Send {
    /// Per-session state.
    type Session: MediaSession + Send;

    /// Opens a session with the id the runner picked.
    fn new_session(&mut self, session_id: u32) -> Result<Self::Session, Errno>;

    /// Closes a session and releases everything it holds.
    fn close_session(&mut self, session: Self::Session);

    /// Runs `ioctl`: reads its payload from `reader` and writes the response (header and
    /// payload, or an error header) to `writer`. An `Err` means the response could not
    /// be written; the runner then tries an error header.
    fn do_ioctl(
        &mut self,
        session: &mut Self::Session,
        ioctl: V4l2Ioctl,
        reader: &mut ChainReader<'_>,
        writer: &mut ChainWriter<'_>,
    ) -> Result<(), MediaError>;

    /// Maps the MMAP buffer at `offset` (its `mem_offset`) into the shared memory region;
    /// returns the mapping's offset in the region and its length.
    fn do_mmap(
        &mut self,
        session: &mut Self::Session,
        flags: u32,
        offset: u32,
    ) -> Result<(u64, u64), Errno>;

    /// Unmaps a mapping returned by [`MediaDevice::do_mmap`].
    fn do_munmap(&mut self, driver_addr: u64) -> Result<(), Errno>;

    /// The session's poll fd is readable: do the pending work (fill buffers, send
    /// events). An error is reported to the driver as an error event.
    fn process_events(&mut self, _session: &mut Self::Session) -> Result<(), Errno> {
        Ok(())
    }

    /// Counts the device's cap refusals in `metrics` from now on (the runner calls it
    /// with its own when it takes the device). The default counts nothing.
    fn attach_metrics(&mut self, _metrics: Arc<MediaMetrics>) {}
}

/// Rounds `v` up to the page size (4096); `None` on overflow.
pub fn page_align(v: u64) -> Option<u64> {
    const PAGE: u64 = 4096;
    v.checked_add(PAGE - 1).map(|x| x & !(PAGE - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(buf: &mut [u8]) -> IoRegion {
        // SAFETY: `buf` outlives every use of the region in these tests and no reference
        // to it is used while the region is.
        unsafe { IoRegion::new(buf.as_mut_ptr(), buf.len()) }
    }

    #[test]
    fn counters_are_named_in_order_with_their_help() {
        let snap = MediaMetricsSnapshot {
            sessions_opened: 4,
            err_session_limit: 10,
            events_dropped: 7,
            ..Default::default()
        };
        assert_eq!(
            MediaMetricsSnapshot::HELP.len(),
            MediaMetricsSnapshot::COUNT
        );
        // The names are the struct's own fields, as its Debug output shows them, in
        // the order of the values.
        let debug = format!("{snap:?}");
        for (name, value) in MediaMetricsSnapshot::NAMES.iter().zip(snap.values()) {
            assert!(debug.contains(&format!("{name}: {value}")), "{name}");
        }
        let help = |name: &str| {
            let i = MediaMetricsSnapshot::NAMES
                .iter()
                .position(|n| *n == name)
                .unwrap();
            MediaMetricsSnapshot::HELP[i]
        };
        assert!(help("sessions_opened").contains("Sessions opened"));
        // The caps the help texts name are the caps.
        assert!(help("err_mapping_limit").contains(&format!("({MAX_MAPPINGS})")));
        assert!(help("err_sg_limit").contains(&format!("({})", ioctl::MAX_SG_ENTRIES)));
    }

    #[test]
    fn writer_is_all_or_nothing() {
        let mut a = [0u8; 6];
        let regions = [region(&mut a)];
        let mut w = ChainWriter::new(&regions);
        w.write_obj(&7u32).unwrap();
        assert!(w.write_obj(&8u32).is_err());
        assert_eq!(w.written(), 4);
        w.write_err(libc::EINVAL).unwrap_err();
        let mut big = [0u8; 8];
        let regions = [region(&mut big)];
        let mut w = ChainWriter::new(&regions);
        w.write_obj(&1u64).unwrap();
        w.write_err(libc::EINVAL).unwrap();
        assert_eq!(w.written(), 8);
        assert_eq!(big[0], libc::EINVAL as u8);
    }

    #[test]
    fn reads_and_writes_follow_the_chain_across_regions() {
        // Regions of 4, 0, 6 and 12 bytes: u32s that fit a region (fast path), span two
        // (copy path) and skip the empty one, in chain order.
        let mut a = [0u8; 4];
        let mut b = [0u8; 0];
        let mut c = [0u8; 6];
        let mut d = [0u8; 12];
        let regions = [
            region(&mut a),
            region(&mut b),
            region(&mut c),
            region(&mut d),
        ];
        let mut w = ChainWriter::new(&regions);
        for v in [1u32, 2, 3] {
            w.write_obj(&v).unwrap();
        }
        w.write_obj(&0x0605_0403_0201_0004u64).unwrap();
        assert_eq!(w.remaining(), 2);
        assert!(w.write_obj(&9u32).is_err());
        let mut r = ChainReader::new(&regions);
        assert_eq!(r.read_obj::<u32>("a"), Ok(1));
        assert_eq!(r.read_obj::<u32>("b"), Ok(2));
        assert_eq!(r.read_obj::<u32>("c"), Ok(3));
        assert_eq!(r.read_obj::<u64>("d"), Ok(0x0605_0403_0201_0004));
        assert_eq!(r.read_obj::<u16>("e"), Ok(0));
        assert!(r.read_obj::<u8>("f").is_err());
        // An error header restarts the response at the first region.
        let mut w = ChainWriter::new(&regions);
        w.write_obj(&[7u32; 3]).unwrap();
        w.write_err(libc::EIO).unwrap();
        assert_eq!(w.written(), 8);
        let mut r = ChainReader::new(&regions);
        assert_eq!(r.read_obj::<u32>("status"), Ok(libc::EIO as u32));
        assert_eq!(r.read_obj::<u32>("reserved"), Ok(0));
        assert_eq!(r.read_obj::<u32>("old"), Ok(7));
    }

    #[test]
    fn ok_responses_are_header_then_payload_in_one_region_or_across() {
        let check = |w: &ChainWriter<'_>, regions: &[IoRegion]| {
            assert_eq!(w.written(), 12);
            let mut r = ChainReader::new(regions);
            assert_eq!(r.read_obj::<u64>("header"), Ok(0));
            assert_eq!(r.read_obj::<u32>("payload"), Ok(0xdead_beef));
        };
        let mut one = [0xffu8; 16];
        let regions = [region(&mut one)];
        let mut w = ChainWriter::new(&regions);
        w.write_ok_obj(&0xdead_beefu32).unwrap();
        check(&w, &regions);
        let (mut a, mut b) = ([0xffu8; 6], [0xffu8; 6]);
        let regions = [region(&mut a), region(&mut b)];
        let mut w = ChainWriter::new(&regions);
        w.write_ok_obj(&0xdead_beefu32).unwrap();
        check(&w, &regions);
        let mut small = [0u8; 10];
        let regions = [region(&mut small)];
        let mut w = ChainWriter::new(&regions);
        assert!(w.write_ok_obj(&0xdead_beefu32).is_err());
    }

    /// A control event of `session` for control `id`.
    fn ctrl_event(session: u32, id: u32, changes: u32, value: i32) -> MediaEvent {
        let mut ev = v4l2::V4l2Event {
            type_: v4l2::EVENT_CTRL,
            id,
            ..Default::default()
        };
        ev.u[0..4].copy_from_slice(&changes.to_ne_bytes());
        ev.u[8..12].copy_from_slice(&value.to_ne_bytes());
        MediaEvent::v4l2(session, &ev)
    }

    /// `(session, id, changes, value)` of a control event.
    fn ctrl_of(e: &MediaEvent) -> (u32, u32, u32, i32) {
        let MediaEvent::Event(se) = e else {
            panic!("not a V4L2 event: {e:?}");
        };
        let ev = v4l2::V4l2Event::read_from_bytes(&se.event).unwrap();
        let word = |at: usize| <[u8; 4]>::try_from(&ev.u[at..at + 4]).unwrap();
        (
            se.hdr.session_id,
            ev.id,
            u32::from_ne_bytes(word(0)),
            i32::from_ne_bytes(word(8)),
        )
    }

    #[test]
    fn v4l2_events_of_a_session_are_coalesced_past_the_cap() {
        let mut b = EventBuffer::new();
        // Four controls changing 10000 times without the driver taking any event.
        for i in 0..10_000 {
            let changes = if i % 3 == 0 { 2 } else { 1 };
            b.send_event(ctrl_event(1, 100 + i as u32 % 4, changes, i));
        }
        assert_eq!(b.len(), MAX_SESSION_PENDING_V4L2_EVENTS);
        let m = b.metrics().snapshot();
        assert_eq!(
            m.events_coalesced,
            10_000 - MAX_SESSION_PENDING_V4L2_EVENTS as u64
        );
        assert_eq!(m.events_dropped, 0);
        // Another session is not affected.
        b.send_event(ctrl_event(2, 100, 1, 5));
        assert_eq!(b.len(), MAX_SESSION_PENDING_V4L2_EVENTS + 1);
        let events: Vec<_> = std::iter::from_fn(|| b.pop())
            .map(|e| ctrl_of(&e))
            .collect();
        // The newest value of every control is there, with the changes of the events
        // it replaced merged in.
        for id in 100..104u32 {
            let last = events.iter().rfind(|e| e.0 == 1 && e.1 == id).unwrap();
            assert_eq!(last.3, 9996 + (id as i32 - 100));
            assert_eq!(last.2, 3, "control {id}: changes {:#x}", last.2);
        }
        assert_eq!(events.last(), Some(&(2, 100, 1, 5)));
    }

    #[test]
    fn v4l2_events_of_a_session_are_dropped_oldest_first_past_the_cap() {
        let mut b = EventBuffer::new();
        for i in 0..1000u32 {
            b.send_event(ctrl_event(7, i, 1, 0));
        }
        assert_eq!(b.len(), MAX_SESSION_PENDING_V4L2_EVENTS);
        assert_eq!(
            b.metrics().snapshot().events_dropped,
            1000 - MAX_SESSION_PENDING_V4L2_EVENTS as u64
        );
        let ids: Vec<u32> = std::iter::from_fn(|| b.pop())
            .map(|e| ctrl_of(&e).1)
            .collect();
        let first = 1000 - MAX_SESSION_PENDING_V4L2_EVENTS as u32;
        assert_eq!(ids, (first..1000).collect::<Vec<_>>());
    }

    #[test]
    fn one_error_event_waits_per_session() {
        let metrics = Arc::new(MediaMetrics::default());
        let mut b = EventBuffer::new();
        b.set_metrics(metrics.clone());
        for _ in 0..100 {
            b.send_error(3, libc::EIO);
            b.send_error(4, libc::ENODEV);
        }
        assert_eq!(b.len(), 2);
        assert_eq!(metrics.snapshot().events_coalesced, 198);
        b.pop();
        b.send_error(3, libc::EIO);
        assert_eq!(b.len(), 2);
    }

    #[test]
    fn pending_events_are_bounded_in_all() {
        let mut b = EventBuffer::new();
        let buffer = v4l2::V4l2Buffer::default();
        for i in 0..MAX_PENDING_EVENTS + 10 {
            b.send_event(MediaEvent::dqbuf(i as u32 % 64, &buffer, &[]));
        }
        assert_eq!(b.len(), MAX_PENDING_EVENTS);
        assert_eq!(b.metrics().snapshot().events_dropped, 10);
        // Room again once the driver takes one.
        b.pop();
        b.send_event(MediaEvent::dqbuf(0, &buffer, &[]));
        assert_eq!(b.len(), MAX_PENDING_EVENTS);
        assert_eq!(b.metrics().snapshot().events_dropped, 10);
    }

    #[test]
    fn sg_lists_are_validated() {
        let mut buf = Vec::new();
        buf.extend_from_slice(
            SgEntry {
                start: 0x1000,
                len: 16,
                reserved: 0,
            }
            .as_bytes(),
        );
        buf.extend_from_slice(
            SgEntry {
                start: u64::MAX,
                len: 16,
                reserved: 0,
            }
            .as_bytes(),
        );
        let regions = [region(&mut buf)];
        let mut r = ChainReader::new(&regions);
        assert_eq!(r.read_sg_list(16, 4).map(|v| v.len()), Ok(1));
        assert_eq!(r.read_sg_list(16, 4), Err(libc::EINVAL));
        let mut r = ChainReader::new(&regions);
        assert_eq!(r.read_sg_list(64, 1), Err(libc::EINVAL));
        // A budget is charged with the entries read and refuses past it with ENOMEM.
        let mut r = ChainReader::new(&regions);
        let mut budget = 1;
        assert_eq!(
            r.read_sg_list_within(16, 4, &mut budget).map(|v| v.len()),
            Ok(1)
        );
        assert_eq!(budget, 0);
        assert_eq!(r.read_sg_list_within(16, 4, &mut budget), Err(libc::ENOMEM));
        assert_eq!(page_align(1), Some(4096));
        assert_eq!(page_align(u64::MAX), None);
    }
}
