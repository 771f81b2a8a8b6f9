//! The virtio-vsock device.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use outboard_protocol::vsock::{
    VsockConfig, VsockEvent, VsockOp, EVENT_QUEUE, MIN_GUEST_CID, NUM_QUEUES, RX_QUEUE, TX_QUEUE,
    VIRTIO_ID_VSOCK, VIRTIO_VSOCK_F_SEQPACKET, VIRTIO_VSOCK_F_STREAM, VMADDR_CID_ANY,
    VMADDR_CID_HOST,
};
use zerocopy::IntoBytes;

use super::muxer::Muxer;
use super::packet::{parse_tx, PacketError, TxPacket};
use super::sibling::{Outgoing, SiblingPacket, Siblings, Undeliverable, VsockSibling};
use super::snapshot::{VsockSnapshot, VsockSnapshotError};
use super::{
    VsockBackend, VsockError, VsockMetrics, DEFAULT_TX_BUF_SIZE, MAX_CONNECTIONS,
    MAX_FORWARD_LISTEN_PORTS, MAX_TX_BUF_SIZE, QUEUE_SIZE,
};
use crate::virtio::{
    read_regions, ActivateError, ChainWriter, DescChain, Interrupt, IoRegion, QueueError,
    StateError, VirtQueue, VirtioDevice, MAX_CHAIN_REGIONS, VIRTIO_F_IN_ORDER, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

mod handover;

pub use self::handover::{VsockHandover, HANDOVER_MAGIC, HANDOVER_VERSION};

/// How to build a [`Vsock`] (the flags of `outboard vsock`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockDeviceConfig {
    /// The guest's CID (3 or more).
    pub guest_cid: u64,
    /// Where host-side connections live: the muxer's Unix socket path (`<uds_path>`,
    /// `<uds_path>_<port>`), or the host's AF_VSOCK.
    pub backend: VsockBackend,
    /// Per-connection TX buffer size, also the credit announced to the guest.
    pub tx_buf_size: u32,
    /// Most connections at once (1..=[`MAX_CONNECTIONS`]); more are refused with RST.
    pub max_connections: usize,
}

impl VsockDeviceConfig {
    /// A config with the AF_UNIX muxer at `uds_path` and the default TX buffer size.
    pub fn new(guest_cid: u64, uds_path: impl Into<PathBuf>) -> Self {
        Self::with_backend(guest_cid, VsockBackend::Unix(uds_path.into()))
    }

    /// A config with `backend` and the default TX buffer size.
    pub fn with_backend(guest_cid: u64, backend: VsockBackend) -> Self {
        VsockDeviceConfig {
            guest_cid,
            backend,
            tx_buf_size: DEFAULT_TX_BUF_SIZE,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

/// The virtio-vsock device with its AF_UNIX muxer.
///
/// Construct it with [`Vsock::new`] (this binds the listening sockets), hand it to a
/// transport as a [`VirtioDevice`], and run its event loop: poll
/// [`VirtioDevice::event_fd`] and the queues' kick fds, and call
/// [`VirtioDevice::handle_event`] / [`VirtioDevice::handle_queue`]. The typed
/// `handle_*_kick` methods are the same calls by name.
pub struct Vsock {
    guest_cid: u64,
    avail_features: u64,
    acked_features: u64,
    queue_sizes: [u16; NUM_QUEUES],
    muxer: Muxer,
    siblings: Siblings,
    queues: Vec<Box<dyn VirtQueue>>,
    interrupt: Option<Arc<dyn Interrupt>>,
    transport_reset_pending: bool,
    metrics: Arc<VsockMetrics>,
    chain: DescChain,
    payload: Vec<IoRegion>,
    batch: TxBatch,
}

/// Payload of consecutive guest RW packets for one stream connection, sent together.
#[derive(Debug, Default)]
struct TxBatch {
    key: Option<(u32, u32)>,
    regions: Vec<IoRegion>,
    len: u32,
    heads: Vec<u16>,
}

impl TxBatch {
    /// Most bytes and packets in one batch.
    const MAX_LEN: u32 = 256 * 1024;
    const MAX_PACKETS: usize = 64;

    fn fits(&self, key: (u32, u32), payload: &[IoRegion], len: u32) -> bool {
        self.key.is_none()
            || (self.key == Some(key)
                && self.heads.len() < Self::MAX_PACKETS
                && self.regions.len() + payload.len() <= MAX_CHAIN_REGIONS
                && self.len + len <= Self::MAX_LEN)
    }

    fn push(&mut self, key: (u32, u32), payload: &[IoRegion], len: u32, head: u16) {
        self.key = Some(key);
        self.regions.extend_from_slice(payload);
        self.len += len;
        self.heads.push(head);
    }

    fn clear(&mut self) {
        self.key = None;
        self.regions.clear();
        self.len = 0;
        self.heads.clear();
    }
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("guest_cid", &self.guest_cid)
            .field("acked_features", &self.acked_features)
            .field("active", &!self.queues.is_empty())
            .field("connections", &self.muxer.connection_count())
            .finish()
    }
}

impl Vsock {
    /// Features the device offers.
    pub const FEATURES: u64 = VIRTIO_F_VERSION_1
        | VIRTIO_RING_F_EVENT_IDX
        | VIRTIO_RING_F_INDIRECT_DESC
        | VIRTIO_F_IN_ORDER
        | VIRTIO_VSOCK_F_STREAM
        | VIRTIO_VSOCK_F_SEQPACKET;

    /// Creates the device and binds its listeners: `<uds_path>` (stream) and
    /// `<uds_path>_seqpacket`, or the AF_VSOCK forward ports.
    pub fn new(config: VsockDeviceConfig) -> Result<Self, VsockError> {
        Self::check_config(&config)?;
        let metrics = Arc::new(VsockMetrics::default());
        let muxer = Muxer::new(
            config.guest_cid,
            config.backend,
            config.tx_buf_size,
            config.max_connections,
            metrics.clone(),
        )?;
        Self::with_muxer(config.guest_cid, muxer, metrics)
    }

    /// Checks a configuration (what [`Vsock::new`] refuses).
    pub(crate) fn check_config(config: &VsockDeviceConfig) -> Result<(), VsockError> {
        let cid = config.guest_cid;
        if !(MIN_GUEST_CID..VMADDR_CID_ANY).contains(&cid) {
            return Err(VsockError::InvalidCid(cid));
        }
        if config.tx_buf_size == 0 || config.tx_buf_size > MAX_TX_BUF_SIZE {
            return Err(VsockError::TxBufSize(config.tx_buf_size));
        }
        if config.max_connections == 0 || config.max_connections > MAX_CONNECTIONS {
            return Err(VsockError::MaxConnections(config.max_connections));
        }
        if let VsockBackend::Vsock(fwd) = &config.backend {
            if fwd.cid == u32::MAX {
                return Err(VsockError::ForwardCid(fwd.cid));
            }
            let bad = |reason: String| VsockError::ForwardPorts {
                ports: fwd.listen_ports.clone(),
                reason,
            };
            if fwd.listen_ports.len() > MAX_FORWARD_LISTEN_PORTS {
                return Err(bad(format!(
                    "{} ports, at most {MAX_FORWARD_LISTEN_PORTS}",
                    fwd.listen_ports.len()
                )));
            }
            for (i, p) in fwd.listen_ports.iter().enumerate() {
                if *p == u32::MAX {
                    return Err(bad(format!("port {p} is VMADDR_PORT_ANY")));
                }
                if fwd.listen_ports[..i].contains(p) {
                    return Err(bad(format!("port {p} is given twice")));
                }
            }
        }
        Ok(())
    }

    /// The device around `muxer`.
    pub(crate) fn with_muxer(
        cid: u64,
        mut muxer: Muxer,
        metrics: Arc<VsockMetrics>,
    ) -> Result<Self, VsockError> {
        let siblings = Siblings::new(cid)?;
        muxer.watch_inbox(siblings.handle.event_fd(), false)?;
        Ok(Vsock {
            guest_cid: cid,
            avail_features: Self::FEATURES,
            acked_features: 0,
            queue_sizes: [QUEUE_SIZE; NUM_QUEUES],
            muxer,
            siblings,
            queues: Vec::new(),
            interrupt: None,
            transport_reset_pending: false,
            metrics,
            chain: DescChain::default(),
            payload: Vec::new(),
            batch: TxBatch::default(),
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The features the driver acked.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// This device's end of its sibling links. Link it with another device's
    /// ([`VsockSibling::link`]) and the two guests reach each other by CID, each device
    /// on its own thread: packets go, header and payload, through the other device's
    /// bounded inbox, so credit flow stays between the two guests. A guest packet to a
    /// CID that is neither the host nor a linked sibling is answered with RST.
    pub fn sibling(&self) -> VsockSibling {
        self.siblings.handle.clone()
    }

    /// Lets this device's guest reach sibling `cid`, whose device runs in another
    /// process, through `link`: this device's end of a [`sibling_socket_pair`] whose
    /// other end that device got ([`Vsock::link_sibling_socket`] there with this
    /// device's CID). Packets keep their order and credit fields, as between devices of
    /// one process ([`VsockSibling::link`]); see the sibling module for the checks on
    /// what comes in. Fails when `cid` is this device's own or `link` is not an AF_UNIX
    /// `SOCK_SEQPACKET` socket.
    ///
    /// [`sibling_socket_pair`]: super::sibling_socket_pair
    pub fn link_sibling_socket(&mut self, cid: u64, link: OwnedFd) -> Result<(), VsockError> {
        if !(MIN_GUEST_CID..VMADDR_CID_ANY).contains(&cid) {
            return Err(VsockError::InvalidCid(cid));
        }
        let fd = self.siblings.handle.link_remote(cid, link)?;
        self.muxer.watch_inbox(fd, true)
    }

    /// The device's counters (shared; read them from any thread).
    pub fn metrics(&self) -> Arc<VsockMetrics> {
        self.metrics.clone()
    }

    /// Live connections (including ones waiting for their final RST to be delivered).
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Whether the device is active.
    pub fn is_active(&self) -> bool {
        self.queues.len() == NUM_QUEUES
    }

    /// Drops every connection (closing the host sockets) and sends the guest
    /// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` on the event queue, now or as soon as the
    /// guest posts an event buffer. A VMM calls this after restoring a snapshot, so the
    /// guest forgets connections whose host side no longer exists instead of hanging.
    pub fn transport_reset(&mut self) {
        self.muxer.reset();
        self.siblings.reset();
        self.transport_reset_pending = true;
        self.handle_event_kick();
    }

    /// Whether a TRANSPORT_RESET event waits for an event buffer.
    pub fn transport_reset_pending(&self) -> bool {
        self.transport_reset_pending
    }

    /// The device's state (see [`VsockSnapshot`] for what it carries): its guest CID,
    /// the features it offers and the features the driver acked.
    pub fn save_state(&self) -> VsockSnapshot {
        VsockSnapshot {
            guest_cid: self.guest_cid,
            offered_features: self.avail_features,
            acked_features: self.acked_features,
        }
    }

    /// Restores [`Vsock::save_state`]'s state: takes its acked features, closes every
    /// host socket and tells the guest TRANSPORT_RESET ([`Vsock::transport_reset`]), so
    /// the guest drops connections whose host side is gone. Refuses, changing nothing,
    /// state of another guest CID or with acked features this device does not offer.
    pub fn restore_state_from(&mut self, state: &VsockSnapshot) -> Result<(), VsockSnapshotError> {
        if state.guest_cid != self.guest_cid {
            return Err(VsockSnapshotError::CidMismatch {
                snapshot: state.guest_cid,
                device: self.guest_cid,
            });
        }
        let extra = state.acked_features & !self.avail_features;
        if extra != 0 {
            return Err(VsockSnapshotError::FeaturesNotOffered {
                acked: state.acked_features,
                extra,
                by: "this device",
            });
        }
        self.ack_features(state.acked_features);
        self.transport_reset();
        Ok(())
    }

    fn signal(&mut self, queue: usize) {
        crate::virtio::signal_used(&mut self.queues, queue, self.interrupt.as_deref());
    }

    /// The driver kicked the TX queue: forwards every packet, then fills RX with what
    /// that produced.
    pub fn handle_tx_kick(&mut self) {
        if !self.is_active() {
            return;
        }
        let mut used = false;
        loop {
            loop {
                let q = &mut self.queues[TX_QUEUE];
                let head = match q.pop(&mut self.chain) {
                    Ok(false) => break,
                    Ok(true) => {
                        VsockMetrics::inc(&self.metrics.tx_packets);
                        let head = self.chain.head;
                        let siblings = &self.siblings.handle;
                        let is_sibling = |cid| siblings.is_sibling(cid);
                        match parse_tx(&self.chain, self.guest_cid, is_sibling, &mut self.payload) {
                            Ok(pkt) if pkt.hdr.dst_cid != VMADDR_CID_HOST => {
                                self.flush_batch();
                                self.sibling_tx(&pkt);
                            }
                            Ok(pkt) => {
                                if let Some(key) = self.muxer.take_rw(&pkt) {
                                    // Consecutive data for one stream goes out in one
                                    // sendmsg; the chains are returned after it.
                                    let len = pkt.hdr.len;
                                    if !self.batch.fits(key, &self.payload, len) {
                                        self.flush_batch();
                                    }
                                    self.batch.push(key, &self.payload, len, head);
                                    continue;
                                }
                                self.flush_batch();
                                self.muxer.handle_tx(&pkt, &self.payload)
                            }
                            Err(refused) => {
                                self.flush_batch();
                                let m = &self.metrics;
                                VsockMetrics::inc(match refused.err {
                                    PacketError::DstCid(_) | PacketError::SrcCid { .. } => {
                                        &m.err_tx_bad_cid
                                    }
                                    PacketError::Invalid(_) => &m.err_tx_invalid,
                                    PacketError::LenBeyondChain { .. }
                                    | PacketError::LenTooBig(_) => &m.err_tx_bad_len,
                                    PacketError::ShortHeader(_) => &m.err_tx_short_header,
                                    PacketError::WriteOnlyHeader => &m.err_tx_write_only_header,
                                });
                                outboard_protocol::log_limited!(
                                    log::Level::Debug,
                                    "vsock: dropped tx packet: {}",
                                    refused.err
                                );
                                if refused.dst_cid == VMADDR_CID_HOST {
                                    self.muxer.refuse(&refused);
                                } else if let Some((src, dst, ty)) = refused.reply {
                                    // A sibling's or an unknown CID's connection: RST
                                    // from that CID; the host's are not touched.
                                    self.siblings.forget_ports(src, refused.dst_cid, dst);
                                    self.muxer.orphan_rst_from(refused.dst_cid, src, dst, ty);
                                }
                            }
                        }
                        head
                    }
                    Err(QueueError::BadChain { head, .. }) => {
                        // Chains are used in order (VIRTIO_F_IN_ORDER).
                        self.flush_batch();
                        VsockMetrics::inc(&self.metrics.err_queue);
                        head
                    }
                    Err(_) => {
                        VsockMetrics::inc(&self.metrics.err_queue);
                        break;
                    }
                };
                if self.queues[TX_QUEUE].add_used(head, 0).is_err() {
                    VsockMetrics::inc(&self.metrics.err_queue);
                }
                used = true;
            }
            used |= self.flush_batch();
            match self.queues[TX_QUEUE].enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(_) => {
                    VsockMetrics::inc(&self.metrics.err_queue);
                    break;
                }
            }
        }
        if used {
            self.signal(TX_QUEUE);
        }
        self.fill_rx();
        self.muxer.rearm_timer();
    }

    /// Forwards a guest packet to a sibling's inbox, or resets the connection when the
    /// guest oversteps the other guest's credit or that inbox is full.
    fn sibling_tx(&mut self, pkt: &TxPacket) {
        let h = pkt.hdr;
        let m = &self.metrics;
        let reset = match self.siblings.outgoing(&h, pkt.op) {
            Outgoing::Forward => {
                // `self.payload` is not a chain half but the `len` bytes of it that
                // parse_tx took (for a `sendmsg` to a host socket); a sibling gets them
                // copied, with the primitive under ChainReader.
                let mut payload = vec![0u8; h.len as usize];
                read_regions(&self.payload, 0, &mut payload);
                match self
                    .siblings
                    .handle
                    .send(h.dst_cid, SiblingPacket { hdr: h, payload })
                {
                    Ok(()) => {
                        VsockMetrics::inc(&m.sibling_packets);
                        VsockMetrics::add(&m.tx_bytes, u64::from(h.len));
                        return;
                    }
                    Err(Undeliverable::Full) => {
                        VsockMetrics::inc(&m.err_sibling_overrun);
                        true
                    }
                    Err(Undeliverable::NotSibling) => {
                        VsockMetrics::inc(&m.err_tx_bad_cid);
                        false
                    }
                }
            }
            Outgoing::Reset { tell_peer } => {
                VsockMetrics::inc(if tell_peer {
                    &m.err_sibling_overrun
                } else {
                    &m.err_no_connection
                });
                tell_peer
            }
        };
        self.siblings
            .forget_ports(h.src_port, h.dst_cid, h.dst_port);
        if pkt.op != VsockOp::Rst {
            self.muxer
                .orphan_rst_from(h.dst_cid, h.src_port, h.dst_port, h.type_);
        }
        if reset {
            let rst = self.siblings.rst_to_peer(&h);
            // The inbox keeps room for packets without payload; if even that is full,
            // the other guest learns of the reset from its next packet.
            let _ = self.siblings.handle.send(h.dst_cid, rst);
        }
    }

    /// Sends the batched stream data and returns its chains; true when there were any.
    fn flush_batch(&mut self) -> bool {
        let Some(key) = self.batch.key.take() else {
            return false;
        };
        self.muxer
            .handle_rw_batch(key, &self.batch.regions, self.batch.len);
        for &head in &self.batch.heads {
            if self.queues[TX_QUEUE].add_used(head, 0).is_err() {
                VsockMetrics::inc(&self.metrics.err_queue);
            }
        }
        self.batch.clear();
        true
    }

    /// The driver kicked the RX queue (new receive buffers).
    pub fn handle_rx_kick(&mut self) {
        self.fill_rx();
        self.muxer.rearm_timer();
    }

    /// The muxer's epoll set is readable: host sockets, listeners, timers.
    pub fn handle_backend_event(&mut self) {
        self.muxer.process_events();
        if self.muxer.take_inbox_event() {
            self.siblings.handle.clear_event();
        }
        self.fill_rx();
        self.muxer.rearm_timer();
    }

    /// The driver kicked the event queue (new event buffers).
    pub fn handle_event_kick(&mut self) {
        if !self.is_active() {
            return;
        }
        let mut used = false;
        while self.transport_reset_pending {
            if !self.deliver_event(&mut used) {
                // No buffer: wait for a kick, unless one arrived meanwhile.
                match self.queues[EVENT_QUEUE].enable_notification() {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(_) => {
                        VsockMetrics::inc(&self.metrics.err_queue);
                        break;
                    }
                }
            }
        }
        if used {
            self.signal(EVENT_QUEUE);
        }
    }

    /// Puts TRANSPORT_RESET into the next usable event buffer; false when there is none.
    fn deliver_event(&mut self, used: &mut bool) -> bool {
        let q = &mut self.queues[EVENT_QUEUE];
        loop {
            let head = match q.pop(&mut self.chain) {
                Ok(false) => return false,
                Ok(true) => {
                    let event = VsockEvent::TRANSPORT_RESET;
                    let mut w = ChainWriter::new(&self.chain.writable);
                    if w.write_obj(&event).is_ok() {
                        if q.add_used(self.chain.head, w.written() as u32).is_err() {
                            VsockMetrics::inc(&self.metrics.err_queue);
                        }
                        self.transport_reset_pending = false;
                        *used = true;
                        return true;
                    }
                    VsockMetrics::inc(&self.metrics.err_event_queue);
                    self.chain.head
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
            if q.add_used(head, 0).is_err() {
                VsockMetrics::inc(&self.metrics.err_queue);
            }
            *used = true;
        }
    }

    fn fill_rx(&mut self) {
        if !self.is_active() || !(self.muxer.has_rx() || self.siblings.has_rx()) {
            return;
        }
        let mut used = 0;
        let mut retried_idle = false;
        loop {
            let q = self.queues[RX_QUEUE].as_mut();
            let (n, mut starved) = self.siblings.fill_rx(q, &mut self.chain, &self.metrics);
            let mut round = n;
            if self.muxer.has_rx() {
                let (n, s) = self.muxer.fill_rx(q);
                round += n;
                starved |= s;
            }
            used += round;
            if !starved {
                break;
            }
            // "Starved" with buffers still available means they cannot take what is
            // waiting (a header-only buffer for stream data, too little room for a
            // SEQPACKET message): the chains were put back. Go round again only after a
            // pass that used something, or once after enabling notifications (buffers
            // may have arrived in between); never on the same unusable buffers again.
            if round == 0 {
                if retried_idle {
                    break;
                }
                retried_idle = true;
            } else {
                retried_idle = false;
            }
            match self.queues[RX_QUEUE].enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(_) => {
                    VsockMetrics::inc(&self.metrics.err_queue);
                    break;
                }
            }
        }
        if used > 0 {
            self.signal(RX_QUEUE);
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
        self.muxer
            .set_seqpacket(self.acked_features & VIRTIO_VSOCK_F_SEQPACKET != 0);
    }

    fn config_size(&self) -> usize {
        std::mem::size_of::<VsockConfig>()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = VsockConfig {
            guest_cid: self.guest_cid,
        };
        let bytes = config.as_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|at| bytes.get(at))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        outboard_protocol::log_limited!(
            log::Level::Debug,
            "vsock: ignored write of {} bytes to read-only config at {offset:#x}",
            data.len()
        );
    }

    fn activate(
        &mut self,
        queues: Vec<Box<dyn VirtQueue>>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), ActivateError> {
        if self.is_active() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != NUM_QUEUES {
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                got: queues.len(),
            });
        }
        self.queues = queues;
        self.interrupt = Some(interrupt);
        self.handle_tx_kick();
        self.handle_event_kick();
        Ok(())
    }

    fn reset(&mut self) {
        self.queues.clear();
        self.interrupt = None;
        self.muxer.reset();
        self.siblings.reset();
        self.acked_features = 0;
        self.muxer.set_seqpacket(false);
        self.transport_reset_pending = false;
    }

    /// Yes: packets go into RX and event chains only, and every chain is returned with
    /// the bytes written into it (header and payload).
    fn writes_only_to_used_chains(&self) -> bool {
        true
    }

    fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.muxer.epoll_fd())
    }

    fn handle_queue(&mut self, queue: usize) {
        match queue {
            RX_QUEUE => self.handle_rx_kick(),
            TX_QUEUE => self.handle_tx_kick(),
            EVENT_QUEUE => self.handle_event_kick(),
            _ => outboard_protocol::log_limited!(
                log::Level::Debug,
                "vsock: kick on nonexistent queue {queue}"
            ),
        }
    }

    fn handle_event(&mut self) {
        self.handle_backend_event();
    }

    fn supports_state(&self) -> bool {
        true
    }

    fn snapshot_state(&mut self) -> Result<Vec<u8>, StateError> {
        Ok(self.save_state().to_bytes())
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), StateError> {
        let state =
            VsockSnapshot::from_bytes(state).map_err(|e| StateError::Refused(e.to_string()))?;
        self.restore_state_from(&state)
            .map_err(|e| StateError::Refused(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoIrq;
    impl Interrupt for NoIrq {
        fn signal_used_queue(&self, _: usize) {}
        fn signal_config_change(&self) {}
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("outboard-unit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn config_features_and_validation() {
        let d = dir("cfg");
        let mut dev = Vsock::new(VsockDeviceConfig::new(0x1234_5678, d.join("v"))).unwrap();
        assert_eq!(dev.device_type(), 19);
        assert_eq!(dev.queue_max_sizes().len(), 3);
        let f = dev.features();
        assert_ne!(f & VIRTIO_F_VERSION_1, 0);
        assert_ne!(f & VIRTIO_RING_F_EVENT_IDX, 0);
        assert_ne!(f & VIRTIO_VSOCK_F_SEQPACKET, 0);
        let mut cfg = [0u8; 8];
        dev.read_config(0, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg), 0x1234_5678);
        let mut tail = [0xffu8; 4];
        dev.read_config(6, &mut tail);
        assert_eq!(tail, [0, 0, 0, 0]);
        dev.read_config(u64::MAX, &mut tail);
        assert_eq!(tail, [0; 4]);
        dev.write_config(0, &[9; 8]);
        dev.read_config(0, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg), 0x1234_5678, "config is read-only");
        assert!(matches!(
            dev.activate(Vec::new(), Arc::new(NoIrq)),
            Err(ActivateError::QueueCount {
                expected: 3,
                got: 0
            })
        ));
        assert!(dev.event_fd().is_some());
        // The socket path is taken now.
        assert!(matches!(
            Vsock::new(VsockDeviceConfig::new(3, d.join("v"))),
            Err(VsockError::Listen { .. })
        ));
        for cid in [0, 1, 2, 0xffff_ffff] {
            assert!(matches!(
                Vsock::new(VsockDeviceConfig::new(cid, d.join("x"))),
                Err(VsockError::InvalidCid(c)) if c == cid
            ));
        }
        let mut c = VsockDeviceConfig::new(3, d.join("y"));
        c.tx_buf_size = 0;
        assert!(matches!(
            Vsock::new(c.clone()),
            Err(VsockError::TxBufSize(0))
        ));
        c.tx_buf_size = DEFAULT_TX_BUF_SIZE;
        c.max_connections = MAX_CONNECTIONS + 1;
        assert!(matches!(Vsock::new(c), Err(VsockError::MaxConnections(_))));
        let _ = std::fs::remove_dir_all(&d);
    }
}
