//! Decodes a few real messages with outboard-protocol and prints what a receiver sees:
//! `cargo run -p outboard-protocol --example decode`.

use outboard_protocol::vhost_user::{parse_mem_table, FrontendReq, Header};
use outboard_protocol::vsock::VsockHeader;
use outboard_protocol::{parse, read_prefix, Validate};

fn main() -> Result<(), outboard_protocol::ProtocolError> {
    // QEMU's GET_FEATURES request.
    let msg = [1u8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
    let (hdr, _) = read_prefix::<Header>(&msg, "header")?;
    hdr.validate()?;
    println!(
        "vhost-user: {} size={}",
        FrontendReq::from_code(hdr.request)?,
        hdr.size
    );

    // A hostile SET_MEM_TABLE that claims nine regions.
    let mut body = vec![9u8, 0, 0, 0, 0, 0, 0, 0];
    body.extend_from_slice(&[0u8; 32]);
    match parse_mem_table(&body) {
        Ok(_) => println!("accepted?!"),
        Err(e) => println!("vhost-user: SET_MEM_TABLE refused: {e}"),
    }

    // A guest's vsock connection request to host port 1234.
    let mut pkt = Vec::new();
    pkt.extend_from_slice(&3u64.to_le_bytes());
    pkt.extend_from_slice(&2u64.to_le_bytes());
    pkt.extend_from_slice(&49152u32.to_le_bytes());
    pkt.extend_from_slice(&1234u32.to_le_bytes());
    pkt.extend_from_slice(&0u32.to_le_bytes());
    pkt.extend_from_slice(&1u16.to_le_bytes());
    pkt.extend_from_slice(&1u16.to_le_bytes());
    pkt.extend_from_slice(&[0u8; 12]);
    let vsock: VsockHeader = parse(&pkt, "vsock header")?;
    println!(
        "vsock: {:?} {:?} {}:{} -> {}:{}",
        vsock.op()?,
        vsock.socket_type()?,
        { vsock.src_cid },
        { vsock.src_port },
        { vsock.dst_cid },
        { vsock.dst_port }
    );
    Ok(())
}
