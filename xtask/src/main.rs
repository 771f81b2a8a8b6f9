//! `cargo xtask`: Outboard's build and test driver.
//!
//! - `cargo xtask ci`: the whole gate (format, clippy, tests, docs, no_std build, and the
//!   suites later layers add). Prints a summary table and exits non-zero on any failure.
//! - `cargo xtask e2e [--backend outboard|vhost-device-vsock]`: boots a real Linux guest
//!   under QEMU with a vhost-user vsock back-end and checks the data path.
//! - `cargo xtask demo`: boots the guest and bridges a shell in it to the terminal over
//!   vsock.
//! - `cargo xtask bench-e2e`: the e2e harness once per back-end, with a comparison table.
//! - `cargo xtask media-compliance`: v4l2-compliance against the software camera (both
//!   modes) through the `outboard-v4l2-shim` guest-driver stand-in.
//! - `cargo xtask media-e2e`: the V4L2 proxy against vivid in a QEMU guest, including
//!   v4l2-compliance through the proxy compared with v4l2-compliance on vivid itself.
//! - `cargo xtask media-guest`: the real Linux virtio-media driver, built for a Debian
//!   trixie-backports kernel, against `outboard media --camera` in every mode under QEMU
//!   11.1 (a trixie root made with debootstrap, cached under the target dir):
//!   v4l2-compliance 1.30 and byte-exact v4l2-ctl captures (see `media_guest.rs`).
//! - `cargo xtask media-deps`: installs what building v4l2r (feature `v4l2-proxy`) needs
//!   and prints the directory to export as `V4L2R_VIDEODEV2_H_PATH`.
//!
//! - `cargo xtask msrv`: the library crates and the binary checked with the declared
//!   `rust-version` toolchain.
//! - `cargo xtask vsock-forward-guest`: the `vsock_forward` integration tests (the
//!   AF_VSOCK host backend) inside a QEMU guest whose Debian kernel has `vsock_loopback`,
//!   so that none of them skips (see `vsock_forward_guest.rs`).
//! - `cargo xtask publish-check`: `cargo publish --workspace --dry-run`.
//! - `cargo xtask packages`: the Debian packages the project installs (one list, in
//!   `packages.rs`), with their state on this machine.
//!
//! `ci` first installs every package of that list that `dpkg-query` does not show
//! installed and prints the list, then runs the media-deps step and passes `V4L2R_VIDEODEV2_H_PATH` to every step:
//! the `--all-features` builds include the V4L2 proxy.

mod bench;
mod compliance;
mod cross;
mod demo;
mod device_cost;
mod e2e;
mod examples;
mod fuzz;
mod fuzz_guest;
mod guest_patch;
mod host;
mod live_upgrade;
mod media_clients;
mod media_e2e;
mod media_guest;
mod packages;
mod qmp;
mod release;
mod rng_guest;
mod setup;
mod util;
mod vm;
mod vsock_forward_guest;
mod vsock_suite;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use vm::Backend;

/// One step of the CI gate.
struct Step {
    name: &'static str,
    program: String,
    args: Vec<&'static str>,
    env: Vec<(&'static str, &'static str)>,
    /// Directories under the target dir that only this step uses, removed once it ends
    /// (the CI machine's disk is small: see [`prune_after`]).
    prune: Vec<&'static str>,
}

impl Step {
    fn cargo(name: &'static str, args: &[&'static str]) -> Step {
        Step {
            name,
            program: "cargo".into(),
            args: args.to_vec(),
            env: Vec::new(),
            prune: Vec::new(),
        }
    }

    /// A subcommand of this xtask binary, run as its own process.
    fn xtask(name: &'static str, args: &[&'static str]) -> Step {
        let program = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "cargo-xtask-missing".into());
        Step {
            name,
            program,
            args: args.to_vec(),
            env: Vec::new(),
            prune: Vec::new(),
        }
    }

    fn env(mut self, key: &'static str, value: &'static str) -> Step {
        self.env.push((key, value));
        self
    }

    /// `dir` (under the target dir) is this step's own and is removed after it.
    fn prune(mut self, dir: &'static str) -> Step {
        self.prune.push(dir);
        self
    }
}

fn ci_steps() -> Vec<Step> {
    vec![
        Step::cargo("fmt", &["fmt", "--all", "--", "--check"]),
        Step::cargo(
            "clippy",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--all-features",
                "--",
                "-D",
                "warnings",
            ],
        ),
        Step::cargo(
            "protocol no_std build",
            &["build", "-p", "outboard-protocol", "--no-default-features"],
        ),
        Step::cargo("test", &["test", "--workspace", "--all-features"]),
        // v4l2-compliance against the software camera through the guest-driver shim.
        Step::xtask("media-compliance (v4l2-compliance)", &["media-compliance"]),
        Step::cargo(
            "doc",
            &["doc", "--workspace", "--no-deps", "--all-features"],
        )
        .env("RUSTDOCFLAGS", "-D warnings"),
        // Every library crate's examples, run as a user would run them.
        Step::xtask("examples", &["examples"]),
        // The device author's example (virtio-rng) against QEMU and a Linux guest, plain
        // and jailed, through a SIGTERM and a restart on --fd; no warning from QEMU.
        Step::xtask("rng-guest (example device, QEMU guest)", &["rng-guest"]),
        // The declared rust-version builds the library crates and the binary.
        Step::xtask("msrv (declared rust-version)", &["msrv"]).prune("msrv"),
        // Every publishable crate packages and builds from its tarball.
        Step::xtask(
            "publish-check (cargo publish --dry-run)",
            &["publish-check"],
        )
        .prune("publish-check"),
        // Every crate and feature built for aarch64; the tests qemu-user can run.
        Step::xtask("aarch64 (cross build, tests under qemu-user)", &["aarch64"])
            .prune("aarch64-unknown-linux-gnu"),
        // `outboard vsock` for aarch64, under qemu-aarch64, as the e2e guest's back-end.
        Step::xtask(
            "aarch64-e2e (aarch64 outboard under qemu-user, QEMU guest)",
            &["aarch64-e2e"],
        )
        .prune("aarch64-unknown-linux-gnu"),
        // A real Linux guest under QEMU talking vsock through `outboard vsock`.
        Step::xtask("e2e (QEMU guest, outboard vsock)", &["e2e"]),
        // The same through the jailed worker (`--jail`): driven, not only started.
        Step::xtask("e2e --jail (QEMU guest, jailed worker)", &["e2e"])
            .env("OUTBOARD_E2E_JAIL", "1"),
        // The kernel's own vsock tests (vsock_test, vsock_diag_test) between two guests
        // whose devices one `outboard vsock` serves, the VMs in one sibling group.
        Step::xtask(
            "vsock-suite (kernel vsock_test, two guests)",
            &["vsock-suite"],
        ),
        // The same with each VM's device in its own jailed worker, the two linked.
        Step::xtask(
            "vsock-suite --jail (kernel vsock_test, jailed workers)",
            &["vsock-suite", "--jail"],
        ),
        // The AF_VSOCK host backend's tests in a guest with vsock_loopback (CID 1): the
        // data test skips on hosts without it, as this CI machine's kernel is.
        Step::xtask(
            "vsock-forward-guest (AF_VSOCK backend, vsock_loopback)",
            &["vsock-forward-guest"],
        ),
        // The V4L2 proxy against vivid's capture nodes in a QEMU guest.
        Step::xtask("media-e2e (QEMU guest, vivid)", &["media-e2e"]).prune("media-e2e"),
        // The real virtio-media guest driver against `outboard media` in every mode.
        // The static media-frame-check builds in the host triple's own tree.
        Step::xtask(
            "media-guest (real virtio-media driver, QEMU 11.1)",
            &["media-guest"],
        )
        .prune("x86_64-unknown-linux-gnu"),
        // Every libFuzzer target a few seconds over its corpus (skips without nightly).
        Step::xtask(
            "fuzz smoke (cargo-fuzz, nightly)",
            &["fuzz", "--ci", "--seconds", "4"],
        )
        .prune("fuzz"),
    ]
}

/// The target directory the steps build into.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| util::workspace_root().join("target"))
}

/// Removes a step's own directories once it has run, unless `OUTBOARD_CI_KEEP=1`.
///
/// A fresh clone's `cargo xtask ci` wrote 12 GiB before this (the aarch64, msrv,
/// publish-check, media-e2e and fuzz builds each keep a whole target tree of their own,
/// used by no other step), and a CI machine ran out of disk in the aarch64 step. The price
/// of pruning is that a second local `cargo xtask ci` rebuilds those trees.
fn prune_after(step: &Step, target: &Path) {
    if std::env::var_os("OUTBOARD_CI_KEEP").is_some_and(|v| v == "1") {
        return;
    }
    for dir in &step.prune {
        let path = target.join(dir);
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("xtask: removing {}: {e}", path.display()),
        }
    }
}

/// Bytes allocated on disk under `path` (not following symlinks).
fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let own = meta.blocks() * 512;
    if !meta.is_dir() {
        return own;
    }
    let children = std::fs::read_dir(path)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| disk_usage(&e.path()))
                .sum::<u64>()
        })
        .unwrap_or(0);
    own + children
}

/// Bytes free for an unprivileged user on the file system holding `path`.
fn disk_free(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: all-zero bytes are a valid `statvfs` (plain integers).
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path that outlives the call and `st` is a valid,
    // exclusively borrowed `statvfs` for the kernel to fill.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    // The field types differ by target (u64 here, u32 on some 32-bit ones).
    #[allow(clippy::useless_conversion)]
    let free = u64::from(st.f_bavail) * u64::from(st.f_frsize);
    (rc == 0).then_some(free)
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 30)
}

fn run_steps(steps: Vec<Step>) -> ExitCode {
    let target = target_dir();
    let mut results = Vec::new();
    for step in steps {
        println!(
            "\n==> {} ({} {})",
            step.name,
            step.program,
            step.args.join(" ")
        );
        let start = Instant::now();
        let mut cmd = Command::new(&step.program);
        cmd.args(&step.args).envs(step.env.iter().copied());
        let (status, tail) = util::run_teeing(&mut cmd, FAILURE_TAIL_LINES);
        let ok = matches!(status, Ok(s) if s.success());
        if let Err(e) = &status {
            eprintln!("xtask: could not run {}: {e}", step.program);
        }
        let took = start.elapsed();
        // The step's peak is what it left behind before pruning.
        let used = disk_usage(&target);
        prune_after(&step, &target);
        let free = disk_free(&target);
        println!(
            "xtask: after {}: target {:.2} GiB, {:.1} GiB free",
            step.name,
            gib(used),
            free.map(gib).unwrap_or(f64::NAN)
        );
        results.push((
            step.name,
            ok,
            took,
            used,
            if ok { Vec::new() } else { tail },
        ));
    }
    println!(
        "\n==> summary (target: GiB under {} after the step)",
        target.display()
    );
    for (name, ok, took, used, _) in &results {
        println!(
            "  {:<44} {:<4} {:>7.1}s {:>6.2}",
            name,
            if *ok { "ok" } else { "FAIL" },
            took.as_secs_f64(),
            gib(*used)
        );
    }
    // A CI log keeps only its last lines, and a failing step's own error scrolls out of
    // them behind the later steps: repeat the end of what each failed step printed.
    for (name, _, _, _, tail) in results.iter().filter(|r| !r.1) {
        println!("\n==> the last {} lines {name} printed", tail.len());
        for line in tail {
            println!("  | {line}");
        }
    }
    let failed = results.iter().filter(|r| !r.1).count();
    let passed = results.len() - failed;
    println!("xtask: {passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// How many of a failed step's last output lines the summary repeats.
const FAILURE_TAIL_LINES: usize = 40;

/// Builds the `outboard` binary and returns its path.
fn build_outboard(release: bool) -> util::Result<PathBuf> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["build", "-p", "outboard-vmm-glue", "--bin", "outboard"]);
    if release {
        cmd.arg("--release");
    }
    util::run(&mut cmd, Duration::from_secs(1800))?;
    let bin = target_dir()
        .join(if release { "release" } else { "debug" })
        .join("outboard");
    if bin.exists() {
        Ok(bin)
    } else {
        Err(format!("cargo build left no {}", bin.display()))
    }
}

fn backend_named(name: &str, release: bool) -> util::Result<Backend> {
    match name {
        "outboard" => Ok(Backend::Outboard(build_outboard(release)?)),
        "vhost-device-vsock" => Ok(Backend::VhostDeviceVsock(setup::ensure_vhost_device_vsock(
            &setup::cache_dir(),
        )?)),
        other => Err(format!(
            "unknown back-end {other:?}: use outboard or vhost-device-vsock"
        )),
    }
}

/// `--backend NAME` from the arguments, or `OUTBOARD_E2E_BACKEND`, or outboard.
fn backend_arg(args: &[String]) -> String {
    args.windows(2)
        .find(|w| w[0] == "--backend")
        .map(|w| w[1].clone())
        .or_else(|| std::env::var("OUTBOARD_E2E_BACKEND").ok())
        .unwrap_or_else(|| "outboard".into())
}

fn finish(r: util::Result<bool>) -> ExitCode {
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "usage: cargo xtask <command>

commands:
  ci                     run the whole test gate (includes e2e)
  e2e [--backend B]      boot a Linux guest under QEMU and test vsock end to end
                         (B: outboard (default) or vhost-device-vsock)
  vsock-forward-guest    the vsock_forward tests (AF_VSOCK host backend) in a QEMU guest
                         with vsock_loopback, where none may skip
  demo [--backend B]     boot the guest and talk to a shell in it over vsock
  bench-e2e              compare outboard with vhost-device-vsock 0.3.0
  vsock-suite [--backend B] [--kernel backports|release] [--only NAME --repeat N]
                         the kernel's tools/testing/vsock (vsock_test, vsock_diag_test)
                         between two guests (CID 3 and 4) served by one daemon
  media-compliance       v4l2-compliance against the software camera (single- and
                         multi-planar) through the guest-driver shim
  media-e2e              boot a guest with vivid and check the V4L2 proxy over it
                         (with v4l2-compliance, directly and through the proxy)
  media-guest            the real virtio-media guest driver under QEMU 11.1 (a cached
                         trixie root) against outboard media --camera in every mode:
                         v4l2-compliance -s10 (-f) and byte-exact MMAP/USERPTR frames
  msrv                   check the library crates with the declared rust-version
  publish-check          cargo publish --workspace --dry-run (nothing is uploaded)
  examples               run every library crate's examples (cargo run --example)
  device-cost            lines, crates and clean release build CPU of the rng_device
                         example against the same device on rust-vmm's vhost-user-backend
  rng-guest              the rng_device example against QEMU vhost-user-rng-pci and a
                         Linux guest (plain and --jail; no QEMU warning allowed)
  fuzz [T] [--seconds N] run the fuzz targets (all, or T) N seconds each over their
                         corpus (nightly + cargo-fuzz; --ci: skip if unavailable)
  packages               list the Debian packages the project installs, and their state
  aarch64                build every crate and feature for aarch64-unknown-linux-gnu and
                         run the tests that work under qemu-user (see cross.rs)
  aarch64-e2e            the e2e guest with outboard vsock built for aarch64 as its
                         back-end, under qemu-aarch64 user-mode emulation
  media-deps [CACHE]     install libclang and a Linux >= 6.5 videodev2.h for v4l2r;
                         prints the directory for V4L2R_VIDEODEV2_H_PATH";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let release = args.iter().any(|a| a == "--release");
    match args.first().map(String::as_str) {
        Some("ci") => match packages::ensure(&[])
            .map(|()| packages::print_list())
            .and_then(|()| setup::ensure_media_deps(&setup::cache_dir().join("media-deps")))
        {
            Ok(include) => {
                println!(
                    "==> media deps: V4L2R_VIDEODEV2_H_PATH={}",
                    include.display()
                );
                // Every step (a child process) inherits it.
                std::env::set_var("V4L2R_VIDEODEV2_H_PATH", &include);
                // The gate builds each tree once: incremental caches would only take
                // disk (1.7 GiB of a fresh clone's 12 before this was set).
                if std::env::var_os("CARGO_INCREMENTAL").is_none() {
                    std::env::set_var("CARGO_INCREMENTAL", "0");
                }
                run_steps(ci_steps())
            }
            Err(e) => {
                eprintln!("xtask: installing what CI needs: {e}");
                ExitCode::FAILURE
            }
        },
        Some("media-e2e") => finish(media_e2e::run()),
        Some("media-guest") => finish(media_guest::run()),
        Some("msrv") => finish(release::msrv()),
        Some("publish-check") => finish(release::publish_check()),
        Some("packages") => {
            packages::print_list();
            ExitCode::SUCCESS
        }
        Some("media-deps") => {
            let cache = args
                .get(1)
                .map(PathBuf::from)
                .unwrap_or_else(|| setup::cache_dir().join("media-deps"));
            match setup::ensure_media_deps(&cache) {
                Ok(include) => {
                    println!("{}", include.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("xtask: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some("e2e") => finish(
            backend_named(&backend_arg(&args), release)
                .and_then(|b| e2e::run(b, &e2e::Sizes::from_env())),
        ),
        Some("demo") => finish(
            backend_named(&backend_arg(&args), release)
                .and_then(demo::run)
                .map(|()| true),
        ),
        Some("media-compliance") => finish(compliance::run()),
        Some("vsock-suite") => finish(
            backend_named(&backend_arg(&args), release)
                .and_then(|b| vsock_suite::run(b, &args[1..])),
        ),
        Some("vsock-forward-guest") => finish(vsock_forward_guest::run()),
        Some("fuzz") => finish(fuzz::run(&args[1..])),
        Some("aarch64") => finish(cross::run()),
        Some("aarch64-e2e") => finish(cross::e2e()),
        Some("examples") => finish(examples::run()),
        Some("rng-guest") => finish(rng_guest::run()),
        Some("device-cost") => finish(device_cost::run()),
        Some("bench-e2e") => {
            let mib = std::env::var("OUTBOARD_BENCH_MIB")
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(256);
            let rounds = std::env::var("OUTBOARD_BENCH_ROUNDS")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(3);
            // OUTBOARD_BENCH_BACKENDS=outboard measures one back-end alone (while
            // working on it); the comparison needs both.
            let names = std::env::var("OUTBOARD_BENCH_BACKENDS")
                .unwrap_or_else(|_| "outboard,vhost-device-vsock".into());
            finish(
                packages::ensure(&["linux-perf"])
                    .and_then(|()| {
                        names
                            .split(',')
                            .map(|n| backend_named(n.trim(), true))
                            .collect::<util::Result<Vec<_>>>()
                    })
                    .and_then(|b| bench::run(b, mib << 20, rounds))
                    .map(|()| true),
            )
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}
