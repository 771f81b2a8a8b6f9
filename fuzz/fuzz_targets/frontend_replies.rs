//! `frontend_replies`: the front-end side against a hostile back-end, both channels.
//!
//! - The main socket: `outboard_transport::Frontend` makes a fuzzed sequence of calls
//!   (feature negotiation, GET_* requests, requests with REPLY_ACK, fd-carrying
//!   replies) while the fuzzed peer's reply stream is already in the socket.
//! - The back-end request channel: `FrontendReqHandler` is fed fuzzed back-end
//!   requests (with fds) and serves them with a handler that accepts everything.
//!
//! Input: byte 0 selects the protocol features the channel handler was given (bit
//! mask over a few), byte 1 the number `n` of front-end calls (`% 24`), then `n` call
//! bytes with their arguments, then a stream of records `[fd spec][12-byte header]
//! [body]` (fd spec: `& 7` fds of kind `>> 3`; body `min(size, 4096)` bytes) that go,
//! in order, to the main socket (the replies) and, after a record whose fd spec has
//! bit 7 set, to the back-end channel.
//!
//! Asserts: nothing panics and nothing blocks (the peer's end is shut down, so a
//! missing reply is an end of file); a successful GET_CONFIG returns exactly the bytes
//! asked for; the channel handler only ever sees bodies that pass their `Validate`
//! check; a channel error never leaves the handler serving a desynchronised stream
//! (after the first fatal error nothing more is handled).
#![no_main]

use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;
use outboard_fuzz::{eventfd, make_fd, send_raw, GuestFile, Input};
use outboard_protocol::vhost_user::{
    Header, TransferDirection, TransferPhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserIotlb, VhostUserMMap, VhostUserMemoryRegion, VhostUserProtocolFeatures,
    VhostUserShared, MAX_ATTACHED_FDS, MAX_MSG_SIZE,
};
use outboard_protocol::Validate;
use outboard_transport::{
    Connection, Frontend, FrontendReqHandler, HandlerResult, MemoryRegionRef,
    VhostUserFrontendReqHandler,
};

/// Accepts every back-end request, after checking it was validated.
struct Accept;

impl VhostUserFrontendReqHandler for Accept {
    fn config_change(&mut self) -> HandlerResult<()> {
        Ok(())
    }
    fn shmem_map(&mut self, map: &VhostUserMMap, _fd: OwnedFd) -> HandlerResult<()> {
        assert!(map.validate().is_ok(), "unvalidated SHMEM_MAP {map:?}");
        Ok(())
    }
    fn shmem_unmap(&mut self, map: &VhostUserMMap) -> HandlerResult<()> {
        assert!(map.validate().is_ok(), "unvalidated SHMEM_UNMAP {map:?}");
        Ok(())
    }
    fn shared_object_add(&mut self, uuid: &VhostUserShared) -> HandlerResult<()> {
        assert!(uuid.validate().is_ok());
        Ok(())
    }
    fn shared_object_remove(&mut self, uuid: &VhostUserShared) -> HandlerResult<()> {
        assert!(uuid.validate().is_ok());
        Ok(())
    }
    fn shared_object_lookup(&mut self, uuid: &VhostUserShared) -> HandlerResult<OwnedFd> {
        assert!(uuid.validate().is_ok());
        Ok(eventfd())
    }
    fn vring_call(&mut self, _index: u32) -> HandlerResult<()> {
        Ok(())
    }
    fn vring_err(&mut self, _index: u32) -> HandlerResult<()> {
        Ok(())
    }
    fn iotlb_msg(&mut self, msg: &VhostUserIotlb) -> HandlerResult<()> {
        assert!(msg.validate().is_ok(), "unvalidated IOTLB {msg:?}");
        Ok(())
    }
    fn vring_host_notifier(
        &mut self,
        _index: u8,
        _size: u64,
        _offset: u64,
        _fd: Option<OwnedFd>,
    ) -> HandlerResult<()> {
        Ok(())
    }
}

/// One front-end call, chosen by `op`, with arguments from `input`.
fn call(fe: &mut Frontend, op: u8, input: &mut Input<'_>, guest: &GuestFile, ev: BorrowedFd<'_>) {
    match op % 22 {
        0 => drop(fe.get_features()),
        1 => drop(fe.get_protocol_features()),
        2 => drop(
            fe.set_protocol_features(VhostUserProtocolFeatures::from_bits_truncate(input.u64())),
        ),
        3 => drop(fe.set_features(input.u64())),
        4 => drop(fe.get_queue_num()),
        5 => drop(fe.get_max_mem_slots()),
        6 => drop(fe.get_vring_base(u32::from(input.u8()))),
        7 => {
            let (offset, size) = (u32::from(input.u8()), u32::from(input.u8()));
            if let Ok(data) = fe.get_config(offset, size, VhostUserConfigFlags::Frontend) {
                assert_eq!(
                    data.len(),
                    size as usize,
                    "GET_CONFIG returned another size"
                );
            }
        }
        8 => drop(fe.set_owner()),
        9 => drop(fe.set_vring_num(u32::from(input.u8()), u32::from(input.u16()))),
        10 => drop(fe.get_status()),
        11 => drop(fe.set_status(input.u8())),
        12 => drop(fe.get_inflight_fd(&VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: u16::from(input.u8()),
            queue_size: input.u16(),
            padding: 0,
        })),
        13 => drop(fe.postcopy_advise()),
        14 => drop(fe.get_shared_object(&VhostUserShared {
            uuid: input.array(),
        })),
        15 => drop(fe.set_device_state_fd(
            if input.u8() & 1 == 0 {
                TransferDirection::Save
            } else {
                TransferDirection::Load
            },
            TransferPhase::Stopped,
            ev,
        )),
        16 => drop(fe.check_device_state()),
        17 => drop(fe.get_shmem_config()),
        18 => {
            let n = usize::from(input.u8() % 64);
            drop(fe.create_crypto_session(input.bytes(n)))
        }
        19 => drop(fe.add_mem_region(&MemoryRegionRef {
            region: VhostUserMemoryRegion::new(0, guest.len() as u64, 0x7f00_0000_0000, 0),
            fd: guest.fd.as_fd(),
        })),
        20 => drop(fe.set_vring_kick(input.u8() % 4, Some(ev))),
        _ => drop(fe.reset_device()),
    }
}

/// Sends the records of `input` on `sock` until a record whose fd spec has bit 7 set
/// (returns true then) or the end.
fn send_records(sock: &UnixStream, input: &mut Input<'_>, guest: &GuestFile) -> bool {
    while !input.is_empty() {
        let spec = input.u8();
        if spec & 0x80 != 0 {
            return true;
        }
        let nfds = usize::from(spec & 7).min(MAX_ATTACHED_FDS);
        let fds: Vec<OwnedFd> = (0..nfds)
            .map(|_| make_fd(spec >> 3, guest.fd.as_fd()))
            .collect();
        let header: [u8; Header::SIZE] = input.array();
        let size = u32::from_le_bytes(header[8..12].try_into().unwrap()) as usize;
        let mut msg = header.to_vec();
        msg.extend_from_slice(input.bytes(size.min(MAX_MSG_SIZE)));
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
        if !send_raw(sock, &msg, &borrowed) {
            return false;
        }
    }
    false
}

fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let guest = GuestFile::new(0x4000);
    let ev = eventfd();
    let mask = input.u8();
    let features = [
        VhostUserProtocolFeatures::REPLY_ACK,
        VhostUserProtocolFeatures::BACKEND_REQ,
        VhostUserProtocolFeatures::BACKEND_SEND_FD,
        VhostUserProtocolFeatures::SHMEM,
        VhostUserProtocolFeatures::SHARED_OBJECT,
        VhostUserProtocolFeatures::HOST_NOTIFIER,
        VhostUserProtocolFeatures::CONFIG,
        VhostUserProtocolFeatures::from_bits_truncate(1 << 63),
    ]
    .iter()
    .enumerate()
    .filter(|(i, _)| mask & (1 << i) != 0)
    .fold(VhostUserProtocolFeatures::empty(), |a, (_, f)| a | *f);
    let ncalls = input.u8() % 24;
    let mut calls = Vec::new();
    for _ in 0..ncalls {
        let op = input.u8();
        // Arguments are taken from a copy so that calls and replies stay separate.
        let args: [u8; 24] = input.array();
        calls.push((op, args));
    }

    // The main socket: replies first, then the calls.
    let (ours, peer) = UnixStream::pair().unwrap();
    let more = send_records(&peer, &mut input, &guest);
    peer.shutdown(Shutdown::Write).unwrap();
    let mut fe = Frontend::new(Connection::new(ours));
    for (op, args) in &calls {
        call(&mut fe, *op, &mut Input::new(args), &guest, ev.as_fd());
    }
    drop(fe);
    drop(peer);

    // The back-end request channel.
    if more {
        let (ours, peer) = UnixStream::pair().unwrap();
        peer.set_nonblocking(true).unwrap();
        send_records(&peer, &mut input, &guest);
        peer.shutdown(Shutdown::Write).unwrap();
        let mut handler =
            FrontendReqHandler::from_connection(Connection::new(ours), Accept, features);
        // Every message is at least a header: the loop ends by end of file.
        for _ in 0..=data.len() / Header::SIZE + 1 {
            match handler.handle_request() {
                Ok(()) => {}
                Err(e) if e.is_fatal() => break,
                Err(_) => {}
            }
        }
        // Replies go back on the channel; drain them so the peer side closes cleanly.
        let _ = outboard_fuzz::drain(&peer);
    }
}

fuzz_target!(|data: &[u8]| run(data));
