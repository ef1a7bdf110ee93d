//! The block index: an open-addressing hash table of frame numbers, keyed by the block number
//! stored in each frame's metadata.
//!
//! A slot is 4 bytes (a frame number, or empty); the key is not stored twice, it is read from
//! `meta[frame].block`. With at most one frame per two slots, linear probing stays short, and
//! deletion shifts later entries back (no tombstones), so the table never degrades and never
//! allocates after construction.
//!
//! Ordering hazard: a frame's `meta.block` must hold its block while the frame is in the
//! index. Insert after setting it, remove before changing it.

use super::table::FrameMeta;

const EMPTY: u32 = u32::MAX;

/// Block number → frame, for up to `frame_count` frames.
#[derive(Debug)]
pub(crate) struct FrameIndex {
    slots: Box<[u32]>,
    mask: usize,
    shift: u32,
}

impl FrameIndex {
    /// An empty index for `frame_count` frames, or `None` if it cannot be allocated.
    pub(crate) fn try_new(frame_count: usize) -> Option<Self> {
        let slot_count = frame_count.checked_mul(2)?.next_power_of_two().max(8);
        let mut slots = Vec::new();
        slots.try_reserve_exact(slot_count).ok()?;
        slots.resize(slot_count, EMPTY);
        Some(FrameIndex {
            slots: slots.into_boxed_slice(),
            mask: slot_count - 1,
            shift: 64 - slot_count.trailing_zeros(),
        })
    }

    /// Bytes per frame this index costs (its slots over the frames it was sized for).
    pub(crate) fn bytes_per_frame(frame_count: usize) -> usize {
        let slot_count = (frame_count * 2).next_power_of_two().max(8);
        (slot_count * 4).div_ceil(frame_count.max(1))
    }

    #[inline]
    fn home(&self, block: u64) -> usize {
        // Fibonacci hashing: the top bits of a multiplication by 2^64 / φ.
        (block.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize
    }

    /// The frame holding `block`, if any.
    #[inline]
    pub(crate) fn get(&self, block: u64, meta: &[FrameMeta]) -> Option<u32> {
        let mut at = self.home(block);
        loop {
            let frame = self.slots[at];
            if frame == EMPTY {
                return None;
            }
            if meta[frame as usize].block == block {
                return Some(frame);
            }
            at = (at + 1) & self.mask;
        }
    }

    /// Adds `frame` for `block` (which `meta[frame].block` already holds, and which is not in
    /// the index).
    pub(crate) fn insert(&mut self, block: u64, frame: u32, meta: &[FrameMeta]) {
        debug_assert_eq!(meta[frame as usize].block, block, "insert after setting meta.block");
        debug_assert!(self.get(block, meta).is_none(), "block {block} indexed twice");
        let mut at = self.home(block);
        while self.slots[at] != EMPTY {
            at = (at + 1) & self.mask;
        }
        self.slots[at] = frame;
    }

    /// Removes `block` (while `meta` still names it); returns whether it was there.
    pub(crate) fn remove(&mut self, block: u64, meta: &[FrameMeta]) -> bool {
        let mut hole = self.home(block);
        loop {
            let frame = self.slots[hole];
            if frame == EMPTY {
                return false;
            }
            if meta[frame as usize].block == block {
                break;
            }
            hole = (hole + 1) & self.mask;
        }
        self.slots[hole] = EMPTY;
        // Backward-shift: move each later entry of the probe run into the hole if its home
        // is not in the cyclic range (hole, at], so every entry stays reachable from its home.
        let mut at = hole;
        loop {
            at = (at + 1) & self.mask;
            let frame = self.slots[at];
            if frame == EMPTY {
                return true;
            }
            let home = self.home(meta[frame as usize].block);
            let reachable_without_move =
                if hole <= at { hole < home && home <= at } else { hole < home || home <= at };
            if !reachable_without_move {
                self.slots[hole] = frame;
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
        let frames = 300usize;
        let mut meta = vec![FrameMeta::EMPTY; frames];
        let mut index = FrameIndex::try_new(frames).unwrap();
        let mut model: HashMap<u64, u32> = HashMap::new();
        let mut free: Vec<u32> = (0..frames as u32).collect();
        let mut rng = SimRng::new(42);
        for step in 0..200_000 {
            // Few distinct blocks, many collisions, so probe runs wrap and shift.
            let block = rng.below(1_000) * 7_919;
            match model.get(&block).copied() {
                Some(frame) if rng.chance(0.5) => {
                    assert!(index.remove(block, &meta), "step {step}");
                    meta[frame as usize] = FrameMeta::EMPTY;
                    model.remove(&block);
                    free.push(frame);
                }
                None if !free.is_empty() => {
                    let frame = free.swap_remove(rng.below(free.len() as u64) as usize);
                    meta[frame as usize].block = block;
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
