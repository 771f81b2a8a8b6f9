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
//! # The worker never waits on the front-end's pipe
//!
//! The worker is one thread with one epoll set that also answers the front-end; in a
//! jailed worker it has no way to start a thread (its seccomp list has no `clone`), and
//! a pipe is the peer's to stall. So the transfer is non-blocking I/O at the two points
//! where the protocol says the pipe is ready, with a cap and a short bound:
//!
//! - SAVE: the device's state is written at `SET_DEVICE_STATE_FD`, non-blocking, and the
//!   fd closed (the front-end reads up to end of file after the reply). It must fit in
//!   the pipe at once: a Linux pipe holds 64 KiB unless made smaller; vsock's state is
//!   32 bytes. State that does not fit fails the request with a message naming both
//!   sizes, and the worker has not waited.
//! - LOAD: the fd is kept, non-blocking. At `CHECK_DEVICE_STATE`, by which time the
//!   front-end has written the state and closed its end, the worker reads up to end of
//!   file, waiting at most [`LOAD_TIMEOUT`] in all for data that is late (a front-end
//!   that keeps its end open without writing gets an error after that, never a hang),
//!   and at most [`MAX_DEVICE_STATE`] bytes (more is refused without reading on). Only
//!   then does the device see the bytes ([`VirtioDevice::restore_state`], which checks
//!   them like any other peer input); a device that was active is reset first.
//!
//! Every ring must be stopped for either direction (the specification's STOPPED
//! phase); a transfer while a ring runs is refused.

use std::fs::File;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use outboard_devices::virtio::VirtioDevice;
use outboard_protocol::vhost_user::{TransferDirection, TransferPhase};
use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};

/// Most bytes of device state a LOAD reads from the front-end.
pub const MAX_DEVICE_STATE: usize = 1 << 20;

/// Longest the worker waits, in all, at `CHECK_DEVICE_STATE` for the rest of the state a
/// LOAD is reading.
pub const LOAD_TIMEOUT: Duration = Duration::from_secs(1);

/// The transfer in progress on one connection.
#[derive(Debug, Default)]
pub(crate) enum StateTransfer {
    /// None started (or the last one was checked).
    #[default]
    Idle,
    /// A SAVE ran at `SET_DEVICE_STATE_FD`; its outcome.
    Saved(Result<(), String>),
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
    /// `SET_DEVICE_STATE_FD`. `any_ring_running` names a ring that has not been stopped.
    pub(crate) fn start<D: VirtioDevice>(
        &mut self,
        device: &mut D,
        direction: TransferDirection,
        phase: TransferPhase,
        fd: OwnedFd,
        running_ring: Option<usize>,
    ) -> io::Result<()> {
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
        let file = File::from(fd);
        set_nonblocking(&file).map_err(|e| {
            error(
                e.kind(),
                format!("cannot make the transfer fd non-blocking: {e}"),
            )
        })?;
        match direction {
            TransferDirection::Save => {
                let outcome = save(device, file);
                let result = outcome
                    .as_ref()
                    .map(drop)
                    .map_err(|e| error(e.kind(), e.to_string()));
                *self = StateTransfer::Saved(outcome.map_err(|e| e.to_string()));
                result
            }
            TransferDirection::Load => {
                *self = StateTransfer::Loading(file);
                Ok(())
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
            StateTransfer::Saved(Ok(())) => Ok(()),
            StateTransfer::Saved(Err(e)) => Err(io::Error::other(e)),
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

/// Writes the device's state into `file` at once and closes it.
fn save<D: VirtioDevice>(device: &mut D, mut file: File) -> io::Result<()> {
    let state = device
        .snapshot_state()
        .map_err(|e| io::Error::other(format!("the device could not save its state: {e}")))?;
    let mut written = 0;
    while written < state.len() {
        match file.write(&state[written..]) {
            Ok(0) => break,
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot write the device state into the transfer fd: {e}"),
                ))
            }
        }
    }
    if written < state.len() {
        return Err(io::Error::new(
            ErrorKind::WouldBlock,
            format!(
                "the device state is {} bytes and the transfer fd took {written} at once \
                 (it must hold the state without the worker waiting)",
                state.len()
            ),
        ));
    }
    outboard_protocol::log_limited!(
        log::Level::Info,
        "device state saved ({} bytes)",
        state.len()
    );
    Ok(())
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

    fn pipe() -> (File, File) {
        use std::os::fd::FromRawFd;
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two fds pipe2 writes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both fds are new and owned by nobody else.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    #[test]
    fn save_then_load_moves_the_state() {
        let mut a = EchoDevice::new(&[4]).with_config(b"state!").with_state();
        let mut t = StateTransfer::default();
        let (mut r, w) = pipe();
        t.start(
            &mut a,
            TransferDirection::Save,
            TransferPhase::Stopped,
            w.into(),
            None,
        )
        .unwrap();
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap(); // EOF: the worker closed its end
        assert_eq!(got, b"state!");
        t.check(&mut a, |_| {}).unwrap();
        assert!(t.check(&mut a, |_| {}).is_err(), "one check per transfer");

        let mut b = EchoDevice::new(&[4]).with_config(b"xxxxxx").with_state();
        let (r, mut w) = pipe();
        t.start(
            &mut b,
            TransferDirection::Load,
            TransferPhase::Stopped,
            r.into(),
            None,
        )
        .unwrap();
        w.write_all(&got).unwrap();
        drop(w);
        let mut resets = 0;
        t.check(&mut b, |_| resets += 1).unwrap();
        assert_eq!(resets, 1);
        assert_eq!(b.snapshot_state().unwrap(), b"state!");
    }

    #[test]
    fn refusals_name_the_reason() {
        let mut t = StateTransfer::default();
        let mut dev = EchoDevice::new(&[4]).with_config(b"abc").with_state();
        let (_r, w) = pipe();
        let err = t
            .start(
                &mut dev,
                TransferDirection::Save,
                TransferPhase::Stopped,
                w.into(),
                Some(1),
            )
            .unwrap_err();
        assert!(err.to_string().contains("ring 1 is running"), "{err}");

        let mut plain = EchoDevice::new(&[4]);
        let (_r, w) = pipe();
        let err = t
            .start(
                &mut plain,
                TransferDirection::Save,
                TransferPhase::Stopped,
                w.into(),
                None,
            )
            .unwrap_err();
        assert!(
            err.to_string().contains("does not save or restore"),
            "{err}"
        );

        // A pipe already full: the save fails at once, naming the sizes.
        let (_r, w) = pipe();
        let mut w = w;
        set_nonblocking(&w).unwrap();
        while w.write(&[0u8; 4096]).is_ok() {}
        let err = t
            .start(
                &mut dev,
                TransferDirection::Save,
                TransferPhase::Stopped,
                w.into(),
                None,
            )
            .unwrap_err();
        assert!(
            err.to_string().contains("the device state is 3 bytes"),
            "{err}"
        );
        assert!(t.check(&mut dev, |_| {}).is_err());

        // LOAD: bytes the device refuses; a front-end that never closes its end.
        let (r, mut w) = pipe();
        t.start(
            &mut dev,
            TransferDirection::Load,
            TransferPhase::Stopped,
            r.into(),
            None,
        )
        .unwrap();
        w.write_all(b"toolong").unwrap();
        drop(w);
        let err = t.check(&mut dev, |_| {}).unwrap_err();
        assert!(err.to_string().contains("refused the 7 bytes"), "{err}");

        let (r, mut w) = pipe();
        t.start(
            &mut dev,
            TransferDirection::Load,
            TransferPhase::Stopped,
            r.into(),
            None,
        )
        .unwrap();
        w.write_all(b"ab").unwrap();
        let started = Instant::now();
        let err = t.check(&mut dev, |_| {}).unwrap_err();
        assert!(started.elapsed() < LOAD_TIMEOUT + Duration::from_millis(500));
        assert!(err.to_string().contains("did not finish"), "{err}");
        drop(w);
    }

    #[test]
    fn a_load_reads_at_most_the_cap() {
        let (r, w) = pipe();
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
