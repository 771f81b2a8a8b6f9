//! The VMM-facing traits every Outboard device is written against.
//!
//! A VMM (or the vhost-user daemon) implements three small traits and drives one:
//!
//! - [`VirtQueue`]: pops descriptor chains as [`DescChain`]s whose device-readable and
//!   device-writable halves are lists of host memory regions ([`IoRegion`]), and returns
//!   them through the used ring. The queue owns notification suppression (EVENT_IDX).
//! - [`Interrupt`]: signals the driver that a queue's used ring moved, or that the
//!   config space changed.
//! - [`GuestMemoryAccess`]: translates guest-physical ranges to host regions, for devices
//!   that are handed guest addresses outside descriptor chains.
//! - [`VirtioDevice`]: what a device offers to a transport (virtio-mmio, vhost-user):
//!   type, queues, features, config space, activate/reset, and an event-loop interface
//!   (one pollable fd plus `handle_*` calls) that a worker thread integrates.
//!
//! # Guest memory is shared with a hostile guest
//!
//! An [`IoRegion`] is a raw pointer and a length, never a Rust reference: the guest may
//! change the bytes at any time, so a `&[u8]` into guest memory would be a lie to the
//! compiler. Regions are read and written with raw copies ([`IoRegion::read_at`],
//! [`IoRegion::write_at`]) or handed to the kernel as `iovec`s ([`IoRegion::as_iovec`]),
//! which is how the data path moves bytes between a socket and guest buffers with no
//! intermediate copy.
//!
//! # Reading and writing a chain
//!
//! Devices do not walk a chain's regions by hand: a [`ChainReader`] reads the
//! device-readable half as one bounds-checked stream (a header split over descriptors
//! included), a [`ChainWriter`] writes the device-writable half and counts the bytes
//! for [`VirtQueue::add_used`], and both hand out sub-regions
//! ([`ChainReader::take_regions`], [`ChainWriter::take_regions`]) for scatter/gather
//! I/O straight between guest memory and a socket.
//!
//! The feature bits re-exported here ([`VIRTIO_F_VERSION_1`], ...) are defined, with
//! the virtio sections they come from, in [`outboard_protocol::virtio`].
//!
//! # Lifetime of regions
//!
//! A [`VirtQueue`] implementation guarantees that the regions of a chain it popped stay
//! mapped at least until the device calls [`VirtQueue::enable_notification`] on that
//! queue (devices call it at the end of every processing pass, before they return from a
//! `handle_*` call). Devices never keep a [`DescChain`] across `handle_*` calls.
//! Regions from [`GuestMemoryAccess::host_regions`] come with a [`MemoryPin`] that
//! keeps their memory map alive; they are valid exactly as long as the pin is held.

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use thiserror::Error;
use zerocopy::{FromBytes, Immutable, IntoBytes};

mod chain;

pub use chain::{read_regions, slice_regions, write_regions, ChainError, ChainReader, ChainWriter};
// The feature bits are the specification's, defined with their sections in
// outboard-protocol; devices and transports have always found them here.
pub use outboard_protocol::virtio::{
    id, VIRTIO_F_IN_ORDER, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// A span of host memory that maps guest memory (or, in tests, any buffer).
///
/// It is plain data: a pointer and a length. Creating one is safe; the code that builds
/// it (a [`VirtQueue`] implementation) promises that it points into a live mapping of
/// `len` bytes (see the module docs for how long).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoRegion {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: an IoRegion is an address and a length with no thread affinity; the mapping it
// points into is process-wide, and every access through it is a raw copy or a syscall
// that tolerates concurrent modification by the guest.
unsafe impl Send for IoRegion {}
// SAFETY: as above; `&IoRegion` only exposes the address and length.
unsafe impl Sync for IoRegion {}

impl IoRegion {
    /// Creates a region.
    ///
    /// # Safety
    ///
    /// `ptr` must point to `len` bytes of memory that stay mapped, readable and writable
    /// (device-writable halves) or readable (device-readable halves) for as long as the
    /// region is used (see the module docs). The memory may be modified concurrently by
    /// others (a guest); no reference to it may exist.
    pub unsafe fn new(ptr: *mut u8, len: usize) -> Self {
        IoRegion { ptr, len }
    }

    /// A region of no bytes (nothing can be read or written through it).
    pub const fn empty() -> Self {
        IoRegion {
            ptr: std::ptr::null_mut(),
            len: 0,
        }
    }

    /// The host address.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The sub-region `[offset, offset + len)`, clamped to this region.
    #[inline]
    pub fn sub(&self, offset: usize, len: usize) -> IoRegion {
        let offset = offset.min(self.len);
        let len = len.min(self.len - offset);
        IoRegion {
            // `offset <= self.len`, so the pointer stays inside (or one past) the mapping.
            ptr: self.ptr.wrapping_add(offset),
            len,
        }
    }

    /// The region as an `iovec` for `readv`/`writev`/`sendmsg`/`recvmsg`.
    pub fn as_iovec(&self) -> libc::iovec {
        libc::iovec {
            iov_base: self.ptr.cast(),
            iov_len: self.len,
        }
    }

    /// Copies `dst.len()` bytes from `offset` into `dst`; returns how many were copied
    /// (fewer when the region ends first).
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> usize {
        if offset >= self.len {
            return 0;
        }
        let n = dst.len().min(self.len - offset);
        // SAFETY: `offset + n <= self.len`, and `IoRegion::new`'s contract makes the
        // region readable. `dst` is a distinct local buffer. This is a raw copy, no
        // reference into guest memory is created; concurrent guest writes can only make
        // the copied bytes stale, which callers treat as untrusted input anyway.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(offset), dst.as_mut_ptr(), n) };
        n
    }

    /// Copies `src` to `offset`; returns how many bytes were copied (fewer when the
    /// region ends first).
    pub fn write_at(&self, offset: usize, src: &[u8]) -> usize {
        if offset >= self.len {
            return 0;
        }
        let n = src.len().min(self.len - offset);
        // SAFETY: `offset + n <= self.len`; the device-writable halves a VirtQueue hands
        // out are writable (IoRegion::new's contract). Raw copy, no reference created.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(offset), n) };
        n
    }
}

impl IoRegion {
    /// Reads a `T` at `offset` when it lies wholly inside the region (`None` otherwise).
    ///
    /// Unlike [`IoRegion::read_at`] into a zeroed `T`, the size is a compile-time
    /// constant: the copy is a few inline moves rather than a `memcpy` call after
    /// zeroing (this is the path of every command header and ioctl payload).
    pub fn read_obj_at<T: FromBytes>(&self, offset: usize) -> Option<T> {
        let end = offset.checked_add(std::mem::size_of::<T>())?;
        if end > self.len {
            return None;
        }
        // SAFETY: `offset + size_of::<T>() <= self.len`, and `IoRegion::new`'s contract
        // makes the region readable. `read_unaligned` copies the bytes without creating
        // a reference into guest memory and needs no alignment; `T: FromBytes` makes
        // every byte pattern a valid `T`, so concurrent guest writes can only make the
        // value stale, which callers treat as untrusted input anyway.
        Some(unsafe { std::ptr::read_unaligned(self.ptr.add(offset).cast::<T>()) })
    }

    /// Writes `obj` at `offset` when it fits wholly inside the region; returns whether
    /// it was written (nothing is written otherwise).
    ///
    /// The constant-size counterpart of [`IoRegion::write_at`] (see
    /// [`IoRegion::read_obj_at`]).
    pub fn write_obj_at<T: IntoBytes + Immutable>(&self, offset: usize, obj: &T) -> bool {
        let size = std::mem::size_of::<T>();
        match offset.checked_add(size) {
            Some(end) if end <= self.len => {}
            _ => return false,
        }
        // SAFETY: `offset + size <= self.len`; the device-writable halves a VirtQueue
        // hands out are writable (IoRegion::new's contract). `T: IntoBytes` has no
        // padding, so all `size` source bytes are initialized; `obj` is a distinct
        // local value. Raw copy, no reference into guest memory is created.
        unsafe {
            std::ptr::copy_nonoverlapping(
                std::ptr::from_ref(obj).cast::<u8>(),
                self.ptr.add(offset),
                size,
            )
        };
        true
    }
}

/// Most host regions a [`VirtQueue`] implementation puts in one [`DescChain`]; longer
/// chains (possible with indirect tables of up to 65535 descriptors) are refused as
/// [`QueueError::BadChain`], so a guest cannot make a device's scratch space grow.
pub const MAX_CHAIN_REGIONS: usize = 1024;

/// One descriptor chain popped from a [`VirtQueue`].
///
/// The device-readable half comes first in a chain (the driver's request), the
/// device-writable half follows (room for the device's answer). Implementations refuse
/// chains that put a readable descriptor after a writable one. The vectors are reused
/// between pops to avoid allocation on the data path.
#[derive(Debug, Default, Clone)]
pub struct DescChain {
    /// Index of the chain's head descriptor, handed back to [`VirtQueue::add_used`].
    pub head: u16,
    /// The device-readable regions, in chain order.
    pub readable: Vec<IoRegion>,
    /// The device-writable regions, in chain order.
    pub writable: Vec<IoRegion>,
}

impl DescChain {
    /// Empties both halves (keeps the allocations).
    pub fn clear(&mut self) {
        self.head = 0;
        self.readable.clear();
        self.writable.clear();
    }

    /// Total length of the readable half (saturating).
    pub fn readable_len(&self) -> usize {
        self.readable
            .iter()
            .fold(0usize, |a, r| a.saturating_add(r.len()))
    }

    /// Total length of the writable half (saturating).
    pub fn writable_len(&self) -> usize {
        self.writable
            .iter()
            .fold(0usize, |a, r| a.saturating_add(r.len()))
    }
}

/// Errors of a [`VirtQueue`] implementation.
#[cfg_attr(test, remain::sorted)]
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum QueueError {
    /// A chain was malformed (a descriptor outside guest memory, a readable descriptor
    /// after a writable one, a loop, ...). The device returns the chain with
    /// `add_used(head, 0)` and carries on.
    #[error("descriptor chain with head {head} is malformed: {reason}")]
    BadChain {
        /// The chain's head index.
        head: u16,
        /// What was wrong.
        reason: &'static str,
    },
    /// The ring is broken: its indices or addresses are inconsistent (the available
    /// index more than the queue size ahead of the device, a ring outside guest
    /// memory, an index that went backwards). A broken queue stays broken until the
    /// transport resets it: every later call returns this error again, so a device
    /// stops processing the queue (it never retries it in a loop), and the transport
    /// tells the driver (the vhost-user error eventfd, virtio's `DEVICE_NEEDS_RESET`).
    #[error("ring is broken until reset: {0}")]
    Broken(String),
    /// The used ring could not be written (bad used ring address or head index).
    #[error("cannot add head {head} to the used ring: {reason}")]
    Used {
        /// The head index.
        head: u16,
        /// Why.
        reason: String,
    },
}

/// A virtqueue as the device sees it. Implemented by the VMM glue (for example over
/// rust-vmm `virtio-queue`) and by test drivers.
///
/// # A broken ring ends the pass
///
/// Every method may return [`QueueError::Broken`]. Once it has, the queue returns it
/// from every call until the transport resets it, and in particular
/// [`enable_notification`](VirtQueue::enable_notification) never again reports work
/// pending. A device's processing loop therefore ends on any error other than
/// [`QueueError::BadChain`]; it must never loop on a queue that reports an error.
pub trait VirtQueue: Send {
    /// Pops the next available chain into `chain` (overwriting it). Returns `Ok(false)`
    /// when the driver has made nothing available. A malformed chain (including one of
    /// more than [`MAX_CHAIN_REGIONS`] regions) is consumed and reported as
    /// [`QueueError::BadChain`]; the device must return it with `add_used(head, 0)`.
    fn pop(&mut self, chain: &mut DescChain) -> Result<bool, QueueError>;

    /// Un-pops the most recently popped chain, which has not been added to the used ring;
    /// the next `pop` returns it again. Devices use it when they popped a buffer they
    /// could not fill. Calls may repeat to un-pop several chains, newest first.
    fn undo_pop(&mut self);

    /// Puts a chain on the used ring with `len` bytes written into its writable half.
    fn add_used(&mut self, head: u16, len: u32) -> Result<(), QueueError>;

    /// Whether the driver must be notified now about used buffers added since the last
    /// notification (always true without EVENT_IDX, unless the driver suppressed it).
    fn needs_notification(&mut self) -> Result<bool, QueueError>;

    /// Asks the driver to notify (kick) on new available buffers. Returns true when new
    /// buffers became available meanwhile (the device must process them again).
    fn enable_notification(&mut self) -> Result<bool, QueueError>;

    /// Asks the driver not to kick (the device is polling the queue).
    fn disable_notification(&mut self) -> Result<(), QueueError>;
}

/// Signals the driver.
pub trait Interrupt: Send + Sync {
    /// The used ring of `queue` has new entries.
    fn signal_used_queue(&self, queue: usize);
    /// The device's configuration space changed.
    fn signal_config_change(&self);
}

/// Signals `interrupt` for queue number `index` unless the driver suppressed the
/// notification (EVENT_IDX `used_event`, or `VRING_AVAIL_F_NO_INTERRUPT`).
///
/// A queue that cannot tell (its guest memory could not be read) is signalled anyway:
/// a spurious interrupt is harmless, a lost one stalls the driver. Does nothing for an
/// unknown queue or before activation (`interrupt` is `None`).
pub fn signal_used(
    queues: &mut [Box<dyn VirtQueue>],
    index: usize,
    interrupt: Option<&dyn Interrupt>,
) {
    let (Some(queue), Some(interrupt)) = (queues.get_mut(index), interrupt) else {
        return;
    };
    if queue.needs_notification().unwrap_or(true) {
        interrupt.signal_used_queue(index);
    }
}

/// Errors of [`GuestMemoryAccess`].
#[cfg_attr(test, remain::sorted)]
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MemoryError {
    /// The range is not (entirely) backed by guest memory.
    #[error("guest range {addr:#x}+{len:#x} is not mapped")]
    Unmapped {
        /// Guest-physical start.
        addr: u64,
        /// Length.
        len: u64,
    },
}

/// Keeps the guest memory map that host regions were translated from mapped while it
/// is held: regions from [`GuestMemoryAccess::host_regions`] are valid exactly as long
/// as the pin it returned. Hold the pin beside the regions (as
/// `outboard_devices::media::RegionMapping` does); once both are dropped the VMM may
/// unmap the memory.
#[derive(Clone, Default)]
pub struct MemoryPin(Option<(Arc<dyn std::any::Any + Send + Sync>, usize)>);

impl MemoryPin {
    /// A pin that keeps `snapshot` (the VMM's handle on its memory map) alive.
    /// `identity` names the memory map (for example the address of the map the handle
    /// points to): pins with equal identities hold the same map.
    pub fn new(snapshot: Arc<dyn std::any::Any + Send + Sync>, identity: usize) -> Self {
        MemoryPin(Some((snapshot, identity)))
    }

    /// A pin of memory that never goes away (a test buffer, a static mapping).
    pub fn none() -> Self {
        MemoryPin(None)
    }

    /// Whether both pins hold the same memory map.
    pub fn same(&self, other: &MemoryPin) -> bool {
        match (&self.0, &other.0) {
            (Some((_, a)), Some((_, b))) => a == b,
            (None, None) => true,
            _ => false,
        }
    }
}

impl std::fmt::Debug for MemoryPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some((_, id)) => write!(f, "MemoryPin({id:#x})"),
            None => f.write_str("MemoryPin(static)"),
        }
    }
}

/// Translation of guest-physical ranges to host memory.
pub trait GuestMemoryAccess: Send + Sync {
    /// Appends to `out` the host regions that back `[addr, addr + len)` (several when the
    /// range crosses memory regions), and returns the pin that keeps them mapped. Fails
    /// without appending when any part is unmapped.
    fn host_regions(
        &self,
        addr: u64,
        len: u64,
        out: &mut Vec<IoRegion>,
    ) -> Result<MemoryPin, MemoryError>;
}

/// Errors of [`VirtioDevice::activate`].
#[cfg_attr(test, remain::sorted)]
#[derive(Debug, Error)]
pub enum ActivateError {
    /// The device is already active.
    #[error("device is already active")]
    AlreadyActive,
    /// The device could not set up its host resources.
    #[error("device setup failed: {0}")]
    Io(#[from] std::io::Error),
    /// The transport handed over a wrong number of queues.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues handed over.
        got: usize,
    },
}

/// Errors of [`VirtioDevice::snapshot_state`] and [`VirtioDevice::restore_state`].
#[cfg_attr(test, remain::sorted)]
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StateError {
    /// The device refused the state, or could not take it; the message says why and
    /// names the values involved (a guest CID of another device, an unknown version).
    #[error("device state refused: {0}")]
    Refused(String),
    /// The device does not save or restore its state (the default).
    #[error("device type {device_type} does not save or restore its state")]
    Unsupported {
        /// The device's virtio id.
        device_type: u32,
    },
}

/// A virtio device model, as a transport (virtio-mmio, vhost-user daemon) drives it.
///
/// # Activation
///
/// The transport negotiates features ([`VirtioDevice::features`],
/// [`VirtioDevice::ack_features`]), builds one [`VirtQueue`] per queue with the
/// driver's ring addresses and size, enables EVENT_IDX on them when
/// [`VIRTIO_RING_F_EVENT_IDX`] was negotiated, and calls [`VirtioDevice::activate`].
///
/// # Event loop
///
/// A worker thread waits on the queues' kick eventfds and on
/// [`VirtioDevice::event_fd`] (level-triggered, readable means work). On a kick of queue
/// `i` it calls [`VirtioDevice::handle_queue`]`(i)`; when `event_fd` is readable it calls
/// [`VirtioDevice::handle_event`]. Both calls never block.
pub trait VirtioDevice: Send {
    /// The virtio device id ([`id`]`::VSOCK` is 19): what the driver matches on.
    fn device_type(&self) -> u32;

    /// The maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Feature bits the device offers (including transport bits like VERSION_1).
    ///
    /// The default offers [`VIRTIO_F_VERSION_1`] alone: a virtio 1.x device with no
    /// device-specific feature (virtio-rng).
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    /// Records the features the driver accepted (a subset of [`VirtioDevice::features`];
    /// unknown bits are ignored). The default ignores them: a device with no
    /// device-specific feature behaves the same whatever was accepted.
    fn ack_features(&mut self, features: u64) {
        let _ = features;
    }

    /// Size in bytes of the device's configuration space, 0 (the default) for a device
    /// that has none (virtio-rng).
    ///
    /// Transports offer only what exists: the vhost-user daemon offers
    /// `VHOST_USER_PROTOCOL_F_CONFIG` (and so answers `GET_CONFIG`) only when this is not
    /// 0, so that a front-end that has no config space for the device type (QEMU's
    /// `vhost-user-rng`) does not warn about it.
    fn config_size(&self) -> usize {
        0
    }

    /// Reads config space at `offset` into `data` (out of range bytes read as zero).
    ///
    /// The default reads zeros (no config space). A device with one overrides this and
    /// [`VirtioDevice::config_size`]; [`read_config_bytes`] copies from the bytes of a
    /// config struct with the out-of-range rule.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let _ = offset;
        data.fill(0);
    }

    /// Writes config space (devices ignore writes to read-only fields). The default
    /// ignores every write (no writable field).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }

    /// Whether every byte the device writes into guest memory for the driver to read
    /// lies in the first `len` bytes of the device-writable half of a chain it then
    /// returns with [`VirtQueue::add_used`]`(head, len)`: no writes through
    /// [`GuestMemoryAccess`], none into a chain after it was returned, and every chain
    /// written into returned with its own `add_used` (not only covered by a later entry
    /// of a `VIRTIO_F_IN_ORDER` batch). (Bytes past `len` of a failed write are ones a
    /// driver ignores.)
    ///
    /// A transport can then log the pages the device dirtied from the used chains alone,
    /// which is what live migration needs (the vhost-user daemon offers
    /// `VHOST_USER_PROTOCOL_F_LOG_SHMFD` and `VHOST_F_LOG_ALL` only for such a device).
    /// The default is `false`: a device that writes elsewhere (virtio-media writes into
    /// the guest's USERPTR pages) would lose those writes in a migration.
    fn writes_only_to_used_chains(&self) -> bool {
        false
    }

    /// Starts the device with its queues (in queue index order) and interrupt.
    fn activate(
        &mut self,
        queues: Vec<Box<dyn VirtQueue>>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), ActivateError>;

    /// Stops the device and drops its queues and host state; it can be activated again.
    fn reset(&mut self);

    /// An fd the worker must poll for readability (the device's own epoll set), if any.
    /// The default is `None`: a device that only answers the driver's kicks.
    fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    /// The driver kicked queue `queue`.
    fn handle_queue(&mut self, queue: usize);

    /// [`VirtioDevice::event_fd`] is readable. The default does nothing (there is no
    /// event fd).
    fn handle_event(&mut self) {}

    /// Whether the device implements [`VirtioDevice::snapshot_state`] and
    /// [`VirtioDevice::restore_state`]. Transports offer state transfer only then (the
    /// vhost-user daemon offers `VHOST_USER_PROTOCOL_F_DEVICE_STATE`). The default is
    /// false.
    fn supports_state(&self) -> bool {
        false
    }

    /// The device's own state, in the device's own versioned encoding (opaque to
    /// transports), for a snapshot or a migration. The transport saves its own state
    /// (status, features, queue addresses and indices) beside it.
    ///
    /// Called between `handle_*` calls with the device quiesced: the virtio-mmio
    /// transport asleep or the vhost-user rings stopped. The default fails with
    /// [`StateError::Unsupported`].
    fn snapshot_state(&mut self) -> Result<Vec<u8>, StateError> {
        Err(StateError::Unsupported {
            device_type: self.device_type(),
        })
    }

    /// Takes back state from [`VirtioDevice::snapshot_state`] (possibly of another
    /// process). `state` comes from outside (a snapshot file, a vhost-user front-end):
    /// a device checks it like any other input and refuses state it cannot honour (an
    /// unknown version, another device's identity) with [`StateError::Refused`].
    ///
    /// Called on a device that is not active (new or reset), after the transport acked
    /// the driver's features and before it activates the device with queues that go on
    /// at the saved ring indices. The default fails with [`StateError::Unsupported`].
    fn restore_state(&mut self, state: &[u8]) -> Result<(), StateError> {
        let _ = state;
        Err(StateError::Unsupported {
            device_type: self.device_type(),
        })
    }
}

/// Copies `config` (a device's config space as bytes, `zerocopy::IntoBytes::as_bytes`
/// of its config struct) from `offset` into `data`, bytes past its end as zeros: the
/// usual [`VirtioDevice::read_config`].
///
/// ```
/// use outboard_devices::virtio::read_config_bytes;
///
/// let mut data = [0xffu8; 4];
/// read_config_bytes(&[1, 2, 3], 1, &mut data);
/// assert_eq!(data, [2, 3, 0, 0]);
/// read_config_bytes(&[1, 2, 3], u64::MAX, &mut data);
/// assert_eq!(data, [0; 4]);
/// ```
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Some(src) = usize::try_from(offset).ok().and_then(|o| config.get(o..)) else {
        return;
    };
    let n = src.len().min(data.len());
    data[..n].copy_from_slice(&src[..n]);
}

/// A self-contained event loop for one activated device, for VMMs and daemons that do
/// not have their own: polls the queues' kick eventfds (`kicks[i]` is queue `i`), the
/// device's [`VirtioDevice::event_fd`] and `stop`, and dispatches until `stop` becomes
/// readable (or polling fails, which is returned).
pub fn run_device(
    device: &mut dyn VirtioDevice,
    kicks: &[BorrowedFd<'_>],
    stop: BorrowedFd<'_>,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    loop {
        let mut fds: Vec<libc::pollfd> = kicks
            .iter()
            .map(|k| libc::pollfd {
                fd: k.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        fds.push(libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        if let Some(ev) = device.event_fd() {
            fds.push(libc::pollfd {
                fd: ev.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds for the whole call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[kicks.len()].revents != 0 {
            return Ok(());
        }
        for (queue, fd) in fds[..kicks.len()].iter().enumerate() {
            if fd.revents != 0 {
                let mut count = [0u8; 8];
                // SAFETY: reading 8 bytes into a local buffer clears an eventfd; a
                // failure (EAGAIN) only means there was nothing to clear.
                let _ = unsafe { libc::read(fd.fd, count.as_mut_ptr().cast(), count.len()) };
                device.handle_queue(queue);
            }
        }
        if fds.len() > kicks.len() + 1 && fds[kicks.len() + 1].revents != 0 {
            device.handle_event();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    use super::*;

    fn eventfd() -> OwnedFd {
        // SAFETY: plain call; the result is checked and owned below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` is new and owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    fn signal(fd: &OwnedFd) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a local buffer to an eventfd.
        let n = unsafe { libc::write(std::os::fd::AsRawFd::as_raw_fd(fd), one.as_ptr().cast(), 8) };
        assert_eq!(n, 8);
    }

    struct Fake {
        stop: OwnedFd,
        handled: Vec<usize>,
    }

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            0
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[8, 8]
        }
        fn features(&self) -> u64 {
            0
        }
        fn ack_features(&mut self, _: u64) {}
        fn read_config(&self, _: u64, _: &mut [u8]) {}
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(
            &mut self,
            _: Vec<Box<dyn VirtQueue>>,
            _: Arc<dyn Interrupt>,
        ) -> Result<(), ActivateError> {
            Ok(())
        }
        fn reset(&mut self) {}
        fn event_fd(&self) -> Option<BorrowedFd<'_>> {
            None
        }
        fn handle_queue(&mut self, queue: usize) {
            self.handled.push(queue);
            signal(&self.stop);
        }
        fn handle_event(&mut self) {}
    }

    #[test]
    fn run_device_dispatches_kicks_until_stopped() {
        let kicks = [eventfd(), eventfd()];
        let stop = eventfd();
        let mut dev = Fake {
            stop: stop.try_clone().unwrap(),
            handled: Vec::new(),
        };
        signal(&kicks[1]);
        let borrowed: Vec<BorrowedFd<'_>> = kicks.iter().map(|k| k.as_fd()).collect();
        run_device(&mut dev, &borrowed, stop.as_fd()).unwrap();
        assert_eq!(dev.handled, vec![1]);
    }
}
