//! `media-frame-check [--quiet] --fourcc F --width W --height H FILE`: checks the frames a
//! capture from Outboard's software camera wrote to FILE byte for byte against the
//! camera's pattern.
//!
//! FILE is what `v4l2-ctl --stream-mmap|--stream-user --stream-to=FILE` writes: the
//! frames one after another, each as its memory planes one after another (for each plane,
//! its `bytesused` bytes after `data_offset`), so a frame of format F at W x H is the
//! sum of the plane sizes of [`plane_layout`] long. Each frame carries its number in its
//! top band ([`decode_frame_number`]); the frame is exact when it equals
//! [`render_planes`] of that number with the controls at their defaults.
//!
//! FILE `-` is standard input (`v4l2-ctl --stream-to=-` piped in): the frames are read and
//! checked one at a time in either case, so a capture larger than memory (or than the
//! guest's /tmp) can be checked as it streams.
//!
//! Prints one `frame I: ...` line per frame (with `--quiet`, only those of frames that are
//! not exact) and a final `RESULT frames=N exact=E bytes=B`; exits 0 when there is at
//! least one frame, every frame is exact and the input holds whole frames only.
//!
//! Built statically (`-C target-feature=+crt-static`) and run inside the guest of
//! `cargo xtask media-guest`, after v4l2-ctl captured from the real virtio-media driver.

use std::io::{self, Read, Write};
use std::process::ExitCode;

use outboard_devices::media::camera::{decode_frame_number, plane_layout, render_planes, Adjust};
use outboard_devices::media::v4l2::fourcc;

/// What to check.
struct Args {
    fourcc: u32,
    width: u32,
    height: u32,
    /// `-`: standard input.
    file: String,
    /// Print only the frames that are not exact.
    quiet: bool,
}

fn usage() -> String {
    "usage: media-frame-check [--quiet] --fourcc FOURCC --width W --height H FILE|-".into()
}

fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut fcc = None;
    let (mut width, mut height, mut file) = (None, None, None);
    let mut quiet = false;
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
            "--quiet" => quiet = true,
            f if (f == "-" || !f.starts_with('-')) && file.is_none() => file = Some(f.to_string()),
            other => return Err(format!("unknown argument {other:?}\n{}", usage())),
        }
    }
    Ok(Args {
        fourcc: fcc.ok_or_else(usage)?,
        width: width.ok_or_else(usage)?,
        height: height.ok_or_else(usage)?,
        file: file.ok_or_else(usage)?,
        quiet,
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

/// What a check of a whole input found.
#[derive(Debug, Default, PartialEq, Eq)]
struct Summary {
    frames: usize,
    exact: usize,
    bytes: u64,
    /// Bytes after the last whole frame.
    rest: usize,
}

/// Fills `buf` from `input` as far as it goes; the bytes read (fewer than `buf.len()`
/// only at the end of the input).
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Checks the frames of `input` one at a time (frames of `frame_size` bytes), writing a
/// `frame I:` line for each to `out` (only for those that are not exact if `quiet`).
fn check_stream(
    args: &Args,
    frame_size: usize,
    mut input: impl Read,
    out: &mut impl Write,
) -> io::Result<Summary> {
    let mut s = Summary::default();
    let mut frame = vec![0u8; frame_size];
    loop {
        let got = read_full(&mut input, &mut frame)?;
        s.bytes += got as u64;
        if got < frame_size {
            s.rest = got;
            return Ok(s);
        }
        let i = s.frames;
        s.frames += 1;
        match check_frame(args.fourcc, args.width, args.height, &frame) {
            Ok(n) => {
                s.exact += 1;
                if !args.quiet {
                    writeln!(out, "frame {i}: sequence {n} exact")?;
                }
            }
            Err(e) => writeln!(out, "frame {i}: FAIL {e}")?,
        }
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
    let input: Box<dyn Read> = if args.file == "-" {
        Box::new(io::stdin().lock())
    } else {
        match std::fs::File::open(&args.file) {
            Ok(f) => Box::new(f),
            Err(e) => {
                println!("RESULT frames=0 exact=0 bytes=0 (read {}: {e})", args.file);
                return ExitCode::FAILURE;
            }
        }
    };
    let mut out = io::stdout().lock();
    let s = match check_stream(&args, frame_size, input, &mut out) {
        Ok(s) => s,
        Err(e) => {
            println!("RESULT frames=0 exact=0 bytes=0 (read {}: {e})", args.file);
            return ExitCode::FAILURE;
        }
    };
    if s.rest != 0 {
        println!(
            "FAIL {} bytes after the last whole frame of {frame_size}",
            s.rest
        );
    }
    println!(
        "RESULT frames={} exact={} bytes={}",
        s.frames, s.exact, s.bytes
    );
    if s.frames > 0 && s.exact == s.frames && s.rest == 0 {
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
        assert!(!p.quiet);
        assert!(parse_args(&a[..6]).is_err());
        let mut q = a.clone();
        q[6] = "-".into();
        q.push("--quiet".into());
        let p = parse_args(&q).unwrap();
        assert_eq!(p.file, "-");
        assert!(p.quiet);
        assert!(parse_args(&["--fourcc".into(), "NM1".into()]).is_err());
    }

    #[test]
    fn a_stream_is_checked_frame_by_frame() {
        let (w, h) = (64, 48);
        let good = |n| {
            render_planes(PIX_FMT_YUYV, w, h, n, &Adjust::default())
                .unwrap()
                .concat()
        };
        let size = good(0).len();
        let mut bad = good(8);
        bad[size / 2] ^= 0x40;
        let mut data = [good(7), bad, good(9)].concat();
        data.extend_from_slice(&[1, 2, 3]);
        let mut args = Args {
            fourcc: PIX_FMT_YUYV,
            width: w,
            height: h,
            file: "-".into(),
            quiet: false,
        };
        // A reader that hands out a few bytes at a time, like a pipe.
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(self.0.len()).min(1000);
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut out = Vec::new();
        let s = check_stream(&args, size, Trickle(&data), &mut out).unwrap();
        assert_eq!(
            s,
            Summary {
                frames: 3,
                exact: 2,
                bytes: data.len() as u64,
                rest: 3
            }
        );
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(
            text.contains("frame 1: FAIL sequence 8: 1 bytes differ"),
            "{text}"
        );
        // Quiet: the failing frame only.
        args.quiet = true;
        let mut out = Vec::new();
        check_stream(&args, size, &data[..], &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("frame 1: FAIL") && text.lines().count() == 1,
            "{text}"
        );
    }
}
