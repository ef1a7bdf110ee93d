//! The command line, and its validation into [`Settings`].
//!
//! Parsing is clap's; everything clap cannot check (sizes against memory, a cache that holds
//! the whole dataset, shapes that the engine would refuse) is checked here, before any file is
//! written, so a mistake costs nothing.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::Serialize;

use crate::error::{BenchError, Result};
use crate::workload::{Dist, Mix};

/// What the run measures: the default comparison, or one of DESIGN §6's targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// The settings given on the command line, corebuf against the baselines.
    Default,
    /// Miss path: uniform random reads, dataset 8× cache; corebuf device IOPS ÷ raw io_uring.
    Miss,
    /// Hit path: the dataset fits the cache, zipf 0.99, local; corebuf (async read) and
    /// corebuf-get (sync get) ÷ buffered pread hits with equal memory.
    Hit,
    /// Hit path on 1 shard, then on 2: the speed-up.
    Scaling,
    /// Random writes with a barrier every 10 k writes; corebuf ÷ raw random-write IOPS.
    Write,
    /// Zipf 0.99 with cache = 10 % of the dataset: corebuf hit ratio − exact LRU's.
    Hitratio,
    /// Peak RSS against cache bytes × 1.05 + 64 MiB.
    Memory,
    /// Messages: local hits, remote hits at 32 and 1 in flight, `Client` calls; ratios to local.
    Messages,
    /// Every scenario above, in turn.
    All,
}

/// The generated workloads (a trace is chosen with `--trace`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadKind {
    /// Every block equally likely.
    Uniform,
    /// YCSB's scrambled zipfian over the blocks (θ from `--theta`).
    Zipf,
    /// Each task walks its blocks in order, wrapping.
    Sequential,
    /// `--hot-ops` % of operations on `--hot-blocks` % of the blocks.
    Hotset,
    /// YCSB A: zipfian, 50 % reads, 50 % updates (whole-block writes).
    YcsbA,
    /// YCSB B: zipfian, 95 % reads, 5 % updates.
    YcsbB,
    /// YCSB C: zipfian, reads only.
    YcsbC,
    /// YCSB F: zipfian, 50 % reads, 50 % read-modify-writes.
    YcsbF,
}

/// How the corebuf side reaches its blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PathMode {
    /// Each shard touches only the blocks it owns, through its partition (zero copy).
    Local,
    /// Any block from any shard, through `Shard::read` / `Shard::write` (messages).
    Cross,
    /// Every operation on a block another shard owns (messages only: the remote cost alone).
    Remote,
    /// `Client` futures from `--client-threads` plain threads, `--inflight` in flight each (an
    /// async caller, as a tokio server would be).
    Client,
    /// Blocking `Client` calls from shards × in-flight plain threads, one operation each.
    ClientBlocking,
}

/// The trace file's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TraceFormat {
    /// Decide from the first data line (7 fields: MSR, 3 fields: plain).
    Auto,
    /// MSR Cambridge: `Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime`.
    Msr,
    /// `op,offset_bytes,size_bytes` with op `r` or `w`.
    Plain,
}

/// What to do with trace blocks beyond the dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TraceFold {
    /// Refuse the trace, naming the first line that addresses beyond the dataset.
    Reject,
    /// Renumber the distinct blocks densely from 0, in order of first use.
    Dense,
    /// Block number modulo the dataset's block count.
    Modulo,
}

/// Whether the cache is filled before the timed run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Prefill {
    /// Read every block once first when the dataset fits the cache.
    Auto,
    /// Always read every block once first.
    Yes,
    /// Start cold.
    No,
}

/// A baseline that runs in the same process, on the same file, with the same settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Baseline {
    /// Raw io_uring `O_DIRECT` (glommio `DmaFile`), no cache: the device limit.
    Raw,
    /// Buffered `pread` / `pwrite` through the OS page cache, one thread per core; the page
    /// cache is limited to corebuf's cache size unless `--pread-memory whole`.
    Pread,
    /// One `Mutex`-guarded exact-LRU cache over `O_DIRECT` reads, one thread per core.
    Lru,
    /// No baseline at all.
    None,
}

/// corebuf-bench: corebuf (thread-per-core sharded block cache) against raw io_uring, buffered
/// pread and a Mutex-guarded LRU, on the same file with the same settings.
#[derive(Clone, Debug, Parser)]
#[command(name = "corebuf-bench", version, about, long_about = None)]
pub struct Args {
    /// A named measurement from DESIGN §6, or `default` for the settings below.
    #[arg(long, value_enum, default_value_t = Scenario::Default)]
    pub scenario: Scenario,
    /// A run of a few seconds on a tiny dataset (what CI runs).
    #[arg(long)]
    pub smoke: bool,
    /// The generated workload (ignored with --trace).
    #[arg(long, value_enum, default_value_t = WorkloadKind::Zipf)]
    pub workload: WorkloadKind,
    /// Share of reads among operations, 0..=1 (uniform, zipf, sequential, hotset).
    #[arg(long, default_value_t = 0.9)]
    pub read_ratio: f64,
    /// Zipfian constant θ, in (0, 1).
    #[arg(long, default_value_t = 0.99)]
    pub theta: f64,
    /// Hot-set: percentage of operations that go to the hot blocks.
    #[arg(long, default_value_t = 90.0)]
    pub hot_ops: f64,
    /// Hot-set: percentage of the blocks that are hot.
    #[arg(long, default_value_t = 10.0)]
    pub hot_blocks: f64,
    /// Replay this block trace instead of a generated workload.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// The trace's format.
    #[arg(long, value_enum, default_value_t = TraceFormat::Auto)]
    pub trace_format: TraceFormat,
    /// Trace blocks beyond the dataset: reject, renumber densely, or take modulo.
    #[arg(long, value_enum, default_value_t = TraceFold::Reject)]
    pub trace_fold: TraceFold,
    /// Block size (512 B to 64 KiB, a power of two), e.g. 4K.
    #[arg(long, default_value = "4K", value_parser = parse_size)]
    pub block_size: u64,
    /// Dataset size, e.g. 256M, 2G. Default 256M (32M with --smoke).
    #[arg(long, value_parser = parse_size)]
    pub dataset: Option<u64>,
    /// Cache size of corebuf (and of the LRU baseline), e.g. 64M. Default 64M (8M with --smoke).
    #[arg(long, value_parser = parse_size)]
    pub cache: Option<u64>,
    /// Shards (executor threads, one per core). Default: every core.
    #[arg(long)]
    pub shards: Option<usize>,
    /// Operations in flight per shard (closed loop), also the raw baseline's tasks per core.
    #[arg(long, default_value_t = 32)]
    pub inflight: usize,
    /// Seconds each side runs. Default 5 (1 with --smoke; a trace replays once).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Operations each side runs (instead of --duration).
    #[arg(long)]
    pub ops: Option<u64>,
    /// Untimed seconds of the same workload before each side's timed run.
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,
    /// Read every block once before the timed run.
    #[arg(long, value_enum, default_value_t = Prefill::Auto)]
    pub prefill: Prefill,
    /// A flush barrier every N writes (counted over all shards).
    #[arg(long)]
    pub flush_every: Option<u64>,
    /// How corebuf reaches the blocks.
    #[arg(long, value_enum, default_value_t = PathMode::Local)]
    pub path_mode: PathMode,
    /// Open loop: target operations per second over all shards (latency from intended start).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Baselines to run beside corebuf (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "raw,pread,lru")]
    pub baselines: Vec<Baseline>,
    /// Threads of the pread and LRU baselines. Default: one per shard.
    #[arg(long)]
    pub baseline_threads: Option<usize>,
    /// Also run the equivalent fio job (when fio is on PATH).
    #[arg(long)]
    pub fio: bool,
    /// Check block number, version and checksum on every read; stop at the first mismatch.
    #[arg(long)]
    pub verify: bool,
    /// Directory for the temporary dataset file (default: the current directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Use (and keep) this dataset file; reused when its size and sampled blocks are right.
    #[arg(long)]
    pub path: Option<PathBuf>,
    /// Write the machine-readable report here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Seed of every generator.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Consecutive blocks that share an owner shard.
    #[arg(long, default_value_t = 64)]
    pub range_blocks: u64,
    /// Microseconds an idle shard spins before parking (the engine's spin_before_park).
    #[arg(long, default_value_t = 0)]
    pub spin_us: u64,
    /// Microseconds an idle shard keeps polling its message rings before it sleeps (the
    /// engine's poll_before_sleep). Default: the engine's.
    #[arg(long)]
    pub poll_us: Option<u64>,
    /// Threads issuing `Client` calls in `--path-mode client`. Default: one per shard.
    #[arg(long)]
    pub client_threads: Option<usize>,
    /// Generate each worker's first N operations before the run and replay them in a loop
    /// (every side alike), so the generator costs a load per operation. 0: generate as it goes.
    #[arg(long, default_value_t = 0)]
    pub ring_ops: usize,
    /// Time one operation in N (each worker's first always): latency percentiles come from
    /// that sample; throughput counts every operation. The open loop times every operation.
    #[arg(long, default_value_t = 1)]
    pub sample_every: u64,
    /// The memory of the pread baseline: `equal` runs it in a memory cgroup limited to
    /// corebuf's cache size (as root, where the kernel has the memory controller), `whole`
    /// lets it use the whole OS page cache.
    #[arg(long, value_enum, default_value_t = PreadMemory::Equal)]
    pub pread_memory: PreadMemory,
    /// Also run the side `corebuf-get`: reads through the synchronous `Partition::get`
    /// (falling back to the async read on a miss). Local path only.
    #[arg(long)]
    pub corebuf_get: bool,
    /// Run corebuf and the baselines this many times in turn on the same dataset (corebuf
    /// first, then the baselines first, alternating) and report the median round: a shared
    /// disk's speed drifts within seconds. Default 1 (5 for `--scenario miss`).
    #[arg(long)]
    pub rounds: Option<usize>,
}

/// How much memory the pread baseline's page cache may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PreadMemory {
    /// As much as corebuf's cache (a memory cgroup limit), where it can be limited.
    Equal,
    /// The whole OS page cache.
    Whole,
}

/// What the host offers, read once (tests pass their own).
#[derive(Clone, Copy, Debug)]
pub struct Host {
    /// `MemAvailable` from /proc/meminfo, bytes.
    pub mem_available_bytes: u64,
    /// Online cores.
    pub cores: usize,
}

/// How long each side runs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Length {
    /// For this long.
    Seconds(f64),
    /// This many operations, split evenly over the workers.
    Ops(u64),
    /// Until a trace is replayed once.
    Trace,
}

/// Validated settings of one run (one scenario step).
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    /// The block size in bytes.
    pub block_size: usize,
    /// The dataset size in blocks.
    pub dataset_blocks: u64,
    /// Cache bytes of corebuf and of the LRU baseline.
    pub cache_bytes: u64,
    /// Shards.
    pub shards: usize,
    /// Operations in flight per shard.
    pub inflight: usize,
    /// Threads of the pread and LRU baselines.
    pub baseline_threads: usize,
    /// How long each side runs.
    pub length: Length,
    /// Untimed warm-up per side.
    pub warmup_secs: f64,
    /// Whether every block is read once before the timed run.
    pub prefill: bool,
    /// The key distribution.
    pub dist: Dist,
    /// The operation mix.
    pub mix: Mix,
    /// The trace, when one is replayed.
    pub trace: Option<TraceSpec>,
    /// How corebuf reaches blocks.
    pub path_mode: PathMode,
    /// Open-loop target rate (ops/s over all shards).
    pub rate: Option<f64>,
    /// A barrier every this many writes.
    pub flush_every: Option<u64>,
    /// Baselines to run.
    pub baselines: Vec<Baseline>,
    /// Whether fio runs too.
    pub fio: bool,
    /// Whether reads are verified.
    pub verify: bool,
    /// Seed of every generator.
    pub seed: u64,
    /// Blocks per routing range.
    pub range_blocks: u64,
    /// Microseconds an idle shard spins before parking.
    pub spin_us: u64,
    /// Microseconds an idle shard polls its rings before it sleeps (`None`: the engine's).
    pub poll_us: Option<u64>,
    /// Threads issuing `Client` futures in `--path-mode client`.
    pub client_threads: usize,
    /// Generated streams are rings of this many operations per worker.
    pub ring_ops: Option<usize>,
    /// One operation in this many is timed.
    pub sample_every: u64,
    /// The pread baseline's memory.
    pub pread_memory: PreadMemory,
    /// Whether the side `corebuf-get` runs too.
    pub corebuf_get: bool,
    /// Alternating rounds of every side (`None`: 1, or the scenario's own).
    pub rounds: Option<usize>,
}

/// A trace to replay.
#[derive(Clone, Debug, Serialize)]
pub struct TraceSpec {
    /// Its path.
    pub path: PathBuf,
    /// Its format.
    pub format: TraceFormat,
    /// What to do beyond the dataset.
    pub fold: TraceFold,
}

impl Settings {
    /// Bytes of the dataset.
    pub fn dataset_bytes(&self) -> u64 {
        self.dataset_blocks * self.block_size as u64
    }

    /// Blocks the cache holds.
    pub fn cache_blocks(&self) -> u64 {
        self.cache_bytes / self.block_size as u64
    }

    /// Whether the cache can hold every block of the dataset.
    pub fn cache_holds_dataset(&self) -> bool {
        self.cache_blocks() >= self.dataset_blocks
    }

    /// Checks the settings; returns notes the user should see (not errors).
    pub fn validate(&self, host: &Host) -> Result<Vec<String>> {
        let mut notes = Vec::new();
        let bs = self.block_size as u64;
        if !(512..=65536).contains(&bs) || !bs.is_power_of_two() {
            return usage(format!(
                "--block-size {bs}: must be a power of two from 512 B to 64 KiB"
            ));
        }
        if self.dataset_blocks == 0 {
            return usage("--dataset: the dataset is empty (it must hold at least one block)");
        }
        if self.shards == 0 {
            return usage("--shards 0: at least one shard is needed");
        }
        if self.inflight == 0 || self.baseline_threads == 0 || self.client_threads == 0 {
            return usage("--inflight, --baseline-threads and --client-threads must be at least 1");
        }
        if self.path_mode == PathMode::Remote && self.shards < 2 {
            return usage("--path-mode remote needs at least 2 shards (a block owned elsewhere)");
        }
        if self.path_mode == PathMode::Client && self.rate.is_some() {
            return usage(
                "--rate with --path-mode client: the async client driver runs closed loop only;                  use --path-mode client-blocking for an open loop",
            );
        }
        if self.cache_bytes > host.mem_available_bytes {
            return usage(format!(
                "--cache {}: more than this machine has available ({} in MemAvailable of \
                 /proc/meminfo)",
                human_bytes(self.cache_bytes),
                human_bytes(host.mem_available_bytes)
            ));
        }
        // The engine's deadlock rule needs 2 × pins_per_session_max (8) frames per shard.
        let per_shard = self.cache_blocks() / self.shards as u64;
        if per_shard < 16 {
            return usage(format!(
                "--cache {}: {per_shard} blocks per shard; corebuf needs at least 16 per shard",
                human_bytes(self.cache_bytes)
            ));
        }
        if !(0.0..=1.0).contains(&self.mix.read_ratio) {
            return usage("--read-ratio must be between 0 and 1");
        }
        if let Dist::Zipf { theta } = self.dist {
            if !(theta > 0.0 && theta < 1.0) {
                return usage(format!("--theta {theta}: YCSB's zipfian needs 0 < θ < 1"));
            }
        }
        if let Dist::HotSet { hot_ops, hot_blocks } = self.dist {
            if !((0.0..=1.0).contains(&hot_ops) && hot_blocks > 0.0 && hot_blocks <= 1.0) {
                return usage("--hot-ops must be in 0..=100 and --hot-blocks in (0, 100]");
            }
        }
        if let Some(rate) = self.rate {
            if !(rate.is_finite() && rate > 0.0) {
                return usage("--rate must be a positive number of operations per second");
            }
        }
        if self.corebuf_get && self.path_mode != PathMode::Local {
            return usage("--corebuf-get needs --path-mode local (get reaches the own partition)");
        }
        if self.rounds == Some(0) {
            return usage("--rounds 0: give at least 1");
        }
        if self.sample_every == 0 {
            return usage("--sample-every 0: give 1 to time every operation");
        }
        if self.flush_every == Some(0) {
            return usage("--flush-every 0: give a number of writes, at least 1");
        }
        if self.cache_holds_dataset() {
            notes.push(format!(
                "the cache ({}) holds the whole dataset ({}): after the first touch every read \
                 hits; use a larger --dataset to measure misses",
                human_bytes(self.cache_bytes),
                human_bytes(self.dataset_bytes())
            ));
        }
        if self.shards > host.cores {
            notes.push(format!(
                "{} shards on {} cores: shards share cores",
                self.shards, host.cores
            ));
        }
        Ok(notes)
    }
}

fn usage<T>(message: impl Into<String>) -> Result<T> {
    Err(BenchError::Usage(message.into()))
}

/// Builds the settings of the default scenario from the command line.
pub fn settings_from(args: &Args, host: &Host) -> Result<Settings> {
    let smoke = args.smoke;
    let block_size = args.block_size as usize;
    let dataset_bytes = args.dataset.unwrap_or(if smoke { 32 << 20 } else { 256 << 20 });
    let cache_bytes = args.cache.unwrap_or(if smoke { 8 << 20 } else { 64 << 20 });
    let duration = args.duration.unwrap_or(if smoke { 1.0 } else { 5.0 });
    let (dist, mix) = workload_of(args);
    let trace = args.trace.clone().map(|path| TraceSpec {
        path,
        format: args.trace_format,
        fold: args.trace_fold,
    });
    let length = match (args.ops, &trace) {
        (Some(ops), _) => Length::Ops(ops),
        (None, Some(_)) if args.duration.is_none() => Length::Trace,
        (None, _) => Length::Seconds(duration),
    };
    if let Length::Seconds(secs) = length {
        if !(secs.is_finite() && secs > 0.0) {
            return usage("--duration must be a positive number of seconds");
        }
    }
    if args.ops == Some(0) {
        return usage("--ops 0: give at least one operation");
    }
    let shards = args.shards.unwrap_or(host.cores);
    let baselines =
        if args.baselines.contains(&Baseline::None) { Vec::new() } else { dedup(&args.baselines) };
    let dataset_blocks = dataset_bytes / block_size.max(1) as u64;
    let settings = Settings {
        block_size,
        dataset_blocks,
        cache_bytes,
        shards,
        inflight: args.inflight,
        baseline_threads: args.baseline_threads.unwrap_or(shards),
        length,
        warmup_secs: args.warmup.max(0.0),
        prefill: match args.prefill {
            Prefill::Yes => true,
            Prefill::No => false,
            Prefill::Auto => cache_bytes / block_size.max(1) as u64 >= dataset_blocks,
        },
        dist,
        mix,
        trace,
        path_mode: args.path_mode,
        rate: args.rate,
        flush_every: args.flush_every,
        baselines,
        fio: args.fio,
        verify: args.verify,
        seed: args.seed,
        range_blocks: args.range_blocks.max(1),
        spin_us: args.spin_us,
        poll_us: args.poll_us,
        client_threads: args.client_threads.unwrap_or(shards),
        ring_ops: (args.ring_ops > 0).then_some(args.ring_ops),
        sample_every: args.sample_every,
        pread_memory: args.pread_memory,
        corebuf_get: args.corebuf_get,
        rounds: args.rounds,
    };
    Ok(settings)
}

fn dedup(list: &[Baseline]) -> Vec<Baseline> {
    let mut out = Vec::new();
    for &b in list {
        if !out.contains(&b) {
            out.push(b);
        }
    }
    out
}

fn workload_of(args: &Args) -> (Dist, Mix) {
    let zipf = Dist::Zipf { theta: args.theta };
    let ratio = |read_ratio: f64| Mix { read_ratio, rmw: false };
    match args.workload {
        WorkloadKind::Uniform => (Dist::Uniform, ratio(args.read_ratio)),
        WorkloadKind::Zipf => (zipf, ratio(args.read_ratio)),
        WorkloadKind::Sequential => (Dist::Sequential, ratio(args.read_ratio)),
        WorkloadKind::Hotset => (
            Dist::HotSet { hot_ops: args.hot_ops / 100.0, hot_blocks: args.hot_blocks / 100.0 },
            ratio(args.read_ratio),
        ),
        WorkloadKind::YcsbA => (zipf, ratio(0.5)),
        WorkloadKind::YcsbB => (zipf, ratio(0.95)),
        WorkloadKind::YcsbC => (zipf, ratio(1.0)),
        WorkloadKind::YcsbF => (zipf, Mix { read_ratio: 0.5, rmw: true }),
    }
}

/// Parses a size: a number with an optional binary suffix (K, M, G, T; `iB` / `B` allowed).
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix('B')).unwrap_or(t);
    let (digits, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        Some('T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let value: f64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("'{text}' is not a size (examples: 4096, 4K, 64M, 2G)"))?;
    if !(value.is_finite() && value >= 0.0) {
        return Err(format!("'{text}' is not a size"));
    }
    let bytes = value * (1u64 << shift) as f64;
    if bytes >= u64::MAX as f64 {
        return Err(format!("'{text}' is too large"));
    }
    Ok(bytes as u64)
}

/// Formats bytes with a binary unit, e.g. `64 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Seconds as a [`Duration`].
pub fn secs(value: f64) -> Duration {
    Duration::from_secs_f64(value.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: Host = Host { mem_available_bytes: 8 << 30, cores: 2 };

    fn check(argv: &[&str]) -> Result<(Settings, Vec<String>)> {
        let mut full = vec!["corebuf-bench"];
        full.extend_from_slice(argv);
        let args = Args::try_parse_from(full).map_err(|e| BenchError::Usage(e.to_string()))?;
        let settings = settings_from(&args, &HOST)?;
        let notes = settings.validate(&HOST)?;
        Ok((settings, notes))
    }

    fn usage_error(argv: &[&str]) -> String {
        match check(argv) {
            Err(BenchError::Usage(m)) => m,
            other => panic!("{argv:?}: expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_and_smoke_resolve() {
        let (s, notes) = check(&[]).unwrap();
        assert_eq!(
            (s.dataset_bytes(), s.cache_bytes, s.shards, s.inflight),
            (256 << 20, 64 << 20, 2, 32)
        );
        assert_eq!(s.length, Length::Seconds(5.0));
        assert!(!s.prefill && notes.is_empty());
        let (s, _) = check(&["--smoke"]).unwrap();
        assert_eq!(
            (s.dataset_bytes(), s.cache_bytes, s.length),
            (32 << 20, 8 << 20, Length::Seconds(1.0))
        );
        let (s, _) = check(&["--smoke", "--dataset", "64M"]).unwrap();
        assert_eq!(s.dataset_bytes(), 64 << 20);
        let (s, _) =
            check(&["--workload", "ycsb-f", "--ops", "1000", "--baselines", "raw,raw,lru"])
                .unwrap();
        assert_eq!(s.mix, Mix { read_ratio: 0.5, rmw: true });
        assert_eq!(s.length, Length::Ops(1000));
        assert_eq!(s.baselines, vec![Baseline::Raw, Baseline::Lru]);
        assert!(check(&["--baselines", "none"]).unwrap().0.baselines.is_empty());
    }

    #[test]
    fn a_cache_larger_than_available_memory_is_refused() {
        let m = usage_error(&["--cache", "9G", "--dataset", "20G"]);
        assert!(m.contains("--cache 9 GiB") && m.contains("MemAvailable"), "{m}");
    }

    #[test]
    fn zero_dataset_zero_shards_and_bad_shapes_are_refused() {
        assert!(usage_error(&["--dataset", "0"]).contains("dataset is empty"));
        assert!(
            usage_error(&["--dataset", "1000"]).contains("dataset is empty"),
            "less than a block"
        );
        assert!(usage_error(&["--shards", "0"]).contains("--shards 0"));
        assert!(usage_error(&["--block-size", "3000"]).contains("power of two"));
        assert!(usage_error(&["--theta", "1.0"]).contains("0 < θ < 1"));
        assert!(usage_error(&["--cache", "64K"]).contains("at least 16 per shard"));
        assert!(usage_error(&["--read-ratio", "1.5"]).contains("--read-ratio"));
        assert!(usage_error(&["--duration", "0"]).contains("--duration"));
        assert!(usage_error(&["--flush-every", "0"]).contains("--flush-every"));
        assert!(usage_error(&["--dataset", "lots"]).contains("not a size"));
    }

    #[test]
    fn a_cache_that_holds_the_dataset_is_fine_but_said() {
        let (s, notes) = check(&["--dataset", "32M", "--cache", "64M"]).unwrap();
        assert!(s.prefill, "auto prefill when the dataset fits");
        assert!(notes.iter().any(|n| n.contains("holds the whole dataset")), "{notes:?}");
    }

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("2t"), Ok(2 << 40));
        assert!(parse_size("-1").is_err());
        assert_eq!(human_bytes(64 << 20), "64 MiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
