//! Fd leak check over the public API: hostile messages with fds attached, sent at the
//! back-end server, the front-end's back-end channel handler and a Tube (with feature
//! `tube`). The number of open fds of the process (/proc/self/fd) must be the same before and after.
//!
//! This binary holds a single test so that no other test opens fds meanwhile.

// Test code: a failed setup step should panic with its error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::IoSlice;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use outboard_protocol::vhost_user::*;
#[cfg(feature = "tube")]
use outboard_transport::Tube;
use outboard_transport::{
    sock, BackendReqHandler, Connection, Error, FrontendReqHandler, HandlerResult, MemoryRegion,
    VhostUserBackendReqHandler, VhostUserFrontendReqHandler,
};
use zerocopy::IntoBytes;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn memfd() -> OwnedFd {
    rustix::fs::memfd_create("leak", rustix::fs::MemfdFlags::CLOEXEC).unwrap()
}

struct Device;

impl VhostUserBackendReqHandler for Device {
    fn max_queues(&self) -> u32 {
        1
    }
    fn get_features(&mut self) -> HandlerResult<u64> {
        Ok(1 << 30)
    }
    fn set_features(&mut self, _: u64) -> HandlerResult<()> {
        Ok(())
    }
    fn get_protocol_features(&mut self) -> HandlerResult<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::all())
    }
    fn set_mem_table(&mut self, _: Vec<MemoryRegion>) -> HandlerResult<()> {
        // Refuse after taking ownership: the fds must still be closed.
        Err(std::io::Error::from_raw_os_error(libc::EINVAL))
    }
    fn set_vring_num(&mut self, _: u32, _: u32) -> HandlerResult<()> {
        Ok(())
    }
    fn set_vring_addr(&mut self, _: &VhostUserVringAddr) -> HandlerResult<()> {
        Ok(())
    }
    fn set_vring_base(&mut self, _: u32, _: u32) -> HandlerResult<()> {
        Ok(())
    }
    fn get_vring_base(&mut self, _: u32) -> HandlerResult<u32> {
        Ok(0)
    }
    fn set_vring_kick(&mut self, _: u32, _: Option<OwnedFd>) -> HandlerResult<()> {
        Ok(())
    }
    fn set_vring_call(&mut self, _: u32, _: Option<OwnedFd>) -> HandlerResult<()> {
        Ok(())
    }
    fn set_vring_enable(&mut self, _: u32, _: bool) -> HandlerResult<()> {
        Ok(())
    }
}

struct Vmm;
impl VhostUserFrontendReqHandler for Vmm {}

fn send(conn: &Connection, header: Header, body: &[u8], fds: &[BorrowedFd<'_>]) {
    let iov = [IoSlice::new(header.as_bytes()), IoSlice::new(body)];
    sock::send_with_fds(conn.socket(), &iov, fds).unwrap();
}

fn expect_err(
    raw: &Connection,
    h: &mut BackendReqHandler<Device>,
    hdr: Header,
    body: &[u8],
    fds: &[BorrowedFd<'_>],
) {
    send(raw, hdr, body, fds);
    let e = h.handle_request().unwrap_err();
    assert!(!e.is_fatal(), "{e}");
}

fn req(code: FrontendReq, size: usize, need_reply: bool) -> Header {
    Header::request(code.code(), size as u32, need_reply)
}

#[test]
fn hostile_input_leaks_no_fds() {
    let before = open_fds();
    {
        let fds: Vec<OwnedFd> = (0..8).map(|_| memfd()).collect();
        let b: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
        let (raw, be) = Connection::pair().unwrap();
        let mut h = BackendReqHandler::new(be, Device);
        // Before SET_OWNER, with fds.
        expect_err(
            &raw,
            &mut h,
            req(FrontendReq::SET_VRING_CALL, 8, false),
            &0u64.to_ne_bytes(),
            &b[..1],
        );
        // Wrong version, unknown code, REPLY flag: all with fds.
        expect_err(
            &raw,
            &mut h,
            Header {
                request: 3,
                flags: 2,
                size: 0,
            },
            &[],
            &b[..3],
        );
        expect_err(&raw, &mut h, Header::request(77, 0, false), &[], &b[..8]);
        expect_err(&raw, &mut h, Header::reply(3, 0), &[], &b[..2]);
        send(&raw, req(FrontendReq::SET_OWNER, 0, false), &[], &[]);
        h.handle_request().unwrap();
        send(&raw, req(FrontendReq::GET_FEATURES, 0, false), &[], &[]);
        h.handle_request().unwrap();
        raw.recv().unwrap();
        let all = VhostUserProtocolFeatures::all().bits().to_ne_bytes();
        send(
            &raw,
            req(FrontendReq::SET_PROTOCOL_FEATURES, 8, false),
            &all,
            &[],
        );
        h.handle_request().unwrap();
        // Too many fds for a request that takes one.
        expect_err(
            &raw,
            &mut h,
            req(FrontendReq::SET_VRING_KICK, 8, false),
            &0u64.to_ne_bytes(),
            &b[..4],
        );
        // A memory table whose fds do not match its regions, and one the device refuses.
        let mut table = VhostUserMemory::new(2).as_bytes().to_vec();
        table.extend_from_slice(VhostUserMemoryRegion::new(0, 0x1000, 0, 0).as_bytes());
        table.extend_from_slice(VhostUserMemoryRegion::new(0x1000, 0x1000, 0, 0).as_bytes());
        expect_err(
            &raw,
            &mut h,
            req(FrontendReq::SET_MEM_TABLE, table.len(), false),
            &table,
            &b[..5],
        );
        expect_err(
            &raw,
            &mut h,
            req(FrontendReq::SET_MEM_TABLE, table.len(), true),
            &table,
            &b[..2],
        );
        raw.recv().unwrap(); // the REPLY_ACK failure status
                             // A back-end channel fd that is not a socket.
        expect_err(
            &raw,
            &mut h,
            req(FrontendReq::SET_BACKEND_REQ_FD, 0, false),
            &[],
            &b[..1],
        );
        // Oversized: fatal, fds closed all the same.
        send(&raw, Header::request(1, 1 << 20, false), &[], &b[..8]);
        assert!(matches!(
            h.handle_request(),
            Err(Error::OversizedMessage { .. })
        ));

        // The front-end's back-end channel handler.
        let (raw, fe) = Connection::pair().unwrap();
        let mut ch = FrontendReqHandler::from_connection(fe, Vmm, VhostUserProtocolFeatures::all());
        let map = VhostUserMMap::new(0, 0, 0, 0x1000, VhostUserMMapFlags::empty());
        for (code, n) in [
            (BackendReq::SHMEM_UNMAP, 3),
            (BackendReq::SHMEM_MAP, 2),
            (BackendReq::SHMEM_MAP, 1),
        ] {
            send(
                &raw,
                Header::request(code.code(), 40, false),
                map.as_bytes(),
                &b[..n],
            );
            assert!(ch.handle_request().is_err());
        }
        let mut ch2 = FrontendReqHandler::new(Vmm, VhostUserProtocolFeatures::all()).unwrap();
        let _unused_end = ch2.take_backend_fd();
        drop(ch2);

        // Tube refusals.
        #[cfg(feature = "tube")]
        {
            let (a, mut t) = Tube::pair().unwrap();
            t.set_max_fds(2);
            a.send_with_fds(&1u8, &b[..8]).unwrap();
            assert!(t.recv_with_fds::<u8>().is_err());
            a.send_with_fds(&1u8, &b[..2]).unwrap();
            assert!(t.recv::<u8>().is_err());
            t.set_max_message_size(4);
            a.send_with_fds(&"too long", &b[..1]).unwrap();
            assert!(t.recv_with_fds::<String>().is_err());
        }
    }
    assert_eq!(open_fds(), before, "fds leaked");
}
