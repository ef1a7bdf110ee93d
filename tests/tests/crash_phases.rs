//! Crash loops on a real file, aimed at the engine's riskiest moments: a child process writes
//! versioned, checksummed blocks through the engine and announces what it is doing; the parent
//! kills it with SIGKILL at a chosen point and then checks the file.
//!
//! - **barrier**: killed right after the child printed `BARRIER_START n` (its writes of round
//!   `n` returned, the barrier is running);
//! - **write-back**: the cache holds 1/32 of the working set, so eviction writes back all the
//!   time; killed in the middle of a round, after the child reported write-backs;
//! - **shutdown**: killed at varying delays after the child printed `SHUTDOWN_START` and called
//!   `Engine::shutdown()` with a whole round of dirty data; if `SHUTDOWN_DONE` was printed,
//!   every block must hold its last written version;
//! - **back-pressure**: eight client threads, each with its own blocks and its own barriers,
//!   on a 32-frame cache with 2 pins per session, an inbox of 4 and 4 requests in flight;
//!   killed at a random moment.
//!
//! After every kill, every block passes its checksum (never torn or misplaced), holds a version
//! that was actually written to it (never unknown), and is at least as new as the last barrier
//! that completed before the kill (per thread for the back-pressure phase) required.
//!
//! `CRASH_PHASE_ROUNDS=<n>` sets the kills per phase (default 4); `SEED=<n>` changes the seeds.
//! The child is this same test binary, re-run with `COREBUF_PHASE_CHILD` set.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use corebuf::Engine;
use corebuf_shard::rng::SimRng;
use corebuf_tests::{check_stamped_block, round_writes, scratch_dir, stamped_block, stamped_file};

const BS: usize = 4096;
const CHILD_ENV: &str = "COREBUF_PHASE_CHILD";
/// A child that outlives this stops on its own (the parent died or forgot it).
const CHILD_LIFETIME_MAX: Duration = Duration::from_secs(60);
/// The longest the parent waits for the child's next line.
const LINE_TIMEOUT: Duration = Duration::from_secs(60);

const BARRIER_BLOCKS: u64 = 1024;
const WRITEBACK_BLOCKS: u64 = 2048;
const SHUTDOWN_BLOCKS: u64 = 2048;
const PRESSURE_BLOCKS: u64 = 1024;
const PRESSURE_THREADS: u64 = 8;

fn rounds() -> u64 {
    std::env::var("CRASH_PHASE_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(4)
}

fn base_seed() -> u64 {
    std::env::var("SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0xFACADE)
}

/// The smallest version block `b` may hold once barrier `round` completed.
fn version_floor(seed: u64, round: u64, b: u64) -> u64 {
    (1..=round).rev().find(|&r| round_writes(seed, r, b)).unwrap_or(0)
}

/// Whether round `version` wrote block `b` (version 0 is the initial file).
fn written(seed: u64, version: u64, b: u64) -> bool {
    version == 0 || round_writes(seed, version, b)
}

// ---------------------------------------------------------------------------------------------
// The children.

/// The child's body: runs only when a parent starts this binary with `COREBUF_PHASE_CHILD`.
#[test]
fn phase_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else { return };
    let mut fields = spec.splitn(3, ',');
    let phase = fields.next().expect("PHASE,SEED,PATH").to_string();
    let seed: u64 = fields.next().expect("a seed").parse().expect("a numeric seed");
    let path = PathBuf::from(fields.next().expect("a path"));
    // If the parent never kills us, stop anyway.
    std::thread::spawn(|| {
        std::thread::sleep(CHILD_LIFETIME_MAX);
        eprintln!("crash_phases child: lifetime exceeded, exiting");
        std::process::exit(3);
    });
    match phase.as_str() {
        "barrier" => child_barrier(&path, seed),
        "writeback" => child_writeback(&path, seed),
        "shutdown" => child_shutdown(&path, seed),
        "pressure" => child_pressure(&path, seed),
        other => panic!("unknown phase {other}"),
    }
}

fn child_barrier(path: &Path, seed: u64) {
    // The cache holds everything: each barrier writes a whole round (about 340 blocks).
    let engine = Engine::builder()
        .path(path)
        .shards(2)
        .range_blocks(8)
        .pin_threads(false)
        .cache_size_bytes(2 * BARRIER_BLOCKS * BS as u64)
        .build()
        .expect("the child opens the engine");
    let client = engine.client();
    for round in 1.. {
        for b in (0..BARRIER_BLOCKS).filter(|&b| round_writes(seed, round, b)) {
            client.write_blocking(b, &stamped_block(b, round, BS)).expect("write");
        }
        println!("BARRIER_START {round}");
        client.flush_blocking().expect("barrier");
        println!("BARRIER {round}");
    }
}

fn child_writeback(path: &Path, seed: u64) {
    // 64 frames for 2048 blocks: nearly every write evicts a dirty buffer, which is written back.
    let engine = Engine::builder()
        .path(path)
        .shards(2)
        .range_blocks(8)
        .pin_threads(false)
        .cache_size_bytes(64 * BS as u64)
        .build()
        .expect("the child opens the engine");
    let client = engine.client();
    for round in 1.. {
        let mut count = 0u64;
        for b in (0..WRITEBACK_BLOCKS).filter(|&b| round_writes(seed, round, b)) {
            client.write_blocking(b, &stamped_block(b, round, BS)).expect("write");
            count += 1;
            if count.is_multiple_of(64) {
                let writebacks = client.stats_blocking().expect("stats").cache().writebacks;
                println!("PROGRESS {round} {writebacks}");
            }
        }
        client.flush_blocking().expect("barrier");
        println!("BARRIER {round}");
    }
}

/// Rounds with a barrier before the shutdown round, for `seed`.
fn shutdown_barrier_rounds(seed: u64) -> u64 {
    1 + seed % 3
}

fn child_shutdown(path: &Path, seed: u64) {
    let engine = Engine::builder()
        .path(path)
        .shards(2)
        .range_blocks(8)
        .pin_threads(false)
        .cache_size_bytes(2 * SHUTDOWN_BLOCKS * BS as u64)
        .build()
        .expect("the child opens the engine");
    let client = engine.client();
    let barriers = shutdown_barrier_rounds(seed);
    for round in 1..=barriers {
        for b in (0..SHUTDOWN_BLOCKS).filter(|&b| round_writes(seed, round, b)) {
            client.write_blocking(b, &stamped_block(b, round, BS)).expect("write");
        }
        client.flush_blocking().expect("barrier");
        println!("BARRIER {round}");
    }
    // The last round writes every block and leaves it dirty for the shutdown to write back.
    let last = barriers + 1;
    for b in 0..SHUTDOWN_BLOCKS {
        client.write_blocking(b, &stamped_block(b, last, BS)).expect("write");
    }
    println!("SHUTDOWN_START");
    match engine.shutdown() {
        Ok(()) => println!("SHUTDOWN_DONE"),
        Err(e) => println!("SHUTDOWN_FAILED {e}"),
    }
}

fn child_pressure(path: &Path, seed: u64) {
    let engine = Engine::builder()
        .path(path)
        .shards(2)
        .range_blocks(4)
        .pin_threads(false)
        .cache_size_bytes(32 * BS as u64)
        .pins_per_session_max(2)
        .inbox_capacity(4)
        .io_depth_max(4)
        .writebacks_in_flight_max(2)
        .build()
        .expect("the child opens the engine");
    let monitor = engine.client();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(5));
        let Ok(stats) = monitor.stats_blocking() else { return };
        let (cache, queue) = (stats.cache(), stats.queue());
        println!("STATS {} {} {}", cache.frame_waits, cache.session_waits, queue.submit_waits);
    });
    let threads: Vec<_> = (0..PRESSURE_THREADS)
        .map(|t| {
            let client = engine.client();
            std::thread::spawn(move || {
                for round in 1.. {
                    let mine = (t..PRESSURE_BLOCKS).step_by(PRESSURE_THREADS as usize);
                    for b in mine.filter(|&b| round_writes(seed, round, b)) {
                        client.write_blocking(b, &stamped_block(b, round, BS)).expect("write");
                    }
                    client.flush_blocking().expect("barrier");
                    println!("BARRIER {t} {round}");
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("a writer thread");
    }
}

// ---------------------------------------------------------------------------------------------
// The parent's side.

/// A child process whose stdout lines arrive on a channel, killed when dropped.
struct Child {
    process: std::process::Child,
    lines: mpsc::Receiver<String>,
    /// Every line received so far, in order.
    seen: Vec<String>,
    started: Instant,
}

impl Child {
    fn spawn(phase: &str, seed: u64, path: &Path) -> Child {
        let exe = std::env::current_exe().expect("the test binary's path");
        let mut process = Command::new(exe)
            .args(["--exact", "phase_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, format!("{phase},{seed},{}", path.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the child");
        let stdout = process.stdout.take().expect("a piped stdout");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // The test harness prints "test phase_child ... " without a newline just before
                // the child's first line.
                let line = line.trim_start_matches("test phase_child ... ").to_string();
                if sender.send(line).is_err() {
                    return;
                }
            }
        });
        Child { process, lines, seen: Vec::new(), started: Instant::now() }
    }

    /// The next line; panics if the child ends or stays silent too long.
    fn next_line(&mut self) -> String {
        match self.lines.recv_timeout(LINE_TIMEOUT) {
            Ok(line) => {
                self.seen.push(line.clone());
                line
            }
            Err(e) => panic!(
                "the child stopped talking after {:?} ({e}); last lines: {:?}",
                self.started.elapsed(),
                &self.seen[self.seen.len().saturating_sub(5)..]
            ),
        }
    }

    /// Reads lines until one satisfies `wanted`, and returns it.
    fn wait_for(&mut self, wanted: impl Fn(&str) -> bool) -> String {
        loop {
            let line = self.next_line();
            if wanted(&line) {
                return line;
            }
        }
    }

    /// SIGKILL, reap, and collect every line the child wrote before it died.
    fn kill(&mut self) {
        let _ = self.process.kill();
        self.process.wait().expect("reap the child");
        // The reader thread sends what was in the pipe, then hits end of file.
        while let Ok(line) = self.lines.recv_timeout(LINE_TIMEOUT) {
            self.seen.push(line);
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// Checks every block of the file: checksum, then `valid(block, version)`.
fn check_file(path: &Path, blocks: u64, valid: impl Fn(u64, u64) -> Result<(), String>) {
    let file = std::fs::read(path).expect("read the data file");
    assert_eq!(file.len() as u64, blocks * BS as u64, "the file changed size");
    for b in 0..blocks {
        let data = &file[b as usize * BS..(b as usize + 1) * BS];
        let version = check_stamped_block(b, data).unwrap_or_else(|e| panic!("{e}"));
        if let Err(e) = valid(b, version) {
            panic!("block {b} holds version {version}: {e}");
        }
    }
}

/// The last `BARRIER n` in `lines` (0 if none).
fn last_barrier(lines: &[String]) -> u64 {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("BARRIER ").and_then(|n| n.parse().ok()))
        .max()
        .unwrap_or(0)
}

/// The usual version check after a kill: written by some round up to `newest`, and at least as
/// new as barrier `durable` requires.
fn versions_between(
    seed: u64,
    durable: u64,
    newest: u64,
) -> impl Fn(u64, u64) -> Result<(), String> {
    move |b, version| {
        if !written(seed, version, b) || version > newest {
            return Err(format!("no round up to {newest} wrote that version (unknown data)"));
        }
        let floor = version_floor(seed, durable, b);
        if version < floor {
            return Err(format!("barrier {durable} completed, which made version {floor} durable"));
        }
        Ok(())
    }
}

#[test]
fn kill_during_a_barrier() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = scratch_dir();
    let mut rng = SimRng::new(base_seed());
    let mut mid_barrier = 0;
    for kill in 0..rounds() {
        let seed = rng.next_u64();
        let path = stamped_file(dir.path(), BARRIER_BLOCKS, BS);
        let mut child = Child::spawn("barrier", seed, &path);
        let target = 1 + rng.below(4);
        child.wait_for(|l| l == format!("BARRIER_START {target}"));
        child.kill();
        let done = last_barrier(&child.seen);
        if done < target {
            mid_barrier += 1;
        }
        check_file(&path, BARRIER_BLOCKS, versions_between(seed, done, target));
        eprintln!("barrier kill {kill}: seed {seed}, killed in barrier {target}, last done {done}");
    }
    // The point of this phase: most kills must land inside the barrier.
    assert!(mid_barrier > 0, "no kill landed inside a barrier");
    eprintln!("barrier phase: {mid_barrier}/{} kills inside a barrier", rounds());
}

#[test]
fn kill_during_heavy_write_back() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = scratch_dir();
    let mut rng = SimRng::new(base_seed() ^ 1);
    for kill in 0..rounds() {
        let seed = rng.next_u64();
        let path = stamped_file(dir.path(), WRITEBACK_BLOCKS, BS);
        let mut child = Child::spawn("writeback", seed, &path);
        let round = 1 + rng.below(2);
        child.wait_for(|l| l == format!("BARRIER {round}"));
        // Kill after a few progress reports of the next round: eviction write-back is running.
        let reports = 1 + rng.below(8);
        let mut writebacks = 0;
        for _ in 0..reports {
            let line = child.wait_for(|l| l.starts_with("PROGRESS "));
            writebacks = line.rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0);
        }
        child.kill();
        assert!(writebacks > 0, "the child reported no write-back before the kill");
        let done = last_barrier(&child.seen);
        check_file(&path, WRITEBACK_BLOCKS, versions_between(seed, done, done + 1));
        eprintln!(
            "write-back kill {kill}: seed {seed}, last barrier {done}, {writebacks} write-backs \
             reported before the kill"
        );
    }
}

#[test]
fn kill_during_shutdown() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = scratch_dir();
    let mut rng = SimRng::new(base_seed() ^ 2);
    // The first round lets the shutdown finish and times it; later ones kill at fractions and
    // multiples of that time, from "at once" to "probably after it finished".
    let mut shutdown_time = None;
    let (mut interrupted, mut completed) = (0, 0);
    for kill in 0..rounds() + 1 {
        let seed = rng.next_u64();
        let path = stamped_file(dir.path(), SHUTDOWN_BLOCKS, BS);
        let mut child = Child::spawn("shutdown", seed, &path);
        child.wait_for(|l| l == "SHUTDOWN_START");
        let started = Instant::now();
        match shutdown_time {
            None => {
                child.wait_for(|l| l.starts_with("SHUTDOWN_"));
                shutdown_time = Some(started.elapsed());
            }
            Some(time) => {
                let fraction = [0.0, 0.05, 0.15, 0.3, 1.5][kill as usize % 5];
                std::thread::sleep(time.mul_f64(fraction));
            }
        }
        child.kill();
        let last = shutdown_barrier_rounds(seed) + 1;
        let done = child.seen.iter().any(|l| l == "SHUTDOWN_DONE");
        if let Some(failed) = child.seen.iter().find(|l| l.starts_with("SHUTDOWN_FAILED")) {
            panic!("seed {seed}: {failed}");
        }
        if done {
            completed += 1;
            // A completed shutdown wrote and flushed everything.
            check_file(&path, SHUTDOWN_BLOCKS, |_, version| {
                (version == last).then_some(()).ok_or_else(|| {
                    format!("SHUTDOWN_DONE was printed, so it must hold the last version {last}")
                })
            });
        } else {
            interrupted += 1;
            let durable = last_barrier(&child.seen);
            assert_eq!(durable, last - 1, "every barrier precedes SHUTDOWN_START");
            check_file(&path, SHUTDOWN_BLOCKS, |b, version| {
                if version == last {
                    return Ok(());
                }
                versions_between(seed, durable, durable)(b, version)
            });
        }
        eprintln!("shutdown kill {kill}: seed {seed}, shutdown completed: {done}");
    }
    eprintln!(
        "shutdown phase: {interrupted} kills during shutdown, {completed} after it completed \
         (shutdown took {shutdown_time:?})"
    );
    assert!(interrupted > 0, "no kill landed inside the shutdown");
}

#[test]
fn kill_under_back_pressure() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = scratch_dir();
    let mut rng = SimRng::new(base_seed() ^ 3);
    let mut waits_seen = false;
    for kill in 0..rounds() {
        let seed = rng.next_u64();
        let path = stamped_file(dir.path(), PRESSURE_BLOCKS, BS);
        let mut child = Child::spawn("pressure", seed, &path);
        let barriers_wanted = 8 + rng.below(24);
        let mut barriers = 0;
        while barriers < barriers_wanted {
            if child.next_line().starts_with("BARRIER ") {
                barriers += 1;
            }
        }
        std::thread::sleep(Duration::from_micros(rng.below(20_000)));
        child.kill();
        // Per writer thread: the last barrier it completed.
        let mut done = [0u64; PRESSURE_THREADS as usize];
        for line in &child.seen {
            if let Some(rest) = line.strip_prefix("BARRIER ") {
                let (t, round) = rest.split_once(' ').expect("BARRIER THREAD ROUND");
                let (t, round): (usize, u64) = (t.parse().unwrap(), round.parse().unwrap());
                done[t] = done[t].max(round);
            }
            if let Some(rest) = line.strip_prefix("STATS ") {
                let waits: Vec<u64> = rest.split(' ').filter_map(|n| n.parse().ok()).collect();
                waits_seen |= waits.iter().any(|&n| n > 0);
            }
        }
        check_file(&path, PRESSURE_BLOCKS, |b, version| {
            let t = (b % PRESSURE_THREADS) as usize;
            versions_between(seed, done[t], done[t] + 1)(b, version)
        });
        eprintln!("back-pressure kill {kill}: seed {seed}, barriers per thread {done:?}");
    }
    assert!(waits_seen, "no frame, session or submit wait was ever reported: no back-pressure");
}
