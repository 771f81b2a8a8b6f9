//! One vsock connection: state machine, credit flow control, the host-side TX buffer.

use std::collections::VecDeque;
use std::io;
use std::num::Wrapping;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use outboard_protocol::vsock::{
    VsockHeader, VsockOp, VsockType, MAX_PKT_BUF_SIZE, VMADDR_CID_HOST,
};

use super::sys;
use crate::virtio::{read_regions, IoRegion};

/// `(local_port, peer_port)`: the host-side port and the guest-side port.
pub(crate) type ConnKey = (u32, u32);

/// Connection states (Firecracker's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnState {
    /// Host-initiated: REQUEST sent (or queued) to the guest, waiting for RESPONSE.
    LocalInit,
    /// Guest-initiated: the host socket is connected, RESPONSE is queued.
    PeerInit,
    /// Data flows both ways.
    Established,
    /// The host side closed; SHUTDOWN went to the guest, waiting for its RST.
    LocalClosed,
    /// The guest shut down both directions; draining the TX buffer, then RST.
    PeerClosed,
    /// Reset by the device; the RST is queued, then the connection is removed.
    Killed,
}

/// Control packets waiting for an RX buffer.
pub(crate) const PENDING_REQUEST: u8 = 1 << 0;
pub(crate) const PENDING_RESPONSE: u8 = 1 << 1;
pub(crate) const PENDING_RST: u8 = 1 << 2;
pub(crate) const PENDING_SHUTDOWN: u8 = 1 << 3;
pub(crate) const PENDING_CREDIT_UPDATE: u8 = 1 << 4;
pub(crate) const PENDING_CREDIT_REQUEST: u8 = 1 << 5;

/// Why guest data could not be forwarded.
#[derive(Debug)]
pub(crate) enum SendError {
    /// The guest sent beyond the credit it was given.
    CreditOverrun,
    /// The host socket failed.
    Io(io::Error),
}

/// One connection.
#[derive(Debug)]
pub(crate) struct Conn {
    pub fd: OwnedFd,
    pub ty: VsockType,
    pub local_port: u32,
    pub peer_port: u32,
    pub state: ConnState,
    /// `PENDING_*` bits.
    pub pending: u8,
    /// Flags of the pending SHUTDOWN.
    pub shutdown_flags: u32,
    /// The guest's receive buffer and what it has consumed of it.
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: Wrapping<u32>,
    /// Payload bytes sent to the guest.
    pub rx_cnt: Wrapping<u32>,
    /// Credit given to the guest (the TX buffer size).
    pub buf_alloc: u32,
    /// Guest bytes written to the host socket.
    pub fwd_cnt: Wrapping<u32>,
    /// Guest bytes received.
    pub recv_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    pub last_fwd_cnt_sent: Wrapping<u32>,
    /// Stream TX buffer (bytes not yet written to the host) and its read offset.
    tx_buf: Vec<u8>,
    tx_start: usize,
    /// Seqpacket: complete messages not yet written, and the message being assembled.
    seq_msgs: VecDeque<Vec<u8>>,
    seq_cur: Vec<u8>,
    /// Edge-triggered readiness: the host socket may have data (or EOF).
    pub readable: bool,
    /// The host peer shut down its sending side (EPOLLRDHUP) / both sides (EPOLLHUP).
    pub rdhup: bool,
    pub hup: bool,
    /// Reading the host socket returned end-of-file; the guest was told SHUTDOWN SEND.
    pub host_eof: bool,
    /// The guest will receive / send no more.
    pub peer_shut_rcv: bool,
    pub peer_shut_send: bool,
    /// `shutdown(SHUT_WR)` was done on the host socket.
    pub host_wr_shut: bool,
    /// A CREDIT_REQUEST was sent and not answered yet.
    pub credit_requested: bool,
    /// When a request or shutdown times out.
    pub deadline: Option<Instant>,
    /// Whether the key is in the muxer's RX list.
    pub in_rx_list: bool,
}

impl Conn {
    /// A new connection.
    pub fn new(
        fd: OwnedFd,
        ty: VsockType,
        local_port: u32,
        peer_port: u32,
        state: ConnState,
        buf_alloc: u32,
    ) -> Self {
        Conn {
            fd,
            ty,
            local_port,
            peer_port,
            state,
            pending: 0,
            shutdown_flags: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            buf_alloc,
            fwd_cnt: Wrapping(0),
            recv_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            tx_buf: Vec::new(),
            tx_start: 0,
            seq_msgs: VecDeque::new(),
            seq_cur: Vec::new(),
            readable: true,
            rdhup: false,
            hup: false,
            host_eof: false,
            peer_shut_rcv: false,
            peer_shut_send: false,
            host_wr_shut: false,
            credit_requested: false,
            deadline: None,
            in_rx_list: false,
        }
    }

    /// Bytes the device may still send to the guest.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Records the credit fields of a guest packet.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
    }

    /// Whether bytes wait in the TX buffer.
    pub fn tx_pending(&self) -> bool {
        self.tx_start < self.tx_buf.len() || !self.seq_msgs.is_empty()
    }

    /// Forwarded bytes the guest has not been told about yet that make a CREDIT_UPDATE
    /// due: `min(128 KiB, buf_alloc / 2, guest buf_alloc / 2)`, at least 1.
    ///
    /// A guest stops sending when its unannounced bytes (`recv_cnt - last_fwd_cnt_sent`)
    /// reach its send window `W`, which is at most our `buf_alloc` and, for Linux guests
    /// (its credit is `peer_buf_alloc - in flight`, and since the "cap TX credit to
    /// local buffer size" fix also at most its own `buf_alloc`: its socket buffer,
    /// 256 KiB by default), at least `min(buf_alloc, guest buf_alloc)`. Once the host
    /// socket took those bytes, all `W` of them are unannounced, and `W` is at least
    /// twice this threshold, so an update goes out: no guest with such a window can
    /// wait forever, whatever `buf_alloc` is. (A threshold tied to our `buf_alloc`
    /// alone, like the former "half the buffer looks used" rule, never fires when `W`
    /// is below it.) Each update announces at least the threshold, so there is at most
    /// one per `threshold` bytes forwarded, plus the answers to the guest's
    /// CREDIT_REQUESTs: with the default 256 KiB buffers and 64 KiB packets, one per
    /// two packets, each an RX packet and a call-eventfd write. The guest still sees
    /// half its window refilled while the other half is in flight, so it need not
    /// pause. A guest that keeps less than half of both buffers in flight (none known)
    /// must ask with CREDIT_REQUEST.
    pub fn credit_update_threshold(&self) -> u32 {
        (2 * MAX_PKT_BUF_SIZE)
            .min(self.buf_alloc / 2)
            .min(self.peer_buf_alloc / 2)
            .max(1)
    }

    /// Whether the device freed enough TX buffer since it last told the guest
    /// ([`Conn::credit_update_threshold`]) that a CREDIT_UPDATE is due.
    pub fn needs_credit_update(&self) -> bool {
        (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= self.credit_update_threshold()
    }

    /// A header from this connection to the guest; records the announced `fwd_cnt`.
    pub fn rx_header(&mut self, guest_cid: u64, op: VsockOp, len: u32, flags: u32) -> VsockHeader {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending &= !PENDING_CREDIT_UPDATE;
        VsockHeader {
            src_cid: VMADDR_CID_HOST,
            dst_cid: guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: self.ty as u16,
            op: op as u16,
            flags,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// Forwards one guest RW payload to the host socket: straight from guest memory
    /// when nothing is buffered, into the TX buffer for what the socket does not take.
    pub fn send_guest_data(
        &mut self,
        payload: &[IoRegion],
        len: u32,
        eom: bool,
        iov: &mut sys::IovScratch,
    ) -> Result<(), SendError> {
        // The guest may send what the device announced: buf_alloc beyond the fwd_cnt it
        // was last told. This also bounds the TX buffer (fwd_cnt only grows).
        let announced_used = (self.recv_cnt - self.last_fwd_cnt_sent).0;
        if u64::from(announced_used) + u64::from(len) > u64::from(self.buf_alloc) {
            return Err(SendError::CreditOverrun);
        }
        self.recv_cnt += Wrapping(len);
        let len = len as usize;
        match self.ty {
            VsockType::Stream => {
                let mut written = 0;
                if !self.tx_pending() && len > 0 {
                    match sys::send_regions(self.fd.as_fd(), payload, iov) {
                        Ok(n) => written = n.min(len),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(SendError::Io(e)),
                    }
                    self.fwd_cnt += Wrapping(written as u32);
                }
                if written < len {
                    if self.tx_start > 0 {
                        self.tx_buf.drain(..self.tx_start);
                        self.tx_start = 0;
                    }
                    let old = self.tx_buf.len();
                    self.tx_buf.resize(old + (len - written), 0);
                    read_regions(payload, written, &mut self.tx_buf[old..]);
                }
                Ok(())
            }
            VsockType::Seqpacket => {
                if eom && self.seq_cur.is_empty() && self.seq_msgs.is_empty() {
                    match sys::send_regions(self.fd.as_fd(), payload, iov) {
                        Ok(_) => {
                            self.fwd_cnt += Wrapping(len as u32);
                            return Ok(());
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(SendError::Io(e)),
                    }
                }
                let old = self.seq_cur.len();
                self.seq_cur.resize(old + len, 0);
                read_regions(payload, 0, &mut self.seq_cur[old..]);
                if eom {
                    let msg = std::mem::take(&mut self.seq_cur);
                    self.seq_msgs.push_back(msg);
                    self.flush().map_err(SendError::Io)?;
                }
                Ok(())
            }
        }
    }

    /// Writes buffered bytes to the host socket until it would block; then, once all is
    /// written and the guest shut down its sending side, shuts down the host's.
    pub fn flush(&mut self) -> io::Result<()> {
        match self.ty {
            VsockType::Stream => {
                while self.tx_start < self.tx_buf.len() {
                    match sys::send(self.fd.as_fd(), &self.tx_buf[self.tx_start..]) {
                        Ok(n) => {
                            self.tx_start += n;
                            self.fwd_cnt += Wrapping(n as u32);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
                if self.tx_start == self.tx_buf.len() {
                    self.tx_buf.clear();
                    self.tx_start = 0;
                }
            }
            VsockType::Seqpacket => {
                while let Some(msg) = self.seq_msgs.front() {
                    match sys::send(self.fd.as_fd(), msg) {
                        Ok(_) => {
                            self.fwd_cnt += Wrapping(msg.len() as u32);
                            self.seq_msgs.pop_front();
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        if !self.tx_pending() && self.peer_shut_send && !self.host_wr_shut {
            self.host_wr_shut = true;
            // The peer may be gone already; that surfaces on the next read or write.
            let _ = sys::shutdown(self.fd.as_fd(), libc::SHUT_WR);
        }
        Ok(())
    }

    /// Whether the device may read host data for the guest now.
    pub fn may_read_host(&self) -> bool {
        self.readable
            && !self.host_eof
            && !self.peer_shut_rcv
            && matches!(self.state, ConnState::Established | ConnState::PeerClosed)
    }

    /// Whether the connection has anything for the RX queue.
    pub fn wants_rx(&self) -> bool {
        if self.pending != 0 {
            return true;
        }
        if self.host_eof && self.hup && self.state == ConnState::Established {
            return true;
        }
        self.may_read_host() && (self.peer_credit() > 0 || !self.credit_requested)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Conn {
        let fd = sys::unix_socket(libc::SOCK_STREAM).unwrap();
        Conn::new(fd, VsockType::Stream, 1, 2, ConnState::Established, 1000)
    }

    #[test]
    fn peer_credit_wraps() {
        let mut c = conn();
        c.update_peer_credit(100, u32::MAX - 10);
        c.rx_cnt = Wrapping(u32::MAX - 10);
        assert_eq!(c.peer_credit(), 100);
        c.rx_cnt += Wrapping(40);
        assert_eq!(c.peer_credit(), 60);
        // A guest that shrinks its buffer below what is in flight gets nothing more.
        c.update_peer_credit(10, u32::MAX - 10);
        assert_eq!(c.peer_credit(), 0);
    }

    #[test]
    fn credit_update_threshold() {
        let mut c = conn();
        c.update_peer_credit(256 * 1024, 0);
        assert_eq!(c.credit_update_threshold(), 500, "half of our 1000");
        c.recv_cnt = Wrapping(600);
        assert!(!c.needs_credit_update(), "nothing forwarded yet");
        c.fwd_cnt = Wrapping(499);
        assert!(!c.needs_credit_update());
        c.fwd_cnt = Wrapping(500);
        assert!(c.needs_credit_update());
        let _ = c.rx_header(3, VsockOp::CreditUpdate, 0, 0);
        assert!(!c.needs_credit_update());

        // A large buffer: 128 KiB (two full packets), however little of it the
        // guest's window uses.
        c.buf_alloc = 4 << 20;
        assert_eq!(c.credit_update_threshold(), 128 * 1024);
        // A guest with a small socket buffer (its window): half of that.
        c.update_peer_credit(16 * 1024, 0);
        assert_eq!(c.credit_update_threshold(), 8 * 1024);
        // A guest announcing nothing still gets updates (never a zero threshold).
        c.update_peer_credit(0, 0);
        assert_eq!(c.credit_update_threshold(), 1);
    }

    #[test]
    fn overrun_is_refused() {
        let mut c = conn();
        let mut iov = sys::IovScratch::default();
        let mut data = vec![0u8; 1001];
        // SAFETY: `data` outlives the region.
        let r = unsafe { IoRegion::new(data.as_mut_ptr(), data.len()) };
        assert!(matches!(
            c.send_guest_data(&[r], 1001, false, &mut iov),
            Err(SendError::CreditOverrun)
        ));
        assert_eq!(c.recv_cnt.0, 0);
    }
}
