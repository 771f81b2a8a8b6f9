//! vhost-user messages (QEMU `docs/interop/vhost-user.rst`, current text).
//!
//! A message is a 12-byte [`Header`] followed by `size` bytes of body. File
//! descriptors ride in the ancillary data of the message's first byte. This module has
//! the header, the request codes of both directions ([`FrontendReq`], [`BackendReq`]),
//! the feature bits ([`VhostUserProtocolFeatures`], [`VhostUserVirtioFeatures`]), every
//! body, and [`RequestRules`]: for every request, the body size, the file descriptor
//! count, whether a reply is always sent, and the protocol feature that gates it.
//!
//! The spec's current vocabulary is used throughout: the *front-end* is the VMM (called
//! "master" in older code), the *back-end* is the device process ("slave").

mod body;
mod features;
mod request;
mod rules;

pub use body::*;
pub use features::*;
pub use request::*;
pub use rules::*;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::{ProtocolError, Result, Validate};

/// The protocol version carried in the low two bits of [`Header::flags`].
pub const VERSION: u32 = 0x1;
/// Largest message body this crate accepts, in bytes.
///
/// The largest fixed body in the spec is `GET_SHMEM_CONFIG`'s reply (2056 bytes); the
/// variable bodies (memory table, config space, crypto session) stay well below this.
/// Receivers check `size` against it *before* allocating.
pub const MAX_MSG_SIZE: usize = 4096;
/// Largest number of file descriptors one message may carry (the spec's
/// `VHOST_MEMORY_BASELINE_NREGIONS`: SET_MEM_TABLE carries one per region).
pub const MAX_ATTACHED_FDS: usize = 8;
/// Largest number of regions in a `SET_MEM_TABLE` message.
pub const MAX_MEM_TABLE_REGIONS: usize = 8;
/// Largest virtio config space a `GET_CONFIG`/`SET_CONFIG` message can carry.
pub const MAX_CONFIG_SIZE: u32 = 256;
/// Number of entries in a `GET_SHMEM_CONFIG` reply (`VIRTIO_MAX_SHMEM_REGIONS`).
pub const MAX_SHMEM_REGIONS: usize = 256;
/// Dirty-log page size used by `SET_LOG_BASE` logging.
pub const LOG_PAGE_SIZE: u64 = 0x1000;
/// In the `u64` body of `SET_VRING_KICK`/`CALL`/`ERR`: the bits that hold the ring index.
pub const VRING_IDX_MASK: u64 = 0xff;
/// In the `u64` body of `SET_VRING_KICK`/`CALL`/`ERR`: set when no fd is attached
/// (polling mode for a kick, "no notification" for call/err).
pub const VRING_NOFD_MASK: u64 = 1 << 8;

bitflags::bitflags! {
    /// The non-version bits of [`Header::flags`].
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct HeaderFlags: u32 {
        /// Set on every reply (bit 2).
        const REPLY = 1 << 2;
        /// The sender asks for a `REPLY_ACK` status reply (bit 3).
        const NEED_REPLY = 1 << 3;
    }
}

/// Mask of the version bits in [`Header::flags`].
pub const VERSION_MASK: u32 = 0x3;

/// The 12-byte header of every vhost-user message.
///
/// `request` is a [`FrontendReq`] on the front-end's socket and a [`BackendReq`] on the
/// back-end request channel; the header keeps it as a raw `u32` so that an unknown code
/// is a validation error, not undefined behaviour.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct Header {
    /// Request code.
    pub request: u32,
    /// Version (bits 0-1), REPLY (bit 2), NEED_REPLY (bit 3); other bits reserved.
    pub flags: u32,
    /// Size of the body that follows, in bytes.
    pub size: u32,
}

impl Header {
    /// Size of the header on the wire.
    pub const SIZE: usize = 12;

    /// A request header (version 1, optional NEED_REPLY).
    pub fn request(request: u32, size: u32, need_reply: bool) -> Self {
        let mut flags = VERSION;
        if need_reply {
            flags |= HeaderFlags::NEED_REPLY.bits();
        }
        Header {
            request,
            flags,
            size,
        }
    }

    /// A reply header for `request` (version 1, REPLY).
    pub fn reply(request: u32, size: u32) -> Self {
        Header {
            request,
            flags: VERSION | HeaderFlags::REPLY.bits(),
            size,
        }
    }

    /// The version bits.
    pub fn version(&self) -> u32 {
        self.flags & VERSION_MASK
    }

    /// The REPLY and NEED_REPLY bits (unknown bits dropped).
    pub fn header_flags(&self) -> HeaderFlags {
        HeaderFlags::from_bits_truncate(self.flags)
    }

    /// Whether the REPLY bit is set.
    pub fn is_reply(&self) -> bool {
        self.header_flags().contains(HeaderFlags::REPLY)
    }

    /// Whether the NEED_REPLY bit is set.
    pub fn need_reply(&self) -> bool {
        self.header_flags().contains(HeaderFlags::NEED_REPLY)
    }
}

impl Validate for Header {
    /// Checks the version, the reserved flag bits and the size bound. Whether REPLY may
    /// be set depends on the direction, and is checked by the receiver.
    fn validate(&self) -> Result<()> {
        if self.version() != VERSION {
            return Err(ProtocolError::Version(self.version()));
        }
        let reserved = self.flags & !(VERSION_MASK | HeaderFlags::all().bits());
        if reserved != 0 {
            return Err(ProtocolError::Reserved {
                what: "header flags",
                value: reserved.into(),
            });
        }
        if self.size as usize > MAX_MSG_SIZE {
            return Err(ProtocolError::OutOfBounds {
                what: "message size",
                value: self.size.into(),
                limit: MAX_MSG_SIZE as u64,
            });
        }
        Ok(())
    }
}

/// Splits the `u64` body of `SET_VRING_KICK`/`CALL`/`ERR` into (ring index, fd attached).
///
/// Bits other than the index and the NOFD flag must be zero.
pub fn parse_vring_fd_u64(value: u64) -> Result<(u8, bool)> {
    let reserved = value & !(VRING_IDX_MASK | VRING_NOFD_MASK);
    if reserved != 0 {
        return Err(ProtocolError::Reserved {
            what: "vring fd message bits",
            value: reserved,
        });
    }
    Ok(((value & VRING_IDX_MASK) as u8, value & VRING_NOFD_MASK == 0))
}

/// Builds the `u64` body of `SET_VRING_KICK`/`CALL`/`ERR`.
pub fn vring_fd_u64(index: u8, has_fd: bool) -> u64 {
    let mut v = u64::from(index);
    if !has_fd {
        v |= VRING_NOFD_MASK;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_flags() {
        let h = Header::request(3, 0, true);
        assert_eq!(h.flags, 0x9);
        assert!(h.need_reply() && !h.is_reply());
        let r = Header::reply(3, 8);
        assert_eq!(r.flags, 0x5);
        assert!(r.is_reply());
        assert!(h.validate().is_ok() && r.validate().is_ok());
        let bad = Header { flags: 0x21, ..h };
        assert_eq!(
            bad.validate(),
            Err(ProtocolError::Reserved {
                what: "header flags",
                value: 0x20
            })
        );
    }
}
