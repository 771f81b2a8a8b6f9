//! A vhost-user [`Connection`]: messages (header, body, payload, fds) over a Unix
//! stream socket.
//!
//! The same type carries front-end requests on the main socket and back-end requests on
//! the back-end request channel; the request code stays a raw `u32` until the receiver
//! looks it up, so an unknown code is an error, never undefined behaviour.
//!
//! Receiving follows the order the seeds' request handlers use, so that fds are bound
//! to the right message and nothing is allocated on a peer's say-so:
//!
//! 1. the 12-byte header, with up to [`MAX_ATTACHED_FDS`] fds (they ride on the
//!    message's first byte);
//! 2. the `size` check against [`MAX_MSG_SIZE`] *before* anything is read or allocated
//!    for the body;
//! 3. the body, which must carry no fds.
//!
//! Header validation (version, flags, request code) is left to the caller so that it can
//! first consume the body and keep the stream in step when it refuses a message.
//!
//! # Receiving without blocking
//!
//! A server that must never wait on its peer (the daemon's worker, whose data path
//! shares the thread) makes the socket non-blocking and receives with
//! [`Connection::recv_some`]: each call takes what the socket has, up to the end of the
//! current message, into a [`PartialMessage`], and reports the message once it is
//! complete. A peer that sends half a message and stalls costs no waiting; the caller
//! drops it once [`PartialMessage::started`] is older than its bound.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Instant;

use outboard_protocol::vhost_user::{Header, MAX_ATTACHED_FDS, MAX_MSG_SIZE};
use zerocopy::{FromBytes, IntoBytes};

use crate::error::{Error, Result};
use crate::sock;

/// One received message.
#[derive(Debug)]
pub struct Message {
    /// The header, not yet validated.
    pub header: Header,
    /// The body (`header.size` bytes).
    pub body: Vec<u8>,
    /// The fds that came with the message.
    pub fds: Vec<OwnedFd>,
}

/// A complete message from [`Connection::recv_some`]: the header (not yet validated),
/// the body, borrowed from the [`PartialMessage`], and the fds that came with it.
pub type Received<'p> = (Header, &'p [u8], Vec<OwnedFd>);

/// A message being received piece by piece (see [`Connection::recv_some`]).
#[derive(Debug)]
pub struct PartialMessage {
    buf: Box<[u8; Header::SIZE + MAX_MSG_SIZE]>,
    got: usize,
    fds: Vec<OwnedFd>,
    started: Option<Instant>,
}

impl Default for PartialMessage {
    fn default() -> Self {
        PartialMessage {
            buf: Box::new([0u8; Header::SIZE + MAX_MSG_SIZE]),
            got: 0,
            fds: Vec::new(),
            started: None,
        }
    }
}

impl PartialMessage {
    /// An empty receive buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// When the first byte of the message being received arrived; `None` between
    /// messages.
    pub fn started(&self) -> Option<Instant> {
        self.started
    }

    /// Bytes of the current message received so far.
    pub fn received(&self) -> usize {
        self.got
    }

    /// The size of the whole current message, once its header is in.
    pub fn expected(&self) -> Option<usize> {
        self.header().map(|h| Header::SIZE + h.size as usize)
    }

    fn header(&self) -> Option<Header> {
        let raw = self.buf.get(..Header::SIZE)?;
        (self.got >= Header::SIZE)
            .then(|| Header::read_from_bytes(raw).ok())
            .flatten()
    }

    /// The complete message: header, body and fds; the buffer is then empty again.
    fn take(&mut self) -> Option<Received<'_>> {
        let header = self.header()?;
        let end = Header::SIZE + header.size as usize;
        if self.got != end {
            return None;
        }
        self.got = 0;
        self.started = None;
        let fds = std::mem::take(&mut self.fds);
        Some((header, self.buf.get(Header::SIZE..end)?, fds))
    }
}

/// A vhost-user connection over a connected Unix stream socket.
#[derive(Debug)]
pub struct Connection {
    sock: UnixStream,
}

impl Connection {
    /// Wraps a connected socket.
    pub fn new(sock: UnixStream) -> Self {
        Connection { sock }
    }

    /// Connects to a listening socket at `path`.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self> {
        match UnixStream::connect(path) {
            Ok(s) => Ok(Connection::new(s)),
            Err(e) => Err(match e.raw_os_error() {
                Some(raw) => Error::from_connect_errno(rustix::io::Errno::from_raw_os_error(raw)),
                None => Error::SocketConnect(e),
            }),
        }
    }

    /// A connected pair (for tests and for the back-end request channel).
    pub fn pair() -> Result<(Connection, Connection)> {
        let (a, b) = UnixStream::pair()?;
        Ok((Connection::new(a), Connection::new(b)))
    }

    /// The socket.
    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }

    /// Returns the socket.
    pub fn into_socket(self) -> UnixStream {
        self.sock
    }

    /// Sends a message: `header`, then `body` and `payload`, with `fds` on the first byte.
    ///
    /// `header.size` must equal the body and payload length and at most
    /// [`MAX_ATTACHED_FDS`] fds may be attached.
    pub fn send(
        &self,
        header: &Header,
        body: &[u8],
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<()> {
        let len = body.len() + payload.len();
        if len > MAX_MSG_SIZE {
            return Err(Error::OversizedMessage {
                size: len,
                max: MAX_MSG_SIZE,
            });
        }
        if header.size as usize != len {
            return Err(Error::InvalidParam(format!(
                "header size {} does not match the {len} bytes of body and payload",
                header.size
            )));
        }
        if fds.len() > MAX_ATTACHED_FDS {
            return Err(Error::InvalidParam(format!(
                "{} fds attached, at most {MAX_ATTACHED_FDS}",
                fds.len()
            )));
        }
        let want = Header::SIZE + len;
        // Fast path: one sendmsg() for the whole message.
        let iov = [
            IoSlice::new(header.as_bytes()),
            IoSlice::new(body),
            IoSlice::new(payload),
        ];
        let n = sock::send_with_fds(&self.sock, &iov, fds)?;
        if n == want {
            return Ok(());
        }
        // A short write on a stream socket: send the rest (the fds already went).
        let mut all = Vec::with_capacity(want);
        all.extend_from_slice(header.as_bytes());
        all.extend_from_slice(body);
        all.extend_from_slice(payload);
        let rest = all.get(n..).unwrap_or_default();
        sock::send_all_with_fds(&self.sock, &[rest], &[])
    }

    /// Receives a header and the fds attached to it. Only the size bound is checked
    /// here: a size over [`MAX_MSG_SIZE`] is [`Error::OversizedMessage`] (the fds are
    /// closed, and the stream cannot be resynchronised).
    pub fn recv_header(&self) -> Result<(Header, Vec<OwnedFd>)> {
        let mut raw = [0u8; Header::SIZE];
        // Accept up to the generic bound so that a message with a few fds too many is
        // refused by the request rules (keeping the stream in step) rather than by
        // control-data truncation.
        let fds = sock::recv_exact_with_fds(&self.sock, &mut raw, sock::MAX_FDS_PER_MSG)?;
        let header = Header::read_from_bytes(&raw).map_err(|_| Error::PartialMessage {
            done: raw.len(),
            want: Header::SIZE,
        })?;
        if header.size as usize > MAX_MSG_SIZE {
            return Err(Error::OversizedMessage {
                size: header.size as usize,
                max: MAX_MSG_SIZE,
            });
        }
        Ok((header, fds))
    }

    /// Receives the body announced by `header` into `buf` (at least `header.size`
    /// bytes) and returns it. Fds on the body are refused.
    pub fn recv_body_into<'b>(&self, header: &Header, buf: &'b mut [u8]) -> Result<&'b [u8]> {
        let size = header.size as usize;
        if size > MAX_MSG_SIZE {
            return Err(Error::OversizedMessage {
                size,
                max: MAX_MSG_SIZE,
            });
        }
        let room = buf.len();
        let Some(body) = buf.get_mut(..size) else {
            return Err(Error::RecvBufferTooSmall {
                got: room,
                want: size,
            });
        };
        sock::recv_exact(&self.sock, body)?;
        Ok(body)
    }

    /// Receives what the socket has of the current message into `partial`, never more
    /// than up to the message's end (the next message stays in the socket). Returns the
    /// message (header not yet validated, body, fds) once it is complete, `Ok(None)`
    /// while it is not. On a non-blocking socket `Ok(None)` means "come back when the
    /// socket is readable"; on a blocking one the call waits for each piece.
    ///
    /// Fds are accepted with any piece, at most [`MAX_ATTACHED_FDS`] per message. The
    /// errors are those of [`Connection::recv_header`]; an end of file inside a message
    /// is [`Error::PartialMessage`].
    pub fn recv_some<'p>(&self, partial: &'p mut PartialMessage) -> Result<Option<Received<'p>>> {
        loop {
            let want = match partial.header() {
                None => Header::SIZE,
                Some(h) => {
                    let size = h.size as usize;
                    if size > MAX_MSG_SIZE {
                        return Err(Error::OversizedMessage {
                            size,
                            max: MAX_MSG_SIZE,
                        });
                    }
                    Header::SIZE + size
                }
            };
            if partial.got == want {
                return Ok(partial.take());
            }
            let max_fds = MAX_ATTACHED_FDS.saturating_sub(partial.fds.len());
            let got = partial.got;
            let Some(room) = partial.buf.get_mut(got..want) else {
                return Err(Error::PartialMessage { done: got, want });
            };
            let r = match sock::recv_with_fds(&self.sock, &mut [IoSliceMut::new(room)], max_fds) {
                Ok(r) => r,
                Err(Error::SocketRetry(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return Ok(None)
                }
                Err(Error::Disconnect) if got > 0 => {
                    return Err(Error::PartialMessage { done: got, want })
                }
                Err(e) => return Err(e),
            };
            if got == 0 {
                partial.started = Some(Instant::now());
            }
            partial.got += r.bytes;
            partial.fds.extend(r.fds);
        }
    }

    /// Receives a reply whose body should be at most `expect` bytes, with one read in
    /// the common case (header and body together).
    ///
    /// Only for the side that sends requests and waits for their replies: the read may
    /// take up to `expect` bytes past the header, which is safe because a peer sends
    /// nothing on this socket but the one awaited reply. Bytes beyond the announced size
    /// (a peer that sent more than one message) are [`Error::PartialMessage`], fatal.
    pub fn recv_reply(&self, expect: usize) -> Result<Message> {
        let mut buf = vec![0u8; Header::SIZE + expect.min(MAX_MSG_SIZE)];
        let first = sock::recv_with_fds(
            &self.sock,
            &mut [std::io::IoSliceMut::new(&mut buf)],
            sock::MAX_FDS_PER_MSG,
        )?;
        let mut got = first.bytes;
        if got < Header::SIZE {
            match sock::recv_exact(&self.sock, &mut buf[got..Header::SIZE]) {
                Err(Error::Disconnect) => {
                    return Err(Error::PartialMessage {
                        done: got,
                        want: Header::SIZE,
                    })
                }
                other => other?,
            }
            got = Header::SIZE;
        }
        let header =
            Header::read_from_bytes(&buf[..Header::SIZE]).map_err(|_| Error::PartialMessage {
                done: got,
                want: Header::SIZE,
            })?;
        let size = header.size as usize;
        if size > MAX_MSG_SIZE {
            return Err(Error::OversizedMessage {
                size,
                max: MAX_MSG_SIZE,
            });
        }
        let have = got - Header::SIZE;
        if have > size {
            return Err(Error::PartialMessage {
                done: have,
                want: size,
            });
        }
        buf.resize(Header::SIZE + size, 0);
        if have < size {
            match sock::recv_exact(&self.sock, &mut buf[got..]) {
                Err(Error::Disconnect) => {
                    return Err(Error::PartialMessage {
                        done: have,
                        want: size,
                    })
                }
                other => other?,
            }
        }
        buf.drain(..Header::SIZE);
        Ok(Message {
            header,
            body: buf,
            fds: first.fds,
        })
    }

    /// Receives a whole message (header, fds, body).
    pub fn recv(&self) -> Result<Message> {
        let (header, fds) = self.recv_header()?;
        let mut body = vec![0u8; header.size as usize];
        self.recv_body_into(&header, &mut body)?;
        Ok(Message { header, body, fds })
    }
}

impl AsFd for Connection {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

impl From<UnixStream> for Connection {
    fn from(sock: UnixStream) -> Self {
        Connection::new(sock)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use outboard_protocol::vhost_user::{FrontendReq, VhostUserU64};

    use super::*;
    use crate::sock::tests::{probe_count, probe_fd};

    #[test]
    fn message_roundtrip_with_fds() {
        let (a, b) = Connection::pair().unwrap();
        let fd = probe_fd("conn-rt");
        let body = VhostUserU64::new(0x1234);
        let hdr = Header::request(FrontendReq::SET_FEATURES.code(), 8, false);
        a.send(&hdr, body.as_bytes(), &[], &[fd.as_fd()]).unwrap();
        let m = b.recv().unwrap();
        assert_eq!(m.header, hdr);
        assert_eq!(m.body, 0x1234u64.to_ne_bytes());
        assert_eq!(m.fds.len(), 1);
        assert_eq!(probe_count("conn-rt"), 2);
    }

    #[test]
    fn refuses_bad_sends() {
        let (a, _b) = Connection::pair().unwrap();
        let hdr = Header::request(1, 4, false);
        assert!(matches!(
            a.send(&hdr, &[0; 8], &[], &[]),
            Err(Error::InvalidParam(_))
        ));
        let big = vec![0u8; MAX_MSG_SIZE + 1];
        let hdr = Header::request(1, big.len() as u32, false);
        assert!(matches!(
            a.send(&hdr, &big, &[], &[]),
            Err(Error::OversizedMessage { .. })
        ));
    }

    #[test]
    fn oversized_header_is_refused_before_allocating() {
        let (a, b) = Connection::pair().unwrap();
        let hdr = Header::request(1, u32::MAX, false);
        a.socket().write_all(hdr.as_bytes()).unwrap();
        let err = b.recv().unwrap_err();
        assert!(
            matches!(err, Error::OversizedMessage { size, max: MAX_MSG_SIZE } if size == u32::MAX as usize),
            "{err}"
        );
    }

    #[test]
    fn truncated_body_is_partial() {
        let (a, b) = Connection::pair().unwrap();
        let hdr = Header::request(2, 8, false);
        a.socket().write_all(hdr.as_bytes()).unwrap();
        a.socket().write_all(&[1, 2, 3]).unwrap();
        drop(a);
        let err = b.recv().unwrap_err();
        assert!(
            matches!(err, Error::PartialMessage { done: 3, want: 8 }),
            "{err}"
        );
    }

    #[test]
    fn replies_in_one_or_several_reads() {
        let (a, b) = Connection::pair().unwrap();
        let fd = probe_fd("conn-reply");
        // Exactly as expected, with an fd.
        let hdr = Header::reply(1, 8);
        a.send(&hdr, &7u64.to_ne_bytes(), &[], &[fd.as_fd()])
            .unwrap();
        let m = b.recv_reply(8).unwrap();
        assert_eq!(
            (m.header, m.body.as_slice(), m.fds.len()),
            (hdr, &7u64.to_ne_bytes()[..], 1)
        );
        // Longer than expected: the rest is read after the header.
        let hdr = Header::reply(24, 20);
        a.send(&hdr, &[3; 20], &[], &[]).unwrap();
        let m = b.recv_reply(8).unwrap();
        assert_eq!(m.body, [3; 20]);
        // Shorter than expected, and split across writes.
        a.socket()
            .write_all(&Header::reply(1, 4).as_bytes()[..5])
            .unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(10));
            a.socket()
                .write_all(&Header::reply(1, 4).as_bytes()[5..])
                .unwrap();
            a.socket().write_all(&[9; 4]).unwrap();
            a
        });
        let m = b.recv_reply(8).unwrap();
        assert_eq!(m.body, [9; 4]);
        let a = writer.join().unwrap();
        // Two replies where one was awaited: fatal.
        a.send(&Header::reply(1, 0), &[], &[], &[]).unwrap();
        a.send(&Header::reply(1, 0), &[], &[], &[]).unwrap();
        let err = b.recv_reply(8).unwrap_err();
        assert!(err.is_fatal(), "{err}");
        // Peer gone mid-reply.
        let (a, b) = Connection::pair().unwrap();
        a.socket()
            .write_all(&Header::reply(1, 8).as_bytes()[..3])
            .unwrap();
        drop(a);
        assert!(matches!(
            b.recv_reply(8),
            Err(Error::PartialMessage { done: 3, want: 12 })
        ));
    }

    #[test]
    fn connect_to_missing_path_is_connect_error() {
        let err = Connection::connect("/nonexistent/outboard.sock").unwrap_err();
        assert!(matches!(err, Error::SocketConnect(_)), "{err}");
    }
}
