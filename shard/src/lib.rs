//! One core's state in corebuf: no threads, no locks.
//!
//! - [`io`]: the device seam ([`io::Device`], with [`io::DmaDevice`] for production and
//!   [`io::SimDevice`] for tests) and the per-shard asynchronous I/O queue ([`io::IoQueue`]),
//!   libucw asio's contract on glommio.
//! - [`log`]: the per-shard append-only log with group commit and checkpoints.
//! - [`cache`]: the buffered block cache partition, dm-bufio's contract.
//!
//! Everything here runs inside one glommio executor; futures are not `Send`.
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod cache;
mod error;
pub mod io;
pub mod log;
pub mod rng;
mod wait;

pub use error::{Error, IoOp, Result};
pub use wait::WaitList;
