//! Feature bits: the vhost-user protocol features and the transport bits vhost-user
//! takes from the virtio feature space.

bitflags::bitflags! {
    /// vhost-user protocol feature bits (`VHOST_USER_PROTOCOL_F_*`), every bit pinned to
    /// the spec's number.
    ///
    /// Note: `GPA_ADDRESSES` is bit 21 and `SHMEM` is bit 22. The rust-vmm `vhost` crate
    /// before 0.17 shipped `SHMEM` at bit 21 and so broke QEMU; the table test in this
    /// crate pins every bit.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct VhostUserProtocolFeatures: u64 {
        /// Bit 0: multiple queues (`GET_QUEUE_NUM`).
        const MQ = 1 << 0;
        /// Bit 1: the dirty log is shared memory passed as an fd.
        const LOG_SHMFD = 1 << 1;
        /// Bit 2: `SEND_RARP`.
        const RARP = 1 << 2;
        /// Bit 3: NEED_REPLY / status replies for requests without a reply.
        const REPLY_ACK = 1 << 3;
        /// Bit 4: `NET_SET_MTU` (spec name `NET_MTU`).
        const MTU = 1 << 4;
        /// Bit 5: the back-end request channel (was `SLAVE_REQ`).
        const BACKEND_REQ = 1 << 5;
        /// Bit 6: `SET_VRING_ENDIAN`.
        const CROSS_ENDIAN = 1 << 6;
        /// Bit 7: crypto sessions.
        const CRYPTO_SESSION = 1 << 7;
        /// Bit 8: postcopy migration (userfaultfd).
        const PAGEFAULT = 1 << 8;
        /// Bit 9: `GET_CONFIG`/`SET_CONFIG` and `CONFIG_CHANGE_MSG`.
        const CONFIG = 1 << 9;
        /// Bit 10: the back-end may attach fds to its requests (was `SLAVE_SEND_FD`).
        const BACKEND_SEND_FD = 1 << 10;
        /// Bit 11: `VRING_HOST_NOTIFIER_MSG`.
        const HOST_NOTIFIER = 1 << 11;
        /// Bit 12: inflight I/O tracking areas.
        const INFLIGHT_SHMFD = 1 << 12;
        /// Bit 13: `RESET_DEVICE`.
        const RESET_DEVICE = 1 << 13;
        /// Bit 14: in-band kick/call/err messages.
        const INBAND_NOTIFICATIONS = 1 << 14;
        /// Bit 15: `GET_MAX_MEM_SLOTS`, `ADD_MEM_REG`, `REM_MEM_REG`.
        const CONFIGURE_MEM_SLOTS = 1 << 15;
        /// Bit 16: `SET_STATUS`/`GET_STATUS`.
        const STATUS = 1 << 16;
        /// Bit 17: Xen grant/foreign mappings.
        const XEN_MMAP = 1 << 17;
        /// Bit 18: shared objects (virtio dma-bufs).
        const SHARED_OBJECT = 1 << 18;
        /// Bit 19: device state transfer (`SET_DEVICE_STATE_FD`, `CHECK_DEVICE_STATE`).
        const DEVICE_STATE = 1 << 19;
        /// Bit 20: `GET_VRING_BASE` may leave in-flight requests to be resubmitted.
        const GET_VRING_BASE_INFLIGHT = 1 << 20;
        /// Bit 21: memory and ring addresses are guest-physical addresses.
        const GPA_ADDRESSES = 1 << 21;
        /// Bit 22: VIRTIO shared memory regions (`GET_SHMEM_CONFIG`, `SHMEM_MAP`/`UNMAP`).
        const SHMEM = 1 << 22;
    }
}

bitflags::bitflags! {
    /// The virtio feature bits that belong to the vhost-user transport.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct VhostUserVirtioFeatures: u64 {
        /// Bit 26: `VHOST_F_LOG_ALL`, log every write for live migration.
        const LOG_ALL = 1 << 26;
        /// Bit 30: `VHOST_USER_F_PROTOCOL_FEATURES`, protocol feature negotiation exists.
        const PROTOCOL_FEATURES = 1 << 30;
    }
}
