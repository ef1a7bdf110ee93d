//! S3-FIFO eviction (Yang et al., SOSP 2023): a small probationary FIFO, a main FIFO with
//! CLOCK-style second chances, and a ghost FIFO of recently evicted block numbers.
//!
//! Why S3-FIFO: it is scan-resistant (a one-time scan passes through the small queue and never
//! reaches the main one), its hit cost is a saturating increment of a 2-bit counter with no list
//! movement (so a hit touches one byte), and eviction is amortised O(1). Plain LRU moves a node
//! on every hit and is flushed by scans; plain SIEVE is not scan-resistant.
//!
//! The per-frame frequency and queue tag live in one byte of the frame's [`Hot`] record (the
//! record a hit touches anyway), so a hit costs no extra cache line.
//!
//! Three invariants:
//! 1. A frame is in at most one of the two queues; its queue tag says which.
//! 2. The lists are intrusive (`prev` / `next` arrays sized at start): nothing allocates after
//!    construction, and removal from the middle (forget) is O(1).
//! 3. The ghost holds at most `ghost_capacity` block numbers, oldest evicted first.

use std::collections::VecDeque;
use std::rc::Rc;

use hashbrown::HashMap;

use super::frame::Hot;

const NIL: u32 = u32::MAX;
const FREQ_MAX: u8 = 3;
/// A frame leaving the small queue is promoted to main if it was hit at least this often.
const PROMOTE_FREQ_MIN: u8 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum QueueId {
    None = 0,
    Small = 1,
    Main = 2,
}

/// Bits of the policy byte of [`Hot`].
const FREQ_MASK: u8 = 0b11;
const QUEUE_SHIFT: u8 = 2;
const QUEUE_MASK: u8 = 0b11 << QUEUE_SHIFT;

#[derive(Clone, Copy, Debug, Default)]
struct List {
    head: u32,
    tail: u32,
    len: usize,
}

/// The eviction policy state of one partition.
#[derive(Debug)]
pub(crate) struct S3Fifo {
    prev: Box<[u32]>,
    next: Box<[u32]>,
    /// The frames' hot records, shared with the table: this policy owns their policy byte.
    hot: Rc<[Hot]>,
    small: List,
    main: List,
    small_target: usize,
    ghost_ring: VecDeque<u64>,
    ghost_count: HashMap<u64, u32>,
    ghost_capacity: usize,
}

/// What the partition says about an eviction candidate.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Candidate {
    /// Evict it; it held this block.
    Evict(u64),
    /// It cannot go now (pinned, being read, dirty, being written): skip it.
    Keep,
}

impl S3Fifo {
    pub(crate) fn new(hot: Rc<[Hot]>) -> Self {
        let frame_count = hot.len();
        let small_target = (frame_count / 10).max(1);
        let ghost_capacity = frame_count.saturating_sub(small_target).max(1);
        S3Fifo {
            prev: vec![NIL; frame_count].into_boxed_slice(),
            next: vec![NIL; frame_count].into_boxed_slice(),
            hot,
            small: List { head: NIL, tail: NIL, len: 0 },
            main: List { head: NIL, tail: NIL, len: 0 },
            small_target,
            ghost_ring: VecDeque::with_capacity(ghost_capacity),
            ghost_count: HashMap::with_capacity(ghost_capacity),
            ghost_capacity,
        }
    }

    /// Bytes of policy metadata per frame outside the hot record (the two list links).
    pub(crate) const BYTES_PER_FRAME: usize = 4 + 4;

    #[inline]
    fn freq(&self, frame: u32) -> u8 {
        self.hot[frame as usize].policy() & FREQ_MASK
    }

    #[inline]
    fn set_freq(&self, frame: u32, freq: u8) {
        let h = &self.hot[frame as usize];
        h.set_policy((h.policy() & !FREQ_MASK) | freq);
    }

    #[inline]
    fn queue_of(&self, frame: u32) -> QueueId {
        match (self.hot[frame as usize].policy() & QUEUE_MASK) >> QUEUE_SHIFT {
            1 => QueueId::Small,
            2 => QueueId::Main,
            _ => QueueId::None,
        }
    }

    #[inline]
    fn set_queue(&self, frame: u32, queue: QueueId) {
        let h = &self.hot[frame as usize];
        h.set_policy((h.policy() & !QUEUE_MASK) | ((queue as u8) << QUEUE_SHIFT));
    }

    /// Bytes the ghost holds: its ring of block numbers and its lookup table (hashbrown:
    /// one control byte and one `(u64, u32)` entry per bucket).
    pub(crate) fn ghost_bytes(&self) -> usize {
        self.ghost_ring.capacity() * 8 + self.ghost_count.capacity() * (16 + 1) * 8 / 7
    }

    /// Admits a frame that now holds `block`: to main if the block was recently evicted (it is
    /// in the ghost), else to the small probationary queue.
    pub(crate) fn insert(&mut self, frame: u32, block: u64) {
        debug_assert_eq!(self.queue_of(frame), QueueId::None);
        self.set_freq(frame, 0);
        if self.ghost_remove(block) {
            self.push_head(QueueId::Main, frame);
        } else {
            self.push_head(QueueId::Small, frame);
        }
    }

    /// Records a hit: one saturating increment, no list movement.
    #[cfg(test)]
    fn touch(&self, frame: u32) {
        touch(&self.hot[frame as usize]);
    }

    /// Evicts a specific frame the caller knows is evictable (a dirty victim whose eviction
    /// write just completed): unlinks it, and remembers its block in the ghost if it was still
    /// on probation, as a scan would have.
    pub(crate) fn evict_frame(&mut self, frame: u32, block: u64) {
        let queue = self.queue_of(frame);
        if queue == QueueId::None {
            return;
        }
        self.unlink(frame);
        if queue == QueueId::Small {
            self.ghost_add(block);
        }
    }

    /// Takes a frame out of the policy (forgotten or re-homed).
    pub(crate) fn remove(&mut self, frame: u32) {
        if self.queue_of(frame) != QueueId::None {
            self.unlink(frame);
        }
    }

    /// Finds a frame to evict, asking `judge` about each candidate. `None` means every frame
    /// in both queues was judged and kept: nothing can be evicted now (the caller waits for a
    /// release or a write to end, so a `None` while an evictable frame exists is a hang).
    ///
    /// First the S3-FIFO scan: the small queue while it is over its target share, else the
    /// main queue with its second chances. A queue whose every frame was just kept is closed
    /// for the rest of the scan, so pinned or dirty frames in one queue do not hide evictable
    /// frames in the other. The scan's step bound lets every main frame spend its `FREQ_MAX`
    /// second chances. If the scan finds nothing, [`S3Fifo::sweep`] judges every frame once.
    pub(crate) fn evict(&mut self, mut judge: impl FnMut(u32) -> Candidate) -> Option<u32> {
        let budget = (FREQ_MAX as usize + 3) * (self.small.len + self.main.len) + 2;
        // Small frames judged and kept in this scan. Small frames only leave the small queue
        // during a scan (promoted or evicted) and a kept one goes to the head, so it comes up
        // again only after every other small frame: `small_kept == small.len` means every
        // small frame was kept.
        let mut small_kept = 0;
        // Main frames judged and kept in a row since the last second chance: `main.len` in a
        // row is a whole round of keeps (a frame promoted meanwhile may be missed; the sweep
        // catches it).
        let mut main_kept = 0;
        for _ in 0..budget {
            let small_open = self.small.len > small_kept;
            let main_open = self.main.len > main_kept;
            let from_small = match (small_open, main_open) {
                (false, false) => break,
                (true, false) => true,
                (false, true) => false,
                (true, true) => self.small.len > self.small_target,
            };
            let (queue, list) =
                if from_small { (QueueId::Small, self.small) } else { (QueueId::Main, self.main) };
            let frame = list.tail;
            let freq = self.freq(frame);
            self.unlink(frame);
            if queue == QueueId::Small && freq >= PROMOTE_FREQ_MIN {
                self.set_freq(frame, 0);
                self.push_head(QueueId::Main, frame);
                continue;
            }
            if queue == QueueId::Main && freq > 0 {
                self.set_freq(frame, freq - 1);
                self.push_head(QueueId::Main, frame);
                main_kept = 0;
                continue;
            }
            match judge(frame) {
                Candidate::Evict(block) => {
                    if queue == QueueId::Small {
                        self.ghost_add(block);
                    }
                    return Some(frame);
                }
                Candidate::Keep => {
                    self.push_head(queue, frame);
                    if queue == QueueId::Small {
                        small_kept += 1;
                    } else {
                        main_kept += 1;
                    }
                }
            }
        }
        self.sweep(judge)
    }

    /// The fallback of [`S3Fifo::evict`]: judges every frame once, small queue then main, from
    /// the tail, ignoring frequencies, and evicts the first one the judge lets go. O(frames),
    /// and only reached when the scan found nothing (under pressure).
    fn sweep(&mut self, mut judge: impl FnMut(u32) -> Candidate) -> Option<u32> {
        for queue in [QueueId::Small, QueueId::Main] {
            let mut frame = self.list_mut(queue).tail;
            while frame != NIL {
                let towards_head = self.prev[frame as usize];
                if let Candidate::Evict(block) = judge(frame) {
                    self.unlink(frame);
                    if queue == QueueId::Small {
                        self.ghost_add(block);
                    }
                    return Some(frame);
                }
                frame = towards_head;
            }
        }
        None
    }

    fn list_mut(&mut self, queue: QueueId) -> &mut List {
        match queue {
            QueueId::Small => &mut self.small,
            QueueId::Main => &mut self.main,
            QueueId::None => unreachable!("frames are only linked into real queues"),
        }
    }

    fn push_head(&mut self, queue: QueueId, frame: u32) {
        let list = *self.list_mut(queue);
        self.prev[frame as usize] = NIL;
        self.next[frame as usize] = list.head;
        if list.head != NIL {
            self.prev[list.head as usize] = frame;
        }
        let list = self.list_mut(queue);
        list.head = frame;
        if list.tail == NIL {
            list.tail = frame;
        }
        list.len += 1;
        self.set_queue(frame, queue);
    }

    fn unlink(&mut self, frame: u32) {
        let queue = self.queue_of(frame);
        let (prev, next) = (self.prev[frame as usize], self.next[frame as usize]);
        if prev != NIL {
            self.next[prev as usize] = next;
        }
        if next != NIL {
            self.prev[next as usize] = prev;
        }
        let list = self.list_mut(queue);
        if list.head == frame {
            list.head = next;
        }
        if list.tail == frame {
            list.tail = prev;
        }
        list.len -= 1;
        self.set_queue(frame, QueueId::None);
        self.prev[frame as usize] = NIL;
        self.next[frame as usize] = NIL;
    }

    fn ghost_add(&mut self, block: u64) {
        if self.ghost_ring.len() == self.ghost_capacity {
            if let Some(old) = self.ghost_ring.pop_front() {
                self.ghost_forget_one(old);
            }
        }
        self.ghost_ring.push_back(block);
        *self.ghost_count.entry(block).or_insert(0) += 1;
    }

    fn ghost_forget_one(&mut self, block: u64) {
        if let Some(count) = self.ghost_count.get_mut(&block) {
            *count -= 1;
            if *count == 0 {
                self.ghost_count.remove(&block);
            }
        }
    }

    /// Whether `block` was in the ghost; it leaves the ghost's lookup either way (its ring slot
    /// ages out on its own).
    fn ghost_remove(&mut self, block: u64) -> bool {
        self.ghost_count.remove(&block).is_some()
    }
}

/// Records a hit on a frame's hot record: one saturating increment of its 2-bit frequency, no
/// list movement. A free function so that the hit path needs no borrow of the policy.
#[inline]
pub(crate) fn touch(hot: &Hot) {
    let p = hot.policy();
    if p & FREQ_MASK < FREQ_MAX {
        hot.set_policy(p + 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(frames: usize) -> S3Fifo {
        S3Fifo::new(crate::cache::frame::hot_array(frames).unwrap())
    }

    /// Drives the policy alone as a cache of `frames` blocks; returns the hit count.
    fn run(frames: usize, trace: &[u64]) -> (S3Fifo, usize) {
        let mut policy = policy(frames);
        let mut where_is: HashMap<u64, u32> = HashMap::new();
        let mut block_of = vec![u64::MAX; frames];
        let mut free: Vec<u32> = (0..frames as u32).rev().collect();
        let mut hits = 0;
        for &block in trace {
            if let Some(&frame) = where_is.get(&block) {
                policy.touch(frame);
                hits += 1;
                continue;
            }
            let frame = free.pop().unwrap_or_else(|| {
                policy
                    .evict(|f| Candidate::Evict(block_of[f as usize]))
                    .expect("an unconstrained policy can always evict")
            });
            if block_of[frame as usize] != u64::MAX {
                where_is.remove(&block_of[frame as usize]);
            }
            block_of[frame as usize] = block;
            where_is.insert(block, frame);
            policy.insert(frame, block);
        }
        (policy, hits)
    }

    #[test]
    fn hot_set_survives_a_scan_twice_the_cache_size() {
        let frames = 100;
        let hot: Vec<u64> = (0..50).collect();
        let mut trace = Vec::new();
        for _ in 0..5 {
            trace.extend_from_slice(&hot);
        }
        trace.extend(1_000..1_200); // the scan: 2 × frames of blocks never seen again
        let warm = trace.len();
        trace.extend_from_slice(&hot);
        let (_, hits) = run(frames, &trace);
        let (_, hits_before_check) = run(frames, &trace[..warm]);
        assert_eq!(hits - hits_before_check, hot.len(), "every hot block must still be cached");
    }

    /// Regression: the scan used to take from the small queue while it was over its target,
    /// and kept (pinned) small frames went back to it, so it never looked at the main queue.
    #[test]
    fn evict_looks_past_a_small_queue_of_kept_frames_into_main() {
        let mut policy = policy(10); // small target: 1 frame
        for f in 0..10 {
            policy.insert(f, f as u64);
        }
        for f in 5..10 {
            policy.touch(f); // promoted to main by the scan below
        }
        let victim =
            policy.evict(|f| if f < 5 { Candidate::Keep } else { Candidate::Evict(f as u64) });
        assert!(matches!(victim, Some(5..=9)), "{victim:?}");
    }

    /// Regression: the scan's budget of two passes ran out before main frames at the highest
    /// frequency had spent their second chances, so it found nothing on a cache of hot blocks.
    #[test]
    fn evict_lets_hot_main_frames_spend_every_second_chance() {
        let mut policy = policy(10);
        for f in 0..10 {
            policy.insert(f, f as u64);
            policy.touch(f);
        }
        assert_eq!(policy.evict(|_| Candidate::Keep), None); // promotes all ten to main
        assert_eq!(policy.main.len, 10);
        for f in 0..10 {
            for _ in 0..FREQ_MAX {
                policy.touch(f);
            }
        }
        let victim = policy.evict(|f| Candidate::Evict(f as u64));
        assert!(victim.is_some(), "every frame is evictable once its chances are spent");
    }

    #[test]
    fn evict_returns_none_only_when_every_frame_was_kept() {
        let mut policy = policy(8);
        for f in 0..8 {
            policy.insert(f, f as u64);
            if f % 2 == 0 {
                policy.touch(f);
            }
        }
        let mut judged = std::collections::HashSet::new();
        assert_eq!(
            policy.evict(|f| {
                judged.insert(f);
                Candidate::Keep
            }),
            None
        );
        assert_eq!(judged.len(), 8, "every frame was asked about before giving up");
        // Only the last frame of the main queue may go.
        let victim = policy.evict(|f| if f == 6 { Candidate::Evict(6) } else { Candidate::Keep });
        assert_eq!(victim, Some(6));
    }

    /// Regression: a scan that counted every refusal in the main queue, revisits included,
    /// declared main exhausted after seeing a pinned frame twice, while another main frame was
    /// still spending its second chances and would have been evictable.
    #[test]
    fn evict_does_not_give_up_on_a_main_frame_with_second_chances_left() {
        for hot_first in [false, true] {
            let mut policy = policy(2);
            policy.insert(0, 0);
            policy.insert(1, 1);
            policy.touch(0);
            policy.touch(1);
            assert_eq!(policy.evict(|_| Candidate::Keep), None); // both promoted to main
            let hot = if hot_first { 0 } else { 1 };
            policy.touch(hot);
            policy.touch(hot);
            let victim =
                policy
                    .evict(|f| if f == hot { Candidate::Evict(f as u64) } else { Candidate::Keep });
            assert_eq!(victim, Some(hot), "the hot frame can go once its chances are spent");
        }
    }

    #[test]
    fn pinned_candidates_are_skipped_and_none_when_all_are_kept() {
        let mut policy = policy(4);
        for f in 0..4 {
            policy.insert(f, f as u64);
        }
        assert_eq!(policy.evict(|_| Candidate::Keep), None);
        let victim = policy.evict(|f| if f == 2 { Candidate::Evict(2) } else { Candidate::Keep });
        assert_eq!(victim, Some(2));
        policy.remove(0);
        assert_eq!(policy.small.len + policy.main.len, 2);
    }
}
