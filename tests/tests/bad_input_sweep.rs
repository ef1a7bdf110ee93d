//! Bad input at every public entry point gets a typed error: no panic, no hang.
//!
//! The sweep covers the builder (every setting at zero and past its range, files of the wrong
//! size or kind), `Client` (async and blocking forms), `Shard` (through `run_on`), its
//! `Partition` and `Session`, and a bare `IoQueue` and `Partition` over a `SimDevice`: block
//! numbers at and past the end of the device including `u64::MAX`, spans whose end overflows
//! (`prefetch(u64::MAX - 1, 10)`), zero counts, data shorter or longer than a block, pinning
//! past the session's bound, and every call after `shutdown()` (and racing it). Each call runs
//! under a deadline on its own thread, so a hang fails the test instead of stalling it, and a
//! panic fails it with the call's name.
//!
//! Zero-count spans are no-ops that succeed when the start block is inside the device
//! (`prefetch(b, 0)`, `forget_range(b, 0)`, `issue_discard(b, 0)`), matching an empty slice.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::mpsc;
use std::time::Duration;

use corebuf::{Engine, EngineBuilder, Error, IoOp, Shard};
use corebuf_shard::cache::{CacheConfig, Hooks, Partition};
use corebuf_shard::io::{Device, IoBuf, IoQueue, QueueConfig, SimDevice, SimOptions};
use corebuf_tests::{data_file, scratch_dir};

const BS: usize = 4096;
const BLOCKS: u64 = 256;
const DEADLINE: Duration = Duration::from_secs(30);

/// Runs `call` on its own thread; fails the test if it panics or takes longer than the
/// deadline.
fn within<T: Send + 'static>(what: &str, call: impl FnOnce() -> T + Send + 'static) -> T {
    let (sender, answer) = mpsc::channel();
    let thread = std::thread::spawn(move || {
        let _ = sender.send(call());
    });
    match answer.recv_timeout(DEADLINE) {
        Ok(value) => {
            thread.join().expect("the call's thread ended");
            value
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: still running after {DEADLINE:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            let panic = thread.join().expect_err("a thread that sent nothing panicked");
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{what}: panicked: {message}")
        }
    }
}

/// Builds an engine from `builder` within the deadline.
fn build(what: &str, builder: EngineBuilder) -> corebuf::Result<Engine> {
    within(what, move || builder.build())
}

fn expect_config(what: &str, result: corebuf::Result<Engine>, setting: &str) {
    match result {
        Err(Error::InvalidConfig { setting: s, .. }) if s == setting => {}
        Err(e) => panic!("{what}: expected InvalidConfig for {setting}, got {e:?}"),
        Ok(engine) => {
            engine.shutdown().expect("shutdown");
            panic!("{what}: the engine started")
        }
    }
}

fn engine(path: &Path) -> Engine {
    Engine::builder()
        .path(path)
        .shards(2)
        .range_blocks(4)
        .pin_threads(false)
        .cache_size_bytes(2 * 64 * BS as u64)
        .build()
        .expect("a valid engine")
}

fn file_of(dir: &Path, name: &str, bytes: u64) -> PathBuf {
    let path = dir.join(name);
    let file = std::fs::File::create(&path).expect("create");
    file.set_len(bytes).expect("size");
    path
}

#[test]
fn builder_rejects_every_out_of_range_setting() {
    let dir = scratch_dir();
    let path = data_file(dir.path(), BLOCKS, BS);
    let good =
        || Engine::builder().path(&path).shards(1).pin_threads(false).cache_size_bytes(1 << 20);

    expect_config("no path", build("no path", Engine::builder()), "path");
    expect_config("zero shards", build("zero shards", good().shards(0)), "shards");
    expect_config("2000 shards", build("2000 shards", good().shards(2000)), "shards");
    expect_config("zero range", build("zero range", good().range_blocks(0)), "range_blocks");
    expect_config("zero inbox", build("zero inbox", good().inbox_capacity(0)), "inbox_capacity");
    expect_config(
        "zero cache",
        build("zero cache", good().cache_size_bytes(0)),
        "cache_size_bytes",
    );
    let less_than_a_block = good().shards(2).cache_size_bytes(BS as u64);
    expect_config("a block over two shards", build("tiny", less_than_a_block), "cache_size_bytes");
    let zero_block = good().block_size_bytes(0);
    expect_config("zero block size", build("zero block", zero_block), "block_size_bytes");
    let odd_block = good().block_size_bytes(3000);
    expect_config("block size 3000", build("odd block", odd_block), "block_size_bytes");
    let sub_sector = good().block_size_bytes(256);
    expect_config("block size 256", build("sub-sector block", sub_sector), "block_size_bytes");
    let huge_block = good().block_size_bytes(128 << 10).cache_size_bytes(64 << 20);
    expect_config("block size 128 KiB", build("huge block", huge_block), "block_size_bytes");
    let block_bigger_than_file = good().block_size_bytes(2 << 20).cache_size_bytes(64 << 20);
    expect_config("block > file", build("block > file", block_bigger_than_file), "device size");
    expect_config(
        "zero pins",
        build("zero pins", good().pins_per_session_max(0)),
        "pins_per_session_max",
    );
    let too_many_pins = good().cache_size_bytes(8 * BS as u64).pins_per_session_max(5);
    expect_config("pins > frames / 2", build("pins", too_many_pins), "cache_size_bytes");
    let zero_writebacks = good().writebacks_in_flight_max(0);
    expect_config(
        "zero write-backs",
        build("write-backs", zero_writebacks),
        "writebacks_in_flight_max",
    );
    expect_config("zero io depth", build("io depth", good().io_depth_max(0)), "io_depth_max");
    expect_config("dirty 101 %", build("dirty", good().dirty_percent(101, 0)), "dirty_percent");
    expect_config(
        "dirty low > high",
        build("dirty", good().dirty_percent(10, 20)),
        "dirty_percent",
    );
    // A cache of more than 2^32 - 1 frames.
    let absurd_cache = good().block_size_bytes(512).cache_size_bytes(u64::MAX);
    expect_config("u64::MAX cache", build("absurd cache", absurd_cache), "cache_size_bytes");

    // Files of the wrong size or kind.
    let empty = file_of(dir.path(), "empty", 0);
    expect_config("empty file", build("empty", good().path(&empty)), "device size");
    let ragged = file_of(dir.path(), "ragged", 10 * BS as u64 + 512);
    expect_config("ragged file", build("ragged", good().path(&ragged)), "device size");
    match build("missing file", good().path(dir.path().join("missing"))) {
        Err(Error::Io { op: IoOp::Open, source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound)
        }
        other => panic!("missing file: {other:?}"),
    }
    let directory = build("directory", good().path(dir.path()));
    assert!(
        matches!(directory, Err(Error::NotAFileOrDevice { kind: "directory", .. })),
        "{directory:?}"
    );
    let fifo = dir.path().join("fifo");
    let status = std::process::Command::new("mkfifo").arg(&fifo).status();
    if status.is_ok_and(|s| s.success()) {
        let special = build("fifo", good().path(&fifo));
        assert!(matches!(special, Err(Error::NotAFileOrDevice { .. })), "{special:?}");
    }
    let null = build("/dev/null", good().path("/dev/null"));
    assert!(matches!(null, Err(Error::NotAFileOrDevice { .. })), "{null:?}");
}

#[test]
fn client_calls_with_bad_blocks_and_sizes_get_typed_errors() {
    let dir = scratch_dir();
    let path = data_file(dir.path(), BLOCKS, BS);
    let engine = engine(&path);
    let client = engine.client();
    let out_of_range = |r: &corebuf::Result<()>| matches!(r, Err(Error::BlockOutOfRange { .. }));
    for block in [BLOCKS, BLOCKS + 1, u64::MAX - 1, u64::MAX] {
        let c = client.clone();
        let read = within("client read", move || c.read_blocking(block).map(|_| ()));
        assert!(out_of_range(&read), "read({block}): {read:?}");
        let c = client.clone();
        let write = within("client write", move || c.write_blocking(block, &vec![0; BS]));
        assert!(out_of_range(&write), "write({block}): {write:?}");
        let c = client.clone();
        let read = within("client async read", move || {
            futures_lite::future::block_on(c.read(block)).map(|_| ())
        });
        assert!(out_of_range(&read), "async read({block}): {read:?}");
    }
    for (block, count) in
        [(u64::MAX - 1, 10), (u64::MAX, 1), (BLOCKS - 1, 2), (0, u64::MAX), (BLOCKS, 0)]
    {
        let c = client.clone();
        let prefetch = within("client prefetch", move || c.prefetch_blocking(block, count));
        assert!(out_of_range(&prefetch), "prefetch({block}, {count}): {prefetch:?}");
    }
    let c = client.clone();
    within("zero-count prefetch", move || c.prefetch_blocking(3, 0)).expect("prefetch(3, 0)");
    let c = client.clone();
    within("whole-device prefetch", move || c.prefetch_blocking(0, BLOCKS)).expect("prefetch all");
    for len in [0, 1, BS - 1, BS + 1, 2 * BS] {
        let c = client.clone();
        let write =
            within("client write of a wrong size", move || c.write_blocking(0, &vec![7; len]));
        assert!(
            matches!(write, Err(Error::InvalidConfig { setting: "data", .. })),
            "{len}: {write:?}"
        );
    }
    // An out-of-range block with a wrong size: either error is fine, but an error it is.
    let c = client.clone();
    assert!(within("both wrong", move || c.write_blocking(u64::MAX, &[1])).is_err());
    for shard in [2, 3, usize::MAX] {
        let c = client.clone();
        let run = within("client run_on", move || {
            futures_lite::future::block_on(c.run_on(shard, |_| async {}))
        });
        assert!(
            matches!(run, Err(Error::InvalidConfig { setting: "shard", .. })),
            "{shard}: {run:?}"
        );
    }
    // run_on_owner of any block number reaches a shard (routing never fails).
    let c = client.clone();
    let owner = within("run_on_owner(u64::MAX)", move || {
        futures_lite::future::block_on(c.run_on_owner(u64::MAX, |s| async move { s.id() }))
    });
    assert!(owner.expect("run_on_owner") < 2);
    // The engine still serves good requests after all that.
    client.write_blocking(1, &vec![9; BS]).expect("write");
    assert_eq!(client.read_blocking(1).expect("read"), vec![9; BS]);
    engine.shutdown().expect("shutdown");
}

/// Runs `job` on shard `shard` of `engine` within the deadline.
fn on_shard<T, F, Fut>(engine: &Engine, shard: usize, what: &str, job: F) -> T
where
    T: Send + 'static,
    F: FnOnce(Rc<Shard>) -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
{
    let client = engine.client();
    within(what, move || futures_lite::future::block_on(client.run_on(shard, job)))
        .expect("the shard answers")
}

#[test]
fn shard_partition_and_session_calls_with_bad_input_get_typed_errors() {
    let dir = scratch_dir();
    let path = data_file(dir.path(), BLOCKS, BS);
    let engine = engine(&path);
    for shard in 0..2 {
        let errors: Vec<String> = on_shard(&engine, shard, "shard calls", |s| async move {
            let mut wrong = Vec::new();
            let mut expect = |what: &str, ok: bool, got: String| {
                if !ok {
                    wrong.push(format!("{what}: {got}"));
                }
            };
            let oor = |r: &corebuf::Result<()>| matches!(r, Err(Error::BlockOutOfRange { .. }));
            for block in [BLOCKS, u64::MAX - 1, u64::MAX] {
                let read = s.read(block).await.map(|_| ());
                expect("shard.read", oor(&read), format!("{read:?}"));
                let write = s.write(block, &vec![0; BS]).await;
                expect("shard.write", oor(&write), format!("{write:?}"));
                let session = s.partition().session().await;
                let read = session.read(block).await.map(|_| ());
                expect("session.read", oor(&read), format!("{read:?}"));
                let new = session.new_block(block).await.map(|_| ());
                expect("session.new_block", oor(&new), format!("{new:?}"));
                expect("session.get", session.get(block).is_none(), "Some".into());
                let discard = s.partition().issue_discard(block, 2).await;
                expect("issue_discard", oor(&discard), format!("{discard:?}"));
                s.partition().forget(block);
                s.partition().forget_range(block, 10);
                s.partition().forget_range(block, u64::MAX);
            }
            for (block, count) in [(u64::MAX - 1, 10), (BLOCKS - 1, 2), (0, u64::MAX), (BLOCKS, 0)]
            {
                let prefetch = s.prefetch(block, count);
                expect("shard.prefetch", oor(&prefetch), format!("{prefetch:?}"));
                let prefetch = s.partition().prefetch(block, count).map(|_| ());
                expect("partition.prefetch", oor(&prefetch), format!("{prefetch:?}"));
            }
            expect("prefetch(0, 0)", s.partition().prefetch(0, 0).is_ok(), "error".into());
            let discard = s.partition().issue_discard(0, 0).await;
            expect("issue_discard(0, 0)", discard.is_ok(), format!("{discard:?}"));
            for len in [0, BS - 1, BS + 1] {
                let write = s.write(0, &vec![1; len]).await;
                let typed = matches!(write, Err(Error::InvalidConfig { setting: "data", .. }));
                expect("shard.write wrong size", typed, format!("{write:?}"));
            }
            let run = s.run_on(9, |_| async {}).await;
            let typed = matches!(run, Err(Error::InvalidConfig { setting: "shard", .. }));
            expect("shard.run_on(9)", typed, format!("{run:?}"));
            // Pinning past the session's bound fails at once.
            let session = s.partition().session().await;
            let mut held = Vec::new();
            for b in 0..8 {
                match session.read(b).await {
                    Ok(buf) => held.push(buf),
                    Err(e) => expect("pin within the bound", false, format!("{e:?}")),
                }
            }
            let over = session.read(8).await.map(|_| ());
            let typed = matches!(over, Err(Error::PinLimit { limit: 8, .. }));
            expect("pin past the bound", typed, format!("{over:?}"));
            let over = session.new_block(9).await.map(|_| ());
            let typed = matches!(over, Err(Error::PinLimit { limit: 8, .. }));
            expect("new_block past the bound", typed, format!("{over:?}"));
            // release_move to a block past the end.
            let buf = held.pop().expect("a held buffer");
            let moved = session.release_move(buf, u64::MAX).await;
            expect("release_move(u64::MAX)", oor(&moved), format!("{moved:?}"));
            // release_move onto a block another handle pins.
            let buf = held.pop().expect("a held buffer");
            let target = held[0].block();
            let moved = session.release_move(buf, target).await;
            let typed = matches!(moved, Err(Error::BufferBusy { .. }));
            expect("release_move onto a pinned block", typed, format!("{moved:?}"));
            // A mutable borrow while a shared one lives is BufferBusy, not a panic.
            let first = &held[0];
            let shared = first.data();
            let busy = first.try_data_mut().map(|_| ());
            expect("try_data_mut while borrowed", busy.is_err(), format!("{busy:?}"));
            drop(shared);
            drop(held);
            wrong
        });
        assert!(errors.is_empty(), "shard {shard}: {errors:#?}");
    }
    engine.shutdown().expect("shutdown");
}

#[test]
fn queue_and_partition_over_a_sim_device_reject_bad_input() {
    let failures: Vec<String> = within("sim calls", || {
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .make()
            .expect("executor")
            .run(sim_sweep())
    });
    assert!(failures.is_empty(), "{failures:#?}");
}

async fn sim_sweep() -> Vec<String> {
    let mut wrong = Vec::new();
    let mut expect = |what: &str, ok: bool, got: String| {
        if !ok {
            wrong.push(format!("{what}: {got}"));
        }
    };
    let device = || SimDevice::new(SimOptions::new(BLOCKS * BS as u64));
    let config = |bs: usize, depth: usize, writebacks: usize| QueueConfig {
        block_size_bytes: bs,
        io_depth_max: depth,
        writebacks_in_flight_max: writebacks,
    };
    let config_error = |r: &corebuf::Result<_>, setting: &str| matches!(r, Err(Error::InvalidConfig { setting: s, .. }) if *s == setting);
    // Queue configurations.
    for (bs, depth, writebacks, setting) in [
        (0, 8, 8, "block_size_bytes"),
        (3000, 8, 8, "block_size_bytes"),
        (256, 8, 8, "block_size_bytes"),
        (1 << 30, 8, 8, "device size"),
        (BS, 0, 8, "io_depth_max"),
        (BS, 8, 0, "writebacks_in_flight_max"),
    ] {
        let queue = IoQueue::new(device(), config(bs, depth, writebacks)).map(|_| ());
        expect("IoQueue::new", config_error(&queue, setting), format!("{bs}: {queue:?}"));
    }
    let ragged = SimDevice::new(SimOptions::new(BLOCKS * BS as u64 + 512));
    let queue = IoQueue::new(ragged, config(BS, 8, 8)).map(|_| ());
    expect("IoQueue::new ragged", config_error(&queue, "device size"), format!("{queue:?}"));
    // Partition configurations.
    let queue = IoQueue::new(device(), config(BS, 8, 8)).expect("queue");
    for (cache, pins, high, low, setting) in [
        (0, 8, 50, 25, "cache_size_bytes"),
        (BS as u64 - 1, 8, 50, 25, "cache_size_bytes"),
        (64 * BS as u64, 0, 50, 25, "pins_per_session_max"),
        (15 * BS as u64, 8, 50, 25, "cache_size_bytes"),
        (64 * BS as u64, 8, 20, 30, "dirty_high_percent"),
        (64 * BS as u64, 8, 101, 25, "dirty_high_percent"),
        (u64::MAX, 8, 50, 25, "cache_size_bytes"),
    ] {
        let cache_config = CacheConfig {
            cache_size_bytes: cache,
            pins_per_session_max: pins,
            dirty_high_percent: high,
            dirty_low_percent: low,
        };
        let part = Partition::<SimDevice>::new(queue.clone(), cache_config, Hooks::default());
        let part = part.map(|_| ());
        expect("Partition::new", config_error(&part, setting), format!("{cache}: {part:?}"));
    }
    let big_queue = IoQueue::new(device(), config(128 << 10, 8, 8)).expect("a 128 KiB queue");
    let config_64 = CacheConfig { cache_size_bytes: 64 << 20, ..CacheConfig::default() };
    let part = Partition::<SimDevice>::new(big_queue, config_64, Hooks::default()).map(|_| ());
    expect("Partition::new 128 KiB", config_error(&part, "block_size_bytes"), format!("{part:?}"));

    // Queue calls.
    let oor = |r: &corebuf::Result<()>| matches!(r, Err(Error::BlockOutOfRange { .. }));
    for block in [BLOCKS, u64::MAX - 1, u64::MAX] {
        let mut request = queue.request().await;
        let read = queue.read(&mut request, block).await;
        expect("queue.read", oor(&read), format!("{block}: {read:?}"));
        let write = queue.write(&request, block).await;
        expect("queue.write", oor(&write), format!("{block}: {write:?}"));
        let write_back = queue.write_back(request, block).await;
        expect("queue.write_back", oor(&write_back), format!("{block}: {write_back:?}"));
        let discard = queue.discard(block, 1).await;
        expect("queue.discard", oor(&discard), format!("{block}: {discard:?}"));
    }
    let discard = queue.discard(u64::MAX - 1, 10).await;
    expect("queue.discard overflow", oor(&discard), format!("{discard:?}"));
    let discard = queue.discard(0, u64::MAX).await;
    expect("queue.discard(0, MAX)", oor(&discard), format!("{discard:?}"));
    let discard = queue.discard(5, 0).await;
    expect("queue.discard(5, 0)", discard.is_ok(), format!("{discard:?}"));
    // After all the rejected calls, the queue still works and has nothing in flight.
    expect("queue.sync", queue.sync().await.is_ok(), "error".into());
    let stats = queue.stats();
    expect("nothing in flight", stats.in_flight == 0, format!("{stats:?}"));
    let mut request = queue.request().await;
    let read = queue.read(&mut request, BLOCKS - 1).await;
    expect("a good read", read.is_ok(), format!("{read:?}"));
    drop(request);

    // Device calls.
    let sim = device();
    let mut buf = sim.alloc_buf(BS);
    for (offset, what) in
        [(1, "unaligned"), (BLOCKS * BS as u64, "at the end"), (u64::MAX - 511, "overflow")]
    {
        let read = sim.read_at(offset, buf.as_bytes_mut()).await;
        let typed = matches!(read, Err(Error::Unaligned { .. } | Error::BlockOutOfRange { .. }));
        expect("device read_at", typed, format!("{what}: {read:?}"));
        let write = sim.write_at(offset, &buf).await;
        let typed = matches!(write, Err(Error::Unaligned { .. } | Error::BlockOutOfRange { .. }));
        expect("device write_at", typed, format!("{what}: {write:?}"));
    }
    let mut empty = sim.alloc_buf(0);
    let read = sim.read_at(0, empty.as_bytes_mut()).await;
    expect(
        "device zero-length read",
        matches!(read, Err(Error::Unaligned { .. })),
        format!("{read:?}"),
    );
    let discard = sim.discard(0, 0).await;
    expect(
        "device zero-length discard",
        matches!(discard, Err(Error::Unaligned { .. })),
        format!("{discard:?}"),
    );
    wrong
}

#[test]
fn every_client_call_after_shutdown_is_shut_down() {
    let dir = scratch_dir();
    let path = data_file(dir.path(), BLOCKS, BS);
    let engine = engine(&path);
    let client = engine.client();
    let clone = client.clone();
    engine.shutdown().expect("shutdown");
    for c in [client, clone] {
        let shut = |r: &corebuf::Result<()>| matches!(r, Err(Error::ShutDown));
        let c1 = c.clone();
        let read = within("read after shutdown", move || c1.read_blocking(1).map(|_| ()));
        assert!(shut(&read), "{read:?}");
        let c1 = c.clone();
        let write = within("write after shutdown", move || c1.write_blocking(1, &vec![0; BS]));
        assert!(shut(&write), "{write:?}");
        let c1 = c.clone();
        let prefetch = within("prefetch after shutdown", move || c1.prefetch_blocking(0, 8));
        assert!(shut(&prefetch), "{prefetch:?}");
        let c1 = c.clone();
        let flush = within("flush after shutdown", move || c1.flush_blocking());
        assert!(shut(&flush), "{flush:?}");
        let c1 = c.clone();
        let stats = within("stats after shutdown", move || c1.stats_blocking().map(|_| ()));
        assert!(shut(&stats), "{stats:?}");
        let c1 = c.clone();
        let run = within("run_on after shutdown", move || {
            futures_lite::future::block_on(c1.run_on(0, |_| async {}))
        });
        assert!(shut(&run), "{run:?}");
        let c1 = c.clone();
        let run = within("run_on_owner after shutdown", move || {
            futures_lite::future::block_on(c1.run_on_owner(5, |_| async {}))
        });
        assert!(shut(&run), "{run:?}");
        // Bad input after shutdown: still a typed error (which one is checked first is free).
        let c1 = c.clone();
        let read =
            within("bad read after shutdown", move || c1.read_blocking(u64::MAX).map(|_| ()));
        assert!(matches!(read, Err(Error::ShutDown | Error::BlockOutOfRange { .. })), "{read:?}");
    }
}

#[test]
fn a_client_of_a_dropped_engine_is_shut_down() {
    let dir = scratch_dir();
    let path = data_file(dir.path(), BLOCKS, BS);
    let client = {
        let engine = engine(&path);
        engine.client()
    };
    let read = within("read after drop", move || client.read_blocking(1).map(|_| ()));
    assert!(matches!(read, Err(Error::ShutDown)), "{read:?}");
}

#[test]
fn calls_racing_shutdown_end_in_ok_or_shut_down() {
    let dir = scratch_dir();
    let path = data_file(dir.path(), BLOCKS, BS);
    for _ in 0..5 {
        let engine = engine(&path);
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let client = engine.client();
                std::thread::spawn(move || {
                    let mut outcomes = (0u64, 0u64);
                    for i in 0..10_000u64 {
                        let block = (t * 997 + i) % BLOCKS;
                        let result = match i % 4 {
                            0 => client.read_blocking(block).map(|_| ()),
                            1 => client.write_blocking(block, &vec![t as u8; BS]),
                            2 => client.prefetch_blocking(block, 4.min(BLOCKS - block)),
                            _ => client.flush_blocking(),
                        };
                        match result {
                            Ok(()) => outcomes.0 += 1,
                            Err(Error::ShutDown) => {
                                outcomes.1 += 1;
                                return outcomes;
                            }
                            Err(e) => panic!("a call racing shutdown failed with {e:?}"),
                        }
                    }
                    outcomes
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(20));
        within("shutdown under load", move || engine.shutdown()).expect("shutdown");
        for thread in threads {
            let (ok, shut) = within("a client thread", move || thread.join().expect("no panic"));
            assert!(ok > 0 || shut > 0);
        }
    }
}
