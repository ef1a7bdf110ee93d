//! Regression tests for two liveness bugs in the S3-FIFO eviction scan
//! (`shard/src/cache/policy.rs`, `S3Fifo::evict`), found by the shard simulation
//! (`sim_shards`, seed 8, a deadlock of two multi-pin sessions). In both, `evict` returns
//! "nothing evictable" while clean, unpinned frames exist; `alloc_frame` then waits for a state
//! change that nobody will make, so the reader hangs forever on an idle device:
//!
//! 1. The scan takes from the small queue whenever it is over its target share, and a frame it
//!    must keep (pinned) goes back to the small queue's head, so the small queue stays over
//!    target and the scan spins on it until its budget runs out, never looking at the main
//!    queue. A session holding two freshly read blocks (both in the small queue) then cannot
//!    read a third one: the deadlock rule's promise (a session waiting with at most P − 1 pins
//!    always gets a frame) is broken.
//! 2. The scan's budget is `2 × frames + 2` steps, but a main-queue frame may need `FREQ_MAX`
//!    (3) second chances before it can go: with every main frame hit three times, the budget
//!    runs out before any frequency reaches zero.
//!
//! Each test builds its state on one partition with one session and asks for one more block
//! with a 5 s timeout: it must be served.

use std::time::Duration;

use corebuf_shard::cache::{CacheConfig, Hooks, Partition, Session};
use corebuf_shard::io::{IoQueue, QueueConfig, SimDevice, SimOptions};

const BS: usize = 4096;
const FRAMES: u64 = 10;

fn run(test: impl std::future::Future<Output = ()>) {
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .make()
        .expect("a glommio executor")
        .run(test);
}

fn partition(pins: usize) -> Partition<SimDevice> {
    let device = SimDevice::new(SimOptions::new(64 * BS as u64));
    let queue = IoQueue::new(device, QueueConfig::default()).expect("queue");
    let config = CacheConfig {
        cache_size_bytes: FRAMES * BS as u64,
        pins_per_session_max: pins,
        ..CacheConfig::default()
    };
    Partition::new(queue, config, Hooks::default()).expect("partition")
}

/// Reads `block` through `session`, failing the test if that waits more than 5 s.
async fn read_within_timeout(
    part: &Partition<SimDevice>,
    session: &Session<SimDevice>,
    block: u64,
) {
    let read = async { Some(session.read(block).await.map(|b| b.block())) };
    let timeout = async {
        glommio::timer::sleep(Duration::from_secs(5)).await;
        None
    };
    match futures_lite::future::or(read, timeout).await {
        Some(result) => assert_eq!(result.expect("read"), block),
        None => panic!(
            "reading block {block} waited 5 s for a frame although clean, unpinned frames \
             exist (stats: {:?})",
            part.stats()
        ),
    }
}

#[test]
fn eviction_scan_spins_on_a_pinned_small_queue() {
    run(async {
        let part = partition(4);
        let session = part.session().await;
        // Fill every frame (all enter the small queue) and hit each once, so the next scans
        // promote them to the main queue.
        for b in 0..FRAMES {
            drop(session.read(b).await.expect("read"));
        }
        for b in 0..FRAMES {
            drop(session.get(b).expect("cached"));
        }
        // Hold two fresh blocks: both sit pinned in the small queue, over its target of 1.
        let first = session.read(FRAMES).await.expect("read");
        let second = session.read(FRAMES + 1).await.expect("read");
        let stats = part.stats();
        assert_eq!((stats.pinned, stats.dirty), (2, 0), "{stats:?}");
        // Two pins held, pins_per_session_max 4, eight clean unpinned frames in the main
        // queue: the deadlock rule promises this read a frame.
        read_within_timeout(&part, &session, FRAMES + 2).await;
        drop((first, second));
    });
}

#[test]
fn eviction_budget_too_small_for_frequent_main_frames() {
    run(async {
        let part = partition(1);
        let session = part.session().await;
        // Fill every frame (small queue), hit 0..9 once, then read 10: the scan promotes 0..9
        // to the main queue and evicts 0 from there. Main {1..9}, small {9, 10}.
        for b in 0..FRAMES {
            drop(session.read(b).await.expect("read"));
        }
        for b in 0..FRAMES - 1 {
            drop(session.get(b).expect("cached"));
        }
        drop(session.read(FRAMES).await.expect("read"));
        // Read 11: evicts 9 from the small queue into the ghost. Read 9 again: evicts 10 from
        // the small queue and 9 comes back from the ghost into the main queue.
        drop(session.read(FRAMES + 1).await.expect("read"));
        drop(session.read(FRAMES - 1).await.expect("read"));
        // Main {1..=9}, small {11} (at its target of 1). Hit every main frame three times:
        // frequency 3, the most a frame can have.
        for _ in 0..3 {
            for b in 1..FRAMES {
                drop(session.get(b).expect("cached"));
            }
        }
        let stats = part.stats();
        assert_eq!((stats.pinned, stats.dirty), (0, 0), "{stats:?}");
        read_within_timeout(&part, &session, 3 * FRAMES).await;
    });
}
