//! The sides of a comparison (corebuf and each baseline) and what they share: the run
//! control, the per-group recorder, pacing for the open loop, and the phase runner that starts
//! the groups, prints progress, and stops them at the deadline.

pub mod corebuf;
mod drive;
pub mod fio;
pub mod lru;
pub mod pread;
pub mod raw;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::args::{secs, Length, Settings};
use crate::error::{BenchError, Result};
use crate::verify::Versions;
use crate::workload::{Bounded, Layout, Op, OpKind, Phase, Plan};

/// Latency histograms are in nanoseconds, 1 ns to 60 s, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("constant bounds are valid")
}

/// Shared by every worker of one phase of one side.
#[derive(Debug)]
pub struct Control {
    stop: AtomicBool,
    writes: AtomicU64,
    flush_every: Option<u64>,
    progress: Box<[AtomicU64]>,
    /// Per worker seconds between intended starts (open loop), or `None` (closed loop).
    interval: Option<Duration>,
    /// One operation in this many is timed (1 in the open loop and outside the timed phase).
    sample_every: u64,
    /// The version table, with `--verify`.
    pub versions: Option<Arc<Versions>>,
    /// The block size.
    pub block_size: usize,
}

impl Control {
    /// A control for `groups` groups of `workers` workers in all.
    pub fn new(
        settings: &Settings,
        versions: Option<Arc<Versions>>,
        groups: usize,
        workers: usize,
        timed: bool,
    ) -> Arc<Control> {
        let interval = match (timed, settings.rate) {
            (true, Some(rate)) => Some(Duration::from_secs_f64(workers as f64 / rate)),
            _ => None,
        };
        Arc::new(Control {
            stop: AtomicBool::new(false),
            writes: AtomicU64::new(0),
            flush_every: settings.flush_every.filter(|_| timed),
            progress: (0..groups).map(|_| AtomicU64::new(0)).collect(),
            interval,
            sample_every: if timed && interval.is_none() {
                settings.sample_every.max(1)
            } else {
                1
            },
            versions,
            block_size: settings.block_size,
        })
    }

    /// Asks every worker to stop after its current operation.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Whether workers should stop.
    #[inline]
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Counts a completed operation against the barrier interval; true when this operation is
    /// the one that owes a flush barrier.
    #[inline]
    pub fn barrier_due(&self, op: &Op) -> bool {
        match self.flush_every {
            Some(every) if op.writes() => {
                (self.writes.fetch_add(1, Ordering::Relaxed) + 1).is_multiple_of(every)
            }
            _ => false,
        }
    }

    /// The version a write of `block` stamps (1 without `--verify`).
    #[inline]
    pub fn begin_write(&self, block: u64) -> u64 {
        self.versions.as_ref().map_or(1, |v| v.next_version(block))
    }

    /// Records a completed write.
    #[inline]
    pub fn end_write(&self, block: u64, version: u64) {
        if let Some(v) = &self.versions {
            v.written(block, version);
        }
    }

    /// Checks a read's bytes with `--verify`; without, only touches the header so the read is
    /// not optimised away.
    #[inline]
    pub fn judge(&self, block: u64, data: &[u8]) -> Result<()> {
        match &self.versions {
            Some(versions) => versions.judge(block, data).map_err(BenchError::Verify),
            None => {
                std::hint::black_box(crate::block::recorded_block(data));
                Ok(())
            }
        }
    }
}

/// What one group (a shard, an executor, a thread) did in one phase.
#[derive(Clone, Debug)]
pub struct GroupResult {
    /// Operations completed.
    pub ops: u64,
    /// Reads among them.
    pub reads: u64,
    /// Whole-block writes among them.
    pub writes: u64,
    /// Read-modify-writes among them.
    pub rmws: u64,
    /// Barriers this group issued.
    pub barriers: u64,
    /// Latency of each operation, ns (from its intended start in the open loop).
    pub latency_ns: Histogram<u64>,
    /// Open loop: how late each operation started after its intended start, ns (the load
    /// generator's own jitter, included in `latency_ns`).
    pub lateness_ns: Option<Histogram<u64>>,
    /// When the first operation started.
    pub started: Option<Instant>,
    /// When the last operation ended.
    pub ended: Option<Instant>,
    /// Device I/Os the group issued itself (raw, LRU), if it counts them.
    pub device_ios: Option<u64>,
    /// Cache hits and misses (LRU baseline).
    pub hits: u64,
    /// Cache misses (LRU baseline).
    pub misses: u64,
    /// CPU time the group's thread used in the phase (user + system), seconds: on a machine
    /// shared with other work, ops per CPU-second is the figure the others do not distort.
    pub cpu_secs: f64,
}

/// Records one group's operations; tasks of a glommio group share it through `Rc<RefCell<_>>`.
#[derive(Debug)]
pub struct Recorder {
    result: GroupResult,
    ctl: Arc<Control>,
    group: usize,
    /// The thread's CPU time when the recorder was made (on the group's thread).
    cpu_start: f64,
}

/// How long a worker waits before it tries again to claim a block another worker holds.
const CLAIM_RETRY: Duration = Duration::from_micros(20);

/// Operations between two progress publications.
const PROGRESS_EVERY_OPS: u64 = 256;

impl Recorder {
    /// A recorder for `group`.
    pub fn new(ctl: Arc<Control>, group: usize) -> Recorder {
        let result = GroupResult {
            ops: 0,
            reads: 0,
            writes: 0,
            rmws: 0,
            barriers: 0,
            latency_ns: new_histogram(),
            lateness_ns: ctl.interval.map(|_| new_histogram()),
            started: None,
            ended: None,
            device_ios: None,
            hits: 0,
            misses: 0,
            cpu_secs: 0.0,
        };
        Recorder { result, ctl, group, cpu_start: thread_cpu_secs() }
    }

    /// Records a completed operation that started (or was meant to start) at `start`; returns
    /// when it ended if it was timed (see [`Start`]).
    #[inline]
    pub fn record(&mut self, op: &Op, start: Start) -> Option<Instant> {
        let Start { at, late } = start;
        let Some(start) = at else {
            self.count(op);
            return None;
        };
        let now = Instant::now();
        let r = &mut self.result;
        if let (Some(h), Some(late)) = (&mut r.lateness_ns, late) {
            h.saturating_record(late.as_nanos() as u64);
        }
        r.started = Some(r.started.map_or(start, |s| s.min(start)));
        r.ended = Some(now);
        r.latency_ns.saturating_record(now.saturating_duration_since(start).as_nanos() as u64);
        self.count(op);
        Some(now)
    }

    #[inline]
    fn count(&mut self, op: &Op) {
        let r = &mut self.result;
        r.ops += 1;
        match op.kind {
            OpKind::Read => r.reads += 1,
            OpKind::Write => r.writes += 1,
            OpKind::Rmw => r.rmws += 1,
        }
        if r.ops.is_multiple_of(PROGRESS_EVERY_OPS) {
            self.ctl.progress[self.group].store(r.ops, Ordering::Relaxed);
        }
    }

    /// Counts a barrier.
    pub fn barrier(&mut self) {
        self.result.barriers += 1;
    }

    /// Counts device I/Os the group issued.
    pub fn device_ios(&mut self, n: u64) {
        *self.result.device_ios.get_or_insert(0) += n;
    }

    /// Counts a cache lookup.
    pub fn lookup(&mut self, hit: bool) {
        if hit {
            self.result.hits += 1;
        } else {
            self.result.misses += 1;
        }
    }

    /// The group's result.
    pub fn finish(mut self) -> GroupResult {
        self.ctl.progress[self.group].store(self.result.ops, Ordering::Relaxed);
        if self.ctl.sample_every > 1 && self.result.ops > 0 {
            // The last operations may not have been timed: the group's window ends now.
            self.result.ended = Some(Instant::now());
        }
        self.result.cpu_secs = thread_cpu_secs() - self.cpu_start;
        self.result
    }
}

/// CPU time of the calling thread, seconds (`CLOCK_THREAD_CPUTIME_ID`: user and system).
pub fn thread_cpu_secs() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through the pointer, a live local.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// When an operation started: now (closed loop), or its intended start and how late the
/// generator actually issued it (open loop); `at` is `None` for an operation that is not timed
/// (`--sample-every`), which is counted without reading the clock.
#[derive(Clone, Copy, Debug)]
pub struct Start {
    /// The time latency is measured from, for a timed operation.
    pub at: Option<Instant>,
    /// Open loop: actual issue time minus intended start.
    pub late: Option<Duration>,
}

/// One worker: its stream and, in the open loop, its schedule of intended starts.
#[derive(Debug)]
pub struct Worker {
    stream: Bounded,
    /// The block claimed for the operation in progress (trace replay), released at the next.
    claimed: Option<u64>,
    next_start: Option<Instant>,
    interval: Option<Duration>,
    /// Operations to take before the next timed one (each worker times its first, then one
    /// in `sample_every`): a countdown, not a division per operation.
    untimed_left: u64,
    ctl: Arc<Control>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(block) = self.claimed.take() {
            self.stream.release(block);
        }
    }
}

impl Worker {
    /// Worker number `index` of `count` over `stream`.
    pub fn new(stream: Bounded, ctl: Arc<Control>, index: usize, count: usize) -> Worker {
        // Open loop: workers' schedules are staggered so their starts do not come in bursts.
        let next_start =
            ctl.interval.map(|i| Instant::now() + i.mul_f64(index as f64 / count as f64));
        Worker { stream, claimed: None, next_start, interval: ctl.interval, untimed_left: 0, ctl }
    }

    fn take(&mut self) -> Option<(Op, Option<Instant>)> {
        if let Some(block) = self.claimed.take() {
            self.stream.release(block);
        }
        if self.ctl.stopped() {
            return None;
        }
        let op = self.stream.next_op()?;
        let intended = self.next_start;
        if let (Some(next), Some(interval)) = (&mut self.next_start, self.interval) {
            *next += interval;
        }
        Some((op, intended))
    }

    /// The next operation and its start: now (closed loop), or its intended start after
    /// waiting for it on the glommio timer (open loop). The operation's block is claimed.
    ///
    /// `resumed` is when the worker's previous operation ended, if the task has not been
    /// suspended since: the closed loop then starts the next operation's clock there, which
    /// saves a clock read per operation on the hit path (and charges the generator's few
    /// nanoseconds to the operation, never the other way round).
    pub async fn next(&mut self, resumed: Option<Instant>) -> Option<(Op, Start)> {
        let (op, intended) = self.take()?;
        let mut resumed = resumed;
        while !self.stream.claim(op.block) {
            resumed = None;
            // A timer, not yield_now: glommio polls for I/O completions only when no task is
            // runnable, so a spinning task would stall the holder's I/O.
            glommio::timer::sleep(CLAIM_RETRY).await;
        }
        self.claimed = Some(op.block);
        let Some(intended) = intended else {
            return Some((op, self.closed_loop_start(resumed)));
        };
        let now = Instant::now();
        if intended > now {
            glommio::timer::sleep(intended - now).await;
        }
        Some((op, Start { at: Some(intended), late: Some(intended.elapsed()) }))
    }

    /// A closed-loop start: timed (from `resumed` or now) for one operation in
    /// `sample_every`, counted only for the others.
    #[inline]
    fn closed_loop_start(&mut self, resumed: Option<Instant>) -> Start {
        if self.untimed_left > 0 {
            self.untimed_left -= 1;
            return Start { at: None, late: None };
        }
        self.untimed_left = self.ctl.sample_every - 1;
        Start { at: Some(resumed.unwrap_or_else(Instant::now)), late: None }
    }

    /// [`Worker::next`] when it cannot wait: the closed loop without claims, where the next
    /// operation is always ready. `None` means "call `next`" (which may wait, or say the stream
    /// ended); it takes no operation then. The hit path's loop calls this first, so a hit costs
    /// no trip through `next`'s future.
    #[inline]
    pub fn next_ready(&mut self, resumed: Option<Instant>) -> Option<(Op, Start)> {
        if self.interval.is_some() || self.stream.has_claims() {
            return None;
        }
        let (op, _) = self.take()?;
        Some((op, self.closed_loop_start(resumed)))
    }

    /// [`Worker::next`] for futures driven outside glommio (closed loop only: the async client
    /// driver has no timers); waiting for a claimed block yields to the other futures.
    pub async fn next_polled(&mut self, resumed: Option<Instant>) -> Option<(Op, Start)> {
        let (op, _intended) = self.take()?;
        let mut resumed = resumed;
        while !self.stream.claim(op.block) {
            resumed = None;
            // As `next_blocking`: give the core to the thread that holds the claim (a shard
            // serving it) before trying again; the other futures run meanwhile.
            std::thread::yield_now();
            futures_lite::future::yield_now().await;
        }
        self.claimed = Some(op.block);
        Some((op, self.closed_loop_start(resumed)))
    }

    /// [`Worker::next`] for plain threads.
    pub fn next_blocking(&mut self, resumed: Option<Instant>) -> Option<(Op, Start)> {
        let (op, intended) = self.take()?;
        let mut resumed = resumed;
        while !self.stream.claim(op.block) {
            resumed = None;
            std::thread::yield_now();
        }
        self.claimed = Some(op.block);
        let Some(intended) = intended else {
            return Some((op, self.closed_loop_start(resumed)));
        };
        let now = Instant::now();
        if intended > now {
            std::thread::sleep(intended - now);
        }
        Some((op, Start { at: Some(intended), late: Some(intended.elapsed()) }))
    }
}

/// Yields to the executor's other tasks when glommio asks for it (its preemption timer or
/// pending I/O); returns whether the task was suspended.
pub async fn yield_if_needed() -> bool {
    if glommio::executor().need_preempt() {
        glommio::executor().yield_now().await;
        true
    } else {
        false
    }
}

/// The parts of a side's run.
#[derive(Debug)]
pub struct PhaseSpec {
    /// Which part.
    pub phase: Phase,
    /// Stop after this long (the phase also ends when every stream ends).
    pub length: Option<Duration>,
    /// Total operations, split over the workers.
    pub ops: Option<u64>,
}

/// The phases every side runs: prefill (when asked), warm-up (when asked), then the timed run.
pub fn phases(settings: &Settings) -> Vec<PhaseSpec> {
    let mut out = Vec::new();
    if settings.prefill {
        out.push(PhaseSpec { phase: Phase::Prefill, length: None, ops: None });
    }
    if settings.warmup_secs > 0.0 {
        out.push(PhaseSpec {
            phase: Phase::Warmup,
            length: Some(secs(settings.warmup_secs)),
            ops: None,
        });
    }
    let (length, ops) = match settings.length {
        Length::Seconds(s) => (Some(secs(s)), None),
        Length::Ops(n) => (None, Some(n)),
        Length::Trace => (None, None),
    };
    out.push(PhaseSpec { phase: Phase::Measure, length, ops });
    out
}

/// The streams of a phase, handed out one group at a time to the threads that run them.
#[derive(Debug)]
pub struct StreamBank(Mutex<Vec<Option<Vec<Bounded>>>>);

impl StreamBank {
    /// The streams of `spec`'s phase for `layout`.
    pub fn new(plan: &Plan, layout: &Layout, spec: &PhaseSpec) -> StreamBank {
        let streams = plan.streams(layout, spec.phase, spec.ops);
        StreamBank(Mutex::new(streams.into_iter().map(Some).collect()))
    }

    /// Every stream of `spec`'s phase as a group of its own, for sides that run one worker per
    /// thread (`[group][task]` becomes group `group × tasks + task`).
    pub fn flat(plan: &Plan, layout: &Layout, spec: &PhaseSpec) -> StreamBank {
        let streams = plan.streams(layout, spec.phase, spec.ops);
        StreamBank(Mutex::new(streams.into_iter().flatten().map(|s| Some(vec![s])).collect()))
    }

    /// Group `group`'s streams (once).
    pub fn take(&self, group: usize) -> Vec<Bounded> {
        self.0.lock().expect("no panic while holding the bank")[group]
            .take()
            .expect("each group takes once")
    }
}

/// Runs `groups` groups, each by `launch(group)` on its own thread, until they finish or
/// `length` passes; prints a progress line every second on long phases. Returns every group's
/// result, or the first error (after stopping the others).
pub fn run_phase<F>(
    label: &str,
    spec: &PhaseSpec,
    ctl: &Arc<Control>,
    groups: usize,
    launch: F,
) -> Result<Vec<GroupResult>>
where
    F: Fn(usize) -> Result<GroupResult> + Sync,
{
    let long = spec.length.is_none_or(|l| l >= Duration::from_secs(3));
    let started = Instant::now();
    let deadline = spec.length.map(|l| started + l);
    std::thread::scope(|scope| {
        let launch = &launch;
        let handles: Vec<_> = (0..groups)
            .map(|g| {
                let ctl = Arc::clone(ctl);
                scope.spawn(move || {
                    let result = launch(g);
                    if result.is_err() {
                        ctl.stop();
                    }
                    result
                })
            })
            .collect();
        let mut last_print = (started, 0u64);
        while !handles.iter().all(|h| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(10));
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                ctl.stop();
            }
            if long && spec.phase == Phase::Measure && now - last_print.0 >= Duration::from_secs(1)
            {
                let ops: u64 = ctl.progress.iter().map(|p| p.load(Ordering::Relaxed)).sum();
                let rate = (ops - last_print.1) as f64 / (now - last_print.0).as_secs_f64();
                eprintln!(
                    "  {label}: {:>4.0} s  {:>12} ops/s  {:>12} ops",
                    (now - started).as_secs_f64(),
                    crate::report::si(rate),
                    crate::report::si(ops as f64)
                );
                last_print = (now, ops);
            }
        }
        let mut results = Vec::with_capacity(groups);
        let mut first_error = None;
        for handle in handles {
            match handle.join() {
                Ok(Ok(r)) => results.push(r),
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => {
                    first_error.get_or_insert(BenchError::Io(format!(
                        "{label}: a worker thread panicked"
                    )));
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(results),
        }
    })
}
