//! Regression test for a deadlock in the engine's messaging: barrier parts (`WriteBack`)
//! travelled in the same inbox as work messages, and a shard stops reading its inbox while all
//! its `handlers_in_flight_max` handlers are busy. With every handler slot on both shards taken
//! by jobs that run a global barrier, each barrier's write-back request to the other shard sat
//! behind jobs that waited for it: no barrier could finish. Control messages now have their own
//! lane that handler back-pressure does not stop.

use std::sync::mpsc;
use std::time::Duration;

use corebuf::Engine;
use corebuf_tests::{data_file, scratch_dir, versioned_block};

const BS: usize = 4096;

#[test]
fn barriers_from_jobs_filling_every_handler_slot_deadlock() {
    let dir = scratch_dir();
    let path = data_file(dir.path(), 256, BS);
    let engine = Engine::builder()
        .path(&path)
        .shards(2)
        .cache_size_bytes(2 * 64 * BS as u64)
        .handlers_in_flight_max(2)
        .build()
        .unwrap();
    let client = engine.client();
    let (done_tx, done_rx) = mpsc::channel();
    // Three jobs per shard, each writing a block and then running a global barrier.
    for job in 0..6u64 {
        let (client, done) = (client.clone(), done_tx.clone());
        std::thread::spawn(move || {
            let shard = (job % 2) as usize;
            let outcome =
                futures_lite::future::block_on(client.run_on(shard, move |s| async move {
                    s.write(job, &versioned_block(job, 1, BS)).await?;
                    s.flush().await
                }));
            let _ = done.send(outcome);
        });
    }
    for _ in 0..6 {
        let Ok(outcome) = done_rx.recv_timeout(Duration::from_secs(30)) else {
            // Dropping a deadlocked engine would join its stuck shards and hang the test.
            std::mem::forget(engine);
            panic!("a barrier run from a job never finished (deadlock)");
        };
        outcome.expect("the job ran").expect("the barrier succeeded");
    }
    engine.shutdown().unwrap();
    let file = std::fs::read(&path).unwrap();
    for b in 0..6usize {
        assert_eq!(&file[b * BS..(b + 1) * BS], &versioned_block(b as u64, 1, BS)[..]);
    }
}
