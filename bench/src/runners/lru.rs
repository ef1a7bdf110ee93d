//! Baseline: one exact-LRU cache behind one `std::sync::Mutex`, over `O_DIRECT` reads, one
//! thread per core: the naive shared cache that thread-per-core sharding replaces.
//!
//! Reads copy a hit out under the lock; a miss reads the device without the lock, then installs
//! the block unless another thread did meanwhile. Writes go through: the new data is installed
//! (and pinned) first, then written to the device, so a concurrent miss never installs older
//! bytes than the cache holds. Three invariants:
//! 1. Every block in the cache holds the latest data written to it.
//! 2. A block being written is pinned, so it is never evicted while the device may hold a torn
//!    or older copy.
//! 3. With `--verify`, a block read from the device is judged before it is installed.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{phases, run_phase, Control, GroupResult, Recorder, StreamBank, Worker};
use crate::args::{PathMode, Settings};
use crate::block;
use crate::dataset::Dataset;
use crate::error::{BenchError, Result};
use crate::lru::Lru;
use crate::report::SideReport;
use crate::sysinfo;
use crate::verify::Versions;
use crate::workload::{Bounded, Op, OpKind, Phase, Plan};

/// Alignment of `O_DIRECT` buffers (covers 512 and 4096-byte logical blocks).
const DIRECT_ALIGN_BYTES: usize = 4096;

/// The shared cache: the LRU and the block bytes of its slots.
#[derive(Debug)]
struct Cache {
    lru: Lru,
    data: Vec<u8>,
    block_size: usize,
}

impl Cache {
    fn slot(&mut self, slot: u32) -> &mut [u8] {
        let at = slot as usize * self.block_size;
        &mut self.data[at..at + self.block_size]
    }
}

/// Runs the Mutex-LRU side.
pub fn run(
    settings: &Settings,
    dataset: &Dataset,
    plan: &Plan,
    versions: Option<Arc<Versions>>,
) -> Result<SideReport> {
    dataset.drop_page_cache();
    sysinfo::reset_peak_rss();
    let threads = settings.baseline_threads;
    let capacity = settings.cache_blocks() as usize;
    let cache = Mutex::new(Cache {
        lru: Lru::new(capacity),
        data: vec![0u8; capacity * settings.block_size],
        block_size: settings.block_size,
    });
    let layout = plan.layout(settings.path_mode == PathMode::Local, threads, 1)?;
    let mut timed = None;
    for spec in phases(settings) {
        let measure = spec.phase == Phase::Measure;
        let ctl = Control::new(settings, versions.clone(), threads, threads, measure);
        let bank = StreamBank::new(plan, &layout, &spec);
        let results = run_phase("mutex-lru", &spec, &ctl, threads, |g| {
            thread(g, dataset, &cache, bank.take(g), Arc::clone(&ctl), threads)
        })?;
        if measure {
            timed = Some((results, sysinfo::rss_bytes()));
        }
    }
    let (results, (rss_bytes, rss_peak_bytes)) = timed.expect("the timed phase always runs");
    let mut report = SideReport::from_groups("mutex-lru", &results, settings.block_size);
    report.rss_bytes = rss_bytes;
    report.rss_peak_bytes = rss_peak_bytes;
    Ok(report)
}

fn lock(cache: &Mutex<Cache>) -> MutexGuard<'_, Cache> {
    cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn thread(
    index: usize,
    dataset: &Dataset,
    cache: &Mutex<Cache>,
    mut streams: Vec<Bounded>,
    ctl: Arc<Control>,
    threads: usize,
) -> Result<GroupResult> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&dataset.path)
        .map_err(|e| {
            BenchError::io(format!("opening {} with O_DIRECT", dataset.path.display()), e)
        })?;
    let stream = streams.pop().expect("one stream per thread");
    let mut worker = Worker::new(stream, Arc::clone(&ctl), index, threads);
    let mut recorder = Recorder::new(Arc::clone(&ctl), index);
    let mut backing = vec![0u8; ctl.block_size + DIRECT_ALIGN_BYTES];
    let at = backing.as_ptr().align_offset(DIRECT_ALIGN_BYTES);
    let io_buf = &mut backing[at..at + ctl.block_size];
    let mut out = vec![0u8; ctl.block_size];
    let mut resumed = None;
    while let Some((op, start)) = worker.next_blocking(resumed) {
        if let Err(e) = one_op(&file, cache, &ctl, op, io_buf, &mut out, &mut recorder) {
            ctl.stop();
            return Err(e);
        }
        resumed = recorder.record(&op, start);
        if ctl.barrier_due(&op) {
            file.sync_data().map_err(|e| BenchError::io("mutex-lru fdatasync", e))?;
            recorder.barrier();
            resumed = None;
        }
    }
    Ok(recorder.finish())
}

fn one_op(
    file: &File,
    cache: &Mutex<Cache>,
    ctl: &Control,
    op: Op,
    io_buf: &mut [u8],
    out: &mut [u8],
    recorder: &mut Recorder,
) -> Result<()> {
    if op.kind != OpKind::Write {
        read(file, cache, ctl, op.block, io_buf, out, recorder)?;
    }
    if op.writes() {
        // The read of a read-modify-write already counted its lookup, as in corebuf's local
        // path (one lookup per operation).
        let counted = op.kind == OpKind::Write;
        write(file, cache, ctl, op.block, io_buf, recorder, counted)?;
    }
    Ok(())
}

fn read(
    file: &File,
    cache: &Mutex<Cache>,
    ctl: &Control,
    b: u64,
    io_buf: &mut [u8],
    out: &mut [u8],
    recorder: &mut Recorder,
) -> Result<()> {
    let hit = {
        let mut c = lock(cache);
        match c.lru.get(b) {
            Some(slot) => {
                out.copy_from_slice(c.slot(slot));
                true
            }
            None => false,
        }
    };
    recorder.lookup(hit);
    if hit {
        ctl.judge(b, out)?;
        return Ok(());
    }
    let offset = b * ctl.block_size as u64;
    file.read_exact_at(io_buf, offset)
        .map_err(|e| BenchError::io(format!("O_DIRECT read of block {b}"), e))?;
    ctl.judge(b, io_buf)?;
    recorder.device_ios(1);
    let mut c = lock(cache);
    match c.lru.get(b) {
        // Another thread installed it meanwhile: the cache's copy is at least as new.
        Some(slot) => out.copy_from_slice(c.slot(slot)),
        None => {
            if let Some(slot) = c.lru.insert(b) {
                c.slot(slot).copy_from_slice(io_buf);
            }
            out.copy_from_slice(io_buf);
        }
    }
    Ok(())
}

fn write(
    file: &File,
    cache: &Mutex<Cache>,
    ctl: &Control,
    b: u64,
    io_buf: &mut [u8],
    recorder: &mut Recorder,
    counted: bool,
) -> Result<()> {
    let version = ctl.begin_write(b);
    block::stamp(io_buf, b, version);
    let pinned = {
        let mut c = lock(cache);
        let found = c.lru.get(b);
        if counted {
            recorder.lookup(found.is_some());
        }
        let slot = found.or_else(|| c.lru.insert(b));
        if let Some(slot) = slot {
            c.slot(slot).copy_from_slice(io_buf);
            c.lru.pin(slot);
        }
        slot
    };
    let offset = b * ctl.block_size as u64;
    let written = file.write_all_at(io_buf, offset);
    recorder.device_ios(1);
    if let Some(slot) = pinned {
        lock(cache).lru.unpin(slot);
    }
    written.map_err(|e| BenchError::io(format!("O_DIRECT write of block {b}"), e))?;
    ctl.end_write(b, version);
    Ok(())
}
