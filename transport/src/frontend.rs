//! [`Frontend`]: the vhost-user front-end client, with a method for every front-end
//! request of the spec.
//!
//! The client keeps the negotiation state (offered and acked virtio features, acked
//! protocol features) and uses it before anything is sent:
//!
//! - a request whose protocol feature was not negotiated fails locally with
//!   [`Error::FeatureMismatch`];
//! - `GET/SET_PROTOCOL_FEATURES` and `SET_VRING_ENABLE` need the back-end to have
//!   offered `VHOST_USER_F_PROTOCOL_FEATURES` in `GET_FEATURES` (else
//!   [`Error::InvalidOperation`]);
//! - once `REPLY_ACK` is negotiated, every request without a reply of its own sets
//!   NEED_REPLY and the back-end's status is checked ([`Error::PeerStatus`]).
//!
//! Every reply is checked: REPLY flag, request code, body size, fd count.
//!
//! ```no_run
//! use outboard_transport::Frontend;
//! use outboard_protocol::vhost_user::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
//!
//! let mut fe = Frontend::connect("/tmp/vsock.sock")?;
//! let features = fe.get_features()?;
//! fe.set_owner()?;
//! if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
//!     let offered = fe.get_protocol_features()?;
//!     fe.set_protocol_features(offered & VhostUserProtocolFeatures::REPLY_ACK)?;
//! }
//! fe.set_features(features)?;
//! # Ok::<(), outboard_transport::Error>(())
//! ```

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use outboard_protocol::vhost_user::{
    parse_config, vring_fd_u64, FdCount, FrontendReq, Header, Reply, TransferDirection,
    TransferPhase, VhostUserConfig, VhostUserConfigFlags, VhostUserInflight, VhostUserIotlb,
    VhostUserLog, VhostUserMemory, VhostUserMemoryRegion, VhostUserProtocolFeatures,
    VhostUserShared, VhostUserShmemConfig, VhostUserSingleMemoryRegion,
    VhostUserTransferDeviceState, VhostUserU64, VhostUserVirtioFeatures, VhostUserVringAddr,
    VhostUserVringState, MAX_MEM_TABLE_REGIONS,
};
use outboard_protocol::{parse, Validate};
use zerocopy::IntoBytes;

use crate::backend_req::check_reply_header;
use crate::connection::Connection;
use crate::error::{Error, Result};

/// One region of a memory table to send, with the fd that backs it.
#[derive(Debug, Clone, Copy)]
pub struct MemoryRegionRef<'a> {
    /// The region.
    pub region: VhostUserMemoryRegion,
    /// The fd the back-end maps (`region.mmap_offset` is the offset in it).
    pub fd: BorrowedFd<'a>,
}

/// A received reply.
struct ReplyMsg {
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// The front-end side of a vhost-user connection.
#[derive(Debug)]
pub struct Frontend {
    conn: Connection,
    offered_features: u64,
    acked_features: u64,
    protocol_features: VhostUserProtocolFeatures,
}

impl Frontend {
    /// Drives the back-end on a connected socket.
    pub fn new(conn: Connection) -> Self {
        Frontend {
            conn,
            offered_features: 0,
            acked_features: 0,
            protocol_features: VhostUserProtocolFeatures::empty(),
        }
    }

    /// Connects to a back-end listening at `path`.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self> {
        Ok(Frontend::new(Connection::connect(path)?))
    }

    /// The virtio features the back-end offered in the last `GET_FEATURES`.
    pub fn offered_features(&self) -> u64 {
        self.offered_features
    }

    /// The virtio features sent with `SET_FEATURES`.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The negotiated protocol features.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol_features
    }

    /// `SET_OWNER`.
    pub fn set_owner(&mut self) -> Result<()> {
        self.ack_request(FrontendReq::SET_OWNER, &[], &[], &[])
    }

    /// `RESET_OWNER` (deprecated by the spec; prefer [`reset_device`](Self::reset_device)).
    pub fn reset_owner(&mut self) -> Result<()> {
        self.ack_request(FrontendReq::RESET_OWNER, &[], &[], &[])
    }

    /// `GET_FEATURES`.
    pub fn get_features(&mut self) -> Result<u64> {
        let f = self.u64_request(FrontendReq::GET_FEATURES, &[], &[])?;
        self.offered_features = f;
        Ok(f)
    }

    /// `SET_FEATURES`: only bits the back-end offered may be set.
    pub fn set_features(&mut self, features: u64) -> Result<()> {
        if features & !self.offered_features != 0 {
            return Err(Error::InvalidParam(format!(
                "SET_FEATURES: bits {:#x} were not offered",
                features & !self.offered_features
            )));
        }
        self.ack_request(
            FrontendReq::SET_FEATURES,
            VhostUserU64::new(features).as_bytes(),
            &[],
            &[],
        )?;
        self.acked_features = features;
        Ok(())
    }

    /// `GET_PROTOCOL_FEATURES`. Unknown bits in the reply are dropped.
    pub fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        let bits = self.u64_request(FrontendReq::GET_PROTOCOL_FEATURES, &[], &[])?;
        Ok(VhostUserProtocolFeatures::from_bits_truncate(bits))
    }

    /// `SET_PROTOCOL_FEATURES`; on success these become the negotiated features.
    pub fn set_protocol_features(&mut self, features: VhostUserProtocolFeatures) -> Result<()> {
        self.ack_request(
            FrontendReq::SET_PROTOCOL_FEATURES,
            VhostUserU64::new(features.bits()).as_bytes(),
            &[],
            &[],
        )?;
        self.protocol_features = features;
        Ok(())
    }

    /// `SET_MEM_TABLE`: 1 to 8 regions, each with its fd.
    pub fn set_mem_table(&mut self, regions: &[MemoryRegionRef<'_>]) -> Result<()> {
        if regions.is_empty() || regions.len() > MAX_MEM_TABLE_REGIONS {
            return Err(Error::InvalidParam(format!(
                "SET_MEM_TABLE: {} regions, 1 to {MAX_MEM_TABLE_REGIONS} allowed",
                regions.len()
            )));
        }
        let head = VhostUserMemory::new(regions.len() as u32);
        let mut payload = Vec::with_capacity(regions.len() * 32);
        let mut fds = Vec::with_capacity(regions.len());
        for r in regions {
            r.region.validate()?;
            payload.extend_from_slice(r.region.as_bytes());
            fds.push(r.fd);
        }
        self.ack_request(FrontendReq::SET_MEM_TABLE, head.as_bytes(), &payload, &fds)
    }

    /// `SET_LOG_BASE` (`LOG_SHMFD`): the dirty log area in `fd`.
    pub fn set_log_base(&mut self, log: &VhostUserLog, fd: BorrowedFd<'_>) -> Result<()> {
        log.validate()?;
        let reply = self.request(FrontendReq::SET_LOG_BASE, log.as_bytes(), &[], &[fd])?;
        if reply.body.len() == std::mem::size_of::<VhostUserLog>() {
            // rust-vmm's echo of the request body: success.
            return Ok(());
        }
        let status = parse::<VhostUserU64>(&reply.body, "SET_LOG_BASE reply")?.value;
        if status != 0 {
            return Err(Error::PeerStatus {
                request: "SET_LOG_BASE",
                status,
            });
        }
        Ok(())
    }

    /// `SET_LOG_FD` (`LOG_SHMFD`).
    pub fn set_log_fd(&mut self, fd: BorrowedFd<'_>) -> Result<()> {
        self.ack_request(FrontendReq::SET_LOG_FD, &[], &[], &[fd])
    }

    /// `SET_VRING_NUM`.
    pub fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        self.state_request(FrontendReq::SET_VRING_NUM, index, num)
    }

    /// `SET_VRING_ADDR`.
    pub fn set_vring_addr(&mut self, addr: &VhostUserVringAddr) -> Result<()> {
        addr.validate()?;
        self.ack_request(FrontendReq::SET_VRING_ADDR, addr.as_bytes(), &[], &[])
    }

    /// `SET_VRING_BASE`.
    pub fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        self.state_request(FrontendReq::SET_VRING_BASE, index, base)
    }

    /// `GET_VRING_BASE`: stops the ring and returns its next available index.
    pub fn get_vring_base(&mut self, index: u32) -> Result<u32> {
        let req = VhostUserVringState::new(index, 0);
        req.validate()?;
        let reply = self.request(FrontendReq::GET_VRING_BASE, req.as_bytes(), &[], &[])?;
        let state = parse::<VhostUserVringState>(&reply.body, "GET_VRING_BASE reply")?;
        if state.index != index {
            return Err(Error::InvalidMessage(
                outboard_protocol::ProtocolError::Unknown {
                    what: "GET_VRING_BASE reply for another ring, index",
                    value: state.index.into(),
                },
            ));
        }
        Ok(state.num)
    }

    /// `SET_VRING_KICK`: `None` asks the back-end to poll the ring.
    pub fn set_vring_kick(&mut self, index: u8, fd: Option<BorrowedFd<'_>>) -> Result<()> {
        self.vring_fd_request(FrontendReq::SET_VRING_KICK, index, fd)
    }

    /// `SET_VRING_CALL`: `None` disables notifications.
    pub fn set_vring_call(&mut self, index: u8, fd: Option<BorrowedFd<'_>>) -> Result<()> {
        self.vring_fd_request(FrontendReq::SET_VRING_CALL, index, fd)
    }

    /// `SET_VRING_ERR`.
    pub fn set_vring_err(&mut self, index: u8, fd: Option<BorrowedFd<'_>>) -> Result<()> {
        self.vring_fd_request(FrontendReq::SET_VRING_ERR, index, fd)
    }

    /// `GET_QUEUE_NUM` (`MQ`).
    pub fn get_queue_num(&mut self) -> Result<u64> {
        self.u64_request(FrontendReq::GET_QUEUE_NUM, &[], &[])
    }

    /// `SET_VRING_ENABLE`.
    pub fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        self.state_request(FrontendReq::SET_VRING_ENABLE, index, enable.into())
    }

    /// `SEND_RARP` (`RARP`).
    pub fn send_rarp(&mut self, mac: [u8; 6]) -> Result<()> {
        let mut b = [0u8; 8];
        b[..6].copy_from_slice(&mac);
        self.ack_request(FrontendReq::SEND_RARP, &b, &[], &[])
    }

    /// `NET_SET_MTU` (`MTU`).
    pub fn net_set_mtu(&mut self, mtu: u64) -> Result<()> {
        self.ack_request(
            FrontendReq::NET_SET_MTU,
            VhostUserU64::new(mtu).as_bytes(),
            &[],
            &[],
        )
    }

    /// `SET_BACKEND_REQ_FD` (`BACKEND_REQ`): give the back-end its end of the back-end
    /// request channel (see [`FrontendReqHandler`](crate::FrontendReqHandler)).
    pub fn set_backend_req_fd(&mut self, fd: BorrowedFd<'_>) -> Result<()> {
        self.ack_request(FrontendReq::SET_BACKEND_REQ_FD, &[], &[], &[fd])
    }

    /// `IOTLB_MSG`.
    pub fn iotlb_msg(&mut self, msg: &VhostUserIotlb) -> Result<()> {
        msg.validate()?;
        self.ack_request(FrontendReq::IOTLB_MSG, msg.as_bytes(), &[], &[])
    }

    /// `SET_VRING_ENDIAN` (`CROSS_ENDIAN`).
    pub fn set_vring_endian(&mut self, index: u32, big_endian: bool) -> Result<()> {
        self.state_request(FrontendReq::SET_VRING_ENDIAN, index, big_endian.into())
    }

    /// `GET_CONFIG` (`CONFIG`): `size` bytes of config space at `offset`.
    pub fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        flags: VhostUserConfigFlags,
    ) -> Result<Vec<u8>> {
        let head = VhostUserConfig::new(offset, size, flags);
        head.validate()?;
        let zeros = vec![0u8; size as usize];
        let reply = self.request(FrontendReq::GET_CONFIG, head.as_bytes(), &zeros, &[])?;
        if reply.body.len() == std::mem::size_of::<VhostUserConfig>() {
            // The spec's failure reply: the head alone, size 0.
            return Err(Error::PeerStatus {
                request: "GET_CONFIG",
                status: 0,
            });
        }
        let (got, data) = parse_config(&reply.body)?;
        if got.offset != offset || got.size != size {
            return Err(Error::InvalidMessage(
                outboard_protocol::ProtocolError::Size {
                    what: "GET_CONFIG reply (offset or size differs from the request)",
                    got: got.size as usize,
                    want: size as usize,
                },
            ));
        }
        Ok(data.to_vec())
    }

    /// `SET_CONFIG` (`CONFIG`).
    pub fn set_config(
        &mut self,
        offset: u32,
        data: &[u8],
        flags: VhostUserConfigFlags,
    ) -> Result<()> {
        let size = u32::try_from(data.len())
            .map_err(|_| Error::InvalidParam(format!("config of {} bytes", data.len())))?;
        let head = VhostUserConfig::new(offset, size, flags);
        head.validate()?;
        self.ack_request(FrontendReq::SET_CONFIG, head.as_bytes(), data, &[])
    }

    /// `CREATE_CRYPTO_SESSION` (`CRYPTO_SESSION`): opaque request and reply.
    pub fn create_crypto_session(&mut self, request: &[u8]) -> Result<Vec<u8>> {
        Ok(self
            .request(FrontendReq::CREATE_CRYPTO_SESSION, request, &[], &[])?
            .body)
    }

    /// `CLOSE_CRYPTO_SESSION` (`CRYPTO_SESSION`).
    pub fn close_crypto_session(&mut self, session: u64) -> Result<()> {
        self.ack_request(
            FrontendReq::CLOSE_CRYPTO_SESSION,
            VhostUserU64::new(session).as_bytes(),
            &[],
            &[],
        )
    }

    /// `POSTCOPY_ADVISE` (`PAGEFAULT`): the back-end's userfaultfd.
    pub fn postcopy_advise(&mut self) -> Result<OwnedFd> {
        let mut reply = self.request(FrontendReq::POSTCOPY_ADVISE, &[], &[], &[])?;
        reply.fds.pop().ok_or(Error::IncorrectFds {
            request: "POSTCOPY_ADVISE reply",
            got: 0,
            want: "exactly one",
        })
    }

    /// `POSTCOPY_LISTEN` (`PAGEFAULT`).
    pub fn postcopy_listen(&mut self) -> Result<()> {
        self.ack_request(FrontendReq::POSTCOPY_LISTEN, &[], &[], &[])
    }

    /// `POSTCOPY_END` (`PAGEFAULT`).
    pub fn postcopy_end(&mut self) -> Result<()> {
        self.status_request(FrontendReq::POSTCOPY_END, &[], &[])
            .map(drop)
    }

    /// `GET_INFLIGHT_FD` (`INFLIGHT_SHMFD`): the back-end's inflight area.
    pub fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> Result<(VhostUserInflight, OwnedFd)> {
        inflight.validate()?;
        let mut reply =
            self.request(FrontendReq::GET_INFLIGHT_FD, inflight.as_bytes(), &[], &[])?;
        let got = parse::<VhostUserInflight>(&reply.body, "GET_INFLIGHT_FD reply")?;
        let fd = reply.fds.pop().ok_or(Error::IncorrectFds {
            request: "GET_INFLIGHT_FD reply",
            got: 0,
            want: "exactly one",
        })?;
        Ok((got, fd))
    }

    /// `SET_INFLIGHT_FD` (`INFLIGHT_SHMFD`).
    pub fn set_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
        fd: BorrowedFd<'_>,
    ) -> Result<()> {
        inflight.validate()?;
        self.ack_request(
            FrontendReq::SET_INFLIGHT_FD,
            inflight.as_bytes(),
            &[],
            &[fd],
        )
    }

    /// `GPU_SET_SOCKET`.
    pub fn gpu_set_socket(&mut self, fd: BorrowedFd<'_>) -> Result<()> {
        self.ack_request(FrontendReq::GPU_SET_SOCKET, &[], &[], &[fd])
    }

    /// `RESET_DEVICE` (`RESET_DEVICE`).
    pub fn reset_device(&mut self) -> Result<()> {
        self.ack_request(FrontendReq::RESET_DEVICE, &[], &[], &[])
    }

    /// `VRING_KICK` (`INBAND_NOTIFICATIONS`).
    pub fn vring_kick(&mut self, index: u32) -> Result<()> {
        self.state_request(FrontendReq::VRING_KICK, index, 0)
    }

    /// `GET_MAX_MEM_SLOTS` (`CONFIGURE_MEM_SLOTS`).
    pub fn get_max_mem_slots(&mut self) -> Result<u64> {
        self.u64_request(FrontendReq::GET_MAX_MEM_SLOTS, &[], &[])
    }

    /// `ADD_MEM_REG` (`CONFIGURE_MEM_SLOTS`).
    pub fn add_mem_region(&mut self, region: &MemoryRegionRef<'_>) -> Result<()> {
        let body = VhostUserSingleMemoryRegion::new(region.region);
        body.validate()?;
        self.ack_request(FrontendReq::ADD_MEM_REG, body.as_bytes(), &[], &[region.fd])
    }

    /// `REM_MEM_REG` (`CONFIGURE_MEM_SLOTS`).
    pub fn remove_mem_region(&mut self, region: &VhostUserMemoryRegion) -> Result<()> {
        let body = VhostUserSingleMemoryRegion::new(*region);
        body.validate()?;
        self.ack_request(FrontendReq::REM_MEM_REG, body.as_bytes(), &[], &[])
    }

    /// `SET_STATUS` (`STATUS`).
    pub fn set_status(&mut self, status: u8) -> Result<()> {
        self.ack_request(
            FrontendReq::SET_STATUS,
            VhostUserU64::new(status.into()).as_bytes(),
            &[],
            &[],
        )
    }

    /// `GET_STATUS` (`STATUS`).
    pub fn get_status(&mut self) -> Result<u8> {
        let v = self.u64_request(FrontendReq::GET_STATUS, &[], &[])?;
        u8::try_from(v).map_err(|_| {
            Error::InvalidMessage(outboard_protocol::ProtocolError::OutOfBounds {
                what: "GET_STATUS reply",
                value: v,
                limit: 0xff,
            })
        })
    }

    /// `GET_SHARED_OBJECT` (`SHARED_OBJECT`): the dma-buf fd of a shared object.
    pub fn get_shared_object(&mut self, uuid: &VhostUserShared) -> Result<OwnedFd> {
        uuid.validate()?;
        let (_, mut fds) =
            self.status_request(FrontendReq::GET_SHARED_OBJECT, uuid.as_bytes(), &[])?;
        fds.pop().ok_or(Error::IncorrectFds {
            request: "GET_SHARED_OBJECT reply",
            got: 0,
            want: "one on success",
        })
    }

    /// `SET_DEVICE_STATE_FD` (`DEVICE_STATE`): start a state transfer through `fd`.
    /// Returns the fd the back-end wants used instead, if it sent one.
    pub fn set_device_state_fd(
        &mut self,
        direction: TransferDirection,
        phase: TransferPhase,
        fd: BorrowedFd<'_>,
    ) -> Result<Option<OwnedFd>> {
        let body = VhostUserTransferDeviceState::new(direction, phase);
        let mut reply = self.request(
            FrontendReq::SET_DEVICE_STATE_FD,
            body.as_bytes(),
            &[],
            &[fd],
        )?;
        let v = parse::<VhostUserU64>(&reply.body, "SET_DEVICE_STATE_FD reply")?.value;
        if v & 0xff != 0 {
            return Err(Error::PeerStatus {
                request: "SET_DEVICE_STATE_FD",
                status: v,
            });
        }
        let no_fd = v & (1 << 8) != 0;
        match (no_fd, reply.fds.len()) {
            (true, 0) => Ok(None),
            (false, 1) => Ok(reply.fds.pop()),
            (_, got) => Err(Error::IncorrectFds {
                request: "SET_DEVICE_STATE_FD reply",
                got,
                want: "one unless the no-fd bit is set",
            }),
        }
    }

    /// `CHECK_DEVICE_STATE` (`DEVICE_STATE`).
    pub fn check_device_state(&mut self) -> Result<()> {
        self.status_request(FrontendReq::CHECK_DEVICE_STATE, &[], &[])
            .map(drop)
    }

    /// `GET_SHMEM_CONFIG` (`SHMEM`).
    pub fn get_shmem_config(&mut self) -> Result<VhostUserShmemConfig> {
        let reply = self.request(FrontendReq::GET_SHMEM_CONFIG, &[], &[], &[])?;
        Ok(parse::<VhostUserShmemConfig>(
            &reply.body,
            "GET_SHMEM_CONFIG reply",
        )?)
    }

    fn state_request(&mut self, req: FrontendReq, index: u32, num: u32) -> Result<()> {
        let body = VhostUserVringState::new(index, num);
        body.validate()?;
        self.ack_request(req, body.as_bytes(), &[], &[])
    }

    fn vring_fd_request(
        &mut self,
        req: FrontendReq,
        index: u8,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<()> {
        let body = VhostUserU64::new(vring_fd_u64(index, fd.is_some()));
        let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
        self.ack_request(req, body.as_bytes(), &[], &fds)
    }

    /// A request whose reply is a plain u64 value.
    fn u64_request(
        &mut self,
        req: FrontendReq,
        body: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<u64> {
        let reply = self.request(req, body, &[], fds)?;
        Ok(parse::<VhostUserU64>(&reply.body, req.name())?.value)
    }

    /// A request whose u64 reply is a status (0 = success), with optional fds.
    fn status_request(
        &mut self,
        req: FrontendReq,
        body: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(u64, Vec<OwnedFd>)> {
        let reply = self.request(req, body, &[], fds)?;
        let v = parse::<VhostUserU64>(&reply.body, req.name())?.value;
        if v != 0 {
            return Err(Error::PeerStatus {
                request: req.name(),
                status: v,
            });
        }
        Ok((v, reply.fds))
    }

    /// A request without a reply of its own (an ack when `REPLY_ACK` is negotiated).
    fn ack_request(
        &mut self,
        req: FrontendReq,
        body: &[u8],
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<()> {
        self.request(req, body, payload, fds).map(drop)
    }

    fn check_allowed(&self, req: FrontendReq) -> Result<()> {
        let rules = req.rules();
        if let Some(feature) = rules.feature {
            if !self.protocol_features.contains(feature) {
                return Err(Error::FeatureMismatch {
                    request: req.name(),
                    feature: feature - self.protocol_features,
                });
            }
        }
        if rules.needs_protocol_features
            && self.offered_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0
        {
            return Err(Error::InvalidOperation(format!(
                "{}: the back-end did not offer VHOST_USER_F_PROTOCOL_FEATURES (call get_features first)",
                req.name()
            )));
        }
        Ok(())
    }

    /// Sends `req` and receives what the spec says comes back.
    fn request(
        &mut self,
        req: FrontendReq,
        body: &[u8],
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<ReplyMsg> {
        self.check_allowed(req)?;
        let rules = req.rules();
        let len = body.len() + payload.len();
        rules.body.check(req.name(), len)?;
        let need_reply = matches!(rules.reply, Reply::AckOnly)
            && self
                .protocol_features
                .contains(VhostUserProtocolFeatures::REPLY_ACK);
        let header = Header::request(req.code(), len as u32, need_reply);
        self.conn.send(&header, body, payload, fds)?;
        let (reply_body, reply_fds) = match rules.reply {
            Reply::AckOnly if !need_reply => {
                return Ok(ReplyMsg {
                    body: Vec::new(),
                    fds: Vec::new(),
                })
            }
            Reply::AckOnly => (
                outboard_protocol::vhost_user::BodySize::Exact(8),
                FdCount::None,
            ),
            Reply::Always { body, fds } => (body, fds),
        };
        let reply = self.conn.recv_reply(reply_body.nominal())?;
        let (reply_header, buf, fds) = (reply.header, reply.body, reply.fds);
        check_reply_header(&reply_header, req.code())?;
        // GET_CONFIG's failure reply is the bare head (size 0); get_config reports it.
        let failed_config =
            req == FrontendReq::GET_CONFIG && buf.len() == std::mem::size_of::<VhostUserConfig>();
        // rust-vmm back-ends echo the VhostUserLog body as SET_LOG_BASE's reply instead
        // of the u64 status libvhost-user sends; accept both.
        let log_echo =
            req == FrontendReq::SET_LOG_BASE && buf.len() == std::mem::size_of::<VhostUserLog>();
        if !failed_config && !log_echo {
            reply_body.check(req.name(), buf.len())?;
        }
        if !reply_fds.check(fds.len(), 0) {
            return Err(Error::IncorrectFds {
                request: req.name(),
                got: fds.len(),
                want: "what the reply allows",
            });
        }
        if need_reply {
            let status = parse::<VhostUserU64>(&buf, "REPLY_ACK status")?.value;
            if status != 0 {
                return Err(Error::PeerStatus {
                    request: req.name(),
                    status,
                });
            }
        }
        Ok(ReplyMsg { body: buf, fds })
    }
}

impl AsFd for Frontend {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.conn.as_fd()
    }
}
