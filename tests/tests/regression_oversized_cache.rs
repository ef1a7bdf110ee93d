//! Regression test for a bad-input bug found by the bad-input sweep: a cache budget the machine
//! cannot allocate (4 TiB of 4 KiB frames: 2^30 frames, under the 2^32 − 1 frame limit the
//! configuration check enforces) aborts the whole process with "memory allocation of ... bytes
//! failed" (`Arena::new` calls `handle_alloc_error`) instead of returning a typed error from
//! `build()`. A server that takes its cache size from a config file dies on a typo.
//!
//! The build runs in a child process (this test binary re-run with `COREBUF_OVERSIZED_CHILD`
//! set), since an abort cannot be caught; the child must exit normally and report an error.

use std::process::Command;

use corebuf::{Engine, Error};
use corebuf_tests::{data_file, scratch_dir};

const CHILD_ENV: &str = "COREBUF_OVERSIZED_CHILD";

/// The child: builds an engine with a 4 TiB cache and prints what `build()` returned.
#[test]
fn oversized_cache_child() {
    if std::env::var(CHILD_ENV).is_err() {
        return;
    }
    let dir = scratch_dir();
    let path = data_file(dir.path(), 64, 4096);
    let built = Engine::builder().path(&path).shards(1).cache_size_bytes(1 << 42).build();
    match built {
        Err(Error::InvalidConfig { setting, reason }) => {
            println!("CONFIG_ERROR {setting}: {reason}")
        }
        Err(e) => println!("OTHER_ERROR {e:?}"),
        Ok(engine) => {
            println!("BUILT");
            let _ = engine.shutdown();
        }
    }
}

#[test]
fn oversized_cache_aborts_the_process_instead_of_returning_an_error() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let exe = std::env::current_exe().expect("the test binary");
    let output = Command::new(exe)
        .args(["--exact", "oversized_cache_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "building an engine with a 4 TiB cache killed the process ({}); stderr: {}",
        output.status,
        stderr.lines().find(|l| l.contains("allocation")).unwrap_or(&stderr)
    );
    assert!(
        stdout.contains("CONFIG_ERROR cache_size_bytes"),
        "expected InvalidConfig for cache_size_bytes, the child said: {stdout}"
    );
}
