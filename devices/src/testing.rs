//! Test doubles for device code: an in-memory virtqueue with a guest-side driver, an
//! interrupt that counts, and a minimal device for transport tests.
//!
//! Behind the `test-utils` feature (and always in this crate's own unit tests), in the
//! spirit of rust-vmm `virtio-queue`'s `mock` module and Firecracker's `test_utils`:
//! a device author takes it as a dev-dependency,
//!
//! ```toml
//! [dev-dependencies]
//! outboard-devices = { version = "0.1", features = ["test-utils"] }
//! ```
//!
//! and tests a [`VirtioDevice`] without a VMM, guest memory or a ring layout:
//!
//! - [`QueueDriver`] is the guest's side of one queue. A test posts descriptor chains
//!   with [`QueueDriver::chain`] (device-readable bytes and device-writable room, any
//!   number of descriptors, and malformed chains), hands [`QueueDriver::queue`] to the
//!   device, and reads back what the device returned with [`QueueDriver::pop_used`]:
//!   the head, the used length and the bytes written.
//! - [`TestQueue`] is the device's side, a [`VirtQueue`] that behaves like the rust-vmm
//!   one in `outboard-vmm-glue`: the same [`QueueError::BadChain`] reasons, a ring that stays
//!   broken ([`QueueDriver::break_ring`]) until [`QueueDriver::reset`], and `add_used`
//!   refused for a head that is not in flight (a device returning a chain twice).
//! - [`CountingInterrupt`] counts [`Interrupt`] signals per queue.
//! - [`EchoDevice`] is a device with no behaviour of its own, for testing transports.
//!
//! # Example
//!
//! A device that upper-cases its requests, tested through the double:
//!
//! ```
//! use std::os::fd::BorrowedFd;
//! use std::sync::Arc;
//!
//! use outboard_devices::testing::{CountingInterrupt, QueueDriver};
//! use outboard_devices::virtio::{
//!     read_regions, write_regions, ActivateError, DescChain, Interrupt, QueueError,
//!     VirtQueue, VirtioDevice,
//! };
//!
//! #[derive(Default)]
//! struct Upper {
//!     queues: Vec<Box<dyn VirtQueue>>,
//!     irq: Option<Arc<dyn Interrupt>>,
//! }
//!
//! impl VirtioDevice for Upper {
//!     fn device_type(&self) -> u32 { 0xffff }
//!     fn queue_max_sizes(&self) -> &[u16] { &[8] }
//!     fn features(&self) -> u64 { 0 }
//!     fn ack_features(&mut self, _: u64) {}
//!     fn read_config(&self, _: u64, data: &mut [u8]) { data.fill(0) }
//!     fn write_config(&mut self, _: u64, _: &[u8]) {}
//!     fn activate(
//!         &mut self,
//!         queues: Vec<Box<dyn VirtQueue>>,
//!         irq: Arc<dyn Interrupt>,
//!     ) -> Result<(), ActivateError> {
//!         self.queues = queues;
//!         self.irq = Some(irq);
//!         Ok(())
//!     }
//!     fn reset(&mut self) { self.queues.clear() }
//!     fn event_fd(&self) -> Option<BorrowedFd<'_>> { None }
//!     fn handle_event(&mut self) {}
//!     fn handle_queue(&mut self, index: usize) {
//!         let (Some(q), Some(irq)) = (self.queues.get_mut(index), &self.irq) else {
//!             return;
//!         };
//!         let mut chain = DescChain::default();
//!         loop {
//!             let len = match q.pop(&mut chain) {
//!                 Ok(true) => {
//!                     let mut buf = vec![0; chain.readable_len()];
//!                     read_regions(&chain.readable, 0, &mut buf);
//!                     buf.make_ascii_uppercase();
//!                     write_regions(&chain.writable, 0, &buf)
//!                 }
//!                 Err(QueueError::BadChain { head, .. }) => {
//!                     chain.head = head;
//!                     0
//!                 }
//!                 Ok(false) | Err(_) => break,
//!             };
//!             if q.add_used(chain.head, len as u32).is_err() {
//!                 break;
//!             }
//!             irq.signal_used_queue(index);
//!         }
//!     }
//! }
//!
//! let driver = QueueDriver::new(8);
//! let irq = Arc::new(CountingInterrupt::default());
//! let mut dev = Upper::default();
//! dev.activate(vec![Box::new(driver.queue())], irq.clone())?;
//!
//! // A request split over two descriptors, the answer over two more.
//! let good = driver.chain().readable(b"hel").readable(b"lo").writable(2).writable(8).post();
//! // A chain whose device-readable descriptor follows a device-writable one.
//! let bad = driver.chain().writable(8).readable(b"late").post();
//! dev.handle_queue(0);
//!
//! let used = driver.pop_used().expect("the good chain came back");
//! assert_eq!((used.head, used.len, used.written.as_slice()), (good, 5, &b"HELLO"[..]));
//! let used = driver.pop_used().expect("the bad chain came back");
//! assert_eq!((used.head, used.len), (bad, 0));
//! assert_eq!(driver.pop_used(), None);
//! assert_eq!(irq.used_signals(0), 2);
//! # Ok::<(), ActivateError>(())
//! ```
//!
//! # Memory
//!
//! Every buffer of a posted chain is a heap allocation of the double's that stays
//! allocated until the last handle on the queue ([`QueueDriver`] or [`TestQueue`]) is
//! dropped, even after the chain was used or the queue reset: a device that wrongly
//! keeps a region past its chain's lifetime writes into memory nobody reads, not into
//! freed memory. The test reads the device's bytes back with raw copies, as a guest
//! would; read them once the device's `handle_*` call has returned.

use std::collections::VecDeque;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::virtio::{
    read_regions, ActivateError, DescChain, Interrupt, IoRegion, QueueError, StateError, VirtQueue,
    VirtioDevice, MAX_CHAIN_REGIONS, VIRTIO_F_VERSION_1,
};

/// Locks `m`, also when a panicking test thread poisoned it (the state is plain data
/// that every method leaves consistent).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One descriptor of a posted chain.
#[derive(Debug)]
struct Desc {
    region: IoRegion,
    writable: bool,
}

/// A chain the driver made available.
#[derive(Debug)]
struct Posted {
    head: u16,
    descs: Vec<Desc>,
    /// Set for chains posted with [`ChainBuilder::malformed`].
    malformed: Option<&'static str>,
}

impl Posted {
    /// Why a queue implementation would refuse this chain, if it would.
    fn fault(&self) -> Option<&'static str> {
        if let Some(reason) = self.malformed {
            return Some(reason);
        }
        let mut writable_seen = false;
        for d in &self.descs {
            if !d.writable && writable_seen {
                return Some("device-readable descriptor after a device-writable one");
            }
            writable_seen |= d.writable;
        }
        if self.descs.len() > MAX_CHAIN_REGIONS {
            return Some("more descriptors than MAX_CHAIN_REGIONS");
        }
        None
    }

    fn writable(&self) -> Vec<IoRegion> {
        self.descs
            .iter()
            .filter(|d| d.writable)
            .map(|d| d.region)
            .collect()
    }
}

/// A chain the device returned through the used ring, as the driver sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsedChain {
    /// The chain's head (what [`ChainBuilder::post`] returned).
    pub head: u16,
    /// The length the device reported ([`VirtQueue::add_used`]'s `len`), as it reported
    /// it: it may exceed the chain's writable room when the device is wrong.
    pub len: u32,
    /// The first `len` bytes of the chain's writable half as they were when the device
    /// returned the chain (fewer when the writable half is shorter than `len`).
    pub written: Vec<u8>,
}

/// The state a [`QueueDriver`] and its [`TestQueue`]s share.
#[derive(Debug)]
struct State {
    size: u16,
    /// Heads of no posted, popped, or used but unread chain: free for the next post.
    free: VecDeque<u16>,
    /// Posted and not popped, oldest first.
    avail: VecDeque<Posted>,
    /// Popped and not used, in pop order.
    in_flight: Vec<Posted>,
    /// Used and not yet read by the driver, oldest first.
    used: VecDeque<UsedChain>,
    /// Every buffer ever posted; see the module docs ("Memory"). Never read, written,
    /// resized or dropped (except all at once with the state): the regions in `avail`,
    /// `in_flight` and the device's chains point into them.
    buffers: Vec<Vec<u8>>,
    broken: Option<String>,
    kicks_enabled: bool,
    interrupts_suppressed: bool,
    rejected_used: u64,
}

impl State {
    fn new(size: u16) -> Self {
        State {
            size,
            free: (0..size).collect(),
            avail: VecDeque::new(),
            in_flight: Vec::new(),
            used: VecDeque::new(),
            buffers: Vec::new(),
            broken: None,
            kicks_enabled: true,
            interrupts_suppressed: false,
            rejected_used: 0,
        }
    }

    /// Keeps `bytes` alive with the state and returns a region over them.
    fn region(&mut self, mut bytes: Vec<u8>) -> IoRegion {
        let len = bytes.len();
        // SAFETY: `as_mut_ptr` points to the `len` initialized bytes of `bytes`' heap
        // buffer (dangling but never dereferenced when `len` is 0: a region of no bytes
        // is never read or written), and is documented not to create a reference to
        // them. `bytes` then moves into `self.buffers`, which moves the `Vec` but not its
        // heap buffer and never touches the contents again (no reference, no resize, no
        // drop) until the state is dropped, which happens only after the last
        // `QueueDriver` and `TestQueue` handle is gone. So the memory stays allocated,
        // readable and writable for as long as any holder of the queue can use the
        // region, longer than `VirtQueue` requires, and only raw copies (the device's and
        // `read_regions` in `add_used`) ever access it.
        let region = unsafe { IoRegion::new(bytes.as_mut_ptr(), len) };
        self.buffers.push(bytes);
        region
    }

    fn check_broken(&self) -> Result<(), QueueError> {
        match &self.broken {
            Some(reason) => Err(QueueError::Broken(reason.clone())),
            None => Ok(()),
        }
    }
}

/// The guest driver's side of one in-memory virtqueue: posts descriptor chains and reads
/// back the used ones. Cloning gives another handle to the same queue.
///
/// See the [module docs](self) for an example.
#[derive(Debug, Clone)]
pub struct QueueDriver {
    state: Arc<Mutex<State>>,
}

impl QueueDriver {
    /// A queue of `size` entries: at most `size` chains can be posted and not yet used
    /// at a time (descriptors per chain are not limited by `size`, as with indirect
    /// tables).
    pub fn new(size: u16) -> Self {
        QueueDriver {
            state: Arc::new(Mutex::new(State::new(size))),
        }
    }

    /// The device's side of the queue, to hand to [`VirtioDevice::activate`] (boxed).
    /// Every call returns another handle to the same queue (for example for activating
    /// again after a reset).
    pub fn queue(&self) -> TestQueue {
        TestQueue {
            state: self.state.clone(),
        }
    }

    /// Starts a descriptor chain; [`ChainBuilder::post`] makes it available.
    pub fn chain(&self) -> ChainBuilder<'_> {
        ChainBuilder {
            driver: self,
            descs: Vec::new(),
            malformed: None,
        }
    }

    /// Takes the oldest chain the device returned and has not been read yet.
    /// Its head becomes free for another chain.
    pub fn pop_used(&self) -> Option<UsedChain> {
        let mut s = lock(&self.state);
        let used = s.used.pop_front()?;
        s.free.push_back(used.head);
        Some(used)
    }

    /// Takes every chain the device returned and has not been read yet, oldest first.
    /// Their heads become free for other chains.
    pub fn take_used(&self) -> Vec<UsedChain> {
        let mut s = lock(&self.state);
        let used: Vec<UsedChain> = s.used.drain(..).collect();
        s.free.extend(used.iter().map(|u| u.head));
        used
    }

    /// Chains posted and not yet popped by the device.
    pub fn available(&self) -> usize {
        lock(&self.state).avail.len()
    }

    /// Chains the device popped and has not returned yet.
    pub fn in_flight(&self) -> usize {
        lock(&self.state).in_flight.len()
    }

    /// How many [`VirtQueue::add_used`] calls were refused because their head was not in
    /// flight (never popped, or already returned).
    pub fn rejected_used(&self) -> u64 {
        lock(&self.state).rejected_used
    }

    /// Whether the device last asked for kicks ([`VirtQueue::enable_notification`]) rather
    /// than polling ([`VirtQueue::disable_notification`]). True at the start.
    pub fn kicks_enabled(&self) -> bool {
        lock(&self.state).kicks_enabled
    }

    /// Suppresses used-buffer interrupts (virtio's `VRING_AVAIL_F_NO_INTERRUPT`):
    /// [`VirtQueue::needs_notification`] answers `false` while they are suppressed.
    pub fn suppress_interrupts(&self, suppressed: bool) {
        lock(&self.state).interrupts_suppressed = suppressed;
    }

    /// Breaks the ring as an inconsistent index or address would: from now on every call
    /// of the device's [`TestQueue`] returns [`QueueError::Broken`] with `reason`, until
    /// [`QueueDriver::reset`].
    pub fn break_ring(&self, reason: &str) {
        lock(&self.state).broken = Some(reason.to_string());
    }

    /// Resets the queue as a transport reset does: forgets every posted, popped and used
    /// chain and the broken state, and frees every head. Buffers stay allocated (see the
    /// module docs).
    pub fn reset(&self) {
        let mut s = lock(&self.state);
        let size = s.size;
        s.free = (0..size).collect();
        s.avail.clear();
        s.in_flight.clear();
        s.used.clear();
        s.broken = None;
        s.kicks_enabled = true;
        s.interrupts_suppressed = false;
        s.rejected_used = 0;
    }
}

/// A descriptor chain being built by [`QueueDriver::chain`]: descriptors in chain order,
/// made available by [`ChainBuilder::post`].
#[derive(Debug)]
#[must_use = "a chain is only made available by `post`"]
pub struct ChainBuilder<'a> {
    driver: &'a QueueDriver,
    /// Each descriptor's bytes and whether it is device-writable.
    descs: Vec<(Vec<u8>, bool)>,
    malformed: Option<&'static str>,
}

impl ChainBuilder<'_> {
    /// Appends a device-readable descriptor holding `bytes`.
    pub fn readable(mut self, bytes: &[u8]) -> Self {
        self.descs.push((bytes.to_vec(), false));
        self
    }

    /// Appends a device-writable descriptor of `len` zero bytes.
    pub fn writable(mut self, len: usize) -> Self {
        self.descs.push((vec![0; len], true));
        self
    }

    /// Makes the chain one the queue refuses: the device's `pop` consumes it and returns
    /// [`QueueError::BadChain`] with `reason` (for example "descriptor outside guest
    /// memory", which a real queue finds in guest memory the double does not have).
    /// Chains with a readable descriptor after a writable one, or with more than
    /// [`MAX_CHAIN_REGIONS`] descriptors, are refused without it, with the reasons
    /// `outboard-vmm-glue`'s rust-vmm queue gives.
    pub fn malformed(mut self, reason: &'static str) -> Self {
        self.malformed = Some(reason);
        self
    }

    /// Makes the chain available and returns its head.
    ///
    /// # Panics
    ///
    /// When the queue already holds as many chains as its size (posted, popped, or used
    /// but not yet read with [`QueueDriver::pop_used`]): the test overfilled its ring.
    pub fn post(self) -> u16 {
        let mut s = lock(&self.driver.state);
        let Some(head) = s.free.pop_front() else {
            let size = s.size;
            drop(s);
            panic!("QueueDriver: all {size} heads are in use (pop_used frees them)");
        };
        let descs = self
            .descs
            .into_iter()
            .map(|(bytes, writable)| Desc {
                region: s.region(bytes),
                writable,
            })
            .collect();
        s.avail.push_back(Posted {
            head,
            descs,
            malformed: self.malformed,
        });
        head
    }
}

/// The device's side of an in-memory virtqueue, from [`QueueDriver::queue`].
///
/// Pops the chains the driver posted in order, with each descriptor as one region.
/// Malformed chains are consumed and reported as [`QueueError::BadChain`] (see
/// [`ChainBuilder::malformed`]); they are in flight until the device returns them.
/// Used entries are recorded for [`QueueDriver::pop_used`].
#[derive(Debug)]
pub struct TestQueue {
    state: Arc<Mutex<State>>,
}

impl VirtQueue for TestQueue {
    fn pop(&mut self, chain: &mut DescChain) -> Result<bool, QueueError> {
        chain.clear();
        let mut s = lock(&self.state);
        s.check_broken()?;
        let Some(posted) = s.avail.pop_front() else {
            return Ok(false);
        };
        let head = posted.head;
        let fault = posted.fault();
        if fault.is_none() {
            chain.head = head;
            for d in &posted.descs {
                if d.writable {
                    chain.writable.push(d.region);
                } else {
                    chain.readable.push(d.region);
                }
            }
        }
        s.in_flight.push(posted);
        match fault {
            Some(reason) => Err(QueueError::BadChain { head, reason }),
            None => Ok(true),
        }
    }

    fn undo_pop(&mut self) {
        let mut s = lock(&self.state);
        if let Some(posted) = s.in_flight.pop() {
            s.avail.push_front(posted);
        }
    }

    fn add_used(&mut self, head: u16, len: u32) -> Result<(), QueueError> {
        let mut s = lock(&self.state);
        s.check_broken()?;
        let Some(at) = s.in_flight.iter().position(|p| p.head == head) else {
            s.rejected_used += 1;
            return Err(QueueError::Used {
                head,
                reason: "the head is not in flight (never popped, or already used)".into(),
            });
        };
        let posted = s.in_flight.remove(at);
        let writable = posted.writable();
        let room = writable.iter().map(IoRegion::len).sum::<usize>();
        let mut written = vec![0; room.min(usize::try_from(len).unwrap_or(usize::MAX))];
        read_regions(&writable, 0, &mut written);
        s.used.push_back(UsedChain { head, len, written });
        Ok(())
    }

    fn needs_notification(&mut self) -> Result<bool, QueueError> {
        let s = lock(&self.state);
        s.check_broken()?;
        Ok(!s.interrupts_suppressed)
    }

    fn enable_notification(&mut self) -> Result<bool, QueueError> {
        let mut s = lock(&self.state);
        s.check_broken()?;
        s.kicks_enabled = true;
        Ok(!s.avail.is_empty())
    }

    fn disable_notification(&mut self) -> Result<(), QueueError> {
        let mut s = lock(&self.state);
        s.check_broken()?;
        s.kicks_enabled = false;
        Ok(())
    }
}

/// An [`Interrupt`] that counts its signals per queue.
///
/// Share it with the device as an `Arc` (`Arc<CountingInterrupt>` coerces to
/// `Arc<dyn Interrupt>`) and keep a clone to read the counts.
#[derive(Debug, Default)]
pub struct CountingInterrupt {
    used: Mutex<Vec<u64>>,
    config: AtomicU64,
}

impl CountingInterrupt {
    /// A counter at zero for every queue (the same as `default()`).
    pub fn new() -> Self {
        Self::default()
    }

    /// How often [`Interrupt::signal_used_queue`] was called for `queue`.
    pub fn used_signals(&self, queue: usize) -> u64 {
        lock(&self.used).get(queue).copied().unwrap_or(0)
    }

    /// How often [`Interrupt::signal_config_change`] was called.
    pub fn config_signals(&self) -> u64 {
        self.config.load(Ordering::Relaxed)
    }
}

impl Interrupt for CountingInterrupt {
    fn signal_used_queue(&self, queue: usize) {
        let mut used = lock(&self.used);
        if used.len() <= queue {
            used.resize(queue + 1, 0);
        }
        used[queue] += 1;
    }

    fn signal_config_change(&self) {
        self.config.fetch_add(1, Ordering::Relaxed);
    }
}

/// What happened to an [`EchoDevice`], in order (see [`EchoDevice::log`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EchoEvent {
    /// [`VirtioDevice::ack_features`] with these bits (as the transport passed them).
    AckFeatures(u64),
    /// [`VirtioDevice::activate`] with this many queues.
    Activated {
        /// The number of queues.
        queues: usize,
    },
    /// [`VirtioDevice::reset`].
    Reset,
    /// A queue call failed other than with [`QueueError::BadChain`]; the pass ended.
    QueueError {
        /// The queue's index.
        queue: usize,
        /// The error.
        error: QueueError,
    },
}

/// A handle on an [`EchoDevice`]'s event log, which stays readable after the device was
/// moved into a transport.
#[derive(Debug, Clone, Default)]
pub struct EchoLog(Arc<Mutex<Vec<EchoEvent>>>);

impl EchoLog {
    /// The events so far, oldest first.
    pub fn events(&self) -> Vec<EchoEvent> {
        lock(&self.0).clone()
    }

    /// Whether `event` happened.
    pub fn contains(&self, event: &EchoEvent) -> bool {
        lock(&self.0).contains(event)
    }

    fn push(&self, event: EchoEvent) {
        lock(&self.0).push(event);
    }
}

/// A minimal [`VirtioDevice`] for testing transports: it returns every chain of every
/// queue with the chain's readable length as the used length (writing nothing), and a
/// malformed chain with 0, and logs what the transport did to it ([`EchoLog`]).
///
/// Its config space is a byte array the driver can read and overwrite (out-of-range
/// bytes read as zero, writes to them are dropped). A pass over a queue that returned at
/// least one chain signals the queue's interrupt once, without asking the queue
/// ([`VirtQueue::needs_notification`]), so a transport test sees every pass.
pub struct EchoDevice {
    sizes: Vec<u16>,
    features: u64,
    config: Vec<u8>,
    queues: Vec<Box<dyn VirtQueue>>,
    irq: Option<Arc<dyn Interrupt>>,
    log: EchoLog,
    chain: DescChain,
    stateful: bool,
}

impl std::fmt::Debug for EchoDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EchoDevice")
            .field("sizes", &self.sizes)
            .field("features", &format_args!("{:#x}", self.features))
            .field("config", &self.config)
            .field("active", &self.irq.is_some())
            .finish_non_exhaustive()
    }
}

impl EchoDevice {
    /// The device id it reports: no virtio driver binds to it.
    pub const DEVICE_TYPE: u32 = 42;

    /// A device with one queue per entry of `queue_max_sizes`, offering
    /// [`VIRTIO_F_VERSION_1`], with an empty config space.
    pub fn new(queue_max_sizes: &[u16]) -> Self {
        EchoDevice {
            sizes: queue_max_sizes.to_vec(),
            features: VIRTIO_F_VERSION_1,
            config: Vec::new(),
            queues: Vec::new(),
            irq: None,
            log: EchoLog::default(),
            chain: DescChain::default(),
            stateful: false,
        }
    }

    /// Saves and restores its state ([`VirtioDevice::snapshot_state`]): its config
    /// space, as is; a restore refuses state of another length.
    pub fn with_state(mut self) -> Self {
        self.stateful = true;
        self
    }

    /// Offers `features` instead.
    pub fn with_features(mut self, features: u64) -> Self {
        self.features = features;
        self
    }

    /// Starts with `config` as its config space.
    pub fn with_config(mut self, config: &[u8]) -> Self {
        self.config = config.to_vec();
        self
    }

    /// A handle on the device's event log.
    pub fn log(&self) -> EchoLog {
        self.log.clone()
    }
}

impl VirtioDevice for EchoDevice {
    fn device_type(&self) -> u32 {
        Self::DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn ack_features(&mut self, features: u64) {
        self.log.push(EchoEvent::AckFeatures(features));
    }

    fn config_size(&self) -> usize {
        self.config.len()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let Ok(offset) = usize::try_from(offset) else {
            return;
        };
        if let Some(dst) = self.config.get_mut(offset..) {
            let n = dst.len().min(data.len());
            dst[..n].copy_from_slice(&data[..n]);
        }
    }

    fn activate(
        &mut self,
        queues: Vec<Box<dyn VirtQueue>>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), ActivateError> {
        self.log.push(EchoEvent::Activated {
            queues: queues.len(),
        });
        self.queues = queues;
        self.irq = Some(interrupt);
        Ok(())
    }

    fn reset(&mut self) {
        self.log.push(EchoEvent::Reset);
        self.queues.clear();
        self.irq = None;
    }

    fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    fn handle_queue(&mut self, queue: usize) {
        let Some(q) = self.queues.get_mut(queue) else {
            return;
        };
        let mut used = false;
        let error = loop {
            let (head, len) = match q.pop(&mut self.chain) {
                Ok(true) => (
                    self.chain.head,
                    u32::try_from(self.chain.readable_len()).unwrap_or(u32::MAX),
                ),
                Err(QueueError::BadChain { head, .. }) => (head, 0),
                Ok(false) => match q.enable_notification() {
                    Ok(true) => continue,
                    Ok(false) => break None,
                    Err(e) => break Some(e),
                },
                Err(e) => break Some(e),
            };
            if let Err(e) = q.add_used(head, len) {
                break Some(e);
            }
            used = true;
        };
        if let Some(error) = error {
            self.log.push(EchoEvent::QueueError { queue, error });
        }
        if used {
            if let Some(irq) = &self.irq {
                irq.signal_used_queue(queue);
            }
        }
    }

    fn handle_event(&mut self) {}

    fn supports_state(&self) -> bool {
        self.stateful
    }

    fn snapshot_state(&mut self) -> Result<Vec<u8>, StateError> {
        if !self.stateful {
            return Err(StateError::Unsupported {
                device_type: Self::DEVICE_TYPE,
            });
        }
        Ok(self.config.clone())
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), StateError> {
        if !self.stateful {
            return Err(StateError::Unsupported {
                device_type: Self::DEVICE_TYPE,
            });
        }
        if state.len() != self.config.len() {
            return Err(StateError::Refused(format!(
                "echo state of {} bytes, the config space has {}",
                state.len(),
                self.config.len()
            )));
        }
        self.config = state.to_vec();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::{signal_used, write_regions};

    fn pop(q: &mut TestQueue) -> Result<Option<DescChain>, QueueError> {
        let mut chain = DescChain::default();
        Ok(q.pop(&mut chain)?.then_some(chain))
    }

    #[test]
    fn chains_come_out_in_order_with_their_halves_and_go_back_with_the_bytes_written() {
        let driver = QueueDriver::new(4);
        let mut q = driver.queue();
        let a = driver
            .chain()
            .readable(b"ab")
            .readable(b"")
            .readable(b"cde")
            .writable(3)
            .writable(4)
            .post();
        let b = driver.chain().writable(2).post();
        assert_ne!(a, b);
        assert_eq!(driver.available(), 2);

        let chain = pop(&mut q).unwrap().unwrap();
        assert_eq!(chain.head, a);
        assert_eq!(chain.readable.len(), 3);
        assert_eq!((chain.readable_len(), chain.writable_len()), (5, 7));
        let mut req = [0u8; 5];
        assert_eq!(read_regions(&chain.readable, 0, &mut req), 5);
        assert_eq!(&req, b"abcde");
        // Across the two writable descriptors; the used length covers 6 of 7 bytes.
        assert_eq!(write_regions(&chain.writable, 0, b"xyzuvw!"), 7);
        q.add_used(a, 6).unwrap();
        assert_eq!((driver.available(), driver.in_flight()), (1, 0));

        let chain = pop(&mut q).unwrap().unwrap();
        assert!(chain.readable.is_empty());
        // A device that claims more than the room: the length is kept as it said.
        q.add_used(chain.head, 100).unwrap();
        assert!(pop(&mut q).unwrap().is_none());

        assert_eq!(
            driver.take_used(),
            vec![
                UsedChain {
                    head: a,
                    len: 6,
                    written: b"xyzuvw".to_vec()
                },
                UsedChain {
                    head: b,
                    len: 100,
                    written: vec![0, 0]
                },
            ]
        );
        assert_eq!(driver.pop_used(), None);
    }

    #[test]
    fn bad_chains_are_consumed_and_must_be_returned() {
        let driver = QueueDriver::new(8);
        let mut q = driver.queue();
        let order = driver.chain().writable(4).readable(b"x").post();
        let marked = driver
            .chain()
            .readable(b"fine")
            .malformed("descriptor outside guest memory")
            .post();
        let mut long = driver.chain();
        for _ in 0..=MAX_CHAIN_REGIONS {
            long = long.readable(b"1");
        }
        let long = long.post();
        let good = driver.chain().readable(b"ok").post();

        let expect = [
            (
                order,
                "device-readable descriptor after a device-writable one",
            ),
            (marked, "descriptor outside guest memory"),
            (long, "more descriptors than MAX_CHAIN_REGIONS"),
        ];
        for (head, reason) in expect {
            assert_eq!(
                pop(&mut q).err(),
                Some(QueueError::BadChain { head, reason })
            );
        }
        assert_eq!(driver.in_flight(), 3);
        assert_eq!(pop(&mut q).unwrap().unwrap().head, good);
        for head in [order, marked, long, good] {
            q.add_used(head, 0).unwrap();
        }
        let used: Vec<u16> = driver.take_used().iter().map(|u| u.head).collect();
        assert_eq!(used, vec![order, marked, long, good]);
    }

    #[test]
    fn a_head_not_in_flight_is_refused_and_counted() {
        let driver = QueueDriver::new(2);
        let mut q = driver.queue();
        let head = driver.chain().writable(1).post();
        assert!(matches!(q.add_used(head, 0), Err(QueueError::Used { .. })));
        let chain = pop(&mut q).unwrap().unwrap();
        q.add_used(chain.head, 1).unwrap();
        assert!(matches!(q.add_used(head, 1), Err(QueueError::Used { .. })));
        assert_eq!(q.add_used(7, 0).map_err(|_| ()), Err(()));
        assert_eq!(driver.rejected_used(), 3);
        assert_eq!(driver.take_used().len(), 1);
    }

    #[test]
    fn undo_pop_puts_the_newest_chain_back_first() {
        let driver = QueueDriver::new(4);
        let mut q = driver.queue();
        let a = driver.chain().writable(1).post();
        let b = driver.chain().writable(1).post();
        assert_eq!(pop(&mut q).unwrap().unwrap().head, a);
        assert_eq!(pop(&mut q).unwrap().unwrap().head, b);
        q.undo_pop();
        q.undo_pop();
        q.undo_pop(); // nothing more in flight: no effect
        assert_eq!((driver.available(), driver.in_flight()), (2, 0));
        assert_eq!(pop(&mut q).unwrap().unwrap().head, a);
        assert_eq!(pop(&mut q).unwrap().unwrap().head, b);
    }

    #[test]
    fn heads_are_freed_when_the_driver_reads_the_used_ring() {
        let driver = QueueDriver::new(2);
        let mut q = driver.queue();
        let a = driver.chain().writable(1).post();
        let b = driver.chain().writable(1).post();
        for _ in 0..2 {
            let chain = pop(&mut q).unwrap().unwrap();
            q.add_used(chain.head, 0).unwrap();
        }
        // Both used but unread: the ring is still full.
        let full = std::panic::catch_unwind(|| driver.chain().post());
        assert!(full.is_err());
        assert_eq!(driver.pop_used().map(|u| u.head), Some(a));
        assert_eq!(driver.chain().post(), a);
        assert_eq!(driver.pop_used().map(|u| u.head), Some(b));
    }

    #[test]
    fn a_broken_ring_fails_every_call_until_reset() {
        let driver = QueueDriver::new(4);
        let mut q = driver.queue();
        driver.chain().readable(b"x").post();
        driver.break_ring("avail index 9 ahead on 8 entries");
        let broken = QueueError::Broken("avail index 9 ahead on 8 entries".into());
        assert_eq!(pop(&mut q).err(), Some(broken.clone()));
        assert_eq!(q.enable_notification().err(), Some(broken.clone()));
        assert_eq!(q.disable_notification().err(), Some(broken.clone()));
        assert_eq!(q.needs_notification().err(), Some(broken.clone()));
        assert_eq!(q.add_used(0, 0).err(), Some(broken));
        assert_eq!(driver.available(), 1);
        driver.reset();
        assert_eq!(driver.available(), 0);
        assert!(pop(&mut q).unwrap().is_none());
        let head = driver.chain().readable(b"again").post();
        assert_eq!(pop(&mut q).unwrap().unwrap().head, head);
    }

    #[test]
    fn notification_state_is_visible_to_the_driver() {
        let driver = QueueDriver::new(4);
        let mut q = driver.queue();
        assert!(driver.kicks_enabled());
        q.disable_notification().unwrap();
        assert!(!driver.kicks_enabled());
        assert!(!q.enable_notification().unwrap());
        driver.chain().writable(1).post();
        assert!(q.enable_notification().unwrap());
        assert!(driver.kicks_enabled());

        let irq = CountingInterrupt::new();
        let mut queues: Vec<Box<dyn VirtQueue>> = vec![Box::new(driver.queue())];
        signal_used(&mut queues, 0, Some(&irq));
        driver.suppress_interrupts(true);
        signal_used(&mut queues, 0, Some(&irq));
        signal_used(&mut queues, 3, Some(&irq));
        irq.signal_used_queue(5);
        irq.signal_config_change();
        assert_eq!(
            [0, 1, 5].map(|q| irq.used_signals(q)),
            [1, 0, 1],
            "queue 0 once (then suppressed), queue 5 once"
        );
        assert_eq!(irq.config_signals(), 1);
    }

    #[test]
    fn echo_returns_chains_with_their_readable_length_and_logs() {
        let mut dev = EchoDevice::new(&[4, 4])
            .with_features(VIRTIO_F_VERSION_1 | 1)
            .with_config(b"cfg");
        let log = dev.log();
        dev.ack_features(3);
        let mut cfg = [9u8; 4];
        dev.write_config(1, b"XYZ");
        dev.read_config(0, &mut cfg);
        assert_eq!(&cfg, b"cXY\0");
        let (q0, q1) = (QueueDriver::new(4), QueueDriver::new(4));
        let irq = Arc::new(CountingInterrupt::new());
        dev.activate(
            vec![Box::new(q0.queue()), Box::new(q1.queue())],
            irq.clone(),
        )
        .unwrap();
        let a = q1.chain().readable(&[1; 10]).writable(4).post();
        let b = q1.chain().readable(b"x").malformed("bad").post();
        dev.handle_queue(1);
        dev.handle_queue(0); // nothing there: no interrupt
        let used: Vec<(u16, u32)> = q1.take_used().iter().map(|u| (u.head, u.len)).collect();
        assert_eq!(used, vec![(a, 10), (b, 0)]);
        assert_eq!((irq.used_signals(0), irq.used_signals(1)), (0, 1));
        q1.break_ring("gone");
        dev.handle_queue(1);
        dev.reset();
        assert_eq!(
            log.events(),
            vec![
                EchoEvent::AckFeatures(3),
                EchoEvent::Activated { queues: 2 },
                EchoEvent::QueueError {
                    queue: 1,
                    error: QueueError::Broken("gone".into())
                },
                EchoEvent::Reset,
            ]
        );
        assert!(log.contains(&EchoEvent::Reset));
        assert_eq!(dev.device_type(), EchoDevice::DEVICE_TYPE);
    }
}
