//! [`DeviceBackend`]: any Outboard [`VirtioDevice`] as a vhost-user back-end.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use outboard_devices::virtio::{VirtQueue, VirtioDevice, VIRTIO_RING_F_EVENT_IDX};
use outboard_protocol::vhost_user::{
    TransferDirection, TransferPhase, VhostUserMemoryRegion, VhostUserProtocolFeatures,
    VhostUserShmemConfig, VhostUserVirtioFeatures, VhostUserVringAddr,
};
use outboard_transport::{
    BackendReqSender, HandlerResult, MemoryRegion, VhostUserBackendReqHandler,
};
use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

mod handover;

use super::dirty_log::{DirtyPageLog, LogArea};
use super::guard;
use super::memory::{MemoryTable, MAX_MEM_SLOTS};
use super::ring::{Mem, RingInterrupt, SharedQueue, Slot};
use crate::rust_vmm::{RingHealth, RustVmmQueue};
use outboard_protocol::vhost_user;

/// The bound on each send and reply wait on the back-end -> front-end channel.
///
/// The worker thread that waits also answers the front-end, so it waits briefly: the
/// media device posts its maps and unmaps instead of waiting
/// ([`BackendReqSender::post_shmem_map`]), and a reply that comes after this is read and dropped
/// before the next one (see [`BackendReqSender::set_timeout`]). The Linux virtio-media driver
/// gives up on a command after 5 s.
pub const BACKEND_CHANNEL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Largest config space read or written through `GET_CONFIG`/`SET_CONFIG`.
pub const MAX_CONFIG_SIZE: u32 = 256;

/// The protocol features the daemon offers for every device: `MQ`, `REPLY_ACK`,
/// `BACKEND_REQ`, `RESET_DEVICE`, `CONFIGURE_MEM_SLOTS`. A [`DeviceBackend`] adds
/// `CONFIG` for a device with a config space
/// ([`VirtioDevice::config_size`]
/// not 0) and what [`DeviceBackend::with_protocol_features`] asks for, and drops what
/// [`DeviceBackend::without_protocol_features`] removes
/// ([`DeviceBackend::protocol_features`] is the result). `LOG_SHMFD` (live migration's
/// dirty page log, with `VHOST_F_LOG_ALL` among the virtio features) is added for a
/// device whose writes all go into the chains it returns
/// ([`VirtioDevice::writes_only_to_used_chains`]).
pub fn offered_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

/// A slot for the back-end -> front-end channel, shared with a device that sends its
/// own requests on it (for example `SHMEM_MAP`): [`DeviceBackend::with_channel`] fills
/// it on `SET_BACKEND_REQ_FD` and empties it when the front-end goes away.
pub type ChannelSlot = Arc<Mutex<Option<BackendReqSender>>>;

/// Makes reads and writes on `file` non-blocking, so that an fd from the front-end that
/// is not the eventfd it should be (a pipe nobody drains) cannot stall the worker.
fn set_nonblocking(file: &File) {
    if let Ok(flags) = fcntl_getfl(file) {
        let _ = fcntl_setfl(file, flags | OFlags::NONBLOCK);
    }
}

/// Refuses a ring fd that is not an anonymous-inode fd (an eventfd, as the protocol
/// requires). A pipe or socket in its place would make the worker's writes raise
/// SIGPIPE once the front-end closes the other end, which kills an embedding process
/// that does not ignore it; a regular file would take the writes. `fstat` rather than
/// `/proc` so the check works in an empty jail root: eventfds are anonymous inodes,
/// whose mode has no file-type bits.
fn check_eventfd(file: &File, what: &str, index: u32) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mode = file.metadata()?.mode();
    if mode & libc::S_IFMT != 0 {
        let kind = match mode & libc::S_IFMT {
            libc::S_IFIFO => "a pipe",
            libc::S_IFSOCK => "a socket",
            libc::S_IFREG => "a regular file",
            libc::S_IFCHR => "a character device",
            _ => "not an eventfd",
        };
        return Err(einval(format!(
            "ring {index}: the {what} fd is {kind}, not an eventfd"
        )));
    }
    Ok(())
}

fn einval(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// One ring as the front-end configured it.
#[derive(Debug, Default)]
struct Ring {
    num: u16,
    addr: Option<VhostUserVringAddr>,
    base: u16,
    kick: Option<File>,
    /// `SET_VRING_ERR`: signalled when the ring breaks.
    err: Option<File>,
    started: bool,
    enabled: bool,
    /// The index and addresses the ring had when it was last stopped, to tell a
    /// pause/resume (same values) from a driver reset (anything else).
    stopped_at: Option<(u16, [u64; 3])>,
}

impl Ring {
    /// Where used-ring writes are logged: `log_guest_addr` when `VHOST_VRING_F_LOG` is
    /// set.
    fn used_log(&self) -> Option<u64> {
        self.addr
            .filter(|a| a.flags & vhost_user::VhostUserVringAddrFlags::LOG.bits() != 0)
            .map(|a| a.log)
    }

    fn addresses(&self) -> [u64; 3] {
        self.addr
            .map(|a| [a.descriptor, a.available, a.used])
            .unwrap_or_default()
    }
}

/// A virtio device served over vhost-user (see the [module docs](super)).
///
/// The worker thread owns it (through `outboard_transport::BackendReqHandler` while a
/// front-end is connected) and calls [`DeviceBackend::handle_kick`] and
/// [`DeviceBackend::handle_device_event`] when the epoll set says so.
pub struct DeviceBackend<D: VirtioDevice> {
    device: D,
    mem: Mem,
    table: MemoryTable,
    rings: Vec<Ring>,
    slots: Vec<Slot>,
    irq: Arc<RingInterrupt>,
    epoll: Arc<Epoll>,
    acked_features: u64,
    protocol: VhostUserProtocolFeatures,
    active: bool,
    max_queue_size: u16,
    /// Offered on top of [`offered_protocol_features`].
    extra_protocol: VhostUserProtocolFeatures,
    /// Never offered ([`DeviceBackend::without_protocol_features`]).
    removed_protocol: VhostUserProtocolFeatures,
    /// `GET_SHMEM_CONFIG` answers (by shmid); empty: the request is not supported.
    shmem_sizes: Vec<u64>,
    channel: Option<ChannelSlot>,
    /// The dirty page log the queues mark while the VM migrates.
    dirty: Arc<DirtyPageLog>,
    /// `SET_LOG_FD`: kept for the session, never signalled (the spec makes it optional:
    /// the front-end reads the log when it synchronizes).
    log_fd: Option<File>,
    /// Rings whose queue found them inconsistent, for [`DeviceBackend::stop_broken_rings`].
    health: Arc<RingHealth>,
    broken_rings: u64,
    /// [`guard::poison_events`] when this backend last looked.
    poison_seen: u64,
    /// Why the front-end must be dropped (its memory was cut short under the device).
    fatal: Option<String>,
    /// Set up from a handover record and active there: [`DeviceBackend::start_loaded`]
    /// starts the rings.
    loaded_active: bool,
    /// `SET_DEVICE_STATE_FD` / `CHECK_DEVICE_STATE` in progress.
    state_transfer: super::state::StateTransfer,
}

impl<D: VirtioDevice> std::fmt::Debug for DeviceBackend<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceBackend")
            .field("device_type", &self.device.device_type())
            .field("regions", &self.table.len())
            .field("active", &self.active)
            .finish()
    }
}

/// Epoll data of ring `i`'s kick fd is `i`; the worker uses values above
/// [`KICK_TOKEN_LIMIT`] for its own fds.
pub const KICK_TOKEN_LIMIT: u64 = 1 << 16;

impl<D: VirtioDevice> DeviceBackend<D> {
    /// Serves `device`, accepting rings of up to `max_queue_size` entries; kick fds are
    /// added to `epoll` with their ring index as data.
    pub fn new(device: D, max_queue_size: u16, epoll: Arc<Epoll>) -> Self {
        let n = device.queue_max_sizes().len();
        DeviceBackend {
            device,
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            table: MemoryTable::new(),
            rings: (0..n).map(|_| Ring::default()).collect(),
            slots: (0..n).map(|_| Slot::default()).collect(),
            irq: Arc::new(RingInterrupt::new(n)),
            epoll,
            acked_features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            active: false,
            max_queue_size,
            extra_protocol: VhostUserProtocolFeatures::empty(),
            removed_protocol: VhostUserProtocolFeatures::empty(),
            shmem_sizes: Vec::new(),
            channel: None,
            dirty: Arc::new(DirtyPageLog::new()),
            log_fd: None,
            health: Arc::new(RingHealth::new()),
            broken_rings: 0,
            poison_seen: guard::poison_events(),
            fatal: None,
            loaded_active: false,
            state_transfer: Default::default(),
        }
    }

    /// Also offers `features` (for example `SHMEM` and `BACKEND_SEND_FD` for a device
    /// with shared memory); undoes [`DeviceBackend::without_protocol_features`] for them.
    pub fn with_protocol_features(mut self, features: VhostUserProtocolFeatures) -> Self {
        self.extra_protocol |= features;
        self.removed_protocol -= features;
        self
    }

    /// Never offers `features`, even those the daemon offers for every device (for
    /// example `BACKEND_REQ` for a device that never signals the front-end through the
    /// back-end channel, for a front-end that cannot set one up); undoes
    /// [`DeviceBackend::with_protocol_features`] for them.
    pub fn without_protocol_features(mut self, features: VhostUserProtocolFeatures) -> Self {
        self.removed_protocol |= features;
        self.extra_protocol -= features;
        self
    }

    /// The protocol features offered to the front-end (`GET_PROTOCOL_FEATURES`):
    /// [`offered_protocol_features`], `CONFIG` when the device has a config space,
    /// plus [`DeviceBackend::with_protocol_features`], minus
    /// [`DeviceBackend::without_protocol_features`].
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let mut features = offered_protocol_features() | self.extra_protocol;
        if self.device.writes_only_to_used_chains() {
            features |= VhostUserProtocolFeatures::LOG_SHMFD;
        }
        if self.device.config_size() > 0 {
            features |= VhostUserProtocolFeatures::CONFIG;
        }
        if self.device.supports_state() {
            features |= VhostUserProtocolFeatures::DEVICE_STATE;
        }
        features - self.removed_protocol
    }

    /// Whether the dirty page log is offered: `LOG_SHMFD` is among
    /// [`DeviceBackend::protocol_features`] (then `VHOST_F_LOG_ALL` is among the virtio
    /// features too, which QEMU needs to allow migration).
    fn logs_dirty_pages(&self) -> bool {
        self.protocol_features()
            .contains(VhostUserProtocolFeatures::LOG_SHMFD)
    }

    /// The dirty page log, shared with the queues: for a look at
    /// [`DirtyPageLog::pages_outside`].
    pub fn dirty_log(&self) -> &Arc<DirtyPageLog> {
        &self.dirty
    }

    /// Answers `GET_SHMEM_CONFIG` with these region sizes, indexed by shmid (sizes past
    /// the protocol's 256 regions are dropped). Without it the request is refused.
    pub fn with_shmem_regions(mut self, sizes: Vec<u64>) -> Self {
        self.shmem_sizes = sizes;
        self
    }

    /// Shares the back-end channel with the device through `slot` (see
    /// [`ChannelSlot`]).
    pub fn with_channel(mut self, slot: ChannelSlot) -> Self {
        self.channel = Some(slot);
        self
    }

    fn channel_slot(&self) -> Option<std::sync::MutexGuard<'_, Option<BackendReqSender>>> {
        self.channel
            .as_ref()
            .map(|c| c.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Resets everything and returns the device.
    pub fn into_device(mut self) -> D {
        self.disconnect();
        self.device
    }

    /// The guest memory as the front-end's memory table maps it (clones share updates),
    /// for devices that are handed guest addresses outside their queues.
    pub fn memory(&self) -> &Mem {
        &self.mem
    }

    /// Whether the device has been activated (a ring started since the last reset).
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Ring `index`'s kick fd reported: let the device work.
    ///
    /// Kick fds are edge-triggered in the epoll set, so they are never read: every write
    /// to an eventfd reports again whatever its counter holds, and the counter (at most
    /// one increment per front-end kick) cannot reach its 2^64 - 2 limit. That saves
    /// a read(2) per kick.
    pub fn handle_kick(&mut self, index: usize) {
        if index >= self.rings.len() {
            return;
        }
        if self.active && self.ring_live(index) {
            self.device.handle_queue(index);
            self.after_work();
        }
    }

    /// After the device ran: stops broken rings, and notices guest memory that was cut
    /// short under it.
    fn after_work(&mut self) {
        self.stop_broken_rings();
        let events = guard::poison_events();
        if events != self.poison_seen {
            self.poison_seen = events;
            if self.fatal.is_none() {
                self.fatal = self.table.poisoned();
            }
            if self.fatal.is_none() && self.dirty.poisoned() {
                self.fatal =
                    Some("the dirty log (SET_LOG_BASE) was cut short by the front-end".to_string());
            }
        }
    }

    /// Why the front-end must be dropped now, if it must: an access of the device found
    /// its guest memory cut short (the front-end truncated a memory file after handing
    /// it over). The worker then ends the session, which resets the device and unmaps
    /// the memory; the daemon and its other devices are unaffected (see
    /// [`super::guard`]).
    pub fn take_fatal(&mut self) -> Option<String> {
        self.fatal.take()
    }

    /// How many times a ring was stopped because it was broken (an available index
    /// more than the ring size ahead, a ring outside guest memory), and reported on its
    /// `SET_VRING_ERR` eventfd.
    pub fn broken_rings(&self) -> u64 {
        self.broken_rings
    }

    /// Stops every ring whose queue found it broken (an available index more than the
    /// ring size ahead, a ring outside guest memory: see [`crate::rust_vmm`]) and tells
    /// the front-end through the ring's `SET_VRING_ERR` eventfd. The ring stays stopped
    /// until the front-end starts it again (`SET_VRING_KICK`, as after a reset); the
    /// device and its other rings keep running. One log line per broken ring start.
    fn stop_broken_rings(&mut self) {
        if !self.health.has_news() {
            return;
        }
        for (index, reason) in self.health.take() {
            if index >= self.rings.len() {
                continue;
            }
            self.broken_rings += 1;
            let base = self.stop(index);
            let told = match self.rings[index].err.as_mut() {
                Some(f) => match f.write(&1u64.to_ne_bytes()) {
                    Ok(_) => "the front-end was told through its error eventfd",
                    Err(_) => "its error eventfd could not be written",
                },
                None => "the front-end gave no error eventfd",
            };
            outboard_protocol::log_limited!(
                log::Level::Error,
                "ring {index} is broken and stopped at index {base} until the front-end \
                 restarts it ({told}): {reason}"
            );
        }
    }

    /// The interrupt handed to the device (call eventfds, back-end channel).
    pub fn interrupt(&self) -> Arc<RingInterrupt> {
        self.irq.clone()
    }

    /// The device's own event fd is readable.
    pub fn handle_device_event(&mut self) {
        self.device.handle_event();
        self.after_work();
    }

    /// The front-end went away: reset the device and forget everything it set up.
    pub fn disconnect(&mut self) {
        self.reset_all();
        self.table.clear();
        self.publish_memory();
        self.acked_features = 0;
        self.protocol = VhostUserProtocolFeatures::empty();
        self.dirty.clear();
        self.log_fd = None;
        self.irq.clear();
        if let Some(mut slot) = self.channel_slot() {
            *slot = None;
        }
        self.state_transfer = Default::default();
    }

    fn ring_live(&self, index: usize) -> bool {
        self.slots.get(index).is_some_and(|s| {
            s.lock()
                .map(|g| g.is_some())
                .unwrap_or_else(|p| p.into_inner().is_some())
        })
    }

    fn take_queue(&self, index: usize) -> Option<RustVmmQueue<Mem>> {
        let slot = self.slots.get(index)?;
        let mut guard = slot.lock().unwrap_or_else(|p| p.into_inner());
        guard.take()
    }

    fn set_kick(&mut self, index: usize, fd: Option<File>) -> io::Result<()> {
        let Some(ring) = self.rings.get_mut(index) else {
            return Err(einval(format!("ring {index} does not exist")));
        };
        if let Some(old) = ring.kick.take() {
            // Removing an fd that was never added (or is gone) is harmless.
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                old.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        if let Some(f) = fd {
            self.epoll.ctl(
                ControlOperation::Add,
                f.as_raw_fd(),
                // Edge-triggered: see `handle_kick`.
                EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, index as u64),
            )?;
            ring.kick = Some(f);
        }
        Ok(())
    }

    /// Stops every ring, resets the device, forgets the rings' configuration.
    fn reset_all(&mut self) {
        for i in 0..self.rings.len() {
            drop(self.take_queue(i));
            let _ = self.set_kick(i, None);
            self.irq.set_call(i, None);
            self.rings[i] = Ring::default();
        }
        if self.active {
            self.device.reset();
            self.active = false;
        }
    }

    fn publish_memory(&mut self) {
        let new = self.table.guest_memory();
        match self.mem.lock() {
            Ok(guard) => guard.replace(new),
            Err(p) => p.into_inner().replace(new),
        }
        // The previous snapshot may have been the last user of retired regions.
        self.table.reap();
    }

    fn gpa(&self, vva: u64, len: u64, what: &str, index: usize) -> io::Result<u64> {
        self.table.vva_to_gpa(vva, len).ok_or_else(|| {
            einval(format!(
                "ring {index}: {what} at front-end address {vva:#x} (+{len:#x}) is not in guest memory"
            ))
        })
    }

    /// Starts ring `index` if it has a kick fd and is enabled; activates the device on
    /// the first ring.
    fn try_start(&mut self, index: usize) -> io::Result<()> {
        let ring = &self.rings[index];
        if !(ring.started && ring.enabled) || self.ring_live(index) {
            return Ok(());
        }
        let num = ring.num;
        if num == 0 {
            return Err(einval(format!(
                "ring {index} started without SET_VRING_NUM"
            )));
        }
        let addr = ring
            .addr
            .ok_or_else(|| einval(format!("ring {index} started without SET_VRING_ADDR")))?;
        let n = u64::from(num);
        let desc = self.gpa(addr.descriptor, 16 * n, "descriptor table", index)?;
        let avail = self.gpa(addr.available, 6 + 2 * n, "available ring", index)?;
        if avail == 0 {
            // virtio-queue takes an available ring at 0 for an unconfigured queue.
            return Err(einval(format!(
                "ring {index}: an available ring at guest address 0 is not supported"
            )));
        }
        let used = self.gpa(addr.used, 6 + 8 * n, "used ring", index)?;

        // A ring that comes back with another index or other addresses than it had
        // when it stopped belongs to a reset driver: the device must forget its state.
        let reset = self.active
            && (0..self.rings.len()).all(|i| !self.ring_live(i))
            && self
                .rings
                .iter()
                .any(|r| r.started && r.stopped_at.is_some_and(|s| s != (r.base, r.addresses())));
        if reset {
            outboard_protocol::log_limited!(
                log::Level::Info,
                "rings restarted with new state: resetting the device"
            );
            self.device.reset();
            self.active = false;
        }

        let bad = |e: virtio_queue::Error| einval(format!("ring {index}: {e}"));
        let mut q = Queue::new(self.max_queue_size).map_err(bad)?;
        q.try_set_size(num).map_err(bad)?;
        q.try_set_desc_table_address(GuestAddress(desc))
            .map_err(bad)?;
        q.try_set_avail_ring_address(GuestAddress(avail))
            .map_err(bad)?;
        q.try_set_used_ring_address(GuestAddress(used))
            .map_err(bad)?;
        let base = self.rings[index].base;
        q.set_next_avail(base);
        q.set_next_used(base);
        q.set_event_idx(self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0);
        q.set_ready(true);
        if !q.is_valid(&*self.mem.memory()) {
            return Err(einval(format!(
                "ring {index}: size {num} at {desc:#x}/{avail:#x}/{used:#x} is not valid in guest memory"
            )));
        }
        if let Some(slot) = self.slots.get(index) {
            let mut queue =
                RustVmmQueue::new(q, self.mem.clone()).with_health(self.health.clone(), index);
            if self.logs_dirty_pages() {
                queue = queue.with_dirty_log(self.dirty.clone(), self.rings[index].used_log());
            }
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(queue);
        }
        self.rings[index].stopped_at = None;
        if !self.active {
            let queues: Vec<Box<dyn VirtQueue>> = self
                .slots
                .iter()
                .map(|s| Box::new(SharedQueue::new(s.clone())) as Box<dyn VirtQueue>)
                .collect();
            self.device
                .activate(queues, self.irq.clone())
                .map_err(|e| io::Error::other(format!("cannot activate the device: {e}")))?;
            self.active = true;
            outboard_protocol::log_limited!(log::Level::Info, "device activated");
        }
        self.device.handle_queue(index);
        self.after_work();
        Ok(())
    }

    /// Stops ring `index`; returns its next available index.
    fn stop(&mut self, index: usize) -> u16 {
        let ring_base = match self.take_queue(index) {
            Some(q) => q.queue().next_avail(),
            None => self.rings[index].base,
        };
        let _ = self.set_kick(index, None);
        let ring = &mut self.rings[index];
        ring.base = ring_base;
        if ring.started {
            ring.stopped_at = Some((ring_base, ring.addresses()));
        }
        ring.started = false;
        ring_base
    }

    fn index(&self, index: u32) -> io::Result<usize> {
        let i = index as usize;
        if i < self.rings.len() {
            Ok(i)
        } else {
            Err(einval(format!("ring {index} does not exist")))
        }
    }
}

impl<D: VirtioDevice> VhostUserBackendReqHandler for DeviceBackend<D> {
    fn max_queues(&self) -> u32 {
        self.rings.len() as u32
    }

    fn get_features(&mut self) -> HandlerResult<u64> {
        let mut features =
            self.device.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.logs_dirty_pages() {
            features |= VhostUserVirtioFeatures::LOG_ALL.bits();
        }
        Ok(features)
    }

    fn set_features(&mut self, features: u64) -> HandlerResult<()> {
        let log_all = VhostUserVirtioFeatures::LOG_ALL.bits();
        if (self.acked_features ^ features) & log_all != 0 {
            outboard_protocol::log_limited!(
                log::Level::Info,
                "dirty log: logging {}",
                if features & log_all != 0 { "on" } else { "off" }
            );
        }
        self.acked_features = features;
        // Offered only with LOG_SHMFD, and the server checks that acks are offered.
        self.dirty.set_enabled(features & log_all != 0);
        let transport = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() | log_all;
        self.device.ack_features(features & !transport);
        let event_idx = features & VIRTIO_RING_F_EVENT_IDX != 0;
        for slot in &self.slots {
            if let Some(q) = slot.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                q.queue_mut().set_event_idx(event_idx);
            }
        }
        Ok(())
    }

    fn get_protocol_features(&mut self) -> HandlerResult<VhostUserProtocolFeatures> {
        Ok(self.protocol_features())
    }

    fn set_protocol_features(&mut self, features: VhostUserProtocolFeatures) -> HandlerResult<()> {
        self.protocol = features;
        if let Some(ch) = self.channel_slot().as_ref().and_then(|s| s.as_ref()) {
            ch.set_protocol_features(features);
        }
        Ok(())
    }

    fn reset_owner(&mut self) -> HandlerResult<()> {
        self.reset_all();
        Ok(())
    }

    fn set_mem_table(&mut self, regions: Vec<MemoryRegion>) -> HandlerResult<()> {
        self.table
            .replace(regions)
            .map_err(|e| einval(e.to_string()))?;
        self.publish_memory();
        outboard_protocol::log_limited!(
            log::Level::Debug,
            "memory table: {} regions",
            self.table.len()
        );
        Ok(())
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> HandlerResult<()> {
        let i = self.index(index)?;
        if num > u32::from(self.max_queue_size) {
            return Err(einval(format!(
                "ring {index}: size {num} exceeds the queue size limit {}",
                self.max_queue_size
            )));
        }
        // The server checked 1..=32768; the limit above keeps it in u16.
        self.rings[i].num = u16::try_from(num).map_err(|_| einval(format!("ring size {num}")))?;
        Ok(())
    }

    fn set_vring_addr(&mut self, addr: &VhostUserVringAddr) -> HandlerResult<()> {
        let i = self.index(addr.index)?;
        self.rings[i].addr = Some(*addr);
        // A front-end starting or ending a migration sends the running rings' addresses
        // again with VHOST_VRING_F_LOG set or cleared.
        let used_log = self.rings[i].used_log();
        if let Some(slot) = self.slots.get(i) {
            if let Some(q) = slot.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                q.set_used_log(used_log);
            }
        }
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> HandlerResult<()> {
        let i = self.index(index)?;
        // Split rings: the index is 16 bits; packed rings (not offered) would use more.
        self.rings[i].base = u16::try_from(base)
            .map_err(|_| einval(format!("ring {index}: base {base} exceeds 16 bits")))?;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> HandlerResult<u32> {
        let i = self.index(index)?;
        Ok(u32::from(self.stop(i)))
    }

    fn set_vring_kick(&mut self, index: u32, fd: Option<OwnedFd>) -> HandlerResult<()> {
        let i = self.index(index)?;
        let Some(fd) = fd else {
            return Err(einval(format!(
                "ring {index}: polling rings without a kick fd is not supported"
            )));
        };
        let file = File::from(fd);
        check_eventfd(&file, "kick", index)?;
        set_nonblocking(&file);
        self.set_kick(i, Some(file))?;
        let ring = &mut self.rings[i];
        ring.started = true;
        if !self.acked_features_have_protocol() {
            self.rings[i].enabled = true;
        }
        self.try_start(i)
    }

    fn set_vring_call(&mut self, index: u32, fd: Option<OwnedFd>) -> HandlerResult<()> {
        let i = self.index(index)?;
        let file = fd.map(File::from);
        if let Some(f) = &file {
            check_eventfd(f, "call", index)?;
            // Never block on an fd the front-end may not drain.
            set_nonblocking(f);
        }
        self.irq.set_call(i, file);
        Ok(())
    }

    fn set_vring_err(&mut self, index: u32, fd: Option<OwnedFd>) -> HandlerResult<()> {
        let i = self.index(index)?;
        let file = fd.map(File::from);
        if let Some(f) = &file {
            check_eventfd(f, "error", index)?;
            // Never block on an fd the front-end may not drain.
            set_nonblocking(f);
        }
        self.rings[i].err = file;
        Ok(())
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> HandlerResult<()> {
        let i = self.index(index)?;
        self.rings[i].enabled = enable;
        if enable {
            self.try_start(i)
        } else {
            if let Some(q) = self.take_queue(i) {
                self.rings[i].base = q.queue().next_avail();
            }
            Ok(())
        }
    }

    fn get_config(&mut self, offset: u32, size: u32, _flags: u32) -> HandlerResult<Vec<u8>> {
        let end = offset.checked_add(size).filter(|e| *e <= MAX_CONFIG_SIZE);
        if end.is_none() {
            return Err(einval(format!(
                "config read of {size} bytes at {offset} exceeds {MAX_CONFIG_SIZE}"
            )));
        }
        let mut data = vec![0u8; size as usize];
        self.device.read_config(u64::from(offset), &mut data);
        Ok(data)
    }

    fn set_config(&mut self, offset: u32, data: &[u8], _flags: u32) -> HandlerResult<()> {
        let fits = u32::try_from(data.len())
            .ok()
            .and_then(|l| offset.checked_add(l))
            .is_some_and(|e| e <= MAX_CONFIG_SIZE);
        if !fits {
            return Err(einval(format!(
                "config write of {} bytes at {offset} exceeds {MAX_CONFIG_SIZE}",
                data.len()
            )));
        }
        self.device.write_config(u64::from(offset), data);
        Ok(())
    }

    fn set_backend_req_fd(&mut self, backend: BackendReqSender) -> HandlerResult<()> {
        // The worker sends on this channel (config changes, the media device's
        // SHMEM_MAP): a front-end that stalls there may hold it this long, no more.
        backend
            .set_timeout(Some(BACKEND_CHANNEL_TIMEOUT))
            .map_err(|e| io::Error::other(format!("back-end channel: {e}")))?;
        if let Some(mut slot) = self.channel_slot() {
            *slot = Some(backend.clone());
        }
        self.irq.set_channel(Some(backend));
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> HandlerResult<u64> {
        Ok(MAX_MEM_SLOTS as u64)
    }

    fn add_mem_region(&mut self, region: MemoryRegion) -> HandlerResult<()> {
        self.table.add(region).map_err(|e| einval(e.to_string()))?;
        self.publish_memory();
        Ok(())
    }

    fn remove_mem_region(&mut self, region: &VhostUserMemoryRegion) -> HandlerResult<()> {
        self.table
            .remove(region)
            .map_err(|e| einval(e.to_string()))?;
        self.publish_memory();
        Ok(())
    }

    fn reset_device(&mut self) -> HandlerResult<()> {
        self.reset_all();
        self.acked_features = 0;
        self.dirty.set_enabled(false);
        Ok(())
    }

    fn set_log_base(&mut self, log: &vhost_user::VhostUserLog, fd: OwnedFd) -> HandlerResult<()> {
        let area = LogArea::map(log, fd).map_err(|e| einval(e.to_string()))?;
        outboard_protocol::log_limited!(
            log::Level::Info,
            "dirty log: {:#x} bytes, covering guest addresses below {:#x}",
            area.size(),
            area.size().saturating_mul(8 * vhost_user::LOG_PAGE_SIZE)
        );
        self.dirty.set_area(Some(area));
        Ok(())
    }

    fn set_log_fd(&mut self, fd: OwnedFd) -> HandlerResult<()> {
        // Never written, so whatever fd it is cannot block or signal the worker.
        self.log_fd = Some(File::from(fd));
        Ok(())
    }

    fn get_shmem_config(&mut self) -> HandlerResult<VhostUserShmemConfig> {
        if self.shmem_sizes.is_empty() {
            return Err(io::Error::from_raw_os_error(libc::ENOSYS));
        }
        Ok(VhostUserShmemConfig::new(&self.shmem_sizes))
    }

    fn set_device_state_fd(
        &mut self,
        direction: TransferDirection,
        phase: TransferPhase,
        fd: OwnedFd,
    ) -> HandlerResult<Option<OwnedFd>> {
        let running = (0..self.rings.len()).find(|&i| self.ring_live(i));
        self.state_transfer
            .start(&mut self.device, direction, phase, fd, running)
    }

    fn check_device_state(&mut self) -> HandlerResult<()> {
        // A LOAD replaces the state of a device that was active (its rings stopped).
        let active = self.active;
        let mut was_reset = false;
        let result = self.state_transfer.check(&mut self.device, |d| {
            if active {
                d.reset();
                was_reset = true;
            }
        });
        if was_reset {
            self.active = false;
        }
        result
    }
}

impl<D: VirtioDevice> DeviceBackend<D> {
    fn acked_features_have_protocol(&self) -> bool {
        self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }
}
