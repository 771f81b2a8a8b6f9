//! A vhost-user front-end talking to a back-end over a socketpair.
//!
//! The back-end is a small `VhostUserBackendReqHandler` (two queues, four bytes of
//! config space) served by `BackendReqHandler` on its own thread; the front-end is
//! `Frontend`. They negotiate features as QEMU does, set up a ring, read the config
//! space, and the back-end refuses a request for a ring the device does not have.
//!
//! Run it with `cargo run -p outboard-transport --example socketpair`.

use std::io;
use std::os::fd::OwnedFd;
use std::thread;

use outboard_protocol::vhost_user::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures, VhostUserVringAddr,
};
use outboard_protocol::virtio::VIRTIO_F_VERSION_1;
use outboard_transport::{
    BackendReqHandler, Connection, Frontend, HandlerResult, MemoryRegion,
    VhostUserBackendReqHandler,
};

/// A device with two queues that prints every request it is given.
struct Device {
    config: [u8; 4],
}

impl VhostUserBackendReqHandler for Device {
    fn max_queues(&self) -> u32 {
        2
    }
    fn get_features(&mut self) -> HandlerResult<u64> {
        Ok(VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
    }
    fn set_features(&mut self, features: u64) -> HandlerResult<()> {
        println!("back-end: SET_FEATURES {features:#x}");
        Ok(())
    }
    fn get_protocol_features(&mut self) -> HandlerResult<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG)
    }
    fn set_owner(&mut self) -> HandlerResult<()> {
        println!("back-end: SET_OWNER");
        Ok(())
    }
    fn set_mem_table(&mut self, regions: Vec<MemoryRegion>) -> HandlerResult<()> {
        println!("back-end: SET_MEM_TABLE with {} regions", regions.len());
        Ok(())
    }
    fn set_vring_num(&mut self, index: u32, num: u32) -> HandlerResult<()> {
        println!("back-end: SET_VRING_NUM ring {index} size {num}");
        Ok(())
    }
    fn set_vring_addr(&mut self, addr: &VhostUserVringAddr) -> HandlerResult<()> {
        println!(
            "back-end: SET_VRING_ADDR ring {} desc {:#x}",
            addr.index, addr.descriptor
        );
        Ok(())
    }
    fn set_vring_base(&mut self, index: u32, base: u32) -> HandlerResult<()> {
        println!("back-end: SET_VRING_BASE ring {index} base {base}");
        Ok(())
    }
    fn get_vring_base(&mut self, _index: u32) -> HandlerResult<u32> {
        Ok(0)
    }
    fn set_vring_kick(&mut self, _index: u32, _fd: Option<OwnedFd>) -> HandlerResult<()> {
        Ok(())
    }
    fn set_vring_call(&mut self, _index: u32, _fd: Option<OwnedFd>) -> HandlerResult<()> {
        Ok(())
    }
    fn set_vring_enable(&mut self, _index: u32, _enable: bool) -> HandlerResult<()> {
        Ok(())
    }
    fn get_config(&mut self, offset: u32, size: u32, _flags: u32) -> HandlerResult<Vec<u8>> {
        let start = offset as usize;
        self.config
            .get(start..start.saturating_add(size as usize))
            .map(<[u8]>::to_vec)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (fe_conn, be_conn) = Connection::pair()?;
    let backend = thread::spawn(move || {
        let mut server = BackendReqHandler::new(be_conn, Device { config: *b"obrd" });
        // Serves until the front-end hangs up.
        server.run()
    });

    let mut fe = Frontend::new(fe_conn);
    let features = fe.get_features()?;
    let protocol = fe.get_protocol_features()?;
    fe.set_protocol_features(protocol)?;
    fe.set_owner()?;
    fe.set_features(features)?;
    println!(
        "front-end: features {features:#x}, protocol features {:#x}, {} queues",
        protocol.bits(),
        fe.get_queue_num()?
    );
    fe.set_vring_num(0, 256)?;
    fe.set_vring_addr(&VhostUserVringAddr {
        index: 0,
        flags: 0,
        descriptor: 0x1000,
        used: 0x3000,
        available: 0x2000,
        log: 0,
    })?;
    fe.set_vring_base(0, 0)?;
    let config = fe.get_config(0, 4, VhostUserConfigFlags::Frontend)?;
    println!(
        "front-end: config space {:?}",
        String::from_utf8_lossy(&config)
    );
    // Ring 5 does not exist: the back-end refuses it and, with REPLY_ACK, says so.
    match fe.set_vring_num(5, 256) {
        Ok(()) => return Err("the back-end accepted a ring it does not have".into()),
        Err(e) => println!("front-end: SET_VRING_NUM ring 5 refused: {e}"),
    }

    drop(fe);
    backend
        .join()
        .map_err(|_| "the back-end thread panicked")??;
    println!("front-end: done, the back-end ended cleanly");
    Ok(())
}
