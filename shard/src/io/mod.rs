//! The I/O layer of a shard: the [`Device`] seam, its production ([`DmaDevice`]) and
//! simulated ([`SimDevice`]) implementations, and the per-shard asio queue ([`IoQueue`]).

mod device;
mod dma;
mod queue;
mod sim;

pub use device::{Device, IoBuf, ReadTarget};
pub use dma::{DmaBuf, DmaDevice};
pub use queue::{IoQueue, LatencyHistogram, QueueConfig, QueueStats, Request};
pub use sim::{SimBuf, SimCounters, SimDevice, SimOptions, SECTOR_BYTES};
