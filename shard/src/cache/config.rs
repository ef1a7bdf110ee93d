//! The settings of one cache partition and the caller's hooks.

use crate::error::{Error, Result};

/// Sizes of a cache partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    /// The partition's budget for buffer bytes; frames = `cache_size_bytes / block_size_bytes`.
    pub cache_size_bytes: u64,
    /// The deadlock rule's per-task bound: one [`Session`](super::Session) may hold at most
    /// this many pinned buffers at once (dm-bufio's reserved buffers).
    pub pins_per_session_max: usize,
    /// Background write-back starts when more than this percentage of frames is dirty.
    pub dirty_high_percent: u8,
    /// Background write-back stops when the dirty share falls to this percentage.
    pub dirty_low_percent: u8,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            cache_size_bytes: 64 << 20,
            pins_per_session_max: 8,
            dirty_high_percent: 50,
            dirty_low_percent: 25,
        }
    }
}

/// Derived sizes, checked once when the partition is built.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sizing {
    pub(crate) frame_count: usize,
    pub(crate) sessions_max: usize,
    pub(crate) dirty_high: usize,
    pub(crate) dirty_low: usize,
}

impl CacheConfig {
    /// Checks the settings against the block size and derives the frame count and the number
    /// of sessions the deadlock rule admits.
    pub(crate) fn sizing(&self, block_size_bytes: usize) -> Result<Sizing> {
        let frames = self.cache_size_bytes / block_size_bytes as u64;
        if frames == 0 {
            return Err(Error::config(
                "cache_size_bytes",
                format!(
                    "{} bytes holds no block of {block_size_bytes} bytes",
                    self.cache_size_bytes
                ),
            ));
        }
        if frames >= u32::MAX as u64 {
            return Err(Error::config("cache_size_bytes", "more than 2^32 - 1 frames"));
        }
        let pins = self.pins_per_session_max;
        if pins == 0 {
            return Err(Error::config("pins_per_session_max", "must be at least 1"));
        }
        // The deadlock rule: sessions × (pins − 1) < frames, so when every session waits for
        // one more buffer, at least one frame is not pinned and can be (written back and)
        // reused. Two sessions at least, or the partition serves one task at a time.
        let sessions_max =
            if pins == 1 { frames as usize } else { (frames as usize - 1) / (pins - 1) };
        if (frames as usize) < 2 * pins {
            return Err(Error::config(
                "cache_size_bytes",
                format!(
                    "{frames} frames is below the deadlock rule's minimum of \
                     2 × pins_per_session_max = {}",
                    2 * pins
                ),
            ));
        }
        if self.dirty_low_percent > self.dirty_high_percent || self.dirty_high_percent > 100 {
            return Err(Error::config(
                "dirty_high_percent",
                "needs dirty_low_percent <= dirty_high_percent <= 100",
            ));
        }
        let frames = frames as usize;
        Ok(Sizing {
            frame_count: frames,
            sessions_max,
            dirty_high: frames * self.dirty_high_percent as usize / 100,
            dirty_low: frames * self.dirty_low_percent as usize / 100,
        })
    }
}
