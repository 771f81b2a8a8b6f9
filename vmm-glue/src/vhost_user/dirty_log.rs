//! The dirty page log of live migration (`VHOST_USER_PROTOCOL_F_LOG_SHMFD`).
//!
//! While a VM migrates, its front-end copies guest memory to the destination and copies
//! again what changed meanwhile; it learns what the back-end changed from a bitmap in
//! shared memory that the back-end sets bits in. The protocol, as the vhost-user spec's
//! "Migration" section has it:
//!
//! - `SET_LOG_BASE` hands over the log: an fd, and the size and offset of the bitmap in
//!   it. It is answered (a zero `u64`) once the log is mapped. A front-end that needs a
//!   larger log (more guest memory) sends another one, which replaces the first.
//! - The bitmap has one bit per 4 KiB page ([`LOG_PAGE_SIZE`]) of guest-*physical*
//!   address space, from address 0: page `p` is bit `p % 8` of byte `p / 8`. Bits are set
//!   with atomic operations (the front-end clears them concurrently as it copies pages).
//! - Writes are logged while the acked virtio features contain `VHOST_F_LOG_ALL`:
//!   every write into memory a descriptor points to, and, for a ring set up with
//!   `VHOST_VRING_F_LOG`, every write into its used ring, logged at the ring's
//!   `log_guest_addr`.
//!
//! [`LogArea`] is one mapped bitmap; [`DirtyPageLog`] is what a device's queues mark
//! through ([`crate::rust_vmm::DirtyLog`]): the current area and whether logging is on.
//! Which bytes were written is the queue's business (see [`crate::rust_vmm`]).
//!
//! # A hostile front-end
//!
//! The size, offset and fd come from the front-end. The size is capped
//! ([`MAX_LOG_SIZE`]), a file shorter than offset plus size is refused, a page beyond
//! the log is not marked (and counted, with a rate-limited warning), and a failed
//! `mmap` is the request's error reply. A log file cut short after it was mapped (a
//! front-end can truncate an unsealed file; QEMU's log is a sealed memfd) would make
//! the next mark fault with SIGBUS: the mapping is registered with [`super::guard`]
//! like guest memory, so the fault lands on a zero page and the worker drops that
//! front-end ([`DirtyPageLog::poisoned`]), the daemon and its other VMs live on.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard};

use outboard_protocol::vhost_user::{VhostUserLog, LOG_PAGE_SIZE};
use thiserror::Error;

use super::guard::{self, GuardedRange};
use crate::rust_vmm::DirtyLog;

/// Largest log accepted, in bytes: 1 GiB of bitmap covers 32 TiB of guest-physical
/// address space.
pub const MAX_LOG_SIZE: u64 = 1 << 30;

/// Errors of mapping a log ([`LogArea::map`]).
#[cfg_attr(test, remain::sorted)]
#[derive(Debug, Error)]
pub enum DirtyLogError {
    /// The file behind the fd is shorter than the log.
    #[error("the log needs {need} bytes of its file, which has {have}")]
    FileTooShort {
        /// `mmap_offset + mmap_size`.
        need: u64,
        /// The file's size.
        have: u64,
    },
    /// The fd could not be examined.
    #[error("cannot stat the log fd: {0}")]
    Fstat(std::io::Error),
    /// `mmap` failed.
    #[error("cannot map the log ({size:#x} bytes at offset {offset:#x}): {source}")]
    Mmap {
        /// The log's size.
        size: u64,
        /// Its offset in the fd.
        offset: u64,
        /// The OS error.
        source: std::io::Error,
    },
    /// The size is above [`MAX_LOG_SIZE`] or the mapping would not fit the address
    /// space.
    #[error("a log of {size:#x} bytes at offset {offset:#x} is refused (at most {MAX_LOG_SIZE:#x} bytes)")]
    Range {
        /// The log's size.
        size: u64,
        /// Its offset in the fd.
        offset: u64,
    },
    /// The log file can shrink and the process's SIGBUS guard table is full: mapping it
    /// unguarded would let the front-end kill the daemon by truncating it.
    #[error(
        "the log file is not sealed against shrinking and every one of the process's {} \
         guarded mapping slots is in use",
        guard::MAX_GUARDED
    )]
    Unguarded,
}

/// One mapped log bitmap (see the [module docs](self)).
#[derive(Debug)]
pub struct LogArea {
    /// Declared first: unregistered before the mapping goes away (see `Drop`).
    guard: Option<GuardedRange>,
    /// The mapping: `map_len` bytes from the page-aligned offset below the log's.
    map: *mut libc::c_void,
    map_len: usize,
    /// The bitmap's first byte, inside the mapping.
    bits: *mut u8,
    /// Bytes of bitmap.
    size: u64,
    /// The log as the front-end described it and its fd, kept to hand the log to
    /// another process (a live upgrade).
    desc: VhostUserLog,
    file: File,
}

// SAFETY: the pointers name a shared mapping this value owns; it is only accessed
// through atomic byte operations (`mark`), which any thread may do, and unmapped once,
// in Drop, when no other reference to the value exists.
unsafe impl Send for LogArea {}
// SAFETY: as above: `&LogArea` only allows the atomic marks.
unsafe impl Sync for LogArea {}

impl LogArea {
    /// Maps the log `log` describes in `fd`, shared and writable.
    pub fn map(log: &VhostUserLog, fd: OwnedFd) -> Result<LogArea, DirtyLogError> {
        let (size, offset) = (log.mmap_size, log.mmap_offset);
        let range = || DirtyLogError::Range { size, offset };
        if size == 0 || size > MAX_LOG_SIZE {
            return Err(range());
        }
        // SAFETY: sysconf reads a constant of the system; no memory of ours.
        let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .ok()
            .filter(|p| p.is_power_of_two())
            .unwrap_or(4096);
        let start = offset - offset % page;
        let skip = offset - start;
        let need = offset.checked_add(size).ok_or_else(range)?;
        let map_len = usize::try_from(skip + size).map_err(|_| range())?;
        let map_offset = libc::off_t::try_from(start).map_err(|_| range())?;
        let skip = usize::try_from(skip).map_err(|_| range())?;
        let file = File::from(fd);
        let meta = file.metadata().map_err(DirtyLogError::Fstat)?;
        if meta.file_type().is_file() && meta.len() < need {
            return Err(DirtyLogError::FileTooShort {
                need,
                have: meta.len(),
            });
        }
        // SAFETY: a new shared mapping chosen by the kernel (no address hint), of a
        // length and page-aligned offset checked above; it overlaps nothing of ours. The
        // result is checked before use.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                map_offset,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(DirtyLogError::Mmap {
                size,
                offset,
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: `skip < page <= map_len`: inside the mapping just made.
        let bits = unsafe { map.cast::<u8>().add(skip) };
        // hugetlbfs reports its huge page size as the block size.
        let file_page = usize::try_from(meta.blksize()).unwrap_or(4096);
        let guard = GuardedRange::register(map.cast::<u8>(), map_len, file_page);
        let refuse = guard.is_none() && !guard::shrink_sealed(&file);
        let area = LogArea {
            guard,
            map,
            map_len,
            bits,
            size,
            desc: *log,
            file,
        };
        if refuse {
            // Dropping the area unmaps it.
            return Err(DirtyLogError::Unguarded);
        }
        Ok(area)
    }

    /// Bytes of bitmap.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Sets the bits of the pages of `[gpa, gpa + len)`; returns how many of those
    /// pages lie beyond the log (not marked).
    pub fn mark(&self, gpa: u64, len: u64) -> u64 {
        if len == 0 {
            return 0;
        }
        let first = gpa / LOG_PAGE_SIZE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE_SIZE;
        let pages = last - first + 1;
        // Pages whose byte is inside the bitmap: [first, end).
        let end = self.size.saturating_mul(8).min(last.saturating_add(1));
        let mut page = first;
        while page < end {
            let byte = page / 8;
            // Whole bytes where the range allows, else the bits of this byte in range.
            let lo = page % 8;
            let hi = (end - byte * 8).min(8);
            let bits = (0xffu16 << lo) as u8 & (0xffu16 >> (8 - hi)) as u8;
            // `byte < size`, which fits in usize (`map` checked it).
            let at = byte as usize;
            // SAFETY: `at < size`, so `bits + at` lies inside the mapping, which lives as
            // long as `self`. Any byte is suitably aligned for AtomicU8, and every access
            // to the log, here and in the front-end, is atomic (the protocol requires
            // it). Should the front-end have cut the file short, the access faults into
            // the guard's handler, which maps a zero page there and poisons the range.
            let cell = unsafe { AtomicU8::from_ptr(self.bits.add(at)) };
            // Release: the bytes marked were written before; a front-end that sees the
            // bit (and clears it with an atomic exchange) sees them.
            cell.fetch_or(bits, Ordering::Release);
            page = (byte + 1) * 8;
        }
        pages - end.saturating_sub(first).min(pages)
    }

    /// Whether the log file was found cut short under the mapping.
    pub fn poisoned(&self) -> bool {
        self.guard.as_ref().is_some_and(GuardedRange::poisoned)
    }
}

impl Drop for LogArea {
    fn drop(&mut self) {
        // Unregister before unmapping: the handler must never map over a range that
        // may be reused.
        drop(self.guard.take());
        // SAFETY: unmaps exactly the mapping `map` made; nothing refers to it any more
        // (marks borrow `self`).
        unsafe { libc::munmap(self.map, self.map_len) };
    }
}

/// The log a device's queues mark through: the front-end's current [`LogArea`] and
/// whether `VHOST_F_LOG_ALL` is acked (see the [module docs](self)).
#[derive(Debug, Default)]
pub struct DirtyPageLog {
    /// `VHOST_F_LOG_ALL` is acked.
    enabled: AtomicBool,
    /// `enabled` and an area is mapped: what [`DirtyLog::logging`] answers.
    on: AtomicBool,
    area: Mutex<Option<LogArea>>,
    /// Pages written while logging that lay beyond the log.
    outside: AtomicU64,
}

impl DirtyPageLog {
    /// A log with no area, off.
    pub fn new() -> Self {
        Self::default()
    }

    fn area(&self) -> MutexGuard<'_, Option<LogArea>> {
        // A mark has no invariant a panic could break half-way.
        self.area.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, area: &Option<LogArea>) {
        let enabled = self.enabled.load(Ordering::Relaxed);
        self.on.store(enabled && area.is_some(), Ordering::Release);
        if enabled && area.is_none() {
            outboard_protocol::log_limited!(
                log::Level::Warn,
                "dirty log: VHOST_F_LOG_ALL acked before SET_LOG_BASE: writes cannot be \
                 logged until the front-end sends a log"
            );
        }
    }

    /// `SET_LOG_BASE`: replaces the area (the previous one is unmapped); `None` forgets
    /// it.
    pub fn set_area(&self, new: Option<LogArea>) {
        let mut area = self.area();
        *area = new;
        self.update(&area);
    }

    /// `SET_FEATURES`: whether `VHOST_F_LOG_ALL` is acked.
    pub fn set_enabled(&self, enabled: bool) {
        let area = self.area();
        self.enabled.store(enabled, Ordering::Relaxed);
        self.update(&area);
    }

    /// Forgets the area and turns logging off (the front-end went away).
    pub fn clear(&self) {
        let mut area = self.area();
        self.enabled.store(false, Ordering::Relaxed);
        *area = None;
        self.update(&area);
    }

    /// The current log as the front-end described it, with a duplicate of its fd: what
    /// `SET_LOG_BASE` needs to map it in another process (a live upgrade).
    pub fn handover(&self) -> Option<std::io::Result<(VhostUserLog, OwnedFd)>> {
        self.area()
            .as_ref()
            .map(|a| a.file.try_clone().map(|f| (a.desc, OwnedFd::from(f))))
    }

    /// Pages written while logging that lay beyond the log (not marked): a front-end
    /// whose log does not cover its guest memory.
    pub fn pages_outside(&self) -> u64 {
        self.outside.load(Ordering::Relaxed)
    }

    /// Whether the current log was found cut short under the mapping (the worker then
    /// drops the front-end).
    pub fn poisoned(&self) -> bool {
        self.area().as_ref().is_some_and(LogArea::poisoned)
    }
}

impl DirtyLog for DirtyPageLog {
    #[inline]
    fn logging(&self) -> bool {
        self.on.load(Ordering::Acquire)
    }

    fn mark(&self, gpa: u64, len: u64) {
        let area = self.area();
        let Some(a) = area.as_ref().filter(|_| self.logging()) else {
            return;
        };
        let outside = a.mark(gpa, len);
        if outside > 0 {
            self.outside.fetch_add(outside, Ordering::Relaxed);
            outboard_protocol::log_limited!(
                log::Level::Warn,
                "dirty log: {outside} pages written at guest address {gpa:#x} (+{len:#x}) lie \
                 beyond the {:#x}-byte log: not marked",
                a.size()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::os::fd::FromRawFd;

    fn memfd(len: u64) -> File {
        // SAFETY: memfd_create with a valid C string; returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(c"log-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a new fd nobody else owns.
        let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        f.set_len(len).unwrap();
        f
    }

    fn read_log(f: &File, offset: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset).unwrap();
        buf
    }

    fn log(size: u64, offset: u64) -> VhostUserLog {
        VhostUserLog {
            mmap_size: size,
            mmap_offset: offset,
        }
    }

    #[test]
    fn marks_one_bit_per_page_in_the_spec_layout() {
        let f = memfd(64);
        let area = LogArea::map(&log(64, 0), f.try_clone().unwrap().into()).unwrap();
        // Page 0, one byte.
        assert_eq!(area.mark(0, 1), 0);
        // Pages 9 and 10: a write across a page boundary.
        assert_eq!(area.mark(9 * 4096 + 4000, 200), 0);
        // Pages 16..=40: whole bytes 2..=4 and part of byte 5.
        assert_eq!(area.mark(16 * 4096, 25 * 4096), 0);
        // Nothing for an empty write.
        assert_eq!(area.mark(100 * 4096, 0), 0);
        let bits = read_log(&f, 0, 8);
        assert_eq!(bits, [0b1, 0b110, 0xff, 0xff, 0xff, 0b1, 0, 0]);
    }

    #[test]
    fn pages_beyond_the_log_are_counted_not_written() {
        let f = memfd(4096);
        // A log of 2 bytes at offset 8: pages 0..16.
        let area = LogArea::map(&log(2, 8), f.try_clone().unwrap().into()).unwrap();
        assert_eq!(area.mark(14 * 4096, 4 * 4096), 2);
        assert_eq!(area.mark(u64::MAX - 10, 100), 1);
        assert_eq!(area.mark(1 << 40, 1), 1);
        let bits = read_log(&f, 0, 16);
        assert_eq!(bits[8..10], [0, 0b1100_0000]);
        assert!(bits[..8].iter().chain(&bits[10..]).all(|b| *b == 0));
    }

    #[test]
    fn a_log_at_an_unaligned_offset_is_found_where_the_front_end_put_it() {
        let f = memfd(3 * 4096);
        let area = LogArea::map(&log(16, 4096 + 100), f.try_clone().unwrap().into()).unwrap();
        assert_eq!(area.mark(8 * 4096, 1), 0);
        assert_eq!(read_log(&f, 4096 + 101, 1), [1]);
    }

    #[test]
    fn hostile_sizes_and_files_are_refused() {
        let short = memfd(100);
        let e = LogArea::map(&log(200, 0), short.into()).unwrap_err();
        assert!(matches!(
            e,
            DirtyLogError::FileTooShort {
                need: 200,
                have: 100
            }
        ));
        let e = LogArea::map(&log(MAX_LOG_SIZE + 1, 0), memfd(1).into()).unwrap_err();
        assert!(matches!(e, DirtyLogError::Range { .. }));
        let e = LogArea::map(&log(0, 0), memfd(1).into()).unwrap_err();
        assert!(matches!(e, DirtyLogError::Range { .. }));
        let e = LogArea::map(&log(16, u64::MAX - 8), memfd(1).into()).unwrap_err();
        assert!(matches!(e, DirtyLogError::Range { .. }));
        // A socket cannot be mapped: an error reply, no panic.
        let (sock, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let e = LogArea::map(&log(16, 0), OwnedFd::from(sock)).unwrap_err();
        assert!(matches!(e, DirtyLogError::Mmap { .. }), "{e}");
    }

    #[test]
    fn logging_is_on_with_log_all_and_an_area_only() {
        let f = memfd(8);
        let log_ = DirtyPageLog::new();
        assert!(!log_.logging());
        log_.set_area(Some(
            LogArea::map(&log(8, 0), f.try_clone().unwrap().into()).unwrap(),
        ));
        assert!(!log_.logging());
        log_.mark(0, 1);
        assert_eq!(read_log(&f, 0, 1), [0], "marked while LOG_ALL was off");
        log_.set_enabled(true);
        assert!(log_.logging());
        log_.mark(4096, 1);
        log_.mark(1 << 30, 1);
        assert_eq!(read_log(&f, 0, 1), [0b10]);
        assert_eq!(log_.pages_outside(), 1);
        log_.set_enabled(false);
        log_.mark(0, 1);
        assert_eq!(read_log(&f, 0, 1), [0b10]);
        log_.set_enabled(true);
        log_.clear();
        assert!(!log_.logging());
    }

    #[test]
    fn a_log_file_cut_short_poisons_the_log_instead_of_killing_the_process() {
        let f = memfd(2 * 4096);
        let log_ = DirtyPageLog::new();
        log_.set_area(Some(
            LogArea::map(&log(2 * 4096, 0), f.try_clone().unwrap().into()).unwrap(),
        ));
        log_.set_enabled(true);
        assert!(!log_.poisoned());
        f.set_len(4096).unwrap();
        // The second page of the log is gone: its byte 4096 covers pages 32768...
        log_.mark(32768 * 4096, 1);
        assert!(log_.poisoned());
        // The first page is still the file's.
        log_.mark(0, 1);
        assert_eq!(read_log(&f, 0, 1), [1]);
    }
}
