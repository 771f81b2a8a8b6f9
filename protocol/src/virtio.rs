//! The virtio core: feature bits every device type shares, the device status bits, and
//! the virtio-mmio register map ([`mmio`]). Section numbers are those of the virtio 1.3
//! specification (OASIS, `virtio-v1.3-csd01`).
//!
//! # Why not `virtio-bindings`
//!
//! The rust-vmm `virtio-bindings` crate (in the workspace through `virtio-queue`) has
//! every constant of this module, generated from the Linux uapi headers. Outboard keeps
//! its own here because:
//!
//! - this crate is `no_std` with no dependency but zerocopy, bitflags and thiserror;
//!   `virtio-bindings` is not declared `no_std`;
//! - feature bits are `u64` masks ready to test against a negotiated feature word
//!   (`features & VIRTIO_F_VERSION_1`), where the bindings give `u32` bit numbers
//!   (`VIRTIO_F_VERSION_1 == 32`) that every user shifts by hand;
//! - register offsets are `u64` bus offsets, the type of
//!   `outboard_devices::bus::BusAccessInfo::offset`, where the bindings give `u32`;
//! - each constant here names the spec section it comes from.
//!
//! `outboard-vmm-glue` (the rust-vmm layer, which has the bindings anyway) checks every
//! value here against `virtio-bindings` in its tests, so the two cannot drift apart.

/// `VIRTIO_RING_F_INDIRECT_DESC` (bit 28): the driver may use indirect descriptor tables
/// (virtio 1.3, 6 "Reserved Feature Bits", and 2.7.5.3 "Indirect Descriptors"; the
/// spec calls it `VIRTIO_F_INDIRECT_DESC`).
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;

/// `VIRTIO_RING_F_EVENT_IDX` (bit 29): used/available event notification suppression
/// through the `used_event` and `avail_event` fields (virtio 1.3, 6, and 2.7.10 "Used
/// Buffer Notification Suppression"; the spec calls it `VIRTIO_F_EVENT_IDX`).
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// `VIRTIO_F_VERSION_1` (bit 32): the device complies with virtio 1.x, not the legacy
/// interface (virtio 1.3, 6).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// `VIRTIO_F_IN_ORDER` (bit 35): buffers are used in the order in which they were made
/// available (virtio 1.3, 6, and 2.7.9 "In-order use of descriptors").
pub const VIRTIO_F_IN_ORDER: u64 = 1 << 35;

/// Virtio device IDs (virtio 1.3, 5 "Device Types"): what a device reports as its type
/// (`VirtioDevice::device_type` in outboard-devices, the virtio-mmio `DeviceID`
/// register, the PCI device ID minus 0x1040). Names follow the Linux uapi
/// `<linux/virtio_ids.h>` (`VIRTIO_ID_RNG` is [`id::RNG`]); outboard-vmm-glue checks the
/// values against `virtio-bindings` in its tests.
pub mod id {
    /// 1: network card.
    pub const NET: u32 = 1;
    /// 2: block device.
    pub const BLOCK: u32 = 2;
    /// 3: console.
    pub const CONSOLE: u32 = 3;
    /// 4: entropy source.
    pub const RNG: u32 = 4;
    /// 5: memory ballooning (traditional).
    pub const BALLOON: u32 = 5;
    /// 6: ioMemory.
    pub const IOMEM: u32 = 6;
    /// 7: rpmsg.
    pub const RPMSG: u32 = 7;
    /// 8: SCSI host.
    pub const SCSI: u32 = 8;
    /// 9: 9P transport (`VIRTIO_ID_9P`).
    pub const P9: u32 = 9;
    /// 10: mac80211 wlan.
    pub const MAC80211_WLAN: u32 = 10;
    /// 11: rproc serial.
    pub const RPROC_SERIAL: u32 = 11;
    /// 12: virtio CAIF.
    pub const CAIF: u32 = 12;
    /// 13: memory balloon.
    pub const MEMORY_BALLOON: u32 = 13;
    /// 16: GPU device.
    pub const GPU: u32 = 16;
    /// 17: timer/clock device.
    pub const CLOCK: u32 = 17;
    /// 18: input device.
    pub const INPUT: u32 = 18;
    /// 19: socket device (vsock).
    pub const VSOCK: u32 = 19;
    /// 20: crypto device.
    pub const CRYPTO: u32 = 20;
    /// 21: signal distribution module.
    pub const SIGNAL_DIST: u32 = 21;
    /// 22: pstore device.
    pub const PSTORE: u32 = 22;
    /// 23: IOMMU device.
    pub const IOMMU: u32 = 23;
    /// 24: memory device.
    pub const MEM: u32 = 24;
    /// 25: sound device.
    pub const SOUND: u32 = 25;
    /// 26: file system device.
    pub const FS: u32 = 26;
    /// 27: PMEM device.
    pub const PMEM: u32 = 27;
    /// 28: RPMB device.
    pub const RPMB: u32 = 28;
    /// 29: mac80211 hwsim wireless simulation device.
    pub const MAC80211_HWSIM: u32 = 29;
    /// 30: video encoder device.
    pub const VIDEO_ENCODER: u32 = 30;
    /// 31: video decoder device.
    pub const VIDEO_DECODER: u32 = 31;
    /// 32: SCMI device.
    pub const SCMI: u32 = 32;
    /// 33: NitroSecureModule.
    pub const NITRO_SEC_MOD: u32 = 33;
    /// 34: I2C adapter.
    pub const I2C_ADAPTER: u32 = 34;
    /// 35: watchdog.
    pub const WATCHDOG: u32 = 35;
    /// 36: CAN device.
    pub const CAN: u32 = 36;
    /// 37: dmabuf device (Linux uapi).
    pub const DMABUF: u32 = 37;
    /// 38: parameter server.
    pub const PARAM_SERV: u32 = 38;
    /// 39: audio policy device.
    pub const AUDIO_POLICY: u32 = 39;
    /// 40: Bluetooth device.
    pub const BT: u32 = 40;
    /// 41: GPIO device.
    pub const GPIO: u32 = 41;
    /// 42: RDMA device.
    pub const RDMA: u32 = 42;
    /// 43: camera device.
    pub const CAMERA: u32 = 43;
    /// 44: ISM device.
    pub const ISM: u32 = 44;
    /// 45: SPI controller.
    pub const SPI: u32 = 45;
    /// 48: media device (virtio-media).
    pub const MEDIA: u32 = 48;
}

/// Device status bits (virtio 1.3, 2.1 "Device Status Field").
///
/// They are `u32` because that is the width of the virtio-mmio `Status` register
/// ([`mmio::STATUS`]); PCI's `device_status` is a `u8` holding the same bits.
pub mod status {
    /// `ACKNOWLEDGE` (1): the guest OS has found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// `DRIVER` (2): the guest OS knows how to drive the device.
    pub const DRIVER: u32 = 2;
    /// `DRIVER_OK` (4): the driver is set up and ready to drive the device.
    pub const DRIVER_OK: u32 = 4;
    /// `FEATURES_OK` (8): the driver has acknowledged the features it understands, and
    /// feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// `DEVICE_NEEDS_RESET` (64): the device has hit an error it cannot recover from.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// `FAILED` (128): something went wrong in the guest and it gave up on the device.
    pub const FAILED: u32 = 128;
}

/// The virtio-mmio transport's register map (virtio 1.3, 4.2.2 "MMIO Device Register
/// Layout"), version 2 (the non-legacy layout; the legacy-only registers of 4.2.4 are
/// not listed).
///
/// Offsets are from the start of the device's register window; every register is 32
/// bits wide and little-endian. 64-bit quantities are split into `_LOW` and `_HIGH`
/// halves.
pub mod mmio {
    /// `MagicValue` contents: `"virt"` read as a little-endian `u32` (4.2.2).
    pub const MAGIC: u32 = 0x7472_6976;
    /// `Version` contents for the non-legacy register layout (4.2.2).
    pub const VERSION_2: u32 = 2;

    /// `InterruptStatus` / `InterruptACK` bit 0: "Used Buffer Notification", a used ring
    /// was updated (4.2.2).
    pub const INT_VRING: u32 = 1;
    /// `InterruptStatus` / `InterruptACK` bit 1: "Configuration Change Notification"
    /// (4.2.2).
    pub const INT_CONFIG: u32 = 2;

    /// `MagicValue` (R): [`MAGIC`].
    pub const MAGIC_VALUE: u64 = 0x000;
    /// `Version` (R): the register layout version ([`VERSION_2`]).
    pub const VERSION: u64 = 0x004;
    /// `DeviceID` (R): the virtio device type (19 for vsock); 0 means no device.
    pub const DEVICE_ID: u64 = 0x008;
    /// `VendorID` (R): the virtio subsystem vendor id.
    pub const VENDOR_ID: u64 = 0x00c;
    /// `DeviceFeatures` (R): 32 bits of the device's features, selected by
    /// [`DEVICE_FEATURES_SEL`].
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// `DeviceFeaturesSel` (W): which 32-bit word [`DEVICE_FEATURES`] shows.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// `DriverFeatures` (W): 32 bits of the features the driver accepts, selected by
    /// [`DRIVER_FEATURES_SEL`].
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// `DriverFeaturesSel` (W): which 32-bit word [`DRIVER_FEATURES`] sets.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// `QueueSel` (W): the queue the `Queue*` registers below refer to.
    pub const QUEUE_SEL: u64 = 0x030;
    /// `QueueNumMax` (R): the selected queue's maximum size; 0 when it does not exist.
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// `QueueNum` (W): the selected queue's size, as the driver chose it.
    pub const QUEUE_NUM: u64 = 0x038;
    /// `QueueReady` (RW): 1 when the driver may use the selected queue.
    pub const QUEUE_READY: u64 = 0x044;
    /// `QueueNotify` (W): the driver notifies the device of new buffers in a queue (the
    /// value is the queue index).
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// `InterruptStatus` (R): why the device interrupted ([`INT_VRING`],
    /// [`INT_CONFIG`]).
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// `InterruptACK` (W): the interrupt causes the driver has handled.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// `Status` (RW): the device status ([`super::status`]); writing 0 resets the
    /// device.
    pub const STATUS: u64 = 0x070;
    /// `QueueDescLow` (W): low 32 bits of the selected queue's descriptor table address.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// `QueueDescHigh` (W): high 32 bits of the descriptor table address.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// `QueueDriverLow` (W): low 32 bits of the driver (available) ring address.
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// `QueueDriverHigh` (W): high 32 bits of the driver (available) ring address.
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// `QueueDeviceLow` (W): low 32 bits of the device (used) ring address.
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// `QueueDeviceHigh` (W): high 32 bits of the device (used) ring address.
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// `SHMSel` (W): the shared memory region `SHMLen*`/`SHMBase*` describe.
    pub const SHM_SEL: u64 = 0x0ac;
    /// `SHMLenLow` (R): low 32 bits of the selected region's length (all ones in both
    /// halves: no such region).
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// `SHMLenHigh` (R): high 32 bits of the selected region's length.
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// `SHMBaseLow` (R): low 32 bits of the selected region's guest-physical address.
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    /// `SHMBaseHigh` (R): high 32 bits of the selected region's address.
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    /// `ConfigGeneration` (R): changes whenever the device changed its configuration
    /// space, so the driver can read it consistently.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// `Config` (RW): the start of the device-specific configuration space.
    pub const CONFIG: u64 = 0x100;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_is_virt() {
        assert_eq!(&mmio::MAGIC.to_le_bytes(), b"virt");
    }

    #[test]
    fn feature_bits() {
        assert_eq!(VIRTIO_RING_F_INDIRECT_DESC.trailing_zeros(), 28);
        assert_eq!(VIRTIO_RING_F_EVENT_IDX.trailing_zeros(), 29);
        assert_eq!(VIRTIO_F_VERSION_1.trailing_zeros(), 32);
        assert_eq!(VIRTIO_F_IN_ORDER.trailing_zeros(), 35);
    }

    #[test]
    fn registers_are_aligned_and_below_config() {
        let regs = [
            mmio::MAGIC_VALUE,
            mmio::VERSION,
            mmio::DEVICE_ID,
            mmio::VENDOR_ID,
            mmio::DEVICE_FEATURES,
            mmio::DEVICE_FEATURES_SEL,
            mmio::DRIVER_FEATURES,
            mmio::DRIVER_FEATURES_SEL,
            mmio::QUEUE_SEL,
            mmio::QUEUE_NUM_MAX,
            mmio::QUEUE_NUM,
            mmio::QUEUE_READY,
            mmio::QUEUE_NOTIFY,
            mmio::INTERRUPT_STATUS,
            mmio::INTERRUPT_ACK,
            mmio::STATUS,
            mmio::QUEUE_DESC_LOW,
            mmio::QUEUE_DESC_HIGH,
            mmio::QUEUE_DRIVER_LOW,
            mmio::QUEUE_DRIVER_HIGH,
            mmio::QUEUE_DEVICE_LOW,
            mmio::QUEUE_DEVICE_HIGH,
            mmio::SHM_SEL,
            mmio::SHM_LEN_LOW,
            mmio::SHM_LEN_HIGH,
            mmio::SHM_BASE_LOW,
            mmio::SHM_BASE_HIGH,
            mmio::CONFIG_GENERATION,
        ];
        for pair in regs.windows(2) {
            assert!(pair[0] < pair[1], "{pair:x?} out of order");
        }
        for r in regs {
            assert_eq!(r % 4, 0, "{r:#x}");
            assert!(r < mmio::CONFIG, "{r:#x}");
        }
    }
}
