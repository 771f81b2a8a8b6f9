//! Request numbers and feature bits, checked against tables transcribed from the
//! specification texts (QEMU docs/interop/vhost-user.rst "Front-end message types",
//! "Back-end message types" and "Protocol features"; linux/virtio_vsock.h; VIRTIO 1.4
//! virtio-media; linux/videodev2.h).

use outboard_protocol::media::{self, MediaCmd};
use outboard_protocol::v4l2::{ioc, V4l2Ioctl, V4L2_IOCTL_TYPE};
use outboard_protocol::vhost_user::*;
use outboard_protocol::vsock::*;

/// `VHOST_USER_*` front-end message types, in the spec's order.
const SPEC_FRONTEND: &[(&str, u32)] = &[
    ("GET_FEATURES", 1),
    ("SET_FEATURES", 2),
    ("SET_OWNER", 3),
    ("RESET_OWNER", 4),
    ("SET_MEM_TABLE", 5),
    ("SET_LOG_BASE", 6),
    ("SET_LOG_FD", 7),
    ("SET_VRING_NUM", 8),
    ("SET_VRING_ADDR", 9),
    ("SET_VRING_BASE", 10),
    ("GET_VRING_BASE", 11),
    ("SET_VRING_KICK", 12),
    ("SET_VRING_CALL", 13),
    ("SET_VRING_ERR", 14),
    ("GET_PROTOCOL_FEATURES", 15),
    ("SET_PROTOCOL_FEATURES", 16),
    ("GET_QUEUE_NUM", 17),
    ("SET_VRING_ENABLE", 18),
    ("SEND_RARP", 19),
    ("NET_SET_MTU", 20),
    ("SET_BACKEND_REQ_FD", 21),
    ("IOTLB_MSG", 22),
    ("SET_VRING_ENDIAN", 23),
    ("GET_CONFIG", 24),
    ("SET_CONFIG", 25),
    ("CREATE_CRYPTO_SESSION", 26),
    ("CLOSE_CRYPTO_SESSION", 27),
    ("POSTCOPY_ADVISE", 28),
    ("POSTCOPY_LISTEN", 29),
    ("POSTCOPY_END", 30),
    ("GET_INFLIGHT_FD", 31),
    ("SET_INFLIGHT_FD", 32),
    ("GPU_SET_SOCKET", 33),
    ("RESET_DEVICE", 34),
    ("VRING_KICK", 35),
    ("GET_MAX_MEM_SLOTS", 36),
    ("ADD_MEM_REG", 37),
    ("REM_MEM_REG", 38),
    ("SET_STATUS", 39),
    ("GET_STATUS", 40),
    ("GET_SHARED_OBJECT", 41),
    ("SET_DEVICE_STATE_FD", 42),
    ("CHECK_DEVICE_STATE", 43),
    ("GET_SHMEM_CONFIG", 44),
];

/// `VHOST_USER_BACKEND_*` back-end message types.
const SPEC_BACKEND: &[(&str, u32)] = &[
    ("IOTLB_MSG", 1),
    ("CONFIG_CHANGE_MSG", 2),
    ("VRING_HOST_NOTIFIER_MSG", 3),
    ("VRING_CALL", 4),
    ("VRING_ERR", 5),
    ("SHARED_OBJECT_ADD", 6),
    ("SHARED_OBJECT_REMOVE", 7),
    ("SHARED_OBJECT_LOOKUP", 8),
    ("SHMEM_MAP", 9),
    ("SHMEM_UNMAP", 10),
];

/// `VHOST_USER_PROTOCOL_F_*`.
const SPEC_PROTOCOL_FEATURES: &[(&str, u32)] = &[
    ("MQ", 0),
    ("LOG_SHMFD", 1),
    ("RARP", 2),
    ("REPLY_ACK", 3),
    ("MTU", 4),
    ("BACKEND_REQ", 5),
    ("CROSS_ENDIAN", 6),
    ("CRYPTO_SESSION", 7),
    ("PAGEFAULT", 8),
    ("CONFIG", 9),
    ("BACKEND_SEND_FD", 10),
    ("HOST_NOTIFIER", 11),
    ("INFLIGHT_SHMFD", 12),
    ("RESET_DEVICE", 13),
    ("INBAND_NOTIFICATIONS", 14),
    ("CONFIGURE_MEM_SLOTS", 15),
    ("STATUS", 16),
    ("XEN_MMAP", 17),
    ("SHARED_OBJECT", 18),
    ("DEVICE_STATE", 19),
    ("GET_VRING_BASE_INFLIGHT", 20),
    ("GPA_ADDRESSES", 21),
    ("SHMEM", 22),
];

#[test]
fn frontend_requests_match_the_spec() {
    assert_eq!(FrontendReq::ALL.len(), SPEC_FRONTEND.len());
    for (req, (name, number)) in FrontendReq::ALL.iter().zip(SPEC_FRONTEND) {
        assert_eq!(req.name(), *name);
        assert_eq!(req.code(), *number, "{name}");
        assert_eq!(FrontendReq::from_code(*number), Ok(*req));
    }
    assert!(FrontendReq::from_code(0).is_err());
    assert!(FrontendReq::from_code(45).is_err());
    assert!(FrontendReq::RESET_OWNER.is_deprecated());
    assert!(!FrontendReq::SET_OWNER.is_deprecated());
}

#[test]
fn backend_requests_match_the_spec() {
    assert_eq!(BackendReq::ALL.len(), SPEC_BACKEND.len());
    for (req, (name, number)) in BackendReq::ALL.iter().zip(SPEC_BACKEND) {
        assert_eq!(req.name(), *name);
        assert_eq!(req.code(), *number, "{name}");
        assert_eq!(BackendReq::from_code(*number), Ok(*req));
    }
    assert!(BackendReq::from_code(0).is_err());
    assert!(BackendReq::from_code(11).is_err());
    assert_eq!(CrosvmBackendReq::GPU_MAP.code(), 1006);
    assert_eq!(CrosvmBackendReq::EXTERNAL_MAP.code(), 1007);
}

#[test]
fn protocol_feature_bits_match_the_spec() {
    let ours: Vec<_> = VhostUserProtocolFeatures::all().iter_names().collect();
    assert_eq!(ours.len(), SPEC_PROTOCOL_FEATURES.len());
    for ((name, flag), (spec_name, bit)) in ours.iter().zip(SPEC_PROTOCOL_FEATURES) {
        assert_eq!(name, spec_name);
        assert_eq!(flag.bits(), 1u64 << bit, "{spec_name}");
    }
    // The one that broke QEMU when a peer library got it wrong.
    assert_eq!(VhostUserProtocolFeatures::GPA_ADDRESSES.bits(), 1 << 21);
    assert_eq!(VhostUserProtocolFeatures::SHMEM.bits(), 1 << 22);
    assert_eq!(VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 1 << 30);
    assert_eq!(VhostUserVirtioFeatures::LOG_ALL.bits(), 1 << 26);
}

#[test]
fn spec_reply_list_is_encoded() {
    // "Most of the requests don't require replies. Here is a list of the ones that do"
    // plus the later additions that always reply.
    let always = [
        FrontendReq::GET_FEATURES,
        FrontendReq::GET_PROTOCOL_FEATURES,
        FrontendReq::GET_VRING_BASE,
        FrontendReq::SET_LOG_BASE,
        FrontendReq::GET_INFLIGHT_FD,
        FrontendReq::GET_QUEUE_NUM,
        FrontendReq::GET_CONFIG,
        FrontendReq::GET_MAX_MEM_SLOTS,
        FrontendReq::GET_STATUS,
        FrontendReq::GET_SHARED_OBJECT,
        FrontendReq::SET_DEVICE_STATE_FD,
        FrontendReq::CHECK_DEVICE_STATE,
        FrontendReq::GET_SHMEM_CONFIG,
        FrontendReq::POSTCOPY_ADVISE,
        FrontendReq::POSTCOPY_END,
        FrontendReq::CREATE_CRYPTO_SESSION,
    ];
    for req in FrontendReq::ALL {
        let replies = matches!(req.rules().reply, Reply::Always { .. });
        assert_eq!(replies, always.contains(req), "{req}");
    }
    // Messages that carry fds, per the spec's list.
    for req in [
        FrontendReq::ADD_MEM_REG,
        FrontendReq::SET_LOG_BASE,
        FrontendReq::SET_LOG_FD,
        FrontendReq::SET_BACKEND_REQ_FD,
        FrontendReq::SET_INFLIGHT_FD,
        FrontendReq::SET_DEVICE_STATE_FD,
    ] {
        assert_eq!(req.rules().fds, FdCount::One, "{req}");
    }
    assert_eq!(FrontendReq::SET_MEM_TABLE.rules().fds, FdCount::PerRegion);
    for req in [
        FrontendReq::SET_VRING_KICK,
        FrontendReq::SET_VRING_CALL,
        FrontendReq::SET_VRING_ERR,
    ] {
        assert_eq!(req.rules().fds, FdCount::Optional, "{req}");
    }
}

#[test]
fn vsock_constants_match_linux() {
    for (op, raw) in [
        (VsockOp::Invalid, 0),
        (VsockOp::Request, 1),
        (VsockOp::Response, 2),
        (VsockOp::Rst, 3),
        (VsockOp::Shutdown, 4),
        (VsockOp::Rw, 5),
        (VsockOp::CreditUpdate, 6),
        (VsockOp::CreditRequest, 7),
    ] {
        assert_eq!(op as u16, raw);
        assert_eq!(VsockOp::from_raw(raw), Ok(op));
    }
    assert!(VsockOp::from_raw(8).is_err());
    assert_eq!(VsockType::Stream as u16, 1);
    assert_eq!(VsockType::Seqpacket as u16, 2);
    assert!(VsockType::from_raw(3).is_err());
    assert_eq!(ShutdownFlags::RCV.bits(), 1);
    assert_eq!(ShutdownFlags::SEND.bits(), 2);
    assert_eq!(SeqpacketFlags::EOM.bits(), 1);
    assert_eq!(SeqpacketFlags::EOR.bits(), 2);
    assert_eq!(VIRTIO_VSOCK_F_STREAM, 1);
    assert_eq!(VIRTIO_VSOCK_F_SEQPACKET, 2);
    assert_eq!(VIRTIO_VSOCK_F_NO_IMPLIED_STREAM, 4);
    assert_eq!(VsockEventId::TransportReset as u32, 0);
    assert_eq!(VIRTIO_ID_VSOCK, 19);
    assert_eq!(VMADDR_CID_HOST, 2);
    assert_eq!(VMADDR_CID_ANY, u32::MAX as u64);
}

#[test]
fn media_constants_match_the_spec() {
    assert_eq!(media::VIRTIO_ID_MEDIA, 48);
    for (cmd, raw) in [
        (MediaCmd::Open, 1),
        (MediaCmd::Close, 2),
        (MediaCmd::Ioctl, 3),
        (MediaCmd::Mmap, 4),
        (MediaCmd::Munmap, 5),
    ] {
        assert_eq!(cmd.code(), raw);
        assert_eq!(MediaCmd::from_raw(raw), Ok(cmd));
    }
    assert!(MediaCmd::from_raw(0).is_err());
    assert!(MediaCmd::from_raw(6).is_err());
    assert_eq!(media::EVENT_ERROR, 0);
    assert_eq!(media::EVENT_DQBUF, 1);
    assert_eq!(media::EVENT_EVENT, 2);
}

#[test]
fn v4l2_request_codes_are_consistent() {
    let mut last = None;
    for ioctl in V4l2Ioctl::ALL {
        let code = ioc(
            ioctl.dir(),
            V4L2_IOCTL_TYPE,
            ioctl.nr(),
            ioctl.arg_size() as u16,
        );
        assert_eq!(code, ioctl.request_code(), "{ioctl}");
        assert_eq!(V4l2Ioctl::from_code(code), Ok(*ioctl));
        assert_eq!(V4l2Ioctl::from_code(ioctl.nr().into()), Ok(*ioctl));
        assert!(last < Some(ioctl.nr()));
        last = Some(ioctl.nr());
    }
    assert_eq!(V4l2Ioctl::ALL.len(), 83);
    // Well-known values from videodev2.h.
    assert_eq!(V4l2Ioctl::VIDIOC_QUERYCAP.request_code(), 0x8068_5600);
    assert_eq!(V4l2Ioctl::VIDIOC_G_FMT.request_code(), 0xc0d0_5604);
    assert_eq!(V4l2Ioctl::VIDIOC_QBUF.request_code(), 0xc058_560f);
    assert_eq!(V4l2Ioctl::VIDIOC_STREAMON.request_code(), 0x4004_5612);
    // Gaps and wrong types are refused.
    assert!(V4l2Ioctl::from_code(1).is_err());
    assert!(V4l2Ioctl::from_code(0xc0d0_5504).is_err());
    assert!(V4l2Ioctl::from_code(0xc0d1_5604).is_err());
    assert!(V4l2Ioctl::VIDIOC_DQBUF.is_handled_by_driver());
    assert!(!V4l2Ioctl::VIDIOC_QBUF.is_handled_by_driver());
}
