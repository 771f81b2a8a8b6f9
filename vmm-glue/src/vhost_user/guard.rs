//! Guest memory that a front-end cuts short cannot kill the daemon: SIGBUS containment.
//!
//! A front-end hands its memory over as files. A memfd sealed against shrinking
//! (QEMU's `memory-backend-memfd` seals by default) cannot change size, but a file on
//! hugetlbfs or /dev/shm (`memory-backend-file`, the usual way to get huge pages)
//! cannot be sealed, and a compromised front-end can `ftruncate` it after
//! `SET_MEM_TABLE`. The next access of the daemon to the cut-off part is a SIGBUS, which
//! by default kills the whole process: every VM it serves.
//!
//! # Design
//!
//! Of the choices (require seals, which would refuse every hugetlbfs user; one process
//! per VM, which `--jail` gives but plain mode does not; or contain the fault), this
//! module contains it:
//!
//! - Every mapping of guest memory is registered ([`GuardedRange`]) in a fixed,
//!   lock-free table while it is mapped; the registration ends before the mapping is
//!   unmapped (the memory table keeps each region until nothing else holds it, see
//!   `memory.rs`).
//! - A SIGBUS handler (installed once, chaining to the previous one) looks the faulting
//!   address up. Inside a registered range it maps an anonymous zero page (of the
//!   range's page size, so hugetlbfs mappings split at huge-page boundaries) over the
//!   faulting page with `MAP_FIXED`, marks the range poisoned and returns: the faulting
//!   access is retried and completes on the zero page. Anywhere else it hands the
//!   signal to the previous disposition, so a real bug still crashes.
//! - The worker checks [`poison_events`] after each pass over the device (one atomic
//!   load) and, when a range of its table is poisoned, stops that VM's device and drops
//!   its front-end with an error naming the region. Other VMs never notice.
//!
//! The handler only reads atomics and calls `mmap(2)`, both async-signal-safe. Accesses
//! the kernel makes on the daemon's behalf (`readv`/`writev` into guest buffers) do not
//! raise SIGBUS: they fail with `EFAULT`, which the devices already treat as an I/O
//! error.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Most guest memory mappings guarded at once, over all VMs of a process: eight memory
/// tables at their cap (`memory::MAX_MAPPINGS`), hundreds of typical ones. A mapping of a
/// file sealed against shrinking cannot fault and is served unguarded when the table is
/// full; any other mapping is then refused, never mapped unguarded: a
/// front-end that filled the table must not be able to kill the daemon with the next one.
pub const MAX_GUARDED: usize = 16384;

const FREE: u8 = 0;
const BUSY: u8 = 1;
const LIVE: u8 = 2;

struct Slot {
    state: AtomicU8,
    start: AtomicUsize,
    len: AtomicUsize,
    page: AtomicUsize,
    poisoned: AtomicBool,
}

impl Slot {
    const fn new() -> Self {
        Slot {
            state: AtomicU8::new(FREE),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            page: AtomicUsize::new(0),
            poisoned: AtomicBool::new(false),
        }
    }
}

static SLOTS: [Slot; MAX_GUARDED] = [const { Slot::new() }; MAX_GUARDED];
static POISON_EVENTS: AtomicU64 = AtomicU64::new(0);
/// The SIGBUS disposition before ours, for faults outside guest memory.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// How many times guest memory was found cut short, process-wide. Changes when any
/// [`GuardedRange`] becomes poisoned.
#[inline]
pub fn poison_events() -> u64 {
    POISON_EVENTS.load(Ordering::Acquire)
}

/// A registered guest memory mapping; unregisters on drop. Drop it before the mapping
/// is unmapped.
#[derive(Debug)]
pub struct GuardedRange {
    slot: usize,
}

impl GuardedRange {
    /// Registers `[start, start + len)`, a mapping of a file whose pages are `page`
    /// bytes (4 KiB, or the huge page size on hugetlbfs). `None` when the table is
    /// full or the handler cannot be installed.
    pub fn register(start: *const u8, len: usize, page: usize) -> Option<GuardedRange> {
        install_handler()?;
        let page = page.max(4096).next_power_of_two();
        for (i, s) in SLOTS.iter().enumerate() {
            if s.state
                .compare_exchange(FREE, BUSY, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                s.start.store(start as usize, Ordering::Relaxed);
                s.len.store(len, Ordering::Relaxed);
                s.page.store(page, Ordering::Relaxed);
                s.poisoned.store(false, Ordering::Relaxed);
                s.state.store(LIVE, Ordering::Release);
                return Some(GuardedRange { slot: i });
            }
        }
        None
    }

    /// Whether an access found the mapping cut short (the file shrank under it).
    pub fn poisoned(&self) -> bool {
        SLOTS[self.slot].poisoned.load(Ordering::Acquire)
    }
}

impl Drop for GuardedRange {
    fn drop(&mut self) {
        let s = &SLOTS[self.slot];
        s.state.store(BUSY, Ordering::Release);
        s.len.store(0, Ordering::Relaxed);
        s.state.store(FREE, Ordering::Release);
    }
}

/// Whether `fd` is a memfd sealed against shrinking: its mappings cannot fault.
pub(crate) fn shrink_sealed(fd: &impl AsFd) -> bool {
    rustix::fs::fcntl_get_seals(fd).is_ok_and(|s| s.contains(rustix::fs::SealFlags::SHRINK))
}

/// What a new mapping may keep: its guard (`Some(Some(_))`), no guard when its file is
/// sealed against shrinking (`Some(None)`), or nothing (`None`: refuse the mapping) when
/// the table was full and the file can be cut short.
pub(crate) fn required(guard: Option<GuardedRange>, sealed: bool) -> Option<Option<GuardedRange>> {
    match guard {
        Some(g) => Some(Some(g)),
        None if sealed => Some(None),
        None => None,
    }
}

/// Installs the SIGBUS handler once; `None` if that failed.
fn install_handler() -> Option<()> {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    let ok = *INSTALLED.get_or_init(|| {
        // Raw libc: rustix has no stable `sigaction`; the handler's own `mmap` below is
        // libc's too, one async-signal-safe call.
        // SAFETY: a zeroed sigaction is a valid "no handler" value to fill in; the
        // handler is an `extern "C"` function with the SA_SIGINFO signature, and the
        // previous action is written into `old`, which we own.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_sigbus as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut act.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &act, &mut old) != 0 {
                return false;
            }
            let _ = PREVIOUS.set(old);
        }
        true
    });
    ok.then_some(())
}

/// Maps a zero page over the faulting page of a registered range; true if it did.
fn contain(addr: usize) -> bool {
    for s in &SLOTS {
        if s.state.load(Ordering::Acquire) != LIVE {
            continue;
        }
        let start = s.start.load(Ordering::Relaxed);
        let len = s.len.load(Ordering::Relaxed);
        if addr < start || addr - start >= len {
            continue;
        }
        let page = s.page.load(Ordering::Relaxed);
        let base = (addr & !(page - 1)).max(start);
        let size = page.min(start + len - base);
        // SAFETY: `[base, base + size)` lies inside a registered guest memory mapping,
        // which stays mapped while registered; replacing its pages with private zero
        // pages changes only what this process sees of the front-end's file, which the
        // device stops using once it sees the poison flag. No Rust reference points
        // into guest memory (see outboard_devices::virtio::IoRegion).
        let p = unsafe {
            libc::mmap(
                base as *mut libc::c_void,
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p as usize != base {
            return false;
        }
        s.poisoned.store(true, Ordering::Release);
        POISON_EVENTS.fetch_add(1, Ordering::AcqRel);
        return true;
    }
    false
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for a SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    if contain(addr) {
        return;
    }
    // Not guest memory: whatever handled SIGBUS before us (Rust's runtime or the
    // default action, which then kills the process as it would have).
    match PREVIOUS.get() {
        Some(old)
            if old.sa_sigaction != libc::SIG_DFL
                && old.sa_sigaction != libc::SIG_IGN
                && old.sa_flags & libc::SA_SIGINFO != 0 =>
        {
            // SAFETY: a SA_SIGINFO handler installed by someone else, called with the
            // arguments the kernel gave us.
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                unsafe { std::mem::transmute(old.sa_sigaction) };
            f(sig, info, ctx);
        }
        Some(old) if old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN => {
            // SAFETY: a plain handler installed by someone else.
            let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(old.sa_sigaction) };
            f(sig);
        }
        _ => {
            // SAFETY: restores the default disposition; returning re-executes the
            // faulting access, which then ends the process with SIGBUS as before.
            unsafe {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::fs::File;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    #[test]
    fn a_truncated_file_poisons_its_range_instead_of_killing_the_process() {
        // SAFETY: memfd_create with a valid C string.
        let fd = unsafe { libc::memfd_create(c"guard-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a new fd nobody else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(4 * 4096).unwrap();
        // SAFETY: maps the file we just sized; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4 * 4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let base = p.cast::<u8>();
        let guard = GuardedRange::register(base, 4 * 4096, 4096).unwrap();
        let events = poison_events();
        // SAFETY: inside the mapping.
        unsafe { base.write_volatile(7) };
        assert!(!guard.poisoned());
        // The front-end cuts the file to one page; the third page is gone.
        file.set_len(4096).unwrap();
        // SAFETY: inside the mapping; this access faults with SIGBUS, which the guard
        // turns into a read of a zero page.
        let v = unsafe { base.add(2 * 4096 + 5).read_volatile() };
        assert_eq!(v, 0);
        assert!(guard.poisoned());
        assert!(poison_events() > events);
        // The first page is still the file's.
        // SAFETY: inside the mapping.
        assert_eq!(unsafe { base.read_volatile() }, 7);
        drop(guard);
        // SAFETY: unmaps exactly what was mapped above.
        unsafe { libc::munmap(p, 4 * 4096) };
    }

    #[test]
    fn only_a_file_sealed_against_shrinking_may_be_mapped_unguarded() {
        let memfd = |flags| {
            // SAFETY: memfd_create with a valid C string.
            let fd = unsafe { libc::memfd_create(c"guard-seal".as_ptr(), flags) };
            assert!(fd >= 0);
            // SAFETY: a new fd nobody else owns.
            File::from(unsafe { OwnedFd::from_raw_fd(fd) })
        };
        let open = memfd(libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING);
        let sealed = memfd(libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING);
        rustix::fs::fcntl_add_seals(&sealed, rustix::fs::SealFlags::SHRINK).unwrap();
        let grow_only = memfd(libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING);
        rustix::fs::fcntl_add_seals(&grow_only, rustix::fs::SealFlags::GROW).unwrap();
        let plain = memfd(libc::MFD_CLOEXEC);
        assert!(shrink_sealed(&sealed));
        for f in [&open, &grow_only, &plain] {
            assert!(!shrink_sealed(f));
        }
        // A full table: a sealed file is served unguarded, any other refused.
        assert!(matches!(required(None, true), Some(None)));
        assert!(required(None, false).is_none());
        let mut page = [0u8; 4096];
        let g = GuardedRange::register(page.as_mut_ptr(), page.len(), 4096).unwrap();
        assert!(matches!(required(Some(g), false), Some(Some(_))));
    }
}
