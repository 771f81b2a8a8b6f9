//! A minijail-equivalent [`Jail`], [`fork_process`] into a jailed child, and a
//! [`ProxyDevice`] that runs any [`BusDevice`](outboard_devices::bus::BusDevice) in it.
//!
//! - [`jail`]: the `Jail` builder (namespaces, uid/gid maps, `pivot_root` into an empty
//!   tmpfs with read-only binds, `no_new_privs`, seccomp-bpf, rlimits, fd keep-list,
//!   capability drop, Landlock, parent-death signal) and the order the child applies
//!   it in.
//! - [`fork`]: `fork_process` and the [`Child`] handle (pid + pidfd) that reaps.
//! - [`ring`]: the hot-path channel, a request ring in a sealed memfd with futex
//!   doorbells.
//! - [`proxy`]: `ProxyDevice` and `ChildProcIntf`, with every command of crosvm's proxy.
#![deny(missing_docs)]

pub mod fork;
pub mod jail;
pub mod proxy;
pub mod ring;

pub use fork::{fork_process, Child, ExitStatus, ForkError};
pub use jail::{landlock_abi, IdMap, Jail, JailError, SeccompPolicy};
pub use proxy::{ChildProcIntf, ProxyDevice, ProxyError};
