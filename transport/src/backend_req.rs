//! [`BackendReqSender`]: the back-end's sender on the back-end -> front-end channel.
//!
//! The front-end hands the back-end one end of a socket pair with `SET_BACKEND_REQ_FD`
//! (protocol feature `BACKEND_REQ`); the back-end then sends [`BackendReq`]s on it:
//! config change notifications, shared memory maps and unmaps, shared objects, in-band
//! vring notifications. A `BackendReqSender` is cheap to clone and safe to share between threads
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

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
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
    /// Requests whose reply the caller stopped waiting for (the timeout of
    /// [`BackendReqSender::set_timeout`] ran out), oldest first. The front-end answers in order,
    /// so their replies come before any later request's and are read and dropped first:
    /// without this a late reply would be taken for the next request's (a slow QEMU
    /// under TCG answered a `SHMEM_MAP` after 1 s, and every later map and unmap got the
    /// previous one's answer).
    owed: VecDeque<Owed>,
    /// Posted requests the front-end refused, oldest first, until
    /// [`BackendReqSender::take_refused`] takes them (at most [`MAX_REFUSED`] kept).
    refused: Vec<Refused>,
    /// Refusals beyond [`MAX_REFUSED`], counted only.
    refused_dropped: u64,
}

/// A request still owed a reply.
#[derive(Debug, Clone, Copy)]
struct Owed {
    code: u32,
    name: &'static str,
    /// For a `SHMEM_MAP` the caller was told failed: the unmap that undoes it if the
    /// late reply says it succeeded after all (else the front-end's region would keep a
    /// mapping the device does not know of, and the range could never be mapped again).
    undo: Option<VhostUserMMap>,
    /// Sent with [`BackendReqSender::post_shmem_map`] or [`BackendReqSender::post_shmem_unmap`]: its
    /// caller did not wait, and a refusal is kept for [`BackendReqSender::take_refused`].
    posted: Option<VhostUserMMap>,
}

/// A posted request that the front-end refused (its reply came with a non-zero status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// The request's name (`SHMEM_MAP`, `SHMEM_UNMAP`).
    pub request: &'static str,
    /// What it asked for.
    pub map: VhostUserMMap,
    /// The front-end's status.
    pub status: u64,
}

/// How many replies a channel may owe (posted requests and late ones) before further
/// requests are refused with [`Error::RepliesOverdue`]: a front-end this far behind is
/// not coming back. A media device posts one map per buffer plane at most.
pub const MAX_OWED_REPLIES: usize = 1024;

/// The old name of [`BackendReqSender`], which did not say what it does.
#[deprecated(
    since = "0.1.0",
    note = "renamed BackendReqSender: it sends the back-end's requests"
)]
pub type Backend = BackendReqSender;

/// How many refusals of posted requests are kept for [`BackendReqSender::take_refused`].
pub const MAX_REFUSED: usize = 64;

/// The back-end's end of the back-end -> front-end channel: sends the back-end's
/// requests (config change, vring call, shared memory map, ...) to the front-end.
/// (rust-vmm's `vhost` calls it `Backend`, formerly `Slave`.)
#[derive(Debug, Clone)]
pub struct BackendReqSender {
    inner: Arc<Mutex<Inner>>,
}

/// A request on the channel, described for [`BackendReqSender::request`].
struct Request<'a> {
    code: u32,
    name: &'static str,
    rules: RequestRules,
    body: &'a [u8],
    fds: &'a [BorrowedFd<'a>],
    /// What undoes the request if it succeeds after its caller stopped waiting.
    undo: Option<VhostUserMMap>,
}

impl BackendReqSender {
    /// Wraps the channel's socket. `features` are the protocol features negotiated on
    /// the main connection (they decide which requests may be sent and whether
    /// NEED_REPLY is used).
    pub fn new(conn: Connection, features: VhostUserProtocolFeatures) -> Self {
        BackendReqSender {
            inner: Arc::new(Mutex::new(Inner {
                conn,
                features,
                owed: VecDeque::new(),
                refused: Vec::new(),
                refused_dropped: 0,
            })),
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
    ///
    /// The late reply is read and dropped before the next request's (replies come in
    /// order); a `SHMEM_MAP` that turns out to have succeeded is unmapped again, since
    /// its caller was told it failed. A channel owing more than [`MAX_OWED_REPLIES`]
    /// replies refuses further requests with [`Error::RepliesOverdue`].
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

    /// A duplicate of the channel's socket (to hand the channel to another process),
    /// or `None` while the channel owes replies or holds refusals nobody took: then
    /// its state is more than the socket.
    pub fn try_clone_socket(&self) -> Option<std::io::Result<OwnedFd>> {
        let inner = self.lock();
        if !inner.owed.is_empty() || !inner.refused.is_empty() {
            return None;
        }
        Some(inner.conn.socket().as_fd().try_clone_to_owned())
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
        let undo = VhostUserMMap {
            fd_offset: 0,
            flags: 0,
            ..*map
        };
        self.request(Request {
            undo: Some(undo),
            ..Self::std(BackendReq::SHMEM_MAP, map.as_bytes(), &[fd])
        })
        .map(drop)
    }

    /// `SHMEM_MAP` without waiting for the front-end's answer: the request is sent (with
    /// NEED_REPLY when `REPLY_ACK` was negotiated) and its reply is read later, when one
    /// is ready at the next request, or when the next waiting request needs the channel.
    /// A refusal is kept for [`BackendReqSender::take_refused`].
    ///
    /// This is how a back-end that serves its vhost-user connection and its device on one
    /// thread must map: QEMU handles a `SHMEM_MAP` in its main loop and, while doing so,
    /// updates the memory table of every vhost-user device of the VM, waiting for each
    /// one's answer. A back-end thread blocked on its own map's reply cannot give that
    /// answer, and both wait until the timeout: with four virtio-media devices under TCG
    /// every map did, maps and unmaps failed and the guest driver's 5 s command timeout
    /// expired. The front-end handles the channel's requests in order, so a posted map is
    /// in place before anything the device sends the guest afterwards is seen.
    pub fn post_shmem_map(&self, map: &VhostUserMMap, fd: BorrowedFd<'_>) -> Result<()> {
        map.validate()?;
        self.post(
            Self::std(BackendReq::SHMEM_MAP, map.as_bytes(), &[fd]),
            *map,
        )
    }

    /// `SHMEM_UNMAP` without waiting for the front-end's answer, as
    /// [`BackendReqSender::post_shmem_map`].
    pub fn post_shmem_unmap(&self, map: &VhostUserMMap) -> Result<()> {
        map.validate()?;
        self.post(
            Self::std(BackendReq::SHMEM_UNMAP, map.as_bytes(), &[]),
            *map,
        )
    }

    /// The posted requests the front-end refused since the last call, oldest first, and
    /// how many more were refused than could be kept ([`MAX_REFUSED`]). Reads the replies
    /// that are ready first.
    pub fn take_refused(&self) -> Result<(Vec<Refused>, u64)> {
        let mut inner = self.lock();
        drain_ready(&mut inner)?;
        let dropped = std::mem::take(&mut inner.refused_dropped);
        Ok((std::mem::take(&mut inner.refused), dropped))
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
            undo: None,
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
            undo: None,
        })
        .map(drop)
    }

    fn std<'a>(req: BackendReq, body: &'a [u8], fds: &'a [BorrowedFd<'a>]) -> Request<'a> {
        Request {
            code: req.code(),
            name: req.name(),
            rules: req.rules(),
            body,
            fds,
            undo: None,
        }
    }

    fn std_request(
        &self,
        req: BackendReq,
        body: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(u64, Vec<OwnedFd>)> {
        self.request(Self::std(req, body, fds))
    }

    /// Sends `req` (an ack-only request) without waiting for its reply.
    fn post(&self, req: Request<'_>, map: VhostUserMMap) -> Result<()> {
        let mut inner = self.lock();
        drain_ready(&mut inner)?;
        if inner.owed.len() >= MAX_OWED_REPLIES {
            return Err(Error::RepliesOverdue {
                owed: inner.owed.len(),
                max: MAX_OWED_REPLIES,
            });
        }
        if check_and_send(&inner, &req)? {
            inner.owed.push_back(Owed {
                code: req.code,
                name: req.name,
                undo: None,
                posted: Some(map),
            });
        }
        Ok(())
    }

    fn request(&self, req: Request<'_>) -> Result<(u64, Vec<OwnedFd>)> {
        let mut inner = self.lock();
        settle_owed(&mut inner)?;
        let expects_reply = check_and_send(&inner, &req)?;
        let reply_fds = match req.rules.reply {
            Reply::AckOnly if !expects_reply => return Ok((0, Vec::new())),
            Reply::AckOnly => FdCount::None,
            Reply::Always { fds, .. } => fds,
        };
        let (value, fds) = match recv_u64_reply(&inner.conn, req.code, req.name, reply_fds) {
            Err(Error::SocketRetry(e)) => {
                inner.owed.push_back(Owed {
                    code: req.code,
                    name: req.name,
                    undo: req.undo,
                    posted: None,
                });
                return Err(Error::SocketRetry(e));
            }
            other => other?,
        };
        if value != 0 {
            return Err(Error::PeerStatus {
                request: req.name,
                status: value,
            });
        }
        Ok((value, fds))
    }
}

/// Checks that `req` may be sent on `inner`'s channel (features, fds) and sends it;
/// returns whether a reply will come (NEED_REPLY was set, or the request always has one).
fn check_and_send(inner: &Inner, req: &Request<'_>) -> Result<bool> {
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
    let ack_only = matches!(req.rules.reply, Reply::AckOnly);
    let need_reply = ack_only
        && inner
            .features
            .contains(VhostUserProtocolFeatures::REPLY_ACK);
    let header = Header::request(req.code, req.body.len() as u32, need_reply);
    inner.conn.send(&header, req.body, &[], req.fds)?;
    Ok(need_reply || !ack_only)
}

/// Handles the reply `value` to `owed` (the oldest owed request): a posted request's
/// refusal is kept; a `SHMEM_MAP` whose caller stopped waiting but that succeeded is
/// unmapped.
fn owed_reply(inner: &mut Inner, owed: Owed, value: u64) -> Result<()> {
    if let Some(map) = owed.posted.filter(|_| value != 0) {
        if inner.refused.len() < MAX_REFUSED {
            inner.refused.push(Refused {
                request: owed.name,
                map,
                status: value,
            });
        } else {
            inner.refused_dropped += 1;
        }
    }
    let Some(undo) = owed.undo.filter(|_| value == 0) else {
        return Ok(());
    };
    let header = Header::request(
        BackendReq::SHMEM_UNMAP.code(),
        undo.as_bytes().len() as u32,
        inner
            .features
            .contains(VhostUserProtocolFeatures::REPLY_ACK),
    );
    inner.conn.send(&header, undo.as_bytes(), &[], &[])?;
    if header.need_reply() {
        // Its reply is read like any other owed one (a failure to unmap is the
        // front-end's to report).
        inner.owed.push_back(Owed {
            code: BackendReq::SHMEM_UNMAP.code(),
            name: BackendReq::SHMEM_UNMAP.name(),
            undo: None,
            posted: None,
        });
    }
    Ok(())
}

/// Reads the owed replies that have arrived, without waiting for the others.
fn drain_ready(inner: &mut Inner) -> Result<()> {
    while let Some(owed) = inner.owed.front().copied() {
        let mut fds = [rustix::event::PollFd::new(
            inner.conn.socket(),
            rustix::event::PollFlags::IN,
        )];
        let zero = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        match rustix::event::poll(&mut fds, Some(&zero)) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(Error::SocketError(e.into())),
        }
        // Readable, or hung up (the read then says so). A reply's 20 bytes come in
        // one piece; a front-end that sends half of one is waited for as long as
        // any reply (the channel's timeout).
        let (value, _fds) = recv_u64_reply(&inner.conn, owed.code, owed.name, FdCount::Optional)?;
        inner.owed.pop_front();
        owed_reply(inner, owed, value)?;
    }
    Ok(())
}

/// Reads and drops the replies `inner` owes, oldest first; undoes a `SHMEM_MAP` whose
/// late reply says it succeeded. Fails if a reply is still late (the caller's request
/// is not sent: its reply would queue behind) or the channel owes too many.
fn settle_owed(inner: &mut Inner) -> Result<()> {
    if inner.owed.len() > MAX_OWED_REPLIES {
        return Err(Error::RepliesOverdue {
            owed: inner.owed.len(),
            max: MAX_OWED_REPLIES,
        });
    }
    while let Some(owed) = inner.owed.front().copied() {
        // Any fds of a late reply (SHARED_OBJECT_LOOKUP) are closed with it.
        let (value, _fds) = recv_u64_reply(&inner.conn, owed.code, owed.name, FdCount::Optional)?;
        inner.owed.pop_front();
        owed_reply(inner, owed, value)?;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

    use std::os::fd::AsFd;
    use std::time::Duration;

    use outboard_protocol::vhost_user::VhostUserMMapFlags;
    use zerocopy::FromBytes;

    use super::*;

    const LATE: Duration = Duration::from_millis(50);

    fn map(shm_offset: u64) -> VhostUserMMap {
        VhostUserMMap {
            shmid: 0,
            fd_offset: 0x1000,
            shm_offset,
            len: 0x2000,
            flags: VhostUserMMapFlags::RW.bits(),
            ..Default::default()
        }
    }

    /// The front-end's end: receives one request, checks it, answers `status` after
    /// `delay` (or never, for `None`).
    fn answer(fe: &Connection, want: BackendReq, status: Option<u64>, delay: Duration) -> Vec<u8> {
        let m = fe.recv().unwrap();
        assert_eq!(m.header.request, want.code(), "{}", want.name());
        assert!(m.header.need_reply());
        std::thread::sleep(delay);
        if let Some(v) = status {
            let reply = Header::reply(want.code(), 8);
            fe.send(&reply, VhostUserU64::new(v).as_bytes(), &[], &[])
                .unwrap();
        }
        m.body
    }

    fn pair() -> (BackendReqSender, Connection) {
        let (b, fe) = Connection::pair().unwrap();
        let backend = BackendReqSender::new(b, VhostUserProtocolFeatures::all());
        backend.set_timeout(Some(LATE)).unwrap();
        (backend, fe)
    }

    /// An fd to map (its content does not matter here).
    fn file() -> OwnedFd {
        rustix::fs::memfd_create("backend-req-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap()
    }

    #[test]
    fn a_late_map_reply_is_not_taken_for_the_next_and_a_late_success_is_unmapped() {
        let (backend, fe) = pair();
        let front = std::thread::spawn(move || {
            // Answered after the back-end gave up: it succeeded after all.
            answer(&fe, BackendReq::SHMEM_MAP, Some(0), LATE * 3);
            // The back-end undoes it before its next request...
            let undo = answer(&fe, BackendReq::SHMEM_UNMAP, Some(0), Duration::ZERO);
            let undo = VhostUserMMap::read_from_bytes(&undo).unwrap();
            assert_eq!((undo.shm_offset, undo.len), (0, 0x2000));
            // ...then sends it, and this answer is the one it reads.
            let next = answer(&fe, BackendReq::SHMEM_MAP, Some(0), Duration::ZERO);
            assert_eq!(
                VhostUserMMap::read_from_bytes(&next).unwrap().shm_offset,
                0x4000
            );
            // A late failure needs no undo.
            answer(&fe, BackendReq::SHMEM_MAP, Some(1), LATE * 3);
            answer(&fe, BackendReq::SHMEM_UNMAP, Some(0), Duration::ZERO);
        });
        let f = file();
        let err = backend.shmem_map(&map(0), f.as_fd()).unwrap_err();
        assert!(matches!(err, Error::SocketRetry(_)), "{err}");
        std::thread::sleep(LATE * 4);
        backend.shmem_map(&map(0x4000), f.as_fd()).unwrap();
        assert!(backend.shmem_map(&map(0x8000), f.as_fd()).is_err());
        std::thread::sleep(LATE * 4);
        backend.shmem_unmap(&map(0x4000)).unwrap();
        front.join().unwrap();
        assert!(backend.lock().owed.is_empty());
    }

    #[test]
    fn posted_maps_do_not_wait_and_refusals_are_reported() {
        let (b, fe) = Connection::pair().unwrap();
        let backend = BackendReqSender::new(b, VhostUserProtocolFeatures::all());
        // No timeout: a post that waited for its reply would hang the test.
        let f = file();
        for off in [0, 0x4000, 0x8000] {
            backend.post_shmem_map(&map(off), f.as_fd()).unwrap();
        }
        backend.post_shmem_unmap(&map(0)).unwrap();
        assert_eq!(backend.lock().owed.len(), 4);
        assert_eq!(backend.take_refused().unwrap(), (Vec::new(), 0));
        // The front-end answers in order; the second map is refused.
        answer(&fe, BackendReq::SHMEM_MAP, Some(0), Duration::ZERO);
        answer(&fe, BackendReq::SHMEM_MAP, Some(22), Duration::ZERO);
        answer(&fe, BackendReq::SHMEM_MAP, Some(0), Duration::ZERO);
        let (refused, dropped) = backend.take_refused().unwrap();
        assert_eq!(dropped, 0);
        assert_eq!(
            refused,
            vec![Refused {
                request: "SHMEM_MAP",
                map: map(0x4000),
                status: 22,
            }]
        );
        assert_eq!(backend.lock().owed.len(), 1);
        // A request that waits reads what is still owed first.
        let front = std::thread::spawn(move || {
            answer(&fe, BackendReq::SHMEM_UNMAP, Some(0), LATE);
            answer(&fe, BackendReq::SHMEM_UNMAP, Some(0), Duration::ZERO);
        });
        backend.shmem_unmap(&map(0x8000)).unwrap();
        front.join().unwrap();
        assert!(backend.lock().owed.is_empty());
        assert_eq!(backend.take_refused().unwrap(), (Vec::new(), 0));
    }

    #[test]
    fn a_reply_still_late_fails_the_next_request_without_sending_it() {
        let (backend, fe) = pair();
        let f = file();
        assert!(backend.shmem_map(&map(0), f.as_fd()).is_err());
        assert!(backend.config_change().is_err());
        // Only the first request reached the front-end.
        let m = fe.recv().unwrap();
        assert_eq!(m.header.request, BackendReq::SHMEM_MAP.code());
        fe.socket().set_nonblocking(true).unwrap();
        assert!(fe.recv().is_err(), "the second request was sent");
        assert_eq!(backend.lock().owed.len(), 1);
        // A front-end that hangs up ends it.
        drop(fe);
        assert!(backend.config_change().unwrap_err().is_fatal());
    }
}
