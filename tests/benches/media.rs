//! virtio-media ioctl dispatch: G_FMT, S_FMT and a QBUF -> frame -> DQBUF-event cycle
//! through Outboard's runner and software camera, and (built with
//! `RUSTFLAGS="--cfg outboard_virtio_media"`, which needs `cargo xtask media-deps`) the
//! same calls through the `virtio-media` 0.0.8 crate's runner and simple capture device,
//! in the same process, followed by the time ratios.
//!
//! Both sides get the same request bytes from host buffers and write their responses
//! into host buffers; the QBUF cycle of both devices renders a 640x480 4:2:0 frame
//! (460800 bytes) into a memfd and emits a DQBUF event. Run with
//! `cargo bench -p outboard-tests --bench media`.
#![allow(unexpected_cfgs)]
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use outboard_devices::media::camera::SoftwareCamera;
use outboard_devices::media::runner::MediaRunner;
use outboard_devices::media::v4l2::*;
use outboard_devices::media::{
    ChainReader, ChainWriter, EventBuffer, GuestMemoryMapper, RegionMapping,
};
use outboard_devices::virtio::IoRegion;
use outboard_protocol::media::{CmdHeader, IoctlCmd, MediaCmd, OpenResp, SgEntry};
use outboard_protocol::v4l2::V4l2Ioctl;
use zerocopy::{FromBytes, IntoBytes};

/// USERPTR is not benchmarked: a guest mapper that refuses everything.
struct NoGuest;

impl GuestMemoryMapper for NoGuest {
    type Mapping<'m> = RegionMapping<'m>;
    fn new_mapping(&self, _: &[SgEntry]) -> Result<RegionMapping<'_>, i32> {
        Err(libc::EFAULT)
    }
}

fn ioctl_req(session: u32, ioctl: V4l2Ioctl, payload: &[u8]) -> Vec<u8> {
    let mut v = CmdHeader::new(MediaCmd::Ioctl).as_bytes().to_vec();
    v.extend_from_slice(
        IoctlCmd {
            session_id: session,
            code: ioctl.nr().into(),
        }
        .as_bytes(),
    );
    v.extend_from_slice(payload);
    v
}

fn format(buf_type: u32, fourcc: u32, w: u32, h: u32) -> V4l2Format {
    V4l2Format::from_pix(
        buf_type,
        &V4l2PixFormat {
            width: w,
            height: h,
            pixelformat: fourcc,
            ..Default::default()
        },
    )
}

fn region(buf: &mut [u8]) -> [IoRegion; 1] {
    // SAFETY: every region built here points into a Vec owned by the benchmark that
    // outlives the command it is used for, and no reference into it is used meanwhile.
    [unsafe { IoRegion::new(buf.as_mut_ptr(), buf.len()) }]
}

type Ours = MediaRunner<SoftwareCamera<EventBuffer, (), NoGuest>, ()>;

/// Runs one command through our runner; returns the response status.
fn ours_cmd(runner: &mut Ours, req: &mut [u8], resp: &mut [u8]) -> u32 {
    let rr = region(req);
    let wr = region(resp);
    let n = runner.handle_command(&mut ChainReader::new(&rr), &mut ChainWriter::new(&wr));
    assert!(n >= 8);
    u32::from_le_bytes([resp[0], resp[1], resp[2], resp[3]])
}

/// A runner with one open session and no buffers (format calls: S_FMT is EBUSY while
/// any session holds buffers, as V4L2 requires).
fn ours_fmt_setup(events: &EventBuffer) -> (Ours, u32) {
    let camera = SoftwareCamera::new(events.clone(), (), NoGuest);
    let mut runner = MediaRunner::new(camera, ());
    let mut resp = vec![0u8; 4096];
    let mut open = CmdHeader::new(MediaCmd::Open).as_bytes().to_vec();
    assert_eq!(ours_cmd(&mut runner, &mut open, &mut resp), 0);
    let session = OpenResp::read_from_prefix(&resp).unwrap().0.session_id;
    (runner, session)
}

/// A runner with a streaming session holding two NV12 640x480 MMAP buffers.
fn ours_stream_setup(events: &EventBuffer) -> (Ours, u32) {
    let (mut runner, s) = ours_fmt_setup(events);
    let mut resp = vec![0u8; 4096];
    let fmt = format(BUF_TYPE_VIDEO_CAPTURE, PIX_FMT_NV12, 640, 480);
    let mut req = ioctl_req(s, V4l2Ioctl::VIDIOC_S_FMT, fmt.as_bytes());
    assert_eq!(ours_cmd(&mut runner, &mut req, &mut resp), 0);
    let rb = V4l2Requestbuffers {
        count: 2,
        type_: BUF_TYPE_VIDEO_CAPTURE,
        memory: MEMORY_MMAP,
        ..Default::default()
    };
    let mut req = ioctl_req(s, V4l2Ioctl::VIDIOC_REQBUFS, rb.as_bytes());
    assert_eq!(ours_cmd(&mut runner, &mut req, &mut resp), 0);
    let mut req = ioctl_req(
        s,
        V4l2Ioctl::VIDIOC_STREAMON,
        BUF_TYPE_VIDEO_CAPTURE.as_bytes(),
    );
    assert_eq!(ours_cmd(&mut runner, &mut req, &mut resp), 0);
    (runner, s)
}

/// The three benchmarked calls, by index.
const OPS: [&str; 3] = ["G_FMT", "S_FMT", "QBUF+DQBUF"];

/// One side of the comparison: runs benchmarked call `op` (an index into [`OPS`]).
trait Side {
    /// The criterion group name.
    const GROUP: &'static str;
    /// The criterion name of the QBUF cycle (it says the frame format).
    const CYCLE: &'static str;
    fn run(&mut self, op: usize);
}

/// Our runner and software camera with the requests prepared.
struct OursSide {
    events: EventBuffer,
    fmt_runner: Ours,
    runner: Ours,
    session: u32,
    resp: Vec<u8>,
    g_fmt: Vec<u8>,
    s_fmt: Vec<u8>,
    qbuf: Vec<u8>,
}

impl OursSide {
    fn new() -> Self {
        let events = EventBuffer::new();
        let (fmt_runner, fs) = ours_fmt_setup(&events);
        let (runner, session) = ours_stream_setup(&events);
        let qbuf = V4l2Buffer {
            index: 0,
            type_: BUF_TYPE_VIDEO_CAPTURE,
            memory: MEMORY_MMAP,
            ..Default::default()
        };
        OursSide {
            events,
            fmt_runner,
            runner,
            session,
            resp: vec![0u8; 4096],
            g_fmt: ioctl_req(fs, V4l2Ioctl::VIDIOC_G_FMT, format(1, 0, 0, 0).as_bytes()),
            s_fmt: ioctl_req(
                fs,
                V4l2Ioctl::VIDIOC_S_FMT,
                format(1, PIX_FMT_NV12, 640, 480).as_bytes(),
            ),
            qbuf: ioctl_req(session, V4l2Ioctl::VIDIOC_QBUF, qbuf.as_bytes()),
        }
    }
}

impl Side for OursSide {
    const GROUP: &'static str = "media/outboard";
    const CYCLE: &'static str = "QBUF+DQBUF 640x480 NV12";

    fn run(&mut self, op: usize) {
        match op {
            0 => assert_eq!(
                ours_cmd(&mut self.fmt_runner, &mut self.g_fmt, &mut self.resp),
                0
            ),
            1 => assert_eq!(
                ours_cmd(&mut self.fmt_runner, &mut self.s_fmt, &mut self.resp),
                0
            ),
            _ => {
                assert_eq!(
                    ours_cmd(&mut self.runner, &mut self.qbuf, &mut self.resp),
                    0
                );
                let (dev, session) = self.runner.session_and_device(self.session).unwrap();
                dev.capture_now(session);
                assert!(self.events.pop().is_some());
            }
        }
    }
}

/// Benchmarks every call of `side` with criterion.
fn bench_side<S: Side>(c: &mut Criterion, side: &mut S) {
    let mut g = c.benchmark_group(S::GROUP);
    for (op, name) in OPS.iter().enumerate() {
        let name = if op == 2 { S::CYCLE } else { name };
        g.bench_function(name, |b| b.iter(|| side.run(op)));
    }
    g.finish();
}

#[cfg(outboard_virtio_media)]
/// Median of `ROUNDS` interleaved measurements of each side per call, so that load
/// from other processes that comes and goes weighs on both sides alike.
fn ratios(ours: &mut impl Side, theirs: &mut impl Side) -> Vec<(Duration, Duration)> {
    const ROUNDS: usize = 5;
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    (0..OPS.len())
        .map(|op| {
            let (mut o, mut t) = (Vec::new(), Vec::new());
            for _ in 0..ROUNDS {
                o.push(measure(|| ours.run(op)));
                t.push(measure(|| theirs.run(op)));
            }
            (median(o), median(t))
        })
        .collect()
}

/// Mean time of `f` over a fixed wall-clock budget (for the ratio printout; criterion's
/// own estimates are in its report). The clock is read once per batch of calls, so its
/// own cost (tens of ns) does not pad the nanosecond-scale calls.
fn measure(mut f: impl FnMut()) -> Duration {
    for _ in 0..10 {
        f();
    }
    // A batch of calls takes at least about 1 ms.
    let once = std::time::Instant::now();
    f();
    let batch = (1_000_000 / once.elapsed().as_nanos().max(1)).clamp(1, 100_000) as u32;
    let start = std::time::Instant::now();
    let mut n = 0u32;
    while start.elapsed() < Duration::from_millis(100) || n < 20 {
        for _ in 0..batch {
            f();
        }
        n += batch;
    }
    start.elapsed() / n
}

#[cfg(outboard_virtio_media)]
mod baseline {
    use super::*;
    use virtio_media::devices::SimpleCaptureDevice;
    use virtio_media::protocol::V4l2Event as VmEvent;
    use virtio_media::{VirtioMediaDeviceRunner, VirtioMediaEventQueue};

    /// Counts events (the bench only needs them drained).
    pub struct Events(pub u64);

    impl VirtioMediaEventQueue for Events {
        fn send_event(&mut self, _event: VmEvent) {
            self.0 += 1;
        }
    }

    type Io = std::io::Cursor<Vec<u8>>;
    type Theirs = VirtioMediaDeviceRunner<Io, Io, SimpleCaptureDevice<Events, ()>, ()>;

    /// Runs one command; the cursors are rewound and reused, so nothing is allocated.
    fn theirs_cmd(runner: &mut Theirs, req: &mut Io, resp: &mut Io) -> u32 {
        req.set_position(0);
        resp.set_position(0);
        runner.handle_command(req, resp);
        let r = resp.get_ref();
        u32::from_le_bytes([r[0], r[1], r[2], r[3]])
    }

    /// The virtio-media runner and simple capture device with the requests prepared.
    pub struct TheirsSide {
        fmt_runner: Theirs,
        runner: Theirs,
        resp: Io,
        g_fmt: Io,
        s_fmt: Io,
        qbuf: Io,
    }

    impl TheirsSide {
        pub fn new() -> Self {
            // As on our side: one runner with one session for the format calls,
            // another with the streaming session.
            let mut resp = Io::new(vec![0u8; 4096]);
            let mut open_session = |runner: &mut Theirs| {
                let mut open = Io::new(CmdHeader::new(MediaCmd::Open).as_bytes().to_vec());
                assert_eq!(theirs_cmd(runner, &mut open, &mut resp), 0);
                OpenResp::read_from_prefix(resp.get_ref())
                    .unwrap()
                    .0
                    .session_id
            };
            let mut fmt_runner: Theirs =
                VirtioMediaDeviceRunner::new(SimpleCaptureDevice::new(Events(0), ()), ());
            let fs = open_session(&mut fmt_runner);
            let mut runner: Theirs =
                VirtioMediaDeviceRunner::new(SimpleCaptureDevice::new(Events(0), ()), ());
            let s = open_session(&mut runner);
            let mut resp = Io::new(vec![0u8; 4096]);
            let mplane = BUF_TYPE_VIDEO_CAPTURE_MPLANE;
            let rb = V4l2Requestbuffers {
                count: 2,
                type_: mplane,
                memory: MEMORY_MMAP,
                ..Default::default()
            };
            let mut req = Io::new(ioctl_req(s, V4l2Ioctl::VIDIOC_REQBUFS, rb.as_bytes()));
            assert_eq!(theirs_cmd(&mut runner, &mut req, &mut resp), 0);
            let mut req = Io::new(ioctl_req(s, V4l2Ioctl::VIDIOC_STREAMON, mplane.as_bytes()));
            assert_eq!(theirs_cmd(&mut runner, &mut req, &mut resp), 0);
            let mut qbuf = ioctl_req(
                s,
                V4l2Ioctl::VIDIOC_QBUF,
                V4l2Buffer {
                    index: 0,
                    type_: mplane,
                    memory: MEMORY_MMAP,
                    length: 1,
                    ..Default::default()
                }
                .as_bytes(),
            );
            qbuf.extend_from_slice(V4l2Plane::default().as_bytes());
            TheirsSide {
                fmt_runner,
                runner,
                resp,
                g_fmt: Io::new(ioctl_req(
                    fs,
                    V4l2Ioctl::VIDIOC_G_FMT,
                    format(mplane, 0, 0, 0).as_bytes(),
                )),
                s_fmt: Io::new(ioctl_req(
                    fs,
                    V4l2Ioctl::VIDIOC_S_FMT,
                    format(mplane, fourcc(b"YU12"), 640, 480).as_bytes(),
                )),
                qbuf: Io::new(qbuf),
            }
        }
    }

    impl Side for TheirsSide {
        const GROUP: &'static str = "media/virtio-media-0.0.8";
        const CYCLE: &'static str = "QBUF+DQBUF 640x480 YU12";

        fn run(&mut self, op: usize) {
            let (runner, req) = match op {
                0 => (&mut self.fmt_runner, &mut self.g_fmt),
                1 => (&mut self.fmt_runner, &mut self.s_fmt),
                _ => (&mut self.runner, &mut self.qbuf),
            };
            assert_eq!(theirs_cmd(runner, req, &mut self.resp), 0);
        }
    }
}

fn media(c: &mut Criterion) {
    // `--profile-time N` (e.g. under callgrind) runs only the filtered benchmark: skip
    // the ratio measurements, which would run every call of both sides.
    let profiling = std::env::args().any(|a| a == "--profile-time");
    let mut ours = OursSide::new();
    bench_side(c, &mut ours);
    #[cfg(outboard_virtio_media)]
    {
        let mut theirs = baseline::TheirsSide::new();
        bench_side(c, &mut theirs);
        if !profiling {
            for (name, (o, t)) in OPS.iter().zip(ratios(&mut ours, &mut theirs)) {
                println!(
                    "media ratio {name}: outboard {o:?} / virtio-media {t:?} = {:.2}",
                    o.as_secs_f64() / t.as_secs_f64()
                );
            }
        }
    }
    #[cfg(not(outboard_virtio_media))]
    if !profiling {
        for (op, name) in OPS.iter().enumerate() {
            println!(
                "media {name}: outboard {:?} (build with --cfg outboard_virtio_media for the ratio)",
                measure(|| ours.run(op))
            );
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20);
    targets = media
}
criterion_main!(benches);
