//! Clients nobody here wrote, against real servers: redis-benchmark (plain and `--cluster`),
//! redis-py (plain and `RedisCluster`) doing random operations checked against a model, and
//! twemproxy (nutcracker) in front of three nodes. Each test skips with a message saying so
//! when its tool is not installed (`examples/kv-server/scripts/install-clients.sh` installs
//! them all). Runs are short: a few thousand requests each.

mod common;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{free_ports, outside_tool, scratch, three_nodes, Client, Reply, Server};

/// Every operation the model script drives, each checked against its model: the server must
/// serve them all.
const MODEL_COMMANDS: &str = "get,set,setnx,del,exists,mget,mset,incr,decr,incrby,append,strlen,\
                              getset,getdel,expire,ttl,persist";

/// The model script's command list.
fn model_commands(_: &mut Client) -> String {
    MODEL_COMMANDS.to_string()
}

fn run(what: &str, command: &mut Command) -> Output {
    let out = command.output().unwrap_or_else(|e| panic!("run {what}: {e}"));
    eprintln!(
        "{what}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout).replace('\r', "\n"),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A python3 that can import redis-py's cluster client, or `None` (printed).
fn python_with_redis(test: &str) -> Option<PathBuf> {
    let imports_redis = |python: &Path| {
        Command::new(python)
            .args(["-c", "import redis.cluster"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    // Debian's python3 first: python3-redis installs for it, and a python3 earlier on PATH
    // (pyenv, a virtualenv) may not have it.
    let debian = PathBuf::from("/usr/bin/python3");
    if debian.is_file() && imports_redis(&debian) {
        return Some(debian);
    }
    if let Some(python) = outside_tool("python3", test).filter(|p| imports_redis(p)) {
        return Some(python);
    }
    eprintln!(
        "SKIPPED {test}: no python3 with redis-py (python3-redis) \
         (examples/kv-server/scripts/install-clients.sh installs it)"
    );
    None
}

fn model_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/redis_py_model.py")
}

/// Runs the model script against 127.0.0.1:`port` and checks it passed.
fn run_model(python: &Path, port: u16, mode: &str, seed: u64, commands: &str) {
    let out = run(
        &format!("redis_py_model.py --mode {mode}"),
        Command::new(python).arg(model_script()).args([
            "--port",
            &port.to_string(),
            "--mode",
            mode,
            "--seed",
            &seed.to_string(),
            "--ops",
            "2000",
            "--commands",
            commands,
        ]),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the model run failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("2000 operations checked"), "{stdout}");
}

/// redis-benchmark's default test list without the list, set, hash, sorted-set and stream
/// tests.
fn redis_benchmark_tests(_: &mut Client) -> String {
    "ping_inline,ping_mbulk,set,get,incr,mset".to_string()
}

/// Every test of `tests` reported a rate, and no error reached redis-benchmark (it prints
/// server errors to stderr and exits non-zero).
fn check_benchmark(out: &Output, tests: &str) {
    let stdout = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "redis-benchmark failed: {stderr}");
    assert!(!stderr.contains("Error"), "{stderr}");
    for test in tests.split(',') {
        let label = match test {
            "mset" => "MSET (10 keys):".to_string(),
            other => format!("{}:", other.to_ascii_uppercase()),
        };
        let reported = stdout
            .lines()
            .any(|l| l.trim_start().starts_with(&label) && l.contains("requests per second"));
        assert!(reported, "no {label} result in\n{stdout}");
    }
}

#[test]
fn redis_benchmark_runs_its_string_tests_without_errors() {
    let test = "redis_benchmark_runs_its_string_tests_without_errors";
    let Some(bench) = outside_tool("redis-benchmark", test) else { return };
    let dir = scratch("bench-plain");
    let server = Server::start(&dir.path().join("data"), &["--size", "8M", "--cache-bytes", "2M"]);
    let tests = redis_benchmark_tests(&mut server.client());
    let out = run(
        "redis-benchmark",
        Command::new(&bench)
            .args(["-h", "127.0.0.1", "-p", &server.port.to_string()])
            .args(["-t", &tests, "-n", "2000", "-c", "10", "-r", "1000", "-P", "4", "-q"]),
    );
    check_benchmark(&out, &tests);
    let dbsize = server.client().cmds(&["DBSIZE"]);
    assert!(matches!(dbsize, Reply::Int(n) if n > 0), "SET and MSET wrote keys: {dbsize:?}");
}

#[test]
fn redis_benchmark_cluster_mode_spreads_over_three_nodes() {
    let test = "redis_benchmark_cluster_mode_spreads_over_three_nodes";
    let Some(bench) = outside_tool("redis-benchmark", test) else { return };
    let dir = scratch("bench-cluster");
    let (nodes, ports) = three_nodes(dir.path(), true, 1);
    let mut first = nodes[0].client();
    let tests = redis_benchmark_tests(&mut first);
    let out = run(
        "redis-benchmark --cluster",
        Command::new(&bench)
            .args(["--cluster", "-h", "127.0.0.1", "-p", &ports[1].to_string()])
            .args(["-t", &tests, "-n", "3000", "-c", "6", "-q"]),
    );
    check_benchmark(&out, &tests);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Cluster has 3 master nodes"), "{stdout}");
    // In cluster mode redis-benchmark ignores error replies other than redirects, so look at
    // what it wrote: each client uses a hash tag of its node's first slot, and SET / MSET
    // wrote `key:{tag}:__rand_int__` there (INCR `counter:{tag}:__rand_int__`).
    for (node, first_slot) in nodes.iter().zip(["0", "5461", "10922"]) {
        let mut c = node.client();
        let Reply::Array(keys) = c.cmds(&["CLUSTER", "GETKEYSINSLOT", first_slot, "10"]) else {
            panic!("GETKEYSINSLOT gives an array")
        };
        let names: Vec<String> = keys
            .iter()
            .map(|k| String::from_utf8_lossy(&k.bytes().expect("a key")).into())
            .collect();
        let key = names.iter().find(|k| k.starts_with("key:{")).unwrap_or_else(|| {
            panic!("no benchmark key in slot {first_slot} of node {}: {names:?}", node.port)
        });
        assert!(matches!(c.cmds(&["GET", key]), Reply::Bulk(Some(v)) if v.len() == 3));
        if tests.contains("incr") {
            let counter = names.iter().find(|k| k.starts_with("counter:{"));
            let counter = counter.unwrap_or_else(|| panic!("no INCR counter: {names:?}"));
            let value = c.cmds(&["GET", counter]).bytes().expect("a counter");
            assert!(String::from_utf8_lossy(&value).parse::<u64>().is_ok_and(|n| n > 0));
        }
    }
}

#[test]
fn redis_py_matches_a_model_on_one_node() {
    let test = "redis_py_matches_a_model_on_one_node";
    let Some(python) = python_with_redis(test) else { return };
    let dir = scratch("py-single");
    let server = Server::start(&dir.path().join("data"), &["--size", "8M", "--cache-bytes", "2M"]);
    let commands = model_commands(&mut server.client());
    run_model(&python, server.port, "single", 1, &commands);
}

#[test]
fn redis_py_cluster_client_matches_a_model_on_three_nodes() {
    let test = "redis_py_cluster_client_matches_a_model_on_three_nodes";
    let Some(python) = python_with_redis(test) else { return };
    let dir = scratch("py-cluster");
    let (nodes, ports) = three_nodes(dir.path(), true, 1);
    let commands = model_commands(&mut nodes[0].client());
    run_model(&python, ports[2], "cluster", 2, &commands);
    for node in &nodes {
        let dbsize = node.client().cmds(&["DBSIZE"]);
        assert!(matches!(dbsize, Reply::Int(n) if n > 0), "keys on {}: {dbsize:?}", node.port);
    }
}

/// A running nutcracker, killed when dropped.
struct Nutcracker(Child);

impl Drop for Nutcracker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn twemproxy_spreads_keys_over_three_nodes() {
    let test = "twemproxy_spreads_keys_over_three_nodes";
    let Some(nutcracker) = outside_tool("nutcracker", test) else { return };
    let Some(python) = python_with_redis(test) else { return };
    let dir = scratch("twemproxy");
    let (nodes, ports) = three_nodes(dir.path(), false, 1);
    // The documented configuration, on free ports.
    let [listen, stats] = free_ports(2)[..] else { unreachable!("two ports") };
    let documented = Path::new(env!("CARGO_MANIFEST_DIR")).join("twemproxy/nutcracker.yml");
    let mut config = std::fs::read_to_string(&documented).expect("read nutcracker.yml");
    config = config.replace("127.0.0.1:22121", &format!("127.0.0.1:{listen}"));
    for (documented_port, port) in ["7379", "7380", "7381"].iter().zip(&ports) {
        config =
            config.replace(&format!("127.0.0.1:{documented_port}:"), &format!("127.0.0.1:{port}:"));
    }
    let config_path = dir.path().join("nutcracker.yml");
    std::fs::write(&config_path, config).expect("write the configuration");
    let child = Command::new(&nutcracker)
        .arg("-c")
        .arg(&config_path)
        .arg("-o")
        .arg(dir.path().join("nutcracker.log"))
        // Its stats port listens on 0.0.0.0 unless told otherwise.
        .args(["-a", "127.0.0.1", "-s", &stats.to_string()])
        .stdin(Stdio::null())
        .spawn()
        .expect("start nutcracker");
    let _proxy = Nutcracker(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", listen)).is_err() {
        assert!(Instant::now() < deadline, "nutcracker is not listening on {listen}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let commands = model_commands(&mut nodes[0].client());
    run_model(&python, listen, "twemproxy", 3, &commands);
    // Keys that differ only in their last bytes are spread too (the documented hash).
    let sizes: Vec<Reply> = nodes.iter().map(|n| n.client().cmds(&["DBSIZE"])).collect();
    eprintln!("keys per node behind twemproxy: {sizes:?}");
    for node in &nodes {
        let dbsize = node.client().cmds(&["DBSIZE"]);
        assert!(matches!(dbsize, Reply::Int(n) if n > 0), "keys on {}: {dbsize:?}", node.port);
    }
}
