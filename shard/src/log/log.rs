//! The log itself: appends into a staging ring, a writer task that writes full blocks behind
//! and commits groups, checkpoints that move the start, and the scan that replays on open.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::error::LogError;
use super::format::{
    decode_record_header, encode_record_header, record_bytes, record_crc_ok, HeaderCheck,
    RecordHeader, RegionHeader, HEADER_BLOCKS, RECORD_ALIGN, RECORD_HEADER_BYTES,
};
use crate::io::{Device, IoQueue};
use crate::wait::WaitList;

/// Bytes read at a time when a log is scanned on open.
const SCAN_CHUNK_BYTES: u64 = 1 << 20;

/// Where a log lives and how much it buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogConfig {
    /// The region's first block on the queue's device (in the queue's block size).
    pub region_first_block: u64,
    /// Blocks of the region: two header blocks, then the data area (at least two blocks).
    pub region_blocks: u64,
    /// Blocks of the in-memory staging ring: how far appends may run ahead of the writer
    /// before they wait. Allocated once at open.
    pub staging_blocks: usize,
    /// The largest payload one record may carry. At most `(staging_blocks - 1)` blocks minus
    /// a record header, and at most half of the data area.
    pub record_bytes_max: usize,
}

impl LogConfig {
    /// A region of `region_blocks` blocks from `region_first_block`, with 256 staging blocks
    /// and records up to 256 KiB (both clamped to what the region allows).
    pub fn new(region_first_block: u64, region_blocks: u64) -> Self {
        LogConfig {
            region_first_block,
            region_blocks,
            staging_blocks: 256,
            record_bytes_max: 256 << 10,
        }
    }
}

/// A record found by replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogRecord {
    /// Its position in the log stream.
    pub lsn: u64,
    /// What was appended.
    pub payload: Vec<u8>,
}

/// What opening a log found.
#[derive(Clone, Debug, Default)]
pub struct Replay {
    /// The records after the last checkpoint, in append order: the caller applies them.
    pub records: Vec<LogRecord>,
    /// Where replay started (the last checkpoint).
    pub start_lsn: u64,
    /// The end of the last valid record: appends continue here.
    pub end_lsn: u64,
    /// The log was closed cleanly last time (nothing to replay, nothing scanned).
    pub was_clean: bool,
    /// Something followed the last valid record and was cut (a torn or unfinished commit).
    pub tail_cut: bool,
    /// How long reading and checking the region took.
    pub scan_time: Duration,
}

/// What a log has done. Counters only grow.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Records appended.
    pub appends: u64,
    /// Bytes appended (headers and padding included).
    pub appended_bytes: u64,
    /// Group commits completed (one device flush each).
    pub commits: u64,
    /// Block writes submitted (full blocks written behind, and commit tails).
    pub block_writes: u64,
    /// Appends that waited for the writer to free staging room.
    pub staging_waits: u64,
    /// Times the start moved (checkpoints).
    pub start_moves: u64,
    /// Microseconds the commit rounds took in all, from their first write to the end of their
    /// flush (divide by `commits` for the mean).
    pub commit_us_total: u64,
    /// Microseconds the flushes of the commit rounds took in all.
    pub flush_us_total: u64,
}

/// The mutable state; borrowed briefly, never across an await.
#[derive(Debug)]
struct State {
    /// The next append goes here.
    head: u64,
    /// Replay starts here; space before it is free.
    start: u64,
    /// Full blocks up to here were handed to the queue (a multiple of the block size).
    submitted: u64,
    /// Everything before this was flushed.
    durable: u64,
    /// The highest position a commit waits for.
    wanted: u64,
    /// Everything before this was handed to the queue for a commit (written, or being written).
    written: u64,
    /// Block writes handed to the queue and not completed.
    writes_in_flight: usize,
    /// A commit's flush is in flight.
    flushing: bool,
    /// The first write or flush error: the log is failed from then on.
    failed: Option<crate::Error>,
    closing: bool,
    writer_running: bool,
    header: RegionHeader,
    header_busy: bool,
}

struct Inner<D: Device> {
    queue: Rc<IoQueue<D>>,
    config: LogConfig,
    block_bytes: u64,
    data_blocks: u64,
    staging: RefCell<Box<[u8]>>,
    state: RefCell<State>,
    /// Woken whenever the state changes; every waiter re-checks its own condition.
    changed: WaitList,
    stats: RefCell<LogStats>,
}

/// One shard's append-only log over a region of an [`IoQueue`]'s device.
///
/// Five invariants:
/// 1. `start <= durable <= head` does not hold in general (a checkpoint may move `start` past
///    records not yet flushed, because the barrier made their effects durable), but
///    `durable <= head`, `submitted <= head` and `head - start <= data area` always hold.
/// 2. The staging ring holds the stream from `submitted` to `head`; bytes past `head` in it are
///    zero, so a commit can write the partial tail block as it is.
/// 3. Only the writer task writes data blocks, in stream order; the queue's per-block order
///    keeps rewrites of the tail block in order.
/// 4. A commit resolves only after a device flush issued after the writes of every byte
///    before its target completed. Flushes run one at a time; the next commit's writes may
///    overlap a flush.
/// 5. After the first write or flush error the log is failed: appends and commits return
///    [`LogError::Failed`]; nothing already durable is affected.
///
/// It is single-threaded: all of it runs on the executor that opened it.
pub struct Log<D: Device + 'static> {
    inner: Rc<Inner<D>>,
}

impl<D: Device + 'static> std::fmt::Debug for Log<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.inner.state.borrow();
        f.debug_struct("Log")
            .field("config", &self.inner.config)
            .field("start", &s.start)
            .field("durable", &s.durable)
            .field("head", &s.head)
            .finish_non_exhaustive()
    }
}

impl<D: Device + 'static> Drop for Log<D> {
    fn drop(&mut self) {
        // The writer task holds the other reference; let it end.
        self.inner.state.borrow_mut().closing = true;
        self.inner.changed.notify_all();
    }
}

impl<D: Device + 'static> Log<D> {
    /// Opens the log in `config`'s region of `queue`'s device: reads the header, scans and
    /// checks the records after the last checkpoint, cuts a torn tail, starts the writer task,
    /// and returns the records for the caller to replay. A blank region is formatted.
    ///
    /// Must run inside a glommio executor. Fails with [`LogError::Corrupt`] when a record
    /// before the end is damaged, [`LogError::BadHeader`] / [`LogError::LayoutMismatch`] for
    /// a region that is not this log's, or [`LogError::Io`].
    pub async fn open(
        queue: Rc<IoQueue<D>>,
        config: LogConfig,
    ) -> Result<(Self, Replay), LogError> {
        let started = Instant::now();
        let config = validate(&queue, config)?;
        let block_bytes = queue.config().block_size_bytes as u64;
        let data_blocks = config.region_blocks - HEADER_BLOCKS;
        let header = read_header(&queue, &config, block_bytes).await?;
        let data_bytes = data_blocks * block_bytes;
        let mut replay =
            Replay { start_lsn: header.start_lsn, was_clean: header.clean, ..Replay::default() };
        let mut image = Vec::new();
        if !header.clean {
            image = read_data_area(&queue, &config, block_bytes, data_bytes).await?;
            let data_offset = (config.region_first_block + HEADER_BLOCKS) * block_bytes;
            let scanned = scan(&image, header.start_lsn, header.epoch, config.record_bytes_max)
                .map_err(|(lsn, reason)| LogError::Corrupt {
                    lsn,
                    offset: data_offset + lsn % data_bytes,
                    reason,
                })?;
            replay.records = scanned.records;
            replay.end_lsn = scanned.end;
            replay.tail_cut = scanned.tail_cut;
        } else {
            replay.end_lsn = header.start_lsn;
        }
        let head = replay.end_lsn;
        let staging_bytes = config.staging_blocks * block_bytes as usize;
        let inner = Rc::new(Inner {
            queue,
            config,
            block_bytes,
            data_blocks,
            staging: RefCell::new(vec![0u8; staging_bytes].into_boxed_slice()),
            state: RefCell::new(State {
                head,
                start: header.start_lsn,
                submitted: head - head % block_bytes,
                durable: head,
                wanted: head,
                written: head,
                writes_in_flight: 0,
                flushing: false,
                failed: None,
                closing: false,
                writer_running: true,
                header,
                header_busy: false,
            }),
            changed: WaitList::with_capacity(64),
            stats: RefCell::new(LogStats::default()),
        });
        if !header.clean && !head.is_multiple_of(block_bytes) {
            // The live bytes of the tail block, so that its next write keeps them.
            let from = head - head % block_bytes;
            inner.stage(from, &read_stream(&image, from, (head - from) as usize));
        }
        drop(image);
        // Every open is a new epoch: records of earlier opens found past the end later on (a
        // torn commit's leftovers) can never be taken for this open's.
        let next = RegionHeader {
            sequence: header.sequence + 1,
            epoch: header.epoch + 1,
            clean: false,
            ..header
        };
        inner.write_header(&next).await?;
        inner.state.borrow_mut().header = next;
        glommio::spawn_local(Rc::clone(&inner).run_writer()).detach();
        replay.scan_time = started.elapsed();
        Ok((Log { inner }, replay))
    }

    /// Appends a record (copied into the staging ring) and returns the log position just
    /// past it: pass that to [`Log::commit`] to wait until it is durable.
    ///
    /// Waits only while the staging ring is full (the writer is behind). Returns
    /// [`LogError::Full`] at once when the log has no room until a checkpoint moves its start.
    pub async fn append(&self, payload: &[u8]) -> Result<u64, LogError> {
        let inner = &self.inner;
        if payload.len() > inner.config.record_bytes_max {
            return Err(LogError::RecordTooLarge {
                len: payload.len(),
                max: inner.config.record_bytes_max,
            });
        }
        let need = record_bytes(payload.len());
        if !inner.fits_staging(need)? {
            inner.stats.borrow_mut().staging_waits += 1;
            inner
                .changed
                .wait_for(|| match inner.fits_staging(need) {
                    Ok(true) => Some(Ok(())),
                    Ok(false) => None,
                    Err(e) => Some(Err(e)),
                })
                .await?;
        }
        Ok(inner.append_now(payload, need))
    }

    /// Waits until every record before `lsn` is durable (clamped to the head). Records
    /// appended by anyone before the commit's write share it: one write of the tail and one
    /// flush cover them all. Appends go on meanwhile.
    pub async fn commit(&self, lsn: u64) -> Result<(), LogError> {
        let inner = &self.inner;
        let target = {
            let mut s = inner.state.borrow_mut();
            let target = lsn.min(s.head);
            if s.durable >= target {
                return Ok(());
            }
            if let Some(e) = &s.failed {
                return Err(LogError::Failed(e.clone()));
            }
            if !s.writer_running {
                return Err(LogError::Closed);
            }
            s.wanted = s.wanted.max(target);
            target
        };
        inner.changed.notify_all();
        inner
            .changed
            .wait_for(|| {
                let s = inner.state.borrow();
                if s.durable >= target {
                    Some(Ok(()))
                } else if let Some(e) = &s.failed {
                    Some(Err(LogError::Failed(e.clone())))
                } else if !s.writer_running {
                    Some(Err(LogError::Closed))
                } else {
                    None
                }
            })
            .await
    }

    /// Appends a record and waits for its commit.
    pub async fn append_and_commit(&self, payload: &[u8]) -> Result<u64, LogError> {
        let end = self.append(payload).await?;
        self.commit(end).await?;
        Ok(end)
    }

    /// Moves the log's start to `lsn` (clamped to `start..=head`): the records before it will
    /// not be replayed, and their space is reused. `lsn` must be a record boundary: a value
    /// [`Log::head`] returned or [`Log::append`] returned. Call it only once the effects of those
    /// records are durable elsewhere (the engine's checkpoint runs the global barrier first).
    /// Writes and flushes a header copy; concurrent calls run one at a time.
    pub async fn advance_start(&self, lsn: u64) -> Result<(), LogError> {
        self.inner.move_start(lsn, false).await
    }

    /// Commits everything, then, if `clean`, records that nothing needs replaying (the caller
    /// made every record's effects durable), and stops the writer. Later appends and commits
    /// fail with [`LogError::Closed`].
    pub async fn close(&self, clean: bool) -> Result<(), LogError> {
        let inner = &self.inner;
        // Appends are refused from here on, so that nothing lands after the head a clean
        // header declares to be the end. The writer still finishes the commit below: it stops
        // only once it has no work left.
        inner.state.borrow_mut().closing = true;
        let head = self.head();
        let mut result = self.commit(head).await;
        if clean && result.is_ok() {
            result = inner.move_start(head, true).await;
        }
        inner.changed.notify_all();
        inner.changed.wait_for(|| (!inner.state.borrow().writer_running).then_some(())).await;
        let synced = inner.queue.sync().await;
        result.and(synced.map_err(LogError::Io))
    }

    /// The position the next record will take.
    pub fn head(&self) -> u64 {
        self.inner.state.borrow().head
    }

    /// Everything before this position is durable.
    pub fn durable(&self) -> u64 {
        self.inner.state.borrow().durable
    }

    /// Replay would start here (the last checkpoint).
    pub fn start(&self) -> u64 {
        self.inner.state.borrow().start
    }

    /// Bytes of the data area: the most the log holds between checkpoints.
    pub fn capacity_bytes(&self) -> u64 {
        self.inner.data_bytes()
    }

    /// Bytes between the start and the head.
    pub fn used_bytes(&self) -> u64 {
        let s = self.inner.state.borrow();
        s.head - s.start
    }

    /// The largest payload a record may carry.
    pub fn record_bytes_max(&self) -> usize {
        self.inner.config.record_bytes_max
    }

    /// Whether a record of `payload_len` bytes fits before the next checkpoint.
    pub fn has_room_for(&self, payload_len: usize) -> bool {
        let s = self.inner.state.borrow();
        self.inner.log_room(&s, record_bytes(payload_len))
    }

    /// The error that failed the log, if any.
    pub fn failure(&self) -> Option<crate::Error> {
        self.inner.state.borrow().failed.clone()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> LogStats {
        self.inner.stats.borrow().clone()
    }

    /// The queue the log writes through.
    pub fn queue(&self) -> &Rc<IoQueue<D>> {
        &self.inner.queue
    }

    /// Waits until a checkpoint (or a failure) could let an append of `payload_len` bytes in.
    pub async fn wait_for_room(&self, payload_len: usize) -> Result<(), LogError> {
        let inner = &self.inner;
        let need = record_bytes(payload_len);
        inner
            .changed
            .wait_for(|| {
                let s = inner.state.borrow();
                if let Some(e) = &s.failed {
                    Some(Err(LogError::Failed(e.clone())))
                } else if s.closing {
                    Some(Err(LogError::Closed))
                } else {
                    inner.log_room(&s, need).then_some(Ok(()))
                }
            })
            .await
    }
}

impl<D: Device + 'static> Inner<D> {
    fn data_bytes(&self) -> u64 {
        self.data_blocks * self.block_bytes
    }

    fn staging_bytes(&self) -> u64 {
        self.config.staging_blocks as u64 * self.block_bytes
    }

    /// Whether `need` more bytes leave every block the writer will write clear of live data:
    /// the block holding the new end must not be the block of `start` one lap earlier.
    fn log_room(&self, s: &State, need: u64) -> bool {
        let bs = self.block_bytes;
        let end_block = (s.head + need).next_multiple_of(bs);
        end_block <= s.start - s.start % bs + self.data_bytes()
    }

    /// `Ok(true)` if a record of `need` bytes can be appended now, `Ok(false)` if it must wait
    /// for the writer, an error if it never can.
    fn fits_staging(&self, need: u64) -> Result<bool, LogError> {
        let s = self.state.borrow();
        if let Some(e) = &s.failed {
            return Err(LogError::Failed(e.clone()));
        }
        if s.closing || !s.writer_running {
            return Err(LogError::Closed);
        }
        if !self.log_room(&s, need) {
            let bs = self.block_bytes;
            let limit = s.start - s.start % bs + self.data_bytes();
            let free = limit.saturating_sub(s.head.next_multiple_of(bs));
            return Err(LogError::Full { needed: need, free });
        }
        Ok(s.head + need <= s.submitted + self.staging_bytes())
    }

    /// Writes the record into the staging ring and moves the head (no await: atomic for every
    /// other task).
    fn append_now(&self, payload: &[u8], need: u64) -> u64 {
        let (lsn, durable, epoch) = {
            let s = self.state.borrow();
            (s.head, s.durable, s.header.epoch as u32)
        };
        let header = RecordHeader { len: payload.len() as u32, lsn, durable_lsn: durable, epoch };
        let bytes = encode_record_header(&header, payload);
        self.stage(lsn, &bytes);
        self.stage(lsn + RECORD_HEADER_BYTES as u64, payload);
        let end = lsn + need;
        let crossed = {
            let mut s = self.state.borrow_mut();
            s.head = end;
            end / self.block_bytes != lsn / self.block_bytes
        };
        {
            let mut stats = self.stats.borrow_mut();
            stats.appends += 1;
            stats.appended_bytes += need;
        }
        // The writer only needs waking when a block filled (write-behind); commits wake it
        // themselves.
        if crossed {
            self.changed.notify_all();
        }
        end
    }

    /// Copies `bytes` into the staging ring at stream position `lsn`.
    fn stage(&self, lsn: u64, bytes: &[u8]) {
        let ring = self.staging_bytes();
        let mut staging = self.staging.borrow_mut();
        let mut at = (lsn % ring) as usize;
        let mut rest = bytes;
        while !rest.is_empty() {
            let n = rest.len().min(staging.len() - at);
            staging[at..at + n].copy_from_slice(&rest[..n]);
            rest = &rest[n..];
            at = 0;
        }
    }

    /// The device block holding stream position `lsn`.
    fn device_block(&self, lsn: u64) -> u64 {
        self.config.region_first_block + HEADER_BLOCKS + (lsn / self.block_bytes) % self.data_blocks
    }

    async fn run_writer(self: Rc<Self>) {
        loop {
            let work = self
                .changed
                .wait_for(|| {
                    let s = self.state.borrow();
                    if s.failed.is_some() {
                        Some(false)
                    } else if s.submitted + self.block_bytes <= s.head || s.wanted > s.written {
                        Some(true)
                    } else if s.closing {
                        Some(false)
                    } else {
                        None
                    }
                })
                .await;
            if !work {
                break;
            }
            if let Err(e) = self.write_round().await {
                self.fail(e);
                break;
            }
        }
        // A flush still in flight settles its commit before the writer is gone.
        self.changed.wait_for(|| (!self.state.borrow().flushing).then_some(())).await;
        self.state.borrow_mut().writer_running = false;
        self.changed.notify_all();
    }

    /// Latches the first error: the log is failed from now on (invariant 5).
    fn fail(&self, e: crate::Error) {
        self.state.borrow_mut().failed.get_or_insert(e);
        self.changed.notify_all();
    }

    /// Hands every full block to the queue (write-behind); if a commit is wanted, also the
    /// partial tail block; waits for those writes, then starts the flush that completes the
    /// commit and returns without waiting for it. So the next round's writes overlap this
    /// round's flush, and rounds follow each other at the pace of the slower of the two; each
    /// flush still follows the completion of every write its commit covers (invariant 4), and
    /// flushes run one at a time, in order.
    async fn write_round(self: &Rc<Self>) -> Result<(), crate::Error> {
        let bs = self.block_bytes;
        let mut target = None;
        let started = Instant::now();
        loop {
            let mut request = self.queue.request().await;
            // Look at the state only after the await: appends may have run meanwhile.
            let (at, full) = {
                let mut s = self.state.borrow_mut();
                if s.submitted + bs <= s.head {
                    (s.submitted, true)
                } else if target.is_none() && s.wanted > s.written {
                    target = Some(s.head);
                    s.written = s.head;
                    if s.head == s.submitted {
                        continue; // the tail block is empty: the full blocks cover the commit
                    }
                    (s.submitted, false)
                } else {
                    break;
                }
            };
            let slot = ((at % self.staging_bytes()) / bs * bs) as usize;
            {
                let mut staging = self.staging.borrow_mut();
                request.data_mut().copy_from_slice(&staging[slot..slot + bs as usize]);
                if full {
                    // The slot is reused for a block one ring later: zero it (invariant 2).
                    staging[slot..slot + bs as usize].fill(0);
                }
            }
            {
                let mut s = self.state.borrow_mut();
                s.writes_in_flight += 1;
                if full {
                    s.submitted += bs;
                }
            }
            self.changed.notify_all(); // staging room for waiting appends
            self.stats.borrow_mut().block_writes += 1;
            let me = Rc::clone(self);
            let done = move |result: crate::Result<()>| {
                me.state.borrow_mut().writes_in_flight -= 1;
                if let Err(e) = result {
                    me.fail(e);
                }
                me.changed.notify_all();
            };
            self.queue.write_back_then(request, self.device_block(at), Some(done)).await?;
        }
        let Some(target) = target else { return Ok(()) };
        let ready = || {
            let s = self.state.borrow();
            (s.failed.is_some() || (s.writes_in_flight == 0 && !s.flushing)).then_some(())
        };
        self.changed.wait_for(ready).await;
        if let Some(e) = self.state.borrow().failed.clone() {
            return Err(e);
        }
        self.state.borrow_mut().flushing = true;
        let me = Rc::clone(self);
        glommio::spawn_local(async move {
            let flush_started = Instant::now();
            let flushed = me.queue.flush().await;
            {
                let mut s = me.state.borrow_mut();
                s.flushing = false;
                if flushed.is_ok() {
                    s.durable = s.durable.max(target);
                }
            }
            match flushed {
                Ok(()) => {
                    let mut stats = me.stats.borrow_mut();
                    stats.commits += 1;
                    stats.commit_us_total += started.elapsed().as_micros() as u64;
                    stats.flush_us_total += flush_started.elapsed().as_micros() as u64;
                }
                Err(e) => me.fail(e),
            }
            me.changed.notify_all();
        })
        .detach();
        Ok(())
    }

    async fn move_start(&self, lsn: u64, clean: bool) -> Result<(), LogError> {
        self.changed.wait_for(|| (!self.state.borrow().header_busy).then_some(())).await;
        let header = {
            let mut s = self.state.borrow_mut();
            if let Some(e) = &s.failed {
                return Err(LogError::Failed(e.clone()));
            }
            s.header_busy = true;
            RegionHeader {
                sequence: s.header.sequence + 1,
                start_lsn: lsn.clamp(s.start, s.head),
                clean,
                ..s.header
            }
        };
        let written = self.write_header(&header).await;
        {
            let mut s = self.state.borrow_mut();
            s.header_busy = false;
            match &written {
                Ok(()) => {
                    s.start = s.start.max(header.start_lsn);
                    s.header = header;
                }
                Err(LogError::Io(e)) => s.failed = Some(e.clone()),
                Err(_) => {}
            }
        }
        if written.is_ok() {
            self.stats.borrow_mut().start_moves += 1;
        }
        self.changed.notify_all();
        written
    }

    /// Writes `header` into its copy (`sequence % 2`) and flushes.
    async fn write_header(&self, header: &RegionHeader) -> Result<(), LogError> {
        let mut request = self.queue.request().await;
        header.encode_into(request.data_mut());
        let block = self.config.region_first_block + header.sequence % 2;
        self.queue.write(&request, block).await?;
        drop(request);
        self.queue.flush().await?;
        Ok(())
    }
}

fn validate<D: Device>(queue: &IoQueue<D>, mut config: LogConfig) -> Result<LogConfig, LogError> {
    let bad =
        |setting: &'static str, reason: String| LogError::Io(crate::Error::config(setting, reason));
    let bs = queue.config().block_size_bytes as u64;
    if bs < 512 {
        return Err(bad("block_size_bytes", format!("{bs} is too small for a log (512 at least)")));
    }
    if config.region_blocks < HEADER_BLOCKS + 2 {
        return Err(bad(
            "log region",
            format!("{} blocks; at least 4 are needed", config.region_blocks),
        ));
    }
    let end = config.region_first_block.checked_add(config.region_blocks);
    if end.is_none_or(|end| end > queue.device_blocks()) {
        return Err(LogError::Io(crate::Error::BlockOutOfRange {
            block: config.region_first_block.saturating_add(config.region_blocks) - 1,
            device_blocks: queue.device_blocks(),
        }));
    }
    if config.staging_blocks < 2 {
        return Err(bad("log staging_blocks", "at least 2".into()));
    }
    let data_bytes = (config.region_blocks - HEADER_BLOCKS) * bs;
    let by_staging = (config.staging_blocks as u64 - 1) * bs - RECORD_HEADER_BYTES as u64;
    let by_region = data_bytes / 2 - RECORD_HEADER_BYTES as u64;
    config.record_bytes_max =
        (config.record_bytes_max as u64).min(by_staging).min(by_region) as usize;
    Ok(config)
}

async fn read_header<D: Device>(
    queue: &IoQueue<D>,
    config: &LogConfig,
    block_bytes: u64,
) -> Result<RegionHeader, LogError> {
    let offset = config.region_first_block * block_bytes;
    let mut copies = Vec::with_capacity(2);
    for i in 0..HEADER_BLOCKS {
        let mut request = queue.request().await;
        queue.read(&mut request, config.region_first_block + i).await?;
        copies.push(RegionHeader::decode(request.data()));
    }
    let valid: Vec<RegionHeader> = copies
        .iter()
        .filter_map(|c| match c {
            HeaderCheck::Valid(h) => Some(*h),
            _ => None,
        })
        .collect();
    let region_bytes = config.region_blocks * block_bytes;
    let Some(header) = valid.into_iter().max_by_key(|h| h.sequence) else {
        if copies.iter().all(|c| *c == HeaderCheck::Zero) {
            // A blank region: a new, empty log.
            return Ok(RegionHeader {
                sequence: 0,
                start_lsn: 0,
                epoch: 0,
                region_bytes,
                block_bytes,
                clean: true,
            });
        }
        let reasons: Vec<&str> = copies
            .iter()
            .map(|c| match c {
                HeaderCheck::Invalid(why) => *why,
                _ => "blank",
            })
            .collect();
        return Err(LogError::BadHeader { offset, reason: reasons.join("; ") });
    };
    if header.region_bytes != region_bytes || header.block_bytes != block_bytes {
        return Err(LogError::LayoutMismatch {
            offset,
            reason: format!(
                "formatted as {} bytes in {}-byte blocks, opened as {region_bytes} in {block_bytes}",
                header.region_bytes, header.block_bytes
            ),
        });
    }
    Ok(header)
}

async fn read_data_area<D: Device>(
    queue: &IoQueue<D>,
    config: &LogConfig,
    block_bytes: u64,
    data_bytes: u64,
) -> Result<Vec<u8>, LogError> {
    let device = queue.device();
    let first = (config.region_first_block + HEADER_BLOCKS) * block_bytes;
    let mut image = vec![0u8; data_bytes as usize];
    let mut at = 0;
    while at < data_bytes {
        let len = SCAN_CHUNK_BYTES.min(data_bytes - at);
        let chunk = &mut image[at as usize..(at + len) as usize];
        device.read_at(first + at, chunk).await?;
        at += len;
    }
    Ok(image)
}

/// `len` bytes of the stream at `lsn` from a data-area image (wrapping at its end).
fn read_stream(image: &[u8], lsn: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut at = (lsn % image.len() as u64) as usize;
    while out.len() < len {
        let n = (len - out.len()).min(image.len() - at);
        out.extend_from_slice(&image[at..at + n]);
        at = 0;
    }
    out
}

/// The result of a scan.
#[derive(Debug)]
struct Scanned {
    records: Vec<LogRecord>,
    end: u64,
    tail_cut: bool,
}

/// The record at `lsn`, or why there is none.
fn record_at(image: &[u8], lsn: u64, record_max: usize) -> Result<(RecordHeader, Vec<u8>), String> {
    let header_bytes = read_stream(image, lsn, RECORD_HEADER_BYTES);
    let Some((header, crc)) = decode_record_header(&header_bytes) else {
        return Err("no record magic".into());
    };
    if header.lsn != lsn {
        return Err(format!("record names position {}, not its own", header.lsn));
    }
    if header.len as usize > record_max {
        return Err(format!("length {} is beyond the maximum {record_max}", header.len));
    }
    let payload = read_stream(image, lsn + RECORD_HEADER_BYTES as u64, header.len as usize);
    if !record_crc_ok(&header_bytes, &payload, crc) {
        return Err("checksum mismatch".into());
    }
    Ok((header, payload))
}

/// Reads the records from `start` on; stops at the first position without a valid record of
/// this lap and of a non-decreasing epoch. If a valid record further on says the stop position
/// was already durable when it was written, the stop is corruption, not a torn tail.
fn scan(image: &[u8], start: u64, epoch: u64, record_max: usize) -> Result<Scanned, (u64, String)> {
    let data_bytes = image.len() as u64;
    let limit = start + data_bytes;
    let mut records = Vec::new();
    let mut at = start;
    let mut last_epoch = 0u32;
    let why_stopped = loop {
        if at + RECORD_HEADER_BYTES as u64 > limit {
            break None;
        }
        match record_at(image, at, record_max) {
            Ok((header, payload)) => {
                let end = at + record_bytes(payload.len());
                if end > limit {
                    break Some("record runs past the end of the region".to_string());
                }
                if header.epoch < last_epoch || header.epoch as u64 > (epoch & 0xFFFF_FFFF) {
                    break Some(format!(
                        "record of epoch {} after epoch {last_epoch}",
                        header.epoch
                    ));
                }
                last_epoch = header.epoch;
                records.push(LogRecord { lsn: at, payload });
                at = end;
            }
            Err(why) => break Some(why),
        }
    };
    let Some(why) = why_stopped else {
        return Ok(Scanned { records, end: at, tail_cut: false });
    };
    // Anything valid further on that was written when `at` was already durable?
    let mut probe = at + RECORD_ALIGN;
    while probe + RECORD_HEADER_BYTES as u64 <= limit {
        let pos = (probe % data_bytes) as usize;
        let plausible = pos + 16 <= image.len()
            && image[pos..pos + 4] == super::format::RECORD_MAGIC
            && u64::from_le_bytes(image[pos + 8..pos + 16].try_into().expect("8 bytes")) == probe;
        if plausible {
            if let Ok((header, _)) = record_at(image, probe, record_max) {
                if header.durable_lsn > at {
                    return Err((
                        at,
                        format!(
                            "{why}; the record at position {probe} was written after position \
                             {} was durable",
                            header.durable_lsn
                        ),
                    ));
                }
            }
        }
        probe += RECORD_ALIGN;
    }
    let tail_cut =
        image[(at % data_bytes) as usize..].iter().take(RECORD_HEADER_BYTES).any(|&b| b != 0);
    Ok(Scanned { records, end: at, tail_cut })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_with(records: &[(&[u8], u64)], data_bytes: usize) -> Vec<u8> {
        let mut image = vec![0u8; data_bytes];
        let mut at = 0u64;
        for (payload, durable) in records {
            let header = RecordHeader {
                len: payload.len() as u32,
                lsn: at,
                durable_lsn: *durable,
                epoch: 1,
            };
            let h = encode_record_header(&header, payload);
            image[at as usize..at as usize + 32].copy_from_slice(&h);
            image[at as usize + 32..at as usize + 32 + payload.len()].copy_from_slice(payload);
            at += record_bytes(payload.len());
        }
        image
    }

    #[test]
    fn scan_reads_records_and_stops_at_zeroes() {
        let image = image_with(&[(b"one", 0), (b"two", 0)], 4096);
        let scanned = scan(&image, 0, 1, 1024).expect("valid log");
        assert_eq!(scanned.records.len(), 2);
        assert_eq!(scanned.records[1].payload, b"two");
        assert_eq!(scanned.end, 80);
        assert!(!scanned.tail_cut);
    }

    #[test]
    fn scan_cuts_a_damaged_last_record_but_refuses_a_damaged_durable_one() {
        // The second record was appended when the first was durable (durable_lsn 40).
        let mut image = image_with(&[(b"one", 0), (b"two", 40)], 4096);
        image[45] ^= 0xFF; // the second record's payload
        let scanned = scan(&image, 0, 1, 1024).expect("a torn tail is cut");
        assert_eq!(scanned.records.len(), 1);
        assert!(scanned.tail_cut);
        let mut image = image_with(&[(b"one", 0), (b"two", 40)], 4096);
        image[33] ^= 0xFF; // the first record's payload
        let (lsn, reason) = scan(&image, 0, 1, 1024).expect_err("corruption before the tail");
        assert_eq!(lsn, 0);
        assert!(reason.contains("checksum"), "{reason}");
    }

    #[test]
    fn scan_never_resurrects_a_torn_commits_leftover_of_an_earlier_epoch() {
        // Epoch 1 wrote records at 0 and 96 (the one at 48 was torn, then cut at 48 on open);
        // epoch 2 appended from 48 up to exactly 96, where the leftover still sits.
        let mut image = vec![0u8; 4096];
        let mut put = |lsn: u64, payload: &[u8], epoch: u32| {
            let header = RecordHeader { len: payload.len() as u32, lsn, durable_lsn: 0, epoch };
            let at = lsn as usize;
            image[at..at + 32].copy_from_slice(&encode_record_header(&header, payload));
            image[at + 32..at + 32 + payload.len()].copy_from_slice(payload);
        };
        put(0, b"epoch one", 1);
        put(48, b"epoch two", 2);
        put(96, b"leftover", 1);
        let scanned = scan(&image, 0, 2, 1024).expect("valid");
        let payloads: Vec<&[u8]> = scanned.records.iter().map(|r| &r.payload[..]).collect();
        assert_eq!(payloads, [&b"epoch one"[..], &b"epoch two"[..]]);
        assert_eq!(scanned.end, 96);
    }

    #[test]
    fn scan_ignores_records_of_an_earlier_lap() {
        let image = image_with(&[(b"one", 0), (b"two", 0)], 4096);
        // Start one lap later: the positions do not match the records' own.
        let scanned = scan(&image, 4096, 1, 1024).expect("stale data is not corruption");
        assert!(scanned.records.is_empty());
        assert_eq!(scanned.end, 4096);
    }
}
