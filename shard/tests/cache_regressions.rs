//! Regression tests for bugs found in the cache partition (`shard/src/cache`), one per bug,
//! each named after the bug it pins down.

use std::cell::Cell;
use std::time::Duration;

use corebuf_shard::cache::{CacheConfig, Hooks, Partition};
use corebuf_shard::io::{IoQueue, QueueConfig, SimDevice, SimOptions};
use corebuf_shard::Error;

const BLOCK_BYTES: usize = 4096;

/// A device of `blocks` blocks, block `b` holding `content(b, 0)`.
fn device(blocks: u64, latency_yields_max: u32, seed: u64) -> SimDevice {
    let mut options = SimOptions::new(blocks * BLOCK_BYTES as u64);
    options.latency_yields_max = latency_yields_max;
    options.seed = seed;
    let image = (0..blocks).flat_map(|b| content(b, 0)).collect();
    SimDevice::from_image(image, options)
}

/// Version `version` of block `block`'s bytes.
fn content(block: u64, version: u64) -> Vec<u8> {
    (0..BLOCK_BYTES as u64 / 8)
        .flat_map(|i| (1 << 63 | block << 32 | version << 16 | i).to_le_bytes())
        .collect()
}

fn on_device(image: &[u8], block: u64) -> &[u8] {
    &image[block as usize * BLOCK_BYTES..(block as usize + 1) * BLOCK_BYTES]
}

fn partition<A: Default + 'static>(
    device: &SimDevice,
    frames: u64,
    pins: usize,
    queue: QueueConfig,
    hooks: Hooks<A>,
) -> Partition<SimDevice, A> {
    let queue = IoQueue::new(device.clone(), queue).expect("queue");
    let config = CacheConfig {
        cache_size_bytes: frames * BLOCK_BYTES as u64,
        pins_per_session_max: pins,
        dirty_high_percent: 100,
        dirty_low_percent: 0,
    };
    Partition::new(queue, config, hooks).expect("partition")
}

/// Runs `test` on a fresh executor; a hang fails it after 20 s instead of blocking the run.
fn run<T>(test: impl std::future::Future<Output = T>) -> T {
    glommio::LocalExecutor::default().run(within(20, "the test", test))
}

async fn within<T>(secs: u64, what: &str, future: impl std::future::Future<Output = T>) -> T {
    glommio::timer::timeout(Duration::from_secs(secs), async { Ok(future.await) })
        .await
        .unwrap_or_else(|e| panic!("{what} did not finish within {secs} s (hang): {e}"))
}

/// Bug: the eviction scan only looked at the small queue while it was over its target, so when
/// the small queue held only pinned frames a reader waited forever although the main queue
/// had clean, idle frames (the deadlock rule's promise broken by the policy).
#[test]
fn eviction_starves_on_pinned_small_queue_while_main_has_clean_frames() {
    run(async {
        within(10, "reads with clean idle frames in the main queue", async {
            let dev = device(64, 0, 1);
            let part: Partition<SimDevice> =
                partition(&dev, 16, 8, QueueConfig::default(), Hooks::default());
            let s = part.session().await;
            // 16 blocks, each hit once: the next misses promote them to the main queue.
            for b in 0..16 {
                drop(s.read(b).await.unwrap());
            }
            for b in 0..16 {
                drop(s.get(b).unwrap());
            }
            // 7 new blocks held pinned: they sit in the small queue, over its target of 1.
            let mut held = Vec::new();
            for b in 16..23 {
                held.push(s.read(b).await.unwrap());
            }
            let other = part.session().await;
            let buf = other.read(40).await.unwrap();
            assert_eq!(&*buf.data(), content(40, 0).as_slice());
            assert_eq!(part.stats().pinned, 8);
        })
        .await;
    });
}

/// Bug: the eviction scan had a budget of two passes over the frames, but a main-queue frame
/// at the highest frequency (3) needs four visits before it is judged, so a miss on a cache
/// whose main frames were all hot found "nothing evictable" and waited for a change that never
/// came.
#[test]
fn eviction_gives_up_before_hot_main_frames_run_out_of_second_chances() {
    run(async {
        within(10, "a miss on a cache of hot blocks", async {
            let dev = device(64, 0, 1);
            let part: Partition<SimDevice> =
                partition(&dev, 10, 1, QueueConfig::default(), Hooks::default());
            let s = part.session().await;
            // Fill the 10 frames, hit 0..9 once, miss 10: 0..9 are promoted to main and 0 is
            // evicted from there. Miss 11 (evicts 9 into the ghost), miss 9 (back into main).
            for b in 0..10 {
                drop(s.read(b).await.unwrap());
            }
            for b in 0..9 {
                drop(s.get(b).unwrap());
            }
            for b in [10, 11, 9] {
                drop(s.read(b).await.unwrap());
            }
            // Main holds 1..=9, small holds 11 (its target): make every main frame hot.
            for _ in 0..3 {
                for b in 1..10 {
                    drop(s.get(b).expect("block 1..=9 is cached"));
                }
            }
            let buf = s.read(30).await.unwrap();
            assert_eq!(&*buf.data(), content(30, 0).as_slice());
            assert!(part.stats().evictions >= 3);
        })
        .await;
    });
}

/// Bug: two reads awaited together through one session were both admitted before either
/// pinned its frame, so a session could pin more than `pins_per_session_max` buffers (here
/// both wait for a frame, because other sessions pin every frame, and both got one).
#[test]
fn concurrent_reads_in_one_session_exceed_the_pin_limit() {
    run(async {
        within(10, "two reads awaited together", async {
            let dev = device(64, 0, 3);
            let part: Partition<SimDevice> =
                partition(&dev, 16, 4, QueueConfig::default(), Hooks::default());
            assert_eq!(part.sessions_max(), 5);
            let s = part.session().await;
            let mut held = Vec::new();
            for b in 0..3 {
                held.push(s.read(b).await.unwrap());
            }
            // Four other sessions pin the 13 other frames (4 + 4 + 4 + 1).
            let others = [
                part.session().await,
                part.session().await,
                part.session().await,
                part.session().await,
            ];
            let mut others_held = Vec::new();
            for block in 3..16u64 {
                let other = &others[(block as usize - 3) / 4];
                others_held.push(other.read(block).await.unwrap());
            }
            assert_eq!(part.stats().pinned, 16);
            let release = async {
                futures_lite::future::yield_now().await;
                others_held.truncate(others_held.len() - 2);
            };
            let ((a, b), ()) = futures_lite::future::zip(
                futures_lite::future::zip(s.read(40), s.read(41)),
                release,
            )
            .await;
            let refused =
                [&a, &b].iter().filter(|r| matches!(r, Err(Error::PinLimit { .. }))).count();
            assert_eq!(refused, 1, "exactly one of the two reads must be refused: {a:?} {b:?}");
            assert_eq!(s.pinned(), 4, "the session holds exactly its limit");
        })
        .await;
    });
}

/// Bug: dropping a `write_dirty` future (a timeout, a `select`) while it waited to submit a
/// write left that buffer marked as being written forever: it could never be evicted or
/// forgotten, and every later `write_dirty` waited for it and hung.
#[test]
fn cancelled_write_dirty_leaves_buffer_writing_forever() {
    run(async {
        let dev = device(64, 6, 5);
        let queue = QueueConfig {
            block_size_bytes: BLOCK_BYTES,
            io_depth_max: 4,
            writebacks_in_flight_max: 1,
        };
        let part: Partition<SimDevice> = partition(&dev, 16, 8, queue, Hooks::default());
        let s = part.session().await;
        for b in 0..4 {
            let buf = s.read(b).await.unwrap();
            buf.data_mut().copy_from_slice(&content(b, 1));
            buf.mark_dirty();
        }
        // Poll once and drop: the first write is submitted, the second waits for the single
        // write-back slot when the future goes away.
        let polled = futures_lite::future::poll_once(part.write_dirty()).await;
        assert!(polled.is_none(), "with latency, write_dirty cannot finish in one poll");
        within(5, "write_dirty after a cancelled one", part.write_dirty()).await.unwrap();
        let durable = dev.durable_image();
        for b in 0..4 {
            assert_eq!(on_device(&durable, b), content(b, 1).as_slice(), "block {b}");
        }
        assert_eq!(part.stats().dirty, 0);
    });
}

/// Bug: a write started while the caller held the buffer's aux data (`BufRef::aux`) ran the
/// `on_write` hook, which borrows the aux data too: a `RefCell` double borrow panic. Here
/// `mark_dirty` starts the background writer right away, inside the call.
#[test]
fn on_write_hook_panics_when_aux_is_borrowed_as_a_write_starts() {
    run(async {
        let dev = device(64, 0, 1);
        let hooks: Hooks<u64> = Hooks {
            on_read: None,
            on_alloc: None,
            on_write: Some(Box::new(|_block, data, aux: &mut u64| {
                *aux += 1;
                let n = data.len();
                data[n - 8..].copy_from_slice(&aux.to_le_bytes());
            })),
        };
        let queue = IoQueue::new(dev.clone(), QueueConfig::default()).unwrap();
        let config = CacheConfig {
            cache_size_bytes: 16 * BLOCK_BYTES as u64,
            pins_per_session_max: 4,
            dirty_high_percent: 0,
            dirty_low_percent: 0,
        };
        let part = Partition::new(queue, config, hooks).unwrap();
        let s = part.session().await;
        let buf = s.read(3).await.unwrap();
        {
            let mut aux = buf.aux();
            *aux = 41;
            buf.data_mut()[0] = 0xAB;
            buf.mark_dirty(); // starts the background writer (dirty_high_percent = 0)
        }
        drop(buf);
        within(5, "write_dirty", part.write_dirty()).await.unwrap();
        let durable = dev.durable_image();
        let block = on_device(&durable, 3);
        assert_eq!(block[0], 0xAB);
        assert_eq!(&block[BLOCK_BYTES - 8..], &42u64.to_le_bytes());
    });
}

/// Bug: `release_move` checked that the caller held the only pin before writing the old
/// block's dirty data, not after; another task that pinned the old block during that write
/// kept a handle labelled with the old block on a buffer now holding the new one, so its
/// changes went to the new block.
#[test]
fn release_move_relinks_a_buffer_another_task_pinned_during_the_old_write() {
    run(async {
        let dev = device(64, 6, 9);
        let part: Partition<SimDevice> =
            partition(&dev, 16, 4, QueueConfig::default(), Hooks::default());
        let s = part.session().await;
        let other = part.session().await;
        let buf = s.read(3).await.unwrap();
        buf.data_mut().copy_from_slice(&content(3, 1));
        buf.mark_dirty();
        let grabbed = Cell::new(None);
        let (moved, ()) = futures_lite::future::zip(s.release_move(buf, 9), async {
            futures_lite::future::yield_now().await;
            grabbed.set(other.get(3));
        })
        .await;
        let handle = grabbed.take().expect("block 3 is cached while its old data is written");
        assert_eq!(handle.block(), 3);
        if moved.is_ok() {
            // The move went through: the other handle must not now stand for block 9's data.
            handle.data_mut()[..8].copy_from_slice(&7u64.to_le_bytes());
            handle.mark_dirty();
            drop(handle);
            part.write_dirty().await.unwrap();
            let live = dev.live_image();
            assert_eq!(
                &on_device(&live, 3)[..8],
                &7u64.to_le_bytes(),
                "the change to block 3 went elsewhere"
            );
        } else {
            assert!(matches!(moved, Err(Error::BufferBusy { block: 3 })), "{moved:?}");
        }
    });
}

/// Bug: when every frame was dirty, a reader's eviction scan started write-backs and then
/// waited for a state change; a write-back that completed inside that call (a device that
/// completes at once) notified before the reader started waiting, so the reader waited
/// forever (a lost wake-up).
#[test]
fn eviction_write_back_completing_inline_is_a_lost_wake_up() {
    run(async {
        within(10, "a read with every frame dirty", async {
            let dev = device(64, 0, 1);
            let part: Partition<SimDevice> =
                partition(&dev, 16, 8, QueueConfig::default(), Hooks::default());
            let s = part.session().await;
            for b in 0..16 {
                let buf = s.read(b).await.unwrap();
                buf.data_mut().copy_from_slice(&content(b, 1));
                buf.mark_dirty();
            }
            assert_eq!(part.stats().dirty, 16);
            let buf = s.read(40).await.unwrap();
            assert_eq!(&*buf.data(), content(40, 0).as_slice());
            assert!(dev.counters().writes > 0, "room was made by writing dirty buffers back");
        })
        .await;
    });
}

/// Bug: the background writer stopped when the frames dirty *or being written* fell to the low
/// mark, but it only submits writes and does not wait for them, so with a device slower than
/// its loop the count never fell while it ran and it wrote back every dirty buffer instead of
/// stopping at the low mark.
#[test]
fn background_write_back_overshoots_the_low_mark_while_its_writes_are_in_flight() {
    run(async {
        let dev = device(64, 4, 14);
        let queue = IoQueue::new(dev.clone(), QueueConfig::default()).unwrap();
        let config = CacheConfig {
            cache_size_bytes: 20 * BLOCK_BYTES as u64,
            pins_per_session_max: 4,
            dirty_high_percent: 50, // above 10 dirty frames the writer starts
            dirty_low_percent: 25,  // and stops at 5
        };
        let part: Partition<SimDevice> = Partition::new(queue, config, Hooks::default()).unwrap();
        let s = part.session().await;
        for b in 0..11 {
            let buf = s.read(b).await.unwrap();
            buf.data_mut().copy_from_slice(&content(b, 1));
            buf.mark_dirty();
        }
        part.queue().sync().await.unwrap();
        for _ in 0..100 {
            futures_lite::future::yield_now().await;
        }
        let stats = part.stats();
        assert_eq!((stats.dirty, stats.writebacks), (5, 6), "{stats:?}");
    });
}

/// Bug: a task waiting for a frame could lose every frame that freed up to tasks that had just
/// started an operation (they took it synchronously, before the woken waiter ran), so under
/// a steady write load one operation waited for the whole run (8 s in corebuf-bench's write
/// scenario) while the others went on. Frame allocation is now first come, first served: an
/// operation waits at most for the operations that asked before it.
#[test]
fn frame_waiters_starved_by_newcomers_under_write_load() {
    const TASKS: u64 = 24;
    const OPS_PER_TASK: u64 = 150;
    let sim = device(4096, 3, 7);
    let part = partition(&sim, 32, 2, QueueConfig::default(), Hooks::<()>::default());
    let completed = std::rc::Rc::new(Cell::new(0u64));
    let worst_wait = run(async {
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let part = part.clone();
                let completed = completed.clone();
                glommio::spawn_local(async move {
                    let mut rng = corebuf_shard::rng::SimRng::new(t);
                    let mut worst = 0;
                    for _ in 0..OPS_PER_TASK {
                        let seen = completed.get();
                        let session = part.session().await;
                        let buf = session.new_block(rng.below(4096)).await.expect("new_block");
                        buf.mark_dirty();
                        drop(buf);
                        // Operations others completed while this one waited.
                        worst = worst.max(completed.get() - seen);
                        completed.set(completed.get() + 1);
                    }
                    worst
                })
            })
            .collect();
        let mut worst = 0;
        for task in tasks {
            worst = worst.max(task.await);
        }
        worst
    });
    assert_eq!(completed.get(), TASKS * OPS_PER_TASK);
    // First come, first served: at most the other tasks' operations in line ahead, a few
    // times over for the waits inside one operation. Starvation shows as hundreds.
    assert!(worst_wait <= 4 * TASKS, "an operation waited while {worst_wait} others completed");
}
