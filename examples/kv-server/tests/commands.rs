//! Every command against a running server: replies, pipelining, large values, more keys than
//! the cache holds, and space that deletes give back.

mod common;

use common::{bulk, info_field, ok, pattern, scratch, Reply, Server};

#[test]
fn each_command_answers_as_redis_does() {
    let dir = scratch("commands");
    let server = Server::start(
        &dir.path().join("data"),
        &["--size", "16M", "--shards", "2", "--cache-bytes", "2M"],
    );
    let mut c = server.client();
    assert_eq!(c.cmds(&["PING"]), Reply::Simple("PONG".into()));
    assert_eq!(c.cmds(&["ping", "hello"]), bulk("hello"));
    assert_eq!(c.cmds(&["ECHO", "abc"]), bulk("abc"));
    assert_eq!(c.cmds(&["GET", "missing"]), Reply::Bulk(None));
    assert_eq!(c.cmds(&["SET", "k", "v1"]), ok());
    assert_eq!(c.cmds(&["GET", "k"]), bulk("v1"));
    assert_eq!(c.cmds(&["SET", "k", "v2", "NX"]), Reply::Bulk(None));
    assert_eq!(c.cmds(&["SET", "k", "v2", "XX"]), ok());
    assert_eq!(c.cmds(&["SET", "other", "x", "XX"]), Reply::Bulk(None));
    assert_eq!(c.cmds(&["SETNX", "k", "v3"]), Reply::Int(0));
    assert_eq!(c.cmds(&["GET", "k"]), bulk("v2"));
    assert_eq!(c.cmds(&["SET", "", "empty key"]), ok());
    assert_eq!(c.cmds(&["GET", ""]), bulk("empty key"));
    assert_eq!(c.cmds(&["SET", "e", ""]), ok());
    assert_eq!(c.cmds(&["GET", "e"]), bulk(""));
    let binary: Vec<u8> = (0..=255u8).collect();
    assert_eq!(c.cmd(&[b"SET", b"bin\r\n\x00", &binary]), ok());
    assert_eq!(c.cmd(&[b"GET", b"bin\r\n\x00"]), Reply::Bulk(Some(binary)));

    // Multi-key commands spread over both shards.
    let mut mset: Vec<String> = vec!["MSET".into()];
    for i in 0..200 {
        mset.push(format!("m{i}"));
        mset.push(format!("value-{i}"));
    }
    let args: Vec<&str> = mset.iter().map(String::as_str).collect();
    assert_eq!(c.cmds(&args), ok());
    let keys: Vec<String> = (0..200).map(|i| format!("m{i}")).chain(["nope".to_string()]).collect();
    let mut mget: Vec<&str> = vec!["MGET"];
    mget.extend(keys.iter().map(String::as_str));
    let Reply::Array(values) = c.cmds(&mget) else { panic!("MGET gives an array") };
    assert_eq!(values.len(), 201);
    for (i, v) in values.iter().take(200).enumerate() {
        assert_eq!(v, &bulk(format!("value-{i}")));
    }
    assert_eq!(values[200], Reply::Bulk(None));
    assert_eq!(c.cmds(&["EXISTS", "m1", "m2", "nope", "m1"]), Reply::Int(3));
    assert_eq!(c.cmds(&["DEL", "m1", "m2", "nope"]), Reply::Int(2));
    assert_eq!(c.cmds(&["DEL", "m1"]), Reply::Int(0));
    assert_eq!(c.cmds(&["EXISTS", "m1"]), Reply::Int(0));
    // k, "", e, bin, and 198 of the m keys.
    assert_eq!(c.cmds(&["DBSIZE"]), Reply::Int(202));
    let info = c.cmds(&["INFO"]);
    assert!(info_field(&info, "cache_frames") > 0);
    assert_eq!(info_field(&info, "shards"), 2);
    assert!(info_field(&info, "total_commands_processed") >= 20);
    assert!(info_field(&info, "key_operations") >= 400);
    assert!(info_field(&info, "remote_batches") > 0, "MSET/MGET reached the other shard");

    // The probes redis-cli and redis-benchmark send.
    assert_eq!(c.cmds(&["CONFIG", "GET", "save"]), Reply::Array(vec![bulk("save"), bulk("")]));
    assert_eq!(
        c.cmds(&["CONFIG", "GET", "appendonly"]),
        Reply::Array(vec![bulk("appendonly"), bulk("yes")])
    );
    assert_eq!(c.cmds(&["CONFIG", "GET", "no-such-parameter"]), Reply::Array(vec![]));
    let Reply::Array(table) = c.cmds(&["COMMAND"]) else { panic!("COMMAND gives an array") };
    assert_eq!(c.cmds(&["COMMAND", "COUNT"]), Reply::Int(table.len() as i64));
    let Reply::Array(docs) = c.cmds(&["COMMAND", "DOCS", "get"]) else { panic!("a map") };
    assert_eq!(docs[0], bulk("get"));
    assert_eq!(c.cmds(&["SELECT", "0"]), ok());
    assert!(c.cmds(&["SELECT", "1"]).is_error_with("out of range"));

    // Errors.
    assert!(c.cmds(&["GET"]).is_error_with("wrong number of arguments for 'get'"));
    assert!(c.cmds(&["SET", "a"]).is_error_with("wrong number of arguments"));
    assert!(c.cmds(&["MSET", "a"]).is_error_with("wrong number of arguments"));
    assert_eq!(c.cmds(&["SET", "a", "b", "BOGUS"]), Reply::Error("ERR syntax error".into()));
    assert_eq!(
        c.cmds(&["LPUSH", "list", "a"]),
        Reply::Error("ERR unknown command 'LPUSH', with args beginning with: 'list' 'a' ".into())
    );
    let long_key = "k".repeat(1025);
    assert!(c.cmds(&["SET", &long_key, "v"]).is_error_with("key too long"));
    // Inline commands, as typed into telnet.
    c.send_raw(b"SET inline works\r\nGET inline\r\n");
    assert_eq!(c.read_reply(), ok());
    assert_eq!(c.read_reply(), bulk("works"));
    assert_eq!(c.cmds(&["QUIT"]), ok());
    assert!(c.is_closed());
    server.shutdown();
}

#[test]
fn pipelined_replies_keep_request_order() {
    let dir = scratch("pipeline");
    for fsync in ["always", "no"] {
        let path = dir.path().join(format!("data-{fsync}"));
        let server = Server::start(
            &path,
            &["--size", "16M", "--shards", "2", "--cache-bytes", "2M", "--fsync", fsync],
        );
        let mut c = server.client();
        let mut commands = Vec::new();
        for i in 0..3000u32 {
            let key = format!("p{}", i % 97).into_bytes();
            commands.push(match i % 4 {
                0 | 1 => vec![b"SET".to_vec(), key, format!("{i}").into_bytes()],
                2 => vec![b"GET".to_vec(), key],
                _ => vec![b"PING".to_vec()],
            });
        }
        let replies = c.pipeline(&commands);
        let mut model = std::collections::HashMap::new();
        for (i, (cmd, reply)) in commands.iter().zip(&replies).enumerate() {
            match cmd[0].as_slice() {
                b"SET" => {
                    assert_eq!(reply, &ok(), "command {i}");
                    model.insert(cmd[1].clone(), cmd[2].clone());
                }
                b"GET" => {
                    assert_eq!(reply, &Reply::Bulk(model.get(&cmd[1]).cloned()), "command {i}")
                }
                _ => assert_eq!(reply, &Reply::Simple("PONG".into()), "command {i}"),
            }
        }
        // Two connections pipelining at once stay independent.
        let mut a = server.client();
        let mut b = server.client();
        let set = |n: &str, v: u32| {
            vec![b"SET".to_vec(), n.as_bytes().to_vec(), v.to_string().into_bytes()]
        };
        let get = |n: &str| vec![b"GET".to_vec(), n.as_bytes().to_vec()];
        let batch_a: Vec<Vec<Vec<u8>>> = (0..500).flat_map(|v| [set("a", v), get("a")]).collect();
        let batch_b: Vec<Vec<Vec<u8>>> = (0..500).flat_map(|v| [set("b", v), get("b")]).collect();
        let ta = std::thread::spawn(move || a.pipeline(&batch_a));
        let tb = std::thread::spawn(move || b.pipeline(&batch_b));
        for replies in [ta.join().expect("a"), tb.join().expect("b")] {
            for (v, pair) in replies.chunks(2).enumerate() {
                assert_eq!(pair[0], ok());
                assert_eq!(pair[1], bulk(v.to_string()));
            }
        }
        server.shutdown();
    }
}

#[test]
fn large_values_up_to_the_limit_and_a_clear_error_beyond() {
    let dir = scratch("large");
    let path = dir.path().join("data");
    let server = Server::start(&path, &["--size", "32M", "--shards", "2", "--cache-bytes", "1M"]);
    let mut c = server.client();
    let max = pattern(1, 64 << 10);
    assert_eq!(c.cmd(&[b"SET", b"max", &max]), ok());
    assert_eq!(c.cmd(&[b"GET", b"max"]), Reply::Bulk(Some(max.clone())));
    // One byte more is a large value (chunks under a manifest: tests/large_values.rs).
    let over = pattern(2, (64 << 10) + 1);
    assert_eq!(c.cmd(&[b"SET", b"over", &over]), ok());
    assert_eq!(c.cmd(&[b"MSET", b"a", b"1", b"over2", &over]), ok());
    assert_eq!(c.cmds(&["EXISTS", "over", "a", "over2"]), Reply::Int(3));
    assert_eq!(c.cmd(&[b"GET", b"over2"]), Reply::Bulk(Some(over.clone())));
    // Beyond the protocol limit (512 MiB): the request is refused and the connection closed.
    let mut huge = server.client();
    huge.send_raw(b"*3\r\n$3\r\nSET\r\n$1\r\nh\r\n$536870913\r\n");
    assert!(huge.read_reply().is_error_with("Protocol error"));
    assert!(huge.is_closed());
    // Sizes around the inline / extent boundary and the extent block size, rewritten between
    // sizes so records move between the chain and extent blocks.
    let sizes = [0, 1, 2000, 2020, 2030, 4048, 4049, 8096, 8097, 30_000, 65_536, 10, 65_000, 3];
    for round in 0..3u64 {
        for (i, &len) in sizes.iter().enumerate() {
            let key = format!("size{i}");
            let value = pattern(round * 100 + i as u64, len);
            assert_eq!(c.cmd(&[b"SET", key.as_bytes(), &value]), ok(), "len {len}");
        }
        for (i, &len) in sizes.iter().enumerate() {
            let key = format!("size{i}");
            let value = pattern(round * 100 + i as u64, len);
            assert_eq!(c.cmd(&[b"GET", key.as_bytes()]), Reply::Bulk(Some(value)), "len {len}");
        }
    }
    assert_eq!(c.cmds(&["DEL", "size4", "size10"]), Reply::Int(2));
    server.shutdown();
    let server = Server::start(&path, &["--shards", "1", "--cache-bytes", "1M"]);
    let mut c = server.client();
    assert_eq!(c.cmd(&[b"GET", b"max"]), Reply::Bulk(Some(max)));
    assert_eq!(c.cmd(&[b"GET", b"size9"]), Reply::Bulk(Some(pattern(209, 30_000))));
    assert_eq!(c.cmd(&[b"GET", b"size4"]), Reply::Bulk(None));
    assert_eq!(c.cmds(&["DBSIZE"]), Reply::Int(16), "13 + over, a, over2");
    server.shutdown();
}

#[test]
fn many_more_keys_than_the_cache_holds() {
    let dir = scratch("many");
    let path = dir.path().join("data");
    let args = ["--size", "64M", "--shards", "2", "--cache-bytes", "1M", "--fsync", "no"];
    let server = Server::start(&path, &args);
    let mut c = server.client();
    const KEYS: u32 = 20_000;
    let value = |i: u32| format!("value-{i}-{}", "x".repeat((i % 50) as usize)).into_bytes();
    for chunk in (0..KEYS).collect::<Vec<_>>().chunks(500) {
        let cmds: Vec<Vec<Vec<u8>>> = chunk
            .iter()
            .map(|&i| vec![b"SET".to_vec(), format!("key:{i}").into_bytes(), value(i)])
            .collect();
        assert!(c.pipeline(&cmds).iter().all(|r| r == &ok()));
    }
    let check = |c: &mut common::Client, deleted: &dyn Fn(u32) -> bool| {
        for chunk in (0..KEYS).collect::<Vec<_>>().chunks(500) {
            let cmds: Vec<Vec<Vec<u8>>> = chunk
                .iter()
                .map(|&i| vec![b"GET".to_vec(), format!("key:{i}").into_bytes()])
                .collect();
            for (&i, reply) in chunk.iter().zip(c.pipeline(&cmds)) {
                let want = if deleted(i) { None } else { Some(value(i)) };
                assert_eq!(reply, Reply::Bulk(want), "key:{i}");
            }
        }
    };
    check(&mut c, &|_| false);
    assert_eq!(c.cmds(&["DBSIZE"]), Reply::Int(KEYS as i64));
    let info = c.cmds(&["INFO", "cache"]);
    assert!(info_field(&info, "cache_evictions") > 0, "the data set is larger than the cache");
    for chunk in (0..KEYS).filter(|i| i % 2 == 0).collect::<Vec<_>>().chunks(500) {
        let cmds: Vec<Vec<Vec<u8>>> =
            chunk.iter().map(|&i| vec![b"DEL".to_vec(), format!("key:{i}").into_bytes()]).collect();
        assert!(c.pipeline(&cmds).iter().all(|r| r == &Reply::Int(1)));
    }
    assert_eq!(c.cmds(&["DBSIZE"]), Reply::Int(KEYS as i64 / 2));
    server.shutdown();
    let server = Server::start(&path, &args);
    let mut c = server.client();
    assert_eq!(c.cmds(&["DBSIZE"]), Reply::Int(KEYS as i64 / 2));
    check(&mut c, &|i| i % 2 == 0);
    let info = c.cmds(&["INFO", "storage"]);
    assert_eq!(info_field(&info, "ranges_rebuilt"), 0, "a clean restart trusts the range headers");
    server.shutdown();
}

#[test]
fn deleting_gives_space_back() {
    let dir = scratch("space");
    let path = dir.path().join("data");
    // 8 ranges of 1 MiB, 7 for data: room for a few dozen 64 KiB values.
    let server = Server::start(
        &path,
        &["--size", "8M", "--shards", "2", "--cache-bytes", "1M", "--fsync", "no"],
    );
    let mut c = server.client();
    let value = pattern(7, 64 << 10);
    let fill = |c: &mut common::Client, round: u32| -> u32 {
        for i in 0..1000u32 {
            match c.cmd(&[b"SET", format!("big{i}").as_bytes(), &value]) {
                r if r == ok() => {}
                r => {
                    assert!(r.is_error_with("out of space"), "round {round}, value {i}: {r:?}");
                    return i;
                }
            }
        }
        panic!("1000 values of 64 KiB do not fit in 8 MiB");
    };
    let first = fill(&mut c, 1);
    assert!(first >= 20, "only {first} values fit");
    for i in 0..first {
        assert_eq!(c.cmd(&[b"DEL", format!("big{i}").as_bytes()]), Reply::Int(1));
    }
    assert_eq!(c.cmds(&["DBSIZE"]), Reply::Int(0));
    // The same keys hash to the same ranges, so exactly as many fit again.
    assert_eq!(fill(&mut c, 2), first);
    // Keep a third; rewriting those again and again (new extents first, the old ones freed
    // after a barrier) does not leak.
    for i in (0..first).filter(|i| i % 3 != 0) {
        assert_eq!(c.cmd(&[b"DEL", format!("big{i}").as_bytes()]), Reply::Int(1));
    }
    for round in 0..5 {
        for i in (0..first).filter(|i| i % 3 == 0) {
            let v = pattern(round, 40_000 + i as usize);
            assert_eq!(
                c.cmd(&[b"SET", format!("big{i}").as_bytes(), &v]),
                ok(),
                "overwrite {round}/{i}"
            );
        }
    }
    for i in (0..first).filter(|i| i % 3 == 0) {
        let v = pattern(4, 40_000 + i as usize);
        assert_eq!(c.cmd(&[b"GET", format!("big{i}").as_bytes()]), Reply::Bulk(Some(v)));
    }
    assert_eq!(c.cmds(&["DBSIZE"]), Reply::Int(first.div_ceil(3) as i64));
    server.shutdown();
}

#[test]
fn overwrites_that_move_a_value_then_deletes_in_one_pipeline() {
    let dir = scratch("moves");
    let path = dir.path().join("data");
    for fsync in ["always", "no"] {
        let server = Server::start(
            &path,
            &["--size", "8M", "--shards", "2", "--cache-bytes", "1M", "--fsync", fsync],
        );
        let mut c = server.client();
        for round in 0..20u64 {
            let key = format!("mv{round}").into_bytes();
            let big = pattern(round, 9000 + round as usize);
            let small = pattern(round + 100, 10);
            // small -> large (a new record, the old one cleaned up after a barrier) -> delete
            // while both records may still exist -> set again -> large -> small in place.
            let cmds = vec![
                vec![b"SET".to_vec(), key.clone(), small.clone()],
                vec![b"SET".to_vec(), key.clone(), big.clone()],
                vec![b"DEL".to_vec(), key.clone()],
                vec![b"GET".to_vec(), key.clone()],
                vec![b"SET".to_vec(), key.clone(), big.clone()],
                vec![b"SET".to_vec(), key.clone(), small.clone()],
                vec![b"GET".to_vec(), key.clone()],
                vec![b"EXISTS".to_vec(), key.clone()],
            ];
            let replies = c.pipeline(&cmds);
            let want = vec![
                ok(),
                ok(),
                Reply::Int(1),
                Reply::Bulk(None),
                ok(),
                ok(),
                Reply::Bulk(Some(small)),
                Reply::Int(1),
            ];
            assert_eq!(replies, want, "{fsync} round {round}");
        }
        assert_eq!(c.cmds(&["DBSIZE"]), Reply::Int(20));
        server.shutdown();
    }
    let server = Server::start(&path, &["--shards", "1", "--cache-bytes", "1M"]);
    let mut c = server.client();
    assert_eq!(c.cmds(&["DBSIZE"]), Reply::Int(20));
    assert_eq!(c.cmds(&["GET", "mv3"]), Reply::Bulk(Some(pattern(103, 10))));
    let info = c.cmds(&["INFO", "storage"]);
    assert_eq!(info_field(&info, "ranges_rebuilt"), 0);
    server.shutdown();
}
