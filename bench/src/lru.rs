//! An exact LRU over block numbers: a hash index and an index-linked recency list over a fixed
//! number of slots. The Mutex-LRU baseline keeps its data in the slots; the hit-ratio
//! simulation uses it alone.
//!
//! Three invariants:
//! 1. `index` maps each cached block to its slot, and `keys[slot]` maps back.
//! 2. The list from `head` (most recent) to `tail` (least recent) holds every used slot once.
//! 3. A pinned slot (`pins > 0`) is never evicted.

use hashbrown::HashMap;

use crate::workload::Bounded;

const NIL: u32 = u32::MAX;

/// An exact LRU of `capacity` slots.
#[derive(Debug)]
pub struct Lru {
    index: HashMap<u64, u32>,
    keys: Vec<u64>,
    prev: Vec<u32>,
    next: Vec<u32>,
    pins: Vec<u32>,
    head: u32,
    tail: u32,
    capacity: u32,
}

impl Lru {
    /// An empty LRU of `capacity` (≥ 1) slots; everything is allocated now.
    pub fn new(capacity: usize) -> Lru {
        assert!(capacity >= 1 && capacity < NIL as usize, "validated by the caller");
        let mut index = HashMap::new();
        index.reserve(capacity);
        Lru {
            index,
            keys: Vec::with_capacity(capacity),
            prev: Vec::with_capacity(capacity),
            next: Vec::with_capacity(capacity),
            pins: Vec::with_capacity(capacity),
            head: NIL,
            tail: NIL,
            capacity: capacity as u32,
        }
    }

    fn unlink(&mut self, slot: u32) {
        let (p, n) = (self.prev[slot as usize], self.next[slot as usize]);
        if p == NIL {
            self.head = n
        } else {
            self.next[p as usize] = n
        }
        if n == NIL {
            self.tail = p
        } else {
            self.prev[n as usize] = p
        }
    }

    fn push_front(&mut self, slot: u32) {
        self.prev[slot as usize] = NIL;
        self.next[slot as usize] = self.head;
        if self.head != NIL {
            self.prev[self.head as usize] = slot;
        }
        self.head = slot;
        if self.tail == NIL {
            self.tail = slot;
        }
    }

    /// The slot of `key`, made most recent, or `None`.
    #[inline]
    pub fn get(&mut self, key: u64) -> Option<u32> {
        let slot = *self.index.get(&key)?;
        if self.head != slot {
            self.unlink(slot);
            self.push_front(slot);
        }
        Some(slot)
    }

    /// Inserts absent `key` as most recent: a fresh slot while there are any, else the least
    /// recent unpinned one. `None` when every slot is pinned.
    pub fn insert(&mut self, key: u64) -> Option<u32> {
        debug_assert!(!self.index.contains_key(&key));
        let slot = if (self.keys.len() as u32) < self.capacity {
            let slot = self.keys.len() as u32;
            self.keys.push(key);
            self.prev.push(NIL);
            self.next.push(NIL);
            self.pins.push(0);
            slot
        } else {
            let mut victim = self.tail;
            while victim != NIL && self.pins[victim as usize] > 0 {
                victim = self.prev[victim as usize];
            }
            if victim == NIL {
                return None;
            }
            self.unlink(victim);
            self.index.remove(&self.keys[victim as usize]);
            self.keys[victim as usize] = key;
            victim
        };
        self.index.insert(key, slot);
        self.push_front(slot);
        Some(slot)
    }

    /// Pins a slot against eviction.
    pub fn pin(&mut self, slot: u32) {
        self.pins[slot as usize] += 1;
    }

    /// Releases a pin.
    pub fn unpin(&mut self, slot: u32) {
        self.pins[slot as usize] -= 1;
    }

    /// Blocks cached.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.index.len()
    }
}

/// Hits and misses of an exact LRU over every access: an operation hits when its block is
/// cached, else misses (a write to an uncached block is a miss without a read, as corebuf's
/// `new_block` that installs a fresh buffer).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HitCount {
    /// Accesses that found the block.
    pub hits: u64,
    /// Reads that did not.
    pub misses: u64,
}

impl HitCount {
    /// hits ÷ (hits + misses).
    pub fn ratio(&self) -> f64 {
        let total = self.hits + self.misses;
        if total == 0 {
            0.0
        } else {
            self.hits as f64 / total as f64
        }
    }
}

/// Replays phases of worker streams (each interleaved round-robin, at most `ops_max`
/// operations) through an exact LRU of `capacity` blocks, and counts the phases marked
/// `counted`.
pub fn simulate(capacity: usize, phases: Vec<(Vec<Vec<Bounded>>, u64, bool)>) -> HitCount {
    let mut lru = Lru::new(capacity);
    let mut count = HitCount::default();
    for (streams, ops_max, counted) in phases {
        let mut sink = HitCount::default();
        replay(&mut lru, streams, ops_max, if counted { &mut count } else { &mut sink });
    }
    count
}

fn replay(lru: &mut Lru, streams: Vec<Vec<Bounded>>, ops_max: u64, count: &mut HitCount) {
    let mut streams: Vec<Bounded> = streams.into_iter().flatten().collect();
    let mut done = 0u64;
    while done < ops_max && !streams.is_empty() {
        streams.retain_mut(|stream| {
            if done >= ops_max {
                return true;
            }
            let Some(op) = stream.next_op() else { return false };
            done += 1;
            match lru.get(op.block) {
                Some(_) => count.hits += 1,
                None => {
                    count.misses += 1;
                    lru.insert(op.block);
                }
            }
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_least_recent_unpinned_block() {
        let mut lru = Lru::new(3);
        for k in [1, 2, 3] {
            lru.insert(k).unwrap();
        }
        assert!(lru.get(1).is_some()); // order now 1, 3, 2 (most recent first)
        let slot3 = lru.get(3).unwrap(); // 3, 1, 2
        lru.insert(4).unwrap(); // evicts 2
        assert!(lru.get(2).is_none());
        lru.pin(slot3);
        lru.get(1); // 1, 4, 3(pinned)
        lru.insert(5).unwrap(); // 3 is pinned: evicts 4
        assert!(lru.get(4).is_none());
        assert!(lru.get(3).is_some());
        assert_eq!(lru.len(), 3);
        let mut all_pinned = Lru::new(1);
        let s = all_pinned.insert(9).unwrap();
        all_pinned.pin(s);
        assert_eq!(all_pinned.insert(10), None);
    }

    #[test]
    fn a_loop_larger_than_the_cache_never_hits_and_a_smaller_one_always_does() {
        use crate::workload::{Op, OpKind, Stream};
        let ops = |n: u64| -> Vec<Vec<Bounded>> {
            let loop_ops: Vec<Op> =
                (0..10).flat_map(|_| 0..n).map(|b| Op { block: b, kind: OpKind::Read }).collect();
            let cursor = crate::workload::TraceCursor::new(loop_ops.into());
            vec![vec![Bounded::new(Stream::Trace(cursor), None, None)]]
        };
        assert_eq!(simulate(8, vec![(ops(9), u64::MAX, true)]).hits, 0);
        let small = simulate(8, vec![(ops(8), u64::MAX, true)]);
        assert_eq!((small.hits, small.misses), (72, 8));
    }
}
