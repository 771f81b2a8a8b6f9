//! Driver packets: parsing TX chains and writing RX headers.

use outboard_protocol::vsock::{
    VsockHeader, VsockOp, VsockType, MAX_PKT_BUF_SIZE, VMADDR_CID_HOST,
};
use outboard_protocol::{ProtocolError, Validate};
use thiserror::Error;

use crate::virtio::{ChainReader, ChainWriter, DescChain, IoRegion};

/// Why a TX chain was not accepted as a packet.
#[cfg_attr(test, remain::sorted)]
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PacketError {
    /// The destination CID is not the host's.
    #[error("packet to CID {0}, expected the host (2)")]
    DstCid(u64),
    /// The header failed validation (op, type, flags, `len` above 64 KiB).
    #[error("invalid packet header: {0}")]
    Invalid(ProtocolError),
    /// `len` says more payload than the chain's readable half holds.
    #[error("packet len {len} exceeds the {available} payload bytes of the chain")]
    LenBeyondChain {
        /// The header's `len`.
        len: u32,
        /// Readable bytes after the header.
        available: usize,
    },
    /// `len` is above the 64 KiB packet limit.
    #[error("packet len {0} exceeds {MAX_PKT_BUF_SIZE}")]
    LenTooBig(u32),
    /// The readable half is shorter than the 44-byte header.
    #[error("descriptor chain holds {0} readable bytes, less than a header")]
    ShortHeader(usize),
    /// The source CID is not the guest's.
    #[error("packet from CID {got}, the guest is {want}")]
    SrcCid {
        /// The header's source CID.
        got: u64,
        /// The guest's CID.
        want: u64,
    },
    /// The header is in write-only descriptors.
    #[error("packet header is in write-only descriptors")]
    WriteOnlyHeader,
}

/// A TX packet whose header was read out of guest memory and checked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TxPacket {
    pub hdr: VsockHeader,
    pub op: VsockOp,
    pub ty: VsockType,
}

/// The result of a header that is readable but refused: the ports to RST, if any.
#[derive(Debug)]
pub(crate) struct Refused {
    pub err: PacketError,
    /// `(src_port, dst_port, type)` of the header when an RST reply makes sense.
    pub reply: Option<(u32, u32, u16)>,
    /// The destination CID (the host's when the header was not readable): where an RST
    /// reply comes from.
    pub dst_cid: u64,
}

/// Reads and validates the header of a TX chain and collects the payload regions.
/// Packets go to the host or to a CID for which `is_sibling` holds.
pub(crate) fn parse_tx(
    chain: &DescChain,
    guest_cid: u64,
    is_sibling: impl Fn(u64) -> bool,
    payload: &mut Vec<IoRegion>,
) -> Result<TxPacket, Refused> {
    payload.clear();
    let refuse = |err| Refused {
        err,
        reply: None,
        dst_cid: VMADDR_CID_HOST,
    };
    let mut reader = ChainReader::new(&chain.readable);
    // A failed read consumes nothing: `remaining()` is the whole readable half.
    let Ok(hdr) = reader.read_obj::<VsockHeader>("vsock header") else {
        let got = reader.remaining();
        if got == 0 && chain.writable_len() >= VsockHeader::SIZE {
            return Err(refuse(PacketError::WriteOnlyHeader));
        }
        return Err(refuse(PacketError::ShortHeader(got)));
    };
    let src_cid = hdr.src_cid;
    let dst_cid = hdr.dst_cid;
    if src_cid != guest_cid {
        return Err(refuse(PacketError::SrcCid {
            got: src_cid,
            want: guest_cid,
        }));
    }
    let reply = Some((hdr.src_port, hdr.dst_port, hdr.type_));
    if dst_cid != VMADDR_CID_HOST && !is_sibling(dst_cid) {
        // Answered with RST from that CID (as vhost-device-vsock does), so a guest
        // connecting to a CID nobody serves fails at once instead of timing out.
        return Err(Refused {
            err: PacketError::DstCid(dst_cid),
            reply: reply.filter(|_| hdr.op != VsockOp::Rst as u16),
            dst_cid,
        });
    }
    let len = hdr.len;
    if len > MAX_PKT_BUF_SIZE {
        return Err(Refused {
            err: PacketError::LenTooBig(len),
            reply,
            dst_cid,
        });
    }
    if let Err(e) = hdr.validate() {
        return Err(Refused {
            err: PacketError::Invalid(e),
            reply,
            dst_cid,
        });
    }
    let (Ok(op), Ok(ty)) = (hdr.op(), hdr.socket_type()) else {
        // validate() decoded both already.
        return Err(Refused {
            err: PacketError::Invalid(ProtocolError::Unknown {
                what: "vsock op or type",
                value: u64::from(hdr.op),
            }),
            reply,
            dst_cid,
        });
    };
    let available = reader.remaining();
    if len as usize > available {
        return Err(Refused {
            err: PacketError::LenBeyondChain { len, available },
            reply,
            dst_cid,
        });
    }
    // The payload stays in guest memory: its regions go to `sendmsg` as they are.
    reader.take_regions(len as usize, payload);
    Ok(TxPacket { hdr, op, ty })
}

/// Writes a header at the start of an RX chain's writable half; false when it does not
/// fit.
pub(crate) fn write_rx_header(chain: &DescChain, hdr: &VsockHeader) -> bool {
    ChainWriter::new(&chain.writable).write_obj(hdr).is_ok()
}

#[cfg(test)]
mod tests {
    use zerocopy::IntoBytes;

    use super::*;
    use crate::virtio::read_regions;

    fn region(buf: &mut [u8]) -> IoRegion {
        // SAFETY: `buf` outlives every use of the region in these tests.
        unsafe { IoRegion::new(buf.as_mut_ptr(), buf.len()) }
    }

    fn header(len: u32) -> VsockHeader {
        VsockHeader {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1000,
            dst_port: 52,
            len,
            type_: 1,
            op: 5,
            ..Default::default()
        }
    }

    #[test]
    fn header_split_over_one_byte_descriptors() {
        let hdr = header(3);
        let mut bytes: Vec<Vec<u8>> = hdr.as_bytes().iter().map(|b| vec![*b]).collect();
        bytes.push(b"abc".to_vec());
        let chain = DescChain {
            head: 0,
            readable: bytes.iter_mut().map(|b| region(b)).collect(),
            writable: vec![],
        };
        let mut payload = Vec::new();
        let pkt = parse_tx(&chain, 3, |_| false, &mut payload).unwrap();
        assert_eq!({ pkt.hdr.len }, 3);
        let mut out = [0u8; 3];
        assert_eq!(read_regions(&payload, 0, &mut out), 3);
        assert_eq!(&out, b"abc");
    }

    #[test]
    fn refusals() {
        let mut payload = Vec::new();
        let mut buf = header(10).as_bytes().to_vec();
        buf.extend_from_slice(&[0; 4]);
        let chain = DescChain {
            head: 0,
            readable: vec![region(&mut buf)],
            writable: vec![],
        };
        let e = parse_tx(&chain, 3, |_| false, &mut payload).unwrap_err();
        assert_eq!(
            e.err,
            PacketError::LenBeyondChain {
                len: 10,
                available: 4
            }
        );
        assert_eq!(e.reply, Some((1000, 52, 1)));
        assert!(matches!(
            parse_tx(&chain, 4, |_| false, &mut payload)
                .unwrap_err()
                .err,
            PacketError::SrcCid { got: 3, want: 4 }
        ));
        let mut w = header(0).as_bytes().to_vec();
        let chain = DescChain {
            head: 0,
            readable: vec![],
            writable: vec![region(&mut w)],
        };
        assert_eq!(
            parse_tx(&chain, 3, |_| false, &mut payload)
                .unwrap_err()
                .err,
            PacketError::WriteOnlyHeader
        );
        let mut short = [0u8; 10];
        let chain = DescChain {
            head: 0,
            readable: vec![region(&mut short)],
            writable: vec![],
        };
        assert_eq!(
            parse_tx(&chain, 3, |_| false, &mut payload)
                .unwrap_err()
                .err,
            PacketError::ShortHeader(10)
        );
        let mut bad = header(0);
        bad.op = 99;
        let mut b = bad.as_bytes().to_vec();
        let chain = DescChain {
            head: 0,
            readable: vec![region(&mut b)],
            writable: vec![],
        };
        let e = parse_tx(&chain, 3, |_| false, &mut payload).unwrap_err();
        assert!(matches!(e.err, PacketError::Invalid(_)));
        assert!(e.reply.is_some());
    }
}
