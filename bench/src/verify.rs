//! `--verify`: the latest version of every block, and the judgement of what a read returned.
//!
//! With `--verify` no two operations on one block are in flight at once (the workers claim
//! blocks, see `workload`), so each block's versions are written in order and the table holds
//! the exact latest one. A read must return an intact copy of its block with at least that
//! version (at least: a reused `--path` file may hold newer versions from an earlier run).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::block;

/// The last version written to each block (0: the dataset as written).
#[derive(Debug)]
pub struct Versions {
    latest: Box<[AtomicU64]>,
}

impl Versions {
    /// A table for `blocks` blocks, every block at version 0.
    pub fn new(blocks: u64) -> Self {
        Versions { latest: (0..blocks).map(|_| AtomicU64::new(0)).collect() }
    }

    /// The version the next write of `block` stamps.
    pub fn next_version(&self, block: u64) -> u64 {
        self.latest[block as usize].load(Ordering::Acquire) + 1
    }

    /// Records that the write of `version` completed.
    pub fn written(&self, block: u64, version: u64) {
        self.latest[block as usize].store(version, Ordering::Release);
    }

    /// Checks the bytes a read of `block` returned: `Err` names the block and what is wrong.
    pub fn judge(&self, block: u64, data: &[u8]) -> Result<(), String> {
        let least = self.latest[block as usize].load(Ordering::Acquire);
        match block::check(data, block)? {
            version if version >= least => Ok(()),
            version => Err(format!(
                "block {block}: read version {version}, but version {least} was written before \
                 the read began (stale data)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_and_damaged_reads_are_named() {
        let versions = Versions::new(4);
        let mut buf = vec![0u8; 512];
        block::stamp(&mut buf, 2, 0);
        assert_eq!(versions.judge(2, &buf), Ok(()));
        let v = versions.next_version(2);
        assert_eq!(v, 1);
        versions.written(2, v);
        let why = versions.judge(2, &buf).unwrap_err();
        assert!(why.contains("stale") && why.contains("block 2"), "{why}");
        block::stamp(&mut buf, 2, 1);
        assert_eq!(versions.judge(2, &buf), Ok(()));
        buf[100] ^= 1;
        assert!(versions.judge(2, &buf).unwrap_err().contains("checksum"));
    }
}
