//! The Debian packages the project installs: one list, checked against the package
//! database (`dpkg-query`), installed with `apt-get` by package name.
//!
//! Files are never used to decide whether something is installed: a file name can be
//! shipped by another package (the first fresh-machine CI failure was `libclang-cpp14`'s
//! `libclang-cpp.so.14` taken for `libclang-dev`'s `libclang.so`).
//!
//! To return a machine to its fresh state, purge exactly this list (`cargo xtask
//! packages` prints it) and remove `target/`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::util::{run, Result};

/// Where a package comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Suite {
    /// The machine's own release.
    Release,
    /// `<codename>-backports` on bookworm (the release itself elsewhere), at least
    /// `min_version`.
    Backports {
        /// The oldest acceptable version (`dpkg --compare-versions` syntax).
        min_version: &'static str,
    },
}

/// A Debian package the build or the tests need.
pub struct Package {
    /// The Debian package name.
    pub name: &'static str,
    /// Which suite it is installed from.
    pub suite: Suite,
    /// Who needs it.
    pub why: &'static str,
}

/// Every Debian package the project installs. gcc and libc6-dev are on a fresh machine
/// already; they are listed because the build needs them and the check is free.
pub const PACKAGES: &[Package] = &[
    Package {
        name: "gcc",
        suite: Suite::Release,
        why: "build scripts; the static guest agents",
    },
    Package {
        name: "libc6-dev",
        suite: Suite::Release,
        why: "static guest agents",
    },
    Package {
        name: "libclang-dev",
        suite: Suite::Release,
        why: "bindgen in v4l2r (feature v4l2-proxy, built by --all-features)",
    },
    Package {
        name: "qemu-system-x86",
        suite: Suite::Backports {
            min_version: "1:10.0",
        },
        why: "e2e, media-e2e, demo: QEMU >= 10 with vhost-user-vsock-pci",
    },
    Package {
        name: "systemd",
        suite: Suite::Release,
        why: "systemd-socket-activate: outboard's socket activation and sd_notify test",
    },
    Package {
        name: "linux-perf",
        suite: Suite::Release,
        why: "bench-e2e: the back-end's system calls per GiB (perf stat)",
    },
    Package {
        name: "busybox-static",
        suite: Suite::Release,
        why: "the guests' initramfs",
    },
    Package {
        name: "xz-utils",
        suite: Suite::Release,
        why: "vsock-suite: tools/testing/vsock from the linux-source tarball (.tar.xz)",
    },
    Package {
        name: "v4l-utils",
        suite: Suite::Release,
        why: "v4l2-compliance in media-compliance and media-e2e",
    },
    Package {
        name: "gcc-aarch64-linux-gnu",
        suite: Suite::Release,
        why: "aarch64: cross linker; bindgen finds the aarch64 headers through it",
    },
    Package {
        name: "libc6-dev-arm64-cross",
        suite: Suite::Release,
        why: "aarch64: glibc and kernel headers to link against and to run under qemu-user",
    },
    Package {
        name: "qemu-user",
        suite: Suite::Backports {
            min_version: "1:10.0",
        },
        why: "aarch64: qemu-aarch64 (static) runs the aarch64 tests; 7.2 fails unknown ioctls",
    },
    Package {
        name: "debootstrap",
        suite: Suite::Release,
        why: "media-guest: the trixie root (QEMU 11.1, the guest kernel and its headers)",
    },
];

/// Prints the list, one package a line, with its state on this machine.
pub fn print_list() {
    println!("==> Debian packages the project installs (checked with dpkg-query):");
    for p in PACKAGES {
        let state = match installed_version(p.name) {
            Some(v) if satisfied(p, &v) => format!("installed {v}"),
            Some(v) => format!("installed {v}, too old"),
            None => "missing".to_string(),
        };
        let from = match p.suite {
            Suite::Release => String::new(),
            Suite::Backports { min_version } => format!(" (>= {min_version}, backports)"),
        };
        println!("  {:<16} {:<28} {}{from}", p.name, state, p.why);
    }
}

/// The installed version of `name`, if the package database says it is installed.
pub fn installed_version(name: &str) -> Option<String> {
    installed_version_in(None, name)
}

/// [`installed_version`] in the package database at `admindir` (another root's
/// `var/lib/dpkg`), or this machine's for `None`.
pub fn installed_version_in(admindir: Option<&Path>, name: &str) -> Option<String> {
    let mut cmd = Command::new("dpkg-query");
    if let Some(dir) = admindir {
        cmd.arg(format!("--admindir={}", dir.display()));
    }
    let out = cmd
        .args(["-W", "-f", "${db:Status-Status} ${Version}", name])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let (status, version) = text.trim().split_once(' ')?;
    (status == "installed" && !version.is_empty()).then(|| version.to_string())
}

/// Whether `a >= b` by dpkg's version order.
pub fn version_at_least(a: &str, b: &str) -> bool {
    Command::new("dpkg")
        .args(["--compare-versions", a, "ge", b])
        .status()
        .is_ok_and(|s| s.success())
}

fn satisfied(p: &Package, version: &str) -> bool {
    match p.suite {
        Suite::Release => true,
        Suite::Backports { min_version } => version_at_least(version, min_version),
    }
}

/// The packages of `names` (all of [`PACKAGES`] when empty) that are missing or too old.
fn missing<'a>(names: &[&str]) -> Vec<&'a Package> {
    PACKAGES
        .iter()
        .filter(|p| names.is_empty() || names.contains(&p.name))
        .filter(|p| !installed_version(p.name).is_some_and(|v| satisfied(p, &v)))
        .collect()
}

/// Installs the packages named (each must be in [`PACKAGES`]) that the package database
/// does not show installed at a good version. An empty `names` means all of them.
pub fn ensure(names: &[&str]) -> Result<()> {
    for n in names {
        if !PACKAGES.iter().any(|p| p.name == *n) {
            return Err(format!("xtask: {n} is not in the project's package list"));
        }
    }
    let todo = missing(names);
    if todo.is_empty() {
        return Ok(());
    }
    let list: Vec<&str> = todo.iter().map(|p| p.name).collect();
    println!("packages: installing {}", list.join(" "));
    let codename = os_codename();
    let backports = format!("{codename}-backports");
    let apt_timeout = Duration::from_secs(900);
    let needs_backports = codename == "bookworm"
        && todo
            .iter()
            .any(|p| matches!(p.suite, Suite::Backports { .. }));
    if needs_backports {
        add_backports(&backports)?;
    }
    run(Command::new("apt-get").args(["update", "-q"]), apt_timeout)?;
    let install = |args: &[&str]| {
        run(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive"),
            apt_timeout,
        )
    };
    let (from_backports, from_release): (Vec<&Package>, Vec<&Package>) = todo
        .iter()
        .partition(|p| codename == "bookworm" && matches!(p.suite, Suite::Backports { .. }));
    if !from_release.is_empty() {
        let names: Vec<&str> = from_release.iter().map(|p| p.name).collect();
        install(&names)?;
    }
    if !from_backports.is_empty() {
        let mut args = vec!["-t", backports.as_str()];
        args.extend(from_backports.iter().map(|p| p.name));
        install(&args)?;
    }
    let still = missing(&list);
    if still.is_empty() {
        Ok(())
    } else {
        let names: Vec<String> = still
            .iter()
            .map(|p| match installed_version(p.name) {
                Some(v) => format!("{} ({v})", p.name),
                None => format!("{} (not installed)", p.name),
            })
            .collect();
        Err(format!(
            "after apt-get install, still missing or too old: {}",
            names.join(", ")
        ))
    }
}

/// The machine's release codename from /etc/os-release.
pub fn os_codename() -> String {
    let text = fs::read_to_string("/etc/os-release").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_default()
}

/// Whether an apt source names `what`.
pub fn apt_sources_mention(what: &str) -> bool {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(dir.flatten().map(|e| e.path()));
    }
    files
        .iter()
        .any(|f| fs::read_to_string(f).is_ok_and(|t| t.contains(what)))
}

/// The apt source file the project adds for backports.
pub const BACKPORTS_LIST: &str = "/etc/apt/sources.list.d/outboard-e2e-backports.list";

/// Adds `<suite>` (e.g. bookworm-backports) from the machine's own mirror unless a
/// source names it already. The caller runs `apt-get update`.
pub fn add_backports(suite: &str) -> Result<bool> {
    if apt_sources_mention(suite) {
        return Ok(false);
    }
    let mirror = debian_mirror()
        .ok_or_else(|| format!("no Debian mirror in /etc/apt to add {suite} from"))?;
    fs::write(BACKPORTS_LIST, format!("deb {mirror} {suite} main\n"))
        .map_err(|e| format!("write {BACKPORTS_LIST} (are you root?): {e}"))?;
    Ok(true)
}

/// The machine's own Debian mirror: the first URI of its main Debian sources
/// (deb822 `URIs:` in `debian.sources`, or a one-line `deb URI suite` entry), so that
/// backports come from wherever this machine already gets its packages.
pub fn debian_mirror() -> Option<String> {
    let deb822 = fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    let from_deb822 = deb822
        .lines()
        .find_map(|l| l.strip_prefix("URIs:"))
        .and_then(|uris| uris.split_whitespace().next());
    if let Some(uri) = from_deb822 {
        return Some(uri.to_string());
    }
    let list = fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    list.lines()
        .map(str::split_whitespace)
        .find_map(|mut words| {
            (words.next() == Some("deb"))
                .then(|| words.next())
                .flatten()
        })
        .map(str::to_string)
}
