//! corebuf-bench: the load generator (in progress).
fn main() {}
