//! `BusDevice` and `Suspendable`: things that sit on a VMM bus.
//!
//! A VMM routes guest MMIO and port-I/O accesses, and PCI configuration-space accesses, to
//! the device that claimed the address range. These traits are the contract between the
//! VMM's bus and a device model; every method has a default so a device implements only
//! what it uses. `outboard-sandbox`'s `ProxyDevice` implements both traits by forwarding
//! every call to a device running in a jailed child process.

use std::os::fd::BorrowedFd;

#[cfg(feature = "serde")]
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Where an MMIO or port-I/O access landed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct BusAccessInfo {
    /// Offset of the access from the start of the device's range.
    pub offset: u64,
    /// Absolute bus address of the access.
    pub address: u64,
    /// Identifier of the accessor (for example the vCPU index).
    pub id: usize,
}

/// A range of bus addresses: `len` bytes starting at `base`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct BusRange {
    /// First address of the range.
    pub base: u64,
    /// Length of the range in bytes.
    pub len: u64,
}

impl BusRange {
    /// Returns true if `addr` lies inside the range.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr - self.base < self.len
    }

    /// Returns true if the two ranges share at least one address.
    pub fn overlaps(&self, other: &BusRange) -> bool {
        if self.len == 0 || other.len == 0 {
            return false;
        }
        self.contains(other.base) || other.contains(self.base)
    }
}

/// Which bus a range belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub enum BusType {
    /// Port I/O (x86 `in`/`out`).
    Io,
    /// Memory-mapped I/O.
    Mmio,
}

/// A PCI function address (bus, device, function).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct PciAddress {
    /// Bus number.
    pub bus: u8,
    /// Device number (0..32).
    pub dev: u8,
    /// Function number (0..8).
    pub func: u8,
}

/// Identifies a device to the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub enum DeviceId {
    /// A PCI device, by vendor and device id.
    Pci {
        /// PCI vendor id.
        vendor: u16,
        /// PCI device id.
        device: u16,
    },
    /// A platform (non-PCI) device, by a VMM-chosen number.
    Platform(u32),
    /// A device running in another process behind a proxy.
    Proxy,
}

/// What the VMM must change on its buses after a PCI configuration register write (for
/// example a BAR was moved, or a bridge's secondary devices went away).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct ConfigWriteResult {
    /// MMIO ranges to remove from the bus.
    pub mmio_remove: Vec<BusRange>,
    /// MMIO ranges to add to the bus.
    pub mmio_add: Vec<BusRange>,
    /// Port-I/O ranges to remove from the bus.
    pub io_remove: Vec<BusRange>,
    /// Port-I/O ranges to add to the bus.
    pub io_add: Vec<BusRange>,
    /// PCI devices that must be removed (hot-unplug).
    pub removed_pci_devices: Vec<PciAddress>,
}

impl ConfigWriteResult {
    /// Returns true if the write requires no change on the VMM side.
    pub fn is_empty(&self) -> bool {
        self.mmio_remove.is_empty()
            && self.mmio_add.is_empty()
            && self.io_remove.is_empty()
            && self.io_add.is_empty()
            && self.removed_pci_devices.is_empty()
    }
}

/// A device that sits on a VMM bus.
///
/// Data slices for MMIO/PIO accesses are 1, 2, 4 or 8 bytes long; PCI configuration
/// register writes are 1, 2 or 4 bytes long.
pub trait BusDevice: Send + Suspendable {
    /// A human-readable label for logs.
    fn debug_label(&self) -> String;

    /// The device's identity.
    fn device_id(&self) -> DeviceId {
        DeviceId::Platform(0)
    }

    /// Reads at `info.offset` into `data`. The default leaves `data` untouched.
    fn read(&mut self, info: BusAccessInfo, data: &mut [u8]) {
        let _ = (info, data);
    }

    /// Writes `data` at `info.offset`. The default ignores the write.
    fn write(&mut self, info: BusAccessInfo, data: &[u8]) {
        let _ = (info, data);
    }

    /// Writes `data` at byte `offset` of PCI configuration register `reg_idx`.
    fn config_register_write(
        &mut self,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) -> ConfigWriteResult {
        let _ = (reg_idx, offset, data);
        ConfigWriteResult::default()
    }

    /// Reads PCI configuration register `reg_idx`. The default reads as zero.
    fn config_register_read(&self, reg_idx: usize) -> u32 {
        let _ = reg_idx;
        0
    }

    /// Asks the device to keep its PCI configuration space, from byte `base` for `len`
    /// bytes, mirrored into the shared memory object `shmem` (a memfd) so the VMM can read
    /// it without a call. Returns true if the device set the mapping up; the default
    /// declines.
    fn init_pci_config_mapping(&mut self, shmem: BorrowedFd<'_>, base: usize, len: usize) -> bool {
        let _ = (shmem, base, len);
        false
    }

    /// Writes virtual (non-PCI-visible) configuration register `reg_idx`.
    fn virtual_config_register_write(&mut self, reg_idx: usize, value: u32) {
        let _ = (reg_idx, value);
    }

    /// Reads virtual (non-PCI-visible) configuration register `reg_idx`.
    fn virtual_config_register_read(&self, reg_idx: usize) -> u32 {
        let _ = reg_idx;
        0
    }

    /// Called in the child process once the device runs sandboxed, before the first
    /// command.
    fn on_sandboxed(&mut self) {}

    /// The bus ranges the device claims.
    fn get_ranges(&self) -> Vec<(BusRange, BusType)> {
        Vec::new()
    }

    /// Releases the device's resources; the device receives no further accesses.
    fn destroy_device(&mut self) {}
}

/// Errors of [`Suspendable`] operations.
#[cfg_attr(test, remain::sorted)]
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub enum SuspendError {
    /// The device tried and failed.
    #[error("{device}: {operation} failed: {reason}")]
    Failed {
        /// The device's debug label.
        device: String,
        /// The operation: "snapshot", "restore", "sleep" or "wake".
        operation: String,
        /// What went wrong.
        reason: String,
    },
    /// The device does not implement the operation.
    #[error("{device}: {operation} is not supported")]
    Unsupported {
        /// The device's type name or debug label.
        device: String,
        /// The operation: "snapshot", "restore", "sleep" or "wake".
        operation: String,
    },
}

fn unsupported<T: ?Sized>(operation: &str) -> SuspendError {
    SuspendError::Unsupported {
        device: std::any::type_name::<T>().to_owned(),
        operation: operation.to_owned(),
    }
}

/// Snapshot, restore, sleep and wake, for live migration and suspend.
///
/// Every method fails with [`SuspendError::Unsupported`] unless the device implements it.
/// `snapshot` and `restore` exist with the crate's `serde` feature (their state is a
/// `serde_json::Value`); `sleep` and `wake` always.
pub trait Suspendable {
    /// Returns the device's state as a serde value.
    #[cfg(feature = "serde")]
    fn snapshot(&mut self) -> Result<serde_json::Value, SuspendError> {
        Err(unsupported::<Self>("snapshot"))
    }

    /// Restores state produced by [`Suspendable::snapshot`].
    #[cfg(feature = "serde")]
    fn restore(&mut self, data: serde_json::Value) -> Result<(), SuspendError> {
        let _ = data;
        Err(unsupported::<Self>("restore"))
    }

    /// Stops the device's activity (workers quiesce) without losing state.
    fn sleep(&mut self) -> Result<(), SuspendError> {
        Err(unsupported::<Self>("sleep"))
    }

    /// Resumes after [`Suspendable::sleep`].
    fn wake(&mut self) -> Result<(), SuspendError> {
        Err(unsupported::<Self>("wake"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nothing;
    impl Suspendable for Nothing {}
    impl BusDevice for Nothing {
        fn debug_label(&self) -> String {
            "nothing".to_owned()
        }
    }

    #[test]
    fn defaults_are_inert() {
        let mut d = Nothing;
        let mut buf = [7u8; 4];
        d.read(BusAccessInfo::default(), &mut buf);
        assert_eq!(buf, [7; 4]);
        assert!(d.config_register_write(0, 0, &[1]).is_empty());
        assert_eq!(d.config_register_read(3), 0);
        assert_eq!(d.virtual_config_register_read(3), 0);
        assert!(d.get_ranges().is_empty());
        assert_eq!(d.device_id(), DeviceId::Platform(0));
    }

    #[test]
    fn suspend_defaults_are_unsupported() {
        let mut d = Nothing;
        assert!(matches!(d.sleep(), Err(SuspendError::Unsupported { .. })));
        let err = d.wake().unwrap_err();
        assert!(err.to_string().contains("wake is not supported"), "{err}");
    }

    #[cfg(feature = "serde")]
    #[test]
    fn snapshot_defaults_are_unsupported() {
        let mut d = Nothing;
        assert!(matches!(
            d.snapshot(),
            Err(SuspendError::Unsupported { .. })
        ));
        let err = d.restore(serde_json::Value::Null).unwrap_err();
        assert!(
            err.to_string().contains("restore is not supported"),
            "{err}"
        );
    }

    #[test]
    fn bus_range_overlap() {
        let a = BusRange {
            base: 0x1000,
            len: 0x100,
        };
        assert!(a.contains(0x1000) && a.contains(0x10ff) && !a.contains(0x1100));
        assert!(a.overlaps(&BusRange {
            base: 0x10ff,
            len: 1
        }));
        assert!(!a.overlaps(&BusRange {
            base: 0x1100,
            len: 1
        }));
        assert!(!a.overlaps(&BusRange {
            base: 0x1000,
            len: 0
        }));
        let top = BusRange {
            base: u64::MAX,
            len: 1,
        };
        assert!(top.contains(u64::MAX));
    }

    #[cfg(feature = "serde")]
    #[test]
    fn config_write_result_roundtrips_through_json() {
        let r = ConfigWriteResult {
            mmio_add: vec![BusRange { base: 1, len: 2 }],
            removed_pci_devices: vec![PciAddress {
                bus: 0,
                dev: 3,
                func: 1,
            }],
            ..Default::default()
        };
        let v = serde_json::to_string(&r).unwrap();
        let back: ConfigWriteResult = serde_json::from_str(&v).unwrap();
        assert_eq!(back, r);
        assert!(!back.is_empty());
    }
}
