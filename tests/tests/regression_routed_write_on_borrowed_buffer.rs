//! Regression test for an engine bug found by `sim_engine` (seeds 0 and 4 of 100 with its
//! guard removed): a routed write to a block whose bytes code on the owner shard holds
//! borrowed across an `await` (zero-copy access through `Shard::partition()`, which the API
//! offers for exactly this) panics the owner shard — "buffer data is borrowed elsewhere:
//! BufferBusy" — because the engine's write handler takes the bytes with `data_mut()`, which
//! panics on a borrowed buffer, instead of waiting for the borrow to end or failing with
//! `BufferBusy`. In the threaded engine the owner's executor thread dies.
//!
//! Fixed in the message layer: a routed write (and a local read) waits for the borrow to end,
//! so the borrower sees its bytes unchanged and the write lands after it.

use corebuf::io::{SimDevice, SimOptions};
use corebuf::{Engine, LocalEngine};
use futures_lite::future::yield_now;

const BS: usize = 4096;

#[test]
fn a_routed_write_to_a_borrowed_buffer_waits_for_the_borrow() {
    let executor = glommio::LocalExecutorBuilder::default().make().expect("an executor");
    executor.run(async {
        let sim = SimDevice::new(SimOptions::new(64 * BS as u64));
        let builder = Engine::builder().cache_size_bytes(2 * 16 * BS as u64).range_blocks(1);
        let engine = LocalEngine::start(builder, vec![sim.clone(), sim]).expect("an engine");
        let block = (0..64).find(|&b| engine.shard(0).owner_of(b) == 1).expect("shard 1 owns one");
        let borrower = engine.shard(0).run_on_owner(block, move |shard| async move {
            let session = shard.partition().session().await;
            let buf = session.read(block).await.expect("a read of a zeroed device");
            let data = buf.data();
            let before = data.to_vec();
            for _ in 0..64 {
                yield_now().await;
            }
            before == *data // the bytes did not change under the borrow
        });
        let writer = async {
            yield_now().await; // let the job take its borrow first
            engine.shard(0).write(block, &vec![7u8; BS]).await
        };
        let (stable, written) = futures_lite::future::zip(borrower, writer).await;
        assert!(stable.expect("the job ran"), "the bytes changed while borrowed");
        match written {
            Ok(()) => assert_eq!(engine.shard(0).read(block).await.expect("a read")[0], 7),
            Err(e) => panic!("the write failed with {e:?}"),
        }
        engine.shutdown().await.expect("a clean shutdown");
    });
}
