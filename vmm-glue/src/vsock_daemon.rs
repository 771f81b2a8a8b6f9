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

use outboard_devices::vsock::{Vsock, VsockHandover, VsockMetrics};

use crate::metrics::{self, DeviceId, VmMetrics};
use crate::supervisor::{
    remove_stale_socket, stop_all, MetricsFile, Service, StopSignals, Supervisor, ThreadService,
    STOP_GRACE,
};
use crate::upgrade::{
    bind_upgrade_socket, request_take_over, serve_upgrades, TakenVm, UpgradableVm,
};
use crate::vhost_user::daemon::{upgrade_channel, Parcel, UpgradeHandle, Worker};
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
        device: DeviceId::vsock(vm.guest_cid, vm.socket.clone()),
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
    upgradable_thread_service(vm, fd, siblings, false).map(|(s, _)| s)
}

/// [`thread_service`], and with `upgradable` the handle through which a live upgrade
/// takes the worker's device over (see [`crate::upgrade`]).
pub fn upgradable_thread_service(
    vm: &VmConfig,
    fd: Option<RawFd>,
    siblings: &mut SiblingGroups,
    upgradable: bool,
) -> Result<(ThreadService, Option<UpgradeHandle>), String> {
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
    let Listening {
        listener,
        created: bound,
    } = listen(vm, fd)?;
    created.extend(bound);
    log::info!(
        "guest CID {}: vhost-user socket {}, {}",
        vm.guest_cid,
        vm.socket.display(),
        vm.host_side()
    );
    let name = format!("vsock cid {}", vm.guest_cid);
    let worker =
        Worker::new(device, listener, vm.queue_size, &name, |b| b).map_err(|e| e.to_string())?;
    worker_service(vm, worker, created, upgradable)
}

/// A device made from a worker parcel's device part ([`Vsock::take_over`]).
fn take_device(
    config: outboard_devices::vsock::VsockDeviceConfig,
    p: Parcel,
) -> Result<Vsock, String> {
    Vsock::take_over(
        config,
        VsockHandover {
            record: p.record,
            fds: p.fds,
        },
    )
    .map_err(|e| e.to_string())
}

/// A worker's device saved for a live upgrade: the vsock device's handover record.
fn save_vsock(device: &Vsock) -> Result<Parcel, String> {
    device
        .handover()
        .map(|h| Parcel {
            record: h.record,
            fds: h.fds,
        })
        .map_err(|e| e.to_string())
}

/// The supervisor's service around `worker`; with `upgradable`, the handle of its
/// upgrade hooks.
fn worker_service(
    vm: &VmConfig,
    worker: Worker<Vsock>,
    created: Vec<PathBuf>,
    upgradable: bool,
) -> Result<(ThreadService, Option<UpgradeHandle>), String> {
    let counters: Arc<VsockMetrics> = worker
        .device()
        .map(Vsock::metrics)
        .ok_or("the worker holds no device")?;
    let (handle, hooks) = if upgradable {
        let (h, k) = upgrade_channel(save_vsock).map_err(|e| format!("eventfd: {e}"))?;
        (Some(h), Some(k))
    } else {
        (None, None)
    };
    let name = format!("vsock cid {}", vm.guest_cid);
    let label = vm.clone();
    let service = ThreadService::new(
        name,
        format!("vsock-{}", vm.guest_cid),
        created,
        move |stop| {
            worker
                .run(&stop, hooks)
                .map(drop)
                .map_err(|e| e.to_string())
        },
    )
    .map_err(|e| format!("eventfd: {e}"))?
    .with_metrics(move || vm_metrics(&label, &counters));
    Ok((service, handle))
}

/// VM `vm`'s worker made from what the old process handed over (`taken`), as a
/// service of this process; nothing runs until the supervisor starts it, which must
/// wait for the old process to have let go ([`crate::upgrade::TakeOver::accept`]).
pub fn taken_thread_service(
    vm: &VmConfig,
    taken: TakenVm,
) -> Result<(ThreadService, UpgradeHandle), String> {
    check_same_socket(vm, &taken)?;
    let name = format!("vsock cid {}", vm.guest_cid);
    let config = vm.device_config();
    let worker = Worker::take_over(
        taken.parcel,
        |p| take_device(config, p),
        vm.queue_size,
        &name,
        |b| b,
    )
    .map_err(|e| format!("guest CID {}: {e}", vm.guest_cid))?;
    log::info!(
        "guest CID {}: taken over with {} connection(s)",
        vm.guest_cid,
        worker.device().map_or(0, Vsock::connection_count)
    );
    let mut created = muxer_sockets(vm);
    created.push(vm.socket.clone());
    let (service, handle) = worker_service(vm, worker, created, true)?;
    let handle = handle.ok_or("no upgrade handle")?;
    Ok((service, handle))
}

/// How `outboard vsock` takes part in live upgrades.
#[derive(Debug, Clone)]
pub struct UpgradeOptions {
    /// Where this process listens for the next one (`--upgrade-socket`).
    pub socket: PathBuf,
    /// Take every VM over from the process listening there (`--take-over`) instead of
    /// starting afresh.
    pub take_over: bool,
}

/// Serves `vms` until SIGTERM/SIGINT: each VM's worker on a thread, or with `jail` in
/// a jailed child; writes `metrics` if given. True when everything started and stopped
/// cleanly. `fds[i]`: an inherited listening socket for VM `i` (`--fd`, systemd socket
/// activation), owned by the callee from here on (see [`inherited_listener`]). With
/// `upgrade`, a new process can take the VMs over ([`crate::upgrade`]), and with
/// `upgrade.take_over` this one takes them over from the process serving them.
pub fn run(
    vms: &[VmConfig],
    fds: &[Option<RawFd>],
    #[cfg(feature = "jail")] jail: Option<JailOptions>,
    metrics: Option<MetricsFile>,
    signals: &StopSignals,
    upgrade: Option<&UpgradeOptions>,
) -> bool {
    let with_metrics = metrics.is_some();
    let built = match upgrade {
        Some(u) if u.take_over => {
            let made = take_over_all(vms, &u.socket, |vm, taken| {
                #[cfg(feature = "jail")]
                if let Some(j) = &jail {
                    return taken_jailed_service(vm, taken, j, with_metrics)
                        .map(|(s, h)| (Box::new(s) as Box<dyn Service>, h));
                }
                taken_thread_service(vm, taken).map(|(s, h)| (Box::new(s) as Box<dyn Service>, h))
            });
            match made {
                Ok(m) => m,
                Err(e) => {
                    log::error!("live upgrade: {e}");
                    return false;
                }
            }
        }
        _ => match fresh_services(
            vms,
            fds,
            #[cfg(feature = "jail")]
            jail.as_ref(),
            with_metrics,
            upgrade.is_some(),
        ) {
            Ok(b) => b,
            Err((i, e, services)) => return give_up(vms, i, &e, services),
        },
    };
    let (mut services, handles) = built;
    let mut bound_upgrade = None;
    if let Some(u) = upgrade {
        let listener = match bind_upgrade_socket(&u.socket) {
            Ok(l) => Some(l),
            // A process that took VMs over owns them now: it serves them without the
            // next upgrade rather than not at all.
            Err(e) if u.take_over => {
                log::error!("--upgrade-socket: {e}; serving without live upgrade");
                None
            }
            Err(e) => {
                log::error!("--upgrade-socket: {e}");
                stop_all(&mut services, std::time::Instant::now() + STOP_GRACE);
                return false;
            }
        };
        if let Some(listener) = listener {
            bound_upgrade = Some(u.socket.clone());
            let path = u.socket.clone();
            let spawned = std::thread::Builder::new()
                .name("upgrade".into())
                .spawn(move || serve_upgrades(listener, path, handles));
            if let Err(e) = spawned {
                log::error!("cannot start the upgrade thread: {e}; serving without live upgrade");
            }
        }
    }
    let ok = Supervisor::new(metrics).run(&mut services, signals);
    // Stopped, not handed over (a handover exits from the upgrade thread).
    if let Some(p) = bound_upgrade {
        let _ = std::fs::remove_file(p);
    }
    ok
}

/// The services of `vms` started afresh (threads, or jailed workers with `jail`), and
/// with `upgradable` their upgrade handles.
#[allow(clippy::type_complexity)]
fn fresh_services(
    vms: &[VmConfig],
    fds: &[Option<RawFd>],
    #[cfg(feature = "jail")] jail: Option<&JailOptions>,
    with_metrics: bool,
    upgradable: bool,
) -> Result<(Vec<Box<dyn Service>>, Vec<UpgradableVm>), (usize, String, Vec<Box<dyn Service>>)> {
    #[cfg(feature = "jail")]
    if let Some(j) = jail {
        return upgradable_jailed_services(vms, fds, j, with_metrics, upgradable);
    }
    let _ = with_metrics;
    let mut siblings = SiblingGroups::default();
    build_each(vms, |i, vm| {
        let fd = fds.get(i).copied().flatten();
        upgradable_thread_service(vm, fd, &mut siblings, upgradable)
    })
}

/// A service per VM made by `make` (given the VM's index), with the upgrade handles
/// it gave. On failure: the index of the VM that failed, why, and the services made
/// before it (not started; finish them to remove their sockets).
#[allow(clippy::type_complexity)]
fn build_each<S: Service + 'static>(
    vms: &[VmConfig],
    mut make: impl FnMut(usize, &VmConfig) -> Result<(S, Option<UpgradeHandle>), String>,
) -> Result<(Vec<Box<dyn Service>>, Vec<UpgradableVm>), (usize, String, Vec<Box<dyn Service>>)> {
    let mut services: Vec<Box<dyn Service>> = Vec::new();
    let mut handles = Vec::new();
    for (i, vm) in vms.iter().enumerate() {
        match make(i, vm) {
            Ok((s, h)) => {
                services.push(Box::new(s));
                handles.extend(h.map(|handle| UpgradableVm {
                    guest_cid: vm.guest_cid,
                    socket: vm.socket.clone(),
                    handle,
                }));
            }
            Err(e) => return Err((i, e, services)),
        }
    }
    Ok((services, handles))
}

/// Refuses a VM handed over on another vhost-user socket than this command line
/// gives it.
fn check_same_socket(vm: &VmConfig, taken: &TakenVm) -> Result<(), String> {
    if taken.socket == vm.socket {
        return Ok(());
    }
    Err(format!(
        "guest CID {}: the running outboard serves it on {}, this command line on {}",
        vm.guest_cid,
        taken.socket.display(),
        vm.socket.display()
    ))
}

/// Takes every VM of `vms` over from the process at `socket`, each made into a
/// service by `build`: the services, with their upgrade handles, ready to start. On
/// error the old process was told why and serves on; nothing of this process's was
/// started and no file was removed.
#[allow(clippy::type_complexity)]
fn take_over_all(
    vms: &[VmConfig],
    socket: &std::path::Path,
    mut build: impl FnMut(&VmConfig, TakenVm) -> Result<(Box<dyn Service>, UpgradeHandle), String>,
) -> Result<(Vec<Box<dyn Service>>, Vec<UpgradableVm>), String> {
    let mut t = request_take_over(socket)?;
    log::info!(
        "live upgrade: pid {} handed over {} VM(s); setting them up",
        t.pid,
        t.vms.len()
    );
    let mut services = Vec::with_capacity(vms.len());
    let mut handles = Vec::with_capacity(vms.len());
    let mut built = || -> Result<(), String> {
        for vm in vms {
            let i = t
                .vms
                .iter()
                .position(|v| v.guest_cid == vm.guest_cid)
                .ok_or_else(|| {
                    format!(
                        "guest CID {} is configured here but not served by pid {}",
                        vm.guest_cid, t.pid
                    )
                })?;
            let taken = t.vms.swap_remove(i);
            let (service, handle) = build(vm, taken)?;
            services.push(service);
            handles.push(UpgradableVm {
                guest_cid: vm.guest_cid,
                socket: vm.socket.clone(),
                handle,
            });
        }
        if let Some(extra) = t.vms.first() {
            return Err(format!(
                "pid {} serves guest CID {}, which this command line does not configure",
                t.pid, extra.guest_cid
            ));
        }
        Ok(())
    };
    if let Err(e) = built() {
        // Never started: dropping closes our copies and removes no file.
        drop(services);
        t.refuse(&e);
        return Err(e);
    }
    let pid = t.pid;
    t.accept()
        .map_err(|e| format!("pid {pid} did not complete the handover: {e}"))?;
    log::info!("live upgrade: pid {pid} let go; serving");
    Ok((services, handles))
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
pub use jailed::{jailed_services, taken_jailed_service, upgradable_jailed_services, JailOptions};

#[cfg(feature = "jail")]
mod jailed {
    use std::os::fd::{OwnedFd, RawFd};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::Path;

    use outboard_devices::vsock::{sibling_socket_pair, Vsock, VsockBackend, VsockMetricsSnapshot};
    use vmm_sys_util::eventfd::EventFd;

    use super::{
        build_each, check_same_socket, listen, muxer_sockets, save_vsock, sibling_pairs,
        take_device, Listening,
    };
    use crate::jail::{worker_jail, SeccompMode, WorkerLimits};
    use crate::metrics::DeviceId;
    use crate::shared_metrics::{CounterPage, PublishingDevice, RestartCounters};
    use crate::supervisor::{JailedService, ServeFn, Service};
    use crate::upgrade::{TakenVm, UpgradableVm};
    use crate::vhost_user::daemon::{upgrade_link, Parcel, UpgradeHandle, UpgradeHooks, Worker};
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
        upgradable_jailed_services(vms, fds, opts, with_metrics, false).map(|(s, _)| s)
    }

    /// [`jailed_services`], and with `upgradable` each worker linked to the daemon
    /// for a live upgrade: the handles, one per VM (see [`crate::upgrade`]).
    #[allow(clippy::type_complexity)]
    pub fn upgradable_jailed_services(
        vms: &[VmConfig],
        fds: &[Option<RawFd>],
        opts: &JailOptions,
        with_metrics: bool,
        upgradable: bool,
    ) -> Result<(Vec<Box<dyn Service>>, Vec<UpgradableVm>), (usize, String, Vec<Box<dyn Service>>)>
    {
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
        let mut links = links.into_iter();
        build_each(vms, |i, vm| {
            let fd = fds.get(i).copied().flatten();
            let links = links.next().unwrap_or_default();
            service(vm, Source::Fresh(fd), opts, with_metrics, links, upgradable)
        })
    }

    /// VM `vm`'s jailed service made from what the old process handed over: checked
    /// here in full (memory mapped, rings checked against guest memory, every
    /// connection rebuilt, then let go again), and set up again in the first worker
    /// the service starts, which carries on where the old worker stopped. Workers that
    /// replace it later start afresh, as after any worker death.
    pub fn taken_jailed_service(
        vm: &VmConfig,
        taken: TakenVm,
        opts: &JailOptions,
        with_metrics: bool,
    ) -> Result<(JailedService, UpgradeHandle), String> {
        check_same_socket(vm, &taken)?;
        // The whole check, on duplicates, before the old process is told to let go.
        let dup = |fds: &[OwnedFd]| -> Result<Vec<OwnedFd>, String> {
            fds.iter()
                .map(|f| f.try_clone().map_err(|e| format!("dup: {e}")))
                .collect()
        };
        let probe = Parcel {
            record: taken.parcel.record.clone(),
            fds: dup(&taken.parcel.fds)?,
        };
        let config = vm.device_config();
        let checked = Worker::take_over(
            probe,
            |p| take_device(config, p),
            vm.queue_size,
            "check",
            |b| b,
        )
        .map_err(|e| format!("guest CID {}: {e}", vm.guest_cid))?;
        log::info!(
            "guest CID {}: taken over with {} connection(s) (jailed)",
            vm.guest_cid,
            checked.device().map_or(0, Vsock::connection_count)
        );
        drop(checked);
        let (s, h) = service(
            vm,
            Source::Taken(taken.parcel),
            opts,
            with_metrics,
            Vec::new(),
            true,
        )?;
        Ok((s, h.ok_or("no upgrade handle")?))
    }

    /// Where a service's listening socket and first worker come from.
    enum Source {
        /// A new VM: the inherited listening socket, or its path bound here.
        Fresh(Option<RawFd>),
        /// A VM handed over by another process.
        Taken(Parcel),
    }

    fn service(
        vm: &VmConfig,
        source: Source,
        opts: &JailOptions,
        with_metrics: bool,
        links: Vec<(u64, OwnedFd)>,
        upgradable: bool,
    ) -> Result<(JailedService, Option<UpgradeHandle>), String> {
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
        if let (VsockBackend::Vsock(fwd), Source::Fresh(_)) = (&vm.backend, &source) {
            fwd.check_listen_ports().map_err(|e| e.to_string())?;
        }
        let jail = worker_jail(&dirs, opts.mode, opts.limits).map_err(|e| e.to_string())?;
        let stale = muxer_sockets(&vm);
        let (listener, mut all, first) = match source {
            Source::Fresh(fd) => {
                let Listening { listener, created } = listen(&vm, fd)?;
                let mut all = stale.clone();
                all.extend(created);
                (listener, all, None)
            }
            Source::Taken(parcel) => {
                // The worker record's first fd is the vhost-user listening socket.
                let first = parcel
                    .fds
                    .first()
                    .ok_or("the handover has no listening socket")?;
                let listener = UnixListener::from(
                    first
                        .try_clone()
                        .map_err(|e| format!("the listening socket: {e}"))?,
                );
                let mut all = stale.clone();
                all.push(vm.socket.clone());
                (listener, all, Some(parcel))
            }
        };
        all.dedup();
        let name = format!("vsock cid {}", vm.guest_cid);
        log::info!(
            "guest CID {}: vhost-user socket {}, {} (jailed)",
            vm.guest_cid,
            vm.socket.display(),
            vm.host_side()
        );
        // The worker inherits the counter page first (with metrics), then its links,
        // then its end of the upgrade link; the first worker of a taken-over VM also
        // the handover's fds.
        let counters = if with_metrics {
            Some(
                RestartCounters::of::<VsockMetricsSnapshot>(&format!("outboard {name} counters"))
                    .map_err(|e| e.to_string())?,
            )
        } else {
            None
        };
        let slots = counters.as_ref().map(RestartCounters::slots);
        let mut inherit = RestartCounters::inherited(counters.as_ref())?;
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
        let handle = if upgradable {
            let (daemon_end, worker_end) =
                upgrade_link().map_err(|e| format!("the upgrade link: {e}"))?;
            inherit.push(OwnedFd::from(worker_end));
            Some(UpgradeHandle::remote(daemon_end))
        } else {
            None
        };
        let record = first.as_ref().map(|p| p.record.clone());
        let first_fds = first.map(|p| p.fds).unwrap_or_default();
        let worker_name = name.clone();
        let device = DeviceId::vsock(vm.guest_cid, vm.socket.clone());
        let serve: ServeFn = Box::new(move |listener, inherited, stop| {
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
            let mut sibling_fds = Vec::new();
            for &cid in &link_cids {
                let fd = inherited
                    .next()
                    .ok_or_else(|| format!("the link to sibling CID {cid} was not inherited"))?;
                sibling_fds.push((cid, fd));
            }
            let link = if upgradable {
                Some(UnixStream::from(
                    inherited
                        .next()
                        .ok_or("the upgrade link was not inherited")?,
                ))
            } else {
                None
            };
            // Fds beyond those: the handover's, for the first worker of a VM taken over.
            let handed: Vec<OwnedFd> = inherited.collect();
            let source = match (&record, handed.is_empty()) {
                (Some(record), false) => WorkerSource::Taken(
                    Parcel {
                        record: record.clone(),
                        fds: handed,
                    },
                    vm.device_config(),
                ),
                _ => {
                    let mut device = Vsock::new(vm.device_config()).map_err(|e| e.to_string())?;
                    for (cid, fd) in sibling_fds {
                        device
                            .link_sibling_socket(cid, fd)
                            .map_err(|e| e.to_string())?;
                    }
                    WorkerSource::Fresh(Box::new(device), listener)
                }
            };
            serve_worker(source, page, vm.queue_size, stop, &worker_name, link)
        });
        let mut s = JailedService::new(name, jail, listener, serve)
            .inherit(inherit)
            .stale_sockets(stale)
            .created(all)
            .first_start(first_fds);
        if let Some(c) = counters {
            s = s.counters(device, c);
        }
        Ok((s, handle))
    }

    /// A jailed worker's device: new, or from a handover.
    enum WorkerSource {
        Fresh(Box<Vsock>, UnixListener),
        Taken(Parcel, outboard_devices::vsock::VsockDeviceConfig),
    }

    /// Runs the worker loop in the jailed child; with a counter `page`, the device
    /// publishes its counters there after every event; with `link`, the daemon can
    /// have it hand its device over.
    fn serve_worker(
        source: WorkerSource,
        page: Option<CounterPage>,
        queue_size: u16,
        stop: &EventFd,
        name: &str,
        link: Option<UnixStream>,
    ) -> Result<(), String> {
        match page {
            Some(page) => {
                let wrap = move |device: Vsock| {
                    let m = device.metrics();
                    PublishingDevice::new(device, page, move || m.snapshot())
                };
                let worker = match source {
                    WorkerSource::Fresh(device, listener) => {
                        Worker::new(wrap(*device), listener, queue_size, name, |b| b)
                            .map_err(|e| e.to_string())?
                    }
                    WorkerSource::Taken(parcel, config) => Worker::take_over(
                        parcel,
                        |p| take_device(config, p).map(wrap),
                        queue_size,
                        name,
                        |b| b,
                    )?,
                };
                let hooks = link.map(|l| {
                    UpgradeHooks::remote(l, |d: &PublishingDevice<Vsock, _>| save_vsock(d.inner()))
                });
                worker.run(stop, hooks).map(drop).map_err(|e| e.to_string())
            }
            None => {
                let worker = match source {
                    WorkerSource::Fresh(device, listener) => {
                        Worker::new(*device, listener, queue_size, name, |b| b)
                            .map_err(|e| e.to_string())?
                    }
                    WorkerSource::Taken(parcel, config) => Worker::take_over(
                        parcel,
                        |p| take_device(config, p),
                        queue_size,
                        name,
                        |b| b,
                    )?,
                };
                let hooks = link.map(|l| UpgradeHooks::remote(l, save_vsock));
                worker.run(stop, hooks).map(drop).map_err(|e| e.to_string())
            }
        }
    }
}
