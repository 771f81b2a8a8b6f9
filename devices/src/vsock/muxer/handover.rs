//! The muxer in a handover record ([`Muxer::save`]) and a muxer made from one
//! ([`Muxer::load`]), for a device handed to another process (see
//! [`crate::vsock::VsockHandover`]).
//!
//! Fields, in order (see [`outboard_protocol::record`] for the encoding):
//!
//! 1. host side: `u8` 0 (AF_UNIX; fds: the stream listener, the seqpacket listener)
//!    or 1 (AF_VSOCK; `u32` forward CID, a count, then each listen port as `u32`; an fd
//!    per port);
//! 2. `u32` the next host port to try for a host-initiated connection;
//! 3. a count, then each connection ([`Conn::save`]; an fd each);
//! 4. a count, then each host client that has not sent its `CONNECT` line: `u16`
//!    socket type, `u64` nanoseconds left before it is dropped (an fd each);
//! 5. a count, then the RX list in order: `u32` host port, `u32` guest port;
//! 6. a count, then each RST waiting for an RX buffer: its 44-byte packet header.
//!
//! The fds travel beside the record in exactly that order. Nothing else needs to
//! travel: epoll registrations and the timer are made anew from the connections'
//! states and deadlines, edge-triggered sockets report their readiness again when they
//! are added to the new epoll set, and connections are marked readable so a read
//! finds out what is there.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use outboard_protocol::record::{RecordError, RecordReader, RecordWriter};
use outboard_protocol::vsock::{VsockHeader, VsockType};
use zerocopy::{FromBytes, IntoBytes};

use super::handshake::PendingHost;
use super::timers::TimerKey;
use super::{
    HostSide, Muxer, CONN_EVENTS, CONN_EVENTS_OUT, MAX_ORPHAN_RSTS, TOKEN_CONN, TOKEN_PENDING,
};
use crate::vsock::conn::Conn;
use crate::vsock::{sys, VsockBackend, VsockError, MAX_PENDING_HOST_CONNECTIONS};

const HOST_UNIX: u8 = 0;
const HOST_VSOCK: u8 = 1;

fn nanos_left(at: Instant, now: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(now).as_nanos()).unwrap_or(u64::MAX)
}

/// The next fd of a handover, or the error saying which one is missing.
fn next_fd(
    fds: &mut impl Iterator<Item = OwnedFd>,
    what: &'static str,
) -> Result<OwnedFd, VsockError> {
    fds.next().ok_or(VsockError::HandoverFds(what))
}

fn dup(fd: impl AsFd) -> Result<OwnedFd, VsockError> {
    fd.as_fd()
        .try_clone_to_owned()
        .map_err(VsockError::HandoverDup)
}

impl Muxer {
    /// Appends the muxer's state to `w` and a duplicate of each of its sockets to
    /// `fds` (see the module docs for the order). The muxer is not changed: it goes on
    /// serving if the handover does not happen.
    pub fn save(&self, w: &mut RecordWriter, fds: &mut Vec<OwnedFd>) -> Result<(), VsockError> {
        let now = Instant::now();
        match &self.host {
            HostSide::Unix {
                listener,
                seq_listener,
                ..
            } => {
                w.u8(HOST_UNIX);
                fds.push(dup(listener)?);
                fds.push(dup(seq_listener)?);
            }
            HostSide::Vsock { cid, listeners } => {
                w.u8(HOST_VSOCK).u32(*cid).count(listeners.len());
                for (fd, port) in listeners {
                    w.u32(*port);
                    fds.push(dup(fd)?);
                }
            }
        }
        w.u32(self.next_local_port).count(self.conns.len());
        for conn in self.conns.values() {
            conn.save(w, now);
            fds.push(dup(conn.fd())?);
        }
        w.count(self.pending.len());
        for p in self.pending.values() {
            w.u16(p.ty as u16).u64(nanos_left(p.deadline, now));
            fds.push(dup(&p.fd)?);
        }
        w.count(self.rx_list.len());
        for (local, peer) in &self.rx_list {
            w.u32(*local).u32(*peer);
        }
        w.count(self.orphan_rsts.len());
        for hdr in &self.orphan_rsts {
            w.raw(hdr.as_bytes());
        }
        Ok(())
    }

    /// A muxer in the state [`Muxer::save`] recorded, on the sockets `fds` (taken in
    /// the recorded order). `backend` is this device's configuration: the record must
    /// describe the same kind of host side (and, for AF_VSOCK, the same forward CID and
    /// ports). Every value is checked as the record is read; a record that does not fit
    /// this device is refused whole.
    pub fn load(
        guest_cid: u64,
        backend: &VsockBackend,
        tx_buf_size: u32,
        max_connections: usize,
        metrics: std::sync::Arc<crate::vsock::VsockMetrics>,
        r: &mut RecordReader<'_>,
        fds: &mut impl Iterator<Item = OwnedFd>,
    ) -> Result<Muxer, VsockError> {
        let now = Instant::now();
        let kind = r.u8("host side")?;
        let host = match (kind, backend) {
            (HOST_UNIX, VsockBackend::Unix(uds_path)) => HostSide::Unix {
                uds_path: uds_path.clone(),
                listener: next_fd(fds, "the stream listener")?,
                seq_listener: next_fd(fds, "the seqpacket listener")?,
            },
            (HOST_VSOCK, VsockBackend::Vsock(fwd)) => {
                let cid = r.u32("forward CID")?;
                let n = r.count("listen ports", super::super::MAX_FORWARD_LISTEN_PORTS, 4)?;
                let mut listeners = Vec::with_capacity(n);
                for _ in 0..n {
                    let port = r.u32("listen port")?;
                    listeners.push((next_fd(fds, "a forward listener")?, port));
                }
                let ports: Vec<u32> = listeners.iter().map(|(_, p)| *p).collect();
                if cid != fwd.cid || ports != fwd.listen_ports {
                    return Err(VsockError::HandoverMismatch(format!(
                        "the record forwards to CID {cid} and listens on {ports:?}, this \
                         device is configured for CID {} and {:?}",
                        fwd.cid, fwd.listen_ports
                    )));
                }
                HostSide::Vsock { cid, listeners }
            }
            (HOST_UNIX | HOST_VSOCK, _) => {
                return Err(VsockError::HandoverMismatch(
                    "the record's host side (AF_UNIX or AF_VSOCK) is not this device's".into(),
                ))
            }
            (k, _) => {
                return Err(RecordError::Invalid {
                    field: "host side",
                    value: u64::from(k),
                    why: "0 (AF_UNIX) or 1 (AF_VSOCK)",
                }
                .into())
            }
        };
        let mut m = Muxer::with_host(guest_cid, host, tx_buf_size, max_connections, metrics)?;
        m.next_local_port = r.u32("next host port")?;
        let n = r.count("connections", max_connections, 64)?;
        for _ in 0..n {
            let fd = next_fd(fds, "a connection's socket")?;
            let conn = Conn::load(r, fd, now, tx_buf_size)?;
            m.load_conn(conn)?;
        }
        let n = r.count("pending host clients", MAX_PENDING_HOST_CONNECTIONS, 10)?;
        for _ in 0..n {
            let raw_ty = r.u16("pending client type")?;
            let ty = VsockType::from_raw(raw_ty).map_err(|_| RecordError::Invalid {
                field: "pending client type",
                value: u64::from(raw_ty),
                why: "1 (stream) or 2 (seqpacket)",
            })?;
            let deadline = now + Duration::from_nanos(r.u64("pending client deadline")?);
            let fd = next_fd(fds, "a pending host client's socket")?;
            let raw = fd.as_raw_fd();
            let token = TOKEN_PENDING | raw as u32 as u64;
            sys::epoll_add(
                &m.epoll,
                fd.as_fd(),
                super::handshake::PENDING_EVENTS,
                token,
            )
            .map_err(VsockError::Epoll)?;
            m.pending.insert(raw, PendingHost { fd, ty, deadline });
            m.deadlines.push_back((deadline, TimerKey::Pending(raw)));
        }
        let n = r.count("RX list", max_connections, 8)?;
        let mut listed = 0;
        for _ in 0..n {
            let key = (r.u32("RX list host port")?, r.u32("RX list guest port")?);
            if !m.conns.get(&key).is_some_and(Conn::in_rx_list) || m.rx_list.contains(&key) {
                return Err(VsockError::HandoverMismatch(format!(
                    "the RX list names connection {key:?}, which is not a connection marked \
                     as listed, or names it twice"
                )));
            }
            m.rx_list.push_back(key);
            listed += 1;
        }
        let marked = m.conns.values().filter(|c| c.in_rx_list()).count();
        if listed != marked {
            return Err(VsockError::HandoverMismatch(format!(
                "{marked} connections are marked as on the RX list, the list holds {listed}"
            )));
        }
        let n = r.count("orphan RSTs", MAX_ORPHAN_RSTS, VsockHeader::SIZE)?;
        let mut orphans = VecDeque::with_capacity(n);
        for _ in 0..n {
            let raw = r.raw("orphan RST header", VsockHeader::SIZE)?;
            let hdr = VsockHeader::read_from_bytes(raw).map_err(|_| RecordError::Invalid {
                field: "orphan RST header",
                value: raw.len() as u64,
                why: "a 44-byte vsock header",
            })?;
            orphans.push_back(hdr);
        }
        m.orphan_rsts = orphans;
        // Deadlines were queued connection by connection: put them in time order.
        m.deadlines.make_contiguous().sort_by_key(|(at, _)| *at);
        m.rearm_timer();
        Ok(m)
    }

    /// Adds a connection read from a handover record: in the tables, in the epoll
    /// set unless it is waiting for its RST to go out, its deadline queued.
    fn load_conn(&mut self, conn: Conn) -> Result<(), VsockError> {
        let key = conn.key();
        if self.conns.contains_key(&key) {
            return Err(VsockError::HandoverMismatch(format!(
                "connection {key:?} is in the record twice"
            )));
        }
        let fd = conn.fd().as_raw_fd();
        if conn.in_epoll() {
            let events = if conn.tx_pending() || conn.host_connecting() {
                CONN_EVENTS_OUT
            } else {
                CONN_EVENTS
            };
            let token = TOKEN_CONN | fd as u32 as u64;
            sys::epoll_add(&self.epoll, conn.fd(), events, token).map_err(VsockError::Epoll)?;
            self.fd_keys.insert(fd, key);
        }
        *self.local_ports.entry(conn.local_port()).or_insert(0) += 1;
        if let Some(at) = conn.deadline() {
            self.deadlines.push_back((at, TimerKey::Conn(key)));
        }
        self.conns.insert(key, conn);
        Ok(())
    }
}
