//! The capture applications `cargo xtask media-guest` runs in its guest: GStreamer's
//! `v4l2src` and ffmpeg's `v4l2` input, as people capture with them, on every camera
//! mode, through the real virtio-media driver.
//!
//! They come from Debian trixie packages installed in the media-guest root
//! (`ROOT_PACKAGES` in `media_guest.rs`), which the guest mounts read-only over virtio-9p and runs them in
//! with `chroot` (`inr`, see [`GUEST_SETUP`]): no library chasing into the initramfs, the
//! applications find their plugins and codecs where Debian put them.
//!
//! Per mode ([`runs`]): one GStreamer capture per format the camera offers, the I/O
//! modes `mmap` and `auto` and the rates 15/1 and 60/1 taking turns, and one `userptr`
//! capture (through `videoconvert`, see [`runs`]), each [`CHECK_FRAMES`] frames at
//! [`SIZE`] into a file that `media-frame-check` compares byte for byte with the camera's
//! pattern; one sustained run of [`RATE_FRAMES`] frames at 60/1 into `fakesink`. ffmpeg
//! captures every single-planar format the same way and sustains [`RATE_FRAMES`] frames
//! at 60 fps; its packets' pts must be the guest's clock (the first no earlier than the
//! guest's `CLOCK_MONOTONIC` before the run, the last frame ending no later than the clock
//! after it, each with [`START_SLACK_S`] of slack). On a multi-planar device ffmpeg must
//! refuse at once (its `v4l2` input knows only single-planar buffers), not hang.
//!
//! Every GStreamer run has `GST_DEBUG=v4l2src:2`: the driver's timestamps must be ones
//! GStreamer uses, so its "does not correlate with any clock" warning fails the run.

use std::fmt::Write as _;

use crate::media_guest::{frames as frames_result, prefixed, Frames};

/// The capture size of every client run.
pub const SIZE: (u32, u32) = (1280, 720);
/// Frames each checked run captures.
pub const CHECK_FRAMES: u32 = 20;
/// Frames each sustained-rate run captures.
pub const RATE_FRAMES: u32 = 300;
/// How long one client run may take, seconds (then it is killed and fails).
pub const RUN_TIMEOUT_S: u32 = 90;
/// How long ffmpeg may take to refuse a multi-planar device, seconds.
pub const REFUSE_LIMIT_S: f64 = 30.0;
/// How far before the guest's clock at its start ffmpeg's first pts may lie, seconds.
pub const START_SLACK_S: f64 = 1.0;

/// A capture application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// `gst-launch-1.0 v4l2src ...`.
    Gst,
    /// `ffmpeg -f v4l2 ...`.
    Ffmpeg,
}

/// What a run must deliver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// [`CHECK_FRAMES`] frames, all exact, in the V4L2 format named (what
    /// `media-frame-check --fourcc` takes).
    Frames(&'static str),
    /// [`RATE_FRAMES`] frames, at a reported rate.
    Rate,
    /// A clean refusal: a non-zero exit within [`REFUSE_LIMIT_S`].
    Refused,
}

/// One client run of a mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// Its label in the console prefixes (`mg <mode> <label>| `), unique in a mode.
    pub label: String,
    /// The application.
    pub client: Client,
    /// What it is, for the summary.
    pub what: String,
    /// The command, run in the root; `$dev` is the node, `$out` the file to write.
    pub command: String,
    /// What it must deliver.
    pub expect: Expect,
    /// The frame rate asked for.
    pub fps: u32,
    /// The file holds the frames with the bytes of each 16-bit word swapped (UYVY for
    /// YUYV): the guest swaps them back (`dd conv=swab`) before the check.
    pub swab: bool,
}

/// A camera format as each client names it.
struct Format {
    /// The V4L2 fourcc the frame check takes (a contiguous equivalent for a
    /// multi-planar one: the planes one after another are the same bytes).
    v4l2: &'static str,
    /// GStreamer's `video/x-raw` format.
    gst: &'static str,
    /// ffmpeg's `-input_format`, for the single-planar formats.
    ffmpeg: Option<&'static str>,
}

/// The formats of the single-planar camera.
const FORMATS: [Format; 3] = [
    Format {
        v4l2: "YUYV",
        gst: "YUY2",
        ffmpeg: Some("yuyv422"),
    },
    Format {
        v4l2: "NV12",
        gst: "NV12",
        ffmpeg: Some("nv12"),
    },
    Format {
        v4l2: "RGB3",
        gst: "RGB",
        ffmpeg: Some("rgb24"),
    },
];
/// The one format the multi-planar camera adds that GStreamer tells apart from those
/// (its NV12M is GStreamer's NV12 again).
const FORMAT_YUV420M: Format = Format {
    v4l2: "YM12",
    gst: "I420",
    ffmpeg: None,
};

/// The GStreamer caps of a capture.
fn caps(f: &Format, fps: u32) -> String {
    format!(
        "video/x-raw,format={},width={},height={},framerate={fps}/1",
        f.gst, SIZE.0, SIZE.1
    )
}

/// The client runs of a mode, in order.
pub fn runs(mplane: bool) -> Vec<Run> {
    let mut formats: Vec<&Format> = FORMATS.iter().collect();
    if mplane {
        formats.push(&FORMAT_YUV420M);
    }
    let gst = "env GST_DEBUG=v4l2src:2 GST_DEBUG_NO_COLOR=1 gst-launch-1.0";
    let mut runs = Vec::new();
    for (i, f) in formats.iter().enumerate() {
        let io = ["mmap", "auto"][i % 2];
        let fps = [15, 60][i % 2];
        runs.push(Run {
            label: format!("gst-{}", f.v4l2.to_ascii_lowercase()),
            client: Client::Gst,
            what: format!("gst {io:<7} {:<4} {fps}/1", f.gst),
            command: format!(
                "{gst} v4l2src device=$dev io-mode={io} num-buffers={CHECK_FRAMES} ! {} \
                 ! filesink location=$out",
                caps(f, fps)
            ),
            expect: Expect::Frames(f.v4l2),
            fps,
            swab: false,
        });
    }
    // v4l2src imports USERPTR buffers only from a downstream pool, which filesink does
    // not have and videoconvert passing a format through does not either (it forwards
    // the query): converting YUY2 to UYVY, a swap of each 16-bit word and so exact, makes
    // videoconvert propose its pool.
    runs.push(Run {
        label: "gst-userptr".into(),
        client: Client::Gst,
        what: format!("gst userptr {:<4} 30/1 (UYVY)", FORMATS[0].gst),
        command: format!(
            "{gst} v4l2src device=$dev io-mode=userptr num-buffers={CHECK_FRAMES} ! {} \
             ! videoconvert ! video/x-raw,format=UYVY ! filesink location=$out",
            caps(&FORMATS[0], 30)
        ),
        expect: Expect::Frames(FORMATS[0].v4l2),
        fps: 30,
        swab: true,
    });
    runs.push(Run {
        label: "gst-rate".into(),
        client: Client::Gst,
        what: format!("gst mmap    {:<4} 60/1 x{RATE_FRAMES}", FORMATS[0].gst),
        command: format!(
            "{gst} v4l2src device=$dev io-mode=mmap num-buffers={RATE_FRAMES} ! {} ! fakesink",
            caps(&FORMATS[0], 60)
        ),
        expect: Expect::Rate,
        fps: 60,
        swab: false,
    });
    let ffmpeg = "ffmpeg -hide_banner -nostdin -nostats -f v4l2";
    let size = format!("{}x{}", SIZE.0, SIZE.1);
    if mplane {
        runs.push(Run {
            label: "ffmpeg-refused".into(),
            client: Client::Ffmpeg,
            what: "ffmpeg (single-planar only)".into(),
            command: format!("{ffmpeg} -video_size {size} -i $dev -frames:v 1 -f null -"),
            expect: Expect::Refused,
            fps: 0,
            swab: false,
        });
        return runs;
    }
    for f in &FORMATS {
        let Some(name) = f.ffmpeg else { continue };
        runs.push(Run {
            label: format!("ffmpeg-{}", f.v4l2.to_ascii_lowercase()),
            client: Client::Ffmpeg,
            what: format!("ffmpeg {name:<8} 15"),
            command: format!(
                "{ffmpeg} -input_format {name} -video_size {size} -framerate 15 -i $dev \
                 -frames:v {CHECK_FRAMES} -c:v copy -f rawvideo -y $out"
            ),
            expect: Expect::Frames(f.v4l2),
            fps: 15,
            swab: false,
        });
    }
    runs.push(Run {
        label: "ffmpeg-rate".into(),
        client: Client::Ffmpeg,
        what: format!("ffmpeg yuyv422  60 x{RATE_FRAMES}"),
        command: format!(
            "{ffmpeg} -input_format yuyv422 -video_size {size} -framerate 60 -i $dev \
             -frames:v {RATE_FRAMES} -c:v copy -f null -"
        ),
        expect: Expect::Rate,
        fps: 60,
        swab: false,
    });
    runs
}

/// What the guest does once, before any mode runs: mounts the root (virtio-9p, tag
/// `root`) at /r with the guest's own /dev, /proc, /sys and /tmp in it, writes `inr`
/// (runs a command in the root with a clean environment), and fills GStreamer's plugin
/// registry once for every later run.
pub const GUEST_SETUP: &str = r#"mkdir -p /r
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 root /r \
    || echo "mg: mounting the root over 9p failed"
mount --bind /dev /r/dev
mount -t proc proc /r/proc
mount -t sysfs sys /r/sys
mount --bind /tmp /r/tmp
mkdir -p /tmp/home
cat > /bin/inr <<'EOF'
#!/bin/sh
exec chroot /r /usr/bin/env -i PATH=/usr/bin:/bin HOME=/tmp/home LC_ALL=C.UTF-8 "$@"
EOF
chmod 755 /bin/inr
mark "gst-registry"
inr gst-inspect-1.0 v4l2src > /tmp/gst-inspect.txt 2>&1 \
    || { echo "mg: gst-inspect-1.0 v4l2src failed:"; sed 's/^/mg: gst-inspect| /' /tmp/gst-inspect.txt; }
mark "gst-registry done"
"#;

/// Single-quotes `s` for the guest's shell.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The guest's `run_clients MODE DEV` shell function: every run of [`runs`] for that
/// mode, each marked and its every output line prefixed `mg <mode> <label>| `, with the
/// guest's clock (`clock S`) before and after it and its exit status (`exit N`); the
/// checked runs' files go through `media-frame-check`.
pub fn guest_function(modes: &[(&str, bool)]) -> String {
    let mut s = String::from("run_clients() {\n    mode=$1 dev=$2\n    case $mode in\n");
    for (name, mplane) in modes {
        let _ = writeln!(s, "    {name})");
        for r in runs(*mplane) {
            let p = format!("mg $mode {}| ", r.label);
            let _ = writeln!(s, "        mark \"$mode {}\"", r.label);
            let _ = writeln!(s, "        out=/tmp/$mode-{}.raw", r.label);
            let _ = writeln!(s, "        echo \"{p}clock $(cut -d' ' -f1 /proc/uptime)\"");
            // ffmpeg ends its progress lines with \r.
            let _ = writeln!(
                s,
                "        {{ timeout {RUN_TIMEOUT_S} inr sh -c {} sh \"$dev\" \"$out\"; \
                 echo \"exit $?\"; }} 2>&1 | tr '\\r' '\\n' | sed \"s/^/{p}/\"",
                quote(&format!("dev=$1 out=$2; exec {}", r.command))
            );
            let _ = writeln!(s, "        echo \"{p}clock $(cut -d' ' -f1 /proc/uptime)\"");
            if r.swab {
                let _ = writeln!(
                    s,
                    "        dd if=$out of=$out.swab bs=1M conv=swab 2>/dev/null && mv $out.swab $out"
                );
            }
            if let Expect::Frames(fourcc) = r.expect {
                let _ = writeln!(
                    s,
                    "        media-frame-check --fourcc {fourcc} --width {} --height {} $out 2>&1 \
                     | sed \"s/^/{p}/\"",
                    SIZE.0, SIZE.1
                );
                let _ = writeln!(s, "        rm -f $out");
            }
        }
        let _ = writeln!(s, "        ;;");
    }
    s.push_str("    esac\n}\n");
    s
}

/// What one run's console lines say.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    /// The guest's clock before and after it, seconds.
    pub clock: Vec<f64>,
    /// Its exit status (`None`: no `exit` line).
    pub exit: Option<i32>,
    /// The frame check's result.
    pub frames: Frames,
    /// gst-launch's "Execution ended after H:MM:SS.nnnnnnnnn", seconds.
    pub gst_exec_s: Option<f64>,
    /// ffmpeg's `start:` (its first pts), seconds.
    pub ffmpeg_start_s: Option<f64>,
    /// ffmpeg's final `frame=` and `time=` (the stream time the frames span), seconds.
    pub ffmpeg_frames_time: Option<(u64, f64)>,
    /// Frames v4l2src saw the camera skip (its "lost frames detected: count = N"
    /// warnings): the camera runs at its rate and drops a frame no buffer is queued for.
    pub lost: u64,
    /// Warning and error lines (GStreamer's "does not correlate" included).
    pub complaints: Vec<String>,
}

/// `H:MM:SS.frac` (GStreamer's and ffmpeg's times) in seconds.
fn hms(s: &str) -> Option<f64> {
    let mut parts = s.trim().split(':');
    let (h, m, sec) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    Some(
        h.parse::<f64>().ok()? * 3600.0
            + m.parse::<f64>().ok()? * 60.0
            + sec.parse::<f64>().ok()?,
    )
}

/// The word after `key` in `line`, up to a space or a comma.
fn after<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(key)? + key.len();
    line[at..].trim_start().split([' ', ',']).next()
}

/// Parses the console lines of one run (prefix `mg <mode> <label>| `).
pub fn outcome(console: &str, prefix: &str) -> Outcome {
    let mut o = Outcome {
        frames: frames_result(console, prefix),
        ..Outcome::default()
    };
    for line in prefixed(console, prefix) {
        let line = line.trim();
        if let Some(c) = line.strip_prefix("clock ") {
            o.clock.extend(c.parse::<f64>().ok());
        } else if let Some(e) = line.strip_prefix("exit ") {
            o.exit = e.parse().ok();
        } else if let Some(t) = line.strip_prefix("Execution ended after ") {
            o.gst_exec_s = hms(t);
        } else if line.contains("Duration:") && line.contains("start:") {
            o.ffmpeg_start_s = after(line, "start:").and_then(|v| v.parse().ok());
        } else if line.starts_with("frame=") && line.contains("time=") {
            let n = after(line, "frame=").and_then(|v| v.parse().ok());
            let t = after(line, "time=").and_then(hms);
            if let (Some(n), Some(t)) = (n, t) {
                o.ffmpeg_frames_time = Some((n, t));
            }
        } else if let Some(n) = line
            .split_once("lost frames detected: count = ")
            .and_then(|(_, n)| n.split_whitespace().next()?.parse::<u64>().ok())
        {
            o.lost += n;
        } else if line.contains("does not correlate")
            || line.starts_with("ERROR")
            || line.contains(" WARN ")
            || line.contains("WARNING")
            || line.contains("[error]")
            || line.contains("Error")
        {
            o.complaints.push(line.to_string());
        }
    }
    o
}

impl Outcome {
    /// Seconds from the clock before the run to the clock after it.
    pub fn took_s(&self) -> Option<f64> {
        match self.clock[..] {
            [a, b] => Some(b - a),
            _ => None,
        }
    }

    /// The frame rate the run delivered: frames over the time they span (ffmpeg's
    /// `time=`) or over the time the pipeline played (gst-launch's execution time,
    /// which also holds the wait for the first frame).
    pub fn fps(&self, run: &Run) -> Option<f64> {
        match run.client {
            Client::Gst => {
                let n = match run.expect {
                    Expect::Frames(_) => CHECK_FRAMES,
                    Expect::Rate => RATE_FRAMES,
                    Expect::Refused => return None,
                };
                self.gst_exec_s
                    .filter(|t| *t > 0.0)
                    .map(|t| f64::from(n) / t)
            }
            Client::Ffmpeg => self
                .ffmpeg_frames_time
                .filter(|(_, t)| *t > 0.0)
                .map(|(n, t)| n as f64 / t),
        }
    }

    /// ffmpeg's first pts minus the guest's clock before the run (the run's start-up),
    /// and the guest's clock after the run minus the end of its last frame (first pts
    /// plus `time=`), seconds.
    pub fn ffmpeg_clock(&self) -> Option<(f64, f64)> {
        let start = self.ffmpeg_start_s?;
        let (_, time) = self.ffmpeg_frames_time?;
        match self.clock[..] {
            [before, after] => Some((start - before, after - (start + time))),
            _ => None,
        }
    }

    /// What is wrong with the run, if anything.
    pub fn problems(&self, run: &Run) -> Vec<String> {
        let mut p = Vec::new();
        match run.expect {
            Expect::Refused => {
                match self.exit {
                    Some(0) => p.push("exit 0: ffmpeg took a multi-planar device".into()),
                    None => p.push("no exit status".into()),
                    Some(_) => {}
                }
                match self.took_s() {
                    Some(t) if t <= REFUSE_LIMIT_S => {}
                    Some(t) => p.push(format!("refused after {t:.1} s (limit {REFUSE_LIMIT_S} s)")),
                    None => p.push("no clock before and after".into()),
                }
                return p;
            }
            Expect::Frames(_) => {
                let want = u64::from(CHECK_FRAMES);
                if self.frames.frames != Some(want) || self.frames.exact != want {
                    p.push(format!(
                        "frames: {}, expected {want} exact",
                        self.frames.summary()
                    ));
                }
                p.extend(self.frames.fails.iter().take(3).cloned());
            }
            Expect::Rate => {
                if self.fps(run).is_none() {
                    p.push("no frame rate reported".into());
                }
                if let Some((n, _)) = self.ffmpeg_frames_time {
                    if n != u64::from(RATE_FRAMES) {
                        p.push(format!("{n} frames, expected {RATE_FRAMES}"));
                    }
                }
            }
        }
        if self.exit != Some(0) {
            p.push(format!("exit {:?}", self.exit));
        }
        if run.client == Client::Ffmpeg {
            match self.ffmpeg_clock() {
                Some((started, lag)) => {
                    // Both ends inside the run: the gaps are ffmpeg's start-up and its
                    // shutdown (STREAMOFF, a device round trip per unmapped buffer,
                    // CLOSE, exit), seconds under load in TCG; the host's clock, which
                    // the shipped driver passes on, is hours off.
                    if started < -START_SLACK_S || lag < -START_SLACK_S {
                        p.push(format!(
                            "the frames' pts are not the guest's clock: the first is {started:+.3} s \
                             from the clock before the run, the last ends {lag:.3} s before the \
                             clock after it (each must be > -{START_SLACK_S} s)"
                        ));
                    }
                }
                None => p.push("no first pts (ffmpeg's start:), time= or clock".into()),
            }
        }
        p.extend(self.complaints.iter().take(4).map(|c| format!("said: {c}")));
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_format_is_captured_by_gstreamer_and_the_single_planar_ones_by_ffmpeg() {
        let sp = runs(false);
        let mp = runs(true);
        let checked = |runs: &[Run], c: Client| -> Vec<&'static str> {
            runs.iter()
                .filter(|r| r.client == c)
                .filter_map(|r| match r.expect {
                    Expect::Frames(f) => Some(f),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(checked(&sp, Client::Gst), ["YUYV", "NV12", "RGB3", "YUYV"]);
        assert_eq!(
            checked(&mp, Client::Gst),
            ["YUYV", "NV12", "RGB3", "YM12", "YUYV"]
        );
        assert_eq!(checked(&sp, Client::Ffmpeg), ["YUYV", "NV12", "RGB3"]);
        assert!(checked(&mp, Client::Ffmpeg).is_empty());
        assert!(mp.iter().any(|r| r.expect == Expect::Refused));
        for runs in [&sp, &mp] {
            for io in ["io-mode=mmap ", "io-mode=auto ", "io-mode=userptr "] {
                assert!(runs.iter().any(|r| r.command.contains(io)), "{io}");
            }
            let mut labels: Vec<&str> = runs.iter().map(|r| r.label.as_str()).collect();
            labels.sort_unstable();
            labels.dedup();
            assert_eq!(labels.len(), runs.len(), "labels are unique");
        }
    }

    #[test]
    fn the_guest_function_runs_each_command_in_the_root_with_its_node_and_file() {
        let f = guest_function(&[("sp", false), ("mplane-jail", true)]);
        assert!(f.contains("    sp)\n"));
        assert!(f.contains("    mplane-jail)\n"));
        assert!(f.contains("timeout 90 inr sh -c 'dev=$1 out=$2; exec env GST_DEBUG=v4l2src:2"));
        assert!(f.contains("sh \"$dev\" \"$out\"; echo \"exit $?\"; }"));
        assert!(f.contains(
            "media-frame-check --fourcc RGB3 --width 1280 --height 720 $out 2>&1 | sed \"s/^/mg $mode ffmpeg-rgb3| /\""
        ));
        assert_eq!(quote("a'b"), r"'a'\''b'");
    }

    #[test]
    fn gstreamer_and_ffmpeg_results_are_parsed() {
        let console = "\
mg sp gst-yuyv| clock 20.50
mg sp gst-yuyv| Setting pipeline to PLAYING ...
mg sp gst-yuyv| 0:00:00.1 WARN v4l2src gstv4l2src.c:1234:gst_v4l2src_create:<v4l2src0> Timestamp does not correlate with any clock, ignoring driver timestamps
mg sp gst-yuyv| Execution ended after 0:00:01.400000000
mg sp gst-yuyv| exit 0
mg sp gst-yuyv| clock 22.00
mg sp gst-yuyv| RESULT frames=20 exact=20 bytes=36864000
mg sp ffmpeg-nv12| clock 30.00
mg sp ffmpeg-nv12| Input #0, video4linux2,v4l2, from '/dev/video0':
mg sp ffmpeg-nv12|   Duration: N/A, start: 31.250000, bitrate: 165888 kb/s
mg sp ffmpeg-nv12| frame=   20 fps=0.0 q=-1.0 Lsize=   27000KiB time=00:00:01.33 bitrate=N/A speed=0.9x
mg sp ffmpeg-nv12| exit 0
mg sp ffmpeg-nv12| clock 33.00
mg sp ffmpeg-nv12| RESULT frames=20 exact=19 bytes=27648000
mg sp gst-userptr| 0:00:01.2 WARN v4l2src gstv4l2src.c:1345:gst_v4l2src_create:<v4l2src0> lost frames detected: count = 2 - ts: 0:00:00.5
mg sp gst-userptr| 0:00:01.3 WARN v4l2src gstv4l2src.c:1345:gst_v4l2src_create:<v4l2src0> lost frames detected: count = 7 - ts: 0:00:00.6
mg sp ffmpeg-nv12| frame 3: FAIL sequence 3: 12 bytes differ
";
        let gst = runs(false)
            .into_iter()
            .find(|r| r.label == "gst-yuyv")
            .unwrap();
        let o = outcome(console, "mg sp gst-yuyv| ");
        assert_eq!(o.clock, [20.5, 22.0]);
        assert_eq!(o.exit, Some(0));
        assert_eq!(o.gst_exec_s, Some(1.4));
        assert!((o.fps(&gst).unwrap() - 20.0 / 1.4).abs() < 1e-9);
        let p = o.problems(&gst);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("does not correlate"));

        let ff = runs(false)
            .into_iter()
            .find(|r| r.label == "ffmpeg-nv12")
            .unwrap();
        let o = outcome(console, "mg sp ffmpeg-nv12| ");
        assert_eq!(o.ffmpeg_start_s, Some(31.25));
        assert_eq!(o.ffmpeg_frames_time, Some((20, 1.33)));
        let p = o.problems(&ff);
        assert!(p[0].contains("19/20 exact"), "{p:?}");
        assert!(!p.iter().any(|l| l.contains("guest's clock")), "{p:?}");
        let (started, lag) = o.ffmpeg_clock().unwrap();
        assert!((started - 1.25).abs() < 1e-9 && (lag - 0.42).abs() < 1e-9);
        // The host's clock (the shipped driver passes the device's stamp on).
        let host = console.replace("start: 31.250000", "start: 22786.250000");
        let p = outcome(&host, "mg sp ffmpeg-nv12| ").problems(&ff);
        assert!(
            p.iter().any(|l| l.contains("not the guest's clock")),
            "{p:?}"
        );
        // Stamped before the run began.
        let stale = console.replace("start: 31.250000", "start: 28.500000");
        let p = outcome(&stale, "mg sp ffmpeg-nv12| ").problems(&ff);
        assert!(p.iter().any(|l| l.contains("first is -1.500 s")), "{p:?}");
        // Or after it ended.
        let late = console.replace("start: 31.250000", "start: 33.000000");
        let p = outcome(&late, "mg sp ffmpeg-nv12| ").problems(&ff);
        assert!(p.iter().any(|l| l.contains("-1.330 s before")), "{p:?}");
        assert_eq!(outcome(console, "mg sp gst-userptr| ").lost, 9);
    }

    #[test]
    fn a_refusal_must_be_quick_and_not_a_success() {
        let run = runs(true)
            .into_iter()
            .find(|r| r.expect == Expect::Refused)
            .unwrap();
        let quick = "mg m ffmpeg-refused| clock 1.0\nmg m ffmpeg-refused| exit 1\nmg m ffmpeg-refused| clock 3.0\n";
        assert!(outcome(quick, "mg m ffmpeg-refused| ")
            .problems(&run)
            .is_empty());
        let slow = quick.replace("clock 3.0", "clock 60.0");
        assert!(!outcome(&slow, "mg m ffmpeg-refused| ")
            .problems(&run)
            .is_empty());
        let took = quick.replace("exit 1", "exit 0");
        assert!(!outcome(&took, "mg m ffmpeg-refused| ")
            .problems(&run)
            .is_empty());
    }
}
