//! The formats the camera offers and their negotiation: the pixel formats, frame sizes
//! and intervals, the memory layout of each format, and the table of
//! G_FMT/S_FMT/TRY_FMT answers (every format at every size) a requested format snaps to.

use outboard_protocol::v4l2::*;

use super::SoftwareCamera;
use crate::media::ioctl::IoctlResult;
use crate::media::{EventQueue, GuestMemoryMapper, HostMemoryMapper};

/// Pixel formats of the single-planar camera and their descriptions.
pub const FORMATS: [(u32, &str); 3] = [
    (PIX_FMT_YUYV, "YUYV 4:2:2"),
    (PIX_FMT_NV12, "Y/CbCr 4:2:0"),
    (PIX_FMT_RGB24, "24-bit RGB 8-8-8"),
];
/// Pixel formats of the multi-planar camera and their descriptions.
pub const FORMATS_MPLANE: [(u32, &str); 5] = [
    (PIX_FMT_YUYV, "YUYV 4:2:2"),
    (PIX_FMT_NV12, "Y/CbCr 4:2:0"),
    (PIX_FMT_RGB24, "24-bit RGB 8-8-8"),
    (PIX_FMT_NV12M, "Y/CbCr 4:2:0 (N-C)"),
    (PIX_FMT_YUV420M, "Planar YUV 4:2:0 (N-C)"),
];
/// Supported frame sizes.
pub const SIZES: [(u32, u32); 3] = [(320, 240), (640, 480), (1280, 720)];
/// Supported frame intervals (seconds per frame), fastest first.
pub const INTERVALS: [(u32, u32); 3] = [(1, 60), (1, 30), (1, 15)];

/// Bytes per line and image size of a frame, or `None` for an unsupported format or
/// odd dimensions.
pub fn frame_layout(fourcc: u32, width: u32, height: u32) -> Option<(u32, u32)> {
    if width == 0 || height == 0 || (width | height) & 1 != 0 {
        return None;
    }
    let (bpl, size) = match fourcc {
        PIX_FMT_YUYV => (
            width.checked_mul(2)?,
            width.checked_mul(2)?.checked_mul(height)?,
        ),
        PIX_FMT_NV12 => (width, width.checked_mul(height)?.checked_mul(3)? / 2),
        PIX_FMT_RGB24 => (
            width.checked_mul(3)?,
            width.checked_mul(3)?.checked_mul(height)?,
        ),
        _ => return None,
    };
    Some((bpl, size))
}

/// Bytes per line and size of each memory plane of a frame, or `None` for an
/// unsupported format or odd dimensions. NV12M and YUV420M have 2 and 3 planes, every
/// other format 1 (as [`frame_layout`]).
pub fn plane_layout(fourcc: u32, width: u32, height: u32) -> Option<Vec<(u32, u32)>> {
    let (luma_bpl, size) = frame_layout(PIX_FMT_NV12, width, height)?;
    let luma = width.checked_mul(height)?;
    match fourcc {
        PIX_FMT_NV12M => Some(vec![(luma_bpl, luma), (luma_bpl, size - luma)]),
        PIX_FMT_YUV420M => Some(vec![
            (luma_bpl, luma),
            (width / 2, luma / 4),
            (width / 2, luma / 4),
        ]),
        _ => frame_layout(fourcc, width, height).map(|l| vec![l]),
    }
}

/// The single-planar format for `fourcc` at `width` x `height` (a supported layout).
pub fn pix_format(fourcc: u32, width: u32, height: u32) -> V4l2PixFormat {
    let (bytesperline, sizeimage) = frame_layout(fourcc, width, height).unwrap_or((0, 0));
    V4l2PixFormat {
        width,
        height,
        pixelformat: fourcc,
        field: FIELD_NONE,
        bytesperline,
        sizeimage,
        colorspace: if fourcc == PIX_FMT_RGB24 {
            COLORSPACE_SRGB
        } else {
            COLORSPACE_SMPTE170M
        },
        priv_: PIX_FMT_PRIV_MAGIC,
        ..Default::default()
    }
}

/// The memory plane sizes of `pix` (one for single-plane formats).
pub(super) fn plane_sizes(pix: &V4l2PixFormat) -> Vec<u32> {
    plane_layout(pix.pixelformat, pix.width, pix.height)
        .map(|l| l.into_iter().map(|(_, size)| size).collect())
        .unwrap_or_else(|| vec![pix.sizeimage])
}

/// A format the camera can be set to and its answer to the format ioctls.
pub(super) struct FormatEntry {
    /// The single-planar form (the layout frames are rendered in).
    pub(super) pix: V4l2PixFormat,
    /// As the served buffer type shows it.
    pub(super) format: V4l2Format,
}

impl<E: EventQueue, H: HostMemoryMapper, G: GuestMemoryMapper> SoftwareCamera<E, H, G> {
    /// Index in `table` of format `fourcc_index` of `formats()` at `SIZES[size_index]`.
    pub(super) fn format_index(fourcc_index: usize, size_index: usize) -> usize {
        fourcc_index * SIZES.len() + size_index
    }

    /// The current format.
    pub(super) fn current(&self) -> &FormatEntry {
        // `current` is only ever set to an index `snap_format` found in `table`.
        &self.table[self.current]
    }

    /// The current single-planar format (the layout frames are rendered in).
    pub(super) fn pix(&self) -> V4l2PixFormat {
        self.current().pix
    }

    /// The one buffer type served.
    pub(super) fn buf_type(&self) -> u32 {
        if self.mplane {
            BUF_TYPE_VIDEO_CAPTURE_MPLANE
        } else {
            BUF_TYPE_VIDEO_CAPTURE
        }
    }

    pub(super) fn formats(&self) -> &'static [(u32, &'static str)] {
        if self.mplane {
            &FORMATS_MPLANE
        } else {
            &FORMATS
        }
    }

    /// The format as the served buffer type shows it.
    pub(super) fn format_of(&self, pix: &V4l2PixFormat) -> V4l2Format {
        if !self.mplane {
            return V4l2Format::from_pix(BUF_TYPE_VIDEO_CAPTURE, pix);
        }
        let mut mp = V4l2PixFormatMplane {
            width: pix.width,
            height: pix.height,
            pixelformat: pix.pixelformat,
            field: pix.field,
            colorspace: pix.colorspace,
            ycbcr_enc: pix.ycbcr_enc as u8,
            quantization: pix.quantization as u8,
            xfer_func: pix.xfer_func as u8,
            ..Default::default()
        };
        let layout = plane_layout(pix.pixelformat, pix.width, pix.height).unwrap_or_default();
        mp.num_planes = layout.len() as u8;
        for (dst, (bpl, size)) in mp.plane_fmt.iter_mut().zip(layout) {
            dst.bytesperline = bpl;
            dst.sizeimage = size;
        }
        V4l2Format::from_pix_mp(BUF_TYPE_VIDEO_CAPTURE_MPLANE, &mp)
    }

    /// The supported format nearest to `f` (unknown pixel formats become YUYV, sizes
    /// snap to the nearest of [`SIZES`]), as an index into `table`.
    #[inline]
    pub(super) fn snap_format(&self, f: &V4l2Format) -> IoctlResult<usize> {
        if f.type_ != self.buf_type() {
            return Err(libc::EINVAL);
        }
        // `v4l2_pix_format` and `v4l2_pix_format_mplane` both begin with width, height
        // and pixelformat: read just those rather than either whole structure.
        // One u32 at a time: a single 12-byte read compiled to a load straddling two
        // stores of the copied payload (a store-forwarding stall on every S_FMT).
        let word = |i: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&f.fmt[4 * i..4 * i + 4]);
            u32::from_ne_bytes(b)
        };
        let (width, height, fourcc) = (word(0), word(1), word(2));
        // YUYV is the first entry of both format lists.
        let fi = self
            .formats()
            .iter()
            .position(|(c, _)| *c == fourcc)
            .unwrap_or(0);
        let si = match SIZES.iter().position(|s| *s == (width, height)) {
            Some(i) => i,
            None => SIZES
                .iter()
                .enumerate()
                .min_by_key(|(_, (w, h))| {
                    u64::from(w.abs_diff(width)) + u64::from(h.abs_diff(height))
                })
                .map_or(1, |(i, _)| i),
        };
        // Below `formats().len() * SIZES.len()`, the length of `table`.
        Ok(Self::format_index(fi, si))
    }
}
