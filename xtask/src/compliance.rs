//! `cargo xtask media-compliance`: `v4l2-compliance` (Debian's v4l-utils) against the
//! software camera, single-planar and multi-planar, through `outboard-v4l2-shim`, the
//! `LD_PRELOAD` stand-in for the virtio-media guest driver: the fast layer under
//! `media-guest`, which runs the real driver. Two versions, all four runs at once:
//! bookworm's 1.22.1 (installed on the host) and trixie's 1.30.1 from the root that
//! `media-guest` makes, run on the host through that root's own dynamic loader (1.30
//! checks more: CREATE_BUFS lengths, for one). Passes when every run reports `Failed: 0`.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::setup;
use crate::util::{self, Result};

/// The modes: name and `OUTBOARD_V4L2_SHIM_MPLANE`.
const MODES: [(&str, &str); 2] = [("single-planar", "0"), ("multi-planar", "1")];
/// `v4l2-compliance` arguments after `-d NODE`: streaming (MMAP, USERPTR, DMABUF, with
/// select and epoll) and streaming of every format, size and interval.
const ARGS: [&str; 2] = ["-s", "-f"];
/// Longest a run may take.
const TIMEOUT: Duration = Duration::from_secs(300);

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| util::workspace_root().join("target"))
}

fn build_shim() -> Result<PathBuf> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["build", "-p", "outboard-v4l2-shim"]);
    util::run(&mut cmd, Duration::from_secs(1800))?;
    let lib = target_dir().join("debug").join("liboutboard_v4l2_shim.so");
    if lib.exists() {
        Ok(lib)
    } else {
        Err(format!("cargo build left no {}", lib.display()))
    }
}

/// A character device node with V4L2's major number: `v4l2-compliance` stats it, the
/// shim intercepts its open.
fn make_node(dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let node = dir.join("video0");
    let _ = fs::remove_file(&node);
    util::run(
        Command::new("mknod").arg(&node).args(["c", "81", "0"]),
        Duration::from_secs(10),
    )
    .map_err(|e| format!("{e} (creating a device node needs root)"))?;
    Ok(node)
}

/// The `Total for ...` line of a report, and its failure count.
fn totals(report: &str) -> Option<(String, u64)> {
    let line = report.lines().rev().find(|l| l.starts_with("Total for "))?;
    let failed = line
        .split(", ")
        .find_map(|f| f.strip_prefix("Failed: "))?
        .trim()
        .parse()
        .ok()?;
    Some((line.to_string(), failed))
}

/// Runs the suite in every mode; true when all pass.
pub fn run() -> Result<bool> {
    setup::ensure_v4l2_compliance()?;
    let shim = build_shim()?;
    let root = crate::media_guest::trixie_root()?;
    let dir = target_dir().join("media-compliance");
    let node = make_node(&dir)?;
    let lib = root.join("usr/lib/x86_64-linux-gnu");
    let tools = [
        ("1.22", vec![PathBuf::from("v4l2-compliance")]),
        (
            "1.30",
            vec![
                lib.join("ld-linux-x86-64.so.2"),
                "--library-path".into(),
                lib.clone(),
                root.join("usr/bin/v4l2-compliance"),
            ],
        ),
    ];
    // Every run at once: they mostly wait for frames.
    let mut runs = Vec::new();
    for ((mode, mplane), (version, argv)) in MODES
        .iter()
        .flat_map(|m| tools.iter().map(move |t| (*m, t)))
    {
        let mode = format!("{mode} {version}");
        let log = dir.join(format!("{}.log", mode.replace(' ', "-")));
        let out = File::create(&log).map_err(|e| format!("create {}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("dup {}: {e}", log.display()))?;
        println!(
            "==> v4l2-compliance, {mode} camera (log: {})",
            log.display()
        );
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .arg("-d")
            .arg(&node)
            .args(ARGS)
            .env("LD_PRELOAD", &shim)
            .env("OUTBOARD_V4L2_SHIM_DEVICE", &node)
            .env("OUTBOARD_V4L2_SHIM_MPLANE", mplane)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("could not start v4l2-compliance: {e}"))?;
        runs.push((mode, log, child));
    }
    let mut ok = true;
    let mut summary = Vec::new();
    for (mode, log, mut child) in runs {
        let status = match util::wait_timeout(&mut child, TIMEOUT) {
            Ok(Some(s)) => Some(s),
            Ok(None) | Err(_) => {
                util::kill_and_reap(&mut child);
                None
            }
        };
        let report = util::read_log(&log);
        for l in report
            .lines()
            .filter(|l| l.contains("fail:") || l.contains("warn:"))
        {
            println!("  {mode}: {}", l.trim());
        }
        match (status, totals(&report)) {
            (Some(s), Some((line, 0))) if s.success() => summary.push(format!("{mode}: {line}")),
            (s, t) => {
                ok = false;
                summary.push(format!(
                    "{mode}: FAILED (exit {s:?}, {})",
                    t.map_or("no totals line".into(), |(l, _)| l)
                ));
            }
        }
    }
    for line in &summary {
        println!("{line}");
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::totals;

    #[test]
    fn totals_line_is_parsed() {
        let r = "x\nTotal for virtio-media device /n: 81, Succeeded: 80, Failed: 1, Warnings: 2\n";
        assert_eq!(totals(r).map(|t| t.1), Some(1));
        assert_eq!(totals("nothing"), None);
    }
}
