//! What keeps a daemon's workers running: the stop signals, one loop that watches every
//! worker and writes the metrics file, restarts of jailed workers, and a bounded stop.
//!
//! A daemon (the `outboard` binary) builds one [`Service`] per device worker — a
//! [`ThreadService`] (the worker loop on a thread of the daemon) or, with the `jail`
//! feature, a [`JailedService`] (the worker loop in a jailed child that is replaced
//! when it dies) — and hands them to [`Supervisor::run`], which returns when SIGTERM or
//! SIGINT arrives (or a thread worker ends on its own) and every worker has stopped.
//!
//! # Signals
//!
//! [`StopSignals::block`] blocks SIGTERM, SIGINT and SIGCHLD in the calling thread;
//! threads started afterwards inherit the mask, so only the supervisor's `sigtimedwait`
//! ever sees them. Call it before starting any thread.
//!
//! # Idle
//!
//! The supervisor sleeps until something needs it: a stop signal, SIGCHLD (a jailed
//! worker's process ended, or a [`ThreadService`] thread ended: it raises SIGCHLD as
//! it returns), the next metrics write, or a worker restart that is due
//! ([`Service::next_deadline`]). A daemon without `--metrics` and with healthy workers
//! makes no wake-up at all while its guests are idle.
//!
//! # Stopping
//!
//! On a stop signal every worker is asked to stop at once, then each gets what is left
//! of [`STOP_GRACE`]: a thread that is still running is left behind (the daemon exits
//! without it), a jailed child is killed. SIGTERM thus ends the daemon within about two
//! seconds whatever a worker or its peer does.

use std::io;
use std::os::fd::{BorrowedFd, FromRawFd, IntoRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::io::{fcntl_setfd, FdFlags};
use rustix::net::{sockopt, AddressFamily};
use vmm_sys_util::eventfd::EventFd;

use crate::metrics::{self, VmMetrics};
use crate::systemd::Notifier;

/// How long stopping workers get, together, after a stop signal.
pub const STOP_GRACE: Duration = Duration::from_millis(1500);

/// The longest the supervisor sleeps when nothing is due (it wakes for signals anyway).
const IDLE_SLEEP: Duration = Duration::from_secs(3600);

/// SIGTERM and SIGINT (and SIGCHLD, which wakes the supervisor to check its workers),
/// blocked so that only [`StopSignals::wait`] receives them.
#[derive(Debug)]
pub struct StopSignals {
    set: libc::sigset_t,
}

impl StopSignals {
    /// Blocks SIGTERM, SIGINT and SIGCHLD in the calling thread (threads it starts
    /// later inherit the mask).
    pub fn block() -> io::Result<StopSignals> {
        // Raw libc: rustix has no stable signal-mask API (`pthread_sigmask`,
        // `sigtimedwait` below live in its unstable `runtime` module).
        // SAFETY: sigset_t is plain data; sigemptyset initializes it before use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t for the calls; the signals are valid numbers.
        unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGCHLD);
        }
        // SAFETY: `set` is a valid sigset_t; the old mask is not needed.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(StopSignals { set })
    }

    /// Waits up to `timeout` for SIGTERM or SIGINT; returns its number. Returns `None`
    /// early when SIGCHLD arrives (a worker ended: time to check on the workers).
    pub fn wait(&self, timeout: Duration) -> Option<i32> {
        let ts = libc::timespec {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
        };
        // SAFETY: `set` and `ts` are valid for the call; no siginfo is requested.
        let sig = unsafe { libc::sigtimedwait(&self.set, std::ptr::null_mut(), &ts) };
        (sig == libc::SIGTERM || sig == libc::SIGINT).then_some(sig)
    }
}

/// The metrics files, rewritten every `interval` (and at the start and the end).
#[derive(Debug, Clone)]
pub struct MetricsFile {
    /// `--metrics`: the JSON document, replaced atomically (`metrics::write`; written
    /// with the `cli` feature only, which has serde_json).
    pub path: Option<PathBuf>,
    /// `--metrics-prometheus`: the Prometheus text exposition
    /// ([`metrics::write_prometheus`]).
    pub prometheus: Option<PathBuf>,
    /// How often they are rewritten.
    pub interval: Duration,
}

/// How a worker is doing, as [`Service::check`] finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Running, or being replaced by the service itself.
    Running,
    /// Ended and cannot be replaced: the daemon stops.
    Ended,
}

/// One device worker under the supervisor.
pub trait Service {
    /// The worker's name for the log (`vsock cid 3`).
    fn name(&self) -> &str;
    /// Starts the worker.
    fn start(&mut self) -> Result<(), String>;
    /// Checks on the worker (never blocks); a service that can replace a dead worker
    /// does so here.
    fn check(&mut self) -> Health;
    /// Asks the worker to stop, without waiting.
    fn request_stop(&mut self);
    /// Waits for the worker until `deadline` (then leaves or kills it) and removes the
    /// files the service created; false when it did not end cleanly.
    fn finish(&mut self, deadline: Instant) -> bool;
    /// The worker's entry in the metrics file, if it has one.
    fn metrics(&self) -> Option<VmMetrics>;
    /// How many times the worker died and was replaced.
    fn restarts(&self) -> u64 {
        0
    }
    /// When [`Service::check`] has something to do without being woken (a worker
    /// restart that is due), if ever; the supervisor sleeps until then at the latest.
    fn next_deadline(&self) -> Option<Instant> {
        None
    }
}

/// Runs services until a stop signal.
#[derive(Debug)]
pub struct Supervisor {
    metrics: Option<MetricsFile>,
    notifier: Notifier,
}

impl Supervisor {
    /// A supervisor that writes `metrics` (if any) and tells systemd (`NOTIFY_SOCKET`)
    /// when it is ready, when it stops and when workers are replaced.
    pub fn new(metrics: Option<MetricsFile>) -> Self {
        Supervisor {
            metrics,
            notifier: Notifier::from_env(),
        }
    }

    /// Starts every service, watches them until SIGTERM/SIGINT (or a worker ends for
    /// good), stops them all within [`STOP_GRACE`] and writes the metrics file a last
    /// time. True when everything started and stopped cleanly.
    pub fn run(&self, services: &mut [Box<dyn Service>], signals: &StopSignals) -> bool {
        let mut ok = true;
        for s in services.iter_mut() {
            if let Err(e) = s.start() {
                log::error!("{}: {e}", s.name());
                ok = false;
                break;
            }
        }
        if ok {
            self.write_metrics(services);
            let status = format!("serving {} worker(s)", services.len());
            // MAINPID: after a live upgrade the service's main process is this one, not
            // the one systemd started (systemd takes it with NotifyAccess=all).
            self.notifier.notify(&format!(
                "READY=1\nMAINPID={}\nSTATUS={status}",
                std::process::id()
            ));
            let mut restarts = 0;
            let mut last_metrics = Instant::now();
            loop {
                let now = Instant::now();
                let metrics_due = self.metrics.as_ref().map(|m| last_metrics + m.interval);
                let wake = services
                    .iter()
                    .filter_map(|s| s.next_deadline())
                    .chain(metrics_due)
                    .min()
                    .map_or(IDLE_SLEEP, |at| at.saturating_duration_since(now));
                if let Some(sig) = signals.wait(wake) {
                    if !handover::stop() {
                        log::info!("signal {sig}: handed over already; exiting");
                        // The upgrade thread exits the process in a moment.
                        loop {
                            std::thread::park();
                        }
                    }
                    log::info!("signal {sig}: stopping");
                    self.notifier.notify("STOPPING=1\nSTATUS=stopping");
                    break;
                }
                // Every service is checked (a jailed one may be due for a restart).
                let mut ended = None;
                for s in services.iter_mut() {
                    if s.check() == Health::Ended && ended.is_none() {
                        ended = Some(s.name().to_string());
                    }
                }
                if let Some(name) = ended {
                    log::error!("{name}: the worker stopped on its own; stopping every worker");
                    self.notifier
                        .notify(&format!("STOPPING=1\nSTATUS={name}: the worker stopped"));
                    ok = false;
                    break;
                }
                let now: u64 = services.iter().map(|s| s.restarts()).sum();
                if now != restarts {
                    restarts = now;
                    let who: Vec<String> = services
                        .iter()
                        .filter(|s| s.restarts() > 0)
                        .map(|s| format!("{} x{}", s.name(), s.restarts()))
                        .collect();
                    self.notifier.status(&format!(
                        "{status}; {restarts} worker restart(s): {}",
                        who.join(", ")
                    ));
                }
                if let Some(m) = &self.metrics {
                    if last_metrics.elapsed() >= m.interval {
                        self.write_metrics(services);
                        last_metrics = Instant::now();
                    }
                }
            }
        }
        ok &= stop_all(services, Instant::now() + STOP_GRACE);
        self.write_metrics(services);
        ok
    }

    fn write_metrics(&self, services: &[Box<dyn Service>]) {
        let Some(m) = &self.metrics else { return };
        let vms: Vec<VmMetrics> = services.iter().filter_map(|s| s.metrics()).collect();
        #[cfg(feature = "cli")]
        if let Some(path) = &m.path {
            if let Err(e) = metrics::write(path, &vms) {
                log::warn!("cannot write metrics to {}: {e}", path.display());
            }
        }
        if let Some(path) = &m.prometheus {
            if let Err(e) = metrics::write_prometheus(path, &vms) {
                log::warn!("cannot write metrics to {}: {e}", path.display());
            }
        }
    }
}

/// The process's side of a live upgrade ([`crate::upgrade`]) against its own stop: a
/// handover and a stop (SIGTERM) exclude each other, so that a stopping daemon never
/// removes sockets a new process took over, and a handover never commits while the
/// daemon stops.
pub mod handover {
    use std::sync::Mutex;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Gate {
        Serving,
        Pausing,
        Committed,
        Stopping,
    }

    #[derive(Clone, Copy, Debug)]
    enum Event {
        Begin,
        End { commit: bool },
        Stop,
    }

    /// The gate after `event`, and whether the event may go ahead.
    fn next(gate: Gate, event: Event) -> (Gate, bool) {
        use Gate::*;
        match (gate, event) {
            (Serving | Pausing, Event::Begin) => (Pausing, true),
            (Committed | Stopping, Event::Begin) => (gate, false),
            (Pausing, Event::End { commit: true }) => (Committed, true),
            (Pausing, Event::End { commit: false }) => (Serving, true),
            (_, Event::End { .. }) => (gate, false),
            (Committed, Event::Stop) => (Committed, false),
            (_, Event::Stop) => (Stopping, true),
        }
    }

    static GATE: Mutex<Gate> = Mutex::new(Gate::Serving);

    fn apply(event: Event) -> bool {
        let mut g = GATE.lock().unwrap_or_else(|p| p.into_inner());
        let (gate, ok) = next(*g, event);
        *g = gate;
        ok
    }

    /// A handover starts (workers are about to pause); false when the daemon stops.
    pub fn begin() -> bool {
        apply(Event::Begin)
    }

    /// The handover ends: committed (the new process owns everything from here on) or
    /// called off. A commit is refused (false) when the daemon began to stop meanwhile.
    pub fn end(commit: bool) -> bool {
        apply(Event::End { commit })
    }

    /// The daemon begins to stop; false when a handover committed (the process is
    /// about to exit and must not touch what the new one serves).
    pub fn stop() -> bool {
        apply(Event::Stop)
    }

    /// Whether a handover committed.
    pub fn committed() -> bool {
        *GATE.lock().unwrap_or_else(|p| p.into_inner()) == Gate::Committed
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_stop_and_a_handover_exclude_each_other() {
            use Gate::*;
            // A handover called off, then one committed: a stop after it is refused.
            let (g, ok) = next(Serving, Event::Begin);
            assert_eq!((g, ok), (Pausing, true));
            assert_eq!(next(g, Event::End { commit: false }), (Serving, true));
            let (g, _) = next(Serving, Event::Begin);
            let (g, ok) = next(g, Event::End { commit: true });
            assert_eq!((g, ok), (Committed, true));
            assert_eq!(next(g, Event::Stop), (Committed, false));
            assert_eq!(next(g, Event::Begin), (Committed, false));
            // A stop during a handover: the commit is refused, and no new one begins.
            let (g, _) = next(Serving, Event::Begin);
            let (g, ok) = next(g, Event::Stop);
            assert_eq!((g, ok), (Stopping, true));
            assert_eq!(next(g, Event::End { commit: true }), (Stopping, false));
            assert_eq!(next(g, Event::Begin), (Stopping, false));
        }
    }
}

/// Asks every service to stop, then waits for each until `deadline`.
pub fn stop_all(services: &mut [Box<dyn Service>], deadline: Instant) -> bool {
    for s in services.iter_mut() {
        s.request_stop();
    }
    let mut ok = true;
    for s in services.iter_mut() {
        ok &= s.finish(deadline);
    }
    ok
}

/// Takes ownership of the inherited listening socket `fd` (`--fd`, systemd socket
/// activation): it must be a listening AF_UNIX socket; it is made close-on-exec.
///
/// The caller must own `fd` (nothing else in the process may close or use it).
pub fn inherited_listener(fd: RawFd) -> Result<UnixListener, String> {
    // SAFETY: the caller owns `fd` (this function's contract), so it stays open for
    // the checks below; nothing is closed through the borrow.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    if !sockopt::socket_acceptconn(borrowed).unwrap_or(false) {
        return Err(format!("--fd {fd} is not a listening socket"));
    }
    if sockopt::socket_domain(borrowed).ok() != Some(AddressFamily::UNIX) {
        return Err(format!("--fd {fd} is not an AF_UNIX socket"));
    }
    // SAFETY: the fd was inherited for us to own (the --fd contract), is open (the
    // getsockopt calls succeeded) and is a listening AF_UNIX socket.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    // Errors ignored as before: the flag only matters if the daemon ever execs.
    let _ = fcntl_setfd(&listener, FdFlags::CLOEXEC);
    Ok(listener)
}

/// Binds a vhost-user listening socket at `path`, replacing a socket file an earlier
/// run left there (never anything else, see [`remove_stale_socket`]).
pub fn bind_listener(path: &Path) -> Result<UnixListener, String> {
    remove_stale_socket(path)?;
    UnixListener::bind(path).map_err(|e| format!("bind {}: {e}", path.display()))
}

/// The one listening socket systemd passed by socket activation (`LISTEN_FDS`), as
/// an fd for [`inherited_listener`]; `None` when none was passed. More than one is an
/// error naming how many: a single-device daemon serves one.
pub fn activated_listener() -> Result<Option<RawFd>, String> {
    let mut fds = crate::systemd::listen_fds().map_err(|e| e.to_string())?;
    match fds.len() {
        0 => Ok(None),
        1 => Ok(fds.pop().map(IntoRawFd::into_raw_fd)),
        n => Err(format!(
            "systemd passed {n} listening sockets (LISTEN_FDS); this daemon serves one"
        )),
    }
}

/// A single-device daemon's vhost-user listening socket, by the vhost-user back-end
/// conventions: the inherited listening socket `fd` (`--fd`, owned from here on), else
/// `socket_path` bound, else the socket systemd passed (socket activation). Returns the
/// socket, the files to remove at exit (the bound path) and how to name it in the log.
pub fn listen_once(
    socket_path: Option<&Path>,
    fd: Option<RawFd>,
) -> Result<(UnixListener, Vec<PathBuf>, String), String> {
    match (fd, socket_path) {
        (Some(fd), _) => Ok((inherited_listener(fd)?, Vec::new(), format!("fd {fd}"))),
        (None, Some(path)) => Ok((
            bind_listener(path)?,
            vec![path.to_path_buf()],
            path.display().to_string(),
        )),
        (None, None) => match activated_listener()? {
            Some(fd) => Ok((inherited_listener(fd)?, Vec::new(), format!("fd {fd}"))),
            None => Err(
                "--socket-path, --fd or systemd socket activation (LISTEN_FDS) is required".into(),
            ),
        },
    }
}

/// Removes a socket file left by an earlier run (never anything that is not a socket).
pub fn remove_stale_socket(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove stale socket {}: {e}", path.display())),
        Ok(_) => Err(format!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        )),
        Err(_) => Ok(()),
    }
}

fn remove_files(paths: &[PathBuf]) {
    // Handed over: the new process serves these sockets now.
    if handover::committed() {
        return;
    }
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
}

/// The result of a worker loop on a thread.
pub type ThreadResult = Result<(), String>;

/// Starts a worker thread with its stop eventfd.
type SpawnFn = Box<dyn FnOnce(EventFd) -> io::Result<JoinHandle<ThreadResult>>>;

/// Raises SIGCHLD when dropped, at the end of a worker thread (returned or panicked),
/// so the supervisor, asleep in [`StopSignals::wait`], checks its workers at once. In
/// a process that does not block SIGCHLD its default action (ignore) applies.
struct AnnounceEnd;

impl Drop for AnnounceEnd {
    fn drop(&mut self) {
        // SAFETY: kill(2) with our own pid and a valid signal number touches no memory.
        unsafe { libc::kill(libc::getpid(), libc::SIGCHLD) };
    }
}

/// A worker loop on a thread of the daemon, stopped through an eventfd. It cannot be
/// replaced (its device moved into it): when it ends on its own, the daemon stops.
pub struct ThreadService {
    name: String,
    stop: EventFd,
    thread: Option<JoinHandle<ThreadResult>>,
    /// Starts the thread; taken by [`Service::start`].
    spawn: Option<SpawnFn>,
    metrics: Option<Box<dyn Fn() -> VmMetrics>>,
    created: Vec<PathBuf>,
}

impl std::fmt::Debug for ThreadService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadService")
            .field("name", &self.name)
            .field("running", &self.thread.as_ref().map(|t| !t.is_finished()))
            .finish()
    }
}

impl ThreadService {
    /// A service that runs `serve(stop)` on a thread named `thread_name` when started;
    /// `serve` returns when the stop eventfd it gets is written. `created` are files
    /// removed when the service finishes.
    pub fn new<F>(
        name: impl Into<String>,
        thread_name: impl Into<String>,
        created: Vec<PathBuf>,
        serve: F,
    ) -> io::Result<ThreadService>
    where
        F: FnOnce(EventFd) -> ThreadResult + Send + 'static,
    {
        let stop = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let thread_name = thread_name.into();
        let name = name.into();
        let label = name.clone();
        Ok(ThreadService {
            name,
            stop,
            thread: None,
            spawn: Some(Box::new(move |stop| {
                std::thread::Builder::new()
                    .name(thread_name)
                    .spawn(move || {
                        let _announce = AnnounceEnd;
                        crate::logging::set_worker(&label);
                        serve(stop)
                    })
            })),
            metrics: None,
            created,
        })
    }

    /// Reports `metrics()` in the metrics file.
    pub fn with_metrics(mut self, metrics: impl Fn() -> VmMetrics + 'static) -> Self {
        self.metrics = Some(Box::new(metrics));
        self
    }
}

impl Service for ThreadService {
    fn name(&self) -> &str {
        &self.name
    }

    fn start(&mut self) -> Result<(), String> {
        let spawn = self
            .spawn
            .take()
            .ok_or("a thread worker cannot be started twice")?;
        let stop = self.stop.try_clone().map_err(|e| format!("eventfd: {e}"))?;
        let thread = spawn(stop).map_err(|e| format!("cannot start the worker thread: {e}"))?;
        self.thread = Some(thread);
        Ok(())
    }

    fn check(&mut self) -> Health {
        match &self.thread {
            Some(t) if t.is_finished() => Health::Ended,
            _ => Health::Running,
        }
    }

    fn request_stop(&mut self) {
        if let Err(e) = self.stop.write(1) {
            log::error!("{}: cannot stop the worker: {e}", self.name);
        }
    }

    fn finish(&mut self, deadline: Instant) -> bool {
        let Some(t) = self.thread.take() else {
            remove_files(&self.created);
            return true;
        };
        while !t.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let ok = if !t.is_finished() {
            log::error!(
                "{}: the worker did not stop within {STOP_GRACE:?}; exiting without it",
                self.name
            );
            false
        } else {
            match t.join() {
                Ok(Ok(())) => true,
                Ok(Err(e)) => {
                    log::error!("{}: {e}", self.name);
                    false
                }
                Err(_) => {
                    log::error!("{}: the worker panicked", self.name);
                    false
                }
            }
        };
        remove_files(&self.created);
        ok
    }

    fn metrics(&self) -> Option<VmMetrics> {
        self.metrics.as_ref().map(|m| m())
    }
}

#[cfg(feature = "jail")]
pub use jailed::{JailedService, ServeFn};

#[cfg(feature = "jail")]
mod jailed {
    use std::os::fd::{AsFd, OwnedFd};
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    use outboard_sandbox::{ExitStatus, Jail};
    use vmm_sys_util::eventfd::EventFd;

    use super::{remove_files, remove_stale_socket, Health, Service};
    use crate::jail::{describe_exit, JailedWorker};
    use crate::metrics::{DeviceId, VmMetrics};
    use crate::shared_metrics::RestartCounters;

    /// A worker that dies sooner than this after its start counts as failing: it is
    /// replaced only after a delay that doubles with every such death in a row, from
    /// [`FIRST_DELAY`] up to [`MAX_DELAY`], so a worker that cannot start does not spin
    /// and does not fill the log. A worker that ran longer is replaced at once and
    /// resets the delay.
    const MIN_RUN: Duration = Duration::from_secs(1);
    /// The first back-off delay.
    const FIRST_DELAY: Duration = Duration::from_secs(1);
    /// The longest back-off delay.
    const MAX_DELAY: Duration = Duration::from_secs(60);

    /// The delay before the next start after `failures` quick deaths in a row.
    pub(super) fn backoff(failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        FIRST_DELAY
            .saturating_mul(1u32 << (failures - 1).min(16))
            .min(MAX_DELAY)
    }

    /// What a jailed worker runs: the listening socket, the inherited fds (in the order
    /// given to [`JailedService::inherit`]) and the stop eventfd.
    pub type ServeFn = Box<dyn Fn(UnixListener, Vec<OwnedFd>, &EventFd) -> Result<(), String>>;

    /// A worker in a jailed child ([`JailedWorker`]), replaced when it dies: the
    /// daemon keeps the listening socket and the inherited fds, so a front-end that
    /// reconnects meets a new worker (see [`crate::jail`]).
    pub struct JailedService {
        name: String,
        jail: Jail,
        listener: UnixListener,
        inherit: Vec<OwnedFd>,
        stale: Vec<PathBuf>,
        created: Vec<PathBuf>,
        serve: ServeFn,
        /// Fds only the first worker inherits (after `inherit`): a handover's.
        first: Vec<OwnedFd>,
        worker: Option<JailedWorker>,
        started: Instant,
        restart_at: Option<Instant>,
        counters: Option<(DeviceId, RestartCounters)>,
        /// Workers that died and were replaced.
        restarts: u64,
        /// Quick deaths in a row (see [`MIN_RUN`]).
        failures: u32,
    }

    impl std::fmt::Debug for JailedService {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("JailedService")
                .field("name", &self.name)
                .field("worker", &self.worker.as_ref().map(JailedWorker::pid))
                .finish()
        }
    }

    impl JailedService {
        /// A service whose workers run `serve` confined by `jail` on `listener`.
        pub fn new(
            name: impl Into<String>,
            jail: Jail,
            listener: UnixListener,
            serve: ServeFn,
        ) -> JailedService {
            JailedService {
                name: name.into(),
                jail,
                listener,
                inherit: Vec::new(),
                stale: Vec::new(),
                created: Vec::new(),
                serve,
                first: Vec::new(),
                worker: None,
                started: Instant::now(),
                restart_at: None,
                counters: None,
                restarts: 0,
                failures: 0,
            }
        }

        /// Fds every worker inherits, after those given before.
        pub fn inherit(mut self, fds: impl IntoIterator<Item = OwnedFd>) -> Self {
            self.inherit.extend(fds);
            self
        }

        /// Fds the first worker inherits after the others, and no later one: the state
        /// a live upgrade handed over, which that worker takes over. The sockets the
        /// old process created are not removed before that start (they are the ones
        /// being served).
        pub fn first_start(mut self, fds: Vec<OwnedFd>) -> Self {
            self.first = fds;
            self
        }

        /// Sockets a dead worker may leave behind, removed before each start.
        pub fn stale_sockets(mut self, paths: Vec<PathBuf>) -> Self {
            self.stale.extend(paths);
            self
        }

        /// Files removed when the service finishes.
        pub fn created(mut self, paths: Vec<PathBuf>) -> Self {
            self.created.extend(paths);
            self
        }

        /// Reports the workers' counter page (whose fd the caller passes to
        /// [`JailedService::inherit`]) in the metrics files as `device`; a dead
        /// worker's last values are kept ([`RestartCounters`]).
        pub fn counters(mut self, device: DeviceId, page: RestartCounters) -> Self {
            self.counters = Some((device, page));
            self
        }
    }

    impl Service for JailedService {
        fn name(&self) -> &str {
            &self.name
        }

        fn start(&mut self) -> Result<(), String> {
            if self.first.is_empty() {
                for p in &self.stale {
                    remove_stale_socket(p)?;
                }
            }
            let serve = &self.serve;
            let name = &self.name;
            let inherit: Vec<_> = self
                .inherit
                .iter()
                .chain(&self.first)
                .map(AsFd::as_fd)
                .collect();
            let w = JailedWorker::spawn(
                &self.jail,
                &self.listener,
                &inherit,
                &self.name,
                |l, f, s| {
                    crate::logging::set_worker(name);
                    serve(l, f, s)
                },
            )
            .map_err(|e| e.to_string())?;
            log::info!("{}: worker runs jailed, pid {}", self.name, w.pid());
            // The handover's fds live on in that worker only.
            self.first.clear();
            self.worker = Some(w);
            self.started = Instant::now();
            self.restart_at = None;
            Ok(())
        }

        fn check(&mut self) -> Health {
            if let Some(w) = self.worker.as_mut() {
                match w.try_wait() {
                    Ok(None) => return Health::Running,
                    Ok(Some(status)) => {
                        log::error!(
                            "{}: worker pid {} {}; starting a new one",
                            self.name,
                            w.pid(),
                            describe_exit(status)
                        );
                    }
                    Err(e) => {
                        log::error!("{}: {e}", self.name);
                        return Health::Running;
                    }
                }
                self.worker = None;
                self.restarts += 1;
                if let Some((_, page)) = self.counters.as_mut() {
                    page.worker_ended(true);
                }
                if self.started.elapsed() < MIN_RUN {
                    self.failures = self.failures.saturating_add(1);
                } else {
                    self.failures = 0;
                }
                let delay = backoff(self.failures);
                if !delay.is_zero() {
                    log::warn!(
                        "{}: the worker died {} time(s) in a row within {MIN_RUN:?} of its \
                         start; the next starts in {delay:?}",
                        self.name,
                        self.failures
                    );
                }
                self.restart_at = Some(Instant::now() + delay);
            }
            if self.restart_at.is_some_and(|t| Instant::now() >= t) {
                if let Err(e) = self.start() {
                    self.failures = self.failures.saturating_add(1);
                    let delay = backoff(self.failures);
                    log::error!(
                        "{}: cannot start a worker: {e}; trying again in {delay:?}",
                        self.name
                    );
                    self.restart_at = Some(Instant::now() + delay);
                }
            }
            Health::Running
        }

        fn next_deadline(&self) -> Option<Instant> {
            self.restart_at
        }

        fn request_stop(&mut self) {
            if let Some(w) = &self.worker {
                if let Err(e) = w.request_stop() {
                    log::error!("{}: {e}", self.name);
                }
            }
        }

        fn finish(&mut self, deadline: Instant) -> bool {
            let mut ok = true;
            if let Some(w) = self.worker.take() {
                let pid = w.pid();
                let grace = deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(10));
                match w.stop(grace) {
                    Ok(ExitStatus::Exited(0)) => {}
                    Ok(status) => {
                        log::error!("{}: worker pid {pid} {}", self.name, describe_exit(status));
                        ok = false;
                    }
                    Err(e) => {
                        log::error!("{}: {e}", self.name);
                        ok = false;
                    }
                }
            }
            remove_files(&self.created);
            ok
        }

        fn restarts(&self) -> u64 {
            self.restarts
        }

        fn metrics(&self) -> Option<VmMetrics> {
            self.counters.as_ref().map(|(device, page)| VmMetrics {
                device: device.clone(),
                counters: page.counters(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A service that ends on its own after `ends_after` checks (never, if `None`).
    struct Fake {
        checks: usize,
        ends_after: Option<usize>,
        stopped: Arc<AtomicUsize>,
    }

    impl Service for Fake {
        fn name(&self) -> &str {
            "fake"
        }
        fn start(&mut self) -> Result<(), String> {
            Ok(())
        }
        fn check(&mut self) -> Health {
            self.checks += 1;
            match self.ends_after {
                Some(n) if self.checks >= n => Health::Ended,
                _ => Health::Running,
            }
        }
        fn request_stop(&mut self) {}
        fn finish(&mut self, _: Instant) -> bool {
            self.stopped.fetch_add(1, Ordering::SeqCst);
            true
        }
        fn metrics(&self) -> Option<VmMetrics> {
            Some(VmMetrics {
                device: crate::metrics::DeviceId::vsock(3, "/s".into()),
                counters: vec![("checks".into(), self.checks as u64)],
            })
        }
    }

    #[test]
    fn a_worker_that_ends_stops_every_worker_and_the_file_is_written() {
        let signals = StopSignals::block().unwrap();
        let stopped = Arc::new(AtomicUsize::new(0));
        let dir = std::env::temp_dir().join(format!("outboard-sup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.json");
        let prom = dir.join("m.prom");
        let sup = Supervisor::new(Some(MetricsFile {
            path: Some(path.clone()),
            prometheus: Some(prom.clone()),
            interval: Duration::from_millis(1),
        }));
        let mut services: Vec<Box<dyn Service>> = vec![
            Box::new(Fake {
                checks: 0,
                ends_after: None,
                stopped: stopped.clone(),
            }),
            Box::new(Fake {
                checks: 0,
                ends_after: Some(3),
                stopped: stopped.clone(),
            }),
        ];
        assert!(!sup.run(&mut services, &signals));
        assert_eq!(stopped.load(Ordering::SeqCst), 2);
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(doc["vms"].as_array().unwrap().len(), 2);
        let text = std::fs::read_to_string(&prom).unwrap();
        assert!(
            text.contains("outboard_vsock_checks{guest_cid=\"3\",socket=\"/s\"}"),
            "{text}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_thread_service_runs_until_asked_and_removes_its_files() {
        let dir = std::env::temp_dir().join(format!("outboard-sup-t-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("left");
        std::fs::write(&file, b"x").unwrap();
        let mut s = ThreadService::new("t", "t", vec![file.clone()], |stop: EventFd| {
            // Blocks until the eventfd is written (the stop request).
            while stop.read().is_err() {
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(())
        })
        .unwrap();
        s.start().unwrap();
        assert!(s.start().is_err(), "started twice");
        assert_eq!(s.check(), Health::Running);
        s.request_stop();
        assert!(s.finish(Instant::now() + Duration::from_secs(5)));
        assert!(!file.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_thread_that_does_not_stop_is_left_behind_in_time() {
        let mut s = ThreadService::new("stuck", "stuck", Vec::new(), |_stop: EventFd| {
            std::thread::sleep(Duration::from_secs(3));
            Ok(())
        })
        .unwrap();
        s.start().unwrap();
        s.request_stop();
        let start = Instant::now();
        assert!(!s.finish(Instant::now() + Duration::from_millis(50)));
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[cfg(feature = "jail")]
    #[test]
    fn restarts_back_off_exponentially_up_to_a_cap() {
        use super::jailed::backoff;
        let secs: Vec<u64> = (0..10).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [0, 1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(u32::MAX).as_secs(), 60);
    }

    #[test]
    fn stale_sockets_are_removed_and_other_files_are_not() {
        let dir = std::env::temp_dir().join(format!("outboard-sup-s-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("s.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        remove_stale_socket(&sock).unwrap();
        assert!(!sock.exists());
        let plain = dir.join("plain");
        std::fs::write(&plain, b"x").unwrap();
        let err = remove_stale_socket(&plain).unwrap_err();
        assert!(err.contains("is not a socket"), "{err}");
        remove_stale_socket(&dir.join("absent")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
