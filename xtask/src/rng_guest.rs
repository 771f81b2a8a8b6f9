//! `cargo xtask rng-guest`: the device author's example (`outboard-vmm-glue`'s `rng_device`
//! example, virtio-rng on Outboard's crates) against a real front-end and a real guest:
//! QEMU's `vhost-user-rng-pci` and the Debian kernel's `virtio_rng` driver.
//!
//! Two runs: the example on `--socket-path`, then jailed (`--jail`) on an inherited
//! listening socket (`--fd 3`, as a service manager passes it). In each, one daemon
//! serves two guests one after the other (the second meets the daemon after the
//! first front-end went away: the worker reset the device and listened again); each
//! guest, a busybox initramfs that loads `virtio_pci` and `virtio_rng`, checks that
//! `virtio_rng` is the current hwrng and reads `/dev/hwrng` (two 4 KiB blocks, neither
//! zeros nor equal) and powers off. Then SIGTERM must stop the daemon with status 0.
//!
//! (QEMU 10.0 aborts when a `vhost-user-rng` back-end goes away under a running guest
//! and comes back: "vhost_dev_start: Assertion `hdev->vhost_ops' failed" after "ring
//! restore failed", so the reconnection is exercised across guests, not under one.)
//!
//! QEMU's output must be free of warnings: a back-end that offers what the front-end
//! does not support (`VHOST_USER_PROTOCOL_F_CONFIG` for a device without a config
//! space) makes QEMU warn at every start.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::qmp::Qmp;
use crate::setup;
use crate::util::{self, Proc, Result};

/// The guest's /init: phase 1, a pause while the host replaces the daemon, phase 2.
fn init() -> String {
    setup::init_script("rng-guest", false, INIT_BODY)
}

/// What [`init`] runs after the prelude.
const INIT_BODY: &str = r#"check() {
    cur=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)
    case "$cur" in
        virtio_rng*) ;;
        *) echo "rng-guest: FAIL $1: the current hwrng is '$cur', not virtio_rng"; return ;;
    esac
    head -c 4096 /dev/hwrng > /tmp/a
    head -c 4096 /dev/hwrng > /tmp/b
    head -c 4096 /dev/zero > /tmp/z
    n=$(cat /tmp/a /tmp/b | wc -c)
    if [ "$n" != 8192 ]; then echo "rng-guest: FAIL $1: read $n of 8192 bytes"; return; fi
    if cmp -s /tmp/a /tmp/b || cmp -s /tmp/a /tmp/z; then
        echo "rng-guest: FAIL $1: the blocks are zeros or equal"; return
    fi
    echo "rng-guest: $1 ok: $cur, 8192 bytes, $(md5sum < /tmp/a | cut -c1-12)"
}
check read
echo "rng-guest: done"
poweroff -f
"#;

/// Kernel modules the guest loads (with their dependencies).
const MODULES: &[&str] = &["virtio_pci", "virtio_rng"];

/// The bound on one guest boot (about 5 s under TCG).
const RUN_TIMEOUT: Duration = Duration::from_secs(90);

/// Builds the example, the guest, and runs both modes; `Ok(false)` if a check failed.
pub fn run() -> Result<bool> {
    setup::ensure_packages()?;
    let cache = setup::cache_dir();
    std::fs::create_dir_all(&cache).map_err(|e| format!("create {}: {e}", cache.display()))?;
    let (kernel, root) = setup::ensure_kernel_package(&cache)?;
    let modules = setup::kernel_modules(&root, MODULES)?;
    let initramfs =
        setup::build_initramfs(&cache, "rng-initramfs.cpio.gz", &init(), &[], &modules)?;
    // OUTBOARD_RNG_DAEMON: another back-end with the same flags (the rust-vmm
    // comparison device of `cargo xtask device-cost`), run without --jail.
    let (example, modes): (PathBuf, &[bool]) = match std::env::var_os("OUTBOARD_RNG_DAEMON") {
        Some(path) => (PathBuf::from(path), &[false]),
        None => (build_example()?, &[false, true]),
    };
    let mut ok = true;
    for &jail in modes {
        let dir = util::workspace_root().join("target").join(if jail {
            "rng-guest-jail"
        } else {
            "rng-guest"
        });
        println!(
            "\n==> rng-guest{}: rng_device example, QEMU vhost-user-rng-pci, Linux virtio_rng",
            if jail { " --jail" } else { "" }
        );
        let start = Instant::now();
        match one_run(&example, &kernel, &initramfs, &dir, jail) {
            Ok(()) => println!("rng-guest: ok in {:.1}s", start.elapsed().as_secs_f64()),
            Err(e) => {
                eprintln!("rng-guest: FAILED: {e}\n  logs in {}", dir.display());
                ok = false;
            }
        }
    }
    Ok(ok)
}

fn build_example() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    util::run(
        Command::new(cargo)
            .current_dir(util::workspace_root())
            .args([
                "build",
                "-p",
                "outboard-vmm-glue",
                "--example",
                "rng_device",
                "--features",
                "jail",
            ]),
        Duration::from_secs(1800),
    )?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| util::workspace_root().join("target"));
    let bin = target.join("debug").join("examples").join("rng_device");
    if bin.exists() {
        Ok(bin)
    } else {
        Err(format!("cargo build left no {}", bin.display()))
    }
}

/// Starts the example: on `--socket-path socket`, or on `listener` passed as fd 3.
fn start_daemon(
    example: &Path,
    socket: &Path,
    listener: Option<&UnixListener>,
    jail: bool,
    log: &Path,
) -> Result<Proc> {
    let mut cmd = Command::new(example);
    match listener {
        None => {
            cmd.arg("--socket-path").arg(socket);
        }
        Some(l) => {
            let fd = l.as_raw_fd();
            cmd.args(["--fd", "3"]);
            // SAFETY: runs between fork and exec and only calls dup2/fcntl, which are
            // async-signal-safe; `fd` is open in the parent (and so in the child).
            unsafe {
                cmd.pre_exec(move || {
                    let rc = if fd == 3 {
                        libc::fcntl(3, libc::F_SETFD, 0)
                    } else {
                        libc::dup2(fd, 3)
                    };
                    if rc < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
    }
    if jail {
        cmd.arg("--jail");
    }
    let proc = Proc::spawn("rng_device", cmd, log)?;
    if listener.is_none() && !util::wait_for_path(socket, Duration::from_secs(10)) {
        return Err(format!("the example did not create {}", socket.display()));
    }
    Ok(proc)
}

/// Waits until the console shows `marker` (a FAIL line ends the wait with an error).
fn wait_console(console: &Path, marker: &str, qemu: &mut Proc, deadline: Instant) -> Result<()> {
    loop {
        let text = util::read_log(console);
        if let Some(line) = text.lines().find(|l| l.contains("rng-guest: FAIL")) {
            return Err(format!("the guest says: {line}"));
        }
        if text.contains(marker) {
            return Ok(());
        }
        if !qemu.running() {
            return Err(format!("QEMU exited before the guest printed {marker:?}"));
        }
        if Instant::now() >= deadline {
            return Err(format!("the guest did not print {marker:?} in time"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn one_run(example: &Path, kernel: &Path, initramfs: &Path, dir: &Path, jail: bool) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let socket = dir.join("rng.sock");
    let daemon_log = dir.join("daemon.log");
    // Plain: the example binds --socket-path. Jailed: it serves the socket this process
    // bound and hands over as fd 3 (--fd).
    let listener = if jail {
        Some(UnixListener::bind(&socket).map_err(|e| format!("bind {}: {e}", socket.display()))?)
    } else {
        None
    };
    let mut daemon = start_daemon(example, &socket, listener.as_ref(), jail, &daemon_log)?;
    drop(listener);
    for guest in 1..=2 {
        boot_guest(kernel, initramfs, dir, &socket, guest)
            .map_err(|e| format!("guest {guest}: {e}"))?;
    }
    // SIGTERM: the daemon stops its worker and exits 0.
    let status = daemon.terminate(Duration::from_secs(5))?;
    if !status.success() {
        return Err(format!(
            "the example exited with {status} on SIGTERM (see {})",
            daemon_log.display()
        ));
    }
    println!("  SIGTERM: the example stopped with {status}");
    Ok(())
}

/// Boots guest number `n` against the daemon on `socket` until it powers off.
fn boot_guest(kernel: &Path, initramfs: &Path, dir: &Path, socket: &Path, n: u32) -> Result<()> {
    let console = dir.join(format!("console-{n}.log"));
    let qemu_log = dir.join(format!("qemu-{n}.log"));
    let qmp_path = dir.join(format!("qmp-{n}.sock"));
    let mut cmd = setup::qemu_guest(
        "tcg",
        2,
        "256M",
        &console,
        kernel,
        initramfs,
        "console=ttyS0 panic=-1 quiet loglevel=4",
    );
    cmd.args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
        .args(["-machine", "q35,memory-backend=mem"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=rng,path={},reconnect-ms=1000",
            socket.display()
        ))
        .args(["-device", "pcie-root-port,id=rp0,chassis=1,slot=1"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
        // Paused until the device is plugged: with reconnect-ms the chardev connects in
        // the background, after a device on the command line would be realized.
        .arg("-S");
    let mut qemu = Proc::spawn("qemu", cmd, &qemu_log)?;
    let deadline = Instant::now() + RUN_TIMEOUT;
    let mut qmp = Qmp::connect(&qmp_path, Duration::from_secs(30))?;
    qmp.wait_chardev_connected("rng", Duration::from_secs(30))?;
    qmp.execute(
        r#"{"execute":"device_add","arguments":{"driver":"vhost-user-rng-pci","chardev":"rng","bus":"rp0","id":"rng0"}}"#,
    )?;
    qmp.execute(r#"{"execute":"cont"}"#)?;
    wait_console(&console, "rng-guest: done", &mut qemu, deadline)?;
    let _ = util::wait_timeout(&mut qemu.child, Duration::from_secs(10));
    for line in util::read_log(&console)
        .lines()
        .filter(|l| l.contains("rng-guest:"))
    {
        println!("  guest {n}: {}", line.trim());
    }
    let qemu_out = util::read_log(&qemu_log);
    if let Some(line) = qemu_out
        .lines()
        .find(|l| l.to_ascii_lowercase().contains("warning"))
    {
        return Err(format!("QEMU warned: {line}"));
    }
    if !qemu_out.trim().is_empty() {
        return Err(format!("QEMU printed:\n{qemu_out}"));
    }
    println!("  guest {n}: QEMU printed nothing (no warning)");
    Ok(())
}
