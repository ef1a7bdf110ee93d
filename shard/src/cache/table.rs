//! The frame table: per-frame metadata, the block index, the free list, the dirty list and the
//! latched write errors of one partition. Plain data, no I/O, no waiting. Every state change
//! is a method here, so the invariants below are kept in one file.
//!
//! Six invariants:
//! 1. `index[b] == f` iff `hot[f].block == b` and `f` is installed (READING or VALID).
//! 2. A frame is in exactly one of: the free list, the orphans (frames whose read was
//!    abandoned while the device may still be filling them), handed out by `take_free` /
//!    `evict` and not yet installed or given back, or installed (and then in the policy).
//! 3. `dirty_list` holds exactly the frames that are DIRTY or WRITING; `cold[f].dirty_pos` is
//!    the frame's slot in it.
//! 4. `oldest_dirty_seq` is the sequence number of the earliest modification not captured by
//!    a write snapshot (`SEQ_NONE` when clean); `writing_oldest_seq` is the earliest one the
//!    write in flight carries (`SEQ_NONE` until its snapshot is taken).
//! 5. A block with an entry in `write_errors` has a DIRTY frame: its newer data stays cached
//!    until a write succeeds or the caller forgets the block.
//! 6. `pinned_frames` counts the frames with `pins > 0`; `writing_count` those with WRITING;
//!    `evict_writes` those with EVICT_WRITE (at most `writes_max`).

use std::collections::VecDeque;
use std::ops::Range;
use std::rc::Rc;

use hashbrown::HashMap;

use super::frame::{flag, Cold, Hot, NIL, SEQ_NONE};
use super::index::FrameIndex;
use super::policy::{self, Candidate, S3Fifo};
use super::stats::CacheStats;
use crate::error::Error;

/// The ready-victim list holds at most this many frames (beyond, a clean victim is simply
/// found by the next scan): a bound, so the list is not per-frame memory.
const READY_VICTIMS_MAX: usize = 256;

/// Where a block stands in the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    Valid(u32),
    Reading(u32),
    Absent,
}

#[derive(Debug)]
pub(crate) struct Table {
    hot: Rc<[Hot]>,
    cold: Vec<Cold>,
    index: FrameIndex,
    policy: S3Fifo,
    free: Vec<u32>,
    /// Uninstalled frames still lent to a device read that was abandoned (its future dropped
    /// while the kernel may be writing the frame). `take_free` takes one back once its loan
    /// ended (its borrow flag is 0 again).
    orphans: Vec<u32>,
    dirty_list: Vec<u32>,
    /// Writes the eviction scan decided to start; drained right after the scan. At most
    /// `writes_max` (each is an eviction write in flight).
    writes_to_start: Vec<u32>,
    /// Frames whose eviction write completed and left them clean, idle: the next evictions
    /// take them first, in O(1), instead of scanning past every dirty frame again. Entries
    /// are re-checked when taken (the frame may have been pinned, dirtied or dropped since).
    ready_victims: VecDeque<u32>,
    /// Eviction writes in flight at most.
    writes_max: usize,
    /// Writes started by the eviction scan and not yet ended.
    evict_writes: usize,
    /// Latched write errors by block, with the failure's sequence number.
    write_errors: HashMap<u64, (Error, u64)>,
    failures: u64,
    dirty_seq: u64,
    writing_count: usize,
    pinned_frames: usize,
    stats: CacheStats,
    /// Blocks the device reads as zeroes until this partition writes them (set by
    /// `Partition::assume_zeroed`, cleared block by block when a buffer is first dirtied).
    known_zero: Option<KnownZero>,
}

/// A bit per block of `first..first + 64 * bits.len()`: set while the block is known to read
/// as zeroes.
#[derive(Debug)]
struct KnownZero {
    first: u64,
    end: u64,
    bits: Vec<u64>,
}

impl KnownZero {
    fn contains(&self, block: u64) -> bool {
        if block < self.first || block >= self.end {
            return false;
        }
        let i = block - self.first;
        self.bits[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    fn clear(&mut self, block: u64) {
        if block >= self.first && block < self.end {
            let i = block - self.first;
            self.bits[(i / 64) as usize] &= !(1 << (i % 64));
        }
    }
}

impl Table {
    /// The table for the frames of `hot`, with at most `writes_max` eviction writes in flight,
    /// or `None` if its largest array cannot be allocated (so a typo in a cache size is an
    /// error, not an abort).
    pub(crate) fn try_new(hot: Rc<[Hot]>, writes_max: usize) -> Option<Self> {
        let frame_count = hot.len();
        let mut cold = Vec::new();
        cold.try_reserve_exact(frame_count).ok()?;
        cold.resize(frame_count, Cold::EMPTY);
        let mut dirty_list = Vec::new();
        dirty_list.try_reserve_exact(frame_count).ok()?;
        let index = FrameIndex::try_new(frame_count)?;
        Some(Table {
            policy: S3Fifo::new(Rc::clone(&hot)),
            hot,
            cold,
            index,
            free: (0..frame_count as u32).rev().collect(),
            orphans: Vec::new(),
            dirty_list,
            writes_to_start: Vec::with_capacity(writes_max),
            ready_victims: VecDeque::with_capacity(READY_VICTIMS_MAX),
            writes_max,
            evict_writes: 0,
            write_errors: HashMap::new(),
            failures: 0,
            dirty_seq: 0,
            writing_count: 0,
            pinned_frames: 0,
            stats: CacheStats::default(),
            known_zero: None,
        })
    }

    /// Records that blocks `first..end` read as zeroes until written (replacing any earlier
    /// such range), except those already dirty or being written here.
    pub(crate) fn assume_zeroed(&mut self, first: u64, end: u64) {
        let len = end.saturating_sub(first);
        let mut zero =
            KnownZero { first, end: first + len, bits: vec![!0u64; len.div_ceil(64) as usize] };
        for frame in 0..self.hot.len() as u32 {
            let h = &self.hot[frame as usize];
            if h.has(flag::DIRTY | flag::WRITING) {
                zero.clear(h.block());
            }
        }
        self.known_zero = Some(zero);
    }

    /// Whether `block` is known to read as zeroes (counted as a zero fill if so).
    pub(crate) fn take_zero_fill(&mut self, block: u64) -> bool {
        let zero = self.known_zero.as_ref().is_some_and(|z| z.contains(block));
        if zero {
            self.stats.zero_fills += 1;
        }
        zero
    }

    /// Bytes of metadata per frame: the hot and cold records, the dirty list, the policy's
    /// list links and the block index (its slots spread over the frames). The free list is
    /// not counted: it holds only frames that hold no block. The ghost's hash table is policy
    /// history and is reported by [`Table::ghost_bytes`].
    pub(crate) fn bytes_per_frame(frame_count: usize) -> usize {
        std::mem::size_of::<Hot>()
            + std::mem::size_of::<Cold>()
            + 4 /* dirty list */
            + S3Fifo::BYTES_PER_FRAME
            + FrameIndex::bytes_per_frame(frame_count)
    }

    /// Bytes the policy's ghost holds.
    pub(crate) fn ghost_bytes(&self) -> usize {
        self.policy.ghost_bytes()
    }

    // ---- Reading state ----------------------------------------------------------------------

    #[inline]
    pub(crate) fn lookup(&self, block: u64) -> Lookup {
        match self.index.get(block, &self.hot) {
            Some(f) if self.hot[f as usize].has(flag::READING) => Lookup::Reading(f),
            Some(f) => Lookup::Valid(f),
            None => Lookup::Absent,
        }
    }

    /// Hints for [`super::Partition::warm`]: starts loading `block`'s index slot.
    #[inline]
    pub(crate) fn prefetch_index(&self, block: u64) {
        self.index.prefetch_home(block);
    }

    /// Hints for [`super::Partition::warm`]: the frame that probably holds `block` (from the
    /// index slots alone, so possibly another block's), its hot record (read by a hit) and its
    /// cold one (written by `mark_dirty`) asked of the CPU.
    #[inline]
    pub(crate) fn prefetch_likely_frame(&self, block: u64) -> Option<u32> {
        let frame = self.index.likely_frame(block)?;
        super::prefetch_read(self.hot.get(frame as usize)?);
        super::prefetch_read(self.cold.get(frame as usize)?);
        Some(frame)
    }

    /// The hit path: if `block` is cached with its data, pins it, records the hit and returns
    /// its frame. One index probe and one hot record; `None` if absent or still being read.
    #[inline]
    pub(crate) fn try_hit(&mut self, block: u64) -> Option<u32> {
        let frame = self.index.get(block, &self.hot)?;
        let h = &self.hot[frame as usize];
        if !h.has(flag::VALID) {
            return None;
        }
        let pins = h.pins();
        h.set_pins(pins + 1);
        policy::touch(h);
        if pins == 0 {
            self.pinned_frames += 1;
        }
        self.stats.hits += 1;
        Some(frame)
    }

    #[inline]
    pub(crate) fn block_of(&self, frame: u32) -> u64 {
        self.hot[frame as usize].block()
    }

    #[inline]
    pub(crate) fn pins(&self, frame: u32) -> u32 {
        self.hot[frame as usize].pins()
    }

    /// Whether `frame` has any of the state bits `bits`.
    #[inline]
    pub(crate) fn has(&self, frame: u32, bits: u8) -> bool {
        self.hot[frame as usize].has(bits)
    }

    /// The recorded dirty byte range of `frame`, if it is dirty.
    pub(crate) fn dirty_range(&self, frame: u32) -> Option<Range<usize>> {
        let c = &self.cold[frame as usize];
        self.has(frame, flag::DIRTY).then(|| c.dirty_start as usize..c.dirty_last as usize + 1)
    }

    /// Frames dirty or being written.
    pub(crate) fn dirty_count(&self) -> usize {
        self.dirty_list.len()
    }

    /// Dirty frames whose write is not yet scheduled.
    pub(crate) fn unscheduled_dirty_count(&self) -> usize {
        self.dirty_list.len() - self.writing_count
    }

    /// Writes scheduled or in flight.
    pub(crate) fn writing_count(&self) -> usize {
        self.writing_count
    }

    /// Failed writes so far (a sequence number: failures after a point are `> failures()`).
    pub(crate) fn failures(&self) -> u64 {
        self.failures
    }

    /// Where a barrier starts: the next modification's sequence number, and the failure count.
    pub(crate) fn barrier_start(&self) -> (u64, u64) {
        (self.dirty_seq, self.failures)
    }

    /// The latched write error of `block`, if its last write failed.
    pub(crate) fn write_error(&self, block: u64) -> Option<&Error> {
        self.write_errors.get(&block).map(|(e, _)| e)
    }

    /// Whether a write of `block` failed after failure number `failures_at_start`.
    pub(crate) fn failed_since(&self, block: u64, failures_at_start: u64) -> bool {
        self.write_errors.get(&block).is_some_and(|(_, n)| *n > failures_at_start)
    }

    /// The first latched write error (the oldest failure), if any.
    pub(crate) fn first_write_error(&self) -> Option<Error> {
        self.write_errors.values().min_by_key(|(_, n)| *n).map(|(e, _)| e.clone())
    }

    /// The counters, to count events that change no state.
    pub(crate) fn stats_mut(&mut self) -> &mut CacheStats {
        &mut self.stats
    }

    /// A snapshot of the counters with the gauges filled in.
    pub(crate) fn stats(&self) -> CacheStats {
        let mut stats = self.stats.clone();
        stats.pinned = self.pinned_frames as u64;
        stats.dirty = self.dirty_list.len() as u64;
        stats.orphaned = self.orphans.len() as u64;
        stats.frames = self.hot.len() as u64;
        stats
    }

    // ---- Pins ---------------------------------------------------------------------------------

    #[inline]
    pub(crate) fn pin(&mut self, frame: u32) {
        let h = &self.hot[frame as usize];
        if h.pins() == 0 {
            self.pinned_frames += 1;
        }
        h.set_pins(h.pins() + 1);
    }

    /// Pins a VALID frame for a caller that found it (a hit): pin plus the policy's touch.
    #[inline]
    pub(crate) fn pin_hit(&mut self, frame: u32) {
        self.pin(frame);
        policy::touch(&self.hot[frame as usize]);
    }

    /// Drops one pin; returns whether the frame became unpinned.
    #[inline]
    pub(crate) fn unpin(&mut self, frame: u32) -> bool {
        let h = &self.hot[frame as usize];
        let pins = h.pins();
        debug_assert!(pins > 0, "unpin of an unpinned frame");
        h.set_pins(pins - 1);
        if pins == 1 {
            self.pinned_frames -= 1;
            return true;
        }
        false
    }

    // ---- Frames in and out --------------------------------------------------------------------

    /// A frame from the free list.
    pub(crate) fn take_free(&mut self) -> Option<u32> {
        match self.free.pop() {
            Some(frame) => Some(frame),
            None if !self.orphans.is_empty() => self.take_orphan(),
            None => None,
        }
    }

    /// Orphans whose device read has not ended yet (their loans are still out).
    pub(crate) fn lent_orphans(&self) -> usize {
        self.orphans.iter().filter(|&&f| self.hot[f as usize].borrow_flag().get() != 0).count()
    }

    /// An orphan whose device read has ended, if any.
    #[cold]
    fn take_orphan(&mut self) -> Option<u32> {
        let hot = &self.hot;
        let at = self.orphans.iter().position(|&f| hot[f as usize].borrow_flag().get() == 0)?;
        Some(self.orphans.swap_remove(at))
    }

    /// Gives back a frame from `take_free` / `evict` that was not installed after all.
    pub(crate) fn give_back(&mut self, frame: u32) {
        debug_assert_eq!(self.hot[frame as usize].flags(), 0, "given back while installed");
        self.free.push(frame);
    }

    /// Installs `frame` (fresh from `take_free` or `evict`) as `block`, pinned once if `pin`.
    pub(crate) fn install(&mut self, frame: u32, block: u64, flags: u8, pin: bool) {
        let h = &self.hot[frame as usize];
        debug_assert!(h.flags() == 0 && h.pins() == 0, "install of a frame in use");
        h.set_block(block);
        h.set_flags(flags);
        self.cold[frame as usize] = Cold::EMPTY;
        self.index.insert(block, frame, &self.hot);
        self.policy.insert(frame, block);
        if pin {
            self.pin(frame);
        }
    }

    /// A READING frame's read completed: its data is the block's, visible to everyone.
    pub(crate) fn set_valid(&mut self, frame: u32) {
        let h = &self.hot[frame as usize];
        debug_assert!(h.has(flag::READING));
        h.set_flags((h.flags() & !flag::READING) | flag::VALID);
    }

    /// A READING frame's read failed or was abandoned: drops its pins and uninstalls it.
    pub(crate) fn abandon_read(&mut self, frame: u32) {
        while self.pins(frame) > 0 {
            self.unpin(frame);
        }
        self.uninstall(frame);
        if self.hot[frame as usize].borrow_flag().get() != 0 {
            // Still lent to the device: the kernel may be writing it. Not reusable until then.
            let freed = self.free.pop();
            debug_assert_eq!(freed, Some(frame), "uninstall put the frame on the free list");
            self.orphans.push(frame);
        }
    }

    /// Whether `forget` may drop `frame`: unpinned, not being written, and clean unless its
    /// last write failed (the caller gives up on that data).
    pub(crate) fn forgettable(&self, frame: u32) -> bool {
        let h = &self.hot[frame as usize];
        let errored = self.write_errors.contains_key(&h.block());
        h.pins() == 0 && !h.has(flag::WRITING) && (!h.has(flag::DIRTY) || errored)
    }

    /// Takes an installed, unpinned, idle frame out of the cache and frees it. Its dirty data
    /// and any latched error of its block are dropped.
    pub(crate) fn uninstall(&mut self, frame: u32) {
        let h = &self.hot[frame as usize];
        debug_assert!(h.pins() == 0 && !h.has(flag::WRITING), "uninstall of a busy frame");
        let block = h.block();
        self.index.remove(block, &self.hot);
        self.write_errors.remove(&block);
        self.policy.remove(frame);
        self.unlist_dirty(frame);
        self.clear(frame);
        self.free.push(frame);
    }

    /// Resets a frame's records once it is out of the index and the policy.
    fn clear(&mut self, frame: u32) {
        let h = &self.hot[frame as usize];
        debug_assert!(
            !h.has(flag::AUX_BORROWED),
            "a frame's aux data is borrowed only while pinned"
        );
        h.set_block(u64::MAX);
        h.set_flags(0);
        self.cold[frame as usize] = Cold::EMPTY;
    }

    /// Re-homes `frame` (VALID, pinned once by the caller) to `new_block`, dirty as a whole.
    /// The caller has checked that `new_block` is not cached.
    pub(crate) fn rehome(&mut self, frame: u32, new_block: u64, block_size: usize) {
        let old_block = self.block_of(frame);
        debug_assert_eq!(self.lookup(new_block), Lookup::Absent);
        // The index reads keys from the hot records: remove under the old block number,
        // insert under the new one.
        self.index.remove(old_block, &self.hot);
        self.hot[frame as usize].set_block(new_block);
        self.index.insert(new_block, frame, &self.hot);
        // The caller wrote the old block first, so the frame turns dirty here, and
        // `mark_dirty` clears the new block's known-zero bit.
        debug_assert!(!self.hot[frame as usize].has(flag::DIRTY), "the old block is written");
        self.mark_dirty(frame, 0, block_size);
    }

    // ---- Dirty data and writes ----------------------------------------------------------------

    /// Records a modification of `start..end` (byte offsets in the block).
    pub(crate) fn mark_dirty(&mut self, frame: u32, start: usize, end: usize) {
        let seq = self.dirty_seq;
        self.dirty_seq += 1;
        let h = &self.hot[frame as usize];
        let c = &mut self.cold[frame as usize];
        let last = end.saturating_sub(1) as u16;
        if h.has(flag::DIRTY) {
            c.dirty_start = c.dirty_start.min(start as u16);
            c.dirty_last = c.dirty_last.max(last);
        } else {
            if let Some(zero) = &mut self.known_zero {
                // From now on the device may hold this frame's bytes for the block. Only when
                // the frame turns dirty: a dirty frame's bit was cleared then (the bitmap word
                // is a cache miss, and a buffer is often changed many times between writes).
                zero.clear(h.block());
            }
            h.add_flags(flag::DIRTY);
            c.oldest_dirty_seq = seq;
            c.dirty_start = start as u16;
            c.dirty_last = last;
        }
        if c.dirty_pos == NIL {
            c.dirty_pos = self.dirty_list.len() as u32;
            self.dirty_list.push(frame);
        }
    }

    fn unlist_dirty(&mut self, frame: u32) {
        let pos = self.cold[frame as usize].dirty_pos;
        if pos == NIL {
            return;
        }
        self.dirty_list.swap_remove(pos as usize);
        if let Some(&moved) = self.dirty_list.get(pos as usize) {
            self.cold[moved as usize].dirty_pos = pos;
        }
        self.cold[frame as usize].dirty_pos = NIL;
    }

    /// Marks a write as scheduled for `frame` (it must be DIRTY and not WRITING).
    pub(crate) fn begin_write(&mut self, frame: u32) {
        let h = &self.hot[frame as usize];
        debug_assert!(h.has(flag::DIRTY) && !h.has(flag::WRITING));
        h.add_flags(flag::WRITING);
        self.writing_count += 1;
    }

    /// The write of `frame` takes its snapshot now: its modifications so far travel with it.
    pub(crate) fn take_snapshot(&mut self, frame: u32) {
        let c = &mut self.cold[frame as usize];
        c.writing_oldest_seq = c.oldest_dirty_seq;
        c.oldest_dirty_seq = SEQ_NONE;
        self.hot[frame as usize].clear_flags(flag::DIRTY);
    }

    /// The write of `frame` ended. On failure the frame is dirty again (its data is kept) and
    /// the error is latched on its block until a write succeeds or the block is forgotten.
    pub(crate) fn end_write(&mut self, frame: u32, result: Result<(), Error>) {
        self.writing_count -= 1;
        let h = &self.hot[frame as usize];
        let evicting = h.has(flag::EVICT_WRITE);
        h.clear_flags(flag::WRITING | flag::EVICT_WRITE);
        if evicting {
            self.evict_writes -= 1;
        }
        let block = h.block();
        let c = &mut self.cold[frame as usize];
        match result {
            Ok(()) => {
                c.writing_oldest_seq = SEQ_NONE;
                self.stats.writebacks += 1;
                self.write_errors.remove(&block);
                let h = &self.hot[frame as usize];
                if !h.has(flag::DIRTY) {
                    self.unlist_dirty(frame);
                    let h = &self.hot[frame as usize];
                    let room = self.ready_victims.len() < READY_VICTIMS_MAX;
                    if evicting && room && h.pins() == 0 && !h.has(flag::READY) {
                        h.add_flags(flag::READY);
                        self.ready_victims.push_back(frame);
                    }
                }
            }
            Err(e) => {
                if c.writing_oldest_seq != SEQ_NONE {
                    c.oldest_dirty_seq = c.oldest_dirty_seq.min(c.writing_oldest_seq);
                    h.add_flags(flag::DIRTY);
                }
                c.writing_oldest_seq = SEQ_NONE;
                self.failures += 1;
                self.stats.write_errors += 1;
                self.write_errors.insert(block, (e, self.failures));
            }
        }
    }

    /// A scheduled write of `frame` ended without being submitted (its future was dropped):
    /// the frame stops WRITING, and modifications a snapshot had taken are dirty again.
    pub(crate) fn cancel_write(&mut self, frame: u32) {
        self.writing_count -= 1;
        let h = &self.hot[frame as usize];
        debug_assert!(h.has(flag::WRITING), "cancel of a write that is not scheduled");
        if h.has(flag::EVICT_WRITE) {
            self.evict_writes -= 1;
        }
        h.clear_flags(flag::WRITING | flag::EVICT_WRITE);
        let c = &mut self.cold[frame as usize];
        if c.writing_oldest_seq != SEQ_NONE {
            c.oldest_dirty_seq = c.oldest_dirty_seq.min(c.writing_oldest_seq);
            h.add_flags(flag::DIRTY);
            c.writing_oldest_seq = SEQ_NONE;
        }
    }

    /// Finds the next frame at or after `cursor` in the dirty list that is dirty, has no write
    /// scheduled and passes `wanted(table, block, cold)`; schedules its write (`begin_write`)
    /// and moves the cursor past it. `None` when the rest of the list has none.
    pub(crate) fn schedule_next_write(
        &mut self,
        cursor: &mut usize,
        wanted: impl Fn(&Table, u64, &Cold) -> bool,
    ) -> Option<u32> {
        let start = (*cursor).min(self.dirty_list.len());
        let at = self.dirty_list[start..].iter().position(|&f| {
            let h = &self.hot[f as usize];
            h.has(flag::DIRTY)
                && !h.has(flag::WRITING)
                && wanted(self, h.block(), &self.cold[f as usize])
        })?;
        let frame = self.dirty_list[start + at];
        self.begin_write(frame);
        *cursor = start + at + 1;
        Some(frame)
    }

    /// The frames [`Table::schedule_next_write`] would schedule now (dirty, no write
    /// scheduled, `wanted`), with their blocks, in block order: a flush writes adjacent
    /// blocks as one write.
    pub(crate) fn writable_in_block_order(
        &self,
        wanted: impl Fn(&Table, u64, &Cold) -> bool,
    ) -> Vec<(u64, u32)> {
        let mut out: Vec<(u64, u32)> = self
            .dirty_list
            .iter()
            .filter_map(|&f| {
                let h = &self.hot[f as usize];
                let writable = h.has(flag::DIRTY)
                    && !h.has(flag::WRITING)
                    && wanted(self, h.block(), &self.cold[f as usize]);
                writable.then(|| (h.block(), f))
            })
            .collect();
        out.sort_unstable();
        out
    }

    /// Whether `frame` still holds `block`, is dirty, has no write scheduled and passes
    /// `wanted`.
    pub(crate) fn writable(
        &self,
        frame: u32,
        block: u64,
        wanted: impl Fn(&Table, u64, &Cold) -> bool,
    ) -> bool {
        let h = &self.hot[frame as usize];
        h.block() == block
            && h.has(flag::DIRTY)
            && !h.has(flag::WRITING)
            && wanted(self, block, &self.cold[frame as usize])
    }

    /// Schedules the write of `frame` (`begin_write`) if it is [`Table::writable`]; returns
    /// whether it did.
    pub(crate) fn try_schedule_write(
        &mut self,
        frame: u32,
        block: u64,
        wanted: impl Fn(&Table, u64, &Cold) -> bool,
    ) -> bool {
        let ok = self.writable(frame, block, wanted);
        if ok {
            self.begin_write(frame);
        }
        ok
    }

    /// Whether a modification made before `barrier` is not yet on the device (and has not
    /// failed to get there since `failures_at_start`).
    pub(crate) fn writes_pending_before(&self, barrier: u64, failures_at_start: u64) -> bool {
        self.dirty_list.iter().any(|&f| {
            let (h, c) = (&self.hot[f as usize], &self.cold[f as usize]);
            let in_flight = h.has(flag::WRITING) && c.writing_oldest_seq < barrier;
            let unwritten = h.has(flag::DIRTY)
                && c.oldest_dirty_seq < barrier
                && !self.failed_since(h.block(), failures_at_start);
            in_flight || unwritten
        })
    }

    // ---- Eviction -----------------------------------------------------------------------------

    /// The judge of eviction candidates: pinned, reading and writing frames stay; a dirty one
    /// stays and gets a write started (unless its last write failed: eviction does not retry
    /// failed writes, `write_dirty` does); a clean idle one goes.
    ///
    /// At most `writes_max` eviction writes are in flight: past that, dirty candidates are
    /// just kept (their writes would only queue behind the others, and every queued write is a
    /// task waiting for a request buffer). The writes it decides on are taken with
    /// [`Table::take_started_write`].
    pub(crate) fn evict(&mut self) -> Option<u32> {
        self.evict_bounded(self.writes_max)
    }

    /// [`Table::evict`] that starts no write (for prefetch, which never writes back).
    pub(crate) fn evict_clean(&mut self) -> Option<u32> {
        self.evict_bounded(0)
    }

    fn evict_bounded(&mut self, writes_max: usize) -> Option<u32> {
        if let Some(frame) = self.take_ready_victim() {
            return Some(frame);
        }
        let Table {
            policy, hot, write_errors, writes_to_start, writing_count, evict_writes, ..
        } = self;
        let victim = policy.evict(|f| {
            let h = &hot[f as usize];
            if h.pins() > 0 || h.has(flag::READING | flag::WRITING) {
                return Candidate::Keep;
            }
            if h.has(flag::DIRTY) {
                if *evict_writes < writes_max && !write_errors.contains_key(&h.block()) {
                    // Same as `begin_write`; the caller spawns the write right after the scan.
                    h.add_flags(flag::WRITING | flag::EVICT_WRITE);
                    *writing_count += 1;
                    *evict_writes += 1;
                    writes_to_start.push(f);
                }
                return Candidate::Keep;
            }
            Candidate::Evict(h.block())
        })?;
        self.index.remove(self.block_of(victim), &self.hot);
        self.clear(victim);
        self.stats.evictions += 1;
        Some(victim)
    }

    /// A write the last eviction scan decided to start.
    pub(crate) fn take_started_write(&mut self) -> Option<u32> {
        self.writes_to_start.pop()
    }

    /// The oldest ready victim that is still clean and idle, taken out of the cache.
    fn take_ready_victim(&mut self) -> Option<u32> {
        while let Some(frame) = self.ready_victims.pop_front() {
            let h = &self.hot[frame as usize];
            if !h.has(flag::READY) {
                continue; // re-installed or dropped since it was listed
            }
            h.clear_flags(flag::READY);
            let idle = h.pins() == 0 && !h.has(flag::READING | flag::WRITING | flag::DIRTY);
            if !idle || !h.has(flag::VALID) {
                continue; // pinned or dirtied again: back to the normal policy
            }
            let block = h.block();
            self.policy.evict_frame(frame, block);
            self.index.remove(block, &self.hot);
            self.clear(frame);
            self.stats.evictions += 1;
            return Some(frame);
        }
        None
    }

    /// Whether an eviction scan now would only find busy frames: nothing is ready and the
    /// eviction writes are at their bound, so waiting for one of them to end is the way to a
    /// frame (one always ends: they are in flight).
    ///
    /// Only when at least three quarters of the frames are dirty: then a scan mostly meets
    /// dirty frames and is long, while with more clean frames it is likely to find one soon.
    pub(crate) fn eviction_must_wait(&self) -> bool {
        self.ready_victims.is_empty()
            && self.evict_writes >= self.writes_max
            && self.dirty_list.len() * 4 >= self.hot.len() * 3
    }
}
