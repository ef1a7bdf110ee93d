//! The per-shard append-only log: libucw asio's write-behind stream with group commit.
//!
//! A [`Log`] lives in a region of a device reached through an [`IoQueue`](crate::io::IoQueue)
//! (its own queue over a log file, in the engine). Records are appended on the owning shard
//! into an in-memory staging ring; a writer task writes every full block behind the appends
//! (`O_DIRECT`, bounded by the queue's write-back limit) and, when a commit is wanted, the
//! partial tail block, then waits for the writes and flushes the device once: one flush covers
//! every record appended before it, and appends go on while it is in flight. Each record
//! carries a CRC32C; on open, the records after the last checkpoint are checked and returned
//! for replay, a torn tail is cut, and a damaged record before the tail is
//! [`LogError::Corrupt`]. Checkpoints move the start ([`Log::advance_start`]) once the caller
//! has made the records' effects durable. The byte layout is in `docs/LOG-FORMAT.md`.
//!
//! Single-threaded and lock-free like the rest of a shard; generic over [`Device`] so that the
//! simulation tests run it over [`SimDevice`](crate::io::SimDevice) with crashes and faults.
//!
//! [`Device`]: crate::io::Device

mod crc;
mod error;
pub mod format;
#[allow(clippy::module_inception)]
mod log;

pub use crc::crc32c_append;
pub use error::LogError;
pub use log::{Log, LogConfig, LogRecord, LogStats, Replay};
