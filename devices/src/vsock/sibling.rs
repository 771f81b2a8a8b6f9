//! Guest-to-guest traffic between vsock devices of one sibling group.
//!
//! Each device owns an inbox: a bounded queue of packets (header and payload) that
//! sibling devices put there from their own worker threads, plus an eventfd in the
//! device's epoll set that tells its worker. Packets travel unchanged, so the credit
//! fields (`buf_alloc`, `fwd_cnt`) go from one guest to the other and flow control stays
//! end to end; the device in between only checks it. Each device keeps a table of its
//! guest's sibling connections with the credit the other guest announced, and resets a
//! connection whose guest sends beyond it. A full inbox (the other guest is not taking
//! its RX buffers) resets the connection that found it full: nothing waits, nothing
//! grows, and the other connections of either device go on.
//!
//! # Siblings in other processes
//!
//! Devices in different processes (jailed workers, one per VM) link through a pair of
//! AF_UNIX `SOCK_SEQPACKET` sockets ([`sibling_socket_pair`], one end each,
//! [`super::Vsock::link_sibling_socket`]): one message per packet, the 44-byte header
//! then the payload, in order. The sending socket's buffer is the other device's inbox:
//! its guest takes packets from the socket only as fast as it posts RX buffers, and a
//! packet with payload is sent only while the unread bytes (`SIOCOUTQ`) leave
//! [`REMOTE_CONTROL_RESERVE`] free for packets without payload, so a reset still
//! reaches a guest whose link is full of data. The other process is another guest's
//! device and may be compromised: each message is checked (its CIDs must be the link's,
//! its length the header's, its op and type valid) and dropped otherwise, counted in
//! `err_sibling_invalid`.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::num::Wrapping;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};

use outboard_protocol::vsock::{SeqpacketFlags, VsockHeader, VsockOp, MAX_PKT_BUF_SIZE};
use outboard_protocol::Validate;
use rustix::net::ReturnFlags;
use zerocopy::{FromBytes, IntoBytes};

use super::sys;
use super::{VsockError, VsockMetrics};
use crate::virtio::{ChainWriter, DescChain, QueueError, VirtQueue};

/// Most packets an inbox holds.
pub const MAX_INBOX_PACKETS: usize = 1024;
/// Most payload bytes an inbox holds (the packets' headers come on top).
pub const MAX_INBOX_BYTES: usize = 4 << 20;
/// Inbox places only packets without payload (RST, SHUTDOWN, credit) may take, so that a
/// reset can reach a guest whose inbox data filled.
const CONTROL_RESERVE: usize = 64;
/// Most sibling connections one device tracks; more REQUESTs are answered with RST.
pub const MAX_SIBLING_CONNECTIONS: usize = super::MAX_CONNECTIONS;

/// Send-buffer bytes a link to a sibling in another process keeps for packets without
/// payload (an AF_UNIX message of a bare header takes about 1 KiB of it).
pub const REMOTE_CONTROL_RESERVE: usize = 128 << 10;
/// The send buffer asked for a link to a sibling in another process: a full inbox's
/// payload plus the control reserve. Without `CAP_NET_ADMIN` the kernel grants at most
/// twice `net.core.wmem_max` (416 KiB by default), which still works, with fewer packets
/// in flight.
pub const REMOTE_SEND_BUFFER: usize = MAX_INBOX_BYTES + REMOTE_CONTROL_RESERVE;
/// Most messages one device reset discards from a link.
const REMOTE_DRAIN_LIMIT: usize = 4 * MAX_INBOX_PACKETS;

/// A packet between guests: its header as the sending guest wrote it, and the payload.
#[derive(Debug)]
pub(crate) struct SiblingPacket {
    pub hdr: VsockHeader,
    pub payload: Vec<u8>,
}

#[derive(Debug, Default)]
struct Inbox {
    packets: VecDeque<SiblingPacket>,
    bytes: usize,
}

/// A link to a sibling device in another process: this device's end of a
/// `SOCK_SEQPACKET` pair.
struct Remote {
    /// The CID of the guest at the other end.
    cid: u64,
    sock: OwnedFd,
    /// The socket's send buffer as the kernel granted it.
    send_buffer: usize,
    /// The socket reported readable and has not been read to `EAGAIN` since (its epoll
    /// registration is edge-triggered).
    readable: AtomicBool,
}

/// The socket of a link [`VsockSibling::link_remote`] made, for the caller to watch
/// (it holds the link, so the fd stays open while the caller has it).
pub(crate) struct RemoteFd(Arc<Remote>);

impl fmt::Debug for RemoteFd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteFd")
            .field("cid", &self.0.cid)
            .field("fd", &self.0.sock)
            .finish()
    }
}

impl AsFd for RemoteFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.sock.as_fd()
    }
}

enum Peer {
    /// A device in this process.
    Local(Weak<Shared>),
    /// A device in another process.
    Remote(Arc<Remote>),
}

struct Shared {
    cid: u64,
    inbox: Mutex<Inbox>,
    /// Packets in `inbox`, readable without the lock.
    count: AtomicUsize,
    event: OwnedFd,
    peers: RwLock<HashMap<u64, Peer>>,
    /// The links to siblings in other processes (also in `peers`), in link order.
    remotes: RwLock<Vec<Arc<Remote>>>,
}

/// A message from a sibling in another process that failed the checks.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct InvalidRemote {
    /// The CID at the link's other end.
    pub cid: u64,
    /// What was wrong.
    pub reason: String,
}

/// Checks a message from the sibling with `link_cid` to the guest with `own_cid`:
/// `n` bytes, of which the first [`VsockHeader::SIZE`] are `hdr`.
fn check_remote(own_cid: u64, link_cid: u64, hdr: &VsockHeader, n: usize) -> Result<(), String> {
    if n < VsockHeader::SIZE {
        return Err(format!("message of {n} bytes, shorter than a header"));
    }
    let payload = n - VsockHeader::SIZE;
    let (len, src, dst) = (hdr.len, hdr.src_cid, hdr.dst_cid);
    if len as usize != payload || payload > MAX_PKT_BUF_SIZE as usize {
        return Err(format!("header len {len} with {payload} payload bytes"));
    }
    if src != link_cid || dst != own_cid {
        return Err(format!(
            "CIDs {src} -> {dst} on the link {link_cid} -> {own_cid}"
        ));
    }
    // Op, type, the payload bound, payload only on RW, the flags each op allows.
    hdr.validate().map_err(|e| e.to_string())
}

/// A connected pair of AF_UNIX `SOCK_SEQPACKET` sockets (non-blocking, close-on-exec)
/// for two sibling devices in different processes, one end each
/// ([`super::Vsock::link_sibling_socket`]). Each end's send buffer is raised to
/// [`REMOTE_SEND_BUFFER`] (`SO_SNDBUFFORCE` where the caller may, else as far as
/// `SO_SNDBUF` goes). Make the pair in the process that starts both devices and hand
/// each end to its device's process.
pub fn sibling_socket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let (a, b) = sys::seqpacket_pair()?;
    for end in [&a, &b] {
        sys::raise_send_buffer(end.as_fd(), REMOTE_SEND_BUFFER)?;
    }
    Ok((a, b))
}

/// Why a packet could not be put in a sibling's inbox.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Undeliverable {
    /// The CID is not a sibling (or its device is gone).
    NotSibling,
    /// The sibling's inbox is full.
    Full,
}

/// One vsock device's end of its sibling links: a cheap handle (clone it freely) that
/// the glue uses to let the guests of two devices reach each other
/// ([`VsockSibling::link`]). Get it from [`super::Vsock::sibling`].
#[derive(Clone)]
pub struct VsockSibling {
    shared: Arc<Shared>,
}

impl fmt::Debug for VsockSibling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VsockSibling")
            .field("cid", &self.shared.cid)
            .field("inbox", &self.shared.count.load(Ordering::Relaxed))
            .finish()
    }
}

impl VsockSibling {
    pub(crate) fn new(cid: u64) -> Result<Self, VsockError> {
        let event = sys::eventfd_create().map_err(VsockError::Epoll)?;
        Ok(VsockSibling {
            shared: Arc::new(Shared {
                cid,
                inbox: Mutex::new(Inbox::default()),
                count: AtomicUsize::new(0),
                event,
                peers: RwLock::new(HashMap::new()),
                remotes: RwLock::new(Vec::new()),
            }),
        })
    }

    /// The guest CID of the device this handle belongs to.
    pub fn cid(&self) -> u64 {
        self.shared.cid
    }

    /// Lets the guests of the two devices connect to each other by CID (both ways).
    /// Fails when both have the same CID.
    pub fn link(&self, other: &VsockSibling) -> Result<(), VsockError> {
        if self.cid() == other.cid() {
            return Err(VsockError::SiblingCid(self.cid()));
        }
        for (a, b) in [(self, other), (other, self)] {
            a.shared
                .peers
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(b.cid(), Peer::Local(Arc::downgrade(&b.shared)));
        }
        Ok(())
    }

    /// Makes `sock` (one end of a [`sibling_socket_pair`]) the link to sibling `cid` in
    /// another process. The caller watches `sock` (returned) for input (edge-triggered)
    /// and calls [`VsockSibling::clear_event`] when it reports.
    pub(crate) fn link_remote(&self, cid: u64, sock: OwnedFd) -> Result<RemoteFd, VsockError> {
        if cid == self.cid() {
            return Err(VsockError::SiblingCid(cid));
        }
        let bad = |reason: String| VsockError::SiblingSocket { cid, reason };
        sys::check_unix_seqpacket(sock.as_fd()).map_err(bad)?;
        sys::set_nonblocking(sock.as_fd()).map_err(|e| bad(format!("O_NONBLOCK: {e}")))?;
        let send_buffer =
            sys::send_buffer_size(sock.as_fd()).map_err(|e| bad(format!("SO_SNDBUF: {e}")))?;
        let remote = Arc::new(Remote {
            cid,
            sock,
            send_buffer,
            // Messages may wait from before this device existed.
            readable: AtomicBool::new(true),
        });
        self.shared
            .remotes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(remote.clone());
        self.shared
            .peers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(cid, Peer::Remote(remote.clone()));
        Ok(RemoteFd(remote))
    }

    pub(crate) fn event_fd(&self) -> BorrowedFd<'_> {
        self.shared.event.as_fd()
    }

    /// Whether `cid` is a linked sibling.
    pub(crate) fn is_sibling(&self, cid: u64) -> bool {
        self.shared
            .peers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&cid)
    }

    /// Puts `pkt` in the inbox of sibling `cid` and wakes its worker (or sends it over
    /// the link to a sibling in another process).
    pub(crate) fn send(&self, cid: u64, pkt: SiblingPacket) -> Result<(), Undeliverable> {
        let peer = {
            let peers = self
                .shared
                .peers
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            match peers.get(&cid) {
                Some(Peer::Local(weak)) => weak.upgrade(),
                Some(Peer::Remote(remote)) => {
                    let remote = remote.clone();
                    drop(peers);
                    return send_remote(&remote, &pkt);
                }
                None => None,
            }
        }
        .ok_or(Undeliverable::NotSibling)?;
        {
            let mut inbox = peer.inbox.lock().unwrap_or_else(PoisonError::into_inner);
            let len = pkt.payload.len();
            let limit = if len == 0 {
                MAX_INBOX_PACKETS + CONTROL_RESERVE
            } else {
                MAX_INBOX_PACKETS
            };
            if inbox.packets.len() >= limit || inbox.bytes + len > MAX_INBOX_BYTES {
                return Err(Undeliverable::Full);
            }
            inbox.bytes += len;
            inbox.packets.push_back(pkt);
            peer.count.store(inbox.packets.len(), Ordering::Release);
        }
        // A failed wake-up can only mean the counter is saturated: a wake-up is pending.
        let _ = sys::eventfd_signal(&peer.event);
        Ok(())
    }

    /// The next packet for this device's guest: from the inbox, else from a link to a
    /// sibling in another process.
    fn pop(&self) -> Option<Result<SiblingPacket, InvalidRemote>> {
        if let Some(pkt) = self.pop_local() {
            return Some(Ok(pkt));
        }
        let remotes = self
            .shared
            .remotes
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        remotes
            .iter()
            .filter(|r| r.readable.load(Ordering::Acquire))
            .find_map(|r| recv_remote(self.shared.cid, r))
    }

    fn pop_local(&self) -> Option<SiblingPacket> {
        if self.shared.count.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut inbox = self
            .shared
            .inbox
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let pkt = inbox.packets.pop_front()?;
        inbox.bytes -= pkt.payload.len();
        self.shared
            .count
            .store(inbox.packets.len(), Ordering::Release);
        Some(pkt)
    }

    /// Whether packets wait in the inbox (or may wait on a link).
    pub(crate) fn has_packets(&self) -> bool {
        self.shared.count.load(Ordering::Acquire) > 0
            || self
                .shared
                .remotes
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .any(|r| r.readable.load(Ordering::Acquire))
    }

    /// Clears the inbox's wake-up, and notes that the links may have messages (their
    /// edge-triggered reports come under the same token).
    pub(crate) fn clear_event(&self) {
        sys::timerfd_clear(&self.shared.event);
        for r in self
            .shared
            .remotes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            r.readable.store(true, Ordering::Release);
        }
    }

    /// Discards what waits in the inbox and (up to a bound) on the links.
    fn discard_all(&self) {
        while self.pop_local().is_some() {}
        let remotes = self
            .shared
            .remotes
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        for r in remotes.iter() {
            for _ in 0..REMOTE_DRAIN_LIMIT {
                if recv_remote(self.shared.cid, r).is_none() {
                    break;
                }
            }
        }
    }
}

/// Sends `pkt` over the link `r`: `Full` when its send buffer (beyond the control
/// reserve, for packets with payload) has no room.
fn send_remote(r: &Remote, pkt: &SiblingPacket) -> Result<(), Undeliverable> {
    let len = pkt.payload.len();
    if len > 0 {
        let unread = sys::unread_sent_bytes(r.sock.as_fd()).unwrap_or(usize::MAX);
        let need = unread
            .saturating_add(len)
            .saturating_add(REMOTE_CONTROL_RESERVE);
        if need > r.send_buffer {
            return Err(Undeliverable::Full);
        }
    }
    match sys::send_parts(r.sock.as_fd(), pkt.hdr.as_bytes(), &pkt.payload) {
        // A SEQPACKET message goes whole or not at all.
        Ok(_) => Ok(()),
        Err(e)
            if e.kind() == io::ErrorKind::WouldBlock
                || e.raw_os_error() == Some(libc::ENOBUFS)
                || e.raw_os_error() == Some(libc::ENOMEM) =>
        {
            Err(Undeliverable::Full)
        }
        // The other end is gone (EPIPE, ECONNRESET).
        Err(_) => Err(Undeliverable::NotSibling),
    }
}

/// Takes one message from the link `r` for the guest with `own_cid`; `None` (and the
/// link marked drained) when there is none.
fn recv_remote(own_cid: u64, r: &Remote) -> Option<Result<SiblingPacket, InvalidRemote>> {
    let mut head = [0u8; VsockHeader::SIZE];
    let mut payload = vec![0u8; MAX_PKT_BUF_SIZE as usize];
    loop {
        match sys::recv_parts(r.sock.as_fd(), &mut head, &mut payload) {
            Ok((0, _)) => {
                // End of file: the other end is closed, nothing more will come.
                r.readable.store(false, Ordering::Release);
                return None;
            }
            Ok((n, flags)) => {
                let invalid = |reason: String| Some(Err(InvalidRemote { cid: r.cid, reason }));
                if flags.contains(ReturnFlags::TRUNC) {
                    return invalid(format!("message longer than {n} bytes"));
                }
                let Ok(hdr) = VsockHeader::read_from_bytes(&head) else {
                    return invalid(format!("message of {n} bytes, shorter than a header"));
                };
                if let Err(reason) = check_remote(own_cid, r.cid, &hdr, n) {
                    return invalid(reason);
                }
                payload.truncate(n - VsockHeader::SIZE);
                return Some(Ok(SiblingPacket { hdr, payload }));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                // EAGAIN (drained) or an error that will repeat: wait for the next report.
                r.readable.store(false, Ordering::Release);
                return None;
            }
        }
    }
}

/// The credit state of one sibling connection, seen from this device's guest.
#[derive(Debug, Clone, Copy, Default)]
struct SiblingConn {
    /// The other guest's receive buffer and what it consumed of it.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Payload bytes this device's guest sent on the connection.
    tx_cnt: Wrapping<u32>,
}

/// `(guest port, sibling CID, sibling port)`.
type SiblingKey = (u32, u64, u32);

/// What the device does with a packet its guest sends to a sibling.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outgoing {
    /// Forward it.
    Forward,
    /// Do not forward it; answer the guest with RST (and tell the sibling when
    /// `tell_peer`).
    Reset { tell_peer: bool },
}

/// The sibling side of one device: its handle, its guest's sibling connections and the
/// packet being delivered to its guest.
pub(crate) struct Siblings {
    pub handle: VsockSibling,
    conns: HashMap<SiblingKey, SiblingConn>,
    /// The packet being delivered and how much of its payload went out already.
    cur: Option<(SiblingPacket, usize)>,
    guest_cid: u64,
}

impl Siblings {
    /// Whether this device is linked to any sibling (in this process or another).
    pub fn linked(&self) -> bool {
        let shared = &self.handle.shared;
        !shared
            .peers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
            || !shared
                .remotes
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty()
    }

    pub fn new(guest_cid: u64) -> Result<Self, VsockError> {
        Ok(Siblings {
            handle: VsockSibling::new(guest_cid)?,
            conns: HashMap::new(),
            cur: None,
            guest_cid,
        })
    }

    /// Forgets every connection and every waiting packet (device reset).
    pub fn reset(&mut self) {
        self.conns.clear();
        self.cur = None;
        self.handle.clear_event();
        self.handle.discard_all();
    }

    /// Whether anything waits for the RX queue.
    pub fn has_rx(&self) -> bool {
        self.cur.is_some() || self.handle.has_packets()
    }

    /// Checks a guest packet to a sibling against the connection table and the other
    /// guest's credit.
    pub fn outgoing(&mut self, hdr: &VsockHeader, op: VsockOp) -> Outgoing {
        let key = (hdr.src_port, hdr.dst_cid, hdr.dst_port);
        match op {
            VsockOp::Request => {
                if !self.conns.contains_key(&key) && self.conns.len() >= MAX_SIBLING_CONNECTIONS {
                    return Outgoing::Reset { tell_peer: false };
                }
                self.conns.insert(key, SiblingConn::default());
                Outgoing::Forward
            }
            VsockOp::Rst => {
                self.conns.remove(&key);
                Outgoing::Forward
            }
            _ => {
                let Some(c) = self.conns.get_mut(&key) else {
                    return Outgoing::Reset { tell_peer: false };
                };
                if op == VsockOp::Rw {
                    let in_flight = (c.tx_cnt - c.peer_fwd_cnt).0;
                    if u64::from(in_flight) + u64::from(hdr.len) > u64::from(c.peer_buf_alloc) {
                        self.conns.remove(&key);
                        return Outgoing::Reset { tell_peer: true };
                    }
                    c.tx_cnt += Wrapping(hdr.len);
                }
                Outgoing::Forward
            }
        }
    }

    /// Forgets the connection of guest port `port` with `(cid, peer_port)`.
    pub fn forget_ports(&mut self, port: u32, cid: u64, peer_port: u32) {
        self.conns.remove(&(port, cid, peer_port));
    }

    /// Records a packet from a sibling before its guest sees it; false when it must be
    /// refused (a REQUEST beyond the connection cap).
    fn incoming(&mut self, hdr: &VsockHeader) -> bool {
        let key = (hdr.dst_port, hdr.src_cid, hdr.src_port);
        match hdr.op() {
            Ok(VsockOp::Request) => {
                if !self.conns.contains_key(&key) && self.conns.len() >= MAX_SIBLING_CONNECTIONS {
                    return false;
                }
                self.conns.insert(key, SiblingConn::default());
            }
            Ok(VsockOp::Rst) => {
                self.conns.remove(&key);
                return true;
            }
            _ => {}
        }
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = hdr.buf_alloc;
            c.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        }
        true
    }

    /// An RST from this device's guest (port `src_port`) to sibling `cid` (port
    /// `dst_port`), for the sibling's inbox.
    pub fn rst_to_peer(&self, hdr: &VsockHeader) -> SiblingPacket {
        SiblingPacket {
            hdr: VsockHeader {
                src_cid: self.guest_cid,
                dst_cid: hdr.dst_cid,
                src_port: hdr.src_port,
                dst_port: hdr.dst_port,
                type_: hdr.type_,
                op: VsockOp::Rst as u16,
                ..Default::default()
            },
            payload: Vec::new(),
        }
    }

    /// Delivers waiting sibling packets into RX chains (a packet larger than a chain is
    /// split; seqpacket EOM/EOR go on its last part). Returns the chains used and
    /// whether the queue ran out of buffers.
    pub fn fill_rx(
        &mut self,
        q: &mut dyn VirtQueue,
        chain: &mut DescChain,
        metrics: &VsockMetrics,
    ) -> (usize, bool) {
        let mut used = 0;
        loop {
            if self.cur.is_none() {
                let pkt = match self.handle.pop() {
                    None => return (used, false),
                    Some(Ok(pkt)) => pkt,
                    Some(Err(bad)) => {
                        // Counted, and logged rate-limited: the sender decides how often
                        // it happens.
                        VsockMetrics::inc(&metrics.err_sibling_invalid);
                        outboard_protocol::log_limited!(
                            log::Level::Debug,
                            "sibling CID {}: dropped a message: {}",
                            bad.cid,
                            bad.reason
                        );
                        continue;
                    }
                };
                if !self.incoming(&pkt.hdr) {
                    VsockMetrics::inc(&metrics.err_conn_limit);
                    let rst = SiblingPacket {
                        hdr: VsockHeader {
                            src_cid: pkt.hdr.dst_cid,
                            dst_cid: pkt.hdr.src_cid,
                            src_port: pkt.hdr.dst_port,
                            dst_port: pkt.hdr.src_port,
                            type_: pkt.hdr.type_,
                            op: VsockOp::Rst as u16,
                            ..Default::default()
                        },
                        payload: Vec::new(),
                    };
                    let _ = self.handle.send(pkt.hdr.src_cid, rst);
                    continue;
                }
                self.cur = Some((pkt, 0));
            }
            match q.pop(chain) {
                Ok(true) => {}
                Ok(false) => return (used, true),
                Err(QueueError::BadChain { head, .. }) => {
                    VsockMetrics::inc(&metrics.err_queue);
                    if q.add_used(head, 0).is_err() {
                        return (used, true);
                    }
                    continue;
                }
                Err(_) => {
                    VsockMetrics::inc(&metrics.err_queue);
                    return (used, true);
                }
            }
            let room = chain
                .writable_len()
                .saturating_sub(VsockHeader::SIZE)
                .min(MAX_PKT_BUF_SIZE as usize);
            let Some((pkt, off)) = self.cur.as_mut() else {
                q.undo_pop();
                continue;
            };
            let left = pkt.payload.len() - *off;
            if chain.writable_len() < VsockHeader::SIZE || (room == 0 && left > 0) {
                VsockMetrics::inc(&metrics.err_rx_bad_buffer);
                if q.add_used(chain.head, 0).is_err() {
                    VsockMetrics::inc(&metrics.err_queue);
                }
                continue;
            }
            let n = left.min(room);
            let last = n == left;
            let mut hdr = pkt.hdr;
            hdr.len = n as u32;
            if !last {
                hdr.flags &= !(SeqpacketFlags::EOM | SeqpacketFlags::EOR).bits();
            }
            let payload = &pkt.payload[*off..*off + n];
            let mut w = ChainWriter::new(&chain.writable);
            let ok = w.write_obj(&hdr).is_ok() && w.write_bytes(payload).is_ok();
            let len = if ok { VsockHeader::SIZE + n } else { 0 };
            if q.add_used(chain.head, len as u32).is_err() {
                VsockMetrics::inc(&metrics.err_queue);
            }
            used += 1;
            VsockMetrics::inc(&metrics.rx_packets);
            VsockMetrics::add(&metrics.rx_bytes, n as u64);
            *off += n;
            if last {
                self.cur = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(len: usize) -> SiblingPacket {
        SiblingPacket {
            hdr: VsockHeader {
                src_cid: 3,
                dst_cid: 4,
                type_: 1,
                ..Default::default()
            },
            payload: vec![0; len],
        }
    }

    #[test]
    fn inbox_is_bounded_and_keeps_room_for_control_packets() {
        let a = VsockSibling::new(3).unwrap();
        let b = VsockSibling::new(4).unwrap();
        a.link(&b).unwrap();
        assert!(a.is_sibling(4) && b.is_sibling(3) && !a.is_sibling(5));
        let mut sent = 0;
        while a.send(4, pkt(64 * 1024)).is_ok() {
            sent += 1;
        }
        assert_eq!(sent, MAX_INBOX_BYTES / (64 * 1024));
        assert_eq!(a.send(4, pkt(1)), Err(Undeliverable::Full));
        for _ in sent..MAX_INBOX_PACKETS + CONTROL_RESERVE {
            a.send(4, pkt(0)).unwrap();
        }
        assert_eq!(a.send(4, pkt(0)), Err(Undeliverable::Full));
        assert_eq!(a.send(5, pkt(0)), Err(Undeliverable::NotSibling));
        let mut got = 0;
        while b.pop().is_some() {
            got += 1;
        }
        assert_eq!(got, MAX_INBOX_PACKETS + CONTROL_RESERVE);
        assert!(!b.has_packets());
        a.send(4, pkt(64 * 1024)).unwrap();
        // A device that is gone is no longer reachable.
        drop(b);
        assert_eq!(a.send(4, pkt(0)), Err(Undeliverable::NotSibling));
    }

    fn linked_remote() -> (VsockSibling, VsockSibling) {
        let a = VsockSibling::new(3).unwrap();
        let b = VsockSibling::new(4).unwrap();
        let (x, y) = sibling_socket_pair().unwrap();
        a.link_remote(4, x).unwrap();
        b.link_remote(3, y).unwrap();
        (a, b)
    }

    #[test]
    fn a_remote_link_keeps_order_and_room_for_control_packets() {
        let (a, b) = linked_remote();
        assert!(a.is_sibling(4) && b.is_sibling(3) && !a.is_sibling(5));
        let mut data = 0;
        loop {
            let mut p = pkt(64 * 1024);
            p.hdr.op = VsockOp::Rw as u16;
            p.hdr.len = 64 * 1024;
            p.hdr.src_port = data;
            match a.send(4, p) {
                Ok(()) => data += 1,
                Err(e) => {
                    assert_eq!(e, Undeliverable::Full);
                    break;
                }
            }
            assert!(data < 1000, "the link never filled");
        }
        assert!(data >= 1, "not one data packet fit");
        // The reserve still takes resets.
        for i in 0..32 {
            let mut rst = pkt(0);
            rst.hdr.op = VsockOp::Rst as u16;
            rst.hdr.src_port = 10_000 + i;
            a.send(4, rst).unwrap();
        }
        // Everything arrives, in order, checked.
        b.clear_event();
        let mut got = Vec::new();
        while let Some(p) = b.pop() {
            let p = p.unwrap();
            got.push((p.hdr.src_port, p.payload.len()));
        }
        let want: Vec<_> = (0..data)
            .map(|i| (i, 64 * 1024))
            .chain((0..32).map(|i| (10_000 + i, 0)))
            .collect();
        assert_eq!(got, want);
        assert!(!b.has_packets());
        // Drained: data fits again.
        let mut p = pkt(100);
        p.hdr.op = VsockOp::Rw as u16;
        p.hdr.len = 100;
        a.send(4, p).unwrap();
    }

    #[test]
    fn a_remote_link_drops_what_fails_the_checks() {
        let b = VsockSibling::new(4).unwrap();
        let (x, y) = sibling_socket_pair().unwrap();
        b.link_remote(3, y).unwrap();
        let good = VsockHeader {
            src_cid: 3,
            dst_cid: 4,
            type_: 1,
            op: VsockOp::Request as u16,
            ..Default::default()
        };
        let send = |hdr: &[u8], payload: &[u8]| {
            sys::send_parts(x.as_fd(), hdr, payload).unwrap();
        };
        let mut spoofed = good;
        spoofed.src_cid = 5;
        send(spoofed.as_bytes(), &[]);
        let mut misaddressed = good;
        misaddressed.dst_cid = 2;
        send(misaddressed.as_bytes(), &[]);
        send(&good.as_bytes()[..20], &[]);
        let mut short = good;
        short.op = VsockOp::Rw as u16;
        short.len = 10;
        send(short.as_bytes(), &[0; 9]);
        let mut payload_on_request = good;
        payload_on_request.len = 4;
        send(payload_on_request.as_bytes(), &[0; 4]);
        let mut bad_op = good;
        bad_op.op = 99;
        send(bad_op.as_bytes(), &[]);
        let mut bad_type = good;
        bad_type.type_ = 7;
        send(bad_type.as_bytes(), &[]);
        let mut huge = good;
        huge.op = VsockOp::Rw as u16;
        huge.len = MAX_PKT_BUF_SIZE + 1;
        send(huge.as_bytes(), &vec![0; MAX_PKT_BUF_SIZE as usize + 1]);
        send(good.as_bytes(), &[]);
        let mut reasons = Vec::new();
        let mut valid = Vec::new();
        while let Some(p) = b.pop() {
            match p {
                Ok(p) => valid.push(p.hdr),
                Err(e) => {
                    assert_eq!(e.cid, 3);
                    reasons.push(e.reason);
                }
            }
        }
        assert_eq!(reasons.len(), 8, "{reasons:?}");
        assert!(reasons[0].contains("CIDs 5 -> 4"), "{}", reasons[0]);
        assert!(
            reasons[2].contains("shorter than a header"),
            "{}",
            reasons[2]
        );
        assert!(reasons[7].contains("longer"), "{}", reasons[7]);
        assert_eq!(valid, vec![good]);
    }

    #[test]
    fn a_remote_link_must_be_a_seqpacket_socket_to_another_cid() {
        let a = VsockSibling::new(3).unwrap();
        let (x, _y) = sibling_socket_pair().unwrap();
        assert!(matches!(
            a.link_remote(3, x),
            Err(VsockError::SiblingCid(3))
        ));
        let (s, _t) = std::os::unix::net::UnixStream::pair().unwrap();
        let err = a.link_remote(4, OwnedFd::from(s)).unwrap_err();
        assert!(
            err.to_string().contains("not an AF_UNIX SOCK_SEQPACKET"),
            "{err}"
        );
        assert!(!a.is_sibling(4));
    }

    #[test]
    fn a_closed_remote_link_is_no_longer_a_sibling() {
        let a = VsockSibling::new(3).unwrap();
        let (x, y) = sibling_socket_pair().unwrap();
        a.link_remote(4, x).unwrap();
        drop(y);
        assert_eq!(a.send(4, pkt(0)), Err(Undeliverable::NotSibling));
        assert!(a.pop().is_none());
        assert!(!a.has_packets());
    }
}
