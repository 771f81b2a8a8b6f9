//! Snapshot and restore of the vsock device behind the virtio-mmio transport
//! (`Suspendable`), in-process and jailed behind a `ProxyDevice` (snapshot in one child,
//! restore in another), with this file as the guest driver writing guest memory and
//! registers.
//!
//! What is checked: the snapshot carries the transport's registers, the ring indices and
//! the vsock state (its CID and acked features); a restore closes the host sockets of
//! connections open before it (the host reads end of file), the guest gets
//! TRANSPORT_RESET in the event buffer it had posted, a restored device serves new
//! connections with its rings going on where they stopped, and a restore into a device
//! of another guest CID is refused with an error naming both CIDs.
//!
//! Runs with `harness = false`: every case runs in sequence on the main thread, so
//! forking the proxied devices is safe.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outboard_devices::bus::{
    BusAccessInfo, BusDevice, BusRange, BusType, SuspendError, Suspendable,
};
use outboard_devices::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};
use outboard_devices::vsock::{Vsock, VsockDeviceConfig, VsockSnapshot};
use outboard_protocol::virtio::mmio as reg;
use outboard_protocol::vsock::{
    VsockHeader, VsockOp, VsockType, VIRTIO_VSOCK_F_STREAM, VMADDR_CID_HOST,
};
use outboard_sandbox::{Jail, ProxyDevice};
use outboard_vmm_glue::mmio::{status, MmioSnapshot, MmioTransport};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use zerocopy::IntoBytes;

type Mem = Arc<GuestMemoryMmap>;

const MMIO_BASE: u64 = 0xd000_0000;
const MEM_SIZE: usize = 1 << 20;
const CID: u64 = 3;
const QUEUE_SIZE: u16 = 16;
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
const RX_BUFS: u64 = 0x1_0000;
const RX_BUF_LEN: u32 = 4096;
const TX_BUFS: u64 = 0x2_0000;
const EVENT_BUFS: u64 = 0x3_0000;
const DESC_WRITE: u16 = 2;
const ACKED: u64 = VIRTIO_F_VERSION_1 | VIRTIO_VSOCK_F_STREAM;

/// Descriptor table, available ring and used ring of queue `q`.
const fn ring(q: usize) -> (u64, u64, u64) {
    let base = 0x1000 * (q as u64 + 1);
    (base, base + 0x100, base + 0x200)
}

/// Guest memory in a memfd, mapped shared: a proxied device's child sees the driver's
/// writes and the driver sees the device's.
fn shared_memory() -> Mem {
    // SAFETY: memfd_create with a valid C string; the result is checked.
    let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a new fd nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(MEM_SIZE as u64).unwrap();
    let ranges = [(GuestAddress(0), MEM_SIZE, Some(FileOffset::new(file, 0)))];
    Arc::new(GuestMemoryMmap::from_ranges_with_files(ranges.iter()).unwrap())
}

/// The VMM's side of the device: the transport, whose device event fd it polls before
/// every register read (a VMM polls it in its event loop; behind a `ProxyDevice` the
/// child has no other loop).
struct Polled(MmioTransport<Vsock, Mem>);

impl Polled {
    fn new(uds: &Path, cid: u64, mem: &Mem) -> Polled {
        let vsock = Vsock::new(VsockDeviceConfig::new(cid, uds)).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        Polled(MmioTransport::new(vsock, mem.clone(), MMIO_BASE, irq))
    }

    fn pump(&mut self) {
        let Some(fd) = self.0.device().event_fd().map(|f| f.as_raw_fd()) else {
            return;
        };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the call.
        if unsafe { libc::poll(&mut pfd, 1, 0) } > 0 {
            self.0.handle_device_event();
        }
    }
}

impl Suspendable for Polled {
    fn snapshot(&mut self) -> Result<serde_json::Value, SuspendError> {
        self.0.snapshot()
    }
    fn restore(&mut self, data: serde_json::Value) -> Result<(), SuspendError> {
        self.0.restore(data)
    }
    fn sleep(&mut self) -> Result<(), SuspendError> {
        self.0.sleep()
    }
    fn wake(&mut self) -> Result<(), SuspendError> {
        self.0.wake()
    }
}

impl BusDevice for Polled {
    fn debug_label(&self) -> String {
        self.0.debug_label()
    }
    fn read(&mut self, info: BusAccessInfo, data: &mut [u8]) {
        self.pump();
        self.0.read(info, data)
    }
    fn write(&mut self, info: BusAccessInfo, data: &[u8]) {
        self.0.write(info, data)
    }
    fn get_ranges(&self) -> Vec<(BusRange, BusType)> {
        self.0.get_ranges()
    }
}

/// The guest driver: registers through a `BusDevice` (the transport itself or a
/// `ProxyDevice`), rings in guest memory.
struct Driver {
    mem: Mem,
    next_desc: [u16; 3],
    avail: [u16; 3],
    used_seen: [u16; 3],
}

fn info(offset: u64) -> BusAccessInfo {
    BusAccessInfo {
        offset,
        address: MMIO_BASE + offset,
        id: 0,
    }
}

fn rd(dev: &mut dyn BusDevice, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read(info(offset), &mut b);
    u32::from_le_bytes(b)
}

fn wr(dev: &mut dyn BusDevice, offset: u64, v: u32) {
    dev.write(info(offset), &v.to_le_bytes());
}

fn header(op: VsockOp, src_port: u32, dst_port: u32, len: u32) -> VsockHeader {
    VsockHeader {
        src_cid: CID,
        dst_cid: VMADDR_CID_HOST,
        src_port,
        dst_port,
        len,
        type_: VsockType::Stream as u16,
        op: op as u16,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

impl Driver {
    fn new(mem: &Mem) -> Driver {
        Driver {
            mem: mem.clone(),
            next_desc: [0; 3],
            avail: [0; 3],
            used_seen: [0; 3],
        }
    }

    fn offer(&mut self, q: usize, addr: u64, len: u32, flags: u16) {
        let (desc, avail, _) = ring(q);
        let id = self.next_desc[q];
        self.next_desc[q] = (id + 1) % QUEUE_SIZE;
        let d = GuestAddress(desc + 16 * u64::from(id));
        self.mem.write_obj(addr, d).unwrap();
        self.mem.write_obj(len, GuestAddress(d.0 + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(d.0 + 12)).unwrap();
        self.mem.write_obj(0u16, GuestAddress(d.0 + 14)).unwrap();
        let slot = u64::from(self.avail[q] % QUEUE_SIZE);
        self.mem
            .write_obj(id, GuestAddress(avail + 4 + 2 * slot))
            .unwrap();
        self.avail[q] = self.avail[q].wrapping_add(1);
        self.mem
            .write_obj(self.avail[q], GuestAddress(avail + 2))
            .unwrap();
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.mem.read_obj(GuestAddress(ring(q).2 + 2)).unwrap()
    }

    /// Negotiates VERSION_1 and stream sockets, sets the three queues up with RX and
    /// two event buffers (0xff-filled) posted, and sets DRIVER_OK.
    fn bring_up(&mut self, dev: &mut dyn BusDevice) {
        wr(dev, reg::STATUS, 0);
        wr(dev, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(dev, reg::DRIVER_FEATURES_SEL, 1);
        wr(dev, reg::DRIVER_FEATURES, (ACKED >> 32) as u32);
        wr(dev, reg::DRIVER_FEATURES_SEL, 0);
        wr(dev, reg::DRIVER_FEATURES, ACKED as u32);
        let features_ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        wr(dev, reg::STATUS, features_ok);
        assert_ne!(rd(dev, reg::STATUS) & status::FEATURES_OK, 0);
        for q in 0..3 {
            let (desc, avail, used) = ring(q);
            wr(dev, reg::QUEUE_SEL, q as u32);
            wr(dev, reg::QUEUE_NUM, QUEUE_SIZE.into());
            wr(dev, reg::QUEUE_DESC_LOW, desc as u32);
            wr(dev, reg::QUEUE_DRIVER_LOW, avail as u32);
            wr(dev, reg::QUEUE_DEVICE_LOW, used as u32);
            wr(dev, reg::QUEUE_READY, 1);
        }
        for i in 0..8 {
            self.offer(
                RX,
                RX_BUFS + u64::from(RX_BUF_LEN) * i,
                RX_BUF_LEN,
                DESC_WRITE,
            );
        }
        for i in 0..2 {
            self.mem
                .write_slice(&[0xff; 8], GuestAddress(EVENT_BUFS + 16 * i))
                .unwrap();
            self.offer(EVENT, EVENT_BUFS + 16 * i, 8, DESC_WRITE);
        }
        wr(dev, reg::STATUS, features_ok | status::DRIVER_OK);
        assert_ne!(rd(dev, reg::STATUS) & status::DRIVER_OK, 0, "not activated");
    }

    fn send(&mut self, dev: &mut dyn BusDevice, hdr: VsockHeader, payload: &[u8]) {
        let at = TX_BUFS + 0x1000 * u64::from(self.avail[TX] % QUEUE_SIZE);
        self.mem
            .write_slice(hdr.as_bytes(), GuestAddress(at))
            .unwrap();
        self.mem
            .write_slice(payload, GuestAddress(at + VsockHeader::SIZE as u64))
            .unwrap();
        self.offer(TX, at, (VsockHeader::SIZE + payload.len()) as u32, 0);
        wr(dev, reg::QUEUE_NOTIFY, TX as u32);
    }

    /// The next packet the device put on the RX queue (its buffer given back).
    fn recv(&mut self, dev: &mut dyn BusDevice) -> (VsockHeader, Vec<u8>) {
        let (_, _, used) = ring(RX);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.used_idx(RX) == self.used_seen[RX] {
            assert!(Instant::now() < deadline, "no RX packet in time");
            rd(dev, reg::INTERRUPT_STATUS); // lets the device work
            std::thread::sleep(Duration::from_millis(2));
        }
        let slot = u64::from(self.used_seen[RX] % QUEUE_SIZE);
        self.used_seen[RX] = self.used_seen[RX].wrapping_add(1);
        let id: u32 = self
            .mem
            .read_obj(GuestAddress(used + 4 + 8 * slot))
            .unwrap();
        let len: u32 = self
            .mem
            .read_obj(GuestAddress(used + 8 + 8 * slot))
            .unwrap();
        let buf = RX_BUFS + u64::from(RX_BUF_LEN) * u64::from(id);
        let mut bytes = vec![0u8; len as usize];
        self.mem.read_slice(&mut bytes, GuestAddress(buf)).unwrap();
        let hdr: VsockHeader =
            outboard_protocol::parse(&bytes[..VsockHeader::SIZE], "vsock header").unwrap();
        self.offer(RX, buf, RX_BUF_LEN, DESC_WRITE);
        wr(dev, reg::QUEUE_NOTIFY, RX as u32);
        (hdr, bytes.split_off(VsockHeader::SIZE))
    }

    /// The first event buffer holds TRANSPORT_RESET (id 0, 4 bytes) and was returned.
    fn assert_transport_reset(&self) {
        let (_, _, used) = ring(EVENT);
        assert_eq!(self.used_idx(EVENT), 1, "one event");
        let id: u32 = self.mem.read_obj(GuestAddress(used + 4)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(used + 8)).unwrap();
        assert_eq!((id, len), (0, 4));
        let mut ev = [0u8; 8];
        self.mem
            .read_slice(&mut ev, GuestAddress(EVENT_BUFS))
            .unwrap();
        assert_eq!(ev, [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff], "TRANSPORT_RESET");
    }

    fn memory_image(&self) -> Vec<u8> {
        let mut image = vec![0u8; MEM_SIZE];
        self.mem.read_slice(&mut image, GuestAddress(0)).unwrap();
        image
    }

    /// Puts guest memory back as it was at the snapshot (as a VMM restores it).
    fn restore_memory(&mut self, image: &[u8], seen: [u16; 3]) {
        self.mem.write_slice(image, GuestAddress(0)).unwrap();
        self.used_seen = seen;
    }
}

/// Reads from a host socket until end of file (5 s at most): the device closed it.
fn assert_closed(host: &mut UnixStream) {
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    loop {
        match host.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => panic!("the host socket was not closed: {e}"),
        }
    }
}

fn accept(listener: &UnixListener) -> UnixStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match listener.accept() {
            Ok((s, _)) => return s,
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("outboard-snap-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The device's own state inside a transport snapshot.
fn vsock_state(snap: &serde_json::Value) -> VsockSnapshot {
    let snap: MmioSnapshot = serde_json::from_value(snap.clone()).unwrap();
    VsockSnapshot::from_bytes(&snap.device).unwrap()
}

/// In-process: a guest connection with data moved, then snapshot; restored over the
/// running device (its host socket closed, TRANSPORT_RESET), then into a new device
/// that serves a new connection on rings that go on where they stopped.
fn in_process() {
    let dir = scratch("inproc");
    let uds = dir.join("v");
    let host_listener = UnixListener::bind(format!("{}_1234", uds.display())).unwrap();
    let mem = shared_memory();
    let mut dev = Polled::new(&uds, CID, &mem);
    let mut g = Driver::new(&mem);
    g.bring_up(&mut dev);

    g.send(&mut dev, header(VsockOp::Request, 5000, 1234, 0), &[]);
    let (hdr, _) = g.recv(&mut dev);
    assert_eq!(hdr.op().unwrap(), VsockOp::Response);
    let mut host = accept(&host_listener);
    g.send(&mut dev, header(VsockOp::Rw, 5000, 1234, 5), b"hello");
    let mut got = [0u8; 5];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");

    dev.sleep().unwrap();
    let snap = dev.snapshot().unwrap();
    let image = g.memory_image();
    let seen = g.used_seen;
    assert_eq!(
        vsock_state(&snap),
        VsockSnapshot {
            guest_cid: CID,
            offered_features: Vsock::FEATURES,
            acked_features: ACKED
        }
    );
    assert_eq!(snap["queues"][TX]["next_used"], 2);
    assert_eq!(snap["queues"][RX]["next_used"], 1);
    assert_eq!(snap["queues"][EVENT]["next_avail"], 0);

    // Restored over itself: the live connection's host socket is closed, and the guest
    // hears TRANSPORT_RESET.
    dev.restore(snap.clone()).unwrap();
    dev.wake().unwrap();
    assert_closed(&mut host);
    g.assert_transport_reset();
    assert_eq!(dev.0.device().connection_count(), 0);

    // Into a new device (the first one gone, as in a new process): same.
    drop(dev);
    let _ = std::fs::remove_file(&uds);
    let _ = std::fs::remove_file(format!("{}_seqpacket", uds.display()));
    g.restore_memory(&image, seen);
    let mut dev = Polled::new(&uds, CID, &mem);
    dev.restore(snap).unwrap();
    assert!(dev.0.is_active());
    assert_eq!(
        rd(&mut dev, reg::STATUS) & status::DRIVER_OK,
        status::DRIVER_OK
    );
    g.assert_transport_reset();
    // A new connection, on the TX ring's third entry and the RX ring's second.
    g.send(&mut dev, header(VsockOp::Request, 5001, 1234, 0), &[]);
    let (hdr, _) = g.recv(&mut dev);
    assert_eq!(hdr.op().unwrap(), VsockOp::Response);
    assert_eq!({ hdr.dst_port }, 5001);
    let mut host = accept(&host_listener);
    g.send(&mut dev, header(VsockOp::Rw, 5001, 1234, 5), b"again");
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"again");
    assert_eq!(g.used_idx(TX), 4);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every fd open now: what a child must keep for a device created before the fork.
fn open_fds() -> Vec<RawFd> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

fn proxied(uds: &Path, cid: u64, mem: &Mem) -> ProxyDevice {
    let dev = Polled::new(uds, cid, mem);
    let keep = open_fds();
    ProxyDevice::new(dev, &Jail::sandboxed(), &keep).unwrap()
}

/// Jailed behind a `ProxyDevice`: a host-initiated connection waits for the guest when
/// the snapshot is taken in child A; child B restores it and tells the guest
/// TRANSPORT_RESET; child C (another CID) refuses it; restored into A, A closes the
/// host socket.
fn through_proxy() {
    let dir = scratch("proxy");
    let mem = shared_memory();
    let mut g = Driver::new(&mem);
    let mut a = proxied(&dir.join("a"), CID, &mem);
    g.bring_up(&mut a);

    let mut host = UnixStream::connect(dir.join("a")).unwrap();
    host.write_all(b"CONNECT 1234\n").unwrap();
    let (hdr, _) = g.recv(&mut a);
    assert_eq!(hdr.op().unwrap(), VsockOp::Request);
    assert_eq!({ hdr.dst_port }, 1234);

    a.sleep().unwrap();
    let snap = a.snapshot().unwrap();
    let image = g.memory_image();
    let seen = g.used_seen;
    assert_eq!(vsock_state(&snap).guest_cid, CID);
    assert_eq!(vsock_state(&snap).acked_features, ACKED);

    let mut b = proxied(&dir.join("b"), CID, &mem);
    b.restore(snap.clone()).unwrap();
    g.assert_transport_reset();
    assert_eq!(
        rd(&mut b, reg::STATUS) & status::DRIVER_OK,
        status::DRIVER_OK
    );
    assert_eq!(b.snapshot().unwrap()["device"], snap["device"]);

    g.restore_memory(&image, seen);
    let mut c = proxied(&dir.join("c"), CID + 1, &mem);
    let err = c.restore(snap.clone()).unwrap_err();
    assert!(
        err.to_string()
            .contains("the state is of guest CID 3, this device serves guest CID 4"),
        "{err}"
    );
    assert_eq!(rd(&mut c, reg::STATUS), 0, "C stays reset");

    a.restore(snap).unwrap();
    a.wake().unwrap();
    assert_closed(&mut host);
    g.assert_transport_reset();
    drop((a, b, c));
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    let cases: [(&str, fn()); 2] = [("in_process", in_process), ("through_proxy", through_proxy)];
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let mut ran = 0;
    for (name, case) in cases {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        println!("test {name} ...");
        case();
        println!("test {name} ... ok");
        ran += 1;
    }
    println!("test result: ok. {ran} passed");
}
