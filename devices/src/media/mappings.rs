//! The MMAP mappings a device holds in the shared memory region.
//!
//! A virtio-media `MMAP` maps one buffer plane into the device's shared memory region
//! with the VMM's [`HostMemoryMapper`]; `MUNMAP` of the address it answered removes it,
//! and closing a session removes every mapping the session made. [`ShmMappings`] is
//! that record for a device (the software camera and the V4L2 proxy keep one each):
//! which address maps what, for which session, under the [`MAX_MAPPINGS`] cap.
//!
//! # Hostile input
//!
//! A guest picks the addresses it unmaps: an address that is not a live mapping is
//! refused with `EINVAL` before the VMM's mapper sees it. The cap is checked before any
//! work is done for an `MMAP` (and counted in `err_mapping_limit`); a mapping is
//! recorded only once the VMM's mapper made it, and forgotten only once the mapper
//! removed it, so the record never claims a mapping the region does not hold.

use std::collections::BTreeMap;
use std::os::fd::BorrowedFd;

use super::{Errno, HostMemoryMapper, MediaMetrics, MAX_MAPPINGS};

/// One live mapping: the session that made it and what the device says it maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mapping<T> {
    session: u32,
    what: T,
}

/// The live mappings of one device in the shared memory region, by their offset in it.
///
/// `T` is what a device records about each mapping beyond its session: the camera its
/// buffer index (to report `V4L2_BUF_FLAG_MAPPED`), the proxy nothing (`()`).
#[derive(Debug)]
pub struct ShmMappings<T> {
    /// Who logs (`"camera"`, `"v4l2 proxy"`): the prefix of every log line.
    device: &'static str,
    by_offset: BTreeMap<u64, Mapping<T>>,
}

impl<T: Copy + PartialEq> ShmMappings<T> {
    /// No mappings; `device` names the device in log lines.
    pub fn new(device: &'static str) -> Self {
        ShmMappings {
            device,
            by_offset: BTreeMap::new(),
        }
    }

    /// Number of live mappings.
    pub fn len(&self) -> usize {
        self.by_offset.len()
    }

    /// Whether there is no live mapping.
    pub fn is_empty(&self) -> bool {
        self.by_offset.is_empty()
    }

    /// Refuses a new mapping when the device holds [`MAX_MAPPINGS`] already (`ENOMEM`,
    /// as `mmap(2)` past `vm.max_map_count`), counting it in `metrics`. [`Self::map`]
    /// checks it too; a device calls it first when an `MMAP` costs work before the
    /// mapping (the proxy exports the host buffer).
    pub fn check_room(&self, metrics: &MediaMetrics) -> Result<(), Errno> {
        if self.by_offset.len() < MAX_MAPPINGS {
            return Ok(());
        }
        MediaMetrics::inc(&metrics.err_mapping_limit);
        outboard_protocol::log_limited!(
            log::Level::Warn,
            "{}: MMAP refused: {MAX_MAPPINGS} mappings, the cap",
            self.device
        );
        Err(libc::ENOMEM)
    }

    /// Maps `length` bytes of `buffer` (from its start) into the shared memory region
    /// with `host`, writable if `rw`, and records it for `session` as `what`. Returns
    /// the mapping's offset in the region.
    ///
    /// # Errors
    ///
    /// `ENOMEM` at the cap (see [`Self::check_room`]), or the mapper's errno.
    #[allow(clippy::too_many_arguments)]
    pub fn map<H: HostMemoryMapper + ?Sized>(
        &mut self,
        host: &mut H,
        metrics: &MediaMetrics,
        session: u32,
        what: T,
        buffer: BorrowedFd<'_>,
        length: u64,
        rw: bool,
    ) -> Result<u64, Errno> {
        self.check_room(metrics)?;
        let offset = host.add_mapping(buffer, length, 0, rw)?;
        self.by_offset.insert(offset, Mapping { session, what });
        Ok(offset)
    }

    /// Removes the mapping at `offset` (a guest's `MUNMAP`).
    ///
    /// # Errors
    ///
    /// `EINVAL` when no mapping is at `offset`, or the mapper's errno (the mapping is
    /// then kept).
    pub fn unmap<H: HostMemoryMapper + ?Sized>(
        &mut self,
        host: &mut H,
        offset: u64,
    ) -> Result<(), Errno> {
        if !self.by_offset.contains_key(&offset) {
            return Err(libc::EINVAL);
        }
        host.remove_mapping(offset)?;
        self.by_offset.remove(&offset);
        Ok(())
    }

    /// Removes every mapping of `session` (the session closes). A mapping the mapper
    /// fails to remove is logged and forgotten: the session is gone either way.
    pub fn unmap_session<H: HostMemoryMapper + ?Sized>(&mut self, host: &mut H, session: u32) {
        let offsets: Vec<u64> = self
            .by_offset
            .iter()
            .filter(|(_, m)| m.session == session)
            .map(|(offset, _)| *offset)
            .collect();
        for offset in offsets {
            self.by_offset.remove(&offset);
            if let Err(e) = host.remove_mapping(offset) {
                outboard_protocol::log_limited!(
                    log::Level::Warn,
                    "{}: unmapping {offset:#x} on close: errno {e}",
                    self.device
                );
            }
        }
    }

    /// Whether `session` has a mapping of `what`.
    pub fn is_mapped(&self, session: u32, what: T) -> bool {
        self.by_offset
            .values()
            .any(|m| m.session == session && m.what == what)
    }

    /// Whether `session` has any mapping.
    pub fn session_has_mappings(&self, session: u32) -> bool {
        self.by_offset.values().any(|m| m.session == session)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// A region that hands out consecutive offsets and can be told to fail removals.
    #[derive(Default)]
    struct Region {
        next: u64,
        live: Vec<u64>,
        fail_remove: bool,
    }

    impl HostMemoryMapper for Region {
        fn add_mapping(
            &mut self,
            _: BorrowedFd<'_>,
            len: u64,
            _: u64,
            _: bool,
        ) -> Result<u64, Errno> {
            let at = self.next;
            self.next += len;
            self.live.push(at);
            Ok(at)
        }

        fn remove_mapping(&mut self, offset: u64) -> Result<(), Errno> {
            if self.fail_remove {
                return Err(libc::EIO);
            }
            self.live.retain(|o| *o != offset);
            Ok(())
        }
    }

    fn fd() -> std::fs::File {
        std::fs::File::open("/dev/null").unwrap()
    }

    #[test]
    fn maps_unmaps_and_forgets_a_closed_session() {
        let (mut region, metrics, f) = (Region::default(), MediaMetrics::default(), fd());
        let mut m = ShmMappings::new("test");
        let a = m
            .map(&mut region, &metrics, 1, 7u32, f.as_fd(), 4096, true)
            .unwrap();
        let b = m
            .map(&mut region, &metrics, 2, 7u32, f.as_fd(), 4096, false)
            .unwrap();
        assert_ne!(a, b);
        assert!(m.is_mapped(1, 7) && !m.is_mapped(1, 8) && m.session_has_mappings(2));
        // Only live offsets can be unmapped.
        assert_eq!(m.unmap(&mut region, a + 1), Err(libc::EINVAL));
        m.unmap(&mut region, a).unwrap();
        assert_eq!(m.unmap(&mut region, a), Err(libc::EINVAL));
        m.unmap_session(&mut region, 2);
        assert!(m.is_empty() && region.live.is_empty());
    }

    #[test]
    fn a_failed_unmap_keeps_the_mapping() {
        let (mut region, metrics, f) = (Region::default(), MediaMetrics::default(), fd());
        let mut m = ShmMappings::new("test");
        let a = m
            .map(&mut region, &metrics, 1, (), f.as_fd(), 4096, true)
            .unwrap();
        region.fail_remove = true;
        assert_eq!(m.unmap(&mut region, a), Err(libc::EIO));
        assert_eq!(m.len(), 1);
        // Closing forgets it regardless.
        m.unmap_session(&mut region, 1);
        assert!(m.is_empty());
    }

    #[test]
    fn the_cap_refuses_and_counts() {
        let (mut region, metrics, f) = (Region::default(), MediaMetrics::default(), fd());
        let mut m = ShmMappings::new("test");
        for _ in 0..MAX_MAPPINGS {
            m.map(&mut region, &metrics, 1, (), f.as_fd(), 1, true)
                .unwrap();
        }
        assert_eq!(m.check_room(&metrics), Err(libc::ENOMEM));
        assert_eq!(
            m.map(&mut region, &metrics, 1, (), f.as_fd(), 1, true),
            Err(libc::ENOMEM)
        );
        assert_eq!(metrics.snapshot().err_mapping_limit, 2);
        assert_eq!(region.live.len(), MAX_MAPPINGS);
    }
}
