//! vhost-user front-end and back-end over Unix sockets with fd passing, the back-end ->
//! front-end channel, and a typed [`Tube`] (feature `tube`).
//!
//! This is Outboard's second layer: it moves the wire structures of
//! [`outboard_protocol`] over `AF_UNIX` sockets and enforces the protocol's rules on
//! everything a peer sends.
//!
//! # Modules
//!
//! - [`sock`]: send and receive with `SCM_RIGHTS` (`OwnedFd`/`BorrowedFd` only,
//!   `MSG_CMSG_CLOEXEC`, a bound on fds per message, truncation is an error).
//! - [`connection`]: [`Connection`], vhost-user messages (header, body, payload, fds)
//!   over a Unix stream socket, size bounds checked before allocating.
//! - [`backend`]: the back-end server. [`BackendReqHandler`] validates every front-end
//!   request and calls your [`VhostUserBackendReqHandler`]; [`Listener`]
//!   accepts front-ends.
//! - [`frontend`]: [`Frontend`], the client with a method for every front-end request.
//! - [`backend_req`] and [`frontend_req_handler`]: the back-end -> front-end channel,
//!   [`BackendReqSender`] (the back-end's sender) and [`FrontendReqHandler`] (the front-end's
//!   server, calling your [`VhostUserFrontendReqHandler`]).
//! - [`tube`] (feature `tube`): [`Tube`], a typed request/response channel over
//!   `SOCK_SEQPACKET`.
//! - [`error`]: [`Error`], which classifies socket errors (retry, broken, connect, ...).
//!
//! # Cargo features
//!
//! - `tube` (off by default): the `tube` module and `Tube`, whose serde messages pull in
//!   serde and serde_json; a vhost-user front-end or back-end does not need it.
//! - `crosvm` (off by default): crosvm's non-standard back-end -> front-end requests
//!   `GPU_MAP` (1006) and `EXTERNAL_MAP` (1007), on both sides of the channel
//!   (`BackendReqSender::gpu_map`, `BackendReqSender::external_map` and the matching
//!   [`VhostUserFrontendReqHandler`] methods).
//!
//! # Interoperability notes
//!
//! Tested against rust-vmm's `vhost` 0.18 in both directions (see `tests/interop.rs`).
//! Where peers diverge from the spec, this crate sends what the spec says and accepts
//! what common peers send when that is unambiguous: a `SET_LOG_BASE` reply may be the
//! spec's `u64` status or rust-vmm's echo of the log body. `SET_OWNER` is required
//! before any request except the negotiation QEMU performs first (see [`backend`]).
//!
//! # Vocabulary
//!
//! The current vhost-user specification's words are used throughout: the *front-end* is
//! the VMM side and the *back-end* is the device side. Older code (QEMU before 2023,
//! rust-vmm `vhost` before 0.8, crosvm before 2023) calls them *master* and *slave*;
//! when porting, read `Master` as [`Frontend`], `Slave` as the back-end side as a whole
//! (rust-vmm's `Slave` sender, now its `Backend`, is [`BackendReqSender`]: it sends the
//! back-end's requests to the front-end; `Backend` is kept here as a deprecated alias),
//! `SlaveReqHandler` as `BackendReqHandler`, `MasterReqHandler` as
//! `FrontendReqHandler`, `SET_SLAVE_REQ_FD` as `SET_BACKEND_REQ_FD` and the protocol
//! features `SLAVE_REQ`/`SLAVE_SEND_FD` as `BACKEND_REQ`/`BACKEND_SEND_FD`.

// Without the `tube` feature these links point at the feature list.
#![cfg_attr(
    feature = "tube",
    doc = "[`tube`]: crate::tube\n\n[`Tube`]: crate::Tube"
)]
#![cfg_attr(
    not(feature = "tube"),
    doc = "[`tube`]: #cargo-features\n\n[`Tube`]: #cargo-features"
)]
#![deny(missing_docs)]

pub mod backend;
pub mod backend_req;
pub mod connection;
pub mod error;
pub mod frontend;
pub mod frontend_req_handler;
pub mod sock;
#[cfg(feature = "tube")]
pub mod tube;

pub use backend::{
    BackendReqHandler, Listener, MemoryRegion, SessionState, VhostUserBackendReqHandler,
};
#[allow(deprecated)]
pub use backend_req::{Backend, BackendReqSender};
pub use connection::{Connection, Message, PartialMessage};
pub use error::{Error, HandlerResult, Result};
pub use frontend::{Frontend, MemoryRegionRef};
pub use frontend_req_handler::{FrontendReqHandler, VhostUserFrontendReqHandler};
#[cfg(feature = "tube")]
pub use tube::Tube;

#[cfg(test)]
mod session_tests;
