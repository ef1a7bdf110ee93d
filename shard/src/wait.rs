//! A list of parked tasks on one executor: the single-threaded building block for "wait until
//! this condition holds" (a buffer is released, a read completes, a write-back slot frees).
//!
//! Waiting is always a loop around a condition check, so a wake-up can never be missed: the
//! check and the registration happen in one poll, and no other task runs in between on this
//! thread-per-core executor.

use std::cell::RefCell;
use std::future::Future;
use std::task::{Poll, Waker};

/// Parked wakers, woken all at once; each waiter re-checks its own condition.
#[derive(Debug, Default)]
pub struct WaitList {
    wakers: RefCell<Vec<Waker>>,
}

impl WaitList {
    /// An empty list with room for `capacity` waiters before it allocates.
    pub fn with_capacity(capacity: usize) -> Self {
        WaitList { wakers: RefCell::new(Vec::with_capacity(capacity)) }
    }

    /// Wakes every parked task. Cheap when nobody waits.
    pub fn notify_all(&self) {
        if self.wakers.borrow().is_empty() {
            return;
        }
        // Wake outside the borrow (a waker may run code that parks again), then give the
        // emptied vector back so its capacity is reused instead of reallocated.
        let mut woken = std::mem::take(&mut *self.wakers.borrow_mut());
        for waker in woken.drain(..) {
            waker.wake();
        }
        let mut wakers = self.wakers.borrow_mut();
        if wakers.is_empty() {
            *wakers = woken;
        }
    }

    /// Whether any task is parked here.
    pub fn has_waiters(&self) -> bool {
        !self.wakers.borrow().is_empty()
    }

    /// Resolves once `ready()` returns `Some`, re-checking after every notification.
    pub fn wait_for<'a, T>(
        &'a self,
        mut ready: impl FnMut() -> Option<T> + 'a,
    ) -> impl Future<Output = T> + 'a {
        std::future::poll_fn(move |cx| match ready() {
            Some(value) => Poll::Ready(value),
            None => {
                let mut wakers = self.wakers.borrow_mut();
                if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                    wakers.push(cx.waker().clone());
                }
                Poll::Pending
            }
        })
    }
}

/// A first-come, first-served line: tasks take a ticket and pass one at a time, in ticket
/// order. Used where a plain [`WaitList`] would let a task that arrives later take a
/// resource before one that has been waiting (barging), which can starve a waiter for as
/// long as others keep arriving.
#[derive(Debug, Default)]
pub struct FifoGate {
    next_ticket: std::cell::Cell<u64>,
    serving: std::cell::Cell<u64>,
    /// Tickets whose holder left before its turn; skipped when their turn comes.
    abandoned: RefCell<Vec<u64>>,
    turn_changed: WaitList,
}

/// A place in a [`FifoGate`]'s line. Dropping it ends the turn (or gives up the place).
#[derive(Debug)]
pub struct GateTicket<'g> {
    gate: &'g FifoGate,
    ticket: u64,
}

impl FifoGate {
    /// Takes a ticket and waits until it is this ticket's turn. Without a line, this is two
    /// counter updates and no wait.
    pub async fn pass(&self) -> GateTicket<'_> {
        let ticket = self.next_ticket.get();
        self.next_ticket.set(ticket + 1);
        let place = GateTicket { gate: self, ticket };
        if self.serving.get() != ticket {
            self.turn_changed.wait_for(|| (self.serving.get() == ticket).then_some(())).await;
        }
        place
    }
}

impl Drop for GateTicket<'_> {
    fn drop(&mut self) {
        let gate = self.gate;
        if gate.serving.get() != self.ticket {
            gate.abandoned.borrow_mut().push(self.ticket);
            return;
        }
        let mut serving = self.ticket + 1;
        let mut abandoned = gate.abandoned.borrow_mut();
        while let Some(at) = abandoned.iter().position(|&t| t == serving) {
            abandoned.swap_remove(at);
            serving += 1;
        }
        drop(abandoned);
        gate.serving.set(serving);
        if serving != gate.next_ticket.get() {
            gate.turn_changed.notify_all();
        }
    }
}

/// A change counter with the tasks waiting for its next change: a waiter takes the count,
/// checks its condition, and waits for a count other than the one it took, so a change that
/// happens in between is never missed.
#[derive(Debug, Default)]
pub struct Changes {
    count: std::cell::Cell<u64>,
    waiters: WaitList,
}

impl Changes {
    /// No change yet, room for `capacity` waiters before the list allocates.
    pub fn with_capacity(capacity: usize) -> Self {
        Changes { count: std::cell::Cell::new(0), waiters: WaitList::with_capacity(capacity) }
    }

    /// The number of changes so far.
    pub fn count(&self) -> u64 {
        self.count.get()
    }

    /// Records a change and wakes every waiter.
    pub fn notify(&self) {
        self.count.set(self.count.get().wrapping_add(1));
        self.waiters.notify_all();
    }

    /// Whether any task waits for a change.
    pub fn has_waiters(&self) -> bool {
        self.waiters.has_waiters()
    }

    /// Resolves once a change after the one numbered `seen` happened (at once if one did).
    pub async fn wait_since(&self, seen: u64) {
        self.waiters.wait_for(|| (self.count.get() != seen).then_some(())).await;
    }
}
