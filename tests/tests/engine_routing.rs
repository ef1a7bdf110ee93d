//! Every block written through any shard or the Client reads back from every shard, and the
//! data does not depend on the shard count.

use corebuf::Engine;
use corebuf_tests::{data_file, initial_block, scratch_dir, versioned_block};

const BS: usize = 4096;
const BLOCKS: u64 = 512;

#[test]
fn writes_from_client_and_shards_read_back_everywhere_and_survive_reshard() {
    let dir = scratch_dir();
    let path = data_file(dir.path(), BLOCKS, BS);
    let engine = Engine::builder()
        .path(&path)
        .shards(4)
        .range_blocks(8)
        .cache_size_bytes(4 * 64 * BS as u64)
        .build()
        .unwrap();
    let client = engine.client();
    // Untouched blocks read the file's data.
    assert_eq!(client.read_blocking(3).unwrap(), initial_block(3, BS));
    // Even blocks through the client, odd blocks through shard (b % 4) via messages.
    for b in (0..BLOCKS).step_by(2) {
        client.write_blocking(b, &versioned_block(b, 1, BS)).unwrap();
    }
    for b in (1..BLOCKS).step_by(2) {
        let from = (b % 4) as usize;
        futures_lite::future::block_on(client.run_on(from, move |shard| async move {
            shard.write(b, &versioned_block(b, 1, BS)).await
        }))
        .unwrap()
        .unwrap();
    }
    for shard in 0..4 {
        let seen: Vec<bool> =
            futures_lite::future::block_on(client.run_on(shard, |s| async move {
                let mut ok = Vec::new();
                for b in 0..BLOCKS {
                    ok.push(s.read(b).await.unwrap() == versioned_block(b, 1, BS));
                }
                ok
            }))
            .unwrap();
        assert!(seen.iter().all(|&ok| ok), "shard {shard} read stale data");
    }
    client.flush_blocking().unwrap();
    let stats = engine.stats().unwrap();
    assert!(stats.messages_sent() > 0);
    assert_eq!(stats.shards.len(), 4);
    engine.shutdown().unwrap();

    // Reopen with another shard count: the data is the same.
    let engine = Engine::builder().path(&path).shards(3).cache_size_bytes(3 << 20).build().unwrap();
    let client = engine.client();
    for b in 0..BLOCKS {
        assert_eq!(client.read_blocking(b).unwrap(), versioned_block(b, 1, BS), "block {b}");
    }
    engine.shutdown().unwrap();
}
