//! Operation streams: key distributions, read / write mixes, key spaces and who runs what.
//!
//! Every worker (a task on a shard, a task on a raw executor, a baseline thread) draws from its
//! own deterministic [`Stream`], seeded from the run's seed, the phase, its group and its task.
//! Runners with the same [`Layout`] therefore replay exactly the same operations per worker.
//!
//! Three rules shape the streams:
//! 1. In `local` mode a worker of shard `s` draws only blocks that `s` owns (its [`Keyspace`]);
//!    otherwise every worker draws from the whole dataset.
//! 2. A trace is replayed in its order: the workers sharing a key space take its operations
//!    from one cursor, so up to `workers` consecutive operations are in flight at once.
//! 3. With `--verify`, and always for a trace, two operations on one block are never in flight
//!    at once: a worker claims the block first (and waits while another worker holds it). So
//!    every block's versions are written in order and the latest one is known exactly, on
//!    every path (a cache serialises accesses itself, raw `O_DIRECT` and pread do not). The
//!    streams are the same with and without `--verify`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use corebuf::Router;
use corebuf_shard::rng::SimRng;
use serde::Serialize;

use crate::zipf::Zipfian;

/// The key distribution.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dist {
    /// Every key equally likely.
    Uniform,
    /// YCSB's scrambled zipfian with constant θ.
    Zipf {
        /// The zipfian constant.
        theta: f64,
    },
    /// Keys in order from a per-worker start, wrapping.
    Sequential,
    /// A share `hot_ops` of operations on the first `hot_blocks` share of the keys.
    HotSet {
        /// Share of operations on the hot keys, 0..=1.
        hot_ops: f64,
        /// Share of keys that are hot, (0, 1].
        hot_blocks: f64,
    },
}

/// The mix of operation kinds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Mix {
    /// Share of reads; the rest are writes (or read-modify-writes).
    pub read_ratio: f64,
    /// Whether the non-reads are read-modify-writes (YCSB F) rather than whole-block writes.
    pub rmw: bool,
}

/// What an operation does to its block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum OpKind {
    /// Read the block.
    Read,
    /// Overwrite the whole block.
    Write,
    /// Read the block, then write it (YCSB F, or a partial write of a trace).
    Rmw,
}

/// One operation on one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Op {
    /// The block number.
    pub block: u64,
    /// The kind.
    pub kind: OpKind,
}

impl Op {
    /// Whether the operation writes its block.
    pub fn writes(&self) -> bool {
        self.kind != OpKind::Read
    }
}

/// The blocks a worker draws from, numbered `0..len`.
#[derive(Clone, Debug)]
pub enum Keyspace {
    /// Every block of the dataset: key = block.
    Whole(u64),
    /// The blocks of some routing ranges, in order (a partial last range comes last).
    Ranges {
        /// Range numbers (block / range_blocks).
        ranges: Arc<[u64]>,
        /// Blocks per range.
        range_blocks: u64,
        /// Blocks in total.
        len: u64,
    },
}

impl Keyspace {
    /// The blocks `shard` owns under `router`, out of `dataset_blocks`.
    pub fn owned(router: &Router, shard: usize, dataset_blocks: u64) -> Keyspace {
        let rb = router.range_blocks();
        let full = dataset_blocks / rb;
        let mut ranges: Vec<u64> =
            (0..full).filter(|&r| router.shard_of(r * rb) == shard).collect();
        let mut len = ranges.len() as u64 * rb;
        if !dataset_blocks.is_multiple_of(rb) && router.shard_of(full * rb) == shard {
            ranges.push(full);
            len += dataset_blocks % rb;
        }
        Keyspace::Ranges { ranges: ranges.into(), range_blocks: rb, len }
    }

    /// Keys in the space.
    pub fn len(&self) -> u64 {
        match self {
            Keyspace::Whole(n) => *n,
            Keyspace::Ranges { len, .. } => *len,
        }
    }

    /// The block of key `key` (< len).
    #[inline]
    pub fn block(&self, key: u64) -> u64 {
        match self {
            Keyspace::Whole(_) => key,
            Keyspace::Ranges { ranges, range_blocks, .. } => {
                ranges[(key / range_blocks) as usize] * range_blocks + key % range_blocks
            }
        }
    }
}

/// A worker's place among the workers sharing its key space (where a sequential walk or a
/// prefill starts, and its stride).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place {
    /// This worker's index among the workers sharing its key space.
    pub index: u64,
    /// How many workers share the key space.
    pub count: u64,
}

enum Sampler {
    Uniform,
    Zipf(Zipfian),
    Sequential { next: u64 },
    HotSet { hot_ops: f64, hot_len: u64 },
}

/// A generated stream of operations.
pub struct GenStream {
    sampler: Sampler,
    keyspace: Keyspace,
    mix: Mix,
    rng: SimRng,
}

impl GenStream {
    #[inline]
    fn unit(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    #[inline]
    fn key(&mut self) -> u64 {
        let len = self.keyspace.len();
        match self.sampler {
            Sampler::Uniform => self.rng.below(len),
            Sampler::Zipf(z) => {
                let u = self.unit();
                z.key(u)
            }
            Sampler::Sequential { ref mut next } => {
                let key = *next;
                *next = if key + 1 == len { 0 } else { key + 1 };
                key
            }
            Sampler::HotSet { hot_ops, hot_len } => {
                if hot_len >= len || self.rng.chance(hot_ops) {
                    self.rng.below(hot_len.min(len))
                } else {
                    hot_len + self.rng.below(len - hot_len)
                }
            }
        }
    }

    /// The next operation.
    #[inline]
    pub fn next_op(&mut self) -> Op {
        let key = self.key();
        let read = self.mix.read_ratio >= 1.0 || self.rng.chance(self.mix.read_ratio);
        let kind = match (read, self.mix.rmw) {
            (true, _) => OpKind::Read,
            (false, false) => OpKind::Write,
            (false, true) => OpKind::Rmw,
        };
        Op { block: self.keyspace.block(key), kind }
    }
}

/// A trace's operations shared by the workers that replay them, in order.
#[derive(Debug)]
pub struct TraceCursor {
    ops: Arc<[Op]>,
    next: AtomicUsize,
}

impl TraceCursor {
    /// A cursor at the start of `ops`.
    pub fn new(ops: Arc<[Op]>) -> Arc<TraceCursor> {
        Arc::new(TraceCursor { ops, next: AtomicUsize::new(0) })
    }

    fn next_op(&self) -> Option<Op> {
        self.ops.get(self.next.fetch_add(1, Ordering::Relaxed)).copied()
    }
}

/// A worker's operations: generated, a share of a trace, or a one-pass read of its blocks.
pub enum Stream {
    /// Generated, endless.
    Gen(Box<GenStream>),
    /// The next operations of a trace.
    Trace(Arc<TraceCursor>),
    /// Reads keys `next, next + step, ...` of a key space once (cache prefill).
    Prefill {
        /// The key space.
        keyspace: Keyspace,
        /// The next key.
        next: u64,
        /// The stride (the number of workers sharing the key space).
        step: u64,
    },
}

/// One flag per block: set while an operation on the block is in flight (rule 3).
pub type Claims = Arc<[AtomicBool]>;

/// A stream with an optional budget of operations, and the claim table when operations on a
/// block must not overlap.
pub struct Bounded {
    stream: Stream,
    remaining: Option<u64>,
    claims: Option<Claims>,
}

impl std::fmt::Debug for Bounded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bounded").field("remaining", &self.remaining).finish_non_exhaustive()
    }
}

impl Bounded {
    /// `stream`, ending after `budget` operations if given, claiming blocks in `claims`.
    pub fn new(stream: Stream, budget: Option<u64>, claims: Option<Claims>) -> Self {
        Bounded { stream, remaining: budget, claims }
    }

    /// The next operation, or `None` at the end of the stream or the budget.
    #[inline]
    pub fn next_op(&mut self) -> Option<Op> {
        if let Some(remaining) = &mut self.remaining {
            if *remaining == 0 {
                return None;
            }
            *remaining -= 1;
        }
        match &mut self.stream {
            Stream::Gen(g) => Some(g.next_op()),
            Stream::Trace(cursor) => cursor.next_op(),
            Stream::Prefill { keyspace, next, step } => {
                if *next >= keyspace.len() {
                    return None;
                }
                let block = keyspace.block(*next);
                *next += *step;
                Some(Op { block, kind: OpKind::Read })
            }
        }
    }
}

impl Bounded {
    /// Claims `block` for one operation (always granted without a claim table); false while
    /// another worker's operation on it is in flight.
    #[inline]
    pub fn claim(&self, block: u64) -> bool {
        self.claims.as_ref().is_none_or(|claims| {
            let flag = &claims[block as usize];
            flag.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok()
        })
    }

    /// Releases a claim.
    #[inline]
    pub fn release(&self, block: u64) {
        if let Some(claims) = &self.claims {
            claims[block as usize].store(false, Ordering::Release);
        }
    }
}

/// Which part of a side's run a stream belongs to (it seeds the stream).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Read every block once.
    Prefill,
    /// Untimed, same workload.
    Warmup,
    /// Timed.
    Measure,
}

/// How a runner's workers are arranged: `groups` (shards, executors or threads) of `tasks`
/// workers, each group drawing from one key space.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Groups.
    pub groups: usize,
    /// Workers per group.
    pub tasks: usize,
    /// The key space of each group (an index into `keyspaces`).
    pub keyspace_of_group: Vec<usize>,
    /// The distinct key spaces.
    pub keyspaces: Vec<Keyspace>,
}

impl Layout {
    /// Workers in all.
    pub fn workers(&self) -> usize {
        self.groups * self.tasks
    }

    /// Worker `(group, task)`'s place among the workers sharing its key space.
    pub fn place(&self, group: usize, task: usize) -> Place {
        let ks = self.keyspace_of_group[group];
        let sharing: Vec<usize> =
            (0..self.groups).filter(|&g| self.keyspace_of_group[g] == ks).collect();
        let position = sharing.iter().position(|&g| g == group).expect("group shares its own");
        Place {
            index: (position * self.tasks + task) as u64,
            count: (sharing.len() * self.tasks) as u64,
        }
    }

    /// The key space of a group.
    pub fn keyspace(&self, group: usize) -> &Keyspace {
        &self.keyspaces[self.keyspace_of_group[group]]
    }
}

/// Everything that turns settings into streams for any layout.
pub struct Plan {
    /// The dataset's block count.
    pub dataset_blocks: u64,
    dist: Dist,
    mix: Mix,
    seed: u64,
    router: Router,
    trace: Option<Arc<[Op]>>,
    exclusive: bool,
    zipf: std::sync::Mutex<HashMap<u64, Zipfian>>,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan").field("dist", &self.dist).field("mix", &self.mix).finish()
    }
}

impl Plan {
    /// A plan over `dataset_blocks` blocks routed like an engine with `shards` shards.
    pub fn new(
        dataset_blocks: u64,
        shards: usize,
        range_blocks: u64,
        dist: Dist,
        mix: Mix,
        seed: u64,
        trace: Option<Arc<[Op]>>,
    ) -> Plan {
        Plan {
            dataset_blocks,
            dist,
            mix,
            seed,
            router: Router::new(shards, range_blocks),
            trace,
            exclusive: false,
            zipf: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Makes operations on one block exclusive (rule 3), as `--verify` needs.
    pub fn exclusive(mut self, on: bool) -> Plan {
        self.exclusive = on;
        self
    }

    /// The router the plan uses for `local` key spaces.
    #[cfg(test)]
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// `groups × tasks` workers; with `local` (and at least one group per shard), group `g`
    /// draws from shard `g mod shards`'s blocks, else from the whole dataset. Fails when some
    /// shard owns no block.
    pub fn layout(&self, local: bool, groups: usize, tasks: usize) -> crate::error::Result<Layout> {
        let shards = self.router.shards();
        // Fewer groups than shards cannot cover every shard's blocks: draw from the whole set.
        let layout = if local && groups >= shards {
            let keyspaces: Vec<Keyspace> = (0..shards)
                .map(|s| Keyspace::owned(&self.router, s, self.dataset_blocks))
                .collect();
            Layout {
                groups,
                tasks,
                keyspace_of_group: (0..groups).map(|g| g % shards).collect(),
                keyspaces,
            }
        } else {
            Layout {
                groups,
                tasks,
                keyspace_of_group: vec![0; groups],
                keyspaces: vec![Keyspace::Whole(self.dataset_blocks)],
            }
        };
        if let Some(g) = (0..groups).find(|&g| layout.keyspace(g).len() == 0) {
            return Err(crate::error::BenchError::Usage(format!(
                "shard {} owns no block of the dataset: use a larger --dataset or a smaller \
                 --range-blocks",
                g % shards
            )));
        }
        Ok(layout)
    }

    /// `shards × tasks` workers where group `g` (run on shard `g`) draws only from the blocks
    /// of shard `g + 1` (mod shards): every operation crosses to another shard.
    pub fn layout_remote(&self, tasks: usize) -> crate::error::Result<Layout> {
        let shards = self.router.shards();
        let keyspaces: Vec<Keyspace> =
            (0..shards).map(|s| Keyspace::owned(&self.router, s, self.dataset_blocks)).collect();
        let layout = Layout {
            groups: shards,
            tasks,
            keyspace_of_group: (0..shards).map(|g| (g + 1) % shards).collect(),
            keyspaces,
        };
        if let Some(g) = (0..shards).find(|&g| layout.keyspace(g).len() == 0) {
            return Err(crate::error::BenchError::Usage(format!(
                "shard {} owns no block of the dataset: use a larger --dataset or a smaller \
                 --range-blocks",
                (g + 1) % shards
            )));
        }
        Ok(layout)
    }

    fn zipfian(&self, n: u64, theta: f64) -> Zipfian {
        let mut cache = self.zipf.lock().expect("no panic while holding the zipf cache");
        *cache.entry(n).or_insert_with(|| Zipfian::new(n, theta))
    }

    fn seed_of(&self, phase: Phase, group: usize, task: usize) -> u64 {
        let mut rng =
            SimRng::new(self.seed ^ ((phase as u64) << 56) ^ ((group as u64) << 24) ^ task as u64);
        rng.next_u64()
    }

    /// The streams of every worker, `[group][task]`, for `phase`, with the total budget of
    /// operations (if any) split evenly.
    pub fn streams(
        &self,
        layout: &Layout,
        phase: Phase,
        total_ops: Option<u64>,
    ) -> Vec<Vec<Bounded>> {
        let workers = layout.workers() as u64;
        let claims: Option<Claims> = (self.exclusive || self.trace.is_some())
            .then(|| (0..self.dataset_blocks).map(|_| AtomicBool::new(false)).collect());
        let cursors = match (phase, &self.trace) {
            (Phase::Prefill, _) | (_, None) => None,
            (_, Some(ops)) => Some(self.trace_cursors(layout, ops)),
        };
        (0..layout.groups)
            .map(|g| {
                (0..layout.tasks)
                    .map(|t| {
                        let w = (g * layout.tasks + t) as u64;
                        let budget = total_ops.map(|n| n / workers + u64::from(w < n % workers));
                        let stream = match (&cursors, phase) {
                            (_, Phase::Prefill) => self.prefill_stream(layout, g, t),
                            (Some(cursors), _) => {
                                Stream::Trace(Arc::clone(&cursors[layout.keyspace_of_group[g]]))
                            }
                            (None, _) => self.gen_stream(layout, phase, g, t),
                        };
                        Bounded::new(stream, budget, claims.clone())
                    })
                    .collect()
            })
            .collect()
    }

    fn prefill_stream(&self, layout: &Layout, group: usize, task: usize) -> Stream {
        let place = layout.place(group, task);
        Stream::Prefill {
            keyspace: layout.keyspace(group).clone(),
            next: place.index,
            step: place.count,
        }
    }

    /// A generated stream for worker `(group, task)`.
    pub fn gen_stream(&self, layout: &Layout, phase: Phase, group: usize, task: usize) -> Stream {
        let keyspace = layout.keyspace(group).clone();
        let place = layout.place(group, task);
        let len = keyspace.len();
        let sampler = match self.dist {
            Dist::Uniform => Sampler::Uniform,
            Dist::Zipf { theta } => Sampler::Zipf(self.zipfian(len, theta)),
            Dist::Sequential => Sampler::Sequential { next: len * place.index / place.count },
            Dist::HotSet { hot_ops, hot_blocks } => Sampler::HotSet {
                hot_ops,
                hot_len: ((len as f64 * hot_blocks).round() as u64).clamp(1, len),
            },
        };
        let rng = SimRng::new(self.seed_of(phase, group, task));
        Stream::Gen(Box::new(GenStream { sampler, keyspace, mix: self.mix, rng }))
    }

    /// One cursor per key space over the trace's operations in that key space, in trace order.
    fn trace_cursors(&self, layout: &Layout, ops: &[Op]) -> Vec<Arc<TraceCursor>> {
        let mut per_keyspace: Vec<Vec<Op>> = vec![Vec::new(); layout.keyspaces.len()];
        for &op in ops {
            let ks = if layout.keyspaces.len() == 1 { 0 } else { self.router.shard_of(op.block) };
            per_keyspace[ks].push(op);
        }
        per_keyspace.into_iter().map(|ops| TraceCursor::new(ops.into())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(blocks: u64, dist: Dist, read_ratio: f64) -> Plan {
        Plan::new(blocks, 2, 16, dist, Mix { read_ratio, rmw: false }, 7, None).exclusive(true)
    }

    fn draw(plan: &Plan, local: bool, n: usize) -> Vec<Op> {
        let layout = plan.layout(local, 2, 1).unwrap();
        let mut streams = plan.streams(&layout, Phase::Measure, None);
        (0..n).map(|_| streams[0][0].next_op().unwrap()).collect()
    }

    #[test]
    fn uniform_covers_every_block_evenly() {
        let blocks = 1000;
        let ops = draw(&plan(blocks, Dist::Uniform, 1.0), false, 200_000);
        let mut counts = vec![0u32; blocks as usize];
        for op in &ops {
            counts[op.block as usize] += 1;
        }
        // Expected 200 per block; a binomial's 5-sigma band is about ±70.
        assert!(counts.iter().all(|&c| (130..=270).contains(&c)), "{:?}", counts.iter().minmax());
    }

    trait MinMax {
        fn minmax(self) -> (u32, u32);
    }
    impl<'a, I: Iterator<Item = &'a u32>> MinMax for I {
        fn minmax(self) -> (u32, u32) {
            self.fold((u32::MAX, 0), |(lo, hi), &c| (lo.min(c), hi.max(c)))
        }
    }

    #[test]
    fn hot_set_sends_x_percent_of_ops_to_y_percent_of_blocks() {
        let blocks = 10_000;
        let dist = Dist::HotSet { hot_ops: 0.8, hot_blocks: 0.05 };
        let ops = draw(&plan(blocks, dist, 1.0), false, 200_000);
        let hot = ops.iter().filter(|op| op.block < 500).count() as f64 / ops.len() as f64;
        assert!((hot - 0.8).abs() < 0.01, "hot share {hot}");
        let distinct_hot: std::collections::HashSet<u64> =
            ops.iter().filter(|op| op.block < 500).map(|op| op.block).collect();
        assert_eq!(distinct_hot.len(), 500, "every hot block is used");
        let cold_max = ops.iter().map(|op| op.block).max().unwrap();
        assert!(cold_max >= 9_990, "cold blocks reach the end of the dataset");
    }

    #[test]
    fn local_streams_stay_on_their_shard_and_claims_exclude_each_other() {
        let p = plan(4096, Dist::Uniform, 0.5);
        let layout = p.layout(true, 2, 4).unwrap();
        let mut streams = p.streams(&layout, Phase::Measure, None);
        for (g, group) in streams.iter_mut().enumerate() {
            for stream in group.iter_mut() {
                for _ in 0..5_000 {
                    let op = stream.next_op().unwrap();
                    let owner = p.router().shard_of(op.block);
                    assert_eq!(owner, g, "block {} off shard {g}", op.block);
                }
            }
        }
        // Every stream of the phase shares one claim table.
        let (a, b) = (&streams[0][0], &streams[1][3]);
        assert!(a.claim(17));
        assert!(!b.claim(17), "a claimed block is refused to another worker");
        assert!(b.claim(18));
        a.release(17);
        assert!(b.claim(17));
        let unclaimed = plan(64, Dist::Uniform, 0.5).exclusive(false);
        let layout = unclaimed.layout(false, 1, 2).unwrap();
        let s = unclaimed.streams(&layout, Phase::Measure, None);
        assert!(s[0][0].claim(5) && s[0][1].claim(5), "no claims without --verify or a trace");
    }

    #[test]
    fn keyspaces_partition_the_dataset() {
        let router = Router::new(3, 16);
        let blocks = 1000; // not a multiple of 16: a partial last range
        let mut seen = vec![0u8; blocks as usize];
        for s in 0..3 {
            let ks = Keyspace::owned(&router, s, blocks);
            for key in 0..ks.len() {
                let b = ks.block(key);
                assert_eq!(router.shard_of(b), s);
                seen[b as usize] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n == 1));
    }

    #[test]
    fn budgets_split_the_total_and_prefill_reads_each_block_once() {
        let p = plan(1000, Dist::Uniform, 1.0);
        let layout = p.layout(true, 2, 3).unwrap();
        let mut streams = p.streams(&layout, Phase::Measure, Some(100));
        let total: usize =
            streams.iter_mut().flatten().map(|s| std::iter::from_fn(|| s.next_op()).count()).sum();
        assert_eq!(total, 100);
        let mut prefill = p.streams(&layout, Phase::Prefill, None);
        let mut blocks: Vec<u64> = prefill
            .iter_mut()
            .flatten()
            .flat_map(|s| std::iter::from_fn(|| s.next_op()))
            .map(|o| o.block)
            .collect();
        blocks.sort_unstable();
        assert_eq!(blocks, (0..1000).collect::<Vec<_>>());
    }
}
