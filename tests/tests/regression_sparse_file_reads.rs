//! Regression test for a production-path bug found by the real-path fault tests: an engine
//! opened on a data file whose first block is a hole (a file made with `truncate`, or any new
//! sparse file) cannot read its own data back from the device: reads fail with `EOPNOTSUPP`
//! (os error 95), here 449 of 512.
//!
//! Cause: glommio 0.9's `DmaFile::open` probes whether the device supports io_uring polled I/O
//! by reading the file's first block through its `IOPOLL` ring (`Reactor::probe_iopoll_support`,
//! see DataDog/glommio#526 and #528; #605 reports the same symptom). Reading a hole issues no
//! I/O, so the probe succeeds on a device without poll queues (virtio-blk, loop); glommio marks
//! the file pollable (and caches that answer for the device in the executor thread). Reads
//! that do reach the device then go through the poll ring and fail. A fully written file is
//! not affected: the probe's read reaches the device, fails with `ENOTSUP`, and the file is
//! correctly marked not pollable.

use corebuf::Engine;
use corebuf_tests::{scratch_dir, stamped_block};

const BS: usize = 4096;
const BLOCKS: u64 = 512;

#[test]
fn a_data_file_that_starts_with_a_hole_cannot_be_read_back() {
    let dir = scratch_dir();
    let path = dir.path().join("sparse");
    std::fs::File::create(&path).and_then(|f| f.set_len(BLOCKS * BS as u64)).expect("sparse");
    let engine = Engine::builder()
        .path(&path)
        .shards(1)
        .pin_threads(false)
        .cache_size_bytes(64 * BS as u64)
        .build()
        .expect("the engine opens the file");
    let client = engine.client();
    for b in 0..BLOCKS {
        client.write_blocking(b, &stamped_block(b, 1, BS)).expect("write");
    }
    client.flush_blocking().expect("barrier");
    // The cache holds 64 of the 512 blocks: most reads go to the device.
    let (mut failed, mut first) = (0, None);
    for b in 0..BLOCKS {
        match client.read_blocking(b) {
            Ok(data) => assert_eq!(data, stamped_block(b, 1, BS), "block {b}"),
            Err(e) => {
                failed += 1;
                first.get_or_insert(e);
            }
        }
    }
    engine.shutdown().expect("shutdown");
    assert_eq!(failed, 0, "reads of durable data failed; the first: {first:?}");
}
