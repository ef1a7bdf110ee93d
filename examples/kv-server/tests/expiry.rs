//! Key expiry: EX / PX / EXAT / PXAT / KEEPTTL, TTL and PTTL, the EXPIRE family, lazy expiry,
//! the active sweep deleting keys nobody touches, and expiry surviving a clean restart and a
//! SIGKILL (log replay).

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{bulk, info_field, ok, scratch, Client, Reply, Server};

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_millis() as u64
}

fn int(r: Reply) -> i64 {
    match r {
        Reply::Int(n) => n,
        other => panic!("expected an integer, got {other:?}"),
    }
}

/// Waits until `f` holds (checking every 50 ms), at most `limit`.
fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

#[test]
fn ttl_options_and_the_expire_family() {
    let dir = scratch("expire-cmds");
    let server = Server::start(&dir.path().join("data"), &["--size", "8M", "--shards", "2"]);
    let mut c = server.client();
    assert_eq!(c.cmds(&["TTL", "none"]), Reply::Int(-2));
    assert_eq!(c.cmds(&["PTTL", "none"]), Reply::Int(-2));
    assert_eq!(c.cmds(&["SET", "k", "v"]), ok());
    assert_eq!(c.cmds(&["TTL", "k"]), Reply::Int(-1));
    assert_eq!(c.cmds(&["SET", "k", "v", "EX", "100"]), ok());
    assert!((99..=100).contains(&int(c.cmds(&["TTL", "k"]))));
    assert_eq!(c.cmds(&["SET", "k", "v", "PX", "50000"]), ok());
    assert!((49_000..=50_000).contains(&int(c.cmds(&["PTTL", "k"]))));
    let at = now_ms() / 1000 + 200;
    assert_eq!(c.cmds(&["SET", "k", "v", "EXAT", &at.to_string()]), ok());
    assert!((199..=200).contains(&int(c.cmds(&["TTL", "k"]))));
    assert_eq!(c.cmds(&["EXPIRETIME", "k"]), Reply::Int(at as i64));
    let pat = now_ms() + 300_000;
    assert_eq!(c.cmds(&["SET", "k", "v2", "PXAT", &pat.to_string()]), ok());
    assert_eq!(c.cmds(&["PEXPIRETIME", "k"]), Reply::Int(pat as i64));
    assert_eq!(c.cmds(&["SET", "k", "v3", "KEEPTTL"]), ok());
    assert_eq!(c.cmds(&["PEXPIRETIME", "k"]), Reply::Int(pat as i64), "KEEPTTL keeps it");
    assert_eq!(c.cmds(&["GET", "k"]), bulk("v3"));
    assert_eq!(c.cmds(&["SET", "k", "v4"]), ok());
    assert_eq!(c.cmds(&["TTL", "k"]), Reply::Int(-1), "SET without KEEPTTL clears it");
    // INCR and APPEND keep the TTL; GETSET clears it.
    assert_eq!(c.cmds(&["SET", "n", "1", "EX", "100"]), ok());
    assert_eq!(c.cmds(&["INCR", "n"]), Reply::Int(2));
    assert_eq!(c.cmds(&["APPEND", "n", "0"]), Reply::Int(2));
    assert!(int(c.cmds(&["TTL", "n"])) > 90);
    assert_eq!(c.cmds(&["GETSET", "n", "x"]), bulk("20"));
    assert_eq!(c.cmds(&["TTL", "n"]), Reply::Int(-1));

    assert_eq!(c.cmds(&["EXPIRE", "none", "10"]), Reply::Int(0));
    assert_eq!(c.cmds(&["EXPIRE", "k", "100"]), Reply::Int(1));
    assert!((99..=100).contains(&int(c.cmds(&["TTL", "k"]))));
    assert_eq!(c.cmds(&["EXPIRE", "k", "200", "NX"]), Reply::Int(0));
    assert_eq!(c.cmds(&["EXPIRE", "k", "200", "XX"]), Reply::Int(1));
    assert_eq!(c.cmds(&["EXPIRE", "k", "100", "GT"]), Reply::Int(0));
    assert_eq!(c.cmds(&["EXPIRE", "k", "300", "GT"]), Reply::Int(1));
    assert_eq!(c.cmds(&["EXPIRE", "k", "400", "LT"]), Reply::Int(0));
    assert_eq!(c.cmds(&["PEXPIRE", "k", "150000", "LT"]), Reply::Int(1));
    assert!((149..=150).contains(&int(c.cmds(&["TTL", "k"]))));
    assert_eq!(c.cmds(&["PERSIST", "k"]), Reply::Int(1));
    assert_eq!(c.cmds(&["PERSIST", "k"]), Reply::Int(0));
    assert_eq!(c.cmds(&["EXPIRE", "k", "100", "GT"]), Reply::Int(0), "no TTL is infinite for GT");
    assert_eq!(c.cmds(&["EXPIRE", "k", "100", "XX"]), Reply::Int(0));
    assert_eq!(c.cmds(&["EXPIRE", "k", "100", "LT"]), Reply::Int(1));
    assert_eq!(
        c.cmds(&["EXPIRE", "k", "1", "NX", "XX"]),
        Reply::Error("ERR NX and XX, GT or LT options at the same time are not compatible".into())
    );
    assert_eq!(
        c.cmds(&["EXPIRE", "k", "1", "GT", "LT"]),
        Reply::Error("ERR GT and LT options at the same time are not compatible".into())
    );
    assert_eq!(
        c.cmds(&["EXPIRE", "k", "1", "YY"]),
        Reply::Error("ERR Unsupported option YY".into())
    );
    assert_eq!(
        c.cmds(&["EXPIRE", "k", "x"]),
        Reply::Error("ERR value is not an integer or out of range".into())
    );
    assert_eq!(
        c.cmds(&["EXPIRE", "k", "9223372036854775807"]),
        Reply::Error("ERR invalid expire time in 'expire' command".into())
    );
    let at = (now_ms() / 1000 + 500).to_string();
    assert_eq!(c.cmds(&["EXPIREAT", "k", &at]), Reply::Int(1));
    assert!((499..=500).contains(&int(c.cmds(&["TTL", "k"]))));
    let pat = (now_ms() + 600_000).to_string();
    assert_eq!(c.cmds(&["PEXPIREAT", "k", &pat]), Reply::Int(1));
    assert_eq!(c.cmds(&["PEXPIRETIME", "k"]), Reply::Int(pat.parse().unwrap()));
    // An expiry in the past deletes the key.
    assert_eq!(c.cmds(&["EXPIRE", "k", "-1"]), Reply::Int(1));
    assert_eq!(c.cmds(&["EXISTS", "k"]), Reply::Int(0));
    assert_eq!(c.cmds(&["SET", "p", "v", "PXAT", "1"]), ok());
    assert_eq!(c.cmds(&["GET", "p"]), Reply::Bulk(None), "PXAT in the past: gone at once");
    server.shutdown();
}

#[test]
fn expired_keys_read_as_absent_and_writes_treat_them_as_new() {
    let dir = scratch("expire-lazy");
    // The sweep visits few buckets per tick: the big file keeps it from reaching these keys
    // first most of the time, but the assertions hold whoever deletes them.
    let server = Server::start(&dir.path().join("data"), &["--size", "64M", "--shards", "2"]);
    let mut c = server.client();
    for cmd in [
        vec!["SET", "a", "1", "PX", "300"],
        vec!["SET", "b", "1", "PX", "300"],
        vec!["SET", "c", "5", "PX", "300"],
        vec!["SET", "d", "x", "PX", "300"],
        vec!["SET", "e", "x", "PX", "300"],
    ] {
        assert_eq!(c.cmds(&cmd), ok());
    }
    assert_eq!(c.cmds(&["EXISTS", "a", "b", "c", "d", "e"]), Reply::Int(5));
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(c.cmds(&["GET", "a"]), Reply::Bulk(None));
    assert_eq!(c.cmds(&["MGET", "a", "b"]), Reply::Array(vec![Reply::Bulk(None); 2]));
    assert_eq!(c.cmds(&["EXISTS", "a", "b", "c", "d", "e"]), Reply::Int(0));
    assert_eq!(c.cmds(&["TTL", "a"]), Reply::Int(-2));
    assert_eq!(c.cmds(&["TYPE", "a"]), Reply::Simple("none".into()));
    assert_eq!(c.cmds(&["STRLEN", "a"]), Reply::Int(0));
    assert_eq!(c.cmds(&["SET", "b", "new", "NX"]), ok(), "NX: an expired key is absent");
    assert_eq!(c.cmds(&["TTL", "b"]), Reply::Int(-1));
    assert_eq!(c.cmds(&["INCR", "c"]), Reply::Int(1), "INCR starts from 0");
    assert_eq!(c.cmds(&["APPEND", "d", "y"]), Reply::Int(1));
    assert_eq!(c.cmds(&["DEL", "e"]), Reply::Int(0), "DEL of an expired key counts 0");
    assert_eq!(c.cmds(&["SET", "f", "x", "XX"]), Reply::Bulk(None));
    let Reply::Array(keys) = c.cmds(&["KEYS", "*"]) else { panic!("KEYS gives an array") };
    let mut keys: Vec<Vec<u8>> = keys.into_iter().map(|k| k.bytes().unwrap()).collect();
    keys.sort();
    assert_eq!(keys, vec![b"b".to_vec(), b"c".to_vec(), b"d".to_vec()]);
    server.shutdown();
}

#[test]
fn the_sweep_deletes_expired_keys_nobody_touches() {
    let dir = scratch("expire-sweep");
    let server = Server::start(&dir.path().join("data"), &["--size", "4M", "--shards", "2"]);
    let mut c = server.client();
    let cmds: Vec<Vec<Vec<u8>>> = (0..300)
        .map(|i| {
            // 1.5 s: long enough that DBSIZE below still counts them on a loaded machine.
            let ms = if i % 3 == 0 { "600000" } else { "1500" };
            ["SET", &format!("s{i}"), "v", "PX", ms].map(|a| a.as_bytes().to_vec()).to_vec()
        })
        .collect();
    assert!(c.pipeline(&cmds).iter().all(|r| r == &ok()));
    assert_eq!(c.cmds(&["DBSIZE"]), Reply::Int(300));
    // Nobody reads or writes these keys again: only the sweep can bring DBSIZE down.
    let swept = eventually(Duration::from_secs(30), || c.cmds(&["DBSIZE"]) == Reply::Int(100));
    assert!(swept, "DBSIZE is {:?}", c.cmds(&["DBSIZE"]));
    let info = c.cmds(&["INFO", "stats"]);
    assert_eq!(info_field(&info, "expired_keys"), 200);
    assert!(info_field(&info, "expire_sweep_buckets") > 0);
    assert_eq!(c.cmds(&["EXISTS", "s0", "s3", "s1"]), Reply::Int(2));
    server.shutdown();
}

#[test]
fn the_sweep_rests_without_keys_that_expire_and_wakes_for_one() {
    let dir = scratch("expire-sweep-rest");
    // 8 MiB: 7 data ranges of 64 buckets, so one pass over a shard's buckets takes seconds.
    let server = Server::start(&dir.path().join("data"), &["--size", "8M", "--shards", "2"]);
    let mut c = server.client();
    assert_eq!(c.cmds(&["SET", "plain", "no expiry"]), ok());
    let swept = |c: &mut Client| info_field(&c.cmds(&["INFO", "stats"]), "expire_sweep_buckets");
    // The start's pass visits every bucket once (7 × 64 over the two shards), then rests.
    let mut last = swept(&mut c);
    let rested = eventually(Duration::from_secs(30), || {
        std::thread::sleep(Duration::from_millis(500));
        let now = swept(&mut c);
        let still = now == last && now >= 7 * 64;
        last = now;
        still
    });
    assert!(rested, "the sweep kept visiting buckets: {last}");
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(swept(&mut c), last, "a resting sweep visits nothing (and reads nothing)");
    // A key with an expiry wakes it, and nobody but the sweep deletes it.
    assert_eq!(c.cmds(&["SET", "brief", "v", "PX", "100"]), ok());
    let gone = eventually(Duration::from_secs(30), || c.cmds(&["DBSIZE"]) == Reply::Int(1));
    assert!(gone, "the sweep woke and deleted the expired key");
    assert!(swept(&mut c) > last);
    assert_eq!(info_field(&c.cmds(&["INFO", "stats"]), "expired_keys"), 1);
    server.shutdown();
}

/// Sets keys with and without expiries, changes some TTLs, and returns the unix ms by which
/// the short ones expire.
fn expiry_workload(c: &mut Client) -> u64 {
    assert_eq!(c.cmds(&["SET", "long", "L", "EX", "1000"]), ok());
    assert_eq!(c.cmds(&["SET", "plain", "P"]), ok());
    assert_eq!(c.cmds(&["SET", "persisted", "X", "EX", "1000"]), ok());
    assert_eq!(c.cmds(&["PERSIST", "persisted"]), Reply::Int(1));
    assert_eq!(c.cmds(&["SET", "later", "T"]), ok());
    assert_eq!(c.cmds(&["EXPIRE", "later", "2000"]), Reply::Int(1));
    assert_eq!(c.cmds(&["SET", "counter", "1", "EX", "3000"]), ok());
    assert_eq!(c.cmds(&["INCRBY", "counter", "9"]), Reply::Int(10));
    let big = "b".repeat(20_000);
    assert_eq!(c.cmds(&["SET", "bigttl", &big, "EX", "4000"]), ok());
    let short_until = now_ms() + 1500;
    assert_eq!(c.cmds(&["SET", "short", "S", "PX", "1500"]), ok());
    short_until
}

fn check_after_restart(c: &mut Client, short_until: u64) {
    assert!(
        (990..=1000).contains(&int(c.cmds(&["TTL", "long"]))),
        "{:?}",
        c.cmds(&["TTL", "long"])
    );
    assert_eq!(c.cmds(&["GET", "long"]), bulk("L"));
    assert_eq!(c.cmds(&["TTL", "plain"]), Reply::Int(-1));
    assert_eq!(c.cmds(&["TTL", "persisted"]), Reply::Int(-1));
    assert!((1990..=2000).contains(&int(c.cmds(&["TTL", "later"]))));
    assert!((2990..=3000).contains(&int(c.cmds(&["TTL", "counter"]))));
    assert_eq!(c.cmds(&["GET", "counter"]), bulk("10"));
    assert!((3990..=4000).contains(&int(c.cmds(&["TTL", "bigttl"]))));
    assert_eq!(c.cmds(&["STRLEN", "bigttl"]), Reply::Int(20_000));
    let left = short_until.saturating_sub(now_ms());
    std::thread::sleep(Duration::from_millis(left + 100));
    assert_eq!(c.cmds(&["GET", "short"]), Reply::Bulk(None), "it still expires after a restart");
}

#[test]
fn expiry_survives_a_clean_restart() {
    let dir = scratch("expire-restart");
    let path = dir.path().join("data");
    let server = Server::start(&path, &["--size", "8M", "--shards", "2"]);
    let short_until = expiry_workload(&mut server.client());
    server.shutdown();
    let server = Server::start(&path, &["--shards", "3"]);
    check_after_restart(&mut server.client(), short_until);
    server.shutdown();
}

#[test]
fn expiry_survives_sigkill_through_log_replay() {
    let dir = scratch("expire-kill");
    let path = dir.path().join("data");
    let args = ["--size", "8M", "--shards", "2", "--fsync", "always"];
    let server = Server::start(&path, &args);
    let short_until = expiry_workload(&mut server.client());
    server.kill9();
    let server = Server::start(&path, &args);
    let log = server.stderr_with("replayed");
    assert!(log.contains("replayed") && !log.contains("replayed 0 log"), "{log}");
    check_after_restart(&mut server.client(), short_until);
    server.shutdown();
}
