//! Property test: every parsing and validation entry point, fed arbitrary bytes, returns
//! `Ok` or `Err` and never panics.

use outboard_protocol::media::*;
use outboard_protocol::v4l2::V4l2Ioctl;
use outboard_protocol::vhost_user::*;
use outboard_protocol::vsock::*;
use outboard_protocol::{parse, read_prefix, Validate};
use proptest::prelude::*;

/// Parses `bytes` as a whole vhost-user message the way a receiver does: header, rules
/// of the request, then the body it names.
fn parse_vhost_user_message(bytes: &[u8]) {
    let Ok((hdr, body)) = read_prefix::<Header>(bytes, "header") else {
        return;
    };
    if hdr.validate().is_err() {
        return;
    }
    let body = &body[..body.len().min(hdr.size as usize)];
    if let Ok(req) = FrontendReq::from_code(hdr.request) {
        let rules = req.rules();
        let _ = rules.body.check("body", body.len());
        let _ = rules.fds.check(body.len() % 9, body.len() % 5);
        match req {
            FrontendReq::SET_MEM_TABLE => {
                let _ = parse_mem_table(body);
            }
            FrontendReq::GET_CONFIG | FrontendReq::SET_CONFIG => {
                let _ = parse_config(body);
            }
            FrontendReq::SET_VRING_ADDR => {
                let _ = parse::<VhostUserVringAddr>(body, "addr");
            }
            FrontendReq::SET_VRING_KICK | FrontendReq::SET_VRING_CALL => {
                if let Ok(v) = parse::<VhostUserU64>(body, "u64") {
                    let _ = parse_vring_fd_u64(v.value);
                }
            }
            FrontendReq::ADD_MEM_REG | FrontendReq::REM_MEM_REG => {
                let _ = parse::<VhostUserSingleMemoryRegion>(body, "region");
            }
            FrontendReq::GET_INFLIGHT_FD | FrontendReq::SET_INFLIGHT_FD => {
                let _ = parse::<VhostUserInflight>(body, "inflight");
            }
            FrontendReq::SET_LOG_BASE => {
                let _ = parse::<VhostUserLog>(body, "log");
            }
            FrontendReq::IOTLB_MSG => {
                let _ = parse::<VhostUserIotlb>(body, "iotlb");
            }
            FrontendReq::GET_SHARED_OBJECT => {
                let _ = parse::<VhostUserShared>(body, "shared");
            }
            FrontendReq::SET_DEVICE_STATE_FD => {
                let _ = parse::<VhostUserTransferDeviceState>(body, "state");
            }
            _ => {
                let _ = parse::<VhostUserVringState>(body, "state");
            }
        }
    }
    if let Ok(req) = BackendReq::from_code(hdr.request) {
        let _ = req.rules().body.check("body", body.len());
        let _ = parse::<VhostUserMMap>(body, "mmap");
        let _ = parse::<VhostUserVringArea>(body, "area");
        let _ = parse::<VhostUserShmemConfig>(body, "shmem");
    }
    if let Ok(req) = CrosvmBackendReq::from_code(hdr.request) {
        let _ = req.rules();
        let _ = parse::<VhostUserGpuMapMsg>(body, "gpu map");
        let _ = parse::<VhostUserExternalMapMsg>(body, "external map");
    }
}

fn parse_vsock(bytes: &[u8]) {
    if let Ok((hdr, _)) = read_prefix::<VsockHeader>(bytes, "vsock") {
        let _ = hdr.validate();
        let _ = hdr.op();
        let _ = hdr.socket_type();
    }
    let _ = parse::<VsockConfig>(bytes, "config");
    let _ = parse::<VsockEvent>(bytes, "event");
}

fn parse_media(bytes: &[u8]) {
    let Ok((hdr, rest)) = read_prefix::<CmdHeader>(bytes, "cmd") else {
        return;
    };
    match MediaCmd::from_raw(hdr.cmd) {
        Ok(MediaCmd::Ioctl) => {
            if let Ok((cmd, mut rest)) = read_prefix::<IoctlCmd>(rest, "ioctl") {
                let _ = cmd.validate();
                while let Ok((sg, tail)) = read_prefix::<SgEntry>(rest, "sg") {
                    let _ = sg.validate();
                    rest = tail;
                }
            }
        }
        Ok(MediaCmd::Mmap) => {
            let _ = read_prefix::<MmapCmd>(rest, "mmap").map(|(c, _)| c.validate());
        }
        Ok(MediaCmd::Close) => {
            let _ = read_prefix::<CloseCmd>(rest, "close").map(|(c, _)| c.validate());
        }
        Ok(MediaCmd::Munmap) => {
            let _ = read_prefix::<MunmapCmd>(rest, "munmap").map(|(c, _)| c.validate());
        }
        _ => {}
    }
    let _ = parse::<MediaConfig>(bytes, "config");
    let _ = parse::<RespHeader>(bytes, "resp");
    let _ = parse::<EventHeader>(bytes, "event");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn vhost_user_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        parse_vhost_user_message(&bytes);
    }

    #[test]
    fn vhost_user_with_valid_headers_never_panics(
        request in 0u32..50,
        flags in 0u32..16,
        body in proptest::collection::vec(any::<u8>(), 0..400),
    ) {
        let mut bytes = Header { request, flags, size: body.len() as u32 }.as_bytes_vec();
        bytes.extend_from_slice(&body);
        parse_vhost_user_message(&bytes);
    }

    #[test]
    fn vsock_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        parse_vsock(&bytes);
    }

    #[test]
    fn media_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
        parse_media(&bytes);
    }

    #[test]
    fn v4l2_lookup_never_panics(code in any::<u32>()) {
        if let Ok(ioctl) = V4l2Ioctl::from_code(code) {
            prop_assert!(u32::from(ioctl.nr()) == code || ioctl.request_code() == code);
        }
    }
}

trait AsBytesVec {
    fn as_bytes_vec(&self) -> Vec<u8>;
}

impl AsBytesVec for Header {
    fn as_bytes_vec(&self) -> Vec<u8> {
        zerocopy::IntoBytes::as_bytes(self).to_vec()
    }
}
