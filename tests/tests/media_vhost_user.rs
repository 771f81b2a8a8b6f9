//! The software camera over vhost-user: our transport's `Frontend` plays QEMU (memory
//! table from memfds, rings, kick eventfds, the back-end channel answering
//! `SHMEM_MAP`/`SHMEM_UNMAP` by keeping the fds; `outboard_tests::media::vhost`), a
//! simulated driver runs the MMAP capture flow on the rings, and a frame is read through
//! the fd the back-end mapped.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::net::UnixListener;
use std::sync::Arc;

use outboard_devices::media::camera::{decode_frame_number, DEVICE_CAPS};
use outboard_devices::media::v4l2::*;
use outboard_protocol::media::{CloseCmd, CmdHeader, MediaCmd, OpenResp, SgEntry};
use outboard_protocol::v4l2::V4l2Ioctl;
use outboard_tests::media::vhost::VhostMediaDriver;
use outboard_tests::temp_dir;
use outboard_vmm_glue::vhost_user::media::serve_camera;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;
use zerocopy::{FromBytes, IntoBytes};

const USERPTR_AREA: u64 = 0x40_0000;

#[test]
fn camera_capture_over_vhost_user() {
    let dir = temp_dir("media-vhost-user");
    let sock = dir.join("media.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let stop = Arc::new(EventFd::new(0).unwrap());
    let worker_stop = stop.clone();
    let worker = std::thread::spawn(move || {
        serve_camera(listener, 64 << 20, &worker_stop, "media-test").unwrap()
    });

    let mut driver = VhostMediaDriver::connect(&sock);
    assert_eq!(driver.shm_size, 64 << 20);
    assert_eq!(&driver.config[..4], &DEVICE_CAPS.to_le_bytes());
    let mem = driver.mem.clone();
    let maps = driver.maps.clone();
    let unmaps = driver.unmaps.clone();

    // The MMAP capture flow: buffers mapped through SHMEM_MAP, frames read where the
    // guest would (through the fd mapped at that offset) and checked byte for byte.
    let capture = driver.start_mmap_capture(PIX_FMT_RGB24, 320, 240);
    let pix = capture.pix;
    assert_eq!((pix.width, pix.sizeimage), (320, 320 * 240 * 3));
    assert!(driver.settle(2, 0));
    for addr in &capture.shm {
        // The mapping covers the buffer's page-rounded memory (QUERYBUF's length is the
        // size asked for, not page-sized here).
        assert_eq!(
            maps.lock().unwrap()[addr].2,
            u64::from(pix.sizeimage).next_multiple_of(4096)
        );
    }
    assert_eq!(driver.check_frames(&capture, 3).len(), 3);
    driver.stop_mmap_capture(capture);
    assert!(driver.settle(0, 2), "{:?}", unmaps.lock().unwrap());

    let r = driver.command(CmdHeader::new(MediaCmd::Open).as_bytes(), 64);
    let s = OpenResp::read_from_bytes(&r).unwrap().session_id;
    let _: V4l2Format = driver.ioctl(
        s,
        V4l2Ioctl::VIDIOC_S_FMT,
        &V4l2Format::from_pix(BUF_TYPE_VIDEO_CAPTURE, &pix),
    );

    // USERPTR through the front-end's memory table: pages in reverse order, the frame is
    // written into guest memory.
    let rb = V4l2Requestbuffers {
        count: 1,
        type_: BUF_TYPE_VIDEO_CAPTURE,
        memory: MEMORY_USERPTR,
        ..Default::default()
    };
    let rb: V4l2Requestbuffers = driver.ioctl(s, V4l2Ioctl::VIDIOC_REQBUFS, &rb);
    assert_eq!(rb.count, 1);
    let len = pix.sizeimage;
    let pages = u64::from(len).div_ceil(4096);
    let sgs: Vec<SgEntry> = (0..pages)
        .map(|k| SgEntry {
            start: USERPTR_AREA + (pages - 1 - k) * 4096,
            len: (u64::from(len) - k * 4096).min(4096) as u32,
            reserved: 0,
        })
        .collect();
    let b = V4l2Buffer {
        index: 0,
        type_: BUF_TYPE_VIDEO_CAPTURE,
        memory: MEMORY_USERPTR,
        length: len,
        ..Default::default()
    };
    let mut arg = b.as_bytes().to_vec();
    for sg in &sgs {
        arg.extend_from_slice(sg.as_bytes());
    }
    let (status, _) = driver.ioctl_raw(s, V4l2Ioctl::VIDIOC_QBUF, &arg);
    assert_eq!(status, 0);
    let _: () = driver.ioctl(s, V4l2Ioctl::VIDIOC_STREAMON, &BUF_TYPE_VIDEO_CAPTURE);
    let b = driver.next_dqbuf();
    assert_eq!((b.memory, b.flags & BUF_FLAG_ERROR), (MEMORY_USERPTR, 0));
    let mut data = Vec::new();
    for sg in &sgs {
        let mut chunk = vec![0u8; sg.len as usize];
        mem.read_slice(&mut chunk, GuestAddress(sg.start)).unwrap();
        data.extend_from_slice(&chunk);
    }
    assert_eq!(
        decode_frame_number(PIX_FMT_RGB24, 320, 240, &data),
        Some(b.sequence)
    );
    let _: () = driver.ioctl(s, V4l2Ioctl::VIDIOC_STREAMOFF, &BUF_TYPE_VIDEO_CAPTURE);

    let mut req = CmdHeader::new(MediaCmd::Close).as_bytes().to_vec();
    req.extend_from_slice(
        CloseCmd {
            session_id: s,
            reserved: 0,
        }
        .as_bytes(),
    );
    assert!(driver.command(&req, 16).is_empty());

    driver.disconnect();
    stop.write(1).unwrap();
    worker.join().unwrap();
    drop(driver);
}
