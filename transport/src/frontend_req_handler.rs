//! The front-end's server on the back-end -> front-end channel:
//! [`FrontendReqHandler`] validates each [`BackendReq`] and calls a
//! [`VhostUserFrontendReqHandler`].
//!
//! It behaves like the front-end request handler in crosvm: the attached-file count is
//! checked per request, the body size is checked, and a `u64` reply (0 or a negative
//! errno) is sent when the request always has one or when the back-end set NEED_REPLY
//! and `REPLY_ACK` was negotiated. With the `crosvm` feature it also serves crosvm's
//! `GPU_MAP` and `EXTERNAL_MAP`.
//!
//! ```
//! use outboard_transport::{Frontend, FrontendReqHandler, VhostUserFrontendReqHandler};
//! use outboard_protocol::vhost_user::VhostUserProtocolFeatures;
//!
//! struct Vmm;
//! impl VhostUserFrontendReqHandler for Vmm {
//!     fn config_change(&mut self) -> outboard_transport::HandlerResult<()> {
//!         Ok(()) // re-read the config space, raise a config interrupt
//!     }
//! }
//!
//! let features = VhostUserProtocolFeatures::BACKEND_REQ | VhostUserProtocolFeatures::CONFIG;
//! let mut handler = FrontendReqHandler::new(Vmm, features)?;
//! let backend_end = handler.take_backend_fd().expect("first call");
//! // frontend.set_backend_req_fd(backend_end.as_fd())?; then poll handler.as_fd() and
//! // call handler.handle_request() when it is readable.
//! # drop(backend_end);
//! # Ok::<(), outboard_transport::Error>(())
//! ```

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use outboard_protocol::vhost_user::{
    parse_vring_fd_u64, BackendReq, FdCount, Header, Reply, RequestRules, VhostUserIotlb,
    VhostUserMMap, VhostUserProtocolFeatures, VhostUserShared, VhostUserU64, VhostUserVringArea,
    VhostUserVringState, MAX_MSG_SIZE,
};
#[cfg(feature = "crosvm")]
use outboard_protocol::vhost_user::{
    CrosvmBackendReq, VhostUserExternalMapMsg, VhostUserGpuMapMsg,
};
use outboard_protocol::{parse, ProtocolError, Validate};
use zerocopy::IntoBytes;

use crate::connection::Connection;
use crate::error::{Error, HandlerResult, Result};

fn enosys<T>() -> HandlerResult<T> {
    Err(std::io::Error::from_raw_os_error(libc::ENOSYS))
}

/// What a front-end (VMM) does for its back-end's requests. Every method defaults to
/// "not supported" (`ENOSYS`, reported to the back-end as `-ENOSYS`).
pub trait VhostUserFrontendReqHandler {
    /// `CONFIG_CHANGE_MSG`: the device's config space changed.
    fn config_change(&mut self) -> HandlerResult<()> {
        enosys()
    }

    /// `SHMEM_MAP`: map `fd` into a VIRTIO shared memory region.
    fn shmem_map(&mut self, map: &VhostUserMMap, fd: OwnedFd) -> HandlerResult<()> {
        let _ = (map, fd);
        enosys()
    }

    /// `SHMEM_UNMAP`.
    fn shmem_unmap(&mut self, map: &VhostUserMMap) -> HandlerResult<()> {
        let _ = map;
        enosys()
    }

    /// `SHARED_OBJECT_ADD`.
    fn shared_object_add(&mut self, uuid: &VhostUserShared) -> HandlerResult<()> {
        let _ = uuid;
        enosys()
    }

    /// `SHARED_OBJECT_REMOVE`.
    fn shared_object_remove(&mut self, uuid: &VhostUserShared) -> HandlerResult<()> {
        let _ = uuid;
        enosys()
    }

    /// `SHARED_OBJECT_LOOKUP`: the dma-buf fd of a shared object.
    fn shared_object_lookup(&mut self, uuid: &VhostUserShared) -> HandlerResult<OwnedFd> {
        let _ = uuid;
        enosys()
    }

    /// `VRING_CALL`: in-band used-buffer notification.
    fn vring_call(&mut self, index: u32) -> HandlerResult<()> {
        let _ = index;
        enosys()
    }

    /// `VRING_ERR`: in-band ring error notification.
    fn vring_err(&mut self, index: u32) -> HandlerResult<()> {
        let _ = index;
        enosys()
    }

    /// `IOTLB_MSG`: an IOTLB miss or access failure.
    fn iotlb_msg(&mut self, msg: &VhostUserIotlb) -> HandlerResult<()> {
        let _ = msg;
        enosys()
    }

    /// `VRING_HOST_NOTIFIER_MSG`: set (`Some(fd)`) or clear a ring's host notifier.
    fn vring_host_notifier(
        &mut self,
        index: u8,
        size: u64,
        offset: u64,
        fd: Option<OwnedFd>,
    ) -> HandlerResult<()> {
        let _ = (index, size, offset, fd);
        enosys()
    }

    /// crosvm's `GPU_MAP` (1006).
    #[cfg(feature = "crosvm")]
    fn gpu_map(&mut self, msg: &VhostUserGpuMapMsg, fd: OwnedFd) -> HandlerResult<()> {
        let _ = (msg, fd);
        enosys()
    }

    /// crosvm's `EXTERNAL_MAP` (1007).
    #[cfg(feature = "crosvm")]
    fn external_map(&mut self, msg: &VhostUserExternalMapMsg) -> HandlerResult<()> {
        let _ = msg;
        enosys()
    }
}

/// A request received on the channel: a standard one, or (with `crosvm`) crosvm's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AnyBackendReq {
    Std(BackendReq),
    #[cfg(feature = "crosvm")]
    Crosvm(CrosvmBackendReq),
}

impl AnyBackendReq {
    fn from_code(code: u32) -> Result<Self> {
        #[cfg(feature = "crosvm")]
        if let Ok(r) = CrosvmBackendReq::from_code(code) {
            return Ok(AnyBackendReq::Crosvm(r));
        }
        Ok(AnyBackendReq::Std(BackendReq::from_code(code)?))
    }

    fn name(self) -> &'static str {
        match self {
            AnyBackendReq::Std(r) => r.name(),
            #[cfg(feature = "crosvm")]
            AnyBackendReq::Crosvm(r) => r.name(),
        }
    }

    fn rules(self) -> RequestRules {
        match self {
            AnyBackendReq::Std(r) => r.rules(),
            #[cfg(feature = "crosvm")]
            AnyBackendReq::Crosvm(r) => r.rules(),
        }
    }
}

/// The front-end's server for the back-end request channel.
#[derive(Debug)]
pub struct FrontendReqHandler<S: VhostUserFrontendReqHandler> {
    conn: Connection,
    backend_end: Option<OwnedFd>,
    handler: S,
    features: VhostUserProtocolFeatures,
}

impl<S: VhostUserFrontendReqHandler> FrontendReqHandler<S> {
    /// Creates the channel (a socket pair). Send the other end to the back-end with
    /// [`Frontend::set_backend_req_fd`](crate::Frontend::set_backend_req_fd) after
    /// [`take_backend_fd`](Self::take_backend_fd). `features` are the negotiated
    /// protocol features.
    pub fn new(handler: S, features: VhostUserProtocolFeatures) -> Result<Self> {
        let (ours, theirs) = UnixStream::pair()?;
        Ok(FrontendReqHandler {
            conn: Connection::new(ours),
            backend_end: Some(theirs.into()),
            handler,
            features,
        })
    }

    /// Serves an existing channel socket.
    pub fn from_connection(
        conn: Connection,
        handler: S,
        features: VhostUserProtocolFeatures,
    ) -> Self {
        FrontendReqHandler {
            conn,
            backend_end: None,
            handler,
            features,
        }
    }

    /// The back-end's end of the channel, to send with `SET_BACKEND_REQ_FD`. `None`
    /// after the first call.
    pub fn take_backend_fd(&mut self) -> Option<OwnedFd> {
        self.backend_end.take()
    }

    /// Updates the negotiated protocol features.
    pub fn set_protocol_features(&mut self, features: VhostUserProtocolFeatures) {
        self.features = features;
    }

    /// The handler.
    pub fn handler(&self) -> &S {
        &self.handler
    }

    /// The handler, mutably.
    pub fn handler_mut(&mut self) -> &mut S {
        &mut self.handler
    }

    /// Receives, validates and serves one request, and replies as the protocol says.
    pub fn handle_request(&mut self) -> Result<()> {
        let (header, fds) = self.conn.recv_header()?;
        let mut buf = [0u8; MAX_MSG_SIZE];
        let body = self.conn.recv_body_into(&header, &mut buf)?;
        let reply_ack = self.features.contains(VhostUserProtocolFeatures::REPLY_ACK);
        match self.dispatch(&header, body, fds) {
            Ok((req, fd)) => {
                if needs_reply(req, &header, reply_ack) {
                    self.reply(&header, 0, fd)?;
                }
                Ok(())
            }
            Err(e) => {
                let known = header.validate().is_ok() && !header.is_reply();
                if let (true, Ok(req)) = (known, AnyBackendReq::from_code(header.request)) {
                    if needs_reply(req, &header, reply_ack) {
                        let status = (-i64::from(e.status_errno())) as u64;
                        if let Err(send) = self.reply(&header, status, None) {
                            outboard_protocol::log_limited!(
                                log::Level::Warn,
                                "back-end channel: could not send an error reply: {send}"
                            );
                        }
                    }
                }
                Err(e)
            }
        }
    }

    fn reply(&self, req: &Header, value: u64, fd: Option<OwnedFd>) -> Result<()> {
        let header = Header::reply(req.request, 8);
        let fds: Vec<BorrowedFd<'_>> = fd.iter().map(|f| f.as_fd()).collect();
        self.conn
            .send(&header, VhostUserU64::new(value).as_bytes(), &[], &fds)
    }

    fn dispatch(
        &mut self,
        header: &Header,
        body: &[u8],
        mut fds: Vec<OwnedFd>,
    ) -> Result<(AnyBackendReq, Option<OwnedFd>)> {
        header.validate()?;
        if header.is_reply() {
            return Err(ProtocolError::Unknown {
                what: "REPLY flag on a request, flags",
                value: header.flags.into(),
            }
            .into());
        }
        let req = AnyBackendReq::from_code(header.request)?;
        let name = req.name();
        let rules = req.rules();
        let mut needed = VhostUserProtocolFeatures::BACKEND_REQ;
        if let Some(f) = rules.feature {
            needed |= f;
        }
        if !fds.is_empty() && rules.fds != FdCount::One {
            // An fd on a request that always carries one (SHMEM_MAP, GPU_MAP) is gated by
            // the request's own feature, as QEMU, crosvm and rust-vmm do.
            needed |= VhostUserProtocolFeatures::BACKEND_SEND_FD;
        }
        if !self.features.contains(needed) {
            return Err(Error::FeatureMismatch {
                request: name,
                feature: needed - self.features,
            });
        }
        if !rules.fds.check(fds.len(), 0) {
            return Err(Error::IncorrectFds {
                request: name,
                got: fds.len(),
                want: match rules.fds {
                    FdCount::None => "none",
                    FdCount::One => "exactly one",
                    _ => "at most one",
                },
            });
        }
        rules.body.check(name, body.len())?;
        let h = &mut self.handler;
        let done = |r: HandlerResult<()>| r.map(|()| (req, None)).map_err(Error::ReqHandlerError);
        match req {
            AnyBackendReq::Std(std_req) => match std_req {
                BackendReq::IOTLB_MSG => done(h.iotlb_msg(&parse::<VhostUserIotlb>(body, name)?)),
                BackendReq::CONFIG_CHANGE_MSG => done(h.config_change()),
                BackendReq::VRING_HOST_NOTIFIER_MSG => {
                    let area = parse::<VhostUserVringArea>(body, name)?;
                    let (index, has_fd) = parse_vring_fd_u64(area.u64_)?;
                    if fds.len() != usize::from(has_fd) {
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
                    done(h.vring_host_notifier(index, area.size, area.offset, fds.pop()))
                }
                BackendReq::VRING_CALL => {
                    done(h.vring_call(parse::<VhostUserVringState>(body, name)?.index))
                }
                BackendReq::VRING_ERR => {
                    done(h.vring_err(parse::<VhostUserVringState>(body, name)?.index))
                }
                BackendReq::SHARED_OBJECT_ADD => {
                    done(h.shared_object_add(&parse::<VhostUserShared>(body, name)?))
                }
                BackendReq::SHARED_OBJECT_REMOVE => {
                    done(h.shared_object_remove(&parse::<VhostUserShared>(body, name)?))
                }
                BackendReq::SHARED_OBJECT_LOOKUP => {
                    let uuid = parse::<VhostUserShared>(body, name)?;
                    let fd = h
                        .shared_object_lookup(&uuid)
                        .map_err(Error::ReqHandlerError)?;
                    Ok((req, Some(fd)))
                }
                BackendReq::SHMEM_MAP => {
                    let map = parse::<VhostUserMMap>(body, name)?;
                    let fd = fds.pop().ok_or(Error::IncorrectFds {
                        request: name,
                        got: 0,
                        want: "exactly one",
                    })?;
                    done(h.shmem_map(&map, fd))
                }
                BackendReq::SHMEM_UNMAP => {
                    done(h.shmem_unmap(&parse::<VhostUserMMap>(body, name)?))
                }
            },
            #[cfg(feature = "crosvm")]
            AnyBackendReq::Crosvm(CrosvmBackendReq::GPU_MAP) => {
                let msg = parse::<VhostUserGpuMapMsg>(body, name)?;
                let fd = fds.pop().ok_or(Error::IncorrectFds {
                    request: name,
                    got: 0,
                    want: "exactly one",
                })?;
                done(h.gpu_map(&msg, fd))
            }
            #[cfg(feature = "crosvm")]
            AnyBackendReq::Crosvm(CrosvmBackendReq::EXTERNAL_MAP) => {
                done(h.external_map(&parse::<VhostUserExternalMapMsg>(body, name)?))
            }
        }
    }
}

/// Whether `req` gets a u64 reply: always for requests that have one (lookups,
/// crosvm's maps), else when NEED_REPLY is set and `REPLY_ACK` was negotiated.
fn needs_reply(req: AnyBackendReq, header: &Header, reply_ack: bool) -> bool {
    match req.rules().reply {
        Reply::Always { .. } => true,
        Reply::AckOnly => header.need_reply() && reply_ack,
    }
}

impl<S: VhostUserFrontendReqHandler> AsFd for FrontendReqHandler<S> {
    /// The channel's socket, to poll for readability.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.conn.as_fd()
    }
}
