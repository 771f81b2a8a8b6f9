//! `cargo xtask vsock-forward-guest`: the AF_VSOCK host backend of `outboard vsock`
//! (`--forward-cid`/`--forward-listen`) against a real kernel's AF_VSOCK, data included.
//!
//! `tests/tests/vsock_forward.rs` needs the host kernel's `vsock_loopback` (CID 1) for its
//! data tests, `data_both_ways_over_vsock_loopback` and `seqpacket_over_vsock_loopback`,
//! and skips them (a `SKIPPED ...` line on stderr, the test passing) where the module is
//! missing: on this machine and on CI (a Firecracker guest kernel without
//! `CONFIG_VSOCKETS_LOOPBACK` and without modules). So the same test binary runs here
//! inside guests whose kernels have the module, two of them (see [`Kernel`]):
//!
//! - bookworm's 6.1 (the Debian kernel `cargo xtask e2e` boots, see
//!   [`setup::ensure_kernel_package`]), whose AF_VSOCK seqpacket sockets cannot
//!   `MSG_PEEK` (`ENOMEM`): the seqpacket test checks that the device resets the
//!   connection at the first host message;
//! - trixie-backports' (Linux >= 6.3, from the trixie root `cargo xtask media-guest`
//!   keeps, see [`media_guest::trixie_root`]), which can: the seqpacket test checks host
//!   -> guest messages end to end, and this run must show it did.
//!
//! Per kernel:
//!
//! 1. `cargo test -p outboard-tests --test vsock_forward --no-run --message-format=json`
//!    builds the binary once (on the host, against the host's glibc); the executable's
//!    path comes from the `compiler-artifact` message.
//! 2. A busybox initramfs gets it as `/bin/vsock_forward`, the libraries and dynamic loader
//!    `ldd` lists for it at their host paths (so the guest root's userland does not
//!    matter), and `vsock_loopback` with its dependencies from that kernel's modules
//!    (trixie's `.ko.xz` decompressed by [`media_guest::root_modules`]).
//! 3. The guest (QEMU, TCG unless a probe boot found KVM usable; a serial console and no
//!    device) loads the modules, runs `vsock_forward --test-threads=1 --nocapture` in a
//!    tmpfs, prints its exit code in a marker line and powers off.
//!
//! Pass, for each kernel: the exit code is 0, libtest reports `test result: ok. 5
//! passed`, every module loaded, and no line starts with `SKIPPED`: in the guest every
//! test must run. For a kernel >= 6.3 also: the seqpacket test printed `MSG_PEEK|MSG_TRUNC
//! gave` and not that the kernel cannot peek (the full host -> guest path ran).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::media_e2e::parse_ldd;
use crate::media_guest;
use crate::packages;
use crate::setup;
use crate::util::{self, output, Proc, Result};

/// The integration test target that is run in the guest (package `outboard-tests`).
const TEST: &str = "vsock_forward";
/// How many tests that target has; all of them must run and pass.
const TESTS: usize = 5;
/// The modules the guest loads (with their dependencies): CID 1 in the guest kernel.
const MODULES: &[&str] = &["vsock_loopback"];
/// How long a guest may take from QEMU's start to its marker line (it reaches init in
/// about 4 s under TCG and the tests take under 1 s natively).
const GUEST_TIMEOUT: Duration = Duration::from_secs(180);
/// How long building the test binary may take.
const BUILD_TIMEOUT: Duration = Duration::from_secs(1800);
/// The marker line the init script prints after the tests, followed by their exit code.
const MARKER: &str = "vsock-forward-guest: exit ";
/// The line the init script prints once the modules are loaded, followed by `uname -r`.
const UP: &str = "outboard-e2e: guest up, ";
/// What the seqpacket test prints when the kernel could peek at a seqpacket message.
const PEEKED: &str = "seqpacket_over_vsock_loopback: MSG_PEEK|MSG_TRUNC gave";
/// What it prints before checking the reset instead (peek failed or gave a wrong size).
const CANNOT_PEEK: &str = "cannot peek at AF_VSOCK seqpacket";
/// The first kernel version whose AF_VSOCK seqpacket sockets can `MSG_PEEK`.
const PEEK_SINCE: (u32, u32) = (6, 3);
/// How many console lines a failure report shows.
const TAIL_LINES: usize = 60;

/// The guest's /init.
fn init() -> String {
    setup::init_script("vsock-forward-guest", true, INIT_BODY)
}

/// What [`init`] runs after the prelude.
const INIT_BODY: &str = r#"# Printed for setup::probe_accel, which boots this initramfs to probe KVM.
echo "outboard-e2e: guest up, $(uname -r), vsock-forward-guest"
cd /tmp
export TMPDIR=/tmp RUST_BACKTRACE=1
/bin/vsock_forward --test-threads=1 --nocapture
echo "vsock-forward-guest: exit $?"
poweroff -f
"#;

/// A kernel the tests run under.
struct Kernel {
    /// Where it comes from; also its directory in this step's cache.
    name: &'static str,
    /// Its version (`uname -r`).
    version: String,
    /// Its image.
    vmlinuz: PathBuf,
    /// The modules the guest loads, in order, as (name, uncompressed file).
    modules: Vec<(String, PathBuf)>,
    /// Whether the seqpacket test must take its full path (the kernel can peek).
    peeks: bool,
}

/// `cargo xtask vsock-forward-guest`: returns whether every test ran and passed in every
/// guest (an `Err` is a failure too, with what went wrong).
pub fn run() -> Result<bool> {
    let whole = Instant::now();
    packages::ensure(&["qemu-system-x86", "busybox-static"])?;
    let bin = build_test_binary()?;
    let root_cache = setup::cache_dir();
    let cache = root_cache.join("vsock-forward-guest");
    let libs = ldd_files(&bin)?;
    let lib_names: Vec<String> = libs.iter().map(|l| l.display().to_string()).collect();
    let mut files: Vec<(&str, &Path)> = vec![(TEST, bin.as_path())];
    files.extend(
        lib_names
            .iter()
            .map(String::as_str)
            .zip(libs.iter().map(PathBuf::as_path)),
    );
    let kernels = [bookworm_kernel(&root_cache)?, trixie_kernel(&cache)?];
    println!(
        "vsock-forward-guest: {} in {} guests; prepared in {:.1}s",
        bin.display(),
        kernels.len(),
        whole.elapsed().as_secs_f64()
    );
    let mut passed = Vec::new();
    let mut failed = Vec::new();
    for k in &kernels {
        match run_guest(&root_cache, &cache.join(k.name), k, &files) {
            Ok(line) => passed.push(line),
            Err(e) => {
                eprintln!("{e}");
                failed.push(format!("kernel {} ({})", k.version, k.name));
            }
        }
    }
    for line in &passed {
        println!("{line}");
    }
    if !failed.is_empty() {
        return Err(format!(
            "vsock-forward-guest: failed under {} ({:.1}s in all)",
            failed.join(", "),
            whole.elapsed().as_secs_f64()
        ));
    }
    println!(
        "vsock-forward-guest: ok under {} kernels, {:.1}s in all",
        kernels.len(),
        whole.elapsed().as_secs_f64()
    );
    Ok(true)
}

/// Bookworm's kernel (6.1) and its modules, as `cargo xtask e2e` has it.
fn bookworm_kernel(root_cache: &Path) -> Result<Kernel> {
    let (vmlinuz, package_root) = setup::ensure_kernel_package(root_cache)?;
    let modules = setup::kernel_modules(&package_root, MODULES)?;
    let version = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .ok_or_else(|| format!("{}: not a vmlinuz-VERSION", vmlinuz.display()))?
        .to_string();
    Ok(Kernel {
        name: "bookworm",
        peeks: can_peek(&version),
        version,
        vmlinuz,
        modules,
    })
}

/// Trixie-backports' kernel from the trixie root (made first if needed), its modules
/// decompressed into `cache`; it must be one that can peek.
fn trixie_kernel(cache: &Path) -> Result<Kernel> {
    let started = Instant::now();
    let root = media_guest::trixie_root()?;
    let version = media_guest::kernel_version(&root)?;
    println!(
        "vsock-forward-guest: trixie root ready ({:.1}s): kernel {version}",
        started.elapsed().as_secs_f64()
    );
    if !can_peek(&version) {
        return Err(format!(
            "the trixie root's kernel {version} is older than {}.{}: it cannot run the \
             seqpacket test's full path",
            PEEK_SINCE.0, PEEK_SINCE.1
        ));
    }
    let wanted: Vec<String> = MODULES.iter().map(|m| m.to_string()).collect();
    let modules = media_guest::root_modules(
        &root,
        &version,
        &wanted,
        &cache.join(format!("modules-{version}")),
    )?;
    Ok(Kernel {
        name: "trixie-backports",
        vmlinuz: root.join("boot").join(format!("vmlinuz-{version}")),
        version,
        modules,
        peeks: true,
    })
}

/// Whether kernel `version` (`uname -r`) is at least [`PEEK_SINCE`]; `false` if it does
/// not start with `MAJOR.MINOR`.
fn can_peek(version: &str) -> bool {
    let mut parts = version.split(|c: char| !c.is_ascii_digit());
    let mut next = || parts.next().and_then(|p| p.parse::<u32>().ok());
    match (next(), next()) {
        (Some(major), Some(minor)) => (major, minor) >= PEEK_SINCE,
        _ => false,
    }
}

/// Runs the tests in a guest with kernel `k` (its initramfs, console and logs in `dir`);
/// returns the kernel's result line, or an `Err` with the console's tail.
fn run_guest(root_cache: &Path, dir: &Path, k: &Kernel, files: &[(&str, &Path)]) -> Result<String> {
    fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let initramfs = setup::build_initramfs(dir, "initramfs.cpio.gz", &init(), files, &k.modules)?;
    let accel = match std::env::var("OUTBOARD_E2E_ACCEL") {
        Ok(a) => a,
        Err(_) => setup::probe_accel(root_cache, &k.vmlinuz, &initramfs),
    };
    println!(
        "vsock-forward-guest: kernel {} ({}, {accel}) with modules {}",
        k.version,
        k.name,
        k.modules
            .iter()
            .map(|(name, _)| name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    );
    let started = Instant::now();
    let console = boot(dir, &accel, &k.vmlinuz, &initramfs)?;
    let took = started.elapsed().as_secs_f64();
    let verdict = check(&console, k.peeks);
    for line in console.lines().map(str::trim_end) {
        if line.starts_with("test ") || skip_line(line) {
            println!("  {} | {line}", k.name);
        }
    }
    match verdict {
        Ok(v) => Ok(format!(
            "vsock-forward-guest: kernel {} ({}): {TESTS} of {TESTS} tests passed, guest \
             {took:.1}s; seqpacket: {}",
            v.kernel, k.name, v.seqpacket
        )),
        Err(why) => Err(format!(
            "vsock-forward-guest: kernel {} ({}): {why} (guest ran {took:.1}s)\n{}",
            k.version,
            k.name,
            console_tail(&console, TAIL_LINES)
        )),
    }
}

/// Builds the test binary and returns its path, from cargo's JSON messages.
fn build_test_binary() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let json = output(
        Command::new(cargo)
            .args(["test", "-p", "outboard-tests", "--test", TEST, "--no-run"])
            .arg("--message-format=json")
            .current_dir(util::workspace_root())
            .stdin(Stdio::null()),
        BUILD_TIMEOUT,
    )?;
    let bin = test_executable(&json, TEST)?;
    if !bin.is_file() {
        return Err(format!(
            "cargo named {} as the {TEST} test binary, but there is no such file",
            bin.display()
        ));
    }
    Ok(bin)
}

/// The executable of test target `name` from `cargo --message-format=json` output:
/// exactly one `compiler-artifact` message of that target must name one.
fn test_executable(json: &str, name: &str) -> Result<PathBuf> {
    let mut found = Vec::new();
    for line in json.lines().filter(|l| l.starts_with('{')) {
        if json_string(line, "reason").as_deref() != Some("compiler-artifact") {
            continue;
        }
        let Some(at) = line.find("\"target\":{") else {
            continue;
        };
        if json_string(&line[at..], "name").as_deref() != Some(name) {
            continue;
        }
        if let Some(exe) = json_string(line, "executable") {
            found.push(PathBuf::from(exe));
        }
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(format!(
            "cargo's JSON messages name no executable for test target {name} \
             (no compiler-artifact message of it with \"executable\" set)"
        )),
        many => Err(format!(
            "cargo's JSON messages name {} executables for test target {name}: {many:?}",
            many.len()
        )),
    }
}

/// The first string value of `"key":` in one line of compact JSON (cargo writes no
/// spaces), unescaped; `None` if the key is missing or its value is not a string.
fn json_string(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let mut out = String::new();
    let mut chars = line[start..].chars();
    loop {
        match chars.next()? {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                'b' => out.push('\u{8}'),
                'f' => out.push('\u{c}'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    let code = u32::from_str_radix(&hex, 16).ok()?;
                    // Surrogate pairs do not occur in cargo's paths on Linux; refuse them.
                    out.push(char::from_u32(code)?);
                }
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
}

/// The files `ldd` lists for `bin` (libraries and the dynamic loader), which the guest
/// gets at the same paths.
fn ldd_files(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = output(
        Command::new("ldd").arg(bin).stdin(Stdio::null()),
        Duration::from_secs(60),
    )?;
    let mut libs = parse_ldd(&out).map_err(|e| format!("ldd {}: {e}", bin.display()))?;
    libs.sort();
    libs.dedup();
    if libs.is_empty() {
        return Err(format!(
            "ldd {} listed no library and no dynamic loader:\n{out}",
            bin.display()
        ));
    }
    Ok(libs)
}

/// Boots the guest, waits (at most [`GUEST_TIMEOUT`]) until it powers off, and returns
/// its console. QEMU is killed on every path: when it overstays, and by [`Proc`]'s drop
/// on an error.
fn boot(cache: &Path, accel: &str, kernel: &Path, initramfs: &Path) -> Result<String> {
    let console = cache.join("console.log");
    let qemu_log = cache.join("qemu.log");
    for f in [&console, &qemu_log] {
        match fs::remove_file(f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("remove {}: {e}", f.display())),
        }
    }
    let cmd = setup::qemu_guest(
        accel,
        1,
        "512M",
        &console,
        kernel,
        initramfs,
        "console=ttyS0 panic=-1 quiet loglevel=3",
    );
    let mut qemu = Proc::spawn("qemu", cmd, &qemu_log)?;
    let deadline = Instant::now() + GUEST_TIMEOUT;
    let mut marker_at = None;
    loop {
        if !qemu.running() {
            break;
        }
        let now = Instant::now();
        if marker_at.is_none() && util::read_log(&console).contains(MARKER) {
            marker_at = Some(now);
        }
        // After the marker the guest only powers off: a QEMU that does not exit within
        // 10 s of it is killed, the run judged by the console.
        if now >= deadline || marker_at.is_some_and(|t| now >= t + Duration::from_secs(10)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let exited = !qemu.running();
    util::kill_and_reap(&mut qemu.child);
    let text = util::read_log(&console);
    if !text.contains(MARKER) {
        let why = if exited {
            "QEMU exited before the guest printed its marker line".to_string()
        } else {
            format!("the guest printed no marker line within {GUEST_TIMEOUT:?}; QEMU killed")
        };
        return Err(format!(
            "vsock-forward-guest: {why}\n===== QEMU log ({}) =====\n{}\n{}",
            qemu_log.display(),
            util::read_log(&qemu_log),
            console_tail(&text, TAIL_LINES)
        ));
    }
    Ok(text)
}

/// What a passing guest showed.
#[derive(Debug, PartialEq)]
struct Verdict {
    /// The kernel that ran (`uname -r` in the guest).
    kernel: String,
    /// What the seqpacket test found: its `MSG_PEEK` line, without the test's name.
    seqpacket: String,
}

/// Judges a guest's console: the modules loaded, the tests' exit code is 0, libtest
/// reports all [`TESTS`] passed, and nothing was skipped; if the kernel `peeks`, the
/// seqpacket test also took its full path.
fn check(console: &str, peeks: bool) -> std::result::Result<Verdict, String> {
    let lines: Vec<&str> = console.lines().map(str::trim).collect();
    let insmod: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("vsock-forward-guest: insmod"))
        .collect();
    if !insmod.is_empty() {
        return Err(format!("a module did not load: {}", insmod.join("; ")));
    }
    let code = lines
        .iter()
        .find_map(|l| l.strip_prefix(MARKER))
        .ok_or("the guest printed no marker line")?;
    let result = lines
        .iter()
        .copied()
        .find(|l| l.starts_with("test result: "))
        .unwrap_or("(no `test result:` line)");
    if code.trim() != "0" {
        return Err(format!(
            "{TEST} exited with {:?} in the guest: {result}",
            code.trim()
        ));
    }
    let want = format!("test result: ok. {TESTS} passed;");
    if !result.starts_with(&want) {
        return Err(format!("libtest reported {result:?}, not {want:?}"));
    }
    let skipped: Vec<&str> = lines.iter().copied().filter(|l| skip_line(l)).collect();
    if !skipped.is_empty() {
        return Err(format!(
            "{} test(s) skipped in the guest, where every test must run:\n  {}",
            skipped.len(),
            skipped.join("\n  ")
        ));
    }
    let kernel = lines
        .iter()
        .find_map(|l| l.strip_prefix(UP))
        .and_then(|rest| rest.split(',').next())
        .unwrap_or("(unknown)")
        .to_string();
    let peek_line = lines.iter().find_map(|l| {
        l.find("seqpacket_over_vsock_loopback: MSG_PEEK")
            .map(|at| &l[at..])
    });
    let seqpacket = match peek_line {
        Some(l) => l
            .strip_prefix("seqpacket_over_vsock_loopback: ")
            .unwrap_or(l)
            .to_string(),
        None => "(no MSG_PEEK line)".to_string(),
    };
    if peeks {
        let cannot = lines.iter().copied().find(|l| l.contains(CANNOT_PEEK));
        if !peek_line.is_some_and(|l| l.starts_with(PEEKED)) || cannot.is_some() {
            return Err(format!(
                "kernel {kernel} can peek at AF_VSOCK seqpacket messages, but the seqpacket \
                 test did not take its full host -> guest path: {seqpacket}{}",
                cannot.map(|c| format!("; {c}")).unwrap_or_default()
            ));
        }
    }
    Ok(Verdict { kernel, seqpacket })
}

/// Whether a console line reports a skipped test: `SKIPPED` at its start or after a
/// space. With `--nocapture` libtest's `test NAME ... ` and the test's own `SKIPPED NAME:
/// why` (stderr) share one line, so the word is rarely at the start.
fn skip_line(line: &str) -> bool {
    line.match_indices("SKIPPED")
        .any(|(i, _)| i == 0 || line[..i].ends_with(' '))
}

/// The last `n` lines of the console, for a failure report.
fn console_tail(console: &str, n: usize) -> String {
    let lines: Vec<&str> = console.lines().map(str::trim_end).collect();
    let from = lines.len().saturating_sub(n);
    format!(
        "===== the guest console's last {} lines =====\n{}",
        lines.len() - from,
        lines[from..].join("\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARTIFACT: &str = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/tests#outboard-tests@0.1.0","manifest_path":"/w/tests/Cargo.toml","target":{"kind":["test"],"crate_types":["bin"],"name":"vsock_forward","src_path":"/w/tests/tests/vsock_forward.rs","edition":"2021","doctest":false,"test":true},"profile":{"opt_level":"0","debuginfo":2,"debug_assertions":true,"overflow_checks":true,"test":true},"features":[],"filenames":["/w/target/debug/deps/vsock_forward-c44f"],"executable":"/w/target/debug/deps/vsock_forward-c44f","fresh":true}"#;
    const LIB: &str = r#"{"reason":"compiler-artifact","package_id":"registry+https://github.com/rust-lang/crates.io-index#libc@0.2.1","manifest_path":"/r/libc/Cargo.toml","target":{"kind":["lib"],"crate_types":["lib"],"name":"libc","src_path":"/r/libc/src/lib.rs","edition":"2021","doctest":true,"test":true},"profile":{},"features":[],"filenames":["/w/target/debug/deps/liblibc.rlib"],"executable":null,"fresh":true}"#;

    #[test]
    fn the_test_executable_is_found_among_the_artifacts() {
        let json =
            format!("{LIB}\n{ARTIFACT}\n{{\"reason\":\"build-finished\",\"success\":true}}\n");
        assert_eq!(
            test_executable(&json, "vsock_forward"),
            Ok(PathBuf::from("/w/target/debug/deps/vsock_forward-c44f"))
        );
        let e = test_executable(LIB, "vsock_forward").unwrap_err();
        assert!(
            e.contains("no executable for test target vsock_forward"),
            "{e}"
        );
        let e = test_executable(&format!("{ARTIFACT}\n{ARTIFACT}"), "vsock_forward").unwrap_err();
        assert!(e.contains("2 executables"), "{e}");
    }

    #[test]
    fn json_strings_are_unescaped() {
        assert_eq!(
            json_string(r#"{"a":"x\"y\\z\u00e9"}"#, "a").as_deref(),
            Some("x\"y\\zé")
        );
        assert_eq!(json_string(r#"{"a":null}"#, "a"), None);
        assert_eq!(json_string(r#"{"a":"open"#, "a"), None);
    }

    /// A passing run under 6.1, as the console shows it (`\r\n`, the seqpacket test's
    /// stderr after libtest's prefix).
    const PASSED: &str = "\
[    1.0] Run /init as init process\r
outboard-e2e: guest up, 6.1.0-57-amd64, vsock-forward-guest\r
running 5 tests\r
test data_both_ways_over_vsock_loopback ... ok\r
test seqpacket_over_vsock_loopback ... seqpacket_over_vsock_loopback: MSG_PEEK failed: Cannot allocate memory (os error 12)\r
seqpacket_over_vsock_loopback: this kernel cannot peek at AF_VSOCK seqpacket messages (Linux < 6.3); checking that the device resets the connection\r
ok\r
test result: ok. 5 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.50s\r
vsock-forward-guest: exit 0\r
";

    /// A passing run under a kernel that can peek.
    fn peeked() -> String {
        PASSED
            .replace("6.1.0-57-amd64", "7.3.4+deb13-amd64")
            .replace(
                "MSG_PEEK failed: Cannot allocate memory (os error 12)",
                "MSG_PEEK|MSG_TRUNC gave 10000",
            )
            .replace(
                "seqpacket_over_vsock_loopback: this kernel cannot peek at AF_VSOCK seqpacket \
                 messages (Linux < 6.3); checking that the device resets the connection\r\n",
                "",
            )
    }

    #[test]
    fn a_clean_run_passes() {
        assert_eq!(
            check(PASSED, false),
            Ok(Verdict {
                kernel: "6.1.0-57-amd64".into(),
                seqpacket: "MSG_PEEK failed: Cannot allocate memory (os error 12)".into()
            })
        );
        assert_eq!(
            check(&peeked(), true),
            Ok(Verdict {
                kernel: "7.3.4+deb13-amd64".into(),
                seqpacket: "MSG_PEEK|MSG_TRUNC gave 10000".into()
            })
        );
        // The full path is not required of a kernel that cannot peek, nor refused.
        assert!(check(&peeked(), false).is_ok());
    }

    #[test]
    fn a_kernel_that_peeks_must_take_the_full_seqpacket_path() {
        let e = check(PASSED, true).unwrap_err();
        assert!(
            e.contains("did not take its full") && e.contains("MSG_PEEK failed"),
            "{e}"
        );
        // A peek that gave another length: the test checks the reset instead.
        let short = PASSED.replace(
            "MSG_PEEK failed: Cannot allocate memory (os error 12)",
            "MSG_PEEK|MSG_TRUNC gave 1",
        );
        let e = check(&short, true).unwrap_err();
        assert!(e.contains("gave 1; ") && e.contains(CANNOT_PEEK), "{e}");
        let none = peeked().replace("MSG_PEEK|MSG_TRUNC gave 10000", "");
        let e = check(&none, true).unwrap_err();
        assert!(e.contains("(no MSG_PEEK line)"), "{e}");
    }

    #[test]
    fn kernels_from_6_3_can_peek() {
        assert!(!can_peek("6.1.0-57-amd64"));
        assert!(!can_peek("6.2"));
        assert!(can_peek("6.3.0"));
        assert!(can_peek("6.12.95+deb12-amd64"));
        assert!(can_peek("7.3.4+deb13-amd64"));
        assert!(!can_peek("amd64"));
    }

    #[test]
    fn a_skip_a_failure_or_a_missing_module_fails() {
        // As --nocapture prints it: libtest's prefix and the test's stderr on one line.
        let skipped = PASSED.replace(
            "loopback ... ok",
            "loopback ... SKIPPED data_both_ways_over_vsock_loopback: no CID 1\r\nok",
        );
        let e = check(&skipped, false).unwrap_err();
        assert!(
            e.contains("1 test(s) skipped") && e.contains("no CID 1"),
            "{e}"
        );
        let alone = PASSED.replace("running 5 tests", "SKIPPED x: why\r\nrunning 5 tests");
        assert!(check(&alone, false).unwrap_err().contains("SKIPPED x: why"));
        assert!(!skip_line("test NOT_SKIPPED_here ... ok"));
        let failed = PASSED
            .replace("exit 0", "exit 101")
            .replace("ok. 5 passed; 0 failed", "FAILED. 4 passed; 1 failed");
        let e = check(&failed, false).unwrap_err();
        assert!(
            e.contains("exited with \"101\"") && e.contains("FAILED. 4 passed"),
            "{e}"
        );
        let four = PASSED.replace("5 passed", "4 passed");
        assert!(check(&four, false)
            .unwrap_err()
            .contains("not \"test result: ok. 5 passed;\""));
        let insmod = format!("vsock-forward-guest: insmod vsock.ko failed\n{PASSED}");
        assert!(check(&insmod, true)
            .unwrap_err()
            .contains("insmod vsock.ko failed"));
        assert!(check("booting\n", false)
            .unwrap_err()
            .contains("no marker line"));
    }
}
