//! `Partition::assume_zeroed`: misses on blocks declared zero are served with a zeroed frame
//! and no device read, and a block stops being assumed zero as soon as it is dirtied: once
//! written back and evicted, it is read from the device again, with what was written. Run on
//! the simulated device and on a real `O_DIRECT` file.

use std::future::Future;
use std::time::Duration;

use corebuf_shard::cache::{CacheConfig, Hooks, Partition};
use corebuf_shard::io::{Device, DmaDevice, IoQueue, QueueConfig, SimDevice, SimOptions};

const BLOCK_BYTES: usize = 4096;
const BLOCKS: u64 = 64;
/// Few frames, so that touching other blocks evicts the ones under test.
const FRAMES: u64 = 8;

fn partition<D: Device + 'static>(device: D) -> Partition<D> {
    let queue = IoQueue::new(device, QueueConfig::default()).expect("queue");
    let config = CacheConfig {
        cache_size_bytes: FRAMES * BLOCK_BYTES as u64,
        pins_per_session_max: 4,
        dirty_high_percent: 100,
        dirty_low_percent: 0,
    };
    Partition::new(queue, config, Hooks::<()>::default()).expect("partition")
}

fn run(test: impl Future<Output = ()>) {
    glommio::LocalExecutor::default().run(async {
        glommio::timer::timeout(Duration::from_secs(20), async {
            test.await;
            Ok(())
        })
        .await
        .expect("the test finished within 20 s")
    });
}

fn device_reads<D: Device>(part: &Partition<D>) -> u64 {
    part.queue().stats().reads_completed
}

/// Reads every block of `blocks` once (evicting what was cached before, with 8 frames).
async fn touch<D: Device + 'static>(part: &Partition<D>, blocks: std::ops::Range<u64>) {
    let s = part.session().await;
    for b in blocks {
        drop(s.read(b).await.expect("a read"));
    }
}

async fn zero_until_written<D: Device + 'static>(part: Partition<D>) {
    // Block 3 is dirty before the declaration: it must not be assumed zero.
    {
        let s = part.session().await;
        let buf = s.new_block(3).await.expect("new");
        buf.data_mut().fill(0x33);
        buf.mark_dirty();
    }
    part.assume_zeroed(0, BLOCKS).expect("a range inside the device");

    // A miss in the range: zeroes, no device read.
    let reads = device_reads(&part);
    {
        let s = part.session().await;
        let buf = s.read(5).await.expect("a read");
        assert!(buf.data().iter().all(|&b| b == 0), "an assumed-zero block reads zeroes");
        // Write it: from now on the device holds what the cache writes.
        buf.data_mut().fill(0xA5);
        buf.mark_dirty();
    }
    assert_eq!(device_reads(&part), reads, "no device read for an assumed-zero block");
    assert_eq!(part.stats().zero_fills, 1);
    part.write_dirty().await.expect("write back");

    // Evict blocks 3 and 5 (reading 8 other assumed-zero blocks: still no device read).
    touch(&part, 16..24).await;
    assert_eq!(device_reads(&part), reads, "the other blocks are still assumed zero");
    assert_eq!(part.stats().zero_fills, 9);
    assert!(part.stats().evictions >= 2, "blocks 3 and 5 were evicted");

    // Re-read: both come from the device, with what was written.
    let s = part.session().await;
    let five = s.read(5).await.expect("a read");
    assert!(five.data().iter().all(|&b| b == 0xA5), "block 5 reads what was written");
    drop(five);
    let three = s.read(3).await.expect("a read");
    assert!(three.data().iter().all(|&b| b == 0x33), "block 3, dirty at the declaration");
    drop(three);
    assert_eq!(device_reads(&part), reads + 2, "written blocks are read from the device");
    assert_eq!(part.stats().zero_fills, 9, "no zero fill for a written block");
}

#[test]
fn assumed_zero_blocks_read_zeroes_until_written_on_the_simulated_device() {
    run(async {
        let sim = SimDevice::new(SimOptions::new(BLOCKS * BLOCK_BYTES as u64));
        zero_until_written(partition(sim)).await;
    });
}

#[test]
fn assumed_zero_blocks_read_zeroes_until_written_on_a_real_file() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let path = dir.path().join("device");
    std::fs::write(&path, vec![0u8; BLOCKS as usize * BLOCK_BYTES]).expect("a zeroed file");
    run(async move {
        let device = DmaDevice::open(&path).await.expect("open");
        zero_until_written(partition(device)).await;
    });
}

#[test]
fn a_declaration_outside_the_device_is_refused() {
    run(async {
        let sim = SimDevice::new(SimOptions::new(BLOCKS * BLOCK_BYTES as u64));
        let part = partition(sim);
        assert!(part.assume_zeroed(BLOCKS - 1, 2).is_err(), "past the end");
        assert!(part.assume_zeroed(0, BLOCKS).is_ok());
    });
}
