//! virtio-vsock (virtio 1.3 section 5.10, `linux/virtio_vsock.h`).
//!
//! Every packet on the rx and tx queues starts with the 44-byte [`VsockHeader`]; `len`
//! bytes of payload follow for `RW` packets. All fields are little-endian on the wire
//! (native on the targets this crate builds for, see the crate docs).

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::{ProtocolError, Result, Validate};

/// Virtio device id of vsock.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Queue index of the receive queue (device -> driver packets).
pub const RX_QUEUE: usize = 0;
/// Queue index of the transmit queue (driver -> device packets).
pub const TX_QUEUE: usize = 1;
/// Queue index of the event queue.
pub const EVENT_QUEUE: usize = 2;
/// Number of queues.
pub const NUM_QUEUES: usize = 3;

/// CID reserved for the hypervisor (`VMADDR_CID_HYPERVISOR`).
pub const VMADDR_CID_HYPERVISOR: u64 = 0;
/// CID for local loopback (`VMADDR_CID_LOCAL`).
pub const VMADDR_CID_LOCAL: u64 = 1;
/// The host's well-known CID (`VMADDR_CID_HOST`).
pub const VMADDR_CID_HOST: u64 = 2;
/// Wildcard CID (`VMADDR_CID_ANY`, `-1U`).
pub const VMADDR_CID_ANY: u64 = 0xffff_ffff;
/// Wildcard port (`VMADDR_PORT_ANY`).
pub const VMADDR_PORT_ANY: u32 = 0xffff_ffff;
/// Lowest CID a guest may be given (0, 1 and 2 are reserved).
pub const MIN_GUEST_CID: u64 = 3;
/// Largest payload Linux puts in one packet (`VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`, 64 KiB).
pub const MAX_PKT_BUF_SIZE: u32 = 64 * 1024;

/// Feature bit 0: `VIRTIO_VSOCK_F_STREAM` (implied when no socket type bit is offered).
pub const VIRTIO_VSOCK_F_STREAM: u64 = 1 << 0;
/// Feature bit 1: `VIRTIO_VSOCK_F_SEQPACKET`.
pub const VIRTIO_VSOCK_F_SEQPACKET: u64 = 1 << 1;
/// Feature bit 2: `VIRTIO_VSOCK_F_NO_IMPLIED_STREAM`.
pub const VIRTIO_VSOCK_F_NO_IMPLIED_STREAM: u64 = 1 << 2;

/// The 44-byte packet header (`struct virtio_vsock_hdr`, packed).
#[repr(C, packed)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct VsockHeader {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// A [`VsockType`] value.
    pub type_: u16,
    /// A [`VsockOp`] value.
    pub op: u16,
    /// Op-specific flags: [`ShutdownFlags`] for SHUTDOWN, [`SeqpacketFlags`] for RW.
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

impl VsockHeader {
    /// Size of the header on the wire.
    pub const SIZE: usize = 44;

    /// The decoded operation.
    pub fn op(&self) -> Result<VsockOp> {
        VsockOp::from_raw(self.op)
    }

    /// The decoded socket type.
    pub fn socket_type(&self) -> Result<VsockType> {
        VsockType::from_raw(self.type_)
    }
}

impl Validate for VsockHeader {
    /// Checks op, type, the payload bound (64 KiB), that only RW carries payload, and
    /// the flag bits the op allows. CIDs are checked by the device, which knows its own.
    fn validate(&self) -> Result<()> {
        let op = self.op()?;
        let ty = self.socket_type()?;
        let len = self.len;
        if len > MAX_PKT_BUF_SIZE {
            return Err(ProtocolError::OutOfBounds {
                what: "vsock packet len",
                value: len.into(),
                limit: MAX_PKT_BUF_SIZE.into(),
            });
        }
        if op != VsockOp::Rw && len != 0 {
            return Err(ProtocolError::OutOfBounds {
                what: "vsock payload len of a non-RW packet",
                value: len.into(),
                limit: 0,
            });
        }
        let flags = self.flags;
        let allowed = match (op, ty) {
            (VsockOp::Shutdown, _) => ShutdownFlags::all().bits(),
            (VsockOp::Rw, VsockType::Seqpacket) => SeqpacketFlags::all().bits(),
            _ => 0,
        };
        if flags & !allowed != 0 {
            return Err(ProtocolError::Unknown {
                what: "vsock flags",
                value: flags.into(),
            });
        }
        Ok(())
    }
}

/// Packet operations (`VIRTIO_VSOCK_OP_*`).
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VsockOp {
    /// 0: invalid.
    Invalid = 0,
    /// 1: connection request.
    Request = 1,
    /// 2: connection accepted.
    Response = 2,
    /// 3: reset (refuse or abort).
    Rst = 3,
    /// 4: shutdown, with [`ShutdownFlags`].
    Shutdown = 4,
    /// 5: data.
    Rw = 5,
    /// 6: credit update.
    CreditUpdate = 6,
    /// 7: credit request.
    CreditRequest = 7,
}

impl VsockOp {
    /// Decodes a raw op. `Invalid` (0) decodes, so that the device can answer it with RST.
    pub fn from_raw(raw: u16) -> Result<Self> {
        Ok(match raw {
            0 => VsockOp::Invalid,
            1 => VsockOp::Request,
            2 => VsockOp::Response,
            3 => VsockOp::Rst,
            4 => VsockOp::Shutdown,
            5 => VsockOp::Rw,
            6 => VsockOp::CreditUpdate,
            7 => VsockOp::CreditRequest,
            v => {
                return Err(ProtocolError::Unknown {
                    what: "vsock op",
                    value: v.into(),
                })
            }
        })
    }
}

/// Socket types (`VIRTIO_VSOCK_TYPE_*`).
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VsockType {
    /// 1: stream (`SOCK_STREAM`).
    Stream = 1,
    /// 2: seqpacket (`SOCK_SEQPACKET`), with message boundaries.
    Seqpacket = 2,
}

impl VsockType {
    /// Decodes a raw type.
    pub fn from_raw(raw: u16) -> Result<Self> {
        match raw {
            1 => Ok(VsockType::Stream),
            2 => Ok(VsockType::Seqpacket),
            v => Err(ProtocolError::Unknown {
                what: "vsock socket type",
                value: v.into(),
            }),
        }
    }
}

bitflags::bitflags! {
    /// Flags of a SHUTDOWN packet (`VIRTIO_VSOCK_SHUTDOWN_*`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct ShutdownFlags: u32 {
        /// The sender will receive no more data.
        const RCV = 1 << 0;
        /// The sender will send no more data.
        const SEND = 1 << 1;
    }
}

bitflags::bitflags! {
    /// Flags of a SEQPACKET RW packet (`VIRTIO_VSOCK_SEQ_*`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct SeqpacketFlags: u32 {
        /// End of message: the last packet of a message.
        const EOM = 1 << 0;
        /// End of record (`MSG_EOR` was set by the sender).
        const EOR = 1 << 1;
    }
}

/// vsock config space (`struct virtio_vsock_config`, 8 bytes).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct VsockConfig {
    /// The guest's CID. The spec keeps only the low 32 bits meaningful; the high 32 bits
    /// are reserved and zero.
    pub guest_cid: u64,
}

impl Validate for VsockConfig {
    fn validate(&self) -> Result<()> {
        let cid = self.guest_cid;
        if !(MIN_GUEST_CID..VMADDR_CID_ANY).contains(&cid) {
            return Err(ProtocolError::OutOfBounds {
                what: "guest CID",
                value: cid,
                limit: VMADDR_CID_ANY - 1,
            });
        }
        Ok(())
    }
}

/// Event ids (`VIRTIO_VSOCK_EVENT_*`).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VsockEventId {
    /// 0: the transport was reset (after migration or restore); every connection is
    /// gone and the guest must re-read its CID.
    TransportReset = 0,
}

/// An event on the event queue (`struct virtio_vsock_event`, 4 bytes).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct VsockEvent {
    /// A [`VsockEventId`] value.
    pub id: u32,
}

impl VsockEvent {
    /// The TRANSPORT_RESET event.
    pub const TRANSPORT_RESET: VsockEvent = VsockEvent {
        id: VsockEventId::TransportReset as u32,
    };
}

impl Validate for VsockEvent {
    fn validate(&self) -> Result<()> {
        if self.id != VsockEventId::TransportReset as u32 {
            return Err(ProtocolError::Unknown {
                what: "vsock event id",
                value: self.id.into(),
            });
        }
        Ok(())
    }
}
