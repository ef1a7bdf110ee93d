//! Baseline: raw io_uring `O_DIRECT` with no cache, the device's limit. One glommio executor
//! per shard, pinned like the engine's, each running the same tasks with the same streams as
//! corebuf's shards (`DmaFile::read_at_aligned` / `write_rc_at`).

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use glommio::io::{DmaFile, OpenOptions};
use glommio::{CpuSet, LocalExecutorBuilder, Placement};

use super::{phases, run_phase, Control, GroupResult, Recorder, StreamBank, Worker};
use crate::args::{PathMode, Settings};
use crate::block;
use crate::dataset::Dataset;
use crate::error::{BenchError, Result};
use crate::report::SideReport;
use crate::sysinfo;
use crate::verify::Versions;
use crate::workload::{Bounded, OpKind, Phase, Plan};

/// Locked memory each executor registers for I/O (as the engine's shards do).
const IO_MEMORY_BYTES: usize = 4 << 20;

/// Runs the raw side (no prefill: there is no cache to fill).
pub fn run(
    settings: &Settings,
    dataset: &Dataset,
    plan: &Plan,
    versions: Option<Arc<Versions>>,
) -> Result<SideReport> {
    dataset.drop_page_cache();
    sysinfo::reset_peak_rss();
    let layout =
        plan.layout(settings.path_mode == PathMode::Local, settings.shards, settings.inflight)?;
    let workers = layout.workers();
    let cpus = allowed_cpus();
    let mut timed = None;
    for spec in phases(settings).into_iter().filter(|s| s.phase != Phase::Prefill) {
        let measure = spec.phase == Phase::Measure;
        let ctl = Control::new(settings, versions.clone(), settings.shards, workers, measure);
        let bank = StreamBank::new(plan, &layout, &spec);
        let results = run_phase("raw", &spec, &ctl, settings.shards, |g| {
            let placement = match &cpus {
                Some(cpus) => Placement::Fixed(cpus[g % cpus.len()]),
                None => Placement::Unbound,
            };
            executor(g, placement, dataset.path.clone(), bank.take(g), Arc::clone(&ctl), workers)
        })?;
        if measure {
            timed = Some((results, sysinfo::rss_bytes()));
        }
    }
    let (results, (rss_bytes, rss_peak_bytes)) = timed.expect("the timed phase always runs");
    let mut report = SideReport::from_groups("raw-io_uring", &results, settings.block_size);
    report.rss_bytes = rss_bytes;
    report.rss_peak_bytes = rss_peak_bytes;
    Ok(report)
}

fn allowed_cpus() -> Option<Vec<usize>> {
    let mut cpus: Vec<usize> = CpuSet::online().ok()?.iter().map(|l| l.cpu).collect();
    cpus.sort_unstable();
    cpus.dedup();
    (!cpus.is_empty()).then_some(cpus)
}

fn executor(
    group: usize,
    placement: Placement,
    path: PathBuf,
    streams: Vec<Bounded>,
    ctl: Arc<Control>,
    workers: usize,
) -> Result<GroupResult> {
    let handle = LocalExecutorBuilder::new(placement)
        .name(&format!("raw-{group}"))
        .io_memory(IO_MEMORY_BYTES)
        .spawn(move || async move {
            let file =
                OpenOptions::new().read(true).write(true).dma_open(&path).await.map_err(|e| {
                    BenchError::io(format!("opening {} with O_DIRECT", path.display()), e)
                })?;
            let file = Rc::new(file);
            let recorder = Rc::new(RefCell::new(Recorder::new(Arc::clone(&ctl), group)));
            let per_group = streams.len();
            let tasks: Vec<_> = streams
                .into_iter()
                .enumerate()
                .map(|(t, stream)| {
                    let worker =
                        Worker::new(stream, Arc::clone(&ctl), group * per_group + t, workers);
                    glommio::spawn_local(raw_task(
                        Rc::clone(&file),
                        worker,
                        Rc::clone(&recorder),
                        Arc::clone(&ctl),
                    ))
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
        })
        .map_err(|e| BenchError::io("starting a raw io_uring executor", e))?;
    handle.join().map_err(|e| BenchError::io("raw io_uring executor", e))?
}

async fn raw_task(
    file: Rc<DmaFile>,
    mut worker: Worker,
    recorder: Rc<RefCell<Recorder>>,
    ctl: Arc<Control>,
) -> Result<()> {
    let result = raw_loop(&file, &mut worker, &recorder, &ctl).await;
    if result.is_err() {
        ctl.stop();
    }
    result
}

async fn raw_loop(
    file: &DmaFile,
    worker: &mut Worker,
    recorder: &RefCell<Recorder>,
    ctl: &Control,
) -> Result<()> {
    let bs = ctl.block_size;
    let mut write_buf = Rc::new(file.alloc_dma_buffer(bs));
    let io = |what: &str, b: u64, e: glommio::GlommioError<()>| {
        BenchError::io(format!("raw {what} of block {b}"), e)
    };
    let mut resumed = None;
    while let Some((op, start)) = worker.next(resumed).await {
        let (b, offset) = (op.block, op.block * bs as u64);
        let mut ios = 0;
        if op.kind != OpKind::Write {
            let data = file.read_at_aligned(offset, bs).await.map_err(|e| io("read", b, e))?;
            ios += 1;
            if data.len() != bs {
                let short = format!("raw read of block {b}: short read of {} bytes", data.len());
                return Err(BenchError::Io(short));
            }
            ctl.judge(b, &data)?;
        }
        if op.writes() {
            let version = ctl.begin_write(b);
            let buf = Rc::get_mut(&mut write_buf)
                .expect("the previous write has completed and returned its buffer");
            block::stamp(buf.as_bytes_mut(), b, version);
            let written = file
                .write_rc_at(Rc::clone(&write_buf), offset)
                .await
                .map_err(|e| io("write", b, e))?;
            ios += 1;
            if written != bs {
                return Err(BenchError::Io(format!(
                    "raw write of block {b}: short write of {written} bytes"
                )));
            }
            ctl.end_write(b, version);
        }
        resumed = {
            let mut r = recorder.borrow_mut();
            r.device_ios(ios);
            r.record(&op, start)
        };
        if ctl.barrier_due(&op) {
            file.fdatasync().await.map_err(|e| io("fdatasync", b, e))?;
            recorder.borrow_mut().barrier();
            resumed = None;
        }
        if super::yield_if_needed().await {
            resumed = None;
        }
    }
    Ok(())
}
