//! The metrics files of `outboard vsock`: `--metrics PATH`, one JSON document with every
//! VM's device counters, and `--metrics-prometheus PATH`, the same counters in the
//! Prometheus text exposition format (for node_exporter's textfile collector, or any
//! scraper that reads a file), each rewritten atomically (write to a temporary file,
//! rename).

use std::io::Write;
use std::path::{Path, PathBuf};
#[cfg(feature = "cli")]
use std::time::{SystemTime, UNIX_EPOCH};

#[cfg(feature = "vsock")]
use outboard_devices::vsock::VsockMetricsSnapshot;
#[cfg(feature = "cli")]
use serde::Serialize;

/// A device's `u64` counters with fixed names: what the metrics file and the shared
/// counter pages ([`crate::shared_metrics`]) carry.
pub trait CounterSet {
    /// The counters' names, in the order of [`CounterSet::counter_values`].
    fn counter_names() -> &'static [&'static str];
    /// The counters' values, in the order of [`CounterSet::counter_names`].
    fn counter_values(&self) -> impl Iterator<Item = u64> + '_;
}

#[cfg(feature = "vsock")]
impl CounterSet for VsockMetricsSnapshot {
    fn counter_names() -> &'static [&'static str] {
        VsockMetricsSnapshot::NAMES
    }

    fn counter_values(&self) -> impl Iterator<Item = u64> + '_ {
        self.values().into_iter()
    }
}

/// Help text of a counter: the vsock device's own description (feature `vsock`), or
/// what the daemon adds (`worker_restarts`).
pub fn counter_help(name: &str) -> Option<&'static str> {
    if name == "worker_restarts" {
        return Some("Jailed workers of this VM that died and were replaced.");
    }
    #[cfg(feature = "vsock")]
    if let Some(i) = VsockMetricsSnapshot::NAMES.iter().position(|n| *n == name) {
        return VsockMetricsSnapshot::HELP.get(i).map(|h| h.trim());
    }
    None
}

/// `(name, value)` of every counter of `snapshot`.
pub fn counters_of<S: CounterSet>(snapshot: &S) -> Vec<(String, u64)> {
    S::counter_names()
        .iter()
        .map(|n| n.to_string())
        .zip(snapshot.counter_values())
        .collect()
}

/// One VM's entry in the metrics file.
#[derive(Debug, Clone)]
pub struct VmMetrics {
    /// The guest CID.
    pub guest_cid: u64,
    /// The vhost-user socket.
    pub socket: PathBuf,
    /// Counter name and value pairs.
    pub counters: Vec<(String, u64)>,
}

/// The document, serialized in field order.
#[cfg(feature = "cli")]
#[derive(Serialize)]
struct Doc<'a> {
    timestamp_ms: u128,
    vms: Vec<VmDoc<'a>>,
}

#[cfg(feature = "cli")]
#[derive(Serialize)]
struct VmDoc<'a> {
    guest_cid: u64,
    socket: String,
    counters: Counters<'a>,
}

/// A VM's counters as one JSON object, in the device's order.
#[cfg(feature = "cli")]
struct Counters<'a>(&'a [(String, u64)]);

#[cfg(feature = "cli")]
impl Serialize for Counters<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(name, value)| (name, value)))
    }
}

/// Renders the metrics document: `timestamp_ms`, then `vms`, each with `guest_cid`,
/// `socket` and `counters` (in the device's order), in that order.
#[cfg(feature = "cli")]
pub fn render(vms: &[VmMetrics]) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let doc = Doc {
        timestamp_ms: now,
        vms: vms
            .iter()
            .map(|vm| VmDoc {
                guest_cid: vm.guest_cid,
                socket: vm.socket.display().to_string(),
                counters: Counters(&vm.counters),
            })
            .collect(),
    };
    // Strings and integers in maps with string keys always serialize.
    let mut text = serde_json::to_string_pretty(&doc).unwrap_or_default();
    text.push('\n');
    text
}

/// The prefix of every Prometheus metric name.
pub const PROMETHEUS_PREFIX: &str = "outboard_vsock_";

/// A help text as the exposition format wants it: backslash and newline escaped.
fn prometheus_help(text: &str) -> String {
    let one_line: Vec<&str> = text.split_whitespace().collect();
    one_line.join(" ").replace('\\', "\\\\")
}

/// A label value as the exposition format wants it: backslash, quote and newline
/// escaped.
fn prometheus_label(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders the counters in the Prometheus text exposition format (version 0.0.4): one
/// family per counter, `outboard_vsock_<name>`, with its `# HELP` and `# TYPE counter`
/// and one sample per VM labelled `guest_cid` and `socket`.
pub fn render_prometheus(vms: &[VmMetrics]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for vm in vms {
        for (name, _) in &vm.counters {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
    }
    let mut out = String::new();
    for name in names {
        let metric = format!("{PROMETHEUS_PREFIX}{name}");
        if let Some(help) = counter_help(name) {
            out.push_str(&format!("# HELP {metric} {}\n", prometheus_help(help)));
        }
        out.push_str(&format!("# TYPE {metric} counter\n"));
        for vm in vms {
            if let Some((_, value)) = vm.counters.iter().find(|(n, _)| n == name) {
                out.push_str(&format!(
                    "{metric}{{guest_cid=\"{}\",socket=\"{}\"}} {value}\n",
                    vm.guest_cid,
                    prometheus_label(&vm.socket.display().to_string())
                ));
            }
        }
    }
    out
}

/// Writes `text` to `path` atomically (a temporary file beside it, then rename).
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Writes the JSON document to `path` atomically.
#[cfg(feature = "cli")]
pub fn write(path: &Path, vms: &[VmMetrics]) -> std::io::Result<()> {
    write_atomically(path, &render(vms))
}

/// Writes the Prometheus exposition to `path` atomically.
pub fn write_prometheus(path: &Path, vms: &[VmMetrics]) -> std::io::Result<()> {
    write_atomically(path, &render_prometheus(vms))
}

#[cfg(all(test, feature = "cli"))]
mod tests {
    use super::*;

    #[test]
    fn vsock_counters_are_named_in_order() {
        let snap = VsockMetricsSnapshot {
            rx_packets: 3,
            tx_bytes: 1 << 40,
            ..Default::default()
        };
        let c = counters_of(&snap);
        assert_eq!(c.len(), VsockMetricsSnapshot::COUNT);
        assert_eq!(c[0], ("rx_packets".to_string(), 3));
        assert!(c.contains(&("tx_bytes".to_string(), 1 << 40)));
        // The names are the struct's own fields, as its Debug output shows them.
        let debug = format!("{snap:?}");
        for (name, value) in &c {
            assert!(debug.contains(&format!("{name}: {value}")), "{name}");
        }
    }

    #[test]
    fn renders_valid_json_and_writes_atomically() {
        let vms = vec![VmMetrics {
            guest_cid: 3,
            socket: PathBuf::from("/tmp/a \"b\".sock"),
            counters: vec![("rx_packets".into(), 7)],
        }];
        let doc = render(&vms);
        let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
        assert_eq!(v["vms"][0]["guest_cid"], 3);
        assert_eq!(v["vms"][0]["socket"], "/tmp/a \"b\".sock");
        assert_eq!(v["vms"][0]["counters"]["rx_packets"], 7);
        let dir = std::env::temp_dir().join(format!("outboard-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.json");
        write(&path, &vms).unwrap();
        let back: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(back["vms"][0]["counters"]["rx_packets"], 7);
        // Field order is kept (line-based readers such as xtask's rely on it).
        let text = std::fs::read_to_string(&path).unwrap();
        let at = |k: &str| text.find(k).unwrap();
        assert!(at("timestamp_ms") < at("guest_cid") && at("guest_cid") < at("counters"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn prometheus_exposition_has_help_type_and_labelled_samples() {
        let vms = vec![
            VmMetrics {
                guest_cid: 3,
                socket: PathBuf::from("/run/a \"b\".sock"),
                counters: vec![("rx_packets".into(), 7), ("worker_restarts".into(), 1)],
            },
            VmMetrics {
                guest_cid: 4,
                socket: PathBuf::from("/run/c.sock"),
                counters: vec![("rx_packets".into(), 9), ("worker_restarts".into(), 0)],
            },
        ];
        let text = render_prometheus(&vms);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "# HELP outboard_vsock_rx_packets Packets the device put on the RX queue (device -> guest)."
        );
        assert_eq!(lines[1], "# TYPE outboard_vsock_rx_packets counter");
        assert_eq!(
            lines[2],
            "outboard_vsock_rx_packets{guest_cid=\"3\",socket=\"/run/a \\\"b\\\".sock\"} 7"
        );
        assert_eq!(
            lines[3],
            "outboard_vsock_rx_packets{guest_cid=\"4\",socket=\"/run/c.sock\"} 9"
        );
        assert!(lines[4].starts_with("# HELP outboard_vsock_worker_restarts Jailed"));
        assert_eq!(lines.len(), 8);
        // Every vsock counter has a one-line help text.
        for name in VsockMetricsSnapshot::NAMES {
            let help = counter_help(name).unwrap();
            assert!(
                !help.is_empty() && !prometheus_help(help).contains('\n'),
                "{name}"
            );
        }
    }
}
