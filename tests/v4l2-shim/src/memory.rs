//! The shim's memory: the process's own address space plays both guest memory (USERPTR
//! buffers, given to the device as SG lists of user addresses) and the device's shared
//! memory region (MMAP buffers, mapped at their own address: `driver_addr` is the
//! address). Every access to user memory goes through `process_vm_readv`/`writev` on
//! the process itself, so a bad pointer is an `EFAULT`, never a crash, as with the
//! kernel's `copy_from_user`.

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::os::fd::{AsRawFd, BorrowedFd};

use outboard_devices::media::{Errno, GuestMemoryMapper, GuestMemoryRange, HostMemoryMapper};
use outboard_protocol::media::SgEntry;

use crate::real;

/// The page size the SG lists are split at (the guest driver pins user pages).
pub const PAGE: u64 = 4096;

fn iovec(addr: u64, len: usize) -> libc::iovec {
    libc::iovec {
        iov_base: addr as *mut c_void,
        iov_len: len,
    }
}

/// Copies `len` bytes from user address `addr`.
pub fn user_read(addr: u64, len: usize) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; len];
    if len == 0 {
        return Ok(buf);
    }
    let local = iovec(buf.as_mut_ptr() as u64, len);
    let remote = iovec(addr, len);
    // SAFETY: `local` describes `buf`, owned here and `len` bytes long; the kernel
    // checks the remote range and fails with EFAULT instead of faulting.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    if n != len as isize {
        return Err(libc::EFAULT);
    }
    Ok(buf)
}

/// Copies `data` to user address `addr`.
pub fn user_write(addr: u64, data: &[u8]) -> Result<(), Errno> {
    if data.is_empty() {
        return Ok(());
    }
    let local = iovec(data.as_ptr() as u64, data.len());
    let remote = iovec(addr, data.len());
    // SAFETY: `local` describes `data` (only read by the kernel); the remote range is
    // checked by the kernel, which fails with EFAULT instead of faulting.
    let n = unsafe { libc::process_vm_writev(libc::getpid(), &local, 1, &remote, 1, 0) };
    if n != data.len() as isize {
        return Err(libc::EFAULT);
    }
    Ok(())
}

/// Fails with `EFAULT` unless every page of `[addr, addr + len)` is mapped (what the
/// guest driver's `get_user_pages` would check).
fn check_mapped(addr: u64, len: u64) -> Result<(), Errno> {
    let start = addr & !(PAGE - 1);
    let end = addr
        .checked_add(len)
        .and_then(|e| e.checked_add(PAGE - 1))
        .ok_or(libc::EFAULT)?
        & !(PAGE - 1);
    if addr == 0 || end <= start {
        return Err(libc::EFAULT);
    }
    let pages = usize::try_from((end - start) / PAGE).map_err(|_| libc::EFAULT)?;
    let mut vec = vec![0u8; pages];
    // SAFETY: `vec` has one byte per page of the range, as mincore(2) requires; the
    // range itself is only looked up, not accessed.
    let r = unsafe {
        libc::mincore(
            start as *mut c_void,
            (end - start) as usize,
            vec.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(libc::EFAULT);
    }
    Ok(())
}

/// The SG list the guest driver would build for the user buffer `[addr, addr + len)`:
/// one entry per page (or part of a page).
pub fn user_sgs(addr: u64, len: u32) -> Result<Vec<SgEntry>, Errno> {
    check_mapped(addr, len.into())?;
    let mut out = Vec::new();
    let mut pos = addr;
    let end = addr + u64::from(len);
    while pos < end {
        let next = ((pos / PAGE) + 1) * PAGE;
        let chunk = next.min(end) - pos;
        out.push(SgEntry {
            start: pos,
            len: chunk as u32,
            reserved: 0,
        });
        pos += chunk;
    }
    Ok(out)
}

/// USERPTR memory: "guest physical" addresses are this process's virtual addresses.
#[derive(Debug, Default)]
pub struct ProcessMemory;

/// A linear view of user memory given as an SG list.
#[derive(Debug)]
pub struct ProcessRange {
    sgs: Vec<SgEntry>,
    len: usize,
}

impl ProcessRange {
    /// The remote iovecs covering `[offset, offset + len)`.
    fn iovecs(&self, offset: usize, len: usize) -> Vec<libc::iovec> {
        let mut out = Vec::new();
        let mut skip = offset;
        let mut left = len;
        for sg in &self.sgs {
            if left == 0 {
                break;
            }
            let sg_len = sg.len as usize;
            if skip >= sg_len {
                skip -= sg_len;
                continue;
            }
            let n = (sg_len - skip).min(left);
            out.push(iovec(sg.start + skip as u64, n));
            left -= n;
            skip = 0;
        }
        out
    }
}

impl GuestMemoryRange for ProcessRange {
    fn len(&self) -> usize {
        self.len
    }

    fn write_at(&self, offset: usize, src: &[u8]) -> usize {
        let n = src.len().min(self.len.saturating_sub(offset));
        let remote = self.iovecs(offset, n);
        let local = iovec(src.as_ptr() as u64, n);
        // SAFETY: `local` describes the first `n` bytes of `src` (only read); the remote
        // ranges are checked by the kernel, which fails with EFAULT instead of faulting.
        let r = unsafe {
            libc::process_vm_writev(
                libc::getpid(),
                &local,
                1,
                remote.as_ptr(),
                remote.len() as libc::c_ulong,
                0,
            )
        };
        usize::try_from(r).unwrap_or(0)
    }

    fn read_at(&self, offset: usize, dst: &mut [u8]) -> usize {
        let n = dst.len().min(self.len.saturating_sub(offset));
        let remote = self.iovecs(offset, n);
        let local = iovec(dst.as_mut_ptr() as u64, n);
        // SAFETY: `local` describes the first `n` bytes of `dst`, borrowed mutably here;
        // the kernel checks the remote ranges.
        let r = unsafe {
            libc::process_vm_readv(
                libc::getpid(),
                &local,
                1,
                remote.as_ptr(),
                remote.len() as libc::c_ulong,
                0,
            )
        };
        usize::try_from(r).unwrap_or(0)
    }
}

impl GuestMemoryMapper for ProcessMemory {
    type Mapping<'m> = ProcessRange;

    fn new_mapping(&self, sgs: &[SgEntry]) -> Result<ProcessRange, Errno> {
        let mut len = 0usize;
        for sg in sgs {
            check_mapped(sg.start, sg.len.into())?;
            len = len.saturating_add(sg.len as usize);
        }
        Ok(ProcessRange {
            sgs: sgs.to_vec(),
            len,
        })
    }
}

/// MMAP memory: the device's buffers are mapped into this process; the "shared memory
/// offset" is the mapping's address.
#[derive(Debug, Default)]
pub struct ProcessShm {
    maps: BTreeMap<u64, u64>,
}

impl HostMemoryMapper for ProcessShm {
    fn add_mapping(
        &mut self,
        buffer: BorrowedFd<'_>,
        length: u64,
        offset: u64,
        rw: bool,
    ) -> Result<u64, Errno> {
        let prot = libc::PROT_READ | if rw { libc::PROT_WRITE } else { 0 };
        let len = usize::try_from(length).map_err(|_| libc::EINVAL)?;
        let off = libc::off_t::try_from(offset).map_err(|_| libc::EINVAL)?;
        // SAFETY: a new shared mapping of the device's memfd at an address the kernel
        // picks: no existing memory is affected.
        let addr = unsafe {
            real::mmap()(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                buffer.as_raw_fd(),
                off,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(real::errno());
        }
        self.maps.insert(addr as u64, length);
        Ok(addr as u64)
    }

    fn remove_mapping(&mut self, shm_offset: u64) -> Result<(), Errno> {
        let len = self.maps.remove(&shm_offset).ok_or(libc::EINVAL)?;
        // SAFETY: `shm_offset` is the address of a mapping made by `add_mapping` of
        // `len` bytes, removed from the table so it is unmapped once; the client was
        // told (MUNMAP, close) that it is gone.
        let r = unsafe { real::munmap()(shm_offset as *mut c_void, len as usize) };
        if r != 0 {
            return Err(real::errno());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_memory_is_checked_not_trusted() {
        let mut data = vec![7u8; 3 * PAGE as usize];
        let addr = data.as_mut_ptr() as u64;
        assert_eq!(user_read(addr + 5, 10), Ok(vec![7u8; 10]));
        // Page zero is never mapped: EFAULT, no crash.
        assert_eq!(user_read(8, 4), Err(libc::EFAULT));
        assert_eq!(user_write(8, &[1, 2]), Err(libc::EFAULT));
        assert_eq!(user_sgs(0, 16), Err(libc::EFAULT));
        assert_eq!(user_sgs(u64::MAX - 4, 16), Err(libc::EFAULT));
        // SG entries never cross a page boundary and cover the range exactly.
        let start = addr + 100;
        let len = 2 * PAGE as u32;
        let sgs = user_sgs(start, len).unwrap();
        assert_eq!(sgs.iter().map(|s| s.len).sum::<u32>(), len);
        assert_eq!(sgs[0].start, start);
        for s in &sgs {
            assert_eq!(s.start / PAGE, (s.start + u64::from(s.len) - 1) / PAGE);
        }
        // A range built from them reads and writes through, bounded by its length.
        let range = ProcessMemory.new_mapping(&sgs).unwrap();
        assert_eq!(range.write_at(PAGE as usize - 50, &[9u8; 100]), 100);
        let mut back = [0u8; 100];
        assert_eq!(range.read_at(PAGE as usize - 50, &mut back), 100);
        assert_eq!(back, [9u8; 100]);
        assert_eq!(range.write_at(len as usize - 1, &[1, 2, 3]), 1);
        assert_eq!(data[100 + PAGE as usize - 50], 9);
    }
}
