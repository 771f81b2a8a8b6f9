//! Sending and receiving bytes with file descriptors (`SCM_RIGHTS`) over Unix sockets.
//!
//! These functions work on any `AF_UNIX` socket, stream or `SOCK_SEQPACKET`, given as
//! anything that implements [`AsFd`]. File descriptors go out as [`BorrowedFd`]s and
//! come in as [`OwnedFd`]s, never as bare integers, so an fd is closed exactly once
//! whatever happens:
//!
//! - every receive uses `MSG_CMSG_CLOEXEC`, so received fds never leak into a child;
//! - the control buffer is sized for the caller's bound on fds per message; if the peer
//!   sent more, the kernel truncates the control data (`MSG_CTRUNC`), the fds that did
//!   arrive are closed, and the receive fails with [`Error::TruncatedControl`];
//! - a datagram larger than the buffer (`MSG_TRUNC`) fails with
//!   [`Error::RecvBufferTooSmall`];
//! - `EINTR` is retried, sends use `MSG_NOSIGNAL` (a closed peer is an `EPIPE` error,
//!   not a signal), and end of file is [`Error::Disconnect`].

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::io::Errno;
use rustix::net::{
    recvmsg, sendmsg, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags,
    ReturnFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};

use crate::error::{Error, Result};

/// The largest number of fds any receive in this crate accepts in one message.
///
/// Callers pass their own, usually smaller, bound (vhost-user allows
/// [`MAX_ATTACHED_FDS`](outboard_protocol::vhost_user::MAX_ATTACHED_FDS)).
pub const MAX_FDS_PER_MSG: usize = 32;

const CMSG_BUF_LEN: usize = rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MSG));

fn retry_eintr<T>(mut f: impl FnMut() -> rustix::io::Result<T>) -> rustix::io::Result<T> {
    loop {
        match f() {
            Err(Errno::INTR) => continue,
            other => return other,
        }
    }
}

/// Sends one `sendmsg()` worth of data with `fds` attached to its first byte.
///
/// Returns the number of bytes sent, which on a stream socket may be less than the
/// total (the fds went with the first byte). Sending fds with no data is refused.
pub fn send_with_fds(
    sock: impl AsFd,
    iov: &[IoSlice<'_>],
    fds: &[BorrowedFd<'_>],
) -> Result<usize> {
    if fds.len() > MAX_FDS_PER_MSG {
        return Err(Error::InvalidParam(format!(
            "{} fds in one message, at most {MAX_FDS_PER_MSG}",
            fds.len()
        )));
    }
    let total: usize = iov.iter().map(|s| s.len()).sum();
    if total == 0 && !fds.is_empty() {
        return Err(Error::InvalidParam(
            "file descriptors need at least one byte of data to ride on".into(),
        ));
    }
    let mut space = [MaybeUninit::<u8>::uninit(); CMSG_BUF_LEN];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(Error::InvalidParam(format!(
            "{} fds do not fit the control buffer",
            fds.len()
        )));
    }
    let sock = sock.as_fd();
    Ok(retry_eintr(|| {
        sendmsg(sock, iov, &mut control, SendFlags::NOSIGNAL)
    })?)
}

/// Sends all of `bufs` (concatenated) with `fds` attached to the first byte, looping over
/// short writes on a stream socket.
pub fn send_all_with_fds(sock: impl AsFd, bufs: &[&[u8]], fds: &[BorrowedFd<'_>]) -> Result<()> {
    let sock = sock.as_fd();
    let want: usize = bufs.iter().map(|b| b.len()).sum();
    let mut done = 0usize;
    let mut fds = fds;
    while done < want || !fds.is_empty() {
        // Build the iovec of what is left.
        let mut skip = done;
        let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(bufs.len());
        for b in bufs {
            if skip >= b.len() {
                skip -= b.len();
                continue;
            }
            iov.push(IoSlice::new(&b[skip..]));
            skip = 0;
        }
        let n = send_with_fds(sock, &iov, fds)?;
        if n == 0 {
            return Err(Error::PartialMessage { done, want });
        }
        fds = &[];
        done += n;
    }
    Ok(())
}

/// What one receive returned.
#[derive(Debug)]
pub struct Received {
    /// Bytes received.
    pub bytes: usize,
    /// File descriptors received with them (close-on-exec).
    pub fds: Vec<OwnedFd>,
}

/// Receives once into `iov`, accepting at most `max_fds` fds.
///
/// Returns [`Error::Disconnect`] when the peer closed the socket (zero bytes where the
/// buffers had room), [`Error::TruncatedControl`] when the peer attached more than
/// `max_fds` fds (all received fds are closed), and [`Error::RecvBufferTooSmall`] when a
/// datagram did not fit (`MSG_TRUNC`, `SOCK_SEQPACKET` only; `want` is then the part
/// of the datagram the kernel reports; the `Tube` of feature `tube` learns the full size).
pub fn recv_with_fds(
    sock: impl AsFd,
    iov: &mut [IoSliceMut<'_>],
    max_fds: usize,
) -> Result<Received> {
    recv_with_fds_flags(sock.as_fd(), iov, max_fds, RecvFlags::empty())
}

pub(crate) fn recv_with_fds_flags(
    sock: BorrowedFd<'_>,
    iov: &mut [IoSliceMut<'_>],
    max_fds: usize,
    extra: RecvFlags,
) -> Result<Received> {
    let max_fds = max_fds.min(MAX_FDS_PER_MSG);
    let room: usize = iov.iter().map(|s| s.len()).sum();
    let mut space = [MaybeUninit::<u8>::uninit(); CMSG_BUF_LEN];
    let control_len = if max_fds == 0 {
        0
    } else {
        rustix::cmsg_space!(ScmRights(max_fds)).min(CMSG_BUF_LEN)
    };
    let mut control = RecvAncillaryBuffer::new(&mut space[..control_len]);
    let msg = retry_eintr(|| recvmsg(sock, iov, &mut control, RecvFlags::CMSG_CLOEXEC | extra))?;
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = m {
            fds.extend(rights);
        }
        // Other control messages (credentials) own nothing and are ignored.
    }
    if msg.flags.contains(ReturnFlags::CTRUNC) {
        drop(fds);
        return Err(Error::TruncatedControl { max_fds });
    }
    if fds.len() > max_fds {
        // CMSG_SPACE rounding can leave room for a few more than asked for.
        drop(fds);
        return Err(Error::TruncatedControl { max_fds });
    }
    if msg.flags.contains(ReturnFlags::TRUNC) {
        return Err(Error::RecvBufferTooSmall {
            got: room,
            want: msg.bytes,
        });
    }
    if msg.bytes == 0 && room > 0 {
        return Err(Error::Disconnect);
    }
    Ok(Received {
        bytes: msg.bytes,
        fds,
    })
}

/// Receives exactly `buf.len()` bytes from a stream socket, accepting at most `max_fds`
/// fds on the first chunk.
///
/// A peer close before the first byte is [`Error::Disconnect`]; a close in the middle is
/// [`Error::PartialMessage`]. Fds arriving after the first chunk do not belong to this
/// message: they are closed and the receive fails with [`Error::IncorrectFds`].
pub fn recv_exact_with_fds(
    sock: impl AsFd,
    buf: &mut [u8],
    max_fds: usize,
) -> Result<Vec<OwnedFd>> {
    let sock = sock.as_fd();
    let want = buf.len();
    let mut done = 0usize;
    let mut fds = Vec::new();
    while done < want {
        let limit = if done == 0 { max_fds } else { 0 };
        let r = match recv_with_fds(sock, &mut [IoSliceMut::new(&mut buf[done..])], limit) {
            Ok(r) => r,
            Err(Error::Disconnect) if done > 0 => {
                return Err(Error::PartialMessage { done, want });
            }
            Err(Error::TruncatedControl { .. }) if done > 0 => {
                return Err(Error::IncorrectFds {
                    request: "message continuation",
                    got: 1,
                    want: "none after the first byte",
                });
            }
            Err(e) => return Err(e),
        };
        if done == 0 {
            fds = r.fds;
        }
        done += r.bytes;
    }
    Ok(fds)
}

/// Receives exactly `buf.len()` bytes from a stream socket; any fd is an error.
pub fn recv_exact(sock: impl AsFd, buf: &mut [u8]) -> Result<()> {
    let fds = recv_exact_with_fds(sock, buf, 0)?;
    debug_assert!(fds.is_empty());
    Ok(())
}

/// Creates a connected pair of `AF_UNIX` sockets of `kind`, close-on-exec.
pub fn socketpair(kind: SocketType) -> Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::net::socketpair(
        AddressFamily::UNIX,
        kind,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    use super::*;

    /// A memfd whose name is unique to `tag`, so that leak checks can count its copies
    /// in /proc/self/fd while other tests open and close fds in parallel.
    pub(crate) fn probe_fd(tag: &str) -> OwnedFd {
        rustix::fs::memfd_create(
            format!("outboard-probe-{tag}"),
            rustix::fs::MemfdFlags::CLOEXEC,
        )
        .unwrap()
    }

    /// How many open fds of this process are copies of [`probe_fd`]`(tag)`.
    pub(crate) fn probe_count(tag: &str) -> usize {
        let want = format!("/memfd:outboard-probe-{tag} ");
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|l| l.to_string_lossy().starts_with(&want))
            .count()
    }

    fn eventfd() -> OwnedFd {
        rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap()
    }

    #[test]
    fn stream_roundtrip_with_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        let e1 = eventfd();
        let e2 = eventfd();
        send_all_with_fds(&a, &[b"hello ", b"world"], &[e1.as_fd(), e2.as_fd()]).unwrap();
        let mut buf = [0u8; 11];
        let fds = recv_exact_with_fds(&b, &mut buf, 4).unwrap();
        assert_eq!(&buf, b"hello world");
        assert_eq!(fds.len(), 2);
        // The received fds are new descriptors for the same eventfds.
        rustix::io::write(&fds[0], &1u64.to_ne_bytes()).unwrap();
        let mut v = [0u8; 8];
        rustix::io::read(&e1, &mut v).unwrap();
        assert_eq!(u64::from_ne_bytes(v), 1);
        assert_ne!(fds[0].as_raw_fd(), e1.as_raw_fd());
        // Close-on-exec is set on received fds.
        let flags = rustix::io::fcntl_getfd(&fds[1]).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
    }

    #[test]
    fn too_many_fds_is_truncated_control_and_leaks_nothing() {
        let (a, b) = socketpair(SocketType::SEQPACKET).unwrap();
        let evs: Vec<OwnedFd> = (0..6).map(|_| probe_fd("sock-trunc")).collect();
        assert_eq!(probe_count("sock-trunc"), 6);
        let borrowed: Vec<BorrowedFd<'_>> = evs.iter().map(|e| e.as_fd()).collect();
        send_with_fds(&a, &[IoSlice::new(b"x")], &borrowed).unwrap();
        let mut buf = [0u8; 4];
        let err = recv_with_fds(&b, &mut [IoSliceMut::new(&mut buf)], 1).unwrap_err();
        assert!(
            matches!(err, Error::TruncatedControl { max_fds: 1 }),
            "{err}"
        );
        assert_eq!(probe_count("sock-trunc"), 6);
    }

    #[test]
    fn oversized_datagram_is_buffer_too_small() {
        let (a, b) = socketpair(SocketType::SEQPACKET).unwrap();
        send_with_fds(&a, &[IoSlice::new(&[7u8; 100])], &[]).unwrap();
        let mut buf = [0u8; 10];
        let err = recv_with_fds(&b, &mut [IoSliceMut::new(&mut buf)], 0).unwrap_err();
        assert!(
            matches!(err, Error::RecvBufferTooSmall { got: 10, .. }),
            "{err}"
        );
        // With MSG_TRUNC the kernel reports the datagram's real size.
        send_with_fds(&a, &[IoSlice::new(&[7u8; 100])], &[]).unwrap();
        let err = recv_with_fds_flags(
            b.as_fd(),
            &mut [IoSliceMut::new(&mut buf)],
            0,
            RecvFlags::TRUNC,
        )
        .unwrap_err();
        assert!(
            matches!(err, Error::RecvBufferTooSmall { got: 10, want: 100 }),
            "{err}"
        );
    }

    #[test]
    fn close_is_disconnect_and_midway_close_is_partial() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        let mut buf = [0u8; 4];
        assert!(matches!(recv_exact(&b, &mut buf), Err(Error::Disconnect)));

        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"ab").unwrap();
        drop(a);
        let err = recv_exact(&b, &mut buf).unwrap_err();
        assert!(
            matches!(err, Error::PartialMessage { done: 2, want: 4 }),
            "{err}"
        );
    }

    #[test]
    fn fds_in_a_continuation_are_refused_and_closed() {
        let (a, b) = UnixStream::pair().unwrap();
        let e = probe_fd("sock-cont");
        send_with_fds(&a, &[IoSlice::new(b"ab")], &[]).unwrap();
        send_with_fds(&a, &[IoSlice::new(b"cd")], &[e.as_fd()]).unwrap();
        drop(e);
        let mut buf = [0u8; 2];
        // A message of two bytes that may carry one fd: "ab", none attached.
        assert!(recv_exact_with_fds(&b, &mut buf, 1).unwrap().is_empty());
        // The next part of the stream must not carry fds, but it does.
        let err = recv_exact(&b, &mut buf).unwrap_err();
        assert!(
            matches!(err, Error::TruncatedControl { max_fds: 0 }),
            "{err}"
        );
        assert_eq!(probe_count("sock-cont"), 0);
    }

    #[test]
    fn send_to_closed_peer_is_broken_not_sigpipe() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let err = send_all_with_fds(&a, &[b"x"], &[]).unwrap_err();
        assert!(err.is_disconnect(), "{err}");
    }

    #[test]
    fn refuses_fds_without_data() {
        let (a, _b) = UnixStream::pair().unwrap();
        let e = eventfd();
        assert!(matches!(
            send_with_fds(&a, &[], &[e.as_fd()]),
            Err(Error::InvalidParam(_))
        ));
    }
}
