//! The hot-path channel: a request ring in shared memory with futex doorbells.
//!
//! One page-aligned memfd is mapped `MAP_SHARED` in the VMM (the producer) and in the
//! device child (the consumer). The producer fills fixed-layout entries and publishes
//! them by advancing `head`; the consumer executes them in order, writes any answer back
//! into the entry and advances `done`. Both counters are 32-bit futex words.
//!
//! - A posted access (MMIO write) returns as soon as its entry is published; a later read
//!   sits behind it in the ring, so writes stay ordered before later reads.
//! - A waiting side spins briefly, then yields the CPU, then sleeps on the futex with a
//!   short timeout slice; each slice it asks a liveness callback whether the peer is
//!   still there, so a dead or hung peer is noticed without a wake-up from it.
//! - A side goes to sleep only after announcing it in a `*_sleeping` word and
//!   re-checking the counter (sequentially consistent on both sides, Dekker style), so a
//!   wake-up is never lost and the common, busy case makes no `futex_wake` call.
//! - Every word lives in memory the peer can write at any time, so every access is an
//!   atomic operation (plain `mov`s on x86) and the producer never trusts the peer's
//!   counters: it keeps its own `head`, and a `done` that runs ahead of it is a protocol
//!   error. The memfd is sealed against shrinking so the peer cannot turn a later access
//!   into `SIGBUS`.

use std::hint::spin_loop;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use remain::sorted;
use rustix::fs::{
    fcntl_add_seals, fcntl_get_seals, fstat, ftruncate, memfd_create, MemfdFlags, SealFlags,
};
use rustix::mm::{mmap, munmap, MapFlags, ProtFlags};
use thiserror::Error;

/// Number of entries in the ring (a power of two).
pub const RING_ENTRIES: u32 = 64;

const MAGIC: u32 = 0x4f42_5052; // "OBPR"

/// Errors of the shared-memory channel.
#[sorted]
#[derive(Debug, Error)]
pub enum RingError {
    /// Another producer published entries on this ring.
    #[error("another producer moved the ring's head to {shared} (ours is {ours})")]
    ForeignProducer {
        /// The head found in the ring.
        shared: u32,
        /// Our head.
        ours: u32,
    },
    /// The peer process is gone.
    #[error("the peer process exited while {pending} request(s) were outstanding")]
    PeerGone {
        /// Requests published but not completed.
        pending: u32,
    },
    /// The peer wrote counters that cannot happen.
    #[error("protocol violation: done counter {done} is ahead of head {head}")]
    Protocol {
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
}

#[repr(C, align(64))]
#[derive(Default)]
struct Padded(AtomicU32);

#[repr(C)]
struct Layout {
    magic: Padded,
    head: Padded,
    child_sleeping: Padded,
    /// The CPU each side last ran on (`u32::MAX`: unknown), to skip spinning when both
    /// share one CPU: spinning then only delays the peer.
    parent_cpu: Padded,
    child_cpu: Padded,
    done: Padded,
    parent_sleeping: Padded,
    entries: [Entry; RING_ENTRIES as usize],
}

fn page_size() -> usize {
    rustix::param::page_size()
}

fn map_len() -> usize {
    let size = std::mem::size_of::<Layout>();
    let page = page_size();
    size.div_ceil(page) * page
}

/// A mapping of the shared ring.
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
        ring.layout().magic.0.store(MAGIC, Ordering::Release);
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
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: FUTEX_WAIT (shared, since the word is in a MAP_SHARED mapping) reads the
    // 32-bit word at a valid, aligned address that stays mapped for the call, and `ts`
    // outlives the call. The result is ignored: every caller re-checks the word.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE only uses the address as a key; it is valid and aligned.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            0usize,
            0usize,
            0u32,
        );
    }
}

/// Records the CPU we run on in `mine` and tells whether the peer last ran there too.
fn shares_cpu(mine: &AtomicU32, peer: &AtomicU32) -> bool {
    // SAFETY: sched_getcpu takes no arguments; it reads the CPU number from rseq or the
    // vDSO (no system call on current glibc and kernels).
    let cpu = unsafe { libc::sched_getcpu() };
    let cpu = if cpu < 0 { u32::MAX } else { cpu as u32 };
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

/// The VMM side of the ring.
#[derive(Debug)]
pub struct Producer {
    ring: SharedRing,
    head: u32,
}

impl Producer {
    /// Takes the producer role. The starting position is read from the ring once (a
    /// ring may be handed from process to process before it is used). Only one producer
    /// may use a ring; `push` notices another one and fails.
    pub fn new(ring: SharedRing) -> Result<Producer, RingError> {
        let l = ring.layout();
        let head = l.head.0.load(Ordering::Acquire);
        let done = l.done.0.load(Ordering::Acquire);
        if head.wrapping_sub(done) > RING_ENTRIES {
            return Err(RingError::Protocol { done, head });
        }
        Ok(Producer { ring, head })
    }

    /// The ring (for its fd).
    pub fn ring(&self) -> &SharedRing {
        &self.ring
    }

    /// Publishes one entry filled by `fill`, waiting for a free slot if the ring is full.
    /// Returns the entry's sequence number.
    pub fn push(
        &mut self,
        fill: impl FnOnce(&Entry),
        timeout: Duration,
        alive: &mut dyn FnMut() -> bool,
    ) -> Result<u32, RingError> {
        let seq = self.head;
        let shared = self.ring.layout().head.0.load(Ordering::Relaxed);
        if shared != seq {
            // Someone else published entries: two producers on one ring.
            return Err(RingError::ForeignProducer { shared, ours: seq });
        }
        // Room for entry `seq` once entry `seq - RING_ENTRIES` is done.
        let need = seq.wrapping_sub(RING_ENTRIES).wrapping_add(1);
        if !self.done_reached(need)? {
            self.wait_done(need, timeout, alive)?;
        }
        let l = self.ring.layout();
        let entry = &l.entries[(seq % RING_ENTRIES) as usize];
        entry.status.store(0, Ordering::Relaxed);
        fill(entry);
        self.head = seq.wrapping_add(1);
        l.head.0.store(self.head, Ordering::SeqCst);
        if l.child_sleeping.0.load(Ordering::SeqCst) != 0 {
            futex_wake(&l.head.0);
        }
        Ok(seq)
    }

    /// The entry with sequence number `seq` (to read an answer after `wait_done`).
    pub fn entry(&self, seq: u32) -> &Entry {
        &self.ring.layout().entries[(seq % RING_ENTRIES) as usize]
    }

    /// True once `done` reached `target`, false if not yet, and an error
    /// if the peer's counter is impossible.
    fn done_reached(&self, target: u32) -> Result<bool, RingError> {
        let done = self.ring.layout().done.0.load(Ordering::Acquire);
        // Distances are taken modulo 2^32 from our own head, the only trusted value.
        let behind = self.head.wrapping_sub(done);
        if behind > RING_ENTRIES {
            return Err(RingError::Protocol {
                done,
                head: self.head,
            });
        }
        let missing = self.head.wrapping_sub(target);
        // done >= target  <=>  head - done <= head - target
        Ok(behind <= missing)
    }

    /// Waits until the entry with sequence number `seq` is complete.
    pub fn wait_for(
        &self,
        seq: u32,
        timeout: Duration,
        alive: &mut dyn FnMut() -> bool,
    ) -> Result<(), RingError> {
        self.wait_done(seq.wrapping_add(1), timeout, alive)
    }

    fn wait_done(
        &self,
        target: u32,
        timeout: Duration,
        alive: &mut dyn FnMut() -> bool,
    ) -> Result<(), RingError> {
        let p = PRODUCER_WAIT;
        let l = self.ring.layout();
        let spins = if shares_cpu(&l.parent_cpu.0, &l.child_cpu.0) {
            0
        } else {
            p.spins
        };
        for _ in 0..spins {
            if self.done_reached(target)? {
                return Ok(());
            }
            spin_loop();
        }
        for _ in 0..p.yields {
            if self.done_reached(target)? {
                return Ok(());
            }
            std::thread::yield_now();
        }
        let start = Instant::now();
        loop {
            l.parent_sleeping.0.store(1, Ordering::SeqCst);
            let done = l.done.0.load(Ordering::SeqCst);
            if self.done_reached(target)? {
                l.parent_sleeping.0.store(0, Ordering::Relaxed);
                return Ok(());
            }
            futex_wait(&l.done.0, done, p.slice);
            l.parent_sleeping.0.store(0, Ordering::Relaxed);
            if self.done_reached(target)? {
                return Ok(());
            }
            if !alive() {
                // One last look: the peer may have answered and then exited.
                if self.done_reached(target)? {
                    return Ok(());
                }
                return Err(RingError::PeerGone {
                    pending: self.head.wrapping_sub(l.done.0.load(Ordering::Relaxed)),
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
    tail: u32,
}

/// What the consumer's wait ended with.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Entries up to (excluding) this head are ready.
    Ready(u32),
    /// One sleep slice passed without work: time for liveness checks.
    Idle,
    /// The producer's head is impossible.
    Corrupt,
}

impl Consumer {
    /// Takes the consumer role.
    pub fn new(ring: SharedRing) -> Consumer {
        let tail = ring.layout().done.0.load(Ordering::Acquire);
        Consumer { ring, tail }
    }

    /// The next sequence number to execute.
    pub fn tail(&self) -> u32 {
        self.tail
    }

    /// Looks for work without waiting; `Idle` if there is none.
    pub fn poll(&self) -> Next {
        self.check(self.ring.layout().head.0.load(Ordering::SeqCst))
    }

    fn check(&self, head: u32) -> Next {
        let pending = head.wrapping_sub(self.tail);
        if pending == 0 {
            Next::Idle
        } else if pending > RING_ENTRIES {
            Next::Corrupt
        } else {
            Next::Ready(head)
        }
    }

    /// Waits for work: spins and yields first if `spin`, then sleeps at most one slice.
    pub fn wait(&self, spin: bool) -> Next {
        let l = self.ring.layout();
        let c = CONSUMER_WAIT;
        if spin {
            let spins = if shares_cpu(&l.child_cpu.0, &l.parent_cpu.0) {
                0
            } else {
                c.spins
            };
            for _ in 0..spins {
                let n = self.check(l.head.0.load(Ordering::Acquire));
                if n != Next::Idle {
                    return n;
                }
                spin_loop();
            }
            for _ in 0..c.yields {
                let n = self.check(l.head.0.load(Ordering::Acquire));
                if n != Next::Idle {
                    return n;
                }
                std::thread::yield_now();
            }
        }
        l.child_sleeping.0.store(1, Ordering::SeqCst);
        let head = l.head.0.load(Ordering::SeqCst);
        let n = self.check(head);
        if n == Next::Idle {
            futex_wait(&l.head.0, head, c.slice);
        }
        l.child_sleeping.0.store(0, Ordering::Relaxed);
        if n != Next::Idle {
            return n;
        }
        self.check(l.head.0.load(Ordering::Acquire))
    }

    /// The entry with sequence number `seq`.
    pub fn entry(&self, seq: u32) -> &Entry {
        &self.ring.layout().entries[(seq % RING_ENTRIES) as usize]
    }

    /// Marks the entry at `tail` complete and wakes the producer if it sleeps.
    pub fn complete(&mut self) {
        self.tail = self.tail.wrapping_add(1);
        let l = self.ring.layout();
        l.done.0.store(self.tail, Ordering::SeqCst);
        if l.parent_sleeping.0.load(Ordering::SeqCst) != 0 {
            futex_wake(&l.done.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_fits_and_entries_are_cache_lines() {
        assert_eq!(std::mem::size_of::<Entry>(), 64);
        assert!(map_len() >= std::mem::size_of::<Layout>());
    }

    #[test]
    fn threads_round_trip_in_order() {
        let ring = SharedRing::new().unwrap();
        let dup = ring.fd().try_clone_to_owned().unwrap();
        let mut producer = Producer::new(ring).unwrap();
        let consumer_ring = SharedRing::from_fd(dup).unwrap();
        let worker = std::thread::spawn(move || {
            let mut c = Consumer::new(consumer_ring);
            let mut acc = 0u64;
            loop {
                match c.wait(true) {
                    Next::Idle => {}
                    Next::Ready(head) => {
                        while c.tail() != head {
                            let e = c.entry(c.tail());
                            match e.op.load(Ordering::Relaxed) {
                                1 => acc = acc.wrapping_add(e.data.load(Ordering::Relaxed)),
                                2 => e.data.store(acc, Ordering::Relaxed),
                                _ => {
                                    c.complete();
                                    return;
                                }
                            }
                            c.complete();
                        }
                    }
                    Next::Corrupt => panic!("corrupt"),
                }
            }
        });
        let mut expect = 0u64;
        for i in 0..1000u64 {
            producer
                .push(
                    |e| {
                        e.op.store(1, Ordering::Relaxed);
                        e.data.store(i, Ordering::Relaxed);
                    },
                    Duration::from_secs(5),
                    &mut || true,
                )
                .unwrap();
            expect += i;
            if i % 7 == 0 {
                let seq = producer
                    .push(
                        |e| e.op.store(2, Ordering::Relaxed),
                        Duration::from_secs(5),
                        &mut || true,
                    )
                    .unwrap();
                producer
                    .wait_for(seq, Duration::from_secs(5), &mut || true)
                    .unwrap();
                assert_eq!(producer.entry(seq).data.load(Ordering::Relaxed), expect);
            }
        }
        let seq = producer
            .push(
                |e| e.op.store(3, Ordering::Relaxed),
                Duration::from_secs(5),
                &mut || true,
            )
            .unwrap();
        producer
            .wait_for(seq, Duration::from_secs(5), &mut || true)
            .unwrap();
        worker.join().unwrap();
    }

    #[test]
    fn dead_peer_and_timeout_are_reported() {
        let mut producer = Producer::new(SharedRing::new().unwrap()).unwrap();
        let seq = producer
            .push(|_| {}, Duration::from_secs(1), &mut || false)
            .unwrap();
        let err = producer
            .wait_for(seq, Duration::from_secs(5), &mut || false)
            .unwrap_err();
        assert!(matches!(err, RingError::PeerGone { pending: 1 }), "{err}");
        let start = Instant::now();
        let err = producer
            .wait_for(seq, Duration::from_millis(50), &mut || true)
            .unwrap_err();
        assert!(matches!(err, RingError::Timeout { .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn corrupt_done_counter_is_a_protocol_error() {
        let ring = SharedRing::new().unwrap();
        let mut producer = Producer::new(ring).unwrap();
        let seq = producer
            .push(|_| {}, Duration::from_secs(1), &mut || true)
            .unwrap();
        producer
            .ring()
            .layout()
            .done
            .0
            .store(1000, Ordering::SeqCst);
        let err = producer
            .wait_for(seq, Duration::from_secs(1), &mut || true)
            .unwrap_err();
        assert!(
            matches!(
                err,
                RingError::Protocol {
                    done: 1000,
                    head: 1
                }
            ),
            "{err}"
        );
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
