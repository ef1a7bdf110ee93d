//! The cache partition: one core's buffered block cache with dm-bufio's contract
//! (read / get / new / prefetch / release / mark dirty / write back / flush), bounded memory,
//! pinning, S3-FIFO eviction and background write-back, over the shard's
//! [`IoQueue`](crate::io::IoQueue).
//!
//! Files by concern: [`Partition`] and the miss path in `partition.rs`, sessions and buffer
//! handles in `session.rs`, the write path in `writeback.rs`, the frame table and its
//! invariants in `table.rs` (per-frame records in `frame.rs`, the block index in `index.rs`,
//! S3-FIFO in `policy.rs`), the frames' bytes in `arena.rs`.

mod arena;
mod config;
mod frame;
mod index;
mod partition;
mod policy;
mod session;
mod stats;
mod table;
mod writeback;

pub use arena::{FrameMut, FrameRef};
pub use config::CacheConfig;
pub use partition::{Hook, Hooks, Partition, ReadHook};
pub use session::{AuxMut, BufRef, Lent, Session};
pub use stats::CacheStats;

/// Asks the CPU to start loading the cache line at `p` (a hint: it never faults and changes
/// nothing; a no-op on architectures without a prefetch instruction here).
#[inline(always)]
pub(crate) fn prefetch_read<T>(p: *const T) {
    // SAFETY: SSE is part of x86_64's baseline, and a prefetch reads no memory the program
    // sees: it never faults, whatever the address.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
