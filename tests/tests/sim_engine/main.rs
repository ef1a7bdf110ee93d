//! Deterministic simulation of the real engine over one simulated device, with faults and
//! crashes: the durability barrier never loses data, nothing comes back torn or unknown, and
//! every error an operation returns is accounted for by an injected fault.
//!
//! Each seed starts a real `corebuf::LocalEngine` (the engine's `Shard`s, router, messages
//! and global barrier, all hosted on this one glommio executor) of 2–4 shards over clones of
//! ONE `SimDevice`, wrapped in a device that keeps a ledger of the faults it injected and can
//! crash the machine at a chosen device call. 3–12 workers live on "home" shards and reach
//! every block through the engine: routed `Shard::read` / `Shard::write` and `Client` reads
//! and writes (copies through messages when another shard owns the block), jobs on the owner
//! (`run_on_owner` / `run_on`) for the partition-level operations — read-modify-write of a
//! sector range in place, `get`, long borrows of the bytes, multi-pin sessions, over-pinning
//! (which must fail with `PinLimit`), `forget_range`, the shard's own `write_dirty` and
//! `write_dirty_async` — cross-shard `prefetch`, and global barriers (`Shard::flush` and
//! `Client::flush`), concurrent with each other and with writes.
//!
//! Each generation ends in a crash or a shutdown. Crashes land after N operations, at the
//! k-th device write (mid write-back), at the k-th device flush before it runs (between a
//! barrier's write-back and device-flush phases), right after a barrier returned, or inside
//! `LocalEngine::shutdown`; the run counts where they landed. After a crash the workers stop,
//! the I/O drains, the faults are accounted, the old engine is shut down (on the healed, dead
//! device) and a new generation starts over `SimDevice::from_image` of what survived. Some
//! generations end instead by `shutdown()` while operations are in flight. The last one heals
//! the device, stops the workers and shuts down; that must succeed, and the durable image must
//! then equal the model. Every decision — parameters, operations, the order jobs are handled
//! in, device latency (in executor yields), faults (random per call, and in some generations
//! bad blocks every write of which fails until the device heals), crash points and which
//! unflushed writes survive — comes from the seed.
//!
//! Every 512-byte sector carries its block, its index, a version and a checksum. The model
//! (`model.rs`) knows each block's sequence of live states and, per sector, the durable floor
//! and the versions written since. It checks:
//! 1. every read, `get` and long borrow sees exactly one state the block held while the read
//!    was in flight (a routed write is pending from its send until it returns; the moment the
//!    owner lands it is not observable, so one modifier at a time per block: others skip);
//! 2. after each crash, every sector holds a version in `[floor ..= latest]` that was actually
//!    written to it — never torn (checksum), misplaced or unknown; the floor is what the last
//!    successful barrier (or shard-local `write_dirty`, or shutdown) covered when it was called;
//! 3. faults are accounted for: a barrier that returns `Ok` saw no block whose write failed
//!    before it started and stayed unresolved until it ended; one that fails names an injected
//!    flush fault or a block whose write failed meanwhile; the shards' `write_errors` /
//!    `read_errors` equal the write / read faults the device injected; every injected flush
//!    fault is seen by exactly one caller (or hidden behind a write error, which the bound
//!    allows); a read fails only with an injected read error of its own block; a read or
//!    write that fails with a write error names a block of the same owner whose write failed
//!    meanwhile (the cache is full of data it could not write);
//! 4. progress: no operation completing for a long stretch of executor yields is a deadlock
//!    or a livelock and fails the seed (device I/O alone is not progress: a barrier retrying
//!    a bad block forever keeps the device busy); a seed that takes too long in wall time
//!    fails too;
//! 5. after the last generation the shutdown succeeds and the durable image equals the model.
//!
//! Replay: `SEED=<n> cargo test -p corebuf-tests --test sim_engine` runs exactly seed `n` (and
//! prints its parameters with `-- --nocapture`); `SIM_SEEDS=<n>` runs `n` seeds (default
//! [`DEFAULT_SEEDS`]), starting at `SIM_SEED_BASE` (default 0). A failing seed is printed with
//! the command that replays it; `SIM_KEEP_GOING=1` runs every seed and then reports how many
//! failed and the first. `SIM_TRACE_BLOCK=<b>` prints what the model records for block `b`.

mod device;
mod model;
mod ops;
mod runner;

use std::cell::{Cell, RefCell, RefMut};
use std::rc::Rc;
use std::time::Instant;

use corebuf::io::{SimDevice, SimOptions};
use corebuf::{Client, Engine, Error, IoOp, LocalEngine, Router, Shard};
use corebuf_shard::rng::SimRng;
use corebuf_tests::{stamp_sector, STAMP_SECTOR_BYTES};
use futures_lite::future::yield_now;

use device::{expect_injected, LedgerDevice, Place, Probe};
use model::Model;
use ops::Op;
use runner::{env_u64, run_seed, SeedRunner};

/// Seeds run by default: under a minute in a debug build on the 2-core reference machine when
/// it is not shared (about 0.18 s of CPU per seed); CI runs 1000 more in release.
const DEFAULT_SEEDS: u64 = 300;
/// Controller yields without any operation completing before the run is declared stuck.
const STALL_YIELDS_MAX: u64 = 200_000;

const BS: usize = 4096;
const SECTORS: usize = BS / STAMP_SECTOR_BYTES;

type Sh = Shard<LedgerDevice>;

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
    inbox_capacity: usize,
    handlers_max: usize,
    latency_yields_max: u32,
    /// Each job yields `0..=this` times before it starts: a seeded order of handling.
    delivery_yields_max: u64,
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
            inbox_capacity: [1, 2, 8, 1024][rng.below(4) as usize],
            handlers_max: [1, 2, 8, 1024][rng.below(4) as usize],
            latency_yields_max: rng.below(7) as u32,
            delivery_yields_max: rng.below(5),
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
// One generation (between two crashes) and the whole run.

#[derive(Debug, Default)]
struct GenTally {
    read_errors_seen: u64,
    flush_errors_seen: u64,
    /// Calls that returned a write error after which a flush fault could hide (a barrier or
    /// `write_dirty` returns the write error first), and the shards of a shutdown.
    flush_maybe_masked: u64,
}

struct Gen {
    number: u32,
    probe: Rc<Probe>,
    engine: RefCell<Option<LocalEngine<LedgerDevice>>>,
    shards: Vec<Rc<Sh>>,
    client: Client<LedgerDevice>,
    /// Workers stop taking new operations.
    stop: Cell<bool>,
    workers_running: Cell<usize>,
    tally: RefCell<GenTally>,
    crash_after_barrier_probability: f64,
}

#[derive(Debug, Default, Clone)]
struct Totals {
    ops: u64,
    messages: u64,
    jobs: u64,
    crashes: [u64; Place::ALL.len()],
    shutdown_ends: u64,
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
    prefetches: u64,
    refused_by_shutdown: u64,
}

impl Totals {
    fn add(&mut self, o: &Totals) {
        self.ops += o.ops;
        self.messages += o.messages;
        self.jobs += o.jobs;
        for (total, add) in self.crashes.iter_mut().zip(o.crashes) {
            *total += add;
        }
        self.shutdown_ends += o.shutdown_ends;
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
        self.prefetches += o.prefetches;
        self.refused_by_shutdown += o.refused_by_shutdown;
    }

    fn crashes_total(&self) -> u64 {
        self.crashes.iter().sum()
    }

    fn report(&self) -> String {
        let places: Vec<String> =
            Place::ALL.iter().map(|p| format!("{p:?} {}", self.crashes[p.index()])).collect();
        format!(
            "{} operations ({} messages, {} jobs), {} crashes ({}), {} generations ended by \
             shutdown; barriers {} ok, {} failed; faults injected: {} read, {} write, {} flush; \
             {} read errors seen by callers, {} ops failed on a cache full of unwritable data, \
             {} PinLimits, {} busy skips, {} failed blocks forgotten, {} prefetches, {} calls \
             refused by a shutdown",
            self.ops,
            self.messages,
            self.jobs,
            self.crashes_total(),
            places.join(", "),
            self.shutdown_ends,
            self.barriers_ok,
            self.barriers_failed,
            self.read_faults,
            self.write_faults,
            self.flush_faults,
            self.read_errors_seen,
            self.cache_full_of_failed,
            self.pin_limits,
            self.busy_skips,
            self.forgotten_failed,
            self.prefetches,
            self.refused_by_shutdown,
        )
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
    /// What each worker is doing now, for the stall report.
    doing: RefCell<Vec<Op>>,
}

impl World {
    fn owner(&self, block: u64) -> usize {
        self.router.shard_of(block)
    }

    /// The model, if `gen` is the generation it describes (not crashed).
    fn model(&self, gen: &Gen) -> Option<RefMut<'_, Model>> {
        gen.probe.alive.get().then(|| self.model.borrow_mut())
    }

    fn fail(&self, what: impl std::fmt::Display) -> ! {
        panic!(
            "seed {} generation {}: {what}\n  params: {:?}",
            self.seed,
            self.generation.get(),
            self.params
        )
    }

    /// Notes what the controller is doing, for the report of a seed that hangs.
    fn phase(&self, what: &str) {
        runner::set_phase(self.seed, format!("generation {}: {what}", self.generation.get()));
    }

    fn record(&self, op: u64, outcome: u64) {
        let d = self.digest.get().rotate_left(7) ^ op;
        self.digest.set(d.wrapping_mul(0x100_0000_01B3) ^ outcome);
    }

    fn totals(&self) -> RefMut<'_, Totals> {
        self.totals.borrow_mut()
    }

    fn check_live(&self, gen: &Gen, block: u64, data: &[u8]) {
        if let Some(mut model) = self.model(gen) {
            if let Err(e) = model.check_now(block, data) {
                self.fail(e);
            }
        }
    }

    /// An error a call may get only because the engine is shutting down.
    fn refused(&self, gen: &Gen, error: &Error) {
        let refused = matches!(error, Error::ShutDown) && gen.probe.shutting_down.get();
        if !refused {
            self.fail(format!(
                "a call failed with {error:?} (shutting down: {})",
                gen.probe.shutting_down.get()
            ));
        }
        self.totals().refused_by_shutdown += 1;
    }

    /// Accounts for an error returned by a read (`reading`) or write of `block` that started
    /// at tick `start`.
    fn account(&self, gen: &Gen, block: u64, reading: bool, start: u64, error: &Error) {
        match error {
            Error::Io { op: IoOp::Read, block: failed, .. } if reading => {
                expect_injected(error, IoOp::Read);
                if *failed != Some(block) {
                    self.fail(format!("a read of block {block} failed with {error:?}"));
                }
                gen.tally.borrow_mut().read_errors_seen += 1;
            }
            Error::Io { op: IoOp::Write, block: Some(failed), .. } => {
                // Every evictable frame of the owner holds data whose write failed: the cache
                // says so instead of waiting forever.
                expect_injected(error, IoOp::Write);
                let known = gen.probe.ledger.borrow().failed_during(*failed, start);
                if !known || self.owner(*failed) != self.owner(block) {
                    self.fail(format!(
                        "an operation on block {block} (shard {}) failed with a write error of \
                         block {failed}, which had no failed write on that shard meanwhile: \
                         {error:?}",
                        self.owner(block)
                    ));
                }
                self.totals().cache_full_of_failed += 1;
            }
            _ => self.refused(gen, error),
        }
    }

    /// A barrier (or `write_dirty`, or shutdown) that started at tick `start` failed: the
    /// error must be an injected flush fault or name a block whose write failed meanwhile.
    /// False if the engine refused the call (shutting down).
    fn barrier_failed(&self, gen: &Gen, start: u64, error: &Error) -> bool {
        match error {
            Error::Io { op: IoOp::Write, block: Some(failed), .. } => {
                expect_injected(error, IoOp::Write);
                if !gen.probe.ledger.borrow().failed_during(*failed, start) {
                    self.fail(format!(
                        "a barrier failed with a write error of block {failed}, which had no \
                         failed write meanwhile: {error:?}"
                    ));
                }
                gen.tally.borrow_mut().flush_maybe_masked += 1;
                true
            }
            Error::Io { op: IoOp::Flush, .. } => {
                expect_injected(error, IoOp::Flush);
                gen.tally.borrow_mut().flush_errors_seen += 1;
                true
            }
            _ => {
                self.refused(gen, error);
                false
            }
        }
    }

    /// A barrier (or `write_dirty`, or shutdown) that started at tick `start` returned `Ok`:
    /// no block it covers (`covers`) may have had an unresolved failed write since before it
    /// started (the error was latched all along, so it was lost).
    fn check_no_error_lost(&self, gen: &Gen, start: u64, what: &str, covers: impl Fn(u64) -> bool) {
        let ledger = gen.probe.ledger.borrow();
        let lost: Vec<u64> = ledger
            .failed_since
            .iter()
            .filter(|&(&b, &since)| since < start && covers(b))
            .map(|(&b, _)| b)
            .collect();
        if !lost.is_empty() {
            self.fail(format!(
                "{what} returned Ok while blocks {lost:?} had failed writes all along (an error \
                 was lost)"
            ));
        }
    }

    fn pick_block(&self, rng: &mut SimRng) -> u64 {
        let blocks = self.params.device_blocks;
        if rng.chance(0.6) {
            rng.below(blocks / 8)
        } else {
            rng.below(blocks)
        }
    }

    /// A shard that owns at least one block (with few ranges, a shard may own none).
    fn pick_shard(&self, rng: &mut SimRng) -> usize {
        let candidates: Vec<usize> =
            (0..self.params.shards).filter(|&p| !self.owned[p].is_empty()).collect();
        candidates[rng.below(candidates.len() as u64) as usize]
    }

    fn pick_owned(&self, p: usize, rng: &mut SimRng) -> u64 {
        let owned = &self.owned[p];
        owned[rng.below(owned.len() as u64) as usize]
    }
}

// ---------------------------------------------------------------------------------------------
// Workers, generations, the run.

async fn worker(world: Rc<World>, gen: Rc<Gen>, id: usize, seed: u64) {
    let mut rng = SimRng::new(seed);
    let home = Rc::clone(&gen.shards[id % world.params.shards]);
    while !gen.stop.get() {
        let op = Op::pick(&mut rng);
        world.doing.borrow_mut()[id] = op;
        let outcome = ops::run(&world, &gen, &home, op, &mut rng).await;
        world.record(op.code(), outcome);
        world.doing.borrow_mut()[id] = Op::Idle;
        world.ops_done.set(world.ops_done.get() + 1);
        for _ in 0..rng.below(3) {
            yield_now().await;
        }
    }
    gen.workers_running.set(gen.workers_running.get() - 1);
}

/// How a generation is meant to end (a crash trigger may fire first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    /// Crash after the target number of operations.
    CrashAfterOps,
    /// `LocalEngine::shutdown()` with operations in flight.
    Shutdown,
    /// The last generation: heal, stop the workers, shut down; the image must equal the model.
    Final,
}

fn new_generation(world: &World, number: u32, image: Vec<u8>, rng: &mut SimRng) -> Rc<Gen> {
    let last = number == world.params.generations;
    let params = &world.params;
    let (read, write, flush) = fault_profile(rng);
    let mut options = SimOptions::new(image.len() as u64);
    options.seed = rng.next_u64();
    options.latency_yields_max = params.latency_yields_max;
    options.read_error_probability = read;
    options.write_error_probability = write;
    options.flush_error_probability = flush;
    let probe = Probe::new(SimDevice::from_image(image, options), rng.next_u64());
    let builder = Engine::builder()
        .block_size_bytes(BS)
        .cache_size_bytes(params.frames * BS as u64 * params.shards as u64)
        .range_blocks(params.range_blocks)
        .writebacks_in_flight_max(params.writebacks_max)
        .io_depth_max(params.io_depth_max)
        .pins_per_session_max(params.pins)
        .inbox_capacity(params.inbox_capacity)
        .handlers_in_flight_max(params.handlers_max)
        .ring_capacity([1, 2, 4, 128][rng.below(4) as usize])
        .delivery_seed(rng.next_u64());
    let devices = vec![LedgerDevice { probe: Rc::clone(&probe) }; params.shards];
    let engine = LocalEngine::start(builder, devices).expect("a valid simulated engine");
    let shards = engine.shards().to_vec();
    let client = engine.client();
    let crash_after_barrier_probability = if rng.chance(0.3) && !last { 0.1 } else { 0.0 };
    if rng.chance(0.25) {
        let bad = (0..1 + rng.below(2)).map(|_| world.pick_block(rng)).collect();
        *probe.bad_blocks.borrow_mut() = bad;
    }
    Rc::new(Gen {
        number,
        probe,
        engine: RefCell::new(Some(engine)),
        shards,
        client,
        stop: Cell::new(false),
        workers_running: Cell::new(0),
        tally: RefCell::new(GenTally::default()),
        crash_after_barrier_probability,
    })
}

fn start_workers(world: &Rc<World>, gen: &Rc<Gen>, rng: &mut SimRng) {
    gen.workers_running.set(world.params.workers);
    for id in 0..world.params.workers {
        let task = worker(Rc::clone(world), Rc::clone(gen), id, rng.next_u64());
        glommio::spawn_local(task).detach();
    }
}

/// Arms the generation's crash triggers and picks how it ends.
fn arm(gen: &Gen, rng: &mut SimRng) -> Ending {
    let probe = &gen.probe;
    match rng.below(100) {
        0..=29 => Ending::CrashAfterOps,
        30..=54 => {
            probe.crash_at_write.set(Some(1 + rng.below(200)));
            Ending::CrashAfterOps
        }
        55..=79 => {
            probe.crash_at_flush.set(Some(1 + rng.below(8)));
            Ending::CrashAfterOps
        }
        _ => Ending::Shutdown,
    }
}

/// What counts as progress for the stall watchdog.
#[derive(Clone, Copy, Debug)]
enum Progress {
    /// Operations completed. Device I/O alone is not progress: a barrier retrying a write
    /// forever keeps the device busy while its caller never returns.
    Ops,
    /// Operations completed or device calls (draining the I/O).
    OpsOrIo,
}

/// Yields until `done()`, failing the seed if nothing moves for [`STALL_YIELDS_MAX`] yields.
async fn wait_until(
    world: &World,
    gen: &Gen,
    what: &str,
    kind: Progress,
    mut done: impl FnMut() -> bool,
) {
    world.phase(what);
    let progress = || {
        let c = gen.probe.sim.counters();
        let io = match kind {
            Progress::Ops => 0,
            Progress::OpsOrIo => c.reads + c.writes + c.flushes,
        };
        world.ops_done.get() + io
    };
    let (mut last, mut still) = (progress(), 0);
    while !done() {
        yield_now().await;
        let now = progress();
        if now == last {
            still += 1;
            if still > STALL_YIELDS_MAX {
                let stats: Vec<_> = gen
                    .shards
                    .iter()
                    .map(|s| {
                        let q = s.partition().queue().stats();
                        (s.partition().stats(), q.in_flight, q.writebacks_in_flight, q.submit_waits)
                    })
                    .collect();
                let doing = world.doing.borrow().clone();
                world.fail(format!(
                    "no progress while {what} (deadlock?); workers doing {doing:?}; cache stats \
                     {stats:?}"
                ));
            }
        } else {
            (last, still) = (now, 0);
        }
    }
}

/// Awaits `future` (which does not yield to the controller otherwise) under the stall
/// watchdog: a shutdown that waits forever fails the seed with `what` instead of parking the
/// executor until the wall-clock limit.
async fn watched<T: 'static>(
    world: &World,
    gen: &Gen,
    what: &str,
    future: impl std::future::Future<Output = T> + 'static,
) -> T {
    let slot: Rc<RefCell<Option<T>>> = Rc::default();
    let filled = Rc::clone(&slot);
    glommio::spawn_local(async move { *filled.borrow_mut() = Some(future.await) }).detach();
    wait_until(world, gen, what, Progress::OpsOrIo, || slot.borrow().is_some()).await;
    let value = slot.borrow_mut().take().expect("filled");
    value
}

/// Stops the generation's workers and waits until its I/O is over.
async fn drain(world: &World, gen: &Gen) {
    gen.stop.set(true);
    let workers_done = || gen.workers_running.get() == 0;
    wait_until(world, gen, "draining the workers", Progress::Ops, workers_done).await;
    let mut quiet = 0;
    wait_until(world, gen, "draining the I/O", Progress::OpsOrIo, || {
        let idle = gen.shards.iter().all(|s| s.partition().queue().stats().in_flight == 0);
        quiet = if idle { quiet + 1 } else { 0 };
        quiet > 64
    })
    .await;
}

/// Checks that every fault the device injected is accounted for.
fn account_faults(world: &World, gen: &Gen) {
    let ledger = gen.probe.ledger.borrow();
    let tally = gen.tally.borrow();
    let stats: Vec<_> = gen.shards.iter().map(|s| s.partition().stats()).collect();
    let write_errors: u64 = stats.iter().map(|s| s.write_errors).sum();
    let read_errors: u64 = stats.iter().map(|s| s.read_errors).sum();
    let counters = gen.probe.sim.counters();
    let number = gen.number;
    let injected = counters.faults_injected + ledger.bad_block_faults;
    if injected != ledger.read_faults + ledger.write_faults + ledger.flush_faults {
        world.fail(format!(
            "generation {number}: the device injected {injected} faults, the ledger saw {ledger:?}"
        ));
    }
    // The cache counts a failed write per buffer; a failed run of adjacent blocks is written
    // again block by block, and only those writes' failures are the buffers'.
    if write_errors != ledger.write_fault_blocks {
        world.fail(format!(
            "generation {number}: the shards counted {write_errors} buffer write errors, the \
             device failed {} writes of single blocks ({} write faults in all)",
            ledger.write_fault_blocks, ledger.write_faults
        ));
    }
    if read_errors != ledger.read_faults || tally.read_errors_seen > ledger.read_faults {
        world.fail(format!(
            "generation {number}: the shards counted {read_errors} read errors and callers saw \
             {}, the device injected {}",
            tally.read_errors_seen, ledger.read_faults
        ));
    }
    let flush_range = tally.flush_errors_seen..=tally.flush_errors_seen + tally.flush_maybe_masked;
    if !flush_range.contains(&ledger.flush_faults) {
        world.fail(format!(
            "generation {number}: the device injected {} flush faults, callers saw {} (and up to \
             {} could hide behind write errors)",
            ledger.flush_faults, tally.flush_errors_seen, tally.flush_maybe_masked
        ));
    }
    if counters.overlapping_writes != 0 {
        world.fail(format!("generation {number}: overlapping writes in flight: {counters:?}"));
    }
    let mut totals = world.totals();
    totals.read_faults += ledger.read_faults;
    totals.write_faults += ledger.write_faults;
    totals.flush_faults += ledger.flush_faults;
    totals.read_errors_seen += tally.read_errors_seen;
    totals.messages += gen.shards.iter().map(|s| s.stats().messages_sent).sum::<u64>();
}

/// Shuts the generation's engine down while its workers may still be running: what was
/// committed when it was called is durable if it succeeds. Returns its result.
async fn shut_down(world: &World, gen: &Gen) -> corebuf::Result<()> {
    let probe = &gen.probe;
    probe.shutting_down.set(true);
    let snapshot = world.model(gen).map(|model| model.snapshot(|_| true));
    let start = probe.tick();
    let engine = gen.engine.borrow_mut().take().expect("the engine runs until shut down");
    let result = watched(world, gen, "shutting down", engine.shutdown()).await;
    match &result {
        Ok(()) => {
            world.check_no_error_lost(gen, start, "LocalEngine::shutdown", |_| true);
            if let (Some(snapshot), Some(mut model)) = (snapshot, world.model(gen)) {
                model.advance_floor(&snapshot);
            }
        }
        Err(e) => {
            world.barrier_failed(gen, start, e);
        }
    }
    // Each shard's shutdown flushes the device; only the first error is returned.
    gen.tally.borrow_mut().flush_maybe_masked += world.params.shards as u64;
    result
}

/// Runs generation `number` to its end; returns the image the next one starts from.
async fn generation(world: &Rc<World>, number: u32, image: Vec<u8>, rng: &mut SimRng) -> Vec<u8> {
    world.generation.set(number);
    world.phase("starting an engine");
    let last = number == world.params.generations;
    let gen = new_generation(world, number, image, rng);
    let ending = if last { Ending::Final } else { arm(&gen, rng) };
    start_workers(world, &gen, rng);
    let target = world.ops_done.get() + 1 + rng.below(world.params.ops_per_generation);
    let probe = Rc::clone(&gen.probe);
    let end = || world.ops_done.get() >= target || !probe.alive.get();
    wait_until(world, &gen, "running", Progress::Ops, end).await;
    let image = match ending {
        Ending::Final => final_shutdown(world, &gen, rng).await,
        Ending::Shutdown if probe.alive.get() => {
            // Perhaps crash inside the shutdown: at one of its first writes or flushes.
            let (writes, flushes) = probe.calls();
            match rng.below(3) {
                0 => probe.crash_at_write.set(Some(writes + 1 + rng.below(16))),
                1 => probe.crash_at_flush.set(Some(flushes + 1 + rng.below(4))),
                _ => {}
            }
            // The workers keep going while the engine shuts down.
            let _ = shut_down(world, &gen).await;
            // A crash from here on would not be inside the shutdown.
            probe.crash_at_write.set(None);
            probe.crash_at_flush.set(None);
            drain(world, &gen).await;
            account_faults(world, &gen);
            if probe.alive.get() {
                world.totals().shutdown_ends += 1;
                probe.sim.crash(rng.next_u64())
            } else {
                crashed_image(world, &gen)
            }
        }
        Ending::Shutdown | Ending::CrashAfterOps => {
            let in_barrier = probe.barriers_in_flight.get() > 0;
            probe.crash(if in_barrier { Place::AfterOpsInBarrier } else { Place::AfterOps });
            drain(world, &gen).await;
            account_faults(world, &gen);
            // The old engine ends on the dead device, healed: every shard must stop cleanly.
            probe.heal();
            let engine = gen.engine.borrow_mut().take();
            if let Some(engine) = engine {
                let what = "shutting down after the crash";
                if let Err(e) = watched(world, &gen, what, engine.shutdown()).await {
                    world.fail(format!("shutting down after the crash, on a healed device: {e:?}"));
                }
            }
            crashed_image(world, &gen)
        }
    };
    if let Err(e) = world.model.borrow_mut().recover(&image) {
        world.fail(e);
    }
    check_nothing_left(world, &gen);
    image
}

/// Every task of a generation has ended once it is over: nothing holds it, its shards or its
/// engine any more (a leak, and with executors reused across seeds, a way for one seed to
/// disturb the next).
fn check_nothing_left(world: &World, gen: &Rc<Gen>) {
    let shard_refs: Vec<usize> = gen.shards.iter().map(Rc::strong_count).collect();
    if Rc::strong_count(gen) != 1 || shard_refs.iter().any(|&n| n != 1) {
        world.fail(format!(
            "a task outlived generation {}: {} references to it, {shard_refs:?} to its shards",
            gen.number,
            Rc::strong_count(gen)
        ));
    }
}

/// The image a crash left, counted by where it landed.
fn crashed_image(world: &World, gen: &Gen) -> Vec<u8> {
    let (place, image) = gen.probe.crashed.borrow_mut().take().expect("the generation crashed");
    world.totals().crashes[place.index()] += 1;
    world.record(100 + place.index() as u64, 0);
    image
}

/// The last generation: heal, stop, shut down; that must succeed and make the model durable.
async fn final_shutdown(world: &World, gen: &Gen, rng: &mut SimRng) -> Vec<u8> {
    gen.probe.heal();
    drain(world, gen).await;
    if let Err(e) = shut_down(world, gen).await {
        world.fail(format!("the final shutdown on a healed device failed: {e:?}"));
    }
    account_faults(world, gen);
    let ledger = gen.probe.ledger.borrow();
    if !ledger.failed_since.is_empty() {
        world.fail(format!("failed writes left after the final shutdown: {ledger:?}"));
    }
    drop(ledger);
    if let Err(e) = world.model.borrow().check_equal(&gen.probe.sim.durable_image()) {
        world.fail(e);
    }
    world.totals().shutdown_ends += 1;
    gen.probe.sim.crash(rng.next_u64())
}

async fn simulate(seed: u64) -> (Totals, u64) {
    let params = Params::from_seed(seed);
    let router = Router::new(params.shards, params.range_blocks);
    let mut owned = vec![Vec::new(); params.shards];
    for b in 0..params.device_blocks {
        owned[router.shard_of(b)].push(b);
    }
    let workers = params.workers;
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
        doing: RefCell::new(vec![Op::Idle; workers]),
    });
    let mut rng = SimRng::new(seed);
    let mut image = vec![0u8; (world.params.device_blocks as usize) * BS];
    for b in 0..world.params.device_blocks {
        for s in 0..SECTORS {
            let at = b as usize * BS + s * STAMP_SECTOR_BYTES;
            stamp_sector(&mut image[at..at + STAMP_SECTOR_BYTES], b, s as u64, 0);
        }
    }
    for number in 0..=world.params.generations {
        image = generation(&world, number, image, &mut rng).await;
    }
    world.phase("finished (the executor is ending)");
    let mut totals = world.totals().clone();
    totals.ops = world.ops_done.get();
    (totals, world.digest.get())
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[test]
fn the_engine_survives_faults_and_crashes_for_many_seeds() {
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
    let started = Instant::now();
    let (totals, threads) = runner::run_many(&seeds);
    eprintln!(
        "sim_engine: {} seeds in {:.1?} on {threads} threads: {}",
        seeds.len(),
        started.elapsed(),
        totals.report()
    );
    let ends = totals.crashes_total() + totals.shutdown_ends;
    assert!(ends >= seeds.len() as u64 * 3, "every seed ends at least three generations");
}

/// The same seed gives the same run, operation for operation: what makes `SEED=<n>` a replay.
#[test]
fn a_seed_replays_exactly() {
    if std::env::var("SEED").is_ok() {
        return;
    }
    let mut runner = SeedRunner::default();
    for seed in [7u64, 1234] {
        let first = run_seed(seed).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let second = run_seed(seed).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert_eq!(first.1, second.1, "seed {seed} ran differently twice");
        assert_eq!(first.0.ops, second.0.ops);
        // On an executor that ran other seeds before (as the many-seed runner does).
        let reused = runner.run(seed).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert_eq!(first.1, reused.1, "seed {seed} ran differently after other seeds");
    }
}
