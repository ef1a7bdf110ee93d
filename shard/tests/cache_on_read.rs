//! The `on_read` hook: it sees every block read from the device before anyone else does, a
//! failed check fails the read without caching the block (the next read goes to the device
//! again), and cache hits never call it.

mod common;

use std::cell::Cell;
use std::io;
use std::rc::Rc;

use common::{run, BLOCK_BYTES};
use corebuf_shard::cache::{CacheConfig, Hooks, Partition};
use corebuf_shard::io::{IoQueue, QueueConfig, SimDevice, SimOptions};
use corebuf_shard::{Error, IoOp};

#[test]
fn on_read_checks_device_reads_only_and_a_failed_check_is_not_cached() {
    run(async {
        let blocks = 32u64;
        let mut image = vec![0u8; blocks as usize * BLOCK_BYTES];
        for b in 0..blocks as usize {
            image[b * BLOCK_BYTES] = b as u8;
        }
        image[7 * BLOCK_BYTES + 1] = 0xEE; // block 7 is "corrupt"
        let device = SimDevice::from_image(image, SimOptions::new(blocks * BLOCK_BYTES as u64));
        let checks = Rc::new(Cell::new(0u32));
        let counted = Rc::clone(&checks);
        let hooks: Hooks<()> = Hooks {
            on_read: Some(Box::new(move |block, data| {
                counted.set(counted.get() + 1);
                assert_eq!(data[0], block as u8, "the hook sees the block's own bytes");
                if data[1] == 0xEE {
                    let why = io::Error::new(io::ErrorKind::InvalidData, "bad checksum");
                    return Err(Error::io(IoOp::Read, "<sim>", block * 4096, why).with_block(block));
                }
                Ok(())
            })),
            ..Hooks::default()
        };
        let queue = IoQueue::new(device, QueueConfig::default()).expect("queue");
        let config = CacheConfig {
            cache_size_bytes: 16 * BLOCK_BYTES as u64,
            pins_per_session_max: 4,
            dirty_high_percent: 100,
            dirty_low_percent: 0,
        };
        let partition = Partition::new(queue, config, hooks).expect("partition");
        let session = partition.session().await;
        for round in 0..3 {
            let buf = session.read(3).await.expect("a good block");
            assert_eq!(buf.data()[0], 3);
            drop(buf);
            assert_eq!(checks.get(), 1, "round {round}: hits do not call on_read");
        }
        for attempt in 0..2u32 {
            let e = session.read(7).await.expect_err("a corrupt block fails");
            assert_eq!(e.io_kind(), Some(io::ErrorKind::InvalidData));
            assert!(session.get(7).is_none(), "a block that failed its check is not cached");
            assert_eq!(checks.get(), 2 + attempt, "every read of it goes to the device");
        }
    });
}
