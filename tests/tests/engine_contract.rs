//! The engine's contract on a real file with several shards: prefetch fills the owners'
//! partitions, barriers put data on the device (also when they race writes and each other),
//! bad input gets typed errors, a panicking shard is an error and not a hang, and calls after
//! shutdown fail cleanly.

use std::time::{Duration, Instant};

use corebuf::{Engine, Error, IoOp};
use corebuf_tests::{data_file, initial_block, scratch_dir, versioned_block};

const BS: usize = 4096;
const BLOCKS: u64 = 1024;

fn engine(path: &std::path::Path, shards: usize) -> Engine {
    Engine::builder()
        .path(path)
        .shards(shards)
        .range_blocks(16)
        .cache_size_bytes(shards as u64 * 256 * BS as u64)
        .build()
        .unwrap()
}

#[test]
fn prefetch_across_shards_fills_the_owners_partitions_only() {
    let dir = scratch_dir();
    let path = data_file(dir.path(), BLOCKS, BS);
    let engine = engine(&path, 3);
    let client = engine.client();
    let (first, count) = (100u64, 120u64);
    client.prefetch_blocking(first, count).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    for shard in 0..3 {
        loop {
            let (owned_cached, foreign_cached) =
                futures_lite::future::block_on(client.run_on(shard, move |s| async move {
                    let session = s.partition().session().await;
                    let (mut owned, mut foreign) = (0, 0);
                    for b in first..first + count {
                        if session.get(b).is_some() {
                            if s.owns(b) {
                                owned += 1;
                            } else {
                                foreign += 1;
                            }
                        }
                    }
                    (owned, foreign)
                }))
                .unwrap();
            let owned_total =
                (first..first + count).filter(|&b| client.owner_of(b) == shard).count();
            assert_eq!(foreign_cached, 0, "shard {shard} cached blocks it does not own");
            if owned_cached == owned_total {
                break;
            }
            assert!(Instant::now() < deadline, "shard {shard}: {owned_cached}/{owned_total}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let stats = engine.stats().unwrap();
    assert_eq!(stats.cache().prefetch_reads, count);
    // The prefetched data is the file's.
    assert_eq!(client.read_blocking(first + 7).unwrap(), initial_block(first + 7, BS));
    engine.shutdown().unwrap();
}

#[test]
fn barrier_puts_every_earlier_write_on_the_device_even_racing_other_barriers() {
    let dir = scratch_dir();
    let path = data_file(dir.path(), BLOCKS, BS);
    let engine = engine(&path, 4);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let client = engine.client();
            let path = path.clone();
            std::thread::spawn(move || {
                // Each thread owns blocks t, t + 4, ...; writes a version, then a barrier, then
                // checks the file itself (not the cache) holds every block it wrote.
                for version in 1..=5u32 {
                    let mine: Vec<u64> = (t..BLOCKS).step_by(4).take(64).collect();
                    for &b in &mine {
                        client.write_blocking(b, &versioned_block(b, version, BS)).unwrap();
                    }
                    client.flush_blocking().unwrap();
                    let file = std::fs::read(&path).unwrap();
                    for &b in &mine {
                        let at = b as usize * BS;
                        assert_eq!(
                            &file[at..at + BS],
                            &versioned_block(b, version, BS)[..],
                            "thread {t} block {b} version {version} not on the device after flush"
                        );
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let stats = engine.stats().unwrap();
    assert_eq!(stats.barriers(), 20);
    engine.shutdown().unwrap();
}

#[test]
fn shutdown_flushes_and_later_calls_fail_with_shut_down() {
    let dir = scratch_dir();
    let path = data_file(dir.path(), BLOCKS, BS);
    let engine = engine(&path, 2);
    let client = engine.client();
    for b in 0..50 {
        client.write_blocking(b, &versioned_block(b, 9, BS)).unwrap();
    }
    engine.shutdown().unwrap();
    let file = std::fs::read(&path).unwrap();
    for b in 0..50usize {
        assert_eq!(&file[b * BS..(b + 1) * BS], &versioned_block(b as u64, 9, BS)[..]);
    }
    assert!(matches!(client.read_blocking(1), Err(Error::ShutDown)));
    assert!(matches!(client.write_blocking(1, &vec![0; BS]), Err(Error::ShutDown)));
    assert!(matches!(client.flush_blocking(), Err(Error::ShutDown)));
}

#[test]
fn dropping_the_engine_without_shutdown_still_flushes() {
    let dir = scratch_dir();
    let path = data_file(dir.path(), BLOCKS, BS);
    {
        let engine = engine(&path, 2);
        engine.client().write_blocking(5, &versioned_block(5, 3, BS)).unwrap();
    }
    let file = std::fs::read(&path).unwrap();
    assert_eq!(&file[5 * BS..6 * BS], &versioned_block(5, 3, BS)[..]);
}

#[test]
fn a_panicking_shard_is_an_error_not_a_hang() {
    let dir = scratch_dir();
    let path = data_file(dir.path(), BLOCKS, BS);
    let engine = engine(&path, 2);
    let client = engine.client();
    let answer = futures_lite::future::block_on(client.run_on(1, |_| async {
        panic!("injected panic on shard 1");
    }));
    assert!(matches!(answer, Err(Error::ShardFailed { shard: 1 })), "{answer:?}");
    // The other shard still serves its blocks.
    let b = (0..BLOCKS).find(|&b| client.owner_of(b) == 0).unwrap();
    assert_eq!(client.read_blocking(b).unwrap(), initial_block(b, BS));
    // Blocks of the dead shard fail cleanly, and shutdown reports the failure.
    let dead = (0..BLOCKS).find(|&b| client.owner_of(b) == 1).unwrap();
    assert!(client.read_blocking(dead).is_err());
    assert!(client.flush_blocking().is_err());
    assert!(matches!(engine.shutdown(), Err(Error::ShardFailed { shard: 1 })));
}

#[test]
fn bad_input_gets_typed_errors() {
    let dir = scratch_dir();
    let path = data_file(dir.path(), BLOCKS, BS);

    let zero_shards = Engine::builder().path(&path).shards(0).build();
    assert!(matches!(zero_shards, Err(Error::InvalidConfig { setting: "shards", .. })));

    let missing = Engine::builder().path(dir.path().join("nope")).shards(1).build();
    match missing {
        Err(Error::Io { op: IoOp::Open, source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound)
        }
        other => panic!("expected an open error, got {other:?}"),
    }

    let directory = Engine::builder().path(dir.path()).shards(1).build();
    assert!(matches!(directory, Err(Error::NotAFileOrDevice { .. })), "{directory:?}");

    // 4 frames per shard cannot hold 2 sessions of 8 pins: the deadlock rule refuses it.
    let tiny = Engine::builder()
        .path(&path)
        .shards(2)
        .cache_size_bytes(8 * BS as u64)
        .pins_per_session_max(8)
        .build();
    match tiny {
        Err(e @ Error::InvalidConfig { setting: "cache_size_bytes", .. }) => {
            assert!(e.to_string().contains("deadlock rule"), "{e}")
        }
        other => panic!("expected the deadlock rule's error, got {other:?}"),
    }

    let no_path = Engine::builder().build();
    assert!(matches!(no_path, Err(Error::InvalidConfig { setting: "path", .. })));

    let engine = engine(&path, 2);
    let client = engine.client();
    assert!(matches!(
        client.read_blocking(BLOCKS),
        Err(Error::BlockOutOfRange { block: BLOCKS, device_blocks: BLOCKS })
    ));
    assert!(matches!(
        client.write_blocking(BLOCKS + 5, &vec![0; BS]),
        Err(Error::BlockOutOfRange { .. })
    ));
    assert!(matches!(client.prefetch_blocking(BLOCKS - 2, 5), Err(Error::BlockOutOfRange { .. })));
    assert!(matches!(
        client.write_blocking(0, &[1, 2, 3]),
        Err(Error::InvalidConfig { setting: "data", .. })
    ));
    let no_such_shard = futures_lite::future::block_on(client.run_on(7, |_| async {}));
    assert!(matches!(no_such_shard, Err(Error::InvalidConfig { setting: "shard", .. })));
    engine.shutdown().unwrap();
}
