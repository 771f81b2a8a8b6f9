//! A small virtio-vsock driver on the rings of a vhost-user front-end (our transport's
//! `Frontend` playing QEMU): split rings with one 4 KiB buffer per descriptor, packets
//! both ways, a host connection to a guest port ([`OpenSession`]) and a bare guest
//! ([`SimGuest`]). Used by the tests that drive the `outboard vsock` binary.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use outboard_protocol::vhost_user::{
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserVringAddr,
};
use outboard_transport::{Frontend, MemoryRegionRef};
use vmm_sys_util::eventfd::EventFd;

use super::{bfd, GuestMem};

pub const T: Duration = Duration::from_secs(5);
pub const MEM: usize = 0x40000;
pub const UVA: u64 = 0x7f00_0000_0000;
pub const QSIZE: u16 = 8;
pub const HDR: usize = 44;
pub const GUEST_CID: u64 = 3;
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RW: u16 = 5;
pub const TYPE_STREAM: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;
pub const EVENT_IDX: u64 = 1 << 29;

/// One split ring: descriptor table, available and used rings, and one 4 KiB buffer
/// per descriptor (descriptor i always points at buffer i).
pub struct Ring {
    pub desc: usize,
    pub avail: usize,
    pub used: usize,
    pub bufs: usize,
    pub next_avail: u16,
    pub last_used: u16,
    pub kick: EventFd,
    pub call: EventFd,
}

impl Ring {
    pub fn new(base: usize) -> Ring {
        Ring {
            desc: base,
            avail: base + 0x800,
            used: base + 0x1000,
            bufs: base + 0x2000,
            next_avail: 0,
            last_used: 0,
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        }
    }

    pub fn buf(&self, id: u16) -> usize {
        self.bufs + 0x1000 * usize::from(id % QSIZE)
    }

    /// Makes descriptor `id` (its buffer, `len` bytes) available.
    pub fn offer(&mut self, mem: &GuestMem, id: u16, len: u32, device_writes: bool) {
        let d = self.desc + 16 * usize::from(id % QSIZE);
        mem.write(d, UVA_GPA_BASE + self.buf(id) as u64);
        mem.write(d + 8, len);
        mem.write(d + 12, if device_writes { VRING_DESC_F_WRITE } else { 0 });
        mem.write(d + 14, 0u16);
        mem.write(
            self.avail + 4 + 2 * usize::from(self.next_avail % QSIZE),
            id % QSIZE,
        );
        self.next_avail = self.next_avail.wrapping_add(1);
        mem.write(self.avail + 2, self.next_avail);
        self.kick.write(1).unwrap();
    }

    /// The next used element (id, len), waiting up to `T`.
    pub fn next_used(&mut self, mem: &GuestMem) -> (u16, u32) {
        let deadline = Instant::now() + T;
        while mem.read::<u16>(self.used + 2) == self.last_used {
            assert!(Instant::now() < deadline, "no used buffer");
            std::thread::sleep(Duration::from_millis(2));
        }
        let e = self.used + 4 + 8 * usize::from(self.last_used % QSIZE);
        self.last_used = self.last_used.wrapping_add(1);
        (mem.read::<u32>(e) as u16, mem.read::<u32>(e + 4))
    }

    pub fn setup(&self, fe: &mut Frontend, index: u8) {
        let i = u32::from(index);
        fe.set_vring_num(i, u32::from(QSIZE)).unwrap();
        fe.set_vring_addr(&VhostUserVringAddr {
            index: i,
            flags: 0,
            descriptor: UVA + self.desc as u64,
            used: UVA + self.used as u64,
            available: UVA + self.avail as u64,
            log: 0,
        })
        .unwrap();
        fe.set_vring_base(i, 0).unwrap();
        fe.set_vring_call(index, Some(bfd(&self.call))).unwrap();
        fe.set_vring_kick(index, Some(bfd(&self.kick))).unwrap();
        fe.set_vring_enable(i, true).unwrap();
    }
}

/// Guest physical addresses start at 0.
pub const UVA_GPA_BASE: u64 = 0;

pub fn header(src_port: u32, dst_port: u32, len: u32, op: u16) -> [u8; HDR] {
    header_cids(GUEST_CID, 2, src_port, dst_port, len, op)
}

pub fn header_cids(
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    op: u16,
) -> [u8; HDR] {
    let mut h = [0u8; HDR];
    h[0..8].copy_from_slice(&src_cid.to_le_bytes());
    h[8..16].copy_from_slice(&dst_cid.to_le_bytes());
    h[16..20].copy_from_slice(&src_port.to_le_bytes());
    h[20..24].copy_from_slice(&dst_port.to_le_bytes());
    h[24..28].copy_from_slice(&len.to_le_bytes());
    h[28..30].copy_from_slice(&TYPE_STREAM.to_le_bytes());
    h[30..32].copy_from_slice(&op.to_le_bytes());
    h[36..40].copy_from_slice(&65536u32.to_le_bytes());
    h
}

pub struct Packet {
    pub src_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub op: u16,
    pub payload: Vec<u8>,
}

/// Reads the next packet the device put on the rx ring and offers the buffer again.
pub fn recv(mem: &GuestMem, rx: &mut Ring) -> Packet {
    let (id, len) = rx.next_used(mem);
    assert!(len as usize >= HDR, "short rx packet: {len}");
    let b = mem.read_bytes(rx.buf(id), len as usize);
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let p = Packet {
        src_cid: u64::from_le_bytes(b[0..8].try_into().unwrap()),
        src_port: u32_at(16),
        dst_port: u32_at(20),
        op: u16::from_le_bytes([b[30], b[31]]),
        payload: b[HDR..].to_vec(),
    };
    assert_eq!(u32_at(24) as usize, p.payload.len());
    rx.offer(mem, id, 0x1000, true);
    p
}

/// Puts one packet on the tx ring and waits until the device consumed it.
pub fn send(mem: &GuestMem, tx: &mut Ring, hdr: [u8; HDR], payload: &[u8]) {
    let id = tx.next_avail % QSIZE;
    mem.write_bytes(tx.buf(id), &hdr);
    mem.write_bytes(tx.buf(id) + HDR, payload);
    tx.offer(mem, id, (HDR + payload.len()) as u32, false);
    assert_eq!(tx.next_used(mem).0, id);
}

/// A front-end connected to `path`, waiting up to 10 s for the daemon to listen.
pub fn connect_frontend(path: &Path) -> Frontend {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(fe) = Frontend::connect(path) {
            return fe;
        }
        assert!(
            Instant::now() < deadline,
            "{} never accepted",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn bring_up(fe: &mut Frontend, mem: &GuestMem, rx: &Ring, tx: &Ring) {
    let offered = fe.get_features().unwrap();
    let proto = fe.get_protocol_features().unwrap();
    let want = VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::LOG_SHMFD;
    assert!(proto.contains(want));
    fe.set_protocol_features(want).unwrap();
    fe.set_owner().unwrap();
    // Without EVENT_IDX every used buffer is signalled; this driver polls anyway.
    fe.set_features(offered & !EVENT_IDX).unwrap();
    fe.add_mem_region(&MemoryRegionRef {
        region: VhostUserMemoryRegion::new(0, MEM as u64, UVA, 0),
        fd: mem.fd.as_fd(),
    })
    .unwrap();
    rx.setup(fe, 0);
    tx.setup(fe, 1);
}

/// A front-end session with the dirty page log on (as in a migration: the worker maps
/// the log under its seccomp policy and marks the RX pages) and a host connection to
/// guest port 1234 over the jailed worker.
pub struct OpenSession {
    pub mem: GuestMem,
    pub rx: Ring,
    pub tx: Ring,
    pub fe: Frontend,
    pub log: GuestMem,
    pub reader: BufReader<UnixStream>,
    pub host_port: u32,
}

impl OpenSession {
    /// Brings the device up, hands it the log and has the host connect.
    pub fn open(socket: &Path, uds: &Path) -> OpenSession {
        let mem = GuestMem::new(MEM);
        let mut rx = Ring::new(0x1000);
        let mut tx = Ring::new(0x20000);
        let mut fe = connect_frontend(socket);
        bring_up(&mut fe, &mem, &rx, &tx);
        // bring_up acked VHOST_F_LOG_ALL with the rest of the offer: logging is on once
        // the log is there.
        let log = GuestMem::new(4096);
        fe.set_log_base(
            &VhostUserLog {
                mmap_size: (MEM / 4096 / 8) as u64,
                mmap_offset: 0,
            },
            log.fd.as_fd(),
        )
        .unwrap();
        for id in 0..QSIZE {
            rx.offer(&mem, id, 0x1000, true);
        }
        let mut host = UnixStream::connect(uds).unwrap();
        host.set_read_timeout(Some(T)).unwrap();
        host.write_all(b"CONNECT 1234\n").unwrap();
        let req = recv(&mem, &mut rx);
        assert_eq!((req.op, req.dst_port), (OP_REQUEST, 1234));
        let host_port = req.src_port;
        send(&mem, &mut tx, header(1234, host_port, 0, OP_RESPONSE), &[]);
        let mut reader = BufReader::new(host);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert_eq!(line, format!("OK {host_port}\n"));
        OpenSession {
            mem,
            rx,
            tx,
            fe,
            log,
            reader,
            host_port,
        }
    }

    /// Data both ways (a pattern of `round`), and the RX pages in the dirty log
    /// (which it clears first).
    pub fn exchange(&mut self, round: u32) {
        self.log.write_bytes(0, &[0u8; MEM / 4096 / 8]);
        let to_guest: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251 + round) as u8).collect();
        self.reader.get_ref().write_all(&to_guest).unwrap();
        let mut got = Vec::new();
        while got.len() < to_guest.len() {
            let p = recv(&self.mem, &mut self.rx);
            assert_eq!(
                (p.op, p.src_port, p.dst_port),
                (OP_RW, self.host_port, 1234)
            );
            got.extend(p.payload);
        }
        assert_eq!(got, to_guest, "round {round}: host -> guest");
        // The RX buffers' pages have their bits (page p: bit p % 8 of byte p / 8).
        let logged = |page: usize| self.log.read::<u8>(page / 8) & (1 << (page % 8)) != 0;
        let rx_pages = self.rx.buf(0) / 4096..self.rx.buf(QSIZE - 1) / 4096 + 1;
        assert!(
            rx_pages.clone().any(logged),
            "round {round}: no RX page in the dirty log: {:x?}",
            self.log.read_bytes(0, MEM / 4096 / 8)
        );
        let to_host: Vec<u8> = (0..3000u32).map(|i| (i * 13 % 241 + round) as u8).collect();
        send(
            &self.mem,
            &mut self.tx,
            header(1234, self.host_port, to_host.len() as u32, OP_RW),
            &to_host,
        );
        let mut back = vec![0u8; to_host.len()];
        self.reader.read_exact(&mut back).unwrap();
        assert_eq!(back, to_host, "round {round}: guest -> host");
    }
}

/// One simulated guest on a jailed worker: its memory, rings and front-end.
pub struct SimGuest {
    pub mem: GuestMem,
    pub rx: Ring,
    pub tx: Ring,
    pub _fe: Frontend,
}

impl SimGuest {
    pub fn up(socket: &Path) -> SimGuest {
        let mem = GuestMem::new(MEM);
        let mut rx = Ring::new(0x1000);
        let tx = Ring::new(0x20000);
        let mut fe = connect_frontend(socket);
        bring_up(&mut fe, &mem, &rx, &tx);
        for id in 0..QSIZE {
            rx.offer(&mem, id, 0x1000, true);
        }
        SimGuest {
            mem,
            rx,
            tx,
            _fe: fe,
        }
    }

    pub fn send(&mut self, hdr: [u8; HDR], payload: &[u8]) {
        send(&self.mem, &mut self.tx, hdr, payload);
    }

    pub fn recv(&mut self) -> Packet {
        recv(&self.mem, &mut self.rx)
    }

    /// The next packet with `op`, skipping others (what a restarted device may still
    /// deliver of the old connections).
    pub fn recv_op(&mut self, op: u16) -> Packet {
        for _ in 0..64 {
            let p = self.recv();
            if p.op == op {
                return p;
            }
        }
        panic!("no packet with op {op}");
    }
}

/// Open stream connections between a [`SimGuest`] and host sockets: `host_opened`
/// opened by host clients (`CONNECT <port>` on `uds`), `guest_opened` by the guest (to
/// a host listener on `<uds>_6000`). [`OpenConnections::traffic`] moves a byte each way
/// on each.
pub struct OpenConnections {
    /// (guest port, host port, host end)
    conns: Vec<(u32, u32, BufReader<UnixStream>)>,
    _listener: UnixListener,
}

impl OpenConnections {
    pub fn open(guest: &mut SimGuest, uds: &Path, host_opened: u32, guest_opened: u32) -> Self {
        let mut conns = Vec::new();
        for i in 0..host_opened {
            let port = 5000 + i;
            let mut host = UnixStream::connect(uds).unwrap();
            host.set_read_timeout(Some(T)).unwrap();
            host.write_all(format!("CONNECT {port}\n").as_bytes())
                .unwrap();
            let req = guest.recv_op(OP_REQUEST);
            assert_eq!(req.dst_port, port);
            guest.send(header(port, req.src_port, 0, OP_RESPONSE), &[]);
            let mut reader = BufReader::new(host);
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            assert_eq!(line, format!("OK {}\n", req.src_port));
            conns.push((port, req.src_port, reader));
        }
        let path = format!("{}_6000", uds.display());
        let listener = UnixListener::bind(&path).unwrap();
        // A jailed worker connects as another user.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        listener.set_nonblocking(true).unwrap();
        for i in 0..guest_opened {
            let port = 40_000 + i;
            guest.send(header(port, 6000, 0, OP_REQUEST), &[]);
            let deadline = Instant::now() + T;
            let host = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        assert!(Instant::now() < deadline, "guest port {port}: no connect");
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            };
            host.set_nonblocking(false).unwrap();
            host.set_read_timeout(Some(T)).unwrap();
            let resp = guest.recv_op(OP_RESPONSE);
            assert_eq!((resp.src_port, resp.dst_port), (6000, port));
            conns.push((port, 6000, BufReader::new(host)));
        }
        OpenConnections {
            conns,
            _listener: listener,
        }
    }

    /// One byte guest -> host and one back on every connection, checked.
    pub fn traffic(&mut self, guest: &mut SimGuest) {
        for (n, (port, host_port, host)) in self.conns.iter_mut().enumerate() {
            let byte = n as u8;
            guest.send(header(*port, *host_port, 1, OP_RW), &[byte]);
            let mut got = [0u8; 1];
            host.read_exact(&mut got).unwrap();
            assert_eq!(got[0], byte, "guest -> host on guest port {port}");
            host.get_ref().write_all(&[!byte]).unwrap();
            let p = guest.recv_op(OP_RW);
            assert_eq!(
                (p.src_port, p.dst_port, p.payload.as_slice()),
                (*host_port, *port, &[!byte][..]),
                "host -> guest on guest port {port}"
            );
        }
    }
}
