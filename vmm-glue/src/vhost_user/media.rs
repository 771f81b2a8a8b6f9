//! virtio-media over vhost-user: the software camera or a host V4L2 node served to a
//! vhost-user front-end.
//!
//! The generic daemon serves it ([`daemon::serve_with`]) with the generic
//! [`DeviceBackend`] configured for what virtio-media needs on top: `GET_SHMEM_CONFIG`
//! answers one page-multiple shared memory region (shmid 0, [`SHMID_MMAP`]) and MMAP
//! buffers are mapped into it with `SHMEM_MAP`/`SHMEM_UNMAP` requests on the back-end
//! channel ([`ShmemMapper`], which shares the channel through a [`Channel`] slot). It
//! offers the protocol features `BACKEND_SEND_FD` and `SHMEM` on top of the generic
//! back-end's ([`media_protocol_features`]). USERPTR buffers are read from the
//! front-end's memory table ([`SharedGuestMemory`]).
//!
//! [`serve_media`] runs the generic worker loop for any [`MediaDevice`]: one front-end
//! at a time, the device reset when it leaves. [`serve_camera`] serves the software
//! camera, `serve_v4l2_proxy` (feature `v4l2-proxy`) a host V4L2 node. The device's
//! counters ([`MediaMetrics`]) go where [`MediaCounters`] says: counters the daemon
//! holds (a worker thread), or a shared counter page (a jailed worker).

use std::collections::BTreeMap;
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex, MutexGuard};

use outboard_devices::media::camera::{SoftwareCamera, CARD_NAME};
use outboard_devices::media::device::VirtioMedia;
use outboard_devices::media::runner::MaxSessions;
use outboard_devices::media::{
    page_align, Errno, EventBuffer, GuestMemoryRegions, HostMemoryMapper, MediaDevice, MediaMetrics,
};
use outboard_devices::virtio::{GuestMemoryAccess, IoRegion, MemoryError, MemoryPin, VirtioDevice};
use outboard_protocol::media::{MediaConfig, SHMID_MMAP};
use outboard_protocol::vhost_user::{VhostUserMMap, VhostUserMMapFlags, VhostUserProtocolFeatures};
use outboard_transport::BackendReqSender;
use vmm_sys_util::eventfd::EventFd;

use crate::rust_vmm::RustVmmMemory;
#[cfg(feature = "daemon")]
use crate::shared_metrics::{CounterPage, PublishingDevice};
use crate::vhost_user::backend::{offered_protocol_features, ChannelSlot, DeviceBackend};
use crate::vhost_user::daemon::{self, WorkerError};
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
pub type Channel = ChannelSlot;

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
        // Posted, not waited for: this thread also answers the front-end, which updates
        // every vhost-user device's memory table while it handles the map (see
        // `BackendReqSender::post_shmem_map`).
        channel.post_shmem_map(&map, buffer).map_err(|e| {
            outboard_protocol::log_limited!(
                log::Level::Warn,
                "media: SHMEM_MAP of {len:#x} bytes at {shm_offset:#x} failed: {e}"
            );
            libc::EIO
        })?;
        report_refused(&channel);
        self.used.insert(shm_offset, len);
        Ok(shm_offset)
    }

    fn remove_mapping(&mut self, shm_offset: u64) -> Result<(), Errno> {
        let len = *self.used.get(&shm_offset).ok_or(libc::EINVAL)?;
        let map = VhostUserMMap::new(SHMID_MMAP, 0, shm_offset, len, VhostUserMMapFlags::empty());
        // The range is free for reuse even if the front-end is gone.
        self.used.remove(&shm_offset);
        let channel = lock(&self.channel).clone().ok_or(libc::ENOTCONN)?;
        channel.post_shmem_unmap(&map).map_err(|e| {
            outboard_protocol::log_limited!(
                log::Level::Warn,
                "media: SHMEM_UNMAP at {shm_offset:#x} failed: {e}"
            );
            libc::EIO
        })?;
        report_refused(&channel);
        Ok(())
    }
}

/// Logs the maps and unmaps the front-end refused after the device had gone on (the
/// guest then sees no frames through those mappings; the front-end logs why too).
fn report_refused(channel: &BackendReqSender) {
    match channel.take_refused() {
        Ok((refused, dropped)) => {
            for r in &refused {
                outboard_protocol::log_limited!(
                    log::Level::Warn,
                    "media: the front-end refused {} of {:#x} bytes at {:#x} (status {})",
                    r.request,
                    r.map.len,
                    r.map.shm_offset,
                    r.status
                );
            }
            if dropped > 0 {
                outboard_protocol::log_limited!(
                    log::Level::Warn,
                    "media: {dropped} more refusals of the front-end not kept"
                );
            }
        }
        Err(e) => outboard_protocol::log_limited!(
            log::Level::Warn,
            "media: reading the back-end channel's replies: {e}"
        ),
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
    ) -> Result<MemoryPin, MemoryError> {
        match lock(&self.0).as_ref() {
            Some(m) => m.host_regions(addr, len, out),
            None => Err(MemoryError::Unmapped { addr, len }),
        }
    }
}

/// The camera device served over vhost-user.
pub type CameraDevice = VirtioMedia<SoftwareCamera<EventBuffer, ShmemMapper, GuestMemoryRegions>>;

/// Builds a media device with a shared memory region of `shm_size` bytes: `make` gets
/// the event buffer, the shared memory mapper and the guest memory handle and returns
/// the device and its config space. Returns the device, its back-end channel slot and
/// its guest memory handle.
pub fn media_device<D: MediaDevice>(
    shm_size: u64,
    make: impl FnOnce(EventBuffer, ShmemMapper, GuestMemoryRegions) -> (D, MediaConfig),
) -> std::io::Result<(VirtioMedia<D>, Channel, SharedGuestMemory)> {
    let channel: Channel = Arc::new(Mutex::new(None));
    let guest = SharedGuestMemory::default();
    let events = EventBuffer::new();
    let (device, config) = make(
        events.clone(),
        ShmemMapper::new(channel.clone(), shm_size),
        GuestMemoryRegions(Arc::new(guest.clone())),
    );
    Ok((VirtioMedia::new(device, events, config)?, channel, guest))
}

/// The software camera (multi-planar if `mplane`) and its config space, which
/// advertises only the buffer type the camera serves.
fn camera(
    mplane: bool,
    events: EventBuffer,
    host: ShmemMapper,
    guest: GuestMemoryRegions,
) -> (
    SoftwareCamera<EventBuffer, ShmemMapper, GuestMemoryRegions>,
    MediaConfig,
) {
    let camera = if mplane {
        SoftwareCamera::new_mplane(events, host, guest)
    } else {
        SoftwareCamera::new(events, host, guest)
    };
    let config = MediaConfig::new(camera.device_caps(), 0, CARD_NAME);
    (camera, config)
}

/// Builds the software camera (multi-planar if `mplane`) with a shared memory region of
/// `shm_size` bytes; returns the device, its back-end channel slot and its guest memory
/// handle.
pub fn camera_device(
    shm_size: u64,
    mplane: bool,
) -> std::io::Result<(CameraDevice, Channel, SharedGuestMemory)> {
    media_device(shm_size, |events, host, guest| {
        camera(mplane, events, host, guest)
    })
}

/// Where a media worker's device counts ([`MediaMetrics`]: sessions, cap refusals).
#[derive(Debug, Default)]
pub enum MediaCounters {
    /// In the device only: nobody else reads them.
    #[default]
    Own,
    /// Into these counters, which the caller holds: a worker thread whose daemon
    /// writes them to its metrics files ([`VirtioMedia::set_metrics`]).
    Shared(Arc<MediaMetrics>),
    /// In the device, which publishes them into this counter page after every call
    /// that handles work ([`PublishingDevice`]): a jailed worker, whose daemon reads
    /// the page ([`crate::shared_metrics`]).
    #[cfg(feature = "daemon")]
    Page(CounterPage),
}

/// Serves a media device built by [`media_device`] to one front-end at a time on
/// `listener` until `stop` is signalled, with a shared memory region of `shm_size`
/// bytes (rounded up to pages), at most `max_sessions` sessions open at once, and its
/// counters where `counters` says.
pub fn serve_media<D: MediaDevice>(
    listener: UnixListener,
    shm_size: u64,
    max_sessions: MaxSessions,
    counters: MediaCounters,
    stop: &EventFd,
    name: &str,
    make: impl FnOnce(EventBuffer, ShmemMapper, GuestMemoryRegions) -> (D, MediaConfig),
) -> Result<(), WorkerError> {
    let (mut device, channel, guest) = media_device(shm_size, make).map_err(WorkerError::Epoll)?;
    device.runner_mut().set_max_sessions(max_sessions);
    let region = MediaRegion {
        channel,
        guest,
        shm_size,
    };
    match counters {
        MediaCounters::Own => region.serve(device, listener, stop, name),
        MediaCounters::Shared(metrics) => {
            device.set_metrics(metrics);
            region.serve(device, listener, stop, name)
        }
        #[cfg(feature = "daemon")]
        MediaCounters::Page(page) => {
            let metrics = device.metrics();
            let device = PublishingDevice::new(device, page, move || metrics.snapshot());
            region.serve(device, listener, stop, name)
        }
    }
}

/// What a media device's back-end needs besides the device: its back-end channel, its
/// guest memory handle and the size of its shared memory region.
struct MediaRegion {
    channel: Channel,
    guest: SharedGuestMemory,
    shm_size: u64,
}

impl MediaRegion {
    /// Serves `device` (a media device, or one wrapping it) with the media back-end's
    /// protocol features, shared memory region and channel.
    fn serve<V: VirtioDevice>(
        self,
        device: V,
        listener: UnixListener,
        stop: &EventFd,
        name: &str,
    ) -> Result<(), WorkerError> {
        let MediaRegion {
            channel,
            guest,
            shm_size,
        } = self;
        let mut sizes = vec![0u64; usize::from(SHMID_MMAP) + 1];
        sizes[usize::from(SHMID_MMAP)] = page_align(shm_size).unwrap_or(shm_size & !4095);
        daemon::serve_with(
            device,
            listener,
            256,
            stop,
            name,
            |backend: DeviceBackend<V>| {
                guest.set(backend.memory().clone());
                backend
                    .with_protocol_features(media_protocol_features())
                    .with_shmem_regions(sizes)
                    .with_channel(channel)
            },
        )
        .map(drop)
    }
}

/// Serves the single-planar software camera to one front-end at a time on `listener`
/// until `stop` is signalled, with a shared memory region of `shm_size` bytes (rounded
/// up to pages) and the default session cap
/// ([`outboard_devices::media::runner::DEFAULT_MAX_SESSIONS`]).
pub fn serve_camera(
    listener: UnixListener,
    shm_size: u64,
    stop: &EventFd,
    name: &str,
) -> Result<(), WorkerError> {
    serve_camera_with(
        listener,
        shm_size,
        false,
        MaxSessions::default(),
        stop,
        name,
    )
}

/// [`serve_camera`], multi-planar if `mplane`, with at most `max_sessions` sessions.
pub fn serve_camera_with(
    listener: UnixListener,
    shm_size: u64,
    mplane: bool,
    max_sessions: MaxSessions,
    stop: &EventFd,
    name: &str,
) -> Result<(), WorkerError> {
    serve_media(
        listener,
        shm_size,
        max_sessions,
        MediaCounters::Own,
        stop,
        name,
        |events, host, guest| camera(mplane, events, host, guest),
    )
}

/// Serves the host V4L2 node `node` through the V4L2 proxy (feature `v4l2-proxy`): the
/// guest sees the node's card name and device capabilities. Each session opens the
/// node, so `max_sessions` also bounds the host fds the guest can make the back-end
/// hold. The device counts where `counters` says.
#[cfg(feature = "v4l2-proxy")]
pub fn serve_v4l2_proxy(
    listener: UnixListener,
    node: outboard_devices::media::proxy::HostNode,
    shm_size: u64,
    max_sessions: MaxSessions,
    counters: MediaCounters,
    stop: &EventFd,
    name: &str,
) -> Result<(), WorkerError> {
    use outboard_devices::media::proxy::V4l2Proxy;
    serve_media(
        listener,
        shm_size,
        max_sessions,
        counters,
        stop,
        name,
        |events, host, guest| {
            let config = MediaConfig::new(node.device_caps, 0, &node.card);
            (V4l2Proxy::new(node, events, host, guest), config)
        },
    )
}

/// What `outboard media` serves.
#[derive(Debug)]
pub enum MediaSource {
    /// The software camera.
    Camera {
        /// Serve VIDEO_CAPTURE_MPLANE instead of VIDEO_CAPTURE.
        mplane: bool,
    },
    /// A host V4L2 node, through the V4L2 proxy.
    #[cfg(feature = "v4l2-proxy")]
    V4l2(outboard_devices::media::proxy::HostNode),
}

/// Why a host V4L2 node cannot be served.
#[cfg_attr(test, remain::sorted)]
#[derive(Debug, thiserror::Error)]
pub enum MediaSourceError {
    /// The node did not open or is not a V4L2 streaming capture or mem-to-mem node.
    #[cfg(feature = "v4l2-proxy")]
    #[error("{0}")]
    Probe(outboard_devices::media::proxy::ProxyError),
    /// This build has no V4L2 proxy.
    #[error("{0}: this outboard was built without the `v4l2-proxy` feature")]
    Unsupported(std::path::PathBuf),
}

impl MediaSource {
    /// The host node at `path`, checked: it must open and be a V4L2 streaming capture
    /// or mem-to-mem node (feature `v4l2-proxy`).
    pub fn v4l2(path: &std::path::Path) -> Result<MediaSource, MediaSourceError> {
        #[cfg(feature = "v4l2-proxy")]
        {
            outboard_devices::media::proxy::HostNode::probe(path)
                .map(MediaSource::V4l2)
                .map_err(MediaSourceError::Probe)
        }
        #[cfg(not(feature = "v4l2-proxy"))]
        {
            Err(MediaSourceError::Unsupported(path.to_owned()))
        }
    }

    /// The worker's name in logs.
    pub fn name(&self) -> String {
        match self {
            MediaSource::Camera { .. } => "media camera".into(),
            #[cfg(feature = "v4l2-proxy")]
            MediaSource::V4l2(node) => format!(
                "media v4l2 {} (driver {}, card {:?}, device_caps {:#x})",
                node.path.display(),
                node.driver,
                node.card,
                node.device_caps
            ),
        }
    }

    /// Serves it on `listener` until `stop` is written ([`serve_media`] with the
    /// camera, `serve_v4l2_proxy`), the device counting where `counters` says.
    pub fn serve(
        &self,
        listener: UnixListener,
        shm_size: u64,
        max_sessions: MaxSessions,
        counters: MediaCounters,
        stop: &EventFd,
        name: &str,
    ) -> Result<(), WorkerError> {
        match self {
            MediaSource::Camera { mplane } => serve_media(
                listener,
                shm_size,
                max_sessions,
                counters,
                stop,
                name,
                |events, host, guest| camera(*mplane, events, host, guest),
            ),
            #[cfg(feature = "v4l2-proxy")]
            MediaSource::V4l2(node) => serve_v4l2_proxy(
                listener,
                node.clone(),
                shm_size,
                max_sessions,
                counters,
                stop,
                name,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

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

    #[test]
    fn config_space_advertises_the_served_buffer_type() {
        use outboard_devices::media::camera::{DEVICE_CAPS, DEVICE_CAPS_MPLANE};
        use outboard_devices::virtio::VirtioDevice;
        for (mplane, caps) in [(false, DEVICE_CAPS), (true, DEVICE_CAPS_MPLANE)] {
            let (dev, _, _) = camera_device(1 << 20, mplane).unwrap();
            let mut cfg = [0u8; 4];
            dev.read_config(0, &mut cfg);
            assert_eq!(u32::from_le_bytes(cfg), caps, "mplane {mplane}");
        }
    }
}
