//! `media_proxy`: the V4L2 host proxy (`V4l2Proxy`, feature `v4l2-proxy`) under the
//! virtio-media command queue, over a real V4L2 node: the proxy's own argument decoding
//! and pointer rewriting (multi-planar planes, USERPTR shadows from guest SG lists,
//! extended control payloads), then the host driver's answers and the proxy's rewriting
//! of them back. The input is the command program of `outboard_fuzz::media` (its module
//! doc gives the format and the asserts), shared with `media_commands`.
//!
//! The node is `$OUTBOARD_FUZZ_V4L2_NODE` (default `/dev/video0`); the harness makes the
//! first word of an argument the node's capture buffer type (single- or multi-planar)
//! when the program asks. No host here has a V4L2 node, so `cargo xtask fuzz
//! media_proxy` runs this target in a QEMU guest with vivid loaded (without its error
//! injection controls, one of which unregisters the node).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use outboard_devices::media::proxy::{HostNode, V4l2Proxy};
use outboard_devices::media::v4l2::{
    BUF_TYPE_VIDEO_CAPTURE, BUF_TYPE_VIDEO_CAPTURE_MPLANE, CAP_VIDEO_CAPTURE_MPLANE,
    CAP_VIDEO_M2M_MPLANE,
};
use outboard_devices::media::{EventBuffer, GuestMemoryRegions};
use outboard_protocol::media::MediaConfig;
use outboard_tests::media::{MediaGuest, TestShm};

type Proxy = V4l2Proxy<EventBuffer, TestShm, GuestMemoryRegions>;

fn node() -> &'static HostNode {
    static NODE: OnceLock<HostNode> = OnceLock::new();
    NODE.get_or_init(|| {
        let path = std::env::var_os("OUTBOARD_FUZZ_V4L2_NODE")
            .map_or_else(|| PathBuf::from("/dev/video0"), PathBuf::from);
        match HostNode::probe(&path) {
            Ok(node) => node,
            Err(e) => panic!("media_proxy needs a V4L2 capture node: {e}"),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let node = node();
    let buf_type = if node.device_caps & (CAP_VIDEO_CAPTURE_MPLANE | CAP_VIDEO_M2M_MPLANE) != 0 {
        BUF_TYPE_VIDEO_CAPTURE_MPLANE
    } else {
        BUF_TYPE_VIDEO_CAPTURE
    };
    let g: MediaGuest<Proxy> = MediaGuest::new(
        MediaConfig::new(node.device_caps, 0, &node.card),
        |events, shm, guest| V4l2Proxy::new(node.clone(), events, shm, guest),
    );
    outboard_fuzz::media::run(data, g, buf_type);
});
