//! `cargo xtask aarch64`: every crate and feature built for `aarch64-unknown-linux-gnu`,
//! and the tests that can run under qemu-user run there.
//!
//! # What it does
//!
//! 1. Installs the cross toolchain from the project's package list
//!    ([`crate::packages`]): `gcc-aarch64-linux-gnu` (the linker), `libc6-dev-arm64-cross`
//!    (glibc and kernel headers for aarch64 in `/usr/aarch64-linux-gnu`) and `qemu-user`
//!    10 or newer (from bookworm-backports on bookworm, like `qemu-system-x86`; its
//!    `qemu-aarch64` is static and runs the test binaries), then
//!    `rustup target add aarch64-unknown-linux-gnu` (idempotent), and the media deps
//!    ([`crate::setup::ensure_media_deps`]) for v4l2r's bindgen.
//! 2. `cargo build --workspace --all-targets --all-features`, `cargo check
//!    --workspace --all-targets` with the default features and with
//!    `--no-default-features`, and `cargo clippy --workspace --all-targets
//!    --all-features -- -D warnings`, all for aarch64 (code behind
//!    `cfg(target_arch)` differs, so x86_64's clippy does not cover it).
//! 3. `cargo test` for aarch64 under `qemu-aarch64 -L /usr/aarch64-linux-gnu`:
//!    every library's and binary's unit tests and every integration test of the
//!    workspace members, except what is listed below. Doc-tests are not run here: each
//!    is a separate cross-compiled program, slow to build, and they are the same
//!    examples the x86_64 `test` step runs.
//!
//! Everything is set through the environment of the cargo commands, so no committed
//! `.cargo/config.toml` ties other hosts to Debian's paths:
//! `CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc`,
//! `CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=qemu-aarch64 -L /usr/aarch64-linux-gnu`,
//! `CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc`, and `V4L2R_VIDEODEV2_H_PATH`.
//!
//! # v4l2r's bindgen (feature `v4l2-proxy`)
//!
//! bindgen passes `--target=aarch64-unknown-linux-gnu` to libclang by itself (from
//! cargo's `TARGET`), and libclang finds Debian's cross GCC installation
//! (`/usr/lib/gcc-cross/aarch64-linux-gnu/12`) and with it `/usr/aarch64-linux-gnu/include`
//! for glibc's `<sys/time.h>`; `<linux/videodev2.h>` comes from
//! `V4L2R_VIDEODEV2_H_PATH` (Linux >= 6.5). When that tree has the aarch64 `asm/`
//! headers of the same kernel (the media deps' `linux-libc-dev` carries every
//! architecture's), `BINDGEN_EXTRA_CLANG_ARGS_aarch64_unknown_linux_gnu` puts them first,
//! so `linux/` and `asm/` come from one kernel release rather than the cross package's
//! older `asm/`.
//!
//! # Not run under qemu-user, and why
//!
//! qemu-user translates system calls of one process; it is not a kernel. What it cannot
//! do (qemu 10.0):
//!
//! - Integration tests that spawn a binary of the workspace (their source names
//!   `CARGO_BIN_EXE_`; today `outboard-vmm-glue`'s `outboard_cli`, `outboard_jail` and
//!   `hostile_frontend`, which run `outboard`): found by [`spawns_a_binary`] and left out.
//!   The binary is an aarch64 executable, which the host kernel cannot exec without a
//!   `binfmt_misc` registration for qemu (not assumed: registering one is a host-wide
//!   change; qemu-user does not follow `execve` by itself).
//! - Whole test targets ([`EXCLUDED_TARGETS`]):
//!   - `outboard-sandbox` `jail` and `proxy`: `unshare(CLONE_NEWUSER)` fails with
//!     `EINVAL` because the emulator's process is multi-threaded (qemu runs an RCU
//!     thread), so no jail can be built; seccomp filters cannot be installed (qemu
//!     refuses them: they would filter the emulator's own host system calls); and the
//!     un-jailed proxy tests need the `Tube`, see the last list.
//!   - `outboard-vmm-glue` `vsock_snapshot`: the vsock device behind a `ProxyDevice`
//!     in a jail with a user namespace, and snapshot and restore over the `Tube`: the
//!     same two reasons as the sandbox's `proxy`.
//!   - `outboard-tests` `vsock_stress`: timing. Emulated, its 16 connections are slow
//!     enough that one is reset (2 of 3 runs on the loaded 2-CPU machine, none when it
//!     is idle), most likely by the device's 2 s connection timeout
//!     (`outboard_devices::vsock::CONN_TIMEOUT`); it takes 15 s even when it passes.
//!     It runs natively in the x86_64 `test` step.
//! - Single tests ([`SKIPPED_TESTS`], libtest `--skip` filters):
//!   - Four of `outboard-transport`'s `tube::tests` (`raw_messages_with_fds` runs) and
//!     `outboard-sandbox`'s `cold::tests`: the `Tube` learns a datagram's size with
//!     `recvmsg(MSG_PEEK | MSG_TRUNC)` and no iovec; qemu-user returns 0 for a
//!     `recvmsg` without iovecs without calling the kernel, which reads as a
//!     disconnect. (A one-byte iovec would work under qemu as natively.)
//!   - `seqpacket_keeps_message_boundaries` (`outboard-tests`): the same qemu bug: the
//!     muxer receives a zero-length SEQPACKET message with no iovec, qemu never
//!     consumes it, and the test spins forever.
//!   - `sock::tests::too_many_fds_is_truncated_control_and_leaks_nothing`
//!     (`outboard-transport`): qemu receives into a larger host control buffer, so the
//!     kernel does not truncate; the fds that do not fit the program's buffer stay
//!     open in the process instead of being closed.
//!   - `memory::tests::user_memory_is_checked_not_trusted` and
//!     `driver::tests::driver_side_ioctls_follow_the_v4l2_core` (`outboard-v4l2-shim`):
//!     the shim reads and writes user memory with `process_vm_readv`/`writev` on its
//!     own pid, which fail with `EFAULT` for the emulated process's addresses.
//!
//! bookworm's qemu 7.2 (`qemu-user-static`) is not used: it answers every ioctl it does
//! not know (V4L2's, for example `VIDIOC_ENUM_FMT` on `/dev/null`, where the kernel says
//! `ENOTTY`) with `ENOSYS`, which fails the media proxy's and the V4L2 shim's ioctl
//! tests, and its package registers `binfmt_misc` handlers for every architecture
//! host-wide (through `update-binfmts` or `systemd-binfmt`); qemu-user 10 only
//! recommends `qemu-user-binfmt`, which `--no-install-recommends` leaves out.
//!
//! None of these is an aarch64 defect of Outboard: each passes natively on x86_64, and
//! the seccomp policies of both architectures are compiled and checked on any host by
//! the `outboard-sandbox` and `outboard-vmm-glue` unit tests (`SyscallNames::check`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::packages;
use crate::setup;
use crate::util::{self, Result};

/// The Rust target.
pub const TARGET: &str = "aarch64-unknown-linux-gnu";
/// The cross linker (and C compiler for build scripts that use `cc`).
const LINKER: &str = "aarch64-linux-gnu-gcc";
/// Runs the aarch64 test binaries, with glibc's loader and libraries from the cross
/// sysroot.
const RUNNER: &str = "qemu-aarch64 -L /usr/aarch64-linux-gnu";
/// The Debian packages of the cross toolchain (all in [`packages::PACKAGES`]).
const CROSS_PACKAGES: &[&str] = &[
    "gcc-aarch64-linux-gnu",
    "libc6-dev-arm64-cross",
    "qemu-user",
];

/// Integration test targets not run under qemu-user besides those that spawn a
/// binary: (member directory, test target, why). The module docs explain each.
pub const EXCLUDED_TARGETS: &[(&str, &str, &str)] = &[
    (
        "sandbox",
        "jail",
        "user namespaces (qemu is multi-threaded) and seccomp",
    ),
    (
        "sandbox",
        "proxy",
        "user namespaces, seccomp, and the Tube's iovec-less recvmsg",
    ),
    (
        "tests",
        "vsock_stress",
        "timing-dependent under emulation on a loaded machine",
    ),
    (
        "vmm-glue",
        "vsock_snapshot",
        "a ProxyDevice in a user namespace, and the Tube's iovec-less recvmsg",
    ),
];

/// Single tests skipped under qemu-user: (libtest `--skip` filter, why).
pub const SKIPPED_TESTS: &[(&str, &str)] = &[
    (
        "tube::tests::disconnect_and_timeout",
        "qemu returns 0 for recvmsg without iovecs",
    ),
    (
        "tube::tests::from_fd_checks_socket_type",
        "qemu returns 0 for recvmsg without iovecs",
    ),
    (
        "tube::tests::oversized_and_unwanted_fds_are_dropped_without_leaks",
        "qemu returns 0 for recvmsg without iovecs",
    ),
    (
        "tube::tests::serde_request_response_across_threads",
        "qemu returns 0 for recvmsg without iovecs",
    ),
    ("cold::tests::", "qemu returns 0 for recvmsg without iovecs"),
    (
        "seqpacket_keeps_message_boundaries",
        "qemu never consumes a zero-length datagram received without iovecs",
    ),
    (
        "sock::tests::too_many_fds_is_truncated_control_and_leaks_nothing",
        "qemu leaks the fds that do not fit the control buffer",
    ),
    (
        "memory::tests::user_memory_is_checked_not_trusted",
        "process_vm_readv/writev on itself fail with EFAULT",
    ),
    (
        "driver::tests::driver_side_ioctls_follow_the_v4l2_core",
        "process_vm_readv/writev on itself fail with EFAULT",
    ),
];

/// The cross toolchain's packages, the Rust target and the media deps; returns the
/// directory for `V4L2R_VIDEODEV2_H_PATH`.
fn prepare() -> Result<PathBuf> {
    packages::ensure(CROSS_PACKAGES)?;
    util::run(
        Command::new("rustup").args(["target", "add", TARGET]),
        Duration::from_secs(900),
    )?;
    setup::ensure_media_deps(&setup::cache_dir().join("media-deps"))
}

/// `cargo xtask aarch64`: see the module docs. `Ok(false)` when a build or test failed.
pub fn run() -> Result<bool> {
    let headers = prepare()?;
    let root = util::workspace_root();
    let plan = integration_tests(&root)?;

    let env = cross_env(&headers);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target_args = ["--workspace", "--all-targets", "--target", TARGET];
    let mut test_args: Vec<String> = [
        "test",
        "--workspace",
        "--all-features",
        "--target",
        TARGET,
        "--no-fail-fast",
        "--lib",
        "--bins",
    ]
    .map(String::from)
    .to_vec();
    for t in &plan.run {
        test_args.extend(["--test".to_string(), t.clone()]);
    }
    test_args.push("--".into());
    for (filter, _) in SKIPPED_TESTS {
        test_args.extend(["--skip".to_string(), filter.to_string()]);
    }

    let steps: Vec<(&str, Vec<String>, Duration)> = vec![
        (
            "build, all features",
            args(&["build"], &target_args, &["--all-features"]),
            Duration::from_secs(3600),
        ),
        (
            "check, default features",
            args(&["check"], &target_args, &[]),
            Duration::from_secs(1800),
        ),
        (
            "check, no default features",
            args(&["check"], &target_args, &["--no-default-features"]),
            Duration::from_secs(1800),
        ),
        (
            "clippy, all features",
            args(
                &["clippy"],
                &target_args,
                &["--all-features", "--", "-D", "warnings"],
            ),
            Duration::from_secs(1800),
        ),
        ("test under qemu-user", test_args, Duration::from_secs(1800)),
    ];

    println!(
        "aarch64: integration tests run under qemu-user: {}",
        plan.run.join(" ")
    );
    for (target, why) in &plan.left_out {
        println!("aarch64: not run under qemu-user: {target}: {why}");
    }
    for (filter, why) in SKIPPED_TESTS {
        println!("aarch64: skipped under qemu-user: {filter}: {why}");
    }
    let mut results = Vec::new();
    for (name, argv, timeout) in steps {
        println!("\n==> aarch64: {name} (cargo {})", argv.join(" "));
        let start = Instant::now();
        let r = util::run(
            Command::new(&cargo)
                .args(&argv)
                .current_dir(&root)
                .envs(env.iter().map(|(k, v)| (k, v))),
            timeout,
        );
        if let Err(e) = &r {
            eprintln!("xtask: {e}");
        }
        results.push((name, r.is_ok(), start.elapsed()));
    }
    println!("\n==> aarch64 summary");
    for (name, ok, took) in &results {
        println!(
            "  {:<28} {:<4} {:>7.1}s",
            name,
            if *ok { "ok" } else { "FAIL" },
            took.as_secs_f64()
        );
    }
    Ok(results.iter().all(|(_, ok, _)| *ok))
}

fn args(cmd: &[&str], common: &[&str], extra: &[&str]) -> Vec<String> {
    cmd.iter()
        .chain(common)
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
}

/// The environment of every cargo command: linker, runner, C compiler, headers.
fn cross_env(headers: &Path) -> Vec<(String, String)> {
    let mut env = vec![
        (
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER".to_string(),
            LINKER.to_string(),
        ),
        (
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER".to_string(),
            RUNNER.to_string(),
        ),
        (
            "CC_aarch64_unknown_linux_gnu".to_string(),
            LINKER.to_string(),
        ),
        (
            "V4L2R_VIDEODEV2_H_PATH".to_string(),
            headers.display().to_string(),
        ),
    ];
    let asm = headers.join("aarch64-linux-gnu");
    if asm.join("asm").is_dir() {
        env.push((
            "BINDGEN_EXTRA_CLANG_ARGS_aarch64_unknown_linux_gnu".to_string(),
            format!("-I{}", asm.display()),
        ));
    }
    env
}

/// Which integration test targets run under qemu-user.
struct TestPlan {
    /// Target names, for `--test`.
    run: Vec<String>,
    /// `member/tests/name` and why it is left out.
    left_out: Vec<(String, &'static str)>,
}

/// Every `tests/*.rs` (and `tests/*/main.rs`) of every workspace member runs, but
/// [`EXCLUDED_TARGETS`] and those that [`spawns_a_binary`]. A name left out in one member
/// and present in another is an error, since `--test` selects by name in every package;
/// so is an entry of [`EXCLUDED_TARGETS`] that no longer exists.
fn integration_tests(root: &Path) -> Result<TestPlan> {
    let manifest = root.join("Cargo.toml");
    let text =
        fs::read_to_string(&manifest).map_err(|e| format!("read {}: {e}", manifest.display()))?;
    let members = workspace_members(&text)
        .ok_or_else(|| format!("no `members = [...]` in {}", manifest.display()))?;
    let mut plan = TestPlan {
        run: Vec::new(),
        left_out: Vec::new(),
    };
    let mut left_out_names = Vec::new();
    for member in &members {
        for (name, path) in test_targets(&root.join(member)) {
            let listed = EXCLUDED_TARGETS
                .iter()
                .find(|(m, t, _)| *m == member.as_str() && *t == name);
            let why = match listed {
                Some((_, _, why)) => Some(*why),
                None if spawns_a_binary(&path) => {
                    Some("spawns an aarch64 binary of the workspace (needs binfmt_misc)")
                }
                None => None,
            };
            match why {
                Some(why) => {
                    plan.left_out.push((format!("{member}/tests/{name}"), why));
                    left_out_names.push(name);
                }
                None => plan.run.push(name),
            }
        }
    }
    for (member, name, _) in EXCLUDED_TARGETS {
        let key = format!("{member}/tests/{name}");
        if !plan.left_out.iter().any(|(k, _)| *k == key) {
            return Err(format!(
                "xtask aarch64: excluded test target {key} no longer exists; \
                 update EXCLUDED_TARGETS in xtask/src/cross.rs"
            ));
        }
    }
    if let Some(name) = left_out_names.iter().find(|n| plan.run.contains(n)) {
        return Err(format!(
            "xtask aarch64: test target name {name} is left out in one member but runs in \
             another; --test selects by name in every package"
        ));
    }
    plan.run.sort();
    plan.run.dedup();
    Ok(plan)
}

/// Whether the integration test at `path` (a file, or a directory's `main.rs` and the
/// files beside it) runs a binary of its package: it names `CARGO_BIN_EXE_`.
fn spawns_a_binary(path: &Path) -> bool {
    let files: Vec<PathBuf> = if path.is_dir() {
        fs::read_dir(path)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    } else {
        vec![path.to_path_buf()]
    };
    files
        .iter()
        .any(|f| fs::read_to_string(f).is_ok_and(|t| t.contains("CARGO_BIN_EXE_")))
}

/// The `members = [...]` of the root manifest.
fn workspace_members(manifest: &str) -> Option<Vec<String>> {
    let start = manifest.find("members")?;
    let rest = &manifest[start..];
    let open = rest.find('[')?;
    let close = rest.find(']')?;
    let list = rest.get(open + 1..close)?;
    Some(
        list.split(',')
            .map(|s| s.trim().trim_matches('"').to_string())
            .filter(|s| !s.is_empty())
            .collect(),
    )
}

/// Cargo's auto-discovered integration tests of the package in `dir`: (name, path).
fn test_targets(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = fs::read_dir(dir.join("tests")) else {
        return Vec::new();
    };
    let mut targets = Vec::new();
    for entry in entries.flatten() {
        let path: PathBuf = entry.path();
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let file_test = path.is_file() && path.extension().is_some_and(|e| e == "rs");
        let dir_test = path.is_dir() && path.join("main.rs").is_file();
        if file_test || dir_test {
            targets.push((stem, path));
        }
    }
    targets.sort();
    targets
}

/// `cargo xtask aarch64-e2e`: the x86_64 guest's end-to-end test ([`crate::e2e`]) with
/// `outboard vsock` built for aarch64 (release, default features) as its back-end, run
/// by `qemu-aarch64` user-mode emulation: vhost-user's fd passing (`SCM_RIGHTS`), the
/// guest memory QEMU shares as memfds, eventfds, epoll and AF_UNIX sockets all go
/// through qemu-user's system-call translation to the host kernel. The binary is run
/// through a two-line wrapper script, so every process the e2e starts (restarts and the
/// live upgrades' new processes included) is emulated. Sizes as for `cargo xtask e2e`
/// ([`crate::e2e::Sizes::from_env`]), but 32 MiB bulk streams and 256 MiB across the
/// ten upgrades unless the environment says otherwise (the emulated back-end moves about
/// 55 MiB/s; 32 MiB ended before the last upgrade). Not jailed: qemu-user cannot build a
/// jail (see the module docs).
pub fn e2e() -> Result<bool> {
    let headers = prepare()?;
    let root = util::workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let env = cross_env(&headers);
    util::run(
        Command::new(&cargo)
            .args([
                "build",
                "--release",
                "-p",
                "outboard-vmm-glue",
                "--bin",
                "outboard",
            ])
            .args(["--target", TARGET])
            .current_dir(&root)
            .envs(env.iter().map(|(k, v)| (k, v))),
        Duration::from_secs(3600),
    )?;
    let bin = crate::target_dir()
        .join(TARGET)
        .join("release")
        .join("outboard");
    let dir = crate::target_dir().join("aarch64-e2e");
    fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let wrapper = dir.join("outboard");
    fs::write(
        &wrapper,
        format!("#!/bin/sh\nexec {RUNNER} {} \"$@\"\n", bin.display()),
    )
    .map_err(|e| format!("write {}: {e}", wrapper.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("chmod {}: {e}", wrapper.display()))?;
    }
    let arch = Command::new(&wrapper)
        .args(["vsock", "--print-capabilities"])
        .output()
        .map_err(|e| format!("run {}: {e}", wrapper.display()))?;
    println!(
        "==> aarch64-e2e: {} under {RUNNER}: --print-capabilities says {}",
        bin.display(),
        String::from_utf8_lossy(&arch.stdout).trim()
    );
    let mut sizes = crate::e2e::Sizes::from_env();
    const MIB: u64 = 1 << 20;
    if std::env::var_os("OUTBOARD_E2E_BULK_MIB").is_none() {
        sizes.bulk = 32 * MIB;
    }
    if std::env::var_os("OUTBOARD_E2E_UPGRADE_MIB").is_none() {
        sizes.upgrade_bulk = 256 * MIB;
    }
    crate::e2e::run(crate::vm::Backend::Outboard(wrapper), &sizes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_read_from_the_manifest() {
        let m = "[workspace]\nresolver = \"2\"\nmembers = [\"protocol\", \"tests/v4l2-shim\"]\n";
        assert_eq!(
            workspace_members(m),
            Some(vec!["protocol".to_string(), "tests/v4l2-shim".to_string()])
        );
        assert_eq!(workspace_members("[package]\n"), None);
    }

    #[test]
    fn excluded_targets_exist_and_are_not_run() {
        let plan = integration_tests(&util::workspace_root()).unwrap();
        for (_, name, _) in EXCLUDED_TARGETS {
            assert!(!plan.run.iter().any(|t| t == name), "{name}");
        }
        // outboard_cli runs the outboard binary; vhost_user_daemon runs in-process.
        assert!(plan
            .left_out
            .iter()
            .any(|(k, _)| k == "vmm-glue/tests/outboard_cli"));
        assert!(plan.run.iter().any(|t| t == "vhost_user_daemon"));
    }
}
