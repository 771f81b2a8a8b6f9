//! virtio-media over vhost-user: the software camera served to a vhost-user front-end.
//!
//! [`MediaBackend`] wraps the generic [`DeviceBackend`] and adds what virtio-media
//! needs on top of it: `GET_SHMEM_CONFIG` answers one page-multiple shared memory
//! region (shmid 0, [`SHMID_MMAP`]) and MMAP buffers are mapped into it with
//! `SHMEM_MAP`/`SHMEM_UNMAP` requests on the back-end channel ([`ShmemMapper`]). It
//! offers the protocol features `BACKEND_REQ`, `BACKEND_SEND_FD`, `REPLY_ACK`,
//! `CONFIG`, `SHMEM` and `MQ` (plus what the generic back-end offers). USERPTR buffers
//! are read from the front-end's memory table ([`SharedGuestMemory`]).
//!
//! [`serve_camera`] runs the worker loop: one front-end at a time, the device reset
//! when it leaves, as the generic daemon does.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex, MutexGuard};

use outboard_devices::media::camera::{SoftwareCamera, CARD_NAME, DEVICE_CAPS};
use outboard_devices::media::device::VirtioMedia;
use outboard_devices::media::{
    page_align, Errno, EventBuffer, GuestMemoryRegions, HostMemoryMapper,
};
use outboard_devices::virtio::{GuestMemoryAccess, IoRegion, MemoryError};
use outboard_protocol::media::{MediaConfig, SHMID_MMAP};
use outboard_protocol::vhost_user::{
    VhostUserMMap, VhostUserMMapFlags, VhostUserMemoryRegion, VhostUserProtocolFeatures,
    VhostUserShmemConfig, VhostUserVringAddr,
};
use outboard_transport::{
    Backend, BackendReqHandler, Connection, Error as TransportError, HandlerResult, MemoryRegion,
    VhostUserBackendReqHandler,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::rust_vmm::RustVmmMemory;
use crate::vhost_user::backend::{offered_protocol_features, DeviceBackend, KICK_TOKEN_LIMIT};
use crate::vhost_user::daemon::WorkerError;
use crate::vhost_user::ring::Mem;

/// Default size of the shared memory region for MMAP buffers (256 MiB).
pub const DEFAULT_SHM_SIZE: u64 = 256 << 20;

/// The protocol features the media back-end offers.
pub fn media_protocol_features() -> VhostUserProtocolFeatures {
    offered_protocol_features()
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::BACKEND_SEND_FD
        | VhostUserProtocolFeatures::SHMEM
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The back-end channel, shared between the connection handler (which receives it) and
/// the mapper (which sends on it).
pub type Channel = Arc<Mutex<Option<Backend>>>;

/// A [`HostMemoryMapper`] that maps buffers into shared memory region 0 through
/// `SHMEM_MAP`/`SHMEM_UNMAP` on the back-end channel. Offsets are allocated first-fit in
/// whole pages.
#[derive(Debug)]
pub struct ShmemMapper {
    channel: Channel,
    size: u64,
    /// Mapped ranges: offset -> length.
    used: BTreeMap<u64, u64>,
}

impl ShmemMapper {
    /// A mapper for a region of `size` bytes (rounded down to pages) using `channel`.
    pub fn new(channel: Channel, size: u64) -> Self {
        ShmemMapper {
            channel,
            size: size & !4095,
            used: BTreeMap::new(),
        }
    }

    fn allocate(&self, len: u64) -> Option<u64> {
        let mut start = 0u64;
        for (off, l) in &self.used {
            if off.saturating_sub(start) >= len {
                return Some(start);
            }
            start = off.checked_add(*l)?;
        }
        (self.size.saturating_sub(start) >= len).then_some(start)
    }
}

impl HostMemoryMapper for ShmemMapper {
    fn add_mapping(
        &mut self,
        buffer: BorrowedFd<'_>,
        length: u64,
        offset: u64,
        rw: bool,
    ) -> Result<u64, Errno> {
        let len = page_align(length).filter(|l| *l > 0).ok_or(libc::EINVAL)?;
        if offset % 4096 != 0 {
            return Err(libc::EINVAL);
        }
        let shm_offset = self.allocate(len).ok_or(libc::ENOMEM)?;
        let flags = if rw {
            VhostUserMMapFlags::RW
        } else {
            VhostUserMMapFlags::empty()
        };
        let map = VhostUserMMap::new(SHMID_MMAP, offset, shm_offset, len, flags);
        let channel = lock(&self.channel).clone().ok_or(libc::ENOTCONN)?;
        channel.shmem_map(&map, buffer).map_err(|e| {
            log::warn!("media: SHMEM_MAP of {len:#x} bytes at {shm_offset:#x} failed: {e}");
            libc::EIO
        })?;
        self.used.insert(shm_offset, len);
        Ok(shm_offset)
    }

    fn remove_mapping(&mut self, shm_offset: u64) -> Result<(), Errno> {
        let len = *self.used.get(&shm_offset).ok_or(libc::EINVAL)?;
        let map = VhostUserMMap::new(SHMID_MMAP, 0, shm_offset, len, VhostUserMMapFlags::empty());
        // The range is free for reuse even if the front-end is gone.
        self.used.remove(&shm_offset);
        let channel = lock(&self.channel).clone().ok_or(libc::ENOTCONN)?;
        channel.shmem_unmap(&map).map_err(|e| {
            log::warn!("media: SHMEM_UNMAP at {shm_offset:#x} failed: {e}");
            libc::EIO
        })
    }
}

/// Guest memory that becomes available once the back-end exists (the front-end's memory
/// table, updated as it changes). Until then every translation fails.
#[derive(Debug, Clone, Default)]
pub struct SharedGuestMemory(Arc<Mutex<Option<RustVmmMemory<Mem>>>>);

impl SharedGuestMemory {
    /// Starts translating through `mem`.
    pub fn set(&self, mem: Mem) {
        *lock(&self.0) = Some(RustVmmMemory::new(mem));
    }
}

impl GuestMemoryAccess for SharedGuestMemory {
    fn host_regions(
        &self,
        addr: u64,
        len: u64,
        out: &mut Vec<IoRegion>,
    ) -> Result<(), MemoryError> {
        match lock(&self.0).as_ref() {
            Some(m) => m.host_regions(addr, len, out),
            None => Err(MemoryError::Unmapped { addr, len }),
        }
    }
}

/// The camera device served over vhost-user.
pub type CameraDevice = VirtioMedia<SoftwareCamera<EventBuffer, ShmemMapper, GuestMemoryRegions>>;

/// Builds the software camera with a shared memory region of `shm_size` bytes; returns
/// the device, its back-end channel slot and its guest memory handle.
pub fn camera_device(shm_size: u64) -> std::io::Result<(CameraDevice, Channel, SharedGuestMemory)> {
    let channel: Channel = Arc::new(Mutex::new(None));
    let guest = SharedGuestMemory::default();
    let events = EventBuffer::new();
    let camera = SoftwareCamera::new(
        events.clone(),
        ShmemMapper::new(channel.clone(), shm_size),
        GuestMemoryRegions(Arc::new(guest.clone())),
    );
    let config = MediaConfig::new(DEVICE_CAPS, 0, CARD_NAME);
    Ok((VirtioMedia::new(camera, events, config)?, channel, guest))
}

/// A virtio-media device as a vhost-user back-end: the generic [`DeviceBackend`] plus
/// shared memory (see the [module docs](self)).
#[derive(Debug)]
pub struct MediaBackend<D: outboard_devices::virtio::VirtioDevice> {
    inner: DeviceBackend<D>,
    channel: Channel,
    shm_size: u64,
}

impl<D: outboard_devices::virtio::VirtioDevice> MediaBackend<D> {
    /// Wraps `inner`; `channel` is the slot the device's [`ShmemMapper`] sends on and
    /// `shm_size` the size of shared memory region 0 (rounded up to pages).
    pub fn new(inner: DeviceBackend<D>, channel: Channel, shm_size: u64) -> Self {
        MediaBackend {
            inner,
            channel,
            shm_size: page_align(shm_size).unwrap_or(shm_size & !4095),
        }
    }

    /// The generic back-end.
    pub fn inner_mut(&mut self) -> &mut DeviceBackend<D> {
        &mut self.inner
    }

    /// The front-end went away: forget the channel, reset the device.
    pub fn disconnect(&mut self) {
        *lock(&self.channel) = None;
        self.inner.disconnect();
    }
}

impl<D: outboard_devices::virtio::VirtioDevice> VhostUserBackendReqHandler for MediaBackend<D> {
    fn max_queues(&self) -> u32 {
        self.inner.max_queues()
    }
    fn get_features(&mut self) -> HandlerResult<u64> {
        self.inner.get_features()
    }
    fn set_features(&mut self, features: u64) -> HandlerResult<()> {
        self.inner.set_features(features)
    }
    fn get_protocol_features(&mut self) -> HandlerResult<VhostUserProtocolFeatures> {
        Ok(media_protocol_features())
    }
    fn set_protocol_features(&mut self, features: VhostUserProtocolFeatures) -> HandlerResult<()> {
        if let Some(ch) = lock(&self.channel).as_ref() {
            ch.set_protocol_features(features);
        }
        self.inner.set_protocol_features(features)
    }
    fn reset_owner(&mut self) -> HandlerResult<()> {
        self.inner.reset_owner()
    }
    fn set_mem_table(&mut self, regions: Vec<MemoryRegion>) -> HandlerResult<()> {
        self.inner.set_mem_table(regions)
    }
    fn set_vring_num(&mut self, index: u32, num: u32) -> HandlerResult<()> {
        self.inner.set_vring_num(index, num)
    }
    fn set_vring_addr(&mut self, addr: &VhostUserVringAddr) -> HandlerResult<()> {
        self.inner.set_vring_addr(addr)
    }
    fn set_vring_base(&mut self, index: u32, base: u32) -> HandlerResult<()> {
        self.inner.set_vring_base(index, base)
    }
    fn get_vring_base(&mut self, index: u32) -> HandlerResult<u32> {
        self.inner.get_vring_base(index)
    }
    fn set_vring_kick(&mut self, index: u32, fd: Option<OwnedFd>) -> HandlerResult<()> {
        self.inner.set_vring_kick(index, fd)
    }
    fn set_vring_call(&mut self, index: u32, fd: Option<OwnedFd>) -> HandlerResult<()> {
        self.inner.set_vring_call(index, fd)
    }
    fn set_vring_enable(&mut self, index: u32, enable: bool) -> HandlerResult<()> {
        self.inner.set_vring_enable(index, enable)
    }
    fn get_config(&mut self, offset: u32, size: u32, flags: u32) -> HandlerResult<Vec<u8>> {
        self.inner.get_config(offset, size, flags)
    }
    fn set_config(&mut self, offset: u32, data: &[u8], flags: u32) -> HandlerResult<()> {
        self.inner.set_config(offset, data, flags)
    }
    fn set_backend_req_fd(&mut self, backend: Backend) -> HandlerResult<()> {
        *lock(&self.channel) = Some(backend.clone());
        self.inner.set_backend_req_fd(backend)
    }
    fn get_max_mem_slots(&mut self) -> HandlerResult<u64> {
        self.inner.get_max_mem_slots()
    }
    fn add_mem_region(&mut self, region: MemoryRegion) -> HandlerResult<()> {
        self.inner.add_mem_region(region)
    }
    fn remove_mem_region(&mut self, region: &VhostUserMemoryRegion) -> HandlerResult<()> {
        self.inner.remove_mem_region(region)
    }
    fn reset_device(&mut self) -> HandlerResult<()> {
        self.inner.reset_device()
    }
    fn get_shmem_config(&mut self) -> HandlerResult<VhostUserShmemConfig> {
        let mut sizes = [0u64; 1];
        sizes[usize::from(SHMID_MMAP)] = self.shm_size;
        Ok(VhostUserShmemConfig::new(&sizes))
    }
}

const TOKEN_LISTENER: u64 = KICK_TOKEN_LIMIT + 1;
const TOKEN_CONN: u64 = KICK_TOKEN_LIMIT + 2;
const TOKEN_DEVICE: u64 = KICK_TOKEN_LIMIT + 3;
const TOKEN_STOP: u64 = KICK_TOKEN_LIMIT + 4;

fn epoll_add(epoll: &Epoll, fd: BorrowedFd<'_>, token: u64) -> Result<(), WorkerError> {
    epoll
        .ctl(
            ControlOperation::Add,
            fd.as_raw_fd(),
            EpollEvent::new(EventSet::IN, token),
        )
        .map_err(WorkerError::Epoll)
}

fn epoll_delete(epoll: &Epoll, fd: BorrowedFd<'_>) {
    let _ = epoll.ctl(
        ControlOperation::Delete,
        fd.as_raw_fd(),
        EpollEvent::default(),
    );
}

/// Serves the software camera to one front-end at a time on `listener` until `stop` is
/// signalled, with a shared memory region of `shm_size` bytes.
pub fn serve_camera(
    listener: UnixListener,
    shm_size: u64,
    stop: &EventFd,
    name: &str,
) -> Result<(), WorkerError> {
    let (device, channel, guest) = camera_device(shm_size).map_err(WorkerError::Epoll)?;
    listener
        .set_nonblocking(true)
        .map_err(WorkerError::Accept)?;
    let epoll = Arc::new(Epoll::new().map_err(WorkerError::Epoll)?);
    // SAFETY: the stop eventfd outlives this function (borrowed for its duration).
    let stop_fd = unsafe { BorrowedFd::borrow_raw(stop.as_raw_fd()) };
    epoll_add(&epoll, stop_fd, TOKEN_STOP)?;
    if let Some(fd) = outboard_devices::virtio::VirtioDevice::event_fd(&device) {
        epoll_add(&epoll, fd, TOKEN_DEVICE)?;
    }
    epoll_add(&epoll, listener.as_fd(), TOKEN_LISTENER)?;
    let inner = DeviceBackend::new(device, 256, epoll.clone());
    guest.set(inner.memory().clone());
    let mut idle = Some(MediaBackend::new(inner, channel, shm_size));
    let mut conn: Option<BackendReqHandler<MediaBackend<CameraDevice>>> = None;
    let mut events = vec![EpollEvent::default(); 64];
    log::info!("{name}: waiting for a front-end");
    'outer: loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(WorkerError::Epoll(e)),
        };
        for ev in &events[..n] {
            let backend = match conn.as_mut() {
                Some(h) => Some(h.backend_mut()),
                None => idle.as_mut(),
            };
            match ev.data() {
                TOKEN_STOP => break 'outer,
                TOKEN_DEVICE => {
                    if let Some(b) = backend {
                        b.inner.handle_device_event();
                    }
                }
                TOKEN_LISTENER => {
                    if idle.is_none() {
                        continue;
                    }
                    let stream = match listener.accept() {
                        Ok((s, _)) => s,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(WorkerError::Accept(e)),
                    };
                    if let Err(e) = stream.set_nonblocking(false) {
                        log::warn!("{name}: dropped a front-end: {e}");
                        continue;
                    }
                    let Some(backend) = idle.take() else { continue };
                    let handler = BackendReqHandler::new(Connection::new(stream), backend);
                    epoll_add(&epoll, handler.as_fd(), TOKEN_CONN)?;
                    epoll_delete(&epoll, listener.as_fd());
                    log::info!("{name}: front-end connected");
                    conn = Some(handler);
                }
                TOKEN_CONN => {
                    let Some(handler) = conn.as_mut() else {
                        continue;
                    };
                    match handler.handle_request() {
                        Ok(()) => {}
                        Err(e) if e.is_fatal() || matches!(e, TransportError::Disconnect) => {
                            log::info!("{name}: front-end gone: {e}");
                            if let Some(handler) = conn.take() {
                                epoll_delete(&epoll, handler.as_fd());
                                let mut backend = handler.into_backend();
                                backend.disconnect();
                                idle = Some(backend);
                            }
                            epoll_add(&epoll, listener.as_fd(), TOKEN_LISTENER)?;
                            continue 'outer;
                        }
                        Err(e) => log::warn!("{name}: refused a request: {e}"),
                    }
                }
                kick if kick < KICK_TOKEN_LIMIT => {
                    if let Some(b) = backend {
                        b.inner.handle_kick(kick as usize);
                    }
                }
                other => log::debug!("{name}: event for unknown token {other}"),
            }
        }
    }
    if let Some(mut b) = conn.map(BackendReqHandler::into_backend).or(idle) {
        b.disconnect();
    }
    log::info!("{name}: stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shm_offsets_are_allocated_first_fit_in_pages() {
        let mut m = ShmemMapper::new(Arc::new(Mutex::new(None)), 5 * 4096 + 100);
        assert_eq!(m.size, 5 * 4096);
        assert_eq!(m.allocate(4096), Some(0));
        m.used.insert(0, 8192);
        m.used.insert(12288, 4096);
        assert_eq!(m.allocate(4096), Some(8192));
        assert_eq!(m.allocate(8192), None);
        m.used.insert(8192, 4096);
        assert_eq!(m.allocate(8192), None);
        assert_eq!(m.allocate(4096), Some(16384));
        // No channel: mapping fails cleanly.
        let fd = EventFd::new(0).unwrap();
        // SAFETY: the eventfd outlives the borrow.
        let bfd = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) };
        assert_eq!(m.add_mapping(bfd, 4096, 0, true), Err(libc::ENOTCONN));
        assert_eq!(m.add_mapping(bfd, 4096, 1, true), Err(libc::EINVAL));
        assert_eq!(m.remove_mapping(12288), Err(libc::ENOTCONN));
        assert_eq!(m.remove_mapping(12288), Err(libc::EINVAL));
    }
}
