//! VMM-independent virtio device models and the traits a VMM implements for them.
//!
//! # The VMM-facing traits ([`virtio`])
//!
//! Devices do not depend on any VMM library. They see guest memory and queues through
//! four small traits defined once for every Outboard device: [`virtio::VirtQueue`]
//! (descriptor chains with device-readable and device-writable halves as host memory
//! regions), [`virtio::Interrupt`], [`virtio::GuestMemoryAccess`] and, the other way
//! round, [`virtio::VirtioDevice`], which a transport drives. The rust-vmm
//! implementations (`vm-memory`, `virtio-queue`) live in `outboard-glue`'s `rust_vmm`
//! module, so a device runs unchanged in-process in a VMM and behind the vhost-user
//! daemon.
//!
//! Descriptor chains expose host memory as `iovec`-like regions instead of
//! `Read`/`Write` streams so that devices can move data between guest buffers and host
//! fds with `readv`/`writev` and no intermediate copy. Guest memory is never turned into
//! a Rust reference.
//!
//! # Devices
//!
//! - [`vsock`]: virtio-vsock with an AF_UNIX muxer in Firecracker's convention, stream
//!   and seqpacket sockets.
//! - [`media`]: virtio-media: the runner, V4L2 ioctl dispatch, memfd MMAP buffers and a
//!   software capture camera.
#![deny(missing_docs)]

pub mod bus;
pub mod media;
pub mod virtio;
pub mod vsock;
