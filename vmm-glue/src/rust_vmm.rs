//! Implementations of outboard-devices' VMM-facing traits over rust-vmm's `vm-memory`
//! and `virtio-queue`.
//!
//! - [`RustVmmQueue`]: a [`VirtQueue`] over a split `virtio_queue::Queue` and any
//!   [`GuestAddressSpace`] (for the vhost-user daemon,
//!   `GuestMemoryAtomic<GuestMemoryMmap>`, whose regions are the front-end's memfds
//!   mapped at their offsets). Descriptor chains (direct or indirect) become lists of
//!   host regions; a descriptor that crosses a memory-region boundary becomes several.
//!   EVENT_IDX is honoured when enabled on the queue (`Queue::set_event_idx`, which the
//!   transport calls when the driver negotiated it).
//! - [`EventFdInterrupt`]: an [`Interrupt`] that writes one eventfd per queue (the
//!   vhost-user call fds, or irqfds).
//! - [`RustVmmMemory`]: a [`GuestMemoryAccess`] over a [`GuestAddressSpace`].
//!
//! # Dirty pages
//!
//! Writes through the host regions bypass vm-memory's dirty bitmap (the vsock device
//! even `recvmsg`s straight into them), so dirty pages are not tracked at the memory
//! level. A queue given a [`DirtyLog`] ([`RustVmmQueue::with_dirty_log`]) marks them
//! where a chain comes back instead: while the log is on, [`VirtQueue::pop`] records
//! the guest-physical ranges of the chain's device-writable descriptors, and
//! [`VirtQueue::add_used`]`(head, len)` marks the pages of the first `len` bytes of
//! them, then the used element and the used index it wrote (and
//! [`VirtQueue::enable_notification`] / [`VirtQueue::disable_notification`] the used
//! ring fields they write), each after the write. This is exact for a device whose
//! writes all go into the chains it returns
//! ([`VirtioDevice::writes_only_to_used_chains`](outboard_devices::virtio::VirtioDevice::writes_only_to_used_chains)),
//! and relies on devices not keeping a chain across `handle_*` calls (the
//! [`VirtQueue`] contract): a transport switches the log on and off between those
//! calls, so a chain is never popped with the log off and returned with it on.
//!
//! # Broken rings
//!
//! The available index is a free-running 16-bit counter, so any start value is legal;
//! what is not is an index more than the queue size ahead of the device's own, a ring
//! the device cannot read, or an index that goes backwards. `virtio_queue` answers
//! these with an iterator error (and a log line) on every pop, which a device loop
//! would take for "empty" while `enable_notification` keeps reporting work: a busy
//! loop. [`RustVmmQueue`] checks the index where it reads the ring and, on the first
//! inconsistency, becomes broken: every later call returns
//! [`QueueError::Broken`] (so [`VirtQueue::enable_notification`] can no longer report
//! work) and, if the queue was given a [`RingHealth`], the ring is reported there once
//! for the transport to stop it and tell the driver.

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use outboard_devices::virtio::{
    DescChain, GuestMemoryAccess, Interrupt, IoRegion, MemoryError, MemoryPin, QueueError,
    VirtQueue, MAX_CHAIN_REGIONS,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemory, Permissions};
use vmm_sys_util::eventfd::EventFd;

/// How many distinct guest memory snapshots a queue keeps pinned, so that chains popped
/// before a memory-map update stay mapped while the device finishes with them.
const PINNED_SNAPSHOTS: usize = 4;

/// Appends the host regions backing `[addr, addr + len)` to `out`; false when any part
/// is not guest memory.
fn translate<M: GuestMemory + ?Sized>(
    mem: &M,
    addr: u64,
    len: usize,
    access: Permissions,
    out: &mut Vec<IoRegion>,
) -> bool {
    if len == 0 {
        return true;
    }
    let Ok(slices) = mem.get_slices(GuestAddress(addr), len, access) else {
        return false;
    };
    let mut covered = 0usize;
    for slice in slices {
        let Ok(slice) = slice else {
            return false;
        };
        let guard = slice.ptr_guard_mut();
        // SAFETY: the slice describes `slice.len()` bytes of a live guest memory mapping
        // of `mem`. RustVmmQueue::pop pins that memory snapshot and keeps it until
        // several newer snapshots were seen, i.e. beyond the handle_* call that uses
        // the chain's regions (the VirtQueue contract); RustVmmMemory::host_regions
        // hands the snapshot out as the MemoryPin its caller holds with the regions.
        // Either way the mapping outlives the regions, as IoRegion::new requires.
        // IoRegion never creates references into it.
        out.push(unsafe { IoRegion::new(guard.as_ptr(), slice.len()) });
        covered = covered.saturating_add(slice.len());
    }
    covered == len
}

/// The rings of one device that broke and are not yet handled by the transport.
///
/// Shared by a device's [`RustVmmQueue`]s (each reports its own ring once, when it
/// breaks) and the transport, which checks [`RingHealth::has_news`] (one atomic load)
/// after it drove the device and then stops the rings [`RingHealth::take`] returns and
/// tells the driver.
#[derive(Debug, Default)]
pub struct RingHealth {
    news: AtomicBool,
    broken: Mutex<Vec<(usize, String)>>,
}

impl RingHealth {
    /// A health record with no broken ring.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `ring` broke, and why. A ring is recorded at most once until taken.
    pub fn report(&self, ring: usize, reason: &str) {
        let mut broken = self.broken.lock().unwrap_or_else(|p| p.into_inner());
        if !broken.iter().any(|(r, _)| *r == ring) {
            broken.push((ring, reason.to_string()));
        }
        self.news.store(true, Ordering::Release);
    }

    /// Whether a ring broke since the last [`RingHealth::take`].
    #[inline]
    pub fn has_news(&self) -> bool {
        self.news.load(Ordering::Acquire)
    }

    /// The rings that broke since the last call, with the reason, in the order they
    /// broke.
    pub fn take(&self) -> Vec<(usize, String)> {
        let mut broken = self.broken.lock().unwrap_or_else(|p| p.into_inner());
        self.news.store(false, Ordering::Release);
        std::mem::take(&mut *broken)
    }
}

/// Where a [`RustVmmQueue`] marks the guest memory it and its device wrote, for live
/// migration (see the [module docs](self)).
pub trait DirtyLog: Send + Sync {
    /// Whether writes are logged now (checked on every pop and every used entry, so
    /// make it one atomic load).
    fn logging(&self) -> bool;

    /// Marks the pages of `[gpa, gpa + len)` dirty (nothing for `len` 0). Called after
    /// the bytes were written.
    fn mark(&self, gpa: u64, len: u64);
}

/// A chain's recorded device-writable ranges larger than this give their memory back
/// once returned, so that a guest offering huge chains once does not leave the queue
/// holding ring-size times [`MAX_CHAIN_REGIONS`] entries.
const KEPT_RANGES: usize = 16;

/// Offset of the first used element in a split used ring (after `flags` and `idx`).
const USED_ELEMS: u64 = 4;
/// Size of one used element (`id` and `len`).
const USED_ELEM_SIZE: u64 = 8;

/// The dirty-page state of one queue.
struct DirtyTracking {
    log: Arc<dyn DirtyLog>,
    /// `VHOST_VRING_F_LOG`: the guest-physical address at which used-ring writes are
    /// logged (the used ring's own, as the front-end sees it).
    used_log: Option<u64>,
    /// Per head index: the `(guest address, length)` of the device-writable
    /// descriptors of the chain last popped with that head while logging.
    written: Vec<Vec<(u64, u32)>>,
}

/// A [`VirtQueue`] over a rust-vmm split queue.
pub struct RustVmmQueue<M: GuestAddressSpace> {
    queue: Queue,
    mem: M,
    pinned: Vec<M::T>,
    /// The last available index read and found consistent: entries up to it exist.
    avail_seen: u16,
    broken: Option<String>,
    health: Option<(Arc<RingHealth>, usize)>,
    dirty: Option<DirtyTracking>,
}

impl<M: GuestAddressSpace> std::fmt::Debug for RustVmmQueue<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RustVmmQueue")
            .field("queue", &self.queue)
            .field("broken", &self.broken)
            .finish()
    }
}

impl<M: GuestAddressSpace> RustVmmQueue<M> {
    /// Wraps a configured, ready queue and the guest memory it lives in.
    pub fn new(queue: Queue, mem: M) -> Self {
        RustVmmQueue {
            avail_seen: queue.next_avail(),
            queue,
            mem,
            pinned: Vec::new(),
            broken: None,
            health: None,
            dirty: None,
        }
    }

    /// Marks what is written through this queue in `log` while it is on (see the
    /// [module docs](self)); `used_log` is the address used-ring writes are logged at
    /// (`VHOST_VRING_F_LOG`), `None` to log only the chains' buffers.
    pub fn with_dirty_log(mut self, log: Arc<dyn DirtyLog>, used_log: Option<u64>) -> Self {
        self.dirty = Some(DirtyTracking {
            log,
            used_log,
            written: Vec::new(),
        });
        self
    }

    /// Changes where used-ring writes are logged (a front-end that turns
    /// `VHOST_VRING_F_LOG` on or off for a running ring); nothing without
    /// [`RustVmmQueue::with_dirty_log`].
    pub fn set_used_log(&mut self, used_log: Option<u64>) {
        if let Some(d) = self.dirty.as_mut() {
            d.used_log = used_log;
        }
    }

    /// Marks `len` bytes at `offset` in the used ring, if used-ring writes are logged
    /// now.
    fn mark_used_ring(&self, offset: u64, len: u64) {
        if let Some(d) = self.dirty.as_ref() {
            if let Some(base) = d.used_log.filter(|_| d.log.logging()) {
                // An address that wraps cannot be in the log; the log bounds-checks.
                d.log.mark(base.wrapping_add(offset), len);
            }
        }
    }

    /// After `add_used(head, len)` wrote used element `slot`: marks the first `len`
    /// bytes of the chain's writable descriptors, the element and the used index.
    fn mark_used(&mut self, head: u16, len: u32, slot: u16) {
        let Some(d) = self.dirty.as_mut() else {
            return;
        };
        if !d.log.logging() {
            return;
        }
        if let Some(ranges) = d.written.get_mut(usize::from(head)) {
            let mut left = u64::from(len);
            for &(gpa, n) in ranges.iter() {
                if left == 0 {
                    break;
                }
                let n = left.min(u64::from(n));
                d.log.mark(gpa, n);
                left -= n;
            }
            if ranges.capacity() > KEPT_RANGES {
                *ranges = Vec::new();
            } else {
                ranges.clear();
            }
        }
        self.mark_used_ring(
            USED_ELEMS + USED_ELEM_SIZE * u64::from(slot),
            USED_ELEM_SIZE,
        );
        // `flags` and `idx`: the index the used element was published with.
        self.mark_used_ring(0, USED_ELEMS);
    }

    /// Reports to `health`, as ring `ring`, when this queue breaks.
    pub fn with_health(mut self, health: Arc<RingHealth>, ring: usize) -> Self {
        self.health = Some((health, ring));
        self
    }

    /// Why the queue is broken, if it is (see the [module docs](self)).
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// Marks the queue broken (the first reason sticks) and returns the error to hand
    /// the device.
    fn break_ring(&mut self, reason: String) -> QueueError {
        if self.broken.is_none() {
            if let Some((health, ring)) = &self.health {
                health.report(*ring, &reason);
            }
            self.broken = Some(reason);
        }
        QueueError::Broken(self.broken.clone().unwrap_or_default())
    }

    fn check_broken(&self) -> Result<(), QueueError> {
        match &self.broken {
            Some(r) => Err(QueueError::Broken(r.clone())),
            None => Ok(()),
        }
    }

    /// Reads the available index and checks it against the device's: Ok(false) when
    /// the ring is empty.
    fn refresh_avail(&mut self, mem: &M::M) -> Result<bool, QueueError> {
        let next = self.queue.next_avail();
        let size = self.queue.size();
        let avail = match self
            .queue
            .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
        {
            Ok(i) => i.0,
            Err(e) => {
                return Err(self.break_ring(format!(
                    "available ring at {:#x} is unreadable: {e}",
                    self.queue.avail_ring()
                )))
            }
        };
        let pending = avail.wrapping_sub(next);
        if pending > size {
            return Err(self.break_ring(format!(
                "available index {avail} is {pending} entries ahead of the device's {next} \
                 on a {size}-entry ring"
            )));
        }
        self.avail_seen = avail;
        Ok(pending != 0)
    }

    /// The wrapped queue.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// The wrapped queue, mutably (to save or restore its state).
    pub fn queue_mut(&mut self) -> &mut Queue {
        &mut self.queue
    }

    /// Takes the queue back.
    pub fn into_inner(self) -> Queue {
        self.queue
    }

    fn pin(&mut self, snapshot: &M::T) {
        let same = self
            .pinned
            .last()
            .is_some_and(|p| std::ptr::eq(p.deref(), snapshot.deref()));
        if !same {
            if self.pinned.len() >= PINNED_SNAPSHOTS {
                self.pinned.remove(0);
            }
            self.pinned.push(snapshot.clone());
        }
    }
}

impl<M> VirtQueue for RustVmmQueue<M>
where
    M: GuestAddressSpace + Send,
    M::T: Send,
{
    fn pop(&mut self, chain: &mut DescChain) -> Result<bool, QueueError> {
        chain.clear();
        self.check_broken()?;
        let mem = self.mem.memory();
        self.pin(&mem);
        // Entries up to `avail_seen` were checked already; only read the index again
        // once they are used up.
        if self.queue.next_avail() == self.avail_seen && !self.refresh_avail(&mem)? {
            return Ok(false);
        }
        let next = self.queue.next_avail();
        let Some(descs) = self.queue.pop_descriptor_chain(mem.clone()) else {
            // Entries were there and now are not: the index went backwards, or the
            // ring became unreadable.
            return Err(self.break_ring(format!(
                "available entry {next} vanished or is unreadable (ring at {:#x})",
                self.queue.avail_ring()
            )));
        };
        let head = descs.head_index();
        chain.head = head;
        let size = usize::from(self.queue.size());
        let mut record = self
            .dirty
            .as_mut()
            .filter(|d| d.log.logging())
            .and_then(|d| {
                if d.written.len() < size {
                    d.written.resize_with(size, Vec::new);
                }
                d.written.get_mut(usize::from(head))
            });
        if let Some(r) = record.as_mut() {
            r.clear();
        }
        let mut writable_seen = false;
        for desc in descs {
            let write = desc.is_write_only();
            if !write && writable_seen {
                return Err(QueueError::BadChain {
                    head,
                    reason: "device-readable descriptor after a device-writable one",
                });
            }
            writable_seen |= write;
            let (out, access) = if write {
                (&mut chain.writable, Permissions::Write)
            } else {
                (&mut chain.readable, Permissions::Read)
            };
            if !translate(&*mem, desc.addr().0, desc.len() as usize, access, out) {
                return Err(QueueError::BadChain {
                    head,
                    reason: "descriptor outside guest memory",
                });
            }
            if write && desc.len() > 0 {
                if let Some(r) = record.as_mut() {
                    // At most MAX_CHAIN_REGIONS + 1 entries: the check below ends
                    // longer chains, and every entry added a region.
                    r.push((desc.addr().0, desc.len()));
                }
            }
            if chain.readable.len() + chain.writable.len() > MAX_CHAIN_REGIONS {
                return Err(QueueError::BadChain {
                    head,
                    reason: "more descriptors than MAX_CHAIN_REGIONS",
                });
            }
        }
        Ok(true)
    }

    fn undo_pop(&mut self) {
        self.queue.go_to_previous_position();
    }

    fn add_used(&mut self, head: u16, len: u32) -> Result<(), QueueError> {
        self.check_broken()?;
        let mem = self.mem.memory();
        let slot = self.queue.next_used() % self.queue.size().max(1);
        match self.queue.add_used(&*mem, head, len) {
            Ok(()) => {
                self.mark_used(head, len, slot);
                Ok(())
            }
            // The head came from the guest's available ring: a bad chain, not a bad ring.
            Err(e @ virtio_queue::Error::InvalidDescriptorIndex) => Err(QueueError::Used {
                head,
                reason: e.to_string(),
            }),
            Err(e) => Err(self.break_ring(format!(
                "used ring at {:#x} is not writable: {e}",
                self.queue.used_ring()
            ))),
        }
    }

    fn needs_notification(&mut self) -> Result<bool, QueueError> {
        self.check_broken()?;
        let mem = self.mem.memory();
        match self.queue.needs_notification(&*mem) {
            Ok(b) => Ok(b),
            Err(e) => Err(self.break_ring(format!("used_event is unreadable: {e}"))),
        }
    }

    fn enable_notification(&mut self) -> Result<bool, QueueError> {
        self.check_broken()?;
        let mem = self.mem.memory();
        if let Err(e) = self.queue.enable_notification(&*mem) {
            return Err(self.break_ring(format!("cannot enable notifications: {e}")));
        }
        // It wrote `flags`, or `avail_event` after the used elements.
        self.mark_used_ring(0, 2);
        let avail_event = USED_ELEMS + USED_ELEM_SIZE * u64::from(self.queue.size());
        self.mark_used_ring(avail_event, 2);
        // virtio_queue reports work for any index other than ours, which would send a
        // device round its loop again and again on an index too far ahead: check it.
        if self.queue.next_avail() != self.avail_seen {
            return Ok(true);
        }
        self.refresh_avail(&mem)
    }

    fn disable_notification(&mut self) -> Result<(), QueueError> {
        self.check_broken()?;
        let mem = self.mem.memory();
        self.queue
            .disable_notification(&*mem)
            .map_err(|e| self.break_ring(format!("cannot disable notifications: {e}")))?;
        // It wrote `flags` (without EVENT_IDX).
        self.mark_used_ring(0, 2);
        Ok(())
    }
}

/// An [`Interrupt`] that signals one eventfd per queue, and an optional eventfd for
/// config changes.
#[derive(Debug)]
pub struct EventFdInterrupt {
    queues: Vec<Option<EventFd>>,
    config: Option<EventFd>,
}

impl EventFdInterrupt {
    /// Creates the interrupt from per-queue call eventfds (`None`: that queue is not
    /// signalled) and a config-change eventfd.
    pub fn new(queues: Vec<Option<EventFd>>, config: Option<EventFd>) -> Self {
        EventFdInterrupt { queues, config }
    }
}

impl Interrupt for EventFdInterrupt {
    fn signal_used_queue(&self, queue: usize) {
        if let Some(Some(fd)) = self.queues.get(queue) {
            if let Err(e) = fd.write(1) {
                outboard_protocol::log_limited!(
                    log::Level::Warn,
                    "cannot signal queue {queue}: {e}"
                );
            }
        }
    }

    fn signal_config_change(&self) {
        if let Some(fd) = &self.config {
            if let Err(e) = fd.write(1) {
                outboard_protocol::log_limited!(
                    log::Level::Warn,
                    "cannot signal a config change: {e}"
                );
            }
        }
    }
}

/// A [`GuestMemoryAccess`] over a rust-vmm [`GuestAddressSpace`].
///
/// Like [`RustVmmQueue`], it keeps the last few memory snapshots it translated against
/// alive, so returned regions stay mapped while the device uses them even if the VMM
/// replaces the memory map meanwhile.
pub struct RustVmmMemory<M: GuestAddressSpace> {
    mem: M,
}

impl<M: GuestAddressSpace> Clone for RustVmmMemory<M> {
    fn clone(&self) -> Self {
        RustVmmMemory::new(self.mem.clone())
    }
}

impl<M: GuestAddressSpace> std::fmt::Debug for RustVmmMemory<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RustVmmMemory").finish_non_exhaustive()
    }
}

impl<M: GuestAddressSpace> RustVmmMemory<M> {
    /// Wraps an address space.
    pub fn new(mem: M) -> Self {
        RustVmmMemory { mem }
    }
}

impl<M> GuestMemoryAccess for RustVmmMemory<M>
where
    M: GuestAddressSpace + Send + Sync,
    M::T: Send + Sync + 'static,
{
    fn host_regions(
        &self,
        addr: u64,
        len: u64,
        out: &mut Vec<IoRegion>,
    ) -> Result<MemoryPin, MemoryError> {
        let before = out.len();
        let mem = self.mem.memory();
        let ok = usize::try_from(len)
            .is_ok_and(|l| translate(&*mem, addr, l, Permissions::ReadWrite, out));
        if !ok {
            out.truncate(before);
            return Err(MemoryError::Unmapped { addr, len });
        }
        // The snapshot owns the mappings: the regions stay valid while the pin lives.
        let identity = std::ptr::from_ref(mem.deref()) as *const u8 as usize;
        Ok(MemoryPin::new(Arc::new(mem), identity))
    }
}

/// Convenience: boxes a set of queues for [`outboard_devices::virtio::VirtioDevice::activate`].
pub fn boxed_queues<M>(queues: Vec<Queue>, mem: &M) -> Vec<Box<dyn VirtQueue>>
where
    M: GuestAddressSpace + Send + 'static,
    M::T: Send,
{
    queues
        .into_iter()
        .map(|q| Box::new(RustVmmQueue::new(q, mem.clone())) as Box<dyn VirtQueue>)
        .collect()
}

/// Convenience: an [`EventFdInterrupt`] behind the `Arc` that `activate` takes.
pub fn eventfd_interrupt(queues: Vec<Option<EventFd>>) -> Arc<dyn Interrupt> {
    Arc::new(EventFdInterrupt::new(queues, None))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use vm_memory::{Bytes, GuestMemoryMmap};

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const SIZE: u16 = 16;

    fn setup(next_avail: u16) -> (Arc<GuestMemoryMmap>, RustVmmQueue<Arc<GuestMemoryMmap>>) {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap());
        let mut q = Queue::new(SIZE).unwrap();
        q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
        q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
        q.set_next_avail(next_avail);
        q.set_next_used(next_avail);
        q.set_ready(true);
        // Every descriptor: 16 readable bytes at 0x8000.
        for i in 0..u64::from(SIZE) {
            mem.write_obj(0x8000u64, GuestAddress(DESC + 16 * i))
                .unwrap();
            mem.write_obj(16u32, GuestAddress(DESC + 16 * i + 8))
                .unwrap();
        }
        // The driver's index where the device's starts: nothing available yet.
        mem.write_obj(next_avail, GuestAddress(AVAIL + 2)).unwrap();
        (mem.clone(), RustVmmQueue::new(q, mem))
    }

    /// Makes `n` chains available starting at ring index `from`.
    fn offer(mem: &GuestMemoryMmap, from: u16, n: u16) {
        for k in 0..n {
            let at = from.wrapping_add(k);
            let slot = u64::from(at % SIZE);
            mem.write_obj(at % SIZE, GuestAddress(AVAIL + 4 + 2 * slot))
                .unwrap();
        }
        mem.write_obj(from.wrapping_add(n), GuestAddress(AVAIL + 2))
            .unwrap();
    }

    #[test]
    fn any_base_is_legal_and_the_index_wraps() {
        // SET_VRING_BASE 300 on a 16-entry ring: a free-running index, not an error.
        for base in [0u16, 300, u16::MAX - 3] {
            let (mem, mut q) = setup(base);
            let mut chain = DescChain::default();
            assert_eq!(q.pop(&mut chain), Ok(false));
            offer(&mem, base, SIZE);
            for _ in 0..SIZE {
                assert_eq!(q.pop(&mut chain), Ok(true));
                q.add_used(chain.head, 0).unwrap();
            }
            assert_eq!(q.pop(&mut chain), Ok(false));
            assert_eq!(q.enable_notification(), Ok(false));
            assert!(q.broken().is_none());
        }
    }

    #[test]
    fn an_index_too_far_ahead_breaks_the_ring_once_and_for_good() {
        let health = Arc::new(RingHealth::new());
        let (mem, q) = setup(0);
        let mut q = q.with_health(health.clone(), 1);
        let mut chain = DescChain::default();
        // 17 entries on a 16-entry ring.
        mem.write_obj(SIZE + 1, GuestAddress(AVAIL + 2)).unwrap();
        let err = q.pop(&mut chain).unwrap_err();
        assert!(
            matches!(&err, QueueError::Broken(r) if r.contains("17 entries ahead")),
            "{err}"
        );
        assert!(health.has_news());
        let taken = health.take();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].0, 1);
        assert!(!health.has_news());
        // Sticky: a device loop that asks again gets the error, never "work pending".
        for _ in 0..3 {
            assert!(matches!(q.pop(&mut chain), Err(QueueError::Broken(_))));
            assert!(matches!(
                q.enable_notification(),
                Err(QueueError::Broken(_))
            ));
            assert!(matches!(q.add_used(0, 0), Err(QueueError::Broken(_))));
        }
        // Fixing the index does not revive it: only a reset (a new queue) does.
        offer(&mem, 0, 1);
        assert!(matches!(q.pop(&mut chain), Err(QueueError::Broken(_))));
        // Reported once.
        assert!(!health.has_news());
    }

    #[test]
    fn enable_notification_checks_the_index_it_reports() {
        // virtio_queue alone answers "work pending" for an index 300 ahead.
        let (mem, mut q) = setup(0);
        mem.write_obj(300u16, GuestAddress(AVAIL + 2)).unwrap();
        assert!(matches!(
            q.enable_notification(),
            Err(QueueError::Broken(_))
        ));
    }

    #[test]
    fn an_index_that_goes_backwards_breaks_the_ring() {
        let (mem, mut q) = setup(0);
        let mut chain = DescChain::default();
        offer(&mem, 0, 4);
        assert_eq!(q.pop(&mut chain), Ok(true));
        // The driver takes two entries back.
        mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
        assert!(matches!(q.pop(&mut chain), Err(QueueError::Broken(_))));
    }

    /// A guest mapping holds its memory map: however often the VMM replaces the map
    /// (a front-end sending new memory tables), the memory it points into stays mapped
    /// while the mapping lives, and the mapping cannot outlive the call that made it
    /// (it borrows its mapper). Before, RustVmmMemory kept only the last 4 snapshots,
    /// so a mapping kept across 5 table changes wrote into unmapped memory.
    #[test]
    #[cfg(feature = "media")]
    fn a_guest_mapping_keeps_its_memory_mapped_across_memory_map_changes() {
        use outboard_devices::media::{GuestMemoryMapper, GuestMemoryRange, GuestMemoryRegions};
        use outboard_protocol::media::SgEntry;
        use vm_memory::{GuestMemoryAtomic, GuestMemoryBackend};

        let fresh = || GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let atomic = GuestMemoryAtomic::new(fresh());
        let access = Arc::new(RustVmmMemory::new(atomic.clone()));
        let mapper = GuestMemoryRegions(access.clone());
        let sg = [SgEntry {
            start: 0x1000,
            len: 64,
            reserved: 0,
        }];
        let m = mapper.new_mapping(&sg).unwrap();
        for _ in 0..8 {
            atomic.lock().unwrap().replace(fresh());
            // Other translations in between, as a device would make.
            let mut v = Vec::new();
            access.host_regions(0x2000, 16, &mut v).unwrap();
        }
        // Still mapped: the write lands in the old memory, not in freed pages.
        assert_eq!(m.write_at(0, b"hello"), 5);
        let mut back = [0u8; 5];
        assert_eq!(m.read_at(0, &mut back), 5);
        assert_eq!(&back, b"hello");
        // What the guest's address means now is untouched until mapped again.
        let now = atomic.memory();
        let mut buf = [0u8; 5];
        now.read_slice(&mut buf, GuestAddress(0x1000)).unwrap();
        assert_eq!(buf, [0; 5]);
        assert!(now.address_in_range(GuestAddress(0x1000)));
        let m2 = mapper.new_mapping(&sg).unwrap();
        assert_eq!(m2.write_at(0, b"new"), 3);
        now.read_slice(&mut buf[..3], GuestAddress(0x1000)).unwrap();
        assert_eq!(&buf[..3], b"new");
    }

    /// Records marks; on while `on` is set.
    #[derive(Default)]
    struct Marks {
        on: AtomicBool,
        marks: Mutex<Vec<(u64, u64)>>,
    }

    impl DirtyLog for Marks {
        fn logging(&self) -> bool {
            self.on.load(Ordering::Relaxed)
        }
        fn mark(&self, gpa: u64, len: u64) {
            self.marks.lock().unwrap().push((gpa, len));
        }
    }

    impl Marks {
        fn take(&self) -> Vec<(u64, u64)> {
            std::mem::take(&mut *self.marks.lock().unwrap())
        }
    }

    /// Chain at `head`: 16 readable bytes at 0x8000, then writable descriptors
    /// `(addr, len)`.
    fn write_chain(mem: &GuestMemoryMmap, head: u16, writable: &[(u64, u32)]) {
        let descs = [(0x8000, 16)].into_iter().chain(writable.iter().copied());
        for (i, (addr, len)) in descs.enumerate() {
            let at = u64::from(head) + i as u64;
            let last = i == writable.len();
            let d = DESC + 16 * at;
            let flags: u16 = if i > 0 { 2 } else { 0 } | if last { 0 } else { 1 };
            mem.write_obj(addr, GuestAddress(d)).unwrap();
            mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            mem.write_obj(at as u16 + 1, GuestAddress(d + 14)).unwrap();
        }
    }

    #[test]
    fn used_chains_mark_the_bytes_written_and_the_used_ring() {
        let marks = Arc::new(Marks::default());
        let (mem, q) = setup(0);
        let mut q = q.with_dirty_log(marks.clone(), Some(0x5_0000));
        let mut chain = DescChain::default();
        // Off: nothing recorded or marked.
        write_chain(&mem, 0, &[(0x9000, 0x100)]);
        offer(&mem, 0, 1);
        assert_eq!(q.pop(&mut chain), Ok(true));
        q.add_used(chain.head, 0x100).unwrap();
        assert_eq!(q.enable_notification(), Ok(false));
        assert!(marks.take().is_empty());

        // On: two writable descriptors, 0x1800 bytes written of 0x1000 + 0x2000.
        marks.on.store(true, Ordering::Relaxed);
        write_chain(&mem, 4, &[(0xa000, 0x1000), (0xc000, 0x2000)]);
        offer(&mem, 1, 1);
        mem.write_obj(4u16, GuestAddress(AVAIL + 4 + 2)).unwrap();
        assert_eq!(q.pop(&mut chain), Ok(true));
        assert_eq!(chain.head, 4);
        q.add_used(chain.head, 0x1800).unwrap();
        assert_eq!(
            marks.take(),
            vec![
                (0xa000, 0x1000),
                (0xc000, 0x800),
                // Used element 1 and flags + idx, at the log address.
                (0x5_0000 + 4 + 8, 8),
                (0x5_0000, 4),
            ]
        );
        // What notifications write: flags, and avail_event after the 16 elements.
        assert_eq!(q.enable_notification(), Ok(false));
        assert_eq!(
            marks.take(),
            vec![(0x5_0000, 2), (0x5_0000 + 4 + 8 * 16, 2)]
        );
        q.disable_notification().unwrap();
        assert_eq!(marks.take(), vec![(0x5_0000, 2)]);

        // Without VHOST_VRING_F_LOG only the buffers are marked; a device that claims
        // more than the chain holds marks the chain only.
        q.set_used_log(None);
        write_chain(&mem, 8, &[(0xf000, 0x10)]);
        offer(&mem, 2, 1);
        mem.write_obj(8u16, GuestAddress(AVAIL + 4 + 4)).unwrap();
        assert_eq!(q.pop(&mut chain), Ok(true));
        q.add_used(chain.head, 0x1000).unwrap();
        assert_eq!(marks.take(), vec![(0xf000, 0x10)]);
    }

    #[test]
    fn undo_pop_returns_the_same_chain() {
        let (mem, mut q) = setup(5);
        let mut chain = DescChain::default();
        offer(&mem, 5, 2);
        assert_eq!(q.pop(&mut chain), Ok(true));
        let head = chain.head;
        q.undo_pop();
        assert_eq!(q.pop(&mut chain), Ok(true));
        assert_eq!(chain.head, head);
        assert_eq!(q.pop(&mut chain), Ok(true));
        assert_eq!(q.pop(&mut chain), Ok(false));
    }
}
