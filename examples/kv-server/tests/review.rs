//! Review findings: each test demonstrates a bug that was found (and fixed) in review.

mod common;

use std::time::{Duration, Instant};

use common::{bulk, info_field, ok, pattern, scratch, wait_all_free, Client, Reply, Server};

const KIB: usize = 1 << 10;

/// APPEND / SETRANGE with an argument longer than one record take the connection's large-edit
/// path. Under `--fsync always` their answer must wait for the key owner's log commit, as every
/// other write's does: a SIGKILL right after the answer must not lose them.
#[test]
fn a_large_append_or_setrange_is_durable_once_answered() {
    let dir = scratch("rv-largeedit");
    let path = dir.path().join("data");
    let args = ["--size", "64M", "--shards", "2", "--cache-bytes", "8M", "--fsync", "always"];
    let server = Server::start(&path, &args);
    let mut c = server.client();
    let a = pattern(1, 100 * KIB);
    let b = pattern(2, 70 * KIB);
    // A missing key and a small one: nothing to free afterwards, so no other commit runs.
    assert_eq!(c.cmd(&[b"APPEND", b"fresh", &a]), Reply::Int(a.len() as i64));
    assert_eq!(c.cmd(&[b"SET", b"small", b"0123456789"]), ok());
    assert_eq!(c.cmd(&[b"APPEND", b"small", &b]), Reply::Int(10 + b.len() as i64));
    assert_eq!(c.cmd(&[b"SETRANGE", b"ranged", b"5", &b]), Reply::Int(5 + b.len() as i64));
    server.kill9();
    let server = Server::start(&path, &args);
    let mut c = server.client();
    assert!(c.cmd(&[b"GET", b"fresh"]) == bulk(&a), "APPEND of a missing key lost");
    let mut small = b"0123456789".to_vec();
    small.extend_from_slice(&b);
    assert!(c.cmd(&[b"GET", b"small"]) == bulk(&small), "APPEND of a small value lost");
    let mut ranged = vec![0u8; 5];
    ranged.extend_from_slice(&b);
    assert!(c.cmd(&[b"GET", b"ranged"]) == bulk(&ranged), "SETRANGE of a missing key lost");
    server.shutdown();
}

/// A large SET whose expiry is already past deletes the key instead of writing the manifest:
/// the chunks it wrote are then named by nothing and must be deleted again, not leaked.
#[test]
fn a_large_set_with_a_past_expiry_leaks_no_chunks() {
    let dir = scratch("rv-pastexp");
    let server = Server::start(&dir.path().join("data"), &["--size", "32M", "--shards", "2"]);
    let mut c = server.client();
    let v = pattern(3, 300 * KIB);
    // Key absent, and key present (a plain SET, and SET ... GET).
    assert_eq!(c.cmd(&[b"SET", b"k", &v, b"PXAT", b"1"]), ok());
    assert_eq!(c.cmd(&[b"SET", b"k", b"old"]), ok());
    assert_eq!(c.cmd(&[b"SET", b"k", &v, b"PXAT", b"1"]), ok());
    assert_eq!(c.cmd(&[b"SET", b"k", b"old"]), ok());
    assert_eq!(c.cmd(&[b"SET", b"k", &v, b"EXAT", b"1", b"GET"]), bulk(b"old"));
    assert_eq!(c.cmd(&[b"SET", b"k", &v, b"PX", b"1"]), ok());
    assert_eq!(c.cmds(&["EXISTS", "k"]), Reply::Int(0));
    assert_eq!(c.cmds(&["DBSIZE"]), Reply::Int(0));
    // The chunks go in the background: wait for them.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stats = c.cmds(&["INFO", "stats"]);
        let (written, deleted) =
            (info_field(&stats, "chunks_written"), info_field(&stats, "chunks_deleted"));
        if written == deleted {
            break;
        }
        assert!(Instant::now() < deadline, "{written} chunks written, {deleted} deleted");
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_all_free(&mut c, "chunks of SETs that expired at once");
    server.shutdown();
}

/// FLUSHALL racing a large SET: whatever the order, the key afterwards is either absent or
/// holds the value; never a manifest whose chunks FLUSHALL removed under it.
#[test]
fn flushall_racing_a_large_set_never_leaves_a_damaged_value() {
    let dir = scratch("rv-flushrace");
    // FLUSHALL frees a removed value's chunks after its checkpoint, and their blocks come back
    // after the next barrier: under a FLUSHALL in a loop the space of several 2 MiB values is
    // in use at any time, and a SET may find a range full (counted, not a failure here).
    let server = Server::start(&dir.path().join("data"), &["--size", "160M", "--shards", "2"]);
    let port = server.port;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flusher = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut c = Client::connect(port);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                c.send_raw(&common::encode(&[b"FLUSHALL"]));
                if c.try_read_reply().is_err() {
                    break;
                }
            }
        })
    };
    let mut c = server.client();
    let v = pattern(9, 2 << 20);
    let (mut damaged, mut broken, mut full) = (0, 0, 0);
    for round in 0..40 {
        let key = format!("k{round}");
        match c.cmd(&[b"SET", key.as_bytes(), &v]) {
            r if r == ok() => {}
            r if r.is_error_with("out of space") => {
                full += 1;
                continue;
            }
            r => panic!("round {round}: SET answered {r:?}"),
        }
        c.send_raw(&common::encode(&[b"GET", key.as_bytes()]));
        match c.try_read_reply() {
            Ok(Reply::Bulk(None)) => {}
            Ok(Reply::Bulk(Some(got))) => assert!(got == v, "round {round}: wrong bytes"),
            Ok(Reply::Error(e)) => {
                eprintln!("round {round}: {e}");
                damaged += 1;
            }
            Ok(other) => panic!("round {round}: {other:?}"),
            Err(e) => {
                // FLUSHALL deleted pinned chunks mid-reply: the server closes the connection.
                eprintln!("round {round}: the GET reply broke off: {e}");
                broken += 1;
                c = server.client();
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flusher.join().expect("the flusher");
    assert_eq!((damaged, broken), (0, 0), "GETs that found a damaged value, or broke off");
    assert!(full <= 30, "{full} of 40 SETs found no room: the race was hardly exercised");
    // Nothing leaked: one more FLUSHALL gives every block back.
    assert_eq!(c.cmds(&["FLUSHALL"]), ok());
    wait_all_free(&mut c, "chunks after FLUSHALL raced large SETs");
    server.shutdown();
}

/// A large value whose expiry passes while the server is down after a crash: the log replay
/// applies its manifest's SET as a DEL, and nothing frees its chunks (replayed on their owners).
#[test]
fn a_large_value_that_expires_across_a_crash_leaks_no_chunks() {
    let dir = scratch("rv-replayexp");
    let path = dir.path().join("data");
    let args = ["--size", "32M", "--shards", "2", "--fsync", "always"];
    let server = Server::start(&path, &args);
    let mut c = server.client();
    let v = pattern(4, 1 << 20);
    assert_eq!(c.cmd(&[b"SET", b"k", &v, b"PX", b"1500"]), ok());
    server.kill9();
    std::thread::sleep(Duration::from_millis(2000));
    let server = Server::start(&path, &args);
    let mut c = server.client();
    assert_eq!(c.cmds(&["EXISTS", "k"]), Reply::Int(0));
    assert_eq!(c.cmds(&["DBSIZE"]), Reply::Int(0));
    wait_all_free(&mut c, "chunks of a value that expired across a crash");
    server.shutdown();
}

/// Cluster mode: a large value for another node's slot is redirected, and an MSET with a
/// large value over several slots is refused, before any chunk is written here, as every
/// other write is (the value would otherwise be stored on a node that never serves it).
#[test]
fn cluster_redirects_come_before_large_writes() {
    let dir = scratch("rv-clusterlarge");
    let (nodes, _ports) = common::three_nodes(dir.path(), true, 1);
    let mut c = nodes[0].client();
    // "foo" hashes to slot 12182 (the third node); "a" to 15495, "b" to 3300 (this node).
    let big = pattern(5, 100 * KIB);
    let moved = c.cmd(&[b"SET", b"foo", &big]);
    assert!(moved.is_error_with("MOVED 12182 "), "SET of another node's key: {moved:?}");
    let moved = c.cmd(&[b"APPEND", b"foo", &big]);
    assert!(moved.is_error_with("MOVED 12182 "), "APPEND of another node's key: {moved:?}");
    let cross = c.cmd(&[b"MSET", b"b", &big, b"a", b"1"]);
    assert!(cross.is_error_with("CROSSSLOT"), "MSET over two slots: {cross:?}");
    assert_eq!(c.cmds(&["EXISTS", "b"]), Reply::Int(0), "nothing of the refused MSET stays");
    let info = c.cmds(&["INFO", "stats"]);
    assert_eq!(info_field(&info, "chunks_written"), 0, "no chunk written for refused writes");
    for node in nodes {
        node.shutdown();
    }
}

/// A crash in the middle of FLUSHALL (not yet answered) may leave any subset of the keys, but
/// never a large value whose manifest survived while its chunks were removed: FLUSHALL removed
/// chunks and manifests in whatever order the ranges came, and evictions wrote some of that
/// back before the crash.
#[test]
fn a_crash_during_flushall_leaves_no_damaged_large_value() {
    let dir = scratch("rv-flushcrash");
    let path = dir.path().join("data");
    let args = ["--size", "96M", "--shards", "2", "--fsync", "always", "--cache-bytes", "2M"];
    let values: Vec<Vec<u8>> = (0..8).map(|i| pattern(40 + i, 4 << 20)).collect();
    let mut damaged = Vec::new();
    for delay_ms in [5u64, 10, 20, 40, 400] {
        let _ = std::fs::remove_file(&path);
        let mut log = path.clone().into_os_string();
        log.push(".log");
        let _ = std::fs::remove_file(&log);
        let server = Server::start(&path, &args);
        let mut c = server.client();
        for (i, v) in values.iter().enumerate() {
            assert_eq!(c.cmd(&[b"SET", format!("k{i}").as_bytes(), v]), ok());
        }
        assert_eq!(c.cmds(&["SAVE"]), ok(), "everything in the data file, the logs empty");
        c.send_raw(&common::encode(&[b"FLUSHALL"]));
        std::thread::sleep(Duration::from_millis(delay_ms));
        server.kill9();
        let server = Server::start(&path, &args);
        let mut c = server.client();
        for (i, v) in values.iter().enumerate() {
            match c.cmd(&[b"GET", format!("k{i}").as_bytes()]) {
                Reply::Bulk(None) => {}
                Reply::Bulk(Some(got)) => assert!(&got == v, "k{i}: wrong bytes"),
                other => damaged.push(format!("after {delay_ms} ms, k{i}: {other:?}")),
            }
        }
        server.shutdown();
    }
    assert!(damaged.is_empty(), "large values damaged by a crash during FLUSHALL:\n{damaged:#?}");
}
