//! `cargo xtask media-e2e`: the V4L2 proxy against real V4L2 nodes. No host here has
//! one and modules cannot be loaded on it, so a QEMU guest (the e2e kernel, TCG or KVM)
//! loads vivid with a single-planar and a multi-planar capture instance and runs the
//! statically linked `media-proxy-check` (outboard-tests, feature `v4l2-proxy`), which
//! drives the virtio-media runner and the proxy over both nodes with the simulated guest
//! driver, then runs `outboard media --v4l2-device /dev/video0 --jail` (static, feature
//! `v4l2-proxy`) and drives it through our vhost-user `Frontend`. The guest prints one
//! line per check on its serial console; this side reads them back and turns them into
//! pass/fail with counts.
//!
//! Then Debian's `v4l2-compliance -s` (dynamically linked: the binary, its libraries and
//! the dynamic loader are copied from this host into the initramfs) runs on each vivid
//! node twice: directly (the baseline: what vivid itself gets) and through the proxy,
//! with `outboard-v4l2-shim` (feature `v4l2-proxy`, `LD_PRELOAD`) standing in for the
//! virtio-media guest driver over a fake node. The proxy passes when every test that
//! fails through it also fails directly (a failure only the proxy has is a proxy bug).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::setup;
use crate::util::{self, Proc, Result};

/// The guest's /init: vivid with two capture-only instances, single- then
/// multi-planar, then the check, then v4l2-compliance on each node directly and through
/// the shim and the proxy, then power off. Each report line goes to the console with
/// the prefix `v4l2c videoN direct| ` or `v4l2c videoN proxy| `.
fn init() -> String {
    setup::init_with(
        &setup::Prelude {
            tag: "media-e2e",
            before: SWITCH_ROOT,
            tmp: None,
            params: &[("vivid.ko", "n_devs=2 multiplanar=1,2 node_types=0x1,0x1")],
        },
        INIT_BODY,
    )
}

/// What [`init`] runs before the prelude.
const SWITCH_ROOT: &str = r#"if [ ! -e /.switched ]; then
    # The jailed worker pivot_roots, which the initramfs (rootfs) cannot be: move
    # everything to a tmpfs and make that the root.
    /bin/busybox mkdir -p /newroot
    /bin/busybox mount -t tmpfs -o size=256m tmpfs /newroot
    /bin/busybox cp -a /bin /lib /lib64 /usr /modules /init /newroot/
    /bin/busybox mkdir -p /newroot/dev /newroot/proc /newroot/sys /newroot/tmp
    /bin/busybox touch /newroot/.switched
    exec /bin/busybox switch_root /newroot /init
fi
"#;

/// What [`init`] runs after the prelude.
const INIT_BODY: &str = r#"echo "outboard-e2e: guest up, $(uname -r)"
# The jailed worker runs as nobody outside its user namespace.
chmod 666 /dev/video*
/bin/media-proxy-check --outboard /bin/outboard
echo "media-e2e: check exited with $?"
# The shim's node: a V4L2 device number no vivid node has (so v4l2-compliance finds no
# media device of it in sysfs).
mknod /tmp/outboard-video c 81 200
for n in 0 1; do
    echo "media-e2e: T $(cut -d' ' -f1 /proc/uptime) video$n direct"
    v4l2-compliance -d /dev/video$n -s 2>&1 | sed "s/^/v4l2c video$n direct| /"
    echo "media-e2e: T $(cut -d' ' -f1 /proc/uptime) video$n proxy"
    # Driver name vivid: v4l2-compliance then skips vivid's test controls as it does
    # for the node itself (one, "Disconnect", would unregister the node).
    LD_PRELOAD=/bin/liboutboard_v4l2_shim.so OUTBOARD_V4L2_SHIM_DEVICE=/tmp/outboard-video \
        OUTBOARD_V4L2_SHIM_PROXY=/dev/video$n OUTBOARD_V4L2_SHIM_DRIVER=vivid v4l2-compliance -d /tmp/outboard-video -s 2>&1 \
        | sed "s/^/v4l2c video$n proxy| /"
done
echo "media-e2e: T $(cut -d' ' -f1 /proc/uptime) end"
echo "media-e2e: END"
poweroff -f
"#;

/// How long the guest may take from boot to its result.
const TIMEOUT: Duration = Duration::from_secs(600);
/// The vivid nodes v4l2-compliance runs on.
const NODES: [&str; 2] = ["video0", "video1"];

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
        "outboard-vmm-glue",
        "--features",
    ])
    .arg("outboard-tests/v4l2-proxy,outboard-vmm-glue/v4l2-proxy")
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

/// Builds `outboard-v4l2-shim` with the V4L2 proxy (dynamically linked, as
/// `LD_PRELOAD` needs); returns the library.
fn build_shim(include: &Path) -> Result<PathBuf> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args([
        "build",
        "-p",
        "outboard-v4l2-shim",
        "--features",
        "v4l2-proxy",
    ])
    .env("V4L2R_VIDEODEV2_H_PATH", include);
    util::run(&mut cmd, Duration::from_secs(1800))?;
    let lib = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| util::workspace_root().join("target"))
        .join("debug")
        .join("liboutboard_v4l2_shim.so");
    if lib.exists() {
        Ok(lib)
    } else {
        Err(format!("cargo build left no {}", lib.display()))
    }
}

/// The files `ldd` lists for `bin`: the libraries and the dynamic loader, by the paths
/// the loader finds them at (the guest gets them at the same paths).
pub(crate) fn ldd_files(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("could not run ldd: {e}"))?;
    if !out.status.success() {
        return Err(format!("ldd {} failed: {:?}", bin.display(), out.status));
    }
    parse_ldd(&String::from_utf8_lossy(&out.stdout))
        .map_err(|e| format!("ldd {}: {e}", bin.display()))
}

/// The paths in `ldd` output: `name => /path (addr)` and `/path (addr)` lines.
pub(crate) fn parse_ldd(text: &str) -> std::result::Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.contains("not found") {
            return Err(format!("a library is missing: {line}"));
        }
        let path = line.split_once("=> ").map_or(line, |(_, p)| p);
        let path = path.split(" (").next().unwrap_or_default().trim();
        if path.starts_with('/') {
            files.push(PathBuf::from(path));
        }
    }
    Ok(files)
}

/// The initramfs files of the compliance runs: `v4l2-compliance` and the shim in /bin,
/// and what `ldd` lists for them at their host paths.
fn compliance_files(shim: &Path) -> Result<Vec<(String, PathBuf)>> {
    setup::ensure_v4l2_compliance()?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let tool = std::env::split_paths(&path)
        .map(|d| d.join("v4l2-compliance"))
        .find(|p| p.is_file())
        .ok_or("v4l2-compliance is not on the PATH")?;
    let mut files = vec![
        ("v4l2-compliance".to_string(), tool.clone()),
        ("liboutboard_v4l2_shim.so".to_string(), shim.to_owned()),
    ];
    let mut libs = ldd_files(&tool)?;
    libs.extend(ldd_files(shim)?);
    libs.sort();
    libs.dedup();
    for lib in libs {
        let name = lib.to_string_lossy().into_owned();
        files.push((name, lib));
    }
    Ok(files)
}

/// One v4l2-compliance report, from the console lines with its prefix.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Report {
    /// The `Total for ...` line.
    pub(crate) total: Option<String>,
    /// Its `Failed:` count.
    pub(crate) failed: Option<u64>,
    /// The tests reported as `FAIL`.
    pub(crate) failing: Vec<String>,
    /// The `fail:` detail lines.
    pub(crate) details: Vec<String>,
}

/// The v4l2-compliance report in the console lines that start with `prefix`.
pub(crate) fn report(console: &str, prefix: &str) -> Report {
    let mut r = Report::default();
    for line in console.lines().filter_map(|l| l.strip_prefix(prefix)) {
        let line = line.trim();
        if line.starts_with("Total for ") {
            r.failed = line
                .split(", ")
                .find_map(|f| f.strip_prefix("Failed: "))
                .and_then(|v| v.trim().parse().ok());
            r.total = Some(line.to_string());
        } else if let Some(name) = line.strip_suffix(": FAIL") {
            r.failing.push(name.trim().to_string());
        } else if line.contains("fail:") {
            r.details.push(line.to_string());
        }
    }
    r
}

/// Tests that fail through the shim for a reason of the shim's emulation, not of the
/// proxy, with the reason.
const SHIM_LIMITS: [(&str, &str); 1] = [(
    "test Disconnect",
    "vivid's disconnect test watches the node from a forked child; the child's copy of \
     the emulated driver shares its epoll instances with the parent's, whose driver sees \
     the disconnect first and closes the session (unwatching it for both), and an \
     emulated client fd (an eventfd) cannot report EPOLLPRI. A kernel driver has one \
     state for both processes (though the Linux virtio-media driver only logs a session \
     error and would not report the disconnect either). The proxy's part, ENODEV as one \
     session error, is checked by media-proxy-check",
)];

/// Whether a test failing only through the proxy is a known shim limitation.
fn shim_limit(test: &str) -> Option<&'static str> {
    SHIM_LIMITS
        .iter()
        .find(|(t, _)| *t == test)
        .map(|(_, why)| *why)
}

/// The tests failing through the proxy but not directly (nor for a known shim
/// limitation), deduplicated.
fn proxy_only<'a>(direct: &Report, proxy: &'a Report) -> Vec<&'a str> {
    let mut only: Vec<&str> = proxy
        .failing
        .iter()
        .filter(|t| !direct.failing.contains(t) && shim_limit(t).is_none())
        .map(String::as_str)
        .collect();
    only.sort_unstable();
    only.dedup();
    only
}

/// Whether the proxy passes against the baseline: both runs finished with totals and
/// every test failing through the proxy fails directly too (or is a known shim
/// limitation).
fn proxy_ok(direct: &Report, proxy: &Report) -> bool {
    direct.failed.is_some()
        && proxy.failed.is_some()
        && proxy_only(direct, proxy).is_empty()
        && (proxy.failed == Some(0) || !proxy.failing.is_empty())
}

/// `lines` deduplicated, each with its count.
pub(crate) fn counted(lines: &[String]) -> Vec<String> {
    let mut out: Vec<(String, usize)> = Vec::new();
    for l in lines {
        match out.iter_mut().find(|(x, _)| x == l) {
            Some((_, n)) => *n += 1,
            None => out.push((l.clone(), 1)),
        }
    }
    out.into_iter()
        .map(|(l, n)| if n > 1 { format!("{l} (x{n})") } else { l })
        .collect()
}

/// The `<prefix><uptime> <label>` marks (`media-e2e: T `, `mg: T `), as (uptime, label).
pub(crate) fn marks(console: &str, prefix: &str) -> Vec<(f64, String)> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix(prefix))
        .filter_map(|l| {
            let (t, label) = l.split_once(' ')?;
            Some((t.parse().ok()?, label.to_string()))
        })
        .collect()
}

/// Prints the compliance results; returns whether the proxy passed on every node.
fn check_compliance(console: &str) -> bool {
    let marks = marks(console, "media-e2e: T ");
    let took = |label: &str| -> String {
        let i = marks.iter().position(|(_, l)| l == label);
        match i.and_then(|i| Some((marks[i].0, marks.get(i + 1)?.0))) {
            Some((a, b)) => format!("{:.0}s", b - a),
            None => "?".into(),
        }
    };
    let mut ok = true;
    for node in NODES {
        let direct = report(console, &format!("v4l2c {node} direct| "));
        let proxy = report(console, &format!("v4l2c {node} proxy| "));
        for (way, r) in [("direct", &direct), ("proxy", &proxy)] {
            println!(
                "media-e2e: v4l2-compliance {node} {way} ({}): {}",
                took(&format!("{node} {way}")),
                r.total.as_deref().unwrap_or("no totals line")
            );
            println!(
                "media-e2e:   {node} {way} failing: [{}]",
                counted(&r.failing).join("; ")
            );
            for d in counted(&r.details) {
                println!("media-e2e:   {node} {way}: {d}");
            }
        }
        let mut limits: Vec<&str> = proxy
            .failing
            .iter()
            .filter(|t| !direct.failing.contains(t))
            .filter_map(|t| shim_limit(t).map(|_| t.as_str()))
            .collect();
        limits.dedup();
        for t in limits {
            println!(
                "media-e2e:   {node} proxy: {t}: shim limitation, not counted: {}",
                shim_limit(t).unwrap_or_default()
            );
        }
        let pass = proxy_ok(&direct, &proxy);
        println!(
            "media-e2e: v4l2-compliance {node}: proxy {} (failing only through the proxy: {:?})",
            if pass { "passes" } else { "FAILS" },
            proxy_only(&direct, &proxy)
        );
        ok &= pass;
    }
    ok
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
    let shim = build_shim(&include)?;
    let mut files = vec![
        ("media-proxy-check".to_string(), check),
        ("outboard".to_string(), outboard),
    ];
    files.extend(compliance_files(&shim)?);
    let files: Vec<(&str, &Path)> = files
        .iter()
        .map(|(n, p)| (n.as_str(), p.as_path()))
        .collect();
    let initramfs =
        setup::build_initramfs(&cache, "media-initramfs.cpio.gz", &init(), &files, &modules)?;
    let accel = match std::env::var("OUTBOARD_E2E_ACCEL") {
        Ok(a) => a,
        Err(_) => setup::probe_accel(&cache, &kernel, &initramfs),
    };
    let dir = cache.join("media-e2e-run");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let console = dir.join("console.log");
    let qemu = setup::qemu_guest(
        &accel,
        2,
        "512M",
        &console,
        &kernel,
        &initramfs,
        "console=ttyS0 panic=-1 quiet loglevel=3",
    );
    println!(
        "media-e2e: booting {} ({accel}) with vivid, media-proxy-check and v4l2-compliance",
        kernel.display()
    );
    let boot = Instant::now();
    let mut proc = Proc::spawn("qemu", qemu, &dir.join("qemu.log"))?;
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        let log = util::read_log(&console);
        if log.lines().any(|l| l.trim() == "media-e2e: END") || !proc.running() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = proc.terminate(Duration::from_secs(5));
    let log = util::read_log(&console);
    let result = log
        .lines()
        .find(|l| l.contains("media-e2e: RESULT"))
        .map(|l| l.trim().to_string());
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
    let compliance = log.lines().any(|l| l.trim() == "media-e2e: END") && check_compliance(&log);
    println!(
        "media-e2e: {} checks passed, {} failed, {} frames checked; v4l2-compliance through the proxy {}; guest run {:.1}s, total {:.1}s",
        oks,
        fails,
        frames.unwrap_or(0),
        if compliance { "passes" } else { "FAILS" },
        boot.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    // The summary line and the per-check lines must agree (a lost line is a failure).
    Ok(failed == Some(0) && fails == 0 && passed == Some(oks) && oks > 0 && compliance)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_library_and_loader_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
            \tlibv4l2.so.0 => /lib/x86_64-linux-gnu/libv4l2.so.0 (0x00007f01)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f02)\n\
            \t/lib64/ld-linux-x86-64.so.2 (0x00007f03)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libv4l2.so.0",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        assert!(parse_ldd("\tlibfoo.so => not found\n").is_err());
    }

    #[test]
    fn reports_are_compared_by_failing_test() {
        let console = "v4l2c video0 direct| \ttest VIDIOC_G_FMT: OK\n\
            v4l2c video0 direct| \t\tfail: v4l2-test-buffers.cpp(100): bad\n\
            v4l2c video0 direct| \ttest Cropping: FAIL\n\
            v4l2c video0 direct| Total for vivid device /dev/video0: 40, Succeeded: 39, Failed: 1, Warnings: 0\n\
            v4l2c video0 proxy| \ttest Cropping: FAIL\n\
            v4l2c video0 proxy| Total for virtio-media device /tmp/v: 40, Succeeded: 39, Failed: 1, Warnings: 0\n\
            v4l2c video1 proxy| \ttest VIDIOC_REQBUFS: FAIL\n\
            v4l2c video1 proxy| Total for virtio-media device /tmp/v: 40, Succeeded: 39, Failed: 1, Warnings: 0\n\
            v4l2c video1 direct| Total for vivid device /dev/video1: 40, Succeeded: 40, Failed: 0, Warnings: 0\n";
        let d0 = report(console, "v4l2c video0 direct| ");
        assert_eq!(d0.failed, Some(1));
        assert_eq!(d0.failing, ["test Cropping"]);
        assert_eq!(d0.details.len(), 1);
        let p0 = report(console, "v4l2c video0 proxy| ");
        assert!(proxy_ok(&d0, &p0));
        let (d1, p1) = (
            report(console, "v4l2c video1 direct| "),
            report(console, "v4l2c video1 proxy| "),
        );
        assert!(!proxy_ok(&d1, &p1));
        // A run without totals (crashed, timed out) never passes.
        assert!(!proxy_ok(&d0, &Report::default()));
        assert!(proxy_ok(&d1, &d1));
        // A known shim limitation is not a proxy failure; anything else is.
        let mut p1 = p1;
        p1.failing = vec!["test Disconnect".into()];
        assert!(proxy_ok(&d1, &p1));
        p1.failing.push("test Disconnectx".into());
        assert_eq!(proxy_only(&d1, &p1), ["test Disconnectx"]);
        assert_eq!(
            counted(&["a".into(), "b".into(), "a".into()]),
            ["a (x2)", "b"]
        );
    }
}
