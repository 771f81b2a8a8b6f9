//! Message bodies.
//!
//! Every body is `#[repr(C)]` (with explicit padding fields) or `#[repr(C, packed)]`
//! where the spec's layout has no natural alignment, so `size_of` equals the wire size;
//! tests pin every size and offset.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::{MAX_CONFIG_SIZE, MAX_MEM_TABLE_REGIONS, MAX_SHMEM_REGIONS};
use crate::{check_zero, ProtocolError, Result, Validate};

/// A body that is a single `u64` (features, status, queue count, ...).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct VhostUserU64 {
    /// The value.
    pub value: u64,
}

impl VhostUserU64 {
    /// Wraps a value.
    pub const fn new(value: u64) -> Self {
        VhostUserU64 { value }
    }
}

impl Validate for VhostUserU64 {
    fn validate(&self) -> Result<()> {
        Ok(())
    }
}

/// Empty body (size 0).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct VhostUserEmpty;

impl Validate for VhostUserEmpty {
    fn validate(&self) -> Result<()> {
        Ok(())
    }
}

/// The 8-byte head of a `SET_MEM_TABLE` body; `num_regions` [`VhostUserMemoryRegion`]s
/// follow it.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct VhostUserMemory {
    /// Number of regions that follow (1 to 8).
    pub num_regions: u32,
    /// Padding, must be zero.
    pub padding: u32,
}

impl VhostUserMemory {
    /// A memory table head for `num_regions` regions.
    pub const fn new(num_regions: u32) -> Self {
        VhostUserMemory {
            num_regions,
            padding: 0,
        }
    }

    /// Total body size for this number of regions.
    pub fn body_size(&self) -> usize {
        core::mem::size_of::<Self>()
            + self.num_regions as usize * core::mem::size_of::<VhostUserMemoryRegion>()
    }
}

impl Validate for VhostUserMemory {
    fn validate(&self) -> Result<()> {
        if self.num_regions == 0 {
            return Err(ProtocolError::Zero("memory table region count"));
        }
        if self.num_regions as usize > MAX_MEM_TABLE_REGIONS {
            return Err(ProtocolError::OutOfBounds {
                what: "memory table region count",
                value: self.num_regions.into(),
                limit: MAX_MEM_TABLE_REGIONS as u64,
            });
        }
        check_zero("memory table padding", self.padding.into())
    }
}

/// One guest memory region (32 bytes).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct VhostUserMemoryRegion {
    /// Guest physical address of the region.
    pub guest_phys_addr: u64,
    /// Size of the region in bytes.
    pub memory_size: u64,
    /// The front-end's virtual address of the region ("user address").
    pub user_addr: u64,
    /// Offset of the region within the attached fd.
    pub mmap_offset: u64,
}

impl VhostUserMemoryRegion {
    /// A region.
    pub const fn new(
        guest_phys_addr: u64,
        memory_size: u64,
        user_addr: u64,
        mmap_offset: u64,
    ) -> Self {
        VhostUserMemoryRegion {
            guest_phys_addr,
            memory_size,
            user_addr,
            mmap_offset,
        }
    }
}

fn validate_region(guest: u64, size: u64, user: u64, offset: u64) -> Result<()> {
    if size == 0 {
        return Err(ProtocolError::Zero("memory region size"));
    }
    for (what, start) in [
        ("memory region guest address + size", guest),
        ("memory region user address + size", user),
        ("memory region mmap offset + size", offset),
    ] {
        if start.checked_add(size).is_none() {
            return Err(ProtocolError::OutOfBounds {
                what,
                value: start,
                limit: u64::MAX - size,
            });
        }
    }
    Ok(())
}

impl Validate for VhostUserMemoryRegion {
    fn validate(&self) -> Result<()> {
        validate_region(
            self.guest_phys_addr,
            self.memory_size,
            self.user_addr,
            self.mmap_offset,
        )
    }
}

/// Body of `ADD_MEM_REG`/`REM_MEM_REG`: 8 bytes of padding and one region (40 bytes).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct VhostUserSingleMemoryRegion {
    /// Padding, must be zero.
    pub padding: u64,
    /// The region.
    pub region: VhostUserMemoryRegion,
}

impl VhostUserSingleMemoryRegion {
    /// Wraps a region.
    pub const fn new(region: VhostUserMemoryRegion) -> Self {
        VhostUserSingleMemoryRegion { padding: 0, region }
    }
}

impl Validate for VhostUserSingleMemoryRegion {
    fn validate(&self) -> Result<()> {
        check_zero("single memory region padding", self.padding)?;
        self.region.validate()
    }
}

/// Vring state: index and a number (size, base index, enable flag, ...) (8 bytes).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct VhostUserVringState {
    /// Ring index.
    pub index: u32,
    /// The number.
    pub num: u32,
}

impl VhostUserVringState {
    /// A state.
    pub const fn new(index: u32, num: u32) -> Self {
        VhostUserVringState { index, num }
    }
}

impl Validate for VhostUserVringState {
    /// Ring indexes are checked against the device by the receiver; here the index must
    /// fit the 8 bits the kick/call/err messages can carry.
    fn validate(&self) -> Result<()> {
        if self.index > super::VRING_IDX_MASK as u32 {
            return Err(ProtocolError::OutOfBounds {
                what: "vring index",
                value: self.index.into(),
                limit: super::VRING_IDX_MASK,
            });
        }
        Ok(())
    }
}

bitflags::bitflags! {
    /// Flags of [`VhostUserVringAddr`].
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct VhostUserVringAddrFlags: u32 {
        /// `VHOST_VRING_F_LOG`: log writes to the used ring.
        const LOG = 1 << 0;
    }
}

/// Vring addresses (`struct vhost_vring_addr`, 40 bytes).
///
/// The spec's table lists a "size" column between flags and the descriptor address;
/// the C structure it names (`struct vhost_vring_addr`) has no such field, and every
/// implementation sends 40 bytes. This follows the C structure.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct VhostUserVringAddr {
    /// Ring index.
    pub index: u32,
    /// [`VhostUserVringAddrFlags`].
    pub flags: u32,
    /// Descriptor table address (16-byte aligned).
    pub descriptor: u64,
    /// Used ring address (4-byte aligned).
    pub used: u64,
    /// Available ring address (2-byte aligned).
    pub available: u64,
    /// Guest address for used-ring logging.
    pub log: u64,
}

impl Validate for VhostUserVringAddr {
    fn validate(&self) -> Result<()> {
        VhostUserVringState::new(self.index, 0).validate()?;
        let unknown = self.flags & !VhostUserVringAddrFlags::all().bits();
        if unknown != 0 {
            return Err(ProtocolError::Unknown {
                what: "vring address flags",
                value: unknown.into(),
            });
        }
        for (what, value, align) in [
            ("vring descriptor table address", self.descriptor, 16),
            ("vring used ring address", self.used, 4),
            ("vring available ring address", self.available, 2),
        ] {
            if value % align != 0 {
                return Err(ProtocolError::Unaligned { what, value, align });
            }
        }
        Ok(())
    }
}

/// How a `SET_CONFIG` write is meant (the spec's `flags` of the config body).
///
/// The spec defines values, not bits: 0 for writes of writable fields by the
/// front-end, 1 for writes during live migration. (The rust-vmm `vhost` crate treats
/// them as bits 0x1/0x2.)
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VhostUserConfigFlags {
    /// `VHOST_SET_CONFIG_TYPE_FRONTEND`: a write of writable fields.
    Frontend = 0,
    /// `VHOST_SET_CONFIG_TYPE_MIGRATION`: a write during live migration.
    Migration = 1,
}

/// The 12-byte head of a `GET_CONFIG`/`SET_CONFIG` body; `size` bytes of config space
/// follow it.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct VhostUserConfig {
    /// Offset in the device's config space.
    pub offset: u32,
    /// Bytes of config space that follow.
    pub size: u32,
    /// A [`VhostUserConfigFlags`] value.
    pub flags: u32,
}

impl VhostUserConfig {
    /// A config head.
    pub const fn new(offset: u32, size: u32, flags: VhostUserConfigFlags) -> Self {
        VhostUserConfig {
            offset,
            size,
            flags: flags as u32,
        }
    }

    /// The total body size (head plus payload).
    pub fn body_size(&self) -> usize {
        core::mem::size_of::<Self>() + self.size as usize
    }
}

impl Validate for VhostUserConfig {
    fn validate(&self) -> Result<()> {
        if self.size == 0 {
            return Err(ProtocolError::Zero("config size"));
        }
        let end = self.offset.saturating_add(self.size);
        if end > MAX_CONFIG_SIZE {
            return Err(ProtocolError::OutOfBounds {
                what: "config offset + size",
                value: u64::from(self.offset) + u64::from(self.size),
                limit: MAX_CONFIG_SIZE.into(),
            });
        }
        if self.flags > VhostUserConfigFlags::Migration as u32 {
            return Err(ProtocolError::Unknown {
                what: "config flags",
                value: self.flags.into(),
            });
        }
        Ok(())
    }
}

/// Inflight tracking area (`VhostUserInflight`, 24 bytes: the C structure is not packed,
/// so it ends in 4 bytes of padding).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct VhostUserInflight {
    /// Size of the area.
    pub mmap_size: u64,
    /// Offset of the area in the fd.
    pub mmap_offset: u64,
    /// Number of queues.
    pub num_queues: u16,
    /// Queue size.
    pub queue_size: u16,
    /// Trailing C padding, ignored (senders zero it).
    pub padding: u32,
}

impl Validate for VhostUserInflight {
    fn validate(&self) -> Result<()> {
        if self.num_queues == 0 {
            return Err(ProtocolError::Zero("inflight queue count"));
        }
        if self.queue_size == 0 {
            return Err(ProtocolError::Zero("inflight queue size"));
        }
        if self.mmap_offset.checked_add(self.mmap_size).is_none() {
            return Err(ProtocolError::OutOfBounds {
                what: "inflight mmap offset + size",
                value: self.mmap_offset,
                limit: u64::MAX - self.mmap_size,
            });
        }
        Ok(())
    }
}

/// Dirty log description (16 bytes).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct VhostUserLog {
    /// Size of the log area.
    pub mmap_size: u64,
    /// Offset of the log in the fd.
    pub mmap_offset: u64,
}

impl Validate for VhostUserLog {
    fn validate(&self) -> Result<()> {
        if self.mmap_size == 0 {
            return Err(ProtocolError::Zero("log size"));
        }
        if self.mmap_offset.checked_add(self.mmap_size).is_none() {
            return Err(ProtocolError::OutOfBounds {
                what: "log mmap offset + size",
                value: self.mmap_offset,
                limit: u64::MAX - self.mmap_size,
            });
        }
        Ok(())
    }
}

/// IOTLB access permission (`perm` of [`VhostUserIotlb`]).
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IotlbPerm {
    /// No access.
    None = 0,
    /// Read only.
    Read = 1,
    /// Write only.
    Write = 2,
    /// Read and write.
    ReadWrite = 3,
}

/// IOTLB message type (`type` of [`VhostUserIotlb`]).
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IotlbType {
    /// A translation is missing.
    Miss = 1,
    /// Add a translation.
    Update = 2,
    /// Remove a translation.
    Invalidate = 3,
    /// An access failed.
    AccessFail = 4,
}

/// IOTLB message (`struct vhost_iotlb_msg`, 32 bytes with trailing padding).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct VhostUserIotlb {
    /// I/O virtual address.
    pub iova: u64,
    /// Size of the mapping.
    pub size: u64,
    /// User address.
    pub user_addr: u64,
    /// An [`IotlbPerm`] value.
    pub perm: u8,
    /// An [`IotlbType`] value.
    pub msg_type: u8,
    /// Trailing C padding.
    pub padding: [u8; 6],
}

impl VhostUserIotlb {
    /// The decoded permission.
    pub fn perm(&self) -> Result<IotlbPerm> {
        Ok(match self.perm {
            0 => IotlbPerm::None,
            1 => IotlbPerm::Read,
            2 => IotlbPerm::Write,
            3 => IotlbPerm::ReadWrite,
            v => {
                return Err(ProtocolError::Unknown {
                    what: "IOTLB permission",
                    value: v.into(),
                })
            }
        })
    }

    /// The decoded message type.
    pub fn msg_type(&self) -> Result<IotlbType> {
        Ok(match self.msg_type {
            1 => IotlbType::Miss,
            2 => IotlbType::Update,
            3 => IotlbType::Invalidate,
            4 => IotlbType::AccessFail,
            v => {
                return Err(ProtocolError::Unknown {
                    what: "IOTLB message type",
                    value: v.into(),
                })
            }
        })
    }
}

impl Validate for VhostUserIotlb {
    fn validate(&self) -> Result<()> {
        self.perm()?;
        let ty = self.msg_type()?;
        if ty == IotlbType::Update && self.size == 0 {
            return Err(ProtocolError::Zero("IOTLB update size"));
        }
        if self.iova.checked_add(self.size).is_none() {
            return Err(ProtocolError::OutOfBounds {
                what: "IOTLB iova + size",
                value: self.iova,
                limit: u64::MAX - self.size,
            });
        }
        Ok(())
    }
}

/// Vring area description for `VRING_HOST_NOTIFIER_MSG` (24 bytes).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct VhostUserVringArea {
    /// Ring index (bits 0-7) and NOFD flag (bit 8), as in the kick/call messages.
    pub u64_: u64,
    /// Size of the area.
    pub size: u64,
    /// Offset of the area in the fd.
    pub offset: u64,
}

impl Validate for VhostUserVringArea {
    fn validate(&self) -> Result<()> {
        super::parse_vring_fd_u64(self.u64_)?;
        if self.offset.checked_add(self.size).is_none() {
            return Err(ProtocolError::OutOfBounds {
                what: "vring area offset + size",
                value: self.offset,
                limit: u64::MAX - self.size,
            });
        }
        Ok(())
    }
}

/// A shared object's UUID (16 bytes) for `GET_SHARED_OBJECT` and `SHARED_OBJECT_*`.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct VhostUserShared {
    /// The UUID bytes, in RFC 4122 order.
    pub uuid: [u8; 16],
}

impl Validate for VhostUserShared {
    /// The nil and the max UUID name no object.
    fn validate(&self) -> Result<()> {
        if self.uuid == [0; 16] {
            return Err(ProtocolError::Zero("shared object UUID"));
        }
        if self.uuid == [0xff; 16] {
            return Err(ProtocolError::Unknown {
                what: "shared object UUID (max UUID)",
                value: u64::MAX,
            });
        }
        Ok(())
    }
}

/// Direction of a device state transfer.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransferDirection {
    /// The back-end writes its state into the fd.
    Save = 0,
    /// The back-end reads its state from the fd.
    Load = 1,
}

/// Migration phase of a device state transfer.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransferPhase {
    /// The device is stopped (the only phase the spec defines).
    Stopped = 0,
}

/// Body of `SET_DEVICE_STATE_FD` (8 bytes).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct VhostUserTransferDeviceState {
    /// A [`TransferDirection`] value.
    pub direction: u32,
    /// A [`TransferPhase`] value.
    pub phase: u32,
}

impl VhostUserTransferDeviceState {
    /// A transfer description.
    pub const fn new(direction: TransferDirection, phase: TransferPhase) -> Self {
        VhostUserTransferDeviceState {
            direction: direction as u32,
            phase: phase as u32,
        }
    }

    /// The decoded direction.
    pub fn direction(&self) -> Result<TransferDirection> {
        match self.direction {
            0 => Ok(TransferDirection::Save),
            1 => Ok(TransferDirection::Load),
            v => Err(ProtocolError::Unknown {
                what: "device state transfer direction",
                value: v.into(),
            }),
        }
    }

    /// The decoded phase.
    pub fn phase(&self) -> Result<TransferPhase> {
        match self.phase {
            0 => Ok(TransferPhase::Stopped),
            v => Err(ProtocolError::Unknown {
                what: "device state transfer phase",
                value: v.into(),
            }),
        }
    }
}

impl Validate for VhostUserTransferDeviceState {
    fn validate(&self) -> Result<()> {
        self.direction()?;
        self.phase()?;
        Ok(())
    }
}

/// Reply of `GET_SHMEM_CONFIG` (2056 bytes): the VIRTIO shared memory regions and their
/// sizes, indexed by shmid.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct VhostUserShmemConfig {
    /// Number of regions in use.
    pub num_regions: u32,
    /// Padding, must be zero.
    pub padding: u32,
    /// Size of each region, indexed by shmid; zero for an unused id.
    pub mem_size: [u64; MAX_SHMEM_REGIONS],
}

impl Default for VhostUserShmemConfig {
    fn default() -> Self {
        VhostUserShmemConfig {
            num_regions: 0,
            padding: 0,
            mem_size: [0; MAX_SHMEM_REGIONS],
        }
    }
}

impl VhostUserShmemConfig {
    /// A config with the given region sizes (index = shmid). Sizes past 256 are dropped;
    /// `num_regions` counts the non-zero sizes.
    pub fn new(sizes: &[u64]) -> Self {
        let mut config = Self::default();
        for (slot, size) in config.mem_size.iter_mut().zip(sizes) {
            *slot = *size;
        }
        config.num_regions = config.mem_size.iter().filter(|s| **s != 0).count() as u32;
        config
    }
}

impl Validate for VhostUserShmemConfig {
    fn validate(&self) -> Result<()> {
        if self.num_regions as usize > MAX_SHMEM_REGIONS {
            return Err(ProtocolError::OutOfBounds {
                what: "shmem region count",
                value: self.num_regions.into(),
                limit: MAX_SHMEM_REGIONS as u64,
            });
        }
        check_zero("shmem config padding", self.padding.into())?;
        let used = self.mem_size.iter().filter(|s| **s != 0).count();
        if used != self.num_regions as usize {
            return Err(ProtocolError::OutOfBounds {
                what: "shmem regions with a size (must equal num_regions)",
                value: used as u64,
                limit: self.num_regions.into(),
            });
        }
        Ok(())
    }
}

bitflags::bitflags! {
    /// Flags of [`VhostUserMMap`].
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct VhostUserMMapFlags: u64 {
        /// `VHOST_USER_FLAG_MAP_RW`: map writable (read-only otherwise).
        const RW = 1 << 0;
    }
}

/// Body of `SHMEM_MAP`/`SHMEM_UNMAP` (40 bytes).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct VhostUserMMap {
    /// VIRTIO shared memory region id.
    pub shmid: u8,
    /// Padding.
    pub padding: [u8; 7],
    /// Offset in the attached fd.
    pub fd_offset: u64,
    /// Offset in the shared memory region.
    pub shm_offset: u64,
    /// Length of the mapping.
    pub len: u64,
    /// [`VhostUserMMapFlags`].
    pub flags: u64,
}

impl VhostUserMMap {
    /// A map (or unmap) request.
    pub const fn new(
        shmid: u8,
        fd_offset: u64,
        shm_offset: u64,
        len: u64,
        flags: VhostUserMMapFlags,
    ) -> Self {
        VhostUserMMap {
            shmid,
            padding: [0; 7],
            fd_offset,
            shm_offset,
            len,
            flags: flags.bits(),
        }
    }
}

impl Validate for VhostUserMMap {
    fn validate(&self) -> Result<()> {
        if self.len == 0 {
            return Err(ProtocolError::Zero("shmem mapping length"));
        }
        let unknown = self.flags & !VhostUserMMapFlags::all().bits();
        if unknown != 0 {
            return Err(ProtocolError::Unknown {
                what: "shmem map flags",
                value: unknown,
            });
        }
        for (what, start) in [
            ("shmem map fd offset + len", self.fd_offset),
            ("shmem map shm offset + len", self.shm_offset),
        ] {
            if start.checked_add(self.len).is_none() {
                return Err(ProtocolError::OutOfBounds {
                    what,
                    value: start,
                    limit: u64::MAX - self.len,
                });
            }
        }
        Ok(())
    }
}

/// crosvm's `GPU_MAP` body (64 bytes, `#[repr(C, packed)]` in crosvm; naturally aligned
/// here, same bytes).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct VhostUserGpuMapMsg {
    /// Shared memory region id.
    pub shmid: u8,
    /// Padding.
    pub padding: [u8; 7],
    /// Offset in the shared memory region.
    pub shm_offset: u64,
    /// Length of the mapping.
    pub len: u64,
    /// Index of the memory type.
    pub memory_idx: u32,
    /// Type of the share handle.
    pub handle_type: u32,
    /// Device UUID.
    pub device_uuid: [u8; 16],
    /// Driver UUID.
    pub driver_uuid: [u8; 16],
}

impl Validate for VhostUserGpuMapMsg {
    fn validate(&self) -> Result<()> {
        if self.len == 0 {
            return Err(ProtocolError::Zero("GPU map length"));
        }
        if self.shm_offset.checked_add(self.len).is_none() {
            return Err(ProtocolError::OutOfBounds {
                what: "GPU map shm offset + len",
                value: self.shm_offset,
                limit: u64::MAX - self.len,
            });
        }
        Ok(())
    }
}

/// crosvm's `EXTERNAL_MAP` body (32 bytes).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct VhostUserExternalMapMsg {
    /// Shared memory region id.
    pub shmid: u8,
    /// Padding.
    pub padding: [u8; 7],
    /// Offset in the shared memory region.
    pub shm_offset: u64,
    /// Length of the mapping.
    pub len: u64,
    /// Host address of the memory to map.
    pub ptr: u64,
}

impl Validate for VhostUserExternalMapMsg {
    fn validate(&self) -> Result<()> {
        if self.len == 0 {
            return Err(ProtocolError::Zero("external map length"));
        }
        if self.shm_offset.checked_add(self.len).is_none() {
            return Err(ProtocolError::OutOfBounds {
                what: "external map shm offset + len",
                value: self.shm_offset,
                limit: u64::MAX - self.len,
            });
        }
        Ok(())
    }
}
