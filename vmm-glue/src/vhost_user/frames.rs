//! Frames between two outboard processes (a live upgrade, `crate::upgrade`) and between
//! the daemon and a jailed worker it asks to hand over (`super::handover`): a `u8`
//! kind, a `u64` body length, a `u32` fd count (little-endian), the body, then the fds
//! in messages of one byte each carrying up to 32 fds (`SCM_RIGHTS`). A frame over
//! [`MAX_BODY`] bytes or [`MAX_FDS`] fds is refused before anything is allocated.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;

use outboard_transport::sock::{recv_with_fds, send_with_fds, MAX_FDS_PER_MSG};

/// Largest frame body (a record with every connection's unsent bytes).
pub(crate) const MAX_BODY: u64 = 1 << 31;
/// Most fds in one frame.
pub(crate) const MAX_FDS: u32 = 1 << 20;

/// Upgrade conversation: new -> old.
pub(crate) const HELLO: u8 = 1;
/// Upgrade conversation: old -> new, every VM's state.
pub(crate) const STATE: u8 = 2;
/// Upgrade conversation: new -> old, set up, take it.
pub(crate) const ACCEPT: u8 = 3;
/// Either side: no, with the reason.
pub(crate) const REFUSE: u8 = 4;
/// Upgrade conversation: old -> new, let go.
pub(crate) const DONE: u8 = 5;
/// Daemon -> jailed worker: pause for a handover (body: `u64` request number).
pub(crate) const PAUSE: u8 = 10;
/// Jailed worker -> daemon: `u64` request number, `bool` ok, then the worker record
/// (its fds follow) or the reason it cannot.
pub(crate) const PARCEL: u8 = 11;
/// Daemon -> jailed worker: `u64` request number, `bool` commit (else resume).
pub(crate) const DECISION: u8 = 12;
/// Jailed worker -> daemon: `u64` request number: it let go of everything.
pub(crate) const LET_GO: u8 = 13;

pub(crate) fn kind_name(kind: u8) -> &'static str {
    match kind {
        HELLO => "HELLO",
        STATE => "STATE",
        ACCEPT => "ACCEPT",
        REFUSE => "REFUSE",
        DONE => "DONE",
        PAUSE => "PAUSE",
        PARCEL => "PARCEL",
        DECISION => "DECISION",
        LET_GO => "LET_GO",
        _ => "an unknown frame",
    }
}

pub(crate) fn send_frame(
    sock: &UnixStream,
    kind: u8,
    body: &[u8],
    fds: &[OwnedFd],
) -> Result<(), String> {
    let e = |e: std::io::Error| format!("sending {}: {e}", kind_name(kind));
    let mut head = [0u8; 13];
    head[0] = kind;
    head[1..9].copy_from_slice(&(body.len() as u64).to_le_bytes());
    let nfds = u32::try_from(fds.len()).map_err(|_| format!("{} fds", fds.len()))?;
    head[9..13].copy_from_slice(&nfds.to_le_bytes());
    let mut w = sock;
    w.write_all(&head).map_err(e)?;
    w.write_all(body).map_err(e)?;
    for chunk in fds.chunks(MAX_FDS_PER_MSG) {
        let borrowed: Vec<_> = chunk.iter().map(AsFd::as_fd).collect();
        let n = send_with_fds(sock, &[std::io::IoSlice::new(&[0u8])], &borrowed)
            .map_err(|err| format!("sending the fds of {}: {err}", kind_name(kind)))?;
        if n != 1 {
            return Err(format!(
                "sending the fds of {}: short write",
                kind_name(kind)
            ));
        }
    }
    Ok(())
}

/// A received frame.
pub(crate) struct Frame {
    pub kind: u8,
    pub body: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

pub(crate) fn recv_frame(sock: &UnixStream) -> Result<Frame, String> {
    let mut head = [0u8; 13];
    let mut r = sock;
    r.read_exact(&mut head).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => "the other process closed the connection".into(),
        _ => format!("receiving a frame: {e}"),
    })?;
    let kind = head[0];
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&head[1..9]);
    let len = u64::from_le_bytes(len8);
    let mut n4 = [0u8; 4];
    n4.copy_from_slice(&head[9..13]);
    let nfds = u32::from_le_bytes(n4);
    if len > MAX_BODY || nfds > MAX_FDS {
        return Err(format!(
            "{} of {len} bytes with {nfds} fds is beyond the limits ({MAX_BODY} bytes, \
             {MAX_FDS} fds)",
            kind_name(kind)
        ));
    }
    // Grown as the bytes come, so a header that claims more than follows costs
    // nothing.
    let mut body = Vec::new();
    r.take(len)
        .read_to_end(&mut body)
        .map_err(|e| format!("receiving the body of {}: {e}", kind_name(kind)))?;
    if body.len() as u64 != len {
        return Err(format!(
            "{} ended after {} of {len} bytes",
            kind_name(kind),
            body.len()
        ));
    }
    let mut fds = Vec::with_capacity(nfds as usize);
    while fds.len() < nfds as usize {
        let mut b = [0u8; 1];
        let want = (nfds as usize - fds.len()).min(MAX_FDS_PER_MSG);
        let got = recv_with_fds(sock, &mut [std::io::IoSliceMut::new(&mut b)], want)
            .map_err(|e| format!("receiving the fds of {}: {e}", kind_name(kind)))?;
        if got.bytes != 1 || got.fds.is_empty() {
            return Err(format!(
                "receiving the fds of {}: {} of {nfds} came",
                kind_name(kind),
                fds.len()
            ));
        }
        fds.extend(got.fds);
    }
    Ok(Frame { kind, body, fds })
}
