//! The checks every routed operation makes, written once for [`Shard`](crate::Shard) and
//! [`Client`](crate::Client) alike.

use crate::{Error, Result};

/// `data` must be exactly one block.
pub(crate) fn check_block_data(data: &[u8], block_size: usize) -> Result<()> {
    if data.len() != block_size {
        return Err(Error::config(
            "data",
            format!("a block write needs exactly {block_size} bytes, got {}", data.len()),
        ));
    }
    Ok(())
}

/// `block..block + count` (at least one block) must lie on the device.
pub(crate) fn check_span(block: u64, count: u64, device_blocks: u64) -> Result<()> {
    let last = block.saturating_add(count.max(1) - 1);
    if last >= device_blocks {
        return Err(Error::BlockOutOfRange { block: last, device_blocks });
    }
    Ok(())
}

/// `shard` must be one of `shard_count`.
pub(crate) fn check_shard(shard: usize, shard_count: usize) -> Result<()> {
    if shard >= shard_count {
        return Err(Error::config("shard", format!("no shard {shard} (there are {shard_count})")));
    }
    Ok(())
}
