//! Implementations of outboard-devices' VMM-facing traits over rust-vmm's `vm-memory`
//! and `virtio-queue`.
