//! Remote reads by loan (the message layer's invariant 5): a shard's `read_with` of another
//! shard's block that hits the owner's cache runs on the owner's own frame, which the owner
//! keeps pinned and unchanged until the reader is done. These tests check that the bytes do
//! not change under a reader on another thread (a write waits for the loan), and that every
//! way a read can end gives the loan back: the result taken, the future dropped after the
//! reply came, the future dropped before it came, releases that find their ring full (also
//! while the requester's poller sleeps), a lent reply nobody takes, and shards that die: an
//! owner dying under a remote reader (its frame stays mapped), a requester dying with a borrow
//! unserved (shutdown does not hang) or with a release in flight (it does not end another
//! shard's loan). The last five came from a review of the first version, which failed them.

use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use corebuf::io::{SimDevice, SimOptions};
use corebuf::{Engine, LocalEngine, Shard};
use corebuf_tests::{data_file, initial_block, scratch_dir, versioned_block};
use futures_lite::future::{block_on, poll_once, yield_now};

const BS: usize = 4096;
const BLOCKS: u64 = 256;

/// How long the reader keeps the lent bytes while a writer tries to change them.
const HOLD: Duration = Duration::from_millis(300);

#[test]
fn a_write_waits_until_the_remote_reader_of_a_lent_block_is_done() {
    let dir = scratch_dir();
    let path = data_file(dir.path(), BLOCKS, BS);
    let engine = Engine::builder()
        .path(&path)
        .shards(2)
        .range_blocks(4)
        .cache_size_bytes(2 * 64 * BS as u64)
        .build()
        .expect("an engine");
    let client = engine.client();
    let block = (0..BLOCKS).find(|&b| client.owner_of(b) == 1).expect("shard 1 owns a block");
    let (inside_tx, inside_rx) = mpsc::channel();
    let reader_done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (client, reader_done) = (client.clone(), Arc::clone(&reader_done));
        std::thread::spawn(move || {
            futures_lite::future::block_on(client.run_on(0, move |shard: Rc<Shard>| async move {
                // The first read brings the block into shard 1's cache (a miss is copied);
                // the second hits there and is lent.
                shard.read_with(block, |_| ()).await.expect("a warming read");
                shard
                    .read_with(block, |data| {
                        let before = data.to_vec();
                        inside_tx.send(()).expect("the test waits");
                        std::thread::sleep(HOLD);
                        let unchanged = before == data;
                        reader_done.store(true, Ordering::SeqCst);
                        (unchanged, before)
                    })
                    .await
                    .expect("a lent read")
            }))
            .expect("the job ran")
        })
    };
    inside_rx.recv_timeout(Duration::from_secs(60)).expect("the reader got the bytes");
    let new = versioned_block(block, 1, BS);
    futures_lite::future::block_on(client.write(block, &new)).expect("the write");
    assert!(
        reader_done.load(Ordering::SeqCst),
        "the write landed while a remote reader still held the lent bytes"
    );
    let (unchanged, seen) = reader.join().expect("the reader thread");
    assert!(unchanged, "the lent bytes changed under the reader");
    assert_eq!(seen, initial_block(block, BS), "the reader saw the block's bytes");
    let after = futures_lite::future::block_on(client.read(block)).expect("a read");
    assert_eq!(after, new, "the write landed after the loan");
    let stats = engine.stats().expect("stats");
    assert_eq!(stats.shards[1].cache.pinned, 0, "the loan ended");
    engine.shutdown().expect("a clean shutdown");
}

/// Runs `test` on a 2-shard `LocalEngine` over a simulated device (every block zeroed) whose
/// rings have `credits` credits, then checks the engine shuts down cleanly.
fn on_local_engine<F, Fut>(credits: usize, test: F)
where
    F: FnOnce(Rc<LocalEngine<SimDevice>>) -> Fut + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let executor = glommio::LocalExecutorBuilder::default().make().expect("an executor");
    executor.run(async move {
        let sim = SimDevice::new(SimOptions::new(BLOCKS * BS as u64));
        let builder = Engine::builder()
            .cache_size_bytes(2 * 64 * BS as u64)
            .range_blocks(1)
            .ring_capacity(credits);
        let engine =
            Rc::new(LocalEngine::start(builder, vec![sim.clone(), sim]).expect("an engine"));
        test(Rc::clone(&engine)).await;
        let engine = Rc::try_unwrap(engine).expect("the test let go of the engine");
        engine.shutdown().await.expect("a clean shutdown");
    });
}

fn remote_blocks(engine: &LocalEngine<SimDevice>, count: usize) -> Vec<u64> {
    (0..BLOCKS).filter(|&b| engine.shard(0).owner_of(b) == 1).take(count).collect()
}

fn pinned_on(engine: &LocalEngine<SimDevice>, shard: usize) -> u64 {
    engine.shard(shard).stats().cache.pinned
}

async fn yields(n: usize) {
    for _ in 0..n {
        yield_now().await;
    }
}

#[test]
fn a_loan_ends_when_the_reader_returns() {
    on_local_engine(128, |engine| async move {
        let block = remote_blocks(&engine, 1)[0];
        let shard = Rc::clone(engine.shard(0));
        shard.read_with(block, |_| ()).await.expect("a warming read (a miss, copied)");
        let pinned_inside = shard
            .read_with(block, |data| {
                assert!(data.iter().all(|&b| b == 0), "a zeroed device reads zeroes");
                pinned_on(&engine, 1)
            })
            .await
            .expect("a lent read");
        assert_eq!(pinned_inside, 1, "the owner pinned the block while it was lent");
        yields(8).await;
        assert_eq!(pinned_on(&engine, 1), 0, "the release unpinned it");
    });
}

#[test]
fn a_lent_reply_not_taken_by_the_next_turn_becomes_a_copy() {
    on_local_engine(128, |engine| async move {
        let block = remote_blocks(&engine, 1)[0];
        let shard = Rc::clone(engine.shard(0));
        shard.read_with(block, |_| ()).await.expect("a warming read");
        let mut read = Box::pin(shard.read_with(block, |data| data.to_vec()));
        assert!(poll_once(&mut read).await.is_none(), "the request is sent");
        yields(8).await; // the owner lends, the reply arrives; the read is not polled again
        assert_eq!(engine.shard(1).stats().messages_inline, 1, "the owner lent it from cache");
        assert_eq!(pinned_on(&engine, 1), 0, "the unclaimed loan was copied and released");
        shard.write(block, &vec![5u8; BS]).await.expect("a write after the loan");
        let seen = read.await.expect("the read, finished late");
        assert!(seen.iter().all(|&b| b == 0), "it returns the bytes it read, from the copy");
        assert_eq!(shard.read(block).await.expect("a read")[0], 5, "and the write landed");
    });
}

#[test]
fn a_read_dropped_before_its_reply_came_ends_its_loan() {
    on_local_engine(128, |engine| async move {
        let block = remote_blocks(&engine, 1)[0];
        let shard = Rc::clone(engine.shard(0));
        shard.read_with(block, |_| ()).await.expect("a warming read");
        let mut read = Box::pin(shard.read_with(block, |_| ()));
        assert!(poll_once(&mut read).await.is_none(), "the request is sent");
        drop(read); // abandoned: the lent reply comes to nobody
        yields(16).await;
        assert_eq!(pinned_on(&engine, 1), 0, "the abandoned reply's loan was released");
        shard.write(block, &vec![6u8; BS]).await.expect("a write after the loan");
    });
}

#[test]
fn releases_that_find_their_ring_full_are_sent_later() {
    // One credit per pair: a request ring of 2, so most releases wait for room.
    on_local_engine(1, |engine| async move {
        let blocks = remote_blocks(&engine, 32);
        let shard = Rc::clone(engine.shard(0));
        for &b in &blocks {
            shard.read_with(b, |_| ()).await.expect("a warming read");
        }
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let (shard, blocks) = (Rc::clone(&shard), blocks.clone());
                glommio::spawn_local(async move {
                    for round in 0..20 {
                        let b = blocks[(i * 7 + round) % blocks.len()];
                        let zero = shard.read_with(b, |d| d.iter().all(|&x| x == 0)).await;
                        assert!(zero.expect("a lent read"), "block {b} reads zeroes");
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await;
        }
        yields(32).await;
        assert_eq!(pinned_on(&engine, 1), 0, "every loan was released");
        let stats = engine.shard(1).stats();
        assert!(stats.messages_inline >= 16 * 20, "the reads hit the owner's cache");
    });
}

/// Reads polled once and then dropped, two at a time through rings of one credit (so most
/// releases find no room and wait): every loan ends, whichever path ends it (the copy of an
/// unclaimed reply at the next turn, or the dropped future).
#[test]
fn loans_of_reads_dropped_unpolled_all_end() {
    on_local_engine(1, |engine| async move {
        let blocks: Vec<u64> =
            (0..BLOCKS).filter(|&b| engine.shard(0).owner_of(b) == 1).take(2).collect();
        let shard = Rc::clone(engine.shard(0));
        for &b in &blocks {
            shard.read_with(b, |_| ()).await.expect("a warming read");
        }
        for _ in 0..8 {
            let mut r1 = Box::pin(shard.read_with(blocks[0], |_| ()));
            assert!(poll_once(&mut r1).await.is_none());
            let mut r2 = Box::pin(shard.read_with(blocks[1], |_| ()));
            assert!(poll_once(&mut r2).await.is_none());
            yields(2).await;
            drop(r1);
            drop(r2);
        }
        yields(64).await;
        glommio::timer::sleep(Duration::from_millis(200)).await;
        assert_eq!(engine.shard(1).stats().cache.pinned, 0, "a loan stayed open");
        for &b in &blocks {
            shard.write(b, &vec![3u8; BS]).await.expect("a write after the loans");
        }
    });
}

/// A threaded engine of `shards` shards and `cache` bytes over a new data file (kept alive by
/// the returned directory), and a block of shard 1's, read once so that it is in its cache.
fn threaded_with_cached_block(shards: usize, cache: u64) -> (tempfile::TempDir, Engine, u64) {
    let dir = scratch_dir();
    let path = data_file(dir.path(), BLOCKS, BS);
    let engine = Engine::builder()
        .path(&path)
        .shards(shards)
        .range_blocks(4)
        .cache_size_bytes(cache)
        .build()
        .expect("an engine");
    let client = engine.client();
    let block = (0..BLOCKS).find(|&b| client.owner_of(b) == 1).expect("a block of shard 1");
    client.read_blocking(block).expect("a warming read");
    (dir, engine, block)
}

/// A `Borrow` that a requester pushed just before it died is served by the owner after the
/// owner already ended the dead shard's loans (`notice_deaths` runs before the rings are
/// drained, and only once per death): the new loan to the dead shard is never ended, and the
/// owner's poller never exits (`may_exit` wants `loans.count() == 0`), so shutdown hangs.
#[test]
fn a_borrow_from_a_shard_that_died_does_not_hang_shutdown() {
    let (_dir, engine, block) = threaded_with_cached_block(2, 2 * 64 * BS as u64);
    let client = engine.client();
    let (started_tx, started_rx) = mpsc::channel();
    let blocker = {
        let client = client.clone();
        std::thread::spawn(move || {
            block_on(client.run_on(1, move |_| async move {
                started_tx.send(()).expect("the test waits");
                std::thread::sleep(Duration::from_millis(1500)); // shard 1 serves nothing
            }))
        })
    };
    started_rx.recv_timeout(Duration::from_secs(60)).expect("shard 1 is blocked");
    let died = block_on(client.run_on(0, move |shard: Rc<Shard>| async move {
        let mut read = Box::pin(shard.read_with(block, |_| ()));
        assert!(poll_once(&mut read).await.is_none(), "the Borrow is in shard 1's ring");
        panic!("injected: shard 0 dies with its Borrow unserved");
    }));
    assert!(died.is_err(), "shard 0 died");
    blocker.join().expect("the blocker thread").expect("the blocking job");
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(engine.shutdown());
    });
    match done_rx.recv_timeout(Duration::from_secs(20)) {
        Ok(result) => assert!(result.is_err(), "shutdown reports the dead shard"),
        Err(_) => panic!("shutdown hangs: shard 1 keeps a loan to dead shard 0 open forever"),
    }
}

/// A release that a requester pushed while it died (its `Answered` drops as it unwinds) is
/// popped by the owner after `notice_deaths` already ended that loan and freed its token; if
/// the token went to another requester's loan in between, the stale release ends *that*
/// loan, and the bytes change under its reader.
#[test]
fn a_release_from_a_shard_that_died_does_not_end_another_shards_loan() {
    let (_dir, engine, block) = threaded_with_cached_block(3, 3 * 64 * BS as u64);
    let client = engine.client();

    // Shard 2 reads the block by loan (token 0) and, inside its reader, waits to die.
    let (inside2_tx, inside2_rx) = mpsc::channel();
    let (go2_tx, go2_rx) = mpsc::channel::<()>();
    let dying = {
        let client = client.clone();
        std::thread::spawn(move || {
            block_on(client.run_on(2, move |shard: Rc<Shard>| async move {
                shard
                    .read_with(block, move |_| {
                        inside2_tx.send(()).expect("the test waits");
                        let _ = go2_rx.recv();
                        panic!("injected: shard 2 dies inside its reader");
                    })
                    .await
            }))
        })
    };
    inside2_rx.recv_timeout(Duration::from_secs(60)).expect("shard 2 holds a loan");

    // Shard 1 stops serving for a while.
    let (started_tx, started_rx) = mpsc::channel();
    let blocker = {
        let client = client.clone();
        std::thread::spawn(move || {
            block_on(client.run_on(1, move |_| async move {
                started_tx.send(()).expect("the test waits");
                std::thread::sleep(Duration::from_millis(2000));
            }))
        })
    };
    started_rx.recv_timeout(Duration::from_secs(60)).expect("shard 1 is blocked");

    // Shard 0 asks for a loan of the same block; its Borrow waits in shard 1's ring.
    let (inside0_tx, inside0_rx) = mpsc::channel();
    let reader_done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (client, reader_done) = (client.clone(), Arc::clone(&reader_done));
        std::thread::spawn(move || {
            block_on(client.run_on(0, move |shard: Rc<Shard>| async move {
                shard
                    .read_with(block, move |data| {
                        let before = data.to_vec();
                        inside0_tx.send(()).expect("the test waits");
                        std::thread::sleep(Duration::from_millis(700));
                        let unchanged = before == data;
                        reader_done.store(true, Ordering::SeqCst);
                        unchanged
                    })
                    .await
                    .expect("a lent read")
            }))
        })
    };
    std::thread::sleep(Duration::from_millis(200)); // shard 0's Borrow is pushed

    // Shard 2 dies: its Release{0} enters shard 1's ring, then it is marked dead.
    go2_tx.send(()).expect("shard 2 waits");
    assert!(dying.join().expect("the dying thread").is_err(), "shard 2 died");
    blocker.join().expect("the blocker thread").expect("the blocking job");

    // Shard 1 resumes: ends shard 2's loan (token 0 free), lends to shard 0 (token 0 again),
    // then pops shard 2's stale Release{0}.
    inside0_rx.recv_timeout(Duration::from_secs(60)).expect("shard 0 got the block");
    let _ = block_on(client.write(block, &versioned_block(block, 1, BS)));
    let written_during_loan = !reader_done.load(Ordering::SeqCst);
    let unchanged = reader.join().expect("the reader thread").expect("the reader job");
    assert!(!written_during_loan, "a write landed while shard 0 still held the lent bytes");
    assert!(unchanged, "the lent bytes changed under shard 0's reader");
    let _ = engine.shutdown();
}

/// Whether `addr` lies in a mapping of this process.
fn is_mapped(addr: usize) -> bool {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
    maps.lines().any(|line| {
        let range = line.split_whitespace().next().unwrap_or("");
        let mut ends = range.split('-').map(|h| usize::from_str_radix(h, 16).unwrap_or(0));
        let (start, end) = (ends.next().unwrap_or(0), ends.next().unwrap_or(0));
        (start..end).contains(&addr)
    })
}

/// Ids of this process's threads named `name` (other tests may leave some behind).
fn threads_named(name: &str) -> std::collections::HashSet<std::ffi::OsString> {
    let tasks = std::fs::read_dir("/proc/self/task").expect("tasks").flatten();
    tasks
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .map(|t| t.file_name())
        .collect()
}

/// An owner that panics while a remote reader runs on its lent frame: `Loans::drop` leaks
/// the loans only if `std::thread::panicking()`; but the last `Rc<Shard>` of a dead shard is
/// the `CURRENT` thread-local, dropped at thread exit, after the unwind was caught, when
/// `panicking()` is false: the loans drop, the arena is freed under the reader.
#[test]
fn an_owner_that_dies_does_not_free_the_frame_a_remote_reader_reads() {
    let earlier = threads_named("corebuf-shard-1");
    // 8 MiB per shard: the arena is its own mapping, so a free unmaps it.
    let (_dir, engine, block) = threaded_with_cached_block(2, 2 * (8 << 20));
    let shard_thread_alive = |name: &str| !threads_named(name).is_subset(&earlier);
    let client = engine.client();
    let (inside_tx, inside_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let reader = {
        let client = client.clone();
        std::thread::spawn(move || {
            block_on(client.run_on(0, move |shard: Rc<Shard>| async move {
                shard
                    .read_with(block, move |data| {
                        let before = data.to_vec();
                        assert!(is_mapped(data.as_ptr() as usize), "mapped while lent");
                        inside_tx.send(()).expect("the test waits");
                        let _ = go_rx.recv();
                        let mapped = is_mapped(data.as_ptr() as usize);
                        // Reading an unmapped frame would fault: look only if mapped.
                        let unchanged = mapped && before == data;
                        (mapped, unchanged)
                    })
                    .await
                    .expect("a lent read")
            }))
        })
    };
    inside_rx.recv_timeout(Duration::from_secs(60)).expect("shard 0 holds the loan");
    let died = block_on(client.run_on(1, |_| async { panic!("injected: the owner dies") }));
    assert!(died.is_err(), "shard 1 died");
    let deadline = Instant::now() + Duration::from_secs(20);
    while shard_thread_alive("corebuf-shard-1") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!shard_thread_alive("corebuf-shard-1"), "shard 1's thread has exited");
    go_tx.send(()).expect("the reader waits");
    let (mapped, unchanged) = reader.join().expect("the reader thread").expect("the job");
    assert!(mapped, "the dead owner's arena was freed (unmapped) under the remote reader");
    assert!(unchanged, "the lent bytes changed under the reader");
    let _ = engine.shutdown();
}

/// A lent reply waits in its slot until the read's future is polled or dropped. A future
/// polled once and then kept (a `select` loser kept for later, a manual poll) holds the
/// owner's frame pinned and shared for as long: a write of the block spins, and shutdown
/// cannot finish (neither poller exits). Before loans the same future held only a copy.
#[test]
fn a_lent_reply_nobody_takes_does_not_block_writes() {
    on_local_engine(128, |engine| async move {
        let block = (0..BLOCKS).find(|&b| engine.shard(0).owner_of(b) == 1).expect("remote");
        let shard = Rc::clone(engine.shard(0));
        shard.read_with(block, |_| ()).await.expect("a warming read");
        let mut kept = Box::pin(shard.read_with(block, |_| ()));
        assert!(poll_once(&mut kept).await.is_none(), "sent");
        yields(8).await; // lent; the reply waits in the slot
        let writer = Rc::clone(&shard);
        let wrote = glommio::timer::timeout(Duration::from_secs(1), async move {
            Ok(writer.write(block, &vec![9u8; BS]).await)
        })
        .await;
        drop(kept);
        assert!(wrote.is_ok(), "a write of the block waited on a read future nobody polls");
    });
}
