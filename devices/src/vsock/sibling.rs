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

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};

use outboard_protocol::vsock::{SeqpacketFlags, VsockHeader, VsockOp, MAX_PKT_BUF_SIZE};
use zerocopy::IntoBytes;

use super::sys;
use super::{VsockError, VsockMetrics};
use crate::virtio::{write_regions, DescChain, QueueError, VirtQueue};

/// Most packets an inbox holds.
pub const MAX_INBOX_PACKETS: usize = 1024;
/// Most payload bytes an inbox holds (the packets' headers come on top).
pub const MAX_INBOX_BYTES: usize = 4 << 20;
/// Inbox places only packets without payload (RST, SHUTDOWN, credit) may take, so that a
/// reset can reach a guest whose inbox data filled.
const CONTROL_RESERVE: usize = 64;
/// Most sibling connections one device tracks; more REQUESTs are answered with RST.
pub const MAX_SIBLING_CONNECTIONS: usize = super::MAX_CONNECTIONS;

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

struct Shared {
    cid: u64,
    inbox: Mutex<Inbox>,
    /// Packets in `inbox`, readable without the lock.
    count: AtomicUsize,
    event: OwnedFd,
    peers: RwLock<HashMap<u64, Weak<Shared>>>,
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
                .insert(b.cid(), Arc::downgrade(&b.shared));
        }
        Ok(())
    }

    pub(crate) fn event_fd(&self) -> RawFd {
        self.shared.event.as_raw_fd()
    }

    /// Whether `cid` is a linked sibling.
    pub(crate) fn is_sibling(&self, cid: u64) -> bool {
        self.shared
            .peers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&cid)
    }

    /// Puts `pkt` in the inbox of sibling `cid` and wakes its worker.
    pub(crate) fn send(&self, cid: u64, pkt: SiblingPacket) -> Result<(), Undeliverable> {
        let peer = self
            .shared
            .peers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&cid)
            .and_then(Weak::upgrade)
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

    fn pop(&self) -> Option<SiblingPacket> {
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

    /// Whether packets wait in the inbox.
    pub(crate) fn has_packets(&self) -> bool {
        self.shared.count.load(Ordering::Acquire) > 0
    }

    /// Clears the inbox's wake-up.
    pub(crate) fn clear_event(&self) {
        sys::timerfd_clear(&self.shared.event);
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
        while self.handle.pop().is_some() {}
        self.handle.clear_event();
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
                let Some(pkt) = self.handle.pop() else {
                    return (used, false);
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
            let ok = write_regions(&chain.writable, 0, hdr.as_bytes()) == VsockHeader::SIZE
                && write_regions(&chain.writable, VsockHeader::SIZE, payload) == n;
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
}
