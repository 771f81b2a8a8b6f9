//! `cargo xtask fuzz [TARGET] [--seconds N] [--ci]`: the libFuzzer targets in `fuzz/`.
//!
//! The fuzz crate is outside the workspace (cargo-fuzz needs a nightly toolchain; the
//! product builds on stable). This runs each target (all of them by default) for `N`
//! seconds (default 60) over its committed corpus in `fuzz/corpus/<target>`, with its
//! dictionary when it has one. New inputs go to `target/fuzz-corpus/<target>` and crash
//! inputs to `target/fuzz-artifacts/<target>/`, so the checkout is never written; the
//! fuzzers build into `target/fuzz`. A summary gives executions and edges covered
//! (libFuzzer's `cov:`) per target; logs are in `target/fuzz-logs/`.
//!
//! `media_proxy` (the V4L2 proxy, feature `v4l2-proxy` of the fuzz crate, with which
//! every target is built: it needs v4l2r's build dependencies, which `cargo xtask
//! media-deps` installs, and this does too) runs in a QEMU guest
//! with vivid, half its time on a single-planar node and half on a multi-planar one
//! (see `fuzz_guest.rs`).
//!
//! cargo-fuzz comes from `PATH` or from `target/fuzz-tools/bin`, where it is installed
//! (`cargo install cargo-fuzz --locked`, about a minute) when neither has it.
//!
//! `--ci` is the CI gate's smoke run: with no nightly toolchain, or when cargo-fuzz
//! cannot be installed, it says why it skipped and passes; without `--ci` those are
//! errors.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::{self, Result};
use crate::{fuzz_guest, setup};

/// Every target in `fuzz/fuzz_targets/`, fast ones first.
pub const TARGETS: &[&str] = &[
    "vsock_config",
    "connect_line",
    "proxy_ring",
    "frontend_replies",
    "vhost_user_backend",
    "vsock_queue",
    "media_commands",
    "handover_record",
    "media_proxy",
];

/// The target that runs in a guest over vivid (see the module doc).
const GUEST_TARGET: &str = "media_proxy";

/// What `cargo xtask fuzz` was asked to do.
struct Options {
    targets: Vec<&'static str>,
    seconds: u64,
    ci: bool,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut targets = Vec::new();
    let mut seconds = 60;
    let mut ci = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                seconds = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .ok_or("--seconds needs a number")?;
            }
            "--ci" => ci = true,
            name => match TARGETS.iter().find(|t| **t == name) {
                Some(t) => targets.push(*t),
                None => {
                    return Err(format!(
                        "unknown fuzz target {name:?} (targets: {})",
                        TARGETS.join(", ")
                    ))
                }
            },
        }
    }
    if targets.is_empty() {
        targets = TARGETS.to_vec();
    }
    Ok(Options {
        targets,
        seconds,
        ci,
    })
}

fn has_nightly() -> bool {
    util::output(
        Command::new("rustup").args(["toolchain", "list"]),
        Duration::from_secs(30),
    )
    .map(|out| out.lines().any(|l| l.starts_with("nightly")))
    .unwrap_or(false)
}

/// The directory holding a `cargo-fuzz` binary, installing it under `target/` if
/// needed.
fn cargo_fuzz(tools: &Path) -> Result<Option<PathBuf>> {
    let on_path = Command::new("cargo-fuzz")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if on_path {
        return Ok(None);
    }
    let bin = tools.join("bin");
    if bin.join("cargo-fuzz").exists() {
        return Ok(Some(bin));
    }
    println!(
        "==> installing cargo-fuzz into {} (cargo install --locked)",
        tools.display()
    );
    let start = Instant::now();
    util::run(
        Command::new("cargo")
            .args(["install", "cargo-fuzz", "--locked", "--root"])
            .arg(tools),
        Duration::from_secs(900),
    )?;
    println!(
        "==> cargo-fuzz installed in {:.0}s",
        start.elapsed().as_secs_f64()
    );
    Ok(Some(bin))
}

/// The last `cov:` and the execution count in a libFuzzer log.
pub(crate) fn figures(log: &str) -> (Option<u64>, Option<u64>) {
    let cov = log
        .lines()
        .rev()
        .find_map(|l| l.split("cov: ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok());
    let execs = log
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|n| n.trim().parse().ok());
    (cov, execs)
}

fn fuzz_cmd(root: &Path, path: &Option<PathBuf>) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg("+nightly").current_dir(root.join("fuzz"));
    if let Some(bin) = path {
        let old = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![bin.clone()];
        paths.extend(std::env::split_paths(&old));
        if let Ok(joined) = std::env::join_paths(paths) {
            cmd.env("PATH", joined);
        }
    }
    // The fuzz crate has its own lock file and workspace.
    cmd.env_remove("CARGO_TARGET_DIR");
    cmd
}

/// Runs `cargo xtask fuzz` with `args` (after the word `fuzz`).
pub fn run(args: &[String]) -> Result<bool> {
    let opts = parse(args)?;
    let skip = |why: String| -> Result<bool> {
        if opts.ci {
            println!("==> fuzz: skipped: {why}");
            Ok(true)
        } else {
            Err(why)
        }
    };
    if !has_nightly() {
        return skip(
            "no nightly toolchain (`rustup toolchain list` shows none; \
             `rustup toolchain install nightly` adds one)"
                .into(),
        );
    }
    let root = util::workspace_root();
    let target = root.join("target");
    let tools = match cargo_fuzz(&target.join("fuzz-tools")) {
        Ok(t) => t,
        Err(e) => {
            return skip(format!(
                "cargo-fuzz is not installed and installing it failed: {e}"
            ))
        }
    };
    let target_dir = target.join("fuzz");
    let build_start = Instant::now();
    // Every target is built with the V4L2 proxy (`media_proxy` needs it, and one feature
    // set for all keeps cargo from rebuilding the shared crates on every other build).
    let include = setup::ensure_media_deps(&setup::cache_dir().join("media-deps"))?;
    util::run(
        fuzz_cmd(&root, &tools)
            .args([
                "fuzz",
                "build",
                "-O",
                "--features",
                "v4l2-proxy",
                "--target-dir",
            ])
            .arg(&target_dir)
            .env("V4L2R_VIDEODEV2_H_PATH", &include),
        Duration::from_secs(1800),
    )?;
    println!(
        "==> fuzz targets built in {:.0}s",
        build_start.elapsed().as_secs_f64()
    );
    let logs = target.join("fuzz-logs");
    fs::create_dir_all(&logs).map_err(|e| format!("create {}: {e}", logs.display()))?;
    let mut results = Vec::new();
    for t in &opts.targets {
        let corpus = root.join("fuzz").join("corpus").join(t);
        let scratch = target.join("fuzz-corpus").join(t);
        let artifacts = target.join("fuzz-artifacts").join(t);
        for d in [&scratch, &artifacts] {
            fs::create_dir_all(d).map_err(|e| format!("create {}: {e}", d.display()))?;
        }
        let log_path = logs.join(format!("{t}.log"));
        if *t == GUEST_TARGET {
            let start = Instant::now();
            let bin = target_dir
                .join("x86_64-unknown-linux-gnu")
                .join("release")
                .join(t);
            let outcome =
                fuzz_guest::run(&bin, &corpus, &scratch, &artifacts, opts.seconds, &log_path);
            match outcome {
                Ok(runs) => {
                    for r in &runs {
                        println!(
                            "==> fuzz {t} on {}: {} executions, cov {}",
                            r.node,
                            r.execs.map_or("?".into(), |n| n.to_string()),
                            r.cov.map_or("?".into(), |n| n.to_string())
                        );
                    }
                    let execs = runs.iter().map(|r| r.execs).sum::<Option<u64>>();
                    let cov = runs.iter().filter_map(|r| r.cov).max();
                    results.push((*t, true, execs, cov, start.elapsed()));
                }
                Err(e) => {
                    eprintln!("xtask: fuzz {t} failed: {e}; log {}", log_path.display());
                    results.push((*t, false, None, None, start.elapsed()));
                }
            }
            continue;
        }
        let log = fs::File::create(&log_path)
            .map_err(|e| format!("create {}: {e}", log_path.display()))?;
        let mut cmd = fuzz_cmd(&root, &tools);
        cmd.args([
            "fuzz",
            "run",
            "-O",
            "--features",
            "v4l2-proxy",
            "--target-dir",
        ])
        .arg(&target_dir)
        .arg(t)
        .arg(&scratch)
        .arg(&corpus)
        .arg("--")
        .arg(format!("-max_total_time={}", opts.seconds))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .args(["-timeout=10", "-print_final_stats=1", "-rss_limit_mb=3072"])
        .env("V4L2R_VIDEODEV2_H_PATH", &include)
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
        let dict = root.join("fuzz").join(format!("{t}.dict"));
        if dict.exists() {
            cmd.arg(format!("-dict={}", dict.display()));
        }
        println!("==> fuzz {t} for {}s", opts.seconds);
        let start = Instant::now();
        let outcome = util::run(&mut cmd, Duration::from_secs(opts.seconds + 600));
        let text = fs::read_to_string(&log_path).unwrap_or_default();
        let (cov, execs) = figures(&text);
        if let Err(e) = &outcome {
            eprintln!(
                "xtask: fuzz {t} failed ({e}); log {}, crash inputs in {}",
                log_path.display(),
                artifacts.display()
            );
            for l in text
                .lines()
                .filter(|l| l.contains("panicked at") || l.contains("ERROR:"))
            {
                eprintln!("  {l}");
            }
        }
        results.push((*t, outcome.is_ok(), execs, cov, start.elapsed()));
    }
    println!("\n==> fuzz summary");
    println!(
        "  {:<20} {:<4} {:>12} {:>8} {:>8}",
        "target", "", "executions", "cov", "time"
    );
    let show = |v: Option<u64>| v.map_or_else(|| "?".to_string(), |n| n.to_string());
    for (t, ok, execs, cov, took) in &results {
        println!(
            "  {:<20} {:<4} {:>12} {:>8} {:>7.0}s",
            t,
            if *ok { "ok" } else { "FAIL" },
            show(*execs),
            show(*cov),
            took.as_secs_f64()
        );
    }
    Ok(results.iter().all(|r| r.1))
}
