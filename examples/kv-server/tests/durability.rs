//! Durability and integrity: clean restarts (SHUTDOWN, SIGTERM, another shard count), SIGKILL
//! crashes under load with every acknowledged write found afterwards, and damaged or foreign
//! files refused with a clear error instead of garbage.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{bulk, info_field, ok, pattern, scratch, Client, Reply, Server};

const BLOCK: u64 = 4096;
const RANGE_BLOCKS: u64 = 256;
const BUCKETS: u64 = 64;

#[test]
fn clean_restarts_keep_everything() {
    let dir = scratch("restart");
    let path = dir.path().join("data");
    let server = Server::start(&path, &["--size", "16M", "--shards", "2", "--cache-bytes", "1M"]);
    let mut c = server.client();
    for i in 0..500 {
        assert_eq!(
            c.cmd(&[b"SET", format!("k{i}").as_bytes(), &pattern(i, (i * 131 % 9000) as usize)]),
            ok()
        );
    }
    server.shutdown();

    // SIGTERM is a clean shutdown too; and the shard count may change between runs.
    let server = Server::start(&path, &["--shards", "3", "--cache-bytes", "1M"]);
    let mut c = server.client();
    assert_eq!(c.cmds(&["DBSIZE"]), Reply::Int(500));
    for i in 0..500 {
        assert_eq!(
            c.cmd(&[b"GET", format!("k{i}").as_bytes()]),
            bulk(pattern(i, (i * 131 % 9000) as usize))
        );
    }
    for i in 0..100 {
        assert_eq!(c.cmd(&[b"DEL", format!("k{i}").as_bytes()]), Reply::Int(1));
    }
    let mut server = server;
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(60)).expect("exit status");
    assert!(status.success(), "{status:?}: {}", server.stderr());
    assert!(server.stderr().contains("stopped cleanly"));
    drop(server);

    let server = Server::start(&path, &["--shards", "1", "--cache-bytes", "1M"]);
    let mut c = server.client();
    assert_eq!(c.cmds(&["DBSIZE"]), Reply::Int(400));
    assert_eq!(c.cmds(&["GET", "k5"]), Reply::Bulk(None));
    assert_eq!(c.cmd(&[b"GET", b"k105"]), bulk(pattern(105, 105 * 131 % 9000)));
    assert_eq!(info_field(&c.cmds(&["INFO", "storage"]), "ranges_rebuilt"), 0);
    server.shutdown();
}

/// What a writer thread did to one key: the last acknowledged state, and an operation sent
/// whose reply never came (the crash hit it).
#[derive(Clone, Debug, Default)]
struct KeyModel {
    acked: Option<Vec<u8>>,
    in_flight: Option<Option<Vec<u8>>>,
}

fn writer(
    port: u16,
    thread: u64,
    round: u64,
    stop: Arc<AtomicBool>,
    model: Arc<Mutex<HashMap<String, KeyModel>>>,
) -> u64 {
    let mut c = Client::connect(port);
    let mut acked = 0;
    let mut x = thread * 7919 + round * 104_729 + 1;
    for i in 0.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let key = format!("t{thread}:k{}", x % 40);
        let op = x % 20;
        // Small values mostly; some large ones (extent blocks, moved records); some deletes.
        let new_state = match op {
            0..=2 => None,
            3..=5 => Some(pattern(x, 4000 + (x % 30_000) as usize)),
            _ => Some(pattern(x, 1 + (x % 300) as usize)),
        };
        let request = match &new_state {
            None => common::encode(&[b"DEL", key.as_bytes()]),
            Some(v) => common::encode(&[b"SET", key.as_bytes(), v]),
        };
        model.lock().unwrap().entry(key.clone()).or_default().in_flight = Some(new_state.clone());
        if c.try_send_raw(&request).is_err() {
            break;
        }
        match c.try_read_reply() {
            Ok(Reply::Simple(_)) | Ok(Reply::Int(_)) => {
                let mut m = model.lock().unwrap();
                let k = m.get_mut(&key).unwrap();
                k.acked = new_state;
                k.in_flight = None;
                acked += 1;
            }
            Ok(other) => panic!("thread {thread} op {i}: unexpected reply {other:?}"),
            Err(_) => break,
        }
    }
    acked
}

#[test]
fn sigkill_under_fsync_always_loses_no_acknowledged_write() {
    let dir = scratch("crash");
    let path = dir.path().join("data");
    let model: Arc<Mutex<HashMap<String, KeyModel>>> = Arc::default();
    let args = ["--size", "16M", "--shards", "2", "--cache-bytes", "1M", "--fsync", "always"];
    let mut total_acked = 0;
    for round in 0..4u64 {
        let server = Server::start(&path, &args);
        if round > 0 {
            verify(&server, &model, round);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let (stop, model, port) = (Arc::clone(&stop), Arc::clone(&model), server.port);
                std::thread::spawn(move || writer(port, t, round, stop, model))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(600 + 400 * round));
        server.kill9();
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            total_acked += t.join().expect("writer thread");
        }
    }
    assert!(total_acked > 100, "only {total_acked} writes were acknowledged");
    let server = Server::start(&path, &args);
    verify(&server, &model, 4);
    let info = server.client().cmds(&["INFO", "storage"]);
    eprintln!(
        "crash test: {total_acked} acknowledged writes over 4 kills; last restart rebuilt {} ranges, \
         repaired {} records",
        info_field(&info, "ranges_rebuilt"),
        info_field(&info, "records_repaired")
    );
    assert!(
        info_field(&info, "ranges_rebuilt") > 0,
        "an unclean restart rebuilds the ranges it writes"
    );
    server.shutdown();
}

/// Every key holds its last acknowledged state or the state of the operation the crash
/// interrupted; the model then adopts what the server holds.
fn verify(server: &Server, model: &Arc<Mutex<HashMap<String, KeyModel>>>, round: u64) {
    let mut c = server.client();
    let mut m = model.lock().unwrap();
    let mut present = 0;
    for (key, k) in m.iter_mut() {
        let got = match c.cmd(&[b"GET", key.as_bytes()]) {
            Reply::Bulk(v) => v,
            other => panic!("round {round}: GET {key}: {other:?}"),
        };
        let acceptable = got == k.acked || k.in_flight.as_ref().is_some_and(|f| *f == got);
        assert!(
            acceptable,
            "round {round}: {key} holds {:?} bytes; acknowledged {:?}, in flight {:?}",
            got.as_ref().map(Vec::len),
            k.acked.as_ref().map(Vec::len),
            k.in_flight.as_ref().map(|f| f.as_ref().map(Vec::len))
        );
        present += got.is_some() as i64;
        k.acked = got;
        k.in_flight = None;
    }
    // Every key the writers ever touched is in the model, so DBSIZE must match exactly.
    assert_eq!(c.cmds(&["DBSIZE"]), Reply::Int(present), "round {round}");
}

#[test]
fn sigkill_without_fsync_reopens_consistent() {
    let dir = scratch("crash-no");
    let path = dir.path().join("data");
    let args = ["--size", "16M", "--shards", "2", "--cache-bytes", "1M", "--fsync", "no"];
    for round in 0..3u64 {
        let server = Server::start(&path, &args);
        let mut c = server.client();
        // Whatever survived is a value some SET wrote (each value names its key), never garbage.
        for i in 0..300u64 {
            match c.cmd(&[b"GET", format!("n{i}").as_bytes()]) {
                Reply::Bulk(None) => {}
                Reply::Bulk(Some(v)) => {
                    assert!(v.starts_with(format!("n{i}:").as_bytes()), "round {round}: n{i}")
                }
                other => panic!("round {round}: n{i}: {other:?}"),
            }
        }
        let deadline = Instant::now() + Duration::from_millis(700);
        let mut x = round + 1;
        while Instant::now() < deadline {
            let cmds: Vec<Vec<Vec<u8>>> = (0..50)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let i = (x >> 33) % 300;
                    let key = format!("n{i}").into_bytes();
                    if x % 7 == 0 {
                        vec![b"DEL".to_vec(), key]
                    } else {
                        let mut v = format!("n{i}:").into_bytes();
                        v.extend(pattern(x, ((x >> 20) % 20_000) as usize));
                        vec![b"SET".to_vec(), key, v]
                    }
                })
                .collect();
            c.pipeline(&cmds);
        }
        server.kill9();
    }
    let server = Server::start(&path, &args);
    let mut c = server.client();
    let mut present = 0;
    for i in 0..300u64 {
        match c.cmd(&[b"GET", format!("n{i}").as_bytes()]) {
            Reply::Bulk(None) => {}
            Reply::Bulk(Some(v)) => {
                assert!(v.starts_with(format!("n{i}:").as_bytes()));
                present += 1;
            }
            other => panic!("n{i}: {other:?}"),
        }
    }
    assert_eq!(c.cmds(&["DBSIZE"]), Reply::Int(present));
    server.shutdown();
}

#[test]
fn a_corrupt_block_is_an_error_never_garbage() {
    let dir = scratch("corrupt");
    let path = dir.path().join("data");
    let args = ["--size", "8M", "--shards", "2", "--cache-bytes", "1M"];
    let server = Server::start(&path, &args);
    let mut c = server.client();
    for i in 0..2000u64 {
        assert_eq!(c.cmd(&[b"SET", format!("c{i}").as_bytes(), &pattern(i, 20)]), ok());
    }
    server.shutdown();
    // Flip a byte in the record area of every bucket head of range 1.
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    for bucket in 0..BUCKETS {
        let offset = (RANGE_BLOCKS + 1 + bucket) * BLOCK + 100;
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, offset).unwrap();
        file.write_all_at(&[byte[0] ^ 0x5A], offset).unwrap();
    }
    file.sync_all().unwrap();
    let server = Server::start(&path, &args);
    let mut c = server.client();
    let mut errors = 0;
    for i in 0..2000u64 {
        match c.cmd(&[b"GET", format!("c{i}").as_bytes()]) {
            Reply::Bulk(Some(v)) => assert_eq!(v, pattern(i, 20), "c{i}"),
            Reply::Error(e) => {
                assert!(e.contains("corrupt block") && e.contains("checksum"), "{e}");
                errors += 1;
            }
            other => panic!("c{i}: {other:?}"),
        }
    }
    assert!(errors > 0 && errors < 2000, "{errors} keys hit the damaged range");
    server.shutdown();
}

#[test]
fn foreign_and_future_files_are_refused() {
    let dir = scratch("foreign");
    let foreign = dir.path().join("foreign");
    let mut bytes = vec![0u8; 4 << 20];
    bytes[..16].copy_from_slice(b"SQLite format 3\0");
    std::fs::write(&foreign, &bytes).unwrap();
    let err = Server::try_start(&foreign, &["--shards", "1", "--cache-bytes", "1M"])
        .err()
        .expect("refused");
    assert!(err.contains("not a corebuf-kv data file"), "{err}");

    let future = dir.path().join("future");
    let mut bytes = vec![0u8; 4 << 20];
    for copy in 0..2 {
        let at = copy * BLOCK as usize;
        bytes[at..at + 4].copy_from_slice(b"CBKV");
        bytes[at + 4..at + 6].copy_from_slice(&9u16.to_le_bytes());
    }
    std::fs::write(&future, &bytes).unwrap();
    let err = Server::try_start(&future, &["--shards", "1", "--cache-bytes", "1M"])
        .err()
        .expect("refused");
    assert!(err.contains("format version 9"), "{err}");

    // A damaged superblock copy falls back to the other one; both damaged is an error.
    let path = dir.path().join("data");
    let server = Server::start(&path, &["--size", "4M", "--shards", "1", "--cache-bytes", "1M"]);
    assert_eq!(server.client().cmds(&["SET", "a", "b"]), ok());
    server.shutdown();
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    file.write_all_at(&[0xFF; 8], 200).unwrap();
    file.sync_all().unwrap();
    let server = Server::start(&path, &["--shards", "1", "--cache-bytes", "1M"]);
    assert_eq!(server.client().cmds(&["GET", "a"]), bulk("b"));
    server.shutdown();
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    file.write_all_at(&[0xFF; 8], 200).unwrap();
    file.write_all_at(&[0xFF; 8], BLOCK + 200).unwrap();
    file.sync_all().unwrap();
    let err =
        Server::try_start(&path, &["--shards", "1", "--cache-bytes", "1M"]).err().expect("refused");
    assert!(err.contains("checksum"), "{err}");
}

#[test]
fn write_back_thresholds_out_of_order_are_refused_before_any_file_is_made() {
    let dir = scratch("dirty-percent");
    let path = dir.path().join("data");
    let args = ["--shards", "1", "--cache-bytes", "1M", "--dirty-high-percent", "10"];
    let err = Server::try_start(&path, &[&args[..], &["--dirty-low-percent", "20"]].concat())
        .err()
        .expect("refused");
    assert!(err.contains("--dirty-low-percent 20 is above --dirty-high-percent 10"), "{err}");
    assert!(!path.exists(), "no data file was created");
    // Both at 100: write-back only at checkpoints and evictions; the server runs.
    let all = ["--size", "4M", "--dirty-high-percent", "100", "--dirty-low-percent", "100"];
    let server = Server::start(&path, &[&args[..4], &all[..]].concat());
    assert_eq!(server.client().cmds(&["SET", "a", "b"]), ok());
    server.shutdown();
}

#[test]
fn one_server_per_data_file_and_per_port() {
    let dir = scratch("exclusive");
    let path = dir.path().join("data");
    let server = Server::start(&path, &["--size", "4M", "--shards", "1", "--cache-bytes", "1M"]);
    let err =
        Server::try_start(&path, &["--shards", "1", "--cache-bytes", "1M"]).err().expect("refused");
    assert!(err.contains("in use by another process"), "{err}");
    // Another file on the same port: refused too, although the listeners use SO_REUSEPORT.
    let other = dir.path().join("other");
    let port = server.port.to_string();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_corebuf-kv"))
        .arg("--path")
        .arg(&other)
        .args(["--size", "4M", "--shards", "1", "--cache-bytes", "1M", "--port", &port])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("a second server on a busy port kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success() && stderr.contains("cannot listen"), "{status:?}: {stderr}");
    assert_eq!(server.client().cmds(&["PING"]), Reply::Simple("PONG".into()));
    server.shutdown();
}

/// A server started on the same port the moment a killed one is reaped comes up: the killed
/// process's listening sockets outlive it for a few milliseconds, accepting connections but
/// answering nothing, and the start-up port check waits them out instead of refusing.
#[test]
fn a_restart_on_the_same_port_right_after_sigkill_comes_up() {
    let dir = scratch("same-port");
    let path = dir.path().join("data");
    let args = ["--size", "8M", "--shards", "2", "--cache-bytes", "1M", "--fsync", "always"];
    let mut server = Server::start(&path, &args);
    let port = server.port;
    for round in 0..3u64 {
        let mut c = server.client();
        let sets: Vec<Vec<Vec<u8>>> = (0..200u64)
            .map(|i| vec![b"SET".to_vec(), format!("p{round}-{i}").into_bytes(), pattern(i, 100)])
            .collect();
        assert!(c.pipeline(&sets).iter().all(|r| *r == ok()));
        server.kill9();
        server = Server::try_start_on(&path, port, &args)
            .unwrap_or_else(|e| panic!("round {round}: restart on port {port} failed: {e}"));
        let mut c = server.client();
        for i in [0u64, 199] {
            let key = format!("p{round}-{i}");
            assert_eq!(c.cmd(&[b"GET", key.as_bytes()]), bulk(pattern(i, 100)), "{key}");
        }
    }
    server.shutdown();
}

#[test]
fn everysec_makes_writes_durable_within_seconds() {
    let dir = scratch("everysec");
    let path = dir.path().join("data");
    let args = ["--size", "8M", "--shards", "2", "--cache-bytes", "1M", "--fsync", "everysec"];
    let server = Server::start(&path, &args);
    let mut c = server.client();
    for i in 0..200u64 {
        assert_eq!(
            c.cmd(&[b"SET", format!("e{i}").as_bytes(), &pattern(i, 3000 + i as usize)]),
            ok()
        );
    }
    // The log is committed every second while anything was written; give it two.
    std::thread::sleep(Duration::from_millis(2500));
    let info = c.cmds(&["INFO", "persistence"]);
    assert!(info_field(&info, "log_commits") >= 1);
    server.kill9();
    let server = Server::start(&path, &args);
    let mut c = server.client();
    for i in 0..200u64 {
        assert_eq!(
            c.cmd(&[b"GET", format!("e{i}").as_bytes()]),
            bulk(pattern(i, 3000 + i as usize)),
            "e{i}"
        );
    }
    assert_eq!(c.cmds(&["DBSIZE"]), Reply::Int(200));
    server.shutdown();
}

/// CRC32C in software (the format's block checksum), for crafting crash states.
fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
        }
    }
    !c
}

/// Marks the newest superblock copy unclean, as if the last run had crashed.
fn mark_unclean(path: &std::path::Path) {
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut newest = (0u64, 0u64);
    for copy in 0..2u64 {
        let mut block = vec![0u8; BLOCK as usize];
        file.read_exact_at(&mut block, copy * BLOCK).unwrap();
        let seq = u64::from_le_bytes(block[32..40].try_into().unwrap());
        if &block[..4] == b"CBKV" && seq >= newest.1 {
            newest = (copy, seq);
        }
    }
    let mut block = vec![0u8; BLOCK as usize];
    file.read_exact_at(&mut block, newest.0 * BLOCK).unwrap();
    block[80] = 0;
    block[24..28].fill(0);
    let crc = crc32c(&block);
    block[24..28].copy_from_slice(&crc.to_le_bytes());
    file.write_all_at(&block, newest.0 * BLOCK).unwrap();
    file.sync_all().unwrap();
}

#[test]
fn crash_leftovers_are_ignored_then_repaired() {
    let dir = scratch("leftovers");
    let path = dir.path().join("data");
    let args = ["--size", "4M", "--shards", "2", "--cache-bytes", "1M", "--fsync", "no"];
    let server = Server::start(&path, &args);
    let mut c = server.client();
    // ~2 MB of 1000-byte values in 3 data ranges: chains of several blocks; a few large values.
    let value = |i: u64| if i % 100 == 7 { pattern(i, 12_000) } else { pattern(i, 1000) };
    const N: u64 = 1500;
    for i in 0..N {
        assert_eq!(c.cmd(&[b"SET", format!("r{i}").as_bytes(), &value(i)]), ok(), "r{i}");
    }
    server.shutdown();
    // A crash after a link (or a record) reached the device but the block it names did not:
    // zero one overflow block and one extent block, and mark the run unclean.
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    let blocks = std::fs::metadata(&path).unwrap().len() / BLOCK;
    let (mut overflow, mut extent) = (None, None);
    for b in RANGE_BLOCKS..blocks {
        let mut head = [0u8; 8];
        file.read_exact_at(&mut head, b * BLOCK).unwrap();
        if &head[..4] == b"CBKV" && head[6] == 4 && overflow.is_none() {
            overflow = Some(b);
        }
        if &head[..4] == b"CBKV" && head[6] == 5 && extent.is_none() {
            extent = Some(b);
        }
    }
    let (overflow, extent) =
        (overflow.expect("an overflow block"), extent.expect("an extent block"));
    for b in [overflow, extent] {
        file.write_all_at(&vec![0u8; BLOCK as usize], b * BLOCK).unwrap();
    }
    file.sync_all().unwrap();
    mark_unclean(&path);

    let server = Server::start(&path, &args);
    let mut c = server.client();
    let mut lost = Vec::new();
    for i in 0..N {
        match c.cmd(&[b"GET", format!("r{i}").as_bytes()]) {
            Reply::Bulk(Some(v)) => assert_eq!(v, value(i), "r{i}"),
            Reply::Bulk(None) => lost.push(i),
            other => panic!("r{i}: {other:?}"),
        }
    }
    assert!(!lost.is_empty(), "the zeroed blocks held records");
    assert!(lost.len() < N as usize / 2, "{} keys lost", lost.len());
    // The rebuild (DBSIZE loads every range) agrees with what GET sees.
    assert_eq!(c.cmds(&["DBSIZE"]), Reply::Int((N as usize - lost.len()) as i64));
    let info = c.cmds(&["INFO", "storage"]);
    assert!(info_field(&info, "ranges_rebuilt") >= 1);
    // Writing everything again works: the cut chains and freed blocks are consistent.
    for i in 0..N {
        assert_eq!(c.cmd(&[b"SET", format!("r{i}").as_bytes(), &value(i)]), ok(), "r{i}");
    }
    assert_eq!(c.cmds(&["DBSIZE"]), Reply::Int(N as i64));
    server.shutdown();
    let server = Server::start(&path, &args);
    let mut c = server.client();
    for i in 0..N {
        assert_eq!(c.cmd(&[b"GET", format!("r{i}").as_bytes()]), bulk(value(i)), "r{i}");
    }
    assert_eq!(c.cmds(&["DBSIZE"]), Reply::Int(N as i64));
    server.shutdown();
}
