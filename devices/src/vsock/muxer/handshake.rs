//! Host-initiated connections: a host client connects to `<uds_path>` (or
//! `<uds_path>_seqpacket`), writes `CONNECT <port>\n`, and is answered `OK <host_port>\n`
//! once the guest accepted the REQUEST. With the AF_VSOCK backend, a host client of
//! forward port `P` asks for guest port `P` by connecting; it is told nothing.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::Instant;

use outboard_protocol::vsock::{VsockType, VMADDR_PORT_ANY};
use rustix::event::epoll::EventFlags;
use rustix::net::RecvFlags;

use super::timers::TimerKey;
use super::{EpollOp, HostSide, Muxer, TOKEN_PENDING};
use crate::vsock::conn::{Action, Conn, ConnKey, Fault};
use crate::vsock::{
    sys, VsockMetrics, CONN_TIMEOUT, HOST_PORT_BASE, MAX_CONNECT_LINE, MAX_PENDING_HOST_CONNECTIONS,
};

pub(super) const PENDING_EVENTS: EventFlags = EventFlags::IN
    .union(EventFlags::RDHUP)
    .union(EventFlags::ET);

/// A host client that connected to a listener and has not sent `CONNECT <port>` yet.
#[derive(Debug)]
pub(super) struct PendingHost {
    pub(super) fd: OwnedFd,
    pub(super) ty: VsockType,
    /// When the client is dropped if its line has not come.
    pub(super) deadline: Instant,
}

/// Parses `CONNECT <port>` (the word case-insensitive, the newline already removed).
pub(crate) fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split_ascii_whitespace();
    let cmd = words.next()?;
    let port = words.next()?;
    if words.next().is_some() || !cmd.eq_ignore_ascii_case("connect") {
        return None;
    }
    port.parse().ok()
}

impl Muxer {
    /// Takes up to `max` waiting clients from `listener` (level-triggered: what is
    /// not accepted now reports again).
    fn accept_some(&self, listener: &OwnedFd, max: usize) -> Vec<OwnedFd> {
        let mut accepted = Vec::new();
        while accepted.len() < max {
            match sys::accept(listener) {
                Ok(fd) => accepted.push(fd),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    VsockMetrics::inc(&self.metrics.err_muxer);
                    break;
                }
            }
        }
        accepted
    }

    /// Accepts host clients on the stream or seqpacket listener; each has
    /// [`CONN_TIMEOUT`] to send its `CONNECT` line.
    pub(super) fn accept(&mut self, ty: VsockType) {
        let HostSide::Unix {
            listener,
            seq_listener,
            ..
        } = &self.host
        else {
            return;
        };
        let listener = match ty {
            VsockType::Stream => listener,
            VsockType::Seqpacket => seq_listener,
        };
        for fd in self.accept_some(listener, MAX_PENDING_HOST_CONNECTIONS + 1) {
            if self.pending.len() >= MAX_PENDING_HOST_CONNECTIONS
                || self.conns.len() >= self.max_connections
            {
                // Dropping the socket closes it: the client sees end-of-file.
                VsockMetrics::inc(&self.metrics.err_conn_limit);
                continue;
            }
            let raw = fd.as_raw_fd();
            let token = TOKEN_PENDING | raw as u32 as u64;
            if sys::epoll_add(&self.epoll, fd.as_fd(), PENDING_EVENTS, token).is_err() {
                VsockMetrics::inc(&self.metrics.err_muxer);
                continue;
            }
            let deadline = Instant::now() + CONN_TIMEOUT;
            self.pending.insert(raw, PendingHost { fd, ty, deadline });
            self.push_deadline(deadline, TimerKey::Pending(raw));
        }
    }

    /// Accepts host clients of AF_VSOCK forward listener `index`: each becomes a
    /// LocalInit connection to the guest port of the same number at once (REQUEST is
    /// queued; the guest has [`CONN_TIMEOUT`] to accept). Beyond the connection cap a
    /// client is closed at once.
    pub(super) fn accept_forwarded(&mut self, index: usize) {
        let HostSide::Vsock { listeners, .. } = &self.host else {
            return;
        };
        let Some((listener, port)) = listeners.get(index) else {
            VsockMetrics::inc(&self.metrics.err_muxer);
            return;
        };
        let port = *port;
        let room = self.max_connections.saturating_sub(self.conns.len());
        // One more than there is room for, so a client beyond the cap is closed (and
        // counted) rather than left waiting in the backlog.
        for fd in self.accept_some(listener, room + 1) {
            let local_port = match self.alloc_local_port() {
                Some(p) if self.conns.len() < self.max_connections => p,
                _ => {
                    VsockMetrics::inc(&self.metrics.err_conn_limit);
                    continue;
                }
            };
            let ty = VsockType::Stream;
            let mut conn = Conn::new_local_init(fd, ty, local_port, port, self.buf_alloc(ty));
            conn.probe_peer_close();
            self.insert(conn, EpollOp::Add);
        }
    }

    /// Forgets a pending host client (its socket is closed).
    pub(super) fn drop_pending(&mut self, fd: RawFd) {
        if let Some(p) = self.pending.remove(&fd) {
            // Out of the set before its socket closes (when `p` drops).
            let _ = sys::epoll_delete(&self.epoll, p.fd.as_fd());
        }
    }

    /// A pending host client's socket is readable: its `CONNECT <port>` line makes a
    /// LocalInit connection; anything else closes it.
    pub(super) fn pending_readable(&mut self, fd: RawFd) {
        let Some(p) = self.pending.get(&fd) else {
            return;
        };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let line_len = match p.ty {
            VsockType::Stream => match sys::recv(p.fd.as_fd(), &mut buf, RecvFlags::PEEK) {
                Ok(0) => None,
                Ok(n) => match buf[..n].iter().position(|b| *b == b'\n') {
                    // Consume exactly the line; what follows is stream data.
                    Some(i) => match sys::recv(p.fd.as_fd(), &mut buf[..=i], RecvFlags::empty()) {
                        Ok(m) if m == i + 1 => Some(i),
                        _ => None,
                    },
                    None if n < MAX_CONNECT_LINE => return,
                    None => None,
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => None,
            },
            VsockType::Seqpacket => match sys::recv(p.fd.as_fd(), &mut buf, RecvFlags::TRUNC) {
                Ok(n) if n > 0 && n <= MAX_CONNECT_LINE => {
                    Some(if buf[n - 1] == b'\n' { n - 1 } else { n })
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                _ => None,
            },
        };
        let port = line_len.and_then(|n| parse_connect_line(&buf[..n]));
        let (Some(port), Some(local_port)) = (port, self.alloc_local_port()) else {
            VsockMetrics::inc(&self.metrics.err_bad_connect_line);
            self.drop_pending(fd);
            return;
        };
        if self.conns.len() >= self.max_connections {
            VsockMetrics::inc(&self.metrics.err_conn_limit);
            self.drop_pending(fd);
            return;
        }
        let Some(PendingHost { fd: sock, ty, .. }) = self.pending.remove(&fd) else {
            return;
        };
        let conn = Conn::new_local_init(sock, ty, local_port, port, self.buf_alloc(ty));
        // The fd is in the epoll set already: re-register it under the connection token.
        self.insert(conn, EpollOp::Modify);
    }

    /// The guest accepted the REQUEST of connection `key`: the host client is told
    /// `OK <local_port>\n` (a failed write resets the connection). AF_VSOCK clients
    /// are told nothing: their connect was the whole handshake.
    pub(super) fn confirm_host_connect(&mut self, key: ConnKey) {
        if matches!(self.host, HostSide::Vsock { .. }) {
            self.apply(key, Action::Continue);
            return;
        }
        let Some(conn) = self.conns.get(&key) else {
            return;
        };
        let line = format!("OK {}\n", conn.local_port());
        match sys::send(conn.fd(), line.as_bytes()) {
            Ok(n) if n == line.len() => self.apply(key, Action::Continue),
            _ => self.apply(key, Action::Kill(Fault::HostIo)),
        }
    }

    fn alloc_local_port(&mut self) -> Option<u32> {
        // At most `max_connections` local ports are in use, so this finds a free one.
        for _ in 0..=(self.max_connections + MAX_PENDING_HOST_CONNECTIONS) {
            let port = self.next_local_port;
            self.next_local_port = if port >= VMADDR_PORT_ANY - 1 {
                HOST_PORT_BASE
            } else {
                port + 1
            };
            if !self.local_ports.contains_key(&port) {
                return Some(port);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::parse_connect_line;

    #[test]
    fn connect_line() {
        assert_eq!(parse_connect_line(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect_line(b"connect 1234"), Some(1234));
        assert_eq!(parse_connect_line(b"Connect  7 "), Some(7));
        assert_eq!(parse_connect_line(b"CONNECT"), None);
        assert_eq!(parse_connect_line(b"CONNECT 52 x"), None);
        assert_eq!(parse_connect_line(b"CONNECT -1"), None);
        assert_eq!(parse_connect_line(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect_line(b"HELLO 52"), None);
        assert_eq!(parse_connect_line(&[0xff, b' ', b'1']), None);
    }
}
