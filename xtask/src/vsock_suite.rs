//! `cargo xtask vsock-suite`: the Linux kernel's own vsock tests (`tools/testing/vsock`:
//! `vsock_test` and `vsock_diag_test`) between two real guests, CID 3 and CID 4, whose
//! vsock devices are both served by one `outboard vsock` daemon with the two VMs in one
//! sibling group.
//!
//! What it sets up, all from Debian packages and cached under `target/e2e-cache/vsock-suite`:
//! - the guest kernel: Debian's `linux-image-amd64` from `<codename>-backports` when the
//!   machine has that suite (bookworm: 6.12), else from the release (`--kernel release`
//!   asks for the release's, the kernel `cargo xtask e2e` boots). Only the vmlinuz and
//!   the modules the guests load are kept.
//! - the suite: `tools/testing/vsock` and the two uapi headers it needs from the
//!   `linux-source-X.Y` package of exactly that kernel's version, built statically with
//!   the host's gcc (the object lists come from the suite's own Makefile).
//! - a busybox initramfs with both binaries, the vsock and virtio-net modules.
//!
//! Each guest runs under QEMU (TCG, one vCPU) with `vhost-user-vsock-pci` on the
//! daemon's socket, a virtio-net link to the other guest only (`-netdev stream` over one
//! AF_UNIX socket; 10.0.2.3 and 10.0.2.4 set by the init script) for the suite's
//! TCP control channel, and two serial ports (ttyS1, ttyS2), each a shell the harness types commands
//! into (nothing in the guests uses vsock besides the tests: `vsock_diag_test` checks that
//! no other vsock socket exists).
//!
//! What runs, with the server in CID 3 once and in CID 4 once: the whole `vsock_test` as
//! upstream runs it, then each test alone (`--skip` every other one), so that one failure
//! cannot hide the rest (the suite exits at its first failure), then `vsock_diag_test` the
//! same two ways; then, when the suite has `--peer-port`, both directions at once (a server
//! and a client in each guest, on ports 1234 and 2234). A test passes when both sides
//! print `ok` for it. The daemon must then exit 0 on SIGTERM, and its error counters
//! (`--metrics`, read after every run so that a rise is attributed to the run that caused
//! it) must show no protocol error.
//!
//! `--jail` (a second step of `cargo xtask ci`) runs the same with `outboard vsock --jail`:
//! each VM's device in its own jailed worker, the two workers linked by the daemon, the
//! counters read from the workers' shared pages.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::packages;
use crate::qmp::Qmp;
use crate::setup;
use crate::util::{self, output, run as run_cmd, Proc, Result};
use crate::vm::Backend;

/// The two guests' context ids; guest `c` has the address 10.0.2.`c` on the private link.
const CIDS: [u32; 2] = [3, 4];
/// The sibling group both VMs are in.
const GROUP: &str = "suite";
/// The modules each guest loads (with their dependencies).
const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "vmw_vsock_virtio_transport",
    "vsock_diag",
];
/// Guest memory per VM.
const GUEST_MIB: u32 = 256;
/// How long a guest may take from QEMU's start to its shells answering.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// Guest-side limit of one whole-suite run (the harness waits a little longer).
const WHOLE_SECS: u64 = 900;
/// Guest-side limit of one single-test run.
const ALONE_SECS: u64 = 180;
/// Attempts of a test that races by design (see [`RACY`]).
const RACY_ATTEMPTS: u32 = 5;

/// Tests that race by design, each with the reason; they get [`RACY_ATTEMPTS`] attempts
/// (alone; a whole run that fails first in one of them is run again).
///
/// Both race a vsock packet against a line on the TCP control channel, two paths with
/// no order between them. On the receiving guest a vsock packet is handled by a
/// workqueue (`virtio_transport_rx_work`), TCP in softirq, so with one vCPU the process
/// woken by the control line can run before the packet that came first is seen.
const RACY: &[(&str, &str)] = &[
    (
        "SOCK_STREAM double bind connect",
        "the client binds port peer_port+1 again once the server says LISTENING, and its \
         second bind can come before the server's RST for the first connection has \
         reached it (EADDRINUSE); the daemon forwards the RST between siblings at once. \
         Alone under TCG it fails 2 runs in 100 with outboard and 4 with \
         vhost-device-vsock 0.3 (100 runs each way)",
    ),
    (
        "SOCK_STREAM SHUT_RD",
        "the server's shutdown(SHUT_RD) sends a SHUTDOWN packet, then SHUTRDDONE on the \
         control channel; the client's send() fails only if its kernel saw the SHUTDOWN \
         first. Alone under TCG it fails 11-13 runs in 100 with outboard and 9-13 with \
         vhost-device-vsock 0.3 (100 runs each way, server in CID 3 and in CID 4)",
    ),
];

/// The guest's /init. `vsock_suite_cid=N` on the kernel command line picks the CID-N
/// guest's address; serial ports ttyS1 and ttyS2 each get a shell for the harness.
fn init() -> String {
    setup::init_script("vsock-suite", true, INIT_BODY)
}

/// What [`init`] runs after the prelude.
const INIT_BODY: &str = r#"cid=$(sed -n 's/.*vsock_suite_cid=\([0-9]*\).*/\1/p' /proc/cmdline)
hostname guest-$cid
# Printed for setup::probe_accel, which boots this initramfs to probe KVM.
echo "outboard-e2e: guest up, $(uname -r), vsock-suite guest $cid"
ip link set lo up
ip addr add 10.0.2.$cid/24 dev eth0
ip link set eth0 up
# A shell per serial port. Its commands come through a pipe: a shell reading a terminal
# is interactive, and its line editor echoes, wraps and queries the terminal. The port is
# made raw while dd holds it open (a terminal's settings can go with its last close).
# Not cat: busybox cat copies with sendfile, which holds the pipe locked while it waits
# for the terminal, so the shell saw each command only when the next one arrived.
for p in ttyS1 ttyS2; do
    (
        while true; do
            (stty raw -echo; echo "@@UP $cid $(uname -r)" >/dev/$p; exec dd bs=4096) </dev/$p 2>/dev/null |
                sh >/dev/$p 2>&1
        done
    ) &
done
while true; do sleep 3600; done
"#;

/// The last `n` bytes of `s` or a little more (whole characters).
fn tail(s: &str, n: usize) -> &str {
    let mut at = s.len().saturating_sub(n);
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    &s[at..]
}

/// The guest address of CID `cid` on the private link.
fn guest_ip(cid: u32) -> String {
    format!("10.0.2.{cid}")
}

// ---------------------------------------------------------------------------------------
// Pure parsing: apt output, the suite's Makefile, --list, a run's output, the metrics.
// ---------------------------------------------------------------------------------------

/// The kernel image package `apt-cache depends linux-image-amd64` names.
fn kernel_image_from_depends(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|d| d.starts_with("linux-image-") && d.ends_with("-amd64"))
        .map(str::to_string)
}

/// `X.Y` of a kernel image package (`linux-image-6.12.95+deb12-amd64` -> `6.12`), which
/// names its source package (`linux-source-6.12`).
fn major_minor(image: &str) -> Option<String> {
    let rest = image.strip_prefix("linux-image-")?;
    let mut parts = rest.split(|c: char| !c.is_ascii_digit());
    let major = parts.next().filter(|p| !p.is_empty())?;
    let minor = parts.next().filter(|p| !p.is_empty())?;
    rest[major.len()..]
        .starts_with('.')
        .then(|| format!("{major}.{minor}"))
}

/// The `.c` files of Makefile rule `target: a.o b.o ...` (variable assignments such as
/// `target: LDLIBS = ...` are not rules).
fn makefile_sources(makefile: &str, target: &str) -> Option<Vec<String>> {
    makefile.lines().find_map(|l| {
        let deps = l.strip_prefix(target)?.strip_prefix(':')?;
        if deps.contains('=') {
            return None;
        }
        let objs: Vec<String> = deps
            .split_whitespace()
            .filter_map(|o| o.strip_suffix(".o"))
            .map(|o| format!("{o}.c"))
            .collect();
        (!objs.is_empty()).then_some(objs)
    })
}

/// The tests `--list` prints: `ID<TAB>name` lines after an `ID<TAB>Test name` header.
fn parse_list(text: &str) -> Vec<(u32, String)> {
    text.lines()
        .filter_map(|l| {
            let (id, name) = l.trim_end_matches('\r').split_once('\t')?;
            Some((id.trim().parse().ok()?, name.trim().to_string()))
        })
        .collect()
}

/// What one side (server or client) printed for one test.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Said {
    /// `ok`; the text is whatever the test printed before it (usually nothing).
    Ok(String),
    /// `skipped`.
    Skipped,
    /// Anything else: the test's error output, or nothing when the process was killed.
    Failed(String),
}

/// One side's output of one run: every test it started, and whether it reached the
/// final barrier (`All tests have been executed. Waiting other peer...ok`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct SideLog {
    tests: BTreeMap<u32, (String, Said)>,
    completed: bool,
}

/// Parses what `vsock_test` or `vsock_diag_test` printed (util.c's `run_tests`): each
/// test is `ID - name...` followed by `ok`, `skipped`, or the error that ended the
/// program; a test may print lines of its own before its `ok`.
fn parse_side(text: &str) -> SideLog {
    const DONE: &str = "All tests have been executed. Waiting other peer...";
    let mut log = SideLog::default();
    let mut current: Option<(u32, String, String)> = None;
    let close = |log: &mut SideLog, cur: Option<(u32, String, String)>| {
        if let Some((id, name, seg)) = cur {
            let seg = seg.trim();
            let said = if seg == "skipped" {
                Said::Skipped
            } else if seg == "ok" {
                Said::Ok(String::new())
            } else if let Some(before) = seg.strip_suffix("\nok") {
                Said::Ok(before.trim().to_string())
            } else {
                Said::Failed(seg.to_string())
            };
            log.tests.insert(id, (name, said));
        }
    };
    for line in text.lines().map(|l| l.trim_end_matches('\r')) {
        if let Some(rest) = line.strip_prefix(DONE) {
            close(&mut log, current.take());
            log.completed = rest.trim() == "ok";
            continue;
        }
        if let Some((id, name, rest)) = test_header(line) {
            close(&mut log, current.take());
            current = Some((id, name.to_string(), rest.to_string()));
            continue;
        }
        if let Some((_, _, seg)) = current.as_mut() {
            seg.push('\n');
            seg.push_str(line);
        }
    }
    close(&mut log, current);
    log
}

/// `ID - name...rest` -> (ID, name, rest).
fn test_header(line: &str) -> Option<(u32, &str, &str)> {
    let (id, rest) = line.split_once(" - ")?;
    let id = id.parse().ok()?;
    let (name, rest) = rest.split_once("...")?;
    Some((id, name, rest))
}

/// One test's result in one run, both sides together.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    /// Both sides printed `ok`.
    Pass,
    /// Both sides skipped it.
    Skipped,
    /// Either side failed it (or never reached it in a run that ended early); what the
    /// two sides printed.
    Fail(String),
}

/// Combines the two sides' logs of a run into per-test verdicts, for the tests `ids`.
fn verdicts(server: &SideLog, client: &SideLog, ids: &[u32]) -> BTreeMap<u32, Verdict> {
    ids.iter()
        .map(|id| {
            let s = server.tests.get(id).map(|(_, s)| s);
            let c = client.tests.get(id).map(|(_, s)| s);
            let v = match (s, c) {
                (Some(Said::Ok(_)), Some(Said::Ok(_))) => Verdict::Pass,
                (Some(Said::Skipped), Some(Said::Skipped)) => Verdict::Skipped,
                (s, c) => {
                    let show = |x: Option<&Said>| match x {
                        None => "not reached".to_string(),
                        Some(Said::Ok(_)) => "ok".to_string(),
                        Some(Said::Skipped) => "skipped".to_string(),
                        Some(Said::Failed(t)) if t.is_empty() => "no verdict".to_string(),
                        Some(Said::Failed(t)) => format!("{t:?}"),
                    };
                    Verdict::Fail(format!("server: {}; client: {}", show(s), show(c)))
                }
            };
            (*id, v)
        })
        .collect()
}

/// Error counters per guest CID from the daemon's metrics file (vmm-glue's
/// `metrics::render`: `"guest_cid": N` then `"counters": { "name": value, ... }`).
pub(crate) fn parse_metrics(text: &str) -> (u128, BTreeMap<u32, BTreeMap<String, u64>>) {
    let mut stamp = 0;
    let mut vms = BTreeMap::new();
    let mut cid = None;
    for line in text.lines() {
        let Some((key, value)) = line.trim().trim_end_matches(',').split_once(':') else {
            continue;
        };
        let key = key.trim().trim_matches('"');
        let value = value.trim();
        match key {
            "timestamp_ms" => stamp = value.parse().unwrap_or(0),
            "guest_cid" => cid = value.parse::<u32>().ok(),
            _ => {
                if let (Some(c), Ok(v)) = (cid, value.parse::<u64>()) {
                    vms.entry(c)
                        .or_insert_with(BTreeMap::new)
                        .insert(key.to_string(), v);
                }
            }
        }
    }
    (stamp, vms)
}

/// The counters that mean a protocol or device error whatever the test did: a guest
/// that follows the virtio-vsock spec never raises them.
fn is_protocol_error(counter: &str) -> bool {
    matches!(
        counter,
        "err_tx_short_header"
            | "err_tx_write_only_header"
            | "err_tx_bad_len"
            | "err_tx_bad_cid"
            | "err_tx_invalid"
            | "err_rx_bad_buffer"
            | "err_queue"
            | "err_credit_overrun"
            | "err_sibling_overrun"
            | "err_unsupported"
            | "err_event_queue"
            | "err_muxer"
    )
}

/// The output of job `id` in a shell transcript: its exit status and what it printed
/// between the `@@GO<id>` and `@@RC<id> <status>` markers; None while it runs.
fn job_output(transcript: &str, id: u64) -> Option<(i32, String)> {
    let go = format!("@@GO{id}\n");
    let rc = format!("@@RC{id} ");
    let start = transcript.find(&go)? + go.len();
    let end = start + transcript[start..].find(&rc)?;
    let tail = &transcript[end + rc.len()..];
    let line = tail.split_once('\n')?.0;
    let status = line.trim().parse().ok()?;
    Some((status, transcript[start..end].to_string()))
}

// ---------------------------------------------------------------------------------------
// The kernel and the suite, from Debian packages.
// ---------------------------------------------------------------------------------------

/// Which Debian kernel the guests boot (and whose suite they run).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KernelChoice {
    /// `linux-image-amd64` from `<codename>-backports` (the release's when there is none).
    Backports,
    /// `linux-image-amd64` of the release: the kernel `cargo xtask e2e` boots.
    Release,
}

/// The guest kernel, unpacked and trimmed to what the guests load.
struct SuiteKernel {
    package: String,
    version: String,
    vmlinuz: PathBuf,
    modules: Vec<(String, PathBuf)>,
}

/// The built suite.
struct Suite {
    /// `linux-source-X.Y <version>`.
    source: String,
    vsock_test: PathBuf,
    vsock_diag_test: PathBuf,
    /// Whether the suite has `--peer-port` (both directions at once).
    peer_port: bool,
    /// Whether the suite has `--pick` (else each test alone is `--skip` the others).
    pick: bool,
}

fn apt_update() -> Result<()> {
    run_cmd(
        Command::new("apt-get").args(["update", "-q"]),
        Duration::from_secs(900),
    )
}

/// The kernel image package to boot, pinned in the cache on first use.
fn kernel_package(dir: &Path, choice: KernelChoice) -> Result<String> {
    let pin = dir.join(match choice {
        KernelChoice::Backports => "kernel-backports",
        KernelChoice::Release => "kernel-release",
    });
    if let Ok(p) = fs::read_to_string(&pin) {
        if !p.trim().is_empty() {
            return Ok(p.trim().to_string());
        }
    }
    let backports = format!("{}-backports", packages::os_codename());
    let depends = |spec: &str| {
        output(
            Command::new("apt-cache").args(["depends", spec]),
            Duration::from_secs(60),
        )
        .ok()
        .and_then(|t| kernel_image_from_depends(&t))
    };
    let find = || match choice {
        KernelChoice::Backports => depends(&format!("linux-image-amd64/{backports}"))
            .or_else(|| depends("linux-image-amd64")),
        KernelChoice::Release => depends("linux-image-amd64"),
    };
    let name = match find() {
        Some(n) => n,
        None => {
            // Package lists may be missing or stale.
            apt_update()?;
            find().ok_or("apt-cache depends linux-image-amd64 names no kernel image")?
        }
    };
    fs::write(&pin, &name).map_err(|e| format!("write {}: {e}", pin.display()))?;
    Ok(name)
}

/// `dpkg-deb -f deb Version`.
fn deb_version(deb: &Path) -> Result<String> {
    let v = output(
        Command::new("dpkg-deb").arg("-f").arg(deb).arg("Version"),
        Duration::from_secs(60),
    )?;
    let v = v.trim();
    if v.is_empty() {
        return Err(format!("{} has no Version field", deb.display()));
    }
    Ok(v.to_string())
}

/// Downloads the kernel image package and keeps its vmlinuz and the modules of
/// [`MODULES`] with their dependencies (in load order) under `dir/<package>`.
fn ensure_kernel(dir: &Path, choice: KernelChoice) -> Result<SuiteKernel> {
    let package = kernel_package(dir, choice)?;
    let root = dir.join(&package);
    let done = root.join(".done");
    if !done.exists() {
        let _ = fs::remove_dir_all(&root);
        let mods = root.join("modules");
        fs::create_dir_all(&mods).map_err(|e| format!("create {}: {e}", mods.display()))?;
        println!("vsock-suite: downloading {package}");
        let deb = setup::download_deb(&dir.join("download"), &package, &package)?;
        let version = deb_version(&deb)?;
        let tmp = dir.join("unpack-kernel");
        let _ = fs::remove_dir_all(&tmp);
        run_cmd(
            Command::new("dpkg").arg("-x").arg(&deb).arg(&tmp),
            Duration::from_secs(600),
        )?;
        decompress_modules(&tmp.join("lib").join("modules"))?;
        let boot = tmp.join("boot");
        let vmlinuz = fs::read_dir(&boot)
            .map_err(|e| format!("read {}: {e}", boot.display()))?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("vmlinuz-"))
            })
            .ok_or_else(|| format!("{package} has no boot/vmlinuz-*"))?;
        let name = vmlinuz
            .file_name()
            .ok_or("vmlinuz has no file name")?
            .to_owned();
        let copy = |from: &Path, to: &Path| {
            fs::copy(from, to)
                .map(|_| ())
                .map_err(|e| format!("copy {} to {}: {e}", from.display(), to.display()))
        };
        copy(&vmlinuz, &root.join(name))?;
        let mut order = String::new();
        for (m, path) in setup::kernel_modules(&tmp, MODULES)? {
            copy(&path, &mods.join(format!("{m}.ko")))?;
            order.push_str(&m);
            order.push('\n');
        }
        let write = |p: PathBuf, s: &str| {
            fs::write(&p, s).map_err(|e| format!("write {}: {e}", p.display()))
        };
        write(root.join("order"), &order)?;
        write(root.join("version"), &version)?;
        let _ = fs::remove_dir_all(&tmp);
        let _ = fs::remove_file(&deb);
        write(done, "")?;
    }
    let read =
        |p: PathBuf| fs::read_to_string(&p).map_err(|e| format!("read {}: {e}", p.display()));
    let version = read(root.join("version"))?.trim().to_string();
    let modules = read(root.join("order"))?
        .lines()
        .filter(|l| !l.is_empty())
        .map(|m| (m.to_string(), root.join("modules").join(format!("{m}.ko"))))
        .collect();
    let vmlinuz = fs::read_dir(&root)
        .map_err(|e| format!("read {}: {e}", root.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .ok_or_else(|| format!("no vmlinuz-* in {}", root.display()))?;
    Ok(SuiteKernel {
        package,
        version,
        vmlinuz,
        modules,
    })
}

/// Decompresses every `*.ko.xz` under `dir` in place (Debian's kernels from 6.x on ship
/// xz-compressed modules; [`setup::kernel_modules`] reads plain `.ko` files).
fn decompress_modules(dir: &Path) -> Result<()> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = fs::read_dir(&d).map_err(|e| format!("read {}: {e}", d.display()))?;
        for path in entries.flatten().map(|e| e.path()) {
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|x| x == "xz") {
                found.push(path);
            }
        }
    }
    for chunk in found.chunks(512) {
        run_cmd(
            Command::new("xz").arg("-d").args(chunk),
            Duration::from_secs(600),
        )?;
    }
    Ok(())
}

/// Extracts `tools/testing/vsock` (with `tools/include` and the uapi vsock headers) from
/// `linux-source-X.Y` at the kernel's version and builds both tests statically.
fn ensure_suite(dir: &Path, kernel: &SuiteKernel) -> Result<Suite> {
    let mm = major_minor(&kernel.package)
        .ok_or_else(|| format!("no X.Y kernel version in {}", kernel.package))?;
    let src_pkg = format!("linux-source-{mm}");
    let tag = format!("{src_pkg}_{}", kernel.version.replace(['~', '+', ':'], "_"));
    let root = dir.join(&tag);
    let top = root.join(&src_pkg);
    let done = root.join(".extracted");
    if !done.exists() {
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).map_err(|e| format!("create {}: {e}", root.display()))?;
        let spec = format!("{src_pkg}={}", kernel.version);
        println!("vsock-suite: downloading {spec}");
        let deb = setup::download_deb(&dir.join("download"), &spec, &src_pkg)?;
        let tmp = dir.join("unpack-source");
        let _ = fs::remove_dir_all(&tmp);
        run_cmd(
            Command::new("dpkg").arg("-x").arg(&deb).arg(&tmp),
            Duration::from_secs(600),
        )?;
        let tarball = tmp
            .join("usr")
            .join("src")
            .join(format!("{src_pkg}.tar.xz"));
        println!("vsock-suite: extracting tools/testing/vsock from {src_pkg}.tar.xz");
        run_cmd(
            Command::new("tar")
                .arg("-xJf")
                .arg(&tarball)
                .arg("-C")
                .arg(&root)
                .arg("--wildcards")
                .arg(format!("{src_pkg}/tools/testing/vsock"))
                .arg(format!("{src_pkg}/tools/include"))
                .arg(format!("{src_pkg}/include/uapi/linux/vm_sockets*.h")),
            Duration::from_secs(900),
        )?;
        let _ = fs::remove_dir_all(&tmp);
        let _ = fs::remove_file(&deb);
        fs::write(&done, "").map_err(|e| format!("write {}: {e}", done.display()))?;
    }
    let vsock = top.join("tools").join("testing").join("vsock");
    // The suite includes <linux/vm_sockets.h> and <linux/vm_sockets_diag.h> from the
    // installed uapi headers (`make headers_install`); the kernel's own go first, the
    // host's linux-libc-dev provides the rest.
    let uapi = root.join("uapi");
    let uapi_linux = uapi.join("linux");
    fs::create_dir_all(&uapi_linux).map_err(|e| format!("create {}: {e}", uapi_linux.display()))?;
    for h in ["vm_sockets.h", "vm_sockets_diag.h"] {
        let from = top.join("include").join("uapi").join("linux").join(h);
        fs::copy(&from, uapi_linux.join(h)).map_err(|e| format!("copy {}: {e}", from.display()))?;
    }
    let makefile = fs::read_to_string(vsock.join("Makefile"))
        .map_err(|e| format!("read {}/Makefile: {e}", vsock.display()))?;
    let build = |target: &str| -> Result<PathBuf> {
        let bin = root.join(target);
        if bin.exists() {
            return Ok(bin);
        }
        let sources = makefile_sources(&makefile, target)
            .ok_or_else(|| format!("no rule for {target} in {}/Makefile", vsock.display()))?;
        println!("vsock-suite: building {target} ({})", sources.join(" "));
        let tmp = root.join(format!("{target}.tmp"));
        // The Makefile's CFLAGS, with the uapi directory above and -static.
        run_cmd(
            Command::new("gcc")
                .args(["-static", "-O2", "-g", "-Wall", "-I."])
                .arg("-I../../include")
                .arg(format!("-I{}", uapi.display()))
                .args([
                    "-Wno-pointer-sign",
                    "-fno-strict-overflow",
                    "-fno-strict-aliasing",
                    "-fno-common",
                    "-U_FORTIFY_SOURCE",
                    "-D_GNU_SOURCE",
                    "-o",
                ])
                .arg(&tmp)
                .args(&sources)
                .current_dir(&vsock),
            Duration::from_secs(600),
        )?;
        fs::rename(&tmp, &bin).map_err(|e| format!("rename to {}: {e}", bin.display()))?;
        Ok(bin)
    };
    let vsock_test = build("vsock_test")?;
    let vsock_diag_test = build("vsock_diag_test")?;
    let main_c = fs::read_to_string(vsock.join("vsock_test.c"))
        .map_err(|e| format!("read {}/vsock_test.c: {e}", vsock.display()))?;
    Ok(Suite {
        source: format!("{src_pkg} {}", kernel.version),
        vsock_test,
        vsock_diag_test,
        peer_port: main_c.contains("\"peer-port\""),
        pick: main_c.contains("\"pick\""),
    })
}

// ---------------------------------------------------------------------------------------
// Guests and their shells.
// ---------------------------------------------------------------------------------------

/// A shell on a guest's serial port: commands are typed in, their output is read
/// back between markers.
struct Shell {
    name: String,
    stream: UnixStream,
    transcript: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
    next: u64,
}

/// A command started in a shell.
struct Job {
    id: u64,
    what: String,
}

impl Shell {
    fn connect(path: &Path, name: &str, timeout: Duration) -> Result<Shell> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("{name}: connect {}: {e}", path.display()))
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        };
        let transcript = Arc::new(Mutex::new(String::new()));
        let mut rd = stream
            .try_clone()
            .map_err(|e| format!("{name}: clone: {e}"))?;
        let t = Arc::clone(&transcript);
        let reader = thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = rd.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buf[..n]).replace('\r', "");
                t.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push_str(&text);
            }
        });
        Ok(Shell {
            name: name.to_string(),
            stream,
            transcript,
            reader: Some(reader),
            next: 1,
        })
    }

    fn text(&self) -> String {
        self.transcript
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits until the transcript contains `needle`.
    fn wait_text(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.text().contains(needle) {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Starts `cmd` under busybox `timeout -s KILL secs`.
    fn start(&mut self, cmd: &str, secs: u64) -> Result<Job> {
        let id = self.next;
        self.next += 1;
        let line = format!("echo @@GO{id}; timeout -s KILL {secs} {cmd}; echo @@RC{id} $?\n");
        self.stream
            .write_all(line.as_bytes())
            .map_err(|e| format!("{}: write: {e}", self.name))?;
        Ok(Job {
            id,
            what: cmd.to_string(),
        })
    }

    /// The output so far of `job` (after its start marker), if it started.
    fn partial(&self, job: &Job) -> Option<String> {
        let t = self.text();
        let go = format!("@@GO{}\n", job.id);
        t.find(&go).map(|i| t[i + go.len()..].to_string())
    }

    /// Waits for `job` to end; its exit status and output.
    fn finish(&self, job: &Job, timeout: Duration) -> Result<(i32, String)> {
        let start = Instant::now();
        let mut told = false;
        loop {
            if let Some(r) = job_output(&self.text(), job.id) {
                return Ok(r);
            }
            if start.elapsed() >= timeout {
                return Err(format!(
                    "{}: `{}` (job {}) did not end within {timeout:?}; the shell's last output:\n{}",
                    self.name,
                    job.what,
                    job.id,
                    tail(&self.text(), 3000)
                ));
            }
            if !told && start.elapsed() >= Duration::from_secs(60) {
                told = true;
                println!(
                    "vsock-suite: {}: job {} still runs after 60 s; the shell's last output:\n{}",
                    self.name,
                    job.id,
                    tail(&self.text(), 1500)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// One guest: QEMU and the two shells.
struct Guest {
    cid: u32,
    qemu: Proc,
    shells: [Shell; 2],
    console: PathBuf,
    _qmp: Qmp,
}

/// Paths of a run.
struct Layout {
    dir: PathBuf,
}

impl Layout {
    fn vhost(&self, cid: u32) -> PathBuf {
        self.dir.join(format!("vhost-{cid}.sock"))
    }
    fn uds(&self, cid: u32) -> PathBuf {
        self.dir.join(format!("vsock-{cid}.sock"))
    }
    fn net(&self) -> PathBuf {
        self.dir.join("net.sock")
    }
    fn shell(&self, cid: u32, n: usize) -> PathBuf {
        self.dir.join(format!("shell-{cid}-{n}.sock"))
    }
    fn metrics(&self) -> PathBuf {
        self.dir.join("metrics.json")
    }
    fn daemon_log(&self) -> PathBuf {
        self.dir.join("daemon.log")
    }
}

/// Starts the back-end with both VMs in one sibling group.
fn start_daemon(backend: &Backend, lay: &Layout, jail: bool) -> Result<Proc> {
    let vms: Vec<String> = CIDS
        .iter()
        .map(|&c| {
            format!(
                "guest-cid={c},socket={},uds-path={},groups={GROUP}",
                lay.vhost(c).display(),
                lay.uds(c).display()
            )
        })
        .collect();
    let mut cmd = match backend {
        Backend::Outboard(bin) => {
            let mut c = Command::new(bin);
            c.arg("vsock");
            c
        }
        Backend::VhostDeviceVsock(bin) => Command::new(bin),
    };
    for vm in &vms {
        cmd.arg("--vm").arg(vm);
    }
    if let Backend::Outboard(_) = backend {
        if jail {
            cmd.arg("--jail");
        }
        // With --jail the workers publish their counters to the daemon (shared pages).
        cmd.arg("--metrics")
            .arg(lay.metrics())
            .args(["--metrics-interval", "1"]);
    }
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    let log = lay.daemon_log();
    let mut proc = Proc::spawn(backend.name(), cmd, &log)?;
    for c in CIDS {
        if !util::wait_for_path(&lay.vhost(c), Duration::from_secs(10)) {
            let running = proc.running();
            return Err(format!(
                "{} did not create {} within 10 s (running: {running})\n{}",
                backend.name(),
                lay.vhost(c).display(),
                util::read_log(&log)
            ));
        }
    }
    // With --jail each VM's worker is a process of its own; the two must be linked.
    if jail {
        let text = util::read_log(&log);
        if !text.contains("reaches 1 sibling VM(s)") {
            return Err(format!(
                "--jail: the daemon did not report the link between the two workers\n{text}"
            ));
        }
    }
    Ok(proc)
}

/// Boots guest `cid` (paused until its vsock device is plugged, see crate::qmp).
fn boot_guest(
    accel: &str,
    kernel: &Path,
    initramfs: &Path,
    lay: &Layout,
    cid: u32,
) -> Result<Guest> {
    let console = lay.dir.join(format!("console-{cid}.log"));
    let qmp_path = lay.dir.join(format!("qmp-{cid}.sock"));
    let mem = format!("{GUEST_MIB}M");
    let mut q = setup::qemu_guest(
        accel,
        1,
        &mem,
        &console,
        kernel,
        initramfs,
        &format!("console=ttyS0 panic=-1 quiet loglevel=4 vsock_suite_cid={cid}"),
    );
    q.arg("-object")
        .arg(format!("memory-backend-memfd,id=mem,size={mem},share=on"))
        .args(["-machine", "q35,memory-backend=mem"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=vhu,path={},reconnect-ms=1000",
            lay.vhost(cid).display()
        ))
        .args(["-device", "pcie-root-port,id=rp0,chassis=1,slot=1"])
        // The suite's control channel: a link to the other guest only, over one AF_UNIX
        // stream socket (CID 3's QEMU listens). Not `-netdev dgram`: an unconnected
        // datagram socket has no back-pressure from its receiver, whose queue holds only
        // net.unix.max_dgram_qlen (10) frames.
        .arg("-netdev")
        .arg(if cid == CIDS[0] {
            format!(
                "stream,id=net0,server=on,addr.type=unix,addr.path={}",
                lay.net().display()
            )
        } else {
            format!(
                "stream,id=net0,server=off,addr.type=unix,addr.path={},reconnect-ms=200",
                lay.net().display()
            )
        })
        .arg("-device")
        .arg(format!(
            "virtio-net-pci,netdev=net0,mac=52:54:00:00:00:{cid:02x}"
        ));
    // The shells: ttyS1 and ttyS2 (16550 UARTs; ttyS0 is the kernel's console). Not
    // virtio consoles: hvc input sat in the guest until the next input arrived.
    for n in 0..2 {
        q.arg("-chardev")
            .arg(format!(
                "socket,id=sh{n},path={},server=on,wait=off",
                lay.shell(cid, n).display()
            ))
            .arg("-serial")
            .arg(format!("chardev:sh{n}"));
    }
    q.arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
        .arg("-S");
    let qemu = Proc::spawn(
        &format!("qemu (CID {cid})"),
        q,
        &lay.dir.join(format!("qemu-{cid}.log")),
    )?;
    let mut qmp = Qmp::connect(&qmp_path, Duration::from_secs(30))?;
    // Connected before the guest runs, so that nothing it writes is lost.
    let shells = [
        Shell::connect(
            &lay.shell(cid, 0),
            &format!("CID {cid} shell 0"),
            Duration::from_secs(10),
        )?,
        Shell::connect(
            &lay.shell(cid, 1),
            &format!("CID {cid} shell 1"),
            Duration::from_secs(10),
        )?,
    ];
    crate::vm::plug(&mut qmp)?;
    qmp.execute(r#"{"execute":"cont"}"#)?;
    Ok(Guest {
        cid,
        qemu,
        shells,
        console,
        _qmp: qmp,
    })
}

impl Guest {
    fn wait_up(&mut self, deadline: Instant) -> Result<String> {
        for sh in &self.shells {
            let left = deadline.saturating_duration_since(Instant::now());
            if !sh.wait_text("@@UP", left) {
                return Err(format!(
                    "guest CID {}: {} did not come up; console:\n{}",
                    self.cid,
                    sh.name,
                    util::read_log(&self.console)
                ));
            }
        }
        if !self.qemu.running() {
            return Err(format!("QEMU of CID {} exited", self.cid));
        }
        Ok(self.shells[0]
            .text()
            .lines()
            .find_map(|l| l.strip_prefix("@@UP "))
            .unwrap_or_default()
            .to_string())
    }
}

// ---------------------------------------------------------------------------------------
// Runs and the report.
// ---------------------------------------------------------------------------------------

/// Which program of the suite.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Program {
    Test,
    Diag,
}

impl Program {
    fn bin(self) -> &'static str {
        match self {
            Program::Test => "vsock_test",
            Program::Diag => "vsock_diag_test",
        }
    }
}

/// One server/client pair to run.
struct Pair<'a> {
    program: Program,
    server: u32,
    client: u32,
    /// Which of each guest's shells.
    shell: usize,
    control_port: u16,
    peer_port: Option<u32>,
    extra: &'a [String],
    secs: u64,
}

/// What one run of a pair gave.
struct PairRun {
    server: (i32, String),
    client: (i32, String),
}

impl PairRun {
    fn logs(&self) -> (SideLog, SideLog) {
        (parse_side(&self.server.1), parse_side(&self.client.1))
    }

    fn ok(&self) -> bool {
        let (s, c) = self.logs();
        self.server.0 == 0 && self.client.0 == 0 && s.completed && c.completed
    }
}

fn pair_command(p: &Pair, server_side: bool) -> String {
    let mut cmd = format!("/bin/{} --control-port={}", p.program.bin(), p.control_port);
    if server_side {
        let _ = write!(cmd, " --mode=server --peer-cid={}", p.client);
    } else {
        let _ = write!(
            cmd,
            " --mode=client --control-host={} --peer-cid={}",
            guest_ip(p.server),
            p.server
        );
    }
    if let Some(port) = p.peer_port {
        let _ = write!(cmd, " --peer-port={port}");
    }
    for e in p.extra {
        cmd.push(' ');
        cmd.push_str(e);
    }
    cmd
}

/// Index of guest `cid` in `guests`.
fn at(cid: u32) -> usize {
    CIDS.iter().position(|&c| c == cid).unwrap_or(0)
}

/// Starts the server, waits for its control socket to listen, starts the client.
fn start_pair(guests: &mut [Guest], p: &Pair) -> Result<(Job, Job)> {
    let s_cmd = pair_command(p, true);
    let c_cmd = pair_command(p, false);
    let server = &mut guests[at(p.server)].shells[p.shell];
    let sj = server.start(&s_cmd, p.secs)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = server.partial(&sj).unwrap_or_default();
        if out.contains("Control socket listening") {
            break;
        }
        if job_output(&server.text(), sj.id).is_some() {
            // The server ended before listening: the client is not started; the
            // caller reads the server's output.
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{}: `{s_cmd}` (job {}) did not listen within 60 s; the shell's last output:\n{}",
                server.name,
                sj.id,
                tail(&server.text(), 3000)
            ));
        }
        thread::sleep(Duration::from_millis(20));
    }
    let client = &mut guests[at(p.client)].shells[p.shell];
    let cj = client.start(&c_cmd, p.secs)?;
    Ok((sj, cj))
}

fn finish_pair(guests: &[Guest], p: &Pair, jobs: &(Job, Job)) -> Result<PairRun> {
    let wait = Duration::from_secs(p.secs + 30);
    let (s, c) = (
        &guests[at(p.server)].shells[p.shell],
        &guests[at(p.client)].shells[p.shell],
    );
    // Either side's failure is reported with what the other side printed.
    let with_other = |e: String, other: &Shell, job: &Job| {
        format!(
            "{e}\n{} printed for job {}:\n{}",
            other.name,
            job.id,
            other.partial(job).unwrap_or_default()
        )
    };
    let server = s
        .finish(&jobs.0, wait)
        .map_err(|e| with_other(e, c, &jobs.1))?;
    let client = c
        .finish(&jobs.1, wait)
        .map_err(|e| with_other(e, s, &jobs.0))?;
    Ok(PairRun { server, client })
}

fn run_pair(guests: &mut [Guest], p: &Pair) -> Result<PairRun> {
    let jobs = start_pair(guests, p)?;
    finish_pair(guests, p, &jobs)
}

/// The daemon's counters, read after each run.
struct Counters {
    path: Option<PathBuf>,
    last: BTreeMap<u32, BTreeMap<String, u64>>,
    /// Rises of `err_*` counters: (run, CID, counter, by how much).
    rises: Vec<(String, u32, String, u64)>,
}

impl Counters {
    /// A snapshot written after `since` (the daemon rewrites the file every second).
    fn fresh(&self, since: SystemTime) -> Option<BTreeMap<u32, BTreeMap<String, u64>>> {
        let path = self.path.as_ref()?;
        let since_ms = since
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(4);
        loop {
            let (stamp, vms) = parse_metrics(&util::read_log(path));
            if stamp > since_ms && !vms.is_empty() {
                return Some(vms);
            }
            if Instant::now() >= deadline {
                return (!vms.is_empty()).then_some(vms);
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Records which error counters rose during `run` (ended at `ended`).
    fn after(&mut self, run: &str, ended: SystemTime) {
        let Some(now) = self.fresh(ended) else {
            return;
        };
        for (cid, counters) in &now {
            for (name, v) in counters {
                let before = self
                    .last
                    .get(cid)
                    .and_then(|c| c.get(name))
                    .copied()
                    .unwrap_or(0);
                if name.starts_with("err_") && *v > before {
                    self.rises
                        .push((run.to_string(), *cid, name.clone(), v - before));
                }
            }
        }
        self.last = now;
    }
}

/// One cell of the report: a test's verdict in one column, with the attempts it took.
#[derive(Clone)]
struct Cell {
    verdict: Verdict,
    attempts: u32,
}

/// A column of the report: its name and a cell per test id.
type Column = (String, BTreeMap<u32, Cell>);

/// The results of one mode (plain or jailed).
struct Results {
    names: BTreeMap<Program, Vec<(u32, String)>>,
    /// Per program, its columns in run order.
    columns: BTreeMap<Program, Vec<Column>>,
    notes: Vec<String>,
}

impl Results {
    fn column(&mut self, program: Program, name: String, cells: BTreeMap<u32, Cell>) {
        self.columns.entry(program).or_default().push((name, cells));
    }

    /// Prints the table; returns (passed, failed) over every cell.
    fn print(&self, title: &str) -> (usize, usize) {
        let (mut passed, mut failed) = (0, 0);
        println!("\n==> {title}");
        for (program, names) in &self.names {
            let cols = self.columns.get(program).map(Vec::as_slice).unwrap_or(&[]);
            let mut head = format!("  {:<52}", program.bin());
            for (c, _) in cols {
                let _ = write!(head, " {c:>12}");
            }
            println!("{head}");
            for (id, name) in names {
                let mut line = format!("  {:>2} {:<49}", id, name);
                for (_, cells) in cols {
                    let cell = match cells.get(id) {
                        None => "-".to_string(),
                        Some(c) => match &c.verdict {
                            Verdict::Pass if c.attempts > 1 => format!("ok ({})", c.attempts),
                            Verdict::Pass => "ok".to_string(),
                            Verdict::Skipped => "skipped".to_string(),
                            Verdict::Fail(_) => "FAIL".to_string(),
                        },
                    };
                    let _ = write!(line, " {cell:>12}");
                }
                println!("{line}");
            }
            for (c, cells) in cols {
                let p = cells
                    .values()
                    .filter(|x| x.verdict == Verdict::Pass)
                    .count();
                let f = cells
                    .values()
                    .filter(|x| matches!(x.verdict, Verdict::Fail(_)))
                    .count();
                println!("  {} {c}: {p} passed, {f} failed", program.bin());
                passed += p;
                failed += f;
                for (id, x) in cells {
                    if let Verdict::Fail(why) = &x.verdict {
                        println!("    FAIL {id} ({} attempts): {why}", x.attempts);
                    }
                }
            }
        }
        for n in &self.notes {
            println!("  note: {n}");
        }
        (passed, failed)
    }
}

/// The reason a test races by design, if it does.
fn racy(name: &str) -> Option<&'static str> {
    RACY.iter().find(|(n, _)| *n == name).map(|(_, why)| *why)
}

/// The arguments that run only test `id` of `all`.
fn alone_args(suite: &Suite, all: &[(u32, String)], id: u32) -> Vec<String> {
    if suite.pick {
        vec![format!("--pick={id}")]
    } else {
        all.iter()
            .filter(|(i, _)| *i != id)
            .map(|(i, _)| format!("--skip={i}"))
            .collect()
    }
}

/// Everything one mode needs while it runs.
struct Session<'a> {
    suite: &'a Suite,
    guests: Vec<Guest>,
    counters: Counters,
    results: Results,
    runs: usize,
    log: String,
}

impl Session<'_> {
    fn pair(&mut self, label: &str, p: &Pair) -> Result<PairRun> {
        let r = run_pair(&mut self.guests, p);
        self.runs += 1;
        self.counters.after(label, SystemTime::now());
        if let Ok(r) = &r {
            let _ = writeln!(
                self.log,
                "----- {label}: server CID {} rc {}, client CID {} rc {}\n[server]\n{}\n[client]\n{}",
                p.server, r.server.0, p.client, r.client.0, r.server.1, r.client.1
            );
        }
        r
    }

    /// The whole program once as upstream runs it (retried while only a racy test fails).
    fn whole(&mut self, program: Program, server: u32, client: u32) -> Result<()> {
        let names = self
            .results
            .names
            .get(&program)
            .cloned()
            .unwrap_or_default();
        let ids: Vec<u32> = names.iter().map(|(i, _)| *i).collect();
        let label = format!("{} whole, server CID {server}", program.bin());
        println!("vsock-suite: {label} ...");
        let start = Instant::now();
        let mut attempts = 0;
        let cells = loop {
            attempts += 1;
            let r = self.pair(
                &label,
                &Pair {
                    program,
                    server,
                    client,
                    shell: 0,
                    control_port: 1234,
                    peer_port: None,
                    extra: &[],
                    secs: WHOLE_SECS,
                },
            )?;
            let (s, c) = r.logs();
            let v = verdicts(&s, &c, &ids);
            let failed: Vec<&str> = names
                .iter()
                .filter(|(i, _)| matches!(v.get(i), Some(Verdict::Fail(_))))
                .map(|(_, n)| n.as_str())
                .collect();
            let retry = !r.ok()
                && attempts < RACY_ATTEMPTS
                && failed.first().is_some_and(|n| racy(n).is_some());
            if retry {
                self.results.notes.push(format!(
                    "{label}: attempt {attempts} failed at {:?}, which races by design; run again",
                    failed.first().copied().unwrap_or_default()
                ));
                continue;
            }
            break v
                .into_iter()
                .map(|(i, verdict)| (i, Cell { verdict, attempts }))
                .collect::<BTreeMap<_, _>>();
        };
        let f = cells
            .values()
            .filter(|c| matches!(c.verdict, Verdict::Fail(_)))
            .count();
        println!(
            "vsock-suite: {label}: {} passed, {f} failed ({:.1}s)",
            cells.len() - f,
            start.elapsed().as_secs_f64()
        );
        self.results
            .column(program, format!("suite srv{server}"), cells);
        Ok(())
    }

    /// Each test of the program alone.
    fn alone(&mut self, program: Program, server: u32, client: u32) -> Result<()> {
        let names = self
            .results
            .names
            .get(&program)
            .cloned()
            .unwrap_or_default();
        let start = Instant::now();
        let mut cells = BTreeMap::new();
        for (id, name) in &names {
            let extra = alone_args(self.suite, &names, *id);
            let limit = if racy(name).is_some() {
                RACY_ATTEMPTS
            } else {
                1
            };
            let label = format!("{} {id} alone, server CID {server}", program.bin());
            let mut attempts = 0;
            let verdict = loop {
                attempts += 1;
                let r = self.pair(
                    &label,
                    &Pair {
                        program,
                        server,
                        client,
                        shell: 0,
                        control_port: 1234,
                        peer_port: None,
                        extra: &extra,
                        secs: ALONE_SECS,
                    },
                )?;
                let (s, c) = r.logs();
                let mut v = verdicts(&s, &c, &[*id])
                    .remove(id)
                    .unwrap_or(Verdict::Fail("no verdict".into()));
                if v == Verdict::Pass && !r.ok() {
                    v = Verdict::Fail(format!(
                        "the test passed but the run did not complete (server rc {}, client rc {})",
                        r.server.0, r.client.0
                    ));
                }
                if let (Verdict::Fail(why), true) = (&v, attempts < limit) {
                    self.results.notes.push(format!(
                        "{label} ({name}): attempt {attempts} failed, {why}; races by design, run again"
                    ));
                    continue;
                }
                break v;
            };
            if let Verdict::Fail(why) = &verdict {
                println!("vsock-suite: {label} ({name}): FAIL {why}");
            }
            cells.insert(*id, Cell { verdict, attempts });
        }
        let f = cells
            .values()
            .filter(|c: &&Cell| matches!(c.verdict, Verdict::Fail(_)))
            .count();
        println!(
            "vsock-suite: {} each test alone, server CID {server}: {} passed, {f} failed ({:.1}s)",
            program.bin(),
            cells.len() - f,
            start.elapsed().as_secs_f64()
        );
        self.results
            .column(program, format!("alone srv{server}"), cells);
        Ok(())
    }

    /// vsock_test in both directions at once: a server and a client in each guest.
    fn both_ways(&mut self) -> Result<()> {
        let names = self
            .results
            .names
            .get(&Program::Test)
            .cloned()
            .unwrap_or_default();
        let ids: Vec<u32> = names.iter().map(|(i, _)| *i).collect();
        println!("vsock-suite: vsock_test both directions at once ...");
        let start = Instant::now();
        let mut attempts = 0;
        let pairs = [
            Pair {
                program: Program::Test,
                server: CIDS[0],
                client: CIDS[1],
                shell: 0,
                control_port: 1234,
                peer_port: Some(1234),
                extra: &[],
                secs: WHOLE_SECS,
            },
            Pair {
                program: Program::Test,
                server: CIDS[1],
                client: CIDS[0],
                shell: 1,
                control_port: 1235,
                peer_port: Some(2234),
                extra: &[],
                secs: WHOLE_SECS,
            },
        ];
        let cols = loop {
            attempts += 1;
            let j0 = start_pair(&mut self.guests, &pairs[0])?;
            let j1 = start_pair(&mut self.guests, &pairs[1])?;
            let r0 = finish_pair(&self.guests, &pairs[0], &j0)?;
            let r1 = finish_pair(&self.guests, &pairs[1], &j1)?;
            self.runs += 2;
            self.counters
                .after("vsock_test both directions at once", SystemTime::now());
            let mut cols = Vec::new();
            let mut racy_only = true;
            let mut all_ok = true;
            let mut failed = Vec::new();
            for (p, r) in pairs.iter().zip([&r0, &r1]) {
                let _ = writeln!(
                    self.log,
                    "----- both ways, server CID {}: rc {} / {}\n[server]\n{}\n[client]\n{}",
                    p.server, r.server.0, r.client.0, r.server.1, r.client.1
                );
                let (s, c) = r.logs();
                let v = verdicts(&s, &c, &ids);
                all_ok &= r.ok();
                let first_fail = names
                    .iter()
                    .find(|(i, _)| matches!(v.get(i), Some(Verdict::Fail(_))));
                if !r.ok() && first_fail.is_none_or(|(_, n)| racy(n).is_none()) {
                    racy_only = false;
                }
                if let (false, Some((_, n))) = (r.ok(), first_fail) {
                    failed.push(format!("{n:?} (server CID {})", p.server));
                }
                cols.push((p.server, v));
            }
            if !all_ok && racy_only && attempts < RACY_ATTEMPTS {
                self.results.notes.push(format!(
                    "both directions: attempt {attempts} failed at {}, which races by design; run again",
                    failed.join(" and ")
                ));
                continue;
            }
            break cols;
        };
        for (server, v) in cols {
            let cells = v
                .into_iter()
                .map(|(i, verdict)| (i, Cell { verdict, attempts }))
                .collect();
            self.results
                .column(Program::Test, format!("both srv{server}"), cells);
        }
        println!(
            "vsock-suite: both directions at once: {:.1}s",
            start.elapsed().as_secs_f64()
        );
        Ok(())
    }
}

/// Options of `cargo xtask vsock-suite`.
struct Options {
    jail: bool,
    kernel: KernelChoice,
    /// `--only NAME`: run only the tests whose name contains NAME, each alone, `repeat`
    /// times per direction (for chasing a flaky test).
    only: Option<String>,
    repeat: u32,
}

fn options(args: &[String]) -> Result<Options> {
    let mut o = Options {
        jail: crate::vm::jailed(),
        kernel: KernelChoice::Backports,
        only: None,
        repeat: 1,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--jail" => o.jail = true,
            "--kernel" => {
                o.kernel = match it.next().map(String::as_str) {
                    Some("backports") => KernelChoice::Backports,
                    Some("release") => KernelChoice::Release,
                    other => return Err(format!("--kernel {other:?}: use backports or release")),
                }
            }
            "--only" => o.only = Some(it.next().ok_or("--only needs a test name")?.clone()),
            "--repeat" => {
                o.repeat = it
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|&n| n > 0)
                    .ok_or("--repeat needs a positive number")?
            }
            "--backend" => {
                it.next();
            }
            "--release" => {}
            other => return Err(format!("vsock-suite: unknown argument {other:?}")),
        }
    }
    Ok(o)
}

/// `cargo xtask vsock-suite [--jail] [--kernel backports|release] [--backend B]
/// [--only NAME --repeat N]`: returns whether every test passed and the daemon ended
/// cleanly.
pub fn run(backend: Backend, args: &[String]) -> Result<bool> {
    let whole = Instant::now();
    let opts = options(args)?;
    if opts.jail && !matches!(backend, Backend::Outboard(_)) {
        return Err("--jail is an outboard flag".into());
    }
    setup::ensure_packages()?;
    packages::ensure(&["xz-utils"])?;
    let cache = setup::cache_dir().join("vsock-suite");
    fs::create_dir_all(&cache).map_err(|e| format!("create {}: {e}", cache.display()))?;
    let kernel = ensure_kernel(&cache, opts.kernel)?;
    let suite = ensure_suite(&cache, &kernel)?;
    let initramfs = setup::build_initramfs(
        &cache,
        &format!("initramfs-{}.cpio.gz", kernel.package),
        &init(),
        &[
            ("vsock_test", suite.vsock_test.as_path()),
            ("vsock_diag_test", suite.vsock_diag_test.as_path()),
        ],
        &kernel.modules,
    )?;
    let accel = match std::env::var("OUTBOARD_E2E_ACCEL") {
        Ok(a) => a,
        Err(_) => setup::probe_accel(&setup::cache_dir(), &kernel.vmlinuz, &initramfs),
    };
    let list = |bin: &Path| -> Result<Vec<(u32, String)>> {
        // --list exits with status 1 after printing: read stdout whatever the status.
        let out = Command::new(bin)
            .arg("--list")
            .output()
            .map_err(|e| format!("{} --list: {e}", bin.display()))?;
        let tests = parse_list(&String::from_utf8_lossy(&out.stdout));
        if tests.is_empty() {
            return Err(format!("{} --list printed no tests", bin.display()));
        }
        Ok(tests)
    };
    let mut names = BTreeMap::new();
    names.insert(Program::Test, list(&suite.vsock_test)?);
    names.insert(Program::Diag, list(&suite.vsock_diag_test)?);
    let mode = if opts.jail { "jailed" } else { "plain" };
    println!(
        "vsock-suite: guest kernel {} {} ({accel}), suite from {}: vsock_test {} tests, \
         vsock_diag_test {} tests; back-end {} ({mode}); prepared in {:.1}s",
        kernel.package,
        kernel.version,
        suite.source,
        names[&Program::Test].len(),
        names[&Program::Diag].len(),
        backend.name(),
        whole.elapsed().as_secs_f64()
    );

    let lay = Layout {
        dir: std::env::temp_dir().join(format!(
            "outboard-vsock-suite-{mode}-{}",
            std::process::id()
        )),
    };
    let _ = fs::remove_dir_all(&lay.dir);
    fs::create_dir_all(&lay.dir).map_err(|e| format!("create {}: {e}", lay.dir.display()))?;
    if opts.jail {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&lay.dir, fs::Permissions::from_mode(0o777))
            .map_err(|e| format!("chmod {}: {e}", lay.dir.display()))?;
    }
    let mut daemon = start_daemon(&backend, &lay, opts.jail)?;
    let booted = Instant::now();
    let mut guests = Vec::new();
    for cid in CIDS {
        guests.push(boot_guest(&accel, &kernel.vmlinuz, &initramfs, &lay, cid)?);
    }
    let deadline = Instant::now() + BOOT_TIMEOUT;
    for g in &mut guests {
        let up = g.wait_up(deadline)?;
        println!("vsock-suite: guest {up} up");
    }
    println!(
        "vsock-suite: both guests up {:.1}s after QEMU started",
        booted.elapsed().as_secs_f64()
    );
    let metrics = matches!(backend, Backend::Outboard(_));
    let mut s = Session {
        suite: &suite,
        guests,
        counters: Counters {
            path: metrics.then(|| lay.metrics()),
            last: BTreeMap::new(),
            rises: Vec::new(),
        },
        results: Results {
            names,
            columns: BTreeMap::new(),
            notes: RACY
                .iter()
                .map(|(n, why)| format!("{n:?} gets {RACY_ATTEMPTS} attempts: {why}"))
                .collect(),
        },
        runs: 0,
        log: String::new(),
    };
    s.counters.after("boot", SystemTime::now());
    let tests_started = Instant::now();
    let outcome = match &opts.only {
        Some(only) => flake_hunt(&mut s, only, opts.repeat),
        None => all_runs(&mut s),
    };
    let tests_took = tests_started.elapsed();
    let transcript = lay.dir.join("runs.log");
    let _ = fs::write(&transcript, &s.log);

    // The daemon must end cleanly, and say nothing a peer's error would make it say.
    let stop = daemon.terminate(Duration::from_secs(15));
    let mut problems = Vec::new();
    match &stop {
        Ok(st) if st.success() => {}
        Ok(st) => problems.push(format!("the daemon exited with {st} after SIGTERM")),
        Err(e) => problems.push(e.clone()),
    }
    if let Err(e) = &outcome {
        problems.push(e.clone());
    }
    let log = util::read_log(&lay.daemon_log());
    if let Backend::Outboard(_) = backend {
        let deaths = util::worker_deaths(&log);
        if !deaths.is_empty() {
            problems.push(format!(
                "worker deaths in the daemon log:\n{}",
                deaths.join("\n")
            ));
        }
        if opts.jail && !log.contains("worker runs jailed") {
            problems.push("--jail, but no worker reported running jailed".into());
        }
    }
    if metrics {
        // The file is rewritten at exit: the final counters.
        s.counters.after("after SIGTERM", SystemTime::UNIX_EPOCH);
    }
    let (passed, failed) = s.results.print(&format!(
        "vsock-suite ({mode}, {}): {} ({}), {}",
        backend.name(),
        kernel.package,
        kernel.version,
        suite.source
    ));
    println!("\n==> error counters (err_*) that rose, by run");
    if !metrics {
        println!("  (no metrics: {mode} {})", backend.name());
    } else if s.counters.rises.is_empty() {
        println!("  none");
    }
    for (run, cid, name, by) in &s.counters.rises {
        println!("  CID {cid} {name} +{by}: {run}");
        if is_protocol_error(name) {
            problems.push(format!(
                "protocol error counter {name} rose by {by} on CID {cid} during {run}"
            ));
        }
    }
    if metrics {
        let mut total = String::new();
        for (cid, c) in &s.counters.last {
            for (name, v) in c.iter().filter(|(n, v)| n.starts_with("err_") && **v > 0) {
                let _ = write!(total, " CID{cid}:{name}={v}");
            }
        }
        println!(
            "  totals at exit:{}",
            if total.is_empty() {
                " all zero"
            } else {
                &total
            }
        );
    }
    for p in &problems {
        println!("vsock-suite: PROBLEM: {p}");
    }
    println!(
        "vsock-suite ({mode}): {passed} passed, {failed} failed in {} runs; tests {:.1}s, whole {:.1}s; \
         daemon stop: {}; transcripts in {}",
        s.runs,
        tests_took.as_secs_f64(),
        whole.elapsed().as_secs_f64(),
        match &stop {
            Ok(st) => st.to_string(),
            Err(e) => e.clone(),
        },
        transcript.display()
    );
    let ok = failed == 0 && passed > 0 && problems.is_empty();
    if !ok {
        for g in &s.guests {
            eprintln!(
                "===== console of CID {} =====\n{}",
                g.cid,
                util::read_log(&g.console)
            );
        }
        eprintln!("===== daemon log =====\n{log}");
    }
    drop(s);
    if ok {
        let _ = fs::remove_dir_all(&lay.dir);
    }
    Ok(ok)
}

/// The full sequence: server in CID 3, then in CID 4; then both directions at once.
fn all_runs(s: &mut Session) -> Result<()> {
    for (server, client) in [(CIDS[0], CIDS[1]), (CIDS[1], CIDS[0])] {
        for program in [Program::Test, Program::Diag] {
            s.whole(program, server, client)?;
            s.alone(program, server, client)?;
        }
    }
    if s.suite.peer_port {
        s.both_ways()?;
    } else {
        s.results
            .notes
            .push("this suite has no --peer-port: no run in both directions at once".into());
    }
    Ok(())
}

/// `--only NAME --repeat N`: the matching tests alone, N times per direction.
fn flake_hunt(s: &mut Session, only: &str, repeat: u32) -> Result<()> {
    let mut picked = Vec::new();
    for program in [Program::Test, Program::Diag] {
        let names = s.results.names.get(&program).cloned().unwrap_or_default();
        for (id, name) in names.iter().filter(|(_, n)| n.contains(only)) {
            picked.push((program, *id, name.clone(), alone_args(s.suite, &names, *id)));
        }
    }
    if picked.is_empty() {
        return Err(format!("no test name contains {only:?}"));
    }
    for (server, client) in [(CIDS[0], CIDS[1]), (CIDS[1], CIDS[0])] {
        for (program, id, name, extra) in &picked {
            let mut cells = BTreeMap::new();
            let mut fails = 0;
            for round in 0..repeat {
                let label = format!("{} {id} round {round}, server CID {server}", program.bin());
                let r = s.pair(
                    &label,
                    &Pair {
                        program: *program,
                        server,
                        client,
                        shell: 0,
                        control_port: 1234,
                        peer_port: None,
                        extra,
                        secs: ALONE_SECS,
                    },
                )?;
                let (sl, cl) = r.logs();
                let v = verdicts(&sl, &cl, &[*id])
                    .remove(id)
                    .unwrap_or(Verdict::Fail("no verdict".into()));
                if let Verdict::Fail(why) = &v {
                    fails += 1;
                    println!("vsock-suite: {label}: FAIL {why}");
                }
                cells.insert(
                    *id,
                    Cell {
                        verdict: v,
                        attempts: 1,
                    },
                );
            }
            println!(
                "vsock-suite: {name} alone, server CID {server}: {} of {repeat} passed",
                repeat - fails
            );
            s.results.notes.push(format!(
                "{name}, server CID {server}: {} of {repeat} runs passed",
                repeat - fails
            ));
            if fails > 0 {
                cells.insert(
                    *id,
                    Cell {
                        verdict: Verdict::Fail(format!("{fails} of {repeat} runs failed")),
                        attempts: repeat,
                    },
                );
            }
            s.results
                .column(*program, format!("x{repeat} srv{server}"), cells);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_names() {
        let deps = "linux-image-amd64\n  Depends: linux-image-6.12.95+deb12-amd64\n";
        assert_eq!(
            kernel_image_from_depends(deps).as_deref(),
            Some("linux-image-6.12.95+deb12-amd64")
        );
        assert_eq!(kernel_image_from_depends("linux-image-amd64\n"), None);
        assert_eq!(
            major_minor("linux-image-6.12.95+deb12-amd64").as_deref(),
            Some("6.12")
        );
        assert_eq!(
            major_minor("linux-image-6.1.0-57-amd64").as_deref(),
            Some("6.1")
        );
        assert_eq!(major_minor("linux-image-amd64"), None);
        assert_eq!(major_minor("linux-image-6-amd64"), None);
    }

    #[test]
    fn makefile_rules() {
        // tools/testing/vsock/Makefile of Linux 6.12.
        let mk = "all: test vsock_perf\n\
                  test: vsock_test vsock_diag_test vsock_uring_test\n\
                  vsock_test: vsock_test.o vsock_test_zerocopy.o timeout.o control.o util.o msg_zerocopy_common.o\n\
                  vsock_diag_test: vsock_diag_test.o timeout.o control.o util.o\n\
                  vsock_uring_test: LDLIBS = -luring\n\
                  vsock_uring_test: control.o util.o vsock_uring_test.o timeout.o msg_zerocopy_common.o\n";
        assert_eq!(
            makefile_sources(mk, "vsock_diag_test").unwrap(),
            ["vsock_diag_test.c", "timeout.c", "control.c", "util.c"]
        );
        assert_eq!(makefile_sources(mk, "vsock_test").unwrap().len(), 6);
        assert_eq!(
            makefile_sources(mk, "vsock_uring_test").unwrap()[2],
            "vsock_uring_test.c"
        );
        assert_eq!(makefile_sources(mk, "vsock_perf"), None);
    }

    #[test]
    fn list_output() {
        let out = "ID\tTest name\n0\tSOCK_STREAM connection reset\n1\tSOCK_STREAM bind only\n\
                   21\tSOCK_STREAM double bind connect\n";
        let l = parse_list(out);
        assert_eq!(l.len(), 3);
        assert_eq!(l[2], (21, "SOCK_STREAM double bind connect".to_string()));
    }

    /// A server transcript as util.c's run_tests prints it, with a skipped test, a test
    /// that prints before its `ok`, and the final barrier.
    const SERVER_OK: &str = "Control socket listening on 0.0.0.0:1234\n\
        Control socket connection accepted...\n\
        0 - SOCK_STREAM connection reset...ok\n\
        1 - SOCK_STREAM bind only...skipped\n\
        2 - SOCK_STREAM ioctl(SIOCOUTQ) 0 unsent bytes...Test skipped, SIOCOUTQ not supported.\n\
        ok\n\
        3 - SOCK_STREAM poll() + SO_RCVLOWAT...ok\n\
        All tests have been executed. Waiting other peer...ok\n";

    #[test]
    fn run_output_passes() {
        let s = parse_side(SERVER_OK);
        assert!(s.completed);
        assert_eq!(s.tests.len(), 4);
        assert_eq!(s.tests[&0].1, Said::Ok(String::new()));
        assert_eq!(s.tests[&1].1, Said::Skipped);
        assert_eq!(
            s.tests[&2].1,
            Said::Ok("Test skipped, SIOCOUTQ not supported.".into())
        );
        assert_eq!(s.tests[&3].0, "SOCK_STREAM poll() + SO_RCVLOWAT");
        let v = verdicts(&s, &s, &[0, 1, 2, 3, 4]);
        assert_eq!(v[&0], Verdict::Pass);
        assert_eq!(v[&1], Verdict::Skipped);
        assert!(matches!(&v[&4], Verdict::Fail(w) if w.contains("not reached")));
    }

    #[test]
    fn run_output_fails() {
        let client = "Control socket connected to 10.0.2.3:1234.\n\
            0 - SOCK_STREAM connection reset...ok\n\
            1 - SOCK_STREAM double bind connect...bind: Address already in use\n";
        let server = "Control socket listening on 0.0.0.0:1234\n\
            0 - SOCK_STREAM connection reset...ok\n\
            1 - SOCK_STREAM double bind connect...control socket closed\n";
        let (s, c) = (parse_side(server), parse_side(client));
        assert!(!s.completed && !c.completed);
        assert_eq!(
            c.tests[&1].1,
            Said::Failed("bind: Address already in use".into())
        );
        let v = verdicts(&s, &c, &[0, 1]);
        assert_eq!(v[&0], Verdict::Pass);
        match &v[&1] {
            Verdict::Fail(w) => assert!(w.contains("Address already in use"), "{w}"),
            other => panic!("{other:?}"),
        }
        // A run killed by the timeout: the last test has no verdict.
        let killed = parse_side("0 - SOCK_STREAM MSG_PEEK...");
        assert_eq!(killed.tests[&0].1, Said::Failed(String::new()));
    }

    #[test]
    fn tails_keep_whole_characters() {
        assert_eq!(tail("abc", 2), "bc");
        assert_eq!(tail("abc", 10), "abc");
        assert_eq!(tail("a\u{fffd}b", 2), "\u{fffd}b");
    }

    #[test]
    fn shell_jobs() {
        let t = "@@UP 3 6.12\n@@GO1\nhello\n@@RC1 0\n@@GO2\nx\n@@RC2 1";
        assert_eq!(job_output(t, 1), Some((0, "hello\n".into())));
        // The status line is not complete yet.
        assert_eq!(job_output(t, 2), None);
        assert_eq!(
            job_output("@@GO12\n@@RC12 137\n", 12),
            Some((137, String::new()))
        );
        assert_eq!(job_output("@@GO12\n@@RC12 137\n", 1), None);
    }

    #[test]
    fn metrics_file() {
        let m = "{\n  \"timestamp_ms\": 1700000000123,\n  \"vms\": [\n    {\n      \"guest_cid\": 3,\n\
                 \"socket\": \"/tmp/a.sock\",\n      \"counters\": {\n        \"rx_packets\": 10,\n\
                 \"err_no_connection\": 2\n      }\n    },\n    {\n      \"guest_cid\": 4,\n\
                 \"socket\": \"/tmp/b.sock\",\n      \"counters\": {\n        \"err_queue\": 0\n      }\n    }\n  ]\n}\n";
        let (stamp, vms) = parse_metrics(m);
        assert_eq!(stamp, 1_700_000_000_123);
        assert_eq!(vms[&3]["err_no_connection"], 2);
        assert_eq!(vms[&3]["rx_packets"], 10);
        assert_eq!(vms[&4]["err_queue"], 0);
        assert!(!vms[&3].contains_key("socket"));
        assert!(is_protocol_error("err_queue") && !is_protocol_error("err_no_connection"));
    }

    #[test]
    fn one_test_alone() {
        let all: Vec<(u32, String)> = (0..3).map(|i| (i, format!("t{i}"))).collect();
        let mut suite = Suite {
            source: String::new(),
            vsock_test: PathBuf::new(),
            vsock_diag_test: PathBuf::new(),
            peer_port: true,
            pick: false,
        };
        assert_eq!(alone_args(&suite, &all, 1), ["--skip=0", "--skip=2"]);
        suite.pick = true;
        assert_eq!(alone_args(&suite, &all, 1), ["--pick=1"]);
        assert!(racy("SOCK_STREAM double bind connect").is_some());
        assert!(racy("SOCK_STREAM bind only").is_none());
    }
}
