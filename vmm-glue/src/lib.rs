//! rust-vmm glue, virtio-mmio, and the vhost-user device daemon.
#![deny(missing_docs)]

pub mod rust_vmm;
