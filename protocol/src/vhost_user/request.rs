//! Request codes of both directions.

use crate::{ProtocolError, Result};

macro_rules! request_enum {
    (
        $(#[$meta:meta])*
        $name:ident, $what:literal {
            $( $(#[$vmeta:meta])* $variant:ident = $value:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[allow(non_camel_case_types)]
        pub enum $name {
            $( $(#[$vmeta])* $variant = $value, )*
        }

        impl $name {
            /// Every request of this direction, in numeric order.
            pub const ALL: &'static [$name] = &[ $( $name::$variant, )* ];

            /// The request's name as the spec spells it (without the `VHOST_USER_` prefix).
            pub const fn name(self) -> &'static str {
                match self {
                    $( $name::$variant => stringify!($variant), )*
                }
            }

            /// The request code.
            pub const fn code(self) -> u32 {
                self as u32
            }

            /// Looks up a raw request code.
            pub fn from_code(code: u32) -> Result<Self> {
                match code {
                    $( $value => Ok($name::$variant), )*
                    _ => Err(ProtocolError::Unknown { what: $what, value: code.into() }),
                }
            }
        }

        impl TryFrom<u32> for $name {
            type Error = ProtocolError;
            fn try_from(code: u32) -> Result<Self> {
                Self::from_code(code)
            }
        }

        impl From<$name> for u32 {
            fn from(r: $name) -> u32 {
                r as u32
            }
        }

        impl core::fmt::Display for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                write!(f, "{}({})", self.name(), *self as u32)
            }
        }
    };
}

request_enum! {
    /// Requests the front-end sends to the back-end (`VHOST_USER_*`), numbers 1 to 44.
    FrontendReq, "front-end request" {
        /// Get the virtio feature bits the back-end offers. Reply: u64.
        GET_FEATURES = 1,
        /// Set the virtio feature bits the front-end accepted. Body: u64.
        SET_FEATURES = 2,
        /// Claim the back-end for this front-end; the first request of a session.
        SET_OWNER = 3,
        /// Deprecated: the spec says not to use it (use `RESET_DEVICE`); kept for old peers.
        RESET_OWNER = 4,
        /// Set the guest memory table. Body: memory regions; one fd per region.
        SET_MEM_TABLE = 5,
        /// Set the dirty log area. Body: log description + one fd (with `LOG_SHMFD`).
        SET_LOG_BASE = 6,
        /// Set the eventfd used to signal a log update. One fd.
        SET_LOG_FD = 7,
        /// Set a ring's size. Body: vring state.
        SET_VRING_NUM = 8,
        /// Set a ring's addresses. Body: vring address.
        SET_VRING_ADDR = 9,
        /// Set a ring's next available index. Body: vring state.
        SET_VRING_BASE = 10,
        /// Stop a ring and get its next available index. Body and reply: vring state.
        GET_VRING_BASE = 11,
        /// Set (and start the ring on) the kick eventfd. Body: u64 index/NOFD; 0 or 1 fd.
        SET_VRING_KICK = 12,
        /// Set the call eventfd. Body: u64 index/NOFD; 0 or 1 fd.
        SET_VRING_CALL = 13,
        /// Set the error eventfd. Body: u64 index/NOFD; 0 or 1 fd.
        SET_VRING_ERR = 14,
        /// Get the protocol feature bits. Reply: u64.
        GET_PROTOCOL_FEATURES = 15,
        /// Set the accepted protocol feature bits. Body: u64.
        SET_PROTOCOL_FEATURES = 16,
        /// Get the largest number of queues (`MQ`). Reply: u64.
        GET_QUEUE_NUM = 17,
        /// Enable or disable a ring. Body: vring state (num 0 or 1).
        SET_VRING_ENABLE = 18,
        /// Ask a net back-end to broadcast a RARP (`RARP`). Body: u64 (MAC in low 6 bytes).
        SEND_RARP = 19,
        /// Set a net device's MTU (`MTU`). Body: u64.
        NET_SET_MTU = 20,
        /// Give the back-end the socket of the back-end -> front-end channel (`BACKEND_REQ`).
        /// One fd. Was `SET_SLAVE_REQ_FD`.
        SET_BACKEND_REQ_FD = 21,
        /// Send an IOTLB message. Body: IOTLB.
        IOTLB_MSG = 22,
        /// Set a ring's endianness for legacy devices (`CROSS_ENDIAN`). Body: vring state.
        SET_VRING_ENDIAN = 23,
        /// Read virtio config space (`CONFIG`). Body and reply: config.
        GET_CONFIG = 24,
        /// Write virtio config space (`CONFIG`). Body: config.
        SET_CONFIG = 25,
        /// Create a crypto session (`CRYPTO_SESSION`). Body: opaque session description.
        CREATE_CRYPTO_SESSION = 26,
        /// Close a crypto session (`CRYPTO_SESSION`). Body: u64 session id.
        CLOSE_CRYPTO_SESSION = 27,
        /// Postcopy migration: get the back-end's userfaultfd (`PAGEFAULT`).
        POSTCOPY_ADVISE = 28,
        /// Postcopy migration: enter listening mode (`PAGEFAULT`).
        POSTCOPY_LISTEN = 29,
        /// Postcopy migration has ended (`PAGEFAULT`). Reply: u64.
        POSTCOPY_END = 30,
        /// Get the inflight tracking area (`INFLIGHT_SHMFD`). Body/reply: inflight (+fd).
        GET_INFLIGHT_FD = 31,
        /// Set the inflight tracking area (`INFLIGHT_SHMFD`). Body: inflight + one fd.
        SET_INFLIGHT_FD = 32,
        /// Give a vhost-user-gpu back-end its GPU protocol socket. One fd.
        GPU_SET_SOCKET = 33,
        /// Disable all rings and reset the device (`RESET_DEVICE`).
        RESET_DEVICE = 34,
        /// In-band kick (`INBAND_NOTIFICATIONS`). Body: vring state.
        VRING_KICK = 35,
        /// Get the number of memory slots (`CONFIGURE_MEM_SLOTS`). Reply: u64.
        GET_MAX_MEM_SLOTS = 36,
        /// Add one memory region (`CONFIGURE_MEM_SLOTS`). Body: single region + one fd.
        ADD_MEM_REG = 37,
        /// Remove one memory region (`CONFIGURE_MEM_SLOTS`). Body: single region.
        REM_MEM_REG = 38,
        /// Set the virtio device status (`STATUS`). Body: u64.
        SET_STATUS = 39,
        /// Get the virtio device status (`STATUS`). Reply: u64.
        GET_STATUS = 40,
        /// Get a shared object's dma-buf fd (`SHARED_OBJECT`). Body: UUID; reply u64 + fd.
        GET_SHARED_OBJECT = 41,
        /// Start a device state transfer (`DEVICE_STATE`). Body: transfer state + fd.
        SET_DEVICE_STATE_FD = 42,
        /// Check the result of a device state transfer (`DEVICE_STATE`). Reply: u64.
        CHECK_DEVICE_STATE = 43,
        /// Get the VIRTIO shared memory regions (`SHMEM`). Reply: shmem config.
        GET_SHMEM_CONFIG = 44,
    }
}

request_enum! {
    /// Requests the back-end sends to the front-end on the back-end request channel
    /// (`VHOST_USER_BACKEND_*`), numbers 1 to 10. Was "slave requests".
    BackendReq, "back-end request" {
        /// IOTLB miss or access failure report. Body: IOTLB.
        IOTLB_MSG = 1,
        /// The device's config space changed (`CONFIG`).
        CONFIG_CHANGE_MSG = 2,
        /// Set a host notifier area for a ring (`HOST_NOTIFIER`). Body: vring area; 0/1 fd.
        VRING_HOST_NOTIFIER_MSG = 3,
        /// In-band used-buffer notification (`INBAND_NOTIFICATIONS`). Body: vring state.
        VRING_CALL = 4,
        /// In-band ring error notification (`INBAND_NOTIFICATIONS`). Body: vring state.
        VRING_ERR = 5,
        /// Add a shared object (`SHARED_OBJECT`). Body: UUID.
        SHARED_OBJECT_ADD = 6,
        /// Remove a shared object (`SHARED_OBJECT`). Body: UUID.
        SHARED_OBJECT_REMOVE = 7,
        /// Look a shared object up (`SHARED_OBJECT`). Body: UUID; reply u64 + fd.
        SHARED_OBJECT_LOOKUP = 8,
        /// Map an fd into a VIRTIO shared memory region (`SHMEM`). Body: mmap + one fd.
        SHMEM_MAP = 9,
        /// Unmap from a VIRTIO shared memory region (`SHMEM`). Body: mmap.
        SHMEM_UNMAP = 10,
    }
}

request_enum! {
    /// crosvm's non-standard back-end -> front-end requests.
    ///
    /// crosvm's vhost-user front-end serves these on the back-end request channel next to
    /// the standard [`BackendReq`]s; they are not in the vhost-user spec. Transports only
    /// accept them when built with their `crosvm` feature.
    CrosvmBackendReq, "crosvm back-end request" {
        /// Map a GPU blob into the shared memory region. Body: [`VhostUserGpuMapMsg`](super::VhostUserGpuMapMsg) + fd.
        GPU_MAP = 1006,
        /// Map an external (host-address) mapping. Body: [`VhostUserExternalMapMsg`](super::VhostUserExternalMapMsg).
        EXTERNAL_MAP = 1007,
    }
}

impl FrontendReq {
    /// Whether the spec marks this request deprecated (or never to be sent).
    pub const fn is_deprecated(self) -> bool {
        matches!(self, FrontendReq::RESET_OWNER)
    }
}
