//! systemd integration without libsystemd: socket activation (`sd_listen_fds`) and the
//! readiness protocol (`sd_notify`), as `man 3 sd_listen_fds` and `man 3 sd_notify`
//! describe them.
//!
//! - [`listen_fds`]: the listening sockets systemd passed (`LISTEN_PID`, `LISTEN_FDS`,
//!   fds from 3 on), taken once: the variables are removed so that children do not see
//!   them.
//! - [`Notifier`]: `READY=1`, `STOPPING=1` and `STATUS=...` datagrams to
//!   `NOTIFY_SOCKET` (a path, or an abstract name written with a leading `@`); without
//!   the variable every call does nothing.
//!
//! Written here rather than taken from a crate: the two protocols are a few environment
//! variables and one datagram, and the crates that implement them (`sd-notify`,
//! `listenfd`, `libsystemd`) would each cover only half or pull in more than they save.

use std::io;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;

use thiserror::Error;

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// Most fds this daemon takes from systemd (a bound on a value from the environment).
pub const MAX_LISTEN_FDS: usize = 4096;

/// Errors of [`listen_fds`].
#[cfg_attr(test, remain::sorted)]
#[derive(Debug, Error)]
pub enum SystemdError {
    /// `LISTEN_FDS` is not a number, or above [`MAX_LISTEN_FDS`].
    #[error("LISTEN_FDS={0:?} is not a count of file descriptors (0..={MAX_LISTEN_FDS})")]
    BadCount(String),
    /// A passed fd is not open.
    #[error("LISTEN_FDS names fd {fd}, which is not open: {source}")]
    NotOpen {
        /// The fd.
        fd: RawFd,
        /// The OS error.
        source: io::Error,
    },
}

/// The listening sockets systemd passed to this process, in order, or none when
/// `LISTEN_PID` is not this process (or not set). Takes ownership of them, makes them
/// close-on-exec and removes `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` from the
/// environment. Call it once, early, before the process starts threads.
pub fn listen_fds() -> Result<Vec<OwnedFd>, SystemdError> {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let count = std::env::var("LISTEN_FDS").ok();
    for key in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(key);
    }
    let Some(count) = count.filter(|_| ours) else {
        return Ok(Vec::new());
    };
    let n = count
        .trim()
        .parse::<usize>()
        .ok()
        .filter(|&n| n <= MAX_LISTEN_FDS)
        .ok_or_else(|| SystemdError::BadCount(count.clone()))?;
    let mut fds = Vec::with_capacity(n);
    for i in 0..n {
        // `n` is at most MAX_LISTEN_FDS, so this cannot overflow.
        let fd = LISTEN_FDS_START + i as RawFd;
        // SAFETY: F_GETFD takes no argument and only reads the fd table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(SystemdError::NotOpen {
                fd,
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: systemd passed `fd` to this process to own (LISTEN_PID is ours), it is
        // open (checked above), and the variables that name it were removed, so nothing
        // else in the process takes it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // Only matters if the daemon ever execs; an error changes nothing else.
        let _ = rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC);
        fds.push(owned);
    }
    Ok(fds)
}

/// The path an AF_UNIX socket is bound to, if it has one (not abstract, not unnamed).
pub fn bound_path(fd: BorrowedFd<'_>) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let addr = rustix::net::getsockname(fd).ok()?;
    let unix = rustix::net::SocketAddrUnix::try_from(addr).ok()?;
    // An unnamed or abstract socket has no path bytes; neither has an empty name.
    let path = unix.path_bytes().filter(|p| !p.is_empty())?;
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(path)))
}

/// Sends `sd_notify` states to the service manager, if there is one.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
}

impl Notifier {
    /// A notifier for `NOTIFY_SOCKET` (a path, or `@name` for an abstract socket); does
    /// nothing when the variable is unset, empty or unusable (a warning says why).
    pub fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET")
            .filter(|v| !v.is_empty())
            .and_then(|v| match Self::open(&v) {
                Ok(t) => Some(t),
                Err(e) => {
                    log::warn!("NOTIFY_SOCKET={v:?}: {e}; not notifying the service manager");
                    None
                }
            });
        Notifier { target }
    }

    fn open(value: &std::ffi::OsStr) -> io::Result<(UnixDatagram, std::os::unix::net::SocketAddr)> {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::ffi::OsStrExt;
        let bytes = value.as_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name)?,
            None => std::os::unix::net::SocketAddr::from_pathname(std::path::Path::new(value))?,
        };
        let sock = UnixDatagram::unbound()?;
        Ok((sock, addr))
    }

    /// Whether a service manager listens.
    pub fn is_active(&self) -> bool {
        self.target.is_some()
    }

    /// Sends `state` (newline-separated `KEY=value` assignments, e.g. `READY=1`); a
    /// failure is logged, never fatal.
    pub fn notify(&self, state: &str) {
        if let Some((sock, addr)) = &self.target {
            if let Err(e) = sock.send_to_addr(state.as_bytes(), addr) {
                log::warn!("sd_notify {state:?}: {e}");
            }
        }
    }

    /// `STATUS=<text>` (newlines in `text` become spaces).
    pub fn status(&self, text: &str) {
        self.notify(&format!("STATUS={}", text.replace('\n', " ")));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn notifications_reach_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("outboard-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            target: Some(Notifier::open(path.as_os_str()).unwrap()),
        };
        assert!(n.is_active());
        n.notify("READY=1");
        n.status("serving\n2 VMs");
        let mut buf = [0u8; 64];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1");
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STATUS=serving 2 VMs");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn notifications_reach_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("outboard-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier {
            target: Some(Notifier::open(std::ffi::OsStr::new(&format!("@{name}"))).unwrap()),
        };
        n.notify("STOPPING=1");
        let mut buf = [0u8; 64];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STOPPING=1");
    }

    #[test]
    fn bound_paths_are_read_back() {
        let dir = std::env::temp_dir().join(format!("outboard-bound-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("l.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        use std::os::fd::AsFd;
        assert_eq!(bound_path(l.as_fd()), Some(path));
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(bound_path(a.as_fd()), None, "unnamed");
        use std::os::linux::net::SocketAddrExt;
        let name = format!("outboard-bound-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let abs = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
        assert_eq!(bound_path(abs.as_fd()), None, "abstract");
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(bound_path(tcp.as_fd()), None, "not AF_UNIX");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
