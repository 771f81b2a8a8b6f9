//! virtio-media (VIRTIO 1.4, device type 48).
//!
//! The driver sends commands on the command queue: a [`CmdHeader`] followed by the
//! command's body in the device-readable part of a chain; the device writes a
//! [`RespHeader`] (status = 0 or a positive errno) and the response body into the
//! device-writable part. `CLOSE` has no response. The device sends [`EventHeader`]
//! events on the event queue: errors, dequeued buffers (the `VIDIOC_DQBUF` answer) and
//! V4L2 events (the `VIDIOC_DQEVENT` answer).
//!
//! Guest memory referenced by ioctls (USERPTR buffers, extended control payloads) is
//! described by [`SgEntry`] lists that follow the ioctl payload. Buffers the device
//! allocates (MMAP memory) are mapped into the shared memory region [`SHMID_MMAP`].

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::v4l2::{
    V4l2Ioctl, V4L2_BUFFER_SIZE, V4L2_EVENT_SIZE, V4L2_PLANE_SIZE, VIDEO_MAX_PLANES,
};
use crate::{check_zero, ProtocolError, Result, Validate};

/// Virtio device id of virtio-media.
pub const VIRTIO_ID_MEDIA: u32 = 48;
/// Queue index of the command queue.
pub const COMMAND_QUEUE: usize = 0;
/// Queue index of the event queue.
pub const EVENT_QUEUE: usize = 1;
/// Number of queues.
pub const NUM_QUEUES: usize = 2;
/// Shared memory region id used for MMAP buffers.
pub const SHMID_MMAP: u8 = 0;
/// Length of [`MediaConfig::card`].
pub const CARD_NAME_LEN: usize = 32;

/// `VIRTIO_MEDIA_CMD_OPEN`.
pub const CMD_OPEN: u32 = 1;
/// `VIRTIO_MEDIA_CMD_CLOSE`.
pub const CMD_CLOSE: u32 = 2;
/// `VIRTIO_MEDIA_CMD_IOCTL`.
pub const CMD_IOCTL: u32 = 3;
/// `VIRTIO_MEDIA_CMD_MMAP`.
pub const CMD_MMAP: u32 = 4;
/// `VIRTIO_MEDIA_CMD_MUNMAP`.
pub const CMD_MUNMAP: u32 = 5;

/// `VIRTIO_MEDIA_EVENT_ERROR`.
pub const EVENT_ERROR: u32 = 0;
/// `VIRTIO_MEDIA_EVENT_DQBUF`.
pub const EVENT_DQBUF: u32 = 1;
/// `VIRTIO_MEDIA_EVENT_EVENT`.
pub const EVENT_EVENT: u32 = 2;

/// A virtio-media command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MediaCmd {
    /// Open a session.
    Open,
    /// Close a session.
    Close,
    /// Run an ioctl in a session.
    Ioctl,
    /// Map an MMAP buffer into the shared memory region.
    Mmap,
    /// Unmap it.
    Munmap,
}

impl MediaCmd {
    /// Decodes a raw command code.
    #[inline]
    pub fn from_raw(raw: u32) -> Result<Self> {
        Ok(match raw {
            CMD_OPEN => MediaCmd::Open,
            CMD_CLOSE => MediaCmd::Close,
            CMD_IOCTL => MediaCmd::Ioctl,
            CMD_MMAP => MediaCmd::Mmap,
            CMD_MUNMAP => MediaCmd::Munmap,
            v => {
                return Err(ProtocolError::Unknown {
                    what: "virtio-media command",
                    value: v.into(),
                })
            }
        })
    }

    /// The raw code.
    pub const fn code(self) -> u32 {
        match self {
            MediaCmd::Open => CMD_OPEN,
            MediaCmd::Close => CMD_CLOSE,
            MediaCmd::Ioctl => CMD_IOCTL,
            MediaCmd::Mmap => CMD_MMAP,
            MediaCmd::Munmap => CMD_MUNMAP,
        }
    }
}

/// Device config space (`struct virtio_media_config`, 40 bytes).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct MediaConfig {
    /// The `device_caps` of the V4L2 device (`V4L2_CAP_*`).
    pub device_caps: u32,
    /// The device node type (`MEDIA_TYPE_*`/`VFL_TYPE_*`; 0 = video).
    pub device_type: u32,
    /// The `card` name reported by `VIDIOC_QUERYCAP`, NUL-padded.
    pub card: [u8; CARD_NAME_LEN],
}

impl MediaConfig {
    /// A config with `card` truncated to 31 bytes and NUL-terminated.
    pub fn new(device_caps: u32, device_type: u32, card: &str) -> Self {
        let mut c = MediaConfig {
            device_caps,
            device_type,
            card: [0; CARD_NAME_LEN],
        };
        for (dst, src) in c.card.iter_mut().take(CARD_NAME_LEN - 1).zip(card.bytes()) {
            *dst = src;
        }
        c
    }
}

impl Validate for MediaConfig {
    fn validate(&self) -> Result<()> {
        if !self.card.contains(&0) {
            return Err(ProtocolError::OutOfBounds {
                what: "card name without NUL terminator",
                value: CARD_NAME_LEN as u64,
                limit: CARD_NAME_LEN as u64 - 1,
            });
        }
        Ok(())
    }
}

/// Every command starts with this (8 bytes).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct CmdHeader {
    /// A `CMD_*` code.
    pub cmd: u32,
    /// Reserved.
    pub reserved: u32,
}

impl CmdHeader {
    /// A header for `cmd`.
    pub const fn new(cmd: MediaCmd) -> Self {
        CmdHeader {
            cmd: cmd.code(),
            reserved: 0,
        }
    }
}

impl Validate for CmdHeader {
    fn validate(&self) -> Result<()> {
        MediaCmd::from_raw(self.cmd).map(|_| ())
    }
}

/// Every response starts with this (8 bytes).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct RespHeader {
    /// 0 on success, else a positive Linux errno.
    pub status: u32,
    /// Reserved.
    pub reserved: u32,
}

impl RespHeader {
    /// A success header.
    pub const fn ok() -> Self {
        RespHeader {
            status: 0,
            reserved: 0,
        }
    }

    /// An error header with a positive errno.
    pub const fn err(errno: u32) -> Self {
        RespHeader {
            status: errno,
            reserved: 0,
        }
    }
}

impl Validate for RespHeader {
    fn validate(&self) -> Result<()> {
        // Linux errnos stay below 4096 (MAX_ERRNO).
        if self.status >= 4096 {
            return Err(ProtocolError::OutOfBounds {
                what: "response errno",
                value: self.status.into(),
                limit: 4095,
            });
        }
        Ok(())
    }
}

/// `OPEN` has no body beyond the header. Response body: the new session id.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct OpenResp {
    /// Response header.
    pub hdr: RespHeader,
    /// The session id.
    pub session_id: u32,
    /// Reserved.
    pub reserved: u32,
}

impl OpenResp {
    /// A success response.
    pub const fn ok(session_id: u32) -> Self {
        OpenResp {
            hdr: RespHeader::ok(),
            session_id,
            reserved: 0,
        }
    }
}

/// `CLOSE` body (after the header). There is no response.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct CloseCmd {
    /// The session to close.
    pub session_id: u32,
    /// Reserved.
    pub reserved: u32,
}

impl Validate for CloseCmd {
    fn validate(&self) -> Result<()> {
        Ok(())
    }
}

/// `IOCTL` body (after the header); the ioctl's argument follows. The response is a
/// [`RespHeader`] followed by the argument as the device wrote it (for ioctls with
/// output).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct IoctlCmd {
    /// The session.
    pub session_id: u32,
    /// The ioctl number (`_IOC_NR`, see [`V4l2Ioctl`]).
    pub code: u32,
}

impl IoctlCmd {
    /// The decoded ioctl.
    #[inline]
    pub fn ioctl(&self) -> Result<V4l2Ioctl> {
        if self.code > 0xff {
            return Err(ProtocolError::Unknown {
                what: "virtio-media ioctl number",
                value: self.code.into(),
            });
        }
        V4l2Ioctl::from_code(self.code)
    }
}

impl Validate for IoctlCmd {
    fn validate(&self) -> Result<()> {
        self.ioctl().map(|_| ())
    }
}

/// Flags of [`MmapCmd`].
pub const MMAP_FLAG_RW: u32 = 1 << 0;

/// `MMAP` body (after the header, 12 bytes).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct MmapCmd {
    /// The session.
    pub session_id: u32,
    /// [`MMAP_FLAG_RW`] for a writable mapping.
    pub flags: u32,
    /// The buffer's `mem_offset` as `VIDIOC_QUERYBUF` reported it.
    pub offset: u32,
}

impl Validate for MmapCmd {
    fn validate(&self) -> Result<()> {
        let unknown = self.flags & !MMAP_FLAG_RW;
        if unknown != 0 {
            return Err(ProtocolError::Unknown {
                what: "virtio-media mmap flags",
                value: unknown.into(),
            });
        }
        Ok(())
    }
}

/// `MMAP` response (24 bytes).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct MmapResp {
    /// Response header.
    pub hdr: RespHeader,
    /// Offset of the mapping in the shared memory region.
    pub driver_addr: u64,
    /// Length of the mapping.
    pub len: u64,
}

impl MmapResp {
    /// A success response.
    pub const fn ok(driver_addr: u64, len: u64) -> Self {
        MmapResp {
            hdr: RespHeader::ok(),
            driver_addr,
            len,
        }
    }
}

/// `MUNMAP` body (after the header). The response is a bare [`RespHeader`].
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct MunmapCmd {
    /// The `driver_addr` a previous `MMAP` returned.
    pub driver_addr: u64,
}

impl Validate for MunmapCmd {
    fn validate(&self) -> Result<()> {
        Ok(())
    }
}

/// One guest memory segment of a scatter-gather list (16 bytes).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct SgEntry {
    /// Guest physical address.
    pub start: u64,
    /// Length in bytes.
    pub len: u32,
    /// Reserved.
    pub reserved: u32,
}

impl Validate for SgEntry {
    fn validate(&self) -> Result<()> {
        if self.len == 0 {
            return Err(ProtocolError::Zero("SG entry length"));
        }
        if self.start.checked_add(self.len.into()).is_none() {
            return Err(ProtocolError::OutOfBounds {
                what: "SG entry start + len",
                value: self.start,
                limit: u64::MAX - u64::from(self.len),
            });
        }
        check_zero("SG entry reserved", self.reserved.into())
    }
}

/// A virtio object id (a 16-byte UUID): the backing of a DMABUF buffer plane, or a
/// buffer exported with `VIDIOC_EXPBUF`.
///
/// It does not fit V4L2's 4-byte fd placeholders, so it travels after its embedding
/// structure: after a `v4l2_buffer` and its planes (one id per plane in plane order, one
/// for a single-planar buffer) in both halves of the chain, and after a
/// `v4l2_exportbuffer`. The placeholder itself is left as the driver sent it.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct VirtioObjectId(pub [u8; 16]);

/// Every event starts with this (8 bytes).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct EventHeader {
    /// An `EVENT_*` code.
    pub event: u32,
    /// The session the event belongs to.
    pub session_id: u32,
}

impl Validate for EventHeader {
    fn validate(&self) -> Result<()> {
        match self.event {
            EVENT_ERROR | EVENT_DQBUF | EVENT_EVENT => Ok(()),
            v => Err(ProtocolError::Unknown {
                what: "virtio-media event",
                value: v.into(),
            }),
        }
    }
}

/// An error event: the session hit an unrecoverable error (16 bytes).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct ErrorEvent {
    /// Header (`EVENT_ERROR`).
    pub hdr: EventHeader,
    /// Positive errno.
    pub errno: u32,
    /// Reserved.
    pub reserved: u32,
}

impl ErrorEvent {
    /// An error event.
    pub const fn new(session_id: u32, errno: u32) -> Self {
        ErrorEvent {
            hdr: EventHeader {
                event: EVENT_ERROR,
                session_id,
            },
            errno,
            reserved: 0,
        }
    }
}

/// A dequeued-buffer event: the `struct v4l2_buffer` `VIDIOC_DQBUF` would have
/// returned, and its planes for multi-planar buffers (8 + 88 + 8 * 64 = 608 bytes).
///
/// The V4L2 structures are kept as bytes here; outboard-devices gives them types.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct DqbufEvent {
    /// Header (`EVENT_DQBUF`).
    pub hdr: EventHeader,
    /// `struct v4l2_buffer` (64-bit layout).
    pub buffer: [u8; V4L2_BUFFER_SIZE],
    /// `struct v4l2_plane[VIDEO_MAX_PLANES]`.
    pub planes: [[u8; V4L2_PLANE_SIZE]; VIDEO_MAX_PLANES],
}

/// A V4L2 event (`struct v4l2_event`) for a subscribed session (8 + 136 = 144 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct SessionEvent {
    /// Header (`EVENT_EVENT`).
    pub hdr: EventHeader,
    /// `struct v4l2_event` (64-bit layout).
    pub event: [u8; V4L2_EVENT_SIZE],
}
