//! Parses and validates one vhost-user message the way a back-end must: header first,
//! then the request's rules (body size; a transport also checks the attached fds against
//! `rules().fds`), then the body's own `Validate` check.
//! A well-formed `SET_VRING_ADDR` is accepted; the same message with a misaligned
//! descriptor table, and one with an unknown header flag, are refused.
//!
//! Run it with `cargo run -p outboard-protocol --example vhost_user_message`.

use outboard_protocol::vhost_user::{FrontendReq, Header, VhostUserVringAddr};
use outboard_protocol::{parse, read_prefix, ProtocolError, Validate};
use zerocopy::IntoBytes;

/// Checks `wire` (one message as read from the socket) and returns the request and its
/// vring addresses.
fn receive(wire: &[u8]) -> Result<(FrontendReq, VhostUserVringAddr), ProtocolError> {
    let (header, body) = read_prefix::<Header>(wire, "header")?;
    header.validate()?;
    let request = FrontendReq::from_code(header.request)?;
    request.rules().body.check(request.name(), body.len())?;
    let addr: VhostUserVringAddr = parse(body, "vring address")?;
    Ok((request, addr))
}

/// A front-end's `SET_VRING_ADDR` for ring 0: header and 40-byte body.
fn message(header_flags: u32, descriptor: u64) -> Vec<u8> {
    let addr = VhostUserVringAddr {
        index: 0,
        flags: 0,
        descriptor,
        used: 0x7f00_0000_3000,
        available: 0x7f00_0000_2000,
        log: 0,
    };
    let mut header = Header::request(
        FrontendReq::SET_VRING_ADDR.code(),
        addr.as_bytes().len() as u32,
        false,
    );
    header.flags |= header_flags;
    let mut wire = header.as_bytes().to_vec();
    wire.extend_from_slice(addr.as_bytes());
    wire
}

fn main() -> Result<(), ProtocolError> {
    let (request, addr) = receive(&message(0, 0x7f00_0000_1000))?;
    println!(
        "accepted {request}: ring {} desc {:#x} avail {:#x} used {:#x}",
        addr.index, addr.descriptor, addr.available, addr.used
    );
    for (what, wire) in [
        ("misaligned descriptor table", message(0, 0x7f00_0000_1008)),
        ("reserved header flag", message(1 << 7, 0x7f00_0000_1000)),
    ] {
        match receive(&wire) {
            Ok(_) => {
                eprintln!("{what}: accepted, but should have been refused");
                std::process::exit(1);
            }
            Err(e) => println!("refused ({what}): {e}"),
        }
    }
    Ok(())
}
