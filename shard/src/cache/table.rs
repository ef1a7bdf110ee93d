//! The frame table: per-frame metadata, the block index, the free list, the dirty list and the
//! latched write errors of one partition. Plain data, no I/O, no waiting.
//!
//! Five invariants:
//! 1. `index[b] == f` iff `meta[f].block == b` and `f` is installed (READING or VALID).
//! 2. A frame is in exactly one of: the free list, or installed (and then in the policy).
//! 3. `dirty_list` holds exactly the frames that are DIRTY or WRITING; `meta[f].dirty_pos` is
//!    the frame's slot in it.
//! 4. `oldest_dirty_seq` is the sequence number of the earliest modification not captured by
//!    a write snapshot (`SEQ_NONE` when clean); `writing_oldest_seq` is the earliest one the
//!    write in flight carries (`SEQ_NONE` until its snapshot is taken).
//! 5. A block with an entry in `write_errors` has a DIRTY frame: its newer data stays cached
//!    until a write succeeds or the caller forgets the block.

use hashbrown::HashMap;

use super::index::FrameIndex;
use super::policy::{Candidate, S3Fifo};
use super::stats::CacheStats;
use crate::error::Error;

pub(crate) const NIL: u32 = u32::MAX;
pub(crate) const SEQ_NONE: u64 = u64::MAX;

/// Frame state bits.
pub(crate) mod flag {
    /// Installed and holding the block's data.
    pub(crate) const VALID: u8 = 1;
    /// Installed, the device read in flight: invisible to `get`, joined by `read`.
    pub(crate) const READING: u8 = 2;
    /// Modified since the last write snapshot.
    pub(crate) const DIRTY: u8 = 4;
    /// A write is scheduled or in flight (at most one per frame).
    pub(crate) const WRITING: u8 = 8;
    /// The write in flight was started by the eviction scan: the frame was a victim kept
    /// only because it was dirty.
    pub(crate) const EVICT_WRITE: u8 = 16;
    /// Listed in `ready_victims`: its eviction write completed and left it clean.
    pub(crate) const READY: u8 = 32;
}

/// One frame's metadata: 40 bytes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FrameMeta {
    pub(crate) block: u64,
    pub(crate) oldest_dirty_seq: u64,
    pub(crate) writing_oldest_seq: u64,
    pub(crate) pins: u32,
    pub(crate) dirty_pos: u32,
    pub(crate) dirty_start: u16,
    /// End of the dirty range minus one (so a 64 KiB block fits in 16 bits).
    pub(crate) dirty_last: u16,
    pub(crate) flags: u8,
}

impl FrameMeta {
    pub(crate) const EMPTY: FrameMeta = FrameMeta {
        block: u64::MAX,
        oldest_dirty_seq: SEQ_NONE,
        writing_oldest_seq: SEQ_NONE,
        pins: 0,
        dirty_pos: NIL,
        dirty_start: 0,
        dirty_last: 0,
        flags: 0,
    };

    pub(crate) fn has(&self, bits: u8) -> bool {
        self.flags & bits != 0
    }
}

/// Where a block stands in the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    Valid(u32),
    Reading(u32),
    Absent,
}

#[derive(Debug)]
pub(crate) struct Table {
    pub(crate) meta: Vec<FrameMeta>,
    pub(crate) index: FrameIndex,
    pub(crate) policy: S3Fifo,
    pub(crate) free: Vec<u32>,
    pub(crate) dirty_list: Vec<u32>,
    /// Writes the eviction scan decided to start; drained right after the scan.
    pub(crate) writes_to_start: Vec<u32>,
    /// Frames whose eviction write completed and left them clean, idle: the next evictions
    /// take them first, in O(1), instead of scanning past every dirty frame again. Entries
    /// are re-checked when taken (the frame may have been pinned, dirtied or dropped since).
    pub(crate) ready_victims: std::collections::VecDeque<u32>,
    /// Writes started by the eviction scan and not yet ended.
    pub(crate) evict_writes: usize,
    /// Latched write errors by block, with the failure's sequence number.
    pub(crate) write_errors: HashMap<u64, (Error, u64)>,
    pub(crate) failures: u64,
    pub(crate) dirty_seq: u64,
    pub(crate) writing_count: usize,
    pub(crate) pinned_frames: usize,
    pub(crate) stats: CacheStats,
}

impl Table {
    /// The table for `frame_count` frames, or `None` if its largest array cannot be
    /// allocated (so a typo in a cache size is an error, not an abort).
    pub(crate) fn try_new(frame_count: usize) -> Option<Self> {
        let mut meta = Vec::new();
        meta.try_reserve_exact(frame_count).ok()?;
        meta.resize(frame_count, FrameMeta::EMPTY);
        let index = FrameIndex::try_new(frame_count)?;
        Some(Table {
            meta,
            index,
            policy: S3Fifo::new(frame_count),
            free: (0..frame_count as u32).rev().collect(),
            dirty_list: Vec::with_capacity(frame_count),
            writes_to_start: Vec::with_capacity(frame_count),
            ready_victims: std::collections::VecDeque::with_capacity(frame_count),
            evict_writes: 0,
            write_errors: HashMap::new(),
            failures: 0,
            dirty_seq: 0,
            writing_count: 0,
            pinned_frames: 0,
            stats: CacheStats::default(),
        })
    }

    /// Bytes of fixed metadata per frame: this table's arrays and the policy's.
    /// Bytes of metadata per frame: this table's arrays, the policy's lists and the block
    /// index (its slots spread over the frames). The ghost's hash table is policy history
    /// and is reported by [`S3Fifo::ghost_bytes_per_frame`].
    pub(crate) fn bytes_per_frame(frame_count: usize) -> usize {
        std::mem::size_of::<FrameMeta>() + 4 /* dirty list */ + 4 /* writes to start */
            + 4 /* ready victims */
            + S3Fifo::BYTES_PER_FRAME
            + FrameIndex::bytes_per_frame(frame_count)
    }

    #[inline]
    pub(crate) fn lookup(&self, block: u64) -> Lookup {
        match self.index.get(block, &self.meta) {
            Some(f) if self.meta[f as usize].has(flag::READING) => Lookup::Reading(f),
            Some(f) => Lookup::Valid(f),
            None => Lookup::Absent,
        }
    }

    #[inline]
    pub(crate) fn pin(&mut self, frame: u32) {
        let m = &mut self.meta[frame as usize];
        if m.pins == 0 {
            self.pinned_frames += 1;
        }
        m.pins += 1;
    }

    /// Drops one pin; returns whether the frame became unpinned.
    #[inline]
    pub(crate) fn unpin(&mut self, frame: u32) -> bool {
        let m = &mut self.meta[frame as usize];
        debug_assert!(m.pins > 0, "unpin of an unpinned frame");
        m.pins -= 1;
        if m.pins == 0 {
            self.pinned_frames -= 1;
            return true;
        }
        false
    }

    /// Installs `frame` (fresh from the free list or an eviction) as `block`.
    pub(crate) fn install(&mut self, frame: u32, block: u64, flags: u8) {
        let m = &mut self.meta[frame as usize];
        *m = FrameMeta { block, flags, ..FrameMeta::EMPTY };
        self.index.insert(block, frame, &self.meta);
        self.policy.insert(frame, block);
    }

    /// Takes an installed, unpinned, idle frame out of the cache and frees it. Its dirty data
    /// and any latched error of its block are dropped.
    pub(crate) fn uninstall(&mut self, frame: u32) {
        let m = self.meta[frame as usize];
        debug_assert!(m.pins == 0 && !m.has(flag::WRITING), "uninstall of a busy frame");
        self.index.remove(m.block, &self.meta);
        self.write_errors.remove(&m.block);
        self.policy.remove(frame);
        self.unlist_dirty(frame);
        self.meta[frame as usize] = FrameMeta::EMPTY;
        self.free.push(frame);
    }

    /// Records a modification of `start..end` (byte offsets in the block).
    pub(crate) fn mark_dirty(&mut self, frame: u32, start: usize, end: usize) {
        let seq = self.dirty_seq;
        self.dirty_seq += 1;
        let m = &mut self.meta[frame as usize];
        let last = end.saturating_sub(1) as u16;
        if m.has(flag::DIRTY) {
            m.dirty_start = m.dirty_start.min(start as u16);
            m.dirty_last = m.dirty_last.max(last);
        } else {
            m.flags |= flag::DIRTY;
            m.oldest_dirty_seq = seq;
            m.dirty_start = start as u16;
            m.dirty_last = last;
        }
        if m.dirty_pos == NIL {
            m.dirty_pos = self.dirty_list.len() as u32;
            self.dirty_list.push(frame);
        }
    }

    pub(crate) fn unlist_dirty(&mut self, frame: u32) {
        let pos = self.meta[frame as usize].dirty_pos;
        if pos == NIL {
            return;
        }
        self.dirty_list.swap_remove(pos as usize);
        if let Some(&moved) = self.dirty_list.get(pos as usize) {
            self.meta[moved as usize].dirty_pos = pos;
        }
        self.meta[frame as usize].dirty_pos = NIL;
    }

    /// Marks a write as scheduled for `frame` (it must be DIRTY and not WRITING).
    pub(crate) fn begin_write(&mut self, frame: u32) {
        let m = &mut self.meta[frame as usize];
        debug_assert!(m.has(flag::DIRTY) && !m.has(flag::WRITING));
        m.flags |= flag::WRITING;
        self.writing_count += 1;
    }

    /// The write of `frame` takes its snapshot now: its modifications so far travel with it.
    pub(crate) fn take_snapshot(&mut self, frame: u32) {
        let m = &mut self.meta[frame as usize];
        m.writing_oldest_seq = m.oldest_dirty_seq;
        m.oldest_dirty_seq = SEQ_NONE;
        m.flags &= !flag::DIRTY;
    }

    /// The write of `frame` ended. On failure the frame is dirty again (its data is kept) and
    /// the error is latched on its block until a write succeeds or the block is forgotten.
    pub(crate) fn end_write(&mut self, frame: u32, result: Result<(), Error>) {
        self.writing_count -= 1;
        let m = &mut self.meta[frame as usize];
        let evicting = m.has(flag::EVICT_WRITE);
        m.flags &= !(flag::WRITING | flag::EVICT_WRITE);
        if evicting {
            self.evict_writes -= 1;
        }
        let block = m.block;
        match result {
            Ok(()) => {
                m.writing_oldest_seq = SEQ_NONE;
                self.stats.writebacks += 1;
                self.write_errors.remove(&block);
                let m = self.meta[frame as usize];
                if !m.has(flag::DIRTY) {
                    self.unlist_dirty(frame);
                    if evicting && m.pins == 0 && !m.has(flag::READY) {
                        self.meta[frame as usize].flags |= flag::READY;
                        self.ready_victims.push_back(frame);
                    }
                }
            }
            Err(e) => {
                if m.writing_oldest_seq != SEQ_NONE {
                    m.oldest_dirty_seq = m.oldest_dirty_seq.min(m.writing_oldest_seq);
                    m.flags |= flag::DIRTY;
                }
                m.writing_oldest_seq = SEQ_NONE;
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
        let m = &mut self.meta[frame as usize];
        debug_assert!(m.has(flag::WRITING), "cancel of a write that is not scheduled");
        if m.has(flag::EVICT_WRITE) {
            self.evict_writes -= 1;
        }
        m.flags &= !(flag::WRITING | flag::EVICT_WRITE);
        if m.writing_oldest_seq != SEQ_NONE {
            m.oldest_dirty_seq = m.oldest_dirty_seq.min(m.writing_oldest_seq);
            m.flags |= flag::DIRTY;
            m.writing_oldest_seq = SEQ_NONE;
        }
    }

    /// The judge of eviction candidates: pinned, reading and writing frames stay; a dirty one
    /// stays and gets a write started (unless its last write failed: eviction does not retry
    /// failed writes, `write_dirty` does); a clean idle one goes.
    ///
    /// At most `writes_max` eviction writes are in flight: past that, dirty candidates are
    /// just kept (their writes would only queue behind the others, and every queued write is a
    /// task waiting for a request buffer).
    pub(crate) fn evict(&mut self, writes_max: usize) -> Option<u32> {
        if let Some(frame) = self.take_ready_victim() {
            return Some(frame);
        }
        let Table {
            policy, meta, write_errors, writes_to_start, writing_count, evict_writes, ..
        } = self;
        let victim = policy.evict(|f| {
            let m = &mut meta[f as usize];
            if m.pins > 0 || m.has(flag::READING | flag::WRITING) {
                return Candidate::Keep;
            }
            if m.has(flag::DIRTY) {
                if *evict_writes < writes_max && !write_errors.contains_key(&m.block) {
                    // Same as `begin_write`; the caller spawns the write right after the scan.
                    m.flags |= flag::WRITING | flag::EVICT_WRITE;
                    *writing_count += 1;
                    *evict_writes += 1;
                    writes_to_start.push(f);
                }
                return Candidate::Keep;
            }
            Candidate::Evict(m.block)
        })?;
        self.meta[victim as usize].flags &= !flag::READY;
        let block = self.meta[victim as usize].block;
        self.index.remove(block, &self.meta);
        self.meta[victim as usize] = FrameMeta::EMPTY;
        self.stats.evictions += 1;
        Some(victim)
    }

    /// The oldest ready victim that is still clean and idle, taken out of the cache.
    fn take_ready_victim(&mut self) -> Option<u32> {
        while let Some(frame) = self.ready_victims.pop_front() {
            let m = self.meta[frame as usize];
            if !m.has(flag::READY) {
                continue; // re-installed or dropped since it was listed
            }
            self.meta[frame as usize].flags &= !flag::READY;
            let idle = m.pins == 0 && !m.has(flag::READING | flag::WRITING | flag::DIRTY);
            if !idle || !m.has(flag::VALID) {
                continue; // pinned or dirtied again: back to the normal policy
            }
            self.policy.evict_frame(frame, m.block);
            self.index.remove(m.block, &self.meta);
            self.meta[frame as usize] = FrameMeta::EMPTY;
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
    pub(crate) fn eviction_must_wait(&self, writes_max: usize) -> bool {
        self.ready_victims.is_empty()
            && self.evict_writes >= writes_max
            && self.dirty_list.len() * 4 >= self.meta.len() * 3
    }

    /// The first latched write error (the oldest failure), if any.
    pub(crate) fn first_write_error(&self) -> Option<Error> {
        self.write_errors.values().min_by_key(|(_, n)| *n).map(|(e, _)| e.clone())
    }
}
