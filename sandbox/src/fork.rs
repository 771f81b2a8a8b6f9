//! [`fork_process`]: run a closure in a jailed child, and the [`Child`] handle that
//! reaps it.

use std::ffi::CString;
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::pipe::{pipe_with, PipeFlags};
use rustix::process::{
    pidfd_open, pidfd_send_signal, waitid, Pid, PidfdFlags, Signal, WaitId, WaitIdOptions,
};
use thiserror::Error;

use crate::jail::{IdMap, Jail, JailError, Prepared, Step};

/// How long the parent waits for the child to finish its jail setup.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Exit code of a child whose jail setup failed (the step is reported separately).
pub const EXIT_SETUP_FAILED: i32 = 126;
/// Exit code of a child whose closure panicked.
pub const EXIT_PANIC: i32 = 101;
/// Exit code of a child in its own pid namespace that aborted (`abort()`: a failed
/// allocation, for one). Such a child is pid 1 of its namespace, which the kernel
/// shields from its own signals unless it handles them, so `SIGABRT` could not end it
/// (glibc then fell back to a faulting instruction: a `SIGSEGV` that looked like a
/// crash). The jail handles `SIGABRT` there by exiting with this status, the shell's
/// 128 + `SIGABRT`.
pub const EXIT_ABORTED: i32 = 128 + libc::SIGABRT;

/// The `SIGABRT` handler of pid 1 of a jail's pid namespace (see [`EXIT_ABORTED`]).
extern "C" fn exit_aborted(_: libc::c_int) {
    exit_now(EXIT_ABORTED);
}

/// Errors of [`fork_process`] and [`Child`].
#[cfg_attr(test, remain::sorted)]
#[derive(Debug, Error)]
pub enum ForkError {
    /// The child died before it reported that its jail was set up.
    #[error("the child died during jail setup: {status}")]
    DiedDuringSetup {
        /// How it ended (if it could be collected).
        status: ExitStatus,
    },
    /// `fork` failed.
    #[error("fork failed: {0}")]
    Fork(std::io::Error),
    /// Writing the child's id maps failed.
    #[error("writing /proc/{pid}/{file} = {content:?} failed: {source}")]
    IdMap {
        /// The child.
        pid: i32,
        /// `setgroups`, `uid_map` or `gid_map`.
        file: &'static str,
        /// What was written.
        content: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The jail could not be prepared.
    #[error(transparent)]
    Jail(#[from] JailError),
    /// `pidfd_open` failed.
    #[error("pidfd_open({pid}) failed: {source}")]
    Pidfd {
        /// The child.
        pid: i32,
        /// The OS error.
        source: Errno,
    },
    /// Creating a pipe failed.
    #[error("creating a setup pipe failed: {0}")]
    Pipe(Errno),
    /// The child's jail setup failed at `step`.
    #[error("jail setup failed in the child at {step:?}: {}",
        std::io::Error::from_raw_os_error(*errno))]
    Setup {
        /// The step.
        step: Step,
        /// The errno.
        errno: i32,
    },
    /// Signalling the child failed.
    #[error("signalling pid {pid} failed: {source}")]
    Signal {
        /// The child.
        pid: i32,
        /// The OS error.
        source: Errno,
    },
    /// The child sent a status record that cannot be decoded.
    #[error("malformed status record from the child: {record:?}")]
    Status {
        /// The raw record.
        record: [u32; 3],
    },
    /// The child did not finish its setup in time.
    #[error("the child did not finish jail setup within {0:?}")]
    Timeout(Duration),
    /// Waiting for the child failed.
    #[error("waiting for pid {pid} failed: {source}")]
    Wait {
        /// The child.
        pid: i32,
        /// The OS error.
        source: Errno,
    },
}

/// How a child ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Exited(i32),
    /// It was killed by this signal.
    Signaled(i32),
    /// It exited, but it is not our child, so its status is not known.
    Unknown,
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Exited(c) => write!(f, "exited with code {c}"),
            ExitStatus::Signaled(s) => write!(f, "killed by signal {s}"),
            ExitStatus::Unknown => write!(f, "exited (status unknown: not our child)"),
        }
    }
}

/// A forked child: its pid and a pidfd. Dropping it kills the child (if it still runs)
/// and reaps it, waiting at most two seconds.
#[derive(Debug)]
pub struct Child {
    pid: i32,
    pidfd: OwnedFd,
    status: Option<ExitStatus>,
    kill_on_drop: bool,
}

fn poll_timeout(d: Duration) -> Timespec {
    Timespec::try_from(d).unwrap_or(Timespec {
        tv_sec: i64::MAX,
        tv_nsec: 0,
    })
}

impl Child {
    /// Wraps a pidfd received from elsewhere (for instance with a `ChildProcIntf`).
    /// If the process is not our child, its exit is still seen but its status is
    /// [`ExitStatus::Unknown`].
    pub fn from_pidfd(pid: i32, pidfd: OwnedFd) -> Child {
        Child {
            pid,
            pidfd,
            status: None,
            kill_on_drop: true,
        }
    }

    /// Makes dropping this handle leave the child alone (someone else owns it).
    pub fn disarm(&mut self) {
        self.kill_on_drop = false;
    }

    /// The child's pid (in the caller's pid namespace).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The child's pidfd.
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// True once the child has exited (reaped or not). Never blocks.
    pub fn has_exited(&self) -> bool {
        if self.status.is_some() {
            return true;
        }
        let mut fds = [PollFd::new(&self.pidfd, PollFlags::IN)];
        matches!(poll(&mut fds, Some(&Timespec { tv_sec: 0, tv_nsec: 0 })), Ok(n) if n > 0)
    }

    /// The exit status if the child has exited (reaping it), `None` if it still runs.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, ForkError> {
        if let Some(s) = self.status {
            return Ok(Some(s));
        }
        match waitid(
            WaitId::PidFd(self.pidfd.as_fd()),
            WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
        ) {
            Ok(Some(st)) => {
                let status = if let Some(code) = st.exit_status() {
                    ExitStatus::Exited(code)
                } else if let Some(sig) = st.terminating_signal() {
                    ExitStatus::Signaled(sig)
                } else {
                    ExitStatus::Unknown
                };
                self.status = Some(status);
                Ok(Some(status))
            }
            Ok(None) => Ok(None),
            Err(Errno::CHILD) => {
                if self.has_exited() {
                    self.status = Some(ExitStatus::Unknown);
                    Ok(self.status)
                } else {
                    Ok(None)
                }
            }
            Err(Errno::INTR) => Ok(None),
            Err(source) => Err(ForkError::Wait {
                pid: self.pid,
                source,
            }),
        }
    }

    /// Waits up to `timeout` for the child to exit, reaping it.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, ForkError> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            let Some(left) = timeout.checked_sub(start.elapsed()) else {
                return Ok(None);
            };
            let mut fds = [PollFd::new(&self.pidfd, PollFlags::IN)];
            match poll(&mut fds, Some(&poll_timeout(left))) {
                Ok(_) | Err(Errno::INTR) => {}
                Err(source) => {
                    return Err(ForkError::Wait {
                        pid: self.pid,
                        source,
                    })
                }
            }
        }
    }

    /// Sends `SIGKILL`. A child that already exited is not an error.
    pub fn kill(&self) -> Result<(), ForkError> {
        if self.status.is_some() {
            return Ok(());
        }
        match pidfd_send_signal(&self.pidfd, Signal::KILL) {
            Ok(()) | Err(Errno::SRCH) => Ok(()),
            Err(source) => Err(ForkError::Signal {
                pid: self.pid,
                source,
            }),
        }
    }

    /// Kills the child and waits up to `timeout` for it to be reaped.
    pub fn kill_and_wait(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, ForkError> {
        self.kill()?;
        self.wait_timeout(timeout)
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.status.is_none() && self.kill_on_drop {
            if let Err(e) = self.kill_and_wait(Duration::from_secs(2)) {
                log::error!("failed to kill and reap child {}: {e}", self.pid);
            }
        }
    }
}

const KIND_NEED_MAPS: u32 = 1;
const KIND_READY: u32 = 2;
const KIND_ERROR: u32 = 3;

fn report(fd: RawFd, kind: u32, step: u32, errno: i32) {
    let rec: [u32; 3] = [kind, step, errno as u32];
    // SAFETY: writes 12 bytes from a local array; a pipe write this small is atomic.
    // Failure is ignored: the parent then sees EOF and reports the child's exit.
    unsafe { libc::write(fd, rec.as_ptr().cast(), std::mem::size_of_val(&rec)) };
}

fn exit_now(code: i32) -> ! {
    // SAFETY: _exit ends the process at once without running destructors or atexit
    // handlers of the parent's state, which is the point.
    unsafe { libc::_exit(code) }
}

/// Forks a child confined by `jail` that runs `f`, and returns once the jail is set up.
///
/// Only the fds numbered in `keep_fds` (plus stdio unless [`Jail::close_stdio`]) stay
/// open in the child; typically they belong to the state `f` captures, and they must stay
/// open in the caller until `fork_process` returns. Numbers rather than `BorrowedFd`s, so
/// that their owners can move into `f`.
///
/// The child never returns into the caller's code: after `f` it calls `_exit(0)`
/// (`_exit(101)` if `f` panicked), so no destructor of the parent's state runs twice.
/// `name` (at most 15 bytes are used) becomes the child's `comm`.
///
/// See the [`crate::jail`] module documentation for the order of operations and for what
/// forking a multi-threaded process means for `f`.
pub fn fork_process<F: FnOnce()>(
    jail: &Jail,
    keep_fds: &[RawFd],
    name: Option<&str>,
    f: F,
) -> Result<Child, ForkError> {
    let mut prepared = jail.prepare(keep_fds)?;
    let name = name.and_then(|n| {
        let bytes: Vec<u8> = n.bytes().filter(|&b| b != 0).take(15).collect();
        CString::new(bytes).ok()
    });
    let (status_r, status_w) = pipe_with(PipeFlags::CLOEXEC).map_err(ForkError::Pipe)?;
    let (go_r, go_w) = pipe_with(PipeFlags::CLOEXEC).map_err(ForkError::Pipe)?;
    // SAFETY: getpid cannot fail.
    let parent = unsafe { libc::getpid() };

    // SAFETY: fork is safe to call; in the child only async-signal-safe system calls on
    // data prepared above run until the jail is complete (see the jail module docs),
    // then `f`, and the child ends with `_exit` without returning into our caller.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(ForkError::Fork(std::io::Error::last_os_error()));
    }
    if pid == 0 {
        let status_w = status_w.as_raw_fd();
        // SAFETY: closing the parent's ends in the child, so EOF works both ways.
        unsafe {
            libc::close(status_r.as_raw_fd());
            libc::close(go_w.as_raw_fd());
        }
        let go_r = go_r.as_raw_fd();
        match child_setup(&mut prepared, parent, status_w, go_r, name.as_deref()) {
            Ok(()) => {}
            Err((step, errno)) => {
                report(status_w, KIND_ERROR, step as u32, errno);
                exit_now(EXIT_SETUP_FAILED);
            }
        }
        report(status_w, KIND_READY, 0, 0);
        // SAFETY: closing our status pipe end; nothing else refers to it.
        unsafe { libc::close(status_w) };
        if prepared.apply_seccomp().is_err() {
            exit_now(EXIT_SETUP_FAILED);
        }
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        exit_now(if result.is_ok() { 0 } else { EXIT_PANIC });
    }

    drop(status_w);
    drop(go_r);
    let pidfd = match pidfd_open(
        Pid::from_raw(pid).ok_or(ForkError::Fork(std::io::Error::other(
            "fork returned pid 0",
        )))?,
        PidfdFlags::empty(),
    ) {
        Ok(fd) => fd,
        Err(source) => {
            // SAFETY: kill and reap our own child by pid; it cannot have been reused
            // since it was never waited for.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
            return Err(ForkError::Pidfd { pid, source });
        }
    };
    let mut child = Child::from_pidfd(pid, pidfd);
    // From here on, `child`'s Drop kills and reaps on any error.
    let maps = (prepared.uid_map, prepared.gid_map);
    drop(prepared);
    parent_handshake(&mut child, &status_r, &go_w, maps)?;
    Ok(child)
}

fn parent_handshake(
    child: &mut Child,
    status_r: &OwnedFd,
    go_w: &OwnedFd,
    maps: (IdMap, IdMap),
) -> Result<(), ForkError> {
    let deadline = Instant::now() + SETUP_TIMEOUT;
    loop {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            return Err(ForkError::Timeout(SETUP_TIMEOUT));
        };
        let mut fds = [PollFd::new(status_r, PollFlags::IN)];
        match poll(&mut fds, Some(&poll_timeout(left))) {
            Ok(0) => return Err(ForkError::Timeout(SETUP_TIMEOUT)),
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => return Err(ForkError::Pipe(e)),
        }
        let mut rec = [0u32; 3];
        let n = loop {
            // SAFETY: reads at most 12 bytes into a local array of that size.
            let n = unsafe {
                libc::read(
                    status_r.as_raw_fd(),
                    rec.as_mut_ptr().cast(),
                    std::mem::size_of_val(&rec),
                )
            };
            if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            break n;
        };
        if n == 0 {
            let status = child
                .wait_timeout(Duration::from_secs(2))?
                .unwrap_or(ExitStatus::Unknown);
            return Err(ForkError::DiedDuringSetup { status });
        }
        if n != std::mem::size_of_val(&rec) as isize {
            return Err(ForkError::Status { record: rec });
        }
        match rec[0] {
            KIND_NEED_MAPS => {
                write_id_maps(child.pid(), maps.0, maps.1)?;
                let go = [1u8];
                // SAFETY: writes one byte from a local array.
                if unsafe { libc::write(go_w.as_raw_fd(), go.as_ptr().cast(), 1) } != 1 {
                    return Err(ForkError::Pipe(Errno::PIPE));
                }
            }
            KIND_READY => return Ok(()),
            KIND_ERROR => {
                let step = Step::from_u32(rec[1]).ok_or(ForkError::Status { record: rec })?;
                let _ = child.wait_timeout(Duration::from_secs(2));
                return Err(ForkError::Setup {
                    step,
                    errno: rec[2] as i32,
                });
            }
            _ => return Err(ForkError::Status { record: rec }),
        }
    }
}

fn write_id_maps(pid: i32, uid: IdMap, gid: IdMap) -> Result<(), ForkError> {
    let write = |file: &'static str, content: String| -> Result<(), ForkError> {
        std::fs::write(format!("/proc/{pid}/{file}"), content.as_bytes()).map_err(|source| {
            ForkError::IdMap {
                pid,
                file,
                content,
                source,
            }
        })
    };
    write("setgroups", "deny".to_owned())?;
    write("uid_map", format!("{} {} 1\n", uid.inside, uid.outside))?;
    write("gid_map", format!("{} {} 1\n", gid.inside, gid.outside))
}

/// The child's setup, steps 1 to 9 (see the jail module docs). Async-signal-safe only.
fn child_setup(
    p: &mut Prepared,
    parent: libc::pid_t,
    status_w: RawFd,
    go_r: RawFd,
    name: Option<&std::ffi::CStr>,
) -> Result<(), (Step, i32)> {
    // A relay must not outlive the parent.
    let relay_signal = p.pid_ns.then_some(libc::SIGKILL);
    p.set_parent_death_signal(relay_signal, parent)?;
    if let Some(name) = name {
        // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
        unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0) };
    }
    if p.user_ns {
        p.unshare_user()?;
        report(status_w, KIND_NEED_MAPS, 0, 0);
        let mut go = [0u8; 1];
        loop {
            // SAFETY: reads one byte into a local array.
            let n = unsafe { libc::read(go_r, go.as_mut_ptr().cast(), 1) };
            if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            if n != 1 || go[0] != 1 {
                return Err((Step::IdMapHandshake, libc::EPROTO));
            }
            break;
        }
        p.set_ids()?;
        // Changing the effective uid (root outside becomes 65534) makes the kernel clear
        // the parent-death signal (commit_creds): set it again, and check again that
        // the parent is still there.
        p.set_parent_death_signal(relay_signal, parent)?;
    }
    // SAFETY: closing our copy of the handshake pipe.
    unsafe { libc::close(go_r) };
    p.unshare_rest()?;
    if p.pid_ns {
        enter_pid_namespace(p)?;
    }
    p.confine(status_w)
}

/// Forks pid 1 of the new pid namespace; the current process becomes its relay and never
/// returns from here.
fn enter_pid_namespace(p: &Prepared) -> Result<(), (Step, i32)> {
    let mut alive: [RawFd; 2] = [-1; 2];
    // SAFETY: pipe2 fills the local two-element array.
    if unsafe { libc::pipe2(alive.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err((
            Step::ForkPidNamespace,
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        ));
    }
    // SAFETY: this process is single-threaded (a fork of the caller); both sides continue
    // with system calls only.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err((
            Step::ForkPidNamespace,
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        ));
    }
    if pid == 0 {
        // pid 1: die with the relay, and make sure the relay did not die already.
        // SAFETY: closes our copy of the write end; prctl/poll with local data.
        unsafe {
            libc::close(alive[1]);
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            );
            let mut pfd = libc::pollfd {
                fd: alive[0],
                events: libc::POLLIN,
                revents: 0,
            };
            if libc::poll(&mut pfd, 1, 0) != 0 {
                exit_now(EXIT_SETUP_FAILED);
            }
            libc::close(alive[0]);
            // abort() must still end pid 1 (see EXIT_ABORTED).
            libc::signal(
                libc::SIGABRT,
                exit_aborted as *const () as libc::sighandler_t,
            );
        }
        let _ = p;
        return Ok(());
    }
    p.harden_relay();
    relay(pid, alive[1])
}

/// The relay: holds nothing but the liveness pipe, waits for pid 1 and ends the same way.
fn relay(child: libc::pid_t, keep: RawFd) -> ! {
    // SAFETY: system calls on local data in a single-threaded process.
    unsafe {
        if keep > 0 {
            libc::syscall(libc::SYS_close_range, 0u32, (keep - 1) as u32, 0u32);
        }
        libc::syscall(libc::SYS_close_range, (keep + 1) as u32, u32::MAX, 0u32);
        let mut status = 0;
        loop {
            let r = libc::waitpid(child, &mut status, 0);
            if r == child {
                break;
            }
            if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                exit_now(EXIT_SETUP_FAILED);
            }
        }
        if libc::WIFEXITED(status) {
            exit_now(libc::WEXITSTATUS(status));
        }
        if libc::WIFSIGNALED(status) {
            let sig = libc::WTERMSIG(status);
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &no_core);
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::kill(libc::getpid(), sig);
            exit_now(128 + sig);
        }
        exit_now(EXIT_SETUP_FAILED)
    }
}
