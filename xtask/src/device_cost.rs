//! `cargo xtask device-cost`: what a device author pays for a new device on Outboard
//! against the same device on rust-vmm's `vhost-user-backend`, measured in one run.
//!
//! The device is the `rng_device` example (virtio-rng over vhost-user,
//! `vmm-glue/examples/rng_device.rs`); its rust-vmm twin is
//! `xtask/compare/rng-rust-vmm`. Each is built as its author's own crate would be:
//! `xtask/compare/rng-outboard` compiles the example with `outboard-vmm-glue`'s `daemon`
//! feature only, outside this workspace, with its own lock file. For each:
//!
//! - lines: the source file's code lines (not blank, not comments);
//! - crates: distinct crates (name and version) of `cargo tree -e normal`, the crate
//!   itself not counted, Outboard's own crates counted;
//! - clean release build CPU: user + system time of the `cargo build --release` process
//!   tree (`getrusage(RUSAGE_CHILDREN)` around it) into an empty target directory
//!   (`target/device-cost/`), sources fetched beforehand.
//!
//! The goal of issue 23: Outboard no worse than rust-vmm on each figure.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::{self, Result};

/// One stack's figures.
struct Figures {
    lines: usize,
    lines_without_jail: usize,
    crates: usize,
    cpu: f64,
    wall: f64,
}

/// Code lines of a Rust file: not blank, not a `//` comment. With `skip_jail`, the
/// items under `#[cfg(feature = "jail")]` / `#[cfg(not(feature = "jail"))]` are left
/// out (rust-vmm has no jail to compare them with).
fn code_lines(text: &str, skip_jail: bool) -> usize {
    let mut count = 0;
    let mut skipping = false;
    for line in text.lines() {
        let t = line.trim();
        if skip_jail
            && (t == "#[cfg(feature = \"jail\")]" || t == "#[cfg(not(feature = \"jail\"))]")
        {
            skipping = true;
        }
        if skipping {
            // An item ends at a closing brace in the first column.
            if line == "}" {
                skipping = false;
            }
            continue;
        }
        if !t.is_empty() && !t.starts_with("//") {
            count += 1;
        }
    }
    count
}

/// RUSAGE_CHILDREN user + system seconds so far.
fn children_cpu() -> f64 {
    // SAFETY: rusage is plain data; getrusage fills it and touches nothing else.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid rusage for the call.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

fn measure(cargo: &str, dir: &Path, source: &Path, target: &Path) -> Result<Figures> {
    let text =
        std::fs::read_to_string(source).map_err(|e| format!("read {}: {e}", source.display()))?;
    util::run(
        Command::new(cargo)
            .current_dir(dir)
            .args(["fetch", "--quiet"]),
        Duration::from_secs(600),
    )?;
    let tree = util::output(
        Command::new(cargo).current_dir(dir).args([
            "tree",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--offline",
        ]),
        Duration::from_secs(120),
    )?;
    let mut crates: Vec<(&str, &str)> = tree
        .lines()
        .skip(1) // the crate itself
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?, w.next()?))
        })
        .collect();
    crates.sort_unstable();
    crates.dedup();
    let _ = std::fs::remove_dir_all(target);
    let before = children_cpu();
    let start = Instant::now();
    util::run(
        Command::new(cargo)
            .current_dir(dir)
            .env("CARGO_TARGET_DIR", target)
            .env_remove("RUSTFLAGS")
            .args(["build", "--release", "--offline", "--quiet"]),
        Duration::from_secs(3600),
    )?;
    Ok(Figures {
        lines: code_lines(&text, false),
        lines_without_jail: code_lines(&text, true),
        crates: crates.len(),
        cpu: children_cpu() - before,
        wall: start.elapsed().as_secs_f64(),
    })
}

/// Measures both stacks and prints the table; `Ok(false)` when Outboard is worse on
/// a figure.
pub fn run() -> Result<bool> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = util::workspace_root();
    let compare = root.join("xtask").join("compare");
    let targets = root.join("target").join("device-cost");
    println!("==> device-cost: virtio-rng over vhost-user, Outboard vs rust-vmm");
    let ours = measure(
        &cargo,
        &compare.join("rng-outboard"),
        &root.join("vmm-glue/examples/rng_device.rs"),
        &targets.join("outboard"),
    )?;
    let theirs = measure(
        &cargo,
        &compare.join("rng-rust-vmm"),
        &compare.join("rng-rust-vmm/src/main.rs"),
        &targets.join("rust-vmm"),
    )?;
    println!("\n{:<44} {:>10} {:>10}", "", "Outboard", "rust-vmm");
    let row = |what: &str, a: String, b: String| println!("{what:<44} {a:>10} {b:>10}");
    row(
        "device lines (whole daemon, code only)",
        ours.lines.to_string(),
        theirs.lines.to_string(),
    );
    row(
        "  without the --jail code",
        ours.lines_without_jail.to_string(),
        theirs.lines_without_jail.to_string(),
    );
    row(
        "crates (cargo tree -e normal, distinct)",
        ours.crates.to_string(),
        theirs.crates.to_string(),
    );
    row(
        "clean release build CPU, user+sys (s)",
        format!("{:.1}", ours.cpu),
        format!("{:.1}", theirs.cpu),
    );
    row(
        "clean release build wall (s)",
        format!("{:.1}", ours.wall),
        format!("{:.1}", theirs.wall),
    );
    let worse: Vec<&str> = [
        (
            ours.lines_without_jail > theirs.lines,
            "lines (without --jail)",
        ),
        (ours.crates > theirs.crates, "crates"),
        (ours.cpu > theirs.cpu, "build CPU"),
    ]
    .into_iter()
    .filter_map(|(worse, what)| worse.then_some(what))
    .collect();
    if worse.is_empty() {
        println!("\ndevice-cost: Outboard is no worse than rust-vmm on lines (without --jail), crates and build CPU");
    } else {
        println!(
            "\ndevice-cost: Outboard is WORSE than rust-vmm on {}",
            worse.join(", ")
        );
    }
    Ok(worse.is_empty())
}

#[cfg(test)]
mod tests {
    use super::code_lines;

    #[test]
    fn code_lines_skip_blanks_comments_and_optionally_jail_items() {
        let text = "//! doc\nfn a() {}\n\n    // note\n#[cfg(feature = \"jail\")]\nfn j() {\n    x();\n}\nfn b() {}\n";
        assert_eq!(code_lines(text, false), 6);
        assert_eq!(code_lines(text, true), 2);
    }
}
