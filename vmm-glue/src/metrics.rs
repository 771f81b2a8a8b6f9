//! The metrics file of `outboard vsock --metrics PATH`: one JSON document with every
//! VM's device counters, rewritten atomically (write to a temporary file, rename).

use std::fmt::Debug;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Turns a derived `Debug` rendering of a struct of integer counters
/// (`Name { a: 1, b: 2 }`) into `(field, value)` pairs. Fields that are not plain
/// unsigned integers are skipped.
pub fn counters_of(snapshot: &impl Debug) -> Vec<(String, u64)> {
    counter_fields(&format!("{snapshot:?}"))
        .map(|(name, value)| (name.to_string(), value))
        .collect()
}

/// The `(field, value)` pairs of a derived `Debug` rendering `text`, in field order,
/// without allocating (what [`counters_of`] and the shared counter page parse).
pub(crate) fn counter_fields(text: &str) -> impl Iterator<Item = (&str, u64)> {
    let body = text
        .split_once('{')
        .and_then(|(_, rest)| rest.rsplit_once('}'))
        .map_or("", |(body, _)| body);
    body.split(',').filter_map(|field| {
        let (name, value) = field.split_once(':')?;
        let name = name.trim();
        let value = value.trim().parse::<u64>().ok()?;
        let ident = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        ident.then_some((name, value))
    })
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

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Renders the metrics document.
pub fn render(vms: &[VmMetrics]) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let mut out = format!("{{\n  \"timestamp_ms\": {now},\n  \"vms\": [");
    for (i, vm) in vms.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!(
            "\n    {{\n      \"guest_cid\": {},\n      \"socket\": {},\n      \"counters\": {{",
            vm.guest_cid,
            json_string(&vm.socket.display().to_string())
        ));
        for (j, (name, value)) in vm.counters.iter().enumerate() {
            if j > 0 {
                out.push(',');
            }
            out.push_str(&format!("\n        {}: {value}", json_string(name)));
        }
        out.push_str("\n      }\n    }");
    }
    out.push_str("\n  ]\n}\n");
    out
}

/// Writes the document to `path` atomically.
pub fn write(path: &Path, vms: &[VmMetrics]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(render(vms).as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    #[allow(dead_code)]
    struct Snap {
        rx_packets: u64,
        tx_bytes: u64,
        name: &'static str,
    }

    #[test]
    fn counters_from_debug() {
        let c = counters_of(&Snap {
            rx_packets: 3,
            tx_bytes: 1 << 40,
            name: "x",
        });
        assert_eq!(
            c,
            vec![
                ("rx_packets".to_string(), 3),
                ("tx_bytes".to_string(), 1 << 40)
            ]
        );
        assert!(counters_of(&5u32).is_empty());
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
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
