//! Small helpers: commands with timeouts, child processes killed on drop, paths.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// A failure of an xtask step, with a message for the user.
pub type Result<T> = std::result::Result<T, String>;

/// The workspace root (the parent of xtask/).
pub fn workspace_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(Path::to_path_buf).unwrap_or(here)
}

/// Runs `cmd` to completion within `timeout`; its output goes to ours. Kills it on
/// timeout.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<()> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("could not start {what}: {e}"))?;
    match wait_timeout(&mut child, timeout) {
        Ok(Some(status)) if status.success() => Ok(()),
        Ok(Some(status)) => Err(format!("{what} failed: {status}")),
        Ok(None) => {
            kill_and_reap(&mut child);
            Err(format!("{what} did not finish within {timeout:?}"))
        }
        Err(e) => {
            kill_and_reap(&mut child);
            Err(format!("waiting for {what}: {e}"))
        }
    }
}

/// Runs `cmd` with its standard output and error passed through to ours, and returns its
/// exit status with the last `keep` lines of both (in the order they were read).
pub fn run_teeing(
    cmd: &mut Command,
    keep: usize,
) -> (std::io::Result<std::process::ExitStatus>, Vec<String>) {
    use std::collections::VecDeque;
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;
    use std::sync::{Arc, Mutex};

    let mut child = match cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn() {
        Ok(c) => c,
        Err(e) => return (Err(e), Vec::new()),
    };
    let tail = Arc::new(Mutex::new(VecDeque::with_capacity(keep + 1)));
    fn pump<R: std::io::Read + Send + 'static>(
        from: R,
        to_stderr: bool,
        tail: Arc<Mutex<VecDeque<String>>>,
        keep: usize,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut reader = BufReader::new(from);
            let mut buf = Vec::new();
            // Bytes, not `lines()`: a step's output need not be UTF-8.
            while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                let _ = if to_stderr {
                    std::io::stderr().write_all(&buf)
                } else {
                    std::io::stdout().write_all(&buf)
                };
                let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                if let Ok(mut t) = tail.lock() {
                    t.push_back(line);
                    if t.len() > keep {
                        t.pop_front();
                    }
                }
                buf.clear();
            }
        })
    }
    let pumps: Vec<_> = [
        child
            .stdout
            .take()
            .map(|o| pump(o, false, tail.clone(), keep)),
        child
            .stderr
            .take()
            .map(|e| pump(e, true, tail.clone(), keep)),
    ]
    .into_iter()
    .flatten()
    .collect();
    let status = child.wait();
    // A process the step left behind may still hold the pipes: wait a little for the
    // rest of the output, but never for such a process to end.
    let deadline = Instant::now() + Duration::from_secs(10);
    for p in pumps {
        while !p.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if p.is_finished() {
            let _ = p.join();
        }
    }
    let lines = tail
        .lock()
        .map(|t| t.iter().cloned().collect())
        .unwrap_or_default();
    (status, lines)
}

/// Runs `cmd` within `timeout` and returns its standard output.
pub fn output(cmd: &mut Command, timeout: Duration) -> Result<String> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("could not start {what}: {e}"))?;
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| format!("{what}: no stdout"))?;
    let reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let status = match wait_timeout(&mut child, timeout) {
        Ok(Some(status)) => status,
        Ok(None) => {
            kill_and_reap(&mut child);
            return Err(format!("{what} did not finish within {timeout:?}"));
        }
        Err(e) => {
            kill_and_reap(&mut child);
            return Err(format!("waiting for {what}: {e}"));
        }
    };
    let out = reader
        .join()
        .map_err(|_| format!("{what}: output reader panicked"))?;
    if status.success() {
        Ok(out)
    } else {
        Err(format!("{what} failed: {status}"))
    }
}

/// Waits for `child` at most `timeout`. `Ok(None)` means it is still running.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// SIGKILLs `child` by its pid and reaps it.
pub fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A process this xtask started: killed by its pid and reaped when dropped.
pub struct Proc {
    /// What it is, for messages.
    pub name: String,
    /// The process.
    pub child: Child,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Proc> {
        let file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("open {}: {e}", log.display()))?;
        let err = file
            .try_clone()
            .map_err(|e| format!("dup {}: {e}", log.display()))?;
        // SAFETY: the closure runs in the child between fork and exec and only calls
        // prctl(2), which is async-signal-safe. It makes the kernel SIGKILL the child
        // when this process dies, so nothing outlives an xtask that is itself killed.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("could not start {name} ({cmd:?}): {e}"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let pid = libc::pid_t::try_from(self.pid()).map_err(|e| format!("pid: {e}"))?;
        // SAFETY: kill(2) with a pid of a child we have not reaped yet (so the pid cannot
        // have been reused) and a valid signal number; it touches no memory.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        if rc != 0 {
            return Err(format!(
                "SIGTERM to {} (pid {pid}): {}",
                self.name,
                io::Error::last_os_error()
            ));
        }
        match wait_timeout(&mut self.child, timeout) {
            Ok(Some(status)) => Ok(status),
            Ok(None) => Err(format!(
                "{} (pid {pid}) did not exit within {timeout:?} of SIGTERM",
                self.name
            )),
            Err(e) => Err(format!("waiting for {}: {e}", self.name)),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

/// CPU seconds (user + system) used by process `pid`, from /proc/PID/stat.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("read /proc/{pid}/stat: {e}"))?;
    // The command name may contain spaces; fields after its closing parenthesis.
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or_else(|| format!("/proc/{pid}/stat has no ')': {stat}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); fields[0] here is field 3.
    let tick = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| format!("/proc/{pid}/stat field {} unreadable", i + 3))
    };
    let ticks = tick(11)? + tick(12)?;
    // SAFETY: sysconf reads a configuration value and touches no memory of ours.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Ok(ticks as f64 / hz)
}

/// Reads a text file for a failure report; missing files say so.
pub fn read_log(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => format!("({}: {e})", path.display()),
    }
}

/// Waits until `path` exists, up to `timeout`.
pub fn wait_for_path(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}

/// The newest modification time of a file, if it exists.
pub fn mtime(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The lines of an `outboard` daemon's log that report a jailed worker's death (a
/// seccomp kill shows as `SIGSYS`): a run that drove the device must have none.
pub fn worker_deaths(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            l.contains("SIGSYS")
                || l.contains("signal 31")
                || l.contains("; starting a new one")
                || (l.contains("ERROR") && l.contains(": worker pid "))
        })
        .collect()
}

#[cfg(test)]
mod worker_death_tests {
    use super::worker_deaths;

    #[test]
    fn deaths_are_found_and_ordinary_lines_are_not() {
        let log = "\
[2026-12-05T03:16:14Z INFO  outboard::jailed] media camera: worker runs jailed, pid 7072
[2026-12-05T03:16:15Z ERROR outboard::jailed] media camera: worker pid 7072 killed by signal 31 (SIGSYS: a system call outside the seccomp policy); starting a new one
[2026-12-05T03:16:16Z ERROR outboard::jailed] vsock: worker pid 9 exited with status 1
[2026-12-05T03:16:17Z INFO  outboard] stopped cleanly";
        let found = worker_deaths(log);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].contains("SIGSYS") && found[1].contains("status 1"));
        assert!(worker_deaths("INFO worker runs jailed, pid 3").is_empty());
    }
}

#[cfg(test)]
mod teeing_tests {
    use super::*;

    #[test]
    fn run_teeing_keeps_the_last_lines_of_both_streams_and_the_status() {
        let (status, tail) = run_teeing(
            Command::new("sh").args([
                "-c",
                "echo one; echo two; sleep 0.1; echo three >&2; exit 3",
            ]),
            2,
        );
        assert_eq!(status.expect("sh runs").code(), Some(3));
        assert_eq!(tail, vec!["two".to_string(), "three".to_string()]);
    }

    #[test]
    fn run_teeing_does_not_wait_for_a_process_left_holding_the_pipes() {
        let start = Instant::now();
        let (status, tail) = run_teeing(
            Command::new("sh").args(["-c", "echo left; sleep 60 & exit 0"]),
            5,
        );
        assert!(status.expect("sh runs").success());
        assert_eq!(tail, vec!["left".to_string()]);
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{:?}",
            start.elapsed()
        );
    }
}
