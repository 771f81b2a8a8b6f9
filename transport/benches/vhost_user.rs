//! vhost-user benchmarks (filled in below).
fn main() {}
