//! Wire structures for the protocols Outboard speaks: the virtio core (feature bits,
//! device status, the virtio-mmio register map), vhost-user, virtio-vsock and
//! virtio-media (with the V4L2 ioctl codes it carries).
//!
//! This crate is pure data. It does no I/O, needs no allocator, and builds in `no_std`
//! with `default-features = false`. Every structure that travels on a wire is a
//! [`zerocopy`] type, so a receiver turns bytes into a structure with
//! [`FromBytes::read_from_bytes`](zerocopy::FromBytes::read_from_bytes) (a copy, no
//! alignment requirement) and a sender turns a structure into bytes with
//! [`IntoBytes::as_bytes`](zerocopy::IntoBytes::as_bytes).
//!
//! # Never trust a peer
//!
//! Every message body implements [`Validate`]. A structure that was read from a peer is
//! only a bag of bits until `validate()` has accepted it: sizes, counts, flags and
//! reserved bits are checked there, and each failure is a [`ProtocolError`] variant that
//! names the offending value.
//!
//! # Example
//!
//! A back-end receiving `SET_VRING_NUM` from a front-end:
//!
//! ```
//! use outboard_protocol::vhost_user::{FrontendReq, Header, VhostUserVringState};
//! use outboard_protocol::{parse, read_prefix, Validate};
//! use zerocopy::IntoBytes;
//!
//! // The bytes as they came off the socket: header, then an 8-byte body.
//! let mut wire = Header::request(FrontendReq::SET_VRING_NUM.code(), 8, false).as_bytes().to_vec();
//! wire.extend_from_slice(VhostUserVringState::new(0, 256).as_bytes());
//!
//! let (header, body) = read_prefix::<Header>(&wire, "header")?;
//! header.validate()?;
//! let request = FrontendReq::from_code(header.request)?;
//! request.rules().body.check(request.name(), body.len())?;
//! let state: VhostUserVringState = parse(body, "vring state")?;
//! assert_eq!((state.index, state.num), (0, 256));
//! # Ok::<(), outboard_protocol::ProtocolError>(())
//! ```
//!
//! # Byte order
//!
//! Virtio structures are little-endian on the wire, and vhost-user messages are in the
//! host's native byte order. Outboard picks one approach for both: fields are plain
//! native integers, and the crate **refuses to compile for big-endian targets**. On every
//! little-endian target native order *is* the virtio wire order, so there is no
//! conversion to forget and no cost on the data path. (zerocopy's `little_endian` types
//! would be the alternative; they make every field access a method call for the benefit
//! of targets no VMM that uses vhost-user runs on.)
//!
//! # Modules
//!
//! - [`virtio`]: the feature bits every device shares, the device status bits and the
//!   virtio-mmio register map (virtio 1.3 sections 2.1, 4.2.2 and 6).
//! - [`vhost_user`]: the message header, every front-end and back-end request with its
//!   number, protocol feature bits, every message body, and per-request rules (body
//!   size, file descriptors, replies, feature gating) for transports to enforce.
//! - [`vsock`] (feature `vsock`): the virtio-vsock packet header, operations, flags, socket types, feature
//!   bits, config space and events (virtio 1.3 section 5.10).
//! - [`media`] (feature `media`): virtio-media commands, responses, events, SG entries and config space
//!   (virtio 1.4, device type 48).
//! - [`ratelimit`] (feature `std`): the rate limit of every log line a peer can cause,
//!   shared by the layers above.
//! - [`record`] (feature `std`): a checked, versioned binary record, the encoding of the
//!   state a device hands to the process that takes it over.
//! - [`v4l2`] (feature `media`): every V4L2 ioctl with its number and direction, with lookup from a raw code;
//!   the ioctls' argument structures in their 64-bit layouts, and the `V4L2_*` constants.
//!
//! # Features
//!
//! - `std` (default): `std::error::Error` for the errors, and `ratelimit`.
//! - `vsock` (default): the [`vsock`] module.
//! - `media` (default): the [`media`] and [`v4l2`] modules, the bulk of the crate;
//!   a user of vhost-user and virtio alone (a device daemon of its own) compiles
//!   without them and without `vsock`.
//!
#![cfg_attr(not(feature = "media"), doc = "[`media`]: #features")]
#![cfg_attr(not(feature = "media"), doc = "[`v4l2`]: #features")]
#![cfg_attr(not(feature = "vsock"), doc = "[`vsock`]: #features")]
#![cfg_attr(not(feature = "std"), no_std)]
#![deny(missing_docs)]

#[cfg(target_endian = "big")]
compile_error!(
    "outboard-protocol uses native-endian fields, which equal the virtio wire order only on \
     little-endian targets; big-endian targets are not supported"
);

#[cfg(feature = "media")]
pub mod media;
#[cfg(feature = "std")]
pub mod ratelimit;
#[cfg(feature = "std")]
pub mod record;
#[cfg(feature = "media")]
pub mod v4l2;
pub mod vhost_user;
pub mod virtio;
#[cfg(feature = "vsock")]
pub mod vsock;

use thiserror::Error;

/// Why a structure received from a peer was refused.
#[cfg_attr(test, remain::sorted)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ProtocolError {
    /// A length or offset plus length does not fit, or exceeds a bound.
    #[error("{what}: value {value:#x} is out of bounds (limit {limit:#x})")]
    OutOfBounds {
        /// Which field or quantity.
        what: &'static str,
        /// The offending value.
        value: u64,
        /// The limit it broke.
        limit: u64,
    },
    /// A field that must be zero (padding or reserved) was not.
    #[error("{what}: reserved bits set ({value:#x})")]
    Reserved {
        /// Which field.
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// A buffer did not have the size the structure needs.
    #[error("{what}: got {got} bytes, expected {want}")]
    Size {
        /// Which structure.
        what: &'static str,
        /// Bytes available.
        got: usize,
        /// Bytes required.
        want: usize,
    },
    /// An address or size does not have the alignment the protocol demands.
    #[error("{what}: {value:#x} is not aligned to {align}")]
    Unaligned {
        /// Which field.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The required alignment in bytes.
        align: u64,
    },
    /// A field holds a value the protocol does not define (an unknown request code,
    /// operation, socket type, flag bit, ...).
    #[error("{what}: unknown value {value:#x}")]
    Unknown {
        /// Which field.
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// The protocol version in a header is not the one this crate speaks.
    #[error("unsupported protocol version {0}")]
    Version(u32),
    /// A field holds zero where the protocol requires a non-zero value.
    #[error("{0} must not be zero")]
    Zero(&'static str),
}

/// Result type of this crate.
pub type Result<T> = core::result::Result<T, ProtocolError>;

/// Validation of a structure received from a peer.
///
/// Implemented by every message body in this crate. `validate()` checks what can be
/// checked from the structure alone (sizes, counts, flags, reserved bits, overflow);
/// checks that need connection state (negotiated features, known ring indexes, memory
/// maps) are the receiver's job.
pub trait Validate {
    /// Returns `Ok(())` when the structure is well formed.
    fn validate(&self) -> Result<()>;
}

/// Reads a `T` from the start of `bytes` and returns it with the rest of the slice.
///
/// Unlike zerocopy's own helpers this returns a [`ProtocolError::Size`] that names the
/// structure, so callers can surface a useful message.
pub fn read_prefix<'a, T: zerocopy::FromBytes>(
    bytes: &'a [u8],
    what: &'static str,
) -> Result<(T, &'a [u8])> {
    T::read_from_prefix(bytes).map_err(|_| ProtocolError::Size {
        what,
        got: bytes.len(),
        want: core::mem::size_of::<T>(),
    })
}

/// Reads a `T` that must fill `bytes` exactly.
pub fn read_exact<T: zerocopy::FromBytes>(bytes: &[u8], what: &'static str) -> Result<T> {
    T::read_from_bytes(bytes).map_err(|_| ProtocolError::Size {
        what,
        got: bytes.len(),
        want: core::mem::size_of::<T>(),
    })
}

/// Reads and validates a `T` that must fill `bytes` exactly.
pub fn parse<T: zerocopy::FromBytes + Validate>(bytes: &[u8], what: &'static str) -> Result<T> {
    let value: T = read_exact(bytes, what)?;
    value.validate()?;
    Ok(value)
}

pub(crate) fn check_zero(what: &'static str, value: u64) -> Result<()> {
    if value == 0 {
        Ok(())
    } else {
        Err(ProtocolError::Reserved { what, value })
    }
}
