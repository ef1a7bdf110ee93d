//! The thread-safe client: reaches the shards from any thread or runtime.

use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;

use corebuf_shard::io::{Device, DmaDevice};

use crate::router::Router;
use crate::shard::{ask, check_block_data, check_span, oneshot, run_message, Inboxes, Msg, Shard};
use crate::stats::{EngineStats, ShardStats};
use crate::Result;

/// A handle to the engine for code outside its executors: `Send + Sync + Clone`, and every
/// operation is a runtime-agnostic future (glommio wakes its tasks correctly from any thread,
/// and the replies travel over ordinary async channels). Blocking forms are provided for plain
/// threads.
///
/// Each call is a message to the owning shard and a reply: a copy in each direction.
pub struct Client<D: Device + 'static = DmaDevice> {
    pub(crate) inboxes: Inboxes<D>,
    pub(crate) router: Arc<Router>,
    pub(crate) block_size: usize,
    pub(crate) device_blocks: u64,
}

impl<D: Device + 'static> Clone for Client<D> {
    fn clone(&self) -> Self {
        Client {
            inboxes: Arc::clone(&self.inboxes),
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

    async fn ask<T>(
        &self,
        shard: usize,
        msg: Msg<D>,
        answer: async_channel::Receiver<T>,
    ) -> Result<T> {
        ask(&self.inboxes, shard, msg, answer).await
    }

    /// A copy of `block`'s data.
    pub async fn read(&self, block: u64) -> Result<Vec<u8>> {
        check_span(block, 1, self.device_blocks)?;
        let (reply, answer) = oneshot();
        let owner = self.owner_of(block);
        self.ask(owner, Msg::Read { block, reply }, answer).await?
    }

    /// Writes a whole block (`data.len()` must be the block size). It is cached and dirty
    /// when this returns; [`Client::flush`] makes it durable.
    pub async fn write(&self, block: u64, data: &[u8]) -> Result<()> {
        check_span(block, 1, self.device_blocks)?;
        check_block_data(data, self.block_size)?;
        let (reply, answer) = oneshot();
        let owner = self.owner_of(block);
        let msg = Msg::Write { block, data: data.to_vec(), reply };
        self.ask(owner, msg, answer).await?
    }

    /// Starts reads of `block..block + count`, split by owner. Does not wait for the reads.
    pub async fn prefetch(&self, block: u64, count: u64) -> Result<()> {
        check_span(block, count, self.device_blocks)?;
        for (owner, first, n) in self.router.split(block, count) {
            let msg = Msg::Prefetch { block: first, count: n };
            self.inboxes[owner].send(msg).await?;
        }
        Ok(())
    }

    /// The global flush barrier (see [`Shard::flush`]), coordinated by shard 0.
    pub async fn flush(&self) -> Result<()> {
        let (reply, answer) = oneshot();
        self.ask(0, Msg::Barrier { reply }, answer).await?
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
        let (msg, answer) = run_message(self.shard_count(), shard, job)?;
        self.ask(shard, msg, answer).await
    }

    /// Every shard's statistics.
    pub async fn stats(&self) -> Result<EngineStats> {
        let mut shards: Vec<ShardStats> = Vec::with_capacity(self.shard_count());
        for shard in 0..self.shard_count() {
            let (reply, answer) = oneshot();
            shards.push(self.ask(shard, Msg::Stats { reply }, answer).await?);
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
