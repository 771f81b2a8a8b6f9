//! Device state transfer (`VHOST_USER_PROTOCOL_F_DEVICE_STATE`): `SET_DEVICE_STATE_FD`
//! and `CHECK_DEVICE_STATE`, for a device that saves its state
//! ([`VirtioDevice::supports_state`]).
//!
//! The front-end stops every ring, then sends `SET_DEVICE_STATE_FD` with a direction
//! (SAVE or LOAD), the phase STOPPED (the only one the specification has) and one end of
//! a pipe; after the data has gone through the pipe it asks `CHECK_DEVICE_STATE`
//! whether the transfer worked. What goes through the pipe is the device's own encoding
//! ([`VirtioDevice::snapshot_state`]; for vsock the `VsockSnapshot` bytes, see
//! `outboard_devices::vsock::snapshot`).
//!
//! # The worker never waits on the front-end, and never writes into its fds
//!
//! The worker is one thread with one epoll set that also answers the front-end; in a
//! jailed worker it has no way to start a thread (its seccomp list has no `clone`).
//! So the daemon uses the specification's option to answer `SET_DEVICE_STATE_FD` with a
//! pipe end of its own (the front-end's fd is closed unused), and moves the bytes at the
//! two points where the protocol says they are there:
//!
//! - SAVE: at `SET_DEVICE_STATE_FD` the worker makes a pipe, grows it to hold the whole
//!   state when it is larger than a pipe's default 64 KiB (`F_SETPIPE_SZ`, up to
//!   [`MAX_DEVICE_STATE`]), writes the state into it, closes its write end and returns
//!   the read end: the front-end reads the state and then end of file. No write can
//!   block (the pipe is empty and large enough) and none can raise `SIGPIPE` (the read
//!   end is the worker's until the reply), whatever the front-end does.
//! - LOAD: at `SET_DEVICE_STATE_FD` the worker makes a pipe, grows it to
//!   [`MAX_DEVICE_STATE`] where the system allows (so a front-end can write a whole
//!   state without waiting for a reader), keeps the read end (non-blocking) and returns
//!   the write end. At `CHECK_DEVICE_STATE`, by which time the front-end has written
//!   and closed its end, the worker reads up to end of file: at most
//!   [`MAX_DEVICE_STATE`] bytes (more is refused without reading on), waiting at most
//!   [`LOAD_TIMEOUT`] in all for data that is late (a front-end that keeps its end open
//!   gets an error after that, never a hang). Only then does the device see the bytes
//!   ([`VirtioDevice::restore_state`], which checks them like any other peer input); a
//!   device that was active is reset first.
//!
//! Every ring must be stopped for either direction (the specification's STOPPED
//! phase); a transfer while a ring runs is refused.

use std::fs::File;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use outboard_devices::virtio::VirtioDevice;
use outboard_protocol::vhost_user::{TransferDirection, TransferPhase};
use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};

/// Most bytes of device state a LOAD reads from the front-end.
pub const MAX_DEVICE_STATE: usize = 1 << 20;

/// A Linux pipe's default capacity.
const DEFAULT_PIPE_SIZE: usize = 64 * 1024;

/// Longest the worker waits, in all, at `CHECK_DEVICE_STATE` for the rest of the state a
/// LOAD is reading.
pub const LOAD_TIMEOUT: Duration = Duration::from_secs(1);

/// The transfer in progress on one connection.
#[derive(Debug, Default)]
pub(crate) enum StateTransfer {
    /// None started (or the last one was checked).
    #[default]
    Idle,
    /// A SAVE handed the state over at `SET_DEVICE_STATE_FD`.
    Saved,
    /// A LOAD waits for `CHECK_DEVICE_STATE` to read this fd.
    Loading(File),
}

fn error(kind: ErrorKind, msg: String) -> io::Error {
    outboard_protocol::log_limited!(log::Level::Warn, "device state transfer: {msg}");
    io::Error::new(kind, msg)
}

fn set_nonblocking(file: &File) -> io::Result<()> {
    let flags = fcntl_getfl(file)?;
    fcntl_setfl(file, flags | OFlags::NONBLOCK)?;
    Ok(())
}

/// Waits up to `timeout` for `file` to be readable (or hung up).
fn wait_readable(file: &File, timeout: Duration) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd, alive for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

impl StateTransfer {
    /// `SET_DEVICE_STATE_FD`: returns the pipe end the front-end uses instead of `fd`.
    /// `running_ring` names a ring that has not been stopped.
    pub(crate) fn start<D: VirtioDevice>(
        &mut self,
        device: &mut D,
        direction: TransferDirection,
        phase: TransferPhase,
        fd: OwnedFd,
        running_ring: Option<usize>,
    ) -> io::Result<Option<OwnedFd>> {
        *self = StateTransfer::Idle;
        // STOPPED is the only phase there is (the body was validated).
        match phase {
            TransferPhase::Stopped => {}
        }
        if let Some(ring) = running_ring {
            return Err(error(
                ErrorKind::ResourceBusy,
                format!("ring {ring} is running: a state transfer needs every ring stopped"),
            ));
        }
        if !device.supports_state() {
            return Err(error(
                ErrorKind::Unsupported,
                format!(
                    "device type {} does not save or restore its state",
                    device.device_type()
                ),
            ));
        }
        // The daemon answers with a pipe of its own (see the module docs).
        drop(fd);
        match direction {
            TransferDirection::Save => match save(device) {
                Ok(read_end) => {
                    *self = StateTransfer::Saved;
                    Ok(Some(read_end.into()))
                }
                Err(e) => Err(error(e.kind(), e.to_string())),
            },
            TransferDirection::Load => {
                let (read_end, write_end) = pipe()
                    .map_err(|e| error(e.kind(), format!("cannot make the transfer pipe: {e}")))?;
                // Best effort: a front-end may then write a whole state before it waits.
                let _ = grow_pipe(&write_end, MAX_DEVICE_STATE);
                set_nonblocking(&read_end).map_err(|e| {
                    error(
                        e.kind(),
                        format!("cannot make the transfer pipe non-blocking: {e}"),
                    )
                })?;
                *self = StateTransfer::Loading(read_end);
                Ok(Some(write_end.into()))
            }
        }
    }

    /// `CHECK_DEVICE_STATE`. For a LOAD, `reset` is called before the device takes its
    /// state (to reset an active device).
    pub(crate) fn check<D: VirtioDevice>(
        &mut self,
        device: &mut D,
        reset: impl FnOnce(&mut D),
    ) -> io::Result<()> {
        match std::mem::take(self) {
            StateTransfer::Idle => Err(error(
                ErrorKind::InvalidInput,
                "CHECK_DEVICE_STATE without a transfer: SET_DEVICE_STATE_FD comes first".to_owned(),
            )),
            StateTransfer::Saved => Ok(()),
            StateTransfer::Loading(file) => {
                let bytes =
                    read_state(file, LOAD_TIMEOUT).map_err(|e| error(e.kind(), e.to_string()))?;
                reset(device);
                device.restore_state(&bytes).map_err(|e| {
                    error(
                        ErrorKind::InvalidData,
                        format!("the device refused the {} bytes loaded: {e}", bytes.len()),
                    )
                })?;
                outboard_protocol::log_limited!(
                    log::Level::Info,
                    "device state loaded ({} bytes)",
                    bytes.len()
                );
                Ok(())
            }
        }
    }
}

/// A pipe, both ends close-on-exec and blocking (the front-end's end stays so).
fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two fds pipe2 writes; the result is checked.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds are new and owned by nobody else.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

/// Grows the pipe of `end` to hold at least `bytes`; returns its capacity.
fn grow_pipe(end: &File, bytes: usize) -> io::Result<usize> {
    let want = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: F_SETPIPE_SZ on a pipe fd we own, with an int argument; checked.
    let got = unsafe { libc::fcntl(end.as_raw_fd(), libc::F_SETPIPE_SZ, want) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(got).unwrap_or(0))
}

/// The device's state in a pipe of the worker's own, whose write end is closed: the
/// read end, for the front-end.
fn save<D: VirtioDevice>(device: &mut D) -> io::Result<File> {
    let state = device
        .snapshot_state()
        .map_err(|e| io::Error::other(format!("the device could not save its state: {e}")))?;
    if state.len() > MAX_DEVICE_STATE {
        return Err(io::Error::other(format!(
            "the device state is {} bytes, more than the {MAX_DEVICE_STATE} a transfer carries",
            state.len()
        )));
    }
    let (read_end, mut write_end) = pipe()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot make the transfer pipe: {e}")))?;
    set_nonblocking(&write_end)?;
    if state.len() > DEFAULT_PIPE_SIZE {
        grow_pipe(&write_end, state.len()).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot grow the transfer pipe to the {} bytes of device state: {e}",
                    state.len()
                ),
            )
        })?;
    }
    let mut written = 0;
    while written < state.len() {
        match write_end.write(&state[written..]) {
            Ok(0) => break,
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot write the device state into the transfer pipe: {e}"),
                ))
            }
        }
    }
    if written < state.len() {
        return Err(io::Error::new(
            ErrorKind::WouldBlock,
            format!(
                "the transfer pipe took {written} of the {} bytes of device state",
                state.len()
            ),
        ));
    }
    outboard_protocol::log_limited!(
        log::Level::Info,
        "device state saved ({} bytes)",
        state.len()
    );
    Ok(read_end)
}

/// Reads `file` up to end of file: at most [`MAX_DEVICE_STATE`] bytes, waiting at most
/// `timeout` in all.
fn read_state(mut file: File, timeout: Duration) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return Ok(bytes),
            Ok(n) => {
                if bytes.len() + n > MAX_DEVICE_STATE {
                    return Err(io::Error::new(
                        ErrorKind::InvalidData,
                        format!(
                            "the front-end sent more than {MAX_DEVICE_STATE} bytes of device state"
                        ),
                    ));
                }
                bytes.extend_from_slice(&buf[..n]);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(
                        ErrorKind::TimedOut,
                        format!(
                            "the front-end did not finish the device state in {} ms \
                             ({} bytes came, its end of the pipe is still open)",
                            timeout.as_millis(),
                            bytes.len()
                        ),
                    ));
                }
                wait_readable(&file, left)?;
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot read the device state from the transfer fd: {e}"),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outboard_devices::testing::EchoDevice;

    /// A stand-in for the front-end's fd (the daemon closes it unused).
    fn theirs() -> OwnedFd {
        pipe().unwrap().0.into()
    }

    fn start(
        t: &mut StateTransfer,
        dev: &mut EchoDevice,
        direction: TransferDirection,
        running: Option<usize>,
    ) -> io::Result<File> {
        t.start(dev, direction, TransferPhase::Stopped, theirs(), running)
            .map(|fd| File::from(fd.expect("the daemon answers with its own pipe end")))
    }

    #[test]
    fn save_then_load_moves_the_state() {
        let mut a = EchoDevice::new(&[4]).with_config(b"state!").with_state();
        let mut t = StateTransfer::default();
        let mut r = start(&mut t, &mut a, TransferDirection::Save, None).unwrap();
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap(); // EOF: the worker closed its end
        assert_eq!(got, b"state!");
        t.check(&mut a, |_| {}).unwrap();
        assert!(t.check(&mut a, |_| {}).is_err(), "one check per transfer");

        let mut b = EchoDevice::new(&[4]).with_config(b"xxxxxx").with_state();
        let mut w = start(&mut t, &mut b, TransferDirection::Load, None).unwrap();
        w.write_all(&got).unwrap();
        drop(w);
        let mut resets = 0;
        t.check(&mut b, |_| resets += 1).unwrap();
        assert_eq!(resets, 1);
        assert_eq!(b.snapshot_state().unwrap(), b"state!");
    }

    /// State larger than a pipe's default capacity goes through whole, both ways.
    #[test]
    fn large_state_goes_through_without_waiting() {
        let big = vec![0x5a; 200 * 1024];
        let mut a = EchoDevice::new(&[4]).with_config(&big).with_state();
        let mut t = StateTransfer::default();
        let mut r = start(&mut t, &mut a, TransferDirection::Save, None).unwrap();
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert_eq!(got, big);
        t.check(&mut a, |_| {}).unwrap();

        let mut b = EchoDevice::new(&[4])
            .with_config(&vec![0; big.len()])
            .with_state();
        let mut w = start(&mut t, &mut b, TransferDirection::Load, None).unwrap();
        // The whole state fits before anyone reads: this thread writes it all first.
        w.write_all(&got).unwrap();
        drop(w);
        t.check(&mut b, |_| {}).unwrap();
        assert_eq!(b.snapshot_state().unwrap(), big);
    }

    #[test]
    fn refusals_name_the_reason() {
        let mut t = StateTransfer::default();
        let mut dev = EchoDevice::new(&[4]).with_config(b"abc").with_state();
        let err = start(&mut t, &mut dev, TransferDirection::Save, Some(1)).unwrap_err();
        assert!(err.to_string().contains("ring 1 is running"), "{err}");

        let mut plain = EchoDevice::new(&[4]);
        let err = start(&mut t, &mut plain, TransferDirection::Save, None).unwrap_err();
        assert!(
            err.to_string().contains("does not save or restore"),
            "{err}"
        );
        let err = t.check(&mut dev, |_| {}).unwrap_err();
        assert!(err.to_string().contains("without a transfer"), "{err}");

        // LOAD: bytes the device refuses; a front-end that never closes its end.
        let mut w = start(&mut t, &mut dev, TransferDirection::Load, None).unwrap();
        w.write_all(b"toolong").unwrap();
        drop(w);
        let err = t.check(&mut dev, |_| {}).unwrap_err();
        assert!(err.to_string().contains("refused the 7 bytes"), "{err}");

        let mut w = start(&mut t, &mut dev, TransferDirection::Load, None).unwrap();
        w.write_all(b"ab").unwrap();
        let started = Instant::now();
        let err = t.check(&mut dev, |_| {}).unwrap_err();
        assert!(started.elapsed() < LOAD_TIMEOUT + Duration::from_millis(500));
        assert!(err.to_string().contains("did not finish"), "{err}");
        drop(w);
    }

    #[test]
    fn a_load_reads_at_most_the_cap() {
        let (r, w) = pipe().unwrap();
        let writer = std::thread::spawn(move || {
            let mut w = w;
            let chunk = vec![0u8; 65536];
            while w.write_all(&chunk).is_ok() {}
        });
        set_nonblocking(&r).unwrap();
        let err = read_state(r, Duration::from_secs(5)).unwrap_err();
        assert!(err.to_string().contains("more than 1048576 bytes"), "{err}");
        writer.join().unwrap();
    }
}
