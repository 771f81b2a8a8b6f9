//! The `outboard vsock` daemon: a device worker per VM (a thread, or with `--jail` a
//! jailed child), built from the resolved configuration ([`crate::vsock_cli`]) and run
//! under the [`crate::supervisor`].
//!
//! - [`thread_service`]: the VM's device and worker loop on a thread of the daemon; VMs
//!   of one group reach each other through [`SiblingGroups`].
//! - [`jailed_services`] (feature `jail`): each VM's worker in a jailed child; the
//!   daemon links the workers of VMs that share a group with a socket pair per pair
//!   ([`sibling_pairs`], `outboard_devices::vsock::sibling_socket_pair`) and, with
//!   metrics, gives each worker a counter page ([`crate::shared_metrics`]).
//! - [`run`]: both, until SIGTERM/SIGINT.

use std::os::fd::RawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

use outboard_devices::vsock::{Vsock, VsockMetrics};

use crate::metrics::{self, VmMetrics};
use crate::supervisor::{
    remove_stale_socket, stop_all, MetricsFile, Service, StopSignals, Supervisor, ThreadService,
    STOP_GRACE,
};
use crate::vhost_user::daemon;
#[cfg(feature = "jail")]
use crate::vsock_cli::sibling_pairs;
use crate::vsock_cli::{SiblingGroups, VmConfig};

/// A listening socket for one VM, and the path this daemon bound (removed at exit).
#[derive(Debug)]
pub struct Listening {
    /// The vhost-user listening socket.
    pub listener: UnixListener,
    /// The socket path bound here (`None` for an inherited socket).
    pub created: Option<PathBuf>,
}

/// The VM's vhost-user listening socket: the inherited `fd` if given (see
/// [`inherited_listener`] for what the caller promises), else `vm.socket`, bound after
/// removing a stale socket there (vhost-user sockets are not shared, so replacing one
/// is what users expect; vhost-device-vsock does the same).
pub fn listen(vm: &VmConfig, fd: Option<RawFd>) -> Result<Listening, String> {
    if let Some(fd) = fd {
        return inherited_listener(fd).map(|listener| Listening {
            listener,
            created: None,
        });
    }
    let path = &vm.socket;
    remove_stale_socket(path)?;
    let listener = UnixListener::bind(path)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    Ok(Listening {
        listener,
        created: Some(path.clone()),
    })
}

pub use crate::supervisor::inherited_listener;

/// The muxer's own listening sockets: `<uds_path>` and `<uds_path>_seqpacket` (none
/// with the AF_VSOCK backend).
pub fn muxer_sockets(vm: &VmConfig) -> Vec<PathBuf> {
    let Some(uds_path) = vm.uds_path() else {
        return Vec::new();
    };
    let mut seq = uds_path.as_os_str().to_owned();
    seq.push("_seqpacket");
    vec![uds_path.to_path_buf(), PathBuf::from(seq)]
}

fn vm_metrics(vm: &VmConfig, m: &VsockMetrics) -> VmMetrics {
    VmMetrics {
        guest_cid: vm.guest_cid,
        socket: vm.socket.clone(),
        counters: metrics::counters_of(&m.snapshot()),
    }
}

/// VM `vm`'s device and its worker loop on a thread (started by the supervisor),
/// linked with the devices of its groups already in `siblings`.
pub fn thread_service(
    vm: &VmConfig,
    fd: Option<RawFd>,
    siblings: &mut SiblingGroups,
) -> Result<ThreadService, String> {
    let mut created = muxer_sockets(vm);
    for p in &created {
        remove_stale_socket(p)?;
    }
    let device = Vsock::new(vm.device_config()).map_err(|e| e.to_string())?;
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
    let counters: Arc<VsockMetrics> = device.metrics();
    let Listening {
        listener,
        created: bound,
    } = listen(vm, fd)?;
    created.extend(bound);
    let name = format!("vsock cid {}", vm.guest_cid);
    let worker_name = name.clone();
    let queue_size = vm.queue_size;
    log::info!(
        "guest CID {}: vhost-user socket {}, {}",
        vm.guest_cid,
        vm.socket.display(),
        vm.host_side()
    );
    let label = vm.clone();
    Ok(ThreadService::new(
        name,
        format!("vsock-{}", vm.guest_cid),
        created,
        move |stop| {
            daemon::serve(device, listener, queue_size, &stop, &worker_name)
                .map(drop)
                .map_err(|e| e.to_string())
        },
    )
    .map_err(|e| format!("eventfd: {e}"))?
    .with_metrics(move || vm_metrics(&label, &counters)))
}

/// Serves `vms` until SIGTERM/SIGINT: each VM's worker on a thread, or with `jail` in
/// a jailed child; writes `metrics` if given. True when everything started and stopped
/// cleanly. `fds[i]`: an inherited listening socket for VM `i` (`--fd`, systemd socket
/// activation), owned by the callee from here on (see [`inherited_listener`]).
pub fn run(
    vms: &[VmConfig],
    fds: &[Option<RawFd>],
    #[cfg(feature = "jail")] jail: Option<JailOptions>,
    metrics: Option<MetricsFile>,
    signals: &StopSignals,
) -> bool {
    #[cfg(feature = "jail")]
    if let Some(j) = jail {
        return match jailed_services(vms, fds, &j, metrics.is_some()) {
            Ok(mut services) => Supervisor::new(metrics).run(&mut services, signals),
            Err((i, e, services)) => give_up(vms, i, &e, services),
        };
    }
    let mut services: Vec<Box<dyn Service>> = Vec::new();
    let mut siblings = SiblingGroups::default();
    for (i, vm) in vms.iter().enumerate() {
        let fd = fds.get(i).copied().flatten();
        match thread_service(vm, fd, &mut siblings) {
            Ok(s) => services.push(Box::new(s)),
            Err(e) => return give_up(vms, i, &e, services),
        }
    }
    Supervisor::new(metrics).run(&mut services, signals)
}

/// Reports why VM `i` could not be set up and undoes what the others set up.
fn give_up(vms: &[VmConfig], i: usize, e: &str, mut services: Vec<Box<dyn Service>>) -> bool {
    match vms.get(i) {
        Some(vm) => log::error!("VM with guest CID {}: {e}", vm.guest_cid),
        None => log::error!("{e}"),
    }
    stop_all(&mut services, std::time::Instant::now() + STOP_GRACE);
    false
}

#[cfg(feature = "jail")]
pub use jailed::{jailed_services, JailOptions};

#[cfg(feature = "jail")]
mod jailed {
    use std::os::fd::{OwnedFd, RawFd};
    use std::os::unix::net::UnixListener;
    use std::path::Path;

    use outboard_devices::vsock::{sibling_socket_pair, Vsock, VsockBackend, VsockMetricsSnapshot};
    use vmm_sys_util::eventfd::EventFd;

    use super::{listen, muxer_sockets, sibling_pairs, Listening};
    use crate::jail::{worker_jail, SeccompMode, WorkerLimits};
    use crate::shared_metrics::{CounterPage, PublishingDevice, RestartCounters};
    use crate::supervisor::{JailedService, ServeFn, Service};
    use crate::vhost_user::daemon;
    use crate::vsock_cli::VmConfig;

    /// How jailed workers are confined.
    #[derive(Debug, Clone, Copy)]
    pub struct JailOptions {
        /// What seccomp does with a call outside the allow-list.
        pub mode: SeccompMode,
        /// The workers' resource ceilings.
        pub limits: WorkerLimits,
    }

    /// One jailed service per VM, the workers of VMs that share a group linked with
    /// a socket pair per pair (made here and kept for the daemon's life, so a replaced
    /// worker finds its links where the old one left them), each with a counter page
    /// when `with_metrics`. On failure: the index of the VM that failed, why, and the
    /// services made before it (not started; finish them to remove their sockets).
    #[allow(clippy::type_complexity)]
    pub fn jailed_services(
        vms: &[VmConfig],
        fds: &[Option<RawFd>],
        opts: &JailOptions,
        with_metrics: bool,
    ) -> Result<Vec<Box<dyn Service>>, (usize, String, Vec<Box<dyn Service>>)> {
        let mut links: Vec<Vec<(u64, OwnedFd)>> = vms.iter().map(|_| Vec::new()).collect();
        for (i, j) in sibling_pairs(vms) {
            let (a, b) = sibling_socket_pair().map_err(|e| {
                (
                    i,
                    format!(
                        "the link between guest CIDs {} and {}: {e}",
                        vms[i].guest_cid, vms[j].guest_cid
                    ),
                    Vec::new(),
                )
            })?;
            links[i].push((vms[j].guest_cid, a));
            links[j].push((vms[i].guest_cid, b));
        }
        let mut services: Vec<Box<dyn Service>> = Vec::new();
        for (i, (vm, links)) in vms.iter().zip(links).enumerate() {
            let fd = fds.get(i).copied().flatten();
            match service(vm, fd, opts, with_metrics, links) {
                Ok(s) => services.push(Box::new(s)),
                Err(e) => return Err((i, e, services)),
            }
        }
        Ok(services)
    }

    fn service(
        vm: &VmConfig,
        fd: Option<RawFd>,
        opts: &JailOptions,
        with_metrics: bool,
        links: Vec<(u64, OwnedFd)>,
    ) -> Result<JailedService, String> {
        let mut vm = vm.clone();
        // The worker sees the uds-path directory at its own absolute path; with the
        // AF_VSOCK backend it needs no directory at all.
        let dirs = match vm.uds_path() {
            Some(uds_path) => {
                let (dir, file) = match (uds_path.parent(), uds_path.file_name()) {
                    (Some(d), Some(f)) => (
                        if d.as_os_str().is_empty() {
                            Path::new(".")
                        } else {
                            d
                        },
                        f.to_owned(),
                    ),
                    _ => return Err(format!("uds-path {}: no file name", uds_path.display())),
                };
                let dir = dir
                    .canonicalize()
                    .map_err(|e| format!("uds-path directory {}: {e}", dir.display()))?;
                // A worker that cannot create its sockets would die at every start: a
                // configuration error, said once, before any worker is forked.
                crate::jail::check_worker_can_write(&dir).map_err(|e| format!("uds-path: {e}"))?;
                vm.backend = VsockBackend::Unix(dir.join(file));
                vec![dir]
            }
            None => Vec::new(),
        };
        // Likewise a forward port the worker could not bind (taken, or refused).
        if let VsockBackend::Vsock(fwd) = &vm.backend {
            fwd.check_listen_ports().map_err(|e| e.to_string())?;
        }
        let jail = worker_jail(&dirs, opts.mode, opts.limits).map_err(|e| e.to_string())?;
        let stale = muxer_sockets(&vm);
        let Listening { listener, created } = listen(&vm, fd)?;
        let mut all = stale.clone();
        all.extend(created);
        let name = format!("vsock cid {}", vm.guest_cid);
        log::info!(
            "guest CID {}: vhost-user socket {}, {} (jailed)",
            vm.guest_cid,
            vm.socket.display(),
            vm.host_side()
        );
        // The worker inherits the counter page first (with metrics), then its links.
        let counters = if with_metrics {
            let names = VsockMetricsSnapshot::NAMES
                .iter()
                .map(|n| n.to_string())
                .collect();
            Some(
                RestartCounters::new(&format!("outboard {name} counters"), names)
                    .map_err(|e| e.to_string())?,
            )
        } else {
            None
        };
        let slots = counters.as_ref().map(RestartCounters::slots);
        let mut inherit = Vec::new();
        if let Some(c) = &counters {
            inherit.push(
                c.fd()
                    .try_clone_to_owned()
                    .map_err(|e| format!("counter page fd: {e}"))?,
            );
        }
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
        let (guest_cid, socket) = (vm.guest_cid, vm.socket.clone());
        let serve: ServeFn = Box::new(move |listener, inherited, stop| {
            let mut device = Vsock::new(vm.device_config()).map_err(|e| e.to_string())?;
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
            serve_worker(device, page, listener, vm.queue_size, stop, &worker_name)
        });
        let mut s = JailedService::new(name, jail, listener, serve)
            .inherit(inherit)
            .stale_sockets(stale)
            .created(all);
        if let Some(c) = counters {
            s = s.counters(guest_cid, socket, c);
        }
        Ok(s)
    }

    /// Runs the worker loop in the jailed child; with a counter `page`, the device
    /// publishes its counters there after every event.
    fn serve_worker(
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
}
