//! A bounded single-producer single-consumer ring: the wire between two shards.
//!
//! Invariants:
//! 1. Exactly one thread pushes and exactly one thread pops (the owner of each end is fixed by
//!    the mesh: ring `from → to` is pushed only by shard `from`'s executor and popped only by
//!    shard `to`'s); both may be the same thread (a simulated engine).
//! 2. `head <= tail <= head + capacity`; slots `head..tail` (mod capacity) hold initialised
//!    values, every other slot is uninitialised.
//! 3. A value is written before `tail` is published (Release) and read after `tail` is observed
//!    (Acquire); a slot is reused only after `head` has moved past it (Release / Acquire).
//! 4. Each end keeps its last view of the other end's position (the producer of `head`, the
//!    consumer of `tail`) and reloads it only when the ring looks full (producer) or empty
//!    (consumer), so the other end's cache line is read about once per batch, not per value.
//!    A view is never ahead of the real position (positions only grow), so it errs only
//!    toward "full" or "empty", which the reload then corrects.

use std::cell::UnsafeCell;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;

/// A fixed-capacity SPSC queue. See the module's invariants.
pub(crate) struct Ring<T> {
    consumer: CachePadded<End>,
    producer: CachePadded<End>,
    slots: Box<[UnsafeCell<MaybeUninit<T>>]>,
    mask: usize,
}

/// One end of a ring: its position (the consumer's `head`, the next slot to pop; the
/// producer's `tail`, the next slot to fill) and its own last view of the other end's
/// (invariant 4), touched only by this end's thread.
struct End {
    position: AtomicUsize,
    other_seen: UnsafeCell<usize>,
}

impl End {
    fn new() -> End {
        End { position: AtomicUsize::new(0), other_seen: UnsafeCell::new(0) }
    }
}

// SAFETY: values move from the producer's thread to the consumer's, so `T: Send` suffices; the
// positions are atomics and a slot is touched by one side at a time (invariants 2 and 3).
unsafe impl<T: Send> Send for Ring<T> {}
// SAFETY: as above; `push` and `pop` are each called from one thread only (invariant 1).
unsafe impl<T: Send> Sync for Ring<T> {}

impl<T> Ring<T> {
    /// A ring of `capacity` slots, rounded up to a power of two.
    pub(crate) fn new(capacity: usize) -> Ring<T> {
        let capacity = capacity.max(2).next_power_of_two();
        Ring {
            consumer: CachePadded::new(End::new()),
            producer: CachePadded::new(End::new()),
            slots: (0..capacity).map(|_| UnsafeCell::new(MaybeUninit::uninit())).collect(),
            mask: capacity - 1,
        }
    }

    /// The number of slots.
    pub(crate) fn capacity(&self) -> usize {
        self.mask + 1
    }

    /// Values in the ring now (exact for either end's own thread, a hint for others).
    pub(crate) fn len(&self) -> usize {
        let tail = self.producer.position.load(Ordering::Acquire);
        let head = self.consumer.position.load(Ordering::Acquire);
        tail.wrapping_sub(head)
    }

    /// Whether the ring holds no value.
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends `value`, or gives it back when the ring is full. Producer side only.
    pub(crate) fn push(&self, value: T) -> Result<(), T> {
        let tail = self.producer.position.load(Ordering::Relaxed);
        // SAFETY: only the producer's thread touches its view (invariants 1, 4).
        let head_seen = unsafe { &mut *self.producer.other_seen.get() };
        if tail.wrapping_sub(*head_seen) > self.mask {
            *head_seen = self.consumer.position.load(Ordering::Acquire);
            if tail.wrapping_sub(*head_seen) > self.mask {
                return Err(value);
            }
        }
        // SAFETY: slot `tail` is outside `head..tail` (the view is not ahead of `head`), so it
        // is uninitialised and the consumer does not read it until `tail + 1` is published
        // below (invariants 2, 3, 4).
        unsafe { (*self.slots[tail & self.mask].get()).write(value) };
        self.producer.position.store(tail.wrapping_add(1), Ordering::Release);
        Ok(())
    }

    /// Takes the oldest value. Consumer side only.
    pub(crate) fn pop(&self) -> Option<T> {
        let head = self.consumer.position.load(Ordering::Relaxed);
        // SAFETY: only the consumer's thread touches its view (invariants 1, 4).
        let tail_seen = unsafe { &mut *self.consumer.other_seen.get() };
        if head == *tail_seen {
            *tail_seen = self.producer.position.load(Ordering::Acquire);
            if head == *tail_seen {
                return None;
            }
        }
        // SAFETY: slot `head` is inside `head..tail`, initialised and published (the Acquire
        // load that set the view); after the read it counts as uninitialised once `head`
        // moves on.
        let value = unsafe { (*self.slots[head & self.mask].get()).assume_init_read() };
        self.consumer.position.store(head.wrapping_add(1), Ordering::Release);
        Some(value)
    }
}

impl<T> Drop for Ring<T> {
    fn drop(&mut self) {
        while self.pop().is_some() {}
    }
}

impl<T> std::fmt::Debug for Ring<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("len", &self.len())
            .field("capacity", &self.capacity())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn wraps_around_many_times_in_order() {
        let ring = Ring::new(4);
        let mut next_in = 0u64;
        let mut next_out = 0u64;
        for round in 0..1000 {
            let pushes = round % 5;
            for _ in 0..pushes {
                if ring.push(next_in).is_ok() {
                    next_in += 1;
                }
            }
            while let Some(v) = ring.pop() {
                assert_eq!(v, next_out);
                next_out += 1;
            }
        }
        assert_eq!(next_in, next_out);
        assert!(next_in > 1000, "the ring wrapped {} times", next_in / 4);
    }

    #[test]
    fn a_full_ring_refuses_and_gives_the_value_back() {
        let ring = Ring::new(3); // rounded up to 4
        assert_eq!(ring.capacity(), 4);
        for i in 0..4 {
            assert!(ring.push(i).is_ok());
        }
        assert_eq!(ring.push(99), Err(99));
        assert_eq!(ring.pop(), Some(0));
        assert!(ring.push(4).is_ok());
        let rest: Vec<_> = std::iter::from_fn(|| ring.pop()).collect();
        assert_eq!(rest, vec![1, 2, 3, 4]);
    }

    #[test]
    fn values_left_in_a_dropped_ring_are_dropped() {
        let tracker = Arc::new(());
        let ring = Ring::new(8);
        for _ in 0..5 {
            ring.push(Arc::clone(&tracker)).expect("room");
        }
        drop(ring);
        assert_eq!(Arc::strong_count(&tracker), 1);
    }

    #[test]
    fn two_threads_pass_a_million_values_in_order() {
        let ring = Arc::new(Ring::new(128));
        let producer = {
            let ring = Arc::clone(&ring);
            std::thread::spawn(move || {
                for i in 0..1_000_000u64 {
                    let mut v = i;
                    while let Err(back) = ring.push(v) {
                        v = back;
                        std::hint::spin_loop();
                    }
                }
            })
        };
        let mut expected = 0u64;
        while expected < 1_000_000 {
            match ring.pop() {
                Some(v) => {
                    assert_eq!(v, expected);
                    expected += 1;
                }
                None => std::hint::spin_loop(),
            }
        }
        producer.join().expect("producer");
        assert!(ring.is_empty());
    }
}
