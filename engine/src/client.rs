//! The thread-safe client: reaches the shards from any thread or runtime.

use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;

use corebuf_shard::io::{Device, DmaDevice};

use crate::mesh::{job_answer, job_box, stats_answer, Mesh, Op};
use crate::router::Router;
use crate::routing::{check_block_data, check_shard, check_span};
use crate::shard::Shard;
use crate::stats::{EngineStats, ShardStats};
use crate::Result;

/// A handle to the engine for code outside its executors: `Send + Sync + Clone`, and every
/// operation is a runtime-agnostic future (the shard completes it and wakes its waker from its
/// own thread). Blocking forms are provided for plain threads.
///
/// Each call is a request on the owner shard's ingress queue, which the shard drains in
/// batches; a hit is answered inline. Many calls in flight (from one async task or many
/// threads) share the shard's turns, so throughput comes from concurrency, not threads.
pub struct Client<D: Device + 'static = DmaDevice> {
    pub(crate) mesh: Arc<Mesh<D>>,
    pub(crate) router: Arc<Router>,
    pub(crate) block_size: usize,
    pub(crate) device_blocks: u64,
}

impl<D: Device + 'static> Clone for Client<D> {
    fn clone(&self) -> Self {
        Client {
            mesh: Arc::clone(&self.mesh),
            router: Arc::clone(&self.router),
            block_size: self.block_size,
            device_blocks: self.device_blocks,
        }
    }
}

impl<D: Device + 'static> std::fmt::Debug for Client<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("shards", &self.router.shards()).finish_non_exhaustive()
    }
}

impl<D: Device + 'static> Client<D> {
    /// The block size in bytes.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The device size in blocks.
    pub fn device_blocks(&self) -> u64 {
        self.device_blocks
    }

    /// The number of shards.
    pub fn shard_count(&self) -> usize {
        self.router.shards()
    }

    /// The shard that owns `block`.
    pub fn owner_of(&self, block: u64) -> usize {
        self.router.shard_of(block)
    }

    /// A copy of `block`'s data.
    pub async fn read(&self, block: u64) -> Result<Vec<u8>> {
        check_span(block, 1, self.device_blocks)?;
        let owner = self.owner_of(block);
        // Empty: the owner fills it (writing the bytes once, not zeroes first).
        let data = Vec::with_capacity(self.block_size);
        let (_, data) = self.mesh.client_call(owner, Op::Read { block }, data).await?;
        Ok(data)
    }

    /// Writes a whole block (`data.len()` must be the block size). It is cached and dirty
    /// when this returns; [`Client::flush`] makes it durable.
    pub async fn write(&self, block: u64, data: &[u8]) -> Result<()> {
        check_span(block, 1, self.device_blocks)?;
        check_block_data(data, self.block_size)?;
        let owner = self.owner_of(block);
        self.mesh.client_call(owner, Op::Write { block }, data.to_vec()).await.map(drop)
    }

    /// Starts reads of `block..block + count`, split by owner; never waits. A part whose
    /// owner has no room for it now is skipped, as prefetch may skip under pressure.
    pub async fn prefetch(&self, block: u64, count: u64) -> Result<()> {
        check_span(block, count, self.device_blocks)?;
        for (owner, first, n) in self.router.split(block, count) {
            self.mesh.client_prefetch(owner, first, n)?;
        }
        Ok(())
    }

    /// The global flush barrier (see [`Shard::flush`]), coordinated by shard 0.
    pub async fn flush(&self) -> Result<()> {
        self.mesh.client_call(0, Op::Barrier, Vec::new()).await.map(drop)
    }

    /// Runs `job` on the shard that owns `block`, with zero-copy access to its partition.
    pub async fn run_on_owner<T, F, Fut>(&self, block: u64, job: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Rc<Shard<D>>) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
    {
        self.run_on(self.owner_of(block), job).await
    }

    /// Runs `job` on shard `shard`.
    pub async fn run_on<T, F, Fut>(&self, shard: usize, job: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Rc<Shard<D>>) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
    {
        check_shard(shard, self.shard_count())?;
        let (payload, _) = self.mesh.client_call(shard, Op::Run(job_box(job)), Vec::new()).await?;
        Ok(job_answer(payload))
    }

    /// Every shard's statistics.
    pub async fn stats(&self) -> Result<EngineStats> {
        let mut shards: Vec<ShardStats> = Vec::with_capacity(self.shard_count());
        for shard in 0..self.shard_count() {
            let (payload, _) = self.mesh.client_call(shard, Op::Stats, Vec::new()).await?;
            shards.push(stats_answer(payload));
        }
        Ok(EngineStats { shards })
    }

    /// [`Client::read`], blocking the calling thread. Not for use inside an async runtime.
    pub fn read_blocking(&self, block: u64) -> Result<Vec<u8>> {
        futures_lite::future::block_on(self.read(block))
    }

    /// [`Client::write`], blocking the calling thread.
    pub fn write_blocking(&self, block: u64, data: &[u8]) -> Result<()> {
        futures_lite::future::block_on(self.write(block, data))
    }

    /// [`Client::prefetch`], blocking the calling thread.
    pub fn prefetch_blocking(&self, block: u64, count: u64) -> Result<()> {
        futures_lite::future::block_on(self.prefetch(block, count))
    }

    /// [`Client::flush`], blocking the calling thread.
    pub fn flush_blocking(&self) -> Result<()> {
        futures_lite::future::block_on(self.flush())
    }

    /// [`Client::stats`], blocking the calling thread.
    pub fn stats_blocking(&self) -> Result<EngineStats> {
        futures_lite::future::block_on(self.stats())
    }
}
