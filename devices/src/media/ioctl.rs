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
//!
//! Pointers inside structures are zeroed in responses so that no host address leaks.
//! A payload that cannot be parsed is answered with `EINVAL`; ioctls the driver handles
//! itself ([`V4l2Ioctl::is_handled_by_driver`]), `VIDIOC_EXPBUF` (no fds cross
//! virtio-media) and `VIDIOC_G_EDID`/`VIDIOC_S_EDID` (pointer payloads virtio-media does
//! not describe) are answered with `ENOTTY`. DMABUF memory (virtio objects) is not
//! supported by the dispatcher: such buffers are passed to the handler without backing
//! and devices refuse them.

use outboard_protocol::media::{RespHeader, SgEntry};
use outboard_protocol::v4l2::V4l2Ioctl;
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::v4l2::*;
use super::{ChainReader, ChainWriter, Errno, MediaError};

/// Result of an ioctl handler: a value or a positive errno.
pub type IoctlResult<T> = Result<T, Errno>;

/// Most controls one `VIDIOC_*_EXT_CTRLS` call may carry (`V4L2_CID_MAX_CTRLS`).
pub const MAX_EXT_CTRLS: u32 = 1024;

/// A `v4l2_buffer` with its planes (multi-planar types only; empty otherwise).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BufferDesc {
    /// The buffer.
    pub buffer: V4l2Buffer,
    /// Its planes (`buffer.length` of them for multi-planar types).
    pub planes: Vec<V4l2Plane>,
}

/// A buffer the guest queues or prepares, with its USERPTR backing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestBuffer {
    /// The buffer and its planes as the guest sent them.
    pub desc: BufferDesc,
    /// For USERPTR memory: one guest SG list per plane with a non-zero length (one list
    /// for single-planar buffers). Empty for other memory types.
    pub userptr: Vec<Vec<SgEntry>>,
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
    match res {
        Ok(out) => {
            w.write_obj(&RespHeader::ok())?;
            w.write_obj(&out)
        }
        Err(e) => w.write_err(e),
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
    match r.read_obj::<I>(ioctl.name()) {
        Ok(input) => respond(w, f(input)),
        Err(e) => w.write_err(e.errno()),
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

/// Reads a `v4l2_buffer`, its planes (multi-planar) and USERPTR SG lists.
pub fn read_guest_buffer(r: &mut ChainReader<'_>) -> IoctlResult<GuestBuffer> {
    let buffer: V4l2Buffer = r.read_obj("v4l2_buffer").map_err(|e| e.errno())?;
    check_buf_type(buffer.type_)?;
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
    let mut userptr = Vec::new();
    if buffer.memory == MEMORY_USERPTR {
        let lengths: Vec<u32> = if planes.is_empty() {
            vec![buffer.length]
        } else {
            planes.iter().map(|p| p.length).collect()
        };
        for len in lengths.into_iter().filter(|l| *l > 0) {
            userptr.push(r.read_sg_list(len.into(), max_sg_entries(len.into()))?);
        }
    }
    Ok(GuestBuffer {
        desc: BufferDesc { buffer, planes },
        userptr,
    })
}

/// Writes a buffer answer: the buffer (plane pointer zeroed for multi-planar types) and
/// at most `max_planes` planes.
fn write_buffer(
    w: &mut ChainWriter<'_>,
    res: IoctlResult<BufferDesc>,
    max_planes: usize,
) -> Result<(), MediaError> {
    match res {
        Ok(mut desc) => {
            if is_multiplanar(desc.buffer.type_) {
                desc.buffer.m = 0;
            }
            w.write_obj(&RespHeader::ok())?;
            w.write_obj(&desc.buffer)?;
            for p in desc.planes.iter().take(max_planes) {
                w.write_obj(p)?;
            }
            Ok(())
        }
        Err(e) => w.write_err(e),
    }
}

/// Reads `v4l2_ext_controls`, its controls and their payload SG lists.
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
    for c in controls.iter().filter(|c| c.size > 0) {
        payloads.push(r.read_sg_list(c.size.into(), max_sg_entries(c.size.into()))?);
    }
    Ok(ExtControls {
        header,
        controls,
        payloads,
    })
}

fn ext_ctrls_ioctl(
    r: &mut ChainReader<'_>,
    w: &mut ChainWriter<'_>,
    f: impl FnOnce(&mut ExtControls) -> IoctlResult<()>,
) -> Result<(), MediaError> {
    let mut ctrls = match read_ext_controls(r) {
        Ok(c) => c,
        Err(e) => return w.write_err(e),
    };
    let res = f(&mut ctrls);
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
                let res = if ioctl == VIDIOC_QBUF {
                    handler.qbuf(s, b)
                } else {
                    handler.prepare_buf(s, b)
                };
                write_buffer(w, res, max_planes)
            }
            Err(e) => w.write_err(e),
        },
        VIDIOC_CREATE_BUFS => wr(ioctl, r, w, |c: V4l2CreateBuffers| {
            check_buf_type(c.format.type_)?;
            handler.create_bufs(s, c)
        }),
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
        VIDIOC_G_EXT_CTRLS => ext_ctrls_ioctl(r, w, |c| handler.g_ext_ctrls(s, c)),
        VIDIOC_S_EXT_CTRLS => ext_ctrls_ioctl(r, w, |c| handler.s_ext_ctrls(s, c)),
        VIDIOC_TRY_EXT_CTRLS => ext_ctrls_ioctl(r, w, |c| handler.try_ext_ctrls(s, c)),
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
        // over virtio-media (fd export, EDID pointers).
        VIDIOC_QUERYCAP
        | VIDIOC_G_FBUF
        | VIDIOC_S_FBUF
        | VIDIOC_OVERLAY
        | VIDIOC_EXPBUF
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
        let mut req = payload.to_vec();
        let mut resp = vec![0u8; 8192];
        let rr = region(&mut req);
        let wr = region(&mut resp);
        let mut w = ChainWriter::new(&wr);
        dispatch_ioctl(h, &mut (), ioctl, &mut ChainReader::new(&rr), &mut w).unwrap();
        let n = w.written();
        let status = u32::from_le_bytes([resp[0], resp[1], resp[2], resp[3]]);
        (status, resp[8..n].to_vec())
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
}
