//! `cargo xtask`: Outboard's build and test driver.
//!
//! - `cargo xtask ci`: the whole gate (format, clippy, tests, docs, no_std build, and the
//!   suites later layers add). Prints a summary table and exits non-zero on any failure.

use std::process::{Command, ExitCode};
use std::time::Instant;

/// One step of the CI gate.
struct Step {
    name: &'static str,
    program: &'static str,
    args: Vec<&'static str>,
    env: Vec<(&'static str, &'static str)>,
}

impl Step {
    fn cargo(name: &'static str, args: &[&'static str]) -> Step {
        Step {
            name,
            program: "cargo",
            args: args.to_vec(),
            env: Vec::new(),
        }
    }

    fn env(mut self, key: &'static str, value: &'static str) -> Step {
        self.env.push((key, value));
        self
    }
}

fn ci_steps() -> Vec<Step> {
    vec![
        Step::cargo("fmt", &["fmt", "--all", "--", "--check"]),
        Step::cargo(
            "clippy",
            &["clippy", "--workspace", "--all-targets", "--all-features", "--", "-D", "warnings"],
        ),
        Step::cargo(
            "protocol no_std build",
            &["build", "-p", "outboard-protocol", "--no-default-features"],
        ),
        Step::cargo("test", &["test", "--workspace", "--all-features"]),
        Step::cargo("doc", &["doc", "--workspace", "--no-deps", "--all-features"])
            .env("RUSTDOCFLAGS", "-D warnings"),
    ]
}

fn run_steps(steps: Vec<Step>) -> ExitCode {
    let mut results = Vec::new();
    for step in steps {
        println!("\n==> {} ({} {})", step.name, step.program, step.args.join(" "));
        let start = Instant::now();
        let status = Command::new(step.program)
            .args(&step.args)
            .envs(step.env.iter().copied())
            .status();
        let ok = matches!(status, Ok(s) if s.success());
        if let Err(e) = &status {
            eprintln!("xtask: could not run {}: {e}", step.program);
        }
        results.push((step.name, ok, start.elapsed()));
    }
    println!("\n==> summary");
    for (name, ok, took) in &results {
        println!(
            "  {:<28} {:<4} {:>7.1}s",
            name,
            if *ok { "ok" } else { "FAIL" },
            took.as_secs_f64()
        );
    }
    let failed = results.iter().filter(|(_, ok, _)| !ok).count();
    let passed = results.len() - failed;
    println!("xtask: {passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ci") => run_steps(ci_steps()),
        _ => {
            eprintln!("usage: cargo xtask <command>\n\ncommands:\n  ci    run the whole test gate");
            ExitCode::from(2)
        }
    }
}
