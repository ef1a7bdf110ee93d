//! Remote reads by loan (the message layer's invariant 5): a shard's `read_with` of another
//! shard's block that hits the owner's cache runs on the owner's own frame, which the owner
//! keeps pinned and unchanged until the reader is done. These tests check that the bytes do
//! not change under a reader on another thread (a write waits for the loan), and that every
//! way a read can end gives the loan back: the result taken, the future dropped after the
//! reply came, the future dropped before it came, and releases that find their ring full.

use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use corebuf::io::{SimDevice, SimOptions};
use corebuf::{Engine, LocalEngine, Shard};
use corebuf_tests::{data_file, initial_block, scratch_dir, versioned_block};
use futures_lite::future::{poll_once, yield_now};

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
fn a_read_dropped_after_its_reply_came_ends_its_loan() {
    on_local_engine(128, |engine| async move {
        let block = remote_blocks(&engine, 1)[0];
        let shard = Rc::clone(engine.shard(0));
        shard.read_with(block, |_| ()).await.expect("a warming read");
        let mut read = Box::pin(shard.read_with(block, |_| ()));
        assert!(poll_once(&mut read).await.is_none(), "the request is sent");
        yields(8).await; // the owner lends, the reply arrives; the read is not polled again
        assert_eq!(pinned_on(&engine, 1), 1, "lent and not yet released");
        drop(read);
        yields(8).await;
        assert_eq!(pinned_on(&engine, 1), 0, "the dropped read released its loan");
        // The block is writable again (a write would wait forever for a leaked loan).
        shard.write(block, &vec![5u8; BS]).await.expect("a write after the loan");
        assert_eq!(shard.read(block).await.expect("a read")[0], 5);
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
