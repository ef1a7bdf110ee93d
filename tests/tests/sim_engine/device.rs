//! The device under every shard: a `SimDevice` wrapped to keep a ledger of the faults it
//! injects and to crash the machine at a chosen device call.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::rc::Rc;

use corebuf::io::{Device, IoBuf, SimBuf, SimDevice};
use corebuf::{Error, IoOp, Result};

use crate::BS;

/// Where a crash landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// After the generation's N-th operation, no barrier in flight.
    AfterOps,
    /// After the N-th operation, while a global barrier was in flight.
    AfterOpsInBarrier,
    /// At the k-th device write, no barrier in flight (eviction, `write_dirty_async`, a
    /// shard-local `write_dirty`).
    WriteAt,
    /// At the k-th device write, while a global barrier was in flight (mid write-back).
    WriteAtInBarrier,
    /// At the k-th device flush, before it runs, called by a global barrier: between its
    /// write-back and device-flush phases.
    FlushInBarrier,
    /// At the k-th device flush, before it runs, from a shard-local `write_dirty`.
    FlushLocal,
    /// Right after a global barrier returned `Ok` to its caller.
    AfterBarrierOk,
    /// At a device write or flush during `LocalEngine::shutdown`.
    InShutdown,
}

impl Place {
    pub const ALL: [Place; 8] = [
        Place::AfterOps,
        Place::AfterOpsInBarrier,
        Place::WriteAt,
        Place::WriteAtInBarrier,
        Place::FlushInBarrier,
        Place::FlushLocal,
        Place::AfterBarrierOk,
        Place::InShutdown,
    ];

    pub fn index(self) -> usize {
        Place::ALL.iter().position(|&p| p == self).expect("listed")
    }
}

/// What the device did that the checker needs: faults by kind, and the blocks whose last
/// write failed (the cache must keep reporting those until rewritten or forgotten), with the
/// clock tick when each entered that state; and when each last left it.
#[derive(Debug, Default)]
pub struct Ledger {
    pub read_faults: u64,
    /// Every failed write, the bad blocks' included.
    pub write_faults: u64,
    /// Those of single blocks: a failed write of a run of adjacent blocks (a flush writes
    /// those as one) is written again block by block, and those writes are the blocks' outcome.
    pub write_fault_blocks: u64,
    /// Writes that failed because their block is bad (the `SimDevice` does not count them).
    pub bad_block_faults: u64,
    pub flush_faults: u64,
    pub failed_since: BTreeMap<u64, u64>,
    pub resolved_at: HashMap<u64, u64>,
}

impl Ledger {
    /// Whether `block` had a failed, unresolved write at some tick from `since` on.
    pub fn failed_during(&self, block: u64, since: u64) -> bool {
        self.failed_since.contains_key(&block)
            || self.resolved_at.get(&block).is_some_and(|&at| at >= since)
    }

    pub fn resolve(&mut self, block: u64, now: u64) {
        if self.failed_since.remove(&block).is_some() {
            self.resolved_at.insert(block, now);
        }
    }
}

/// A block's claims: the simulation lets one modifier at a time at a block (so its states
/// form a sequence, see `model.rs`), and keeps routed writes away from long borrows.
#[derive(Clone, Copy, Debug, Default)]
pub struct Claim {
    /// A routed whole-block write is in flight.
    routed_write: bool,
    /// A read-modify-write (in a job, in place) or a forget is running.
    modifier: bool,
    /// Jobs holding a borrow of the block's bytes across yields.
    borrows: u32,
}

#[derive(Clone, Copy, Debug)]
pub enum ClaimKind {
    RoutedWrite,
    Modifier,
    Borrow,
}

/// A claim on a block, given back on drop.
#[derive(Debug)]
pub struct ClaimGuard {
    probe: Rc<Probe>,
    block: u64,
    kind: ClaimKind,
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        self.probe.release(self.block, self.kind);
    }
}

/// The state one generation shares between its device handles, its workers and the
/// controller.
#[derive(Debug)]
pub struct Probe {
    pub sim: SimDevice,
    pub ledger: RefCell<Ledger>,
    /// A tick per device completion and per operation start: orders events for the ledger.
    clock: Cell<u64>,
    /// The model describes this generation (false from the crash on).
    pub alive: Cell<bool>,
    crash_seed: u64,
    pub crashed: RefCell<Option<(Place, Vec<u8>)>>,
    writes: Cell<u64>,
    flushes: Cell<u64>,
    pub crash_at_write: Cell<Option<u64>>,
    pub crash_at_flush: Cell<Option<u64>>,
    pub barriers_in_flight: Cell<u32>,
    pub local_flushes_in_flight: Cell<u32>,
    pub shutting_down: Cell<bool>,
    /// Blocks every write of which fails until the device heals: a persistent error (a bad
    /// region, a full file system), which a barrier must keep reporting, never retry forever.
    pub bad_blocks: RefCell<BTreeSet<u64>>,
    claims: RefCell<HashMap<u64, Claim>>,
}

impl Probe {
    pub fn new(sim: SimDevice, crash_seed: u64) -> Rc<Probe> {
        Rc::new(Probe {
            sim,
            ledger: RefCell::default(),
            clock: Cell::new(0),
            alive: Cell::new(true),
            crash_seed,
            crashed: RefCell::new(None),
            writes: Cell::new(0),
            flushes: Cell::new(0),
            crash_at_write: Cell::new(None),
            crash_at_flush: Cell::new(None),
            barriers_in_flight: Cell::new(0),
            local_flushes_in_flight: Cell::new(0),
            shutting_down: Cell::new(false),
            bad_blocks: RefCell::default(),
            claims: RefCell::default(),
        })
    }

    pub fn tick(&self) -> u64 {
        self.clock.set(self.clock.get() + 1);
        self.clock.get()
    }

    /// Power fails now: the medium keeps what was flushed and a seeded subset of the rest.
    /// Only the first crash of a generation counts.
    pub fn crash(&self, place: Place) {
        if self.alive.replace(false) {
            let image = self.sim.crash(self.crash_seed);
            *self.crashed.borrow_mut() = Some((place, image));
        }
    }

    /// No more faults from now on.
    pub fn heal(&self) {
        self.sim.set_faults(0.0, 0.0, 0.0);
        self.bad_blocks.borrow_mut().clear();
    }

    /// Device writes and flushes called so far (the crash triggers count these).
    pub fn calls(&self) -> (u64, u64) {
        (self.writes.get(), self.flushes.get())
    }

    fn in_barrier(&self) -> bool {
        self.barriers_in_flight.get() > 0
    }

    fn before_write(&self) {
        self.writes.set(self.writes.get() + 1);
        if self.crash_at_write.get() == Some(self.writes.get()) {
            let place = match (self.shutting_down.get(), self.in_barrier()) {
                (true, _) => Place::InShutdown,
                (false, true) => Place::WriteAtInBarrier,
                (false, false) => Place::WriteAt,
            };
            self.crash(place);
        }
    }

    fn before_flush(&self) {
        self.flushes.set(self.flushes.get() + 1);
        if self.crash_at_flush.get() == Some(self.flushes.get()) {
            let local = self.local_flushes_in_flight.get() > 0;
            let place = match (self.shutting_down.get(), self.in_barrier() && !local) {
                (true, _) => Place::InShutdown,
                (false, true) => Place::FlushInBarrier,
                (false, false) => Place::FlushLocal,
            };
            self.crash(place);
        }
    }

    /// Claims `block` for a routed write: false if another writer or a modifier holds it. A
    /// borrow does not stop it: the owner waits for the borrow to end before it writes (the
    /// bug `regression_routed_write_on_borrowed_buffer` pins down), so the borrower keeps
    /// seeing the bytes the model expects.
    fn claim_routed_write(&self, block: u64) -> bool {
        let mut claims = self.claims.borrow_mut();
        let claim = claims.entry(block).or_default();
        let free = !claim.routed_write && !claim.modifier;
        claim.routed_write |= free;
        free
    }

    /// Claims `block` for an in-place modification: false if another modifier holds it.
    fn claim_modifier(&self, block: u64) -> bool {
        let mut claims = self.claims.borrow_mut();
        let claim = claims.entry(block).or_default();
        let free = !claim.routed_write && !claim.modifier;
        claim.modifier |= free;
        free
    }

    /// Claims a borrow of `block` across yields: false while a routed write is in flight.
    fn claim_borrow(&self, block: u64) -> bool {
        let mut claims = self.claims.borrow_mut();
        let claim = claims.entry(block).or_default();
        let free = !claim.routed_write;
        claim.borrows += free as u32;
        free
    }

    fn release(&self, block: u64, kind: ClaimKind) {
        let mut claims = self.claims.borrow_mut();
        let claim = claims.get_mut(&block).expect("a released claim was taken");
        match kind {
            ClaimKind::RoutedWrite => claim.routed_write = false,
            ClaimKind::Modifier => claim.modifier = false,
            ClaimKind::Borrow => claim.borrows -= 1,
        }
    }

    /// Takes a claim of `kind` on `block`, released when the guard drops; `None` if busy.
    pub fn claim(self: &Rc<Self>, block: u64, kind: ClaimKind) -> Option<ClaimGuard> {
        let taken = match kind {
            ClaimKind::RoutedWrite => self.claim_routed_write(block),
            ClaimKind::Modifier => self.claim_modifier(block),
            ClaimKind::Borrow => self.claim_borrow(block),
        };
        taken.then(|| ClaimGuard { probe: Rc::clone(self), block, kind })
    }

    /// Whether anything holds a claim on a block of `blocks`.
    pub fn any_claimed(&self, blocks: std::ops::Range<u64>) -> bool {
        let claims = self.claims.borrow();
        blocks
            .into_iter()
            .any(|b| claims.get(&b).is_some_and(|c| c.routed_write || c.modifier || c.borrows > 0))
    }
}

pub fn expect_injected(error: &Error, op: IoOp) {
    let injected = matches!(error, Error::Io { op: o, source, .. }
        if *o == op && source.to_string().contains("injected"));
    assert!(injected, "the device returned an error it did not inject: {error:?}");
}

/// One shard's handle of the generation's device.
#[derive(Clone, Debug)]
pub struct LedgerDevice {
    pub probe: Rc<Probe>,
}

impl Device for LedgerDevice {
    type Buf = SimBuf;

    fn path(&self) -> &Path {
        self.probe.sim.path()
    }

    fn size_bytes(&self) -> u64 {
        self.probe.sim.size_bytes()
    }

    fn alignment_bytes(&self) -> u64 {
        self.probe.sim.alignment_bytes()
    }

    fn alloc_buf(&self, len: usize) -> SimBuf {
        self.probe.sim.alloc_buf(len)
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let result = self.probe.sim.read_at(offset, buf).await;
        self.probe.tick();
        if let Err(e) = &result {
            expect_injected(e, IoOp::Read);
            self.probe.ledger.borrow_mut().read_faults += 1;
        }
        result
    }

    async fn write_at(&self, offset: u64, buf: &SimBuf) -> Result<()> {
        self.probe.before_write();
        // A write covers one block, or a run of adjacent blocks (a flush writes those as one):
        // it fails if any of them is bad. A run that succeeds resolves its blocks; one that
        // fails is written again block by block, whose outcomes then count.
        let first = offset / BS as u64;
        let blocks = first..first + (buf.as_bytes().len() / BS) as u64;
        let bad = blocks.clone().any(|b| self.probe.bad_blocks.borrow().contains(&b));
        let result = if bad {
            futures_lite::future::yield_now().await;
            let source = std::io::Error::other("injected write fault: a bad block");
            Err(Error::io(IoOp::Write, self.path(), offset, source))
        } else {
            self.probe.sim.write_at(offset, buf).await
        };
        let now = self.probe.tick();
        let mut ledger = self.probe.ledger.borrow_mut();
        ledger.bad_block_faults += bad as u64;
        match &result {
            Ok(()) => blocks.for_each(|block| ledger.resolve(block, now)),
            Err(e) => {
                expect_injected(e, IoOp::Write);
                ledger.write_faults += 1;
                if blocks.end - blocks.start == 1 {
                    ledger.write_fault_blocks += 1;
                    ledger.failed_since.entry(first).or_insert(now);
                }
            }
        }
        result
    }

    async fn flush(&self) -> Result<()> {
        self.probe.before_flush();
        let result = self.probe.sim.flush().await;
        self.probe.tick();
        if let Err(e) = &result {
            expect_injected(e, IoOp::Flush);
            self.probe.ledger.borrow_mut().flush_faults += 1;
        }
        result
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.probe.sim.discard(offset, len).await
    }
}
