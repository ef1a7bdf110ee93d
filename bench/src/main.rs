//! corebuf-bench: the load generator of corebuf, with its baselines.
//!
//! It writes a dataset file, runs a workload on corebuf (one shard per core) and on raw
//! io_uring, buffered pread (its page cache limited to corebuf's cache size, where a memory
//! cgroup can be made) and a Mutex-guarded LRU over the same file with the same settings,
//! and prints one comparison table (`--json` for a machine-readable copy). `--scenario` runs
//! the measurements behind DESIGN §6's targets. See `--help`.

mod app;
mod args;
mod block;
mod dataset;
mod error;
mod lru;
mod memcg;
mod report;
mod runners;
mod scenario;
mod sysinfo;
mod trace;
mod verify;
mod workload;
mod zipf;

use clap::Parser;

use crate::args::{Args, Host, Scenario};
use crate::error::{BenchError, Result};

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("corebuf-bench: {e}");
        std::process::exit(e.exit_code());
    }
}

fn run(args: &Args) -> Result<()> {
    let host =
        Host { mem_available_bytes: sysinfo::mem_available_bytes(), cores: sysinfo::cores() };
    let settings = args::settings_from(args, &host)?;
    let env = app::Env { host, dir: args.dir.clone(), path: args.path.clone() };
    let comparisons = match args.scenario {
        Scenario::Default => {
            let c = app::compare("corebuf against the baselines", &settings, &env)?;
            report::print(&c);
            vec![c]
        }
        which => {
            let length_given = args.duration.is_some() || args.ops.is_some();
            scenario::run(which, &settings, &env, args.smoke, length_given)?
        }
    };
    if let Some(path) = &args.json {
        let json = serde_json::json!({ "corebuf_bench": 1, "comparisons": comparisons });
        let text = serde_json::to_string_pretty(&json).map_err(|e| BenchError::io("--json", e))?;
        std::fs::write(path, text)
            .map_err(|e| BenchError::io(format!("writing {}", path.display()), e))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
