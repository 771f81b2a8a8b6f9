//! A vhost-user back-end daemon for any Outboard virtio device.
//!
//! - [`memory`]: the front-end's memory table (`SET_MEM_TABLE`, `ADD_MEM_REG`,
//!   `REM_MEM_REG`), mapped with bounds checks and unmapped on replacement.
//! - [`dirty_log`]: the dirty page log of live migration (`LOG_SHMFD`, `SET_LOG_BASE`,
//!   `VHOST_F_LOG_ALL`), offered for devices whose writes all go into used chains.
//! - [`guard`]: SIGBUS containment for guest memory a front-end truncates under the
//!   daemon: the offending VM's device stops, the process and its other VMs live on.
//! - [`ring`]: rings the front-end starts and stops independently, presented to the
//!   device as queues that may be empty; call eventfds and the back-end channel as the
//!   device's interrupt.
//! - [`backend`]: [`DeviceBackend`], which implements
//!   `outboard_transport::VhostUserBackendReqHandler` over a
//!   [`VirtioDevice`](outboard_devices::virtio::VirtioDevice): features, rings with the
//!   current spec's states, EVENT_IDX, config space, `RESET_DEVICE`.
//! - `media` (feature `media`): virtio-media (the software camera, the host V4L2 proxy) over vhost-user,
//!   with its shared memory region mapped through `SHMEM_MAP`; `media::MediaSource`
//!   names what `outboard media` serves.
//! - [`state`]: device state transfer (`SET_DEVICE_STATE_FD`, `CHECK_DEVICE_STATE`)
//!   for devices that save their state, without the worker ever waiting on the
//!   front-end's pipe.
//! - [`daemon`]: the worker loop (one thread and one epoll set per device) that accepts
//!   a front-end, serves it, and after it leaves resets the device and listens again.
//! - [`handover`]: a worker's device and front-end session handed to another process
//!   (live upgrade): the worker record, the coordinator's handle and the worker's
//!   hooks.
//!
//! # Ring states
//!
//! A ring starts when it receives `SET_VRING_KICK` and is enabled (at once when
//! `VHOST_USER_F_PROTOCOL_FEATURES` was not negotiated, else by `SET_VRING_ENABLE`). The
//! device is activated when the first ring starts; rings the front-end never starts
//! (QEMU keeps vsock's event queue for itself) stay empty. `GET_VRING_BASE` stops the
//! ring and returns its next available index; the device keeps its state, so a paused
//! VM resumes with its connections. A ring that comes back with another index or other
//! addresses means the driver was reset, and the device is reset too.

pub mod backend;
pub mod daemon;
pub mod dirty_log;
pub(crate) mod frames;
pub mod guard;
pub mod handover;
#[cfg(feature = "media")]
pub mod media;
pub mod memory;
pub mod ring;
pub mod state;

pub use backend::DeviceBackend;
