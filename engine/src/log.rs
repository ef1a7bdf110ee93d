//! The engine's side of the per-shard log ([`corebuf_shard::log`]): the log file beside the
//! data, one region per shard, checkpoints through the global barrier, and back-pressure from a
//! full log into a checkpoint.
//!
//! # The log file
//!
//! With [`EngineBuilder::log_size_bytes`](crate::EngineBuilder::log_size_bytes) above zero,
//! the engine keeps `<data path>.log` (or
//! [`EngineBuilder::log_path`](crate::EngineBuilder::log_path)): block 0 is a file header
//! (below), then one region of `log_size_bytes` per shard, shard `i`'s at block
//! `1 + i * region_blocks`. Each region is a [`Log`] (byte layout: `docs/LOG-FORMAT.md`). The
//! file is created full of zeroes (so that commits never write into holes, whose allocation
//! would make every `fdatasync` a journal commit) and opened with `O_DIRECT` by every shard.
//! A separate file keeps the data file's layout and size the user's, and lets the log sit on
//! another device.
//!
//! A file laid out for another shard count or region size is re-laid out only if every region
//! was closed cleanly (nothing to replay); otherwise `build` fails and names the settings that
//! would replay it.
//!
//! # Contract with the embedding server
//!
//! 1. Apply a change to the cache first, then [`ShardLog::append`] its record on the shard that
//!    owns the changed blocks, without an await in between that could let a checkpoint start
//!    (a checkpoint covers exactly the records appended before it began).
//! 2. [`ShardLog::commit`] the position `append` returned before acknowledging the change.
//! 3. After [`Engine::builder`](crate::Engine::builder)`...build()`, take each shard's
//!    [`ShardLog::take_replay`] records and apply them (without logging them again), then call
//!    [`ShardLog::checkpoint`].
//!
//! A clean shutdown writes back each shard's blocks, then marks its log empty, except a log
//! whose records found at open no checkpoint has covered yet: an engine shut down before its
//! replay ended (a failed start) keeps them, to be replayed by the next.

use std::cell::{Cell, RefCell};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use corebuf_shard::io::{DmaDevice, IoQueue, QueueConfig};
use corebuf_shard::log::crc32c_append;
use corebuf_shard::log::format::{HeaderCheck, RegionHeader, HEADER_BLOCKS};
use corebuf_shard::log::{Log, LogConfig, LogError, LogStats, Replay};
use corebuf_shard::WaitList;

use crate::builder::EngineBuilder;
use crate::shard::Shard;
use crate::{Error, IoOp, Result};

/// Magic of the log file header: `"CBLF"`.
const FILE_MAGIC: [u8; 4] = *b"CBLF";
const FILE_VERSION: u16 = 1;
/// Smallest region: two header blocks and fourteen data blocks.
const REGION_BLOCKS_MIN: u64 = 16;

/// One shard's log, as the engine runs it. Reach it with [`Shard::log`].
pub struct ShardLog {
    log: Log<DmaDevice>,
    path: PathBuf,
    replay: RefCell<Option<Replay>>,
    /// The log holds records found at open that no checkpoint has covered since: until one
    /// does (after the embedding server applied them), closing never marks the log empty, so
    /// a start that fails before or during the replay keeps them for the next.
    replay_pending: Cell<bool>,
    checkpointing: Cell<bool>,
    checkpoint_done: WaitList,
    checkpoints: Cell<u64>,
    /// A checkpoint starts in the background once the log is this full (percent).
    checkpoint_at_percent: u64,
}

impl std::fmt::Debug for ShardLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardLog").field("path", &self.path).field("log", &self.log).finish()
    }
}

/// A log's counters, as [`ShardLog::stats`] reports them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardLogStats {
    /// The log's own counters.
    pub log: LogStats,
    /// Checkpoints this shard completed.
    pub checkpoints: u64,
    /// Bytes between the start and the head now.
    pub used_bytes: u64,
    /// The region's data bytes.
    pub capacity_bytes: u64,
}

impl ShardLog {
    /// Opens shard `id`'s region of the log file (if the engine has a log) and scans it.
    pub(crate) async fn open(
        id: usize,
        builder: &EngineBuilder,
        data_path: &Path,
    ) -> Result<Option<Self>> {
        let Some(path) = log_path(builder, data_path) else { return Ok(None) };
        let bs = builder.block_size_bytes as u64;
        let region_blocks = builder.log_size_bytes / bs;
        let device = DmaDevice::open(&path).await?;
        let queue = IoQueue::new(
            device,
            QueueConfig {
                block_size_bytes: builder.block_size_bytes,
                io_depth_max: 8,
                writebacks_in_flight_max: builder.writebacks_in_flight_max,
            },
        )?;
        let config = LogConfig::new(1 + id as u64 * region_blocks, region_blocks);
        let (log, replay) = Log::open(queue, config)
            .await
            .map_err(|e| engine_error(e, &path, config.region_first_block * bs))?;
        Ok(Some(ShardLog {
            log,
            path,
            replay_pending: Cell::new(!replay.records.is_empty()),
            replay: RefCell::new(Some(replay)),
            checkpointing: Cell::new(false),
            checkpoint_done: WaitList::default(),
            checkpoints: Cell::new(0),
            checkpoint_at_percent: 50,
        }))
    }

    /// What opening the log found: the records to replay (once; later calls get `None`).
    pub fn take_replay(&self) -> Option<Replay> {
        self.replay.borrow_mut().take()
    }

    /// Appends a record and returns the position to [`ShardLog::commit`]. When the log is
    /// half full a checkpoint starts in the background; when it is full, the append waits for
    /// a checkpoint (back-pressure) instead of failing.
    pub async fn append(&self, payload: &[u8]) -> Result<u64, LogError> {
        loop {
            match self.log.append(payload).await {
                Err(LogError::Full { .. }) => self.checkpoint_for_room(payload.len()).await?,
                Ok(end) => {
                    self.maybe_start_checkpoint();
                    return Ok(end);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether [`ShardLog::try_append`] of a `payload_len`-byte record would append it now
    /// (it fits the staging ring and the log). Nothing can change that before the caller's
    /// next await.
    pub fn can_append_now(&self, payload_len: usize) -> bool {
        self.log.can_append_now(payload_len)
    }

    /// [`ShardLog::append`] without waiting: `Ok(None)` (nothing appended) where `append`
    /// would wait (the staging ring is full, or the log is full and needs a checkpoint).
    /// For a caller that changes the cache and appends the change's record in one step, with
    /// no await at all (contract 1 above, and no other task can change the block meanwhile),
    /// having checked [`ShardLog::can_append_now`] before changing anything.
    pub fn try_append(&self, payload: &[u8]) -> Result<Option<u64>, LogError> {
        let appended = self.log.try_append(payload)?;
        if appended.is_some() {
            self.maybe_start_checkpoint();
        }
        Ok(appended)
    }

    /// Waits until every record before `lsn` is durable (group commit: one write of the tail
    /// and one flush cover every record appended before it started).
    pub async fn commit(&self, lsn: u64) -> Result<(), LogError> {
        self.log.commit(lsn).await
    }

    /// Commits everything appended so far.
    pub async fn commit_all(&self) -> Result<(), LogError> {
        self.log.commit(self.log.head()).await
    }

    /// The position the next record takes.
    pub fn head(&self) -> u64 {
        self.log.head()
    }

    /// Everything before this position is durable.
    pub fn durable(&self) -> u64 {
        self.log.durable()
    }

    /// The largest record payload accepted.
    pub fn record_bytes_max(&self) -> usize {
        self.log.record_bytes_max()
    }

    /// A checkpoint: the global barrier (every shard writes back its dirty blocks, the device
    /// is flushed), then this log's start moves past every record appended before the call.
    /// Concurrent calls on one shard run one after the other.
    pub async fn checkpoint(&self) -> Result<(), LogError> {
        if self.checkpointing.get() {
            self.checkpoint_done.wait_for(|| (!self.checkpointing.get()).then_some(())).await;
        }
        self.checkpointing.set(true);
        let result = self.run_checkpoint().await;
        self.checkpointing.set(false);
        self.checkpoint_done.notify_all();
        result
    }

    async fn run_checkpoint(&self) -> Result<(), LogError> {
        // Ordering: `start` is read before the barrier begins, so every record before it had
        // its change in the cache before the barrier (contract 1). Reading it after the
        // barrier would skip records whose changes the barrier did not cover.
        let start = self.log.head();
        let shard = Shard::current().ok_or(LogError::Closed)?;
        shard.flush().await?;
        self.log.advance_start(start).await?;
        // The records found at open are behind `start` now (they were applied: contract 3).
        self.replay_pending.set(false);
        self.checkpoints.set(self.checkpoints.get() + 1);
        Ok(())
    }

    /// Waits for a checkpoint that frees room for `payload_len` bytes, running one if none is.
    async fn checkpoint_for_room(&self, payload_len: usize) -> Result<(), LogError> {
        if self.checkpointing.get() {
            self.checkpoint_done.wait_for(|| (!self.checkpointing.get()).then_some(())).await;
            if self.log.has_room_for(payload_len) {
                return Ok(());
            }
        }
        self.checkpoint().await
    }

    fn maybe_start_checkpoint(&self) {
        let used = self.log.used_bytes();
        if self.checkpointing.get()
            || used * 100 < self.log.capacity_bytes() * self.checkpoint_at_percent
        {
            return;
        }
        glommio::spawn_local(async {
            let Some(shard) = Shard::current() else { return };
            let Some(log) = shard.log() else { return };
            if log.checkpointing.get() {
                return;
            }
            if let Err(e) = log.checkpoint().await {
                log::error!("corebuf: shard {}: background log checkpoint failed: {e}", shard.id());
            }
        })
        .detach();
    }

    /// Counters.
    pub fn stats(&self) -> ShardLogStats {
        ShardLogStats {
            log: self.log.stats(),
            checkpoints: self.checkpoints.get(),
            used_bytes: self.log.used_bytes(),
            capacity_bytes: self.log.capacity_bytes(),
        }
    }

    /// The log file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Commits what is left and stops the writer; `clean` (this shard's blocks were written
    /// back and flushed) also marks the log empty, unless the records found at open were not
    /// yet covered by a checkpoint (a start that failed before its replay ended: they are
    /// replayed next time). Closes the log file.
    pub(crate) async fn close(&self, clean: bool) -> Result<()> {
        let clean = clean && !self.replay_pending.get();
        let closed = self.log.close(clean).await.map_err(|e| engine_error(e, &self.path, 0));
        let device = self.log.queue().device().close().await;
        closed.and(device)
    }
}

/// The log file's path, or `None` when the engine has no log.
pub(crate) fn log_path(builder: &EngineBuilder, data_path: &Path) -> Option<PathBuf> {
    if builder.log_size_bytes == 0 {
        return None;
    }
    Some(builder.log_path.clone().unwrap_or_else(|| {
        let mut name = data_path.as_os_str().to_owned();
        name.push(".log");
        PathBuf::from(name)
    }))
}

/// An engine error for a log error: I/O errors as they are, the others as `Error::Io` of
/// kind `InvalidData` on the log file, whose source is the [`LogError`] itself
/// (`source.get_ref()` and `downcast_ref::<LogError>()` recover it).
pub(crate) fn engine_error(e: LogError, path: &Path, offset: u64) -> Error {
    match e {
        LogError::Io(e) => e,
        other => {
            Error::io(IoOp::Open, path, offset, io::Error::new(io::ErrorKind::InvalidData, other))
        }
    }
}

/// Checks the log settings and creates or re-lays out the log file before the shards start.
pub(crate) fn prepare_file(builder: &EngineBuilder, data_path: &Path, shards: usize) -> Result<()> {
    let Some(path) = log_path(builder, data_path) else { return Ok(()) };
    let bs = builder.block_size_bytes as u64;
    let region_blocks = builder.log_size_bytes / bs;
    if !builder.log_size_bytes.is_multiple_of(bs) || region_blocks < REGION_BLOCKS_MIN {
        return Err(Error::config(
            "log_size_bytes",
            format!(
                "{} is not a multiple of the block size {bs} of at least {REGION_BLOCKS_MIN} blocks",
                builder.log_size_bytes
            ),
        ));
    }
    let file_bytes = (1 + shards as u64 * region_blocks) * bs;
    let io_err = |e: io::Error| Error::io(IoOp::Open, &path, 0, e);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err)?;
    let mut header = vec![0u8; bs as usize];
    let len = file.metadata().map_err(io_err)?.len();
    if len >= bs {
        file.read_exact(&mut header).map_err(io_err)?;
        if header.iter().any(|&b| b != 0) {
            let (old_shards, old_region_bytes) = decode_file_header(&header, &path)?;
            if old_shards == shards as u64
                && old_region_bytes == region_blocks * bs
                && len == file_bytes
            {
                return Ok(());
            }
            check_all_clean(&mut file, &path, old_shards, old_region_bytes, bs, len)?;
        }
    }
    // New, blank, or every region clean: lay the file out afresh, all zeroes.
    file.set_len(0).map_err(io_err)?;
    file.seek(SeekFrom::Start(0)).map_err(io_err)?;
    let chunk = vec![0u8; 1 << 20];
    let mut left = file_bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        file.write_all(&chunk[..n]).map_err(io_err)?;
        left -= n as u64;
    }
    encode_file_header(&mut header, shards as u64, region_blocks * bs, bs);
    file.seek(SeekFrom::Start(0)).map_err(io_err)?;
    file.write_all(&header).map_err(io_err)?;
    file.sync_all().map_err(io_err)
}

fn encode_file_header(block: &mut [u8], shards: u64, region_bytes: u64, block_bytes: u64) {
    block.fill(0);
    block[0..4].copy_from_slice(&FILE_MAGIC);
    block[4..6].copy_from_slice(&FILE_VERSION.to_le_bytes());
    block[8..16].copy_from_slice(&shards.to_le_bytes());
    block[16..24].copy_from_slice(&region_bytes.to_le_bytes());
    block[24..32].copy_from_slice(&block_bytes.to_le_bytes());
    let crc = crc32c_append(0, &block[..32]);
    block[32..36].copy_from_slice(&crc.to_le_bytes());
}

fn decode_file_header(block: &[u8], path: &Path) -> Result<(u64, u64)> {
    let u64_at = |at: usize| u64::from_le_bytes(block[at..at + 8].try_into().expect("8 bytes"));
    let bad = |why: &str| {
        Error::config("log_path", format!("{} is not a corebuf log file: {why}", path.display()))
    };
    if block[0..4] != FILE_MAGIC {
        return Err(bad("bad magic"));
    }
    if block[4..6] != FILE_VERSION.to_le_bytes() {
        return Err(bad("unknown version"));
    }
    let crc = u32::from_le_bytes(block[32..36].try_into().expect("4 bytes"));
    if crc32c_append(0, &block[..32]) != crc {
        return Err(bad("header checksum mismatch"));
    }
    Ok((u64_at(8), u64_at(16)))
}

/// Fails unless every region of the old layout was closed cleanly (or never used).
fn check_all_clean(
    file: &mut File,
    path: &Path,
    shards: u64,
    region_bytes: u64,
    bs: u64,
    len: u64,
) -> Result<()> {
    let io_err = |e: io::Error| Error::io(IoOp::Open, path, 0, e);
    let mut block = vec![0u8; bs as usize];
    for region in 0..shards {
        let first = bs + region * region_bytes;
        let mut newest: Option<RegionHeader> = None;
        let mut any_written = false;
        for copy in 0..HEADER_BLOCKS {
            let at = first + copy * bs;
            if at + bs > len {
                continue;
            }
            file.seek(SeekFrom::Start(at)).map_err(io_err)?;
            file.read_exact(&mut block).map_err(io_err)?;
            match RegionHeader::decode(&block) {
                HeaderCheck::Zero => {}
                HeaderCheck::Valid(h) => {
                    any_written = true;
                    if newest.is_none_or(|n| n.sequence < h.sequence) {
                        newest = Some(h);
                    }
                }
                HeaderCheck::Invalid(_) => any_written = true,
            }
        }
        let clean = !any_written || newest.is_some_and(|h| h.clean);
        if !clean {
            return Err(Error::config(
                "log_size_bytes",
                format!(
                    "{} holds records to replay, written by {shards} shards with {region_bytes}-byte \
                     regions; open with those settings once to replay them",
                    path.display()
                ),
            ));
        }
    }
    Ok(())
}
