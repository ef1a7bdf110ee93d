//! A shard's end of the mesh as a requester: pending slots, credits, the send path.

use std::cell::{Cell, RefCell};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Poll, Waker};

use corebuf_shard::cache::Lent;
use corebuf_shard::io::Device;
use corebuf_shard::rng::SimRng;
use corebuf_shard::WaitList;

use super::{BufPtr, Mesh, Op, Payload, Request, NO_LOAN, NO_SLOT};
use crate::{Error, Result};

/// A request this shard sent and whose reply it has not consumed.
pub(super) struct Slot {
    pub(super) state: SlotState,
    /// The shard the request went to.
    pub(super) to: usize,
    pub(super) waker: Option<Waker>,
    pub(super) result: Option<Result<Payload>>,
    pub(super) buf: Box<[u8]>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum SlotState {
    Free,
    /// Sent; the reply has not come.
    Waiting,
    /// Sent, and the requester went away: free it when the reply comes.
    Abandoned,
    /// The reply came; the requester has not taken it.
    Done,
}

/// The loans an owner has open (invariant 5): each with the shard it was lent to.
pub(super) struct Loans<D: Device + 'static> {
    open: Vec<Option<(usize, Lent<D>)>>,
    free: Vec<u32>,
    count: usize,
}

impl<D: Device + 'static> Loans<D> {
    fn new() -> Self {
        Loans { open: Vec::new(), free: Vec::new(), count: 0 }
    }

    /// Records a loan to shard `to`; returns its token.
    pub(super) fn insert(&mut self, to: usize, lent: Lent<D>) -> u32 {
        self.count += 1;
        if let Some(token) = self.free.pop() {
            self.open[token as usize] = Some((to, lent));
            return token;
        }
        self.open.push(Some((to, lent)));
        (self.open.len() - 1) as u32
    }

    /// Ends loan `token`, lent to shard `to` (its `Lent` drops: unshared, unpinned). A token
    /// that names no open loan to `to` is ignored.
    pub(super) fn end(&mut self, token: u32, to: usize) {
        let Some(entry) = self.open.get_mut(token as usize) else { return };
        if entry.as_ref().is_some_and(|(peer, _)| *peer == to) {
            *entry = None;
            self.count -= 1;
            self.free.push(token);
        }
    }

    /// Ends every loan to a shard for which `dead` holds: its thread no longer reads.
    pub(super) fn end_dead(&mut self, dead: impl Fn(usize) -> bool) {
        for (token, entry) in self.open.iter_mut().enumerate() {
            if entry.as_ref().is_some_and(|(to, _)| dead(*to)) {
                *entry = None;
                self.count -= 1;
                self.free.push(token as u32);
            }
        }
    }

    pub(super) fn count(&self) -> usize {
        self.count
    }
}

impl<D: Device + 'static> Drop for Loans<D> {
    fn drop(&mut self) {
        // Loans still open when the table goes: the shard died (its poller exits only with
        // none open), and readers on other threads may still be in the lent frames. Leak the
        // buffers, and with them the arena, rather than free memory being read. (Whether the
        // thread is panicking says nothing here: a dead shard's last `Rc` is a thread-local,
        // dropped after the unwind was caught.)
        if self.count > 0 {
            for entry in self.open.drain(..).flatten() {
                std::mem::forget(entry);
            }
        }
    }
}

/// Counters of one shard's message layer.
#[derive(Debug, Default)]
pub(super) struct PortCounters {
    pub(super) sent: Cell<u64>,
    pub(super) received: Cell<u64>,
    pub(super) inline: Cell<u64>,
    pub(super) sleeps: Cell<u64>,
    pub(super) wakeups_sent: Cell<u64>,
}

/// One shard's end of the mesh: its pending slots, credits, handler count and poller state.
pub(crate) struct Port<D: Device + 'static> {
    pub(super) id: usize,
    pub(super) mesh: Arc<Mesh<D>>,
    pub(super) block_size: usize,
    pub(super) slots: RefCell<Vec<Slot>>,
    pub(super) free_slots: RefCell<Vec<u32>>,
    /// Credited requests in flight, per peer (invariant 1): sent, reply not yet popped. This is
    /// also the number of this shard's slots waiting for that peer (`Waiting` or `Abandoned`).
    pub(super) in_flight: Box<[Cell<usize>]>,
    /// Peers sent a request whose doorbell this shard's poller rings at its next turn.
    pub(super) ring_later: Box<[Cell<bool>]>,
    pub(super) ring_pending: Cell<bool>,
    pub(super) credit_freed: WaitList,
    /// Handler tasks running for shard requests and for client requests.
    pub(super) handlers: Cell<usize>,
    pub(super) client_handlers: Cell<usize>,
    pub(super) ingress_held_back: Cell<bool>,
    /// Dead peers this poller has reacted to.
    pub(super) dead_seen: Cell<usize>,
    pub(super) delivery: Option<RefCell<SimRng>>,
    pub(super) counters: PortCounters,
    /// As an owner: the loans open to requesters (invariant 5).
    pub(super) loans: RefCell<Loans<D>>,
    /// As a requester: lent replies popped whose release is not yet sent or pending.
    pub(super) borrowed: Cell<usize>,
    /// Releases not sent yet: each rides on the next request to its owner, or goes alone at
    /// the poller's next turn that finds room in the ring.
    pub(super) releases_pending: RefCell<Vec<(usize, u32)>>,
    /// Slots that received a lent reply at the poller's last turn: one still unclaimed at the
    /// next turn gets a copy instead, and the loan ends (a future nobody polls must not hold
    /// the owner's block).
    pub(super) lent_replies: RefCell<Vec<u32>>,
}

impl<D: Device + 'static> Drop for Port<D> {
    fn drop(&mut self) {
        // Requests still in flight when the port goes: the shard died, and their owners may
        // still copy into the slot buffers (invariant 2). Leak them rather than free them.
        if self.in_flight.iter().any(|n| n.get() > 0) {
            std::mem::forget(std::mem::take(self.slots.get_mut()));
        }
    }
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
    pub(super) port: &'p Port<D>,
    pub(super) slot: u32,
    pub(super) payload: Option<Payload>,
}

impl<D: Device + 'static> Answered<'_, D> {
    /// The block's bytes: lent by the owner (a `Borrow` that hit) or copied into the slot's
    /// buffer (a read).
    pub(crate) fn with_buf<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        if let Some(Payload::Lent { bytes, .. }) = &self.payload {
            // SAFETY: invariant 5: the owner keeps the block's bytes (one block long) valid
            // and unchanged until this answer's drop sends the release.
            let data = unsafe { std::slice::from_raw_parts(bytes.0, self.port.block_size) };
            return f(data);
        }
        let slots = self.port.slots.borrow();
        f(&slots[self.slot as usize].buf)
    }

    pub(crate) fn take_payload(&mut self) -> Payload {
        debug_assert!(!matches!(self.payload, Some(Payload::Lent { .. })), "a loan is released");
        self.payload.take().unwrap_or(Payload::Done)
    }
}

impl<D: Device + 'static> Drop for Answered<'_, D> {
    fn drop(&mut self) {
        if let Some(Payload::Lent { token, .. }) = self.payload.take() {
            let to = self.port.slots.borrow()[self.slot as usize].to;
            self.port.release(to, token);
        }
        self.port.free_slot(self.slot);
    }
}

/// Marks the slot abandoned if the requesting future is dropped before its reply.
pub(super) struct PendingGuard<'p, D: Device + 'static> {
    pub(super) port: &'p Port<D>,
    pub(super) slot: u32,
    pub(super) armed: bool,
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
            in_flight: (0..shards).map(|_| Cell::new(0)).collect(),
            ring_later: (0..shards).map(|_| Cell::new(false)).collect(),
            ring_pending: Cell::new(false),
            credit_freed: WaitList::with_capacity(4),
            handlers: Cell::new(0),
            client_handlers: Cell::new(0),
            ingress_held_back: Cell::new(false),
            dead_seen: Cell::new(0),
            delivery,
            counters: PortCounters::default(),
            loans: RefCell::new(Loans::new()),
            borrowed: Cell::new(0),
            releases_pending: RefCell::new(Vec::new()),
            lent_replies: RefCell::new(Vec::new()),
        }
    }

    /// Copies the bytes of every lent reply still unclaimed since the last turn into its
    /// slot's buffer and ends the loan: the answer then reads the copy (invariant 5).
    pub(super) fn copy_unclaimed_loans(&self) {
        if self.lent_replies.borrow().is_empty() {
            return;
        }
        let slots_lent = std::mem::take(&mut *self.lent_replies.borrow_mut());
        for index in slots_lent {
            let ended = {
                let mut slots = self.slots.borrow_mut();
                let slot = &mut slots[index as usize];
                match (&slot.state, &slot.result) {
                    (SlotState::Done, Some(Ok(Payload::Lent { bytes, token }))) => {
                        // SAFETY: invariant 5: the loan is open until the release below.
                        let data = unsafe { std::slice::from_raw_parts(bytes.0, self.block_size) };
                        slot.buf.copy_from_slice(data);
                        let ended = (slot.to, *token);
                        slot.result = Some(Ok(Payload::Done));
                        Some(ended)
                    }
                    _ => None,
                }
            };
            if let Some((to, token)) = ended {
                self.release(to, token);
            }
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

    pub(super) fn alloc_slot(&self, to: usize) -> u32 {
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

    pub(super) fn free_slot(&self, index: u32) {
        let lent = {
            let mut slots = self.slots.borrow_mut();
            let slot = &mut slots[index as usize];
            slot.state = SlotState::Free;
            slot.waker = None;
            match slot.result.take() {
                Some(Ok(Payload::Lent { token, .. })) => Some((slot.to, token)),
                _ => None,
            }
        };
        self.free_slots.borrow_mut().push(index);
        // A lent answer nobody took (its future was dropped): end the loan (invariant 5).
        if let Some((to, token)) = lent {
            self.release(to, token);
        }
    }

    /// Ends a loan from shard `to` (invariant 5): the release waits in `releases_pending` for
    /// the next request to `to` or the poller's next turn, whichever comes first.
    pub(super) fn release(&self, to: usize, token: u32) {
        self.borrowed.set(self.borrowed.get() - 1);
        self.releases_pending.borrow_mut().push((to, token));
        // Only this shard's poller sends pending releases (or a request to `to` takes it): it
        // must not sleep on them.
        if self.mesh.doorbells[self.id].sleeping.load(Ordering::Relaxed) {
            self.mesh.doorbells[self.id].ring();
        }
    }

    /// Takes a pending release for shard `to`, if any, to ride on a request.
    fn take_release_for(&self, to: usize) -> u32 {
        let mut pending = self.releases_pending.borrow_mut();
        match pending.iter().rposition(|&(peer, _)| peer == to) {
            Some(i) => pending.swap_remove(i).1,
            None => NO_LOAN,
        }
    }

    /// Pushes a release if the ring has room beyond the credits (a dead owner needs none).
    fn try_push_release(&self, to: usize, token: u32) -> bool {
        if self.mesh.is_dead(to) {
            return true;
        }
        if !self.room_beyond_credits(to) {
            return false;
        }
        let op = Op::Release { token };
        let buf = BufPtr(std::ptr::null_mut());
        let release = Request { slot: NO_SLOT, release: NO_LOAN, op, buf };
        if self.mesh.requests[self.id * self.mesh.shards + to].push(release).is_err() {
            return false;
        }
        self.doorbell_after_push(to);
        true
    }

    /// Sends the releases that found no room before, as far as their rings have room.
    pub(super) fn flush_releases(&self) {
        if self.releases_pending.borrow().is_empty() {
            return;
        }
        let pending = std::mem::take(&mut *self.releases_pending.borrow_mut());
        let mut left = Vec::new();
        for (to, token) in pending {
            if !self.try_push_release(to, token) {
                left.push((to, token));
            }
        }
        *self.releases_pending.borrow_mut() = left;
    }

    /// Pushes a request to shard `to` under the shutdown protocol (invariant 4). `Ok(false)`
    /// if the ring was full (impossible for a credited request, by invariant 1).
    pub(super) fn push(&self, to: usize, request: Request<D>) -> Result<bool> {
        let pair = self.id * self.mesh.shards + to;
        // Relaxed suffices: once this shard's poller saw `closing` on this thread, this later
        // load on the same thread sees it too (invariant 4).
        if self.mesh.closing.load(Ordering::Relaxed) {
            return Err(Error::ShutDown);
        }
        let mut request = request;
        if !self.releases_pending.borrow().is_empty() {
            request.release = self.take_release_for(to);
        }
        if let Err(request) = self.mesh.requests[pair].push(request) {
            if request.release != NO_LOAN {
                self.releases_pending.borrow_mut().push((to, request.release));
            }
            return Ok(false);
        }
        self.counters.sent.set(self.counters.sent.get() + 1);
        self.doorbell_after_push(to);
        Ok(true)
    }

    /// The doorbell (a fence) matters only if `to` sleeps. While this shard's own poller is
    /// awake it rings once per turn for every peer sent to since (`ring_deferred`); when it
    /// sleeps, nobody would, so ring now.
    fn doorbell_after_push(&self, to: usize) {
        if self.mesh.doorbells[self.id].sleeping.load(Ordering::Relaxed) {
            self.ring(to);
        } else {
            self.ring_later[to].set(true);
            self.ring_pending.set(true);
        }
    }

    /// Rings `to`'s doorbell now.
    pub(super) fn ring(&self, to: usize) {
        if self.mesh.doorbells[to].ring() {
            self.counters.wakeups_sent.set(self.counters.wakeups_sent.get() + 1);
        }
    }

    /// Rings the doorbells of the peers sent to since the last turn.
    pub(super) fn ring_deferred(&self) {
        if !self.ring_pending.replace(false) {
            return;
        }
        for (to, later) in self.ring_later.iter().enumerate() {
            if later.replace(false) {
                self.ring(to);
            }
        }
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
        match self.push(to, Request { slot, release: NO_LOAN, op, buf }) {
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

    /// Whether the ring to shard `to` has room beyond the credits: what a message that
    /// expects no reply (a prefetch, a release) may take without ever taking a credited
    /// request's room (invariant 1).
    fn room_beyond_credits(&self, to: usize) -> bool {
        let ring = &self.mesh.requests[self.id * self.mesh.shards + to];
        ring.len() + self.mesh.config.credits < ring.capacity()
    }

    /// Sends a prefetch to shard `to` if its ring has room beyond the credits; never waits.
    pub(crate) fn prefetch(&self, to: usize, block: u64, count: u64) -> Result<()> {
        if !self.room_beyond_credits(to) {
            return Ok(()); // skipped under pressure, as prefetch may
        }
        // A longer span is cut short, as prefetch may skip.
        let op = Op::Prefetch { block, count: u32::try_from(count).unwrap_or(u32::MAX) };
        let buf = BufPtr(std::ptr::null_mut());
        self.push(to, Request { slot: NO_SLOT, release: NO_LOAN, op, buf }).map(|_| ())
    }
}
