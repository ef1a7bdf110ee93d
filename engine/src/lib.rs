//! corebuf: a thread-per-core, sharded block-cache storage engine on glommio.
//!
//! This crate will hold the public engine: the builder, block-range routing, the cross-shard
//! mesh, the global flush barrier and the thread-safe client. Today it re-exports the shard
//! layer, which holds the I/O queue and the cache partition.

pub use corebuf_shard as shard;
pub use corebuf_shard::{Error, IoOp, Result};
