//! The block index: an open-addressing hash table of frame numbers, keyed by the block number
//! stored in each frame's metadata.
//!
//! A slot is 4 bytes (a frame number, or empty); the key is not stored twice, it is read from
//! the frame's [`Hot`] record, which a hit touches anyway. There are exactly two slots per frame
//! (8 bytes per frame whatever the frame count: the home slot is picked by multiply-shift
//! range reduction rather than a power-of-two mask), so linear probing stays short, and
//! deletion shifts later entries back (no tombstones): the table never degrades and never
//! allocates after construction.
//!
//! When the frame numbers fit in 24 bits (up to 16 M frames, 64 GiB of 4 KiB blocks per
//! shard), the top byte of a slot holds 8 bits of the block's hash: a probe that meets another
//! block's slot skips it without touching that block's hot record (a cache miss) 255 times in
//! 256.
//!
//! Ordering hazard: a frame's `Hot::block` must hold its block while the frame is in the
//! index. Insert after setting it, remove before changing it.

use super::frame::Hot;

const EMPTY: u32 = u32::MAX;
/// The tag bits of a slot, when frames fit below them.
const TAG_MASK: u32 = 0xFF00_0000;

/// Block number → frame, for up to `frame_count` frames.
#[derive(Debug)]
pub(crate) struct FrameIndex {
    slots: Box<[u32]>,
    /// `TAG_MASK`, or 0 when frame numbers need all 32 bits (no tags).
    tag_mask: u32,
}

impl FrameIndex {
    /// An empty index for `frame_count` frames, or `None` if it cannot be allocated.
    pub(crate) fn try_new(frame_count: usize) -> Option<Self> {
        // Frame numbers below 0xFF_FFFF: a tagged slot never equals EMPTY.
        Self::with_tags(frame_count, frame_count < (!TAG_MASK) as usize)
    }

    fn with_tags(frame_count: usize, tags: bool) -> Option<Self> {
        let slot_count = Self::slot_count(frame_count)?;
        let mut slots = Vec::new();
        slots.try_reserve_exact(slot_count).ok()?;
        slots.resize(slot_count, EMPTY);
        let tag_mask = if tags { TAG_MASK } else { 0 };
        Some(FrameIndex { slots: slots.into_boxed_slice(), tag_mask })
    }

    fn slot_count(frame_count: usize) -> Option<usize> {
        Some(frame_count.checked_mul(2)?.max(8))
    }

    /// Bytes per frame this index costs (its slots over the frames it was sized for).
    pub(crate) fn bytes_per_frame(frame_count: usize) -> usize {
        let slot_count = Self::slot_count(frame_count).unwrap_or(usize::MAX / 4);
        (slot_count * 4).div_ceil(frame_count.max(1))
    }

    /// The home slot and the tag of `block`.
    #[inline]
    fn place(&self, block: u64) -> (usize, u32) {
        // Fibonacci hashing (a multiplication by 2^64 / φ mixes the block number into the
        // high bits), then multiply-shift range reduction of those bits onto the slots. The tag
        // comes from bits 24..32, which the home does not use.
        let hash = block.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let home = ((hash as u128 * self.slots.len() as u128) >> 64) as usize;
        (home, (hash as u32) & self.tag_mask)
    }

    #[inline]
    fn frame_of(&self, slot: u32) -> u32 {
        slot & !self.tag_mask
    }

    #[inline]
    fn next(&self, at: usize) -> usize {
        if at + 1 == self.slots.len() {
            0
        } else {
            at + 1
        }
    }

    /// The frame holding `block`, if any.
    #[inline]
    pub(crate) fn get(&self, block: u64, hot: &[Hot]) -> Option<u32> {
        let (mut at, tag) = self.place(block);
        loop {
            let slot = self.slots[at];
            if slot == EMPTY {
                return None;
            }
            if slot & self.tag_mask == tag {
                let frame = self.frame_of(slot);
                if hot[frame as usize].block() == block {
                    return Some(frame);
                }
            }
            at = self.next(at);
        }
    }

    /// Asks the CPU to start loading `block`'s home slot (a hint for [`Self::likely_frame`]).
    #[inline]
    pub(crate) fn prefetch_home(&self, block: u64) {
        let (at, _) = self.place(block);
        super::prefetch_read(&self.slots[at]);
    }

    /// The frame that probably holds `block`, read from the slots alone: the first slot of its
    /// probe run whose tag matches (without tags, the first occupied one). No hot record is
    /// read, so the answer may name another block's frame; it is for hints, never for data.
    #[inline]
    pub(crate) fn likely_frame(&self, block: u64) -> Option<u32> {
        let (mut at, tag) = self.place(block);
        loop {
            let slot = self.slots[at];
            if slot == EMPTY {
                return None;
            }
            if slot & self.tag_mask == tag {
                return Some(self.frame_of(slot));
            }
            at = self.next(at);
        }
    }

    /// Adds `frame` for `block` (which `hot[frame].block()` already holds, and which is not in
    /// the index).
    pub(crate) fn insert(&mut self, block: u64, frame: u32, hot: &[Hot]) {
        debug_assert_eq!(hot[frame as usize].block(), block, "insert after setting Hot::block");
        debug_assert!(self.get(block, hot).is_none(), "block {block} indexed twice");
        let (mut at, tag) = self.place(block);
        while self.slots[at] != EMPTY {
            at = self.next(at);
        }
        self.slots[at] = frame | tag;
    }

    /// Removes `block` (while `hot` still names it); returns whether it was there.
    pub(crate) fn remove(&mut self, block: u64, hot: &[Hot]) -> bool {
        let (mut hole, tag) = self.place(block);
        loop {
            let slot = self.slots[hole];
            if slot == EMPTY {
                return false;
            }
            if slot & self.tag_mask == tag && hot[self.frame_of(slot) as usize].block() == block {
                break;
            }
            hole = self.next(hole);
        }
        self.slots[hole] = EMPTY;
        // Backward-shift: move each later entry of the probe run into the hole if its home
        // is not in the cyclic range (hole, at], so every entry stays reachable from its home.
        let mut at = hole;
        loop {
            at = self.next(at);
            let slot = self.slots[at];
            if slot == EMPTY {
                return true;
            }
            let (home, _) = self.place(hot[self.frame_of(slot) as usize].block());
            let reachable_without_move =
                if hole <= at { hole < home && home <= at } else { hole < home || home <= at };
            if !reachable_without_move {
                self.slots[hole] = slot;
                self.slots[at] = EMPTY;
                hole = at;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SimRng;
    use std::collections::HashMap;

    #[test]
    fn random_inserts_and_removes_agree_with_a_hash_map() {
        for tags in [true, false] {
            agrees_with_a_hash_map(tags);
        }
    }

    fn agrees_with_a_hash_map(tags: bool) {
        // 300 frames: 600 slots, not a power of two, so range reduction and wrapping are hit.
        let frames = 300usize;
        let meta: Vec<Hot> = (0..frames).map(|_| Hot::empty()).collect();
        let mut index = FrameIndex::with_tags(frames, tags).unwrap();
        assert_eq!(index.tag_mask != 0, tags);
        let mut model: HashMap<u64, u32> = HashMap::new();
        let mut free: Vec<u32> = (0..frames as u32).collect();
        let mut rng = SimRng::new(42);
        for step in 0..200_000 {
            // Few distinct blocks, many collisions, so probe runs wrap and shift.
            let block = rng.below(1_000) * 7_919;
            match model.get(&block).copied() {
                Some(frame) if rng.chance(0.5) => {
                    assert!(index.remove(block, &meta), "step {step}");
                    meta[frame as usize].set_block(u64::MAX);
                    model.remove(&block);
                    free.push(frame);
                }
                None if !free.is_empty() => {
                    let frame = free.swap_remove(rng.below(free.len() as u64) as usize);
                    meta[frame as usize].set_block(block);
                    index.insert(block, frame, &meta);
                    model.insert(block, frame);
                }
                _ => {}
            }
            if step % 997 == 0 {
                for probe in 0..1_000u64 {
                    let b = probe * 7_919;
                    assert_eq!(
                        index.get(b, &meta),
                        model.get(&b).copied(),
                        "step {step} block {b}"
                    );
                }
            }
        }
        assert!(!index.remove(123_456_789, &meta));
    }
}
