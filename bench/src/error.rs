//! The bench's error: what went wrong, worded for the person running it, and the exit code.

use std::fmt;

/// Why a run stopped.
#[derive(Debug)]
pub enum BenchError {
    /// A bad argument or a workload that cannot run with these settings.
    Usage(String),
    /// A malformed or out-of-range trace.
    Trace(String),
    /// `--verify` found a block whose content is wrong.
    Verify(String),
    /// The engine refused or failed.
    Engine(corebuf::Error),
    /// Any other I/O or system failure.
    Io(String),
}

impl BenchError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            BenchError::Usage(_) | BenchError::Trace(_) => 2,
            BenchError::Verify(_) => 3,
            BenchError::Engine(_) | BenchError::Io(_) => 1,
        }
    }

    /// An I/O error with what was being done.
    pub fn io(what: impl fmt::Display, e: impl fmt::Display) -> Self {
        BenchError::Io(format!("{what}: {e}"))
    }
}

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BenchError::Usage(m) => write!(f, "invalid arguments: {m}"),
            BenchError::Trace(m) => write!(f, "trace: {m}"),
            BenchError::Verify(m) => write!(f, "verification failed: {m}"),
            BenchError::Engine(e) => write!(f, "corebuf: {e}"),
            BenchError::Io(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for BenchError {}

impl From<corebuf::Error> for BenchError {
    fn from(e: corebuf::Error) -> Self {
        BenchError::Engine(e)
    }
}

/// The bench's result type.
pub type Result<T> = std::result::Result<T, BenchError>;
