//! The AF_UNIX muxer: host sockets, the epoll set they live in, timers, and the
//! delivery of packets and data to the guest's RX queue.
//!
//! The muxer routes: guest packets and host socket events go to their [`Conn`], which
//! owns the connection's state machine and answers with an [`Action`] that the muxer
//! carries out ([`Muxer::apply`]): tables, the epoll set, timers, the RX list.
use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use outboard_protocol::vsock::{
    SeqpacketFlags, VsockHeader, VsockOp, VsockType, MAX_PKT_BUF_SIZE, VMADDR_CID_HOST,
    VMADDR_PORT_ANY,
};

use super::conn::{Action, Conn, ConnKey, Fault};
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
/// Epoll events taken per wait.
const EVENTS_PER_WAIT: usize = 64;

/// A connection's socket events while its TX buffer is empty. EPOLLOUT is asked for
/// only while bytes wait (`CONN_EVENTS_OUT`): edge-triggered EPOLLOUT fires every time
/// the host reader drains the socket, which would wake the device once per host read.
const CONN_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
/// A connection's socket events while bytes wait in its TX buffer.
const CONN_EVENTS_OUT: u32 = CONN_EVENTS | libc::EPOLLOUT as u32;

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
    rx: RxBufs,
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
            rx: RxBufs::default(),
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

    /// Drops every connection and pending host client (host sockets are closed).
    pub fn reset(&mut self) {
        let removed = self.conns.len() as u64;
        for (_, conn) in self.conns.drain() {
            let _ = sys::epoll_ctl(
                &self.epoll,
                libc::EPOLL_CTL_DEL,
                conn.fd().as_raw_fd(),
                0,
                0,
            );
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

    /// Runs `event` on connection `key` and carries out the action it returns. False
    /// (and `event` is not run) when there is no such connection.
    fn on_conn(
        &mut self,
        key: ConnKey,
        event: impl FnOnce(&mut Conn, &mut sys::IovScratch) -> Action,
    ) -> bool {
        let Some(conn) = self.conns.get_mut(&key) else {
            return false;
        };
        let action = event(conn, &mut self.iov);
        self.apply(key, action);
        true
    }

    /// Carries out what connection `key` asked for.
    fn apply(&mut self, key: ConnKey, action: Action) {
        match action {
            Action::Continue => self.after_host_write(key),
            Action::Forwarded(len) => {
                VsockMetrics::add(&self.metrics.tx_bytes, u64::from(len));
                self.after_host_write(key);
            }
            Action::Ignore => {}
            Action::SendOk => self.confirm_host_connect(key),
            Action::ArmTimer(at) => self.push_deadline(at, TimerKey::Conn(key)),
            Action::Kill(fault) => {
                let m = &self.metrics;
                let counter = match fault {
                    Fault::CreditOverrun => Some(&m.err_credit_overrun),
                    Fault::HostIo => Some(&m.err_host_io),
                    Fault::Protocol => Some(&m.err_no_connection),
                    Fault::Timeout => Some(&m.err_timeout),
                    Fault::Unsupported => Some(&m.err_unsupported),
                    Fault::WrongType => None,
                };
                if let Some(counter) = counter {
                    VsockMetrics::inc(counter);
                }
                self.kill(key);
            }
            Action::Close => self.close_with_rst(key),
            Action::Remove => self.remove(key),
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

    /// Ends a connection with RST: its socket leaves the epoll set now, the connection
    /// once the RST went out.
    fn close_with_rst(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if !conn.kill() {
            return;
        }
        let fd = conn.fd().as_raw_fd();
        let _ = sys::epoll_ctl(&self.epoll, libc::EPOLL_CTL_DEL, fd, 0, 0);
        self.fd_keys.remove(&fd);
        self.schedule(key);
    }

    fn remove(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            let fd = conn.fd().as_raw_fd();
            if self.fd_keys.get(&fd) == Some(&key) {
                self.fd_keys.remove(&fd);
                let _ = sys::epoll_ctl(&self.epoll, libc::EPOLL_CTL_DEL, fd, 0, 0);
            }
            let local_port = conn.local_port();
            if let Some(n) = self.local_ports.get_mut(&local_port) {
                *n -= 1;
                if *n == 0 {
                    self.local_ports.remove(&local_port);
                }
            }
            VsockMetrics::inc(&self.metrics.conns_removed);
        }
    }

    /// Registers `conn` in the epoll set (`op` is ADD, or MOD for a former pending host
    /// client) and in the tables, and watches its deadline if it has one.
    fn insert(&mut self, conn: Conn, op: libc::c_int) -> bool {
        let key = conn.key();
        let fd = conn.fd().as_raw_fd();
        let token = TOKEN_CONN | fd as u32 as u64;
        if sys::epoll_ctl(&self.epoll, op, fd, CONN_EVENTS, token).is_err() {
            VsockMetrics::inc(&self.metrics.err_muxer);
            return false;
        }
        *self.local_ports.entry(conn.local_port()).or_insert(0) += 1;
        self.fd_keys.insert(fd, key);
        let deadline = conn.deadline();
        self.conns.insert(key, conn);
        VsockMetrics::inc(&self.metrics.conns_added);
        self.schedule(key);
        if let Some(at) = deadline {
            self.push_deadline(at, TimerKey::Conn(key));
        }
        true
    }

    /// After guest data moved (or any event that may free TX buffer or make a
    /// CREDIT_UPDATE due): finish a peer-closed connection whose buffer drained, keep
    /// EPOLLOUT while bytes wait, schedule RX.
    fn after_host_write(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.after_host_write() == Action::Close {
            self.close_with_rst(key);
            return;
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
        let fd = conn.fd().as_raw_fd();
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

    /// Readiness of a connection's host socket. Writability flushes its TX buffer
    /// (then [`Muxer::after_host_write`]); EPOLLOUT is dropped once nothing waits.
    fn conn_event(&mut self, fd: RawFd, bits: u32) {
        let Some(&key) = self.fd_keys.get(&fd) else {
            return;
        };
        if !self.on_conn(key, |conn, _| conn.on_host_ready(bits)) {
            return;
        }
        // EPOLLOUT was asked for; once the buffer is empty it is not needed.
        if bits & libc::EPOLLOUT as u32 != 0
            && self.conns.get(&key).is_some_and(|c| !c.tx_pending())
        {
            self.set_out_interest(key, false);
        }
        self.schedule(key);
    }
}

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
    /// `<uds_path>_<port>`; RST when there is none or the connection cap is reached.
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
        let conn = Conn::new_peer_init(fd, pkt.ty, &h, self.buf_alloc(pkt.ty));
        if !self.insert(conn, libc::EPOLL_CTL_ADD) {
            self.orphan_rst(h.src_port, h.dst_port, h.type_);
        }
    }

    /// The credit a new connection of type `ty` gives the guest (its TX buffer).
    fn buf_alloc(&self, ty: VsockType) -> u32 {
        match ty {
            VsockType::Stream => self.tx_buf_size,
            VsockType::Seqpacket => self.tx_buf_size.min(MAX_SEQPACKET_MSG),
        }
    }
}

const PENDING_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET) as u32;

/// A host client that connected to a listener and has not sent `CONNECT <port>` yet.
#[derive(Debug)]
struct PendingHost {
    fd: OwnedFd,
    ty: VsockType,
    /// When the client is dropped if its line has not come.
    deadline: Instant,
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

impl Muxer {
    /// Accepts host clients on the stream or seqpacket listener; each has
    /// [`CONN_TIMEOUT`] to send its `CONNECT` line.
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

    /// Forgets a pending host client (its socket is closed).
    fn drop_pending(&mut self, fd: RawFd) {
        if self.pending.remove(&fd).is_some() {
            let _ = sys::epoll_ctl(&self.epoll, libc::EPOLL_CTL_DEL, fd, 0, 0);
        }
    }

    /// A pending host client's socket is readable: its `CONNECT <port>` line makes a
    /// LocalInit connection; anything else closes it.
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
        let conn = Conn::new_local_init(sock, ty, local_port, port, self.buf_alloc(ty));
        // The fd is in the epoll set already: re-register it under the connection token.
        self.insert(conn, libc::EPOLL_CTL_MOD);
    }

    /// The guest accepted the REQUEST of connection `key`: the host client is told
    /// `OK <local_port>\n` (a failed write resets the connection).
    fn confirm_host_connect(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get(&key) else {
            return;
        };
        let line = format!("OK {}\n", conn.local_port());
        match sys::send(conn.fd(), line.as_bytes()) {
            Ok(n) if n == line.len() => self.apply(key, Action::Continue),
            _ => self.apply(key, Action::Kill(Fault::HostIo)),
        }
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
}

/// What a queued deadline belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimerKey {
    /// A connection ([`crate::vsock::conn::Conn::deadline`]).
    Conn(ConnKey),
    /// A host client that has not sent its `CONNECT` line.
    Pending(RawFd),
}

impl Muxer {
    /// Queues deadline `at` of `key`. A queue grown to four times the live entries is
    /// first cleared of stale deadlines.
    fn push_deadline(&mut self, at: Instant, key: TimerKey) {
        let live = self.max_connections + MAX_PENDING_HOST_CONNECTIONS;
        if self.deadlines.len() >= 4 * live {
            let conns = &self.conns;
            let pending = &self.pending;
            self.deadlines.retain(|(d, k)| match k {
                TimerKey::Conn(k) => conns.get(k).is_some_and(|c| c.deadline() == Some(*d)),
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

    /// The timerfd fired: every deadline that passed is handed to its connection
    /// ([`crate::vsock::conn::Conn::timed_out`]) or drops its pending host client.
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
                    self.on_conn(k, |conn, _| conn.timed_out(at));
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
}

/// Most payload bytes one read from a host socket puts into guest buffers.
const MAX_RX_BATCH: u32 = 256 * 1024;
/// Most RX chains one read fills.
const MAX_RX_CHAINS: usize = 64;
/// Largest host seqpacket message the device forwards.
const MAX_SEQ_RX_MSG: usize = 1 << 20;

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

/// RX chains popped for one turn, and the payload areas of those being filled.
#[derive(Default)]
struct RxBufs {
    chains: Vec<DescChain>,
    /// Payload regions of the chains `gather` popped, in order.
    regions: Vec<IoRegion>,
    /// Payload capacity of each chain `gather` popped.
    caps: Vec<usize>,
}

impl RxBufs {
    /// Pops an RX chain that can hold at least a header into `slot`. Unusable chains
    /// are returned empty, unless other chains are held (`holding`): then the chain is
    /// un-popped and the caller stops, so that un-popping the held chains stays in
    /// order.
    fn pop(&mut self, q: &mut dyn VirtQueue, slot: usize, holding: bool, m: &VsockMetrics) -> bool {
        while self.chains.len() <= slot {
            self.chains.push(DescChain::default());
        }
        loop {
            let chain = &mut self.chains[slot];
            let bad = match q.pop(chain) {
                Ok(false) => return false,
                Ok(true) if chain.writable_len() >= VsockHeader::SIZE => return true,
                Ok(true) => {
                    VsockMetrics::inc(&m.err_rx_bad_buffer);
                    chain.head
                }
                Err(QueueError::BadChain { head, .. }) => {
                    VsockMetrics::inc(&m.err_queue);
                    head
                }
                Err(_) => {
                    VsockMetrics::inc(&m.err_queue);
                    return false;
                }
            };
            if holding {
                q.undo_pop();
                return false;
            }
            if q.add_used(bad, 0).is_err() {
                VsockMetrics::inc(&m.err_queue);
                return false;
            }
        }
    }

    /// Writes `hdr` into the chain in `slot` and returns it used (with `hdr.len`
    /// payload bytes).
    fn put_used(
        &self,
        q: &mut dyn VirtQueue,
        slot: usize,
        hdr: &VsockHeader,
        m: &VsockMetrics,
    ) -> bool {
        let chain = &self.chains[slot];
        let len = hdr.len;
        if !write_rx_header(chain, hdr)
            || q.add_used(chain.head, VsockHeader::SIZE as u32 + len)
                .is_err()
        {
            VsockMetrics::inc(&m.err_queue);
            return false;
        }
        VsockMetrics::inc(&m.rx_packets);
        VsockMetrics::add(&m.rx_bytes, u64::from(len));
        true
    }

    /// Pops chains for up to `budget` payload bytes; returns how many chains were
    /// popped (their payload regions are in `regions`, capacities in `caps`).
    fn gather(
        &mut self,
        q: &mut dyn VirtQueue,
        budget: usize,
        max_chains: usize,
        m: &VsockMetrics,
    ) -> usize {
        self.regions.clear();
        self.caps.clear();
        let mut total = 0;
        let mut n = 0;
        while total < budget && n < max_chains && self.regions.len() < IOV_MAX {
            if !self.pop(q, n, n > 0, m) {
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

    fn undo(q: &mut dyn VirtQueue, count: usize) {
        for _ in 0..count {
            q.undo_pop();
        }
    }

    /// Writes headers from `conn` for `n` bytes spread over the first chains (in
    /// order), un-pops the chains left over. `last_flags` go on the last used chain.
    /// Returns how many chains were used.
    #[allow(clippy::too_many_arguments)]
    fn deliver(
        &self,
        conn: &mut Conn,
        guest_cid: u64,
        q: &mut dyn VirtQueue,
        popped: usize,
        n: usize,
        last_flags: u32,
        m: &VsockMetrics,
    ) -> usize {
        let mut used = 0;
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
            let hdr = conn.data_sent(guest_cid, take as u32, flags);
            if self.put_used(q, i, &hdr, m) {
                used += 1;
            }
        }
        Self::undo(q, popped - count);
        used
    }
}

impl Muxer {
    /// Whether anything waits for the RX queue.
    pub fn has_rx(&self) -> bool {
        !self.orphan_rsts.is_empty() || !self.rx_list.is_empty()
    }

    /// Puts connection `key` on the RX list if it wants RX and is not on it.
    fn schedule(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if conn.join_rx_list() {
                self.rx_list.push_back(key);
            }
        }
    }

    /// Fills the RX queue with what connections have for the guest, round robin.
    /// Returns how many chains were used and whether the queue ran dry.
    pub fn fill_rx(&mut self, q: &mut dyn VirtQueue) -> (usize, bool) {
        let mut used = 0;
        while let Some(hdr) = self.orphan_rsts.front().copied() {
            if !self.rx.pop(q, 0, false, &self.metrics) {
                return (used, true);
            }
            self.rx.put_used(q, 0, &hdr, &self.metrics);
            used += 1;
            self.orphan_rsts.pop_front();
        }
        // Each connection gets one turn per pass; the list rotates.
        while let Some(key) = self.rx_list.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.leave_rx_list();
            let (turn, n) = self.conn_turn(key, q);
            used += n;
            if turn == Turn::Starved {
                if let Some(conn) = self.conns.get_mut(&key) {
                    if conn.rejoin_rx_list() {
                        // A seqpacket message that needs more buffers than there are
                        // waits at the back, so it cannot hold up the others.
                        if conn.ty() == VsockType::Seqpacket && n == 0 {
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

    /// One turn of connection `key`: its control packets, then host data.
    fn conn_turn(&mut self, key: ConnKey, q: &mut dyn VirtQueue) -> (Turn, usize) {
        let mut used = 0;
        let guest_cid = self.guest_cid;
        // A host that hung up after its end-of-file queues SHUTDOWN (RCV | SEND).
        if !self.on_conn(key, |conn, _| conn.host_closed()) {
            return (Turn::Idle, used);
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return (Turn::Idle, used);
        };
        // Control packets first.
        while let Some(op) = conn.next_control() {
            if !self.rx.pop(q, 0, false, &self.metrics) {
                return (Turn::Starved, used);
            }
            let hdr = conn.control_sent(guest_cid, op);
            if self.rx.put_used(q, 0, &hdr, &self.metrics) {
                used += 1;
            }
            if op == VsockOp::Rst {
                self.apply(key, Action::Remove);
                return (Turn::Idle, used);
            }
        }
        if !conn.may_read_host() {
            return (Turn::Idle, used);
        }
        if conn.peer_credit() == 0 {
            let turn = if conn.ask_credit() {
                Turn::Progress
            } else {
                Turn::Idle
            };
            return (turn, used);
        }
        let turn = match conn.ty() {
            VsockType::Stream => self.read_stream(key, q, &mut used),
            VsockType::Seqpacket => self.read_seqpacket(key, q, &mut used),
        };
        (turn, used)
    }

    fn read_stream(&mut self, key: ConnKey, q: &mut dyn VirtQueue, used: &mut usize) -> Turn {
        let Some(conn) = self.conns.get_mut(&key) else {
            return Turn::Idle;
        };
        let budget = conn.peer_credit().min(MAX_RX_BATCH) as usize;
        let popped = self.rx.gather(q, budget, MAX_RX_CHAINS, &self.metrics);
        if popped == 0 {
            return Turn::Starved;
        }
        match sys::recv_regions(conn.fd(), &self.rx.regions, &mut self.iov) {
            Ok((0, _)) => {
                RxBufs::undo(q, popped);
                conn.on_host_eof();
                Turn::Progress
            }
            Ok((n, _)) => {
                // A stream recvmsg stops short only when the socket's queue is empty,
                // and the socket is edge-triggered: bytes that arrive later report it
                // again. So a short read ends the turn without the recvmsg that would
                // only say EAGAIN. Not after RDHUP: the EOF still has to be read.
                if n < self.rx.caps.iter().sum::<usize>() && !conn.host_rdhup() {
                    conn.host_drained();
                }
                *used += self
                    .rx
                    .deliver(conn, self.guest_cid, q, popped, n, 0, &self.metrics);
                Turn::Progress
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                RxBufs::undo(q, popped);
                conn.host_drained();
                Turn::Idle
            }
            Err(_) => {
                RxBufs::undo(q, popped);
                self.apply(key, Action::Kill(Fault::HostIo));
                Turn::Progress
            }
        }
    }

    fn read_seqpacket(&mut self, key: ConnKey, q: &mut dyn VirtQueue, used: &mut usize) -> Turn {
        let Some(conn) = self.conns.get_mut(&key) else {
            return Turn::Idle;
        };
        let msg_len = match sys::peek_msg_len(conn.fd()) {
            Ok(0) if conn.host_rdhup() => {
                conn.on_host_eof();
                return Turn::Progress;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                conn.host_drained();
                return Turn::Idle;
            }
            Err(_) => {
                self.apply(key, Action::Kill(Fault::HostIo));
                return Turn::Progress;
            }
        };
        if msg_len > conn.peer_buf_alloc() as usize || msg_len > MAX_SEQ_RX_MSG {
            self.apply(key, Action::Kill(Fault::Unsupported));
            return Turn::Progress;
        }
        if msg_len > conn.peer_credit() as usize {
            return if conn.ask_credit() {
                Turn::Progress
            } else {
                Turn::Idle
            };
        }
        let popped = self.rx.gather(q, msg_len.max(1), usize::MAX, &self.metrics);
        let room: usize = self.rx.caps.iter().sum();
        if popped == 0 || room < msg_len {
            RxBufs::undo(q, popped);
            if self.rx.regions.len() >= IOV_MAX {
                self.apply(key, Action::Kill(Fault::Unsupported));
                return Turn::Progress;
            }
            return Turn::Starved;
        }
        let regions = if msg_len == 0 {
            &[][..]
        } else {
            &self.rx.regions[..]
        };
        match sys::recv_regions(conn.fd(), regions, &mut self.iov) {
            Ok((n, flags)) if n == msg_len && flags & libc::MSG_TRUNC == 0 => {
                let mut last = SeqpacketFlags::EOM;
                if flags & libc::MSG_EOR != 0 {
                    last |= SeqpacketFlags::EOR;
                }
                *used += self.rx.deliver(
                    conn,
                    self.guest_cid,
                    q,
                    popped,
                    n,
                    last.bits(),
                    &self.metrics,
                );
                Turn::Progress
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                RxBufs::undo(q, popped);
                conn.host_drained();
                Turn::Idle
            }
            _ => {
                RxBufs::undo(q, popped);
                self.apply(key, Action::Kill(Fault::HostIo));
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
