//! The asio queue's contract, on the simulated device with latency (so operations overlap and
//! reorder) and, for the two properties production leans on hardest, on a real file through
//! `DmaDevice`: write-backs in flight stay within their bound, writes of one block land one at
//! a time in submission order, faults reach whoever must hear of them, a crash keeps what was
//! flushed, request buffers are recycled, `sync` waits, and the statistics add up.

mod common;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashSet};
use std::rc::Rc;

use common::{
    block_of, config, device_file, image, pattern, run, sim_device, version_of, within,
    yield_times, BLOCK_BYTES,
};
use corebuf_shard::io::{Device, DmaDevice, IoQueue, SimDevice, SimOptions, SECTOR_BYTES};
use corebuf_shard::{Error, IoOp};
use futures_lite::future::poll_once;

const BLOCK: u64 = BLOCK_BYTES as u64;

/// Submits a write-back of version 1 of every block in `0..blocks`, from `tasks` concurrently
/// spawned tasks (task `t` takes blocks `t`, `t + tasks`, ...), then syncs.
async fn write_back_flood<D: Device + 'static>(queue: &Rc<IoQueue<D>>, blocks: u64, tasks: u64) {
    let submitters: Vec<_> = (0..tasks)
        .map(|task| {
            let queue = Rc::clone(queue);
            glommio::spawn_local(async move {
                for block in (task..blocks).step_by(tasks as usize) {
                    let mut request = queue.request().await;
                    common::fill(request.data_mut(), block, 1);
                    queue.write_back(request, block).await.expect("submit a write-back");
                }
            })
        })
        .collect();
    for submitter in submitters {
        submitter.await;
    }
    queue.sync().await.expect("no write-back failed");
}

/// What a storm of writes to a few blocks did.
#[derive(Debug, Default)]
struct Storm {
    /// Per block, the version submitted last.
    last_submitted: BTreeMap<u64, u64>,
    /// Per block, the versions in the order they landed, for the writes whose landing the test
    /// sees (normal writes, and write-backs with a completion callback).
    landed: BTreeMap<u64, Vec<u64>>,
}

/// From `tasks` concurrently spawned tasks, issues `ops` writes each to the blocks in `hot`,
/// rotating between normal writes, write-backs, and write-backs with a completion callback.
/// Every submission writes the next version of its block; the version is chosen in the same
/// poll that submits, so version order is submission order. Syncs at the end.
async fn same_block_storm<D: Device + 'static>(
    queue: &Rc<IoQueue<D>>,
    hot: &[u64],
    tasks: u64,
    ops: u64,
) -> Storm {
    let storm = Rc::new(RefCell::new(Storm::default()));
    let submitters: Vec<_> = (0..tasks)
        .map(|task| {
            let queue = Rc::clone(queue);
            let storm = Rc::clone(&storm);
            let hot = hot.to_vec();
            glommio::spawn_local(async move {
                for op in 0..ops {
                    // Every block sees every kind of write: kind and block advance at
                    // different strides.
                    let block = hot[((task + 2 * op) % hot.len() as u64) as usize];
                    let mut request = queue.request().await;
                    // From here to the submission there is no await: nobody else runs.
                    let version = {
                        let mut storm = storm.borrow_mut();
                        let last = storm.last_submitted.entry(block).or_insert(0);
                        *last += 1;
                        *last
                    };
                    common::fill(request.data_mut(), block, version);
                    match (task + op) % 3 {
                        0 => {
                            queue.write(&request, block).await.expect("write");
                            // Resumed in the poll that completed the write.
                            storm.borrow_mut().landed.entry(block).or_default().push(version);
                        }
                        1 => queue.write_back(request, block).await.expect("submit a write-back"),
                        _ => {
                            let storm = Rc::clone(&storm);
                            let done = move |result: corebuf_shard::Result<()>| {
                                result.expect("write-back");
                                storm.borrow_mut().landed.entry(block).or_default().push(version);
                            };
                            queue
                                .write_back_then(request, block, Some(done))
                                .await
                                .expect("submit");
                        }
                    }
                }
            })
        })
        .collect();
    for submitter in submitters {
        submitter.await;
    }
    queue.sync().await.expect("no write-back failed");
    Rc::try_unwrap(storm).expect("every task and callback is done").into_inner()
}

/// Checks what every same-block storm must show: each block's writes landed in submission
/// order, and what a read returns now (`read(block)`) is the version submitted last.
fn assert_storm_landed_in_order(storm: &Storm, read: impl Fn(u64) -> Vec<u8>) {
    for (&block, &last) in &storm.last_submitted {
        let landed = &storm.landed[&block];
        assert!(landed.len() > 2, "block {block}: too few observed writes to mean anything");
        assert!(
            landed.windows(2).all(|pair| pair[0] < pair[1]),
            "block {block}: writes landed out of submission order: {landed:?}"
        );
        assert_eq!(
            version_of(&read(block), block),
            Some(last),
            "block {block}: not the last write"
        );
    }
}

#[test]
fn a_write_back_flood_never_has_more_than_writebacks_in_flight_max_in_flight() {
    const BLOCKS: u64 = 1000;
    const MAX: usize = 4;
    for seed in 0..3 {
        let device = sim_device(BLOCKS, 8, seed);
        let queue = IoQueue::new(device.clone(), config(8, MAX)).expect("a valid queue");
        run(within(60, "the write-back flood", write_back_flood(&queue, BLOCKS, 8)));

        let counters = device.counters();
        let stats = queue.stats();
        assert!(counters.writes_in_flight_peak <= MAX as u64, "seed {seed}: {counters:?}");
        assert!(stats.writebacks_in_flight_peak <= MAX as u64, "seed {seed}: {stats:?}");
        // The bound was reached, so the two checks above could have failed.
        assert_eq!(counters.writes_in_flight_peak, MAX as u64, "seed {seed}: {counters:?}");
        assert_eq!(stats.writebacks_in_flight_peak, MAX as u64, "seed {seed}: {stats:?}");
        assert!(stats.submit_waits > 0, "seed {seed}: no submitter ever waited at the bound");
        assert_eq!(stats.writebacks_completed, BLOCKS);
        assert_eq!((stats.in_flight, stats.writebacks_in_flight), (0, 0), "sync drained it");
        assert_eq!(counters.overlapping_writes, 0);
        let live = device.live_image();
        assert!(live == image(BLOCKS, 1), "seed {seed}: some block lacks its written-back data");
    }
}

#[test]
fn writes_and_write_backs_of_one_block_land_one_at_a_time_in_submission_order() {
    let hot = [2, 7, 11];
    for seed in 0..4 {
        let device = sim_device(16, 6, seed);
        let queue = IoQueue::new(device.clone(), config(8, 4)).expect("a valid queue");
        let storm = run(within(60, "the same-block storm", same_block_storm(&queue, &hot, 12, 30)));

        let counters = device.counters();
        assert_eq!(counters.overlapping_writes, 0, "seed {seed}: two writes of a block at once");
        assert_eq!(counters.writes, 12 * 30, "seed {seed}: every write reached the device");
        let stats = queue.stats();
        assert!(stats.writebacks_in_flight_peak <= 4, "seed {seed}: {stats:?}");
        let live = device.live_image();
        assert_storm_landed_in_order(&storm, |block| block_of(&live, block).to_vec());
        for block in (0..16).filter(|block| !hot.contains(block)) {
            assert!(block_of(&live, block).iter().all(|&b| b == 0), "block {block} was written");
        }
    }
}

#[test]
fn a_write_back_that_finds_a_free_slot_waits_behind_an_earlier_one_instead_of_deadlocking() {
    // Regression: write-backs took their block's ticket at the call but a slot in whatever
    // order they were polled. A write-back of block 7 that came along just as a slot freed
    // took it, then waited for block 7's turn behind an earlier write-back of block 7, which
    // waited for the slot: deadlock.
    let device = sim_device(16, 20, 3);
    let queue = IoQueue::new(device.clone(), config(4, 1)).expect("a valid queue");
    run(within(10, "write-backs of one block behind a full slot", async {
        let mut request = queue.request().await;
        common::fill(request.data_mut(), 1, 1);
        queue.write_back(request, 1).await.expect("submit"); // takes the only slot
        let earlier = {
            let queue = Rc::clone(&queue);
            glommio::spawn_local(async move {
                let mut request = queue.request().await;
                common::fill(request.data_mut(), 7, 1);
                queue.write_back(request, 7).await.expect("submit"); // waits for the slot
            })
        };
        yield_times(1).await;
        assert_eq!(queue.stats().writebacks_in_flight, 1, "the first write-back is still going");
        // Be first to see the slot free, ahead of the woken earlier write-back.
        while queue.stats().writebacks_in_flight > 0 {
            yield_times(1).await;
        }
        let mut request = queue.request().await;
        common::fill(request.data_mut(), 7, 2);
        queue.write_back(request, 7).await.expect("submit");
        earlier.await;
        queue.sync().await.expect("no write-back failed");
    }));
    assert_eq!(version_of(block_of(&device.live_image(), 7), 7), Some(2), "the later one last");
}

#[test]
fn a_write_back_cancelled_while_waiting_for_a_slot_gives_back_its_buffer_and_its_turn() {
    let device = sim_device(16, 4, 9);
    let queue = IoQueue::new(device.clone(), config(2, 1)).expect("a valid queue"); // 3 buffers
    run(within(10, "writes after a cancelled write-back", async {
        let mut request = queue.request().await;
        common::fill(request.data_mut(), 1, 1);
        queue.write_back(request, 1).await.expect("submit"); // takes the only slot
        let mut request = queue.request().await;
        common::fill(request.data_mut(), 7, 1);
        let cancelled = poll_once(queue.write_back(request, 7)).await;
        assert!(cancelled.is_none(), "the write-back should have waited for the slot");

        // Its buffer came back: the two buffers the in-flight write-back does not hold.
        let free: Vec<_> = [poll_once(queue.request()).await, poll_once(queue.request()).await]
            .into_iter()
            .map(|request| request.expect("the cancelled write-back's buffer was lost"))
            .collect();
        drop(free);

        // Its turn was given up: block 7 can be written, and write-backs still get slots.
        let mut request = queue.request().await;
        common::fill(request.data_mut(), 7, 2);
        queue.write(&request, 7).await.expect("write");
        common::fill(request.data_mut(), 8, 1);
        queue.write_back(request, 8).await.expect("submit");
        queue.sync().await.expect("no write-back failed");
    }));
    let live = device.live_image();
    assert_eq!(version_of(block_of(&live, 7), 7), Some(2), "the cancelled version never landed");
    assert_eq!(version_of(block_of(&live, 8), 8), Some(1));
    assert_eq!(device.counters().writes, 3, "the cancelled write-back wrote nothing");
}

/// Waits until nothing is in flight, without `sync` (which would take a latched error).
async fn drain<D: Device>(queue: &IoQueue<D>) {
    for _ in 0..1000 {
        if queue.stats().in_flight == 0 {
            return;
        }
        yield_times(1).await;
    }
    panic!("the queue did not drain: {:?}", queue.stats());
}

/// Checks that `error` is an I/O error of `op` on `block` whose message names both.
fn assert_io_error(error: &Error, op: IoOp, block: u64) {
    match error {
        Error::Io { op: o, block: b, offset, .. } => {
            assert_eq!((*o, *b, *offset), (op, Some(block), block * BLOCK), "{error}");
        }
        other => panic!("expected an I/O error of {op} on block {block}, got {other:?}"),
    }
    let message = error.to_string();
    assert!(message.starts_with(&format!("{op} of block {block} ")), "{message}");
}

#[test]
fn a_read_error_is_returned_to_the_reader_with_the_block() {
    let device = sim_device(16, 2, 0);
    let queue = IoQueue::new(device.clone(), config(2, 1)).expect("a valid queue");
    run(async {
        let mut request = queue.request().await;
        device.set_faults(1.0, 0.0, 0.0);
        let error = queue.read(&mut request, 9).await.expect_err("the read must fail");
        assert_io_error(&error, IoOp::Read, 9);
        device.set_faults(0.0, 0.0, 0.0);
        queue.read(&mut request, 9).await.expect("a healed device reads");
    });
    let stats = queue.stats();
    assert_eq!((stats.errors, stats.reads_completed), (1, 1), "{stats:?}");
}

#[test]
fn a_write_error_is_returned_to_the_writer_and_nothing_lands() {
    let device = sim_device(16, 2, 0);
    let queue = IoQueue::new(device.clone(), config(2, 1)).expect("a valid queue");
    run(async {
        let mut request = queue.request().await;
        common::fill(request.data_mut(), 5, 1);
        device.set_faults(0.0, 1.0, 0.0);
        let error = queue.write(&request, 5).await.expect_err("the write must fail");
        assert_io_error(&error, IoOp::Write, 5);
        queue.sync().await.expect("a normal write's error is not latched");
    });
    assert!(device.live_image().iter().all(|&b| b == 0), "a failed write changed the device");
    assert_eq!(queue.stats().errors, 1);
}

#[test]
fn a_failed_write_back_is_returned_by_the_next_sync_and_then_cleared() {
    let device = sim_device(16, 2, 0);
    let queue = IoQueue::new(device.clone(), config(2, 2)).expect("a valid queue");
    run(async {
        device.set_faults(0.0, 1.0, 0.0);
        for block in [3, 4] {
            let mut request = queue.request().await;
            common::fill(request.data_mut(), block, 1);
            queue.write_back(request, block).await.expect("submission itself succeeds");
        }
        let error = queue.sync().await.expect_err("sync must report the failed write-back");
        let Error::Io { block: Some(block), .. } = &error else { panic!("{error:?}") };
        let block = *block;
        assert_io_error(&error, IoOp::Write, block);
        assert!([3, 4].contains(&block), "{error}");
        queue.sync().await.expect("the error was reported once and cleared");
    });
    let stats = queue.stats();
    assert_eq!((stats.errors, stats.writebacks_completed), (2, 0), "{stats:?}");
    assert!(device.live_image().iter().all(|&b| b == 0), "a failed write-back changed the device");
}

#[test]
fn a_failed_write_back_is_returned_by_the_next_flush_and_then_cleared() {
    let device = sim_device(16, 2, 0);
    let queue = IoQueue::new(device.clone(), config(2, 1)).expect("a valid queue");
    run(async {
        device.set_faults(0.0, 1.0, 0.0);
        let mut request = queue.request().await;
        common::fill(request.data_mut(), 3, 1);
        queue.write_back(request, 3).await.expect("submission itself succeeds");
        drain(&queue).await;
        let error = queue.flush().await.expect_err("flush must report the failed write-back");
        assert_io_error(&error, IoOp::Write, 3);
        queue.flush().await.expect("the error was reported once and cleared");
        queue.sync().await.expect("and sync does not report it again");
    });
}

#[test]
fn a_write_back_with_a_completion_callback_hands_its_error_to_the_callback_not_to_sync() {
    let device = sim_device(16, 2, 0);
    let queue = IoQueue::new(device.clone(), config(2, 1)).expect("a valid queue");
    let reported = Rc::new(RefCell::new(None));
    run(async {
        device.set_faults(0.0, 1.0, 0.0);
        let mut request = queue.request().await;
        common::fill(request.data_mut(), 4, 1);
        let slot = Rc::clone(&reported);
        let done = move |result: corebuf_shard::Result<()>| *slot.borrow_mut() = Some(result);
        queue.write_back_then(request, 4, Some(done)).await.expect("submit");
        queue.sync().await.expect("the callback owns the error");
        queue.flush().await.expect("the callback owns the error");
    });
    let result = reported.borrow_mut().take().expect("the callback ran");
    assert_io_error(&result.expect_err("the callback got the failure"), IoOp::Write, 4);
}

#[test]
fn a_flush_error_is_returned_and_nothing_becomes_durable() {
    let device = sim_device(16, 2, 0);
    let queue = IoQueue::new(device.clone(), config(2, 1)).expect("a valid queue");
    run(async {
        let mut request = queue.request().await;
        common::fill(request.data_mut(), 2, 1);
        queue.write(&request, 2).await.expect("write");
        device.set_faults(0.0, 0.0, 1.0);
        let error = queue.flush().await.expect_err("the flush must fail");
        match &error {
            Error::Io { op: IoOp::Flush, block: None, .. } => {}
            other => panic!("expected a flush error, got {other:?}"),
        }
        assert!(error.to_string().starts_with("flush"), "{error}");
        assert!(device.durable_image().iter().all(|&b| b == 0), "a failed flush made data durable");
        device.set_faults(0.0, 0.0, 0.0);
        queue.flush().await.expect("a healed device flushes");
    });
    assert_eq!(version_of(block_of(&device.durable_image(), 2), 2), Some(1));
    let stats = queue.stats();
    assert_eq!((stats.errors, stats.flushes_completed), (1, 1), "{stats:?}");
}

/// How an unflushed write of one block survived a crash.
#[derive(Debug, Default)]
struct Survival {
    whole: u64,
    lost: u64,
    torn: u64,
}

impl Survival {
    /// Classifies `after` against the bytes before and after an unflushed write; panics unless
    /// every 512-byte sector is one or the other.
    fn record(&mut self, after: &[u8], old: &[u8], new: &[u8], what: &str) {
        let mut new_sectors = 0;
        let sectors = after.chunks(SECTOR_BYTES).zip(old.chunks(SECTOR_BYTES));
        for (index, (sector, old_sector)) in sectors.enumerate() {
            let new_sector = &new[index * SECTOR_BYTES..(index + 1) * SECTOR_BYTES];
            if sector == new_sector {
                new_sectors += 1;
            } else {
                assert_eq!(sector, old_sector, "{what}: sector {index} is neither old nor new");
            }
        }
        match new_sectors {
            0 => self.lost += 1,
            n if n == BLOCK_BYTES / SECTOR_BYTES => self.whole += 1,
            _ => self.torn += 1,
        }
    }
}

#[test]
fn a_crash_keeps_every_flushed_write_and_tears_unflushed_ones_only_at_sector_boundaries() {
    const BLOCKS: u64 = 64;
    let device = sim_device(BLOCKS, 3, 11);
    let queue = IoQueue::new(device.clone(), config(8, 4)).expect("a valid queue");
    run(async {
        // Flushed: version 1 of blocks 0..32, half written, half written back.
        for block in 0..32 {
            let mut request = queue.request().await;
            common::fill(request.data_mut(), block, 1);
            if block % 2 == 0 {
                queue.write(&request, block).await.expect("write");
            } else {
                queue.write_back(request, block).await.expect("submit");
            }
        }
        queue.sync().await.expect("no write-back failed");
        queue.flush().await.expect("flush");
        // Unflushed: version 2 of blocks 16..48, and block 50 written twice.
        for (block, version) in (16..48).map(|block| (block, 2)).chain([(50, 2), (50, 3)]) {
            let mut request = queue.request().await;
            common::fill(request.data_mut(), block, version);
            queue.write_back(request, block).await.expect("submit");
        }
        queue.sync().await.expect("no write-back failed");
    });

    let zero = vec![0u8; BLOCK_BYTES];
    let live_before = device.live_image();
    let mut survival = Survival::default();
    let mut distinct_images = HashSet::new();
    for seed in 0..200 {
        let crashed = device.crash(seed);
        assert!(crashed == device.crash(seed), "seed {seed}: the same seed gave another image");
        for block in 0..BLOCKS {
            let after = block_of(&crashed, block);
            let what = format!("seed {seed}, block {block}");
            let v1 = pattern(block, 1, BLOCK_BYTES);
            let v2 = pattern(block, 2, BLOCK_BYTES);
            match block {
                0..16 => {
                    assert_eq!(version_of(after, block), Some(1), "{what}: flushed write lost")
                }
                16..32 => survival.record(after, &v1, &v2, &what),
                32..48 => survival.record(after, &zero, &v2, &what),
                50 => {
                    let v3 = pattern(block, 3, BLOCK_BYTES);
                    for (index, sector) in after.chunks(SECTOR_BYTES).enumerate() {
                        let at = index * SECTOR_BYTES..(index + 1) * SECTOR_BYTES;
                        assert!(
                            [&zero[at.clone()], &v2[at.clone()], &v3[at]].contains(&sector),
                            "{what}: sector {index} is from no version"
                        );
                    }
                }
                _ => assert!(after == zero.as_slice(), "{what}: a never-written block changed"),
            }
        }
        distinct_images.insert(crashed);
    }
    // The model really drops, keeps and tears writes, so the checks above mean something.
    assert!(survival.whole > 0 && survival.lost > 0 && survival.torn > 0, "{survival:?}");
    assert!(distinct_images.len() > 100, "seeds barely change the crash image");
    assert!(device.live_image() == live_before, "crashing changed the running device");

    // A device rebuilt from a crash image reads the flushed data back.
    let rebuilt = SimDevice::from_image(device.crash(7), SimOptions::new(0));
    let queue = IoQueue::new(rebuilt, config(2, 1)).expect("a valid queue");
    run(async {
        let mut request = queue.request().await;
        for block in 0..16 {
            queue.read(&mut request, block).await.expect("read");
            assert_eq!(version_of(request.data(), block), Some(1), "block {block}");
        }
    });
}

#[test]
fn request_buffers_are_recycled_and_a_request_waits_while_all_are_taken() {
    const IO_DEPTH_MAX: usize = 3;
    const WRITEBACKS_MAX: usize = 2;
    const BUFFERS: usize = IO_DEPTH_MAX + WRITEBACKS_MAX;
    let device = sim_device(256, 4, 2);
    let queue = IoQueue::new(device.clone(), config(IO_DEPTH_MAX, WRITEBACKS_MAX)).expect("queue");
    run(within(30, "the buffer recycling scenario", async {
        let mut taken = Vec::new();
        for _ in 0..BUFFERS {
            taken.push(queue.request().await);
        }
        let buffers: HashSet<usize> = taken.iter().map(|r| r.data().as_ptr() as usize).collect();
        assert_eq!(buffers.len(), BUFFERS, "each request has its own buffer");
        assert_eq!(queue.stats().submit_waits, 0);

        let got = Rc::new(Cell::new(None));
        let waiter = {
            let queue = Rc::clone(&queue);
            let got = Rc::clone(&got);
            glommio::spawn_local(async move {
                let request = queue.request().await;
                got.set(Some(request.data().as_ptr() as usize));
            })
        };
        yield_times(20).await;
        assert_eq!(got.get(), None, "a request was granted while all buffers were taken");
        assert_eq!(queue.stats().submit_waits, 1, "the waiting request is counted");
        taken.pop();
        waiter.await;
        let granted = got.get().expect("the waiter got a buffer once one came back");
        assert!(buffers.contains(&granted), "the waiter got a new buffer, not a recycled one");
        taken.clear();

        // Heavy use: write-backs, writes and reads from several tasks.
        write_back_flood(&queue, 256, 4).await;
        let mut request = queue.request().await;
        for block in 0..64 {
            queue.read(&mut request, block).await.expect("read");
            assert_eq!(version_of(request.data(), block), Some(1), "block {block}");
            queue.write(&request, block).await.expect("write");
        }
        drop(request);

        // The same buffers, no more and no fewer.
        for _ in 0..BUFFERS {
            taken.push(poll_once(queue.request()).await.expect("every buffer came back"));
        }
        let after: HashSet<usize> = taken.iter().map(|r| r.data().as_ptr() as usize).collect();
        assert_eq!(after, buffers, "the queue allocated or lost buffers");
        assert!(poll_once(queue.request()).await.is_none(), "a buffer beyond the pool appeared");
    }));
}

#[test]
fn sync_waits_until_in_flight_write_backs_and_writes_finish() {
    let device = sim_device(16, 30, 5);
    let queue = IoQueue::new(device.clone(), config(4, 8)).expect("a valid queue");
    run(async {
        for block in 0..8 {
            let mut request = queue.request().await;
            common::fill(request.data_mut(), block, 1);
            queue.write_back(request, block).await.expect("submit");
        }
        let writer = {
            let queue = Rc::clone(&queue);
            glommio::spawn_local(async move {
                let mut request = queue.request().await;
                common::fill(request.data_mut(), 9, 1);
                queue.write(&request, 9).await.expect("write");
            })
        };
        // Every write-back has started (glommio polls a spawned task at once), none has
        // finished.
        let stats = queue.stats();
        assert_eq!(stats.writebacks_in_flight, 8, "{stats:?}");
        assert!(device.live_image().iter().all(|&b| b == 0), "nothing has landed yet");

        queue.sync().await.expect("no write-back failed");
        let stats = queue.stats();
        assert_eq!((stats.in_flight, stats.writebacks_in_flight), (0, 0), "{stats:?}");
        assert_eq!(stats.writebacks_completed, 8, "{stats:?}");
        let live = device.live_image();
        for block in (0..8).chain([9]) {
            assert_eq!(version_of(block_of(&live, block), block), Some(1), "block {block}");
        }
        writer.await;
    });
}

#[test]
fn statistics_count_what_the_queue_did() {
    // With latency, so that the four write-backs below are in flight at once (glommio polls a
    // spawned task at once: on a device without latency a write-back completes inside its
    // submit call).
    let device = sim_device(16, 50, 1);
    let queue = IoQueue::new(device.clone(), config(4, 4)).expect("a valid queue");
    run(async {
        for block in 0..4 {
            let mut request = queue.request().await;
            common::fill(request.data_mut(), block, 1);
            queue.write_back(request, block).await.expect("submit");
        }
        queue.sync().await.expect("4 write-backs");
        let mut request = queue.request().await;
        for block in 4..7 {
            common::fill(request.data_mut(), block, 1);
            queue.write(&request, block).await.expect("3 writes");
        }
        queue.flush().await.expect("flush 1");
        queue.flush().await.expect("flush 2");
        for block in 0..5 {
            queue.read(&mut request, block).await.expect("5 reads");
        }
        queue.discard(10, 2).await.expect("a discard, counted nowhere");

        device.set_faults(1.0, 0.0, 0.0);
        queue.read(&mut request, 1).await.expect_err("failed read");
        device.set_faults(0.0, 1.0, 0.0);
        queue.write(&request, 1).await.expect_err("failed write");
        queue.write_back(request, 2).await.expect("submit");
        queue.sync().await.expect_err("failed write-back");
        device.set_faults(0.0, 0.0, 1.0);
        queue.flush().await.expect_err("failed flush");
    });
    let stats = queue.stats();
    let block = BLOCK;
    assert_eq!(stats.reads_completed, 5, "{stats:?}");
    assert_eq!(stats.writes_completed, 3, "{stats:?}");
    assert_eq!(stats.writebacks_completed, 4, "{stats:?}");
    assert_eq!(stats.flushes_completed, 2, "{stats:?}");
    assert_eq!(stats.bytes_read, 5 * block, "{stats:?}");
    assert_eq!(stats.bytes_written, 7 * block, "{stats:?}");
    assert_eq!(stats.errors, 4, "{stats:?}");
    assert_eq!(stats.read_latency_us.len(), 5, "one read latency per completed read");
    assert_eq!(stats.write_latency_us.len(), 7, "one write latency per completed write");
    assert_eq!(stats.flush_latency_us.len(), 2, "one flush latency per completed flush");
    assert!(stats.read_latency_us.min() >= 1, "latencies are at least 1 µs");
    assert_eq!((stats.in_flight, stats.writebacks_in_flight), (0, 0), "{stats:?}");
    assert_eq!(stats.writebacks_in_flight_peak, 4, "4 write-backs were submitted at once");
    assert_eq!(stats.submit_waits, 0, "nothing had to wait");
    let counters = device.counters();
    assert_eq!((counters.reads, counters.writes, counters.flushes), (6, 9, 3), "{counters:?}");
}

#[test]
fn a_dma_write_back_flood_stays_within_the_bound_and_every_block_lands() {
    const BLOCKS: u64 = 256;
    let (_dir, path) = device_file(&image(BLOCKS, 0));
    let file_path = path.clone();
    let stats = run(async move {
        let device = DmaDevice::open(&file_path).await.expect("open the device file");
        let queue = IoQueue::new(device, config(8, 4)).expect("a valid queue");
        within(60, "the DMA write-back flood", write_back_flood(&queue, BLOCKS, 8)).await;
        queue.flush().await.expect("flush");
        queue.stats()
    });
    assert!(stats.writebacks_in_flight_peak <= 4, "{stats:?}");
    assert_eq!(stats.writebacks_in_flight_peak, 4, "the bound was reached: {stats:?}");
    assert!(stats.submit_waits > 0, "no submitter ever waited at the bound");
    assert_eq!((stats.writebacks_completed, stats.errors), (BLOCKS, 0), "{stats:?}");
    assert_eq!(stats.bytes_written, BLOCKS * BLOCK, "{stats:?}");
    let bytes = std::fs::read(&path).expect("read the file");
    assert!(bytes == image(BLOCKS, 1), "some block lacks its written-back data");
}

#[test]
fn dma_writes_and_write_backs_of_one_block_land_in_submission_order() {
    const BLOCKS: u64 = 16;
    let hot = [1, 8, 15];
    let (_dir, path) = device_file(&image(BLOCKS, 0));
    let file_path = path.clone();
    let storm = run(async move {
        let device = DmaDevice::open(&file_path).await.expect("open the device file");
        let queue = IoQueue::new(device, config(8, 4)).expect("a valid queue");
        let storm = within(60, "the DMA same-block storm", same_block_storm(&queue, &hot, 8, 15));
        let storm = storm.await;
        queue.flush().await.expect("flush");
        assert!(queue.stats().writebacks_in_flight_peak <= 4, "{:?}", queue.stats());
        storm
    });
    let bytes = std::fs::read(&path).expect("read the file");
    assert_storm_landed_in_order(&storm, |block| block_of(&bytes, block).to_vec());
    for block in (0..BLOCKS).filter(|block| !hot.contains(block)) {
        assert_eq!(version_of(block_of(&bytes, block), block), Some(0), "block {block} changed");
    }
}
