//! V4L2 constants (`linux/videodev2.h`): pixel formats, buffer types, memory types,
//! buffer flags and capabilities, device capabilities, controls, events, selection
//! targets. Each is named as in the kernel header without its `V4L2_` prefix.

/// Builds a FourCC pixel format code.
pub const fn fourcc(code: &[u8; 4]) -> u32 {
    (code[0] as u32) | ((code[1] as u32) << 8) | ((code[2] as u32) << 16) | ((code[3] as u32) << 24)
}

/// `V4L2_PIX_FMT_YUYV`: packed 4:2:2 YUV, 16 bits per pixel.
pub const PIX_FMT_YUYV: u32 = fourcc(b"YUYV");
/// `V4L2_PIX_FMT_NV12`: Y plane followed by interleaved CbCr at half resolution.
pub const PIX_FMT_NV12: u32 = fourcc(b"NV12");
/// `V4L2_PIX_FMT_RGB24`: packed RGB, 24 bits per pixel.
pub const PIX_FMT_RGB24: u32 = fourcc(b"RGB3");
/// `V4L2_PIX_FMT_NV12M`: NV12 with the Y and CbCr planes in separate buffers.
pub const PIX_FMT_NV12M: u32 = fourcc(b"NM12");
/// `V4L2_PIX_FMT_YUV420M`: 4:2:0 with Y, Cb and Cr in three separate buffers.
pub const PIX_FMT_YUV420M: u32 = fourcc(b"YM12");

/// `V4L2_BUF_TYPE_VIDEO_CAPTURE`.
pub const BUF_TYPE_VIDEO_CAPTURE: u32 = 1;
/// `V4L2_BUF_TYPE_VIDEO_OUTPUT`.
pub const BUF_TYPE_VIDEO_OUTPUT: u32 = 2;
/// `V4L2_BUF_TYPE_VIDEO_OVERLAY`.
pub const BUF_TYPE_VIDEO_OVERLAY: u32 = 3;
/// `V4L2_BUF_TYPE_VBI_OUTPUT`.
pub const BUF_TYPE_VBI_OUTPUT: u32 = 5;
/// `V4L2_BUF_TYPE_SLICED_VBI_OUTPUT`.
pub const BUF_TYPE_SLICED_VBI_OUTPUT: u32 = 7;
/// `V4L2_BUF_TYPE_VIDEO_OUTPUT_OVERLAY`.
pub const BUF_TYPE_VIDEO_OUTPUT_OVERLAY: u32 = 8;
/// `V4L2_BUF_TYPE_VIDEO_CAPTURE_MPLANE`.
pub const BUF_TYPE_VIDEO_CAPTURE_MPLANE: u32 = 9;
/// `V4L2_BUF_TYPE_VIDEO_OUTPUT_MPLANE`.
pub const BUF_TYPE_VIDEO_OUTPUT_MPLANE: u32 = 10;
/// `V4L2_BUF_TYPE_SDR_OUTPUT`.
pub const BUF_TYPE_SDR_OUTPUT: u32 = 12;
/// `V4L2_BUF_TYPE_META_OUTPUT`.
pub const BUF_TYPE_META_OUTPUT: u32 = 14;
/// The largest valid `V4L2_BUF_TYPE_*` value (`V4L2_BUF_TYPE_META_OUTPUT`).
pub const BUF_TYPE_MAX: u32 = BUF_TYPE_META_OUTPUT;

/// Whether `buf_type` is a multi-planar buffer type.
pub const fn is_multiplanar(buf_type: u32) -> bool {
    matches!(
        buf_type,
        BUF_TYPE_VIDEO_CAPTURE_MPLANE | BUF_TYPE_VIDEO_OUTPUT_MPLANE
    )
}

/// Whether `buf_type` moves data from the application to the device
/// (`V4L2_TYPE_IS_OUTPUT`).
pub const fn is_output(buf_type: u32) -> bool {
    matches!(
        buf_type,
        BUF_TYPE_VIDEO_OUTPUT
            | BUF_TYPE_VIDEO_OVERLAY
            | BUF_TYPE_VBI_OUTPUT
            | BUF_TYPE_SLICED_VBI_OUTPUT
            | BUF_TYPE_VIDEO_OUTPUT_OVERLAY
            | BUF_TYPE_VIDEO_OUTPUT_MPLANE
            | BUF_TYPE_SDR_OUTPUT
            | BUF_TYPE_META_OUTPUT
    )
}

/// Whether `buf_type` is a known `V4L2_BUF_TYPE_*` value (0 is not).
pub const fn is_valid_buf_type(buf_type: u32) -> bool {
    buf_type >= 1 && buf_type <= BUF_TYPE_MAX && buf_type != 7
}

/// `V4L2_MEMORY_MMAP`.
pub const MEMORY_MMAP: u32 = 1;
/// `V4L2_MEMORY_USERPTR`.
pub const MEMORY_USERPTR: u32 = 2;
/// `V4L2_MEMORY_OVERLAY`.
pub const MEMORY_OVERLAY: u32 = 3;
/// `V4L2_MEMORY_DMABUF`.
pub const MEMORY_DMABUF: u32 = 4;

/// `V4L2_PIX_FMT_PRIV_MAGIC`: in `v4l2_pix_format.priv`, the extended fields are valid.
pub const PIX_FMT_PRIV_MAGIC: u32 = 0xfeed_cafe;

/// `V4L2_FIELD_NONE`: progressive.
pub const FIELD_NONE: u32 = 1;
/// `V4L2_COLORSPACE_SRGB`.
pub const COLORSPACE_SRGB: u32 = 8;
/// `V4L2_COLORSPACE_SMPTE170M` (BT.601).
pub const COLORSPACE_SMPTE170M: u32 = 1;

/// `V4L2_BUF_FLAG_MAPPED`.
pub const BUF_FLAG_MAPPED: u32 = 0x1;
/// `V4L2_BUF_FLAG_QUEUED`.
pub const BUF_FLAG_QUEUED: u32 = 0x2;
/// `V4L2_BUF_FLAG_DONE`.
pub const BUF_FLAG_DONE: u32 = 0x4;
/// `V4L2_BUF_FLAG_ERROR`.
pub const BUF_FLAG_ERROR: u32 = 0x40;
/// `V4L2_BUF_FLAG_TIMESTAMP_MONOTONIC`.
pub const BUF_FLAG_TIMESTAMP_MONOTONIC: u32 = 0x2000;
/// `V4L2_BUF_FLAG_TSTAMP_SRC_SOE`: the timestamp is taken at the start of exposure.
pub const BUF_FLAG_TSTAMP_SRC_SOE: u32 = 0x10000;
/// `V4L2_BUF_FLAG_TSTAMP_SRC_EOF` (no bit set): the timestamp is taken when the last
/// pixel of the frame is in.
pub const BUF_FLAG_TSTAMP_SRC_EOF: u32 = 0;
/// `V4L2_BUF_FLAG_TSTAMP_SRC_MASK`: the bits that say where a timestamp is taken.
pub const BUF_FLAG_TSTAMP_SRC_MASK: u32 = 0x70000;
/// `V4L2_BUF_FLAG_REQUEST_FD`: `request_fd` names a media request.
pub const BUF_FLAG_REQUEST_FD: u32 = 0x0080_0000;

/// `V4L2_BUF_CAP_SUPPORTS_MMAP`.
pub const BUF_CAP_SUPPORTS_MMAP: u32 = 1 << 0;
/// `V4L2_BUF_CAP_SUPPORTS_USERPTR`.
pub const BUF_CAP_SUPPORTS_USERPTR: u32 = 1 << 1;
/// `V4L2_BUF_CAP_SUPPORTS_DMABUF`.
pub const BUF_CAP_SUPPORTS_DMABUF: u32 = 1 << 2;
/// `V4L2_BUF_CAP_SUPPORTS_REQUESTS`.
pub const BUF_CAP_SUPPORTS_REQUESTS: u32 = 1 << 3;
/// `V4L2_BUF_CAP_SUPPORTS_ORPHANED_BUFS`.
pub const BUF_CAP_SUPPORTS_ORPHANED_BUFS: u32 = 1 << 4;

/// `V4L2_CAP_VIDEO_CAPTURE`.
pub const CAP_VIDEO_CAPTURE: u32 = 0x1;
/// `V4L2_CAP_VIDEO_OVERLAY`.
pub const CAP_VIDEO_OVERLAY: u32 = 0x4;
/// `V4L2_CAP_VIDEO_OUTPUT_OVERLAY`.
pub const CAP_VIDEO_OUTPUT_OVERLAY: u32 = 0x200;
/// `V4L2_CAP_VIDEO_CAPTURE_MPLANE`.
pub const CAP_VIDEO_CAPTURE_MPLANE: u32 = 0x1000;
/// `V4L2_CAP_VIDEO_M2M_MPLANE`.
pub const CAP_VIDEO_M2M_MPLANE: u32 = 0x4000;
/// `V4L2_CAP_VIDEO_M2M`.
pub const CAP_VIDEO_M2M: u32 = 0x8000;
/// `V4L2_CAP_EXT_PIX_FORMAT`.
pub const CAP_EXT_PIX_FORMAT: u32 = 0x0020_0000;
/// `V4L2_CAP_READWRITE`: `read()`/`write()` I/O.
pub const CAP_READWRITE: u32 = 0x0100_0000;
/// `V4L2_CAP_STREAMING`.
pub const CAP_STREAMING: u32 = 0x0400_0000;
/// `V4L2_CAP_DEVICE_CAPS`: `v4l2_capability.device_caps` is valid.
pub const CAP_DEVICE_CAPS: u32 = 0x8000_0000;

/// `V4L2_FRMSIZE_TYPE_DISCRETE`.
pub const FRMSIZE_TYPE_DISCRETE: u32 = 1;
/// `V4L2_FRMIVAL_TYPE_DISCRETE`.
pub const FRMIVAL_TYPE_DISCRETE: u32 = 1;
/// `V4L2_CAP_TIMEPERFRAME` (in `v4l2_captureparm.capability`).
pub const CAP_TIMEPERFRAME: u32 = 0x1000;

/// `V4L2_INPUT_TYPE_CAMERA`.
pub const INPUT_TYPE_CAMERA: u32 = 2;

/// `V4L2_CTRL_TYPE_INTEGER`.
pub const CTRL_TYPE_INTEGER: u32 = 1;
/// `V4L2_CTRL_TYPE_BOOLEAN`.
pub const CTRL_TYPE_BOOLEAN: u32 = 2;
/// `V4L2_CTRL_TYPE_MENU`.
pub const CTRL_TYPE_MENU: u32 = 3;
/// `V4L2_CTRL_TYPE_CTRL_CLASS`: the class control of a control class.
pub const CTRL_TYPE_CTRL_CLASS: u32 = 6;
/// `V4L2_CTRL_FLAG_READ_ONLY`.
pub const CTRL_FLAG_READ_ONLY: u32 = 0x4;
/// `V4L2_CTRL_FLAG_SLIDER`.
pub const CTRL_FLAG_SLIDER: u32 = 0x20;
/// `V4L2_CTRL_FLAG_WRITE_ONLY`.
pub const CTRL_FLAG_WRITE_ONLY: u32 = 0x40;
/// `V4L2_CTRL_FLAG_NEXT_CTRL`: or-ed into a control id to enumerate controls.
pub const CTRL_FLAG_NEXT_CTRL: u32 = 0x8000_0000;
/// `V4L2_CTRL_FLAG_NEXT_COMPOUND`: or-ed into a control id to enumerate compound controls.
pub const CTRL_FLAG_NEXT_COMPOUND: u32 = 0x4000_0000;
/// `V4L2_CTRL_CLASS_USER`.
pub const CTRL_CLASS_USER: u32 = 0x0098_0000;
/// `V4L2_CTRL_CLASS_CAMERA`.
pub const CTRL_CLASS_CAMERA: u32 = 0x009a_0000;
/// `V4L2_CID_USER_CLASS`: the class control of the user class.
pub const CID_USER_CLASS: u32 = CTRL_CLASS_USER | 1;
/// `V4L2_CID_BRIGHTNESS`.
pub const CID_BRIGHTNESS: u32 = CTRL_CLASS_USER | 0x900;
/// `V4L2_CID_CONTRAST`.
pub const CID_CONTRAST: u32 = CTRL_CLASS_USER | 0x901;
/// `V4L2_CID_HFLIP`.
pub const CID_HFLIP: u32 = CTRL_CLASS_USER | 0x914;
/// `V4L2_CID_TEST_PATTERN` (image-processing class).
pub const CID_TEST_PATTERN: u32 = 0x009f_0903;
/// `V4L2_CTRL_WHICH_CUR_VAL`.
pub const CTRL_WHICH_CUR_VAL: u32 = 0;
/// `V4L2_CTRL_WHICH_DEF_VAL`.
pub const CTRL_WHICH_DEF_VAL: u32 = 0x0f00_0000;
/// `V4L2_CTRL_WHICH_REQUEST_VAL`.
pub const CTRL_WHICH_REQUEST_VAL: u32 = 0x0f01_0000;

/// `V4L2_EVENT_ALL`.
pub const EVENT_ALL: u32 = 0;
/// `V4L2_EVENT_EOS`.
pub const EVENT_EOS: u32 = 2;
/// `V4L2_EVENT_CTRL`.
pub const EVENT_CTRL: u32 = 3;
/// `V4L2_EVENT_SOURCE_CHANGE`.
pub const EVENT_SOURCE_CHANGE: u32 = 5;
/// `V4L2_EVENT_CTRL_CH_VALUE`: a control event's value changed.
pub const EVENT_CTRL_CH_VALUE: u32 = 1;
/// `V4L2_EVENT_CTRL_CH_FLAGS`: a control event's flags changed.
pub const EVENT_CTRL_CH_FLAGS: u32 = 2;
/// `V4L2_EVENT_SUB_FL_SEND_INITIAL`: send the current state when subscribing.
pub const EVENT_SUB_FL_SEND_INITIAL: u32 = 1;
/// `V4L2_EVENT_SUB_FL_ALLOW_FEEDBACK`: report the subscriber's own changes too.
pub const EVENT_SUB_FL_ALLOW_FEEDBACK: u32 = 2;

/// `V4L2_SEL_TGT_CROP`.
pub const SEL_TGT_CROP: u32 = 0;
/// `V4L2_SEL_TGT_CROP_DEFAULT`.
pub const SEL_TGT_CROP_DEFAULT: u32 = 1;
/// `V4L2_SEL_TGT_CROP_BOUNDS`.
pub const SEL_TGT_CROP_BOUNDS: u32 = 2;
