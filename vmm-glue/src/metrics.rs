//! The metrics files of `outboard vsock` and `outboard media`: `--metrics PATH`, one
//! JSON document with every served device's counters, and `--metrics-prometheus PATH`,
//! the same counters in the Prometheus text exposition format (for node_exporter's
//! textfile collector, or any scraper that reads a file), each rewritten atomically
//! (write to a temporary file, rename).
//!
//! Each entry names its device ([`DeviceId`]): its kind ([`DeviceKind`]: `vsock`,
//! `media`), the guest CID for vsock, and the vhost-user socket it is served on.

use std::io::Write;
use std::path::{Path, PathBuf};
#[cfg(feature = "cli")]
use std::time::{SystemTime, UNIX_EPOCH};

#[cfg(feature = "media")]
use outboard_devices::media::MediaMetricsSnapshot;
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

#[cfg(feature = "media")]
impl CounterSet for MediaMetricsSnapshot {
    fn counter_names() -> &'static [&'static str] {
        MediaMetricsSnapshot::NAMES
    }

    fn counter_values(&self) -> impl Iterator<Item = u64> + '_ {
        self.values().into_iter()
    }
}

/// The kind of device an entry of the metrics files describes: the `device` field of
/// the JSON document and the `outboard_<kind>_` prefix of the Prometheus metric names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// A virtio-vsock device (`outboard vsock`).
    Vsock,
    /// A virtio-media device (`outboard media`).
    Media,
}

impl DeviceKind {
    /// The kind's name: `vsock`, `media`.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Vsock => "vsock",
            DeviceKind::Media => "media",
        }
    }

    /// The prefix of the kind's Prometheus metric names: `outboard_vsock_`,
    /// `outboard_media_`.
    pub fn prometheus_prefix(self) -> &'static str {
        match self {
            DeviceKind::Vsock => "outboard_vsock_",
            DeviceKind::Media => "outboard_media_",
        }
    }

    /// The device's own descriptions of its counters (by name, in order), when this
    /// build has the device.
    fn counter_docs(self) -> (&'static [&'static str], &'static [&'static str]) {
        match self {
            #[cfg(feature = "vsock")]
            DeviceKind::Vsock => (VsockMetricsSnapshot::NAMES, VsockMetricsSnapshot::HELP),
            #[cfg(feature = "media")]
            DeviceKind::Media => (MediaMetricsSnapshot::NAMES, MediaMetricsSnapshot::HELP),
            #[allow(unreachable_patterns)]
            _ => (&[], &[]),
        }
    }
}

/// Help text of a counter of a `kind` device: the device's own description of it, or
/// what the daemon adds (`worker_restarts`).
pub fn counter_help(kind: DeviceKind, name: &str) -> Option<&'static str> {
    if name == crate::shared_metrics::WORKER_RESTARTS {
        return Some("Jailed workers of this device that died and were replaced.");
    }
    let (names, help) = kind.counter_docs();
    let i = names.iter().position(|n| *n == name)?;
    help.get(i).map(|h| h.trim())
}

/// `(name, value)` of every counter of `snapshot`.
pub fn counters_of<S: CounterSet>(snapshot: &S) -> Vec<(String, u64)> {
    S::counter_names()
        .iter()
        .map(|n| n.to_string())
        .zip(snapshot.counter_values())
        .collect()
}

/// Which device an entry of the metrics files describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceId {
    /// The kind of device.
    pub kind: DeviceKind,
    /// The guest CID (vsock devices).
    pub guest_cid: Option<u64>,
    /// The vhost-user socket the device is served on (its path, or `fd:N` for an
    /// inherited socket with no path).
    pub socket: PathBuf,
}

impl DeviceId {
    /// The vsock device of guest `guest_cid`, served on `socket`.
    pub fn vsock(guest_cid: u64, socket: PathBuf) -> DeviceId {
        DeviceId {
            kind: DeviceKind::Vsock,
            guest_cid: Some(guest_cid),
            socket,
        }
    }

    /// The media device served on `socket`.
    pub fn media(socket: PathBuf) -> DeviceId {
        DeviceId {
            kind: DeviceKind::Media,
            guest_cid: None,
            socket,
        }
    }
}

/// One VM's device in the metrics files.
#[derive(Debug, Clone)]
pub struct VmMetrics {
    /// The device.
    pub device: DeviceId,
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
    device: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    guest_cid: Option<u64>,
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

/// Renders the metrics document: `timestamp_ms`, then `vms`, each with `device` (the
/// kind: `vsock`, `media`), `guest_cid` (vsock only), `socket` and `counters` (in the
/// device's order), in that order.
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
                device: vm.device.kind.name(),
                guest_cid: vm.device.guest_cid,
                socket: vm.device.socket.display().to_string(),
                counters: Counters(&vm.counters),
            })
            .collect(),
    };
    // Strings and integers in maps with string keys always serialize.
    let mut text = serde_json::to_string_pretty(&doc).unwrap_or_default();
    text.push('\n');
    text
}

/// A help text as the exposition format wants it: on one line, backslash escaped, and
/// without the brackets of rustdoc links (the descriptions are the devices' doc
/// comments: "[`MAX_MAPPINGS`]" becomes "`MAX_MAPPINGS`").
fn prometheus_help(text: &str) -> String {
    let one_line: Vec<&str> = text.split_whitespace().collect();
    one_line
        .join(" ")
        .replace("[`", "`")
        .replace("`]", "`")
        .replace('\\', "\\\\")
}

/// A label value as the exposition format wants it: backslash, quote and newline
/// escaped.
fn prometheus_label(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The labels of a device's samples: `guest_cid` (vsock) and `socket`.
fn prometheus_labels(device: &DeviceId) -> String {
    let socket = prometheus_label(&device.socket.display().to_string());
    match device.guest_cid {
        Some(cid) => format!("guest_cid=\"{cid}\",socket=\"{socket}\""),
        None => format!("socket=\"{socket}\""),
    }
}

/// Renders the counters in the Prometheus text exposition format (version 0.0.4): one
/// family per counter, `outboard_<kind>_<name>` (`outboard_vsock_rx_packets`,
/// `outboard_media_sessions_opened`), with its `# HELP` (the device's own description
/// of the counter) and `# TYPE counter`, and one sample per device labelled `guest_cid`
/// (vsock) and `socket`.
pub fn render_prometheus(vms: &[VmMetrics]) -> String {
    let mut families: Vec<(DeviceKind, &str)> = Vec::new();
    for vm in vms {
        for (name, _) in &vm.counters {
            if !families.contains(&(vm.device.kind, name.as_str())) {
                families.push((vm.device.kind, name));
            }
        }
    }
    let mut out = String::new();
    for (kind, name) in families {
        let metric = format!("{}{name}", kind.prometheus_prefix());
        if let Some(help) = counter_help(kind, name) {
            out.push_str(&format!("# HELP {metric} {}\n", prometheus_help(help)));
        }
        out.push_str(&format!("# TYPE {metric} counter\n"));
        for vm in vms.iter().filter(|vm| vm.device.kind == kind) {
            if let Some((_, value)) = vm.counters.iter().find(|(n, _)| n == name) {
                out.push_str(&format!(
                    "{metric}{{{}}} {value}\n",
                    prometheus_labels(&vm.device)
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
        let vms = vec![
            VmMetrics {
                device: DeviceId::vsock(3, PathBuf::from("/tmp/a \"b\".sock")),
                counters: vec![("rx_packets".into(), 7)],
            },
            VmMetrics {
                device: DeviceId::media(PathBuf::from("/run/media.sock")),
                counters: vec![("sessions_opened".into(), 4)],
            },
        ];
        let doc = render(&vms);
        let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
        assert_eq!(v["vms"][0]["device"], "vsock");
        assert_eq!(v["vms"][0]["guest_cid"], 3);
        // A media device has no guest CID: its socket names it.
        assert_eq!(v["vms"][1]["device"], "media");
        assert_eq!(v["vms"][1]["socket"], "/run/media.sock");
        assert!(v["vms"][1].get("guest_cid").is_none(), "{doc}");
        assert_eq!(v["vms"][1]["counters"]["sessions_opened"], 4);
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
        assert!(at("timestamp_ms") < at("device") && at("device") < at("guest_cid"));
        assert!(at("guest_cid") < at("counters"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn prometheus_exposition_has_help_type_and_labelled_samples() {
        let vms = vec![
            VmMetrics {
                device: DeviceId::vsock(3, PathBuf::from("/run/a \"b\".sock")),
                counters: vec![("rx_packets".into(), 7), ("worker_restarts".into(), 1)],
            },
            VmMetrics {
                device: DeviceId::vsock(4, PathBuf::from("/run/c.sock")),
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
        // Every vsock and media counter has a one-line help text, without rustdoc's
        // link brackets.
        let all = VsockMetricsSnapshot::NAMES
            .iter()
            .map(|n| (DeviceKind::Vsock, n))
            .chain(
                MediaMetricsSnapshot::NAMES
                    .iter()
                    .map(|n| (DeviceKind::Media, n)),
            );
        for (kind, name) in all {
            let help = prometheus_help(counter_help(kind, name).unwrap());
            assert!(!help.is_empty() && !help.contains('\n'), "{name}");
            assert!(
                !help.contains("[`") && !help.contains("`]"),
                "{name}: {help}"
            );
        }
        assert_eq!(counter_help(DeviceKind::Media, "rx_packets"), None);
    }

    #[test]
    fn media_families_are_labelled_by_socket_only() {
        let vms = vec![VmMetrics {
            device: DeviceId::media(PathBuf::from("/run/media.sock")),
            counters: counters_of(&MediaMetricsSnapshot {
                sessions_opened: 4,
                err_session_limit: 10,
                ..Default::default()
            }),
        }];
        let text = render_prometheus(&vms);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "# HELP outboard_media_sessions_opened Sessions opened (OPEN answered with a session)."
        );
        assert_eq!(lines[1], "# TYPE outboard_media_sessions_opened counter");
        assert_eq!(
            lines[2],
            "outboard_media_sessions_opened{socket=\"/run/media.sock\"} 4"
        );
        assert!(
            lines.contains(&"outboard_media_err_session_limit{socket=\"/run/media.sock\"} 10"),
            "{text}"
        );
        assert!(
            text.contains("# HELP outboard_media_err_mapping_limit MMAPs refused because the device had `MAX_MAPPINGS` (1024) mappings (`ENOMEM`).\n"),
            "{text}"
        );
        // HELP, TYPE and one sample per counter.
        assert_eq!(lines.len(), 3 * MediaMetricsSnapshot::COUNT);
    }
}
