//! `media-frame-check --fourcc F --width W --height H FILE`: checks the frames a capture
//! from Outboard's software camera wrote to FILE byte for byte against the camera's
//! pattern.
//!
//! FILE is what `v4l2-ctl --stream-mmap|--stream-user --stream-to=FILE` writes: the
//! frames one after another, each as its memory planes one after another (for each plane,
//! its `bytesused` bytes after `data_offset`), so a frame of format F at W x H is the
//! sum of the plane sizes of [`plane_layout`] long. Each frame carries its number in its
//! top band ([`decode_frame_number`]); the frame is exact when it equals
//! [`render_planes`] of that number with the controls at their defaults.
//!
//! Prints one `frame I: ...` line per frame and a final
//! `RESULT frames=N exact=E bytes=B`; exits 0 when there is at least one frame, every
//! frame is exact and the file holds whole frames only.
//!
//! Built statically (`-C target-feature=+crt-static`) and run inside the guest of
//! `cargo xtask media-guest`, after v4l2-ctl captured from the real virtio-media driver.

use std::process::ExitCode;

use outboard_devices::media::camera::{decode_frame_number, plane_layout, render_planes, Adjust};
use outboard_devices::media::v4l2::fourcc;

/// What to check.
struct Args {
    fourcc: u32,
    width: u32,
    height: u32,
    file: String,
}

fn usage() -> String {
    "usage: media-frame-check --fourcc FOURCC --width W --height H FILE".into()
}

fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut fcc = None;
    let (mut width, mut height, mut file) = (None, None, None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--fourcc" => {
                let v = value()?;
                let code: [u8; 4] = v
                    .as_bytes()
                    .try_into()
                    .map_err(|_| format!("fourcc {v:?} is not 4 bytes"))?;
                fcc = Some(fourcc(&code));
            }
            "--width" => width = Some(value()?.parse().map_err(|e| format!("--width: {e}"))?),
            "--height" => height = Some(value()?.parse().map_err(|e| format!("--height: {e}"))?),
            f if !f.starts_with('-') && file.is_none() => file = Some(f.to_string()),
            other => return Err(format!("unknown argument {other:?}\n{}", usage())),
        }
    }
    Ok(Args {
        fourcc: fcc.ok_or_else(usage)?,
        width: width.ok_or_else(usage)?,
        height: height.ok_or_else(usage)?,
        file: file.ok_or_else(usage)?,
    })
}

/// Checks one frame (its planes concatenated); returns its number if it is exact, else
/// what differs.
fn check_frame(fourcc: u32, width: u32, height: u32, frame: &[u8]) -> Result<u32, String> {
    let n = decode_frame_number(fourcc, width, height, frame)
        .ok_or("no frame number (format or size unsupported, or the frame is short)")?;
    let planes = render_planes(fourcc, width, height, n, &Adjust::default())
        .ok_or("the camera cannot render this format")?;
    let want: Vec<u8> = planes.concat();
    if want.len() != frame.len() {
        return Err(format!(
            "sequence {n}: {} bytes, the pattern has {}",
            frame.len(),
            want.len()
        ));
    }
    let differ = want.iter().zip(frame).filter(|(a, b)| a != b).count();
    match want.iter().zip(frame).position(|(a, b)| a != b) {
        None => Ok(n),
        Some(at) => Err(format!(
            "sequence {n}: {differ} bytes differ, the first at offset {at} (got {:#04x}, want {:#04x})",
            frame[at], want[at]
        )),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse_args(&args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("media-frame-check: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(layout) = plane_layout(args.fourcc, args.width, args.height) else {
        println!("RESULT frames=0 exact=0 bytes=0 (the camera has no such format or size)");
        return ExitCode::FAILURE;
    };
    let frame_size: usize = layout.iter().map(|(_, size)| *size as usize).sum();
    let data = match std::fs::read(&args.file) {
        Ok(d) => d,
        Err(e) => {
            println!("RESULT frames=0 exact=0 bytes=0 (read {}: {e})", args.file);
            return ExitCode::FAILURE;
        }
    };
    let (mut frames, mut exact) = (0usize, 0usize);
    for (i, frame) in data.chunks_exact(frame_size).enumerate() {
        frames += 1;
        match check_frame(args.fourcc, args.width, args.height, frame) {
            Ok(n) => {
                exact += 1;
                println!("frame {i}: sequence {n} exact");
            }
            Err(e) => println!("frame {i}: FAIL {e}"),
        }
    }
    let rest = data.len() % frame_size;
    if rest != 0 {
        println!("FAIL {rest} bytes after the last whole frame of {frame_size}");
    }
    println!("RESULT frames={frames} exact={exact} bytes={}", data.len());
    if frames > 0 && exact == frames && rest == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use outboard_devices::media::v4l2::{PIX_FMT_NV12M, PIX_FMT_YUV420M, PIX_FMT_YUYV};

    #[test]
    fn rendered_frames_are_exact_and_a_changed_byte_is_not() {
        for fcc in [PIX_FMT_YUYV, PIX_FMT_NV12M, PIX_FMT_YUV420M] {
            let mut frame = render_planes(fcc, 64, 48, 1234, &Adjust::default())
                .unwrap()
                .concat();
            assert_eq!(check_frame(fcc, 64, 48, &frame), Ok(1234));
            let last = frame.len() - 1;
            frame[last] ^= 1;
            let err = check_frame(fcc, 64, 48, &frame).unwrap_err();
            assert!(err.contains("1 bytes differ"), "{err}");
            assert!(check_frame(fcc, 64, 48, &frame[..10]).is_err());
        }
    }

    #[test]
    fn arguments() {
        let a: Vec<String> = ["--fourcc", "NM12", "--width", "640", "--height", "480", "f"]
            .map(String::from)
            .to_vec();
        let p = parse_args(&a).unwrap();
        assert_eq!((p.fourcc, p.width, p.height), (PIX_FMT_NV12M, 640, 480));
        assert_eq!(p.file, "f");
        assert!(parse_args(&a[..6]).is_err());
        assert!(parse_args(&["--fourcc".into(), "NM1".into()]).is_err());
    }
}
