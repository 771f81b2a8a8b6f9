//! A VMM that embeds outboard-devices' virtio-vsock device behind outboard-vmm-glue's
//! virtio-mmio transport, over guest memory from vm-memory.
//!
//! The example plays the guest driver through the MMIO registers: it checks the device's
//! identity, negotiates features, lays out the three queues in guest memory, sets
//! `DRIVER_OK`, and then connects from guest port 5000 to host port 1234. The device
//! connects that to the Unix socket `<uds_path>_1234` (Firecracker's convention), where
//! the host side of the example listens; one packet of data then goes each way.
//! Everything runs unprivileged, without KVM: the "guest" is this process writing guest
//! memory and registers as a driver would.
//!
//! Run it with `cargo run -p outboard-vmm-glue --example vsock_mmio`.

use std::error::Error;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outboard_devices::bus::{BusAccessInfo, BusDevice};
use outboard_devices::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};
use outboard_devices::vsock::{Vsock, VsockDeviceConfig};
use outboard_protocol::virtio::mmio as reg;
use outboard_protocol::vsock::{VsockHeader, VsockOp, VsockType, VIRTIO_ID_VSOCK, VMADDR_CID_HOST};
use outboard_vmm_glue::mmio::{status, MmioTransport, INT_VRING};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use zerocopy::IntoBytes;

type Mem = Arc<GuestMemoryMmap>;
type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// Where the VMM put the device on its MMIO bus.
const MMIO_BASE: u64 = 0xd000_0000;
const GUEST_CID: u64 = 3;
const GUEST_PORT: u32 = 5000;
const HOST_PORT: u32 = 1234;
const QUEUE_SIZE: u16 = 16;
/// Descriptor table, available ring and used ring of queue `q` (rx 0, tx 1, event 2).
const fn ring(q: u64) -> (u64, u64, u64) {
    let base = 0x1000 * (q + 1);
    (base, base + 0x100, base + 0x200)
}
/// Guest buffers: RX buffers, then TX packets.
const RX_BUFS: u64 = 0x1_0000;
const RX_BUF_LEN: u32 = 4096;
const TX_BUFS: u64 = 0x2_0000;
/// `VIRTQ_DESC_F_WRITE`: the device writes this buffer.
const DESC_WRITE: u16 = 2;

/// The guest's side: the device's registers and the driver's ring state.
struct Driver {
    dev: MmioTransport<Vsock, Mem>,
    mem: Mem,
    /// Next free descriptor, next available index and next used index to read, per queue.
    next_desc: [u16; 3],
    avail_idx: [u16; 3],
    used_seen: [u16; 3],
}

impl Driver {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let info = BusAccessInfo {
            offset,
            address: MMIO_BASE + offset,
            id: 0,
        };
        self.dev.read(info, data);
    }

    fn rd(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(&mut self, offset: u64, v: u32) {
        let info = BusAccessInfo {
            offset,
            address: MMIO_BASE + offset,
            id: 0,
        };
        self.dev.write(info, &v.to_le_bytes());
    }

    /// Makes one buffer available on queue `q`.
    fn offer(&mut self, q: usize, addr: u64, len: u32, flags: u16) -> Result<()> {
        let (desc, avail, _) = ring(q as u64);
        let id = self.next_desc[q];
        self.next_desc[q] = (id + 1) % QUEUE_SIZE;
        let d = GuestAddress(desc + 16 * u64::from(id));
        self.mem.write_obj(addr, d)?;
        self.mem.write_obj(len, GuestAddress(d.0 + 8))?;
        self.mem.write_obj(flags, GuestAddress(d.0 + 12))?;
        self.mem.write_obj(0u16, GuestAddress(d.0 + 14))?;
        let slot = u64::from(self.avail_idx[q] % QUEUE_SIZE);
        self.mem.write_obj(id, GuestAddress(avail + 4 + 2 * slot))?;
        self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx[q], GuestAddress(avail + 2))?;
        Ok(())
    }

    /// Sends one packet on the TX queue and notifies the device.
    fn send(&mut self, hdr: VsockHeader, payload: &[u8]) -> Result<()> {
        let at = TX_BUFS + 0x1000 * u64::from(self.avail_idx[1] % QUEUE_SIZE);
        self.mem.write_slice(hdr.as_bytes(), GuestAddress(at))?;
        self.mem
            .write_slice(payload, GuestAddress(at + VsockHeader::SIZE as u64))?;
        let len = (VsockHeader::SIZE + payload.len()) as u32;
        self.offer(1, at, len, 0)?;
        self.wr(reg::QUEUE_NOTIFY, 1);
        Ok(())
    }

    /// Waits for the next packet the device put in the RX queue, running the device's
    /// event loop (its muxer's epoll fd) meanwhile, and gives the buffer back.
    fn recv(&mut self, timeout: Duration) -> Result<(VsockHeader, Vec<u8>)> {
        let (_, _, used) = ring(0);
        let deadline = Instant::now() + timeout;
        loop {
            let used_idx: u16 = self.mem.read_obj(GuestAddress(used + 2))?;
            if used_idx != self.used_seen[0] {
                let slot = u64::from(self.used_seen[0] % QUEUE_SIZE);
                self.used_seen[0] = self.used_seen[0].wrapping_add(1);
                let id: u32 = self.mem.read_obj(GuestAddress(used + 4 + 8 * slot))?;
                let len: u32 = self.mem.read_obj(GuestAddress(used + 8 + 8 * slot))?;
                let buf = RX_BUFS + u64::from(RX_BUF_LEN) * u64::from(id);
                let mut bytes = vec![0u8; (len as usize).min(RX_BUF_LEN as usize)];
                self.mem.read_slice(&mut bytes, GuestAddress(buf))?;
                let hdr: VsockHeader = outboard_protocol::parse(
                    bytes.get(..VsockHeader::SIZE).ok_or("short RX packet")?,
                    "vsock header",
                )?;
                let payload = bytes.split_off(VsockHeader::SIZE);
                self.offer(0, buf, RX_BUF_LEN, DESC_WRITE)?;
                self.wr(reg::QUEUE_NOTIFY, 0);
                return Ok((hdr, payload));
            }
            if Instant::now() >= deadline {
                return Err("no packet from the device in time".into());
            }
            self.run_device(Duration::from_millis(10));
        }
    }

    /// One turn of the VMM's event loop for this device: wait for its event fd, then
    /// let it work.
    fn run_device(&mut self, timeout: Duration) {
        let Some(fd) = self.dev.device().event_fd().map(|f| f.as_raw_fd()) else {
            return;
        };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
        if n > 0 {
            self.dev.handle_device_event();
        }
    }
}

fn header(op: VsockOp, len: u32) -> VsockHeader {
    VsockHeader {
        src_cid: GUEST_CID,
        dst_cid: VMADDR_CID_HOST,
        src_port: GUEST_PORT,
        dst_port: HOST_PORT,
        len,
        type_: VsockType::Stream as u16,
        op: op as u16,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

fn main() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("outboard-vsock-mmio-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(dir: &std::path::Path) -> Result<()> {
    // The host side: a Unix socket listening for guest connections to port 1234.
    let uds = dir.join("vsock");
    let host_listener = UnixListener::bind(format!("{}_{HOST_PORT}", uds.display()))?;
    host_listener.set_nonblocking(true)?;

    // The VMM: 1 MiB of guest memory and the device at MMIO_BASE with an irq eventfd.
    let mem: Mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)])?);
    let vsock = Vsock::new(VsockDeviceConfig::new(GUEST_CID, &uds))?;
    let irq = EventFd::new(libc::EFD_NONBLOCK)?;
    let dev = MmioTransport::new(vsock, mem.clone(), MMIO_BASE, irq.try_clone()?);
    let mut g = Driver {
        dev,
        mem,
        next_desc: [0; 3],
        avail_idx: [0; 3],
        used_seen: [0; 3],
    };

    // The guest driver probes the device and brings it up.
    let magic = g.rd(reg::MAGIC_VALUE);
    let device_id = g.rd(reg::DEVICE_ID);
    let mut cid = [0u8; 8];
    g.read(reg::CONFIG, &mut cid);
    if magic != outboard_vmm_glue::mmio::MMIO_MAGIC || device_id != VIRTIO_ID_VSOCK {
        return Err(format!("not a virtio-mmio vsock device: {magic:#x} {device_id}").into());
    }
    println!(
        "guest: virtio-mmio device {device_id} (vsock) at {MMIO_BASE:#x}, guest CID {}",
        u64::from_le_bytes(cid)
    );
    g.wr(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    g.wr(reg::DEVICE_FEATURES_SEL, 1);
    let offered_high = g.rd(reg::DEVICE_FEATURES);
    let version_1 = (VIRTIO_F_VERSION_1 >> 32) as u32;
    if offered_high & version_1 == 0 {
        return Err("the device does not offer VIRTIO_F_VERSION_1".into());
    }
    g.wr(reg::DRIVER_FEATURES_SEL, 1);
    g.wr(reg::DRIVER_FEATURES, version_1);
    let features_ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    g.wr(reg::STATUS, features_ok);
    if g.rd(reg::STATUS) & status::FEATURES_OK == 0 {
        return Err("the device refused our features".into());
    }
    for q in 0..3u32 {
        let (desc, avail, used) = ring(q.into());
        g.wr(reg::QUEUE_SEL, q);
        g.wr(reg::QUEUE_NUM, QUEUE_SIZE.into());
        g.wr(reg::QUEUE_DESC_LOW, desc as u32);
        g.wr(reg::QUEUE_DRIVER_LOW, avail as u32);
        g.wr(reg::QUEUE_DEVICE_LOW, used as u32);
        g.wr(reg::QUEUE_READY, 1);
    }
    for i in 0..u64::from(QUEUE_SIZE) {
        g.offer(
            0,
            RX_BUFS + u64::from(RX_BUF_LEN) * i,
            RX_BUF_LEN,
            DESC_WRITE,
        )?;
    }
    g.wr(reg::STATUS, features_ok | status::DRIVER_OK);
    if !g.dev.is_active() {
        return Err("the device did not activate".into());
    }

    // Guest port 5000 connects to host port 1234.
    g.send(header(VsockOp::Request, 0), &[])?;
    let (hdr, _) = g.recv(Duration::from_secs(5))?;
    if hdr.op()? != VsockOp::Response {
        return Err(format!("expected RESPONSE, got {:?}", hdr.op()).into());
    }
    println!("guest: connected to host port {}", { hdr.src_port });
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut host = loop {
        match host_listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return Err(e.into()),
        }
    };

    // One packet host -> guest ...
    host.write_all(b"hello from the host")?;
    let (hdr, payload) = loop {
        let (hdr, payload) = g.recv(Duration::from_secs(5))?;
        if hdr.op()? == VsockOp::Rw {
            break (hdr, payload);
        }
    };
    println!(
        "guest: RW from host port {}: {:?}",
        { hdr.src_port },
        String::from_utf8_lossy(&payload)
    );

    // ... and one guest -> host.
    let msg = b"hello from the guest";
    g.send(header(VsockOp::Rw, msg.len() as u32), msg)?;
    let got = read_host(&mut g, &mut host, msg.len())?;
    println!("host: read {:?}", String::from_utf8_lossy(&got));
    if got != msg {
        return Err("the host read something else".into());
    }

    // The device raised used-buffer interrupts on the irq eventfd the whole time.
    let pending = g.rd(reg::INTERRUPT_STATUS);
    let irqs = irq.read()?;
    g.wr(reg::INTERRUPT_ACK, pending);
    if pending & INT_VRING == 0 {
        return Err("no used-buffer interrupt".into());
    }
    g.wr(reg::STATUS, 0);
    println!(
        "vsock over virtio-mmio: one packet each way, {irqs} irq eventfd signals, device reset"
    );
    Ok(())
}

/// Reads `n` bytes on the host socket while the device runs.
fn read_host(g: &mut Driver, host: &mut UnixStream, n: usize) -> Result<Vec<u8>> {
    host.set_nonblocking(true)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while got.len() < n {
        match host.read(&mut buf) {
            Ok(0) => return Err("the device closed the host connection".into()),
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                g.run_device(Duration::from_millis(10));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(got)
}
