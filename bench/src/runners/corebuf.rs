//! The corebuf side: an engine on every core, driven locally (zero copy through each shard's
//! partition), across shards (routed messages), or from plain threads through `Client`.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use corebuf::{Client, Engine, EngineStats, Shard};

use super::{phases, run_phase, Control, GroupResult, Recorder, StreamBank, Worker};
use crate::args::{PathMode, Settings};
use crate::block;
use crate::dataset::Dataset;
use crate::error::{BenchError, Result};
use crate::report::SideReport;
use crate::sysinfo;
use crate::verify::Versions;
use crate::workload::{Bounded, Op, OpKind, Phase, Plan};

/// How the local path reads a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// `Session::read` (async; a hit is served at its first poll): the side `corebuf`.
    Read,
    /// `Partition::get` (synchronous, cache only), falling back to `Session::read` on a miss:
    /// the side `corebuf-get`.
    Get,
}

impl Access {
    /// The side's name.
    pub fn side(self) -> &'static str {
        match self {
            Access::Read => "corebuf",
            Access::Get => "corebuf-get",
        }
    }
}

/// Runs the corebuf side: every phase, then the engine's figures of the timed run.
pub fn run(
    settings: &Settings,
    dataset: &Dataset,
    plan: &Plan,
    versions: Option<Arc<Versions>>,
    access: Access,
) -> Result<SideReport> {
    dataset.drop_page_cache();
    sysinfo::reset_peak_rss();
    let mut builder = Engine::builder()
        .path(&dataset.path)
        .block_size_bytes(settings.block_size)
        .cache_size_bytes(settings.cache_bytes)
        .shards(settings.shards)
        .range_blocks(settings.range_blocks)
        .spin_before_park(std::time::Duration::from_micros(settings.spin_us))
        .io_depth_max(settings.inflight.max(128));
    if let Some(us) = settings.poll_us {
        builder = builder.poll_before_sleep(std::time::Duration::from_micros(us));
    }
    let engine = builder.build()?;
    let client = engine.client();
    let layout = layout(settings, plan)?;
    let workers = layout.workers();
    let mut warm_ops = 0;
    let mut timed = None;
    for spec in phases(settings) {
        let measure = spec.phase == Phase::Measure;
        let before = if measure { Some(engine.stats()?) } else { None };
        let results = match settings.path_mode {
            PathMode::Local | PathMode::Cross | PathMode::Remote => {
                let ctl =
                    Control::new(settings, versions.clone(), settings.shards, workers, measure);
                let bank = StreamBank::new(plan, &layout, &spec);
                let mode = match settings.path_mode {
                    PathMode::Local => Mode::Local(access),
                    _ => Mode::Routed,
                };
                run_phase(access.side(), &spec, &ctl, settings.shards, |g| {
                    run_shard(&client, g, bank.take(g), Arc::clone(&ctl), mode, workers)
                })?
            }
            PathMode::Client => {
                let threads = settings.client_threads;
                let ctl = Control::new(settings, versions.clone(), threads, workers, measure);
                let bank = StreamBank::new(plan, &layout, &spec);
                run_phase("corebuf", &spec, &ctl, threads, |g| {
                    client_futures_thread(&client, g, bank.take(g), Arc::clone(&ctl), workers)
                })?
            }
            PathMode::ClientBlocking => {
                let ctl = Control::new(settings, versions.clone(), workers, workers, measure);
                let bank = StreamBank::flat(plan, &layout, &spec);
                run_phase("corebuf", &spec, &ctl, workers, |i| {
                    client_thread(&client, i, bank.take(i), Arc::clone(&ctl), workers)
                })?
            }
        };
        match before {
            Some(before) => timed = Some((before, results, engine.stats()?)),
            None if spec.phase == Phase::Warmup => {
                warm_ops += results.iter().map(|r| r.ops).sum::<u64>()
            }
            None => {}
        }
    }
    let (rss_bytes, rss_peak_bytes) = sysinfo::rss_bytes();
    engine.shutdown()?;
    let (before, results, after) = timed.expect("the timed phase always runs");
    let mut report = SideReport::from_groups(access.side(), &results, settings.block_size);
    report.warm_ops = warm_ops;
    report.rss_bytes = rss_bytes;
    report.rss_peak_bytes = rss_peak_bytes;
    add_engine_figures(&mut report, &before, &after, settings.path_mode);
    Ok(report)
}

/// The workers of the corebuf side and the blocks each draws from, for `settings.path_mode`.
pub fn layout(settings: &Settings, plan: &Plan) -> Result<crate::workload::Layout> {
    match settings.path_mode {
        PathMode::Remote => plan.layout_remote(settings.inflight),
        PathMode::Client => plan.layout(false, settings.client_threads, settings.inflight),
        mode => plan.layout(mode == PathMode::Local, settings.shards, settings.inflight),
    }
}

/// Hit ratio and device IOPS from the engine's own counters over the timed run. The hit ratio
/// is over every access: `new_block` of an uncached block (a whole-block write) is a miss
/// without a read, and a read that joined a read in flight is a hit (the block was admitted),
/// as in the LRU simulation.
fn add_engine_figures(
    report: &mut SideReport,
    before: &EngineStats,
    after: &EngineStats,
    mode: PathMode,
) {
    let secs = report.elapsed_secs;
    let figures = |b: &corebuf::ShardStats, a: &corebuf::ShardStats| {
        let hits = (a.cache.hits + a.cache.joins) - (b.cache.hits + b.cache.joins);
        let misses = (a.cache.misses + a.cache.news) - (b.cache.misses + b.cache.news);
        let io = |s: &corebuf::ShardStats| {
            s.queue.reads_completed + s.queue.writes_completed + s.queue.writebacks_completed
        };
        (hits, misses, io(a) - io(b))
    };
    let (mut hits, mut misses, mut ios) = (0, 0, 0);
    for (i, (b, a)) in before.shards.iter().zip(&after.shards).enumerate() {
        let (h, m, d) = figures(b, a);
        (hits, misses, ios) = (hits + h, misses + m, ios + d);
        if !matches!(mode, PathMode::Client | PathMode::ClientBlocking) {
            if let Some(g) = report.groups.get_mut(i) {
                g.hit_ratio = (h + m > 0).then(|| h as f64 / (h + m) as f64);
                g.device_iops = (secs > 0.0).then(|| d as f64 / secs);
            }
        }
    }
    let (b, a) = (before.cache(), after.cache());
    let sum = |s: &EngineStats, f: fn(&corebuf::ShardStats) -> u64| -> u64 {
        s.shards.iter().map(f).sum()
    };
    let delta = |f: fn(&corebuf::ShardStats) -> u64| -> u64 { sum(after, f) - sum(before, f) };
    let received = delta(|s| s.messages_received);
    report.notes.push(format!(
        "messages during the timed run: {} sent, {} received, {} served inline ({:.1} %); \
         pollers slept {} times, {} wake-ups sent to sleeping shards",
        delta(|s| s.messages_sent),
        received,
        delta(|s| s.messages_inline),
        100.0 * delta(|s| s.messages_inline) as f64 / received.max(1) as f64,
        delta(|s| s.poller_sleeps),
        delta(|s| s.wakeups_sent),
    ));
    report.poller_sleeps = Some(delta(|s| s.poller_sleeps));
    report.wakeups_sent = Some(delta(|s| s.wakeups_sent));
    let (bq, aq) = (before.queue(), after.queue());
    report.notes.push(format!(
        "engine during the timed run: {} hits, {} joins, {} misses, {} news, {} evictions, {} \
         write-backs, {} frame waits, {} session waits; queue: {} reads, {} writes, {} \
         write-backs, {} flushes, {} submit waits; {} barriers",
        a.hits - b.hits,
        a.joins - b.joins,
        a.misses - b.misses,
        a.news - b.news,
        a.evictions - b.evictions,
        a.writebacks - b.writebacks,
        a.frame_waits - b.frame_waits,
        a.session_waits - b.session_waits,
        aq.reads_completed - bq.reads_completed,
        aq.writes_completed - bq.writes_completed,
        aq.writebacks_completed - bq.writebacks_completed,
        aq.flushes_completed - bq.flushes_completed,
        aq.submit_waits - bq.submit_waits,
        after.barriers() - before.barriers(),
    ));
    let mut reads = aq.read_latency_us.clone();
    if reads.subtract(&bq.read_latency_us).is_ok() && !reads.is_empty() {
        report.notes.push(format!(
            "device reads during the timed run (the queue's call to completion): mean {:.0} us, \
             p50 {} us, p99 {} us",
            reads.mean(),
            reads.value_at_quantile(0.5),
            reads.value_at_quantile(0.99),
        ));
    }
    report.hit_ratio = (hits + misses > 0).then(|| hits as f64 / (hits + misses) as f64);
    report.device_iops = (secs > 0.0).then(|| ios as f64 / secs);
    report.device_iops_source =
        Some("engine queue stats: reads + writes + write-backs completed".into());
    if mode != PathMode::Local && report.rmws > 0 {
        report.notes.push(
            "routed read-modify-writes are a read and a write message: the engine counts two \
             lookups for each, the LRU simulation one"
                .into(),
        );
    }
    if mode == PathMode::ClientBlocking {
        report.groups.clear();
        report.notes.push(
            "client-blocking mode: one thread per operation in flight; per-thread figures \
             omitted"
                .into(),
        );
    }
    if mode == PathMode::Client {
        report.groups.clear();
        report.notes.push(
            "client mode: Client futures driven from plain threads; per-thread figures omitted"
                .into(),
        );
    }
}

/// How a shard task reaches its blocks.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// Through its own partition, zero copy.
    Local(Access),
    /// Through the block's owner (`Shard::read` / `Shard::write`).
    Routed,
}

/// Runs group `group`'s tasks on shard `group` and waits for them.
fn run_shard(
    client: &Client,
    group: usize,
    streams: Vec<Bounded>,
    ctl: Arc<Control>,
    mode: Mode,
    workers: usize,
) -> Result<GroupResult> {
    let job = move |shard: Rc<Shard>| async move {
        let recorder = Rc::new(RefCell::new(Recorder::new(Arc::clone(&ctl), group)));
        let tasks_per_group = streams.len();
        let tasks: Vec<_> = streams
            .into_iter()
            .enumerate()
            .map(|(t, stream)| {
                let worker =
                    Worker::new(stream, Arc::clone(&ctl), group * tasks_per_group + t, workers);
                let task = shard_task(
                    Rc::clone(&shard),
                    worker,
                    Rc::clone(&recorder),
                    Arc::clone(&ctl),
                    mode,
                );
                glommio::spawn_local(task)
            })
            .collect();
        let mut outcome = Ok(());
        for task in tasks {
            if let Err(e) = task.await {
                outcome = outcome.and(Err(e));
            }
        }
        let recorder = Rc::try_unwrap(recorder).expect("every task has ended").into_inner();
        outcome.map(|()| recorder.finish())
    };
    futures_lite::future::block_on(client.run_on(group, job))?
}

async fn shard_task(
    shard: Rc<Shard>,
    mut worker: Worker,
    recorder: Rc<RefCell<Recorder>>,
    ctl: Arc<Control>,
    mode: Mode,
) -> Result<()> {
    let mut copy = vec![0u8; shard.block_size()];
    let mut resumed = None;
    loop {
        let next = match worker.next_ready(resumed) {
            Some(ready) => Some(ready),
            None => worker.next(resumed).await,
        };
        let Some((op, start)) = next else { break };
        let done = match mode {
            Mode::Local(Access::Read) if op.kind == OpKind::Read => {
                local_read(&shard, &ctl, op.block).await
            }
            Mode::Local(Access::Read) => local_op(&shard, &ctl, op).await,
            Mode::Local(Access::Get) => match local_get(&shard, &ctl, op) {
                Some(done) => done,
                None => local_op(&shard, &ctl, op).await,
            },
            Mode::Routed => routed_op(&shard, &ctl, op, &mut copy).await,
        };
        if let Err(e) = done {
            ctl.stop();
            return Err(e);
        }
        resumed = recorder.borrow_mut().record(&op, start);
        if ctl.barrier_due(&op) {
            shard.flush().await?;
            recorder.borrow_mut().barrier();
            resumed = None;
        }
        if super::yield_if_needed().await {
            resumed = None;
        }
    }
    Ok(())
}

/// A read served by the synchronous `Partition::get`, or `None` when the operation needs the
/// async path (a miss, a block being read, or a write).
#[inline]
fn local_get(shard: &Shard, ctl: &Control, op: Op) -> Option<Result<()>> {
    if op.kind != OpKind::Read {
        return None;
    }
    let buf = shard.partition().get(op.block)?;
    let judged = ctl.judge(op.block, &buf.data());
    Some(judged)
}

/// A read through the shard's own partition: a session, `Session::read`, the data. Its own
/// function (rather than a branch of [`local_op`]) so that its future holds only what a read
/// needs, not `new_block`'s state machine too.
async fn local_read(shard: &Shard, ctl: &Control, block: u64) -> Result<()> {
    let session = shard.partition().session().await;
    let buf = session.read(block).await?;
    let judged = ctl.judge(block, &buf.data());
    judged
}

/// One operation through the shard's own partition: no copy, no message.
async fn local_op(shard: &Shard, ctl: &Control, op: Op) -> Result<()> {
    let session = shard.partition().session().await;
    let b = op.block;
    let buf = match op.kind {
        OpKind::Write => session.new_block(b).await?,
        OpKind::Read | OpKind::Rmw => {
            let buf = session.read(b).await?;
            ctl.judge(b, &buf.data())?;
            buf
        }
    };
    if op.writes() {
        let version = ctl.begin_write(b);
        block::stamp(&mut buf.data_mut(), b, version);
        buf.mark_dirty();
        ctl.end_write(b, version);
    }
    Ok(())
}

/// One operation through the block's owner (`Shard::read_with` / `Shard::write`: one copy
/// each way for a remote block, none for a local one).
async fn routed_op(shard: &Shard, ctl: &Control, op: Op, copy: &mut [u8]) -> Result<()> {
    let b = op.block;
    if op.kind != OpKind::Write {
        shard.read_with(b, |data| ctl.judge(b, data)).await??;
    }
    if op.writes() {
        let version = ctl.begin_write(b);
        block::stamp(copy, b, version);
        shard.write(b, copy).await?;
        ctl.end_write(b, version);
    }
    Ok(())
}

/// One plain thread driving `Client` futures, one per stream (`--inflight` of them), as an
/// async caller on another runtime would: throughput comes from the calls in flight, not from
/// threads.
fn client_futures_thread(
    client: &Client,
    group: usize,
    streams: Vec<Bounded>,
    ctl: Arc<Control>,
    workers: usize,
) -> Result<GroupResult> {
    let recorder = RefCell::new(Recorder::new(Arc::clone(&ctl), group));
    let tasks_per_group = streams.len();
    let futures: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + '_>>> =
        streams
            .into_iter()
            .enumerate()
            .map(|(t, stream)| {
                let index = group * tasks_per_group + t;
                let worker = Worker::new(stream, Arc::clone(&ctl), index, workers);
                let future = client_future(client, worker, &recorder, &ctl);
                Box::pin(future) as std::pin::Pin<Box<dyn std::future::Future<Output = _>>>
            })
            .collect();
    let mut outcome = Ok(());
    for result in super::drive::drive_all(futures) {
        if let Err(e) = result {
            outcome = outcome.and(Err(e));
        }
    }
    outcome.map(|()| recorder.into_inner().finish())
}

async fn client_future(
    client: &Client,
    mut worker: Worker,
    recorder: &RefCell<Recorder>,
    ctl: &Control,
) -> Result<()> {
    let mut copy = vec![0u8; client.block_size()];
    let mut resumed = None;
    while let Some((op, start)) = worker.next_polled(resumed).await {
        if let Err(e) = client_op(client, ctl, op, &mut copy).await {
            ctl.stop();
            return Err(e);
        }
        resumed = recorder.borrow_mut().record(&op, start);
        if ctl.barrier_due(&op) {
            client.flush().await?;
            recorder.borrow_mut().barrier();
            resumed = None;
        }
    }
    Ok(())
}

/// One plain thread issuing blocking `Client` calls, one at a time.
fn client_thread(
    client: &Client,
    index: usize,
    mut streams: Vec<Bounded>,
    ctl: Arc<Control>,
    workers: usize,
) -> Result<GroupResult> {
    let stream = streams.pop().expect("one stream per client thread");
    let mut worker = Worker::new(stream, Arc::clone(&ctl), index, workers);
    let mut recorder = Recorder::new(Arc::clone(&ctl), index);
    let mut copy = vec![0u8; client.block_size()];
    let mut resumed = None;
    while let Some((op, start)) = worker.next_blocking(resumed) {
        let done = futures_lite::future::block_on(client_op(client, &ctl, op, &mut copy));
        if let Err(e) = done {
            ctl.stop();
            return Err(e);
        }
        resumed = recorder.record(&op, start);
        if ctl.barrier_due(&op) {
            client.flush_blocking().map_err(BenchError::from)?;
            recorder.barrier();
            resumed = None;
        }
    }
    Ok(recorder.finish())
}

/// One operation through `Client` (a copy each way); the blocking thread runs it with
/// `block_on`, the async driver awaits it.
async fn client_op(client: &Client, ctl: &Control, op: Op, copy: &mut [u8]) -> Result<()> {
    let b = op.block;
    if op.kind != OpKind::Write {
        let data = client.read(b).await?;
        ctl.judge(b, &data)?;
    }
    if op.writes() {
        let version = ctl.begin_write(b);
        block::stamp(copy, b, version);
        client.write(b, copy).await?;
        ctl.end_write(b, version);
    }
    Ok(())
}
