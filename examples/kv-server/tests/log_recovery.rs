//! Recovery through the per-shard write-ahead log: SIGKILL while group commits are in flight,
//! a torn log tail, a corrupt record, a log that wrapped past checkpoints, a log whose region
//! fills (writes wait for a checkpoint), a full data file already ahead of its log, and a
//! replay that stops (the log is kept). After every kill, every acknowledged write is found;
//! the only other value a key may hold is the one whose write the kill interrupted.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{bulk, info_field, ok, pattern, scratch, Client, Reply, Server};

const BLOCK: u64 = 4096;

/// Per key: the last acknowledged value, and the values of writes sent but not answered.
#[derive(Clone, Debug, Default)]
struct Key {
    acked: Option<Vec<u8>>,
    in_flight: Vec<Vec<u8>>,
}

type Model = Arc<Mutex<HashMap<String, Key>>>;

/// The seed of the next value a writer sends.
static VALUE_SEEDS: AtomicU64 = AtomicU64::new(0xABCD);

/// Pipelines of `depth` SETs of distinct keys from `keys` keys of this writer, until stopped
/// or the connection dies; returns the acknowledged count. With `full`, an "out of space"
/// answer is counted there (the key keeps what it held); without, it fails the test.
fn pipelined_writer(
    port: u16,
    name: String,
    (keys, depth, value_len): (u64, u64, usize),
    stop: Arc<AtomicBool>,
    model: Model,
    full: Option<Arc<AtomicU64>>,
) -> u64 {
    let mut c = Client::connect(port);
    let mut acked = 0;
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let batch: Vec<(String, Vec<u8>)> = (0..depth)
            .map(|j| {
                seq += 1;
                let key = format!("{name}:{}", (seq + j) % keys);
                // A value no other write of the test process has (rounds and writers repeat
                // `seq`): a key that lost its acknowledged value cannot pass with an old one.
                let seed = VALUE_SEEDS.fetch_add(1, Ordering::Relaxed);
                (key, pattern(seed, value_len + (seq % 7) as usize))
            })
            .collect();
        let mut request = Vec::new();
        {
            let mut m = model.lock().unwrap();
            for (key, value) in &batch {
                m.entry(key.clone()).or_default().in_flight.push(value.clone());
                request.extend_from_slice(&common::encode(&[b"SET", key.as_bytes(), value]));
            }
        }
        if c.try_send_raw(&request).is_err() {
            break;
        }
        for (key, value) in &batch {
            match c.try_read_reply() {
                Ok(Reply::Simple(s)) if s == "OK" => {
                    let mut m = model.lock().unwrap();
                    let k = m.get_mut(key).unwrap();
                    k.acked = Some(value.clone());
                    k.in_flight.clear();
                    acked += 1;
                }
                Ok(r) if full.is_some() && r.is_error_with("out of space") => {
                    let mut m = model.lock().unwrap();
                    m.get_mut(key).unwrap().in_flight.retain(|v| v != value);
                    full.as_ref().unwrap().fetch_add(1, Ordering::Relaxed);
                }
                Ok(other) => panic!("{key}: unexpected reply {other:?}"),
                Err(_) => return acked,
            }
        }
    }
    acked
}

/// Every key holds its acknowledged value or one whose write was interrupted; the model then
/// adopts what the server holds.
fn verify(server: &Server, model: &Model, what: &str) {
    let mut c = server.client();
    let mut m = model.lock().unwrap();
    for (key, k) in m.iter_mut() {
        let got = match c.cmd(&[b"GET", key.as_bytes()]) {
            Reply::Bulk(v) => v,
            other => panic!("{what}: GET {key}: {other:?}"),
        };
        let fine = got == k.acked || got.as_ref().is_some_and(|g| k.in_flight.contains(g));
        assert!(
            fine,
            "{what}: {key} holds {:?} bytes, acknowledged {:?}",
            got.as_ref().map(Vec::len),
            k.acked.as_ref().map(Vec::len)
        );
        k.acked = got;
        k.in_flight.clear();
    }
}

/// Runs `writers` pipelined writers for `millis`, then SIGKILLs the server; returns the
/// acknowledged count.
fn load_then_kill(
    server: Server,
    model: &Model,
    writers: u64,
    value_len: usize,
    millis: u64,
) -> u64 {
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..writers)
        .map(|t| {
            let (stop, model, port) = (Arc::clone(&stop), Arc::clone(model), server.port);
            std::thread::spawn(move || {
                pipelined_writer(port, format!("w{t}"), (48, 16, value_len), stop, model, None)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(millis));
    server.kill9();
    stop.store(true, Ordering::Relaxed);
    threads.into_iter().map(|t| t.join().expect("writer")).sum()
}

fn log_path(data: &Path) -> PathBuf {
    let mut name = data.as_os_str().to_owned();
    name.push(".log");
    PathBuf::from(name)
}

#[test]
fn a_kill_while_group_commits_are_in_flight_loses_no_acknowledged_write() {
    let dir = scratch("log-kill");
    let path = dir.path().join("data");
    let args = ["--size", "16M", "--shards", "2", "--cache-bytes", "2M", "--fsync", "always"];
    let model = Model::default();
    let mut acked = 0;
    for round in 0..3u64 {
        let server = Server::start(&path, &args);
        if round > 0 {
            verify(&server, &model, &format!("round {round}"));
        }
        acked += load_then_kill(server, &model, 6, 40, 300 + 250 * round);
    }
    assert!(acked > 500, "only {acked} writes were acknowledged");
    let server = Server::start(&path, &args);
    verify(&server, &model, "after the last kill");
    let stderr = server.stderr_with("replayed");
    assert!(stderr.contains("replayed"), "{stderr}");
    server.shutdown();
}

/// Bytes of the log file: a header block, then per shard two header blocks and the data.
fn first_data_byte(shard: u64, region_bytes: u64) -> u64 {
    BLOCK + shard * region_bytes + 2 * BLOCK
}

#[test]
fn a_torn_log_tail_is_cut_and_acknowledged_writes_survive() {
    let dir = scratch("log-torn");
    let path = dir.path().join("data");
    let args = [
        "--size",
        "8M",
        "--shards",
        "1",
        "--cache-bytes",
        "1M",
        "--fsync",
        "always",
        "--log-size",
        "1M",
    ];
    let server = Server::start(&path, &args);
    let mut c = server.client();
    for i in 0..300u64 {
        assert_eq!(c.cmd(&[b"SET", format!("k{i}").as_bytes(), &pattern(i, 50)]), ok());
    }
    server.kill9();
    // A torn record after the last one: its magic, then junk (what a commit cut by power
    // loss in the middle of its write leaves).
    let log = std::fs::OpenOptions::new().read(true).write(true).open(log_path(&path)).unwrap();
    let start = first_data_byte(0, 1 << 20);
    let mut data = vec![0u8; (1 << 20) - 2 * BLOCK as usize];
    log.read_exact_at(&mut data, start).unwrap();
    let end = data.iter().rposition(|&b| b != 0).expect("records in the log") as u64 + 1;
    let at = end.next_multiple_of(8);
    let mut torn = b"CBLR".to_vec();
    torn.extend_from_slice(&pattern(7, 60));
    log.write_all_at(&torn, start + at).unwrap();
    log.sync_all().unwrap();
    drop(log);
    let server = Server::start(&path, &args);
    let mut c = server.client();
    for i in 0..300u64 {
        assert_eq!(c.cmd(&[b"GET", format!("k{i}").as_bytes()]), bulk(pattern(i, 50)), "k{i}");
    }
    // Appends continue where the valid log ended, and survive another kill.
    assert_eq!(c.cmd(&[b"SET", b"after", b"torn"]), ok());
    server.kill9();
    let server = Server::start(&path, &args);
    assert_eq!(server.client().cmd(&[b"GET", b"after"]), bulk("torn"));
    server.shutdown();
}

#[test]
fn a_corrupt_log_record_is_a_clear_error_at_start() {
    let dir = scratch("log-corrupt");
    let path = dir.path().join("data");
    let args = [
        "--size",
        "8M",
        "--shards",
        "1",
        "--cache-bytes",
        "1M",
        "--fsync",
        "always",
        "--log-size",
        "1M",
    ];
    let server = Server::start(&path, &args);
    let mut c = server.client();
    for i in 0..50u64 {
        assert_eq!(c.cmd(&[b"SET", format!("k{i}").as_bytes(), &pattern(i, 20)]), ok());
    }
    server.kill9();
    // Damage the first record's payload; later records were committed after it was durable.
    let log = std::fs::OpenOptions::new().read(true).write(true).open(log_path(&path)).unwrap();
    let at = first_data_byte(0, 1 << 20) + 32 + 9;
    let mut byte = [0u8; 1];
    log.read_exact_at(&mut byte, at).unwrap();
    log.write_all_at(&[byte[0] ^ 0x20], at).unwrap();
    log.sync_all().unwrap();
    let err = Server::try_start(&path, &args).err().expect("the server must refuse to start");
    assert!(err.contains("corrupt log record at log position 0"), "{err}");
}

#[test]
fn replay_of_a_log_that_wrapped_past_checkpoints() {
    let dir = scratch("log-wrap");
    let path = dir.path().join("data");
    // 16 blocks per shard: 56 KiB of log, checkpointed at half; the load wraps it many times.
    let args = [
        "--size",
        "16M",
        "--shards",
        "2",
        "--cache-bytes",
        "64M",
        "--fsync",
        "always",
        "--log-size",
        "64K",
    ];
    let model = Model::default();
    let server = Server::start(&path, &args);
    let mut c = server.client();
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let (stop, model, port) = (Arc::clone(&stop), Arc::clone(&model), server.port);
            std::thread::spawn(move || {
                pipelined_writer(port, format!("w{t}"), (48, 16, 300), stop, model, None)
            })
        })
        .collect();
    let mut checkpoints = 0;
    for _ in 0..300 {
        std::thread::sleep(Duration::from_millis(20));
        checkpoints = info_field(&c.cmds(&["INFO", "persistence"]), "log_checkpoints");
        if checkpoints >= 6 {
            break;
        }
    }
    assert!(checkpoints >= 6, "the log wrapped past only {checkpoints} checkpoints");
    server.kill9();
    stop.store(true, Ordering::Relaxed);
    let acked: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(acked > 200);
    let server = Server::start(&path, &args);
    verify(&server, &model, "after wrapping");
    server.shutdown();
}

#[test]
fn a_full_log_region_makes_writes_wait_for_a_checkpoint_without_loss() {
    let dir = scratch("log-full");
    let path = dir.path().join("data");
    // 56 KiB of log and values of ~12 KiB: four records fill it, so appends hit a full log
    // while checkpoints run, and wait.
    let args = [
        "--size",
        "32M",
        "--shards",
        "1",
        "--cache-bytes",
        "64M",
        "--fsync",
        "always",
        "--log-size",
        "64K",
    ];
    let model = Model::default();
    let server = Server::start(&path, &args);
    let port = server.port;
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..3u64)
        .map(|t| {
            let (stop, model) = (Arc::clone(&stop), Arc::clone(&model));
            std::thread::spawn(move || {
                pipelined_writer(port, format!("w{t}"), (8, 4, 12_000), stop, model, None)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let info = Client::connect(port).cmds(&["INFO", "persistence"]);
    let checkpoints = info_field(&info, "log_checkpoints");
    server.kill9();
    stop.store(true, Ordering::Relaxed);
    let acked: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(checkpoints >= 3, "{checkpoints} checkpoints");
    assert!(acked > 20, "{acked} acknowledged");
    let server = Server::start(&path, &args);
    verify(&server, &model, "after a full log");
    server.shutdown();
}

/// SETs `fill:0`, `fill:1`, ... (4000 bytes, `pattern(seed + i)`) until the answer is "out of
/// space"; returns how many were stored.
fn fill_until_full(c: &mut Client, seed: u64) -> u64 {
    let mut filled = 0u64;
    loop {
        let key = format!("fill:{filled}");
        match c.cmd(&[b"SET", key.as_bytes(), &pattern(seed + filled, 4000)]) {
            r if r == ok() => filled += 1,
            r if r.is_error_with("out of space") => return filled,
            other => panic!("{key}: {other:?}"),
        }
        assert!(filled < 1000, "the region never filled");
    }
}

/// The data file can be ahead of the log: write-back and barriers write blocks whatever the
/// log's checkpoint, so a crash can leave a file that already holds the state after the log's
/// records. Replaying them in turn onto a full region needed room that only existed back when
/// the records were appended (a replacement writes its new value before the old one goes; a
/// key deleted later in the log still wants its block back), and start-up stopped on "out of
/// space". Here the region is full to its last block and the log holds the records that led
/// there: a replacement, a key set then deleted, and the SETs that filled it.
#[test]
fn a_full_data_file_ahead_of_its_log_replays() {
    let dir = scratch("log-ahead");
    let path = dir.path().join("data");
    // One shard and one data region of 191 pool blocks (region 0 is the file's own), each
    // 4000-byte value a block of its own.
    let args = ["--size", "2M", "--shards", "1", "--cache-bytes", "4M", "--fsync", "always"];
    let server = Server::start(&path, &args);
    let mut c = server.client();
    assert_eq!(c.cmd(&[b"SET", b"replaced", &pattern(1, 4000)]), ok());
    assert_eq!(c.cmd(&[b"SET", b"replaced", &pattern(2, 4000)]), ok());
    assert_eq!(c.cmd(&[b"SET", b"deleted", &pattern(3, 4000)]), ok());
    assert_eq!(c.cmds(&["DEL", "deleted"]), Reply::Int(1));
    let filled = fill_until_full(&mut c, 100);
    assert!(filled > 150, "only {filled} values fit");
    let check = |server: &Server, what: &str| {
        let mut c = server.client();
        assert_eq!(c.cmd(&[b"GET", b"replaced"]), bulk(pattern(2, 4000)), "{what}");
        assert_eq!(c.cmd(&[b"GET", b"deleted"]), Reply::Bulk(None), "{what}");
        for i in 0..filled {
            let key = format!("fill:{i}");
            assert_eq!(c.cmd(&[b"GET", key.as_bytes()]), bulk(pattern(100 + i, 4000)), "{what}");
        }
        assert_eq!(c.cmds(&["DBSIZE"]), Reply::Int(filled as i64 + 1), "{what}");
    };
    server.kill9();
    let log = log_path(&path);
    let records = std::fs::read(&log).unwrap();
    // A first replay, and a clean shutdown: the data file holds the state after the log.
    let server = Server::start(&path, &args);
    let stderr = server.stderr_with("replayed");
    assert!(stderr.contains("replayed"), "{stderr}");
    check(&server, "after the first replay");
    server.shutdown();
    // The log as the crash left it, beside that file: a crash after all of it was written back.
    std::fs::write(&log, &records).unwrap();
    let server = Server::start(&path, &args);
    let stderr = server.stderr_with("replayed");
    assert!(stderr.contains("replayed"), "{stderr}");
    assert!(stderr.contains("applied after removing the key"), "{stderr}");
    check(&server, "after replaying onto the full file");
    server.shutdown();
    let server = Server::start(&path, &args);
    check(&server, "after a clean restart");
    server.shutdown();
}

/// A start that stops while replaying must keep the log: it used to shut the engine down
/// cleanly, which marked the log empty, so the next start came up without the acknowledged
/// writes the log still held. Here the records cannot fit: the data file beside the log holds
/// keys the log knows nothing of (taken from another history: a copy of an older log).
#[test]
fn a_replay_that_stops_keeps_the_log_for_the_next_start() {
    let dir = scratch("log-kept");
    let path = dir.path().join("data");
    let args = ["--size", "2M", "--shards", "1", "--cache-bytes", "4M", "--fsync", "always"];
    let server = Server::start(&path, &args);
    let mut c = server.client();
    assert!(fill_until_full(&mut c, 0) > 150, "the region held too few values");
    server.kill9();
    let log = log_path(&path);
    let records = std::fs::read(&log).unwrap();
    // Replayed; then ten keys make way for ten others, and a clean shutdown.
    let server = Server::start(&path, &args);
    let mut c = server.client();
    for i in 0..10u64 {
        assert_eq!(c.cmd(&[b"DEL", format!("fill:{i}").as_bytes()]), Reply::Int(1));
    }
    for i in 0..10u64 {
        let key = format!("other:{i}");
        assert_eq!(c.cmd(&[b"SET", key.as_bytes(), &pattern(5000 + i, 4000)]), ok(), "{key}");
    }
    server.shutdown();
    // The old log beside that file: its SETs of fill:0..9 do not fit.
    std::fs::write(&log, &records).unwrap();
    // Twice: a start that came up the second time would have lost fill:0..9's records.
    for attempt in 0..2 {
        let Err(err) = Server::try_start(&path, &args) else {
            panic!("start {attempt} came up: the log was emptied by the failed start before it")
        };
        assert!(err.contains("replay the log of shard 0") && err.contains("out of space"), "{err}");
    }
}

/// The same kills, in a data file too small for the keys written: regions fill, SETs are
/// refused, write-back keeps the file ahead of the log, and every replay meets full regions.
#[test]
fn kills_while_the_data_file_is_full_lose_no_acknowledged_write() {
    let dir = scratch("log-kill-full");
    let path = dir.path().join("data");
    // One region of 191 blocks for 4 x 45 keys of ~4000 bytes (a block each); a 1 MiB cache.
    let args = ["--size", "2M", "--shards", "1", "--cache-bytes", "1M", "--fsync", "always"];
    let model = Model::default();
    let full = Arc::new(AtomicU64::new(0));
    let (mut acked, mut replays_when_full) = (0, 0);
    for round in 0..4u64 {
        let server = Server::start(&path, &args);
        if round > 0 {
            verify(&server, &model, &format!("round {round}"));
            // (The start-up line says both, once it is there.)
            let stderr = server.stderr_with("replayed");
            replays_when_full += stderr.contains("applied after removing the key") as u32;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let (stop, model, port) = (Arc::clone(&stop), Arc::clone(&model), server.port);
                let full = Some(Arc::clone(&full));
                std::thread::spawn(move || {
                    pipelined_writer(port, format!("w{t}"), (45, 8, 4000), stop, model, full)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(400 + 200 * round));
        server.kill9();
        stop.store(true, Ordering::Relaxed);
        acked += threads.into_iter().map(|t| t.join().expect("writer")).sum::<u64>();
    }
    assert!(acked > 500, "only {acked} writes were acknowledged");
    assert!(full.load(Ordering::Relaxed) > 0, "the region never filled");
    // (Each replay so far took that way for most keys: the file is ahead and full.)
    assert!(replays_when_full > 0, "no replay met a full region");
    let server = Server::start(&path, &args);
    verify(&server, &model, "after the last kill");
    server.shutdown();
}
