//! The named scenarios of DESIGN §6: each runs corebuf and the right baseline in one process
//! and reports the ratio against its target. The user's shards, in-flight count, length,
//! seed, `--verify` and `--fio` carry over; sizes and workload are the scenario's own.

use crate::app::{compare, Env};
use crate::args::{Baseline, Length, PathMode, Scenario, Settings};
use crate::error::Result;
use crate::report::{self, Comparison, Ratio};
use crate::workload::{Dist, Mix};

const MIB: u64 = 1 << 20;

/// The hit scenarios replay rings of this many pre-generated operations per worker and time
/// one operation in [`HIT_SAMPLE_EVERY`]: at tens of nanoseconds per hit, YCSB's `pow()` and
/// two clock reads per operation would be a third of what is measured. Every side of the
/// comparison (and the LRU simulation) runs the same loop over the same rings.
const HIT_RING_OPS: usize = 1 << 15;
/// See [`HIT_RING_OPS`].
const HIT_SAMPLE_EVERY: u64 = 16;
/// Rounds of the miss scenario (corebuf and raw io_uring in turn; the median is reported).
const MISS_ROUNDS: usize = 5;

/// Runs `which` (every scenario for `All`), printing each comparison as it completes.
pub fn run(
    which: Scenario,
    base: &Settings,
    env: &Env,
    smoke: bool,
    length_given: bool,
) -> Result<Vec<Comparison>> {
    let all = [
        Scenario::Miss,
        Scenario::Hit,
        Scenario::Scaling,
        Scenario::Write,
        Scenario::Hitratio,
        Scenario::Memory,
        Scenario::Messages,
    ];
    let list: Vec<Scenario> = if which == Scenario::All { all.to_vec() } else { vec![which] };
    let mut base = base.clone();
    if !length_given {
        base.length = Length::Seconds(if smoke { 1.0 } else { 4.0 });
    }
    let scale = if smoke { 8 } else { 1 };
    let mut out = Vec::new();
    for scenario in list {
        for comparison in one(scenario, &base, env, scale)? {
            report::print(&comparison);
            out.push(comparison);
        }
    }
    Ok(out)
}

/// The base settings with a scenario's sizes, workload and baselines.
fn shaped(
    base: &Settings,
    dataset: u64,
    cache: u64,
    dist: Dist,
    read_ratio: f64,
    baselines: &[Baseline],
) -> Settings {
    let mut s = base.clone();
    s.dataset_blocks = dataset / s.block_size as u64;
    s.cache_bytes = cache;
    s.dist = dist;
    s.mix = Mix { read_ratio, rmw: false };
    s.trace = None;
    s.path_mode = PathMode::Local;
    s.baselines = baselines.to_vec();
    s.flush_every = None;
    s.rate = None;
    s.warmup_secs = 0.0;
    s.prefill = false;
    s
}

fn side<'c>(c: &'c Comparison, name: &str) -> Option<&'c report::SideReport> {
    c.sides.iter().find(|s| s.side == name)
}

fn one(scenario: Scenario, base: &Settings, env: &Env, scale: u64) -> Result<Vec<Comparison>> {
    let zipf = Dist::Zipf { theta: 0.99 };
    let comparisons = match scenario {
        Scenario::Miss => {
            let mut s = shaped(
                base,
                512 * MIB / scale,
                64 * MIB / scale,
                Dist::Uniform,
                1.0,
                &[Baseline::Raw],
            );
            // The disk's speed drifts by ±30 % within seconds here: alternate the sides.
            s.rounds = s.rounds.or(Some(if scale > 1 { 1 } else { MISS_ROUNDS }));
            let mut c = compare("miss path: uniform random reads, dataset 8x cache", &s, env)?;
            let raw = side(&c, "raw-io_uring").and_then(|r| r.device_iops);
            if let (Some(core), Some(raw)) = (c.sides[0].device_iops, raw) {
                c.ratios.extend(
                    Ratio::of("target: corebuf device IOPS / raw io_uring IOPS", core, raw)
                        .map(|r| r.at_least(0.95)),
                );
            }
            vec![c]
        }
        Scenario::Hit => vec![hit(base, env, scale, base.shards, true)?],
        Scenario::Scaling => {
            let one_shard = hit(base, env, scale, 1, false)?;
            let two = hit(base, env, scale, 2, false)?;
            let mut two = two;
            two.ratios.extend(
                Ratio::of(
                    "target: hit path ops/s, 2 shards / 1 shard",
                    two.sides[0].ops_per_sec,
                    one_shard.sides[0].ops_per_sec,
                )
                .map(|r| r.at_least(1.8)),
            );
            vec![one_shard, two]
        }
        Scenario::Write => {
            let mut s = shaped(
                base,
                512 * MIB / scale,
                64 * MIB / scale,
                Dist::Uniform,
                0.0,
                &[Baseline::Raw],
            );
            s.flush_every = Some(10_000);
            let mut c = compare("write path: random writes, a barrier every 10k writes", &s, env)?;
            if let Some(raw) = side(&c, "raw-io_uring").map(|r| r.ops_per_sec) {
                c.ratios.extend(
                    Ratio::of(
                        "target: corebuf writes/s / raw random-write IOPS",
                        c.sides[0].ops_per_sec,
                        raw,
                    )
                    .map(|r| r.at_least(0.8)),
                );
            }
            vec![c]
        }
        Scenario::Hitratio => {
            let dataset = 256 * MIB / scale;
            let s = shaped(base, dataset, dataset / 10, zipf, 1.0, &[Baseline::Lru]);
            let mut c = compare("hit ratio: zipf 0.99, cache = 10% of dataset", &s, env)?;
            let core = &c.sides[0];
            if let (Some(h), Some(l)) = (core.hit_ratio, core.lru_sim_hit_ratio) {
                let r = Ratio::figure(
                    "target: corebuf hit% - exact LRU hit% (points)",
                    (h - l) * 100.0,
                    "points",
                );
                c.ratios.push(r.at_least(3.0));
            }
            vec![c]
        }
        Scenario::Memory => {
            let cache = 256 * MIB / scale;
            let mut s = shaped(base, 2 * cache, cache, Dist::Uniform, 0.9, &[]);
            // Read every block once first so every frame is touched before RSS is measured.
            s.prefill = true;
            let mut c = compare("memory: peak RSS against cache x 1.05 + 64 MiB", &s, env)?;
            let bound = cache as f64 * 1.05 + 64.0 * MIB as f64;
            let peak = c.sides[0].rss_peak_bytes as f64;
            c.ratios.push(
                Ratio::figure(
                    "target: corebuf peak RSS / (cache x 1.05 + 64 MiB)",
                    peak / bound,
                    "x",
                )
                .at_most(1.0),
            );
            vec![c]
        }
        Scenario::Messages => vec![messages(base, env, scale)?],
        Scenario::All | Scenario::Default => unreachable!("dispatched by the caller"),
    };
    Ok(comparisons)
}

/// The hit path: the dataset fits the cache (half of it), zipf 0.99 reads, local, prefilled.
/// With `full`, the synchronous `get` side and the pread baseline (equal memory) run too.
fn hit(base: &Settings, env: &Env, scale: u64, shards: usize, full: bool) -> Result<Comparison> {
    let baselines: &[Baseline] = if full { &[Baseline::Pread] } else { &[] };
    let mut s = shaped(
        base,
        128 * MIB / scale,
        256 * MIB / scale,
        Dist::Zipf { theta: 0.99 },
        1.0,
        baselines,
    );
    s.shards = shards;
    s.baseline_threads = shards;
    s.prefill = true;
    s.corebuf_get = full;
    s.ring_ops = Some(HIT_RING_OPS);
    s.sample_every = HIT_SAMPLE_EVERY;
    let title =
        format!("hit path: dataset fits the cache, zipf 0.99 reads, local, {shards} shard(s)");
    let mut c = compare(&title, &s, env)?;
    let per_shard = |side: &report::SideReport| side.ops_per_sec / shards as f64;
    let mut targets = Vec::new();
    if let Some(get) = side(&c, "corebuf-get") {
        targets.push(
            Ratio::figure(
                "target: corebuf-get (sync get) hits/s per shard",
                per_shard(get),
                "ops/s",
            )
            .at_least(20e6),
        );
    }
    let read = &c.sides[0];
    targets.push(
        Ratio::figure("target: corebuf (async read) hits/s per shard", per_shard(read), "ops/s")
            .at_least(10e6),
    );
    for name in ["corebuf-get", "corebuf", "pread"] {
        if let Some(x) = side(&c, name).filter(|x| x.ops_per_sec > 0.0) {
            let ns = 1e9 / per_shard(x);
            targets.push(Ratio::figure(format!("{name}: ns per hit per shard"), ns, "ns"));
            // The same per CPU-second of the shard's (or pread thread's) own thread: what a
            // core to itself would give, whatever else runs on this machine.
            if x.ops_per_cpu_sec > 0.0 {
                let cpu_ns = 1e9 / x.ops_per_cpu_sec;
                targets.push(Ratio::figure(
                    format!("{name}: hits per CPU-second ({cpu_ns:.1} ns of CPU per hit)"),
                    x.ops_per_cpu_sec,
                    "ops/s",
                ));
            }
        }
    }
    if let Some(pread) = side(&c, "pread") {
        let what = match pread.memory_limit_bytes {
            Some(_) => "target: corebuf hits/s / pread hits/s (equal memory)",
            None => "target: corebuf hits/s / pread hits/s (pread NOT memory-limited)",
        };
        targets
            .extend(Ratio::of(what, read.ops_per_sec, pread.ops_per_sec).map(|r| r.at_least(8.0)));
        targets.extend(Ratio::of(
            "corebuf hits per CPU-second / pread hits per CPU-second",
            read.ops_per_cpu_sec,
            pread.ops_per_cpu_sec,
        ));
    }
    c.ratios.extend(targets);
    Ok(c)
}

/// The cost of a message: the same all-hit workload (dataset half the cache, zipf 0.99 reads,
/// prefilled) through the local partition, through another shard at 32 and at 1 in flight,
/// and through `Client` futures at 32 and at 1 in flight; one table, ratios to local.
fn messages(base: &Settings, env: &Env, scale: u64) -> Result<Comparison> {
    let mut s =
        shaped(base, 128 * MIB / scale, 256 * MIB / scale, Dist::Zipf { theta: 0.99 }, 1.0, &[]);
    s.prefill = true;
    if s.shards < 2 {
        s.shards = 2;
    }
    let runs: [(&str, PathMode, usize, usize); 5] = [
        ("corebuf-local", PathMode::Local, base.inflight, s.shards),
        ("corebuf-remote", PathMode::Remote, 32, s.shards),
        ("corebuf-remote-1", PathMode::Remote, 1, s.shards),
        ("corebuf-client", PathMode::Client, 32, s.shards),
        ("corebuf-client-1", PathMode::Client, 1, 1),
    ];
    let mut summary: Option<Comparison> = None;
    for (name, mode, inflight, client_threads) in runs {
        let mut run = s.clone();
        run.path_mode = mode;
        run.inflight = inflight;
        run.client_threads = client_threads;
        let title = format!("messages: {name} ({inflight} in flight)");
        let mut c = compare(&title, &run, env)?;
        let mut side = c.sides.remove(0);
        side.side = name.to_string();
        match summary.as_mut() {
            Some(sum) => sum.sides.push(side),
            None => {
                c.title = format!(
                    "messages: all hits, zipf 0.99, {} shards: local, remote, Client",
                    s.shards
                );
                c.sides = vec![side];
                c.ratios.clear();
                summary = Some(c);
            }
        }
    }
    let mut c = summary.expect("five runs");
    let ops = |name: &str| side(&c, name).map_or(0.0, |r| r.ops_per_sec);
    let latency = |name: &str| side(&c, name).map(|r| r.latency);
    let local = ops("corebuf-local");
    let mut ratios = Vec::new();
    ratios.extend(
        Ratio::of(
            "target: remote hits/s (32 in flight) / local hits/s",
            ops("corebuf-remote"),
            local,
        )
        .map(|r| r.at_least(0.40)),
    );
    ratios.extend(
        Ratio::of(
            "target: Client hits/s (32 in flight) / local hits/s",
            ops("corebuf-client"),
            local,
        )
        .map(|r| r.at_least(0.15)),
    );
    if let Some(l) = latency("corebuf-remote-1") {
        ratios.push(
            Ratio::figure("target: remote read at 1 in flight, p50", l.p50_us, "us").at_most(5.0),
        );
        ratios.push(
            Ratio::figure("target: remote read at 1 in flight, p99", l.p99_us, "us").at_most(50.0),
        );
    }
    if let Some(l) = latency("corebuf-client-1") {
        ratios.push(
            Ratio::figure("target: Client read at 1 in flight, p50", l.p50_us, "us").at_most(10.0),
        );
    }
    c.ratios = ratios;
    Ok(c)
}
