//! Guest packets (the TX queue): routing to connections, the batched stream data
//! path, and connects the guest initiates.

use outboard_protocol::vsock::{VsockOp, VsockType};
use rustix::net::SocketType;

use super::{EpollOp, HostSide, Muxer};
use crate::virtio::IoRegion;
use crate::vsock::conn::{Conn, ConnKey};
use crate::vsock::packet::TxPacket;
use crate::vsock::{sys, VsockMetrics, MAX_SEQPACKET_MSG};

impl Muxer {
    /// If `pkt` is stream data for a connection that can take it, records its credit
    /// fields and returns the connection for [`Muxer::handle_rw_batch`].
    pub fn take_rw(&mut self, pkt: &TxPacket) -> Option<ConnKey> {
        if pkt.op != VsockOp::Rw || pkt.ty != VsockType::Stream {
            return None;
        }
        let key = (pkt.hdr.dst_port, pkt.hdr.src_port);
        let conn = self.conns.get_mut(&key)?;
        conn.accept_stream_rw(&pkt.hdr).then_some(key)
    }

    /// Forwards the payload of consecutive RW packets that [`Muxer::take_rw`] accepted.
    pub fn handle_rw_batch(&mut self, key: ConnKey, payload: &[IoRegion], len: u32) {
        self.on_conn(key, |conn, iov| conn.on_rw_batch(payload, len, iov));
    }

    /// Handles one valid guest packet.
    pub fn handle_tx(&mut self, pkt: &TxPacket, payload: &[IoRegion]) {
        let h = pkt.hdr;
        if pkt.ty == VsockType::Seqpacket && !self.seqpacket {
            VsockMetrics::inc(&self.metrics.err_unsupported);
            if pkt.op != VsockOp::Rst {
                self.orphan_rst(h.src_port, h.dst_port, h.type_);
            }
            return;
        }
        let key = (h.dst_port, h.src_port);
        if self.on_conn(key, |conn, iov| conn.on_guest_packet(pkt, payload, iov)) {
            return;
        }
        match pkt.op {
            VsockOp::Request => self.peer_connect(pkt),
            VsockOp::Rst => {}
            _ => {
                VsockMetrics::inc(&self.metrics.err_no_connection);
                self.orphan_rst(h.src_port, h.dst_port, h.type_);
            }
        }
    }

    /// A guest REQUEST without a connection: connects to the host listener
    /// `<uds_path>_<port>`, or starts an AF_VSOCK connect to `(forward cid, port)`
    /// (RESPONSE once it completes); RST when there is none, the connect fails at
    /// once or the connection cap is reached.
    fn peer_connect(&mut self, pkt: &TxPacket) {
        let h = pkt.hdr;
        if self.conns.len() >= self.max_connections {
            VsockMetrics::inc(&self.metrics.err_conn_limit);
            self.orphan_rst(h.src_port, h.dst_port, h.type_);
            return;
        }
        let dst_port = h.dst_port;
        let ty = match pkt.ty {
            VsockType::Stream => SocketType::STREAM,
            VsockType::Seqpacket => SocketType::SEQPACKET,
        };
        let connected = match &self.host {
            HostSide::Unix { uds_path, .. } => {
                let mut path = uds_path.clone().into_os_string();
                path.push(format!("_{dst_port}"));
                sys::unix_connect(std::path::Path::new(&path), ty).map(|fd| (fd, true))
            }
            HostSide::Vsock { cid, .. } => sys::vsock_connect(*cid, dst_port, ty),
        };
        let (fd, done) = match connected {
            Ok(c) => c,
            Err(_) => {
                VsockMetrics::inc(&self.metrics.err_connect_failed);
                self.orphan_rst(h.src_port, h.dst_port, h.type_);
                return;
            }
        };
        let buf_alloc = self.buf_alloc(pkt.ty);
        let mut conn = if done {
            Conn::new_peer_init(fd, pkt.ty, &h, buf_alloc)
        } else {
            Conn::new_peer_connecting(fd, pkt.ty, &h, buf_alloc)
        };
        if matches!(self.host, HostSide::Vsock { .. }) {
            conn.probe_peer_close();
        }
        if !self.insert(conn, EpollOp::Add) {
            self.orphan_rst(h.src_port, h.dst_port, h.type_);
        }
    }

    /// The credit a new connection of type `ty` gives the guest (its TX buffer).
    pub(super) fn buf_alloc(&self, ty: VsockType) -> u32 {
        match ty {
            VsockType::Stream => self.tx_buf_size,
            VsockType::Seqpacket => self.tx_buf_size.min(MAX_SEQPACKET_MSG),
        }
    }
}
