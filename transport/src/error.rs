//! The transport's error type and the classification of socket errors.

use std::io;

use outboard_protocol::vhost_user::VhostUserProtocolFeatures;
use outboard_protocol::ProtocolError;
use thiserror::Error;

/// Everything that can go wrong on a transport.
///
/// Socket errors are classified by their errno the way crosvm's vhost-user library does
/// it, so that a connection manager can decide what to do without looking at raw codes:
/// [`Error::SocketRetry`] (try again), [`Error::SocketBroken`] (the peer is gone),
/// [`Error::SocketConnect`] (could not reach the peer) and [`Error::SocketError`]
/// (anything else). An orderly close by the peer is [`Error::Disconnect`].
#[cfg_attr(test, remain::sorted)]
#[derive(Debug, Error)]
pub enum Error {
    /// The peer closed the connection (end of file on the socket).
    #[error("the peer closed the connection")]
    Disconnect,
    /// A protocol feature the request needs was not negotiated.
    #[error("{request}: protocol feature {feature:?} was not negotiated")]
    FeatureMismatch {
        /// The request's name.
        request: &'static str,
        /// The missing feature bits.
        feature: VhostUserProtocolFeatures,
    },
    /// A message carried a number of fds its request does not allow.
    #[error("{request}: got {got} file descriptors, expected {want}")]
    IncorrectFds {
        /// The request's name (or what was received).
        request: &'static str,
        /// The number of fds received.
        got: usize,
        /// What the request allows.
        want: &'static str,
    },
    /// A message was malformed: bad header, size or body.
    #[error("invalid message: {0}")]
    InvalidMessage(#[from] ProtocolError),
    /// A request arrived in a state that does not allow it.
    #[error("invalid operation: {0}")]
    InvalidOperation(String),
    /// A caller passed an argument the protocol cannot carry.
    #[error("invalid parameter: {0}")]
    InvalidParam(String),
    /// A message is larger than the bound the receiver accepts.
    #[error("oversized message: {size} bytes, at most {max} allowed")]
    OversizedMessage {
        /// The announced size.
        size: usize,
        /// The bound.
        max: usize,
    },
    /// Only part of a message could be sent or received.
    #[error("partial message: {done} of {want} bytes")]
    PartialMessage {
        /// Bytes transferred.
        done: usize,
        /// Bytes the message has.
        want: usize,
    },
    /// The peer's reply was an error status (a non-zero `REPLY_ACK` or a negative u64).
    #[error("{request}: the peer answered with status {status:#x}")]
    PeerStatus {
        /// The request's name.
        request: &'static str,
        /// The status value.
        status: u64,
    },
    /// A received message was larger than the buffer prepared for it; the data was dropped.
    #[error("receive buffer too small, data was dropped: got {got} bytes, needed {want}")]
    RecvBufferTooSmall {
        /// Size of the buffer.
        got: usize,
        /// Size of the message.
        want: usize,
    },
    /// The front-end owes more late replies on the back-end channel than a slow peer
    /// would; requests on it are refused.
    #[error(
        "the front-end owes {owed} late replies on the back-end channel (at most {max}); \
         the channel is given up"
    )]
    RepliesOverdue {
        /// Replies owed.
        owed: usize,
        /// The most a channel may owe.
        max: usize,
    },
    /// The request handler (the trait implementation) failed.
    #[error("request handler failed: {0}")]
    ReqHandlerError(io::Error),
    /// A message could not be encoded or decoded (serde; feature `tube`).
    #[cfg(feature = "tube")]
    #[error("serialization failed: {0}")]
    Serde(#[from] serde_json::Error),
    /// The socket is broken (ECONNRESET, EPIPE).
    #[error("socket is broken: {0}")]
    SocketBroken(io::Error),
    /// Could not connect to the peer (EACCES, ECONNREFUSED, ENOENT on connect).
    #[error("cannot connect to the peer: {0}")]
    SocketConnect(io::Error),
    /// Any other socket error.
    #[error("socket error: {0}")]
    SocketError(io::Error),
    /// A temporary error; the operation may be retried (EAGAIN, EINTR, ENOBUFS, ENOMEM).
    #[error("temporary socket error: {0}")]
    SocketRetry(io::Error),
    /// A receive or send did not complete within the configured timeout.
    #[error("timed out")]
    Timeout,
    /// Ancillary (control) data was truncated: the peer sent more fds than allowed.
    #[error("control data truncated: the peer sent more than {max_fds} file descriptors")]
    TruncatedControl {
        /// The bound on fds per message.
        max_fds: usize,
    },
    /// A reply did not match the request it answers.
    #[error("unexpected reply: got request code {got}, expected {want}")]
    UnexpectedReply {
        /// The code in the reply header.
        got: u32,
        /// The code of the request.
        want: u32,
    },
}

impl Error {
    /// Classifies an errno from a socket operation, as crosvm's vhost-user library does.
    pub fn from_errno(errno: rustix::io::Errno) -> Self {
        use rustix::io::Errno;
        let io = io::Error::from_raw_os_error(errno.raw_os_error());
        match errno {
            // EWOULDBLOCK is EAGAIN on Linux.
            Errno::AGAIN | Errno::INTR | Errno::NOBUFS | Errno::NOMEM => Error::SocketRetry(io),
            Errno::CONNRESET | Errno::PIPE => Error::SocketBroken(io),
            Errno::ACCESS => Error::SocketConnect(io),
            _ => Error::SocketError(io),
        }
    }

    /// Classifies an errno from `connect()`: refusals and missing sockets are
    /// [`Error::SocketConnect`] too.
    pub fn from_connect_errno(errno: rustix::io::Errno) -> Self {
        use rustix::io::Errno;
        match errno {
            Errno::CONNREFUSED | Errno::NOENT | Errno::ACCESS => {
                Error::SocketConnect(io::Error::from_raw_os_error(errno.raw_os_error()))
            }
            other => Error::from_errno(other),
        }
    }

    /// Whether the operation may succeed if retried.
    pub fn is_retry(&self) -> bool {
        matches!(self, Error::SocketRetry(_) | Error::Timeout)
    }

    /// Whether the connection is unusable (the peer left or the socket broke).
    pub fn is_disconnect(&self) -> bool {
        matches!(self, Error::Disconnect | Error::SocketBroken(_))
    }

    /// Whether the connection must be closed after this error: the peer left, the
    /// socket failed, or the stream lost its message boundaries (an oversized, partial
    /// or truncated message, an unexpected reply). Other errors refuse one message and
    /// leave the connection usable.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Error::Disconnect
                | Error::OversizedMessage { .. }
                | Error::PartialMessage { .. }
                | Error::RecvBufferTooSmall { .. }
                | Error::RepliesOverdue { .. }
                | Error::SocketBroken(_)
                | Error::SocketConnect(_)
                | Error::SocketError(_)
                | Error::SocketRetry(_)
                | Error::Timeout
                | Error::TruncatedControl { .. }
                | Error::UnexpectedReply { .. }
        )
    }

    /// The errno to report to a peer in a status reply for this error (the reply
    /// carries its negation).
    pub fn status_errno(&self) -> i32 {
        match self {
            Error::ReqHandlerError(e) => e.raw_os_error().unwrap_or(libc::EIO),
            Error::FeatureMismatch { .. } | Error::InvalidOperation(_) => libc::ENOTSUP,
            _ => libc::EINVAL,
        }
    }
}

impl From<rustix::io::Errno> for Error {
    fn from(errno: rustix::io::Errno) -> Self {
        Error::from_errno(errno)
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(raw) => Error::from_errno(rustix::io::Errno::from_raw_os_error(raw)),
            None => Error::SocketError(e),
        }
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Result type of request handler trait methods: an `io::Error` whose errno is sent to
/// the peer where the protocol has a status reply.
pub type HandlerResult<T> = std::result::Result<T, io::Error>;

#[cfg(test)]
mod tests {
    use rustix::io::Errno;

    use super::*;

    #[test]
    fn classifies_errnos_like_crosvm() {
        for e in [Errno::AGAIN, Errno::INTR, Errno::NOBUFS, Errno::NOMEM] {
            assert!(
                matches!(Error::from_errno(e), Error::SocketRetry(_)),
                "{e:?}"
            );
        }
        for e in [Errno::CONNRESET, Errno::PIPE] {
            assert!(
                matches!(Error::from_errno(e), Error::SocketBroken(_)),
                "{e:?}"
            );
        }
        assert!(matches!(
            Error::from_errno(Errno::ACCESS),
            Error::SocketConnect(_)
        ));
        assert!(matches!(
            Error::from_connect_errno(Errno::CONNREFUSED),
            Error::SocketConnect(_)
        ));
        assert!(matches!(
            Error::from_errno(Errno::BADF),
            Error::SocketError(_)
        ));
        let io: Error = io::Error::from_raw_os_error(libc::EAGAIN).into();
        assert!(io.is_retry());
        assert!(Error::Disconnect.is_disconnect());
    }

    #[test]
    fn messages_name_the_values() {
        let e = Error::RecvBufferTooSmall { got: 4, want: 12 };
        assert_eq!(
            e.to_string(),
            "receive buffer too small, data was dropped: got 4 bytes, needed 12"
        );
        let e = Error::IncorrectFds {
            request: "SET_MEM_TABLE",
            got: 3,
            want: "one per region",
        };
        assert_eq!(
            e.to_string(),
            "SET_MEM_TABLE: got 3 file descriptors, expected one per region"
        );
        assert_eq!(
            Error::ReqHandlerError(io::Error::from_raw_os_error(libc::ENOSYS)).status_errno(),
            libc::ENOSYS
        );
    }
}
