//! `cargo xtask media-guest`: `outboard media` against the real Linux virtio-media guest
//! driver and a real QEMU front-end.
//!
//! Bookworm has neither a QEMU that can front a virtio-media back-end (QEMU 11.1's
//! `vhost-user-test-device-pci` with `SHMEM_MAP`) nor the gcc-14 that trixie-backports'
//! kernel headers need, so everything guest-side comes from a Debian trixie root made with
//! `debootstrap --variant=minbase` and cached in `target/e2e-cache/trixie-root` (see
//! [`ensure_root`]): QEMU and the guest kernel with its headers from trixie-backports,
//! v4l-utils (v4l2-compliance 1.30 and v4l2-ctl) from trixie.
//!
//! 1. The driver (`../shared/guest-drivers/virtio-media/`, an unmodified third-party copy)
//!    is copied into the root, the patches of `guest-patches/virtio-media/` applied (each
//!    must apply exactly, or nothing is built; see [`guest_patch`]), its id table patched
//!    from `VIRTIO_ID_MEDIA` (48, on which QEMU 11.1's generic device aborts) to
//!    [`VIRTIO_ID`], and built there against the kernel headers; the module is cached by
//!    kernel version and the hash of the sources and patches.
//! 2. A busybox initramfs gets the driver, the kernel modules it needs (dependencies first,
//!    from `modules.dep`), v4l2-compliance and v4l2-ctl with their libraries (resolved
//!    by `ldd` inside the root) and the static `media-frame-check` (outboard-tests).
//! 3. Four `outboard media --camera` daemons run on the host, one per [`MODES`] entry
//!    (single- and multi-planar, each with and without `--jail`), their sockets inside
//!    the root, and one guest boots under QEMU (chrooted into the root, TCG) with one
//!    `vhost-user-test-device-pci` per daemon at a fixed PCI slot, so the guest finds each
//!    mode's video node through sysfs.
//! 4. Per node the guest runs `v4l2-compliance -s10`, `v4l2-compliance -s10 -f`, and
//!    MMAP and USERPTR captures with `v4l2-ctl` whose frames `media-frame-check` compares
//!    byte for byte with the camera's pattern, and a `v4l2-ctl --stream-show-delta-now`
//!    capture whose every buffer's timestamp must be within [`TS_LIMIT_MS`] of the
//!    guest's `CLOCK_MONOTONIC` at DQBUF (the carried driver patch stamps capture buffers
//!    in the guest's clock; the shipped driver passes the host's on); then the capture
//!    applications of [`media_clients`] (GStreamer and ffmpeg, run in the root, which the
//!    guest mounts over virtio-9p). Every output line goes to the serial console with a
//!    prefix naming the mode and the test; this side parses them into a summary.
//!    In [`THP_MODE`], a USERPTR capture of [`THP_FRAMES`] frames while khugepaged and
//!    compaction move guest pages (the THP step: the carried patch 0002 keeps a USERPTR
//!    buffer's pages pinned until the device returns it); at the end, every user page
//!    pinned since boot must have been unpinned.
//! 5. Last, in each jailed mode, the kill test: GStreamer streams, the guest prints
//!    `mg: KILL <mode>`, this side kills that daemon's jailed worker (SIGKILL), and the
//!    client must end within [`KILL_LIMIT_S`]; QEMU's generic vhost-user device does not
//!    reconnect, so the device stays down and the next client must be refused within
//!    [`REFUSE_AFTER_KILL_S`] (the carried patch 0003 marks a device that stopped
//!    answering broken; as shipped the client streams on forever and the next open fails
//!    after 41 s).
//!
//! The modes are tested at once (four guest processes, two vCPUs);
//! `OUTBOARD_MEDIA_GUEST_SERIAL=1` tests them one after another, to tell a failure that
//! load brings out from one that does not need it; `OUTBOARD_MEDIA_GUEST_ONLY` names the
//! groups of tests to run ([`GROUPS`], comma- or space-separated; all by default).
//!
//! Pass: every v4l2-compliance run ends with `Failed: 0`, every captured frame is
//! exact, every timestamp is the guest's, every client run passes, no page stays
//! pinned, and no daemon log reports a worker killed (seccomp, `SIGSYS`) or ended but
//! the kill test's own.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::guest_patch;
use crate::media_clients;
use crate::media_e2e::{self, parse_ldd, report, Report};
use crate::packages;
use crate::qmp::Qmp;
use crate::setup;
use crate::util::{self, output, Proc, Result};

/// The Debian release of the root.
const SUITE: &str = "trixie";
/// Its backports suite (QEMU 11.1, the 7.x kernel).
const BACKPORTS: &str = "trixie-backports";

/// A package installed in the trixie root.
struct RootPackage {
    /// The Debian package name.
    name: &'static str,
    /// Installed from [`BACKPORTS`] (else from [`SUITE`]).
    backports: bool,
    /// The oldest acceptable version (`dpkg --compare-versions` syntax), if any.
    min_version: Option<&'static str>,
    /// What it is for.
    why: &'static str,
}

/// Every package of the trixie root (with their dependencies, no recommends).
const ROOT_PACKAGES: &[RootPackage] = &[
    RootPackage {
        name: "qemu-system-x86",
        backports: true,
        min_version: Some("1:11.1"),
        why: "vhost-user-test-device-pci with SHMEM_MAP",
    },
    RootPackage {
        name: "linux-image-amd64",
        backports: true,
        min_version: None,
        why: "the guest kernel and its modules",
    },
    RootPackage {
        name: "linux-headers-amd64",
        backports: true,
        min_version: None,
        why: "building the virtio-media driver (pulls in gcc-14)",
    },
    RootPackage {
        name: "make",
        backports: false,
        min_version: None,
        why: "kbuild (the headers pull in gcc-14, not make)",
    },
    RootPackage {
        name: "binutils",
        backports: false,
        min_version: None,
        why: "the `as` and `ld` gcc-14 runs (the headers pull in prefixed ones only)",
    },
    RootPackage {
        name: "v4l-utils",
        backports: false,
        min_version: Some("1.30"),
        why: "v4l2-compliance and v4l2-ctl in the guest",
    },
    RootPackage {
        name: "busybox-static",
        backports: false,
        min_version: None,
        why: "the guest's shell and tools",
    },
    RootPackage {
        name: "xz-utils",
        backports: false,
        min_version: None,
        why: "unpacking the kernel's modules (.ko.xz) for the initramfs",
    },
    RootPackage {
        name: "kmod",
        backports: false,
        min_version: None,
        why: "modinfo and depmod for the kernel's modules",
    },
    RootPackage {
        name: "gstreamer1.0-tools",
        backports: false,
        min_version: Some("1.26"),
        why: "gst-launch-1.0 in the guest (media_clients)",
    },
    RootPackage {
        name: "gstreamer1.0-plugins-base",
        backports: false,
        min_version: Some("1.26"),
        why: "videoconvert and the raw video caps",
    },
    RootPackage {
        name: "gstreamer1.0-plugins-good",
        backports: false,
        min_version: Some("1.26"),
        why: "v4l2src",
    },
    RootPackage {
        name: "ffmpeg",
        backports: false,
        min_version: Some("7:7.1"),
        why: "ffmpeg's v4l2 input in the guest (media_clients)",
    },
];

/// The file in the root that lists what it holds once it is complete.
const ROOT_STAMP: &str = ".outboard-media-guest";
/// The file in the root that says debootstrap finished.
const DEBOOTSTRAP_STAMP: &str = ".outboard-debootstrap";
/// The virtio device id the guest sees (QEMU 11.1's `vhost-user-test-device-pci` aborts
/// on `VIRTIO_ID_MEDIA`, 48; 38 is unassigned in the virtio specification).
const VIRTIO_ID: u32 = 38;
/// Where the run's sockets, kernel command files and console log live, inside the root;
/// the run's process id is appended, so that two runs sharing one root (a worktree whose
/// cache links another's) never remove each other's sockets.
const RUN_DIR: &str = "run/outboard";

/// A camera mode under test: one daemon and one PCI device.
struct Mode {
    /// Its name in the console prefixes and the summary.
    name: &'static str,
    /// `--mplane`.
    mplane: bool,
    /// `--jail`.
    jail: bool,
    /// The device's PCI slot (`addr=0x..`).
    slot: u8,
    /// The format `v4l2-ctl` captures for the frame check (a V4L2 fourcc name).
    fourcc: &'static str,
    /// The format the USERPTR capture uses.
    fourcc_userptr: &'static str,
}

/// The modes, one daemon and one device each.
const MODES: [Mode; 4] = [
    Mode {
        name: "sp",
        mplane: false,
        jail: false,
        slot: 0x10,
        fourcc: "YUYV",
        fourcc_userptr: "RGB3",
    },
    Mode {
        name: "mplane",
        mplane: true,
        jail: false,
        slot: 0x11,
        fourcc: "NM12",
        fourcc_userptr: "YM12",
    },
    Mode {
        name: "sp-jail",
        mplane: false,
        jail: true,
        slot: 0x12,
        fourcc: "NV12",
        fourcc_userptr: "YUYV",
    },
    Mode {
        name: "mplane-jail",
        mplane: true,
        jail: true,
        slot: 0x13,
        fourcc: "YM12",
        fourcc_userptr: "NM12",
    },
];

/// A fifth device for the `no-shm` group, hot-plugged (QMP) into a PCIe root port whose
/// windows have the firmware's default size (2 MiB), which cannot hold the camera's
/// 256 MiB shared memory BAR: the guest binds it without its MMAP region, as it would
/// any device hot-plugged where its BAR does not fit.
const NO_SHM: Mode = Mode {
    name: "no-shm",
    mplane: false,
    jail: false,
    slot: 0x14,
    fourcc: "YUYV",
    fourcc_userptr: "YUYV",
};

/// The size every capture uses.
const CAPTURE_SIZE: (u32, u32) = (640, 480);
/// Frames each capture writes.
const CAPTURE_FRAMES: u32 = 8;
/// Buffers the timestamp check dequeues.
const TS_FRAMES: usize = 10;
/// How far a buffer's timestamp may be from the guest's `CLOCK_MONOTONIC` when the buffer
/// is dequeued (`v4l2-ctl --stream-show-delta-now`), in milliseconds.
const TS_LIMIT_MS: f64 = 1000.0;
/// The THP step (issue 22 item 4): in mode [`THP_MODE`], a USERPTR capture of
/// [`THP_FRAMES`] frames while khugepaged collapses and compaction migrates guest pages,
/// streamed into media-frame-check. A USERPTR page the driver unpins before the device has
/// written to it can move in the meantime, and the frame lands in a page the process no
/// longer maps (or one the kernel gave to someone else). One mode is enough: the pages'
/// lifetime is the guest driver's alone, the same for a jailed or a multi-planar device.
const THP_MODE: &str = "sp";
/// Its format, at [`THP_SIZE`]: 150 KiB frames that the checker keeps up with at
/// [`THP_FPS`] under TCG (1280x720 RGB24 frames are 18 times as large: 900 of them take
/// minutes to check there). glibc mmaps each buffer, and the [`THP_BUFFERS`] adjacent
/// anonymous mappings merge into one of 4.75 MiB, whose 2 MiB ranges khugepaged
/// collapses under the buffers.
const THP_FOURCC: &str = "YUYV";
const THP_SIZE: (u32, u32) = (320, 240);
/// Frames the THP step captures and checks.
const THP_FRAMES: u32 = 900;
/// Its USERPTR buffers (the camera's most).
const THP_BUFFERS: u32 = 32;
/// Its frame rate.
const THP_FPS: u32 = 60;
/// How long the guest may take from boot to its end mark.
const GUEST_TIMEOUT: Duration = Duration::from_secs(540);

/// A complete trixie root.
struct Root {
    /// Its directory.
    dir: PathBuf,
    /// The guest kernel's version (`uname -r`), whose headers are in the root.
    kver: String,
}

/// The stamp text: what a complete root holds.
fn stamp_text() -> String {
    let mut s = format!(
        "debootstrap --variant=minbase {SUITE}\nno recommends, docs, manuals, translations or apt lists\n"
    );
    for p in ROOT_PACKAGES {
        let suite = if p.backports { BACKPORTS } else { SUITE };
        let min = p.min_version.unwrap_or("any");
        s.push_str(&format!("{} {suite} >= {min}\n", p.name));
    }
    s
}

/// A command that runs `argv` chrooted into `root`, in a private mount namespace that
/// has the host's /dev and a fresh /proc mounted in the root: the mounts end with the
/// command and are never seen outside it (so nothing is left mounted in the cache).
fn chroot_cmd(root: &Path, argv: &[&str]) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(
            "r=$1; shift; mount --rbind /dev \"$r/dev\" && mount -t proc proc \"$r/proc\" \
             && exec chroot \"$r\" \"$@\"",
        )
        .arg("outboard-chroot")
        .arg(root)
        .args(argv)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("LC_ALL", "C.UTF-8")
        .stdin(Stdio::null());
    cmd
}

/// Mount points at or under `dir`, from /proc/self/mountinfo.
fn mounts_under(dir: &Path) -> Vec<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let dir = dir.to_string_lossy();
    let dir = dir.trim_end_matches('/');
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| *m == dir || m.strip_prefix(dir).is_some_and(|r| r.starts_with('/')))
        .map(str::to_string)
        .collect()
}

/// Removes a root directory, refusing if anything is mounted in it (removing through a
/// bind mount of /dev would delete the host's device nodes).
fn remove_root(dir: &Path) -> Result<()> {
    let mounts = mounts_under(dir);
    if !mounts.is_empty() {
        return Err(format!(
            "{} has mounts in it ({}); unmount them first",
            dir.display(),
            mounts.join(", ")
        ));
    }
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("remove {}: {e}", dir.display())),
    }
}

/// The host's `Acquire::` settings the root's apt needs too: how it reaches the mirror
/// (proxies) and whether it checks the Release files' dates (a snapshot mirror's are
/// old), as `apt.conf` lines.
fn apt_acquire_lines(dump: &str) -> String {
    const KEEP: [&str; 4] = [
        "Acquire::Check-Valid-Until ",
        "Acquire::Check-Date ",
        "Acquire::http::Proxy",
        "Acquire::https::Proxy",
    ];
    dump.lines()
        .filter(|l| KEEP.iter().any(|k| l.starts_with(k)))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The installed version of `name` in the root's package database.
fn root_version(root: &Path, name: &str) -> Option<String> {
    packages::installed_version_in(Some(&root.join("var/lib/dpkg")), name)
}

/// The root's packages that are missing or too old, with their state.
fn root_missing(root: &Path) -> Vec<String> {
    ROOT_PACKAGES
        .iter()
        .filter_map(|p| match root_version(root, p.name) {
            Some(v)
                if p.min_version
                    .is_none_or(|m| packages::version_at_least(&v, m)) =>
            {
                None
            }
            Some(v) => Some(format!("{} {v} (too old)", p.name)),
            None => Some(format!("{} (not installed)", p.name)),
        })
        .collect()
}

/// Makes the trixie root in `dir` unless its stamp says it is complete: debootstrap
/// (minbase, the host's Debian mirror), trixie-backports added, [`ROOT_PACKAGES`]
/// installed without recommends, apt's cache cleaned.
fn ensure_root(dir: &Path) -> Result<Root> {
    let stamp = dir.join(ROOT_STAMP);
    if fs::read_to_string(&stamp).ok().as_deref() != Some(stamp_text().as_str()) {
        make_root(dir)?;
        fs::write(&stamp, stamp_text()).map_err(|e| format!("write {}: {e}", stamp.display()))?;
    }
    let kver = kernel_version(dir)?;
    Ok(Root {
        dir: dir.to_owned(),
        kver,
    })
}

fn make_root(dir: &Path) -> Result<()> {
    let apt_timeout = Duration::from_secs(1800);
    let mirror = packages::debian_mirror()
        .ok_or("no Debian mirror in /etc/apt to debootstrap the trixie root from")?;
    if !dir.join(DEBOOTSTRAP_STAMP).exists() {
        packages::ensure(&["debootstrap"])?;
        let tmp = dir.with_extension("tmp");
        remove_root(&tmp)?;
        remove_root(dir)?;
        if let Some(parent) = dir.parent() {
            fs::create_dir_all(parent).map_err(|e| format!("create {}: {e}", parent.display()))?;
        }
        println!("media-guest: debootstrap --variant=minbase {SUITE} from {mirror}");
        // debootstrap mounts /proc and /sys in the root; in a namespace of its own those
        // mounts cannot outlive it.
        util::run(
            Command::new("unshare")
                .args(["--mount", "--propagation", "private", "--"])
                .args(["debootstrap", "--variant=minbase", SUITE])
                .arg(&tmp)
                .arg(&mirror)
                .stdin(Stdio::null()),
            apt_timeout,
        )?;
        let done = tmp.join(DEBOOTSTRAP_STAMP);
        fs::write(&done, "").map_err(|e| format!("write {}: {e}", done.display()))?;
        fs::rename(&tmp, dir)
            .map_err(|e| format!("rename {} to {}: {e}", tmp.display(), dir.display()))?;
    }
    let write = |rel: &str, text: &str| -> Result<()> {
        let path = dir.join(rel);
        fs::write(&path, text).map_err(|e| format!("write {}: {e}", path.display()))
    };
    write(
        "etc/apt/sources.list.d/outboard-backports.list",
        &format!("deb {mirror} {BACKPORTS} main\n"),
    )?;
    let dump = output(
        Command::new("apt-config").args(["dump", "Acquire"]),
        Duration::from_secs(60),
    )?;
    write(
        "etc/apt/apt.conf.d/90outboard",
        &format!(
            "APT::Install-Recommends \"false\";\n{}",
            apt_acquire_lines(&dump)
        ),
    )?;
    // No service starts in the root.
    write("usr/sbin/policy-rc.d", "#!/bin/sh\nexit 101\n")?;
    let policy = dir.join("usr/sbin/policy-rc.d");
    fs::set_permissions(&policy, fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("chmod {}: {e}", policy.display()))?;
    // Documentation, manual pages and translations are not installed (disk).
    write(
        "etc/dpkg/dpkg.cfg.d/90outboard-nodoc",
        "path-exclude=/usr/share/doc/*\npath-exclude=/usr/share/man/*\n\
         path-exclude=/usr/share/locale/*\npath-exclude=/usr/share/info/*\n",
    )?;
    println!("media-guest: installing in the trixie root:");
    for p in ROOT_PACKAGES {
        let suite = if p.backports { BACKPORTS } else { SUITE };
        println!("  {:<20} {suite:<16} {}", p.name, p.why);
    }
    util::run(
        &mut chroot_cmd(dir, &["apt-get", "update", "-q"]),
        apt_timeout,
    )?;
    let install = |extra: &[&str], names: Vec<&str>| -> Result<()> {
        let mut argv = vec!["apt-get", "install", "-y", "-q", "--no-install-recommends"];
        argv.extend_from_slice(extra);
        argv.extend(names);
        // INITRD=No: the kernel's postinst hook makes no initramfs (the guest gets ours).
        util::run(chroot_cmd(dir, &argv).env("INITRD", "No"), apt_timeout)
    };
    install(
        &[],
        ROOT_PACKAGES
            .iter()
            .filter(|p| !p.backports)
            .map(|p| p.name)
            .collect(),
    )?;
    install(
        &["-t", BACKPORTS],
        ROOT_PACKAGES
            .iter()
            .filter(|p| p.backports)
            .map(|p| p.name)
            .collect(),
    )?;
    util::run(&mut chroot_cmd(dir, &["apt-get", "clean"]), apt_timeout)?;
    // The package lists (100 MiB) are fetched again by the next apt-get update.
    let lists = dir.join("var/lib/apt/lists");
    for entry in fs::read_dir(&lists)
        .map_err(|e| format!("read {}: {e}", lists.display()))?
        .flatten()
    {
        if entry.path().is_file() {
            let _ = fs::remove_file(entry.path());
        }
    }
    let missing = root_missing(dir);
    if !missing.is_empty() {
        return Err(format!(
            "after apt-get install in {}, still missing or too old: {}",
            dir.display(),
            missing.join(", ")
        ));
    }
    Ok(())
}

/// The version of the root's newest kernel that has its modules, its image and its
/// headers there.
pub fn kernel_version(root: &Path) -> Result<String> {
    let modules = root.join("usr/lib/modules");
    let mut found: Vec<String> = fs::read_dir(&modules)
        .map_err(|e| format!("read {}: {e}", modules.display()))?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|v| {
            root.join("boot").join(format!("vmlinuz-{v}")).is_file()
                && root
                    .join("usr/src")
                    .join(format!("linux-headers-{v}"))
                    .is_dir()
        })
        .collect();
    found.sort_by(|a, b| {
        if a == b {
            std::cmp::Ordering::Equal
        } else if packages::version_at_least(a, b) {
            std::cmp::Ordering::Greater
        } else {
            std::cmp::Ordering::Less
        }
    });
    found.pop().ok_or_else(|| {
        format!(
            "no kernel with image, modules and headers in {}",
            root.display()
        )
    })
}
/// FNV-1a (64 bits) over `bytes`, continuing from `h`: a hash that is the same on every
/// toolchain, for cache keys.
fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The FNV-1a offset basis.
const FNV_BASIS: u64 = 0xcbf2_9ce4_8422_2325;

/// The driver's source folder, `shared/guest-drivers/virtio-media`, found in this
/// order: `$OUTBOARD_GUEST_DRIVERS/virtio-media`; `../shared/guest-drivers` beside the
/// workspace (the project's layout, and CI's); the same beside the checkout a clone was
/// made from (`git remote get-url origin`, when it is a local path: a fresh clone in a
/// temporary directory has no `../shared` of its own).
fn driver_source() -> Result<PathBuf> {
    let root = util::workspace_root();
    let beside = |dir: &Path| dir.parent().map(|p| p.join("shared").join("guest-drivers"));
    let mut tried = Vec::new();
    if let Some(d) = std::env::var_os("OUTBOARD_GUEST_DRIVERS") {
        tried.push(PathBuf::from(d));
    }
    tried.extend(beside(&root));
    let origin = Command::new("git")
        .arg("-C")
        .arg(&root)
        .args(["remote", "get-url", "origin"])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .filter(|p| p.is_absolute());
    if let Some(origin) = origin {
        tried.extend(beside(&origin));
    }
    let found = tried
        .iter()
        .map(|d| d.join("virtio-media"))
        .find(|d| d.join("virtio_media_driver.c").is_file());
    found.ok_or_else(|| {
        format!(
            "the virtio-media guest driver's source is not in any of {tried:?} (set \
             OUTBOARD_GUEST_DRIVERS to the folder holding virtio-media/)"
        )
    })
}

/// The driver's files (name, contents), sorted by name.
fn driver_files(src: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(src).map_err(|e| format!("read {}: {e}", src.display()))? {
        let entry = entry.map_err(|e| format!("read {}: {e}", src.display()))?;
        let path = entry.path();
        if !path.is_file() {
            continue;
        }
        let name = entry
            .file_name()
            .into_string()
            .map_err(|n| format!("file name {n:?} in {} is not UTF-8", src.display()))?;
        let bytes = fs::read(&path).map_err(|e| format!("read {}: {e}", path.display()))?;
        files.push((name, bytes));
    }
    files.sort();
    if files.is_empty() {
        return Err(format!("no driver sources in {}", src.display()));
    }
    Ok(files)
}

/// The driver patches carried in the tree (`guest-patches/virtio-media/*.patch`, see
/// [`guest_patch`]), as (file name, contents), in the order they apply; an error if there
/// are none. `OUTBOARD_MEDIA_GUEST_UNPATCHED=1` builds the driver as shipped instead, to
/// show what the patches fix (the timestamp check fails then);
/// `OUTBOARD_MEDIA_GUEST_SKIP_PATCHES` leaves some out (see [`skip_patches`]).
fn driver_patches() -> Result<Vec<(String, Vec<u8>)>> {
    if std::env::var_os("OUTBOARD_MEDIA_GUEST_UNPATCHED").is_some_and(|v| v == "1") {
        println!(
            "media-guest: OUTBOARD_MEDIA_GUEST_UNPATCHED=1: the driver is built WITHOUT the \
             carried patches"
        );
        return Ok(Vec::new());
    }
    let dir = util::workspace_root().join("guest-patches/virtio-media");
    let found = guest_patch::patch_files(&dir)?;
    if found.is_empty() {
        return Err(format!(
            "no driver patches (*.patch) in {}: the driver is not built without them \
             (OUTBOARD_MEDIA_GUEST_UNPATCHED=1 builds it as shipped)",
            dir.display()
        ));
    }
    let skip = std::env::var("OUTBOARD_MEDIA_GUEST_SKIP_PATCHES").unwrap_or_default();
    skip_patches(found, &skip)?
        .into_iter()
        .map(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            fs::read(&p)
                .map(|b| (name, b))
                .map_err(|e| format!("read {}: {e}", p.display()))
        })
        .collect()
}

/// `patches` without those whose file name starts with one of the comma-separated
/// prefixes of `skip` (`OUTBOARD_MEDIA_GUEST_SKIP_PATCHES=0002`: the driver without one
/// fix, to show what its check catches, with the others still in); an error for a prefix
/// that names no patch.
fn skip_patches(patches: Vec<PathBuf>, skip: &str) -> Result<Vec<PathBuf>> {
    let name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let prefixes: Vec<&str> = skip
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if let Some(s) = prefixes
        .iter()
        .find(|s| !patches.iter().any(|p| name(p).starts_with(**s)))
    {
        return Err(format!(
            "OUTBOARD_MEDIA_GUEST_SKIP_PATCHES: no driver patch is named {s}*"
        ));
    }
    let (skipped, kept): (Vec<PathBuf>, Vec<PathBuf>) = patches
        .into_iter()
        .partition(|p| prefixes.iter().any(|s| name(p).starts_with(s)));
    for p in &skipped {
        println!(
            "media-guest: OUTBOARD_MEDIA_GUEST_SKIP_PATCHES: the driver is built WITHOUT {}",
            name(p)
        );
    }
    Ok(kept)
}

/// The folder of the upstream repository (github.com/chromeos/virtio-media) the patches'
/// paths start with; `../shared/guest-drivers/virtio-media` is its contents.
const PATCH_PREFIX: &str = "driver/";

/// The driver's id-table entry, and what a test build makes of it.
const ID_ENTRY: &str = "{ VIRTIO_ID_MEDIA, VIRTIO_DEV_ANY_ID }";

/// `virtio_media_driver.c` with its id table matching device id `id` instead of
/// `VIRTIO_ID_MEDIA`; an error unless the entry is there exactly once.
fn patch_id_table(source: &str, id: u32) -> Result<String> {
    match source.matches(ID_ENTRY).count() {
        1 => Ok(source.replace(ID_ENTRY, &format!("{{ {id}, VIRTIO_DEV_ANY_ID }}"))),
        n => Err(format!(
            "virtio_media_driver.c has {n} id-table entries {ID_ENTRY:?}, expected 1"
        )),
    }
}

/// Builds `virtio-media.ko` for the root's kernel (in the root, against its headers)
/// unless the cache has it for this kernel and these sources; returns its path.
fn ensure_driver(cache: &Path, root: &Root) -> Result<PathBuf> {
    let src = driver_source()?;
    let mut files = driver_files(&src)?;
    let patches = driver_patches()?;
    let mut h = fnv1a(FNV_BASIS, &VIRTIO_ID.to_le_bytes());
    for (name, bytes) in files.iter().chain(&patches) {
        h = fnv1a(h, name.as_bytes());
        h = fnv1a(h, &(bytes.len() as u64).to_le_bytes());
        h = fnv1a(h, bytes);
    }
    let ko = cache.join(format!(
        "virtio-media-{}-id{VIRTIO_ID}-{h:016x}.ko",
        root.kver
    ));
    if ko.is_file() {
        return Ok(ko);
    }
    // Every carried patch applies, or nothing is built.
    for (name, bytes) in &patches {
        let text = String::from_utf8_lossy(bytes);
        guest_patch::apply_to(&mut files, name, &text, PATCH_PREFIX)?;
    }
    let rel = format!("var/tmp/outboard-virtio-media-{}", std::process::id());
    let build = root.dir.join(&rel);
    let _ = fs::remove_dir_all(&build);
    fs::create_dir_all(&build).map_err(|e| format!("create {}: {e}", build.display()))?;
    for (name, bytes) in &files {
        let bytes = if name == "virtio_media_driver.c" {
            patch_id_table(&String::from_utf8_lossy(bytes), VIRTIO_ID)?.into_bytes()
        } else {
            bytes.clone()
        };
        let dst = build.join(name);
        fs::write(&dst, bytes).map_err(|e| format!("write {}: {e}", dst.display()))?;
    }
    let names: Vec<&str> = patches.iter().map(|(n, _)| n.as_str()).collect();
    println!(
        "media-guest: building virtio-media.ko (id table patched to {VIRTIO_ID}; patches: {}) \
         for {}",
        if names.is_empty() {
            "NONE".to_string()
        } else {
            names.join(", ")
        },
        root.kver
    );
    let kdir = format!("/usr/src/linux-headers-{}", root.kver);
    let m = format!("M=/{rel}");
    util::run(
        &mut chroot_cmd(&root.dir, &["make", "-s", "-C", &kdir, &m, "modules"]),
        Duration::from_secs(900),
    )?;
    fs::create_dir_all(cache).map_err(|e| format!("create {}: {e}", cache.display()))?;
    let built = build.join("virtio-media.ko");
    let tmp = ko.with_extension("tmp");
    fs::copy(&built, &tmp).map_err(|e| format!("copy {}: {e}", built.display()))?;
    fs::rename(&tmp, &ko).map_err(|e| format!("rename to {}: {e}", ko.display()))?;
    let _ = fs::remove_dir_all(&build);
    Ok(ko)
}

/// A module's name as the kernel knows it: its file name without `.ko` and a
/// compression suffix, `-` as `_`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// `modules.dep`: each module's path and the paths of the modules it needs.
fn parse_modules_dep(text: &str) -> BTreeMap<String, (String, Vec<String>)> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(path, deps)| {
            let deps = deps.split_whitespace().map(str::to_string).collect();
            (module_name(path), (path.trim().to_string(), deps))
        })
        .collect()
}

/// The module paths to load, dependencies first, for the modules `wanted`; a name that
/// is built in (`modules.builtin`) needs nothing.
fn load_order(
    dep: &BTreeMap<String, (String, Vec<String>)>,
    builtin: &BTreeSet<String>,
    wanted: &[String],
) -> Result<Vec<String>> {
    fn visit(
        name: &str,
        dep: &BTreeMap<String, (String, Vec<String>)>,
        builtin: &BTreeSet<String>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) -> Result<()> {
        if !seen.insert(name.to_string()) {
            return Ok(());
        }
        let Some((path, deps)) = dep.get(name) else {
            return if builtin.contains(name) {
                Ok(())
            } else {
                Err(format!(
                    "kernel module {name} is neither in modules.dep nor built in"
                ))
            };
        };
        for d in deps {
            visit(&module_name(d), dep, builtin, seen, order)?;
        }
        order.push(path.clone());
        Ok(())
    }
    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    for w in wanted {
        visit(&w.replace('-', "_"), dep, builtin, &mut seen, &mut order)?;
    }
    Ok(order)
}

/// The `depends=` list of a module file's `.modinfo` (uncompressed module bytes).
fn ko_depends(bytes: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    let Some(at) = bytes.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let rest = &bytes[at + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|d| !d.is_empty())
        .map(str::to_string)
        .collect()
}

/// The modules the guest loads, in order, as (name, uncompressed file): what the driver
/// needs from the root's kernel (decompressed into `out`), then the driver.
fn guest_modules(root: &Root, driver: &Path, out: &Path) -> Result<Vec<(String, PathBuf)>> {
    let ko = fs::read(driver).map_err(|e| format!("read {}: {e}", driver.display()))?;
    // The virtio PCI transport too, in case a kernel has it as a module.
    let mut wanted = vec!["virtio_pci".to_string()];
    // The root over virtio-9p, for the capture applications (media_clients).
    wanted.extend(["9p".to_string(), "9pnet_virtio".to_string()]);
    wanted.extend(ko_depends(&ko));
    let mut modules = root_modules(&root.dir, &root.kver, &wanted, out)?;
    modules.push(("virtio_media".to_string(), driver.to_owned()));
    Ok(modules)
}

/// The modules `wanted` of kernel `kver` in the root at `root` and those they need (from
/// `modules.dep`), in load order, as (name, uncompressed file): decompressed into `out`
/// (and kept there) by the root's own xz. A module that is built in needs nothing.
pub fn root_modules(
    root: &Path,
    kver: &str,
    wanted: &[String],
    out: &Path,
) -> Result<Vec<(String, PathBuf)>> {
    let base = root.join("usr/lib/modules").join(kver);
    let read = |name: &str| {
        let p = base.join(name);
        fs::read_to_string(&p).map_err(|e| format!("read {}: {e}", p.display()))
    };
    let dep = parse_modules_dep(&read("modules.dep")?);
    let builtin: BTreeSet<String> = read("modules.builtin")?.lines().map(module_name).collect();
    let order = load_order(&dep, &builtin, wanted)?;
    fs::create_dir_all(out).map_err(|e| format!("create {}: {e}", out.display()))?;
    let mut modules = Vec::new();
    for rel in order {
        let name = module_name(&rel);
        let file = out.join(format!("{name}.ko"));
        if !file.is_file() {
            let src = base.join(&rel);
            let tmp = file.with_extension("tmp");
            match src.extension().and_then(|e| e.to_str()) {
                // Unpacked by the root's own xz (one of its packages), not the host's.
                Some("xz") => {
                    let f = fs::File::create(&tmp)
                        .map_err(|e| format!("create {}: {e}", tmp.display()))?;
                    let inside = format!("/usr/lib/modules/{kver}/{rel}");
                    util::run(
                        chroot_cmd(root, &["xz", "-dc", &inside]).stdout(f),
                        Duration::from_secs(60),
                    )?;
                }
                Some(other @ ("zst" | "gz")) => {
                    return Err(format!(
                        "{}: .{other} modules are not handled (Debian's are .ko.xz)",
                        src.display()
                    ));
                }
                // Plain `.ko`.
                _ => {
                    fs::copy(&src, &tmp).map_err(|e| format!("copy {}: {e}", src.display()))?;
                }
            }
            fs::rename(&tmp, &file).map_err(|e| format!("rename to {}: {e}", file.display()))?;
        }
        modules.push((name, file));
    }
    Ok(modules)
}

/// `bin` (a path inside the root) and the libraries and dynamic loader it needs, as
/// (path in the guest, file on the host). `ldd` runs in the root; each file is read at
/// the path its symbolic links resolve to inside the root.
fn root_binary_files(root: &Path, bin: &str) -> Result<Vec<(String, PathBuf)>> {
    let ldd = output(
        &mut chroot_cmd(root, &["ldd", bin]),
        Duration::from_secs(60),
    )?;
    let mut paths = vec![bin.to_string()];
    paths.extend(
        parse_ldd(&ldd)
            .map_err(|e| format!("ldd {bin} in the root: {e}"))?
            .iter()
            .map(|p| p.to_string_lossy().into_owned()),
    );
    let mut argv = vec!["readlink", "-e", "--"];
    argv.extend(paths.iter().map(String::as_str));
    let real = output(&mut chroot_cmd(root, &argv), Duration::from_secs(60))?;
    let real: Vec<&str> = real.lines().collect();
    if real.len() != paths.len() {
        return Err(format!(
            "readlink in the root resolved {} of {paths:?}",
            real.len()
        ));
    }
    Ok(paths
        .iter()
        .zip(real)
        .map(|(guest, real)| (guest.clone(), root.join(real.trim_start_matches('/'))))
        .collect())
}

/// Builds `media-frame-check` statically and optimised (its own `--target` dir, so the
/// flags leave the workspace's debug build alone); returns its path.
fn build_frame_check() -> Result<PathBuf> {
    let triple = "x86_64-unknown-linux-gnu";
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args([
        "build",
        "-p",
        "outboard-tests",
        "--bin",
        "media-frame-check",
    ])
    // Release: the guest (TCG) checks every frame of the capture applications at
    // 1280x720, which the debug build needs about 2 s a frame for, and the THP step's
    // as they stream.
    .args(["--target", triple, "--release"])
    .env("RUSTFLAGS", "-C target-feature=+crt-static");
    util::run(&mut cmd, Duration::from_secs(1800))?;
    let bin = crate::target_dir()
        .join(triple)
        .join("release")
        .join("media-frame-check");
    if bin.exists() {
        Ok(bin)
    } else {
        Err(format!("cargo build left no {}", bin.display()))
    }
}

/// The guest's /init; `@MODES@` becomes the mode list, one `name:slot:fourcc:fourcc`
/// word per mode. Every line of a test's output goes to the console as
/// `mg <mode> <test>| <line>`, with `mg: T <uptime> <mode> <test>` marks between tests.
fn init() -> String {
    setup::init_with(
        &setup::Prelude {
            tag: "mg",
            before: "",
            tmp: Some("size=512m"),
            params: &[("virtio_media.ko", "allow_userptr=1")],
        },
        INIT_BODY,
    )
}

/// What [`init`] runs after the prelude.
const INIT_BODY: &str = r#"echo "mg: guest up, $(uname -r)"
mark() { echo "mg: T $(cut -d' ' -f1 /proc/uptime) $1"; }
ONLY="@ONLY@"
want() { case " $ONLY " in *" all "*|*" $1 "*) return 0 ;; esac; return 1; }
@CLIENT_SETUP@
@CLIENTS@
W=@WIDTH@
H=@HEIGHT@
N=@FRAMES@
TS_N=@TS_FRAMES@
MODES="@MODES@"
node_of() {
    for d in /sys/bus/pci/devices/0000:00:$1.0/virtio*/video4linux/video*; do
        [ -e "$d" ] && basename "$d" && return
    done
}
# --- THP step (THP_MODE in media_guest.rs): USERPTR frames while guest pages move ---
# THP forced on, khugepaged scanning without pause, every THP split again every 0.2 s
# (so that khugepaged keeps collapsing ranges into new huge pages) and memory compacted
# every 0.5 s, while a USERPTR capture streams into media-frame-check.
THP="@THP@"
thp_val() { sed 's/.*\[\(.*\)\].*/\1/' $1; }
thp_stat() { grep "^$1 " /proc/vmstat | cut -d' ' -f2; }
thp_step() {
    set -- $THP
    [ $1 = $mode ] || return 0
    fmt=$2 w=$3 h=$4 n=$5 bufs=$6 fps=$7
    mark "$mode thp"
    t=/sys/kernel/mm/transparent_hugepage
    k=$t/khugepaged
    saved="$(thp_val $t/enabled) $(thp_val $t/defrag) $(cat $k/scan_sleep_millisecs)"
    saved="$saved $(cat $k/alloc_sleep_millisecs) $(cat $k/pages_to_scan)"
    echo always > $t/enabled
    echo always > $t/defrag
    echo 0 > $k/scan_sleep_millisecs
    echo 0 > $k/alloc_sleep_millisecs
    echo 65536 > $k/pages_to_scan
    mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
    c0=$(thp_stat thp_collapse_alloc) m0=$(thp_stat pgmigrate_success)
    ( while :; do echo 1 > /sys/kernel/debug/split_huge_pages; sleep 0.2; done ) &
    split=$!
    ( while :; do echo 1 > /proc/sys/vm/compact_memory; sleep 0.5; done ) &
    compact=$!
    v4l2-ctl -d $dev --set-fmt-video=width=$w,height=$h,pixelformat=$fmt --set-parm=$fps \
        --stream-user=$bufs --stream-count=$n --stream-to=- 2>/tmp/$mode-thp.err \
        | media-frame-check --quiet --fourcc $fmt --width $w --height $h - 2>&1 \
        | sed "s/^/mg $mode thp| /"
    kill $split $compact
    wait $split $compact 2>/dev/null
    c=$(( $(thp_stat thp_collapse_alloc) - c0 )) m=$(( $(thp_stat pgmigrate_success) - m0 ))
    echo "mg $mode thp| churn collapses=$c migrations=$m"
    # A capture killed with its buffers queued: closing it must unpin them (mg: pins).
    v4l2-ctl -d $dev --stream-user=$bufs --stream-count=100000 >/dev/null 2>&1 &
    sleep 1
    kill -9 $!
    wait $! 2>/dev/null
    set -- $saved
    echo $1 > $t/enabled
    echo $2 > $t/defrag
    echo $3 > $k/scan_sleep_millisecs
    echo $4 > $k/alloc_sleep_millisecs
    echo $5 > $k/pages_to_scan
    tr '\r' '\n' < /tmp/$mode-thp.err | grep -v '^[<>]*$' | sed "s/^/mg $mode thp-ctl| /"
    rm -f /tmp/$mode-thp.err
}
# --- end of the THP step ---
run_mode() {
    mode=$1 slot=$2 fmt_mmap=$3 fmt_user=$4 hp=$5
    node=
    for i in 1 2 3 4 5 6 7 8 9 10; do
        node=$(node_of $slot)
        [ -n "$node" ] && break
        sleep 1
    done
    echo "mg: node $mode ${node:-none}"
    [ -n "$node" ] || return
    dev=/dev/$node
    if want compliance; then
    mark "$mode s10"
    v4l2-compliance -d $dev -s10 2>&1 | sed "s/^/mg $mode s10| /"
    mark "$mode s10f"
    v4l2-compliance -d $dev -s10 -f 2>&1 | sed "s/^/mg $mode s10f| /"
    fi
    want v4l2-ctl && for io in mmap user; do
        fmt=$fmt_mmap
        [ $io = user ] && fmt=$fmt_user
        mark "$mode $io"
        raw=/tmp/$mode-$io.raw
        v4l2-ctl -d $dev --set-fmt-video=width=$W,height=$H,pixelformat=$fmt \
            --stream-$io --stream-count=$N --stream-to=$raw 2>&1 | sed "s/^/mg $mode $io-ctl| /"
        media-frame-check --fourcc $fmt --width $W --height $H $raw 2>&1 \
            | sed "s/^/mg $mode $io| /"
        rm -f $raw
    done
    want clients && run_clients $mode $dev
    if want v4l2-ctl; then
    # Each buffer's timestamp against the guest's CLOCK_MONOTONIC when it is dequeued.
    mark "$mode ts"
    v4l2-ctl -d $dev --set-fmt-video=width=$W,height=$H,pixelformat=$fmt_mmap \
        --stream-mmap --stream-count=$TS_N --verbose --stream-show-delta-now 2>&1 \
        | sed "s/^/mg $mode ts| /"
    echo "mg $mode ts| uptime $(cut -d' ' -f1 /proc/uptime)"
    fi
    want thp && thp_step
    # Last: the device does not come back.
    case $mode in *-jail) want kill && kill_test $mode $dev $hp ;; esac
    mark "$mode done"
}
# A jailed worker killed under a streaming GStreamer: the client must end (or recover)
# within @KILL_LIMIT@ s, the next client must stream exact frames.
kill_test() {
    mode=$1 dev=$2 hp=$3
    p="mg $mode kill|"
    mark "$mode kill"
    inr env GST_DEBUG=v4l2src:2 gst-launch-1.0 v4l2src device=$dev num-buffers=1000000 \
        ! video/x-raw,format=YUY2,width=640,height=480,framerate=30/1 ! fakesink \
        > /tmp/$mode-kill.log 2>&1 &
    gst=$!
    sleep 4
    echo "$p killing at $(cut -d' ' -f1 /proc/uptime)"
    echo "mg: KILL $mode"
    i=0
    while kill -0 $gst 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
    if kill -0 $gst 2>/dev/null; then
        echo "$p client still running at $(cut -d' ' -f1 /proc/uptime)"
        kill -9 $gst
    else
        wait $gst
        echo "$p client ended at $(cut -d' ' -f1 /proc/uptime) exit $?"
    fi
    sed "s/^/$p log /" /tmp/$mode-kill.log | tail -20
    # The next open of the old node (v4l2-ctl: no start-up time of its own to speak of).
    mark "$mode kill-next"
    out=/tmp/$mode-next.raw
    echo "mg $mode kill-next| clock $(cut -d' ' -f1 /proc/uptime)"
    { timeout 60 v4l2-ctl -d $dev --stream-mmap --stream-count=1 --stream-to=$out; \
        echo "exit $?"; } 2>&1 | sed "s/^/mg $mode kill-next| /"
    echo "mg $mode kill-next| clock $(cut -d' ' -f1 /proc/uptime)"
    rm -f $out
    # The host plugs a new device, served by the replacement worker, into the mode's
    # PCIe root port.
    mark "$mode replug"
    new=
    i=0
    while [ -z "$new" ] && [ $i -lt 300 ]; do
        for d in /sys/bus/pci/devices/0000:00:$hp.0/0000:*/virtio*/video4linux/video*; do
            [ -e "$d" ] && new=$(basename "$d")
        done
        [ -n "$new" ] || { sleep 0.1; i=$((i + 1)); }
    done
    echo "mg $mode replug| node ${new:-none} at $(cut -d' ' -f1 /proc/uptime)"
    [ -n "$new" ] || return
    { timeout 60 inr gst-launch-1.0 v4l2src device=/dev/$new num-buffers=10 \
        ! video/x-raw,format=YUY2,width=640,height=480,framerate=30/1 ! filesink location=$out; \
        echo "exit $?"; } 2>&1 | sed "s/^/mg $mode replug| /"
    media-frame-check --fourcc YUYV --width 640 --height 480 $out 2>&1 | sed "s/^/mg $mode replug| /"
    rm -f $out
}
for spec in $MODES; do
    if [ @SERIAL@ = 1 ]; then
        run_mode $(echo $spec | tr : ' ')
    else
        run_mode $(echo $spec | tr : ' ') &
    fi
done
wait
# A device the guest binds without its shared memory BAR: MMAP must be refused (the
# driver as shipped maps guest-physical 0 plus the device's offset), USERPTR must work.
if want no-shm; then
    echo "mg: PLUG no-shm"
    node=
    for i in 1 2 3 4 5 6 7 8 9 10; do
        for d in /sys/bus/pci/devices/0000:00:@NO_SHM_PORT@.0/0000:*/virtio*/video4linux/video*; do
            [ -e "$d" ] && node=$(basename "$d")
        done
        [ -n "$node" ] && break
        sleep 1
    done
    echo "mg no-shm| node ${node:-none}"
    if [ -n "$node" ]; then
        dmesg | grep -i "shared memory region\|shm_region" | sed "s/^/mg no-shm| kernel: /"
        for io in mmap user; do
            mark "no-shm $io"
            out=/tmp/no-shm-$io.raw
            { v4l2-ctl -d /dev/$node --set-fmt-video=width=$W,height=$H,pixelformat=YUYV \
                --stream-$io --stream-count=$N --stream-to=$out; echo "exit $?"; } 2>&1 \
                | sed "s/^/mg no-shm $io| /"
            if [ -s $out ]; then
                media-frame-check --fourcc YUYV --width $W --height $H $out 2>&1 \
                    | sed "s/^/mg no-shm $io| /"
            else
                echo "mg no-shm $io| no frames"
            fi
            rm -f $out
        done
    fi
fi
# The per-CPU deltas of the counters folded in first: without, they are off by a few.
echo 1 > /proc/sys/vm/stat_refresh
echo "mg: pins $(grep -E '^nr_foll_pin_(acquired|released) ' /proc/vmstat | tr '\n' ' ')"
mark end
echo "mg: END"
poweroff -f
"#;

/// The groups of tests a run can be limited to (`OUTBOARD_MEDIA_GUEST_ONLY`):
/// v4l2-compliance, the v4l2-ctl captures and timestamps, the capture applications, the
/// THP step, the kill test of the jailed modes, the device without a shared memory BAR.
const GROUPS: [&str; 6] = ["compliance", "v4l2-ctl", "clients", "thp", "kill", "no-shm"];

/// The groups `OUTBOARD_MEDIA_GUEST_ONLY` names (words split by spaces or commas), or
/// every group.
fn only_groups(var: Option<&str>) -> Result<Vec<&'static str>> {
    let Some(var) = var.filter(|v| !v.trim().is_empty()) else {
        return Ok(GROUPS.to_vec());
    };
    var.split([' ', ','])
        .filter(|w| !w.is_empty())
        .map(|w| {
            GROUPS
                .iter()
                .find(|g| **g == w)
                .copied()
                .ok_or_else(|| format!("OUTBOARD_MEDIA_GUEST_ONLY: {w:?} is not one of {GROUPS:?}"))
        })
        .collect()
}

/// The guest's /init for `modes`, tested all at once, or one after another if `serial`,
/// with the test groups `only`.
fn init_script(modes: &[Mode], serial: bool, only: &[&str]) -> String {
    let client_modes: Vec<(&str, bool)> = modes.iter().map(|m| (m.name, m.mplane)).collect();
    let list: Vec<String> = modes
        .iter()
        .map(|m| {
            format!(
                "{}:{:02x}:{}:{}:{:02x}",
                m.name,
                m.slot,
                m.fourcc,
                m.fourcc_userptr,
                hotplug_slot(m)
            )
        })
        .collect();
    init()
        .replace("@MODES@", &list.join(" "))
        .replace("@WIDTH@", &CAPTURE_SIZE.0.to_string())
        .replace("@HEIGHT@", &CAPTURE_SIZE.1.to_string())
        .replace("@FRAMES@", &CAPTURE_FRAMES.to_string())
        .replace("@TS_FRAMES@", &TS_FRAMES.to_string())
        .replace("@SERIAL@", if serial { "1" } else { "0" })
        .replace("@ONLY@", &only.join(" "))
        .replace("@NO_SHM_PORT@", &format!("{:02x}", hotplug_slot(&NO_SHM)))
        .replace("@KILL_LIMIT@", &KILL_LIMIT_S.to_string())
        .replace(
            "@CLIENT_SETUP@",
            &format!(
                "if want clients || want kill; then\n{}fi",
                media_clients::GUEST_SETUP
            ),
        )
        .replace("@CLIENTS@", &media_clients::guest_function(&client_modes))
        .replace(
            "@THP@",
            &format!(
                "{THP_MODE} {THP_FOURCC} {} {} {THP_FRAMES} {THP_BUFFERS} {THP_FPS}",
                THP_SIZE.0, THP_SIZE.1
            ),
        )
}

/// The counts of a `Total for ...: T, Succeeded: S, Failed: F, Warnings: W` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Totals {
    total: u64,
    succeeded: u64,
    failed: u64,
    warnings: u64,
}

fn totals(line: &str) -> Option<Totals> {
    // "Total for <driver> device <node>: T, Succeeded: S, Failed: F, Warnings: W"
    let (_, counts) = line.strip_prefix("Total for ")?.split_once(": ")?;
    let mut fields = counts.split(", ");
    let total = fields.next()?.trim().parse().ok()?;
    let mut get = |name: &str| -> Option<u64> {
        fields
            .next()?
            .trim()
            .strip_prefix(name)?
            .trim()
            .parse()
            .ok()
    };
    Some(Totals {
        total,
        succeeded: get("Succeeded:")?,
        failed: get("Failed:")?,
        warnings: get("Warnings:")?,
    })
}

/// A frame check's result, from the console lines with its prefix.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Frames {
    /// `frames=` of the RESULT line (`None`: no RESULT line).
    pub(crate) frames: Option<u64>,
    /// `exact=` of the RESULT line.
    pub(crate) exact: u64,
    /// The FAIL lines.
    pub(crate) fails: Vec<String>,
}

/// The console lines that start with `prefix`, without it (one test's output).
pub(crate) fn prefixed<'a>(console: &'a str, prefix: &'a str) -> impl Iterator<Item = &'a str> {
    console.lines().filter_map(move |l| l.strip_prefix(prefix))
}

/// The `media-frame-check` result among the console lines with `prefix`.
pub(crate) fn frames(console: &str, prefix: &str) -> Frames {
    let mut f = Frames::default();
    for line in prefixed(console, prefix) {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("RESULT ") {
            let field = |name: &str| -> Option<u64> {
                rest.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .and_then(|v| v.parse().ok())
            };
            f.frames = field("frames=");
            f.exact = field("exact=").unwrap_or(0);
        } else if line.contains("FAIL") {
            f.fails.push(line.to_string());
        }
    }
    f
}

impl Frames {
    /// Every expected frame was checked and exact.
    fn ok(&self) -> bool {
        self.frames == Some(u64::from(CAPTURE_FRAMES))
            && self.exact == u64::from(CAPTURE_FRAMES)
            && self.fails.is_empty()
    }

    pub(crate) fn summary(&self) -> String {
        match self.frames {
            Some(n) => format!("{}/{n} exact", self.exact),
            None => "no result".into(),
        }
    }
}

/// A dequeued buffer's timestamp, from a `v4l2-ctl --verbose --stream-show-delta-now`
/// line: `cap dqbuf: 0 seq: 0 bytesused: 614400 ts: 31.882416 delta now: +4.105 ms
/// (ts-monotonic, ts-src-eof)`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Stamp {
    /// `ts:`, seconds.
    ts: f64,
    /// `delta now:`, the guest's `CLOCK_MONOTONIC` at DQBUF minus `ts`, milliseconds.
    delta_now_ms: f64,
    /// The buffer's flags say `ts-monotonic`.
    monotonic: bool,
}

fn stamp(line: &str) -> Option<Stamp> {
    if !line.contains("dqbuf:") {
        return None;
    }
    let value = |key: &str| -> Option<f64> {
        let at = line.find(key)? + key.len();
        line[at..].split_whitespace().next()?.parse().ok()
    };
    Some(Stamp {
        ts: value(" ts: ")?,
        delta_now_ms: value(" delta now: ")?,
        monotonic: line.contains("ts-monotonic"),
    })
}

/// The timestamp check of one mode, from the console lines with its prefix.
#[derive(Debug, Default)]
struct Stamps {
    stamps: Vec<Stamp>,
    /// Lines that name a dequeued buffer but do not parse.
    unparsed: Vec<String>,
}

fn stamps(console: &str, prefix: &str) -> Stamps {
    let mut s = Stamps::default();
    for line in prefixed(console, prefix) {
        match stamp(line) {
            Some(st) => s.stamps.push(st),
            None if line.contains("dqbuf:") => s.unparsed.push(line.trim().to_string()),
            None => {}
        }
    }
    s
}

impl Stamps {
    /// The largest distance from the guest's clock, milliseconds.
    fn worst_ms(&self) -> f64 {
        self.stamps
            .iter()
            .map(|s| s.delta_now_ms.abs())
            .fold(0.0, f64::max)
    }

    /// What is wrong, if anything: too few buffers, one not `ts-monotonic`, one more than
    /// [`TS_LIMIT_MS`] from the guest's clock, or time running backwards.
    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.stamps.len() != TS_FRAMES {
            p.push(format!(
                "{} buffers with a timestamp, expected {TS_FRAMES}",
                self.stamps.len()
            ));
        }
        p.extend(self.unparsed.iter().map(|l| format!("unparsed: {l}")));
        for (i, s) in self.stamps.iter().enumerate() {
            if !s.monotonic {
                p.push(format!("buffer {i}: not flagged ts-monotonic"));
            }
            if s.delta_now_ms.abs() >= TS_LIMIT_MS {
                p.push(format!(
                    "buffer {i}: ts {:.6} s minus the guest's CLOCK_MONOTONIC at DQBUF is \
                     {:+.3} s (limit {:.0} ms)",
                    s.ts,
                    -s.delta_now_ms / 1000.0,
                    TS_LIMIT_MS
                ));
            }
        }
        for (i, w) in self.stamps.windows(2).enumerate() {
            if w[1].ts < w[0].ts {
                p.push(format!(
                    "buffer {}: ts {:.6} s is before buffer {i}'s {:.6} s",
                    i + 1,
                    w[1].ts,
                    w[0].ts
                ));
            }
        }
        p
    }

    fn summary(&self) -> String {
        match self.stamps.first() {
            Some(first) => format!(
                "{} buffers, first ts {:.3} s, the guest's CLOCK_MONOTONIC at DQBUF minus \
                 ts {:+.1} ms, worst |{:.1}| ms",
                self.stamps.len(),
                first.ts,
                first.delta_now_ms,
                self.worst_ms()
            ),
            None => "no buffers".into(),
        }
    }
}

/// Prints the capture applications' runs of mode `m` (if the `clients` group ran);
/// returns whether every run passed.
fn client_summary(log: &str, m: &Mode, secs: &dyn Fn(String) -> String, only: &[&str]) -> bool {
    if !only.contains(&"clients") {
        return true;
    }
    let mut ok = true;
    for run in media_clients::runs(m.mplane) {
        let prefix = format!("mg {} {}| ", m.name, run.label);
        let o = media_clients::outcome(log, &prefix);
        let problems = o.problems(&run);
        ok &= problems.is_empty();
        let result = match run.expect {
            media_clients::Expect::Frames(_) => format!("frames {}", o.frames.summary()),
            media_clients::Expect::Rate => "sustained".to_string(),
            media_clients::Expect::Refused => format!(
                "refused, exit {:?}: {}",
                o.exit,
                prefixed(log, &prefix)
                    .find(|l| l.starts_with('['))
                    .unwrap_or("no message")
                    .trim()
            ),
        };
        let fps = o
            .fps(&run)
            .map_or(String::new(), |f| format!("  {f:.1} fps"));
        let clock = o.ffmpeg_clock().map_or(String::new(), |(started, lag)| {
            format!(
                "  pts: first {started:+.2} s after the start, last ends {lag:.2} s before the end"
            )
        });
        let lost = if o.lost > 0 {
            format!("  ({} frame(s) skipped: no buffer queued in time)", o.lost)
        } else {
            String::new()
        };
        println!(
            "  {:<12} {:<28} {:>5}  {result}{fps}{lost}{clock}  {}",
            m.name,
            run.what,
            secs(format!("{} {}", m.name, run.label)),
            if problems.is_empty() { "ok" } else { "FAIL" }
        );
        for p in &problems {
            println!("  {:<12}   {p}", "");
        }
        if !problems.is_empty() {
            for l in prefixed(log, &prefix)
                .filter(|l| !l.trim().is_empty())
                .take(15)
            {
                println!("  {:<12}   | {}", "", l.trim());
            }
        }
    }
    ok
}

/// The `no-shm` test: prints it; returns whether MMAP was refused (no frame written:
/// v4l2-ctl exits 0 even when it cannot map its buffers) and USERPTR streamed
/// [`CAPTURE_FRAMES`] exact frames.
fn no_shm_summary(log: &str) -> bool {
    let node = log
        .lines()
        .find_map(|l| l.strip_prefix("mg no-shm| node "))
        .map(str::trim)
        .filter(|n| *n != "none");
    let mmap = media_clients::outcome(log, "mg no-shm mmap| ");
    let user = media_clients::outcome(log, "mg no-shm user| ");
    let refused = log.lines().any(|l| l.trim() == "mg no-shm mmap| no frames");
    let want = u64::from(CAPTURE_FRAMES);
    let user_ok = user.frames.frames == Some(want) && user.frames.exact == want;
    println!(
        "  {:<12} MMAP without a shared memory BAR  {}  {}",
        NO_SHM.name,
        match (node, refused) {
            (None, _) => "no node".to_string(),
            (Some(_), true) => "refused: no frame".to_string(),
            (Some(_), false) => format!(
                "MAPPED: v4l2-ctl exit {:?}, frames {} (guest memory, not the device's)",
                mmap.exit,
                mmap.frames.summary()
            ),
        },
        if node.is_some() && refused {
            "ok"
        } else {
            "FAIL"
        }
    );
    println!(
        "  {:<12} USERPTR without it                frames {}  {}",
        NO_SHM.name,
        user.frames.summary(),
        if user_ok { "ok" } else { "FAIL" }
    );
    node.is_some() && refused && user_ok
}

/// The slot on the root bus of the PCIe root port the kill test plugs mode `m`'s new
/// device into (a device on the root bus of a q35 machine cannot be hot-plugged).
fn hotplug_slot(m: &Mode) -> u8 {
    m.slot + 8
}

/// Plugs a device for mode `m` into its root port, on a new connection to its daemon's
/// socket: `chardev-add`, then `device_add`. After the kill test's kill the replacement
/// worker accepts it, as a VMM's management would plug it after a worker's death.
fn replug(qmp: &mut Qmp, m: &Mode, run_rel: &str) -> Result<()> {
    let id = format!("re-{}", m.name);
    qmp.execute(&format!(
        r#"{{"execute":"chardev-add","arguments":{{"id":"{id}","backend":{{"type":"socket","data":{{"addr":{{"type":"unix","data":{{"path":"/{run_rel}/{}.sock"}}}},"server":false}}}}}}}}"#,
        m.name
    ))?;
    qmp.execute(&format!(
        r#"{{"execute":"device_add","arguments":{{"driver":"vhost-user-test-device-pci","id":"{id}","chardev":"{id}","virtio-id":{VIRTIO_ID},"num_vqs":2,"vq_size":128,"config_size":40,"bus":"hp-{}"}}}}"#,
        m.name
    ))?;
    Ok(())
}

/// How long a client streaming from a jailed worker that is killed may take to end.
const KILL_LIMIT_S: f64 = 10.0;
/// Frames the client on the re-plugged device captures, all exact.
const REPLUG_FRAMES: u64 = 10;
/// How long the next client may take to be refused by the device the kill broke.
const REFUSE_AFTER_KILL_S: f64 = 2.0;

/// The kill test of a jailed mode: prints it; returns whether it passed (the host
/// killed the worker, the streaming client ended within [`KILL_LIMIT_S`], the next
/// client was refused within [`REFUSE_AFTER_KILL_S`]).
fn kill_summary(log: &str, m: &Mode, killed: bool) -> bool {
    let p = format!("mg {} kill| ", m.name);
    let lines: Vec<&str> = prefixed(log, &p).collect();
    let at = |key: &str| -> Option<f64> {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|r| r.split_whitespace().next()?.parse().ok())
    };
    let kill = at("killing at ");
    let ended = at("client ended at ");
    let still = at("client still running at ");
    let took = kill.zip(ended).map(|(k, e)| e - k);
    let client_ok = killed && took.is_some_and(|t| t <= KILL_LIMIT_S);
    let np = format!("mg {} kill-next| ", m.name);
    let next = media_clients::outcome(log, &np);
    let next_took = next.took_s();
    let next_ok =
        next.exit.is_some_and(|e| e != 0) && next_took.is_some_and(|t| t <= REFUSE_AFTER_KILL_S);
    println!(
        "  {:<12} worker killed under GStreamer  client {}  {}",
        m.name,
        match (took, still) {
            (Some(t), _) => format!("ended {t:.1} s after the kill"),
            (None, Some(s)) => format!(
                "still streaming {:.1} s after the kill",
                kill.map_or(f64::NAN, |k| s - k)
            ),
            _ if !killed => "no kill (the host found no worker)".into(),
            _ => "no result".into(),
        },
        if client_ok { "ok" } else { "FAIL" }
    );
    let said = prefixed(log, &np)
        .find(|l| !l.starts_with("clock ") && !l.starts_with("exit "))
        .unwrap_or("")
        .trim();
    println!(
        "  {:<12} next client                    {}  {}",
        m.name,
        match (next.exit, next_took) {
            (Some(e), Some(t)) => format!("exit {e} after {t:.1} s: {said}"),
            _ => "no result".into(),
        },
        if next_ok {
            "ok (refused: the device stays down, see README)"
        } else {
            "FAIL"
        }
    );
    if !client_ok {
        for l in lines.iter().take(25) {
            println!("  {:<12}   | {}", "", l.trim());
        }
    }
    let rp = format!("mg {} replug| ", m.name);
    let node = prefixed(log, &rp)
        .find_map(|l| l.strip_prefix("node "))
        .and_then(|l| l.split_whitespace().next())
        .filter(|n| *n != "none");
    let re = media_clients::outcome(log, &rp);
    let replug_ok = node.is_some()
        && re.exit == Some(0)
        && re.frames.frames == Some(REPLUG_FRAMES)
        && re.frames.exact == REPLUG_FRAMES;
    println!(
        "  {:<12} re-plugged device              {}  {}",
        m.name,
        match node {
            Some(n) => format!("{n}: frames {}, exit {:?}", re.frames.summary(), re.exit),
            None => "never appeared".into(),
        },
        if replug_ok { "ok" } else { "FAIL" }
    );
    if !replug_ok {
        for l in prefixed(log, &rp).take(15) {
            println!("  {:<12}   | {}", "", l.trim());
        }
    }
    client_ok && next_ok && replug_ok
}

/// The pids of the children of `pid` (all its threads).
fn children(pid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for task in fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let s = fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(s.split_whitespace().filter_map(|c| c.parse::<i32>().ok()));
    }
    out
}

/// The jailed worker of daemon `pid`: the daemon's child is the pid-namespace relay,
/// the worker is the relay's only child.
fn jailed_worker(pid: u32) -> Option<i32> {
    let relay = *children(pid).first()?;
    children(u32::try_from(relay).ok()?).first().copied()
}

/// The churn line of the THP step: THP collapses and page migrations during its capture.
fn churn(console: &str, prefix: &str) -> Option<(u64, u64)> {
    prefixed(console, prefix).find_map(|l| {
        let rest = l.trim().strip_prefix("churn ")?;
        let field = |name: &str| -> Option<u64> {
            rest.split_whitespace()
                .find_map(|w| w.strip_prefix(name))?
                .parse()
                .ok()
        };
        Some((field("collapses=")?, field("migrations=")?))
    })
}

/// Prints the THP step's summary line (`took`: its time) and, if it failed, why; whether
/// it passed: all [`THP_FRAMES`] frames checked and exact, and guest pages did move
/// meanwhile (else the step tested nothing). How many vary with the load: 1 to 91
/// collapses and 160 to 13,600 migrations in 12 runs.
fn thp_report(console: &str, took: &str) -> bool {
    let prefix = format!("mg {THP_MODE} thp| ");
    let f = frames(console, &prefix);
    let churn = churn(console, &prefix);
    let n = u64::from(THP_FRAMES);
    let pass = f.frames == Some(n)
        && f.exact == n
        && f.fails.is_empty()
        && churn.is_some_and(|(c, m)| c + m > 0);
    println!(
        "  {THP_MODE:<12} THP churn USERPTR {THP_FOURCC} {}x{} {took:>5}  frames {}, {}  {}",
        THP_SIZE.0,
        THP_SIZE.1,
        f.summary(),
        match churn {
            Some((c, m)) => format!("{c} THP collapses and {m} page migrations meanwhile"),
            None => "no churn line".into(),
        },
        if pass { "ok" } else { "FAIL" }
    );
    if !pass {
        // The first few bad frames (they come in runs) or what killed the checker (the
        // device writing into its heap aborts it: "double free or corruption").
        for l in prefixed(console, &prefix)
            .map(str::trim)
            .filter(|l| !l.starts_with("RESULT ") && !l.starts_with("churn "))
            .take(8)
        {
            println!("  {:<12}   {l}", "");
        }
        let ctl = format!("mg {THP_MODE} thp-ctl| ");
        for l in prefixed(console, &ctl) {
            println!("  {:<12}   v4l2-ctl: {}", "", l.trim());
        }
    }
    pass
}

/// The guest's `FOLL_PIN` counts once every capture has ended (the `mg: pins` line of
/// `/proc/vmstat`'s `nr_foll_pin_acquired` and `nr_foll_pin_released`): (pinned,
/// unpinned) user pages, the USERPTR buffers' and controls' since boot.
fn pins(console: &str) -> Option<(u64, u64)> {
    let line = console
        .lines()
        .find_map(|l| l.trim().strip_prefix("mg: pins "))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let get = |name: &str| -> Option<u64> {
        let at = words.iter().position(|w| *w == name)?;
        words.get(at + 1)?.parse().ok()
    };
    Some((get("nr_foll_pin_acquired")?, get("nr_foll_pin_released")?))
}

/// Prints the pin balance; whether every pinned page was unpinned (the driver pins the
/// pages of a USERPTR buffer from QBUF until the device returns it, or until STREAMOFF,
/// REQBUFS or close: no path may leave one pinned).
fn pins_report(console: &str) -> bool {
    let p = pins(console);
    let pass = p.is_some_and(|(pinned, unpinned)| pinned == unpinned);
    println!(
        "  {:<12} {}  {}",
        "pins",
        match p {
            Some((pinned, unpinned)) => format!(
                "{pinned} user pages pinned (FOLL_PIN) since boot, {unpinned} unpinned once \
                 every capture had ended"
            ),
            None => "no pin counts".into(),
        },
        if pass { "ok" } else { "FAIL" }
    );
    pass
}

/// Lines of a daemon log that report a worker killed or ended: a seccomp kill
/// (`SIGSYS`, signal 31) or the daemon's worker-exit report (`worker pid N <how>`).
fn worker_trouble(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| {
            let lower = l.to_ascii_lowercase();
            lower.contains("sigsys")
                || lower.contains("signal 31")
                || lower.contains("seccomp")
                || lower.contains("worker pid ")
        })
        .map(str::to_string)
        .collect()
}

/// The warning and error lines of a daemon log (`env_logger`'s ` WARN ` and ` ERROR `
/// levels). A clean run has none: v4l2-compliance's deliberate misuse is answered with
/// errnos, not logged, so a line here is the daemon or its front-end going wrong (e.g. a
/// failed `SHMEM_MAP`).
fn warnings(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .map(str::to_string)
        .collect()
}

/// Seconds from the mark `label` to the next mark of the same mode.
fn took(marks: &[(f64, String)], label: &str) -> Option<f64> {
    let i = marks.iter().position(|(_, l)| l == label)?;
    let mode = label.split(' ').next()?;
    let next = marks[i + 1..]
        .iter()
        .find(|(_, l)| l.split(' ').next() == Some(mode) || l == "end")?;
    Some(next.0 - marks[i].0)
}

/// The trixie root (made if needed, cached under the e2e cache): `media-compliance`
/// runs its v4l2-compliance (1.30) on the host too, through the root's own dynamic
/// loader.
pub fn trixie_root() -> Result<PathBuf> {
    ensure_root(&setup::cache_dir().join("trixie-root")).map(|r| r.dir)
}

/// Runs everything; returns whether every check passed.
pub fn run() -> Result<bool> {
    let started = Instant::now();
    let serial = std::env::var_os("OUTBOARD_MEDIA_GUEST_SERIAL").is_some_and(|v| v == "1");
    let only = only_groups(std::env::var("OUTBOARD_MEDIA_GUEST_ONLY").ok().as_deref())?;
    let cache = setup::cache_dir();
    let own = cache.join("media-guest");
    fs::create_dir_all(&own).map_err(|e| format!("create {}: {e}", own.display()))?;
    let root = ensure_root(&cache.join("trixie-root"))?;
    let root_time = started.elapsed();
    println!(
        "media-guest: trixie root ready ({:.0}s): kernel {}, {:.2} GiB",
        root_time.as_secs_f64(),
        root.kver,
        crate::gib(crate::disk_usage(&root.dir))
    );
    let driver = ensure_driver(&own, &root)?;
    let modules = guest_modules(&root, &driver, &own.join(format!("modules-{}", root.kver)))?;
    let check = build_frame_check()?;
    let outboard = crate::build_outboard(false)?;
    let mut files: Vec<(String, PathBuf)> = vec![("media-frame-check".into(), check)];
    for tool in ["v4l2-compliance", "v4l2-ctl"] {
        let bin = format!("/usr/bin/{tool}");
        let mut found = root_binary_files(&root.dir, &bin)?;
        let (_, host) = found.remove(0);
        files.push((tool.to_string(), host));
        files.extend(found);
    }
    files.sort();
    files.dedup();
    let files: Vec<(&str, &Path)> = files
        .iter()
        .map(|(n, p)| (n.as_str(), p.as_path()))
        .collect();
    let run_rel = format!("{RUN_DIR}-{}", std::process::id());
    let run_dir = root.dir.join(&run_rel);
    remove_root(&run_dir)?;
    fs::create_dir_all(&run_dir).map_err(|e| format!("create {}: {e}", run_dir.display()))?;
    setup::build_initramfs_with(
        &run_dir,
        "initramfs.cpio.gz",
        &root.dir.join("usr/bin/busybox"),
        &init_script(&MODES, serial, &only),
        &files,
        &modules,
    )?;
    let prepared = started.elapsed();

    let logs = own.join("logs");
    let _ = fs::remove_dir_all(&logs);
    fs::create_dir_all(&logs).map_err(|e| format!("create {}: {e}", logs.display()))?;
    let mut daemons = Vec::new();
    let mut devices: Vec<&Mode> = MODES.iter().collect();
    if only.contains(&"no-shm") {
        devices.push(&NO_SHM);
    }
    for &m in &devices {
        let sock = run_dir.join(format!("{}.sock", m.name));
        let mut cmd = Command::new(&outboard);
        cmd.arg("media")
            .arg("--socket-path")
            .arg(&sock)
            .arg("--camera");
        if m.mplane {
            cmd.arg("--mplane");
        }
        if m.jail {
            cmd.arg("--jail");
        }
        let log = logs.join(format!("{}.log", m.name));
        daemons.push((m, Proc::spawn(m.name, cmd, &log)?, log, sock));
    }
    for (m, proc, log, sock) in &mut daemons {
        if !util::wait_for_path(sock, Duration::from_secs(10)) || !proc.running() {
            return Err(format!(
                "outboard media ({}) made no socket {}:\n{}",
                m.name,
                sock.display(),
                util::read_log(log)
            ));
        }
    }

    let mut argv: Vec<String> = [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-cpu",
        // An AMD CPU (TCG's `max` is one) makes QEMU reserve [1012 GiB, 1 TiB) in the
        // e820 map, where the firmware puts the 64-bit windows of the kill test's
        // root ports; Linux allocates nothing there, so a hot-plugged device would get
        // no shared memory BAR.
        "max,vendor=GenuineIntel",
        "-smp",
        "2",
        "-m",
        "2G",
        "-object",
        "memory-backend-memfd,id=mem,size=2G,share=on",
        // The root, read-only, for the capture applications (media_clients).
        "-fsdev",
        "local,id=root,path=/,security_model=none,readonly=on",
        "-device",
        "virtio-9p-pci,fsdev=root,mount_tag=root",
        "-machine",
        "q35,memory-backend=mem",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
    ]
    .map(String::from)
    .to_vec();
    let kill = only.contains(&"kill");
    argv.push(format!("file:/{run_rel}/console.log"));
    argv.push("-kernel".into());
    argv.push(format!("/boot/vmlinuz-{}", root.kver));
    argv.push("-initrd".into());
    argv.push(format!("/{run_rel}/initramfs.cpio.gz"));
    argv.push("-append".into());
    // oops=panic: a guest kernel that oopses (a device writing into freed memory, as the
    // THP step's unpatched driver lets it) powers off at once instead of hanging until
    // the timeout.
    argv.push("console=ttyS0 panic=-1 oops=panic quiet loglevel=3".into());
    let no_shm = only.contains(&"no-shm");
    if kill || no_shm {
        argv.push("-qmp".into());
        argv.push(format!("unix:/{run_rel}/qmp.sock,server=on,wait=off"));
    }
    for (i, m) in devices.iter().enumerate() {
        if m.name == NO_SHM.name {
            // Plugged once QEMU runs, into a port with the default windows.
            argv.push("-device".into());
            argv.push(format!(
                "pcie-root-port,id=hp-{},chassis={},slot={},bus=pcie.0,addr=0x{:02x}",
                m.name,
                i + 1,
                i + 1,
                hotplug_slot(m)
            ));
            continue;
        }
        if kill && m.jail {
            argv.push("-device".into());
            argv.push(format!(
                // The firmware sizes an empty port's windows from these hints: the
                // device's shared memory BAR (the daemons' default 256 MiB) must fit.
                "pcie-root-port,id=hp-{},chassis={},slot={},bus=pcie.0,addr=0x{:02x},\
                 pref64-reserve=512M",
                m.name,
                i + 1,
                i + 1,
                hotplug_slot(m)
            ));
        }
        argv.push("-chardev".into());
        argv.push(format!("socket,id=c{i},path=/{run_rel}/{}.sock", m.name));
        argv.push("-device".into());
        argv.push(format!(
            "vhost-user-test-device-pci,chardev=c{i},virtio-id={VIRTIO_ID},num_vqs=2,\
             vq_size=128,config_size=40,addr=0x{:02x}",
            m.slot
        ));
    }
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    println!(
        "media-guest: booting {} under QEMU (TCG) with {} virtio-media devices, tested {}",
        root.kver,
        devices.len(),
        if serial {
            "one after another"
        } else {
            "at once"
        }
    );
    let boot = Instant::now();
    let console = run_dir.join("console.log");
    let qemu_log = logs.join("qemu.log");
    let mut qemu = Proc::spawn("qemu", chroot_cmd(&root.dir, &argv), &qemu_log)?;
    let deadline = Instant::now() + GUEST_TIMEOUT;
    let mut killed = BTreeSet::new();
    let mut qmp = if kill || no_shm {
        Some(Qmp::connect(
            &run_dir.join("qmp.sock"),
            Duration::from_secs(30),
        )?)
    } else {
        None
    };
    let mut plugged = false;
    while Instant::now() < deadline {
        let log = util::read_log(&console);
        // Plugged once the guest runs (before, the firmware could enumerate it and size
        // the port's windows for it).
        if !plugged && log.lines().any(|l| l.trim() == "mg: PLUG no-shm") {
            plugged = true;
            if let Some(q) = qmp.as_mut() {
                match replug(q, &NO_SHM, &run_rel) {
                    Ok(()) => println!("media-guest: plugged the no-shm device"),
                    Err(e) => println!("media-guest: plugging the no-shm device: {e}"),
                }
            }
        }
        for l in log.lines() {
            let Some(name) = l.trim().strip_prefix("mg: KILL ") else {
                continue;
            };
            if !killed.insert(name.to_string()) {
                continue;
            }
            if let Some((m, proc, _, _)) = daemons.iter().find(|(m, ..)| m.name == name) {
                let Some(w) = jailed_worker(proc.pid()) else {
                    println!("media-guest: {name} has no jailed worker to kill");
                    continue;
                };
                // SAFETY: kill(2) of a process of our own daemon, by pid.
                let r = unsafe { libc::kill(w, libc::SIGKILL) };
                println!("media-guest: killed {name}'s worker (pid {w}): {r}");
                let replaced = Instant::now() + Duration::from_secs(10);
                while jailed_worker(proc.pid()).is_none_or(|n| n == w) && Instant::now() < replaced
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                if let Some(q) = qmp.as_mut() {
                    match replug(q, m, &run_rel) {
                        Ok(()) => println!("media-guest: plugged a new {name} device"),
                        Err(e) => println!("media-guest: re-plugging {name}: {e}"),
                    }
                }
            }
        }
        if log.lines().any(|l| l.trim() == "mg: END") || !qemu.running() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let guest_time = boot.elapsed();
    let _ = qemu.terminate(Duration::from_secs(10));
    let log = util::read_log(&console);
    let _ = fs::copy(&console, logs.join("console.log"));
    let ended = log.lines().any(|l| l.trim() == "mg: END");

    let mut ok = ended;
    if !ended {
        println!(
            "media-guest: the guest stopped without its end mark after {:.0}s (limit {GUEST_TIMEOUT:?}; console: {}, QEMU: {})",
            guest_time.as_secs_f64(),
            logs.join("console.log").display(),
            qemu_log.display(),
        );
        // The kernel's words about the driver, an oops or a panic, and QEMU's last.
        const KEYS: [&str; 8] = [
            "virtio",
            "BUG",
            "Oops",
            "panic",
            "RIP:",
            "timed out",
            "error",
            "failed",
        ];
        let kernel: Vec<&str> = log
            .lines()
            .filter(|l| l.starts_with('[') && KEYS.iter().any(|k| l.contains(k)))
            .collect();
        for l in &kernel[kernel.len().saturating_sub(30)..] {
            println!("  {l}");
        }
        let qemu_text = util::read_log(&qemu_log);
        let qemu_lines: Vec<&str> = qemu_text.lines().collect();
        for l in &qemu_lines[qemu_lines.len().saturating_sub(10)..] {
            println!("  qemu: {l}");
        }
    }
    for line in log
        .lines()
        .filter(|l| l.starts_with("mg: ") && !l.starts_with("mg: T "))
    {
        println!("  {}", line.trim());
    }
    let marks = media_e2e::marks(&log, "mg: T ");
    let secs = |label: String| took(&marks, &label).map_or("?".to_string(), |t| format!("{t:.0}s"));
    println!("media-guest: summary");
    for m in &MODES {
        let compliance: &[(&str, &str)] = if only.contains(&"compliance") {
            &[("s10", "-s10"), ("s10f", "-s10 -f")]
        } else {
            &[]
        };
        for &(test, what) in compliance {
            let r: Report = report(&log, &format!("mg {} {test}| ", m.name));
            let t = r.total.as_deref().and_then(totals);
            let pass = r.failed == Some(0) && t.is_some_and(|t| t.failed == 0);
            ok &= pass;
            println!(
                "  {:<12} v4l2-compliance {:<8} {:>5}  {}  {}",
                m.name,
                what,
                secs(format!("{} {test}", m.name)),
                match t {
                    Some(t) => format!(
                        "Total {}, Succeeded {}, Failed {}, Warnings {}",
                        t.total, t.succeeded, t.failed, t.warnings
                    ),
                    None => "no totals".into(),
                },
                if pass { "ok" } else { "FAIL" }
            );
            for f in crate::media_e2e::counted(&r.failing) {
                println!("  {:<12}   FAIL {f}", "");
            }
            // A detail line may follow a progress line without a newline.
            let details: Vec<String> = r
                .details
                .iter()
                .map(|d| d.find("fail:").map_or(d.as_str(), |i| &d[i..]).to_string())
                .collect();
            for d in crate::media_e2e::counted(&details) {
                println!("  {:<12}   {d}", "");
            }
        }
        ok &= client_summary(&log, m, &secs, &only);
        if m.jail && only.contains(&"kill") {
            ok &= kill_summary(&log, m, killed.contains(m.name));
        }
        if only.contains(&"thp") && m.name == THP_MODE {
            ok &= thp_report(&log, &secs(format!("{THP_MODE} thp")));
        }
        if !only.contains(&"v4l2-ctl") {
            continue;
        }
        for (io, what) in [("mmap", "MMAP"), ("user", "USERPTR")] {
            let f = frames(&log, &format!("mg {} {io}| ", m.name));
            let pass = f.ok();
            ok &= pass;
            let fmt = if io == "mmap" {
                m.fourcc
            } else {
                m.fourcc_userptr
            };
            println!(
                "  {:<12} v4l2-ctl {:<7} {fmt} {:>5}  frames {}  {}",
                m.name,
                what,
                secs(format!("{} {io}", m.name)),
                f.summary(),
                if pass { "ok" } else { "FAIL" }
            );
            if !pass {
                for l in &f.fails {
                    println!("  {:<12}   {l}", "");
                }
                let prefix = format!("mg {} {io}-ctl| ", m.name);
                for l in prefixed(&log, &prefix) {
                    println!("  {:<12}   v4l2-ctl: {}", "", l.trim());
                }
            }
        }
        let prefix = format!("mg {} ts| ", m.name);
        let st = stamps(&log, &prefix);
        let problems = st.problems();
        ok &= problems.is_empty();
        println!(
            "  {:<12} timestamps       {:>5}  {}  {}",
            m.name,
            secs(format!("{} ts", m.name)),
            st.summary(),
            if problems.is_empty() { "ok" } else { "FAIL" }
        );
        for p in problems.iter().take(4) {
            println!("  {:<12}   {p}", "");
        }
        if st.stamps.is_empty() {
            for l in prefixed(&log, &prefix).take(20) {
                println!("  {:<12}   v4l2-ctl: {}", "", l.trim());
            }
        }
    }
    if only.contains(&"no-shm") {
        ok &= no_shm_summary(&log);
    }
    ok &= pins_report(&log);
    for (m, proc, log, _) in &mut daemons {
        let alive = proc.running();
        let stopped = proc.terminate(Duration::from_secs(5));
        let text = util::read_log(log);
        let mut trouble = worker_trouble(&text);
        let mut warned = warnings(&text);
        // The kill test's own kill, once.
        if killed.contains(m.name) {
            for lines in [&mut trouble, &mut warned] {
                if let Some(i) = lines.iter().position(|l| l.contains("SIGKILL")) {
                    lines.remove(i);
                }
            }
        }
        let clean = alive
            && trouble.is_empty()
            && warned.is_empty()
            && matches!(&stopped, Ok(s) if s.success());
        ok &= clean;
        println!(
            "  {:<12} daemon{}: {}",
            m.name,
            if m.jail { " (--jail)" } else { "" },
            if clean {
                "no worker killed or ended, no warning, clean exit on SIGTERM".to_string()
            } else {
                format!(
                    "FAIL (running until the end: {alive}, exit: {stopped:?}, {} warnings, log {})",
                    warned.len(),
                    log.display()
                )
            }
        );
        for t in &trouble {
            println!("  {:<12}   {t}", "");
        }
        // The first few: a failure tends to repeat.
        for w in warned.iter().filter(|w| !trouble.contains(w)).take(8) {
            println!("  {:<12}   {w}", "");
        }
    }
    // The daemons have ended: nothing of this run is needed in the root any more.
    let _ = remove_root(&run_dir);
    println!(
        "media-guest: {}{} in {:.0}s (root {:.0}s, driver, modules, builds and initramfs {:.0}s, guest {:.0}s)",
        if ok { "passed" } else { "FAILED" },
        if only.len() < GROUPS.len() {
            format!(" (only {}: OUTBOARD_MEDIA_GUEST_ONLY)", only.join(", "))
        } else {
            String::new()
        },
        started.elapsed().as_secs_f64(),
        root_time.as_secs_f64(),
        (prepared - root_time).as_secs_f64(),
        guest_time.as_secs_f64()
    );
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_table_is_patched_once_or_not_at_all() {
        let src = "static struct virtio_device_id id_table[] = {\n\t{ VIRTIO_ID_MEDIA, VIRTIO_DEV_ANY_ID },\n\t{ 0 },\n};\n";
        let patched = patch_id_table(src, 38).unwrap();
        assert!(patched.contains("\t{ 38, VIRTIO_DEV_ANY_ID },\n"));
        assert!(!patched.contains("VIRTIO_ID_MEDIA"));
        // A driver whose table changed must not build silently unpatched.
        assert!(patch_id_table("{ 48, VIRTIO_DEV_ANY_ID }", 38).is_err());
        assert!(patch_id_table(&src.repeat(2), 38).is_err());
    }

    #[test]
    fn the_carried_patches_apply_to_the_driver() {
        // The driver is third-party code beside the workspace; without it there is
        // nothing to check (media-guest itself then fails to find it).
        let Ok(src) = driver_source() else {
            return;
        };
        let shipped = driver_files(&src).unwrap();
        let mut files = shipped.clone();
        let patches = driver_patches().unwrap();
        for (name, bytes) in &patches {
            guest_patch::apply_to(
                &mut files,
                name,
                &String::from_utf8_lossy(bytes),
                PATCH_PREFIX,
            )
            .unwrap();
        }
        let (_, c) = files
            .iter()
            .find(|(n, _)| n == "virtio_media_driver.c")
            .unwrap();
        let c = String::from_utf8_lossy(c).into_owned();
        assert!(c.contains("v4l2_buffer_set_timestamp(&dqbuf->buffer, ktime_get_ns());"));
        // 0002: USERPTR pages stay pinned until the device returns the buffer.
        let (_, sb) = files
            .iter()
            .find(|(n, _)| n == "scatterlist_builder.c")
            .unwrap();
        let sb = String::from_utf8_lossy(sb);
        assert!(sb.contains("FOLL_WRITE | FOLL_LONGTERM") && !sb.contains("vb2_destroy_framevec"));
        assert!(c.contains("virtio_media_unpin(pinned, V4L2_TYPE_IS_CAPTURE(queue_type));"));
        // Applying twice is refused, not a silent no-op.
        for (name, bytes) in &patches {
            assert!(guest_patch::apply_to(
                &mut files,
                name,
                &String::from_utf8_lossy(bytes),
                PATCH_PREFIX
            )
            .is_err());
        }
        assert!(patch_id_table(&c, VIRTIO_ID).is_ok());
    }

    #[test]
    fn patches_are_skipped_by_name_prefix() {
        let all: Vec<PathBuf> = ["p/0001-a.patch", "p/0002-b.patch", "p/0003-c.patch"]
            .map(PathBuf::from)
            .to_vec();
        assert_eq!(skip_patches(all.clone(), "").unwrap(), all);
        assert_eq!(
            skip_patches(all.clone(), "0002").unwrap(),
            [all[0].clone(), all[2].clone()]
        );
        assert_eq!(
            skip_patches(all.clone(), " 0001, 0003-c ").unwrap(),
            [all[1].clone()]
        );
        // A prefix that names nothing is a typo, not a silent full build.
        let e = skip_patches(all, "0002,0004").unwrap_err();
        assert!(e.contains("0004"), "{e}");
    }

    #[test]
    fn modules_load_dependencies_first_and_skip_built_ins() {
        let dep = parse_modules_dep(
            "kernel/drivers/media/v4l2-core/videodev.ko.xz: kernel/drivers/media/mc/mc.ko.xz\n\
             kernel/drivers/media/mc/mc.ko.xz:\n\
             kernel/drivers/media/common/videobuf2/videobuf2-v4l2.ko.xz: \
             kernel/drivers/media/common/videobuf2/videobuf2-common.ko.xz \
             kernel/drivers/media/v4l2-core/videodev.ko.xz kernel/drivers/media/mc/mc.ko.xz\n\
             kernel/drivers/media/common/videobuf2/videobuf2-common.ko.xz: \
             kernel/drivers/media/mc/mc.ko.xz\n",
        );
        assert_eq!(dep.len(), 4);
        let builtin: BTreeSet<String> = ["virtio_pci".to_string()].into();
        let order = load_order(
            &dep,
            &builtin,
            &[
                "virtio_pci".into(),
                "videobuf2-v4l2".into(),
                "videodev".into(),
            ],
        )
        .unwrap();
        assert_eq!(
            order,
            [
                "kernel/drivers/media/mc/mc.ko.xz",
                "kernel/drivers/media/common/videobuf2/videobuf2-common.ko.xz",
                "kernel/drivers/media/v4l2-core/videodev.ko.xz",
                "kernel/drivers/media/common/videobuf2/videobuf2-v4l2.ko.xz",
            ]
        );
        assert!(load_order(&dep, &builtin, &["vivid".into()]).is_err());
        assert_eq!(
            module_name("kernel/a/videobuf2-dma-sg.ko.zst"),
            "videobuf2_dma_sg"
        );
        assert_eq!(module_name("videodev.ko"), "videodev");
    }

    #[test]
    fn module_dependencies_come_from_modinfo() {
        let ko = b"\x7fELF....\0license=GPL\0depends=videobuf2-v4l2,videodev,videobuf2-common\0vermagic=7.3\0";
        assert_eq!(
            ko_depends(ko),
            ["videobuf2-v4l2", "videodev", "videobuf2-common"]
        );
        assert!(ko_depends(b"\0depends=\0").is_empty());
        assert!(ko_depends(b"no modinfo").is_empty());
    }

    #[test]
    fn compliance_totals_and_frame_results_are_parsed() {
        assert_eq!(
            totals("Total for virtio-media device /dev/video1: 59, Succeeded: 56, Failed: 3, Warnings: 1"),
            Some(Totals {
                total: 59,
                succeeded: 56,
                failed: 3,
                warnings: 1
            })
        );
        assert_eq!(totals("Total for x: 59, Succeeded: 56"), None);
        let console = "mg sp mmap| frame 0: sequence 3 exact\n\
            mg sp mmap| RESULT frames=8 exact=8 bytes=4915200\n\
            mg sp user| frame 0: FAIL sequence 4: 1 bytes differ, the first at offset 9\n\
            mg sp user| RESULT frames=8 exact=7 bytes=4915200\n";
        let mmap = frames(console, "mg sp mmap| ");
        assert_eq!(mmap.frames, Some(8));
        assert!(mmap.ok());
        let user = frames(console, "mg sp user| ");
        assert!(!user.ok());
        assert_eq!(user.fails.len(), 1);
        // No RESULT line (the checker never ran) is a failure.
        assert!(!frames(console, "mg mplane mmap| ").ok());
        assert_eq!(frames(console, "mg mplane mmap| ").summary(), "no result");
    }

    #[test]
    fn the_thp_step_needs_every_frame_exact_and_pages_moving() {
        let result = |exact: u32, churn: &str| {
            format!(
                "mg sp thp| RESULT frames={THP_FRAMES} exact={exact} bytes=1\nmg sp thp| {churn}\n"
            )
        };
        let good = result(THP_FRAMES, "churn collapses=28 migrations=17049");
        assert_eq!(churn(&good, "mg sp thp| "), Some((28, 17049)));
        assert!(thp_report(&good, "15s"));
        let bad = format!(
            "mg sp thp| frame 7: FAIL sequence 0: 153600 bytes differ, the first at offset 0\n{}",
            result(THP_FRAMES - 1, "churn collapses=7 migrations=0")
        );
        assert!(!thp_report(&bad, "15s"));
        // Migrations alone are churn; exact frames without any tested nothing; no result
        // (a crashed guest) fails.
        assert!(thp_report(
            &result(THP_FRAMES, "churn collapses=0 migrations=9"),
            "15s"
        ));
        assert!(!thp_report(
            &result(THP_FRAMES, "churn collapses=0 migrations=0"),
            "15s"
        ));
        assert!(!thp_report(
            "mg sp thp| churn collapses=3 migrations=9\n",
            "?"
        ));
        assert_eq!(churn("mg sp thp| churn collapses=3\n", "mg sp thp| "), None);
    }

    #[test]
    fn every_pinned_page_is_unpinned_at_the_end() {
        assert_eq!(
            pins("mg: pins nr_foll_pin_acquired 81920 nr_foll_pin_released 81920 \n"),
            Some((81920, 81920))
        );
        assert!(pins_report(
            "mg: pins nr_foll_pin_acquired 7 nr_foll_pin_released 7\n"
        ));
        assert!(!pins_report(
            "mg: pins nr_foll_pin_acquired 45 nr_foll_pin_released 7\n"
        ));
        assert!(!pins_report("mg: END\n"));
    }

    #[test]
    fn buffer_timestamps_are_checked_against_the_guests_clock() {
        let line = |i: usize, ts: f64, now: f64| {
            format!(
                "mg sp ts| cap dqbuf: {i} seq: {i:6} bytesused: 614400 ts: {ts:.6} delta: 33.3 ms \
                 delta now: {now:+.3} ms fps: 30.00 (ts-monotonic, ts-src-eof)\n"
            )
        };
        let good: String = (0..TS_FRAMES)
            .map(|i| line(i, 31.5 + i as f64 / 30.0, 4.0 + i as f64))
            .collect();
        let st = stamps(&good, "mg sp ts| ");
        assert_eq!(st.stamps.len(), TS_FRAMES);
        assert_eq!(st.stamps[0].ts, 31.5);
        assert_eq!(st.stamps[0].delta_now_ms, 4.0);
        assert!(st.problems().is_empty(), "{:?}", st.problems());
        assert_eq!(st.worst_ms(), 13.0);
        // Host time in a guest up for 31 s: 22786 s, 22754 s from the guest's clock.
        let host: String = (0..TS_FRAMES)
            .map(|i| line(i, 22786.25 + i as f64 / 30.0, -22_754_750.0))
            .collect();
        let p = stamps(&host, "mg sp ts| ").problems();
        assert_eq!(p.len(), TS_FRAMES, "{p:?}");
        assert!(
            p[0].contains("22786.250000") && p[0].contains("+22754.750 s"),
            "{}",
            p[0]
        );
        // Too few buffers, a buffer not monotonic, time running backwards.
        let short = line(0, 2.0, 1.0) + &line(1, 1.0, 1.0).replace("ts-monotonic", "ts-copy");
        let p = stamps(&short, "mg sp ts| ").problems();
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(stamps("", "mg sp ts| ").problems()[0].starts_with("0 buffers"));
        // A buffer line without `delta now` is a problem, not a silent skip.
        let odd = "mg sp ts| cap dqbuf: 0 seq: 0 bytesused: 1 ts: 1.0 (ts-monotonic)\n";
        assert!(stamps(odd, "mg sp ts| ")
            .problems()
            .iter()
            .any(|p| p.starts_with("unparsed")));
    }

    #[test]
    fn worker_deaths_are_found_in_a_daemon_log() {
        let clean = "[.. INFO  outboard::jailed] media camera: worker runs jailed, pid 22361\n\
            [.. INFO  outboard_vmm_glue::vhost_user::daemon] media camera: front-end connected\n";
        assert!(worker_trouble(clean).is_empty());
        let killed = "[.. ERROR outboard::jailed] media camera: worker pid 7 killed by signal 31 \
            (SIGSYS: a system call outside the seccomp policy); starting a new one\n\
            [.. ERROR outboard::jailed] media camera: worker pid 8 exited with code 70\n";
        assert_eq!(worker_trouble(killed).len(), 2);
        assert_eq!(worker_trouble("audit: SECCOMP denied\n").len(), 1);
        let warned = "[2026-12-05T03:21:06Z WARN  outboard_vmm_glue::vhost_user::media] media: SHMEM_UNMAP at 0x96000 failed\n\
            [2026-12-05T03:21:06Z INFO  outboard_vmm_glue::vhost_user::media] fine\n";
        assert_eq!(warnings(warned).len(), 1);
        assert!(warnings(clean).is_empty());
    }

    #[test]
    fn marks_time_each_test_of_a_mode() {
        let console = "mg: T 10.0 sp s10\nmg: T 11.0 mplane s10\nmg: T 19.5 sp s10f\n\
            mg: T 30.0 mplane done\nmg: T 40.0 sp done\nmg: T 41.0 end\n";
        let m = media_e2e::marks(console, "mg: T ");
        assert_eq!(took(&m, "sp s10"), Some(9.5));
        assert_eq!(took(&m, "mplane s10"), Some(19.0));
        assert_eq!(took(&m, "sp done"), Some(1.0));
        assert_eq!(took(&m, "sp user"), None);
    }

    #[test]
    fn the_init_script_names_every_mode_and_its_slot() {
        let init = init_script(&MODES, false, &GROUPS);
        assert!(init.contains("MODES=\"sp:10:YUYV:RGB3:18 mplane:11:NM12:YM12:19 "));
        assert!(init.contains("W=640\nH=480\nN=8\nTS_N=10\n"));
        assert!(init.contains("--stream-show-delta-now"));
        assert!(init.contains("THP=\"sp YUYV 320 240 900 32 60\""));
        assert!(init.contains("if [ 0 = 1 ]"));
        // Every @PLACEHOLDER@ is filled (a shell's "$@" is not one).
        assert!(
            !init
                .split('@')
                .skip(1)
                .any(|w| w.starts_with(|c: char| c.is_ascii_uppercase())),
            "{init}"
        );
        assert!(init.contains("ONLY=\"compliance v4l2-ctl clients thp kill no-shm\""));
        assert!(init.contains("/sys/bus/pci/devices/0000:00:1c.0/0000:*/virtio*"));
        assert!(init.contains("kill_test() {"));
        assert!(init.contains("echo \"mg: KILL $mode\""));
        assert!(init.contains("run_clients() {"));
        assert!(init_script(&MODES, true, &GROUPS).contains("if [ 1 = 1 ]"));
    }

    #[test]
    fn the_kill_test_needs_the_client_ended_in_time_and_the_next_refused_at_once() {
        let m = &MODES[2];
        assert!(m.jail);
        let pass = "\
mg sp-jail kill| killing at 10.57
mg sp-jail kill| client ended at 17.00 exit 1
mg sp-jail kill-next| clock 17.10
mg sp-jail kill-next| Failed to open /dev/video2: Input/output error
mg sp-jail kill-next| exit 255
mg sp-jail kill-next| clock 17.50
";
        assert!(!kill_summary(pass, m, true), "no re-plugged device");
        let pass = format!(
            "{pass}mg sp-jail replug| node video4 at 19.2\nmg sp-jail replug| exit 0\n\
             mg sp-jail replug| RESULT frames=10 exact=10 bytes=6144000\n"
        );
        let pass = pass.as_str();
        assert!(kill_summary(pass, m, true));
        let bad = pass.replace("exact=10", "exact=9");
        assert!(!kill_summary(&bad, m, true));
        // The host found no worker to kill.
        assert!(!kill_summary(pass, m, false));
        let hung = pass.replace(
            "client ended at 17.00 exit 1",
            "client still running at 40.6",
        );
        assert!(!kill_summary(&hung, m, true));
        let late = pass.replace("client ended at 17.00", "client ended at 21.00");
        assert!(!kill_summary(&late, m, true));
        // The next open waited out a command timeout.
        let slow = pass.replace("clock 17.50", "clock 22.50");
        assert!(!kill_summary(&slow, m, true));
    }

    #[test]
    fn a_run_can_be_limited_to_named_groups_only() {
        assert_eq!(only_groups(None).unwrap(), GROUPS);
        assert_eq!(only_groups(Some(" ")).unwrap(), GROUPS);
        assert_eq!(
            only_groups(Some("clients,compliance")).unwrap(),
            ["clients", "compliance"]
        );
        assert!(only_groups(Some("client"))
            .unwrap_err()
            .contains("\"client\""));
    }

    #[test]
    fn apt_gets_the_hosts_acquire_settings_that_matter() {
        let dump = "Acquire::Languages \"none\";\nAcquire::Check-Valid-Until \"false\";\n\
            Acquire::http::Proxy \"http://p:3128\";\nAcquire::Check-Date \"false\";\n";
        assert_eq!(
            apt_acquire_lines(dump),
            "Acquire::Check-Valid-Until \"false\";\nAcquire::http::Proxy \"http://p:3128\";\n\
             Acquire::Check-Date \"false\";\n"
        );
    }

    #[test]
    fn fnv1a_is_the_reference_function() {
        assert_eq!(fnv1a(FNV_BASIS, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_BASIS, b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn the_stamp_lists_every_package() {
        let s = stamp_text();
        for p in ROOT_PACKAGES {
            assert!(s.contains(p.name), "{}", p.name);
        }
        assert!(s.contains("qemu-system-x86 trixie-backports >= 1:11.1"));
    }
}
