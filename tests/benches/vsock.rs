//! vsock throughput benchmark (being written).
fn main() {}
