//! `EngineBuilder::seal_on_write` runs on every write of a block, on the bytes that are
//! written: a caller that changes cached blocks without sealing them finds each block sealed
//! over its final bytes on the device (after a flush, after an eviction) and in the cache.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use corebuf::{Engine, EngineBuilder};
use corebuf_tests::{data_file, scratch_dir};

const BS: usize = 4096;
const FRAMES: u64 = 16;

/// The seal: bytes 0..8 hold a checksum of the rest of the block and the block number.
fn checksum(block: u64, data: &[u8]) -> u64 {
    data[8..].iter().fold(block.wrapping_mul(0x9E37_79B9_7F4A_7C15), |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

fn sealed(block: u64, data: &[u8]) -> bool {
    data[..8] == checksum(block, data).to_le_bytes()
}

fn builder(path: &std::path::Path, seals: Arc<AtomicU64>) -> EngineBuilder {
    Engine::builder()
        .path(path)
        .shards(1)
        .pin_threads(false)
        .cache_size_bytes(FRAMES * BS as u64)
        .seal_on_write(move |block, data| {
            seals.fetch_add(1, Ordering::Relaxed);
            let sum = checksum(block, data);
            data[..8].copy_from_slice(&sum.to_le_bytes());
        })
}

#[test]
fn every_written_block_is_sealed_over_its_last_bytes_on_the_device_and_in_the_cache() {
    let dir = scratch_dir();
    let blocks = 4 * FRAMES;
    let path = data_file(dir.path(), blocks, BS);
    let seals = Arc::new(AtomicU64::new(0));
    let engine = builder(&path, Arc::clone(&seals)).build().expect("a valid engine");
    let client = engine.client();
    let cached_sealed = futures_lite::future::block_on(client.run_on(0, move |shard| async move {
        let session = shard.partition().session().await;
        // Block 1 changes twice before its write: the seal covers the second change.
        for (block, fill) in [(1u64, 0x11u8), (2, 0x22), (1, 0x33)] {
            let buf = session.read(block).await.expect("read");
            buf.data_mut()[8..].fill(fill);
            buf.mark_dirty();
        }
        shard.partition().write_dirty().await.expect("flush");
        let one = session.read(1).await.expect("read again");
        let cached = sealed(1, &one.data()) && one.data()[8] == 0x33;
        drop(one);
        // More blocks than frames: eviction writes them, each sealed too.
        for block in 8..blocks {
            let buf = session.new_block(block).await.expect("new block");
            buf.data_mut()[8..].fill(block as u8);
            buf.mark_dirty();
        }
        shard.partition().write_dirty().await.expect("flush");
        cached
    }))
    .expect("the shard answers");
    assert!(cached_sealed, "the cached copy carries the seal the write computed");
    engine.shutdown().expect("shutdown");

    let file = std::fs::read(&path).expect("read the data file");
    let block = |b: u64| &file[b as usize * BS..(b as usize + 1) * BS];
    assert!(sealed(1, block(1)) && block(1)[8..].iter().all(|&b| b == 0x33), "block 1");
    assert!(sealed(2, block(2)) && block(2)[8..].iter().all(|&b| b == 0x22), "block 2");
    for b in 8..blocks {
        assert!(sealed(b, block(b)), "block {b} is sealed on the device");
        assert!(block(b)[8..].iter().all(|&x| x == b as u8), "block {b} holds its bytes");
    }
    // Untouched blocks were never written, so never sealed.
    assert!(!sealed(3, block(3)), "block 3 was not written");
    assert_eq!(seals.load(Ordering::Relaxed), 2 + (blocks - 8), "one seal per write");
}
