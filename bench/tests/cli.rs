//! The binary as a user runs it: argument errors are clear and cost nothing, traces are checked
//! before any file is written, a smoke run reports every side, and `--verify` catches a
//! damaged block.

use std::path::Path;
use std::process::{Command, Output};

fn bench(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_corebuf-bench"))
        .arg("--dir")
        .arg(dir)
        .args(args)
        .output()
        .expect("the bench binary runs")
}

fn scratch() -> tempfile::TempDir {
    // Not /tmp: it may be tmpfs, which has no O_DIRECT.
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("a scratch directory")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).expect("readable").next().is_none()
}

#[test]
fn bad_arguments_fail_fast_with_a_clear_message_and_write_nothing() {
    let dir = scratch();
    let cases: [(&[&str], &str); 5] = [
        (&["--cache", "100T", "--dataset", "200T"], "MemAvailable"),
        (&["--dataset", "0"], "dataset is empty"),
        (&["--shards", "0"], "at least one shard"),
        (&["--theta", "1.5"], "0 < θ < 1"),
        (&["--rounds", "0"], "--rounds 0"),
    ];
    for (args, expected) in cases {
        let out = bench(dir.path(), args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(expected), "{args:?}: {}", stderr(&out));
    }
    assert!(is_empty(dir.path()), "no dataset was written for a refused run");
}

#[test]
fn a_malformed_trace_line_is_named_before_any_dataset_is_written() {
    let dir = scratch();
    let trace = dir.path().join("bad.csv");
    std::fs::write(&trace, "r,0,4096\nw,4096,4096\nr,8192\n").unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let out = bench(&data, &["--smoke", "--trace", trace.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("bad.csv line 3"), "{}", stderr(&out));
    assert!(is_empty(&data));
}

#[test]
fn a_trace_beyond_the_dataset_is_rejected_unless_folded() {
    let dir = scratch();
    let trace = dir.path().join("msr.csv");
    // Block 100000 is far beyond a 32 MiB dataset (8192 blocks); the write at 6144 is unaligned.
    let lines = "128166372003061629,hm,1,Read,0,4096,100\n\
                 128166372003061630,hm,1,Write,6144,8192,100\n\
                 128166372003061631,hm,1,Read,409600000,4096,100\n";
    std::fs::write(&trace, lines.repeat(50)).unwrap();
    let path = trace.to_str().unwrap();
    let out = bench(dir.path(), &["--smoke", "--trace", path, "--baselines", "none"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("msr.csv line 3") && stderr(&out).contains("--trace-fold"),
        "{}",
        stderr(&out)
    );
    let out = bench(
        dir.path(),
        &["--smoke", "--trace", path, "--trace-fold", "modulo", "--baselines", "raw", "--verify"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    // 50 × (1 read + 3 blocks of the write + 1 read) block operations, replayed once per side.
    assert!(stdout.contains("one trace replay per side"), "{stdout}");
}

#[test]
fn a_verified_smoke_run_reports_every_side_in_json() {
    let dir = scratch();
    let json = dir.path().join("report.json");
    let out = bench(
        dir.path(),
        &["--smoke", "--verify", "--duration", "0.5", "--json", json.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let sides = report["comparisons"][0]["sides"].as_array().unwrap();
    let names: Vec<&str> = sides.iter().map(|s| s["side"].as_str().unwrap()).collect();
    assert_eq!(names, ["corebuf", "raw-io_uring", "pread", "mutex-lru"]);
    for side in sides {
        assert!(side["ops"].as_u64().unwrap() > 0, "{side}");
        assert!(side["latency"]["p99_us"].as_f64().unwrap() > 0.0, "{side}");
    }
    let core = &sides[0];
    assert!(core["hit_ratio"].as_f64().unwrap() > 0.0);
    assert!(core["lru_sim_hit_ratio"].as_f64().unwrap() > 0.0);
    assert!(core["device_iops"].as_f64().unwrap() > 0.0);
    assert!(core["rss_peak_bytes"].as_u64().unwrap() > 0);
    // The temporary dataset is gone; only the report is left.
    let left: Vec<_> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["report.json"]);
}

#[test]
fn rounds_alternate_the_sides_and_report_the_median_round() {
    let dir = scratch();
    let json = dir.path().join("report.json");
    let out = bench(
        dir.path(),
        &[
            "--smoke",
            "--baselines",
            "raw",
            "--duration",
            "0.3",
            "--rounds",
            "3",
            "--json",
            json.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // Round 2 runs the baseline first.
    let err = stderr(&out);
    let order: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("corebuf ...") || l.starts_with("raw io_uring ..."))
        .collect();
    assert_eq!(
        order,
        [
            "corebuf ...",
            "raw io_uring ...",
            "raw io_uring ...",
            "corebuf ...",
            "corebuf ...",
            "raw io_uring ..."
        ],
        "{err}"
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let c = &report["comparisons"][0];
    let names: Vec<&str> =
        c["sides"].as_array().unwrap().iter().map(|s| s["side"].as_str().unwrap()).collect();
    assert_eq!(names, ["corebuf", "raw-io_uring"], "corebuf stays first whatever ran first");
    let note = c["notes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n.as_str())
        .find(|n| n.starts_with("3 rounds"))
        .unwrap_or_else(|| panic!("a note lists the rounds: {c}"));
    // The three per-round ratios, and the table's ratio is their median.
    let per_round: Vec<f64> = note
        .split("per round: ")
        .nth(1)
        .and_then(|t| t.split(';').next())
        .unwrap()
        .split(", ")
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(per_round.len(), 3, "{note}");
    let mut sorted = per_round.clone();
    sorted.sort_by(f64::total_cmp);
    let sides = c["sides"].as_array().unwrap();
    let shown =
        sides[0]["device_iops"].as_f64().unwrap() / sides[1]["device_iops"].as_f64().unwrap();
    assert!((shown - sorted[1]).abs() < 0.006, "table {shown:.3} vs median {}: {note}", sorted[1]);
}

#[test]
fn verify_stops_at_a_damaged_block_and_names_it() {
    use std::os::unix::fs::FileExt;
    let dir = scratch();
    let path = dir.path().join("kept.bin");
    let path_arg = path.to_str().unwrap();
    let out =
        bench(dir.path(), &["--smoke", "--path", path_arg, "--baselines", "none", "--ops", "10"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Block 5 is not among the blocks sampled for reuse, so the file is reused as it is.
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(b"damage", 5 * 4096 + 100).unwrap();
    drop(file);
    let args = [
        "--smoke",
        "--path",
        path_arg,
        "--workload",
        "sequential",
        "--read-ratio",
        "1",
        "--verify",
    ];
    let out = bench(dir.path(), &args);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("block 5: checksum mismatch"), "{}", stderr(&out));
}

#[test]
fn the_get_side_and_an_equal_memory_pread_report_themselves() {
    let dir = scratch();
    let json = dir.path().join("report.json");
    let args = [
        "--smoke",
        "--verify",
        "--corebuf-get",
        "--ring-ops",
        "5000",
        "--sample-every",
        "8",
        "--baselines",
        "pread",
        "--duration",
        "0.5",
        "--json",
        json.to_str().unwrap(),
    ];
    let out = bench(dir.path(), &args);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let sides = report["comparisons"][0]["sides"].as_array().unwrap();
    let names: Vec<&str> = sides.iter().map(|s| s["side"].as_str().unwrap()).collect();
    assert_eq!(names, ["corebuf", "corebuf-get", "pread"]);
    for side in sides {
        assert!(side["ops"].as_u64().unwrap() > 0, "{side}");
        assert!(side["ops_per_cpu_sec"].as_f64().unwrap() > 0.0, "{side}");
    }
    // Equal memory where the bench can make a memory cgroup (root, memory controller), and
    // a plain statement where it cannot: never a silent whole-page-cache comparison.
    let pread = &sides[2];
    let table = String::from_utf8_lossy(&out.stdout);
    match pread["memory_limit_bytes"].as_u64() {
        Some(limit) => {
            assert_eq!(limit, 8 << 20, "the smoke run's cache size");
            assert!(table.contains("pread@8MiB"), "{table}");
        }
        None => {
            let notes = pread["notes"].to_string();
            assert!(notes.contains("NOT memory-limited"), "{notes}");
            assert!(table.contains("pread@all-RAM"), "{table}");
        }
    }
}
