//! Reading a descriptor chain's device-readable half and writing its device-writable
//! half: the tool every device uses on the [`DescChain`](super::DescChain)s it pops.
//!
//! A request may be split over descriptors anywhere (a header across two one-byte
//! buffers is legal and a hostile driver will do it), so a device never reads a region
//! on its own: a [`ChainReader`] reads the readable half as one stream of bytes, and a
//! [`ChainWriter`] writes the writable half as one stream and counts the bytes for
//! [`VirtQueue::add_used`](super::VirtQueue::add_used).
//!
//! - Every read and write is bounds-checked and all or nothing: a request that ends
//!   early is a [`ChainError::Truncated`] naming what was being read, an answer that
//!   does not fit is a [`ChainError::NoRoom`]. Nothing here panics on guest input.
//! - An object of constant size inside one region (the usual case: a header in one
//!   descriptor) is copied with a few inline moves ([`IoRegion::read_obj_at`]); one
//!   that crosses regions is copied piece by piece.
//! - Bulk data is not copied at all when it goes to or comes from a socket:
//!   [`ChainReader::take_regions`] and [`ChainWriter::take_regions`] hand out the
//!   sub-regions of the next bytes, which become `iovec`s ([`IoRegion::as_iovec`]) for
//!   a `sendmsg`/`recvmsg` straight from or into guest memory (the vsock data path).
//!
//! [`read_regions`], [`write_regions`] and [`slice_regions`] are the offset-based
//! primitives the cursors are built on, for random access into a list of regions (a
//! test driver checking what a device wrote, for instance).
//!
//! # Example
//!
//! A request of a little-endian `u32` code split over two descriptors, then 4 bytes of
//! payload; the answer is a `u32` status and the payload echoed back.
//!
//! ```
//! use outboard_devices::virtio::{ChainError, ChainReader, ChainWriter, IoRegion};
//!
//! let mut request = [7u8, 0, 0, 0, b'p', b'i', b'n', b'g'];
//! let mut answer = [0u8; 16];
//! let (first, rest) = request.split_at_mut(2);
//! // SAFETY: the arrays outlive the regions, and nothing else touches them while the
//! // regions are in use.
//! let (readable, writable) = unsafe {
//!     (
//!         [
//!             IoRegion::new(first.as_mut_ptr(), first.len()),
//!             IoRegion::new(rest.as_mut_ptr(), rest.len()),
//!         ],
//!         [IoRegion::new(answer.as_mut_ptr(), answer.len())],
//!     )
//! };
//!
//! let mut r = ChainReader::new(&readable);
//! let code: u32 = r.read_obj("request code")?;
//! let mut payload = [0u8; 4];
//! r.read_bytes(&mut payload, "payload")?;
//! assert_eq!((code, &payload), (7, b"ping"));
//! assert!(matches!(r.read_obj::<u8>("more"), Err(ChainError::Truncated { .. })));
//!
//! let mut w = ChainWriter::new(&writable);
//! w.write_obj(&0u32)?;
//! w.write_bytes(&payload)?;
//! assert_eq!(w.written(), 8); // the length for `add_used`
//! assert_eq!(&answer[4..8], b"ping");
//! # Ok::<(), ChainError>(())
//! ```

use std::os::fd::{AsRawFd, BorrowedFd};

use thiserror::Error;
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::IoRegion;

/// Copies from a list of regions, starting `offset` bytes into their concatenation.
/// Returns the number of bytes copied.
pub fn read_regions(regions: &[IoRegion], mut offset: usize, dst: &mut [u8]) -> usize {
    let mut done = 0;
    for r in regions {
        if done == dst.len() {
            break;
        }
        if offset >= r.len() {
            offset -= r.len();
            continue;
        }
        done += r.read_at(offset, &mut dst[done..]);
        offset = 0;
    }
    done
}

/// Copies into a list of regions, starting `offset` bytes into their concatenation.
/// Returns the number of bytes copied.
pub fn write_regions(regions: &[IoRegion], mut offset: usize, src: &[u8]) -> usize {
    let mut done = 0;
    for r in regions {
        if done == src.len() {
            break;
        }
        if offset >= r.len() {
            offset -= r.len();
            continue;
        }
        done += r.write_at(offset, &src[done..]);
        offset = 0;
    }
    done
}

/// Appends to `out` the sub-regions covering `[offset, offset + len)` of the
/// concatenation of `regions`; returns the number of bytes covered (less than `len` when
/// the regions end first).
pub fn slice_regions(
    regions: &[IoRegion],
    mut offset: usize,
    len: usize,
    out: &mut Vec<IoRegion>,
) -> usize {
    let mut left = len;
    for r in regions {
        if left == 0 {
            break;
        }
        if offset >= r.len() {
            offset -= r.len();
            continue;
        }
        let s = r.sub(offset, left);
        offset = 0;
        if !s.is_empty() {
            left -= s.len();
            out.push(s);
        }
    }
    len - left
}

/// Errors of [`ChainReader`] and [`ChainWriter`].
#[cfg_attr(test, remain::sorted)]
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ChainError {
    /// The device-writable half has no room for a write.
    #[error("response needs {needed} more bytes but only {left} are writable")]
    NoRoom {
        /// Bytes the write needed.
        needed: usize,
        /// Bytes left in the writable half.
        left: usize,
    },
    /// The device-readable half ended before an object could be read.
    #[error("command is truncated: {what} needs {needed} bytes, {left} left")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes needed.
        needed: usize,
        /// Bytes left in the readable half.
        left: usize,
    },
}

impl ChainError {
    /// The Linux errno a device reports to the driver for this error, for device types
    /// whose responses carry errnos (virtio-media): `ENOSPC` when the answer does not
    /// fit, `EINVAL` for a truncated request.
    pub fn errno(&self) -> i32 {
        match self {
            ChainError::NoRoom { .. } => libc::ENOSPC,
            ChainError::Truncated { .. } => libc::EINVAL,
        }
    }
}

/// A position in the concatenation of a list of regions, with the rest of the region it
/// falls in at hand so that an object inside that region is copied without walking the
/// list.
#[derive(Debug, Clone)]
struct RegionCursor<'a> {
    regions: &'a [IoRegion],
    /// Total length of `regions`.
    len: usize,
    /// Bytes before the position.
    done: usize,
    /// The rest of the region the position falls in; empty only at the end.
    head: IoRegion,
    /// Index of the region after `head`'s.
    next: usize,
}

impl<'a> RegionCursor<'a> {
    #[inline]
    fn new(regions: &'a [IoRegion]) -> Self {
        let len = regions
            .iter()
            .fold(0usize, |a, r| a.saturating_add(r.len()));
        let mut c = RegionCursor {
            regions,
            len,
            done: 0,
            head: IoRegion::empty(),
            next: 0,
        };
        c.skip_empty();
        c
    }

    #[inline]
    fn remaining(&self) -> usize {
        self.len - self.done
    }

    /// Moves `head` to the next non-empty region while it is empty.
    #[inline]
    fn skip_empty(&mut self) {
        while self.head.is_empty() {
            let Some(r) = self.regions.get(self.next) else {
                return;
            };
            self.head = *r;
            self.next += 1;
        }
    }

    /// `n <= head.len()` bytes of `head` were consumed.
    #[inline]
    fn advance(&mut self, n: usize) {
        self.head = self.head.sub(n, usize::MAX);
        self.done += n;
        self.skip_empty();
    }

    /// Moves to position `done` (after a copy across regions, or back to the start).
    fn seek(&mut self, done: usize) {
        self.done = done;
        let mut start = 0usize;
        for (i, r) in self.regions.iter().enumerate() {
            let end = start.saturating_add(r.len());
            if done < end {
                self.head = r.sub(done - start, usize::MAX);
                self.next = i + 1;
                return;
            }
            start = end;
        }
        self.head = IoRegion::empty();
        self.next = self.regions.len();
    }

    /// Moves past the next `min(len, remaining)` bytes, region by region from the
    /// position (no walk from the start), appending their sub-regions to `out` when
    /// given; returns how many bytes were passed.
    fn forward(&mut self, len: usize, mut out: Option<&mut Vec<IoRegion>>) -> usize {
        let mut left = len.min(self.remaining());
        let n = left;
        while left > 0 {
            let s = self.head.sub(0, left);
            if s.is_empty() {
                // Only at the end, which `remaining` already excludes; never spin.
                break;
            }
            if let Some(out) = out.as_deref_mut() {
                out.push(s);
            }
            left -= s.len();
            self.advance(s.len());
        }
        n - left
    }
}

/// Reads objects one after the other from the device-readable half of a chain.
#[derive(Debug)]
pub struct ChainReader<'a> {
    c: RegionCursor<'a>,
}

impl<'a> ChainReader<'a> {
    /// A reader at the start of `regions`.
    #[inline]
    pub fn new(regions: &'a [IoRegion]) -> Self {
        ChainReader {
            c: RegionCursor::new(regions),
        }
    }

    /// Bytes not read yet.
    #[inline]
    pub fn remaining(&self) -> usize {
        self.c.remaining()
    }

    /// Reads a plain object; `what` names it in the error.
    #[inline]
    pub fn read_obj<T: FromBytes + IntoBytes>(
        &mut self,
        what: &'static str,
    ) -> Result<T, ChainError> {
        let size = std::mem::size_of::<T>();
        if size > self.remaining() {
            return Err(ChainError::Truncated {
                what,
                needed: size,
                left: self.remaining(),
            });
        }
        // Fast path: the object lies inside the current region (a command in one
        // descriptor, the usual case): constant-size inline moves.
        if let Some(obj) = self.c.head.read_obj_at::<T>(0) {
            self.c.advance(size);
            return Ok(obj);
        }
        let mut obj = T::new_zeroed();
        let n = read_regions(self.c.regions, self.c.done, obj.as_mut_bytes());
        self.c.seek(self.c.done + n);
        Ok(obj)
    }

    /// Fills `dst` (all or nothing); `what` names the bytes in the error.
    pub fn read_bytes(&mut self, dst: &mut [u8], what: &'static str) -> Result<(), ChainError> {
        if dst.len() > self.remaining() {
            return Err(ChainError::Truncated {
                what,
                needed: dst.len(),
                left: self.remaining(),
            });
        }
        let n = read_regions(self.c.regions, self.c.done, dst);
        self.c.seek(self.c.done + n);
        Ok(())
    }

    /// Skips `len` bytes (all or nothing); `what` names them in the error.
    pub fn skip(&mut self, len: usize, what: &'static str) -> Result<(), ChainError> {
        if len > self.remaining() {
            return Err(ChainError::Truncated {
                what,
                needed: len,
                left: self.remaining(),
            });
        }
        self.c.forward(len, None);
        Ok(())
    }

    /// Appends to `out` the sub-regions that hold the next `len` bytes (fewer when the
    /// readable half ends first) and moves past them; returns how many bytes they
    /// cover. Nothing is copied: the regions are for a `sendmsg` or `writev` straight
    /// from guest memory.
    pub fn take_regions(&mut self, len: usize, out: &mut Vec<IoRegion>) -> usize {
        self.c.forward(len, Some(out))
    }
}

/// Writes objects one after the other into the device-writable half of a chain and
/// counts the bytes written (the length for the used ring).
#[derive(Debug)]
pub struct ChainWriter<'a> {
    c: RegionCursor<'a>,
}

impl<'a> ChainWriter<'a> {
    /// Regions filled by one [`ChainWriter::write_from_fd`].
    pub const MAX_IOVECS: usize = 64;

    /// A writer at the start of `regions`.
    #[inline]
    pub fn new(regions: &'a [IoRegion]) -> Self {
        ChainWriter {
            c: RegionCursor::new(regions),
        }
    }

    /// Bytes written so far.
    #[inline]
    pub fn written(&self) -> usize {
        self.c.done
    }

    /// Room left.
    #[inline]
    pub fn remaining(&self) -> usize {
        self.c.remaining()
    }

    /// Writes raw bytes (all or nothing).
    pub fn write_bytes(&mut self, bytes: &[u8]) -> Result<(), ChainError> {
        if bytes.len() > self.remaining() {
            return Err(ChainError::NoRoom {
                needed: bytes.len(),
                left: self.remaining(),
            });
        }
        let n = write_regions(self.c.regions, self.c.done, bytes);
        self.c.seek(self.c.done + n);
        Ok(())
    }

    /// Writes a plain object (all or nothing).
    #[inline]
    pub fn write_obj<T: IntoBytes + Immutable>(&mut self, obj: &T) -> Result<(), ChainError> {
        // Fast path: the object fits in the current region (see ChainReader::read_obj).
        if self.c.head.write_obj_at(0, obj) {
            self.c.advance(std::mem::size_of::<T>());
            return Ok(());
        }
        self.write_bytes(obj.as_bytes())
    }

    /// Writes `first` followed by `second` (a response header and its payload). When
    /// both fit in the current region they are written in one step, `second` first so
    /// that nothing is stored between the caller's copy of it and this one. Otherwise
    /// they are written one after the other, and a `second` that does not fit leaves
    /// `first` written.
    #[inline]
    pub fn write_obj_pair<A, B>(&mut self, first: &A, second: &B) -> Result<(), ChainError>
    where
        A: IntoBytes + Immutable,
        B: IntoBytes + Immutable,
    {
        let a = std::mem::size_of::<A>();
        let size = a + std::mem::size_of::<B>();
        if size <= self.c.head.len()
            && self.c.head.write_obj_at(a, second)
            && self.c.head.write_obj_at(0, first)
        {
            self.c.advance(size);
            return Ok(());
        }
        self.write_obj(first)?;
        self.write_obj(second)
    }

    /// Leaves the next `len` bytes for later (all or nothing): a header that is written
    /// once the payload after it is known. They count as written.
    pub fn skip(&mut self, len: usize) -> Result<(), ChainError> {
        if len > self.remaining() {
            return Err(ChainError::NoRoom {
                needed: len,
                left: self.remaining(),
            });
        }
        self.c.forward(len, None);
        Ok(())
    }

    /// Appends to `out` the sub-regions of the next `len` bytes (fewer when the
    /// writable half ends first) and moves past them; returns how many bytes they
    /// cover, which count as written. Nothing is copied: the regions are for a
    /// `recvmsg` or `readv` straight into guest memory.
    pub fn take_regions(&mut self, len: usize, out: &mut Vec<IoRegion>) -> usize {
        self.c.forward(len, Some(out))
    }

    /// Fills up to `len` bytes of the writable half (fewer when it ends first) straight
    /// from `fd` with one `readv` into the guest's buffers: the kernel copies into guest
    /// memory, there is no bounce buffer. Returns how many bytes were read, which count
    /// as written; 0 at end of file or when there is no room. An error (`EAGAIN` from a
    /// non-blocking fd included) leaves the writer where it was. At most
    /// [`ChainWriter::MAX_IOVECS`] regions are filled per call; call again for more.
    ///
    /// ```
    /// use std::os::fd::AsFd;
    /// use outboard_devices::virtio::{ChainWriter, IoRegion};
    ///
    /// let (mut a, mut b) = ([0u8; 3], [0u8; 8]);
    /// // SAFETY: the arrays outlive the regions and are not touched while they are used.
    /// let writable = unsafe {
    ///     [IoRegion::new(a.as_mut_ptr(), a.len()), IoRegion::new(b.as_mut_ptr(), b.len())]
    /// };
    /// let zero = std::fs::File::open("/dev/zero")?;
    /// let mut w = ChainWriter::new(&writable);
    /// w.write_bytes(b"ab")?;
    /// assert_eq!(w.write_from_fd(zero.as_fd(), 100)?, 9);
    /// assert_eq!((w.written(), w.remaining()), (11, 0));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn write_from_fd(&mut self, fd: BorrowedFd<'_>, len: usize) -> std::io::Result<usize> {
        let mut iov = [IoRegion::empty().as_iovec(); Self::MAX_IOVECS];
        let mut count = 0;
        let mut peek = self.c.clone();
        let mut left = len.min(peek.remaining());
        while left > 0 && count < iov.len() {
            let s = peek.head.sub(0, left);
            if s.is_empty() {
                break;
            }
            iov[count] = s.as_iovec();
            count += 1;
            left -= s.len();
            peek.advance(s.len());
        }
        if count == 0 {
            return Ok(0);
        }
        // SAFETY: the first `count` iovecs are sub-regions of the writable half, which
        // the VirtQueue keeps mapped and writable while the chain is processed
        // (IoRegion::new's contract); `count` <= MAX_IOVECS <= IOV_MAX. The kernel
        // writes into them, no Rust reference to guest memory exists.
        let n = unsafe { libc::readv(fd.as_raw_fd(), iov.as_ptr(), count as libc::c_int) };
        let n = usize::try_from(n).map_err(|_| std::io::Error::last_os_error())?;
        Ok(self.c.forward(n, None))
    }

    /// Goes back to the start of the writable half: [`ChainWriter::written`] is 0
    /// again and the next write overwrites what was written (an error response that
    /// replaces a partial answer).
    pub fn rewind(&mut self) {
        self.c.seek(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(buf: &mut [u8]) -> IoRegion {
        // SAFETY: `buf` outlives every use of the region in these tests and no reference
        // to it is used while the region is.
        unsafe { IoRegion::new(buf.as_mut_ptr(), buf.len()) }
    }

    #[test]
    fn write_from_fd_fills_regions_and_counts_only_what_was_read() {
        use std::io::Write;
        use std::os::fd::AsFd;
        let (reader, mut writer) = std::os::unix::net::UnixStream::pair().unwrap();
        writer.write_all(b"0123456").unwrap();
        let mut a = [0u8; 2];
        let mut b = [0u8; 10];
        let regions = [region(&mut a), region(&mut b)];
        let mut w = ChainWriter::new(&regions);
        w.write_bytes(b"x").unwrap();
        // 11 bytes of room, 7 in the pipe: a short read counts 7.
        assert_eq!(w.write_from_fd(reader.as_fd(), 100).unwrap(), 7);
        assert_eq!(w.written(), 8);
        drop(writer);
        assert_eq!(w.write_from_fd(reader.as_fd(), 100).unwrap(), 0);
        assert_eq!(&a, b"x0");
        assert_eq!(&b[..6], b"123456");
    }

    #[test]
    fn write_from_fd_error_leaves_the_writer_unmoved() {
        use std::os::fd::AsFd;
        let writer = std::fs::File::options()
            .write(true)
            .open("/dev/null")
            .unwrap();
        let mut a = [0u8; 4];
        let regions = [region(&mut a)];
        let mut w = ChainWriter::new(&regions);
        // A file opened write-only cannot be read: EBADF.
        assert!(w.write_from_fd(writer.as_fd(), 4).is_err());
        assert_eq!(w.written(), 0);
        assert_eq!(w.write_from_fd(writer.as_fd(), 0).unwrap(), 0);
    }

    #[test]
    fn region_helpers_cross_boundaries() {
        let mut a = [1u8, 2, 3];
        let mut b = [4u8, 5];
        let regions = [region(&mut a), region(&mut b)];
        let mut out = [0u8; 4];
        assert_eq!(read_regions(&regions, 1, &mut out), 4);
        assert_eq!(out, [2, 3, 4, 5]);
        assert_eq!(write_regions(&regions, 2, &[9, 9, 9, 9]), 3);
        let mut sub = Vec::new();
        assert_eq!(slice_regions(&regions, 2, 10, &mut sub), 3);
        assert_eq!(sub.len(), 2);
        assert_eq!(sub[0].len() + sub[1].len(), 3);
        assert_eq!(regions[0].sub(5, 1).len(), 0);
        assert_eq!(a, [1, 2, 9]);
        assert_eq!(b, [9, 9]);
    }

    #[test]
    fn reader_is_bounds_checked_across_regions() {
        let mut a = [1u8, 0, 0];
        let mut b = [0u8, 2, 0, 0, 0];
        let regions = [region(&mut a), region(&mut b)];
        let mut r = ChainReader::new(&regions);
        assert_eq!(r.read_obj::<u32>("x"), Ok(1));
        assert_eq!(r.remaining(), 4);
        assert_eq!(
            r.read_obj::<u64>("y"),
            Err(ChainError::Truncated {
                what: "y",
                needed: 8,
                left: 4
            })
        );
        assert_eq!(r.read_obj::<u32>("z"), Ok(2));
    }

    #[test]
    fn regions_are_taken_without_copying_and_move_the_cursors() {
        let mut a = [1u8, 2, 3];
        let mut b = [4u8, 5, 6, 7];
        let regions = [region(&mut a), region(&mut b)];
        let mut r = ChainReader::new(&regions);
        r.skip(2, "header").unwrap();
        let mut taken = Vec::new();
        assert_eq!(r.take_regions(3, &mut taken), 3);
        assert_eq!(taken, [regions[0].sub(2, 1), regions[1].sub(0, 2)]);
        assert_eq!(r.read_obj::<u8>("after"), Ok(6));
        assert_eq!(r.take_regions(10, &mut taken), 1);
        assert_eq!(
            r.skip(1, "past the end"),
            Err(ChainError::Truncated {
                what: "past the end",
                needed: 1,
                left: 0
            })
        );

        let mut w = ChainWriter::new(&regions);
        w.skip(4).unwrap();
        taken.clear();
        assert_eq!(w.take_regions(10, &mut taken), 3);
        assert_eq!(w.written(), 7);
        assert_eq!(w.skip(1), Err(ChainError::NoRoom { needed: 1, left: 0 }));
        w.rewind();
        assert_eq!(w.written(), 0);
        w.write_obj_pair(&0xaau8, &0xbbu16).unwrap();
        assert_eq!(w.written(), 3);
        assert_eq!(a, [0xaa, 0xbb, 0]);
    }

    #[test]
    fn read_bytes_is_all_or_nothing() {
        let mut a = [1u8, 2];
        let mut b = [3u8];
        let regions = [region(&mut a), region(&mut b)];
        let mut r = ChainReader::new(&regions);
        let mut four = [0u8; 4];
        assert_eq!(
            r.read_bytes(&mut four, "four"),
            Err(ChainError::Truncated {
                what: "four",
                needed: 4,
                left: 3
            })
        );
        assert_eq!(r.remaining(), 3);
        let mut three = [0u8; 3];
        r.read_bytes(&mut three, "three").unwrap();
        assert_eq!(three, [1, 2, 3]);
        assert_eq!(r.remaining(), 0);
    }
}
