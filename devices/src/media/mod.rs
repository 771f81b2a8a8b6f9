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

pub mod camera;
pub mod device;
pub mod ioctl;
pub mod memfd;
#[cfg(feature = "v4l2-proxy")]
pub mod proxy;
pub mod runner;
pub mod v4l2;

use std::collections::VecDeque;
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex, PoisonError};

use outboard_protocol::media::{
    DqbufEvent, ErrorEvent, RespHeader, SessionEvent, SgEntry, EVENT_DQBUF, EVENT_EVENT,
};
use outboard_protocol::v4l2::V4l2Ioctl;
use outboard_protocol::Validate;
use remain::sorted;
use thiserror::Error;
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes};

use crate::virtio::{read_regions, write_regions, GuestMemoryAccess, IoRegion};

/// A positive Linux errno, as carried in virtio-media's response header.
pub type Errno = i32;

/// Errors of the chain reader and writer.
#[sorted]
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MediaError {
    /// The device-writable half has no room for the response.
    #[error("response needs {needed} more bytes but only {left} are writable")]
    ResponseTooLarge {
        /// Bytes the write needed.
        needed: usize,
        /// Bytes left in the writable half.
        left: usize,
    },
    /// The device-readable half ended before an object could be read.
    #[error("command is truncated: {what} needs {needed} bytes, {left} left")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes needed.
        needed: usize,
        /// Bytes left in the readable half.
        left: usize,
    },
}

impl MediaError {
    /// The errno a guest sees for this error.
    pub fn errno(&self) -> Errno {
        match self {
            MediaError::ResponseTooLarge { .. } => libc::ENOSPC,
            MediaError::Truncated { .. } => libc::EINVAL,
        }
    }
}

/// A position in the concatenation of a list of regions, with the rest of the region it
/// falls in at hand so that an object inside that region is copied without walking the
/// list.
#[derive(Debug)]
struct RegionCursor<'a> {
    regions: &'a [IoRegion],
    /// Total length of `regions`.
    len: usize,
    /// Bytes before the position.
    done: usize,
    /// The rest of the region the position falls in; empty only at the end.
    head: IoRegion,
    /// Index of the region after `head`'s.
    next: usize,
}

impl<'a> RegionCursor<'a> {
    #[inline]
    fn new(regions: &'a [IoRegion]) -> Self {
        let len = regions
            .iter()
            .fold(0usize, |a, r| a.saturating_add(r.len()));
        let mut c = RegionCursor {
            regions,
            len,
            done: 0,
            head: IoRegion::empty(),
            next: 0,
        };
        c.skip_empty();
        c
    }

    #[inline]
    fn remaining(&self) -> usize {
        self.len - self.done
    }

    /// Moves `head` to the next non-empty region while it is empty.
    #[inline]
    fn skip_empty(&mut self) {
        while self.head.is_empty() {
            let Some(r) = self.regions.get(self.next) else {
                return;
            };
            self.head = *r;
            self.next += 1;
        }
    }

    /// `n <= head.len()` bytes of `head` were consumed.
    #[inline]
    fn advance(&mut self, n: usize) {
        self.head = self.head.sub(n, usize::MAX);
        self.done += n;
        self.skip_empty();
    }

    /// Moves to position `done` (after a copy across regions, or back to the start).
    fn seek(&mut self, done: usize) {
        self.done = done;
        let mut start = 0usize;
        for (i, r) in self.regions.iter().enumerate() {
            let end = start.saturating_add(r.len());
            if done < end {
                self.head = r.sub(done - start, usize::MAX);
                self.next = i + 1;
                return;
            }
            start = end;
        }
        self.head = IoRegion::empty();
        self.next = self.regions.len();
    }
}

/// Reads objects one after the other from the device-readable half of a chain.
#[derive(Debug)]
pub struct ChainReader<'a> {
    c: RegionCursor<'a>,
}

impl<'a> ChainReader<'a> {
    /// A reader at the start of `regions`.
    #[inline]
    pub fn new(regions: &'a [IoRegion]) -> Self {
        ChainReader {
            c: RegionCursor::new(regions),
        }
    }

    /// Bytes not read yet.
    #[inline]
    pub fn remaining(&self) -> usize {
        self.c.remaining()
    }

    /// Reads a plain object; `what` names it in the error.
    #[inline]
    pub fn read_obj<T: FromBytes + IntoBytes>(
        &mut self,
        what: &'static str,
    ) -> Result<T, MediaError> {
        let size = std::mem::size_of::<T>();
        if size > self.remaining() {
            return Err(MediaError::Truncated {
                what,
                needed: size,
                left: self.remaining(),
            });
        }
        // Fast path: the object lies inside the current region (a command in one
        // descriptor, the usual case): constant-size inline moves.
        if let Some(obj) = self.c.head.read_obj_at::<T>(0) {
            self.c.advance(size);
            return Ok(obj);
        }
        let mut obj = T::new_zeroed();
        let n = read_regions(self.c.regions, self.c.done, obj.as_mut_bytes());
        self.c.seek(self.c.done + n);
        Ok(obj)
    }

    /// Reads a scatter-gather list describing `len` bytes of guest memory: entries are
    /// read until they cover `len` bytes. Each entry is validated (non-zero length, no
    /// address overflow); at most `max_entries` entries are accepted.
    pub fn read_sg_list(&mut self, len: u64, max_entries: usize) -> Result<Vec<SgEntry>, Errno> {
        let mut covered = 0u64;
        let mut out = Vec::new();
        while covered < len {
            if out.len() >= max_entries {
                return Err(libc::EINVAL);
            }
            let e: SgEntry = self.read_obj("SG entry").map_err(|e| e.errno())?;
            e.validate().map_err(|_| libc::EINVAL)?;
            covered = covered.saturating_add(e.len.into());
            out.push(e);
        }
        Ok(out)
    }
}

/// Writes objects one after the other into the device-writable half of a chain and
/// counts the bytes written (the length for the used ring).
#[derive(Debug)]
pub struct ChainWriter<'a> {
    c: RegionCursor<'a>,
}

impl<'a> ChainWriter<'a> {
    /// A writer at the start of `regions`.
    #[inline]
    pub fn new(regions: &'a [IoRegion]) -> Self {
        ChainWriter {
            c: RegionCursor::new(regions),
        }
    }

    /// Bytes written so far.
    #[inline]
    pub fn written(&self) -> usize {
        self.c.done
    }

    /// Room left.
    #[inline]
    pub fn remaining(&self) -> usize {
        self.c.remaining()
    }

    /// Writes raw bytes (all or nothing).
    pub fn write_bytes(&mut self, bytes: &[u8]) -> Result<(), MediaError> {
        if bytes.len() > self.remaining() {
            return Err(MediaError::ResponseTooLarge {
                needed: bytes.len(),
                left: self.remaining(),
            });
        }
        let n = write_regions(self.c.regions, self.c.done, bytes);
        self.c.seek(self.c.done + n);
        Ok(())
    }

    /// Writes a plain object (all or nothing).
    #[inline]
    pub fn write_obj<T: IntoBytes + Immutable>(&mut self, obj: &T) -> Result<(), MediaError> {
        // Fast path: the object fits in the current region (see ChainReader::read_obj).
        if self.c.head.write_obj_at(0, obj) {
            self.c.advance(std::mem::size_of::<T>());
            return Ok(());
        }
        self.write_bytes(obj.as_bytes())
    }

    /// Writes a success response header followed by `obj`. When both fit in the current
    /// region they are written in one step, the payload first so that nothing is
    /// stored between the handler's copy of the answer and this one.
    #[inline]
    pub fn write_ok_obj<T: IntoBytes + Immutable>(&mut self, obj: &T) -> Result<(), MediaError> {
        const HDR: usize = std::mem::size_of::<RespHeader>();
        let size = HDR + std::mem::size_of::<T>();
        if size <= self.c.head.len()
            && self.c.head.write_obj_at(HDR, obj)
            && self.c.head.write_obj_at(0, &RespHeader::ok())
        {
            self.c.advance(size);
            return Ok(());
        }
        self.write_obj(&RespHeader::ok())?;
        self.write_obj(obj)
    }

    /// Writes an error response header, replacing anything written before.
    pub fn write_err(&mut self, errno: Errno) -> Result<(), MediaError> {
        self.c.seek(0);
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
#[derive(Debug, Clone, Default)]
pub struct EventBuffer(Arc<Mutex<VecDeque<MediaEvent>>>);

impl EventBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the oldest event.
    pub fn pop(&self) -> Option<MediaEvent> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front()
    }

    /// Puts an event back at the front (the transport could not deliver it).
    pub fn push_front(&self, event: MediaEvent) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_front(event);
    }

    /// Number of buffered events.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether no event is buffered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl EventQueue for EventBuffer {
    fn send_event(&mut self, event: MediaEvent) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(event);
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
pub trait GuestMemoryMapper: Send {
    /// The mapping; it stays valid while it is held.
    type Mapping: GuestMemoryRange;

    /// Maps `sgs`; fails with `EFAULT` when any entry is outside guest memory.
    fn new_mapping(&self, sgs: &[SgEntry]) -> Result<Self::Mapping, Errno>;
}

/// A [`GuestMemoryRange`] over the host regions that back a guest SG list: a linear view
/// without copying (the regions are concatenated in list order).
#[derive(Debug, Clone, Default)]
pub struct RegionMapping {
    regions: Vec<IoRegion>,
    len: usize,
}

impl GuestMemoryRange for RegionMapping {
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
/// The regions stay valid as long as the guest memory map does; a VMM that can remove
/// memory must not do so while a device holds mappings.
#[derive(Clone)]
pub struct GuestMemoryRegions(pub Arc<dyn GuestMemoryAccess>);

impl std::fmt::Debug for GuestMemoryRegions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GuestMemoryRegions")
    }
}

impl GuestMemoryMapper for GuestMemoryRegions {
    type Mapping = RegionMapping;

    fn new_mapping(&self, sgs: &[SgEntry]) -> Result<RegionMapping, Errno> {
        let mut m = RegionMapping::default();
        for sg in sgs {
            sg.validate().map_err(|_| libc::EINVAL)?;
            self.0
                .host_regions(sg.start, sg.len.into(), &mut m.regions)
                .map_err(|_| libc::EFAULT)?;
            m.len = m.len.saturating_add(sg.len as usize);
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
    fn reader_is_bounds_checked_across_regions() {
        let mut a = [1u8, 0, 0];
        let mut b = [0u8, 2, 0, 0, 0];
        let regions = [region(&mut a), region(&mut b)];
        let mut r = ChainReader::new(&regions);
        assert_eq!(r.read_obj::<u32>("x"), Ok(1));
        assert_eq!(r.remaining(), 4);
        assert_eq!(
            r.read_obj::<u64>("y"),
            Err(MediaError::Truncated {
                what: "y",
                needed: 8,
                left: 4
            })
        );
        assert_eq!(r.read_obj::<u32>("z"), Ok(2));
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
        assert_eq!(page_align(1), Some(4096));
        assert_eq!(page_align(u64::MAX), None);
    }
}
