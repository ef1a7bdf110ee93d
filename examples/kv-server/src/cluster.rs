//! Cluster mode: corebuf-kv nodes that form a static Redis Cluster.
//!
//! `--cluster-nodes HOST:PORT,HOST:PORT,...` lists every node, the same list on each. The 16384
//! hash slots are split evenly over the nodes in list order (node `i` serves slots
//! `[i * 16384 / n, (i + 1) * 16384 / n)`), and a node knows itself by its `--bind` address and
//! `--port`. A key's slot is CRC16-XMODEM of the key (or of its hash tag, the part between the
//! first `{` and the next `}` when that is not empty) modulo 16384, as in the Redis Cluster
//! specification, so every Redis Cluster client finds the same node for a key.
//!
//! Before a command runs, [`redirect`] finds its keys through the command table
//! ([`crate::cmdtable`]) and answers `-CROSSSLOT` when they are in different slots, or
//! `-MOVED slot host:port` when their slot is another node's. Keyless commands (PING, DBSIZE,
//! KEYS, SCAN, FLUSHALL) are node-local, as in Redis Cluster.
//!
//! The layout never changes while the nodes run: no gossip, resharding, failover or replicas.
//! Node IDs are derived from `host:port`, so every node computes the same ones.

use std::ops::Range;
use std::rc::Rc;
use std::sync::OnceLock;

use crate::cmdtable;
use crate::resp;
use crate::server::on_every_shard;
use crate::store::KvShard;

/// Hash slots of a Redis Cluster.
pub const SLOT_COUNT: u16 = 16384;

/// CRC16-XMODEM (polynomial 0x1021, initial value 0), the checksum Redis Cluster hashes keys
/// with.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// The part of `key` that is hashed: the bytes between the first `{` and the first `}` after
/// it, when there are any; else the whole key.
pub fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|&b| b == b'}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// The hash slot of `key`.
pub fn key_slot(key: &[u8]) -> u16 {
    crc16(hash_tag(key)) % SLOT_COUNT
}

/// One node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Its address as the node list gives it (clients connect there).
    pub host: String,
    /// Its client port.
    pub port: u16,
    /// 40 hex digits, derived from `host:port`.
    pub id: String,
    /// The slots it serves.
    pub slots: Range<u16>,
}

/// The static cluster layout.
///
/// Invariants: at least one node; the nodes' slot ranges are contiguous, in list order, and
/// cover `0..SLOT_COUNT`; `me` indexes `nodes`.
#[derive(Debug)]
pub struct Cluster {
    /// Every node, in the order of the list.
    pub nodes: Vec<Node>,
    /// This node's index.
    pub me: usize,
}

/// Most nodes a cluster may list (each must own at least one slot).
pub const NODES_MAX: usize = SLOT_COUNT as usize;

impl Cluster {
    /// Parses `--cluster-nodes` (`HOST:PORT,HOST:PORT,...`) for the node listening on
    /// `bind:port`.
    pub fn parse(list: &str, bind: &str, port: u16) -> Result<Cluster, String> {
        if port == 0 {
            return Err("--cluster-nodes needs a fixed --port (not 0): the other nodes and the \
                        clients find this node at the port the list gives"
                .into());
        }
        let mut nodes = Vec::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (host, node_port) = item
                .rsplit_once(':')
                .ok_or_else(|| format!("--cluster-nodes: {item:?} is not HOST:PORT"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let node_port: u16 = node_port
                .parse()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| format!("--cluster-nodes: {item:?} has no valid port"))?;
            if host.is_empty() {
                return Err(format!("--cluster-nodes: {item:?} has no host"));
            }
            if nodes.iter().any(|n: &Node| n.host == host && n.port == node_port) {
                return Err(format!("--cluster-nodes: {item:?} is listed twice"));
            }
            nodes.push(Node {
                host: host.to_string(),
                port: node_port,
                id: node_id(host, node_port),
                slots: 0..0,
            });
        }
        if nodes.is_empty() || nodes.len() > NODES_MAX {
            return Err(format!("--cluster-nodes: between 1 and {NODES_MAX} nodes"));
        }
        let n = nodes.len();
        for (i, node) in nodes.iter_mut().enumerate() {
            let bound = |i: usize| (i * SLOT_COUNT as usize / n) as u16;
            node.slots = bound(i)..bound(i + 1);
        }
        let bind = bind.trim_start_matches('[').trim_end_matches(']');
        let me = nodes
            .iter()
            .position(|node| node.port == port && same_host(&node.host, bind))
            .ok_or_else(|| {
                format!(
                    "--cluster-nodes does not list this node ({bind}:{port}, from --bind and \
                     --port): list it as the other nodes and clients reach it"
                )
            })?;
        Ok(Cluster { nodes, me })
    }

    /// This node.
    pub fn myself(&self) -> &Node {
        &self.nodes[self.me]
    }

    /// The index of the node serving `slot`.
    pub fn owner(&self, slot: u16) -> usize {
        // Ranges are contiguous and in order: the first whose end is past the slot.
        self.nodes.partition_point(|n| n.slots.end <= slot)
    }
}

fn same_host(a: &str, b: &str) -> bool {
    match (a.parse::<std::net::IpAddr>(), b.parse::<std::net::IpAddr>()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a.eq_ignore_ascii_case(b),
    }
}

/// A node ID: 40 hex digits from SipHash of `host:port` under three fixed keys (the same on
/// every node, so all of them agree without talking).
fn node_id(host: &str, port: u16) -> String {
    let text = format!("{host}:{port}");
    let mut id = String::with_capacity(48);
    for k in 0..3u64 {
        let h = crate::format::siphash24(
            0x636f_7265_6275_6600 | k,
            0x6b76_2d63_6c75_7374,
            text.as_bytes(),
        );
        id.push_str(&format!("{h:016x}"));
    }
    id.truncate(40);
    id
}

/// The cluster layout of this process, set once at start (before any shard serves).
static CLUSTER: OnceLock<Cluster> = OnceLock::new();

/// Turns cluster mode on for this process.
pub fn install(cluster: Cluster) -> Result<(), String> {
    CLUSTER.set(cluster).map_err(|_| "cluster mode was set up twice".to_string())
}

/// The cluster layout, in cluster mode.
pub fn current() -> Option<&'static Cluster> {
    CLUSTER.get()
}

/// `host:port`, without brackets around an IPv6 host: Redis writes MOVED and CLUSTER NODES
/// so, and clients split at the last `:`.
fn address(node: &Node) -> String {
    format!("{}:{}", node.host, node.port)
}

/// In cluster mode, the error that answers `argv` instead of running it here (see
/// [`Cluster::redirect`]); `None` when cluster mode is off.
pub fn redirect(argv: &[&[u8]]) -> Option<String> {
    current()?.redirect(argv)
}

impl Cluster {
    /// The error that answers `argv` instead of running it on this node: `CROSSSLOT` when its
    /// keys hash to different slots, `MOVED slot host:port` when their slot is another node's.
    /// `None` runs the command (no keys, this node's slot, or an unknown command or a wrong
    /// arity, which the command itself reports). Redis checks in the same order.
    pub fn redirect(&self, argv: &[&[u8]]) -> Option<String> {
        let command = cmdtable::lookup(argv[0])?;
        if command.first_key == 0 || !command.arity_ok(argv.len()) {
            return None;
        }
        let mut slot = None;
        for at in command.key_positions(argv.len()) {
            let s = key_slot(argv[at]);
            match slot {
                None => slot = Some(s),
                Some(first) if first != s => {
                    return Some("CROSSSLOT Keys in request don't hash to the same slot".into());
                }
                Some(_) => {}
            }
        }
        let slot = slot?;
        let owner = self.owner(slot);
        (owner != self.me).then(|| format!("MOVED {slot} {}", address(&self.nodes[owner])))
    }
}

/// The `# Cluster` section of INFO (`cluster_enabled`, which cluster clients check).
pub fn info_section() -> String {
    format!("# Cluster\r\ncluster_enabled:{}\r\n\r\n", u8::from(current().is_some()))
}

/// `redis_mode` of INFO.
pub fn mode_name() -> &'static str {
    if current().is_some() {
        "cluster"
    } else {
        "standalone"
    }
}

/// Answers `CLUSTER ...`, `READONLY`, `READWRITE` and `ASKING` (`name` in lower case, `args`
/// after it).
pub async fn command(kv: &Rc<KvShard>, name: &[u8], args: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    let Some(cluster) = current() else {
        resp::error(&mut out, "ERR This instance has cluster support disabled");
        return out;
    };
    if name != b"cluster" {
        // READONLY / READWRITE (reads from replicas: there are none) and ASKING (no slot
        // migrates): accepted, nothing to change.
        if !args.is_empty() {
            let n = String::from_utf8_lossy(name);
            resp::error(&mut out, &format!("ERR wrong number of arguments for '{n}' command"));
        } else {
            resp::simple(&mut out, "OK");
        }
        return out;
    }
    let Some(sub) = args.first().map(|s| s.to_ascii_lowercase()) else {
        resp::error(&mut out, "ERR wrong number of arguments for 'cluster' command");
        return out;
    };
    let full = format!("cluster|{}", String::from_utf8_lossy(&sub));
    match cmdtable::lookup(full.as_bytes()) {
        Some(c) if !c.arity_ok(args.len() + 1) => {
            resp::error(&mut out, &format!("ERR wrong number of arguments for '{full}' command"));
            return out;
        }
        Some(_) => {}
        None => {
            let shown = String::from_utf8_lossy(args[0]);
            resp::error(
                &mut out,
                &format!(
                    "ERR unknown subcommand '{shown}'. Try CLUSTER HELP. (corebuf-kv's cluster \
                     is static: no resharding, failover, replicas or gossip)"
                ),
            );
            return out;
        }
    }
    match sub.as_slice() {
        b"info" => resp::bulk(&mut out, cluster_info(cluster).as_bytes()),
        b"myid" => resp::bulk(&mut out, cluster.myself().id.as_bytes()),
        b"nodes" => resp::bulk(&mut out, cluster_nodes(cluster).as_bytes()),
        b"slots" => cluster_slots(&mut out, cluster),
        b"shards" => cluster_shards(&mut out, cluster),
        b"keyslot" => resp::integer(&mut out, key_slot(args[1]).into()),
        b"countkeysinslot" | b"getkeysinslot" => {
            let Some(slot) = parse_slot(args[1]) else {
                resp::error(&mut out, "ERR Invalid slot");
                return out;
            };
            let max = match args.get(2) {
                None => usize::MAX,
                Some(n) => match std::str::from_utf8(n).ok().and_then(|n| n.parse::<i64>().ok()) {
                    Some(n) if n >= 0 => n as usize,
                    _ => {
                        resp::error(&mut out, "ERR Invalid number of keys");
                        return out;
                    }
                },
            };
            match keys_in_slot(kv, slot, max).await {
                Err(e) => resp::error(&mut out, &e),
                Ok(keys) if sub == b"countkeysinslot" => resp::integer(&mut out, keys.len() as i64),
                Ok(keys) => {
                    resp::array(&mut out, keys.len());
                    for k in keys {
                        resp::bulk(&mut out, &k);
                    }
                }
            }
        }
        b"help" => {
            let lines = [
                "CLUSTER <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
                "COUNTKEYSINSLOT <slot>",
                "    Return the number of keys in <slot>.",
                "GETKEYSINSLOT <slot> <count>",
                "    Return key names stored by current node in a slot.",
                "INFO",
                "    Return information about the cluster.",
                "KEYSLOT <key>",
                "    Return the hash slot for <key>.",
                "MYID",
                "    Return the node id.",
                "NODES",
                "    Return cluster configuration seen by node.",
                "SHARDS",
                "    Return information about slot range mappings and the nodes.",
                "SLOTS",
                "    Return information about slots range mappings.",
                "HELP",
                "    Print this help.",
            ];
            resp::array(&mut out, lines.len());
            for line in lines {
                resp::simple(&mut out, line);
            }
        }
        _ => unreachable!("every subcommand in the table is answered above"),
    }
    out
}

/// This node's keys in `slot` (every shard walks its ranges), at most `max`.
async fn keys_in_slot(kv: &Rc<KvShard>, slot: u16, max: usize) -> Result<Vec<Vec<u8>>, String> {
    let parts = on_every_shard(kv, move |kv| async move {
        kv.keys_where(|key| key_slot(key) == slot, max).await.map_err(|e| e.to_string())
    })
    .await;
    let mut keys = Vec::new();
    for part in parts {
        keys.extend(part??);
    }
    keys.truncate(max);
    Ok(keys)
}

fn parse_slot(text: &[u8]) -> Option<u16> {
    std::str::from_utf8(text).ok()?.parse::<u16>().ok().filter(|&s| s < SLOT_COUNT)
}

fn cluster_info(c: &Cluster) -> String {
    let n = c.nodes.len();
    format!(
        "cluster_state:ok\r\ncluster_slots_assigned:{SLOT_COUNT}\r\ncluster_slots_ok:{SLOT_COUNT}\r\n\
         cluster_slots_pfail:0\r\ncluster_slots_fail:0\r\ncluster_known_nodes:{n}\r\n\
         cluster_size:{n}\r\ncluster_current_epoch:{n}\r\ncluster_my_epoch:{}\r\n\
         cluster_stats_messages_sent:0\r\ncluster_stats_messages_received:0\r\n\
         total_cluster_links_buffer_limit_exceeded:0\r\n",
        c.me + 1
    )
}

/// `CLUSTER NODES`: one line per node, `id ip:port@cport flags master ping pong epoch link
/// slots`. The bus port is the Redis convention (port + 10000); nothing listens there.
fn cluster_nodes(c: &Cluster) -> String {
    let mut s = String::new();
    for (i, node) in c.nodes.iter().enumerate() {
        let flags = if i == c.me { "myself,master" } else { "master" };
        let bus = u32::from(node.port) + 10000;
        let slots = match node.slots.len() {
            0 => String::new(),
            1 => format!(" {}", node.slots.start),
            _ => format!(" {}-{}", node.slots.start, node.slots.end - 1),
        };
        s.push_str(&format!(
            "{} {}@{bus} {flags} - 0 0 {} connected{slots}\n",
            node.id,
            address(node),
            i + 1
        ));
    }
    s
}

fn cluster_slots(out: &mut Vec<u8>, c: &Cluster) {
    let nodes: Vec<&Node> = c.nodes.iter().filter(|n| !n.slots.is_empty()).collect();
    resp::array(out, nodes.len());
    for node in nodes {
        resp::array(out, 3);
        resp::integer(out, node.slots.start.into());
        resp::integer(out, i64::from(node.slots.end) - 1);
        // Redis 7: ip, port, id, and a map of further endpoints (none).
        resp::array(out, 4);
        resp::bulk(out, node.host.as_bytes());
        resp::integer(out, node.port.into());
        resp::bulk(out, node.id.as_bytes());
        resp::array(out, 0);
    }
}

fn cluster_shards(out: &mut Vec<u8>, c: &Cluster) {
    resp::array(out, c.nodes.len());
    for node in &c.nodes {
        resp::array(out, 4);
        resp::bulk(out, b"slots");
        if node.slots.is_empty() {
            resp::array(out, 0);
        } else {
            resp::array(out, 2);
            resp::integer(out, node.slots.start.into());
            resp::integer(out, i64::from(node.slots.end) - 1);
        }
        resp::bulk(out, b"nodes");
        resp::array(out, 1);
        resp::array(out, 14);
        resp::bulk(out, b"id");
        resp::bulk(out, node.id.as_bytes());
        resp::bulk(out, b"port");
        resp::integer(out, node.port.into());
        resp::bulk(out, b"ip");
        resp::bulk(out, node.host.as_bytes());
        resp::bulk(out, b"endpoint");
        resp::bulk(out, node.host.as_bytes());
        resp::bulk(out, b"role");
        resp::bulk(out, b"master");
        resp::bulk(out, b"replication-offset");
        resp::integer(out, 0);
        resp::bulk(out, b"health");
        resp::bulk(out, b"online");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_and_slots_match_redis() {
        // The check value of CRC16-XMODEM, and slots Redis itself reports (CLUSTER KEYSLOT).
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"hello"), 866);
        assert_eq!(key_slot(b""), 0);
    }

    #[test]
    fn hash_tags_follow_the_cluster_spec() {
        assert_eq!(hash_tag(b"{user1000}.following"), b"user1000");
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"{user1000}.followers"));
        assert_eq!(hash_tag(b"foo{}{bar}"), b"foo{}{bar}", "an empty first tag: the whole key");
        assert_eq!(hash_tag(b"foo{{bar}}zap"), b"{bar");
        assert_eq!(hash_tag(b"foo{bar}{zap}"), b"bar");
        assert_eq!(hash_tag(b"no tag}{"), b"no tag}{");
        assert_eq!(hash_tag(b"{unclosed"), b"{unclosed");
    }

    #[test]
    fn slots_split_evenly_in_list_order() {
        let c = Cluster::parse("127.0.0.1:7000, 127.0.0.1:7001,127.0.0.1:7002", "127.0.0.1", 7001)
            .expect("a valid list");
        assert_eq!(c.me, 1);
        let ranges: Vec<_> = c.nodes.iter().map(|n| n.slots.clone()).collect();
        assert_eq!(ranges, [0..5461, 5461..10922, 10922..16384]);
        for slot in [0, 5460, 5461, 10921, 10922, 16383] {
            let owner = c.owner(slot);
            assert!(c.nodes[owner].slots.contains(&slot), "slot {slot}");
        }
        let ids: Vec<&str> = c.nodes.iter().map(|n| n.id.as_str()).collect();
        assert!(ids.iter().all(|id| id.len() == 40 && id.bytes().all(|b| b.is_ascii_hexdigit())));
        assert!(ids[0] != ids[1] && ids[1] != ids[2]);
        let again =
            Cluster::parse("127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002", "127.0.0.1", 7000)
                .expect("valid");
        assert_eq!(again.nodes, c.nodes, "every node derives the same layout and IDs");
        let one = Cluster::parse("localhost:7000", "localhost", 7000).expect("valid");
        assert_eq!(one.nodes[0].slots, 0..SLOT_COUNT);
    }

    #[test]
    fn bad_lists_are_refused_with_the_reason() {
        let err = |list: &str, port: u16| Cluster::parse(list, "127.0.0.1", port).unwrap_err();
        assert!(err("127.0.0.1:7000", 0).contains("fixed --port"));
        assert!(err("127.0.0.1:7001", 7000).contains("does not list this node"));
        assert!(err("127.0.0.1", 7000).contains("not HOST:PORT"));
        assert!(err("127.0.0.1:x", 7000).contains("no valid port"));
        assert!(err("127.0.0.1:7000,127.0.0.1:7000", 7000).contains("twice"));
        assert!(err("", 7000).contains("between 1 and"));
    }

    #[test]
    fn keys_of_other_slots_move_and_multi_key_commands_stay_in_one_slot() {
        let c = Cluster::parse("127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002", "127.0.0.1", 7000)
            .expect("valid");
        let r = |line: &[&str]| {
            let argv: Vec<&[u8]> = line.iter().map(|a| a.as_bytes()).collect();
            c.redirect(&argv)
        };
        // foo: 12182 (node 2); bar: 5061 (node 0, this one); hello: 866 (node 0).
        assert_eq!(r(&["GET", "foo"]).as_deref(), Some("MOVED 12182 127.0.0.1:7002"));
        assert_eq!(r(&["get", "bar"]), None);
        assert_eq!(r(&["SET", "foo", "v", "NX"]).as_deref(), Some("MOVED 12182 127.0.0.1:7002"));
        let crossslot = Some("CROSSSLOT Keys in request don't hash to the same slot");
        assert_eq!(r(&["MGET", "bar", "hello"]).as_deref(), crossslot, "even both on this node");
        assert_eq!(r(&["MSET", "bar", "1", "foo", "2"]).as_deref(), crossslot);
        assert_eq!(
            r(&["MSET", "{foo}a", "1", "{foo}b", "2"]).as_deref(),
            Some("MOVED 12182 127.0.0.1:7002")
        );
        assert_eq!(r(&["DEL", "{bar}x", "{bar}y", "bar"]), None);
        assert_eq!(r(&["PING"]), None);
        assert_eq!(r(&["KEYS", "*"]), None);
        assert_eq!(r(&["GET"]), None, "the arity error comes from the command");
        assert_eq!(r(&["NOSUCH", "foo"]), None);
    }

    #[test]
    fn nodes_and_slots_replies_have_redis_shape() {
        let c = Cluster::parse("127.0.0.1:7000,127.0.0.1:7001", "127.0.0.1", 7000).expect("valid");
        let text = cluster_nodes(&c);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[0],
            format!(
                "{} 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-8191",
                c.nodes[0].id
            )
        );
        assert!(lines[1].ends_with(" 127.0.0.1:7001@17001 master - 0 0 2 connected 8192-16383"));
        let mut out = Vec::new();
        cluster_slots(&mut out, &c);
        let expected = format!(
            "*2\r\n*3\r\n:0\r\n:8191\r\n*4\r\n$9\r\n127.0.0.1\r\n:7000\r\n$40\r\n{}\r\n*0\r\n\
             *3\r\n:8192\r\n:16383\r\n*4\r\n$9\r\n127.0.0.1\r\n:7001\r\n$40\r\n{}\r\n*0\r\n",
            c.nodes[0].id, c.nodes[1].id
        );
        assert_eq!(String::from_utf8_lossy(&out), expected);
    }
}
