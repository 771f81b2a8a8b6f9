//! memfd-backed buffers for MMAP memory.
//!
//! A buffer's size is rounded up to the page size: the whole memfd is what a front-end
//! maps into the guest's shared memory region, and QEMU refuses a mapping whose backing
//! fd is smaller than the page-rounded length.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;

use rustix::fs::{memfd_create, MemfdFlags};

use super::page_align;

/// A sealed-size, page-aligned memfd.
#[derive(Debug)]
pub struct MemfdBuffer {
    file: File,
    size: u64,
}

impl MemfdBuffer {
    /// A zero-filled buffer of at least `len` bytes (rounded up to the page size).
    pub fn new(name: &str, len: u64) -> io::Result<Self> {
        let size =
            page_align(len.max(1)).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let fd = memfd_create(name, MemfdFlags::CLOEXEC)?;
        let file = File::from(fd);
        file.set_len(size)?;
        Ok(MemfdBuffer { file, size })
    }

    /// The buffer's size (a page multiple).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Writes `data` at `offset` (fails when it does not fit).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= self.size)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        debug_assert!(end <= self.size);
        self.file.write_all_at(data, offset)
    }

    /// Reads into `data` from `offset` (fails when it does not fit).
    pub fn read_at(&self, offset: u64, data: &mut [u8]) -> io::Result<()> {
        offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= self.size)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        self.file.read_exact_at(data, offset)
    }
}

impl AsFd for MemfdBuffer {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_page_aligned_and_bounded() {
        let b = MemfdBuffer::new("t", 4097).unwrap();
        assert_eq!(b.size(), 8192);
        assert_eq!(
            File::from(b.as_fd().try_clone_to_owned().unwrap())
                .metadata()
                .unwrap()
                .len(),
            8192
        );
        b.write_at(8190, &[1, 2]).unwrap();
        assert!(b.write_at(8191, &[1, 2]).is_err());
        assert!(b.write_at(u64::MAX, &[1]).is_err());
        let mut out = [0u8; 2];
        b.read_at(8190, &mut out).unwrap();
        assert_eq!(out, [1, 2]);
    }
}
