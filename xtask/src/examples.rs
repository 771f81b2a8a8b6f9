//! `cargo xtask examples`: runs every library crate's examples, each with
//! `cargo run -p <crate> --example <name>` (and `--features` when the example declares
//! `required-features`) under a timeout, and reports each.
//!
//! Every example is self-contained and runs unprivileged (the sandbox example needs user
//! namespaces, which root always has); each exits non-zero when it did not do what it
//! claims.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::util;

/// (package, example, features it needs ("": the defaults), what it shows).
const EXAMPLES: &[(&str, &str, &str, &str)] = &[
    (
        "outboard-protocol",
        "vhost_user_message",
        "",
        "parse and validate a vhost-user message",
    ),
    (
        "outboard-protocol",
        "decode",
        "",
        "decode vhost-user and vsock messages",
    ),
    (
        "outboard-transport",
        "socketpair",
        "",
        "Frontend and BackendReqHandler over a socketpair",
    ),
    (
        "outboard-devices",
        "camera_capture",
        "test-utils",
        "the software camera behind VirtioMedia, driven by QueueDriver",
    ),
    (
        "outboard-vmm-glue",
        "vsock_mmio",
        "",
        "outboard-devices' vsock device behind virtio-mmio",
    ),
    (
        "outboard-vmm-glue",
        "vhost_user_device",
        "",
        "a VirtioDevice served by the vhost-user daemon",
    ),
    (
        "outboard-sandbox",
        "jailed_device",
        "",
        "a BusDevice in a jailed child behind ProxyDevice",
    ),
];

/// Building the example is part of the run, so the bound is generous.
const TIMEOUT: Duration = Duration::from_secs(1800);

/// Runs every example; `Ok(false)` if any failed.
pub fn run() -> util::Result<bool> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut results = Vec::new();
    for &(package, example, features, what) in EXAMPLES {
        println!("\n==> {package} --example {example}: {what}");
        let start = Instant::now();
        let mut cmd = Command::new(&cargo);
        cmd.current_dir(util::workspace_root()).args([
            "run",
            "-q",
            "-p",
            package,
            "--example",
            example,
        ]);
        if !features.is_empty() {
            cmd.args(["--features", features]);
        }
        let outcome = util::run(&mut cmd, TIMEOUT);
        if let Err(e) = &outcome {
            eprintln!("xtask: {e}");
        }
        results.push((package, example, outcome.is_ok(), start.elapsed()));
    }
    println!("\n==> examples");
    for (package, example, ok, took) in &results {
        println!(
            "  {:<20} {:<20} {:<4} {:>6.1}s",
            package,
            example,
            if *ok { "ok" } else { "FAIL" },
            took.as_secs_f64()
        );
    }
    Ok(results.iter().all(|(_, _, ok, _)| *ok))
}
