//! The C library's own functions, found with `dlsym(RTLD_NEXT)`: what the shim calls
//! for everything that is not the emulated device (and to map memory itself).

use std::ffi::{c_char, c_int, c_ulong, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The calling thread's errno.
pub fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Sets the calling thread's errno.
pub fn set_errno(e: i32) {
    // SAFETY: __errno_location returns the calling thread's errno slot, always valid.
    unsafe { *libc::__errno_location() = e };
}

/// Looks `name` (NUL-terminated) up in the libraries after this one, once.
fn lookup(cache: &AtomicUsize, name: &'static [u8]) -> usize {
    let p = cache.load(Ordering::Relaxed);
    if p != 0 {
        return p;
    }
    // SAFETY: `name` is a NUL-terminated literal; dlsym only reads it.
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr().cast()) } as usize;
    if p == 0 {
        // Without the C library's own function nothing can be passed through.
        let msg = b"outboard-v4l2-shim: a libc symbol is missing\n";
        // SAFETY: writes a static message to stderr, then aborts.
        unsafe {
            libc::write(2, msg.as_ptr().cast(), msg.len());
            libc::abort();
        }
    }
    cache.store(p, Ordering::Relaxed);
    p
}

macro_rules! real_fns {
    ($($name:ident: $ty:ty;)*) => {
        $(
            /// The C library's function of this name.
            pub fn $name() -> $ty {
                static CACHE: AtomicUsize = AtomicUsize::new(0);
                let p = lookup(&CACHE, concat!(stringify!($name), "\0").as_bytes());
                // SAFETY: `p` is the non-null address dlsym returned for the libc
                // function of this name, whose C signature is `$ty`.
                unsafe { std::mem::transmute::<usize, $ty>(p) }
            }
        )*
    };
}

real_fns! {
    open: unsafe extern "C" fn(*const c_char, c_int, libc::mode_t) -> c_int;
    open64: unsafe extern "C" fn(*const c_char, c_int, libc::mode_t) -> c_int;
    openat: unsafe extern "C" fn(c_int, *const c_char, c_int, libc::mode_t) -> c_int;
    openat64: unsafe extern "C" fn(c_int, *const c_char, c_int, libc::mode_t) -> c_int;
    __open_2: unsafe extern "C" fn(*const c_char, c_int) -> c_int;
    __open64_2: unsafe extern "C" fn(*const c_char, c_int) -> c_int;
    fopen: unsafe extern "C" fn(*const c_char, *const c_char) -> *mut libc::FILE;
    fopen64: unsafe extern "C" fn(*const c_char, *const c_char) -> *mut libc::FILE;
    close: unsafe extern "C" fn(c_int) -> c_int;
    dup: unsafe extern "C" fn(c_int) -> c_int;
    ioctl: unsafe extern "C" fn(c_int, c_ulong, *mut c_void) -> c_int;
    mmap: unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, c_int, libc::off_t) -> *mut c_void;
    munmap: unsafe extern "C" fn(*mut c_void, usize) -> c_int;
    read: unsafe extern "C" fn(c_int, *mut c_void, usize) -> isize;
    write: unsafe extern "C" fn(c_int, *const c_void, usize) -> isize;
    poll: unsafe extern "C" fn(*mut libc::pollfd, libc::nfds_t, c_int) -> c_int;
    select: unsafe extern "C" fn(c_int, *mut libc::fd_set, *mut libc::fd_set, *mut libc::fd_set, *mut libc::timeval) -> c_int;
    epoll_wait: unsafe extern "C" fn(c_int, *mut libc::epoll_event, c_int, c_int) -> c_int;
}
