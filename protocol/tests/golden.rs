//! Golden byte vectors: real messages as the peers put them on the wire, written out by
//! hand from the specs (little-endian), parsed with this crate and re-serialised.

use outboard_protocol::media::*;
use outboard_protocol::vhost_user::*;
use outboard_protocol::vsock::*;
use outboard_protocol::{parse, read_prefix, ProtocolError, Validate};
use zerocopy::IntoBytes;

fn le32(v: u32) -> [u8; 4] {
    v.to_le_bytes()
}
fn le64(v: u64) -> [u8; 8] {
    v.to_le_bytes()
}

#[test]
fn qemu_get_features_request_and_reply() {
    // QEMU's first message on a vhost-user-vsock socket after SET_OWNER.
    let request = [1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
    let hdr: Header = parse(&request, "header").unwrap();
    assert_eq!(
        FrontendReq::from_code(hdr.request),
        Ok(FrontendReq::GET_FEATURES)
    );
    assert!(!hdr.is_reply() && !hdr.need_reply());
    assert_eq!(hdr.size, 0);
    assert_eq!(Header::request(1, 0, false).as_bytes(), &request);

    // Reply: VERSION_1 (32) | PROTOCOL_FEATURES (30) | EVENT_IDX (29).
    let features: u64 = (1 << 32) | (1 << 30) | (1 << 29);
    let mut reply = Vec::new();
    reply.extend_from_slice(&le32(1));
    reply.extend_from_slice(&le32(0x5)); // version 1 | REPLY
    reply.extend_from_slice(&le32(8));
    reply.extend_from_slice(&le64(features));
    let (hdr, body): (Header, _) = read_prefix(&reply, "header").unwrap();
    hdr.validate().unwrap();
    assert!(hdr.is_reply());
    let value: VhostUserU64 = parse(body, "u64").unwrap();
    assert_eq!(value.value, features);
    let mut ours = Header::reply(1, 8).as_bytes().to_vec();
    ours.extend_from_slice(VhostUserU64::new(features).as_bytes());
    assert_eq!(ours, reply);
}

#[test]
fn set_vring_addr_with_need_reply() {
    let mut msg = Vec::new();
    msg.extend_from_slice(&le32(9));
    msg.extend_from_slice(&le32(0x9)); // version 1 | NEED_REPLY
    msg.extend_from_slice(&le32(40));
    msg.extend_from_slice(&le32(1)); // index
    msg.extend_from_slice(&le32(0)); // flags
    msg.extend_from_slice(&le64(0x7f00_1234_0000)); // desc
    msg.extend_from_slice(&le64(0x7f00_1234_2000)); // used
    msg.extend_from_slice(&le64(0x7f00_1234_1000)); // avail
    msg.extend_from_slice(&le64(0)); // log
    let (hdr, body): (Header, _) = read_prefix(&msg, "header").unwrap();
    hdr.validate().unwrap();
    assert!(hdr.need_reply());
    let req = FrontendReq::from_code(hdr.request).unwrap();
    req.rules().body.check("body", body.len()).unwrap();
    let addr: VhostUserVringAddr = parse(body, "vring addr").unwrap();
    assert_eq!(addr.index, 1);
    assert_eq!(addr.descriptor, 0x7f00_1234_0000);
    assert_eq!(addr.used, 0x7f00_1234_2000);
    assert_eq!(addr.available, 0x7f00_1234_1000);
    assert_eq!(addr.as_bytes(), body);
}

#[test]
fn set_mem_table_two_regions() {
    let mut body = Vec::new();
    body.extend_from_slice(&le32(2));
    body.extend_from_slice(&le32(0));
    for (gpa, size, uaddr, off) in [
        (0u64, 0xa_0000u64, 0x7f12_0000_0000u64, 0u64),
        (0x10_0000, 0x3ff0_0000, 0x7f12_0010_0000, 0x10_0000),
    ] {
        for v in [gpa, size, uaddr, off] {
            body.extend_from_slice(&le64(v));
        }
    }
    let (head, regions) = parse_mem_table(&body).unwrap();
    assert_eq!(head.num_regions, 2);
    let regions: Vec<_> = mem_table_regions(regions).map(Result::unwrap).collect();
    assert_eq!(regions[1].guest_phys_addr, 0x10_0000);
    assert_eq!(regions[1].mmap_offset, 0x10_0000);
    // A table that claims 3 regions but carries 2 is refused.
    let mut bad = body.clone();
    bad[0] = 3;
    assert!(matches!(
        parse_mem_table(&bad),
        Err(ProtocolError::Size { .. })
    ));
    // Trailing garbage is refused.
    let mut bad = body.clone();
    bad.extend_from_slice(&[0; 8]);
    assert!(parse_mem_table(&bad).is_err());
}

#[test]
fn get_config_for_vsock_cid() {
    // QEMU reads the 8-byte vsock config space.
    let mut body = Vec::new();
    body.extend_from_slice(&le32(0));
    body.extend_from_slice(&le32(8));
    body.extend_from_slice(&le32(0));
    body.extend_from_slice(&le64(3));
    let (head, payload) = parse_config(&body).unwrap();
    assert_eq!((head.offset, head.size, head.flags), (0, 8, 0));
    let cfg: VsockConfig = parse(payload, "vsock config").unwrap();
    assert_eq!(cfg.guest_cid, 3);
    // Beyond 256 bytes of config space.
    let mut bad = body.clone();
    bad[0..4].copy_from_slice(&le32(250));
    assert!(parse_config(&bad).is_err());
}

#[test]
fn kick_call_err_u64() {
    assert_eq!(parse_vring_fd_u64(0x101).unwrap(), (1, false));
    assert_eq!(parse_vring_fd_u64(2).unwrap(), (2, true));
    assert!(parse_vring_fd_u64(0x200).is_err());
    assert_eq!(vring_fd_u64(1, false), 0x101);
}

#[test]
fn shmem_map_as_qemu_reads_it() {
    let mut body = Vec::new();
    body.push(0); // shmid
    body.extend_from_slice(&[0; 7]);
    body.extend_from_slice(&le64(0)); // fd_offset
    body.extend_from_slice(&le64(0x20_0000)); // shm_offset
    body.extend_from_slice(&le64(0x7_1000)); // len
    body.extend_from_slice(&le64(1)); // RW
    let map: VhostUserMMap = parse(&body, "mmap").unwrap();
    assert_eq!(map.shm_offset, 0x20_0000);
    assert_eq!(map.len, 0x7_1000);
    assert_eq!(
        VhostUserMMapFlags::from_bits(map.flags),
        Some(VhostUserMMapFlags::RW)
    );
    assert_eq!(
        VhostUserMMap::new(0, 0, 0x20_0000, 0x7_1000, VhostUserMMapFlags::RW).as_bytes(),
        &body[..]
    );
    let mut bad = body.clone();
    bad[32] = 2;
    assert!(parse::<VhostUserMMap>(&bad, "mmap").is_err());
}

#[test]
fn linux_guest_vsock_connect_request() {
    // What the Linux driver puts on the tx queue for connect(cid 2, port 1234) from
    // guest cid 3, local port 49152: op REQUEST, type STREAM, buf_alloc 256 KiB.
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&le64(3));
    bytes.extend_from_slice(&le64(2));
    bytes.extend_from_slice(&le32(49152));
    bytes.extend_from_slice(&le32(1234));
    bytes.extend_from_slice(&le32(0));
    bytes.extend_from_slice(&1u16.to_le_bytes());
    bytes.extend_from_slice(&1u16.to_le_bytes());
    bytes.extend_from_slice(&le32(0));
    bytes.extend_from_slice(&le32(256 * 1024));
    bytes.extend_from_slice(&le32(0));
    assert_eq!(bytes.len(), 44);
    let hdr: VsockHeader = parse(&bytes, "vsock header").unwrap();
    assert_eq!(hdr.op(), Ok(VsockOp::Request));
    assert_eq!(hdr.socket_type(), Ok(VsockType::Stream));
    assert_eq!({ hdr.src_cid }, 3);
    assert_eq!({ hdr.dst_port }, 1234);
    assert_eq!({ hdr.buf_alloc }, 256 * 1024);
    assert_eq!(hdr.as_bytes(), &bytes[..]);

    // The same header with a payload length is refused: only RW carries data.
    let mut bad = hdr;
    bad.len = 16;
    assert!(bad.validate().is_err());
    // SEQPACKET RW with EOM|EOR is fine, with an unknown bit it is not.
    let mut rw = hdr;
    rw.op = VsockOp::Rw as u16;
    rw.type_ = VsockType::Seqpacket as u16;
    rw.len = 100;
    rw.flags = (SeqpacketFlags::EOM | SeqpacketFlags::EOR).bits();
    rw.validate().unwrap();
    rw.flags = 4;
    assert!(rw.validate().is_err());
    // 64 KiB + 1 is beyond what a packet may carry.
    rw.flags = 0;
    rw.len = MAX_PKT_BUF_SIZE + 1;
    assert!(rw.validate().is_err());
}

#[test]
fn media_ioctl_g_fmt_command() {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&le32(CMD_IOCTL));
    bytes.extend_from_slice(&le32(0));
    bytes.extend_from_slice(&le32(7)); // session
    bytes.extend_from_slice(&le32(4)); // VIDIOC_G_FMT
    let (hdr, rest): (CmdHeader, _) = read_prefix(&bytes, "cmd").unwrap();
    hdr.validate().unwrap();
    assert_eq!(MediaCmd::from_raw(hdr.cmd), Ok(MediaCmd::Ioctl));
    let cmd: IoctlCmd = parse(rest, "ioctl").unwrap();
    assert_eq!(cmd.session_id, 7);
    assert_eq!(cmd.ioctl().unwrap().name(), "VIDIOC_G_FMT");
    let mut bad = cmd;
    bad.code = 0xc0d0_5604; // the full Linux code is not what virtio-media carries
    assert!(bad.validate().is_err());
    assert_eq!(
        ErrorEvent::new(7, 22).as_bytes(),
        &[0, 0, 0, 0, 7, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0]
    );
    let cfg = MediaConfig::new(0x0420_0001, 0, "outboard camera");
    cfg.validate().unwrap();
    assert_eq!(&cfg.card[..15], b"outboard camera");
}

#[test]
fn hostile_headers() {
    // Version 0, version 2, reserved bits, oversized body: each refused with its value.
    for (flags, size) in [(0u32, 0u32), (2, 0), (1 | 0x10, 0), (1, 4097)] {
        let hdr = Header {
            request: 1,
            flags,
            size,
        };
        assert!(hdr.validate().is_err(), "{flags:#x} {size}");
    }
    let err = Header {
        request: 1,
        flags: 2,
        size: 0,
    }
    .validate()
    .unwrap_err();
    assert_eq!(err, ProtocolError::Version(2));
    assert_eq!(err.to_string(), "unsupported protocol version 2");
}

#[test]
fn body_validation_rejects_bad_values() {
    assert!(VhostUserMemory::new(0).validate().is_err());
    assert!(VhostUserMemory::new(9).validate().is_err());
    assert!(VhostUserMemoryRegion::new(u64::MAX, 2, 0, 0)
        .validate()
        .is_err());
    assert!(VhostUserMemoryRegion::new(0, 0, 0, 0).validate().is_err());
    let mut addr = VhostUserVringAddr {
        descriptor: 0x1008,
        ..Default::default()
    };
    assert!(matches!(
        addr.validate(),
        Err(ProtocolError::Unaligned { align: 16, .. })
    ));
    addr.descriptor = 0x1000;
    addr.flags = 2;
    assert!(addr.validate().is_err());
    assert!(VhostUserVringState::new(256, 0).validate().is_err());
    assert!(VhostUserConfig::new(0, 0, VhostUserConfigFlags::Frontend)
        .validate()
        .is_err());
    assert!(VhostUserConfig {
        offset: 0,
        size: 8,
        flags: 2
    }
    .validate()
    .is_err());
    assert!(VhostUserConfig {
        offset: u32::MAX,
        size: 8,
        flags: 0
    }
    .validate()
    .is_err());
    assert!(VhostUserInflight::default().validate().is_err());
    assert!(VhostUserLog::default().validate().is_err());
    assert!(VhostUserIotlb {
        msg_type: 9,
        ..Default::default()
    }
    .validate()
    .is_err());
    assert!(VhostUserIotlb {
        msg_type: 2,
        perm: 4,
        size: 1,
        ..Default::default()
    }
    .validate()
    .is_err());
    VhostUserIotlb {
        msg_type: 2,
        perm: 3,
        size: 1,
        ..Default::default()
    }
    .validate()
    .unwrap();
    assert!(VhostUserShared::default().validate().is_err());
    assert!(VhostUserShared { uuid: [0xff; 16] }.validate().is_err());
    assert!(VhostUserTransferDeviceState {
        direction: 2,
        phase: 0
    }
    .validate()
    .is_err());
    assert!(VhostUserTransferDeviceState {
        direction: 0,
        phase: 1
    }
    .validate()
    .is_err());
    let mut shmem = VhostUserShmemConfig::new(&[0x10_0000]);
    shmem.validate().unwrap();
    assert_eq!(shmem.num_regions, 1);
    shmem.num_regions = 2;
    assert!(shmem.validate().is_err());
    assert!(
        VhostUserMMap::new(0, u64::MAX, 0, 2, VhostUserMMapFlags::empty())
            .validate()
            .is_err()
    );
    assert!(VhostUserMMap::new(0, 0, 0, 0, VhostUserMMapFlags::empty())
        .validate()
        .is_err());
    assert!(VsockConfig { guest_cid: 2 }.validate().is_err());
    assert!(VsockConfig { guest_cid: 1 << 32 }.validate().is_err());
    VsockConfig { guest_cid: 3 }.validate().unwrap();
    assert!(VsockEvent { id: 1 }.validate().is_err());
    VsockEvent::TRANSPORT_RESET.validate().unwrap();
    assert!(SgEntry {
        start: u64::MAX,
        len: 2,
        reserved: 0
    }
    .validate()
    .is_err());
    assert!(MmapCmd {
        session_id: 0,
        flags: 2,
        offset: 0
    }
    .validate()
    .is_err());
    assert!(RespHeader::err(5000).validate().is_err());
}
