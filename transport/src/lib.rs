//! vhost-user front-end and back-end over Unix sockets with fd passing, the back-end ->
//! front-end channel, and a typed [`Tube`].
//!
//! This is Outboard's second layer: it moves the wire structures of
//! [`outboard_protocol`] over `AF_UNIX` sockets and enforces the protocol's rules on
//! everything a peer sends.
//!
//! # Modules
//!
//! - [`sock`]: send and receive with `SCM_RIGHTS` (`OwnedFd`/`BorrowedFd` only,
//!   `MSG_CMSG_CLOEXEC`, a bound on fds per message, truncation is an error).
//! - [`tube`]: [`Tube`], a typed request/response channel over `SOCK_SEQPACKET`.
//! - [`error`]: [`Error`], which classifies socket errors (retry, broken, connect, ...).
//!
//! # Vocabulary
//!
//! The current vhost-user specification's words are used throughout: the *front-end* is
//! the VMM side and the *back-end* is the device side. Older code (QEMU before 2023,
//! rust-vmm `vhost` before 0.8, crosvm before 2023) calls them *master* and *slave*;
//! when porting, read `Master` as [`Frontend`], `Slave` as [`Backend`] (or the back-end side as a
//! whole),
//! `SlaveReqHandler` as `BackendReqHandler`, `MasterReqHandler` as
//! `FrontendReqHandler`, `SET_SLAVE_REQ_FD` as `SET_BACKEND_REQ_FD` and the protocol
//! features `SLAVE_REQ`/`SLAVE_SEND_FD` as `BACKEND_REQ`/`BACKEND_SEND_FD`.

#![deny(missing_docs)]

pub mod backend;
pub mod backend_req;
pub mod connection;
pub mod error;
pub mod frontend;
pub mod frontend_req_handler;
pub mod sock;
pub mod tube;

pub use backend::{BackendReqHandler, Listener, MemoryRegion, VhostUserBackendReqHandler};
pub use backend_req::Backend;
pub use connection::{Connection, Message};
pub use error::{Error, HandlerResult, Result};
pub use frontend::{Frontend, MemoryRegionRef};
pub use frontend_req_handler::{FrontendReqHandler, VhostUserFrontendReqHandler};
pub use tube::Tube;

#[cfg(test)]
mod session_tests;
