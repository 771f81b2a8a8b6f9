//! Thin safe wrappers over the Linux calls the muxer makes (epoll, timerfd, AF_UNIX
//! sockets, scatter/gather I/O on guest memory regions).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use crate::virtio::IoRegion;

/// Most iovecs one call takes (`IOV_MAX` on Linux).
pub(crate) const IOV_MAX: usize = 1024;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        // Non-negative ssize_t fits usize.
        Ok(ret as usize)
    }
}

fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
    let fd = cvt(fd)?;
    // SAFETY: `fd` was just returned by the kernel as a new descriptor that nothing else
    // owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `epoll_create1(EPOLL_CLOEXEC)`.
pub(crate) fn epoll_create() -> io::Result<OwnedFd> {
    // SAFETY: no pointers; the result is checked.
    owned(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })
}

/// `epoll_ctl` with `events` and `token` as the event data.
pub(crate) fn epoll_ctl(
    epoll: &OwnedFd,
    op: libc::c_int,
    fd: RawFd,
    events: u32,
    token: u64,
) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: `ev` is a valid epoll_event that outlives the call; the kernel validates
    // both descriptors.
    cvt(unsafe { libc::epoll_ctl(epoll.as_raw_fd(), op, fd, &mut ev) })?;
    Ok(())
}

/// `epoll_wait` without blocking; returns the number of events stored in `events`.
pub(crate) fn epoll_wait_now(
    epoll: &OwnedFd,
    events: &mut [libc::epoll_event],
) -> io::Result<usize> {
    let max = events.len().min(i32::MAX as usize) as libc::c_int;
    // SAFETY: `events` is a writable buffer of at least `max` epoll_events.
    let n = unsafe { libc::epoll_wait(epoll.as_raw_fd(), events.as_mut_ptr(), max, 0) };
    match cvt(n) {
        Ok(n) => Ok(n as usize),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
        Err(e) => Err(e),
    }
}

/// A non-blocking monotonic timerfd.
pub(crate) fn timerfd_create() -> io::Result<OwnedFd> {
    // SAFETY: no pointers; the result is checked.
    owned(unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    })
}

/// Arms `timer` to fire once after `after` (zero disarms it).
pub(crate) fn timerfd_arm(timer: &OwnedFd, after: Option<Duration>) -> io::Result<()> {
    let value = match after {
        // A zero it_value disarms; round a due deadline up to 1 ns so it fires.
        Some(d) => libc::timespec {
            tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
            tv_nsec: d.subsec_nanos().max(u32::from(d.as_secs() == 0)) as libc::c_long,
        },
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
    };
    let spec = libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
        it_value: value,
    };
    // SAFETY: `spec` is valid for reading; a null old value is allowed.
    cvt(unsafe { libc::timerfd_settime(timer.as_raw_fd(), 0, &spec, std::ptr::null_mut()) })?;
    Ok(())
}

/// Reads (and so clears) a timerfd's expiry count; `Ok(())` also when it had not fired.
pub(crate) fn timerfd_clear(timer: &OwnedFd) {
    let mut buf = [0u8; 8];
    // SAFETY: `buf` is 8 writable bytes, the size a timerfd read needs. Errors (EAGAIN
    // when not expired) are irrelevant here.
    let _ = unsafe { libc::read(timer.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
}

/// `eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)`.
pub(crate) fn eventfd_create() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; the result is checked by `owned`.
    owned(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })
}

/// Adds 1 to an eventfd's counter (never blocks: the counter cannot reach its limit
/// with one increment per call between reads).
pub(crate) fn eventfd_signal(fd: &OwnedFd) -> io::Result<()> {
    let one = 1u64.to_ne_bytes();
    // SAFETY: `one` is 8 readable bytes, the size an eventfd write needs.
    let n = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    cvt_size(n).map(drop)
}

fn sockaddr_un(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain old data for which all-zeroes is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unix socket path {path:?} is empty, too long or has a NUL byte"),
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

/// A non-blocking close-on-exec AF_UNIX socket of type `ty` (`SOCK_STREAM` or
/// `SOCK_SEQPACKET`).
pub(crate) fn unix_socket(ty: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: no pointers; the result is checked.
    owned(unsafe {
        libc::socket(
            libc::AF_UNIX,
            ty | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })
}

/// A listening socket bound to `path`.
pub(crate) fn unix_listen(path: &Path, ty: libc::c_int) -> io::Result<OwnedFd> {
    let fd = unix_socket(ty)?;
    let (addr, len) = sockaddr_un(path)?;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    })?;
    // SAFETY: plain call on an owned fd.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), 128) })?;
    Ok(fd)
}

/// A non-blocking connection to the listener at `path`.
pub(crate) fn unix_connect(path: &Path, ty: libc::c_int) -> io::Result<OwnedFd> {
    let fd = unix_socket(ty)?;
    let (addr, len) = sockaddr_un(path)?;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
    cvt(unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    })?;
    Ok(fd)
}

/// `accept4` with `SOCK_NONBLOCK | SOCK_CLOEXEC`.
pub(crate) fn accept(listener: &OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: null address pointers are allowed; the result is checked.
    owned(unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    })
}

/// `shutdown(fd, how)`.
pub(crate) fn shutdown(fd: BorrowedFd<'_>, how: libc::c_int) -> io::Result<()> {
    // SAFETY: plain call on a borrowed, open fd.
    cvt(unsafe { libc::shutdown(fd.as_raw_fd(), how) })?;
    Ok(())
}

/// `send` of a host buffer (never SIGPIPE).
pub(crate) fn send(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reading `buf.len()` bytes.
    cvt_size(unsafe {
        libc::send(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    })
}

/// `recv` into a host buffer with `flags` (`MSG_DONTWAIT` is added).
pub(crate) fn recv(fd: BorrowedFd<'_>, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writing `buf.len()` bytes.
    cvt_size(unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            flags | libc::MSG_DONTWAIT,
        )
    })
}

/// The length of the next message of a datagram-like socket, without consuming it.
pub(crate) fn peek_msg_len(fd: BorrowedFd<'_>) -> io::Result<usize> {
    // SAFETY: a zero-length receive with a null buffer is valid; MSG_TRUNC makes the
    // kernel report the real message length.
    cvt_size(unsafe {
        libc::recv(
            fd.as_raw_fd(),
            std::ptr::null_mut(),
            0,
            libc::MSG_PEEK | libc::MSG_TRUNC | libc::MSG_DONTWAIT,
        )
    })
}

/// Scratch space for the `iovec` array of one call, reused to avoid allocation.
#[derive(Debug, Default)]
pub(crate) struct IovScratch(Vec<libc::iovec>);

// SAFETY: the iovecs are filled from IoRegions (which are Send) right before the syscall
// that uses them and are never dereferenced by Rust code; stale entries left between
// calls are overwritten before any use.
unsafe impl Send for IovScratch {}

fn iovecs<'a>(regions: &[IoRegion], out: &'a mut IovScratch) -> &'a mut Vec<libc::iovec> {
    out.0.clear();
    out.0
        .extend(regions.iter().take(IOV_MAX).map(IoRegion::as_iovec));
    &mut out.0
}

/// Gathers from guest memory regions into a socket (`sendmsg`, no SIGPIPE).
///
/// `iov` is scratch space reused across calls.
pub(crate) fn send_regions(
    fd: BorrowedFd<'_>,
    regions: &[IoRegion],
    iov: &mut IovScratch,
) -> io::Result<usize> {
    let iov = iovecs(regions, iov);
    // SAFETY: msghdr is plain old data; all-zeroes is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len() as _;
    // SAFETY: every iovec describes a readable IoRegion (IoRegion::new's contract keeps
    // it mapped during this call). The kernel only reads from it; a guest changing the
    // bytes concurrently changes what is sent, which is the guest's own data.
    cvt_size(unsafe {
        libc::sendmsg(
            fd.as_raw_fd(),
            &msg,
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    })
}

/// Scatters from a socket into guest memory regions (`recvmsg`); returns the byte
/// count and the returned `msg_flags` (for `MSG_TRUNC`/`MSG_EOR`).
pub(crate) fn recv_regions(
    fd: BorrowedFd<'_>,
    regions: &[IoRegion],
    iov: &mut IovScratch,
) -> io::Result<(usize, libc::c_int)> {
    let iov = iovecs(regions, iov);
    // SAFETY: msghdr is plain old data; all-zeroes is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len() as _;
    // SAFETY: every iovec describes a device-writable IoRegion that stays mapped during
    // the call (IoRegion::new's contract). The kernel writes socket bytes into it; no
    // Rust reference to that memory exists.
    let n = cvt_size(unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) })?;
    Ok((n, msg.msg_flags))
}

/// A connected pair of non-blocking close-on-exec AF_UNIX `SOCK_SEQPACKET` sockets.
pub(crate) fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a writable array of two ints for the kernel to fill.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: both are new descriptors the kernel just returned; nothing else owns them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `getsockopt` of an `int` option.
pub(crate) fn sockopt_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writing and `len` holds its size.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(value)
}

/// `setsockopt` of an `int` option.
pub(crate) fn set_sockopt_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` is a valid int for the kernel to read, with its size.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// Sets `O_NONBLOCK` on `fd`.
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: no pointers; the kernel validates the descriptor.
    let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(())
}

/// Bytes a socket has sent that its peer has not read yet (`SIOCOUTQ`; for AF_UNIX the
/// memory those messages take, which the send buffer bounds).
pub(crate) fn unread_sent_bytes(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut value: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int into `value`, which is valid for writing.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ as _, &mut value) })?;
    Ok(usize::try_from(value).unwrap_or(0))
}

/// Sends `parts` as one message (`sendmsg` of host buffers, never blocks, no SIGPIPE).
pub(crate) fn send_parts(fd: BorrowedFd<'_>, parts: &[&[u8]]) -> io::Result<usize> {
    let mut iov: Vec<libc::iovec> = parts
        .iter()
        .map(|p| libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        })
        .collect();
    // SAFETY: msghdr is plain old data; all-zeroes is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len() as _;
    // SAFETY: every iovec describes a borrowed slice that outlives the call; the kernel
    // only reads through them (the `*mut` is what `iovec` spells, not a write).
    cvt_size(unsafe {
        libc::sendmsg(
            fd.as_raw_fd(),
            &msg,
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    })
}

/// Receives one message into `head` then `body` (`recvmsg`, never blocks); returns the
/// message's bytes stored and the returned `msg_flags` (`MSG_TRUNC` when it was longer).
pub(crate) fn recv_parts(
    fd: BorrowedFd<'_>,
    head: &mut [u8],
    body: &mut [u8],
) -> io::Result<(usize, libc::c_int)> {
    let mut iov = [
        libc::iovec {
            iov_base: head.as_mut_ptr().cast(),
            iov_len: head.len(),
        },
        libc::iovec {
            iov_base: body.as_mut_ptr().cast(),
            iov_len: body.len(),
        },
    ];
    // SAFETY: msghdr is plain old data; all-zeroes is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len() as _;
    // SAFETY: both iovecs describe exclusively borrowed buffers that outlive the call;
    // the kernel writes at most their lengths.
    let n = cvt_size(unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) })?;
    Ok((n, msg.msg_flags))
}
