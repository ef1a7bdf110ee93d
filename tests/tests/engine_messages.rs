//! The message layer under pressure, on a real file: full rings and a full client ingress
//! back-pressure their senders (nothing lost, nothing deadlocked), shutdown with requests in
//! flight answers every one of them (served or `ShutDown`, none hangs), a `Client` dropped
//! with requests pending leaves the engine working, and a shard with nothing to do sleeps.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::mpsc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use corebuf::{Engine, Error, Shard};
use corebuf_tests::{data_file, initial_block, scratch_dir, versioned_block};

const BS: usize = 4096;
const BLOCKS: u64 = 512;
const NO_HANG: Duration = Duration::from_secs(60);

/// An engine whose rings hold 2 requests per pair and whose ingress holds 2 client calls.
fn tight_engine(path: &std::path::Path, shards: usize) -> Engine {
    Engine::builder()
        .path(path)
        .shards(shards)
        .range_blocks(4)
        .cache_size_bytes(shards as u64 * 128 * BS as u64)
        .ring_capacity(2)
        .inbox_capacity(2)
        .handlers_in_flight_max(2)
        .build()
        .expect("an engine")
}

/// Runs `f` on a thread and fails the test if it does not finish within [`NO_HANG`].
fn within_deadline<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(NO_HANG).unwrap_or_else(|_| panic!("{what} hung for {NO_HANG:?}"))
}

/// Many tasks on shard 0 write and read back blocks of shard 1 through rings of 2 credits:
/// senders wait for credits, every write lands, every read sees its write.
#[test]
fn a_full_ring_back_pressures_senders_without_loss_or_deadlock() {
    let dir = scratch_dir();
    let path = data_file(dir.path(), BLOCKS, BS);
    let engine = tight_engine(&path, 2);
    let client = engine.client();
    let remote: Vec<u64> = (0..BLOCKS).filter(|&b| client.owner_of(b) == 1).take(64).collect();
    let blocks = remote.clone();
    let stats = within_deadline("64 tasks through 2-credit rings", move || {
        futures_lite::future::block_on(client.run_on(0, move |shard: Rc<Shard>| async move {
            let tasks: Vec<_> = blocks
                .into_iter()
                .enumerate()
                .map(|(i, b)| {
                    let shard = Rc::clone(&shard);
                    glommio::spawn_local(async move {
                        for round in 1..=4u32 {
                            let data = versioned_block(b, round * 100 + i as u32, BS);
                            shard.write(b, &data).await?;
                            let back = shard.read(b).await?;
                            assert_eq!(back, data, "block {b} round {round}");
                        }
                        Ok::<(), Error>(())
                    })
                })
                .collect();
            for task in tasks {
                task.await.expect("every routed write and read succeeds");
            }
            shard.engine_stats().await.expect("stats")
        }))
        .expect("the job runs")
    });
    assert!(stats.shards[0].messages_sent >= 64 * 8, "{:?}", stats.shards[0].messages_sent);
    let client = engine.client();
    for (i, &b) in remote.iter().enumerate() {
        assert_eq!(client.read_blocking(b).unwrap(), versioned_block(b, 400 + i as u32, BS));
    }
    engine.shutdown().unwrap();
}

/// 200 client calls at once into an ingress of 2 and 2 handlers: every one is answered right.
#[test]
fn a_full_client_ingress_back_pressures_clients_without_loss() {
    let dir = scratch_dir();
    let path = data_file(dir.path(), BLOCKS, BS);
    let engine = tight_engine(&path, 2);
    let client = engine.client();
    within_deadline("200 client calls through an ingress of 2", move || {
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let client = client.clone();
                std::thread::spawn(move || {
                    let calls = (0..50u64).map(|i| {
                        let client = client.clone();
                        async move {
                            let b = (t * 50 + i) % BLOCKS;
                            client.read(b).await.map(|data| (b, data))
                        }
                    });
                    let calls: Vec<_> = calls.map(Box::pin).collect();
                    futures_lite::future::block_on(join_all(calls))
                })
            })
            .collect();
        for thread in threads {
            for answer in thread.join().expect("client thread") {
                let (b, data) = answer.expect("every call is served");
                assert_eq!(data, initial_block(b, BS));
            }
        }
    });
    engine.shutdown().unwrap();
}

/// Shutdown while clients and shards have requests in flight: each one resolves, served or
/// refused with `ShutDown`, and none hangs.
#[test]
fn shutdown_with_requests_in_flight_answers_every_one() {
    let dir = scratch_dir();
    let path = data_file(dir.path(), BLOCKS, BS);
    let engine = tight_engine(&path, 2);
    let client = engine.client();
    let (started_tx, started_rx) = mpsc::channel();
    let callers: Vec<_> = (0..3u64)
        .map(|t| {
            let (client, started) = (client.clone(), started_tx.clone());
            std::thread::spawn(move || {
                let mut served = 0u64;
                let mut refused = 0u64;
                for i in 0.. {
                    let b = (t * 97 + i) % BLOCKS;
                    let result = if i % 3 == 0 {
                        client.write_blocking(b, &versioned_block(b, i as u32, BS))
                    } else {
                        client.read_blocking(b).map(drop)
                    };
                    match result {
                        Ok(()) => served += 1,
                        Err(Error::ShutDown) => {
                            refused += 1;
                            break;
                        }
                        Err(e) => panic!("a call during shutdown failed with {e:?}"),
                    }
                    if i == 20 {
                        let _ = started.send(());
                    }
                }
                (served, refused)
            })
        })
        .collect();
    // Shard-to-shard traffic too: a job on shard 0 that keeps reading shard 1's blocks.
    let job_client = client.clone();
    let job = std::thread::spawn(move || {
        futures_lite::future::block_on(job_client.run_on(0, |shard: Rc<Shard>| async move {
            let remote = (0..BLOCKS).find(|&b| shard.owner_of(b) == 1).expect("a block");
            loop {
                match shard.read(remote).await {
                    Ok(_) => {}
                    Err(Error::ShutDown) => return,
                    Err(e) => panic!("a routed read during shutdown failed with {e:?}"),
                }
                glommio::executor().yield_now().await;
            }
        }))
    });
    for _ in 0..3 {
        started_rx.recv_timeout(NO_HANG).expect("callers started");
    }
    within_deadline("shutdown with requests in flight", move || engine.shutdown())
        .expect("shutdown succeeds");
    for caller in callers {
        let (served, refused) = caller.join().expect("caller");
        assert!(served > 20 && refused == 1, "served {served}, refused {refused}");
    }
    let outcome = job.join().expect("job thread");
    assert!(matches!(outcome, Ok(()) | Err(Error::ShutDown)), "{outcome:?}");
    // After shutdown every call is refused at once.
    assert!(matches!(client.read_blocking(0), Err(Error::ShutDown)));
}

struct Noop;
impl Wake for Noop {
    fn wake(self: std::sync::Arc<Self>) {}
}

/// Requests are sent (each future polled once), then the futures and the client are dropped
/// before their answers: the shards answer into the void, and the engine keeps working.
#[test]
fn a_client_dropped_with_requests_pending_leaves_the_engine_working() {
    let dir = scratch_dir();
    let path = data_file(dir.path(), BLOCKS, BS);
    let engine = tight_engine(&path, 2);
    {
        let client = engine.client();
        let waker = Waker::from(std::sync::Arc::new(Noop));
        let mut cx = Context::from_waker(&waker);
        let mut pending: Vec<Pin<Box<dyn Future<Output = corebuf::Result<()>>>>> = Vec::new();
        for b in 0..64u64 {
            let client = client.clone();
            let mut call: Pin<Box<dyn Future<Output = corebuf::Result<()>>>> = if b % 2 == 0 {
                Box::pin(async move { client.read(b).await.map(drop) })
            } else {
                let data = versioned_block(b, 7, BS);
                Box::pin(async move { client.write(b, &data).await })
            };
            let _ = call.as_mut().poll(&mut cx);
            pending.push(call);
        }
        drop(pending);
        drop(client);
    }
    let client = engine.client();
    within_deadline("calls after a client was dropped", move || {
        for b in 0..BLOCKS {
            let data = client.read_blocking(b).expect("a read");
            let odd_dropped_write = b % 2 == 1 && b < 64 && data == versioned_block(b, 7, BS);
            assert!(data == initial_block(b, BS) || odd_dropped_write, "block {b}");
        }
        client.flush_blocking().expect("a barrier");
    });
    engine.shutdown().unwrap();
}

/// An engine with no work sleeps: its pollers go to sleep and stay asleep.
#[test]
fn an_idle_engine_sleeps() {
    let dir = scratch_dir();
    let path = data_file(dir.path(), BLOCKS, BS);
    let engine = Engine::builder()
        .path(&path)
        .shards(2)
        .cache_size_bytes(2 * 128 * BS as u64)
        .poll_before_sleep(Duration::from_micros(200))
        .build()
        .unwrap();
    let client = engine.client();
    client.read_blocking(1).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let before = engine.stats().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let after = engine.stats().unwrap();
    for (b, a) in before.shards.iter().zip(&after.shards) {
        // Each stats call wakes a shard at most once (its own request); an idle shard that
        // kept polling would not sleep at all, and one that never slept would show 0 sleeps.
        assert!(b.poller_sleeps >= 1, "shard {} never slept: {b:?}", b.shard);
        assert!(a.poller_sleeps - b.poller_sleeps <= 2, "shard {} woke up idle", a.shard);
    }
    engine.shutdown().unwrap();
}

/// Awaits every future concurrently.
async fn join_all<F: Future + Unpin>(mut futures: Vec<F>) -> Vec<F::Output> {
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match Pin::new(future).poll(cx) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().map(|o| o.expect("done")).collect()
}
