//! The per-shard log over the simulated device: replay, group commit, torn tails, corruption,
//! wrap-around past checkpoints, a full log, crashes at every step of a commit, device faults,
//! and a seeded model test mixing them all. Every crash image is reopened and checked against
//! what was appended and what was acknowledged.

mod common;

use std::cell::RefCell;
use std::rc::Rc;

use common::{run, within, yield_times};
use corebuf_shard::io::{IoQueue, QueueConfig, SimDevice, SimOptions};
use corebuf_shard::log::format::record_bytes;
use corebuf_shard::log::{Log, LogConfig, LogError, LogRecord, Replay};
use corebuf_shard::rng::SimRng;

const BS: u64 = 4096;
/// The region starts at block 1, so that offsets inside it are never confused with the file's.
const REGION_FIRST: u64 = 1;

fn config(region_blocks: u64) -> LogConfig {
    LogConfig {
        region_first_block: REGION_FIRST,
        region_blocks,
        staging_blocks: 8,
        record_bytes_max: 8192,
    }
}

fn device(blocks: u64, latency: u32, seed: u64) -> SimDevice {
    let mut options = SimOptions::new(blocks * BS);
    options.latency_yields_max = latency;
    options.seed = seed;
    SimDevice::new(options)
}

fn reopen_device(image: Vec<u8>) -> SimDevice {
    let len = image.len() as u64;
    SimDevice::from_image(image, SimOptions::new(len))
}

fn queue(device: SimDevice) -> Rc<IoQueue<SimDevice>> {
    let config =
        QueueConfig { block_size_bytes: BS as usize, io_depth_max: 8, writebacks_in_flight_max: 4 };
    IoQueue::new(device, config).expect("valid queue")
}

async fn open(device: SimDevice, region_blocks: u64) -> Result<(Log<SimDevice>, Replay), LogError> {
    Log::open(queue(device), config(region_blocks)).await
}

/// A payload whose content and length (1..=700 bytes) follow from `i`.
fn payload(i: u64) -> Vec<u8> {
    let len = 1 + (i.wrapping_mul(2_654_435_761) % 700) as usize;
    (0..len).map(|j| (i as usize * 31 + j) as u8).collect()
}

/// What the test knows about the log: every record appended since the last checkpoint, in
/// order, and how far commits were acknowledged.
#[derive(Debug, Default)]
struct Model {
    records: Vec<(u64, Vec<u8>)>,
    acked_end: u64,
}

impl Model {
    fn checkpoint(&mut self, start: u64) {
        self.records.retain(|(lsn, _)| *lsn >= start);
    }

    /// The recovered records are a prefix of the model's, and hold every acknowledged one.
    fn check(&self, recovered: &[LogRecord], what: &str) {
        assert!(
            recovered.len() <= self.records.len(),
            "{what}: {} records recovered, only {} appended",
            recovered.len(),
            self.records.len()
        );
        for (got, (lsn, payload)) in recovered.iter().zip(&self.records) {
            assert_eq!(got.lsn, *lsn, "{what}: record order");
            assert_eq!(&got.payload, payload, "{what}: payload of the record at {lsn}");
        }
        let acked = self
            .records
            .iter()
            .filter(|(lsn, p)| lsn + record_bytes(p.len()) <= self.acked_end)
            .count();
        assert!(
            recovered.len() >= acked,
            "{what}: {} records recovered but {acked} were acknowledged",
            recovered.len()
        );
    }

    /// After a reopen the log is what was recovered.
    fn recovered(&mut self, recovered: &[LogRecord], end: u64) {
        self.records = recovered.iter().map(|r| (r.lsn, r.payload.clone())).collect();
        self.acked_end = end;
    }
}

async fn append(log: &Log<SimDevice>, model: &mut Model, i: u64) -> u64 {
    let p = payload(i);
    let lsn = log.head();
    let end = log.append(&p).await.expect("append");
    model.records.push((lsn, p));
    end
}

#[test]
fn appended_records_replay_in_order_after_reopen() {
    run(async {
        let dev = device(64, 2, 1);
        let (log, replay) = open(dev.clone(), 40).await.expect("open a blank region");
        assert!(replay.records.is_empty() && replay.was_clean);
        let mut model = Model::default();
        for i in 0..300 {
            let end = append(&log, &mut model, i).await;
            if i % 37 == 0 {
                log.commit(end).await.expect("commit");
                model.acked_end = end;
            }
        }
        log.close(false).await.expect("close");
        drop(log);
        let (_log, replay) = open(reopen_device(dev.durable_image()), 40).await.expect("reopen");
        assert_eq!(replay.records.len(), 300, "close commits everything");
        model.check(&replay.records, "reopen after close");
        assert!(!replay.tail_cut);
    });
}

#[test]
fn one_flush_covers_every_record_appended_before_the_commit() {
    run(async {
        let dev = device(64, 0, 2);
        let (log, _) = open(dev.clone(), 40).await.expect("open");
        let flushes = dev.counters().flushes;
        let mut end = 0;
        for i in 0..200u64 {
            end = log.append(&i.to_le_bytes()).await.expect("append");
        }
        log.commit(end).await.expect("commit");
        assert_eq!(dev.counters().flushes - flushes, 1, "one flush for 200 records");
        assert_eq!(log.stats().commits, 1);
        assert_eq!(log.durable(), end);
        // Committing what is already durable costs nothing.
        log.commit(end).await.expect("commit again");
        assert_eq!(dev.counters().flushes - flushes, 1);
    });
}

#[test]
fn appends_continue_while_a_commit_is_in_flight_and_many_waiters_share_a_flush() {
    run(async {
        let dev = device(64, 6, 3);
        let (log, _) = open(dev.clone(), 40).await.expect("open");
        let log = Rc::new(log);
        let flushes = dev.counters().flushes;
        let first = log.append(b"first").await.expect("append");
        let committer = {
            let log = Rc::clone(&log);
            glommio::spawn_local(async move { log.commit(first).await })
        };
        // While the commit is in flight, more appends and more committers.
        let mut later = Vec::new();
        let mut during = 0;
        for i in 0..50u64 {
            yield_times(1).await;
            let end = log.append(&i.to_le_bytes()).await.expect("append during a commit");
            if log.durable() < first {
                during += 1;
            }
            let log = Rc::clone(&log);
            later.push(glommio::spawn_local(async move { log.commit(end).await }));
        }
        assert!(during > 0, "no append happened while the first commit was in flight");
        committer.await.expect("first commit");
        for c in later {
            c.await.expect("later commit");
        }
        let used = dev.counters().flushes - flushes;
        assert!(used < 51, "51 commits need fewer flushes than commits, used {used}");
        assert_eq!(log.durable(), log.head());
    });
}

#[test]
fn a_torn_tail_is_cut_and_every_acknowledged_record_survives() {
    for seed in 0..40 {
        run(async move {
            let dev = device(64, 3, seed);
            let (log, _) = open(dev.clone(), 40).await.expect("open");
            let log = Rc::new(log);
            let mut model = Model::default();
            let mut end = 0;
            for i in 0..40 {
                end = append(&log, &mut model, i).await;
            }
            log.commit(end).await.expect("commit");
            model.acked_end = end;
            for i in 40..80 {
                end = append(&log, &mut model, i).await;
            }
            let commit = {
                let log = Rc::clone(&log);
                glommio::spawn_local(async move { log.commit(end).await })
            };
            yield_times(1 + seed as usize % 7).await;
            let image = dev.crash(seed * 7 + 1);
            drop(commit);
            let (_log, replay) = open(reopen_device(image), 40).await.expect("reopen a torn log");
            model.check(&replay.records, &format!("seed {seed}"));
        });
    }
}

#[test]
fn a_corrupt_record_before_the_tail_is_a_typed_error() {
    run(async {
        let dev = device(64, 0, 4);
        let (log, _) = open(dev.clone(), 40).await.expect("open");
        let a = log.append(b"acknowledged first").await.expect("append");
        log.commit(a).await.expect("commit");
        let b = log.append(b"acknowledged second").await.expect("append");
        log.commit(b).await.expect("commit");
        let mut image = dev.durable_image();
        // The first record's payload: region data starts after the two header blocks.
        let data_offset = ((REGION_FIRST + 2) * BS) as usize;
        image[data_offset + 33] ^= 0x40;
        match open(reopen_device(image), 40).await {
            Err(LogError::Corrupt { lsn, offset, reason }) => {
                assert_eq!(lsn, 0);
                assert_eq!(offset, data_offset as u64);
                assert!(reason.contains("checksum"), "{reason}");
            }
            other => panic!("expected a Corrupt error, got {other:?}"),
        }
        // Damage in the last commit is indistinguishable from a torn write: it is cut.
        let mut image = dev.durable_image();
        image[data_offset + 56 + 33] ^= 0x40;
        let (_log, replay) = open(reopen_device(image), 40).await.expect("tail cut");
        assert_eq!(replay.records.len(), 1);
        assert!(replay.tail_cut);
    });
}

#[test]
fn a_damaged_header_copy_falls_back_to_the_other_and_two_damaged_copies_are_refused() {
    run(async {
        let dev = device(64, 0, 5);
        let (log, _) = open(dev.clone(), 40).await.expect("open");
        let a = log.append(b"x").await.expect("append");
        log.commit(a).await.expect("commit");
        let mut image = dev.durable_image();
        // The open wrote sequence 1 (copy 1); damage it: copy 0 is blank, so the region
        // counts as damaged, not blank.
        image[((REGION_FIRST + 1) * BS) as usize + 17] ^= 1;
        assert!(matches!(open(reopen_device(image), 40).await, Err(LogError::BadHeader { .. })));
        // A region of another size is refused.
        let image = dev.durable_image();
        assert!(matches!(
            open(reopen_device(image), 30).await,
            Err(LogError::LayoutMismatch { .. })
        ));
    });
}

#[test]
fn replay_of_a_log_that_wraps_past_a_checkpoint() {
    run(async {
        // 6 data blocks (24 KiB): 400 records of ~350 bytes wrap it about six times.
        let dev = device(16, 2, 6);
        let (log, _) = open(dev.clone(), 8).await.expect("open");
        let mut model = Model::default();
        let mut checkpoints = 0;
        for i in 0..400 {
            if !log.has_room_for(payload(i).len()) {
                // A checkpoint: the caller made the earlier records' effects durable.
                let start = log.head();
                log.advance_start(start).await.expect("advance start");
                model.checkpoint(start);
                checkpoints += 1;
            }
            let end = append(&log, &mut model, i).await;
            log.commit(end).await.expect("commit");
            model.acked_end = end;
        }
        assert!(checkpoints >= 5, "the log wrapped only {checkpoints} times");
        assert!(log.head() > 5 * log.capacity_bytes());
        let (_log, replay) = open(reopen_device(dev.durable_image()), 8).await.expect("reopen");
        assert_eq!(replay.start_lsn, log.start());
        assert!(!replay.records.is_empty());
        model.check(&replay.records, "wrapped log");
        assert_eq!(replay.records.len(), model.records.len());
    });
}

#[test]
fn a_full_log_refuses_appends_until_a_checkpoint_moves_its_start() {
    run(async {
        let dev = device(16, 0, 7);
        let (log, _) = open(dev.clone(), 8).await.expect("open");
        let mut model = Model::default();
        let mut i = 0;
        let full = loop {
            let p = payload(i);
            let lsn = log.head();
            match log.append(&p).await {
                Ok(_) => model.records.push((lsn, p)),
                Err(e) => break e,
            }
            i += 1;
        };
        assert!(matches!(full, LogError::Full { .. }), "{full:?}");
        assert!(log.used_bytes() > log.capacity_bytes() - 2 * BS);
        log.commit(log.head()).await.expect("commit a full log");
        model.acked_end = log.head();
        let start = log.head();
        log.advance_start(start).await.expect("checkpoint");
        model.checkpoint(start);
        let end = append(&log, &mut model, i).await;
        log.commit(end).await.expect("commit after the checkpoint");
        model.acked_end = end;
        let (_log, replay) = open(reopen_device(dev.durable_image()), 8).await.expect("reopen");
        model.check(&replay.records, "after a full log");
        assert_eq!(replay.records.len(), 1);
    });
}

#[test]
fn crash_at_every_step_of_a_commit_keeps_what_was_acknowledged() {
    for seed in 0..12u64 {
        run(async move {
            let dev = device(64, 4, seed);
            let (log, _) = open(dev.clone(), 40).await.expect("open");
            let log = Rc::new(log);
            let mut model = Model::default();
            let mut end = 0;
            for i in 0..30 {
                end = append(&log, &mut model, i).await;
            }
            log.commit(end).await.expect("commit");
            model.acked_end = end;
            // A commit spanning several blocks.
            for i in 30..60 {
                end = append(&log, &mut model, i).await;
            }
            let done = Rc::new(RefCell::new(None));
            {
                let (log, done) = (Rc::clone(&log), Rc::clone(&done));
                glommio::spawn_local(async move {
                    *done.borrow_mut() = Some(log.commit(end).await);
                })
                .detach();
            }
            // Crash images at every executor step of the commit, checked afterwards (checking
            // needs awaits, which would let the commit run on).
            let start = dev.counters();
            let mut phases = std::collections::BTreeSet::new();
            let mut images = Vec::new();
            for step in 0..400u64 {
                let c = dev.counters();
                let finished = done.borrow().is_some();
                phases.insert((c.writes > start.writes, c.flushes > start.flushes, finished));
                images.push((step, finished, dev.crash(seed * 1000 + step)));
                if finished {
                    break;
                }
                yield_times(1).await;
            }
            for (step, finished, image) in images {
                let mut now = Model { records: model.records.clone(), acked_end: model.acked_end };
                if finished {
                    now.acked_end = end;
                }
                let what = format!("seed {seed} step {step}");
                let (log2, replay) = open(reopen_device(image.clone()), 40).await.expect(&what);
                now.check(&replay.records, &what);
                drop(log2);
                // Appends after the recovery never resurrect leftovers of the torn commit.
                let dev2 = reopen_device(image);
                let (log2, replay) = open(dev2.clone(), 40).await.expect(&what);
                now.recovered(&replay.records, replay.end_lsn);
                for i in 1000..1005 {
                    let e = append(&log2, &mut now, i).await;
                    log2.commit(e).await.expect("commit after recovery");
                    now.acked_end = e;
                }
                drop(log2);
                let (_l, replay) =
                    open(reopen_device(dev2.durable_image()), 40).await.expect(&what);
                now.check(&replay.records, &format!("{what}, after more appends"));
                assert_eq!(replay.records.len(), now.records.len(), "{what}: leftovers replayed");
            }
            let finished = done.borrow_mut().take();
            finished.expect("the commit finished").expect("the commit succeeded");
            // Seen: nothing written yet, writes done but no flush, flushed.
            assert!(phases.contains(&(false, false, false)), "seed {seed}: {phases:?}");
            assert!(phases.iter().any(|p| p.0 && !p.1), "seed {seed}: {phases:?}");
            assert!(phases.contains(&(true, true, true)), "seed {seed}: {phases:?}");
        });
    }
}

#[test]
fn write_and_flush_faults_fail_the_log_and_lose_nothing_acknowledged() {
    for seed in 0..20u64 {
        run(async move {
            let dev = device(64, 2, seed);
            let (log, _) = open(dev.clone(), 40).await.expect("open");
            dev.set_faults(0.0, 0.02, 0.05);
            let mut model = Model::default();
            let mut failed = false;
            for i in 0..300 {
                let p = payload(i);
                let lsn = log.head();
                match log.append(&p).await {
                    Ok(end) => {
                        model.records.push((lsn, p));
                        match log.commit(end).await {
                            Ok(()) => model.acked_end = end,
                            Err(LogError::Failed(_)) => {
                                failed = true;
                                break;
                            }
                            Err(e) => panic!("seed {seed}: unexpected error {e}"),
                        }
                    }
                    Err(LogError::Failed(_)) => {
                        failed = true;
                        break;
                    }
                    Err(e) => panic!("seed {seed}: unexpected error {e}"),
                }
            }
            if failed {
                assert!(log.failure().is_some());
                assert!(matches!(log.append(b"late").await, Err(LogError::Failed(_))));
                assert!(matches!(log.commit(log.head()).await, Err(LogError::Failed(_)) | Ok(())));
            }
            let image = dev.crash(seed);
            let (_log, replay) = open(reopen_device(image), 40).await.expect("reopen");
            model.check(&replay.records, &format!("seed {seed}"));
        });
    }
}

#[test]
fn model_of_appends_commits_checkpoints_and_crashes() {
    for seed in 0..60u64 {
        run(within(60, "a model run", async move {
            let mut rng = SimRng::new(seed);
            let mut dev = device(32, 3, seed);
            let region = 12 + rng.below(12);
            let (mut log, _) = open(dev.clone(), region).await.expect("open");
            let mut model = Model::default();
            let mut i = 0;
            for step in 0..300 {
                let what = format!("seed {seed} step {step}");
                match rng.below(20) {
                    0..=11 => {
                        let p = payload(i);
                        i += 1;
                        if !log.has_room_for(p.len()) {
                            let start = log.head();
                            log.advance_start(start).await.expect(&what);
                            model.checkpoint(start);
                        }
                        let lsn = log.head();
                        log.append(&p).await.expect(&what);
                        model.records.push((lsn, p));
                    }
                    12..=16 => {
                        let end = log.head();
                        log.commit(end).await.expect(&what);
                        model.acked_end = end;
                    }
                    17 => {
                        // Only records whose effects the caller made durable may go: here,
                        // pretend a barrier covered the first half. A start is always a
                        // record boundary.
                        let half = model.records.len() / 2;
                        let start = model.records.get(half).map_or(log.head(), |r| r.0);
                        log.advance_start(start).await.expect(&what);
                        model.checkpoint(start);
                    }
                    _ => {
                        let image = dev.crash(rng.next_u64());
                        drop(log);
                        dev = reopen_device(image);
                        let (l, replay) = open(dev.clone(), region).await.expect(&what);
                        model.check(&replay.records, &what);
                        model.recovered(&replay.records, replay.end_lsn);
                        log = l;
                    }
                }
            }
        }));
    }
}

#[test]
fn a_clean_close_leaves_nothing_to_replay() {
    run(async {
        let dev = device(64, 0, 8);
        let (log, _) = open(dev.clone(), 40).await.expect("open");
        for i in 0..10 {
            log.append(&payload(i)).await.expect("append");
        }
        let log = Rc::new(log);
        let closing = {
            let log = Rc::clone(&log);
            glommio::spawn_local(async move { log.close(true).await })
        };
        // While the close commits, appends are refused: nothing may follow the end that the
        // clean header will declare.
        assert!(matches!(log.append(b"during close").await, Err(LogError::Closed)));
        closing.await.expect("clean close");
        assert!(matches!(log.append(b"late").await, Err(LogError::Closed)));
        drop(log);
        let dev = reopen_device(dev.durable_image());
        let (log, replay) = open(dev.clone(), 40).await.expect("reopen");
        assert!(replay.was_clean && replay.records.is_empty());
        let e = log.append(b"after").await.expect("append");
        log.commit(e).await.expect("commit");
        drop(log);
        let (_log, replay) = open(reopen_device(dev.durable_image()), 40).await.expect("reopen");
        assert_eq!(replay.records.len(), 1);
        assert_eq!(replay.records[0].payload, b"after");
    });
}

#[test]
fn try_append_appends_exactly_when_append_would_not_wait() {
    run(async {
        // A slow device: without an await the writer cannot drain the staging ring.
        let dev = device(64, 50, 11);
        let (log, _) = open(dev.clone(), 40).await.expect("open");
        let mut model = Model::default();
        let too_large = vec![7u8; 8193];
        assert!(!log.can_append_now(too_large.len()));
        assert!(matches!(log.try_append(&too_large), Err(LogError::RecordTooLarge { .. })));
        // Without awaiting, appends go into the staging ring until it is full.
        let mut i = 0;
        let refused = loop {
            let p = payload(i);
            let predicted = log.can_append_now(p.len());
            let lsn = log.head();
            match log.try_append(&p).expect("no error") {
                Some(end) => {
                    assert!(predicted, "record {i}: appended although it said it could not");
                    assert_eq!(end, lsn + record_bytes(p.len()), "the position append returns");
                    model.records.push((lsn, p));
                }
                None => {
                    assert!(!predicted, "record {i}: refused although it said it could");
                    assert_eq!(log.head(), lsn, "a refused record leaves the head alone");
                    break p;
                }
            }
            i += 1;
        };
        assert!(i > 8, "the 32 KiB staging ring took {i} records before it was full");
        // `append` waits for the writer instead; then `try_append` works again.
        let lsn = log.head();
        log.append(&refused).await.expect("append waits for room");
        model.records.push((lsn, refused));
        i += 1;
        // Until the log itself is full: then `try_append` refuses and `append` fails.
        loop {
            let p = payload(i);
            let lsn = log.head();
            match log.try_append(&p).expect("no error") {
                Some(_) => model.records.push((lsn, p)),
                None => match log.append(&p).await {
                    Ok(_) => model.records.push((lsn, p)),
                    Err(e) => {
                        assert!(matches!(e, LogError::Full { .. }), "{e:?}");
                        assert!(!log.can_append_now(p.len()));
                        break;
                    }
                },
            }
            i += 1;
        }
        log.commit(log.head()).await.expect("commit");
        model.acked_end = log.head();
        let (_log, replay) = open(reopen_device(dev.durable_image()), 40).await.expect("reopen");
        model.check(&replay.records, "records from try_append and append");
        assert_eq!(replay.records.len(), model.records.len());
    });
}
