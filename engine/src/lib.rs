//! corebuf: a thread-per-core, sharded block-cache storage engine on glommio (io_uring).
//!
//! Each shard is one glommio executor pinned to a core; it owns a cache partition with
//! dm-bufio's semantics ([`cache`]) over its own `O_DIRECT` I/O queue ([`io`]).
//! Blocks are routed to shards by range ([`Router`]); code on a shard reaches its own blocks
//! without a copy and other shards' blocks through messages ([`Shard`]); code anywhere else
//! uses the thread-safe [`Client`]. [`Shard::flush`] / [`Client::flush`] is the global
//! durability barrier.
//!
//! # Examples
//! ```no_run
//! # fn main() -> corebuf::Result<()> {
//! let engine = corebuf::Engine::builder()
//!     .path("/var/lib/kv/data")
//!     .cache_size_bytes(64 << 20)
//!     .build()?;
//! let client = engine.client();
//! client.write_blocking(7, &vec![42u8; client.block_size()])?;
//! client.flush_blocking()?; // durable from here on
//! assert_eq!(client.read_blocking(7)?[0], 42);
//! engine.shutdown()
//! # }
//! ```
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod builder;
mod client;
mod engine;
mod local;
mod mesh;
mod router;
mod routing;
mod shard;
mod stats;

pub use builder::{EngineBuilder, DEFAULT_POLL_BEFORE_SLEEP};
pub use client::Client;
pub use corebuf_shard::{cache, io, Error, IoOp, Result};
pub use engine::Engine;
pub use local::LocalEngine;
pub use router::Router;
pub use shard::Shard;
pub use stats::{EngineStats, ShardStats};

/// The README's examples, compiled and run as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
