//! `IoQueue::read_into`: a block read straight into the caller's memory (a cache frame), with
//! no request buffer, any memory alignment, typed errors before any I/O, and at most
//! `io_depth_max` such reads in flight.

mod common;

use std::cell::Cell;
use std::future::Future;
use std::rc::Rc;

use common::{config, image, run, sim_device, version_of, BLOCK_BYTES};
use corebuf_shard::io::{IoQueue, SimDevice, SimOptions};
use corebuf_shard::Error;

#[test]
fn a_block_lands_in_unaligned_caller_memory_without_a_request_buffer() {
    run(async {
        let device = SimDevice::from_image(image(16, 3), SimOptions::new(0));
        let queue = IoQueue::new(device, config(2, 1)).unwrap();
        // One byte past an allocation's start: no alignment beyond a byte.
        let mut memory = vec![0u8; BLOCK_BYTES + 1];
        queue.read_into(5, &mut memory[1..]).await.unwrap();
        assert_eq!(version_of(&memory[1..], 5), Some(3));
        let stats = queue.stats();
        assert_eq!((stats.reads_completed, stats.bytes_read), (1, BLOCK_BYTES as u64));
        assert_eq!(stats.submit_waits, 0, "no request buffer was taken");
    });
}

#[test]
fn bad_calls_fail_typed_before_any_io() {
    run(async {
        let device = sim_device(16, 0, 1);
        let probe = device.clone();
        let queue = IoQueue::new(device, config(2, 1)).unwrap();
        let mut short = vec![0u8; BLOCK_BYTES - 512];
        let e = queue.read_into(1, &mut short).await.unwrap_err();
        assert!(matches!(e, Error::Unaligned { .. }), "{e:?}");
        let mut block = vec![0u8; BLOCK_BYTES];
        let e = queue.read_into(16, &mut block).await.unwrap_err();
        assert!(matches!(e, Error::BlockOutOfRange { block: 16, .. }), "{e:?}");
        assert_eq!(probe.counters().reads, 0);
    });
}

#[test]
fn at_most_io_depth_max_reads_are_in_flight() {
    run(async {
        let depth = 3;
        let device = sim_device(64, 20, 7); // each read yields up to 20 times
        let queue = IoQueue::new(device, config(depth, 1)).unwrap();
        let peak = Rc::new(Cell::new(0));
        let readers: Vec<_> = (0..12u64)
            .map(|b| {
                let (queue, peak) = (Rc::clone(&queue), Rc::clone(&peak));
                glommio::spawn_local(async move {
                    let mut dst = vec![0u8; BLOCK_BYTES];
                    let read = queue.read_into(b, &mut dst);
                    futures_lite::pin!(read);
                    // Poll by hand to sample the queue while this read is pending.
                    std::future::poll_fn(|cx| {
                        peak.set(peak.get().max(queue.in_flight()));
                        read.as_mut().poll(cx)
                    })
                    .await
                    .unwrap();
                })
            })
            .collect();
        for reader in readers {
            reader.await;
        }
        assert!(peak.get() >= 2, "reads overlapped (peak {})", peak.get());
        assert!(peak.get() <= depth, "peak {} above io_depth_max {depth}", peak.get());
        assert!(queue.stats().submit_waits > 0, "the 4th and later reads waited for a slot");
        assert_eq!(queue.stats().reads_completed, 12);
    });
}
