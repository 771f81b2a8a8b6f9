//! Device counters shared between a jailed worker and the daemon, through one memfd.
//!
//! With `--jail` a VM's device runs in a forked, seccomp-confined child, so its counters
//! live there. The daemon creates a [`CounterPage`] per VM (a memfd sealed against
//! resizing, mapped shared) and hands its fd to every worker it forks for that VM; the
//! worker maps it ([`CounterPage::from_fd`], which checks the seals, the size and the
//! header) and wraps its device in a [`PublishingDevice`], which copies the device's
//! counters into the page after every call that handles work (queue kicks, device
//! events, activation, reset). The worker thus never wakes up for the metrics: an idle
//! worker makes no system call, and after each event batch the page holds the exact
//! values. The daemon reads the page when it writes its metrics file.
//!
//! # Layout
//!
//! `[magic, slots, value 0, value 1, ...]`, native-endian `u64` words, every one
//! accessed atomically (relaxed: each counter is independent, and a reader needs no
//! ordering between them). The values are in the order of the device's counter set
//! ([`crate::metrics::CounterSet`]); both sides are the same binary, and the worker
//! checks that the header's slot count is the one it expects.
//!
//! # Trust
//!
//! The worker may be hostile: it can write any value at any time. The memfd is sealed
//! (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`) before any worker sees it, so the
//! worker cannot truncate it (which would turn the daemon's next read into `SIGBUS`) nor
//! add seals that would stop the next worker from mapping it. The daemon takes the
//! values as numbers only (saturating arithmetic), and [`RestartCounters`] rewrites the
//! header and zeroes the values when it reaps a worker, before the next one starts.
//!
//! # Restarts
//!
//! A restarted worker builds a fresh device whose counters start at zero.
//! [`RestartCounters`] keeps, per VM, the sum of the dead workers' last values as a
//! base and reports base + live values, so the counters the daemon writes never go
//! backwards, plus `worker_restarts`.

use std::ffi::CString;
use std::fmt::Debug;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use outboard_devices::virtio::{ActivateError, Interrupt, VirtQueue, VirtioDevice};
use rustix::fs::{
    fcntl_add_seals, fcntl_get_seals, fstat, ftruncate, memfd_create, MemfdFlags, SealFlags,
};
use thiserror::Error;

use crate::metrics::CounterSet;

/// The first word of a page: "OBCOUNTR".
const MAGIC: u64 = u64::from_be_bytes(*b"OBCOUNTR");

/// Header words before the values (magic, slot count).
const HEADER_WORDS: usize = 2;

/// Most counters a page holds (a bound on the memfd's size: 32 KiB).
pub const MAX_SLOTS: usize = 4096 - HEADER_WORDS;

/// The seals a page's memfd must carry before another process may see it.
const SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// The name of the counter [`RestartCounters`] adds.
pub const WORKER_RESTARTS: &str = "worker_restarts";

/// Errors of the shared counter page.
#[cfg_attr(test, remain::sorted)]
#[derive(Debug, Error)]
pub enum SharedMetricsError {
    /// Creating, sizing or sealing the memfd failed.
    #[error("shared counter page: {step} failed: {source}")]
    Create {
        /// The system call.
        step: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The page's header is not the one of a page with the expected slot count.
    #[error("shared counter page header: magic {magic:#x}, {slots} slots; expected {MAGIC:#x}, {expected} slots")]
    Header {
        /// The magic word found.
        magic: u64,
        /// The slot count found.
        slots: u64,
        /// The slot count expected.
        expected: usize,
    },
    /// `fstat` or `F_GET_SEALS` on a handed-over fd failed.
    #[error("shared counter page fd: {step} failed: {source}")]
    Inspect {
        /// The system call.
        step: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// `mmap` failed.
    #[error("shared counter page: mmap of {len} bytes failed: {source}")]
    Map {
        /// The length asked for.
        len: usize,
        /// The OS error.
        source: io::Error,
    },
    /// The memfd lacks seals it must carry.
    #[error("shared counter page fd: seals {found:#x} lack {missing:#x} (shrink, grow, seal)")]
    Seals {
        /// The seals found.
        found: libc::c_int,
        /// The seals missing.
        missing: libc::c_int,
    },
    /// The memfd is smaller than the page.
    #[error("shared counter page fd: {size} bytes, the page needs {need}")]
    Size {
        /// The file's size.
        size: libc::off_t,
        /// The bytes needed.
        need: usize,
    },
    /// The slot count is zero or above [`MAX_SLOTS`].
    #[error("shared counter page: {0} slots is out of range (1..={MAX_SLOTS})")]
    Slots(usize),
}

/// The byte length of a page with `slots` values.
fn page_len(slots: usize) -> Result<usize, SharedMetricsError> {
    if slots == 0 || slots > MAX_SLOTS {
        return Err(SharedMetricsError::Slots(slots));
    }
    Ok((HEADER_WORDS + slots) * std::mem::size_of::<u64>())
}

/// A shared mapping of a counter page (see the module docs), unmapped on drop, with
/// the memfd that backs it.
pub struct CounterPage {
    fd: OwnedFd,
    ptr: NonNull<AtomicU64>,
    /// Words mapped: the header and `slots` values.
    words: usize,
}

// SAFETY: the mapping is only accessed through atomics, which any thread may use; the
// pointer stays valid until `Drop` unmaps it, and nothing else aliases it mutably.
unsafe impl Send for CounterPage {}
// SAFETY: as above, every access to the shared words is atomic.
unsafe impl Sync for CounterPage {}

impl Debug for CounterPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CounterPage")
            .field("fd", &self.fd)
            .field("slots", &self.slots())
            .finish()
    }
}

impl CounterPage {
    /// Creates a page of `slots` zeroed counters in a new memfd named `name` (seen in
    /// `/proc/PID/fd`), sealed against resizing and further seals, and maps it.
    pub fn create(name: &str, slots: usize) -> Result<CounterPage, SharedMetricsError> {
        let len = page_len(slots)?;
        let create = |step, source| SharedMetricsError::Create { step, source };
        let cname: Vec<u8> = name.bytes().filter(|&b| b != 0).take(200).collect();
        // No NUL in `cname` (filtered above).
        let cname = CString::new(cname).unwrap_or_default();
        let fd = memfd_create(
            cname.as_c_str(),
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .map_err(|e| create("memfd_create", e.into()))?;
        let size = u64::try_from(len).map_err(|_| SharedMetricsError::Slots(slots))?;
        ftruncate(&fd, size).map_err(|e| create("ftruncate", e.into()))?;
        fcntl_add_seals(&fd, SealFlags::from_bits_retain(SEALS as u32))
            .map_err(|e| create("F_ADD_SEALS", e.into()))?;
        let page = CounterPage::map(fd, slots)?;
        page.reset();
        Ok(page)
    }

    /// Maps a page handed over by another process, for `slots` counters, after
    /// checking that the memfd is sealed against resizing and further seals, that it is
    /// large enough (`fstat`), and that its header names `slots` counters.
    pub fn from_fd(fd: OwnedFd, slots: usize) -> Result<CounterPage, SharedMetricsError> {
        let len = page_len(slots)?;
        let inspect = |step, source| SharedMetricsError::Inspect { step, source };
        let found = fcntl_get_seals(&fd)
            .map_err(|e| inspect("F_GET_SEALS", e.into()))?
            .bits() as libc::c_int;
        if found & SEALS != SEALS {
            return Err(SharedMetricsError::Seals {
                found,
                missing: SEALS & !found,
            });
        }
        let size = fstat(&fd).map_err(|e| inspect("fstat", e.into()))?.st_size as libc::off_t;
        if usize::try_from(size).map_or(true, |s| s < len) {
            return Err(SharedMetricsError::Size { size, need: len });
        }
        let page = CounterPage::map(fd, slots)?;
        let header = page.words();
        let (magic, found_slots) = (
            header[0].load(Ordering::Relaxed),
            header[1].load(Ordering::Relaxed),
        );
        if magic != MAGIC || found_slots != slots as u64 {
            return Err(SharedMetricsError::Header {
                magic,
                slots: found_slots,
                expected: slots,
            });
        }
        Ok(page)
    }

    /// Maps `slots` counters of `fd`, which the caller checked is at least that long
    /// and sealed against shrinking.
    fn map(fd: OwnedFd, slots: usize) -> Result<CounterPage, SharedMetricsError> {
        let len = page_len(slots)?;
        // Raw libc (as `munmap` in Drop): rustix's `mmap` is unsafe in the same way and
        // would only rename the call.
        // SAFETY: a new shared mapping chosen by the kernel (it overlaps nothing we
        // own) of `len` bytes of a memfd that is at least `len` bytes long and sealed
        // against shrinking, so every byte of it stays backed.
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
        if ptr == libc::MAP_FAILED {
            return Err(SharedMetricsError::Map {
                len,
                source: io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(ptr.cast::<AtomicU64>()).ok_or(SharedMetricsError::Map {
            len,
            source: io::Error::from_raw_os_error(libc::ENOMEM),
        })?;
        Ok(CounterPage {
            fd,
            ptr,
            words: HEADER_WORDS + slots,
        })
    }

    /// Every word of the mapping, header included: the one place the mapping becomes a
    /// slice.
    fn words(&self) -> &[AtomicU64] {
        // SAFETY: `ptr` is the start of a live mapping (unmapped only in `Drop`, which
        // cannot run while `&self` is borrowed) of `words * 8` readable and writable
        // bytes, backed by a memfd sealed against shrinking, so no access faults.
        // mmap returns page-aligned memory, so the pointer is aligned for AtomicU64,
        // which has the size and alignment of u64 and for which every bit pattern is
        // valid. Other processes (and other mappings in this one) write these bytes
        // concurrently, and every access made through this slice is atomic, so a
        // shared reference to atomics is the right type for memory others mutate.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.words) }
    }

    /// The counters (the values after the header), one atomic each.
    pub fn counters(&self) -> &[AtomicU64] {
        self.words().get(HEADER_WORDS..).unwrap_or(&[])
    }

    /// The number of counters.
    pub fn slots(&self) -> usize {
        self.words - HEADER_WORDS
    }

    /// The memfd, to hand to a worker ([`CounterPage::from_fd`] there).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Reads every counter.
    pub fn load(&self) -> Vec<u64> {
        self.counters()
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Stores `values` into the counters in order (extra values, or counters without a
    /// value, are left alone).
    pub fn store(&self, values: impl IntoIterator<Item = u64>) {
        for (slot, v) in self.counters().iter().zip(values) {
            slot.store(v, Ordering::Relaxed);
        }
    }

    /// Writes the header and zeroes every counter: what a new page holds, and what the
    /// daemon restores before it starts a worker after one that may have scribbled.
    pub fn reset(&self) {
        let words = self.words();
        words[0].store(MAGIC, Ordering::Relaxed);
        words[1].store(self.slots() as u64, Ordering::Relaxed);
        for c in self.counters() {
            c.store(0, Ordering::Relaxed);
        }
    }
}

impl Drop for CounterPage {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `map` made; no reference into it outlives
        // `self` (every slice borrows `self`).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.words * 8) };
    }
}

/// A [`VirtioDevice`] that forwards every call to `inner` and, after each call that
/// handles work (`activate`, `reset`, `handle_queue`, `handle_event`), copies the
/// counters `snapshot` returns into a [`CounterPage`].
///
/// `snapshot` returns a [`CounterSet`] (such as `VsockMetricsSnapshot`); its values go
/// into the page's slots in its order. Publishing stores each value with a relaxed
/// atomic: no allocation and no system call.
pub struct PublishingDevice<D, F> {
    inner: D,
    page: CounterPage,
    snapshot: F,
}

impl<D: Debug, F> Debug for PublishingDevice<D, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishingDevice")
            .field("inner", &self.inner)
            .field("page", &self.page)
            .finish()
    }
}

impl<D, F, S> PublishingDevice<D, F>
where
    D: VirtioDevice,
    F: FnMut() -> S,
    S: CounterSet,
{
    /// Wraps `inner`, publishing `snapshot()` into `page`; publishes once now.
    pub fn new(inner: D, page: CounterPage, snapshot: F) -> Self {
        let mut dev = PublishingDevice {
            inner,
            page,
            snapshot,
        };
        dev.publish();
        dev
    }

    /// Copies the current counters into the page.
    pub fn publish(&mut self) {
        let snapshot = (self.snapshot)();
        self.page.store(snapshot.counter_values());
    }

    /// The wrapped device.
    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// Publishes a last time and returns the wrapped device and the page.
    pub fn into_parts(mut self) -> (D, CounterPage) {
        self.publish();
        (self.inner, self.page)
    }
}

impl<D, F, S> VirtioDevice for PublishingDevice<D, F>
where
    D: VirtioDevice,
    F: FnMut() -> S + Send,
    S: CounterSet,
{
    fn device_type(&self) -> u32 {
        self.inner.device_type()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        self.inner.queue_max_sizes()
    }

    fn features(&self) -> u64 {
        self.inner.features()
    }

    fn ack_features(&mut self, features: u64) {
        self.inner.ack_features(features);
    }

    fn config_size(&self) -> usize {
        self.inner.config_size()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.inner.read_config(offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.inner.write_config(offset, data);
    }

    fn writes_only_to_used_chains(&self) -> bool {
        self.inner.writes_only_to_used_chains()
    }

    fn activate(
        &mut self,
        queues: Vec<Box<dyn VirtQueue>>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), ActivateError> {
        let r = self.inner.activate(queues, interrupt);
        self.publish();
        r
    }

    fn reset(&mut self) {
        self.inner.reset();
        self.publish();
    }

    fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        self.inner.event_fd()
    }

    fn handle_queue(&mut self, queue: usize) {
        self.inner.handle_queue(queue);
        self.publish();
    }

    fn handle_event(&mut self) {
        self.inner.handle_event();
        self.publish();
    }
}

/// The daemon's side of one VM's page across worker restarts: counters that never go
/// backwards, and `worker_restarts` (see the module docs).
#[derive(Debug)]
pub struct RestartCounters {
    page: CounterPage,
    names: Vec<String>,
    base: Vec<u64>,
    restarts: u64,
}

impl RestartCounters {
    /// Creates the page for counters named `names` (in the order the worker publishes
    /// them).
    pub fn new(name: &str, names: Vec<String>) -> Result<RestartCounters, SharedMetricsError> {
        let page = CounterPage::create(name, names.len())?;
        Ok(RestartCounters {
            base: vec![0; names.len()],
            page,
            names,
            restarts: 0,
        })
    }

    /// Creates the page for the counters of the [`CounterSet`] `S` (its names, in its
    /// order), in a memfd named `name`.
    pub fn of<S: CounterSet>(name: &str) -> Result<RestartCounters, SharedMetricsError> {
        let names = S::counter_names().iter().map(|n| n.to_string()).collect();
        RestartCounters::new(name, names)
    }

    /// The page's memfd, to hand to each worker.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.page.fd()
    }

    /// The fds a worker inherits for its counters: a duplicate of the page's memfd
    /// when there is a page, none without one (a daemon without metrics).
    pub fn inherited(counters: Option<&RestartCounters>) -> Result<Vec<OwnedFd>, String> {
        counters
            .map(|c| {
                c.fd()
                    .try_clone_to_owned()
                    .map_err(|e| format!("counter page fd: {e}"))
            })
            .into_iter()
            .collect()
    }

    /// Call once a worker has been reaped and before the next starts: adds its last
    /// values to the base, restores the page (header, zeroes) and counts a restart if
    /// `restarted`.
    pub fn worker_ended(&mut self, restarted: bool) {
        for (b, v) in self.base.iter_mut().zip(self.page.load()) {
            *b = b.saturating_add(v);
        }
        self.page.reset();
        if restarted {
            self.restarts = self.restarts.saturating_add(1);
        }
    }

    /// The number of counters in the page (without [`WORKER_RESTARTS`]).
    pub fn slots(&self) -> usize {
        self.page.slots()
    }

    /// Workers restarted so far.
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    /// Every counter (base + the live worker's value) by name, then
    /// [`WORKER_RESTARTS`].
    pub fn counters(&self) -> Vec<(String, u64)> {
        self.names
            .iter()
            .zip(self.base.iter().zip(self.page.load()))
            .map(|(n, (b, v))| (n.clone(), b.saturating_add(v)))
            .chain(std::iter::once((
                WORKER_RESTARTS.to_string(),
                self.restarts,
            )))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::fd::FromRawFd;

    use super::*;

    #[derive(Debug, Default, Clone, Copy)]
    struct Snap {
        rx_packets: u64,
        tx_packets: u64,
        err_queue: u64,
    }

    impl CounterSet for Snap {
        fn counter_names() -> &'static [&'static str] {
            &["rx_packets", "tx_packets", "err_queue"]
        }

        fn counter_values(&self) -> impl Iterator<Item = u64> + '_ {
            [self.rx_packets, self.tx_packets, self.err_queue].into_iter()
        }
    }

    fn dup(fd: BorrowedFd<'_>) -> OwnedFd {
        fd.try_clone_to_owned().unwrap()
    }

    #[test]
    fn two_mappings_of_one_memfd_see_each_other() {
        let parent = CounterPage::create("test", 3).unwrap();
        let child = CounterPage::from_fd(dup(parent.fd()), 3).unwrap();
        assert_eq!(parent.load(), [0, 0, 0]);
        child.store([1, 2, u64::MAX]);
        assert_eq!(parent.load(), [1, 2, u64::MAX]);
        parent.reset();
        assert_eq!(child.load(), [0, 0, 0]);
        assert_eq!(child.slots(), 3);
    }

    #[test]
    fn a_forked_child_publishes_into_the_parents_page() {
        let parent = CounterPage::create("fork", 2).unwrap();
        let fd = dup(parent.fd());
        // SAFETY: the test process has other threads, so the child makes only system
        // calls and atomic stores (fcntl, fstat, mmap, munmap, _exit; no allocation,
        // no lock) before it ends with `_exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = match CounterPage::from_fd(fd, 2) {
                Ok(page) => {
                    page.store([7, 9]);
                    0
                }
                Err(_) => 1,
            };
            // SAFETY: ends the forked child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child; `status` is a live local.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        assert_eq!(parent.load(), [7, 9]);
    }

    #[test]
    fn unsuitable_fds_are_refused() {
        // An unsealed memfd of the right size.
        // SAFETY: a NUL-terminated name; the new fd is owned below.
        let raw = unsafe { libc::memfd_create(c"x".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: memfd_create returned a new fd nobody owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on our fd.
        assert_eq!(unsafe { libc::ftruncate(raw, 64) }, 0);
        assert!(matches!(
            CounterPage::from_fd(fd, 2),
            Err(SharedMetricsError::Seals { .. })
        ));
        // A sealed page of fewer slots than expected: too small.
        let small = CounterPage::create("small", 2).unwrap();
        let e = CounterPage::from_fd(dup(small.fd()), 3).unwrap_err();
        assert!(
            matches!(e, SharedMetricsError::Size { size: 32, need: 40 }),
            "{e}"
        );
        // Large enough but with another slot count in its header.
        let big = CounterPage::create("big", 3).unwrap();
        let e = CounterPage::from_fd(dup(big.fd()), 2).unwrap_err();
        assert!(
            matches!(e, SharedMetricsError::Header { slots: 3, .. }),
            "{e}"
        );
        // A scribbled header.
        big.words()[0].store(1, Ordering::Relaxed);
        assert!(CounterPage::from_fd(dup(big.fd()), 3).is_err());
        big.reset();
        assert!(CounterPage::from_fd(dup(big.fd()), 3).is_ok());
        // Out-of-range slot counts.
        assert!(matches!(
            CounterPage::create("zero", 0),
            Err(SharedMetricsError::Slots(0))
        ));
        assert!(CounterPage::create("huge", MAX_SLOTS + 1).is_err());
        // The worker cannot shrink the page or lift the seals.
        // SAFETY: ftruncate and fcntl on our own fd; no memory is passed.
        unsafe {
            assert_ne!(libc::ftruncate(big.fd().as_raw_fd(), 0), 0);
            assert_ne!(
                libc::fcntl(
                    big.fd().as_raw_fd(),
                    libc::F_ADD_SEALS,
                    libc::F_SEAL_FUTURE_WRITE
                ),
                0
            );
        }
    }

    /// A device that counts its calls in a shared snapshot.
    struct Counting {
        snap: Arc<std::sync::Mutex<Snap>>,
    }

    impl VirtioDevice for Counting {
        fn device_type(&self) -> u32 {
            19
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[8]
        }
        fn features(&self) -> u64 {
            0
        }
        fn ack_features(&mut self, _: u64) {}
        fn read_config(&self, _: u64, _: &mut [u8]) {}
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(
            &mut self,
            _: Vec<Box<dyn VirtQueue>>,
            _: Arc<dyn Interrupt>,
        ) -> Result<(), ActivateError> {
            Ok(())
        }
        fn reset(&mut self) {
            self.snap.lock().unwrap().err_queue += 100;
        }
        fn event_fd(&self) -> Option<BorrowedFd<'_>> {
            None
        }
        fn handle_queue(&mut self, _: usize) {
            self.snap.lock().unwrap().tx_packets += 1;
        }
        fn handle_event(&mut self) {
            self.snap.lock().unwrap().rx_packets += 1;
        }
    }

    #[test]
    fn the_wrapper_publishes_after_every_event() {
        let snap = Arc::new(std::sync::Mutex::new(Snap {
            rx_packets: 5,
            ..Snap::default()
        }));
        let mut daemon = RestartCounters::of::<Snap>("vm").unwrap();
        let page = CounterPage::from_fd(dup(daemon.fd()), 3).unwrap();
        let s = snap.clone();
        let mut dev = PublishingDevice::new(Counting { snap: snap.clone() }, page, move || {
            *s.lock().unwrap()
        });
        let value = |d: &RestartCounters, name: &str| {
            d.counters()
                .into_iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v)
                .unwrap()
        };
        // Published once at the start.
        assert_eq!(value(&daemon, "rx_packets"), 5);
        dev.handle_event();
        dev.handle_queue(0);
        dev.handle_queue(0);
        assert_eq!(value(&daemon, "rx_packets"), 6);
        assert_eq!(value(&daemon, "tx_packets"), 2);
        dev.reset();
        assert_eq!(value(&daemon, "err_queue"), 100);
        assert_eq!(dev.device_type(), 19);
        assert_eq!(dev.queue_max_sizes(), &[8]);

        // The worker dies; a new one starts from zero; nothing goes backwards.
        drop(dev);
        daemon.worker_ended(true);
        assert_eq!(value(&daemon, "tx_packets"), 2);
        assert_eq!(value(&daemon, WORKER_RESTARTS), 1);
        let snap2 = Arc::new(std::sync::Mutex::new(Snap::default()));
        let s2 = snap2.clone();
        let page = CounterPage::from_fd(dup(daemon.fd()), 3).unwrap();
        let mut dev =
            PublishingDevice::new(Counting { snap: snap2 }, page, move || *s2.lock().unwrap());
        assert_eq!(value(&daemon, "tx_packets"), 2);
        dev.handle_queue(1);
        assert_eq!(value(&daemon, "tx_packets"), 3);
        assert_eq!(value(&daemon, "rx_packets"), 6);
        let (_, page) = dev.into_parts();
        // A hostile worker's huge values saturate instead of wrapping.
        page.store([u64::MAX; 3]);
        daemon.worker_ended(false);
        assert_eq!(value(&daemon, "rx_packets"), u64::MAX);
        assert_eq!(daemon.restarts(), 1);
        assert_eq!(
            daemon.counters().last(),
            Some(&(WORKER_RESTARTS.to_string(), 1))
        );
    }
}
