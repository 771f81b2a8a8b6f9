//! One vsock connection: its state machine, credit flow control both ways, the
//! host-side TX buffer.
//!
//! The muxer routes events to a [`Conn`] (guest packets through
//! [`Conn::on_guest_packet`], host socket readiness, timeouts) and carries out the
//! [`Action`] each returns; every state transition happens here.

use std::collections::VecDeque;
use std::io;
use std::num::Wrapping;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use outboard_protocol::vsock::{
    SeqpacketFlags, ShutdownFlags, VsockHeader, VsockOp, VsockType, MAX_PKT_BUF_SIZE,
    VMADDR_CID_HOST,
};

use outboard_protocol::record::{RecordError, RecordReader, RecordWriter};
use rustix::event::epoll::EventFlags;
use rustix::net::Shutdown;

use super::packet::TxPacket;
use super::sys;
use super::CONN_TIMEOUT;
use crate::virtio::{read_regions, IoRegion};

/// `(local_port, peer_port)`: the host-side port and the guest-side port.
pub(crate) type ConnKey = (u32, u32);

/// Connection states (Firecracker's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    /// Host-initiated: REQUEST sent (or queued) to the guest, waiting for RESPONSE.
    LocalInit,
    /// Guest-initiated: the host socket's connect is in progress (AF_VSOCK); nothing
    /// is sent to the guest until it ends (RESPONSE) or fails or times out (RST).
    HostConnecting,
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

impl ConnState {
    /// Every state, by its code in a handover record (the index).
    const ALL: [ConnState; 7] = [
        ConnState::LocalInit,
        ConnState::HostConnecting,
        ConnState::PeerInit,
        ConnState::Established,
        ConnState::LocalClosed,
        ConnState::PeerClosed,
        ConnState::Killed,
    ];

    fn code(self) -> u8 {
        ConnState::ALL
            .iter()
            .position(|s| *s == self)
            .map_or(u8::MAX, |i| i as u8)
    }

    /// Whether guest data and SHUTDOWN are in place.
    fn is_open(self) -> bool {
        matches!(
            self,
            ConnState::Established | ConnState::LocalClosed | ConnState::PeerClosed
        )
    }
}

/// Control packets waiting for an RX buffer.
const PENDING_REQUEST: u8 = 1 << 0;
const PENDING_RESPONSE: u8 = 1 << 1;
const PENDING_RST: u8 = 1 << 2;
const PENDING_SHUTDOWN: u8 = 1 << 3;
const PENDING_CREDIT_UPDATE: u8 = 1 << 4;
const PENDING_CREDIT_REQUEST: u8 = 1 << 5;

/// Why the device resets a connection (each but [`Fault::WrongType`] has its counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// The host socket's connect failed or timed out (`err_connect_failed`).
    ConnectFailed,
    /// The guest sent beyond the credit it was given (`err_credit_overrun`).
    CreditOverrun,
    /// The host socket failed (`err_host_io`).
    HostIo,
    /// A guest packet out of place for the connection's state (`err_no_connection`).
    Protocol,
    /// A guest packet whose socket type is not the connection's (no counter).
    WrongType,
    /// The guest did not answer a REQUEST or finish a shutdown in time (`err_timeout`).
    Timeout,
    /// A host message that can never fit the guest's buffers (`err_unsupported`).
    Unsupported,
}

impl Fault {
    /// The fault in words, for log lines.
    pub fn describe(self) -> &'static str {
        match self {
            Fault::ConnectFailed => "the host side refused or did not answer the connect",
            Fault::CreditOverrun => "the guest sent beyond the credit it was given",
            Fault::HostIo => "the host socket failed",
            Fault::Protocol => "a guest packet out of place for the connection's state",
            Fault::WrongType => "a guest packet of the other socket type",
            Fault::Timeout => "the guest did not answer in time",
            Fault::Unsupported => "a host message that cannot reach the guest",
        }
    }
}

/// How log lines name a connection: its host-side and guest-side ports and type, e.g.
/// `connection host port 1073741824 / guest port 5000 (stream)`. With the worker's
/// name (`vsock cid 3`) every line says which VM and which connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConnLabel {
    /// The host-side port.
    pub local_port: u32,
    /// The guest-side port.
    pub peer_port: u32,
    /// The socket type.
    pub ty: VsockType,
}

impl std::fmt::Display for ConnLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ty = match self.ty {
            VsockType::Stream => "stream",
            VsockType::Seqpacket => "seqpacket",
        };
        write!(
            f,
            "connection host port {} / guest port {} ({ty})",
            self.local_port, self.peer_port
        )
    }
}

/// What the muxer must do after an event of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// The event was handled and the connection goes on: the muxer does its
    /// bookkeeping (a due CREDIT_UPDATE, EPOLLOUT while bytes wait, RX scheduling).
    Continue,
    /// As [`Action::Continue`], after this many guest payload bytes were forwarded.
    Forwarded(u32),
    /// Nothing to do (a packet dropped, an event that changed nothing).
    Ignore,
    /// The guest accepted a host-initiated connection: tell the host client
    /// `OK <local_port>\n`, then go on as [`Action::Continue`].
    SendOk,
    /// Watch this deadline ([`Conn::timed_out`] tells whether it still holds).
    ArmTimer(Instant),
    /// Reset the connection: counted as killed, and in the fault's counter.
    Kill(Fault),
    /// End the connection with RST to the guest, an orderly end (not counted as killed).
    Close,
    /// Forget the connection: the guest reset it, or its RST went out.
    Remove,
}

/// Why guest data could not be forwarded.
#[derive(Debug)]
enum SendError {
    /// The guest sent beyond the credit it was given.
    CreditOverrun,
    /// The host socket failed.
    Io(io::Error),
}

/// One connection.
#[derive(Debug)]
pub(crate) struct Conn {
    fd: OwnedFd,
    ty: VsockType,
    local_port: u32,
    peer_port: u32,
    state: ConnState,
    /// `PENDING_*` bits.
    pending: u8,
    /// Flags of the pending SHUTDOWN.
    shutdown_flags: u32,
    /// The guest's receive buffer and what it has consumed of it.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Payload bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    /// Credit given to the guest (the TX buffer size).
    buf_alloc: u32,
    /// Guest bytes written to the host socket.
    fwd_cnt: Wrapping<u32>,
    /// Guest bytes received.
    recv_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Stream TX buffer (bytes not yet written to the host) and its read offset.
    tx_buf: Vec<u8>,
    tx_start: usize,
    /// Seqpacket: complete messages not yet written, and the message being assembled.
    seq_msgs: VecDeque<Vec<u8>>,
    seq_cur: Vec<u8>,
    /// Edge-triggered readiness: the host socket may have data (or EOF).
    readable: bool,
    /// The host peer shut down its sending side (EPOLLRDHUP) / both sides (EPOLLHUP).
    rdhup: bool,
    /// The host socket reports the peer's close only as EPOLLRDHUP, like a half close
    /// (AF_VSOCK): after end-of-file, a zero-length send tells them apart.
    probe_hup: bool,
    hup: bool,
    /// Reading the host socket returned end-of-file; the guest was told SHUTDOWN SEND.
    host_eof: bool,
    /// The guest will receive / send no more.
    peer_shut_rcv: bool,
    peer_shut_send: bool,
    /// `shutdown(SHUT_WR)` was done on the host socket.
    host_wr_shut: bool,
    /// A CREDIT_REQUEST was sent and not answered yet.
    credit_requested: bool,
    /// When a request or shutdown times out.
    deadline: Option<Instant>,
    /// Whether the key is in the muxer's RX list.
    in_rx_list: bool,
}

impl Conn {
    fn new(
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
            probe_hup: false,
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

    /// Appends the connection's state to a handover record, in the order
    /// [`Conn::load`] reads it (its fd travels beside the record). Deadlines are
    /// written as the nanoseconds left after `now` (`u64::MAX`: none).
    pub fn save(&self, w: &mut RecordWriter, now: Instant) {
        let flags = [
            self.readable,
            self.rdhup,
            self.probe_hup,
            self.hup,
            self.host_eof,
            self.peer_shut_rcv,
            self.peer_shut_send,
            self.host_wr_shut,
            self.credit_requested,
            self.in_rx_list,
        ]
        .iter()
        .enumerate()
        .fold(0u16, |acc, (i, f)| acc | (u16::from(*f) << i));
        w.u16(self.ty as u16)
            .u32(self.local_port)
            .u32(self.peer_port)
            .u8(self.state.code())
            .u8(self.pending)
            .u32(self.shutdown_flags)
            .u32(self.peer_buf_alloc)
            .u32(self.peer_fwd_cnt.0)
            .u32(self.rx_cnt.0)
            .u32(self.buf_alloc)
            .u32(self.fwd_cnt.0)
            .u32(self.recv_cnt.0)
            .u32(self.last_fwd_cnt_sent.0)
            .u16(flags)
            .u64(self.deadline.map_or(u64::MAX, |d| {
                u64::try_from(d.saturating_duration_since(now).as_nanos()).unwrap_or(u64::MAX - 1)
            }))
            .bytes(&self.tx_buf[self.tx_start..])
            .count(self.seq_msgs.len());
        for m in &self.seq_msgs {
            w.bytes(m);
        }
        w.bytes(&self.seq_cur);
    }

    /// A connection from a handover record written by [`Conn::save`], with its host
    /// socket `fd`. Buffered guest bytes may not exceed `max_buf` (the device's TX
    /// buffer size: the guest's credit never allows more).
    pub fn load(
        r: &mut RecordReader<'_>,
        fd: OwnedFd,
        now: Instant,
        max_buf: u32,
    ) -> Result<Conn, RecordError> {
        let raw_ty = r.u16("connection type")?;
        let ty = VsockType::from_raw(raw_ty).map_err(|_| RecordError::Invalid {
            field: "connection type",
            value: u64::from(raw_ty),
            why: "1 (stream) or 2 (seqpacket)",
        })?;
        let local_port = r.u32("local port")?;
        let peer_port = r.u32("peer port")?;
        let code = r.u8("connection state")?;
        let state = *ConnState::ALL
            .get(usize::from(code))
            .ok_or(RecordError::Invalid {
                field: "connection state",
                value: u64::from(code),
                why: "states are 0 to 6",
            })?;
        let pending = r.u8("pending control packets")?;
        if pending >= 1 << 6 {
            return Err(RecordError::Invalid {
                field: "pending control packets",
                value: u64::from(pending),
                why: "six bits are defined",
            });
        }
        let mut conn = Conn::new(fd, ty, local_port, peer_port, state, 0);
        conn.pending = pending;
        conn.shutdown_flags = r.u32("shutdown flags")?;
        conn.peer_buf_alloc = r.u32("peer buf_alloc")?;
        conn.peer_fwd_cnt = Wrapping(r.u32("peer fwd_cnt")?);
        conn.rx_cnt = Wrapping(r.u32("rx_cnt")?);
        conn.buf_alloc = r.u32("buf_alloc")?;
        if conn.buf_alloc > max_buf {
            return Err(RecordError::Invalid {
                field: "buf_alloc",
                value: u64::from(conn.buf_alloc),
                why: "more than this device's TX buffer",
            });
        }
        conn.fwd_cnt = Wrapping(r.u32("fwd_cnt")?);
        conn.recv_cnt = Wrapping(r.u32("recv_cnt")?);
        conn.last_fwd_cnt_sent = Wrapping(r.u32("last fwd_cnt sent")?);
        let flags = r.u16("connection flags")?;
        if flags >= 1 << 10 {
            return Err(RecordError::Invalid {
                field: "connection flags",
                value: u64::from(flags),
                why: "ten bits are defined",
            });
        }
        let bit = |i: u16| flags & (1 << i) != 0;
        conn.readable = bit(0);
        conn.rdhup = bit(1);
        conn.probe_hup = bit(2);
        conn.hup = bit(3);
        conn.host_eof = bit(4);
        conn.peer_shut_rcv = bit(5);
        conn.peer_shut_send = bit(6);
        conn.host_wr_shut = bit(7);
        conn.credit_requested = bit(8);
        conn.in_rx_list = bit(9);
        let left = r.u64("deadline")?;
        conn.deadline = (left != u64::MAX).then(|| now + std::time::Duration::from_nanos(left));
        // The guest's credit bounds what the device holds for a connection: its TX
        // buffer, or its seqpacket messages (one being assembled may be one packet
        // over).
        let max = max_buf as usize + MAX_PKT_BUF_SIZE as usize;
        conn.tx_buf = r.bytes("TX buffer", max)?.to_vec();
        let n = r.count("seqpacket messages", max, 4)?;
        let mut held = conn.tx_buf.len();
        for _ in 0..n {
            let m = r.bytes("seqpacket message", max)?;
            held += m.len();
            conn.seq_msgs.push_back(m.to_vec());
        }
        conn.seq_cur = r.bytes("seqpacket message being assembled", max)?.to_vec();
        held += conn.seq_cur.len();
        if held > max {
            return Err(RecordError::TooLong {
                field: "buffered guest bytes",
                len: held,
                max,
            });
        }
        Ok(conn)
    }

    /// Whether the connection's socket is in the muxer's epoll set: every state but
    /// [`ConnState::Killed`], whose socket left it when the RST was queued.
    pub fn in_epoll(&self) -> bool {
        self.state != ConnState::Killed
    }

    /// Whether the connection is in the muxer's RX list (as recorded).
    pub fn in_rx_list(&self) -> bool {
        self.in_rx_list
    }

    /// A guest-initiated connection: the guest's REQUEST `hdr` (from its port
    /// `src_port` to the host's `dst_port`) found a host listener, connected as `fd`.
    /// RESPONSE is queued; the guest's credit fields are recorded.
    pub fn new_peer_init(fd: OwnedFd, ty: VsockType, hdr: &VsockHeader, buf_alloc: u32) -> Self {
        let mut conn = Conn::new(
            fd,
            ty,
            hdr.dst_port,
            hdr.src_port,
            ConnState::PeerInit,
            buf_alloc,
        );
        conn.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        conn.pending = PENDING_RESPONSE;
        conn
    }

    /// A guest-initiated connection whose host socket `fd` is still connecting: the
    /// guest hears nothing until [`Conn::on_host_ready`] sees the connect end, and
    /// has RST if it does not within [`CONN_TIMEOUT`] ([`Conn::deadline`]).
    pub fn new_peer_connecting(
        fd: OwnedFd,
        ty: VsockType,
        hdr: &VsockHeader,
        buf_alloc: u32,
    ) -> Self {
        let mut conn = Conn::new(
            fd,
            ty,
            hdr.dst_port,
            hdr.src_port,
            ConnState::HostConnecting,
            buf_alloc,
        );
        conn.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        conn.arm_timer();
        conn
    }

    /// The host socket is one whose peer's close shows only as EPOLLRDHUP, the same as
    /// a half close (AF_VSOCK, whose poll sets EPOLLHUP only for its own shutdown):
    /// after end-of-file the connection asks the socket with a zero-length send, which
    /// fails with EPIPE once the peer will receive no more.
    pub fn probe_peer_close(&mut self) {
        self.probe_hup = true;
    }

    /// After end-of-file on a socket of [`Conn::probe_peer_close`]: whether the peer
    /// closed completely (then it counts as EPOLLHUP).
    fn probe_hangup(&mut self) {
        if !self.probe_hup || !self.host_eof || self.hup {
            return;
        }
        // Nothing is sent: a zero-length send only runs the socket's checks (and a
        // stream or AF_VSOCK seqpacket send of nothing queues nothing).
        if let Err(e) = sys::send(self.fd.as_fd(), &[]) {
            if matches!(
                e.raw_os_error(),
                Some(libc::EPIPE | libc::ENOTCONN | libc::ECONNRESET)
            ) {
                self.rdhup = true;
                self.hup = true;
            }
        }
    }

    /// Whether the host socket's connect is still in progress.
    pub fn host_connecting(&self) -> bool {
        self.state == ConnState::HostConnecting
    }

    /// A host-initiated connection: a host client on `fd` asked with `CONNECT` for
    /// guest port `peer_port`. REQUEST is queued and the guest has [`CONN_TIMEOUT`] to
    /// answer ([`Conn::deadline`]).
    pub fn new_local_init(
        fd: OwnedFd,
        ty: VsockType,
        local_port: u32,
        peer_port: u32,
        buf_alloc: u32,
    ) -> Self {
        let mut conn = Conn::new(
            fd,
            ty,
            local_port,
            peer_port,
            ConnState::LocalInit,
            buf_alloc,
        );
        conn.pending = PENDING_REQUEST;
        conn.arm_timer();
        conn
    }

    /// The connection's key in the muxer's table.
    pub fn key(&self) -> ConnKey {
        (self.local_port, self.peer_port)
    }

    /// The host-side port.
    pub fn local_port(&self) -> u32 {
        self.local_port
    }

    /// How log lines name this connection.
    pub fn label(&self) -> ConnLabel {
        ConnLabel {
            local_port: self.local_port,
            peer_port: self.peer_port,
            ty: self.ty,
        }
    }

    /// Whether a host client is opening the connection (REQUEST to the guest not
    /// answered yet); meaningful when the connection is new.
    pub fn host_initiated(&self) -> bool {
        self.state == ConnState::LocalInit
    }

    /// The host socket.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The socket type.
    pub fn ty(&self) -> VsockType {
        self.ty
    }

    /// When the pending request or shutdown times out, if one is pending.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The guest's receive buffer size, as last announced.
    pub fn peer_buf_alloc(&self) -> u32 {
        self.peer_buf_alloc
    }

    /// Whether the host peer shut down its sending side (EPOLLRDHUP or more).
    pub fn host_rdhup(&self) -> bool {
        self.rdhup
    }

    fn arm_timer(&mut self) -> Action {
        let at = Instant::now() + CONN_TIMEOUT;
        self.deadline = Some(at);
        Action::ArmTimer(at)
    }

    /// Bytes the device may still send to the guest.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Records the credit fields of a guest packet.
    fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
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
    fn credit_update_threshold(&self) -> u32 {
        (2 * MAX_PKT_BUF_SIZE)
            .min(self.buf_alloc / 2)
            .min(self.peer_buf_alloc / 2)
            .max(1)
    }

    /// Whether the device freed enough TX buffer since it last told the guest
    /// ([`Conn::credit_update_threshold`]) that a CREDIT_UPDATE is due.
    fn needs_credit_update(&self) -> bool {
        (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= self.credit_update_threshold()
    }

    /// A header from this connection to the guest; records the announced `fwd_cnt`.
    fn rx_header(&mut self, guest_cid: u64, op: VsockOp, len: u32, flags: u32) -> VsockHeader {
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

    // ---- Guest packets (TX queue) ----

    /// A valid guest packet for this connection: the checks every packet goes through
    /// (a killed connection waits only for RST; the socket type must match), its credit
    /// fields, then the event of its op.
    pub fn on_guest_packet(
        &mut self,
        pkt: &TxPacket,
        payload: &[IoRegion],
        iov: &mut sys::IovScratch,
    ) -> Action {
        let h = &pkt.hdr;
        if self.state == ConnState::Killed {
            return if pkt.op == VsockOp::Rst {
                Action::Remove
            } else {
                Action::Ignore
            };
        }
        if self.ty != pkt.ty {
            return Action::Kill(Fault::WrongType);
        }
        self.update_peer_credit(h.buf_alloc, h.fwd_cnt);
        match pkt.op {
            VsockOp::Rst => self.on_rst(),
            VsockOp::Response => self.on_response(),
            VsockOp::Rw => self.on_rw(payload, h.len, h.flags, iov),
            VsockOp::CreditUpdate => self.on_credit_update(),
            VsockOp::CreditRequest => self.on_credit_request(),
            VsockOp::Shutdown => self.on_shutdown(h.flags),
            VsockOp::Request | VsockOp::Invalid => self.on_out_of_place(),
        }
    }

    /// RST from the guest, in any state: the connection is gone.
    fn on_rst(&mut self) -> Action {
        Action::Remove
    }

    /// RESPONSE: the guest accepted a host-initiated connection (LocalInit ->
    /// Established, the timer is off, the host client is told `OK`). Out of place
    /// anywhere else.
    fn on_response(&mut self) -> Action {
        if self.state != ConnState::LocalInit {
            return self.on_out_of_place();
        }
        self.state = ConnState::Established;
        self.deadline = None;
        Action::SendOk
    }

    /// RW: guest data for the host socket, once the connection is up and until the
    /// guest's own SHUTDOWN SEND. `EOM` ends a seqpacket message.
    fn on_rw(
        &mut self,
        payload: &[IoRegion],
        len: u32,
        flags: u32,
        iov: &mut sys::IovScratch,
    ) -> Action {
        if !self.state.is_open() || self.peer_shut_send {
            return self.on_out_of_place();
        }
        let eom = SeqpacketFlags::from_bits_truncate(flags).contains(SeqpacketFlags::EOM);
        self.forward(payload, len, eom, iov)
    }

    /// CREDIT_UPDATE: its credit fields are all it brings.
    fn on_credit_update(&mut self) -> Action {
        Action::Continue
    }

    /// CREDIT_REQUEST: a CREDIT_UPDATE is queued as the answer.
    fn on_credit_request(&mut self) -> Action {
        self.pending |= PENDING_CREDIT_UPDATE;
        Action::Continue
    }

    /// SHUTDOWN with `flags`: the guest will receive (RCV) or send (SEND) no more.
    /// After SEND the host socket's write side is shut once the TX buffer is written.
    /// With both, the connection ends: at once (RST) when nothing is buffered, else
    /// PeerClosed until the buffer drains ([`Conn::after_host_write`]) or the timer
    /// fires.
    fn on_shutdown(&mut self, flags: u32) -> Action {
        if !self.state.is_open() {
            return self.on_out_of_place();
        }
        let flags = ShutdownFlags::from_bits_truncate(flags);
        self.peer_shut_rcv |= flags.contains(ShutdownFlags::RCV);
        self.peer_shut_send |= flags.contains(ShutdownFlags::SEND);
        if self.flush().is_err() {
            return Action::Kill(Fault::HostIo);
        }
        if self.peer_shut_rcv && self.peer_shut_send {
            if self.tx_pending() {
                self.state = ConnState::PeerClosed;
                return self.arm_timer();
            }
            return Action::Close;
        }
        Action::Continue
    }

    /// REQUEST on a live connection, RESPONSE out of place, RW after the guest's own
    /// SHUTDOWN SEND or before the connection is up, SHUTDOWN before it, INVALID.
    fn on_out_of_place(&mut self) -> Action {
        Action::Kill(Fault::Protocol)
    }

    /// Whether a stream RW packet with header `hdr` may join a batch for
    /// [`Conn::on_rw_batch`]; if so its credit fields are recorded.
    pub fn accept_stream_rw(&mut self, hdr: &VsockHeader) -> bool {
        if !self.state.is_open() || self.ty != VsockType::Stream || self.peer_shut_send {
            return false;
        }
        self.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        true
    }

    /// The payload (`len` bytes) of consecutive stream RW packets that
    /// [`Conn::accept_stream_rw`] accepted, in one write to the host socket.
    pub fn on_rw_batch(
        &mut self,
        payload: &[IoRegion],
        len: u32,
        iov: &mut sys::IovScratch,
    ) -> Action {
        if self.state == ConnState::Killed {
            return Action::Ignore;
        }
        self.forward(payload, len, false, iov)
    }

    fn forward(
        &mut self,
        payload: &[IoRegion],
        len: u32,
        eom: bool,
        iov: &mut sys::IovScratch,
    ) -> Action {
        match self.send_guest_data(payload, len, eom, iov) {
            Ok(()) => Action::Forwarded(len),
            Err(SendError::CreditOverrun) => Action::Kill(Fault::CreditOverrun),
            Err(SendError::Io(e)) => {
                outboard_protocol::log_limited!(
                    log::Level::Debug,
                    "vsock: {}: host write failed: {e}",
                    self.label()
                );
                Action::Kill(Fault::HostIo)
            }
        }
    }

    /// Forwards one guest RW payload to the host socket: straight from guest memory
    /// when nothing is buffered, into the TX buffer for what the socket does not take.
    fn send_guest_data(
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
                    // `payload` is the packet's payload as parse_tx took it from the
                    // chain (exactly `len` bytes), not a chain half: what the socket did
                    // not take is copied from an offset, with the random-access
                    // primitive under ChainReader.
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
                // Copied from the payload's regions as above.
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
    fn flush(&mut self) -> io::Result<()> {
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
            let _ = sys::shutdown(self.fd.as_fd(), Shutdown::Write);
        }
        Ok(())
    }

    /// After guest data moved to the host socket: a PeerClosed connection whose buffer
    /// drained ends ([`Action::Close`]); otherwise a CREDIT_UPDATE is queued when due.
    pub fn after_host_write(&mut self) -> Action {
        if self.state == ConnState::PeerClosed && !self.tx_pending() {
            return Action::Close;
        }
        if self.needs_credit_update() {
            self.pending |= PENDING_CREDIT_UPDATE;
        }
        Action::Continue
    }

    // ---- The host socket ----

    /// Readiness `events` (EPOLL* bits) of the host socket. Writability flushes the TX
    /// buffer ([`Action::Continue`] when something was buffered, [`Action::Ignore`]
    /// when nothing was).
    pub fn on_host_ready(&mut self, events: EventFlags) -> Action {
        if self.state == ConnState::HostConnecting {
            return self.on_connect_done(events);
        }
        if events.intersects(EventFlags::IN | EventFlags::RDHUP | EventFlags::HUP | EventFlags::ERR)
        {
            self.readable = true;
        }
        if events.contains(EventFlags::RDHUP) {
            self.rdhup = true;
        }
        if events.intersects(EventFlags::HUP | EventFlags::ERR) {
            self.rdhup = true;
            self.hup = true;
        }
        // A peer that half-closed before may have closed completely now.
        self.probe_hangup();
        if !events.contains(EventFlags::OUT) || !self.tx_pending() {
            return Action::Ignore;
        }
        match self.flush() {
            Ok(()) => Action::Continue,
            Err(_) => Action::Kill(Fault::HostIo),
        }
    }

    /// Readiness of a socket whose connect was in progress. Connected (no pending
    /// socket error, a peer address): PeerInit, RESPONSE is queued, the timer is off,
    /// and the same report's other events count as usual (a peer that hung up at once
    /// still gets its data and end-of-file to the guest). Otherwise the connect failed
    /// ([`Fault::ConnectFailed`], RST to the guest).
    fn on_connect_done(&mut self, events: EventFlags) -> Action {
        if !events.intersects(EventFlags::OUT | EventFlags::ERR | EventFlags::HUP) {
            return Action::Ignore;
        }
        let fd = self.fd.as_fd();
        if sys::socket_error(fd).is_err() || rustix::net::getpeername(fd).is_err() {
            return Action::Kill(Fault::ConnectFailed);
        }
        self.state = ConnState::PeerInit;
        self.deadline = None;
        self.pending |= PENDING_RESPONSE;
        // Data may have come with the connect; an edge already passed cannot repeat.
        self.readable = true;
        self.on_host_ready(events - EventFlags::OUT);
        Action::Continue
    }

    /// Reading the host socket would block: wait for its next readiness report.
    pub fn host_drained(&mut self) {
        self.readable = false;
    }

    /// Reading the host socket returned end-of-file: SHUTDOWN SEND is queued for the
    /// guest, which may still send. If the host also hung up, the next RX turn closes
    /// the connection instead ([`Conn::host_closed`]).
    pub fn on_host_eof(&mut self) {
        self.host_eof = true;
        self.readable = false;
        self.probe_hangup();
        if self.hup {
            return;
        }
        self.shutdown_flags = ShutdownFlags::SEND.bits();
        self.pending |= PENDING_SHUTDOWN;
    }

    /// At the start of an RX turn: an Established connection whose host socket hung up
    /// completely after its end-of-file was read becomes LocalClosed, SHUTDOWN with
    /// both flags is queued and the guest has [`CONN_TIMEOUT`] to answer with RST
    /// ([`Action::ArmTimer`]). [`Action::Ignore`] otherwise.
    pub fn host_closed(&mut self) -> Action {
        if !(self.host_eof && self.hup && self.state == ConnState::Established) {
            return Action::Ignore;
        }
        self.state = ConnState::LocalClosed;
        self.shutdown_flags = (ShutdownFlags::RCV | ShutdownFlags::SEND).bits();
        self.pending |= PENDING_SHUTDOWN;
        self.arm_timer()
    }

    // ---- The device's own decisions ----

    /// Resets the connection: Killed, only RST is queued, the timer is off and the host
    /// socket is shut down both ways. False when it was killed already.
    pub fn kill(&mut self) -> bool {
        if self.state == ConnState::Killed {
            return false;
        }
        self.state = ConnState::Killed;
        self.pending = PENDING_RST;
        self.deadline = None;
        let _ = sys::shutdown(self.fd.as_fd(), Shutdown::Both);
        true
    }

    /// The timer armed for `at` fired: a deadline still pending kills the connection
    /// ([`Fault::Timeout`]); one met or replaced meanwhile is [`Action::Ignore`]d.
    pub fn timed_out(&mut self, at: Instant) -> Action {
        if self.deadline == Some(at) {
            Action::Kill(Fault::Timeout)
        } else {
            Action::Ignore
        }
    }

    // ---- Packets to the guest (RX queue) ----

    /// Whether the device may read host data for the guest now.
    pub fn may_read_host(&self) -> bool {
        self.readable
            && !self.host_eof
            && !self.peer_shut_rcv
            && matches!(self.state, ConnState::Established | ConnState::PeerClosed)
    }

    /// Whether the connection has anything for the RX queue.
    fn wants_rx(&self) -> bool {
        if self.pending != 0 {
            return true;
        }
        if self.host_eof && self.hup && self.state == ConnState::Established {
            return true;
        }
        self.may_read_host() && (self.peer_credit() > 0 || !self.credit_requested)
    }

    /// The guest has too little credit for what waits: queues a CREDIT_REQUEST unless
    /// one is unanswered. True when it did.
    pub fn ask_credit(&mut self) -> bool {
        if self.credit_requested {
            return false;
        }
        self.credit_requested = true;
        self.pending |= PENDING_CREDIT_REQUEST;
        true
    }

    /// The next control packet waiting for an RX buffer, most urgent first.
    pub fn next_control(&self) -> Option<VsockOp> {
        let pending = self.pending;
        if pending & PENDING_RST != 0 {
            Some(VsockOp::Rst)
        } else if pending & PENDING_RESPONSE != 0 {
            Some(VsockOp::Response)
        } else if pending & PENDING_REQUEST != 0 {
            Some(VsockOp::Request)
        } else if pending & PENDING_SHUTDOWN != 0 {
            Some(VsockOp::Shutdown)
        } else if pending & PENDING_CREDIT_REQUEST != 0 {
            Some(VsockOp::CreditRequest)
        } else if pending & PENDING_CREDIT_UPDATE != 0 {
            Some(VsockOp::CreditUpdate)
        } else {
            None
        }
    }

    /// The header of control packet `op` ([`Conn::next_control`]), which goes to the
    /// guest now: it is no longer pending (after RST nothing is); sending RESPONSE
    /// makes a PeerInit connection Established.
    pub fn control_sent(&mut self, guest_cid: u64, op: VsockOp) -> VsockHeader {
        let flags = if op == VsockOp::Shutdown {
            self.shutdown_flags
        } else {
            0
        };
        let hdr = self.rx_header(guest_cid, op, 0, flags);
        match op {
            VsockOp::Rst => self.pending = 0,
            VsockOp::Response => {
                self.pending &= !PENDING_RESPONSE;
                self.state = ConnState::Established;
            }
            VsockOp::Request => self.pending &= !PENDING_REQUEST,
            VsockOp::Shutdown => self.pending &= !PENDING_SHUTDOWN,
            VsockOp::CreditRequest => self.pending &= !PENDING_CREDIT_REQUEST,
            _ => {}
        }
        hdr
    }

    /// The header of an RW packet with `len` bytes of host data, which goes to the
    /// guest now (`flags`: EOM/EOR of a seqpacket message's last packet).
    pub fn data_sent(&mut self, guest_cid: u64, len: u32, flags: u32) -> VsockHeader {
        self.rx_cnt += Wrapping(len);
        self.rx_header(guest_cid, VsockOp::Rw, len, flags)
    }

    /// Puts the connection on the muxer's RX list if it is not on it and wants RX;
    /// true when the muxer must add its key.
    pub fn join_rx_list(&mut self) -> bool {
        if self.in_rx_list || !self.wants_rx() {
            return false;
        }
        self.in_rx_list = true;
        true
    }

    /// As [`Conn::join_rx_list`], whether or not it wants RX now (its turn was cut
    /// short by the RX queue running dry).
    pub fn rejoin_rx_list(&mut self) -> bool {
        !std::mem::replace(&mut self.in_rx_list, true)
    }

    /// Takes the connection off the RX list: its turn begins.
    pub fn leave_rx_list(&mut self) {
        self.in_rx_list = false;
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    use rustix::net::{RecvFlags, SocketType};

    use super::*;

    fn conn() -> Conn {
        let fd = sys::unix_socket(SocketType::STREAM).unwrap();
        Conn::new(fd, VsockType::Stream, 1, 2, ConnState::Established, 1000)
    }

    /// A stream connection in `state` whose host socket's other end is returned.
    fn stream_pair(state: ConnState) -> (Conn, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        let c = Conn::new(a.into(), VsockType::Stream, 1, 2, state, 1000);
        (c, b)
    }

    fn region(data: &mut [u8]) -> IoRegion {
        // SAFETY: every caller keeps `data` alive and in place while the region is used.
        unsafe { IoRegion::new(data.as_mut_ptr(), data.len()) }
    }

    /// A stream packet from guest port 2 to host port 1 (the test connections' key).
    fn packet(op: VsockOp, flags: u32, len: u32) -> TxPacket {
        TxPacket {
            hdr: VsockHeader {
                src_cid: 3,
                dst_cid: VMADDR_CID_HOST,
                src_port: 2,
                dst_port: 1,
                len,
                type_: VsockType::Stream as u16,
                op: op as u16,
                flags,
                buf_alloc: 4096,
                fwd_cnt: 0,
            },
            op,
            ty: VsockType::Stream,
        }
    }

    /// A guest packet without payload.
    fn guest(c: &mut Conn, op: VsockOp, flags: u32) -> Action {
        c.on_guest_packet(&packet(op, flags, 0), &[], &mut sys::IovScratch::default())
    }

    /// Guest data for the host socket.
    fn guest_rw(c: &mut Conn, data: &mut [u8]) -> Action {
        let pkt = packet(VsockOp::Rw, 0, data.len() as u32);
        c.on_guest_packet(&pkt, &[region(data)], &mut sys::IovScratch::default())
    }

    /// Fills the host socket until it takes no more.
    fn fill_host_socket(c: &Conn) {
        let chunk = [0u8; 64 * 1024];
        while sys::send(c.fd(), &chunk).is_ok() {}
        while sys::send(c.fd(), &chunk[..1]).is_ok() {}
    }

    const BOTH: u32 = ShutdownFlags::RCV.bits() | ShutdownFlags::SEND.bits();

    /// A guest-initiated connection whose host socket `fd` is still connecting.
    fn connecting(fd: OwnedFd) -> Conn {
        Conn::new_peer_connecting(
            fd,
            VsockType::Stream,
            &packet(VsockOp::Request, 0, 0).hdr,
            1000,
        )
    }

    #[test]
    fn a_saved_connection_loads_as_it_was() {
        use outboard_protocol::record::{RecordReader, RecordWriter};
        let (mut c, _peer) = stream_pair(ConnState::Established);
        c.tx_buf = b"xxbuffered".to_vec();
        c.tx_start = 2;
        c.seq_msgs.push_back(b"one".to_vec());
        c.seq_cur = b"half".to_vec();
        c.pending = PENDING_CREDIT_UPDATE | PENDING_SHUTDOWN;
        c.fwd_cnt = Wrapping(u32::MAX - 3);
        c.in_rx_list = true;
        c.deadline = Some(Instant::now() + CONN_TIMEOUT);
        let now = Instant::now();
        let mut w = RecordWriter::new();
        c.save(&mut w, now);
        let bytes = w.into_bytes().unwrap();
        let fd = c.fd.try_clone().unwrap();
        let mut r = RecordReader::new(&bytes);
        let loaded = Conn::load(&mut r, fd, now, c.buf_alloc).unwrap();
        r.finish().unwrap();
        assert_eq!(loaded.tx_buf, b"buffered");
        assert_eq!(loaded.tx_start, 0);
        let mut again = RecordWriter::new();
        loaded.save(&mut again, now);
        assert_eq!(again.into_bytes().unwrap(), bytes);
        // A buffer beyond what the guest could have been given is refused.
        let fd = c.fd.try_clone().unwrap();
        let mut r = RecordReader::new(&bytes);
        assert!(Conn::load(&mut r, fd, now, 1).is_err());
    }

    #[test]
    fn connect_in_progress_then_connected() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut c = connecting(a.into());
        assert!(c.host_connecting());
        assert!(
            c.deadline().is_some(),
            "a connect that never ends must time out"
        );
        assert_eq!(
            c.next_control(),
            None,
            "the guest hears nothing before the connect ends"
        );
        assert!(!c.may_read_host());
        // Readable alone (no writability) does not end a connect.
        assert_eq!(c.on_host_ready(EventFlags::IN), Action::Ignore);
        assert!(c.host_connecting());
        // The peer wrote and hung up with the connect: data and EOF must still reach
        // the guest after RESPONSE.
        std::io::Write::write_all(&mut b, b"hi").unwrap();
        drop(b);
        let ev = EventFlags::OUT | EventFlags::IN | EventFlags::RDHUP;
        assert_eq!(c.on_host_ready(ev), Action::Continue);
        assert!(!c.host_connecting());
        assert_eq!(c.deadline(), None);
        assert_eq!(c.next_control(), Some(VsockOp::Response));
        assert!(c.host_rdhup());
        let _ = c.control_sent(3, VsockOp::Response);
        assert!(
            c.may_read_host(),
            "the data that came with the connect is read"
        );
    }

    #[test]
    fn connect_without_peer_fails() {
        // Never connected: no socket error, but no peer either.
        let mut c = connecting(sys::unix_socket(SocketType::STREAM).unwrap());
        assert_eq!(
            c.on_host_ready(EventFlags::OUT | EventFlags::HUP),
            Action::Kill(Fault::ConnectFailed)
        );
    }

    #[test]
    fn connect_refused_fails() {
        use rustix::net::{AddressFamily, SocketAddrV4, SocketFlags};
        // A port nobody listens on: bind one, note it, close it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let fd = rustix::net::socket_with(
            AddressFamily::INET,
            SocketType::STREAM,
            SocketFlags::NONBLOCK,
            None,
        )
        .unwrap();
        let addr = SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, port);
        match rustix::net::connect(&fd, &addr) {
            Err(rustix::io::Errno::INPROGRESS) => {}
            other => panic!("expected a connect in progress, got {other:?}"),
        }
        // Wait for the refusal to land (SO_ERROR set).
        let mut pfd = [rustix::event::PollFd::new(
            &fd,
            rustix::event::PollFlags::OUT,
        )];
        rustix::event::poll(&mut pfd, None).unwrap();
        let mut c = connecting(fd);
        assert_eq!(
            c.on_host_ready(EventFlags::OUT | EventFlags::ERR | EventFlags::HUP),
            Action::Kill(Fault::ConnectFailed)
        );
    }

    #[test]
    fn guest_packets_while_connecting() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = connecting(a.into());
        // Data before RESPONSE is out of place; RST ends it quietly.
        let mut data = *b"x";
        assert_eq!(guest_rw(&mut c, &mut data), Action::Kill(Fault::Protocol));
        let mut c = connecting(UnixStream::pair().unwrap().0.into());
        assert_eq!(guest(&mut c, VsockOp::Rst, 0), Action::Remove);
        // The deadline kills it when the connect never ends.
        let mut c = connecting(UnixStream::pair().unwrap().0.into());
        let at = c.deadline().unwrap();
        assert_eq!(c.timed_out(at), Action::Kill(Fault::Timeout));
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
        let r = region(&mut data);
        assert!(matches!(
            c.send_guest_data(&[r], 1001, false, &mut iov),
            Err(SendError::CreditOverrun)
        ));
        assert_eq!(c.recv_cnt.0, 0);
    }

    #[test]
    fn guest_request_makes_peer_init_and_sending_response_establishes() {
        let (fd, _peer) = UnixStream::pair().unwrap();
        let hdr = packet(VsockOp::Request, 0, 0).hdr;
        let mut c = Conn::new_peer_init(fd.into(), VsockType::Stream, &hdr, 1000);
        assert_eq!(c.key(), (1, 2));
        assert_eq!(c.state, ConnState::PeerInit);
        assert_eq!(c.peer_credit(), 4096, "the REQUEST's credit is recorded");
        assert_eq!(c.deadline(), None);
        assert_eq!(c.next_control(), Some(VsockOp::Response));
        assert!(c.join_rx_list());
        let h = c.control_sent(3, VsockOp::Response);
        assert_eq!(
            (h.op, h.src_port, h.dst_port, h.dst_cid),
            (VsockOp::Response as u16, 1, 2, 3)
        );
        assert_eq!({ h.buf_alloc }, 1000);
        assert_eq!(c.state, ConnState::Established);
        assert_eq!(c.next_control(), None);
    }

    #[test]
    fn host_connect_makes_local_init_with_request_and_timer() {
        let (fd, _peer) = UnixStream::pair().unwrap();
        let before = Instant::now();
        let mut c = Conn::new_local_init(fd.into(), VsockType::Stream, 1 << 30, 52, 1000);
        assert_eq!(c.key(), (1 << 30, 52));
        assert_eq!(c.state, ConnState::LocalInit);
        assert!(c.deadline().is_some_and(|d| d >= before + CONN_TIMEOUT));
        assert_eq!(c.next_control(), Some(VsockOp::Request));
        let h = c.control_sent(3, VsockOp::Request);
        assert_eq!({ h.op }, VsockOp::Request as u16);
        assert_eq!(c.next_control(), None);
        assert_eq!(c.state, ConnState::LocalInit, "still waiting for RESPONSE");
    }

    #[test]
    fn response_establishes_a_host_initiated_connection() {
        let (fd, _peer) = UnixStream::pair().unwrap();
        let mut c = Conn::new_local_init(fd.into(), VsockType::Stream, 1, 2, 1000);
        assert_eq!(guest(&mut c, VsockOp::Response, 0), Action::SendOk);
        assert_eq!(c.state, ConnState::Established);
        assert_eq!(c.deadline(), None, "the request timer is off");
    }

    #[test]
    fn response_request_or_invalid_out_of_place_kill() {
        for state in [
            ConnState::PeerInit,
            ConnState::Established,
            ConnState::LocalClosed,
        ] {
            let (mut c, _peer) = stream_pair(state);
            assert_eq!(
                guest(&mut c, VsockOp::Response, 0),
                Action::Kill(Fault::Protocol)
            );
        }
        let (mut c, _peer) = stream_pair(ConnState::Established);
        assert_eq!(
            guest(&mut c, VsockOp::Request, 0),
            Action::Kill(Fault::Protocol)
        );
        assert_eq!(
            guest(&mut c, VsockOp::Invalid, 0),
            Action::Kill(Fault::Protocol)
        );
    }

    #[test]
    fn rst_removes_in_every_state() {
        use ConnState::*;
        for state in [
            LocalInit,
            PeerInit,
            Established,
            LocalClosed,
            PeerClosed,
            Killed,
        ] {
            let (mut c, _peer) = stream_pair(state);
            assert_eq!(guest(&mut c, VsockOp::Rst, 0), Action::Remove, "{state:?}");
        }
    }

    #[test]
    fn a_killed_connection_sends_rst_and_waits_for_the_guests() {
        let (mut c, mut peer) = stream_pair(ConnState::Established);
        c.deadline = Some(Instant::now());
        c.pending = PENDING_CREDIT_UPDATE | PENDING_SHUTDOWN;
        assert!(c.kill());
        assert_eq!(c.state, ConnState::Killed);
        assert_eq!(c.deadline(), None);
        assert_eq!(c.next_control(), Some(VsockOp::Rst), "only RST is left");
        assert!(!c.kill(), "once");
        let mut buf = [0u8; 8];
        assert_eq!(
            peer.read(&mut buf).unwrap(),
            0,
            "the host socket is shut down"
        );
        for op in [
            VsockOp::Rw,
            VsockOp::Shutdown,
            VsockOp::CreditRequest,
            VsockOp::Request,
        ] {
            assert_eq!(guest(&mut c, op, 0), Action::Ignore, "{op:?}");
        }
        assert_eq!(
            c.on_rw_batch(&[], 0, &mut sys::IovScratch::default()),
            Action::Ignore
        );
        assert_eq!(c.pending, PENDING_RST);
        let h = c.control_sent(3, VsockOp::Rst);
        assert_eq!({ h.op }, VsockOp::Rst as u16);
        assert_eq!(c.next_control(), None);
        assert_eq!(guest(&mut c, VsockOp::Rst, 0), Action::Remove);
    }

    #[test]
    fn a_packet_of_the_wrong_socket_type_kills() {
        let (mut c, _peer) = stream_pair(ConnState::Established);
        let mut pkt = packet(VsockOp::CreditUpdate, 0, 0);
        pkt.ty = VsockType::Seqpacket;
        pkt.hdr.type_ = VsockType::Seqpacket as u16;
        let mut iov = sys::IovScratch::default();
        assert_eq!(
            c.on_guest_packet(&pkt, &[], &mut iov),
            Action::Kill(Fault::WrongType)
        );
        assert_eq!(c.peer_credit(), 0, "its credit fields are not taken");
    }

    #[test]
    fn credit_update_records_the_guests_credit() {
        let (mut c, _peer) = stream_pair(ConnState::Established);
        assert!(c.ask_credit());
        assert_eq!(guest(&mut c, VsockOp::CreditUpdate, 0), Action::Continue);
        assert_eq!(c.peer_credit(), 4096);
        assert!(!c.credit_requested, "the request is answered");
    }

    #[test]
    fn credit_request_queues_a_credit_update() {
        let (mut c, _peer) = stream_pair(ConnState::Established);
        assert_eq!(guest(&mut c, VsockOp::CreditRequest, 0), Action::Continue);
        assert_eq!(c.next_control(), Some(VsockOp::CreditUpdate));
        let h = c.control_sent(3, VsockOp::CreditUpdate);
        assert_eq!((h.op, h.fwd_cnt), (VsockOp::CreditUpdate as u16, 0));
        assert_eq!(c.next_control(), None);
    }

    #[test]
    fn rw_goes_to_the_host_socket() {
        let (mut c, mut peer) = stream_pair(ConnState::Established);
        let mut data = *b"hello";
        assert_eq!(guest_rw(&mut c, &mut data), Action::Forwarded(5));
        let mut buf = [0u8; 5];
        peer.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        assert_eq!((c.recv_cnt.0, c.fwd_cnt.0), (5, 5));
        assert!(!c.tx_pending());
        assert_eq!(c.after_host_write(), Action::Continue);
    }

    #[test]
    fn rw_before_the_connection_is_up_or_after_shutdown_send_kills() {
        for state in [ConnState::LocalInit, ConnState::PeerInit] {
            let (mut c, _peer) = stream_pair(state);
            assert_eq!(guest_rw(&mut c, &mut [1]), Action::Kill(Fault::Protocol));
        }
        let (mut c, _peer) = stream_pair(ConnState::Established);
        let send = ShutdownFlags::SEND.bits();
        assert_eq!(guest(&mut c, VsockOp::Shutdown, send), Action::Continue);
        assert_eq!(guest_rw(&mut c, &mut [1]), Action::Kill(Fault::Protocol));
        assert!(!c.accept_stream_rw(&packet(VsockOp::Rw, 0, 1).hdr));
    }

    #[test]
    fn rw_beyond_the_credit_kills() {
        let (mut c, _peer) = stream_pair(ConnState::Established);
        let mut data = vec![0u8; 1001];
        assert_eq!(
            guest_rw(&mut c, &mut data),
            Action::Kill(Fault::CreditOverrun)
        );
    }

    #[test]
    fn rw_batches_only_on_open_streams() {
        let hdr = packet(VsockOp::Rw, 0, 1).hdr;
        let (mut c, mut peer) = stream_pair(ConnState::LocalInit);
        assert!(!c.accept_stream_rw(&hdr));
        c.state = ConnState::LocalClosed;
        assert!(c.accept_stream_rw(&hdr));
        assert_eq!(c.peer_credit(), 4096, "credit recorded on acceptance");
        let mut data = *b"ab";
        let mut iov = sys::IovScratch::default();
        assert_eq!(
            c.on_rw_batch(&[region(&mut data)], 2, &mut iov),
            Action::Forwarded(2)
        );
        let mut buf = [0u8; 2];
        peer.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ab");

        let (fd, _other) = sys::seqpacket_pair().unwrap();
        let mut s = Conn::new(fd, VsockType::Seqpacket, 1, 2, ConnState::Established, 1000);
        assert!(
            !s.accept_stream_rw(&hdr),
            "seqpacket data goes one packet at a time"
        );
    }

    #[test]
    fn shutdown_send_shuts_the_host_write_side() {
        let (mut c, mut peer) = stream_pair(ConnState::Established);
        let send = ShutdownFlags::SEND.bits();
        assert_eq!(guest(&mut c, VsockOp::Shutdown, send), Action::Continue);
        assert!(c.host_wr_shut);
        let mut buf = [0u8; 1];
        assert_eq!(
            peer.read(&mut buf).unwrap(),
            0,
            "the host reads end-of-file"
        );
        assert_eq!(c.state, ConnState::Established, "the host may still send");
        assert!(c.may_read_host());
        // SHUTDOWN RCV: the device reads no more for the guest.
        let rcv = ShutdownFlags::RCV.bits();
        let (mut c, _peer) = stream_pair(ConnState::Established);
        assert_eq!(guest(&mut c, VsockOp::Shutdown, rcv), Action::Continue);
        assert!(!c.may_read_host());
    }

    #[test]
    fn shutdown_both_with_nothing_buffered_closes() {
        let (mut c, _peer) = stream_pair(ConnState::Established);
        assert_eq!(guest(&mut c, VsockOp::Shutdown, BOTH), Action::Close);
        // The same in two steps.
        let (mut c, _peer) = stream_pair(ConnState::LocalClosed);
        let rcv = ShutdownFlags::RCV.bits();
        assert_eq!(guest(&mut c, VsockOp::Shutdown, rcv), Action::Continue);
        let send = ShutdownFlags::SEND.bits();
        assert_eq!(guest(&mut c, VsockOp::Shutdown, send), Action::Close);
    }

    #[test]
    fn shutdown_both_with_bytes_buffered_drains_then_closes() {
        let (mut c, mut peer) = stream_pair(ConnState::Established);
        fill_host_socket(&c);
        let mut data = [7u8; 100];
        assert_eq!(guest_rw(&mut c, &mut data), Action::Forwarded(100));
        assert!(c.tx_pending(), "the host socket took nothing");
        let Action::ArmTimer(at) = guest(&mut c, VsockOp::Shutdown, BOTH) else {
            panic!("PeerClosed arms the timer");
        };
        assert_eq!(c.state, ConnState::PeerClosed);
        assert_eq!(c.deadline(), Some(at));
        assert_eq!(c.on_host_ready(EventFlags::OUT), Action::Continue);
        assert_eq!(c.after_host_write(), Action::Continue, "bytes still wait");
        // The host reads everything; the buffer drains on the next EPOLLOUT.
        peer.set_nonblocking(true).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        while peer.read(&mut buf).is_ok_and(|n| n > 0) {}
        assert_eq!(c.on_host_ready(EventFlags::OUT), Action::Continue);
        assert!(!c.tx_pending());
        assert!(c.host_wr_shut);
        assert_eq!(c.after_host_write(), Action::Close);
        assert_eq!(
            c.on_host_ready(EventFlags::OUT),
            Action::Ignore,
            "nothing left"
        );
    }

    #[test]
    fn shutdown_before_the_connection_is_up_kills() {
        for state in [ConnState::LocalInit, ConnState::PeerInit] {
            let (mut c, _peer) = stream_pair(state);
            assert_eq!(
                guest(&mut c, VsockOp::Shutdown, BOTH),
                Action::Kill(Fault::Protocol)
            );
        }
    }

    #[test]
    fn a_failing_host_socket_kills_on_write() {
        let (mut c, peer) = stream_pair(ConnState::Established);
        drop(peer);
        assert_eq!(guest_rw(&mut c, &mut [1, 2]), Action::Kill(Fault::HostIo));
    }

    #[test]
    fn after_host_write_queues_a_credit_update_when_due() {
        let (mut c, mut peer) = stream_pair(ConnState::Established);
        assert_eq!(guest(&mut c, VsockOp::CreditUpdate, 0), Action::Continue);
        let mut data = [1u8; 499];
        assert_eq!(guest_rw(&mut c, &mut data), Action::Forwarded(499));
        assert_eq!(c.after_host_write(), Action::Continue);
        assert_eq!(c.next_control(), None, "499 < half of 1000");
        assert_eq!(guest_rw(&mut c, &mut [1]), Action::Forwarded(1));
        assert_eq!(c.after_host_write(), Action::Continue);
        assert_eq!(c.next_control(), Some(VsockOp::CreditUpdate));
        let mut buf = [0u8; 500];
        peer.read_exact(&mut buf).unwrap();
    }

    #[test]
    fn host_readiness_is_recorded() {
        let (mut c, _peer) = stream_pair(ConnState::Established);
        c.host_drained();
        assert!(!c.may_read_host());
        assert_eq!(c.on_host_ready(EventFlags::IN), Action::Ignore);
        assert!(c.may_read_host());
        assert!(!c.host_rdhup());
        assert_eq!(c.on_host_ready(EventFlags::RDHUP), Action::Ignore);
        assert!(c.host_rdhup() && !c.hup);
        assert_eq!(c.on_host_ready(EventFlags::ERR), Action::Ignore);
        assert!(c.hup);
    }

    #[test]
    fn host_eof_queues_shutdown_send() {
        let (mut c, _peer) = stream_pair(ConnState::Established);
        c.on_host_eof();
        assert!(!c.may_read_host());
        assert_eq!(c.next_control(), Some(VsockOp::Shutdown));
        let h = c.control_sent(3, VsockOp::Shutdown);
        assert_eq!({ h.flags }, ShutdownFlags::SEND.bits());
        assert_eq!(c.host_closed(), Action::Ignore, "the host did not hang up");
        assert_eq!(c.state, ConnState::Established, "the guest may still send");
    }

    #[test]
    fn host_hangup_after_eof_closes_locally_with_a_timer() {
        let (mut c, _peer) = stream_pair(ConnState::Established);
        assert_eq!(c.on_host_ready(EventFlags::HUP), Action::Ignore);
        c.on_host_eof();
        assert_eq!(c.next_control(), None, "left to the next RX turn");
        assert!(c.join_rx_list(), "which the connection asks for");
        let Action::ArmTimer(at) = c.host_closed() else {
            panic!("LocalClosed arms the timer");
        };
        assert_eq!(c.state, ConnState::LocalClosed);
        assert_eq!(c.deadline(), Some(at));
        assert_eq!(c.host_closed(), Action::Ignore, "once");
        assert_eq!(c.next_control(), Some(VsockOp::Shutdown));
        let h = c.control_sent(3, VsockOp::Shutdown);
        assert_eq!({ h.flags }, BOTH);
        // The guest answers with RST, or the timer fires.
        assert_eq!(c.timed_out(at), Action::Kill(Fault::Timeout));
        assert_eq!(guest(&mut c, VsockOp::Rst, 0), Action::Remove);
    }

    #[test]
    fn timers_fire_only_for_the_current_deadline() {
        let (fd, _peer) = UnixStream::pair().unwrap();
        let mut c = Conn::new_local_init(fd.into(), VsockType::Stream, 1, 2, 1000);
        let at = c.deadline().unwrap();
        assert_eq!(c.timed_out(at - Duration::from_millis(1)), Action::Ignore);
        assert_eq!(c.timed_out(at), Action::Kill(Fault::Timeout));
        assert_eq!(guest(&mut c, VsockOp::Response, 0), Action::SendOk);
        assert_eq!(c.timed_out(at), Action::Ignore, "answered in time");
        assert!(c.kill());
        assert_eq!(c.deadline(), None);
    }

    #[test]
    fn out_of_credit_asks_once_until_credit_comes() {
        let (mut c, _peer) = stream_pair(ConnState::Established);
        assert_eq!(c.peer_credit(), 0);
        assert!(c.join_rx_list(), "no credit, not asked yet");
        c.leave_rx_list();
        assert!(c.ask_credit());
        assert_eq!(c.next_control(), Some(VsockOp::CreditRequest));
        let _ = c.control_sent(3, VsockOp::CreditRequest);
        assert!(!c.ask_credit(), "unanswered");
        assert!(!c.join_rx_list(), "nothing to do until the guest answers");
        assert_eq!(guest(&mut c, VsockOp::CreditUpdate, 0), Action::Continue);
        assert!(c.join_rx_list());
        let h = c.data_sent(3, 4096, 0);
        assert_eq!((h.op, h.len), (VsockOp::Rw as u16, 4096));
        assert_eq!(c.peer_credit(), 0);
        assert!(c.ask_credit(), "asks again");
    }

    #[test]
    fn control_packets_go_most_urgent_first() {
        let (mut c, _peer) = stream_pair(ConnState::PeerInit);
        c.pending = PENDING_RESPONSE
            | PENDING_REQUEST
            | PENDING_SHUTDOWN
            | PENDING_CREDIT_REQUEST
            | PENDING_CREDIT_UPDATE;
        let mut sent = Vec::new();
        while let Some(op) = c.next_control() {
            let _ = c.control_sent(3, op);
            sent.push(op);
        }
        // Every packet carries fwd_cnt, so the CREDIT_UPDATE goes with the first.
        use VsockOp::*;
        assert_eq!(sent, [Response, Request, Shutdown, CreditRequest]);
        c.pending = PENDING_RESPONSE | PENDING_SHUTDOWN;
        assert!(c.kill());
        assert_eq!(c.next_control(), Some(Rst));
        let _ = c.control_sent(3, Rst);
        assert_eq!(c.next_control(), None);
    }

    #[test]
    fn the_rx_list_holds_a_connection_once() {
        let (mut c, _peer) = stream_pair(ConnState::PeerInit);
        assert!(!c.join_rx_list(), "nothing to send");
        assert!(c.rejoin_rx_list(), "a cut-short turn rejoins anyway");
        assert!(!c.rejoin_rx_list());
        c.leave_rx_list();
        c.pending = PENDING_RESPONSE;
        assert!(c.join_rx_list());
        assert!(!c.join_rx_list());
    }

    #[test]
    fn seqpacket_messages_end_at_eom() {
        let (fd, peer) = sys::seqpacket_pair().unwrap();
        let mut c = Conn::new(fd, VsockType::Seqpacket, 1, 2, ConnState::Established, 1000);
        let mut pkt = packet(VsockOp::Rw, 0, 3);
        pkt.ty = VsockType::Seqpacket;
        pkt.hdr.type_ = VsockType::Seqpacket as u16;
        let mut iov = sys::IovScratch::default();
        let mut a = *b"abc";
        assert_eq!(
            c.on_guest_packet(&pkt, &[region(&mut a)], &mut iov),
            Action::Forwarded(3)
        );
        assert!(!c.tx_pending(), "a message in the making");
        pkt.hdr.flags = SeqpacketFlags::EOM.bits();
        pkt.hdr.len = 2;
        let mut b = *b"de";
        assert_eq!(
            c.on_guest_packet(&pkt, &[region(&mut b)], &mut iov),
            Action::Forwarded(2)
        );
        let mut buf = [0u8; 16];
        let n = sys::recv(peer.as_fd(), &mut buf, RecvFlags::empty()).unwrap();
        assert_eq!(&buf[..n], b"abcde", "one host message");
    }
}
