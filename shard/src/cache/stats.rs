//! Counters of one cache partition.

/// What a partition has done. Counters only grow; `pinned`, `dirty`, `orphaned` and `frames` are gauges
/// filled in when the snapshot is taken.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// `read` / `get` / `new` calls served from the cache.
    pub hits: u64,
    /// `read` calls that went to the device.
    pub misses: u64,
    /// Misses (and prefetches) of blocks the partition knows read as zeroes
    /// ([`Partition::assume_zeroed`](super::Partition::assume_zeroed)): the frame was zeroed
    /// instead of read.
    pub zero_fills: u64,
    /// `read` calls that joined a device read already in flight (single flight).
    pub joins: u64,
    /// `new` calls that installed a fresh buffer.
    pub news: u64,
    /// Frames reused for another block.
    pub evictions: u64,
    /// Writes of dirty buffers that completed successfully (a buffer in a run of adjacent
    /// blocks written as one request counts once here).
    pub writebacks: u64,
    /// Writes of dirty buffers that failed (the data stays cached and dirty; counted per
    /// buffer, as `writebacks`).
    pub write_errors: u64,
    /// Device reads that failed.
    pub read_errors: u64,
    /// Times a caller waited for a frame (every frame pinned, being read or being written).
    pub frame_waits: u64,
    /// Times a caller waited for a session slot (the deadlock rule's admission bound).
    pub session_waits: u64,
    /// Prefetch reads started.
    pub prefetch_reads: u64,
    /// Prefetch blocks skipped for lack of a free frame or request buffer.
    pub prefetch_skipped: u64,
    /// Frames pinned now.
    pub pinned: u64,
    /// Frames dirty or being written now.
    pub dirty: u64,
    /// Frames out of use now because a read into them was abandoned (its future dropped)
    /// while the kernel may still be writing them; each is reused, once that read has ended,
    /// by the first allocation that finds the free list empty.
    pub orphaned: u64,
    /// Frames in the partition.
    pub frames: u64,
}

impl CacheStats {
    /// Hits over hits plus misses (0 when there was no lookup).
    pub fn hit_ratio(&self) -> f64 {
        let total = self.hits + self.misses;
        if total == 0 {
            0.0
        } else {
            self.hits as f64 / total as f64
        }
    }
}
