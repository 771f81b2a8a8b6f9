//! The worker loop: one thread per served device, on its own epoll set.
//!
//! The set holds the listening socket (while no front-end is connected), the
//! front-end's connection (while one is), the rings' kick eventfds, the device's own
//! event fd and a stop eventfd. Everything the worker does is non-blocking, the
//! front-end's connection included: a message is assembled from whatever pieces the
//! socket has ([`BackendReqHandler::poll_request`]), so a front-end that sends part of a
//! message and stalls never holds up the data path, and one that stays stalled for
//! [`STALL_LIMIT`] is dropped with a message saying so. Replies go out without waiting
//! too: a front-end that does not read them until its socket buffer is full is
//! dropped.
//!
//! When the front-end goes away the device is reset, the memory table unmapped, and
//! the worker listens again, so a front-end with `reconnect-ms` can come back. One
//! front-end at a time: others wait in the listen backlog.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixListener;
use std::sync::Arc;

use outboard_devices::virtio::VirtioDevice;
use outboard_transport::{BackendReqHandler, Connection, Error as TransportError};
use thiserror::Error;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::backend::{DeviceBackend, KICK_TOKEN_LIMIT};
pub use super::handover::{
    upgrade_channel, upgrade_link, Decision, Parcel, UpgradeHandle, UpgradeHooks,
};

const TOKEN_LISTENER: u64 = KICK_TOKEN_LIMIT + 1;
const TOKEN_CONN: u64 = KICK_TOKEN_LIMIT + 2;
const TOKEN_DEVICE: u64 = KICK_TOKEN_LIMIT + 3;
const TOKEN_STOP: u64 = KICK_TOKEN_LIMIT + 4;
const TOKEN_PAUSE: u64 = KICK_TOKEN_LIMIT + 5;

/// How long a front-end may leave a message half sent before it is dropped. A vhost-user
/// message is at most a few KiB and every front-end sends it with one `sendmsg`, so a
/// healthy peer never comes near this.
pub const STALL_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Requests handled per readiness report of the connection before the worker looks at
/// its other fds again (level-triggered: the rest is reported again).
const REQUESTS_PER_WAKE: usize = 32;

/// Errors that end a worker.
#[cfg_attr(test, remain::sorted)]
#[derive(Debug, Error)]
pub enum WorkerError {
    /// Accepting a front-end failed.
    #[error("accept on the vhost-user socket failed: {0}")]
    Accept(std::io::Error),
    /// The epoll set could not be created or changed.
    #[error("epoll failed: {0}")]
    Epoll(std::io::Error),
    /// The device was lost between states (a bug).
    #[error("the device was lost by the worker loop")]
    Lost,
}

fn add(epoll: &Epoll, fd: BorrowedFd<'_>, token: u64) -> Result<(), WorkerError> {
    epoll
        .ctl(
            ControlOperation::Add,
            fd.as_raw_fd(),
            EpollEvent::new(EventSet::IN, token),
        )
        .map_err(WorkerError::Epoll)
}

fn delete(epoll: &Epoll, fd: BorrowedFd<'_>) {
    let _ = epoll.ctl(
        ControlOperation::Delete,
        fd.as_raw_fd(),
        EpollEvent::default(),
    );
}

/// Ends the front-end's session: the device is reset and the worker listens again.
fn close_connection<D: VirtioDevice>(
    conn: &mut Option<BackendReqHandler<DeviceBackend<D>>>,
    idle: &mut Option<DeviceBackend<D>>,
    epoll: &Epoll,
    listener: &UnixListener,
    name: &str,
) -> Result<(), WorkerError> {
    if let Some(handler) = conn.take() {
        delete(epoll, handler.as_fd());
        let mut backend = handler.into_backend();
        backend.disconnect();
        *idle = Some(backend);
    }
    add(epoll, listener.as_fd(), TOKEN_LISTENER)?;
    outboard_protocol::log_limited!(
        log::Level::Info,
        "{name}: device reset; waiting for a front-end"
    );
    Ok(())
}

/// Serves `device` to one front-end at a time on `listener` until `stop` is signalled.
/// Returns the device (reset) so the caller can read its final state.
pub fn serve<D: VirtioDevice>(
    device: D,
    listener: UnixListener,
    max_queue_size: u16,
    stop: &EventFd,
    name: &str,
) -> Result<D, WorkerError> {
    serve_with(device, listener, max_queue_size, stop, name, |b| b)
}

/// [`serve`], with `setup` given the [`DeviceBackend`] before the first front-end
/// comes: the hook for devices that need more than the generic back-end offers
/// (extra protocol features, `GET_SHMEM_CONFIG` answers, the back-end channel for
/// their own requests; see [`DeviceBackend::with_protocol_features`],
/// [`DeviceBackend::with_shmem_regions`], [`DeviceBackend::with_channel`]).
pub fn serve_with<D: VirtioDevice>(
    device: D,
    listener: UnixListener,
    max_queue_size: u16,
    stop: &EventFd,
    name: &str,
    setup: impl FnOnce(DeviceBackend<D>) -> DeviceBackend<D>,
) -> Result<D, WorkerError> {
    Worker::new(device, listener, max_queue_size, name, setup)?.run(stop, None)
}

/// A worker loop ready to run: the device, its listening socket and, for a worker
/// that took a device over from another process ([`Worker::take_over`]), the
/// front-end's session. [`serve`] is `Worker::new(..)?.run(..)`.
pub struct Worker<D: VirtioDevice> {
    pub(super) epoll: Arc<Epoll>,
    pub(super) listener: UnixListener,
    /// Exactly one of these is Some: the device waits idle, or a front-end drives it.
    pub(super) idle: Option<DeviceBackend<D>>,
    pub(super) conn: Option<BackendReqHandler<DeviceBackend<D>>>,
    pub(super) name: String,
    /// Set up from a handover: the rings start when the loop does.
    pub(super) loaded: bool,
}

impl<D: VirtioDevice> std::fmt::Debug for Worker<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("name", &self.name)
            .field("connected", &self.conn.is_some())
            .finish()
    }
}

impl<D: VirtioDevice> Worker<D> {
    /// A worker for `device` on `listener`, with no front-end yet; `setup` as in
    /// [`serve_with`].
    pub fn new(
        device: D,
        listener: UnixListener,
        max_queue_size: u16,
        name: &str,
        setup: impl FnOnce(DeviceBackend<D>) -> DeviceBackend<D>,
    ) -> Result<Self, WorkerError> {
        listener
            .set_nonblocking(true)
            .map_err(WorkerError::Accept)?;
        let epoll = Arc::new(Epoll::new().map_err(WorkerError::Epoll)?);
        let idle = setup(DeviceBackend::new(device, max_queue_size, epoll.clone()));
        Ok(Worker {
            epoll,
            listener,
            idle: Some(idle),
            conn: None,
            name: name.to_string(),
            loaded: false,
        })
    }

    /// The device the worker serves.
    pub fn device(&self) -> Option<&D> {
        match &self.conn {
            Some(h) => Some(h.backend().device()),
            None => self.idle.as_ref().map(DeviceBackend::device),
        }
    }

    /// Runs the worker loop until `stop` is signalled; returns the device (reset).
    /// With `upgrade`, the worker can hand its device to another process when asked
    /// (see [`UpgradeHooks`]); once it has, it never returns.
    pub fn run(self, stop: &EventFd, upgrade: Option<UpgradeHooks<D>>) -> Result<D, WorkerError> {
        let Worker {
            epoll,
            listener,
            mut idle,
            mut conn,
            name,
            loaded,
        } = self;
        let name = name.as_str();
        // SAFETY: the stop eventfd outlives this function (borrowed for its duration).
        let stop_fd = unsafe { BorrowedFd::borrow_raw(stop.as_raw_fd()) };
        add(&epoll, stop_fd, TOKEN_STOP)?;
        if let Some(hooks) = &upgrade {
            add(&epoll, hooks.pause_fd(), TOKEN_PAUSE)?;
        }
        {
            let backend = match conn.as_ref() {
                Some(h) => h.backend(),
                None => idle.as_ref().ok_or(WorkerError::Lost)?,
            };
            if let Some(fd) = backend.device().event_fd() {
                add(&epoll, fd, TOKEN_DEVICE)?;
            }
        }
        match &conn {
            Some(h) => add(&epoll, h.as_fd(), TOKEN_CONN)?,
            None => add(&epoll, listener.as_fd(), TOKEN_LISTENER)?,
        }
        // The backend keeps one interrupt for its whole life.
        let batch_irq = match conn.as_ref() {
            Some(h) => Some(h.backend().interrupt()),
            None => idle.as_ref().map(DeviceBackend::interrupt),
        };
        if loaded {
            let backend = match conn.as_mut() {
                Some(h) => h.backend_mut(),
                None => idle.as_mut().ok_or(WorkerError::Lost)?,
            };
            if let Err(e) = backend.start_loaded() {
                outboard_protocol::log_limited!(
                    log::Level::Error,
                    "{name}: the rings handed over could not start: {e}; closing the \
                     front-end connection"
                );
                close_connection(&mut conn, &mut idle, &epoll, &listener, name)?;
            } else {
                log::info!("{name}: serving the device handed over, from where it stopped");
            }
        } else {
            log::info!("{name}: waiting for a front-end");
        }
        let mut events = vec![EpollEvent::default(); 64];
        let mut pause_asked = false;
        'outer: loop {
            // A half-received request bounds the wait: its sender gets STALL_LIMIT.
            let stalled_since = conn.as_ref().and_then(|h| h.pending_since());
            let timeout_ms = match stalled_since {
                Some(t) => {
                    let left = STALL_LIMIT.saturating_sub(t.elapsed());
                    i32::try_from(left.as_millis().saturating_add(1)).unwrap_or(i32::MAX)
                }
                None => -1,
            };
            let n = match epoll.wait(timeout_ms, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(WorkerError::Epoll(e)),
            };
            if let Some(handler) = conn.as_ref() {
                if handler
                    .pending_since()
                    .is_some_and(|t| t.elapsed() >= STALL_LIMIT)
                {
                    let (got, want) = handler.pending_progress();
                    let want = want.map_or_else(|| "a header".to_string(), |w| format!("{w}"));
                    outboard_protocol::log_limited!(
                        log::Level::Warn,
                        "{name}: the front-end sent {got} of {want} bytes of a message and \
                     stalled for {STALL_LIMIT:?}: closing the connection"
                    );
                    close_connection(&mut conn, &mut idle, &epoll, &listener, name)?;
                    if let Some(irq) = &batch_irq {
                        irq.flush();
                    }
                    continue 'outer;
                }
            }
            // Signals to the front-end go out once per batch (see RingInterrupt).
            if let Some(irq) = &batch_irq {
                irq.defer();
            }
            for ev in &events[..n] {
                let backend = match conn.as_mut() {
                    Some(h) => Some(h.backend_mut()),
                    None => idle.as_mut(),
                };
                match ev.data() {
                    TOKEN_STOP => break 'outer,
                    TOKEN_PAUSE => pause_asked = true,
                    TOKEN_DEVICE => {
                        if let Some(b) = backend {
                            b.handle_device_event();
                        }
                    }
                    TOKEN_LISTENER => {
                        if idle.is_none() {
                            continue;
                        }
                        let stream = match listener.accept() {
                            Ok((s, _)) => s,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                            // A broken listening socket ends the worker; running out of fds
                            // or memory, or a client that left, is waited out.
                            Err(e)
                                if matches!(
                                    e.raw_os_error(),
                                    Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK)
                                ) =>
                            {
                                return Err(WorkerError::Accept(e))
                            }
                            Err(e) => {
                                outboard_protocol::log_limited!(
                                    log::Level::Warn,
                                    "{name}: accept failed: {e}"
                                );
                                std::thread::sleep(std::time::Duration::from_millis(100));
                                continue;
                            }
                        };
                        if let Err(e) = stream.set_nonblocking(true) {
                            outboard_protocol::log_limited!(
                                log::Level::Warn,
                                "{name}: dropped a front-end: {e}"
                            );
                            continue;
                        }
                        let Some(backend) = idle.take() else { continue };
                        let handler = BackendReqHandler::new(Connection::new(stream), backend);
                        add(&epoll, handler.as_fd(), TOKEN_CONN)?;
                        delete(&epoll, listener.as_fd());
                        outboard_protocol::log_limited!(
                            log::Level::Info,
                            "{name}: front-end connected"
                        );
                        conn = Some(handler);
                    }
                    TOKEN_CONN => {
                        let Some(handler) = conn.as_mut() else {
                            continue;
                        };
                        let mut closing = None;
                        for _ in 0..REQUESTS_PER_WAKE {
                            match handler.poll_request() {
                                Ok(true) => {}
                                Ok(false) => break,
                                Err(e) if e.is_fatal() => {
                                    closing = Some(e);
                                    break;
                                }
                                Err(e) => outboard_protocol::log_limited!(
                                    log::Level::Warn,
                                    "{name}: refused a request: {e}"
                                ),
                            }
                        }
                        let Some(e) = closing else { continue };
                        match &e {
                            TransportError::Disconnect => outboard_protocol::log_limited!(
                                log::Level::Info,
                                "{name}: front-end disconnected"
                            ),
                            TransportError::SocketRetry(io)
                                if io.kind() == std::io::ErrorKind::WouldBlock =>
                            {
                                outboard_protocol::log_limited!(
                                    log::Level::Warn,
                                    "{name}: the front-end does not read its replies (its \
                                 socket buffer is full): closing the connection"
                                )
                            }
                            e => outboard_protocol::log_limited!(
                                log::Level::Warn,
                                "{name}: closing the front-end connection: {e}"
                            ),
                        }
                        close_connection(&mut conn, &mut idle, &epoll, &listener, name)?;
                        if let Some(irq) = &batch_irq {
                            irq.flush();
                        }
                        // Later events of this batch may name fds that are gone.
                        continue 'outer;
                    }
                    kick if kick < KICK_TOKEN_LIMIT => {
                        if let Some(b) = backend {
                            b.handle_kick(kick as usize);
                        }
                    }
                    other => log::debug!("{name}: event for unknown token {other}"),
                }
            }
            // Guest memory cut short under the device (see the guard module): this VM's
            // device stops, the daemon goes on.
            if let Some(reason) = conn.as_mut().and_then(|h| h.backend_mut().take_fatal()) {
                outboard_protocol::log_limited!(
                    log::Level::Error,
                    "{name}: {reason}; stopping the device and closing the front-end connection"
                );
                close_connection(&mut conn, &mut idle, &epoll, &listener, name)?;
            }
            if let Some(b) = idle.as_mut() {
                b.take_fatal();
            }
            if let Some(irq) = &batch_irq {
                irq.flush();
            }
            // Between two batches, with every chain returned and every signal sent: the
            // one point where the device may be handed over.
            if std::mem::take(&mut pause_asked) {
                let Some(hooks) = &upgrade else { continue };
                match hooks.paused(&listener, conn.as_ref(), idle.as_ref(), name) {
                    Decision::Resume => {
                        if hooks.closed() {
                            delete(&epoll, hooks.pause_fd());
                        }
                    }
                    Decision::Commit => {
                        // The new process owns everything now: close our copies without
                        // a reset, tell the coordinator, and never touch anything again.
                        drop(conn);
                        drop(idle);
                        drop(listener);
                        log::info!("{name}: handed over to the new process");
                        hooks.committed();
                        loop {
                            std::thread::park();
                        }
                    }
                }
            }
        }
        let backend = match conn {
            Some(h) => Some(h.into_backend()),
            None => idle,
        };
        log::info!("{name}: stopped");
        // One of the two always holds the backend (see above).
        backend
            .map(DeviceBackend::into_device)
            .ok_or(WorkerError::Lost)
    }
}
