//! A minijail-equivalent [`Jail`], [`fork_process`] into a jailed child, and a
//! [`ProxyDevice`] that runs any [`BusDevice`](outboard_devices::bus::BusDevice) in it.
//!
//! - [`jail`]: the `Jail` builder (user namespace with uid/gid maps and `setgroups`
//!   denied; pid, mount, net, IPC, UTS and cgroup namespaces; `pivot_root` into an empty
//!   tmpfs with read-only binds; `no_new_privs`; seccomp-bpf from Rust values or a JSON
//!   policy with kill/errno/log actions; rlimits; an fd keep-list; capability drop;
//!   Landlock where the kernel has it; parent-death signal), and the order the child
//!   applies it in. Works as root (root becomes uid 65534 outside the namespace) and as
//!   an unprivileged user. Built on `seccompiler`, `landlock` and raw system calls; no
//!   `minijail`.
//! - [`fork`]: `fork_process` and the [`Child`] handle (pid + pidfd) that reaps.
//! - [`ring`]: the hot-path channel, a request ring in a sealed memfd with futex
//!   doorbells.
//! - [`proxy`]: `ProxyDevice` and `ChildProcIntf`, with every command of crosvm's proxy.
//! - [`cold`]: the cold path's framing over the Tube (inline JSON, or a sealed memfd for
//!   large payloads such as snapshots).
//!
//! ```
//! use outboard_devices::bus::{BusAccessInfo, BusDevice, Suspendable};
//! use outboard_sandbox::{Jail, ProxyDevice};
//!
//! struct Answer;
//! impl Suspendable for Answer {}
//! impl BusDevice for Answer {
//!     fn debug_label(&self) -> String {
//!         "answer".into()
//!     }
//!     fn read(&mut self, _info: BusAccessInfo, data: &mut [u8]) {
//!         data.fill(42);
//!     }
//! }
//!
//! // Fork early, before the VMM starts threads (see the `jail` module docs).
//! let mut dev = ProxyDevice::new(Answer, &Jail::sandboxed(), &[])?;
//! let mut data = [0u8; 4];
//! dev.read(BusAccessInfo::default(), &mut data);
//! assert_eq!(data, [42; 4]);
//! # Ok::<(), outboard_sandbox::ProxyError>(())
//! ```
//!
//! # Speed
//!
//! `cargo bench -p outboard-sandbox --bench proxy` measures a proxied 4-byte MMIO read
//! round trip. On the 2-CPU development VM (nested virtualization, kernel 6.18), with the
//! VMM pinned to CPU 0 and the device process to CPU 1, two runs (medians, while other
//! builds kept both CPUs busy, load average ~6):
//!
//! | path                                   | no jail       | `Jail::sandboxed()` |
//! |----------------------------------------|---------------|---------------------|
//! | (a) `ProxyDevice` (shared-memory ring) | 1.1 – 2.2 µs  | 0.6 – 2.6 µs        |
//! | (b) serde_json over `SOCK_SEQPACKET`   | 107 – 123 µs  | 80 – 98 µs          |
//! | (c) raw 16-byte `SOCK_SEQPACKET`       | 94 – 124 µs   | 81 – 95 µs          |
//!
//! Cross-CPU socket wake-ups are slow on that VM (an IPI per message), which the ring
//! avoids entirely while both sides are busy. With both processes on one CPU, (a) is
//! 2.4 – 3.8 µs against 8 – 11 µs for (b) and 7 – 11 µs for (c): each side notes its CPU
//! in the ring and yields at once instead of spinning when it shares the CPU with its
//! peer.
#![deny(missing_docs)]

pub mod cold;
pub mod fork;
pub mod jail;
pub mod proxy;
pub mod ring;

pub use fork::{fork_process, Child, ExitStatus, ForkError};
pub use jail::{landlock_abi, IdMap, Jail, JailError, SeccompPolicy};
pub use proxy::{ChildProcIntf, ProxyDevice, ProxyError};
