//! Crash test on a real file: a child process writes versioned, checksummed blocks through the
//! engine and reports each completed barrier; the parent kills it with SIGKILL at random
//! moments. After each kill the file holds, for every block, a version at least as new as the
//! last reported barrier requires, and no block fails its checksum.
//!
//! The child is this same test binary, re-run with `COREBUF_CRASH_CHILD` set.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use corebuf::Engine;
use corebuf_shard::rng::SimRng;
use corebuf_tests::{check_stamped_block, round_writes, scratch_dir, stamped_block, stamped_file};

const BS: usize = 4096;
const BLOCKS: u64 = 2048;
const CHILD_ENV: &str = "COREBUF_CRASH_CHILD";

/// The child's body: runs only when the parent starts this binary with `COREBUF_CRASH_CHILD`.
#[test]
fn crash_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else { return };
    let (path, seed) = spec.split_once(',').expect("PATH,SEED");
    let seed: u64 = seed.parse().expect("a numeric seed");
    // A small cache (1/4 of the blocks) so eviction write-back runs between barriers too.
    let engine = Engine::builder()
        .path(path)
        .shards(2)
        .range_blocks(8)
        .cache_size_bytes(BLOCKS / 4 * BS as u64)
        .build()
        .expect("the child opens the engine");
    let client = engine.client();
    for round in 1..100_000u64 {
        for b in (0..BLOCKS).filter(|&b| round_writes(seed, round, b)) {
            client.write_blocking(b, &stamped_block(b, round, BS)).expect("write");
        }
        client.flush_blocking().expect("barrier");
        println!("BARRIER {round}");
    }
}

/// The smallest version block `b` may hold after barrier `round` completed.
fn version_floor(seed: u64, round: u64, b: u64) -> u64 {
    (1..=round).rev().find(|&r| round_writes(seed, r, b)).unwrap_or(0)
}

#[test]
fn sigkill_never_loses_a_barrier() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let rounds: u64 = std::env::var("CRASH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let base_seed: u64 =
        std::env::var("SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0xC0FFEE);
    let dir = scratch_dir();
    let exe = std::env::current_exe().unwrap();
    let mut rng = SimRng::new(base_seed);
    for kill in 0..rounds {
        let seed = rng.next_u64();
        let path = stamped_file(dir.path(), BLOCKS, BS);
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, format!("{},{seed}", path.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let wanted = 1 + rng.below(4);
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut last_barrier = 0;
        let started = Instant::now();
        while last_barrier < wanted {
            let line = lines.next().expect("the child reports barriers").unwrap();
            if let Some(round) = line.strip_prefix("BARRIER ") {
                last_barrier = round.parse().unwrap();
            }
            assert!(started.elapsed() < Duration::from_secs(60), "child too slow");
        }
        // Kill at a random moment of the following round(s).
        std::thread::sleep(Duration::from_micros(rng.below(30_000)));
        child.kill().unwrap();
        child.wait().unwrap();
        // Barriers the child finished and printed before the kill count too.
        for line in lines.map_while(Result::ok) {
            if let Some(round) = line.strip_prefix("BARRIER ") {
                last_barrier = round.parse().unwrap();
            }
        }
        let file = std::fs::read(&path).unwrap();
        for b in 0..BLOCKS {
            let data = &file[b as usize * BS..(b as usize + 1) * BS];
            let version = check_stamped_block(b, data)
                .unwrap_or_else(|e| panic!("kill {kill} (seed {seed}): {e}"));
            let floor = version_floor(seed, last_barrier, b);
            assert!(
                version >= floor,
                "kill {kill} (seed {seed}): block {b} has version {version}, \
                 but barrier {last_barrier} made version {floor} durable"
            );
        }
        eprintln!("kill {kill}: seed {seed}, last barrier {last_barrier}, all {BLOCKS} blocks ok");
    }
}
