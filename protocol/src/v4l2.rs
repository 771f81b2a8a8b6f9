//! V4L2 (`linux/videodev2.h`) as virtio-media carries it: the ioctl codes, the
//! structures of their arguments in the 64-bit Linux layout, and the constants they hold.
//!
//! # Ioctl codes
//!
//! virtio-media's IOCTL command names an ioctl by its number, the `_IOC_NR` part of the
//! Linux request code (`VIDIOC_G_FMT` is number 4). [`V4l2Ioctl`] lists every V4L2
//! ioctl with that number, its data direction, the size of its argument on 64-bit
//! Linux (the layout virtio-media uses on the wire) and the full Linux request code.
//! [`V4l2Ioctl::from_code`] accepts either form.
//!
//! The table was generated from the kernel's `videodev2.h` (Linux 6.1, 64-bit) plus
//! `VIDIOC_REMOVE_BUFS`, added in Linux 6.10; a test recomputes every request code from
//! its direction, type, number and size.
//!
//! # Structures
//!
//! Every argument structure a device reads or writes ([`V4l2Format`], [`V4l2Buffer`],
//! [`V4l2Plane`], [`V4l2ExtControls`], ...) is a zerocopy type of the kernel's 64-bit
//! layout, with explicit padding fields; tests pin each size to
//! [`V4l2Ioctl::arg_size`] and the field offsets that matter to the kernel's. Pointers
//! inside them are opaque 64-bit values (the guest's pointers mean nothing to a
//! device). The ioctls a capture device never needs are carried as [`RawArg`]s of their
//! exact kernel size.
//!
//! # Constants
//!
//! The `V4L2_*` constants those structures carry (pixel formats, buffer types and
//! flags, memory types, capabilities, controls, events, selection targets), named as
//! in the kernel header without the `V4L2_` prefix: `V4L2_BUF_TYPE_VIDEO_CAPTURE` is
//! [`BUF_TYPE_VIDEO_CAPTURE`].

mod consts;
mod structs;

pub use consts::*;
pub use structs::*;

use crate::{ProtocolError, Result};

/// The ioctl type letter of every V4L2 ioctl (`'V'`).
pub const V4L2_IOCTL_TYPE: u8 = b'V';

/// Data direction of an ioctl, from the caller's point of view (Linux `_IOC_DIR`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoctlDir {
    /// `_IO`: no argument.
    None,
    /// `_IOW`: the caller passes data in.
    Write,
    /// `_IOR`: the callee passes data out.
    Read,
    /// `_IOWR`: both.
    ReadWrite,
}

impl IoctlDir {
    /// The two direction bits of a Linux request code.
    pub const fn bits(self) -> u32 {
        match self {
            IoctlDir::None => 0,
            IoctlDir::Write => 1,
            IoctlDir::Read => 2,
            IoctlDir::ReadWrite => 3,
        }
    }

    /// Whether the device reads an argument from the guest.
    pub const fn has_input(self) -> bool {
        matches!(self, IoctlDir::Write | IoctlDir::ReadWrite)
    }

    /// Whether the device writes an argument back to the guest.
    pub const fn has_output(self) -> bool {
        matches!(self, IoctlDir::Read | IoctlDir::ReadWrite)
    }
}

/// Builds a Linux ioctl request code (`_IOC(dir, type, nr, size)`).
pub const fn ioc(dir: IoctlDir, ty: u8, nr: u8, size: u16) -> u32 {
    (dir.bits() << 30) | ((size as u32 & 0x3fff) << 16) | ((ty as u32) << 8) | nr as u32
}

macro_rules! ioctls {
    ($( $name:ident = $nr:literal, $dir:ident, $size:literal, $code:literal; )*) => {
        /// Every V4L2 ioctl, by its number (`_IOC_NR`).
        #[repr(u8)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[allow(non_camel_case_types)]
        pub enum V4l2Ioctl {
            $(
                #[doc = concat!("`", stringify!($name), "` (number ", stringify!($nr), ").")]
                $name = $nr,
            )*
        }

        impl V4l2Ioctl {
            /// Every ioctl, in numeric order.
            pub const ALL: &'static [V4l2Ioctl] = &[$(V4l2Ioctl::$name,)*];

            /// Looks an ioctl up by its number.
            #[inline]
            pub const fn from_nr(nr: u8) -> Option<Self> {
                match nr {
                    $($nr => Some(V4l2Ioctl::$name),)*
                    _ => None,
                }
            }

            /// The ioctl's name (`VIDIOC_...`).
            #[inline]
            pub const fn name(self) -> &'static str {
                match self {
                    $(V4l2Ioctl::$name => stringify!($name),)*
                }
            }

            /// Data direction.
            pub const fn dir(self) -> IoctlDir {
                match self {
                    $(V4l2Ioctl::$name => IoctlDir::$dir,)*
                }
            }

            /// Size of the argument structure on 64-bit Linux, in bytes.
            pub const fn arg_size(self) -> usize {
                match self {
                    $(V4l2Ioctl::$name => $size,)*
                }
            }

            /// The full Linux request code on 64-bit Linux.
            pub const fn request_code(self) -> u32 {
                match self {
                    $(V4l2Ioctl::$name => $code,)*
                }
            }
        }
    };
}

ioctls! {
    VIDIOC_QUERYCAP = 0, Read, 104, 0x80685600;
    VIDIOC_ENUM_FMT = 2, ReadWrite, 64, 0xc0405602;
    VIDIOC_G_FMT = 4, ReadWrite, 208, 0xc0d05604;
    VIDIOC_S_FMT = 5, ReadWrite, 208, 0xc0d05605;
    VIDIOC_REQBUFS = 8, ReadWrite, 20, 0xc0145608;
    VIDIOC_QUERYBUF = 9, ReadWrite, 88, 0xc0585609;
    VIDIOC_G_FBUF = 10, Read, 48, 0x8030560a;
    VIDIOC_S_FBUF = 11, Write, 48, 0x4030560b;
    VIDIOC_OVERLAY = 14, Write, 4, 0x4004560e;
    VIDIOC_QBUF = 15, ReadWrite, 88, 0xc058560f;
    VIDIOC_EXPBUF = 16, ReadWrite, 64, 0xc0405610;
    VIDIOC_DQBUF = 17, ReadWrite, 88, 0xc0585611;
    VIDIOC_STREAMON = 18, Write, 4, 0x40045612;
    VIDIOC_STREAMOFF = 19, Write, 4, 0x40045613;
    VIDIOC_G_PARM = 21, ReadWrite, 204, 0xc0cc5615;
    VIDIOC_S_PARM = 22, ReadWrite, 204, 0xc0cc5616;
    VIDIOC_G_STD = 23, Read, 8, 0x80085617;
    VIDIOC_S_STD = 24, Write, 8, 0x40085618;
    VIDIOC_ENUMSTD = 25, ReadWrite, 72, 0xc0485619;
    VIDIOC_ENUMINPUT = 26, ReadWrite, 80, 0xc050561a;
    VIDIOC_G_CTRL = 27, ReadWrite, 8, 0xc008561b;
    VIDIOC_S_CTRL = 28, ReadWrite, 8, 0xc008561c;
    VIDIOC_G_TUNER = 29, ReadWrite, 84, 0xc054561d;
    VIDIOC_S_TUNER = 30, Write, 84, 0x4054561e;
    VIDIOC_G_AUDIO = 33, Read, 52, 0x80345621;
    VIDIOC_S_AUDIO = 34, Write, 52, 0x40345622;
    VIDIOC_QUERYCTRL = 36, ReadWrite, 68, 0xc0445624;
    VIDIOC_QUERYMENU = 37, ReadWrite, 44, 0xc02c5625;
    VIDIOC_G_INPUT = 38, Read, 4, 0x80045626;
    VIDIOC_S_INPUT = 39, ReadWrite, 4, 0xc0045627;
    VIDIOC_G_EDID = 40, ReadWrite, 40, 0xc0285628;
    VIDIOC_S_EDID = 41, ReadWrite, 40, 0xc0285629;
    VIDIOC_G_OUTPUT = 46, Read, 4, 0x8004562e;
    VIDIOC_S_OUTPUT = 47, ReadWrite, 4, 0xc004562f;
    VIDIOC_ENUMOUTPUT = 48, ReadWrite, 72, 0xc0485630;
    VIDIOC_G_AUDOUT = 49, Read, 52, 0x80345631;
    VIDIOC_S_AUDOUT = 50, Write, 52, 0x40345632;
    VIDIOC_G_MODULATOR = 54, ReadWrite, 68, 0xc0445636;
    VIDIOC_S_MODULATOR = 55, Write, 68, 0x40445637;
    VIDIOC_G_FREQUENCY = 56, ReadWrite, 44, 0xc02c5638;
    VIDIOC_S_FREQUENCY = 57, Write, 44, 0x402c5639;
    VIDIOC_CROPCAP = 58, ReadWrite, 44, 0xc02c563a;
    VIDIOC_G_CROP = 59, ReadWrite, 20, 0xc014563b;
    VIDIOC_S_CROP = 60, Write, 20, 0x4014563c;
    VIDIOC_G_JPEGCOMP = 61, Read, 140, 0x808c563d;
    VIDIOC_S_JPEGCOMP = 62, Write, 140, 0x408c563e;
    VIDIOC_QUERYSTD = 63, Read, 8, 0x8008563f;
    VIDIOC_TRY_FMT = 64, ReadWrite, 208, 0xc0d05640;
    VIDIOC_ENUMAUDIO = 65, ReadWrite, 52, 0xc0345641;
    VIDIOC_ENUMAUDOUT = 66, ReadWrite, 52, 0xc0345642;
    VIDIOC_G_PRIORITY = 67, Read, 4, 0x80045643;
    VIDIOC_S_PRIORITY = 68, Write, 4, 0x40045644;
    VIDIOC_G_SLICED_VBI_CAP = 69, ReadWrite, 116, 0xc0745645;
    VIDIOC_LOG_STATUS = 70, None, 0, 0x5646;
    VIDIOC_G_EXT_CTRLS = 71, ReadWrite, 32, 0xc0205647;
    VIDIOC_S_EXT_CTRLS = 72, ReadWrite, 32, 0xc0205648;
    VIDIOC_TRY_EXT_CTRLS = 73, ReadWrite, 32, 0xc0205649;
    VIDIOC_ENUM_FRAMESIZES = 74, ReadWrite, 44, 0xc02c564a;
    VIDIOC_ENUM_FRAMEINTERVALS = 75, ReadWrite, 52, 0xc034564b;
    VIDIOC_G_ENC_INDEX = 76, Read, 2072, 0x8818564c;
    VIDIOC_ENCODER_CMD = 77, ReadWrite, 40, 0xc028564d;
    VIDIOC_TRY_ENCODER_CMD = 78, ReadWrite, 40, 0xc028564e;
    VIDIOC_DBG_S_REGISTER = 79, Write, 56, 0x4038564f;
    VIDIOC_DBG_G_REGISTER = 80, ReadWrite, 56, 0xc0385650;
    VIDIOC_S_HW_FREQ_SEEK = 82, Write, 48, 0x40305652;
    VIDIOC_S_DV_TIMINGS = 87, ReadWrite, 132, 0xc0845657;
    VIDIOC_G_DV_TIMINGS = 88, ReadWrite, 132, 0xc0845658;
    VIDIOC_DQEVENT = 89, Read, 136, 0x80885659;
    VIDIOC_SUBSCRIBE_EVENT = 90, Write, 32, 0x4020565a;
    VIDIOC_UNSUBSCRIBE_EVENT = 91, Write, 32, 0x4020565b;
    VIDIOC_CREATE_BUFS = 92, ReadWrite, 256, 0xc100565c;
    VIDIOC_PREPARE_BUF = 93, ReadWrite, 88, 0xc058565d;
    VIDIOC_G_SELECTION = 94, ReadWrite, 64, 0xc040565e;
    VIDIOC_S_SELECTION = 95, ReadWrite, 64, 0xc040565f;
    VIDIOC_DECODER_CMD = 96, ReadWrite, 72, 0xc0485660;
    VIDIOC_TRY_DECODER_CMD = 97, ReadWrite, 72, 0xc0485661;
    VIDIOC_ENUM_DV_TIMINGS = 98, ReadWrite, 148, 0xc0945662;
    VIDIOC_QUERY_DV_TIMINGS = 99, Read, 132, 0x80845663;
    VIDIOC_DV_TIMINGS_CAP = 100, ReadWrite, 144, 0xc0905664;
    VIDIOC_ENUM_FREQ_BANDS = 101, ReadWrite, 64, 0xc0405665;
    VIDIOC_DBG_G_CHIP_INFO = 102, ReadWrite, 200, 0xc0c85666;
    VIDIOC_QUERY_EXT_CTRL = 103, ReadWrite, 232, 0xc0e85667;
    VIDIOC_REMOVE_BUFS = 104, ReadWrite, 64, 0xc0405668;
}

impl V4l2Ioctl {
    /// Looks up a raw code: either a bare ioctl number (what virtio-media's IOCTL
    /// command carries) or a full Linux request code, which must then match the table
    /// exactly (type `'V'`, direction and size).
    #[inline]
    pub fn from_code(code: u32) -> Result<Self> {
        let unknown = ProtocolError::Unknown {
            what: "V4L2 ioctl code",
            value: code.into(),
        };
        if code <= 0xff {
            return Self::from_nr(code as u8).ok_or(unknown);
        }
        match Self::from_nr((code & 0xff) as u8) {
            Some(ioctl) if ioctl.request_code() == code => Ok(ioctl),
            _ => Err(unknown),
        }
    }

    /// The ioctl number (`_IOC_NR`), the code virtio-media's IOCTL command carries.
    pub const fn nr(self) -> u8 {
        self as u8
    }

    /// Whether a virtio-media driver never forwards this ioctl to the device, because
    /// the guest answers it itself (QUERYCAP from the config space, priorities, the
    /// crop API emulated over the selection API, debug registers, log status) or
    /// because it is carried as an event (DQBUF, DQEVENT) or unsupported (overlay,
    /// JPEG compression parameters). A device answers these with `ENOTTY`.
    #[inline]
    pub const fn is_handled_by_driver(self) -> bool {
        use V4l2Ioctl::*;
        matches!(
            self,
            VIDIOC_QUERYCAP
                | VIDIOC_G_FBUF
                | VIDIOC_S_FBUF
                | VIDIOC_OVERLAY
                | VIDIOC_DQBUF
                | VIDIOC_DQEVENT
                | VIDIOC_G_PRIORITY
                | VIDIOC_S_PRIORITY
                | VIDIOC_LOG_STATUS
                | VIDIOC_DBG_G_REGISTER
                | VIDIOC_DBG_S_REGISTER
                | VIDIOC_DBG_G_CHIP_INFO
                | VIDIOC_CROPCAP
                | VIDIOC_G_CROP
                | VIDIOC_S_CROP
                | VIDIOC_G_JPEGCOMP
                | VIDIOC_S_JPEGCOMP
        )
    }
}

impl TryFrom<u32> for V4l2Ioctl {
    type Error = ProtocolError;
    fn try_from(code: u32) -> Result<Self> {
        Self::from_code(code)
    }
}

impl core::fmt::Display for V4l2Ioctl {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// Size of `struct v4l2_buffer` on 64-bit Linux.
pub const V4L2_BUFFER_SIZE: usize = 88;
/// Size of `struct v4l2_plane` on 64-bit Linux.
pub const V4L2_PLANE_SIZE: usize = 64;
/// Size of `struct v4l2_event` on 64-bit Linux.
pub const V4L2_EVENT_SIZE: usize = 136;
/// `VIDEO_MAX_PLANES`: the most planes a multi-planar buffer has.
pub const VIDEO_MAX_PLANES: usize = 8;
