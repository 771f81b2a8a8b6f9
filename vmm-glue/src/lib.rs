//! rust-vmm glue, virtio-mmio, and the vhost-user device daemon.
//!
//! - [`rust_vmm`]: outboard-devices' VMM-facing traits over `vm-memory` and
//!   `virtio-queue`, so a rust-vmm based VMM hands its memory and queues to any Outboard
//!   device.
//! - [`mmio`]: a virtio-mmio transport (virtio 1.x, version 2 registers) that makes any
//!   Outboard virtio device a `BusDevice`.
//! - [`vhost_user`]: a vhost-user back-end for any Outboard virtio device: memory table,
//!   rings, worker loop with reconnection.
//! - `vsock_cli` (feature `cli`): the configuration of `outboard vsock` (`--vm`, flat flags,
//!   `--config`), validated with errors that name the offending value.
//! - `device_daemon` (feature `daemon`): a whole single-device daemon in one call,
//!   `device_daemon::run`: `--socket-path`/`--fd`/socket activation, signals,
//!   reconnection, `--jail` with the `jail` feature.
//! - `metrics` (feature `daemon`; the JSON file with `cli`): the daemon's metrics files.
//! - `shared_metrics` (feature `daemon`): device counters a jailed worker publishes into a
//!   memfd page the daemon reads, monotonic across worker restarts.
//! - `supervisor` (feature `daemon`): the listening socket (`--fd`, a bound path,
//!   systemd socket activation), stop signals, the loop that watches the workers and
//!   writes the metrics file, restarts of jailed workers, a bounded stop.
//! - `logging` (feature `daemon`; text/JSON lines through env_logger with `cli`): log lines that name their worker, as text or JSON.
//! - `systemd` (feature `daemon`): socket activation and `sd_notify`, without libsystemd.
//! - `vsock_daemon` (feature `cli`): the `outboard vsock` daemon built from its
//!   configuration: a worker per VM on a thread or in a jailed child.
//! - `upgrade` (feature `cli`): live upgrade, a new `outboard vsock` taking every VM
//!   over from the running one over a Unix socket (`--upgrade-socket`, `--take-over`);
//!   the records and the workers' side are in [`vhost_user::handover`].
//! - [`jail`]: vhost-user workers forked into a jailed child (outboard-sandbox), with
//!   the daemon keeping the listening socket and restarting a worker that dies.
//!
//! The `outboard` binary (`src/bin/outboard.rs`) puts these together.
//!
//! # Serving a device
//!
//! Any `outboard_devices::virtio::VirtioDevice` becomes a vhost-user back-end with
//! [`vhost_user::daemon::serve`]: it serves one front-end after the other on a
//! listening socket (resetting the device when one leaves) until a stop eventfd
//! ([`EventFd`], re-exported) is written. The protocol features follow the device
//! (`CONFIG` only with a config space) and can be changed with
//! [`vhost_user::daemon::serve_with`]. The `daemon` feature adds what a daemon needs
//! around it: `supervisor::listen_once` (`--socket-path`, `--fd`, systemd socket
//! activation), `supervisor::StopSignals`, `supervisor::Supervisor` with
//! `ThreadService` (and `JailedService` with `jail`), and `device_daemon::run`, which
//! puts them together: a whole daemon's `main` in one call. `examples/rng_device.rs`
//! is a whole daemon (virtio-rng) on it; the README has the guide.
//!
//! ```no_run
//! # fn rng() -> outboard_devices::testing::EchoDevice {
//! #     outboard_devices::testing::EchoDevice::new(&[256])
//! # }
//! use std::os::unix::net::UnixListener;
//! use outboard_vmm_glue::{vhost_user::daemon, EventFd};
//!
//! let listener = UnixListener::bind("/tmp/rng.sock")?;
//! let stop = EventFd::new(libc::EFD_NONBLOCK)?;
//! // Returns the device once `stop` is written (from another thread).
//! let _device = daemon::serve(rng(), listener, 1024, &stop, "rng")?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Features
//!
//! A device daemon takes `default-features = false, features = ["daemon"]` (and
//! `jail` for jailed workers); the defaults are the `outboard` binary's.
//!
//! - `vhost-user`: the daemon library ([`vhost_user`]); pulls in outboard-transport.
//!   No serde, clap, sandbox or seccomp.
//! - `daemon`: `supervisor`, `systemd`, `logging`, `metrics`, `shared_metrics`: the
//!   listening socket, signals and supervision as library API; nothing more compiled.
//! - `jail`: jailed workers ([`jail`], `supervisor::JailedService`); pulls in
//!   outboard-sandbox and seccompiler.
//! - `mmio`: the virtio-mmio transport.
//! - `vsock`: outboard-devices' virtio-vsock device; with `daemon`, its counters in
//!   the metrics files; with `cli`, `vsock_cli` and `vsock_daemon`.
//! - `media`: outboard-devices' virtio-media device; with `vhost-user`,
//!   `vhost_user::media`; with `daemon`, its counters in the metrics files.
//! - `cli` (with `vhost-user`, `mmio`, `vsock`, `media` and `jail` the defaults): the
//!   `outboard` binary; implies `vsock` and `media`, and pulls in clap, serde,
//!   serde_json, serde_yaml_ng and env_logger.
//!
//! Without `vsock` and `media`, outboard-devices compiles only its `virtio` traits:
//! a device of one's own pays for neither.
//!
//! # System calls
//!
//! The workspace makes its system calls through rustix (the devices, this crate's
//! socket options, fcntl and memfd seals). The exception is `vmm_sys_util::EventFd`
//! (and the `Epoll` beside it in the daemon loop), kept on purpose: it is the eventfd
//! type of the rust-vmm ecosystem, the one `vm-memory`/`virtio-queue`/`vhost` users
//! already hold for interrupts, kicks and stop signals, and it appears in this crate's
//! public API ([`rust_vmm`], [`mmio`], the vhost-user daemon, [`jail`]). Replacing it
//! with an `OwnedFd` over rustix's `eventfd` would change those signatures and make
//! every rust-vmm based caller convert at the boundary, for no change in what the
//! kernel sees. Raw libc stays where neither covers the call: signal masks and
//! handlers (`sigaction`, `pthread_sigmask`, `sigtimedwait`: rustix has no stable API
//! for them), the `_exit` of a forked child, and `mmap` of the shared counter page and
//! of poisoned guest pages (rustix's `mmap` is as unsafe as libc's, and the latter
//! runs in a signal handler).
#![deny(missing_docs)]

/// `vmm-sys-util`, as this crate uses it (its `EventFd` is the one above).
pub use vmm_sys_util;
/// The eventfd type of this crate's public API (`vhost_user::daemon::serve`'s stop
/// signal, the rust-vmm adapters' interrupts), re-exported so that a caller does not
/// need to depend on the same `vmm-sys-util` version.
pub use vmm_sys_util::eventfd::EventFd;

#[cfg(feature = "daemon")]
pub mod device_daemon;
#[cfg(feature = "jail")]
pub mod jail;
#[cfg(feature = "daemon")]
pub mod logging;
#[cfg(feature = "daemon")]
pub mod metrics;
#[cfg(feature = "mmio")]
pub mod mmio;
pub mod rust_vmm;
#[cfg(feature = "daemon")]
pub mod shared_metrics;
#[cfg(feature = "daemon")]
pub mod supervisor;
#[cfg(feature = "daemon")]
pub mod systemd;
#[cfg(feature = "cli")]
pub mod upgrade;
#[cfg(feature = "vhost-user")]
pub mod vhost_user;
#[cfg(feature = "cli")]
pub mod vsock_cli;
#[cfg(feature = "cli")]
pub mod vsock_daemon;
