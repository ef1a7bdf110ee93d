//! A shard's poller: drains its rings and ingress, serves hits inline, spawns tasks for the
//! rest, and sleeps when there is nothing to do.

use std::rc::Rc;
use std::sync::atomic::{fence, Ordering};
use std::task::Poll;
use std::time::Instant;

use corebuf_shard::io::Device;

use super::client::ClientRequest;
use super::port::SlotState;
use super::{BufPtr, LentPtr, Op, Payload, Port, Reply, Request, NO_LOAN, NO_SLOT};
use crate::shard::Shard;
use crate::Result;

impl<D: Device + 'static> Port<D> {
    /// Whether anything waits in this shard's rings or ingress.
    fn has_work(&self) -> bool {
        let n = self.mesh.shards;
        let me = self.id;
        (0..n).any(|peer| {
            peer != me
                && (!self.mesh.requests[peer * n + me].is_empty()
                    || !self.mesh.replies[peer * n + me].is_empty())
        }) || (!self.ingress_held_back.get() && !self.mesh.ingress[me].is_empty())
            || !self.releases_pending.borrow().is_empty()
    }

    /// Whether this shard may stop polling (invariant 4).
    fn may_exit(&self) -> bool {
        let n = self.mesh.shards;
        let me = self.id;
        if !self.mesh.closing.load(Ordering::SeqCst) {
            return false;
        }
        if !self.mesh.closing_seen[me].load(Ordering::Relaxed) {
            // From here on no task of this shard pushes a request (invariant 4); every
            // poller must recheck whether it may exit now.
            self.mesh.closing_seen[me].store(true, Ordering::Release);
            for bell in self.mesh.doorbells.iter() {
                bell.ring();
            }
        }
        // Order matters: every shard's flag first (Acquire), then the rings (invariant 4).
        // A dead shard sends nothing either.
        let nobody_sends = (0..n).all(|peer| {
            self.mesh.closing_seen[peer].load(Ordering::Acquire) || self.mesh.is_dead(peer)
        });
        self.notice_deaths();
        nobody_sends
            && !self.has_work()
            && self.mesh.ingress[me].is_empty()
            && self.handlers.get() == 0
            && self.client_handlers.get() == 0
            && self.nothing_awaited()
            && self.borrowed.get() == 0
            && self.loans.borrow().count() == 0
    }

    /// Whether none of this shard's requests to a live shard waits for its reply (taken
    /// answers do not keep the poller alive, nor do requests to a dead shard).
    fn nothing_awaited(&self) -> bool {
        let live = |peer: &usize| !self.mesh.is_dead(*peer);
        (0..self.mesh.shards).filter(live).all(|peer| self.in_flight[peer].get() == 0)
    }

    /// Wakes requesters waiting on a shard that died since the last look.
    fn notice_deaths(&self) {
        let dead = self.mesh.dead_count.load(Ordering::SeqCst);
        if dead == self.dead_seen.replace(dead) {
            return;
        }
        self.loans.borrow_mut().end_dead(|peer| self.mesh.is_dead(peer));
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
            self.ring_deferred();
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
                let lent = match &reply.result {
                    Ok(Payload::Lent { token, .. }) => Some(*token),
                    _ => None,
                };
                if lent.is_some() {
                    self.borrowed.set(self.borrowed.get() + 1);
                }
                let abandoned = {
                    let mut slots = self.slots.borrow_mut();
                    let slot = &mut slots[reply.slot as usize];
                    if slot.state == SlotState::Abandoned {
                        true
                    } else {
                        slot.state = SlotState::Done;
                        slot.result = Some(reply.result.map_err(|e| *e));
                        if lent.is_some() {
                            self.lent_replies.borrow_mut().push(reply.slot);
                        }
                        if let Some(waker) = slot.waker.take() {
                            waker.wake();
                        }
                        false
                    }
                };
                if abandoned {
                    self.free_slot(reply.slot);
                    if let Some(token) = lent {
                        self.release(peer, token);
                    }
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
            if served > 0 || !port.releases_pending.borrow().is_empty() {
                // Releases not sent yet count as work: the next turn sends them (or, if their
                // ring is full, the owner must drain it first), so yield rather than sleep.
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
                    // Nothing to do: let another thread on this core run first (a client, or
                    // a shard sharing the core); on an idle core this returns at once.
                    std::thread::yield_now();
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
        port.copy_unclaimed_loans();
        port.flush_releases();
        port.ring_deferred();
        let mut served = port.drain_replies();
        let start = port.pick(n as u64) as usize;
        for k in 0..n {
            let peer = (start + k) % n;
            if peer == self.id() {
                continue;
            }
            let limit = if port.delivery.is_some() { 1 + port.pick(3) as usize } else { batch };
            let ring = &port.mesh.requests[peer * n + self.id()];
            let mut replied = false;
            for _ in 0..limit {
                let Some(request) = ring.pop() else { break };
                served += 1;
                if !matches!(request.op, Op::Release { .. }) {
                    port.counters.received.set(port.counters.received.get() + 1);
                }
                replied |= self.handle_request(peer, request);
            }
            // One doorbell for the batch's inline replies to this peer.
            if replied {
                self.ring_peer(peer);
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

    /// Replies to shard `to`'s request in slot `slot`; true if a reply was pushed (the caller
    /// then rings `to`'s doorbell, once for a batch).
    fn reply(&self, to: usize, slot: u32, result: Result<Payload>) -> bool {
        if slot == NO_SLOT {
            return false;
        }
        let port = self.port();
        let n = port.mesh.shards;
        let result = result.map_err(Box::new);
        let pushed = port.mesh.replies[self.id() * n + to].push(Reply { slot, result });
        assert!(pushed.is_ok(), "credits bound the replies in flight (invariant 1)");
        true
    }

    fn ring_peer(&self, to: usize) {
        self.port().ring(to);
    }

    /// Serves one request from shard `from`; true if it was answered inline (its reply is
    /// pushed, the doorbell not yet rung).
    fn handle_request(self: &Rc<Self>, from: usize, request: Request<D>) -> bool {
        let Request { slot, release, op, buf } = request;
        // `Loans::end` ends only a loan to `from`: a late release from a shard that died (whose
        // loans `notice_deaths` ended, and whose tokens may be reused) ends nothing.
        if release != NO_LOAN {
            self.port().loans.borrow_mut().end(release, from);
        }
        match op {
            // A dead peer reads nothing any more, and `notice_deaths` has ended (or at its next
            // look ends: `dead` is set before `dead_count` grows) its loans: open no new one.
            Op::Borrow { .. } if self.port().mesh.is_dead(from) => return false,
            Op::Release { token } => {
                self.port().loans.borrow_mut().end(token, from);
                return false;
            }
            Op::Borrow { block } => {
                if let Some(lent) = self.partition().get(block).and_then(|buf| buf.lend().ok()) {
                    let port = self.port();
                    port.counters.inline.set(port.counters.inline.get() + 1);
                    let bytes = LentPtr(lent.as_ptr());
                    let token = port.loans.borrow_mut().insert(from, lent);
                    return self.reply(from, slot, Ok(Payload::Lent { bytes, token }));
                }
                // A miss, or bytes borrowed mutably now: a task copies them when it can.
                self.spawn_handler(from, slot, op, buf);
                return false;
            }
            _ => {}
        }
        if let Some(result) = self.try_inline(&op, || bytes_of(buf, self.block_size())) {
            let port = self.port();
            port.counters.inline.set(port.counters.inline.get() + 1);
            return self.reply(from, slot, result);
        }
        self.spawn_handler(from, slot, op, buf);
        false
    }

    /// Serves shard `from`'s request in a task (it may wait), which replies when done.
    fn spawn_handler(self: &Rc<Self>, from: usize, slot: u32, op: Op<D>, buf: BufPtr) {
        let port = self.port();
        port.handlers.set(port.handlers.get() + 1);
        let shard = Rc::clone(self);
        glommio::spawn_local(async move {
            let result = shard.serve_op(op, bytes_of(buf, shard.block_size())).await;
            if shard.reply(from, slot, result) {
                shard.ring_peer(from);
            }
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
        // A read's buffer comes empty (with room for a block) from `Client::read`, so that
        // the client never writes it before the shard does; a write's carries the data.
        let inline = {
            let mut state = responder.call.state.lock().unwrap_or_else(|e| e.into_inner());
            match op {
                Op::Read { block } => self.read_inline_into(block, &mut state.data),
                _ => self.try_inline(&op, || &mut state.data[..]),
            }
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

    /// A client's read of `block` served at once if it hits: its bytes appended to `out`
    /// (which comes empty).
    fn read_inline_into(&self, block: u64, out: &mut Vec<u8>) -> Option<Result<Payload>> {
        let buf = self.partition().get(block)?;
        let data = buf.try_data().ok()?;
        out.clear();
        out.extend_from_slice(&data);
        Some(Ok(Payload::Done))
    }

    /// Serves `op` at once if it needs no waiting: a cache hit, a prefetch, stats.
    fn try_inline<'b>(
        &self,
        op: &Op<D>,
        bytes: impl FnOnce() -> &'b mut [u8],
    ) -> Option<Result<Payload>> {
        match op {
            Op::Read { block } | Op::Borrow { block } => {
                let buf = self.partition().get(*block)?;
                let data = buf.try_data().ok()?;
                bytes().copy_from_slice(&data);
                Some(Ok(Payload::Done))
            }
            Op::Write { block } => {
                let buf = self.partition().get(*block)?;
                let mut data = buf.try_data_mut().ok()?;
                data.copy_from_slice(bytes());
                drop(data);
                buf.mark_dirty();
                Some(Ok(Payload::Done))
            }
            Op::Prefetch { block, count } => {
                let _ = self.partition().prefetch(*block, u64::from(*count));
                Some(Ok(Payload::Done))
            }
            Op::Stats => Some(Ok(Payload::Stats(Box::new(self.stats())))),
            Op::WriteBack | Op::Barrier | Op::Run(_) | Op::Release { .. } => None,
        }
    }

    /// Serves `op` in a handler task: it may wait.
    async fn serve_op(self: &Rc<Self>, op: Op<D>, bytes: &mut [u8]) -> Result<Payload> {
        match op {
            Op::Read { block } | Op::Borrow { block } => {
                self.read_local_with(block, |data| bytes.copy_from_slice(data)).await?;
                Ok(Payload::Done)
            }
            Op::Release { .. } => unreachable!("a release is handled when it is popped"),
            Op::Write { block } => {
                self.write_local(block, bytes).await?;
                Ok(Payload::Done)
            }
            Op::Prefetch { block, count } => {
                let _ = self.partition().prefetch(block, u64::from(count));
                Ok(Payload::Done)
            }
            Op::WriteBack => self.partition().write_back_dirty().await.map(|()| Payload::Done),
            Op::Barrier => self.flush().await.map(|()| Payload::Done),
            Op::Stats => Ok(Payload::Stats(Box::new(self.stats()))),
            Op::Run(job) => Ok(Payload::Run(Box::new((*job)(Rc::clone(self)).await))),
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
