//! A virtio-mmio transport (virtio 1.x, register layout version 2) that makes any
//! Outboard [`VirtioDevice`] a [`BusDevice`].
//!
//! The guest driver programs the device through 32-bit registers: it reads the magic
//! value, version and device id, negotiates features 32 bits at a time through the
//! selector registers, sets up each queue (select, size, ready, ring addresses), and
//! sets `DRIVER_OK`, at which point the device is activated with its queues (rust-vmm
//! split queues over the VMM's guest memory, see [`crate::rust_vmm`]). Queue notifies
//! call the device directly; used-buffer and config-change interrupts set the
//! interrupt status register and signal an eventfd the VMM wires to the guest's
//! interrupt line (an irqfd). Writing 0 to the status register resets the device.
//!
//! The device's own event fd ([`VirtioDevice::event_fd`]) must be polled by the VMM,
//! which then calls [`MmioTransport::handle_device_event`].
//!
//! Everything the guest writes is untrusted: accesses of the wrong width or outside the
//! register file are ignored (reads return zeros), queue sizes and selectors are bounds
//! checked, features the device did not offer keep `FEATURES_OK` from being set, and
//! queue addresses are validated against guest memory before activation. A ring that
//! turns out inconsistent while the device runs (see [`crate::rust_vmm`]) sets
//! `DEVICE_NEEDS_RESET` and raises a configuration-change interrupt (virtio 1.x,
//! 2.1.2); the queue stays broken until the driver resets the device.
//!
//! # Snapshot and restore
//!
//! The transport is [`Suspendable`]: [`MmioTransport::save`] and
//! [`MmioTransport::load`] (as a `serde_json::Value` with the `serde` feature) carry an
//! [`MmioSnapshot`]: the registers, each queue's configuration and the ring indices the
//! device is at (the live queues publish them after every call), and the device's own
//! state ([`VirtioDevice::snapshot_state`]); a restored device goes on at the saved
//! indices. Sleep holds queue notifies and device events until wake.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use outboard_devices::bus::{
    BusAccessInfo, BusDevice, BusRange, BusType, DeviceId, SuspendError, Suspendable,
};
use outboard_devices::virtio::{
    DescChain, Interrupt, QueueError, StateError, VirtQueue, VirtioDevice,
};
use outboard_protocol::virtio::mmio as reg;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::EventFd;

use crate::rust_vmm::{RingHealth, RustVmmQueue};

// The register map, interrupt bits and status bits are the specification's (virtio 1.3,
// 2.1 and 4.2.2), defined with their sections in outboard-protocol; these public names
// are the ones this module has always had.
pub use outboard_protocol::virtio::mmio::{
    INT_CONFIG, INT_VRING, MAGIC as MMIO_MAGIC, VERSION_2 as MMIO_VERSION,
};
pub use outboard_protocol::virtio::status;

/// The vendor id reported to the guest ("OBRD"). Outboard's own, not the specification's.
pub const MMIO_VENDOR_ID: u32 = 0x4452_424f;
/// Size of the register window, config space included: the 0x100 bytes of registers
/// ([`CONFIG`](outboard_protocol::virtio::mmio::CONFIG)) and 0x100 bytes of device config space. Outboard's choice (the
/// specification leaves the window's size to the platform).
pub const MMIO_WINDOW: u64 = 0x200;

/// The interrupt the device signals: sets `InterruptStatus` bits and kicks the irqfd.
#[derive(Debug)]
pub struct MmioInterrupt {
    status: Arc<AtomicU32>,
    config_generation: Arc<AtomicU32>,
    irq: EventFd,
}

impl MmioInterrupt {
    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irq.write(1) {
            outboard_protocol::log_limited!(
                log::Level::Warn,
                "virtio-mmio: cannot signal the interrupt: {e}"
            );
        }
    }
}

impl Interrupt for MmioInterrupt {
    fn signal_used_queue(&self, _queue: usize) {
        self.raise(INT_VRING);
    }

    fn signal_config_change(&self) {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.raise(INT_CONFIG);
    }
}

/// A virtio device behind virtio-mmio registers.
pub struct MmioTransport<D: VirtioDevice, M: GuestAddressSpace> {
    device: D,
    mem: M,
    range: BusRange,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    active: bool,
    interrupt_status: Arc<AtomicU32>,
    config_generation: Arc<AtomicU32>,
    irq: EventFd,
    health: Arc<RingHealth>,
    /// The live queues' ring indices while active (see [`TrackedQueue`]).
    positions: Vec<Arc<AtomicU32>>,
    /// Ring indices the queues start from at the next activation (a restore).
    start_at: Vec<(u16, u16)>,
    /// Between [`Suspendable::sleep`] and [`Suspendable::wake`].
    asleep: bool,
    /// Queue notifies and a device event that came while asleep, run at wake.
    deferred_notifies: Vec<usize>,
    deferred_event: bool,
}

impl<D: VirtioDevice, M: GuestAddressSpace> std::fmt::Debug for MmioTransport<D, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("range", &self.range)
            .field("status", &self.status)
            .field("active", &self.active)
            .finish()
    }
}

/// A queue with the same configuration (the registers keep the original).
fn copy_queue(q: &Queue) -> Option<Queue> {
    let mut c = Queue::new(q.max_size()).ok()?;
    if q.ready() {
        c.try_set_size(q.size()).ok()?;
        c.try_set_desc_table_address(vm_memory::GuestAddress(q.desc_table()))
            .ok()?;
        c.try_set_avail_ring_address(vm_memory::GuestAddress(q.avail_ring()))
            .ok()?;
        c.try_set_used_ring_address(vm_memory::GuestAddress(q.used_ring()))
            .ok()?;
    }
    c.set_event_idx(q.event_idx_enabled());
    c.set_ready(q.ready());
    Some(c)
}

fn new_queues(sizes: &[u16]) -> Vec<Queue> {
    sizes
        .iter()
        .filter_map(|&max| Queue::new(max.max(1)).ok())
        .collect()
}

impl<D, M> MmioTransport<D, M>
where
    D: VirtioDevice,
    M: GuestAddressSpace + Send + 'static,
    M::T: Send,
{
    /// Puts `device` at `base` (a [`MMIO_WINDOW`]-byte window) in guest memory `mem`;
    /// interrupts are signalled on `irq`.
    pub fn new(device: D, mem: M, base: u64, irq: EventFd) -> Self {
        let queues = new_queues(device.queue_max_sizes());
        MmioTransport {
            device,
            mem,
            range: BusRange {
                base,
                len: MMIO_WINDOW,
            },
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            active: false,
            interrupt_status: Arc::new(AtomicU32::new(0)),
            config_generation: Arc::new(AtomicU32::new(0)),
            irq,
            health: Arc::new(RingHealth::new()),
            positions: Vec::new(),
            start_at: Vec::new(),
            asleep: false,
            deferred_notifies: Vec::new(),
            deferred_event: false,
        }
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Whether the driver set `DRIVER_OK` and the device was activated.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The device's event fd is readable: let it work.
    pub fn handle_device_event(&mut self) {
        if self.asleep {
            self.deferred_event = true;
            return;
        }
        if self.active {
            self.device.handle_event();
            self.check_health();
        }
    }

    /// After the device ran: a broken ring makes the device need a reset.
    fn check_health(&mut self) {
        if !self.health.has_news() {
            return;
        }
        for (index, reason) in self.health.take() {
            outboard_protocol::log_limited!(
                log::Level::Error,
                "virtio-mmio: queue {index} is broken, the device needs a reset: {reason}"
            );
        }
        if self.status & status::DEVICE_NEEDS_RESET == 0 {
            self.status |= status::DEVICE_NEEDS_RESET;
            self.config_generation.fetch_add(1, Ordering::SeqCst);
            self.interrupt_status.fetch_or(INT_CONFIG, Ordering::SeqCst);
            if let Err(e) = self.irq.write(1) {
                outboard_protocol::log_limited!(
                    log::Level::Warn,
                    "virtio-mmio: cannot signal the interrupt: {e}"
                );
            }
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        if self.status & status::DRIVER_OK != 0 {
            // Queue registers are read-only for the driver once the device is live.
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        self.queues = new_queues(self.device.queue_max_sizes());
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status.store(0, Ordering::SeqCst);
        self.positions.clear();
        self.start_at.clear();
        self.deferred_notifies.clear();
        self.deferred_event = false;
        // Reports of the queues just dropped.
        self.health.take();
    }

    fn activate(&mut self) -> bool {
        let mem = self.mem.memory();
        let event_idx =
            self.driver_features & outboard_protocol::virtio::VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues: Vec<Box<dyn VirtQueue>> = Vec::with_capacity(self.queues.len());
        let mut positions = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter_mut().enumerate() {
            if q.ready() && !q.is_valid(&*mem) {
                outboard_protocol::log_limited!(
                    log::Level::Warn,
                    "virtio-mmio: queue {i} is not valid in guest memory"
                );
                return false;
            }
            q.set_event_idx(event_idx);
            let Some(mut copy) = copy_queue(q) else {
                outboard_protocol::log_limited!(
                    log::Level::Warn,
                    "virtio-mmio: queue {i} cannot be copied"
                );
                return false;
            };
            let (next_avail, next_used) = self.start_at.get(i).copied().unwrap_or_default();
            copy.set_next_avail(next_avail);
            copy.set_next_used(next_used);
            let position = Arc::new(AtomicU32::new(pack(next_avail, next_used)));
            positions.push(position.clone());
            queues.push(Box::new(TrackedQueue {
                inner: RustVmmQueue::new(copy, self.mem.clone())
                    .with_health(self.health.clone(), i),
                position,
            }));
        }
        let irq = match self.irq.try_clone() {
            Ok(fd) => fd,
            Err(e) => {
                outboard_protocol::log_limited!(
                    log::Level::Warn,
                    "virtio-mmio: cannot clone the irq eventfd: {e}"
                );
                return false;
            }
        };
        let interrupt = Arc::new(MmioInterrupt {
            status: self.interrupt_status.clone(),
            config_generation: self.config_generation.clone(),
            irq,
        });
        match self.device.activate(queues, interrupt) {
            Ok(()) => {
                self.active = true;
                self.positions = positions;
                self.start_at.clear();
                true
            }
            Err(e) => {
                outboard_protocol::log_limited!(
                    log::Level::Warn,
                    "virtio-mmio: activation failed: {e}"
                );
                false
            }
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        let newly = value & !self.status;
        if newly & status::FEATURES_OK != 0 {
            let offered = self.device.features();
            if self.driver_features & !offered != 0 {
                outboard_protocol::log_limited!(
                    log::Level::Warn,
                    "virtio-mmio: driver accepted features {:#x} that were not offered",
                    self.driver_features & !offered
                );
                value &= !status::FEATURES_OK;
            } else {
                self.device.ack_features(self.driver_features);
            }
        }
        if newly & status::DRIVER_OK != 0 && !self.active {
            let features_ok = value & status::FEATURES_OK != 0;
            if !features_ok || !self.activate() {
                value = (value & !status::DRIVER_OK) | status::DEVICE_NEEDS_RESET;
            }
        }
        // Only a reset (0) clears DEVICE_NEEDS_RESET.
        self.status = value | (self.status & status::DEVICE_NEEDS_RESET);
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC_VALUE => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => MMIO_VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => q.map(|q| u32::from(q.max_size())).unwrap_or(0),
            reg::QUEUE_READY => q.map(|q| u32::from(q.ready())).unwrap_or(0),
            reg::INTERRUPT_STATUS => self.interrupt_status.load(Ordering::SeqCst),
            reg::STATUS => self.status,
            // No shared memory regions: length all ones means "does not exist".
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::CONFIG_GENERATION => self.config_generation.load(Ordering::SeqCst),
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        fn set_low(old: u64, v: u32) -> u64 {
            (old & !0xffff_ffff) | u64::from(v)
        }
        fn set_high(old: u64, v: u32) -> u64 {
            (old & 0xffff_ffff) | (u64::from(v) << 32)
        }
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                if self.status & status::FEATURES_OK != 0 {
                    return;
                }
                match self.driver_features_sel {
                    0 => self.driver_features = set_low(self.driver_features, v),
                    1 => self.driver_features = set_high(self.driver_features, v),
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    if let Ok(n) = u16::try_from(v) {
                        // Refused sizes (zero, above the maximum, not a power of two)
                        // leave the queue invalid, which activation reports.
                        let _ = q.try_set_size(n);
                    }
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            reg::QUEUE_DESC_LOW => {
                if let Some(q) = self.selected_queue() {
                    q.set_desc_table_address(Some(v), None);
                }
            }
            reg::QUEUE_DESC_HIGH => {
                if let Some(q) = self.selected_queue() {
                    q.set_desc_table_address(None, Some(v));
                }
            }
            reg::QUEUE_DRIVER_LOW => {
                if let Some(q) = self.selected_queue() {
                    q.set_avail_ring_address(Some(v), None);
                }
            }
            reg::QUEUE_DRIVER_HIGH => {
                if let Some(q) = self.selected_queue() {
                    q.set_avail_ring_address(None, Some(v));
                }
            }
            reg::QUEUE_DEVICE_LOW => {
                if let Some(q) = self.selected_queue() {
                    q.set_used_ring_address(Some(v), None);
                }
            }
            reg::QUEUE_DEVICE_HIGH => {
                if let Some(q) = self.selected_queue() {
                    q.set_used_ring_address(None, Some(v));
                }
            }
            reg::QUEUE_NOTIFY => {
                let index = (v & 0xffff) as usize;
                if self.asleep && self.active && index < self.queues.len() {
                    if !self.deferred_notifies.contains(&index) {
                        self.deferred_notifies.push(index);
                    }
                } else if self.active && index < self.queues.len() {
                    self.device.handle_queue(index);
                    self.check_health();
                }
            }
            reg::INTERRUPT_ACK => {
                self.interrupt_status.fetch_and(!v, Ordering::SeqCst);
            }
            reg::STATUS => self.set_status(v),
            reg::SHM_SEL => {}
            _ => outboard_protocol::log_limited!(
                log::Level::Debug,
                "virtio-mmio: write to read-only or unknown register {offset:#x}"
            ),
        }
    }
}

/// `next_avail` in the low half, `next_used` in the high half.
fn pack(next_avail: u16, next_used: u16) -> u32 {
    u32::from(next_avail) | (u32::from(next_used) << 16)
}

/// A live queue that publishes its ring indices after every call, so that a snapshot
/// taken between the device's calls has the indices the device is at (the device owns
/// the queue; the transport keeps only the registers).
struct TrackedQueue<M: GuestAddressSpace> {
    inner: RustVmmQueue<M>,
    position: Arc<AtomicU32>,
}

impl<M: GuestAddressSpace> TrackedQueue<M> {
    fn publish(&self) {
        let q = self.inner.queue();
        self.position
            .store(pack(q.next_avail(), q.next_used()), Ordering::Relaxed);
    }
}

impl<M> VirtQueue for TrackedQueue<M>
where
    M: GuestAddressSpace + Send,
    M::T: Send,
{
    fn pop(&mut self, chain: &mut DescChain) -> Result<bool, QueueError> {
        let r = self.inner.pop(chain);
        self.publish();
        r
    }

    fn undo_pop(&mut self) {
        self.inner.undo_pop();
        self.publish();
    }

    fn add_used(&mut self, head: u16, len: u32) -> Result<(), QueueError> {
        let r = self.inner.add_used(head, len);
        self.publish();
        r
    }

    fn needs_notification(&mut self) -> Result<bool, QueueError> {
        self.inner.needs_notification()
    }

    fn enable_notification(&mut self) -> Result<bool, QueueError> {
        self.inner.enable_notification()
    }

    fn disable_notification(&mut self) -> Result<(), QueueError> {
        self.inner.disable_notification()
    }
}

/// The version of [`MmioSnapshot`] this code writes and reads.
pub const MMIO_SNAPSHOT_VERSION: u32 = 1;

/// What [`MmioTransport::save`] returns and `Suspendable::snapshot` saves (as a
/// `serde_json::Value`, feature `serde`):
/// the transport's registers, each queue's configuration and ring indices, and the
/// device's own state ([`VirtioDevice::snapshot_state`], in the device's encoding).
///
/// A restore ([`MmioTransport::load`]) resets the transport and its device, puts the
/// registers and queues back, hands the device its state
/// ([`VirtioDevice::restore_state`]) and, when the saved device was running,
/// activates it with queues that go on at the saved indices. Guest memory is the VMM's
/// to save and restore; the interrupt line too (the transport signals its irq eventfd
/// once after a restore when the interrupt status is not zero).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(deny_unknown_fields)
)]
pub struct MmioSnapshot {
    /// [`MMIO_SNAPSHOT_VERSION`].
    pub version: u32,
    /// The device's virtio id; a restore into another device type is refused.
    pub device_type: u32,
    /// The device status register.
    pub status: u32,
    /// The features the driver wrote.
    pub driver_features: u64,
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// `InterruptStatus`.
    pub interrupt_status: u32,
    /// `ConfigGeneration`.
    pub config_generation: u32,
    /// Whether the device was activated (`DRIVER_OK` accepted).
    pub active: bool,
    /// Every queue, in index order.
    pub queues: Vec<MmioQueueSnapshot>,
    /// The device's own state.
    pub device: Vec<u8>,
}

/// One queue of an [`MmioSnapshot`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(deny_unknown_fields)
)]
pub struct MmioQueueSnapshot {
    /// `QueueNumMax` (must equal the restored device's).
    pub max_size: u16,
    /// `QueueNum`.
    pub size: u16,
    /// `QueueReady`.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available (driver) ring address.
    pub avail_ring: u64,
    /// Used (device) ring address.
    pub used_ring: u64,
    /// The next available ring index the device will read.
    pub next_avail: u16,
    /// The next used ring index the device will write.
    pub next_used: u16,
}

impl<D, M> MmioTransport<D, M>
where
    D: VirtioDevice,
    M: GuestAddressSpace + Send + 'static,
    M::T: Send,
{
    fn suspend_error(&self, operation: &str, reason: String) -> SuspendError {
        SuspendError::Failed {
            device: self.label(),
            operation: operation.to_owned(),
            reason,
        }
    }

    fn label(&self) -> String {
        format!("virtio-mmio (device type {})", self.device.device_type())
    }

    /// The transport's and the device's state (see [`MmioSnapshot`]). Fails when the
    /// device does not save its state ([`VirtioDevice::supports_state`]).
    pub fn save(&mut self) -> Result<MmioSnapshot, SuspendError> {
        let device = self.device.snapshot_state().map_err(|e| match e {
            StateError::Unsupported { .. } => SuspendError::Unsupported {
                device: self.label(),
                operation: "snapshot".to_owned(),
            },
            e => self.suspend_error("snapshot", e.to_string()),
        })?;
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let (next_avail, next_used) = if self.active {
                    let p = self
                        .positions
                        .get(i)
                        .map_or(0, |p| p.load(Ordering::Relaxed));
                    (p as u16, (p >> 16) as u16)
                } else {
                    self.start_at.get(i).copied().unwrap_or_default()
                };
                MmioQueueSnapshot {
                    max_size: q.max_size(),
                    size: q.size(),
                    ready: q.ready(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                    next_avail,
                    next_used,
                }
            })
            .collect();
        Ok(MmioSnapshot {
            version: MMIO_SNAPSHOT_VERSION,
            device_type: self.device.device_type(),
            status: self.status,
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status.load(Ordering::SeqCst),
            config_generation: self.config_generation.load(Ordering::SeqCst),
            active: self.active,
            queues,
            device,
        })
    }

    /// Restores [`MmioTransport::save`]'s state (see [`MmioSnapshot`]). Everything in
    /// it is checked like a driver's register writes: another version or device type,
    /// another queue count or maximum size, a queue size the queue refuses, features
    /// the device does not offer, device state the device refuses, or queues that are
    /// not valid in guest memory fail the restore, which leaves the transport reset.
    pub fn load(&mut self, snap: &MmioSnapshot) -> Result<(), SuspendError> {
        let fail = |t: &Self, reason: String| t.suspend_error("restore", reason);
        if snap.version != MMIO_SNAPSHOT_VERSION {
            return Err(fail(
                self,
                format!(
                    "snapshot version {} is not supported (this build reads {MMIO_SNAPSHOT_VERSION})",
                    snap.version
                ),
            ));
        }
        if snap.device_type != self.device.device_type() {
            return Err(fail(
                self,
                format!(
                    "the snapshot is of device type {}, this device is type {}",
                    snap.device_type,
                    self.device.device_type()
                ),
            ));
        }
        let max_sizes = self.device.queue_max_sizes().to_vec();
        if snap.queues.len() != max_sizes.len() {
            return Err(fail(
                self,
                format!(
                    "the snapshot has {} queues, the device {}",
                    snap.queues.len(),
                    max_sizes.len()
                ),
            ));
        }
        let offered = self.device.features();
        if snap.status & status::FEATURES_OK != 0 && snap.driver_features & !offered != 0 {
            return Err(fail(
                self,
                format!(
                    "driver features {:#x} include {:#x}, which the device does not offer",
                    snap.driver_features,
                    snap.driver_features & !offered
                ),
            ));
        }
        self.reset();
        let mut queues = Vec::with_capacity(snap.queues.len());
        for (i, (qs, max)) in snap.queues.iter().zip(max_sizes).enumerate() {
            if qs.max_size != max.max(1) {
                return Err(fail(
                    self,
                    format!(
                        "queue {i} has maximum size {} in the snapshot, {} on the device",
                        qs.max_size,
                        max.max(1)
                    ),
                ));
            }
            let mut q =
                Queue::new(qs.max_size).map_err(|e| fail(self, format!("queue {i}: {e}")))?;
            if qs.size != qs.max_size {
                q.try_set_size(qs.size)
                    .map_err(|e| fail(self, format!("queue {i}: size {}: {e}", qs.size)))?;
            }
            let (lo, hi) = split(qs.desc_table);
            q.set_desc_table_address(lo, hi);
            let (lo, hi) = split(qs.avail_ring);
            q.set_avail_ring_address(lo, hi);
            let (lo, hi) = split(qs.used_ring);
            q.set_used_ring_address(lo, hi);
            q.set_ready(qs.ready);
            queues.push(q);
        }
        self.queues = queues;
        self.status = snap.status;
        self.driver_features = snap.driver_features;
        self.device_features_sel = snap.device_features_sel;
        self.driver_features_sel = snap.driver_features_sel;
        self.queue_sel = snap.queue_sel;
        self.interrupt_status
            .store(snap.interrupt_status, Ordering::SeqCst);
        self.config_generation
            .store(snap.config_generation, Ordering::SeqCst);
        if snap.status & status::FEATURES_OK != 0 {
            self.device.ack_features(snap.driver_features);
        }
        if let Err(e) = self.device.restore_state(&snap.device) {
            self.reset();
            return Err(fail(self, e.to_string()));
        }
        self.start_at = snap
            .queues
            .iter()
            .map(|q| (q.next_avail, q.next_used))
            .collect();
        let running = status::FEATURES_OK | status::DRIVER_OK;
        if snap.active && (snap.status & running != running || !self.activate()) {
            self.reset();
            return Err(fail(
                self,
                "the saved device was running but its queues cannot be activated again \
                 (the reason is logged)"
                    .to_owned(),
            ));
        }
        if snap.interrupt_status != 0 {
            // The VMM restores the line; signal it once more in case it was edge-triggered.
            let _ = self.irq.write(1);
        }
        Ok(())
    }
}

/// A guest address as the low and high register halves.
fn split(addr: u64) -> (Option<u32>, Option<u32>) {
    (Some(addr as u32), Some((addr >> 32) as u32))
}

/// Snapshot and restore are [`MmioTransport::save`] and [`MmioTransport::load`] with the
/// [`MmioSnapshot`] as a serde value (feature `serde`). Sleep stops the device from being
/// called: queue notifies and device events that come while asleep are held and run at
/// wake, so a snapshot taken asleep sees no change under it.
impl<D, M> Suspendable for MmioTransport<D, M>
where
    D: VirtioDevice,
    M: GuestAddressSpace + Send + 'static,
    M::T: Send,
{
    #[cfg(feature = "serde")]
    fn snapshot(&mut self) -> Result<serde_json::Value, SuspendError> {
        let snap = self.save()?;
        serde_json::to_value(snap).map_err(|e| self.suspend_error("snapshot", e.to_string()))
    }

    #[cfg(feature = "serde")]
    fn restore(&mut self, data: serde_json::Value) -> Result<(), SuspendError> {
        let snap: MmioSnapshot = serde_json::from_value(data).map_err(|e| {
            self.suspend_error("restore", format!("not a virtio-mmio snapshot: {e}"))
        })?;
        self.load(&snap)
    }

    fn sleep(&mut self) -> Result<(), SuspendError> {
        self.asleep = true;
        Ok(())
    }

    fn wake(&mut self) -> Result<(), SuspendError> {
        self.asleep = false;
        for index in std::mem::take(&mut self.deferred_notifies) {
            if self.active && index < self.queues.len() {
                self.device.handle_queue(index);
            }
        }
        if std::mem::take(&mut self.deferred_event) && self.active {
            self.device.handle_event();
        }
        self.check_health();
        Ok(())
    }
}

impl<D, M> BusDevice for MmioTransport<D, M>
where
    D: VirtioDevice,
    M: GuestAddressSpace + Send + 'static,
    M::T: Send,
{
    fn debug_label(&self) -> String {
        format!("virtio-mmio (device type {})", self.device.device_type())
    }

    fn device_id(&self) -> DeviceId {
        DeviceId::Platform(self.device.device_type())
    }

    fn read(&mut self, info: BusAccessInfo, data: &mut [u8]) {
        let offset = info.offset;
        if offset >= reg::CONFIG {
            if offset < MMIO_WINDOW && matches!(data.len(), 1 | 2 | 4 | 8) {
                self.device.read_config(offset - reg::CONFIG, data);
            } else {
                data.fill(0);
            }
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            data.fill(0);
            return;
        }
        let v = self.read_reg(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, info: BusAccessInfo, data: &[u8]) {
        let offset = info.offset;
        if offset >= reg::CONFIG {
            if offset < MMIO_WINDOW && matches!(data.len(), 1 | 2 | 4 | 8) {
                self.device.write_config(offset - reg::CONFIG, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            outboard_protocol::log_limited!(
                log::Level::Debug,
                "virtio-mmio: ignored {}-byte write to register {offset:#x}",
                data.len()
            );
            return;
        };
        if offset % 4 == 0 {
            self.write_reg(offset, u32::from_le_bytes(bytes));
        }
    }

    fn get_ranges(&self) -> Vec<(BusRange, BusType)> {
        vec![(self.range, BusType::Mmio)]
    }

    fn destroy_device(&mut self) {
        self.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outboard_devices::testing::{EchoDevice, EchoEvent, EchoLog};
    use outboard_devices::virtio::VIRTIO_F_VERSION_1;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    type Mem = Arc<GuestMemoryMmap>;

    /// The transport over an [`EchoDevice`] with two queues that returns every chain
    /// with its readable length as the used length and logs what happens to it.
    fn setup() -> (MmioTransport<EchoDevice, Mem>, Mem, EchoLog, EventFd) {
        let mem =
            Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap());
        let dev = EchoDevice::new(&[16, 16])
            .with_features(VIRTIO_F_VERSION_1 | 1)
            .with_config(b"outboard");
        let log = dev.log();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(dev, mem.clone(), 0xd000_0000, irq.try_clone().unwrap());
        (t, mem, log, irq)
    }

    /// outboard-protocol keeps its own typed, documented virtio constants (see
    /// `outboard_protocol::virtio`); they must equal the Linux uapi values that rust-vmm's
    /// `virtio-bindings` carries.
    #[test]
    fn protocol_constants_match_virtio_bindings() {
        use outboard_protocol::virtio::{
            VIRTIO_F_IN_ORDER, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
        };
        use virtio_bindings::virtio_config as cfg;
        use virtio_bindings::virtio_mmio as b;
        use virtio_bindings::virtio_ring as ring;

        let bit = |n: u32| 1u64 << n;
        assert_eq!(
            VIRTIO_RING_F_INDIRECT_DESC,
            bit(ring::VIRTIO_RING_F_INDIRECT_DESC)
        );
        assert_eq!(VIRTIO_RING_F_EVENT_IDX, bit(ring::VIRTIO_RING_F_EVENT_IDX));
        assert_eq!(VIRTIO_F_VERSION_1, bit(cfg::VIRTIO_F_VERSION_1));
        assert_eq!(VIRTIO_F_IN_ORDER, bit(cfg::VIRTIO_F_IN_ORDER));

        let statuses = [
            (status::ACKNOWLEDGE, cfg::VIRTIO_CONFIG_S_ACKNOWLEDGE),
            (status::DRIVER, cfg::VIRTIO_CONFIG_S_DRIVER),
            (status::DRIVER_OK, cfg::VIRTIO_CONFIG_S_DRIVER_OK),
            (status::FEATURES_OK, cfg::VIRTIO_CONFIG_S_FEATURES_OK),
            (status::DEVICE_NEEDS_RESET, cfg::VIRTIO_CONFIG_S_NEEDS_RESET),
            (status::FAILED, cfg::VIRTIO_CONFIG_S_FAILED),
        ];
        for (ours, theirs) in statuses {
            assert_eq!(ours, theirs);
        }
        assert_eq!(INT_VRING, b::VIRTIO_MMIO_INT_VRING);
        assert_eq!(INT_CONFIG, b::VIRTIO_MMIO_INT_CONFIG);

        let registers = [
            (reg::MAGIC_VALUE, b::VIRTIO_MMIO_MAGIC_VALUE),
            (reg::VERSION, b::VIRTIO_MMIO_VERSION),
            (reg::DEVICE_ID, b::VIRTIO_MMIO_DEVICE_ID),
            (reg::VENDOR_ID, b::VIRTIO_MMIO_VENDOR_ID),
            (reg::DEVICE_FEATURES, b::VIRTIO_MMIO_DEVICE_FEATURES),
            (reg::DEVICE_FEATURES_SEL, b::VIRTIO_MMIO_DEVICE_FEATURES_SEL),
            (reg::DRIVER_FEATURES, b::VIRTIO_MMIO_DRIVER_FEATURES),
            (reg::DRIVER_FEATURES_SEL, b::VIRTIO_MMIO_DRIVER_FEATURES_SEL),
            (reg::QUEUE_SEL, b::VIRTIO_MMIO_QUEUE_SEL),
            (reg::QUEUE_NUM_MAX, b::VIRTIO_MMIO_QUEUE_NUM_MAX),
            (reg::QUEUE_NUM, b::VIRTIO_MMIO_QUEUE_NUM),
            (reg::QUEUE_READY, b::VIRTIO_MMIO_QUEUE_READY),
            (reg::QUEUE_NOTIFY, b::VIRTIO_MMIO_QUEUE_NOTIFY),
            (reg::INTERRUPT_STATUS, b::VIRTIO_MMIO_INTERRUPT_STATUS),
            (reg::INTERRUPT_ACK, b::VIRTIO_MMIO_INTERRUPT_ACK),
            (reg::STATUS, b::VIRTIO_MMIO_STATUS),
            (reg::QUEUE_DESC_LOW, b::VIRTIO_MMIO_QUEUE_DESC_LOW),
            (reg::QUEUE_DESC_HIGH, b::VIRTIO_MMIO_QUEUE_DESC_HIGH),
            (reg::QUEUE_DRIVER_LOW, b::VIRTIO_MMIO_QUEUE_AVAIL_LOW),
            (reg::QUEUE_DRIVER_HIGH, b::VIRTIO_MMIO_QUEUE_AVAIL_HIGH),
            (reg::QUEUE_DEVICE_LOW, b::VIRTIO_MMIO_QUEUE_USED_LOW),
            (reg::QUEUE_DEVICE_HIGH, b::VIRTIO_MMIO_QUEUE_USED_HIGH),
            (reg::SHM_SEL, b::VIRTIO_MMIO_SHM_SEL),
            (reg::SHM_LEN_LOW, b::VIRTIO_MMIO_SHM_LEN_LOW),
            (reg::SHM_LEN_HIGH, b::VIRTIO_MMIO_SHM_LEN_HIGH),
            (reg::SHM_BASE_LOW, b::VIRTIO_MMIO_SHM_BASE_LOW),
            (reg::SHM_BASE_HIGH, b::VIRTIO_MMIO_SHM_BASE_HIGH),
            (reg::CONFIG_GENERATION, b::VIRTIO_MMIO_CONFIG_GENERATION),
            (reg::CONFIG, b::VIRTIO_MMIO_CONFIG),
        ];
        for (ours, theirs) in registers {
            assert_eq!(ours, u64::from(theirs), "register {ours:#x}");
        }
    }

    /// Every device ID `virtio-bindings` has is in `outboard_protocol::virtio::id` with
    /// the same value (the newer ones, RDMA to MEDIA, come from the specification only),
    /// and the per-device constants agree with the table.
    #[test]
    fn device_ids_match_virtio_bindings() {
        use outboard_protocol::virtio::id;
        use virtio_bindings::virtio_ids as ids;

        let table = [
            (id::NET, ids::VIRTIO_ID_NET),
            (id::BLOCK, ids::VIRTIO_ID_BLOCK),
            (id::CONSOLE, ids::VIRTIO_ID_CONSOLE),
            (id::RNG, ids::VIRTIO_ID_RNG),
            (id::BALLOON, ids::VIRTIO_ID_BALLOON),
            (id::IOMEM, ids::VIRTIO_ID_IOMEM),
            (id::RPMSG, ids::VIRTIO_ID_RPMSG),
            (id::SCSI, ids::VIRTIO_ID_SCSI),
            (id::P9, ids::VIRTIO_ID_9P),
            (id::MAC80211_WLAN, ids::VIRTIO_ID_MAC80211_WLAN),
            (id::RPROC_SERIAL, ids::VIRTIO_ID_RPROC_SERIAL),
            (id::CAIF, ids::VIRTIO_ID_CAIF),
            (id::MEMORY_BALLOON, ids::VIRTIO_ID_MEMORY_BALLOON),
            (id::GPU, ids::VIRTIO_ID_GPU),
            (id::CLOCK, ids::VIRTIO_ID_CLOCK),
            (id::INPUT, ids::VIRTIO_ID_INPUT),
            (id::VSOCK, ids::VIRTIO_ID_VSOCK),
            (id::CRYPTO, ids::VIRTIO_ID_CRYPTO),
            (id::SIGNAL_DIST, ids::VIRTIO_ID_SIGNAL_DIST),
            (id::PSTORE, ids::VIRTIO_ID_PSTORE),
            (id::IOMMU, ids::VIRTIO_ID_IOMMU),
            (id::MEM, ids::VIRTIO_ID_MEM),
            (id::SOUND, ids::VIRTIO_ID_SOUND),
            (id::FS, ids::VIRTIO_ID_FS),
            (id::PMEM, ids::VIRTIO_ID_PMEM),
            (id::RPMB, ids::VIRTIO_ID_RPMB),
            (id::MAC80211_HWSIM, ids::VIRTIO_ID_MAC80211_HWSIM),
            (id::VIDEO_ENCODER, ids::VIRTIO_ID_VIDEO_ENCODER),
            (id::VIDEO_DECODER, ids::VIRTIO_ID_VIDEO_DECODER),
            (id::SCMI, ids::VIRTIO_ID_SCMI),
            (id::NITRO_SEC_MOD, ids::VIRTIO_ID_NITRO_SEC_MOD),
            (id::I2C_ADAPTER, ids::VIRTIO_ID_I2C_ADAPTER),
            (id::WATCHDOG, ids::VIRTIO_ID_WATCHDOG),
            (id::CAN, ids::VIRTIO_ID_CAN),
            (id::DMABUF, ids::VIRTIO_ID_DMABUF),
            (id::PARAM_SERV, ids::VIRTIO_ID_PARAM_SERV),
            (id::AUDIO_POLICY, ids::VIRTIO_ID_AUDIO_POLICY),
            (id::BT, ids::VIRTIO_ID_BT),
            (id::GPIO, ids::VIRTIO_ID_GPIO),
        ];
        for (ours, theirs) in table {
            assert_eq!(ours, theirs, "device id {theirs}");
        }
        assert_eq!(id::VSOCK, outboard_protocol::vsock::VIRTIO_ID_VSOCK);
        assert_eq!(id::MEDIA, outboard_protocol::media::VIRTIO_ID_MEDIA);
    }

    fn rd(t: &mut MmioTransport<EchoDevice, Mem>, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(
            BusAccessInfo {
                offset,
                address: 0xd000_0000 + offset,
                id: 0,
            },
            &mut b,
        );
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport<EchoDevice, Mem>, offset: u64, v: u32) {
        t.write(
            BusAccessInfo {
                offset,
                address: 0xd000_0000 + offset,
                id: 0,
            },
            &v.to_le_bytes(),
        );
    }

    /// The driver's side of feature negotiation and queue 0 setup, as Linux does it.
    fn bring_up(t: &mut MmioTransport<EchoDevice, Mem>) {
        wr(t, reg::STATUS, 0);
        wr(t, reg::STATUS, status::ACKNOWLEDGE);
        wr(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(t, reg::DEVICE_FEATURES_SEL, 1);
        let high = rd(t, reg::DEVICE_FEATURES);
        wr(t, reg::DEVICE_FEATURES_SEL, 0);
        let low = rd(t, reg::DEVICE_FEATURES);
        wr(t, reg::DRIVER_FEATURES_SEL, 1);
        wr(t, reg::DRIVER_FEATURES, high);
        wr(t, reg::DRIVER_FEATURES_SEL, 0);
        wr(t, reg::DRIVER_FEATURES, low);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        wr(t, reg::STATUS, s);
        assert_eq!(
            rd(t, reg::STATUS) & status::FEATURES_OK,
            status::FEATURES_OK
        );
        wr(t, reg::QUEUE_SEL, 0);
        assert_eq!(rd(t, reg::QUEUE_NUM_MAX), 16);
        wr(t, reg::QUEUE_NUM, 8);
        wr(t, reg::QUEUE_DESC_LOW, 0x1000);
        wr(t, reg::QUEUE_DESC_HIGH, 0);
        wr(t, reg::QUEUE_DRIVER_LOW, 0x2000);
        wr(t, reg::QUEUE_DRIVER_HIGH, 0);
        wr(t, reg::QUEUE_DEVICE_LOW, 0x3000);
        wr(t, reg::QUEUE_DEVICE_HIGH, 0);
        wr(t, reg::QUEUE_READY, 1);
        assert_eq!(rd(t, reg::QUEUE_READY), 1);
        wr(t, reg::STATUS, s | status::DRIVER_OK);
    }

    /// A driver whose available index runs more than the ring size ahead: the device
    /// sets DEVICE_NEEDS_RESET and raises a config interrupt, once; only a reset
    /// clears it, and the reset device serves again.
    #[test]
    fn a_broken_ring_makes_the_device_need_a_reset() {
        let (mut t, mem, _log, irq) = setup();
        bring_up(&mut t);
        mem.write_obj(9u16, GuestAddress(0x2002)).unwrap(); // 9 ahead on 8 entries
        wr(&mut t, reg::QUEUE_NOTIFY, 0);
        let s = rd(&mut t, reg::STATUS);
        assert_ne!(s & status::DEVICE_NEEDS_RESET, 0, "status {s:#x}");
        assert_ne!(rd(&mut t, reg::INTERRUPT_STATUS) & INT_CONFIG, 0);
        assert!(irq.read().is_ok());
        // More notifies do not raise it again.
        let generation = rd(&mut t, reg::CONFIG_GENERATION);
        wr(&mut t, reg::INTERRUPT_ACK, INT_CONFIG);
        wr(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(rd(&mut t, reg::CONFIG_GENERATION), generation);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS) & INT_CONFIG, 0);
        // The driver writes its status back without the bit: it stays.
        wr(&mut t, reg::STATUS, s & !status::DEVICE_NEEDS_RESET);
        assert_ne!(rd(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        // A reset clears it; brought up again with a sane ring, the device serves.
        mem.write_obj(0u16, GuestAddress(0x2002)).unwrap();
        bring_up(&mut t);
        assert_eq!(rd(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        mem.write_obj(0x8000u64, GuestAddress(0x1000)).unwrap();
        mem.write_obj(100u32, GuestAddress(0x1008)).unwrap();
        mem.write_obj(0u16, GuestAddress(0x2004)).unwrap();
        mem.write_obj(1u16, GuestAddress(0x2002)).unwrap();
        wr(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(mem.read_obj::<u16>(GuestAddress(0x3002)).unwrap(), 1);
    }

    #[test]
    fn identity_registers() {
        let (mut t, ..) = setup();
        assert_eq!(rd(&mut t, reg::MAGIC_VALUE), MMIO_MAGIC);
        assert_eq!(rd(&mut t, reg::VERSION), 2);
        assert_eq!(rd(&mut t, reg::DEVICE_ID), EchoDevice::DEVICE_TYPE);
        assert_eq!(rd(&mut t, reg::VENDOR_ID), MMIO_VENDOR_ID);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 1); // VERSION_1 is bit 32
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 5);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 0);
        assert_eq!(rd(&mut t, reg::SHM_LEN_LOW), u32::MAX);
        assert_eq!(
            t.get_ranges(),
            vec![(
                BusRange {
                    base: 0xd000_0000,
                    len: MMIO_WINDOW
                },
                BusType::Mmio
            )]
        );
    }

    #[test]
    fn a_driver_brings_the_device_up_and_it_serves_a_chain() {
        let (mut t, mem, log, irq) = setup();
        bring_up(&mut t);
        assert!(t.is_active());
        assert_eq!(
            log.events(),
            vec![
                EchoEvent::AckFeatures(0x1_0000_0001),
                EchoEvent::Activated { queues: 2 }
            ]
        );
        // One 100-byte readable descriptor at 0x8000, made available.
        mem.write_obj(0x8000u64, GuestAddress(0x1000)).unwrap();
        mem.write_obj(100u32, GuestAddress(0x1008)).unwrap();
        mem.write_obj(0u16, GuestAddress(0x100c)).unwrap();
        mem.write_obj(0u16, GuestAddress(0x2004)).unwrap(); // ring[0] = head 0
        mem.write_obj(1u16, GuestAddress(0x2002)).unwrap(); // avail idx
        wr(&mut t, reg::QUEUE_NOTIFY, 0);
        let used_idx: u16 = mem.read_obj(GuestAddress(0x3002)).unwrap();
        let used_len: u32 = mem.read_obj(GuestAddress(0x3008)).unwrap();
        assert_eq!((used_idx, used_len), (1, 100));
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_VRING);
        assert_eq!(irq.read().unwrap(), 1);
        wr(&mut t, reg::INTERRUPT_ACK, INT_VRING);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);
        // Queue registers are frozen while the device runs.
        wr(&mut t, reg::QUEUE_NUM, 4);
        wr(&mut t, reg::QUEUE_READY, 0);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 1);
        // Reset.
        wr(&mut t, reg::STATUS, 0);
        assert!(!t.is_active());
        assert_eq!(rd(&mut t, reg::STATUS), 0);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
        assert_eq!(log.events().last(), Some(&EchoEvent::Reset));
    }

    #[test]
    fn features_not_offered_keep_features_ok_clear() {
        let (mut t, ..) = setup();
        wr(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        wr(&mut t, reg::DRIVER_FEATURES, 0b110);
        wr(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(rd(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        // DRIVER_OK without FEATURES_OK does not activate.
        wr(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert!(!t.is_active());
        assert_ne!(rd(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn invalid_queue_refuses_activation() {
        let (mut t, ..) = setup();
        wr(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        wr(&mut t, reg::DRIVER_FEATURES, 1);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        wr(&mut t, reg::STATUS, s);
        wr(&mut t, reg::QUEUE_SEL, 0);
        wr(&mut t, reg::QUEUE_NUM, 8);
        wr(&mut t, reg::QUEUE_DESC_LOW, 0xfff0_0000); // outside guest memory
        wr(&mut t, reg::QUEUE_READY, 1);
        wr(&mut t, reg::STATUS, s | status::DRIVER_OK);
        assert!(!t.is_active());
        assert_eq!(rd(&mut t, reg::STATUS) & status::DRIVER_OK, 0);
        // Out-of-range queue selectors read as absent.
        wr(&mut t, reg::QUEUE_SEL, 9);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 0);
    }

    #[test]
    fn odd_accesses_are_ignored_and_config_is_byte_addressable() {
        let (mut t, ..) = setup();
        let info = |offset| BusAccessInfo {
            offset,
            address: 0,
            id: 0,
        };
        let mut two = [9u8; 2];
        t.read(info(reg::MAGIC_VALUE), &mut two);
        assert_eq!(two, [0, 0]);
        t.write(info(reg::STATUS), &[1, 0]);
        assert_eq!(rd(&mut t, reg::STATUS), 0);
        let mut b = [0u8; 1];
        t.read(info(reg::CONFIG + 3), &mut b);
        assert_eq!(&b, b"b");
        t.write(info(reg::CONFIG), b"O");
        let mut all = [0u8; 8];
        t.read(info(reg::CONFIG), &mut all);
        assert_eq!(&all, b"Outboard");
        let mut far = [7u8; 4];
        t.read(info(MMIO_WINDOW + 4), &mut far);
        assert_eq!(far, [0; 4]);
        assert_eq!(rd(&mut t, 0x0f8), 0); // unknown register
    }

    /// One 100-byte readable chain at descriptor `id` made available as entry `idx`.
    fn offer_chain(mem: &Mem, id: u16, idx: u16) {
        let d = 0x1000 + 16 * u64::from(id);
        mem.write_obj(0x8000u64, GuestAddress(d)).unwrap();
        mem.write_obj(100u32, GuestAddress(d + 8)).unwrap();
        mem.write_obj(0u16, GuestAddress(d + 12)).unwrap();
        mem.write_obj(id, GuestAddress(0x2004 + 2 * u64::from(idx % 8)))
            .unwrap();
        mem.write_obj(idx.wrapping_add(1), GuestAddress(0x2002))
            .unwrap();
    }

    fn stateful(mem: &Mem, config: &[u8]) -> MmioTransport<EchoDevice, Mem> {
        let dev = EchoDevice::new(&[16, 16])
            .with_features(VIRTIO_F_VERSION_1 | 1)
            .with_config(config)
            .with_state();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        MmioTransport::new(dev, mem.clone(), 0xd000_0000, irq)
    }

    /// A snapshot carries the registers, the device's state and the ring indices; a
    /// transport restored from it (another device, same memory) goes on where the first
    /// one stopped: its next used entry is the second, not the first again.
    #[test]
    fn a_restored_transport_goes_on_at_the_saved_ring_indices() {
        let (_, mem, ..) = setup();
        let mut t = stateful(&mem, b"outboard");
        bring_up(&mut t);
        t.write(
            BusAccessInfo {
                offset: reg::CONFIG,
                address: 0,
                id: 0,
            },
            b"O",
        );
        offer_chain(&mem, 0, 0);
        wr(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(mem.read_obj::<u16>(GuestAddress(0x3002)).unwrap(), 1);
        wr(&mut t, reg::QUEUE_SEL, 1);
        let snap = t.save().unwrap();
        assert!(snap.active);
        assert_eq!(snap.device, b"Outboard");
        assert_eq!(snap.queue_sel, 1);
        assert_eq!(snap.driver_features, 0x1_0000_0001);
        assert_eq!(snap.interrupt_status, INT_VRING);
        assert_eq!(
            (snap.queues[0].next_avail, snap.queues[0].next_used),
            (1, 1)
        );
        assert_eq!(
            (
                snap.queues[0].size,
                snap.queues[0].desc_table,
                snap.queues[0].used_ring
            ),
            (8, 0x1000, 0x3000)
        );
        assert!(!snap.queues[1].ready);

        let mut t2 = stateful(&mem, b"xxxxxxxx");
        let log2 = t2.device().log();
        t2.load(&snap).unwrap();
        assert!(t2.is_active());
        assert_eq!(
            log2.events(),
            vec![
                EchoEvent::AckFeatures(0x1_0000_0001),
                EchoEvent::Activated { queues: 2 }
            ]
        );
        assert_eq!(rd(&mut t2, reg::STATUS), snap.status);
        assert_eq!(rd(&mut t2, reg::INTERRUPT_STATUS), INT_VRING);
        assert_eq!(
            rd(&mut t2, reg::QUEUE_READY),
            0,
            "queue 1 selected, not ready"
        );
        let mut cfg = [0u8; 8];
        t2.read(
            BusAccessInfo {
                offset: reg::CONFIG,
                address: 0,
                id: 0,
            },
            &mut cfg,
        );
        assert_eq!(&cfg, b"Outboard");
        offer_chain(&mem, 1, 1);
        wr(&mut t2, reg::QUEUE_NOTIFY, 0);
        assert_eq!(mem.read_obj::<u16>(GuestAddress(0x3002)).unwrap(), 2);
        // The second used entry (at 0x3004 + 8) is descriptor 1's.
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x300c)).unwrap(), 1);
        assert_eq!(t2.save().unwrap().queues[0].next_used, 2);
    }

    #[test]
    fn a_restore_refuses_what_does_not_match_and_leaves_the_transport_reset() {
        let (_, mem, ..) = setup();
        let mut t = stateful(&mem, b"outboard");
        bring_up(&mut t);
        let snap = t.save().unwrap();
        let mut t2 = stateful(&mem, b"outboard");
        let cases: Vec<(MmioSnapshot, &str)> = vec![
            (
                MmioSnapshot {
                    version: 2,
                    ..snap.clone()
                },
                "snapshot version 2 is not supported",
            ),
            (
                MmioSnapshot {
                    device_type: 19,
                    ..snap.clone()
                },
                "device type 19, this device is type 42",
            ),
            (
                MmioSnapshot {
                    queues: snap.queues[..1].to_vec(),
                    ..snap.clone()
                },
                "1 queues, the device 2",
            ),
            (
                MmioSnapshot {
                    driver_features: 1 << 40,
                    ..snap.clone()
                },
                "include 0x10000000000",
            ),
            (
                MmioSnapshot {
                    device: b"short".to_vec(),
                    ..snap.clone()
                },
                "echo state of 5 bytes",
            ),
            (
                MmioSnapshot {
                    queues: vec![
                        MmioQueueSnapshot {
                            size: 3,
                            ..snap.queues[0]
                        };
                        2
                    ],
                    ..snap.clone()
                },
                "queue 0: size 3",
            ),
            (
                MmioSnapshot {
                    queues: vec![
                        MmioQueueSnapshot {
                            desc_table: 0xfff0_0000,
                            ..snap.queues[0]
                        };
                        2
                    ],
                    ..snap.clone()
                },
                "cannot be activated again",
            ),
        ];
        for (bad, want) in cases {
            let err = t2.load(&bad).unwrap_err();
            assert!(err.to_string().contains(want), "{err} lacks {want:?}");
            assert!(!t2.is_active());
            assert_eq!(rd(&mut t2, reg::STATUS), 0);
        }
        t2.load(&snap).unwrap();
        assert!(t2.is_active());
    }

    #[test]
    fn a_device_without_state_cannot_be_snapshotted() {
        let (mut t, ..) = setup();
        bring_up(&mut t);
        let err = t.save().unwrap_err();
        assert!(matches!(err, SuspendError::Unsupported { .. }), "{err}");
    }

    /// Notifies that come while asleep run at wake, not before.
    #[test]
    fn sleep_holds_notifies_until_wake() {
        let (mut t, mem, ..) = setup();
        bring_up(&mut t);
        t.sleep().unwrap();
        offer_chain(&mem, 0, 0);
        wr(&mut t, reg::QUEUE_NOTIFY, 0);
        wr(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(mem.read_obj::<u16>(GuestAddress(0x3002)).unwrap(), 0);
        t.wake().unwrap();
        assert_eq!(mem.read_obj::<u16>(GuestAddress(0x3002)).unwrap(), 1);
    }

    #[cfg(feature = "serde")]
    #[test]
    fn suspendable_snapshot_round_trips_through_json() {
        let (_, mem, ..) = setup();
        let mut t = stateful(&mem, b"outboard");
        bring_up(&mut t);
        let value = t.snapshot().unwrap();
        assert_eq!(value["version"], 1);
        let mut t2 = stateful(&mem, b"outboard");
        t2.restore(value.clone()).unwrap();
        assert!(t2.is_active());
        let err = t2.restore(serde_json::json!({"version": 1})).unwrap_err();
        assert!(
            err.to_string().contains("not a virtio-mmio snapshot"),
            "{err}"
        );
    }
}
