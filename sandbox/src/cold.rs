//! Cold-path framing over the Tube: serde_json, inline in the datagram when small, in a
//! sealed memfd passed along when large.
//!
//! A `SOCK_SEQPACKET` datagram must fit the socket's send buffer (about 200 KiB by
//! default), and device snapshots can be much larger. So a message whose JSON exceeds
//! [`INLINE_MAX`] travels as a memfd: the sender writes it, seals it against writes and
//! resizing, and sends its length with the fd; the receiver checks the seals and the size
//! (bounded by [`MAX_PAYLOAD`]) before it allocates and reads.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use outboard_transport::Tube;
use rustix::fs::{fcntl_add_seals, fcntl_get_seals, fstat, memfd_create, MemfdFlags, SealFlags};
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

/// Largest JSON sent inline in the datagram.
pub const INLINE_MAX: usize = 64 * 1024;
/// Largest JSON accepted from a memfd.
pub const MAX_PAYLOAD: u64 = 256 << 20;

const INLINE: u8 = b'I';
const IN_MEMFD: u8 = b'M';

/// Errors of the cold-path framing.
#[cfg_attr(test, remain::sorted)]
#[derive(Debug, Error)]
pub enum ColdError {
    /// Encoding or decoding the JSON failed.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// The message does not follow the framing.
    #[error("malformed cold message: {0}")]
    Malformed(String),
    /// Creating, writing, sealing or reading the payload memfd failed.
    #[error("payload memfd: {step}: {source}")]
    Memfd {
        /// What was being done.
        step: &'static str,
        /// The OS error.
        source: rustix::io::Errno,
    },
    /// The payload is larger than the receiver accepts ([`MAX_PAYLOAD`] at most).
    #[error("payload of {size} bytes exceeds {max}")]
    TooLarge {
        /// The announced size.
        size: u64,
        /// The bound.
        max: u64,
    },
    /// The Tube failed.
    #[error("tube: {0}")]
    Tube(#[from] outboard_transport::Error),
}

fn memfd_err(step: &'static str) -> impl Fn(rustix::io::Errno) -> ColdError {
    move |source| ColdError::Memfd { step, source }
}

/// Sends `msg` (and `fds`) over `tube`.
pub fn send<T: Serialize + ?Sized>(
    tube: &Tube,
    msg: &T,
    fds: &[BorrowedFd<'_>],
) -> Result<(), ColdError> {
    let json = serde_json::to_vec(msg)?;
    if json.len() <= INLINE_MAX {
        let mut bytes = Vec::with_capacity(json.len() + 1);
        bytes.push(INLINE);
        bytes.extend_from_slice(&json);
        tube.send_bytes(&bytes, fds)?;
        return Ok(());
    }
    let memfd = memfd_create(
        c"outboard-cold",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )
    .map_err(memfd_err("memfd_create"))?;
    let mut rest = &json[..];
    while !rest.is_empty() {
        match rustix::io::write(&memfd, rest) {
            Ok(0) => return Err(memfd_err("write")(rustix::io::Errno::IO)),
            Ok(n) => rest = &rest[n..],
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(memfd_err("write")(e)),
        }
    }
    fcntl_add_seals(
        &memfd,
        SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE | SealFlags::SEAL,
    )
    .map_err(memfd_err("seal"))?;
    let mut header = vec![IN_MEMFD];
    header.extend_from_slice(&(json.len() as u64).to_le_bytes());
    let mut all: Vec<BorrowedFd<'_>> = fds.to_vec();
    all.push(memfd.as_fd());
    tube.send_bytes(&header, &all)?;
    Ok(())
}

/// Receives a message sent with [`send`], and the fds that came with it.
pub fn recv<T: DeserializeOwned>(tube: &Tube) -> Result<(T, Vec<OwnedFd>), ColdError> {
    recv_within(tube, MAX_PAYLOAD)
}

/// [`recv`] of a message whose JSON may be at most `max` bytes (at most [`MAX_PAYLOAD`]):
/// a larger memfd payload is refused as [`ColdError::TooLarge`] before anything is
/// allocated or read. A receiver that expects only small answers passes
/// [`INLINE_MAX`], so that a hostile sender cannot make it allocate and parse
/// [`MAX_PAYLOAD`] bytes.
pub fn recv_within<T: DeserializeOwned>(
    tube: &Tube,
    max: u64,
) -> Result<(T, Vec<OwnedFd>), ColdError> {
    let max = max.min(MAX_PAYLOAD);
    let (bytes, mut fds) = tube.recv_bytes()?;
    match bytes.split_first() {
        Some((&INLINE, json)) => Ok((serde_json::from_slice(json)?, fds)),
        Some((&IN_MEMFD, len)) => {
            let len: [u8; 8] = len
                .try_into()
                .map_err(|_| ColdError::Malformed(format!("length of {} bytes", len.len())))?;
            let size = u64::from_le_bytes(len);
            if size > max {
                return Err(ColdError::TooLarge { size, max });
            }
            let memfd = fds
                .pop()
                .ok_or_else(|| ColdError::Malformed("payload memfd missing".into()))?;
            let seals = fcntl_get_seals(&memfd).map_err(memfd_err("get seals"))?;
            if !seals.contains(SealFlags::SHRINK | SealFlags::WRITE) {
                return Err(ColdError::Malformed(format!(
                    "payload memfd not sealed (seals {seals:?})"
                )));
            }
            let actual = fstat(&memfd).map_err(memfd_err("fstat"))?.st_size;
            if u64::try_from(actual).map_or(true, |a| a < size) {
                return Err(ColdError::Malformed(format!(
                    "payload memfd holds {actual} bytes, {size} announced"
                )));
            }
            // `size` is bounded by `max` <= MAX_PAYLOAD above.
            let mut buf = vec![0u8; size as usize];
            let mut done = 0;
            while done < buf.len() {
                match rustix::io::pread(&memfd, &mut buf[done..], done as u64) {
                    Ok(0) => return Err(ColdError::Malformed("payload memfd too short".into())),
                    Ok(n) => done += n,
                    Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(memfd_err("read")(e)),
                }
            }
            Ok((serde_json::from_slice(&buf)?, fds))
        }
        _ => Err(ColdError::Malformed("unknown framing byte".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_large_messages_round_trip() {
        let (a, b) = Tube::pair().unwrap();
        send(&a, &vec![1u32, 2, 3], &[]).unwrap();
        let (small, fds): (Vec<u32>, _) = recv(&b).unwrap();
        assert_eq!(small, vec![1, 2, 3]);
        assert!(fds.is_empty());
        let big = "x".repeat(3 * INLINE_MAX + 17);
        send(&a, &big, &[a.as_fd()]).unwrap();
        let (got, fds): (String, _) = recv(&b).unwrap();
        assert_eq!(got, big);
        assert_eq!(
            fds.len(),
            1,
            "the payload memfd is not handed to the caller"
        );
    }

    #[test]
    fn bad_framing_is_refused() {
        let (a, b) = Tube::pair().unwrap();
        a.send_bytes(b"Z{}", &[]).unwrap();
        assert!(matches!(recv::<()>(&b), Err(ColdError::Malformed(_))));
        a.send_bytes(b"M\x01\x00\x00\x00\x00\x00\x00\x00", &[])
            .unwrap();
        assert!(matches!(recv::<()>(&b), Err(ColdError::Malformed(_))));
        let mut huge = vec![IN_MEMFD];
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        a.send_bytes(&huge, &[]).unwrap();
        assert!(matches!(recv::<()>(&b), Err(ColdError::TooLarge { .. })));
        // An unsealed memfd could change under the reader: refused.
        let fd = memfd_create(c"x", MemfdFlags::CLOEXEC).unwrap();
        rustix::io::write(&fd, b"1").unwrap();
        let mut msg = vec![IN_MEMFD];
        msg.extend_from_slice(&1u64.to_le_bytes());
        a.send_bytes(&msg, &[fd.as_fd()]).unwrap();
        assert!(matches!(recv::<u32>(&b), Err(ColdError::Malformed(_))));
    }
}
