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
//! - [`ring`]: the hot-path channel, a request slot per calling thread in a sealed
//!   memfd, executed in one global ticket order, with futex doorbells.
//! - [`proxy`]: `ProxyDevice` and `ChildProcIntf`, with every command of crosvm's proxy.
//! - [`cold`]: the cold path's framing over the Tube (inline JSON, or a sealed memfd for
//!   large payloads such as snapshots).
//! - [`syscalls`]: seccomp allow-lists written once for every architecture
//!   ([`syscall_list!`]): common names, x86_64-only legacy calls in one place, and the
//!   policy of any architecture built by name.
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
//! round trip (criterion medians) on the 2-CPU development VM (nested virtualization,
//! kernel 6.18). Cross CPU: the VMM pinned to CPU 0, the device process to CPU 1; same
//! CPU: both on CPU 0. Figures are medians of 5 runs while another job kept the machine
//! at load 3 – 4.6 (three runs of the whole bench under `taskset -c 0` gave same-CPU
//! medians of 2.40 / 2.47 µs for (a), 7.44 / 7.53 µs for (b), 6.66 / 6.63 µs for (c)):
//!
//! | path                                    | cross CPU | + jail  | same CPU | + jail  |
//! |-----------------------------------------|-----------|---------|----------|---------|
//! | (a) `ProxyDevice` (per-caller slots)    | 0.85 µs   | 0.52 µs | 2.91 µs  | 2.46 µs |
//! | (b) serde_json over `SOCK_SEQPACKET`    | 54.4 µs   | 64.1 µs | 7.63 µs  | 7.86 µs |
//! | (c) raw 16-byte `SOCK_SEQPACKET`        | 63.3 µs   | 66.2 µs | 7.45 µs  | 7.22 µs |
//!
//! On a less busy moment the cross-CPU (a) figure is 0.14 – 0.16 µs. The jail is
//! [`Jail::sandboxed`]. Cross-CPU socket wake-ups are slow on that VM (an IPI per
//! message), which the slots avoid entirely while both sides are busy. On one CPU each
//! side notes its CPU in shared memory and yields at once instead of spinning.
//!
//! Several threads reading one device at once (`contended_*` groups, reads per second,
//! medians of 5 runs; "single ring" is the previous design, one ring behind a mutex held
//! for the whole round trip, measured with the same bench file in alternating runs):
//!
//! | callers | unpinned, slots | unpinned, single ring | CPU 0 → 1, slots | CPU 0 → 1, single ring |
//! |---------|-----------------|-----------------------|------------------|------------------------|
//! | 1       | 0.30 M/s        | 0.37 M/s              | 2.16 M/s         | 0.84 M/s               |
//! | 2       | 0.48 M/s        | 0.13 M/s              | 2.10 M/s         | 0.95 M/s               |
//! | 4       | 0.52 M/s        | 0.13 M/s              | 1.60 M/s         | 1.11 M/s               |
//!
//! The pinned columns vary 3 – 5x from run to run on the shared machine; the unpinned
//! ones within 1.5x.
#![deny(missing_docs)]

pub mod cold;
pub mod fork;
pub mod jail;
pub mod proxy;
pub mod ring;
pub mod syscalls;

pub use fork::{fork_process, Child, ExitStatus, ForkError};
pub use jail::{landlock_abi, IdMap, Jail, JailError, SeccompPolicy};
pub use proxy::{ChildProcIntf, ProxyDevice, ProxyError};
pub use syscalls::SyscallNames;
