//! Eviction quality of the cache partition (S3-FIFO): a hot set survives a scan twice the cache
//! size, and on a zipfian (θ = 0.99) workload with the cache at 10 % of the dataset the
//! partition's hit ratio is at least an exact LRU's on the same access stream.
//!
//! Both ratios are printed: `cargo test -p corebuf-shard --test cache_eviction -- --nocapture`.

use std::collections::HashMap;

use corebuf_shard::cache::{CacheConfig, Hooks, Partition};
use corebuf_shard::io::{IoQueue, QueueConfig, SimDevice, SimOptions};
use corebuf_shard::rng::SimRng;

/// Small blocks keep the simulated device small; eviction does not depend on the block size.
const BLOCK_BYTES: usize = 512;

fn partition(device_blocks: u64, frames: u64) -> (Partition<SimDevice>, SimDevice) {
    let device = SimDevice::new(SimOptions::new(device_blocks * BLOCK_BYTES as u64));
    let queue_config = QueueConfig { block_size_bytes: BLOCK_BYTES, ..QueueConfig::default() };
    let queue = IoQueue::new(device.clone(), queue_config).expect("queue");
    let config = CacheConfig {
        cache_size_bytes: frames * BLOCK_BYTES as u64,
        pins_per_session_max: 4,
        ..CacheConfig::default()
    };
    (Partition::new(queue, config, Hooks::default()).expect("partition"), device)
}

/// Runs `test` on a fresh executor; a hang fails it after 60 s instead of blocking the run.
fn run(test: impl std::future::Future<Output = ()>) {
    let test = glommio::timer::timeout(std::time::Duration::from_secs(60), async {
        test.await;
        Ok(())
    });
    glommio::LocalExecutor::default()
        .run(test)
        .unwrap_or_else(|e| panic!("the test did not finish within 60 s (hang): {e}"));
}

#[test]
fn a_hot_set_survives_a_scan_twice_the_cache_size() {
    run(async {
        let frames = 200;
        let (part, device) = partition(4096, frames);
        let s = part.session().await;
        let hot: Vec<u64> = (0..frames / 2).map(|i| i * 7).collect();
        for _ in 0..4 {
            for &b in &hot {
                drop(s.read(b).await.expect("read"));
            }
        }
        // The scan: 2 × the cache of blocks never seen before and never seen again.
        for b in 2000..2000 + 2 * frames {
            drop(s.read(b).await.expect("read"));
        }
        let reads = device.counters().reads;
        let hits = part.stats().hits;
        for &b in &hot {
            drop(s.read(b).await.expect("read"));
        }
        assert_eq!(device.counters().reads, reads, "every hot block is still cached");
        assert_eq!(part.stats().hits - hits, hot.len() as u64);

        // What an exact LRU would have done with the same accesses: the scan flushes it.
        let mut lru = Lru::new(frames as usize);
        for _ in 0..4 {
            hot.iter().for_each(|&b| {
                lru.access(b);
            });
        }
        (2000..2000 + 2 * frames).for_each(|b| {
            lru.access(b);
        });
        let lru_hits = hot.iter().filter(|&&b| lru.access(b)).count();
        println!(
            "hot set after a 2x scan: S3-FIFO {} / {} hits, exact LRU {lru_hits}",
            hot.len(),
            hot.len()
        );
    });
}

/// YCSB's `ZipfianGenerator` (Gray et al., "Quickly generating billion-record synthetic
/// databases"): item 0 is the most popular, item `i` has probability ∝ 1 / (i + 1)^θ.
struct Zipfian {
    items: u64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
    rng: SimRng,
}

impl Zipfian {
    fn new(items: u64, theta: f64, seed: u64) -> Self {
        let zeta = |n: u64| (1..=n).map(|i| 1.0 / (i as f64).powf(theta)).sum::<f64>();
        let zetan = zeta(items);
        let zeta2theta = zeta(2);
        let eta = (1.0 - (2.0 / items as f64).powf(1.0 - theta)) / (1.0 - zeta2theta / zetan);
        Zipfian { items, theta, alpha: 1.0 / (1.0 - theta), zetan, eta, rng: SimRng::new(seed) }
    }

    fn next(&mut self) -> u64 {
        let u = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1;
        }
        let item = (self.items as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        item.min(self.items - 1)
    }
}

/// An exact LRU of `capacity` blocks: a hash map into an intrusive doubly linked list.
struct Lru {
    capacity: usize,
    index: HashMap<u64, usize>,
    block: Vec<u64>,
    prev: Vec<usize>,
    next: Vec<usize>,
    head: usize,
    tail: usize,
}

const NIL: usize = usize::MAX;

impl Lru {
    fn new(capacity: usize) -> Self {
        Lru {
            capacity,
            index: HashMap::with_capacity(capacity),
            block: Vec::with_capacity(capacity),
            prev: Vec::with_capacity(capacity),
            next: Vec::with_capacity(capacity),
            head: NIL,
            tail: NIL,
        }
    }

    fn unlink(&mut self, slot: usize) {
        let (p, n) = (self.prev[slot], self.next[slot]);
        if p == NIL {
            self.head = n
        } else {
            self.next[p] = n
        }
        if n == NIL {
            self.tail = p
        } else {
            self.prev[n] = p
        }
    }

    fn push_front(&mut self, slot: usize) {
        self.prev[slot] = NIL;
        self.next[slot] = self.head;
        if self.head != NIL {
            self.prev[self.head] = slot;
        }
        self.head = slot;
        if self.tail == NIL {
            self.tail = slot;
        }
    }

    /// Accesses `block`; returns whether it was a hit.
    fn access(&mut self, block: u64) -> bool {
        if let Some(&slot) = self.index.get(&block) {
            self.unlink(slot);
            self.push_front(slot);
            return true;
        }
        let slot = if self.block.len() < self.capacity {
            self.block.push(block);
            self.prev.push(NIL);
            self.next.push(NIL);
            self.block.len() - 1
        } else {
            let victim = self.tail;
            self.unlink(victim);
            self.index.remove(&self.block[victim]);
            self.block[victim] = block;
            victim
        };
        self.index.insert(block, slot);
        self.push_front(slot);
        false
    }
}

#[test]
fn zipfian_hit_ratio_is_at_least_exact_lrus() {
    run(async {
        let dataset = 10_000u64;
        let frames = dataset / 10;
        let warmup = 100_000;
        let measured = 300_000;
        let mut zipf = Zipfian::new(dataset, 0.99, 42);
        let trace: Vec<u64> = (0..warmup + measured).map(|_| zipf.next()).collect();

        let mut lru = Lru::new(frames as usize);
        trace[..warmup].iter().for_each(|&b| {
            lru.access(b);
        });
        let lru_hits = trace[warmup..].iter().filter(|&&b| lru.access(b)).count();
        let lru_ratio = lru_hits as f64 / measured as f64;

        let (part, _device) = partition(dataset, frames);
        let s = part.session().await;
        for &b in &trace[..warmup] {
            drop(s.read(b).await.expect("read"));
        }
        let before = part.stats();
        for &b in &trace[warmup..] {
            drop(s.read(b).await.expect("read"));
        }
        let after = part.stats();
        let (hits, misses) = (after.hits - before.hits, after.misses - before.misses);
        assert_eq!(hits + misses, measured as u64);
        let ratio = hits as f64 / measured as f64;
        println!(
            "zipf 0.99, {dataset} blocks, cache {frames} frames (10 %), {measured} reads after \
             {warmup} warm-up: corebuf S3-FIFO hit ratio {:.2} %, exact LRU {:.2} % ({:+.2} points)",
            100.0 * ratio,
            100.0 * lru_ratio,
            100.0 * (ratio - lru_ratio)
        );
        assert!(ratio >= lru_ratio, "S3-FIFO {ratio:.4} below exact LRU {lru_ratio:.4}");
    });
}
