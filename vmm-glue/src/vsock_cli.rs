//! The configuration of `outboard vsock`: one [`VmConfig`] per served VM, from
//! `--vm` specs, the flat flags, or a `--config` file, validated before anything starts.
//!
//! The keys are vhost-device-vsock's, so its users can switch by changing the program
//! name: `guest-cid`, `socket`, `uds-path`, `forward-cid`, `forward-listen`,
//! `tx-buffer-size`, `queue-size`, `groups` (`_` may replace `-`). A VM has either
//! `uds-path` (the AF_UNIX muxer) or `forward-cid` (the host's AF_VSOCK, with
//! `forward-listen` ports joined by `+`). A config file is YAML in the form vhost-device-vsock reads,
//! parsed with serde_yaml_ng; a key it does not know is refused by name:
//!
//! ```yaml
//! vms:
//!     - guest_cid: 4
//!       socket: /tmp/vhost4.socket
//!       uds_path: /tmp/vm4.vsock
//!       tx_buffer_size: 262144
//!       queue_size: 1024
//!       groups: group1+group2
//! ```

use std::collections::BTreeSet;
use std::path::PathBuf;

use outboard_devices::vsock::{
    VsockBackend, VsockDeviceConfig, VsockError, VsockForward, VsockSibling, DEFAULT_TX_BUF_SIZE,
    MAX_FORWARD_LISTEN_PORTS, MAX_TX_BUF_SIZE,
};
use serde::Deserialize;
use thiserror::Error;

/// Default per-connection TX buffer (and guest credit): 256 KiB, the default socket
/// buffer of a Linux guest, whose send window is at most that buffer. A window of one
/// 64 KiB packet (vhost-device-vsock's 64 KiB default) makes a sending guest wait for a
/// CREDIT_UPDATE after every packet, each an RX packet and a call-eventfd write; with
/// 256 KiB the device announces credit once per 128 KiB forwarded (see
/// `credit_update_threshold`) and the guest keeps sending meanwhile.
pub const DEFAULT_TX_BUFFER_SIZE: u32 = DEFAULT_TX_BUF_SIZE;

/// The guest CID when none is given (vhost-device-vsock's default, in every form).
pub const DEFAULT_GUEST_CID: u64 = 3;

/// Default largest ring size accepted from the front-end.
pub const DEFAULT_QUEUE_SIZE: u16 = 1024;

/// One VM served by the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// The guest's context id.
    pub guest_cid: u64,
    /// The vhost-user socket the front-end connects to.
    pub socket: PathBuf,
    /// Where host-side connections live: the muxer's AF_UNIX socket (`<uds_path>`,
    /// `<uds_path>_<port>`), or the host's AF_VSOCK (`forward-cid`, `forward-listen`).
    pub backend: VsockBackend,
    /// Per-connection TX buffer, also the credit given to the guest.
    pub tx_buffer_size: u32,
    /// Largest ring size accepted from the front-end.
    pub queue_size: u16,
    /// Sibling groups.
    pub groups: Vec<String>,
}

impl VmConfig {
    /// The muxer's AF_UNIX socket path, if the VM has the AF_UNIX backend.
    pub fn uds_path(&self) -> Option<&std::path::Path> {
        match &self.backend {
            VsockBackend::Unix(path) => Some(path),
            VsockBackend::Vsock(_) => None,
        }
    }

    /// The host side in words, for log lines: `host sockets <uds_path>`, or the
    /// AF_VSOCK forward CID and ports.
    pub fn host_side(&self) -> String {
        match &self.backend {
            VsockBackend::Unix(path) => format!("host sockets {}", path.display()),
            VsockBackend::Vsock(f) if f.listen_ports.is_empty() => {
                format!("AF_VSOCK forward to CID {}", f.cid)
            }
            VsockBackend::Vsock(f) => format!(
                "AF_VSOCK forward to CID {}, listening on ports {}",
                f.cid,
                join_ports(&f.listen_ports)
            ),
        }
    }

    /// The device configuration this VM's worker builds its device from.
    pub fn device_config(&self) -> VsockDeviceConfig {
        let mut config = VsockDeviceConfig::with_backend(self.guest_cid, self.backend.clone());
        config.tx_buf_size = self.tx_buffer_size;
        config
    }
}

fn join_ports(ports: &[u32]) -> String {
    ports
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join("+")
}

/// Errors in the flags or the config file. Every variant names the offending value.
#[cfg_attr(test, remain::sorted)]
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A value could not be parsed.
    #[error("{key}: {value:?} is not a valid {what}")]
    BadValue {
        /// The key.
        key: String,
        /// The value given.
        value: String,
        /// What was expected.
        what: &'static str,
    },
    /// `uds-path` and `forward-cid` both given for one VM.
    #[error("uds-path {uds_path} and forward-cid {forward_cid} are both given{context}: a VM has one host side, AF_UNIX or AF_VSOCK")]
    BothBackends {
        /// The uds-path given.
        uds_path: String,
        /// The forward-cid given.
        forward_cid: u32,
        /// Where (e.g. " in --vm guest-cid=3,...").
        context: String,
    },
    /// The config file could not be read.
    #[error("cannot read config file {path}: {reason}")]
    ConfigFile {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// Two VMs use the same CID.
    #[error("guest CID {0} is used by more than one VM")]
    DuplicateCid(u64),
    /// Two VMs listen on the same AF_VSOCK forward port.
    #[error("forward-listen port {0} is used by more than one VM")]
    DuplicateForwardPort(u32),
    /// A key appears twice in one VM.
    #[error("{0} is given twice for one VM")]
    DuplicateKey(String),
    /// Two VMs use the same socket path.
    #[error("socket path {0} is used more than once")]
    DuplicateSocket(String),
    /// `forward-listen` without `forward-cid`.
    #[error("forward-listen {ports} needs forward-cid{context}")]
    ForwardListenAlone {
        /// The ports given.
        ports: String,
        /// Where.
        context: String,
    },
    /// A reserved or out-of-range CID.
    #[error("guest CID {0} is invalid: it must be between 3 and 4294967294")]
    InvalidCid(u64),
    /// An invalid group name.
    #[error("group name {0:?} is invalid: use letters, digits, '_' and '-', joined with '+'")]
    InvalidGroup(String),
    /// A queue size that is not a power of two in range.
    #[error("queue size {0} is invalid: it must be a power of two from 1 to 32768")]
    InvalidQueueSize(u64),
    /// A TX buffer size out of range.
    #[error("tx buffer size {0} is invalid: it must be between 1 and {max}", max = MAX_TX_BUF_SIZE)]
    InvalidTxBufferSize(u64),
    /// A required key is missing.
    #[error("{key} is missing{context}")]
    Missing {
        /// The key.
        key: &'static str,
        /// Where (e.g. " in --vm guest-cid=3").
        context: String,
    },
    /// Several ways of describing VMs were mixed.
    #[error(
        "use only one of --vm, --config, and the flat flags (--guest-cid --socket --uds-path \
         or --forward-cid)"
    )]
    MixedForms,
    /// No VM described at all.
    #[error("no VM given: use --vm, --config, or --socket with --uds-path or --forward-cid")]
    NoVm,
    /// A config file line could not be understood.
    #[error("config file line {line}: {reason}")]
    Syntax {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// An unknown key.
    #[error("unknown key {0:?} (known: guest-cid, socket, uds-path, forward-cid, forward-listen, tx-buffer-size, queue-size, groups)")]
    UnknownKey(String),
}

/// A VM being assembled from key/value pairs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VmBuilder {
    guest_cid: Option<u64>,
    socket: Option<PathBuf>,
    uds_path: Option<PathBuf>,
    forward_cid: Option<u32>,
    forward_listen: Option<Vec<u32>>,
    tx_buffer_size: Option<u32>,
    queue_size: Option<u16>,
    groups: Option<Vec<String>>,
}

fn parse_num(key: &str, value: &str) -> Result<u64, ConfigError> {
    let v = value.trim();
    let parsed = if let Some(hex) = v.strip_prefix("0x") {
        u64::from_str_radix(hex, 16)
    } else {
        v.parse()
    };
    parsed.map_err(|_| ConfigError::BadValue {
        key: key.to_string(),
        value: value.to_string(),
        what: "number",
    })
}

/// A CID or port: a number that fits 32 bits and is not the `*_ANY` wildcard.
fn parse_u32(key: &str, value: &str, what: &'static str) -> Result<u32, ConfigError> {
    u32::try_from(parse_num(key, value)?)
        .ok()
        .filter(|n| *n != u32::MAX)
        .ok_or_else(|| ConfigError::BadValue {
            key: key.to_string(),
            value: value.to_string(),
            what,
        })
}

/// `forward-listen`: ports joined with `+`, each once, at most
/// [`MAX_FORWARD_LISTEN_PORTS`].
fn parse_ports(key: &str, value: &str) -> Result<Vec<u32>, ConfigError> {
    let bad = || ConfigError::BadValue {
        key: key.to_string(),
        value: value.to_string(),
        what: "list of distinct AF_VSOCK ports joined with '+' (at most 64)",
    };
    let mut ports = Vec::new();
    for p in value.split('+') {
        let port = parse_u32(key, p, "AF_VSOCK port (0..4294967294)")?;
        if ports.contains(&port) {
            return Err(bad());
        }
        ports.push(port);
    }
    if ports.len() > MAX_FORWARD_LISTEN_PORTS {
        return Err(bad());
    }
    Ok(ports)
}

fn parse_groups(value: &str) -> Result<Vec<String>, ConfigError> {
    let groups: Vec<String> = value.split('+').map(str::to_string).collect();
    for g in &groups {
        let ok = !g.is_empty()
            && g.len() <= 64
            && g.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !ok {
            return Err(ConfigError::InvalidGroup(value.to_string()));
        }
    }
    Ok(groups)
}

fn set<T>(slot: &mut Option<T>, key: &str, value: T) -> Result<(), ConfigError> {
    if slot.is_some() {
        return Err(ConfigError::DuplicateKey(key.to_string()));
    }
    *slot = Some(value);
    Ok(())
}

impl VmBuilder {
    /// Sets one key.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        let norm = key.trim().replace('_', "-");
        match norm.as_str() {
            "guest-cid" => {
                let cid = parse_num(&norm, value)?;
                set(&mut self.guest_cid, &norm, cid)
            }
            "socket" | "socket-path" => set(&mut self.socket, "socket", PathBuf::from(value)),
            "uds-path" => set(&mut self.uds_path, &norm, PathBuf::from(value)),
            "forward-cid" => {
                let cid = parse_u32(&norm, value, "CID (0..4294967294)")?;
                set(&mut self.forward_cid, &norm, cid)
            }
            "forward-listen" => set(&mut self.forward_listen, &norm, parse_ports(&norm, value)?),
            "tx-buffer-size" => {
                let n = parse_num(&norm, value)?;
                let n = u32::try_from(n)
                    .ok()
                    .filter(|n| (1..=MAX_TX_BUF_SIZE).contains(n))
                    .ok_or(ConfigError::InvalidTxBufferSize(n))?;
                set(&mut self.tx_buffer_size, &norm, n)
            }
            "queue-size" => {
                let n = parse_num(&norm, value)?;
                let q = u16::try_from(n)
                    .ok()
                    .filter(|q| q.is_power_of_two() && *q <= 32768)
                    .ok_or(ConfigError::InvalidQueueSize(n))?;
                set(&mut self.queue_size, &norm, q)
            }
            "groups" => set(&mut self.groups, &norm, parse_groups(value)?),
            _ => Err(ConfigError::UnknownKey(key.trim().to_string())),
        }
    }

    /// Checks and completes the VM; `context` names where it came from.
    pub fn build(self, context: &str) -> Result<VmConfig, ConfigError> {
        let missing = |key| ConfigError::Missing {
            key,
            context: context.to_string(),
        };
        // vhost-device-vsock's default in every form (flags, --vm, config file).
        let guest_cid = self.guest_cid.unwrap_or(DEFAULT_GUEST_CID);
        if !(3..u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(ConfigError::InvalidCid(guest_cid));
        }
        let backend = match (self.uds_path, self.forward_cid, self.forward_listen) {
            (Some(path), None, None) => VsockBackend::Unix(path),
            (None, Some(cid), ports) => VsockBackend::Vsock(VsockForward {
                cid,
                listen_ports: ports.unwrap_or_default(),
            }),
            (Some(path), Some(cid), _) => {
                return Err(ConfigError::BothBackends {
                    uds_path: path.display().to_string(),
                    forward_cid: cid,
                    context: context.to_string(),
                })
            }
            (_, None, Some(ports)) => {
                return Err(ConfigError::ForwardListenAlone {
                    ports: join_ports(&ports),
                    context: context.to_string(),
                })
            }
            (None, None, None) => return Err(missing("uds-path or forward-cid")),
        };
        Ok(VmConfig {
            guest_cid,
            socket: self.socket.ok_or_else(|| missing("socket"))?,
            backend,
            tx_buffer_size: self.tx_buffer_size.unwrap_or(DEFAULT_TX_BUFFER_SIZE),
            queue_size: self.queue_size.unwrap_or(DEFAULT_QUEUE_SIZE),
            groups: self.groups.unwrap_or_else(|| vec!["default".to_string()]),
        })
    }
}

/// Parses one `--vm` value: `key=value` pairs separated by commas.
pub fn parse_vm_spec(spec: &str) -> Result<VmConfig, ConfigError> {
    let mut b = VmBuilder::default();
    for pair in spec.split(',').filter(|p| !p.trim().is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| ConfigError::BadValue {
            key: "--vm".into(),
            value: pair.to_string(),
            what: "key=value pair",
        })?;
        b.set(k, v)?;
    }
    b.build(&format!(" in --vm {spec}"))
}

/// A value in the config file: YAML gives numbers as numbers and everything else as
/// strings; both go through the same checks as `--vm` values.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Scalar {
    Number(u64),
    Text(String),
}

impl Scalar {
    fn text(&self) -> String {
        match self {
            Scalar::Number(n) => n.to_string(),
            Scalar::Text(t) => t.clone(),
        }
    }
}

/// One VM of the config file: vhost-device-vsock's keys (snake_case), and the `--vm`
/// spellings (kebab-case) as aliases. Any other key is refused, by name.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigVm {
    #[serde(alias = "guest-cid")]
    guest_cid: Option<Scalar>,
    #[serde(alias = "socket-path", alias = "socket_path")]
    socket: Option<Scalar>,
    #[serde(alias = "uds-path")]
    uds_path: Option<Scalar>,
    #[serde(alias = "forward-cid")]
    forward_cid: Option<Scalar>,
    #[serde(alias = "forward-listen")]
    forward_listen: Option<Scalar>,
    #[serde(alias = "tx-buffer-size")]
    tx_buffer_size: Option<Scalar>,
    #[serde(alias = "queue-size")]
    queue_size: Option<Scalar>,
    groups: Option<Scalar>,
}

/// The config file: `vms:`, a list of VMs.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    vms: Option<Vec<ConfigVm>>,
}

/// Parses a config file's text (vhost-device-vsock's YAML form, see the module docs)
/// with a YAML parser (serde_yaml_ng); unknown keys are refused by name, with their
/// line and column.
pub fn parse_config(text: &str) -> Result<Vec<VmConfig>, ConfigError> {
    let file: ConfigFile = serde_yaml_ng::from_str(text).map_err(|e| {
        let line = e.location().map_or(0, |l| l.line());
        ConfigError::Syntax {
            line,
            reason: e.to_string(),
        }
    })?;
    let entries = file.vms.unwrap_or_default();
    if entries.is_empty() {
        return Err(ConfigError::NoVm);
    }
    let mut vms = Vec::with_capacity(entries.len());
    for (i, vm) in entries.into_iter().enumerate() {
        let mut b = VmBuilder::default();
        let keys = [
            ("guest-cid", &vm.guest_cid),
            ("socket", &vm.socket),
            ("uds-path", &vm.uds_path),
            ("forward-cid", &vm.forward_cid),
            ("forward-listen", &vm.forward_listen),
            ("tx-buffer-size", &vm.tx_buffer_size),
            ("queue-size", &vm.queue_size),
            ("groups", &vm.groups),
        ];
        for (key, value) in keys {
            if let Some(v) = value {
                b.set(key, &v.text())?;
            }
        }
        vms.push(b.build(&format!(" in VM {} of the config file (vms[{i}])", i + 1))?);
    }
    Ok(vms)
}

/// The flat flags, as given.
#[derive(Debug, Default, Clone)]
pub struct FlatFlags {
    /// `--guest-cid`.
    pub guest_cid: Option<String>,
    /// `--socket`.
    pub socket: Option<String>,
    /// `--uds-path`.
    pub uds_path: Option<String>,
    /// `--forward-cid`.
    pub forward_cid: Option<String>,
    /// `--forward-listen`.
    pub forward_listen: Option<String>,
    /// `--tx-buffer-size`.
    pub tx_buffer_size: Option<String>,
    /// `--queue-size`.
    pub queue_size: Option<String>,
    /// `--groups`.
    pub groups: Option<String>,
}

impl FlatFlags {
    fn any(&self) -> bool {
        self.guest_cid.is_some()
            || self.socket.is_some()
            || self.uds_path.is_some()
            || self.forward_cid.is_some()
            || self.forward_listen.is_some()
            || self.tx_buffer_size.is_some()
            || self.queue_size.is_some()
            || self.groups.is_some()
    }

    fn build(&self) -> Result<VmConfig, ConfigError> {
        let mut b = VmBuilder::default();
        let pairs = [
            ("guest-cid", &self.guest_cid),
            ("socket", &self.socket),
            ("uds-path", &self.uds_path),
            ("forward-cid", &self.forward_cid),
            ("forward-listen", &self.forward_listen),
            ("tx-buffer-size", &self.tx_buffer_size),
            ("queue-size", &self.queue_size),
            ("groups", &self.groups),
        ];
        for (k, v) in pairs {
            if let Some(v) = v {
                b.set(k, v)?;
            }
        }
        b.build(" (flags)")
    }
}

/// Resolves the VMs from exactly one of the three forms and checks them together.
pub fn resolve(
    specs: &[String],
    flat: &FlatFlags,
    config_text: Option<&str>,
) -> Result<Vec<VmConfig>, ConfigError> {
    let forms = usize::from(!specs.is_empty())
        + usize::from(flat.any())
        + usize::from(config_text.is_some());
    if forms > 1 {
        return Err(ConfigError::MixedForms);
    }
    let vms = if !specs.is_empty() {
        specs
            .iter()
            .map(|s| parse_vm_spec(s))
            .collect::<Result<Vec<_>, _>>()?
    } else if let Some(text) = config_text {
        parse_config(text)?
    } else if flat.any() {
        vec![flat.build()?]
    } else {
        return Err(ConfigError::NoVm);
    };
    check_unique(&vms)?;
    Ok(vms)
}

/// Wires the vsock devices of VMs that share a group, as vhost-device-vsock does: a
/// guest reaches a sibling guest by its CID, and only inside a group.
///
/// Devices run on their own worker threads; [`VsockSibling`] handles link them through
/// each other's bounded inboxes, so devices can join one by one as they are created.
#[derive(Debug, Default)]
pub struct SiblingGroups {
    members: Vec<(Vec<String>, VsockSibling)>,
}

impl SiblingGroups {
    /// Adds the device of a VM in `groups` and links it with every device added before
    /// that shares one of them; returns how many it was linked with.
    pub fn join(&mut self, groups: &[String], sibling: VsockSibling) -> Result<usize, VsockError> {
        let mut linked = 0;
        for (theirs, other) in &self.members {
            if theirs.iter().any(|g| groups.contains(g)) {
                sibling.link(other)?;
                linked += 1;
            }
        }
        self.members.push((groups.to_vec(), sibling));
        Ok(linked)
    }
}

/// The pairs of VMs (indices into `vms`, the lower first) that share a group, each
/// once: the links jailed workers, one process per VM, need
/// (`outboard_devices::vsock::sibling_socket_pair` and
/// `Vsock::link_sibling_socket`).
pub fn sibling_pairs(vms: &[VmConfig]) -> Vec<(usize, usize)> {
    let mut pairs = Vec::new();
    for (i, a) in vms.iter().enumerate() {
        for (j, b) in vms.iter().enumerate().skip(i + 1) {
            if a.groups.iter().any(|g| b.groups.contains(g)) {
                pairs.push((i, j));
            }
        }
    }
    pairs
}

fn check_unique(vms: &[VmConfig]) -> Result<(), ConfigError> {
    let mut cids = BTreeSet::new();
    let mut paths = BTreeSet::new();
    let mut ports = BTreeSet::new();
    for vm in vms {
        if !cids.insert(vm.guest_cid) {
            return Err(ConfigError::DuplicateCid(vm.guest_cid));
        }
        for p in std::iter::once(vm.socket.as_path()).chain(vm.uds_path()) {
            if !paths.insert(p.to_path_buf()) {
                return Err(ConfigError::DuplicateSocket(p.display().to_string()));
            }
        }
        if let VsockBackend::Vsock(f) = &vm.backend {
            for &port in &f.listen_ports {
                if !ports.insert(port) {
                    return Err(ConfigError::DuplicateForwardPort(port));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_spec_with_every_key() {
        let vm = parse_vm_spec(
            "guest-cid=4,socket=/tmp/a.sock,uds-path=/tmp/a.vsock,tx-buffer-size=65536,queue-size=512,groups=a+b_2",
        )
        .unwrap();
        assert_eq!(
            vm,
            VmConfig {
                guest_cid: 4,
                socket: "/tmp/a.sock".into(),
                backend: VsockBackend::Unix("/tmp/a.vsock".into()),
                tx_buffer_size: 65536,
                queue_size: 512,
                groups: vec!["a".into(), "b_2".into()],
            }
        );
        let d = parse_vm_spec("guest_cid=3,socket=/s,uds_path=/u").unwrap();
        assert_eq!(d.tx_buffer_size, DEFAULT_TX_BUFFER_SIZE);
        assert_eq!(d.queue_size, DEFAULT_QUEUE_SIZE);
        assert_eq!(d.groups, vec!["default".to_string()]);
    }

    #[test]
    fn vm_spec_errors_name_the_value() {
        let e = |s: &str| parse_vm_spec(s).unwrap_err();
        assert_eq!(
            e("guest-cid=2,socket=/s,uds-path=/u"),
            ConfigError::InvalidCid(2)
        );
        assert_eq!(
            e("guest-cid=4294967295,socket=/s,uds-path=/u"),
            ConfigError::InvalidCid(4294967295)
        );
        assert_eq!(
            e("guest-cid=3,socket=/s,uds-path=/u,queue-size=1000"),
            ConfigError::InvalidQueueSize(1000)
        );
        assert_eq!(
            e("guest-cid=3,socket=/s,uds-path=/u,tx-buffer-size=0"),
            ConfigError::InvalidTxBufferSize(0)
        );
        assert_eq!(
            e("guest-cid=3,socket=/s,uds-path=/u,groups=a++b"),
            ConfigError::InvalidGroup("a++b".into())
        );
        assert_eq!(
            e("guest-cid=3,socket=/s,uds-path=/u,color=red"),
            ConfigError::UnknownKey("color".into())
        );
        assert_eq!(
            e("guest-cid=3,guest-cid=4,socket=/s,uds-path=/u"),
            ConfigError::DuplicateKey("guest-cid".into())
        );
        assert!(matches!(e("guest-cid=x3"), ConfigError::BadValue { value, .. } if value == "x3"));
        assert!(matches!(
            e("guest-cid=3,socket=/s"),
            ConfigError::Missing {
                key: "uds-path or forward-cid",
                ..
            }
        ));
        assert!(e("guest-cid=2,socket=/s,uds-path=/u")
            .to_string()
            .contains("guest CID 2"));
    }

    #[test]
    fn config_file_in_vhost_device_vsock_form() {
        let text = "# two VMs\nvms:\n    - guest_cid: 4\n      socket: /tmp/vhost4.socket\n      uds_path: \"/tmp/vm4.vsock\"\n      tx_buffer_size: 65536\n      queue_size: 1024\n      groups: group1+group2\n    - guest_cid: 5 # the other\n      socket: /tmp/vhost5.socket\n      uds_path: /tmp/vm5.vsock\n";
        let vms = parse_config(text).unwrap();
        assert_eq!(vms.len(), 2);
        assert_eq!(
            vms[0].uds_path(),
            Some(std::path::Path::new("/tmp/vm4.vsock"))
        );
        assert_eq!(
            vms[0].groups,
            vec!["group1".to_string(), "group2".to_string()]
        );
        assert_eq!(vms[1].guest_cid, 5);
        assert_eq!(vms[1].tx_buffer_size, DEFAULT_TX_BUFFER_SIZE);
    }

    #[test]
    fn config_file_errors_name_the_line() {
        let e = parse_config("vms:\n  - guest_cid: 3\n    sockt: /s\n").unwrap_err();
        assert!(
            matches!(e, ConfigError::Syntax { line: 3, ref reason } if reason.contains("sockt"))
        );
        let e = parse_config("machines:\n").unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { line: 1, .. }));
        let e = parse_config("vms:\n  - guest_cid: 3\n    socket: /s\n").unwrap_err();
        assert!(
            matches!(e, ConfigError::Missing { key: "uds-path or forward-cid", ref context } if context.contains("VM 1"))
        );
        assert_eq!(parse_config("vms:\n"), Err(ConfigError::NoVm));
        // YAML the old line reader could not take: flow style, anchors, quoted numbers.
        let vms = parse_config(
            "vms: [{guest_cid: '7', socket: /a, uds_path: /u}, {guest-cid: 0x8, socket: /b, uds-path: /v}]",
        )
        .unwrap();
        assert_eq!((vms[0].guest_cid, vms[1].guest_cid), (7, 8));
        // Values are checked as --vm values are.
        let e = parse_config("vms:\n  - socket: /s\n    uds_path: /u\n    queue_size: 1000\n")
            .unwrap_err();
        assert_eq!(e, ConfigError::InvalidQueueSize(1000));
        let e = parse_config("vms:\n  - socket: [1, 2]\n").unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { line: 2, .. }), "{e}");
    }

    #[test]
    fn resolve_rejects_duplicates_and_mixed_forms() {
        let specs = vec![
            "guest-cid=3,socket=/a,uds-path=/ua".to_string(),
            "guest-cid=3,socket=/b,uds-path=/ub".to_string(),
        ];
        assert_eq!(
            resolve(&specs, &FlatFlags::default(), None),
            Err(ConfigError::DuplicateCid(3))
        );
        let specs = vec![
            "guest-cid=3,socket=/a,uds-path=/ua".to_string(),
            "guest-cid=4,socket=/a,uds-path=/ub".to_string(),
        ];
        assert_eq!(
            resolve(&specs, &FlatFlags::default(), None),
            Err(ConfigError::DuplicateSocket("/a".into()))
        );
        let flat = FlatFlags {
            guest_cid: Some("3".into()),
            socket: Some("/s".into()),
            uds_path: Some("/u".into()),
            ..FlatFlags::default()
        };
        assert_eq!(resolve(&specs, &flat, None), Err(ConfigError::MixedForms));
        assert_eq!(resolve(&[], &flat, None).unwrap()[0].guest_cid, 3);
        assert_eq!(
            resolve(&[], &FlatFlags::default(), None),
            Err(ConfigError::NoVm)
        );
    }

    #[test]
    fn sibling_groups_link_only_vms_that_share_a_group() {
        use outboard_devices::vsock::{Vsock, VsockDeviceConfig};
        let dir = std::env::temp_dir().join(format!("outboard-groups-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dev = |cid: u64| {
            Vsock::new(VsockDeviceConfig::new(
                cid,
                dir.join(format!("{cid}.vsock")),
            ))
        };
        let (d3, d4, d5, d6) = (
            dev(3).unwrap(),
            dev(4).unwrap(),
            dev(5).unwrap(),
            dev(6).unwrap(),
        );
        let g = |s: &str| parse_groups(s).unwrap();
        let mut groups = SiblingGroups::default();
        assert_eq!(groups.join(&g("a+b"), d3.sibling()).unwrap(), 0);
        assert_eq!(groups.join(&g("b"), d4.sibling()).unwrap(), 1);
        assert_eq!(groups.join(&g("c"), d5.sibling()).unwrap(), 0);
        assert_eq!(groups.join(&g("c+a"), d6.sibling()).unwrap(), 2);
        assert!(matches!(
            groups.join(&g("a"), d3.sibling()),
            Err(VsockError::SiblingCid(3))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sibling_pairs_are_the_vms_sharing_a_group_each_once() {
        let vm = |cid: u64, groups: &[&str]| VmConfig {
            guest_cid: cid,
            socket: format!("/tmp/v{cid}.sock").into(),
            backend: VsockBackend::Unix(format!("/tmp/u{cid}").into()),
            tx_buffer_size: 64 * 1024,
            queue_size: 256,
            groups: groups.iter().map(|g| g.to_string()).collect(),
        };
        let vms = [
            vm(3, &["a"]),
            vm(4, &["a", "b"]),
            vm(5, &["b"]),
            vm(6, &["c"]),
            vm(7, &["a", "b"]),
        ];
        assert_eq!(
            sibling_pairs(&vms),
            vec![(0, 1), (0, 4), (1, 2), (1, 4), (2, 4)]
        );
        assert!(sibling_pairs(&vms[..1]).is_empty());
    }

    #[test]
    fn forward_cid_and_listen_in_every_form() {
        let want = VsockBackend::Vsock(VsockForward {
            cid: 1,
            listen_ports: vec![9001, 9002],
        });
        let vm =
            parse_vm_spec("guest-cid=4,socket=/s,forward-cid=1,forward-listen=9001+9002").unwrap();
        assert_eq!(vm.backend, want);
        assert_eq!(vm.uds_path(), None);
        assert_eq!(
            vm.host_side(),
            "AF_VSOCK forward to CID 1, listening on ports 9001+9002"
        );
        let vms = parse_config(
            "vms:\n  - guest_cid: 4\n    socket: /s\n    forward_cid: 1\n    forward_listen: 9001+9002\n",
        )
        .unwrap();
        assert_eq!(vms[0].backend, want);
        // A single port is a YAML number.
        let vms = parse_config("vms:\n  - socket: /s\n    forward-cid: 2\n    forward-listen: 7\n")
            .unwrap();
        assert_eq!(
            vms[0].backend,
            VsockBackend::Vsock(VsockForward {
                cid: 2,
                listen_ports: vec![7]
            })
        );
        let flat = FlatFlags {
            socket: Some("/s".into()),
            forward_cid: Some("1".into()),
            forward_listen: Some("9001+9002".into()),
            ..FlatFlags::default()
        };
        assert_eq!(resolve(&[], &flat, None).unwrap()[0].backend, want);
        // Without forward-listen: guest-initiated connections only.
        let vm = parse_vm_spec("socket=/s,forward-cid=1").unwrap();
        assert_eq!(vm.host_side(), "AF_VSOCK forward to CID 1");
        assert!(muxer_free(&vm));
    }

    fn muxer_free(vm: &VmConfig) -> bool {
        matches!(vm.device_config().backend, VsockBackend::Vsock(_))
    }

    #[test]
    fn forward_errors_name_the_value() {
        let e = |s: &str| parse_vm_spec(s).unwrap_err();
        let both = e("socket=/s,uds-path=/u,forward-cid=1");
        assert!(
            matches!(&both, ConfigError::BothBackends { uds_path, forward_cid: 1, .. } if uds_path == "/u"),
            "{both}"
        );
        assert!(both.to_string().contains("one host side"), "{both}");
        let alone = e("socket=/s,uds-path=/u,forward-listen=5");
        assert!(
            matches!(&alone, ConfigError::ForwardListenAlone { ports, .. } if ports == "5"),
            "{alone}"
        );
        for bad in [
            "forward-cid=-1",
            "forward-cid=4294967295",
            "forward-cid=4294967296",
        ] {
            let err = e(&format!("socket=/s,{bad}"));
            assert!(
                matches!(err, ConfigError::BadValue { ref key, .. } if key == "forward-cid"),
                "{bad}: {err}"
            );
        }
        for bad in ["1+1", "1++2", "x", "4294967295"] {
            let err = e(&format!("socket=/s,forward-cid=1,forward-listen={bad}"));
            assert!(
                matches!(err, ConfigError::BadValue { ref key, .. } if key == "forward-listen"),
                "{bad}: {err}"
            );
        }
        let many = (1..=65)
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("+");
        assert!(matches!(
            e(&format!("socket=/s,forward-cid=1,forward-listen={many}")),
            ConfigError::BadValue { .. }
        ));
        // Two VMs cannot listen on one port (the second bind would fail at start).
        let specs = [
            "guest-cid=3,socket=/a,forward-cid=1,forward-listen=5+6".to_string(),
            "guest-cid=4,socket=/b,forward-cid=1,forward-listen=7+6".to_string(),
        ];
        assert_eq!(
            resolve(&specs, &FlatFlags::default(), None).unwrap_err(),
            ConfigError::DuplicateForwardPort(6)
        );
        // An unknown key names the forward keys among the known ones.
        assert!(e("socket=/s,forward=1")
            .to_string()
            .contains("forward-cid, forward-listen"));
    }

    #[test]
    fn the_guest_cid_defaults_to_3_in_every_form() {
        assert_eq!(parse_vm_spec("socket=/s,uds-path=/u").unwrap().guest_cid, 3);
        let vms = parse_config("vms:\n  - socket: /s\n    uds_path: /u\n").unwrap();
        assert_eq!(vms[0].guest_cid, 3);
        let flat = FlatFlags {
            socket: Some("/s".into()),
            uds_path: Some("/u".into()),
            ..FlatFlags::default()
        };
        assert_eq!(
            resolve(&[], &flat, None).unwrap()[0].guest_cid,
            DEFAULT_GUEST_CID
        );
    }
}
