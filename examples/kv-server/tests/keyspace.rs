//! Commands over the whole key space: KEYS and SCAN (complete under concurrent writes), RENAME
//! across shards, RANDOMKEY, FLUSHALL (and a restart after it), SAVE; and the connection
//! commands clients send (HELLO, CLIENT, CONFIG GET, TIME).

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{bulk, info_field, ok, scratch, Client, Reply, Server};

fn keys_of(reply: Reply) -> Vec<Vec<u8>> {
    match reply {
        Reply::Array(items) => items.into_iter().map(|k| k.bytes().expect("a key")).collect(),
        other => panic!("expected an array, got {other:?}"),
    }
}

fn set_many(c: &mut Client, prefix: &str, n: u32) {
    let cmds: Vec<Vec<Vec<u8>>> = (0..n)
        .map(|i| vec![b"SET".to_vec(), format!("{prefix}{i}").into_bytes(), b"v".to_vec()])
        .collect();
    assert!(c.pipeline(&cmds).iter().all(|r| r == &ok()));
}

/// A full SCAN: every key it returned, and how many calls it took.
fn full_scan(c: &mut Client, extra: &[&str]) -> (Vec<Vec<u8>>, usize) {
    let (mut cursor, mut keys, mut calls) = ("0".to_string(), Vec::new(), 0);
    loop {
        let mut args = vec!["SCAN", cursor.as_str()];
        args.extend_from_slice(extra);
        let Reply::Array(mut parts) = c.cmds(&args) else { panic!("SCAN gives an array") };
        assert_eq!(parts.len(), 2);
        keys.extend(keys_of(parts.pop().expect("keys")));
        cursor = String::from_utf8(parts[0].bytes().expect("cursor")).expect("utf-8");
        calls += 1;
        if cursor == "0" {
            return (keys, calls);
        }
    }
}

#[test]
fn keys_and_scan_return_every_key_present_throughout_concurrent_writes() {
    let dir = scratch("scan");
    let server = Server::start(&dir.path().join("data"), &["--size", "16M", "--shards", "2"]);
    let mut c = server.client();
    set_many(&mut c, "stable:", 2000);
    let stable: HashSet<Vec<u8>> = (0..2000).map(|i| format!("stable:{i}").into_bytes()).collect();

    let mut pattern_keys = keys_of(c.cmds(&["KEYS", "stable:1?"]));
    pattern_keys.sort();
    let want: Vec<Vec<u8>> = (10..20).map(|i| format!("stable:{i}").into_bytes()).collect();
    assert_eq!(pattern_keys, want);
    let mut set = keys_of(c.cmds(&["KEYS", "stable:1[0-1]9[^0-8]"]));
    set.sort();
    assert_eq!(set, vec![b"stable:1099".to_vec(), b"stable:1199".to_vec()]);

    // Another connection churns other keys (sets, overwrites with growing values that move
    // records between blocks, deletes) while this one scans.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, port) = (Arc::clone(&stop), server.port);
        std::thread::spawn(move || {
            let mut w = Client::connect(port);
            let mut round = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let cmds: Vec<Vec<Vec<u8>>> = (0..200)
                    .map(|i| {
                        let key = format!("churn:{}", (round * 200 + i) % 3000).into_bytes();
                        if (round + i).is_multiple_of(3) {
                            vec![b"DEL".to_vec(), key]
                        } else {
                            vec![b"SET".to_vec(), key, vec![b'x'; ((round * 7 + i) % 900) as usize]]
                        }
                    })
                    .collect();
                w.pipeline(&cmds);
                round += 1;
            }
            round
        })
    };
    for count in ["7", "64", "1000"] {
        let (keys, calls) = full_scan(&mut c, &["COUNT", count]);
        let got: HashSet<Vec<u8>> = keys.iter().cloned().collect();
        assert!(stable.is_subset(&got), "SCAN COUNT {count} missed stable keys");
        assert!(calls > 1 || count == "1000", "COUNT bounds the buckets per call");
        let stable_hits = keys.iter().filter(|k| k.starts_with(b"stable:")).count();
        assert_eq!(stable_hits, 2000, "each stable key once");
        let all = keys_of(c.cmds(&["KEYS", "*"]));
        let all: HashSet<Vec<u8>> = all.into_iter().collect();
        assert!(stable.is_subset(&all), "KEYS missed stable keys");
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = writer.join().expect("writer");
    assert!(rounds > 0, "the writer ran during the scans");

    let (matched, _) = full_scan(&mut c, &["MATCH", "stable:*", "COUNT", "100"]);
    assert_eq!(matched.into_iter().collect::<HashSet<_>>(), stable);
    let (typed, _) = full_scan(&mut c, &["TYPE", "hash", "COUNT", "1000"]);
    assert!(typed.is_empty(), "only strings exist");
    assert_eq!(c.cmds(&["SCAN", "x"]), Reply::Error("ERR invalid cursor".into()));
    assert_eq!(c.cmds(&["SCAN", "0", "COUNT", "0"]), Reply::Error("ERR syntax error".into()));
    assert_eq!(c.cmds(&["SCAN", "0", "BOGUS", "1"]), Reply::Error("ERR syntax error".into()));
    server.shutdown();
}

#[test]
fn rename_within_and_across_shards_keeps_value_and_ttl() {
    let dir = scratch("rename");
    let server = Server::start(&dir.path().join("data"), &["--size", "16M", "--shards", "2"]);
    let mut c = server.client();
    let before = info_field(&c.cmds(&["INFO", "stats"]), "remote_batches");
    // 40 pairs: with two shards, about half of them cross.
    for i in 0..40 {
        let (src, dst) = (format!("src{i}"), format!("dst{i}"));
        let value = format!("value-{i}-{}", "x".repeat(i * 300));
        assert_eq!(c.cmds(&["SET", &src, &value, "EX", "1000"]), ok());
        assert_eq!(c.cmds(&["RENAME", &src, &dst]), ok());
        assert_eq!(c.cmds(&["GET", &dst]), bulk(&value));
        assert_eq!(c.cmds(&["EXISTS", &src]), Reply::Int(0));
        let Reply::Int(ttl) = c.cmds(&["TTL", &dst]) else { panic!("TTL") };
        assert!((990..=1000).contains(&ttl), "the TTL moves with the key");
    }
    assert!(
        info_field(&c.cmds(&["INFO", "stats"]), "remote_batches") > before,
        "some renames crossed shards"
    );
    assert_eq!(c.cmds(&["RENAME", "nope", "x"]), Reply::Error("ERR no such key".into()));
    assert_eq!(c.cmds(&["SET", "a", "1"]), ok());
    assert_eq!(c.cmds(&["SET", "b", "2"]), ok());
    assert_eq!(c.cmds(&["RENAMENX", "a", "b"]), Reply::Int(0));
    assert_eq!(c.cmds(&["GET", "a"]), bulk("1"));
    assert_eq!(c.cmds(&["RENAME", "a", "b"]), ok(), "RENAME overwrites");
    assert_eq!(c.cmds(&["GET", "b"]), bulk("1"));
    assert_eq!(c.cmds(&["RENAMENX", "b", "c"]), Reply::Int(1));
    assert_eq!(c.cmds(&["RENAME", "c", "c"]), ok());
    assert_eq!(c.cmds(&["GET", "c"]), bulk("1"));
    assert_eq!(
        c.cmds(&["RENAME", "c"]),
        Reply::Error("ERR wrong number of arguments for 'rename' command".into())
    );
    server.shutdown();
}

#[test]
fn flushall_empties_every_shard_and_stays_empty_after_restarts() {
    let dir = scratch("flushall");
    let path = dir.path().join("data");
    let args = ["--size", "16M", "--shards", "2", "--fsync", "always"];
    let server = Server::start(&path, &args);
    let mut c = server.client();
    assert_eq!(c.cmds(&["RANDOMKEY"]), Reply::Bulk(None));
    set_many(&mut c, "f", 500);
    assert_eq!(c.cmds(&["SET", "big", &"b".repeat(30_000)]), ok());
    let Reply::Bulk(Some(key)) = c.cmds(&["RANDOMKEY"]) else { panic!("a random key") };
    assert_eq!(c.cmd(&[b"EXISTS", &key]), Reply::Int(1));
    assert_eq!(c.cmds(&["FLUSHALL", "BOGUS"]), Reply::Error("ERR syntax error".into()));
    assert_eq!(c.cmds(&["FLUSHALL", "ASYNC"]), ok());
    assert_eq!(c.cmds(&["DBSIZE"]), Reply::Int(0));
    assert_eq!(c.cmds(&["GET", "f1"]), Reply::Bulk(None));
    assert_eq!(keys_of(c.cmds(&["KEYS", "*"])), Vec::<Vec<u8>>::new());
    assert_eq!(c.cmds(&["RANDOMKEY"]), Reply::Bulk(None));
    assert_eq!(c.cmds(&["SET", "after", "1"]), ok());
    // A SIGKILL right after: the log must not bring the flushed keys back.
    server.kill9();
    let server = Server::start(&path, &args);
    let mut c = server.client();
    assert_eq!(c.cmds(&["DBSIZE"]), Reply::Int(1));
    assert_eq!(c.cmds(&["GET", "after"]), bulk("1"));
    assert_eq!(c.cmds(&["FLUSHDB"]), ok());
    assert_eq!(c.cmds(&["SAVE"]), ok());
    server.shutdown();
    let server = Server::start(&path, &args);
    let mut c = server.client();
    assert_eq!(c.cmds(&["DBSIZE"]), Reply::Int(0));
    assert_eq!(keys_of(c.cmds(&["KEYS", "*"])), Vec::<Vec<u8>>::new());
    server.shutdown();
}

#[test]
fn connection_commands_answer_what_clients_ask() {
    let dir = scratch("conn");
    let server = Server::start(&dir.path().join("data"), &["--size", "8M", "--shards", "2"]);
    let mut c = server.client();
    let Reply::Array(hello) = c.cmds(&["HELLO", "2"]) else { panic!("HELLO gives an array") };
    assert_eq!(hello.len(), 14);
    assert_eq!(hello[0], bulk("server"));
    assert_eq!(hello[1], bulk("redis"));
    assert_eq!(hello[4], bulk("proto"));
    assert_eq!(hello[5], Reply::Int(2));
    assert_eq!(
        c.cmds(&["HELLO", "3"]),
        Reply::Error("NOPROTO unsupported protocol version".into())
    );
    let Reply::Int(id) = c.cmds(&["CLIENT", "ID"]) else { panic!("CLIENT ID") };
    assert!(id > 0);
    let Reply::Int(other) = server.client().cmds(&["CLIENT", "ID"]) else { panic!("CLIENT ID") };
    assert_ne!(id, other, "ids are unique");
    assert_eq!(c.cmds(&["CLIENT", "GETNAME"]), Reply::Bulk(None));
    assert_eq!(c.cmds(&["CLIENT", "SETNAME", "worker-1"]), ok());
    assert_eq!(c.cmds(&["CLIENT", "GETNAME"]), bulk("worker-1"));
    assert!(c.cmds(&["CLIENT", "SETNAME", "has space"]).is_error_with("cannot contain spaces"));
    assert_eq!(c.cmds(&["CLIENT", "SETINFO", "LIB-NAME", "redis-py"]), ok());
    let info = String::from_utf8(c.cmds(&["CLIENT", "INFO"]).bytes().unwrap()).unwrap();
    assert!(info.contains(&format!("id={id} ")) && info.contains("name=worker-1"), "{info}");
    assert!(c.cmds(&["CLIENT", "BOGUS"]).is_error_with("unknown subcommand 'BOGUS'"));
    let Reply::Array(time) = c.cmds(&["TIME"]) else { panic!("TIME gives an array") };
    let secs: u64 = String::from_utf8(time[0].bytes().unwrap()).unwrap().parse().unwrap();
    assert!(secs > 1_600_000_000);
    let Reply::Array(all) = c.cmds(&["CONFIG", "GET", "*"]) else { panic!("CONFIG GET") };
    assert!(all.len() >= 4 && all.len() % 2 == 0);
    assert_eq!(
        c.cmds(&["CONFIG", "GET", "append*"]),
        Reply::Array(vec![bulk("appendonly"), bulk("yes"), bulk("appendfsync"), bulk("everysec")])
    );
    server.shutdown();
}
