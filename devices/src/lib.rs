//! VMM-independent virtio device models and the traits a VMM implements for them.
//!
//! # The VMM-facing traits ([`virtio`])
//!
//! Devices do not depend on any VMM library. They see guest memory and queues through
//! four small traits defined once for every Outboard device: [`virtio::VirtQueue`]
//! (descriptor chains with device-readable and device-writable halves as host memory
//! regions), [`virtio::Interrupt`], [`virtio::GuestMemoryAccess`] and, the other way
//! round, [`virtio::VirtioDevice`], which a transport drives. The rust-vmm
//! implementations (`vm-memory`, `virtio-queue`) live in `outboard-vmm-glue`'s `rust_vmm`
//! module, so a device runs unchanged in-process in a VMM and behind the vhost-user
//! daemon.
//!
//! Descriptor chains expose host memory as `iovec`-like regions instead of
//! `Read`/`Write` streams so that devices can move data between guest buffers and host
//! fds with `readv`/`writev` and no intermediate copy. Guest memory is never turned into
//! a Rust reference.
//!
//! # Writing a device
//!
//! Implement [`virtio::VirtioDevice`]: five methods are required (`device_type`,
//! `queue_max_sizes`, `activate`, `reset`, `handle_queue`); the rest default to a
//! device with no config space, no feature bit of its own and no fd of its own. Read
//! requests with [`virtio::ChainReader`], write answers with [`virtio::ChainWriter`]
//! (from a slice, an object, or straight from an fd with
//! [`virtio::ChainWriter::write_from_fd`]), and take device ids from [`virtio::id`].
//! `outboard-vmm-glue`'s `vhost_user::daemon::serve` then serves the device over
//! vhost-user (its `rng_device` example is a whole daemon; the README has the guide).
//!
//! ```
//! use std::sync::Arc;
//! use outboard_devices::virtio::{
//!     id, signal_used, ActivateError, ChainWriter, DescChain, Interrupt, QueueError, VirtQueue,
//!     VirtioDevice,
//! };
//!
//! /// virtio-rng answering every buffer with 0x2a bytes (a real one reads /dev/urandom
//! /// with `write_from_fd`).
//! #[derive(Default)]
//! struct Rng {
//!     queues: Vec<Box<dyn VirtQueue>>,
//!     irq: Option<Arc<dyn Interrupt>>,
//! }
//!
//! impl VirtioDevice for Rng {
//!     fn device_type(&self) -> u32 {
//!         id::RNG
//!     }
//!     fn queue_max_sizes(&self) -> &[u16] {
//!         &[256]
//!     }
//!     fn activate(
//!         &mut self,
//!         queues: Vec<Box<dyn VirtQueue>>,
//!         irq: Arc<dyn Interrupt>,
//!     ) -> Result<(), ActivateError> {
//!         (self.queues, self.irq) = (queues, Some(irq));
//!         Ok(())
//!     }
//!     fn reset(&mut self) {
//!         (self.queues, self.irq) = (Vec::new(), None);
//!     }
//!     fn handle_queue(&mut self, index: usize) {
//!         let Some(queue) = self.queues.get_mut(index) else { return };
//!         let mut chain = DescChain::default();
//!         loop {
//!             match queue.pop(&mut chain) {
//!                 Ok(true) => {}
//!                 // Kicks back on; go on if buffers came meanwhile.
//!                 Ok(false) if queue.enable_notification() == Ok(true) => continue,
//!                 Ok(false) => break,
//!                 Err(QueueError::BadChain { head, .. }) => {
//!                     let _ = queue.add_used(head, 0);
//!                     continue;
//!                 }
//!                 Err(_) => break, // broken until reset: never loop on it
//!             }
//!             let mut w = ChainWriter::new(&chain.writable);
//!             let _ = w.write_bytes(&vec![0x2a; w.remaining().min(4096)]);
//!             if queue.add_used(chain.head, w.written() as u32).is_err() {
//!                 break;
//!             }
//!         }
//!         signal_used(&mut self.queues, index, self.irq.as_deref());
//!     }
//! }
//!
//! let rng = Rng::default();
//! assert_eq!((rng.device_type(), rng.config_size(), rng.queue_max_sizes()), (4, 0, &[256][..]));
//! ```
//!
//! # Devices
//!
//! - [`vsock`]: virtio-vsock with an AF_UNIX muxer in Firecracker's convention, stream
//!   and seqpacket sockets.
//! - [`media`]: virtio-media: the runner, V4L2 ioctl dispatch, memfd MMAP buffers and a
//!   software capture camera.
//!
//! # Cargo features
//!
//! [`bus`] and [`virtio`] are always there; each device is a feature, so a VMM takes
//! only the devices it embeds (`default-features = false, features = ["vsock"]`).
//!
//! - `vsock` (default): the [`vsock`] module.
//! - `media` (default): the [`media`] module.
//! - `v4l2-proxy` (implies `media`): `media::proxy`, the host V4L2 proxy. Its v4l2r
//!   dependency runs bindgen, which needs libclang and a Linux >= 6.5 `videodev2.h` in
//!   `V4L2R_VIDEODEV2_H_PATH` (`cargo xtask media-deps`).
//! - `serde` (off by default): `Serialize`/`Deserialize` for the [`bus`] types and
//!   `Suspendable::snapshot`/`Suspendable::restore`, whose state is a
//!   `serde_json::Value`. `outboard-sandbox` enables it for its proxy's cold path.
//! - `test-utils` (off by default): the [`testing`] module, test doubles for device
//!   tests (an in-memory virtqueue with a guest-side driver, a counting interrupt, a
//!   minimal device for transport tests). For dev-dependencies only.
//!
//! `cargo run -p outboard-vmm-glue --example vsock_mmio` shows a VMM that embeds the vsock
//! device behind virtio-mmio and passes a packet through it each way.
//!
// Without a device's feature its module is absent: its links point at the feature list.
#![cfg_attr(feature = "vsock", doc = "[`vsock`]: crate::vsock")]
#![cfg_attr(not(feature = "vsock"), doc = "[`vsock`]: #cargo-features")]
#![cfg_attr(feature = "media", doc = "[`media`]: crate::media")]
#![cfg_attr(not(feature = "media"), doc = "[`media`]: #cargo-features")]
#![cfg_attr(feature = "test-utils", doc = "[`testing`]: crate::testing")]
#![cfg_attr(not(feature = "test-utils"), doc = "[`testing`]: #cargo-features")]
#![deny(missing_docs)]

pub mod bus;
#[cfg(feature = "media")]
pub mod media;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
pub mod virtio;
#[cfg(feature = "vsock")]
pub mod vsock;
