//! Hostile input: random and mutated commands through the runner and the software
//! camera. Every command gets an answer that starts with a response header (or nothing
//! for CLOSE), nothing panics, and the runner still serves a well-formed command after
//! each batch.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use outboard_devices::media::camera::SoftwareCamera;
use outboard_devices::media::ioctl::{
    dispatch_ioctl, BufferDesc, BufferMemory, GuestBuffer, IoctlHandler, IoctlResult,
};
use outboard_devices::media::runner::MediaRunner;
use outboard_devices::media::v4l2::*;
use outboard_devices::media::{
    ChainReader, ChainWriter, EventBuffer, GuestMemoryMapper, RegionMapping,
};
use outboard_devices::virtio::IoRegion;
use outboard_protocol::media::{
    CmdHeader, IoctlCmd, MediaCmd, OpenResp, RespHeader, SgEntry, VirtioObjectId,
};
use outboard_protocol::v4l2::V4l2Ioctl;
use zerocopy::{FromBytes, IntoBytes};

/// A guest with no memory: every SG list is outside it.
struct NoGuest;

impl GuestMemoryMapper for NoGuest {
    type Mapping<'m> = RegionMapping<'m>;
    fn new_mapping(&self, _: &[SgEntry]) -> Result<RegionMapping<'_>, i32> {
        Err(libc::EFAULT)
    }
}

type Runner = MediaRunner<SoftwareCamera<EventBuffer, (), NoGuest>, ()>;

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn command(runner: &mut Runner, req: &mut [u8], resp_len: usize) -> Vec<u8> {
    let mut resp = vec![0xa5u8; resp_len];
    // SAFETY: `req` and `resp` outlive the command; no reference to them is used while
    // the regions are.
    let (rr, wr) = unsafe {
        (
            [IoRegion::new(req.as_mut_ptr(), req.len())],
            [IoRegion::new(resp.as_mut_ptr(), resp.len())],
        )
    };
    let n = runner.handle_command(&mut ChainReader::new(&rr), &mut ChainWriter::new(&wr));
    assert!(n <= resp_len);
    resp.truncate(n);
    resp
}

fn ioctl_req(session: u32, code: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = CmdHeader::new(MediaCmd::Ioctl).as_bytes().to_vec();
    v.extend_from_slice(
        IoctlCmd {
            session_id: session,
            code,
        }
        .as_bytes(),
    );
    v.extend_from_slice(payload);
    v
}

/// A plausible argument for `ioctl`: a valid capture type at the start, random fields.
fn plausible_arg(rng: &mut Rng, ioctl: V4l2Ioctl) -> Vec<u8> {
    let size = ioctl.arg_size();
    let mut arg: Vec<u8> = (0..size + rng.below(256) as usize)
        .map(|_| rng.next() as u8)
        .collect();
    if size >= 4 && rng.below(2) == 0 {
        arg[..4].copy_from_slice(&BUF_TYPE_VIDEO_CAPTURE.to_le_bytes());
    }
    let buffer_ioctl = matches!(
        ioctl,
        V4l2Ioctl::VIDIOC_QBUF | V4l2Ioctl::VIDIOC_PREPARE_BUF | V4l2Ioctl::VIDIOC_QUERYBUF
    );
    if buffer_ioctl && rng.below(2) == 0 {
        // Small index, a real memory type (DMABUF: virtio object ids follow).
        arg[0..4].copy_from_slice(&(rng.below(4) as u32).to_le_bytes());
        let memory = [MEMORY_MMAP, MEMORY_USERPTR, MEMORY_DMABUF][rng.below(3) as usize];
        arg[60..64].copy_from_slice(&memory.to_le_bytes());
        if memory == MEMORY_DMABUF {
            let planes = if rng.below(2) == 0 {
                arg[4..8].copy_from_slice(&BUF_TYPE_VIDEO_CAPTURE_MPLANE.to_le_bytes());
                let n = rng.below(VIDEO_MAX_PLANES as u64 + 2) as u32;
                arg[72..76].copy_from_slice(&n.to_le_bytes());
                n
            } else {
                0
            };
            // Planes, then about as many ids as they need (one short, exact, or more).
            let ids = (u64::from(planes.max(1)) + rng.below(3)).saturating_sub(1);
            arg.truncate(size);
            arg.extend((0..64 * planes as usize + 16 * ids as usize).map(|_| rng.next() as u8));
        }
    }
    if rng.below(8) == 0 {
        arg.truncate(rng.below(size as u64 + 1) as usize);
    }
    arg
}

#[test]
fn random_commands_always_get_answers() {
    for seed in [0x0123_4567_89ab_cdef, 0xdead_beef_cafe_f00d, 7] {
        fuzz(seed, 40_000);
    }
}

fn fuzz(seed: u64, rounds: u32) {
    let events = EventBuffer::new();
    let mut runner: Runner = MediaRunner::new(SoftwareCamera::new(events.clone(), (), NoGuest), ());
    let mut rng = Rng(seed);
    let (mut ok, mut errors) = (0u32, 0u32);
    let mut open = CmdHeader::new(MediaCmd::Open).as_bytes().to_vec();
    let s = OpenResp::read_from_bytes(&command(&mut runner, &mut open, 16))
        .unwrap()
        .session_id;
    // Some buffers for QBUF/QUERYBUF to find.
    let rb = V4l2Requestbuffers {
        count: 4,
        type_: BUF_TYPE_VIDEO_CAPTURE,
        memory: MEMORY_MMAP,
        ..Default::default()
    };
    let r = command(&mut runner, &mut ioctl_req(s, 8, rb.as_bytes()), 64);
    assert_eq!(RespHeader::read_from_prefix(&r).unwrap().0.status, 0);

    for round in 0..rounds {
        let mut req = match rng.below(4) {
            // Pure noise.
            0 => (0..rng.below(300)).map(|_| rng.next() as u8).collect(),
            // A random command code and body.
            1 => {
                let mut v = CmdHeader {
                    cmd: rng.below(8) as u32,
                    reserved: 0,
                }
                .as_bytes()
                .to_vec();
                v.extend((0..rng.below(64)).map(|_| rng.next() as u8));
                v
            }
            // A plausible ioctl, sometimes on a wrong session or with a bad code.
            _ => {
                let ioctl = V4l2Ioctl::ALL[rng.below(V4l2Ioctl::ALL.len() as u64) as usize];
                let session = if rng.below(16) == 0 {
                    rng.below(4) as u32
                } else {
                    s
                };
                let code = match rng.below(16) {
                    0 => rng.next() as u32,
                    1 => ioctl.request_code(),
                    _ => ioctl.nr().into(),
                };
                ioctl_req(session, code, &plausible_arg(&mut rng, ioctl))
            }
        };
        let resp_len = [0usize, 4, 8, 16, 64, 300, 4096][rng.below(7) as usize];
        let is_close = req.len() >= 4 && req[..4] == MediaCmd::Close.code().to_le_bytes();
        let is_open = req.len() >= 4 && req[..4] == MediaCmd::Open.code().to_le_bytes();
        let resp = command(&mut runner, &mut req, resp_len);
        if resp_len >= 8 && !is_close {
            assert!(resp.len() >= 8, "round {round}: no response header");
            let status = RespHeader::read_from_prefix(&resp).unwrap().0.status;
            assert!(status < 4096, "round {round}: status {status}");
            if status != 0 {
                errors += 1;
                // Only the extended controls answer their payload with an error.
                let ext = req.len() >= 16
                    && req[..4] == MediaCmd::Ioctl.code().to_le_bytes()
                    && matches!(req[12], 71..=73);
                if !ext {
                    assert_eq!(resp.len(), 8, "round {round}: payload with error {status}");
                }
            } else {
                ok += 1;
            }
        }
        if is_open && resp.len() == 16 {
            // Do not let random OPENs pile up sessions forever.
            let id = OpenResp::read_from_bytes(&resp).unwrap().session_id;
            if id != s {
                runner.close(id);
            }
        }
        while events.pop().is_some() {}
    }
    // Still serving: G_FMT on the first session works.
    let f = V4l2Format {
        type_: BUF_TYPE_VIDEO_CAPTURE,
        ..Default::default()
    };
    let r = command(&mut runner, &mut ioctl_req(s, 4, f.as_bytes()), 4096);
    if runner.session_count() > 0 && RespHeader::read_from_prefix(&r).unwrap().0.status == 0 {
        assert_eq!(r.len(), 8 + 208);
    }
    assert!(runner.session_count() <= 4);
    // The generator reaches the handlers, not only the parsers.
    assert!(ok > rounds / 50, "seed {seed:#x}: only {ok} successes");
    assert!(errors > rounds / 4, "seed {seed:#x}: only {errors} errors");
}

/// Echoes queued DMABUF buffers and checks what the parser hands over: one virtio
/// object per plane (one for single-planar buffers), never more planes than V4L2 has.
#[derive(Default)]
struct DmabufEcho {
    buffers: u32,
    last_ids: Vec<VirtioObjectId>,
}

impl DmabufEcho {
    fn take(&mut self, b: GuestBuffer) -> IoctlResult<BufferDesc> {
        assert!(b.desc.planes.len() <= VIDEO_MAX_PLANES);
        if let BufferMemory::DmaBuf(ids) = b.memory() {
            assert_eq!(ids.len(), b.desc.planes.len().max(1));
            assert!(b.userptr.is_empty());
            self.buffers += 1;
            self.last_ids = ids.to_vec();
        }
        Ok(b.desc)
    }
}

impl IoctlHandler for DmabufEcho {
    type Session = ();
    fn qbuf(&mut self, _: &mut (), b: GuestBuffer) -> IoctlResult<BufferDesc> {
        self.take(b)
    }
    fn prepare_buf(&mut self, _: &mut (), b: GuestBuffer) -> IoctlResult<BufferDesc> {
        self.take(b)
    }
}

/// Random DMABUF buffers (random plane counts, ids one short to two too many, random
/// bytes, random truncation, random response room) straight into the dispatcher: it
/// never panics, a buffer reaches the handler only whole, and a successful answer is the
/// buffer, its planes and exactly the ids the guest sent.
#[test]
fn dmabuf_buffers_through_the_dispatcher() {
    let mut rng = Rng(0x0dab_0f5e_ed00_0001);
    let mut h = DmabufEcho::default();
    let (mut ok, mut refused) = (0u32, 0u32);
    for round in 0..20_000 {
        let mplane = rng.below(2) == 0;
        let length = if mplane {
            rng.below(VIDEO_MAX_PLANES as u64 + 3) as u32
        } else {
            rng.below(1 << 20) as u32
        };
        let planes = if mplane { length } else { 0 };
        let b = V4l2Buffer {
            index: rng.below(8) as u32,
            type_: if mplane {
                BUF_TYPE_VIDEO_CAPTURE_MPLANE
            } else {
                BUF_TYPE_VIDEO_CAPTURE
            },
            memory: if rng.below(16) == 0 {
                rng.next() as u32
            } else {
                MEMORY_DMABUF
            },
            m: rng.next(),
            length,
            ..Default::default()
        };
        let mut payload = b.as_bytes().to_vec();
        let ids = u64::from(planes.max(1)) + rng.below(4);
        let extra = 64 * u64::from(planes) + 16 * ids.saturating_sub(1);
        payload.extend((0..extra).map(|_| rng.next() as u8));
        if rng.below(8) == 0 {
            let at = rng.below(payload.len() as u64) as usize;
            payload[at] = rng.next() as u8;
        }
        if rng.below(8) == 0 {
            payload.truncate(rng.below(payload.len() as u64 + 1) as usize);
        }
        let ioctl = if rng.below(2) == 0 {
            V4l2Ioctl::VIDIOC_QBUF
        } else {
            V4l2Ioctl::VIDIOC_PREPARE_BUF
        };
        // No room, a header only, the ids one byte short, exactly enough, plenty.
        let exact = 8 + 88 + 64 * planes as usize + 16 * planes.max(1) as usize;
        let resp_len = [0usize, 8, exact - 1, exact, 4096][rng.below(5) as usize];
        let mut resp = vec![0u8; resp_len];
        // SAFETY: `payload` and `resp` outlive the dispatch; no reference to them is
        // used while the regions are.
        let (rr, wr) = unsafe {
            (
                [IoRegion::new(payload.as_mut_ptr(), payload.len())],
                [IoRegion::new(resp.as_mut_ptr(), resp.len())],
            )
        };
        let before = h.buffers;
        let mut w = ChainWriter::new(&wr);
        let res = dispatch_ioctl(&mut h, &mut (), ioctl, &mut ChainReader::new(&rr), &mut w);
        let n = w.written();
        let status = if res.is_ok() && n >= 8 {
            RespHeader::read_from_prefix(&resp).unwrap().0.status
        } else {
            u32::MAX
        };
        if status == 0 {
            ok += 1;
            if h.buffers > before {
                // buffer, planes, ids: the ids are the ones the guest sent, unchanged.
                let got = &resp[8 + 88 + 64 * planes as usize..n];
                assert_eq!(got, h.last_ids.as_bytes(), "round {round}");
                assert_eq!(got, &payload[88 + 64 * planes as usize..][..got.len()]);
            }
        } else {
            refused += 1;
        }
    }
    // Both whole and broken buffers were generated, and whole ones got through.
    eprintln!(
        "{} DMABUF buffers parsed, {ok} answered, {refused} refused",
        h.buffers
    );
    assert!(
        h.buffers > 5_000,
        "only {} DMABUF buffers parsed",
        h.buffers
    );
    assert!(ok > 3_000 && refused > 3_000, "ok {ok} refused {refused}");
}
