//! Walking the keys of this shard's ranges (`CLUSTER COUNTKEYSINSLOT` / `GETKEYSINSLOT`).

use super::{KvResult, KvShard, Loc, Sess};
use crate::format::{self, BUCKETS_PER_RANGE, RANGE_BLOCKS};

impl KvShard {
    /// The keys of the ranges this shard owns for which `keep` holds, each once, at most
    /// `max`. Walks every bucket chain under its read lock, one bucket at a time (writers of
    /// other buckets go on meanwhile). A key found in a chain is reported only if a GET finds
    /// it: a record whose extents never reached the device before a crash is not a key.
    pub async fn keys_where(
        &self,
        keep: impl Fn(&[u8]) -> bool,
        max: usize,
    ) -> KvResult<Vec<Vec<u8>>> {
        let mut keys = Vec::new();
        for range in 1..self.geo.ranges {
            if !self.shard.owns(range * RANGE_BLOCKS) {
                continue;
            }
            for bucket in 0..BUCKETS_PER_RANGE {
                if keys.len() >= max {
                    return Ok(keys);
                }
                let loc = Loc {
                    range,
                    head: range * RANGE_BLOCKS + 1 + bucket,
                    bucket_id: range * BUCKETS_PER_RANGE + bucket,
                };
                let found = {
                    let _lock = self.locks.read(loc.bucket_id).await;
                    let sess = self.shard.partition().session().await;
                    self.chain_keys(&sess, &loc, &keep).await?
                };
                for key in found {
                    if keys.len() < max && self.exists(&key).await? {
                        keys.push(key);
                    }
                }
            }
        }
        Ok(keys)
    }

    /// The distinct keys of `loc`'s chain for which `keep` holds.
    async fn chain_keys(
        &self,
        sess: &Sess,
        loc: &Loc,
        keep: &impl Fn(&[u8]) -> bool,
    ) -> KvResult<Vec<Vec<u8>>> {
        let mut keys: Vec<Vec<u8>> = Vec::new();
        let (mut block, mut expect_tag, mut blocks) = (loc.head, None, 0u64);
        loop {
            let buf = sess.read(block).await?;
            let next = {
                let data = buf.data();
                let Some((rbk, _)) = self.check_chain_block(loc, block, &data, expect_tag)? else {
                    break;
                };
                for rec in format::records(block, &data, &rbk)? {
                    let key = &data[rec.key.0..rec.key.0 + rec.key.1];
                    // Older versions of a key sit in the same chain: report it once.
                    if keep(key) && !keys.iter().any(|k| k == key) {
                        keys.push(key.to_vec());
                    }
                }
                rbk.next
            };
            drop(buf);
            blocks += 1;
            if next.0 == 0 {
                break;
            }
            self.check_link(loc, block, next.0)?;
            if blocks > RANGE_BLOCKS {
                return Err(format::corrupt(loc.head, "bucket chain loops").into());
            }
            block = next.0;
            expect_tag = Some(next.1);
        }
        Ok(keys)
    }
}
