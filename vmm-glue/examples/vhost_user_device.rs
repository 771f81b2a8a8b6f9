//! A virtio device served over vhost-user by outboard-vmm-glue's daemon.
//!
//! `Upper` is a whole device in about 30 lines: one queue, and for each chain it writes
//! the upper-case copy of the readable part into the writable part. Handing it to
//! `outboard_vmm_glue::vhost_user::daemon::serve` makes it a vhost-user back-end that QEMU
//! could drive (`-chardev socket,path=...`). To show it working without a VMM, the
//! example then plays the front-end itself with outboard-transport's `Frontend`: it
//! shares guest memory (a file, mapped with vm-memory), sets up the ring, kicks one
//! chain in, waits for the call eventfd and reads the answer. Runs unprivileged.
//!
//! Run it with `cargo run -p outboard-vmm-glue --example vhost_user_device`.

use std::error::Error;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outboard_devices::virtio::{
    read_regions, write_regions, ActivateError, DescChain, Interrupt, VirtQueue, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use outboard_protocol::vhost_user::{
    VhostUserConfigFlags, VhostUserMemoryRegion, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures, VhostUserVringAddr,
};
use outboard_transport::{Frontend, MemoryRegionRef};
use outboard_vmm_glue::vhost_user::daemon;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// The device: upper-cases what the driver sends.
#[derive(Default)]
struct Upper {
    queues: Vec<Box<dyn VirtQueue>>,
    irq: Option<Arc<dyn Interrupt>>,
}

impl VirtioDevice for Upper {
    fn device_type(&self) -> u32 {
        42 // an example: not a registered virtio device id
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn ack_features(&mut self, _features: u64) {}
    // A config space of 5 bytes: the daemon offers VHOST_USER_PROTOCOL_F_CONFIG only
    // to a device whose config_size is not 0.
    fn config_size(&self) -> usize {
        5
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = b"UPPER";
        for (i, b) in data.iter_mut().enumerate() {
            *b = config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &mut self,
        queues: Vec<Box<dyn VirtQueue>>,
        irq: Arc<dyn Interrupt>,
    ) -> Result<(), ActivateError> {
        (self.queues, self.irq) = (queues, Some(irq));
        Ok(())
    }
    fn reset(&mut self) {
        (self.queues, self.irq) = (Vec::new(), None);
    }
    fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
    fn handle_queue(&mut self, queue: usize) {
        let (Some(q), Some(irq)) = (self.queues.get_mut(queue), &self.irq) else {
            return;
        };
        let (mut chain, mut used) = (DescChain::default(), false);
        while let Ok(true) = q.pop(&mut chain) {
            let mut buf = vec![0u8; chain.readable_len().min(4096)];
            let n = read_regions(&chain.readable, 0, &mut buf);
            buf[..n].make_ascii_uppercase();
            let written = write_regions(&chain.writable, 0, &buf[..n]);
            used |= q.add_used(chain.head, written as u32).is_ok();
        }
        if used {
            irq.signal_used_queue(queue);
        }
    }
    fn handle_event(&mut self) {}
}

/// vmm-sys-util's `EventFd` has no `AsFd`: borrow its fd for as long as it lives.
fn borrow(e: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the fd stays open while `e` is borrowed.
    unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) }
}

/// Where the example front-end's guest memory is, in guest-physical and in its own
/// (user virtual) addresses; rings are given to the back-end in the latter.
const MEM_SIZE: u64 = 0x10000;
const UVA: u64 = 0x7f00_0000_0000;

fn main() -> Result<(), Box<dyn Error>> {
    let dir = std::env::temp_dir().join(format!("outboard-vu-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(dir: &std::path::Path) -> Result<(), Box<dyn Error>> {
    // The back-end: serve `Upper` on a Unix socket until `stop` is signalled.
    let path = dir.join("upper.sock");
    let listener = UnixListener::bind(&path)?;
    let stop = EventFd::new(libc::EFD_NONBLOCK)?;
    let worker_stop = stop.try_clone()?;
    let worker = std::thread::spawn(move || {
        daemon::serve(Upper::default(), listener, 256, &worker_stop, "upper")
    });

    // The front-end: guest memory in a file it shares with the back-end.
    let file_path = dir.join("guest-mem");
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&file_path)?;
    std::fs::remove_file(&file_path)?;
    file.set_len(MEM_SIZE)?;
    let fd = file.try_clone()?;
    let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
        GuestAddress(0),
        MEM_SIZE as usize,
        Some(FileOffset::new(file, 0)),
    )])?;
    let kick = EventFd::new(libc::EFD_NONBLOCK)?;
    let call = EventFd::new(libc::EFD_NONBLOCK)?;

    let mut fe = Frontend::connect(&path)?;
    let offered = fe.get_features()?;
    let protocol = fe.get_protocol_features()?;
    fe.set_protocol_features(
        protocol & (VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIG),
    )?;
    fe.set_owner()?;
    fe.set_features(
        offered & (VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()),
    )?;
    let config = fe.get_config(0, 5, VhostUserConfigFlags::Frontend)?;
    println!(
        "front-end: device config space {:?}",
        String::from_utf8_lossy(&config)
    );
    fe.set_mem_table(&[MemoryRegionRef {
        region: VhostUserMemoryRegion::new(0, MEM_SIZE, UVA, 0),
        fd: fd.as_fd(),
    }])?;
    // Ring 0: descriptors at 0x1000, available ring at 0x2000, used ring at 0x3000.
    fe.set_vring_num(0, 16)?;
    fe.set_vring_addr(&VhostUserVringAddr {
        index: 0,
        flags: 0,
        descriptor: UVA + 0x1000,
        used: UVA + 0x3000,
        available: UVA + 0x2000,
        log: 0,
    })?;
    fe.set_vring_base(0, 0)?;
    fe.set_vring_call(0, Some(borrow(&call)))?;
    fe.set_vring_kick(0, Some(borrow(&kick)))?;
    fe.set_vring_enable(0, true)?;

    // One chain: "hello, vhost-user" (readable, descriptor 0) then 64 writable bytes.
    let msg = b"hello, vhost-user";
    mem.write_slice(msg, GuestAddress(0x8000))?;
    for (i, (addr, len, flags, next)) in [
        (0x8000u64, msg.len() as u32, 1u16, 1u16),
        (0x9000, 64, 2, 0),
    ]
    .into_iter()
    .enumerate()
    {
        let d = 0x1000 + 16 * i as u64;
        mem.write_obj(addr, GuestAddress(d))?;
        mem.write_obj(len, GuestAddress(d + 8))?;
        mem.write_obj(flags, GuestAddress(d + 12))?;
        mem.write_obj(next, GuestAddress(d + 14))?;
    }
    mem.write_obj(0u16, GuestAddress(0x2004))?; // avail ring[0] = descriptor 0
    mem.write_obj(1u16, GuestAddress(0x2002))?; // avail idx = 1
    kick.write(1)?;

    // The device signals the call eventfd once it has used the chain.
    let deadline = Instant::now() + Duration::from_secs(5);
    while call.read().is_err() {
        if Instant::now() >= deadline {
            return Err("the back-end did not signal the call eventfd".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    if mem.read_obj::<u16>(GuestAddress(0x3002))? != 1 {
        return Err("the call eventfd was signalled but the used ring did not move".into());
    }
    let used_len: u32 = mem.read_obj(GuestAddress(0x3008))?;
    let mut answer = vec![0u8; used_len as usize];
    mem.read_slice(&mut answer, GuestAddress(0x9000))?;
    println!(
        "front-end: the device answered {:?}",
        String::from_utf8_lossy(&answer)
    );
    if answer != msg.to_ascii_uppercase() {
        return Err("unexpected answer".into());
    }

    drop(fe);
    stop.write(1)?;
    worker.join().map_err(|_| "the daemon thread panicked")??;
    println!("vhost-user: served one chain, the daemon stopped cleanly");
    Ok(())
}
