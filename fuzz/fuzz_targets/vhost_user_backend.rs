//! `vhost_user_backend`: a hostile front-end's message stream against the real daemon
//! stack: `outboard_transport::BackendReqHandler` (non-blocking `poll_request`, as the
//! worker runs it) serving `outboard_vmm_glue`'s `DeviceBackend` with an echo device, over a
//! socket pair, with guest memory in a memfd.
//!
//! Input: a sequence of operations, each introduced by one byte `op`:
//! - `op < 0x80`: a message. `op & 7` fds of kind `(op >> 3) & 15` (see
//!   `outboard_fuzz::make_fd`; kind 1 is the guest memory memfd) ride on it; then a
//!   12-byte header (request, flags, size, little-endian, sent as is, so it may lie)
//!   and `min(size, 4096)` body bytes (fewer at the end of the input: a truncated
//!   message).
//! - `0x80..=0x9f`: a kick of ring `op & 1` (`DeviceBackend::handle_kick`).
//! - `0xa0..=0xbf`: a write into guest memory: offset u16, length u8, bytes (rings,
//!   descriptors, buffers).
//! - `0xc0..=0xcf`: the device's event (`handle_device_event`).
//! - otherwise: the front-end disconnects and reconnects (the daemon's
//!   `close_connection`: `disconnect`, then a new session on the same backend).
//!
//! Asserts: nothing panics or faults; every chain the device pops has regions the
//! device can read and write (first and last byte touched: a region outside the
//! mapping faults) and a used length no larger than the chain; a reply never exceeds
//! the protocol's bound; and after the hostile session the daemon serves a new
//! front-end: `GET_FEATURES` on a fresh connection is answered with the features the
//! device offers.
#![no_main]

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use outboard_devices::virtio::{
    ActivateError, DescChain, Interrupt, VirtQueue, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use outboard_fuzz::{drain, make_fd, send_raw, GuestFile, Input};
use outboard_vmm_glue::vhost_user::DeviceBackend;
use outboard_protocol::vhost_user::{Header, MAX_ATTACHED_FDS, MAX_MSG_SIZE};
use outboard_transport::{BackendReqHandler, Connection};
use vmm_sys_util::epoll::Epoll;
use zerocopy::{FromBytes, IntoBytes};

const MEM: usize = 0x10000;
const FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX;

/// Echoes each chain: reads its readable half, writes its writable half, and reports
/// the bytes written as the used length.
struct Echo {
    sizes: [u16; 2],
    queues: Vec<Box<dyn VirtQueue>>,
    irq: Option<Arc<dyn Interrupt>>,
}

fn touch(chain: &DescChain) {
    for r in &chain.readable {
        let mut b = [0u8; 1];
        r.read_at(0, &mut b);
        r.read_at(r.len().saturating_sub(1), &mut b);
    }
    for r in &chain.writable {
        r.write_at(0, &[0xee]);
        r.write_at(r.len().saturating_sub(1), &[0xee]);
    }
}

impl VirtioDevice for Echo {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn features(&self) -> u64 {
        FEATURES
    }
    fn ack_features(&mut self, _features: u64) {}
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = b"echo-cfg";
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| cfg.get(o))
                .copied()
                .unwrap_or(0);
        }
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &mut self,
        queues: Vec<Box<dyn VirtQueue>>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), ActivateError> {
        self.queues = queues;
        self.irq = Some(interrupt);
        Ok(())
    }
    fn reset(&mut self) {
        self.queues.clear();
        self.irq = None;
    }
    fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
    fn handle_queue(&mut self, queue: usize) {
        let mut chain = DescChain::default();
        let Some(q) = self.queues.get_mut(queue) else {
            return;
        };
        let mut used = false;
        // A bound of its own: a device must not trust the ring to end.
        for _ in 0..1024 {
            match q.pop(&mut chain) {
                Ok(true) => {}
                _ => break,
            }
            touch(&chain);
            let len = chain.writable_len().min(chain.readable_len());
            assert!(len <= chain.writable_len());
            if q.add_used(chain.head, len as u32).is_err() {
                break;
            }
            used = true;
        }
        if used {
            if let Some(irq) = &self.irq {
                irq.signal_used_queue(queue);
            }
        }
    }
    fn handle_event(&mut self) {}
}

type Handler = BackendReqHandler<DeviceBackend<Echo>>;

fn session(backend: DeviceBackend<Echo>) -> (Handler, UnixStream) {
    let (fe, be) = UnixStream::pair().unwrap();
    fe.set_nonblocking(true).unwrap();
    be.set_nonblocking(true).unwrap();
    (BackendReqHandler::new(Connection::new(be), backend), fe)
}

/// Checks that every reply in `bytes` is well framed and within the bound.
fn check_replies(bytes: &[u8]) {
    let mut rest = bytes;
    while rest.len() >= Header::SIZE {
        let h = Header::read_from_bytes(&rest[..Header::SIZE]).unwrap();
        assert!(h.size as usize <= MAX_MSG_SIZE, "reply of {} bytes", h.size);
        let end = Header::SIZE + h.size as usize;
        assert!(end <= rest.len(), "a reply was cut short");
        rest = &rest[end..];
    }
    assert!(rest.is_empty(), "{} stray reply bytes", rest.len());
}

/// Ends a session as the worker does, and returns the backend.
fn close(handler: Handler) -> DeviceBackend<Echo> {
    let mut backend = handler.into_backend();
    backend.disconnect();
    backend
}

fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let guest = GuestFile::new(MEM);
    let epoll = Arc::new(Epoll::new().unwrap());
    let device = Echo {
        sizes: [16, 16],
        queues: Vec::new(),
        irq: None,
    };
    let (mut handler, mut fe) = session(DeviceBackend::new(device, 256, epoll));
    let mut alive = true;
    while !input.is_empty() {
        let op = input.u8();
        match op {
            0..=0x7f => {
                if !alive {
                    continue;
                }
                let nfds = usize::from(op & 7).min(MAX_ATTACHED_FDS);
                let kind = (op >> 3) & 15;
                let fds: Vec<OwnedFd> =
                    (0..nfds).map(|_| make_fd(kind, guest.fd.as_fd())).collect();
                let header: [u8; Header::SIZE] = input.array();
                let size = u32::from_le_bytes(header[8..12].try_into().unwrap()) as usize;
                let body = input.bytes(size.min(MAX_MSG_SIZE));
                let mut msg = header.to_vec();
                msg.extend_from_slice(body);
                let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
                if !send_raw(&fe, &msg, &borrowed) {
                    continue;
                }
                drop(fds);
                // Handle everything the socket has, as the worker does on readiness.
                for _ in 0..4 {
                    match handler.poll_request() {
                        Ok(true) => {}
                        Ok(false) => break,
                        Err(e) => {
                            if e.is_fatal() || handler.peer_waiting() {
                                alive = false;
                            }
                            break;
                        }
                    }
                }
                check_replies(&drain(&fe));
            }
            0x80..=0x9f => {
                if alive {
                    handler.backend_mut().handle_kick(usize::from(op & 1));
                }
            }
            0xa0..=0xbf => {
                let off = usize::from(input.u16());
                let len = usize::from(input.u8());
                guest.write(off, input.bytes(len));
            }
            0xc0..=0xcf => {
                if alive {
                    handler.backend_mut().handle_device_event();
                }
            }
            _ => {
                let backend = close(handler);
                (handler, fe) = session(backend);
                alive = true;
            }
        }
        if handler.backend_mut().take_fatal().is_some() {
            alive = false;
        }
    }
    // A new front-end is served whatever the last one did.
    let backend = close(handler);
    let (mut handler, fe) = session(backend);
    let get_features = Header::request(1, 0, false);
    assert!(send_raw(&fe, get_features.as_bytes(), &[]));
    assert!(matches!(handler.poll_request(), Ok(true)));
    let reply = drain(&fe);
    assert_eq!(reply.len(), Header::SIZE + 8, "GET_FEATURES reply");
    let h = Header::read_from_bytes(&reply[..Header::SIZE]).unwrap();
    assert_eq!((h.request, h.size), (1, 8));
    let features = u64::from_le_bytes(reply[Header::SIZE..].try_into().unwrap());
    assert_eq!(features & FEATURES, FEATURES, "features {features:#x}");
    drop(close(handler));
}

fuzz_target!(|data: &[u8]| run(data));
