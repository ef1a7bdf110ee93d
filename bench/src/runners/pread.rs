//! Baseline: buffered `pread` / `pwrite` through the OS page cache, one thread per core
//! (`std::os::unix::fs::FileExt`), one operation in flight per thread. By default its page
//! cache is limited to corebuf's cache size by a memory cgroup (equal memory, see
//! [`crate::memcg`]); `--pread-memory whole` gives it the whole OS page cache.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::{phases, run_phase, Control, GroupResult, Recorder, StreamBank, Worker};
use crate::args::{PathMode, PreadMemory, Settings};
use crate::block;
use crate::dataset::Dataset;
use crate::error::{BenchError, Result};
use crate::memcg::MemoryLimit;
use crate::report::SideReport;
use crate::sysinfo;
use crate::verify::Versions;
use crate::workload::{Bounded, OpKind, Phase, Plan};

/// Runs the pread side. Device IOPS come from the kernel's counters of the file's disk.
pub fn run(
    settings: &Settings,
    dataset: &Dataset,
    plan: &Plan,
    versions: Option<Arc<Versions>>,
) -> Result<SideReport> {
    // Inside the cgroup before the page cache is dropped: every page this side reads is
    // charged to it.
    let limit = match settings.pread_memory {
        PreadMemory::Equal => Some(MemoryLimit::enter(settings.cache_bytes)),
        PreadMemory::Whole => None,
    };
    dataset.drop_page_cache();
    sysinfo::reset_peak_rss();
    let threads = settings.baseline_threads;
    let layout = plan.layout(settings.path_mode == PathMode::Local, threads, 1)?;
    let mut timed = None;
    for spec in phases(settings) {
        let measure = spec.phase == Phase::Measure;
        let ctl = Control::new(settings, versions.clone(), threads, threads, measure);
        let bank = StreamBank::new(plan, &layout, &spec);
        let disk_before = sysinfo::disk_ios(&dataset.path);
        let results = run_phase("pread", &spec, &ctl, threads, |g| {
            thread(g, dataset, bank.take(g), Arc::clone(&ctl), threads)
        })?;
        if measure {
            let disk = disk_before.zip(sysinfo::disk_ios(&dataset.path)).map(|(b, a)| a - b);
            timed = Some((results, disk, sysinfo::rss_bytes()));
        }
    }
    let (results, disk, (rss_bytes, rss_peak_bytes)) = timed.expect("the timed phase always runs");
    let mut report = SideReport::from_groups("pread", &results, settings.block_size);
    match limit {
        Some(Ok(limit)) => {
            report.memory_limit_bytes = Some(limit.limit_bytes);
            report.notes.push(limit.describe());
        }
        Some(Err(why)) => report.notes.push(format!(
            "NOT memory-limited, its cache is the whole OS page cache (not --cache): {why}"
        )),
        None => report.notes.push(
            "its cache is the whole OS page cache, not limited to --cache (--pread-memory whole)"
                .into(),
        ),
    }
    if let Some(ios) = disk {
        report.device_iops = (report.elapsed_secs > 0.0).then(|| ios as f64 / report.elapsed_secs);
        report.device_iops_source =
            Some("kernel disk counters (/sys/dev/block/*/stat), whole disk".into());
    }
    report.rss_bytes = rss_bytes;
    report.rss_peak_bytes = rss_peak_bytes;
    Ok(report)
}

fn thread(
    index: usize,
    dataset: &Dataset,
    mut streams: Vec<Bounded>,
    ctl: Arc<Control>,
    threads: usize,
) -> Result<GroupResult> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dataset.path)
        .map_err(|e| BenchError::io(format!("opening {}", dataset.path.display()), e))?;
    let stream = streams.pop().expect("one stream per thread");
    let mut worker = Worker::new(stream, Arc::clone(&ctl), index, threads);
    let mut recorder = Recorder::new(Arc::clone(&ctl), index);
    let mut buf = vec![0u8; ctl.block_size];
    let mut resumed = None;
    while let Some((op, start)) = worker.next_blocking(resumed) {
        if let Err(e) = one_op(&file, &ctl, op, &mut buf) {
            ctl.stop();
            return Err(e);
        }
        resumed = recorder.record(&op, start);
        if ctl.barrier_due(&op) {
            file.sync_data().map_err(|e| BenchError::io("pread fdatasync", e))?;
            recorder.barrier();
            resumed = None;
        }
    }
    Ok(recorder.finish())
}

fn one_op(file: &File, ctl: &Control, op: crate::workload::Op, buf: &mut [u8]) -> Result<()> {
    let (b, offset) = (op.block, op.block * ctl.block_size as u64);
    if op.kind != OpKind::Write {
        file.read_exact_at(buf, offset)
            .map_err(|e| BenchError::io(format!("pread of block {b}"), e))?;
        ctl.judge(b, buf)?;
    }
    if op.writes() {
        let version = ctl.begin_write(b);
        block::stamp(buf, b, version);
        file.write_all_at(buf, offset)
            .map_err(|e| BenchError::io(format!("pwrite of block {b}"), e))?;
        ctl.end_write(b, version);
    }
    Ok(())
}
