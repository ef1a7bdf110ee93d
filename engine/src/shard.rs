//! One shard's runtime: its partition, its inbox, and the routed operations that code running
//! on the shard uses.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use corebuf_shard::cache::{Hooks, Partition};
use corebuf_shard::io::{DmaDevice, IoQueue};
use corebuf_shard::WaitList;

use crate::builder::EngineBuilder;
use crate::router::Router;
use crate::stats::{new_histogram, ShardStats};
use crate::{Error, Result};

/// A job sent to a shard: a closure that builds a future on the shard's executor.
pub(crate) type Job = Box<dyn FnOnce(Rc<Shard>) -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// A one-shot reply channel.
pub(crate) type Reply<T> = async_channel::Sender<T>;

pub(crate) fn oneshot<T>() -> (Reply<T>, async_channel::Receiver<T>) {
    async_channel::bounded(1)
}

/// What one shard can be asked to do by another shard or a [`Client`](crate::Client).
pub(crate) enum Msg {
    Read {
        block: u64,
        reply: Reply<Result<Vec<u8>>>,
    },
    Write {
        block: u64,
        data: Vec<u8>,
        reply: Reply<Result<()>>,
    },
    Prefetch {
        block: u64,
        count: u64,
    },
    /// The first phase of the global barrier: write back this shard's dirty buffers.
    WriteBack {
        reply: Reply<Result<()>>,
    },
    /// A whole global barrier, coordinated by the receiving shard.
    Barrier {
        reply: Reply<Result<()>>,
    },
    Stats {
        reply: Reply<ShardStats>,
    },
    Run(Job),
}

impl Msg {
    /// Control messages (a barrier's parts, prefetch, stats) never wait on anything but the
    /// device, so they travel in their own lane that handler back-pressure does not stop:
    /// otherwise a shard whose handler slots are all taken by jobs waiting for a barrier could
    /// never serve that barrier's write-back request.
    fn is_control(&self) -> bool {
        matches!(
            self,
            Msg::Prefetch { .. } | Msg::WriteBack { .. } | Msg::Barrier { .. } | Msg::Stats { .. }
        )
    }
}

/// One shard's two inboxes: work (reads, writes, jobs; served by at most
/// `handlers_in_flight_max` handlers) and control.
#[derive(Debug)]
pub(crate) struct Inbox {
    work: async_channel::Sender<Msg>,
    control: async_channel::Sender<Msg>,
}

/// The receiving ends of an [`Inbox`], for the shard that owns it.
pub(crate) struct InboxReceiver {
    work: async_channel::Receiver<Msg>,
    control: async_channel::Receiver<Msg>,
}

impl Inbox {
    /// A shard's inbox, each lane bounded at `capacity`.
    pub(crate) fn bounded(capacity: usize) -> (Inbox, InboxReceiver) {
        let (work, work_rx) = async_channel::bounded(capacity);
        let (control, control_rx) = async_channel::bounded(capacity);
        (Inbox { work, control }, InboxReceiver { work: work_rx, control: control_rx })
    }

    fn lane(&self, msg: &Msg) -> &async_channel::Sender<Msg> {
        if msg.is_control() {
            &self.control
        } else {
            &self.work
        }
    }

    /// Sends `msg`, waiting while its lane is full; `ShutDown` once the engine stopped.
    pub(crate) async fn send(&self, msg: Msg) -> Result<()> {
        self.lane(&msg).send(msg).await.map_err(|_| Error::ShutDown)
    }

    /// Sends `msg` if its lane has room now.
    pub(crate) fn try_send(&self, msg: Msg) -> bool {
        self.lane(&msg).try_send(msg).is_ok()
    }

    /// Closes both lanes: later sends fail, queued messages are still served.
    pub(crate) fn close(&self) {
        self.work.close();
        self.control.close();
    }
}

/// The inboxes of every shard, shared by shards and clients.
pub(crate) type Inboxes = Arc<[Inbox]>;

thread_local! {
    static CURRENT: RefCell<Option<Rc<Shard>>> = const { RefCell::new(None) };
}

/// One shard, as seen by code running on its executor: the local partition (zero-copy) and
/// routed operations that reach any block through its owner.
pub struct Shard {
    id: usize,
    partition: Partition<DmaDevice>,
    router: Router,
    inboxes: Inboxes,
    handlers_in_flight: Cell<usize>,
    control_in_flight: Cell<usize>,
    handlers_in_flight_max: usize,
    handler_done: WaitList,
    messages_sent: Cell<u64>,
    messages_received: Cell<u64>,
    barriers: Cell<u64>,
    barrier_latency_us: RefCell<corebuf_shard::io::LatencyHistogram>,
    log: Option<crate::log::ShardLog>,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Shard {
    /// Opens this shard's device handle, queue and partition.
    pub(crate) async fn open(
        id: usize,
        builder: &EngineBuilder,
        path: &std::path::Path,
        inboxes: Inboxes,
    ) -> Result<Rc<Shard>> {
        let device = DmaDevice::open(path).await?;
        let queue = IoQueue::new(device, builder.queue_config())?;
        let hooks = Hooks { on_read: builder.read_hook(path), ..Hooks::default() };
        let partition = Partition::new(queue, builder.cache_config(), hooks)?;
        let log = crate::log::ShardLog::open(id, builder, path).await?;
        let shard = Rc::new(Shard {
            id,
            partition,
            router: Router::new(inboxes.len(), builder.range_blocks),
            inboxes,
            handlers_in_flight: Cell::new(0),
            control_in_flight: Cell::new(0),
            handlers_in_flight_max: builder.handlers_in_flight_max,
            handler_done: WaitList::with_capacity(4),
            messages_sent: Cell::new(0),
            messages_received: Cell::new(0),
            barriers: Cell::new(0),
            barrier_latency_us: RefCell::new(new_histogram()),
            log,
        });
        CURRENT.with(|current| *current.borrow_mut() = Some(Rc::clone(&shard)));
        Ok(shard)
    }

    /// The shard running on this thread, if this thread is a shard's executor.
    pub fn current() -> Option<Rc<Shard>> {
        CURRENT.with(|current| current.borrow().clone())
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
    pub fn partition(&self) -> &Partition<DmaDevice> {
        &self.partition
    }

    /// This shard's write-ahead log, when the engine was built with
    /// [`EngineBuilder::log_size_bytes`](crate::EngineBuilder::log_size_bytes).
    pub fn log(&self) -> Option<&crate::log::ShardLog> {
        self.log.as_ref()
    }

    /// The device size in blocks.
    pub fn device_blocks(&self) -> u64 {
        self.partition.device_blocks()
    }

    /// The block size in bytes.
    pub fn block_size(&self) -> usize {
        self.partition.block_size()
    }

    async fn send(&self, shard: usize, msg: Msg) -> Result<()> {
        self.messages_sent.set(self.messages_sent.get() + 1);
        self.inboxes[shard].send(msg).await
    }

    /// [`ask`], counted as a message this shard sent.
    async fn ask<T>(
        &self,
        shard: usize,
        msg: Msg,
        answer: async_channel::Receiver<T>,
    ) -> Result<T> {
        self.messages_sent.set(self.messages_sent.get() + 1);
        ask(&self.inboxes, shard, msg, answer).await
    }

    /// A copy of `block`'s data, from its owner (locally when this shard owns it).
    pub async fn read(&self, block: u64) -> Result<Vec<u8>> {
        let owner = self.owner_of(block);
        if owner == self.id {
            return read_local(&self.partition, block).await;
        }
        let (reply, answer) = oneshot();
        self.ask(owner, Msg::Read { block, reply }, answer).await?
    }

    /// Writes a whole block (`data.len()` must be the block size) through its owner. The write
    /// is in the owner's cache, dirty, when this returns; a barrier makes it durable.
    pub async fn write(&self, block: u64, data: &[u8]) -> Result<()> {
        check_block_data(data, self.block_size())?;
        let owner = self.owner_of(block);
        if owner == self.id {
            return write_local(&self.partition, block, data).await;
        }
        let (reply, answer) = oneshot();
        self.ask(owner, Msg::Write { block, data: data.to_vec(), reply }, answer).await?
    }

    /// Starts reads of `block..block + count`, split by owner; never waits. A part whose
    /// owner's inbox is full is skipped, as prefetch may skip under pressure.
    pub fn prefetch(&self, block: u64, count: u64) -> Result<()> {
        check_span(block, count, self.device_blocks())?;
        for (owner, first, n) in self.router.split(block, count) {
            if owner == self.id {
                self.partition.prefetch(first, n)?;
            } else {
                self.messages_sent.set(self.messages_sent.get() + 1);
                self.inboxes[owner].try_send(Msg::Prefetch { block: first, count: n });
            }
        }
        Ok(())
    }

    /// The global flush barrier: every shard writes back the buffers dirtied before the call
    /// and waits, then the device is flushed once. Returns the first write error of any shard,
    /// else the flush's error.
    pub async fn flush(&self) -> Result<()> {
        let started = Instant::now();
        let mut answers = Vec::with_capacity(self.shard_count());
        for shard in (0..self.shard_count()).filter(|&s| s != self.id) {
            let (reply, answer) = oneshot();
            self.send(shard, Msg::WriteBack { reply }).await?;
            answers.push((shard, answer));
        }
        let mut first_error = self.partition.write_back_dirty().await.err();
        for (shard, answer) in answers {
            let result = answer.recv().await.unwrap_or(Err(Error::ShardFailed { shard }));
            if let Err(e) = result {
                first_error.get_or_insert(e);
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
        F: FnOnce(Rc<Shard>) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
    {
        self.run_on(self.owner_of(block), job).await
    }

    /// Runs `job` on shard `shard` and returns its result.
    pub async fn run_on<T, F, Fut>(&self, shard: usize, job: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Rc<Shard>) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
    {
        let (msg, answer) = run_message(self.shard_count(), shard, job)?;
        self.ask(shard, msg, answer).await
    }

    /// This shard's statistics.
    pub fn stats(&self) -> ShardStats {
        ShardStats {
            shard: self.id,
            cache: self.partition.stats(),
            queue: self.partition.queue().stats(),
            messages_sent: self.messages_sent.get(),
            messages_received: self.messages_received.get(),
            barriers: self.barriers.get(),
            barrier_latency_us: self.barrier_latency_us.borrow().clone(),
        }
    }

    /// Serves both lanes of the inbox until they are closed and drained, then waits for the
    /// handlers in flight.
    pub(crate) async fn serve(self: Rc<Self>, inbox: InboxReceiver) {
        let control = Rc::clone(&self).serve_control(inbox.control);
        futures_lite::future::zip(self.serve_work(inbox.work), control).await;
    }

    /// The control lane: every message gets its handler at once (they only wait on I/O).
    async fn serve_control(self: Rc<Self>, inbox: async_channel::Receiver<Msg>) {
        while let Ok(msg) = inbox.recv().await {
            self.messages_received.set(self.messages_received.get() + 1);
            self.control_in_flight.set(self.control_in_flight.get() + 1);
            let shard = Rc::clone(&self);
            glommio::spawn_local(async move {
                Rc::clone(&shard).handle(msg).await;
                shard.control_in_flight.set(shard.control_in_flight.get() - 1);
                shard.handler_done.notify_all();
            })
            .detach();
        }
        if self.control_in_flight.get() > 0 {
            self.handler_done.wait_for(|| (self.control_in_flight.get() == 0).then_some(())).await;
        }
    }

    /// The work lane: at most `handlers_in_flight_max` handlers at once (back-pressure).
    async fn serve_work(self: &Rc<Self>, inbox: async_channel::Receiver<Msg>) {
        while let Ok(msg) = inbox.recv().await {
            self.messages_received.set(self.messages_received.get() + 1);
            let max = self.handlers_in_flight_max;
            if self.handlers_in_flight.get() >= max {
                self.handler_done
                    .wait_for(|| (self.handlers_in_flight.get() < max).then_some(()))
                    .await;
            }
            self.handlers_in_flight.set(self.handlers_in_flight.get() + 1);
            let shard = Rc::clone(self);
            glommio::spawn_local(async move {
                Rc::clone(&shard).handle(msg).await;
                shard.handlers_in_flight.set(shard.handlers_in_flight.get() - 1);
                shard.handler_done.notify_all();
            })
            .detach();
        }
        if self.handlers_in_flight.get() > 0 {
            self.handler_done.wait_for(|| (self.handlers_in_flight.get() == 0).then_some(())).await;
        }
    }

    /// The end of a shard: writes back and flushes, waits for the I/O still in flight
    /// (prefetches), closes the device while the executor can still run the close, and
    /// forgets this thread's `Shard::current()`.
    pub(crate) async fn stop(&self) -> Result<()> {
        let flushed = self.partition.write_dirty().await;
        let logged = match &self.log {
            // Marked empty only if this shard's blocks are durable.
            Some(log) => log.close(flushed.is_ok()).await,
            None => Ok(()),
        };
        let synced = self.partition.queue().sync().await;
        let closed = self.partition.queue().device().close().await;
        CURRENT.with(|current| current.borrow_mut().take());
        flushed.and(logged).and(synced).and(closed)
    }

    async fn handle(self: Rc<Self>, msg: Msg) {
        // A dropped reply receiver means the asker went away; nothing to do about it.
        match msg {
            Msg::Read { block, reply } => {
                let _ = reply.send(read_local(&self.partition, block).await).await;
            }
            Msg::Write { block, data, reply } => {
                let _ = reply.send(write_local(&self.partition, block, &data).await).await;
            }
            Msg::Prefetch { block, count } => {
                let _ = self.partition.prefetch(block, count);
            }
            Msg::WriteBack { reply } => {
                let _ = reply.send(self.partition.write_back_dirty().await).await;
            }
            Msg::Barrier { reply } => {
                let _ = reply.send(self.flush().await).await;
            }
            Msg::Stats { reply } => {
                let _ = reply.send(self.stats()).await;
            }
            Msg::Run(job) => job(self).await,
        }
    }
}

/// Sends `msg` to `shard` and waits for its answer: `ShutDown` if the engine stopped taking
/// messages, `ShardFailed` if the shard went away before answering.
pub(crate) async fn ask<T>(
    inboxes: &Inboxes,
    shard: usize,
    msg: Msg,
    answer: async_channel::Receiver<T>,
) -> Result<T> {
    inboxes[shard].send(msg).await?;
    answer.recv().await.map_err(|_| Error::ShardFailed { shard })
}

/// A `Run` message for `job` on shard `shard` of `shard_count`, and the channel its result
/// comes back on.
pub(crate) fn run_message<T, F, Fut>(
    shard_count: usize,
    shard: usize,
    job: F,
) -> Result<(Msg, async_channel::Receiver<T>)>
where
    T: Send + 'static,
    F: FnOnce(Rc<Shard>) -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
{
    if shard >= shard_count {
        return Err(Error::config("shard", format!("no shard {shard}")));
    }
    let (reply, answer) = oneshot();
    Ok((Msg::Run(job_box(job, reply)), answer))
}

/// Boxes a closure and its reply channel into a [`Job`].
fn job_box<T, F, Fut>(job: F, reply: Reply<T>) -> Job
where
    T: Send + 'static,
    F: FnOnce(Rc<Shard>) -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
{
    Box::new(move |shard| {
        Box::pin(async move {
            let value = job(shard).await;
            let _ = reply.send(value).await;
        })
    })
}

pub(crate) fn check_block_data(data: &[u8], block_size: usize) -> Result<()> {
    if data.len() != block_size {
        return Err(Error::config(
            "data",
            format!("a block write needs exactly {block_size} bytes, got {}", data.len()),
        ));
    }
    Ok(())
}

pub(crate) fn check_span(block: u64, count: u64, device_blocks: u64) -> Result<()> {
    let last = block.saturating_add(count.max(1) - 1);
    if last >= device_blocks {
        return Err(Error::BlockOutOfRange { block: last, device_blocks });
    }
    Ok(())
}

async fn read_local(partition: &Partition<DmaDevice>, block: u64) -> Result<Vec<u8>> {
    let session = partition.session().await;
    let buf = session.read(block).await?;
    let copy = buf.data().to_vec();
    Ok(copy)
}

async fn write_local(partition: &Partition<DmaDevice>, block: u64, data: &[u8]) -> Result<()> {
    let session = partition.session().await;
    let buf = session.new_block(block).await?;
    buf.data_mut().copy_from_slice(data);
    buf.mark_dirty();
    Ok(())
}
