//! scratch
use std::rc::Rc;
use std::time::Duration;
use corebuf_shard::io::{IoQueue, QueueConfig, SimDevice, SimOptions};

#[test]
fn barging_write_back_deadlock() {
    glommio::LocalExecutor::default().run(async {
        let mut opts = SimOptions::new(64 * 4096);
        opts.latency_yields_max = 20;
        opts.seed = 3;
        let dev = SimDevice::new(opts);
        let q = IoQueue::new(dev.clone(), QueueConfig { block_size_bytes: 4096, io_depth_max: 4, writebacks_in_flight_max: 1 }).unwrap();
        // Z occupies the only slot.
        let r = q.request().await;
        q.write_back(r, 1).await.unwrap();
        // Y: takes ticket 0 of block 7, waits for the slot.
        let q2 = Rc::clone(&q);
        let y = glommio::spawn_local(async move {
            let r = q2.request().await;
            q2.write_back(r, 7).await.unwrap();
        });
        futures_lite::future::yield_now().await;
        eprintln!("after yield: wb in flight {}", q.stats().writebacks_in_flight);
        // barge: as soon as the slot frees, take it for block 7.
        while q.stats().writebacks_in_flight > 0 { futures_lite::future::yield_now().await; }
        let r = q.request().await;
        q.write_back(r, 7).await.unwrap();
        eprintln!("barged");
        let res = glommio::timer::timeout(Duration::from_secs(2), async { y.await; q.sync().await.unwrap(); Ok(()) }).await;
        eprintln!("result: {res:?} stats {:?}", q.stats().writebacks_in_flight);
        assert!(res.is_ok(), "deadlock");
    });
}
