//! `cargo xtask fuzz media_proxy`: the V4L2 proxy's fuzz target needs a V4L2 node, which
//! no host here has (and modules cannot be loaded on it). So, like `media-e2e`, a QEMU
//! guest (the e2e kernel) loads vivid, here with one single-planar and one
//! multi-planar capture node and without vivid's error-injection controls (one of them
//! unregisters the node: a fuzzer that found it would only fuzz a dead node). The
//! libFuzzer binary (dynamically linked: it, its libraries and the loader are copied
//! into the initramfs) runs over the committed corpus on each node for half the time.
//!
//! The guest prints libFuzzer's output on its serial console, each line prefixed, then
//! the new corpus inputs and any crash inputs as base64 of a gzip'd tar between marker
//! lines; this side unpacks them into `target/fuzz-corpus/media_proxy` and
//! `target/fuzz-artifacts/media_proxy/` as for the other targets.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::setup;
use crate::util::{self, Proc, Result};

/// The vivid nodes: video0 single-planar, video1 multi-planar.
const NODES: [&str; 2] = ["video0", "video1"];

/// Marker prefixes of the guest's console lines.
const LOG: &str = "fuzz| ";
const TAG: &str = "fuzz-guest:";

/// The guest's /init: vivid, the fuzzer on each node, the corpus and crash inputs out,
/// power off.
fn init(seconds: u64) -> String {
    let half = seconds.div_ceil(2);
    let mut body = format!(
        r#"echo "{TAG} guest up, $(uname -r)"
mkdir -p /tmp/new /tmp/crash
for n in {nodes}; do
    echo "{TAG} node $n"
    OUTBOARD_FUZZ_V4L2_NODE=/dev/$n /bin/media_proxy -max_total_time={half} -timeout=60 \
        -rss_limit_mb=3072 -print_final_stats=1 -artifact_prefix=/tmp/crash/ /tmp/new /corpus \
        > /tmp/log 2>&1
    rc=$?
    sed 's/^/{LOG}/' /tmp/log
    # A fuzzer killed from outside (the OOM killer) leaves its reason in the kernel log.
    [ $rc -ne 0 ] && dmesg | tail -n 40 | sed 's/^/{TAG} dmesg| /'
    echo "{TAG} exit $n $rc"
done
"#,
        nodes = NODES.join(" ")
    );
    for (what, dir) in [("corpus", "/tmp/new"), ("crash", "/tmp/crash")] {
        body.push_str(&format!(
            "echo \"{TAG} begin {what}\"\ntar c -C {dir} . | gzip | base64\necho \"{TAG} end {what}\"\n"
        ));
    }
    body.push_str(&format!("echo \"{TAG} END\"\npoweroff -f\n"));
    setup::init_with(
        &setup::Prelude {
            tag: "fuzz-guest",
            before: "",
            tmp: Some(""),
            params: &[(
                "vivid.ko",
                "n_devs=2 multiplanar=1,2 node_types=0x1,0x1 no_error_inj=1",
            )],
        },
        &body,
    )
}

/// The base64 text between the `begin`/`end` marker lines of `what`.
fn block(console: &str, what: &str) -> Option<String> {
    let begin = format!("{TAG} begin {what}");
    let end = format!("{TAG} end {what}");
    let mut lines = console.lines().map(str::trim);
    lines.find(|l| *l == begin)?;
    let mut text = String::new();
    for l in lines {
        if l == end {
            return Some(text);
        }
        text.push_str(l);
    }
    None
}

/// Unpacks the base64 gzip'd tar in `text` into `dir`; returns how many files it held.
fn unpack(text: &str, dir: &Path) -> Result<usize> {
    fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let before = fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("base64 -d | tar xz -C \"$1\"")
        .arg("sh")
        .arg(dir)
        .stdin(Stdio::piped())
        .spawn()
        .map_err(|e| format!("run base64 | tar: {e}"))?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().ok_or("no stdin for base64")?;
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| format!("write to base64: {e}"))?;
    }
    let status = child.wait().map_err(|e| format!("wait for tar: {e}"))?;
    if !status.success() {
        return Err(format!(
            "base64 -d | tar xz into {} failed: {status}",
            dir.display()
        ));
    }
    let after = fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    Ok(after.saturating_sub(before))
}

/// What one guest run reports per node: (node, exit status, executions, edges).
pub struct NodeRun {
    /// The node (`video0`, `video1`).
    pub node: &'static str,
    /// libFuzzer's exit status, if the guest printed it.
    pub exit: Option<i32>,
    /// Executions (`stat::number_of_executed_units`).
    pub execs: Option<u64>,
    /// Edges covered (the last `cov:`).
    pub cov: Option<u64>,
}

/// The per-node figures in the console.
fn node_runs(console: &str) -> Vec<NodeRun> {
    NODES
        .iter()
        .map(|node| {
            let start = format!("{TAG} node {node}");
            let exit = format!("{TAG} exit {node} ");
            let section: String = console
                .lines()
                .skip_while(|l| l.trim() != start)
                .take_while(|l| !l.trim().starts_with(&exit))
                .filter_map(|l| l.trim().strip_prefix(LOG.trim_end()))
                .map(|l| format!("{}\n", l.trim_start()))
                .collect();
            let (cov, execs) = crate::fuzz::figures(&section);
            let exit = console
                .lines()
                .find_map(|l| l.trim().strip_prefix(&exit))
                .and_then(|rc| rc.trim().parse().ok());
            NodeRun {
                node,
                exit,
                execs,
                cov,
            }
        })
        .collect()
}

/// Runs the `media_proxy` fuzzer `bin` in the vivid guest for `seconds` over `corpus`;
/// new inputs go to `scratch`, crash inputs to `artifacts`, the guest's console to
/// `log`. Returns each node's figures; an error when the guest gave no result or a
/// fuzzer failed (a crash, a timeout, a leak).
pub fn run(
    bin: &Path,
    corpus: &Path,
    scratch: &Path,
    artifacts: &Path,
    seconds: u64,
    log: &Path,
) -> Result<Vec<NodeRun>> {
    let cache = setup::cache_dir();
    fs::create_dir_all(&cache).map_err(|e| format!("create {}: {e}", cache.display()))?;
    setup::ensure_packages()?;
    let (kernel, root) = setup::ensure_kernel_package(&cache)?;
    let modules = setup::kernel_modules(&root, &["vivid"])?;
    let mut files: Vec<(String, PathBuf)> = vec![("media_proxy".into(), bin.to_owned())];
    for lib in crate::media_e2e::ldd_files(bin)? {
        files.push((lib.to_string_lossy().into_owned(), lib));
    }
    let mut inputs = 0;
    for entry in fs::read_dir(corpus).map_err(|e| format!("read {}: {e}", corpus.display()))? {
        let path = entry.map_err(|e| e.to_string())?.path();
        if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
            files.push((format!("/corpus/{name}"), path.clone()));
            inputs += 1;
        }
    }
    let files: Vec<(&str, &Path)> = files
        .iter()
        .map(|(n, p)| (n.as_str(), p.as_path()))
        .collect();
    let initramfs = setup::build_initramfs(
        &cache,
        "fuzz-media-proxy.cpio.gz",
        &init(seconds),
        &files,
        &modules,
    )?;
    let accel = std::env::var("OUTBOARD_E2E_ACCEL")
        .unwrap_or_else(|_| setup::probe_accel(&cache, &kernel, &initramfs));
    let dir = cache.join("fuzz-media-proxy-run");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let console = dir.join("console.log");
    // Room for what a hostile program may make the two sides hold at once: the proxy's
    // USERPTR shadows (`MAX_DEVICE_SHADOW`, 1 GiB) and vivid's MMAP buffers (up to 32 of
    // its largest frame, about 1.1 GiB), with ASan's shadow and quarantine on top. The
    // fuzzer is one thread, vivid's frame generator another.
    let qemu = setup::qemu_guest(
        &accel,
        2,
        "4G",
        &console,
        &kernel,
        &initramfs,
        "console=ttyS0 panic=-1 quiet loglevel=3",
    );
    println!(
        "==> fuzz media_proxy in a guest ({accel}, vivid {}), {seconds}s over {inputs} inputs",
        NODES.join(" and ")
    );
    let mut proc = Proc::spawn("qemu", qemu, &dir.join("qemu.log"))?;
    // Boot, corpus loading (slow under TCG) and the dump, on top of the fuzzing time.
    let deadline = Instant::now() + Duration::from_secs(seconds + 600);
    let end = format!("{TAG} END");
    while Instant::now() < deadline {
        if util::read_log(&console).lines().any(|l| l.trim() == end) || !proc.running() {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = proc.terminate(Duration::from_secs(5));
    let text = util::read_log(&console);
    fs::write(log, &text).map_err(|e| format!("write {}: {e}", log.display()))?;
    if !text.lines().any(|l| l.trim() == end) {
        return Err(format!(
            "the fuzz guest did not finish within {}s (console: {}, QEMU log: {})",
            seconds + 600,
            log.display(),
            dir.join("qemu.log").display()
        ));
    }
    let new = match block(&text, "corpus") {
        Some(b) => unpack(&b, scratch)?,
        None => return Err(format!("no corpus block in {}", log.display())),
    };
    let names = |dir: &Path| -> Vec<String> {
        fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let before = names(artifacts);
    match block(&text, "crash") {
        Some(b) => unpack(&b, artifacts)?,
        None => return Err(format!("no crash block in {}", log.display())),
    };
    // libFuzzer also writes inputs slower than 10 s there (`slow-unit-*`): under TCG
    // those are the node's own time (hundreds of opens of a vivid node), reported but
    // not failures; a hang is libFuzzer's timeout, a crash input.
    let (mut crashes, mut slow) = (0, 0);
    for name in names(artifacts).iter().filter(|n| !before.contains(n)) {
        if name.starts_with("slow-unit-") {
            slow += 1;
        } else {
            crashes += 1;
        }
    }
    println!(
        "==> fuzz media_proxy: {new} new inputs in {}, {slow} inputs slower than 10 s",
        scratch.display()
    );
    let runs = node_runs(&text);
    let failed: Vec<String> = runs
        .iter()
        .filter(|r| r.exit != Some(0))
        .map(|r| format!("{} (exit {:?})", r.node, r.exit))
        .collect();
    if !failed.is_empty() || crashes > 0 {
        return Err(format!(
            "media_proxy failed on {} with {crashes} crash inputs in {}",
            failed.join(", "),
            artifacts.display()
        ));
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_init_runs_both_nodes_and_dumps_both_blocks() {
        let s = init(60);
        assert!(s.contains("no_error_inj=1"), "{s}");
        assert!(s.contains("-max_total_time=30"), "{s}");
        assert!(s.contains("for n in video0 video1; do"), "{s}");
        assert!(s.contains("tar c -C /tmp/new . | gzip | base64"), "{s}");
        assert!(s.contains("tar c -C /tmp/crash . | gzip | base64"), "{s}");
        assert!(s.trim_end().ends_with("poweroff -f"), "{s}");
    }

    #[test]
    fn node_figures_come_from_each_nodes_own_lines() {
        let console = "\
fuzz-guest: node video0\r
fuzz| #100\tpulse  cov: 10 ft: 3\r
fuzz| #200\tDONE   cov: 12 ft: 4\r
fuzz| stat::number_of_executed_units: 200\r
fuzz-guest: exit video0 0\r
fuzz-guest: node video1\r
fuzz| #7\tDONE   cov: 30 ft: 9\r
fuzz| stat::number_of_executed_units: 7\r
fuzz-guest: exit video1 77\r
";
        let runs = node_runs(console);
        assert_eq!(runs.len(), 2);
        assert_eq!(
            (runs[0].exit, runs[0].execs, runs[0].cov),
            (Some(0), Some(200), Some(12))
        );
        assert_eq!(
            (runs[1].exit, runs[1].execs, runs[1].cov),
            (Some(77), Some(7), Some(30))
        );
    }

    #[test]
    fn a_block_is_the_text_between_its_markers() {
        let console =
            "x\nfuzz-guest: begin corpus\r\nQUJD\r\nREVG\r\nfuzz-guest: end corpus\r\ny\n";
        assert_eq!(block(console, "corpus").as_deref(), Some("QUJDREVG"));
        assert_eq!(block(console, "crash"), None);
        assert_eq!(block("fuzz-guest: begin crash\nAA\n", "crash"), None);
    }

    #[test]
    fn a_block_unpacks_into_the_directory() {
        let tmp = std::env::temp_dir().join(format!("xtask-fuzz-guest-{}", std::process::id()));
        let src = tmp.join("src");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("a"), b"one").unwrap();
        fs::write(src.join("b"), b"two").unwrap();
        let out = Command::new("sh")
            .arg("-c")
            .arg("tar c -C \"$1\" . | gzip | base64")
            .arg("sh")
            .arg(&src)
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let dst = tmp.join("dst");
        assert_eq!(unpack(&text, &dst).unwrap(), 2);
        assert_eq!(fs::read(dst.join("b")).unwrap(), b"two");
        assert!(unpack("not base64 !!", &dst).is_err());
        fs::remove_dir_all(&tmp).unwrap();
    }
}
