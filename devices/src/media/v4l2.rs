//! The V4L2 structures and constants, re-exported from [`outboard_protocol::v4l2`].
//!
//! The spec lives in the protocol crate (the 64-bit layouts of `linux/videodev2.h`, the
//! `V4L2_*` constants and the ioctl codes); this module keeps the paths
//! `outboard_devices::media::v4l2::*` that device code and tests use.

pub use outboard_protocol::v4l2::*;
