//! One comparison: validate, load the trace, write the dataset, run corebuf and each baseline
//! on it, simulate an exact LRU on corebuf's operation stream, compute the ratios.

use std::path::PathBuf;
use std::sync::Arc;

use crate::args::{Baseline, Host, Settings};
use crate::dataset::Dataset;
use crate::error::Result;
use crate::lru::simulate;
use crate::report::{Comparison, Ratio, SideReport};
use crate::runners::corebuf::Access;
use crate::runners::{self, fio};
use crate::verify::Versions;
use crate::workload::{Phase, Plan};

/// Operations of the timed run replayed through the exact-LRU simulation at most (the first
/// ones, round-robin over the workers); a note says when the run had more.
const LRU_SIM_OPS_MAX: u64 = 20_000_000;

/// Where the run happens.
#[derive(Clone, Debug)]
pub struct Env {
    /// What the host offers.
    pub host: Host,
    /// Directory for the temporary dataset.
    pub dir: Option<PathBuf>,
    /// A dataset file to use and keep.
    pub path: Option<PathBuf>,
}

/// Runs corebuf and the settings' baselines on one dataset.
pub fn compare(title: &str, settings: &Settings, env: &Env) -> Result<Comparison> {
    let mut notes = settings.validate(&env.host)?;
    let trace = match &settings.trace {
        Some(t) => Some(Arc::from(crate::trace::load(
            &t.path,
            t.format,
            t.fold,
            settings.block_size as u64,
            settings.dataset_blocks,
        )?)),
        None => None,
    };
    eprintln!("== {title} ==");
    let dataset = Dataset::prepare(
        env.path.as_deref(),
        env.dir.as_deref(),
        settings.dataset_blocks,
        settings.block_size,
    )?;
    if dataset.reused {
        notes.push(format!(
            "reused the dataset {} (size and sampled blocks are right)",
            dataset.path.display()
        ));
    }
    let plan = Plan::new(
        settings.dataset_blocks,
        settings.shards,
        settings.range_blocks,
        settings.dist,
        settings.mix,
        settings.seed,
        trace,
    )
    .exclusive(settings.verify)
    .ring(settings.ring_ops);
    let versions = settings.verify.then(|| Arc::new(Versions::new(settings.dataset_blocks)));
    let rounds = settings.rounds.unwrap_or(1).max(1);
    let mut done: Vec<(Option<f64>, Vec<SideReport>)> = Vec::new();
    for round in 0..rounds {
        if rounds > 1 {
            eprintln!("round {} of {rounds}", round + 1);
        }
        // Odd rounds run the baselines first, so a disk that speeds up or slows down over
        // the run favours no side.
        let baselines_first = round % 2 == 1;
        let mut others = Vec::new();
        if baselines_first {
            run_baselines(settings, &dataset, &plan, &versions, &mut others, &mut notes)?;
        }
        let mut sides = run_corebuf(settings, &dataset, &plan, &versions)?;
        if !baselines_first {
            run_baselines(settings, &dataset, &plan, &versions, &mut others, &mut notes)?;
        }
        sides.extend(others);
        let key = round_key(&sides);
        if rounds > 1 {
            if let Some((what, value)) = &key {
                eprintln!("  round {}: {what} {value:.2}x", round + 1);
            }
        }
        done.push((key.map(|(_, v)| v), sides));
    }
    let sides = if rounds == 1 {
        done.pop().map(|(_, sides)| sides).unwrap_or_default()
    } else {
        let what = done
            .first()
            .and_then(|(_, sides)| round_key(sides))
            .map(|(what, _)| what)
            .unwrap_or_else(|| "corebuf ops/s".into());
        let values: Vec<String> =
            done.iter().map(|(v, _)| v.map_or_else(|| "-".into(), |v| format!("{v:.2}"))).collect();
        done.sort_by(|a, b| a.0.unwrap_or(0.0).total_cmp(&b.0.unwrap_or(0.0)));
        notes.push(format!(
            "{rounds} rounds on the same dataset, corebuf and the baselines in turn (corebuf \
             first in odd rounds, last in even ones); {what} per round: {}; the table shows \
             the median round",
            values.join(", ")
        ));
        let median = done.len() / 2;
        done.swap_remove(median).1
    };
    if settings.fio && !settings.baselines.contains(&Baseline::Raw) {
        notes.push("--fio runs beside the raw baseline, which this comparison does not run".into());
    }
    if settings.verify {
        notes.push(
            "verify: every read checked block number, version and checksum; no mismatch".into(),
        );
    }
    let ratios = ratios(&sides);
    Ok(Comparison {
        title: title.to_string(),
        settings: settings.clone(),
        dataset_path: dataset.path.display().to_string(),
        sides,
        ratios,
        notes,
    })
}

/// The corebuf sides of one round (`corebuf`, and `corebuf-get` when asked for).
fn run_corebuf(
    settings: &Settings,
    dataset: &Dataset,
    plan: &Plan,
    versions: &Option<Arc<Versions>>,
) -> Result<Vec<SideReport>> {
    eprintln!("corebuf ...");
    let mut core = runners::corebuf::run(settings, dataset, plan, versions.clone(), Access::Read)?;
    lru_simulation(settings, plan, &mut core)?;
    let mut sides = vec![core];
    if settings.corebuf_get {
        eprintln!("corebuf-get ...");
        sides.push(runners::corebuf::run(settings, dataset, plan, versions.clone(), Access::Get)?);
    }
    Ok(sides)
}

/// Every baseline of one round, appended to `sides`.
fn run_baselines(
    settings: &Settings,
    dataset: &Dataset,
    plan: &Plan,
    versions: &Option<Arc<Versions>>,
    sides: &mut Vec<SideReport>,
    notes: &mut Vec<String>,
) -> Result<()> {
    for baseline in &settings.baselines {
        let side = match baseline {
            Baseline::Raw => {
                eprintln!("raw io_uring ...");
                runners::raw::run(settings, dataset, plan, versions.clone())?
            }
            Baseline::Pread => {
                eprintln!("pread ...");
                runners::pread::run(settings, dataset, plan, versions.clone())?
            }
            Baseline::Lru => {
                eprintln!("mutex-lru ...");
                runners::lru::run(settings, dataset, plan, versions.clone())?
            }
            Baseline::None => continue,
        };
        sides.push(side);
        if *baseline == Baseline::Raw && settings.fio {
            run_fio(settings, dataset, sides, notes);
        }
    }
    Ok(())
}

/// What orders the rounds of a comparison: corebuf's device IOPS over the raw baseline's
/// where there is one (the miss and write targets), else corebuf's ops/s over the first
/// baseline's.
fn round_key(sides: &[SideReport]) -> Option<(String, f64)> {
    let core = sides.first()?;
    if let Some(raw) = sides.iter().find(|s| s.side == "raw-io_uring") {
        if let (Some(c), Some(r)) = (core.device_iops, raw.device_iops) {
            if r > 0.0 {
                return Some(("corebuf device IOPS / raw-io_uring IOPS".into(), c / r));
            }
        }
    }
    let other = sides.iter().find(|s| !s.side.starts_with("corebuf"))?;
    (other.ops_per_sec > 0.0).then(|| {
        (format!("corebuf ops/s / {} ops/s", other.side), core.ops_per_sec / other.ops_per_sec)
    })
}

fn run_fio(
    settings: &Settings,
    dataset: &Dataset,
    sides: &mut Vec<SideReport>,
    notes: &mut Vec<String>,
) {
    eprintln!("fio ...");
    match fio::run(settings, dataset) {
        fio::Outcome::Ran(report) => sides.push(*report),
        fio::Outcome::Skipped(why) => {
            eprintln!("  {why}");
            notes.push(why);
        }
    }
}

/// The exact-LRU hit ratio on corebuf's operation stream (regenerated from the same seeds).
fn lru_simulation(settings: &Settings, plan: &Plan, core: &mut SideReport) -> Result<()> {
    let layout = runners::corebuf::layout(settings, plan)?;
    let mut phases = Vec::new();
    for spec in runners::phases(settings) {
        let (ops_max, counted) = match spec.phase {
            Phase::Prefill => (u64::MAX, false),
            Phase::Warmup => (core.warm_ops, false),
            Phase::Measure => (core.ops.min(LRU_SIM_OPS_MAX), true),
        };
        phases.push((plan.streams(&layout, spec.phase, spec.ops), ops_max, counted));
    }
    let count = simulate(settings.cache_blocks() as usize, phases);
    core.lru_sim_hit_ratio = Some(count.ratio());
    if core.ops > LRU_SIM_OPS_MAX {
        core.notes.push(format!(
            "LRU% simulated on the first {LRU_SIM_OPS_MAX} of {} operations",
            core.ops
        ));
    }
    Ok(())
}

/// Each corebuf side (`corebuf`, `corebuf-get`) against every baseline.
fn ratios(sides: &[SideReport]) -> Vec<Ratio> {
    let Some(core) = sides.first() else { return Vec::new() };
    let is_core = |s: &SideReport| s.side.starts_with("corebuf");
    let mut out = Vec::new();
    for get in sides.iter().filter(|s| s.side == "corebuf-get") {
        for other in sides.iter().filter(|s| !is_core(s)) {
            out.extend(Ratio::of(
                format!("corebuf-get ops/s / {} ops/s", other.side),
                get.ops_per_sec,
                other.ops_per_sec,
            ));
        }
    }
    for other in sides.iter().filter(|s| !is_core(s)) {
        out.extend(Ratio::of(
            format!("corebuf ops/s / {} ops/s", other.side),
            core.ops_per_sec,
            other.ops_per_sec,
        ));
        if other.side == "raw-io_uring" {
            if let (Some(c), Some(r)) = (core.device_iops, other.device_iops) {
                out.extend(Ratio::of("corebuf device IOPS / raw-io_uring IOPS", c, r));
            }
        }
        if let (Some(c), Some(o)) = (core.hit_ratio, other.hit_ratio) {
            out.push(Ratio::figure(
                format!("corebuf hit% - {} hit%", other.side),
                (c - o) * 100.0,
                "points",
            ));
        }
    }
    if let (Some(c), Some(l)) = (core.hit_ratio, core.lru_sim_hit_ratio) {
        out.push(Ratio::figure(
            "corebuf hit% - exact LRU hit% (same stream, simulated)",
            (c - l) * 100.0,
            "points",
        ));
    }
    let raw = sides.iter().find(|s| s.side == "raw-io_uring");
    let fio = sides.iter().find(|s| s.side == "fio");
    if let (Some(raw), Some(fio)) = (raw, fio) {
        out.extend(Ratio::of("raw-io_uring ops/s / fio ops/s", raw.ops_per_sec, fio.ops_per_sec));
    }
    out
}
