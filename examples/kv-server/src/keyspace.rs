//! Commands that visit several shards one step after another: MSETNX, RENAME / RENAMENX across
//! shards, KEYS, SCAN, RANDOMKEY, FLUSHALL / FLUSHDB, SAVE; and CONFIG GET's answers.
//!
//! What they guarantee across shards (each key's own operation is atomic on its owner):
//! - MSETNX checks every key, then sets them all: all or nothing against its own checks, but
//!   not isolated from other connections writing those keys between the two steps.
//! - RENAME reads the source on its owner, writes the destination on its owner (a large value
//!   as a copy in chunks of its own: O(value), where Redis's RENAME is O(1)), then deletes
//!   the source there if it still holds what was copied. A crash between the last two steps
//!   leaves both keys (never neither); a concurrent write of the source between the steps
//!   keeps the new source (the destination has the value read in step one).
//! - SCAN's cursor is a global bucket position (`range * 64 + bucket`, 0 = start): keys never
//!   move between buckets and each bucket is read whole under its lock, so a key present for
//!   the whole scan is returned (exactly once); keys written during it may or may not be.

use std::rc::Rc;

use crate::cmds::{self, Read, Update};
use crate::format::{BUCKETS_PER_RANGE, MAX_VALUE, PROTO_MAX_BULK, RANGE_BLOCKS};
use crate::glob;
use crate::large;
use crate::resp;
use crate::server::{exec_ops, on_every_shard, Op, OpOut};
use crate::store::{Cond, Geometry, KvShard};

/// Buckets SCAN visits per call when COUNT is not given (Redis's default COUNT is 10 keys).
pub const SCAN_COUNT_DEFAULT: u64 = 10;
/// Most buckets one SCAN call visits, whatever COUNT says (bounds one reply's work).
pub const SCAN_COUNT_MAX: u64 = 1 << 16;

/// Whether `n` arguments suit command `name` (one of [`run`]'s).
pub fn arity_ok(name: &[u8], n: usize) -> bool {
    match name {
        b"msetnx" => n >= 2 && n.is_multiple_of(2),
        b"rename" | b"renamenx" => n == 2,
        b"keys" => n == 1,
        b"scan" => n >= 1,
        b"randomkey" | b"save" => n == 0,
        b"flushall" | b"flushdb" => n <= 1,
        _ => false,
    }
}

/// Runs one of these commands; returns its reply.
pub async fn run(kv: &Rc<KvShard>, name: &[u8], args: &[&[u8]]) -> Vec<u8> {
    let result = match name {
        b"msetnx" => msetnx(kv, args).await,
        b"rename" => rename(kv, args[0], args[1], false).await,
        b"renamenx" => rename(kv, args[0], args[1], true).await,
        b"keys" => keys(kv, args[0]).await,
        b"scan" => scan(kv, args).await,
        b"randomkey" => random_key(kv).await,
        b"flushall" | b"flushdb" => flush_all(kv, args).await,
        b"save" => save(kv).await,
        _ => Err(format!(
            "ERR internal: {} is not a keyspace command",
            String::from_utf8_lossy(name)
        )),
    };
    result.unwrap_or_else(|e| {
        let mut out = Vec::new();
        resp::error(&mut out, &e);
        out
    })
}

/// Runs `ops` on their owners (grouped by owner, the groups concurrently; each owner in
/// order), waiting for their log commit under `--fsync always`; results in `ops`' order.
async fn run_grouped(kv: &Rc<KvShard>, ops: Vec<Op>) -> Vec<OpOut> {
    let n = ops.len();
    let mut groups: Vec<(usize, Vec<usize>, Vec<Op>)> = Vec::new();
    for (i, op) in ops.into_iter().enumerate() {
        let owner = kv.owner_of_key(op.key());
        match groups.iter_mut().find(|g| g.0 == owner) {
            Some(g) => {
                g.1.push(i);
                g.2.push(op);
            }
            None => groups.push((owner, vec![i], vec![op])),
        }
    }
    let me = kv.shard.id();
    let mut tasks = Vec::new();
    for (owner, idx, ops) in groups {
        let (kv, shard) = (Rc::clone(kv), Rc::clone(&kv.shard));
        tasks.push((
            idx,
            glommio::spawn_local(async move {
                if owner == me {
                    return Ok(exec_ops(kv, ops).await);
                }
                shard
                    .run_on(owner, move |_| async move { exec_ops(KvShard::current(), ops).await })
                    .await
                    .map_err(|e| e.to_string())
            }),
        ));
    }
    let mut out: Vec<Option<OpOut>> = (0..n).map(|_| None).collect();
    for (idx, task) in tasks {
        match task.await {
            Ok(outs) => idx.into_iter().zip(outs).for_each(|(i, o)| out[i] = Some(o)),
            Err(e) => {
                for i in idx {
                    out[i] = Some(OpOut::Err(format!("ERR shard unavailable: {e}")));
                }
            }
        }
    }
    out.into_iter().map(|o| o.unwrap_or(OpOut::Err("ERR internal: no result".into()))).collect()
}

/// One operation on its owner (its result as it is, chunks to free included).
async fn run_one(kv: &Rc<KvShard>, op: Op) -> Result<OpOut, String> {
    match run_grouped(kv, vec![op]).await.pop() {
        Some(OpOut::Err(e)) => Err(e),
        Some(out) => Ok(out),
        None => Err("ERR internal: no result".into()),
    }
}

fn integer(n: i64) -> Vec<u8> {
    let mut out = Vec::new();
    resp::integer(&mut out, n);
    out
}

fn simple(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    resp::simple(&mut out, s);
    out
}

async fn msetnx(kv: &Rc<KvShard>, args: &[&[u8]]) -> Result<Vec<u8>, String> {
    for pair in args.chunks(2) {
        crate::server::check_key(pair[0])?;
        crate::server::check_value_len(pair[1].len(), crate::server::Growth::Set)?;
    }
    let checks = args.chunks(2).map(|p| Op::Exists(p[0].to_vec())).collect();
    for out in run_grouped(kv, checks).await {
        match out {
            OpOut::Done(false) => {}
            OpOut::Done(true) => return Ok(integer(0)),
            OpOut::Err(e) => return Err(e),
            other => return Err(format!("ERR internal: unexpected {other:?}")),
        }
    }
    // Large values: their chunks first (from the request, not copied whole).
    let mut sets = Vec::with_capacity(args.len() / 2);
    for p in args.chunks(2) {
        if p[1].len() <= MAX_VALUE {
            sets.push(Op::Set(p[0].to_vec(), p[1].to_vec(), Cond::Always, 0));
            continue;
        }
        match large::write_value(kv, p[1]).await {
            Ok(m) => sets.push(Op::SetManifest(p[0].to_vec(), m, Cond::Always, 0, true)),
            Err(e) => {
                for op in &sets {
                    if let Op::SetManifest(_, m, ..) = op {
                        large::discard(kv, m).await;
                    }
                }
                return Err(e.to_string());
            }
        }
    }
    let mut error = None;
    for out in run_grouped(kv, sets).await {
        if let OpOut::Err(e) = settle(kv, out).await {
            error.get_or_insert(e);
        }
    }
    match error {
        Some(e) => Err(e),
        None => Ok(integer(1)),
    }
}

/// Frees the chunks `out` says its operation left to free; returns the result itself.
async fn settle(kv: &Rc<KvShard>, out: OpOut) -> OpOut {
    let (out, orphan) = out.split();
    if let Some(orphan) = orphan {
        large::free_chunks(kv, orphan).await;
    }
    out
}

/// One operation on its owner, its chunks to free freed.
async fn run_settled(kv: &Rc<KvShard>, op: Op) -> Result<OpOut, String> {
    match settle(kv, run_one(kv, op).await?).await {
        OpOut::Err(e) => Err(e),
        out => Ok(out),
    }
}

async fn rename(kv: &Rc<KvShard>, src: &[u8], dst: &[u8], nx: bool) -> Result<Vec<u8>, String> {
    crate::server::check_key(src)?;
    crate::server::check_key(dst)?;
    let OpOut::Entry(entry) = run_one(kv, Op::Read(src.to_vec(), Read::Entry)).await? else {
        return Err("ERR internal: RENAME read no entry".into());
    };
    let Some(entry) = entry else { return Err("ERR no such key".into()) };
    let done = |set: bool| if nx { integer(set as i64) } else { simple("OK") };
    if src == dst {
        // RENAME k k: OK; RENAMENX k k: 0 (the destination exists), as Redis.
        return Ok(done(false));
    }
    let cond = if nx { Cond::Nx } else { Cond::Always };
    // A large value is copied into chunks of its own for the destination: two keys naming the
    // same chunks (after a crash between the steps below, or an overwrite of the source in
    // between, which frees the source's chunks) would lose the value.
    let set = match entry.large() {
        Some(m) => match large::copy(kv, src, &entry, &m).await? {
            Some(copy) => Op::SetManifest(dst.to_vec(), copy, cond, entry.expires, true),
            None => return Err("ERR no such key".into()), // replaced while it was read
        },
        None if entry.manifest => return Err(crate::server::damaged_manifest(src)),
        None => Op::Set(dst.to_vec(), entry.value.clone(), cond, entry.expires),
    };
    match run_settled(kv, set).await? {
        OpOut::Done(true) => {}
        OpOut::Done(false) => return Ok(done(false)),
        other => return Err(format!("ERR internal: unexpected {other:?}")),
    }
    // The source goes if it still holds what was copied (its chunks are freed with it).
    let del_if = Box::new(Update::DelIf(entry.value, entry.expires));
    run_settled(kv, Op::Update(src.to_vec(), del_if)).await?;
    Ok(done(true))
}

/// Every live key matching `pattern`, from every shard.
async fn keys(kv: &Rc<KvShard>, pattern: &[u8]) -> Result<Vec<u8>, String> {
    let pattern = pattern.to_vec();
    let parts = on_every_shard(kv, move |kv| {
        let pattern = pattern.clone();
        async move {
            kv.keys_where(|k| glob::matches(&pattern, k), usize::MAX)
                .await
                .map_err(|e| e.to_string())
        }
    })
    .await;
    let mut all = Vec::new();
    for part in parts {
        all.extend(part??);
    }
    let mut out = Vec::new();
    resp::array(&mut out, all.len());
    for k in &all {
        resp::bulk(&mut out, k);
    }
    Ok(out)
}

/// The live keys of buckets `first..end` (global bucket ids), each range's part on its owner.
async fn keys_of_buckets(kv: &Rc<KvShard>, first: u64, end: u64) -> Result<Vec<Vec<u8>>, String> {
    let mut keys = Vec::new();
    let mut id = first;
    while id < end {
        let range = id / BUCKETS_PER_RANGE;
        let stop = end.min((range + 1) * BUCKETS_PER_RANGE);
        let buckets = id % BUCKETS_PER_RANGE..(stop - 1) % BUCKETS_PER_RANGE + 1;
        let owner = kv.shard.owner_of(range * RANGE_BLOCKS);
        let part = if owner == kv.shard.id() {
            kv.live_keys(range, buckets).await.map_err(|e| e.to_string())?
        } else {
            kv.shard
                .run_on(owner, move |_| async move {
                    KvShard::current().live_keys(range, buckets).await.map_err(|e| e.to_string())
                })
                .await
                .map_err(|e| format!("ERR shard unavailable: {e}"))??
        };
        keys.extend(part);
        id = stop;
    }
    Ok(keys)
}

/// `SCAN cursor [MATCH pattern] [COUNT buckets] [TYPE type]`.
async fn scan(kv: &Rc<KvShard>, args: &[&[u8]]) -> Result<Vec<u8>, String> {
    let cursor = std::str::from_utf8(args[0])
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or("ERR invalid cursor")?;
    let (mut pattern, mut count, mut only_strings) = (None, SCAN_COUNT_DEFAULT, true);
    let mut i = 1;
    while i < args.len() {
        let opt = args[i].to_ascii_lowercase();
        let Some(value) = args.get(i + 1) else { return Err(cmds::SYNTAX.into()) };
        match opt.as_slice() {
            b"match" => pattern = Some(value.to_vec()),
            b"count" => match cmds::parse_int(value) {
                Some(n) if n >= 1 => count = (n as u64).min(SCAN_COUNT_MAX),
                Some(_) => return Err(cmds::SYNTAX.into()),
                None => return Err(cmds::NOT_INTEGER.into()),
            },
            b"type" => only_strings = value.eq_ignore_ascii_case(b"string"),
            _ => return Err(cmds::SYNTAX.into()),
        }
        i += 2;
    }
    let (first, end) = (BUCKETS_PER_RANGE, kv.geo.ranges * BUCKETS_PER_RANGE);
    let start = if cursor == 0 { first } else { cursor };
    let mut found = Vec::new();
    let next = if start < first || start >= end {
        0 // a cursor this file never gave out: the scan is over
    } else {
        let stop = end.min(start + count);
        found = keys_of_buckets(kv, start, stop).await?;
        if stop == end {
            0
        } else {
            stop
        }
    };
    found.retain(|k| only_strings && pattern.as_ref().is_none_or(|p| glob::matches(p, k)));
    let mut out = Vec::new();
    resp::array(&mut out, 2);
    resp::bulk(&mut out, next.to_string().as_bytes());
    resp::array(&mut out, found.len());
    for k in &found {
        resp::bulk(&mut out, k);
    }
    Ok(out)
}

/// A random live key: the first non-empty range from a random one on (not uniform over keys).
async fn random_key(kv: &Rc<KvShard>) -> Result<Vec<u8>, String> {
    let data_ranges = kv.geo.ranges - 1;
    let seed = crate::format::mix64(crate::store::now_ms() ^ ((kv.shard.id() as u64) << 48));
    for step in 0..data_ranges {
        let range = 1 + (seed % data_ranges + step) % data_ranges;
        let first = range * BUCKETS_PER_RANGE;
        let keys = keys_of_buckets(kv, first, first + BUCKETS_PER_RANGE).await?;
        if !keys.is_empty() {
            let key = &keys[(crate::format::mix64(seed) % keys.len() as u64) as usize];
            let mut out = Vec::new();
            resp::bulk(&mut out, key);
            return Ok(out);
        }
    }
    let mut out = Vec::new();
    resp::null(&mut out);
    Ok(out)
}

/// FLUSHALL / FLUSHDB [ASYNC|SYNC]: both run synchronously; answered once every shard has
/// removed its keys and checkpointed.
async fn flush_all(kv: &Rc<KvShard>, args: &[&[u8]]) -> Result<Vec<u8>, String> {
    if let Some(mode) = args.first() {
        if !mode.eq_ignore_ascii_case(b"async") && !mode.eq_ignore_ascii_case(b"sync") {
            return Err(cmds::SYNTAX.into());
        }
    }
    let parts =
        on_every_shard(kv, |kv| async move { kv.flush_owned().await.map_err(|e| e.to_string()) })
            .await;
    let mut removed = Vec::new();
    let mut failed = None;
    for (owner, part) in parts.into_iter().enumerate() {
        match part {
            Ok(Ok(manifests)) => removed.extend(manifests.into_iter().map(|m| (owner, m))),
            Ok(Err(e)) | Err(e) => failed = failed.or(Some(e)),
        }
    }
    // The removed large values' chunks: once their removal is durable (it is: each shard
    // checkpointed) and no connection streams them.
    for (owner, manifest) in removed {
        large::free_chunks(kv, large::Orphan { manifest, owner }).await;
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(simple("OK")),
    }
}

/// SAVE: a checkpoint on every shard (everything written back and flushed; the logs emptied).
async fn save(kv: &Rc<KvShard>) -> Result<Vec<u8>, String> {
    let parts = on_every_shard(kv, |kv| async move { kv.checkpoint().await }).await;
    for part in parts {
        part?.map_err(|e| format!("ERR {e}"))?;
    }
    Ok(simple("OK"))
}

/// [`PROTO_MAX_BULK`] as CONFIG GET answers it.
const PROTO_MAX_BULK_TEXT: &str = "536870912";
const _: () = assert!(PROTO_MAX_BULK == 536_870_912);

/// CONFIG GET pattern [pattern ...]: pairs for the known parameters that match.
pub fn config_get(geo: &Geometry, patterns: &[&[u8]]) -> Vec<u8> {
    let fsync = geo.fsync.to_string();
    let known: [(&str, &str); 7] = [
        ("save", ""),
        ("appendonly", "yes"),
        ("appendfsync", &fsync),
        ("databases", "1"),
        ("maxmemory", "0"),
        ("maxmemory-policy", "noeviction"),
        ("proto-max-bulk-len", PROTO_MAX_BULK_TEXT),
    ];
    let hits: Vec<(&str, &str)> = known
        .iter()
        .filter(|(name, _)| {
            patterns.iter().any(|p| glob::matches(&p.to_ascii_lowercase(), name.as_bytes()))
        })
        .copied()
        .collect();
    let mut out = Vec::new();
    resp::array(&mut out, 2 * hits.len());
    for (name, value) in hits {
        resp::bulk(&mut out, name.as_bytes());
        resp::bulk(&mut out, value.as_bytes());
    }
    out
}
