//! The virtio-media command-queue program shared by `media_commands` (the software
//! camera) and `media_proxy` (the V4L2 proxy over a real node), driven through a split
//! ring by `outboard-tests`' `MediaGuest` (the request in two readable descriptors, a
//! writable response buffer).
//!
//! Input: operations, one byte each:
//! - `0x00..=0x3f` a raw command: response room u16 (`% 4096`), length u16 (`% 1024`),
//!   bytes;
//! - `0x40..=0x9f` an IOCTL on the session of slot `op % 4` (or a raw id when bit 3 of
//!   `op` is set): ioctl number u8, response room u16, argument length u16 (`% 512`),
//!   argument bytes, with the first word made the device's capture buffer type when
//!   bit 2 of `op` is set;
//! - `0xa0..=0xaf` OPEN (the session goes to slot `op % 4`); `0xb0..=0xbf` CLOSE of a
//!   slot; `0xc0..=0xcf` MMAP (offset u32) / MUNMAP (address u64) by bit 0;
//! - `0xd0..=0xdf` a write into guest memory below 1 MiB (offset u32, length u8, bytes),
//!   for SG lists and user pointers;
//! - otherwise the device's event (frames, dequeue events).
//!
//! Asserts: every command is answered (the device returns the chain) with no more
//! bytes than the response buffer holds; every answer with room for a response header
//! except CLOSE's starts with one; nothing panics; and afterwards, once every session
//! it opened is closed (OPEN beyond the session cap is refused with ENFILE, as
//! documented), the device opens a new session and answers ENUM_FMT on it.

use outboard_devices::media::v4l2::V4l2Fmtdesc;
use outboard_devices::media::MediaDevice;
use outboard_devices::virtio::VirtioDevice;
use outboard_protocol::media::{
    CloseCmd, CmdHeader, IoctlCmd, MediaCmd, MmapCmd, MunmapCmd, OpenResp,
};
use outboard_protocol::v4l2::V4l2Ioctl;
use outboard_tests::media::MediaGuest;
use vm_memory::{Bytes, GuestAddress};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use crate::Input;

fn command<D: MediaDevice>(g: &mut MediaGuest<D>, req: &[u8], room: u32, close: bool) -> Vec<u8> {
    // `raw` asserts that the chain comes back and the length fits the room.
    let r = g.raw(req, room);
    if room >= 8 && !close {
        assert!(
            r.len() >= 8,
            "an answer of {} bytes has no response header",
            r.len()
        );
    }
    r
}

fn close_cmd(session_id: u32) -> Vec<u8> {
    let mut req = CmdHeader::new(MediaCmd::Close).as_bytes().to_vec();
    req.extend_from_slice(
        CloseCmd {
            session_id,
            reserved: 0,
        }
        .as_bytes(),
    );
    req
}

/// Runs the program in `data` (see the module doc) against the device in `g`, whose
/// capture buffer type is `buf_type`.
pub fn run<D: MediaDevice>(data: &[u8], mut g: MediaGuest<D>, buf_type: u32) {
    let mut input = Input::new(data);
    let mut sessions = [0u32; 4];
    // Every session the device opened, to close them before the healthy check (the
    // session cap answers OPEN with ENFILE, as documented, until then).
    let mut opened = Vec::new();
    let mut note_open = |req: &[u8], r: &[u8]| -> Option<u32> {
        let open = CmdHeader::new(MediaCmd::Open).cmd.to_le_bytes();
        let resp = OpenResp::read_from_prefix(r).ok()?.0;
        (req.get(..4) == Some(&open[..]) && resp.hdr.status == 0).then(|| {
            opened.push(resp.session_id);
            resp.session_id
        })
    };
    while !input.is_empty() {
        let op = input.u8();
        match op {
            0x00..=0x3f => {
                let room = u32::from(input.u16() % 4096);
                let len = usize::from(input.u16() % 1024);
                let req = input.bytes(len).to_vec();
                let close =
                    req.get(..4) == Some(&CmdHeader::new(MediaCmd::Close).cmd.to_le_bytes()[..]);
                let r = command(&mut g, &req, room, close);
                note_open(&req, &r);
            }
            0x40..=0x9f => {
                let session = if op & 8 != 0 {
                    input.u32()
                } else {
                    sessions[usize::from(op % 4)]
                };
                let code = u32::from(input.u8());
                let room = u32::from(input.u16());
                let len = usize::from(input.u16() % 512);
                let mut arg = input.bytes(len).to_vec();
                if op & 4 != 0 && arg.len() >= 4 {
                    arg[..4].copy_from_slice(&buf_type.to_le_bytes());
                }
                let mut req = CmdHeader::new(MediaCmd::Ioctl).as_bytes().to_vec();
                req.extend_from_slice(
                    IoctlCmd {
                        session_id: session,
                        code,
                    }
                    .as_bytes(),
                );
                req.extend_from_slice(&arg);
                command(&mut g, &req, room, false);
            }
            0xa0..=0xaf => {
                let req = CmdHeader::new(MediaCmd::Open);
                let r = command(&mut g, req.as_bytes(), 64, false);
                if let Some(id) = note_open(req.as_bytes(), &r) {
                    sessions[usize::from(op % 4)] = id;
                }
            }
            0xb0..=0xbf => {
                command(&mut g, &close_cmd(sessions[usize::from(op % 4)]), 16, true);
            }
            0xc0..=0xcf => {
                let session = sessions[usize::from(op % 4)];
                let req = if op & 1 == 0 {
                    let mut req = CmdHeader::new(MediaCmd::Mmap).as_bytes().to_vec();
                    req.extend_from_slice(
                        MmapCmd {
                            session_id: session,
                            flags: u32::from(input.u8() & 1),
                            offset: input.u32(),
                        }
                        .as_bytes(),
                    );
                    req
                } else {
                    let mut req = CmdHeader::new(MediaCmd::Munmap).as_bytes().to_vec();
                    req.extend_from_slice(
                        MunmapCmd {
                            driver_addr: input.u64(),
                        }
                        .as_bytes(),
                    );
                    req
                };
                command(&mut g, &req, 64, false);
            }
            0xd0..=0xdf => {
                let off = u64::from(input.u32() % (1 << 20));
                let len = usize::from(input.u8());
                let bytes = input.bytes(len).to_vec();
                g.mem.write_slice(&bytes, GuestAddress(off)).unwrap();
            }
            _ => g.dev.handle_event(),
        }
    }
    // Healthy: with every session closed, a new one opens and works.
    for id in opened {
        command(&mut g, &close_cmd(id), 16, true);
    }
    let r = command(&mut g, CmdHeader::new(MediaCmd::Open).as_bytes(), 64, false);
    let Ok(open) = OpenResp::read_from_bytes(&r) else {
        panic!("OPEN after the hostile commands answered {r:?}");
    };
    assert_eq!(open.hdr.status, 0, "OPEN after the hostile commands failed");
    let s = open.session_id;
    let mut fmt = V4l2Fmtdesc::new_zeroed();
    fmt.type_ = buf_type;
    let got: Result<V4l2Fmtdesc, u32> = g.ioctl(s, V4l2Ioctl::VIDIOC_ENUM_FMT, &fmt);
    assert!(got.is_ok(), "ENUM_FMT after the hostile commands: {got:?}");
    g.close(s);
}
