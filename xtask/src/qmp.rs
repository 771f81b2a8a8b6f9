//! A minimal QMP client: enough to plug the vhost-user-vsock device once its chardev
//! is connected, unplug it, and watch the chardev reconnect.
//!
//! QEMU's vhost-user-vsock device neither waits for a `reconnect-ms` chardev to connect
//! at realize time nor replays the device setup when the chardev reconnects, so the
//! harness plugs the device through QMP (into a PCIe root port, before the guest runs)
//! and, after a back-end restart, unplugs and replugs it.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::host::read_line_max;
use crate::util::Result;

/// A QMP connection in command mode.
pub struct Qmp {
    stream: UnixStream,
    events: Vec<String>,
}

impl Qmp {
    /// Connects (retrying until `timeout`) and leaves capabilities negotiation.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("QMP socket {}: {e}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let mut q = Qmp {
            stream,
            events: Vec::new(),
        };
        q.line(Duration::from_secs(10))?; // the greeting
        q.execute(r#"{"execute":"qmp_capabilities"}"#)?;
        Ok(q)
    }

    fn line(&mut self, timeout: Duration) -> Result<String> {
        self.stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| format!("QMP timeout: {e}"))?;
        read_line_max(&mut self.stream, 1 << 20).map_err(|e| format!("QMP read: {e}"))
    }

    /// Runs one command; returns the "return" line, or the error as Err.
    pub fn execute(&mut self, command: &str) -> Result<String> {
        self.stream
            .write_all(format!("{command}\n").as_bytes())
            .map_err(|e| format!("QMP write: {e}"))?;
        loop {
            let line = self.line(Duration::from_secs(60))?;
            if line.contains("\"event\"") {
                self.events.push(line);
            } else if line.contains("\"error\"") {
                return Err(format!("QMP {command} failed: {line}"));
            } else if line.contains("\"return\"") {
                return Ok(line);
            }
        }
    }

    /// Waits for an event whose line contains `needle`.
    pub fn wait_event(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.events.iter().position(|e| e.contains(needle)) {
                return Ok(self.events.remove(i));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("no QMP event {needle} within {timeout:?}"));
            }
            match self.line(left) {
                Ok(l) => self.events.push(l),
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("no QMP event {needle} within {timeout:?} ({e})"))
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until chardev `label` is connected to its peer.
    pub fn wait_chardev_connected(&mut self, label: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.execute(r#"{"execute":"query-chardev"}"#)?;
            // Each entry: {"frontend-open": b, "filename": "...", "label": "..."}; a
            // socket chardev's filename starts with "disconnected:" while it is not.
            let connected = r.split('}').any(|entry| {
                entry.contains(&format!("\"label\": \"{label}\""))
                    && !entry.contains("disconnected:")
            });
            if connected {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "chardev {label} not connected within {timeout:?}: {r}"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
