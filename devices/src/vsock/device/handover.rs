//! Handing a running device to another process (see [`VsockHandover`]).

use std::os::fd::OwnedFd;

use outboard_protocol::record::{RecordError, RecordReader, RecordWriter};

use super::{Muxer, Vsock, VsockDeviceConfig};
use crate::virtio::VirtioDevice;
use crate::vsock::snapshot::VsockSnapshot;
use crate::vsock::{VsockError, VsockMetrics, VsockMetricsSnapshot};

/// Most counters a record may name.
const MAX_COUNTERS: usize = 256;

/// First field of a vsock handover record ("OBVSOCK" and a zero byte).
pub const HANDOVER_MAGIC: u64 = u64::from_le_bytes(*b"OBVSOCK\0");
/// The record layout this build writes and reads.
pub const HANDOVER_VERSION: u32 = 1;

/// Handing a running device to another process: [`Vsock::handover`] in the old one,
/// [`Vsock::take_over`] in the new one. The state between them is one record
/// ([`VsockHandover::record`], fields below) and the device's sockets, in order.
///
/// Record fields (encoding: [`outboard_protocol::record`]):
///
/// 1. `u64` [`HANDOVER_MAGIC`], `u32` [`HANDOVER_VERSION`];
/// 2. the device's state as a snapshot has it ([`VsockSnapshot`]: guest CID, features
///    offered and acked) as a byte string in its own versioned encoding, `u32` TX
///    buffer size, `bool` a TRANSPORT_RESET event waits for an event buffer, then the
///    counters: a count, and each as its name (a byte string) and `u64` value (a name
///    the reading build does not have is skipped, so counters carry on across
///    versions);
/// 3. the muxer:
///    - host side: `u8` 0 (AF_UNIX; fds: the stream listener, the seqpacket
///      listener) or 1 (AF_VSOCK; `u32` forward CID, a count, then each listen port as
///      `u32`; an fd per port);
///    - `u32` the next host port to try for a host-initiated connection;
///    - a count, then each connection (an fd each): `u16` type, `u32` host port,
///      `u32` guest port, `u8` state, `u8` pending control packets, `u32` shutdown
///      flags, the credit counters as `u32`s (peer `buf_alloc`, peer `fwd_cnt`,
///      `rx_cnt`, `buf_alloc`, `fwd_cnt`, `recv_cnt`, `fwd_cnt` last sent), `u16`
///      flags (readiness, half closes, credit requested, on the RX list), `u64`
///      nanoseconds to its deadline (`u64::MAX`: none), the bytes the guest sent that
///      the host socket has not taken yet, a count of whole seqpacket messages and
///      each, and the message being assembled;
///    - a count, then each host client that has not sent its `CONNECT` line: `u16`
///      socket type, `u64` nanoseconds left before it is dropped (an fd each);
///    - a count, then the RX list in order: `u32` host port, `u32` guest port;
///    - a count, then each RST waiting for an RX buffer: its 44-byte packet header.
///
/// The snapshot part is the one description of the device's state that
/// `Suspendable` and `SET_DEVICE_STATE_FD` use too; a handover adds what only a live
/// process can pass on: the sockets and every connection's state.
///
/// Not in the record: what the transport sets up (rings; a vhost-user daemon carries
/// that itself and replays it, which acks the same features again) and sibling links
/// (a device linked to a sibling refuses the handover).
///
/// The device must be quiescent when [`Vsock::handover`] is called: between two calls
/// of its event loop, with no descriptor chain held (every `handle_*` call returns
/// every chain it popped, so that holds between calls).
///
/// In transit: the record and the sockets it names (duplicates: the device that
/// wrote it still holds its own).
#[derive(Debug)]
pub struct VsockHandover {
    /// The record (fields above).
    pub record: Vec<u8>,
    /// The sockets, in the record's order.
    pub fds: Vec<OwnedFd>,
}

impl Vsock {
    /// The device's state for another process to [`Vsock::take_over`]: the record and
    /// duplicates of its sockets. The device is not changed and goes on serving if the
    /// handover does not happen; once it has, drop it without
    /// [`VirtioDevice::reset`](crate::virtio::VirtioDevice::reset) (a reset would close
    /// connections the new process now serves).
    ///
    /// Refused for a device linked to sibling VMs: their packets in flight between
    /// devices are not carried.
    pub fn handover(&self) -> Result<VsockHandover, VsockError> {
        if self.siblings.linked() {
            return Err(VsockError::HandoverRefused(
                "it is linked to sibling VMs, whose packets in flight are not carried".into(),
            ));
        }
        let mut w = RecordWriter::new();
        let mut fds = Vec::new();
        w.u64(HANDOVER_MAGIC)
            .u32(HANDOVER_VERSION)
            .bytes(&self.save_state().to_bytes())
            .u32(self.muxer.tx_buf_size())
            .bool(self.transport_reset_pending);
        let counters = self.metrics.snapshot();
        w.count(VsockMetricsSnapshot::COUNT);
        for (name, value) in counters.fields() {
            w.bytes(name.as_bytes()).u64(value);
        }
        self.muxer.save(&mut w, &mut fds)?;
        Ok(VsockHandover {
            record: w.into_bytes()?,
            fds,
        })
    }

    /// A device configured as `config` in the state of `handover` (written by
    /// [`Vsock::handover`] in another process): same guest CID, same host side, on the
    /// sockets that came with it. Nothing is bound. The device is not active yet: the
    /// transport activates it as usual, and its first kicks carry on where the old
    /// process stopped.
    ///
    /// Refused whole, with the reason, when the record is of another version or
    /// another device, is cut short or padded, names more connections than `config`
    /// allows, or comes with the wrong number of fds.
    pub fn take_over(
        config: VsockDeviceConfig,
        handover: VsockHandover,
    ) -> Result<Self, VsockError> {
        Self::check_config(&config)?;
        let mut r = RecordReader::new(&handover.record);
        let magic = r.u64("magic")?;
        if magic != HANDOVER_MAGIC {
            return Err(RecordError::Invalid {
                field: "magic",
                value: magic,
                why: "not a vsock handover record",
            }
            .into());
        }
        let version = r.u32("version")?;
        if version != HANDOVER_VERSION {
            return Err(RecordError::Version {
                what: "vsock handover",
                found: version,
                known: format!("{HANDOVER_VERSION}"),
            }
            .into());
        }
        let snapshot = VsockSnapshot::from_bytes(r.bytes("device state", 1024)?)
            .map_err(|e| VsockError::HandoverMismatch(e.to_string()))?;
        let cid = snapshot.guest_cid;
        if cid != config.guest_cid {
            return Err(VsockError::HandoverMismatch(format!(
                "the record is of guest CID {cid}, this device serves guest CID {}",
                config.guest_cid
            )));
        }
        let tx_buf_size = r.u32("TX buffer size")?;
        if tx_buf_size != config.tx_buf_size {
            return Err(VsockError::HandoverMismatch(format!(
                "the record's TX buffer size is {tx_buf_size} bytes, this device's {} \
                 (the guest was promised that credit)",
                config.tx_buf_size
            )));
        }
        let reset_pending = r.bool("transport reset pending")?;
        let metrics = std::sync::Arc::new(VsockMetrics::default());
        let n = r.count("counters", MAX_COUNTERS, 12)?;
        for _ in 0..n {
            let name = r.bytes("counter name", 64)?;
            let value = r.u64("counter value")?;
            // A counter of another build is skipped; this build's carry on.
            if let Ok(name) = std::str::from_utf8(name) {
                metrics.set(name, value);
            }
        }
        let mut fds = handover.fds.into_iter();
        let muxer = Muxer::load(
            cid,
            &config.backend,
            tx_buf_size,
            config.max_connections,
            metrics.clone(),
            &mut r,
            &mut fds,
        )?;
        r.finish()?;
        let left = fds.count();
        if left != 0 {
            return Err(VsockError::HandoverMismatch(format!(
                "{left} fds more than the record names"
            )));
        }
        let mut device = Vsock::with_muxer(cid, muxer, metrics)?;
        let extra = snapshot.acked_features & !device.avail_features;
        if extra != 0 {
            return Err(VsockError::HandoverMismatch(format!(
                "the driver acked features {extra:#x} this build does not offer"
            )));
        }
        device.ack_features(snapshot.acked_features);
        device.transport_reset_pending = reset_pending;
        Ok(device)
    }
}
