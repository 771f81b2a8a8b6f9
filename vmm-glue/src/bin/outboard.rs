//! `outboard`: Outboard's device daemons.
//!
//! `outboard vsock` serves virtio-vsock devices over vhost-user, one worker thread per
//! VM, with the AF_UNIX muxer in Firecracker's convention. It never daemonizes; SIGTERM
//! and SIGINT stop it cleanly (exit status 0). Bad flags or config: a message naming the
//! value and exit status 2.
//!
//! `outboard media --socket-path PATH --camera` serves the software camera as a
//! virtio-media device over vhost-user; `--v4l2-device /dev/videoN` (feature
//! `v4l2-proxy`) serves a host V4L2 capture or mem-to-mem node through the V4L2 proxy
//! instead (with `--jail`, the node is the only device bound into the jail).
//!
//! With `--jail` (both commands) each worker runs in a jailed child process instead of a
//! thread: the daemon keeps the vhost-user listening socket, forks one child per VM
//! (see `outboard_glue::jail`), reports how a child ended and starts a new one on the
//! same socket. `--jail-seccomp log` develops the seccomp allow-list.

use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use outboard_devices::media::runner::{MaxSessions, DEFAULT_MAX_SESSIONS};
use outboard_devices::vsock::{
    sibling_socket_pair, Vsock, VsockDeviceConfig, VsockMetrics, VsockMetricsSnapshot,
};
use outboard_glue::media::serve_camera_with;
use outboard_glue::metrics::{self, VmMetrics};
use outboard_glue::vhost_user::daemon::{self, WorkerError};
use outboard_glue::vsock_cli::{
    resolve, sibling_pairs, ConfigError, FlatFlags, SiblingGroups, VmConfig,
};
use vmm_sys_util::eventfd::EventFd;

#[derive(Parser, Debug)]
#[command(
    name = "outboard",
    version,
    about = "Outboard's vhost-user device daemons"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve virtio-vsock over vhost-user (a drop-in for vhost-device-vsock; host side in
    /// Firecracker's AF_UNIX convention: `CONNECT port` is answered `OK host-port`).
    Vsock(VsockArgs),
    /// Serve virtio-media over vhost-user: `--camera` is the software camera (a moving
    /// test pattern in YUYV, NV12 and RGB24), `--v4l2-device` a host V4L2 node.
    Media(MediaArgs),
}

#[derive(Args, Debug)]
struct MediaArgs {
    /// The vhost-user socket to listen on.
    #[arg(long, visible_alias = "socket", value_name = "PATH")]
    socket_path: PathBuf,
    /// Serve the software camera.
    #[arg(long)]
    camera: bool,
    /// Make the camera multi-planar (VIDEO_CAPTURE_MPLANE only: NV12M, YUV420M, ...).
    #[arg(long, requires = "camera")]
    mplane: bool,
    /// Serve this host V4L2 capture or mem-to-mem node (`/dev/videoN`) through the V4L2
    /// proxy (needs an outboard built with the `v4l2-proxy` feature).
    #[arg(long, value_name = "PATH")]
    v4l2_device: Option<PathBuf>,
    /// Size of the shared memory region for MMAP buffers, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    shm_size_mib: u64,
    /// Most sessions (guest opens of the device node) served at once, 1 to 1024; an
    /// open beyond it fails with ENFILE in the guest.
    ///
    /// Every session holds fds in the daemon (the camera's frame timer, the V4L2
    /// proxy's host node and epoll instance), so without a cap a guest that opens the
    /// node without end fills the daemon's fd table. The default, 128, lets a node be
    /// open 100 times at once as v4l2-compliance requires, with room for the fds
    /// applications keep besides, and costs the daemon at most 256 fds.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_SESSIONS)]
    max_sessions: usize,
    #[command(flatten)]
    jail: JailArgs,
}

#[derive(Args, Debug)]
struct JailArgs {
    /// Run each worker in a jailed child process (namespaces, empty root, no
    /// capabilities, seccomp) that the daemon restarts when it dies.
    #[arg(long)]
    jail: bool,
    /// What seccomp does with a system call outside the worker's allow-list: `kill`,
    /// `errno` (EPERM) or `log` (allowed and logged by the kernel).
    #[arg(long, value_name = "MODE", default_value = "kill", requires = "jail")]
    jail_seccomp: String,
    /// Private memory (heap) each jailed worker may use, in MiB (RLIMIT_DATA; guest
    /// memory does not count). A worker that needs more dies and is replaced.
    #[arg(long, value_name = "MIB", default_value_t = 1024, requires = "jail",
          value_parser = clap::value_parser!(u64).range(16..=1 << 20))]
    jail_memory_mib: u64,
    /// Processes and threads each jailed worker may have (RLIMIT_NPROC, per worker).
    #[arg(long, value_name = "N", default_value_t = 4, requires = "jail",
          value_parser = clap::value_parser!(u64).range(2..=4096))]
    jail_max_tasks: u64,
}

impl JailArgs {
    #[cfg(feature = "jail")]
    fn limits(&self) -> outboard_glue::jail::WorkerLimits {
        outboard_glue::jail::WorkerLimits {
            data_bytes: self.jail_memory_mib << 20,
            tasks: self.jail_max_tasks,
        }
    }
}

#[derive(Args, Debug)]
struct VsockArgs {
    /// A VM: `guest-cid=N,socket=PATH,uds-path=PATH`, optionally followed by
    /// `,tx-buffer-size=N`, `,queue-size=N`, `,groups=a+b`. Repeat for several VMs (one
    /// worker thread each).
    #[arg(long = "vm", value_name = "SPEC")]
    vm: Vec<String>,
    /// The guest's CID (single-VM form).
    #[arg(long, value_name = "CID")]
    guest_cid: Option<String>,
    /// The vhost-user socket to listen on (single-VM form).
    #[arg(long, visible_alias = "socket-path", value_name = "PATH")]
    socket: Option<String>,
    /// The host-side AF_UNIX socket of the muxer (single-VM form).
    #[arg(long, value_name = "PATH")]
    uds_path: Option<String>,
    /// Per-connection TX buffer in bytes, also the guest's credit (single-VM form).
    #[arg(long, value_name = "BYTES")]
    tx_buffer_size: Option<String>,
    /// Largest ring size accepted from the front-end (single-VM form).
    #[arg(long, value_name = "N")]
    queue_size: Option<String>,
    /// Sibling groups joined with '+' (single-VM form).
    #[arg(long, value_name = "GROUPS")]
    groups: Option<String>,
    /// A config file with the same keys (vhost-device-vsock's YAML form).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Serve on this inherited listening socket instead of binding --socket.
    #[arg(long, value_name = "FD")]
    fd: Option<RawFd>,
    /// Write the devices' counters as JSON to this file, periodically and at exit.
    ///
    /// With --jail each worker publishes its device's counters into a shared memory
    /// page after every event it handles, and the daemon reads the pages. A restarted
    /// worker starts from zero; the daemon adds the dead workers' last values, so the
    /// counters never go backwards, and counts the restarts in `worker_restarts`.
    #[arg(long, value_name = "PATH")]
    metrics: Option<PathBuf>,
    /// Seconds between metrics writes.
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    metrics_interval: u64,
    /// Print the back-end's capabilities as JSON (vhost-user convention) and exit.
    #[arg(long)]
    print_capabilities: bool,
    #[command(flatten)]
    jail: JailArgs,
}

/// Exit status for bad flags or config.
const EXIT_USAGE: u8 = 2;

fn usage_error(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("outboard vsock: {e}");
    ExitCode::from(EXIT_USAGE)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match cli.command {
        Command::Vsock(args) => vsock(args),
        Command::Media(args) => media(args),
    }
}

/// What `outboard media` serves.
enum MediaSource {
    /// The software camera, multi-planar if `mplane`.
    Camera {
        /// Serve VIDEO_CAPTURE_MPLANE instead of VIDEO_CAPTURE.
        mplane: bool,
    },
    /// A host V4L2 node.
    #[cfg(feature = "v4l2-proxy")]
    V4l2(outboard_devices::media::proxy::HostNode),
}

impl MediaSource {
    /// The worker's name in logs.
    fn name(&self) -> String {
        match self {
            MediaSource::Camera { .. } => "media camera".into(),
            #[cfg(feature = "v4l2-proxy")]
            MediaSource::V4l2(node) => format!("media v4l2 {}", node.path.display()),
        }
    }

    /// Serves it on `listener` until `stop`.
    fn serve(
        &self,
        listener: UnixListener,
        shm_size: u64,
        max_sessions: MaxSessions,
        stop: &EventFd,
        name: &str,
    ) -> Result<(), WorkerError> {
        match self {
            MediaSource::Camera { mplane } => {
                serve_camera_with(listener, shm_size, *mplane, max_sessions, stop, name)
            }
            #[cfg(feature = "v4l2-proxy")]
            MediaSource::V4l2(node) => outboard_glue::media::serve_v4l2_proxy(
                listener,
                node.clone(),
                shm_size,
                max_sessions,
                stop,
                name,
            ),
        }
    }
}

/// Checks the host node: it must open and be a V4L2 streaming capture or m2m node.
#[cfg(feature = "v4l2-proxy")]
fn v4l2_source(path: &Path) -> Result<MediaSource, String> {
    let node = outboard_devices::media::proxy::HostNode::probe(path)
        .map_err(|e| format!("--v4l2-device: {e}"))?;
    log::info!(
        "{}: driver {}, card {:?}, device_caps {:#x}",
        path.display(),
        node.driver,
        node.card,
        node.device_caps
    );
    Ok(MediaSource::V4l2(node))
}

#[cfg(not(feature = "v4l2-proxy"))]
fn v4l2_source(path: &Path) -> Result<MediaSource, String> {
    Err(format!(
        "--v4l2-device {}: this outboard was built without the `v4l2-proxy` feature",
        path.display()
    ))
}

fn media(args: MediaArgs) -> ExitCode {
    let source = match (args.camera, &args.v4l2_device) {
        (true, None) => MediaSource::Camera {
            mplane: args.mplane,
        },
        (false, Some(path)) => match v4l2_source(path) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("outboard media: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        },
        _ => {
            eprintln!("outboard media: exactly one of --camera and --v4l2-device PATH is required");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let shm_size = match args.shm_size_mib.checked_mul(1 << 20).filter(|s| *s > 0) {
        Some(s) => s,
        None => {
            eprintln!(
                "outboard media: --shm-size-mib {}: out of range",
                args.shm_size_mib
            );
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let max_sessions = match MaxSessions::new(args.max_sessions) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("outboard media: --max-sessions: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let set = signal_set();
    // SAFETY: `set` is a valid sigset_t; the old mask is not needed.
    if unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) } != 0 {
        eprintln!("outboard media: cannot block SIGTERM/SIGINT");
        return ExitCode::FAILURE;
    }
    if args.jail.jail {
        return jailed::media(&args, source, shm_size, max_sessions, &set);
    }
    let run = || -> Result<(), String> {
        remove_stale_socket(&args.socket_path)?;
        let listener = UnixListener::bind(&args.socket_path)
            .map_err(|e| format!("bind {}: {e}", args.socket_path.display()))?;
        let stop = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|e| format!("eventfd: {e}"))?;
        let worker_stop = stop.try_clone().map_err(|e| format!("eventfd: {e}"))?;
        let name = source.name();
        log::info!("{name} on vhost-user socket {}", args.socket_path.display());
        let thread = std::thread::Builder::new()
            .name("media".into())
            .spawn(move || source.serve(listener, shm_size, max_sessions, &worker_stop, &name))
            .map_err(|e| format!("cannot start the worker thread: {e}"))?;
        while !thread.is_finished() {
            if let Some(sig) = wait_signal(&set, Duration::from_millis(500)) {
                log::info!("signal {sig}: stopping");
                break;
            }
        }
        let _ = stop.write(1);
        let res = match finished_by(thread, Instant::now() + SHUTDOWN_GRACE).map(|t| t.join()) {
            Some(Ok(r)) => r.map_err(|e| e.to_string()),
            Some(Err(_)) => Err("the worker thread panicked".into()),
            None => Err(format!(
                "the worker did not stop within {SHUTDOWN_GRACE:?}; exiting without it"
            )),
        };
        let _ = std::fs::remove_file(&args.socket_path);
        res
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outboard media: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A listening socket for one VM, and whether we created its path.
struct Listening {
    listener: UnixListener,
    created: Option<PathBuf>,
}

fn listen(vm: &VmConfig, fd: Option<RawFd>) -> Result<Listening, String> {
    if let Some(fd) = fd {
        return inherited_listener(fd).map(|listener| Listening {
            listener,
            created: None,
        });
    }
    let path = &vm.socket;
    // A stale socket from an earlier run: vhost-user sockets are not shared, so
    // replacing it is what users expect (vhost-device-vsock does the same).
    remove_stale_socket(path)?;
    let listener = UnixListener::bind(path)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    Ok(Listening {
        listener,
        created: Some(path.clone()),
    })
}

fn inherited_listener(fd: RawFd) -> Result<UnixListener, String> {
    let mut accepting: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `accepting`, a live c_int.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            std::ptr::addr_of_mut!(accepting).cast(),
            &mut len,
        )
    };
    if rc != 0 || accepting == 0 {
        return Err(format!("--fd {fd} is not a listening socket"));
    }
    let mut domain: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: as above, for SO_DOMAIN.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            std::ptr::addr_of_mut!(domain).cast(),
            &mut len,
        )
    };
    if rc != 0 || domain != libc::AF_UNIX {
        return Err(format!("--fd {fd} is not an AF_UNIX socket"));
    }
    // SAFETY: the fd was inherited for us to own (the --fd contract), is open (the
    // getsockopt calls succeeded) and is a listening AF_UNIX socket.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    // SAFETY: fcntl(F_SETFD) on the fd we now own; no memory is passed.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(listener)
}

/// How long the daemon waits for its workers after SIGTERM/SIGINT before it exits
/// without them (a worker stuck on a peer must not keep the daemon alive).
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1500);

/// `thread` once it has finished, or `None` if it is still running at `deadline`.
fn finished_by<T>(
    thread: std::thread::JoinHandle<T>,
    deadline: Instant,
) -> Option<std::thread::JoinHandle<T>> {
    while !thread.is_finished() {
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Some(thread)
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t for the calls; the signals are valid numbers.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
    }
    set
}

/// Waits up to `timeout` for SIGTERM or SIGINT (blocked in every thread).
fn wait_signal(set: &libc::sigset_t, timeout: Duration) -> Option<i32> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: `set` and `ts` are valid for the call; no siginfo is requested.
    let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    (sig > 0).then_some(sig)
}

struct Worker {
    vm: VmConfig,
    stop: EventFd,
    metrics: Arc<VsockMetrics>,
    thread: Option<JoinHandle<Result<(), WorkerError>>>,
    /// Socket files this daemon created, removed at exit.
    created: Vec<PathBuf>,
}

fn snapshot(workers: &[Worker]) -> Vec<VmMetrics> {
    workers
        .iter()
        .map(|w| VmMetrics {
            guest_cid: w.vm.guest_cid,
            socket: w.vm.socket.clone(),
            counters: metrics::counters_of(&w.metrics.snapshot()),
        })
        .collect()
}

fn write_metrics(path: Option<&Path>, workers: &[Worker]) {
    if let Some(p) = path {
        if let Err(e) = metrics::write(p, &snapshot(workers)) {
            log::warn!("cannot write metrics to {}: {e}", p.display());
        }
    }
}

fn vsock(args: VsockArgs) -> ExitCode {
    if args.print_capabilities {
        println!("{{\n  \"type\": \"vsock\"\n}}");
        return ExitCode::SUCCESS;
    }
    let config_text = match &args.config {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(t) => Some(t),
            Err(e) => {
                return usage_error(ConfigError::ConfigFile {
                    path: p.display().to_string(),
                    reason: e.to_string(),
                })
            }
        },
        None => None,
    };
    // With an inherited listening socket there is no path to bind: name the fd instead.
    let socket = match (&args.socket, args.fd) {
        (None, Some(fd)) if args.vm.is_empty() && args.config.is_none() => Some(format!("fd:{fd}")),
        (s, _) => s.clone(),
    };
    let flat = FlatFlags {
        guest_cid: args.guest_cid.clone(),
        socket,
        uds_path: args.uds_path.clone(),
        tx_buffer_size: args.tx_buffer_size.clone(),
        queue_size: args.queue_size.clone(),
        groups: args.groups.clone(),
    };
    let vms = match resolve(&args.vm, &flat, config_text.as_deref()) {
        Ok(v) => v,
        Err(e) => return usage_error(e),
    };
    if args.fd.is_some() && vms.len() != 1 {
        return usage_error(format!(
            "--fd serves one VM, but {} are configured",
            vms.len()
        ));
    }
    if args.metrics_interval == 0 {
        return usage_error("--metrics-interval 0: the interval must be at least 1 second");
    }

    // Block the stop signals before any thread starts, so only sigtimedwait sees them.
    let set = signal_set();
    // SAFETY: `set` is a valid sigset_t; the old mask is not needed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        eprintln!("outboard vsock: cannot block SIGTERM/SIGINT: error {rc}");
        return ExitCode::FAILURE;
    }
    if args.jail.jail {
        let metrics = args
            .metrics
            .as_deref()
            .map(|p| (p, Duration::from_secs(args.metrics_interval)));
        return jailed::vsock(&vms, args.fd, &args.jail, metrics, &set);
    }

    let mut workers = Vec::new();
    let mut failed = false;
    let mut siblings = SiblingGroups::default();
    for vm in &vms {
        match start_worker(vm, args.fd, &mut siblings) {
            Ok(w) => workers.push(w),
            Err(e) => {
                log::error!("VM with guest CID {}: {e}", vm.guest_cid);
                failed = true;
                break;
            }
        }
    }

    let interval = Duration::from_secs(args.metrics_interval);
    let mut last_metrics = Instant::now();
    write_metrics(args.metrics.as_deref(), &workers);
    while !failed {
        if let Some(sig) = wait_signal(&set, Duration::from_millis(500)) {
            log::info!("signal {sig}: stopping");
            break;
        }
        if workers
            .iter()
            .any(|w| w.thread.as_ref().is_some_and(|t| t.is_finished()))
        {
            log::error!("a worker stopped on its own; stopping every worker");
            failed = true;
        }
        if last_metrics.elapsed() >= interval {
            write_metrics(args.metrics.as_deref(), &workers);
            last_metrics = Instant::now();
        }
    }

    for w in &workers {
        if let Err(e) = w.stop.write(1) {
            log::error!("cannot stop the worker of CID {}: {e}", w.vm.guest_cid);
        }
    }
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    for w in &mut workers {
        let Some(t) = w.thread.take() else { continue };
        let Some(t) = finished_by(t, deadline) else {
            log::error!(
                "the worker of CID {} did not stop within {SHUTDOWN_GRACE:?}; exiting without it",
                w.vm.guest_cid
            );
            failed = true;
            for p in &w.created {
                let _ = std::fs::remove_file(p);
            }
            continue;
        };
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                log::error!("worker of CID {}: {e}", w.vm.guest_cid);
                failed = true;
            }
            Err(_) => {
                log::error!("worker of CID {} panicked", w.vm.guest_cid);
                failed = true;
            }
        }
        for p in &w.created {
            let _ = std::fs::remove_file(p);
        }
    }
    write_metrics(args.metrics.as_deref(), &workers);
    if failed {
        ExitCode::FAILURE
    } else {
        log::info!("stopped cleanly");
        ExitCode::SUCCESS
    }
}

/// The muxer's own listening sockets: `<uds_path>` and `<uds_path>_seqpacket`.
fn muxer_sockets(vm: &VmConfig) -> Vec<PathBuf> {
    let mut seq = vm.uds_path.as_os_str().to_owned();
    seq.push("_seqpacket");
    vec![vm.uds_path.clone(), PathBuf::from(seq)]
}

/// Removes a socket file left by an earlier run (never anything that is not a socket).
fn remove_stale_socket(path: &Path) -> Result<(), String> {
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

fn start_worker(
    vm: &VmConfig,
    fd: Option<RawFd>,
    siblings: &mut SiblingGroups,
) -> Result<Worker, String> {
    let mut sockets = muxer_sockets(vm);
    for p in &sockets {
        remove_stale_socket(p)?;
    }
    let mut config = VsockDeviceConfig::new(vm.guest_cid, vm.uds_path.clone());
    config.tx_buf_size = vm.tx_buffer_size;
    let device = Vsock::new(config).map_err(|e| e.to_string())?;
    let linked = siblings
        .join(&vm.groups, device.sibling())
        .map_err(|e| e.to_string())?;
    if linked > 0 {
        log::info!(
            "guest CID {}: reaches {linked} sibling VM(s) of groups {}",
            vm.guest_cid,
            vm.groups.join("+")
        );
    }
    let metrics = device.metrics();
    let Listening { listener, created } = listen(vm, fd)?;
    sockets.extend(created);
    let stop = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
        .map_err(|e| format!("eventfd: {e}"))?;
    let worker_stop = stop.try_clone().map_err(|e| format!("eventfd: {e}"))?;
    let name = format!("vsock cid {}", vm.guest_cid);
    let queue_size = vm.queue_size;
    let thread = std::thread::Builder::new()
        .name(format!("vsock-{}", vm.guest_cid))
        .spawn(move || daemon::serve(device, listener, queue_size, &worker_stop, &name).map(drop))
        .map_err(|e| format!("cannot start the worker thread: {e}"))?;
    log::info!(
        "guest CID {}: vhost-user socket {}, host sockets {}",
        vm.guest_cid,
        vm.socket.display(),
        vm.uds_path.display()
    );
    Ok(Worker {
        vm: vm.clone(),
        stop,
        metrics,
        thread: Some(thread),
        created: sockets,
    })
}

/// `--jail`: workers in jailed children, supervised from the main thread.
#[cfg(feature = "jail")]
mod jailed {
    use super::*;
    use outboard_glue::jail::{describe_exit, worker_jail, JailedWorker, SeccompMode};
    use outboard_glue::shared_metrics::{CounterPage, PublishingDevice, RestartCounters};
    use outboard_sandbox::Jail;

    /// How long the stopping workers get, together, before they are killed: SIGTERM
    /// ends the daemon within 2 s whatever a worker does.
    const STOP_TIMEOUT: Duration = Duration::from_secs(1);
    /// A worker that dies sooner than this after its start is restarted only after
    /// [`RESTART_DELAY`], so a worker that cannot start does not spin.
    const MIN_RUN: Duration = Duration::from_secs(1);
    const RESTART_DELAY: Duration = Duration::from_secs(1);

    type ServeFn = Box<dyn Fn(UnixListener, Vec<OwnedFd>, &EventFd) -> Result<(), String>>;

    /// One worker the daemon keeps running.
    struct Supervised {
        name: String,
        jail: Jail,
        listener: UnixListener,
        /// Further fds every worker gets (the daemon keeps them across restarts).
        inherit: Vec<OwnedFd>,
        /// Sockets a dead worker leaves behind, removed before each start.
        stale: Vec<PathBuf>,
        /// Socket files this daemon created, removed at exit.
        created: Vec<PathBuf>,
        serve: ServeFn,
        worker: Option<JailedWorker>,
        started: Instant,
        restart_at: Option<Instant>,
        /// `--metrics`: the VM's counter page (its fd is `inherit[0]`).
        counters: Option<VmCounters>,
    }

    /// One VM's entry in the metrics file, read from its workers' counter page.
    struct VmCounters {
        guest_cid: u64,
        socket: PathBuf,
        page: RestartCounters,
    }

    /// `--metrics PATH` and `--metrics-interval`.
    pub(super) type MetricsFile<'a> = Option<(&'a Path, Duration)>;

    fn write_metrics(path: Option<&Path>, sups: &[Supervised]) {
        let Some(path) = path else { return };
        let vms: Vec<VmMetrics> = sups
            .iter()
            .filter_map(|s| s.counters.as_ref())
            .map(|c| VmMetrics {
                guest_cid: c.guest_cid,
                socket: c.socket.clone(),
                counters: c.page.counters(),
            })
            .collect();
        if let Err(e) = metrics::write(path, &vms) {
            log::warn!("cannot write metrics to {}: {e}", path.display());
        }
    }

    impl Supervised {
        fn start(&mut self) -> Result<(), String> {
            for p in &self.stale {
                remove_stale_socket(p)?;
            }
            let serve = &self.serve;
            let inherit: Vec<_> = self.inherit.iter().map(AsFd::as_fd).collect();
            let w = JailedWorker::spawn(
                &self.jail,
                &self.listener,
                &inherit,
                &self.name,
                |l, f, s| serve(l, f, s),
            )
            .map_err(|e| e.to_string())?;
            log::info!("{}: worker runs jailed, pid {}", self.name, w.pid());
            self.worker = Some(w);
            self.started = Instant::now();
            self.restart_at = None;
            Ok(())
        }

        /// Reaps a worker that ended and starts a new one when it is due.
        fn check(&mut self) {
            if let Some(w) = self.worker.as_mut() {
                match w.try_wait() {
                    Ok(None) => return,
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
                        return;
                    }
                }
                self.worker = None;
                if let Some(c) = self.counters.as_mut() {
                    c.page.worker_ended(true);
                }
                let delay = if self.started.elapsed() < MIN_RUN {
                    RESTART_DELAY
                } else {
                    Duration::ZERO
                };
                self.restart_at = Some(Instant::now() + delay);
            }
            if self.restart_at.is_some_and(|t| Instant::now() >= t) {
                if let Err(e) = self.start() {
                    log::error!("{}: cannot start a worker: {e}", self.name);
                    self.restart_at = Some(Instant::now() + RESTART_DELAY);
                }
            }
        }

        /// Stops the worker, killing it if it has not stopped by `deadline`.
        fn stop(&mut self, deadline: Instant) -> bool {
            let mut ok = true;
            if let Some(w) = self.worker.take() {
                let pid = w.pid();
                let grace = deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(10));
                match w.stop(grace) {
                    Ok(outboard_sandbox::ExitStatus::Exited(0)) => {}
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
            for p in &self.created {
                let _ = std::fs::remove_file(p);
            }
            ok
        }
    }

    /// Starts every worker, keeps them running until SIGTERM/SIGINT, then stops them;
    /// writes the metrics file at the start, every interval and at exit.
    fn supervise(
        mut sups: Vec<Supervised>,
        set: &libc::sigset_t,
        metrics_file: MetricsFile<'_>,
    ) -> ExitCode {
        let path = metrics_file.map(|(p, _)| p);
        let interval = metrics_file.map_or(Duration::MAX, |(_, i)| i);
        let mut last_metrics = Instant::now();
        let mut ok = true;
        for s in &mut sups {
            if let Err(e) = s.start() {
                log::error!("{}: {e}", s.name);
                ok = false;
                break;
            }
        }
        if ok {
            write_metrics(path, &sups);
            loop {
                if let Some(sig) = wait_signal(set, Duration::from_millis(100)) {
                    log::info!("signal {sig}: stopping");
                    break;
                }
                for s in &mut sups {
                    s.check();
                }
                if last_metrics.elapsed() >= interval {
                    write_metrics(path, &sups);
                    last_metrics = Instant::now();
                }
            }
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        for s in &mut sups {
            ok &= s.stop(deadline);
        }
        write_metrics(path, &sups);
        if ok {
            log::info!("stopped cleanly");
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }

    fn seccomp_mode(args: &JailArgs) -> Result<SeccompMode, ExitCode> {
        args.jail_seccomp.parse().map_err(usage_error)
    }

    /// `outboard vsock --jail`.
    pub(super) fn vsock(
        vms: &[VmConfig],
        fd: Option<RawFd>,
        args: &JailArgs,
        metrics_file: MetricsFile<'_>,
        set: &libc::sigset_t,
    ) -> ExitCode {
        let mode = match seccomp_mode(args) {
            Ok(m) => m,
            Err(code) => return code,
        };
        // Guests of one group reach each other through a socket pair per pair of VMs,
        // made here and kept for the daemon's life, so a restarted worker finds its
        // links where the old one left them.
        let mut links: Vec<Vec<(u64, OwnedFd)>> = vms.iter().map(|_| Vec::new()).collect();
        for (i, j) in sibling_pairs(vms) {
            match sibling_socket_pair() {
                Ok((a, b)) => {
                    links[i].push((vms[j].guest_cid, a));
                    links[j].push((vms[i].guest_cid, b));
                }
                Err(e) => {
                    log::error!(
                        "the link between guest CIDs {} and {}: {e}",
                        vms[i].guest_cid,
                        vms[j].guest_cid
                    );
                    return ExitCode::FAILURE;
                }
            }
        }
        let mut sups = Vec::new();
        for (vm, links) in vms.iter().zip(links) {
            match supervised_vsock(vm, fd, mode, args.limits(), metrics_file.is_some(), links) {
                Ok(s) => sups.push(s),
                Err(e) => {
                    log::error!("VM with guest CID {}: {e}", vm.guest_cid);
                    let deadline = Instant::now() + STOP_TIMEOUT;
                    for s in &mut sups {
                        s.stop(deadline);
                    }
                    return ExitCode::FAILURE;
                }
            }
        }
        supervise(sups, set, metrics_file)
    }

    fn supervised_vsock(
        vm: &VmConfig,
        fd: Option<RawFd>,
        mode: SeccompMode,
        limits: outboard_glue::jail::WorkerLimits,
        with_metrics: bool,
        links: Vec<(u64, OwnedFd)>,
    ) -> Result<Supervised, String> {
        // The worker sees the uds-path directory at its own absolute path.
        let (dir, file) = match (vm.uds_path.parent(), vm.uds_path.file_name()) {
            (Some(d), Some(f)) => (
                if d.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    d
                },
                f,
            ),
            _ => return Err(format!("uds-path {}: no file name", vm.uds_path.display())),
        };
        let dir = dir
            .canonicalize()
            .map_err(|e| format!("uds-path directory {}: {e}", dir.display()))?;
        let mut vm = vm.clone();
        vm.uds_path = dir.join(file);
        let jail =
            worker_jail(std::slice::from_ref(&dir), mode, limits).map_err(|e| e.to_string())?;
        let stale = muxer_sockets(&vm);
        let Listening { listener, created } = listen(&vm, fd)?;
        let mut all = stale.clone();
        all.extend(created);
        let name = format!("vsock cid {}", vm.guest_cid);
        log::info!(
            "guest CID {}: vhost-user socket {}, host sockets {} (jailed)",
            vm.guest_cid,
            vm.socket.display(),
            vm.uds_path.display()
        );
        let counters = with_metrics
            .then(|| vsock_counters(&vm, &name))
            .transpose()?;
        let slots = counters.as_ref().map(|c| c.page.slots());
        // The worker inherits the counter page first (with --metrics), then its links.
        let mut inherit = match &counters {
            Some(c) => vec![c
                .page
                .fd()
                .try_clone_to_owned()
                .map_err(|e| format!("counter page fd: {e}"))?],
            None => Vec::new(),
        };
        let link_cids: Vec<u64> = links.iter().map(|(cid, _)| *cid).collect();
        if !link_cids.is_empty() {
            log::info!(
                "guest CID {}: reaches {} sibling VM(s) of groups {} (a link to each \
                 jailed worker)",
                vm.guest_cid,
                link_cids.len(),
                vm.groups.join("+")
            );
        }
        inherit.extend(links.into_iter().map(|(_, fd)| fd));
        let worker_name = name.clone();
        let serve: ServeFn = Box::new(move |listener, inherited, stop| {
            let mut config = VsockDeviceConfig::new(vm.guest_cid, vm.uds_path.clone());
            config.tx_buf_size = vm.tx_buffer_size;
            let mut device = Vsock::new(config).map_err(|e| e.to_string())?;
            let mut inherited = inherited.into_iter();
            let page = match slots {
                Some(slots) => {
                    let fd = inherited
                        .next()
                        .ok_or("the counter page was not inherited")?;
                    Some(CounterPage::from_fd(fd, slots).map_err(|e| e.to_string())?)
                }
                None => None,
            };
            for &cid in &link_cids {
                let fd = inherited
                    .next()
                    .ok_or_else(|| format!("the link to sibling CID {cid} was not inherited"))?;
                device
                    .link_sibling_socket(cid, fd)
                    .map_err(|e| e.to_string())?;
            }
            serve_vsock(device, page, listener, vm.queue_size, stop, &worker_name)
        });
        Ok(Supervised {
            name,
            jail,
            listener,
            inherit,
            stale,
            created: all,
            serve,
            worker: None,
            started: Instant::now(),
            restart_at: None,
            counters,
        })
    }

    /// The counter page of a VM's workers, named after the worker.
    fn vsock_counters(vm: &VmConfig, name: &str) -> Result<VmCounters, String> {
        let names = VsockMetricsSnapshot::NAMES
            .iter()
            .map(|n| n.to_string())
            .collect();
        let page = RestartCounters::new(&format!("outboard {name} counters"), names)
            .map_err(|e| e.to_string())?;
        Ok(VmCounters {
            guest_cid: vm.guest_cid,
            socket: vm.socket.clone(),
            page,
        })
    }

    /// Runs the worker loop in the jailed child; with a counter `page`, the device
    /// publishes its counters there after every event.
    fn serve_vsock(
        device: Vsock,
        page: Option<CounterPage>,
        listener: UnixListener,
        queue_size: u16,
        stop: &EventFd,
        name: &str,
    ) -> Result<(), String> {
        match page {
            Some(page) => {
                let m = device.metrics();
                let device = PublishingDevice::new(device, page, move || m.snapshot());
                daemon::serve(device, listener, queue_size, stop, name)
                    .map(|d| drop(d.into_parts()))
            }
            None => daemon::serve(device, listener, queue_size, stop, name).map(drop),
        }
        .map_err(|e| e.to_string())
    }

    /// `outboard media --camera|--v4l2-device PATH --jail`.
    pub(super) fn media(
        args: &MediaArgs,
        source: MediaSource,
        shm_size: u64,
        max_sessions: MaxSessions,
        set: &libc::sigset_t,
    ) -> ExitCode {
        let mode = match seccomp_mode(&args.jail) {
            Ok(m) => m,
            Err(code) => return code,
        };
        let setup = || -> Result<Supervised, String> {
            let jail = match &source {
                MediaSource::Camera { .. } => worker_jail(&[], mode, args.jail.limits()),
                #[cfg(feature = "v4l2-proxy")]
                MediaSource::V4l2(node) => {
                    outboard_glue::jail::v4l2_proxy_jail(&node.path, mode, args.jail.limits())
                }
            }
            .map_err(|e| e.to_string())?;
            remove_stale_socket(&args.socket_path)?;
            let listener = UnixListener::bind(&args.socket_path)
                .map_err(|e| format!("bind {}: {e}", args.socket_path.display()))?;
            let name = source.name();
            let worker_name = name.clone();
            let serve: ServeFn = Box::new(move |listener, _inherited, stop| {
                source
                    .serve(listener, shm_size, max_sessions, stop, &worker_name)
                    .map_err(|e| e.to_string())
            });
            Ok(Supervised {
                name,
                jail,
                listener,
                inherit: Vec::new(),
                stale: Vec::new(),
                created: vec![args.socket_path.clone()],
                serve,
                worker: None,
                started: Instant::now(),
                restart_at: None,
                counters: None,
            })
        };
        match setup() {
            Ok(s) => supervise(vec![s], set, None),
            Err(e) => {
                eprintln!("outboard media: {e}");
                ExitCode::FAILURE
            }
        }
    }
}

/// Built without the `jail` feature: `--jail` is refused.
#[cfg(not(feature = "jail"))]
mod jailed {
    use super::*;

    const UNAVAILABLE: &str = "--jail: this outboard was built without the `jail` feature";

    /// `outboard vsock --jail` without the feature.
    pub(super) fn vsock(
        _vms: &[VmConfig],
        _fd: Option<RawFd>,
        _args: &JailArgs,
        _metrics_file: Option<(&Path, Duration)>,
        _set: &libc::sigset_t,
    ) -> ExitCode {
        usage_error(UNAVAILABLE)
    }

    /// `outboard media --jail` without the feature.
    pub(super) fn media(
        _args: &MediaArgs,
        _source: MediaSource,
        _shm_size: u64,
        _max_sessions: MaxSessions,
        _set: &libc::sigset_t,
    ) -> ExitCode {
        usage_error(UNAVAILABLE)
    }
}
