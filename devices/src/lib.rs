//! VMM-independent virtio device models and the traits a VMM implements for them.
#![deny(missing_docs)]

pub mod bus;
