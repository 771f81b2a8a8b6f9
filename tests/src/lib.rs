//! Cross-crate integration tests for Outboard (see `tests/tests/`).
//!
//! This library is the simulated guest driver the vsock tests and benchmark use: guest
//! memory from `vm-memory` (two memfd-backed regions mapped at file offsets, the way a
//! vhost-user back-end receives them), split virtqueues laid out in it the way a driver
//! lays them out (descriptor table, available ring with `used_event`, used ring with
//! `avail_event`), kicks that honour EVENT_IDX, and a small model of the Linux
//! virtio-vsock driver (connections, credit, RST/SHUTDOWN handling) on top. The device
//! under test sees the queues through `outboard-vmm-glue`'s rust-vmm adapters.
#![deny(missing_docs)]
// A test harness: a panic is how it reports a broken device or a broken test setup.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::num::Wrapping;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use outboard_devices::virtio::{Interrupt, VirtioDevice, VIRTIO_RING_F_EVENT_IDX};
use outboard_devices::vsock::{Vsock, VsockDeviceConfig};
use outboard_protocol::vsock::{
    SeqpacketFlags, ShutdownFlags, VsockHeader, VsockOp, VsockType, VIRTIO_VSOCK_F_SEQPACKET,
    VMADDR_CID_HOST,
};
use outboard_vmm_glue::rust_vmm::boxed_queues;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use zerocopy::{FromBytes, IntoBytes};

pub mod media;

/// Guest memory as the device sees it.
pub type Mem = Arc<GuestMemoryMmap>;

/// Size of each of the two guest memory regions.
const REGION_SIZE: usize = 48 << 20;
/// Guest address where the second memory region starts (the regions are contiguous in
/// the guest, but not in the host's address space).
pub const REGION_BOUNDARY: u64 = REGION_SIZE as u64;
/// Queue size the driver uses.
pub const QSIZE: u16 = 256;
const RX_BASE: u64 = 0x1000;
const TX_BASE: u64 = 0x2_0000;
const EV_BASE: u64 = 0x4_0000;
const RAW_AREA: u64 = 0x10_0000;
const RAW_AREA_SIZE: u64 = 0x10_0000;
const EV_BUFS: u64 = 0x20_0000;
const TX_SLOTS: u64 = 0x30_0000;
/// Each TX slot: header plus 64 KiB.
const TX_SLOT_SIZE: u64 = 44 + 64 * 1024;
const TX_SLOT_COUNT: u64 = 200;
/// RX buffers start here; they straddle the boundary between the two memory regions.
const RX_BUFS: u64 = REGION_SIZE as u64 - 8 * 1024 * 1024;

/// The guest's CID in every test.
pub const GUEST_CID: u64 = 3;

/// Creates the two memfd-backed guest memory regions, mapped at non-zero file offsets.
pub fn guest_memory() -> Mem {
    // SAFETY: memfd_create with a valid C string; the result is checked.
    let fd = unsafe { libc::memfd_create(c"outboard-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(2 * REGION_SIZE as u64 + 2 * 4096).unwrap();
    let file = Arc::new(file);
    let ranges = [
        (
            GuestAddress(0),
            REGION_SIZE,
            Some(FileOffset::from_arc(file.clone(), 4096)),
        ),
        (
            GuestAddress(REGION_SIZE as u64),
            REGION_SIZE,
            Some(FileOffset::from_arc(file, REGION_SIZE as u64 + 8192)),
        ),
    ];
    Arc::new(GuestMemoryMmap::from_ranges_with_files(ranges.iter()).unwrap())
}

/// A split virtqueue from the driver's side.
#[derive(Debug)]
pub struct DriverQueue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    free: Vec<u16>,
    avail_idx: Wrapping<u16>,
    kicked_at: Wrapping<u16>,
    last_used: Wrapping<u16>,
    event_idx: std::cell::Cell<bool>,
}

impl DriverQueue {
    /// Lays out a queue of `size` entries at `base`.
    pub fn new(base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        DriverQueue {
            size,
            desc,
            avail,
            used,
            free: (0..size).rev().collect(),
            avail_idx: Wrapping(0),
            kicked_at: Wrapping(0),
            last_used: Wrapping(0),
            event_idx: std::cell::Cell::new(true),
        }
    }

    /// The device-side `Queue` for this layout, with EVENT_IDX as negotiated (the
    /// driver side follows the same choice).
    pub fn device_queue(&self, mem: &GuestMemoryMmap, event_idx: bool) -> Queue {
        self.event_idx.set(event_idx);
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_event_idx(event_idx);
        q.set_ready(true);
        assert!(q.is_valid(mem));
        q
    }

    /// The device-side `Queue` of a device that takes this ring over from another:
    /// [`DriverQueue::device_queue`], resuming at the ring's own used index (what the
    /// old device had completed; it held no chain when it handed over).
    pub fn resumed_device_queue(&self, mem: &GuestMemoryMmap, event_idx: bool) -> Queue {
        let mut q = self.device_queue(mem, event_idx);
        let used_idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        q.set_next_avail(used_idx);
        q.set_next_used(used_idx);
        q
    }

    /// Free descriptors.
    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    /// Makes a chain of `(addr, len, device_writable)` buffers available; `None` when
    /// descriptors run out.
    pub fn add(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> Option<u16> {
        if bufs.is_empty() || bufs.len() > self.free.len() {
            return None;
        }
        let ids: Vec<u16> = (0..bufs.len()).filter_map(|_| self.free.pop()).collect();
        for (i, (&(addr, len, write), &id)) in bufs.iter().zip(&ids).enumerate() {
            let mut flags = 0u16;
            let mut next = 0u16;
            if i + 1 < ids.len() {
                flags |= 1;
                next = ids[i + 1];
            }
            if write {
                flags |= 2;
            }
            let at = GuestAddress(self.desc + 16 * u64::from(id));
            mem.write_obj(addr, at).unwrap();
            mem.write_obj(len, at.unchecked_add(8)).unwrap();
            mem.write_obj(flags, at.unchecked_add(12)).unwrap();
            mem.write_obj(next, at.unchecked_add(14)).unwrap();
        }
        let slot = u64::from(self.avail_idx.0 % self.size);
        mem.write_obj(ids[0], GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx += 1;
        mem.store(
            self.avail_idx.0,
            GuestAddress(self.avail + 2),
            Ordering::Release,
        )
        .unwrap();
        Some(ids[0])
    }

    /// Whether the device asked to be kicked for the buffers added since the last kick
    /// (`vring_need_event` on `avail_event` with EVENT_IDX, else the used ring's
    /// NO_NOTIFY flag); records the kick.
    pub fn needs_kick(&mut self, mem: &GuestMemoryMmap) -> bool {
        std::sync::atomic::fence(Ordering::SeqCst);
        if !self.event_idx.get() {
            let flags: u16 = mem
                .load(GuestAddress(self.used), Ordering::Acquire)
                .unwrap();
            self.kicked_at = self.avail_idx;
            return flags & 1 == 0;
        }
        let event: u16 = mem
            .load(
                GuestAddress(self.used + 4 + 8 * u64::from(self.size)),
                Ordering::Acquire,
            )
            .unwrap();
        let new = self.avail_idx;
        let old = self.kicked_at;
        self.kicked_at = new;
        (new - Wrapping(event) - Wrapping(1)) < (new - old)
    }

    /// Takes the next used entry `(head, len)` and frees its descriptors.
    pub fn pop_used(&mut self, mem: &GuestMemoryMmap) -> Option<(u16, u32)> {
        let idx: u16 = mem
            .load(GuestAddress(self.used + 2), Ordering::Acquire)
            .unwrap();
        if idx == self.last_used.0 {
            return None;
        }
        let slot = u64::from(self.last_used.0 % self.size);
        let at = GuestAddress(self.used + 4 + 8 * slot);
        let id: u32 = mem.read_obj(at).unwrap();
        let len: u32 = mem.read_obj(at.unchecked_add(4)).unwrap();
        self.last_used += 1;
        // used_event: interrupt me on the next used entry.
        mem.store(
            self.last_used.0,
            GuestAddress(self.avail + 4 + 2 * u64::from(self.size)),
            Ordering::Release,
        )
        .unwrap();
        let head = u16::try_from(id).expect("device returned a head beyond u16");
        assert!(head < self.size, "device returned head {head}");
        let mut d = head;
        for _ in 0..self.size {
            self.free.push(d);
            let at = GuestAddress(self.desc + 16 * u64::from(d));
            let flags: u16 = mem.read_obj(at.unchecked_add(12)).unwrap();
            if flags & 1 == 0 {
                break;
            }
            d = mem.read_obj(at.unchecked_add(14)).unwrap();
        }
        Some((head, len))
    }
}

/// Counts interrupts per queue.
#[derive(Debug, Default)]
pub struct CountingInterrupt {
    /// Interrupts of queues 0, 1, 2.
    pub queues: [AtomicU64; 3],
}

impl Interrupt for CountingInterrupt {
    fn signal_used_queue(&self, queue: usize) {
        if let Some(c) = self.queues.get(queue) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn signal_config_change(&self) {}
}

/// A deterministic byte stream: byte `pos` of stream `seed`. Any lost, duplicated or
/// reordered run of bytes (other than whole multiples of the ~1 MiB period) shows up as
/// a mismatch.
pub struct Pattern {
    table: Vec<u8>,
}

const PATTERN_PERIOD: usize = 1_048_573;
const PATTERN_CHUNK: usize = 128 * 1024;

impl Pattern {
    /// The shared pattern table.
    pub fn get() -> &'static Pattern {
        static P: OnceLock<Pattern> = OnceLock::new();
        P.get_or_init(|| {
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            let mut table = Vec::with_capacity(PATTERN_PERIOD + PATTERN_CHUNK);
            while table.len() < PATTERN_PERIOD + PATTERN_CHUNK {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                table.extend_from_slice(&x.to_le_bytes());
            }
            table.truncate(PATTERN_PERIOD + PATTERN_CHUNK);
            let (head, tail) = table.split_at_mut(PATTERN_PERIOD);
            tail.copy_from_slice(&head[..PATTERN_CHUNK]);
            Pattern { table }
        })
    }

    /// Up to 128 KiB of stream `seed` from `pos`.
    pub fn chunk(&self, seed: u64, pos: u64, len: usize) -> &[u8] {
        let start = ((pos + seed * 7919) % PATTERN_PERIOD as u64) as usize;
        &self.table[start..start + len.min(PATTERN_CHUNK)]
    }

    /// Fills `out` with stream `seed` from `pos`.
    pub fn fill(&self, seed: u64, pos: u64, out: &mut [u8]) {
        let mut done = 0;
        while done < out.len() {
            let c = self.chunk(seed, pos + done as u64, out.len() - done);
            out[done..done + c.len()].copy_from_slice(c);
            done += c.len();
        }
    }

    /// Whether `data` equals stream `seed` from `pos`.
    pub fn check(&self, seed: u64, pos: u64, data: &[u8]) -> bool {
        let mut done = 0;
        while done < data.len() {
            let c = self.chunk(seed, pos + done as u64, data.len() - done);
            if data[done..done + c.len()] != *c {
                return false;
            }
            done += c.len();
        }
        true
    }
}

/// What the guest does with received data.
#[derive(Debug)]
pub enum Sink {
    /// Keep it (for assertions); seqpacket messages are split at EOM.
    Keep,
    /// Check it against [`Pattern`] stream `seed` and count it.
    Verify {
        /// Stream id.
        seed: u64,
    },
}

/// Guest-side connection state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestState {
    /// REQUEST sent.
    Connecting,
    /// RESPONSE received or sent.
    Established,
    /// RST received.
    Reset,
    /// The guest sent RST (closed).
    Closed,
}

/// A guest socket.
#[derive(Debug)]
pub struct GuestConn {
    /// Socket type.
    pub ty: VsockType,
    /// State.
    pub state: GuestState,
    /// The device's credit fields.
    pub peer_buf_alloc: u32,
    /// The device's `fwd_cnt`.
    pub peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent.
    pub tx_cnt: Wrapping<u32>,
    /// Bytes received.
    pub rx_cnt: Wrapping<u32>,
    /// Bytes consumed by the application.
    pub fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` last announced.
    pub last_fwd_sent: Wrapping<u32>,
    /// This socket's receive buffer.
    pub buf_alloc: u32,
    /// The CID at the other end (the host, or a sibling VM).
    pub peer_cid: u64,
    /// Most bytes this socket keeps sent but not yet forwarded by the device, whatever
    /// credit the device gives (Linux caps it at its own socket buffer).
    pub tx_window: u32,
    /// CREDIT_UPDATE packets received.
    pub credit_updates: u64,
    /// Consume data as it arrives (else [`Guest::consume`]).
    pub auto_consume: bool,
    /// Received bytes (Keep sink).
    pub data: Vec<u8>,
    /// Completed seqpacket messages with their last packet's flags (Keep sink).
    pub messages: Vec<(Vec<u8>, u32)>,
    /// Where data goes.
    pub sink: Sink,
    /// Payload bytes received in total.
    pub received: u64,
    /// SHUTDOWN flags received.
    pub peer_shutdown: u32,
    /// Times the device sent beyond this socket's credit.
    pub overruns: u64,
    /// Pattern mismatches (Verify sink).
    pub corrupt: u64,
}

impl GuestConn {
    fn new(ty: VsockType, state: GuestState, buf_alloc: u32) -> Self {
        GuestConn {
            ty,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_sent: Wrapping(0),
            buf_alloc,
            peer_cid: VMADDR_CID_HOST,
            tx_window: u32::MAX,
            credit_updates: 0,
            auto_consume: true,
            data: Vec::new(),
            messages: Vec::new(),
            sink: Sink::Keep,
            received: 0,
            peer_shutdown: 0,
            overruns: 0,
            corrupt: 0,
        }
    }

    /// Bytes the guest may still send: the device's credit, within [`Self::tx_window`].
    pub fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .min(self.tx_window)
            .saturating_sub((self.tx_cnt - self.peer_fwd_cnt).0)
    }
}

/// Guest driver options.
#[derive(Debug, Clone)]
pub struct GuestOptions {
    /// The guest's CID.
    pub guest_cid: u64,
    /// Payload room of each RX buffer.
    pub rx_buf_payload: u32,
    /// Negotiate EVENT_IDX.
    pub event_idx: bool,
    /// Negotiate SEQPACKET.
    pub seqpacket: bool,
    /// Receive buffer (`buf_alloc`) of guest sockets.
    pub buf_alloc: u32,
    /// [`GuestConn::tx_window`] of guest sockets (`u32::MAX`: the device's credit only,
    /// like Linux before 2025; `buf_alloc`: like Linux since it caps TX credit).
    pub tx_window: u32,
    /// TX buffer size of the device.
    pub tx_buf_size: u32,
    /// The device's connection cap.
    pub max_connections: usize,
    /// Post two unusable RX buffers (10 writable bytes; read-only) before the others.
    pub bad_rx_buffers: bool,
    /// Split each RX buffer into two descriptors, the first only 20 bytes (the header
    /// then straddles them).
    pub rx_split: bool,
    /// Forward host-side connections over the host's AF_VSOCK instead of the AF_UNIX
    /// muxer at the guest's `uds_path` (`outboard vsock --forward-cid`).
    pub forward: Option<outboard_devices::vsock::VsockForward>,
}

impl Default for GuestOptions {
    fn default() -> Self {
        GuestOptions {
            guest_cid: GUEST_CID,
            rx_buf_payload: 4096,
            event_idx: true,
            seqpacket: true,
            buf_alloc: 256 * 1024,
            tx_window: u32::MAX,
            tx_buf_size: 256 * 1024,
            max_connections: outboard_devices::vsock::MAX_CONNECTIONS,
            bad_rx_buffers: false,
            rx_split: false,
            forward: None,
        }
    }
}

/// `(guest_port, host_port)`.
pub type Key = (u32, u32);

/// The simulated guest with its vsock driver, and the device under test.
pub struct Guest {
    /// Guest memory.
    pub mem: Mem,
    /// The device.
    pub dev: Vsock,
    /// Interrupt counters.
    pub irq: Arc<CountingInterrupt>,
    rx: DriverQueue,
    tx: DriverQueue,
    ev: DriverQueue,
    rx_bufs: HashMap<u16, u64>,
    free_rx_bufs: Vec<u64>,
    rx_payload: u32,
    tx_free_slots: Vec<u64>,
    tx_inflight: HashMap<u16, Option<u64>>,
    /// Guest sockets.
    pub conns: HashMap<Key, GuestConn>,
    listening: HashMap<u32, Option<u64>>,
    next_port: u32,
    /// Transport events received.
    pub events: Vec<u32>,
    /// RSTs received for unknown connections, with their ports `(guest, host)`.
    pub stray_rsts: Vec<Key>,
    /// The source CIDs of [`Guest::stray_rsts`], in the same order.
    pub stray_rst_cids: Vec<u64>,
    /// Packets with a wrong CID or a malformed header.
    pub bad_packets: u64,
    /// Simulates a stuck guest: REQUESTs and SHUTDOWNs get no answer.
    pub silent: bool,
    opts: GuestOptions,
    tx_kicks_needed: bool,
    /// Kicks the driver made (rx, tx, event).
    pub kicks: [u64; 3],
    /// The muxer's socket path.
    pub uds_path: PathBuf,
    /// CPU time the device's `handle_*` calls took (thread CPU time).
    pub device_cpu: Duration,
    /// System calls the device's `handle_*` calls made, once
    /// [`Guest::count_syscalls`] succeeded.
    pub device_syscalls: u64,
    syscalls: Option<SyscallCounter>,
    /// Used lengths of the unusable RX buffers the device returned.
    pub bad_rx_returned: Vec<u32>,
}

/// Counts the system calls of the calling thread: the kernel's
/// `raw_syscalls:sys_enter` tracepoint as a perf counter.
pub struct SyscallCounter(perf_event_open::count::Counter);

impl std::fmt::Debug for SyscallCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SyscallCounter")
    }
}

impl SyscallCounter {
    /// A running counter, or why the kernel does not allow one (no tracefs, no
    /// permission for tracepoint events).
    pub fn new() -> Result<SyscallCounter, String> {
        use perf_event_open::config::{Cpu, Opts, Proc};
        use perf_event_open::event::tp::Tracepoint;
        let path = "/sys/kernel/tracing/events/raw_syscalls/sys_enter/id";
        let id = std::fs::read_to_string(path)
            .map_err(|e| format!("{path}: {e}"))?
            .trim()
            .parse::<u64>()
            .map_err(|e| format!("{path}: {e}"))?;
        let counter = perf_event_open::count::Counter::new(
            Tracepoint { id },
            (Proc::CURRENT, Cpu::ALL),
            Opts::default(),
        )
        .map_err(|e| format!("perf_event_open(raw_syscalls:sys_enter): {e}"))?;
        counter
            .enable()
            .map_err(|e| format!("enabling the syscall counter: {e}"))?;
        Ok(SyscallCounter(counter))
    }

    /// System calls so far, this read's own included.
    pub fn count(&self) -> u64 {
        self.0.stat().map_or(0, |s| s.count)
    }
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

impl Guest {
    /// Creates guest memory, the device (muxer at `uds_path`), negotiates features,
    /// lays out the queues, posts RX and event buffers and activates the device.
    pub fn new(uds_path: &Path, opts: GuestOptions) -> Guest {
        let mem = guest_memory();
        let mut cfg = match &opts.forward {
            Some(f) => VsockDeviceConfig::with_backend(
                opts.guest_cid,
                outboard_devices::vsock::VsockBackend::Vsock(f.clone()),
            ),
            None => VsockDeviceConfig::new(opts.guest_cid, uds_path),
        };
        cfg.tx_buf_size = opts.tx_buf_size;
        cfg.max_connections = opts.max_connections;
        let mut dev = Vsock::new(cfg).unwrap();
        let mut features = dev.features();
        if !opts.event_idx {
            features &= !VIRTIO_RING_F_EVENT_IDX;
        }
        if !opts.seqpacket {
            features &= !VIRTIO_VSOCK_F_SEQPACKET;
        }
        dev.ack_features(features);
        let rx = DriverQueue::new(RX_BASE, QSIZE);
        let tx = DriverQueue::new(TX_BASE, QSIZE);
        let ev = DriverQueue::new(EV_BASE, 8);
        let queues = vec![
            rx.device_queue(&mem, opts.event_idx),
            tx.device_queue(&mem, opts.event_idx),
            ev.device_queue(&mem, opts.event_idx),
        ];
        let irq = Arc::new(CountingInterrupt::default());
        let rx_stride = u64::from(44 + opts.rx_buf_payload);
        let free_rx_bufs = (0..u64::from(QSIZE))
            .map(|i| RX_BUFS + i * rx_stride)
            .collect();
        let mut g = Guest {
            mem: mem.clone(),
            dev,
            irq: irq.clone(),
            rx,
            tx,
            ev,
            rx_bufs: HashMap::new(),
            free_rx_bufs,
            rx_payload: opts.rx_buf_payload,
            tx_free_slots: (0..TX_SLOT_COUNT)
                .map(|i| TX_SLOTS + i * TX_SLOT_SIZE)
                .collect(),
            tx_inflight: HashMap::new(),
            conns: HashMap::new(),
            listening: HashMap::new(),
            next_port: 10_000,
            events: Vec::new(),
            stray_rsts: Vec::new(),
            stray_rst_cids: Vec::new(),
            bad_packets: 0,
            silent: false,
            opts,
            tx_kicks_needed: false,
            kicks: [0; 3],
            uds_path: uds_path.to_path_buf(),
            device_cpu: Duration::ZERO,
            device_syscalls: 0,
            syscalls: None,
            bad_rx_returned: Vec::new(),
        };
        if g.opts.bad_rx_buffers {
            let at = RAW_AREA + RAW_AREA_SIZE - 4096;
            for bufs in [[(at, 10, true)], [(at + 1024, 100, false)]] {
                let head = g.rx.add(&g.mem, &bufs).unwrap();
                g.rx_bufs.insert(head, u64::MAX);
            }
        }
        g.post_rx_buffers();
        for i in 0..8u64 {
            g.ev.add(&g.mem, &[(EV_BUFS + 16 * i, 4, true)]).unwrap();
        }
        g.dev
            .activate(boxed_queues(queues, &mem), irq as Arc<dyn Interrupt>)
            .unwrap();
        g
    }

    /// Hands the device over to a new one, as a live upgrade does between processes:
    /// [`Vsock::handover`] on the old device, [`Vsock::take_over`] with the same
    /// configuration, the features acked again and the rings resumed where the used
    /// rings say. The old device is dropped without a reset. Returns the record's size.
    pub fn hand_over(&mut self) -> Result<usize, outboard_devices::vsock::VsockError> {
        let h = self.dev.handover()?;
        let len = h.record.len();
        let mut cfg = match &self.opts.forward {
            Some(f) => VsockDeviceConfig::with_backend(
                self.opts.guest_cid,
                outboard_devices::vsock::VsockBackend::Vsock(f.clone()),
            ),
            None => VsockDeviceConfig::new(self.opts.guest_cid, &self.uds_path),
        };
        cfg.tx_buf_size = self.opts.tx_buf_size;
        cfg.max_connections = self.opts.max_connections;
        let mut dev = Vsock::take_over(cfg, h)?;
        dev.ack_features(self.dev.acked_features());
        let ev = self.opts.event_idx;
        let queues = vec![
            self.rx.resumed_device_queue(&self.mem, ev),
            self.tx.resumed_device_queue(&self.mem, ev),
            self.ev.resumed_device_queue(&self.mem, ev),
        ];
        dev.activate(
            boxed_queues(queues, &self.mem),
            self.irq.clone() as Arc<dyn Interrupt>,
        )
        .expect("activating the device that took over");
        let old = std::mem::replace(&mut self.dev, dev);
        drop(old);
        Ok(len)
    }

    /// Calls into the device, accounting its CPU time in [`Guest::device_cpu`] (and its
    /// system calls in [`Guest::device_syscalls`] once counting).
    pub fn device<R>(&mut self, f: impl FnOnce(&mut Vsock) -> R) -> R {
        let t = thread_cpu();
        let before = self.syscalls.as_ref().map(SyscallCounter::count);
        let r = f(&mut self.dev);
        if let (Some(c), Some(before)) = (&self.syscalls, before) {
            // The second read counts itself.
            self.device_syscalls += c.count().saturating_sub(before + 1);
        }
        self.device_cpu += thread_cpu().saturating_sub(t);
        r
    }

    /// Counts the device's system calls from now on, in [`Guest::device_syscalls`]
    /// (this thread's, so drive the device from this thread); why not when the kernel
    /// does not allow it.
    pub fn count_syscalls(&mut self) -> Result<(), String> {
        self.syscalls = Some(SyscallCounter::new()?);
        Ok(())
    }

    /// Options in use.
    pub fn options(&self) -> &GuestOptions {
        &self.opts
    }

    fn post_rx_buffers(&mut self) {
        let mut added = false;
        while let Some(addr) = self.free_rx_bufs.pop() {
            match self
                .rx
                .add(&self.mem, &[(addr, 44 + self.rx_payload, true)])
            {
                Some(head) => {
                    self.rx_bufs.insert(head, addr);
                    added = true;
                }
                None => {
                    self.free_rx_bufs.push(addr);
                    break;
                }
            }
        }
        if added && self.rx.needs_kick(&self.mem) {
            self.kicks[0] += 1;
            self.device(Vsock::handle_rx_kick);
        }
    }

    /// A hostile driver: moves the available index of queue `queue` (0 rx, 1 tx,
    /// 2 event) `by` entries ahead of what it made available, whatever the ring holds
    /// there. Returns the queue's size.
    pub fn skip_avail_idx(&mut self, queue: usize, by: u16) -> u16 {
        let q = match queue {
            0 => &self.rx,
            1 => &self.tx,
            _ => &self.ev,
        };
        let idx = q.avail_idx + Wrapping(by);
        self.mem
            .write_obj(idx.0, GuestAddress(q.avail + 2))
            .expect("the avail ring is in guest memory");
        q.size
    }

    /// Kicks the TX queue if buffers were added and the device wants a kick.
    pub fn kick_tx(&mut self) {
        if self.tx_kicks_needed && self.tx.needs_kick(&self.mem) {
            self.kicks[1] += 1;
            self.device(Vsock::handle_tx_kick);
        }
        self.tx_kicks_needed = false;
        self.reclaim_tx();
    }

    fn reclaim_tx(&mut self) {
        while let Some((head, _)) = self.tx.pop_used(&self.mem) {
            if let Some(Some(slot)) = self.tx_inflight.remove(&head) {
                self.tx_free_slots.push(slot);
            }
        }
    }

    /// Free TX slots (packets that can be queued now).
    pub fn tx_slots_free(&self) -> usize {
        self.tx_free_slots.len().min(self.tx.free_count() / 2)
    }

    fn header(&self, key: Key, ty: VsockType, op: VsockOp, len: u32, flags: u32) -> VsockHeader {
        let cid = self.conns.get(&key).map_or(VMADDR_CID_HOST, |c| c.peer_cid);
        self.header_to(cid, key, ty, op, len, flags)
    }

    fn header_to(
        &self,
        cid: u64,
        key: Key,
        ty: VsockType,
        op: VsockOp,
        len: u32,
        flags: u32,
    ) -> VsockHeader {
        let (buf_alloc, fwd_cnt) = self
            .conns
            .get(&key)
            .map_or((self.opts.buf_alloc, 0), |c| (c.buf_alloc, c.fwd_cnt.0));
        VsockHeader {
            src_cid: self.opts.guest_cid,
            dst_cid: cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            type_: ty as u16,
            op: op as u16,
            flags,
            buf_alloc,
            fwd_cnt,
        }
    }

    /// Queues one packet (header and payload in one descriptor, like Linux) without
    /// kicking. Returns false when no TX slot is free.
    pub fn queue_packet(&mut self, hdr: &VsockHeader, payload: &[u8]) -> bool {
        assert!(payload.len() <= 64 * 1024);
        let Some(slot) = self.tx_free_slots.pop() else {
            return false;
        };
        self.mem
            .write_slice(hdr.as_bytes(), GuestAddress(slot))
            .unwrap();
        self.mem
            .write_slice(payload, GuestAddress(slot + 44))
            .unwrap();
        let len = 44 + payload.len() as u32;
        let Some(head) = self.tx.add(&self.mem, &[(slot, len, false)]) else {
            self.tx_free_slots.push(slot);
            return false;
        };
        self.tx_inflight.insert(head, Some(slot));
        self.tx_kicks_needed = true;
        if let Some(c) = self.conns.get_mut(&(hdr.src_port, hdr.dst_port)) {
            c.last_fwd_sent = Wrapping(hdr.fwd_cnt);
            if hdr.op == VsockOp::Rw as u16 {
                c.tx_cnt += Wrapping(hdr.len);
            }
        }
        true
    }

    /// Sends a control packet for `key` now.
    pub fn send_ctrl(&mut self, key: Key, ty: VsockType, op: VsockOp, flags: u32) {
        let hdr = self.header(key, ty, op, 0, flags);
        while !self.queue_packet(&hdr, &[]) {
            self.kick_tx();
        }
        self.kick_tx();
    }

    /// Sends a hand-made chain: each element is `(bytes, device_writable)` and becomes
    /// one descriptor. Returns the used length the device reported.
    pub fn send_raw(&mut self, descs: &[(Vec<u8>, bool)]) -> u32 {
        let mut at = RAW_AREA;
        let mut bufs = Vec::new();
        for (bytes, write) in descs {
            assert!(at + bytes.len() as u64 <= RAW_AREA + RAW_AREA_SIZE);
            self.mem.write_slice(bytes, GuestAddress(at)).unwrap();
            bufs.push((at, bytes.len() as u32, *write));
            at += bytes.len() as u64 + 1;
        }
        self.send_raw_descs(&bufs)
    }

    /// Sends a chain of raw descriptors `(guest_addr, len, device_writable)`.
    pub fn send_raw_descs(&mut self, bufs: &[(u64, u32, bool)]) -> u32 {
        self.reclaim_tx();
        let head = self.tx.add(&self.mem, bufs).expect("no free descriptors");
        self.tx_inflight.insert(head, None);
        self.kicks[1] += 1;
        self.device(Vsock::handle_tx_kick);
        let mut len = None;
        while let Some((h, l)) = self.tx.pop_used(&self.mem) {
            if let Some(Some(slot)) = self.tx_inflight.remove(&h) {
                self.tx_free_slots.push(slot);
            }
            if h == head {
                len = Some(l);
            }
        }
        len.expect("device did not return the raw chain")
    }

    /// Marks guest port `port` as listening (host-initiated connections to it are
    /// accepted).
    pub fn listen(&mut self, port: u32) {
        self.listening.insert(port, None);
    }

    /// Like [`Guest::listen`], with accepted connections verifying [`Pattern`] stream
    /// `seed` from their first byte.
    pub fn listen_verify(&mut self, port: u32, seed: u64) {
        self.listening.insert(port, Some(seed));
    }

    /// Starts a connection to host port `port`; returns its key.
    pub fn connect(&mut self, port: u32, ty: VsockType) -> Key {
        self.connect_cid(VMADDR_CID_HOST, port, ty)
    }

    /// Starts a connection to port `port` of CID `cid` (a sibling VM, or the host);
    /// returns its key.
    pub fn connect_cid(&mut self, cid: u64, port: u32, ty: VsockType) -> Key {
        self.next_port += 1;
        let key = (self.next_port, port);
        let mut c = GuestConn::new(ty, GuestState::Connecting, self.opts.buf_alloc);
        c.tx_window = self.opts.tx_window;
        c.peer_cid = cid;
        self.conns.insert(key, c);
        self.send_ctrl(key, ty, VsockOp::Request, 0);
        key
    }

    /// Pumps until `cond` holds or `timeout` passes; returns whether it holds.
    pub fn pump_until(&mut self, timeout: Duration, mut cond: impl FnMut(&Guest) -> bool) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if cond(self) {
                return true;
            }
            let now = Instant::now();
            if now >= end {
                return false;
            }
            self.pump((end - now).min(Duration::from_millis(20)));
        }
    }

    /// One driver iteration: wait up to `timeout` for the device's event fd, let the
    /// device handle it, then process used RX buffers and repost them.
    pub fn pump(&mut self, timeout: Duration) {
        let fd = self.dev.event_fd().map(|f| f.as_raw_fd());
        if let Some(fd) = fd {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: `pfd` is one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n > 0 {
                self.device(Vsock::handle_backend_event);
            }
        }
        self.process_used();
    }

    /// Processes used RX and event buffers, answers what needs answering.
    pub fn process_used(&mut self) {
        loop {
            let mut any = false;
            while let Some((head, len)) = self.rx.pop_used(&self.mem) {
                any = true;
                let addr = self.rx_bufs.remove(&head).expect("unknown rx head");
                if addr == u64::MAX {
                    self.bad_rx_returned.push(len);
                    continue;
                }
                self.on_rx(addr, len);
                self.free_rx_bufs.push(addr);
            }
            while let Some((head, len)) = self.ev.pop_used(&self.mem) {
                any = true;
                assert_eq!(len, 4);
                let addr = EV_BUFS + 16 * u64::from(head);
                let id: u32 = self.mem.read_obj(GuestAddress(addr)).unwrap();
                self.events.push(id);
                self.ev.add(&self.mem, &[(addr, 4, true)]).unwrap();
                if self.ev.needs_kick(&self.mem) {
                    self.kicks[2] += 1;
                    self.device(Vsock::handle_event_kick);
                }
            }
            self.post_rx_buffers();
            self.kick_tx();
            if !any {
                break;
            }
        }
    }

    fn on_rx(&mut self, addr: u64, len: u32) {
        let mut raw = [0u8; 44];
        if len < 44 {
            self.bad_packets += 1;
            return;
        }
        self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
        let hdr = VsockHeader::read_from_bytes(&raw).unwrap();
        let plen = hdr.len;
        if hdr.src_cid == self.opts.guest_cid
            || hdr.dst_cid != self.opts.guest_cid
            || len != 44 + plen
            || plen > self.rx_payload
        {
            self.bad_packets += 1;
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        let Ok(op) = hdr.op() else {
            self.bad_packets += 1;
            return;
        };
        let Ok(ty) = hdr.socket_type() else {
            self.bad_packets += 1;
            return;
        };
        if !self.conns.contains_key(&key) {
            match op {
                VsockOp::Request if self.silent => {}
                VsockOp::Request if self.listening.contains_key(&{ hdr.dst_port }) => {
                    let mut c = GuestConn::new(ty, GuestState::Established, self.opts.buf_alloc);
                    c.tx_window = self.opts.tx_window;
                    c.peer_cid = hdr.src_cid;
                    if let Some(Some(seed)) = self.listening.get(&{ hdr.dst_port }) {
                        c.sink = Sink::Verify { seed: *seed };
                    }
                    c.peer_buf_alloc = hdr.buf_alloc;
                    c.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
                    self.conns.insert(key, c);
                    self.send_ctrl(key, ty, VsockOp::Response, 0);
                }
                VsockOp::Rst => {
                    self.stray_rsts.push(key);
                    self.stray_rst_cids.push(hdr.src_cid);
                }
                _ => {
                    let rst = self.header_to(hdr.src_cid, key, ty, VsockOp::Rst, 0, 0);
                    while !self.queue_packet(&rst, &[]) {
                        self.kick_tx();
                    }
                    self.kick_tx();
                }
            }
            return;
        }
        let mut reply = None;
        {
            let c = self.conns.get_mut(&key).unwrap();
            c.peer_buf_alloc = hdr.buf_alloc;
            c.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
            match op {
                VsockOp::Response if c.state == GuestState::Connecting => {
                    c.state = GuestState::Established
                }
                VsockOp::Rst => c.state = GuestState::Reset,
                VsockOp::Shutdown => c.peer_shutdown |= hdr.flags,
                VsockOp::CreditRequest => reply = Some(VsockOp::CreditUpdate),
                VsockOp::CreditUpdate => c.credit_updates += 1,
                VsockOp::Rw => {
                    if (c.rx_cnt - c.fwd_cnt).0 + plen > c.buf_alloc {
                        c.overruns += 1;
                    }
                    c.rx_cnt += Wrapping(plen);
                    c.received += u64::from(plen);
                    let mut buf = vec![0u8; plen as usize];
                    self.mem
                        .read_slice(&mut buf, GuestAddress(addr + 44))
                        .unwrap();
                    match c.sink {
                        Sink::Keep => {
                            c.data.extend_from_slice(&buf);
                            if c.ty == VsockType::Seqpacket
                                && hdr.flags & SeqpacketFlags::EOM.bits() != 0
                            {
                                let msg = std::mem::take(&mut c.data);
                                c.messages.push((msg, hdr.flags));
                            }
                        }
                        Sink::Verify { seed } => {
                            let pos = c.received - u64::from(plen);
                            if !Pattern::get().check(seed, pos, &buf) {
                                c.corrupt += 1;
                            }
                        }
                    }
                    if c.auto_consume {
                        c.fwd_cnt += Wrapping(plen);
                        if (c.fwd_cnt - c.last_fwd_sent).0 >= c.buf_alloc / 4 {
                            reply = Some(VsockOp::CreditUpdate);
                        }
                    }
                }
                _ => {}
            }
        }
        if let Some(op) = reply {
            let ty = self.conns[&key].ty;
            self.send_ctrl(key, ty, op, 0);
        }
    }

    /// The application reads `n` bytes of a Keep-sink stream socket: they count as
    /// consumed, and the guest announces credit as Linux does.
    pub fn consume(&mut self, key: Key, n: usize) -> Vec<u8> {
        let c = self.conns.get_mut(&key).unwrap();
        let n = n.min(c.data.len());
        let out: Vec<u8> = c.data.drain(..n).collect();
        c.fwd_cnt += Wrapping(n as u32);
        let ty = c.ty;
        self.send_ctrl(key, ty, VsockOp::CreditUpdate, 0);
        out
    }

    /// Queues as much of `data` as credit and TX slots allow, in packets of at most
    /// `pkt` bytes; returns how many bytes were queued (kick with [`Guest::kick_tx`]).
    pub fn queue_stream(
        &mut self,
        key: Key,
        data_len: u64,
        pkt: u32,
        mut fill: impl FnMut(u64, &mut [u8]),
        sent: &mut u64,
    ) {
        let mut buf = vec![0u8; pkt as usize];
        loop {
            let Some(c) = self.conns.get(&key) else {
                return;
            };
            if c.state != GuestState::Established {
                return;
            }
            let left = data_len - *sent;
            let n = u64::from(c.credit()).min(left).min(u64::from(pkt)) as usize;
            if n == 0 || self.tx_free_slots.is_empty() || self.tx.free_count() == 0 {
                return;
            }
            fill(*sent, &mut buf[..n]);
            let hdr = self.header(key, c.ty, VsockOp::Rw, n as u32, 0);
            if !self.queue_packet(&hdr, &buf[..n]) {
                return;
            }
            *sent += n as u64;
        }
    }

    /// Pumps until connection `key` is established; panics naming its state if it is
    /// not within `timeout`.
    pub fn wait_established(&mut self, key: Key, timeout: Duration) {
        assert!(
            self.pump_until(timeout, |g| g.conns[&key].state == GuestState::Established),
            "connection {key:?} not established: {:?}",
            self.conns[&key].state
        );
    }

    /// Sends all of `data` on stream connection `key` in packets of at most 4 KiB,
    /// pumping for credit and TX slots as needed; panics if credit does not come within
    /// `timeout` for a packet.
    pub fn send_all(&mut self, key: Key, data: &[u8], timeout: Duration) {
        let ty = self.conns[&key].ty;
        for chunk in data.chunks(4096) {
            assert!(
                self.pump_until(timeout, |g| g.conns[&key].credit() as usize >= chunk.len()),
                "no credit for {} bytes on {key:?}",
                chunk.len()
            );
            let hdr = self.header(key, ty, VsockOp::Rw, chunk.len() as u32, 0);
            while !self.queue_packet(&hdr, chunk) {
                self.kick_tx();
            }
            self.kick_tx();
        }
    }

    /// Sends a whole seqpacket message in packets of at most `pkt` bytes (the last
    /// marked EOM), pumping for credit as needed.
    pub fn send_message(&mut self, key: Key, msg: &[u8], pkt: usize) {
        let mut off = 0;
        loop {
            let c = &self.conns[&key];
            let credit = c.credit() as usize;
            if credit == 0 && off < msg.len() {
                self.pump(Duration::from_millis(5));
                continue;
            }
            let n = (msg.len() - off).min(pkt).min(credit);
            let last = off + n == msg.len();
            let flags = if last { SeqpacketFlags::EOM.bits() } else { 0 };
            let hdr = self.header(key, VsockType::Seqpacket, VsockOp::Rw, n as u32, flags);
            if !self.queue_packet(&hdr, &msg[off..off + n]) {
                self.kick_tx();
                continue;
            }
            off += n;
            self.kick_tx();
            if last {
                return;
            }
        }
    }

    /// Closes a socket the way Linux does: SHUTDOWN (both), then waits for the
    /// device's RST.
    pub fn close(&mut self, key: Key) -> bool {
        let ty = self.conns[&key].ty;
        let flags = (ShutdownFlags::RCV | ShutdownFlags::SEND).bits();
        self.send_ctrl(key, ty, VsockOp::Shutdown, flags);
        self.pump_until(Duration::from_secs(5), |g| {
            g.conns[&key].state == GuestState::Reset
        })
    }
}

impl Drop for Guest {
    /// Removes the socket directory when it is one [`temp_dir`] made.
    fn drop(&mut self) {
        if let Some(dir) = self.uds_path.parent() {
            let ours = dir.parent() == Some(std::env::temp_dir().as_path())
                && dir
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("outboard-"));
            if ours {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

/// A fresh directory for the muxer's sockets (removed when the [`Guest`] using it is
/// dropped).
pub fn temp_dir(name: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "outboard-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Which way data moves in [`run_streams`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Guest -> host only.
    GuestToHost,
    /// Host -> guest only.
    HostToGuest,
    /// Both ways at once on every connection.
    Both,
}

static RUN: AtomicU64 = AtomicU64::new(0);

fn host_side(
    mut stream: UnixStream,
    bytes: u64,
    dir: Direction,
    (g2h, h2g): (u64, u64),
    go: &std::sync::Barrier,
) {
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    // Data starts moving when every connection is up, so that the time measured is
    // the time data took.
    go.wait();
    let writer = (dir != Direction::GuestToHost).then(|| {
        let mut w = stream.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 128 * 1024];
            let mut pos = 0u64;
            while pos < bytes {
                let n = (bytes - pos).min(buf.len() as u64) as usize;
                Pattern::get().fill(h2g, pos, &mut buf[..n]);
                w.write_all(&buf[..n]).unwrap();
                pos += n as u64;
            }
        })
    });
    if dir != Direction::HostToGuest {
        let mut buf = vec![0u8; 256 * 1024];
        let mut pos = 0u64;
        while pos < bytes {
            let n = stream.read(&mut buf).unwrap();
            assert!(
                n > 0,
                "host side: end of stream after {pos} of {bytes} bytes"
            );
            assert!(
                Pattern::get().check(g2h, pos, &buf[..n]),
                "host side: stream {g2h} corrupt at {pos}"
            );
            pos += n as u64;
        }
    }
    if let Some(w) = writer {
        w.join().unwrap();
    }
}

/// Runs `n` concurrent connections moving `bytes` each in `dir`, in packets of at most
/// `pkt` bytes (guest TX), half of them opened by the guest (to `<uds>_<port>`), half
/// by the host (`CONNECT`). Every byte is checked against [`Pattern`] on arrival; the
/// guest closes every connection at the end. Returns the time the data took.
pub fn run_streams(g: &mut Guest, n: usize, bytes: u64, pkt: u32, dir: Direction) -> Duration {
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    let base = 20_000 + (run as u32 % 1000) * 64;
    let uds = g.uds_path.clone();
    let seed = |i: usize, h2g: bool| run * 1000 + 2 * i as u64 + u64::from(h2g);
    let mut hosts = Vec::new();
    let mut keys: Vec<Option<Key>> = vec![None; n];
    let mut listeners = Vec::new();
    let go = Arc::new(std::sync::Barrier::new(n + 1));
    for (i, key) in keys.iter_mut().enumerate() {
        let go = go.clone();
        let port = base + i as u32;
        let (g2h, h2g) = (seed(i, false), seed(i, true));
        if i % 2 == 0 {
            let path = PathBuf::from(format!("{}_{port}", uds.display()));
            let _ = std::fs::remove_file(&path);
            let l = UnixListener::bind(&path).unwrap();
            let l2 = l.try_clone().unwrap();
            listeners.push(path);
            hosts.push(std::thread::spawn(move || {
                let (s, _) = l2.accept().unwrap();
                host_side(s, bytes, dir, (g2h, h2g), &go);
            }));
            drop(l);
            let k = g.connect(port, VsockType::Stream);
            g.conns.get_mut(&k).unwrap().sink = Sink::Verify { seed: h2g };
            *key = Some(k);
        } else {
            g.listen_verify(port, h2g);
            let uds = uds.clone();
            hosts.push(std::thread::spawn(move || {
                let mut s = UnixStream::connect(&uds).unwrap();
                s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
                let mut line = Vec::new();
                let mut r = BufReader::new(s.try_clone().unwrap());
                r.read_until(b'\n', &mut line).unwrap();
                assert!(line.starts_with(b"OK "), "no OK: {line:?}");
                assert!(r.buffer().is_empty());
                host_side(s, bytes, dir, (g2h, h2g), &go);
            }));
        }
    }
    let found = g.pump_until(Duration::from_secs(10), |g| {
        (0..n).all(|i| {
            let port = base + i as u32;
            g.conns
                .iter()
                .any(|(k, c)| (k.0 == port || k.1 == port) && c.state == GuestState::Established)
        })
    });
    assert!(found, "connections not established");
    for (i, key) in keys.iter_mut().enumerate() {
        if key.is_none() {
            let port = base + i as u32;
            *key = g.conns.keys().find(|k| k.0 == port).copied();
        }
    }
    let keys: Vec<Key> = keys.into_iter().map(Option::unwrap).collect();
    go.wait();
    let start = Instant::now();
    let mut sent = vec![0u64; n];
    let tx_total = if dir == Direction::HostToGuest {
        0
    } else {
        bytes
    };
    let rx_total = if dir == Direction::GuestToHost {
        0
    } else {
        bytes
    };
    loop {
        let mut done = true;
        for (i, key) in keys.iter().enumerate() {
            let s = seed(i, false);
            g.queue_stream(
                *key,
                tx_total,
                pkt,
                |p, b| Pattern::get().fill(s, p, b),
                &mut sent[i],
            );
            let c = &g.conns[key];
            assert_eq!(c.corrupt, 0, "guest side: stream {} corrupt", seed(i, true));
            assert_eq!(c.overruns, 0, "device overran the guest's buffer");
            assert_eq!(c.state, GuestState::Established, "connection {key:?} lost");
            done &= sent[i] == tx_total && c.received >= rx_total;
        }
        g.kick_tx();
        if done {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "streams stalled: sent {sent:?}"
        );
        g.pump(Duration::from_millis(1));
    }
    for (i, h) in hosts.into_iter().enumerate() {
        // The host side finishes reading once the device flushed everything.
        while !h.is_finished() {
            g.pump(Duration::from_millis(1));
        }
        if let Err(e) = h.join() {
            std::panic::resume_unwind(e);
        }
        assert_eq!(g.conns[&keys[i]].received, rx_total);
    }
    let elapsed = start.elapsed();
    for key in &keys {
        assert!(g.close(*key), "no RST for {key:?}");
        g.conns.remove(key);
    }
    for p in listeners {
        let _ = std::fs::remove_file(p);
    }
    elapsed
}

/// Ends the test process if it is not dropped within `limit`: for calls that must
/// return (a device pass on a hostile ring) and would otherwise hang the test run.
#[derive(Debug)]
pub struct Watchdog(Arc<std::sync::atomic::AtomicBool>);

impl Watchdog {
    /// Arms the watchdog for `what`.
    pub fn arm(what: &'static str, limit: Duration) -> Watchdog {
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = done.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + limit;
            while Instant::now() < deadline {
                if flag.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            // Not eprintln!: the test harness captures that, and exit() would lose it.
            let _ = writeln!(
                std::io::stderr(),
                "watchdog: {what} still running after {limit:?} (a busy loop?)"
            );
            std::process::exit(101);
        });
        Watchdog(done)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
