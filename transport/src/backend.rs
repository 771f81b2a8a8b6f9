//! The back-end server: [`BackendReqHandler`] validates every front-end request and
//! calls a [`VhostUserBackendReqHandler`]; [`Listener`] accepts front-ends.
//!
//! # Serving one connection
//!
//! ```no_run
//! # use outboard_transport::backend::{Listener, VhostUserBackendReqHandler};
//! # fn serve<B: VhostUserBackendReqHandler>(device: B) -> outboard_transport::Result<()> {
//! let listener = Listener::bind("/tmp/vsock.sock", true)?;
//! let conn = listener.accept()?.expect("blocking accept returns a connection");
//! let mut handler = outboard_transport::BackendReqHandler::new(conn, device);
//! // Either block here...
//! handler.run()?;
//! // ...or put `handler.as_fd()` in your own epoll and call `handler.handle_request()`
//! // each time it is readable.
//! # Ok(()) }
//! ```
//!
//! # What is checked before the trait is called
//!
//! For every message, in this order: the size bound (before anything is allocated), the
//! header's version and reserved flags, that REPLY is not set, that the request code is
//! known, that `SET_OWNER` came first (see below), that the request's protocol feature
//! was negotiated (and `VHOST_USER_F_PROTOCOL_FEATURES` offered where the spec needs
//! it), the body size, the number of fds, and the body's own validation (including ring
//! indexes against [`VhostUserBackendReqHandler::max_queues`]).
//!
//! A refused message is answered with an error status when the front-end asked for one
//! (NEED_REPLY with `REPLY_ACK` negotiated, or a request whose reply carries a status)
//! and [`BackendReqHandler::handle_request`] returns the error; the body has been
//! consumed, so the connection stays usable. Close the connection when
//! [`Error::is_fatal`] is true (a disconnect, an oversized or truncated message, a
//! socket error) or when [`BackendReqHandler::peer_waiting`] is (a request whose reply
//! cannot carry an error failed, so the front-end would wait forever);
//! [`BackendReqHandler::run`] does both.
//!
//! # SET_OWNER
//!
//! QEMU negotiates features before it claims the back-end: its `vhost_backend_init`
//! sends `GET_FEATURES`, `GET_PROTOCOL_FEATURES`, `SET_PROTOCOL_FEATURES`,
//! `GET_QUEUE_NUM`, `GET_MAX_MEM_SLOTS` and `SET_BACKEND_REQ_FD` before `SET_OWNER`. Those
//! (and `GET_CONFIG`, `GET_SHMEM_CONFIG`) are accepted before `SET_OWNER`; every other
//! request is refused with [`Error::InvalidOperation`] until the front-end owns the
//! session, and a second `SET_OWNER` is refused too (`RESET_OWNER` ends ownership).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use outboard_protocol::vhost_user::{
    mem_table_regions, parse_config, parse_mem_table, parse_vring_fd_u64, BodySize, FdCount,
    FrontendReq, Header, Reply, TransferDirection, TransferPhase, VhostUserConfig,
    VhostUserInflight, VhostUserIotlb, VhostUserLog, VhostUserMemoryRegion,
    VhostUserProtocolFeatures, VhostUserShared, VhostUserShmemConfig, VhostUserSingleMemoryRegion,
    VhostUserTransferDeviceState, VhostUserU64, VhostUserVirtioFeatures, VhostUserVringAddr,
    VhostUserVringState, MAX_MSG_SIZE,
};
use outboard_protocol::{parse, ProtocolError, Validate};
use zerocopy::IntoBytes;

use crate::backend_req::BackendReqSender;
use crate::connection::{Connection, PartialMessage};
use crate::error::{Error, HandlerResult, Result};

/// A guest memory region with the fd that backs it (`SET_MEM_TABLE`, `ADD_MEM_REG`).
#[derive(Debug)]
pub struct MemoryRegion {
    /// The region as the front-end described it (validated: non-zero size, no overflow).
    pub region: VhostUserMemoryRegion,
    /// The fd to map (`mmap_offset` is the offset in it).
    pub fd: OwnedFd,
}

fn enosys<T>() -> HandlerResult<T> {
    Err(std::io::Error::from_raw_os_error(libc::ENOSYS))
}

/// What a vhost-user back-end device implements. [`BackendReqHandler`] calls it with
/// validated input only.
///
/// The required methods are what every device needs (feature negotiation, memory,
/// rings); the others default to "not supported" (`ENOSYS`, which the front-end sees as
/// an error status where the protocol has one) or, for notifications a device may
/// ignore, to success. Ring indexes are already checked against
/// [`max_queues`](Self::max_queues). File descriptors arrive as [`OwnedFd`]s: keep them
/// or drop them (which closes them).
pub trait VhostUserBackendReqHandler {
    /// Number of queues the device has; ring indexes at or above it are refused.
    fn max_queues(&self) -> u32;

    /// `GET_FEATURES`: the virtio features the device offers (include
    /// [`VhostUserVirtioFeatures::PROTOCOL_FEATURES`] to allow protocol features).
    fn get_features(&mut self) -> HandlerResult<u64>;

    /// `SET_FEATURES`: the features the driver accepted (a subset of the offer, already
    /// checked).
    fn set_features(&mut self, features: u64) -> HandlerResult<()>;

    /// `GET_PROTOCOL_FEATURES`: the protocol features the device supports.
    fn get_protocol_features(&mut self) -> HandlerResult<VhostUserProtocolFeatures>;

    /// `SET_PROTOCOL_FEATURES`: the accepted protocol features (a subset of the offer).
    fn set_protocol_features(&mut self, features: VhostUserProtocolFeatures) -> HandlerResult<()> {
        let _ = features;
        Ok(())
    }

    /// `SET_OWNER`: a front-end claimed the session.
    fn set_owner(&mut self) -> HandlerResult<()> {
        Ok(())
    }

    /// `RESET_OWNER` (deprecated): the front-end gave the session up.
    fn reset_owner(&mut self) -> HandlerResult<()> {
        Ok(())
    }

    /// `SET_MEM_TABLE`: replace the whole guest memory table.
    fn set_mem_table(&mut self, regions: Vec<MemoryRegion>) -> HandlerResult<()>;

    /// `SET_VRING_NUM`: ring size.
    fn set_vring_num(&mut self, index: u32, num: u32) -> HandlerResult<()>;

    /// `SET_VRING_ADDR`: ring addresses (validated alignment and flags).
    fn set_vring_addr(&mut self, addr: &VhostUserVringAddr) -> HandlerResult<()>;

    /// `SET_VRING_BASE`: next available index.
    fn set_vring_base(&mut self, index: u32, base: u32) -> HandlerResult<()>;

    /// `GET_VRING_BASE`: stop the ring and return its next available index.
    fn get_vring_base(&mut self, index: u32) -> HandlerResult<u32>;

    /// `SET_VRING_KICK`: the kick eventfd (`None`: poll the ring). Starts the ring.
    fn set_vring_kick(&mut self, index: u32, fd: Option<OwnedFd>) -> HandlerResult<()>;

    /// `SET_VRING_CALL`: the call eventfd (`None`: no interrupts).
    fn set_vring_call(&mut self, index: u32, fd: Option<OwnedFd>) -> HandlerResult<()>;

    /// `SET_VRING_ERR`: the error eventfd. Ignored by default.
    fn set_vring_err(&mut self, index: u32, fd: Option<OwnedFd>) -> HandlerResult<()> {
        let _ = (index, fd);
        Ok(())
    }

    /// `SET_VRING_ENABLE`: enable or disable a ring.
    fn set_vring_enable(&mut self, index: u32, enable: bool) -> HandlerResult<()>;

    /// `GET_QUEUE_NUM` (`MQ`): defaults to [`max_queues`](Self::max_queues).
    fn get_queue_num(&mut self) -> HandlerResult<u64> {
        Ok(self.max_queues().into())
    }

    /// `GET_CONFIG` (`CONFIG`): `size` bytes of config space at `offset`. `flags` is the
    /// spec's value (0: front-end access, 1: migration).
    fn get_config(&mut self, offset: u32, size: u32, flags: u32) -> HandlerResult<Vec<u8>> {
        let _ = (offset, size, flags);
        enosys()
    }

    /// `SET_CONFIG` (`CONFIG`).
    fn set_config(&mut self, offset: u32, data: &[u8], flags: u32) -> HandlerResult<()> {
        let _ = (offset, data, flags);
        enosys()
    }

    /// `SET_BACKEND_REQ_FD` (`BACKEND_REQ`): the back-end -> front-end channel. Keep the
    /// [`BackendReqSender`] (it is `Clone`) to send config changes, shared memory maps, ...
    fn set_backend_req_fd(&mut self, backend: BackendReqSender) -> HandlerResult<()> {
        drop(backend);
        Ok(())
    }

    /// `GET_MAX_MEM_SLOTS` (`CONFIGURE_MEM_SLOTS`).
    fn get_max_mem_slots(&mut self) -> HandlerResult<u64> {
        enosys()
    }

    /// `ADD_MEM_REG` (`CONFIGURE_MEM_SLOTS`).
    fn add_mem_region(&mut self, region: MemoryRegion) -> HandlerResult<()> {
        drop(region);
        enosys()
    }

    /// `REM_MEM_REG` (`CONFIGURE_MEM_SLOTS`): remove the region that matches.
    fn remove_mem_region(&mut self, region: &VhostUserMemoryRegion) -> HandlerResult<()> {
        let _ = region;
        enosys()
    }

    /// `GET_INFLIGHT_FD` (`INFLIGHT_SHMFD`): allocate the inflight area.
    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> HandlerResult<(VhostUserInflight, OwnedFd)> {
        let _ = inflight;
        enosys()
    }

    /// `SET_INFLIGHT_FD` (`INFLIGHT_SHMFD`).
    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, fd: OwnedFd) -> HandlerResult<()> {
        let _ = (inflight, fd);
        enosys()
    }

    /// `SET_LOG_BASE` (`LOG_SHMFD`): the dirty log area.
    fn set_log_base(&mut self, log: &VhostUserLog, fd: OwnedFd) -> HandlerResult<()> {
        let _ = (log, fd);
        enosys()
    }

    /// `SET_LOG_FD` (`LOG_SHMFD`): the eventfd signalled after a log update.
    fn set_log_fd(&mut self, fd: OwnedFd) -> HandlerResult<()> {
        drop(fd);
        enosys()
    }

    /// `SET_STATUS` (`STATUS`): the virtio device status byte.
    fn set_status(&mut self, status: u8) -> HandlerResult<()> {
        let _ = status;
        enosys()
    }

    /// `GET_STATUS` (`STATUS`).
    fn get_status(&mut self) -> HandlerResult<u8> {
        enosys()
    }

    /// `RESET_DEVICE` (`RESET_DEVICE`): disable all rings and reset the device.
    fn reset_device(&mut self) -> HandlerResult<()> {
        enosys()
    }

    /// `GET_SHMEM_CONFIG` (`SHMEM`): the VIRTIO shared memory regions.
    fn get_shmem_config(&mut self) -> HandlerResult<VhostUserShmemConfig> {
        enosys()
    }

    /// `SET_DEVICE_STATE_FD` (`DEVICE_STATE`): start a state transfer through `fd`.
    /// Return `Some(fd)` to have the front-end use another fd instead.
    fn set_device_state_fd(
        &mut self,
        direction: TransferDirection,
        phase: TransferPhase,
        fd: OwnedFd,
    ) -> HandlerResult<Option<OwnedFd>> {
        let _ = (direction, phase, fd);
        enosys()
    }

    /// `CHECK_DEVICE_STATE` (`DEVICE_STATE`): whether the transfer succeeded.
    fn check_device_state(&mut self) -> HandlerResult<()> {
        enosys()
    }

    /// `GET_SHARED_OBJECT` (`SHARED_OBJECT`): the dma-buf fd of a shared object.
    fn get_shared_object(&mut self, uuid: &VhostUserShared) -> HandlerResult<OwnedFd> {
        let _ = uuid;
        enosys()
    }

    /// `IOTLB_MSG`: an IOTLB update or invalidation.
    fn iotlb_msg(&mut self, msg: &VhostUserIotlb) -> HandlerResult<()> {
        let _ = msg;
        enosys()
    }

    /// `SEND_RARP` (`RARP`): announce this MAC address.
    fn send_rarp(&mut self, mac: [u8; 6]) -> HandlerResult<()> {
        let _ = mac;
        enosys()
    }

    /// `NET_SET_MTU` (`MTU`).
    fn net_set_mtu(&mut self, mtu: u64) -> HandlerResult<()> {
        let _ = mtu;
        enosys()
    }

    /// `SET_VRING_ENDIAN` (`CROSS_ENDIAN`): `big_endian` for legacy big-endian rings.
    fn set_vring_endian(&mut self, index: u32, big_endian: bool) -> HandlerResult<()> {
        let _ = (index, big_endian);
        enosys()
    }

    /// `VRING_KICK` (`INBAND_NOTIFICATIONS`): an in-band kick.
    fn vring_kick(&mut self, index: u32) -> HandlerResult<()> {
        let _ = index;
        enosys()
    }

    /// `GPU_SET_SOCKET`: the vhost-user-gpu protocol socket.
    fn gpu_set_socket(&mut self, fd: OwnedFd) -> HandlerResult<()> {
        drop(fd);
        enosys()
    }

    /// `CREATE_CRYPTO_SESSION` (`CRYPTO_SESSION`): opaque request, opaque reply.
    fn create_crypto_session(&mut self, request: &[u8]) -> HandlerResult<Vec<u8>> {
        let _ = request;
        enosys()
    }

    /// `CLOSE_CRYPTO_SESSION` (`CRYPTO_SESSION`).
    fn close_crypto_session(&mut self, session: u64) -> HandlerResult<()> {
        let _ = session;
        enosys()
    }

    /// `POSTCOPY_ADVISE` (`PAGEFAULT`): return a userfaultfd.
    fn postcopy_advise(&mut self) -> HandlerResult<OwnedFd> {
        enosys()
    }

    /// `POSTCOPY_LISTEN` (`PAGEFAULT`).
    fn postcopy_listen(&mut self) -> HandlerResult<()> {
        enosys()
    }

    /// `POSTCOPY_END` (`PAGEFAULT`).
    fn postcopy_end(&mut self) -> HandlerResult<()> {
        enosys()
    }
}

/// What the handler sends back for a request that was handled.
enum Response {
    /// No reply body: an ack if the front-end asked for one.
    Ack,
    /// A reply with this body and optional fd.
    Reply(Vec<u8>, Option<OwnedFd>),
}

fn reply_u64(value: u64) -> Response {
    Response::Reply(VhostUserU64::new(value).as_bytes().to_vec(), None)
}

fn negative_errno(errno: i32) -> u64 {
    (-i64::from(errno)) as u64
}

/// Requests QEMU sends before `SET_OWNER` (see the module docs).
fn allowed_before_owner(req: FrontendReq) -> bool {
    use FrontendReq::*;
    matches!(
        req,
        SET_OWNER
            | GET_FEATURES
            | GET_PROTOCOL_FEATURES
            | SET_PROTOCOL_FEATURES
            | GET_QUEUE_NUM
            | GET_MAX_MEM_SLOTS
            | SET_BACKEND_REQ_FD
            | GET_CONFIG
            | GET_SHMEM_CONFIG
    )
}

/// The back-end server for one front-end connection.
#[derive(Debug)]
pub struct BackendReqHandler<B: VhostUserBackendReqHandler> {
    conn: Connection,
    backend: B,
    owned: bool,
    offered_features: Option<u64>,
    acked_features: u64,
    offered_protocol: Option<VhostUserProtocolFeatures>,
    acked_protocol: VhostUserProtocolFeatures,
    backend_channel: Option<BackendReqSender>,
    peer_waiting: bool,
    /// The request being received by [`BackendReqHandler::poll_request`].
    partial: PartialMessage,
}

/// What a [`BackendReqHandler`] knows of its session beyond the device: the
/// negotiation so far. [`BackendReqHandler::session`] takes it from a running handler,
/// [`BackendReqHandler::resume`] serves the same front-end connection with it in
/// another handler (in another process: `outboard vsock --take-over`), so the
/// front-end never sees a new session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionState {
    /// `SET_OWNER` was received.
    pub owned: bool,
    /// What `GET_FEATURES` answered, if it was asked.
    pub offered_features: Option<u64>,
    /// What `SET_FEATURES` acked.
    pub acked_features: u64,
    /// What `GET_PROTOCOL_FEATURES` answered, if it was asked.
    pub offered_protocol: Option<VhostUserProtocolFeatures>,
    /// What `SET_PROTOCOL_FEATURES` acked.
    pub acked_protocol: VhostUserProtocolFeatures,
}

impl<B: VhostUserBackendReqHandler> BackendReqHandler<B> {
    /// Serves `backend` on a connected front-end socket.
    pub fn new(conn: Connection, backend: B) -> Self {
        BackendReqHandler {
            conn,
            backend,
            owned: false,
            offered_features: None,
            acked_features: 0,
            offered_protocol: None,
            acked_protocol: VhostUserProtocolFeatures::empty(),
            backend_channel: None,
            peer_waiting: false,
            partial: PartialMessage::new(),
        }
    }

    /// Connects to a front-end that listens at `path` (QEMU's `server=on` mode).
    pub fn connect(path: impl AsRef<Path>, backend: B) -> Result<Self> {
        Ok(Self::new(Connection::connect(path)?, backend))
    }

    /// The device.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The device, mutably.
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Ends the session and returns the device.
    pub fn into_backend(self) -> B {
        self.backend
    }

    /// The session's negotiation, for [`BackendReqHandler::resume`] elsewhere; `None`
    /// while the handler is not at a message boundary (part of a request received, or
    /// the front-end waiting for a reply that was not sent), when a session cannot
    /// move.
    pub fn session(&self) -> Option<SessionState> {
        if self.partial.started().is_some() || self.peer_waiting {
            return None;
        }
        Some(SessionState {
            owned: self.owned,
            offered_features: self.offered_features,
            acked_features: self.acked_features,
            offered_protocol: self.offered_protocol,
            acked_protocol: self.acked_protocol,
        })
    }

    /// The back-end channel the front-end gave (`SET_BACKEND_REQ_FD`), if any.
    pub fn backend_channel(&self) -> Option<&BackendReqSender> {
        self.backend_channel.as_ref()
    }

    /// Serves `backend` on `conn`, a front-end connection whose session another
    /// handler started ([`BackendReqHandler::session`]), with its back-end
    /// `channel`. The device in `backend` must already be in the state that session
    /// set up.
    pub fn resume(
        conn: Connection,
        backend: B,
        state: SessionState,
        channel: Option<BackendReqSender>,
    ) -> Self {
        let mut h = BackendReqHandler::new(conn, backend);
        h.owned = state.owned;
        h.offered_features = state.offered_features;
        h.acked_features = state.acked_features;
        h.offered_protocol = state.offered_protocol;
        h.acked_protocol = state.acked_protocol;
        h.backend_channel = channel;
        h
    }

    /// Whether `SET_OWNER` was received (and not undone by `RESET_OWNER`).
    pub fn is_owned(&self) -> bool {
        self.owned
    }

    /// The virtio features the front-end acked with `SET_FEATURES`.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The negotiated protocol features.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.acked_protocol
    }

    /// Whether the last request failed in a way the protocol cannot report: it needed
    /// a reply that carries no status (`GET_FEATURES`, `GET_VRING_BASE`, ...), so none
    /// was sent and the front-end is still waiting. Close the connection then, so that
    /// the front-end sees an end of file instead of waiting forever.
    pub fn peer_waiting(&self) -> bool {
        self.peer_waiting
    }

    /// Serves requests until the front-end disconnects (`Ok(())`) or a fatal error.
    /// Refused requests are logged and the loop goes on, unless the front-end is left
    /// waiting for a reply (see [`peer_waiting`](Self::peer_waiting)): then the error
    /// ends the session.
    pub fn run(&mut self) -> Result<()> {
        loop {
            match self.handle_request() {
                Ok(()) => {}
                Err(Error::Disconnect) => return Ok(()),
                Err(e) if e.is_fatal() || self.peer_waiting => return Err(e),
                Err(e) => outboard_protocol::log_limited!(
                    log::Level::Warn,
                    "vhost-user back-end: refused a request: {e}"
                ),
            }
        }
    }

    /// Receives, validates and handles one request, and sends its reply. Blocks until a
    /// message arrives; call it when [`as_fd`](AsFd::as_fd) is readable to use your own
    /// event loop.
    pub fn handle_request(&mut self) -> Result<()> {
        let (header, fds) = self.conn.recv_header()?;
        let mut buf = [0u8; MAX_MSG_SIZE];
        let body = self.conn.recv_body_into(&header, &mut buf)?;
        self.process(header, body, fds)
    }

    /// Receives what the socket has of the next request without waiting (make the
    /// socket non-blocking first: [`Connection::socket`]), and handles the request once
    /// it is complete. Returns `Ok(true)` when a request was handled, `Ok(false)` when
    /// the socket has no complete request yet: call again when it is readable, and
    /// drop a front-end whose [`pending_since`](Self::pending_since) is older than
    /// your bound (it sent part of a message and stalled). Errors are those of
    /// [`handle_request`](Self::handle_request); a reply the socket cannot take at once
    /// (a front-end that does not read its replies) is [`Error::SocketRetry`], which is
    /// fatal.
    pub fn poll_request(&mut self) -> Result<bool> {
        // The body is copied out of the receive buffer: `process` borrows all of self.
        let mut buf = [0u8; MAX_MSG_SIZE];
        let (header, len, fds) = match self.conn.recv_some(&mut self.partial)? {
            Some((header, body, fds)) => {
                let Some(dst) = buf.get_mut(..body.len()) else {
                    return Err(Error::OversizedMessage {
                        size: body.len(),
                        max: MAX_MSG_SIZE,
                    });
                };
                dst.copy_from_slice(body);
                (header, body.len(), fds)
            }
            None => return Ok(false),
        };
        self.process(header, &buf[..len], fds).map(|()| true)
    }

    /// When the first byte of a request that is not complete yet arrived (see
    /// [`poll_request`](Self::poll_request)).
    pub fn pending_since(&self) -> Option<std::time::Instant> {
        self.partial.started()
    }

    /// Bytes received of the pending request, and its full size once its header is in.
    pub fn pending_progress(&self) -> (usize, Option<usize>) {
        (self.partial.received(), self.partial.expected())
    }

    /// Handles one received request and sends its reply.
    fn process(&mut self, header: Header, body: &[u8], fds: Vec<OwnedFd>) -> Result<()> {
        // The whole message has been consumed: from here on a refusal keeps the stream
        // in step.
        self.peer_waiting = false;
        // REPLY_ACK before or after this request (SET_PROTOCOL_FEATURES changes it):
        // rust-vmm's front-end judges by the state after, ours by the state before.
        let ack_before = self.reply_ack();
        let result = self.dispatch(&header, body, fds);
        match result {
            Ok(Response::Ack) => {
                if header.need_reply() && (ack_before || self.reply_ack()) {
                    self.send_reply(&header, VhostUserU64::new(0).as_bytes(), None)?;
                }
                Ok(())
            }
            Ok(Response::Reply(bytes, fd)) => {
                self.send_reply(&header, &bytes, fd.as_ref().map(|f| f.as_fd()))
            }
            Err(e) => {
                match self.send_error_reply(&header, body, &e) {
                    Ok(answered) => self.peer_waiting = !answered,
                    Err(send_err) => {
                        outboard_protocol::log_limited!(
                            log::Level::Warn,
                            "vhost-user back-end: could not send an error reply: {send_err}"
                        );
                        self.peer_waiting = true;
                    }
                }
                Err(e)
            }
        }
    }

    fn reply_ack(&self) -> bool {
        self.acked_protocol
            .contains(VhostUserProtocolFeatures::REPLY_ACK)
    }

    fn send_reply(&self, req: &Header, body: &[u8], fd: Option<BorrowedFd<'_>>) -> Result<()> {
        let header = Header::reply(req.request, body.len() as u32);
        let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
        self.conn.send(&header, body, &[], &fds)
    }

    /// Answers a refused or failed request where the protocol lets the front-end learn
    /// about it, so that it does not wait forever. Returns `false` when the front-end
    /// expects a reply that cannot carry an error (none was sent).
    fn send_error_reply(&self, header: &Header, body: &[u8], e: &Error) -> Result<bool> {
        if header.validate().is_err() || header.is_reply() {
            // Nothing can be trusted about what the peer expects.
            return Ok(true);
        }
        let errno = e.status_errno();
        let nack = VhostUserU64::new(negative_errno(errno));
        let Ok(req) = FrontendReq::from_code(header.request) else {
            if header.need_reply() && self.reply_ack() {
                self.send_reply(header, nack.as_bytes(), None)?;
            }
            return Ok(true);
        };
        use FrontendReq::*;
        match req.rules().reply {
            Reply::AckOnly => {
                if header.need_reply() && self.reply_ack() {
                    self.send_reply(header, nack.as_bytes(), None)?;
                }
                Ok(true)
            }
            Reply::Always { .. } => match req {
                SET_LOG_BASE | CHECK_DEVICE_STATE | POSTCOPY_END | GET_SHARED_OBJECT => {
                    self.send_reply(header, nack.as_bytes(), None)?;
                    Ok(true)
                }
                SET_DEVICE_STATE_FD => {
                    let value = (errno as u64 & 0xff).max(1) | DEVICE_STATE_NO_FD;
                    self.send_reply(header, VhostUserU64::new(value).as_bytes(), None)?;
                    Ok(true)
                }
                GET_CONFIG => {
                    // The spec's failure reply: the head with a zero size and no payload.
                    let mut head =
                        outboard_protocol::read_prefix::<VhostUserConfig>(body, "config head")
                            .map(|(h, _)| h)
                            .unwrap_or_default();
                    head.size = 0;
                    self.send_reply(header, head.as_bytes(), None)?;
                    Ok(true)
                }
                // These replies have no way to say "failed".
                _ => Ok(false),
            },
        }
    }

    fn check_index(&self, index: u32) -> Result<()> {
        let max = self.backend.max_queues();
        if index >= max {
            return Err(ProtocolError::OutOfBounds {
                what: "vring index",
                value: index.into(),
                limit: max.saturating_sub(1).into(),
            }
            .into());
        }
        Ok(())
    }

    fn offered_features(&mut self) -> Result<u64> {
        match self.offered_features {
            Some(f) => Ok(f),
            None => {
                let f = self
                    .backend
                    .get_features()
                    .map_err(Error::ReqHandlerError)?;
                self.offered_features = Some(f);
                Ok(f)
            }
        }
    }

    fn offered_protocol(&mut self) -> Result<VhostUserProtocolFeatures> {
        match self.offered_protocol {
            Some(f) => Ok(f),
            None => {
                let f = self
                    .backend
                    .get_protocol_features()
                    .map_err(Error::ReqHandlerError)?;
                self.offered_protocol = Some(f);
                Ok(f)
            }
        }
    }

    fn dispatch(
        &mut self,
        header: &Header,
        body: &[u8],
        mut fds: Vec<OwnedFd>,
    ) -> Result<Response> {
        header.validate()?;
        if header.is_reply() {
            return Err(ProtocolError::Unknown {
                what: "REPLY flag on a request, flags",
                value: header.flags.into(),
            }
            .into());
        }
        let req = FrontendReq::from_code(header.request)?;
        let name = req.name();
        let rules = req.rules();
        if !self.owned && !allowed_before_owner(req) {
            return Err(Error::InvalidOperation(format!("{name} before SET_OWNER")));
        }
        if let Some(feature) = rules.feature {
            if !self.acked_protocol.contains(feature) {
                return Err(Error::FeatureMismatch {
                    request: name,
                    feature: feature - self.acked_protocol,
                });
            }
        }
        if rules.needs_protocol_features
            && self.offered_features()? & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0
        {
            return Err(Error::InvalidOperation(format!(
                "{name} needs VHOST_USER_F_PROTOCOL_FEATURES, which the back-end does not offer"
            )));
        }
        rules.body.check(name, body.len())?;
        if rules.fds != FdCount::PerRegion && !rules.fds.check(fds.len(), 0) {
            return Err(Error::IncorrectFds {
                request: name,
                got: fds.len(),
                want: fd_rule_name(rules.fds),
            });
        }
        let be = |r: HandlerResult<()>| r.map(|()| Response::Ack).map_err(Error::ReqHandlerError);
        use FrontendReq::*;
        match req {
            SET_OWNER => {
                if self.owned {
                    return Err(Error::InvalidOperation("SET_OWNER: already owned".into()));
                }
                self.backend.set_owner().map_err(Error::ReqHandlerError)?;
                self.owned = true;
                Ok(Response::Ack)
            }
            RESET_OWNER => {
                self.owned = false;
                be(self.backend.reset_owner())
            }
            GET_FEATURES => {
                let f = self
                    .backend
                    .get_features()
                    .map_err(Error::ReqHandlerError)?;
                self.offered_features = Some(f);
                Ok(reply_u64(f))
            }
            SET_FEATURES => {
                let features = parse::<VhostUserU64>(body, name)?.value;
                let offered = self.offered_features()?;
                if features & !offered != 0 {
                    return Err(Error::InvalidOperation(format!(
                        "SET_FEATURES: bits {:#x} were not offered",
                        features & !offered
                    )));
                }
                self.backend
                    .set_features(features)
                    .map_err(Error::ReqHandlerError)?;
                self.acked_features = features;
                Ok(Response::Ack)
            }
            GET_PROTOCOL_FEATURES => {
                let f = self
                    .backend
                    .get_protocol_features()
                    .map_err(Error::ReqHandlerError)?;
                self.offered_protocol = Some(f);
                Ok(reply_u64(f.bits()))
            }
            SET_PROTOCOL_FEATURES => {
                let bits = parse::<VhostUserU64>(body, name)?.value;
                let offered = self.offered_protocol()?;
                let Some(features) = VhostUserProtocolFeatures::from_bits(bits) else {
                    return Err(ProtocolError::Unknown {
                        what: "protocol feature bits",
                        value: bits & !VhostUserProtocolFeatures::all().bits(),
                    }
                    .into());
                };
                if !offered.contains(features) {
                    return Err(Error::FeatureMismatch {
                        request: name,
                        feature: features - offered,
                    });
                }
                self.backend
                    .set_protocol_features(features)
                    .map_err(Error::ReqHandlerError)?;
                self.acked_protocol = features;
                if let Some(channel) = &self.backend_channel {
                    channel.set_protocol_features(features);
                }
                Ok(Response::Ack)
            }
            SET_MEM_TABLE => {
                let (head, region_bytes) = parse_mem_table(body)?;
                if fds.len() != head.num_regions as usize {
                    return Err(Error::IncorrectFds {
                        request: name,
                        got: fds.len(),
                        want: "one per region",
                    });
                }
                let mut regions = Vec::with_capacity(fds.len());
                for (region, fd) in mem_table_regions(region_bytes).zip(fds) {
                    regions.push(MemoryRegion {
                        region: region?,
                        fd,
                    });
                }
                be(self.backend.set_mem_table(regions))
            }
            SET_LOG_BASE => {
                let log = parse::<VhostUserLog>(body, name)?;
                let fd = take_one(&mut fds, name)?;
                self.backend
                    .set_log_base(&log, fd)
                    .map_err(Error::ReqHandlerError)?;
                Ok(reply_u64(0))
            }
            SET_LOG_FD => be(self.backend.set_log_fd(take_one(&mut fds, name)?)),
            SET_VRING_NUM => {
                let s = self.vring_state(body, name)?;
                if s.num == 0 || s.num > 32768 || !s.num.is_power_of_two() && !self.packed_ring() {
                    return Err(ProtocolError::OutOfBounds {
                        what: "vring size (a power of two up to 32768)",
                        value: s.num.into(),
                        limit: 32768,
                    }
                    .into());
                }
                be(self.backend.set_vring_num(s.index, s.num))
            }
            SET_VRING_ADDR => {
                let addr = parse::<VhostUserVringAddr>(body, name)?;
                self.check_index(addr.index)?;
                be(self.backend.set_vring_addr(&addr))
            }
            SET_VRING_BASE => {
                let s = self.vring_state(body, name)?;
                be(self.backend.set_vring_base(s.index, s.num))
            }
            GET_VRING_BASE => {
                let s = self.vring_state(body, name)?;
                let base = self
                    .backend
                    .get_vring_base(s.index)
                    .map_err(Error::ReqHandlerError)?;
                let reply = VhostUserVringState::new(s.index, base);
                Ok(Response::Reply(reply.as_bytes().to_vec(), None))
            }
            SET_VRING_KICK | SET_VRING_CALL | SET_VRING_ERR => {
                let v = parse::<VhostUserU64>(body, name)?.value;
                let (index, has_fd) = parse_vring_fd_u64(v)?;
                let index = u32::from(index);
                self.check_index(index)?;
                let want = usize::from(has_fd);
                if fds.len() != want {
                    return Err(Error::IncorrectFds {
                        request: name,
                        got: fds.len(),
                        want: if has_fd {
                            "one (NOFD bit clear)"
                        } else {
                            "none (NOFD bit set)"
                        },
                    });
                }
                let fd = fds.pop();
                be(match req {
                    SET_VRING_KICK => self.backend.set_vring_kick(index, fd),
                    SET_VRING_CALL => self.backend.set_vring_call(index, fd),
                    _ => self.backend.set_vring_err(index, fd),
                })
            }
            GET_QUEUE_NUM => {
                let n = self
                    .backend
                    .get_queue_num()
                    .map_err(Error::ReqHandlerError)?;
                Ok(reply_u64(n))
            }
            SET_VRING_ENABLE => {
                let s = self.vring_state(body, name)?;
                let enable = match s.num {
                    0 => false,
                    1 => true,
                    n => {
                        return Err(ProtocolError::Unknown {
                            what: "SET_VRING_ENABLE value",
                            value: n.into(),
                        }
                        .into())
                    }
                };
                be(self.backend.set_vring_enable(s.index, enable))
            }
            SEND_RARP => {
                let v = parse::<VhostUserU64>(body, name)?.value;
                if v >> 48 != 0 {
                    return Err(ProtocolError::Reserved {
                        what: "SEND_RARP bits above the MAC address",
                        value: v >> 48,
                    }
                    .into());
                }
                let b = v.to_le_bytes();
                be(self.backend.send_rarp([b[0], b[1], b[2], b[3], b[4], b[5]]))
            }
            NET_SET_MTU => {
                let v = parse::<VhostUserU64>(body, name)?.value;
                be(self.backend.net_set_mtu(v))
            }
            SET_BACKEND_REQ_FD => {
                let fd = take_one(&mut fds, name)?;
                let kind = rustix::net::sockopt::socket_type(&fd).map_err(|e| {
                    Error::InvalidParam(format!("SET_BACKEND_REQ_FD: the fd is not a socket ({e})"))
                })?;
                if kind != rustix::net::SocketType::STREAM {
                    return Err(Error::InvalidParam(format!(
                        "SET_BACKEND_REQ_FD: socket type {} is not SOCK_STREAM",
                        kind.as_raw()
                    )));
                }
                let channel = BackendReqSender::new(
                    Connection::new(UnixStream::from(fd)),
                    self.acked_protocol,
                );
                self.backend_channel = Some(channel.clone());
                be(self.backend.set_backend_req_fd(channel))
            }
            IOTLB_MSG => {
                let msg = parse::<VhostUserIotlb>(body, name)?;
                be(self.backend.iotlb_msg(&msg))
            }
            SET_VRING_ENDIAN => {
                let s = self.vring_state(body, name)?;
                let big = match s.num {
                    0 => false,
                    1 => true,
                    n => {
                        return Err(ProtocolError::Unknown {
                            what: "SET_VRING_ENDIAN value",
                            value: n.into(),
                        }
                        .into())
                    }
                };
                be(self.backend.set_vring_endian(s.index, big))
            }
            GET_CONFIG => {
                let (head, _) = parse_config(body)?;
                let data = self
                    .backend
                    .get_config(head.offset, head.size, head.flags)
                    .map_err(Error::ReqHandlerError)?;
                if data.len() != head.size as usize {
                    return Err(Error::ReqHandlerError(std::io::Error::other(format!(
                        "get_config returned {} bytes, {} were asked for",
                        data.len(),
                        head.size
                    ))));
                }
                let mut reply = head.as_bytes().to_vec();
                reply.extend_from_slice(&data);
                Ok(Response::Reply(reply, None))
            }
            SET_CONFIG => {
                let (head, payload) = parse_config(body)?;
                be(self.backend.set_config(head.offset, payload, head.flags))
            }
            CREATE_CRYPTO_SESSION => {
                let reply = self
                    .backend
                    .create_crypto_session(body)
                    .map_err(Error::ReqHandlerError)?;
                BodySize::Variable.check("crypto session reply", reply.len())?;
                Ok(Response::Reply(reply, None))
            }
            CLOSE_CRYPTO_SESSION => {
                let v = parse::<VhostUserU64>(body, name)?.value;
                be(self.backend.close_crypto_session(v))
            }
            POSTCOPY_ADVISE => {
                let fd = self
                    .backend
                    .postcopy_advise()
                    .map_err(Error::ReqHandlerError)?;
                Ok(Response::Reply(
                    VhostUserU64::new(0).as_bytes().to_vec(),
                    Some(fd),
                ))
            }
            POSTCOPY_LISTEN => be(self.backend.postcopy_listen()),
            POSTCOPY_END => {
                self.backend
                    .postcopy_end()
                    .map_err(Error::ReqHandlerError)?;
                Ok(reply_u64(0))
            }
            GET_INFLIGHT_FD => {
                let inflight = parse::<VhostUserInflight>(body, name)?;
                let (reply, fd) = self
                    .backend
                    .get_inflight_fd(&inflight)
                    .map_err(Error::ReqHandlerError)?;
                Ok(Response::Reply(reply.as_bytes().to_vec(), Some(fd)))
            }
            SET_INFLIGHT_FD => {
                let inflight = parse::<VhostUserInflight>(body, name)?;
                let fd = take_one(&mut fds, name)?;
                be(self.backend.set_inflight_fd(&inflight, fd))
            }
            GPU_SET_SOCKET => be(self.backend.gpu_set_socket(take_one(&mut fds, name)?)),
            RESET_DEVICE => be(self.backend.reset_device()),
            VRING_KICK => {
                let s = self.vring_state(body, name)?;
                be(self.backend.vring_kick(s.index))
            }
            GET_MAX_MEM_SLOTS => {
                let n = self
                    .backend
                    .get_max_mem_slots()
                    .map_err(Error::ReqHandlerError)?;
                Ok(reply_u64(n))
            }
            ADD_MEM_REG => {
                let r = parse::<VhostUserSingleMemoryRegion>(body, name)?;
                let fd = take_one(&mut fds, name)?;
                be(self.backend.add_mem_region(MemoryRegion {
                    region: r.region,
                    fd,
                }))
            }
            REM_MEM_REG => {
                let r = parse::<VhostUserSingleMemoryRegion>(body, name)?;
                // Old front-ends attach an fd; the spec says to close it.
                drop(fds);
                be(self.backend.remove_mem_region(&r.region))
            }
            SET_STATUS => {
                let v = parse::<VhostUserU64>(body, name)?.value;
                let status = u8::try_from(v).map_err(|_| ProtocolError::OutOfBounds {
                    what: "device status",
                    value: v,
                    limit: 0xff,
                })?;
                be(self.backend.set_status(status))
            }
            GET_STATUS => {
                let s = self.backend.get_status().map_err(Error::ReqHandlerError)?;
                Ok(reply_u64(s.into()))
            }
            GET_SHARED_OBJECT => {
                let uuid = parse::<VhostUserShared>(body, name)?;
                let fd = self
                    .backend
                    .get_shared_object(&uuid)
                    .map_err(Error::ReqHandlerError)?;
                Ok(Response::Reply(
                    VhostUserU64::new(0).as_bytes().to_vec(),
                    Some(fd),
                ))
            }
            SET_DEVICE_STATE_FD => {
                let t = parse::<VhostUserTransferDeviceState>(body, name)?;
                let fd = take_one(&mut fds, name)?;
                let back = self
                    .backend
                    .set_device_state_fd(t.direction()?, t.phase()?, fd)
                    .map_err(Error::ReqHandlerError)?;
                let value = if back.is_some() {
                    0
                } else {
                    DEVICE_STATE_NO_FD
                };
                Ok(Response::Reply(
                    VhostUserU64::new(value).as_bytes().to_vec(),
                    back,
                ))
            }
            CHECK_DEVICE_STATE => {
                self.backend
                    .check_device_state()
                    .map_err(Error::ReqHandlerError)?;
                Ok(reply_u64(0))
            }
            GET_SHMEM_CONFIG => {
                let config = self
                    .backend
                    .get_shmem_config()
                    .map_err(Error::ReqHandlerError)?;
                config.validate()?;
                Ok(Response::Reply(config.as_bytes().to_vec(), None))
            }
        }
    }

    fn vring_state(&self, body: &[u8], name: &'static str) -> Result<VhostUserVringState> {
        let s = parse::<VhostUserVringState>(body, name)?;
        self.check_index(s.index)?;
        Ok(s)
    }

    fn packed_ring(&self) -> bool {
        // VIRTIO_F_RING_PACKED (bit 34): packed rings may have any size.
        self.acked_features & (1 << 34) != 0
    }
}

/// Bit 8 of the `SET_DEVICE_STATE_FD` reply: no fd is returned.
const DEVICE_STATE_NO_FD: u64 = 1 << 8;

fn fd_rule_name(rule: FdCount) -> &'static str {
    match rule {
        FdCount::None => "none",
        FdCount::One => "exactly one",
        FdCount::Optional => "at most one",
        FdCount::PerRegion => "one per region",
    }
}

fn take_one(fds: &mut Vec<OwnedFd>, request: &'static str) -> Result<OwnedFd> {
    match (fds.pop(), fds.len()) {
        (Some(fd), 0) => Ok(fd),
        (fd, rest) => Err(Error::IncorrectFds {
            request,
            got: rest + usize::from(fd.is_some()),
            want: "exactly one",
        }),
    }
}

impl<B: VhostUserBackendReqHandler> AsFd for BackendReqHandler<B> {
    /// The connection's socket, to poll for readability.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.conn.as_fd()
    }
}

/// A listening socket that accepts front-ends.
#[derive(Debug)]
pub struct Listener {
    listener: UnixListener,
    path: PathBuf,
}

impl Listener {
    /// Binds a listening socket at `path`. With `unlink`, a stale socket file left at
    /// `path` is removed first. The file is removed again when the listener is dropped.
    pub fn bind(path: impl AsRef<Path>, unlink: bool) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if unlink {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        let listener = UnixListener::bind(&path)?;
        Ok(Listener { listener, path })
    }

    /// Accepts one front-end. Returns `Ok(None)` when the listener is non-blocking and
    /// nobody is waiting.
    pub fn accept(&self) -> Result<Option<Connection>> {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => return Ok(Some(Connection::new(s))),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Sets non-blocking mode (for an event loop that polls [`as_fd`](AsFd::as_fd)).
    pub fn set_nonblocking(&self, nonblocking: bool) -> Result<()> {
        Ok(self.listener.set_nonblocking(nonblocking)?)
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
