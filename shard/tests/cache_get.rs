//! The synchronous cache-only `get` (dm-bufio's `dm_bufio_get`) on the partition and on a
//! session: a hit returns the pinned buffer with its data, an absent block and a block whose
//! read is still in flight return `None` without any I/O, and a handle keeps its buffer in
//! memory while it is held. Also: the async `read` serves a hit at its first poll.

mod common;

use std::cell::Cell;
use std::rc::Rc;

use common::{config, image, run, version_of, yield_times, BLOCK_BYTES};
use corebuf_shard::cache::{CacheConfig, Hooks, Partition};
use corebuf_shard::io::{Device, IoQueue, SimBuf, SimDevice, SimOptions};
use corebuf_shard::Result;

const BLOCKS: u64 = 64;

/// A `SimDevice` whose reads wait until the test opens the gate: a read in flight for as long
/// as the test wants, deterministically.
#[derive(Clone, Debug)]
struct GatedDevice {
    sim: SimDevice,
    open: Rc<Cell<bool>>,
}

impl Device for GatedDevice {
    type Buf = SimBuf;

    common::sim_passthrough!();

    async fn read_at(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        while !self.open.get() {
            futures_lite::future::yield_now().await;
        }
        self.sim.read_at(offset, dst).await
    }
}

/// A partition of `frames` frames over a gated device holding version 1 of every block.
fn partition(frames: u64) -> (Partition<GatedDevice>, SimDevice, Rc<Cell<bool>>) {
    let sim = SimDevice::from_image(image(BLOCKS, 1), SimOptions::new(0));
    let open = Rc::new(Cell::new(true));
    let device = GatedDevice { sim: sim.clone(), open: Rc::clone(&open) };
    let queue = IoQueue::new(device, config(8, 4)).expect("queue");
    let cache =
        CacheConfig { cache_size_bytes: frames * BLOCK_BYTES as u64, ..CacheConfig::default() };
    let part = Partition::new(queue, cache, Hooks::default()).expect("partition");
    (part, sim, open)
}

/// A task that reads `block` in a session of its own and answers the version it holds.
fn spawn_read(part: &Partition<GatedDevice>, block: u64) -> glommio::Task<Option<u64>> {
    let part = part.clone();
    glommio::spawn_local(async move {
        let session = part.session().await;
        let buf = session.read(block).await.expect("read");
        let version = version_of(&buf.data(), block);
        version
    })
}

#[test]
fn get_of_an_absent_block_is_none_and_does_no_io() {
    run(async {
        let (part, sim, _) = partition(16);
        assert!(part.get(3).is_none());
        assert!(part.get(BLOCKS + 100).is_none(), "beyond the device: absent, not an error");
        let session = part.session().await;
        assert!(session.get(3).is_none());
        assert_eq!(session.pinned(), 0);
        assert_eq!(sim.counters().reads, 0, "get never reads the device");
        let stats = part.stats();
        assert_eq!((stats.hits, stats.misses), (0, 0), "{stats:?}");
    });
}

#[test]
fn get_of_a_cached_block_returns_its_data_pinned_and_counts_a_hit() {
    run(async {
        let (part, sim, _) = partition(16);
        let session = part.session().await;
        drop(session.read(5).await.expect("read"));
        let buf = part.get(5).expect("a cached block is a hit");
        assert_eq!(buf.block(), 5);
        assert_eq!(version_of(&buf.data(), 5), Some(1));
        assert_eq!(part.stats().pinned, 1, "the handle pins its frame");
        assert_eq!(session.pinned(), 0, "a partition get counts against no session");
        let again = session.get(5).expect("two handles may pin one buffer");
        assert_eq!(session.pinned(), 1);
        drop((buf, again));
        let stats = part.stats();
        assert_eq!((stats.hits, stats.misses, stats.pinned), (2, 1, 0), "{stats:?}");
        assert_eq!(sim.counters().reads, 1, "the hits read nothing");
    });
}

#[test]
fn get_of_a_block_being_read_is_none_until_the_read_completes() {
    run(async {
        let (part, _, open) = partition(16);
        open.set(false);
        let reader = spawn_read(&part, 9);
        yield_times(5).await;
        assert_eq!(part.stats().misses, 1, "the read is installed and in flight");
        assert!(part.get(9).is_none(), "a block still being read is not handed out");
        let session = part.session().await;
        assert!(session.get(9).is_none());
        open.set(true);
        assert_eq!(reader.await, Some(1));
        let buf = part.get(9).expect("cached once the read completed");
        assert_eq!(version_of(&buf.data(), 9), Some(1));
    });
}

#[test]
fn a_held_get_handle_keeps_its_buffer_through_eviction_pressure() {
    run(async {
        let (part, _, _) = partition(16);
        let session = part.session().await;
        drop(session.read(0).await.expect("read"));
        let held = part.get(0).expect("hit");
        // Read four times the cache's worth of other blocks: every unpinned frame is reused.
        for round in 0..4 {
            for b in 1..BLOCKS {
                let buf = session.read(b).await.expect("read");
                assert_eq!(version_of(&buf.data(), b), Some(1), "round {round} block {b}");
            }
        }
        assert!(part.stats().evictions > 3 * BLOCKS, "{:?}", part.stats());
        assert_eq!(version_of(&held.data(), 0), Some(1), "the held buffer kept its block");
        let before = part.stats().misses;
        drop(part.get(0).expect("block 0 is still cached: it was pinned"));
        assert_eq!(part.stats().misses, before);
        part.forget(0);
        assert!(part.get(0).is_some(), "forget leaves a pinned buffer alone");
        drop(held);
        assert_eq!(part.stats().pinned, 0);
        part.forget(0);
        assert!(part.get(0).is_none(), "unpinned, it can be dropped like any other");
    });
}

#[test]
fn async_read_of_a_cached_block_is_ready_at_its_first_poll() {
    run(async {
        let (part, _, open) = partition(16);
        let session = part.session().await;
        drop(session.read(4).await.expect("read"));
        // With the device gated shut, anything but the fast path would stay pending.
        open.set(false);
        let mut read = std::pin::pin!(session.read(4));
        let polled = futures_lite::future::poll_once(read.as_mut()).await;
        let buf = polled.expect("ready at the first poll").expect("a hit");
        assert_eq!(version_of(&buf.data(), 4), Some(1));
        assert_eq!(part.stats().hits, 1);
    });
}

#[test]
fn warm_and_warm_index_are_only_hints_they_read_pin_and_count_nothing() {
    run(async {
        let (part, sim, open) = partition(16);
        let session = part.session().await;
        for b in [2, 5] {
            drop(session.read(b).await.expect("read"));
        }
        // A read in flight: its frame is in the index, its bytes not yet there.
        open.set(false);
        let reader = spawn_read(&part, 9);
        yield_times(5).await;
        let before = part.stats();
        // Cached, absent, being read, beyond the device, and more than one group of blocks.
        let blocks: Vec<u64> =
            [2, 5, 9, 3, BLOCKS + 100, u64::MAX].into_iter().chain(0..BLOCKS).collect();
        part.warm_index(&blocks);
        part.warm(&blocks, BLOCK_BYTES);
        part.warm(&blocks, usize::MAX);
        part.warm(&[], 64);
        let after = part.stats();
        assert_eq!(
            (after.hits, after.misses, after.pinned),
            (before.hits, before.misses, before.pinned),
            "{after:?}"
        );
        assert_eq!(sim.counters().reads, 2, "warm reads nothing from the device");
        assert!(part.get(3).is_none(), "warm caches nothing");
        assert!(part.get(9).is_none(), "a block being read is still not handed out");
        let buf = part.get(5).expect("still cached");
        assert_eq!(version_of(&buf.data(), 5), Some(1));
        drop(buf);
        open.set(true);
        assert_eq!(reader.await, Some(1));
    });
}
