//! Jail feature tests.

fn main() {}
