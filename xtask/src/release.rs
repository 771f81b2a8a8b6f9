//! Release checks: the declared `rust-version` builds, and every publishable crate
//! packages and builds from its own tarball.
//!
//! - `cargo xtask msrv`: installs the toolchain named by `rust-version` in the root
//!   Cargo.toml (`rustup toolchain install <v> --profile minimal`, idempotent) and runs
//!   `cargo +<v> check` on the library crates and the `outboard` binary with their
//!   default features and with `--no-default-features`. Dev-dependencies (criterion,
//!   proptest, vhost's uuid) need newer compilers and are not part of what a user
//!   builds, so tests and benches are not checked with it.
//! - `cargo xtask publish-check`: `cargo publish --workspace --dry-run`, which packages
//!   every crate that is not `publish = false` in dependency order and builds each from
//!   its packaged sources, resolving the not-yet-published Outboard crates from the
//!   tarballs it just made (nothing is uploaded).

use std::fs;
use std::process::Command;
use std::time::Duration;

use crate::util::{self, run, Result};

/// The library crates a user can depend on, in dependency order.
pub const LIBRARY_CRATES: &[&str] = &[
    "outboard-protocol",
    "outboard-transport",
    "outboard-devices",
    "outboard-sandbox",
    "outboard-vmm-glue",
];

/// `rust-version` from `[workspace.package]` of the root Cargo.toml.
fn declared_rust_version() -> Result<String> {
    let path = util::workspace_root().join("Cargo.toml");
    let text = fs::read_to_string(&path).map_err(|e| format!("read {}: {e}", path.display()))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("rust-version"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_string())
        .find(|v| !v.is_empty())
        .ok_or_else(|| format!("no rust-version = \"...\" in {}", path.display()))
}

/// `cargo xtask msrv`.
pub fn msrv() -> Result<bool> {
    let version = declared_rust_version()?;
    println!("msrv: declared rust-version {version}");
    run(
        Command::new("rustup").args(["toolchain", "install", &version, "--profile", "minimal"]),
        Duration::from_secs(900),
    )?;
    // A target directory of its own: another compiler's artifacts would only evict ours.
    let target = util::workspace_root().join("target").join("msrv");
    // Every feature too (v4l2-proxy's bindgen needs the media deps' videodev2.h).
    let headers = crate::setup::ensure_media_deps(&crate::setup::cache_dir().join("media-deps"))?;
    let mut ok = true;
    for extra in [
        &[][..],
        &["--no-default-features"][..],
        &["--all-features"][..],
    ] {
        // `rustup run`: a `cargo +<v>` inside `cargo xtask` could still find the stable
        // toolchain through the environment cargo sets for its children.
        let mut cmd = Command::new("rustup");
        cmd.args(["run", &version, "cargo", "check"]);
        for c in LIBRARY_CRATES {
            cmd.args(["-p", c]);
        }
        cmd.args(["--lib", "--bins"])
            .args(extra)
            .env("CARGO_TARGET_DIR", &target)
            .env("V4L2R_VIDEODEV2_H_PATH", &headers)
            // The stable toolchain's environment must not leak into the old one.
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTC")
            .env_remove("RUSTDOC")
            .env_remove("CARGO");
        match run(&mut cmd, Duration::from_secs(1800)) {
            Ok(()) => println!("msrv: cargo +{version} check {} ok", extra.join(" ")),
            Err(e) => {
                eprintln!("msrv: {e}");
                ok = false;
            }
        }
    }
    Ok(ok)
}

/// Phrases of cargo's errors that say the registry could not be reached, not that a
/// package is wrong.
const NETWORK_TROUBLE: &[&str] = &[
    "failed to get successful HTTP response",
    "spurious network error",
    "Couldn't resolve host",
    "Could not resolve host",
    "failed to download",
    "Timeout was reached",
    "timed out",
    "Connection reset",
    "Connection refused",
    "SSL connect error",
    "failed to query replaced source registry",
];

/// The first line of `lines` that reports network trouble, if any.
fn network_trouble(lines: &[String]) -> Option<&str> {
    lines
        .iter()
        .find(|l| NETWORK_TROUBLE.iter().any(|p| l.contains(p)))
        .map(String::as_str)
}

/// Removes what earlier publish checks unpacked of Outboard's own crates into cargo's
/// home: `cargo publish` serves the crates it packages from a temporary local registry
/// and unpacks them under `$CARGO_HOME/registry/{src,cache}/-<hash of its path>/`, and
/// when a copy of the same name and version is already there it builds that copy, not
/// the new one. The path (so the hash) is the same on every run in one checkout, the
/// version does not change between commits, and a CI machine keeps cargo's home between
/// runs: the last CI's publish check built the previous run's sources and failed on an
/// item added since. Only those local-registry folders (names starting with `-`) are
/// touched, and only `outboard-*` entries in them.
fn forget_unpacked_packages() -> Result<usize> {
    let home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cargo")))
        .ok_or("neither CARGO_HOME nor HOME is set")?;
    let mut removed = 0;
    for kind in ["src", "cache"] {
        let Ok(registries) = fs::read_dir(home.join("registry").join(kind)) else {
            continue;
        };
        for reg in registries.flatten() {
            if !reg.file_name().to_string_lossy().starts_with('-') {
                continue;
            }
            let Ok(entries) = fs::read_dir(reg.path()) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !LIBRARY_CRATES
                    .iter()
                    .any(|c| name.starts_with(&format!("{c}-")))
                {
                    continue;
                }
                let path = e.path();
                let gone = if path.is_dir() {
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_file(&path)
                };
                gone.map_err(|err| format!("remove {}: {err}", path.display()))?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

/// `cargo xtask publish-check`.
///
/// `cargo publish` asks the crates.io index about every crate; a run that fails only
/// because the registry could not be reached is tried once more (and says so). Any other
/// failure fails at once.
pub fn publish_check() -> Result<bool> {
    let target = util::workspace_root().join("target").join("publish-check");
    let removed = forget_unpacked_packages()?;
    if removed > 0 {
        println!("publish-check: removed {removed} stale unpacked copies of Outboard's crates");
    }
    for attempt in 1..=2 {
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["publish", "--workspace", "--dry-run", "--allow-dirty"])
            .env("CARGO_TARGET_DIR", &target);
        let (status, tail) = util::run_teeing(&mut cmd, 200);
        let status = status.map_err(|e| format!("could not start {cmd:?}: {e}"))?;
        if status.success() {
            return Ok(true);
        }
        match network_trouble(&tail) {
            Some(line) if attempt == 1 => {
                eprintln!("publish-check: the registry could not be reached ({line}); once more")
            }
            _ => {
                // The error itself, not only the last lines of later verification output.
                let errors: Vec<&String> = tail
                    .iter()
                    .filter(|l| l.starts_with("error") || l.starts_with("Caused by"))
                    .collect();
                for e in &errors {
                    eprintln!("publish-check: {e}");
                }
                return Err(format!("{cmd:?} failed: {status}"));
            }
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_trouble_is_told_from_a_broken_package() {
        let lines = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let net = lines(&[
            "error: failed to get successful HTTP response from `https://index.crates.io/ou/tb/outboard-vmm-glue` (13.0.0.1), got 503",
        ]);
        assert!(network_trouble(&net).is_some());
        let broken = lines(&[
            "error: failed to verify package tarball",
            "error[E0432]: unresolved import `crate::missing`",
        ]);
        assert_eq!(network_trouble(&broken), None);
    }
}
