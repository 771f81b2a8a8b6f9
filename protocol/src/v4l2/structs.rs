//! Typed V4L2 structures in their 64-bit Linux layouts (`linux/videodev2.h`).
//!
//! virtio-media carries V4L2 ioctl arguments in the layout a 64-bit Linux kernel uses,
//! little-endian. Every structure here is `repr(C)` with explicit padding fields so that
//! zerocopy can read it from and write it to guest memory; the sizes are pinned by tests
//! against [`V4l2Ioctl::arg_size`](super::V4l2Ioctl::arg_size).
//! Pointers (`v4l2_buffer.m.planes`, `v4l2_ext_controls.controls`, ...) are opaque
//! 64-bit values: the guest's pointers mean nothing to the device, virtio-media sends the
//! pointed-to data after the structure instead, and the device zeroes them in answers.
//!
//! The ioctls a capture device never needs (tuners, audio, modulators, DV timings,
//! encoder/decoder commands, the encoder index) are carried as fixed-size byte arrays
//! ([`RawArg`]) of their exact kernel size, so that a device can still implement them.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::VIDEO_MAX_PLANES;

macro_rules! wire {
    ($(#[$m:meta])* pub struct $name:ident { $($body:tt)* }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
        pub struct $name { $($body)* }

        impl Default for $name {
            fn default() -> Self {
                <Self as zerocopy::FromZeros>::new_zeroed()
            }
        }
    };
}

wire! {
    /// `struct v4l2_fract`.
    pub struct V4l2Fract {
        /// Numerator.
        pub numerator: u32,
        /// Denominator.
        pub denominator: u32,
    }
}

wire! {
    /// `struct v4l2_rect`.
    pub struct V4l2Rect {
        /// Left edge.
        pub left: i32,
        /// Top edge.
        pub top: i32,
        /// Width.
        pub width: u32,
        /// Height.
        pub height: u32,
    }
}

wire! {
    /// `struct v4l2_pix_format` (48 bytes), the single-planar member of
    /// [`V4l2Format`]'s union.
    pub struct V4l2PixFormat {
        /// Width in pixels.
        pub width: u32,
        /// Height in pixels.
        pub height: u32,
        /// FourCC.
        pub pixelformat: u32,
        /// `V4L2_FIELD_*`.
        pub field: u32,
        /// Bytes per line of the first plane.
        pub bytesperline: u32,
        /// Size of the image in bytes.
        pub sizeimage: u32,
        /// `V4L2_COLORSPACE_*`.
        pub colorspace: u32,
        /// Private field (`V4L2_PIX_FMT_PRIV_MAGIC` with extended fields).
        pub priv_: u32,
        /// `V4L2_PIX_FMT_FLAG_*`.
        pub flags: u32,
        /// `V4L2_YCBCR_ENC_*` (or HSV encoding).
        pub ycbcr_enc: u32,
        /// `V4L2_QUANTIZATION_*`.
        pub quantization: u32,
        /// `V4L2_XFER_FUNC_*`.
        pub xfer_func: u32,
    }
}

wire! {
    /// `struct v4l2_format` (208 bytes): a buffer type and a 200-byte union.
    pub struct V4l2Format {
        /// `V4L2_BUF_TYPE_*`.
        pub type_: u32,
        /// Padding before the 8-byte aligned union.
        pub _pad: u32,
        /// The format union (`pix`, `pix_mp`, `win`, `vbi`, `sdr`, `meta`, `raw_data`).
        pub fmt: [u8; 200],
    }
}

impl V4l2Format {
    /// A single-planar format of `buf_type`.
    pub fn from_pix(buf_type: u32, pix: &V4l2PixFormat) -> Self {
        let mut f = V4l2Format {
            type_: buf_type,
            ..Default::default()
        };
        f.fmt[..size_of::<V4l2PixFormat>()].copy_from_slice(pix.as_bytes());
        f
    }

    /// The union read as `v4l2_pix_format`.
    pub fn pix(&self) -> V4l2PixFormat {
        V4l2PixFormat::read_from_prefix(&self.fmt)
            .map(|(p, _)| p)
            .unwrap_or_default()
    }

    /// Stores `pix` in the union (the rest of the union is zeroed).
    pub fn set_pix(&mut self, pix: &V4l2PixFormat) {
        let (head, tail) = self.fmt.split_at_mut(size_of::<V4l2PixFormat>());
        head.copy_from_slice(pix.as_bytes());
        tail.fill(0);
    }
}

wire! {
    /// `struct v4l2_plane_pix_format` (20 bytes).
    pub struct V4l2PlanePixFormat {
        /// Bytes of the plane.
        pub sizeimage: u32,
        /// Bytes per line of the plane.
        pub bytesperline: u32,
        /// Reserved.
        pub reserved: [u16; 6],
    }
}

wire! {
    /// `struct v4l2_pix_format_mplane` (192 bytes), the multi-planar member of
    /// [`V4l2Format`]'s union.
    pub struct V4l2PixFormatMplane {
        /// Width in pixels.
        pub width: u32,
        /// Height in pixels.
        pub height: u32,
        /// FourCC.
        pub pixelformat: u32,
        /// `V4L2_FIELD_*`.
        pub field: u32,
        /// `V4L2_COLORSPACE_*`.
        pub colorspace: u32,
        /// The planes (`num_planes` of them are meaningful).
        pub plane_fmt: [V4l2PlanePixFormat; VIDEO_MAX_PLANES],
        /// Number of planes.
        pub num_planes: u8,
        /// `V4L2_PIX_FMT_FLAG_*`.
        pub flags: u8,
        /// `V4L2_YCBCR_ENC_*`.
        pub ycbcr_enc: u8,
        /// `V4L2_QUANTIZATION_*`.
        pub quantization: u8,
        /// `V4L2_XFER_FUNC_*`.
        pub xfer_func: u8,
        /// Reserved.
        pub reserved: [u8; 7],
    }
}

impl V4l2Format {
    /// A multi-planar format of `buf_type`.
    pub fn from_pix_mp(buf_type: u32, pix: &V4l2PixFormatMplane) -> Self {
        let mut f = V4l2Format {
            type_: buf_type,
            ..Default::default()
        };
        let bytes = pix.as_bytes();
        f.fmt[..bytes.len()].copy_from_slice(bytes);
        f
    }

    /// The union read as `v4l2_pix_format_mplane`.
    pub fn pix_mp(&self) -> V4l2PixFormatMplane {
        V4l2PixFormatMplane::read_from_prefix(&self.fmt)
            .map(|(p, _)| p)
            .unwrap_or_default()
    }
}

wire! {
    /// `struct v4l2_fmtdesc` (64 bytes).
    pub struct V4l2Fmtdesc {
        /// Index of the format to enumerate.
        pub index: u32,
        /// `V4L2_BUF_TYPE_*`.
        pub type_: u32,
        /// `V4L2_FMT_FLAG_*`.
        pub flags: u32,
        /// Human-readable description, NUL-terminated.
        pub description: [u8; 32],
        /// FourCC.
        pub pixelformat: u32,
        /// Media bus code filter.
        pub mbus_code: u32,
        /// Reserved.
        pub reserved: [u32; 3],
    }
}

wire! {
    /// `struct v4l2_requestbuffers` (20 bytes).
    pub struct V4l2Requestbuffers {
        /// Number of buffers requested / allocated.
        pub count: u32,
        /// `V4L2_BUF_TYPE_*`.
        pub type_: u32,
        /// `V4L2_MEMORY_*`.
        pub memory: u32,
        /// `V4L2_BUF_CAP_*` (set by the device).
        pub capabilities: u32,
        /// `V4L2_MEMORY_FLAG_*`.
        pub flags: u8,
        /// Reserved.
        pub reserved: [u8; 3],
    }
}

wire! {
    /// `struct timeval` on 64-bit Linux.
    pub struct Timeval {
        /// Seconds.
        pub tv_sec: i64,
        /// Microseconds.
        pub tv_usec: i64,
    }
}

wire! {
    /// `struct timespec` on 64-bit Linux.
    pub struct Timespec {
        /// Seconds.
        pub tv_sec: i64,
        /// Nanoseconds.
        pub tv_nsec: i64,
    }
}

wire! {
    /// `struct v4l2_timecode` (16 bytes).
    pub struct V4l2Timecode {
        /// `V4L2_TC_TYPE_*`.
        pub type_: u32,
        /// `V4L2_TC_FLAG_*`.
        pub flags: u32,
        /// Frames.
        pub frames: u8,
        /// Seconds.
        pub seconds: u8,
        /// Minutes.
        pub minutes: u8,
        /// Hours.
        pub hours: u8,
        /// User bits.
        pub userbits: [u8; 4],
    }
}

wire! {
    /// `struct v4l2_buffer` (88 bytes).
    ///
    /// `m` is the 8-byte union `offset` (MMAP, low 32 bits) / `userptr` / `planes` /
    /// `fd` (DMABUF, low 32 bits), little-endian.
    pub struct V4l2Buffer {
        /// Buffer index.
        pub index: u32,
        /// `V4L2_BUF_TYPE_*`.
        pub type_: u32,
        /// Bytes of data in the buffer (single-planar).
        pub bytesused: u32,
        /// `V4L2_BUF_FLAG_*`.
        pub flags: u32,
        /// `V4L2_FIELD_*`.
        pub field: u32,
        /// Padding before the timestamp.
        pub _pad0: u32,
        /// Timestamp.
        pub timestamp: Timeval,
        /// Timecode.
        pub timecode: V4l2Timecode,
        /// Frame sequence number.
        pub sequence: u32,
        /// `V4L2_MEMORY_*`.
        pub memory: u32,
        /// The `m` union.
        pub m: u64,
        /// Buffer length (single-planar) or number of planes (multi-planar).
        pub length: u32,
        /// Reserved.
        pub reserved2: u32,
        /// `request_fd`.
        pub request_fd: i32,
        /// Trailing padding.
        pub _pad1: u32,
    }
}

impl V4l2Buffer {
    /// `m.offset` (MMAP memory).
    pub fn mem_offset(&self) -> u32 {
        self.m as u32
    }
}

wire! {
    /// `struct v4l2_plane` (64 bytes).
    pub struct V4l2Plane {
        /// Bytes of data in the plane.
        pub bytesused: u32,
        /// Plane length.
        pub length: u32,
        /// The `m` union (`mem_offset` / `userptr` / `fd`).
        pub m: u64,
        /// Offset of the data in the plane.
        pub data_offset: u32,
        /// Reserved.
        pub reserved: [u32; 11],
    }
}

wire! {
    /// `struct v4l2_frmsizeenum` (44 bytes). `size` is the union of
    /// `discrete {width, height}` (first two words) and `stepwise` (six words).
    pub struct V4l2Frmsizeenum {
        /// Index.
        pub index: u32,
        /// FourCC.
        pub pixel_format: u32,
        /// `V4L2_FRMSIZE_TYPE_*`.
        pub type_: u32,
        /// The size union.
        pub size: [u32; 6],
        /// Reserved.
        pub reserved: [u32; 2],
    }
}

wire! {
    /// `struct v4l2_frmivalenum` (52 bytes). `interval` is the union of `discrete` (a
    /// fraction, first two words) and `stepwise` (three fractions).
    pub struct V4l2Frmivalenum {
        /// Index.
        pub index: u32,
        /// FourCC.
        pub pixel_format: u32,
        /// Width.
        pub width: u32,
        /// Height.
        pub height: u32,
        /// `V4L2_FRMIVAL_TYPE_*`.
        pub type_: u32,
        /// The interval union.
        pub interval: [u32; 6],
        /// Reserved.
        pub reserved: [u32; 2],
    }
}

wire! {
    /// `struct v4l2_captureparm` (40 bytes).
    pub struct V4l2Captureparm {
        /// `V4L2_CAP_TIMEPERFRAME`.
        pub capability: u32,
        /// `V4L2_MODE_HIGHQUALITY`.
        pub capturemode: u32,
        /// Frame interval.
        pub timeperframe: V4l2Fract,
        /// Driver specific.
        pub extendedmode: u32,
        /// Number of buffers for read().
        pub readbuffers: u32,
        /// Reserved.
        pub reserved: [u32; 4],
    }
}

wire! {
    /// `struct v4l2_streamparm` (204 bytes): a buffer type and a 200-byte union whose
    /// capture member is [`V4l2Captureparm`].
    pub struct V4l2Streamparm {
        /// `V4L2_BUF_TYPE_*`.
        pub type_: u32,
        /// The parameter union.
        pub parm: [u8; 200],
    }
}

impl V4l2Streamparm {
    /// The union read as capture parameters.
    pub fn capture(&self) -> V4l2Captureparm {
        V4l2Captureparm::read_from_prefix(&self.parm)
            .map(|(p, _)| p)
            .unwrap_or_default()
    }

    /// Stores capture parameters in the union (the rest is zeroed).
    pub fn set_capture(&mut self, c: &V4l2Captureparm) {
        self.parm = [0; 200];
        let bytes = c.as_bytes();
        self.parm[..bytes.len()].copy_from_slice(bytes);
    }
}

wire! {
    /// `struct v4l2_control` (8 bytes).
    pub struct V4l2Control {
        /// Control id.
        pub id: u32,
        /// Value.
        pub value: i32,
    }
}

wire! {
    /// `struct v4l2_queryctrl` (68 bytes).
    pub struct V4l2Queryctrl {
        /// Control id (with `V4L2_CTRL_FLAG_NEXT_*` flags in queries).
        pub id: u32,
        /// `V4L2_CTRL_TYPE_*`.
        pub type_: u32,
        /// Name, NUL-terminated.
        pub name: [u8; 32],
        /// Minimum.
        pub minimum: i32,
        /// Maximum.
        pub maximum: i32,
        /// Step.
        pub step: i32,
        /// Default.
        pub default_value: i32,
        /// `V4L2_CTRL_FLAG_*`.
        pub flags: u32,
        /// Reserved.
        pub reserved: [u32; 2],
    }
}

wire! {
    /// `struct v4l2_query_ext_ctrl` (232 bytes).
    pub struct V4l2QueryExtCtrl {
        /// Control id.
        pub id: u32,
        /// `V4L2_CTRL_TYPE_*`.
        pub type_: u32,
        /// Name, NUL-terminated.
        pub name: [u8; 32],
        /// Minimum.
        pub minimum: i64,
        /// Maximum.
        pub maximum: i64,
        /// Step.
        pub step: u64,
        /// Default.
        pub default_value: i64,
        /// `V4L2_CTRL_FLAG_*`.
        pub flags: u32,
        /// Size of one element.
        pub elem_size: u32,
        /// Number of elements.
        pub elems: u32,
        /// Number of dimensions.
        pub nr_of_dims: u32,
        /// Dimensions.
        pub dims: [u32; 4],
        /// Reserved.
        pub reserved: [u32; 32],
    }
}

wire! {
    /// `struct v4l2_querymenu` (44 bytes, packed in the kernel). `name` is the union of
    /// the item's name and its 64-bit value (integer menus).
    pub struct V4l2Querymenu {
        /// Control id.
        pub id: u32,
        /// Menu item index.
        pub index: u32,
        /// Name (or value, little-endian, for integer menus).
        pub name: [u8; 32],
        /// Reserved.
        pub reserved: u32,
    }
}

wire! {
    /// `struct v4l2_ext_control` (20 bytes, packed in the kernel). `value` is the union
    /// `value` (i32) / `value64` (i64) / pointer, little-endian.
    pub struct V4l2ExtControl {
        /// Control id.
        pub id: u32,
        /// Payload size for pointer controls (0 for plain values).
        pub size: u32,
        /// Reserved.
        pub reserved2: u32,
        /// The value union.
        pub value: [u8; 8],
    }
}

impl V4l2ExtControl {
    /// The union as a 32-bit value.
    pub fn value(&self) -> i32 {
        i32::from_le_bytes([self.value[0], self.value[1], self.value[2], self.value[3]])
    }

    /// The union as a 64-bit value.
    pub fn value64(&self) -> i64 {
        i64::from_le_bytes(self.value)
    }

    /// Stores a 32-bit value (the upper bytes are zeroed).
    pub fn set_value(&mut self, v: i32) {
        self.value = i64::from(v).to_le_bytes();
        self.value[4..].fill(0);
    }
}

wire! {
    /// `struct v4l2_ext_controls` (32 bytes).
    pub struct V4l2ExtControls {
        /// `ctrl_class` / `which` (`V4L2_CTRL_WHICH_*`).
        pub which: u32,
        /// Number of controls.
        pub count: u32,
        /// Index of the failing control.
        pub error_idx: u32,
        /// Request fd.
        pub request_fd: i32,
        /// Reserved.
        pub reserved: u32,
        /// Padding before the pointer.
        pub _pad: u32,
        /// The guest's `controls` pointer (meaningless to the device).
        pub controls: u64,
    }
}

wire! {
    /// `struct v4l2_event_subscription` (32 bytes).
    pub struct V4l2EventSubscription {
        /// `V4L2_EVENT_*`.
        pub type_: u32,
        /// Object id (control id for `V4L2_EVENT_CTRL`).
        pub id: u32,
        /// `V4L2_EVENT_SUB_FL_*`.
        pub flags: u32,
        /// Reserved.
        pub reserved: [u32; 5],
    }
}

wire! {
    /// `struct v4l2_event` (136 bytes).
    pub struct V4l2Event {
        /// `V4L2_EVENT_*`.
        pub type_: u32,
        /// Padding before the union.
        pub _pad0: u32,
        /// Event data union.
        pub u: [u8; 64],
        /// Number of pending events.
        pub pending: u32,
        /// Event sequence number.
        pub sequence: u32,
        /// Timestamp.
        pub timestamp: Timespec,
        /// Object id.
        pub id: u32,
        /// Reserved.
        pub reserved: [u32; 8],
        /// Trailing padding.
        pub _pad1: u32,
    }
}

wire! {
    /// `struct v4l2_input` (80 bytes).
    pub struct V4l2Input {
        /// Index.
        pub index: u32,
        /// Name, NUL-terminated.
        pub name: [u8; 32],
        /// `V4L2_INPUT_TYPE_*`.
        pub type_: u32,
        /// Associated audio inputs (bitmask).
        pub audioset: u32,
        /// Tuner index.
        pub tuner: u32,
        /// Supported video standards.
        pub std: u64,
        /// `V4L2_IN_ST_*`.
        pub status: u32,
        /// `V4L2_IN_CAP_*`.
        pub capabilities: u32,
        /// Reserved.
        pub reserved: [u32; 3],
        /// Trailing padding.
        pub _pad: u32,
    }
}

wire! {
    /// `struct v4l2_output` (72 bytes).
    pub struct V4l2Output {
        /// Index.
        pub index: u32,
        /// Name, NUL-terminated.
        pub name: [u8; 32],
        /// `V4L2_OUTPUT_TYPE_*`.
        pub type_: u32,
        /// Associated audio outputs (bitmask).
        pub audioset: u32,
        /// Modulator index.
        pub modulator: u32,
        /// Supported video standards.
        pub std: u64,
        /// `V4L2_OUT_CAP_*`.
        pub capabilities: u32,
        /// Reserved.
        pub reserved: [u32; 3],
    }
}

wire! {
    /// `struct v4l2_standard` (72 bytes).
    pub struct V4l2Standard {
        /// Index.
        pub index: u32,
        /// Padding.
        pub _pad0: u32,
        /// `V4L2_STD_*` bits.
        pub id: u64,
        /// Name, NUL-terminated.
        pub name: [u8; 24],
        /// Frame period.
        pub frameperiod: V4l2Fract,
        /// Lines per frame.
        pub framelines: u32,
        /// Reserved.
        pub reserved: [u32; 4],
        /// Trailing padding.
        pub _pad1: u32,
    }
}

wire! {
    /// `struct v4l2_selection` (64 bytes).
    pub struct V4l2Selection {
        /// `V4L2_BUF_TYPE_*`.
        pub type_: u32,
        /// `V4L2_SEL_TGT_*`.
        pub target: u32,
        /// `V4L2_SEL_FLAG_*`.
        pub flags: u32,
        /// The rectangle.
        pub r: V4l2Rect,
        /// Reserved.
        pub reserved: [u32; 9],
    }
}

wire! {
    /// `struct v4l2_create_buffers` (256 bytes).
    pub struct V4l2CreateBuffers {
        /// First index of the created buffers (set by the device).
        pub index: u32,
        /// Number of buffers requested / created.
        pub count: u32,
        /// `V4L2_MEMORY_*`.
        pub memory: u32,
        /// Padding before the format.
        pub _pad: u32,
        /// The format the buffers must fit.
        pub format: V4l2Format,
        /// `V4L2_BUF_CAP_*` (set by the device).
        pub capabilities: u32,
        /// `V4L2_MEMORY_FLAG_*`.
        pub flags: u32,
        /// `max_num_buffers` (Linux >= 6.8) and reserved words.
        pub reserved: [u32; 6],
    }
}

wire! {
    /// `struct v4l2_remove_buffers` (64 bytes, Linux >= 6.10).
    pub struct V4l2RemoveBuffers {
        /// First index to remove.
        pub index: u32,
        /// Number of buffers.
        pub count: u32,
        /// `V4L2_BUF_TYPE_*`.
        pub type_: u32,
        /// Reserved.
        pub reserved: [u32; 13],
    }
}

wire! {
    /// `struct v4l2_exportbuffer` (64 bytes). virtio-media exports a buffer as a virtio
    /// object whose id follows the structure; `fd` is a placeholder left unchanged.
    pub struct V4l2Exportbuffer {
        /// `V4L2_BUF_TYPE_*`.
        pub type_: u32,
        /// Buffer index.
        pub index: u32,
        /// Plane index (multi-planar types).
        pub plane: u32,
        /// `O_CLOEXEC` / access mode flags.
        pub flags: u32,
        /// The fd placeholder.
        pub fd: i32,
        /// Reserved.
        pub reserved: [u32; 11],
    }
}

/// An ioctl argument carried as raw bytes of its exact 64-bit kernel size, for the
/// ioctls whose structures this crate does not type (tuners, audio, modulators,
/// frequencies, DV timings, encoder/decoder commands, the encoder index).
pub type RawArg<const N: usize> = [u8; N];

/// Copies `s` into a NUL-terminated fixed-size name field (truncating).
pub fn set_name<const N: usize>(dst: &mut [u8; N], s: &str) {
    *dst = [0; N];
    for (d, b) in dst.iter_mut().take(N.saturating_sub(1)).zip(s.bytes()) {
        *d = b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v4l2::PIX_FMT_YUYV;
    use crate::v4l2::{V4l2Ioctl, V4L2_BUFFER_SIZE, V4L2_EVENT_SIZE, V4L2_PLANE_SIZE};
    use core::mem::size_of;

    #[test]
    fn sizes_match_the_ioctl_table() {
        use V4l2Ioctl::*;
        let cases: &[(V4l2Ioctl, usize)] = &[
            (VIDIOC_ENUM_FMT, size_of::<V4l2Fmtdesc>()),
            (VIDIOC_G_FMT, size_of::<V4l2Format>()),
            (VIDIOC_S_FMT, size_of::<V4l2Format>()),
            (VIDIOC_TRY_FMT, size_of::<V4l2Format>()),
            (VIDIOC_REQBUFS, size_of::<V4l2Requestbuffers>()),
            (VIDIOC_QUERYBUF, size_of::<V4l2Buffer>()),
            (VIDIOC_QBUF, size_of::<V4l2Buffer>()),
            (VIDIOC_PREPARE_BUF, size_of::<V4l2Buffer>()),
            (VIDIOC_G_PARM, size_of::<V4l2Streamparm>()),
            (VIDIOC_S_PARM, size_of::<V4l2Streamparm>()),
            (VIDIOC_ENUMSTD, size_of::<V4l2Standard>()),
            (VIDIOC_ENUMINPUT, size_of::<V4l2Input>()),
            (VIDIOC_ENUMOUTPUT, size_of::<V4l2Output>()),
            (VIDIOC_G_CTRL, size_of::<V4l2Control>()),
            (VIDIOC_QUERYCTRL, size_of::<V4l2Queryctrl>()),
            (VIDIOC_QUERYMENU, size_of::<V4l2Querymenu>()),
            (VIDIOC_QUERY_EXT_CTRL, size_of::<V4l2QueryExtCtrl>()),
            (VIDIOC_G_EXT_CTRLS, size_of::<V4l2ExtControls>()),
            (VIDIOC_ENUM_FRAMESIZES, size_of::<V4l2Frmsizeenum>()),
            (VIDIOC_ENUM_FRAMEINTERVALS, size_of::<V4l2Frmivalenum>()),
            (VIDIOC_SUBSCRIBE_EVENT, size_of::<V4l2EventSubscription>()),
            (VIDIOC_DQEVENT, size_of::<V4l2Event>()),
            (VIDIOC_G_SELECTION, size_of::<V4l2Selection>()),
            (VIDIOC_CREATE_BUFS, size_of::<V4l2CreateBuffers>()),
            (VIDIOC_REMOVE_BUFS, size_of::<V4l2RemoveBuffers>()),
            (VIDIOC_EXPBUF, size_of::<V4l2Exportbuffer>()),
        ];
        for (ioctl, size) in cases {
            assert_eq!(ioctl.arg_size(), *size, "{ioctl}");
        }
        assert_eq!(size_of::<V4l2Buffer>(), V4L2_BUFFER_SIZE);
        assert_eq!(size_of::<V4l2Plane>(), V4L2_PLANE_SIZE);
        assert_eq!(size_of::<V4l2PlanePixFormat>(), 20);
        assert_eq!(size_of::<V4l2PixFormatMplane>(), 192);
        assert_eq!(size_of::<V4l2Event>(), V4L2_EVENT_SIZE);
        assert_eq!(size_of::<V4l2ExtControl>(), 20);
        assert_eq!(size_of::<V4l2PixFormat>(), 48);
        assert_eq!(size_of::<V4l2Captureparm>(), 40);
    }

    #[test]
    fn field_offsets_follow_the_kernel() {
        let b = V4l2Buffer {
            sequence: 0x1122_3344,
            m: 0x55,
            length: 0x66,
            ..Default::default()
        };
        let bytes = b.as_bytes();
        assert_eq!(&bytes[56..60], &0x1122_3344u32.to_le_bytes());
        assert_eq!(bytes[64], 0x55);
        assert_eq!(bytes[72], 0x66);
        let q = V4l2QueryExtCtrl {
            minimum: -1,
            ..Default::default()
        };
        assert_eq!(&q.as_bytes()[40..48], &[0xff; 8]);
        let e = V4l2Event {
            id: 7,
            ..Default::default()
        };
        assert_eq!(e.as_bytes()[96], 7);
        let c = V4l2CreateBuffers {
            capabilities: 9,
            ..Default::default()
        };
        assert_eq!(c.as_bytes()[224], 9);
    }

    #[test]
    fn fourcc_and_names() {
        assert_eq!(PIX_FMT_YUYV, 0x5659_5559);
        let mut n = [0xffu8; 4];
        set_name(&mut n, "abcdef");
        assert_eq!(&n, b"abc\0");
        let mut c = V4l2ExtControl::default();
        c.set_value(-2);
        assert_eq!(c.value(), -2);
        assert_eq!(c.value64(), 0xffff_fffe);
    }
}
