//! `media_commands`: the virtio-media command queue and V4L2 ioctl dispatch
//! (`VirtioMedia` over `MediaRunner` over the `SoftwareCamera`, with real guest memory
//! for USERPTR buffers and SG lists). The input is the command program of
//! `outboard_fuzz::media` (its module doc gives the format and the asserts), shared
//! with `media_proxy`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outboard_devices::media::camera::{SoftwareCamera, DEVICE_CAPS};
use outboard_devices::media::v4l2::BUF_TYPE_VIDEO_CAPTURE;
use outboard_devices::media::{EventBuffer, GuestMemoryRegions};
use outboard_protocol::media::MediaConfig;
use outboard_tests::media::{MediaGuest, TestShm};

type Camera = SoftwareCamera<EventBuffer, TestShm, GuestMemoryRegions>;

fuzz_target!(|data: &[u8]| {
    let g: MediaGuest<Camera> = MediaGuest::new(
        MediaConfig::new(DEVICE_CAPS, 0, "camera"),
        SoftwareCamera::new,
    );
    outboard_fuzz::media::run(data, g, BUF_TYPE_VIDEO_CAPTURE);
});
