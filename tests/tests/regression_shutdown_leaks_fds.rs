//! Regression test for a resource leak found by the real-path fault tests (a file system could
//! not be unmounted after the engine on it shut down cleanly): `Engine::shutdown()` returns
//! with every shard's file descriptor on the data file still open, and so does dropping the
//! engine. A server that reopens its engine leaks one descriptor per shard each time, and
//! the file system holding the data stays busy.
//!
//! Cause: each shard's `Rc<Shard>` (and with it the `DmaDevice`'s glommio `DmaFile`) is kept in
//! the thread-local `CURRENT` (`engine/src/shard.rs`), which is only dropped when the thread
//! exits, after the executor is gone. glommio closes a dropped `DmaFile` asynchronously through
//! its reactor (`GlommioFile::drop` calls `async_close` only if the reactor is still alive), so
//! with no reactor the descriptor is never closed.

use std::path::Path;

use corebuf::Engine;
use corebuf_tests::{data_file, scratch_dir};

const BS: usize = 4096;

/// Descriptors of this process open on `path`.
fn open_descriptors(path: &Path) -> usize {
    let target = std::fs::canonicalize(path).expect("the data file exists");
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|link| *link == target)
        .count()
}

fn engine(path: &Path) -> Engine {
    Engine::builder()
        .path(path)
        .shards(2)
        .pin_threads(false)
        .cache_size_bytes(64 * BS as u64)
        .build()
        .expect("engine")
}

#[test]
fn shutdown_leaks_the_data_file_descriptors() {
    let dir = scratch_dir();
    let path = data_file(dir.path(), 64, BS);
    let engine = engine(&path);
    engine.client().write_blocking(1, &vec![1; BS]).expect("write");
    assert_eq!(open_descriptors(&path), 2, "one descriptor per shard while running");
    engine.shutdown().expect("shutdown");
    assert_eq!(open_descriptors(&path), 0, "descriptors left open after shutdown()");
}

#[test]
fn dropping_the_engine_leaks_the_data_file_descriptors() {
    let dir = scratch_dir();
    let path = data_file(dir.path(), 64, BS);
    drop(engine(&path));
    assert_eq!(open_descriptors(&path), 0, "descriptors left open after the engine was dropped");
}
