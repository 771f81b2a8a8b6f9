//! The AF_UNIX muxer: host sockets, the epoll set they live in, timers, and the
//! delivery of packets and data to the guest's RX queue.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::num::Wrapping;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use outboard_protocol::vsock::{
    SeqpacketFlags, ShutdownFlags, VsockHeader, VsockOp, VsockType, MAX_PKT_BUF_SIZE,
    VMADDR_CID_HOST, VMADDR_PORT_ANY,
};

use super::conn::{
    Conn, ConnKey, ConnState, SendError, PENDING_CREDIT_REQUEST, PENDING_CREDIT_UPDATE,
    PENDING_REQUEST, PENDING_RESPONSE, PENDING_RST, PENDING_SHUTDOWN,
};
use super::packet::{write_rx_header, Refused, TxPacket};
use super::sys::{self, IOV_MAX};
use super::{
    VsockError, VsockMetrics, CONN_TIMEOUT, HOST_PORT_BASE, MAX_CONNECT_LINE,
    MAX_PENDING_HOST_CONNECTIONS, MAX_SEQPACKET_MSG,
};
use crate::virtio::{slice_regions, DescChain, IoRegion, QueueError, VirtQueue};

const TOKEN_LISTENER: u64 = 0;
const TOKEN_SEQ_LISTENER: u64 = 1;
const TOKEN_TIMER: u64 = 2;
const TOKEN_INBOX: u64 = 3;
const TOKEN_PENDING: u64 = 1 << 32;
const TOKEN_CONN: u64 = 2 << 32;
const TOKEN_KIND: u64 = 0xffff_ffff << 32;

/// RST replies to packets of unknown connections waiting for RX buffers.
const MAX_ORPHAN_RSTS: usize = 256;
/// Most payload bytes one read from a host socket puts into guest buffers.
const MAX_RX_BATCH: u32 = 256 * 1024;
/// Most RX chains one read fills.
const MAX_RX_CHAINS: usize = 64;
/// Largest host seqpacket message the device forwards.
const MAX_SEQ_RX_MSG: usize = 1 << 20;
/// Epoll events taken per wait.
const EVENTS_PER_WAIT: usize = 64;

/// A connection's socket events while its TX buffer is empty. EPOLLOUT is asked for
/// only while bytes wait (`CONN_EVENTS_OUT`): edge-triggered EPOLLOUT fires every time
/// the host reader drains the socket, which would wake the device once per host read.
const CONN_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
/// A connection's socket events while bytes wait in its TX buffer.
const CONN_EVENTS_OUT: u32 = CONN_EVENTS | libc::EPOLLOUT as u32;
const PENDING_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET) as u32;

/// A host client that connected to a listener and has not sent `CONNECT <port>` yet.
#[derive(Debug)]
struct PendingHost {
    fd: OwnedFd,
    ty: VsockType,
    deadline: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimerKey {
    Conn(ConnKey),
    Pending(RawFd),
}

/// What one turn of a connection on the RX queue achieved.
#[derive(Debug, PartialEq, Eq)]
enum Turn {
    /// It did something; look at it again later if it still wants RX.
    Progress,
    /// It has nothing it can do now.
    Idle,
    /// The RX queue ran out of buffers.
    Starved,
}

/// Parses `CONNECT <port>` (the word case-insensitive, the newline already removed).
pub(crate) fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split_ascii_whitespace();
    let cmd = words.next()?;
    let port = words.next()?;
    if words.next().is_some() || !cmd.eq_ignore_ascii_case("connect") {
        return None;
    }
    port.parse().ok()
}

/// The muxer.
pub(crate) struct Muxer {
    guest_cid: u64,
    tx_buf_size: u32,
    max_connections: usize,
    uds_path: PathBuf,
    epoll: OwnedFd,
    timer: OwnedFd,
    timer_armed: Option<Instant>,
    listener: OwnedFd,
    seq_listener: OwnedFd,
    conns: HashMap<ConnKey, Conn>,
    fd_keys: HashMap<RawFd, ConnKey>,
    pending: HashMap<RawFd, PendingHost>,
    local_ports: HashMap<u32, u32>,
    next_local_port: u32,
    rx_list: VecDeque<ConnKey>,
    orphan_rsts: VecDeque<VsockHeader>,
    deadlines: VecDeque<(Instant, TimerKey)>,
    seqpacket: bool,
    /// The sibling inbox's eventfd reported.
    inbox_signalled: bool,
    metrics: Arc<VsockMetrics>,
    events: Vec<libc::epoll_event>,
    iov: sys::IovScratch,
    chains: Vec<DescChain>,
    regions: Vec<IoRegion>,
    caps: Vec<usize>,
}

impl Muxer {
    /// Binds the listeners and creates the epoll set.
    pub fn new(
        guest_cid: u64,
        uds_path: PathBuf,
        tx_buf_size: u32,
        max_connections: usize,
        metrics: Arc<VsockMetrics>,
    ) -> Result<Self, VsockError> {
        let epoll = sys::epoll_create().map_err(VsockError::Epoll)?;
        let timer = sys::timerfd_create().map_err(VsockError::Timer)?;
        let listen = |path: PathBuf, ty| {
            sys::unix_listen(&path, ty).map_err(|source| VsockError::Listen {
                path: path.display().to_string(),
                source,
            })
        };
        let listener = listen(uds_path.clone(), libc::SOCK_STREAM)?;
        let mut seq_path = uds_path.clone().into_os_string();
        seq_path.push("_seqpacket");
        let seq_listener = listen(PathBuf::from(seq_path), libc::SOCK_SEQPACKET)?;
        let add = |fd: RawFd, token| {
            sys::epoll_ctl(&epoll, libc::EPOLL_CTL_ADD, fd, libc::EPOLLIN as u32, token)
                .map_err(VsockError::Epoll)
        };
        add(listener.as_raw_fd(), TOKEN_LISTENER)?;
        add(seq_listener.as_raw_fd(), TOKEN_SEQ_LISTENER)?;
        add(timer.as_raw_fd(), TOKEN_TIMER)?;
        Ok(Muxer {
            guest_cid,
            tx_buf_size,
            max_connections,
            uds_path,
            epoll,
            timer,
            timer_armed: None,
            listener,
            seq_listener,
            conns: HashMap::new(),
            fd_keys: HashMap::new(),
            pending: HashMap::new(),
            local_ports: HashMap::new(),
            next_local_port: HOST_PORT_BASE,
            rx_list: VecDeque::new(),
            orphan_rsts: VecDeque::new(),
            deadlines: VecDeque::new(),
            seqpacket: false,
            inbox_signalled: false,
            metrics,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_PER_WAIT],
            iov: sys::IovScratch::default(),
            chains: Vec::new(),
            regions: Vec::new(),
            caps: Vec::new(),
        })
    }

    /// The epoll set the owner polls.
    pub fn epoll_fd(&self) -> BorrowedFd<'_> {
        self.epoll.as_fd()
    }

    /// Adds the sibling inbox's eventfd (level-triggered) or a link to a sibling in
    /// another process (`edge`: reported once per arrival) to the epoll set.
    pub fn watch_inbox(&mut self, fd: RawFd, edge: bool) -> Result<(), VsockError> {
        let events = if edge {
            (libc::EPOLLIN | libc::EPOLLET) as u32
        } else {
            libc::EPOLLIN as u32
        };
        sys::epoll_ctl(&self.epoll, libc::EPOLL_CTL_ADD, fd, events, TOKEN_INBOX)
            .map_err(VsockError::Epoll)
    }

    /// Whether the sibling inbox's eventfd reported since the last call.
    pub fn take_inbox_event(&mut self) -> bool {
        std::mem::take(&mut self.inbox_signalled)
    }

    /// Whether the driver negotiated SEQPACKET.
    pub fn set_seqpacket(&mut self, enabled: bool) {
        self.seqpacket = enabled;
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether anything waits for the RX queue.
    pub fn has_rx(&self) -> bool {
        !self.orphan_rsts.is_empty() || !self.rx_list.is_empty()
    }

    /// Drops every connection and pending host client (host sockets are closed).
    pub fn reset(&mut self) {
        let removed = self.conns.len() as u64;
        for (_, conn) in self.conns.drain() {
            let _ = sys::epoll_ctl(&self.epoll, libc::EPOLL_CTL_DEL, conn.fd.as_raw_fd(), 0, 0);
        }
        VsockMetrics::add(&self.metrics.conns_removed, removed);
        for (fd, _) in self.pending.drain() {
            let _ = sys::epoll_ctl(&self.epoll, libc::EPOLL_CTL_DEL, fd, 0, 0);
        }
        self.fd_keys.clear();
        self.local_ports.clear();
        self.rx_list.clear();
        self.orphan_rsts.clear();
        self.deadlines.clear();
        self.rearm_timer();
    }

    fn schedule(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if !conn.in_rx_list && conn.wants_rx() {
                conn.in_rx_list = true;
                self.rx_list.push_back(key);
            }
        }
    }

    fn push_deadline(&mut self, at: Instant, key: TimerKey) {
        let live = self.max_connections + MAX_PENDING_HOST_CONNECTIONS;
        if self.deadlines.len() >= 4 * live {
            let conns = &self.conns;
            let pending = &self.pending;
            self.deadlines.retain(|(d, k)| match k {
                TimerKey::Conn(k) => conns.get(k).is_some_and(|c| c.deadline == Some(*d)),
                TimerKey::Pending(fd) => pending.get(fd).is_some_and(|p| p.deadline == *d),
            });
        }
        self.deadlines.push_back((at, key));
    }

    /// Arms the timerfd for the earliest deadline.
    pub fn rearm_timer(&mut self) {
        let front = self.deadlines.front().map(|(d, _)| *d);
        if front == self.timer_armed {
            return;
        }
        let after = front.map(|d| d.saturating_duration_since(Instant::now()));
        if sys::timerfd_arm(&self.timer, after).is_err() {
            VsockMetrics::inc(&self.metrics.err_muxer);
        }
        self.timer_armed = front;
    }

    fn set_deadline(&mut self, key: ConnKey) {
        let at = Instant::now() + CONN_TIMEOUT;
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.deadline = Some(at);
            self.push_deadline(at, TimerKey::Conn(key));
        }
    }

    fn orphan_rst(&mut self, src_port: u32, dst_port: u32, type_: u16) {
        self.orphan_rst_from(VMADDR_CID_HOST, src_port, dst_port, type_);
    }

    /// Queues an RST to the guest from `(cid, dst_port)` to its port `src_port`: the
    /// answer to a guest packet `src_port -> (cid, dst_port)` that has no connection.
    pub fn orphan_rst_from(&mut self, cid: u64, src_port: u32, dst_port: u32, type_: u16) {
        if self.orphan_rsts.len() >= MAX_ORPHAN_RSTS {
            VsockMetrics::inc(&self.metrics.err_rst_dropped);
            return;
        }
        self.orphan_rsts.push_back(VsockHeader {
            src_cid: cid,
            dst_cid: self.guest_cid,
            src_port: dst_port,
            dst_port: src_port,
            type_,
            op: VsockOp::Rst as u16,
            ..Default::default()
        });
    }

    /// Answers a refused guest packet with RST when its header named a connection.
    /// Unknown types are answered as stream, the only type every driver knows.
    pub fn refuse(&mut self, refused: &Refused) {
        if let Some((src_port, dst_port, ty)) = refused.reply {
            let ty = VsockType::from_raw(ty).map_or(VsockType::Stream as u16, |t| t as u16);
            let key = (dst_port, src_port);
            if self.conns.contains_key(&key) {
                self.kill(key);
            } else {
                self.orphan_rst(src_port, dst_port, ty);
            }
        }
    }

    /// Resets a connection: the host socket is shut down now, RST goes to the guest,
    /// then the connection is removed.
    fn kill(&mut self, key: ConnKey) {
        VsockMetrics::inc(&self.metrics.conns_killed);
        self.close_with_rst(key);
    }

    fn close_with_rst(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if conn.state == ConnState::Killed {
                return;
            }
            conn.state = ConnState::Killed;
            conn.pending = PENDING_RST;
            conn.deadline = None;
            let _ = sys::shutdown(conn.fd.as_fd(), libc::SHUT_RDWR);
            let _ = sys::epoll_ctl(&self.epoll, libc::EPOLL_CTL_DEL, conn.fd.as_raw_fd(), 0, 0);
            self.fd_keys.remove(&conn.fd.as_raw_fd());
            self.schedule(key);
        }
    }

    fn remove(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            let fd = conn.fd.as_raw_fd();
            if self.fd_keys.get(&fd) == Some(&key) {
                self.fd_keys.remove(&fd);
                let _ = sys::epoll_ctl(&self.epoll, libc::EPOLL_CTL_DEL, fd, 0, 0);
            }
            if let Some(n) = self.local_ports.get_mut(&conn.local_port) {
                *n -= 1;
                if *n == 0 {
                    self.local_ports.remove(&conn.local_port);
                }
            }
            VsockMetrics::inc(&self.metrics.conns_removed);
        }
    }

    /// Registers `conn` in the epoll set (`op` is ADD, or MOD for a former pending host
    /// client) and in the tables.
    fn insert(&mut self, conn: Conn, op: libc::c_int) -> bool {
        let key = (conn.local_port, conn.peer_port);
        let fd = conn.fd.as_raw_fd();
        let token = TOKEN_CONN | fd as u32 as u64;
        if sys::epoll_ctl(&self.epoll, op, fd, CONN_EVENTS, token).is_err() {
            VsockMetrics::inc(&self.metrics.err_muxer);
            return false;
        }
        *self.local_ports.entry(conn.local_port).or_insert(0) += 1;
        self.fd_keys.insert(fd, key);
        self.conns.insert(key, conn);
        VsockMetrics::inc(&self.metrics.conns_added);
        self.schedule(key);
        true
    }

    fn alloc_local_port(&mut self) -> Option<u32> {
        // At most `max_connections` local ports are in use, so this finds a free one.
        for _ in 0..=(self.max_connections + MAX_PENDING_HOST_CONNECTIONS) {
            let port = self.next_local_port;
            self.next_local_port = if port >= VMADDR_PORT_ANY - 1 {
                HOST_PORT_BASE
            } else {
                port + 1
            };
            if !self.local_ports.contains_key(&port) {
                return Some(port);
            }
        }
        None
    }

    /// If `pkt` is stream data for a connection that can take it, records its credit
    /// fields and returns the connection for [`Muxer::handle_rw_batch`].
    pub fn take_rw(&mut self, pkt: &TxPacket) -> Option<ConnKey> {
        if pkt.op != VsockOp::Rw || pkt.ty != VsockType::Stream {
            return None;
        }
        let h = pkt.hdr;
        let key = (h.dst_port, h.src_port);
        let conn = self.conns.get_mut(&key)?;
        let open = matches!(
            conn.state,
            ConnState::Established | ConnState::LocalClosed | ConnState::PeerClosed
        );
        if !open || conn.ty != VsockType::Stream || conn.peer_shut_send {
            return None;
        }
        conn.update_peer_credit(h.buf_alloc, h.fwd_cnt);
        Some(key)
    }

    /// Forwards the payload of consecutive RW packets that [`Muxer::take_rw`] accepted.
    pub fn handle_rw_batch(&mut self, key: ConnKey, payload: &[IoRegion], len: u32) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.state == ConnState::Killed {
            return;
        }
        match conn.send_guest_data(payload, len, false, &mut self.iov) {
            Ok(()) => VsockMetrics::add(&self.metrics.tx_bytes, u64::from(len)),
            Err(SendError::CreditOverrun) => {
                VsockMetrics::inc(&self.metrics.err_credit_overrun);
                self.kill(key);
                return;
            }
            Err(SendError::Io(e)) => {
                outboard_protocol::log_limited!(
                    log::Level::Debug,
                    "vsock: host write on {key:?} failed: {e}"
                );
                VsockMetrics::inc(&self.metrics.err_host_io);
                self.kill(key);
                return;
            }
        }
        self.after_host_write(key);
    }

    /// Handles one valid guest packet.
    pub fn handle_tx(&mut self, pkt: &TxPacket, payload: &[IoRegion]) {
        let h = pkt.hdr;
        let key = (h.dst_port, h.src_port);
        if pkt.ty == VsockType::Seqpacket && !self.seqpacket {
            VsockMetrics::inc(&self.metrics.err_unsupported);
            if pkt.op != VsockOp::Rst {
                self.orphan_rst(h.src_port, h.dst_port, h.type_);
            }
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            match pkt.op {
                VsockOp::Request => self.peer_connect(pkt),
                VsockOp::Rst => {}
                _ => {
                    VsockMetrics::inc(&self.metrics.err_no_connection);
                    self.orphan_rst(h.src_port, h.dst_port, h.type_);
                }
            }
            return;
        };
        if conn.state == ConnState::Killed {
            if pkt.op == VsockOp::Rst {
                self.remove(key);
            }
            return;
        }
        if conn.ty != pkt.ty {
            self.kill(key);
            return;
        }
        conn.update_peer_credit(h.buf_alloc, h.fwd_cnt);
        match (conn.state, pkt.op) {
            (_, VsockOp::Rst) => {
                self.remove(key);
                return;
            }
            (ConnState::LocalInit, VsockOp::Response) => {
                conn.state = ConnState::Established;
                conn.deadline = None;
                let line = format!("OK {}\n", conn.local_port);
                match sys::send(conn.fd.as_fd(), line.as_bytes()) {
                    Ok(n) if n == line.len() => {}
                    _ => {
                        VsockMetrics::inc(&self.metrics.err_host_io);
                        self.kill(key);
                        return;
                    }
                }
            }
            (
                ConnState::Established | ConnState::LocalClosed | ConnState::PeerClosed,
                VsockOp::Rw,
            ) if !conn.peer_shut_send => {
                let eom = SeqpacketFlags::from_bits_truncate(h.flags).contains(SeqpacketFlags::EOM);
                match conn.send_guest_data(payload, h.len, eom, &mut self.iov) {
                    Ok(()) => VsockMetrics::add(&self.metrics.tx_bytes, u64::from(h.len)),
                    Err(SendError::CreditOverrun) => {
                        VsockMetrics::inc(&self.metrics.err_credit_overrun);
                        self.kill(key);
                        return;
                    }
                    Err(SendError::Io(e)) => {
                        outboard_protocol::log_limited!(
                            log::Level::Debug,
                            "vsock: host write on {key:?} failed: {e}"
                        );
                        VsockMetrics::inc(&self.metrics.err_host_io);
                        self.kill(key);
                        return;
                    }
                }
            }
            (_, VsockOp::CreditUpdate) => {}
            (_, VsockOp::CreditRequest) => conn.pending |= PENDING_CREDIT_UPDATE,
            (
                ConnState::Established | ConnState::LocalClosed | ConnState::PeerClosed,
                VsockOp::Shutdown,
            ) => {
                let flags = ShutdownFlags::from_bits_truncate(h.flags);
                conn.peer_shut_rcv |= flags.contains(ShutdownFlags::RCV);
                conn.peer_shut_send |= flags.contains(ShutdownFlags::SEND);
                if conn.flush().is_err() {
                    VsockMetrics::inc(&self.metrics.err_host_io);
                    self.kill(key);
                    return;
                }
                if conn.peer_shut_rcv && conn.peer_shut_send {
                    if conn.tx_pending() {
                        conn.state = ConnState::PeerClosed;
                        self.set_deadline(key);
                    } else {
                        self.close_with_rst(key);
                    }
                    return;
                }
            }
            _ => {
                // REQUEST on a live connection, RESPONSE out of place, RW after the
                // guest's own SHUTDOWN SEND or before the connection is up, INVALID.
                VsockMetrics::inc(&self.metrics.err_no_connection);
                self.kill(key);
                return;
            }
        }
        self.after_host_write(key);
    }

    /// After guest data moved: ask for RX when a credit update is due, finish a
    /// peer-closed connection whose buffer drained.
    fn after_host_write(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.state == ConnState::PeerClosed && !conn.tx_pending() {
            self.close_with_rst(key);
            return;
        }
        if conn.needs_credit_update() {
            conn.pending |= PENDING_CREDIT_UPDATE;
        }
        if conn.tx_pending() {
            // Bytes wait: ask for EPOLLOUT (re-asking is harmless; with EPOLLET the
            // modification reports a socket that became writable meanwhile).
            self.set_out_interest(key, true);
        }
        self.schedule(key);
    }

    /// Adds or removes EPOLLOUT from the events of `key`'s socket (nothing when the
    /// connection is gone or out of the epoll set). Failing to add it would leave the
    /// buffered bytes stuck, so that kills the connection.
    fn set_out_interest(&mut self, key: ConnKey, out: bool) {
        let Some(conn) = self.conns.get(&key) else {
            return;
        };
        let fd = conn.fd.as_raw_fd();
        if self.fd_keys.get(&fd) != Some(&key) {
            return;
        }
        let events = if out { CONN_EVENTS_OUT } else { CONN_EVENTS };
        let token = TOKEN_CONN | fd as u32 as u64;
        if sys::epoll_ctl(&self.epoll, libc::EPOLL_CTL_MOD, fd, events, token).is_err() {
            VsockMetrics::inc(&self.metrics.err_muxer);
            if out {
                self.kill(key);
            }
        }
    }

    fn peer_connect(&mut self, pkt: &TxPacket) {
        let h = pkt.hdr;
        if self.conns.len() >= self.max_connections {
            VsockMetrics::inc(&self.metrics.err_conn_limit);
            self.orphan_rst(h.src_port, h.dst_port, h.type_);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        let dst_port = h.dst_port;
        path.push(format!("_{dst_port}"));
        let ty = match pkt.ty {
            VsockType::Stream => libc::SOCK_STREAM,
            VsockType::Seqpacket => libc::SOCK_SEQPACKET,
        };
        let fd = match sys::unix_connect(std::path::Path::new(&path), ty) {
            Ok(fd) => fd,
            Err(_) => {
                VsockMetrics::inc(&self.metrics.err_connect_failed);
                self.orphan_rst(h.src_port, h.dst_port, h.type_);
                return;
            }
        };
        let mut conn = Conn::new(
            fd,
            pkt.ty,
            h.dst_port,
            h.src_port,
            ConnState::PeerInit,
            self.buf_alloc(pkt.ty),
        );
        conn.update_peer_credit(h.buf_alloc, h.fwd_cnt);
        conn.pending = PENDING_RESPONSE;
        if !self.insert(conn, libc::EPOLL_CTL_ADD) {
            self.orphan_rst(h.src_port, h.dst_port, h.type_);
        }
    }

    fn buf_alloc(&self, ty: VsockType) -> u32 {
        match ty {
            VsockType::Stream => self.tx_buf_size,
            VsockType::Seqpacket => self.tx_buf_size.min(MAX_SEQPACKET_MSG),
        }
    }

    /// Handles what the epoll set reports (never blocks).
    pub fn process_events(&mut self) {
        for _ in 0..16 {
            let mut events = std::mem::take(&mut self.events);
            let n = match sys::epoll_wait_now(&self.epoll, &mut events) {
                Ok(n) => n,
                Err(_) => {
                    VsockMetrics::inc(&self.metrics.err_muxer);
                    0
                }
            };
            for ev in &events[..n] {
                let (token, bits) = (ev.u64, ev.events);
                self.dispatch(token, bits);
            }
            self.events = events;
            if n < EVENTS_PER_WAIT {
                break;
            }
        }
        self.rearm_timer();
    }

    fn dispatch(&mut self, token: u64, bits: u32) {
        match (token & TOKEN_KIND, token) {
            (0, TOKEN_LISTENER) => self.accept(VsockType::Stream),
            (0, TOKEN_SEQ_LISTENER) => self.accept(VsockType::Seqpacket),
            (0, TOKEN_TIMER) => self.on_timer(),
            (0, TOKEN_INBOX) => self.inbox_signalled = true,
            (TOKEN_PENDING, t) => self.pending_readable(t as u32 as RawFd),
            (TOKEN_CONN, t) => self.conn_event(t as u32 as RawFd, bits),
            _ => VsockMetrics::inc(&self.metrics.err_muxer),
        }
    }

    fn accept(&mut self, ty: VsockType) {
        let mut accepted = Vec::new();
        {
            let listener = match ty {
                VsockType::Stream => &self.listener,
                VsockType::Seqpacket => &self.seq_listener,
            };
            // The listener is level-triggered: what is not accepted now reports again.
            while accepted.len() <= MAX_PENDING_HOST_CONNECTIONS {
                match sys::accept(listener) {
                    Ok(fd) => accepted.push(fd),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        VsockMetrics::inc(&self.metrics.err_muxer);
                        break;
                    }
                }
            }
        }
        for fd in accepted {
            if self.pending.len() >= MAX_PENDING_HOST_CONNECTIONS
                || self.conns.len() >= self.max_connections
            {
                // Dropping the socket closes it: the client sees end-of-file.
                VsockMetrics::inc(&self.metrics.err_conn_limit);
                continue;
            }
            let raw = fd.as_raw_fd();
            let token = TOKEN_PENDING | raw as u32 as u64;
            if sys::epoll_ctl(&self.epoll, libc::EPOLL_CTL_ADD, raw, PENDING_EVENTS, token).is_err()
            {
                VsockMetrics::inc(&self.metrics.err_muxer);
                continue;
            }
            let deadline = Instant::now() + CONN_TIMEOUT;
            self.pending.insert(raw, PendingHost { fd, ty, deadline });
            self.push_deadline(deadline, TimerKey::Pending(raw));
        }
    }

    fn drop_pending(&mut self, fd: RawFd) {
        if self.pending.remove(&fd).is_some() {
            let _ = sys::epoll_ctl(&self.epoll, libc::EPOLL_CTL_DEL, fd, 0, 0);
        }
    }

    fn pending_readable(&mut self, fd: RawFd) {
        let Some(p) = self.pending.get(&fd) else {
            return;
        };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let line_len = match p.ty {
            VsockType::Stream => match sys::recv(p.fd.as_fd(), &mut buf, libc::MSG_PEEK) {
                Ok(0) => None,
                Ok(n) => match buf[..n].iter().position(|b| *b == b'\n') {
                    // Consume exactly the line; what follows is stream data.
                    Some(i) => match sys::recv(p.fd.as_fd(), &mut buf[..=i], 0) {
                        Ok(m) if m == i + 1 => Some(i),
                        _ => None,
                    },
                    None if n < MAX_CONNECT_LINE => return,
                    None => None,
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => None,
            },
            VsockType::Seqpacket => match sys::recv(p.fd.as_fd(), &mut buf, libc::MSG_TRUNC) {
                Ok(n) if n > 0 && n <= MAX_CONNECT_LINE => {
                    Some(if buf[n - 1] == b'\n' { n - 1 } else { n })
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                _ => None,
            },
        };
        let port = line_len.and_then(|n| parse_connect_line(&buf[..n]));
        let (Some(port), Some(local_port)) = (port, self.alloc_local_port()) else {
            VsockMetrics::inc(&self.metrics.err_bad_connect_line);
            self.drop_pending(fd);
            return;
        };
        if self.conns.len() >= self.max_connections {
            VsockMetrics::inc(&self.metrics.err_conn_limit);
            self.drop_pending(fd);
            return;
        }
        let Some(PendingHost { fd: sock, ty, .. }) = self.pending.remove(&fd) else {
            return;
        };
        let mut conn = Conn::new(
            sock,
            ty,
            local_port,
            port,
            ConnState::LocalInit,
            self.buf_alloc(ty),
        );
        conn.pending = PENDING_REQUEST;
        let key = (local_port, port);
        // The fd is in the epoll set already: re-register it under the connection token.
        if self.insert(conn, libc::EPOLL_CTL_MOD) {
            self.set_deadline(key);
        }
    }

    fn conn_event(&mut self, fd: RawFd, bits: u32) {
        let Some(&key) = self.fd_keys.get(&fd) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let bits = bits as libc::c_int;
        if bits & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) != 0 {
            conn.readable = true;
        }
        if bits & libc::EPOLLRDHUP != 0 {
            conn.rdhup = true;
        }
        if bits & (libc::EPOLLHUP | libc::EPOLLERR) != 0 {
            conn.rdhup = true;
            conn.hup = true;
        }
        if bits & libc::EPOLLOUT != 0 {
            if conn.tx_pending() {
                if conn.flush().is_err() {
                    VsockMetrics::inc(&self.metrics.err_host_io);
                    self.kill(key);
                    return;
                }
                // Re-asks for EPOLLOUT when bytes still wait.
                self.after_host_write(key);
            }
            // EPOLLOUT was asked for; once the buffer is empty it is not needed.
            if self.conns.get(&key).is_some_and(|c| !c.tx_pending()) {
                self.set_out_interest(key, false);
            }
        }
        self.schedule(key);
    }

    fn on_timer(&mut self) {
        sys::timerfd_clear(&self.timer);
        self.timer_armed = None;
        let now = Instant::now();
        while let Some(&(at, key)) = self.deadlines.front() {
            if at > now {
                break;
            }
            self.deadlines.pop_front();
            match key {
                TimerKey::Conn(k) => {
                    if self.conns.get(&k).is_some_and(|c| c.deadline == Some(at)) {
                        VsockMetrics::inc(&self.metrics.err_timeout);
                        self.kill(k);
                    }
                }
                TimerKey::Pending(fd) => {
                    if self.pending.get(&fd).is_some_and(|p| p.deadline == at) {
                        VsockMetrics::inc(&self.metrics.err_bad_connect_line);
                        self.drop_pending(fd);
                    }
                }
            }
        }
    }

    /// Pops an RX chain that can hold at least a header. Unusable chains are returned
    /// empty, unless other chains are held (`holding`): then the chain is un-popped and
    /// the caller stops, so that un-popping the held chains stays in order.
    fn pop_rx(&mut self, q: &mut dyn VirtQueue, slot: usize, holding: bool) -> bool {
        while self.chains.len() <= slot {
            self.chains.push(DescChain::default());
        }
        loop {
            let chain = &mut self.chains[slot];
            let bad = match q.pop(chain) {
                Ok(false) => return false,
                Ok(true) if chain.writable_len() >= VsockHeader::SIZE => return true,
                Ok(true) => {
                    VsockMetrics::inc(&self.metrics.err_rx_bad_buffer);
                    chain.head
                }
                Err(QueueError::BadChain { head, .. }) => {
                    VsockMetrics::inc(&self.metrics.err_queue);
                    head
                }
                Err(_) => {
                    VsockMetrics::inc(&self.metrics.err_queue);
                    return false;
                }
            };
            if holding {
                q.undo_pop();
                return false;
            }
            if q.add_used(bad, 0).is_err() {
                VsockMetrics::inc(&self.metrics.err_queue);
                return false;
            }
        }
    }

    fn put_used(&mut self, q: &mut dyn VirtQueue, slot: usize, hdr: &VsockHeader) -> bool {
        let chain = &self.chains[slot];
        let len = hdr.len;
        if !write_rx_header(chain, hdr)
            || q.add_used(chain.head, VsockHeader::SIZE as u32 + len)
                .is_err()
        {
            VsockMetrics::inc(&self.metrics.err_queue);
            return false;
        }
        VsockMetrics::inc(&self.metrics.rx_packets);
        VsockMetrics::add(&self.metrics.rx_bytes, u64::from(len));
        true
    }

    /// Fills the RX queue with what connections have for the guest, round robin.
    /// Returns how many chains were used and whether the queue ran dry.
    pub fn fill_rx(&mut self, q: &mut dyn VirtQueue) -> (usize, bool) {
        let mut used = 0;
        while let Some(hdr) = self.orphan_rsts.front().copied() {
            if !self.pop_rx(q, 0, false) {
                return (used, true);
            }
            self.put_used(q, 0, &hdr);
            used += 1;
            self.orphan_rsts.pop_front();
        }
        // Each connection gets one turn per pass; the list rotates.
        while let Some(key) = self.rx_list.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.in_rx_list = false;
            let (turn, n) = self.conn_turn(key, q);
            used += n;
            if turn == Turn::Starved {
                if let Some(conn) = self.conns.get_mut(&key) {
                    if !conn.in_rx_list {
                        conn.in_rx_list = true;
                        // A seqpacket message that needs more buffers than there are
                        // waits at the back, so it cannot hold up the others.
                        if conn.ty == VsockType::Seqpacket && n == 0 {
                            self.rx_list.push_back(key);
                        } else {
                            self.rx_list.push_front(key);
                        }
                    }
                }
                return (used, true);
            }
            if turn == Turn::Progress {
                self.schedule(key);
            }
        }
        (used, false)
    }

    fn conn_turn(&mut self, key: ConnKey, q: &mut dyn VirtQueue) -> (Turn, usize) {
        let mut used = 0;
        let guest_cid = self.guest_cid;
        // Control packets first.
        loop {
            let Some(conn) = self.conns.get_mut(&key) else {
                return (Turn::Idle, used);
            };
            if conn.host_eof && conn.hup && conn.state == ConnState::Established {
                conn.state = ConnState::LocalClosed;
                conn.shutdown_flags = (ShutdownFlags::RCV | ShutdownFlags::SEND).bits();
                conn.pending |= PENDING_SHUTDOWN;
                self.set_deadline(key);
                continue;
            }
            let pending = conn.pending;
            let op = if pending & PENDING_RST != 0 {
                VsockOp::Rst
            } else if pending & PENDING_RESPONSE != 0 {
                VsockOp::Response
            } else if pending & PENDING_REQUEST != 0 {
                VsockOp::Request
            } else if pending & PENDING_SHUTDOWN != 0 {
                VsockOp::Shutdown
            } else if pending & PENDING_CREDIT_REQUEST != 0 {
                VsockOp::CreditRequest
            } else if pending & PENDING_CREDIT_UPDATE != 0 {
                VsockOp::CreditUpdate
            } else {
                break;
            };
            if !self.pop_rx(q, 0, false) {
                return (Turn::Starved, used);
            }
            let Some(conn) = self.conns.get_mut(&key) else {
                q.undo_pop();
                return (Turn::Idle, used);
            };
            let flags = if op == VsockOp::Shutdown {
                conn.shutdown_flags
            } else {
                0
            };
            let hdr = conn.rx_header(guest_cid, op, 0, flags);
            match op {
                VsockOp::Rst => conn.pending = 0,
                VsockOp::Response => {
                    conn.pending &= !PENDING_RESPONSE;
                    conn.state = ConnState::Established;
                }
                VsockOp::Request => conn.pending &= !PENDING_REQUEST,
                VsockOp::Shutdown => conn.pending &= !PENDING_SHUTDOWN,
                VsockOp::CreditRequest => conn.pending &= !PENDING_CREDIT_REQUEST,
                _ => {}
            }
            if self.put_used(q, 0, &hdr) {
                used += 1;
            }
            if op == VsockOp::Rst {
                self.remove(key);
                return (Turn::Idle, used);
            }
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return (Turn::Idle, used);
        };
        if !conn.may_read_host() {
            return (Turn::Idle, used);
        }
        if conn.peer_credit() == 0 {
            if !conn.credit_requested {
                conn.credit_requested = true;
                conn.pending |= PENDING_CREDIT_REQUEST;
                return (Turn::Progress, used);
            }
            return (Turn::Idle, used);
        }
        let turn = match conn.ty {
            VsockType::Stream => self.read_stream(key, q, &mut used),
            VsockType::Seqpacket => self.read_seqpacket(key, q, &mut used),
        };
        (turn, used)
    }

    fn undo(q: &mut dyn VirtQueue, count: usize) {
        for _ in 0..count {
            q.undo_pop();
        }
    }

    fn on_host_eof(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.host_eof = true;
            conn.readable = false;
            if conn.hup {
                // Handled as LocalClosed by the next turn.
                return;
            }
            conn.shutdown_flags = ShutdownFlags::SEND.bits();
            conn.pending |= PENDING_SHUTDOWN;
        }
    }

    /// Pops chains for up to `budget` payload bytes; returns how many chains were
    /// popped (their payload regions are in `self.regions`, capacities in `self.caps`).
    fn gather_rx(&mut self, q: &mut dyn VirtQueue, budget: usize, max_chains: usize) -> usize {
        self.regions.clear();
        self.caps.clear();
        let mut total = 0;
        let mut n = 0;
        while total < budget && n < max_chains && self.regions.len() < IOV_MAX {
            if !self.pop_rx(q, n, n > 0) {
                break;
            }
            let chain = &self.chains[n];
            let room = chain
                .writable_len()
                .saturating_sub(VsockHeader::SIZE)
                .min(MAX_PKT_BUF_SIZE as usize)
                .min(budget - total);
            let before = self.regions.len();
            let mut got =
                slice_regions(&chain.writable, VsockHeader::SIZE, room, &mut self.regions);
            if self.regions.len() > IOV_MAX {
                self.regions.truncate(IOV_MAX);
                got = self.regions[before..].iter().map(IoRegion::len).sum();
            }
            if got == 0 {
                self.regions.truncate(before);
                q.undo_pop();
                break;
            }
            self.caps.push(got);
            total += got;
            n += 1;
        }
        n
    }

    fn read_stream(&mut self, key: ConnKey, q: &mut dyn VirtQueue, used: &mut usize) -> Turn {
        let Some(credit) = self.conns.get(&key).map(Conn::peer_credit) else {
            return Turn::Idle;
        };
        let budget = credit.min(MAX_RX_BATCH) as usize;
        let popped = self.gather_rx(q, budget, MAX_RX_CHAINS);
        if popped == 0 {
            return Turn::Starved;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            Self::undo(q, popped);
            return Turn::Idle;
        };
        match sys::recv_regions(conn.fd.as_fd(), &self.regions, &mut self.iov) {
            Ok((0, _)) => {
                Self::undo(q, popped);
                self.on_host_eof(key);
                Turn::Progress
            }
            Ok((n, _)) => {
                // A stream recvmsg stops short only when the socket's queue is empty,
                // and the socket is edge-triggered: bytes that arrive later report it
                // again. So a short read ends the turn without the recvmsg that would
                // only say EAGAIN. Not after RDHUP: the EOF still has to be read.
                if n < self.caps.iter().sum::<usize>() && !conn.rdhup {
                    conn.readable = false;
                }
                self.deliver(key, q, popped, n, 0, used);
                Turn::Progress
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                Self::undo(q, popped);
                conn.readable = false;
                Turn::Idle
            }
            Err(_) => {
                Self::undo(q, popped);
                VsockMetrics::inc(&self.metrics.err_host_io);
                self.kill(key);
                Turn::Progress
            }
        }
    }

    /// Writes headers for `n` bytes spread over the first chains (in order), un-pops
    /// the chains left over. `last_flags` go on the last used chain.
    fn deliver(
        &mut self,
        key: ConnKey,
        q: &mut dyn VirtQueue,
        popped: usize,
        n: usize,
        last_flags: u32,
        used: &mut usize,
    ) {
        let mut left = n;
        let mut count = 0;
        for i in 0..popped {
            if left == 0 && i > 0 {
                break;
            }
            let take = left.min(self.caps[i]);
            left -= take;
            count = i + 1;
            let flags = if left == 0 { last_flags } else { 0 };
            let Some(conn) = self.conns.get_mut(&key) else {
                return;
            };
            conn.rx_cnt += Wrapping(take as u32);
            let hdr = conn.rx_header(self.guest_cid, VsockOp::Rw, take as u32, flags);
            if self.put_used(q, i, &hdr) {
                *used += 1;
            }
        }
        Self::undo(q, popped - count);
    }

    fn read_seqpacket(&mut self, key: ConnKey, q: &mut dyn VirtQueue, used: &mut usize) -> Turn {
        let Some(conn) = self.conns.get_mut(&key) else {
            return Turn::Idle;
        };
        let msg_len = match sys::peek_msg_len(conn.fd.as_fd()) {
            Ok(0) if conn.rdhup => {
                self.on_host_eof(key);
                return Turn::Progress;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                conn.readable = false;
                return Turn::Idle;
            }
            Err(_) => {
                VsockMetrics::inc(&self.metrics.err_host_io);
                self.kill(key);
                return Turn::Progress;
            }
        };
        if msg_len > conn.peer_buf_alloc as usize || msg_len > MAX_SEQ_RX_MSG {
            VsockMetrics::inc(&self.metrics.err_unsupported);
            self.kill(key);
            return Turn::Progress;
        }
        if msg_len > conn.peer_credit() as usize {
            if !conn.credit_requested {
                conn.credit_requested = true;
                conn.pending |= PENDING_CREDIT_REQUEST;
                return Turn::Progress;
            }
            return Turn::Idle;
        }
        let popped = self.gather_rx(q, msg_len.max(1), usize::MAX);
        let room: usize = self.caps.iter().sum();
        if popped == 0 || room < msg_len {
            Self::undo(q, popped);
            if self.regions.len() >= IOV_MAX {
                VsockMetrics::inc(&self.metrics.err_unsupported);
                self.kill(key);
                return Turn::Progress;
            }
            return Turn::Starved;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            Self::undo(q, popped);
            return Turn::Idle;
        };
        let regions = if msg_len == 0 {
            &[][..]
        } else {
            &self.regions[..]
        };
        match sys::recv_regions(conn.fd.as_fd(), regions, &mut self.iov) {
            Ok((n, flags)) if n == msg_len && flags & libc::MSG_TRUNC == 0 => {
                let mut last = SeqpacketFlags::EOM;
                if flags & libc::MSG_EOR != 0 {
                    last |= SeqpacketFlags::EOR;
                }
                self.deliver(key, q, popped, n, last.bits(), used);
                Turn::Progress
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                Self::undo(q, popped);
                conn.readable = false;
                Turn::Idle
            }
            _ => {
                Self::undo(q, popped);
                VsockMetrics::inc(&self.metrics.err_host_io);
                self.kill(key);
                Turn::Progress
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_connect_line;

    #[test]
    fn connect_line() {
        assert_eq!(parse_connect_line(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect_line(b"connect 1234"), Some(1234));
        assert_eq!(parse_connect_line(b"Connect  7 "), Some(7));
        assert_eq!(parse_connect_line(b"CONNECT"), None);
        assert_eq!(parse_connect_line(b"CONNECT 52 x"), None);
        assert_eq!(parse_connect_line(b"CONNECT -1"), None);
        assert_eq!(parse_connect_line(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect_line(b"HELLO 52"), None);
        assert_eq!(parse_connect_line(&[0xff, b' ', b'1']), None);
    }
}
