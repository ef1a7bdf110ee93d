//! `EngineBuilder::dirty_percent` reaches each shard's cache: with the default thresholds a
//! shard whose buffers are mostly dirty starts writing them back in the background; with the
//! high mark at 100 % nothing is written until a flush asks, and then everything is.

use std::time::Duration;

use corebuf::{Engine, EngineBuilder};
use corebuf_tests::{data_file, scratch_dir};

const BS: usize = 4096;
const FRAMES: u64 = 64;
/// Buffers dirtied: 75 % of the shard's frames, above the default high mark of 50 %.
const DIRTIED: u64 = 48;

/// Dirties `DIRTIED` blocks on the only shard, lets its background tasks run for a while and
/// returns the write-backs counted by then; then checks that a flush writes the rest.
fn writebacks_after_dirtying(builder: EngineBuilder) -> u64 {
    let engine = builder.build().expect("a valid engine");
    let client = engine.client();
    let (before_flush, after_flush) =
        futures_lite::future::block_on(client.run_on(0, |shard| async move {
            {
                let session = shard.partition().session().await;
                for block in 0..DIRTIED {
                    let buf = session.new_block(block).await.expect("new block");
                    buf.data_mut().fill(block as u8 + 1);
                    buf.mark_dirty();
                }
            }
            glommio::timer::sleep(Duration::from_millis(200)).await;
            let before_flush = shard.partition().stats().writebacks;
            shard.partition().write_dirty().await.expect("write back");
            (before_flush, shard.partition().stats())
        }))
        .expect("the shard answers");
    assert_eq!(after_flush.dirty, 0, "the flush leaves nothing dirty: {after_flush:?}");
    assert!(after_flush.writebacks >= DIRTIED, "every dirtied block written: {after_flush:?}");
    engine.shutdown().expect("shutdown");
    before_flush
}

fn builder(path: &std::path::Path) -> EngineBuilder {
    Engine::builder().path(path).shards(1).pin_threads(false).cache_size_bytes(FRAMES * BS as u64)
}

#[test]
fn the_default_thresholds_write_back_in_the_background() {
    let dir = scratch_dir();
    let path = data_file(dir.path(), 256, BS);
    let written = writebacks_after_dirtying(builder(&path));
    assert!(written > 0, "75 % dirty is above the default 50 %: background write-back runs");
}

#[test]
fn a_high_mark_of_100_percent_leaves_write_back_to_flushes() {
    let dir = scratch_dir();
    let path = data_file(dir.path(), 256, BS);
    let written = writebacks_after_dirtying(builder(&path).dirty_percent(100, 90));
    assert_eq!(written, 0, "nothing is written before the flush");
}
