//! The AF_UNIX muxer: host sockets, the epoll set they live in, timers, and the
//! delivery of packets and data to the guest's RX queue.
//!
//! The muxer routes: guest packets and host socket events go to their [`Conn`], which
//! owns the connection's state machine and answers with an [`Action`] that the muxer
//! carries out ([`Muxer::apply`]): tables, the epoll set, timers, the RX list.
//!
//! - `mod.rs`: the tables, the epoll set and its dispatch, actions.
//! - `tx.rs`: guest packets (TX queue) and guest-initiated connects.
//! - `handshake.rs`: host clients' `CONNECT <port>\n` and the `OK <port>\n` answer;
//!   host clients of the AF_VSOCK forward ports, which need neither.
//! - `timers.rs`: connection and handshake deadlines on one timerfd.
//! - `handover.rs`: the muxer's state in a handover record, and a muxer made from one.
//! - `rx.rs`: RX scheduling: control packets and host data into guest buffers.

mod handover;
mod handshake;
mod rx;
mod timers;
mod tx;

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use outboard_protocol::vsock::{VsockHeader, VsockOp, VsockType, VMADDR_CID_HOST};
use rustix::event::epoll::EventFlags;
use rustix::net::SocketType;

use self::handshake::PendingHost;
use self::rx::RxBufs;
use self::timers::TimerKey;
use super::conn::{Action, Conn, ConnKey, Fault};
use super::packet::Refused;
use super::sys;
use super::{VsockBackend, VsockError, VsockMetrics, HOST_PORT_BASE};

const TOKEN_LISTENER: u64 = 0;
const TOKEN_SEQ_LISTENER: u64 = 1;
const TOKEN_TIMER: u64 = 2;
const TOKEN_INBOX: u64 = 3;
const TOKEN_PENDING: u64 = 1 << 32;
const TOKEN_CONN: u64 = 2 << 32;
/// An AF_VSOCK forward listener (the low half is its index).
const TOKEN_FORWARD_LISTENER: u64 = 3 << 32;
const TOKEN_KIND: u64 = 0xffff_ffff << 32;

/// RST replies to packets of unknown connections waiting for RX buffers.
const MAX_ORPHAN_RSTS: usize = 256;
/// Epoll events taken per wait.
const EVENTS_PER_WAIT: usize = 64;

/// A connection's socket events while its TX buffer is empty. EPOLLOUT is asked for
/// only while bytes wait (`CONN_EVENTS_OUT`): edge-triggered EPOLLOUT fires every time
/// the host reader drains the socket, which would wake the device once per host read.
const CONN_EVENTS: EventFlags = EventFlags::IN
    .union(EventFlags::RDHUP)
    .union(EventFlags::ET);
/// A connection's socket events while bytes wait in its TX buffer.
/// How [`Muxer::insert`] registers a connection's socket in the epoll set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EpollOp {
    /// A new socket (`EPOLL_CTL_ADD`).
    Add,
    /// A former pending host client, registered already (`EPOLL_CTL_MOD`).
    Modify,
}

const CONN_EVENTS_OUT: EventFlags = CONN_EVENTS.union(EventFlags::OUT);

/// The host side's listeners and where guest connects go.
enum HostSide {
    /// Firecracker's hybrid vsock: guest connects go to `<uds_path>_<port>`; host
    /// clients connect to the two listeners and send `CONNECT <port>\n`.
    Unix {
        uds_path: PathBuf,
        listener: OwnedFd,
        seq_listener: OwnedFd,
    },
    /// The host's AF_VSOCK: guest connects go to `(cid, port)`; a host client of a
    /// listener (port `P`) is connected to guest port `P` at once.
    Vsock {
        cid: u32,
        listeners: Vec<(OwnedFd, u32)>,
    },
}

/// The muxer.
pub(crate) struct Muxer {
    guest_cid: u64,
    tx_buf_size: u32,
    max_connections: usize,
    host: HostSide,
    epoll: OwnedFd,
    timer: OwnedFd,
    timer_armed: Option<Instant>,
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
    iov: sys::IovScratch,
    rx: RxBufs,
}

impl Muxer {
    /// Binds the listeners of `backend` and creates the epoll set.
    pub fn new(
        guest_cid: u64,
        backend: VsockBackend,
        tx_buf_size: u32,
        max_connections: usize,
        metrics: Arc<VsockMetrics>,
    ) -> Result<Self, VsockError> {
        let host = match backend {
            VsockBackend::Unix(uds_path) => {
                let listen = |path: PathBuf, ty| {
                    sys::unix_listen(&path, ty).map_err(|source| VsockError::Listen {
                        path: path.display().to_string(),
                        source,
                    })
                };
                let listener = listen(uds_path.clone(), SocketType::STREAM)?;
                let mut seq_path = uds_path.clone().into_os_string();
                seq_path.push("_seqpacket");
                let seq_listener = listen(PathBuf::from(seq_path), SocketType::SEQPACKET)?;
                HostSide::Unix {
                    uds_path,
                    listener,
                    seq_listener,
                }
            }
            VsockBackend::Vsock(fwd) => HostSide::Vsock {
                cid: fwd.cid,
                listeners: fwd.listen()?,
            },
        };
        Muxer::with_host(guest_cid, host, tx_buf_size, max_connections, metrics)
    }

    /// A muxer with no connections on the listeners of `host`.
    fn with_host(
        guest_cid: u64,
        host: HostSide,
        tx_buf_size: u32,
        max_connections: usize,
        metrics: Arc<VsockMetrics>,
    ) -> Result<Self, VsockError> {
        let epoll = sys::epoll_create().map_err(VsockError::Epoll)?;
        let timer = sys::timerfd_create().map_err(VsockError::Timer)?;
        let add = |fd: BorrowedFd<'_>, token| {
            sys::epoll_add(&epoll, fd, EventFlags::IN, token).map_err(VsockError::Epoll)
        };
        match &host {
            HostSide::Unix {
                listener,
                seq_listener,
                ..
            } => {
                add(listener.as_fd(), TOKEN_LISTENER)?;
                add(seq_listener.as_fd(), TOKEN_SEQ_LISTENER)?;
            }
            HostSide::Vsock { listeners, .. } => {
                for (i, (fd, _)) in listeners.iter().enumerate() {
                    add(fd.as_fd(), TOKEN_FORWARD_LISTENER | i as u64)?;
                }
            }
        }
        add(timer.as_fd(), TOKEN_TIMER)?;
        Ok(Muxer {
            guest_cid,
            tx_buf_size,
            max_connections,
            host,
            epoll,
            timer,
            timer_armed: None,
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
            iov: sys::IovScratch::default(),
            rx: RxBufs::default(),
        })
    }

    /// The TX buffer size (the credit each connection announces).
    pub fn tx_buf_size(&self) -> u32 {
        self.tx_buf_size
    }

    /// The epoll set the owner polls.
    pub fn epoll_fd(&self) -> BorrowedFd<'_> {
        self.epoll.as_fd()
    }

    /// Adds the sibling inbox's eventfd (level-triggered) or a link to a sibling in
    /// another process (`edge`: reported once per arrival) to the epoll set.
    pub fn watch_inbox(&mut self, fd: impl AsFd, edge: bool) -> Result<(), VsockError> {
        let events = if edge {
            EventFlags::IN | EventFlags::ET
        } else {
            EventFlags::IN
        };
        sys::epoll_add(&self.epoll, fd.as_fd(), events, TOKEN_INBOX).map_err(VsockError::Epoll)
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
            let _ = sys::epoll_delete(&self.epoll, conn.fd());
        }
        VsockMetrics::add(&self.metrics.conns_removed, removed);
        for (_, p) in self.pending.drain() {
            let _ = sys::epoll_delete(&self.epoll, p.fd.as_fd());
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
                    Fault::ConnectFailed => Some(&m.err_connect_failed),
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
                if let Some(conn) = self.conns.get(&key) {
                    outboard_protocol::log_limited!(
                        log::Level::Info,
                        "vsock: {}: reset by the device: {}",
                        conn.label(),
                        fault.describe()
                    );
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
        let _ = sys::epoll_delete(&self.epoll, conn.fd());
        self.fd_keys.remove(&fd);
        self.schedule(key);
    }

    fn remove(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            outboard_protocol::log_limited!(log::Level::Debug, "vsock: {}: closed", conn.label());
            let fd = conn.fd().as_raw_fd();
            if self.fd_keys.get(&fd) == Some(&key) {
                self.fd_keys.remove(&fd);
                let _ = sys::epoll_delete(&self.epoll, conn.fd());
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
    fn insert(&mut self, conn: Conn, op: EpollOp) -> bool {
        let key = conn.key();
        let fd = conn.fd().as_raw_fd();
        let token = TOKEN_CONN | fd as u32 as u64;
        // A connect in progress ends with the socket writable (or in error).
        let events = if conn.host_connecting() {
            CONN_EVENTS_OUT
        } else {
            CONN_EVENTS
        };
        let registered = match op {
            EpollOp::Add => sys::epoll_add(&self.epoll, conn.fd(), events, token),
            EpollOp::Modify => sys::epoll_modify(&self.epoll, conn.fd(), events, token),
        };
        if registered.is_err() {
            VsockMetrics::inc(&self.metrics.err_muxer);
            return false;
        }
        outboard_protocol::log_limited!(
            log::Level::Debug,
            "vsock: {}: opened by {}",
            conn.label(),
            if conn.host_initiated() {
                "a host client"
            } else {
                "the guest"
            }
        );
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
        if sys::epoll_modify(&self.epoll, conn.fd(), events, token).is_err() {
            VsockMetrics::inc(&self.metrics.err_muxer);
            if out {
                self.kill(key);
            }
        }
    }

    /// Handles what the epoll set reports (never blocks).
    pub fn process_events(&mut self) {
        for _ in 0..16 {
            // On the stack (under 1 KiB): rustix's epoll event is not `Send`, so the
            // muxer (which moves between threads) does not keep one.
            let mut events = [sys::NO_EVENT; EVENTS_PER_WAIT];
            let n = match sys::epoll_wait_now(&self.epoll, &mut events) {
                Ok(n) => n,
                Err(_) => {
                    VsockMetrics::inc(&self.metrics.err_muxer);
                    0
                }
            };
            for ev in &events[..n] {
                let (token, flags) = (ev.data.u64(), ev.flags);
                self.dispatch(token, flags);
            }
            if n < EVENTS_PER_WAIT {
                break;
            }
        }
        self.rearm_timer();
    }

    fn dispatch(&mut self, token: u64, flags: EventFlags) {
        match (token & TOKEN_KIND, token) {
            (0, TOKEN_LISTENER) => self.accept(VsockType::Stream),
            (0, TOKEN_SEQ_LISTENER) => self.accept(VsockType::Seqpacket),
            (0, TOKEN_TIMER) => self.on_timer(),
            (0, TOKEN_INBOX) => self.inbox_signalled = true,
            (TOKEN_PENDING, t) => self.pending_readable(t as u32 as RawFd),
            (TOKEN_CONN, t) => self.conn_event(t as u32 as RawFd, flags),
            (TOKEN_FORWARD_LISTENER, t) => self.accept_forwarded(t as u32 as usize),
            _ => VsockMetrics::inc(&self.metrics.err_muxer),
        }
    }

    /// Readiness of a connection's host socket. Writability flushes its TX buffer
    /// (then [`Muxer::after_host_write`]); EPOLLOUT is dropped once nothing waits.
    fn conn_event(&mut self, fd: RawFd, flags: EventFlags) {
        let Some(&key) = self.fd_keys.get(&fd) else {
            return;
        };
        if !self.on_conn(key, |conn, _| conn.on_host_ready(flags)) {
            return;
        }
        // EPOLLOUT was asked for (bytes waited, or a connect was in progress); once
        // the buffer is empty and the connect done it is not needed.
        if flags.contains(EventFlags::OUT)
            && self
                .conns
                .get(&key)
                .is_some_and(|c| !c.tx_pending() && !c.host_connecting())
        {
            self.set_out_interest(key, false);
        }
        self.schedule(key);
    }
}
