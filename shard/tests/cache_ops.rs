//! The cache partition's contract (DESIGN.md §3), one test per operation or invariant, on the
//! simulated device; the main ones (read / new / mark dirty / write back round trip, eviction
//! and re-read, forget, discard) also on a `DmaDevice` over a real `O_DIRECT` file.
//!
//! Every block of a device starts with distinct content (`content(block, 0)`), so a test can
//! tell which block and which version it got back.

use std::cell::Cell;
use std::future::Future;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use corebuf_shard::cache::{CacheConfig, Hooks, Partition};
use corebuf_shard::io::{Device, DmaDevice, IoQueue, QueueConfig, SimDevice, SimOptions};
use corebuf_shard::{Error, IoOp};

const BLOCK_BYTES: usize = 4096;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Version `version` of block `block`: every 8-byte word carries the block, the version and
/// its own index, with the top bit set (never all zeroes).
fn content(block: u64, version: u64) -> Vec<u8> {
    (0..BLOCK_BYTES as u64 / 8)
        .flat_map(|i| (1 << 63 | block << 32 | version << 16 | i).to_le_bytes())
        .collect()
}

/// `blocks` blocks, block `b` holding `content(b, 0)`.
fn initial_image(blocks: u64) -> Vec<u8> {
    (0..blocks).flat_map(|b| content(b, 0)).collect()
}

fn block_of(image: &[u8], block: u64) -> &[u8] {
    &image[block as usize * BLOCK_BYTES..(block as usize + 1) * BLOCK_BYTES]
}

fn sim_options(blocks: u64, latency_yields_max: u32, seed: u64) -> SimOptions {
    let mut options = SimOptions::new(blocks * BLOCK_BYTES as u64);
    options.latency_yields_max = latency_yields_max;
    options.seed = seed;
    options
}

/// A simulated device of `blocks` blocks holding the initial image.
fn sim(blocks: u64, latency_yields_max: u32, seed: u64) -> SimDevice {
    SimDevice::from_image(initial_image(blocks), sim_options(blocks, latency_yields_max, seed))
}

fn cache_config(frames: u64, pins: usize) -> CacheConfig {
    CacheConfig {
        cache_size_bytes: frames * BLOCK_BYTES as u64,
        pins_per_session_max: pins,
        // No background write-back unless a test asks for it: tests control every write.
        dirty_high_percent: 100,
        dirty_low_percent: 0,
    }
}

fn partition_with<D: Device + 'static, A: Default + 'static>(
    device: D,
    config: CacheConfig,
    hooks: Hooks<A>,
) -> Partition<D, A> {
    let queue = IoQueue::new(device, QueueConfig::default()).expect("queue");
    Partition::new(queue, config, hooks).expect("partition")
}

fn partition<D: Device + 'static>(device: D, frames: u64, pins: usize) -> Partition<D> {
    partition_with(device, cache_config(frames, pins), Hooks::default())
}

/// Runs `test` on a fresh executor, failing it if it takes more than 20 s (a hang).
fn run(test: impl Future<Output = ()>) {
    glommio::LocalExecutor::default().run(within(20, "the test", test));
}

async fn within<T>(secs: u64, what: &str, future: impl Future<Output = T>) -> T {
    glommio::timer::timeout(Duration::from_secs(secs), async { Ok(future.await) })
        .await
        .unwrap_or_else(|e| panic!("{what} did not finish within {secs} s (hang): {e}"))
}

async fn yield_times(times: usize) {
    for _ in 0..times {
        futures_lite::future::yield_now().await;
    }
}

/// Yields until `done()` holds; fails after many yields (a lost wake-up or a stuck task).
async fn yield_until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..100_000 {
        if done() {
            return;
        }
        futures_lite::future::yield_now().await;
    }
    panic!("{what} never happened");
}

fn device_reads<D: Device>(part: &Partition<D>) -> u64 {
    part.queue().stats().reads_completed
}

/// A real file of `blocks` blocks with the initial image, in cargo's per-target temp dir (a
/// file system that does `O_DIRECT`).
fn device_file(blocks: u64) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let path = dir.path().join("device");
    std::fs::write(&path, initial_image(blocks)).expect("write the device file");
    (dir, path)
}

fn file_image(path: &Path) -> Vec<u8> {
    std::fs::read(path).expect("read the device file")
}

// ---------------------------------------------------------------------------------------------
// The main scenarios, generic over the device (run on SimDevice and on DmaDevice)
// ---------------------------------------------------------------------------------------------

/// read returns device data; new gives a zeroed buffer without a read; mark_dirty +
/// write_dirty put both on the device.
async fn round_trip<D: Device + 'static>(part: &Partition<D>, image: &dyn Fn() -> Vec<u8>) {
    let s = part.session().await;
    let reads_before = device_reads(part);
    let buf = s.read(5).await.unwrap();
    assert_eq!(buf.block(), 5);
    assert_eq!(&*buf.data(), content(5, 0).as_slice(), "read returns the device's data");
    assert_eq!(device_reads(part), reads_before + 1);
    buf.data_mut().copy_from_slice(&content(5, 1));
    buf.mark_dirty();
    drop(buf);

    let fresh = s.new_block(7).await.unwrap();
    assert!(fresh.data().iter().all(|&b| b == 0), "new gives a zeroed buffer");
    assert_eq!(device_reads(part), reads_before + 1, "new does not read the device");
    fresh.data_mut().copy_from_slice(&content(7, 1));
    fresh.mark_dirty();
    drop(fresh);
    assert_eq!(part.stats().dirty, 2);
    assert_eq!(
        block_of(&image(), 5),
        content(5, 0).as_slice(),
        "nothing written before write_dirty"
    );

    part.write_dirty().await.unwrap();
    let after = image();
    assert_eq!(block_of(&after, 5), content(5, 1).as_slice());
    assert_eq!(block_of(&after, 7), content(7, 1).as_slice());
    assert_eq!(block_of(&after, 6), content(6, 0).as_slice(), "a neighbour is untouched");
    let stats = part.stats();
    assert_eq!((stats.dirty, stats.writebacks, stats.pinned), (0, 2, 0), "{stats:?}");
}

/// 5× the cache of blocks rewritten and written back, then all re-read: evicted blocks come
/// back from the device with their newest data.
async fn eviction_and_reread<D: Device + 'static>(
    part: &Partition<D>,
    image: &dyn Fn() -> Vec<u8>,
) {
    let frames = part.frame_count() as u64;
    let blocks = 5 * frames;
    let s = part.session().await;
    for b in 0..blocks {
        let buf = s.read(b).await.unwrap();
        assert_eq!(&*buf.data(), content(b, 0).as_slice(), "block {b}");
        buf.data_mut().copy_from_slice(&content(b, 1));
        buf.mark_dirty();
    }
    part.write_dirty().await.unwrap();
    let reads_before = device_reads(part);
    for b in (0..blocks).rev() {
        let buf = s.read(b).await.unwrap();
        assert_eq!(&*buf.data(), content(b, 1).as_slice(), "block {b} after eviction");
    }
    let stats = part.stats();
    assert!(stats.evictions >= blocks - frames, "{stats:?}");
    assert_eq!(stats.frames, frames);
    assert!(device_reads(part) - reads_before >= blocks - frames, "evicted blocks were re-read");
    let after = image();
    for b in 0..blocks {
        assert_eq!(block_of(&after, b), content(b, 1).as_slice(), "block {b} on the device");
    }
}

/// forget / forget_range drop clean idle buffers only.
async fn forget<D: Device + 'static>(part: &Partition<D>) {
    let s = part.session().await;
    drop(s.read(3).await.unwrap());
    let dirty = s.read(4).await.unwrap();
    dirty.data_mut().copy_from_slice(&content(4, 1));
    dirty.mark_dirty();
    drop(dirty);
    let pinned = s.read(5).await.unwrap();
    for b in 6..9 {
        drop(s.read(b).await.unwrap());
    }

    part.forget(3);
    assert!(s.get(3).is_none(), "a clean idle buffer is dropped");
    let reads_before = device_reads(part);
    assert_eq!(&*s.read(3).await.unwrap().data(), content(3, 0).as_slice());
    assert_eq!(device_reads(part), reads_before + 1, "a forgotten block is read again");

    part.forget(4);
    let kept = s.get(4).expect("a dirty buffer is kept");
    assert!(kept.is_dirty());
    assert_eq!(&*kept.data(), content(4, 1).as_slice());
    drop(kept);
    part.forget(5);
    assert_eq!(s.get(5).expect("a pinned buffer is kept").block(), 5);
    assert_eq!(&*pinned.data(), content(5, 0).as_slice());

    part.forget_range(3, 6); // blocks 3..9
    for b in [3, 6, 7, 8] {
        assert!(s.get(b).is_none(), "clean idle block {b} dropped by forget_range");
    }
    assert!(s.get(4).is_some() && s.get(5).is_some(), "dirty and pinned blocks kept");
    drop(pinned);
    part.write_dirty().await.unwrap();
}

/// issue_discard zeroes the blocks on the device and drops their clean cached copies; a dirty
/// cached copy stays and its data wins when written.
async fn discard<D: Device + 'static>(part: &Partition<D>, image: &dyn Fn() -> Vec<u8>) {
    let s = part.session().await;
    drop(s.read(3).await.unwrap());
    drop(s.read(4).await.unwrap());
    let buf = s.read(6).await.unwrap();
    buf.data_mut().copy_from_slice(&content(6, 1));
    buf.mark_dirty();
    drop(buf);

    part.issue_discard(3, 2).await.unwrap();
    let after = image();
    assert!(block_of(&after, 3).iter().chain(block_of(&after, 4)).all(|&b| b == 0));
    assert_eq!(block_of(&after, 5), content(5, 0).as_slice(), "the block after is untouched");
    assert!(s.get(3).is_none() && s.get(4).is_none(), "clean copies dropped");
    assert!(s.read(3).await.unwrap().data().iter().all(|&b| b == 0), "a re-read sees zeroes");

    part.issue_discard(6, 1).await.unwrap();
    let kept = s.get(6).expect("a dirty copy is kept");
    assert_eq!(&*kept.data(), content(6, 1).as_slice());
    drop(kept);
    part.write_dirty().await.unwrap();
    assert_eq!(block_of(&image(), 6), content(6, 1).as_slice(), "the dirty data wins");
}

/// Runs `scenario` on a SimDevice of 256 blocks and a 16-frame cache.
fn on_sim<F, Fut>(scenario: F)
where
    F: FnOnce(Partition<SimDevice>, Rc<dyn Fn() -> Vec<u8>>) -> Fut + 'static,
    Fut: Future<Output = ()>,
{
    run(async move {
        let device = sim(256, 0, 1);
        let probe = device.clone();
        let part = partition(device, 16, 8);
        scenario(part, Rc::new(move || probe.live_image())).await;
    });
}

/// Runs `scenario` on a DmaDevice over a real 256-block file and a 16-frame cache.
fn on_file<F, Fut>(scenario: F)
where
    F: FnOnce(Partition<DmaDevice>, Rc<dyn Fn() -> Vec<u8>>) -> Fut + 'static,
    Fut: Future<Output = ()>,
{
    let (_dir, path) = device_file(256);
    run(async move {
        let device = DmaDevice::open(&path).await.expect("open the device file");
        let part = partition(device, 16, 8);
        scenario(part, Rc::new(move || file_image(&path))).await;
    });
}

#[test]
fn round_trip_on_sim() {
    on_sim(|part, image| async move { round_trip(&part, &*image).await });
}

#[test]
fn round_trip_on_file() {
    on_file(|part, image| async move { round_trip(&part, &*image).await });
}

#[test]
fn eviction_and_reread_on_sim() {
    on_sim(|part, image| async move { eviction_and_reread(&part, &*image).await });
}

#[test]
fn eviction_and_reread_on_file() {
    on_file(|part, image| async move { eviction_and_reread(&part, &*image).await });
}

#[test]
fn forget_drops_clean_idle_buffers_only_on_sim() {
    on_sim(|part, _| async move { forget(&part).await });
}

#[test]
fn forget_drops_clean_idle_buffers_only_on_file() {
    on_file(|part, _| async move { forget(&part).await });
}

#[test]
fn discard_zeroes_and_drops_clean_copies_on_sim() {
    on_sim(|part, image| async move { discard(&part, &*image).await });
}

#[test]
fn discard_zeroes_and_drops_clean_copies_on_file() {
    on_file(|part, image| async move { discard(&part, &*image).await });
}

// ---------------------------------------------------------------------------------------------
// get, single flight, new, prefetch, release
// ---------------------------------------------------------------------------------------------

#[test]
fn get_never_does_io_and_misses_while_a_read_is_in_flight() {
    run(async {
        let device = sim(64, 50, 7);
        let probe = device.clone();
        let part = partition(device, 16, 8);
        let s = part.session().await;
        assert!(s.get(3).is_none(), "absent");
        assert_eq!(probe.counters().reads, 0, "get does no I/O");

        assert_eq!(part.prefetch(3, 1).unwrap(), 1);
        assert_eq!(probe.counters().reads, 0, "the prefetch read is in flight");
        assert!(s.get(3).is_none(), "still being read");
        yield_until("the prefetch read completes", || probe.counters().reads == 1).await;
        let buf = s.get(3).expect("cached once the read completed");
        assert_eq!(&*buf.data(), content(3, 0).as_slice());
        assert_eq!(probe.counters().reads, 1);
        assert_eq!(part.stats().hits, 1);
    });
}

#[test]
fn concurrent_readers_of_one_block_share_one_device_read() {
    run(async {
        let device = sim(64, 20, 3);
        let probe = device.clone();
        let part = partition(device, 64, 8);
        let readers = 6;
        let tasks: Vec<_> = (0..readers)
            .map(|_| {
                let part = part.clone();
                glommio::spawn_local(async move {
                    let s = part.session().await;
                    let buf = s.read(9).await.unwrap();
                    let data = buf.data().to_vec();
                    data
                })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await, content(9, 0));
        }
        assert_eq!(probe.counters().reads, 1, "one device read for all readers");
        let stats = part.stats();
        assert_eq!((stats.misses, stats.joins), (1, readers - 1), "{stats:?}");
        assert_eq!(stats.pinned, 0);
    });
}

#[test]
fn new_block_is_zeroed_even_in_a_recycled_frame_and_reads_nothing() {
    run(async {
        let device = sim(64, 0, 1);
        let probe = device.clone();
        let part = partition(device, 8, 4);
        let s = part.session().await;
        for b in 0..8 {
            drop(s.read(b).await.unwrap()); // every frame holds non-zero data
        }
        let reads = probe.counters().reads;
        for b in 20..28 {
            let buf = s.new_block(b).await.unwrap();
            assert!(buf.data().iter().all(|&x| x == 0), "block {b} is zeroed");
        }
        assert_eq!(probe.counters().reads, reads, "new never reads");
        assert_eq!(part.stats().news, 8);
        assert!(part.stats().evictions >= 8);
    });
}

#[test]
fn prefetch_starts_reads_without_waiting_and_later_reads_hit() {
    run(async {
        let device = sim(64, 40, 11);
        let probe = device.clone();
        let part = partition(device, 16, 8);
        assert_eq!(part.prefetch(10, 4).unwrap(), 4);
        assert!(probe.counters().reads < 4, "prefetch returned before its reads completed");
        assert_eq!(part.prefetch(10, 4).unwrap(), 0, "blocks being read are not read twice");
        part.queue().sync().await.unwrap();
        assert_eq!(probe.counters().reads, 4);
        let s = part.session().await;
        for b in 10..14 {
            assert_eq!(&*s.read(b).await.unwrap().data(), content(b, 0).as_slice());
        }
        let stats = part.stats();
        assert_eq!((stats.hits, stats.misses, stats.prefetch_reads), (4, 0, 4), "{stats:?}");
        assert_eq!(probe.counters().reads, 4);
    });
}

#[test]
fn prefetch_skips_when_every_frame_is_pinned_or_dirty() {
    run(async {
        let device = sim(64, 0, 1);
        let probe = device.clone();
        let part = partition(device, 16, 8);
        let s = part.session().await;
        let other = part.session().await;
        let mut pinned = Vec::new();
        for b in 0..8 {
            let buf = s.read(b).await.unwrap();
            if b < 4 {
                buf.data_mut().copy_from_slice(&content(b, 1));
                buf.mark_dirty(); // pinned and dirty
            }
            pinned.push(buf);
        }
        for b in 8..16 {
            let buf = other.read(b).await.unwrap();
            buf.data_mut().copy_from_slice(&content(b, 1));
            buf.mark_dirty(); // dirty, released below
        }
        let reads = probe.counters().reads;
        assert_eq!(part.prefetch(40, 4).unwrap(), 0, "no free or clean idle frame");
        assert_eq!(probe.counters().reads, reads, "nothing was read");
        assert_eq!(part.stats().prefetch_skipped, 4);
        assert_eq!(probe.counters().writes, 0, "prefetch does not write back to make room");
        for b in 8..16 {
            let buf = s.get(b).expect("dirty blocks stay cached");
            assert_eq!(&*buf.data(), content(b, 1).as_slice());
        }
        assert_eq!(part.stats().pinned, 8);
        drop(pinned);
    });
}

#[test]
fn prefetch_evicts_only_clean_idle_frames() {
    run(async {
        // Slow reads: a prefetched frame stays "being read", so the prefetch cannot recycle it.
        let device = sim(64, 1000, 1);
        let part = partition(device, 16, 8);
        let s = part.session().await;
        let mut pinned = Vec::new();
        for b in 0..6 {
            pinned.push(s.read(b).await.unwrap());
        }
        for b in 6..12 {
            let buf = s.read(b).await.unwrap();
            buf.data_mut().copy_from_slice(&content(b, 1));
            buf.mark_dirty();
        }
        for b in 12..16 {
            drop(s.read(b).await.unwrap()); // the only clean idle frames
        }
        assert_eq!(part.prefetch(40, 8).unwrap(), 4, "as many as there are clean idle frames");
        assert_eq!(part.stats().prefetch_skipped, 4);
        part.queue().sync().await.unwrap();
        for b in 0..12 {
            assert!(s.get(b).is_some(), "pinned or dirty block {b} is still cached");
        }
        for b in 40..44 {
            assert!(s.get(b).is_some(), "prefetched block {b} is cached");
        }
        drop(pinned);
    });
}

#[test]
fn dropping_a_handle_unpins_and_pinned_buffers_survive_a_scan() {
    run(async {
        let device = sim(512, 0, 1);
        let probe = device.clone();
        let part = partition(device, 16, 8);
        let s = part.session().await;
        let a = s.read(1).await.unwrap();
        let b = s.read(2).await.unwrap();
        let a_again = s.get(1).unwrap();
        assert_eq!((part.stats().pinned, s.pinned()), (2, 3));
        drop(a);
        assert_eq!(part.stats().pinned, 2, "block 1 is still pinned by its second handle");
        drop(a_again);
        assert_eq!((part.stats().pinned, s.pinned()), (1, 1));
        for block in 100..260 {
            drop(s.read(block).await.unwrap());
        }
        let reads = probe.counters().reads;
        assert_eq!(&*b.data(), content(2, 0).as_slice());
        assert!(s.get(2).is_some(), "a pinned buffer is never evicted");
        assert_eq!(probe.counters().reads, reads);
        drop(b);
        assert_eq!(part.stats().pinned, 0);
    });
}

// ---------------------------------------------------------------------------------------------
// Dirty data and write-back
// ---------------------------------------------------------------------------------------------

#[test]
fn mark_dirty_range_widens_to_the_union() {
    run(async {
        let part = partition(sim(64, 0, 1), 16, 8);
        let s = part.session().await;
        let buf = s.read(1).await.unwrap();
        assert_eq!(buf.dirty_range(), None);
        buf.mark_dirty_range(100..200);
        assert_eq!(buf.dirty_range(), Some(100..200));
        buf.mark_dirty_range(10..20);
        assert_eq!(buf.dirty_range(), Some(10..200));
        buf.mark_dirty_range(150..4000);
        assert_eq!(buf.dirty_range(), Some(10..4000));
        assert!(buf.is_dirty());
        drop(buf);
        part.write_dirty().await.unwrap();
        let buf = s.get(1).unwrap();
        assert!(!buf.is_dirty());
        assert_eq!(buf.dirty_range(), None);
    });
}

#[test]
fn write_dirty_writes_all_and_only_buffers_dirtied_before_the_call_then_flushes() {
    run(async {
        let device = sim(64, 10, 5);
        let probe = device.clone();
        let part = partition(device, 16, 8);
        let s = part.session().await;
        for b in [1, 2] {
            let buf = s.read(b).await.unwrap();
            buf.data_mut().copy_from_slice(&content(b, 1));
            buf.mark_dirty();
        }
        let late = s.read(3).await.unwrap();
        let flushes = probe.counters().flushes;
        let dirty_late = async {
            futures_lite::future::yield_now().await;
            late.data_mut().copy_from_slice(&content(3, 1));
            late.mark_dirty();
        };
        let (result, ()) = futures_lite::future::zip(part.write_dirty(), dirty_late).await;
        result.unwrap();
        let durable = probe.durable_image();
        assert_eq!(block_of(&durable, 1), content(1, 1).as_slice());
        assert_eq!(block_of(&durable, 2), content(2, 1).as_slice());
        assert_eq!(probe.counters().flushes, flushes + 1, "write_dirty flushes");
        assert_eq!(block_of(&probe.live_image(), 3), content(3, 0).as_slice(), "dirtied after");
        assert!(late.is_dirty(), "a buffer dirtied after the call is left for the next one");
        drop(late);
        part.write_dirty().await.unwrap();
        assert_eq!(block_of(&probe.durable_image(), 3), content(3, 1).as_slice());
    });
}

#[test]
fn write_dirty_finishes_while_another_task_keeps_dirtying() {
    run(async {
        let device = sim(64, 6, 12);
        let probe = device.clone();
        let part = partition(device, 16, 8);
        let s = part.session().await;
        let buf = s.read(1).await.unwrap();
        buf.data_mut().copy_from_slice(&content(1, 1));
        buf.mark_dirty();
        let stop = Cell::new(false);
        let dirtier = async {
            let mut version = 2;
            while !stop.get() {
                buf.data_mut().copy_from_slice(&content(1, version));
                buf.mark_dirty();
                version += 1;
                futures_lite::future::yield_now().await;
            }
        };
        let barrier = async {
            within(5, "write_dirty against a busy dirtier", part.write_dirty()).await.unwrap();
            stop.set(true);
        };
        futures_lite::future::zip(barrier, dirtier).await;
        let durable = probe.durable_image();
        let on_disk = block_of(&durable, 1);
        assert!(
            (1..1000).any(|v| on_disk == content(1, v).as_slice()),
            "a whole version at least as new as the one dirtied before the call"
        );
        assert_ne!(on_disk, content(1, 0).as_slice());
    });
}

#[test]
fn concurrent_write_dirty_calls_all_return_once_their_data_is_durable() {
    run(async {
        let device = sim(64, 8, 13);
        let probe = device.clone();
        let part = partition(device, 16, 8);
        let s = part.session().await;
        for b in 0..6 {
            let buf = s.read(b).await.unwrap();
            buf.data_mut().copy_from_slice(&content(b, 1));
            buf.mark_dirty();
        }
        let (a, b) = futures_lite::future::zip(part.write_dirty(), part.write_dirty()).await;
        a.unwrap();
        b.unwrap();
        let durable = probe.durable_image();
        for b in 0..6 {
            assert_eq!(block_of(&durable, b), content(b, 1).as_slice());
        }
        assert_eq!(probe.counters().overlapping_writes, 0, "one write per block at a time");
        assert_eq!(part.stats().dirty, 0);
    });
}

#[test]
fn background_write_back_starts_above_the_high_mark_and_stops_at_the_low_mark() {
    run(async {
        let device = sim(64, 4, 14);
        let probe = device.clone();
        let config = CacheConfig {
            cache_size_bytes: 20 * BLOCK_BYTES as u64,
            pins_per_session_max: 4,
            dirty_high_percent: 50, // more than 10 dirty frames starts write-back
            dirty_low_percent: 25,  // which stops at 5
        };
        let part: Partition<SimDevice> = partition_with(device, config, Hooks::default());
        let s = part.session().await;
        for b in 0..10 {
            let buf = s.read(b).await.unwrap();
            buf.data_mut().copy_from_slice(&content(b, 1));
            buf.mark_dirty();
        }
        yield_times(200).await;
        assert_eq!(probe.counters().writes, 0, "at the high mark: no write-back yet");
        let buf = s.read(10).await.unwrap();
        buf.data_mut().copy_from_slice(&content(10, 1));
        buf.mark_dirty();
        drop(buf);
        part.queue().sync().await.unwrap();
        yield_times(200).await;
        part.queue().sync().await.unwrap();
        let stats = part.stats();
        assert_eq!(stats.dirty, 5, "written back down to the low mark: {stats:?}");
        assert_eq!(stats.writebacks, 6);
        assert_eq!(probe.counters().flushes, 0, "write-back does not flush");
        part.write_dirty().await.unwrap();
        let durable = probe.durable_image();
        for b in 0..11 {
            assert_eq!(block_of(&durable, b), content(b, 1).as_slice());
        }
    });
}

#[test]
fn sessions_beyond_the_deadlock_rule_bound_wait_for_one_to_close() {
    run(async {
        let part = partition(sim(64, 0, 1), 16, 4);
        assert_eq!(part.sessions_max(), 5, "(16 - 1) / (4 - 1)");
        let mut open = Vec::new();
        for _ in 0..5 {
            open.push(part.session().await);
        }
        assert!(part.try_session().is_none(), "the bound is reached");
        let waiter = {
            let part = part.clone();
            glommio::spawn_local(async move {
                let s = part.session().await;
                s.read(3).await.map(|buf| buf.block())
            })
        };
        yield_times(20).await;
        assert_eq!(part.stats().session_waits, 1);
        drop(open.pop());
        assert_eq!(within(5, "the waiting session", waiter).await.unwrap(), 3);
        assert!(part.try_session().is_some());
    });
}

#[test]
fn a_flush_writes_adjacent_dirty_blocks_as_one_write_of_at_most_64_blocks() {
    run(async {
        let blocks = 128;
        let device = sim(blocks, 3, 21);
        let probe = device.clone();
        let part = partition(device, 96, 8);
        let dirty: Vec<u64> = (0..70).chain([100, 102, 103]).collect();
        {
            let s = part.session().await;
            // Dirtied out of order: the flush sorts them.
            for &b in dirty.iter().rev() {
                let buf = s.read(b).await.unwrap();
                buf.data_mut().copy_from_slice(&content(b, 1));
                buf.mark_dirty();
            }
        }
        let writes = probe.counters().writes;
        // Block 40's bytes are borrowed while the flush starts: its run ends before it, and it
        // is written alone once the borrow ends.
        let s = part.session().await;
        let forty = s.read(40).await.unwrap();
        let borrow = forty.data_mut();
        let flush = glommio::spawn_local({
            let part = part.clone();
            async move { part.write_dirty().await }
        });
        for _ in 0..50 {
            futures_lite::future::yield_now().await;
        }
        assert!(part.stats().dirty >= 1, "block 40 waits for its borrow");
        drop(borrow);
        drop(forty);
        drop(s);
        flush.await.expect("the flush");
        // Runs 0..40, 40 (alone), 41..70, 100 and 102..104: five writes for 73 buffers.
        assert_eq!(probe.counters().writes - writes, 5, "one write per run");
        assert_eq!(part.stats().writebacks, dirty.len() as u64);
        assert_eq!(part.stats().dirty, 0);
        let durable = probe.durable_image();
        for b in 0..blocks {
            let version = if dirty.contains(&b) { 1 } else { 0 };
            assert_eq!(block_of(&durable, b), content(b, version).as_slice(), "block {b}");
        }
        // A run is at most 64 blocks: 0..64 and 64..70.
        {
            let s = part.session().await;
            for b in 0..70 {
                let buf = s.read(b).await.unwrap();
                buf.data_mut().copy_from_slice(&content(b, 2));
                buf.mark_dirty();
            }
        }
        let writes = probe.counters().writes;
        part.write_dirty().await.expect("the flush");
        assert_eq!(probe.counters().writes - writes, 2, "64 blocks, then 6");
    });
}

#[test]
fn write_dirty_async_starts_writes_and_returns_at_once() {
    run(async {
        let device = sim(64, 30, 9);
        let probe = device.clone();
        let part = partition(device, 16, 8);
        let s = part.session().await;
        for b in 0..4 {
            let buf = s.read(b).await.unwrap();
            buf.data_mut().copy_from_slice(&content(b, 1));
            buf.mark_dirty();
        }
        part.write_dirty_async();
        assert_eq!(probe.counters().writes, 0, "returned before the write completed");
        assert!(part.queue().stats().writebacks_in_flight > 0, "writes are in flight");
        part.queue().sync().await.unwrap();
        assert_eq!(probe.counters().writes, 1, "four adjacent blocks go as one write");
        assert_eq!(part.stats().writebacks, 4, "four buffers written");
        assert_eq!(part.stats().dirty, 0);
        let live = probe.live_image();
        let durable = probe.durable_image();
        for b in 0..4 {
            assert_eq!(block_of(&live, b), content(b, 1).as_slice());
            assert_eq!(block_of(&durable, b), content(b, 0).as_slice(), "no flush yet");
        }
        part.issue_flush().await.unwrap();
        let durable = probe.durable_image();
        for b in 0..4 {
            assert_eq!(block_of(&durable, b), content(b, 1).as_slice(), "flushed");
        }
    });
}

#[test]
fn issue_flush_makes_completed_writes_durable() {
    run(async {
        let device = sim(64, 0, 1);
        let probe = device.clone();
        let part = partition(device, 16, 8);
        let s = part.session().await;
        let buf = s.new_block(9).await.unwrap();
        buf.data_mut().copy_from_slice(&content(9, 1));
        buf.mark_dirty();
        drop(buf);
        part.write_dirty_async();
        part.queue().sync().await.unwrap();
        assert_eq!(block_of(&probe.durable_image(), 9), content(9, 0).as_slice());
        let flushes = probe.counters().flushes;
        part.issue_flush().await.unwrap();
        assert_eq!(probe.counters().flushes, flushes + 1);
        assert_eq!(block_of(&probe.durable_image(), 9), content(9, 1).as_slice());
        assert_eq!(probe.counters().writes, 1, "issue_flush writes no buffer");
    });
}

#[test]
fn release_move_moves_clean_data_to_the_new_block_dirty() {
    run(async {
        let device = sim(64, 0, 1);
        let probe = device.clone();
        let part = partition(device, 16, 8);
        let s = part.session().await;
        drop(s.read(7).await.unwrap()); // a stale cached copy of the target, dropped by the move
        let buf = s.read(2).await.unwrap();
        s.release_move(buf, 7).await.unwrap();
        assert!(s.get(2).is_none(), "the old block is no longer cached under this buffer");
        let moved = s.get(7).expect("the buffer now caches block 7");
        assert_eq!(moved.block(), 7);
        assert!(moved.is_dirty());
        assert_eq!(&*moved.data(), content(2, 0).as_slice());
        drop(moved);
        assert_eq!(probe.counters().writes, 0, "clean old data is not written");
        part.write_dirty().await.unwrap();
        let durable = probe.durable_image();
        assert_eq!(block_of(&durable, 7), content(2, 0).as_slice());
        assert_eq!(block_of(&durable, 2), content(2, 0).as_slice(), "the old block keeps its data");
        assert_eq!(&*s.read(2).await.unwrap().data(), content(2, 0).as_slice());
        assert_eq!(part.stats().pinned, 0);
    });
}

#[test]
fn release_move_writes_dirty_old_data_to_the_old_block_first() {
    run(async {
        let device = sim(64, 5, 2);
        let probe = device.clone();
        let part = partition(device, 16, 8);
        let s = part.session().await;
        let buf = s.read(2).await.unwrap();
        buf.data_mut().copy_from_slice(&content(2, 1));
        buf.mark_dirty();
        s.release_move(buf, 9).await.unwrap();
        assert_eq!(block_of(&probe.live_image(), 2), content(2, 1).as_slice(), "old data written");
        part.write_dirty().await.unwrap();
        let durable = probe.durable_image();
        assert_eq!(block_of(&durable, 9), content(2, 1).as_slice());
        assert_eq!(block_of(&durable, 2), content(2, 1).as_slice());
        // Same block: just dirty.
        let buf = s.read(9).await.unwrap();
        s.release_move(buf, 9).await.unwrap();
        assert!(s.get(9).unwrap().is_dirty());
        // Out of range.
        let buf = s.read(9).await.unwrap();
        assert!(matches!(s.release_move(buf, 64).await, Err(Error::BlockOutOfRange { .. })));
        assert_eq!(part.stats().pinned, 0);
    });
}

#[test]
fn release_move_refuses_a_buffer_pinned_twice() {
    run(async {
        let part = partition(sim(64, 0, 1), 16, 8);
        let s = part.session().await;
        let buf = s.read(2).await.unwrap();
        let second = s.get(2).unwrap();
        let moved = s.release_move(buf, 9).await;
        assert!(matches!(moved, Err(Error::BufferBusy { block: 2 })), "{moved:?}");
        assert_eq!(second.block(), 2);
        assert!(s.get(9).is_none());
    });
}

// ---------------------------------------------------------------------------------------------
// Accessors and hooks
// ---------------------------------------------------------------------------------------------

#[test]
fn accessors_report_sizes_block_numbers_and_typed_aux_data() {
    run(async {
        let device = sim(100, 0, 1);
        let part: Partition<SimDevice, u64> =
            partition_with(device, cache_config(16, 8), Hooks::default());
        assert_eq!(part.block_size(), BLOCK_BYTES);
        assert_eq!(part.device_blocks(), 100);
        assert_eq!(part.frame_count(), 16);
        let s = part.session().await;
        for round in 1..=3u64 {
            let buf = s.read(42).await.unwrap();
            assert_eq!((buf.block(), buf.block_size()), (42, BLOCK_BYTES));
            assert_eq!(*buf.aux(), round - 1, "aux data lives as long as the buffer is cached");
            *buf.aux() += 1;
        }
        part.forget(42);
        let buf = s.read(42).await.unwrap();
        assert_eq!(*buf.aux(), 0, "a re-read buffer starts from A::default()");
    });
}

fn checksum(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

#[test]
fn on_alloc_runs_on_read_fill_and_new_and_on_write_checksums_each_write() {
    run(async {
        let device = sim(64, 0, 1);
        let probe = device.clone();
        let allocs = Rc::new(Cell::new(0u32));
        let writes = Rc::new(Cell::new(0u32));
        let (a, w) = (Rc::clone(&allocs), Rc::clone(&writes));
        let hooks: Hooks<u64> = Hooks {
            on_read: None,
            on_alloc: Some(Box::new(move |block, data, aux: &mut u64| {
                a.set(a.get() + 1);
                *aux = block + 1000;
                assert!(data.len() == BLOCK_BYTES);
            })),
            on_write: Some(Box::new(move |_block, data, _aux: &mut u64| {
                w.set(w.get() + 1);
                let n = data.len();
                let sum = checksum(&data[..n - 8]);
                data[n - 8..].copy_from_slice(&sum.to_le_bytes());
            })),
        };
        let part = partition_with(device, cache_config(16, 8), hooks);
        let s = part.session().await;
        let buf = s.read(3).await.unwrap();
        assert_eq!((allocs.get(), *buf.aux()), (1, 1003), "on_alloc after the read fill");
        drop(buf);
        drop(s.read(3).await.unwrap());
        drop(s.get(3).unwrap());
        assert_eq!(allocs.get(), 1, "hits do not re-initialise");
        let fresh = s.new_block(4).await.unwrap();
        assert_eq!((allocs.get(), *fresh.aux()), (2, 1004), "on_alloc on new");
        fresh.data_mut()[..8].copy_from_slice(&77u64.to_le_bytes());
        fresh.mark_dirty();
        drop(fresh);
        let buf = s.read(3).await.unwrap();
        buf.data_mut()[..8].copy_from_slice(&88u64.to_le_bytes());
        buf.mark_dirty();
        drop(buf);
        assert_eq!(writes.get(), 0);
        part.write_dirty().await.unwrap();
        assert_eq!(writes.get(), 2, "on_write once per write");
        let durable = probe.durable_image();
        for b in [3, 4] {
            let block = block_of(&durable, b);
            let sum = u64::from_le_bytes(block[BLOCK_BYTES - 8..].try_into().unwrap());
            assert_eq!(sum, checksum(&block[..BLOCK_BYTES - 8]), "block {b}'s checksum is on disk");
            let cached = s.get(b).unwrap();
            assert_eq!(&*cached.data(), block, "and in the cache");
        }
        assert_eq!(&block_of(&durable, 3)[..8], &88u64.to_le_bytes());
    });
}

// ---------------------------------------------------------------------------------------------
// Bounded memory, back-pressure, the deadlock rule, bad input
// ---------------------------------------------------------------------------------------------

#[test]
fn frames_stay_within_the_budget_under_a_workload_ten_times_the_cache() {
    run(async {
        let device = sim(400, 0, 1);
        let probe = device.clone();
        let frames = 16;
        let part = partition(device, frames, 8);
        assert_eq!(part.stats().frames, frames);
        let s = part.session().await;
        for round in 1..=2u64 {
            for b in 0..10 * frames {
                let buf = s.read(b).await.unwrap();
                assert_eq!(&*buf.data(), content(b, round - 1).as_slice(), "block {b}");
                buf.data_mut().copy_from_slice(&content(b, round));
                buf.mark_dirty();
                let stats = part.stats();
                assert_eq!(stats.frames, frames);
                assert!(stats.dirty <= frames && stats.pinned <= 1, "{stats:?}");
            }
            part.write_dirty().await.unwrap();
        }
        let durable = probe.durable_image();
        for b in 0..10 * frames {
            assert_eq!(block_of(&durable, b), content(b, 2).as_slice(), "block {b}");
        }
        let stats = part.stats();
        assert_eq!((stats.frames, stats.pinned, stats.dirty), (frames, 0, 0));
    });
}

#[test]
fn a_reader_waits_while_every_frame_is_pinned_and_completes_after_a_release() {
    run(async {
        let part = partition(sim(64, 0, 1), 10, 4);
        assert_eq!(part.sessions_max(), 3, "(10 - 1) / (4 - 1)");
        let a = part.session().await;
        let b = part.session().await;
        let mut held = Vec::new();
        for block in 0..4 {
            held.push(a.read(block).await.unwrap());
        }
        let mut held_b = Vec::new();
        for block in 4..8 {
            held_b.push(b.read(block).await.unwrap());
        }
        let done = Rc::new(Cell::new(false));
        let reader = {
            let (part, done) = (part.clone(), Rc::clone(&done));
            glommio::spawn_local(async move {
                let c = part.session().await;
                let first = c.read(8).await.unwrap();
                let second = c.read(9).await.unwrap();
                assert_eq!(part.stats().pinned, 10, "every frame pinned");
                let third = c.read(20).await.unwrap(); // waits for a release
                done.set(true);
                let data = third.data().to_vec();
                drop((first, second, third));
                data
            })
        };
        yield_times(50).await;
        assert!(!done.get(), "the reader waits while every frame is pinned");
        let stats = part.stats();
        assert_eq!(stats.pinned, 10);
        assert!(stats.frame_waits >= 1, "{stats:?}");
        drop(held.pop());
        let data = within(5, "the waiting reader", reader).await;
        assert!(done.get());
        assert_eq!(data, content(20, 0));
        assert_eq!(part.stats().frames, 10, "the cache did not grow");
    });
}

#[test]
fn pinning_more_than_the_session_limit_fails_at_once() {
    run(async {
        let part = partition(sim(64, 0, 1), 16, 4);
        let s = part.session().await;
        let mut held = Vec::new();
        for b in 0..4 {
            held.push(s.read(b).await.unwrap());
        }
        let read = within(1, "a read over the limit", s.read(10)).await;
        assert!(matches!(read, Err(Error::PinLimit { limit: 4, .. })), "{read:?}");
        let new = within(1, "a new over the limit", s.new_block(11)).await;
        assert!(matches!(new, Err(Error::PinLimit { limit: 4, .. })), "{new:?}");
        assert_eq!(s.pinned(), 4);
        drop(held.pop());
        assert_eq!(s.read(10).await.unwrap().block(), 10, "one release makes room");
    });
}

#[test]
fn a_cache_below_the_deadlock_rule_minimum_or_empty_is_rejected() {
    run(async {
        let config = |bytes: u64, pins: usize| CacheConfig {
            cache_size_bytes: bytes,
            pins_per_session_max: pins,
            ..CacheConfig::default()
        };
        let bs = BLOCK_BYTES as u64;
        let build = |c: CacheConfig| {
            let queue = IoQueue::new(sim(64, 0, 1), QueueConfig::default()).unwrap();
            Partition::<SimDevice>::new(queue, c, Hooks::default()).map(|_| ())
        };
        let small = build(config(7 * bs, 4));
        assert!(matches!(small, Err(Error::InvalidConfig { .. })), "7 frames < 2 × 4: {small:?}");
        assert!(build(config(8 * bs, 4)).is_ok(), "8 frames = 2 × 4 is enough");
        let zero = build(config(0, 4));
        assert!(matches!(zero, Err(Error::InvalidConfig { .. })), "{zero:?}");
        let sub_block = build(config(bs - 1, 1));
        assert!(matches!(sub_block, Err(Error::InvalidConfig { .. })), "{sub_block:?}");
        let no_pins = build(config(16 * bs, 0));
        assert!(matches!(no_pins, Err(Error::InvalidConfig { .. })), "{no_pins:?}");
    });
}

#[test]
fn blocks_beyond_the_device_are_rejected() {
    run(async {
        let part = partition(sim(64, 0, 1), 16, 4);
        let s = part.session().await;
        let read = s.read(64).await;
        assert!(matches!(read, Err(Error::BlockOutOfRange { block: 64, device_blocks: 64 })));
        assert!(matches!(s.new_block(1 << 40).await, Err(Error::BlockOutOfRange { .. })));
        assert!(matches!(part.prefetch(63, 2), Err(Error::BlockOutOfRange { .. })));
        assert!(matches!(part.issue_discard(60, 5).await, Err(Error::BlockOutOfRange { .. })));
        assert!(s.get(64).is_none());
        assert_eq!(s.pinned(), 0, "failed calls hold no pin");
        assert_eq!(s.read(63).await.unwrap().block(), 63);
    });
}

// ---------------------------------------------------------------------------------------------
// Consistency and errors
// ---------------------------------------------------------------------------------------------

#[test]
fn a_write_carries_a_snapshot_and_a_change_during_it_is_written_next() {
    run(async {
        let device = sim(64, 30, 4);
        let probe = device.clone();
        let part = partition(device, 16, 8);
        let s = part.session().await;
        let buf = s.read(3).await.unwrap();
        buf.data_mut().copy_from_slice(&content(3, 1));
        buf.mark_dirty();
        part.write_dirty_async();
        assert_eq!(probe.counters().writes, 0, "the write is in flight");
        // Change every byte while the write is in flight.
        buf.data_mut().copy_from_slice(&content(3, 2));
        buf.mark_dirty();
        yield_until("the first write lands", || {
            let live = probe.live_image();
            let on_disk = block_of(&live, 3);
            assert!(
                on_disk == content(3, 0).as_slice() || on_disk == content(3, 1).as_slice(),
                "the device holds the old data or the snapshot, never a mix"
            );
            probe.counters().writes == 1
        })
        .await;
        assert_eq!(block_of(&probe.live_image(), 3), content(3, 1).as_slice(), "the snapshot");
        assert!(buf.is_dirty(), "the change made during the write is still to be written");
        drop(buf);
        part.write_dirty().await.unwrap();
        assert_eq!(block_of(&probe.durable_image(), 3), content(3, 2).as_slice(), "the newest");
    });
}

#[test]
fn a_reader_never_sees_a_partially_read_block() {
    run(async {
        let device = sim(64, 12, 8);
        let probe = device.clone();
        let part = partition(device, 32, 8);
        let s = part.session().await;
        assert_eq!(part.prefetch(0, 24).unwrap(), 24);
        let joiner = {
            let part = part.clone();
            glommio::spawn_local(async move {
                let s = part.session().await;
                let buf = s.read(13).await.unwrap();
                let data = buf.data().to_vec();
                data
            })
        };
        let mut seen = [false; 24];
        while seen.iter().any(|&s| !s) {
            for b in 0..24u64 {
                if let Some(buf) = s.get(b) {
                    assert_eq!(&*buf.data(), content(b, 0).as_slice(), "block {b} seen whole");
                    seen[b as usize] = true;
                }
            }
            futures_lite::future::yield_now().await;
        }
        assert_eq!(joiner.await, content(13, 0), "a reader joining an in-flight read");
        assert_eq!(probe.counters().reads, 24, "one read per block");
    });
}

#[test]
fn a_failed_write_keeps_the_newer_data_and_its_error_until_a_write_succeeds() {
    run(async {
        let device = sim(256, 0, 1);
        let probe = device.clone();
        let part = partition(device, 16, 8);
        let s = part.session().await;
        let buf = s.read(3).await.unwrap();
        buf.data_mut().copy_from_slice(&content(3, 1));
        buf.mark_dirty();
        drop(buf);
        probe.set_faults(0.0, 1.0, 0.0);
        let first = part.write_dirty().await;
        assert!(
            matches!(first, Err(Error::Io { op: IoOp::Write, block: Some(3), .. })),
            "{first:?}"
        );
        probe.set_faults(0.0, 0.0, 0.0);
        // Cache pressure: the failed block must not be evicted (its data exists nowhere else).
        for b in 100..200 {
            drop(s.read(b).await.unwrap());
        }
        let reads = probe.counters().reads;
        assert_eq!(&*s.read(3).await.unwrap().data(), content(3, 1).as_slice(), "newer data");
        assert_eq!(probe.counters().reads, reads, "served from the cache, not the device");
        assert_eq!(block_of(&probe.live_image(), 3), content(3, 0).as_slice());

        probe.set_faults(0.0, 1.0, 0.0);
        let second = part.write_dirty().await;
        assert!(matches!(second, Err(Error::Io { op: IoOp::Write, .. })), "sticky: {second:?}");
        assert_eq!(part.stats().write_errors, 2);

        probe.set_faults(0.0, 0.0, 0.0);
        part.write_dirty().await.unwrap();
        assert_eq!(block_of(&probe.durable_image(), 3), content(3, 1).as_slice());
        part.write_dirty().await.unwrap();
        assert_eq!(part.stats().dirty, 0);
    });
}

#[test]
fn forget_gives_up_a_failed_write_and_its_error() {
    run(async {
        let device = sim(64, 0, 1);
        let probe = device.clone();
        let part = partition(device, 16, 8);
        let s = part.session().await;
        let buf = s.read(3).await.unwrap();
        buf.data_mut().copy_from_slice(&content(3, 1));
        buf.mark_dirty();
        drop(buf);
        probe.set_faults(0.0, 1.0, 0.0);
        assert!(part.write_dirty().await.is_err());
        part.forget(3);
        assert!(s.get(3).is_none(), "the failed dirty buffer is dropped");
        // Still failing device: no dirty data left, so no write and no latched error.
        part.write_dirty().await.unwrap();
        probe.set_faults(0.0, 0.0, 0.0);
        assert_eq!(&*s.read(3).await.unwrap().data(), content(3, 0).as_slice(), "device data");
        assert_eq!(part.stats().dirty, 0);
    });
}

#[test]
fn a_flush_error_is_returned_after_the_writes_and_a_later_write_dirty_makes_them_durable() {
    run(async {
        let device = sim(64, 0, 1);
        let probe = device.clone();
        let part = partition(device, 16, 8);
        let s = part.session().await;
        let buf = s.read(3).await.unwrap();
        buf.data_mut().copy_from_slice(&content(3, 1));
        buf.mark_dirty();
        drop(buf);
        probe.set_faults(0.0, 0.0, 1.0);
        let result = part.write_dirty().await;
        assert!(matches!(result, Err(Error::Io { op: IoOp::Flush, .. })), "{result:?}");
        assert_eq!(block_of(&probe.live_image(), 3), content(3, 1).as_slice(), "written");
        assert_eq!(block_of(&probe.durable_image(), 3), content(3, 0).as_slice(), "not durable");
        probe.set_faults(0.0, 0.0, 0.0);
        part.write_dirty().await.unwrap();
        assert_eq!(block_of(&probe.durable_image(), 3), content(3, 1).as_slice());
    });
}

#[test]
fn a_read_error_reaches_every_reader_and_leaves_nothing_installed() {
    run(async {
        let device = sim(64, 10, 6);
        let probe = device.clone();
        let part = partition(device, 16, 8);
        probe.set_faults(1.0, 0.0, 0.0);
        let s = part.session().await;
        let first = s.read(5).await;
        assert!(
            matches!(first, Err(Error::Io { op: IoOp::Read, block: Some(5), .. })),
            "{first:?}"
        );
        assert!(s.get(5).is_none());
        assert_eq!((s.pinned(), part.stats().pinned), (0, 0));
        let tasks: Vec<_> = (0..3)
            .map(|_| {
                let part = part.clone();
                glommio::spawn_local(async move {
                    let s = part.session().await;
                    s.read(6).await.map(|buf| buf.block())
                })
            })
            .collect();
        for task in tasks {
            let result = within(5, "a reader of a failing block", task).await;
            assert!(matches!(result, Err(Error::Io { op: IoOp::Read, .. })), "{result:?}");
        }
        assert!(part.stats().read_errors >= 2);
        assert_eq!(part.stats().pinned, 0);
        assert_eq!(part.prefetch(7, 1).unwrap(), 1);
        part.queue().sync().await.unwrap();
        assert!(s.get(7).is_none(), "a failed prefetch leaves the block uncached");

        probe.set_faults(0.0, 0.0, 0.0);
        for b in [5, 6, 7] {
            assert_eq!(&*s.read(b).await.unwrap().data(), content(b, 0).as_slice(), "retry {b}");
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------------

#[test]
fn stats_count_what_the_caller_did() {
    run(async {
        let device = sim(64, 0, 1);
        let part = partition(device, 8, 2);
        let s = part.session().await;
        for b in 0..8 {
            drop(s.read(b).await.unwrap());
        }
        drop(s.read(0).await.unwrap());
        drop(s.get(1).unwrap());
        assert!(s.get(30).is_none());
        let stats = part.stats();
        assert_eq!((stats.misses, stats.hits, stats.evictions), (8, 2, 0), "{stats:?}");

        drop(s.read(8).await.unwrap());
        let fresh = s.new_block(20).await.unwrap();
        fresh.mark_dirty();
        let stats = part.stats();
        assert_eq!((stats.misses, stats.news, stats.evictions), (9, 1, 2), "{stats:?}");
        assert_eq!((stats.pinned, stats.dirty), (1, 1), "{stats:?}");
        drop(fresh);
        part.write_dirty().await.unwrap();
        let stats = part.stats();
        assert_eq!((stats.pinned, stats.dirty, stats.writebacks), (0, 0, 1), "{stats:?}");

        // Every frame pinned by four sessions of two: a fifth session's read waits once.
        let others = [part.session().await, part.session().await, part.session().await];
        let mut held = vec![s.read(0).await.unwrap(), s.read(1).await.unwrap()];
        for (i, other) in others.iter().enumerate() {
            held.push(other.read(2 + 2 * i as u64).await.unwrap());
            held.push(other.read(3 + 2 * i as u64).await.unwrap());
        }
        assert_eq!(part.stats().pinned, 8);
        let waiter = {
            let part = part.clone();
            glommio::spawn_local(async move {
                let fifth = part.session().await;
                fifth.read(40).await.map(|buf| buf.block())
            })
        };
        yield_times(10).await;
        assert_eq!(part.stats().frame_waits, 1);
        held.pop();
        assert_eq!(within(5, "the waiter", waiter).await.unwrap(), 40);
        drop(held);

        // Single flight: joins.
        let device = sim(64, 10, 2);
        let part = partition(device, 8, 2);
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let part = part.clone();
                glommio::spawn_local(async move {
                    let s = part.session().await;
                    s.read(4).await.map(|buf| buf.block())
                })
            })
            .collect();
        for reader in readers {
            assert_eq!(reader.await.unwrap(), 4);
        }
        let stats = part.stats();
        assert_eq!((stats.misses, stats.joins, stats.hits), (1, 2, 0), "{stats:?}");
    });
}
