//! One shard's runtime: its partition, its end of the message layer, and the routed
//! operations that code running on the shard uses.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use corebuf_shard::cache::{Hooks, Partition};
use corebuf_shard::io::{Device, DmaDevice, IoQueue};

use crate::builder::EngineBuilder;
use crate::mesh::{job_answer, job_box, stats_answer, Mesh, Op, Port};
use crate::router::Router;
use crate::routing::{check_block_data, check_shard, check_span};
use crate::stats::{new_histogram, ShardStats};
use crate::{Error, Result};

thread_local! {
    /// The shard of this thread's executor, in the threaded engine (a simulated engine hosts
    /// several shards on one thread and sets none).
    pub(crate) static CURRENT: RefCell<Option<Rc<Shard>>> = const { RefCell::new(None) };
}

/// One shard, as seen by code running on its executor: the local partition (zero-copy) and
/// routed operations that reach any block through its owner.
///
/// The device type is the production [`DmaDevice`] unless the engine was started over another
/// [`Device`] (a simulated one: see [`LocalEngine`](crate::LocalEngine)).
pub struct Shard<D: Device + 'static = DmaDevice> {
    id: usize,
    /// This shard's own `Rc`, for jobs it runs on itself.
    me: std::rc::Weak<Shard<D>>,
    partition: Partition<D>,
    router: Router,
    port: Port<D>,
    barriers: Cell<u64>,
    barrier_latency_us: RefCell<corebuf_shard::io::LatencyHistogram>,
    /// The shard's log, when the engine has one (set once, after the shard opens).
    log: std::cell::OnceCell<crate::log::ShardLog>,
}

impl<D: Device + 'static> std::fmt::Debug for Shard<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Shard {
    /// The shard running on this thread, if this thread is a shard's executor.
    pub fn current() -> Option<Rc<Shard>> {
        CURRENT.with(|current| current.borrow().clone())
    }
}

impl<D: Device + 'static> Shard<D> {
    /// Opens this shard's queue and partition over its handle of the device.
    pub(crate) fn open(
        id: usize,
        builder: &EngineBuilder,
        device: D,
        mesh: Arc<Mesh<D>>,
    ) -> Result<Rc<Shard<D>>> {
        let path = device.path().to_path_buf();
        let queue = IoQueue::new(device, builder.queue_config())?;
        let hooks = Hooks {
            on_read: builder.read_hook(&path),
            on_write: builder.write_hook(),
            ..Hooks::default()
        };
        let partition = Partition::new(queue, builder.cache_config(), hooks)?;
        let router = Router::new(mesh.shards(), builder.range_blocks);
        Ok(Rc::new_cyclic(|me| Shard {
            id,
            me: me.clone(),
            port: Port::new(id, mesh, partition.block_size()),
            partition,
            router,
            barriers: Cell::new(0),
            barrier_latency_us: RefCell::new(new_histogram()),
            log: std::cell::OnceCell::new(),
        }))
    }

    /// Gives the shard its log (once, right after it opens).
    pub(crate) fn set_log(&self, log: crate::log::ShardLog) {
        assert!(self.log.set(log).is_ok(), "a shard's log is set once");
    }

    pub(crate) fn port(&self) -> &Port<D> {
        &self.port
    }

    /// This shard's index.
    pub fn id(&self) -> usize {
        self.id
    }

    /// The number of shards in the engine.
    pub fn shard_count(&self) -> usize {
        self.router.shards()
    }

    /// The shard that owns `block`.
    pub fn owner_of(&self, block: u64) -> usize {
        self.router.shard_of(block)
    }

    /// Whether this shard owns `block` (then [`Shard::partition`] reaches it without a copy).
    pub fn owns(&self, block: u64) -> bool {
        self.router.shard_of(block) == self.id
    }

    /// This shard's cache partition, for zero-copy access to the blocks it owns. Touching a
    /// block another shard owns through it would cache the block twice: use the routed
    /// operations for those.
    pub fn partition(&self) -> &Partition<D> {
        &self.partition
    }

    /// This shard's write-ahead log, when the engine was built with
    /// [`EngineBuilder::log_size_bytes`](crate::EngineBuilder::log_size_bytes).
    pub fn log(&self) -> Option<&crate::log::ShardLog> {
        self.log.get()
    }

    /// The device size in blocks.
    pub fn device_blocks(&self) -> u64 {
        self.partition.device_blocks()
    }

    /// The block size in bytes.
    pub fn block_size(&self) -> usize {
        self.partition.block_size()
    }

    /// A copy of `block`'s data, from its owner (locally when this shard owns it).
    pub async fn read(&self, block: u64) -> Result<Vec<u8>> {
        let mut data = vec![0u8; self.block_size()];
        self.read_into(block, &mut data).await?;
        Ok(data)
    }

    /// Copies `block`'s data into `out` (exactly one block long), from its owner. No
    /// allocation: a remote block comes back in a buffer the message layer reuses.
    pub async fn read_into(&self, block: u64, out: &mut [u8]) -> Result<()> {
        check_block_data(out, self.block_size())?;
        self.read_with(block, |data| out.copy_from_slice(data)).await
    }

    /// Runs `f` on `block`'s data, from its owner: in place for a local block; for a remote one
    /// in place too when it hits the owner's cache (the owner lends the bytes and keeps them
    /// unchanged until `f` returns), else on the one copy the owner made.
    pub async fn read_with<R>(&self, block: u64, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        check_span(block, 1, self.device_blocks())?;
        let owner = self.owner_of(block);
        if owner == self.id {
            return self.read_local_with(block, f).await;
        }
        let answer = self.port.call(owner, Op::Borrow { block }, |_| {}).await?;
        Ok(answer.with_buf(f))
    }

    /// Writes a whole block (`data.len()` must be the block size) through its owner. The write
    /// is in the owner's cache, dirty, when this returns; a barrier makes it durable.
    pub async fn write(&self, block: u64, data: &[u8]) -> Result<()> {
        check_span(block, 1, self.device_blocks())?;
        check_block_data(data, self.block_size())?;
        let owner = self.owner_of(block);
        if owner == self.id {
            return self.write_local(block, data).await;
        }
        let fill = |buf: &mut [u8]| buf.copy_from_slice(data);
        self.port.call(owner, Op::Write { block }, fill).await.map(drop)
    }

    /// Starts reads of `block..block + count`, split by owner; never waits. A part whose
    /// owner has no room for it now is skipped, as prefetch may skip under pressure.
    pub fn prefetch(&self, block: u64, count: u64) -> Result<()> {
        check_span(block, count, self.device_blocks())?;
        for (owner, first, n) in self.router.split(block, count) {
            if owner == self.id {
                self.partition.prefetch(first, n)?;
            } else {
                self.port.prefetch(owner, first, n)?;
            }
        }
        Ok(())
    }

    /// The global flush barrier: every shard writes back the buffers dirtied before the call
    /// and waits, then the device is flushed once. Returns the first write error of any shard,
    /// else the flush's error.
    pub async fn flush(&self) -> Result<()> {
        let started = Instant::now();
        // Every other shard's write-back runs while this one writes its own.
        let others = (0..self.shard_count())
            .filter(|&s| s != self.id)
            .map(|shard| self.port.call(shard, Op::WriteBack, |_| {}));
        let others = futures_lite::future::zip(
            join_all(others.collect()),
            self.partition.write_back_dirty(),
        );
        let (answers, local) = others.await;
        let mut first_error = local.err();
        for answer in answers {
            match answer {
                // The engine is shutting down and refused a part: this barrier cannot cover
                // every shard, and shutdown writes back and flushes each shard itself.
                Err(Error::ShutDown) => return Err(Error::ShutDown),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
                Ok(_) => {}
            }
        }
        let flushed = self.partition.issue_flush().await;
        self.barriers.set(self.barriers.get() + 1);
        let us = (started.elapsed().as_micros() as u64).clamp(1, 60_000_000);
        let _ = self.barrier_latency_us.borrow_mut().record(us);
        match first_error {
            Some(e) => Err(e),
            None => flushed,
        }
    }

    /// Runs `job` on the shard that owns `block` and returns its result. The closure gets that
    /// shard, with zero-copy access to its partition.
    pub async fn run_on_owner<T, F, Fut>(&self, block: u64, job: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Rc<Shard<D>>) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
    {
        self.run_on(self.owner_of(block), job).await
    }

    /// Runs `job` on shard `shard` and returns its result (on this shard's own executor, as a
    /// task, when `shard` is this one).
    pub async fn run_on<T, F, Fut>(&self, shard: usize, job: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Rc<Shard<D>>) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
    {
        check_shard(shard, self.shard_count())?;
        if shard == self.id {
            let me = self.self_rc();
            return Ok(glommio::spawn_local(job(me)).await);
        }
        let mut answer = self.port.call(shard, Op::Run(job_box(job)), |_| {}).await?;
        Ok(job_answer(answer.take_payload()))
    }

    /// This shard's statistics.
    pub fn stats(&self) -> ShardStats {
        let port = self.port.stats();
        ShardStats {
            shard: self.id,
            cache: self.partition.stats(),
            queue: self.partition.queue().stats(),
            messages_sent: port.sent,
            messages_received: port.received,
            messages_inline: port.inline,
            poller_sleeps: port.sleeps,
            wakeups_sent: port.wakeups_sent,
            barriers: self.barriers.get(),
            barrier_latency_us: self.barrier_latency_us.borrow().clone(),
        }
    }

    /// Every shard's statistics (this one's without a message).
    pub async fn engine_stats(&self) -> Result<crate::EngineStats> {
        let mut shards = Vec::with_capacity(self.shard_count());
        for shard in 0..self.shard_count() {
            if shard == self.id {
                shards.push(self.stats());
            } else {
                let mut answer = self.port.call(shard, Op::Stats, |_| {}).await?;
                shards.push(stats_answer(answer.take_payload()));
            }
        }
        Ok(crate::EngineStats { shards })
    }

    /// The `Rc` of this shard, for jobs run on it.
    fn self_rc(&self) -> Rc<Shard<D>> {
        self.me.upgrade().expect("a shard in use is held by its engine")
    }

    /// The end of a shard: writes back and flushes, then waits for the I/O still in flight
    /// (prefetches, and for up to 10 s reads whose callers gave up while the kernel was
    /// filling their frames: past that, glommio keeps their memory rather than freeing it
    /// under them). The caller closes the device.
    pub(crate) async fn stop(&self) -> Result<()> {
        let flushed = self.partition.write_dirty().await;
        let logged = match self.log.get() {
            // Marked empty only if this shard's blocks are durable.
            Some(log) => log.close(flushed.is_ok()).await,
            None => Ok(()),
        };
        let synced = self.partition.queue().sync().await;
        let abandoned = async {
            self.partition.wait_abandoned_reads().await;
            Ok(())
        };
        let _ = glommio::timer::timeout(std::time::Duration::from_secs(10), abandoned).await;
        flushed.and(logged).and(synced)
    }

    /// Runs `f` on the local `block`'s bytes, read from the device on a miss.
    pub(crate) async fn read_local_with<R>(
        &self,
        block: u64,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R> {
        let session = self.partition.session().await;
        let buf = session.read(block).await?;
        let data = until_unborrowed(|| buf.try_data()).await?;
        Ok(f(&data))
    }

    /// Writes the local `block` from `data`.
    pub(crate) async fn write_local(&self, block: u64, data: &[u8]) -> Result<()> {
        let session = self.partition.session().await;
        let buf = session.new_block(block).await?;
        until_unborrowed(|| buf.try_data_mut()).await?.copy_from_slice(data);
        buf.mark_dirty();
        Ok(())
    }
}

/// Retries `borrow` while code on this shard holds the bytes across an await (zero-copy access
/// through the partition): a routed read or write waits for the borrow to end rather than fail
/// or change bytes under the borrower (regression test
/// `regression_routed_write_on_borrowed_buffer`).
async fn until_unborrowed<T>(mut borrow: impl FnMut() -> Result<T>) -> Result<T> {
    loop {
        match borrow() {
            Err(Error::BufferBusy { .. }) => glommio::executor().yield_task_queue_now().await,
            other => return other,
        }
    }
}

/// Awaits every future of `futures` concurrently, in order of the results.
async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.into_iter().map(|f| Some(Box::pin(f))).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (slot, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if let Some(future) = slot {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => {
                        *output = Some(value);
                        *slot = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().map(|o| o.expect("every future finished")).collect()
}
