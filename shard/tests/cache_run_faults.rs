//! A flush writes runs of adjacent dirty blocks as one request; when that request fails, each
//! block is written again alone, so a persistently bad block fails only itself: its
//! neighbours reach the device, and the error names the bad block (found by a review: before,
//! one bad block kept up to 63 good neighbours dirty, flush after flush).

mod common;

use std::cell::Cell;
use std::rc::Rc;

use common::run;
use corebuf_shard::cache::{CacheConfig, Hooks, Partition};
use corebuf_shard::io::{Device, IoBuf, IoQueue, QueueConfig, SimBuf, SimDevice, SimOptions};
use corebuf_shard::{Error, IoOp};

const BS: usize = 4096;

/// A simulated device on which every write that covers block `bad` fails.
struct BadBlock {
    sim: SimDevice,
    bad: u64,
    writes: Rc<Cell<u64>>,
}

impl Device for BadBlock {
    type Buf = SimBuf;
    common::sim_passthrough!(except writes);

    async fn read_at(&self, offset: u64, dst: &mut [u8]) -> corebuf_shard::Result<()> {
        self.sim.read_at(offset, dst).await
    }
    async fn write_at(&self, offset: u64, buf: &SimBuf) -> corebuf_shard::Result<()> {
        self.writes.set(self.writes.get() + 1);
        let first = offset / BS as u64;
        let n = (buf.as_bytes().len() / BS) as u64;
        if (first..first + n).contains(&self.bad) {
            return Err(Error::io(
                IoOp::Write,
                self.sim.path(),
                offset,
                std::io::Error::other("bad"),
            ));
        }
        self.sim.write_at(offset, buf).await
    }
}

#[test]
fn a_bad_block_in_a_run_fails_only_itself() {
    run(async {
        let blocks = 32;
        let sim = SimDevice::new(SimOptions::new(blocks * BS as u64));
        let probe = sim.clone();
        let writes = Rc::new(Cell::new(0));
        let device = BadBlock { sim, bad: 5, writes: Rc::clone(&writes) };
        let queue = IoQueue::new(device, QueueConfig::default()).expect("queue");
        let config = CacheConfig {
            cache_size_bytes: 64 * BS as u64,
            pins_per_session_max: 8,
            dirty_high_percent: 100,
            dirty_low_percent: 0,
        };
        let part: Partition<BadBlock> =
            Partition::new(queue, config, Hooks::default()).expect("partition");
        {
            let s = part.session().await;
            for b in 0..10u64 {
                let buf = s.read(b).await.expect("read");
                buf.data_mut().fill(0xAB);
                buf.mark_dirty();
            }
        }
        for flush in 0..3 {
            let error = part.write_dirty().await.expect_err("block 5 cannot be written");
            assert!(matches!(error, Error::Io { op: IoOp::Write, .. }), "{error:?}");
            assert!(error.to_string().contains("block 5"), "flush {flush}: {error}");
            assert_eq!(part.stats().dirty, 1, "flush {flush}: only the bad block stays dirty");
        }
        let live = probe.live_image();
        let written: Vec<u64> = (0..10).filter(|&b| live[b as usize * BS] == 0xAB).collect();
        assert_eq!(written, [0, 1, 2, 3, 4, 6, 7, 8, 9], "the good blocks are on the device");
        // The first flush: the run, then its ten blocks alone; later flushes: block 5 alone.
        assert_eq!(writes.get(), 1 + 10 + 2);
        assert_eq!(part.stats().write_errors, 3, "one buffer failed, three times");
    });
}
