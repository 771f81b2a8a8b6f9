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
//! Writes through the host regions bypass vm-memory's dirty bitmap: these adapters do
//! not support dirty-page logging (vhost-user `LOG_ALL`).

use std::ops::Deref;
use std::sync::Arc;

use outboard_devices::virtio::{
    DescChain, GuestMemoryAccess, Interrupt, IoRegion, MemoryError, QueueError, VirtQueue,
    MAX_CHAIN_REGIONS,
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
        // of `mem`. Both callers (RustVmmQueue::pop, RustVmmMemory::host_regions) pin
        // that memory snapshot afterwards and keep it until several newer snapshots
        // were seen, i.e. beyond the handle_* call that uses the region, which is the
        // lifetime IoRegion::new requires. IoRegion never creates references into it.
        out.push(unsafe { IoRegion::new(guard.as_ptr(), slice.len()) });
        covered = covered.saturating_add(slice.len());
    }
    covered == len
}

/// A [`VirtQueue`] over a rust-vmm split queue.
pub struct RustVmmQueue<M: GuestAddressSpace> {
    queue: Queue,
    mem: M,
    pinned: Vec<M::T>,
}

impl<M: GuestAddressSpace> std::fmt::Debug for RustVmmQueue<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RustVmmQueue")
            .field("queue", &self.queue)
            .finish()
    }
}

impl<M: GuestAddressSpace> RustVmmQueue<M> {
    /// Wraps a configured, ready queue and the guest memory it lives in.
    pub fn new(queue: Queue, mem: M) -> Self {
        RustVmmQueue {
            queue,
            mem,
            pinned: Vec::new(),
        }
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
        let mem = self.mem.memory();
        self.pin(&mem);
        let Some(descs) = self.queue.pop_descriptor_chain(mem.clone()) else {
            return Ok(false);
        };
        let head = descs.head_index();
        chain.head = head;
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
        let mem = self.mem.memory();
        self.queue
            .add_used(&*mem, head, len)
            .map_err(|e| QueueError::Used {
                head,
                reason: e.to_string(),
            })
    }

    fn needs_notification(&mut self) -> Result<bool, QueueError> {
        let mem = self.mem.memory();
        self.queue
            .needs_notification(&*mem)
            .map_err(|e| QueueError::Rings(e.to_string()))
    }

    fn enable_notification(&mut self) -> Result<bool, QueueError> {
        let mem = self.mem.memory();
        self.queue
            .enable_notification(&*mem)
            .map_err(|e| QueueError::Rings(e.to_string()))
    }

    fn disable_notification(&mut self) -> Result<(), QueueError> {
        let mem = self.mem.memory();
        self.queue
            .disable_notification(&*mem)
            .map_err(|e| QueueError::Rings(e.to_string()))
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
                log::warn!("cannot signal queue {queue}: {e}");
            }
        }
    }

    fn signal_config_change(&self) {
        if let Some(fd) = &self.config {
            if let Err(e) = fd.write(1) {
                log::warn!("cannot signal a config change: {e}");
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
    pinned: std::sync::Mutex<Vec<M::T>>,
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
        RustVmmMemory {
            mem,
            pinned: std::sync::Mutex::new(Vec::new()),
        }
    }
}

impl<M> GuestMemoryAccess for RustVmmMemory<M>
where
    M: GuestAddressSpace + Send + Sync,
    M::T: Send,
{
    fn host_regions(
        &self,
        addr: u64,
        len: u64,
        out: &mut Vec<IoRegion>,
    ) -> Result<(), MemoryError> {
        let before = out.len();
        let mem = self.mem.memory();
        let ok = usize::try_from(len)
            .is_ok_and(|l| translate(&*mem, addr, l, Permissions::ReadWrite, out));
        if !ok {
            out.truncate(before);
            return Err(MemoryError::Unmapped { addr, len });
        }
        // A poisoned lock only means another thread panicked while pinning; the vector
        // is still a valid list of snapshots.
        let mut pinned = self.pinned.lock().unwrap_or_else(|e| e.into_inner());
        if !pinned
            .last()
            .is_some_and(|p| std::ptr::eq(p.deref(), mem.deref()))
        {
            if pinned.len() >= PINNED_SNAPSHOTS {
                pinned.remove(0);
            }
            pinned.push(mem);
        }
        Ok(())
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
