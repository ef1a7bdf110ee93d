//! Block-range routing: which shard owns a block.

/// Fixed seeds: routing must be the same in every process and every run.
const SEEDS: [u64; 4] =
    [0x243F_6A88_85A3_08D3, 0x1319_8A2E_0370_7344, 0xA409_3822_299F_31D0, 0x082E_FA98_EC4E_6C89];

/// Maps a block to its owning shard: `hash(block / range_blocks) % shards`.
///
/// Runs of `range_blocks` consecutive blocks share an owner (so a sequential scan stays on one
/// shard for a while and prefetch splits into few parts), and the hash spreads the runs evenly.
/// The on-disk layout never depends on routing: reopening with another shard count only
/// changes which core caches which block.
#[derive(Clone, Debug)]
pub struct Router {
    shards: u64,
    range_blocks: u64,
    hasher: ahash::RandomState,
}

impl Router {
    /// A router over `shards` shards with runs of `range_blocks` blocks (both at least 1).
    pub fn new(shards: usize, range_blocks: u64) -> Self {
        assert!(shards > 0 && range_blocks > 0, "validated by the builder");
        let [a, b, c, d] = SEEDS;
        Router {
            shards: shards as u64,
            range_blocks,
            hasher: ahash::RandomState::with_seeds(a, b, c, d),
        }
    }

    /// The shard that owns `block`.
    #[inline]
    pub fn shard_of(&self, block: u64) -> usize {
        if self.shards == 1 {
            return 0;
        }
        (self.hasher.hash_one(block / self.range_blocks) % self.shards) as usize
    }

    /// The number of shards.
    pub fn shards(&self) -> usize {
        self.shards as usize
    }

    /// Blocks per routing range.
    pub fn range_blocks(&self) -> u64 {
        self.range_blocks
    }

    /// Splits `block..block + count` into maximal runs with one owner each:
    /// `(owner, first_block, count)`.
    pub fn split(&self, block: u64, count: u64) -> impl Iterator<Item = (usize, u64, u64)> + '_ {
        let end = block.saturating_add(count);
        let mut at = block;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let range_end = (at / self.range_blocks + 1).saturating_mul(self.range_blocks).min(end);
            let part = (self.shard_of(at), at, range_end - at);
            at = range_end;
            Some(part)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_is_stable_balanced_and_range_grouped() {
        let router = Router::new(4, 16);
        // Stable: the same answer from a second router (another process would build the same).
        let again = Router::new(4, 16);
        let owners: Vec<usize> = (0..4096).map(|b| router.shard_of(b)).collect();
        assert!(owners.iter().enumerate().all(|(b, &s)| again.shard_of(b as u64) == s));
        // Range-grouped: every run of 16 blocks has one owner.
        assert!(owners.chunks(16).all(|run| run.iter().all(|&s| s == run[0])));
        // Balanced within 25 % over 256 ranges.
        let mut counts = [0usize; 4];
        for run in owners.chunks(16) {
            counts[run[0]] += 1;
        }
        assert!(counts.iter().all(|&n| (48..=80).contains(&n)), "{counts:?}");
    }

    #[test]
    fn split_covers_the_span_exactly_once_by_owner() {
        let router = Router::new(3, 8);
        let parts: Vec<_> = router.split(5, 30).collect();
        let mut next = 5;
        for &(owner, first, count) in &parts {
            assert_eq!(first, next);
            assert!((first..first + count).all(|b| router.shard_of(b) == owner));
            next = first + count;
        }
        assert_eq!(next, 35);
        assert_eq!(parts[0], (router.shard_of(5), 5, 3));
    }
}
