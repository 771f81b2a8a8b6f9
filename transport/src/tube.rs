//! [`Tube`]: a typed request/response channel over `SOCK_SEQPACKET` that carries fds.
//!
//! One message is one datagram, so message boundaries are kept by the kernel and a
//! message's fds always arrive with it. Two encodings share the channel:
//!
//! - **serde** ([`Tube::send`], [`Tube::recv`]): any `Serialize`/`Deserialize` type,
//!   encoded as JSON. Convenient for control messages; never use it on a hot path.
//! - **raw fixed layout** ([`Tube::send_raw`], [`Tube::recv_raw`]): a zerocopy
//!   structure sent as its bytes and received only if the datagram has exactly its size.
//!   This is what a proxy device's read/write path uses.
//!
//! The receive side bounds every message ([`Tube::set_max_message_size`]), checks the
//! size *before* allocating, closes fds it was not asked for, and reports a peer that
//! went away as [`Error::Disconnect`]. Timeouts ([`Tube::set_recv_timeout`],
//! [`Tube::set_send_timeout`]) turn a hung peer into [`Error::Timeout`].
//!
//! A `Tube` may be moved between threads, and [`Tube::try_clone`] gives a second handle
//! (send on one thread, receive on another). Receives must not run concurrently from
//! two threads (each receive first peeks at the datagram's size).
//!
//! ```
//! use outboard_transport::Tube;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize, Debug, PartialEq)]
//! enum Command { Read { offset: u64, len: u32 }, Shutdown }
//!
//! let (vmm, child) = Tube::pair()?;
//! vmm.send(&Command::Read { offset: 8, len: 4 })?;
//! assert_eq!(child.recv::<Command>()?, Command::Read { offset: 8, len: 4 });
//! # Ok::<(), outboard_transport::Error>(())
//! ```

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvFlags, SocketType};
use serde::de::DeserializeOwned;
use serde::Serialize;
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::error::{Error, Result};
use crate::sock::{self, MAX_FDS_PER_MSG};

/// Default bound on the size of one received message (1 MiB).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 1 << 20;

/// A bidirectional message channel over a `SOCK_SEQPACKET` socket.
#[derive(Debug)]
pub struct Tube {
    sock: OwnedFd,
    max_message_size: usize,
    max_fds: usize,
}

impl Tube {
    /// Creates a connected pair of tubes.
    pub fn pair() -> Result<(Tube, Tube)> {
        let (a, b) = sock::socketpair(SocketType::SEQPACKET)?;
        Ok((Tube::wrap(a), Tube::wrap(b)))
    }

    /// Wraps a connected `SOCK_SEQPACKET` socket (for instance one inherited by a
    /// child process). Any other socket type is refused.
    pub fn from_fd(fd: OwnedFd) -> Result<Tube> {
        let kind = rustix::net::sockopt::socket_type(&fd)?;
        if kind != SocketType::SEQPACKET {
            return Err(Error::InvalidParam(format!(
                "a Tube needs a SOCK_SEQPACKET socket, got socket type {}",
                kind.as_raw()
            )));
        }
        Ok(Tube::wrap(fd))
    }

    fn wrap(sock: OwnedFd) -> Tube {
        Tube {
            sock,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_fds: MAX_FDS_PER_MSG,
        }
    }

    /// A second handle on the same channel (a duplicated fd, close-on-exec), for
    /// instance to send from one thread while another receives.
    pub fn try_clone(&self) -> Result<Tube> {
        Ok(Tube {
            sock: rustix::io::fcntl_dupfd_cloexec(&self.sock, 0)?,
            max_message_size: self.max_message_size,
            max_fds: self.max_fds,
        })
    }

    /// Returns the socket.
    pub fn into_fd(self) -> OwnedFd {
        self.sock
    }

    /// Sets the bound on the size of a received message. Larger messages are consumed,
    /// dropped (with their fds) and reported as [`Error::OversizedMessage`].
    pub fn set_max_message_size(&mut self, max: usize) {
        self.max_message_size = max;
    }

    /// Sets the bound on fds per received message (at most [`MAX_FDS_PER_MSG`]).
    pub fn set_max_fds(&mut self, max: usize) {
        self.max_fds = max.min(MAX_FDS_PER_MSG);
    }

    /// Sets (or clears, with `None`) the receive timeout. A receive that times out
    /// returns [`Error::Timeout`].
    pub fn set_recv_timeout(&self, timeout: Option<Duration>) -> Result<()> {
        check_timeout(timeout)?;
        Ok(rustix::net::sockopt::set_socket_timeout(
            &self.sock,
            rustix::net::sockopt::Timeout::Recv,
            timeout,
        )?)
    }

    /// Sets (or clears, with `None`) the send timeout. A send that times out returns
    /// [`Error::Timeout`].
    pub fn set_send_timeout(&self, timeout: Option<Duration>) -> Result<()> {
        check_timeout(timeout)?;
        Ok(rustix::net::sockopt::set_socket_timeout(
            &self.sock,
            rustix::net::sockopt::Timeout::Send,
            timeout,
        )?)
    }

    /// Waits until a message (or a disconnect) can be received. Returns `false` when
    /// `timeout` expired first. `None` waits forever.
    pub fn wait_readable(&self, timeout: Option<Duration>) -> Result<bool> {
        let ts = match timeout {
            Some(d) => Some(
                Timespec::try_from(d)
                    .map_err(|_| Error::InvalidParam(format!("timeout {d:?} is too large")))?,
            ),
            None => None,
        };
        loop {
            let mut fds = [PollFd::new(&self.sock, PollFlags::IN)];
            match poll(&mut fds, ts.as_ref()) {
                Ok(n) => return Ok(n > 0),
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Sends a serde message.
    pub fn send<T: Serialize + ?Sized>(&self, msg: &T) -> Result<()> {
        self.send_with_fds(msg, &[])
    }

    /// Sends a serde message with fds attached.
    pub fn send_with_fds<T: Serialize + ?Sized>(
        &self,
        msg: &T,
        fds: &[BorrowedFd<'_>],
    ) -> Result<()> {
        let bytes = serde_json::to_vec(msg)?;
        self.send_bytes(&bytes, fds)
    }

    /// Receives a serde message; a message that carries fds is refused (and its fds
    /// closed).
    pub fn recv<T: DeserializeOwned>(&self) -> Result<T> {
        let (msg, fds) = self.recv_with_fds()?;
        expect_no_fds(fds)?;
        Ok(msg)
    }

    /// Receives a serde message and the fds that came with it.
    pub fn recv_with_fds<T: DeserializeOwned>(&self) -> Result<(T, Vec<OwnedFd>)> {
        let (bytes, fds) = self.recv_bytes()?;
        Ok((serde_json::from_slice(&bytes)?, fds))
    }

    /// Sends `req` and waits for the peer's answer.
    pub fn request<Req: Serialize + ?Sized, Resp: DeserializeOwned>(
        &self,
        req: &Req,
    ) -> Result<Resp> {
        self.send(req)?;
        self.recv()
    }

    /// Sends a fixed-layout message as its bytes (the hot path: no encoding).
    pub fn send_raw<T: IntoBytes + Immutable + ?Sized>(
        &self,
        msg: &T,
        fds: &[BorrowedFd<'_>],
    ) -> Result<()> {
        self.send_bytes(msg.as_bytes(), fds)
    }

    /// Receives a fixed-layout message: the datagram must be exactly `size_of::<T>()`
    /// bytes. No allocation.
    pub fn recv_raw<T: FromBytes + IntoBytes>(&self) -> Result<(T, Vec<OwnedFd>)> {
        let mut msg = T::new_zeroed();
        let want = std::mem::size_of::<T>();
        let received = self.recv_into(msg.as_mut_bytes())?;
        if received.bytes != want {
            return Err(Error::PartialMessage {
                done: received.bytes,
                want,
            });
        }
        Ok((msg, received.fds))
    }

    /// Sends one message of raw bytes. Empty messages are refused (a zero-length
    /// datagram could not be told from a disconnect).
    pub fn send_bytes(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<()> {
        if bytes.is_empty() {
            return Err(Error::InvalidParam("a Tube message cannot be empty".into()));
        }
        let n = sock::send_with_fds(&self.sock, &[IoSlice::new(bytes)], fds)
            .map_err(timeout_from_retry)?;
        if n != bytes.len() {
            return Err(Error::PartialMessage {
                done: n,
                want: bytes.len(),
            });
        }
        Ok(())
    }

    /// Receives one message of raw bytes and its fds. The size is checked against the
    /// bound before the buffer is allocated.
    pub fn recv_bytes(&self) -> Result<(Vec<u8>, Vec<OwnedFd>)> {
        let size = self.peek_size()?;
        if size > self.max_message_size {
            // Consume and drop the datagram (closing its fds) to stay in step.
            let mut byte = [0u8; 1];
            let _ =
                sock::recv_with_fds(&self.sock, &mut [IoSliceMut::new(&mut byte)], self.max_fds);
            return Err(Error::OversizedMessage {
                size,
                max: self.max_message_size,
            });
        }
        let mut buf = vec![0u8; size];
        let received = self.recv_into(&mut buf)?;
        buf.truncate(received.bytes);
        Ok((buf, received.fds))
    }

    /// Receives one message into `buf`; a message larger than `buf` is dropped and
    /// reported as [`Error::RecvBufferTooSmall`].
    pub fn recv_into(&self, buf: &mut [u8]) -> Result<sock::Received> {
        sock::recv_with_fds_flags(
            self.sock.as_fd(),
            &mut [IoSliceMut::new(buf)],
            self.max_fds,
            RecvFlags::TRUNC,
        )
        .map_err(timeout_from_retry)
    }

    /// The size of the next datagram, without consuming it (or its fds).
    fn peek_size(&self) -> Result<usize> {
        // No control buffer: peeked fds are not installed in this process.
        let mut control = RecvAncillaryBuffer::new(&mut []);
        let msg = loop {
            match recvmsg(
                &self.sock,
                &mut [],
                &mut control,
                RecvFlags::PEEK | RecvFlags::TRUNC,
            ) {
                Err(Errno::INTR) => continue,
                other => break other,
            }
        }
        .map_err(|e| timeout_from_retry(e.into()))?;
        if msg.bytes == 0 {
            return Err(Error::Disconnect);
        }
        Ok(msg.bytes)
    }
}

impl AsFd for Tube {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

fn check_timeout(timeout: Option<Duration>) -> Result<()> {
    if timeout == Some(Duration::ZERO) {
        // SO_RCVTIMEO with zero means "forever", which is not what a caller asking for
        // zero means.
        return Err(Error::InvalidParam(
            "a zero timeout is not supported; use None to wait forever".into(),
        ));
    }
    Ok(())
}

fn timeout_from_retry(e: Error) -> Error {
    match e {
        Error::SocketRetry(io) if io.raw_os_error() == Some(libc::EAGAIN) => Error::Timeout,
        other => other,
    }
}

fn expect_no_fds(fds: Vec<OwnedFd>) -> Result<()> {
    if fds.is_empty() {
        Ok(())
    } else {
        Err(Error::IncorrectFds {
            request: "Tube message",
            got: fds.len(),
            want: "none",
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use serde::Deserialize;
    use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

    use super::*;
    use crate::sock::tests::{probe_count, probe_fd};

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    enum Req {
        Read { offset: u64, len: u32 },
        Write { offset: u64, data: Vec<u8> },
    }

    #[repr(C)]
    #[derive(Debug, Clone, Copy, PartialEq, FromBytes, IntoBytes, Immutable, KnownLayout)]
    struct HotRead {
        offset: u64,
        len: u32,
        op: u32,
    }

    #[test]
    fn serde_request_response_across_threads() {
        let (a, b) = Tube::pair().unwrap();
        let t = std::thread::spawn(move || {
            for _ in 0..2 {
                match b.recv::<Req>().unwrap() {
                    Req::Read { offset, len } => b.send(&(offset + u64::from(len))).unwrap(),
                    Req::Write { data, .. } => b.send(&(data.len() as u64)).unwrap(),
                }
            }
        });
        let r: u64 = a.request(&Req::Read { offset: 10, len: 5 }).unwrap();
        assert_eq!(r, 15);
        let r: u64 = a
            .request(&Req::Write {
                offset: 0,
                data: vec![1; 100_000],
            })
            .unwrap();
        assert_eq!(r, 100_000);
        t.join().unwrap();
    }

    #[test]
    fn raw_messages_with_fds() {
        let (a, b) = Tube::pair().unwrap();
        let ev = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
        let m = HotRead {
            offset: 0x1000,
            len: 4,
            op: 1,
        };
        a.send_raw(&m, &[ev.as_fd()]).unwrap();
        let (got, fds) = b.recv_raw::<HotRead>().unwrap();
        assert_eq!(got, m);
        assert_eq!(fds.len(), 1);
        // A datagram of the wrong size is refused, not misread.
        a.send_bytes(&[1, 2, 3], &[]).unwrap();
        assert!(matches!(
            b.recv_raw::<HotRead>(),
            Err(Error::PartialMessage { done: 3, want: 16 })
        ));
        a.send_bytes(&[0; 17], &[]).unwrap();
        assert!(matches!(
            b.recv_raw::<HotRead>(),
            Err(Error::RecvBufferTooSmall { got: 16, want: 17 })
        ));
    }

    #[test]
    fn disconnect_and_timeout() {
        let (a, b) = Tube::pair().unwrap();
        b.set_recv_timeout(Some(Duration::from_millis(30))).unwrap();
        let start = Instant::now();
        assert!(matches!(b.recv::<u32>(), Err(Error::Timeout)));
        assert!(start.elapsed() >= Duration::from_millis(25));
        assert!(!b.wait_readable(Some(Duration::from_millis(1))).unwrap());
        assert!(b.set_recv_timeout(Some(Duration::ZERO)).is_err());
        drop(a);
        assert!(b.wait_readable(None).unwrap());
        assert!(matches!(b.recv::<u32>(), Err(Error::Disconnect)));
        assert!(matches!(b.send(&1u32), Err(Error::SocketBroken(_))));
    }

    #[test]
    fn oversized_and_unwanted_fds_are_dropped_without_leaks() {
        let (a, mut b) = Tube::pair().unwrap();
        b.set_max_message_size(64);
        let ev = probe_fd("tube-drop");
        a.send_with_fds(&vec![0u8; 200], &[ev.as_fd()]).unwrap();
        assert!(matches!(
            b.recv::<Vec<u8>>(),
            Err(Error::OversizedMessage { max: 64, .. })
        ));
        a.send_with_fds(&7u32, &[ev.as_fd()]).unwrap();
        assert!(matches!(
            b.recv::<u32>(),
            Err(Error::IncorrectFds { got: 1, .. })
        ));
        b.set_max_fds(1);
        a.send_with_fds(&7u32, &[ev.as_fd(), ev.as_fd()]).unwrap();
        assert!(matches!(
            b.recv_with_fds::<u32>(),
            Err(Error::TruncatedControl { max_fds: 1 })
        ));
        assert_eq!(probe_count("tube-drop"), 1);
        // Still in step after the refusals.
        a.send(&9u32).unwrap();
        assert_eq!(b.recv::<u32>().unwrap(), 9);
        // Garbage is a serde error, not a panic.
        a.send_bytes(b"{not json", &[]).unwrap();
        assert!(matches!(b.recv::<u32>(), Err(Error::Serde(_))));
    }

    #[test]
    fn from_fd_checks_socket_type() {
        let (s, _t) = sock::socketpair(SocketType::STREAM).unwrap();
        assert!(matches!(Tube::from_fd(s), Err(Error::InvalidParam(_))));
        let (s, t) = sock::socketpair(SocketType::SEQPACKET).unwrap();
        let a = Tube::from_fd(s).unwrap();
        let b = Tube::from_fd(t).unwrap();
        a.send(&"hi").unwrap();
        assert_eq!(b.recv::<String>().unwrap(), "hi");
        // A clone talks on the same channel and outlives the original.
        let a2 = a.try_clone().unwrap();
        drop(a);
        a2.send(&"again").unwrap();
        assert_eq!(b.recv::<String>().unwrap(), "again");
        drop(a2);
        assert!(matches!(b.recv::<String>(), Err(Error::Disconnect)));
        assert!(matches!(
            b.send_bytes(&[], &[]),
            Err(Error::InvalidParam(_))
        ));
    }
}
