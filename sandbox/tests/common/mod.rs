//! A tiny single-threaded test runner for tests that fork.
//!
//! `cargo test`'s harness runs tests on several threads, and forking a multi-threaded
//! process is exactly what these tests must not do carelessly; so these test targets use
//! `harness = false` and run their cases in sequence on the main thread.

#![allow(dead_code)]

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A test case: its name and body.
pub type Case = (&'static str, fn() -> Result<(), String>);

/// A named, boxed test case.
pub type Named = (String, Box<dyn Fn() -> Result<(), String>>);

/// Each case twice: as is (root in CI), and in a process that dropped to uid 65534 first.
pub fn with_unprivileged(cases: &[Case]) -> Vec<Named> {
    let mut out: Vec<Named> = Vec::new();
    for &(name, f) in cases {
        out.push((name.to_owned(), Box::new(f)));
        out.push((
            format!("{name}_unprivileged"),
            Box::new(move || as_nobody(f)),
        ));
    }
    out
}

/// Wraps plain cases for [`run`].
pub fn plain(cases: &[Case]) -> Vec<Named> {
    cases
        .iter()
        .map(|&(name, f)| {
            (
                name.to_owned(),
                Box::new(f) as Box<dyn Fn() -> Result<(), String>>,
            )
        })
        .collect()
}

/// Runs the cases whose name contains the first non-flag argument (all if none), prints
/// a libtest-like report and exits non-zero on any failure.
pub fn run(cases: Vec<Named>) {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if std::env::args().any(|a| a == "--list") {
        for (name, _) in cases {
            println!("{name}: test");
        }
        return;
    }
    let selected: Vec<_> = cases
        .iter()
        .filter(|(name, _)| filter.as_deref().is_none_or(|f| name.contains(f)))
        .collect();
    println!("\nrunning {} tests", selected.len());
    let start = std::time::Instant::now();
    let mut failed = Vec::new();
    for (name, case) in &selected {
        let t = std::time::Instant::now();
        match case() {
            Ok(()) => println!("test {name} ... ok ({:?})", t.elapsed()),
            Err(msg) => {
                println!("test {name} ... FAILED: {msg}");
                failed.push(name.clone());
            }
        }
    }
    println!(
        "\ntest result: {}. {} passed; {} failed; finished in {:.2?}\n",
        if failed.is_empty() { "ok" } else { "FAILED" },
        selected.len() - failed.len(),
        failed.len(),
        start.elapsed()
    );
    if !failed.is_empty() {
        std::process::exit(1);
    }
}

/// Fails the case with a message unless `cond`.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!("{}:{}: {}", file!(), line!(), format!($($fmt)+)));
        }
    };
}

/// Turns any displayable error into the case's error string.
pub fn e<E: std::fmt::Display>(context: &'static str) -> impl Fn(E) -> String {
    move |err| format!("{context}: {err}")
}

/// The uid unprivileged variants drop to.
pub const NOBODY: u32 = 65534;

/// Runs `f` in a forked process that first drops to uid/gid 65534 (no supplementary
/// groups, no capabilities), and returns its result. When the tests do not run as root,
/// `f` simply runs in a forked process.
pub fn as_nobody(f: fn() -> Result<(), String>) -> Result<(), String> {
    if unsafe_geteuid() != 0 {
        // Already unprivileged (not CI's root): run as is.
        return in_fork(f);
    }
    in_fork(|| {
        // SAFETY: id-changing system calls in a freshly forked single-threaded process.
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(NOBODY, NOBODY, NOBODY) != 0
                || libc::setresuid(NOBODY, NOBODY, NOBODY) != 0
            {
                return Err(format!(
                    "dropping to uid {NOBODY}: {}",
                    std::io::Error::last_os_error()
                ));
            }
            // setuid cleared the dumpable flag; the jail sets it where it needs it.
        }
        if unsafe_geteuid() != NOBODY {
            return Err("still privileged".into());
        }
        f()
    })
}

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// Runs `f` in a forked process and returns its result (sent back through a pipe).
pub fn in_fork(f: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the local array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err("pipe".into());
    }
    // SAFETY: the fds were just created and are owned here only.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the test runner is single-threaded; the child runs `f` and `_exit`s.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err("fork".into());
    }
    if pid == 0 {
        drop(r);
        let msg = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            Ok(Ok(())) => String::new(),
            Ok(Err(m)) => m,
            Err(_) => "panicked".into(),
        };
        let bytes = if msg.is_empty() {
            b"OK".to_vec()
        } else {
            msg.into_bytes()
        };
        // SAFETY: writes our own buffer to our pipe, then exits without destructors.
        unsafe {
            libc::write(w.as_raw_fd(), bytes.as_ptr().cast(), bytes.len());
            libc::_exit(0);
        }
    }
    drop(w);
    let mut out = String::new();
    let mut file = std::fs::File::from(r);
    let _ = file.read_to_string(&mut out);
    let mut status = 0;
    // SAFETY: reaps our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    match out.as_str() {
        "OK" => Ok(()),
        "" => Err(format!(
            "forked test process died (wait status {status:#x})"
        )),
        m => Err(m.to_owned()),
    }
}

/// True if `pid` no longer exists (not even as a zombie).
pub fn gone(pid: i32) -> bool {
    !std::path::Path::new(&format!("/proc/{pid}")).exists()
}
