//! The engine's settings and their validation.

use std::path::PathBuf;
use std::sync::Arc;

use corebuf_shard::cache::CacheConfig;
use corebuf_shard::io::QueueConfig;

use crate::engine::Engine;
use crate::mesh::MeshConfig;
use crate::{Error, Result};

/// How long an idle shard keeps polling its rings before it sleeps: see
/// [`EngineBuilder::poll_before_sleep`] and docs/BENCHMARKS.md for the measurement.
pub const DEFAULT_POLL_BEFORE_SLEEP: std::time::Duration = std::time::Duration::from_micros(200);

/// Builds an [`Engine`]. Every setting has a default except the path.
///
/// # Examples
/// ```no_run
/// let engine = corebuf::Engine::builder()
///     .path("/var/lib/kv/data")
///     .block_size_bytes(4096)
///     .cache_size_bytes(1 << 30)
///     .build()?;
/// # Ok::<(), corebuf::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct EngineBuilder {
    pub(crate) path: Option<PathBuf>,
    pub(crate) block_size_bytes: usize,
    pub(crate) cache_size_bytes: u64,
    pub(crate) shards: Option<usize>,
    pub(crate) range_blocks: u64,
    pub(crate) writebacks_in_flight_max: usize,
    pub(crate) io_depth_max: usize,
    pub(crate) pins_per_session_max: usize,
    pub(crate) inbox_capacity: usize,
    pub(crate) handlers_in_flight_max: usize,
    pub(crate) pin_threads: bool,
    pub(crate) io_memory_bytes: usize,
    pub(crate) spin_before_park: std::time::Duration,
    pub(crate) ring_credits: usize,
    pub(crate) poll_before_sleep: std::time::Duration,
    pub(crate) delivery_seed: Option<u64>,
    pub(crate) log_size_bytes: u64,
    pub(crate) log_path: Option<PathBuf>,
    pub(crate) read_check: Option<ReadCheck>,
    pub(crate) write_seal: Option<WriteSeal>,
    pub(crate) dirty_high_percent: u8,
    pub(crate) dirty_low_percent: u8,
}

/// The function of [`EngineBuilder::check_on_read`].
type ReadCheckFn = dyn Fn(u64, &[u8]) -> std::result::Result<(), String> + Send + Sync;

/// A check of every block read from the device (see [`EngineBuilder::check_on_read`]).
#[derive(Clone)]
pub(crate) struct ReadCheck(pub(crate) Arc<ReadCheckFn>);

impl std::fmt::Debug for ReadCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReadCheck")
    }
}

/// The function of [`EngineBuilder::seal_on_write`].
type WriteSealFn = dyn Fn(u64, &mut [u8]) + Send + Sync;

/// A change made to every block just before it is written (see
/// [`EngineBuilder::seal_on_write`]).
#[derive(Clone)]
pub(crate) struct WriteSeal(pub(crate) Arc<WriteSealFn>);

impl std::fmt::Debug for WriteSeal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriteSeal")
    }
}

impl Default for EngineBuilder {
    fn default() -> Self {
        EngineBuilder {
            path: None,
            block_size_bytes: 4096,
            cache_size_bytes: 256 << 20,
            shards: None,
            range_blocks: 64,
            writebacks_in_flight_max: 32,
            io_depth_max: 128,
            pins_per_session_max: 8,
            inbox_capacity: 1024,
            handlers_in_flight_max: 1024,
            pin_threads: true,
            io_memory_bytes: 4 << 20,
            spin_before_park: std::time::Duration::ZERO,
            ring_credits: 128,
            poll_before_sleep: DEFAULT_POLL_BEFORE_SLEEP,
            delivery_seed: None,
            log_size_bytes: 0,
            log_path: None,
            read_check: None,
            write_seal: None,
            dirty_high_percent: CacheConfig::default().dirty_high_percent,
            dirty_low_percent: CacheConfig::default().dirty_low_percent,
        }
    }
}

impl EngineBuilder {
    /// The file or block device holding the data (must exist; its size is the device size).
    pub fn path(mut self, path: impl Into<PathBuf>) -> Self {
        self.path = Some(path.into());
        self
    }

    /// Block size in bytes: a power of two, a multiple of the device's logical block size,
    /// at most 64 KiB. Default 4096.
    pub fn block_size_bytes(mut self, bytes: usize) -> Self {
        self.block_size_bytes = bytes;
        self
    }

    /// Buffer bytes of the whole engine, split evenly over the shards. Default 256 MiB.
    pub fn cache_size_bytes(mut self, bytes: u64) -> Self {
        self.cache_size_bytes = bytes;
        self
    }

    /// Number of shards (one executor thread each). Default: one per online core.
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = Some(shards);
        self
    }

    /// Consecutive blocks that share an owner shard. Default 64.
    pub fn range_blocks(mut self, blocks: u64) -> Self {
        self.range_blocks = blocks;
        self
    }

    /// Write-backs in flight per shard. Default 32.
    pub fn writebacks_in_flight_max(mut self, max: usize) -> Self {
        self.writebacks_in_flight_max = max;
        self
    }

    /// Background write-back: a shard starts writing dirty buffers when more than `high`
    /// percent of its frames are dirty, and stops when `low` percent are left unwritten.
    /// Default 50 and 25 (dm-bufio's write-back of a cache that alone holds its changes). A
    /// server whose log holds every change ([`EngineBuilder::log_size_bytes`]) may set them
    /// high: its buffers then reach the device at checkpoints and evictions rather than in
    /// the middle of its log commits, whose flushes wait for every write in flight.
    pub fn dirty_percent(mut self, high: u8, low: u8) -> Self {
        self.dirty_high_percent = high;
        self.dirty_low_percent = low;
        self
    }

    /// Reads and writes in flight per shard (request buffers). Default 128.
    pub fn io_depth_max(mut self, max: usize) -> Self {
        self.io_depth_max = max;
        self
    }

    /// The deadlock rule's bound: buffers one session may pin at once. Default 8.
    pub fn pins_per_session_max(mut self, max: usize) -> Self {
        self.pins_per_session_max = max;
        self
    }

    /// Capacity of each shard's client ingress queue ([`Client`](crate::Client) calls wait
    /// when it is full). Default 1024.
    pub fn inbox_capacity(mut self, capacity: usize) -> Self {
        self.inbox_capacity = capacity;
        self
    }

    /// Client requests (misses, jobs, barriers) a shard serves in tasks at once; further ones
    /// wait in its ingress queue. Requests from other shards are bounded by
    /// [`EngineBuilder::ring_capacity`] instead and never wait behind clients. Default 1024.
    pub fn handlers_in_flight_max(mut self, max: usize) -> Self {
        self.handlers_in_flight_max = max;
        self
    }

    /// Requests one shard may have in flight to another (the credits of a shard-to-shard
    /// ring); a sender waits for a reply beyond that. Default 128, as Seastar's queues.
    pub fn ring_capacity(mut self, requests: usize) -> Self {
        self.ring_credits = requests;
        self
    }

    /// How long a shard with nothing to do keeps polling its rings before it sleeps (and
    /// must be woken through the kernel, about 60 µs at p50 on the 2-vCPU reference VM). Zero
    /// sleeps at once. Default [`DEFAULT_POLL_BEFORE_SLEEP`], chosen from measurements on that
    /// VM (docs/BENCHMARKS.md): under a steady stream of messages the pollers rarely sleep;
    /// an idle shard polls for that long after its last message and then costs nothing.
    pub fn poll_before_sleep(mut self, poll: std::time::Duration) -> Self {
        self.poll_before_sleep = poll;
        self
    }

    /// For deterministic simulation: shards drain their rings in an order drawn from `seed`
    /// (which peer first, how many messages, yields in between) instead of round-robin
    /// batches. Meant for [`LocalEngine`](crate::LocalEngine), where every shard shares one
    /// thread and a seed then replays exactly.
    pub fn delivery_seed(mut self, seed: u64) -> Self {
        self.delivery_seed = Some(seed);
        self
    }

    /// Whether each shard's thread is pinned to a core (shard `i` on the `i`-th allowed CPU,
    /// wrapping). Default true.
    pub fn pin_threads(mut self, pin: bool) -> Self {
        self.pin_threads = pin;
        self
    }

    /// Locked memory glommio registers per shard for DMA reads. Default 4 MiB.
    pub fn io_memory_bytes(mut self, bytes: usize) -> Self {
        self.io_memory_bytes = bytes;
        self
    }

    /// How long an idle shard spins before it parks its thread. Default zero (park at once).
    /// A short spin (50 µs measured) cuts a cross-shard round trip from ~60 µs to ~17 µs at
    /// p50 on a VM, where waking a parked thread is slow, at the price of that much CPU each
    /// time a shard runs out of work.
    pub fn spin_before_park(mut self, spin: std::time::Duration) -> Self {
        self.spin_before_park = spin;
        self
    }

    /// Bytes of each shard's write-ahead log region (see [`crate::ShardLog`]): a multiple of
    /// the block size, at least 16 blocks. Default 0: no log.
    pub fn log_size_bytes(mut self, bytes: u64) -> Self {
        self.log_size_bytes = bytes;
        self
    }

    /// The log file (created if missing). Default: the data path with `.log` appended.
    pub fn log_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.log_path = Some(path.into());
        self
    }

    /// Checks every block as it is read from the device, before it is cached (a checksum,
    /// say): an `Err(reason)` fails the read with an [`Error::Io`] of kind `InvalidData` that
    /// names the block, and the block is not cached. Cache hits are not checked again. Default:
    /// none.
    pub fn check_on_read(
        mut self,
        check: impl Fn(u64, &[u8]) -> std::result::Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.read_check = Some(ReadCheck(Arc::new(check)));
        self
    }

    /// Changes every block just before each write of it to the device (a checksum over its
    /// bytes, say, as dm-bufio's `write_callback`): `seal(block, bytes)` runs on the cached
    /// bytes, so its change is both written and kept in the cache. A caller that seals here
    /// need not seal on every change of a cached block; the write waits while the block's
    /// bytes are borrowed. Default: none.
    pub fn seal_on_write(mut self, seal: impl Fn(u64, &mut [u8]) + Send + Sync + 'static) -> Self {
        self.write_seal = Some(WriteSeal(Arc::new(seal)));
        self
    }

    pub(crate) fn shard_count(&self) -> usize {
        self.shards.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// The partition's `on_read` hook for [`EngineBuilder::check_on_read`].
    pub(crate) fn read_hook(
        &self,
        path: &std::path::Path,
    ) -> Option<corebuf_shard::cache::ReadHook> {
        let check = self.read_check.clone()?;
        let (path, block_bytes) = (path.to_path_buf(), self.block_size_bytes as u64);
        Some(Box::new(move |block, data| {
            (check.0)(block, data).map_err(|reason| {
                let source = std::io::Error::new(std::io::ErrorKind::InvalidData, reason);
                Error::io(crate::IoOp::Read, &path, block * block_bytes, source).with_block(block)
            })
        }))
    }

    /// The partition's `on_write` hook for [`EngineBuilder::seal_on_write`].
    pub(crate) fn write_hook(&self) -> Option<corebuf_shard::cache::Hook<()>> {
        let seal = self.write_seal.clone()?;
        Some(Box::new(move |block, data, _aux| (seal.0)(block, data)))
    }

    pub(crate) fn queue_config(&self) -> QueueConfig {
        QueueConfig {
            block_size_bytes: self.block_size_bytes,
            io_depth_max: self.io_depth_max,
            writebacks_in_flight_max: self.writebacks_in_flight_max,
        }
    }

    pub(crate) fn mesh_config(&self) -> MeshConfig {
        MeshConfig {
            credits: self.ring_credits,
            ingress_capacity: self.inbox_capacity,
            client_handlers_max: self.handlers_in_flight_max,
            poll_before_sleep: self.poll_before_sleep,
            delivery_seed: self.delivery_seed,
            batch_max: 64,
        }
    }

    pub(crate) fn cache_config(&self) -> CacheConfig {
        CacheConfig {
            cache_size_bytes: self.cache_size_bytes / self.shard_count().max(1) as u64,
            pins_per_session_max: self.pins_per_session_max,
            dirty_high_percent: self.dirty_high_percent,
            dirty_low_percent: self.dirty_low_percent,
        }
    }

    /// Checks what can be checked without opening the device (the shards check the rest).
    pub(crate) fn validate(&self) -> Result<PathBuf> {
        let Some(path) = self.path.clone() else {
            return Err(Error::config("path", "no path given"));
        };
        self.validate_settings()?;
        Ok(path)
    }

    /// [`EngineBuilder::validate`] less the path.
    pub(crate) fn validate_settings(&self) -> Result<()> {
        let shards = self.shard_count();
        if shards == 0 {
            return Err(Error::config("shards", "must be at least 1"));
        }
        if shards > 1024 {
            return Err(Error::config("shards", format!("{shards} is more than 1024")));
        }
        if self.range_blocks == 0 {
            return Err(Error::config("range_blocks", "must be at least 1"));
        }
        if self.inbox_capacity == 0 || self.handlers_in_flight_max == 0 {
            return Err(Error::config("inbox_capacity", "must be at least 1"));
        }
        if !(1..=1 << 16).contains(&self.ring_credits) {
            return Err(Error::config("ring_capacity", "must be between 1 and 65536"));
        }
        if self.dirty_low_percent > self.dirty_high_percent || self.dirty_high_percent > 100 {
            return Err(Error::config(
                "dirty_percent",
                format!(
                    "high {} and low {}: needs low <= high <= 100",
                    self.dirty_high_percent, self.dirty_low_percent
                ),
            ));
        }
        if self.cache_size_bytes / (shards as u64) < self.block_size_bytes as u64 {
            return Err(Error::config(
                "cache_size_bytes",
                format!(
                    "{} bytes over {shards} shards leaves less than one {}-byte block per shard",
                    self.cache_size_bytes, self.block_size_bytes
                ),
            ));
        }
        Ok(())
    }

    /// Validates the settings, opens the device once per shard and starts the shards.
    pub fn build(self) -> Result<Engine> {
        Engine::start(self)
    }
}
