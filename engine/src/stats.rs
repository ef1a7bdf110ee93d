//! Engine statistics: per shard and summed.

use corebuf_shard::cache::CacheStats;
use corebuf_shard::io::{LatencyHistogram, QueueStats};

pub(crate) fn new_histogram() -> LatencyHistogram {
    LatencyHistogram::new_with_bounds(1, 60_000_000, 2).expect("constant bounds are valid")
}

/// One shard's statistics.
#[derive(Clone, Debug)]
pub struct ShardStats {
    /// The shard's index.
    pub shard: usize,
    /// Its cache partition's counters.
    pub cache: CacheStats,
    /// Its I/O queue's counters and latency histograms.
    pub queue: QueueStats,
    /// Cross-shard messages this shard sent.
    pub messages_sent: u64,
    /// Messages this shard received (from shards and clients).
    pub messages_received: u64,
    /// Received messages served inline by the poller (cache hits, prefetch, stats), without
    /// a task.
    pub messages_inline: u64,
    /// Times the shard's poller went to sleep (ran out of work and past its polling period).
    pub poller_sleeps: u64,
    /// Times this shard woke a sleeping shard by sending it a message or a reply.
    pub wakeups_sent: u64,
    /// Global barriers this shard coordinated.
    pub barriers: u64,
    /// Latency of the barriers it coordinated, µs.
    pub barrier_latency_us: LatencyHistogram,
}

/// Statistics of the whole engine: every shard's, and their sum.
#[derive(Clone, Debug)]
pub struct EngineStats {
    /// Per shard, by index.
    pub shards: Vec<ShardStats>,
}

impl EngineStats {
    /// The cache counters summed over shards.
    pub fn cache(&self) -> CacheStats {
        let mut sum = CacheStats::default();
        for s in &self.shards {
            let c = &s.cache;
            sum.hits += c.hits;
            sum.misses += c.misses;
            sum.joins += c.joins;
            sum.news += c.news;
            sum.evictions += c.evictions;
            sum.writebacks += c.writebacks;
            sum.write_errors += c.write_errors;
            sum.read_errors += c.read_errors;
            sum.frame_waits += c.frame_waits;
            sum.session_waits += c.session_waits;
            sum.prefetch_reads += c.prefetch_reads;
            sum.prefetch_skipped += c.prefetch_skipped;
            sum.zero_fills += c.zero_fills;
            sum.pinned += c.pinned;
            sum.dirty += c.dirty;
            sum.orphaned += c.orphaned;
            sum.frames += c.frames;
        }
        sum
    }

    /// The queue counters summed over shards, histograms merged.
    pub fn queue(&self) -> QueueStats {
        let mut sum = QueueStats::default();
        for s in &self.shards {
            let q = &s.queue;
            sum.in_flight += q.in_flight;
            sum.writebacks_in_flight += q.writebacks_in_flight;
            sum.writebacks_in_flight_peak =
                sum.writebacks_in_flight_peak.max(q.writebacks_in_flight_peak);
            sum.reads_completed += q.reads_completed;
            sum.writes_completed += q.writes_completed;
            sum.writebacks_completed += q.writebacks_completed;
            sum.flushes_completed += q.flushes_completed;
            sum.bytes_read += q.bytes_read;
            sum.bytes_written += q.bytes_written;
            sum.errors += q.errors;
            sum.submit_waits += q.submit_waits;
            let _ = sum.read_latency_us.add(&q.read_latency_us);
            let _ = sum.write_latency_us.add(&q.write_latency_us);
            let _ = sum.flush_latency_us.add(&q.flush_latency_us);
        }
        sum
    }

    /// Cross-shard messages sent, summed.
    pub fn messages_sent(&self) -> u64 {
        self.shards.iter().map(|s| s.messages_sent).sum()
    }

    /// Barriers coordinated, summed.
    pub fn barriers(&self) -> u64 {
        self.shards.iter().map(|s| s.barriers).sum()
    }
}
