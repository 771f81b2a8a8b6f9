//! Installs and builds what the end-to-end tests need, idempotently, into a cache
//! directory: Debian packages (QEMU from backports on bookworm, busybox-static), a guest
//! kernel with its vsock modules, the guest agent, and a busybox initramfs.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::packages;
use crate::util::{self, output, run, Result};

/// The modules the guest loads (with their dependencies) for a vsock device on PCI.
const ROOT_MODULES: &[&str] = &["virtio_pci", "vmw_vsock_virtio_transport"];

/// The guest's /init.
fn init() -> String {
    init_script(
        "outboard-e2e",
        false,
        r#"hostname outboard-guest
echo "outboard-e2e: guest up, $(uname -r), vsock agent starting"
while true; do
    /bin/vsock-agent
    echo "outboard-e2e: vsock agent exited with $?"
    sleep 1
done
"#,
    )
}

/// How a guest's /init begins (see [`init_with`]).
#[derive(Clone, Copy, Default)]
pub struct Prelude<'a> {
    /// The prefix of the `<tag>: insmod <module> failed` lines, which some harnesses look for.
    pub tag: &'a str,
    /// Shell lines run first, before busybox's applets are installed.
    pub before: &'a str,
    /// A tmpfs on /tmp: `None` for none, else its mount options (`""` for the defaults).
    pub tmp: Option<&'a str>,
    /// Module parameters: (file name in /modules/order, parameters).
    pub params: &'a [(&'a str, &'a str)],
}

/// A guest's /init: the busybox prelude (applets on PATH, /proc, /sys and /dev mounted,
/// a tmpfs on /tmp if `tmp`, every module in /modules/order loaded, a failure reported
/// as `<tag>: insmod <module> failed`), then `body`.
pub fn init_script(tag: &str, tmp: bool, body: &str) -> String {
    init_with(
        &Prelude {
            tag,
            tmp: tmp.then_some(""),
            ..Prelude::default()
        },
        body,
    )
}

/// [`init_script`] with the prelude's every option.
pub fn init_with(p: &Prelude, body: &str) -> String {
    let mut s = String::from("#!/bin/busybox sh\n");
    s.push_str(p.before);
    s.push_str(
        "/bin/busybox --install -s /bin\n\
         export PATH=/bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         mount -t devtmpfs dev /dev\n",
    );
    match p.tmp {
        None => {}
        Some("") => s.push_str("mount -t tmpfs tmp /tmp\n"),
        Some(o) => s.push_str(&format!("mount -t tmpfs -o {o} tmp /tmp\n")),
    }
    s.push_str("for m in $(cat /modules/order); do\n");
    let failed = format!("|| echo \"{}: insmod $m failed\"\n", p.tag);
    if p.params.is_empty() {
        s.push_str(&format!("    insmod /modules/$m {failed}"));
    } else {
        s.push_str("    case $m in\n");
        for (m, params) in p.params {
            s.push_str(&format!("    {m}) insmod /modules/$m {params} ;;\n"));
        }
        s.push_str(&format!("    *) insmod /modules/$m ;;\n    esac {failed}"));
    }
    s.push_str("done\n");
    s.push_str(body);
    s
}

/// The QEMU every guest step boots.
pub const QEMU: &str = "qemu-system-x86_64";

/// QEMU for a guest with a serial console in the file `console` and no devices: the
/// caller adds its own.
pub fn qemu_guest(
    accel: &str,
    smp: u32,
    mem: &str,
    console: &Path,
    kernel: &Path,
    initrd: &Path,
    append: &str,
) -> Command {
    let mut cmd = Command::new(QEMU);
    cmd.args(["-accel", accel, "-cpu", "max", "-smp", &smp.to_string()])
        .args(["-m", mem])
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
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", append]);
    cmd
}

/// What a test run boots.
pub struct Assets {
    /// The guest kernel image.
    pub kernel: PathBuf,
    /// The gzip'd cpio initramfs.
    pub initramfs: PathBuf,
    /// QEMU's accelerator: `kvm` where a probe boot succeeded, else `tcg`.
    pub accel: String,
}

/// The cache directory: `$OUTBOARD_E2E_CACHE` or `target/e2e-cache`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("OUTBOARD_E2E_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| util::workspace_root().join("target").join("e2e-cache"))
}

/// Makes sure everything is installed and built; returns what to boot.
pub fn prepare(cache: &Path) -> Result<Assets> {
    fs::create_dir_all(cache).map_err(|e| format!("create {}: {e}", cache.display()))?;
    ensure_packages()?;
    let (kernel, modules) = ensure_kernel(cache)?;
    let agent = ensure_agent(cache)?;
    let initramfs = build_initramfs(
        cache,
        "initramfs.cpio.gz",
        &init(),
        &[("vsock-agent", agent.as_path())],
        &modules,
    )?;
    let accel = match std::env::var("OUTBOARD_E2E_ACCEL") {
        Ok(a) => a,
        Err(_) => probe_accel(cache, &kernel, &initramfs),
    };
    Ok(Assets {
        kernel,
        initramfs,
        accel,
    })
}

/// `kvm` if /dev/kvm is usable and the guest reaches its init under it within 20 s,
/// else `tcg`. Nested KVM on some hosts cannot run a stock Debian kernel (emulation
/// failures in the decompressor), hence the probe. The answer is cached per kernel.
pub fn probe_accel(cache: &Path, kernel: &Path, initramfs: &Path) -> String {
    let name = kernel
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let memo = cache.join(format!("accel-{name}"));
    if let Ok(a) = fs::read_to_string(&memo) {
        if matches!(a.trim(), "kvm" | "tcg") {
            return a.trim().to_string();
        }
    }
    let usable = fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let accel = if usable && kvm_boots(cache, kernel, initramfs) {
        "kvm"
    } else {
        "tcg"
    };
    println!(
        "e2e: accelerator: {accel} (probed once, cached in {})",
        memo.display()
    );
    let _ = fs::write(&memo, accel);
    accel.to_string()
}

fn kvm_boots(cache: &Path, kernel: &Path, initramfs: &Path) -> bool {
    let log = cache.join("kvm-probe.log");
    let _ = fs::remove_file(&log);
    let mut cmd = qemu_guest(
        "kvm",
        1,
        "256M",
        &log,
        kernel,
        initramfs,
        "console=ttyS0 panic=-1 quiet",
    );
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let Ok(mut qemu) = cmd.spawn() else {
        return false;
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut booted = false;
    while std::time::Instant::now() < deadline {
        if fs::read_to_string(&log).is_ok_and(|l| l.contains("outboard-e2e: guest up")) {
            booted = true;
            break;
        }
        if matches!(qemu.try_wait(), Ok(Some(_))) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    util::kill_and_reap(&mut qemu);
    booted
}

fn have_qemu_with_vhost_user_vsock() -> bool {
    let out = Command::new(QEMU)
        .args(["-device", "help"])
        .stderr(Stdio::null())
        .output();
    matches!(out, Ok(o) if o.status.success()
        && String::from_utf8_lossy(&o.stdout).contains("vhost-user-vsock-pci"))
}

fn busybox() -> Option<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Installs what the guest tests need (QEMU >= 10 with vhost-user-vsock, busybox-static,
/// gcc and libc6-dev for the static guest agents) by package name, then checks that this
/// QEMU has the vhost-user-vsock device.
pub fn ensure_packages() -> Result<()> {
    packages::ensure(&["gcc", "libc6-dev", "qemu-system-x86", "busybox-static"])?;
    if !have_qemu_with_vhost_user_vsock() {
        return Err("qemu-system-x86_64 has no vhost-user-vsock-pci device after install".into());
    }
    Ok(())
}

/// Downloads and unpacks the kernel package; returns the vmlinuz and the modules to
/// load for vsock, in load order, as (name, path).
fn ensure_kernel(cache: &Path) -> Result<(PathBuf, Vec<(String, PathBuf)>)> {
    let (kernel, root) = ensure_kernel_package(cache)?;
    let modules = kernel_modules(&root, ROOT_MODULES)?;
    Ok((kernel, modules))
}

/// Downloads and unpacks the kernel package; returns the vmlinuz and the directory the
/// package is unpacked in (for [`kernel_modules`]).
pub fn ensure_kernel_package(cache: &Path) -> Result<(PathBuf, PathBuf)> {
    let pin = cache.join("kernel-package");
    let package = match fs::read_to_string(&pin) {
        Ok(p) if !p.trim().is_empty() => p.trim().to_string(),
        _ => {
            let depends = || {
                output(
                    Command::new("apt-cache").args(["depends", "linux-image-amd64"]),
                    Duration::from_secs(60),
                )
            };
            // Package lists may be missing or stale on a machine that had QEMU already.
            let deps = match depends() {
                Ok(d) if d.contains("Depends:") => d,
                _ => {
                    run(
                        Command::new("apt-get").args(["update", "-q"]),
                        Duration::from_secs(900),
                    )?;
                    depends()?
                }
            };
            let name = deps
                .lines()
                .filter_map(|l| l.trim().strip_prefix("Depends:"))
                .map(str::trim)
                .find(|d| d.starts_with("linux-image-") && d.ends_with("-amd64"))
                .ok_or_else(|| {
                    format!("apt-cache depends linux-image-amd64 names no kernel:\n{deps}")
                })?
                .to_string();
            fs::write(&pin, &name).map_err(|e| format!("write {}: {e}", pin.display()))?;
            name
        }
    };
    let root = cache.join("kernel").join(&package);
    let done = root.join(".unpacked");
    if !done.exists() {
        let dl = cache.join("download");
        println!("e2e: downloading {package}");
        let deb = download_deb(&dl, &package, &package)?;
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).map_err(|e| format!("create {}: {e}", root.display()))?;
        run(
            Command::new("dpkg").arg("-x").arg(&deb).arg(&root),
            Duration::from_secs(300),
        )?;
        let _ = fs::remove_file(&deb);
        fs::write(&done, "").map_err(|e| format!("write {}: {e}", done.display()))?;
    }
    let boot = root.join("boot");
    let kernel = fs::read_dir(&boot)
        .map_err(|e| format!("read {}: {e}", boot.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .ok_or_else(|| format!("no vmlinuz-* in {}", boot.display()))?;
    Ok((kernel, root))
}

/// `apt-get download spec` into `dir` (made writable for apt's `_apt` user), retried once
/// after `apt-get update`; returns the downloaded `{package}_*.deb` (the newest if
/// several are there).
pub fn download_deb(dir: &Path, spec: &str, package: &str) -> Result<PathBuf> {
    fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    // apt drops privileges to _apt for downloads when it can; let it write here.
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o777));
    let download = || {
        run(
            Command::new("apt-get")
                .args(["download", "-q", spec])
                .current_dir(dir),
            Duration::from_secs(600),
        )
    };
    if download().is_err() {
        run(
            Command::new("apt-get").args(["update", "-q"]),
            Duration::from_secs(900),
        )?;
        download()?;
    }
    let prefix = format!("{package}_");
    fs::read_dir(dir)
        .map_err(|e| format!("read {}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .max()
        .ok_or_else(|| {
            format!(
                "apt-get download left no {prefix}*.deb in {}",
                dir.display()
            )
        })
}

/// Finds the modules `wanted` of the kernel unpacked in `root` and everything they
/// depend on, dependencies first.
pub fn kernel_modules(root: &Path, wanted: &[&str]) -> Result<Vec<(String, PathBuf)>> {
    let base = root.join("lib").join("modules");
    let mut files = BTreeMap::new();
    let mut stack = vec![base.clone()];
    while let Some(dir) = stack.pop() {
        let entries = fs::read_dir(&dir).map_err(|e| format!("read {}: {e}", dir.display()))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
                if let Some(stem) = name.strip_suffix(".ko") {
                    files.insert(stem.replace('-', "_"), path.clone());
                }
            }
        }
    }
    let builtin: BTreeSet<String> = fs::read_dir(&base)
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .and_then(|e| fs::read_to_string(e.path().join("modules.builtin")).ok())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .filter_map(|n| n.strip_suffix(".ko"))
        .map(|n| n.replace('-', "_"))
        .collect();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for m in wanted {
        visit(m, &files, &builtin, &mut seen, &mut order, 0)?;
    }
    Ok(order)
}

fn visit(
    name: &str,
    files: &BTreeMap<String, PathBuf>,
    builtin: &BTreeSet<String>,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<(String, PathBuf)>,
    depth: usize,
) -> Result<()> {
    let name = name.replace('-', "_");
    if depth > 32 || !seen.insert(name.clone()) {
        return Ok(());
    }
    let Some(path) = files.get(&name) else {
        if builtin.contains(&name) {
            return Ok(());
        }
        return Err(format!(
            "kernel module {name} is neither a file nor built in"
        ));
    };
    let bytes = fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))?;
    let key = b"depends=";
    if let Some(at) = bytes.windows(key.len()).position(|w| w == key) {
        let rest = &bytes[at + key.len()..];
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        let deps = String::from_utf8_lossy(&rest[..end]).into_owned();
        for dep in deps.split(',').filter(|d| !d.is_empty()) {
            visit(dep, files, builtin, seen, order, depth + 1)?;
        }
    }
    order.push((name, path.clone()));
    Ok(())
}

/// Compiles the guest agent statically if its source changed.
fn ensure_agent(cache: &Path) -> Result<PathBuf> {
    let src = util::workspace_root()
        .join("xtask")
        .join("guest")
        .join("vsock-agent.c");
    let bin = cache.join("vsock-agent");
    if util::mtime(&bin).is_some() && util::mtime(&bin) >= util::mtime(&src) {
        return Ok(bin);
    }
    println!("e2e: compiling the guest agent");
    run(
        Command::new("gcc")
            .args(["-static", "-O2", "-Wall", "-Werror", "-pthread", "-o"])
            .arg(&bin)
            .arg(&src),
        Duration::from_secs(300),
    )?;
    Ok(bin)
}

/// A cpio "newc" archive being written.
struct Cpio {
    data: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, body: &[u8]) {
        self.ino += 1;
        let name_len = name.len() + 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            body.len(),
            0,
            0,
            0,
            0,
            name_len,
            0
        );
        self.data.extend_from_slice(header.as_bytes());
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
    }

    fn pad(&mut self) {
        while self.data.len() % 4 != 0 {
            self.data.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[]);
    }

    fn file(&mut self, name: &str, body: &[u8]) {
        self.entry(name, 0o100755, body);
    }
}

/// Writes the initramfs `cache/name`: busybox, `init` as /init, the files `bins` (name,
/// host path; a plain name goes to /bin, a name starting with `/` is the file's path in
/// the initramfs, its directories made as needed: shared libraries and the dynamic
/// loader) and the modules (listed in load order in /modules/order).
pub fn build_initramfs(
    cache: &Path,
    name: &str,
    init: &str,
    bins: &[(&str, &Path)],
    modules: &[(String, PathBuf)],
) -> Result<PathBuf> {
    let busybox = busybox().ok_or("busybox-static is not installed")?;
    build_initramfs_with(cache, name, &busybox, init, bins, modules)
}

/// [`build_initramfs`] with the busybox binary at `busybox` (e.g. from a guest root)
/// instead of the host's.
pub fn build_initramfs_with(
    cache: &Path,
    name: &str,
    busybox: &Path,
    init: &str,
    bins: &[(&str, &Path)],
    modules: &[(String, PathBuf)],
) -> Result<PathBuf> {
    let read = |p: &Path| fs::read(p).map_err(|e| format!("read {}: {e}", p.display()));
    let mut cpio = Cpio {
        data: Vec::new(),
        ino: 0,
    };
    let mut dirs = BTreeSet::new();
    for d in ["bin", "dev", "proc", "sys", "tmp", "modules"] {
        cpio.dir(d);
        dirs.insert(d.to_string());
    }
    cpio.file("bin/busybox", &read(busybox)?);
    for (bin, path) in bins {
        let name = match bin.strip_prefix('/') {
            Some(abs) => {
                for (i, _) in abs.match_indices('/') {
                    if dirs.insert(abs[..i].to_string()) {
                        cpio.dir(&abs[..i]);
                    }
                }
                abs.to_string()
            }
            None => format!("bin/{bin}"),
        };
        cpio.file(&name, &read(path)?);
    }
    cpio.file("init", init.as_bytes());
    let mut order = String::new();
    for (name, path) in modules {
        let file = format!("{name}.ko");
        cpio.file(&format!("modules/{file}"), &read(path)?);
        order.push_str(&file);
        order.push('\n');
    }
    cpio.file("modules/order", order.as_bytes());
    cpio.entry("TRAILER!!!", 0, &[]);

    let out = cache.join(name);
    let tmp = cache.join(format!("{name}.tmp"));
    let file = fs::File::create(&tmp).map_err(|e| format!("create {}: {e}", tmp.display()))?;
    let mut gzip = Command::new("gzip")
        .args(["-1", "-n", "-c"])
        .stdin(Stdio::piped())
        .stdout(file)
        .spawn()
        .map_err(|e| format!("could not start gzip: {e}"))?;
    let mut stdin = gzip.stdin.take().ok_or("gzip: no stdin")?;
    let data = std::mem::take(&mut cpio.data);
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    match util::wait_timeout(&mut gzip, Duration::from_secs(120)) {
        Ok(Some(s)) if s.success() => {}
        other => {
            util::kill_and_reap(&mut gzip);
            return Err(format!("gzip of the initramfs failed: {other:?}"));
        }
    }
    writer
        .join()
        .map_err(|_| "initramfs writer panicked".to_string())?
        .map_err(|e| format!("write to gzip: {e}"))?;
    fs::rename(&tmp, &out).map_err(|e| format!("rename to {}: {e}", out.display()))?;
    Ok(out)
}

/// Installs vhost-device-vsock 0.3.0 (the comparison back-end) with `cargo install`.
pub fn ensure_vhost_device_vsock(cache: &Path) -> Result<PathBuf> {
    let root = cache.join("vhost-device-vsock");
    let bin = root.join("bin").join("vhost-device-vsock");
    if bin.exists() {
        return Ok(bin);
    }
    println!("e2e: cargo install vhost-device-vsock 0.3.0");
    run(
        Command::new("cargo")
            .args([
                "install",
                "--locked",
                "vhost-device-vsock",
                "--version",
                "0.3.0",
                "--root",
            ])
            .arg(&root)
            .env("CARGO_TARGET_DIR", cache.join("cargo-install-target")),
        Duration::from_secs(1800),
    )?;
    Ok(bin)
}

/// Installs Debian's v4l-utils (for `v4l2-compliance`) unless the package database
/// shows it installed.
pub fn ensure_v4l2_compliance() -> Result<()> {
    packages::ensure(&["v4l-utils"])
}

/// Whether `include/linux/videodev2.h` is from Linux >= 6.5 (what v4l2r's bindgen run
/// needs: it names `v4l2_ctrl_av1_film_grain`).
fn videodev2_ok(include: &Path) -> bool {
    fs::read_to_string(include.join("linux").join("videodev2.h"))
        .is_ok_and(|h| h.contains("v4l2_ctrl_av1_film_grain"))
}

/// What building v4l2r (feature `v4l2-proxy`) needs: libclang-dev for its bindgen run, and a videodev2.h from Linux >=
/// 6.5. Returns the include directory to pass as `V4L2R_VIDEODEV2_H_PATH`: that
/// variable's value if it is good already, else the system's headers if they are new
/// enough, else bookworm-backports' linux-libc-dev unpacked (not installed) into
/// `cache/root`.
pub fn ensure_media_deps(cache: &Path) -> Result<PathBuf> {
    let apt_timeout = Duration::from_secs(900);
    packages::ensure(&["libclang-dev"])?;
    if let Some(dir) = std::env::var_os("V4L2R_VIDEODEV2_H_PATH").map(PathBuf::from) {
        if videodev2_ok(&dir) {
            return Ok(dir);
        }
    }
    if videodev2_ok(Path::new("/usr/include")) {
        return Ok(PathBuf::from("/usr/include"));
    }
    let include = cache.join("root").join("usr").join("include");
    if videodev2_ok(&include) {
        return pin_v4l2r_rerun(include);
    }
    let codename = packages::os_codename();
    if codename != "bookworm" {
        return Err(format!(
            "media-deps: /usr/include/linux/videodev2.h is older than Linux 6.5 on {codename:?}; \
             install a newer linux-libc-dev or set V4L2R_VIDEODEV2_H_PATH"
        ));
    }
    if packages::add_backports("bookworm-backports")? {
        run(Command::new("apt-get").args(["update", "-q"]), apt_timeout)?;
    }
    let debs = cache.join("debs");
    let deb = download_deb(&debs, "linux-libc-dev/bookworm-backports", "linux-libc-dev")?;
    let root = cache.join("root");
    let _ = fs::remove_dir_all(&root);
    run(
        Command::new("dpkg").arg("-x").arg(&deb).arg(&root),
        Duration::from_secs(300),
    )?;
    if !videodev2_ok(&include) {
        return Err(format!(
            "media-deps: {}/linux/videodev2.h is older than Linux 6.5",
            include.display()
        ));
    }
    pin_v4l2r_rerun(include)
}

/// v4l2r's build script passes `-I$V4L2R_VIDEODEV2_H_PATH` to clang, whose wrapper
/// includes `<linux/videodev2.h>` (so the variable must be the include root), but it
/// tells cargo to rerun when `$V4L2R_VIDEODEV2_H_PATH/videodev2.h` changes: a file
/// that does not exist there, which cargo takes as changed on every build, rebuilding
/// v4l2r and every crate above it each time. A link by that name to the real header
/// in our own include root makes the build cached again.
fn pin_v4l2r_rerun(include: PathBuf) -> Result<PathBuf> {
    let link = include.join("videodev2.h");
    if fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink("linux/videodev2.h", &link)
            .map_err(|e| format!("media-deps: link {}: {e}", link.display()))?;
    }
    Ok(include)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_init_prelude_loads_modules_and_names_failures() {
        let p = Prelude {
            tag: "t",
            before: "B\n",
            tmp: Some("size=1m"),
            params: &[("a.ko", "x=1")],
        };
        let s = init_with(&p, "BODY\n");
        assert!(s.starts_with("#!/bin/busybox sh\nB\n/bin/busybox --install -s /bin\n"));
        assert!(s.contains("mount -t tmpfs -o size=1m tmp /tmp\n"));
        assert!(s.contains("    a.ko) insmod /modules/$m x=1 ;;\n"));
        assert!(s.contains("    esac || echo \"t: insmod $m failed\"\n"));
        assert!(s.ends_with("done\nBODY\n"));
        let s = init_script("t", false, "");
        assert!(!s.contains("/tmp"));
        assert!(s.contains("    insmod /modules/$m || echo \"t: insmod $m failed\"\n"));
        assert!(init_script("t", true, "").contains("mount -t tmpfs tmp /tmp\n"));
    }
}
