//! Jailed device workers: a vhost-user worker (connection handling and device) forked
//! into a child confined by an `outboard_sandbox::Jail`.
//!
//! # Who owns what
//!
//! The parent (the daemon) binds the vhost-user listening socket and keeps it for its
//! whole life. For each worker it forks a child with [`JailedWorker::spawn`]; the child
//! gets that listening socket, a stop eventfd and the fds the caller passes to inherit
//! (a counter page, links to sibling workers; every other fd is closed), builds its
//! device *inside* the jail (so the device's own sockets and
//! eventfds never exist in the parent), then runs the ordinary worker loop
//! ([`crate::vhost_user::daemon::serve`]): it accepts the front-end, maps the memory
//! table and serves the rings. When the child dies the parent reaps it, reports how it
//! ended (a seccomp kill shows as signal 31, `SIGSYS`) and forks a new one on the same
//! listening socket, so a front-end that reconnects (`reconnect-ms`) meets a fresh
//! device and connections queued meanwhile wait in the backlog. The parent stops a
//! child by writing its stop eventfd (the worker loop ends, the child exits 0), and
//! kills it if it does not exit in time.
//!
//! # The jail ([`worker_jail`])
//!
//! New user namespace (root inside; outside it is the daemon's uid, or 65534 `nobody`
//! when the daemon runs as root, so an escape lands unprivileged), pid, mount, net, IPC,
//! UTS and cgroup namespaces. The root is an empty read-only tmpfs in which only the
//! directories the device needs are bind-mounted read-write at their own paths (for
//! vsock, the directory of `uds-path`: the host listener `<uds_path>` is created there
//! and guest connections go to `<uds_path>_<port>`; path-based AF_UNIX sockets work
//! across network namespaces; with `--forward-cid` none: AF_VSOCK sockets are not
//! bound to a network namespace, so the worker binds its forward ports and connects to
//! the forward CID from inside the jail). `no_new_privs`, every capability dropped, rlimits (open
//! files, no core dumps), parent-death `SIGKILL`, and last a seccomp allow-list
//! ([`WORKER_SYSCALLS`]) whose default action is chosen with [`SeccompMode`] (kill the
//! process, fail with `EPERM`, or log — the mode to develop the list with: the kernel
//! logs each syscall outside it as an audit record and lets it run).
//!
//! Because the worker's uid outside is `nobody` when the daemon runs as root, that uid
//! must be able to create sockets in the `uds-path` directory and to connect to the
//! host services' `<uds_path>_<port>` sockets (write permission on them).
//!
//! # Forking
//!
//! Fork workers from a thread that lives as long as they do (the parent-death signal
//! belongs to the forking thread) and, ideally, from a single-threaded process: the
//! `outboard` binary forks from its main thread and runs no other threads in jail mode.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use outboard_sandbox::proxy::CHILD_SYSCALLS;
use outboard_sandbox::SeccompPolicy;
use outboard_sandbox::{fork_process, Child, ExitStatus, ForkError, Jail, JailError};
use seccompiler::SeccompAction;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

/// Exit code of a worker whose serve function returned an error.
pub const EXIT_WORKER_ERROR: i32 = 1;

/// Open files a jailed worker may have (front-end fds, memory regions, host sockets).
pub const WORKER_NOFILE: u64 = 4096;

/// The resource ceilings of a jailed worker, beyond its fds ([`WORKER_NOFILE`]).
///
/// - `data_bytes` is `RLIMIT_DATA`: the worker's private writable memory (heap,
///   anonymous mappings). Guest memory and the media device's buffers are shared file
///   mappings and do not count, so the ceiling bounds exactly what a guest could make
///   the worker allocate for itself; a worker that reaches it fails its allocation and
///   dies (the Rust runtime aborts), is reported and replaced, and the daemon's other
///   VMs, each in its own worker, keep running. `RLIMIT_AS` would count guest memory.
/// - `tasks` is `RLIMIT_NPROC`, counted per user namespace (Linux >= 5.14), so per
///   worker: the worker is single-threaded and its seccomp list has no `clone`, so this
///   matters in `--jail-seccomp errno|log` mode, where a stray `clone` is not fatal.
///
/// A cgroup v2 `memory.max`/`pids.max` per worker would also bound page cache and
/// kernel memory; the daemon does not create cgroups (it would need a delegated
/// subtree), so the rlimits are the ceiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerLimits {
    /// `RLIMIT_DATA` in bytes.
    pub data_bytes: u64,
    /// `RLIMIT_NPROC`.
    pub tasks: u64,
}

impl Default for WorkerLimits {
    /// 1 GiB of private memory (a vsock worker at its 1,024-connection cap with every
    /// connection's 256 KiB buffer full needs a quarter of it), 4 tasks (the worker and
    /// the pid-namespace relay, with room).
    fn default() -> Self {
        WorkerLimits {
            data_bytes: 1 << 30,
            tasks: 4,
        }
    }
}

outboard_sandbox::syscall_list! {
    /// The system calls a jailed vhost-user worker makes beyond the sandbox's own
    /// [`CHILD_SYSCALLS`]: epoll, eventfds, AF_UNIX sockets (the vhost-user connection
    /// with fd passing, the muxer's listeners and connects), mapping the front-end's
    /// memory, and what the Rust runtime uses (signal frames, sleeping, time). Written
    /// once for every architecture (the rule is in `outboard_sandbox::syscalls`); these
    /// are this target's numbers, [`WORKER_SYSCALL_NAMES`] the names.
    pub const WORKER_SYSCALLS, WORKER_SYSCALL_NAMES = {
        common: [
            SYS_accept4,
            SYS_bind,
            SYS_clock_gettime,
            SYS_clock_nanosleep,
            SYS_connect,
            SYS_dup,
            SYS_dup3,
            SYS_epoll_create1,
            SYS_epoll_ctl,
            // rustix's epoll::wait (the vsock muxer, the media runner) on every
            // architecture; vmm-sys-util's Epoll::wait (glibc's epoll_wait(), the
            // daemon loop) on aarch64.
            SYS_epoll_pwait,
            SYS_eventfd2,
            SYS_fallocate,
            SYS_fstatfs,
            SYS_ftruncate,
            SYS_getpeername,
            SYS_getpid,
            SYS_getrandom,
            SYS_getsockname,
            SYS_getsockopt,
            SYS_gettid,
            SYS_ioctl,
            SYS_listen,
            SYS_lseek,
            SYS_mprotect,
            SYS_nanosleep,
            SYS_pipe2,
            SYS_pwrite64,
            SYS_read,
            SYS_readv,
            SYS_recvfrom,
            SYS_restart_syscall,
            SYS_rt_sigaction,
            SYS_rt_sigreturn,
            SYS_sched_getaffinity,
            SYS_sendto,
            SYS_setsockopt,
            SYS_shutdown,
            SYS_sigaltstack,
            SYS_socket,
            SYS_socketpair,
            SYS_timerfd_create,
            SYS_timerfd_settime,
            // glibc's unlink() on aarch64 (std::fs::remove_file).
            SYS_unlinkat,
            SYS_writev,
        ],
        x86_64_legacy: [
            // vmm-sys-util's Epoll::wait (glibc's epoll_wait(), the daemon loop) on
            // x86_64; epoll_pwait elsewhere.
            SYS_epoll_wait,
            // glibc's unlink() on x86_64 (std::fs::remove_file); unlinkat elsewhere.
            SYS_unlink,
        ],
    };
}

/// What the seccomp filter does with a system call outside the allow-list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompMode {
    /// Kill the worker process (`SIGSYS`); the daemon reports it and starts a new one.
    #[default]
    Kill,
    /// Fail the call with `EPERM`.
    Errno,
    /// Let it run and have the kernel log it (audit record `type=1326`): for developing
    /// the allow-list.
    Log,
}

/// Errors of the jailed worker.
#[cfg_attr(test, remain::sorted)]
#[derive(Debug, Error)]
pub enum JailedError {
    /// The stop eventfd could not be created or written.
    #[error("stop eventfd of {name}: {source}")]
    Eventfd {
        /// The worker.
        name: String,
        /// The OS error.
        source: io::Error,
    },
    /// Forking or reaping the worker failed.
    #[error("worker {name}: {source}")]
    Fork {
        /// The worker.
        name: String,
        /// The cause.
        source: ForkError,
    },
    /// The jail could not be built.
    #[error(transparent)]
    Jail(#[from] JailError),
    /// `--jail-seccomp` names no mode.
    #[error("seccomp mode {0:?}: expected kill, errno or log")]
    SeccompMode(String),
}

impl FromStr for SeccompMode {
    type Err = JailedError;

    fn from_str(s: &str) -> Result<SeccompMode, JailedError> {
        match s {
            "kill" => Ok(SeccompMode::Kill),
            "errno" => Ok(SeccompMode::Errno),
            "log" => Ok(SeccompMode::Log),
            other => Err(JailedError::SeccompMode(other.to_owned())),
        }
    }
}

/// The jail of a vhost-user worker (see the module docs): every namespace, an empty
/// root with `writable_dirs` bind-mounted read-write at their own paths, no
/// capabilities, rlimits, and the seccomp allow-list [`CHILD_SYSCALLS`] +
/// [`WORKER_SYSCALLS`] with `mode` as its default action.
pub fn worker_jail(
    writable_dirs: &[PathBuf],
    mode: SeccompMode,
    limits: WorkerLimits,
) -> Result<Jail, JailError> {
    jail_with(writable_dirs, &[], mode, limits)
}

outboard_sandbox::syscall_list! {
    /// What a V4L2 proxy worker does beyond [`WORKER_SYSCALLS`]: it opens the host node
    /// once per session (`openat` on every architecture: glibc's and std's `open()`).
    /// Its ioctls (formats, buffers, `VIDIOC_EXPBUF`, events), epoll and memory calls
    /// are in the worker list already.
    pub const V4L2_PROXY_SYSCALLS, V4L2_PROXY_SYSCALL_NAMES = {
        common: [SYS_openat],
        x86_64_legacy: [],
    };
}

/// The jail of a V4L2 proxy worker: [`worker_jail`] without writable directories, with
/// the host node `device` (and nothing else of `/dev`) bound openable
/// ([`Jail::bind_device`]) and [`V4L2_PROXY_SYSCALLS`] allowed. The node must be
/// readable and writable by the worker's uid outside the jail (65534 when the daemon
/// runs as root).
pub fn v4l2_proxy_jail(
    device: &Path,
    mode: SeccompMode,
    limits: WorkerLimits,
) -> Result<Jail, JailError> {
    Ok(jail_with(&[], V4L2_PROXY_SYSCALLS, mode, limits)?.bind_device(device))
}

fn jail_with(
    writable_dirs: &[PathBuf],
    extra_syscalls: &[i64],
    mode: SeccompMode,
    limits: WorkerLimits,
) -> Result<Jail, JailError> {
    let mut syscalls: Vec<i64> = CHILD_SYSCALLS
        .iter()
        .chain(WORKER_SYSCALLS)
        .chain(extra_syscalls)
        .copied()
        .collect();
    syscalls.sort_unstable();
    syscalls.dedup();
    let action = match mode {
        SeccompMode::Kill => SeccompAction::KillProcess,
        SeccompMode::Errno => SeccompAction::Errno(libc::EPERM as u32),
        SeccompMode::Log => SeccompAction::Log,
    };
    let mut jail = Jail::sandboxed()
        .mount_namespace()
        .rlimit(libc::RLIMIT_NOFILE, WORKER_NOFILE, WORKER_NOFILE)
        .rlimit(libc::RLIMIT_CORE, 0, 0)
        .rlimit(libc::RLIMIT_DATA, limits.data_bytes, limits.data_bytes)
        .rlimit(libc::RLIMIT_NPROC, limits.tasks, limits.tasks)
        .seccomp(SeccompPolicy::allow_list(&syscalls, action)?);
    for dir in writable_dirs {
        jail = jail.bind(dir.clone(), dir.clone(), true);
    }
    Ok(jail)
}

/// How a worker ended, for the log: signals are named, `SIGSYS` as a seccomp kill.
pub fn describe_exit(status: ExitStatus) -> String {
    match status {
        ExitStatus::Signaled(libc::SIGSYS) => {
            "killed by signal 31 (SIGSYS: a system call outside the seccomp policy)".into()
        }
        ExitStatus::Signaled(libc::SIGKILL) => "killed by signal 9 (SIGKILL)".into(),
        ExitStatus::Signaled(libc::SIGSEGV) => "killed by signal 11 (SIGSEGV)".into(),
        ExitStatus::Signaled(libc::SIGABRT) => "killed by signal 6 (SIGABRT)".into(),
        ExitStatus::Exited(outboard_sandbox::fork::EXIT_ABORTED) => format!(
            "aborted (SIGABRT, exit status {}; a failed allocation over the memory \
             ceiling ends so)",
            outboard_sandbox::fork::EXIT_ABORTED
        ),
        ExitStatus::Exited(EXIT_WORKER_ERROR) => {
            format!("exited with code {EXIT_WORKER_ERROR} (the worker failed; see its log)")
        }
        other => other.to_string(),
    }
}

/// The uid and gid a jailed worker has outside its user namespace: the daemon's own,
/// or 65534 (`nobody`/`nogroup`) when the daemon runs as root — the rule of
/// `outboard_sandbox::Jail::user_namespace`, which [`worker_jail`] uses.
pub fn worker_ids() -> (u32, u32) {
    // SAFETY: geteuid/getegid cannot fail.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if euid == 0 {
        (65534, 65534)
    } else {
        (euid, egid)
    }
}

/// Checks, before any worker is forked, that a jailed worker ([`worker_ids`]) can
/// create files in `dir`: search permission on every directory above it and write and
/// search permission on `dir` itself, by the mode bits (the worker has no
/// capabilities outside its namespace; ACLs are not read). The error says what to
/// change, in one line.
pub fn check_worker_can_write(dir: &Path) -> Result<(), String> {
    let (uid, gid) = worker_ids();
    for ancestor in dir.ancestors().skip(1) {
        let meta =
            std::fs::metadata(ancestor).map_err(|e| format!("{}: {e}", ancestor.display()))?;
        if !worker_may(&meta, 0o1) {
            return Err(format!(
                "the jailed worker runs as uid {uid} gid {gid} outside its namespace and \
                 cannot enter {}: give that uid search permission there (chmod o+x)",
                describe_owner(ancestor, &meta)
            ));
        }
    }
    let meta = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !worker_may(&meta, 0o3) {
        return Err(format!(
            "the jailed worker runs as uid {uid} gid {gid} outside its namespace and cannot \
             create its sockets in {}: make it writable for that uid (chown {uid} {dir}, or \
             chmod 1777 {dir}), or run the daemon as the directory's owner",
            describe_owner(dir, &meta),
            dir = dir.display()
        ));
    }
    Ok(())
}

/// Whether the mode bits of `meta` grant the jailed worker ([`worker_ids`]) every
/// permission in `want` (`0o4` read, `0o2` write, `0o1` search/execute): the owner's
/// bits if it owns the file, else the group's if its group matches, else the others'.
fn worker_may(meta: &std::fs::Metadata, want: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (uid, gid) = worker_ids();
    let mode = meta.mode();
    let bits = if meta.uid() == uid {
        mode >> 6
    } else if meta.gid() == gid {
        mode >> 3
    } else {
        mode
    };
    bits & want == want
}

/// `path (owner U:G, mode 0MMMM)` for the precheck messages.
fn describe_owner(path: &Path, meta: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!(
        "{} (owner {}:{}, mode {:04o})",
        path.display(),
        meta.uid(),
        meta.gid(),
        meta.mode() & 0o7777
    )
}

/// Checks, before any worker is forked, that a jailed worker ([`worker_ids`]) can open
/// the device node `path` for reading and writing (by its mode bits; the V4L2 proxy's
/// worker opens the host node once per session). The error says what to change.
pub fn check_worker_can_open(path: &Path) -> Result<(), String> {
    let (uid, gid) = worker_ids();
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if worker_may(&meta, 0o6) {
        return Ok(());
    }
    Err(format!(
        "the jailed worker runs as uid {uid} gid {gid} outside its namespace and cannot open \
         {} for reading and writing: give that uid access (e.g. chown {uid} {path}, or a \
         udev rule), or run the daemon as a user that can open it",
        describe_owner(path, &meta),
        path = path.display()
    ))
}

/// A worker running in a jailed child.
#[derive(Debug)]
pub struct JailedWorker {
    name: String,
    child: Child,
    stop: EventFd,
}

impl JailedWorker {
    /// Forks a child confined by `jail` that runs `serve(listener, inherited, stop)`;
    /// `serve` builds the device and runs the worker loop until the stop eventfd is
    /// written. An `Err` from it is logged in the child, which then exits with
    /// [`EXIT_WORKER_ERROR`]. `inherit` are further fds the child gets (shared memory,
    /// links to other workers), handed to `serve` as owned fds in the same order; every
    /// other fd is closed in the child. The caller keeps `listener` and `inherit` and may
    /// spawn a new worker with them once this one is gone.
    pub fn spawn<F>(
        jail: &Jail,
        listener: &UnixListener,
        inherit: &[BorrowedFd<'_>],
        name: &str,
        serve: F,
    ) -> Result<JailedWorker, JailedError>
    where
        F: FnOnce(UnixListener, Vec<OwnedFd>, &EventFd) -> Result<(), String>,
    {
        let stop = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|source| {
            JailedError::Eventfd {
                name: name.to_owned(),
                source,
            }
        })?;
        let listen_fd = listener.as_raw_fd();
        let stop_fd = stop.as_raw_fd();
        let comm: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let inherited: Vec<RawFd> = inherit.iter().map(AsRawFd::as_raw_fd).collect();
        let mut keep = vec![listen_fd, stop_fd];
        keep.extend(&inherited);
        let child = fork_process(jail, &keep, Some(&comm), || {
            // SAFETY: this runs in the forked child, which has its own fd table with
            // `listen_fd` open (it is in the keep-list). The parent's `UnixListener`
            // that also names it is never dropped here (the child ends with `_exit`),
            // so the new value is the only owner in this process.
            let listener = unsafe { UnixListener::from_raw_fd(listen_fd) };
            let inherited = inherited
                .iter()
                // SAFETY: as for `listen_fd`: each is open in the child's own fd table
                // (the keep-list) and the parent's owners are never dropped here.
                .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
                .collect();
            if let Err(e) = serve(listener, inherited, &stop) {
                log::error!("{name}: {e}");
                // Raw libc: `_exit` of a forked child (rustix has no stable `_exit`).
                // SAFETY: ends the child at once without running the parent's
                // destructors, as fork_process does after the closure.
                unsafe { libc::_exit(EXIT_WORKER_ERROR) };
            }
        })
        .map_err(|source| JailedError::Fork {
            name: name.to_owned(),
            source,
        })?;
        Ok(JailedWorker {
            name: name.to_owned(),
            child,
            stop,
        })
    }

    /// The child's pid in the daemon's pid namespace (with a pid namespace this is the
    /// relay process; the worker is its only child).
    pub fn pid(&self) -> i32 {
        self.child.pid()
    }

    /// The worker's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How the child ended, if it has (it is reaped), `None` while it runs.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, JailedError> {
        self.child.try_wait().map_err(|source| JailedError::Fork {
            name: self.name.clone(),
            source,
        })
    }

    /// Asks the worker to stop (its loop ends, the child exits 0) without waiting.
    pub fn request_stop(&self) -> Result<(), JailedError> {
        self.stop.write(1).map_err(|source| JailedError::Eventfd {
            name: self.name.clone(),
            source,
        })
    }

    /// Asks the worker to stop (its loop ends, the child exits 0), waits up to
    /// `timeout`, then kills it; returns how it ended once reaped.
    pub fn stop(mut self, timeout: Duration) -> Result<ExitStatus, JailedError> {
        let fork_err = |name: &str, source| JailedError::Fork {
            name: name.to_owned(),
            source,
        };
        if let Some(s) = self.try_wait()? {
            return Ok(s);
        }
        self.stop.write(1).map_err(|source| JailedError::Eventfd {
            name: self.name.clone(),
            source,
        })?;
        if let Some(s) = self
            .child
            .wait_timeout(timeout)
            .map_err(|e| fork_err(&self.name, e))?
        {
            return Ok(s);
        }
        log::warn!("{}: did not stop within {timeout:?}; killing it", self.name);
        let status = self
            .child
            .kill_and_wait(Duration::from_secs(2))
            .map_err(|e| fork_err(&self.name, e))?;
        Ok(status.unwrap_or(ExitStatus::Unknown))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seccomp_modes_parse_and_name_the_bad_value() {
        assert_eq!("kill".parse::<SeccompMode>().ok(), Some(SeccompMode::Kill));
        assert_eq!(
            "errno".parse::<SeccompMode>().ok(),
            Some(SeccompMode::Errno)
        );
        assert_eq!("log".parse::<SeccompMode>().ok(), Some(SeccompMode::Log));
        let e = "trap".parse::<SeccompMode>().err().map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("seccomp mode \"trap\": expected kill, errno or log")
        );
    }

    #[test]
    fn the_worker_jail_compiles_its_policy() {
        for mode in [SeccompMode::Kill, SeccompMode::Errno, SeccompMode::Log] {
            let limits = WorkerLimits::default();
            assert!(worker_jail(&[PathBuf::from("/tmp")], mode, limits).is_ok());
            assert!(v4l2_proxy_jail(Path::new("/dev/null"), mode, limits).is_ok());
        }
        // The plain worker cannot open files; the proxy worker can.
        assert!(!WORKER_SYSCALLS.contains(&libc::SYS_openat));
        assert!(V4L2_PROXY_SYSCALLS.contains(&libc::SYS_openat));
    }

    #[test]
    fn the_worker_lists_hold_on_every_arch() {
        use outboard_sandbox::proxy::CHILD_SYSCALL_NAMES;
        use seccompiler::TargetArch;

        for list in [WORKER_SYSCALL_NAMES, V4L2_PROXY_SYSCALL_NAMES] {
            assert_eq!(list.check(), Vec::<String>::new());
        }
        // The whole V4L2 proxy worker policy, for both architectures, on any host.
        for arch in [TargetArch::x86_64, TargetArch::aarch64] {
            let names: Vec<&str> = [
                CHILD_SYSCALL_NAMES,
                WORKER_SYSCALL_NAMES,
                V4L2_PROXY_SYSCALL_NAMES,
            ]
            .iter()
            .flat_map(|l| l.for_arch(arch))
            .collect();
            let policy = SeccompPolicy::allow_names(&names, SeccompAction::KillProcess, arch);
            assert!(policy.is_ok(), "{arch:?}: {:?}", policy.err());
        }
        // Every x86_64-only call has the form the other architectures issue.
        for (legacy, generic) in [("epoll_wait", "epoll_pwait"), ("unlink", "unlinkat")] {
            assert!(WORKER_SYSCALL_NAMES.x86_64_legacy.contains(&legacy));
            assert!(WORKER_SYSCALL_NAMES.common.contains(&generic));
        }
        // This target's numbers are the names' numbers.
        let native = TargetArch::try_from(std::env::consts::ARCH).unwrap();
        assert_eq!(
            WORKER_SYSCALLS.len(),
            WORKER_SYSCALL_NAMES.for_arch(native).len()
        );
        assert_eq!(
            format!(
                "{:?}",
                SeccompPolicy::allow_list(WORKER_SYSCALLS, SeccompAction::KillProcess)
            ),
            format!(
                "{:?}",
                SeccompPolicy::allow_names(
                    &WORKER_SYSCALL_NAMES.for_arch(native),
                    SeccompAction::KillProcess,
                    native
                )
            )
        );
    }

    #[test]
    fn a_directory_the_worker_cannot_write_is_refused_with_what_to_change() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("outboard-jail-dir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).unwrap();
        let e = check_worker_can_write(&dir).unwrap_err();
        let (uid, _) = worker_ids();
        assert!(e.contains(&format!("runs as uid {uid}")), "{e}");
        assert!(e.contains("mode 0555") && e.contains("chmod 1777"), "{e}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        check_worker_can_write(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_node_the_worker_cannot_open_is_refused_with_what_to_change() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("outboard-jail-node-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let node = dir.join("video0");
        std::fs::write(&node, b"").unwrap();
        std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o600)).unwrap();
        // As root the worker is 65534 (not the owner): refused. Otherwise it is the
        // owner, so take away the owner's bits.
        if worker_ids().0 != 0 && worker_ids().0 != 65534 {
            std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o066)).unwrap();
        }
        let e = check_worker_can_open(&node).unwrap_err();
        assert!(
            e.contains("cannot open") && e.contains("for reading and writing"),
            "{e}"
        );
        std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o666)).unwrap();
        check_worker_can_open(&node).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn exits_are_described_with_their_signal() {
        assert!(describe_exit(ExitStatus::Signaled(libc::SIGSYS)).contains("signal 31"));
        assert!(describe_exit(ExitStatus::Signaled(libc::SIGSYS)).contains("seccomp"));
        assert_eq!(describe_exit(ExitStatus::Exited(0)), "exited with code 0");
    }
}
