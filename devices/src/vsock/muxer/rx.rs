//! RX scheduling: orphan RSTs first, then connections round robin, each turn sending
//! its control packets and then host data read straight into guest buffers.

use std::io;

use outboard_protocol::vsock::{SeqpacketFlags, VsockHeader, VsockOp, VsockType, MAX_PKT_BUF_SIZE};
use rustix::net::ReturnFlags;

use super::{HostSide, Muxer};
use crate::virtio::{ChainWriter, DescChain, IoRegion, QueueError, VirtQueue};
use crate::vsock::conn::{Action, Conn, ConnKey, Fault};
use crate::vsock::packet::write_rx_header;
use crate::vsock::sys::{self, IOV_MAX};
use crate::vsock::VsockMetrics;

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
pub(super) struct RxBufs {
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
            // The payload goes first, by `recvmsg` straight into these regions; the
            // header before it is written once its length is known (`put_used`).
            let mut w = ChainWriter::new(&chain.writable);
            let mut got = match w.skip(VsockHeader::SIZE) {
                Ok(()) => w.take_regions(room, &mut self.regions),
                Err(_) => 0,
            };
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
    pub(super) fn schedule(&mut self, key: ConnKey) {
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
            Err(e) if matches!(self.host, HostSide::Vsock { .. }) => {
                // An AF_VSOCK host socket on Linux < 6.3, which fails MSG_PEEK on
                // seqpacket sockets (EOPNOTSUPP, or ENOMEM on 6.1): the message's
                // length cannot be learned without consuming it.
                outboard_protocol::log_limited!(
                    log::Level::Warn,
                    "vsock: {}: the host kernel cannot peek at AF_VSOCK seqpacket \
                     messages ({e}; Linux < 6.3): the connection is reset",
                    conn.label()
                );
                self.apply(key, Action::Kill(Fault::Unsupported));
                return Turn::Progress;
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
            Ok((n, flags)) if n == msg_len && !flags.contains(ReturnFlags::TRUNC) => {
                let mut last = SeqpacketFlags::EOM;
                if flags.contains(ReturnFlags::EOR) {
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
