//! Errors of the log.

use std::fmt;

/// Every error the log returns.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum LogError {
    /// The device failed a read, write or flush (see the inner error for which and where).
    Io(crate::Error),
    /// An earlier write or flush of the log failed: nothing after the last successful commit
    /// can be promised durable, so the log refuses further appends and commits (retrying a
    /// failed flush can report success for data the device dropped). Reopen it to recover.
    Failed(crate::Error),
    /// A record before the end of the log fails its checks while a later record proves it was
    /// once durable: the log is damaged, and replaying past it would lose acknowledged writes.
    Corrupt {
        /// The log position of the damaged record.
        lsn: u64,
        /// The byte offset of the damaged record on the device.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// Neither header copy of the region is valid, and they are not both blank.
    BadHeader {
        /// Byte offset of the region on the device.
        offset: u64,
        /// Why the copies were refused.
        reason: String,
    },
    /// The region was formatted with another size or block size than it is opened with.
    LayoutMismatch {
        /// Byte offset of the region on the device.
        offset: u64,
        /// What differs.
        reason: String,
    },
    /// A record larger than the log accepts.
    RecordTooLarge {
        /// The payload's size.
        len: usize,
        /// The largest payload accepted.
        max: usize,
    },
    /// The log has no room for the record until a checkpoint moves its start.
    Full {
        /// Bytes the record needs.
        needed: u64,
        /// Bytes free now.
        free: u64,
    },
    /// The log was closed.
    Closed,
}

impl From<crate::Error> for LogError {
    fn from(e: crate::Error) -> Self {
        LogError::Io(e)
    }
}

impl fmt::Display for LogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LogError::Io(e) => write!(f, "log I/O failed: {e}"),
            LogError::Failed(e) => {
                write!(f, "the log failed earlier and accepts no more writes until reopened: {e}")
            }
            LogError::Corrupt { lsn, offset, reason } => write!(
                f,
                "corrupt log record at log position {lsn} (byte offset {offset}) before the end \
                 of the log: {reason}"
            ),
            LogError::BadHeader { offset, reason } => {
                write!(f, "log region at byte offset {offset} has no valid header: {reason}")
            }
            LogError::LayoutMismatch { offset, reason } => {
                write!(f, "log region at byte offset {offset} has another layout: {reason}")
            }
            LogError::RecordTooLarge { len, max } => {
                write!(f, "log record of {len} bytes is larger than the maximum of {max}")
            }
            LogError::Full { needed, free } => write!(
                f,
                "the log is full ({needed} bytes needed, {free} free): a checkpoint must move \
                 its start"
            ),
            LogError::Closed => f.write_str("the log is closed"),
        }
    }
}

impl std::error::Error for LogError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LogError::Io(e) | LogError::Failed(e) => Some(e),
            _ => None,
        }
    }
}
