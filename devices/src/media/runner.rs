//! The virtio-media command runner: sessions, command dispatch, session polling.
//!
//! # Sessions
//!
//! Every session costs the back-end fds (the camera's frame timer, the V4L2 proxy's
//! host node and epoll instance) and memory, so a device has at most
//! [`MediaRunner::max_sessions`] of them ([`DEFAULT_MAX_SESSIONS`] unless configured
//! with [`MediaRunner::set_max_sessions`]):
//! an `OPEN` beyond that is answered `ENFILE` before anything is allocated, and counted
//! in [`MediaMetrics::err_session_limit`]. `CLOSE` frees the slot.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use outboard_protocol::media::{
    CloseCmd, CmdHeader, IoctlCmd, MediaCmd, MmapCmd, MmapResp, MunmapCmd, OpenResp, RespHeader,
};
use outboard_protocol::Validate;
use rustix::event::epoll;
use thiserror::Error;

use super::{ChainReader, ChainWriter, Errno, MediaDevice, MediaError, MediaMetrics, MediaSession};

/// Sessions a device serves at once unless configured otherwise: 128.
///
/// V4L2 expects a node to open many times: `v4l2-compliance` fails a node that cannot
/// be open 100 times at once on top of the fds it already holds ("test for unlimited
/// opens"), and applications keep a few fds each on a node (a codec's mem-to-mem node
/// gets one session per stream). 128 passes that with room to spare while bounding
/// what a guest can make the back-end hold: with the V4L2 proxy's two fds per session,
/// 256 fds, inside the 1024-fd soft limit a daemon usually starts with (and the jailed
/// worker's 4096).
pub const DEFAULT_MAX_SESSIONS: usize = 128;
/// The largest session cap that can be configured: with two fds per session plus the
/// buffers' memfds, more would approach the jailed worker's fd limit.
pub const MAX_SESSIONS_LIMIT: usize = 1024;

/// A session cap, 1..=[`MAX_SESSIONS_LIMIT`] ([`MaxSessions::default`] is
/// [`DEFAULT_MAX_SESSIONS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MaxSessions(usize);

impl MaxSessions {
    /// `max` sessions; fails unless 1..=[`MAX_SESSIONS_LIMIT`].
    pub fn new(max: usize) -> Result<Self, RunnerError> {
        if max == 0 || max > MAX_SESSIONS_LIMIT {
            return Err(RunnerError::MaxSessions(max));
        }
        Ok(MaxSessions(max))
    }

    /// The number of sessions.
    pub fn get(self) -> usize {
        self.0
    }
}

impl Default for MaxSessions {
    fn default() -> Self {
        MaxSessions(DEFAULT_MAX_SESSIONS)
    }
}

/// Errors configuring a runner.
#[cfg_attr(test, remain::sorted)]
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RunnerError {
    /// The session cap is zero or above [`MAX_SESSIONS_LIMIT`].
    #[error("max sessions {0} is out of range (1..={MAX_SESSIONS_LIMIT})")]
    MaxSessions(usize),
}

/// Watches the sessions' poll fds.
pub trait SessionPoller: Send {
    /// Starts watching `fd` for `session_id`.
    fn add_session(&mut self, fd: BorrowedFd<'_>, session_id: u32) -> Result<(), Errno>;
    /// Stops watching `fd`.
    fn remove_session(&mut self, fd: BorrowedFd<'_>);
}

/// A poller that watches nothing (for devices whose sessions have no poll fd).
impl SessionPoller for () {
    fn add_session(&mut self, _: BorrowedFd<'_>, _: u32) -> Result<(), Errno> {
        Ok(())
    }
    fn remove_session(&mut self, _: BorrowedFd<'_>) {}
}

/// A [`SessionPoller`] over an epoll instance, level-triggered; the epoll fd itself can
/// be polled by the worker's event loop.
#[derive(Debug)]
pub struct EpollSessionPoller {
    epoll: OwnedFd,
}

impl EpollSessionPoller {
    /// A new epoll instance.
    pub fn new() -> io::Result<Self> {
        Ok(EpollSessionPoller {
            epoll: epoll::create(epoll::CreateFlags::CLOEXEC)?,
        })
    }

    /// Appends the ids of the sessions whose fds are readable now to `out` (no waiting).
    pub fn ready_sessions(&self, out: &mut Vec<u32>) -> io::Result<()> {
        let mut events = Vec::with_capacity(16);
        let zero = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        epoll::wait(
            &self.epoll,
            rustix::buffer::spare_capacity(&mut events),
            Some(&zero),
        )?;
        out.extend(events.iter().map(|e| e.data.u64() as u32));
        Ok(())
    }
}

impl AsFd for EpollSessionPoller {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.epoll.as_fd()
    }
}

impl SessionPoller for EpollSessionPoller {
    fn add_session(&mut self, fd: BorrowedFd<'_>, session_id: u32) -> Result<(), Errno> {
        epoll::add(
            &self.epoll,
            fd,
            epoll::EventData::new_u64(session_id.into()),
            epoll::EventFlags::IN,
        )
        .map_err(|e| e.raw_os_error())
    }

    fn remove_session(&mut self, fd: BorrowedFd<'_>) {
        if let Err(e) = epoll::delete(&self.epoll, fd) {
            outboard_protocol::log_limited!(
                log::Level::Warn,
                "virtio-media: removing a session fd from epoll: {e}"
            );
        }
    }
}

/// Runs a [`MediaDevice`]: decodes commands, keeps the sessions, answers every command
/// (errors included) and never stops on bad input.
///
/// Session ids are recycled: `OPEN` hands out the smallest id not in use. At most
/// [`MediaRunner::max_sessions`] sessions are open at once (see the module docs).
pub struct MediaRunner<D: MediaDevice, P: SessionPoller> {
    device: D,
    poller: P,
    sessions: BTreeMap<u32, D::Session>,
    free_ids: BTreeSet<u32>,
    next_id: u32,
    max_sessions: usize,
    metrics: Arc<MediaMetrics>,
}

impl<D: MediaDevice, P: SessionPoller> std::fmt::Debug for MediaRunner<D, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MediaRunner")
            .field("sessions", &self.sessions.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl<D: MediaDevice, P: SessionPoller> MediaRunner<D, P> {
    /// A runner for `device` with `poller` watching session fds, serving at most
    /// [`DEFAULT_MAX_SESSIONS`] sessions. The device counts its refusals in the
    /// runner's metrics ([`MediaDevice::attach_metrics`]).
    pub fn new(mut device: D, poller: P) -> Self {
        let metrics = Arc::new(MediaMetrics::default());
        device.attach_metrics(metrics.clone());
        MediaRunner {
            device,
            poller,
            sessions: BTreeMap::new(),
            free_ids: BTreeSet::new(),
            next_id: 0,
            max_sessions: DEFAULT_MAX_SESSIONS,
            metrics,
        }
    }

    /// Serves at most `max` sessions at once. Sessions open beyond a lowered cap stay
    /// open; new ones wait for the count to drop.
    pub fn set_max_sessions(&mut self, max: MaxSessions) {
        self.max_sessions = max.get();
    }

    /// The session cap.
    pub fn max_sessions(&self) -> usize {
        self.max_sessions
    }

    /// The device's counters (sessions, cap refusals).
    pub fn metrics(&self) -> Arc<MediaMetrics> {
        self.metrics.clone()
    }

    /// Counts into `metrics` from now on, the runner and the device alike
    /// ([`MediaDevice::attach_metrics`]): for counters someone else holds, such as a
    /// daemon that reports them. Counts made so far stay in the old counters.
    pub fn set_metrics(&mut self, metrics: Arc<MediaMetrics>) {
        self.device.attach_metrics(metrics.clone());
        self.metrics = metrics;
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The poller.
    pub fn poller(&self) -> &P {
        &self.poller
    }

    /// The device and session `id` together (for device-specific calls on a session).
    pub fn session_and_device(&mut self, id: u32) -> Option<(&mut D, &mut D::Session)> {
        let session = self.sessions.get_mut(&id)?;
        Some((&mut self.device, session))
    }

    /// Number of open sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    fn alloc_id(&mut self) -> Option<u32> {
        if let Some(id) = self.free_ids.pop_first() {
            return Some(id);
        }
        let id = self.next_id;
        self.next_id = self.next_id.checked_add(1)?;
        Some(id)
    }

    fn release_id(&mut self, id: u32) {
        self.free_ids.insert(id);
        // Keep the free set small: give back trailing ids.
        while self.next_id > 0 && self.free_ids.remove(&(self.next_id - 1)) {
            self.next_id -= 1;
        }
    }

    /// Handles one command chain. Returns the number of bytes written into the
    /// device-writable half (the length for the used ring).
    pub fn handle_command(&mut self, r: &mut ChainReader<'_>, w: &mut ChainWriter<'_>) -> usize {
        if let Err(e) = self.command(r, w) {
            outboard_protocol::log_limited!(log::Level::Debug, "virtio-media: command failed: {e}");
            if w.write_err(e.errno()).is_err() {
                outboard_protocol::log_limited!(
                    log::Level::Warn,
                    "virtio-media: no room for an error response"
                );
            }
        }
        w.written()
    }

    fn command(
        &mut self,
        r: &mut ChainReader<'_>,
        w: &mut ChainWriter<'_>,
    ) -> Result<(), MediaError> {
        let hdr: CmdHeader = r.read_obj("command header")?;
        let cmd = match MediaCmd::from_raw(hdr.cmd) {
            Ok(cmd) => cmd,
            Err(_) => return w.write_err(libc::ENOTTY),
        };
        match cmd {
            MediaCmd::Open => self.open(w),
            MediaCmd::Close => {
                let c: CloseCmd = r.read_obj("CLOSE command")?;
                self.close(c.session_id);
                Ok(())
            }
            MediaCmd::Ioctl => {
                let c: IoctlCmd = r.read_obj("IOCTL command")?;
                let Some(session) = self.sessions.get_mut(&c.session_id) else {
                    return w.write_err(libc::EINVAL);
                };
                match c.ioctl() {
                    Ok(ioctl) => self.device.do_ioctl(session, ioctl, r, w),
                    Err(_) => w.write_err(libc::ENOTTY),
                }
            }
            MediaCmd::Mmap => {
                let c: MmapCmd = r.read_obj("MMAP command")?;
                if c.validate().is_err() {
                    return w.write_err(libc::EINVAL);
                }
                let res = match self.sessions.get_mut(&c.session_id) {
                    Some(s) => self.device.do_mmap(s, c.flags, c.offset),
                    None => Err(libc::EINVAL),
                };
                match res {
                    Ok((addr, len)) => w.write_obj(&MmapResp::ok(addr, len)),
                    Err(e) => w.write_err(e),
                }
            }
            MediaCmd::Munmap => {
                let c: MunmapCmd = r.read_obj("MUNMAP command")?;
                match self.device.do_munmap(c.driver_addr) {
                    Ok(()) => w.write_obj(&RespHeader::ok()),
                    Err(e) => w.write_err(e),
                }
            }
        }
    }

    fn open(&mut self, w: &mut ChainWriter<'_>) -> Result<(), MediaError> {
        // A session the driver never hears about would leak: check for room first.
        let needed = std::mem::size_of::<OpenResp>();
        if w.remaining() < needed {
            return Err(MediaError::NoRoom {
                needed,
                left: w.remaining(),
            });
        }
        // Refused before anything is allocated: a guest that opens sessions without
        // end must not take the back-end's fds (each session holds some).
        if self.sessions.len() >= self.max_sessions {
            MediaMetrics::inc(&self.metrics.err_session_limit);
            outboard_protocol::log_limited!(
                log::Level::Warn,
                "virtio-media: OPEN refused: {} sessions open, the cap",
                self.sessions.len()
            );
            return w.write_err(libc::ENFILE);
        }
        let Some(id) = self.alloc_id() else {
            return w.write_err(libc::EMFILE);
        };
        let session = match self.device.new_session(id) {
            Ok(s) => s,
            Err(e) => {
                self.release_id(id);
                return w.write_err(e);
            }
        };
        if let Some(fd) = session.poll_fd() {
            if let Err(e) = self.poller.add_session(fd, id) {
                self.device.close_session(session);
                self.release_id(id);
                return w.write_err(e);
            }
        }
        self.sessions.insert(id, session);
        MediaMetrics::inc(&self.metrics.sessions_opened);
        w.write_obj(&OpenResp::ok(id))
    }

    /// Closes session `id` (unknown ids are ignored: CLOSE has no response).
    pub fn close(&mut self, id: u32) {
        if let Some(session) = self.sessions.remove(&id) {
            if let Some(fd) = session.poll_fd() {
                self.poller.remove_session(fd);
            }
            self.device.close_session(session);
            self.release_id(id);
            MediaMetrics::inc(&self.metrics.sessions_closed);
        }
    }

    /// Session `id`'s poll fd is readable: lets the device process its events. Returns
    /// the errno the device failed with, which the caller reports as an error event.
    pub fn process_events(&mut self, id: u32) -> Result<(), Errno> {
        match self.sessions.get_mut(&id) {
            Some(s) => self.device.process_events(s),
            None => Ok(()),
        }
    }

    /// Closes every session (device reset).
    pub fn close_all(&mut self) {
        let ids: Vec<u32> = self.sessions.keys().copied().collect();
        for id in ids {
            self.close(id);
        }
    }
}

impl<D: MediaDevice> MediaRunner<D, EpollSessionPoller> {
    /// Processes every session whose poll fd is readable; returns the sessions that
    /// failed with their errnos.
    pub fn process_ready_sessions(&mut self) -> Vec<(u32, Errno)> {
        let mut ready = Vec::new();
        if let Err(e) = self.poller.ready_sessions(&mut ready) {
            outboard_protocol::log_limited!(log::Level::Warn, "virtio-media: epoll_wait: {e}");
        }
        let mut failed = Vec::new();
        for id in ready {
            if let Err(e) = self.process_events(id) {
                failed.push((id, e));
            }
        }
        failed
    }
}

#[cfg(test)]
mod tests {
    use zerocopy::{FromBytes, IntoBytes};

    use super::*;
    use crate::virtio::IoRegion;
    use outboard_protocol::v4l2::V4l2Ioctl;

    /// A device whose sessions hold nothing.
    struct Null;
    struct NullSession;

    impl MediaSession for NullSession {
        fn poll_fd(&self) -> Option<BorrowedFd<'_>> {
            None
        }
    }

    impl MediaDevice for Null {
        type Session = NullSession;
        fn new_session(&mut self, _: u32) -> Result<NullSession, Errno> {
            Ok(NullSession)
        }
        fn close_session(&mut self, _: NullSession) {}
        fn do_ioctl(
            &mut self,
            _: &mut NullSession,
            _: V4l2Ioctl,
            _: &mut ChainReader<'_>,
            w: &mut ChainWriter<'_>,
        ) -> Result<(), MediaError> {
            w.write_err(libc::ENOTTY)
        }
        fn do_mmap(&mut self, _: &mut NullSession, _: u32, _: u32) -> Result<(u64, u64), Errno> {
            Err(libc::EINVAL)
        }
        fn do_munmap(&mut self, _: u64) -> Result<(), Errno> {
            Err(libc::EINVAL)
        }
    }

    /// OPEN: the session id or the errno.
    fn open(r: &mut MediaRunner<Null, ()>) -> Result<u32, u32> {
        let mut req = CmdHeader::new(MediaCmd::Open).as_bytes().to_vec();
        let mut resp = [0u8; 64];
        // SAFETY: `req` and `resp` outlive the command; nothing else uses them meanwhile.
        let (rr, wr) = unsafe {
            (
                [IoRegion::new(req.as_mut_ptr(), req.len())],
                [IoRegion::new(resp.as_mut_ptr(), resp.len())],
            )
        };
        let n = r.handle_command(&mut ChainReader::new(&rr), &mut ChainWriter::new(&wr));
        let hdr = RespHeader::read_from_prefix(&resp).unwrap().0;
        if hdr.status != 0 {
            assert_eq!(n, 8);
            return Err(hdr.status);
        }
        Ok(OpenResp::read_from_prefix(&resp).unwrap().0.session_id)
    }

    #[test]
    fn opens_past_the_session_cap_get_enfile_and_close_frees_a_slot() {
        let mut r = MediaRunner::new(Null, ());
        assert_eq!(r.max_sessions(), DEFAULT_MAX_SESSIONS);
        assert_eq!(MaxSessions::default().get(), DEFAULT_MAX_SESSIONS);
        assert_eq!(MaxSessions::new(0), Err(RunnerError::MaxSessions(0)));
        assert_eq!(
            MaxSessions::new(MAX_SESSIONS_LIMIT + 1),
            Err(RunnerError::MaxSessions(MAX_SESSIONS_LIMIT + 1))
        );
        assert!(MaxSessions::new(MAX_SESSIONS_LIMIT).is_ok());
        r.set_max_sessions(MaxSessions::new(3).unwrap());
        assert_eq!(
            (open(&mut r), open(&mut r), open(&mut r)),
            (Ok(0), Ok(1), Ok(2))
        );
        for _ in 0..10 {
            assert_eq!(open(&mut r), Err(libc::ENFILE as u32));
        }
        assert_eq!(r.session_count(), 3);
        r.close(1);
        assert_eq!(open(&mut r), Ok(1));
        assert_eq!(open(&mut r), Err(libc::ENFILE as u32));
        // A lowered cap keeps the open sessions and refuses new ones.
        r.set_max_sessions(MaxSessions::new(1).unwrap());
        assert_eq!(r.session_count(), 3);
        r.close(0);
        assert_eq!(open(&mut r), Err(libc::ENFILE as u32));
        r.close_all();
        assert_eq!(open(&mut r), Ok(0));
        let m = r.metrics().snapshot();
        assert_eq!(
            (m.sessions_opened, m.sessions_closed, m.err_session_limit),
            (5, 4, 12)
        );
    }
}
