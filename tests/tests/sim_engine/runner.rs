//! The runner: seeds on threads, one executor per thread; a failure names its seed and the
//! command that replays it, a hang the phase it was in.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{simulate, Totals};

/// A seed that runs longer than this in wall time fails (a hang the yield watchdog missed).
const SEED_TIMEOUT: Duration = Duration::from_secs(120);

/// What each running seed's controller is doing (for the report of a hang).
static PHASES: Mutex<BTreeMap<u64, String>> = Mutex::new(BTreeMap::new());

/// Notes what seed `seed`'s controller is doing now.
pub fn set_phase(seed: u64, phase: String) {
    PHASES.lock().unwrap().insert(seed, phase);
}

fn new_executor() -> glommio::LocalExecutor {
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .make()
        .expect("a glommio executor (needs RLIMIT_MEMLOCK)")
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Runs seeds one after another on one executor. glommio 0.9 leaks an eventfd for every
/// executor it makes (even one that runs an empty future), and this machine's hard limit is
/// 20 000 descriptors: an executor per seed ran out after 19 988 seeds. Reuse cannot carry
/// state from one seed to the next: every task of a seed ends with it (the generation checks
/// that nothing holds its engine or its shards any more). A seed that panics takes its
/// executor with it.
#[derive(Default)]
pub struct SeedRunner {
    executor: Option<glommio::LocalExecutor>,
}

impl SeedRunner {
    pub fn run(&mut self, seed: u64) -> std::result::Result<(Totals, u64), String> {
        let executor = self.executor.get_or_insert_with(new_executor);
        let run = std::panic::AssertUnwindSafe(|| executor.run(simulate(seed)));
        std::panic::catch_unwind(run).map_err(|panic| {
            self.executor = None;
            panic_message(panic)
        })
    }
}

/// Runs one seed on a fresh thread and executor, as a replay does.
pub fn run_seed(seed: u64) -> std::result::Result<(Totals, u64), String> {
    let handle = std::thread::Builder::new()
        .name(format!("sim-seed-{seed}"))
        .spawn(move || new_executor().run(simulate(seed)))
        .expect("spawn a simulation thread");
    handle.join().map_err(panic_message)
}

pub fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v}: not a number")))
}

pub fn replay_hint(seed: u64) -> String {
    format!("replay: SEED={seed} cargo test -p corebuf-tests --test sim_engine")
}

/// Runs `seeds` on every core; returns the sum of their totals and the threads used. Panics
/// on the first failure, or with `SIM_KEEP_GOING` after all of them with how many failed.
pub fn run_many(seeds: &[u64]) -> (Totals, usize) {
    let seeds = seeds.to_vec();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(seeds.len());
    let next = Arc::new(AtomicUsize::new(0));
    let running: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let (done_tx, done_rx) = mpsc::channel();
    for _ in 0..threads {
        let (seeds, next, running, done) =
            (seeds.clone(), Arc::clone(&next), Arc::clone(&running), done_tx.clone());
        std::thread::spawn(move || {
            let mut runner = SeedRunner::default();
            loop {
                let Some(&seed) = seeds.get(next.fetch_add(1, Ordering::SeqCst)) else { return };
                running.lock().unwrap().push((seed, Instant::now()));
                let result = runner.run(seed);
                running.lock().unwrap().retain(|&(s, _)| s != seed);
                PHASES.lock().unwrap().remove(&seed);
                if done.send((seed, result)).is_err() {
                    return;
                }
            }
        });
    }
    drop(done_tx);
    let mut totals = Totals::default();
    let keep_going = std::env::var("SIM_KEEP_GOING").is_ok();
    let mut failed: Vec<(u64, String)> = Vec::new();
    for _ in 0..seeds.len() {
        let (seed, result) = loop {
            match done_rx.recv_timeout(Duration::from_secs(1)) {
                Ok(answer) => break answer,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let running = running.lock().unwrap();
                    if let Some(&(seed, since)) =
                        running.iter().find(|(_, since)| since.elapsed() > SEED_TIMEOUT)
                    {
                        let phase = PHASES.lock().unwrap().get(&seed).cloned();
                        panic!(
                            "seed {seed} still running after {:?}: a hang (last phase: {}).\n{}",
                            since.elapsed(),
                            phase.as_deref().unwrap_or("not started"),
                            replay_hint(seed)
                        );
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!("a runner thread died"),
            }
        };
        match result {
            Ok((seed_totals, _digest)) => totals.add(&seed_totals),
            Err(message) if keep_going => {
                eprintln!("seed {seed} failed: {}", message.lines().next().unwrap_or(""));
                failed.push((seed, message));
            }
            Err(message) => panic!("seed {seed} failed: {message}\n{}", replay_hint(seed)),
        }
    }
    if let Some((seed, message)) = failed.iter().min_by_key(|(seed, _)| *seed) {
        panic!(
            "{} of {} seeds failed; the first, seed {seed}: {message}\n{}",
            failed.len(),
            seeds.len(),
            replay_hint(*seed)
        );
    }
    (totals, threads)
}
