//! `media-proxy-check [--outboard BIN] [/dev/videoN ...]`: drives Outboard's
//! virtio-media runner and V4L2 proxy over real V4L2 capture nodes with the simulated
//! guest driver, and prints one `media-e2e: ok|FAIL <check>` line per check and a final
//! `media-e2e: RESULT passed=N failed=M frames=F` line.
//!
//! With `--outboard BIN` it also runs `BIN media --v4l2-device <first node> --jail` and
//! drives it over vhost-user with our transport's `Frontend`: the config space, an MMAP
//! capture whose frames are read through the fds of `SHMEM_MAP`, and a clean SIGTERM.
//!
//! Built statically and run inside a QEMU guest with vivid loaded by
//! `cargo xtask media-e2e` (no host here has a V4L2 node). Without arguments it checks
//! every `/dev/video*` node whose name (sysfs) says it is a vivid capture node.
//!
//! Per node: enumeration and formats, controls (including extended controls) and a
//! control event, MMAP streaming (QUERYBUF, MMAP through the shared memory region, QBUF,
//! STREAMON, DQBUF events, frame checks, STREAMOFF, MUNMAP), the same with USERPTR
//! buffers given as scattered guest SG lists, and malformed commands, after which the
//! runner must still serve. Multi-planar nodes stream a two-plane format. Then what
//! virtio-media does not carry (DMABUF, requests, overlays, read/write I/O) must be
//! neither advertised nor reach the host, and a host node that goes away (vivid's
//! "Disconnect" control) must fail the session with one `ENODEV` error event.

// A check tool: a panic is a failed check (caught and reported per node).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use outboard_devices::media::proxy::{HostNode, V4l2Proxy};
use outboard_devices::media::v4l2::*;
use outboard_devices::media::{EventBuffer, GuestMemoryRegions};
use outboard_protocol::media::{CmdHeader, IoctlCmd, MediaCmd, MediaConfig, RespHeader, SgEntry};
use outboard_protocol::v4l2::V4l2Ioctl;
use outboard_tests::media::{bytes_of, scattered_sg, MediaGuest, TestShm, REGION_END};
use zerocopy::{FromBytes, IntoBytes};

type Proxy = V4l2Proxy<EventBuffer, TestShm, GuestMemoryRegions>;
type Guest = MediaGuest<Proxy>;

/// Frames each streaming run checks.
const FRAMES: usize = 6;
/// `V4L2_PIX_FMT_NV12M`: two planes.
const PIX_FMT_NV12M: u32 = fourcc(b"NM12");
/// `V4L2_EVENT_SUB_FL_SEND_INITIAL`.
const SUB_FL_SEND_INITIAL: u32 = 1;
/// `V4L2_EVENT_SUB_FL_ALLOW_FEEDBACK`: changes this file handle makes are reported too.
const SUB_FL_ALLOW_FEEDBACK: u32 = 2;
/// vivid's "Disconnect" button (`VIVID_CID_VIVID_BASE + 65`): unregisters the node
/// until its last user closes it.
const VIVID_CID_DISCONNECT: u32 = 0x00f0_f000 + 65;
/// `V4L2_BUF_TYPE_VIDEO_OVERLAY`.
const BUF_TYPE_VIDEO_OVERLAY: u32 = 3;
/// `V4L2_CAP_VIDEO_OVERLAY`, `V4L2_CAP_VIDEO_OUTPUT_OVERLAY`, `V4L2_CAP_READWRITE`.
const CAPS_NOT_CARRIED: u32 = 0x4 | 0x200 | 0x0100_0000;
/// `V4L2_BUF_CAP_SUPPORTS_REQUESTS`.
const BUF_CAP_SUPPORTS_REQUESTS: u32 = 1 << 3;
/// `V4L2_BUF_FLAG_REQUEST_FD`.
const BUF_FLAG_REQUEST_FD: u32 = 0x0080_0000;

#[derive(Default)]
struct Report {
    passed: usize,
    failed: usize,
    frames: usize,
}

impl Report {
    fn check(&mut self, name: &str, ok: bool, detail: impl std::fmt::Display) {
        if ok {
            self.passed += 1;
            println!("media-e2e: ok {name}");
        } else {
            self.failed += 1;
            println!("media-e2e: FAIL {name}: {detail}");
        }
    }
}

/// The format a node streams: (fourcc, width, height, per-plane sizeimage).
#[derive(Debug, Clone)]
struct Layout {
    fourcc: u32,
    width: u32,
    height: u32,
    sizes: Vec<u32>,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// A format request (single- or multi-planar `fmt` union).
fn fmt_req(buf_type: u32, fourcc: u32, w: u32, h: u32) -> V4l2Format {
    let mut f = V4l2Format {
        type_: buf_type,
        ..Default::default()
    };
    put_u32(&mut f.fmt, 0, w);
    put_u32(&mut f.fmt, 4, h);
    put_u32(&mut f.fmt, 8, fourcc);
    f
}

/// Reads the layout of a format answer.
fn layout(f: &V4l2Format) -> Layout {
    let (w, h, fourcc) = (u32_at(&f.fmt, 0), u32_at(&f.fmt, 4), u32_at(&f.fmt, 8));
    let sizes = if is_multiplanar(f.type_) {
        // v4l2_pix_format_mplane: plane_fmt[8] of 20 bytes at 20, num_planes at 180.
        let n = usize::from(f.fmt[180]).min(VIDEO_MAX_PLANES);
        (0..n).map(|i| u32_at(&f.fmt, 20 + 20 * i)).collect()
    } else {
        vec![f.pix().sizeimage]
    };
    Layout {
        fourcc,
        width: w,
        height: h,
        sizes,
    }
}

fn node_paths(args: Vec<PathBuf>) -> Vec<PathBuf> {
    if !args.is_empty() {
        return args;
    }
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/sys/class/video4linux") {
        for e in dir.flatten() {
            let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
            if name.starts_with("vivid") && name.trim_end().ends_with("vid-cap") {
                out.push(Path::new("/dev").join(e.file_name()));
            }
        }
    }
    out.sort();
    out
}

/// Prints the proxy's warnings on stderr (the guest console).
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Info
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            eprintln!("media-proxy-check: {} {}", r.level(), r.args());
        }
    }
    fn flush(&self) {}
}

fn main() -> std::process::ExitCode {
    let _ = log::set_logger(&StderrLog);
    log::set_max_level(log::LevelFilter::Info);
    let mut report = Report::default();
    let mut args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let outboard = match args.iter().position(|a| a.as_os_str() == "--outboard") {
        Some(i) if i + 1 < args.len() => {
            let bin = args.remove(i + 1);
            args.remove(i);
            Some(bin)
        }
        _ => None,
    };
    let nodes = node_paths(args);
    report.check(
        "vivid capture nodes found",
        !nodes.is_empty(),
        "no /dev/video* vivid capture node",
    );
    for node in &nodes {
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| check_node(node, &mut report)));
        if let Err(p) = r {
            let why = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            report.check(&format!("{}: no panic", node.display()), false, why);
        }
    }
    if let (Some(bin), Some(node)) = (&outboard, nodes.first()) {
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
            check_outboard_jailed(bin, node, &mut report)
        }));
        if let Err(p) = r {
            let why = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            report.check("outboard --jail: no panic", false, why);
        }
    }
    println!(
        "media-e2e: RESULT passed={} failed={} frames={}",
        report.passed, report.failed, report.frames
    );
    if report.failed == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

fn check_node(path: &Path, report: &mut Report) {
    let tag = path.display().to_string();
    let node = HostNode::probe(path).unwrap();
    println!(
        "media-e2e: node {tag}: driver {} card {:?} device_caps {:#x}",
        node.driver, node.card, node.device_caps
    );
    let mplane = node.device_caps & CAP_VIDEO_CAPTURE_MPLANE != 0;
    let buf_type = if mplane {
        BUF_TYPE_VIDEO_CAPTURE_MPLANE
    } else {
        BUF_TYPE_VIDEO_CAPTURE
    };
    let config = MediaConfig::new(node.device_caps, 0, &node.card);
    let mut g: Guest = MediaGuest::new(config, |ev, shm, guest| {
        V4l2Proxy::new(node.clone(), ev, shm, guest)
    });
    let s = g.open();

    let l = configure(&mut g, s, buf_type, mplane, &tag, report);
    controls(&mut g, s, &tag, report);
    stream(&mut g, s, buf_type, &l, MEMORY_MMAP, &tag, report);
    stream(&mut g, s, buf_type, &l, MEMORY_USERPTR, &tag, report);
    malformed(&mut g, s, buf_type, &tag, report);
    driver_budget(&mut g, s, buf_type, &tag, report);
    not_carried(&mut g, s, buf_type, &node, &tag, report);
    g.close(s);
    report.check(
        &format!("{tag}: CLOSE releases the session and its mappings"),
        g.dev.runner().session_count() == 0 && g.shm.count() == 0,
        format!(
            "{} sessions, {} mappings",
            g.dev.runner().session_count(),
            g.shm.count()
        ),
    );
    disconnect(&mut g, path, &tag, report);
}

/// What virtio-media does not carry is neither advertised nor forwarded.
fn not_carried(
    g: &mut Guest,
    s: u32,
    buf_type: u32,
    node: &HostNode,
    tag: &str,
    report: &mut Report,
) {
    use V4l2Ioctl::*;
    report.check(
        &format!("{tag}: no overlay or read/write capability in the config space"),
        node.device_caps & CAPS_NOT_CARRIED == 0,
        format!("{:#x}", node.device_caps),
    );
    // vivid's first instance has an overlay: its window holds host-followed pointers.
    let overlay = g.ioctl::<_, V4l2Format>(
        s,
        VIDIOC_G_FMT,
        &V4l2Format {
            type_: BUF_TYPE_VIDEO_OVERLAY,
            ..Default::default()
        },
    );
    report.check(
        &format!("{tag}: overlay formats are refused"),
        overlay.err() == Some(libc::EINVAL as u32),
        format!("{overlay:?}"),
    );
    let parm = g
        .ioctl::<_, V4l2Streamparm>(
            s,
            VIDIOC_G_PARM,
            &V4l2Streamparm {
                type_: buf_type,
                ..Default::default()
            },
        )
        .unwrap();
    report.check(
        &format!("{tag}: G_PARM has no read buffers"),
        parm.capture().readbuffers == 0,
        format!("{:?}", parm.capture()),
    );
    let req = V4l2Requestbuffers {
        count: 1,
        type_: buf_type,
        memory: MEMORY_MMAP,
        ..Default::default()
    };
    let got = g
        .ioctl::<_, V4l2Requestbuffers>(s, VIDIOC_REQBUFS, &req)
        .unwrap();
    report.check(
        &format!("{tag}: REQBUFS advertises neither DMABUF nor requests"),
        got.capabilities & BUF_CAP_SUPPORTS_MMAP != 0
            && got.capabilities & (BUF_CAP_SUPPORTS_DMABUF | BUF_CAP_SUPPORTS_REQUESTS) == 0,
        format!("{:#x}", got.capabilities),
    );
    let mplane = is_multiplanar(buf_type);
    let b = V4l2Buffer {
        index: 0,
        type_: buf_type,
        memory: MEMORY_MMAP,
        flags: BUF_FLAG_REQUEST_FD,
        // An fd number of this process: the host must never look it up.
        request_fd: 0,
        length: if mplane { 2 } else { 0 },
        ..Default::default()
    };
    let mut payload = bytes_of(&b);
    if mplane {
        for p in [V4l2Plane::default(); 2] {
            payload.extend_from_slice(p.as_bytes());
        }
    }
    let (status, _) = g.ioctl_raw(s, VIDIOC_QBUF.nr().into(), &payload, 4096);
    report.check(
        &format!("{tag}: QBUF with a request fd gets EBADR"),
        status == libc::EBADR as u32,
        status,
    );
    let hdr = V4l2ExtControls {
        which: CTRL_WHICH_REQUEST_VAL,
        ..Default::default()
    };
    let (status, _) = g.ioctl_raw(s, VIDIOC_G_EXT_CTRLS.nr().into(), &bytes_of(&hdr), 4096);
    report.check(
        &format!("{tag}: request control values get EINVAL"),
        status == libc::EINVAL as u32,
        status,
    );
    let free = V4l2Requestbuffers { count: 0, ..req };
    g.ioctl::<_, V4l2Requestbuffers>(s, VIDIOC_REQBUFS, &free)
        .unwrap();
}

/// vivid's "Disconnect": the session fails with one ENODEV error event, and the node
/// comes back once the session is closed.
fn disconnect(g: &mut Guest, path: &Path, tag: &str, report: &mut Report) {
    let s = g.open();
    let before = g.error_events.len();
    let set = g.ioctl_void(
        s,
        V4l2Ioctl::VIDIOC_S_CTRL,
        &V4l2Control {
            id: VIVID_CID_DISCONNECT,
            value: 0,
        },
    );
    let failed = g.pump_until(|g| g.error_events.len() > before);
    // The gone node polls ready forever: the session must not report it again.
    let again = g.pump_until(|g| g.error_events.len() > before + 1);
    report.check(
        &format!("{tag}: a host node that goes away fails the session once with ENODEV"),
        set.is_ok() && failed && !again && g.error_events[before..] == [(s, libc::ENODEV as u32)],
        format!(
            "S_CTRL {set:?}, error events {:?}",
            &g.error_events[before..]
        ),
    );
    g.close(s);
    let back = HostNode::probe(path);
    report.check(
        &format!("{tag}: the node is back once its last user closed it"),
        back.is_ok(),
        format!("{back:?}"),
    );
}

fn configure(
    g: &mut Guest,
    s: u32,
    buf_type: u32,
    mplane: bool,
    tag: &str,
    report: &mut Report,
) -> Layout {
    use V4l2Ioctl::*;
    let mut formats = Vec::new();
    for index in 0..256 {
        let q = V4l2Fmtdesc {
            index,
            type_: buf_type,
            ..Default::default()
        };
        match g.ioctl::<_, V4l2Fmtdesc>(s, VIDIOC_ENUM_FMT, &q) {
            Ok(d) => formats.push(d.pixelformat),
            Err(e) => {
                report.check(
                    &format!("{tag}: ENUM_FMT ends with EINVAL"),
                    e == libc::EINVAL as u32,
                    e,
                );
                break;
            }
        }
    }
    let want = if mplane { PIX_FMT_NV12M } else { PIX_FMT_YUYV };
    report.check(
        &format!("{tag}: ENUM_FMT lists YUYV and the streamed format"),
        formats.contains(&PIX_FMT_YUYV) && formats.contains(&want),
        format!("{} formats", formats.len()),
    );
    let q = V4l2Frmsizeenum {
        index: 0,
        pixel_format: want,
        ..Default::default()
    };
    let sizes = g.ioctl::<_, V4l2Frmsizeenum>(s, VIDIOC_ENUM_FRAMESIZES, &q);
    report.check(
        &format!("{tag}: ENUM_FRAMESIZES"),
        sizes.is_ok(),
        format!("{sizes:?}"),
    );
    let tried = g.ioctl::<_, V4l2Format>(s, VIDIOC_TRY_FMT, &fmt_req(buf_type, want, 320, 180));
    let set = g
        .ioctl::<_, V4l2Format>(s, VIDIOC_S_FMT, &fmt_req(buf_type, want, 320, 180))
        .unwrap();
    let got = g
        .ioctl::<_, V4l2Format>(s, VIDIOC_G_FMT, &fmt_req(buf_type, 0, 0, 0))
        .unwrap();
    let l = layout(&got);
    let planes = if mplane { 2 } else { 1 };
    report.check(
        &format!(
            "{tag}: S_FMT/G_FMT {}x{} with {planes} plane(s)",
            l.width, l.height
        ),
        tried.is_ok()
            && set == got
            && l.fourcc == want
            && (l.width, l.height) == (320, 180)
            && l.sizes.len() == planes
            && l.sizes.iter().all(|s| *s > 0),
        format!("{l:?}"),
    );
    let parm = g.ioctl::<_, V4l2Streamparm>(
        s,
        VIDIOC_G_PARM,
        &V4l2Streamparm {
            type_: buf_type,
            ..Default::default()
        },
    );
    report.check(&format!("{tag}: G_PARM"), parm.is_ok(), format!("{parm:?}"));
    let input = g.ioctl::<_, V4l2Input>(s, VIDIOC_ENUMINPUT, &V4l2Input::default());
    report.check(
        &format!("{tag}: ENUMINPUT 0"),
        input.is_ok(),
        format!("{input:?}"),
    );
    l
}

/// Sends `VIDIOC_{G,S}_EXT_CTRLS` with one control; returns (status, value).
fn ext_ctrl(g: &mut Guest, s: u32, ioctl: V4l2Ioctl, id: u32, value: i32) -> (u32, i32) {
    let hdr = V4l2ExtControls {
        which: CTRL_WHICH_CUR_VAL,
        count: 1,
        ..Default::default()
    };
    let mut c = V4l2ExtControl {
        id,
        ..Default::default()
    };
    c.set_value(value);
    let mut payload = bytes_of(&hdr);
    payload.extend_from_slice(c.as_bytes());
    let (status, out) = g.ioctl_raw(s, ioctl.nr().into(), &payload, 4096);
    let c = V4l2ExtControl::read_from_prefix(&out[size_of::<V4l2ExtControls>()..])
        .unwrap()
        .0;
    (status, c.value())
}

fn controls(g: &mut Guest, s: u32, tag: &str, report: &mut Report) {
    use V4l2Ioctl::*;
    // Enumerate every control; find vivid's "Horizontal Movement" menu.
    let mut id = CTRL_FLAG_NEXT_CTRL;
    let mut count = 0;
    let mut movement = None;
    while let Ok(q) = g.ioctl::<_, V4l2Queryctrl>(
        s,
        VIDIOC_QUERYCTRL,
        &V4l2Queryctrl {
            id,
            ..Default::default()
        },
    ) {
        count += 1;
        if q.name.starts_with(b"Horizontal Movement") {
            movement = Some(q);
        }
        id = q.id | CTRL_FLAG_NEXT_CTRL;
        if count > 1000 {
            break;
        }
    }
    report.check(
        &format!("{tag}: QUERYCTRL enumerates {count} controls"),
        count > 5 && movement.is_some(),
        "no Horizontal Movement control",
    );
    // A control event: the initial value on subscription, then a change.
    let sub = V4l2EventSubscription {
        type_: EVENT_CTRL,
        id: CID_BRIGHTNESS,
        flags: SUB_FL_SEND_INITIAL | SUB_FL_ALLOW_FEEDBACK,
        ..Default::default()
    };
    let subscribed = g.ioctl_void(s, VIDIOC_SUBSCRIBE_EVENT, &sub);
    let initial = g.pump_until(|g| !g.v4l2_events.is_empty());
    let first = g.v4l2_events.pop_front();
    let set = g.ioctl::<_, V4l2Control>(
        s,
        VIDIOC_S_CTRL,
        &V4l2Control {
            id: CID_BRIGHTNESS,
            value: 200,
        },
    );
    let changed = g.pump_until(|g| !g.v4l2_events.is_empty());
    let second = g.v4l2_events.pop_front();
    let value = second.map(|(_, e)| i32::from_le_bytes(e.u[8..12].try_into().unwrap()));
    report.check(
        &format!("{tag}: SUBSCRIBE_EVENT ctrl: initial and changed value as events"),
        subscribed.is_ok()
            && initial
            && first.is_some_and(|(sid, e)| {
                sid == s && e.type_ == EVENT_CTRL && e.id == CID_BRIGHTNESS
            })
            && set.is_ok()
            && changed
            && value == Some(200),
        format!(
            "subscribe {subscribed:?} initial {initial} {first:?} set {set:?} value {value:?}, error events {:?}",
            g.error_events
        ),
    );
    let got = g.ioctl::<_, V4l2Control>(
        s,
        VIDIOC_G_CTRL,
        &V4l2Control {
            id: CID_BRIGHTNESS,
            value: 0,
        },
    );
    report.check(
        &format!("{tag}: G_CTRL reads the value back"),
        got.is_ok_and(|c| c.value == 200),
        format!("{got:?}"),
    );
    let unsub = g.ioctl_void(s, VIDIOC_UNSUBSCRIBE_EVENT, &sub);
    report.check(
        &format!("{tag}: UNSUBSCRIBE_EVENT"),
        unsub.is_ok(),
        format!("{unsub:?}"),
    );
    // Moving pattern (extended controls), so that consecutive frames differ.
    if let Some(m) = movement {
        let (st, _) = ext_ctrl(g, s, VIDIOC_S_EXT_CTRLS, m.id, 0);
        let (gt, v) = ext_ctrl(g, s, VIDIOC_G_EXT_CTRLS, m.id, 99);
        report.check(
            &format!("{tag}: S_EXT_CTRLS/G_EXT_CTRLS round trip"),
            st == 0 && gt == 0 && v == 0,
            format!("status {st}/{gt} value {v}"),
        );
        let (bad, _) = ext_ctrl(g, s, VIDIOC_S_EXT_CTRLS, m.id, 1000);
        report.check(
            &format!("{tag}: S_EXT_CTRLS out of range gives the host's errno"),
            bad == libc::ERANGE as u32 || bad == libc::EINVAL as u32,
            bad,
        );
    }
}

/// Guest memory for USERPTR buffer `index`, plane `plane`: buffer 0 straddles the end
/// of the first guest memory region.
fn userptr_base(index: u32, plane: usize) -> u64 {
    REGION_END - (1 << 20) + u64::from(index) * (2 << 20) + plane as u64 * (1 << 20)
}

fn stream(
    g: &mut Guest,
    s: u32,
    buf_type: u32,
    l: &Layout,
    memory: u32,
    tag: &str,
    report: &mut Report,
) {
    use V4l2Ioctl::*;
    let mem_name = if memory == MEMORY_MMAP {
        "MMAP"
    } else {
        "USERPTR"
    };
    let tag = format!("{tag} {mem_name}");
    let mplane = is_multiplanar(buf_type);
    let req = V4l2Requestbuffers {
        count: 4,
        type_: buf_type,
        memory,
        ..Default::default()
    };
    let got = g.ioctl::<_, V4l2Requestbuffers>(s, VIDIOC_REQBUFS, &req);
    let count = got.map_or(0, |r| r.count);
    report.check(
        &format!("{tag}: REQBUFS"),
        (2..=32).contains(&count),
        format!("{got:?}"),
    );
    if count < 2 {
        return;
    }
    // Per buffer and plane: where the guest reads the frame (shm address or SG list).
    let mut maps: Vec<Vec<u64>> = Vec::new();
    let mut sgs: Vec<Vec<Vec<SgEntry>>> = Vec::new();
    for index in 0..count {
        if memory == MEMORY_MMAP {
            let b = V4l2Buffer {
                index,
                type_: buf_type,
                length: if mplane { VIDEO_MAX_PLANES as u32 } else { 0 },
                ..Default::default()
            };
            let (st, out) = g.ioctl_raw(s, VIDIOC_QUERYBUF.nr().into(), b.as_bytes(), 4096);
            assert_eq!(st, 0, "QUERYBUF {index}");
            let qb = V4l2Buffer::read_from_prefix(&out).unwrap().0;
            let offsets: Vec<(u32, u32)> = if mplane {
                (0..qb.length as usize)
                    .map(|i| {
                        let p = V4l2Plane::read_from_prefix(&out[88 + 64 * i..]).unwrap().0;
                        (p.m as u32, p.length)
                    })
                    .collect()
            } else {
                vec![(qb.mem_offset(), qb.length)]
            };
            let mut addrs = Vec::new();
            for (off, len) in offsets {
                let (addr, mlen) = g.mmap(s, off).unwrap();
                assert!(mlen >= u64::from(len), "mapping of {mlen} bytes for {len}");
                addrs.push(addr);
            }
            maps.push(addrs);
        } else {
            sgs.push(
                l.sizes
                    .iter()
                    .enumerate()
                    .map(|(p, size)| scattered_sg(userptr_base(index, p), *size))
                    .collect(),
            );
        }
    }
    if memory == MEMORY_MMAP {
        report.check(
            &format!(
                "{tag}: QUERYBUF + MMAP of {} planes",
                maps.iter().map(Vec::len).sum::<usize>()
            ),
            maps.iter().all(|m| m.len() == l.sizes.len()),
            "plane count",
        );
    }
    let qbuf = |g: &mut Guest, index: u32| -> u32 {
        let mut b = V4l2Buffer {
            index,
            type_: buf_type,
            memory,
            ..Default::default()
        };
        let mut payload = Vec::new();
        let mut planes = Vec::new();
        if mplane {
            b.length = l.sizes.len() as u32;
            for (p, size) in l.sizes.iter().enumerate() {
                planes.push(V4l2Plane {
                    length: *size,
                    m: if memory == MEMORY_USERPTR {
                        userptr_base(index, p)
                    } else {
                        0
                    },
                    ..Default::default()
                });
            }
        } else if memory == MEMORY_USERPTR {
            b.length = l.sizes[0];
            b.m = userptr_base(index, 0);
        }
        payload.extend_from_slice(b.as_bytes());
        for p in &planes {
            payload.extend_from_slice(p.as_bytes());
        }
        if memory == MEMORY_USERPTR {
            for sg in &sgs[index as usize] {
                g.fill_sg(sg, 0);
                for e in sg {
                    payload.extend_from_slice(e.as_bytes());
                }
            }
        }
        let (st, out) = g.ioctl_raw(s, VIDIOC_QBUF.nr().into(), &payload, 4096);
        if st == 0 && memory == MEMORY_USERPTR && !mplane {
            // The guest's own pointer comes back, never a host address.
            let back = V4l2Buffer::read_from_prefix(&out).unwrap().0;
            assert_eq!(
                back.m,
                userptr_base(index, 0),
                "QBUF answer leaks a pointer"
            );
        }
        st
    };
    // An index beyond the allocated buffers never reaches the host (nor allocates a
    // USERPTR shadow).
    let beyond = {
        let b = V4l2Buffer {
            index: count,
            type_: buf_type,
            memory,
            length: if mplane { 1 } else { 4096 },
            ..Default::default()
        };
        let mut payload = bytes_of(&b);
        if mplane {
            payload.extend_from_slice(
                V4l2Plane {
                    length: 4096,
                    ..Default::default()
                }
                .as_bytes(),
            );
        }
        if memory == MEMORY_USERPTR {
            payload.extend_from_slice(scattered_sg(userptr_base(0, 0), 4096)[0].as_bytes());
        }
        g.ioctl_raw(s, VIDIOC_QBUF.nr().into(), &payload, 4096).0
    };
    report.check(
        &format!("{tag}: QBUF of index {count} (not allocated) gets EINVAL"),
        beyond == libc::EINVAL as u32,
        beyond,
    );
    let queued: Vec<u32> = (0..count).map(|i| qbuf(g, i)).collect();
    report.check(
        &format!("{tag}: QBUF {count} buffers"),
        queued.iter().all(|st| *st == 0),
        format!("{queued:?}"),
    );
    // USERPTR: the host has the buffer's shadow pinned, which must not be replaced.
    let again = qbuf(g, 0);
    report.check(
        &format!("{tag}: QBUF of a queued buffer gets EINVAL"),
        again == libc::EINVAL as u32,
        again,
    );
    let on = g.ioctl_void(s, VIDIOC_STREAMON, &buf_type);
    report.check(&format!("{tag}: STREAMON"), on.is_ok(), format!("{on:?}"));

    let mut frames: Vec<(V4l2Buffer, Vec<Vec<u8>>)> = Vec::new();
    let mut problems = Vec::new();
    while frames.len() < FRAMES {
        if !g.pump_until(|g| !g.dqbufs.is_empty()) {
            problems.push(format!("no DQBUF event after {} frames", frames.len()));
            break;
        }
        let d = g.dqbufs.pop_front().unwrap();
        let b = d.buffer;
        if d.session != s {
            problems.push(format!("event for session {}", d.session));
        }
        let used: Vec<u32> = if mplane {
            d.planes.iter().map(|p| p.bytesused).collect()
        } else {
            vec![b.bytesused]
        };
        if used != l.sizes {
            problems.push(format!("bytesused {used:?} != sizeimage {:?}", l.sizes));
        }
        // Dequeued: neither queued nor done any more, and not in error.
        if b.flags & (BUF_FLAG_QUEUED | BUF_FLAG_DONE | BUF_FLAG_ERROR) != 0 {
            problems.push(format!("flags {:#x}", b.flags));
        }
        if memory == MEMORY_USERPTR {
            let m = if mplane {
                d.planes.first().map_or(0, |p| p.m)
            } else {
                b.m
            };
            if m != userptr_base(b.index, 0) {
                problems.push(format!("DQBUF user pointer {m:#x}"));
            }
        }
        let data: Vec<Vec<u8>> = (0..l.sizes.len())
            .map(|p| {
                if memory == MEMORY_MMAP {
                    g.shm.read(maps[b.index as usize][p], l.sizes[p] as usize)
                } else {
                    g.read_sg(&sgs[b.index as usize][p])
                }
            })
            .collect();
        frames.push((b, data));
        if qbuf(g, b.index) != 0 {
            problems.push(format!("re-QBUF {}", b.index));
        }
    }
    report.frames += frames.len();
    let increasing = frames.windows(2).all(|w| w[1].0.sequence > w[0].0.sequence);
    let nonzero = frames
        .iter()
        .all(|(_, d)| d.iter().all(|p| p.iter().any(|b| *b != 0)));
    let differ = frames.windows(2).all(|w| w[0].1 != w[1].1);
    report.check(
        &format!("{tag}: {} frames dequeued as events", frames.len()),
        frames.len() == FRAMES && problems.is_empty(),
        problems.join("; "),
    );
    report.check(
        &format!("{tag}: sequence numbers increase"),
        increasing,
        format!(
            "{:?}",
            frames.iter().map(|f| f.0.sequence).collect::<Vec<_>>()
        ),
    );
    report.check(
        &format!("{tag}: frame data is not all zero and changes between frames"),
        nonzero && differ,
        format!("nonzero {nonzero} differ {differ}"),
    );
    let off = g.ioctl_void(s, VIDIOC_STREAMOFF, &buf_type);
    // Nothing is dequeued after STREAMOFF.
    g.pump_until(|_| false);
    let late = g.dqbufs.len();
    g.dqbufs.clear();
    report.check(
        &format!("{tag}: STREAMOFF stops the events"),
        off.is_ok() && late <= count as usize,
        format!("{off:?}, {late} late events"),
    );
    g.dqbufs.clear();
    let mut unmapped = true;
    for addr in maps.iter().flatten() {
        unmapped &= g.munmap(*addr) == 0;
        unmapped &= g.munmap(*addr) == libc::EINVAL as u32;
    }
    let free = g.ioctl::<_, V4l2Requestbuffers>(
        s,
        VIDIOC_REQBUFS,
        &V4l2Requestbuffers {
            count: 0,
            type_: buf_type,
            memory,
            ..Default::default()
        },
    );
    report.check(
        &format!("{tag}: MUNMAP and REQBUFS(0)"),
        unmapped && free.is_ok() && g.shm.count() == 0,
        format!(
            "unmapped {unmapped} free {free:?} mappings {}",
            g.shm.count()
        ),
    );
}

/// The host driver's MMAP buffer memory is counted and bounded: REQBUFS and
/// CREATE_BUFS are charged what the driver allocates and given it back, and a
/// CREATE_BUFS whose buffers could never fit the budget (`MAX_DEVICE_DRIVER_BUFFERS`)
/// never reaches the driver. Before, the proxy forwarded 32 buffers of 4 GiB and the
/// guest's kernel vmalloc'd until its OOM killer ended the process (the `media_proxy`
/// fuzzer, on this very node).
fn driver_budget(g: &mut Guest, s: u32, buf_type: u32, tag: &str, report: &mut Report) {
    use V4l2Ioctl::*;
    let held = |g: &Guest| g.dev.runner().device().driver_bytes();
    let Ok(fmt) = g.ioctl::<_, V4l2Format>(s, VIDIOC_G_FMT, &fmt_req(buf_type, 0, 0, 0)) else {
        report.check(&format!("{tag}: driver budget: G_FMT"), false, "failed");
        return;
    };
    let per: usize = layout(&fmt)
        .sizes
        .iter()
        .map(|n| (*n as usize).div_ceil(4096) * 4096)
        .sum();
    let reqbufs = |g: &mut Guest, count: u32| {
        let req = V4l2Requestbuffers {
            count,
            type_: buf_type,
            memory: MEMORY_MMAP,
            ..Default::default()
        };
        g.ioctl::<_, V4l2Requestbuffers>(s, VIDIOC_REQBUFS, &req)
    };
    let got = reqbufs(g, 4);
    let n = got.as_ref().map_or(0, |r| r.count as usize);
    report.check(
        &format!("{tag}: driver budget: REQBUFS charges what vivid allocates"),
        n >= 1 && held(g) == n * per,
        format!("{got:?}, {} bytes held for buffers of {per}", held(g)),
    );
    let freed = reqbufs(g, 0);
    report.check(
        &format!("{tag}: driver budget: REQBUFS 0 gives it back"),
        freed.is_ok() && held(g) == 0,
        format!("{freed:?}, {} bytes held", held(g)),
    );
    // `sizeimage` of `v4l2_pix_format`, and of the first plane of
    // `v4l2_pix_format_mplane`: both at byte 20.
    let mut huge = fmt;
    put_u32(&mut huge.fmt, 20, 0xf000_0000);
    let create = |format: V4l2Format, count: u32| V4l2CreateBuffers {
        count,
        memory: MEMORY_MMAP,
        format,
        ..Default::default()
    };
    let refused = g.ioctl::<_, V4l2CreateBuffers>(s, VIDIOC_CREATE_BUFS, &create(huge, 32));
    report.check(
        &format!("{tag}: driver budget: CREATE_BUFS of 32 buffers of 3.75 GiB is refused"),
        refused.as_ref().err() == Some(&(libc::ENOMEM as u32)) && held(g) == 0,
        format!("{refused:?}, {} bytes held", held(g)),
    );
    let made = g.ioctl::<_, V4l2CreateBuffers>(s, VIDIOC_CREATE_BUFS, &create(fmt, 2));
    let n = made.as_ref().map_or(0, |c| c.count as usize);
    report.check(
        &format!("{tag}: driver budget: CREATE_BUFS charges what vivid allocates"),
        n == 2 && held(g) == 2 * per,
        format!("{made:?}, {} bytes held for buffers of {per}", held(g)),
    );
    let freed = reqbufs(g, 0);
    report.check(
        &format!("{tag}: driver budget: all of it given back"),
        freed.is_ok() && held(g) == 0,
        format!("{freed:?}, {} bytes held", held(g)),
    );
}

fn malformed(g: &mut Guest, s: u32, buf_type: u32, tag: &str, report: &mut Report) {
    use V4l2Ioctl::*;
    let einval = libc::EINVAL as u32;
    let mut results = Vec::new();
    // An unknown session.
    results.push((
        "unknown session",
        g.ioctl::<_, V4l2Format>(s + 7, VIDIOC_G_FMT, &fmt_req(buf_type, 0, 0, 0))
            .err(),
        Some(einval),
    ));
    // A truncated argument.
    let f = fmt_req(buf_type, 0, 0, 0);
    let (st, _) = g.ioctl_raw(s, VIDIOC_S_FMT.nr().into(), &f.as_bytes()[..100], 4096);
    results.push(("truncated S_FMT", Some(st), Some(einval)));
    // An invalid buffer type.
    results.push((
        "buffer type 99",
        g.ioctl::<_, V4l2Format>(s, VIDIOC_G_FMT, &fmt_req(99, 0, 0, 0))
            .err(),
        Some(einval),
    ));
    // An MMAP of an offset no buffer has.
    results.push((
        "MMAP of an unknown offset",
        g.mmap(s, 0x7777_0000).err(),
        Some(einval),
    ));
    // Host errors come back as they are.
    results.push((
        "QBUF of a buffer that does not exist (host)",
        g.ioctl::<_, V4l2Buffer>(
            s,
            VIDIOC_QBUF,
            &V4l2Buffer {
                index: 99,
                type_: buf_type,
                memory: MEMORY_MMAP,
                length: if is_multiplanar(buf_type) { 1 } else { 0 },
                ..Default::default()
            },
        )
        .err(),
        Some(einval),
    ));
    results.push((
        "S_INPUT 99 (host)",
        g.ioctl::<_, i32>(s, VIDIOC_S_INPUT, &99i32).err(),
        Some(einval),
    ));
    results.push((
        "STREAMON without buffers (host)",
        g.ioctl_void(s, VIDIOC_STREAMON, &buf_type).err(),
        Some(einval),
    ));
    // A USERPTR QBUF whose SG list points outside guest memory.
    let b = V4l2Buffer {
        index: 0,
        type_: BUF_TYPE_VIDEO_CAPTURE,
        memory: MEMORY_USERPTR,
        length: 4096,
        ..Default::default()
    };
    let mut payload = bytes_of(&b);
    payload.extend_from_slice(
        SgEntry {
            start: 1 << 40,
            len: 4096,
            reserved: 0,
        }
        .as_bytes(),
    );
    let (st, _) = g.ioctl_raw(s, VIDIOC_QBUF.nr().into(), &payload, 4096);
    results.push((
        "USERPTR SG list outside guest memory",
        Some(st),
        Some(einval),
    ));
    // A control payload larger than the proxy copies (512 MiB): refused before any
    // host memory is allocated.
    let hdr = V4l2ExtControls {
        which: CTRL_WHICH_CUR_VAL,
        count: 1,
        ..Default::default()
    };
    let c = V4l2ExtControl {
        id: CID_BRIGHTNESS,
        size: 512 << 20,
        ..Default::default()
    };
    let mut payload = bytes_of(&hdr);
    payload.extend_from_slice(c.as_bytes());
    payload.extend_from_slice(
        SgEntry {
            start: 0,
            len: 512 << 20,
            reserved: 0,
        }
        .as_bytes(),
    );
    let (st, _) = g.ioctl_raw(s, VIDIOC_G_EXT_CTRLS.nr().into(), &payload, 4096);
    results.push((
        "a 512 MiB control payload",
        Some(st),
        Some(libc::ENOMEM as u32),
    ));
    // An unknown command and an unknown ioctl.
    let r = g.raw(&[0x77, 0, 0, 0, 0, 0, 0, 0], 64);
    results.push((
        "unknown command",
        Some(RespHeader::read_from_prefix(&r).unwrap().0.status),
        Some(libc::ENOTTY as u32),
    ));
    let mut req = bytes_of(&CmdHeader::new(MediaCmd::Ioctl));
    req.extend_from_slice(
        IoctlCmd {
            session_id: s,
            code: 0xfe,
        }
        .as_bytes(),
    );
    let r = g.raw(&req, 64);
    results.push((
        "unknown ioctl",
        Some(RespHeader::read_from_prefix(&r).unwrap().0.status),
        Some(libc::ENOTTY as u32),
    ));
    for (name, got, want) in results {
        // The USERPTR SG list check accepts EFAULT (unmapped guest memory) or EINVAL
        // (the queue is not set up for USERPTR).
        let ok = got == want || (name.starts_with("USERPTR") && got == Some(libc::EFAULT as u32));
        report.check(
            &format!("{tag}: {name} gets an error"),
            ok,
            format!("{got:?}"),
        );
    }
    let still = g.ioctl::<_, V4l2Format>(s, VIDIOC_G_FMT, &fmt_req(buf_type, 0, 0, 0));
    report.check(
        &format!("{tag}: the runner still serves after malformed commands"),
        still.is_ok(),
        format!("{still:?}"),
    );
}

/// Kills the daemon if a check panics half-way.
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `outboard media --v4l2-device NODE --jail`, driven over vhost-user.
fn check_outboard_jailed(bin: &Path, path: &Path, report: &mut Report) {
    use outboard_protocol::media::{
        MmapCmd, MmapResp, MunmapCmd, OpenResp, EVENT_DQBUF, MMAP_FLAG_RW,
    };
    use outboard_tests::media::vhost::VhostMediaDriver;
    use V4l2Ioctl::*;
    let tag = format!("outboard --jail {}", path.display());
    let node = HostNode::probe(path).unwrap();
    let sock = std::env::temp_dir().join("outboard-media.sock");
    let _ = std::fs::remove_file(&sock);
    let child = std::process::Command::new(bin)
        .arg("media")
        .arg("--socket-path")
        .arg(&sock)
        .arg("--v4l2-device")
        .arg(path)
        .arg("--jail")
        .spawn()
        .unwrap();
    let mut daemon = Daemon(child);
    let start = std::time::Instant::now();
    while !sock.exists() && start.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut d = VhostMediaDriver::connect(&sock);
    let card_end = d.config[8..40].iter().position(|b| *b == 0).unwrap_or(32);
    report.check(
        &format!("{tag}: config space has the node's device_caps and card"),
        d.config[..4] == node.device_caps.to_le_bytes()
            && d.config[8..8 + card_end] == *node.card.as_bytes(),
        format!("{:?}", &d.config[..16]),
    );
    let r = d.command(CmdHeader::new(MediaCmd::Open).as_bytes(), 64);
    let open = OpenResp::read_from_bytes(&r).unwrap();
    report.check(
        &format!("{tag}: OPEN in the jailed worker"),
        open.hdr.status == 0,
        format!("status {}", open.hdr.status),
    );
    let s = open.session_id;
    let f: V4l2Format = d.ioctl(
        s,
        VIDIOC_S_FMT,
        &fmt_req(BUF_TYPE_VIDEO_CAPTURE, PIX_FMT_YUYV, 320, 180),
    );
    let size = f.pix().sizeimage;
    let rb: V4l2Requestbuffers = d.ioctl(
        s,
        VIDIOC_REQBUFS,
        &V4l2Requestbuffers {
            count: 2,
            type_: BUF_TYPE_VIDEO_CAPTURE,
            memory: MEMORY_MMAP,
            ..Default::default()
        },
    );
    let mut addrs = Vec::new();
    for index in 0..rb.count {
        let q = V4l2Buffer {
            index,
            type_: BUF_TYPE_VIDEO_CAPTURE,
            ..Default::default()
        };
        let b: V4l2Buffer = d.ioctl(s, VIDIOC_QUERYBUF, &q);
        let mut req = bytes_of(&CmdHeader::new(MediaCmd::Mmap));
        req.extend_from_slice(
            MmapCmd {
                session_id: s,
                flags: MMAP_FLAG_RW,
                offset: b.mem_offset(),
            }
            .as_bytes(),
        );
        let m = MmapResp::read_from_bytes(&d.command(&req, 64)).unwrap();
        assert_eq!(
            m.hdr.status, 0,
            "MMAP {index} (EXPBUF + SHMEM_MAP in the jail)"
        );
        addrs.push(m.driver_addr);
        let q = V4l2Buffer {
            index,
            type_: BUF_TYPE_VIDEO_CAPTURE,
            memory: MEMORY_MMAP,
            ..Default::default()
        };
        let _: V4l2Buffer = d.ioctl(s, VIDIOC_QBUF, &q);
    }
    report.check(
        &format!(
            "{tag}: {} buffers exported and mapped through SHMEM_MAP",
            addrs.len()
        ),
        addrs.len() >= 2 && d.settle(addrs.len(), 0),
        format!("{} maps", d.maps.lock().unwrap().len()),
    );
    let _: () = d.ioctl(s, VIDIOC_STREAMON, &BUF_TYPE_VIDEO_CAPTURE);
    let mut frames: Vec<(u32, Vec<u8>)> = Vec::new();
    while frames.len() < 3 {
        let ev = d.next_event();
        if u32::from_le_bytes(ev[0..4].try_into().unwrap()) != EVENT_DQBUF {
            continue;
        }
        let b = V4l2Buffer::read_from_prefix(&ev[8..]).unwrap().0;
        assert_eq!(b.bytesused, size);
        let data = d.read_shm(addrs[b.index as usize], size as usize);
        frames.push((b.sequence, data));
        let q = V4l2Buffer {
            index: b.index,
            type_: BUF_TYPE_VIDEO_CAPTURE,
            memory: MEMORY_MMAP,
            ..Default::default()
        };
        let _: V4l2Buffer = d.ioctl(s, VIDIOC_QBUF, &q);
    }
    report.frames += frames.len();
    report.check(
        &format!("{tag}: frames read through the SHMEM_MAP fds"),
        frames
            .windows(2)
            .all(|w| w[1].0 > w[0].0 && w[1].1 != w[0].1)
            && frames.iter().all(|f| f.1.iter().any(|b| *b != 0)),
        format!(
            "sequences {:?}",
            frames.iter().map(|f| f.0).collect::<Vec<_>>()
        ),
    );
    let _: () = d.ioctl(s, VIDIOC_STREAMOFF, &BUF_TYPE_VIDEO_CAPTURE);
    for a in &addrs {
        let mut req = bytes_of(&CmdHeader::new(MediaCmd::Munmap));
        req.extend_from_slice(MunmapCmd { driver_addr: *a }.as_bytes());
        let r = d.command(&req, 64);
        assert_eq!(RespHeader::read_from_bytes(&r).unwrap().status, 0);
    }
    report.check(
        &format!("{tag}: MUNMAP sends SHMEM_UNMAP"),
        d.settle(0, addrs.len()),
        "maps left",
    );
    d.disconnect();
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) };
    let status = daemon.0.wait().unwrap();
    drop(d);
    report.check(
        &format!("{tag}: SIGTERM stops the daemon and its jailed worker cleanly"),
        status.success(),
        status,
    );
}
