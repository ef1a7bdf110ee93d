//! The engine's per-shard log on a real file: records committed on each shard come back for
//! replay after a crash (a copy of the files taken while the engine runs), a clean shutdown
//! leaves nothing to replay (unless no checkpoint followed the replay), a full log checkpoints
//! instead of failing, a shard count change is allowed only when nothing awaits replay, and a
//! checkpoint makes the data durable first.

use std::path::{Path, PathBuf};

use corebuf::{Engine, Error};
use corebuf_tests::{data_file, scratch_dir};

const BS: usize = 4096;
const BLOCKS: u64 = 1024;

fn engine(path: &Path, shards: usize, log_bytes: u64) -> Result<Engine, Error> {
    Engine::builder()
        .path(path)
        .shards(shards)
        .range_blocks(16)
        .cache_size_bytes(shards as u64 * 256 * BS as u64)
        .log_size_bytes(log_bytes)
        .build()
}

fn log_of(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".log");
    PathBuf::from(name)
}

/// Appends `count` records on every shard, committing each tenth and the last.
fn append_on_every_shard(engine: &Engine, count: u64) {
    let client = engine.client();
    for shard in 0..engine.shard_count() {
        futures_lite::future::block_on(client.run_on(shard, move |s| async move {
            let log = s.log().expect("the engine has a log");
            for i in 0..count {
                let end = log.append(format!("shard {shard} record {i}").as_bytes()).await?;
                if i % 10 == 9 || i + 1 == count {
                    log.commit(end).await?;
                }
            }
            Ok::<(), corebuf::LogError>(())
        }))
        .expect("run on the shard")
        .expect("append and commit");
    }
}

/// Each shard's replayed payloads, as strings.
fn replayed(engine: &Engine) -> Vec<Vec<String>> {
    let client = engine.client();
    (0..engine.shard_count())
        .map(|shard| {
            futures_lite::future::block_on(client.run_on(shard, |s| async move {
                let replay = s.log().expect("log").take_replay().expect("first take");
                replay
                    .records
                    .into_iter()
                    .map(|r| String::from_utf8(r.payload).expect("utf-8"))
                    .collect::<Vec<_>>()
            }))
            .expect("run on the shard")
        })
        .collect()
}

#[test]
fn committed_records_are_replayed_after_a_crash_and_a_clean_stop_leaves_none() {
    let dir = scratch_dir();
    let path = data_file(dir.path(), BLOCKS, BS);
    let engine = engine(&path, 2, 256 << 10).expect("build");
    append_on_every_shard(&engine, 100);
    // A crash: the files as they are while the engine runs.
    let crashed = dir.path().join("crashed");
    std::fs::copy(&path, &crashed).expect("copy data");
    std::fs::copy(log_of(&path), log_of(&crashed)).expect("copy log");
    engine.shutdown().expect("shutdown");

    let after_crash = engine_at(&crashed, 2);
    let records = replayed(&after_crash);
    for (shard, records) in records.iter().enumerate() {
        let expected: Vec<String> = (0..100).map(|i| format!("shard {shard} record {i}")).collect();
        assert_eq!(records, &expected, "shard {shard}");
    }
    after_crash.shutdown().expect("shutdown");

    let after_clean = engine_at(&path, 2);
    assert!(replayed(&after_clean).iter().all(|r| r.is_empty()));
    after_clean.shutdown().expect("shutdown");
}

/// A start that fails before its replay ends (the server's records did not apply, say) shuts
/// the engine down cleanly; the records must still be there for the next start. Only a
/// checkpoint after taking them lets a clean shutdown mark the log empty.
#[test]
fn records_no_checkpoint_covered_survive_a_clean_shutdown() {
    let dir = scratch_dir();
    let path = data_file(dir.path(), BLOCKS, BS);
    let first = engine_at(&path, 2);
    append_on_every_shard(&first, 20);
    let crashed = dir.path().join("crashed");
    std::fs::copy(&path, &crashed).expect("copy data");
    std::fs::copy(log_of(&path), log_of(&crashed)).expect("copy log");
    first.shutdown().expect("shutdown");
    let expected: Vec<Vec<String>> = (0..2)
        .map(|shard| (0..20).map(|i| format!("shard {shard} record {i}")).collect())
        .collect();

    // Shut down without taking the records, then after taking them without a checkpoint.
    engine_at(&crashed, 2).shutdown().expect("shutdown before the replay");
    let second = engine_at(&crashed, 2);
    assert_eq!(replayed(&second), expected, "after a shutdown before the replay");
    second.shutdown().expect("shutdown after taking the records");
    let third = engine_at(&crashed, 2);
    assert_eq!(replayed(&third), expected, "after a shutdown that took them");
    // Applied (nothing to apply here) and checkpointed: now a clean shutdown empties the log.
    let client = third.client();
    for shard in 0..2 {
        futures_lite::future::block_on(
            client.run_on(shard, |s| async move { s.log().expect("log").checkpoint().await }),
        )
        .expect("run on the shard")
        .expect("checkpoint");
    }
    third.shutdown().expect("shutdown after the checkpoint");
    let fourth = engine_at(&crashed, 2);
    assert!(replayed(&fourth).iter().all(|r| r.is_empty()));
    fourth.shutdown().expect("shutdown");
}

fn engine_at(path: &Path, shards: usize) -> Engine {
    engine(path, shards, 256 << 10).expect("build")
}

#[test]
fn a_full_log_checkpoints_instead_of_failing() {
    let dir = scratch_dir();
    let path = data_file(dir.path(), BLOCKS, BS);
    // 16 blocks: 14 of data, 56 KiB; 3000 records of ~120 bytes fill it six times.
    let engine = engine(&path, 1, 16 * BS as u64).expect("build");
    let client = engine.client();
    let checkpoints = futures_lite::future::block_on(client.run_on(0, |s| async move {
        let log = s.log().expect("log");
        for i in 0..3000u64 {
            let block = i % 64;
            s.write(block, &vec![i as u8; BS]).await.expect("write a block");
            let end = log.append(&[i as u8; 100]).await.expect("append never fails when full");
            if i % 50 == 0 {
                log.commit(end).await.expect("commit");
            }
        }
        log.commit_all().await.expect("commit");
        log.stats().checkpoints
    }))
    .expect("run");
    assert!(checkpoints >= 5, "only {checkpoints} checkpoints for six laps of the log");
    engine.shutdown().expect("shutdown");
}

#[test]
fn the_shard_count_may_change_only_when_nothing_awaits_replay() {
    let dir = scratch_dir();
    let path = data_file(dir.path(), BLOCKS, BS);
    let first = engine(&path, 2, 256 << 10).expect("build");
    append_on_every_shard(&first, 5);
    let crashed = dir.path().join("crashed");
    std::fs::copy(&path, &crashed).expect("copy data");
    std::fs::copy(log_of(&path), log_of(&crashed)).expect("copy log");
    first.shutdown().expect("shutdown");
    // Clean: three shards are fine.
    engine(&path, 3, 256 << 10).expect("clean log, new layout").shutdown().expect("shutdown");
    // Unclean: refused with the settings that would replay it.
    match engine(&crashed, 3, 256 << 10) {
        Err(Error::InvalidConfig { setting, reason }) => {
            assert_eq!(setting, "log_size_bytes");
            assert!(reason.contains("2 shards"), "{reason}");
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    let records = replayed(&engine_at(&crashed, 2));
    assert_eq!(records.iter().map(Vec::len).sum::<usize>(), 10);
}

#[test]
fn a_checkpoint_makes_the_blocks_durable_before_it_moves_the_start() {
    let dir = scratch_dir();
    let path = data_file(dir.path(), BLOCKS, BS);
    let engine = engine(&path, 2, 256 << 10).expect("build");
    let client = engine.client();
    futures_lite::future::block_on(client.run_on(0, |s| async move {
        for block in 0..32u64 {
            s.write(block, &vec![0xAB; BS]).await.expect("write");
        }
        let log = s.log().expect("log");
        log.append(b"covers blocks 0..32").await.expect("append");
        log.checkpoint().await.expect("checkpoint");
        assert_eq!(log.stats().checkpoints, 1);
        assert_eq!(log.stats().used_bytes, 0);
    }))
    .expect("run");
    // The barrier ran: the blocks are in the file while the engine still runs.
    let data = std::fs::read(&path).expect("read the data file");
    assert!(data[..32 * BS].iter().all(|&b| b == 0xAB));
    engine.shutdown().expect("shutdown");
}
