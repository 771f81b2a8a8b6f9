//! Thin wrappers over the Linux calls the muxer makes (epoll, timerfd, eventfd, AF_UNIX
//! sockets, scatter/gather I/O on guest memory regions).
//!
//! Every call goes through rustix, as in the media device, except the two that move
//! bytes between a socket and guest memory ([`send_regions`], [`recv_regions`]): rustix's
//! `sendmsg`/`recvmsg` take `IoSlice`/`IoSliceMut`, which are Rust references (`&[u8]`,
//! `&mut [u8]`) to memory the guest may change at any time, and building them per call
//! would need a fresh, lifetime-bound array per packet. Those two call libc on an
//! `iovec` array reused across packets ([`IovScratch`]), so the data path gains neither a
//! copy nor an allocation.
//!
//! rustix calls the kernel directly; the jailed worker's seccomp list
//! (`outboard_vmm_glue::jail::WORKER_SYSCALLS`) names what it uses: `epoll_pwait` (not
//! `epoll_wait`), `eventfd2`, `accept4`, `socket`/`socketpair` with flags, `sendto` and
//! `recvfrom` for `send`/`recv`, `sendmsg`/`recvmsg`, `getsockopt`/`setsockopt`,
//! `fcntl`, `ioctl`, `timerfd_settime`, `read` and `write`.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use rustix::event::epoll::{self, EventData, EventFlags};
use rustix::event::{eventfd, EventfdFlags};
use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};
use rustix::net::{
    sockopt, AddressFamily, RecvAncillaryBuffer, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendFlags, Shutdown, SocketAddrUnix, SocketFlags, SocketType,
};
use rustix::time::{
    timerfd_create as rustix_timerfd_create, timerfd_settime, Itimerspec, TimerfdClockId,
    TimerfdFlags, TimerfdTimerFlags, Timespec,
};

use crate::virtio::IoRegion;

/// Most iovecs one call takes (`IOV_MAX` on Linux).
pub(crate) const IOV_MAX: usize = 1024;

/// One readiness report of the muxer's epoll set.
pub(crate) type EpollEvent = epoll::Event;

/// An empty [`EpollEvent`], to size the buffer [`epoll_wait_now`] fills.
pub(crate) const NO_EVENT: EpollEvent = epoll::Event {
    flags: EventFlags::empty(),
    data: EventData::new_u64(0),
};

/// `epoll_create1(EPOLL_CLOEXEC)`.
pub(crate) fn epoll_create() -> io::Result<OwnedFd> {
    Ok(epoll::create(epoll::CreateFlags::CLOEXEC)?)
}

/// `epoll_ctl(EPOLL_CTL_ADD)` with `events` and `token` as the event data.
pub(crate) fn epoll_add(
    epoll: &OwnedFd,
    fd: BorrowedFd<'_>,
    events: EventFlags,
    token: u64,
) -> io::Result<()> {
    Ok(epoll::add(epoll, fd, EventData::new_u64(token), events)?)
}

/// `epoll_ctl(EPOLL_CTL_MOD)` with `events` and `token` as the event data.
pub(crate) fn epoll_modify(
    epoll: &OwnedFd,
    fd: BorrowedFd<'_>,
    events: EventFlags,
    token: u64,
) -> io::Result<()> {
    Ok(epoll::modify(epoll, fd, EventData::new_u64(token), events)?)
}

/// `epoll_ctl(EPOLL_CTL_DEL)`.
pub(crate) fn epoll_delete(epoll: &OwnedFd, fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(epoll::delete(epoll, fd)?)
}

/// `epoll_pwait` without blocking; returns the number of events stored in `events`
/// (0 when interrupted).
pub(crate) fn epoll_wait_now(epoll: &OwnedFd, events: &mut [EpollEvent]) -> io::Result<usize> {
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match epoll::wait(epoll, events, Some(&now)) {
        Ok(n) => Ok(n),
        Err(rustix::io::Errno::INTR) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// A non-blocking monotonic timerfd.
pub(crate) fn timerfd_create() -> io::Result<OwnedFd> {
    Ok(rustix_timerfd_create(
        TimerfdClockId::Monotonic,
        TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
    )?)
}

/// Arms `timer` to fire once after `after` (`None` disarms it).
pub(crate) fn timerfd_arm(timer: &OwnedFd, after: Option<Duration>) -> io::Result<()> {
    let it_value = match after {
        // A zero it_value disarms; round a due deadline up to 1 ns so it fires.
        Some(d) => Timespec {
            tv_sec: d.as_secs().min(i64::MAX as u64) as i64,
            tv_nsec: i64::from(d.subsec_nanos().max(u32::from(d.as_secs() == 0))),
        },
        None => Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
    };
    let spec = Itimerspec {
        it_interval: Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
        it_value,
    };
    timerfd_settime(timer, TimerfdTimerFlags::empty(), &spec)?;
    Ok(())
}

/// Reads (and so clears) a timerfd's or an eventfd's count; does nothing when it had
/// not fired.
pub(crate) fn timerfd_clear(timer: &OwnedFd) {
    let mut buf = [0u8; 8];
    // Errors (EAGAIN when not expired) are irrelevant here.
    let _ = rustix::io::read(timer, &mut buf);
}

/// `eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)`.
pub(crate) fn eventfd_create() -> io::Result<OwnedFd> {
    Ok(eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC)?)
}

/// Adds 1 to an eventfd's counter (never blocks: the counter cannot reach its limit
/// with one increment per call between reads).
pub(crate) fn eventfd_signal(fd: &OwnedFd) -> io::Result<()> {
    rustix::io::write(fd, &1u64.to_ne_bytes())?;
    Ok(())
}

fn sockaddr_un(path: &Path) -> io::Result<SocketAddrUnix> {
    let bytes = path.as_os_str().as_bytes();
    // sun_path is 108 bytes, the terminating NUL included.
    if bytes.is_empty() || bytes.len() >= 108 || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unix socket path {path:?} is empty, too long or has a NUL byte"),
        ));
    }
    Ok(SocketAddrUnix::new(path)?)
}

/// A non-blocking close-on-exec AF_UNIX socket of type `ty` (`STREAM` or `SEQPACKET`).
pub(crate) fn unix_socket(ty: SocketType) -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        ty,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?)
}

/// A listening socket bound to `path`.
pub(crate) fn unix_listen(path: &Path, ty: SocketType) -> io::Result<OwnedFd> {
    let fd = unix_socket(ty)?;
    rustix::net::bind(&fd, &sockaddr_un(path)?)?;
    rustix::net::listen(&fd, 128)?;
    Ok(fd)
}

/// A non-blocking connection to the listener at `path`.
pub(crate) fn unix_connect(path: &Path, ty: SocketType) -> io::Result<OwnedFd> {
    let fd = unix_socket(ty)?;
    rustix::net::connect(&fd, &sockaddr_un(path)?)?;
    Ok(fd)
}

/// `accept4` with `SOCK_NONBLOCK | SOCK_CLOEXEC`.
pub(crate) fn accept(listener: &OwnedFd) -> io::Result<OwnedFd> {
    Ok(rustix::net::accept_with(
        listener,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
    )?)
}

/// `shutdown(fd, how)`.
pub(crate) fn shutdown(fd: BorrowedFd<'_>, how: Shutdown) -> io::Result<()> {
    Ok(rustix::net::shutdown(fd, how)?)
}

/// `send` of a host buffer (never blocks, never SIGPIPE).
pub(crate) fn send(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    Ok(rustix::net::send(
        fd,
        buf,
        SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
    )?)
}

/// `recv` into a host buffer with `flags` (`MSG_DONTWAIT` is added); returns what the
/// kernel returns (with `MSG_TRUNC`, the message's full length).
pub(crate) fn recv(fd: BorrowedFd<'_>, buf: &mut [u8], flags: RecvFlags) -> io::Result<usize> {
    let (_, len) = rustix::net::recv(fd, buf, flags | RecvFlags::DONTWAIT)?;
    Ok(len)
}

/// The length of the next message of a datagram-like socket, without consuming it.
///
/// A one-byte receive with `MSG_PEEK | MSG_TRUNC` makes the kernel report the whole
/// length. Not a zero-length one: AF_VSOCK answers any zero-length receive with 0
/// before looking at its queue, so every message would look empty (and a zero-length
/// read would never consume it). AF_VSOCK seqpacket sockets support `MSG_PEEK` since
/// Linux 6.3 and fail with `EOPNOTSUPP` before.
pub(crate) fn peek_msg_len(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut byte = [0u8; 1];
    recv(fd, &mut byte, RecvFlags::PEEK | RecvFlags::TRUNC)
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

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        // Non-negative ssize_t fits usize.
        Ok(ret as usize)
    }
}

/// Gathers from guest memory regions into a socket (`sendmsg`, no SIGPIPE).
///
/// `iov` is scratch space reused across calls.
///
/// Raw libc, not rustix: rustix's `sendmsg` takes `&[IoSlice]`, a Rust `&[u8]` per
/// region of guest memory the guest may write concurrently, in a fresh array per call;
/// the `iovec`s here are plain addresses in a buffer reused across packets.
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
/// count and the returned flags (for `MSG_TRUNC`/`MSG_EOR`).
///
/// Raw libc, not rustix: rustix's `recvmsg` takes `&mut [IoSliceMut]`, a Rust
/// `&mut [u8]` per region of guest memory, which the guest may read or write
/// concurrently (no Rust reference to it may exist), in a fresh array per call.
pub(crate) fn recv_regions(
    fd: BorrowedFd<'_>,
    regions: &[IoRegion],
    iov: &mut IovScratch,
) -> io::Result<(usize, ReturnFlags)> {
    let iov = iovecs(regions, iov);
    // SAFETY: msghdr is plain old data; all-zeroes is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len() as _;
    // SAFETY: every iovec describes a device-writable IoRegion that stays mapped during
    // the call (IoRegion::new's contract). The kernel writes socket bytes into it; no
    // Rust reference to that memory exists.
    let n = cvt_size(unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) })?;
    Ok((n, ReturnFlags::from_bits_retain(msg.msg_flags as u32)))
}

/// An AF_VSOCK address (`struct sockaddr_vm`).
///
/// rustix knows the family (`AddressFamily::VSOCK`) but has no address type for it, and
/// its `SocketAddrArg` trait exists for callers to supply their own; the muxer's one
/// vsock use (`--forward-cid`) does not justify another socket crate.
#[derive(Clone, Copy)]
pub(crate) struct VsockAddr(libc::sockaddr_vm);

impl VsockAddr {
    /// The address `(cid, port)`.
    pub(crate) fn new(cid: u32, port: u32) -> Self {
        // SAFETY: sockaddr_vm is plain old data (integers and padding); all-zeroes is
        // a valid value, and the fields that matter are set below.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_cid = cid;
        addr.svm_port = port;
        VsockAddr(addr)
    }
}

// SAFETY: `with_sockaddr` passes `f` a pointer to a whole, initialized `sockaddr_vm`
// (whose first field is the family, as every sockaddr's) and its exact size; the
// pointer is valid for the duration of the call because it borrows `self`.
unsafe impl rustix::net::addr::SocketAddrArg for VsockAddr {
    unsafe fn with_sockaddr<R>(
        &self,
        f: impl FnOnce(
            *const rustix::net::addr::SocketAddrOpaque,
            rustix::net::addr::SocketAddrLen,
        ) -> R,
    ) -> R {
        f(
            (&self.0 as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as rustix::net::addr::SocketAddrLen,
        )
    }
}

/// A non-blocking close-on-exec AF_VSOCK socket of type `ty`.
pub(crate) fn vsock_socket(ty: SocketType) -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::VSOCK,
        ty,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?)
}

/// A stream listener on AF_VSOCK port `port` of every local CID (`VMADDR_CID_ANY`).
pub(crate) fn vsock_listen(port: u32) -> io::Result<OwnedFd> {
    let fd = vsock_socket(SocketType::STREAM)?;
    rustix::net::bind(&fd, &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
    rustix::net::listen(&fd, 128)?;
    Ok(fd)
}

/// Starts a non-blocking AF_VSOCK connect of type `ty` to `(cid, port)`: the socket,
/// and whether it is connected already (false: the connect is in progress, the socket
/// becomes writable, or reports an error, when it ends; read [`socket_error`] then).
pub(crate) fn vsock_connect(cid: u32, port: u32, ty: SocketType) -> io::Result<(OwnedFd, bool)> {
    let fd = vsock_socket(ty)?;
    match rustix::net::connect(&fd, &VsockAddr::new(cid, port)) {
        Ok(()) => Ok((fd, true)),
        Err(rustix::io::Errno::INPROGRESS) => Ok((fd, false)),
        Err(e) => Err(e.into()),
    }
}

/// The pending error of a socket (`SO_ERROR`), which reading clears: `Ok(())` when a
/// non-blocking connect succeeded.
pub(crate) fn socket_error(fd: BorrowedFd<'_>) -> io::Result<()> {
    match sockopt::socket_error(fd)? {
        Ok(()) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A connected pair of non-blocking close-on-exec AF_UNIX `SOCK_SEQPACKET` sockets.
pub(crate) fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Raises `fd`'s send buffer to `bytes` (`SO_SNDBUFFORCE` where the caller may, else
/// as far as `SO_SNDBUF` goes; the kernel doubles the value it is given, for its own
/// bookkeeping, so this passes half).
pub(crate) fn raise_send_buffer(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    let half = bytes.min(i32::MAX as usize) / 2;
    if sockopt::set_socket_send_buffer_size_force(fd, half).is_err() {
        sockopt::set_socket_send_buffer_size(fd, half)?;
    }
    Ok(())
}

/// `getsockopt(SO_SNDBUF)`: the send buffer's size as the kernel counts it.
pub(crate) fn send_buffer_size(fd: BorrowedFd<'_>) -> io::Result<usize> {
    Ok(sockopt::socket_send_buffer_size(fd)?)
}

/// Whether `fd` is an AF_UNIX `SOCK_SEQPACKET` socket (`SO_DOMAIN`, `SO_TYPE`); the
/// error says what it is instead.
pub(crate) fn check_unix_seqpacket(fd: BorrowedFd<'_>) -> Result<(), String> {
    let ty = sockopt::socket_type(fd).map_err(|e| format!("SO_TYPE: {e}"))?;
    let domain = sockopt::socket_domain(fd).map_err(|e| format!("SO_DOMAIN: {e}"))?;
    if ty != SocketType::SEQPACKET || domain != AddressFamily::UNIX {
        return Err(format!(
            "socket of domain {} and type {}, not an AF_UNIX SOCK_SEQPACKET",
            domain.as_raw(),
            ty.as_raw()
        ));
    }
    Ok(())
}

/// Sets `O_NONBLOCK` on `fd`.
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = fcntl_getfl(fd)?;
    fcntl_setfl(fd, flags | OFlags::NONBLOCK)?;
    Ok(())
}

/// Bytes a socket has sent that its peer has not read yet (`SIOCOUTQ`; for AF_UNIX the
/// memory those messages take, which the send buffer bounds).
pub(crate) fn unread_sent_bytes(fd: BorrowedFd<'_>) -> io::Result<usize> {
    use rustix::ioctl::{ioctl, Getter};
    // SAFETY: SIOCOUTQ (TIOCOUTQ's number) reads no argument and writes one int, which
    // is what a `Getter` of `c_int` passes (a pointer to an int it owns).
    let value = unsafe {
        ioctl(
            fd,
            Getter::<{ libc::TIOCOUTQ as rustix::ioctl::Opcode }, libc::c_int>::new(),
        )
    }?;
    Ok(usize::try_from(value).unwrap_or(0))
}

/// Sends `head` then `body` as one message (`sendmsg` of host buffers, never blocks,
/// no SIGPIPE).
pub(crate) fn send_parts(fd: BorrowedFd<'_>, head: &[u8], body: &[u8]) -> io::Result<usize> {
    Ok(rustix::net::sendmsg(
        fd,
        &[IoSlice::new(head), IoSlice::new(body)],
        &mut SendAncillaryBuffer::default(),
        SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
    )?)
}

/// Receives one message into `head` then `body` (`recvmsg`, never blocks); returns the
/// message's bytes stored and the returned flags (`TRUNC` when it was longer).
pub(crate) fn recv_parts(
    fd: BorrowedFd<'_>,
    head: &mut [u8],
    body: &mut [u8],
) -> io::Result<(usize, ReturnFlags)> {
    let msg = rustix::net::recvmsg(
        fd,
        &mut [IoSliceMut::new(head), IoSliceMut::new(body)],
        &mut RecvAncillaryBuffer::default(),
        RecvFlags::DONTWAIT,
    )?;
    Ok((msg.bytes, msg.flags))
}
