//! [`ProxyDevice`]: a [`BusDevice`] that runs in a jailed child process.
//!
//! Every command of crosvm's proxy is here: Activate, Read, Write, ReadConfig,
//! WriteConfig, InitPciConfigMapping, ReadVirtualConfig, WriteVirtualConfig,
//! DestroyDevice, Shutdown, GetRanges, Snapshot, Restore, Sleep and Wake.
//!
//! # Two paths
//!
//! - **Hot** (read, write, config and virtual-config accesses, destroy): a fixed 64-byte
//!   entry in the calling thread's own request slot in shared memory
//!   ([`ring`](crate::ring)), no encoding, no lock shared with other callers, no system
//!   call while both sides are busy. Writes (MMIO, virtual config) and destroy are
//!   *posted*: they return once the entry is published, and every later access is
//!   executed after them (the child runs entries in the order their tickets were taken),
//!   so the device sees each thread's accesses in program order, and accesses ordered
//!   across threads (by a lock, a channel) in that order too. A config write waits,
//!   since it returns a [`ConfigWriteResult`]; a non-empty result (rare: BAR moves,
//!   hot-unplug) follows on the Tube.
//! - **Cold** (activate, PCI config mapping, shutdown, ranges, snapshot, restore, sleep,
//!   wake): serde over an `outboard_transport::Tube`, framed by [`crate::cold`] (inline
//!   JSON, or a sealed memfd for payloads too large for one datagram, such as big
//!   snapshots). The parent queues a `COLD` entry in the caller's slot, then sends the
//!   command, so cold commands stay ordered with hot ones; the child answers on the Tube
//!   before it completes the entry. One lock serializes cold commands and config writes
//!   (whose results may use the Tube) so messages pair up with their entries.
//!
//! # Failure
//!
//! Every wait is bounded ([`ProxyDevice::set_timeouts`]) and checks the child's pidfd
//! between futex sleeps of a few milliseconds; each waiting caller does, so when several
//! threads wait on a dead child all of them return within one sleep slice of the first
//! noticing it. A child that crashed, was killed by
//! seccomp or stopped answering makes the proxy *broken*: the child is killed and reaped
//! at once, the failing call returns an error (through the `try_*` methods, or the
//! trait's `Err`), and every later call fails fast. Reads then return all-ones bytes
//! ([`FAILED_READ`]), like a bus with nothing on it, and log an error.

use std::cell::RefCell;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use outboard_devices::bus::{
    BusAccessInfo, BusDevice, BusRange, BusType, ConfigWriteResult, DeviceId, SuspendError,
    Suspendable,
};
use outboard_transport::Tube;
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::cold::{self, ColdError};
use crate::fork::{fork_process, Child, ForkError};
use crate::jail::Jail;
use crate::ring::{
    Consumer, Entry, Next, Producer, RingError, SharedRing, SlotProducer, SHARED_SLOT,
};

/// The byte a failed read returns in every position.
pub const FAILED_READ: u8 = 0xff;

/// Default bound on a hot-path call (read, config access).
pub const DEFAULT_HOT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default bound on a cold-path call (snapshot, restore, ...).
pub const DEFAULT_COLD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `Drop` waits for the child to shut down before killing it.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);

crate::syscall_list! {
    /// The system calls the proxy's own child loop makes (ring waits, Tube messages,
    /// memory allocation, exit), as this target numbers them. A seccomp allow-list for a
    /// proxied device is this list plus what the device itself needs; see
    /// `SeccompPolicy::allow_list`. Written once for every architecture (the rule is in
    /// [`crate::syscalls`]); [`CHILD_SYSCALL_NAMES`] has the names.
    pub const CHILD_SYSCALLS, CHILD_SYSCALL_NAMES = {
        common: [
            SYS_brk,
            SYS_close,
            SYS_exit,
            SYS_exit_group,
            // Debug builds check with F_GETFD that a dropped OwnedFd was still open.
            SYS_fcntl,
            SYS_futex,
            SYS_getcpu,
            SYS_fstat,
            SYS_madvise,
            SYS_memfd_create,
            SYS_mmap,
            SYS_mremap,
            SYS_munmap,
            SYS_newfstatat,
            // rustix's poll (the Tube, the proxy) everywhere; glibc's poll() on aarch64.
            SYS_ppoll,
            SYS_pread64,
            SYS_recvmsg,
            SYS_rt_sigprocmask,
            SYS_sched_yield,
            SYS_sendmsg,
            SYS_statx,
            SYS_write,
        ],
        x86_64_legacy: [
            // glibc's poll() on x86_64 (a device's libc::poll); ppoll elsewhere.
            SYS_poll,
        ],
    };
}

/// Ring entry operation codes.
mod op {
    pub const READ: u32 = 1;
    pub const WRITE: u32 = 2;
    pub const READ_CONFIG: u32 = 3;
    pub const WRITE_CONFIG: u32 = 4;
    pub const READ_VIRTUAL_CONFIG: u32 = 5;
    pub const WRITE_VIRTUAL_CONFIG: u32 = 6;
    pub const DESTROY: u32 = 7;
    pub const COLD: u32 = 8;
}

/// Ring entry completion status.
mod status {
    pub const OK: u32 = 0;
    /// The answer continues on the Tube.
    pub const FOLLOWS: u32 = 1;
    /// The child refused the entry.
    pub const REFUSED: u32 = 2;
}

/// Errors of the proxy.
#[cfg_attr(test, remain::sorted)]
#[derive(Debug, Error)]
pub enum ProxyError {
    /// The child refused activation (it was activated already).
    #[error("{label}: activation refused: {reason}")]
    ActivationRefused {
        /// The device label.
        label: String,
        /// What the child said.
        reason: String,
    },
    /// An earlier failure made the proxy unusable; the child was killed.
    #[error("{label}: device process unusable since an earlier failure: {reason}")]
    Broken {
        /// The device label.
        label: String,
        /// The first failure.
        reason: String,
    },
    /// A cold-path message could not be sent or received.
    #[error("{label}: {command}: {source}")]
    Cold {
        /// The device label.
        label: String,
        /// The command.
        command: &'static str,
        /// The framing error.
        source: ColdError,
    },
    /// The access length is not 1 to 8 bytes.
    #[error("access of {len} bytes, must be 1 to {max}")]
    DataLength {
        /// The length asked for.
        len: usize,
        /// The largest length allowed.
        max: usize,
    },
    /// Duplicating an fd failed.
    #[error("duplicating an fd failed: {0}")]
    DupFd(std::io::Error),
    /// Forking the jailed child failed.
    #[error("starting the device process failed: {0}")]
    Fork(#[from] ForkError),
    /// The child refused a command.
    #[error("{label}: the device process refused {command}: {reason}")]
    Refused {
        /// The device label.
        label: String,
        /// The command.
        command: &'static str,
        /// What the child said.
        reason: String,
    },
    /// The shared-memory channel failed (child gone, timeout, protocol violation).
    #[error("{label}: {command}: {source}")]
    Ring {
        /// The device label.
        label: String,
        /// The command.
        command: &'static str,
        /// The channel error.
        source: RingError,
    },
    /// Setting up the shared memory failed.
    #[error("setting up the shared-memory ring failed: {0}")]
    RingSetup(RingError),
    /// The Tube failed.
    #[error("{label}: {command}: tube: {source}")]
    Tube {
        /// The device label.
        label: String,
        /// The command.
        command: &'static str,
        /// The transport error.
        source: outboard_transport::Error,
    },
    /// Creating or passing the Tube failed.
    #[error("tube setup: {0}")]
    TubeSetup(outboard_transport::Error),
    /// The child answered with a result of the wrong kind.
    #[error("{label}: {command}: unexpected answer of kind {got}")]
    UnexpectedResult {
        /// The device label.
        label: String,
        /// The command.
        command: &'static str,
        /// The kind of answer that arrived (not its content, which the child chose).
        got: &'static str,
    },
}

#[derive(Debug, Serialize, Deserialize)]
enum ColdCommand {
    Activate,
    InitPciConfigMapping { base: usize, len: usize },
    Shutdown,
    GetRanges,
    Snapshot,
    Restore { data: serde_json::Value },
    Sleep,
    Wake,
}

impl ColdCommand {
    /// The most JSON the child's answer to this command may take: a snapshot may be
    /// large (it travels in a memfd), every other answer fits a datagram.
    fn max_answer(&self) -> u64 {
        match self {
            ColdCommand::Snapshot => cold::MAX_PAYLOAD,
            _ => cold::INLINE_MAX as u64,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            ColdCommand::Activate => "activate",
            ColdCommand::InitPciConfigMapping { .. } => "init_pci_config_mapping",
            ColdCommand::Shutdown => "shutdown",
            ColdCommand::GetRanges => "get_ranges",
            ColdCommand::Snapshot => "snapshot",
            ColdCommand::Restore { .. } => "restore",
            ColdCommand::Sleep => "sleep",
            ColdCommand::Wake => "wake",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
enum ColdResult {
    Ok,
    Refused(String),
    InitPciConfigMapping(bool),
    Ranges(Vec<(BusRange, BusType)>),
    Snapshot(Result<serde_json::Value, SuspendError>),
    Done(Result<(), SuspendError>),
}

impl ColdResult {
    /// The kind of answer, for errors: never the child's content, which may be large.
    fn kind(&self) -> &'static str {
        match self {
            ColdResult::Ok => "ok",
            ColdResult::Refused(_) => "refused",
            ColdResult::InitPciConfigMapping(_) => "init_pci_config_mapping",
            ColdResult::Ranges(_) => "ranges",
            ColdResult::Snapshot(_) => "snapshot",
            ColdResult::Done(_) => "done",
        }
    }
}

/// Most bytes of text from the child (a refusal's reason, the strings of a suspend
/// error) that the proxy keeps in its errors: they end up in the VMM's log, and a
/// compromised child must not write megabytes there.
pub const MAX_CHILD_TEXT: usize = 1024;

/// `text` from the child, cut to [`MAX_CHILD_TEXT`] bytes (at a character boundary)
/// with the length it had.
fn child_text(mut text: String) -> String {
    if text.len() > MAX_CHILD_TEXT {
        let total = text.len();
        let mut cut = MAX_CHILD_TEXT;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str(&format!("... ({total} bytes from the child)"));
    }
    text
}

/// A suspend error from the child, its strings cut with [`child_text`].
fn child_suspend_error(e: SuspendError) -> SuspendError {
    match e {
        SuspendError::Failed {
            device,
            operation,
            reason,
        } => SuspendError::Failed {
            device: child_text(device),
            operation: child_text(operation),
            reason: child_text(reason),
        },
        SuspendError::Unsupported { device, operation } => SuspendError::Unsupported {
            device: child_text(device),
            operation: child_text(operation),
        },
    }
}

/// The interface to a device child process before it is activated.
///
/// It can be handed to another process ([`ChildProcIntf::send`] / [`ChildProcIntf::recv`],
/// fds passed with `SCM_RIGHTS`) and turns into exactly one [`ProxyDevice`]: the child
/// refuses a second activation.
#[derive(Debug)]
pub struct ChildProcIntf {
    tube: Tube,
    ring: SharedRing,
    child: Child,
    debug_label: String,
}

#[derive(Serialize, Deserialize)]
struct IntfHeader {
    pid: i32,
    debug_label: String,
}

impl ChildProcIntf {
    /// Forks `device` into a child confined by `jail`. Only the fds numbered in
    /// `keep_fds` (which must cover every fd the device uses) and the proxy's own channel
    /// stay open in the child.
    pub fn new<D: BusDevice>(
        device: D,
        jail: &Jail,
        keep_fds: &[RawFd],
    ) -> Result<ChildProcIntf, ProxyError> {
        let debug_label = device.debug_label();
        let (tube, child_tube) = Tube::pair().map_err(ProxyError::TubeSetup)?;
        let ring = SharedRing::new().map_err(ProxyError::RingSetup)?;
        let child_ring_fd = ring.fd().try_clone_to_owned().map_err(ProxyError::DupFd)?;
        let child_ring = SharedRing::from_fd(child_ring_fd).map_err(ProxyError::RingSetup)?;
        let mut keep = keep_fds.to_vec();
        keep.push(child_tube.as_fd().as_raw_fd());
        keep.push(child_ring.fd().as_raw_fd());
        let child = fork_process(jail, &keep, Some(&debug_label), move || {
            child_proc(child_tube, child_ring, device);
        })?;
        Ok(ChildProcIntf {
            tube,
            ring,
            child,
            debug_label,
        })
    }

    /// The child's pid.
    pub fn pid(&self) -> i32 {
        self.child.pid()
    }

    /// Duplicates the interface (its fds), as serde would. Only one of the copies can be
    /// activated. The copy does not own the process: dropping it leaves the child alone.
    pub fn try_clone(&self) -> Result<ChildProcIntf, ProxyError> {
        let dup = |fd: BorrowedFd<'_>| fd.try_clone_to_owned().map_err(ProxyError::DupFd);
        let mut child = Child::from_pidfd(self.child.pid(), dup(self.child.pidfd())?);
        child.disarm();
        Ok(ChildProcIntf {
            tube: Tube::from_fd(dup(self.tube.as_fd())?).map_err(ProxyError::TubeSetup)?,
            ring: SharedRing::from_fd(dup(self.ring.fd())?).map_err(ProxyError::RingSetup)?,
            child,
            debug_label: self.debug_label.clone(),
        })
    }

    /// Sends the interface over `tube` (its socket, ring memfd and pidfd travel as
    /// `SCM_RIGHTS`). Returns this process's [`Child`] handle: if this process forked
    /// the device, keep the handle for as long as the device should live (dropping it
    /// kills the device) so that this process can reap it.
    pub fn send(self, tube: &Tube) -> Result<Child, ProxyError> {
        let header = IntfHeader {
            pid: self.child.pid(),
            debug_label: self.debug_label.clone(),
        };
        tube.send_with_fds(
            &header,
            &[self.tube.as_fd(), self.ring.fd(), self.child.pidfd()],
        )
        .map_err(ProxyError::TubeSetup)?;
        Ok(self.child)
    }

    /// Receives an interface sent with [`ChildProcIntf::send`].
    pub fn recv(tube: &Tube) -> Result<ChildProcIntf, ProxyError> {
        let (header, fds): (IntfHeader, Vec<OwnedFd>) =
            tube.recv_with_fds().map_err(ProxyError::TubeSetup)?;
        let got = fds.len();
        let Ok([sock, ring, pidfd]) = <[OwnedFd; 3]>::try_from(fds) else {
            return Err(ProxyError::TubeSetup(
                outboard_transport::Error::IncorrectFds {
                    request: "ChildProcIntf",
                    got,
                    want: "3",
                },
            ));
        };
        Ok(ChildProcIntf {
            tube: Tube::from_fd(sock).map_err(ProxyError::TubeSetup)?,
            ring: SharedRing::from_fd(ring).map_err(ProxyError::RingSetup)?,
            child: Child::from_pidfd(header.pid, pidfd),
            debug_label: header.debug_label,
        })
    }
}

/// Which per-caller slots are claimed: bit `i` for slot `i` (never [`SHARED_SLOT`]).
#[derive(Debug, Default)]
struct Claims {
    taken: AtomicU32,
}

/// The slots a thread may own: every one but the shared fallback.
const OWNED_MASK: u32 = (1 << SHARED_SLOT) - 1;

impl Claims {
    /// Claims a free slot, lock-free; `None` if all are taken.
    fn claim(&self) -> Option<usize> {
        let mut taken = self.taken.load(Ordering::Relaxed);
        loop {
            let free = !taken & OWNED_MASK;
            if free == 0 {
                return None;
            }
            let bit = free.trailing_zeros();
            match self.taken.compare_exchange_weak(
                taken,
                taken | (1 << bit),
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(bit as usize),
                Err(now) => taken = now,
            }
        }
    }

    fn release(&self, slot: usize) {
        if slot < SHARED_SLOT {
            self.taken.fetch_and(!(1 << slot), Ordering::AcqRel);
        }
    }
}

/// The slots this thread owns, one per proxy it has called; released when the thread
/// exits. A `Weak` keeps the `Claims` allocation (not the proxy) alive, so its address
/// identifies the proxy for as long as the entry exists.
struct ClaimList(Vec<(Weak<Claims>, usize)>);

impl Drop for ClaimList {
    fn drop(&mut self) {
        for (claims, slot) in self.0.drain(..) {
            if let Some(claims) = claims.upgrade() {
                claims.release(slot);
            }
        }
    }
}

thread_local! {
    static CLAIMED: RefCell<ClaimList> = const { RefCell::new(ClaimList(Vec::new())) };
}

/// The slot the calling thread uses on the proxy owning `claims`: its own (claimed on
/// first use, kept until the thread exits), or [`SHARED_SLOT`] when all are taken (a
/// later call tries again) or while the thread is being torn down.
fn caller_slot(claims: &Arc<Claims>) -> usize {
    CLAIMED
        .try_with(|list| {
            let Ok(mut list) = list.try_borrow_mut() else {
                return SHARED_SLOT;
            };
            let me = Arc::as_ptr(claims);
            if let Some(&(_, slot)) = list.0.iter().find(|(w, _)| std::ptr::eq(w.as_ptr(), me)) {
                return slot;
            }
            match claims.claim() {
                Some(slot) => {
                    // Forget proxies that are gone before remembering a new one.
                    list.0.retain(|(w, _)| w.strong_count() > 0);
                    list.0.push((Arc::downgrade(claims), slot));
                    slot
                }
                None => SHARED_SLOT,
            }
        })
        .unwrap_or(SHARED_SLOT)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves consistent state behind (each
    // guarded value is updated by single assignments), so poisoning is ignored.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs a [`BusDevice`] in a jailed child process and forwards every access to it.
///
/// Each calling thread gets a request slot of its own in the shared memory (up to
/// [`SLOTS`](crate::ring::SLOTS)` - 1` threads; more share the last slot), so vCPU
/// threads do not serialize on a lock to reach the device. The device still executes
/// one access at a time, in the order described in [`crate::ring`]: each thread's
/// accesses in program order, and accesses ordered by happens-before across threads in
/// that order.
///
/// The child is shut down (then killed, if it does not exit within
/// [`SHUTDOWN_TIMEOUT`]) and reaped when the proxy is dropped.
pub struct ProxyDevice {
    producer: Producer,
    /// Each slot's private state; an owned slot's lock is only ever taken by its owner
    /// (and by cold commands), so it is uncontended.
    slots: Vec<Mutex<SlotProducer>>,
    claims: Arc<Claims>,
    /// The cold path; held across a whole cold command or config write so that Tube
    /// messages and their ring entries pair up.
    tube: Mutex<Tube>,
    child: Mutex<Child>,
    /// A disarmed second handle on the child's pidfd, for lock-free liveness checks.
    watch: Child,
    broken: AtomicBool,
    reason: Mutex<Option<String>>,
    debug_label: String,
    pid: i32,
    hot_timeout: Duration,
    cold_timeout: Duration,
}

impl std::fmt::Debug for ProxyDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyDevice")
            .field("debug_label", &self.debug_label)
            .field("pid", &self.pid)
            .finish()
    }
}

impl TryFrom<ChildProcIntf> for ProxyDevice {
    type Error = ProxyError;

    fn try_from(intf: ChildProcIntf) -> Result<ProxyDevice, ProxyError> {
        let ChildProcIntf {
            tube,
            ring,
            child,
            debug_label,
        } = intf;
        let label = debug_label.clone();
        let (producer, slots) = Producer::new(ring).map_err(|source| ProxyError::Ring {
            label: label.clone(),
            command: "activate",
            source,
        })?;
        let mut watch = Child::from_pidfd(
            child.pid(),
            child
                .pidfd()
                .try_clone_to_owned()
                .map_err(ProxyError::DupFd)?,
        );
        watch.disarm();
        let proxy = ProxyDevice {
            pid: child.pid(),
            producer,
            slots: slots.into_iter().map(Mutex::new).collect(),
            claims: Arc::new(Claims::default()),
            tube: Mutex::new(tube),
            child: Mutex::new(child),
            watch,
            broken: AtomicBool::new(false),
            reason: Mutex::new(None),
            debug_label,
            hot_timeout: DEFAULT_HOT_TIMEOUT,
            cold_timeout: DEFAULT_COLD_TIMEOUT,
        };
        // Activation goes over the Tube only: a duplicate interface never touches the ring.
        let tube = lock(&proxy.tube);
        let cmd = ColdCommand::Activate;
        let res = cold::send(&tube, &cmd, &[])
            .map_err(|source| ProxyError::Cold {
                label: label.clone(),
                command: "activate",
                source,
            })
            .and_then(|()| {
                proxy.recv_tube::<ColdResult>(
                    &tube,
                    "activate",
                    proxy.cold_timeout,
                    cold::INLINE_MAX as u64,
                )
            });
        drop(tube);
        match res {
            Ok(ColdResult::Ok) => Ok(proxy),
            Ok(ColdResult::Refused(reason)) => {
                // Not ours to kill: the child serves the first activation.
                *lock(&proxy.reason) = Some("activation refused".to_owned());
                proxy.broken.store(true, Ordering::Release);
                lock(&proxy.child).disarm();
                Err(ProxyError::ActivationRefused { label, reason })
            }
            Ok(other) => Err(proxy.fail(ProxyError::UnexpectedResult {
                label,
                command: "activate",
                got: other.kind(),
            })),
            Err(e) => Err(proxy.fail(e)),
        }
    }
}

fn pack(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b[..data.len()].copy_from_slice(data);
    u64::from_le_bytes(b)
}

fn check_len(len: usize, max: usize) -> Result<(), ProxyError> {
    if len == 0 || len > max {
        return Err(ProxyError::DataLength { len, max });
    }
    Ok(())
}

/// The private plumbing shared by every command.
impl ProxyDevice {
    /// Marks the proxy broken, kills and reaps the child, logs, and passes `err` on.
    fn fail(&self, err: ProxyError) -> ProxyError {
        let mut reason = lock(&self.reason);
        if reason.is_none() {
            log::error!("{err}; killing device process {}", self.pid);
            *reason = Some(err.to_string());
            self.broken.store(true, Ordering::Release);
            match lock(&self.child).kill_and_wait(Duration::from_secs(1)) {
                Ok(Some(status)) => log::error!("device process {} {status}", self.pid),
                Ok(None) => log::error!("device process {} did not die within 1 s", self.pid),
                Err(e) => log::error!("{e}"),
            }
        }
        err
    }

    fn check(&self) -> Result<(), ProxyError> {
        if !self.broken.load(Ordering::Acquire) {
            return Ok(());
        }
        Err(ProxyError::Broken {
            label: self.debug_label.clone(),
            reason: lock(&self.reason).clone().unwrap_or_default(),
        })
    }

    /// Asked between futex sleeps: false once the child exited or another caller found
    /// the proxy broken (so every waiter gives up within one sleep slice).
    fn alive(&self) -> bool {
        !self.broken.load(Ordering::Acquire) && !self.watch.has_exited()
    }

    /// Turns a channel error into the proxy's error, breaking the proxy unless another
    /// caller already did (then the error says so).
    fn ring_failed(&self, command: &'static str, source: RingError) -> ProxyError {
        if let Err(broken) = self.check() {
            return broken;
        }
        self.fail(ProxyError::Ring {
            label: self.debug_label.clone(),
            command,
            source,
        })
    }

    /// The calling thread's slot, locked.
    fn slot(&self) -> MutexGuard<'_, SlotProducer> {
        let slot = caller_slot(&self.claims);
        // `slots` has SLOTS entries and `caller_slot` returns less than SLOTS.
        lock(&self.slots[slot % self.slots.len()])
    }

    fn push(
        &self,
        sp: &mut SlotProducer,
        command: &'static str,
        timeout: Duration,
        fill: impl FnOnce(&Entry),
    ) -> Result<u32, ProxyError> {
        self.check()?;
        self.producer
            .push(sp, fill, timeout, &mut || self.alive())
            .map_err(|source| self.ring_failed(command, source))
    }

    /// Waits for entry `seq` of `sp`'s slot; returns its status and data.
    fn wait(
        &self,
        sp: &SlotProducer,
        command: &'static str,
        seq: u32,
        timeout: Duration,
    ) -> Result<(u32, u64), ProxyError> {
        self.producer
            .wait_for(sp, seq, timeout, &mut || self.alive())
            .map_err(|source| self.ring_failed(command, source))?;
        let e = self.producer.entry(sp, seq);
        Ok((
            e.status.load(Ordering::Relaxed),
            e.data.load(Ordering::Relaxed),
        ))
    }

    /// Receives a Tube message the child has sent (or is about to send), bounded by
    /// `timeout` and the child's liveness, of at most `max` bytes of JSON.
    fn recv_tube<T: serde::de::DeserializeOwned>(
        &self,
        tube: &Tube,
        command: &'static str,
        timeout: Duration,
        max: u64,
    ) -> Result<T, ProxyError> {
        let label = &self.debug_label;
        let start = Instant::now();
        loop {
            match tube.wait_readable(Some(Duration::from_millis(10))) {
                Ok(true) => break,
                Ok(false) => {}
                Err(source) => {
                    return Err(self.fail(ProxyError::Tube {
                        label: label.clone(),
                        command,
                        source,
                    }))
                }
            }
            if self.watch.has_exited()
                && !matches!(tube.wait_readable(Some(Duration::ZERO)), Ok(true))
            {
                return Err(self.fail(ProxyError::Ring {
                    label: label.clone(),
                    command,
                    source: RingError::PeerGone { pending: 1 },
                }));
            }
            if start.elapsed() >= timeout {
                return Err(self.fail(ProxyError::Ring {
                    label: label.clone(),
                    command,
                    source: RingError::Timeout { timeout },
                }));
            }
        }
        match cold::recv_within::<T>(tube, max) {
            Ok((msg, fds)) if fds.is_empty() => Ok(msg),
            Ok((_, fds)) => Err(self.fail(ProxyError::Cold {
                label: label.clone(),
                command,
                source: ColdError::Malformed(format!("{} unexpected fds", fds.len())),
            })),
            Err(source) => Err(self.fail(ProxyError::Cold {
                label: label.clone(),
                command,
                source,
            })),
        }
    }

    /// A cold command: queue a COLD entry in the caller's slot, send the command, wait,
    /// receive the answer. The Tube lock is held throughout, so cold commands (and
    /// config writes, whose results may follow on the Tube) never interleave.
    fn cold_locked(
        &self,
        tube: &Tube,
        cmd: &ColdCommand,
        fds: &[BorrowedFd<'_>],
        timeout: Duration,
    ) -> Result<ColdResult, ProxyError> {
        let command = cmd.name();
        let mut sp = self.slot();
        let seq = self.push(&mut sp, command, timeout, |e| {
            e.op.store(op::COLD, Ordering::Relaxed)
        })?;
        if let Err(source) = cold::send(tube, cmd, fds) {
            return Err(self.fail(ProxyError::Cold {
                label: self.debug_label.clone(),
                command,
                source,
            }));
        }
        self.wait(&sp, command, seq, timeout)?;
        drop(sp);
        match self.recv_tube(tube, command, timeout, cmd.max_answer())? {
            ColdResult::Refused(reason) => Err(ProxyError::Refused {
                label: self.debug_label.clone(),
                command,
                reason: child_text(reason),
            }),
            ColdResult::Snapshot(Err(e)) => Ok(ColdResult::Snapshot(Err(child_suspend_error(e)))),
            ColdResult::Done(Err(e)) => Ok(ColdResult::Done(Err(child_suspend_error(e)))),
            other => Ok(other),
        }
    }

    fn cold(&self, cmd: &ColdCommand, fds: &[BorrowedFd<'_>]) -> Result<ColdResult, ProxyError> {
        let tube = lock(&self.tube);
        self.cold_locked(&tube, cmd, fds, self.cold_timeout)
    }

    fn unexpected(&self, command: &'static str, got: ColdResult) -> ProxyError {
        self.fail(ProxyError::UnexpectedResult {
            label: self.debug_label.clone(),
            command,
            got: got.kind(),
        })
    }

    fn expect_ok(&self, st: u32, command: &'static str) -> Result<(), ProxyError> {
        if st == status::OK {
            Ok(())
        } else {
            Err(ProxyError::Refused {
                label: self.debug_label.clone(),
                command,
                reason: format!("status {st}"),
            })
        }
    }

    fn read_register(
        &self,
        opcode: u32,
        command: &'static str,
        reg_idx: usize,
    ) -> Result<u32, ProxyError> {
        let mut sp = self.slot();
        let seq = self.push(&mut sp, command, self.hot_timeout, |e| {
            e.op.store(opcode, Ordering::Relaxed);
            e.reg.store(reg_idx as u32, Ordering::Relaxed);
        })?;
        let (st, value) = self.wait(&sp, command, seq, self.hot_timeout)?;
        self.expect_ok(st, command)?;
        Ok(value as u32)
    }
}

impl ProxyDevice {
    /// Forks `device` into a child confined by `jail` and activates it. Fork devices
    /// early, before the process starts threads, where possible (see [`crate::jail`]).
    pub fn new<D: BusDevice>(
        device: D,
        jail: &Jail,
        keep_fds: &[RawFd],
    ) -> Result<ProxyDevice, ProxyError> {
        ChildProcIntf::new(device, jail, keep_fds)?.try_into()
    }

    /// The child's pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sets the bounds on hot-path calls (reads, config accesses, a full slot) and on
    /// cold-path calls (snapshot, restore, ...).
    pub fn set_timeouts(&mut self, hot: Duration, cold: Duration) {
        self.hot_timeout = hot;
        self.cold_timeout = cold;
    }

    /// How the child ended, once it has (reaping it); `None` while it runs.
    pub fn exit_status(&self) -> Option<crate::fork::ExitStatus> {
        lock(&self.child).try_wait().ok().flatten()
    }

    /// True once a failure made the proxy unusable.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// How many threads currently own a request slot of their own (diagnostics: a
    /// thread releases its slot when it exits; threads beyond
    /// [`SLOTS`](crate::ring::SLOTS)` - 1` share the last one).
    pub fn slots_in_use(&self) -> usize {
        (self.claims.taken.load(Ordering::Relaxed) & OWNED_MASK).count_ones() as usize
    }

    /// Reads `data.len()` (1 to 8) bytes at `info`.
    pub fn try_read(&self, info: BusAccessInfo, data: &mut [u8]) -> Result<(), ProxyError> {
        check_len(data.len(), 8)?;
        let mut sp = self.slot();
        let seq = self.push(&mut sp, "read", self.hot_timeout, |e| {
            e.op.store(op::READ, Ordering::Relaxed);
            e.len.store(data.len() as u32, Ordering::Relaxed);
            e.offset.store(info.offset, Ordering::Relaxed);
            e.address.store(info.address, Ordering::Relaxed);
            e.id.store(info.id as u64, Ordering::Relaxed);
        })?;
        let (st, value) = self.wait(&sp, "read", seq, self.hot_timeout)?;
        drop(sp);
        self.expect_ok(st, "read")?;
        let n = data.len();
        data.copy_from_slice(&value.to_le_bytes()[..n]);
        Ok(())
    }

    /// Posts a write of `data` (1 to 8 bytes) at `info`; it reaches the device before
    /// any later access by this thread (and before any access ordered after this call
    /// by other means, such as a lock).
    pub fn try_write(&self, info: BusAccessInfo, data: &[u8]) -> Result<(), ProxyError> {
        check_len(data.len(), 8)?;
        let mut sp = self.slot();
        self.push(&mut sp, "write", self.hot_timeout, |e| {
            e.op.store(op::WRITE, Ordering::Relaxed);
            e.len.store(data.len() as u32, Ordering::Relaxed);
            e.offset.store(info.offset, Ordering::Relaxed);
            e.address.store(info.address, Ordering::Relaxed);
            e.id.store(info.id as u64, Ordering::Relaxed);
            e.data.store(pack(data), Ordering::Relaxed);
        })?;
        Ok(())
    }

    /// Reads PCI configuration register `reg_idx`.
    pub fn try_config_register_read(&self, reg_idx: usize) -> Result<u32, ProxyError> {
        self.read_register(op::READ_CONFIG, "config_register_read", reg_idx)
    }

    /// Reads virtual configuration register `reg_idx`.
    pub fn try_virtual_config_register_read(&self, reg_idx: usize) -> Result<u32, ProxyError> {
        self.read_register(
            op::READ_VIRTUAL_CONFIG,
            "virtual_config_register_read",
            reg_idx,
        )
    }

    /// Writes `data` (1 to 4 bytes) at byte `offset` of configuration register `reg_idx`.
    pub fn try_config_register_write(
        &self,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) -> Result<ConfigWriteResult, ProxyError> {
        check_len(data.len(), 4)?;
        let command = "config_register_write";
        // A non-empty result follows on the Tube: hold it so no cold command interleaves.
        let tube = lock(&self.tube);
        let mut sp = self.slot();
        let seq = self.push(&mut sp, command, self.hot_timeout, |e| {
            e.op.store(op::WRITE_CONFIG, Ordering::Relaxed);
            e.reg.store(reg_idx as u32, Ordering::Relaxed);
            e.offset.store(offset, Ordering::Relaxed);
            e.len.store(data.len() as u32, Ordering::Relaxed);
            e.data.store(pack(data), Ordering::Relaxed);
        })?;
        let (st, _) = self.wait(&sp, command, seq, self.hot_timeout)?;
        drop(sp);
        match st {
            status::OK => Ok(ConfigWriteResult::default()),
            status::FOLLOWS => {
                self.recv_tube(&tube, command, self.hot_timeout, cold::INLINE_MAX as u64)
            }
            _ => Err(ProxyError::Refused {
                label: self.debug_label.clone(),
                command,
                reason: format!("status {st}"),
            }),
        }
    }

    /// Posts a write of virtual configuration register `reg_idx`.
    pub fn try_virtual_config_register_write(
        &self,
        reg_idx: usize,
        value: u32,
    ) -> Result<(), ProxyError> {
        let mut sp = self.slot();
        self.push(
            &mut sp,
            "virtual_config_register_write",
            self.hot_timeout,
            |e| {
                e.op.store(op::WRITE_VIRTUAL_CONFIG, Ordering::Relaxed);
                e.reg.store(reg_idx as u32, Ordering::Relaxed);
                e.data.store(value as u64, Ordering::Relaxed);
            },
        )?;
        Ok(())
    }

    /// Posts `destroy_device`.
    pub fn try_destroy_device(&self) -> Result<(), ProxyError> {
        let mut sp = self.slot();
        self.push(&mut sp, "destroy_device", self.hot_timeout, |e| {
            e.op.store(op::DESTROY, Ordering::Relaxed);
        })?;
        Ok(())
    }

    /// Hands the device a memfd to mirror its PCI configuration space into.
    pub fn try_init_pci_config_mapping(
        &self,
        shmem: BorrowedFd<'_>,
        base: usize,
        len: usize,
    ) -> Result<bool, ProxyError> {
        match self.cold(&ColdCommand::InitPciConfigMapping { base, len }, &[shmem])? {
            ColdResult::InitPciConfigMapping(ok) => Ok(ok),
            other => Err(self.unexpected("init_pci_config_mapping", other)),
        }
    }

    /// The device's bus ranges.
    pub fn try_get_ranges(&self) -> Result<Vec<(BusRange, BusType)>, ProxyError> {
        match self.cold(&ColdCommand::GetRanges, &[])? {
            ColdResult::Ranges(r) => Ok(r),
            other => Err(self.unexpected("get_ranges", other)),
        }
    }

    fn suspend_op(&self, cmd: ColdCommand) -> Result<ColdResult, SuspendError> {
        let operation = cmd.name().to_owned();
        self.cold(&cmd, &[]).map_err(|e| SuspendError::Failed {
            device: self.debug_label.clone(),
            operation,
            reason: e.to_string(),
        })
    }

    fn done(&self, res: ColdResult, operation: &'static str) -> Result<(), SuspendError> {
        match res {
            ColdResult::Done(r) => r,
            other => Err(SuspendError::Failed {
                device: self.debug_label.clone(),
                operation: operation.to_owned(),
                reason: self.unexpected(operation, other).to_string(),
            }),
        }
    }

    /// Shuts the child down (it drops the device and exits) and reaps it, waiting at
    /// most `timeout` before killing it.
    pub fn shutdown(&self, timeout: Duration) -> Result<(), ProxyError> {
        let tube = lock(&self.tube);
        self.check()?;
        let res = self.cold_locked(&tube, &ColdCommand::Shutdown, &[], timeout);
        {
            let mut reason = lock(&self.reason);
            if reason.is_none() {
                *reason = Some("shut down".to_owned());
            }
            self.broken.store(true, Ordering::Release);
        }
        let mut child = lock(&self.child);
        let reaped = child.wait_timeout(timeout);
        if !matches!(reaped, Ok(Some(_))) {
            let _ = child.kill_and_wait(Duration::from_secs(1));
        }
        match res? {
            ColdResult::Ok => Ok(()),
            other => Err(ProxyError::UnexpectedResult {
                label: self.debug_label.clone(),
                command: "shutdown",
                got: other.kind(),
            }),
        }
    }
}

impl BusDevice for ProxyDevice {
    fn debug_label(&self) -> String {
        self.debug_label.clone()
    }

    fn device_id(&self) -> DeviceId {
        DeviceId::Proxy
    }

    fn read(&mut self, info: BusAccessInfo, data: &mut [u8]) {
        if let Err(e) = self.try_read(info, data) {
            log::error!("{e}");
            data.fill(FAILED_READ);
        }
    }

    fn write(&mut self, info: BusAccessInfo, data: &[u8]) {
        if let Err(e) = self.try_write(info, data) {
            log::error!("{e}");
        }
    }

    fn config_register_write(
        &mut self,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) -> ConfigWriteResult {
        self.try_config_register_write(reg_idx, offset, data)
            .unwrap_or_else(|e| {
                log::error!("{e}");
                ConfigWriteResult::default()
            })
    }

    fn config_register_read(&self, reg_idx: usize) -> u32 {
        self.try_config_register_read(reg_idx).unwrap_or_else(|e| {
            log::error!("{e}");
            u32::MAX
        })
    }

    fn init_pci_config_mapping(&mut self, shmem: BorrowedFd<'_>, base: usize, len: usize) -> bool {
        self.try_init_pci_config_mapping(shmem, base, len)
            .unwrap_or_else(|e| {
                log::error!("{e}");
                false
            })
    }

    fn virtual_config_register_write(&mut self, reg_idx: usize, value: u32) {
        if let Err(e) = self.try_virtual_config_register_write(reg_idx, value) {
            log::error!("{e}");
        }
    }

    fn virtual_config_register_read(&self, reg_idx: usize) -> u32 {
        self.try_virtual_config_register_read(reg_idx)
            .unwrap_or_else(|e| {
                log::error!("{e}");
                u32::MAX
            })
    }

    fn get_ranges(&self) -> Vec<(BusRange, BusType)> {
        self.try_get_ranges().unwrap_or_else(|e| {
            log::error!("{e}");
            Vec::new()
        })
    }

    fn destroy_device(&mut self) {
        if let Err(e) = self.try_destroy_device() {
            log::error!("{e}");
        }
    }
}

impl Suspendable for ProxyDevice {
    fn snapshot(&mut self) -> Result<serde_json::Value, SuspendError> {
        match self.suspend_op(ColdCommand::Snapshot)? {
            ColdResult::Snapshot(r) => r,
            other => Err(SuspendError::Failed {
                device: self.debug_label.clone(),
                operation: "snapshot".to_owned(),
                reason: self.unexpected("snapshot", other).to_string(),
            }),
        }
    }

    fn restore(&mut self, data: serde_json::Value) -> Result<(), SuspendError> {
        let res = self.suspend_op(ColdCommand::Restore { data })?;
        self.done(res, "restore")
    }

    fn sleep(&mut self) -> Result<(), SuspendError> {
        let res = self.suspend_op(ColdCommand::Sleep)?;
        self.done(res, "sleep")
    }

    fn wake(&mut self) -> Result<(), SuspendError> {
        let res = self.suspend_op(ColdCommand::Wake)?;
        self.done(res, "wake")
    }
}

impl Drop for ProxyDevice {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown(SHUTDOWN_TIMEOUT) {
            if !matches!(e, ProxyError::Broken { .. }) {
                log::error!("{e}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The child side.

/// True unless the parent's end of the Tube is closed.
fn parent_alive(tube: &Tube) -> bool {
    let mut fds = [PollFd::new(tube, PollFlags::IN)];
    match poll(
        &mut fds,
        Some(&Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        }),
    ) {
        Ok(n) if n > 0 => !fds[0].revents().intersects(PollFlags::HUP | PollFlags::ERR),
        Ok(_) => true,
        Err(_) => false,
    }
}

fn child_send(tube: &Tube, label: &str, res: &ColdResult) {
    if let Err(e) = cold::send(tube, res, &[]) {
        log::error!("{label}: sending a result to the VMM failed: {e}");
        // Tell the VMM rather than leave it waiting for its timeout.
        let refusal = ColdResult::Refused(format!("sending the result failed: {e}"));
        if let Err(e) = cold::send(tube, &refusal, &[]) {
            log::error!("{label}: sending a refusal failed too: {e}");
        }
    }
}

/// The device process: wait for activation, then serve the slots until shutdown or until
/// the VMM goes away.
fn child_proc<D: BusDevice>(tube: Tube, ring: SharedRing, device: D) {
    let mut device = Some(device);
    let label = device.as_ref().map(|d| d.debug_label()).unwrap_or_default();
    if let Some(d) = device.as_mut() {
        d.on_sandboxed();
    }
    // Take the consumer role before activation: the VMM publishes nothing before it
    // hears that activation succeeded, so the first ticket is read before any is taken.
    let mut consumer = Consumer::new(ring);
    // Activation, over the Tube only.
    loop {
        match tube.wait_readable(Some(Duration::from_millis(100))) {
            Ok(true) => break,
            Ok(false) if parent_alive(&tube) => continue,
            _ => return,
        }
    }
    match cold::recv::<ColdCommand>(&tube).map(|(cmd, _fds)| cmd) {
        Ok(ColdCommand::Activate) => child_send(&tube, &label, &ColdResult::Ok),
        Ok(other) => {
            child_send(
                &tube,
                &label,
                &ColdResult::Refused(format!("{} before activation", other.name())),
            );
            return;
        }
        Err(e) => {
            log::error!("{label}: failed before activation: {e}");
            return;
        }
    }
    let mut spin = true;
    loop {
        let slot = match consumer.wait(spin) {
            Next::Ready(slot) => slot,
            Next::Idle => {
                spin = false;
                if !parent_alive(&tube) {
                    return;
                }
                // A COLD entry is always queued before its message is sent, so a message
                // waiting while no slot holds an entry is unsolicited: a duplicate
                // interface trying to activate. Refuse it.
                if matches!(tube.wait_readable(Some(Duration::ZERO)), Ok(true))
                    && !consumer.pending()
                {
                    let answer = match cold::recv::<ColdCommand>(&tube).map(|(cmd, _fds)| cmd) {
                        Ok(ColdCommand::Activate) => {
                            ColdResult::Refused("already activated".to_owned())
                        }
                        Ok(other) => {
                            ColdResult::Refused(format!("{} without a queued entry", other.name()))
                        }
                        Err(e) => ColdResult::Refused(format!("bad message: {e}")),
                    };
                    child_send(&tube, &label, &answer);
                }
                continue;
            }
            Next::Corrupt(slot) => {
                log::error!("{label}: the VMM corrupted request slot {slot}");
                return;
            }
        };
        spin = true;
        let shutdown = match consumer.entry(slot) {
            Ok(entry) => serve_entry(entry, &tube, &mut device, &label),
            Err(e) => {
                log::error!("{label}: {e}");
                return;
            }
        };
        if let Err(e) = consumer.complete(slot) {
            log::error!("{label}: {e}");
            return;
        }
        if shutdown {
            return;
        }
    }
}

/// Executes one entry; returns true on shutdown.
fn serve_entry<D: BusDevice>(e: &Entry, tube: &Tube, device: &mut Option<D>, label: &str) -> bool {
    let opcode = e.op.load(Ordering::Relaxed);
    let Some(dev) = device.as_mut() else {
        e.status.store(status::REFUSED, Ordering::Relaxed);
        return false;
    };
    let len = e.len.load(Ordering::Relaxed) as usize;
    let mut st = status::OK;
    match opcode {
        op::READ if (1..=8).contains(&len) => {
            let mut buf = [0u8; 8];
            let info = access_info(e);
            dev.read(info, &mut buf[..len]);
            e.data.store(u64::from_le_bytes(buf), Ordering::Relaxed);
        }
        op::WRITE if (1..=8).contains(&len) => {
            let buf = e.data.load(Ordering::Relaxed).to_le_bytes();
            dev.write(access_info(e), &buf[..len]);
        }
        op::READ_CONFIG => {
            let v = dev.config_register_read(e.reg.load(Ordering::Relaxed) as usize);
            e.data.store(v as u64, Ordering::Relaxed);
        }
        op::WRITE_CONFIG if (1..=4).contains(&len) => {
            let buf = e.data.load(Ordering::Relaxed).to_le_bytes();
            let res = dev.config_register_write(
                e.reg.load(Ordering::Relaxed) as usize,
                e.offset.load(Ordering::Relaxed),
                &buf[..len],
            );
            if !res.is_empty() {
                match cold::send(tube, &res, &[]) {
                    Ok(()) => st = status::FOLLOWS,
                    Err(err) => {
                        log::error!("{label}: sending a config write result failed: {err}");
                        st = status::REFUSED;
                    }
                }
            }
        }
        op::READ_VIRTUAL_CONFIG => {
            let v = dev.virtual_config_register_read(e.reg.load(Ordering::Relaxed) as usize);
            e.data.store(v as u64, Ordering::Relaxed);
        }
        op::WRITE_VIRTUAL_CONFIG => {
            dev.virtual_config_register_write(
                e.reg.load(Ordering::Relaxed) as usize,
                e.data.load(Ordering::Relaxed) as u32,
            );
        }
        op::DESTROY => dev.destroy_device(),
        op::COLD => return serve_cold(tube, device, label),
        _ => st = status::REFUSED,
    }
    e.status.store(st, Ordering::Relaxed);
    false
}

fn access_info(e: &Entry) -> BusAccessInfo {
    BusAccessInfo {
        offset: e.offset.load(Ordering::Relaxed),
        address: e.address.load(Ordering::Relaxed),
        id: e.id.load(Ordering::Relaxed) as usize,
    }
}

fn serve_cold<D: BusDevice>(tube: &Tube, device: &mut Option<D>, label: &str) -> bool {
    // The parent sends the command right after queueing the entry.
    match tube.wait_readable(Some(DEFAULT_COLD_TIMEOUT)) {
        Ok(true) => {}
        _ => {
            child_send(
                tube,
                label,
                &ColdResult::Refused("no command arrived".to_owned()),
            );
            return false;
        }
    }
    let (cmd, mut fds) = match cold::recv::<ColdCommand>(tube) {
        Ok(m) => m,
        Err(e) => {
            child_send(
                tube,
                label,
                &ColdResult::Refused(format!("bad command: {e}")),
            );
            return false;
        }
    };
    let Some(dev) = device.as_mut() else {
        child_send(
            tube,
            label,
            &ColdResult::Refused("device is gone".to_owned()),
        );
        return false;
    };
    let res = match cmd {
        ColdCommand::Activate => ColdResult::Refused("already activated".to_owned()),
        ColdCommand::InitPciConfigMapping { base, len } => match fds.pop() {
            Some(fd) if fds.is_empty() => {
                ColdResult::InitPciConfigMapping(dev.init_pci_config_mapping(fd.as_fd(), base, len))
            }
            _ => ColdResult::Refused("expected exactly one shared memory fd".to_owned()),
        },
        ColdCommand::Shutdown => {
            // Drop the device first so its Drop runs before the VMM hears back.
            drop(device.take());
            child_send(tube, label, &ColdResult::Ok);
            return true;
        }
        ColdCommand::GetRanges => ColdResult::Ranges(dev.get_ranges()),
        ColdCommand::Snapshot => ColdResult::Snapshot(dev.snapshot()),
        ColdCommand::Restore { data } => ColdResult::Done(dev.restore(data)),
        ColdCommand::Sleep => ColdResult::Done(dev.sleep()),
        ColdCommand::Wake => ColdResult::Done(dev.wake()),
    };
    child_send(tube, label, &res);
    false
}
