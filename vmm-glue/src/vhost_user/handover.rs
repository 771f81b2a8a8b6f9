//! Handing a running worker's device, with its front-end's session, to another
//! process (a live upgrade of the daemon: `outboard vsock --take-over`).
//!
//! The process that coordinates the upgrade holds an [`UpgradeHandle`] per worker, the
//! worker its [`UpgradeHooks`] ([`upgrade_channel`] makes both). Asked to pause
//! ([`UpgradeHandle::pause`]), the worker finishes its batch of events (every chain
//! returned, every signal sent) and hands over a [`Parcel`]: the worker record below
//! and duplicates of every fd it names. Then it waits, touching nothing, for the
//! [`Decision`]: [`Decision::Resume`] (the new process refused or died: it goes on as
//! if nothing happened) or [`Decision::Commit`] (it closes its copies without a reset
//! and never touches the device again). The new process makes a [`Worker`] from the
//! parcel ([`Worker::take_over`]) and runs it once the old one has committed.
//!
//! Worker record fields, in order ([`outboard_protocol::record`] encoding):
//!
//! 1. `u64` [`WORKER_MAGIC`], `u32` [`WORKER_VERSION`];
//! 2. `bool` a front-end is connected; if so its session: `bool` owned, `bool` + `u64`
//!    features offered, `u64` features acked, `bool` + `u64` protocol features
//!    offered, `u64` protocol features acked, and `bool` whether the back-end channel's
//!    socket follows;
//! 3. `u32` how many fds the back-end's setup has, `u32` how many the device's part;
//! 4. the back-end's setup (see `DeviceBackend::save_setup`) as a byte string;
//! 5. the device's own record as a byte string.
//!
//! Fds, in order: the listening socket, the front-end's connection and the channel (if
//! recorded), the setup's, the device's.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use outboard_devices::virtio::VirtioDevice;
use outboard_protocol::record::{RecordError, RecordReader, RecordWriter};
use outboard_protocol::vhost_user::VhostUserProtocolFeatures;
use outboard_transport::{
    BackendReqHandler, BackendReqSender, Connection, SessionState, VhostUserBackendReqHandler,
};
use vmm_sys_util::eventfd::EventFd;

use super::backend::DeviceBackend;
use super::daemon::Worker;
use super::frames::{kind_name, recv_frame, send_frame, DECISION, LET_GO, PARCEL, PAUSE};

/// First field of a worker record ("OBWORKER").
pub const WORKER_MAGIC: u64 = u64::from_le_bytes(*b"OBWORKER");
/// The worker record layout this build writes and reads.
pub const WORKER_VERSION: u32 = 1;

/// Most bytes of a device's own record inside a worker record.
const MAX_DEVICE_RECORD: usize = 1 << 30;

/// A worker's state in transit: the worker record and the fds it names.
#[derive(Debug)]
pub struct Parcel {
    /// The record (see the [module docs](self) for a worker's; a device's is the
    /// device's own).
    pub record: Vec<u8>,
    /// The fds, in the record's order.
    pub fds: Vec<OwnedFd>,
}

/// What a paused worker is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Go on serving: the handover did not happen.
    Resume,
    /// The new process has everything: close your copies, touch nothing more.
    Commit,
}

/// The worker's end of [`upgrade_channel`] (a worker thread of this process) or of
/// [`upgrade_link`] (a worker in another process: a jailed child), given to
/// [`Worker::run`].
pub struct UpgradeHooks<D> {
    link: HookLink,
    save_device: SaveDevice<D>,
}

enum HookLink {
    Local {
        pause: EventFd,
        generation: Arc<AtomicU64>,
        parcels: mpsc::Sender<(u64, Result<Parcel, String>)>,
        decisions: mpsc::Receiver<(u64, Decision)>,
        acks: mpsc::Sender<u64>,
    },
    /// The worker's end of a socket pair with the daemon (frames of
    /// [`super::frames`]); `last` is the number of the request being answered.
    Remote {
        sock: UnixStream,
        last: AtomicU64,
        /// The daemon's end is closed: the worker stops watching the link.
        closed: std::sync::atomic::AtomicBool,
    },
}

type SaveDevice<D> = Box<dyn Fn(&D) -> Result<Parcel, String> + Send>;

impl<D> std::fmt::Debug for UpgradeHooks<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpgradeHooks").finish_non_exhaustive()
    }
}

/// The coordinator's end of [`upgrade_channel`] or [`upgrade_link`].
#[derive(Debug)]
pub struct UpgradeHandle {
    generation: AtomicU64,
    link: HandleLink,
}

#[derive(Debug)]
enum HandleLink {
    Local {
        pause: EventFd,
        generation: Arc<AtomicU64>,
        parcels: mpsc::Receiver<(u64, Result<Parcel, String>)>,
        decisions: mpsc::Sender<(u64, Decision)>,
        acks: mpsc::Receiver<u64>,
    },
    Remote {
        sock: UnixStream,
    },
}

/// A handle for the coordinator and the hooks for a worker thread of this process
/// whose device is saved by `save_device` (the device's part of the parcel, for
/// example `outboard_devices::vsock::Vsock::handover`).
pub fn upgrade_channel<D>(
    save_device: impl Fn(&D) -> Result<Parcel, String> + Send + 'static,
) -> std::io::Result<(UpgradeHandle, UpgradeHooks<D>)> {
    let pause = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
    let generation = Arc::new(AtomicU64::new(0));
    let (ptx, prx) = mpsc::channel();
    let (dtx, drx) = mpsc::channel();
    let (atx, arx) = mpsc::channel();
    Ok((
        UpgradeHandle {
            generation: AtomicU64::new(0),
            link: HandleLink::Local {
                pause: pause.try_clone()?,
                generation: generation.clone(),
                parcels: prx,
                decisions: dtx,
                acks: arx,
            },
        },
        UpgradeHooks {
            link: HookLink::Local {
                pause,
                generation,
                parcels: ptx,
                decisions: drx,
                acks: atx,
            },
            save_device: Box::new(save_device),
        },
    ))
}

/// The two ends of a link to a worker in another process: the socket pair whose first
/// end the daemon keeps ([`UpgradeHandle::remote`]) and whose second the worker
/// inherits ([`UpgradeHooks::remote`]).
pub fn upgrade_link() -> std::io::Result<(UnixStream, UnixStream)> {
    UnixStream::pair()
}

impl UpgradeHandle {
    /// The coordinator's handle of a worker in another process, on the daemon's end
    /// of an [`upgrade_link`].
    pub fn remote(sock: UnixStream) -> Self {
        UpgradeHandle {
            generation: AtomicU64::new(0),
            link: HandleLink::Remote { sock },
        }
    }

    /// Asks the worker to pause and hand over; waits up to `timeout` for its parcel.
    /// On success the worker waits, paused, for [`UpgradeHandle::resume`] or
    /// [`UpgradeHandle::commit`]; on failure it is serving (it refused, for example in
    /// the middle of a front-end's message, or it did not answer in time: then it is
    /// told to resume should it pause later).
    pub fn pause(&self, timeout: Duration) -> Result<Parcel, String> {
        let gen = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let deadline = std::time::Instant::now() + timeout;
        match &self.link {
            HandleLink::Local {
                pause,
                generation,
                parcels,
                decisions,
                ..
            } => {
                generation.store(gen, Ordering::SeqCst);
                pause
                    .write(1)
                    .map_err(|e| format!("cannot wake the worker: {e}"))?;
                loop {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    match parcels.recv_timeout(left) {
                        Ok((g, parcel)) if g == gen => return parcel,
                        // A parcel of an earlier request that timed out: that worker
                        // was told to resume.
                        Ok(_) => continue,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            let _ = decisions.send((gen, Decision::Resume));
                            return Err(format!("the worker did not pause within {timeout:?}"));
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => {
                            return Err("the worker is gone".into())
                        }
                    }
                }
            }
            HandleLink::Remote { sock } => {
                send_frame(sock, PAUSE, &gen.to_le_bytes(), &[])?;
                loop {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    let frame = if left.is_zero() {
                        Err("timed out".to_string())
                    } else {
                        sock.set_read_timeout(Some(left))
                            .map_err(|e| e.to_string())
                            .and_then(|()| recv_frame(sock))
                    };
                    let frame = match frame {
                        Ok(f) => f,
                        Err(e) => {
                            self.decide(gen, Decision::Resume);
                            return Err(format!(
                                "the worker did not pause within {timeout:?}: {e}"
                            ));
                        }
                    };
                    let (g, rest) = split_gen(&frame.body)?;
                    if frame.kind != PARCEL || g != gen {
                        // Late answers to an earlier request: dropped with their fds.
                        continue;
                    }
                    let Some((&ok, record)) = rest.split_first() else {
                        return Err("an empty parcel from the worker".into());
                    };
                    return if ok == 1 {
                        Ok(Parcel {
                            record: record.to_vec(),
                            fds: frame.fds,
                        })
                    } else {
                        Err(String::from_utf8_lossy(record).into_owned())
                    };
                }
            }
        }
    }

    fn decide(&self, gen: u64, d: Decision) {
        match &self.link {
            HandleLink::Local { decisions, .. } => {
                let _ = decisions.send((gen, d));
            }
            HandleLink::Remote { sock } => {
                let mut body = gen.to_le_bytes().to_vec();
                body.push(u8::from(d == Decision::Commit));
                let _ = send_frame(sock, DECISION, &body, &[]);
            }
        }
    }

    /// Lets the paused worker go on serving.
    pub fn resume(&self) {
        self.decide(self.generation.load(Ordering::SeqCst), Decision::Resume);
    }

    /// Tells the paused worker the new process owns its device; waits up to `timeout`
    /// for it to have closed its copies.
    pub fn commit(&self, timeout: Duration) -> Result<(), String> {
        let gen = self.generation.load(Ordering::SeqCst);
        self.decide(gen, Decision::Commit);
        let acked = match &self.link {
            HandleLink::Local { acks, .. } => acks
                .recv_timeout(timeout)
                .map_err(|_| format!("the worker did not let go within {timeout:?}")),
            HandleLink::Remote { sock } => sock
                .set_read_timeout(Some(timeout))
                .map_err(|e| e.to_string())
                .and_then(|()| recv_frame(sock))
                .and_then(|f| {
                    if f.kind != LET_GO {
                        return Err(format!("the worker answered {}", kind_name(f.kind)));
                    }
                    split_gen(&f.body).map(|(g, _)| g)
                })
                .map_err(|e| format!("the worker did not let go within {timeout:?}: {e}")),
        }?;
        if acked == gen {
            Ok(())
        } else {
            Err(format!(
                "the worker acknowledged request {acked}, not {gen}"
            ))
        }
    }
}

fn split_gen(body: &[u8]) -> Result<(u64, &[u8]), String> {
    let (g, rest) = body
        .split_first_chunk::<8>()
        .ok_or("a frame without its request number")?;
    Ok((u64::from_le_bytes(*g), rest))
}

impl<D: VirtioDevice> UpgradeHooks<D> {
    /// The worker's hooks on its end of an [`upgrade_link`] (in a jailed child),
    /// saving its device with `save_device`.
    pub fn remote(
        sock: UnixStream,
        save_device: impl Fn(&D) -> Result<Parcel, String> + Send + 'static,
    ) -> Self {
        UpgradeHooks {
            link: HookLink::Remote {
                sock,
                last: AtomicU64::new(0),
                closed: std::sync::atomic::AtomicBool::new(false),
            },
            save_device: Box::new(save_device),
        }
    }

    /// Whether the link to the coordinator is gone (the worker stops watching it).
    pub(super) fn closed(&self) -> bool {
        match &self.link {
            HookLink::Local { .. } => false,
            HookLink::Remote { closed, .. } => closed.load(Ordering::SeqCst),
        }
    }

    /// The fd the worker watches for a request to pause.
    pub(super) fn pause_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match &self.link {
            HookLink::Local { pause, .. } => {
                // SAFETY: the eventfd lives as long as `self`, which the borrow ties
                // the result to.
                unsafe {
                    std::os::fd::BorrowedFd::borrow_raw(std::os::fd::AsRawFd::as_raw_fd(pause))
                }
            }
            HookLink::Remote { sock, .. } => sock.as_fd(),
        }
    }

    /// The worker is between batches and was asked to pause: hands over its parcel
    /// and waits for the decision (or says why it cannot and goes on).
    pub(super) fn paused(
        &self,
        listener: &UnixListener,
        conn: Option<&BackendReqHandler<DeviceBackend<D>>>,
        idle: Option<&DeviceBackend<D>>,
        name: &str,
    ) -> Decision {
        let gen = match &self.link {
            HookLink::Local {
                pause, generation, ..
            } => {
                // Non-blocking: empty (another request counted already) is fine.
                let _ = pause.read();
                generation.load(Ordering::SeqCst)
            }
            HookLink::Remote { sock, last, closed } => match recv_frame(sock) {
                Ok(f) if f.kind == PAUSE => match split_gen(&f.body) {
                    Ok((g, _)) => {
                        last.store(g, Ordering::SeqCst);
                        g
                    }
                    Err(_) => return Decision::Resume,
                },
                // A decision for a request this worker answered late, or noise.
                Ok(_) => return Decision::Resume,
                Err(e) => {
                    log::warn!("{name}: the daemon's upgrade link: {e}; no live upgrade");
                    closed.store(true, Ordering::SeqCst);
                    return Decision::Resume;
                }
            },
        };
        let parcel = save_worker(listener, conn, idle, &self.save_device);
        let ok = parcel.is_ok();
        if let Err(e) = &parcel {
            log::warn!("{name}: cannot hand the device over now: {e}");
        }
        match &self.link {
            HookLink::Local { parcels, .. } => {
                if parcels.send((gen, parcel)).is_err() || !ok {
                    return Decision::Resume;
                }
            }
            HookLink::Remote { sock, .. } => {
                let mut body = gen.to_le_bytes().to_vec();
                let sent = match parcel {
                    Ok(p) => {
                        body.push(1);
                        body.extend_from_slice(&p.record);
                        send_frame(sock, PARCEL, &body, &p.fds)
                    }
                    Err(e) => {
                        body.push(0);
                        body.extend_from_slice(e.as_bytes());
                        send_frame(sock, PARCEL, &body, &[])
                    }
                };
                if sent.is_err() || !ok {
                    return Decision::Resume;
                }
            }
        }
        log::info!("{name}: paused for a handover");
        let decision = match &self.link {
            HookLink::Local { decisions, .. } => loop {
                match decisions.recv() {
                    Ok((g, d)) if g == gen => break d,
                    Ok(_) => continue,
                    Err(_) => break Decision::Resume,
                }
            },
            HookLink::Remote { sock, .. } => loop {
                let _ = sock.set_read_timeout(None);
                match recv_frame(sock) {
                    Ok(f) if f.kind == DECISION => match split_gen(&f.body) {
                        Ok((g, rest)) if g == gen => {
                            break if rest.first() == Some(&1) {
                                Decision::Commit
                            } else {
                                Decision::Resume
                            };
                        }
                        _ => continue,
                    },
                    Ok(_) => continue,
                    Err(_) => break Decision::Resume,
                }
            },
        };
        if decision == Decision::Resume {
            log::info!("{name}: the handover was called off; serving on");
        }
        decision
    }

    /// The worker let go of everything.
    pub(super) fn committed(&self) {
        match &self.link {
            HookLink::Local {
                acks, generation, ..
            } => {
                let _ = acks.send(generation.load(Ordering::SeqCst));
            }
            HookLink::Remote { sock, last, .. } => {
                let _ = send_frame(
                    sock,
                    LET_GO,
                    &last.load(Ordering::SeqCst).to_le_bytes(),
                    &[],
                );
            }
        }
    }
}

fn dup(fd: impl AsFd, what: &str) -> Result<OwnedFd, String> {
    fd.as_fd()
        .try_clone_to_owned()
        .map_err(|e| format!("cannot duplicate {what}: {e}"))
}

fn opt_u64(w: &mut RecordWriter, v: Option<u64>) {
    w.bool(v.is_some()).u64(v.unwrap_or(0));
}

fn read_opt_u64(r: &mut RecordReader<'_>, field: &'static str) -> Result<Option<u64>, RecordError> {
    let some = r.bool(field)?;
    let v = r.u64(field)?;
    Ok(some.then_some(v))
}

/// The worker record and fds of a worker between batches (see the module docs).
fn save_worker<D: VirtioDevice>(
    listener: &UnixListener,
    conn: Option<&BackendReqHandler<DeviceBackend<D>>>,
    idle: Option<&DeviceBackend<D>>,
    save_device: &SaveDevice<D>,
) -> Result<Parcel, String> {
    let mut w = RecordWriter::new();
    let mut fds = vec![dup(listener, "the listening socket")?];
    w.u64(WORKER_MAGIC).u32(WORKER_VERSION).bool(conn.is_some());
    let backend = match conn {
        Some(h) => {
            let s = h
                .session()
                .ok_or("the front-end is in the middle of a message or waits for a reply")?;
            w.bool(s.owned);
            opt_u64(&mut w, s.offered_features);
            w.u64(s.acked_features);
            opt_u64(&mut w, s.offered_protocol.map(|p| p.bits()));
            w.u64(s.acked_protocol.bits());
            fds.push(dup(h, "the front-end's connection")?);
            let channel = match h.backend_channel() {
                Some(ch) => Some(
                    ch.try_clone_socket()
                        .ok_or("the back-end channel has requests in flight")?
                        .map_err(|e| format!("cannot duplicate the back-end channel: {e}"))?,
                ),
                None => None,
            };
            w.bool(channel.is_some());
            fds.extend(channel);
            h.backend()
        }
        None => idle.ok_or("the worker holds no device")?,
    };
    let mut setup = RecordWriter::new();
    let mut setup_fds = Vec::new();
    backend.save_setup(&mut setup, &mut setup_fds)?;
    let setup = setup.into_bytes().map_err(|e| e.to_string())?;
    let device = save_device(backend.device())?;
    w.count(setup_fds.len())
        .count(device.fds.len())
        .bytes(&setup)
        .bytes(&device.record);
    fds.extend(setup_fds);
    fds.extend(device.fds);
    Ok(Parcel {
        record: w.into_bytes().map_err(|e| e.to_string())?,
        fds,
    })
}

impl<D: VirtioDevice> Worker<D> {
    /// A worker serving what `parcel` (from [`UpgradeHandle::pause`] in the old
    /// process) describes: the listening socket, the front-end's session if one was
    /// connected, and the device `load_device` makes from its part of the parcel.
    /// `max_queue_size`, `name` and `setup` as in [`Worker::new`] (the same as the
    /// old process's: a record it cannot set up the same way is refused).
    ///
    /// Memory is mapped and every ring checked against guest memory here, but
    /// nothing runs until [`Worker::run`]: call that only once the old process has
    /// committed. On error nothing was touched and every fd is closed.
    pub fn take_over(
        parcel: Parcel,
        load_device: impl FnOnce(Parcel) -> Result<D, String>,
        max_queue_size: u16,
        name: &str,
        setup: impl FnOnce(DeviceBackend<D>) -> DeviceBackend<D>,
    ) -> Result<Self, String> {
        let Parcel { record, fds } = parcel;
        let mut r = RecordReader::new(&record);
        let e = |e: RecordError| e.to_string();
        let magic = r.u64("magic").map_err(e)?;
        if magic != WORKER_MAGIC {
            return Err(format!("not a worker record (magic {magic:#x})"));
        }
        let version = r.u32("version").map_err(e)?;
        if version != WORKER_VERSION {
            return Err(RecordError::Version {
                what: "worker",
                found: version,
                known: format!("{WORKER_VERSION}"),
            }
            .to_string());
        }
        let mut fds = fds.into_iter();
        let mut next = |what: &str| {
            fds.next()
                .ok_or_else(|| format!("the handover ran out of fds at {what}"))
        };
        let listener = UnixListener::from(next("the listening socket")?);
        let connected = r.bool("connected").map_err(e)?;
        let session = if connected {
            let owned = r.bool("owned").map_err(e)?;
            let offered_features = read_opt_u64(&mut r, "offered features").map_err(e)?;
            let acked_features = r.u64("acked features").map_err(e)?;
            let protocol = |bits: u64| {
                VhostUserProtocolFeatures::from_bits(bits)
                    .ok_or_else(|| format!("unknown protocol features in {bits:#x}"))
            };
            let offered_protocol = read_opt_u64(&mut r, "offered protocol features")
                .map_err(e)?
                .map(protocol)
                .transpose()?;
            let acked_protocol = protocol(r.u64("acked protocol features").map_err(e)?)?;
            let stream = UnixStream::from(next("the front-end's connection")?);
            let channel = if r.bool("back-end channel").map_err(e)? {
                Some(UnixStream::from(next("the back-end channel")?))
            } else {
                None
            };
            Some((
                SessionState {
                    owned,
                    offered_features,
                    acked_features,
                    offered_protocol,
                    acked_protocol,
                },
                stream,
                channel,
            ))
        } else {
            None
        };
        let setup_fds = r.u32("setup fds").map_err(e)? as usize;
        let device_fds = r.u32("device fds").map_err(e)? as usize;
        let setup_record = r.bytes("setup record", MAX_DEVICE_RECORD).map_err(e)?;
        let device_record = r.bytes("device record", MAX_DEVICE_RECORD).map_err(e)?;
        r.finish().map_err(e)?;
        let rest: Vec<OwnedFd> = fds.collect();
        if setup_fds.checked_add(device_fds) != Some(rest.len()) {
            return Err(format!(
                "the record names {setup_fds} + {device_fds} fds after the session's, {} came",
                rest.len()
            ));
        }
        let mut rest = rest.into_iter();
        let setup_part: Vec<OwnedFd> = rest.by_ref().take(setup_fds).collect();
        let device = load_device(Parcel {
            record: device_record.to_vec(),
            fds: rest.collect(),
        })?;

        listener
            .set_nonblocking(true)
            .map_err(|e| format!("the listening socket: {e}"))?;
        let epoll = Arc::new(vmm_sys_util::epoll::Epoll::new().map_err(|e| format!("epoll: {e}"))?);
        let mut backend = setup(DeviceBackend::new(device, max_queue_size, epoll.clone()));
        let mut setup_reader = RecordReader::new(setup_record);
        let mut setup_fds = setup_part.into_iter();
        backend.load_setup(&mut setup_reader, &mut setup_fds)?;
        setup_reader.finish().map_err(e)?;
        if setup_fds.next().is_some() {
            return Err("the setup came with more fds than it names".into());
        }
        let (idle, conn) = match session {
            Some((state, stream, channel)) => {
                stream
                    .set_nonblocking(true)
                    .map_err(|e| format!("the front-end's connection: {e}"))?;
                let channel = channel
                    .map(|c| BackendReqSender::new(Connection::new(c), state.acked_protocol));
                if let Some(ch) = &channel {
                    backend
                        .set_backend_req_fd(ch.clone())
                        .map_err(|e| format!("the back-end channel: {e}"))?;
                }
                (
                    None,
                    Some(BackendReqHandler::resume(
                        Connection::new(stream),
                        backend,
                        state,
                        channel,
                    )),
                )
            }
            None => (Some(backend), None),
        };
        Ok(Worker {
            epoll,
            listener,
            idle,
            conn,
            name: name.to_string(),
            loaded: true,
        })
    }
}
