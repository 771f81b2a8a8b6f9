//! `outboard-v4l2-shim`: an `LD_PRELOAD` library that stands in for the Linux
//! virtio-media guest driver, so that an unmodified V4L2 client (`v4l2-compliance`)
//! runs against Outboard's software camera, or Outboard's V4L2 proxy over a real V4L2
//! node, without a guest kernel.
//!
//! No Debian guest kernel has `CONFIG_VIRTIO_MEDIA`, so the driver is emulated in the
//! client process: `open()` of the device node (`OUTBOARD_V4L2_SHIM_DEVICE`, a path)
//! opens a virtio-media session, every ioctl on the returned fd becomes a virtio-media
//! `IOCTL` command (the argument, planes and USERPTR SG lists laid out as the driver
//! lays them out) that runs through Outboard's `MediaRunner` and its device in this
//! process, `mmap()` becomes an `MMAP` command whose buffer is mapped at the address the
//! command answers, `munmap()` an `MUNMAP` command, `DQBUF`/`DQEVENT` are served from
//! the device's events and `poll()`/`select()`/`epoll_wait()` report the driver's poll
//! mask. What the driver and the V4L2 core answer themselves (`QUERYCAP` from the
//! config space, priorities, the crop API over the selection API, no-op ioctls) is
//! answered here.
//!
//! The device is the single-planar `SoftwareCamera`, the multi-planar one with
//! `OUTBOARD_V4L2_SHIM_MPLANE=1`, or, with `OUTBOARD_V4L2_SHIM_PROXY=/dev/videoN` (cargo
//! feature `v4l2-proxy`), the `V4l2Proxy` over that node: each session opens the node,
//! MMAP buffers are the node's buffers exported as dma-bufs and mapped into this
//! process, USERPTR buffers are this process's memory, as for the camera. The config
//! space then holds the node's card name and device caps, as `outboard media
//! --v4l2-device` fills it. `OUTBOARD_V4L2_SHIM_DRIVER=<name>` makes QUERYCAP report
//! that driver name instead of "virtio-media" (to test a proxied node under the
//! driver-specific rules `v4l2-compliance` applies to the node itself).
//!
//! The client's fd is a duplicate of an eventfd that is readable while a capture buffer
//! waits to be dequeued: `fcntl(O_NONBLOCK)` and `epoll_ctl` work on it natively.
//!
//! The exported functions take the C library's argument lists: on x86_64 and aarch64 a
//! variadic caller passes `open`'s mode, `ioctl`'s argument and `fcntl`'s argument in
//! the same registers as a fixed argument list, so they are declared with a fixed third
//! argument (stable Rust cannot define variadic functions).

mod driver;
mod memory;
mod real;

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_ulong, c_void, CStr};
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use outboard_devices::media::camera::{SoftwareCamera, CARD_NAME};
use outboard_devices::media::{Errno, EventBuffer};
use outboard_protocol::v4l2::V4l2Ioctl;

use driver::{Dequeue, Driver};
use memory::{ProcessMemory, ProcessShm};
use real::set_errno;

/// Client fds below this are tracked lock-free.
const MAX_FDS: usize = 4096;
/// Longest sleep between two looks at the device while a call waits.
const WAIT_STEP: Duration = Duration::from_millis(10);

/// Whether each fd number is a client fd of the device (checked before any lock).
static OURS: [AtomicBool; MAX_FDS] = [const { AtomicBool::new(false) }; MAX_FDS];
static DRIVER: Mutex<Option<Driver>> = Mutex::new(None);

thread_local! {
    /// Set while the shim itself runs on this thread: its own calls pass through.
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

fn device_path() -> Option<&'static CStr> {
    static PATH: OnceLock<Option<std::ffi::CString>> = OnceLock::new();
    PATH.get_or_init(|| {
        std::env::var_os("OUTBOARD_V4L2_SHIM_DEVICE").and_then(|p| {
            std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(p.as_os_str())).ok()
        })
    })
    .as_deref()
}

fn ours(fd: c_int) -> bool {
    !INSIDE.with(Cell::get)
        && usize::try_from(fd).is_ok_and(|i| i < MAX_FDS && OURS[i].load(Ordering::Acquire))
}

fn mark(fd: RawFd, on: bool) {
    if let Some(slot) = usize::try_from(fd).ok().and_then(|i| OURS.get(i)) {
        slot.store(on, Ordering::Release);
    }
}

/// The driver, locked, with the re-entrancy guard set while the guard lives.
struct Locked(MutexGuard<'static, Option<Driver>>);

impl Locked {
    fn driver(&mut self) -> Result<&mut Driver, Errno> {
        self.0.as_mut().ok_or(libc::EBADF)
    }
}

impl Drop for Locked {
    fn drop(&mut self) {
        INSIDE.with(|c| c.set(false));
    }
}

fn lock() -> Locked {
    let g = DRIVER.lock().unwrap_or_else(PoisonError::into_inner);
    INSIDE.with(|c| c.set(true));
    Locked(g)
}

fn new_driver() -> Result<Driver, Errno> {
    let proxy = std::env::var_os("OUTBOARD_V4L2_SHIM_PROXY");
    let mplane = std::env::var("OUTBOARD_V4L2_SHIM_MPLANE").is_ok_and(|v| v == "1");
    let mut driver = driver_for(proxy.as_deref(), mplane)?;
    if let Ok(name) = std::env::var("OUTBOARD_V4L2_SHIM_DRIVER") {
        driver.set_driver_name(&name);
    }
    Ok(driver)
}

fn io_errno(e: &std::io::Error) -> Errno {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// The driver with the V4L2 proxy over `node` if given, else the camera.
fn driver_for(node: Option<&std::ffi::OsStr>, mplane: bool) -> Result<Driver, Errno> {
    let events = EventBuffer::new();
    if let Some(node) = node {
        return proxy_driver(std::path::Path::new(node), events);
    }
    let camera = if mplane {
        SoftwareCamera::new_mplane(events.clone(), ProcessShm::default(), ProcessMemory)
    } else {
        SoftwareCamera::new(events.clone(), ProcessShm::default(), ProcessMemory)
    };
    // The config space's device_caps, as `outboard media` fills it.
    let caps = camera.device_caps();
    Driver::new(camera, events, caps, CARD_NAME).map_err(|e| io_errno(&e))
}

/// The driver with the V4L2 proxy over the host node `node`.
#[cfg(feature = "v4l2-proxy")]
fn proxy_driver(node: &std::path::Path, events: EventBuffer) -> Result<Driver, Errno> {
    use outboard_devices::media::proxy::{HostNode, ProxyError, V4l2Proxy};
    let host = HostNode::probe(node).map_err(|e| {
        eprintln!("outboard-v4l2-shim: {e}");
        match &e {
            ProxyError::Open { source, .. } | ProxyError::NotV4l2 { source, .. } => {
                io_errno(source)
            }
            ProxyError::NotCaptureOrM2m { .. } => libc::ENODEV,
        }
    })?;
    // The config space as `outboard media --v4l2-device` fills it.
    let (caps, card) = (host.device_caps, host.card.clone());
    let proxy = V4l2Proxy::new(host, events.clone(), ProcessShm::default(), ProcessMemory);
    Driver::new(proxy, events, caps, &card).map_err(|e| io_errno(&e))
}

/// Without the V4L2 proxy built in, proxy mode cannot be served: every open fails
/// (serving the camera instead would pass off the camera's results as the proxy's).
#[cfg(not(feature = "v4l2-proxy"))]
fn proxy_driver(node: &std::path::Path, _events: EventBuffer) -> Result<Driver, Errno> {
    eprintln!(
        "outboard-v4l2-shim: OUTBOARD_V4L2_SHIM_PROXY={} needs the shim built with feature v4l2-proxy",
        node.display()
    );
    Err(libc::ENXIO)
}

fn fail<T>(e: Errno, v: T) -> T {
    set_errno(e);
    v
}

/// Opens the device if `path` is its node; `None` passes the call through.
fn open_device(path: *const c_char, flags: c_int) -> Option<c_int> {
    if path.is_null() || INSIDE.with(Cell::get) {
        return None;
    }
    let dev = device_path()?;
    // SAFETY: `path` is the NUL-terminated path the caller passed to open().
    let p = unsafe { CStr::from_ptr(path) };
    if p != dev {
        return None;
    }
    let mut l = lock();
    if l.0.is_none() {
        match new_driver() {
            Ok(d) => *l.0 = Some(d),
            Err(e) => return Some(fail(e, -1)),
        }
    }
    let r = l.driver().and_then(|d| {
        let fd = d.open(flags)?;
        if usize::try_from(fd).map_or(true, |i| i >= MAX_FDS) {
            d.close(fd);
            // SAFETY: `fd` was just created by the driver and is not shared.
            unsafe { real::close()(fd) };
            return Err(libc::EMFILE);
        }
        Ok(fd)
    });
    Some(match r {
        Ok(fd) => {
            mark(fd, true);
            fd
        }
        Err(e) => fail(e, -1),
    })
}

/// `open(2)`.
///
/// # Safety
///
/// As the C function: `path` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn open(path: *const c_char, flags: c_int, mode: libc::mode_t) -> c_int {
    match open_device(path, flags) {
        Some(r) => r,
        // SAFETY: the caller's arguments, passed through unchanged.
        None => unsafe { real::open()(path, flags, mode) },
    }
}

/// `open64(2)`.
///
/// # Safety
///
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn open64(path: *const c_char, flags: c_int, mode: libc::mode_t) -> c_int {
    match open_device(path, flags) {
        Some(r) => r,
        // SAFETY: the caller's arguments, passed through unchanged.
        None => unsafe { real::open64()(path, flags, mode) },
    }
}

/// `__open_2` (fortified `open` without a mode).
///
/// # Safety
///
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn __open_2(path: *const c_char, flags: c_int) -> c_int {
    match open_device(path, flags) {
        Some(r) => r,
        // SAFETY: the caller's arguments, passed through unchanged.
        None => unsafe { real::__open_2()(path, flags) },
    }
}

/// `__open64_2`.
///
/// # Safety
///
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn __open64_2(path: *const c_char, flags: c_int) -> c_int {
    match open_device(path, flags) {
        Some(r) => r,
        // SAFETY: the caller's arguments, passed through unchanged.
        None => unsafe { real::__open64_2()(path, flags) },
    }
}

/// `openat(2)` (the device node is matched by its path as given).
///
/// # Safety
///
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn openat(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mode: libc::mode_t,
) -> c_int {
    match open_device(path, flags) {
        Some(r) => r,
        // SAFETY: the caller's arguments, passed through unchanged.
        None => unsafe { real::openat()(dirfd, path, flags, mode) },
    }
}

/// `openat64(2)`.
///
/// # Safety
///
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn openat64(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mode: libc::mode_t,
) -> c_int {
    match open_device(path, flags) {
        Some(r) => r,
        // SAFETY: the caller's arguments, passed through unchanged.
        None => unsafe { real::openat64()(dirfd, path, flags, mode) },
    }
}

/// What `/sys/dev/char/<major>:<minor>/uevent` says for the device node (the node has
/// no sysfs entry: `v4l2-compliance` reads it to learn that the node is a video node).
const UEVENT: &[u8] = b"MAJOR=81\nMINOR=0\nDEVNAME=video0\n";

/// The sysfs uevent path of the device node, from its device number.
fn uevent_path() -> Option<&'static CStr> {
    static PATH: OnceLock<Option<std::ffi::CString>> = OnceLock::new();
    PATH.get_or_init(|| {
        let dev = device_path()?;
        let meta = std::fs::metadata(std::ffi::OsStr::from_bytes(dev.to_bytes())).ok()?;
        let rdev = std::os::unix::fs::MetadataExt::rdev(&meta);
        let path = format!(
            "/sys/dev/char/{}:{}/uevent",
            libc::major(rdev),
            libc::minor(rdev)
        );
        std::ffi::CString::new(path).ok()
    })
    .as_deref()
}

fn fopen_uevent(path: *const c_char) -> Option<*mut libc::FILE> {
    if path.is_null() || INSIDE.with(Cell::get) {
        return None;
    }
    // SAFETY: `path` is the NUL-terminated path the caller passed to fopen().
    let p = unsafe { CStr::from_ptr(path) };
    if p != uevent_path()? {
        return None;
    }
    // libstdc++'s streams read the FILE's fd directly: serve the text from a memfd.
    // SAFETY: memfd_create reads the NUL-terminated name; the fd is owned by the FILE
    // fdopen returns (or closed here when that fails); write(2) reads UEVENT.
    unsafe {
        let fd = libc::memfd_create(c"uevent".as_ptr(), libc::MFD_CLOEXEC);
        if fd < 0 {
            return Some(std::ptr::null_mut());
        }
        let n = real::write()(fd, UEVENT.as_ptr().cast(), UEVENT.len());
        let f = if n == UEVENT.len() as isize && libc::lseek(fd, 0, libc::SEEK_SET) == 0 {
            libc::fdopen(fd, c"r".as_ptr())
        } else {
            std::ptr::null_mut()
        };
        if f.is_null() {
            real::close()(fd);
        }
        Some(f)
    }
}

/// `fopen(3)`: the device node's sysfs uevent file is served from memory.
///
/// # Safety
///
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn fopen(path: *const c_char, mode: *const c_char) -> *mut libc::FILE {
    match fopen_uevent(path) {
        Some(f) => f,
        // SAFETY: the caller's arguments, passed through unchanged.
        None => unsafe { real::fopen()(path, mode) },
    }
}

/// `fopen64(3)`.
///
/// # Safety
///
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn fopen64(path: *const c_char, mode: *const c_char) -> *mut libc::FILE {
    match fopen_uevent(path) {
        Some(f) => f,
        // SAFETY: the caller's arguments, passed through unchanged.
        None => unsafe { real::fopen64()(path, mode) },
    }
}

/// `close(2)`.
///
/// # Safety
///
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    if ours(fd) {
        let mut l = lock();
        mark(fd, false);
        if let Ok(d) = l.driver() {
            d.close(fd);
        }
    }
    // SAFETY: the caller's fd, closed as asked (client fds are real fds too).
    unsafe { real::close()(fd) }
}

/// `dup(2)`: the new fd refers to the same open file, and so the same session.
///
/// # Safety
///
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn dup(fd: c_int) -> c_int {
    // SAFETY: the caller's fd, duplicated as asked.
    let new = unsafe { real::dup()(fd) };
    if new >= 0 && ours(fd) {
        if usize::try_from(new).map_or(true, |i| i >= MAX_FDS) {
            // SAFETY: `new` was just created above and is not shared yet.
            unsafe { real::close()(new) };
            return fail(libc::EMFILE, -1);
        }
        let mut l = lock();
        if let Ok(d) = l.driver() {
            d.dup(fd, new);
            mark(new, true);
        }
    }
    new
}

/// `read(2)`: the driver has no read I/O (`EINVAL`, as the V4L2 core answers).
///
/// # Safety
///
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn read(fd: c_int, buf: *mut c_void, count: usize) -> isize {
    if ours(fd) {
        return fail(libc::EINVAL, -1);
    }
    // SAFETY: the caller's arguments, passed through unchanged.
    unsafe { real::read()(fd, buf, count) }
}

/// `write(2)`: no write I/O either.
///
/// # Safety
///
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn write(fd: c_int, buf: *const c_void, count: usize) -> isize {
    if ours(fd) {
        return fail(libc::EINVAL, -1);
    }
    // SAFETY: the caller's arguments, passed through unchanged.
    unsafe { real::write()(fd, buf, count) }
}

/// The fd's `O_NONBLOCK` now (the V4L2 rule for DQBUF/DQEVENT; the Linux virtio-media
/// driver samples the flag at open time only, which would make a later
/// `fcntl(F_SETFL, O_NONBLOCK)` block).
fn nonblocking(fd: c_int) -> bool {
    // SAFETY: F_GETFL has no memory arguments.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    fl >= 0 && fl & libc::O_NONBLOCK != 0
}

/// Sleeps until the device may have work or `deadline`; `EINTR` when a signal came.
fn wait_device(
    device_fd: RawFd,
    extra: &mut [libc::pollfd],
    deadline: Option<Instant>,
) -> Result<(), Errno> {
    let mut step = WAIT_STEP;
    if let Some(d) = deadline {
        step = step.min(d.saturating_duration_since(Instant::now()));
    }
    let mut fds = Vec::with_capacity(extra.len() + 1);
    fds.push(libc::pollfd {
        fd: device_fd,
        events: libc::POLLIN,
        revents: 0,
    });
    fds.extend_from_slice(extra);
    // SAFETY: `fds` is a valid array of `fds.len()` pollfds owned here.
    let r = unsafe {
        real::poll()(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            step.as_millis() as c_int,
        )
    };
    if r < 0 && real::errno() == libc::EINTR {
        return Err(libc::EINTR);
    }
    Ok(())
}

fn device_ioctl(fd: c_int, request: c_ulong, arg: u64) -> Result<(), Errno> {
    let code = u32::try_from(request).map_err(|_| libc::ENOTTY)?;
    let ioctl = V4l2Ioctl::from_code(code).ok().filter(|_| code > 0xff);
    let dequeue = matches!(
        ioctl,
        Some(V4l2Ioctl::VIDIOC_DQBUF | V4l2Ioctl::VIDIOC_DQEVENT)
    );
    let Some(ioctl) = ioctl.filter(|_| dequeue) else {
        return lock().driver()?.ioctl(fd, code, arg);
    };
    loop {
        let device_fd = {
            let mut l = lock();
            let d = l.driver()?;
            match d.dequeue(fd, ioctl, arg, nonblocking(fd))? {
                Dequeue::Done => return Ok(()),
                Dequeue::Wait => d.device_fd(),
            }
        };
        wait_device(device_fd, &mut [], None)?;
    }
}

/// `ioctl(2)`.
///
/// # Safety
///
/// As the C function: `arg` points to the ioctl's argument.
#[no_mangle]
pub unsafe extern "C" fn ioctl(fd: c_int, request: c_ulong, arg: *mut c_void) -> c_int {
    if !ours(fd) {
        // SAFETY: the caller's arguments, passed through unchanged.
        return unsafe { real::ioctl()(fd, request, arg) };
    }
    match device_ioctl(fd, request, arg as u64) {
        Ok(()) => 0,
        Err(e) => fail(e, -1),
    }
}

/// `mmap(2)`: an MMAP command; the buffer is mapped where the command answers.
///
/// # Safety
///
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: libc::off_t,
) -> *mut c_void {
    if !ours(fd) {
        // SAFETY: the caller's arguments, passed through unchanged.
        return unsafe { real::mmap()(addr, len, prot, flags, fd, offset) };
    }
    let r = lock()
        .driver()
        .and_then(|d| d.mmap(fd, len, prot, flags, offset));
    match r {
        Ok(a) => a as *mut c_void,
        Err(e) => fail(e, libc::MAP_FAILED),
    }
}

/// `mmap64(2)`.
///
/// # Safety
///
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: libc::off_t,
) -> *mut c_void {
    // SAFETY: the caller's arguments, handled as by mmap.
    unsafe { mmap(addr, len, prot, flags, fd, offset) }
}

/// `munmap(2)`: an MUNMAP command for a client mapping of a device buffer.
///
/// # Safety
///
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: usize) -> c_int {
    if !INSIDE.with(Cell::get) {
        let mut l = lock();
        if let Ok(d) = l.driver() {
            if d.owns_mapping(addr as u64) {
                d.munmap(addr as u64);
                return 0;
            }
        }
    }
    // SAFETY: the caller's arguments, passed through unchanged.
    unsafe { real::munmap()(addr, len) }
}

/// Emulated poll over `fds`, some of them client fds; `req` gives the events the
/// kernel would ask each driver for. Returns the count of fds with events.
fn poll_fds(
    fds: &mut [libc::pollfd],
    req: &[i16],
    timeout: Option<Duration>,
) -> Result<c_int, Errno> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let mut others: Vec<libc::pollfd> = fds
            .iter()
            .filter(|p| !ours(p.fd))
            .map(|p| libc::pollfd { revents: 0, ..*p })
            .collect();
        if !others.is_empty() {
            // SAFETY: `others` is a valid pollfd array owned here.
            let r = unsafe { real::poll()(others.as_mut_ptr(), others.len() as libc::nfds_t, 0) };
            if r < 0 {
                return Err(real::errno());
            }
        }
        let device_fd = {
            let mut l = lock();
            let d = l.driver()?;
            d.pump();
            let mut it = others.iter();
            for (p, r) in fds.iter_mut().zip(req) {
                p.revents = if ours_unlocked(d, p.fd) {
                    d.poll_mask(p.fd, *r) & *r
                } else {
                    it.next().map_or(0, |o| o.revents)
                };
            }
            d.device_fd()
        };
        let n = fds.iter().filter(|p| p.revents != 0).count();
        if n > 0 {
            return Ok(n as c_int);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(0);
        }
        wait_device(device_fd, &mut others, deadline)?;
    }
}

/// `ours()` while the lock is held (the re-entrancy guard is set then).
fn ours_unlocked(d: &Driver, fd: c_int) -> bool {
    d.owns(fd)
}

/// `poll(2)`.
///
/// # Safety
///
/// As the C function: `fds` points to `nfds` pollfds.
#[no_mangle]
pub unsafe extern "C" fn poll(fds: *mut libc::pollfd, nfds: libc::nfds_t, timeout: c_int) -> c_int {
    if fds.is_null() || nfds == 0 {
        // SAFETY: the caller's arguments, passed through unchanged.
        return unsafe { real::poll()(fds, nfds, timeout) };
    }
    // SAFETY: the caller passes `nfds` pollfds at `fds`, not used elsewhere meanwhile.
    let slice = unsafe { std::slice::from_raw_parts_mut(fds, nfds as usize) };
    if !slice.iter().any(|p| ours(p.fd)) {
        // SAFETY: the caller's arguments, passed through unchanged.
        return unsafe { real::poll()(fds, nfds, timeout) };
    }
    let req: Vec<i16> = slice
        .iter()
        .map(|p| p.events | libc::POLLERR | libc::POLLHUP)
        .collect();
    let timeout = u64::try_from(timeout).ok().map(Duration::from_millis);
    match poll_fds(slice, &req, timeout) {
        Ok(n) => n,
        Err(e) => fail(e, -1),
    }
}

const POLLIN_SET: i16 =
    libc::POLLIN | libc::POLLRDNORM | libc::POLLRDBAND | libc::POLLHUP | libc::POLLERR;
const POLLOUT_SET: i16 = libc::POLLOUT | libc::POLLWRNORM | libc::POLLWRBAND | libc::POLLERR;
const POLLEX_SET: i16 = libc::POLLPRI;

/// `select(2)`, over the emulated poll when a client fd is in a set.
///
/// # Safety
///
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn select(
    nfds: c_int,
    rfds: *mut libc::fd_set,
    wfds: *mut libc::fd_set,
    efds: *mut libc::fd_set,
    tv: *mut libc::timeval,
) -> c_int {
    // SAFETY: FD_ISSET reads a set the caller passed (or none).
    let isset =
        |set: *mut libc::fd_set, fd: c_int| !set.is_null() && unsafe { libc::FD_ISSET(fd, set) };
    let n = nfds.clamp(0, libc::FD_SETSIZE as c_int);
    let mut fds = Vec::new();
    let mut req = Vec::new();
    let mut any_ours = false;
    for fd in 0..n {
        let (r, w, e) = (isset(rfds, fd), isset(wfds, fd), isset(efds, fd));
        if !(r || w || e) {
            continue;
        }
        any_ours |= ours(fd);
        let mut ev = POLLEX_SET;
        if r {
            ev |= POLLIN_SET;
        }
        if w {
            ev |= POLLOUT_SET;
        }
        fds.push(libc::pollfd {
            fd,
            events: ev,
            revents: 0,
        });
        req.push(ev);
    }
    if !any_ours {
        // SAFETY: the caller's arguments, passed through unchanged.
        return unsafe { real::select()(nfds, rfds, wfds, efds, tv) };
    }
    let timeout = if tv.is_null() {
        None
    } else {
        // SAFETY: a non-null `tv` points to the caller's timeval.
        let t = unsafe { *tv };
        Some(
            Duration::from_secs(t.tv_sec.max(0) as u64)
                + Duration::from_micros(t.tv_usec.max(0) as u64),
        )
    };
    let start = Instant::now();
    let r = poll_fds(&mut fds, &req, timeout);
    if let (Some(t), false) = (timeout, tv.is_null()) {
        let left = t.saturating_sub(start.elapsed());
        // SAFETY: as above; Linux reports the time left.
        unsafe {
            (*tv).tv_sec = left.as_secs() as libc::time_t;
            (*tv).tv_usec = left.subsec_micros().into();
        }
    }
    if let Err(e) = r {
        return fail(e, -1);
    }
    let mut count = 0;
    // SAFETY: FD_ZERO/FD_SET write the caller's sets, each checked non-null.
    unsafe {
        let (r0, w0, e0): (Vec<bool>, Vec<bool>, Vec<bool>) = (
            fds.iter().map(|p| isset(rfds, p.fd)).collect(),
            fds.iter().map(|p| isset(wfds, p.fd)).collect(),
            fds.iter().map(|p| isset(efds, p.fd)).collect(),
        );
        for set in [rfds, wfds, efds] {
            if !set.is_null() {
                libc::FD_ZERO(set);
            }
        }
        for (i, p) in fds.iter().enumerate() {
            if r0[i] && p.revents & POLLIN_SET != 0 {
                libc::FD_SET(p.fd, rfds);
                count += 1;
            }
            if w0[i] && p.revents & POLLOUT_SET != 0 {
                libc::FD_SET(p.fd, wfds);
                count += 1;
            }
            if e0[i] && p.revents & POLLEX_SET != 0 {
                libc::FD_SET(p.fd, efds);
                count += 1;
            }
        }
    }
    count
}

/// `epoll_wait(2)`: the device is pumped while the caller waits, so a client fd (an
/// eventfd readable while a capture buffer is done) becomes ready as frames arrive.
///
/// # Safety
///
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn epoll_wait(
    epfd: c_int,
    events: *mut libc::epoll_event,
    maxevents: c_int,
    timeout: c_int,
) -> c_int {
    let device_fd = {
        let mut l = lock();
        match l.driver() {
            Ok(d) => d.device_fd(),
            Err(_) => {
                drop(l);
                // SAFETY: the caller's arguments, passed through unchanged.
                return unsafe { real::epoll_wait()(epfd, events, maxevents, timeout) };
            }
        }
    };
    let deadline = u64::try_from(timeout)
        .ok()
        .map(|t| Instant::now() + Duration::from_millis(t));
    loop {
        if let Ok(d) = lock().driver() {
            d.pump();
        }
        // SAFETY: the caller's arguments, with a zero timeout.
        let n = unsafe { real::epoll_wait()(epfd, events, maxevents, 0) };
        if n != 0 || deadline.is_some_and(|d| Instant::now() >= d) {
            return n;
        }
        let mut ep = [libc::pollfd {
            fd: epfd,
            events: libc::POLLIN,
            revents: 0,
        }];
        if let Err(e) = wait_device(device_fd, &mut ep, deadline) {
            return fail(e, -1);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::*;

    #[test]
    fn proxy_mode_never_falls_back_to_the_camera() {
        assert!(driver_for(None, false).is_ok());
        assert!(driver_for(None, true).is_ok());
        let missing = driver_for(Some(OsStr::new("/nonexistent/video9")), false).err();
        let not_v4l2 = driver_for(Some(OsStr::new("/dev/null")), false).err();
        if cfg!(feature = "v4l2-proxy") {
            // The node is opened and asked for its capabilities: the errors are the host's.
            assert_eq!(missing, Some(libc::ENOENT));
            assert_eq!(not_v4l2, Some(libc::ENOTTY));
        } else {
            assert_eq!(missing, Some(libc::ENXIO));
            assert_eq!(not_v4l2, Some(libc::ENXIO));
        }
    }
}
