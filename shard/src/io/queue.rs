//! The asio queue: one per shard, libucw asio's contract on an async [`Device`].
//!
//! Four invariants:
//! 1. Request buffers are allocated when the queue is built (`io_depth_max +
//!    writebacks_in_flight_max` of them, one block each) and recycled; none is allocated per
//!    request. When all are taken, [`IoQueue::request`] waits for one to come back. Reads
//!    into the caller's memory ([`IoQueue::read_into`], the cache's misses) need no request
//!    buffer; at most `io_depth_max` of them are in flight.
//! 2. At most `writebacks_in_flight_max` write-backs are in flight; [`IoQueue::write_back`]
//!    waits below that bound before it submits, and write-backs pass the bound in call order.
//! 3. Writes of one block are served in the order they were submitted (a ticket taken
//!    synchronously at the call), one at a time: two writes of a block are never in flight at
//!    once and a later one never lands before an earlier one.
//! 4. A failed write-back without a completion callback is latched and returned by the next
//!    [`IoQueue::sync`] or [`IoQueue::flush`]; it is never dropped.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Instant;

use hashbrown::HashMap;
use hdrhistogram::Histogram;

use super::device::{Device, IoBuf, ReadTarget};
use crate::error::{Error, Result};
use crate::wait::WaitList;

/// Sizes of an [`IoQueue`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// Block size in bytes: a power of two and a multiple of the device's logical block size.
    pub block_size_bytes: usize,
    /// Normal (read / write) requests that may be outstanding at once.
    pub io_depth_max: usize,
    /// Write-backs that may be in flight at once; a submit beyond waits.
    pub writebacks_in_flight_max: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig { block_size_bytes: 4096, io_depth_max: 64, writebacks_in_flight_max: 32 }
    }
}

/// A latency histogram in microseconds (1 µs to 60 s, 2 significant digits).
pub type LatencyHistogram = Histogram<u64>;

fn new_histogram() -> LatencyHistogram {
    Histogram::new_with_bounds(1, 60_000_000, 2).expect("constant bounds are valid")
}

/// What a queue has done. Counters only grow; `*_in_flight` are gauges.
#[derive(Clone, Debug)]
pub struct QueueStats {
    /// Requests of every kind in flight now.
    pub in_flight: u64,
    /// Write-backs in flight now.
    pub writebacks_in_flight: u64,
    /// Most write-backs ever in flight at once.
    pub writebacks_in_flight_peak: u64,
    /// Reads completed.
    pub reads_completed: u64,
    /// Normal writes completed.
    pub writes_completed: u64,
    /// Write-backs completed (requests: a run of adjacent blocks is one).
    pub writebacks_completed: u64,
    /// Flushes completed.
    pub flushes_completed: u64,
    /// Bytes read from the device.
    pub bytes_read: u64,
    /// Bytes written to the device.
    pub bytes_written: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Times a submitter waited for a request buffer or a write-back slot.
    pub submit_waits: u64,
    /// Read latency, µs.
    pub read_latency_us: LatencyHistogram,
    /// Write and write-back latency, µs.
    pub write_latency_us: LatencyHistogram,
    /// Flush latency, µs.
    pub flush_latency_us: LatencyHistogram,
}

impl Default for QueueStats {
    fn default() -> Self {
        QueueStats {
            in_flight: 0,
            writebacks_in_flight: 0,
            writebacks_in_flight_peak: 0,
            reads_completed: 0,
            writes_completed: 0,
            writebacks_completed: 0,
            flushes_completed: 0,
            bytes_read: 0,
            bytes_written: 0,
            errors: 0,
            submit_waits: 0,
            read_latency_us: new_histogram(),
            write_latency_us: new_histogram(),
            flush_latency_us: new_histogram(),
        }
    }
}

/// The write order of one block: tickets are handed out in submission order and served one at
/// a time. A ticket whose submitter went away before its turn (a cancelled future) is recorded
/// as abandoned and skipped when its turn comes.
#[derive(Debug, Default)]
struct Turn {
    next_ticket: u64,
    serving: u64,
    abandoned: Vec<u64>,
}

/// The key of the write-back admission line in `IoQueue::turns`: write-backs take a slot in
/// call order, served like the writes of one block. No block has this number (a block is below
/// `device_blocks`, which is at most `u64::MAX`).
const ADMISSION: u64 = u64::MAX;

/// A block's place in the write order. Dropping it ends the turn (or abandons it, if the turn
/// never came), so the next write of the block can go.
struct Ticket<'q, D: Device> {
    queue: &'q IoQueue<D>,
    block: u64,
    ticket: u64,
}

impl<D: Device> Drop for Ticket<'_, D> {
    fn drop(&mut self) {
        self.queue.finish_ticket(self.block, self.ticket);
    }
}

/// One shard's asynchronous I/O queue over a [`Device`].
pub struct IoQueue<D: Device> {
    device: D,
    config: QueueConfig,
    device_blocks: u64,
    free_bufs: RefCell<Vec<D::Buf>>,
    writebacks_in_flight: Cell<usize>,
    in_flight: Cell<usize>,
    /// Reads of [`IoQueue::read_into`] in flight (at most `io_depth_max`).
    direct_reads: Cell<usize>,
    turns: RefCell<HashMap<u64, Turn>>,
    writeback_error: RefCell<Option<Error>>,
    stats: RefCell<QueueStats>,
    /// Woken when a buffer returns, a write-back completes, a block's turn advances, or the
    /// queue drains. One list: waits are rare and every waiter re-checks its own condition.
    changed: WaitList,
}

impl<D: Device> std::fmt::Debug for IoQueue<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoQueue")
            .field("path", &self.device.path())
            .field("config", &self.config)
            .field("in_flight", &self.in_flight.get())
            .finish()
    }
}

/// A request buffer taken from the queue: one block, aligned for the device. Dropping it gives
/// the buffer back.
pub struct Request<'q, D: Device> {
    queue: &'q IoQueue<D>,
    buf: Option<D::Buf>,
}

impl<D: Device> std::fmt::Debug for Request<'_, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request").finish_non_exhaustive()
    }
}

impl<D: Device> Request<'_, D> {
    /// The request buffer's bytes.
    pub fn data(&self) -> &[u8] {
        self.buf.as_ref().expect("a live request owns its buffer").as_bytes()
    }

    /// The request buffer's bytes, mutably.
    pub fn data_mut(&mut self) -> &mut [u8] {
        self.buf.as_mut().expect("a live request owns its buffer").as_bytes_mut()
    }
}

impl<D: Device> Drop for Request<'_, D> {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.queue.put_buf(buf);
        }
    }
}

/// Counts an operation in flight for as long as it lives, so `sync` sees cancelled futures
/// leave too.
struct InFlight<'q, D: Device>(&'q IoQueue<D>);

impl<'q, D: Device> InFlight<'q, D> {
    fn enter(queue: &'q IoQueue<D>) -> Self {
        queue.in_flight.set(queue.in_flight.get() + 1);
        InFlight(queue)
    }
}

impl<D: Device> Drop for InFlight<'_, D> {
    fn drop(&mut self) {
        self.0.in_flight.set(self.0.in_flight.get() - 1);
        self.0.changed.notify_all();
    }
}

/// Holds one of the `io_depth_max` slots of [`IoQueue::read_into`] while it lives.
struct DirectRead<'q, D: Device>(&'q IoQueue<D>);

impl<D: Device> Drop for DirectRead<'_, D> {
    fn drop(&mut self) {
        self.0.direct_reads.set(self.0.direct_reads.get() - 1);
        self.0.changed.notify_all();
    }
}

impl<D: Device> IoQueue<D> {
    /// Builds a queue over `device`, validating `config` against it.
    pub fn new(device: D, config: QueueConfig) -> Result<Rc<Self>> {
        let device_blocks = validate(&device, &config)?;
        let buf_count = config.io_depth_max + config.writebacks_in_flight_max;
        let free_bufs =
            (0..buf_count).map(|_| device.alloc_buf(config.block_size_bytes)).collect::<Vec<_>>();
        Ok(Rc::new(IoQueue {
            device,
            config,
            device_blocks,
            free_bufs: RefCell::new(free_bufs),
            writebacks_in_flight: Cell::new(0),
            in_flight: Cell::new(0),
            direct_reads: Cell::new(0),
            turns: RefCell::new(HashMap::with_capacity(buf_count + 1)),
            writeback_error: RefCell::new(None),
            stats: RefCell::new(QueueStats::default()),
            changed: WaitList::with_capacity(buf_count),
        }))
    }

    /// The device under this queue.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The queue's configuration.
    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// The device's size in blocks.
    pub fn device_blocks(&self) -> u64 {
        self.device_blocks
    }

    /// Requests of every kind in flight now (cheap, unlike [`IoQueue::stats`]).
    pub fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    /// A snapshot of the statistics.
    pub fn stats(&self) -> QueueStats {
        let mut stats = self.stats.borrow().clone();
        stats.in_flight = self.in_flight.get() as u64;
        stats.writebacks_in_flight = self.writebacks_in_flight.get() as u64;
        stats
    }

    /// Takes an idle request buffer, waiting while all of them are in use. Its contents are
    /// whatever the previous user left (as in asio, buffers are recycled, not cleared).
    pub async fn request(&self) -> Request<'_, D> {
        if let Some(buf) = self.free_bufs.borrow_mut().pop() {
            return Request { queue: self, buf: Some(buf) };
        }
        self.stats.borrow_mut().submit_waits += 1;
        let buf = self.changed.wait_for(|| self.free_bufs.borrow_mut().pop()).await;
        Request { queue: self, buf: Some(buf) }
    }

    fn put_buf(&self, buf: D::Buf) {
        self.free_bufs.borrow_mut().push(buf);
        self.changed.notify_all();
    }

    fn check_block(&self, block: u64) -> Result<u64> {
        if block >= self.device_blocks {
            return Err(Error::BlockOutOfRange { block, device_blocks: self.device_blocks });
        }
        Ok(block * self.config.block_size_bytes as u64)
    }

    /// Reads `block` into the request's buffer; completes to the caller.
    pub async fn read(&self, request: &mut Request<'_, D>, block: u64) -> Result<()> {
        let offset = self.check_block(block)?;
        self.read_counted(block, self.device.read_at(offset, request.data_mut())).await
    }

    /// Reads `block` into `dst` (one block of any memory alignment), without a request
    /// buffer; completes to the caller. At most `io_depth_max` of these and of
    /// [`IoQueue::read_in_place`] are in flight: a call beyond waits for one to end. `dst` is
    /// written only if the read succeeds.
    pub async fn read_into(&self, block: u64, dst: &mut [u8]) -> Result<()> {
        let offset = self.check_direct_read(block, dst.len())?;
        let _slot = self.direct_read_slot().await;
        self.read_counted(block, self.device.read_at(offset, dst)).await
    }

    /// Reads `block` straight into lent memory (a cache frame): the device may fill it with
    /// no copy, and ends the loan when it is done with the memory. Unlike
    /// [`IoQueue::read_into`], a failed or short read may leave the memory partly written.
    /// Counts against the same `io_depth_max`.
    pub async fn read_in_place(&self, block: u64, dst: ReadTarget) -> Result<()> {
        let offset = self.check_direct_read(block, dst.len())?;
        let _slot = self.direct_read_slot().await;
        self.read_counted(block, self.device.read_in_place(offset, dst)).await
    }

    fn check_direct_read(&self, block: u64, len: usize) -> Result<u64> {
        let offset = self.check_block(block)?;
        if len != self.config.block_size_bytes {
            return Err(Error::Unaligned {
                offset,
                len: len as u64,
                alignment: self.config.block_size_bytes as u64,
            });
        }
        Ok(offset)
    }

    async fn direct_read_slot(&self) -> DirectRead<'_, D> {
        let max = self.config.io_depth_max;
        if self.direct_reads.get() >= max {
            self.stats.borrow_mut().submit_waits += 1;
            self.changed.wait_for(|| (self.direct_reads.get() < max).then_some(())).await;
        }
        self.direct_reads.set(self.direct_reads.get() + 1);
        DirectRead(self)
    }

    async fn read_counted(
        &self,
        block: u64,
        read: impl std::future::Future<Output = Result<()>>,
    ) -> Result<()> {
        let _in_flight = InFlight::enter(self);
        let started = Instant::now();
        let result = read.await.map_err(|e| e.with_block(block));
        let mut stats = self.stats.borrow_mut();
        match &result {
            Ok(()) => {
                stats.reads_completed += 1;
                stats.bytes_read += self.config.block_size_bytes as u64;
                record(&mut stats.read_latency_us, started);
            }
            Err(_) => stats.errors += 1,
        }
        result
    }

    /// Writes the request's buffer to `block`; completes to the caller. Ordered after every
    /// write of `block` submitted before it.
    pub async fn write(&self, request: &Request<'_, D>, block: u64) -> Result<()> {
        let offset = self.check_block(block)?;
        let ticket = self.take_ticket(block);
        let _in_flight = InFlight::enter(self);
        let buf = request.buf.as_ref().expect("a live request owns its buffer");
        let result = self.write_in_turn(&ticket, offset, buf).await;
        let mut stats = self.stats.borrow_mut();
        match &result {
            Ok(()) => stats.writes_completed += 1,
            Err(_) => stats.errors += 1,
        }
        result
    }

    /// Submits a fire-and-forget write of the request's buffer to `block`. Waits only while
    /// `writebacks_in_flight_max` write-backs are in flight. A failure is latched and returned
    /// by the next [`IoQueue::sync`] or [`IoQueue::flush`].
    pub async fn write_back(self: &Rc<Self>, request: Request<'_, D>, block: u64) -> Result<()>
    where
        D: 'static,
    {
        self.write_back_then(request, block, None::<fn(Result<()>)>).await
    }

    /// Like [`IoQueue::write_back`], but hands the result to `done` instead of latching it; the
    /// caller then owns the error (the cache keeps it on the buffer).
    pub async fn write_back_then(
        self: &Rc<Self>,
        mut request: Request<'_, D>,
        block: u64,
        done: Option<impl FnOnce(Result<()>) + 'static>,
    ) -> Result<()>
    where
        D: 'static,
    {
        let offset = self.check_block(block)?;
        // Both tickets are taken before any wait: submission order is call order, and slots
        // are granted in call order too (`admit_write_back`). If this future is dropped while
        // it waits, the tickets' drops abandon their turns and the request's drop gives the
        // buffer back.
        let admission = self.take_ticket(ADMISSION);
        let ticket = self.take_ticket(block);
        self.admit_write_back(admission).await;
        let buf = request.buf.take().expect("a live request owns its buffer");
        drop(request);
        let ticket_number = ticket.ticket;
        std::mem::forget(ticket); // handed over to the task below, which builds its own
        let queue = Rc::clone(self);
        let task = async move {
            let ticket = Ticket { queue: &queue, block, ticket: ticket_number };
            let result = queue.write_in_turn(&ticket, offset, &buf).await;
            drop(ticket);
            queue.count_write_back(&result);
            queue.end_write_back();
            match (done, result) {
                (Some(done), result) => done(result),
                (None, Err(e)) => {
                    queue.writeback_error.borrow_mut().get_or_insert(e);
                }
                (None, Ok(())) => {}
            }
            // Last: returning the buffer wakes waiters, who must see the state above.
            queue.put_buf(buf);
        };
        glommio::spawn_local(task).detach();
        Ok(())
    }

    /// Like [`IoQueue::write_back_then`] for `buf` holding `blocks` adjacent blocks from
    /// `first` (a buffer of [`Device::alloc_buf`]): one write-back of them all, which takes one
    /// write-back slot and is ordered behind earlier writes of each of its blocks. If that
    /// write fails, each block is written again alone (still in its turn), so that a bad
    /// block fails only itself, with an error that names it. `done` gets each block's result,
    /// in block order.
    pub async fn write_back_run_then(
        self: &Rc<Self>,
        buf: D::Buf,
        first: u64,
        blocks: u64,
        done: impl FnOnce(Vec<Result<()>>) + 'static,
    ) -> Result<()>
    where
        D: 'static,
    {
        let offset = self.check_block(first)?;
        self.check_block(first + blocks.max(1) - 1)?;
        debug_assert_eq!(
            buf.as_bytes().len() as u64,
            blocks * self.config.block_size_bytes as u64,
            "a run's buffer holds its blocks"
        );
        // As `write_back_then`: every ticket is taken before any wait, in one step, so two
        // runs sharing blocks are ordered the same way on each of them.
        // If this future is dropped while it waits, the tickets' drops abandon their turns.
        let admission = self.take_ticket(ADMISSION);
        let tickets: Vec<Ticket<'_, D>> =
            (first..first + blocks).map(|block| self.take_ticket(block)).collect();
        self.admit_write_back(admission).await;
        // Handed over to the task below, which builds its own.
        let tickets: Vec<u64> = tickets
            .into_iter()
            .map(|ticket| {
                let number = ticket.ticket;
                std::mem::forget(ticket);
                number
            })
            .collect();
        let queue = Rc::clone(self);
        let task = async move {
            let tickets: Vec<Ticket<'_, D>> = (first..)
                .zip(tickets)
                .map(|(block, ticket)| Ticket { queue: &queue, block, ticket })
                .collect();
            for ticket in &tickets {
                queue.wait_turn(ticket).await;
            }
            let result = queue.write_timed(offset, &buf, first).await;
            queue.count_write_back(&result);
            let results = match result {
                Ok(()) => vec![Ok(()); blocks as usize],
                Err(e) => queue.write_blocks_alone(&buf, first, e).await,
            };
            drop(tickets);
            queue.end_write_back();
            done(results);
            queue.changed.notify_all();
        };
        glommio::spawn_local(task).detach();
        Ok(())
    }

    fn take_ticket(&self, block: u64) -> Ticket<'_, D> {
        let mut turns = self.turns.borrow_mut();
        let turn = turns.entry(block).or_default();
        let ticket = turn.next_ticket;
        turn.next_ticket += 1;
        Ticket { queue: self, block, ticket }
    }

    fn finish_ticket(&self, block: u64, ticket: u64) {
        let mut turns = self.turns.borrow_mut();
        let turn = turns.get_mut(&block).expect("a block with a live ticket has a turn entry");
        if turn.serving != ticket {
            turn.abandoned.push(ticket);
            return;
        }
        turn.serving += 1;
        while let Some(at) = turn.abandoned.iter().position(|&t| t == turn.serving) {
            turn.abandoned.swap_remove(at);
            turn.serving += 1;
        }
        if turn.serving == turn.next_ticket {
            turns.remove(&block);
        }
        drop(turns);
        self.changed.notify_all();
    }

    /// After the failed write `run_error` of the run of adjacent blocks in `buf` from `first`:
    /// writes each block alone (the caller holds their turns), and returns each one's result.
    /// A device that can give no buffer any more (closed) fails them all with `run_error`.
    async fn write_blocks_alone(
        &self,
        buf: &D::Buf,
        first: u64,
        run_error: Error,
    ) -> Vec<Result<()>> {
        let bs = self.config.block_size_bytes;
        let mut results = Vec::new();
        for (i, bytes) in buf.as_bytes().chunks_exact(bs).enumerate() {
            let block = first + i as u64;
            let Some(mut one) = self.device.try_alloc_buf(bs) else {
                results.push(Err(run_error.clone()));
                continue;
            };
            one.as_bytes_mut().copy_from_slice(bytes);
            let result = self.write_timed(block * bs as u64, &one, block).await;
            self.count_write_back(&result);
            results.push(result);
        }
        results
    }

    /// Waits until `ticket` is the one its block serves (every earlier write of the block is
    /// done or abandoned).
    async fn wait_turn(&self, ticket: &Ticket<'_, D>) {
        let my_turn = || {
            let turns = self.turns.borrow();
            (turns.get(&ticket.block).map(|t| t.serving) == Some(ticket.ticket)).then_some(())
        };
        if my_turn().is_none() {
            self.changed.wait_for(my_turn).await;
        }
    }

    async fn write_in_turn(&self, ticket: &Ticket<'_, D>, offset: u64, buf: &D::Buf) -> Result<()> {
        self.wait_turn(ticket).await;
        self.write_timed(offset, buf, ticket.block).await
    }

    /// Writes `buf` at `offset` (its first block `block`, which an error names), counting the
    /// bytes and the latency of a write that succeeded.
    async fn write_timed(&self, offset: u64, buf: &D::Buf, block: u64) -> Result<()> {
        let started = Instant::now();
        let result = self.device.write_at(offset, buf).await.map_err(|e| e.with_block(block));
        if result.is_ok() {
            let mut stats = self.stats.borrow_mut();
            stats.bytes_written += buf.as_bytes().len() as u64;
            record(&mut stats.write_latency_us, started);
        }
        result
    }

    /// Waits in the admission line (`admission`) until a write-back slot is free, then takes
    /// it (every write-back's submission holds one until [`IoQueue::end_write_back`]).
    ///
    /// Slots are granted in call order, so a write-back never holds a slot while an earlier
    /// one waits for a slot: that holder would wait for its block's turn behind the earlier
    /// one, which waits for the slot, a deadlock once every slot is held that way.
    async fn admit_write_back(&self, admission: Ticket<'_, D>) {
        let max = self.config.writebacks_in_flight_max;
        let admitted = || {
            let first_in_line =
                self.turns.borrow().get(&ADMISSION).map(|t| t.serving) == Some(admission.ticket);
            (first_in_line && self.writebacks_in_flight.get() < max).then_some(())
        };
        if admitted().is_none() {
            self.stats.borrow_mut().submit_waits += 1;
            self.changed.wait_for(admitted).await;
        }
        let in_flight = self.writebacks_in_flight.get() + 1;
        self.writebacks_in_flight.set(in_flight);
        // After the count above, so that the next in line sees this slot taken.
        drop(admission);
        // Counted before the task is spawned, so a `sync` that runs first still waits for it.
        self.in_flight.set(self.in_flight.get() + 1);
        let mut stats = self.stats.borrow_mut();
        stats.writebacks_in_flight_peak = stats.writebacks_in_flight_peak.max(in_flight as u64);
    }

    /// Gives back the slot [`IoQueue::admit_write_back`] took.
    fn end_write_back(&self) {
        self.writebacks_in_flight.set(self.writebacks_in_flight.get() - 1);
        self.in_flight.set(self.in_flight.get() - 1);
    }

    /// Counts a write-back request that ended with `result`.
    fn count_write_back(&self, result: &Result<()>) {
        let mut stats = self.stats.borrow_mut();
        match result {
            Ok(()) => stats.writebacks_completed += 1,
            Err(_) => stats.errors += 1,
        }
    }

    /// Waits until nothing is in flight on this queue, then returns the first write-back error
    /// latched since the last `sync` / `flush`, if any.
    pub async fn sync(&self) -> Result<()> {
        if self.in_flight.get() > 0 {
            self.changed.wait_for(|| (self.in_flight.get() == 0).then_some(())).await;
        }
        match self.writeback_error.borrow_mut().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Flushes the device's write cache: every write completed before the call becomes durable.
    /// Returns a latched write-back error first, then the flush's own error.
    pub async fn flush(&self) -> Result<()> {
        let _in_flight = InFlight::enter(self);
        let started = Instant::now();
        let result = self.device.flush().await;
        {
            let mut stats = self.stats.borrow_mut();
            match &result {
                Ok(()) => {
                    stats.flushes_completed += 1;
                    record(&mut stats.flush_latency_us, started);
                }
                Err(_) => stats.errors += 1,
            }
        }
        if let Some(e) = self.writeback_error.borrow_mut().take() {
            return Err(e);
        }
        result
    }

    /// Discards `count` blocks from `block` on.
    pub async fn discard(&self, block: u64, count: u64) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        let last = block.saturating_add(count - 1);
        self.check_block(last)?;
        let _in_flight = InFlight::enter(self);
        let bs = self.config.block_size_bytes as u64;
        self.device.discard(block * bs, count * bs).await.map_err(|e| e.with_block(block))
    }
}

fn record(histogram: &mut LatencyHistogram, started: Instant) {
    let us = (started.elapsed().as_micros() as u64).clamp(1, 60_000_000);
    histogram.record(us).expect("value clamped into the histogram's bounds");
}

/// Validates a queue configuration against a device; returns the device size in blocks.
fn validate<D: Device>(device: &D, config: &QueueConfig) -> Result<u64> {
    let bs = config.block_size_bytes as u64;
    let alignment = device.alignment_bytes();
    if bs == 0 || !bs.is_power_of_two() {
        return Err(Error::config("block_size_bytes", format!("{bs} is not a power of two")));
    }
    if !bs.is_multiple_of(alignment) {
        return Err(Error::config(
            "block_size_bytes",
            format!(
                "{bs} is not a multiple of the device's logical block size {alignment} ({})",
                device.path().display()
            ),
        ));
    }
    let size = device.size_bytes();
    if size == 0 || !size.is_multiple_of(bs) {
        return Err(Error::config(
            "device size",
            format!(
                "{} is {size} bytes, which is not a positive multiple of the block size {bs}",
                device.path().display()
            ),
        ));
    }
    if config.writebacks_in_flight_max == 0 {
        return Err(Error::config("writebacks_in_flight_max", "must be at least 1"));
    }
    if config.io_depth_max == 0 {
        return Err(Error::config("io_depth_max", "must be at least 1"));
    }
    Ok(size / bs)
}
