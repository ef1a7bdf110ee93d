//! Helpers shared by the I/O scenario tests: block patterns that identify their block and
//! version in every byte, temporary device files, and a timeout that turns a hang into a
//! failure.
//!
//! Each test crate uses only some of these.
#![allow(dead_code)]

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use corebuf_shard::io::{QueueConfig, SimDevice, SimOptions};

/// The block size every scenario uses unless it says otherwise.
pub const BLOCK_BYTES: usize = 4096;

/// Fills `buf` with the pattern of `version` of `block`. Every 8-byte word carries the block,
/// the version and its own index, and has its top bit set, so a pattern is never all zeroes,
/// two versions differ in every 512-byte sector, and a misplaced sector is visible.
pub fn fill(buf: &mut [u8], block: u64, version: u64) {
    assert!(block < 1 << 31 && version < 1 << 20, "pattern fields out of range");
    for (index, word) in buf.chunks_exact_mut(8).enumerate() {
        let value = 1 << 63 | block << 32 | version << 12 | (index as u64 & 0xFFF);
        word.copy_from_slice(&value.to_le_bytes());
    }
}

/// The pattern of `version` of `block`, `len` bytes long.
pub fn pattern(block: u64, version: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    fill(&mut buf, block, version);
    buf
}

/// The version of `block` that `bytes` hold entirely, or `None` if they hold anything else
/// (zeroes, another block, a mix of versions).
pub fn version_of(bytes: &[u8], block: u64) -> Option<u64> {
    let first = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let version = (first >> 12) & 0xF_FFFF;
    (bytes == pattern(block, version, bytes.len()).as_slice()).then_some(version)
}

/// `blocks` blocks of [`BLOCK_BYTES`], block `b` holding the pattern of (`b`, `version`).
pub fn image(blocks: u64, version: u64) -> Vec<u8> {
    (0..blocks).flat_map(|block| pattern(block, version, BLOCK_BYTES)).collect()
}

/// The bytes of `block` in a device image.
pub fn block_of(image: &[u8], block: u64) -> &[u8] {
    let at = block as usize * BLOCK_BYTES;
    &image[at..at + BLOCK_BYTES]
}

/// A temporary directory under cargo's per-target temp dir (a real file system that does
/// `O_DIRECT`, unlike a tmpfs `/tmp`), holding one file `device` with `contents`. There are no
/// holes: every byte is written.
pub fn device_file(contents: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("create a temp dir");
    let path = dir.path().join("device");
    std::fs::write(&path, contents).expect("write the device file");
    (dir, path)
}

/// A fault-free simulated device of `blocks` blocks of [`BLOCK_BYTES`] with 512-byte sectors,
/// whose operations yield up to `latency_yields_max` times (seeded by `seed`).
pub fn sim_device(blocks: u64, latency_yields_max: u32, seed: u64) -> SimDevice {
    let mut options = SimOptions::new(blocks * BLOCK_BYTES as u64);
    options.latency_yields_max = latency_yields_max;
    options.seed = seed;
    SimDevice::new(options)
}

/// A queue configuration with [`BLOCK_BYTES`] blocks.
pub fn config(io_depth_max: usize, writebacks_in_flight_max: usize) -> QueueConfig {
    QueueConfig { block_size_bytes: BLOCK_BYTES, io_depth_max, writebacks_in_flight_max }
}

/// Runs `future` on a fresh glommio executor on this thread, failing the test if it hangs for
/// two minutes.
pub fn run<T>(future: impl Future<Output = T>) -> T {
    glommio::LocalExecutor::default().run(within(120, "the test", future))
}

/// Awaits `future`, failing the test if it takes longer than `secs` seconds: a hang (a lost
/// wake-up, a deadlock) becomes a failure that names `what`.
pub async fn within<T>(secs: u64, what: &str, future: impl Future<Output = T>) -> T {
    glommio::timer::timeout(Duration::from_secs(secs), async { Ok(future.await) })
        .await
        .unwrap_or_else(|e| panic!("{what} did not finish within {secs} s (deadlock?): {e}"))
}

/// Yields to the executor `times` times, so spawned tasks get to run.
pub async fn yield_times(times: usize) {
    for _ in 0..times {
        futures_lite::future::yield_now().await;
    }
}

/// The `Device` methods of a test wrapper around a `SimDevice` field `sim` that pass through
/// unchanged: everything but the reads, which the wrapper writes itself (with `except writes`,
/// everything but the reads and the writes). Use inside
/// `impl Device for Wrapper { type Buf = SimBuf; ... }`.
#[allow(unused_macros)] // each test crate uses only some helpers
macro_rules! sim_passthrough {
    () => {
        common::sim_passthrough!(except writes);

        async fn write_at(
            &self,
            offset: u64,
            buf: &corebuf_shard::io::SimBuf,
        ) -> corebuf_shard::Result<()> {
            self.sim.write_at(offset, buf).await
        }
    };
    (except writes) => {
        fn path(&self) -> &std::path::Path {
            self.sim.path()
        }

        fn size_bytes(&self) -> u64 {
            self.sim.size_bytes()
        }

        fn alignment_bytes(&self) -> u64 {
            self.sim.alignment_bytes()
        }

        fn alloc_buf(&self, len: usize) -> corebuf_shard::io::SimBuf {
            self.sim.alloc_buf(len)
        }

        async fn flush(&self) -> corebuf_shard::Result<()> {
            self.sim.flush().await
        }

        async fn discard(&self, offset: u64, len: u64) -> corebuf_shard::Result<()> {
            self.sim.discard(offset, len).await
        }
    };
}
#[allow(unused_imports)]
pub(crate) use sim_passthrough;
