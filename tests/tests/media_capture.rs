//! virtio-media driven by a simulated guest driver: the software camera's full capture
//! flow with MMAP buffers (through a host-memory mapper playing the shared memory
//! region) and with USERPTR buffers given as guest SG lists, controls and V4L2 events,
//! and malformed commands, which all get error responses while the runner keeps
//! serving.
//!
//! The queues live in guest memory (`vm-memory`, two memfd-backed regions) and the
//! device sees them through `outboard-vmm-glue`'s rust-vmm adapters, as it would in a VMM.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use outboard_devices::media::camera::{
    decode_frame_number, frame_layout, plane_layout, render_frame, render_planes, Adjust,
    SoftwareCamera, DEVICE_CAPS, DEVICE_CAPS_MPLANE,
};
use outboard_devices::media::v4l2::*;
use outboard_devices::media::{EventBuffer, GuestMemoryRegions};
use std::time::Duration;

use outboard_protocol::media::{
    CmdHeader, MediaCmd, MediaConfig, RespHeader, SgEntry, VirtioObjectId,
};
use outboard_protocol::v4l2::V4l2Ioctl;
use outboard_tests::media::{bytes_of, scattered_sg, Dequeued, TestShm, REGION_END};
use zerocopy::{FromBytes, IntoBytes};

type Camera = SoftwareCamera<EventBuffer, TestShm, GuestMemoryRegions>;
type MediaGuest = outboard_tests::media::MediaGuest<Camera>;

fn camera_guest() -> MediaGuest {
    MediaGuest::new(
        MediaConfig::new(DEVICE_CAPS, 0, "camera"),
        SoftwareCamera::new,
    )
}

/// A guest of the multi-planar camera.
fn mplane_camera_guest() -> MediaGuest {
    MediaGuest::new(
        MediaConfig::new(DEVICE_CAPS_MPLANE, 0, "camera"),
        SoftwareCamera::new_mplane,
    )
}

fn read_sg(g: &MediaGuest, sgs: &[SgEntry]) -> Vec<u8> {
    g.read_sg(sgs)
}

fn fmt_req(fourcc: u32, w: u32, h: u32) -> V4l2Format {
    V4l2Format::from_pix(
        BUF_TYPE_VIDEO_CAPTURE,
        &V4l2PixFormat {
            width: w,
            height: h,
            pixelformat: fourcc,
            ..Default::default()
        },
    )
}

fn expected_frame(pix: &V4l2PixFormat, n: u32) -> Vec<u8> {
    let mut v = vec![0u8; pix.sizeimage as usize];
    render_frame(
        pix.pixelformat,
        pix.width,
        pix.height,
        n,
        &Adjust::default(),
        &mut v,
    )
    .unwrap();
    v
}

/// Checks a run of dequeued frames: increasing sequence numbers, monotonic timestamps,
/// and each frame's content is exactly pattern frame `sequence`.
fn check_frames(frames: &[(V4l2Buffer, Vec<u8>)], pix: &V4l2PixFormat) {
    let mut last: Option<&V4l2Buffer> = None;
    for (b, data) in frames {
        assert_eq!(b.flags & BUF_FLAG_DONE, BUF_FLAG_DONE);
        assert_eq!(b.flags & BUF_FLAG_ERROR, 0);
        assert_ne!(b.flags & BUF_FLAG_TIMESTAMP_MONOTONIC, 0);
        // Stamped at the end of the frame, as the guest driver's re-stamp is.
        assert_eq!(
            b.flags & BUF_FLAG_TSTAMP_SRC_MASK,
            BUF_FLAG_TSTAMP_SRC_EOF,
            "flags {:#x}",
            b.flags
        );
        assert_eq!(b.bytesused, pix.sizeimage);
        assert_eq!(b.field, FIELD_NONE);
        assert!(b.timestamp.tv_sec > 0 || b.timestamp.tv_usec > 0);
        if let Some(p) = last {
            assert!(
                b.sequence > p.sequence,
                "sequence went {} -> {}",
                p.sequence,
                b.sequence
            );
            let t = |x: &V4l2Buffer| x.timestamp.tv_sec * 1_000_000 + x.timestamp.tv_usec;
            assert!(t(b) > t(p), "timestamps not increasing");
        }
        assert_eq!(
            decode_frame_number(pix.pixelformat, pix.width, pix.height, data),
            Some(b.sequence)
        );
        assert!(
            *data == expected_frame(pix, b.sequence),
            "frame {} content",
            b.sequence
        );
        last = Some(b);
    }
}

/// REQBUFS(`count`) of `memory` on `type_`: the count the device granted, or the errno.
fn reqbufs(g: &mut MediaGuest, s: u32, type_: u32, memory: u32, count: u32) -> Result<u32, u32> {
    let req = V4l2Requestbuffers {
        count,
        type_,
        memory,
        ..Default::default()
    };
    g.ioctl::<_, V4l2Requestbuffers>(s, V4l2Ioctl::VIDIOC_REQBUFS, &req)
        .map(|r| r.count)
}

/// The pixel formats ENUM_FMT lists for `type_`, up to its terminating `EINVAL`.
fn enum_formats(g: &mut MediaGuest, s: u32, type_: u32) -> Vec<u32> {
    let mut formats = Vec::new();
    for index in 0.. {
        let q = V4l2Fmtdesc {
            index,
            type_,
            ..Default::default()
        };
        match g.ioctl::<_, V4l2Fmtdesc>(s, V4l2Ioctl::VIDIOC_ENUM_FMT, &q) {
            Ok(d) => formats.push(d.pixelformat),
            Err(e) => {
                assert_eq!(e, libc::EINVAL as u32);
                break;
            }
        }
    }
    formats
}

fn enumerate_and_configure(
    g: &mut MediaGuest,
    s: u32,
    fourcc: u32,
    w: u32,
    h: u32,
) -> V4l2PixFormat {
    use V4l2Ioctl::*;
    let formats = enum_formats(g, s, BUF_TYPE_VIDEO_CAPTURE);
    assert_eq!(formats, [PIX_FMT_YUYV, PIX_FMT_NV12, PIX_FMT_RGB24]);
    // Multi-planar types are not served (and not advertised).
    let q = V4l2Fmtdesc {
        index: 0,
        type_: BUF_TYPE_VIDEO_CAPTURE_MPLANE,
        ..Default::default()
    };
    assert_eq!(
        g.ioctl::<_, V4l2Fmtdesc>(s, VIDIOC_ENUM_FMT, &q),
        Err(libc::EINVAL as u32)
    );

    let q = V4l2Frmsizeenum {
        index: 1,
        pixel_format: fourcc,
        ..Default::default()
    };
    let sz: V4l2Frmsizeenum = g.ioctl(s, VIDIOC_ENUM_FRAMESIZES, &q).unwrap();
    assert_eq!(
        (sz.type_, sz.size[0], sz.size[1]),
        (FRMSIZE_TYPE_DISCRETE, 640, 480)
    );
    let q = V4l2Frmivalenum {
        index: 0,
        pixel_format: fourcc,
        width: 640,
        height: 480,
        ..Default::default()
    };
    let iv: V4l2Frmivalenum = g.ioctl(s, VIDIOC_ENUM_FRAMEINTERVALS, &q).unwrap();
    assert_eq!(&iv.interval[..2], &[1, 60]);

    // TRY_FMT snaps to a supported size and fills the layout without changing state.
    let tried: V4l2Format = g
        .ioctl(s, VIDIOC_TRY_FMT, &fmt_req(PIX_FMT_RGB24, 1000, 700))
        .unwrap();
    let p = tried.pix();
    assert_eq!(
        (p.width, p.height, p.pixelformat),
        (1280, 720, PIX_FMT_RGB24)
    );
    assert_eq!((p.bytesperline, p.sizeimage), (3840, 3840 * 720));
    let cur: V4l2Format = g.ioctl(s, VIDIOC_G_FMT, &fmt_req(0, 0, 0)).unwrap();
    assert_eq!(cur.pix().pixelformat, PIX_FMT_YUYV);

    let set: V4l2Format = g.ioctl(s, VIDIOC_S_FMT, &fmt_req(fourcc, w, h)).unwrap();
    let got: V4l2Format = g.ioctl(s, VIDIOC_G_FMT, &fmt_req(0, 0, 0)).unwrap();
    assert_eq!(set, got);
    let pix = got.pix();
    assert_eq!((pix.width, pix.height, pix.pixelformat), (w, h, fourcc));
    assert_eq!(pix.priv_, 0xfeed_cafe, "EXT_PIX_FORMAT is advertised");
    assert_eq!(pix.sizeimage, frame_layout(fourcc, w, h).unwrap().1);

    // 60 frames per second keeps the test short.
    let mut parm = V4l2Streamparm {
        type_: BUF_TYPE_VIDEO_CAPTURE,
        ..Default::default()
    };
    parm.set_capture(&V4l2Captureparm {
        timeperframe: V4l2Fract {
            numerator: 1,
            denominator: 50,
        },
        ..Default::default()
    });
    let parm: V4l2Streamparm = g.ioctl(s, VIDIOC_S_PARM, &parm).unwrap();
    assert_eq!(parm.capture().capability, CAP_TIMEPERFRAME);
    assert_eq!(
        parm.capture().timeperframe,
        V4l2Fract {
            numerator: 1,
            denominator: 60
        }
    );
    pix
}

#[test]
fn mmap_capture_flow() {
    use V4l2Ioctl::*;
    let mut g = camera_guest();
    let s = g.open();
    assert_eq!(s, 0);
    let pix = enumerate_and_configure(&mut g, s, PIX_FMT_NV12, 320, 240);

    let req = V4l2Requestbuffers {
        count: 4,
        type_: BUF_TYPE_VIDEO_CAPTURE,
        memory: MEMORY_MMAP,
        ..Default::default()
    };
    let got: V4l2Requestbuffers = g.ioctl(s, VIDIOC_REQBUFS, &req).unwrap();
    assert_eq!(got.count, 4);
    assert_ne!(got.capabilities & BUF_CAP_SUPPORTS_MMAP, 0);
    // CREATE_BUFS appends buffers of the size its format asks for, at least the
    // current format's.
    let create = V4l2CreateBuffers {
        count: 2,
        memory: MEMORY_MMAP,
        format: V4l2Format::from_pix(BUF_TYPE_VIDEO_CAPTURE, &pix),
        ..Default::default()
    };
    let created: V4l2CreateBuffers = g.ioctl(s, VIDIOC_CREATE_BUFS, &create).unwrap();
    assert_eq!((created.index, created.count), (4, 2));
    let too_small = V4l2CreateBuffers {
        format: fmt_req(PIX_FMT_NV12, 320, 120).tap(|f| {
            let mut p = f.pix();
            p.sizeimage = pix.sizeimage / 2;
            f.set_pix(&p);
        }),
        ..create
    };
    assert_eq!(
        g.ioctl::<_, V4l2CreateBuffers>(s, VIDIOC_CREATE_BUFS, &too_small),
        Err(libc::EINVAL as u32)
    );
    let big = V4l2CreateBuffers {
        count: 1,
        format: fmt_req(PIX_FMT_RGB24, 1280, 720).tap(|f| {
            let mut p = f.pix();
            // Not a whole number of pages.
            p.sizeimage = 1280 * 720 * 3 + 100;
            f.set_pix(&p);
        }),
        ..create
    };
    let created: V4l2CreateBuffers = g.ioctl(s, VIDIOC_CREATE_BUFS, &big).unwrap();
    assert_eq!((created.index, created.count), (6, 1));
    // QUERYBUF reports the length asked for, as vb2 does (v4l2-compliance 1.30 checks
    // `length == sizeimage` for CREATE_BUFS buffers); the memory behind it and the
    // offsets stay page-rounded.
    let mut offsets = Vec::new();
    for (index, length) in [
        (4, pix.sizeimage),
        (5, pix.sizeimage),
        (6, 1280 * 720 * 3 + 100),
    ] {
        let q = V4l2Buffer {
            index,
            type_: BUF_TYPE_VIDEO_CAPTURE,
            ..Default::default()
        };
        let b: V4l2Buffer = g.ioctl(s, VIDIOC_QUERYBUF, &q).unwrap();
        assert_eq!(b.length, length, "buffer {index}");
        assert_eq!(b.mem_offset() % 4096, 0, "buffer {index}");
        offsets.push((b.mem_offset(), b.length));
    }
    assert_ne!(
        pix.sizeimage % 4096,
        0,
        "the test wants a length that is not page-sized"
    );
    for w in offsets.windows(2) {
        assert!(
            u64::from(w[0].0) + page_round(w[0].1) <= u64::from(w[1].0),
            "{offsets:?}"
        );
    }
    // The format is locked while buffers exist.
    assert_eq!(
        g.ioctl::<_, V4l2Format>(s, VIDIOC_S_FMT, &fmt_req(PIX_FMT_YUYV, 640, 480)),
        Err(libc::EBUSY as u32)
    );

    let mut maps = Vec::new();
    for index in 0..4 {
        let q = V4l2Buffer {
            index,
            type_: BUF_TYPE_VIDEO_CAPTURE,
            ..Default::default()
        };
        let b: V4l2Buffer = g.ioctl(s, VIDIOC_QUERYBUF, &q).unwrap();
        assert_eq!(b.memory, MEMORY_MMAP);
        assert_eq!(b.length, pix.sizeimage);
        assert_eq!(b.mem_offset() % 4096, 0);
        // The mapping is the page-rounded memory behind the buffer.
        let (addr, len) = g.mmap(s, b.mem_offset()).unwrap();
        assert_eq!(len, page_round(b.length));
        assert_eq!(addr % 4096, 0);
        let b: V4l2Buffer = g.ioctl(s, VIDIOC_QUERYBUF, &q).unwrap();
        assert_ne!(b.flags & BUF_FLAG_MAPPED, 0);
        maps.push(addr);
    }
    assert_eq!(g.mmap(s, 12345), Err(libc::EINVAL as u32));
    // Buffers are mapped: reallocation is refused.
    assert_eq!(
        g.ioctl::<_, V4l2Requestbuffers>(s, VIDIOC_REQBUFS, &req),
        Err(libc::EBUSY as u32)
    );

    for index in 0..4 {
        let q = V4l2Buffer {
            index,
            type_: BUF_TYPE_VIDEO_CAPTURE,
            memory: MEMORY_MMAP,
            ..Default::default()
        };
        let b: V4l2Buffer = g.ioctl(s, VIDIOC_QBUF, &q).unwrap();
        assert_ne!(b.flags & BUF_FLAG_QUEUED, 0);
    }
    // Queuing a queued buffer again is an error.
    let q0 = V4l2Buffer {
        index: 0,
        type_: BUF_TYPE_VIDEO_CAPTURE,
        memory: MEMORY_MMAP,
        ..Default::default()
    };
    assert_eq!(
        g.ioctl::<_, V4l2Buffer>(s, VIDIOC_QBUF, &q0),
        Err(libc::EINVAL as u32)
    );
    // DQBUF travels as events; the ioctl itself is refused.
    assert_eq!(
        g.ioctl::<_, V4l2Buffer>(s, VIDIOC_DQBUF, &q0),
        Err(libc::ENOTTY as u32)
    );

    g.ioctl_void(s, VIDIOC_STREAMON, &BUF_TYPE_VIDEO_CAPTURE)
        .unwrap();
    let mut frames = Vec::new();
    while frames.len() < 8 {
        assert!(
            g.pump_until(|g| !g.dqbufs.is_empty()),
            "no frame after {} frames",
            frames.len()
        );
        let d = g.dqbufs.pop_front().unwrap();
        assert_eq!(d.session, s);
        let data = g
            .shm
            .read(maps[d.buffer.index as usize], pix.sizeimage as usize);
        frames.push((d.buffer, data));
        // Requeue.
        let q = V4l2Buffer {
            index: d.buffer.index,
            type_: BUF_TYPE_VIDEO_CAPTURE,
            memory: MEMORY_MMAP,
            ..Default::default()
        };
        g.ioctl::<_, V4l2Buffer>(s, VIDIOC_QBUF, &q).unwrap();
    }
    check_frames(&frames, &pix);
    assert!(g.error_events.is_empty());

    g.ioctl_void(s, VIDIOC_STREAMOFF, &BUF_TYPE_VIDEO_CAPTURE)
        .unwrap();
    // After STREAMOFF nothing arrives any more (drain what was sent before).
    g.pump_until(|_| true);
    g.dqbufs.clear();
    std::thread::sleep(Duration::from_millis(40));
    g.pump_until(|_| true);
    assert!(g.dqbufs.is_empty());
    for addr in maps {
        assert_eq!(g.munmap(addr), 0);
        assert_eq!(g.munmap(addr), libc::EINVAL as u32);
    }
    assert_eq!(g.shm.count(), 0);
    assert_eq!(
        reqbufs(&mut g, s, BUF_TYPE_VIDEO_CAPTURE, MEMORY_MMAP, 0),
        Ok(0)
    );
    g.close(s);
    assert_eq!(g.dev.runner().session_count(), 0);
    // Session ids are recycled.
    assert_eq!(g.open(), 0);
    assert_eq!(g.open(), 1);
    g.close(0);
    assert_eq!(g.open(), 0);
}

fn qbuf_userptr(
    g: &mut MediaGuest,
    s: u32,
    index: u32,
    len: u32,
    sgs: &[SgEntry],
) -> (u32, Vec<u8>) {
    let b = V4l2Buffer {
        index,
        type_: BUF_TYPE_VIDEO_CAPTURE,
        memory: MEMORY_USERPTR,
        m: 0xdead_0000 + u64::from(index),
        length: len,
        ..Default::default()
    };
    let mut payload = bytes_of(&b);
    for sg in sgs {
        payload.extend_from_slice(sg.as_bytes());
    }
    g.ioctl_raw(s, V4l2Ioctl::VIDIOC_QBUF.nr().into(), &payload, 4096)
}

#[test]
fn format_is_global_and_the_queue_has_one_owner() {
    use V4l2Ioctl::*;
    let mut g = camera_guest();
    let a = g.open();
    let b = g.open();
    let set: V4l2Format = g
        .ioctl(a, VIDIOC_S_FMT, &fmt_req(PIX_FMT_RGB24, 320, 240))
        .unwrap();
    // Another open file sees the same format (V4L2: a capture node has one format).
    let seen: V4l2Format = g.ioctl(b, VIDIOC_G_FMT, &fmt_req(0, 0, 0)).unwrap();
    assert_eq!(seen.pix(), set.pix());
    let req = |count| V4l2Requestbuffers {
        count,
        type_: BUF_TYPE_VIDEO_CAPTURE,
        memory: MEMORY_MMAP,
        ..Default::default()
    };
    let got: V4l2Requestbuffers = g.ioctl(a, VIDIOC_REQBUFS, &req(2)).unwrap();
    assert_eq!(got.count, 2);
    // The queue belongs to `a` while it holds buffers.
    let busy = libc::EBUSY as u32;
    assert_eq!(
        g.ioctl::<_, V4l2Requestbuffers>(b, VIDIOC_REQBUFS, &req(1)),
        Err(busy)
    );
    assert_eq!(
        g.ioctl::<_, V4l2Requestbuffers>(b, VIDIOC_REQBUFS, &req(0)),
        Err(busy)
    );
    let create = V4l2CreateBuffers {
        count: 1,
        memory: MEMORY_MMAP,
        format: set,
        ..Default::default()
    };
    assert_eq!(
        g.ioctl::<_, V4l2CreateBuffers>(b, VIDIOC_CREATE_BUFS, &create),
        Err(busy)
    );
    assert_eq!(
        g.ioctl::<_, V4l2Format>(b, VIDIOC_S_FMT, &fmt_req(PIX_FMT_YUYV, 640, 480)),
        Err(busy)
    );
    // Freed: `b` may take it.
    g.ioctl::<_, V4l2Requestbuffers>(a, VIDIOC_REQBUFS, &req(0))
        .unwrap();
    let got: V4l2Requestbuffers = g.ioctl(b, VIDIOC_REQBUFS, &req(1)).unwrap();
    assert_eq!(got.count, 1);
    // Closing the owner frees the queue too.
    g.close(b);
    let got: V4l2Requestbuffers = g.ioctl(a, VIDIOC_REQBUFS, &req(3)).unwrap();
    assert_eq!(got.count, 3);
    g.close(a);
}

#[test]
fn userptr_capture_flow() {
    use V4l2Ioctl::*;
    let mut g = camera_guest();
    let s = g.open();
    let pix = enumerate_and_configure(&mut g, s, PIX_FMT_YUYV, 320, 240);
    assert_eq!(
        reqbufs(&mut g, s, BUF_TYPE_VIDEO_CAPTURE, MEMORY_USERPTR, 3),
        Ok(3)
    );

    let len = pix.sizeimage;
    let span = u64::from(len).div_ceil(4096) * 2 * 4096;
    let lists: Vec<Vec<SgEntry>> = (0..3u64)
        .map(|i| scattered_sg(REGION_END - span / 2 + i * span, len))
        .collect();
    // Buffer 0 straddles the two memory regions.
    assert!(
        lists[0].iter().any(|e| e.start < REGION_END)
            && lists[0].iter().any(|e| e.start >= REGION_END)
    );
    for (i, sgs) in lists.iter().enumerate() {
        let (status, out) = qbuf_userptr(&mut g, s, i as u32, len, sgs);
        assert_eq!(status, 0);
        let b = V4l2Buffer::read_from_prefix(&out).unwrap().0;
        assert_eq!(b.m, 0xdead_0000 + i as u64);
    }
    g.ioctl_void(s, VIDIOC_STREAMON, &BUF_TYPE_VIDEO_CAPTURE)
        .unwrap();
    let mut frames = Vec::new();
    while frames.len() < 6 {
        assert!(g.pump_until(|g| !g.dqbufs.is_empty()));
        let d = g.dqbufs.pop_front().unwrap();
        let i = d.buffer.index as usize;
        assert_eq!(d.buffer.memory, MEMORY_USERPTR);
        assert_eq!(d.buffer.m, 0xdead_0000 + i as u64);
        let data = read_sg(&g, &lists[i]);
        frames.push((d.buffer, data));
        let (status, _) = qbuf_userptr(&mut g, s, i as u32, len, &lists[i]);
        assert_eq!(status, 0);
    }
    check_frames(&frames, &pix);
    g.ioctl_void(s, VIDIOC_STREAMOFF, &BUF_TYPE_VIDEO_CAPTURE)
        .unwrap();
    g.close(s);
}

/// A multi-planar buffer with `planes` planes for QBUF/QUERYBUF payloads.
fn mplane_buffer(index: u32, memory: u32, planes: &[V4l2Plane]) -> Vec<u8> {
    let b = V4l2Buffer {
        index,
        type_: BUF_TYPE_VIDEO_CAPTURE_MPLANE,
        memory,
        length: planes.len() as u32,
        ..Default::default()
    };
    let mut payload = bytes_of(&b);
    for p in planes {
        payload.extend_from_slice(p.as_bytes());
    }
    payload
}

/// Answer of a multi-planar buffer ioctl: the buffer and its planes.
fn parse_mplane(out: &[u8]) -> (V4l2Buffer, Vec<V4l2Plane>) {
    let b = V4l2Buffer::read_from_prefix(out).unwrap().0;
    let planes = (0..b.length as usize)
        .map(|i| V4l2Plane::read_from_prefix(&out[88 + i * 64..]).unwrap().0)
        .collect();
    (b, planes)
}

/// Checks that dequeued planes hold exactly pattern frame `sequence`, plane by plane.
fn check_planes(fourcc: u32, d: &Dequeued, data: &[Vec<u8>], last_seq: &mut Option<u32>) {
    let (w, h) = (320, 240);
    let want = render_planes(fourcc, w, h, d.buffer.sequence, &Adjust::default()).unwrap();
    assert_eq!(
        d.buffer.flags & (BUF_FLAG_DONE | BUF_FLAG_ERROR),
        BUF_FLAG_DONE
    );
    assert_eq!(d.planes.len(), want.len());
    for ((p, got), want) in d.planes.iter().zip(data).zip(&want) {
        assert_eq!(p.bytesused as usize, want.len());
        assert!(
            got[..want.len()] == want[..],
            "plane content of frame {}",
            d.buffer.sequence
        );
    }
    assert_eq!(
        decode_frame_number(fourcc, w, h, &data[0]),
        Some(d.buffer.sequence)
    );
    if let Some(l) = last_seq.replace(d.buffer.sequence) {
        assert!(d.buffer.sequence > l);
    }
}

#[test]
fn mplane_capture_flow() {
    use V4l2Ioctl::*;
    let mut g = mplane_camera_guest();
    let s = g.open();
    // Only the multi-planar type is served.
    let single = V4l2Fmtdesc {
        type_: BUF_TYPE_VIDEO_CAPTURE,
        ..Default::default()
    };
    assert_eq!(
        g.ioctl::<_, V4l2Fmtdesc>(s, VIDIOC_ENUM_FMT, &single),
        Err(libc::EINVAL as u32)
    );
    assert_eq!(
        g.ioctl::<_, V4l2Format>(s, VIDIOC_G_FMT, &fmt_req(0, 0, 0)),
        Err(libc::EINVAL as u32)
    );
    let formats = enum_formats(&mut g, s, BUF_TYPE_VIDEO_CAPTURE_MPLANE);
    assert_eq!(
        formats,
        [
            PIX_FMT_YUYV,
            PIX_FMT_NV12,
            PIX_FMT_RGB24,
            PIX_FMT_NV12M,
            PIX_FMT_YUV420M
        ]
    );

    for (fourcc, nplanes) in [(PIX_FMT_YUV420M, 3), (PIX_FMT_NV12M, 2), (PIX_FMT_RGB24, 1)] {
        let mp = V4l2PixFormatMplane {
            width: 320,
            height: 240,
            pixelformat: fourcc,
            ..Default::default()
        };
        let set = V4l2Format::from_pix_mp(BUF_TYPE_VIDEO_CAPTURE_MPLANE, &mp);
        let got: V4l2Format = g.ioctl(s, VIDIOC_S_FMT, &set).unwrap();
        let got = got.pix_mp();
        let layout = plane_layout(fourcc, 320, 240).unwrap();
        assert_eq!(
            (got.pixelformat, usize::from(got.num_planes)),
            (fourcc, nplanes)
        );
        for (pf, (bpl, size)) in got.plane_fmt.iter().zip(&layout) {
            assert_eq!((pf.bytesperline, pf.sizeimage), (*bpl, *size));
        }

        // MMAP: every plane has its own offset and mapping.
        let req = V4l2Requestbuffers {
            count: 2,
            type_: BUF_TYPE_VIDEO_CAPTURE_MPLANE,
            memory: MEMORY_MMAP,
            ..Default::default()
        };
        let got: V4l2Requestbuffers = g.ioctl(s, VIDIOC_REQBUFS, &req).unwrap();
        assert_eq!(got.count, 2);
        let mut maps: Vec<Vec<u64>> = Vec::new();
        let mut offsets = Vec::new();
        for index in 0..2 {
            let payload = mplane_buffer(index, MEMORY_MMAP, &[V4l2Plane::default(); 8]);
            let (status, out) = g.ioctl_raw(s, VIDIOC_QUERYBUF.nr().into(), &payload[..88], 4096);
            assert_eq!(status, 0);
            let (b, planes) = parse_mplane(&out);
            assert_eq!(b.length as usize, nplanes);
            let mut addrs = Vec::new();
            for (p, (_, size)) in planes.iter().zip(&layout) {
                assert!(p.length >= *size);
                let offset = p.m as u32;
                assert_eq!(offset % 4096, 0);
                offsets.push(offset);
                addrs.push(g.mmap(s, offset).unwrap().0);
            }
            maps.push(addrs);
            let (status, out) = g.ioctl_raw(
                s,
                VIDIOC_QBUF.nr().into(),
                &mplane_buffer(index, MEMORY_MMAP, &planes),
                4096,
            );
            assert_eq!(status, 0);
            assert_ne!(parse_mplane(&out).0.flags & BUF_FLAG_QUEUED, 0);
        }
        offsets.sort_unstable();
        offsets.dedup();
        assert_eq!(offsets.len(), 2 * nplanes, "plane offsets are distinct");
        // A buffer must be queued with all its planes.
        let short = mplane_buffer(0, MEMORY_MMAP, &[V4l2Plane::default()]);
        if nplanes > 1 {
            let (status, _) = g.ioctl_raw(s, VIDIOC_QBUF.nr().into(), &short, 4096);
            assert_eq!(status, libc::EINVAL as u32);
        }
        g.ioctl_void(s, VIDIOC_STREAMON, &BUF_TYPE_VIDEO_CAPTURE_MPLANE)
            .unwrap();
        let mut last = None;
        for _ in 0..4 {
            assert!(g.pump_until(|g| !g.dqbufs.is_empty()));
            let d = g.dqbufs.pop_front().unwrap();
            assert_eq!(d.session, s);
            let i = d.buffer.index as usize;
            let data: Vec<Vec<u8>> = maps[i]
                .iter()
                .zip(&layout)
                .map(|(a, (_, size))| g.shm.read(*a, *size as usize))
                .collect();
            check_planes(fourcc, &d, &data, &mut last);
            let (status, _) = g.ioctl_raw(
                s,
                VIDIOC_QBUF.nr().into(),
                &mplane_buffer(i as u32, MEMORY_MMAP, &d.planes),
                4096,
            );
            assert_eq!(status, 0);
        }
        g.ioctl_void(s, VIDIOC_STREAMOFF, &BUF_TYPE_VIDEO_CAPTURE_MPLANE)
            .unwrap();
        g.dqbufs.clear();
        for a in maps.iter().flatten() {
            assert_eq!(g.munmap(*a), 0);
        }
        let free = V4l2Requestbuffers { count: 0, ..req };
        g.ioctl::<_, V4l2Requestbuffers>(s, VIDIOC_REQBUFS, &free)
            .unwrap();

        // USERPTR: one SG list per plane, in guest memory.
        let req = V4l2Requestbuffers {
            count: 1,
            memory: MEMORY_USERPTR,
            ..req
        };
        g.ioctl::<_, V4l2Requestbuffers>(s, VIDIOC_REQBUFS, &req)
            .unwrap();
        let lists: Vec<Vec<SgEntry>> = layout
            .iter()
            .enumerate()
            .map(|(i, (_, size))| scattered_sg(0x100_0000 + i as u64 * 0x40_0000, *size))
            .collect();
        let planes: Vec<V4l2Plane> = layout
            .iter()
            .enumerate()
            .map(|(i, (_, size))| V4l2Plane {
                length: *size,
                m: 0xbeef_0000 + i as u64,
                ..Default::default()
            })
            .collect();
        let qbuf = |g: &mut MediaGuest, planes: &[V4l2Plane], lists: &[Vec<SgEntry>]| {
            let mut payload = mplane_buffer(0, MEMORY_USERPTR, planes);
            for sg in lists.iter().flatten() {
                payload.extend_from_slice(sg.as_bytes());
            }
            g.ioctl_raw(s, VIDIOC_QBUF.nr().into(), &payload, 4096).0
        };
        // A plane shorter than the format needs is refused.
        let mut small = planes.clone();
        small[0].length /= 2;
        let mut small_lists = lists.clone();
        small_lists[0] = scattered_sg(0x100_0000, small[0].length);
        assert_eq!(qbuf(&mut g, &small, &small_lists), libc::EINVAL as u32);
        assert_eq!(qbuf(&mut g, &planes, &lists), 0);
        g.ioctl_void(s, VIDIOC_STREAMON, &BUF_TYPE_VIDEO_CAPTURE_MPLANE)
            .unwrap();
        let mut last = None;
        for _ in 0..2 {
            assert!(g.pump_until(|g| !g.dqbufs.is_empty()));
            let d = g.dqbufs.pop_front().unwrap();
            assert_eq!(d.buffer.memory, MEMORY_USERPTR);
            for (i, p) in d.planes.iter().enumerate() {
                assert_eq!(
                    p.m,
                    0xbeef_0000 + i as u64,
                    "the guest's pointer comes back"
                );
            }
            let data: Vec<Vec<u8>> = lists.iter().map(|l| read_sg(&g, l)).collect();
            check_planes(fourcc, &d, &data, &mut last);
            assert_eq!(qbuf(&mut g, &planes, &lists), 0);
        }
        g.ioctl_void(s, VIDIOC_STREAMOFF, &BUF_TYPE_VIDEO_CAPTURE_MPLANE)
            .unwrap();
        g.dqbufs.clear();
        let free = V4l2Requestbuffers { count: 0, ..req };
        g.ioctl::<_, V4l2Requestbuffers>(s, VIDIOC_REQBUFS, &free)
            .unwrap();
    }
    g.close(s);
    assert_eq!(g.shm.count(), 0);
}

#[test]
fn controls_and_events() {
    use V4l2Ioctl::*;
    let mut g = camera_guest();
    let s = g.open();
    // Enumerate controls with NEXT_CTRL.
    let mut ids = Vec::new();
    let mut id = CTRL_FLAG_NEXT_CTRL;
    while let Ok(q) = g.ioctl::<_, V4l2Queryctrl>(
        s,
        VIDIOC_QUERYCTRL,
        &V4l2Queryctrl {
            id,
            ..Default::default()
        },
    ) {
        ids.push(q.id);
        id = q.id | CTRL_FLAG_NEXT_CTRL;
    }
    // The user class control comes first; it can be neither read nor written.
    assert_eq!(
        ids,
        [CTRL_CLASS_USER | 1, CID_BRIGHTNESS, CID_CONTRAST, CID_HFLIP]
    );
    assert_eq!(
        g.ioctl::<_, V4l2Control>(
            s,
            VIDIOC_G_CTRL,
            &V4l2Control {
                id: CTRL_CLASS_USER | 1,
                value: 0
            }
        ),
        Err(libc::EACCES as u32)
    );
    let q: V4l2QueryExtCtrl = g
        .ioctl(
            s,
            VIDIOC_QUERY_EXT_CTRL,
            &V4l2QueryExtCtrl {
                id: CID_BRIGHTNESS,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!((q.minimum, q.maximum, q.default_value), (0, 255, 128));

    let sub = V4l2EventSubscription {
        type_: EVENT_CTRL,
        id: CID_BRIGHTNESS,
        flags: 1,
        ..Default::default()
    };
    g.ioctl_void(s, VIDIOC_SUBSCRIBE_EVENT, &sub).unwrap();
    assert!(g.pump_until(|g| !g.v4l2_events.is_empty()));
    let (es, ev) = g.v4l2_events.pop_front().unwrap();
    assert_eq!((es, ev.type_, ev.id), (s, EVENT_CTRL, CID_BRIGHTNESS));

    // S_CTRL clamps, and the change is an event.
    let c: V4l2Control = g
        .ioctl(
            s,
            VIDIOC_S_CTRL,
            &V4l2Control {
                id: CID_BRIGHTNESS,
                value: 999,
            },
        )
        .unwrap();
    assert_eq!(c.value, 255);
    assert!(g.pump_until(|g| !g.v4l2_events.is_empty()));
    let (_, ev) = g.v4l2_events.pop_front().unwrap();
    assert_eq!(i32::from_le_bytes(ev.u[8..12].try_into().unwrap()), 255);
    assert_eq!(
        g.ioctl::<_, V4l2Control>(s, VIDIOC_G_CTRL, &V4l2Control { id: 1, value: 0 }),
        Err(libc::EINVAL as u32)
    );

    // Extended controls: header, controls array, answered in place.
    let hdr = V4l2ExtControls {
        which: CTRL_WHICH_CUR_VAL,
        count: 2,
        controls: 0xffff_0000,
        ..Default::default()
    };
    let mut c0 = V4l2ExtControl {
        id: CID_CONTRAST,
        ..Default::default()
    };
    c0.set_value(7);
    let c1 = V4l2ExtControl {
        id: CID_HFLIP,
        value: [1, 0, 0, 0, 0, 0, 0, 0],
        ..Default::default()
    };
    let mut payload = bytes_of(&hdr);
    payload.extend_from_slice(c0.as_bytes());
    payload.extend_from_slice(c1.as_bytes());
    let (status, _) = g.ioctl_raw(s, VIDIOC_S_EXT_CTRLS.nr().into(), &payload, 4096);
    assert_eq!(status, 0);
    let (status, out) = g.ioctl_raw(s, VIDIOC_G_EXT_CTRLS.nr().into(), &payload, 4096);
    assert_eq!(status, 0);
    let back = V4l2ExtControls::read_from_prefix(&out).unwrap().0;
    assert_eq!(back.controls, 0, "a guest pointer leaked back");
    let v0 = V4l2ExtControl::read_from_prefix(&out[32..]).unwrap().0;
    let v1 = V4l2ExtControl::read_from_prefix(&out[52..]).unwrap().0;
    assert_eq!((v0.value(), v1.value()), (7, 1));
    // An unknown control: EINVAL with error_idx (== count for G, as the V4L2 core
    // reports a control that fails validation), and the payload is still answered.
    let bad = V4l2ExtControl {
        id: 0x1234,
        ..Default::default()
    };
    let mut payload = bytes_of(&V4l2ExtControls {
        count: 2,
        ..Default::default()
    });
    payload.extend_from_slice(c0.as_bytes());
    payload.extend_from_slice(bad.as_bytes());
    let (status, out) = g.ioctl_raw(s, VIDIOC_G_EXT_CTRLS.nr().into(), &payload, 4096);
    assert_eq!(status, libc::EINVAL as u32);
    assert_eq!(
        V4l2ExtControls::read_from_prefix(&out).unwrap().0.error_idx,
        2
    );
    // TRY names the bad control.
    let (status, out) = g.ioctl_raw(s, VIDIOC_TRY_EXT_CTRLS.nr().into(), &payload, 4096);
    assert_eq!(status, libc::EINVAL as u32);
    assert_eq!(
        V4l2ExtControls::read_from_prefix(&out).unwrap().0.error_idx,
        1
    );
    // A count beyond the payload is a truncated command.
    let (status, _) = g.ioctl_raw(
        s,
        VIDIOC_G_EXT_CTRLS.nr().into(),
        bytes_of(&V4l2ExtControls {
            count: 5,
            ..Default::default()
        })
        .as_slice(),
        4096,
    );
    assert_eq!(status, libc::EINVAL as u32);

    let input: V4l2Input = g.ioctl(s, VIDIOC_ENUMINPUT, &V4l2Input::default()).unwrap();
    assert_eq!(input.type_, INPUT_TYPE_CAMERA);
    assert_eq!(g.ioctl::<_, i32>(s, VIDIOC_G_INPUT, &()), Ok(0));
    // An ioctl the camera does not implement.
    assert_eq!(
        g.ioctl::<_, u64>(s, VIDIOC_G_STD, &()),
        Err(libc::ENOTTY as u32)
    );
    g.close(s);
}

/// A DMABUF `v4l2_buffer` of `planes` planes (0: single-planar) followed by `ids`
/// virtio object ids.
fn dmabuf_buffer(index: u32, planes: u32, ids: u32) -> Vec<u8> {
    let b = V4l2Buffer {
        index,
        type_: if planes == 0 {
            BUF_TYPE_VIDEO_CAPTURE
        } else {
            BUF_TYPE_VIDEO_CAPTURE_MPLANE
        },
        memory: MEMORY_DMABUF,
        m: 7,
        length: if planes == 0 { 1 << 20 } else { planes },
        ..Default::default()
    };
    let mut payload = bytes_of(&b);
    for _ in 0..planes {
        payload.extend_from_slice(
            V4l2Plane {
                length: 1 << 20,
                m: 7,
                ..Default::default()
            }
            .as_bytes(),
        );
    }
    for i in 0..ids {
        payload.extend_from_slice(VirtioObjectId([i as u8 + 1; 16]).as_bytes());
    }
    payload
}

#[test]
fn dmabuf_memory_is_refused_and_the_session_keeps_working() {
    use V4l2Ioctl::*;
    let einval = libc::EINVAL as u32;
    let mut g = camera_guest();
    let s = g.open();
    let pix: V4l2Format = g
        .ioctl(s, VIDIOC_S_FMT, &fmt_req(PIX_FMT_YUYV, 320, 240))
        .unwrap();
    let pix = pix.pix();

    // The camera cannot import virtio objects: REQBUFS and CREATE_BUFS refuse DMABUF
    // as V4L2 refuses an unsupported memory type (also when only asking, count 0).
    for count in [0, 2] {
        let req = V4l2Requestbuffers {
            count,
            type_: BUF_TYPE_VIDEO_CAPTURE,
            memory: MEMORY_DMABUF,
            ..Default::default()
        };
        assert_eq!(
            g.ioctl::<_, V4l2Requestbuffers>(s, VIDIOC_REQBUFS, &req),
            Err(einval)
        );
        let create = V4l2CreateBuffers {
            count,
            memory: MEMORY_DMABUF,
            format: fmt_req(PIX_FMT_YUYV, 320, 240),
            ..Default::default()
        };
        assert_eq!(
            g.ioctl::<_, V4l2CreateBuffers>(s, VIDIOC_CREATE_BUFS, &create),
            Err(einval)
        );
    }
    let create = V4l2CreateBuffers {
        count: 2,
        memory: MEMORY_DMABUF,
        format: fmt_req(PIX_FMT_YUYV, 320, 240),
        ..Default::default()
    };
    // Without buffers, a DMABUF buffer with its object id is refused.
    let (status, _) = g.ioctl_raw(s, VIDIOC_QBUF.nr().into(), &dmabuf_buffer(0, 0, 1), 4096);
    assert_eq!(status, einval);

    // MMAP buffers: the capabilities advertise what the camera serves, not DMABUF.
    let req = V4l2Requestbuffers {
        count: 2,
        type_: BUF_TYPE_VIDEO_CAPTURE,
        memory: MEMORY_MMAP,
        ..Default::default()
    };
    let got: V4l2Requestbuffers = g.ioctl(s, VIDIOC_REQBUFS, &req).unwrap();
    assert_eq!(got.count, 2);
    assert_eq!(got.capabilities & BUF_CAP_SUPPORTS_DMABUF, 0);
    assert_eq!(
        got.capabilities & (BUF_CAP_SUPPORTS_MMAP | BUF_CAP_SUPPORTS_USERPTR),
        BUF_CAP_SUPPORTS_MMAP | BUF_CAP_SUPPORTS_USERPTR
    );
    // Adding DMABUF buffers to the MMAP queue is refused too.
    assert_eq!(
        g.ioctl::<_, V4l2CreateBuffers>(s, VIDIOC_CREATE_BUFS, &create),
        Err(einval)
    );

    // DMABUF buffers on the MMAP queue: well-formed (single- and multi-planar) or with
    // missing object ids, every one gets EINVAL and an error header only.
    for (planes, ids) in [(0, 1), (0, 0), (2, 2), (2, 1), (3, 0)] {
        for ioctl in [VIDIOC_QBUF, VIDIOC_PREPARE_BUF] {
            let (status, out) =
                g.ioctl_raw(s, ioctl.nr().into(), &dmabuf_buffer(1, planes, ids), 4096);
            assert!(
                status == libc::EINVAL as u32
                    || (ioctl == VIDIOC_PREPARE_BUF
                        && ids == planes.max(1)
                        && status == libc::ENOTTY as u32),
                "{ioctl} planes={planes} ids={ids}: status {status}"
            );
            assert!(out.is_empty());
        }
    }
    assert!(g.error_events.is_empty());

    // The session still captures with MMAP buffers.
    for index in 0..2 {
        let q = V4l2Buffer {
            index,
            type_: BUF_TYPE_VIDEO_CAPTURE,
            memory: MEMORY_MMAP,
            ..Default::default()
        };
        let b: V4l2Buffer = g.ioctl(s, VIDIOC_QBUF, &q).unwrap();
        assert_ne!(b.flags & BUF_FLAG_QUEUED, 0);
    }
    g.ioctl_void(s, VIDIOC_STREAMON, &BUF_TYPE_VIDEO_CAPTURE)
        .unwrap();
    assert!(g.pump_until(|g| !g.dqbufs.is_empty()));
    let d = g.dqbufs.pop_front().unwrap();
    assert_eq!((d.session, d.buffer.memory), (s, MEMORY_MMAP));
    assert_eq!(d.buffer.bytesused, pix.sizeimage);
    g.ioctl_void(s, VIDIOC_STREAMOFF, &BUF_TYPE_VIDEO_CAPTURE)
        .unwrap();
    assert!(g.error_events.is_empty());
    g.close(s);
    assert_eq!(g.dev.runner().session_count(), 0);
}

#[test]
fn malformed_input_gets_error_responses() {
    use V4l2Ioctl::*;
    let mut g = camera_guest();
    let s = g.open();
    let einval = libc::EINVAL as u32;
    let enotty = libc::ENOTTY as u32;
    let status = |r: &[u8]| RespHeader::read_from_prefix(r).unwrap().0.status;

    // Short header.
    let r = g.raw(&[1, 0, 0], 64);
    assert_eq!(status(&r), einval);
    // Unknown command.
    let r = g.raw(
        CmdHeader {
            cmd: 99,
            reserved: 0,
        }
        .as_bytes(),
        64,
    );
    assert_eq!(status(&r), enotty);
    // Truncated command bodies.
    for cmd in [MediaCmd::Ioctl, MediaCmd::Mmap, MediaCmd::Munmap] {
        let mut req = bytes_of(&CmdHeader::new(cmd));
        req.extend_from_slice(&[0, 0]);
        assert_eq!(status(&g.raw(&req, 64)), einval, "{cmd:?}");
    }
    // Unknown session.
    let (st, _) = g.ioctl_raw(
        77,
        VIDIOC_G_FMT.nr().into(),
        fmt_req(0, 0, 0).as_bytes(),
        4096,
    );
    assert_eq!(st, einval);
    assert_eq!(g.mmap(77, 0), Err(einval));
    g.close(77);
    // Bad ioctl codes: unknown number, out of range, a wrong full request code.
    for code in [3u32, 0x1ff, 0xc0d0_5605 ^ 0x0100_0000] {
        assert_eq!(g.ioctl_raw(s, code, &[], 4096).0, enotty, "{code:#x}");
    }
    // Ioctls the driver answers itself.
    for ioctl in [
        VIDIOC_QUERYCAP,
        VIDIOC_DQEVENT,
        VIDIOC_G_PRIORITY,
        VIDIOC_EXPBUF,
    ] {
        assert_eq!(
            g.ioctl_raw(s, ioctl.nr().into(), &[0; 256], 4096).0,
            enotty,
            "{ioctl}"
        );
    }
    // Truncated payload.
    assert_eq!(
        g.ioctl_raw(s, VIDIOC_G_FMT.nr().into(), &[1, 0, 0, 0, 0], 4096)
            .0,
        einval
    );
    // Invalid buffer type.
    assert_eq!(
        g.ioctl::<_, V4l2Format>(s, VIDIOC_G_FMT, &fmt_req(0, 0, 0).tap(|f| f.type_ = 0)),
        Err(einval)
    );
    // A response buffer too small for the answer: the device answers ENOSPC.
    let (st, out) = g.ioctl_raw(s, VIDIOC_G_FMT.nr().into(), fmt_req(0, 0, 0).as_bytes(), 64);
    assert_eq!((st, out.len()), (libc::ENOSPC as u32, 0));
    // No writable part at all: the chain comes back empty.
    let mut req = bytes_of(&CmdHeader::new(MediaCmd::Open));
    req.truncate(8);
    assert!(g.raw(&req, 0).is_empty());
    // ... and no session was opened that the driver cannot know about.
    assert_eq!(g.raw(&req, 12).len(), 8);
    assert_eq!(g.dev.runner().session_count(), 1);

    // USERPTR: SG lists outside guest memory, overflowing, with zero lengths, too long,
    // or missing.
    let req = V4l2Requestbuffers {
        count: 2,
        type_: BUF_TYPE_VIDEO_CAPTURE,
        memory: MEMORY_USERPTR,
        ..Default::default()
    };
    g.ioctl::<_, V4l2Requestbuffers>(s, VIDIOC_REQBUFS, &req)
        .unwrap();
    let len = 640 * 480 * 2;
    let outside = [SgEntry {
        start: 0x7_0000_0000,
        len,
        reserved: 0,
    }];
    assert_eq!(
        qbuf_userptr(&mut g, s, 0, len, &outside).0,
        libc::EFAULT as u32
    );
    let overflow = [SgEntry {
        start: u64::MAX - 10,
        len,
        reserved: 0,
    }];
    assert_eq!(qbuf_userptr(&mut g, s, 0, len, &overflow).0, einval);
    let zero = [SgEntry {
        start: 0x100_0000,
        len: 0,
        reserved: 0,
    }];
    assert_eq!(qbuf_userptr(&mut g, s, 0, len, &zero).0, einval);
    let tiny: Vec<SgEntry> = (0..2000)
        .map(|i| SgEntry {
            start: 0x100_0000 + i * 8,
            len: 8,
            reserved: 0,
        })
        .collect();
    assert_eq!(qbuf_userptr(&mut g, s, 0, len, &tiny).0, einval);
    assert_eq!(qbuf_userptr(&mut g, s, 0, len, &[]).0, einval);
    assert_eq!(
        qbuf_userptr(&mut g, s, 0, 16, &scattered_sg(0x100_0000, 16)).0,
        einval
    );
    assert_eq!(
        qbuf_userptr(&mut g, s, 9, len, &scattered_sg(0x100_0000, len)).0,
        einval
    );
    // Multi-planar buffers with too many planes.
    let b = V4l2Buffer {
        type_: BUF_TYPE_VIDEO_CAPTURE_MPLANE,
        length: 9,
        ..Default::default()
    };
    assert_eq!(g.ioctl::<_, V4l2Buffer>(s, VIDIOC_QBUF, &b), Err(einval));
    // MUNMAP of an address never mapped; REQBUFS with a bogus memory type.
    assert_eq!(g.munmap(0x1234_5000), einval);
    let bogus = V4l2Requestbuffers {
        count: 2,
        type_: BUF_TYPE_VIDEO_CAPTURE,
        memory: 77,
        ..Default::default()
    };
    assert_eq!(
        g.ioctl::<_, V4l2Requestbuffers>(s, VIDIOC_REQBUFS, &bogus),
        Err(einval)
    );
    assert_eq!(
        g.ioctl_void(s, VIDIOC_STREAMON, &BUF_TYPE_VIDEO_OUTPUT),
        Err(einval)
    );

    // The runner still serves: a well-formed ioctl works, a new session opens.
    let f: V4l2Format = g.ioctl(s, VIDIOC_G_FMT, &fmt_req(0, 0, 0)).unwrap();
    assert_eq!(f.pix().pixelformat, PIX_FMT_YUYV);
    assert_eq!(g.open(), 1);
    assert!(g.error_events.is_empty());
}

trait Tap: Sized {
    fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }
}
impl<T> Tap for T {}

/// `n` rounded up to a whole number of 4 KiB pages.
fn page_round(n: u32) -> u64 {
    u64::from(n).div_ceil(4096) * 4096
}
