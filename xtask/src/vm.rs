//! A test guest: a vhost-user vsock back-end daemon plus QEMU driving it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::host::Control;
use crate::qmp::Qmp;
use crate::setup::{self, Assets};
use crate::util::{self, Proc, Result};

/// The guest's context id.
pub const GUEST_CID: u32 = 3;

/// True when `OUTBOARD_E2E_JAIL` is set (to anything but `0`): `outboard vsock` runs
/// with `--jail` (its worker in a jailed child), and the scratch directory and host
/// sockets are opened to the worker's unprivileged uid.
pub fn jailed() -> bool {
    std::env::var_os("OUTBOARD_E2E_JAIL").is_some_and(|v| v != "0")
}

/// Which vhost-user vsock back-end serves the guest.
#[derive(Clone, Debug)]
pub enum Backend {
    /// Outboard's `outboard vsock`.
    Outboard(PathBuf),
    /// rust-vmm's vhost-device-vsock, for comparison.
    VhostDeviceVsock(PathBuf),
}

impl Backend {
    /// A short name for reports.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Outboard(_) => "outboard",
            Backend::VhostDeviceVsock(_) => "vhost-device-vsock",
        }
    }

    /// The back-end's command line for `socket` and `uds`.
    pub fn command(&self, socket: &Path, uds: &Path) -> Command {
        let metrics = socket.with_file_name("metrics.json");
        let (bin, pre): (&PathBuf, &[&str]) = match self {
            Backend::Outboard(b) => (b, &["vsock"]),
            Backend::VhostDeviceVsock(b) => (b, &[]),
        };
        let mut cmd = Command::new(bin);
        cmd.args(pre)
            .arg("--guest-cid")
            .arg(GUEST_CID.to_string())
            .arg("--socket")
            .arg(socket)
            .arg("--uds-path")
            .arg(uds);
        if let Backend::Outboard(_) = self {
            if jailed() {
                cmd.arg("--jail");
            }
            cmd.arg("--upgrade-socket").arg(upgrade_socket(socket));
            // With --jail the worker publishes its counters to the daemon.
            cmd.arg("--metrics")
                .arg(metrics)
                .args(["--metrics-interval", "1"]);
        }
        // Extra flags for experiments, e.g. OUTBOARD_E2E_BACKEND_ARGS="--tx-buffer-size 65536".
        if let Ok(extra) = std::env::var("OUTBOARD_E2E_BACKEND_ARGS") {
            cmd.args(extra.split_whitespace());
        }
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        cmd
    }
}

/// Where `outboard vsock` listens for a live upgrade.
pub fn upgrade_socket(socket: &Path) -> PathBuf {
    socket.with_file_name("upgrade.sock")
}

/// A running guest and its back-end. Both are killed when this is dropped.
pub struct Vm {
    /// The back-end daemon (None while it is stopped).
    pub backend: Option<Proc>,
    /// QEMU.
    pub qemu: Proc,
    /// Which back-end.
    pub kind: Backend,
    /// The run's scratch directory (sockets and logs).
    pub dir: PathBuf,
    /// The vhost-user socket.
    pub socket: PathBuf,
    /// The host-side AF_UNIX socket of the vsock muxer.
    pub uds: PathBuf,
    /// The guest's serial console log.
    pub console: PathBuf,
    /// The back-end's log.
    pub backend_log: PathBuf,
    /// When QEMU was started.
    pub started: Instant,
    /// QEMU's monitor.
    pub qmp: Qmp,
}

/// The QMP id of the vsock device.
const DEVICE_ID: &str = "vsock0";

impl Vm {
    /// Starts the back-end and boots the guest; returns once both processes run.
    pub fn boot(assets: &Assets, kind: Backend, dir: &Path) -> Result<Vm> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        if jailed() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777))
                .map_err(|e| format!("chmod {}: {e}", dir.display()))?;
        }
        let socket = dir.join("vhost-user.sock");
        let uds = dir.join("vsock.sock");
        let console = dir.join("console.log");
        let backend_log = dir.join("backend.log");
        let qmp_path = dir.join("qmp.sock");
        let backend = start_backend(&kind, &socket, &uds, &backend_log)?;
        let mut qemu_cmd = setup::qemu_guest(
            &assets.accel,
            2,
            "512M",
            &console,
            &assets.kernel,
            &assets.initramfs,
            "console=ttyS0 panic=-1 quiet loglevel=4",
        );
        qemu_cmd
            .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
            .args(["-machine", "q35,memory-backend=mem"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=vhu,path={},reconnect-ms=1000",
                socket.display()
            ))
            .args(["-device", "pcie-root-port,id=rp0,chassis=1,slot=1"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            // Paused until the vsock device is plugged (see crate::qmp).
            .arg("-S");
        let qemu = Proc::spawn("qemu", qemu_cmd, &dir.join("qemu.log"))?;
        let mut qmp = Qmp::connect(&qmp_path, Duration::from_secs(30))?;
        plug(&mut qmp)?;
        qmp.execute(r#"{"execute":"cont"}"#)?;
        Ok(Vm {
            backend: Some(backend),
            qemu,
            kind,
            dir: dir.to_path_buf(),
            socket,
            uds,
            console,
            backend_log,
            started: Instant::now(),
            qmp,
        })
    }

    /// Hot-unplugs the vsock device and waits until the guest has let it go.
    pub fn unplug(&mut self) -> Result<()> {
        self.qmp.execute(&format!(
            r#"{{"execute":"device_del","arguments":{{"id":"{DEVICE_ID}"}}}}"#
        ))?;
        self.qmp
            .wait_event("DEVICE_DELETED", Duration::from_secs(90))?;
        Ok(())
    }

    /// Waits for the chardev to reconnect to the back-end and plugs the device again.
    pub fn replug(&mut self) -> Result<()> {
        plug(&mut self.qmp)
    }

    /// Connects a control channel to the guest agent, retrying until `timeout`.
    pub fn control(&mut self, timeout: Duration) -> Result<Control> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            if !self.qemu.running() {
                return Err("QEMU exited".into());
            }
            if let Some(b) = self.backend.as_mut() {
                if !b.running() {
                    return Err("the back-end daemon exited".into());
                }
            }
            match Control::connect(&self.uds, Duration::from_secs(5)) {
                Ok(c) => return Ok(c),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Err(format!(
            "no control connection to the guest agent within {timeout:?}: {last}"
        ))
    }

    /// Stops the back-end with SIGTERM; it must exit with status 0.
    pub fn stop_backend(&mut self, timeout: Duration) -> Result<()> {
        let mut b = self.backend.take().ok_or("the back-end is not running")?;
        let status = b.terminate(timeout)?;
        if !status.success() {
            return Err(format!("the back-end exited with {status} after SIGTERM"));
        }
        Ok(())
    }

    /// Starts the back-end again on the same sockets.
    pub fn restart_backend(&mut self) -> Result<()> {
        let b = start_backend(&self.kind, &self.socket, &self.uds, &self.backend_log)?;
        self.backend = Some(b);
        Ok(())
    }

    /// Upgrades the back-end in place: starts `outboard vsock --take-over` (the same
    /// flags, the same log) and waits until the old process exited with status 0 and
    /// the new one runs. Returns how long that took. `n` numbers the upgrade for
    /// messages.
    pub fn upgrade_backend(&mut self, n: usize) -> Result<Duration> {
        let start = Instant::now();
        let mut cmd = self.kind.command(&self.socket, &self.uds);
        cmd.arg("--take-over");
        let mut new = Proc::spawn(
            &format!("{} (upgrade {n})", self.kind.name()),
            cmd,
            &self.backend_log,
        )?;
        let old = self.backend.as_mut().ok_or("the back-end is not running")?;
        let deadline = start + Duration::from_secs(20);
        loop {
            match old.child.try_wait() {
                Ok(Some(status)) if status.success() => break,
                Ok(Some(status)) => {
                    return Err(format!(
                        "upgrade {n}: the old back-end exited with {status}"
                    ))
                }
                Ok(None) => {}
                Err(e) => return Err(format!("upgrade {n}: waiting for the old back-end: {e}")),
            }
            if !new.running() {
                return Err(format!(
                    "upgrade {n}: the new back-end exited while the old one runs:\n{}",
                    util::read_log(&self.backend_log)
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "upgrade {n}: the old back-end did not exit within 20 s"
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let took = start.elapsed();
        if !new.running() {
            return Err(format!("upgrade {n}: the new back-end is not running"));
        }
        self.backend = Some(new);
        Ok(took)
    }

    /// QEMU's log lines that mention vhost (a back-end that went away, a failed
    /// request).
    pub fn qemu_vhost_lines(&self) -> Vec<String> {
        util::read_log(&self.dir.join("qemu.log"))
            .lines()
            .filter(|l| l.to_ascii_lowercase().contains("vhost"))
            .map(str::to_string)
            .collect()
    }

    /// Prints the console and back-end logs, for a failure report.
    pub fn dump_logs(&self) {
        eprintln!("\n===== guest console ({}) =====", self.console.display());
        eprintln!("{}", util::read_log(&self.console));
        eprintln!("===== back-end log ({}) =====", self.backend_log.display());
        eprintln!("{}", util::read_log(&self.backend_log));
        let qemu_log = self.dir.join("qemu.log");
        eprintln!("===== QEMU log ({}) =====", qemu_log.display());
        eprintln!("{}", util::read_log(&qemu_log));
    }
}

/// Waits for QEMU's chardev `vhu` to reach the back-end, then plugs the vsock device
/// (id `vsock0`) into the PCIe root port `rp0`.
pub fn plug(qmp: &mut Qmp) -> Result<()> {
    qmp.wait_chardev_connected("vhu", Duration::from_secs(30))?;
    qmp.execute(&format!(
        r#"{{"execute":"device_add","arguments":{{"driver":"vhost-user-vsock-pci","chardev":"vhu","bus":"rp0","id":"{DEVICE_ID}"}}}}"#
    ))?;
    Ok(())
}

fn start_backend(kind: &Backend, socket: &Path, uds: &Path, log: &Path) -> Result<Proc> {
    let _ = std::fs::remove_file(socket);
    let _ = std::fs::remove_file(uds);
    let mut proc = Proc::spawn(kind.name(), kind.command(socket, uds), log)?;
    if !util::wait_for_path(socket, Duration::from_secs(10)) {
        let running = proc.running();
        return Err(format!(
            "{} did not create {} within 10 s (running: {running})\n{}",
            kind.name(),
            socket.display(),
            util::read_log(log)
        ));
    }
    Ok(proc)
}
