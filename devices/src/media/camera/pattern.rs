//! The test pattern: frame `N` has a top band of [`BAND_HEIGHT`] rows that encodes `N`
//! in 32 black/white cells, most significant bit first, and below it eight colour bars
//! scrolled right by `4 * N` pixels, with brightness, contrast and a horizontal flip
//! applied ([`Adjust`]). [`render_frame`] draws a frame in a single-planar layout,
//! [`render_planes`] as the memory planes of any format, and [`decode_frame_number`]
//! reads `N` back, so a client can check any frame it receives.

use outboard_protocol::v4l2::*;

use super::formats::{frame_layout, plane_layout};

/// Height of the frame-number band at the top of every frame.
pub const BAND_HEIGHT: u32 = 16;

/// Picture adjustments applied to the pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Adjust {
    /// Brightness, 0..=255 (128 = neutral).
    pub brightness: i32,
    /// Contrast, 0..=255 (128 = neutral).
    pub contrast: i32,
    /// Mirror the bars horizontally.
    pub hflip: bool,
}

impl Default for Adjust {
    fn default() -> Self {
        Adjust {
            brightness: 128,
            contrast: 128,
            hflip: false,
        }
    }
}

const BARS: [[u8; 3]; 8] = [
    [255, 255, 255],
    [255, 255, 0],
    [0, 255, 255],
    [0, 255, 0],
    [255, 0, 255],
    [255, 0, 0],
    [0, 0, 255],
    [0, 0, 0],
];

fn adjust(v: u8, a: &Adjust) -> u8 {
    let v = (i32::from(v) - 128) * a.contrast / 128 + 128 + (a.brightness - 128);
    v.clamp(0, 255) as u8
}

/// The RGB of pixel `x` of the band row and of a bar row of frame `frame`.
fn pattern_rows(width: u32, frame: u32, a: &Adjust) -> (Vec<[u8; 3]>, Vec<[u8; 3]>) {
    let cell = (width / 32).max(1);
    let shift = (u64::from(frame) * 4 % u64::from(width)) as u32;
    let mut band = Vec::with_capacity(width as usize);
    let mut bars = Vec::with_capacity(width as usize);
    for x in 0..width {
        let bit = (x / cell).min(31);
        let on = frame >> (31 - bit) & 1 == 1;
        let v = if on { 255 } else { 0 };
        band.push([v; 3]);
        let xs = if a.hflip { width - 1 - x } else { x };
        let pos = (xs + width - shift) % width;
        let bar = BARS[(pos * 8 / width) as usize % 8];
        bars.push(bar.map(|c| adjust(c, a)));
    }
    (band, bars)
}

fn yuv(p: [u8; 3]) -> (u8, u8, u8) {
    let (r, g, b) = (i32::from(p[0]), i32::from(p[1]), i32::from(p[2]));
    let y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16;
    let u = ((-38 * r - 74 * g + 112 * b + 128) >> 8) + 128;
    let v = ((112 * r - 94 * g - 18 * b + 128) >> 8) + 128;
    (y as u8, u as u8, v as u8)
}

/// Draws frame `frame` into `dst` (at least [`frame_layout`]'s size bytes). Returns the
/// number of bytes written, or `None` for an unsupported layout or a short `dst`.
pub fn render_frame(
    fourcc: u32,
    width: u32,
    height: u32,
    frame: u32,
    a: &Adjust,
    dst: &mut [u8],
) -> Option<usize> {
    let (bpl, size) = frame_layout(fourcc, width, height)?;
    let (bpl, size) = (bpl as usize, size as usize);
    let dst = dst.get_mut(..size)?;
    let (band, bars) = pattern_rows(width, frame, a);
    let band_rows = BAND_HEIGHT.min(height) as usize;
    match fourcc {
        PIX_FMT_RGB24 | PIX_FMT_YUYV => {
            let encode = |src: &[[u8; 3]], row: &mut [u8]| {
                if fourcc == PIX_FMT_RGB24 {
                    for (d, p) in row.chunks_exact_mut(3).zip(src) {
                        d.copy_from_slice(p);
                    }
                } else {
                    for (d, p) in row.chunks_exact_mut(4).zip(src.chunks_exact(2)) {
                        let (y0, u, v) = yuv(p[0]);
                        let (y1, _, _) = yuv(p[1]);
                        d.copy_from_slice(&[y0, u, y1, v]);
                    }
                }
            };
            let (top, rest) = dst.split_at_mut(band_rows * bpl);
            for (src, area) in [(&band, top), (&bars, rest)] {
                if area.is_empty() {
                    continue;
                }
                let (first, others) = area.split_at_mut(bpl);
                encode(src, first);
                for row in others.chunks_exact_mut(bpl) {
                    row.copy_from_slice(first);
                }
            }
        }
        PIX_FMT_NV12 => {
            // Rows repeat within the band and within the bars: convert one luma and one
            // chroma row of each, then copy.
            let luma_row = |src: &[[u8; 3]]| src.iter().map(|p| yuv(*p).0).collect::<Vec<u8>>();
            let chroma_row = |src: &[[u8; 3]]| {
                src.chunks_exact(2)
                    .flat_map(|p| {
                        let (_, u, v) = yuv(p[0]);
                        [u, v]
                    })
                    .collect::<Vec<u8>>()
            };
            let (band_y, bars_y) = (luma_row(&band), luma_row(&bars));
            let (band_uv, bars_uv) = (chroma_row(&band), chroma_row(&bars));
            let (luma, chroma) = dst.split_at_mut(bpl * height as usize);
            for (y, row) in luma.chunks_exact_mut(bpl).enumerate() {
                row.copy_from_slice(if y < band_rows { &band_y } else { &bars_y });
            }
            for (cy, row) in chroma.chunks_exact_mut(bpl).enumerate() {
                row.copy_from_slice(if cy * 2 < band_rows {
                    &band_uv
                } else {
                    &bars_uv
                });
            }
        }
        _ => return None,
    }
    Some(size)
}

/// Reads the frame number back from a frame drawn by [`render_frame`] (with neutral
/// brightness and contrast).
///
/// For NV12M and YUV420M, `data` is the first (luma) plane.
pub fn decode_frame_number(fourcc: u32, width: u32, height: u32, data: &[u8]) -> Option<u32> {
    let (fourcc, (bpl, size)) = match fourcc {
        PIX_FMT_NV12M | PIX_FMT_YUV420M => (
            PIX_FMT_NV12,
            plane_layout(fourcc, width, height)?.first().copied()?,
        ),
        _ => (fourcc, frame_layout(fourcc, width, height)?),
    };
    let data = data.get(..size as usize)?;
    let row = (BAND_HEIGHT.min(height) / 2) as usize * bpl as usize;
    let cell = (width / 32).max(1);
    let mut n = 0u32;
    for bit in 0..32 {
        let x = (bit * cell + cell / 2) as usize;
        let luma = match fourcc {
            PIX_FMT_YUYV => *data.get(row + x * 2)?,
            PIX_FMT_NV12 => *data.get(row + x)?,
            _ => *data.get(row + x * 3)?,
        };
        n = n << 1 | u32::from(luma > 128);
    }
    Some(n)
}

/// Draws frame `frame` as its memory planes (see [`plane_layout`]).
pub fn render_planes(
    fourcc: u32,
    width: u32,
    height: u32,
    frame: u32,
    a: &Adjust,
) -> Option<Vec<Vec<u8>>> {
    let contiguous = match fourcc {
        PIX_FMT_NV12M | PIX_FMT_YUV420M => PIX_FMT_NV12,
        other => other,
    };
    let (_, size) = frame_layout(contiguous, width, height)?;
    let mut buf = vec![0u8; size as usize];
    render_frame(contiguous, width, height, frame, a, &mut buf)?;
    let luma = (width * height) as usize;
    Some(match fourcc {
        PIX_FMT_NV12M => {
            let chroma = buf.split_off(luma);
            vec![buf, chroma]
        }
        PIX_FMT_YUV420M => {
            let chroma = buf.split_off(luma);
            let u = chroma.iter().step_by(2).copied().collect();
            let v = chroma.iter().skip(1).step_by(2).copied().collect();
            vec![buf, u, v]
        }
        _ => vec![buf],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::camera::{FORMATS, SIZES};

    #[test]
    fn frames_are_recognisable_in_every_format() {
        for (fourcc, _) in FORMATS {
            for (w, h) in SIZES {
                let (_, size) = frame_layout(fourcc, w, h).unwrap();
                let mut buf = vec![0u8; size as usize];
                for n in [0u32, 1, 77, 0xdead_beef] {
                    assert_eq!(
                        render_frame(fourcc, w, h, n, &Adjust::default(), &mut buf),
                        Some(size as usize)
                    );
                    assert_eq!(decode_frame_number(fourcc, w, h, &buf), Some(n));
                }
            }
        }
    }

    #[test]
    fn the_pattern_moves() {
        let (_, size) = frame_layout(PIX_FMT_RGB24, 320, 240).unwrap();
        let mut a = vec![0u8; size as usize];
        let mut b = vec![0u8; size as usize];
        render_frame(PIX_FMT_RGB24, 320, 240, 1, &Adjust::default(), &mut a).unwrap();
        render_frame(PIX_FMT_RGB24, 320, 240, 2, &Adjust::default(), &mut b).unwrap();
        let row = 100 * 320 * 3;
        assert_ne!(a[row..row + 960], b[row..row + 960]);
        // Bars shift right by 4 pixels per frame.
        assert_eq!(
            a[row + 40 * 3..row + 100 * 3],
            b[row + 44 * 3..row + 104 * 3]
        );
        assert_eq!(
            render_frame(PIX_FMT_RGB24, 320, 240, 1, &Adjust::default(), &mut a[..10]),
            None
        );
        assert_eq!(frame_layout(PIX_FMT_NV12, 321, 240), None);
        assert_eq!(frame_layout(0, 320, 240), None);
    }
}
