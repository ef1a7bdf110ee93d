//! The log itself: appends into a staging ring, a writer task that writes full blocks behind
//! and commits groups, checkpoints that move the start, and the scan that replays on open.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::error::LogError;
use super::format::{record_bytes, RegionHeader, HEADER_BLOCKS};
use crate::io::{Device, IoQueue};
use crate::wait::WaitList;

#[path = "scan.rs"]
mod scan;
#[path = "writer.rs"]
mod writer;

use scan::*;

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
        let need = self.record_bytes_checked(payload.len())?;
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

    /// The log bytes a record of `payload_len` bytes takes, or [`LogError::RecordTooLarge`].
    fn record_bytes_checked(&self, payload_len: usize) -> Result<u64, LogError> {
        let max = self.inner.config.record_bytes_max;
        if payload_len > max {
            return Err(LogError::RecordTooLarge { len: payload_len, max });
        }
        Ok(record_bytes(payload_len))
    }

    /// Whether [`Log::try_append`] of a `payload_len`-byte record would append it now: it fits
    /// the staging ring and the log. Nothing can change that before the caller's next await.
    pub fn can_append_now(&self, payload_len: usize) -> bool {
        payload_len <= self.inner.config.record_bytes_max
            && matches!(self.inner.fits_staging(record_bytes(payload_len)), Ok(true))
    }

    /// [`Log::append`] without waiting: `Ok(None)` (nothing appended) where `append` would
    /// wait for the staging ring or fail with [`LogError::Full`]; other errors as `append`'s.
    /// For a caller that must append in the same step as the change the record describes
    /// (no await between them), having checked [`Log::can_append_now`] first.
    pub fn try_append(&self, payload: &[u8]) -> Result<Option<u64>, LogError> {
        let inner = &self.inner;
        let need = self.record_bytes_checked(payload.len())?;
        match inner.fits_staging(need) {
            Ok(true) => Ok(Some(inner.append_now(payload, need))),
            Ok(false) | Err(LogError::Full { .. }) => Ok(None),
            Err(e) => Err(e),
        }
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
