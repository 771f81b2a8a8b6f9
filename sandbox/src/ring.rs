//! The hot-path channel: a request slot per caller in shared memory, futex doorbells.
//!
//! One page-aligned memfd is mapped `MAP_SHARED` in the VMM (the producer side) and in
//! the device child (the consumer). It holds [`SLOTS`] *slots*; each slot is a small ring
//! of [`SLOT_ENTRIES`] fixed-layout entries with its own `head` (published by the VMM) and
//! `done` (advanced by the child) counters, each on its own cache line. A VMM thread
//! claims a slot of its own (see `proxy`), so vCPU threads calling one device neither
//! take a common lock nor write a common cache line, except for one `fetch_add` on the
//! ticket counter described below.
//!
//! # Ordering
//!
//! Every published entry carries a *ticket*, taken with one `fetch_add` on a shared
//! counter right before the entry is published, and the child executes entries strictly
//! in ticket order, whatever slot they sit in. Hence:
//!
//! - A caller's entries run in its program order. A posted access (MMIO write) returns
//!   as soon as its entry is published, and a later read by the same caller has a later
//!   ticket, so writes stay ordered before later reads.
//! - Across callers, if publishing entry A *happens before* publishing entry B (for
//!   instance: vCPU 0 posts a write, releases a guest spinlock, vCPU 1 takes it and
//!   writes), A's ticket is smaller (read-modify-writes of one atomic are totally ordered
//!   consistently with happens-before), so the device sees A first. This is what a guest
//!   driver relies on when it serializes MMIO from several CPUs with a lock (Linux's
//!   `writel` inside `spin_lock`, which x86 and PCIe posted-write ordering through one
//!   root port give). Accesses that race (no happens-before) are executed in ticket
//!   order, one at a time, as a real device sees racing accesses in some arrival order.
//!
//! A publisher can be preempted between taking its ticket and publishing; the child then
//! waits (spin, yield, then the doorbell) for that entry, since later tickets must not
//! pass it. The gap closes once that thread runs again; it never depends on the child.
//!
//! # Waiting
//!
//! - A waiting side spins briefly, then yields the CPU, then sleeps on a futex with a
//!   short timeout slice; each slice it asks a liveness callback whether the peer is
//!   still there, so a dead or hung peer is noticed without a wake-up from it.
//! - The child sleeps on one shared *doorbell* word; a VMM thread bumps and wakes it
//!   only if the child announced it sleeps. A VMM thread sleeps on its slot's `done`
//!   word; the child wakes it only if that slot announced a sleeper. Announcing and
//!   re-checking are sequentially consistent on both sides (Dekker style), so a wake-up
//!   is never lost and the busy case makes no system call.
//!
//! # Trust
//!
//! Every word lives in memory the peer can write at any time, so every access is an
//! atomic operation (plain `mov`s on x86). The producer never trusts the child's
//! counters: it keeps each slot's `head` privately, a `done` that runs ahead of it is a
//! protocol error, and slot and entry indices are always computed from its own values.
//! The child likewise keeps its own tails and validates every `head` it reads. The memfd
//! is sealed against resizing so the peer cannot turn a later access into `SIGBUS`.

use std::hint::spin_loop;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::fs::{
    fcntl_add_seals, fcntl_get_seals, fstat, ftruncate, memfd_create, MemfdFlags, SealFlags,
};
use rustix::mm::{mmap, munmap, MapFlags, ProtFlags};
use rustix::thread::{futex, sched_getcpu};
use rustix::time::Timespec;
use thiserror::Error;

/// Number of request slots (callers that can own one at the same time, plus one slot
/// shared by all other callers, [`SHARED_SLOT`]).
pub const SLOTS: usize = 8;

/// The slot shared, under a lock, by callers that could not claim one of their own.
pub const SHARED_SLOT: usize = SLOTS - 1;

/// Number of entries in each slot's ring (a power of two): how many posted accesses one
/// caller can have in flight.
pub const SLOT_ENTRIES: u32 = 16;

const MAGIC: u32 = 0x4f42_5053; // "OBPS"

/// Errors of the shared-memory channel.
#[cfg_attr(test, remain::sorted)]
#[derive(Debug, Error)]
pub enum RingError {
    /// Another producer published entries on this slot.
    #[error("another producer moved slot {slot}'s head to {shared} (ours is {ours})")]
    ForeignProducer {
        /// The slot.
        slot: usize,
        /// The head found in the slot.
        shared: u32,
        /// Our head.
        ours: u32,
    },
    /// The peer process is gone.
    #[error("the peer process exited while {pending} request(s) were outstanding")]
    PeerGone {
        /// Requests published on the waiting slot but not completed.
        pending: u32,
    },
    /// The peer wrote counters that cannot happen.
    #[error(
        "protocol violation: slot {slot}'s done counter {done} is not within {} behind head {head}",
        SLOT_ENTRIES
    )]
    Protocol {
        /// The slot.
        slot: usize,
        /// The peer's done counter.
        done: u32,
        /// Our head counter.
        head: u32,
    },
    /// Creating, sizing or sealing the memfd failed.
    #[error("setting up the shared memory failed at {step}: {source}")]
    Setup {
        /// What was being done.
        step: &'static str,
        /// The OS error.
        source: rustix::io::Errno,
    },
    /// The slot index is not one of the ring's.
    #[error("slot {slot} does not exist (the ring has {SLOTS})")]
    SlotIndex {
        /// The index asked for.
        slot: usize,
    },
    /// The peer did not answer in time.
    #[error("no answer from the peer within {timeout:?}")]
    Timeout {
        /// The bound that expired.
        timeout: Duration,
    },
    /// The memfd handed to us is unsuitable.
    #[error("shared memory fd refused: {reason}")]
    Unsuitable {
        /// Why.
        reason: String,
    },
}

/// One request. All fields are atomics because the peer may write them at any time.
#[repr(C, align(64))]
#[derive(Default)]
pub struct Entry {
    /// Operation code (see `proxy::op`).
    pub op: AtomicU32,
    /// Access length in bytes.
    pub len: AtomicU32,
    /// Register index (config accesses).
    pub reg: AtomicU32,
    /// Completion status written by the consumer.
    pub status: AtomicU32,
    /// Offset (bus access offset or config byte offset).
    pub offset: AtomicU64,
    /// Absolute bus address.
    pub address: AtomicU64,
    /// Accessor id.
    pub id: AtomicU64,
    /// Up to 8 data bytes, little endian; the answer of a read.
    pub data: AtomicU64,
    /// The entry's place in the global execution order (set by `Producer::push`).
    ticket: AtomicU32,
}

#[repr(C, align(64))]
#[derive(Default)]
struct Padded(AtomicU32);

/// The words of a slot that its VMM thread writes.
#[repr(C, align(64))]
struct ParentLine {
    head: AtomicU32,
    /// Non-zero while the slot's owner sleeps on `done`.
    parent_sleeping: AtomicU32,
    /// The CPU the slot's owner last waited on (`u32::MAX`: unknown).
    parent_cpu: AtomicU32,
}

#[repr(C)]
struct Slot {
    parent: ParentLine,
    done: Padded,
    entries: [Entry; SLOT_ENTRIES as usize],
}

#[repr(C)]
struct Layout {
    magic: Padded,
    /// The next ticket; VMM threads `fetch_add` it.
    ticket: Padded,
    /// Bumped (and futex-woken) by a publisher that sees the child asleep.
    doorbell: Padded,
    child_sleeping: Padded,
    /// The CPU the child last ran on, to skip spinning when a caller shares it: spinning
    /// then only delays the peer.
    child_cpu: Padded,
    slots: [Slot; SLOTS],
}

fn page_size() -> usize {
    rustix::param::page_size()
}

fn map_len() -> usize {
    let size = std::mem::size_of::<Layout>();
    let page = page_size();
    size.div_ceil(page) * page
}

/// A mapping of the shared slots.
pub struct SharedRing {
    fd: OwnedFd,
    ptr: NonNull<Layout>,
    len: usize,
}

// SAFETY: the mapping is only accessed through atomics, which are safe to use from any
// thread; the pointer stays valid until Drop unmaps it.
unsafe impl Send for SharedRing {}
// SAFETY: as above, all shared accesses are atomic.
unsafe impl Sync for SharedRing {}

impl std::fmt::Debug for SharedRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRing")
            .field("fd", &self.fd)
            .field("len", &self.len)
            .finish()
    }
}

impl SharedRing {
    /// Creates a fresh ring in a new sealed memfd.
    pub fn new() -> Result<SharedRing, RingError> {
        let fd = memfd_create(
            c"outboard-proxy-ring",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .map_err(|source| RingError::Setup {
            step: "memfd_create",
            source,
        })?;
        let len = map_len();
        ftruncate(&fd, len as u64).map_err(|source| RingError::Setup {
            step: "ftruncate",
            source,
        })?;
        fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL).map_err(
            |source| RingError::Setup {
                step: "seal",
                source,
            },
        )?;
        let ring = Self::map(fd, len)?;
        let l = ring.layout();
        l.child_cpu.0.store(u32::MAX, Ordering::Relaxed);
        for s in &l.slots {
            s.parent.parent_cpu.store(u32::MAX, Ordering::Relaxed);
        }
        l.magic.0.store(MAGIC, Ordering::Release);
        Ok(ring)
    }

    /// Maps a ring received from another process, after checking that the memfd is
    /// sealed against shrinking and large enough.
    pub fn from_fd(fd: OwnedFd) -> Result<SharedRing, RingError> {
        let seals = fcntl_get_seals(&fd).map_err(|e| RingError::Unsuitable {
            reason: format!("cannot read seals: {e}"),
        })?;
        if !seals.contains(SealFlags::SHRINK) {
            return Err(RingError::Unsuitable {
                reason: format!("memfd is not sealed against shrinking (seals {seals:?})"),
            });
        }
        let len = map_len();
        let size = fstat(&fd)
            .map_err(|e| RingError::Unsuitable {
                reason: format!("fstat: {e}"),
            })?
            .st_size;
        if size < len as i64 {
            return Err(RingError::Unsuitable {
                reason: format!("memfd is {size} bytes, need {len}"),
            });
        }
        let ring = Self::map(fd, len)?;
        let magic = ring.layout().magic.0.load(Ordering::Acquire);
        if magic != MAGIC {
            return Err(RingError::Unsuitable {
                reason: format!("bad magic {magic:#x}"),
            });
        }
        Ok(ring)
    }

    fn map(fd: OwnedFd, len: usize) -> Result<SharedRing, RingError> {
        // SAFETY: a fresh shared mapping of `len` bytes of a memfd that is at least `len`
        // bytes long and sealed against shrinking; it overlaps nothing we own.
        let ptr = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &fd,
                0,
            )
        }
        .map_err(|source| RingError::Setup {
            step: "mmap",
            source,
        })?;
        let ptr = NonNull::new(ptr.cast::<Layout>()).ok_or(RingError::Setup {
            step: "mmap",
            source: rustix::io::Errno::NOMEM,
        })?;
        Ok(SharedRing { fd, ptr, len })
    }

    fn layout(&self) -> &Layout {
        // SAFETY: `ptr` is a live, page-aligned mapping of at least size_of::<Layout>()
        // bytes (checked in `map_len`); Layout consists only of atomics, for which any
        // bit pattern is valid, so a shared reference is sound even while the peer writes.
        unsafe { self.ptr.as_ref() }
    }

    /// The memfd backing the ring (to pass it to the child).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Consumes the ring, returning the memfd.
    pub fn into_fd(self) -> OwnedFd {
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: `this` is never dropped, so the fd is moved out exactly once.
        let fd = unsafe { std::ptr::read(&this.fd) };
        // SAFETY: unmapping our own mapping; no reference into it outlives `this`.
        let _ = unsafe { munmap(this.ptr.as_ptr().cast(), this.len) };
        fd
    }
}

impl Drop for SharedRing {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by `map` with this length and no reference into
        // it outlives `self`.
        let _ = unsafe { munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = Timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    // FUTEX_WAIT, shared (no FUTEX_PRIVATE_FLAG: the word is in a MAP_SHARED mapping).
    // The result is ignored: every caller re-checks the word.
    let _ = futex::wait(word, futex::Flags::empty(), expected, Some(&ts));
}

fn futex_wake(word: &AtomicU32) {
    let _ = futex::wake(word, futex::Flags::empty(), i32::MAX as u32);
}

/// Records the CPU we run on in `mine` and tells whether the peer last ran there too.
fn shares_cpu(mine: &AtomicU32, peer: &AtomicU32) -> bool {
    // The vDSO's getcpu where there is one, else the getcpu system call.
    let cpu = u32::try_from(sched_getcpu()).unwrap_or(u32::MAX);
    if mine.load(Ordering::Relaxed) != cpu {
        mine.store(cpu, Ordering::Relaxed);
    }
    cpu != u32::MAX && peer.load(Ordering::Relaxed) == cpu
}

/// How long a side spins and yields before sleeping.
#[derive(Clone, Copy, Debug)]
pub struct WaitPolicy {
    /// `spin_loop` iterations before yielding.
    pub spins: u32,
    /// `sched_yield` calls before sleeping.
    pub yields: u32,
    /// Length of one futex sleep between liveness checks.
    pub slice: Duration,
}

/// The producer's wait policy: answers usually arrive within a microsecond when the
/// peer is on another CPU; yielding early keeps one shared CPU fair.
pub const PRODUCER_WAIT: WaitPolicy = WaitPolicy {
    spins: 2048,
    yields: 64,
    slice: Duration::from_millis(5),
};

/// The consumer's wait policy: keep polling a little after each request, since the
/// next one often follows at once.
pub const CONSUMER_WAIT: WaitPolicy = WaitPolicy {
    spins: 8192,
    yields: 256,
    slice: Duration::from_millis(100),
};

/// The VMM side of the ring, shared by all VMM threads (it is `Sync`). The per-slot
/// state lives in [`SlotProducer`]s, one per slot, which the caller keeps behind its
/// own locks.
#[derive(Debug)]
pub struct Producer {
    ring: SharedRing,
}

/// The VMM's private state of one slot: which slot, and its `head`.
#[derive(Debug)]
pub struct SlotProducer {
    slot: usize,
    head: u32,
}

impl SlotProducer {
    /// The slot's index.
    pub fn slot(&self) -> usize {
        self.slot
    }
}

impl Producer {
    /// Takes the producer role and returns the state of every slot, in slot order. The
    /// starting positions are read from the ring once (a ring may be handed from process
    /// to process before it is used). Only one producer may use a ring; `push` notices
    /// another one and fails.
    pub fn new(ring: SharedRing) -> Result<(Producer, Vec<SlotProducer>), RingError> {
        let l = ring.layout();
        let mut slots = Vec::with_capacity(SLOTS);
        for (slot, s) in l.slots.iter().enumerate() {
            let head = s.parent.head.load(Ordering::Acquire);
            let done = s.done.0.load(Ordering::Acquire);
            if head.wrapping_sub(done) > SLOT_ENTRIES {
                return Err(RingError::Protocol { slot, done, head });
            }
            slots.push(SlotProducer { slot, head });
        }
        Ok((Producer { ring }, slots))
    }

    /// The ring (for its fd).
    pub fn ring(&self) -> &SharedRing {
        &self.ring
    }

    fn slot(&self, sp: &SlotProducer) -> &Slot {
        // `sp.slot` comes from `new` (always below SLOTS); `% SLOTS` keeps the index
        // obviously in bounds.
        &self.ring.layout().slots[sp.slot % SLOTS]
    }

    /// Publishes one entry filled by `fill` on `sp`'s slot, waiting for room if the slot
    /// is full. Returns the entry's sequence number in the slot.
    pub fn push(
        &self,
        sp: &mut SlotProducer,
        fill: impl FnOnce(&Entry),
        timeout: Duration,
        alive: &mut dyn FnMut() -> bool,
    ) -> Result<u32, RingError> {
        let seq = sp.head;
        let s = self.slot(sp);
        let shared = s.parent.head.load(Ordering::Relaxed);
        if shared != seq {
            // Someone else published entries: two producers on one slot.
            return Err(RingError::ForeignProducer {
                slot: sp.slot,
                shared,
                ours: seq,
            });
        }
        // Room for entry `seq` once entry `seq - SLOT_ENTRIES` is done.
        let need = seq.wrapping_sub(SLOT_ENTRIES).wrapping_add(1);
        if !self.done_reached(sp, need)? {
            self.wait_done(sp, need, timeout, alive)?;
        }
        let l = self.ring.layout();
        let entry = &s.entries[(seq % SLOT_ENTRIES) as usize];
        entry.status.store(0, Ordering::Relaxed);
        fill(entry);
        // Nothing that can block or fail lies between taking the ticket and publishing:
        // the child waits for every ticket in turn.
        let ticket = l.ticket.0.fetch_add(1, Ordering::Relaxed);
        entry.ticket.store(ticket, Ordering::Relaxed);
        sp.head = seq.wrapping_add(1);
        s.parent.head.store(sp.head, Ordering::SeqCst);
        if l.child_sleeping.0.load(Ordering::SeqCst) != 0 {
            l.doorbell.0.fetch_add(1, Ordering::SeqCst);
            futex_wake(&l.doorbell.0);
        }
        Ok(seq)
    }

    /// The entry with sequence number `seq` of `sp`'s slot (to read an answer after
    /// `wait_for`).
    pub fn entry(&self, sp: &SlotProducer, seq: u32) -> &Entry {
        &self.slot(sp).entries[(seq % SLOT_ENTRIES) as usize]
    }

    /// True once the slot's `done` reached `target`, false if not yet, and an error if
    /// the peer's counter is impossible.
    fn done_reached(&self, sp: &SlotProducer, target: u32) -> Result<bool, RingError> {
        let done = self.slot(sp).done.0.load(Ordering::Acquire);
        // Distances are taken modulo 2^32 from our own head, the only trusted value.
        let behind = sp.head.wrapping_sub(done);
        if behind > SLOT_ENTRIES {
            return Err(RingError::Protocol {
                slot: sp.slot,
                done,
                head: sp.head,
            });
        }
        let missing = sp.head.wrapping_sub(target);
        // done >= target  <=>  head - done <= head - target
        Ok(behind <= missing)
    }

    /// Waits until the entry with sequence number `seq` of `sp`'s slot is complete.
    pub fn wait_for(
        &self,
        sp: &SlotProducer,
        seq: u32,
        timeout: Duration,
        alive: &mut dyn FnMut() -> bool,
    ) -> Result<(), RingError> {
        self.wait_done(sp, seq.wrapping_add(1), timeout, alive)
    }

    fn wait_done(
        &self,
        sp: &SlotProducer,
        target: u32,
        timeout: Duration,
        alive: &mut dyn FnMut() -> bool,
    ) -> Result<(), RingError> {
        let p = PRODUCER_WAIT;
        let l = self.ring.layout();
        let s = self.slot(sp);
        let spins = if shares_cpu(&s.parent.parent_cpu, &l.child_cpu.0) {
            0
        } else {
            p.spins
        };
        for _ in 0..spins {
            if self.done_reached(sp, target)? {
                return Ok(());
            }
            spin_loop();
        }
        for _ in 0..p.yields {
            if self.done_reached(sp, target)? {
                return Ok(());
            }
            std::thread::yield_now();
        }
        let start = Instant::now();
        loop {
            s.parent.parent_sleeping.store(1, Ordering::SeqCst);
            let done = s.done.0.load(Ordering::SeqCst);
            if self.done_reached(sp, target)? {
                s.parent.parent_sleeping.store(0, Ordering::Relaxed);
                return Ok(());
            }
            futex_wait(&s.done.0, done, p.slice);
            s.parent.parent_sleeping.store(0, Ordering::Relaxed);
            if self.done_reached(sp, target)? {
                return Ok(());
            }
            if !alive() {
                // One last look: the peer may have answered and then exited.
                if self.done_reached(sp, target)? {
                    return Ok(());
                }
                return Err(RingError::PeerGone {
                    pending: sp.head.wrapping_sub(s.done.0.load(Ordering::Relaxed)),
                });
            }
            if start.elapsed() >= timeout {
                return Err(RingError::Timeout { timeout });
            }
        }
    }
}

/// The device-child side of the ring.
#[derive(Debug)]
pub struct Consumer {
    ring: SharedRing,
    /// The next sequence number to execute in each slot.
    tails: [u32; SLOTS],
    /// The next ticket to execute.
    ticket: u32,
    /// The slot served last (its owner's CPU decides whether to spin; scans start
    /// there).
    last: usize,
}

/// What the consumer's wait ended with.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// The entry at the tail of this slot is next in ticket order.
    Ready(usize),
    /// Nothing to execute yet (one sleep slice passed, or an earlier ticket is still
    /// being published): time for liveness checks.
    Idle,
    /// The producer's head of this slot is impossible.
    Corrupt(usize),
}

impl Consumer {
    /// Takes the consumer role. Call it before the producer publishes anything.
    pub fn new(ring: SharedRing) -> Consumer {
        let l = ring.layout();
        let mut tails = [0u32; SLOTS];
        for (t, s) in tails.iter_mut().zip(&l.slots) {
            *t = s.done.0.load(Ordering::Acquire);
        }
        // The child builds its consumer before activation, so before anything is
        // published: the counter is the next ticket.
        let ticket = l.ticket.0.load(Ordering::Acquire);
        Consumer {
            ring,
            tails,
            ticket,
            last: 0,
        }
    }

    /// True if any slot holds published entries not executed yet (ready or not).
    pub fn pending(&self) -> bool {
        let l = self.ring.layout();
        l.slots
            .iter()
            .zip(&self.tails)
            .any(|(s, &tail)| s.parent.head.load(Ordering::SeqCst) != tail)
    }

    /// Looks for the next entry without waiting; `Idle` if there is none.
    pub fn poll(&self) -> Next {
        let l = self.ring.layout();
        for i in 0..SLOTS {
            let slot = (self.last + i) % SLOTS;
            let s = &l.slots[slot];
            let tail = self.tails[slot];
            let pending = s.parent.head.load(Ordering::Acquire).wrapping_sub(tail);
            if pending == 0 {
                continue;
            }
            if pending > SLOT_ENTRIES {
                return Next::Corrupt(slot);
            }
            let e = &s.entries[(tail % SLOT_ENTRIES) as usize];
            if e.ticket.load(Ordering::Relaxed) == self.ticket {
                return Next::Ready(slot);
            }
        }
        Next::Idle
    }

    /// Waits for work: spins and yields first if `spin`, then sleeps at most one slice.
    pub fn wait(&self, spin: bool) -> Next {
        let c = CONSUMER_WAIT;
        if spin {
            let l = self.ring.layout();
            let peer = &l.slots[self.last % SLOTS].parent.parent_cpu;
            let spins = if shares_cpu(&l.child_cpu.0, peer) {
                0
            } else {
                c.spins
            };
            for _ in 0..spins {
                let n = self.poll();
                if n != Next::Idle {
                    return n;
                }
                spin_loop();
            }
            for _ in 0..c.yields {
                let n = self.poll();
                if n != Next::Idle {
                    return n;
                }
                std::thread::yield_now();
            }
        }
        let l = self.ring.layout();
        l.child_sleeping.0.store(1, Ordering::SeqCst);
        let rung = l.doorbell.0.load(Ordering::SeqCst);
        let n = self.poll();
        if n == Next::Idle {
            futex_wait(&l.doorbell.0, rung, c.slice);
        }
        l.child_sleeping.0.store(0, Ordering::Relaxed);
        if n != Next::Idle {
            return n;
        }
        self.poll()
    }

    /// The entry at the tail of `slot` (the one `Next::Ready(slot)` announced).
    pub fn entry(&self, slot: usize) -> Result<&Entry, RingError> {
        let s = self
            .ring
            .layout()
            .slots
            .get(slot)
            .ok_or(RingError::SlotIndex { slot })?;
        let tail = self.tails.get(slot).ok_or(RingError::SlotIndex { slot })?;
        Ok(&s.entries[(tail % SLOT_ENTRIES) as usize])
    }

    /// Marks the entry at the tail of `slot` complete, moves on to the next ticket and
    /// wakes the slot's owner if it sleeps.
    pub fn complete(&mut self, slot: usize) -> Result<(), RingError> {
        let l = self.ring.layout();
        let s = l.slots.get(slot).ok_or(RingError::SlotIndex { slot })?;
        let tail = self
            .tails
            .get_mut(slot)
            .ok_or(RingError::SlotIndex { slot })?;
        *tail = tail.wrapping_add(1);
        self.last = slot;
        self.ticket = self.ticket.wrapping_add(1);
        s.done.0.store(*tail, Ordering::SeqCst);
        if s.parent.parent_sleeping.load(Ordering::SeqCst) != 0 {
            futex_wake(&s.done.0);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const T: Duration = Duration::from_secs(5);

    fn pair() -> (Producer, Vec<SlotProducer>, Consumer) {
        let ring = SharedRing::new().unwrap();
        let dup = ring.fd().try_clone_to_owned().unwrap();
        let (producer, slots) = Producer::new(ring).unwrap();
        let consumer = Consumer::new(SharedRing::from_fd(dup).unwrap());
        (producer, slots, consumer)
    }

    #[test]
    fn layout_fits_and_entries_are_cache_lines() {
        assert_eq!(std::mem::size_of::<Entry>(), 64);
        assert_eq!(std::mem::size_of::<ParentLine>(), 64);
        assert!(map_len() >= std::mem::size_of::<Layout>());
    }

    /// Several producer threads, one slot each: every entry runs in ticket order (the
    /// consumer checks the tickets are consecutive), and each thread's posted adds are
    /// all seen, in order, by its own later reads.
    #[test]
    fn threads_round_trip_in_order() {
        let (producer, slots, mut c) = pair();
        let producer = Arc::new(producer);
        let worker = std::thread::spawn(move || {
            let mut acc = [0u64; SLOTS];
            let mut expect_ticket = 0u32;
            let mut quits = 0;
            while quits < 4 {
                match c.wait(true) {
                    Next::Idle => {}
                    Next::Ready(slot) => {
                        let e = c.entry(slot).unwrap();
                        assert_eq!(e.ticket.load(Ordering::Relaxed), expect_ticket);
                        expect_ticket += 1;
                        match e.op.load(Ordering::Relaxed) {
                            1 => acc[slot] = acc[slot].wrapping_add(e.data.load(Ordering::Relaxed)),
                            2 => e.data.store(acc[slot], Ordering::Relaxed),
                            _ => quits += 1,
                        }
                        c.complete(slot).unwrap();
                    }
                    Next::Corrupt(slot) => panic!("corrupt slot {slot}"),
                }
            }
        });
        let threads: Vec<_> = slots
            .into_iter()
            .take(4)
            .map(|mut sp| {
                let producer = producer.clone();
                std::thread::spawn(move || {
                    let mut expect = 0u64;
                    for i in 0..2000u64 {
                        let fill = |e: &Entry| {
                            e.op.store(1, Ordering::Relaxed);
                            e.data.store(i, Ordering::Relaxed);
                        };
                        producer.push(&mut sp, fill, T, &mut || true).unwrap();
                        expect += i;
                        if i % 7 == 0 {
                            let read = |e: &Entry| e.op.store(2, Ordering::Relaxed);
                            let seq = producer.push(&mut sp, read, T, &mut || true).unwrap();
                            producer.wait_for(&sp, seq, T, &mut || true).unwrap();
                            let got = producer.entry(&sp, seq).data.load(Ordering::Relaxed);
                            assert_eq!(got, expect);
                        }
                    }
                    let quit = |e: &Entry| e.op.store(3, Ordering::Relaxed);
                    let seq = producer.push(&mut sp, quit, T, &mut || true).unwrap();
                    producer.wait_for(&sp, seq, T, &mut || true).unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        worker.join().unwrap();
    }

    /// An entry published first runs first, even in a slot the consumer scans later.
    #[test]
    fn tickets_order_entries_across_slots() {
        let (producer, mut slots, mut c) = pair();
        let first = |e: &Entry| e.op.store(10, Ordering::Relaxed);
        let second = |e: &Entry| e.op.store(20, Ordering::Relaxed);
        producer
            .push(&mut slots[5], first, T, &mut || true)
            .unwrap();
        producer
            .push(&mut slots[1], second, T, &mut || true)
            .unwrap();
        for (slot, op) in [(5, 10), (1, 20)] {
            assert_eq!(c.poll(), Next::Ready(slot));
            assert_eq!(c.entry(slot).unwrap().op.load(Ordering::Relaxed), op);
            c.complete(slot).unwrap();
        }
        assert_eq!(c.poll(), Next::Idle);
        assert!(!c.pending());
    }

    /// A ticket taken but not yet published holds back every later one.
    #[test]
    fn a_gap_in_tickets_waits_for_its_publisher() {
        let (producer, mut slots, mut c) = pair();
        // Take ticket 0 as a preempted publisher would, then publish ticket 1.
        let l = producer.ring().layout();
        let gap = l.ticket.0.fetch_add(1, Ordering::Relaxed);
        producer
            .push(&mut slots[0], |_| {}, T, &mut || true)
            .unwrap();
        assert!(c.pending());
        assert_eq!(c.poll(), Next::Idle);
        assert_eq!(c.wait(false), Next::Idle);
        // The publisher of ticket 0 (slot 2) finally publishes.
        let s = &l.slots[2];
        s.entries[0].ticket.store(gap, Ordering::Relaxed);
        s.parent.head.store(1, Ordering::SeqCst);
        assert_eq!(c.poll(), Next::Ready(2));
        c.complete(2).unwrap();
        assert_eq!(c.poll(), Next::Ready(0));
    }

    #[test]
    fn dead_peer_and_timeout_are_reported() {
        let (producer, mut slots, _c) = pair();
        let sp = &mut slots[3];
        let seq = producer
            .push(sp, |_| {}, Duration::from_secs(1), &mut || false)
            .unwrap();
        let err = producer.wait_for(sp, seq, T, &mut || false).unwrap_err();
        assert!(matches!(err, RingError::PeerGone { pending: 1 }), "{err}");
        let start = Instant::now();
        let err = producer
            .wait_for(sp, seq, Duration::from_millis(50), &mut || true)
            .unwrap_err();
        assert!(matches!(err, RingError::Timeout { .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_full_slot_waits_for_room_within_the_bound() {
        let (producer, mut slots, _c) = pair();
        for _ in 0..SLOT_ENTRIES {
            producer
                .push(&mut slots[0], |_| {}, T, &mut || true)
                .unwrap();
        }
        let start = Instant::now();
        let err = producer
            .push(
                &mut slots[0],
                |_| {},
                Duration::from_millis(50),
                &mut || true,
            )
            .unwrap_err();
        assert!(matches!(err, RingError::Timeout { .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn corrupt_counters_are_protocol_errors() {
        let (producer, mut slots, c) = pair();
        let seq = producer
            .push(&mut slots[4], |_| {}, T, &mut || true)
            .unwrap();
        let l = producer.ring().layout();
        l.slots[4].done.0.store(1000, Ordering::SeqCst);
        let err = producer
            .wait_for(&slots[4], seq, T, &mut || true)
            .unwrap_err();
        assert!(
            matches!(
                err,
                RingError::Protocol {
                    slot: 4,
                    done: 1000,
                    head: 1
                }
            ),
            "{err}"
        );
        // A head far ahead of the consumer's tail is refused on the other side.
        drop(c);
        let (producer, _slots, mut c) = pair();
        let l = producer.ring().layout();
        l.slots[6]
            .parent
            .head
            .store(SLOT_ENTRIES + 1, Ordering::SeqCst);
        assert_eq!(c.poll(), Next::Corrupt(6));
        // Out-of-range slot numbers are errors, not panics.
        assert!(matches!(
            c.entry(SLOTS),
            Err(RingError::SlotIndex { slot: SLOTS })
        ));
        assert!(matches!(
            c.complete(99),
            Err(RingError::SlotIndex { slot: 99 })
        ));
    }

    #[test]
    fn unsealed_memfd_is_refused() {
        let fd = memfd_create(c"x", MemfdFlags::CLOEXEC).unwrap();
        ftruncate(&fd, map_len() as u64).unwrap();
        assert!(matches!(
            SharedRing::from_fd(fd),
            Err(RingError::Unsuitable { .. })
        ));
    }
}
