//! `cargo xtask media-e2e`: the V4L2 proxy against real V4L2 nodes. No host here has
//! one and modules cannot be loaded on it, so a QEMU guest (the e2e kernel, TCG or KVM)
//! loads vivid with a single-planar and a multi-planar capture instance and runs the
//! statically linked `media-proxy-check` (outboard-tests, feature `v4l2-proxy`), which
//! drives the virtio-media runner and the proxy over both nodes with the simulated guest
//! driver, then runs `outboard media --v4l2-device /dev/video0 --jail` (static, feature
//! `v4l2-proxy`) and drives it through our vhost-user `Frontend`. The guest prints one
//! line per check on its serial console; this side reads them back and turns them into
//! pass/fail with counts.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::setup;
use crate::util::{self, Proc, Result};

/// The guest's /init: vivid with two capture-only instances, single- then
/// multi-planar, then the check, then power off.
const INIT: &str = r#"#!/bin/busybox sh
if [ ! -e /.switched ]; then
    # The jailed worker pivot_roots, which the initramfs (rootfs) cannot be: move
    # everything to a tmpfs and make that the root.
    /bin/busybox mkdir -p /newroot
    /bin/busybox mount -t tmpfs -o size=256m tmpfs /newroot
    /bin/busybox cp -a /bin /modules /init /newroot/
    /bin/busybox mkdir -p /newroot/dev /newroot/proc /newroot/sys /newroot/tmp
    /bin/busybox touch /newroot/.switched
    exec /bin/busybox switch_root /newroot /init
fi
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do
    case $m in
    vivid.ko) insmod /modules/$m n_devs=2 multiplanar=1,2 node_types=0x1,0x1 ;;
    *) insmod /modules/$m ;;
    esac || echo "media-e2e: insmod $m failed"
done
echo "outboard-e2e: guest up, $(uname -r)"
# The jailed worker runs as nobody outside its user namespace.
chmod 666 /dev/video*
/bin/media-proxy-check --outboard /bin/outboard
echo "media-e2e: check exited with $?"
poweroff -f
"#;

/// How long the guest may take from boot to its result.
const TIMEOUT: Duration = Duration::from_secs(240);

/// Builds `media-proxy-check` and `outboard` (with the V4L2 proxy) statically, in their
/// own target dir (the flags differ); returns their paths.
fn build_check(include: &Path) -> Result<(PathBuf, PathBuf)> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| util::workspace_root().join("target"))
        .join("media-e2e");
    let triple = "x86_64-unknown-linux-gnu";
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args([
        "build",
        "-p",
        "outboard-tests",
        "-p",
        "outboard-glue",
        "--features",
    ])
    .arg("outboard-tests/v4l2-proxy,outboard-glue/v4l2-proxy")
    .args([
        "--bin",
        "media-proxy-check",
        "--bin",
        "outboard",
        "--target",
        triple,
    ])
    .env("CARGO_TARGET_DIR", &target)
    .env("RUSTFLAGS", "-C target-feature=+crt-static")
    .env("V4L2R_VIDEODEV2_H_PATH", include);
    util::run(&mut cmd, Duration::from_secs(1800))?;
    let dir = target.join(triple).join("debug");
    let (check, outboard) = (dir.join("media-proxy-check"), dir.join("outboard"));
    for bin in [&check, &outboard] {
        if !bin.exists() {
            return Err(format!("cargo build left no {}", bin.display()));
        }
    }
    Ok((check, outboard))
}

/// Boots the guest, returns whether every check passed.
pub fn run() -> Result<bool> {
    let started = Instant::now();
    let cache = setup::cache_dir();
    std::fs::create_dir_all(&cache).map_err(|e| format!("create {}: {e}", cache.display()))?;
    setup::ensure_packages()?;
    let include = setup::ensure_media_deps(&cache.join("media-deps"))?;
    let (kernel, root) = setup::ensure_kernel_package(&cache)?;
    let modules = setup::kernel_modules(&root, &["vivid"])?;
    let (check, outboard) = build_check(&include)?;
    let initramfs = setup::build_initramfs(
        &cache,
        "media-initramfs.cpio.gz",
        INIT,
        &[
            ("media-proxy-check", check.as_path()),
            ("outboard", outboard.as_path()),
        ],
        &modules,
    )?;
    let accel = match std::env::var("OUTBOARD_E2E_ACCEL") {
        Ok(a) => a,
        Err(_) => setup::probe_accel(&cache, &kernel, &initramfs),
    };
    let dir = cache.join("media-e2e-run");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let console = dir.join("console.log");
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", &accel, "-cpu", "max", "-smp", "2", "-m", "512M"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initramfs)
        .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=3"]);
    println!(
        "media-e2e: booting {} ({accel}) with vivid and media-proxy-check",
        kernel.display()
    );
    let boot = Instant::now();
    let mut proc = Proc::spawn("qemu", qemu, &dir.join("qemu.log"))?;
    let deadline = Instant::now() + TIMEOUT;
    let mut result = None;
    while Instant::now() < deadline {
        let log = util::read_log(&console);
        if let Some(line) = log.lines().find(|l| l.contains("media-e2e: RESULT")) {
            result = Some(line.trim().to_string());
            // Let the exit line through, then stop waiting for the power-off.
            std::thread::sleep(Duration::from_millis(200));
            break;
        }
        if !proc.running() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = proc.terminate(Duration::from_secs(5));
    let log = util::read_log(&console);
    for line in log
        .lines()
        .filter(|l| l.contains("media-e2e:") || l.contains("media-proxy-check:"))
    {
        println!("  {}", line.trim());
    }
    let Some(result) = result else {
        eprintln!("===== guest console ({}) =====\n{log}", console.display());
        return Err(format!(
            "no media-e2e RESULT line within {TIMEOUT:?} (QEMU log: {})",
            dir.join("qemu.log").display()
        ));
    };
    let field = |name: &str| -> Option<usize> {
        result
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse().ok())
    };
    let (passed, failed, frames) = (field("passed="), field("failed="), field("frames="));
    let fails = log
        .lines()
        .filter(|l| l.contains("media-e2e: FAIL"))
        .count();
    let oks = log.lines().filter(|l| l.contains("media-e2e: ok ")).count();
    println!(
        "media-e2e: {} checks passed, {} failed, {} frames checked; guest run {:.1}s, total {:.1}s",
        oks,
        fails,
        frames.unwrap_or(0),
        boot.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    // The summary line and the per-check lines must agree (a lost line is a failure).
    Ok(failed == Some(0) && fails == 0 && passed == Some(oks) && oks > 0)
}
