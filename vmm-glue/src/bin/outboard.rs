//! `outboard`: Outboard's device daemons.
//!
//! This file parses the arguments and calls the library: `outboard_vmm_glue::vsock_daemon`
//! builds the vsock workers, `outboard_vmm_glue::supervisor` runs them (signals, restarts,
//! metrics file, bounded stop).
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
//! (see `outboard_vmm_glue::jail`), reports how a child ended and starts a new one on the
//! same socket. `--jail-seccomp log` develops the seccomp allow-list.
//!
//! `--metrics`, `--metrics-prometheus` and `--metrics-interval` (both commands) have the
//! supervisor write the devices' counters (`outboard_vmm_glue::metrics`); a jailed
//! worker publishes them through a shared counter page
//! (`outboard_vmm_glue::shared_metrics`).

use std::os::fd::{AsFd, AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use outboard_devices::media::runner::{MaxSessions, DEFAULT_MAX_SESSIONS};
use outboard_devices::media::MediaMetrics;
#[cfg(feature = "jail")]
use outboard_devices::media::MediaMetricsSnapshot;
#[cfg(feature = "jail")]
use outboard_vmm_glue::jail::{worker_jail, SeccompMode};
use outboard_vmm_glue::logging::{self, LogFormat};
use outboard_vmm_glue::metrics::{self, DeviceId, VmMetrics};
#[cfg(feature = "jail")]
use outboard_vmm_glue::shared_metrics::{CounterPage, RestartCounters};
use outboard_vmm_glue::supervisor::{
    activated_listener, listen_once, MetricsFile, Service, StopSignals, Supervisor, ThreadService,
};
#[cfg(feature = "jail")]
use outboard_vmm_glue::supervisor::{JailedService, ServeFn};
use outboard_vmm_glue::systemd;
use outboard_vmm_glue::vhost_user::media::{MediaCounters, MediaSource};
use outboard_vmm_glue::vsock_cli::{resolve, ConfigError, FlatFlags, VmConfig};
#[cfg(feature = "jail")]
use outboard_vmm_glue::vsock_daemon::JailOptions;
use outboard_vmm_glue::vsock_daemon::{self, UpgradeOptions};

#[derive(Parser, Debug)]
#[command(
    name = "outboard",
    version,
    about = "Outboard's vhost-user device daemons"
)]
struct Cli {
    /// Log lines as `text` or as `json` (one object per line: ts, level, target,
    /// worker, msg); `RUST_LOG` filters them (default info).
    #[arg(long, global = true, value_name = "FORMAT", default_value = "text",
          value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve virtio-vsock over vhost-user (a drop-in for vhost-device-vsock; host side in
    /// Firecracker's AF_UNIX convention: `CONNECT port` is answered `OK host-port`, or
    /// the host's AF_VSOCK with --forward-cid).
    Vsock(Box<VsockArgs>),
    /// Serve virtio-media over vhost-user: `--camera` is the software camera (a moving
    /// test pattern in YUYV, NV12 and RGB24), `--v4l2-device` a host V4L2 node.
    Media(MediaArgs),
    /// Write the man pages (outboard.1, outboard-vsock.1, outboard-media.1), generated
    /// from these very flag definitions, into a directory (for packagers).
    #[command(hide = true)]
    Man {
        /// The directory to write them to (created if missing).
        #[arg(long, value_name = "DIR")]
        out_dir: PathBuf,
    },
}

/// `outboard man --out-dir DIR`: one page for the command and one per subcommand.
fn man_pages(dir: &Path) -> ExitCode {
    use clap::CommandFactory;
    let write = |cmd: clap::Command, file: &str| -> std::io::Result<()> {
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut out)?;
        std::fs::write(dir.join(file), out)
    };
    let run = || -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut cli = Cli::command();
        // Propagates the global flags (--log-format) into the subcommands' pages.
        cli.build();
        for sub in cli.get_subcommands().filter(|s| !s.is_hide_set()) {
            let name = format!("outboard-{}", sub.get_name());
            write(sub.clone().name(name.clone()), &format!("{name}.1"))?;
        }
        write(cli, "outboard.1")
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outboard man: {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}

#[derive(Args, Debug)]
struct MediaArgs {
    /// The vhost-user socket to listen on.
    /// (Or `--fd`, or a socket passed by systemd's socket activation.)
    #[arg(long, visible_alias = "socket", value_name = "PATH")]
    socket_path: Option<PathBuf>,
    /// Serve on this inherited listening socket instead of binding --socket-path (the
    /// vhost-user back-end convention; systemd socket activation passes fd 3).
    #[arg(long, value_name = "FD", conflicts_with = "socket_path")]
    fd: Option<RawFd>,
    /// Print the back-end's capabilities as JSON (vhost-user convention) and exit.
    #[arg(long)]
    print_capabilities: bool,
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
    metrics: MetricsArgs,
    #[command(flatten)]
    jail: JailArgs,
}

/// `--metrics`, `--metrics-prometheus`, `--metrics-interval`: the same for every
/// command (`outboard_vmm_glue::metrics` writes the files).
#[derive(Args, Debug)]
struct MetricsArgs {
    /// Write the devices' counters as JSON to this file, periodically and at exit:
    /// `timestamp_ms`, then `vms`, one entry per device with `device` (`vsock`,
    /// `media`), `guest_cid` (vsock only), `socket` (the vhost-user socket) and
    /// `counters`.
    ///
    /// With --jail each worker publishes its device's counters into a shared memory
    /// page after every event it handles, and the daemon reads the pages. A restarted
    /// worker starts from zero; the daemon adds the dead workers' last values, so the
    /// counters never go backwards, and counts the restarts in `worker_restarts`.
    #[arg(long, value_name = "PATH")]
    metrics: Option<PathBuf>,
    /// Write the devices' counters in the Prometheus text exposition format to this
    /// file, at the same times as --metrics (e.g. into node_exporter's textfile
    /// collector directory, as `outboard.prom`): `outboard_vsock_<counter>` with
    /// `guest_cid` and `socket` labels, `outboard_media_<counter>` with a `socket`
    /// label, each with the counter's help text. Works with --jail.
    #[arg(long, value_name = "PATH")]
    metrics_prometheus: Option<PathBuf>,
    /// Seconds between metrics writes.
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    metrics_interval: u64,
}

impl MetricsArgs {
    /// The files to write (`None` without --metrics and --metrics-prometheus); an
    /// interval of 0 is an error.
    fn files(&self) -> Result<Option<MetricsFile>, &'static str> {
        if self.metrics_interval == 0 {
            return Err("--metrics-interval 0: the interval must be at least 1 second");
        }
        Ok(
            (self.metrics.is_some() || self.metrics_prometheus.is_some()).then(|| MetricsFile {
                path: self.metrics.clone(),
                prometheus: self.metrics_prometheus.clone(),
                interval: Duration::from_secs(self.metrics_interval),
            }),
        )
    }
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
    fn limits(&self) -> outboard_vmm_glue::jail::WorkerLimits {
        outboard_vmm_glue::jail::WorkerLimits {
            data_bytes: self.jail_memory_mib << 20,
            tasks: self.jail_max_tasks,
        }
    }
}

#[derive(Args, Debug)]
struct VsockArgs {
    /// A VM: `guest-cid=N,socket=PATH,uds-path=PATH` (or `forward-cid=CID` with
    /// optional `forward-listen=P1+P2` instead of `uds-path`), optionally followed by
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
    /// Instead of --uds-path: forward guest connections to host port P to AF_VSOCK
    /// (CID, P) through the host kernel (1: the host itself, with vsock_loopback).
    #[arg(long, value_name = "CID", conflicts_with = "uds_path")]
    forward_cid: Option<String>,
    /// With --forward-cid: AF_VSOCK ports (joined with '+') the daemon listens on; a
    /// host connection to port P reaches guest port P, with no CONNECT line.
    #[arg(long, value_name = "PORTS", requires = "forward_cid")]
    forward_listen: Option<String>,
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
    #[command(flatten)]
    metrics: MetricsArgs,
    /// Live upgrade: listen on this Unix socket for a newer `outboard vsock` that
    /// takes every VM over (its guest memory, rings and every open vsock connection)
    /// with no reset the guest or QEMU can see; this process then exits with status 0.
    /// Works with --jail; not for VMs that share a sibling group.
    #[arg(long, value_name = "PATH")]
    upgrade_socket: Option<PathBuf>,
    /// Live upgrade: take every VM over from the `outboard vsock` listening on
    /// --upgrade-socket instead of starting afresh (give the same VM flags as it has).
    /// If anything does not fit, this process exits with an error and the running one
    /// serves on; once taken over, this one listens on --upgrade-socket in turn.
    #[arg(long, requires = "upgrade_socket")]
    take_over: bool,
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

fn media_usage_error(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("outboard media: {e}");
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
    logging::init(if cli.log_format == "json" {
        LogFormat::Json
    } else {
        LogFormat::Text
    });
    match cli.command {
        Command::Vsock(args) => vsock(*args),
        Command::Media(args) => media(args),
        Command::Man { out_dir } => man_pages(&out_dir),
    }
}

/// Checks the host node (see [`MediaSource::v4l2`]) and logs what it is.
fn v4l2_source(path: &Path) -> Result<MediaSource, String> {
    let source = MediaSource::v4l2(path).map_err(|e| format!("--v4l2-device: {e}"))?;
    log::info!("{}", source.name());
    Ok(source)
}

/// `outboard media --print-capabilities`: the `VHostUserBackendCapabilities` object of
/// QEMU's `docs/interop/vhost-user.json`. Its `VHostUserBackendType` has no value for
/// virtio-media yet (QEMU 11.1); "media" is the device's name in the virtio spec.
const MEDIA_CAPABILITIES: &str = "{\n  \"type\": \"media\"\n}";

fn media(args: MediaArgs) -> ExitCode {
    if args.print_capabilities {
        println!("{MEDIA_CAPABILITIES}");
        return ExitCode::SUCCESS;
    }
    // A listening socket from systemd's socket activation, when neither --fd nor
    // --socket-path is given.
    let fd = match (args.fd, &args.socket_path) {
        (None, None) => match activated_listener() {
            Ok(Some(fd)) => Some(fd),
            Ok(None) => {
                return media_usage_error(
                    "--socket-path, --fd or systemd socket activation (LISTEN_FDS) is required",
                )
            }
            Err(e) => return media_usage_error(e),
        },
        (fd, _) => fd,
    };
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
    let metrics = match args.metrics.files() {
        Ok(m) => m,
        Err(e) => return media_usage_error(e),
    };
    #[cfg(feature = "jail")]
    let jail = match jail_options(&args.jail) {
        Ok(j) => j,
        Err(code) => return code,
    };
    #[cfg(not(feature = "jail"))]
    if args.jail.jail {
        return usage_error(NO_JAIL);
    }
    let signals = match StopSignals::block() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("outboard media: cannot block SIGTERM/SIGINT: {e}");
            return ExitCode::FAILURE;
        }
    };
    let setup = || -> Result<Box<dyn Service>, String> {
        #[cfg(feature = "jail")]
        let jail = match jail {
            Some(j) => Some(
                match &source {
                    MediaSource::Camera { .. } => worker_jail(&[], j.mode, j.limits),
                    #[cfg(feature = "v4l2-proxy")]
                    MediaSource::V4l2(node) => {
                        // A node the worker cannot open would kill it at every start.
                        outboard_vmm_glue::jail::check_worker_can_open(&node.path)?;
                        outboard_vmm_glue::jail::v4l2_proxy_jail(&node.path, j.mode, j.limits)
                    }
                }
                .map_err(|e| e.to_string())?,
            ),
            None => None,
        };
        let (listener, created, shown) = listen_once(args.socket_path.as_deref(), fd)?;
        let name = source.name();
        log::info!("{name} on vhost-user socket {shown}");
        let device = DeviceId::media(media_socket(&listener, &created));
        let worker_name = name.clone();
        #[cfg(feature = "jail")]
        if let Some(jail) = jail {
            // With metrics, the worker inherits the counter page and publishes into it.
            let counters = match metrics {
                Some(_) => Some(
                    RestartCounters::of::<MediaMetricsSnapshot>(&format!(
                        "outboard {name} counters"
                    ))
                    .map_err(|e| e.to_string())?,
                ),
                None => None,
            };
            let inherit = RestartCounters::inherited(counters.as_ref())?;
            let slots = counters.as_ref().map(RestartCounters::slots);
            let serve: ServeFn = Box::new(move |listener, inherited, stop| {
                let counters = match slots {
                    Some(slots) => {
                        let fd = inherited
                            .into_iter()
                            .next()
                            .ok_or("the counter page was not inherited")?;
                        MediaCounters::Page(
                            CounterPage::from_fd(fd, slots).map_err(|e| e.to_string())?,
                        )
                    }
                    None => MediaCounters::Own,
                };
                source
                    .serve(
                        listener,
                        shm_size,
                        max_sessions,
                        counters,
                        stop,
                        &worker_name,
                    )
                    .map_err(|e| e.to_string())
            });
            let mut service = JailedService::new(name, jail, listener, serve)
                .inherit(inherit)
                .created(created);
            if let Some(c) = counters {
                service = service.counters(device, c);
            }
            return Ok(Box::new(service));
        }
        // The device counts into counters the daemon holds.
        let shared = Arc::new(MediaMetrics::default());
        let counters = MediaCounters::Shared(shared.clone());
        let service = ThreadService::new(name, "media", created, move |stop| {
            source
                .serve(
                    listener,
                    shm_size,
                    max_sessions,
                    counters,
                    &stop,
                    &worker_name,
                )
                .map_err(|e| e.to_string())
        })
        .map_err(|e| format!("eventfd: {e}"))?
        .with_metrics(move || VmMetrics {
            device: device.clone(),
            counters: metrics::counters_of(&shared.snapshot()),
        });
        Ok(Box::new(service))
    };
    match setup() {
        Ok(service) => {
            if Supervisor::new(metrics).run(&mut [service], &signals) {
                log::info!("stopped cleanly");
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("outboard media: {e}");
            ExitCode::FAILURE
        }
    }
}

/// How the metrics files name the media device's socket: the path it bound, else the
/// path an inherited socket is bound to, else `fd:N`.
fn media_socket(listener: &UnixListener, created: &[PathBuf]) -> PathBuf {
    created
        .first()
        .cloned()
        .or_else(|| systemd::bound_path(listener.as_fd()))
        .unwrap_or_else(|| PathBuf::from(format!("fd:{}", listener.as_raw_fd())))
}

/// The jail options of `--jail` (`None` without it); a bad `--jail-seccomp` is a usage
/// error.
#[cfg(feature = "jail")]
fn jail_options(args: &JailArgs) -> Result<Option<JailOptions>, ExitCode> {
    if !args.jail {
        return Ok(None);
    }
    let mode: SeccompMode = args.jail_seccomp.parse().map_err(usage_error)?;
    Ok(Some(JailOptions {
        mode,
        limits: args.limits(),
    }))
}

/// Why `--jail` is refused by an outboard built without the feature.
#[cfg(not(feature = "jail"))]
const NO_JAIL: &str = "--jail: this outboard was built without the `jail` feature";

/// Gives each VM one of the sockets systemd passed: the one bound to the VM's `socket`
/// path if there is one, else the next unclaimed one in order. There must be exactly
/// one per VM.
fn activated_per_vm(vms: &[VmConfig], fds: Vec<OwnedFd>) -> Result<Vec<Option<RawFd>>, String> {
    if fds.is_empty() {
        return Ok(Vec::new());
    }
    if fds.len() != vms.len() {
        return Err(format!(
            "systemd passed {} listening socket(s) (LISTEN_FDS) for {} VM(s): give each VM \
             one (ListenStream= lines of the socket unit)",
            fds.len(),
            vms.len()
        ));
    }
    let paths: Vec<Option<PathBuf>> = fds.iter().map(|f| systemd::bound_path(f.as_fd())).collect();
    let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
    let mut out: Vec<Option<OwnedFd>> = vms.iter().map(|_| None).collect();
    for (i, vm) in vms.iter().enumerate() {
        if let Some(j) = paths
            .iter()
            .position(|p| p.as_deref() == Some(vm.socket.as_path()))
        {
            out[i] = fds[j].take();
        }
    }
    for slot in out.iter_mut().filter(|s| s.is_none()) {
        *slot = fds.iter_mut().find_map(Option::take);
    }
    // The daemon owns them from here on (vsock_daemon::inherited_listener).
    Ok(out
        .into_iter()
        .map(|f| f.map(IntoRawFd::into_raw_fd))
        .collect())
}

fn vsock(args: VsockArgs) -> ExitCode {
    if args.print_capabilities {
        // `features` is not in the vhost-user spec's list; front-ends ignore what they
        // do not know, and an operator's tooling can see that live upgrade is there.
        println!("{{\n  \"type\": \"vsock\",\n  \"features\": [\"live-upgrade\"]\n}}");
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
    // Listening sockets from systemd's socket activation, when --fd is not given.
    let activated = match args.fd {
        Some(_) => Vec::new(),
        None => match systemd::listen_fds() {
            Ok(fds) => fds,
            Err(e) => return usage_error(e),
        },
    };
    // With an inherited listening socket there is no path to bind: name the fd instead.
    let inherited = args.fd.or_else(|| activated.first().map(|f| f.as_raw_fd()));
    let socket = match (&args.socket, inherited) {
        (None, Some(fd)) if args.vm.is_empty() && args.config.is_none() => Some(format!("fd:{fd}")),
        (s, _) => s.clone(),
    };
    let flat = FlatFlags {
        guest_cid: args.guest_cid.clone(),
        socket,
        uds_path: args.uds_path.clone(),
        forward_cid: args.forward_cid.clone(),
        forward_listen: args.forward_listen.clone(),
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
    let fds: Vec<Option<RawFd>> = match args.fd {
        Some(fd) => vec![Some(fd)],
        None => match activated_per_vm(&vms, activated) {
            Ok(fds) => fds,
            Err(e) => return usage_error(e),
        },
    };
    let metrics = match args.metrics.files() {
        Ok(m) => m,
        Err(e) => return usage_error(e),
    };
    if args.upgrade_socket.is_some() {
        if let Some(&(i, j)) = outboard_vmm_glue::vsock_cli::sibling_pairs(&vms).first() {
            return usage_error(format!(
                "--upgrade-socket: guest CIDs {} and {} share a sibling group, and a live \
                 upgrade does not carry the packets in flight between sibling VMs",
                vms[i].guest_cid, vms[j].guest_cid
            ));
        }
    }
    #[cfg(feature = "jail")]
    let jail = match jail_options(&args.jail) {
        Ok(j) => j,
        Err(code) => return code,
    };
    #[cfg(not(feature = "jail"))]
    if args.jail.jail {
        return usage_error(NO_JAIL);
    }
    // Before any thread starts, so only the supervisor sees the stop signals.
    let signals = match StopSignals::block() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("outboard vsock: cannot block SIGTERM/SIGINT: {e}");
            return ExitCode::FAILURE;
        }
    };
    let upgrade = args.upgrade_socket.clone().map(|socket| UpgradeOptions {
        socket,
        take_over: args.take_over,
    });
    let ok = vsock_daemon::run(
        &vms,
        &fds,
        #[cfg(feature = "jail")]
        jail,
        metrics,
        &signals,
        upgrade.as_ref(),
    );
    if ok {
        log::info!("stopped cleanly");
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
