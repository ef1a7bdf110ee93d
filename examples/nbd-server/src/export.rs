//! What is exported: one name, one size, the block size and whether writes are allowed.

use std::sync::atomic::AtomicU64;

use crate::proto::*;

/// The export served on every connection (shared by all shards).
#[derive(Debug)]
pub struct Export {
    /// The export's name (`NBD_OPT_LIST` shows it; the empty name also selects it).
    pub name: String,
    /// Export size in bytes (a whole number of blocks).
    pub size_bytes: u64,
    /// The engine's block size: the preferred block size advertised to clients.
    pub block_size: u32,
    /// Whether writes, trims and write-zeroes are refused with `EPERM`.
    pub read_only: bool,
    /// Write-like replies (write, trim, write zeroes) of every connection on every shard,
    /// for the flushers' coalescing ([`crate::flush::Flusher`]).
    pub writes_replied: AtomicU64,
}

impl Export {
    /// Whether `name` (from `NBD_OPT_EXPORT_NAME`, `INFO` or `GO`) selects this export.
    pub fn matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }

    /// The transmission flags sent with the export's size.
    pub fn transmission_flags(&self) -> u16 {
        let common = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN | FLAG_SEND_CACHE;
        if self.read_only {
            common | FLAG_READ_ONLY
        } else {
            common | FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES
        }
    }

    /// The command flags a request of type `kind` may carry.
    pub fn allowed_flags(&self, kind: u16) -> u16 {
        let fua = if self.read_only { 0 } else { CMD_FLAG_FUA };
        // FUA is valid on every command once negotiated (some clients set it on flush).
        match kind {
            CMD_WRITE_ZEROES => fua | CMD_FLAG_NO_HOLE,
            _ => fua,
        }
    }

    /// A one-line description (`NBD_INFO_DESCRIPTION`).
    pub fn description(&self) -> String {
        format!(
            "corebuf {} export, {} bytes, {}-byte blocks",
            if self.read_only { "read-only" } else { "read-write" },
            self.size_bytes,
            self.block_size
        )
    }
}
