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
    "outboard-glue",
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
    let mut ok = true;
    for extra in [&[][..], &["--no-default-features"][..]] {
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

/// `cargo xtask publish-check`.
pub fn publish_check() -> Result<bool> {
    let target = util::workspace_root().join("target").join("publish-check");
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["publish", "--workspace", "--dry-run", "--allow-dirty"])
            .env("CARGO_TARGET_DIR", &target),
        Duration::from_secs(3600),
    )?;
    Ok(true)
}
