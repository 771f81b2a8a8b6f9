//! Shared pieces of Outboard's fuzz targets (see `fuzz_targets/`, one module doc each).
//!
//! - [`Input`]: a cursor over the fuzzer's bytes that never fails (a short input reads
//!   as zeros), so every byte string is a valid program for a target.
//! - [`make_fd`]: fds as abstract slots. An input says "attach an fd of kind k"; the
//!   harness creates a real one (eventfd, the guest memory memfd, a memfd too small for
//!   any region, a pipe, /dev/null, a socket).
//! - [`send_raw`]: writes bytes with fds attached (SCM_RIGHTS), without any check of the
//!   vhost-user framing, so that a target can lie in a header.
//! - [`GuestFile`]: a memfd mapped shared, the guest memory a front-end hands over.
//! - [`media`]: the virtio-media command program of `media_commands` and `media_proxy`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a harness: a panic is a finding

pub mod media;

use std::io::Read;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// A cursor over fuzzer input; reads past the end give zeros.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Wraps `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }
    /// Bytes left.
    pub fn len(&self) -> usize {
        self.data.len()
    }
    /// No bytes left.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    /// Up to `n` bytes (fewer at the end).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (a, b) = self.data.split_at(n);
        self.data = b;
        a
    }
    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(usize::MAX)
    }
    /// `N` bytes, zero-padded.
    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }
    /// One byte.
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }
    /// Little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }
    /// Little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }
    /// Little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

fn check(ret: libc::c_int, what: &str) -> libc::c_int {
    assert!(ret >= 0, "{what}: {}", std::io::Error::last_os_error());
    ret
}

/// A new memfd of `len` bytes.
pub fn memfd(len: u64) -> OwnedFd {
    // SAFETY: memfd_create with a valid C string; the result is checked.
    let fd = check(
        unsafe {
            libc::memfd_create(
                c"outboard-fuzz".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        },
        "memfd_create",
    );
    // SAFETY: a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on our own fd.
    check(
        unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) },
        "ftruncate",
    );
    fd
}

/// A new non-blocking eventfd.
pub fn eventfd() -> OwnedFd {
    // SAFETY: eventfd(2) with constant flags; the result is checked.
    let fd = check(
        unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) },
        "eventfd",
    );
    // SAFETY: a new descriptor nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Number of fd kinds [`make_fd`] knows.
pub const FD_KINDS: u8 = 7;

/// An fd for slot kind `kind` (taken modulo [`FD_KINDS`]): 0 eventfd, 1 a duplicate of
/// `guest` (the guest memory), 2 a 4 KiB memfd, 3 a pipe's read end, 4 a pipe's write
/// end, 5 /dev/null, 6 one end of a socket pair (its peer is dropped).
pub fn make_fd(kind: u8, guest: BorrowedFd<'_>) -> OwnedFd {
    match kind % FD_KINDS {
        0 => eventfd(),
        1 => guest.try_clone_to_owned().expect("dup"),
        2 => memfd(4096),
        k @ (3 | 4) => {
            let mut p = [0; 2];
            // SAFETY: pipe2 writes two fds into `p`; checked.
            check(
                unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) },
                "pipe2",
            );
            // SAFETY: both fds are new and ours.
            let (r, w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
            if k == 3 {
                r
            } else {
                w
            }
        }
        5 => std::fs::File::open("/dev/null").expect("/dev/null").into(),
        _ => UnixStream::pair().expect("socketpair").0.into(),
    }
}

/// Sends `bytes` on `sock` with `fds` attached to the first byte, as one `sendmsg`
/// (the rest with `write` if the socket took less). Returns false if the peer is gone
/// or the socket is full.
pub fn send_raw(sock: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> bool {
    let raw: Vec<libc::c_int> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let space = if raw.is_empty() {
        0
    } else {
        // SAFETY: CMSG_SPACE is a pure computation.
        unsafe { libc::CMSG_SPACE(std::mem::size_of_val(raw.as_slice()) as u32) as usize }
    };
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: an all-zero msghdr is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if space > 0 {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer has room for one header with `raw` (CMSG_SPACE).
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(raw.as_slice()) as u32) as _;
            std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(c).cast(), raw.len());
        }
    }
    if bytes.is_empty() {
        return true;
    }
    // SAFETY: msg points at live buffers for the call.
    let n = unsafe {
        libc::sendmsg(
            sock.as_raw_fd(),
            &msg,
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return false;
    }
    let mut done = n as usize;
    while done < bytes.len() {
        // SAFETY: a plain send of our own buffer.
        let m = unsafe {
            libc::send(
                sock.as_raw_fd(),
                bytes[done..].as_ptr().cast(),
                bytes.len() - done,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if m <= 0 {
            return false;
        }
        done += m as usize;
    }
    true
}

/// Reads what a non-blocking socket has (fds that came along are closed).
pub fn drain(sock: &UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let mut s = sock;
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// A memfd mapped shared: guest memory as a front-end hands it over.
pub struct GuestFile {
    /// The memfd.
    pub fd: OwnedFd,
    ptr: *mut u8,
    len: usize,
}

impl GuestFile {
    /// `len` bytes of zeroed guest memory.
    pub fn new(len: usize) -> Self {
        let fd = memfd(len as u64);
        // SAFETY: a fresh shared mapping of the whole memfd; checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        GuestFile {
            fd,
            ptr: ptr.cast(),
            len,
        }
    }
    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the memory is empty (never).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Copies `data` to `off`, clipped to the memory.
    pub fn write(&self, off: usize, data: &[u8]) {
        if off >= self.len {
            return;
        }
        let n = data.len().min(self.len - off);
        // SAFETY: in bounds of our mapping (clipped above).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off), n) };
    }
    /// Reads a little-endian value at `off` (which must be in bounds).
    pub fn read<T: Copy>(&self, off: usize) -> T {
        assert!(off + std::mem::size_of::<T>() <= self.len);
        // SAFETY: in bounds (checked); unaligned.
        unsafe { std::ptr::read_unaligned(self.ptr.add(off).cast::<T>()) }
    }
}

impl Drop for GuestFile {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly our mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
