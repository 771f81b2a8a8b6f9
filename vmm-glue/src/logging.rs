//! The daemon's log lines: one line per event, each naming the worker (the VM's device,
//! `vsock cid 3`, or `media camera`) it comes from, as text or as JSON for log
//! collectors (`--log-format json`).
//!
//! A worker names itself once with [`set_worker`] on the thread (or in the jailed
//! child) that runs it; every line logged there carries the name, including lines of
//! the device crates, which know nothing of VMs. Lines of the daemon's own thread carry
//! none.

use std::cell::RefCell;
#[cfg(feature = "cli")]
use std::io::Write;

thread_local! {
    static WORKER: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Names the worker running on this thread (a jailed child: its only thread).
pub fn set_worker(name: &str) {
    WORKER.with(|w| *w.borrow_mut() = Some(name.to_owned()));
}

/// The worker named on this thread, if any.
pub fn worker() -> Option<String> {
    WORKER.with(|w| w.borrow().clone())
}

/// A logger without env_logger (for a daemon built with the `daemon` feature alone):
/// lines of `level` and above to stderr as `LEVEL target] worker: message`.
/// Does nothing when a logger is set already.
pub fn init_stderr(level: log::LevelFilter) {
    struct Stderr(log::LevelFilter);
    impl log::Log for Stderr {
        fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
            metadata.level() <= self.0
        }
        fn log(&self, record: &log::Record<'_>) {
            if !self.enabled(record.metadata()) {
                return;
            }
            let (level, target) = (record.level(), record.target());
            let msg = record.args().to_string();
            match worker() {
                // Messages that already start with the worker's name keep it once.
                Some(w) if !msg.starts_with(&w) => eprintln!("{level:<5} {target}] {w}: {msg}"),
                _ => eprintln!("{level:<5} {target}] {msg}"),
            }
        }
        fn flush(&self) {}
    }
    // Leaked once per process: set_logger wants a 'static logger (set_boxed_logger needs
    // log's std feature, which this crate does not ask for).
    if log::set_logger(Box::leak(Box::new(Stderr(level)))).is_ok() {
        log::set_max_level(level);
    }
}

/// How log lines are written.
#[cfg(feature = "cli")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// `[time LEVEL target] worker: message`.
    #[default]
    Text,
    /// One JSON object per line: `ts`, `level`, `target`, `worker` (if any), `msg`.
    Json,
}

/// One log line in `format` (without the newline).
#[cfg(feature = "cli")]
pub fn render(
    format: LogFormat,
    ts: &str,
    level: log::Level,
    target: &str,
    worker: Option<&str>,
    msg: &str,
) -> String {
    match format {
        LogFormat::Text => {
            let msg = msg.replace('\n', " ");
            match worker {
                // Messages that already start with the worker's name keep it once.
                Some(w) if !msg.starts_with(w) => format!("[{ts} {level:<5} {target}] {w}: {msg}"),
                _ => format!("[{ts} {level:<5} {target}] {msg}"),
            }
        }
        LogFormat::Json => {
            let mut obj = serde_json::Map::new();
            obj.insert("ts".into(), ts.into());
            obj.insert("level".into(), level.as_str().into());
            obj.insert("target".into(), target.into());
            if let Some(w) = worker {
                obj.insert("worker".into(), w.into());
            }
            obj.insert("msg".into(), msg.into());
            serde_json::Value::Object(obj).to_string()
        }
    }
}

/// Sets up the logger: `RUST_LOG` filters (default `info`), lines to stderr in
/// `format`.
#[cfg(feature = "cli")]
pub fn init(format: LogFormat) {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    builder.format(move |buf, record| {
        let ts = buf.timestamp_millis().to_string();
        let msg = record.args().to_string();
        let line = render(
            format,
            &ts,
            record.level(),
            record.target(),
            worker().as_deref(),
            &msg,
        );
        writeln!(buf, "{line}")
    });
    // A logger set twice (tests) keeps the first.
    let _ = builder.try_init();
}

#[cfg(all(test, feature = "cli"))]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn text_lines_name_the_worker_once() {
        let l = render(
            LogFormat::Text,
            "T",
            log::Level::Warn,
            "outboard",
            Some("vsock cid 3"),
            "a\nb",
        );
        assert_eq!(l, "[T WARN  outboard] vsock cid 3: a b");
        let l = render(
            LogFormat::Text,
            "T",
            log::Level::Info,
            "x",
            Some("vsock cid 3"),
            "vsock cid 3: stopped",
        );
        assert_eq!(l, "[T INFO  x] vsock cid 3: stopped");
    }

    #[test]
    fn json_lines_are_one_object_each() {
        let l = render(
            LogFormat::Json,
            "T",
            log::Level::Error,
            "outboard_vmm_glue::jail",
            Some("media camera"),
            "worker pid 7 \"died\"\nhere",
        );
        assert!(!l.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["level"], "ERROR");
        assert_eq!(v["worker"], "media camera");
        assert_eq!(v["msg"], "worker pid 7 \"died\"\nhere");
        let l = render(LogFormat::Json, "T", log::Level::Info, "t", None, "m");
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert!(v.get("worker").is_none());
        set_worker("w");
        assert_eq!(worker().as_deref(), Some("w"));
    }
}
