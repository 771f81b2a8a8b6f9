//! Hostile guests against the virtio-media caps (DESIGN.md, "Hostile-input rules"): a
//! guest that opens sessions, maps buffers, allocates buffers, sends SG lists or lets
//! events pile up without end hits a cap and gets the errno a V4L2 driver would return,
//! the daemon's fd table and memory stay as they were, and the guest's other sessions
//! keep working. Each test failed before the caps existed (nothing was refused, the
//! fd count and the pending events grew).
//!
//! The tests drive the runner and the software camera through the simulated guest
//! driver of `outboard_tests::media`; the last one drives the session cap through the
//! vhost-user daemon (`serve_camera_with`), as `outboard media --max-sessions` does.
//! They run one at a time (fd counts are per process).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Mutex, MutexGuard};

use outboard_devices::media::camera::{
    SoftwareCamera, DEVICE_CAPS, DEVICE_CAPS_MPLANE, MAX_BUFFERS, MAX_SESSION_BUFFER_BYTES,
};
use outboard_devices::media::ioctl::MAX_SG_ENTRIES;
use outboard_devices::media::runner::DEFAULT_MAX_SESSIONS;
use outboard_devices::media::v4l2::*;
use outboard_devices::media::{
    EventBuffer, GuestMemoryRegions, MediaMetricsSnapshot, MAX_MAPPINGS,
    MAX_SESSION_PENDING_V4L2_EVENTS,
};
use outboard_protocol::media::{CmdHeader, MediaCmd, MediaConfig, RespHeader, SgEntry};
use outboard_protocol::v4l2::V4l2Ioctl;
use outboard_tests::media::{bytes_of, scattered_sg};
use zerocopy::{FromBytes, IntoBytes};

type Camera = SoftwareCamera<EventBuffer, outboard_tests::media::TestShm, GuestMemoryRegions>;
type MediaGuest = outboard_tests::media::MediaGuest<Camera>;

static SERIAL: Mutex<()> = Mutex::new(());

/// One test at a time: they count the process's fds.
fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn camera_guest() -> MediaGuest {
    MediaGuest::new(
        MediaConfig::new(DEVICE_CAPS, 0, "camera"),
        SoftwareCamera::new,
    )
}

fn mplane_camera_guest() -> MediaGuest {
    MediaGuest::new(
        MediaConfig::new(DEVICE_CAPS_MPLANE, 0, "camera"),
        SoftwareCamera::new_mplane,
    )
}

fn metrics(g: &MediaGuest) -> MediaMetricsSnapshot {
    g.dev.metrics().snapshot()
}

/// Entries of the daemon's (this process's) fd table.
fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Raises the soft fd limit to the hard one: the test shared memory region keeps a
/// duplicate of every mapped fd, as a front-end does.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit on the stack.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
}

fn fmt_type(g: &mut MediaGuest, s: u32, type_: u32) -> Result<V4l2Format, u32> {
    g.ioctl(
        s,
        V4l2Ioctl::VIDIOC_G_FMT,
        &V4l2Format {
            type_,
            ..Default::default()
        },
    )
}

/// A session that works: G_FMT answers.
fn works(g: &mut MediaGuest, s: u32) {
    fmt_type(g, s, BUF_TYPE_VIDEO_CAPTURE).unwrap();
}

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

fn create_bufs(g: &mut MediaGuest, s: u32, count: u32, sizeimage: u32) -> Result<u32, u32> {
    let mut format = fmt_type(g, s, BUF_TYPE_VIDEO_CAPTURE)?;
    let mut pix = format.pix();
    pix.sizeimage = sizeimage;
    format.set_pix(&pix);
    let c = V4l2CreateBuffers {
        count,
        memory: MEMORY_MMAP,
        format,
        ..Default::default()
    };
    g.ioctl::<_, V4l2CreateBuffers>(s, V4l2Ioctl::VIDIOC_CREATE_BUFS, &c)
        .map(|c| c.count)
}

fn qbuf_userptr(g: &mut MediaGuest, s: u32, index: u32, len: u32, sgs: &[SgEntry]) -> u32 {
    let b = V4l2Buffer {
        index,
        type_: BUF_TYPE_VIDEO_CAPTURE,
        memory: MEMORY_USERPTR,
        m: 0xdead_0000,
        length: len,
        ..Default::default()
    };
    let mut payload = bytes_of(&b);
    for sg in sgs {
        payload.extend_from_slice(sg.as_bytes());
    }
    g.ioctl_raw(s, V4l2Ioctl::VIDIOC_QBUF.nr().into(), &payload, 4096)
        .0
}

/// `n` SG entries of one page each, all at the same guest page: a list that costs the
/// guest nothing and the device one entry each.
fn aliased_sg(n: usize) -> Vec<SgEntry> {
    vec![
        SgEntry {
            start: 0x40_0000,
            len: 4096,
            reserved: 0,
        };
        n
    ]
}

/// Streams one frame on `s` (MMAP buffer `index` queued): the session works.
fn capture_one(g: &mut MediaGuest, s: u32, index: u32) {
    use V4l2Ioctl::*;
    let q = V4l2Buffer {
        index,
        type_: BUF_TYPE_VIDEO_CAPTURE,
        memory: MEMORY_MMAP,
        ..Default::default()
    };
    g.ioctl::<_, V4l2Buffer>(s, VIDIOC_QBUF, &q).unwrap();
    g.ioctl_void(s, VIDIOC_STREAMON, &BUF_TYPE_VIDEO_CAPTURE)
        .unwrap();
    assert!(g.pump_until(|g| g.dqbufs.iter().any(|d| d.session == s)));
    g.dqbufs.clear();
    g.ioctl_void(s, VIDIOC_STREAMOFF, &BUF_TYPE_VIDEO_CAPTURE)
        .unwrap();
}

#[test]
fn opens_beyond_the_session_cap_are_refused_with_enfile_and_cost_no_fd() {
    let _serial = serial();
    let mut g = camera_guest();
    let sessions: Vec<u32> = (0..DEFAULT_MAX_SESSIONS).map(|_| g.open()).collect();
    let fds = fd_count();
    for _ in 0..1000 {
        let r = g.raw(CmdHeader::new(MediaCmd::Open).as_bytes(), 64);
        // An error response: the header alone, with the errno of "too many open files".
        assert_eq!(r.len(), 8);
        let status = RespHeader::read_from_bytes(&r).unwrap().status;
        assert_eq!(status, libc::ENFILE as u32);
    }
    assert_eq!(fd_count(), fds, "refused OPENs must not hold fds");
    assert_eq!(g.dev.runner().session_count(), DEFAULT_MAX_SESSIONS);
    assert_eq!(metrics(&g).err_session_limit, 1000);
    for s in &sessions {
        works(&mut g, *s);
    }
    // Closing a session frees its slot (and its id, which is recycled).
    g.close(sessions[5]);
    assert_eq!(g.open(), sessions[5]);
    let r = g.raw(CmdHeader::new(MediaCmd::Open).as_bytes(), 64);
    assert_eq!(
        RespHeader::read_from_prefix(&r).unwrap().0.status,
        libc::ENFILE as u32
    );
    assert_eq!(fd_count(), fds);
    let m = metrics(&g);
    assert_eq!(
        (m.sessions_opened, m.sessions_closed, m.err_session_limit),
        (DEFAULT_MAX_SESSIONS as u64 + 1, 1, 1001)
    );
}

#[test]
fn mappings_beyond_the_cap_are_refused_with_enomem() {
    let _serial = serial();
    raise_nofile();
    let mut g = camera_guest();
    let s = g.open();
    let other = g.open();
    assert_eq!(
        reqbufs(&mut g, s, BUF_TYPE_VIDEO_CAPTURE, MEMORY_MMAP, 2),
        Ok(2)
    );
    let q = V4l2Buffer {
        index: 0,
        type_: BUF_TYPE_VIDEO_CAPTURE,
        ..Default::default()
    };
    let b: V4l2Buffer = g.ioctl(s, V4l2Ioctl::VIDIOC_QUERYBUF, &q).unwrap();
    let mut maps = Vec::new();
    for _ in 0..MAX_MAPPINGS {
        maps.push(g.mmap(s, b.mem_offset()).unwrap().0);
    }
    assert_eq!(g.shm.count(), MAX_MAPPINGS);
    for _ in 0..100 {
        assert_eq!(g.mmap(s, b.mem_offset()), Err(libc::ENOMEM as u32));
    }
    assert_eq!(g.shm.count(), MAX_MAPPINGS);
    assert_eq!(metrics(&g).err_mapping_limit, 100);
    // The sessions keep working; an unmap frees a slot.
    works(&mut g, other);
    capture_one(&mut g, s, 1);
    assert_eq!(g.munmap(maps.pop().unwrap()), 0);
    maps.push(g.mmap(s, b.mem_offset()).unwrap().0);
    for m in maps {
        assert_eq!(g.munmap(m), 0);
    }
    assert_eq!(g.shm.count(), 0);
}

#[test]
fn buffers_beyond_the_session_cap_are_refused_with_enobufs() {
    let _serial = serial();
    let mut g = camera_guest();
    let s = g.open();
    let other = g.open();
    // REQBUFS is cut down to the cap, as vb2 does; CREATE_BUFS beyond it is refused.
    assert_eq!(
        reqbufs(&mut g, s, BUF_TYPE_VIDEO_CAPTURE, MEMORY_MMAP, 100_000),
        Ok(MAX_BUFFERS)
    );
    let size = fmt_type(&mut g, s, BUF_TYPE_VIDEO_CAPTURE)
        .unwrap()
        .pix()
        .sizeimage;
    assert_eq!(create_bufs(&mut g, s, 1, size), Err(libc::ENOBUFS as u32));
    // A CREATE_BUFS of no buffers only asks.
    assert_eq!(create_bufs(&mut g, s, 0, size), Ok(0));
    assert_eq!(metrics(&g).err_buffer_limit, 2);
    works(&mut g, other);
    capture_one(&mut g, s, 31);
}

#[test]
fn buffer_memory_beyond_the_session_cap_is_refused_with_enomem() {
    let _serial = serial();
    let mut g = camera_guest();
    let s = g.open();
    let other = g.open();
    let fds = fd_count();
    // 64 MiB buffers: only a quarter of a full queue fits in the byte cap.
    let big = 64 << 20;
    let fit = (MAX_SESSION_BUFFER_BYTES / u64::from(big)) as u32;
    assert_eq!(create_bufs(&mut g, s, MAX_BUFFERS, big), Ok(fit));
    assert_eq!(fd_count(), fds + fit as usize, "one memfd per buffer");
    assert_eq!(create_bufs(&mut g, s, 1, big), Err(libc::ENOMEM as u32));
    assert_eq!(fd_count(), fds + fit as usize);
    assert_eq!(metrics(&g).err_buffer_limit, 2);
    works(&mut g, other);
    capture_one(&mut g, s, 0);
    // Freeing the buffers gives the memory back.
    assert_eq!(
        reqbufs(&mut g, s, BUF_TYPE_VIDEO_CAPTURE, MEMORY_MMAP, 0),
        Ok(0)
    );
    assert_eq!(fd_count(), fds);
    assert_eq!(create_bufs(&mut g, s, 1, big), Ok(1));
}

#[test]
fn sg_lists_beyond_the_entry_cap_are_refused_with_enomem() {
    let _serial = serial();
    let mut g = camera_guest();
    let s = g.open();
    let other = g.open();
    assert_eq!(
        reqbufs(&mut g, s, BUF_TYPE_VIDEO_CAPTURE, MEMORY_USERPTR, 2),
        Ok(2)
    );
    // 80 MiB in pages: a list consistent with its length, but longer than the cap.
    let len = 80 << 20;
    let n = len as usize / 4096;
    assert!(n > MAX_SG_ENTRIES);
    assert_eq!(
        qbuf_userptr(&mut g, s, 0, len, &aliased_sg(n)),
        libc::ENOMEM as u32
    );
    assert_eq!(metrics(&g).err_sg_limit, 1);
    // At the cap it is accepted (a 64 MiB buffer given page by page).
    let len = (MAX_SG_ENTRIES * 4096) as u32;
    assert_eq!(
        qbuf_userptr(&mut g, s, 0, len, &aliased_sg(MAX_SG_ENTRIES)),
        0
    );
    // A real buffer still goes through, and the other session works.
    let size = fmt_type(&mut g, s, BUF_TYPE_VIDEO_CAPTURE)
        .unwrap()
        .pix()
        .sizeimage;
    assert_eq!(
        qbuf_userptr(&mut g, s, 1, size, &scattered_sg(0x80_0000, size)),
        0
    );
    works(&mut g, other);
}

#[test]
fn sg_entries_are_capped_per_command_across_planes() {
    use V4l2Ioctl::*;
    let _serial = serial();
    let mut g = mplane_camera_guest();
    let s = g.open();
    let other = g.open();
    let mp = V4l2PixFormatMplane {
        width: 320,
        height: 240,
        pixelformat: PIX_FMT_YUV420M,
        ..Default::default()
    };
    let set = V4l2Format::from_pix_mp(BUF_TYPE_VIDEO_CAPTURE_MPLANE, &mp);
    g.ioctl::<_, V4l2Format>(s, VIDIOC_S_FMT, &set).unwrap();
    assert_eq!(
        reqbufs(&mut g, s, BUF_TYPE_VIDEO_CAPTURE_MPLANE, MEMORY_USERPTR, 1),
        Ok(1)
    );
    // Three planes of 32 MiB, each list within the cap, together beyond it.
    let plane_len = 32u32 << 20;
    let per_plane = plane_len as usize / 4096;
    assert!(per_plane < MAX_SG_ENTRIES && 3 * per_plane > MAX_SG_ENTRIES);
    let b = V4l2Buffer {
        index: 0,
        type_: BUF_TYPE_VIDEO_CAPTURE_MPLANE,
        memory: MEMORY_USERPTR,
        length: 3,
        ..Default::default()
    };
    let mut payload = bytes_of(&b);
    for i in 0..3 {
        let p = V4l2Plane {
            length: plane_len,
            m: 0xbeef_0000 + i,
            ..Default::default()
        };
        payload.extend_from_slice(p.as_bytes());
    }
    for _ in 0..3 {
        for sg in aliased_sg(per_plane) {
            payload.extend_from_slice(sg.as_bytes());
        }
    }
    let (status, _) = g.ioctl_raw(s, VIDIOC_QBUF.nr().into(), &payload, 4096);
    assert_eq!(status, libc::ENOMEM as u32);
    assert_eq!(metrics(&g).err_sg_limit, 1);
    let got = g
        .ioctl::<_, V4l2Format>(
            other,
            VIDIOC_G_FMT,
            &V4l2Format {
                type_: BUF_TYPE_VIDEO_CAPTURE_MPLANE,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(got.pix_mp().pixelformat, PIX_FMT_YUV420M);
}

/// The value and `changes` of a control event.
fn ctrl_event(ev: &V4l2Event) -> (u32, i32) {
    let changes = u32::from_ne_bytes(ev.u[0..4].try_into().unwrap());
    let value = i32::from_ne_bytes(ev.u[8..12].try_into().unwrap());
    (changes, value)
}

#[test]
fn v4l2_events_a_session_never_reads_are_bounded() {
    use V4l2Ioctl::*;
    let _serial = serial();
    let mut g = camera_guest();
    let s = g.open();
    let other = g.open();
    for (session, id) in [(s, CID_BRIGHTNESS), (s, CID_HFLIP), (other, CID_CONTRAST)] {
        let sub = V4l2EventSubscription {
            type_: EVENT_CTRL,
            id,
            ..Default::default()
        };
        g.ioctl_void(session, VIDIOC_SUBSCRIBE_EVENT, &sub).unwrap();
    }
    // The driver takes no events meanwhile: the event queue's 16 buffers fill up, the
    // rest waits in the device.
    let set = |g: &mut MediaGuest, session, id, value| {
        g.ioctl::<_, V4l2Control>(session, VIDIOC_S_CTRL, &V4l2Control { id, value })
            .unwrap();
    };
    for i in 0..5000 {
        set(&mut g, s, CID_BRIGHTNESS, 10 + i % 2);
    }
    set(&mut g, s, CID_HFLIP, 1);
    set(&mut g, s, CID_BRIGHTNESS, 77);
    set(&mut g, other, CID_CONTRAST, 99);
    // 16 events went out; the device holds the session's cap and the other's event.
    assert_eq!(g.dev.pending_events(), MAX_SESSION_PENDING_V4L2_EVENTS + 1);
    let m = metrics(&g);
    assert_eq!(
        m.events_coalesced + m.events_dropped,
        5002 - 16 - MAX_SESSION_PENDING_V4L2_EVENTS as u64
    );
    // Now it reads: the other session's event and the last values arrive.
    let found = |g: &MediaGuest, session, id, value| {
        g.v4l2_events
            .iter()
            .any(|(es, ev)| *es == session && ev.id == id && ctrl_event(ev).1 == value)
    };
    assert!(g.pump_until(|g| found(g, other, CID_CONTRAST, 99)
        && found(g, s, CID_BRIGHTNESS, 77)
        && found(g, s, CID_HFLIP, 1)));
    // Let anything still pending arrive: pump until nothing new comes for 20 rounds.
    let (mut seen, mut quiet) = (0, 0);
    g.pump_until(|g| {
        quiet = if g.v4l2_events.len() == seen {
            quiet + 1
        } else {
            0
        };
        seen = g.v4l2_events.len();
        quiet >= 20
    });
    let of_s = g.v4l2_events.iter().filter(|(es, _)| *es == s).count();
    assert!(
        of_s <= 16 + MAX_SESSION_PENDING_V4L2_EVENTS,
        "{of_s} events for a session that did not read them"
    );
    let (_, last) = g
        .v4l2_events
        .iter()
        .rev()
        .find(|(es, ev)| *es == s && ev.id == CID_BRIGHTNESS)
        .unwrap();
    assert_eq!(ctrl_event(last).1, 77);
    works(&mut g, other);
}

#[test]
fn the_daemon_refuses_opens_beyond_its_configured_session_cap() {
    use outboard_devices::media::runner::MaxSessions;
    use outboard_protocol::media::{CloseCmd, OpenResp};
    use outboard_tests::media::vhost::VhostMediaDriver;
    use outboard_vmm_glue::vhost_user::media::serve_camera_with;
    use std::os::unix::net::UnixListener;
    use std::sync::Arc;
    use vmm_sys_util::eventfd::EventFd;

    let _serial = serial();
    let dir = outboard_tests::temp_dir("media-session-cap");
    let sock = dir.join("media.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let stop = Arc::new(EventFd::new(0).unwrap());
    let worker_stop = stop.clone();
    let cap = MaxSessions::new(4).unwrap();
    let worker = std::thread::spawn(move || {
        serve_camera_with(listener, 16 << 20, false, cap, &worker_stop, "cap-test").unwrap()
    });
    let mut driver = VhostMediaDriver::connect(&sock);
    let open = |driver: &mut VhostMediaDriver| {
        let r = driver.command(CmdHeader::new(MediaCmd::Open).as_bytes(), 64);
        match OpenResp::read_from_bytes(&r) {
            Ok(o) if o.hdr.status == 0 => Ok(o.session_id),
            _ => Err(RespHeader::read_from_bytes(&r).unwrap().status),
        }
    };
    let sessions: Vec<u32> = (0..4).map(|_| open(&mut driver).unwrap()).collect();
    let fds = fd_count();
    for _ in 0..200 {
        assert_eq!(open(&mut driver), Err(libc::ENFILE as u32));
    }
    assert_eq!(fd_count(), fds, "refused OPENs must not hold fds");
    let mut close = CmdHeader::new(MediaCmd::Close).as_bytes().to_vec();
    close.extend_from_slice(
        CloseCmd {
            session_id: sessions[2],
            reserved: 0,
        }
        .as_bytes(),
    );
    assert!(driver.command(&close, 16).is_empty());
    assert_eq!(open(&mut driver), Ok(sessions[2]));
    assert_eq!(open(&mut driver), Err(libc::ENFILE as u32));
    driver.disconnect();
    stop.write(1).unwrap();
    worker.join().unwrap();
    drop(driver);
}
