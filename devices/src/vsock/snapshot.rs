//! The state of a [`Vsock`] device, defined once: what a snapshot, a
//! vhost-user state transfer (`SET_DEVICE_STATE_FD`) and a live upgrade carry.
//!
//! # What is carried, and what is not
//!
//! A restored device needs its identity and what the driver negotiated: the guest CID
//! (a restore into a device of another CID is refused), the features the device offered
//! and the features the driver acked. Queue addresses and ring indices belong to the
//! transport, which saves them beside this state (the virtio-mmio snapshot, the
//! vhost-user front-end's own ring state).
//!
//! Connections are not carried. As in Firecracker and as the virtio-vsock
//! specification intends (`VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`, virtio 1.3, 5.10.6.7), a
//! restore closes every host socket the device has (bytes the guest sent that the host
//! socket had not taken yet are dropped with it) and tells the guest to drop its
//! connections with a TRANSPORT_RESET event on the event queue, delivered as soon as the
//! guest has an event buffer posted. Listeners are the restored device's own (it binds
//! them at [`Vsock::new`]).
//!
//! # Binary encoding, version 1
//!
//! Little-endian, 32 bytes, nothing before or after:
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | magic, the bytes `OBVS` |
//! | 4 | 2 | version, 1 |
//! | 6 | 2 | length of the fields that follow, 24 |
//! | 8 | 8 | guest CID |
//! | 16 | 8 | features the device offered |
//! | 24 | 8 | features the driver acked |
//!
//! [`VsockSnapshot::from_bytes`] refuses another magic, a version it does not know, a
//! body length that is not its version's and data that is short or runs past the end,
//! each with an error naming the value. A later version adds fields after these and
//! raises the version; this code keeps reading version 1.
//!
//! With the crate's `serde` feature the same type is `Serialize`/`Deserialize` (for
//! [`Suspendable`] snapshots, a `serde_json::Value`): an object
//! with `version` and the three fields, whose version is checked the same way.

use thiserror::Error;

use super::Vsock;
use crate::bus::{SuspendError, Suspendable};

/// The first four bytes of an encoded [`VsockSnapshot`].
pub const SNAPSHOT_MAGIC: [u8; 4] = *b"OBVS";
/// The encoding version this code writes (and the only one it reads).
pub const SNAPSHOT_VERSION: u16 = 1;
/// Bytes of an encoded version-1 [`VsockSnapshot`], header included.
pub const SNAPSHOT_LEN: usize = HEADER_LEN + BODY_LEN_V1;

const HEADER_LEN: usize = 8;
const BODY_LEN_V1: usize = 24;

/// Errors of decoding or restoring a [`VsockSnapshot`].
#[cfg_attr(test, remain::sorted)]
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum VsockSnapshotError {
    /// The snapshot is of a device with another guest CID.
    #[error("the state is of guest CID {snapshot}, this device serves guest CID {device}")]
    CidMismatch {
        /// The CID in the snapshot.
        snapshot: u64,
        /// This device's CID.
        device: u64,
    },
    /// The snapshot's acked features are not all offered (by the snapshot's device, or
    /// by this one).
    #[error("acked features {acked:#x} include {extra:#x}, which {by} does not offer")]
    FeaturesNotOffered {
        /// The acked features.
        acked: u64,
        /// The bits that are not offered.
        extra: u64,
        /// Who does not offer them: "the saved device" or "this device".
        by: &'static str,
    },
    /// The data is not as long as its header says (short, or with bytes after the end).
    #[error("vsock state of version {version} is {expected} bytes, got {got}")]
    Length {
        /// The version in the header.
        version: u16,
        /// The length the header's version and body length make.
        expected: usize,
        /// The length given.
        got: usize,
    },
    /// The data does not start with [`SNAPSHOT_MAGIC`].
    #[error(
        "not vsock device state: magic {found:02x?}, expected {SNAPSHOT_MAGIC:02x?} (\"OBVS\")"
    )]
    Magic {
        /// The first four bytes.
        found: [u8; 4],
    },
    /// Shorter than the 8-byte header.
    #[error("vsock state of {got} bytes is shorter than its 8-byte header")]
    Short {
        /// The length given.
        got: usize,
    },
    /// A version this code does not read, or a body length that is not its version's.
    #[error("vsock state version {version} with a {body_len}-byte body is not supported (this build reads version {SNAPSHOT_VERSION}, {BODY_LEN_V1} bytes)")]
    Version {
        /// The version in the header.
        version: u16,
        /// The body length in the header.
        body_len: u16,
    },
}

/// The state of a vsock device (see the [module docs](self) for what it carries and its
/// binary encoding).
///
/// ```
/// use outboard_devices::vsock::VsockSnapshot;
///
/// let state = VsockSnapshot { guest_cid: 3, offered_features: 0x1_0000_0003, acked_features: 0x1_0000_0001 };
/// let bytes = state.to_bytes();
/// assert_eq!(&bytes[..4], b"OBVS");
/// assert_eq!(VsockSnapshot::from_bytes(&bytes), Ok(state));
/// assert!(VsockSnapshot::from_bytes(&bytes[..31]).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(try_from = "SerdeSnapshot", into = "SerdeSnapshot")
)]
pub struct VsockSnapshot {
    /// The guest's CID.
    pub guest_cid: u64,
    /// The features the device offered.
    pub offered_features: u64,
    /// The features the driver acked (a subset of `offered_features`).
    pub acked_features: u64,
}

impl VsockSnapshot {
    /// The version-1 encoding ([`SNAPSHOT_LEN`] bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SNAPSHOT_LEN);
        out.extend_from_slice(&SNAPSHOT_MAGIC);
        out.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        out.extend_from_slice(&(BODY_LEN_V1 as u16).to_le_bytes());
        out.extend_from_slice(&self.guest_cid.to_le_bytes());
        out.extend_from_slice(&self.offered_features.to_le_bytes());
        out.extend_from_slice(&self.acked_features.to_le_bytes());
        out
    }

    /// Decodes [`VsockSnapshot::to_bytes`]'s encoding; refuses anything else (see the
    /// [module docs](self)).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, VsockSnapshotError> {
        let Some((header, body)) = bytes.split_first_chunk::<HEADER_LEN>() else {
            return Err(VsockSnapshotError::Short { got: bytes.len() });
        };
        let [m0, m1, m2, m3, v0, v1, l0, l1] = *header;
        if [m0, m1, m2, m3] != SNAPSHOT_MAGIC {
            return Err(VsockSnapshotError::Magic {
                found: [m0, m1, m2, m3],
            });
        }
        let version = u16::from_le_bytes([v0, v1]);
        let body_len = u16::from_le_bytes([l0, l1]);
        if version != SNAPSHOT_VERSION || usize::from(body_len) != BODY_LEN_V1 {
            return Err(VsockSnapshotError::Version { version, body_len });
        }
        let Ok(body) = <&[u8; BODY_LEN_V1]>::try_from(body) else {
            return Err(VsockSnapshotError::Length {
                version,
                expected: SNAPSHOT_LEN,
                got: bytes.len(),
            });
        };
        let field = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&body[8 * i..8 * i + 8]);
            u64::from_le_bytes(b)
        };
        let snapshot = VsockSnapshot {
            guest_cid: field(0),
            offered_features: field(1),
            acked_features: field(2),
        };
        snapshot.check()?;
        Ok(snapshot)
    }

    /// The checks that need no device: acked features are a subset of the offer.
    fn check(&self) -> Result<(), VsockSnapshotError> {
        let extra = self.acked_features & !self.offered_features;
        if extra != 0 {
            return Err(VsockSnapshotError::FeaturesNotOffered {
                acked: self.acked_features,
                extra,
                by: "the saved device",
            });
        }
        Ok(())
    }
}

/// The serde form of [`VsockSnapshot`]: its fields and the encoding version.
#[cfg(feature = "serde")]
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SerdeSnapshot {
    version: u16,
    guest_cid: u64,
    offered_features: u64,
    acked_features: u64,
}

#[cfg(feature = "serde")]
impl From<VsockSnapshot> for SerdeSnapshot {
    fn from(s: VsockSnapshot) -> Self {
        SerdeSnapshot {
            version: SNAPSHOT_VERSION,
            guest_cid: s.guest_cid,
            offered_features: s.offered_features,
            acked_features: s.acked_features,
        }
    }
}

#[cfg(feature = "serde")]
impl TryFrom<SerdeSnapshot> for VsockSnapshot {
    type Error = VsockSnapshotError;

    fn try_from(s: SerdeSnapshot) -> Result<Self, Self::Error> {
        if s.version != SNAPSHOT_VERSION {
            return Err(VsockSnapshotError::Version {
                version: s.version,
                body_len: BODY_LEN_V1 as u16,
            });
        }
        let snapshot = VsockSnapshot {
            guest_cid: s.guest_cid,
            offered_features: s.offered_features,
            acked_features: s.acked_features,
        };
        snapshot.check()?;
        Ok(snapshot)
    }
}

/// A vsock device is [`Suspendable`]: its snapshot is its [`VsockSnapshot`] as serde
/// value, and a restore is [`Vsock::restore_state_from`] (host sockets closed, the guest
/// told TRANSPORT_RESET). Sleep and wake succeed and do nothing: the device has no thread
/// of its own and runs only when its caller calls it, so a transport that stops calling it
/// has quiesced it.
impl Suspendable for Vsock {
    #[cfg(feature = "serde")]
    fn snapshot(&mut self) -> Result<serde_json::Value, SuspendError> {
        serde_json::to_value(self.save_state()).map_err(|e| failed(self, "snapshot", e))
    }

    #[cfg(feature = "serde")]
    fn restore(&mut self, data: serde_json::Value) -> Result<(), SuspendError> {
        let state: VsockSnapshot =
            serde_json::from_value(data).map_err(|e| failed(self, "restore", e))?;
        self.restore_state_from(&state)
            .map_err(|e| failed(self, "restore", e))
    }

    fn sleep(&mut self) -> Result<(), SuspendError> {
        Ok(())
    }

    fn wake(&mut self) -> Result<(), SuspendError> {
        Ok(())
    }
}

#[cfg(feature = "serde")]
fn failed(dev: &Vsock, operation: &str, reason: impl std::fmt::Display) -> SuspendError {
    SuspendError::Failed {
        device: format!("vsock (guest CID {})", dev.guest_cid()),
        operation: operation.to_owned(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATE: VsockSnapshot = VsockSnapshot {
        guest_cid: 0x1234_5678_9abc,
        offered_features: 0x1_2000_0003,
        acked_features: 0x1_0000_0001,
    };

    #[test]
    fn encoding_is_the_documented_layout() {
        let b = STATE.to_bytes();
        assert_eq!(b.len(), SNAPSHOT_LEN);
        assert_eq!(b.len(), 32);
        assert_eq!(&b[0..4], b"OBVS");
        assert_eq!(&b[4..8], &[1, 0, 24, 0]);
        assert_eq!(&b[8..16], &0x1234_5678_9abcu64.to_le_bytes());
        assert_eq!(&b[16..24], &0x1_2000_0003u64.to_le_bytes());
        assert_eq!(&b[24..32], &0x1_0000_0001u64.to_le_bytes());
        assert_eq!(VsockSnapshot::from_bytes(&b), Ok(STATE));
    }

    #[test]
    fn from_bytes_refuses_what_is_not_version_1_exactly() {
        let good = STATE.to_bytes();
        for n in 0..HEADER_LEN {
            assert_eq!(
                VsockSnapshot::from_bytes(&good[..n]),
                Err(VsockSnapshotError::Short { got: n })
            );
        }
        for n in HEADER_LEN..SNAPSHOT_LEN {
            assert_eq!(
                VsockSnapshot::from_bytes(&good[..n]),
                Err(VsockSnapshotError::Length {
                    version: 1,
                    expected: 32,
                    got: n
                })
            );
        }
        let mut long = good.clone();
        long.push(0);
        let err = VsockSnapshot::from_bytes(&long).unwrap_err();
        assert_eq!(
            err.to_string(),
            "vsock state of version 1 is 32 bytes, got 33"
        );

        let mut bad = good.clone();
        bad[0] = b'X';
        let err = VsockSnapshot::from_bytes(&bad).unwrap_err();
        assert!(matches!(err, VsockSnapshotError::Magic { found } if &found == b"XBVS"));
        assert!(err.to_string().contains("not vsock device state"), "{err}");

        let mut v2 = good.clone();
        v2[4] = 2;
        let err = VsockSnapshot::from_bytes(&v2).unwrap_err();
        assert_eq!(
            err,
            VsockSnapshotError::Version {
                version: 2,
                body_len: 24
            }
        );
        assert!(err.to_string().contains("version 2"), "{err}");
        let mut body = good.clone();
        body[6] = 16;
        assert!(matches!(
            VsockSnapshot::from_bytes(&body),
            Err(VsockSnapshotError::Version { body_len: 16, .. })
        ));

        let mut acked = good;
        acked[24..32].copy_from_slice(&0x4_0000_0000u64.to_le_bytes());
        let err = VsockSnapshot::from_bytes(&acked).unwrap_err();
        assert!(matches!(
            err,
            VsockSnapshotError::FeaturesNotOffered {
                extra: 0x4_0000_0000,
                ..
            }
        ));
    }

    /// Every one-byte change and every length of pseudo-random bytes: `from_bytes`
    /// answers without panicking, and what it accepts encodes back to the same bytes.
    #[test]
    fn from_bytes_survives_any_input() {
        let good = STATE.to_bytes();
        let check = |b: &[u8]| {
            if let Ok(s) = VsockSnapshot::from_bytes(b) {
                assert_eq!(s.to_bytes(), b);
            }
        };
        for i in 0..good.len() {
            for v in [0u8, 1, 0x7f, 0x80, 0xff] {
                let mut b = good.clone();
                b[i] = v;
                check(&b);
            }
        }
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for len in 0..100 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            check(&bytes);
            let mut framed = good[..8].to_vec();
            framed.extend_from_slice(&bytes);
            check(&framed);
        }
    }

    fn device(name: &str, cid: u64) -> (Vsock, std::path::PathBuf) {
        let d = std::env::temp_dir().join(format!("outboard-snap-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let dev = Vsock::new(super::super::VsockDeviceConfig::new(cid, d.join("v"))).unwrap();
        (dev, d)
    }

    #[test]
    fn a_device_restores_its_own_state_and_refuses_another_cid() {
        use crate::virtio::{StateError, VirtioDevice};
        let (mut a, da) = device("a", 7);
        let (mut b, db) = device("b", 7);
        let (mut other, dc) = device("c", 8);
        assert!(a.supports_state());
        let acked = a.features() & !crate::virtio::VIRTIO_RING_F_EVENT_IDX;
        a.ack_features(acked);
        let bytes = a.snapshot_state().unwrap();
        assert_eq!(
            VsockSnapshot::from_bytes(&bytes).unwrap(),
            VsockSnapshot {
                guest_cid: 7,
                offered_features: Vsock::FEATURES,
                acked_features: acked
            }
        );
        assert!(!b.transport_reset_pending());
        b.restore_state(&bytes).unwrap();
        assert_eq!(b.save_state(), a.save_state());
        // Not active yet: the event waits for activation and an event buffer.
        assert!(b.transport_reset_pending());

        let err = other.restore_state(&bytes).unwrap_err();
        assert_eq!(
            err,
            StateError::Refused(
                "the state is of guest CID 7, this device serves guest CID 8".to_owned()
            )
        );
        assert_eq!(other.save_state().acked_features, 0, "nothing changed");
        assert!(!other.transport_reset_pending());
        let err = other.restore_state(b"OBVS").unwrap_err();
        assert!(err.to_string().contains("4 bytes"), "{err}");

        let mut foreign = a.save_state();
        foreign.offered_features |= 1 << 40;
        foreign.acked_features |= 1 << 40;
        let err = b.restore_state_from(&foreign).unwrap_err();
        assert!(
            matches!(err, VsockSnapshotError::FeaturesNotOffered { extra, by: "this device", .. } if extra == 1 << 40),
            "{err}"
        );
        for d in [da, db, dc] {
            let _ = std::fs::remove_dir_all(d);
        }
    }

    #[cfg(feature = "serde")]
    #[test]
    fn suspendable_snapshot_is_the_serde_form() {
        let (mut a, da) = device("sa", 9);
        let (mut b, db) = device("sb", 9);
        a.sleep().unwrap();
        let v = a.snapshot().unwrap();
        assert_eq!(v["guest_cid"], 9);
        b.restore(v.clone()).unwrap();
        assert!(b.transport_reset_pending());
        let mut wrong = v;
        wrong["guest_cid"] = 10.into();
        let err = b.restore(wrong).unwrap_err();
        assert!(
            err.to_string().contains(
                "restore failed: the state is of guest CID 10, this device serves guest CID 9"
            ),
            "{err}"
        );
        for d in [da, db] {
            let _ = std::fs::remove_dir_all(d);
        }
    }

    #[cfg(feature = "serde")]
    #[test]
    fn serde_form_carries_the_version_and_checks_it() {
        let v = serde_json::to_value(STATE).unwrap();
        assert_eq!(v["version"], 1);
        assert_eq!(v["guest_cid"], 0x1234_5678_9abcu64);
        let back: VsockSnapshot = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(back, STATE);
        let mut v9 = v.clone();
        v9["version"] = 9.into();
        let err = serde_json::from_value::<VsockSnapshot>(v9).unwrap_err();
        assert!(err.to_string().contains("version 9"), "{err}");
        let mut extra = v;
        extra["connections"] = 1.into();
        assert!(serde_json::from_value::<VsockSnapshot>(extra).is_err());
    }
}
