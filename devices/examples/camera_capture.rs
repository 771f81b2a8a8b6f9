//! The software camera as a VMM embeds it: `media::camera::SoftwareCamera` behind
//! `media::device::VirtioMedia`, its command and event queues driven from the guest's
//! side by the crate's own test double `testing::QueueDriver` (feature `test-utils`), so
//! neither guest memory nor a VMM library is needed.
//!
//! What a VMM supplies is all here: a `HostMemoryMapper` for the shared memory region
//! MMAP buffers are mapped into (this one keeps each buffer's fd and reads it with
//! `pread`), an `Interrupt` (`testing::CountingInterrupt`), and a wait on
//! `VirtioDevice::event_fd` (the sessions' frame timers) before `handle_event`.
//!
//! The guest side sends OPEN, S_FMT (320x240 YUYV), REQBUFS (2 MMAP buffers), QUERYBUF,
//! MMAP and QBUF for each, STREAMON; it then takes 6 frames from DQBUF events, checks
//! each against its sequence number (`decode_frame_number`, then byte for byte with
//! `render_frame`) and queues its buffer again; after STREAMOFF and CLOSE no mapping may
//! be left. It prints each step and exits non-zero when a check fails.
//!
//! `cargo run -p outboard-devices --example camera_capture --features test-utils`

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use outboard_devices::media::camera::{
    decode_frame_number, pix_format, render_frame, Adjust, SoftwareCamera, CARD_NAME, DEVICE_CAPS,
};
use outboard_devices::media::device::VirtioMedia;
use outboard_devices::media::v4l2::*;
use outboard_devices::media::{
    Errno, EventBuffer, GuestMemoryMapper, HostMemoryMapper, RegionMapping,
};
use outboard_devices::testing::{CountingInterrupt, QueueDriver};
use outboard_devices::virtio::VirtioDevice;
use outboard_protocol::media::{CloseCmd, CmdHeader, EventHeader, IoctlCmd, MediaCmd};
use outboard_protocol::media::{MediaConfig, MmapCmd, MmapResp, OpenResp, RespHeader, SgEntry};
use outboard_protocol::media::{COMMAND_QUEUE, EVENT_DQBUF, EVENT_QUEUE, MMAP_FLAG_RW};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// The VMM's shared memory region: at each offset in it, a buffer's fd, the offset in
/// the fd and the length (a VMM would `mmap` them into the guest's view of the region).
#[derive(Default)]
struct Shm(BTreeMap<u64, (File, u64, u64)>);

impl HostMemoryMapper for Shm {
    fn add_mapping(
        &mut self,
        fd: BorrowedFd<'_>,
        len: u64,
        off: u64,
        _: bool,
    ) -> Result<u64, Errno> {
        let addr = self.0.last_key_value().map_or(0, |(a, (_, _, l))| a + l);
        let file = File::from(fd.try_clone_to_owned().map_err(|_| libc::EIO)?);
        self.0.insert(addr, (file, off, len));
        Ok(addr)
    }
    fn remove_mapping(&mut self, addr: u64) -> Result<(), Errno> {
        self.0.remove(&addr).map(drop).ok_or(libc::EINVAL)
    }
}

/// No USERPTR buffers here: every guest SG list is refused.
struct NoGuestMemory;

impl GuestMemoryMapper for NoGuestMemory {
    type Mapping<'m> = RegionMapping<'m>;
    fn new_mapping(&self, _: &[SgEntry]) -> Result<RegionMapping<'_>, Errno> {
        Err(libc::EFAULT)
    }
}

/// The guest's side: the device and the driver ends of its two queues.
struct Guest {
    dev: VirtioMedia<SoftwareCamera<EventBuffer, Shm, NoGuestMemory>>,
    cmdq: QueueDriver,
    evq: QueueDriver,
}

/// `T` from the start of `bytes`.
fn parse<T: FromBytes>(bytes: &[u8]) -> Result<T, String> {
    T::read_from_prefix(bytes)
        .map(|(t, _)| t)
        .map_err(|_| "short answer".into())
}

/// A capture buffer in MMAP memory.
fn mmap_buffer(index: u32) -> V4l2Buffer {
    V4l2Buffer {
        index,
        type_: BUF_TYPE_VIDEO_CAPTURE,
        memory: MEMORY_MMAP,
        ..Default::default()
    }
}

impl Guest {
    /// Sends command `cmd` with its `body`, with 4 KiB of room for the answer; the answer.
    fn command(&mut self, cmd: MediaCmd, body: &[&[u8]]) -> Result<Vec<u8>, String> {
        let req = [&[CmdHeader::new(cmd).as_bytes()], body].concat().concat();
        self.cmdq.chain().readable(&req).writable(4096).post();
        self.dev.handle_queue(COMMAND_QUEUE);
        let used = self
            .cmdq
            .pop_used()
            .ok_or("the command did not come back")?;
        match parse::<RespHeader>(&used.written) {
            Ok(h) if h.status != 0 => Err(format!("{cmd:?} failed with errno {}", h.status)),
            _ => Ok(used.written), // CLOSE answers nothing
        }
    }

    /// Runs `ioctl` with `arg` on `session`; its answer after the response header.
    fn ioctl<I, O>(&mut self, session: u32, ioctl: V4l2Ioctl, arg: &I) -> Result<O, String>
    where
        I: IntoBytes + Immutable,
        O: FromBytes,
    {
        let cmd = IoctlCmd {
            session_id: session,
            code: ioctl.nr().into(),
        };
        let answer = self.command(MediaCmd::Ioctl, &[cmd.as_bytes(), arg.as_bytes()]);
        parse(answer?.get(8..).unwrap_or_default()).map_err(|e| format!("{ioctl}: {e}"))
    }

    /// Waits on the device's event fd as a VMM's event loop would, until a DQBUF event.
    fn next_dqbuf(&mut self) -> Result<V4l2Buffer, String> {
        for _ in 0..50 {
            let fd = self.dev.event_fd().ok_or("no event fd")?.as_raw_fd();
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd on the stack, borrowed for the call only.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            self.dev.handle_event();
            if let Some(used) = self.evq.pop_used() {
                self.evq.chain().writable(1024).post(); // the event buffer goes back
                if parse::<EventHeader>(&used.written)?.event == EVENT_DQBUF {
                    return parse(&used.written[8..]);
                }
            }
        }
        Err("no frame within 5 s".into())
    }
}

fn main() -> Result<(), String> {
    // What the VMM does: build the device and activate it with its queues and interrupt.
    let events = EventBuffer::new();
    let camera = SoftwareCamera::new(events.clone(), Shm::default(), NoGuestMemory);
    let config = MediaConfig::new(DEVICE_CAPS, 0, CARD_NAME);
    let mut dev = VirtioMedia::new(camera, events, config).map_err(|e| e.to_string())?;
    let (cmdq, evq) = (QueueDriver::new(16), QueueDriver::new(16));
    let irq = Arc::new(CountingInterrupt::new());
    let queues = vec![Box::new(cmdq.queue()) as _, Box::new(evq.queue()) as _];
    dev.activate(queues, irq.clone())
        .map_err(|e| e.to_string())?;
    for _ in 0..8 {
        evq.chain().writable(1024).post();
    }
    let mut g = Guest { dev, cmdq, evq };
    println!(
        "virtio-media device {} ({CARD_NAME}) active",
        g.dev.device_type()
    );

    // The guest driver: a session, a format, two MMAP buffers mapped and queued.
    let s = parse::<OpenResp>(&g.command(MediaCmd::Open, &[])?)?.session_id;
    let (w, h) = (320, 240);
    let fmt = V4l2Format::from_pix(BUF_TYPE_VIDEO_CAPTURE, &pix_format(PIX_FMT_YUYV, w, h));
    let size = g
        .ioctl::<_, V4l2Format>(s, V4l2Ioctl::VIDIOC_S_FMT, &fmt)?
        .pix()
        .sizeimage as usize;
    let rb = V4l2Requestbuffers {
        count: 2,
        type_: BUF_TYPE_VIDEO_CAPTURE,
        memory: MEMORY_MMAP,
        ..Default::default()
    };
    let count = g
        .ioctl::<_, V4l2Requestbuffers>(s, V4l2Ioctl::VIDIOC_REQBUFS, &rb)?
        .count;
    println!("session {s}: {w}x{h} YUYV, {size} bytes a frame, {count} MMAP buffers");
    let mut shm = Vec::new();
    for index in 0..count {
        let b: V4l2Buffer = g.ioctl(s, V4l2Ioctl::VIDIOC_QUERYBUF, &mmap_buffer(index))?;
        let mmap = MmapCmd {
            session_id: s,
            flags: MMAP_FLAG_RW,
            offset: b.mem_offset(),
        };
        let m: MmapResp = parse(&g.command(MediaCmd::Mmap, &[mmap.as_bytes()])?)?;
        println!(
            "  buffer {index} mapped at {:#x} of the shared memory region",
            m.driver_addr
        );
        shm.push(m.driver_addr);
        let _: V4l2Buffer = g.ioctl(s, V4l2Ioctl::VIDIOC_QBUF, &mmap_buffer(index))?;
    }

    // Streaming: every frame must be the pattern of its own sequence number.
    let _: () = g.ioctl(s, V4l2Ioctl::VIDIOC_STREAMON, &BUF_TYPE_VIDEO_CAPTURE)?;
    let (mut frame, mut want) = (vec![0; size], vec![0; size]);
    for _ in 0..6 {
        let b = g.next_dqbuf()?;
        let n = b.sequence;
        let (file, off, _) = &g.dev.runner().device().host_mapper().0[&shm[b.index as usize]];
        file.read_exact_at(&mut frame, *off)
            .map_err(|e| e.to_string())?;
        let decoded = decode_frame_number(PIX_FMT_YUYV, w, h, &frame);
        render_frame(PIX_FMT_YUYV, w, h, n, &Adjust::default(), &mut want)
            .ok_or("no such format")?;
        println!(
            "  frame {n} in buffer {}: {} bytes, pattern of frame {decoded:?}",
            b.index, b.bytesused
        );
        if b.flags & BUF_FLAG_ERROR != 0 || decoded != Some(n) || frame != want {
            return Err(format!("frame {n} is not the pattern the camera draws"));
        }
        let _: V4l2Buffer = g.ioctl(s, V4l2Ioctl::VIDIOC_QBUF, &mmap_buffer(b.index))?;
    }

    // STREAMOFF and CLOSE: the camera must have removed its mappings.
    let _: () = g.ioctl(s, V4l2Ioctl::VIDIOC_STREAMOFF, &BUF_TYPE_VIDEO_CAPTURE)?;
    let close = CloseCmd {
        session_id: s,
        reserved: 0,
    };
    g.command(MediaCmd::Close, &[close.as_bytes()])?;
    let left = g.dev.runner().device().host_mapper().0.len();
    println!(
        "closed: {left} mappings left, {} used-buffer interrupts",
        irq.used_signals(EVENT_QUEUE) + irq.used_signals(COMMAND_QUEUE)
    );
    if left != 0 {
        return Err(format!("{left} mappings outlived their session"));
    }
    Ok(())
}
