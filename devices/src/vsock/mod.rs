//! virtio-vsock with an AF_UNIX muxer in Firecracker's convention.
//!
//! # Structure
//!
//! - [`Vsock`] (`device.rs`): the virtio device: rx, tx and event queues, config space
//!   with the guest CID, features, activate/reset, TRANSPORT_RESET, and the event-loop
//!   interface ([`crate::virtio::VirtioDevice`]).
//! - `packet.rs`: parsing of driver packets from descriptor chains whose header and
//!   payload may be split across descriptors in any way.
//! - `conn.rs`: one connection: state machine (LocalInit, PeerInit, Established,
//!   LocalClosed, PeerClosed, Killed) behind methods named after the protocol's events,
//!   each returning what the muxer must do; credit flow control both ways, the
//!   per-connection TX buffer.
//! - `muxer/`: the AF_UNIX muxer, which routes guest packets and host socket events to
//!   connections: listeners, the epoll set (`mod.rs`), guest packets and
//!   guest-initiated connects (`tx.rs`), host-initiated `CONNECT <port>\n` handshakes
//!   and port allocation (`handshake.rs`), timers (`timers.rs`), RX scheduling
//!   (`rx.rs`).
//! - `sibling.rs`: guest-to-guest traffic between devices linked as siblings
//!   ([`VsockSibling`], [`Vsock::sibling`]): each device's bounded inbox, the credit
//!   check on sibling connections, delivery into the RX queue.
//!
//! # The AF_UNIX convention (Firecracker's)
//!
//! - Guest -> host: a guest connecting to host port `P` makes the device connect to the
//!   Unix socket `<uds_path>_P`. No listener there: the guest gets RST.
//! - Host -> guest: a host process connects to `<uds_path>` and writes `CONNECT <port>\n`
//!   (at most 32 bytes, the word matched case-insensitively). Anything else closes the
//!   socket. The device sends REQUEST to guest port `<port>`; when the guest answers
//!   RESPONSE the device writes `OK <host_port>\n`, where `<host_port>` is the local
//!   port the device assigned to the connection (from 2^30 upwards), exactly as
//!   Firecracker does. (vhost-device-vsock answers with the guest port instead.) A guest
//!   RST or a timeout closes the host socket.
//! - End of file from a host socket (the host shut down its sending side) becomes
//!   SHUTDOWN with the SEND flag, so the guest can still send; a host socket that hung
//!   up completely becomes SHUTDOWN with both flags, after which the guest answers RST
//!   (or the device sends it after a 2 s timeout). (Firecracker sends both flags on end
//!   of file, which breaks host clients that half-close and wait for an answer.)
//! - SEQPACKET (an extension; Firecracker has none): guest seqpacket sockets connect to
//!   `SOCK_SEQPACKET` listeners at `<uds_path>_P`; host processes reach guest seqpacket
//!   listeners through the `SOCK_SEQPACKET` listener at `<uds_path>_seqpacket` with the
//!   same `CONNECT`/`OK` messages (one message each). Message boundaries are kept both
//!   ways: each host message becomes one or more RW packets, the last marked EOM; the
//!   packets of one guest message (up to EOM) become one host message. The guest's EOR
//!   flag cannot be expressed on AF_UNIX and is dropped; host messages are delivered
//!   with EOM only. A zero-length host message read after the peer hung up cannot be
//!   told from end-of-file and ends the connection.
//!
//! # The AF_VSOCK backend
//!
//! With [`VsockBackend::Vsock`] the host side is the host kernel's own AF_VSOCK
//! (vhost-device-vsock's `--forward-cid`): a guest connect to host port `P` starts a
//! non-blocking AF_VSOCK connect to `(forward cid, P)` of the guest's socket type; the
//! guest hears RESPONSE once it completed and RST if it failed or did not complete in
//! [`CONN_TIMEOUT`] (the device thread never waits for it). Each listen port `P` is an
//! AF_VSOCK stream listener on every local CID; a host client it accepts is connected to
//! guest port `P` at once, without `CONNECT` line or `OK` answer. Everything after the
//! handshake (credit, shutdown, RST, the data path) is the same as with AF_UNIX sockets.
//!
//! # Sibling VMs
//!
//! Devices whose [`VsockSibling`] handles are linked (the glue links the VMs of one
//! group) let their guests connect to each other by CID, as vhost-device-vsock's groups
//! do; a packet for a CID that is neither the host nor a sibling is answered with RST
//! from that CID. Packets cross from one device's worker thread to the other's through
//! the receiver's inbox (at most [`MAX_INBOX_PACKETS`] packets and [`MAX_INBOX_BYTES`]
//! of payload, woken through an eventfd in its epoll set), unchanged, so credit flows
//! between the two guests. A guest that sends beyond the other guest's announced credit,
//! or finds its inbox full, has that connection reset on both sides; no device waits
//! for another, so a stalled sibling stalls none of the other connections.
//!
//! # Data path
//!
//! Guest TX payload goes from guest memory straight into the host socket with
//! `sendmsg` over the chain's regions; only what the socket does not take at once is
//! copied into the per-connection TX buffer, whose size is the credit (`buf_alloc`) the
//! device announces, so a guest that respects credit never finds it full and one that
//! does not is reset. The device announces freed TX buffer with a CREDIT_UPDATE once
//! `min(128 KiB, buf_alloc / 2, the guest's buf_alloc / 2)` bytes were forwarded since it
//! last told the guest (every packet to the guest carries `fwd_cnt` too): Linux guests
//! keep at most their own socket buffer in flight, however large `buf_alloc` is, so a
//! threshold tied to `buf_alloc` alone would leave them waiting. Host data is read with
//! `recvmsg` straight into the payload areas of up to 64 guest RX buffers at once, never
//! beyond the guest's credit. Host sockets are edge-triggered in the muxer's own epoll
//! set, so no epoll_ctl is needed on the data path.

mod conn;
mod device;
mod muxer;
mod packet;
mod sibling;
pub mod snapshot;
mod sys;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use thiserror::Error;

pub use device::{Vsock, VsockDeviceConfig, VsockHandover, HANDOVER_MAGIC, HANDOVER_VERSION};
pub use packet::PacketError;
pub use sibling::{
    sibling_socket_pair, VsockSibling, MAX_INBOX_BYTES, MAX_INBOX_PACKETS, MAX_SIBLING_CONNECTIONS,
    REMOTE_CONTROL_RESERVE, REMOTE_SEND_BUFFER,
};
pub use snapshot::{VsockSnapshot, VsockSnapshotError};

/// Default per-connection TX buffer, also the credit (`buf_alloc`) given to the guest.
pub const DEFAULT_TX_BUF_SIZE: u32 = 256 * 1024;
/// Largest accepted TX buffer size.
pub const MAX_TX_BUF_SIZE: u32 = 64 * 1024 * 1024;
/// Most connections at once (Firecracker's limit); more are answered with RST.
pub const MAX_CONNECTIONS: usize = 1023;
/// Most host clients that connected but have not sent their `CONNECT` line yet.
pub const MAX_PENDING_HOST_CONNECTIONS: usize = 128;
/// Longest accepted `CONNECT <port>\n` line.
pub const MAX_CONNECT_LINE: usize = 32;
/// Time the guest has to answer a REQUEST, and to finish a shutdown, before RST.
pub const CONN_TIMEOUT: Duration = Duration::from_millis(2000);
/// First local port given to host-initiated connections (Firecracker's choice).
pub const HOST_PORT_BASE: u32 = 1 << 30;
/// Largest message a SEQPACKET connection accepts from the guest (also its credit):
/// AF_UNIX seqpacket sockets refuse messages above their send buffer (~208 KiB).
pub const MAX_SEQPACKET_MSG: u32 = 128 * 1024;
/// Queue size the device offers for each of its three queues.
pub const QUEUE_SIZE: u16 = 256;

/// Most AF_VSOCK ports one device listens on for [`VsockBackend::Vsock`].
pub const MAX_FORWARD_LISTEN_PORTS: usize = 64;

/// Where the host side of the guest's connections lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VsockBackend {
    /// Firecracker's hybrid vsock over AF_UNIX (see the module docs): guest connects
    /// go to `<path>_<port>`, host clients connect to `<path>` and send `CONNECT`.
    Unix(PathBuf),
    /// The host's own AF_VSOCK (vhost-device-vsock's `--forward-cid`): guest connects
    /// go to `(cid, port)` through the host kernel (`vsock_loopback` for CID 1,
    /// `vhost_vsock` for a VM the kernel serves), and host clients reach the guest
    /// through the listed ports.
    Vsock(VsockForward),
}

/// The AF_VSOCK side of [`VsockBackend::Vsock`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockForward {
    /// The CID guest connects to the host (CID 2) are forwarded to, on the same
    /// port. Stream and seqpacket sockets both forward; the connect is non-blocking,
    /// the guest gets RESPONSE once the host side accepted and RST if it refused or
    /// did not answer in [`CONN_TIMEOUT`].
    pub cid: u32,
    /// AF_VSOCK stream ports the device listens on (any local CID); a host
    /// connection accepted on port `P` becomes a connection to guest port `P`, with
    /// no `CONNECT` line and no `OK` answer (at most [`MAX_FORWARD_LISTEN_PORTS`]).
    pub listen_ports: Vec<u32>,
}

impl VsockForward {
    /// Binds each listen port and lets it go again: what [`Vsock::new`] will do, for a
    /// daemon that creates the device in another process (a jailed worker) and wants a
    /// port it cannot have to be a configuration error before that process exists.
    pub fn check_listen_ports(&self) -> Result<(), VsockError> {
        self.listen().map(drop)
    }

    /// A listener on each listen port, in order, with its port.
    pub(crate) fn listen(&self) -> Result<Vec<(std::os::fd::OwnedFd, u32)>, VsockError> {
        self.listen_ports
            .iter()
            .map(|&port| {
                sys::vsock_listen(port)
                    .map(|fd| (fd, port))
                    .map_err(|source| VsockError::ForwardListen { port, source })
            })
            .collect()
    }
}

/// Errors of [`Vsock::new`].
#[cfg_attr(test, remain::sorted)]
#[derive(Debug, Error)]
pub enum VsockError {
    /// The muxer's epoll set could not be created.
    #[error("cannot create the muxer epoll set: {0}")]
    Epoll(std::io::Error),
    /// A forward CID that names no peer (`VMADDR_CID_ANY`).
    #[error("forward CID {0} is invalid: it must name one peer (not 4294967295)")]
    ForwardCid(u32),
    /// An AF_VSOCK listening port could not be bound.
    #[error("cannot listen on AF_VSOCK port {port}: {source}")]
    ForwardListen {
        /// The port.
        port: u32,
        /// The OS error.
        source: std::io::Error,
    },
    /// A forward listen port list with a port twice, `VMADDR_PORT_ANY` or too many
    /// ports.
    #[error("forward listen ports {ports:?}: {reason}")]
    ForwardPorts {
        /// The ports given.
        ports: Vec<u32>,
        /// What is wrong.
        reason: String,
    },
    /// A socket of the device could not be duplicated for a handover.
    #[error("cannot duplicate a socket for the handover: {0}")]
    HandoverDup(std::io::Error),
    /// A handover came with fewer fds than its record needs.
    #[error("the handover ran out of fds at {0}")]
    HandoverFds(&'static str),
    /// A handover record that does not fit this device.
    #[error("the handover does not fit this device: {0}")]
    HandoverMismatch(String),
    /// A handover record that could not be read.
    #[error(transparent)]
    HandoverRecord(#[from] outboard_protocol::record::RecordError),
    /// The device cannot be handed over in its current state.
    #[error("the device cannot be handed over: {0}")]
    HandoverRefused(String),
    /// The guest CID is reserved or out of range.
    #[error("guest CID {0} is invalid (must be 3..0xffffffff)")]
    InvalidCid(u64),
    /// A listening socket could not be bound.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// The socket path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The connection cap is zero or above [`MAX_CONNECTIONS`].
    #[error("max connections {0} is out of range (1..={MAX_CONNECTIONS})")]
    MaxConnections(usize),
    /// Two devices with the same guest CID cannot be siblings.
    #[error("guest CID {0} cannot be its own sibling")]
    SiblingCid(u64),
    /// A link to a sibling in another process is not a usable socket.
    #[error("the link to sibling CID {cid}: {reason}")]
    SiblingSocket {
        /// The sibling's CID.
        cid: u64,
        /// What is wrong with the socket.
        reason: String,
    },
    /// The timer could not be created.
    #[error("cannot create the muxer timer: {0}")]
    Timer(std::io::Error),
    /// The TX buffer size is zero or too large.
    #[error("tx buffer size {0} is out of range (1..={MAX_TX_BUF_SIZE})")]
    TxBufSize(u32),
}

macro_rules! metrics {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        /// Live counters of one vsock device (shared, updated with relaxed atomics).
        #[derive(Debug, Default)]
        pub struct VsockMetrics {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
        }

        /// A point-in-time copy of [`VsockMetrics`].
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct VsockMetricsSnapshot {
            $($(#[doc = $doc])* pub $name: u64,)*
        }

        impl VsockMetrics {
            /// Reads every counter.
            pub fn snapshot(&self) -> VsockMetricsSnapshot {
                VsockMetricsSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }

            /// Sets the counter called `name` (one of [`VsockMetricsSnapshot::NAMES`])
            /// to `value`; false for a name this build does not have. For a device
            /// that carries on another's counters (a live upgrade).
            pub fn set(&self, name: &str, value: u64) -> bool {
                match name {
                    $(stringify!($name) => self.$name.store(value, Ordering::Relaxed),)*
                    _ => return false,
                }
                true
            }
        }

        impl VsockMetricsSnapshot {
            /// Every counter's name, in declaration order (the order of
            /// [`VsockMetricsSnapshot::values`]).
            pub const NAMES: &'static [&'static str] = &[$(stringify!($name),)*];
            /// How many counters there are.
            pub const COUNT: usize = Self::NAMES.len();
            /// Every counter's description (its doc comment, lines joined), in the order
            /// of [`VsockMetricsSnapshot::NAMES`]: help text for metrics exporters.
            pub const HELP: &'static [&'static str] = &[$(concat!($($doc),*),)*];

            /// Every counter's value, in the order of [`VsockMetricsSnapshot::NAMES`].
            pub fn values(&self) -> [u64; Self::COUNT] {
                [$(self.$name,)*]
            }

            /// `(name, value)` of every counter, in declaration order.
            pub fn fields(&self) -> impl Iterator<Item = (&'static str, u64)> {
                Self::NAMES.iter().copied().zip(self.values())
            }
        }
    };
}

metrics! {
    /// Packets the device put on the RX queue (device -> guest).
    rx_packets,
    /// Payload bytes the device put on the RX queue.
    rx_bytes,
    /// Packets the device took from the TX queue (guest -> device), valid or not.
    tx_packets,
    /// Payload bytes of valid TX packets forwarded to connections.
    tx_bytes,
    /// Guest packets forwarded to a sibling VM's device.
    sibling_packets,
    /// Connections created (either side initiated).
    conns_added,
    /// Connections killed by the device (RST sent because of an error or timeout).
    conns_killed,
    /// Connections removed (closed and forgotten).
    conns_removed,
    /// TX chains whose readable half is shorter than the header.
    err_tx_short_header,
    /// TX chains whose header sits in write-only descriptors.
    err_tx_write_only_header,
    /// TX packets with `len` above 64 KiB or beyond the chain.
    err_tx_bad_len,
    /// TX packets with a wrong source CID (dropped) or for a CID that is neither the
    /// host nor a sibling (answered with RST from that CID).
    err_tx_bad_cid,
    /// TX packets with an unknown op, type or flags (answered with RST).
    err_tx_invalid,
    /// RX chains too small or read-only (returned unused).
    err_rx_bad_buffer,
    /// Malformed chains and ring access errors reported by the queues.
    err_queue,
    /// Data or control packets for a connection that does not exist (answered with RST).
    err_no_connection,
    /// Guest packets sent beyond the credit the device gave (connection reset).
    err_credit_overrun,
    /// Guest packets to a sibling beyond the other guest's credit, or finding its inbox
    /// full (connection reset both ways).
    err_sibling_overrun,
    /// Messages from a sibling in another process that failed the checks (wrong CIDs,
    /// length, op, type or flags; dropped).
    err_sibling_invalid,
    /// Guest connects that found no host listener, or whose AF_VSOCK connect failed
    /// or timed out (answered with RST).
    err_connect_failed,
    /// Connections refused because of the connection cap.
    err_conn_limit,
    /// Host clients that sent a bad `CONNECT` line, or none in time.
    err_bad_connect_line,
    /// Host socket I/O errors (connection reset).
    err_host_io,
    /// Connections reset because a request or shutdown timed out.
    err_timeout,
    /// RST replies to unknown connections dropped because their queue was full.
    err_rst_dropped,
    /// Packets for a socket type the driver did not negotiate, or host messages that
    /// can never fit the guest's buffer.
    err_unsupported,
    /// Event queue buffers that could not hold an event.
    err_event_queue,
    /// Muxer epoll, accept or timer failures.
    err_muxer,
}

impl VsockMetrics {
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}
