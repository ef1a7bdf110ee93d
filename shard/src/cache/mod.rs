//! The cache partition: one core's buffered block cache with dm-bufio's contract
//! (read / get / new / prefetch / release / mark dirty / write back / flush), bounded memory,
//! pinning, S3-FIFO eviction and background write-back, over the shard's
//! [`IoQueue`](crate::io::IoQueue).

mod arena;
mod config;
mod index;
mod partition;
mod policy;
mod stats;
mod table;

pub use arena::{FrameMut, FrameRef};
pub use config::CacheConfig;
pub use partition::{BufRef, Hook, Hooks, Partition, ReadHook, Session};
pub use stats::CacheStats;
