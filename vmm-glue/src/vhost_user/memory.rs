//! The front-end's memory table, mapped into the daemon.
//!
//! Each region arrives with an fd (a memfd, a file on hugetlbfs or /dev/shm) and the
//! offset of the region in it. A region is mapped shared, read-write, exactly
//! `memory_size` bytes at `mmap_offset`, after checking that the file is that long (a
//! shorter file would make guest accesses past its end fault with SIGBUS). Mappings are
//! reference counted: replacing or removing a region unmaps it as soon as no queue
//! still holds the previous memory snapshot.
//!
//! A file that is not sealed against shrinking (hugetlbfs, /dev/shm) can still be cut
//! short later by the front-end; every mapping is therefore registered with
//! [`super::guard`] for as long as it is mapped, and the table keeps a replaced region
//! (in `retired`) until nothing else holds it, so that it is unregistered before it is
//! unmapped. [`MemoryTable::poisoned`] names a region that was found cut short.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use super::guard::{self, GuardedRange};

use outboard_protocol::vhost_user::VhostUserMemoryRegion;
use outboard_transport::MemoryRegion;
use thiserror::Error;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryMmap, GuestMemoryRegion as _, GuestRegionMmap, MmapRegion,
};

/// Most regions the daemon accepts (advertised with `GET_MAX_MEM_SLOTS`): QEMU's own
/// ceiling for a vhost-user device (`VHOST_USER_MAX_RAM_SLOTS`, 512 where the target has
/// no lower one). Guest RAM takes a handful, but QEMU also puts every `SHMEM_MAP`
/// mapping of every vhost-user device of the VM in every device's table, and does not
/// hold back an `ADD_MEM_REG` beyond the advertised count: four virtio-media devices with
/// GStreamer streaming on each went past 64 (`cargo xtask media-guest`).
pub const MAX_MEM_SLOTS: usize = 512;

/// Largest single region accepted (1 TiB).
pub const MAX_REGION_SIZE: u64 = 1 << 40;

/// Most mappings one table keeps at once: the regions in the table and the replaced ones
/// a queue's memory snapshot still holds (each queue pins a few snapshots, so a
/// front-end that keeps changing its table while kicking could otherwise keep thousands
/// of mappings alive, each one of the process's guard slots). Four times
/// [`MAX_MEM_SLOTS`]; QEMU's busiest tables (`SHMEM_MAP` churn under GStreamer) stay at a
/// few hundred.
pub const MAX_MAPPINGS: usize = 4 * MAX_MEM_SLOTS;

/// Errors of the memory table.
#[cfg_attr(test, remain::sorted)]
#[derive(Debug, Error)]
pub enum MemoryTableError {
    /// The file behind the fd is shorter than the region claims.
    #[error("region at guest address {gpa:#x} needs {need} bytes of its file, which has {have}")]
    FileTooShort {
        /// The region's guest-physical address.
        gpa: u64,
        /// `mmap_offset + memory_size`.
        need: u64,
        /// The file's size.
        have: u64,
    },
    /// The fd could not be examined.
    #[error("cannot stat the fd of region at guest address {gpa:#x}: {source}")]
    Fstat {
        /// The region's guest-physical address.
        gpa: u64,
        /// The OS error.
        source: std::io::Error,
    },
    /// `mmap` failed.
    #[error("cannot map region at guest address {gpa:#x} ({size:#x} bytes at offset {offset:#x}): {reason}")]
    Mmap {
        /// The region's guest-physical address.
        gpa: u64,
        /// Its size.
        size: u64,
        /// The offset in the fd.
        offset: u64,
        /// What vm-memory reported.
        reason: String,
    },
    /// No region matches the one to remove.
    #[error("no region at guest address {gpa:#x} of {size:#x} bytes to remove")]
    NoSuchRegion {
        /// Guest-physical address asked for.
        gpa: u64,
        /// Size asked for.
        size: u64,
    },
    /// Two regions overlap in guest-physical or front-end virtual address space.
    #[error("region at guest address {gpa:#x} overlaps the region at {other:#x}")]
    Overlap {
        /// The new region.
        gpa: u64,
        /// The region it overlaps.
        other: u64,
    },
    /// The region is empty, too large, or its addresses overflow.
    #[error(
        "region at guest address {gpa:#x} has an invalid size {size:#x} or offset {offset:#x}"
    )]
    Range {
        /// The region's guest-physical address.
        gpa: u64,
        /// Its size.
        size: u64,
        /// The offset in the fd.
        offset: u64,
    },
    /// More mappings, replaced ones still in use included, than [`MAX_MAPPINGS`].
    #[error(
        "{count} guest memory mappings (replaced regions a queue still uses included) \
         exceed the limit of {MAX_MAPPINGS}"
    )]
    TooManyMappings {
        /// How many there would be.
        count: usize,
    },
    /// More regions than [`MAX_MEM_SLOTS`].
    #[error("{count} memory regions exceed the limit of {MAX_MEM_SLOTS}")]
    TooManyRegions {
        /// How many there would be.
        count: usize,
    },
    /// The file can shrink and the process's SIGBUS guard table is full: mapping it
    /// unguarded would let the front-end kill the daemon by truncating it.
    #[error(
        "region at guest address {gpa:#x}: its file is not sealed against shrinking and \
         every one of the process's {} guarded mapping slots is in use",
        super::guard::MAX_GUARDED
    )]
    Unguarded {
        /// The region's guest-physical address.
        gpa: u64,
    },
}

/// One mapped region.
#[derive(Debug)]
struct Mapped {
    desc: VhostUserMemoryRegion,
    /// Declared before `region`: unregistered before the mapping can go away.
    guard: Option<GuardedRange>,
    region: Arc<GuestRegionMmap>,
}

/// The guest memory table: what the front-end sent, mapped.
#[derive(Debug, Default)]
pub struct MemoryTable {
    regions: Vec<Mapped>,
    /// Regions no longer in the table that a memory snapshot may still use: kept (and
    /// guarded) until the table holds the last reference.
    retired: Vec<Mapped>,
}

fn end(start: u64, size: u64) -> Option<u64> {
    start.checked_add(size)
}

fn overlaps(a: u64, a_size: u64, b: u64, b_size: u64) -> bool {
    // Sizes are non-zero and the ends do not overflow (checked on entry).
    a < b.saturating_add(b_size) && b < a.saturating_add(a_size)
}

fn map(region: MemoryRegion) -> Result<Mapped, MemoryTableError> {
    let desc = region.region;
    let gpa = desc.guest_phys_addr;
    let (size, offset) = (desc.memory_size, desc.mmap_offset);
    let range_err = || MemoryTableError::Range { gpa, size, offset };
    if size == 0
        || size > MAX_REGION_SIZE
        || end(gpa, size).is_none()
        || end(desc.user_addr, size).is_none()
    {
        return Err(range_err());
    }
    let need = end(offset, size).ok_or_else(range_err)?;
    let len = usize::try_from(size).map_err(|_| range_err())?;
    let file = File::from(region.fd);
    let meta = file
        .metadata()
        .map_err(|source| MemoryTableError::Fstat { gpa, source })?;
    if meta.file_type().is_file() && meta.len() < need {
        return Err(MemoryTableError::FileTooShort {
            gpa,
            need,
            have: meta.len(),
        });
    }
    let sealed = guard::shrink_sealed(&file);
    if !sealed {
        outboard_protocol::log_limited!(
            log::Level::Debug,
            "memory region at {gpa:#x}: the file is not sealed against shrinking; \
             accesses past a later truncation are contained (see the guard module)"
        );
    }
    let mapping = MmapRegion::from_file(FileOffset::new(file, offset), len).map_err(|e| {
        MemoryTableError::Mmap {
            gpa,
            size,
            offset,
            reason: e.to_string(),
        }
    })?;
    let region = GuestRegionMmap::new(mapping, GuestAddress(gpa)).ok_or_else(range_err)?;
    // hugetlbfs reports its huge page size as the block size.
    let page = usize::try_from(meta.blksize()).unwrap_or(4096);
    let guard = guard::required(GuardedRange::register(region.as_ptr(), len, page), sealed)
        .ok_or(MemoryTableError::Unguarded { gpa })?;
    Ok(Mapped {
        desc,
        guard,
        region: Arc::new(region),
    })
}

impl MemoryTable {
    /// An empty table.
    pub fn new() -> Self {
        MemoryTable::default()
    }

    /// Number of regions.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Each region as the front-end described it, with a duplicate of the fd it came
    /// with: what [`MemoryTable::replace`] needs to map the same table in another
    /// process (a live upgrade).
    pub fn handover(&self) -> std::io::Result<Vec<MemoryRegion>> {
        self.regions
            .iter()
            .map(|m| {
                let file = m.region.file_offset().map(|f| f.file()).ok_or_else(|| {
                    std::io::Error::other(format!(
                        "memory region at {:#x} has no file",
                        m.desc.guest_phys_addr
                    ))
                })?;
                Ok(MemoryRegion {
                    region: m.desc,
                    fd: OwnedFd::from(file.try_clone()?),
                })
            })
            .collect()
    }

    fn check_new(&self, m: &Mapped, others: &[Mapped]) -> Result<(), MemoryTableError> {
        let _ = self;
        for o in others {
            if overlaps(
                m.desc.guest_phys_addr,
                m.desc.memory_size,
                o.desc.guest_phys_addr,
                o.desc.memory_size,
            ) || overlaps(
                m.desc.user_addr,
                m.desc.memory_size,
                o.desc.user_addr,
                o.desc.memory_size,
            ) {
                return Err(MemoryTableError::Overlap {
                    gpa: m.desc.guest_phys_addr,
                    other: o.desc.guest_phys_addr,
                });
            }
        }
        Ok(())
    }

    /// `SET_MEM_TABLE`: maps every region and replaces the table (the old mappings go
    /// away once unused). On error the table is unchanged.
    pub fn replace(&mut self, regions: Vec<MemoryRegion>) -> Result<(), MemoryTableError> {
        if regions.len() > MAX_MEM_SLOTS {
            return Err(MemoryTableError::TooManyRegions {
                count: regions.len(),
            });
        }
        self.check_mappings(regions.len())?;
        let mut new: Vec<Mapped> = Vec::with_capacity(regions.len());
        for r in regions {
            let m = map(r)?;
            self.check_new(&m, &new)?;
            new.push(m);
        }
        let old = std::mem::replace(&mut self.regions, new);
        self.retire(old);
        Ok(())
    }

    /// Moves regions out of the table; they stay mapped and guarded while a snapshot
    /// uses them.
    fn retire(&mut self, old: Vec<Mapped>) {
        self.retired.extend(old);
        self.reap();
    }

    /// Unmaps retired regions nobody else holds (unregistering them first).
    pub fn reap(&mut self) {
        self.retired.retain(|m| Arc::strong_count(&m.region) > 1);
    }

    /// The region (current or retired) that an access found cut short, if any: its
    /// guest address, size and the size of its file now.
    pub fn poisoned(&self) -> Option<String> {
        self.regions
            .iter()
            .chain(&self.retired)
            .find(|m| m.guard.as_ref().is_some_and(GuardedRange::poisoned))
            .map(|m| {
                let have = m
                    .region
                    .file_offset()
                    .and_then(|f| f.file().metadata().ok())
                    .map_or_else(|| "unknown".to_string(), |md| format!("{:#x}", md.len()));
                format!(
                    "memory region at guest address {:#x} ({:#x} bytes at offset {:#x} of its \
                     file) was cut short by the front-end: the file has {have} bytes now",
                    m.desc.guest_phys_addr, m.desc.memory_size, m.desc.mmap_offset
                )
            })
    }

    /// `ADD_MEM_REG`: maps and adds one region.
    pub fn add(&mut self, region: MemoryRegion) -> Result<(), MemoryTableError> {
        if self.regions.len() >= MAX_MEM_SLOTS {
            return Err(MemoryTableError::TooManyRegions {
                count: self.regions.len() + 1,
            });
        }
        self.check_mappings(1)?;
        let m = map(region)?;
        self.check_new(&m, &self.regions)?;
        self.regions.push(m);
        Ok(())
    }

    /// Refuses `more` new mappings when the table's mappings (replaced ones a snapshot
    /// still holds included) would exceed [`MAX_MAPPINGS`].
    fn check_mappings(&mut self, more: usize) -> Result<(), MemoryTableError> {
        self.reap();
        let count = self.regions.len() + self.retired.len() + more;
        if count > MAX_MAPPINGS {
            return Err(MemoryTableError::TooManyMappings { count });
        }
        Ok(())
    }

    /// `REM_MEM_REG`: removes the region with this guest address and size (the mmap
    /// offset and fd are not compared, as the spec allows).
    pub fn remove(&mut self, desc: &VhostUserMemoryRegion) -> Result<(), MemoryTableError> {
        let at = self
            .regions
            .iter()
            .position(|m| {
                m.desc.guest_phys_addr == desc.guest_phys_addr
                    && m.desc.memory_size == desc.memory_size
            })
            .ok_or(MemoryTableError::NoSuchRegion {
                gpa: desc.guest_phys_addr,
                size: desc.memory_size,
            })?;
        let old = self.regions.remove(at);
        self.retire(vec![old]);
        Ok(())
    }

    /// Drops every region (each is unmapped once no snapshot holds it).
    pub fn clear(&mut self) {
        let old = std::mem::take(&mut self.regions);
        self.retire(old);
    }

    /// The table as vm-memory guest memory.
    pub fn guest_memory(&self) -> GuestMemoryMmap {
        let mut regions: Vec<Arc<GuestRegionMmap>> =
            self.regions.iter().map(|m| m.region.clone()).collect();
        regions.sort_by_key(|r| r.start_addr());
        // Overlaps were refused on insertion, so this only fails for an empty table.
        GuestMemoryMmap::from_arc_regions(regions).unwrap_or_default()
    }

    /// Translates a front-end virtual address range (as in `SET_VRING_ADDR`) to a
    /// guest-physical address; the whole range must lie in one region.
    pub fn vva_to_gpa(&self, vva: u64, len: u64) -> Option<u64> {
        self.regions.iter().find_map(|m| {
            let off = vva.checked_sub(m.desc.user_addr)?;
            let last = off.checked_add(len)?;
            (last <= m.desc.memory_size).then(|| m.desc.guest_phys_addr + off)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::{Bytes, GuestMemoryBackend};

    fn memfd(len: u64) -> OwnedFd {
        let name = c"outboard-test";
        // SAFETY: memfd_create with a valid C string; returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd is a new descriptor nobody else owns.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let f = File::from(fd);
        f.set_len(len).unwrap();
        OwnedFd::from(f)
    }

    fn region(gpa: u64, size: u64, uva: u64, offset: u64, fd: OwnedFd) -> MemoryRegion {
        MemoryRegion {
            region: VhostUserMemoryRegion::new(gpa, size, uva, offset),
            fd,
        }
    }

    #[test]
    fn maps_regions_at_offsets_and_translates() {
        let fd = memfd(0x3000);
        let mut f = File::from(fd.try_clone().unwrap());
        f.write_all(&[0u8; 0x1000]).unwrap();
        f.write_all(b"hello").unwrap();
        let mut t = MemoryTable::new();
        t.replace(vec![region(0x10000, 0x2000, 0x7f00_0000, 0x1000, fd)])
            .unwrap();
        let mem = t.guest_memory();
        let mut buf = [0u8; 5];
        mem.read_slice(&mut buf, GuestAddress(0x10000)).unwrap();
        assert_eq!(&buf, b"hello");
        assert_eq!(t.vva_to_gpa(0x7f00_0010, 16), Some(0x10010));
        assert_eq!(t.vva_to_gpa(0x7f00_1ff0, 32), None);
        assert_eq!(t.vva_to_gpa(0x6f00_0000, 1), None);
        assert!(mem.address_in_range(GuestAddress(0x11fff)));
        assert!(!mem.address_in_range(GuestAddress(0x12000)));
    }

    #[test]
    fn refuses_short_files_overflow_and_overlap() {
        let mut t = MemoryTable::new();
        let e = t
            .replace(vec![region(0, 0x2000, 0, 0x1000, memfd(0x2000))])
            .unwrap_err();
        assert!(matches!(
            e,
            MemoryTableError::FileTooShort {
                need: 0x3000,
                have: 0x2000,
                ..
            }
        ));
        let e = t
            .replace(vec![region(u64::MAX - 10, 0x1000, 0, 0, memfd(0x1000))])
            .unwrap_err();
        assert!(matches!(e, MemoryTableError::Range { .. }));
        let e = t
            .replace(vec![
                region(0, 0x2000, 0x100000, 0, memfd(0x2000)),
                region(0x1000, 0x2000, 0x200000, 0, memfd(0x2000)),
            ])
            .unwrap_err();
        assert!(matches!(
            e,
            MemoryTableError::Overlap {
                gpa: 0x1000,
                other: 0
            }
        ));
        assert!(t.is_empty());
    }

    #[test]
    fn add_and_remove_regions() {
        let mut t = MemoryTable::new();
        t.add(region(0, 0x1000, 0x100000, 0, memfd(0x1000)))
            .unwrap();
        t.add(region(0x1000, 0x1000, 0x200000, 0, memfd(0x1000)))
            .unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.guest_memory().num_regions(), 2);
        let e = t
            .add(region(0x1800, 0x1000, 0x300000, 0, memfd(0x1000)))
            .unwrap_err();
        assert!(matches!(e, MemoryTableError::Overlap { .. }));
        t.remove(&VhostUserMemoryRegion::new(0, 0x1000, 0, 0))
            .unwrap();
        assert_eq!(t.len(), 1);
        let e = t
            .remove(&VhostUserMemoryRegion::new(0, 0x1000, 0, 0))
            .unwrap_err();
        assert!(matches!(
            e,
            MemoryTableError::NoSuchRegion {
                gpa: 0,
                size: 0x1000
            }
        ));
        for i in 0..(MAX_MEM_SLOTS as u64 - 1) {
            t.add(region(
                0x100000 * (i + 1),
                0x1000,
                0x10000000 * (i + 1),
                0,
                memfd(0x1000),
            ))
            .unwrap();
        }
        let e = t
            .add(region(0x100, 0x100, 0x100, 0, memfd(0x1000)))
            .unwrap_err();
        assert!(matches!(e, MemoryTableError::TooManyRegions { .. }));
    }

    /// A front-end that keeps replacing regions while queues hold snapshots of the old
    /// ones cannot make the table keep more than MAX_MAPPINGS mappings (each a guard slot
    /// and an fd of the process); once the snapshots let go, the table serves again.
    #[test]
    fn replaced_regions_a_snapshot_holds_count_against_the_mapping_cap() {
        // Every mapping keeps its file open: room for MAX_MAPPINGS of them.
        use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
        let max = getrlimit(Resource::Nofile).maximum;
        let current = Some(max.unwrap_or(u64::MAX).min(1 << 16));
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current,
                maximum: max,
            },
        )
        .unwrap();
        let mut t = MemoryTable::new();
        let mut snapshots = Vec::new();
        let desc = VhostUserMemoryRegion::new(0, 0x1000, 0x100000, 0);
        for _ in 0..MAX_MAPPINGS {
            t.add(region(0, 0x1000, 0x100000, 0, memfd(0x1000)))
                .unwrap();
            // A queue pops a chain: its snapshot holds the region.
            snapshots.push(t.guest_memory());
            t.remove(&desc).unwrap();
        }
        let e = t
            .add(region(0, 0x1000, 0x100000, 0, memfd(0x1000)))
            .unwrap_err();
        assert!(
            matches!(e, MemoryTableError::TooManyMappings { count } if count == MAX_MAPPINGS + 1),
            "{e}"
        );
        let e = t
            .replace(vec![region(0, 0x1000, 0x100000, 0, memfd(0x1000))])
            .unwrap_err();
        assert!(matches!(e, MemoryTableError::TooManyMappings { .. }), "{e}");
        assert!(t.is_empty());
        snapshots.truncate(10);
        t.add(region(0, 0x1000, 0x100000, 0, memfd(0x1000)))
            .unwrap();
        assert_eq!(t.retired.len(), 10);
    }
}
