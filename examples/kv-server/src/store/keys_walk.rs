//! Walking the keys of this shard's ranges (KEYS, `CLUSTER COUNTKEYSINSLOT` / `GETKEYSINSLOT`).

use super::{KvResult, KvShard};
use crate::format::{BUCKETS_PER_RANGE, RANGE_BLOCKS};

impl KvShard {
    /// The live keys of the ranges this shard owns for which `keep` holds, each once, at most
    /// `max`. Walks one range at a time with [`KvShard::live_keys`] (each bucket under its
    /// lock; writers of other buckets go on meanwhile).
    pub async fn keys_where(
        &self,
        keep: impl Fn(&[u8]) -> bool,
        max: usize,
    ) -> KvResult<Vec<Vec<u8>>> {
        let mut keys = Vec::new();
        for range in 1..self.geo.ranges {
            if keys.len() >= max {
                break;
            }
            if !self.shard.owns(range * RANGE_BLOCKS) {
                continue;
            }
            let found = self.live_keys(range, 0..BUCKETS_PER_RANGE).await?;
            keys.extend(found.into_iter().filter(|k| keep(k)).take(max - keys.len()));
        }
        Ok(keys)
    }
}
