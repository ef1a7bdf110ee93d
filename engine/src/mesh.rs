//! The message layer: how a shard reaches another shard, and how a [`Client`](crate::Client)
//! reaches a shard.
//!
//! Shard to shard, every ordered pair has two single-producer rings ([`Ring`]): requests one
//! way, replies the other. A request carries a pointer to a buffer owned by the requester's
//! pending slot, so a read or a write moves its block with one copy and no allocation. Each
//! shard runs one poller task that, at every turn of its executor, drains its incoming request
//! rings, its reply rings and its client ingress in batches. A request that hits the cache is
//! served inline by the poller; only one that must wait (a miss, the pin limit, a barrier, a
//! job) gets a task. Clients push into a per-shard multi-producer queue and get their answer
//! through a shared call slot that wakes their future from the shard's thread.
//!
//! Invariants:
//! 1. Credits: a shard has at most `credits` requests that expect a reply in flight to each
//!    peer, so the reply ring (capacity `credits`) never overflows and a reply push cannot
//!    fail. Prefetches expect no reply and enter a request ring only while it has room beyond
//!    `credits`, so a credited request push cannot fail either.
//! 2. A pending slot's buffer stays allocated and untouched by the requester from the push of
//!    its request until the poller pops the reply, even if the requesting future is dropped
//!    (the slot is then abandoned and freed when the reply comes).
//! 3. Waking: a poller about to sleep registers its waker, sets `sleeping`, fences, and checks
//!    for work once more; a producer pushes, fences, and wakes the poller only if `sleeping`
//!    was set. One of the two always sees the other (Dekker), so no wake-up is lost, and a
//!    busy peer is never woken.
//! 4. Shutdown: a sender raises its per-pair `sending` count, then checks `closing`, then
//!    pushes and lowers the count; a poller exits only when `closing` is set, no peer is
//!    sending to it, its rings and ingress are empty, no handler task of its is running and
//!    none of its own requests waits for a reply. Every request is therefore either served or
//!    refused with `ShutDown`; none hangs.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use concurrent_queue::{ConcurrentQueue, PushError};
use corebuf_shard::io::Device;
use corebuf_shard::rng::SimRng;
use corebuf_shard::WaitList;
use crossbeam_utils::CachePadded;

use crate::ring::Ring;
use crate::shard::Shard;
use crate::stats::ShardStats;
use crate::{Error, Result};

/// A closure run on a shard, with its boxed answer.
pub(crate) type Job<D> =
    Box<dyn FnOnce(Rc<Shard<D>>) -> Pin<Box<dyn Future<Output = Answer>>> + Send>;

/// A job's result, type-erased for the trip back.
pub(crate) type Answer = Box<dyn Any + Send>;

/// What a shard or a client asks a shard to do.
pub(crate) enum Op<D: Device + 'static> {
    /// Copy `block`'s data into the request's buffer.
    Read { block: u64 },
    /// Copy the request's buffer into `block` (a whole-block write, dirty in cache).
    Write { block: u64 },
    /// Start reads of `block..block + count`; no reply.
    Prefetch { block: u64, count: u64 },
    /// The first phase of the global barrier: write back this shard's dirty buffers.
    WriteBack,
    /// A whole global barrier, coordinated by the receiving shard.
    Barrier,
    /// The shard's statistics.
    Stats,
    /// Run a closure on the shard.
    Run(Job<D>),
}

impl<D: Device + 'static> Op<D> {
    fn expects_reply(&self) -> bool {
        !matches!(self, Op::Prefetch { .. })
    }
}

/// What comes back.
pub(crate) enum Payload {
    Done,
    Stats(Box<ShardStats>),
    Run(Answer),
}

/// The requester's slot buffer, block-sized (invariant 2 keeps it alive and unshared).
#[derive(Clone, Copy)]
struct BufPtr(*mut u8);

// SAFETY: the pointer is only dereferenced by the owner shard while the requester leaves the
// buffer alone (invariant 2): ownership of the bytes moves with the request and back with the
// reply.
unsafe impl Send for BufPtr {}

/// A request on a shard-to-shard ring.
struct Request<D: Device + 'static> {
    /// The requester's pending slot, or [`NO_SLOT`] when no reply is expected.
    slot: u32,
    op: Op<D>,
    buf: BufPtr,
}

const NO_SLOT: u32 = u32::MAX;

/// A reply on a shard-to-shard ring.
struct Reply {
    slot: u32,
    result: Result<Payload>,
}

/// A client's request on a shard's ingress queue.
struct ClientRequest<D: Device + 'static> {
    op: Op<D>,
    call: Option<Responder>,
}

/// The owner's duty to answer a client call: dropped unanswered (its shard died with the
/// request queued or in a task), it answers `ShardFailed`, so no client waits forever.
struct Responder {
    call: Arc<ClientCall>,
    shard: usize,
    answered: bool,
}

impl Responder {
    fn answer(mut self, result: Result<Payload>) {
        self.answered = true;
        self.call.complete(result);
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if !self.answered {
            self.call.complete(Err(Error::ShardFailed { shard: self.shard }));
        }
    }
}

/// Where a shard puts a client's answer, and the client's waker.
#[derive(Debug, Default)]
pub(crate) struct ClientCall {
    state: Mutex<CallState>,
}

#[derive(Default)]
struct CallState {
    result: Option<Result<Payload>>,
    /// The block's bytes: the client's data for a write, the answer's for a read.
    data: Vec<u8>,
    waker: Option<Waker>,
}

impl std::fmt::Debug for CallState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallState").field("done", &self.result.is_some()).finish_non_exhaustive()
    }
}

impl ClientCall {
    fn complete(&self, result: Result<Payload>) {
        let waker = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.result = Some(result);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// A shard's doorbell: how producers wake its poller when, and only when, it sleeps.
#[derive(Debug, Default)]
struct Doorbell {
    sleeping: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Doorbell {
    /// Called after a push (invariant 3). True if the poller was asleep and is now woken.
    fn ring(&self) -> bool {
        fence(Ordering::SeqCst);
        if !self.sleeping.load(Ordering::Relaxed) || !self.sleeping.swap(false, Ordering::AcqRel) {
            return false;
        }
        let waker = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(waker) = waker {
            waker.wake();
        }
        true
    }
}

/// Settings of the message layer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MeshConfig {
    /// Requests expecting a reply in flight from one shard to another.
    pub(crate) credits: usize,
    /// Capacity of each shard's client ingress queue.
    pub(crate) ingress_capacity: usize,
    /// Client requests a shard serves in tasks at once.
    pub(crate) client_handlers_max: usize,
    /// How long a poller keeps polling after its last work before it sleeps.
    pub(crate) poll_before_sleep: Duration,
    /// Seeded delivery order (a simulated engine): which source is drained first, how much
    /// of it, and yields in between.
    pub(crate) delivery_seed: Option<u64>,
    /// Messages drained from one source in one turn.
    pub(crate) batch_max: usize,
}

/// Everything the shards and clients of one engine share: rings, ingress queues, doorbells.
pub(crate) struct Mesh<D: Device + 'static> {
    shards: usize,
    config: MeshConfig,
    /// `from * shards + to`.
    requests: Box<[Ring<Request<D>>]>,
    /// `owner * shards + requester`.
    replies: Box<[Ring<Reply>]>,
    /// `from * shards + to`: senders between raising their count and pushing (invariant 4).
    sending: Box<[CachePadded<AtomicUsize>]>,
    ingress: Box<[ConcurrentQueue<ClientRequest<D>>]>,
    /// Notified when a shard drained its ingress (clients waiting for room listen).
    ingress_room: Box<[event_listener::Event]>,
    doorbells: Box<[CachePadded<Doorbell>]>,
    closing: AtomicBool,
    /// Shards whose thread died (a panic): their requests fail with `ShardFailed`.
    dead: Box<[AtomicBool]>,
    dead_count: AtomicUsize,
}

impl<D: Device + 'static> std::fmt::Debug for Mesh<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("shards", &self.shards)
            .field("closing", &self.closing.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<D: Device + 'static> Mesh<D> {
    pub(crate) fn new(shards: usize, config: MeshConfig) -> Arc<Mesh<D>> {
        let pairs = shards * shards;
        // Room for every credited request plus as many prefetches (invariant 1).
        let request_capacity = (2 * config.credits).next_power_of_two();
        Arc::new(Mesh {
            shards,
            config,
            requests: (0..pairs).map(|_| Ring::new(request_capacity)).collect(),
            replies: (0..pairs).map(|_| Ring::new(config.credits)).collect(),
            sending: (0..pairs).map(|_| CachePadded::new(AtomicUsize::new(0))).collect(),
            ingress: (0..shards)
                .map(|_| ConcurrentQueue::bounded(config.ingress_capacity))
                .collect(),
            ingress_room: (0..shards).map(|_| event_listener::Event::new()).collect(),
            doorbells: (0..shards).map(|_| CachePadded::new(Doorbell::default())).collect(),
            closing: AtomicBool::new(false),
            dead: (0..shards).map(|_| AtomicBool::new(false)).collect(),
            dead_count: AtomicUsize::new(0),
        })
    }

    pub(crate) fn shards(&self) -> usize {
        self.shards
    }

    /// Stops taking requests: later sends fail with `ShutDown`; what was sent is served. Wakes
    /// every poller so it can finish.
    pub(crate) fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        for queue in self.ingress.iter() {
            queue.close();
        }
        for room in self.ingress_room.iter() {
            room.notify(usize::MAX);
        }
        for bell in self.doorbells.iter() {
            bell.ring();
        }
    }

    /// Shard `id`'s thread is dying: refuse its queued client requests (each answers
    /// `ShardFailed` as it drops) and wake every poller so requests waiting on it fail too.
    pub(crate) fn mark_dead(&self, id: usize) {
        if self.dead[id].swap(true, Ordering::SeqCst) {
            return;
        }
        self.dead_count.fetch_add(1, Ordering::SeqCst);
        self.ingress[id].close();
        while self.ingress[id].pop().is_ok() {}
        self.ingress_room[id].notify(usize::MAX);
        for bell in self.doorbells.iter() {
            bell.ring();
        }
    }

    fn is_dead(&self, id: usize) -> bool {
        self.dead[id].load(Ordering::SeqCst)
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Sends a client's request to shard `to`, waiting while its ingress is full.
    async fn client_push(&self, to: usize, mut request: ClientRequest<D>) -> Result<()> {
        loop {
            match self.ingress[to].push(request) {
                Ok(()) => {
                    self.doorbells[to].ring();
                    return Ok(());
                }
                Err(PushError::Closed(back)) => {
                    let shard_died = self.is_dead(to);
                    if let Some(mut responder) = back.call {
                        responder.answered = true; // the caller gets the error below instead
                    }
                    return Err(if shard_died {
                        Error::ShardFailed { shard: to }
                    } else {
                        Error::ShutDown
                    });
                }
                Err(PushError::Full(back)) => {
                    request = back;
                    let listener = self.ingress_room[to].listen();
                    if !self.ingress[to].is_full() || self.ingress[to].is_closed() {
                        continue;
                    }
                    listener.await;
                }
            }
        }
    }

    /// A client's call to shard `to`: `data` goes with a write and comes back with a read.
    pub(crate) async fn client_call(
        &self,
        to: usize,
        op: Op<D>,
        data: Vec<u8>,
    ) -> Result<(Payload, Vec<u8>)> {
        let call = Arc::new(ClientCall {
            state: Mutex::new(CallState { result: None, data, waker: None }),
        });
        let responder = Responder { call: Arc::clone(&call), shard: to, answered: false };
        self.client_push(to, ClientRequest { op, call: Some(responder) }).await?;
        std::future::poll_fn(|cx| {
            let mut state = call.state.lock().unwrap_or_else(|e| e.into_inner());
            match state.result.take() {
                Some(result) => {
                    let data = std::mem::take(&mut state.data);
                    Poll::Ready(result.map(|payload| (payload, data)))
                }
                None => {
                    if !state.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        state.waker = Some(cx.waker().clone());
                    }
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// A client's prefetch: sent if shard `to`'s ingress has room now, else skipped.
    pub(crate) fn client_prefetch(&self, to: usize, block: u64, count: u64) -> Result<()> {
        match self.ingress[to].push(ClientRequest { op: Op::Prefetch { block, count }, call: None })
        {
            Ok(()) => {
                self.doorbells[to].ring();
                Ok(())
            }
            Err(PushError::Closed(_)) if self.is_dead(to) => Err(Error::ShardFailed { shard: to }),
            Err(PushError::Closed(_)) => Err(Error::ShutDown),
            Err(PushError::Full(_)) => Ok(()),
        }
    }
}

/// A request this shard sent and whose reply it has not consumed.
struct Slot {
    state: SlotState,
    /// The shard the request went to.
    to: usize,
    waker: Option<Waker>,
    result: Option<Result<Payload>>,
    buf: Box<[u8]>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum SlotState {
    Free,
    /// Sent; the reply has not come.
    Waiting,
    /// Sent, and the requester went away: free it when the reply comes.
    Abandoned,
    /// The reply came; the requester has not taken it.
    Done,
}

/// Counters of one shard's message layer.
#[derive(Debug, Default)]
struct PortCounters {
    sent: Cell<u64>,
    received: Cell<u64>,
    inline: Cell<u64>,
    sleeps: Cell<u64>,
    wakeups_sent: Cell<u64>,
}

/// One shard's end of the mesh: its pending slots, credits, handler count and poller state.
pub(crate) struct Port<D: Device + 'static> {
    id: usize,
    mesh: Arc<Mesh<D>>,
    block_size: usize,
    slots: RefCell<Vec<Slot>>,
    free_slots: RefCell<Vec<u32>>,
    /// Slots not `Free`.
    slots_busy: Cell<usize>,
    /// Credited requests in flight, per peer (invariant 1).
    in_flight: Box<[Cell<usize>]>,
    credit_freed: WaitList,
    /// Handler tasks running for shard requests and for client requests.
    handlers: Cell<usize>,
    client_handlers: Cell<usize>,
    ingress_held_back: Cell<bool>,
    /// Dead peers this poller has reacted to.
    dead_seen: Cell<usize>,
    delivery: Option<RefCell<SimRng>>,
    counters: PortCounters,
}

impl<D: Device + 'static> std::fmt::Debug for Port<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Port").field("id", &self.id).finish_non_exhaustive()
    }
}

/// Message counters of a shard, for its statistics.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PortStats {
    pub(crate) sent: u64,
    pub(crate) received: u64,
    pub(crate) inline: u64,
    pub(crate) sleeps: u64,
    pub(crate) wakeups_sent: u64,
}

/// A reply this shard received, holding its slot (and the slot's buffer) until dropped.
pub(crate) struct Answered<'p, D: Device + 'static> {
    port: &'p Port<D>,
    slot: u32,
    payload: Option<Payload>,
}

impl<D: Device + 'static> Answered<'_, D> {
    /// The block's bytes the owner copied (a read).
    pub(crate) fn with_buf<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        let slots = self.port.slots.borrow();
        f(&slots[self.slot as usize].buf)
    }

    pub(crate) fn take_payload(&mut self) -> Payload {
        self.payload.take().unwrap_or(Payload::Done)
    }
}

impl<D: Device + 'static> Drop for Answered<'_, D> {
    fn drop(&mut self) {
        self.port.free_slot(self.slot);
    }
}

/// Marks the slot abandoned if the requesting future is dropped before its reply.
struct PendingGuard<'p, D: Device + 'static> {
    port: &'p Port<D>,
    slot: u32,
    armed: bool,
}

impl<D: Device + 'static> Drop for PendingGuard<'_, D> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let done = {
            let mut slots = self.port.slots.borrow_mut();
            let slot = &mut slots[self.slot as usize];
            match slot.state {
                SlotState::Done => true,
                _ => {
                    slot.state = SlotState::Abandoned;
                    slot.waker = None;
                    false
                }
            }
        };
        if done {
            self.port.free_slot(self.slot);
        }
    }
}

impl<D: Device + 'static> Port<D> {
    pub(crate) fn new(id: usize, mesh: Arc<Mesh<D>>, block_size: usize) -> Port<D> {
        let shards = mesh.shards;
        let delivery = mesh
            .config
            .delivery_seed
            .map(|seed| RefCell::new(SimRng::new(seed ^ (id as u64).wrapping_mul(0x9E37_79B9))));
        Port {
            id,
            mesh,
            block_size,
            slots: RefCell::new(Vec::new()),
            free_slots: RefCell::new(Vec::new()),
            slots_busy: Cell::new(0),
            in_flight: (0..shards).map(|_| Cell::new(0)).collect(),
            credit_freed: WaitList::with_capacity(4),
            handlers: Cell::new(0),
            client_handlers: Cell::new(0),
            ingress_held_back: Cell::new(false),
            dead_seen: Cell::new(0),
            delivery,
            counters: PortCounters::default(),
        }
    }

    pub(crate) fn stats(&self) -> PortStats {
        let c = &self.counters;
        PortStats {
            sent: c.sent.get(),
            received: c.received.get(),
            inline: c.inline.get(),
            sleeps: c.sleeps.get(),
            wakeups_sent: c.wakeups_sent.get(),
        }
    }

    fn alloc_slot(&self, to: usize) -> u32 {
        self.slots_busy.set(self.slots_busy.get() + 1);
        let mut slots = self.slots.borrow_mut();
        if let Some(index) = self.free_slots.borrow_mut().pop() {
            slots[index as usize].state = SlotState::Waiting;
            slots[index as usize].to = to;
            return index;
        }
        slots.push(Slot {
            state: SlotState::Waiting,
            to,
            waker: None,
            result: None,
            buf: vec![0u8; self.block_size].into_boxed_slice(),
        });
        (slots.len() - 1) as u32
    }

    fn free_slot(&self, index: u32) {
        let mut slots = self.slots.borrow_mut();
        let slot = &mut slots[index as usize];
        slot.state = SlotState::Free;
        slot.waker = None;
        slot.result = None;
        self.free_slots.borrow_mut().push(index);
        self.slots_busy.set(self.slots_busy.get() - 1);
    }

    /// Pushes a request to shard `to` under the shutdown protocol (invariant 4). `Ok(false)`
    /// if the ring was full (impossible for a credited request, by invariant 1).
    fn push(&self, to: usize, request: Request<D>) -> Result<bool> {
        let pair = self.id * self.mesh.shards + to;
        let sending = &self.mesh.sending[pair];
        sending.fetch_add(1, Ordering::SeqCst);
        if self.mesh.closing.load(Ordering::SeqCst) {
            sending.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::ShutDown);
        }
        let pushed = self.mesh.requests[pair].push(request);
        sending.fetch_sub(1, Ordering::SeqCst);
        if pushed.is_err() {
            return Ok(false);
        }
        self.counters.sent.set(self.counters.sent.get() + 1);
        if self.mesh.doorbells[to].ring() {
            self.counters.wakeups_sent.set(self.counters.wakeups_sent.get() + 1);
        }
        Ok(true)
    }

    /// Sends `op` to shard `to` and waits for its reply. `fill` writes the request's buffer
    /// (the data of a write). The answer holds the buffer (the data of a read).
    pub(crate) async fn call(
        &self,
        to: usize,
        op: Op<D>,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<Answered<'_, D>> {
        debug_assert!(op.expects_reply() && to != self.id);
        let credits = self.mesh.config.credits;
        if self.in_flight[to].get() >= credits {
            self.credit_freed.wait_for(|| (self.in_flight[to].get() < credits).then_some(())).await;
        }
        if self.mesh.is_dead(to) {
            return Err(Error::ShardFailed { shard: to });
        }
        let slot = self.alloc_slot(to);
        let buf = {
            let mut slots = self.slots.borrow_mut();
            fill(&mut slots[slot as usize].buf);
            BufPtr(slots[slot as usize].buf.as_mut_ptr())
        };
        match self.push(to, Request { slot, op, buf }) {
            Ok(true) => {}
            Ok(false) => unreachable!("a credited request always has room (invariant 1)"),
            Err(e) => {
                self.free_slot(slot);
                return Err(e);
            }
        }
        self.in_flight[to].set(self.in_flight[to].get() + 1);
        let mut guard = PendingGuard { port: self, slot, armed: true };
        let result = std::future::poll_fn(|cx| {
            let mut slots = self.slots.borrow_mut();
            let pending = &mut slots[slot as usize];
            if pending.state == SlotState::Done {
                return Poll::Ready(
                    pending.result.take().unwrap_or(Err(Error::ShardFailed { shard: to })),
                );
            }
            if self.mesh.is_dead(to) {
                return Poll::Ready(Err(Error::ShardFailed { shard: to }));
            }
            if !pending.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                pending.waker = Some(cx.waker().clone());
            }
            Poll::Pending
        })
        .await;
        guard.armed = false;
        match result {
            Ok(payload) => Ok(Answered { port: self, slot, payload: Some(payload) }),
            Err(e) => {
                self.free_slot(slot);
                Err(e)
            }
        }
    }

    /// Sends a prefetch to shard `to` if its ring has room beyond the credits; never waits.
    pub(crate) fn prefetch(&self, to: usize, block: u64, count: u64) -> Result<()> {
        let pair = self.id * self.mesh.shards + to;
        let ring = &self.mesh.requests[pair];
        if ring.len() + self.mesh.config.credits >= ring.capacity() {
            return Ok(()); // skipped under pressure, as prefetch may
        }
        let op = Op::Prefetch { block, count };
        self.push(to, Request { slot: NO_SLOT, op, buf: BufPtr(std::ptr::null_mut()) }).map(|_| ())
    }

    /// Whether anything waits in this shard's rings or ingress.
    fn has_work(&self) -> bool {
        let n = self.mesh.shards;
        let me = self.id;
        (0..n).any(|peer| {
            peer != me
                && (!self.mesh.requests[peer * n + me].is_empty()
                    || !self.mesh.replies[peer * n + me].is_empty())
        }) || (!self.ingress_held_back.get() && !self.mesh.ingress[me].is_empty())
    }

    /// Whether this shard may stop polling (invariant 4).
    fn may_exit(&self) -> bool {
        let n = self.mesh.shards;
        let me = self.id;
        if !self.mesh.closing.load(Ordering::SeqCst) {
            return false;
        }
        // Order matters: the `sending` counts first, then the rings (see invariant 4).
        let nobody_sending =
            (0..n).all(|peer| self.mesh.sending[peer * n + me].load(Ordering::SeqCst) == 0);
        nobody_sending
            && !self.has_work()
            && self.mesh.ingress[me].is_empty()
            && self.handlers.get() == 0
            && self.client_handlers.get() == 0
            && self.slots_busy_waiting() == 0
    }

    /// Slots still waiting for a reply from a live shard (taken answers do not keep the
    /// poller alive, nor do requests to a dead shard).
    fn slots_busy_waiting(&self) -> usize {
        let slots = self.slots.borrow();
        let waiting = |s: &&Slot| matches!(s.state, SlotState::Waiting | SlotState::Abandoned);
        slots.iter().filter(waiting).filter(|s| !self.mesh.is_dead(s.to)).count()
    }

    /// Wakes requesters waiting on a shard that died since the last look.
    fn notice_deaths(&self) {
        let dead = self.mesh.dead_count.load(Ordering::SeqCst);
        if dead == self.dead_seen.replace(dead) {
            return;
        }
        let mut slots = self.slots.borrow_mut();
        for slot in slots.iter_mut().filter(|s| self.mesh.is_dead(s.to)) {
            if let Some(waker) = slot.waker.take() {
                waker.wake();
            }
        }
    }

    /// Sleeps until a producer rings the doorbell (invariant 3). Returns at once if work
    /// arrived while it was getting ready to sleep.
    async fn sleep(&self) {
        let bell = &self.mesh.doorbells[self.id];
        let mut parked = false;
        std::future::poll_fn(|cx| {
            if parked {
                bell.sleeping.store(false, Ordering::SeqCst);
                return Poll::Ready(());
            }
            *bell.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
            bell.sleeping.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if self.has_work() || self.may_exit() {
                bell.sleeping.store(false, Ordering::SeqCst);
                return Poll::Ready(());
            }
            parked = true;
            self.counters.sleeps.set(self.counters.sleeps.get() + 1);
            Poll::Pending
        })
        .await
    }

    /// Wakes this shard's own poller (a handler ended while it may be waiting for that).
    fn nudge(&self) {
        self.mesh.doorbells[self.id].ring();
    }

    fn pick(&self, bound: u64) -> u64 {
        match &self.delivery {
            Some(rng) => rng.borrow_mut().below(bound.max(1)),
            None => 0,
        }
    }

    /// Pops replies from every peer and completes their slots.
    fn drain_replies(&self) -> usize {
        self.notice_deaths();
        let n = self.mesh.shards;
        let mut count = 0;
        for peer in (0..n).filter(|&p| p != self.id) {
            let ring = &self.mesh.replies[peer * n + self.id];
            while let Some(reply) = ring.pop() {
                count += 1;
                self.in_flight[peer].set(self.in_flight[peer].get() - 1);
                let abandoned = {
                    let mut slots = self.slots.borrow_mut();
                    let slot = &mut slots[reply.slot as usize];
                    if slot.state == SlotState::Abandoned {
                        true
                    } else {
                        slot.state = SlotState::Done;
                        slot.result = Some(reply.result);
                        if let Some(waker) = slot.waker.take() {
                            waker.wake();
                        }
                        false
                    }
                };
                if abandoned {
                    self.free_slot(reply.slot);
                }
            }
        }
        if count > 0 {
            self.credit_freed.notify_all();
        }
        count
    }
}

impl<D: Device + 'static> Shard<D> {
    /// The poller: serves this shard's rings and ingress until the engine closes and every
    /// request is answered (invariant 4).
    pub(crate) async fn serve(self: Rc<Self>) {
        let port = self.port();
        let spin = port.mesh.config.poll_before_sleep;
        let mut idle_since: Option<Instant> = None;
        loop {
            let served = self.serve_turn();
            if served > 0 {
                idle_since = None;
                self.yield_turn().await;
                continue;
            }
            if port.may_exit() {
                break;
            }
            if !spin.is_zero() && !port.mesh.is_closing() {
                let since = *idle_since.get_or_insert_with(Instant::now);
                if since.elapsed() < spin {
                    self.yield_turn().await;
                    continue;
                }
            }
            idle_since = None;
            port.sleep().await;
        }
    }

    /// Lets the executor poll its I/O and run other tasks before the next turn.
    async fn yield_turn(&self) {
        let port = self.port();
        if port.delivery.is_some() {
            for _ in 0..1 + port.pick(3) {
                futures_lite::future::yield_now().await;
            }
        } else {
            glommio::executor().yield_task_queue_now().await;
        }
    }

    /// One turn of the poller: replies, then requests from each peer, then clients.
    fn serve_turn(self: &Rc<Self>) -> usize {
        let port = self.port();
        let n = port.mesh.shards;
        let batch = port.mesh.config.batch_max;
        let mut served = port.drain_replies();
        let start = port.pick(n as u64) as usize;
        for k in 0..n {
            let peer = (start + k) % n;
            if peer == self.id() {
                continue;
            }
            let limit = if port.delivery.is_some() { 1 + port.pick(3) as usize } else { batch };
            let ring = &port.mesh.requests[peer * n + self.id()];
            for _ in 0..limit {
                let Some(request) = ring.pop() else { break };
                served += 1;
                port.counters.received.set(port.counters.received.get() + 1);
                self.handle_request(peer, request);
            }
        }
        served + self.drain_ingress(batch)
    }

    fn drain_ingress(self: &Rc<Self>, batch: usize) -> usize {
        let port = self.port();
        let max = port.mesh.config.client_handlers_max;
        let mut served = 0;
        while served < batch {
            if port.client_handlers.get() >= max {
                port.ingress_held_back.set(true);
                break;
            }
            let Ok(request) = port.mesh.ingress[self.id()].pop() else { break };
            served += 1;
            port.counters.received.set(port.counters.received.get() + 1);
            self.handle_client(request);
        }
        if served > 0 {
            port.mesh.ingress_room[self.id()].notify(usize::MAX);
        }
        served
    }

    /// Replies to shard `to`'s request in slot `slot`.
    fn reply(&self, to: usize, slot: u32, result: Result<Payload>) {
        if slot == NO_SLOT {
            return;
        }
        let port = self.port();
        let n = port.mesh.shards;
        let pushed = port.mesh.replies[self.id() * n + to].push(Reply { slot, result });
        assert!(pushed.is_ok(), "credits bound the replies in flight (invariant 1)");
        if port.mesh.doorbells[to].ring() {
            port.counters.wakeups_sent.set(port.counters.wakeups_sent.get() + 1);
        }
    }

    fn handle_request(self: &Rc<Self>, from: usize, request: Request<D>) {
        let Request { slot, op, buf } = request;
        if let Some(result) = self.try_inline(&op, || bytes_of(buf, self.block_size())) {
            let port = self.port();
            port.counters.inline.set(port.counters.inline.get() + 1);
            self.reply(from, slot, result);
            return;
        }
        let port = self.port();
        port.handlers.set(port.handlers.get() + 1);
        let shard = Rc::clone(self);
        glommio::spawn_local(async move {
            let result = shard.serve_op(op, bytes_of(buf, shard.block_size())).await;
            shard.reply(from, slot, result);
            let port = shard.port();
            port.handlers.set(port.handlers.get() - 1);
            port.nudge();
        })
        .detach();
    }

    fn handle_client(self: &Rc<Self>, request: ClientRequest<D>) {
        let ClientRequest { op, call: responder } = request;
        let Some(responder) = responder else {
            // A prefetch: no answer.
            let _ = self.try_inline(&op, || &mut []);
            return;
        };
        let inline = {
            let mut state = responder.call.state.lock().unwrap_or_else(|e| e.into_inner());
            let state = &mut *state;
            self.try_inline_client(&op, &mut state.data)
        };
        if let Some(result) = inline {
            let port = self.port();
            port.counters.inline.set(port.counters.inline.get() + 1);
            responder.answer(result);
            return;
        }
        let port = self.port();
        port.client_handlers.set(port.client_handlers.get() + 1);
        let shard = Rc::clone(self);
        glommio::spawn_local(async move {
            let mut data = {
                let mut state = responder.call.state.lock().unwrap_or_else(|e| e.into_inner());
                std::mem::take(&mut state.data)
            };
            if matches!(op, Op::Read { .. }) {
                data.resize(shard.block_size(), 0);
            }
            let result = shard.serve_op(op, &mut data).await;
            responder.call.state.lock().unwrap_or_else(|e| e.into_inner()).data = data;
            responder.answer(result);
            let port = shard.port();
            port.client_handlers.set(port.client_handlers.get() - 1);
            if port.ingress_held_back.replace(false) || port.mesh.is_closing() {
                port.nudge();
            }
        })
        .detach();
    }

    /// A client's request served without waiting, if it can be.
    fn try_inline_client(&self, op: &Op<D>, data: &mut Vec<u8>) -> Option<Result<Payload>> {
        match op {
            Op::Read { .. } => {
                let bs = self.block_size();
                if data.len() != bs {
                    data.resize(bs, 0);
                }
                self.try_inline(op, || &mut data[..])
            }
            _ => self.try_inline(op, || &mut data[..]),
        }
    }

    /// Serves `op` at once if it needs no waiting: a cache hit, a prefetch, stats.
    fn try_inline<'b>(
        &self,
        op: &Op<D>,
        bytes: impl FnOnce() -> &'b mut [u8],
    ) -> Option<Result<Payload>> {
        match op {
            Op::Read { block } => {
                let session = self.partition().try_session()?;
                let buf = session.get(*block)?;
                let data = buf.try_data().ok()?;
                bytes().copy_from_slice(&data);
                Some(Ok(Payload::Done))
            }
            Op::Write { block } => {
                let session = self.partition().try_session()?;
                let buf = session.get(*block)?;
                let mut data = buf.try_data_mut().ok()?;
                data.copy_from_slice(bytes());
                drop(data);
                buf.mark_dirty();
                Some(Ok(Payload::Done))
            }
            Op::Prefetch { block, count } => {
                let _ = self.partition().prefetch(*block, *count);
                Some(Ok(Payload::Done))
            }
            Op::Stats => Some(Ok(Payload::Stats(Box::new(self.stats())))),
            Op::WriteBack | Op::Barrier | Op::Run(_) => None,
        }
    }

    /// Serves `op` in a handler task: it may wait.
    async fn serve_op(self: &Rc<Self>, op: Op<D>, bytes: &mut [u8]) -> Result<Payload> {
        match op {
            Op::Read { block } => {
                self.read_local_into(block, bytes).await?;
                Ok(Payload::Done)
            }
            Op::Write { block } => {
                self.write_local(block, bytes).await?;
                Ok(Payload::Done)
            }
            Op::Prefetch { block, count } => {
                let _ = self.partition().prefetch(block, count);
                Ok(Payload::Done)
            }
            Op::WriteBack => self.partition().write_back_dirty().await.map(|()| Payload::Done),
            Op::Barrier => self.flush().await.map(|()| Payload::Done),
            Op::Stats => Ok(Payload::Stats(Box::new(self.stats()))),
            Op::Run(job) => Ok(Payload::Run(job(Rc::clone(self)).await)),
        }
    }
}

/// The requester's slot buffer as a slice (see the SAFETY note in `handle_request`).
fn bytes_of<'a>(buf: BufPtr, len: usize) -> &'a mut [u8] {
    if buf.0.is_null() {
        return &mut [];
    }
    // SAFETY: invariant 2: the buffer is `len` bytes, alive and unshared until the reply.
    unsafe { std::slice::from_raw_parts_mut(buf.0, len) }
}

/// Boxes a closure into a [`Job`] whose answer is its result.
pub(crate) fn job_box<T, F, Fut, D>(job: F) -> Job<D>
where
    T: Send + 'static,
    F: FnOnce(Rc<Shard<D>>) -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    D: Device + 'static,
{
    Box::new(move |shard| Box::pin(async move { Box::new(job(shard).await) as Answer }))
}

/// The result of a job, unboxed.
pub(crate) fn job_answer<T: 'static>(payload: Payload) -> T {
    match payload {
        Payload::Run(answer) => *answer.downcast::<T>().expect("a job answers with its own type"),
        _ => unreachable!("a Run request is answered with Payload::Run"),
    }
}

/// A shard's statistics out of a reply.
pub(crate) fn stats_answer(payload: Payload) -> ShardStats {
    match payload {
        Payload::Stats(stats) => *stats,
        _ => unreachable!("a Stats request is answered with Payload::Stats"),
    }
}
