//! What a worker does: every operation goes through the engine from the worker's home shard,
//! as routed copies (`Shard::read` / `write`, `Client`), as jobs on the owner shard
//! (`run_on_owner` / `run_on`, for the partition-level operations), or as global barriers.

use std::future::Future;
use std::ops::Range;
use std::rc::Rc;

use corebuf::cache::BufRef;
use corebuf::Error;
use corebuf_shard::rng::SimRng;
use corebuf_tests::stamp_sector;
use futures_lite::future::yield_now;

use crate::device::{ClaimKind, LedgerDevice, Place};
use crate::{Gen, Sh, World, SECTORS, STAMP_SECTOR_BYTES};

/// What a worker does in one step.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// `Shard::read` from the home shard (a message when another shard owns the block).
    Read,
    /// `Client::read` (always a message).
    ClientRead,
    /// `Shard::write` of a whole block.
    Write,
    /// `Client::write`.
    ClientWrite,
    /// A job on the owner: read, check, rewrite a sector range in place.
    Rmw,
    /// A job on the owner: `get` (cache only).
    Get,
    /// A job on the owner: a long borrow of the bytes across yields.
    Peek,
    /// A job on a shard: pin several of its blocks in one session, hold them, rewrite one.
    MultiPin,
    /// A job on a shard: pin the session's bound, then one more (`PinLimit`).
    OverPin,
    /// `Shard::prefetch` of a span that may cross shards.
    Prefetch,
    /// `Client::prefetch`.
    ClientPrefetch,
    /// `Shard::flush`, the global barrier, coordinated by the home shard.
    Barrier,
    /// `Client::flush`, the global barrier, coordinated by shard 0.
    ClientBarrier,
    /// A job on a shard: its partition's own `write_dirty`.
    LocalWriteDirty,
    /// A job on a shard: `write_dirty_async`.
    WriteDirtyAsync,
    /// A job on a shard: `forget_range` (drops failed data too).
    Forget,
    Idle,
}

impl Op {
    /// The operation mix, out of 100.
    pub fn pick(rng: &mut SimRng) -> Op {
        match rng.below(100) {
            0..=14 => Op::Read,
            15..=19 => Op::ClientRead,
            20..=31 => Op::Write,
            32..=35 => Op::ClientWrite,
            36..=47 => Op::Rmw,
            48..=54 => Op::Get,
            55..=61 => Op::Peek,
            62..=66 => Op::MultiPin,
            67 => Op::OverPin,
            68..=73 => Op::Prefetch,
            74..=75 => Op::ClientPrefetch,
            76..=81 => Op::Barrier,
            82..=84 => Op::ClientBarrier,
            85..=87 => Op::LocalWriteDirty,
            88..=89 => Op::WriteDirtyAsync,
            _ => Op::Forget,
        }
    }

    pub fn code(self) -> u64 {
        self as u64
    }
}

/// Outcomes, for the digest.
const SKIPPED: u64 = 0;
const OK: u64 = 1;
const FAILED: u64 = 2;
const BUSY: u64 = 3;
const REFUSED: u64 = 4;

/// Carries the simulation's `Rc`s into a job, which `run_on` requires to be `Send`.
struct AssertSend<T>(T);

// SAFETY: a `LocalEngine` hosts every shard as tasks on the one executor thread that runs the
// whole simulation, so a job "sent" to another shard runs on this same thread: the `Rc`s it
// carries are never touched by two threads.
unsafe impl<T> Send for AssertSend<T> {}

impl<T> AssertSend<T> {
    /// Takes the value out (a method, so that closures capture the whole wrapper).
    fn into_inner(self) -> T {
        self.0
    }
}

/// Where a job runs.
#[derive(Clone, Copy)]
enum At {
    Owner(u64),
    Shard(usize),
}

/// Runs `f` as a job on a shard, sent from `from`. The job first yields a seeded number of
/// times: messages and jobs are then handled in a seeded order (the engine has no such hook).
async fn job<F, Fut>(world: &Rc<World>, gen: &Rc<Gen>, from: &Sh, at: At, seed: u64, f: F) -> u64
where
    F: FnOnce(Rc<World>, Rc<Gen>, Rc<Sh>, SimRng) -> Fut + 'static,
    Fut: Future<Output = u64> + 'static,
{
    world.totals().jobs += 1;
    let carried = AssertSend((Rc::clone(world), Rc::clone(gen), f));
    let delay_max = world.params.delivery_yields_max;
    let run = move |shard: Rc<Sh>| {
        let (world, gen, f) = carried.into_inner();
        async move {
            let mut rng = SimRng::new(seed);
            for _ in 0..rng.below(delay_max + 1) {
                yield_now().await;
            }
            f(world, gen, shard, rng).await
        }
    };
    let result = match at {
        At::Owner(block) => from.run_on_owner(block, run).await,
        At::Shard(shard) => from.run_on(shard, run).await,
    };
    match result {
        Ok(outcome) => outcome,
        Err(e) => {
            world.refused(gen, &e);
            REFUSED
        }
    }
}

/// One step of a worker on `home`: returns its outcome.
pub async fn run(world: &Rc<World>, gen: &Rc<Gen>, home: &Sh, op: Op, rng: &mut SimRng) -> u64 {
    let seed = rng.next_u64();
    match op {
        Op::Read | Op::ClientRead => {
            let block = world.pick_block(rng);
            read(world, gen, home, block, matches!(op, Op::ClientRead)).await
        }
        Op::Write | Op::ClientWrite => {
            let block = world.pick_block(rng);
            write(world, gen, home, block, matches!(op, Op::ClientWrite)).await
        }
        Op::Rmw => rmw(world, gen, home, world.pick_block(rng), seed).await,
        Op::Get | Op::Peek => {
            let block = world.pick_block(rng);
            let f = move |w, g, s, r| peek(w, g, s, r, block, matches!(op, Op::Peek));
            job(world, gen, home, At::Owner(block), seed, f).await
        }
        Op::MultiPin | Op::OverPin => {
            let p = world.pick_shard(rng);
            let over = matches!(op, Op::OverPin);
            let f = move |w, g, s, r| multi_pin(w, g, s, r, over);
            job(world, gen, home, At::Shard(p), seed, f).await
        }
        Op::Prefetch | Op::ClientPrefetch => {
            prefetch(world, gen, home, rng, matches!(op, Op::ClientPrefetch)).await
        }
        Op::Barrier | Op::ClientBarrier => {
            barrier(world, gen, home, rng, matches!(op, Op::ClientBarrier)).await
        }
        Op::LocalWriteDirty => {
            let p = rng.below(world.params.shards as u64) as usize;
            job(world, gen, home, At::Shard(p), seed, local_write_dirty).await
        }
        Op::WriteDirtyAsync => {
            let p = rng.below(world.params.shards as u64) as usize;
            let f = |_, _, shard: Rc<Sh>, _| async move {
                shard.partition().write_dirty_async();
                OK
            };
            job(world, gen, home, At::Shard(p), seed, f).await
        }
        Op::Forget => {
            let p = world.pick_shard(rng);
            job(world, gen, home, At::Shard(p), seed, forget).await
        }
        Op::Idle => unreachable!("never picked"),
    }
}

/// A routed read (a copy of the block through its owner), checked against every state the
/// block went through while the read was in flight.
async fn read(world: &Rc<World>, gen: &Rc<Gen>, home: &Sh, block: u64, client: bool) -> u64 {
    let lo = world.model(gen).map(|mut model| model.read_begin(block));
    let start = gen.probe.tick();
    let result = if client { gen.client.read(block).await } else { home.read(block).await };
    match result {
        Ok(data) => {
            if let (Some(lo), Some(mut model)) = (lo, world.model(gen)) {
                if let Err(e) = model.read_end(block, lo, &data) {
                    world.fail(e);
                }
            }
            OK
        }
        Err(e) => {
            if let (Some(lo), Some(mut model)) = (lo, world.model(gen)) {
                model.read_cancel(block, lo);
            }
            world.account(gen, block, true, start, &e);
            FAILED
        }
    }
}

/// A routed whole-block write. The model records it as pending from the send and committed
/// when it returns: the moment the owner lands it is not observable.
async fn write(world: &Rc<World>, gen: &Rc<Gen>, home: &Sh, block: u64, client: bool) -> u64 {
    let Some(_claim) = gen.probe.claim(block, ClaimKind::RoutedWrite) else {
        world.totals().busy_skips += 1;
        return BUSY;
    };
    let Some(version) = world.model(gen).map(|mut model| model.write_send(block)) else {
        return SKIPPED;
    };
    let mut data = vec![0u8; crate::BS];
    for (s, sector) in data.chunks_exact_mut(STAMP_SECTOR_BYTES).enumerate() {
        stamp_sector(sector, block, s as u64, version);
    }
    let start = gen.probe.tick();
    let result =
        if client { gen.client.write(block, &data).await } else { home.write(block, &data).await };
    if let Some(mut model) = world.model(gen) {
        model.write_done(block, version, result.is_ok());
    }
    match result {
        Ok(()) => OK,
        Err(e) => {
            world.account(gen, block, false, start, &e);
            FAILED
        }
    }
}

/// Read-modify-write of a sector range, in place, in a job on the owner.
async fn rmw(world: &Rc<World>, gen: &Rc<Gen>, home: &Sh, block: u64, seed: u64) -> u64 {
    let Some(claim) = gen.probe.claim(block, ClaimKind::Modifier) else {
        world.totals().busy_skips += 1;
        return BUSY;
    };
    let start = gen.probe.tick();
    let f = move |world: Rc<World>, gen: Rc<Gen>, shard: Rc<Sh>, mut rng: SimRng| async move {
        let session = shard.partition().session().await;
        let outcome = match session.read(block).await {
            Ok(buf) => {
                world.check_live(&gen, block, &buf.data());
                let first = rng.below(SECTORS as u64) as usize;
                let end = first + 1 + rng.below((SECTORS - first) as u64) as usize;
                if modify(&world, &gen, &buf, first..end) {
                    OK
                } else {
                    BUSY
                }
            }
            Err(e) => {
                world.account(&gen, block, true, start, &e);
                FAILED
            }
        };
        outcome
    };
    let outcome = job(world, gen, home, At::Owner(block), seed, f).await;
    drop(claim);
    outcome
}

/// Rewrites `sectors` of a pinned buffer, whose block the caller has claimed as a modifier,
/// with a new version, and marks that byte range dirty. False if the bytes are borrowed
/// elsewhere (or the generation is over).
fn modify(world: &World, gen: &Gen, buf: &BufRef<'_, LedgerDevice>, sectors: Range<usize>) -> bool {
    let block = buf.block();
    let Some(mut model) = world.model(gen) else { return false };
    let Ok(mut data) = buf.try_data_mut() else {
        world.totals().busy_skips += 1;
        return false;
    };
    let version = model.modify_now(block, sectors.clone());
    drop(model);
    for s in sectors.clone() {
        let sector = &mut data[s * STAMP_SECTOR_BYTES..(s + 1) * STAMP_SECTOR_BYTES];
        stamp_sector(sector, block, s as u64, version);
    }
    drop(data);
    buf.mark_dirty_range(sectors.start * STAMP_SECTOR_BYTES..sectors.end * STAMP_SECTOR_BYTES);
    true
}

/// `get` (`long` false) or a read whose bytes stay borrowed across yields (`long`), on the
/// owner.
async fn peek(
    world: Rc<World>,
    gen: Rc<Gen>,
    shard: Rc<Sh>,
    mut rng: SimRng,
    block: u64,
    long: bool,
) -> u64 {
    let start = gen.probe.tick();
    let session = shard.partition().session().await;
    if !long {
        return match session.get(block) {
            Some(buf) => {
                world.check_live(&gen, block, &buf.data());
                OK
            }
            None => SKIPPED,
        };
    }
    let buf = match session.read(block).await {
        Ok(buf) => buf,
        Err(e) => {
            world.account(&gen, block, true, start, &e);
            return FAILED;
        }
    };
    // The engine's write handler takes the bytes mutably without waiting (`data_mut`): a
    // routed write landing on a borrowed buffer would panic the owner shard. Keep them apart.
    let Some(_claim) = gen.probe.claim(block, ClaimKind::Borrow) else {
        world.check_live(&gen, block, &buf.data());
        world.totals().busy_skips += 1;
        return BUSY;
    };
    // Writers see BufferBusy, write-back snapshots wait, and the bytes stay what the model says.
    let data = buf.data();
    world.check_live(&gen, block, &data);
    for _ in 0..rng.below(6) {
        yield_now().await;
    }
    world.check_live(&gen, block, &data);
    OK
}

/// Pins up to `pins` blocks of the shard in one session, holds them across yields, and
/// rewrites part of one. With `over`, asks for one more and expects `PinLimit`.
async fn multi_pin(
    world: Rc<World>,
    gen: Rc<Gen>,
    shard: Rc<Sh>,
    mut rng: SimRng,
    over: bool,
) -> u64 {
    let p = shard.id();
    let pins = world.params.pins;
    let count = if over { pins } else { 1 + rng.below(pins as u64) as usize };
    let start = gen.probe.tick();
    let session = shard.partition().session().await;
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        let block = world.pick_owned(p, &mut rng);
        match session.read(block).await {
            Ok(buf) => {
                world.check_live(&gen, block, &buf.data());
                held.push(buf);
            }
            Err(e) => {
                world.account(&gen, block, true, start, &e);
                return FAILED;
            }
        }
    }
    if over {
        let block = world.pick_owned(p, &mut rng);
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
    let block = held[at].block();
    // The block may have moved on while we yielded (a routed write landed): check again.
    world.check_live(&gen, block, &held[at].data());
    let Some(_claim) = gen.probe.claim(block, ClaimKind::Modifier) else {
        world.totals().busy_skips += 1;
        return BUSY;
    };
    world.check_live(&gen, block, &held[at].data());
    let first = rng.below(SECTORS as u64) as usize;
    if modify(&world, &gen, &held[at], first..first + 1) {
        OK
    } else {
        BUSY
    }
}

/// Starts reads of a span that may cross shards, split by owner by the engine.
async fn prefetch(world: &World, gen: &Gen, home: &Sh, rng: &mut SimRng, client: bool) -> u64 {
    let blocks = world.params.device_blocks;
    let first = rng.below(blocks);
    let count = (1 + rng.below(3 * world.params.range_blocks)).min(blocks - first);
    world.totals().prefetches += 1;
    let result =
        if client { gen.client.prefetch(first, count).await } else { home.prefetch(first, count) };
    match result {
        Ok(()) => OK,
        Err(e) => {
            world.refused(gen, &e);
            REFUSED
        }
    }
}

/// The global barrier. When it returns `Ok`, everything committed when it was called is
/// durable, and no block can have had an unresolved failed write for the whole barrier.
async fn barrier(
    world: &Rc<World>,
    gen: &Rc<Gen>,
    home: &Sh,
    rng: &mut SimRng,
    client: bool,
) -> u64 {
    let snapshot = world.model(gen).map(|model| model.snapshot(|_| true));
    let probe = &gen.probe;
    let start = probe.tick();
    probe.barriers_in_flight.set(probe.barriers_in_flight.get() + 1);
    let result = if client { gen.client.flush().await } else { home.flush().await };
    probe.barriers_in_flight.set(probe.barriers_in_flight.get() - 1);
    match result {
        Ok(()) => {
            world.check_no_error_lost(gen, start, "a global barrier", |_| true);
            if let (Some(snapshot), Some(mut model)) = (snapshot, world.model(gen)) {
                model.advance_floor(&snapshot);
            }
            world.totals().barriers_ok += 1;
            if rng.chance(gen.crash_after_barrier_probability) {
                probe.crash(Place::AfterBarrierOk);
            }
            OK
        }
        Err(e) => {
            if world.barrier_failed(gen, start, &e) {
                world.totals().barriers_failed += 1;
                FAILED
            } else {
                REFUSED
            }
        }
    }
}

/// The shard's own `write_dirty`: when it succeeds, that shard's blocks are durable.
async fn local_write_dirty(world: Rc<World>, gen: Rc<Gen>, shard: Rc<Sh>, _: SimRng) -> u64 {
    let p = shard.id();
    let snapshot = world.model(&gen).map(|model| model.snapshot(|b| world.owner(b) == p));
    let probe = &gen.probe;
    let start = probe.tick();
    probe.local_flushes_in_flight.set(probe.local_flushes_in_flight.get() + 1);
    let result = shard.partition().write_dirty().await;
    probe.local_flushes_in_flight.set(probe.local_flushes_in_flight.get() - 1);
    match result {
        Ok(()) => {
            let what = format!("shard {p}'s write_dirty");
            world.check_no_error_lost(&gen, start, &what, |b| world.owner(b) == p);
            if let (Some(snapshot), Some(mut model)) = (snapshot, world.model(&gen)) {
                model.advance_floor(&snapshot);
            }
            OK
        }
        Err(e) => {
            world.barrier_failed(&gen, start, &e);
            FAILED
        }
    }
}

/// `forget_range` on the shard. A block whose write failed is cached (the cache keeps the
/// data); if the forget drops it, the caller gave that data up and reads see the device again.
async fn forget(world: Rc<World>, gen: Rc<Gen>, shard: Rc<Sh>, mut rng: SimRng) -> u64 {
    let p = shard.id();
    let first = world.pick_owned(p, &mut rng);
    let count = (1 + rng.below(8)).min(world.params.device_blocks - first);
    let session = shard.partition().session().await;
    // From here on nothing yields: the claims checked are the claims that hold.
    if gen.probe.any_claimed(first..first + count) {
        world.totals().busy_skips += 1;
        return BUSY;
    }
    let failed: Vec<u64> = gen
        .probe
        .ledger
        .borrow()
        .failed_since
        .range(first..first + count)
        .map(|(&b, _)| b)
        .filter(|&b| world.owner(b) == p)
        .collect();
    for &b in &failed {
        if session.get(b).is_none() {
            world.fail(format!("block {b}'s last write failed but its data is not cached (lost)"));
        }
    }
    shard.partition().forget_range(first, count);
    let mut dropped = 0;
    for &b in &failed {
        if session.get(b).is_none() {
            dropped += 1;
            let now = gen.probe.tick();
            gen.probe.ledger.borrow_mut().resolve(b, now);
            if let Some(mut model) = world.model(&gen) {
                model.relax(b);
            }
        }
    }
    world.totals().forgotten_failed += dropped;
    dropped
}
