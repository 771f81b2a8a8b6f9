//! Sizes and field offsets of every wire structure, against the specifications
//! (vhost-user.rst, virtio 1.3 section 5.10, virtio 1.4 virtio-media).

use core::mem::{align_of, offset_of, size_of};

use outboard_protocol::media::*;
use outboard_protocol::vhost_user::*;
use outboard_protocol::vsock::*;

#[test]
fn vhost_user_header() {
    assert_eq!(size_of::<Header>(), Header::SIZE);
    assert_eq!(size_of::<Header>(), 12);
    assert_eq!(offset_of!(Header, request), 0);
    assert_eq!(offset_of!(Header, flags), 4);
    assert_eq!(offset_of!(Header, size), 8);
}

#[test]
fn vhost_user_bodies() {
    assert_eq!(size_of::<VhostUserU64>(), 8);
    assert_eq!(size_of::<VhostUserEmpty>(), 0);

    assert_eq!(size_of::<VhostUserMemory>(), 8);
    assert_eq!(offset_of!(VhostUserMemory, num_regions), 0);
    assert_eq!(offset_of!(VhostUserMemory, padding), 4);

    assert_eq!(size_of::<VhostUserMemoryRegion>(), 32);
    assert_eq!(offset_of!(VhostUserMemoryRegion, guest_phys_addr), 0);
    assert_eq!(offset_of!(VhostUserMemoryRegion, memory_size), 8);
    assert_eq!(offset_of!(VhostUserMemoryRegion, user_addr), 16);
    assert_eq!(offset_of!(VhostUserMemoryRegion, mmap_offset), 24);

    assert_eq!(size_of::<VhostUserSingleMemoryRegion>(), 40);
    assert_eq!(offset_of!(VhostUserSingleMemoryRegion, padding), 0);
    assert_eq!(offset_of!(VhostUserSingleMemoryRegion, region), 8);

    assert_eq!(size_of::<VhostUserVringState>(), 8);
    assert_eq!(offset_of!(VhostUserVringState, index), 0);
    assert_eq!(offset_of!(VhostUserVringState, num), 4);

    assert_eq!(size_of::<VhostUserVringAddr>(), 40);
    assert_eq!(offset_of!(VhostUserVringAddr, index), 0);
    assert_eq!(offset_of!(VhostUserVringAddr, flags), 4);
    assert_eq!(offset_of!(VhostUserVringAddr, descriptor), 8);
    assert_eq!(offset_of!(VhostUserVringAddr, used), 16);
    assert_eq!(offset_of!(VhostUserVringAddr, available), 24);
    assert_eq!(offset_of!(VhostUserVringAddr, log), 32);

    assert_eq!(size_of::<VhostUserConfig>(), 12);
    assert_eq!(offset_of!(VhostUserConfig, offset), 0);
    assert_eq!(offset_of!(VhostUserConfig, size), 4);
    assert_eq!(offset_of!(VhostUserConfig, flags), 8);

    assert_eq!(size_of::<VhostUserInflight>(), 24);
    assert_eq!(offset_of!(VhostUserInflight, mmap_size), 0);
    assert_eq!(offset_of!(VhostUserInflight, mmap_offset), 8);
    assert_eq!(offset_of!(VhostUserInflight, num_queues), 16);
    assert_eq!(offset_of!(VhostUserInflight, queue_size), 18);

    assert_eq!(size_of::<VhostUserLog>(), 16);
    assert_eq!(offset_of!(VhostUserLog, mmap_size), 0);
    assert_eq!(offset_of!(VhostUserLog, mmap_offset), 8);

    assert_eq!(size_of::<VhostUserIotlb>(), 32);
    assert_eq!(offset_of!(VhostUserIotlb, iova), 0);
    assert_eq!(offset_of!(VhostUserIotlb, size), 8);
    assert_eq!(offset_of!(VhostUserIotlb, user_addr), 16);
    assert_eq!(offset_of!(VhostUserIotlb, perm), 24);
    assert_eq!(offset_of!(VhostUserIotlb, msg_type), 25);

    assert_eq!(size_of::<VhostUserVringArea>(), 24);
    assert_eq!(offset_of!(VhostUserVringArea, u64_), 0);
    assert_eq!(offset_of!(VhostUserVringArea, size), 8);
    assert_eq!(offset_of!(VhostUserVringArea, offset), 16);

    assert_eq!(size_of::<VhostUserShared>(), 16);

    assert_eq!(size_of::<VhostUserTransferDeviceState>(), 8);
    assert_eq!(offset_of!(VhostUserTransferDeviceState, direction), 0);
    assert_eq!(offset_of!(VhostUserTransferDeviceState, phase), 4);

    assert_eq!(size_of::<VhostUserShmemConfig>(), 8 + 256 * 8);
    assert_eq!(offset_of!(VhostUserShmemConfig, num_regions), 0);
    assert_eq!(offset_of!(VhostUserShmemConfig, padding), 4);
    assert_eq!(offset_of!(VhostUserShmemConfig, mem_size), 8);

    assert_eq!(size_of::<VhostUserMMap>(), 40);
    assert_eq!(offset_of!(VhostUserMMap, shmid), 0);
    assert_eq!(offset_of!(VhostUserMMap, fd_offset), 8);
    assert_eq!(offset_of!(VhostUserMMap, shm_offset), 16);
    assert_eq!(offset_of!(VhostUserMMap, len), 24);
    assert_eq!(offset_of!(VhostUserMMap, flags), 32);

    assert_eq!(size_of::<VhostUserGpuMapMsg>(), 64);
    assert_eq!(offset_of!(VhostUserGpuMapMsg, shm_offset), 8);
    assert_eq!(offset_of!(VhostUserGpuMapMsg, len), 16);
    assert_eq!(offset_of!(VhostUserGpuMapMsg, memory_idx), 24);
    assert_eq!(offset_of!(VhostUserGpuMapMsg, handle_type), 28);
    assert_eq!(offset_of!(VhostUserGpuMapMsg, device_uuid), 32);
    assert_eq!(offset_of!(VhostUserGpuMapMsg, driver_uuid), 48);

    assert_eq!(size_of::<VhostUserExternalMapMsg>(), 32);
    assert_eq!(offset_of!(VhostUserExternalMapMsg, shm_offset), 8);
    assert_eq!(offset_of!(VhostUserExternalMapMsg, len), 16);
    assert_eq!(offset_of!(VhostUserExternalMapMsg, ptr), 24);
}

#[test]
fn vhost_user_bounds_fit_the_largest_bodies() {
    // Every fixed body and every variable body at its largest fits MAX_MSG_SIZE.
    for req in FrontendReq::ALL {
        let rules = req.rules();
        assert!(rules.body.nominal() <= MAX_MSG_SIZE, "{req}");
        if let Reply::Always { body, .. } = rules.reply {
            assert!(body.nominal() <= MAX_MSG_SIZE, "{req} reply");
        }
    }
    assert_eq!(BodySize::MemTable.nominal(), 8 + 8 * 32);
    assert_eq!(BodySize::Config.nominal(), 12 + 256);
}

#[test]
fn vsock_layout() {
    assert_eq!(size_of::<VsockHeader>(), 44);
    assert_eq!(size_of::<VsockHeader>(), VsockHeader::SIZE);
    assert_eq!(offset_of!(VsockHeader, src_cid), 0);
    assert_eq!(offset_of!(VsockHeader, dst_cid), 8);
    assert_eq!(offset_of!(VsockHeader, src_port), 16);
    assert_eq!(offset_of!(VsockHeader, dst_port), 20);
    assert_eq!(offset_of!(VsockHeader, len), 24);
    assert_eq!(offset_of!(VsockHeader, type_), 28);
    assert_eq!(offset_of!(VsockHeader, op), 30);
    assert_eq!(offset_of!(VsockHeader, flags), 32);
    assert_eq!(offset_of!(VsockHeader, buf_alloc), 36);
    assert_eq!(offset_of!(VsockHeader, fwd_cnt), 40);
    assert_eq!(size_of::<VsockConfig>(), 8);
    assert_eq!(size_of::<VsockEvent>(), 4);
}

#[test]
fn media_layout() {
    assert_eq!(size_of::<MediaConfig>(), 40);
    assert_eq!(offset_of!(MediaConfig, device_caps), 0);
    assert_eq!(offset_of!(MediaConfig, device_type), 4);
    assert_eq!(offset_of!(MediaConfig, card), 8);
    assert_eq!(size_of::<CmdHeader>(), 8);
    assert_eq!(size_of::<RespHeader>(), 8);
    assert_eq!(size_of::<OpenResp>(), 16);
    assert_eq!(offset_of!(OpenResp, session_id), 8);
    assert_eq!(size_of::<CloseCmd>(), 8);
    assert_eq!(size_of::<IoctlCmd>(), 8);
    assert_eq!(offset_of!(IoctlCmd, code), 4);
    assert_eq!(size_of::<MmapCmd>(), 12);
    assert_eq!(offset_of!(MmapCmd, flags), 4);
    assert_eq!(offset_of!(MmapCmd, offset), 8);
    assert_eq!(size_of::<MmapResp>(), 24);
    assert_eq!(offset_of!(MmapResp, driver_addr), 8);
    assert_eq!(offset_of!(MmapResp, len), 16);
    assert_eq!(size_of::<MunmapCmd>(), 8);
    assert_eq!(size_of::<SgEntry>(), 16);
    assert_eq!(offset_of!(SgEntry, len), 8);
    assert_eq!(size_of::<VirtioObjectId>(), 16);
    assert_eq!(align_of::<VirtioObjectId>(), 1);
    assert_eq!(size_of::<EventHeader>(), 8);
    assert_eq!(offset_of!(EventHeader, session_id), 4);
    assert_eq!(size_of::<ErrorEvent>(), 16);
    assert_eq!(offset_of!(ErrorEvent, errno), 8);
    assert_eq!(size_of::<DqbufEvent>(), 8 + 88 + 8 * 64);
    assert_eq!(offset_of!(DqbufEvent, buffer), 8);
    assert_eq!(offset_of!(DqbufEvent, planes), 96);
    assert_eq!(size_of::<SessionEvent>(), 8 + 136);
}
