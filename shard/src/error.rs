//! Errors of the shard layer: one umbrella [`Error`] with a variant per failure family.
//!
//! I/O errors carry the operation, the block (when known), the byte offset and the path, in
//! the spirit of glommio's `EnhancedIoError`. Errors are `Clone` because a failed write-back
//! is latched and reported again at every `sync` / `write_dirty` until it is resolved.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which device operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum IoOp {
    /// Opening the file or device.
    Open,
    /// Reading a block range.
    Read,
    /// Writing a block range (a normal write or a write-back).
    Write,
    /// Flushing the device's volatile write cache (`fdatasync`).
    Flush,
    /// Discarding a block range (punch hole / `BLKDISCARD`).
    Discard,
    /// Closing the file or device.
    Close,
}

impl fmt::Display for IoOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoOp::Open => "open",
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Flush => "flush",
            IoOp::Discard => "discard",
            IoOp::Close => "close",
        })
    }
}

/// Every error corebuf's shard layer returns.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Error {
    /// The device returned an error for an operation.
    Io {
        /// The operation that failed.
        op: IoOp,
        /// The path of the file or device.
        path: PathBuf,
        /// The first block of the request, when the request addressed blocks.
        block: Option<u64>,
        /// The byte offset of the request.
        offset: u64,
        /// The operating system's error.
        source: Arc<io::Error>,
    },
    /// The path exists but is neither a regular file nor a block device (a directory, say).
    NotAFileOrDevice {
        /// The offending path.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
    },
    /// `O_DIRECT` could not be put in effect on the file (tmpfs, for instance).
    NoDirectIo {
        /// The path of the file or device.
        path: PathBuf,
    },
    /// A configuration value is out of its allowed range.
    InvalidConfig {
        /// The name of the setting, as the builder spells it.
        setting: &'static str,
        /// Why the value is wrong.
        reason: String,
    },
    /// A block number at or beyond the end of the device.
    BlockOutOfRange {
        /// The block asked for (the last one of a range).
        block: u64,
        /// The device's size in blocks.
        device_blocks: u64,
    },
    /// An offset or length that is not a multiple of the device's alignment.
    Unaligned {
        /// The byte offset.
        offset: u64,
        /// The length in bytes.
        len: u64,
        /// The alignment the device requires.
        alignment: u64,
    },
    /// A caller tried to pin more buffers than the deadlock rule allows.
    PinLimit {
        /// Buffers the partition could not give without risking a deadlock.
        requested: usize,
        /// The bound in force.
        limit: usize,
    },
    /// A buffer's data is borrowed mutably elsewhere (or immutably, for a mutable borrow).
    BufferBusy {
        /// The block whose buffer is busy.
        block: u64,
    },
    /// The engine or shard was shut down before the call.
    ShutDown,
    /// A shard stopped unexpectedly (its thread panicked or its executor ended) while a
    /// request to it was pending.
    ShardFailed {
        /// The shard's index.
        shard: usize,
    },
}

impl Error {
    /// Builds an [`Error::Io`] from an operating-system error.
    pub fn io(op: IoOp, path: impl Into<PathBuf>, offset: u64, source: io::Error) -> Self {
        Error::Io { op, path: path.into(), block: None, offset, source: Arc::new(source) }
    }

    /// Builds an [`Error::InvalidConfig`].
    pub fn config(setting: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidConfig { setting, reason: reason.into() }
    }

    /// Sets the block number of an [`Error::Io`]; other variants are returned unchanged.
    pub fn with_block(mut self, block_number: u64) -> Self {
        if let Error::Io { block, .. } = &mut self {
            *block = Some(block_number);
        }
        self
    }

    /// The operating system's error kind, for I/O errors.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            Error::Io { source, .. } => Some(source.kind()),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { op, path, block: Some(block), offset, source } => write!(
                f,
                "{op} of block {block} (byte offset {offset}) on {} failed: {source}",
                path.display()
            ),
            Error::Io { op, path, block: None, offset, source } => {
                write!(f, "{op} at byte offset {offset} on {} failed: {source}", path.display())
            }
            Error::NotAFileOrDevice { path, kind } => {
                write!(f, "{} is a {kind}, not a regular file or block device", path.display())
            }
            Error::NoDirectIo { path } => write!(
                f,
                "O_DIRECT is not available on {} (tmpfs and some file systems cannot do it)",
                path.display()
            ),
            Error::InvalidConfig { setting, reason } => write!(f, "invalid {setting}: {reason}"),
            Error::BlockOutOfRange { block, device_blocks } => {
                write!(f, "block {block} is beyond the end of the device ({device_blocks} blocks)")
            }
            Error::Unaligned { offset, len, alignment } => write!(
                f,
                "offset {offset} / length {len} is not aligned to the device's {alignment} bytes"
            ),
            Error::PinLimit { requested, limit } => write!(
                f,
                "pinning {requested} more buffers would break the deadlock rule \
                 (at most {limit} pinned by one task; see docs/ARCHITECTURE.md)"
            ),
            Error::BufferBusy { block } => {
                write!(f, "the buffer of block {block} is borrowed elsewhere")
            }
            Error::ShutDown => f.write_str("the engine is shut down"),
            Error::ShardFailed { shard } => {
                write!(f, "shard {shard} stopped unexpectedly (see its log for the panic)")
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source.as_ref()),
            _ => None,
        }
    }
}
