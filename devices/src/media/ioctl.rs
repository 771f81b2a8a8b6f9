//! V4L2 ioctl dispatch: parse each ioctl's payload from the chain, call the matching
//! [`IoctlHandler`] method, write the response in the layout virtio-media requires.
//!
//! # Payloads
//!
//! An IOCTL command carries the ioctl's argument structure (64-bit layout) after the
//! [`IoctlCmd`](outboard_protocol::media::IoctlCmd). Variable parts follow it:
//!
//! - `v4l2_buffer` of a multi-planar type: `length` `v4l2_plane`s follow the buffer, and
//!   the response carries them after the buffer too.
//! - USERPTR memory: for every plane with a non-zero length (the buffer itself for
//!   single-planar types), a scatter-gather list of [`SgEntry`]s covering that length
//!   replaces the guest's user pointer.
//! - `v4l2_ext_controls`: `count` `v4l2_ext_control`s follow, then an SG list for every
//!   control with a non-zero `size` (its payload). The response carries the structure and
//!   the controls, also on error (so the guest sees `error_idx`).
//! - DMABUF memory: a 16-byte [`VirtioObjectId`] per plane (one for single-planar
//!   buffers) follows the buffer and its planes, in plane order, in the command and in
//!   the response alike (unlike SG lists, which only the command carries). `QBUF` and
//!   `PREPARE_BUF` answer with the guest's ids and fd placeholders (`m`) unchanged,
//!   `QUERYBUF` with the ids the device reports. The dequeued-buffer event
//!   carries no ids: it has a fixed size and, as for USERPTR memory, the driver keeps
//!   what it queued.
//!
//! Pointers inside structures are zeroed in responses so that no host address leaks.
//! A payload that cannot be parsed is answered with `EINVAL`; ioctls the driver handles
//! itself ([`V4l2Ioctl::is_handled_by_driver`]) and `VIDIOC_G_EDID`/`VIDIOC_S_EDID`
//! (pointer payloads virtio-media does not describe) are answered with `ENOTTY`.
//! `VIDIOC_EXPBUF` exports a buffer as a virtio object: room for its id follows the
//! `v4l2_exportbuffer` in the command, and the id follows it in the response.

use outboard_protocol::media::{RespHeader, SgEntry, VirtioObjectId};
use outboard_protocol::v4l2::V4l2Ioctl;
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::v4l2::*;
use super::{ChainReader, ChainWriter, Errno, MediaError, MediaMetrics};

/// Result of an ioctl handler: a value or a positive errno.
pub type IoctlResult<T> = Result<T, Errno>;

/// Most controls one `VIDIOC_*_EXT_CTRLS` call may carry (`V4L2_CID_MAX_CTRLS`).
pub const MAX_EXT_CTRLS: u32 = 1024;
/// Most SG entries one command may carry in all its lists (the USERPTR planes of one
/// buffer, the payloads of one `VIDIOC_*_EXT_CTRLS`): 16384 entries (256 KiB of them)
/// describe a 64 MiB buffer given page by page, an 8K frame; a guest driver that
/// merges contiguous pages describes far more. Without it a chain whose descriptors
/// all point at the same guest pages could make the device read and keep millions of
/// entries (each list alone may have one per page of its length, up to 4 GiB). Beyond
/// it the ioctl is answered `ENOMEM`.
pub const MAX_SG_ENTRIES: usize = 16384;

/// A `v4l2_buffer` with the parts that follow it on the wire in both halves of a chain:
/// its planes and, for DMABUF memory, its virtio objects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BufferDesc {
    /// The buffer.
    pub buffer: V4l2Buffer,
    /// Its planes (`buffer.length` of them for multi-planar types).
    pub planes: Vec<V4l2Plane>,
    /// For DMABUF memory (`buffer.memory == MEMORY_DMABUF`): the virtio object backing
    /// each plane in plane order (one for single-planar buffers). Empty otherwise. A
    /// response for a DMABUF buffer must carry one per plane it answers with.
    pub objects: Vec<VirtioObjectId>,
}

/// A buffer the guest queues or prepares, with its USERPTR backing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestBuffer {
    /// The buffer, its planes and its virtio objects as the guest sent them.
    pub desc: BufferDesc,
    /// For USERPTR memory: one guest SG list per plane with a non-zero length (one list
    /// for single-planar buffers). Empty for other memory types.
    pub userptr: Vec<Vec<SgEntry>>,
}

/// The backing of a [`GuestBuffer`], by memory type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferMemory<'a> {
    /// MMAP: device-allocated buffers, identified by index.
    Mmap,
    /// USERPTR: guest SG lists, one per plane with a non-zero length.
    UserPtr(&'a [Vec<SgEntry>]),
    /// DMABUF: a virtio object per plane.
    DmaBuf(&'a [VirtioObjectId]),
}

impl GuestBuffer {
    /// The buffer's backing; [`read_guest_buffer`] accepts no other memory type than
    /// these three.
    pub fn memory(&self) -> BufferMemory<'_> {
        match self.desc.buffer.memory {
            MEMORY_USERPTR => BufferMemory::UserPtr(&self.userptr),
            MEMORY_DMABUF => BufferMemory::DmaBuf(&self.desc.objects),
            _ => BufferMemory::Mmap,
        }
    }
}

/// Extended controls as the guest sent them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtControls {
    /// The header (`which`, `count`, `error_idx`, ...).
    pub header: V4l2ExtControls,
    /// The controls.
    pub controls: Vec<V4l2ExtControl>,
    /// Payload SG lists, one per control with a non-zero `size`, in control order.
    pub payloads: Vec<Vec<SgEntry>>,
}

macro_rules! handler_methods {
    ($(
        $(#[$m:meta])*
        fn $name:ident(&mut self, session: &mut Self::Session $(, $arg:ident: $ty:ty)*) -> $ret:ty;
    )*) => {
        /// One method per V4L2 ioctl virtio-media carries. Every method answers `ENOTTY`
        /// unless a device overrides it; [`dispatch_ioctl`] parses and validates the
        /// payload before calling it.
        #[allow(unused_variables)]
        pub trait IoctlHandler {
            /// Per-session state.
            type Session;

            /// Where [`dispatch_ioctl`] counts the payloads it refuses for a cap
            /// ([`MAX_SG_ENTRIES`]); the default counts nowhere.
            fn metrics(&self) -> Option<&MediaMetrics> {
                None
            }
            $(
                $(#[$m])*
                fn $name(&mut self, session: &mut Self::Session $(, $arg: $ty)*) -> $ret {
                    Err(libc::ENOTTY)
                }
            )*
        }
    };
}

handler_methods! {
    /// `VIDIOC_ENUM_FMT`.
    fn enum_fmt(&mut self, session: &mut Self::Session, desc: V4l2Fmtdesc) -> IoctlResult<V4l2Fmtdesc>;
    /// `VIDIOC_G_FMT` for `buf_type`.
    fn g_fmt(&mut self, session: &mut Self::Session, buf_type: u32) -> IoctlResult<V4l2Format>;
    /// `VIDIOC_S_FMT`.
    fn s_fmt(&mut self, session: &mut Self::Session, format: V4l2Format) -> IoctlResult<V4l2Format>;
    /// `VIDIOC_TRY_FMT`.
    fn try_fmt(&mut self, session: &mut Self::Session, format: V4l2Format) -> IoctlResult<V4l2Format>;
    /// `VIDIOC_REQBUFS`.
    fn reqbufs(&mut self, session: &mut Self::Session, req: V4l2Requestbuffers) -> IoctlResult<V4l2Requestbuffers>;
    /// `VIDIOC_QUERYBUF` of buffer `index` of `buf_type`.
    fn querybuf(&mut self, session: &mut Self::Session, buf_type: u32, index: u32) -> IoctlResult<BufferDesc>;
    /// `VIDIOC_QBUF`.
    fn qbuf(&mut self, session: &mut Self::Session, buffer: GuestBuffer) -> IoctlResult<BufferDesc>;
    /// `VIDIOC_PREPARE_BUF`.
    fn prepare_buf(&mut self, session: &mut Self::Session, buffer: GuestBuffer) -> IoctlResult<BufferDesc>;
    /// `VIDIOC_CREATE_BUFS`.
    fn create_bufs(&mut self, session: &mut Self::Session, create: V4l2CreateBuffers) -> IoctlResult<V4l2CreateBuffers>;
    /// `VIDIOC_EXPBUF`: export a buffer as a virtio object and return its id (the
    /// structure's `fd` placeholder is given back as the guest sent it). The buffer type
    /// is not validated before the call.
    fn expbuf(&mut self, session: &mut Self::Session, export: V4l2Exportbuffer) -> IoctlResult<VirtioObjectId>;
    /// `VIDIOC_REMOVE_BUFS`.
    fn remove_bufs(&mut self, session: &mut Self::Session, remove: V4l2RemoveBuffers) -> IoctlResult<V4l2RemoveBuffers>;
    /// `VIDIOC_STREAMON`.
    fn streamon(&mut self, session: &mut Self::Session, buf_type: u32) -> IoctlResult<()>;
    /// `VIDIOC_STREAMOFF`.
    fn streamoff(&mut self, session: &mut Self::Session, buf_type: u32) -> IoctlResult<()>;
    /// `VIDIOC_G_PARM` for `buf_type`.
    fn g_parm(&mut self, session: &mut Self::Session, buf_type: u32) -> IoctlResult<V4l2Streamparm>;
    /// `VIDIOC_S_PARM`.
    fn s_parm(&mut self, session: &mut Self::Session, parm: V4l2Streamparm) -> IoctlResult<V4l2Streamparm>;
    /// `VIDIOC_G_STD`.
    fn g_std(&mut self, session: &mut Self::Session) -> IoctlResult<u64>;
    /// `VIDIOC_S_STD`.
    fn s_std(&mut self, session: &mut Self::Session, std: u64) -> IoctlResult<()>;
    /// `VIDIOC_QUERYSTD`.
    fn querystd(&mut self, session: &mut Self::Session) -> IoctlResult<u64>;
    /// `VIDIOC_ENUMSTD` of `index`.
    fn enumstd(&mut self, session: &mut Self::Session, index: u32) -> IoctlResult<V4l2Standard>;
    /// `VIDIOC_ENUMINPUT` of `index`.
    fn enuminput(&mut self, session: &mut Self::Session, index: u32) -> IoctlResult<V4l2Input>;
    /// `VIDIOC_G_INPUT`.
    fn g_input(&mut self, session: &mut Self::Session) -> IoctlResult<i32>;
    /// `VIDIOC_S_INPUT`.
    fn s_input(&mut self, session: &mut Self::Session, input: i32) -> IoctlResult<i32>;
    /// `VIDIOC_ENUMOUTPUT` of `index`.
    fn enumoutput(&mut self, session: &mut Self::Session, index: u32) -> IoctlResult<V4l2Output>;
    /// `VIDIOC_G_OUTPUT`.
    fn g_output(&mut self, session: &mut Self::Session) -> IoctlResult<i32>;
    /// `VIDIOC_S_OUTPUT`.
    fn s_output(&mut self, session: &mut Self::Session, output: i32) -> IoctlResult<i32>;
    /// `VIDIOC_G_CTRL`.
    fn g_ctrl(&mut self, session: &mut Self::Session, id: u32) -> IoctlResult<V4l2Control>;
    /// `VIDIOC_S_CTRL`.
    fn s_ctrl(&mut self, session: &mut Self::Session, ctrl: V4l2Control) -> IoctlResult<V4l2Control>;
    /// `VIDIOC_QUERYCTRL` (the id may carry `V4L2_CTRL_FLAG_NEXT_*`).
    fn queryctrl(&mut self, session: &mut Self::Session, query: V4l2Queryctrl) -> IoctlResult<V4l2Queryctrl>;
    /// `VIDIOC_QUERY_EXT_CTRL`.
    fn query_ext_ctrl(&mut self, session: &mut Self::Session, query: V4l2QueryExtCtrl) -> IoctlResult<V4l2QueryExtCtrl>;
    /// `VIDIOC_QUERYMENU`.
    fn querymenu(&mut self, session: &mut Self::Session, id: u32, index: u32) -> IoctlResult<V4l2Querymenu>;
    /// `VIDIOC_G_EXT_CTRLS`: fill the values in `ctrls` (set `error_idx` on failure).
    fn g_ext_ctrls(&mut self, session: &mut Self::Session, ctrls: &mut ExtControls) -> IoctlResult<()>;
    /// `VIDIOC_S_EXT_CTRLS`.
    fn s_ext_ctrls(&mut self, session: &mut Self::Session, ctrls: &mut ExtControls) -> IoctlResult<()>;
    /// `VIDIOC_TRY_EXT_CTRLS`.
    fn try_ext_ctrls(&mut self, session: &mut Self::Session, ctrls: &mut ExtControls) -> IoctlResult<()>;
    /// `VIDIOC_ENUM_FRAMESIZES`.
    fn enum_framesizes(&mut self, session: &mut Self::Session, query: V4l2Frmsizeenum) -> IoctlResult<V4l2Frmsizeenum>;
    /// `VIDIOC_ENUM_FRAMEINTERVALS`.
    fn enum_frameintervals(&mut self, session: &mut Self::Session, query: V4l2Frmivalenum) -> IoctlResult<V4l2Frmivalenum>;
    /// `VIDIOC_SUBSCRIBE_EVENT`.
    fn subscribe_event(&mut self, session: &mut Self::Session, sub: V4l2EventSubscription) -> IoctlResult<()>;
    /// `VIDIOC_UNSUBSCRIBE_EVENT`.
    fn unsubscribe_event(&mut self, session: &mut Self::Session, sub: V4l2EventSubscription) -> IoctlResult<()>;
    /// `VIDIOC_G_SELECTION`.
    fn g_selection(&mut self, session: &mut Self::Session, sel: V4l2Selection) -> IoctlResult<V4l2Selection>;
    /// `VIDIOC_S_SELECTION`.
    fn s_selection(&mut self, session: &mut Self::Session, sel: V4l2Selection) -> IoctlResult<V4l2Selection>;
    /// `VIDIOC_G_TUNER` (`struct v4l2_tuner`, untyped).
    fn g_tuner(&mut self, session: &mut Self::Session, tuner: RawArg<84>) -> IoctlResult<RawArg<84>>;
    /// `VIDIOC_S_TUNER`.
    fn s_tuner(&mut self, session: &mut Self::Session, tuner: RawArg<84>) -> IoctlResult<()>;
    /// `VIDIOC_G_AUDIO` (`struct v4l2_audio`, untyped).
    fn g_audio(&mut self, session: &mut Self::Session) -> IoctlResult<RawArg<52>>;
    /// `VIDIOC_S_AUDIO`.
    fn s_audio(&mut self, session: &mut Self::Session, audio: RawArg<52>) -> IoctlResult<()>;
    /// `VIDIOC_ENUMAUDIO`.
    fn enumaudio(&mut self, session: &mut Self::Session, audio: RawArg<52>) -> IoctlResult<RawArg<52>>;
    /// `VIDIOC_G_AUDOUT` (`struct v4l2_audioout`, untyped).
    fn g_audout(&mut self, session: &mut Self::Session) -> IoctlResult<RawArg<52>>;
    /// `VIDIOC_S_AUDOUT`.
    fn s_audout(&mut self, session: &mut Self::Session, audout: RawArg<52>) -> IoctlResult<()>;
    /// `VIDIOC_ENUMAUDOUT`.
    fn enumaudout(&mut self, session: &mut Self::Session, audout: RawArg<52>) -> IoctlResult<RawArg<52>>;
    /// `VIDIOC_G_MODULATOR` (`struct v4l2_modulator`, untyped).
    fn g_modulator(&mut self, session: &mut Self::Session, modulator: RawArg<68>) -> IoctlResult<RawArg<68>>;
    /// `VIDIOC_S_MODULATOR`.
    fn s_modulator(&mut self, session: &mut Self::Session, modulator: RawArg<68>) -> IoctlResult<()>;
    /// `VIDIOC_G_FREQUENCY` (`struct v4l2_frequency`, untyped).
    fn g_frequency(&mut self, session: &mut Self::Session, freq: RawArg<44>) -> IoctlResult<RawArg<44>>;
    /// `VIDIOC_S_FREQUENCY`.
    fn s_frequency(&mut self, session: &mut Self::Session, freq: RawArg<44>) -> IoctlResult<()>;
    /// `VIDIOC_ENUM_FREQ_BANDS` (`struct v4l2_frequency_band`, untyped).
    fn enum_freq_bands(&mut self, session: &mut Self::Session, band: RawArg<64>) -> IoctlResult<RawArg<64>>;
    /// `VIDIOC_S_HW_FREQ_SEEK` (`struct v4l2_hw_freq_seek`, untyped).
    fn s_hw_freq_seek(&mut self, session: &mut Self::Session, seek: RawArg<48>) -> IoctlResult<()>;
    /// `VIDIOC_G_SLICED_VBI_CAP` (`struct v4l2_sliced_vbi_cap`, untyped).
    fn g_sliced_vbi_cap(&mut self, session: &mut Self::Session, cap: RawArg<116>) -> IoctlResult<RawArg<116>>;
    /// `VIDIOC_S_DV_TIMINGS` (`struct v4l2_dv_timings`, untyped).
    fn s_dv_timings(&mut self, session: &mut Self::Session, timings: RawArg<132>) -> IoctlResult<RawArg<132>>;
    /// `VIDIOC_G_DV_TIMINGS`.
    fn g_dv_timings(&mut self, session: &mut Self::Session, timings: RawArg<132>) -> IoctlResult<RawArg<132>>;
    /// `VIDIOC_QUERY_DV_TIMINGS`.
    fn query_dv_timings(&mut self, session: &mut Self::Session) -> IoctlResult<RawArg<132>>;
    /// `VIDIOC_ENUM_DV_TIMINGS` (`struct v4l2_enum_dv_timings`, untyped).
    fn enum_dv_timings(&mut self, session: &mut Self::Session, timings: RawArg<148>) -> IoctlResult<RawArg<148>>;
    /// `VIDIOC_DV_TIMINGS_CAP` (`struct v4l2_dv_timings_cap`, untyped).
    fn dv_timings_cap(&mut self, session: &mut Self::Session, cap: RawArg<144>) -> IoctlResult<RawArg<144>>;
    /// `VIDIOC_G_ENC_INDEX` (`struct v4l2_enc_idx`, untyped).
    fn g_enc_index(&mut self, session: &mut Self::Session) -> IoctlResult<RawArg<2072>>;
    /// `VIDIOC_ENCODER_CMD` (`struct v4l2_encoder_cmd`, untyped).
    fn encoder_cmd(&mut self, session: &mut Self::Session, cmd: RawArg<40>) -> IoctlResult<RawArg<40>>;
    /// `VIDIOC_TRY_ENCODER_CMD`.
    fn try_encoder_cmd(&mut self, session: &mut Self::Session, cmd: RawArg<40>) -> IoctlResult<RawArg<40>>;
    /// `VIDIOC_DECODER_CMD` (`struct v4l2_decoder_cmd`, untyped).
    fn decoder_cmd(&mut self, session: &mut Self::Session, cmd: RawArg<72>) -> IoctlResult<RawArg<72>>;
    /// `VIDIOC_TRY_DECODER_CMD`.
    fn try_decoder_cmd(&mut self, session: &mut Self::Session, cmd: RawArg<72>) -> IoctlResult<RawArg<72>>;
}

/// Writes an `Ok` header and `out`, or an error header.
fn respond<O: IntoBytes + Immutable>(
    w: &mut ChainWriter<'_>,
    res: IoctlResult<O>,
) -> Result<(), MediaError> {
    // By reference: moving a large answer (a 208-byte format) out of the result would
    // be one more copy.
    match &res {
        Ok(out) => w.write_ok_obj(out),
        Err(e) => w.write_err(*e),
    }
}

/// Reads an `I`, runs `f`, writes its answer.
fn wr<I, O>(
    ioctl: V4l2Ioctl,
    r: &mut ChainReader<'_>,
    w: &mut ChainWriter<'_>,
    f: impl FnOnce(I) -> IoctlResult<O>,
) -> Result<(), MediaError>
where
    I: FromBytes + IntoBytes,
    O: IntoBytes + Immutable,
{
    // The payload is named after the ioctl only in the error (no name lookup per call).
    match r.read_obj::<I>("ioctl payload") {
        Ok(input) => respond(w, f(input)),
        Err(e) => {
            outboard_protocol::log_limited!(
                log::Level::Debug,
                "virtio-media: {}: {e}",
                ioctl.name()
            );
            w.write_err(e.errno())
        }
    }
}

fn check_buf_type(t: u32) -> IoctlResult<u32> {
    if is_valid_buf_type(t) {
        Ok(t)
    } else {
        Err(libc::EINVAL)
    }
}

/// Most SG entries accepted for `len` bytes: one per page plus a partial page each side.
fn max_sg_entries(len: u64) -> usize {
    usize::try_from(len / 4096)
        .unwrap_or(usize::MAX)
        .saturating_add(2)
}

/// Reads a `v4l2_buffer`, its planes (multi-planar), and its USERPTR SG lists or DMABUF
/// virtio objects. Memory types other than MMAP, USERPTR and DMABUF get `EINVAL`; SG
/// lists of more than [`MAX_SG_ENTRIES`] entries in all get `ENOMEM`.
pub fn read_guest_buffer(r: &mut ChainReader<'_>) -> IoctlResult<GuestBuffer> {
    let buffer: V4l2Buffer = r.read_obj("v4l2_buffer").map_err(|e| e.errno())?;
    check_buf_type(buffer.type_)?;
    if !matches!(buffer.memory, MEMORY_MMAP | MEMORY_USERPTR | MEMORY_DMABUF) {
        return Err(libc::EINVAL);
    }
    let mut planes = Vec::new();
    if is_multiplanar(buffer.type_) {
        if buffer.length == 0 || buffer.length as usize > VIDEO_MAX_PLANES {
            return Err(libc::EINVAL);
        }
        for _ in 0..buffer.length {
            planes.push(
                r.read_obj::<V4l2Plane>("v4l2_plane")
                    .map_err(|e| e.errno())?,
            );
        }
    }
    let mut objects = Vec::new();
    if buffer.memory == MEMORY_DMABUF {
        // Planes are bounded above (at most VIDEO_MAX_PLANES), so is this.
        for _ in 0..planes.len().max(1) {
            objects.push(
                r.read_obj::<VirtioObjectId>("virtio object id")
                    .map_err(|e| e.errno())?,
            );
        }
    }
    let mut userptr = Vec::new();
    if buffer.memory == MEMORY_USERPTR {
        let lengths: Vec<u32> = if planes.is_empty() {
            vec![buffer.length]
        } else {
            planes.iter().map(|p| p.length).collect()
        };
        let mut budget = MAX_SG_ENTRIES;
        for len in lengths.into_iter().filter(|l| *l > 0) {
            userptr.push(r.read_sg_list_within(
                len.into(),
                max_sg_entries(len.into()),
                &mut budget,
            )?);
        }
    }
    Ok(GuestBuffer {
        desc: BufferDesc {
            buffer,
            planes,
            objects,
        },
        userptr,
    })
}

/// Writes a buffer answer: the buffer (plane pointer zeroed for multi-planar types), at
/// most `max_planes` planes and, for DMABUF memory, one virtio object per plane written
/// (one for single-planar types). A DMABUF answer without enough objects is a device
/// bug; the guest gets `EIO` rather than ids that were never given.
fn write_buffer(
    w: &mut ChainWriter<'_>,
    res: IoctlResult<BufferDesc>,
    max_planes: usize,
) -> Result<(), MediaError> {
    let mut desc = match res {
        Ok(desc) => desc,
        Err(e) => return w.write_err(e),
    };
    let planes = if is_multiplanar(desc.buffer.type_) {
        desc.buffer.m = 0;
        &desc.planes[..desc.planes.len().min(max_planes)]
    } else {
        &[]
    };
    let objects = if desc.buffer.memory == MEMORY_DMABUF {
        let n = planes.len().max(1);
        match desc.objects.get(..n) {
            Some(o) => o,
            None => return w.write_err(libc::EIO),
        }
    } else {
        &[]
    };
    w.write_obj(&RespHeader::ok())?;
    w.write_obj(&desc.buffer)?;
    for p in planes {
        w.write_obj(p)?;
    }
    for o in objects {
        w.write_obj(o)?;
    }
    Ok(())
}

/// For a queued or prepared DMABUF buffer, gives back the guest's fd placeholders and
/// virtio objects unchanged, whatever the handler answered (virtio-media requires it).
fn keep_guest_objects(res: IoctlResult<BufferDesc>, guest: &BufferDesc) -> IoctlResult<BufferDesc> {
    let mut desc = res?;
    if desc.buffer.memory == MEMORY_DMABUF && guest.buffer.memory == MEMORY_DMABUF {
        desc.buffer.m = guest.buffer.m;
        for (p, g) in desc.planes.iter_mut().zip(&guest.planes) {
            p.m = g.m;
        }
        desc.objects.clone_from(&guest.objects);
    }
    Ok(desc)
}

/// Reads `v4l2_ext_controls`, its controls and their payload SG lists (at most
/// [`MAX_SG_ENTRIES`] entries in all, else `ENOMEM`).
pub fn read_ext_controls(r: &mut ChainReader<'_>) -> IoctlResult<ExtControls> {
    let header: V4l2ExtControls = r.read_obj("v4l2_ext_controls").map_err(|e| e.errno())?;
    if header.count > MAX_EXT_CTRLS {
        return Err(libc::EINVAL);
    }
    let mut controls = Vec::with_capacity(header.count as usize);
    for _ in 0..header.count {
        controls.push(
            r.read_obj::<V4l2ExtControl>("v4l2_ext_control")
                .map_err(|e| e.errno())?,
        );
    }
    let mut payloads = Vec::new();
    let mut budget = MAX_SG_ENTRIES;
    for c in controls.iter().filter(|c| c.size > 0) {
        payloads.push(r.read_sg_list_within(
            c.size.into(),
            max_sg_entries(c.size.into()),
            &mut budget,
        )?);
    }
    Ok(ExtControls {
        header,
        controls,
        payloads,
    })
}

/// Counts and logs a payload refused because its SG lists are beyond
/// [`MAX_SG_ENTRIES`] (the only `ENOMEM` of [`read_guest_buffer`] and
/// [`read_ext_controls`]).
fn note_sg_refusal(metrics: Option<&MediaMetrics>, ioctl: V4l2Ioctl, errno: Errno) {
    if errno != libc::ENOMEM {
        return;
    }
    if let Some(m) = metrics {
        MediaMetrics::inc(&m.err_sg_limit);
    }
    outboard_protocol::log_limited!(
        log::Level::Warn,
        "virtio-media: {}: SG lists beyond {MAX_SG_ENTRIES} entries refused",
        ioctl.name()
    );
}

/// Writes the answer to an extended controls ioctl: the header (`res`'s status), the
/// structure and its controls, on error too (the guest sees `error_idx`).
fn write_ext_controls(
    w: &mut ChainWriter<'_>,
    ctrls: &mut ExtControls,
    res: IoctlResult<()>,
) -> Result<(), MediaError> {
    ctrls.header.controls = 0;
    match res {
        Ok(()) => w.write_obj(&RespHeader::ok())?,
        Err(e) => w.write_obj(&RespHeader::err(e.unsigned_abs()))?,
    }
    w.write_obj(&ctrls.header)?;
    for c in &ctrls.controls {
        w.write_obj(c)?;
    }
    Ok(())
}

/// Parses the payload of `ioctl`, calls `handler` and writes the response.
///
/// Returns an error only when the response does not fit the device-writable half; the
/// caller then answers with an error header if even that fits.
pub fn dispatch_ioctl<H: IoctlHandler>(
    handler: &mut H,
    session: &mut H::Session,
    ioctl: V4l2Ioctl,
    r: &mut ChainReader<'_>,
    w: &mut ChainWriter<'_>,
) -> Result<(), MediaError> {
    use V4l2Ioctl::*;
    let s = session;
    if ioctl.is_handled_by_driver() {
        return w.write_err(libc::ENOTTY);
    }
    match ioctl {
        VIDIOC_ENUM_FMT => wr(ioctl, r, w, |d: V4l2Fmtdesc| {
            check_buf_type(d.type_)?;
            handler.enum_fmt(s, d)
        }),
        VIDIOC_G_FMT => wr(ioctl, r, w, |f: V4l2Format| {
            handler.g_fmt(s, check_buf_type(f.type_)?)
        }),
        VIDIOC_S_FMT => wr(ioctl, r, w, |f: V4l2Format| {
            check_buf_type(f.type_)?;
            handler.s_fmt(s, f)
        }),
        VIDIOC_TRY_FMT => wr(ioctl, r, w, |f: V4l2Format| {
            check_buf_type(f.type_)?;
            handler.try_fmt(s, f)
        }),
        VIDIOC_REQBUFS => wr(ioctl, r, w, |q: V4l2Requestbuffers| {
            check_buf_type(q.type_)?;
            if !matches!(q.memory, MEMORY_MMAP | MEMORY_USERPTR | MEMORY_DMABUF) {
                return Err(libc::EINVAL);
            }
            handler.reqbufs(s, q)
        }),
        VIDIOC_QUERYBUF => {
            let b: V4l2Buffer = match r.read_obj(ioctl.name()) {
                Ok(b) => b,
                Err(e) => return w.write_err(e.errno()),
            };
            let res = check_buf_type(b.type_).and_then(|t| handler.querybuf(s, t, b.index));
            let max_planes = if is_multiplanar(b.type_) {
                b.length as usize
            } else {
                0
            };
            write_buffer(w, res, max_planes)
        }
        VIDIOC_QBUF | VIDIOC_PREPARE_BUF => match read_guest_buffer(r) {
            Ok(b) => {
                let max_planes = b.desc.planes.len();
                let guest = (b.desc.buffer.memory == MEMORY_DMABUF).then(|| b.desc.clone());
                let res = if ioctl == VIDIOC_QBUF {
                    handler.qbuf(s, b)
                } else {
                    handler.prepare_buf(s, b)
                };
                let res = match &guest {
                    Some(g) => keep_guest_objects(res, g),
                    None => res,
                };
                write_buffer(w, res, max_planes)
            }
            Err(e) => {
                note_sg_refusal(handler.metrics(), ioctl, e);
                w.write_err(e)
            }
        },
        VIDIOC_CREATE_BUFS => wr(ioctl, r, w, |c: V4l2CreateBuffers| {
            check_buf_type(c.format.type_)?;
            if !matches!(c.memory, MEMORY_MMAP | MEMORY_USERPTR | MEMORY_DMABUF) {
                return Err(libc::EINVAL);
            }
            handler.create_bufs(s, c)
        }),
        VIDIOC_EXPBUF => {
            let export: V4l2Exportbuffer = match r.read_obj(ioctl.name()) {
                Ok(e) => e,
                Err(e) => return w.write_err(e.errno()),
            };
            // The command reserves room for the id, as it would for any `WR` payload.
            if let Err(e) = r.read_obj::<VirtioObjectId>("virtio object id") {
                return w.write_err(e.errno());
            }
            // No buffer type check here: a device that cannot export answers ENOTTY
            // whatever the payload, as V4L2 does when a driver has no EXPBUF.
            match handler.expbuf(s, export) {
                Ok(id) => {
                    w.write_obj(&RespHeader::ok())?;
                    w.write_obj(&export)?;
                    w.write_obj(&id)
                }
                Err(e) => w.write_err(e),
            }
        }
        VIDIOC_REMOVE_BUFS => wr(ioctl, r, w, |c: V4l2RemoveBuffers| {
            check_buf_type(c.type_)?;
            handler.remove_bufs(s, c)
        }),
        VIDIOC_STREAMON => wr(ioctl, r, w, |t: u32| {
            handler.streamon(s, check_buf_type(t)?)
        }),
        VIDIOC_STREAMOFF => wr(ioctl, r, w, |t: u32| {
            handler.streamoff(s, check_buf_type(t)?)
        }),
        VIDIOC_G_PARM => wr(ioctl, r, w, |p: V4l2Streamparm| {
            handler.g_parm(s, check_buf_type(p.type_)?)
        }),
        VIDIOC_S_PARM => wr(ioctl, r, w, |p: V4l2Streamparm| {
            check_buf_type(p.type_)?;
            handler.s_parm(s, p)
        }),
        VIDIOC_G_STD => respond(w, handler.g_std(s)),
        VIDIOC_S_STD => wr(ioctl, r, w, |std: u64| handler.s_std(s, std)),
        VIDIOC_QUERYSTD => respond(w, handler.querystd(s)),
        VIDIOC_ENUMSTD => wr(ioctl, r, w, |e: V4l2Standard| handler.enumstd(s, e.index)),
        VIDIOC_ENUMINPUT => wr(ioctl, r, w, |i: V4l2Input| handler.enuminput(s, i.index)),
        VIDIOC_G_INPUT => respond(w, handler.g_input(s)),
        VIDIOC_S_INPUT => wr(ioctl, r, w, |i: i32| handler.s_input(s, i)),
        VIDIOC_ENUMOUTPUT => wr(ioctl, r, w, |o: V4l2Output| handler.enumoutput(s, o.index)),
        VIDIOC_G_OUTPUT => respond(w, handler.g_output(s)),
        VIDIOC_S_OUTPUT => wr(ioctl, r, w, |o: i32| handler.s_output(s, o)),
        VIDIOC_G_CTRL => wr(ioctl, r, w, |c: V4l2Control| handler.g_ctrl(s, c.id)),
        VIDIOC_S_CTRL => wr(ioctl, r, w, |c: V4l2Control| handler.s_ctrl(s, c)),
        VIDIOC_QUERYCTRL => wr(ioctl, r, w, |q: V4l2Queryctrl| handler.queryctrl(s, q)),
        VIDIOC_QUERY_EXT_CTRL => wr(ioctl, r, w, |q: V4l2QueryExtCtrl| {
            handler.query_ext_ctrl(s, q)
        }),
        VIDIOC_QUERYMENU => wr(ioctl, r, w, |q: V4l2Querymenu| {
            handler.querymenu(s, q.id, q.index)
        }),
        VIDIOC_G_EXT_CTRLS | VIDIOC_S_EXT_CTRLS | VIDIOC_TRY_EXT_CTRLS => {
            let mut ctrls = match read_ext_controls(r) {
                Ok(c) => c,
                Err(e) => {
                    note_sg_refusal(handler.metrics(), ioctl, e);
                    return w.write_err(e);
                }
            };
            let res = match ioctl {
                VIDIOC_G_EXT_CTRLS => handler.g_ext_ctrls(s, &mut ctrls),
                VIDIOC_S_EXT_CTRLS => handler.s_ext_ctrls(s, &mut ctrls),
                _ => handler.try_ext_ctrls(s, &mut ctrls),
            };
            write_ext_controls(w, &mut ctrls, res)
        }
        VIDIOC_ENUM_FRAMESIZES => wr(ioctl, r, w, |q: V4l2Frmsizeenum| {
            handler.enum_framesizes(s, q)
        }),
        VIDIOC_ENUM_FRAMEINTERVALS => wr(ioctl, r, w, |q: V4l2Frmivalenum| {
            handler.enum_frameintervals(s, q)
        }),
        VIDIOC_SUBSCRIBE_EVENT => wr(ioctl, r, w, |e: V4l2EventSubscription| {
            handler.subscribe_event(s, e)
        }),
        VIDIOC_UNSUBSCRIBE_EVENT => wr(ioctl, r, w, |e: V4l2EventSubscription| {
            handler.unsubscribe_event(s, e)
        }),
        VIDIOC_G_SELECTION => wr(ioctl, r, w, |q: V4l2Selection| {
            check_buf_type(q.type_)?;
            handler.g_selection(s, q)
        }),
        VIDIOC_S_SELECTION => wr(ioctl, r, w, |q: V4l2Selection| {
            check_buf_type(q.type_)?;
            handler.s_selection(s, q)
        }),
        VIDIOC_G_TUNER => wr(ioctl, r, w, |a| handler.g_tuner(s, a)),
        VIDIOC_S_TUNER => wr(ioctl, r, w, |a| handler.s_tuner(s, a)),
        VIDIOC_G_AUDIO => respond(w, handler.g_audio(s)),
        VIDIOC_S_AUDIO => wr(ioctl, r, w, |a| handler.s_audio(s, a)),
        VIDIOC_ENUMAUDIO => wr(ioctl, r, w, |a| handler.enumaudio(s, a)),
        VIDIOC_G_AUDOUT => respond(w, handler.g_audout(s)),
        VIDIOC_S_AUDOUT => wr(ioctl, r, w, |a| handler.s_audout(s, a)),
        VIDIOC_ENUMAUDOUT => wr(ioctl, r, w, |a| handler.enumaudout(s, a)),
        VIDIOC_G_MODULATOR => wr(ioctl, r, w, |a| handler.g_modulator(s, a)),
        VIDIOC_S_MODULATOR => wr(ioctl, r, w, |a| handler.s_modulator(s, a)),
        VIDIOC_G_FREQUENCY => wr(ioctl, r, w, |a| handler.g_frequency(s, a)),
        VIDIOC_S_FREQUENCY => wr(ioctl, r, w, |a| handler.s_frequency(s, a)),
        VIDIOC_ENUM_FREQ_BANDS => wr(ioctl, r, w, |a| handler.enum_freq_bands(s, a)),
        VIDIOC_S_HW_FREQ_SEEK => wr(ioctl, r, w, |a| handler.s_hw_freq_seek(s, a)),
        VIDIOC_G_SLICED_VBI_CAP => wr(ioctl, r, w, |a| handler.g_sliced_vbi_cap(s, a)),
        VIDIOC_S_DV_TIMINGS => wr(ioctl, r, w, |a| handler.s_dv_timings(s, a)),
        VIDIOC_G_DV_TIMINGS => wr(ioctl, r, w, |a| handler.g_dv_timings(s, a)),
        VIDIOC_QUERY_DV_TIMINGS => respond(w, handler.query_dv_timings(s)),
        VIDIOC_ENUM_DV_TIMINGS => wr(ioctl, r, w, |a| handler.enum_dv_timings(s, a)),
        VIDIOC_DV_TIMINGS_CAP => wr(ioctl, r, w, |a| handler.dv_timings_cap(s, a)),
        VIDIOC_G_ENC_INDEX => respond(w, handler.g_enc_index(s)),
        VIDIOC_ENCODER_CMD => wr(ioctl, r, w, |a| handler.encoder_cmd(s, a)),
        VIDIOC_TRY_ENCODER_CMD => wr(ioctl, r, w, |a| handler.try_encoder_cmd(s, a)),
        VIDIOC_DECODER_CMD => wr(ioctl, r, w, |a| handler.decoder_cmd(s, a)),
        VIDIOC_TRY_DECODER_CMD => wr(ioctl, r, w, |a| handler.try_decoder_cmd(s, a)),
        // Handled by the driver (filtered above), carried as events, or not expressible
        // over virtio-media (EDID pointers).
        VIDIOC_QUERYCAP
        | VIDIOC_G_FBUF
        | VIDIOC_S_FBUF
        | VIDIOC_OVERLAY
        | VIDIOC_DQBUF
        | VIDIOC_G_PRIORITY
        | VIDIOC_S_PRIORITY
        | VIDIOC_LOG_STATUS
        | VIDIOC_G_EDID
        | VIDIOC_S_EDID
        | VIDIOC_CROPCAP
        | VIDIOC_G_CROP
        | VIDIOC_S_CROP
        | VIDIOC_G_JPEGCOMP
        | VIDIOC_S_JPEGCOMP
        | VIDIOC_DBG_S_REGISTER
        | VIDIOC_DBG_G_REGISTER
        | VIDIOC_DQEVENT
        | VIDIOC_DBG_G_CHIP_INFO => w.write_err(libc::ENOTTY),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::IoRegion;

    /// Implements nothing: every ioctl must come back ENOTTY or, when the payload is
    /// invalid before the handler is reached, EINVAL.
    struct Nothing;
    impl IoctlHandler for Nothing {
        type Session = ();
    }

    /// Echoes queued buffers, to check the variable-length answer.
    struct Echo;
    impl IoctlHandler for Echo {
        type Session = ();
        fn qbuf(&mut self, _: &mut (), b: GuestBuffer) -> IoctlResult<BufferDesc> {
            Ok(b.desc)
        }
    }

    fn region(buf: &mut [u8]) -> [IoRegion; 1] {
        // SAFETY: `buf` outlives the region's use in each test; no reference to it is
        // used meanwhile.
        [unsafe { IoRegion::new(buf.as_mut_ptr(), buf.len()) }]
    }

    fn run<H: IoctlHandler<Session = ()>>(
        h: &mut H,
        ioctl: V4l2Ioctl,
        payload: &[u8],
    ) -> (u32, Vec<u8>) {
        run_into(h, ioctl, payload, 8192).unwrap()
    }

    /// Dispatches with a device-writable half of `resp_len` bytes.
    fn run_into<H: IoctlHandler<Session = ()>>(
        h: &mut H,
        ioctl: V4l2Ioctl,
        payload: &[u8],
        resp_len: usize,
    ) -> Result<(u32, Vec<u8>), MediaError> {
        let mut req = payload.to_vec();
        let mut resp = vec![0u8; resp_len];
        let rr = region(&mut req);
        let wr = region(&mut resp);
        let mut w = ChainWriter::new(&wr);
        dispatch_ioctl(h, &mut (), ioctl, &mut ChainReader::new(&rr), &mut w)?;
        let n = w.written();
        let status = u32::from_le_bytes([resp[0], resp[1], resp[2], resp[3]]);
        Ok((status, resp[8..n].to_vec()))
    }

    /// `n` one-page SG entries, all at the same guest page.
    fn page_entries(n: usize) -> Vec<u8> {
        let e = SgEntry {
            start: 0x1000,
            len: 4096,
            reserved: 0,
        };
        e.as_bytes().repeat(n)
    }

    #[test]
    fn sg_entries_are_capped_per_command() {
        let metrics = MediaMetrics::default();
        struct Counting<'a>(&'a MediaMetrics);
        impl IoctlHandler for Counting<'_> {
            type Session = ();
            fn metrics(&self) -> Option<&MediaMetrics> {
                Some(self.0)
            }
            fn qbuf(&mut self, _: &mut (), b: GuestBuffer) -> IoctlResult<BufferDesc> {
                Ok(b.desc)
            }
            fn s_ext_ctrls(&mut self, _: &mut (), _: &mut ExtControls) -> IoctlResult<()> {
                Ok(())
            }
        }
        let userptr = |n: usize| {
            let b = V4l2Buffer {
                type_: BUF_TYPE_VIDEO_CAPTURE,
                memory: MEMORY_USERPTR,
                length: (n * 4096) as u32,
                ..Default::default()
            };
            let mut payload = b.as_bytes().to_vec();
            payload.extend_from_slice(&page_entries(n));
            payload
        };
        let mut h = Counting(&metrics);
        // A list consistent with its length, up to the cap: accepted.
        let (status, _) = run(&mut h, V4l2Ioctl::VIDIOC_QBUF, &userptr(MAX_SG_ENTRIES));
        assert_eq!(status, 0);
        // One more entry (and page): ENOMEM, counted.
        let (status, out) = run(&mut h, V4l2Ioctl::VIDIOC_QBUF, &userptr(MAX_SG_ENTRIES + 1));
        assert_eq!((status, out.len()), (libc::ENOMEM as u32, 0));
        assert_eq!(metrics.snapshot().err_sg_limit, 1);
        // A list longer than its length allows (3 pages: at most 5 entries) is
        // malformed: EINVAL, not a cap.
        let b = V4l2Buffer {
            type_: BUF_TYPE_VIDEO_CAPTURE,
            memory: MEMORY_USERPTR,
            length: 3 * 4096,
            ..Default::default()
        };
        let tiny = SgEntry {
            start: 0x1000,
            len: 1,
            reserved: 0,
        };
        let mut payload = b.as_bytes().to_vec();
        payload.extend_from_slice(&tiny.as_bytes().repeat(8));
        let (status, _) = run(&mut h, V4l2Ioctl::VIDIOC_QBUF, &payload);
        assert_eq!(status, libc::EINVAL as u32);
        assert_eq!(metrics.snapshot().err_sg_limit, 1);

        // Extended control payloads: each list within the cap, together beyond it.
        let half = MAX_SG_ENTRIES / 2 + 1;
        let header = V4l2ExtControls {
            count: 2,
            ..Default::default()
        };
        let ctrl = V4l2ExtControl {
            id: 1,
            size: (half * 4096) as u32,
            ..Default::default()
        };
        let mut payload = header.as_bytes().to_vec();
        payload.extend_from_slice(ctrl.as_bytes());
        payload.extend_from_slice(ctrl.as_bytes());
        payload.extend_from_slice(&page_entries(2 * half));
        let (status, _) = run_into(&mut h, V4l2Ioctl::VIDIOC_S_EXT_CTRLS, &payload, 8192).unwrap();
        assert_eq!(status, libc::ENOMEM as u32);
        assert_eq!(metrics.snapshot().err_sg_limit, 2);
    }

    #[test]
    fn every_ioctl_is_answered() {
        for &ioctl in V4l2Ioctl::ALL {
            // A valid buffer type where the payload starts with one.
            let mut payload = vec![0u8; ioctl.arg_size() + 64];
            payload[..4].copy_from_slice(&BUF_TYPE_VIDEO_CAPTURE.to_le_bytes());
            let (status, out) = run(&mut Nothing, ioctl, &payload);
            assert!(
                status == libc::ENOTTY as u32 || status == libc::EINVAL as u32,
                "{ioctl}: status {status}"
            );
            // Only the extended controls answer their payload with an error (for
            // `error_idx`).
            let ext = matches!(
                ioctl,
                V4l2Ioctl::VIDIOC_G_EXT_CTRLS
                    | V4l2Ioctl::VIDIOC_S_EXT_CTRLS
                    | V4l2Ioctl::VIDIOC_TRY_EXT_CTRLS
            );
            assert_eq!(out.is_empty(), !ext, "{ioctl}: payload with an error");
            if ioctl.is_handled_by_driver() {
                assert_eq!(status, libc::ENOTTY as u32, "{ioctl}");
            }
            // A truncated argument never reaches the handler.
            if ioctl.dir().has_input() && !ioctl.is_handled_by_driver() && ioctl.arg_size() > 0 {
                let (status, _) = run(&mut Nothing, ioctl, &payload[..ioctl.arg_size() - 1]);
                assert!(
                    status == libc::EINVAL as u32 || status == libc::ENOTTY as u32,
                    "{ioctl}: truncated payload gave {status}"
                );
            }
        }
    }

    #[test]
    fn multiplanar_buffers_carry_their_planes() {
        let b = V4l2Buffer {
            type_: BUF_TYPE_VIDEO_CAPTURE_MPLANE,
            memory: MEMORY_USERPTR,
            length: 2,
            m: 0xdead_beef,
            ..Default::default()
        };
        let planes = [
            V4l2Plane {
                length: 4096,
                m: 1,
                ..Default::default()
            },
            V4l2Plane {
                length: 0,
                ..Default::default()
            },
        ];
        let sg = SgEntry {
            start: 0x1000,
            len: 4096,
            reserved: 0,
        };
        let mut payload = b.as_bytes().to_vec();
        for p in &planes {
            payload.extend_from_slice(p.as_bytes());
        }
        payload.extend_from_slice(sg.as_bytes());
        let (status, out) = run(&mut Echo, V4l2Ioctl::VIDIOC_QBUF, &payload);
        assert_eq!(status, 0);
        assert_eq!(out.len(), 88 + 2 * 64);
        let back = V4l2Buffer::read_from_prefix(&out).unwrap().0;
        assert_eq!(back.m, 0, "the guest's plane pointer is not echoed");
        assert_eq!(
            V4l2Plane::read_from_prefix(&out[88..]).unwrap().0.length,
            4096
        );
        // The SG list of the second plane is missing: a zero-length plane needs none,
        // but a 4 KiB one does.
        let mut short = payload.clone();
        short.truncate(short.len() - 16);
        assert_eq!(
            run(&mut Echo, V4l2Ioctl::VIDIOC_QBUF, &short).0,
            libc::EINVAL as u32
        );
    }

    /// Records what reaches it. Answers QBUF/PREPARE_BUF with the buffer's planes but a
    /// scribbled placeholder and no objects (the dispatcher must still give the guest's
    /// back), QUERYBUF with `querybuf`, EXPBUF with `export_id`.
    #[derive(Default)]
    struct Recorder {
        queued: Vec<(&'static str, GuestBuffer)>,
        querybuf: BufferDesc,
        export_id: VirtioObjectId,
        exported: Vec<V4l2Exportbuffer>,
    }

    impl Recorder {
        fn answer(&mut self, what: &'static str, b: GuestBuffer) -> IoctlResult<BufferDesc> {
            let mut desc = b.desc.clone();
            desc.buffer.m = 0x5c21_b61e;
            for p in &mut desc.planes {
                p.m = 0x5c21_b61e;
                p.bytesused = p.length;
            }
            desc.objects.clear();
            self.queued.push((what, b));
            Ok(desc)
        }
    }

    impl IoctlHandler for Recorder {
        type Session = ();
        fn qbuf(&mut self, _: &mut (), b: GuestBuffer) -> IoctlResult<BufferDesc> {
            self.answer("qbuf", b)
        }
        fn prepare_buf(&mut self, _: &mut (), b: GuestBuffer) -> IoctlResult<BufferDesc> {
            self.answer("prepare_buf", b)
        }
        fn querybuf(&mut self, _: &mut (), buf_type: u32, index: u32) -> IoctlResult<BufferDesc> {
            let mut d = self.querybuf.clone();
            d.buffer.type_ = buf_type;
            d.buffer.index = index;
            Ok(d)
        }
        fn expbuf(&mut self, _: &mut (), e: V4l2Exportbuffer) -> IoctlResult<VirtioObjectId> {
            self.exported.push(e);
            Ok(self.export_id)
        }
    }

    fn uuid(n: u8) -> VirtioObjectId {
        VirtioObjectId(core::array::from_fn(|i| n.wrapping_mul(17) ^ i as u8))
    }

    /// A DMABUF buffer of `planes` planes (0: single-planar) with fd placeholders
    /// `100 + plane`, followed by object `i + 1` for plane `i`.
    fn dmabuf_payload(planes: u32) -> (Vec<u8>, Vec<VirtioObjectId>) {
        let b = V4l2Buffer {
            index: 3,
            type_: if planes == 0 {
                BUF_TYPE_VIDEO_CAPTURE
            } else {
                BUF_TYPE_VIDEO_CAPTURE_MPLANE
            },
            memory: MEMORY_DMABUF,
            m: if planes == 0 { 100 } else { 0x7fff_0000_1000 },
            length: if planes == 0 { 8192 } else { planes },
            ..Default::default()
        };
        let mut payload = b.as_bytes().to_vec();
        for i in 0..planes {
            let p = V4l2Plane {
                length: 4096 * (i + 1),
                m: u64::from(100 + i),
                ..Default::default()
            };
            payload.extend_from_slice(p.as_bytes());
        }
        let ids: Vec<_> = (0..planes.max(1)).map(|i| uuid(i as u8 + 1)).collect();
        for id in &ids {
            payload.extend_from_slice(id.as_bytes());
        }
        (payload, ids)
    }

    #[test]
    fn dmabuf_objects_reach_the_handler_and_come_back() {
        for planes in [0u32, 1, 3, VIDEO_MAX_PLANES as u32] {
            for ioctl in [V4l2Ioctl::VIDIOC_QBUF, V4l2Ioctl::VIDIOC_PREPARE_BUF] {
                let (payload, ids) = dmabuf_payload(planes);
                let mut h = Recorder::default();
                // Trailing bytes after the last id are not part of the buffer.
                let mut long = payload.clone();
                long.extend_from_slice(&[0xee; 40]);
                let (status, out) = run(&mut h, ioctl, &long);
                assert_eq!(status, 0, "{ioctl} planes={planes}");
                let (what, got) = h.queued.pop().unwrap();
                assert_eq!(
                    what,
                    if ioctl == V4l2Ioctl::VIDIOC_QBUF {
                        "qbuf"
                    } else {
                        "prepare_buf"
                    }
                );
                assert_eq!(got.memory(), BufferMemory::DmaBuf(&ids), "planes={planes}");
                assert!(got.userptr.is_empty());
                assert_eq!(got.desc.planes.len(), planes as usize);

                // Response: buffer, planes, then one id per plane, in plane order.
                let n = planes as usize;
                assert_eq!(out.len(), 88 + 64 * n + 16 * n.max(1), "planes={planes}");
                let back = V4l2Buffer::read_from_prefix(&out).unwrap().0;
                assert_eq!(back.memory, MEMORY_DMABUF);
                if planes == 0 {
                    assert_eq!(back.m, 100, "the fd placeholder is the guest's");
                } else {
                    assert_eq!(back.m, 0, "the plane pointer is not echoed");
                }
                for i in 0..n {
                    let p = V4l2Plane::read_from_prefix(&out[88 + 64 * i..]).unwrap().0;
                    assert_eq!(p.m, 100 + i as u64, "plane {i} placeholder");
                    assert_eq!(p.bytesused, p.length, "plane {i} is the handler's");
                }
                let tail = &out[88 + 64 * n..];
                let back_ids: Vec<VirtioObjectId> = tail
                    .chunks_exact(16)
                    .map(|c| VirtioObjectId::read_from_bytes(c).unwrap())
                    .collect();
                assert_eq!(back_ids, ids);
            }
        }
    }

    #[test]
    fn truncated_or_invalid_dmabuf_buffers_get_einval() {
        for planes in [0u32, 2] {
            let (payload, _) = dmabuf_payload(planes);
            let header = 88 + 64 * planes as usize;
            // Every cut inside the ids (one id short included) is refused, and the
            // handler never sees the buffer.
            for cut in header..payload.len() {
                let mut h = Recorder::default();
                let (status, out) = run(&mut h, V4l2Ioctl::VIDIOC_QBUF, &payload[..cut]);
                assert_eq!(status, libc::EINVAL as u32, "planes={planes} cut={cut}");
                assert!(out.is_empty());
                assert!(h.queued.is_empty());
            }
        }
        // More planes than V4L2 allows: no ids are read at all.
        let (mut payload, _) = dmabuf_payload(VIDEO_MAX_PLANES as u32);
        payload[72..76].copy_from_slice(&(VIDEO_MAX_PLANES as u32 + 1).to_le_bytes());
        payload.extend_from_slice(&[0; 64 + 16]);
        let mut h = Recorder::default();
        assert_eq!(
            run(&mut h, V4l2Ioctl::VIDIOC_QBUF, &payload).0,
            libc::EINVAL as u32
        );
        // Memory types virtio-media does not carry (none, OVERLAY, unknown).
        for memory in [0u32, MEMORY_OVERLAY, 5, u32::MAX] {
            let (mut payload, _) = dmabuf_payload(1);
            payload[60..64].copy_from_slice(&memory.to_le_bytes());
            assert_eq!(
                run(&mut h, V4l2Ioctl::VIDIOC_PREPARE_BUF, &payload).0,
                libc::EINVAL as u32,
                "memory {memory}"
            );
        }
        assert!(h.queued.is_empty());
    }

    #[test]
    fn dmabuf_response_that_does_not_fit_is_an_error() {
        let (payload, _) = dmabuf_payload(3);
        // Header + buffer + planes fit, the ids do not.
        let err = run_into(
            &mut Recorder::default(),
            V4l2Ioctl::VIDIOC_QBUF,
            &payload,
            8 + 88 + 3 * 64 + 47,
        )
        .unwrap_err();
        assert_eq!(err.errno(), libc::ENOSPC);
        let (status, out) = run_into(
            &mut Recorder::default(),
            V4l2Ioctl::VIDIOC_QBUF,
            &payload,
            8 + 88 + 3 * 64 + 48,
        )
        .unwrap();
        assert_eq!((status, out.len()), (0, 88 + 3 * 64 + 48));
    }

    #[test]
    fn querybuf_answers_dmabuf_objects_after_the_planes() {
        let mut h = Recorder {
            querybuf: BufferDesc {
                buffer: V4l2Buffer {
                    memory: MEMORY_DMABUF,
                    length: 2,
                    ..Default::default()
                },
                planes: vec![V4l2Plane::default(); 2],
                objects: vec![uuid(7), uuid(8)],
            },
            ..Default::default()
        };
        let query = |length: u32| {
            V4l2Buffer {
                index: 1,
                type_: BUF_TYPE_VIDEO_CAPTURE_MPLANE,
                memory: MEMORY_DMABUF,
                length,
                ..Default::default()
            }
            .as_bytes()
            .to_vec()
        };
        let (status, out) = run(&mut h, V4l2Ioctl::VIDIOC_QUERYBUF, &query(2));
        assert_eq!(status, 0);
        assert_eq!(out.len(), 88 + 2 * 64 + 2 * 16);
        assert_eq!(&out[88 + 128..88 + 144], uuid(7).as_bytes());
        assert_eq!(&out[88 + 144..], uuid(8).as_bytes());
        // The guest has room for one plane only: one plane, one id.
        let (status, out) = run(&mut h, V4l2Ioctl::VIDIOC_QUERYBUF, &query(1));
        assert_eq!(status, 0);
        assert_eq!(out.len(), 88 + 64 + 16);
        assert_eq!(&out[88 + 64..], uuid(7).as_bytes());
        // A device that answers DMABUF without its objects: EIO, not made-up ids.
        h.querybuf.objects.truncate(1);
        let (status, out) = run(&mut h, V4l2Ioctl::VIDIOC_QUERYBUF, &query(2));
        assert_eq!((status, out.len()), (libc::EIO as u32, 0));
        // Single-planar: one id after the buffer.
        h.querybuf = BufferDesc {
            buffer: V4l2Buffer {
                memory: MEMORY_DMABUF,
                m: 42,
                ..Default::default()
            },
            planes: Vec::new(),
            objects: vec![uuid(9)],
        };
        let mut q = query(0);
        q[4..8].copy_from_slice(&BUF_TYPE_VIDEO_CAPTURE.to_le_bytes());
        let (status, out) = run(&mut h, V4l2Ioctl::VIDIOC_QUERYBUF, &q);
        assert_eq!(status, 0);
        assert_eq!(out.len(), 88 + 16);
        assert_eq!(V4l2Buffer::read_from_prefix(&out).unwrap().0.m, 42);
        assert_eq!(&out[88..], uuid(9).as_bytes());
    }

    #[test]
    fn expbuf_answers_the_object_id_after_the_structure() {
        let export = V4l2Exportbuffer {
            type_: BUF_TYPE_VIDEO_CAPTURE,
            index: 2,
            fd: -1,
            ..Default::default()
        };
        let mut payload = export.as_bytes().to_vec();
        payload.extend_from_slice(&[0; 16]);
        let mut h = Recorder {
            export_id: uuid(5),
            ..Default::default()
        };
        let (status, out) = run(&mut h, V4l2Ioctl::VIDIOC_EXPBUF, &payload);
        assert_eq!(status, 0);
        assert_eq!(h.exported, [export]);
        assert_eq!(out.len(), 64 + 16);
        assert_eq!(V4l2Exportbuffer::read_from_prefix(&out).unwrap().0, export);
        assert_eq!(&out[64..], uuid(5).as_bytes());
        // No room reserved for the id: EINVAL before the handler.
        let (status, _) = run(&mut h, V4l2Ioctl::VIDIOC_EXPBUF, &payload[..64 + 15]);
        assert_eq!(status, libc::EINVAL as u32);
        assert_eq!(h.exported.len(), 1);
        // A device that cannot export.
        assert_eq!(
            run(&mut Nothing, V4l2Ioctl::VIDIOC_EXPBUF, &payload).0,
            libc::ENOTTY as u32
        );
    }

    #[test]
    fn dqbuf_event_of_a_dmabuf_buffer_has_the_fixed_layout() {
        // The event is a fixed-size structure: the buffer and up to VIDEO_MAX_PLANES
        // planes, no virtio objects (the driver keeps the ones it queued).
        let (payload, _) = dmabuf_payload(2);
        let b = V4l2Buffer::read_from_prefix(&payload).unwrap().0;
        let planes = [
            V4l2Plane::read_from_prefix(&payload[88..]).unwrap().0,
            V4l2Plane::read_from_prefix(&payload[88 + 64..]).unwrap().0,
        ];
        let ev = crate::media::MediaEvent::dqbuf(4, &b, &planes);
        let bytes = ev.as_bytes();
        assert_eq!(bytes.len(), 8 + 88 + 8 * 64);
        assert_eq!(&bytes[8..8 + 88], b.as_bytes());
        assert_eq!(&bytes[96..96 + 128], &payload[88..88 + 128]);
        assert!(bytes[96 + 128..].iter().all(|&x| x == 0));
    }

    #[test]
    fn buffer_allocation_takes_the_three_memory_types_only() {
        for memory in [
            0u32,
            MEMORY_MMAP,
            MEMORY_USERPTR,
            MEMORY_OVERLAY,
            MEMORY_DMABUF,
            99,
        ] {
            let expected = if matches!(memory, MEMORY_MMAP | MEMORY_USERPTR | MEMORY_DMABUF) {
                libc::ENOTTY // reached the handler
            } else {
                libc::EINVAL
            } as u32;
            let req = V4l2Requestbuffers {
                count: 2,
                type_: BUF_TYPE_VIDEO_CAPTURE,
                memory,
                ..Default::default()
            };
            assert_eq!(
                run(&mut Nothing, V4l2Ioctl::VIDIOC_REQBUFS, req.as_bytes()).0,
                expected,
                "REQBUFS memory {memory}"
            );
            let mut create = V4l2CreateBuffers {
                count: 2,
                memory,
                ..Default::default()
            };
            create.format.type_ = BUF_TYPE_VIDEO_CAPTURE;
            assert_eq!(
                run(
                    &mut Nothing,
                    V4l2Ioctl::VIDIOC_CREATE_BUFS,
                    create.as_bytes()
                )
                .0,
                expected,
                "CREATE_BUFS memory {memory}"
            );
        }
    }
}
