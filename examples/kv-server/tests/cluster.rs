//! Cluster mode: three nodes on loopback form a static Redis Cluster; keys of other nodes'
//! slots are redirected with the right slot and address, multi-key commands over several
//! slots are refused, hash tags keep keys together, and the CLUSTER replies describe the
//! layout the same way on every node. redis-cli -c follows the redirects when installed.

mod common;

use std::process::Command;

use common::{bulk, free_ports, ok, outside_tool, scratch, three_nodes, Reply, Server};

/// CRC16-XMODEM, written again here so the test does not trust the server's copy.
fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = match bytes.iter().position(|&b| b == b'{') {
        Some(open) => match bytes[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &bytes[open + 1..open + 1 + len],
            _ => bytes,
        },
        None => bytes,
    };
    let mut crc: u16 = 0;
    for &b in hashed {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc % 16384
}

/// Three cluster nodes on free loopback ports.
struct Cluster {
    nodes: Vec<Server>,
    ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start(name: &str, shards: usize) -> Cluster {
        let dir = scratch(name);
        let (nodes, ports) = three_nodes(dir.path(), true, shards);
        Cluster { nodes, ports, _dir: dir }
    }

    /// The index of the node serving `slot` (three nodes: 0-5460, 5461-10921, 10922-16383).
    fn owner(&self, slot: u16) -> usize {
        match slot {
            0..=5460 => 0,
            5461..=10921 => 1,
            _ => 2,
        }
    }
}

/// The `mode` field of `HELLO 2`'s server map.
fn hello_mode(c: &mut common::Client) -> String {
    let Reply::Array(map) = c.cmds(&["HELLO", "2"]) else { panic!("HELLO answers a map") };
    let at = map.iter().position(|r| r == &common::bulk("mode")).expect("a mode field");
    text(map[at + 1].clone())
}

fn text(reply: Reply) -> String {
    String::from_utf8(reply.bytes().expect("a bulk reply")).expect("utf-8")
}

#[test]
fn keys_are_served_by_their_slot_owner_and_redirected_elsewhere() {
    let cluster = Cluster::start("cluster-moved", 2);
    let mut clients: Vec<_> = cluster.nodes.iter().map(Server::client).collect();
    let mut seen_owner = [false; 3];
    for i in 0..60 {
        let key = format!("key:{i}");
        let slot = key_slot(&key);
        let owner = cluster.owner(slot);
        seen_owner[owner] = true;
        for (n, c) in clients.iter_mut().enumerate() {
            assert_eq!(c.cmds(&["CLUSTER", "KEYSLOT", &key]), Reply::Int(slot.into()));
            let reply = c.cmds(&["SET", &key, &format!("v{i}")]);
            if n == owner {
                assert_eq!(reply, ok(), "{key} on its owner");
            } else {
                let moved = format!("MOVED {slot} 127.0.0.1:{}", cluster.ports[owner]);
                assert_eq!(reply, Reply::Error(moved), "{key} (slot {slot}) asked of node {n}");
            }
        }
        assert_eq!(clients[owner].cmds(&["GET", &key]), bulk(format!("v{i}")));
    }
    assert_eq!(seen_owner, [true; 3], "60 keys reach every node");

    // Multi-key commands: one slot or CROSSSLOT, even when every key is on this node.
    let crossslot = Reply::Error("CROSSSLOT Keys in request don't hash to the same slot".into());
    let (a, b) = ("bar", "hello"); // slots 5061 and 866: both node 0's
    assert_eq!(cluster.owner(key_slot(a)), 0);
    assert_eq!(cluster.owner(key_slot(b)), 0);
    assert_eq!(clients[0].cmds(&["MGET", a, b]), crossslot);
    assert_eq!(clients[0].cmds(&["MSET", a, "1", b, "2"]), crossslot);
    assert_eq!(clients[0].cmds(&["DEL", a, b]), crossslot);
    assert_eq!(clients[0].cmds(&["EXISTS", a, b]), crossslot);

    // Hash tags: every {user1000} key lands in one slot and on one node.
    let tagged = ["{user1000}.following", "{user1000}.followers", "x{user1000}y"];
    let slot = key_slot("user1000");
    let owner = cluster.owner(slot);
    for k in tagged {
        assert_eq!(clients[1].cmds(&["CLUSTER", "KEYSLOT", k]), Reply::Int(slot.into()));
    }
    let mset = ["MSET", tagged[0], "a", tagged[1], "b", tagged[2], "c"];
    let elsewhere = (owner + 1) % 3;
    let moved = format!("MOVED {slot} 127.0.0.1:{}", cluster.ports[owner]);
    assert_eq!(clients[elsewhere].cmds(&mset), Reply::Error(moved));
    assert_eq!(clients[owner].cmds(&mset), ok());
    assert_eq!(
        clients[owner].cmds(&["MGET", tagged[0], tagged[1], tagged[2]]),
        Reply::Array(vec![bulk("a"), bulk("b"), bulk("c")])
    );
    assert_eq!(
        clients[owner].cmds(&["CLUSTER", "COUNTKEYSINSLOT", &slot.to_string()]),
        Reply::Int(3)
    );
    let Reply::Array(mut keys) =
        clients[owner].cmds(&["CLUSTER", "GETKEYSINSLOT", &slot.to_string(), "10"])
    else {
        panic!("GETKEYSINSLOT gives an array")
    };
    keys.sort_by_key(|k| k.bytes());
    assert_eq!(keys, [bulk(tagged[2]), bulk(tagged[1]), bulk(tagged[0])]);
    assert_eq!(
        clients[elsewhere].cmds(&["CLUSTER", "COUNTKEYSINSLOT", &slot.to_string()]),
        Reply::Int(0),
        "counts only this node's keys"
    );
    assert_eq!(clients[owner].cmds(&["DEL", tagged[0], tagged[1]]), Reply::Int(2));

    // Keyless commands are node-local; arity errors come before redirects.
    let dbsizes: Vec<Reply> = clients.iter_mut().map(|c| c.cmds(&["DBSIZE"])).collect();
    let total: i64 = dbsizes.iter().map(|r| if let Reply::Int(n) = r { *n } else { 0 }).sum();
    assert_eq!(total, 61, "60 keys and one tagged key left, each counted on its node only");
    assert_eq!(clients[0].cmds(&["PING"]), Reply::Simple("PONG".into()));
    assert!(clients[0].cmds(&["GET", "foo", "bar"]).is_error_with("wrong number of arguments"));
    assert_eq!(clients[0].cmds(&["READONLY"]), ok());
    assert_eq!(clients[0].cmds(&["READWRITE"]), ok());
    assert!(clients[0].cmds(&["CLUSTER", "MEET", "127.0.0.1", "1"]).is_error_with("static"));
}

#[test]
fn every_node_describes_the_same_layout() {
    let cluster = Cluster::start("cluster-layout", 1);
    let ranges = [(0, 5460), (5461, 10921), (10922, 16383)];
    let mut ids: Option<Vec<String>> = None;
    for (n, server) in cluster.nodes.iter().enumerate() {
        let mut c = server.client();
        let info = text(c.cmds(&["CLUSTER", "INFO"]));
        for line in ["cluster_state:ok", "cluster_slots_assigned:16384", "cluster_known_nodes:3"] {
            assert!(info.contains(line), "{line} in\n{info}");
        }
        assert!(text(c.cmds(&["INFO", "cluster"])).contains("cluster_enabled:1"));
        assert!(hello_mode(&mut c) == "cluster", "HELLO says how the node runs");
        let myid = text(c.cmds(&["CLUSTER", "MYID"]));
        assert!(myid.len() == 40 && myid.bytes().all(|b| b.is_ascii_hexdigit()), "{myid}");

        // CLUSTER NODES: id addr@bus flags master ping pong epoch link slots.
        let nodes = text(c.cmds(&["CLUSTER", "NODES"]));
        let lines: Vec<Vec<&str>> = nodes.lines().map(|l| l.split(' ').collect()).collect();
        assert_eq!(lines.len(), 3, "{nodes}");
        for (i, f) in lines.iter().enumerate() {
            let port = cluster.ports[i];
            assert_eq!(f[1], format!("127.0.0.1:{port}@{}", u32::from(port) + 10000));
            assert_eq!(f[2], if i == n { "myself,master" } else { "master" });
            assert_eq!(f[3..8], ["-", "0", "0", &(i + 1).to_string(), "connected"]);
            assert_eq!(f[8], format!("{}-{}", ranges[i].0, ranges[i].1));
        }
        let these: Vec<String> = lines.iter().map(|f| f[0].to_string()).collect();
        assert_eq!(these[n], myid);
        match &ids {
            None => ids = Some(these),
            Some(first) => assert_eq!(&these, first, "every node knows the same IDs"),
        }
        let ids = ids.as_ref().expect("set above");

        // CLUSTER SLOTS: [start, end, [ip, port, id, {}]] per node.
        let expected: Vec<Reply> = (0..3)
            .map(|i| {
                Reply::Array(vec![
                    Reply::Int(ranges[i].0),
                    Reply::Int(ranges[i].1),
                    Reply::Array(vec![
                        bulk("127.0.0.1"),
                        Reply::Int(cluster.ports[i].into()),
                        bulk(&ids[i]),
                        Reply::Array(vec![]),
                    ]),
                ])
            })
            .collect();
        assert_eq!(c.cmds(&["CLUSTER", "SLOTS"]), Reply::Array(expected));

        // CLUSTER SHARDS: slots and one master per shard.
        let Reply::Array(shards) = c.cmds(&["CLUSTER", "SHARDS"]) else { panic!("an array") };
        assert_eq!(shards.len(), 3);
        for (i, shard) in shards.iter().enumerate() {
            let Reply::Array(fields) = shard else { panic!("a map") };
            assert_eq!(fields[0], bulk("slots"));
            assert_eq!(
                fields[1],
                Reply::Array(vec![Reply::Int(ranges[i].0), Reply::Int(ranges[i].1)])
            );
            assert_eq!(fields[2], bulk("nodes"));
            let Reply::Array(members) = &fields[3] else { panic!("an array") };
            let Reply::Array(node) = &members[0] else { panic!("a map") };
            assert_eq!(
                node[..6],
                [
                    bulk("id"),
                    bulk(&ids[i]),
                    bulk("port"),
                    Reply::Int(cluster.ports[i].into()),
                    bulk("ip"),
                    bulk("127.0.0.1")
                ]
            );
            assert!(node.contains(&bulk("master")) && node.contains(&bulk("online")));
        }
    }
}

#[test]
fn a_node_must_be_in_its_list_and_on_a_fixed_port() {
    let dir = scratch("cluster-refused");
    let path = dir.path().join("data");
    let err = Server::try_start_on(&path, free_ports(1)[0], &["--cluster-nodes", "127.0.0.1:1"])
        .err()
        .expect("refused");
    assert!(err.contains("does not list this node"), "{err}");
    let err =
        Server::try_start(&path, &["--cluster-nodes", "127.0.0.1:7000"]).err().expect("refused");
    assert!(err.contains("fixed --port"), "{err}");

    // Without cluster mode, CLUSTER answers as a standalone Redis does.
    let server = Server::start(&path, &["--size", "4M", "--shards", "1"]);
    let mut c = server.client();
    assert_eq!(
        c.cmds(&["CLUSTER", "INFO"]),
        Reply::Error("ERR This instance has cluster support disabled".into())
    );
    assert!(text(c.cmds(&["INFO"])).contains("cluster_enabled:0"));
    assert_eq!(hello_mode(&mut c), "standalone");
    assert!(c.cmds(&["CLUSTER", "KEYSLOT", "foo"]).is_error_with("disabled"));
}

#[test]
fn redis_cli_follows_redirects() {
    let Some(cli) = outside_tool("redis-cli", "redis_cli_follows_redirects") else { return };
    let cluster = Cluster::start("cluster-cli", 1);
    let run = |port: u16, args: &[&str]| {
        let out = Command::new(&cli)
            .args(["-c", "-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .output()
            .expect("run redis-cli");
        assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    for i in 0..12 {
        let key = format!("cli:{i}");
        let from = cluster.ports[i % 3];
        assert_eq!(run(from, &["SET", &key, &format!("value {i}")]), "OK");
    }
    for i in 0..12 {
        let key = format!("cli:{i}");
        let from = cluster.ports[(i + 1) % 3];
        assert_eq!(run(from, &["GET", &key]), format!("value {i}"), "{key} read via another node");
        let owner = cluster.owner(key_slot(&key));
        let mut c = cluster.nodes[owner].client();
        assert_eq!(c.cmds(&["GET", &key]), bulk(format!("value {i}")), "{key} stored on its owner");
    }
}
