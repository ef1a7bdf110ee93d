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
//! 4. Shutdown: a sender checks `closing` before it pushes (on its shard's thread); a poller
//!    that sees `closing` publishes `closing_seen` for its shard, after which no task of that
//!    shard pushes a request (the same thread saw the flag). A poller exits only when every
//!    shard's `closing_seen` is published, its rings and ingress are empty, no handler task of
//!    its is running and none of its own requests waits for a reply. Every request is
//!    therefore either served or refused with `ShutDown`; none hangs.
//! 5. Loans: a shard's read of a remote block that hits the owner's cache is answered with a
//!    pointer into the owner's frame, not a copy: the owner keeps the buffer pinned and
//!    shared-borrowed (a [`Lent`](corebuf_shard::cache::Lent), so nothing changes the bytes)
//!    until the requester's `Release` message arrives. The requester reads the bytes between
//!    the reply's pop (Acquire) and the release's push (Release), and releases the loan on
//!    every path that ends the read: the result taken, the future dropped, the slot
//!    abandoned. A release rides on the requester's next request to the owner (the request's
//!    `release` field, ended before its op is served), or else goes alone at the requester's
//!    next poller turn (whose poller does not sleep while releases wait): a `Release` message
//!    that expects no reply and, like a prefetch, enters the ring only while it has room
//!    beyond `credits`, so it never takes a credited request's room. A lent reply
//!    still unclaimed at the requester's next poller turn (a future polled once and kept) is
//!    copied into its slot's buffer and released, so no idle future holds the owner's block.
//!    Neither side's poller exits while a loan of its is open, so every release is delivered;
//!    loans to a dead shard end when the owner notices the death, its late borrows are
//!    ignored, and a release ends only a loan to its sender (a dead shard's token may have
//!    been reused for another's); a shard that dies with loans open,
//!    or with requests in flight, leaks their memory (its arena, its slot buffers) rather than
//!    free it under a reader or a writer on another thread.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::time::Duration;

use concurrent_queue::ConcurrentQueue;
use corebuf_shard::io::Device;
use crossbeam_utils::CachePadded;

use crate::shard::Shard;
use crate::stats::ShardStats;
use ring::Ring;

mod client;
mod poller;
mod port;
mod ring;

use client::ClientRequest;
pub(crate) use port::Port;

/// A closure run on a shard, with its boxed answer.
pub(crate) type Job<D> =
    Box<dyn FnOnce(Rc<Shard<D>>) -> Pin<Box<dyn Future<Output = Answer>>> + Send>;

/// A job's result, type-erased for the trip back.
pub(crate) type Answer = Box<dyn Any + Send>;

/// What a shard or a client asks a shard to do.
pub(crate) enum Op<D: Device + 'static> {
    /// Copy `block`'s data into the request's buffer.
    Read { block: u64 },
    /// Lend `block`'s bytes if it is a cache hit now (a [`Payload::Lent`] reply); otherwise
    /// copy them into the request's buffer, as `Read` does (invariant 5).
    Borrow { block: u64 },
    /// End the loan `token` (invariant 5); no reply.
    Release { token: u32 },
    /// Copy the request's buffer into `block` (a whole-block write, dirty in cache).
    Write { block: u64 },
    /// Start reads of `block..block + count`; no reply. (`count` is 32 bits, and `Run` boxes
    /// its closure's box, so that a request is 32 bytes: two to a cache line.)
    Prefetch { block: u64, count: u32 },
    /// The first phase of the global barrier: write back this shard's dirty buffers.
    WriteBack,
    /// A whole global barrier, coordinated by the receiving shard.
    Barrier,
    /// The shard's statistics.
    Stats,
    /// Run a closure on the shard.
    Run(Box<Job<D>>),
}

impl<D: Device + 'static> Op<D> {
    fn expects_reply(&self) -> bool {
        !matches!(self, Op::Prefetch { .. } | Op::Release { .. })
    }
}

/// What comes back.
pub(crate) enum Payload {
    Done,
    /// A `Borrow` that hit: the owner's frame, readable until the requester sends
    /// `Release { token }` (invariant 5).
    Lent {
        bytes: LentPtr,
        token: u32,
    },
    Stats(Box<ShardStats>),
    /// Boxed once more, so that a reply is 24 bytes.
    Run(Box<Answer>),
}

/// The requester's slot buffer, block-sized (invariant 2 keeps it alive and unshared).
#[derive(Clone, Copy)]
struct BufPtr(*mut u8);

// SAFETY: the pointer is only dereferenced by the owner shard while the requester leaves the
// buffer alone (invariant 2): ownership of the bytes moves with the request and back with the
// reply.
unsafe impl Send for BufPtr {}

/// The first byte of a block an owner lent (invariant 5).
#[derive(Clone, Copy)]
pub(crate) struct LentPtr(*const u8);

// SAFETY: the requester reads through the pointer only while the owner's loan keeps the bytes
// valid and unchanged (invariant 5); the reply's and the release's ring operations order those
// reads after the owner's last write and before its next one.
unsafe impl Send for LentPtr {}

/// A request on a shard-to-shard ring.
struct Request<D: Device + 'static> {
    /// The requester's pending slot, or [`NO_SLOT`] when no reply is expected.
    slot: u32,
    /// A loan of the receiving shard's that the requester is done with, ended before `op` is
    /// served, or [`NO_LOAN`]: a release rides on the next request to its owner (invariant 5).
    release: u32,
    op: Op<D>,
    buf: BufPtr,
}

const NO_SLOT: u32 = u32::MAX;
const NO_LOAN: u32 = u32::MAX;

/// A reply on a shard-to-shard ring.
///
/// The error is boxed so that a reply stays a few words: ring slots are what crosses between
/// cores, and an `Error` inline would make every reply span two cache lines.
struct Reply {
    slot: u32,
    result: std::result::Result<Payload, Box<crate::Error>>,
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
    /// Per shard: its poller has seen `closing`, so it sends no more requests (invariant 4).
    closing_seen: Box<[AtomicBool]>,
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
            closing_seen: (0..shards).map(|_| AtomicBool::new(false)).collect(),
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

    pub(super) fn is_dead(&self, id: usize) -> bool {
        self.dead[id].load(Ordering::SeqCst)
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }
}

/// Boxes a closure into a [`Job`] whose answer is its result.
pub(crate) fn job_box<T, F, Fut, D>(job: F) -> Box<Job<D>>
where
    T: Send + 'static,
    F: FnOnce(Rc<Shard<D>>) -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    D: Device + 'static,
{
    Box::new(Box::new(move |shard| {
        Box::pin(async move { Box::new(job(shard).await) as Answer })
            as Pin<Box<dyn Future<Output = Answer>>>
    }))
}

/// The result of a job, unboxed.
pub(crate) fn job_answer<T: 'static>(payload: Payload) -> T {
    match payload {
        Payload::Run(answer) => {
            *(*answer).downcast::<T>().expect("a job answers with its own type")
        }
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

// Ring slots are what crosses between cores: two requests or almost three replies to a
// 64-byte cache line.
const _: () = assert!(std::mem::size_of::<Request<corebuf_shard::io::DmaDevice>>() == 32);
const _: () = assert!(std::mem::size_of::<Reply>() == 24);
