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

/// The worker's end of [`upgrade_channel`], given to [`Worker::run`].
pub struct UpgradeHooks<D> {
    pub(super) pause: EventFd,
    generation: Arc<AtomicU64>,
    parcels: mpsc::Sender<(u64, Result<Parcel, String>)>,
    decisions: mpsc::Receiver<(u64, Decision)>,
    acks: mpsc::Sender<u64>,
    save_device: SaveDevice<D>,
}

type SaveDevice<D> = Box<dyn Fn(&D) -> Result<Parcel, String> + Send>;

impl<D> std::fmt::Debug for UpgradeHooks<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpgradeHooks").finish_non_exhaustive()
    }
}

/// The coordinator's end of [`upgrade_channel`].
#[derive(Debug)]
pub struct UpgradeHandle {
    pause: EventFd,
    generation: Arc<AtomicU64>,
    parcels: mpsc::Receiver<(u64, Result<Parcel, String>)>,
    decisions: mpsc::Sender<(u64, Decision)>,
    acks: mpsc::Receiver<u64>,
}

/// A handle for the coordinator and the hooks for a worker whose device is saved by
/// `save_device` (the device's part of the parcel, for example
/// `outboard_devices::vsock::Vsock::handover`).
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
            pause: pause.try_clone()?,
            generation: generation.clone(),
            parcels: prx,
            decisions: dtx,
            acks: arx,
        },
        UpgradeHooks {
            pause,
            generation,
            parcels: ptx,
            decisions: drx,
            acks: atx,
            save_device: Box::new(save_device),
        },
    ))
}

impl UpgradeHandle {
    /// Asks the worker to pause and hand over; waits up to `timeout` for its parcel.
    /// On success the worker waits, paused, for [`UpgradeHandle::resume`] or
    /// [`UpgradeHandle::commit`]; on failure it is serving (it refused, for example in
    /// the middle of a front-end's message, or it did not answer in time: then it is
    /// told to resume should it pause later).
    pub fn pause(&self, timeout: Duration) -> Result<Parcel, String> {
        let gen = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.pause
            .write(1)
            .map_err(|e| format!("cannot wake the worker: {e}"))?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.parcels.recv_timeout(left) {
                Ok((g, parcel)) if g == gen => return parcel,
                // A parcel of an earlier request that timed out: that worker was told
                // to resume.
                Ok(_) => continue,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = self.decisions.send((gen, Decision::Resume));
                    return Err(format!("the worker did not pause within {timeout:?}"));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err("the worker is gone".into())
                }
            }
        }
    }

    /// Lets the paused worker go on serving.
    pub fn resume(&self) {
        let gen = self.generation.load(Ordering::SeqCst);
        let _ = self.decisions.send((gen, Decision::Resume));
    }

    /// Tells the paused worker the new process owns its device; waits up to `timeout`
    /// for it to have closed its copies.
    pub fn commit(&self, timeout: Duration) -> Result<(), String> {
        let gen = self.generation.load(Ordering::SeqCst);
        self.decisions
            .send((gen, Decision::Commit))
            .map_err(|_| "the worker is gone".to_string())?;
        match self.acks.recv_timeout(timeout) {
            Ok(g) if g == gen => Ok(()),
            Ok(g) => Err(format!("the worker acknowledged request {g}, not {gen}")),
            Err(_) => Err(format!("the worker did not let go within {timeout:?}")),
        }
    }
}

impl<D: VirtioDevice> UpgradeHooks<D> {
    /// The worker is between batches and was asked to pause: hands over its parcel
    /// and waits for the decision (or says why it cannot and goes on).
    pub(super) fn paused(
        &self,
        listener: &UnixListener,
        conn: Option<&BackendReqHandler<DeviceBackend<D>>>,
        idle: Option<&DeviceBackend<D>>,
        name: &str,
    ) -> Decision {
        // Non-blocking: empty (another request counted already) is fine.
        let _ = self.pause.read();
        let gen = self.generation.load(Ordering::SeqCst);
        let parcel = save_worker(listener, conn, idle, &self.save_device);
        let ok = parcel.is_ok();
        if let Err(e) = &parcel {
            log::warn!("{name}: cannot hand the device over now: {e}");
        }
        if self.parcels.send((gen, parcel)).is_err() || !ok {
            return Decision::Resume;
        }
        log::info!("{name}: paused for a handover");
        loop {
            match self.decisions.recv() {
                Ok((g, d)) if g == gen => {
                    if d == Decision::Resume {
                        log::info!("{name}: the handover was called off; serving on");
                    }
                    return d;
                }
                Ok(_) => continue,
                Err(_) => {
                    log::warn!("{name}: the upgrade coordinator is gone; serving on");
                    return Decision::Resume;
                }
            }
        }
    }

    /// The worker let go of everything.
    pub(super) fn committed(&self) {
        let _ = self.acks.send(self.generation.load(Ordering::SeqCst));
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
