//! The buffers of the camera's one capture queue: MMAP planes backed by memfds (with
//! consecutive page-aligned `mem_offset`s), USERPTR planes backed by the guest's SG
//! lists, the per-session caps on both, and the `v4l2_buffer` each is described by.

use rustix::time::{clock_gettime, ClockId};

use outboard_protocol::media::SgEntry;
use outboard_protocol::v4l2::*;

use super::{CameraSession, SoftwareCamera};
use crate::media::ioctl::{BufferDesc, IoctlResult};
use crate::media::memfd::MemfdBuffer;
use crate::media::{page_align, EventQueue, GuestMemoryMapper, HostMemoryMapper, MediaMetrics};

/// Most buffers a session may allocate (`VIDEO_MAX_FRAME`): `REQBUFS` and
/// `CREATE_BUFS` counts are cut down to it, as vb2 does, and a `CREATE_BUFS` on a full
/// queue is refused with `ENOBUFS`.
pub const MAX_BUFFERS: u32 = 32;
/// Most MMAP buffer memory (memfds, page-rounded) a session may hold: 256 MiB. A full
/// queue of the largest frame (1280x720 RGB24, 2.7 MiB) needs 85 MiB; the rest leaves
/// `CREATE_BUFS` room for larger buffers. Counts are cut down to what fits, and a
/// request of which nothing fits is refused with `ENOMEM`. The memfds are host memory
/// the guest can fill through its mappings, hence a cap below the 4 GiB that the
/// 32-bit `mem_offset`s could address.
pub const MAX_SESSION_BUFFER_BYTES: u64 = 256 << 20;

/// Now, on `CLOCK_MONOTONIC`, as a `v4l2_buffer` timestamp.
pub(super) fn timespec_now() -> Timeval {
    let t = clock_gettime(ClockId::Monotonic);
    Timeval {
        tv_sec: t.tv_sec,
        tv_usec: t.tv_nsec / 1000,
    }
}

/// Where a buffer's memory lives.
pub(super) enum Backing {
    /// A memfd (MMAP memory), page-rounded, and the plane length the buffer was
    /// allocated for (what `QUERYBUF` reports, as vb2 reports the size `REQBUFS` or
    /// `CREATE_BUFS` asked for, not the page-rounded allocation).
    Mmap { mem: MemfdBuffer, length: u32 },
    /// Guest memory (USERPTR): the SG list the guest queued the buffer with. It is
    /// mapped when a frame is written (within one device call, as guest memory
    /// translations must be), not held across calls.
    UserPtr {
        sgs: Vec<SgEntry>,
        userptr: u64,
        length: u32,
    },
}

/// One memory plane of a buffer.
pub(super) struct PlaneBuf {
    pub(super) backing: Backing,
    /// `mem_offset` of MMAP planes (buffers may differ in size: CREATE_BUFS).
    pub(super) offset: u64,
    pub(super) bytesused: u32,
}

impl PlaneBuf {
    fn length(&self) -> u32 {
        match &self.backing {
            Backing::Mmap { length, .. } | Backing::UserPtr { length, .. } => *length,
        }
    }

    fn m(&self) -> u64 {
        match &self.backing {
            Backing::Mmap { .. } => self.offset,
            Backing::UserPtr { userptr, .. } => *userptr,
        }
    }
}

/// One buffer of the queue: its planes and what `QUERYBUF` and `DQBUF` report.
pub(super) struct CamBuffer {
    pub(super) planes: Vec<PlaneBuf>,
    pub(super) queued: bool,
    pub(super) sequence: u32,
    pub(super) timestamp: Timeval,
    pub(super) flags: u32,
}

impl<M> CameraSession<M> {
    /// The `v4l2_buffer` (and planes) of buffer `index`, without `V4L2_BUF_FLAG_MAPPED`.
    pub(super) fn describe(&self, index: u32) -> Option<BufferDesc> {
        let b = self.buffers.get(index as usize)?;
        let mut buffer = V4l2Buffer {
            index,
            type_: self.buf_type,
            // Stamped once the frame is rendered, just before it is written to the
            // buffer: the end of the frame, where the guest driver's re-stamp at
            // completion is taken too (guest-patches/virtio-media/0001).
            flags: b.flags | BUF_FLAG_TIMESTAMP_MONOTONIC | BUF_FLAG_TSTAMP_SRC_EOF,
            field: FIELD_NONE,
            timestamp: b.timestamp,
            sequence: b.sequence,
            memory: self.memory,
            ..Default::default()
        };
        if b.queued {
            buffer.flags |= BUF_FLAG_QUEUED;
        }
        let mut planes = Vec::new();
        if is_multiplanar(self.buf_type) {
            buffer.length = b.planes.len() as u32;
            planes = b
                .planes
                .iter()
                .map(|p| V4l2Plane {
                    bytesused: p.bytesused,
                    length: p.length(),
                    m: p.m(),
                    ..Default::default()
                })
                .collect();
        } else {
            let p = b.planes.first()?;
            buffer.bytesused = p.bytesused;
            buffer.length = p.length();
            buffer.m = p.m();
        }
        Some(BufferDesc {
            buffer,
            planes,
            ..Default::default()
        })
    }
}

impl<E: EventQueue, H: HostMemoryMapper, G: GuestMemoryMapper> SoftwareCamera<E, H, G> {
    /// Frees the session's buffers: the queue has no owner any more.
    pub(super) fn free_buffers(&mut self, s: &mut CameraSession<G>) {
        self.busy.remove(&s.id);
        s.buffers.clear();
        s.queue.clear();
    }
}

/// Appends up to `count` buffers with planes of `sizes` bytes; returns how many were
/// added. At most [`MAX_BUFFERS`] buffers and [`MAX_SESSION_BUFFER_BYTES`] of MMAP
/// memory in all: a request is cut down to what fits (counted in `metrics`), and one of
/// which nothing fits is refused (`ENOBUFS` for a full queue, `ENOMEM` for memory).
/// MMAP planes get consecutive page-aligned offsets, which must fit the 32-bit
/// `mem_offset`.
pub(super) fn add_buffers<M>(
    s: &mut CameraSession<M>,
    metrics: &MediaMetrics,
    memory: u32,
    count: u32,
    sizes: &[u32],
) -> IoctlResult<u32> {
    let asked = count;
    let have = s.buffers.len() as u32;
    let room = MAX_BUFFERS.saturating_sub(have);
    let mut count = count.min(room);
    let mut per_buffer = 0u64;
    for size in sizes {
        // A memfd has at least one page (MemfdBuffer::new).
        per_buffer += page_align(u64::from(*size).max(1)).ok_or(libc::EINVAL)?;
    }
    if memory == MEMORY_MMAP {
        let held: u64 = s
            .buffers
            .iter()
            .flat_map(|b| &b.planes)
            .map(|p| match &p.backing {
                Backing::Mmap { mem, .. } => mem.size(),
                Backing::UserPtr { .. } => 0,
            })
            .sum();
        let fit = MAX_SESSION_BUFFER_BYTES.saturating_sub(held) / per_buffer.max(1);
        count = count.min(u32::try_from(fit).unwrap_or(u32::MAX));
    }
    if count < asked {
        MediaMetrics::inc(&metrics.err_buffer_limit);
        // V4L2 lets a driver lower the count (GStreamer's v4l2src asks for 256 and takes
        // what it gets): a clamp is routine, only a refusal is worth a warning.
        outboard_protocol::log_limited!(
            if count == 0 {
                log::Level::Warn
            } else {
                log::Level::Info
            },
            "camera: session {}: {asked} buffers of {per_buffer} bytes asked for, {count} \
             within the caps ({have} held)",
            s.id
        );
        if count == 0 {
            return Err(if room == 0 {
                libc::ENOBUFS
            } else {
                libc::ENOMEM
            });
        }
    }
    let mut offset = s
        .buffers
        .iter()
        .flat_map(|b| &b.planes)
        .map(|p| match &p.backing {
            Backing::Mmap { mem, .. } => p.offset + mem.size(),
            Backing::UserPtr { .. } => 0,
        })
        .max()
        .unwrap_or(0);
    if offset.saturating_add(u64::from(count).saturating_mul(per_buffer)) > u64::from(u32::MAX) {
        return Err(libc::ENOMEM);
    }
    for _ in 0..count {
        let mut planes = Vec::with_capacity(sizes.len());
        for &size in sizes {
            let backing = if memory == MEMORY_MMAP {
                Backing::Mmap {
                    mem: MemfdBuffer::new("outboard-camera", size.into())
                        .map_err(|e| e.raw_os_error().unwrap_or(libc::ENOMEM))?,
                    length: size,
                }
            } else {
                Backing::UserPtr {
                    sgs: Vec::new(),
                    userptr: 0,
                    length: size,
                }
            };
            let plane_offset = offset;
            if let Backing::Mmap { mem, .. } = &backing {
                offset += mem.size();
            }
            planes.push(PlaneBuf {
                backing,
                offset: plane_offset,
                bytesused: 0,
            });
        }
        s.buffers.push(CamBuffer {
            planes,
            queued: false,
            sequence: 0,
            timestamp: Timeval::default(),
            flags: 0,
        });
    }
    Ok(count)
}
