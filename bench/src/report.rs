//! Figures of each side, the comparison table, the ratios, and the JSON report.

use std::time::Instant;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::args::{human_bytes, Settings};
use crate::runners::{new_histogram, GroupResult};

/// Latency percentiles in microseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Latency {
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
    /// Mean.
    pub mean_us: f64,
}

impl Latency {
    /// From a histogram in nanoseconds.
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Latency {
            p50_us: us(h.value_at_quantile(0.5)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            mean_us: h.mean() / 1000.0,
        }
    }
}

/// One group's figures (a shard, an executor, a thread).
#[derive(Clone, Debug, Serialize)]
pub struct GroupFigures {
    /// Its index.
    pub group: usize,
    /// Operations.
    pub ops: u64,
    /// Operations per second over its own window.
    pub ops_per_sec: f64,
    /// 99th percentile latency, µs.
    pub p99_us: f64,
    /// Its hit ratio, where known.
    pub hit_ratio: Option<f64>,
    /// Its device IOPS, where known.
    pub device_iops: Option<f64>,
}

/// What one side did in its timed run.
#[derive(Clone, Debug, Serialize)]
pub struct SideReport {
    /// Which side.
    pub side: String,
    /// Operations completed.
    pub ops: u64,
    /// Reads.
    pub reads: u64,
    /// Whole-block writes.
    pub writes: u64,
    /// Read-modify-writes.
    pub rmws: u64,
    /// Flush barriers.
    pub barriers: u64,
    /// Seconds from the first operation's start to the last one's end.
    pub elapsed_secs: f64,
    /// Operations per second.
    pub ops_per_sec: f64,
    /// Bytes moved for the caller per second (a read-modify-write counts twice), MB/s.
    pub mb_per_sec: f64,
    /// Hit ratio of the side's cache, where it has one.
    pub hit_ratio: Option<f64>,
    /// Hit ratio of an exact LRU of the same size on the same operation stream (simulated).
    pub lru_sim_hit_ratio: Option<f64>,
    /// Device I/Os per second.
    pub device_iops: Option<f64>,
    /// Where the device I/O count comes from.
    pub device_iops_source: Option<String>,
    /// Latency percentiles.
    pub latency: Latency,
    /// Open loop: percentiles of how late operations were issued after their intended start
    /// (the generator's jitter; it is part of `latency`).
    pub start_lateness: Option<Latency>,
    /// VmRSS at the end of the timed run, bytes.
    pub rss_bytes: u64,
    /// VmHWM since the side started, bytes.
    pub rss_peak_bytes: u64,
    /// Times the engine's shard pollers went to sleep during the timed run (corebuf only).
    pub poller_sleeps: Option<u64>,
    /// Wake-ups the shards sent to sleeping shards during the timed run (corebuf only).
    pub wakeups_sent: Option<u64>,
    /// Per group.
    pub groups: Vec<GroupFigures>,
    /// Remarks.
    pub notes: Vec<String>,
    /// Operations of the warm-up phase, for the LRU simulation.
    #[serde(skip)]
    pub warm_ops: u64,
}

fn window(groups: &[GroupResult]) -> Option<(Instant, Instant)> {
    let start = groups.iter().filter_map(|g| g.started).min()?;
    let end = groups.iter().filter_map(|g| g.ended).max()?;
    Some((start, end))
}

fn per_sec(count: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        count as f64 / secs
    } else {
        0.0
    }
}

impl SideReport {
    /// A side's figures from its groups' timed results.
    pub fn from_groups(side: &str, groups: &[GroupResult], block_size: usize) -> SideReport {
        let mut latency = new_histogram();
        let mut lateness: Option<Histogram<u64>> = None;
        for g in groups {
            let _ = latency.add(&g.latency_ns);
            if let Some(l) = &g.lateness_ns {
                let _ = lateness.get_or_insert_with(new_histogram).add(l);
            }
        }
        let elapsed_secs = window(groups).map_or(0.0, |(s, e)| (e - s).as_secs_f64());
        let sum = |f: fn(&GroupResult) -> u64| groups.iter().map(f).sum::<u64>();
        let (ops, reads, writes, rmws) =
            (sum(|g| g.ops), sum(|g| g.reads), sum(|g| g.writes), sum(|g| g.rmws));
        let bytes = (ops + rmws) * block_size as u64;
        let device_ios: Option<u64> = groups.iter().map(|g| g.device_ios).sum();
        let (hits, misses) = (sum(|g| g.hits), sum(|g| g.misses));
        SideReport {
            side: side.to_string(),
            ops,
            reads,
            writes,
            rmws,
            barriers: sum(|g| g.barriers),
            elapsed_secs,
            ops_per_sec: per_sec(ops, elapsed_secs),
            mb_per_sec: per_sec(bytes, elapsed_secs) / 1e6,
            hit_ratio: (hits + misses > 0).then(|| hits as f64 / (hits + misses) as f64),
            lru_sim_hit_ratio: None,
            device_iops: device_ios.map(|n| per_sec(n, elapsed_secs)),
            device_iops_source: device_ios.map(|_| "its own I/O count".to_string()),
            poller_sleeps: None,
            wakeups_sent: None,
            latency: Latency::of(&latency),
            start_lateness: lateness.as_ref().map(Latency::of),
            rss_bytes: 0,
            rss_peak_bytes: 0,
            groups: groups
                .iter()
                .enumerate()
                .map(|(i, g)| {
                    let secs = match (g.started, g.ended) {
                        (Some(s), Some(e)) => (e - s).as_secs_f64(),
                        _ => 0.0,
                    };
                    GroupFigures {
                        group: i,
                        ops: g.ops,
                        ops_per_sec: per_sec(g.ops, secs),
                        p99_us: Latency::of(&g.latency_ns).p99_us,
                        hit_ratio: (g.hits + g.misses > 0)
                            .then(|| g.hits as f64 / (g.hits + g.misses) as f64),
                        device_iops: g.device_ios.map(|n| per_sec(n, secs)),
                    }
                })
                .collect(),
            notes: Vec::new(),
            warm_ops: 0,
        }
    }
}

/// One comparison as a ratio, with its target where DESIGN §6 sets one.
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    /// What is compared, e.g. "corebuf ops/s ÷ pread ops/s".
    pub what: String,
    /// The value (a ratio, or a difference in points for hit ratios).
    pub value: f64,
    /// How the value reads: "x" for a ratio, "points" for a difference.
    pub unit: String,
    /// The target, e.g. "≥ 0.90".
    pub target: Option<String>,
    /// Whether the target is met.
    pub met: Option<bool>,
}

impl Ratio {
    /// `a ÷ b` (None when `b` is 0).
    pub fn of(what: impl Into<String>, a: f64, b: f64) -> Option<Ratio> {
        (b > 0.0).then(|| Ratio {
            what: what.into(),
            value: a / b,
            unit: "x".into(),
            target: None,
            met: None,
        })
    }

    /// A plain figure with its unit (e.g. a difference in "points", a rate in "ops/s").
    pub fn figure(what: impl Into<String>, value: f64, unit: &str) -> Ratio {
        Ratio { what: what.into(), value, unit: unit.into(), target: None, met: None }
    }

    /// With a target `value ≥ least`.
    pub fn at_least(mut self, least: f64) -> Ratio {
        self.target = Some(format!(">= {least}"));
        self.met = Some(self.value >= least);
        self
    }

    /// With a target `value ≤ most`.
    pub fn at_most(mut self, most: f64) -> Ratio {
        self.target = Some(format!("<= {most}"));
        self.met = Some(self.value <= most);
        self
    }
}

/// One comparison run: the settings, every side, and the ratios.
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    /// What it measures.
    pub title: String,
    /// The settings of the run.
    pub settings: Settings,
    /// Where the dataset lives.
    pub dataset_path: String,
    /// Every side, corebuf first.
    pub sides: Vec<SideReport>,
    /// Every ratio.
    pub ratios: Vec<Ratio>,
    /// Remarks (notes from validation, skipped baselines, ...).
    pub notes: Vec<String>,
}

/// `1.23 M`-style numbers.
pub fn si(value: f64) -> String {
    let (v, unit) = match value.abs() {
        v if v >= 1e9 => (value / 1e9, " G"),
        v if v >= 1e6 => (value / 1e6, " M"),
        v if v >= 1e3 => (value / 1e3, " k"),
        _ => (value, ""),
    };
    if unit.is_empty() {
        format!("{v:.1}")
    } else {
        format!("{v:.2}{unit}")
    }
}

fn percent(value: Option<f64>) -> String {
    value.map_or("-".into(), |v| format!("{:.1}", v * 100.0))
}

fn us(value: f64) -> String {
    if value >= 1000.0 {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// A one-line description of the settings.
pub fn describe(s: &Settings) -> String {
    let workload = match (&s.trace, s.dist) {
        (Some(t), _) => format!("trace {}", t.path.display()),
        (None, crate::workload::Dist::Zipf { theta }) => format!("zipf θ={theta}"),
        (None, crate::workload::Dist::HotSet { hot_ops, hot_blocks }) => {
            format!(
                "hot-set {:.0}% of ops on {:.0}% of blocks",
                hot_ops * 100.0,
                hot_blocks * 100.0
            )
        }
        (None, d) => format!("{d:?}").to_lowercase(),
    };
    let mix = if s.trace.is_some() {
        String::new()
    } else if s.mix.rmw {
        format!(", {:.0}% reads / read-modify-writes", s.mix.read_ratio * 100.0)
    } else {
        format!(", {:.0}% reads", s.mix.read_ratio * 100.0)
    };
    let length = match s.length {
        crate::args::Length::Seconds(secs) => format!("{secs} s per side"),
        crate::args::Length::Ops(n) => format!("{n} ops per side"),
        crate::args::Length::Trace => "one trace replay per side".into(),
    };
    let loop_kind =
        s.rate.map_or("closed loop".to_string(), |r| format!("open loop at {} ops/s", si(r)));
    format!(
        "{workload}{mix}; {} blocks; dataset {} ({} blocks); cache {}; {} shards x {} in flight; \
         {} path; {loop_kind}; {length}{}{}",
        human_bytes(s.block_size as u64),
        human_bytes(s.dataset_bytes()),
        s.dataset_blocks,
        human_bytes(s.cache_bytes),
        s.shards,
        s.inflight,
        format!("{:?}", s.path_mode).to_lowercase(),
        s.flush_every.map_or(String::new(), |n| format!("; barrier every {n} writes")),
        if s.verify { "; verified" } else { "" },
    )
}

/// Prints a comparison: the table, per-group figures, ratios and notes.
pub fn print(c: &Comparison) {
    println!();
    println!("== {} ==", c.title);
    println!("{}", describe(&c.settings));
    println!(
        "{:<14}{:>11}{:>9}{:>7}{:>8}{:>10}{:>9}{:>9}{:>9}{:>9}{:>9}{:>10}",
        "side",
        "ops/s",
        "MB/s",
        "hit%",
        "LRU%",
        "dev IOPS",
        "p50 us",
        "p99 us",
        "p99.9us",
        "max us",
        "RSS MiB",
        "peak MiB"
    );
    for s in &c.sides {
        println!(
            "{:<14}{:>11}{:>9.1}{:>7}{:>8}{:>10}{:>9}{:>9}{:>9}{:>9}{:>9}{:>10}",
            s.side,
            si(s.ops_per_sec),
            s.mb_per_sec,
            percent(s.hit_ratio),
            percent(s.lru_sim_hit_ratio),
            s.device_iops.map_or("-".into(), si),
            us(s.latency.p50_us),
            us(s.latency.p99_us),
            us(s.latency.p999_us),
            us(s.latency.max_us),
            s.rss_bytes >> 20,
            s.rss_peak_bytes >> 20,
        );
    }
    for s in c
        .sides
        .iter()
        .filter(|s| s.groups.len() > 1 || (s.side == "corebuf" && !s.groups.is_empty()))
    {
        let groups: Vec<String> = s
            .groups
            .iter()
            .map(|g| {
                let mut text =
                    format!("#{} {} ops/s p99 {} us", g.group, si(g.ops_per_sec), us(g.p99_us));
                if let Some(h) = g.hit_ratio {
                    text += &format!(" hit {:.1}%", h * 100.0);
                }
                if let Some(d) = g.device_iops {
                    text += &format!(" dev {}", si(d));
                }
                text
            })
            .collect();
        println!("  {} per group: {}", s.side, groups.join(" | "));
    }
    for r in &c.ratios {
        let value = match r.unit.as_str() {
            "x" => format!("{:.2}x", r.value),
            "points" => format!("{:+.1} points", r.value),
            unit => format!("{} {unit}", si(r.value)),
        };
        let target = match (&r.target, r.met) {
            (Some(t), Some(met)) => {
                format!("  (target {t}: {})", if met { "met" } else { "NOT met" })
            }
            _ => String::new(),
        };
        println!("  {}: {value}{target}", r.what);
    }
    for s in c.sides.iter() {
        if let Some(l) = &s.start_lateness {
            println!(
                "  {} open loop: issued late by p50 {} us, p99 {} us, max {} us (included in latency)",
                s.side,
                us(l.p50_us),
                us(l.p99_us),
                us(l.max_us)
            );
        }
    }
    for s in &c.sides {
        for n in &s.notes {
            println!("  note ({}): {n}", s.side);
        }
    }
    for n in &c.notes {
        println!("  note: {n}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_format_for_people() {
        assert_eq!(si(1_234_567.0), "1.23 M");
        assert_eq!(si(93_000.0), "93.00 k");
        assert_eq!(si(12.0), "12.0");
        assert_eq!(us(0.123), "0.12");
        assert_eq!(us(1234.4), "1234");
        let r = Ratio::of("a ÷ b", 9.0, 10.0).unwrap().at_least(0.9);
        assert_eq!(r.met, Some(true));
        assert!(Ratio::of("x", 1.0, 0.0).is_none());
    }
}
