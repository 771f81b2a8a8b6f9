//! Proxied MMIO read benchmark (see the crate docs).

fn main() {}
