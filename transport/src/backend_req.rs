//! [`Backend`]: the back-end's sender on the back-end -> front-end channel.
//!
//! The front-end hands the back-end one end of a socket pair with `SET_BACKEND_REQ_FD`
//! (protocol feature `BACKEND_REQ`); the back-end then sends [`BackendReq`]s on it:
//! config change notifications, shared memory maps and unmaps, shared objects, in-band
//! vring notifications. A `Backend` is cheap to clone and safe to share between threads
//! (one request and its reply hold the channel's lock), so device workers can keep
//! their own copy.
//!
//! Every request is checked locally before it is sent: its protocol feature must have
//! been negotiated, and an optional fd (`VRING_HOST_NOTIFIER_MSG`) needs
//! `BACKEND_SEND_FD`. When `REPLY_ACK` was negotiated, requests without a reply set
//! NEED_REPLY and the front-end's status is checked.
//!
//! Do not send from inside a [`VhostUserBackendReqHandler`](crate::VhostUserBackendReqHandler)
//! call that the front-end is waiting on: a front-end such as QEMU does not serve this
//! channel while it waits for a reply on the main socket, and with `REPLY_ACK` both
//! sides would wait for each other. Send from a device worker thread.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use outboard_protocol::vhost_user::{
    vring_fd_u64, BackendReq, FdCount, Header, Reply, RequestRules, VhostUserIotlb, VhostUserMMap,
    VhostUserProtocolFeatures, VhostUserShared, VhostUserU64, VhostUserVringArea,
    VhostUserVringState,
};
#[cfg(feature = "crosvm")]
use outboard_protocol::vhost_user::{
    CrosvmBackendReq, VhostUserExternalMapMsg, VhostUserGpuMapMsg,
};
use outboard_protocol::Validate;
use zerocopy::IntoBytes;

use crate::connection::Connection;
use crate::error::{Error, Result};

#[derive(Debug)]
struct Inner {
    conn: Connection,
    features: VhostUserProtocolFeatures,
}

/// The back-end's end of the back-end -> front-end channel.
#[derive(Debug, Clone)]
pub struct Backend {
    inner: Arc<Mutex<Inner>>,
}

/// A request on the channel, described for [`Backend::request`].
struct Request<'a> {
    code: u32,
    name: &'static str,
    rules: RequestRules,
    body: &'a [u8],
    fds: &'a [BorrowedFd<'a>],
}

impl Backend {
    /// Wraps the channel's socket. `features` are the protocol features negotiated on
    /// the main connection (they decide which requests may be sent and whether
    /// NEED_REPLY is used).
    pub fn new(conn: Connection, features: VhostUserProtocolFeatures) -> Self {
        Backend {
            inner: Arc::new(Mutex::new(Inner { conn, features })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the channel in a state worse than
        // a broken socket; keep going with the inner value.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bounds every send and every wait for a reply on the channel (`None`: wait
    /// forever). A front-end that does not answer in time makes the request fail with
    /// [`Error::SocketRetry`] instead of holding the caller. A back-end that runs its
    /// data path on the thread that sends requests sets this.
    pub fn set_timeout(&self, timeout: Option<std::time::Duration>) -> Result<()> {
        let inner = self.lock();
        let sock = inner.conn.socket();
        sock.set_read_timeout(timeout)?;
        sock.set_write_timeout(timeout)?;
        Ok(())
    }

    /// The negotiated protocol features.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.lock().features
    }

    /// Updates the negotiated protocol features (after a new `SET_PROTOCOL_FEATURES`).
    pub fn set_protocol_features(&self, features: VhostUserProtocolFeatures) {
        self.lock().features = features;
    }

    /// `CONFIG_CHANGE_MSG`: the device's config space changed.
    pub fn config_change(&self) -> Result<()> {
        self.std_request(BackendReq::CONFIG_CHANGE_MSG, &[], &[])
            .map(drop)
    }

    /// `SHMEM_MAP`: map `fd` into a VIRTIO shared memory region.
    pub fn shmem_map(&self, map: &VhostUserMMap, fd: BorrowedFd<'_>) -> Result<()> {
        map.validate()?;
        self.std_request(BackendReq::SHMEM_MAP, map.as_bytes(), &[fd])
            .map(drop)
    }

    /// `SHMEM_UNMAP`: unmap part of a VIRTIO shared memory region.
    pub fn shmem_unmap(&self, map: &VhostUserMMap) -> Result<()> {
        map.validate()?;
        self.std_request(BackendReq::SHMEM_UNMAP, map.as_bytes(), &[])
            .map(drop)
    }

    /// `SHARED_OBJECT_ADD`.
    pub fn shared_object_add(&self, uuid: &VhostUserShared) -> Result<()> {
        uuid.validate()?;
        self.std_request(BackendReq::SHARED_OBJECT_ADD, uuid.as_bytes(), &[])
            .map(drop)
    }

    /// `SHARED_OBJECT_REMOVE`.
    pub fn shared_object_remove(&self, uuid: &VhostUserShared) -> Result<()> {
        uuid.validate()?;
        self.std_request(BackendReq::SHARED_OBJECT_REMOVE, uuid.as_bytes(), &[])
            .map(drop)
    }

    /// `SHARED_OBJECT_LOOKUP`: the front-end's dma-buf fd for a shared object.
    pub fn shared_object_lookup(&self, uuid: &VhostUserShared) -> Result<OwnedFd> {
        uuid.validate()?;
        let (_, mut fds) =
            self.std_request(BackendReq::SHARED_OBJECT_LOOKUP, uuid.as_bytes(), &[])?;
        match fds.pop() {
            Some(fd) if fds.is_empty() => Ok(fd),
            _ => Err(Error::IncorrectFds {
                request: "SHARED_OBJECT_LOOKUP reply",
                got: fds.len(),
                want: "one on success",
            }),
        }
    }

    /// `VRING_CALL`: in-band used-buffer notification (`INBAND_NOTIFICATIONS`).
    pub fn vring_call(&self, index: u32) -> Result<()> {
        let state = VhostUserVringState::new(index, 0);
        state.validate()?;
        self.std_request(BackendReq::VRING_CALL, state.as_bytes(), &[])
            .map(drop)
    }

    /// `VRING_ERR`: in-band ring error notification (`INBAND_NOTIFICATIONS`).
    pub fn vring_err(&self, index: u32) -> Result<()> {
        let state = VhostUserVringState::new(index, 0);
        state.validate()?;
        self.std_request(BackendReq::VRING_ERR, state.as_bytes(), &[])
            .map(drop)
    }

    /// `IOTLB_MSG`: an IOTLB miss or access failure.
    pub fn iotlb_msg(&self, msg: &VhostUserIotlb) -> Result<()> {
        msg.validate()?;
        self.std_request(BackendReq::IOTLB_MSG, msg.as_bytes(), &[])
            .map(drop)
    }

    /// `VRING_HOST_NOTIFIER_MSG`: set (with an fd) or clear a ring's host notifier.
    pub fn vring_host_notifier(
        &self,
        index: u8,
        size: u64,
        offset: u64,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<()> {
        let area = VhostUserVringArea {
            u64_: vring_fd_u64(index, fd.is_some()),
            size,
            offset,
        };
        area.validate()?;
        let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
        self.std_request(BackendReq::VRING_HOST_NOTIFIER_MSG, area.as_bytes(), &fds)
            .map(drop)
    }

    /// crosvm's `GPU_MAP` (1006): map a GPU blob into a shared memory region.
    #[cfg(feature = "crosvm")]
    pub fn gpu_map(&self, msg: &VhostUserGpuMapMsg, fd: BorrowedFd<'_>) -> Result<()> {
        msg.validate()?;
        let req = CrosvmBackendReq::GPU_MAP;
        self.request(Request {
            code: req.code(),
            name: req.name(),
            rules: req.rules(),
            body: msg.as_bytes(),
            fds: &[fd],
        })
        .map(drop)
    }

    /// crosvm's `EXTERNAL_MAP` (1007): map host memory into a shared memory region.
    #[cfg(feature = "crosvm")]
    pub fn external_map(&self, msg: &VhostUserExternalMapMsg) -> Result<()> {
        msg.validate()?;
        let req = CrosvmBackendReq::EXTERNAL_MAP;
        self.request(Request {
            code: req.code(),
            name: req.name(),
            rules: req.rules(),
            body: msg.as_bytes(),
            fds: &[],
        })
        .map(drop)
    }

    fn std_request(
        &self,
        req: BackendReq,
        body: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(u64, Vec<OwnedFd>)> {
        self.request(Request {
            code: req.code(),
            name: req.name(),
            rules: req.rules(),
            body,
            fds,
        })
    }

    fn request(&self, req: Request<'_>) -> Result<(u64, Vec<OwnedFd>)> {
        let inner = self.lock();
        let mut needed = VhostUserProtocolFeatures::BACKEND_REQ;
        if let Some(f) = req.rules.feature {
            needed |= f;
        }
        if !req.fds.is_empty() && req.rules.fds != FdCount::One {
            // Requests that always carry an fd (SHMEM_MAP, crosvm's GPU_MAP) are gated by
            // their own feature: QEMU, crosvm and rust-vmm accept their fd without
            // BACKEND_SEND_FD (crosvm's front-end never negotiates it).
            needed |= VhostUserProtocolFeatures::BACKEND_SEND_FD;
        }
        if !inner.features.contains(needed) {
            return Err(Error::FeatureMismatch {
                request: req.name,
                feature: needed - inner.features,
            });
        }
        let need_reply = matches!(req.rules.reply, Reply::AckOnly)
            && inner
                .features
                .contains(VhostUserProtocolFeatures::REPLY_ACK);
        let header = Header::request(req.code, req.body.len() as u32, need_reply);
        inner.conn.send(&header, req.body, &[], req.fds)?;
        let reply_fds = match req.rules.reply {
            Reply::AckOnly if !need_reply => return Ok((0, Vec::new())),
            Reply::AckOnly => FdCount::None,
            Reply::Always { fds, .. } => fds,
        };
        let (value, fds) = recv_u64_reply(&inner.conn, req.code, req.name, reply_fds)?;
        if value != 0 {
            return Err(Error::PeerStatus {
                request: req.name,
                status: value,
            });
        }
        Ok((value, fds))
    }
}

/// Receives a u64 reply to `code` (a status or value), checking the header and the fds.
pub(crate) fn recv_u64_reply(
    conn: &Connection,
    code: u32,
    name: &'static str,
    fds_rule: FdCount,
) -> Result<(u64, Vec<OwnedFd>)> {
    let reply = conn.recv_reply(8)?;
    let (header, body, fds) = (reply.header, reply.body, reply.fds);
    check_reply_header(&header, code)?;
    if !fds_rule.check(fds.len(), 0) {
        return Err(Error::IncorrectFds {
            request: name,
            got: fds.len(),
            want: "what the reply allows",
        });
    }
    let value = outboard_protocol::parse::<VhostUserU64>(&body, "u64 reply")?.value;
    Ok((value, fds))
}

/// Checks that `header` is a valid reply to request `code`.
pub(crate) fn check_reply_header(header: &Header, code: u32) -> Result<()> {
    header.validate()?;
    if !header.is_reply() {
        return Err(Error::InvalidMessage(
            outboard_protocol::ProtocolError::Unknown {
                what: "reply without the REPLY flag, flags",
                value: header.flags.into(),
            },
        ));
    }
    if header.request != code {
        return Err(Error::UnexpectedReply {
            got: header.request,
            want: code,
        });
    }
    Ok(())
}
