//! One shard's half of the key-value store: the hash table operations on the ranges this shard
//! owns, the per-range free space, the per-bucket locks, the deferred work that waits for a
//! barrier, and the group-commit task.
//!
//! # Crash safety in one paragraph
//!
//! The cache may write any dirty block at any time, so after a crash the device holds, for each
//! block, some version no older than the last completed barrier. The format is built so that
//! every such mix reads back as a state the clients could have seen:
//! - a change that fits in one block is made in that block (one block write is atomic);
//! - a new block (overflow, extent) is referenced by a tag it carries, so a reference that
//!   reached the device before the block did is recognisably stale and ignored;
//! - a replaced value's old record is removed, and freed blocks are reused, only after a
//!   barrier has made the replacement durable ([`JobKind`]);
//! - the free-space bitmaps are not trusted after a crash: they are rebuilt from the chains.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::rc::Rc;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use corebuf::io::DmaDevice;
use corebuf::Shard;
use corebuf_shard::cache::Session;
use corebuf_shard::WaitList;
use hashbrown::HashMap;

use crate::format::{self, rflags, Body, Check, Corrupt, ExtentCheck, Manifest, RecordRef};
use crate::format::{BUCKETS_PER_RANGE, POOL_START, RANGE_BLOCKS, RECORD_AREA};
use crate::lock::BucketLocks;
use crate::logrec;
use crate::stop::StopSignal;

mod keys_walk;

/// A session of this shard's cache partition.
type Sess = Session<DmaDevice>;

/// The durability policy (Redis's `appendfsync`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Fsync {
    /// A write is answered only after its shard's log commit covering it (one write and one
    /// `fdatasync` of the log for every record appended since the previous commit).
    Always,
    /// Each shard commits its log every second when anything was appended.
    Everysec,
    /// No periodic commit: the log's write-behind and the checkpoints write the records.
    No,
}

impl fmt::Display for Fsync {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fsync::Always => "always",
            Fsync::Everysec => "everysec",
            Fsync::No => "no",
        })
    }
}

/// Facts fixed for the whole run, shared by every shard.
#[derive(Debug)]
pub struct Geometry {
    /// Ranges on the device (range 0 is the superblock's).
    pub ranges: u64,
    /// The SipHash key.
    pub hash_key: (u64, u64),
    /// This run's epoch.
    pub epoch: u64,
    /// Range headers stamped below this epoch are rebuilt instead of trusted.
    pub valid_from: u64,
    /// The durability policy.
    pub fsync: Fsync,
    /// Most connections per shard.
    pub max_clients_per_shard: usize,
    /// When the server started.
    pub started: Instant,
    /// The data file (for INFO).
    pub path: String,
    /// Bytes per chunk of the large values this run writes.
    pub chunk_bytes: u32,
    /// Random per run: the shards derive their large-value tags from it.
    pub tag_seed: u64,
}

/// Bytes per chunk of a large value unless `--chunk-bytes` says otherwise: two extent blocks'
/// payload (README, "Large values", tells how this was chosen).
pub const CHUNK_BYTES_DEFAULT: u32 = 2 * format::EXTENT_PAYLOAD as u32;

/// Where a key lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loc {
    /// Its range.
    pub range: u64,
    /// Its bucket's head block.
    pub head: u64,
    /// Its bucket id (`range * BUCKETS_PER_RANGE + bucket`).
    pub bucket_id: u64,
}

impl Geometry {
    /// The range and bucket of `key`: two independent halves of its SipHash.
    pub fn locate(&self, key: &[u8]) -> Loc {
        let h = format::siphash24(self.hash_key.0, self.hash_key.1, key);
        let data_ranges = self.ranges - 1;
        let range = 1 + (((h & 0xFFFF_FFFF) * data_ranges) >> 32);
        let bucket = ((h >> 32) * BUCKETS_PER_RANGE) >> 32;
        Loc {
            range,
            head: range * RANGE_BLOCKS + 1 + bucket,
            bucket_id: range * BUCKETS_PER_RANGE + bucket,
        }
    }
}

/// Why an operation failed; rendered as the `-ERR ...` reply.
#[derive(Debug, Clone)]
pub enum KvError {
    /// A block failed its checks.
    Corrupt(Corrupt),
    /// The engine reported an error (I/O, shutdown).
    Engine(String),
    /// The key's range has no free block left.
    OutOfSpace(u64),
    /// A chunk of a large value hashes to a range with no free block left.
    ChunkOutOfSpace(u64),
    /// The server is shutting down.
    ShuttingDown,
    /// A record is stored in the cache, but appending its log record failed (the shard's log
    /// is failed from then on). A removal whose append failed is an `Engine` error. The change may still reach the data file through write-back, so
    /// whatever it names (a large value's chunks) must not be freed.
    LogAppend(String),
}

impl KvError {
    /// Whether the change was made in the cache before the error ([`KvError::LogAppend`]).
    pub fn applied(&self) -> bool {
        matches!(self, KvError::LogAppend(_))
    }
}

impl fmt::Display for KvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvError::Corrupt(c) => write!(f, "ERR {c}"),
            KvError::Engine(e) => write!(f, "ERR storage error: {e}"),
            KvError::OutOfSpace(r) => write!(
                f,
                "ERR out of space: region {r} of the data file (where this key hashes) is full; \
                 delete keys or use a larger --size"
            ),
            KvError::ChunkOutOfSpace(r) => write!(
                f,
                "ERR out of space: region {r} of the data file, where a chunk of this large value \
                 hashes, is full; nothing was stored (delete keys or use a larger --size)"
            ),
            KvError::ShuttingDown => write!(f, "ERR the server is shutting down"),
            KvError::LogAppend(e) => write!(f, "ERR storage error: log append: {e}"),
        }
    }
}

impl From<corebuf::Error> for KvError {
    fn from(e: corebuf::Error) -> Self {
        KvError::Engine(e.to_string())
    }
}

impl From<Corrupt> for KvError {
    fn from(c: Corrupt) -> Self {
        KvError::Corrupt(c)
    }
}

/// Result of store operations.
pub type KvResult<T> = Result<T, KvError>;

/// The condition of a SET.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cond {
    /// Always set.
    Always,
    /// Only if the key does not exist (NX).
    Nx,
    /// Only if the key exists (XX).
    Xx,
}

impl Cond {
    /// Whether a write under this condition goes ahead, the key being `live` or not.
    pub fn holds(self, live: bool) -> bool {
        match self {
            Cond::Always => true,
            Cond::Nx => !live,
            Cond::Xx => live,
        }
    }
}

/// The wall clock in unix milliseconds: expiry stamps are absolute wall-clock times, as
/// Redis's, so they mean the same after a restart.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Whether a record with expiry `expires` (unix ms, 0 = none) has expired at `now`.
#[inline]
pub fn expired(expires: u64, now: u64) -> bool {
    expires != 0 && expires <= now
}

/// A key's live value: its bytes and its expiry (unix ms, 0 = none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The value (for a large value, its manifest: see `manifest`).
    pub value: Vec<u8>,
    /// Absolute expiry in unix milliseconds, 0 for none.
    pub expires: u64,
    /// Whether `value` is a large value's [`Manifest`] (the record's flags bit 1).
    pub manifest: bool,
}

impl Entry {
    /// The large value's manifest, if the entry is one (`None` for a plain value, or a
    /// manifest that does not decode).
    pub fn large(&self) -> Option<Manifest> {
        self.manifest.then(|| Manifest::decode(&self.value).ok()).flatten()
    }

    /// The value's length: a large value's from its manifest.
    pub fn len(&self) -> u64 {
        match self.large() {
            Some(m) => m.total_len,
            None => self.value.len() as u64,
        }
    }
}

/// Which records a key names: user keys, or the internal chunks of large values (records
/// with flags bit 2, FORMAT.md "Large values"). A lookup in one space never sees the other's
/// records, even under the same key bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Space {
    /// The keys clients name.
    User,
    /// Chunk keys ([`format::chunk_key`]).
    Chunk,
}

impl Space {
    /// The space of a record with these flags.
    pub fn of_flags(flags: u8) -> Space {
        if flags & rflags::CHUNK != 0 {
            Space::Chunk
        } else {
            Space::User
        }
    }

    /// The flag bit of this space.
    pub fn flag(self) -> u8 {
        match self {
            Space::User => 0,
            Space::Chunk => rflags::CHUNK,
        }
    }
}

/// What a local GET found ([`KvShard::get_into`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Got {
    /// No live value.
    Missing,
    /// The value, appended to the caller's buffer.
    Value,
    /// A large value's manifest, appended to the caller's buffer.
    Manifest,
}

/// The newest record of a key, as [`KvShard::newest_inline_into`] found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Newest {
    Inline { manifest: bool },
    Extents,
}

/// One block of a GET's walk: the records of user key `key` in record block `data` newer than
/// `best` (version, what, expiry) replace it, an inline value copied to `out[start..]`.
fn newest_in_block(
    block: u64,
    data: &[u8],
    rbk: &format::RecordBlock,
    key: &[u8],
    out: &mut Vec<u8>,
    start: usize,
    best: &mut Option<(u64, Newest, u64)>,
) -> KvResult<()> {
    let end = format::RECORD_BLOCK_HEADER + rbk.used;
    let (mut at, mut count) = (format::RECORD_BLOCK_HEADER, 0);
    while at < end {
        let rec = format::parse_record(block, data, at, end)?;
        at += rec.len;
        count += 1;
        let newer = best.as_ref().is_none_or(|(version, _, _)| rec.version > *version);
        if !newer || rec.is_chunk() || &data[rec.key.0..rec.key.0 + rec.key.1] != key {
            continue;
        }
        out.truncate(start);
        let kind = match rec.body {
            Body::Inline(at) => {
                out.extend_from_slice(&data[at..at + rec.value_len]);
                Newest::Inline { manifest: rec.is_manifest() }
            }
            Body::Extents(..) => Newest::Extents,
        };
        *best = Some((rec.version, kind, rec.expires));
    }
    if count != rbk.count {
        let why = format!("{count} records, header says {}", rbk.count);
        return Err(format::corrupt(block, why).into());
    }
    Ok(())
}

/// The end of a GET's walk: what the newest record `best` holds, `None` (and `out` cut back to
/// `start`) if there is none or it has expired.
fn newest_unexpired(
    best: Option<(u64, Newest, u64)>,
    out: &mut Vec<u8>,
    start: usize,
) -> Option<Newest> {
    match best {
        // The clock is read only for keys that have an expiry.
        Some((_, _, expires)) if expired(expires, now_ms()) => {
            out.truncate(start);
            None
        }
        best => best.map(|(_, kind, _)| kind),
    }
}

/// What a write did besides its answer ([`KvShard::update_full`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// Whether it changed the key.
    pub wrote: bool,
    /// The manifest of a large value the change removed or replaced: its chunks are the
    /// caller's to free (after the change is durable).
    pub orphan: Option<Manifest>,
}

/// What [`KvShard::set_locked`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SetDone {
    done: bool,
    replaced: Option<Manifest>,
}

/// What a read-modify-write ([`KvShard::update`]) does to its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Nothing (a key found expired is still deleted: it was expired before).
    Keep,
    /// Sets the value with this expiry (unix ms, 0 = none; a time already past deletes).
    Set(Vec<u8>, u64),
    /// Sets a large value: this manifest (encoded), with this expiry.
    Large(Vec<u8>, u64),
    /// Deletes the key.
    Del,
}

/// Buckets the expiry sweep may visit per tick when their head block is cached; a bucket whose
/// head is not cached costs [`SWEEP_MISS_COST`] of this budget (it is read from the device).
pub const SWEEP_BUDGET_PER_TICK: u64 = 64;
/// Budget units a sweep visit to a bucket whose head is not cached costs.
pub const SWEEP_MISS_COST: u64 = 8;
/// Expired keys the sweep deletes per tick at most.
pub const SWEEP_DELETES_PER_TICK: u64 = 256;
/// The sweep's period.
pub const SWEEP_PERIOD: Duration = Duration::from_millis(100);

/// A range's free-space bitmap and key count, once loaded.
#[derive(Debug, Clone)]
struct RangeAlloc {
    bitmap: Vec<u64>,
    keys: u64,
}

impl RangeAlloc {
    fn fresh() -> RangeAlloc {
        let mut a = RangeAlloc { bitmap: vec![0; (RANGE_BLOCKS as usize).div_ceil(64)], keys: 0 };
        for b in 0..POOL_START {
            a.set(b);
        }
        a
    }
    fn set(&mut self, b: u64) {
        self.bitmap[(b / 64) as usize] |= 1 << (b % 64);
    }
    fn clear(&mut self, b: u64) {
        self.bitmap[(b / 64) as usize] &= !(1 << (b % 64));
    }
    fn is_set(&self, b: u64) -> bool {
        self.bitmap[(b / 64) as usize] & (1 << (b % 64)) != 0
    }
    fn free_blocks(&self) -> u64 {
        RANGE_BLOCKS - self.bitmap.iter().map(|w| w.count_ones() as u64).sum::<u64>()
    }
}

#[derive(Debug)]
enum SlotState {
    Unloaded,
    Loading,
    Loaded(RangeAlloc),
}

#[derive(Debug)]
struct RangeSlot {
    state: RefCell<SlotState>,
    ready: WaitList,
}

/// Work that must wait until a barrier has made an earlier change durable.
#[derive(Debug)]
enum JobKind {
    /// Return blocks (offsets within the range) to the range's free space.
    Free { range: u64, blocks: Vec<u16> },
    /// Remove every record of `key` (in `space`) older than `keep` (a newer one is durable).
    Cleanup { key: Vec<u8>, keep: u64, space: Space },
}

#[derive(Debug)]
struct Job {
    /// The barrier number (on this shard's committer) that must complete first.
    after: u64,
    kind: JobKind,
}

/// The group-commit state of one shard.
#[derive(Debug, Default)]
struct Committer {
    /// Barriers started by this shard.
    started: Cell<u64>,
    /// The number of the last barrier that ended.
    completed: Cell<u64>,
    /// The number of the last barrier that succeeded.
    last_ok: Cell<u64>,
    last_error: RefCell<String>,
    /// The highest barrier number a waiter needs.
    wanted: Cell<u64>,
    /// Writes applied on this shard since the last barrier started (for everysec).
    writes: Cell<u64>,
    wake: WaitList,
    done: WaitList,
    /// Barrier latencies, µs (sum and count for INFO).
    latency_sum_us: Cell<u64>,
    waiters_served: Cell<u64>,
}

/// Counters for INFO.
#[derive(Debug, Default)]
pub struct Counters {
    /// Commands parsed on this shard's connections.
    pub commands: Cell<u64>,
    /// Connections accepted.
    pub connections_total: Cell<u64>,
    /// Connections open now.
    pub connections: Cell<usize>,
    /// Connections refused at the client limit.
    pub rejected: Cell<u64>,
    /// Batches of operations sent to other shards.
    pub remote_batches: Cell<u64>,
    /// Operations executed on this shard as the owner.
    pub ops: Cell<u64>,
    /// GETs that found / did not find their key.
    pub hits: Cell<u64>,
    /// GETs that did not find their key.
    pub misses: Cell<u64>,
    /// Ranges loaded from a trusted header / fresh / rebuilt from their chains.
    pub ranges_trusted: Cell<u64>,
    /// Ranges never used before.
    pub ranges_fresh: Cell<u64>,
    /// Ranges whose free space was rebuilt (after an unclean shutdown).
    pub ranges_rebuilt: Cell<u64>,
    /// Records removed by rebuilds (stale or unfinished after a crash).
    pub records_repaired: Cell<u64>,
    /// Deferred jobs executed.
    pub jobs_run: Cell<u64>,
    /// SETs refused for lack of space.
    pub out_of_space: Cell<u64>,
    /// Protocol errors.
    pub protocol_errors: Cell<u64>,
    /// Expired keys deleted (by a write that found them expired, or by the sweep).
    pub expired_keys: Cell<u64>,
    /// Buckets the expiry sweep visited.
    pub sweep_buckets: Cell<u64>,
    /// Chunk records of large values written / read / deleted on this shard.
    pub chunks_written: Cell<u64>,
    /// Chunk records read.
    pub chunks_read: Cell<u64>,
    /// Chunk records deleted.
    pub chunks_deleted: Cell<u64>,
}

/// Records whose blocks replay starts reading ahead of the one it applies.
const REPLAY_PREFETCH_RECORDS: usize = 256;

/// A log record replay applies: decoded, with its key's place.
#[derive(Clone, Copy, Debug)]
struct Planned<'a> {
    /// Its index among the log's records.
    index: usize,
    /// Its log position (for errors).
    lsn: u64,
    rec: logrec::Record<'a>,
    loc: Loc,
}

/// The records a replay applies, in the order it applies them: each key's last record only,
/// range by range (`locate` gives a key's place), in each range the DELs first, then the SETs,
/// each in the order of their bucket heads, then of the log.
///
/// A record holds its key's whole resulting state (a value with its expiry, or its removal), so
/// a key's last record is its state after the log, and keys do not depend on each other (a
/// large value's chunks are keys of their own, each written before any manifest naming it, see
/// FORMAT.md). Replaying every record in turn would need, at each step, the room the live
/// server had at that moment, in a data file that may already be further on: a range full of
/// keys set after a DEL or a replaced value the log has not yet reached has no block for the
/// records before them. Deleting first and setting only final values needs no more room than
/// the state after the log (room is a range's own: its DELs first is enough). And since the
/// order of keys does not matter, replay goes through the file in order, range by range and
/// bucket by bucket, instead of wherever the log's keys hashed.
fn replay_order(
    records: &[corebuf::LogRecord],
    locate: impl Fn(&[u8]) -> Loc,
) -> Result<Vec<Planned<'_>>, String> {
    let mut last: hashbrown::HashMap<(bool, &[u8]), Planned<'_>> = hashbrown::HashMap::new();
    for (index, record) in records.iter().enumerate() {
        let rec = logrec::decode(&record.payload)
            .map_err(|e| format!("log record at position {}: {e}", record.lsn))?;
        let planned = Planned { index, lsn: record.lsn, rec, loc: locate(rec.key) };
        last.insert((rec.kind & rflags::CHUNK != 0, rec.key), planned);
    }
    let mut order: Vec<Planned<'_>> = last.into_values().collect();
    order.sort_unstable_by_key(|p| (p.loc.range, p.rec.op == logrec::Op::Set, p.loc.head, p.index));
    Ok(order)
}

/// What replaying one shard's log took.
#[derive(Debug, Clone, Default)]
pub struct ReplayReport {
    /// Records in the log after its last checkpoint.
    pub records: u64,
    /// Records applied: each key's last ([`replay_order`]).
    pub applied: u64,
    /// SETs applied after removing the key, its range being full ([`KvShard::replay_set`]).
    pub replaced_when_full: u64,
    /// Bytes of log they took.
    pub bytes: u64,
    /// Reading and checking the log region.
    pub scan: Duration,
    /// Applying the records.
    pub apply: Duration,
    /// The checkpoints after them (main.rs's, once every shard has applied its records).
    pub checkpoint: Duration,
}

/// One shard's store.
pub struct KvShard {
    /// The engine shard this runs on.
    pub shard: Rc<Shard>,
    /// Run-wide facts.
    pub geo: Arc<Geometry>,
    locks: BucketLocks,
    ranges: RefCell<HashMap<u64, Rc<RangeSlot>>>,
    /// A bit per range, set once the range is loaded (it never unloads): the check every write
    /// makes, without the map.
    loaded: Box<[Cell<bool>]>,
    committer: Committer,
    jobs: RefCell<Vec<Job>>,
    due: RefCell<VecDeque<JobKind>>,
    runner_busy: Cell<bool>,
    jobs_idle: WaitList,
    next_id: Cell<u64>,
    /// Counters for INFO.
    pub counters: Counters,
    /// Set when the server stops: no new connections, connections close when idle.
    pub stop: StopSignal,
    /// Woken when a connection ends.
    pub conns_closed: WaitList,
    frozen: Cell<bool>,
    writers_active: Cell<usize>,
    writers_idle: WaitList,
    /// Tells the main thread to stop the server (SHUTDOWN).
    pub stop_tx: mpsc::Sender<String>,
    /// Set while the log is replayed: replayed changes are not logged again.
    replaying: Cell<bool>,
    /// Large values whose manifest the log replay dropped because their expiry had passed
    /// (key, manifest): their chunks are freed once every shard has replayed
    /// ([`KvShard::free_expired_in_replay`]).
    replay_expired: RefCell<Vec<(Vec<u8>, Manifest)>>,
    /// The record being encoded (kept to reuse its capacity).
    log_buf: RefCell<Vec<u8>>,
    /// The inline record a SET is writing (kept to reuse its capacity; taken out while in
    /// use, so a SET that runs meanwhile starts a new one).
    record_buf: RefCell<Vec<u8>>,
    /// The next bucket id the expiry sweep visits.
    sweep_cursor: Cell<u64>,
    /// The sweep rests: its last full pass found no key with an expiry on this shard, and none
    /// was written since. An idle server then reads nothing (each start makes one pass).
    sweep_idle: Cell<bool>,
    /// A key with an expiry was seen or written during the sweep's current pass.
    sweep_pass_volatile: Cell<bool>,
    /// Large values being streamed or freed, by tag (this shard owns their chunk 0).
    pub pins: crate::chunks::PinTable,
    /// Tags of the large values this shard's connections write.
    pub tags: crate::chunks::TagSource,
}

impl fmt::Debug for KvShard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvShard").field("shard", &self.shard.id()).finish_non_exhaustive()
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<KvShard>>> = const { RefCell::new(None) };
}

/// Marks a write operation in progress (shutdown waits for none before writing headers).
struct WriteToken<'a>(&'a KvShard);

impl Drop for WriteToken<'_> {
    fn drop(&mut self) {
        self.0.writers_active.set(self.0.writers_active.get() - 1);
        self.0.writers_idle.notify_all();
    }
}

/// A key with its space in front (0 user, 1 chunk): the identity of a key when records of
/// both spaces are handled together (the repair).
fn space_key(key: &[u8], flags: u8) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + key.len());
    k.push((Space::of_flags(flags) == Space::Chunk) as u8);
    k.extend_from_slice(key);
    k
}

/// What [`KvShard::plan_in_head`] found a SET can do in a bucket's head block.
#[derive(Clone, Copy, Debug)]
struct HeadPlan {
    /// The key's one record, to replace: its offset, length and expiry (`None`: append).
    old: Option<(usize, usize, u64)>,
    /// The block is zeroes (never written): initialise it first.
    zero: bool,
}

/// What a chain walk found in one block.
#[derive(Debug, Clone)]
struct ChainBlock {
    block: u64,
    /// Never written (an empty bucket head).
    zero: bool,
    used: usize,
}

/// A record of the wanted key found by a chain walk.
#[derive(Debug, Clone)]
struct Hit {
    chain_index: usize,
    block: u64,
    rec: RecordRef,
    /// The inline value, when the walk was asked to copy values.
    inline: Option<Vec<u8>>,
}

/// The per-shard summary returned for INFO.
#[derive(Debug, Clone, Default)]
pub struct InfoPart {
    /// The shard.
    pub shard: usize,
    /// Engine statistics of the shard.
    pub cache_hits: u64,
    /// Cache misses.
    pub cache_misses: u64,
    /// Misses of never-written blocks of a new data file, zeroed instead of read.
    pub zero_fills: u64,
    /// Evictions.
    pub evictions: u64,
    /// Write-backs.
    pub writebacks: u64,
    /// Frames.
    pub frames: u64,
    /// Dirty frames.
    pub dirty: u64,
    /// Device reads.
    pub device_reads: u64,
    /// Device writes (normal and write-back).
    pub device_writes: u64,
    /// Device flushes.
    pub device_flushes: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Cross-shard messages sent.
    pub messages_sent: u64,
    /// Messages received.
    pub messages_received: u64,
    /// Barriers this shard's committer ran, and their mean latency.
    pub barriers: u64,
    /// Mean barrier latency, µs.
    pub barrier_mean_us: u64,
    /// Writers that waited for a barrier.
    pub commit_waiters: u64,
    /// Read latency p99, µs.
    pub read_p99_us: u64,
    /// KV counters.
    pub commands: u64,
    /// Connections open.
    pub connections: u64,
    /// Connections accepted.
    pub connections_total: u64,
    /// Connections rejected.
    pub rejected: u64,
    /// Operations executed as owner.
    pub ops: u64,
    /// Remote batches sent.
    pub remote_batches: u64,
    /// GET hits.
    pub hits: u64,
    /// GET misses.
    pub misses: u64,
    /// Ranges loaded trusted / fresh / rebuilt.
    pub ranges_loaded: (u64, u64, u64),
    /// Free blocks in the loaded ranges.
    pub free_blocks_loaded: u64,
    /// Records repaired.
    pub records_repaired: u64,
    /// Deferred jobs pending and run.
    pub jobs: (u64, u64),
    /// Out of space refusals.
    pub out_of_space: u64,
    /// Protocol errors.
    pub protocol_errors: u64,
    /// Expired keys deleted.
    pub expired_keys: u64,
    /// Chunk records written / read / deleted.
    pub chunks: (u64, u64, u64),
    /// Large values being streamed or freed (pin table entries).
    pub large_pins: u64,
    /// Buckets the expiry sweep visited.
    pub sweep_buckets: u64,
    /// Records appended to this shard's log.
    pub log_appends: u64,
    /// Group commits of the log (one flush each).
    pub log_commits: u64,
    /// Log checkpoints (barrier, then the log's start moves).
    pub log_checkpoints: u64,
    /// Log bytes awaiting the next checkpoint.
    pub log_used_bytes: u64,
    /// Microseconds of all log commit rounds / of their flushes.
    pub log_commit_us: (u64, u64),
}

impl KvShard {
    /// Creates this shard's store and starts its committer task.
    pub fn install(shard: Rc<Shard>, geo: Arc<Geometry>, stop_tx: mpsc::Sender<String>) {
        let (geo_seed, shard_id) = (geo.tag_seed, shard.id());
        let kv = Rc::new(KvShard {
            shard,
            loaded: (0..geo.ranges).map(|_| Cell::new(false)).collect(),
            geo,
            locks: BucketLocks::default(),
            ranges: RefCell::new(HashMap::new()),
            committer: Committer::default(),
            jobs: RefCell::new(Vec::new()),
            due: RefCell::new(VecDeque::new()),
            runner_busy: Cell::new(false),
            jobs_idle: WaitList::default(),
            next_id: Cell::new(1),
            counters: Counters::default(),
            stop: StopSignal::default(),
            conns_closed: WaitList::default(),
            frozen: Cell::new(false),
            writers_active: Cell::new(0),
            writers_idle: WaitList::default(),
            stop_tx,
            replaying: Cell::new(false),
            replay_expired: RefCell::new(Vec::new()),
            log_buf: RefCell::new(Vec::new()),
            record_buf: RefCell::new(Vec::new()),
            sweep_cursor: Cell::new(0),
            sweep_idle: Cell::new(false),
            sweep_pass_volatile: Cell::new(false),
            pins: crate::chunks::PinTable::default(),
            tags: crate::chunks::TagSource::new(geo_seed, shard_id),
        });
        CURRENT.with(|c| *c.borrow_mut() = Some(Rc::clone(&kv)));
        glommio::spawn_local(Rc::clone(&kv).committer_loop()).detach();
    }

    /// The store of the shard running on this thread, if it was installed.
    pub fn try_current() -> Option<Rc<KvShard>> {
        CURRENT.with(|c| c.borrow().clone())
    }

    /// The store of the shard running on this thread.
    ///
    /// # Panics
    /// On a thread where [`KvShard::install`] did not run (a bug).
    pub fn current() -> Rc<KvShard> {
        CURRENT.with(|c| c.borrow().clone()).expect("KvShard::install ran on every shard")
    }

    /// The shard that owns `key`.
    pub fn owner_of_key(&self, key: &[u8]) -> usize {
        self.owner_of_loc(&self.geo.locate(key))
    }

    /// The shard that owns a key at `loc`.
    pub fn owner_of_loc(&self, loc: &Loc) -> usize {
        self.shard.owner_of(loc.range * RANGE_BLOCKS)
    }

    fn id(&self) -> u64 {
        let n = self.next_id.get();
        self.next_id.set(n + 1);
        (self.geo.epoch << 40) | n
    }

    fn begin_write(&self) -> KvResult<WriteToken<'_>> {
        if self.frozen.get() {
            return Err(KvError::ShuttingDown);
        }
        self.writers_active.set(self.writers_active.get() + 1);
        Ok(WriteToken(self))
    }

    // -----------------------------------------------------------------------------------------
    // Operations (run on the key's owner).

    /// GET appending the value to `out`. The hot path of a local GET: nothing is allocated
    /// when the value is inline and its blocks are cached (lock entries are pooled, records
    /// are parsed in place). A value in extent blocks is read by [`KvShard::get_entry`]. A
    /// large value's manifest is appended as it is ([`Got::Manifest`]).
    /// `loc` is the key's place (`self.geo.locate(key)`): the batch that routed the key computed
    /// it already.
    pub async fn get_into_at(&self, loc: &Loc, key: &[u8], out: &mut Vec<u8>) -> KvResult<Got> {
        debug_assert_eq!(*loc, self.geo.locate(key));
        let start = out.len();
        let newest = {
            let _lock = self.locks.read(loc.bucket_id).await;
            let sess = self.shard.partition().session().await;
            self.newest_inline_into(&sess, loc, key, out).await?
        };
        match self.got_inline(newest) {
            Some(got) => Ok(got),
            None => {
                // The newest record keeps its value in extent blocks (and if that value is
                // incomplete, an older record is the value): the general path.
                out.truncate(start);
                let Some(entry) = self.get_entry(key).await? else { return Ok(Got::Missing) };
                out.extend_from_slice(&entry.value);
                Ok(if entry.manifest { Got::Manifest } else { Got::Value })
            }
        }
    }

    /// [`KvShard::get_into_at`] with no await at all, for the batch loop: when the bucket is
    /// one cached block, no one holds or awaits its lock, and the key's newest record there is
    /// inline (or absent). `None`: nothing was done (`out` as it was), the general path runs.
    pub fn try_get_now(&self, loc: &Loc, key: &[u8], out: &mut Vec<u8>) -> Option<Got> {
        debug_assert_eq!(*loc, self.geo.locate(key));
        if !self.locks.is_free(loc.bucket_id) {
            return None;
        }
        let buf = self.shard.partition().get(loc.head)?;
        let data = buf.data();
        let (rbk, _) = self.check_chain_block(loc, loc.head, &data, None).ok()??;
        if rbk.next.0 != 0 {
            return None;
        }
        let start = out.len();
        let mut best = None;
        if newest_in_block(loc.head, &data, &rbk, key, out, start, &mut best).is_err() {
            out.truncate(start);
            return None;
        }
        let newest = newest_unexpired(best, out, start);
        let got = self.got_inline(newest);
        if got.is_none() {
            out.truncate(start);
        }
        got
    }

    /// Counts a GET that found `newest` and says what it got; `None` for a value in extent
    /// blocks (read by the general path).
    fn got_inline(&self, newest: Option<Newest>) -> Option<Got> {
        let c = &self.counters;
        let got = match newest {
            None => {
                c.misses.set(c.misses.get() + 1);
                Got::Missing
            }
            Some(Newest::Inline { manifest }) => {
                c.hits.set(c.hits.get() + 1);
                if manifest {
                    Got::Manifest
                } else {
                    Got::Value
                }
            }
            Some(Newest::Extents) => return None,
        };
        c.ops.set(c.ops.get() + 1);
        Some(got)
    }

    /// Walks `loc`'s chain for the newest record of user key `key`: `None` if there is none or
    /// it has expired, else whether it is an extent record or inline, its value then appended
    /// to `out`.
    async fn newest_inline_into(
        &self,
        sess: &Sess,
        loc: &Loc,
        key: &[u8],
        out: &mut Vec<u8>,
    ) -> KvResult<Option<Newest>> {
        let start = out.len();
        let mut best: Option<(u64, Newest, u64)> = None;
        self.for_each_chain_block(sess, loc, |block, data, rbk, _| {
            newest_in_block(block, data, rbk, key, out, start, &mut best)
        })
        .await?;
        Ok(newest_unexpired(best, out, start))
    }

    /// The live value of user key `key` with its expiry (`None` if absent or expired).
    pub async fn get_entry(&self, key: &[u8]) -> KvResult<Option<Entry>> {
        self.get_entry_in(key, Space::User).await
    }

    /// The live value of `key` in `space`.
    pub(crate) async fn get_entry_in(&self, key: &[u8], space: Space) -> KvResult<Option<Entry>> {
        self.counters.ops.set(self.counters.ops.get() + 1);
        let loc = self.geo.locate(key);
        let entry = {
            let _lock = self.locks.read(loc.bucket_id).await;
            let sess = self.shard.partition().session().await;
            self.read_locked(&sess, &loc, key, space).await?.0
        };
        let live = entry.filter(|e| !expired(e.expires, now_ms()));
        let c = &self.counters;
        match (&live, space) {
            (_, Space::Chunk) => {}
            (Some(_), Space::User) => c.hits.set(c.hits.get() + 1),
            (None, Space::User) => c.misses.set(c.misses.get() + 1),
        }
        Ok(live)
    }

    /// The newest complete record of `key` in `space` (expired or not), and whether any
    /// record of it is in the chain. The caller holds the bucket's lock.
    async fn read_locked(
        &self,
        sess: &Sess,
        loc: &Loc,
        key: &[u8],
        space: Space,
    ) -> KvResult<(Option<Entry>, bool)> {
        let (_, mut hits) = self.walk(sess, loc, key, true, space).await?;
        let present = !hits.is_empty();
        hits.sort_by_key(|h| std::cmp::Reverse(h.rec.version));
        for hit in hits {
            let (expires, manifest) = (hit.rec.expires, hit.rec.is_manifest());
            match &hit.rec.body {
                Body::Inline(_) => {
                    let value = hit.inline.expect("the walk copies inline values");
                    return Ok((Some(Entry { value, expires, manifest }), present));
                }
                Body::Extents(tag, list) => {
                    let value = self.read_extents(sess, loc, *tag, list, hit.rec.value_len).await?;
                    if let Some(value) = value {
                        return Ok((Some(Entry { value, expires, manifest }), present));
                    }
                    // Unfinished before a crash: an older version (if any) is the value.
                }
            }
        }
        Ok((None, present))
    }

    /// Reads `key` under its bucket's write lock, lets `f` decide from its live value (if any)
    /// and the clock what to write and what to answer, and makes that change, logged, before
    /// the lock is released: a read-modify-write that no other operation on the key can
    /// interleave with. An expired key is passed as absent and deleted (and logged) whatever
    /// `f` decides. `f` may run twice (a retry after space was freed). A large value whose
    /// manifest this removes gets its chunks freed in the background; [`KvShard::update_full`]
    /// hands that job to the caller instead.
    pub async fn update<R>(
        &self,
        key: &[u8],
        f: impl FnMut(Option<&Entry>, u64) -> (Write, R),
    ) -> KvResult<R> {
        let (answer, effects) = self.update_full(key, f).await?;
        self.free_in_background(effects.orphan);
        Ok(answer)
    }

    /// [`KvShard::update`], returning what the change did besides its answer: whether it
    /// wrote, and the manifest of a large value it removed (whose chunks the caller frees once
    /// it has answered: see `large::free_chunks`).
    pub async fn update_full<R>(
        &self,
        key: &[u8],
        mut f: impl FnMut(Option<&Entry>, u64) -> (Write, R),
    ) -> KvResult<(R, Effects)> {
        self.counters.ops.set(self.counters.ops.get() + 1);
        let loc = self.geo.locate(key);
        let mut retried = false;
        loop {
            let result = async {
                let _token = self.begin_write()?;
                self.ensure_loaded(loc.range).await?;
                let _lock = self.locks.write(loc.bucket_id).await;
                if self.frozen.get() {
                    return Err(KvError::ShuttingDown);
                }
                let now = now_ms();
                let (entry, present) = {
                    let sess = self.shard.partition().session().await;
                    self.read_locked(&sess, &loc, key, Space::User).await?
                };
                let live = entry.filter(|e| !expired(e.expires, now));
                let (write, answer) = f(live.as_ref(), now);
                let deleting = !matches!(write, Write::Keep);
                let mut effects = Effects::default();
                let set = match &write {
                    Write::Set(value, expires) => Some((value, *expires, 0)),
                    Write::Large(manifest, expires) => Some((manifest, *expires, rflags::MANIFEST)),
                    Write::Del | Write::Keep => None,
                };
                match set {
                    Some((value, expires, kind)) if !expired(expires, now) => {
                        let done =
                            self.set_locked(&loc, key, value, expires, Cond::Always, kind).await?;
                        effects = Effects { wrote: true, orphan: done.replaced };
                        self.log_record(logrec::Op::Set, key, value, expires, kind).await?;
                    }
                    _ if present && (deleting || live.is_none()) => {
                        if live.is_none() {
                            let c = &self.counters;
                            c.expired_keys.set(c.expired_keys.get() + 1);
                        }
                        let removed = self.del_locked(&loc, key, Space::User).await?;
                        effects = Effects { wrote: deleting, orphan: removed.and_then(|r| r.1) };
                        self.log_record(logrec::Op::Del, key, &[], 0, 0).await?;
                    }
                    _ => {}
                }
                Ok((answer, effects))
            }
            .await;
            match result {
                Ok(done) => return Ok(done),
                Err(e) => self.retry_out_of_space(e, &mut retried).await?,
            }
        }
    }

    /// After a write attempt failed with `e`: `Ok` to try again once, after a barrier gave
    /// back the space that deletes freed (if any are pending); else the error to return (an
    /// out-of-space one counted).
    async fn retry_out_of_space(&self, e: KvError, retried: &mut bool) -> KvResult<()> {
        match e {
            // Replay settles once for all of its SETs that found no room
            // (`replay_sets_when_full`), not once each; and its refusals are not a client's.
            KvError::OutOfSpace(r) if self.replaying.get() => Err(KvError::OutOfSpace(r)),
            KvError::OutOfSpace(_) if !*retried && self.jobs_pending() => {
                *retried = true;
                self.settle().await
            }
            KvError::OutOfSpace(r) => {
                self.counters.out_of_space.set(self.counters.out_of_space.get() + 1);
                Err(KvError::OutOfSpace(r))
            }
            e => Err(e),
        }
    }

    /// Sets `key` to `value` with expiry `expires` (unix ms, 0 = none) if `cond` holds, as a
    /// record of kind `kind` (0: a plain value; [`rflags::MANIFEST`]: a
    /// large value's manifest; [`rflags::CHUNK`]: a chunk under a chunk key). Returns whether
    /// it was set and the manifest of a large value it replaced (the caller frees its chunks).
    pub async fn set_full(
        &self,
        key: &[u8],
        value: &[u8],
        expires: u64,
        cond: Cond,
        kind: u8,
    ) -> KvResult<(bool, Option<Manifest>)> {
        self.set_full_at(&self.geo.locate(key), key, value, expires, cond, kind).await
    }

    /// [`KvShard::set_full`] with the key's place `loc` (`self.geo.locate(key)`) already
    /// known: the batch that routed the key computed it.
    pub async fn set_full_at(
        &self,
        loc: &Loc,
        key: &[u8],
        value: &[u8],
        expires: u64,
        cond: Cond,
        kind: u8,
    ) -> KvResult<(bool, Option<Manifest>)> {
        debug_assert_eq!(*loc, self.geo.locate(key));
        if value.len() > format::MAX_VALUE {
            return Err(KvError::Engine(format!(
                "internal: a record value of {} bytes (the limit is {})",
                value.len(),
                format::MAX_VALUE
            )));
        }
        if expires != 0 && expired(expires, now_ms()) {
            debug_assert_eq!(kind & rflags::CHUNK, 0, "chunks have no expiry");
            let (done, effects) = self
                .update_full(key, |live, _| {
                    let holds = cond.holds(live.is_some());
                    (if holds { Write::Del } else { Write::Keep }, holds)
                })
                .await?;
            return Ok((done, effects.orphan));
        }
        self.counters.ops.set(self.counters.ops.get() + 1);
        let mut retried = false;
        loop {
            let result = {
                let _token = self.begin_write()?;
                self.ensure_loaded(loc.range).await?;
                let _lock = self.locks.write(loc.bucket_id).await;
                let set = self.set_locked(loc, key, value, expires, cond, kind).await;
                if let Ok(SetDone { done: true, .. }) = set {
                    // After the change is in the cache, under the bucket lock: the log's
                    // order is the order of the changes (see corebuf::ShardLog's contract).
                    self.log_record(logrec::Op::Set, key, value, expires, kind).await?;
                }
                set
            };
            match result {
                Ok(done) => return Ok((done.done, done.replaced)),
                Err(e) => self.retry_out_of_space(e, &mut retried).await?,
            }
        }
    }

    /// Writes the record (the caller holds the bucket's write lock); `kind` as
    /// [`KvShard::set_full`]'s, which also says the key's name space.
    async fn set_locked(
        &self,
        loc: &Loc,
        key: &[u8],
        value: &[u8],
        expires: u64,
        cond: Cond,
        kind: u8,
    ) -> KvResult<SetDone> {
        if self.frozen.get() {
            return Err(KvError::ShuttingDown);
        }
        if expires != 0 {
            // The sweep has a key to watch again (replay comes through here too).
            self.sweep_idle.set(false);
            self.sweep_pass_volatile.set(true);
        }
        let space = Space::of_flags(kind);
        let sess = self.shard.partition().session().await;
        if let Some(done) = self.set_in_head(&sess, loc, key, value, expires, cond, kind).await? {
            return Ok(done);
        }
        let (chain, hits) = self.walk(&sess, loc, key, false, space).await?;
        let existed = !hits.is_empty();
        let newest = hits.into_iter().max_by_key(|h| h.rec.version);
        // NX / XX look at the live key: an expired one counts as absent.
        // (The clock is read only when the record has an expiry: SET is benchmarked.)
        let live = newest.as_ref().is_some_and(|n| n.rec.expires == 0 || n.rec.expires > now_ms());
        if !cond.holds(live) {
            return Ok(SetDone { done: false, replaced: None });
        }
        // A large value's manifest that this write replaces (by another value): its chunks
        // are the caller's to free, once this change is durable.
        let replaced = newest.as_ref().and_then(|n| match (&n.inline, n.rec.is_manifest()) {
            (Some(old), true) if !(kind == rflags::MANIFEST && old.as_slice() == value) => {
                Manifest::decode(old).ok()
            }
            _ => None,
        });
        let version = self.id();
        if format::inline_record_len(key.len(), value.len(), expires) <= format::INLINE_RECORD_MAX {
            let mut record = self.record_buf.take();
            format::encode_inline_into(&mut record, key, value, version, expires, kind);
            // Whether the record replaced the newest one in its block.
            let written = async {
                if let Some(n) = &newest {
                    let used = chain[n.chain_index].used;
                    if used - n.rec.len + record.len() <= RECORD_AREA {
                        // Replace in place: one block write, atomic.
                        let buf = sess.read(n.block).await?;
                        {
                            let mut data = buf.data_mut();
                            format::remove_record(&mut data, n.rec.offset, n.rec.len);
                            format::append_record(&mut data, &record);
                        }
                        buf.mark_dirty();
                        return Ok(true);
                    }
                }
                self.insert(&sess, loc, &chain, &record).await.map(|()| false)
            }
            .await;
            self.record_buf.replace(record);
            if written? {
                if let Some(Body::Extents(_, list)) = newest.as_ref().map(|n| &n.rec.body) {
                    self.defer(JobKind::Free { range: loc.range, blocks: list.clone() });
                }
                self.note_write();
                return Ok(SetDone { done: true, replaced });
            }
        } else {
            let n = format::extent_count(value.len());
            let blocks = self.alloc(loc.range, n)?;
            let tag = format::mix64(self.id());
            let written = self.write_extents(&sess, loc, tag, &blocks, value).await;
            let record =
                format::encode_extents_with(key, value.len(), version, expires, tag, &blocks, kind);
            let inserted = match written {
                Ok(()) => self.insert(&sess, loc, &chain, &record).await,
                Err(e) => Err(e),
            };
            if let Err(e) = inserted {
                // Nothing on the device refers to these blocks: they are free again at once.
                self.free_now(loc.range, &blocks);
                return Err(e);
            }
        }
        if existed {
            // The old record(s) go once a barrier has made the new one durable.
            self.defer(JobKind::Cleanup { key: key.to_vec(), keep: version, space });
        } else if space == Space::User {
            self.add_keys(loc.range, 1);
        }
        self.note_write();
        Ok(SetDone { done: true, replaced })
    }

    /// The common SET, without [`KvShard::walk`]: a bucket of one block that either holds one
    /// record of `key`, inline and not a large value's manifest, which the new inline record
    /// replaces in place, or holds none and has room for it (a never-written head is
    /// initialised), as the general path would do. One read of the head block and nothing
    /// allocated. `None` when that is not the case (nothing was changed): the general path
    /// runs, and reports anything damaged. Arguments as [`KvShard::set_locked`]'s.
    #[allow(clippy::too_many_arguments)]
    async fn set_in_head(
        &self,
        sess: &Sess,
        loc: &Loc,
        key: &[u8],
        value: &[u8],
        expires: u64,
        cond: Cond,
        kind: u8,
    ) -> KvResult<Option<SetDone>> {
        let new_len = format::inline_record_len(key.len(), value.len(), expires);
        if new_len > format::INLINE_RECORD_MAX {
            return Ok(None);
        }
        let buf = sess.read(loc.head).await?;
        let Some(plan) = self.plan_in_head(loc, &buf.data(), key, Space::of_flags(kind), new_len)
        else {
            return Ok(None);
        };
        let done = self.apply_in_head(&buf, loc, plan, key, value, expires, cond, kind);
        // The fast path never replaces a manifest: no large value to free.
        Ok(Some(SetDone { done, replaced: None }))
    }

    /// [`KvShard::set_in_head`] with no await at all, for the batch loop: when the head block
    /// is cached, no one holds or awaits the bucket's lock, the key's range is loaded and the
    /// log can take the record at once, the SET is done here in one step (so no lock is
    /// needed: nothing else runs meanwhile) and its record appended in the same step. `None`:
    /// nothing was changed, the general path runs. SETs with an expiry take the general path.
    /// `Some(Ok(set))`: whether `cond` held and the key was set.
    pub fn try_set_now(
        &self,
        loc: &Loc,
        key: &[u8],
        value: &[u8],
        cond: Cond,
    ) -> Option<KvResult<bool>> {
        debug_assert_eq!(*loc, self.geo.locate(key));
        let new_len = format::inline_record_len(key.len(), value.len(), 0);
        if new_len > format::INLINE_RECORD_MAX
            || self.frozen.get()
            || !self.loaded.get(loc.range as usize).is_some_and(Cell::get)
            || !self.locks.is_free(loc.bucket_id)
        {
            return None;
        }
        let buf = self.shard.partition().get(loc.head)?;
        let plan = self.plan_in_head(loc, &buf.data(), key, Space::User, new_len)?;
        let log = self.change_log();
        let mut record = self.log_buf.take();
        if let Some(log) = log {
            logrec::encode(&mut record, logrec::Op::Set, key, value, 0, 0);
            if !log.can_append_now(record.len()) {
                self.log_buf.replace(record);
                return None;
            }
        }
        self.counters.ops.set(self.counters.ops.get() + 1);
        let done = self.apply_in_head(&buf, loc, plan, key, value, 0, cond, 0);
        let appended = match log.filter(|_| done) {
            Some(log) => match log.try_append(&record) {
                Ok(Some(_)) => Ok(()),
                Ok(None) => Err("no room, after it said there was".to_string()),
                Err(e) => Err(e.to_string()),
            },
            None => Ok(()),
        };
        self.log_buf.replace(record);
        Some(appended.map(|()| done).map_err(KvError::LogAppend))
    }

    /// What a SET of `key` (an inline record of `new_len` bytes in `space`) can do in the head
    /// block `data` of a one-block bucket: replace the one record of the key, or append.
    /// `None` if neither (a chain, several records of the key, extents or a manifest, no
    /// room, or a damaged block).
    fn plan_in_head(
        &self,
        loc: &Loc,
        data: &[u8],
        key: &[u8],
        space: Space,
        new_len: usize,
    ) -> Option<HeadPlan> {
        let (rbk, zero) = self.check_chain_block(loc, loc.head, data, None).ok()??;
        if rbk.next.0 != 0 {
            return None;
        }
        let end = format::RECORD_BLOCK_HEADER + rbk.used;
        let (mut at, mut count) = (format::RECORD_BLOCK_HEADER, 0);
        let mut found = None;
        while at < end {
            let rec = format::parse_record(loc.head, data, at, end).ok()?;
            at += rec.len;
            count += 1;
            if Space::of_flags(rec.flags) != space || &data[rec.key.0..rec.key.0 + rec.key.1] != key
            {
                continue;
            }
            if found.is_some() || rec.is_manifest() || !matches!(rec.body, Body::Inline(_)) {
                return None;
            }
            found = Some((rec.offset, rec.len, rec.expires));
        }
        let freed = found.map_or(0, |(_, len, _)| len);
        if count != rbk.count || rbk.used - freed + new_len > RECORD_AREA {
            return None;
        }
        Some(HeadPlan { old: found, zero })
    }

    /// Carries out a [`KvShard::plan_in_head`] plan on the head `buf` if `cond` holds; returns
    /// whether it did.
    #[allow(clippy::too_many_arguments)]
    fn apply_in_head(
        &self,
        buf: &corebuf_shard::cache::BufRef<'_, DmaDevice>,
        loc: &Loc,
        HeadPlan { old, zero }: HeadPlan,
        key: &[u8],
        value: &[u8],
        expires: u64,
        cond: Cond,
        kind: u8,
    ) -> bool {
        // NX / XX look at the live key (the clock is read only if it has an expiry).
        let live = old.is_some_and(|(_, _, expires)| expires == 0 || expires > now_ms());
        if !cond.holds(live) {
            return false;
        }
        let mut record = self.record_buf.take();
        format::encode_inline_into(&mut record, key, value, self.id(), expires, kind);
        {
            let mut data = buf.data_mut();
            if zero {
                let head = format::kind::HEAD;
                format::init_record_block(&mut data, head, loc.head, 0, loc.bucket_id);
            }
            if let Some((offset, len, _)) = old {
                format::remove_record(&mut data, offset, len);
            }
            format::append_record(&mut data, &record);
        }
        self.record_buf.replace(record);
        buf.mark_dirty();
        if old.is_none() && Space::of_flags(kind) == Space::User {
            self.add_keys(loc.range, 1);
        }
        self.note_write();
        true
    }

    /// Deletes `key` in `space`; returns whether it existed (an expired key is deleted too,
    /// but did not exist for the caller) and the manifest of the large value it deleted (the
    /// caller frees its chunks).
    pub async fn del_full(&self, key: &[u8], space: Space) -> KvResult<(bool, Option<Manifest>)> {
        self.counters.ops.set(self.counters.ops.get() + 1);
        let loc = self.geo.locate(key);
        let _token = self.begin_write()?;
        self.ensure_loaded(loc.range).await?;
        let _lock = self.locks.write(loc.bucket_id).await;
        if self.frozen.get() {
            return Err(KvError::ShuttingDown);
        }
        let Some((expires, orphan)) = self.del_locked(&loc, key, space).await? else {
            return Ok((false, None));
        };
        self.log_record(logrec::Op::Del, key, &[], 0, space.flag()).await?;
        let live = !expired(expires, now_ms());
        if !live {
            let c = &self.counters;
            c.expired_keys.set(c.expired_keys.get() + 1);
        }
        Ok((live, orphan))
    }

    /// Removes every record of `key` in `space` (the caller holds the bucket's write lock);
    /// returns the newest record's expiry and, if it was a large value's manifest, the
    /// manifest, if there was a record (not logged: the caller logs).
    async fn del_locked(
        &self,
        loc: &Loc,
        key: &[u8],
        space: Space,
    ) -> KvResult<Option<(u64, Option<Manifest>)>> {
        let is_key = |k: &[u8], flags: u8| k == key && Space::of_flags(flags) == space;
        let (newest, expires, orphan) = {
            let sess = self.shard.partition().session().await;
            let (_, hits) = self.walk(&sess, loc, key, false, space).await?;
            let Some(newest) = hits.iter().max_by_key(|h| h.rec.version) else { return Ok(None) };
            let (version, expires) = (newest.rec.version, newest.rec.expires);
            let orphan = match (&newest.inline, newest.rec.is_manifest()) {
                (Some(m), true) => Manifest::decode(m).ok(),
                _ => None,
            };
            if hits.len() > 1 {
                // An older record awaits its cleanup. Remove it first and make that durable,
                // so that a crash cannot leave the older value behind the deleted newer one.
                self.remove_where(&sess, loc, |k, v, f| is_key(k, f) && v < version, true).await?;
                (Some(version), expires, orphan)
            } else {
                self.remove_where(&sess, loc, |k, _, f| is_key(k, f), true).await?;
                (None, expires, orphan)
            }
        };
        if newest.is_some() {
            self.barrier().await.map_err(KvError::Engine)?;
            let sess = self.shard.partition().session().await;
            self.remove_where(&sess, loc, |k, _, f| is_key(k, f), true).await?;
        }
        if space == Space::User {
            self.add_keys(loc.range, -1);
        }
        self.note_write();
        Ok(Some((expires, orphan)))
    }

    /// The length of the newest record of chunk key `key` (its extents are not read).
    pub(crate) async fn chunk_len(&self, key: &[u8]) -> KvResult<Option<usize>> {
        let loc = self.geo.locate(key);
        let _lock = self.locks.read(loc.bucket_id).await;
        let sess = self.shard.partition().session().await;
        let (_, hits) = self.walk(&sess, &loc, key, false, Space::Chunk).await?;
        Ok(hits.iter().max_by_key(|h| h.rec.version).map(|h| h.rec.value_len))
    }

    /// Whether the log is being replayed (changes are not logged, chunks not freed).
    pub fn is_replaying(&self) -> bool {
        self.replaying.get()
    }

    /// Whether user key `key` exists.
    pub async fn exists(&self, key: &[u8]) -> KvResult<bool> {
        Ok(self.get_entry(key).await?.is_some())
    }

    /// Keys on the ranges this shard owns (loads every such range once).
    pub async fn count_keys(&self) -> KvResult<u64> {
        let mut total = 0;
        for range in 1..self.geo.ranges {
            if !self.shard.owns(range * RANGE_BLOCKS) {
                continue;
            }
            {
                let _token = self.begin_write()?;
                self.ensure_loaded(range).await?;
            }
            if let Some(slot) = self.ranges.borrow().get(&range) {
                if let SlotState::Loaded(a) = &*slot.state.borrow() {
                    total += a.keys;
                }
            }
        }
        Ok(total)
    }

    /// The live keys of buckets `buckets` (bucket indexes within the range) of `range`, which
    /// this shard owns. Each bucket is read under its lock, so a key present for the whole
    /// call is listed once, whatever writes run meanwhile.
    pub async fn live_keys(
        &self,
        range: u64,
        buckets: std::ops::Range<u64>,
    ) -> KvResult<Vec<Vec<u8>>> {
        {
            // After a crash, the range is repaired first (records of unfinished writes go).
            let _token = self.begin_write()?;
            self.ensure_loaded(range).await?;
        }
        let mut out = Vec::new();
        for bucket in buckets {
            let loc = Self::bucket_loc(range, bucket);
            let now = now_ms();
            for (key, expires) in self.bucket_keys(&loc).await? {
                if !expired(expires, now) {
                    out.push(key);
                }
            }
        }
        Ok(out)
    }

    fn bucket_loc(range: u64, bucket: u64) -> Loc {
        Loc {
            range,
            head: range * RANGE_BLOCKS + 1 + bucket,
            bucket_id: range * BUCKETS_PER_RANGE + bucket,
        }
    }

    /// Every user key of a bucket with its newest record's expiry, read under the bucket's
    /// lock (chunk records are not keys).
    async fn bucket_keys(&self, loc: &Loc) -> KvResult<Vec<(Vec<u8>, u64)>> {
        let _lock = self.locks.read(loc.bucket_id).await;
        let sess = self.shard.partition().session().await;
        let mut newest: HashMap<Vec<u8>, (u64, u64)> = HashMap::new();
        self.for_each_user_record(&sess, loc, |rec, data| {
            let key = &data[rec.key.0..rec.key.0 + rec.key.1];
            match newest.get_mut(key) {
                Some(seen) if seen.0 >= rec.version => {}
                Some(seen) => *seen = (rec.version, rec.expires),
                None => {
                    newest.insert(key.to_vec(), (rec.version, rec.expires));
                }
            }
        })
        .await?;
        Ok(newest.into_iter().map(|(k, (_, e))| (k, e)).collect())
    }

    /// Calls `f` on every user record (not chunk records) of `loc`'s chain, with the data of
    /// the block it is in. The caller holds the bucket's lock.
    async fn for_each_user_record(
        &self,
        sess: &Sess,
        loc: &Loc,
        mut f: impl FnMut(&RecordRef, &[u8]),
    ) -> KvResult<()> {
        self.for_each_chain_block(sess, loc, |block, data, rbk, _| {
            for rec in format::records(block, data, rbk)? {
                if !rec.is_chunk() {
                    f(&rec, data);
                }
            }
            Ok(())
        })
        .await
    }

    /// Calls `f` on each block of `loc`'s chain in order (its number, its data, its record
    /// header, and whether it is an all-zero head), following the links: a link ends the chain
    /// where its target does not carry the link's tag; a chain longer than a range is corrupt.
    /// The caller holds the bucket's lock.
    async fn for_each_chain_block(
        &self,
        sess: &Sess,
        loc: &Loc,
        mut f: impl FnMut(u64, &[u8], &format::RecordBlock, bool) -> KvResult<()>,
    ) -> KvResult<()> {
        let (mut block, mut expect_tag, mut blocks) = (loc.head, None, 0u64);
        loop {
            let buf = sess.read(block).await?;
            let next = {
                let data = buf.data();
                let Some((rbk, zero)) = self.check_chain_block(loc, block, &data, expect_tag)?
                else {
                    break;
                };
                f(block, &data, &rbk, zero)?;
                rbk.next
            };
            drop(buf);
            blocks += 1;
            if next.0 == 0 {
                break;
            }
            self.check_link(loc, block, next.0)?;
            if blocks > RANGE_BLOCKS {
                return Err(format::corrupt(loc.head, "bucket chain loops").into());
            }
            block = next.0;
            expect_tag = Some(next.1);
        }
        Ok(())
    }

    /// FLUSHALL on this shard: removes every key of every range it owns, then checkpoints,
    /// so that neither the data file nor a log replay brings a removed key back. Returns the
    /// manifests of the large values removed: the caller frees their chunks
    /// ([`crate::large::free_chunks`]: after the removal is durable, and not under a reader
    /// streaming them). Chunk records are not touched here: those of a large SET still being
    /// written belong to a manifest that is not in place yet.
    pub async fn flush_owned(&self) -> KvResult<Vec<Manifest>> {
        let mut manifests = Vec::new();
        for range in 1..self.geo.ranges {
            if !self.shard.owns(range * RANGE_BLOCKS) {
                continue;
            }
            let _token = self.begin_write()?;
            self.ensure_loaded(range).await?;
            for bucket in 0..BUCKETS_PER_RANGE {
                let loc = Self::bucket_loc(range, bucket);
                let _lock = self.locks.write(loc.bucket_id).await;
                let sess = self.shard.partition().session().await;
                manifests.extend(self.newest_manifests(&sess, &loc).await?);
                let user = |_: &[u8], _: u64, flags: u8| flags & rflags::CHUNK == 0;
                self.remove_where(&sess, &loc, user, true).await?;
            }
            self.with_alloc(range, |a| a.keys = 0);
            self.note_write();
        }
        self.checkpoint().await.map_err(KvError::Engine)?;
        Ok(manifests)
    }

    /// The manifests of the large values in `loc`'s chain: each key's newest record, if it is
    /// a manifest (older records of a key were replaced, and their replacer frees their
    /// chunks). The caller holds the bucket's lock.
    async fn newest_manifests(&self, sess: &Sess, loc: &Loc) -> KvResult<Vec<Manifest>> {
        let mut newest: HashMap<Vec<u8>, (u64, Option<Manifest>)> = HashMap::new();
        self.for_each_user_record(sess, loc, |rec, data| {
            let manifest = match (rec.is_manifest(), &rec.body) {
                (true, Body::Inline(at)) => Manifest::decode(&data[*at..*at + rec.value_len]).ok(),
                _ => None,
            };
            let key = &data[rec.key.0..rec.key.0 + rec.key.1];
            match newest.get_mut(key) {
                Some(seen) if seen.0 >= rec.version => {}
                Some(seen) => *seen = (rec.version, manifest),
                None => {
                    newest.insert(key.to_vec(), (rec.version, manifest));
                }
            }
        })
        .await?;
        Ok(newest.into_values().filter_map(|(_, m)| m).collect())
    }

    /// A checkpoint (SAVE): every dirty block of every shard written back and the device
    /// flushed, then this shard's log start moves past what that covered.
    pub async fn checkpoint(&self) -> Result<(), String> {
        match self.shard.log() {
            Some(log) => log.checkpoint().await.map_err(|e| format!("checkpoint failed: {e}")),
            None => self.barrier().await,
        }
    }

    // -----------------------------------------------------------------------------------------
    // The expiry sweep.

    /// Starts this shard's expiry sweep: every [`SWEEP_PERIOD`], a bounded number of its
    /// buckets is visited in turn and their expired keys deleted (and logged), so keys nobody
    /// touches again go too. Stops when the server stops.
    pub fn start_sweep(self: &Rc<Self>) {
        let kv = Rc::clone(self);
        glommio::spawn_local(async move {
            loop {
                let stop = kv.stop.wait();
                let slept = futures_lite::future::or(
                    async {
                        glommio::timer::sleep(SWEEP_PERIOD).await;
                        true
                    },
                    async {
                        stop.await;
                        false
                    },
                )
                .await;
                if !slept || kv.frozen.get() {
                    break;
                }
                if let Err(e) = kv.sweep_tick().await {
                    if matches!(e, KvError::ShuttingDown) {
                        break;
                    }
                    eprintln!("corebuf-kv: shard {}: expiry sweep: {e}", kv.shard.id());
                }
            }
        })
        .detach();
    }

    /// The next owned bucket id at or after `from` (wrapping), or `None` if none is owned.
    fn next_owned_bucket(&self, from: u64) -> Option<u64> {
        let (first, end) = (BUCKETS_PER_RANGE, self.geo.ranges * BUCKETS_PER_RANGE);
        let mut id = if from < first || from >= end { first } else { from };
        for _ in 0..self.geo.ranges {
            let range = id / BUCKETS_PER_RANGE;
            if self.shard.owns(range * RANGE_BLOCKS) {
                return Some(id);
            }
            id = (range + 1) * BUCKETS_PER_RANGE;
            if id >= end {
                id = first;
            }
        }
        None
    }

    /// One tick of the sweep: visits buckets from the cursor until the budget is spent.
    async fn sweep_tick(&self) -> KvResult<()> {
        if self.sweep_idle.get() {
            return Ok(());
        }
        let (mut budget, mut deleted) = (SWEEP_BUDGET_PER_TICK, 0);
        // Every visit costs at least 1: at most SWEEP_BUDGET_PER_TICK buckets per tick.
        while budget > 0 && deleted < SWEEP_DELETES_PER_TICK {
            let from = self.sweep_cursor.get();
            let Some(id) = self.next_owned_bucket(from) else { break };
            if id < from {
                // A pass ended. Without a key with an expiry in it, rest until one is written.
                if !self.sweep_pass_volatile.replace(false) {
                    self.sweep_idle.set(true);
                    self.sweep_cursor.set(0);
                    return Ok(());
                }
            }
            self.sweep_cursor.set(id + 1);
            let loc = Self::bucket_loc(id / BUCKETS_PER_RANGE, id % BUCKETS_PER_RANGE);
            let cached = self.shard.partition().get(loc.head).is_some();
            budget = budget.saturating_sub(if cached { 1 } else { SWEEP_MISS_COST });
            let c = &self.counters;
            c.sweep_buckets.set(c.sweep_buckets.get() + 1);
            let now = now_ms();
            for (key, expires) in self.bucket_keys(&loc).await? {
                if expires != 0 {
                    self.sweep_pass_volatile.set(true);
                }
                if expired(expires, now) {
                    // Under the write lock: deleted only if still expired then.
                    self.update(&key, |_, _| (Write::Keep, ())).await?;
                    deleted += 1;
                }
            }
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Chains.

    /// Checks a chain block; `None` for an overflow link whose target does not carry the
    /// expected tag (written before its target reached the device, then a crash).
    fn check_chain_block(
        &self,
        loc: &Loc,
        block: u64,
        data: &[u8],
        expect_tag: Option<u64>,
    ) -> KvResult<Option<(format::RecordBlock, bool)>> {
        match expect_tag {
            None => match format::check_block_cached(block, data)? {
                Check::Zero => {
                    Ok(Some((format::RecordBlock { next: (0, 0), count: 0, used: 0 }, true)))
                }
                Check::Valid(h) if h.kind == format::kind::HEAD => {
                    Ok(Some((format::parse_record_block(block, data, loc.bucket_id)?, false)))
                }
                Check::Valid(h) => Err(format::corrupt(
                    block,
                    format!("block of kind {} where a bucket head belongs", h.kind),
                )
                .into()),
            },
            Some(tag) => {
                if data[..4] != format::MAGIC {
                    return Ok(None);
                }
                match format::check_block_cached(block, data)? {
                    Check::Valid(h) if h.kind == format::kind::OVERFLOW && h.tag == tag => {
                        Ok(Some((format::parse_record_block(block, data, loc.bucket_id)?, false)))
                    }
                    _ => Ok(None),
                }
            }
        }
    }

    fn check_link(&self, loc: &Loc, from: u64, next: u64) -> KvResult<()> {
        let base = loc.range * RANGE_BLOCKS;
        if next < base + POOL_START || next >= base + RANGE_BLOCKS {
            return Err(format::corrupt(
                from,
                format!("chain link to block {next}, outside the pool of its range"),
            )
            .into());
        }
        Ok(())
    }

    /// Walks `loc`'s chain: the blocks, and the records of `key` in `space` (values copied if
    /// asked; a manifest always).
    /// A stale link ends the chain (see [`KvShard::check_chain_block`]).
    async fn walk(
        &self,
        sess: &Sess,
        loc: &Loc,
        key: &[u8],
        copy_values: bool,
        space: Space,
    ) -> KvResult<(Vec<ChainBlock>, Vec<Hit>)> {
        let mut chain = Vec::with_capacity(2);
        let mut hits = Vec::new();
        self.for_each_chain_block(sess, loc, |block, data, rbk, zero| {
            for rec in format::records(block, data, rbk)? {
                if Space::of_flags(rec.flags) != space
                    || &data[rec.key.0..rec.key.0 + rec.key.1] != key
                {
                    continue;
                }
                let inline = match rec.body {
                    // A manifest is always copied: a write that replaces it returns it.
                    Body::Inline(at) if copy_values || rec.is_manifest() => {
                        Some(data[at..at + rec.value_len].to_vec())
                    }
                    _ => None,
                };
                hits.push(Hit { chain_index: chain.len(), block, rec, inline });
            }
            chain.push(ChainBlock { block, zero, used: rbk.used });
            Ok(())
        })
        .await?;
        Ok((chain, hits))
    }

    /// Appends `record` to the first chain block with room, or to a new overflow block linked
    /// at the tail (the new block is written with its tag before the link points at it).
    async fn insert(
        &self,
        sess: &Sess,
        loc: &Loc,
        chain: &[ChainBlock],
        record: &[u8],
    ) -> KvResult<()> {
        if let Some(c) = chain.iter().find(|c| c.used + record.len() <= RECORD_AREA) {
            let buf = sess.read(c.block).await?;
            {
                let mut data = buf.data_mut();
                if c.zero {
                    format::init_record_block(
                        &mut data,
                        format::kind::HEAD,
                        c.block,
                        0,
                        loc.bucket_id,
                    );
                }
                format::append_record(&mut data, record);
            }
            buf.mark_dirty();
            return Ok(());
        }
        let offsets = self.alloc(loc.range, 1)?;
        let block = loc.range * RANGE_BLOCKS + offsets[0] as u64;
        let tag = format::mix64(self.id());
        let linked = async {
            let fresh = sess.new_block(block).await?;
            {
                let mut data = fresh.data_mut();
                format::init_record_block(
                    &mut data,
                    format::kind::OVERFLOW,
                    block,
                    tag,
                    loc.bucket_id,
                );
                format::append_record(&mut data, record);
            }
            fresh.mark_dirty();
            drop(fresh);
            let tail = chain.last().expect("a chain has its head");
            let buf = sess.read(tail.block).await?;
            {
                let mut data = buf.data_mut();
                if tail.zero {
                    format::init_record_block(
                        &mut data,
                        format::kind::HEAD,
                        tail.block,
                        0,
                        loc.bucket_id,
                    );
                }
                format::set_next(&mut data, block, tag);
            }
            buf.mark_dirty();
            Ok::<(), KvError>(())
        }
        .await;
        if linked.is_err() {
            self.free_now(loc.range, &offsets);
        }
        linked
    }

    /// Removes every record for which `pred(key, version, flags)` holds from `loc`'s chain. Extents
    /// of removed records and overflow blocks left empty (unlinked if `unlink`) are freed after
    /// the next barrier. Returns the records removed.
    async fn remove_where(
        &self,
        sess: &Sess,
        loc: &Loc,
        pred: impl Fn(&[u8], u64, u8) -> bool,
        unlink: bool,
    ) -> KvResult<usize> {
        let (removed, extents, unlinked) = self.remove_records(sess, loc, pred, unlink).await?;
        for list in extents {
            self.defer(JobKind::Free { range: loc.range, blocks: list });
        }
        if !unlinked.is_empty() {
            self.defer(JobKind::Free { range: loc.range, blocks: unlinked });
        }
        Ok(removed)
    }

    /// [`KvShard::remove_where`] without the frees: returns the removed count, the extent lists
    /// of removed records and the unlinked blocks (offsets within the range).
    async fn remove_records(
        &self,
        sess: &Sess,
        loc: &Loc,
        pred: impl Fn(&[u8], u64, u8) -> bool,
        unlink: bool,
    ) -> KvResult<(usize, Vec<Vec<u16>>, Vec<u16>)> {
        let mut removed = 0;
        let mut extents = Vec::new();
        let mut unlinked = Vec::new();
        let mut prev: Option<u64> = None;
        let mut block = loc.head;
        let mut expect_tag = None;
        let mut steps = 0;
        loop {
            steps += 1;
            if steps > RANGE_BLOCKS + 1 {
                return Err(format::corrupt(loc.head, "bucket chain loops").into());
            }
            let buf = sess.read(block).await?;
            let (next, now_empty) = {
                let mut data = buf.data_mut();
                let Some((rbk, zero)) = self.check_chain_block(loc, block, &data, expect_tag)?
                else {
                    break;
                };
                if zero {
                    break;
                }
                let recs = format::records(block, &data, &rbk)?;
                let mut changed = false;
                let mut left = recs.len();
                // From the back, so earlier offsets stay valid.
                for rec in recs.iter().rev() {
                    if pred(&data[rec.key.0..rec.key.0 + rec.key.1], rec.version, rec.flags) {
                        format::remove_record(&mut data, rec.offset, rec.len);
                        if let Body::Extents(_, list) = &rec.body {
                            extents.push(list.clone());
                        }
                        removed += 1;
                        left -= 1;
                        changed = true;
                    }
                }
                drop(data);
                if changed {
                    buf.mark_dirty();
                }
                (rbk.next, left == 0 && expect_tag.is_some())
            };
            drop(buf);
            if now_empty && unlink {
                // Unlink the empty overflow block: its predecessor points past it.
                let p = prev.expect("an overflow block has a predecessor");
                let pbuf = sess.read(p).await?;
                {
                    let mut data = pbuf.data_mut();
                    format::set_next(&mut data, next.0, next.1);
                }
                pbuf.mark_dirty();
                unlinked.push((block - loc.range * RANGE_BLOCKS) as u16);
            } else {
                prev = Some(block);
            }
            if next.0 == 0 {
                break;
            }
            self.check_link(loc, block, next.0)?;
            block = next.0;
            expect_tag = Some(next.1);
        }
        Ok((removed, extents, unlinked))
    }

    async fn write_extents(
        &self,
        sess: &Sess,
        loc: &Loc,
        tag: u64,
        blocks: &[u16],
        value: &[u8],
    ) -> KvResult<()> {
        let base = loc.range * RANGE_BLOCKS;
        for (i, (part, &offset)) in value.chunks(format::EXTENT_PAYLOAD).zip(blocks).enumerate() {
            let block = base + offset as u64;
            let buf = sess.new_block(block).await?;
            format::encode_extent(&mut buf.data_mut(), block, tag, loc.bucket_id, i as u32, part);
            buf.mark_dirty();
        }
        Ok(())
    }

    /// The value stored in extents, or `None` if they never reached the device.
    async fn read_extents(
        &self,
        sess: &Sess,
        loc: &Loc,
        tag: u64,
        blocks: &[u16],
        len: usize,
    ) -> KvResult<Option<Vec<u8>>> {
        let base = loc.range * RANGE_BLOCKS;
        for &offset in blocks {
            let _ = self.shard.partition().prefetch(base + offset as u64, 1);
        }
        let mut value = Vec::with_capacity(len);
        for (i, &offset) in blocks.iter().enumerate() {
            let block = base + offset as u64;
            let expect = (len - i * format::EXTENT_PAYLOAD).min(format::EXTENT_PAYLOAD);
            let buf = sess.read(block).await?;
            let data = buf.data();
            match format::check_extent(block, &data, tag, loc.bucket_id, i as u32, expect)? {
                ExtentCheck::Part(part) => value.extend_from_slice(part),
                ExtentCheck::Missing => return Ok(None),
            }
        }
        Ok(Some(value))
    }

    // -----------------------------------------------------------------------------------------
    // Ranges and free space.

    fn slot(&self, range: u64) -> Rc<RangeSlot> {
        let mut ranges = self.ranges.borrow_mut();
        Rc::clone(ranges.entry(range).or_insert_with(|| {
            Rc::new(RangeSlot {
                state: RefCell::new(SlotState::Unloaded),
                ready: WaitList::default(),
            })
        }))
    }

    /// Loads `range`'s free space and key count (once per run): from its header if a clean
    /// shutdown wrote it after the last crash, else by walking (and repairing) its chains.
    async fn ensure_loaded(&self, range: u64) -> KvResult<()> {
        if self.loaded.get(range as usize).is_some_and(Cell::get) {
            return Ok(());
        }
        loop {
            let slot = self.slot(range);
            let loading = match &*slot.state.borrow() {
                SlotState::Loaded(_) => return Ok(()),
                SlotState::Loading => true,
                SlotState::Unloaded => false,
            };
            if loading {
                slot.ready
                    .wait_for(|| {
                        (!matches!(*slot.state.borrow(), SlotState::Loading)).then_some(())
                    })
                    .await;
                continue;
            }
            *slot.state.borrow_mut() = SlotState::Loading;
            let loaded = self.load_range(range).await;
            *slot.state.borrow_mut() = match &loaded {
                Ok(alloc) => {
                    if let Some(bit) = self.loaded.get(range as usize) {
                        bit.set(true);
                    }
                    SlotState::Loaded(alloc.clone())
                }
                Err(_) => SlotState::Unloaded,
            };
            slot.ready.notify_all();
            return loaded.map(|_| ());
        }
    }

    async fn load_range(&self, range: u64) -> KvResult<RangeAlloc> {
        let header = range * RANGE_BLOCKS;
        {
            let sess = self.shard.partition().session().await;
            let buf = sess.read(header).await?;
            let data = buf.data();
            match format::check_block_cached(header, &data) {
                Ok(Check::Valid(h)) if h.kind == format::kind::RANGE => {
                    if let Some(rh) = format::RangeHeader::decode(range, &data) {
                        let mut alloc = RangeAlloc { bitmap: rh.bitmap, keys: rh.keys };
                        if rh.stamp >= self.geo.valid_from
                            && (0..POOL_START).all(|b| alloc.is_set(b))
                        {
                            self.counters
                                .ranges_trusted
                                .set(self.counters.ranges_trusted.get() + 1);
                            alloc.bitmap.truncate((RANGE_BLOCKS as usize).div_ceil(64));
                            return Ok(alloc);
                        }
                    }
                }
                Ok(Check::Zero) if self.geo.valid_from == 0 => {
                    self.counters.ranges_fresh.set(self.counters.ranges_fresh.get() + 1);
                    return Ok(RangeAlloc::fresh());
                }
                // Untrusted, or damaged: the header is derived data, rebuild it.
                _ => {}
            }
        }
        self.rebuild_range(range).await
    }

    /// Walks every chain of `range` after an unclean shutdown: truncates stale links, drops
    /// records whose value never reached the device and records shadowed by a newer one, and
    /// computes the free space and key count from what remains.
    async fn rebuild_range(&self, range: u64) -> KvResult<RangeAlloc> {
        let mut alloc = RangeAlloc::fresh();
        for bucket in 0..BUCKETS_PER_RANGE {
            let loc = Loc {
                range,
                head: range * RANGE_BLOCKS + 1 + bucket,
                bucket_id: range * BUCKETS_PER_RANGE + bucket,
            };
            let _lock = self.locks.write(loc.bucket_id).await;
            let sess = self.shard.partition().session().await;
            let keys = self.repair_bucket(&sess, &loc, &mut alloc).await?;
            alloc.keys += keys;
        }
        self.counters.ranges_rebuilt.set(self.counters.ranges_rebuilt.get() + 1);
        Ok(alloc)
    }

    async fn repair_bucket(&self, sess: &Sess, loc: &Loc, alloc: &mut RangeAlloc) -> KvResult<u64> {
        let base = loc.range * RANGE_BLOCKS;
        // 1. The chain, truncated at a stale link; every record in it.
        let mut chain: Vec<u64> = Vec::new();
        let mut records: Vec<(Vec<u8>, RecordRef)> = Vec::new();
        let mut block = loc.head;
        let mut expect_tag = None;
        loop {
            let buf = sess.read(block).await?;
            let checked = {
                let data = buf.data();
                match self.check_chain_block(loc, block, &data, expect_tag)? {
                    None => None,
                    Some((rbk, _)) => {
                        for rec in format::records(block, &data, &rbk)? {
                            let key = space_key(&data[rec.key.0..rec.key.0 + rec.key.1], rec.flags);
                            records.push((key, rec));
                        }
                        Some(rbk.next)
                    }
                }
            };
            drop(buf);
            let Some(next) = checked else {
                // `block` was never written with this tag: cut the link to it.
                let last = *chain.last().expect("the head is always accepted");
                let pbuf = sess.read(last).await?;
                {
                    let mut data = pbuf.data_mut();
                    format::set_next(&mut data, 0, 0);
                }
                pbuf.mark_dirty();
                break;
            };
            chain.push(block);
            if next.0 == 0 {
                break;
            }
            self.check_link(loc, block, next.0)?;
            if chain.len() as u64 > RANGE_BLOCKS {
                return Err(format::corrupt(loc.head, "bucket chain loops").into());
            }
            block = next.0;
            expect_tag = Some(next.1);
        }
        // 2. Which records hold a complete value; per key, the newest complete one stays.
        let mut newest: HashMap<Vec<u8>, u64> = HashMap::new();
        let mut complete: HashMap<(Vec<u8>, u64), bool> = HashMap::new();
        for (key, rec) in &records {
            let ok = match &rec.body {
                Body::Inline(_) => true,
                Body::Extents(tag, list) => {
                    self.read_extents(sess, loc, *tag, list, rec.value_len).await?.is_some()
                }
            };
            complete.insert((key.clone(), rec.version), ok);
            if ok {
                let e = newest.entry(key.clone()).or_insert(rec.version);
                *e = (*e).max(rec.version);
            }
        }
        // Keys are compared with their space (a chunk key and a user key of the same bytes
        // are two keys).
        let keep = |key: &[u8], version: u64| newest.get(key) == Some(&version);
        let drop_count = records.iter().filter(|(k, r)| !keep(k, r.version)).count();
        if drop_count > 0 {
            // Not durable yet, but safe: what is dropped is shadowed or incomplete, and the
            // blocks it used are reused only with new tags.
            let stale = |k: &[u8], v: u64, f: u8| !keep(&space_key(k, f), v);
            let (removed, _, _) = self.remove_records(sess, loc, stale, false).await?;
            self.counters
                .records_repaired
                .set(self.counters.records_repaired.get() + removed as u64);
        }
        // 3. In use: the chain's blocks (empty ones stay linked), and the kept extents.
        for &b in &chain {
            alloc.set(b - base);
        }
        for (key, rec) in &records {
            if keep(key, rec.version) {
                if let Body::Extents(_, list) = &rec.body {
                    for &offset in list {
                        alloc.set(offset as u64);
                    }
                }
            }
        }
        // Chunk records are not keys.
        Ok(newest.keys().filter(|k| k[0] == 0).count() as u64)
    }

    fn with_alloc<T>(&self, range: u64, f: impl FnOnce(&mut RangeAlloc) -> T) -> T {
        let slot = self.slot(range);
        let mut state = slot.state.borrow_mut();
        let SlotState::Loaded(alloc) = &mut *state else {
            panic!("range {range} is used before it is loaded");
        };
        f(alloc)
    }

    /// Takes `n` free pool blocks of `range` (offsets within the range), or none.
    fn alloc(&self, range: u64, n: usize) -> KvResult<Vec<u16>> {
        self.with_alloc(range, |a| {
            let free: Vec<u16> = (POOL_START..RANGE_BLOCKS)
                .filter(|&b| !a.is_set(b))
                .take(n)
                .map(|b| b as u16)
                .collect();
            if free.len() < n {
                return Err(KvError::OutOfSpace(range));
            }
            for &b in &free {
                a.set(b as u64);
            }
            Ok(free)
        })
    }

    fn free_now(&self, range: u64, blocks: &[u16]) {
        self.with_alloc(range, |a| {
            for &b in blocks {
                a.clear(b as u64);
            }
        });
    }

    fn add_keys(&self, range: u64, delta: i64) {
        self.with_alloc(range, |a| a.keys = a.keys.saturating_add_signed(delta));
    }

    // -----------------------------------------------------------------------------------------
    // The write-ahead log.

    /// The log a change is recorded in: none without a log, or while the log is replayed
    /// (replayed changes are not logged again).
    fn change_log(&self) -> Option<&corebuf::ShardLog> {
        self.shard.log().filter(|_| !self.replaying.get())
    }

    /// Appends the record of a change just made in the cache (nothing while replaying).
    async fn log_record(
        &self,
        op: logrec::Op,
        key: &[u8],
        value: &[u8],
        expires: u64,
        kind: u8,
    ) -> KvResult<()> {
        let Some(log) = self.change_log() else { return Ok(()) };
        // Taken out of the cell for the await: another task may log meanwhile.
        let mut buf = std::mem::take(&mut *self.log_buf.borrow_mut());
        logrec::encode(&mut buf, op, key, value, expires, kind);
        let appended = log.append(&buf).await;
        *self.log_buf.borrow_mut() = buf;
        appended.map(|_| ()).map_err(|e| match op {
            // Only a stored record can name chunks that must then be kept.
            logrec::Op::Set => KvError::LogAppend(e.to_string()),
            _ => KvError::Engine(format!("log append: {e}")),
        })
    }

    /// Waits until every record appended on this shard so far is durable (group commit: the
    /// callers waiting together share one write and one flush of the log).
    pub async fn log_commit(&self) -> Result<(), String> {
        let Some(log) = self.shard.log() else { return Ok(()) };
        self.committer.waiters_served.set(self.committer.waiters_served.get() + 1);
        log.commit_all().await.map_err(|e| format!("log commit failed: {e}"))
    }

    /// Applies this shard's log records (what was acknowledged after the last checkpoint).
    /// Runs before the server accepts connections; [`KvShard::checkpoint_replayed`] ends it,
    /// once every shard has applied its records.
    pub async fn replay_log(&self) -> Result<ReplayReport, String> {
        let Some(log) = self.shard.log() else { return Ok(ReplayReport::default()) };
        let Some(replay) = log.take_replay() else { return Ok(ReplayReport::default()) };
        let mut report = ReplayReport {
            records: replay.records.len() as u64,
            bytes: replay.end_lsn - replay.start_lsn,
            scan: replay.scan_time,
            ..ReplayReport::default()
        };
        let started = Instant::now();
        self.replaying.set(true);
        let applied = self.apply_records(&replay.records, &mut report).await;
        self.replaying.set(false);
        applied?;
        report.apply = started.elapsed();
        Ok(report)
    }

    /// The checkpoint that ends the replay: the log starts empty. Until it has run, the log
    /// keeps the records (a start that stops before replays them again).
    pub async fn checkpoint_replayed(&self) -> Result<Duration, String> {
        let started = Instant::now();
        if let Some(log) = self.shard.log() {
            log.checkpoint().await.map_err(|e| format!("checkpoint after replay: {e}"))?;
        }
        Ok(started.elapsed())
    }

    /// Frees the chunks of the large values the log replay dropped as expired, unless the key
    /// names them again (a later record of the log, PERSIST say, kept its manifest). Runs
    /// after every shard has replayed: a chunk replayed after its delete would come back.
    pub async fn free_expired_in_replay(self: &Rc<Self>) -> Result<usize, String> {
        let dropped = std::mem::take(&mut *self.replay_expired.borrow_mut());
        let mut freed = hashbrown::HashSet::new();
        for (key, m) in dropped {
            let live = self.get_entry(&key).await.map_err(|e| e.to_string())?;
            if live.and_then(|e| e.large()).is_some_and(|l| l.tag == m.tag) || !freed.insert(m.tag)
            {
                continue;
            }
            let orphan = crate::large::Orphan { manifest: m, owner: self.shard.id() };
            crate::large::free_chunks(self, orphan).await;
        }
        Ok(freed.len())
    }

    async fn apply_records(
        &self,
        records: &[corebuf::LogRecord],
        report: &mut ReplayReport,
    ) -> Result<(), String> {
        let order = replay_order(records, |key| self.geo.locate(key))?;
        report.applied = order.len() as u64;
        // Records are applied one after the other, so each cache miss would be a device read
        // at queue depth one. Reads of what the next records need start ahead instead: each
        // range's header and bucket heads (a crash makes the first write rebuild the range
        // from its chains) and each record's bucket head.
        let mut last_range = None;
        let mut prefetched = 0;
        let mut when_full = Vec::new();
        for (i, planned) in order.iter().enumerate() {
            for ahead in &order[prefetched..order.len().min(i + REPLAY_PREFETCH_RECORDS)] {
                let loc = ahead.loc;
                // (The order is range by range.)
                if last_range != Some(loc.range) {
                    last_range = Some(loc.range);
                    let _ = self.shard.partition().prefetch(loc.range * RANGE_BLOCKS, POOL_START);
                }
                let _ = self.shard.partition().prefetch(loc.head, 1);
                prefetched += 1;
            }
            let Planned { lsn, rec, loc, .. } = *planned;
            let key = rec.key;
            let owner = self.owner_of_key(key);
            if owner != self.shard.id() {
                return Err(format!(
                    "log record at position {lsn} is for a key of shard {owner}, not {}",
                    self.shard.id()
                ));
            }
            // A value whose expiry has passed since is deleted instead (`set` does that).
            // Chunks and manifests are ordinary records on their owners: a chunk was durable
            // before any manifest naming it was written, and a manifest's removal before its
            // chunks were deleted, so each shard's log replays to a consistent state on its
            // own. Freed chunks have their own DEL records: replay frees nothing else.
            if rec.op == logrec::Op::Set
                && rec.kind & rflags::MANIFEST != 0
                && expired(rec.expires, now_ms())
            {
                // Applied as a DEL below, and no record of the log frees its chunks (it
                // expired while the server was down).
                if let Ok(m) = Manifest::decode(rec.value) {
                    self.replay_expired.borrow_mut().push((key.to_vec(), m));
                }
            }
            let applied = match rec.op {
                logrec::Op::Set => self.replay_set(&rec, &loc).await,
                logrec::Op::Del => {
                    self.del_full(key, Space::of_flags(rec.kind)).await.map(|_| true)
                }
            };
            match applied {
                Ok(true) => {}
                Ok(false) => when_full.push(*planned),
                Err(e) => return Err(format!("replaying the log record at {lsn}: {e}")),
            }
        }
        // Put off past the other records: safe because every key has one record here.
        report.replaced_when_full = when_full.len() as u64;
        self.replay_sets_when_full(&when_full).await
    }

    /// Replays a SET; `Ok(false)` if its key's range had no room. A SET that replaces a
    /// record writes the new one before the old one goes, so it needs a free block for a
    /// moment, and a range the data file holds full (it can be ahead of the log: blocks written
    /// back after the record was appended) has none. Then the key's records are removed
    /// and the SET waits for [`KvShard::replay_sets_when_full`]: not crash-safe on its own,
    /// but the log keeps the record until the checkpoint that ends the replay, so a crash in
    /// between replays it again.
    async fn replay_set(&self, rec: &logrec::Record<'_>, loc: &Loc) -> KvResult<bool> {
        let set = self.set_full_at(loc, rec.key, rec.value, rec.expires, Cond::Always, rec.kind);
        match set.await {
            Err(KvError::OutOfSpace(_)) => {
                // The manifest a removed record may name is not freed: replay frees nothing
                // (the log's own chunk DEL records do).
                self.del_full(rec.key, Space::of_flags(rec.kind)).await?;
                Ok(false)
            }
            other => other.map(|_| true),
        }
    }

    /// Applies the SETs [`KvShard::replay_set`] put off, once the barriers of one settle have
    /// given back what their removals and the replay's other replacements freed. A SET that
    /// still finds no room has none without its key either: the start stops (the log kept).
    async fn replay_sets_when_full(&self, waiting: &[Planned<'_>]) -> Result<(), String> {
        if waiting.is_empty() {
            return Ok(());
        }
        self.settle().await.map_err(|e| e.to_string())?;
        for Planned { lsn, rec, loc, .. } in waiting {
            self.set_full_at(loc, rec.key, rec.value, rec.expires, Cond::Always, rec.kind)
                .await
                .map_err(|e| format!("replaying the log record at {lsn}: {e}"))?;
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Deferred jobs and group commit.

    fn note_write(&self) {
        self.committer.writes.set(self.committer.writes.get() + 1);
    }

    fn defer(&self, kind: JobKind) {
        let after = self.committer.started.get() + 1;
        self.jobs.borrow_mut().push(Job { after, kind });
    }

    fn jobs_pending(&self) -> bool {
        !self.jobs.borrow().is_empty() || !self.due.borrow().is_empty() || self.runner_busy.get()
    }

    /// Runs barriers until the deferred jobs pending now have run: a cleanup frees blocks only
    /// after one more barrier, so this takes up to three rounds.
    async fn settle(&self) -> KvResult<()> {
        for _ in 0..3 {
            self.barrier().await.map_err(KvError::Engine)?;
            self.jobs_idle
                .wait_for(|| {
                    (self.due.borrow().is_empty() && !self.runner_busy.get()).then_some(())
                })
                .await;
            if self.jobs.borrow().is_empty() {
                break;
            }
        }
        Ok(())
    }

    /// Waits until a barrier that started after this call has completed (every caller waiting
    /// at the same time shares that barrier). Errors carry the barrier's error. Used by work
    /// that needs the data file itself durable (deferred cleanups, DEL of a key with an older
    /// record); acknowledgements wait for the log instead ([`KvShard::log_commit`]).
    pub async fn barrier(&self) -> Result<(), String> {
        let c = &self.committer;
        let need = c.started.get() + 1;
        if c.wanted.get() < need {
            c.wanted.set(need);
            c.wake.notify_all();
        }
        c.waiters_served.set(c.waiters_served.get() + 1);
        c.done.wait_for(|| (c.completed.get() >= need).then_some(())).await;
        if c.last_ok.get() >= need {
            Ok(())
        } else {
            Err(c.last_error.borrow().clone())
        }
    }

    /// Runs the barriers waiters ask for; every period, commits the log (`everysec`) and runs
    /// a barrier when deferred jobs wait for one.
    async fn committer_loop(self: Rc<Self>) {
        let c = &self.committer;
        let period = match self.geo.fsync {
            Fsync::Always | Fsync::Everysec => Duration::from_secs(1),
            Fsync::No => Duration::from_secs(5),
        };
        let mut last = Instant::now();
        loop {
            if c.wanted.get() > c.completed.get() {
                self.run_barrier().await;
                continue;
            }
            let now = Instant::now();
            let deadline = last + period;
            if now < deadline {
                let wait = c.wake.wait_for(|| (c.wanted.get() > c.completed.get()).then_some(()));
                futures_lite::future::or(wait, glommio::timer::sleep(deadline - now)).await;
                continue;
            }
            last = now;
            if self.geo.fsync == Fsync::Everysec && c.writes.get() > 0 {
                c.writes.set(0);
                if let Err(e) = self.log_commit().await {
                    eprintln!("corebuf-kv: shard {}: {e}", self.shard.id());
                }
            }
            if !self.jobs.borrow().is_empty() {
                self.run_barrier().await;
            }
        }
    }

    async fn run_barrier(self: &Rc<Self>) {
        let c = &self.committer;
        let n = c.started.get() + 1;
        c.started.set(n);
        let t0 = Instant::now();
        let result = self.shard.flush().await;
        c.latency_sum_us.set(c.latency_sum_us.get() + t0.elapsed().as_micros() as u64);
        c.completed.set(n);
        match result {
            Ok(()) => c.last_ok.set(n),
            Err(e) => {
                eprintln!("corebuf-kv: shard {}: barrier failed: {e}", self.shard.id());
                *c.last_error.borrow_mut() = format!("barrier failed: {e}");
            }
        }
        // Jobs whose change is now durable can run.
        let ready: Vec<JobKind> = {
            let mut jobs = self.jobs.borrow_mut();
            let ok = c.last_ok.get();
            let (ready, waiting): (Vec<Job>, Vec<Job>) =
                jobs.drain(..).partition(|j| j.after <= ok);
            *jobs = waiting;
            ready.into_iter().map(|j| j.kind).collect()
        };
        c.done.notify_all();
        if !ready.is_empty() {
            self.due.borrow_mut().extend(ready);
            if !self.runner_busy.get() {
                self.runner_busy.set(true);
                glommio::spawn_local(Rc::clone(self).job_runner()).detach();
            }
        }
    }

    async fn job_runner(self: Rc<Self>) {
        loop {
            let next = self.due.borrow_mut().pop_front();
            let Some(job) = next else { break };
            if let Err(e) = self.run_job(job).await {
                eprintln!("corebuf-kv: shard {}: deferred cleanup failed: {e}", self.shard.id());
            }
            self.counters.jobs_run.set(self.counters.jobs_run.get() + 1);
        }
        self.runner_busy.set(false);
        self.jobs_idle.notify_all();
    }

    async fn run_job(&self, job: JobKind) -> KvResult<()> {
        match job {
            JobKind::Free { range, blocks } => {
                self.free_now(range, &blocks);
                Ok(())
            }
            JobKind::Cleanup { key, keep, space } => {
                let loc = self.geo.locate(&key);
                let _token = self.begin_write()?;
                self.ensure_loaded(loc.range).await?;
                let _lock = self.locks.write(loc.bucket_id).await;
                let sess = self.shard.partition().session().await;
                let older = |k: &[u8], v: u64, f: u8| {
                    k == key.as_slice() && v < keep && Space::of_flags(f) == space
                };
                self.remove_where(&sess, &loc, older, true).await?;
                Ok(())
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Shutdown.

    /// Runs barriers until no deferred job is left (a few rounds at most: a cleanup can free
    /// blocks, which waits for one more barrier).
    pub async fn drain_jobs(&self) -> Result<(), String> {
        for _ in 0..8 {
            if !self.jobs_pending() {
                return Ok(());
            }
            self.settle().await.map_err(|e| e.to_string())?;
        }
        if self.jobs_pending() {
            return Err("deferred jobs still pending after 8 barriers".into());
        }
        Ok(())
    }

    /// Refuses further writes, waits for those in flight, and writes every loaded range's
    /// header (free-space bitmap and key count) stamped with this run's epoch.
    pub async fn write_range_headers(&self) -> Result<u64, String> {
        self.frozen.set(true);
        self.writers_idle.wait_for(|| (self.writers_active.get() == 0).then_some(())).await;
        let loaded: Vec<(u64, RangeAlloc)> = self
            .ranges
            .borrow()
            .iter()
            .filter_map(|(&r, slot)| match &*slot.state.borrow() {
                SlotState::Loaded(a) => Some((r, a.clone())),
                _ => None,
            })
            .collect();
        let sess = self.shard.partition().session().await;
        for (range, alloc) in &loaded {
            let block = range * RANGE_BLOCKS;
            let header = format::RangeHeader {
                range: *range,
                stamp: self.geo.epoch,
                keys: alloc.keys,
                bitmap: alloc.bitmap.clone(),
            };
            let buf = sess.new_block(block).await.map_err(|e| e.to_string())?;
            header.encode_into(block, &mut buf.data_mut());
            buf.mark_dirty();
        }
        Ok(loaded.len() as u64)
    }

    /// Sets the stopping flag and wakes every connection and the accept loop.
    pub fn begin_stop(&self) {
        self.stop.set();
    }

    /// Waits until this shard's connections have closed, at most `limit`.
    pub async fn wait_connections(&self, limit: Duration) -> usize {
        let closed =
            self.conns_closed.wait_for(|| (self.counters.connections.get() == 0).then_some(()));
        futures_lite::future::or(closed, glommio::timer::sleep(limit)).await;
        self.counters.connections.get()
    }

    /// This shard's statistics for INFO.
    pub fn info(&self) -> InfoPart {
        let s = self.shard.stats();
        let c = &self.counters;
        let (mut loaded, mut free) = (0, 0);
        for slot in self.ranges.borrow().values() {
            if let SlotState::Loaded(a) = &*slot.state.borrow() {
                loaded += 1;
                free += a.free_blocks();
            }
        }
        let _ = loaded;
        let barriers = self.committer.started.get();
        let log = self.shard.log().map(|l| l.stats()).unwrap_or_default();
        InfoPart {
            shard: self.shard.id(),
            cache_hits: s.cache.hits,
            cache_misses: s.cache.misses,
            zero_fills: s.cache.zero_fills,
            evictions: s.cache.evictions,
            writebacks: s.cache.writebacks,
            frames: s.cache.frames,
            dirty: s.cache.dirty,
            device_reads: s.queue.reads_completed,
            device_writes: s.queue.writes_completed + s.queue.writebacks_completed,
            device_flushes: s.queue.flushes_completed,
            bytes_read: s.queue.bytes_read,
            bytes_written: s.queue.bytes_written,
            messages_sent: s.messages_sent,
            messages_received: s.messages_received,
            barriers,
            barrier_mean_us: self.committer.latency_sum_us.get() / barriers.max(1),
            commit_waiters: self.committer.waiters_served.get(),
            read_p99_us: s.queue.read_latency_us.value_at_quantile(0.99),
            commands: c.commands.get(),
            connections: c.connections.get() as u64,
            connections_total: c.connections_total.get(),
            rejected: c.rejected.get(),
            ops: c.ops.get(),
            remote_batches: c.remote_batches.get(),
            hits: c.hits.get(),
            misses: c.misses.get(),
            ranges_loaded: (c.ranges_trusted.get(), c.ranges_fresh.get(), c.ranges_rebuilt.get()),
            free_blocks_loaded: free,
            records_repaired: c.records_repaired.get(),
            jobs: ((self.jobs.borrow().len() + self.due.borrow().len()) as u64, c.jobs_run.get()),
            out_of_space: c.out_of_space.get(),
            protocol_errors: c.protocol_errors.get(),
            expired_keys: c.expired_keys.get(),
            chunks: (c.chunks_written.get(), c.chunks_read.get(), c.chunks_deleted.get()),
            large_pins: self.pins.len() as u64,
            sweep_buckets: c.sweep_buckets.get(),
            log_appends: log.log.appends,
            log_commits: log.log.commits,
            log_checkpoints: log.checkpoints,
            log_used_bytes: log.used_bytes,
            log_commit_us: (log.log.commit_us_total, log.log.flush_us_total),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(lsn: u64, op: logrec::Op, key: &[u8], value: &[u8], kind: u8) -> corebuf::LogRecord {
        let mut payload = Vec::new();
        logrec::encode(&mut payload, op, key, value, 0, kind);
        corebuf::LogRecord { lsn, payload }
    }

    #[test]
    fn replay_applies_each_keys_last_record_deletions_first() {
        use logrec::Op::{Del, Set};
        let records = [
            record(0, Set, b"a", b"1", 0),
            record(10, Set, b"b", b"1", 0),
            record(20, Del, b"a", b"", 0),
            // A chunk key is another key than the user key of the same bytes.
            record(30, Set, b"b", b"c", rflags::CHUNK),
            record(40, Set, b"c", b"1", 0),
            record(50, Set, b"b", b"2", 0),
            record(60, Del, b"c", b"", 0),
            record(70, Set, b"a", b"3", 0),
            record(80, Del, b"d", b"", 0),
        ];
        // The indices of the records replay applies, `place` giving each key's head block.
        let order = |records: &[corebuf::LogRecord], place: &dyn Fn(&[u8]) -> u64| {
            let locate = |key: &[u8]| Loc {
                range: place(key) / RANGE_BLOCKS,
                head: place(key),
                bucket_id: 0,
            };
            replay_order(records, locate).map(|o| o.iter().map(|p| p.index).collect::<Vec<_>>())
        };
        // DELs of c and d; then the SETs of the chunk key b, of b and of a: in log order when
        // every key has one place, else in the order of the places.
        assert_eq!(order(&records, &|_| 0).unwrap(), vec![6, 8, 3, 5, 7]);
        let place = |key: &[u8]| u64::from(b'z' - key[0]);
        assert_eq!(order(&records, &place).unwrap(), vec![8, 6, 3, 5, 7]);
        // Range by range: a and c in the first range, b and d in the next.
        let place =
            |key: &[u8]| RANGE_BLOCKS * u64::from(key[0].is_multiple_of(2)) + u64::from(key[0]);
        assert_eq!(order(&records, &place).unwrap(), vec![6, 7, 8, 3, 5]);
        assert_eq!(order(&[], &|_| 0).unwrap(), Vec::<usize>::new());
        let mut bad = records[..2].to_vec();
        bad[1].payload.truncate(3);
        let err = order(&bad, &|_| 0).unwrap_err();
        assert!(err.contains("position 10"), "{err}");
    }
}
