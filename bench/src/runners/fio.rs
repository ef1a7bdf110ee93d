//! `--fio`: the equivalent fio job on the same file, reported beside the raw baseline.

use std::process::Command;

use serde_json::Value;

use crate::args::{Length, Settings};
use crate::dataset::Dataset;
use crate::report::{Latency, SideReport};
use crate::workload::Dist;

/// Why fio did not run, or its figures.
pub enum Outcome {
    /// fio ran.
    Ran(Box<SideReport>),
    /// fio did not run, and why.
    Skipped(String),
}

/// fio's command-line arguments for the settings, or why there is no equivalent job.
pub fn job_args(settings: &Settings, dataset: &Dataset) -> Result<Vec<String>, String> {
    if settings.trace.is_some() {
        return Err("a trace replay has no fio equivalent".into());
    }
    let read_pct = (settings.mix.read_ratio * 100.0).round() as u32;
    let random = settings.dist != Dist::Sequential;
    let rw = match (read_pct, random) {
        (100, true) => "randread",
        (0, true) => "randwrite",
        (_, true) => "randrw",
        (100, false) => "read",
        (0, false) => "write",
        (_, false) => "rw",
    };
    let runtime = match settings.length {
        Length::Seconds(s) => s.ceil().max(1.0) as u64,
        _ => return Err("fio runs by time; give --duration instead of --ops".into()),
    };
    let mut args = vec![
        "--name=corebuf-bench".to_string(),
        format!("--filename={}", dataset.path.display()),
        "--direct=1".into(),
        "--ioengine=io_uring".into(),
        format!("--bs={}", settings.block_size),
        format!("--size={}", dataset.bytes()),
        format!("--iodepth={}", settings.inflight),
        format!("--numjobs={}", settings.shards),
        "--thread".into(),
        "--group_reporting".into(),
        "--time_based".into(),
        format!("--runtime={runtime}"),
        format!("--rw={rw}"),
        format!("--rwmixread={read_pct}"),
        "--norandommap".into(),
        "--randrepeat=0".into(),
        "--output-format=json".into(),
    ];
    match settings.dist {
        Dist::Zipf { theta } => args.push(format!("--random_distribution=zipf:{theta}")),
        Dist::HotSet { hot_ops, hot_blocks } => args.push(format!(
            "--random_distribution=zoned:{0:.0}/{1:.0}:{2:.0}/{3:.0}",
            hot_ops * 100.0,
            hot_blocks * 100.0,
            100.0 - hot_ops * 100.0,
            100.0 - hot_blocks * 100.0
        )),
        Dist::Uniform | Dist::Sequential => {}
    }
    if let Some(every) = settings.flush_every {
        // fio syncs per job: spread the barrier interval over the jobs.
        args.push(format!("--fdatasync={}", (every / settings.shards as u64).max(1)));
    }
    Ok(args)
}

/// Runs fio when it is on PATH.
pub fn run(settings: &Settings, dataset: &Dataset) -> Outcome {
    if !crate::sysinfo::on_path("fio") {
        return Outcome::Skipped(
            "--fio: fio is not on PATH; skipped (install fio to compare)".into(),
        );
    }
    let args = match job_args(settings, dataset) {
        Ok(args) => args,
        Err(why) => return Outcome::Skipped(format!("--fio: {why}; skipped")),
    };
    dataset.drop_page_cache();
    eprintln!("  fio {}", args.join(" "));
    let output = match Command::new("fio").args(&args).output() {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            return Outcome::Skipped(format!(
                "--fio: fio failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
        Err(e) => return Outcome::Skipped(format!("--fio: could not start fio: {e}")),
    };
    match parse(&output.stdout, settings.block_size) {
        Some(mut report) => {
            report.notes.push(format!("fio {}", args.join(" ")));
            Outcome::Ran(Box::new(report))
        }
        None => Outcome::Skipped("--fio: could not read fio's JSON output".into()),
    }
}

/// fio's JSON output as a side.
fn parse(stdout: &[u8], block_size: usize) -> Option<SideReport> {
    // fio may print notes before the JSON document.
    let text = String::from_utf8_lossy(stdout);
    let json: Value = serde_json::from_str(&text[text.find('{')?..]).ok()?;
    let job = json.get("jobs")?.get(0)?;
    let (read, write) = (job.get("read")?, job.get("write")?);
    let iops = read.get("iops")?.as_f64()? + write.get("iops")?.as_f64()?;
    let ios = read.get("total_ios")?.as_u64()? + write.get("total_ios")?.as_u64()?;
    let secs = job.get("job_runtime").and_then(Value::as_f64).map_or(0.0, |ms| ms / 1000.0);
    let main = if read.get("total_ios")?.as_u64()? > 0 { read } else { write };
    let clat = main.get("clat_ns")?;
    let pct = |p: &str| clat.get("percentile")?.get(p)?.as_f64().map(|ns| ns / 1000.0);
    let latency = Latency {
        p50_us: pct("50.000000").unwrap_or(0.0),
        p99_us: pct("99.000000").unwrap_or(0.0),
        p999_us: pct("99.900000").unwrap_or(0.0),
        max_us: clat.get("max").and_then(Value::as_f64).unwrap_or(0.0) / 1000.0,
        mean_us: clat.get("mean").and_then(Value::as_f64).unwrap_or(0.0) / 1000.0,
    };
    let mut report = SideReport::from_groups("fio", &[], block_size);
    report.ops = ios;
    report.reads = read.get("total_ios")?.as_u64()?;
    report.writes = write.get("total_ios")?.as_u64()?;
    report.elapsed_secs = secs;
    report.ops_per_sec = iops;
    report.mb_per_sec = iops * block_size as f64 / 1e6;
    report.device_iops = Some(iops);
    report.device_iops_source = Some("fio".into());
    report.latency = latency;
    report.start_lateness = None;
    Some(report)
}
