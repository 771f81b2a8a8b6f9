//! What the spec says about each request: body size, attached fds, replies and the
//! protocol feature that gates it. Transports enforce these on every message.

use core::mem::size_of;

use super::*;
use crate::{ProtocolError, Result};

/// The body sizes a request may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodySize {
    /// Exactly this many bytes.
    Exact(usize),
    /// A memory table: 8 bytes plus 1 to 8 regions of 32 bytes.
    MemTable,
    /// A config access: 12 bytes plus `size` (at most 256) bytes.
    Config,
    /// Any size up to [`MAX_MSG_SIZE`] (opaque bodies such as crypto sessions).
    Variable,
}

impl BodySize {
    /// Checks `len` against the rule (the exact memory-table and config sizes also
    /// depend on the body's head and are checked again once it is parsed).
    pub fn check(self, what: &'static str, len: usize) -> Result<()> {
        let ok = match self {
            BodySize::Exact(n) => len == n,
            BodySize::MemTable => {
                len >= size_of::<VhostUserMemory>() + size_of::<VhostUserMemoryRegion>()
                    && len
                        <= size_of::<VhostUserMemory>()
                            + MAX_MEM_TABLE_REGIONS * size_of::<VhostUserMemoryRegion>()
                    && (len - size_of::<VhostUserMemory>()) % size_of::<VhostUserMemoryRegion>()
                        == 0
            }
            BodySize::Config => {
                len > size_of::<VhostUserConfig>()
                    && len <= size_of::<VhostUserConfig>() + MAX_CONFIG_SIZE as usize
            }
            BodySize::Variable => len <= MAX_MSG_SIZE,
        };
        if ok {
            Ok(())
        } else {
            Err(ProtocolError::Size {
                what,
                got: len,
                want: self.nominal(),
            })
        }
    }

    /// The size to report as "expected" in errors (the largest allowed size for the
    /// variable rules).
    pub fn nominal(self) -> usize {
        match self {
            BodySize::Exact(n) => n,
            BodySize::MemTable => {
                size_of::<VhostUserMemory>()
                    + MAX_MEM_TABLE_REGIONS * size_of::<VhostUserMemoryRegion>()
            }
            BodySize::Config => size_of::<VhostUserConfig>() + MAX_CONFIG_SIZE as usize,
            BodySize::Variable => MAX_MSG_SIZE,
        }
    }
}

/// How many fds a message may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdCount {
    /// None.
    None,
    /// Exactly one.
    One,
    /// Zero or one (kick/call/err: decided by the NOFD bit; REM_MEM_REG: tolerated and
    /// closed, as the spec allows for old front-ends).
    Optional,
    /// One per memory table region.
    PerRegion,
}

impl FdCount {
    /// Checks an fd count against the rule. `regions` is the memory table's region
    /// count for [`FdCount::PerRegion`].
    pub fn check(self, got: usize, regions: usize) -> bool {
        match self {
            FdCount::None => got == 0,
            FdCount::One => got == 1,
            FdCount::Optional => got <= 1,
            FdCount::PerRegion => got == regions,
        }
    }
}

/// When the receiver sends a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Never, except a `REPLY_ACK` status when NEED_REPLY is set and negotiated.
    AckOnly,
    /// Always, with a body of this rule (plus fds per `fds`).
    Always {
        /// Body size of the reply.
        body: BodySize,
        /// Fds attached to the reply.
        fds: FdCount,
    },
}

/// The spec's rules for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestRules {
    /// Request body size.
    pub body: BodySize,
    /// Fds attached to the request.
    pub fds: FdCount,
    /// The reply.
    pub reply: Reply,
    /// The protocol feature that must have been negotiated before the request may be
    /// sent, if any.
    pub feature: Option<VhostUserProtocolFeatures>,
    /// Whether the request is only valid once `VHOST_USER_F_PROTOCOL_FEATURES` (virtio
    /// bit 30) was offered by the back-end (`GET/SET_PROTOCOL_FEATURES`,
    /// `SET_VRING_ENABLE`).
    pub needs_protocol_features: bool,
}

const fn rules(
    body: BodySize,
    fds: FdCount,
    reply: Reply,
    feature: Option<VhostUserProtocolFeatures>,
) -> RequestRules {
    RequestRules {
        body,
        fds,
        reply,
        feature,
        needs_protocol_features: false,
    }
}

const U64: BodySize = BodySize::Exact(size_of::<VhostUserU64>());
const NONE: BodySize = BodySize::Exact(0);
const STATE: BodySize = BodySize::Exact(size_of::<VhostUserVringState>());
const REPLY_U64: Reply = Reply::Always {
    body: U64,
    fds: FdCount::None,
};
const ACK: Reply = Reply::AckOnly;

impl FrontendReq {
    /// The spec's rules for this request.
    pub const fn rules(self) -> RequestRules {
        use FdCount as F;
        use FrontendReq::*;
        type P = VhostUserProtocolFeatures;
        match self {
            GET_FEATURES => rules(NONE, F::None, REPLY_U64, None),
            SET_FEATURES => rules(U64, F::None, ACK, None),
            SET_OWNER => rules(NONE, F::None, ACK, None),
            RESET_OWNER => rules(NONE, F::None, ACK, None),
            SET_MEM_TABLE => rules(BodySize::MemTable, F::PerRegion, ACK, None),
            SET_LOG_BASE => rules(
                BodySize::Exact(size_of::<VhostUserLog>()),
                F::One,
                REPLY_U64,
                Some(P::LOG_SHMFD),
            ),
            SET_LOG_FD => rules(NONE, F::One, ACK, Some(P::LOG_SHMFD)),
            SET_VRING_NUM | SET_VRING_BASE => rules(STATE, F::None, ACK, None),
            SET_VRING_ADDR => rules(
                BodySize::Exact(size_of::<VhostUserVringAddr>()),
                F::None,
                ACK,
                None,
            ),
            GET_VRING_BASE => rules(
                STATE,
                F::None,
                Reply::Always {
                    body: STATE,
                    fds: F::None,
                },
                None,
            ),
            SET_VRING_KICK | SET_VRING_CALL | SET_VRING_ERR => rules(U64, F::Optional, ACK, None),
            GET_PROTOCOL_FEATURES => RequestRules {
                needs_protocol_features: true,
                ..rules(NONE, F::None, REPLY_U64, None)
            },
            SET_PROTOCOL_FEATURES => RequestRules {
                needs_protocol_features: true,
                ..rules(U64, F::None, ACK, None)
            },
            GET_QUEUE_NUM => rules(NONE, F::None, REPLY_U64, Some(P::MQ)),
            SET_VRING_ENABLE => RequestRules {
                needs_protocol_features: true,
                ..rules(STATE, F::None, ACK, None)
            },
            SEND_RARP => rules(U64, F::None, ACK, Some(P::RARP)),
            NET_SET_MTU => rules(U64, F::None, ACK, Some(P::MTU)),
            SET_BACKEND_REQ_FD => rules(NONE, F::One, ACK, Some(P::BACKEND_REQ)),
            IOTLB_MSG => rules(
                BodySize::Exact(size_of::<VhostUserIotlb>()),
                F::None,
                ACK,
                None,
            ),
            SET_VRING_ENDIAN => rules(STATE, F::None, ACK, Some(P::CROSS_ENDIAN)),
            GET_CONFIG => rules(
                BodySize::Config,
                F::None,
                Reply::Always {
                    body: BodySize::Config,
                    fds: F::None,
                },
                Some(P::CONFIG),
            ),
            SET_CONFIG => rules(BodySize::Config, F::None, ACK, Some(P::CONFIG)),
            CREATE_CRYPTO_SESSION => rules(
                BodySize::Variable,
                F::None,
                Reply::Always {
                    body: BodySize::Variable,
                    fds: F::None,
                },
                Some(P::CRYPTO_SESSION),
            ),
            CLOSE_CRYPTO_SESSION => rules(U64, F::None, ACK, Some(P::CRYPTO_SESSION)),
            POSTCOPY_ADVISE => rules(
                NONE,
                F::None,
                Reply::Always {
                    body: U64,
                    fds: F::One,
                },
                Some(P::PAGEFAULT),
            ),
            POSTCOPY_LISTEN => rules(NONE, F::None, ACK, Some(P::PAGEFAULT)),
            POSTCOPY_END => rules(NONE, F::None, REPLY_U64, Some(P::PAGEFAULT)),
            GET_INFLIGHT_FD => rules(
                BodySize::Exact(size_of::<VhostUserInflight>()),
                F::None,
                Reply::Always {
                    body: BodySize::Exact(size_of::<VhostUserInflight>()),
                    fds: F::One,
                },
                Some(P::INFLIGHT_SHMFD),
            ),
            SET_INFLIGHT_FD => rules(
                BodySize::Exact(size_of::<VhostUserInflight>()),
                F::One,
                ACK,
                Some(P::INFLIGHT_SHMFD),
            ),
            GPU_SET_SOCKET => rules(NONE, F::One, ACK, None),
            RESET_DEVICE => rules(NONE, F::None, ACK, Some(P::RESET_DEVICE)),
            VRING_KICK => rules(STATE, F::None, ACK, Some(P::INBAND_NOTIFICATIONS)),
            GET_MAX_MEM_SLOTS => rules(NONE, F::None, REPLY_U64, Some(P::CONFIGURE_MEM_SLOTS)),
            ADD_MEM_REG => rules(
                BodySize::Exact(size_of::<VhostUserSingleMemoryRegion>()),
                F::One,
                ACK,
                Some(P::CONFIGURE_MEM_SLOTS),
            ),
            REM_MEM_REG => rules(
                BodySize::Exact(size_of::<VhostUserSingleMemoryRegion>()),
                F::Optional,
                ACK,
                Some(P::CONFIGURE_MEM_SLOTS),
            ),
            SET_STATUS => rules(U64, F::None, ACK, Some(P::STATUS)),
            GET_STATUS => rules(NONE, F::None, REPLY_U64, Some(P::STATUS)),
            GET_SHARED_OBJECT => rules(
                BodySize::Exact(size_of::<VhostUserShared>()),
                F::None,
                Reply::Always {
                    body: U64,
                    fds: F::Optional,
                },
                Some(P::SHARED_OBJECT),
            ),
            SET_DEVICE_STATE_FD => rules(
                BodySize::Exact(size_of::<VhostUserTransferDeviceState>()),
                F::One,
                Reply::Always {
                    body: U64,
                    fds: F::Optional,
                },
                Some(P::DEVICE_STATE),
            ),
            CHECK_DEVICE_STATE => rules(NONE, F::None, REPLY_U64, Some(P::DEVICE_STATE)),
            GET_SHMEM_CONFIG => rules(
                NONE,
                F::None,
                Reply::Always {
                    body: BodySize::Exact(size_of::<VhostUserShmemConfig>()),
                    fds: F::None,
                },
                Some(P::SHMEM),
            ),
        }
    }
}

impl BackendReq {
    /// The spec's rules for this request. Every back-end request also needs
    /// `BACKEND_REQ` (the channel exists only then); fds need `BACKEND_SEND_FD`.
    pub const fn rules(self) -> RequestRules {
        use BackendReq::*;
        use FdCount as F;
        type P = VhostUserProtocolFeatures;
        match self {
            IOTLB_MSG => rules(
                BodySize::Exact(size_of::<VhostUserIotlb>()),
                F::None,
                ACK,
                None,
            ),
            CONFIG_CHANGE_MSG => rules(NONE, F::None, ACK, Some(P::CONFIG)),
            VRING_HOST_NOTIFIER_MSG => rules(
                BodySize::Exact(size_of::<VhostUserVringArea>()),
                F::Optional,
                ACK,
                Some(P::HOST_NOTIFIER),
            ),
            VRING_CALL | VRING_ERR => rules(STATE, F::None, ACK, Some(P::INBAND_NOTIFICATIONS)),
            SHARED_OBJECT_ADD | SHARED_OBJECT_REMOVE => rules(
                BodySize::Exact(size_of::<VhostUserShared>()),
                F::None,
                ACK,
                Some(P::SHARED_OBJECT),
            ),
            SHARED_OBJECT_LOOKUP => rules(
                BodySize::Exact(size_of::<VhostUserShared>()),
                F::None,
                Reply::Always {
                    body: U64,
                    fds: F::Optional,
                },
                Some(P::SHARED_OBJECT),
            ),
            SHMEM_MAP => rules(
                BodySize::Exact(size_of::<VhostUserMMap>()),
                F::One,
                ACK,
                Some(P::SHMEM),
            ),
            SHMEM_UNMAP => rules(
                BodySize::Exact(size_of::<VhostUserMMap>()),
                F::None,
                ACK,
                Some(P::SHMEM),
            ),
        }
    }
}

impl CrosvmBackendReq {
    /// crosvm's rules for its requests: both always get a u64 reply (0 or -errno).
    pub const fn rules(self) -> RequestRules {
        match self {
            CrosvmBackendReq::GPU_MAP => rules(
                BodySize::Exact(size_of::<VhostUserGpuMapMsg>()),
                FdCount::One,
                REPLY_U64,
                Some(VhostUserProtocolFeatures::SHMEM),
            ),
            CrosvmBackendReq::EXTERNAL_MAP => rules(
                BodySize::Exact(size_of::<VhostUserExternalMapMsg>()),
                FdCount::None,
                REPLY_U64,
                Some(VhostUserProtocolFeatures::SHMEM),
            ),
        }
    }
}

/// Parses and validates a `SET_MEM_TABLE` body: the head, then exactly `num_regions`
/// regions, each validated, with no trailing bytes.
///
/// Returns the head and the region bytes; iterate them with [`mem_table_regions`].
pub fn parse_mem_table(body: &[u8]) -> Result<(VhostUserMemory, &[u8])> {
    BodySize::MemTable.check("memory table", body.len())?;
    let (head, rest): (VhostUserMemory, _) = crate::read_prefix(body, "memory table head")?;
    crate::Validate::validate(&head)?;
    let want = head.num_regions as usize * size_of::<VhostUserMemoryRegion>();
    if rest.len() != want {
        return Err(ProtocolError::Size {
            what: "memory table regions",
            got: rest.len(),
            want,
        });
    }
    for region in mem_table_regions(rest) {
        crate::Validate::validate(&region?)?;
    }
    Ok((head, rest))
}

/// Iterates the regions of a memory table's region bytes.
pub fn mem_table_regions(bytes: &[u8]) -> impl Iterator<Item = Result<VhostUserMemoryRegion>> + '_ {
    bytes
        .chunks(size_of::<VhostUserMemoryRegion>())
        .map(|chunk| crate::read_exact(chunk, "memory region"))
}

/// Parses and validates a `GET_CONFIG`/`SET_CONFIG` body: the head and exactly `size`
/// payload bytes.
pub fn parse_config(body: &[u8]) -> Result<(VhostUserConfig, &[u8])> {
    BodySize::Config.check("config", body.len())?;
    let (head, payload): (VhostUserConfig, _) = crate::read_prefix(body, "config head")?;
    crate::Validate::validate(&head)?;
    if payload.len() != head.size as usize {
        return Err(ProtocolError::Size {
            what: "config payload",
            got: payload.len(),
            want: head.size as usize,
        });
    }
    Ok((head, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_size_rules() {
        assert!(BodySize::Exact(8).check("u64", 8).is_ok());
        assert_eq!(
            BodySize::Exact(8).check("u64", 7),
            Err(ProtocolError::Size {
                what: "u64",
                got: 7,
                want: 8
            })
        );
        assert!(BodySize::MemTable.check("t", 8).is_err());
        assert!(BodySize::MemTable.check("t", 8 + 32).is_ok());
        assert!(BodySize::MemTable.check("t", 8 + 33).is_err());
        assert!(BodySize::MemTable.check("t", 8 + 8 * 32).is_ok());
        assert!(BodySize::MemTable.check("t", 8 + 9 * 32).is_err());
        assert!(BodySize::Config.check("c", 12).is_err());
        assert!(BodySize::Config.check("c", 13).is_ok());
        assert!(BodySize::Config.check("c", 12 + 257).is_err());
        assert!(BodySize::Variable.check("v", MAX_MSG_SIZE + 1).is_err());
    }

    #[test]
    fn fd_count_rules() {
        assert!(FdCount::None.check(0, 0));
        assert!(!FdCount::None.check(1, 0));
        assert!(FdCount::One.check(1, 0));
        assert!(!FdCount::One.check(0, 0));
        assert!(!FdCount::One.check(2, 0));
        assert!(FdCount::Optional.check(0, 0) && FdCount::Optional.check(1, 0));
        assert!(!FdCount::Optional.check(2, 0));
        assert!(FdCount::PerRegion.check(3, 3));
        assert!(!FdCount::PerRegion.check(2, 3));
    }

    #[test]
    fn gating() {
        assert_eq!(
            FrontendReq::GET_SHMEM_CONFIG.rules().feature,
            Some(VhostUserProtocolFeatures::SHMEM)
        );
        assert_eq!(FrontendReq::SET_OWNER.rules().feature, None);
        assert!(
            FrontendReq::SET_VRING_ENABLE
                .rules()
                .needs_protocol_features
        );
        assert_eq!(BackendReq::SHMEM_MAP.rules().fds, FdCount::One);
        assert_eq!(CrosvmBackendReq::GPU_MAP.rules().fds, FdCount::One);
    }
}
