//! Deterministic simulation of several shards over one simulated device, with faults and
//! crashes: the durability barrier never loses data, nothing comes back torn or unknown, and
//! every error an operation returns is accounted for by an injected fault.
//!
//! Each seed builds 2–4 `Partition`s, each with its own `IoQueue`, over clones of ONE
//! `SimDevice` (wrapped in a device that keeps a ledger of the faults it injected), routes blocks
//! with `corebuf::Router`, and runs 3–12 worker tasks in one glommio executor doing random
//! reads, whole-block writes, read-modify-writes of a sector range, `get`s, long data borrows,
//! multi-pin sessions, over-pinning (which must fail with `PinLimit`), cross-shard prefetch,
//! `forget_range`, `write_dirty_async`, shard-local `write_dirty`, and global barriers (the
//! engine's protocol: `write_back_dirty` on every partition concurrently, then one
//! `issue_flush` through one partition; ok only if all are ok). A worker reaching a block owned
//! by another shard does it in a task of its own on the owner's partition (the message hop).
//! Two to six times per seed the device crashes mid-run (`SimDevice::crash`): the old
//! generation is drained and checked, and new queues and partitions start over
//! `SimDevice::from_image` of what survived. Every decision — parameters, operations, device
//! latency (in executor yields), read / write / flush faults, crash points and which unflushed
//! writes survive — comes from the seed.
//!
//! Every 512-byte sector carries its block, its index, a version and a checksum. The model
//! knows, per sector, the current version, every version written since the durable floor, and
//! the floor (the version the last *successful* barrier covered). It checks:
//! 1. every read, `get` and long borrow sees exactly the latest version of every sector (no
//!    lost or stale write, even after failed writes, eviction and prefetch);
//! 2. after each crash, every sector holds a version in `[floor ..= latest]` that was actually
//!    written to it — never torn (checksum), misplaced or unknown;
//! 3. faults are accounted for: at the moment a partition's `write_back_dirty` returns, it
//!    fails if and only if a block it owns has a failed last write that was not forgotten (and
//!    names such a block); the partitions' `write_errors` / `read_errors` equal the write / read
//!    faults the device injected; every injected flush fault is seen by exactly one barrier
//!    (or is hidden behind a write error by a shard-local `write_dirty`, which the bound allows);
//!    a read fails only with an injected read error of its own block; a read or `new_block`
//!    that fails with a write error names a block whose write failed on that partition (the
//!    cache is full of data it could not write);
//! 4. progress: a simulated executor where no operation completes for a long stretch is a
//!    deadlock and fails the seed; a seed that takes too long in wall time fails too;
//! 5. after the last generation, with faults healed, one barrier succeeds and the durable image
//!    equals the model exactly.
//!
//! Replay: `SEED=<n> cargo test -p corebuf-tests --test sim_shards` runs exactly seed `n` (and
//! prints its parameters with `-- --nocapture`); `SIM_SEEDS=<n>` runs `n` seeds (default [`DEFAULT_SEEDS`]), starting
//! at `SIM_SEED_BASE` (default 0). A failing seed is printed with the command that replays it.

use std::cell::{Cell, RefCell, RefMut};
use std::collections::BTreeSet;
use std::ops::Range;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use corebuf::Router;
use corebuf_shard::cache::{CacheConfig, Hooks, Partition};
use corebuf_shard::io::{Device, IoQueue, QueueConfig, SimBuf, SimDevice, SimOptions};
use corebuf_shard::rng::SimRng;
use corebuf_shard::{Error, IoOp, Result};
use corebuf_tests::{check_sector, stamp_sector, STAMP_SECTOR_BYTES};
use futures_lite::future::yield_now;

/// Seeds run by default: about a minute in a debug build on the 2-core reference machine.
const DEFAULT_SEEDS: u64 = 600;
/// A seed that runs longer than this in wall time fails (a hang the yield watchdog missed).
const SEED_TIMEOUT: Duration = Duration::from_secs(120);
/// Controller yields without any operation completing before the run is declared stuck.
const STALL_YIELDS_MAX: u64 = 200_000;

const BS: usize = 4096;
const SECTORS: usize = BS / STAMP_SECTOR_BYTES;

type Part = Partition<LedgerDevice>;

// ---------------------------------------------------------------------------------------------
// The device wrapper that keeps the ledger of injected faults.

/// What the device did that the checker needs: faults by kind, and the blocks whose last
/// write failed (the cache must keep reporting those until rewritten or forgotten).
#[derive(Debug, Default)]
struct Ledger {
    read_faults: u64,
    write_faults: u64,
    flush_faults: u64,
    failed: BTreeSet<u64>,
}

/// A `SimDevice` that records every fault it returns in a [`Ledger`].
#[derive(Clone, Debug)]
struct LedgerDevice {
    sim: SimDevice,
    ledger: Rc<RefCell<Ledger>>,
}

fn expect_injected(error: &Error, op: IoOp) {
    let injected = matches!(error, Error::Io { op: o, source, .. }
        if *o == op && source.to_string().contains("injected"));
    assert!(injected, "the device returned an error it did not inject: {error:?}");
}

impl Device for LedgerDevice {
    type Buf = SimBuf;

    fn path(&self) -> &Path {
        self.sim.path()
    }

    fn size_bytes(&self) -> u64 {
        self.sim.size_bytes()
    }

    fn alignment_bytes(&self) -> u64 {
        self.sim.alignment_bytes()
    }

    fn alloc_buf(&self, len: usize) -> SimBuf {
        self.sim.alloc_buf(len)
    }

    async fn read_at(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        let result = self.sim.read_at(offset, dst).await;
        if let Err(e) = &result {
            expect_injected(e, IoOp::Read);
            self.ledger.borrow_mut().read_faults += 1;
        }
        result
    }

    async fn write_at(&self, offset: u64, buf: &SimBuf) -> Result<()> {
        let result = self.sim.write_at(offset, buf).await;
        let block = offset / BS as u64;
        let mut ledger = self.ledger.borrow_mut();
        match &result {
            Ok(()) => {
                ledger.failed.remove(&block);
            }
            Err(e) => {
                expect_injected(e, IoOp::Write);
                ledger.write_faults += 1;
                ledger.failed.insert(block);
            }
        }
        result
    }

    async fn flush(&self) -> Result<()> {
        let result = self.sim.flush().await;
        if let Err(e) = &result {
            expect_injected(e, IoOp::Flush);
            self.ledger.borrow_mut().flush_faults += 1;
        }
        result
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.sim.discard(offset, len).await
    }
}

// ---------------------------------------------------------------------------------------------
// Parameters.

#[derive(Clone, Debug)]
struct Params {
    shards: usize,
    range_blocks: u64,
    device_blocks: u64,
    frames: u64,
    pins: usize,
    writebacks_max: usize,
    io_depth_max: usize,
    latency_yields_max: u32,
    workers: usize,
    generations: u32,
    ops_per_generation: u64,
}

impl Params {
    fn from_seed(seed: u64) -> Params {
        let mut rng = SimRng::new(seed ^ 0x5EED_5EED);
        let pins = 1 + rng.below(4) as usize;
        Params {
            shards: 2 + rng.below(3) as usize,
            range_blocks: [1, 4, 16][rng.below(3) as usize],
            device_blocks: 128 + rng.below(257),
            frames: (2 * pins as u64).max(8 + rng.below(33)),
            pins,
            writebacks_max: 1 + rng.below(8) as usize,
            io_depth_max: 1 + rng.below(16) as usize,
            latency_yields_max: rng.below(7) as u32,
            workers: 3 + rng.below(10) as usize,
            generations: 2 + rng.below(5) as u32,
            ops_per_generation: 300 + rng.below(2201),
        }
    }
}

/// Fault probabilities (read, write, flush) for one generation.
fn fault_profile(rng: &mut SimRng) -> (f64, f64, f64) {
    match rng.below(6) {
        0 => (0.0, 0.0, 0.0),
        1 => (0.05, 0.0, 0.0),
        2 => (0.0, 0.05, 0.0),
        3 => (0.0, 0.0, 0.2),
        4 => (0.02, 0.02, 0.05),
        _ => (0.1, 0.1, 0.1),
    }
}

// ---------------------------------------------------------------------------------------------
// The model.

#[derive(Clone, Debug)]
struct BlockModel {
    /// The version every sector holds in the cache / on the live device now.
    current: [u64; SECTORS],
    /// False after a failed write was forgotten: the live device may hold any version in the
    /// history; the next read tells which.
    exact: bool,
    /// Bumped by every forget of failed data, so a barrier that started before it does not
    /// claim the given-up versions.
    relax_epoch: u64,
    /// The version the last successful barrier made durable, per sector.
    floor: [u64; SECTORS],
    /// Every version written to the sector that is not older than its floor, ascending.
    history: [Vec<u64>; SECTORS],
    next_version: u64,
}

impl BlockModel {
    fn new() -> Self {
        BlockModel {
            current: [0; SECTORS],
            exact: true,
            relax_epoch: 0,
            floor: [0; SECTORS],
            history: std::array::from_fn(|_| vec![0]),
            next_version: 1,
        }
    }

    fn allowed(&self, sector: usize, version: u64) -> bool {
        version >= self.floor[sector] && self.history[sector].binary_search(&version).is_ok()
    }
}

/// What a barrier started with: for each block the model knew exactly, its versions and relax
/// epoch.
type Snapshot = Vec<Option<([u64; SECTORS], u64)>>;

#[derive(Debug)]
struct Model {
    blocks: Vec<BlockModel>,
}

impl Model {
    fn new(device_blocks: u64) -> Self {
        Model { blocks: (0..device_blocks).map(|_| BlockModel::new()).collect() }
    }

    /// Checks a block's bytes as the cache shows them now against the model.
    fn check_live(&mut self, block: u64, data: &[u8]) -> std::result::Result<(), String> {
        let m = &mut self.blocks[block as usize];
        let mut seen = [0u64; SECTORS];
        for (s, sector) in data.chunks_exact(STAMP_SECTOR_BYTES).enumerate() {
            let version = check_sector(sector, block, s as u64)?;
            if m.exact && version != m.current[s] {
                return Err(format!(
                    "block {block} sector {s} reads version {version}, but the latest written \
                     is {} (stale or lost write)",
                    m.current[s]
                ));
            }
            if !m.exact && !m.allowed(s, version) {
                return Err(format!(
                    "block {block} sector {s} reads version {version}, never written since floor \
                     {} (history {:?})",
                    m.floor[s], m.history[s]
                ));
            }
            seen[s] = version;
        }
        if !m.exact {
            m.current = seen;
            m.exact = true;
        }
        Ok(())
    }

    /// Records a write of `sectors` of `block` and returns its version. A partial write needs
    /// the block known exactly (the caller read it first).
    fn write(&mut self, block: u64, sectors: Range<usize>) -> u64 {
        let m = &mut self.blocks[block as usize];
        assert!(m.exact || sectors == (0..SECTORS), "a partial write follows a read");
        let version = m.next_version;
        m.next_version += 1;
        for s in sectors {
            m.current[s] = version;
            m.history[s].push(version);
        }
        m.exact = true;
        version
    }

    /// The block's failed data was forgotten: the device's older version is what reads see.
    fn relax(&mut self, block: u64) {
        let m = &mut self.blocks[block as usize];
        m.exact = false;
        m.relax_epoch += 1;
    }

    fn snapshot(&self, include: impl Fn(u64) -> bool) -> Snapshot {
        let exact = |(b, m): (usize, &BlockModel)| {
            (m.exact && include(b as u64)).then_some((m.current, m.relax_epoch))
        };
        self.blocks.iter().enumerate().map(exact).collect()
    }

    /// A barrier that started at `snapshot` succeeded: what it covered is durable.
    fn advance_floor(&mut self, snapshot: &Snapshot) {
        for (m, snap) in self.blocks.iter_mut().zip(snapshot) {
            let Some((versions, epoch)) = snap else { continue };
            if *epoch != m.relax_epoch {
                continue;
            }
            for ((&version, floor), history) in
                versions.iter().zip(&mut m.floor).zip(&mut m.history)
            {
                if version > *floor {
                    *floor = version;
                    history.retain(|&v| v >= version);
                }
            }
        }
    }

    /// Checks the image a crash left against the floors and histories, then makes it the new
    /// baseline.
    fn recover(&mut self, image: &[u8]) -> std::result::Result<(), String> {
        for (b, m) in self.blocks.iter_mut().enumerate() {
            let data = &image[b * BS..(b + 1) * BS];
            for (s, sector) in data.chunks_exact(STAMP_SECTOR_BYTES).enumerate() {
                let version = check_sector(sector, b as u64, s as u64)?;
                if !m.allowed(s, version) {
                    return Err(format!(
                        "after the crash block {b} sector {s} holds version {version}, but the \
                         durable floor is {} and the versions written since are {:?}",
                        m.floor[s], m.history[s]
                    ));
                }
                m.current[s] = version;
                m.floor[s] = version;
                m.history[s] = vec![version];
            }
            m.exact = true;
        }
        Ok(())
    }

    /// Checks that `image` holds exactly the current version of every exactly known block.
    fn check_equal(&self, image: &[u8]) -> std::result::Result<(), String> {
        for (b, m) in self.blocks.iter().enumerate() {
            let data = &image[b * BS..(b + 1) * BS];
            for (s, sector) in data.chunks_exact(STAMP_SECTOR_BYTES).enumerate() {
                let version = check_sector(sector, b as u64, s as u64)?;
                let good = if m.exact { version == m.current[s] } else { m.allowed(s, version) };
                if !good {
                    return Err(format!(
                        "after the final barrier block {b} sector {s} is durable at version \
                         {version}, the latest written is {}",
                        m.current[s]
                    ));
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// One generation (between two crashes) and the whole run.

#[derive(Debug, Default)]
struct GenTally {
    read_errors_seen: u64,
    flush_errors_seen: u64,
    /// Shard-local `write_dirty` calls that returned a write error (a flush fault in the same
    /// call would be hidden behind it).
    flush_maybe_masked: u64,
}

struct Gen {
    number: u32,
    device: SimDevice,
    ledger: Rc<RefCell<Ledger>>,
    parts: Vec<Part>,
    /// Workers stop taking new operations.
    stop: Cell<bool>,
    /// The model describes this generation (false from the crash on).
    alive: Cell<bool>,
    workers_running: Cell<usize>,
    tally: RefCell<GenTally>,
}

#[derive(Debug, Default, Clone)]
struct Totals {
    ops: u64,
    cross_ops: u64,
    crashes: u64,
    barriers_ok: u64,
    barriers_failed: u64,
    read_faults: u64,
    write_faults: u64,
    flush_faults: u64,
    read_errors_seen: u64,
    cache_full_of_failed: u64,
    pin_limits: u64,
    busy_skips: u64,
    forgotten_failed: u64,
    prefetch_started: u64,
}

impl Totals {
    fn add(&mut self, o: &Totals) {
        self.ops += o.ops;
        self.cross_ops += o.cross_ops;
        self.crashes += o.crashes;
        self.barriers_ok += o.barriers_ok;
        self.barriers_failed += o.barriers_failed;
        self.read_faults += o.read_faults;
        self.write_faults += o.write_faults;
        self.flush_faults += o.flush_faults;
        self.read_errors_seen += o.read_errors_seen;
        self.cache_full_of_failed += o.cache_full_of_failed;
        self.pin_limits += o.pin_limits;
        self.busy_skips += o.busy_skips;
        self.forgotten_failed += o.forgotten_failed;
        self.prefetch_started += o.prefetch_started;
    }
}

struct World {
    seed: u64,
    params: Params,
    router: Router,
    owned: Vec<Vec<u64>>,
    model: RefCell<Model>,
    totals: RefCell<Totals>,
    generation: Cell<u32>,
    ops_done: Cell<u64>,
    digest: Cell<u64>,
    /// What each worker is doing now (operation, block), for the stall report.
    doing: RefCell<Vec<(Op, u64)>>,
}

impl World {
    fn owner(&self, block: u64) -> usize {
        self.router.shard_of(block)
    }

    /// The model, if `gen` is the generation it describes.
    fn model(&self, gen: &Gen) -> Option<RefMut<'_, Model>> {
        gen.alive.get().then(|| self.model.borrow_mut())
    }

    fn fail(&self, what: impl std::fmt::Display) -> ! {
        panic!(
            "seed {} generation {}: {what}\n  params: {:?}",
            self.seed,
            self.generation.get(),
            self.params
        )
    }

    fn record(&self, op: u64, block: u64, outcome: u64) {
        let d = self.digest.get().rotate_left(7) ^ op ^ block.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.digest.set(d.wrapping_mul(0x100_0000_01B3) ^ outcome);
    }

    fn totals(&self) -> RefMut<'_, Totals> {
        self.totals.borrow_mut()
    }

    /// Accounts for an error returned by a read (`reading`) or `new_block` on partition `p`.
    fn account(&self, gen: &Gen, p: usize, block: u64, reading: bool, error: &Error) {
        match error {
            Error::Io { op: IoOp::Read, block: failed, .. } if reading => {
                expect_injected(error, IoOp::Read);
                if *failed != Some(block) {
                    self.fail(format!("a read of block {block} failed with {error:?}"));
                }
                gen.tally.borrow_mut().read_errors_seen += 1;
            }
            Error::Io { op: IoOp::Write, block: Some(failed), .. } => {
                // Every evictable frame of `p` holds data whose write failed: the cache says so
                // instead of waiting forever.
                let known = gen.ledger.borrow().failed.contains(failed);
                if !known || self.owner(*failed) != p {
                    self.fail(format!(
                        "an operation on block {block} (shard {p}) failed with a write error \
                         of block {failed}, which has no failed write on that shard: {error:?}"
                    ));
                }
                self.totals().cache_full_of_failed += 1;
            }
            _ => self.fail(format!("an operation on block {block} failed with {error:?}")),
        }
    }

    /// Checks a partition's `write_back_dirty` result at the moment it returns against the
    /// ledger: an error if and only if a block it owns has an unresolved failed write.
    fn check_write_back(&self, gen: &Gen, p: usize, result: &Result<()>) {
        let ledger = gen.ledger.borrow();
        let unresolved: Vec<u64> =
            ledger.failed.iter().copied().filter(|&b| self.owner(b) == p).collect();
        match result {
            Ok(()) if unresolved.is_empty() => {}
            Ok(()) => self.fail(format!(
                "shard {p}'s write_back_dirty returned Ok while blocks {unresolved:?} have failed \
                 writes (an error was lost)"
            )),
            Err(Error::Io { op: IoOp::Write, block: Some(b), .. }) if unresolved.contains(b) => {}
            Err(e) => self.fail(format!(
                "shard {p}'s write_back_dirty returned {e:?}, but the unresolved failed writes \
                 of its blocks are {unresolved:?}"
            )),
        }
    }
}

fn check_or_fail(world: &World, gen: &Gen, block: u64, data: &[u8]) {
    if let Some(mut model) = world.model(gen) {
        if let Err(e) = model.check_live(block, data) {
            world.fail(e);
        }
    }
}

fn pick_block(world: &World, rng: &mut SimRng) -> u64 {
    let blocks = world.params.device_blocks;
    if rng.chance(0.6) {
        rng.below(blocks / 8)
    } else {
        rng.below(blocks)
    }
}

/// A shard that owns at least one block (with few ranges, a shard may own none).
fn pick_shard(world: &World, rng: &mut SimRng) -> usize {
    let candidates: Vec<usize> =
        (0..world.params.shards).filter(|&p| !world.owned[p].is_empty()).collect();
    candidates[rng.below(candidates.len() as u64) as usize]
}

fn pick_owned(world: &World, p: usize, rng: &mut SimRng) -> u64 {
    let owned = &world.owned[p];
    owned[rng.below(owned.len() as u64) as usize]
}

// ---------------------------------------------------------------------------------------------
// Operations on one block, run on its owner's partition.

#[derive(Clone, Copy, Debug)]
enum BlockOp {
    Read,
    Write,
    Rmw,
    Get,
    Peek,
}

async fn block_op(world: Rc<World>, gen: Rc<Gen>, op: BlockOp, block: u64, seed: u64) -> u64 {
    let mut rng = SimRng::new(seed);
    let p = world.owner(block);
    let session = gen.parts[p].session().await;
    match op {
        BlockOp::Read => match session.read(block).await {
            Ok(buf) => {
                check_or_fail(&world, &gen, block, &buf.data());
                1
            }
            Err(e) => {
                world.account(&gen, p, block, true, &e);
                2
            }
        },
        BlockOp::Get => match session.get(block) {
            Some(buf) => {
                check_or_fail(&world, &gen, block, &buf.data());
                1
            }
            None => 0,
        },
        BlockOp::Peek => match session.read(block).await {
            Ok(buf) => {
                // Hold a borrow of the bytes across yields: writers see BufferBusy, write-back
                // snapshots wait, and the bytes stay what the model says.
                let data = buf.data();
                check_or_fail(&world, &gen, block, &data);
                for _ in 0..rng.below(6) {
                    yield_now().await;
                }
                check_or_fail(&world, &gen, block, &data);
                1
            }
            Err(e) => {
                world.account(&gen, p, block, true, &e);
                2
            }
        },
        BlockOp::Write => match session.new_block(block).await {
            Ok(buf) => {
                let Some(mut model) = world.model(&gen) else { return 0 };
                let Ok(mut data) = buf.try_data_mut() else {
                    world.totals().busy_skips += 1;
                    return 3;
                };
                let version = model.write(block, 0..SECTORS);
                drop(model);
                for (s, sector) in data.chunks_exact_mut(STAMP_SECTOR_BYTES).enumerate() {
                    stamp_sector(sector, block, s as u64, version);
                }
                drop(data);
                buf.mark_dirty();
                1
            }
            Err(e) => {
                world.account(&gen, p, block, false, &e);
                2
            }
        },
        BlockOp::Rmw => match session.read(block).await {
            Ok(buf) => {
                check_or_fail(&world, &gen, block, &buf.data());
                let first = rng.below(SECTORS as u64) as usize;
                let end = first + 1 + rng.below((SECTORS - first) as u64) as usize;
                if rmw(&world, &gen, &buf, first..end) {
                    1
                } else {
                    3
                }
            }
            Err(e) => {
                world.account(&gen, p, block, true, &e);
                2
            }
        },
    }
}

/// Rewrites `sectors` of a pinned, checked buffer with a new version and marks that byte range
/// dirty. False if the bytes were borrowed elsewhere (or the generation is over).
fn rmw(
    world: &World,
    gen: &Gen,
    buf: &corebuf_shard::cache::BufRef<'_, LedgerDevice>,
    sectors: Range<usize>,
) -> bool {
    let block = buf.block();
    let Some(mut model) = world.model(gen) else { return false };
    let Ok(mut data) = buf.try_data_mut() else {
        world.totals().busy_skips += 1;
        return false;
    };
    let version = model.write(block, sectors.clone());
    drop(model);
    for s in sectors.clone() {
        let sector = &mut data[s * STAMP_SECTOR_BYTES..(s + 1) * STAMP_SECTOR_BYTES];
        stamp_sector(sector, block, s as u64, version);
    }
    drop(data);
    buf.mark_dirty_range(sectors.start * STAMP_SECTOR_BYTES..sectors.end * STAMP_SECTOR_BYTES);
    true
}

// ---------------------------------------------------------------------------------------------
// Operations on partitions.

/// Pins up to `pins` blocks of one partition in one session, holds them across yields, and
/// rewrites part of one. With `over`, asks for one more and expects `PinLimit`.
async fn multi_pin(world: &World, gen: &Gen, over: bool, rng: &mut SimRng) -> u64 {
    let p = pick_shard(world, rng);
    let pins = world.params.pins;
    let count = if over { pins } else { 1 + rng.below(pins as u64) as usize };
    let session = gen.parts[p].session().await;
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        let block = pick_owned(world, p, rng);
        match session.read(block).await {
            Ok(buf) => {
                check_or_fail(world, gen, block, &buf.data());
                held.push(buf);
            }
            Err(e) => {
                world.account(gen, p, block, true, &e);
                return 2;
            }
        }
    }
    if over {
        let block = pick_owned(world, p, rng);
        match session.read(block).await {
            Err(Error::PinLimit { limit, .. }) if limit == pins => world.totals().pin_limits += 1,
            other => world.fail(format!(
                "reading a block with {pins} pins held in the session gave {:?}, not PinLimit",
                other.map(|b| b.block())
            )),
        }
    }
    for _ in 0..rng.below(4) {
        yield_now().await;
    }
    let at = rng.below(held.len() as u64) as usize;
    // The model may have moved on while we yielded (another task wrote the block): check again.
    check_or_fail(world, gen, held[at].block(), &held[at].data());
    let first = rng.below(SECTORS as u64) as usize;
    rmw(world, gen, &held[at], first..first + 1);
    1
}

/// Starts reads of a span that may cross shards, each part on its owner.
fn prefetch(world: &World, gen: &Gen, rng: &mut SimRng) -> u64 {
    let blocks = world.params.device_blocks;
    let first = rng.below(blocks);
    let count = (1 + rng.below(3 * world.params.range_blocks)).min(blocks - first);
    let mut started = 0;
    for (owner, part_first, part_count) in world.router.split(first, count) {
        match gen.parts[owner].prefetch(part_first, part_count) {
            Ok(n) => started += n,
            Err(e) => world.fail(format!("prefetch({part_first}, {part_count}) failed: {e:?}")),
        }
    }
    world.totals().prefetch_started += started;
    started
}

/// The engine's global barrier: `write_back_dirty` on every partition at once, then one device
/// flush through one partition; ok only if every part is.
async fn barrier(world: &Rc<World>, gen: &Rc<Gen>, rng: &mut SimRng) -> u64 {
    let snapshot = match world.model(gen) {
        Some(model) => model.snapshot(|_| true),
        None => return 0,
    };
    let writes: Vec<_> = (0..world.params.shards)
        .map(|p| {
            let (world, gen) = (Rc::clone(world), Rc::clone(gen));
            glommio::spawn_local(async move {
                let result = gen.parts[p].write_back_dirty().await;
                world.check_write_back(&gen, p, &result);
                result
            })
        })
        .collect();
    let mut first_error = None;
    for write in writes {
        if let Err(e) = write.await {
            first_error.get_or_insert(e);
        }
    }
    let coordinator = rng.below(world.params.shards as u64) as usize;
    let flushed = gen.parts[coordinator].issue_flush().await;
    if let Err(e) = &flushed {
        expect_injected(e, IoOp::Flush);
        gen.tally.borrow_mut().flush_errors_seen += 1;
    }
    let ok = first_error.is_none() && flushed.is_ok();
    if ok {
        if let Some(mut model) = world.model(gen) {
            model.advance_floor(&snapshot);
        }
        world.totals().barriers_ok += 1;
        1
    } else {
        world.totals().barriers_failed += 1;
        2
    }
}

/// `write_dirty` on one partition: when it succeeds, that partition's blocks are durable.
async fn local_write_dirty(world: &World, gen: &Gen, rng: &mut SimRng) -> u64 {
    let p = rng.below(world.params.shards as u64) as usize;
    let snapshot = match world.model(gen) {
        Some(model) => model.snapshot(|b| world.owner(b) == p),
        None => return 0,
    };
    match gen.parts[p].write_dirty().await {
        Ok(()) => {
            if let Some(mut model) = world.model(gen) {
                model.advance_floor(&snapshot);
            }
            1
        }
        Err(e @ Error::Io { op: IoOp::Write, .. }) => {
            expect_injected(&e, IoOp::Write);
            gen.tally.borrow_mut().flush_maybe_masked += 1;
            2
        }
        Err(e) => {
            expect_injected(&e, IoOp::Flush);
            gen.tally.borrow_mut().flush_errors_seen += 1;
            3
        }
    }
}

/// `forget_range` on one partition. A block whose write failed is cached (the cache keeps the
/// data); if the forget drops it, the caller gave that data up and reads see the device again.
async fn forget(world: &World, gen: &Gen, rng: &mut SimRng) -> u64 {
    let p = pick_shard(world, rng);
    let first = pick_owned(world, p, rng);
    let count = (1 + rng.below(8)).min(world.params.device_blocks - first);
    let session = gen.parts[p].session().await;
    let failed: Vec<u64> = gen
        .ledger
        .borrow()
        .failed
        .range(first..first + count)
        .copied()
        .filter(|&b| world.owner(b) == p)
        .collect();
    for &b in &failed {
        if session.get(b).is_none() {
            world.fail(format!("block {b}'s last write failed but its data is not cached (lost)"));
        }
    }
    gen.parts[p].forget_range(first, count);
    let mut dropped = 0;
    for &b in &failed {
        if session.get(b).is_none() {
            dropped += 1;
            gen.ledger.borrow_mut().failed.remove(&b);
            if let Some(mut model) = world.model(gen) {
                model.relax(b);
            }
        }
    }
    world.totals().forgotten_failed += dropped;
    dropped
}

// ---------------------------------------------------------------------------------------------
// Workers, generations, the run.

/// What a worker does in one step.
#[derive(Clone, Copy, Debug)]
enum Op {
    Block(BlockOp),
    MultiPin,
    OverPin,
    Prefetch,
    Barrier,
    LocalWriteDirty,
    WriteDirtyAsync,
    Forget,
    Idle,
}

impl Op {
    /// The operation mix, out of 100.
    fn pick(rng: &mut SimRng) -> Op {
        match rng.below(100) {
            0..=19 => Op::Block(BlockOp::Read),
            20..=33 => Op::Block(BlockOp::Write),
            34..=49 => Op::Block(BlockOp::Rmw),
            50..=61 => Op::Block(BlockOp::Get),
            62..=71 => Op::Block(BlockOp::Peek),
            72..=77 => Op::MultiPin,
            78 => Op::OverPin,
            79..=85 => Op::Prefetch,
            86..=90 => Op::Barrier,
            91..=92 => Op::LocalWriteDirty,
            93..=94 => Op::WriteDirtyAsync,
            _ => Op::Forget,
        }
    }

    fn code(self) -> u64 {
        match self {
            Op::Block(op) => op as u64,
            Op::MultiPin => 10,
            Op::OverPin => 11,
            Op::Prefetch => 12,
            Op::Barrier => 13,
            Op::LocalWriteDirty => 14,
            Op::WriteDirtyAsync => 15,
            Op::Forget => 16,
            Op::Idle => 17,
        }
    }
}

async fn worker(world: Rc<World>, gen: Rc<Gen>, id: usize, seed: u64) {
    let mut rng = SimRng::new(seed);
    let home = id % world.params.shards;
    while !gen.stop.get() {
        let op = Op::pick(&mut rng);
        world.doing.borrow_mut()[id] = (op, 0);
        let (block, outcome) = match op {
            Op::Block(block_op) => {
                let block = pick_block(&world, &mut rng);
                world.doing.borrow_mut()[id] = (op, block);
                let op_seed = rng.next_u64();
                let (w, g) = (Rc::clone(&world), Rc::clone(&gen));
                let outcome = if world.owner(block) == home {
                    self::block_op(w, g, block_op, block, op_seed).await
                } else {
                    // Another shard's block: a task of its own on the owner (the message hop).
                    world.totals().cross_ops += 1;
                    glommio::spawn_local(self::block_op(w, g, block_op, block, op_seed)).await
                };
                (block, outcome)
            }
            Op::MultiPin => (0, multi_pin(&world, &gen, false, &mut rng).await),
            Op::OverPin => (0, multi_pin(&world, &gen, true, &mut rng).await),
            Op::Prefetch => (0, prefetch(&world, &gen, &mut rng)),
            Op::Barrier => (0, barrier(&world, &gen, &mut rng).await),
            Op::LocalWriteDirty => (0, local_write_dirty(&world, &gen, &mut rng).await),
            Op::WriteDirtyAsync => {
                let p = rng.below(world.params.shards as u64) as usize;
                gen.parts[p].write_dirty_async();
                (p as u64, 0)
            }
            Op::Forget => (0, forget(&world, &gen, &mut rng).await),
            Op::Idle => unreachable!("never picked"),
        };
        world.record(op.code(), block, outcome);
        world.doing.borrow_mut()[id] = (Op::Idle, 0);
        world.ops_done.set(world.ops_done.get() + 1);
        for _ in 0..rng.below(3) {
            yield_now().await;
        }
    }
    gen.workers_running.set(gen.workers_running.get() - 1);
}

fn new_generation(world: &World, number: u32, image: Vec<u8>, rng: &mut SimRng) -> Rc<Gen> {
    let params = &world.params;
    let (read, write, flush) = fault_profile(rng);
    let mut options = SimOptions::new(image.len() as u64);
    options.seed = rng.next_u64();
    options.latency_yields_max = params.latency_yields_max;
    options.read_error_probability = read;
    options.write_error_probability = write;
    options.flush_error_probability = flush;
    let device = SimDevice::from_image(image, options);
    let ledger = Rc::new(RefCell::new(Ledger::default()));
    let queue_config = QueueConfig {
        block_size_bytes: BS,
        io_depth_max: params.io_depth_max,
        writebacks_in_flight_max: params.writebacks_max,
    };
    let cache_config = CacheConfig {
        cache_size_bytes: params.frames * BS as u64,
        pins_per_session_max: params.pins,
        ..CacheConfig::default()
    };
    let parts = (0..params.shards)
        .map(|_| {
            let device = LedgerDevice { sim: device.clone(), ledger: Rc::clone(&ledger) };
            let queue = IoQueue::new(device, queue_config).expect("a valid queue");
            Partition::new(queue, cache_config, Hooks::default()).expect("a valid partition")
        })
        .collect();
    Rc::new(Gen {
        number,
        device,
        ledger,
        parts,
        stop: Cell::new(false),
        alive: Cell::new(true),
        workers_running: Cell::new(0),
        tally: RefCell::new(GenTally::default()),
    })
}

fn start_workers(world: &Rc<World>, gen: &Rc<Gen>, rng: &mut SimRng) {
    gen.workers_running.set(world.params.workers);
    for id in 0..world.params.workers {
        let task = worker(Rc::clone(world), Rc::clone(gen), id, rng.next_u64());
        glommio::spawn_local(task).detach();
    }
}

/// Yields until `done()`, failing the seed if nothing moves for [`STALL_YIELDS_MAX`] yields.
async fn wait_until(world: &World, gen: &Gen, what: &str, mut done: impl FnMut() -> bool) {
    let progress = || {
        let c = gen.device.counters();
        world.ops_done.get() + c.reads + c.writes + c.flushes
    };
    let (mut last, mut still) = (progress(), 0);
    while !done() {
        yield_now().await;
        let now = progress();
        if now == last {
            still += 1;
            if still > STALL_YIELDS_MAX {
                let stats: Vec<_> = gen
                    .parts
                    .iter()
                    .map(|p| {
                        let q = p.queue().stats();
                        (p.stats(), q.in_flight, q.writebacks_in_flight, q.submit_waits)
                    })
                    .collect();
                let doing = world.doing.borrow().clone();
                world.fail(format!(
                    "no progress while {what} (deadlock?); workers doing (op, block) {doing:?}; \
                     cache stats {stats:?}"
                ));
            }
        } else {
            (last, still) = (now, 0);
        }
    }
}

/// Stops the generation's workers and waits until its I/O is over, then checks that every
/// fault the device injected is accounted for.
async fn drain_and_account(world: &World, gen: &Gen) {
    gen.stop.set(true);
    wait_until(world, gen, "draining the workers", || gen.workers_running.get() == 0).await;
    let mut quiet = 0;
    wait_until(world, gen, "draining the I/O", || {
        let idle = gen.parts.iter().all(|p| p.queue().stats().in_flight == 0);
        quiet = if idle { quiet + 1 } else { 0 };
        quiet > 64
    })
    .await;
    let ledger = gen.ledger.borrow();
    let tally = gen.tally.borrow();
    let stats: Vec<_> = gen.parts.iter().map(|p| p.stats()).collect();
    let write_errors: u64 = stats.iter().map(|s| s.write_errors).sum();
    let read_errors: u64 = stats.iter().map(|s| s.read_errors).sum();
    let injected = gen.device.counters().faults_injected;
    let number = gen.number;
    if injected != ledger.read_faults + ledger.write_faults + ledger.flush_faults {
        world.fail(format!(
            "generation {number}: the device injected {injected} faults, the ledger saw {ledger:?}"
        ));
    }
    if write_errors != ledger.write_faults {
        world.fail(format!(
            "generation {number}: the partitions counted {write_errors} write errors, the device \
             injected {}",
            ledger.write_faults
        ));
    }
    if read_errors != ledger.read_faults || tally.read_errors_seen > ledger.read_faults {
        world.fail(format!(
            "generation {number}: the partitions counted {read_errors} read errors and callers \
             saw {}, the device injected {}",
            tally.read_errors_seen, ledger.read_faults
        ));
    }
    let flush_range = tally.flush_errors_seen..=tally.flush_errors_seen + tally.flush_maybe_masked;
    if !flush_range.contains(&ledger.flush_faults) {
        world.fail(format!(
            "generation {number}: the device injected {} flush faults, barriers saw {} (and up \
             to {} could hide behind write errors)",
            ledger.flush_faults, tally.flush_errors_seen, tally.flush_maybe_masked
        ));
    }
    let counters = gen.device.counters();
    if counters.overlapping_writes != 0 {
        world.fail(format!("generation {number}: overlapping writes in flight: {counters:?}"));
    }
    let mut totals = world.totals();
    totals.read_faults += ledger.read_faults;
    totals.write_faults += ledger.write_faults;
    totals.flush_faults += ledger.flush_faults;
    totals.read_errors_seen += tally.read_errors_seen;
}

async fn simulate(seed: u64) -> (Totals, u64) {
    let params = Params::from_seed(seed);
    let router = Router::new(params.shards, params.range_blocks);
    let mut owned = vec![Vec::new(); params.shards];
    for b in 0..params.device_blocks {
        owned[router.shard_of(b)].push(b);
    }
    let params_workers = params.workers;
    let world = Rc::new(World {
        seed,
        model: RefCell::new(Model::new(params.device_blocks)),
        params,
        router,
        owned,
        totals: RefCell::new(Totals::default()),
        generation: Cell::new(0),
        ops_done: Cell::new(0),
        digest: Cell::new(seed),
        doing: RefCell::new(vec![(Op::Idle, 0); params_workers]),
    });
    let mut rng = SimRng::new(seed);
    let mut image = vec![0u8; (world.params.device_blocks as usize) * BS];
    for b in 0..world.params.device_blocks {
        for s in 0..SECTORS {
            let at = b as usize * BS + s * STAMP_SECTOR_BYTES;
            stamp_sector(&mut image[at..at + STAMP_SECTOR_BYTES], b, s as u64, 0);
        }
    }
    for number in 0..world.params.generations {
        world.generation.set(number);
        let gen = new_generation(&world, number, image, &mut rng);
        start_workers(&world, &gen, &mut rng);
        let target = world.ops_done.get() + 1 + rng.below(world.params.ops_per_generation);
        wait_until(&world, &gen, "running", || world.ops_done.get() >= target).await;
        // Crash: the medium keeps what was flushed and a seeded subset of the rest.
        image = gen.device.crash(rng.next_u64());
        gen.alive.set(false);
        world.totals().crashes += 1;
        drain_and_account(&world, &gen).await;
        if let Err(e) = world.model.borrow_mut().recover(&image) {
            world.fail(e);
        }
    }
    // The last generation: run, heal the device, stop, and one barrier must make everything
    // durable.
    let number = world.params.generations;
    world.generation.set(number);
    let gen = new_generation(&world, number, image, &mut rng);
    start_workers(&world, &gen, &mut rng);
    let target = world.ops_done.get() + 1 + rng.below(world.params.ops_per_generation);
    wait_until(&world, &gen, "running", || world.ops_done.get() >= target).await;
    gen.device.set_faults(0.0, 0.0, 0.0);
    drain_and_account(&world, &gen).await;
    if barrier(&world, &gen, &mut rng).await != 1 {
        world.fail("the final barrier on a healed device failed");
    }
    if !gen.ledger.borrow().failed.is_empty() {
        world.fail(format!("failed writes left after the final barrier: {:?}", gen.ledger));
    }
    if let Err(e) = world.model.borrow().check_equal(&gen.device.durable_image()) {
        world.fail(e);
    }
    if let Err(e) = world.model.borrow_mut().recover(&gen.device.crash(rng.next_u64())) {
        world.fail(e);
    }
    let mut totals = world.totals().clone();
    totals.ops = world.ops_done.get();
    (totals, world.digest.get())
}

// ---------------------------------------------------------------------------------------------
// The runner: seeds on threads, each seed on a fresh executor, failures name their seed.

fn run_seed(seed: u64) -> std::result::Result<(Totals, u64), String> {
    let handle = std::thread::Builder::new()
        .name(format!("sim-seed-{seed}"))
        .spawn(move || {
            let executor = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
                .make()
                .expect("a glommio executor (needs RLIMIT_MEMLOCK)");
            executor.run(simulate(seed))
        })
        .expect("spawn a simulation thread");
    handle.join().map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic without a message".into())
    })
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v}: not a number")))
}

fn replay_hint(seed: u64) -> String {
    format!("replay: SEED={seed} cargo test -p corebuf-tests --test sim_shards")
}

#[test]
fn shards_survive_faults_and_crashes_for_many_seeds() {
    let seeds: Vec<u64> = match env_u64("SEED") {
        Some(seed) => {
            eprintln!("seed {seed}: {:?}", Params::from_seed(seed));
            vec![seed]
        }
        None => {
            let base = env_u64("SIM_SEED_BASE").unwrap_or(0);
            (base..base + env_u64("SIM_SEEDS").unwrap_or(DEFAULT_SEEDS)).collect()
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(seeds.len());
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let running: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let (done_tx, done_rx) = mpsc::channel();
    for _ in 0..threads {
        let (seeds, next, running, done) =
            (seeds.clone(), Arc::clone(&next), Arc::clone(&running), done_tx.clone());
        std::thread::spawn(move || loop {
            let Some(&seed) = seeds.get(next.fetch_add(1, Ordering::SeqCst)) else { return };
            running.lock().unwrap().push((seed, Instant::now()));
            let result = run_seed(seed);
            running.lock().unwrap().retain(|&(s, _)| s != seed);
            if done.send((seed, result)).is_err() {
                return;
            }
        });
    }
    drop(done_tx);
    let mut totals = Totals::default();
    for _ in 0..seeds.len() {
        let (seed, result) = loop {
            match done_rx.recv_timeout(Duration::from_secs(1)) {
                Ok(answer) => break answer,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let running = running.lock().unwrap();
                    if let Some(&(seed, since)) =
                        running.iter().find(|(_, since)| since.elapsed() > SEED_TIMEOUT)
                    {
                        panic!(
                            "seed {seed} still running after {:?}: a hang.\n{}",
                            since.elapsed(),
                            replay_hint(seed)
                        );
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!("a runner thread died"),
            }
        };
        match result {
            Ok((seed_totals, _digest)) => totals.add(&seed_totals),
            Err(message) => panic!("seed {seed} failed: {message}\n{}", replay_hint(seed)),
        }
    }
    eprintln!(
        "sim_shards: {} seeds in {:.1?} on {threads} threads: {totals:?}",
        seeds.len(),
        started.elapsed()
    );
    assert!(totals.crashes >= seeds.len() as u64 * 2, "every seed crashes at least twice");
}

/// The same seed gives the same run, operation for operation: what makes `SEED=<n>` a replay.
#[test]
fn a_seed_replays_exactly() {
    if std::env::var("SEED").is_ok() {
        return;
    }
    for seed in [7u64, 1234] {
        let first = run_seed(seed).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let second = run_seed(seed).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert_eq!(first.1, second.1, "seed {seed} ran differently twice");
        assert_eq!(first.0.ops, second.0.ops);
    }
}
