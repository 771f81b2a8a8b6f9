//! `vsock_queue`: the virtio-vsock device (`outboard_devices::vsock::Vsock`, with its
//! real AF_UNIX muxer) fed a hostile driver's split rings in guest memory, through
//! `outboard_vmm_glue`'s rust-vmm queue adapters, as `outboard-tests`' `Guest` lays them out
//! (rx, tx and event queues; guest memory in two host mappings that are contiguous in
//! the guest).
//!
//! Input: byte 0 picks EVENT_IDX and SEQPACKET; then operations, one byte each:
//! - `0x00..=0x3f` raw write: offset u16 (bit 0 of `op`: second region), length u8,
//!   bytes (the used rings are skipped: they are the device's, and are checked);
//! - `0x40..=0x5f` descriptor `idx` of queue `op % 3`: addr u32, len u32, flags u16,
//!   next u16 (indirect tables are raw writes);
//! - `0x60..=0x7f` make head u16 available on queue `op % 3` (ring entry + index);
//! - `0x80..=0x8f` set queue `op % 3`'s available index to a raw u16;
//! - `0x90..=0x9f` a packet header at offset u16: the 44 header bytes from the input,
//!   with the CIDs made valid unless bit 0 of `op` is set;
//! - `0xa0..=0xaf` kick queue `op % 3`;
//! - `0xb0..=0xbf` the muxer's event (`handle_event`);
//! - `0xc0..=0xc7` a host client connects and sends `CONNECT <port>\n`;
//! - `0xc8..=0xcf` a host client writes bytes (index u8, length u8, bytes);
//! - `0xd0..=0xdf` a host listener at `<uds>_<port>` (port 1000 + `op % 4`);
//! - `0xe0..=0xff` device reset and re-activation.
//!
//! Asserts: nothing panics, faults or loops; every used entry names a head inside the
//! ring and a length no larger than the writable bytes of any chain that head ever
//! started when the device looked (so it never claims to have written more than the
//! driver offered); TX chains are returned with length 0; and after all that, a reset
//! device answers a healthy REQUEST to a port nobody listens on with a RST.
#![no_main]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use outboard_devices::virtio::{Interrupt, VirtioDevice, VIRTIO_RING_F_EVENT_IDX};
use outboard_devices::vsock::{Vsock, VsockDeviceConfig};
use outboard_fuzz::Input;
use outboard_protocol::vsock::VIRTIO_VSOCK_F_SEQPACKET;
use outboard_tests::{CountingInterrupt, DriverQueue};
use outboard_vmm_glue::rust_vmm::boxed_queues;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const REGION: u64 = 0x10000;
const GUEST_CID: u64 = 3;
const BASES: [u64; 3] = [0x0000, 0x0400, 0x0800];
const SIZES: [u16; 3] = [16, 16, 8];
/// Where the healthy check puts its buffers.
const CHECK_BUF: u64 = 0x1000;

fn uds_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("outboard-fuzz-vsock-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&d);
        d
    })
}

/// The driver's view of one queue: its layout and the available index it published.
struct Ring {
    base: u64,
    size: u16,
    avail_idx: u16,
    last_used: u16,
    /// The most writable bytes a chain starting at each head had when the device looked.
    cap: Vec<u64>,
}

impl Ring {
    fn new(q: usize) -> Ring {
        Ring {
            base: BASES[q],
            size: SIZES[q],
            avail_idx: 0,
            last_used: 0,
            cap: vec![0; usize::from(SIZES[q])],
        }
    }
    fn desc(&self) -> u64 {
        self.base
    }
    fn avail(&self) -> u64 {
        self.base + 16 * u64::from(self.size)
    }
    fn used(&self) -> u64 {
        (self.avail() + 6 + 2 * u64::from(self.size) + 3) & !3
    }
}

/// Writable bytes of the chain at `head` (an over-approximation for broken chains:
/// every writable descriptor visited within the bounds counts), read from `mem`, a copy
/// of all of guest memory. (The harness once read each field through `GuestMemory`:
/// that took 60% of every run, the device under test less than 10%.)
fn chain_cap(mem: &[u8], table: u64, size: u16, head: u16) -> u64 {
    let field = |at: u64, n: usize| -> u64 {
        let mut b = [0u8; 8];
        if let Some(src) = usize::try_from(at)
            .ok()
            .and_then(|at| mem.get(at..at.checked_add(n)?))
        {
            b[..n].copy_from_slice(src);
        }
        u64::from_le_bytes(b)
    };
    let read = |at: u64| -> (u64, u32, u16, u16) {
        (
            field(at, 8),
            field(at.wrapping_add(8), 4) as u32,
            field(at.wrapping_add(12), 2) as u16,
            field(at.wrapping_add(14), 2) as u16,
        )
    };
    let mut total = 0u64;
    let mut d = head;
    for _ in 0..size {
        let (addr, len, flags, next) = read(table + 16 * u64::from(d % size));
        if flags & 4 != 0 {
            // An indirect table: its descriptors (at most 256 looked at).
            let n = (len / 16).min(256);
            let mut i = 0u16;
            for _ in 0..n {
                let (_, l, f, nx) = read(addr.wrapping_add(16 * u64::from(i)));
                if f & 2 != 0 {
                    total += u64::from(l);
                }
                if f & 1 == 0 {
                    break;
                }
                i = nx;
            }
        } else if flags & 2 != 0 {
            total += u64::from(len);
        }
        if flags & 1 == 0 {
            break;
        }
        d = next;
    }
    total
}

struct Harness {
    mem: Arc<GuestMemoryMmap>,
    dev: Vsock,
    rings: [Ring; 3],
    clients: Vec<UnixStream>,
    listeners: Vec<(UnixListener, PathBuf)>,
    features: u64,
    uds: PathBuf,
    /// A copy of guest memory for `snapshot` (kept to reuse its allocation).
    copy: Vec<u8>,
}

impl Harness {
    /// Writes guest memory as the driver may: anywhere except the used rings, which
    /// belong to the device (the checks read them back).
    fn guest_write(&self, off: u64, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            let at = off + i as u64;
            let device_owned = self
                .rings
                .iter()
                .any(|r| at >= r.used() && at < r.used() + 6 + 8 * u64::from(r.size));
            if at < 2 * REGION && !device_owned {
                self.mem.write_obj(*b, GuestAddress(at)).unwrap();
            }
        }
    }

    fn activate(&mut self) {
        // A driver lays its rings out again before it sets DRIVER_OK: the used rings
        // start empty (what the chains offered before stays recorded). The device may
        // use buffers as soon as it is active (it did: a harness that emptied the used
        // rings afterwards lost those entries and took the next ones for 17 at once).
        for r in &mut self.rings {
            self.mem
                .write_slice(
                    &vec![0u8; 6 + 8 * usize::from(r.size)],
                    GuestAddress(r.used()),
                )
                .unwrap();
            r.avail_idx = 0;
            r.last_used = 0;
        }
        let queues = (0..3)
            .map(|q| {
                DriverQueue::new(BASES[q], SIZES[q])
                    .device_queue(&self.mem, self.features & VIRTIO_RING_F_EVENT_IDX != 0)
            })
            .collect();
        self.dev.ack_features(self.features);
        self.snapshot();
        self.dev
            .activate(
                boxed_queues(queues, &self.mem),
                Arc::new(CountingInterrupt::default()) as Arc<dyn Interrupt>,
            )
            .unwrap();
        self.check_used();
    }

    /// Records what each head offers now (the device may pop it during this call).
    fn snapshot(&mut self) {
        self.mem
            .read_slice(&mut self.copy, GuestAddress(0))
            .unwrap();
        for r in &mut self.rings {
            for h in 0..r.size {
                let c = chain_cap(&self.copy, r.desc(), r.size, h);
                let slot = &mut r.cap[usize::from(h)];
                *slot = (*slot).max(c);
            }
        }
    }

    /// Checks the used entries the device added since the last check.
    fn check_used(&mut self) {
        for (q, r) in self.rings.iter_mut().enumerate() {
            let idx: u16 = self.mem.read_obj(GuestAddress(r.used() + 2)).unwrap();
            let new = idx.wrapping_sub(r.last_used);
            assert!(
                new <= r.size,
                "queue {q}: {new} used entries at once in a ring of {}",
                r.size
            );
            for _ in 0..new {
                let at = r.used() + 4 + 8 * u64::from(r.last_used % r.size);
                let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
                let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
                assert!(id < u32::from(r.size), "queue {q}: used head {id}");
                if q == 1 {
                    assert_eq!(len, 0, "a TX chain came back with length {len}");
                }
                let cap = r.cap[id as usize];
                assert!(
                    u64::from(len) <= cap,
                    "queue {q}: head {id} used with {len} bytes, offered {cap}"
                );
                r.last_used = r.last_used.wrapping_add(1);
            }
        }
    }

    fn device(&mut self, f: impl FnOnce(&mut Vsock)) {
        self.snapshot();
        f(&mut self.dev);
        self.check_used();
    }
}

fn header(
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    op: u16,
    buf_alloc: u32,
) -> [u8; 44] {
    let mut h = [0u8; 44];
    h[0..8].copy_from_slice(&src_cid.to_le_bytes());
    h[8..16].copy_from_slice(&dst_cid.to_le_bytes());
    h[16..20].copy_from_slice(&src_port.to_le_bytes());
    h[20..24].copy_from_slice(&dst_port.to_le_bytes());
    h[28..30].copy_from_slice(&1u16.to_le_bytes()); // stream
    h[30..32].copy_from_slice(&op.to_le_bytes());
    h[36..40].copy_from_slice(&buf_alloc.to_le_bytes());
    h
}

fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let uds = uds_dir().join("v.sock");
    let _ = std::fs::remove_file(&uds);
    let _ = std::fs::remove_file(uds_dir().join("v.sock_seqpacket"));
    let mem = Arc::new(
        GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), REGION as usize),
            (GuestAddress(REGION), REGION as usize),
        ])
        .unwrap(),
    );
    let dev = Vsock::new(VsockDeviceConfig::new(GUEST_CID, &uds)).unwrap();
    let mut features = dev.features();
    if mode & 1 == 0 {
        features &= !VIRTIO_RING_F_EVENT_IDX;
    }
    if mode & 2 == 0 {
        features &= !VIRTIO_VSOCK_F_SEQPACKET;
    }
    let mut h = Harness {
        mem,
        dev,
        rings: [Ring::new(0), Ring::new(1), Ring::new(2)],
        clients: Vec::new(),
        listeners: Vec::new(),
        features,
        uds: uds.clone(),
        copy: vec![0; 2 * REGION as usize],
    };
    h.activate();
    while !input.is_empty() {
        let op = input.u8();
        match op {
            0x00..=0x3f => {
                let off = u64::from(input.u16()) + if op & 1 != 0 { REGION } else { 0 };
                let len = usize::from(input.u8());
                let bytes = input.bytes(len);
                h.guest_write(off, bytes);
            }
            0x40..=0x5f => {
                let r = &h.rings[usize::from(op % 3)];
                let idx = u64::from(input.u8() % r.size as u8);
                let at = GuestAddress(r.desc() + 16 * idx);
                h.mem.write_obj(u64::from(input.u32()), at).unwrap();
                h.mem
                    .write_obj(input.u32(), GuestAddress(at.0 + 8))
                    .unwrap();
                h.mem
                    .write_obj(input.u16(), GuestAddress(at.0 + 12))
                    .unwrap();
                h.mem
                    .write_obj(input.u16(), GuestAddress(at.0 + 14))
                    .unwrap();
            }
            0x60..=0x7f => {
                let r = &mut h.rings[usize::from(op % 3)];
                let head = input.u16();
                let slot = u64::from(r.avail_idx % r.size);
                h.mem
                    .write_obj(head, GuestAddress(r.avail() + 4 + 2 * slot))
                    .unwrap();
                r.avail_idx = r.avail_idx.wrapping_add(1);
                h.mem
                    .write_obj(r.avail_idx, GuestAddress(r.avail() + 2))
                    .unwrap();
            }
            0x80..=0x8f => {
                let r = &mut h.rings[usize::from(op % 3)];
                r.avail_idx = input.u16();
                h.mem
                    .write_obj(r.avail_idx, GuestAddress(r.avail() + 2))
                    .unwrap();
            }
            0x90..=0x9f => {
                let off = u64::from(input.u16()) % (2 * REGION - 44);
                let mut hdr: [u8; 44] = input.array();
                if op & 1 == 0 {
                    hdr[0..8].copy_from_slice(&GUEST_CID.to_le_bytes());
                    hdr[8..16].copy_from_slice(&2u64.to_le_bytes());
                }
                h.guest_write(off, &hdr);
            }
            0xa0..=0xaf => match op % 3 {
                0 => h.device(Vsock::handle_rx_kick),
                1 => h.device(Vsock::handle_tx_kick),
                _ => h.device(Vsock::handle_event_kick),
            },
            0xb0..=0xbf => h.device(|d| d.handle_event()),
            0xc0..=0xc7 => {
                let port = input.u16();
                if h.clients.len() < 4 {
                    if let Ok(mut c) = UnixStream::connect(&h.uds) {
                        c.set_nonblocking(true).unwrap();
                        let _ = write!(c, "CONNECT {port}\n");
                        h.clients.push(c);
                    }
                }
                h.device(|d| d.handle_event());
            }
            0xc8..=0xcf => {
                let i = usize::from(input.u8());
                let len = usize::from(input.u8());
                let bytes = input.bytes(len);
                if !h.clients.is_empty() {
                    let n = h.clients.len();
                    let _ = h.clients[i % n].write(bytes);
                }
                h.device(|d| d.handle_event());
            }
            0xd0..=0xdf => {
                let port = 1000 + u32::from(op % 4);
                let path = PathBuf::from(format!("{}_{port}", h.uds.display()));
                let _ = std::fs::remove_file(&path);
                if let Ok(l) = UnixListener::bind(&path) {
                    h.listeners.push((l, path));
                }
            }
            _ => {
                h.dev.reset();
                h.activate();
            }
        }
    }

    // Healthy: after a reset, a REQUEST to a port nobody listens on gets a RST.
    h.dev.reset();
    for r in &h.rings {
        h.mem
            .write_slice(&[0u8; 0x400], GuestAddress(r.base))
            .unwrap();
    }
    h.activate();
    let mut rx = DriverQueue::new(BASES[0], SIZES[0]);
    let mut tx = DriverQueue::new(BASES[1], SIZES[1]);
    rx.add(&h.mem, &[(CHECK_BUF, 44 + 256, true)]).unwrap();
    h.dev.handle_rx_kick();
    let req = header(GUEST_CID, 2, 5000, 59_999, 1, 4096);
    h.mem
        .write_slice(&req, GuestAddress(CHECK_BUF + 0x200))
        .unwrap();
    tx.add(&h.mem, &[(CHECK_BUF + 0x200, 44, false)]).unwrap();
    h.dev.handle_tx_kick();
    h.dev.handle_event();
    h.dev.handle_rx_kick();
    let (_, len) = rx.pop_used(&h.mem).expect("no answer to a healthy REQUEST");
    assert!(len >= 44);
    let op: u16 = h.mem.read_obj(GuestAddress(CHECK_BUF + 30)).unwrap();
    assert_eq!(
        op, 3,
        "a REQUEST to a closed port was answered with op {op}, not RST"
    );
    for (l, path) in h.listeners.drain(..) {
        drop(l);
        let _ = std::fs::remove_file(path);
    }
}

fuzz_target!(|data: &[u8]| run(data));
