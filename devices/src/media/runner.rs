//! The virtio-media command runner: sessions, command dispatch, session polling.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use outboard_protocol::media::{
    CloseCmd, CmdHeader, IoctlCmd, MediaCmd, MmapCmd, MmapResp, MunmapCmd, OpenResp, RespHeader,
};
use outboard_protocol::Validate;
use rustix::event::epoll;

use super::{ChainReader, ChainWriter, Errno, MediaDevice, MediaError, MediaSession};

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
/// Session ids are recycled: `OPEN` hands out the smallest id not in use.
pub struct MediaRunner<D: MediaDevice, P: SessionPoller> {
    device: D,
    poller: P,
    sessions: BTreeMap<u32, D::Session>,
    free_ids: BTreeSet<u32>,
    next_id: u32,
}

impl<D: MediaDevice, P: SessionPoller> std::fmt::Debug for MediaRunner<D, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MediaRunner")
            .field("sessions", &self.sessions.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl<D: MediaDevice, P: SessionPoller> MediaRunner<D, P> {
    /// A runner for `device` with `poller` watching session fds.
    pub fn new(device: D, poller: P) -> Self {
        MediaRunner {
            device,
            poller,
            sessions: BTreeMap::new(),
            free_ids: BTreeSet::new(),
            next_id: 0,
        }
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
            log::debug!("virtio-media: command failed: {e}");
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
            return Err(MediaError::ResponseTooLarge {
                needed,
                left: w.remaining(),
            });
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
