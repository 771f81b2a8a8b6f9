//! Test harness shared by the glue's integration tests: guest memory in a memfd (what a
//! front-end hands the daemon in its memory table) and eventfd helpers.

#![allow(dead_code)] // each test binary uses its own subset

pub mod vsock_guest;

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use vmm_sys_util::eventfd::EventFd;

/// Guest memory: a memfd of `len` bytes, mapped shared into the test process.
pub struct GuestMem {
    /// The memfd, sent to the daemon in the memory table.
    pub fd: OwnedFd,
    ptr: *mut u8,
    len: usize,
}

impl GuestMem {
    /// A zeroed guest memory of `len` bytes.
    pub fn new(len: usize) -> Self {
        // SAFETY: memfd_create with a valid C string.
        let raw = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: a new fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        File::from(fd.try_clone().unwrap())
            .set_len(len as u64)
            .unwrap();
        // SAFETY: maps the whole memfd we just sized; checked below.
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
        GuestMem {
            fd,
            ptr: ptr.cast(),
            len,
        }
    }

    /// Copies `data` to guest address `gpa`.
    pub fn write_bytes(&self, gpa: usize, data: &[u8]) {
        assert!(gpa + data.len() <= self.len);
        // SAFETY: in bounds of our mapping (checked above); the daemon does not touch
        // buffers that are not available to it.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(gpa), data.len()) };
    }

    /// Copies `len` bytes from guest address `gpa`.
    pub fn read_bytes(&self, gpa: usize, len: usize) -> Vec<u8> {
        assert!(gpa + len <= self.len);
        let mut out = vec![0u8; len];
        // SAFETY: in bounds of our mapping (checked above).
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(gpa), out.as_mut_ptr(), len) };
        out
    }

    /// Writes a value at guest address `gpa` (unaligned).
    pub fn write<T: Copy>(&self, gpa: usize, v: T) {
        assert!(gpa + std::mem::size_of::<T>() <= self.len);
        // SAFETY: in bounds of our mapping (checked above); unaligned write.
        unsafe { std::ptr::write_unaligned(self.ptr.add(gpa).cast::<T>(), v) };
    }

    /// Reads a value at guest address `gpa`, volatile: the daemon writes concurrently.
    pub fn read<T: Copy>(&self, gpa: usize) -> T {
        assert!(gpa + std::mem::size_of::<T>() <= self.len);
        // SAFETY: in bounds of our mapping (checked above); volatile because the
        // daemon writes it concurrently.
        unsafe { std::ptr::read_volatile(self.ptr.add(gpa).cast::<T>()) }
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Borrows an eventfd's fd (for the transport's `Frontend` calls).
pub fn bfd(e: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the fd stays open while `e` is borrowed.
    unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) }
}

/// Why jails cannot be made on this machine, if the kernel says so up front (tests of
/// `outboard ... --jail` skip with this message).
pub fn jails_unavailable() -> Option<String> {
    let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_owned()).ok();
    // SAFETY: getuid cannot fail.
    let root = unsafe { libc::getuid() } == 0;
    if read("/proc/sys/user/max_user_namespaces").as_deref() == Some("0") {
        return Some("user namespaces are disabled (user.max_user_namespaces = 0)".into());
    }
    if !root && read("/proc/sys/kernel/unprivileged_userns_clone").as_deref() == Some("0") {
        return Some("unprivileged user namespaces are disabled".into());
    }
    if !root
        && read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").as_deref() == Some("1")
    {
        return Some("AppArmor restricts unprivileged user namespaces".into());
    }
    None
}

/// The pids of the children of `pid` (all its threads).
pub fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let p = task.unwrap().path().join("children");
        let s = std::fs::read_to_string(p).unwrap_or_default();
        out.extend(s.split_whitespace().filter_map(|c| c.parse::<i32>().ok()));
    }
    out
}

/// The jailed worker of an `outboard ... --jail` daemon with one worker: the daemon's
/// child is the pid-namespace relay, the worker is the relay's only child (waits 5 s
/// at most for it).
pub fn worker_pid(daemon: i32) -> i32 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if let Some(&relay) = children(daemon).first() {
            if let Some(&w) = children(relay).first() {
                return w;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no jailed worker under {daemon}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// SIGKILLs the jailed worker of the daemon `daemon` while `driver` is connected to it,
/// checks that the front-end connection ends with the worker `within` that time, and
/// returns the killed worker's pid.
pub fn kill_worker_under(
    daemon: i32,
    driver: &mut outboard_tests::media::vhost::VhostMediaDriver,
    within: std::time::Duration,
) -> i32 {
    let worker = worker_pid(daemon);
    // SAFETY: kill(2) on the worker, a descendant of the test's child.
    assert_eq!(unsafe { libc::kill(worker, libc::SIGKILL) }, 0);
    let deadline = std::time::Instant::now() + within;
    while driver.answers() {
        assert!(
            std::time::Instant::now() < deadline,
            "the front-end connection outlived its worker"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    worker
}
