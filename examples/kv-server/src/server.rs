//! Connections: accept, parse, route each key to its owner shard, reply in order.
//!
//! Every shard runs an accept loop on its own `SO_REUSEPORT` listener, so the kernel spreads
//! connections over the shards. A connection parses every complete command in its buffer,
//! turns key commands into operations, groups them by owner shard (keeping each owner's order)
//! and runs the groups at once: the local group in place, each remote group as one message.
//! Replies are rendered in request order. Under `--fsync always` each owner commits its log
//! once for the group's writes before it answers (group commit: one log write and one flush
//! cover every group waiting on that shard).

use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::rc::Rc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};

use crate::cmds::{self, Read, Shape, Update};
use crate::format::{rflags, Manifest, MAX_KEY, MAX_VALUE, PROTO_MAX_BULK};
use crate::keyspace;
use crate::large::{self, LargeRef, Orphan};
use crate::resp::{self, Parsed};
use crate::store::{self, Cond, Fsync, Got, InfoPart, KvShard, Loc, Space};

/// Operations that run on a key's owner shard (everything in them is `Send`).
#[derive(Debug)]
pub enum Op {
    /// GET / MGET element.
    Get(Key),
    /// SET / MSET pair, with its condition and expiry (unix ms, 0 = none).
    Set(Vec<u8>, Vec<u8>, Cond, u64),
    /// SET of a large value whose chunks are written: its manifest, condition and expiry, and
    /// whether the chunks are this write's own (`fresh`: freed if the SET does not take
    /// effect; RENAME moves a manifest whose chunks belong to the source).
    SetManifest(Vec<u8>, Manifest, Cond, u64, bool),
    /// DEL of one key.
    Del(Vec<u8>),
    /// EXISTS of one key.
    Exists(Vec<u8>),
    /// A read of one key (TTL, TYPE, STRLEN, GETRANGE, ...).
    Read(Vec<u8>, Read),
    /// A read-modify-write of one key, atomic under its bucket lock (INCR, APPEND, EXPIRE,
    /// SET ... GET, ...). Boxed: an `Op` stays as small as a GET's inline key needs.
    Update(Vec<u8>, Box<Update>),
}

impl Op {
    /// The key the operation is for (its owner shard runs it).
    pub fn key(&self) -> &[u8] {
        match self {
            Op::Get(k) => k.as_bytes(),
            Op::Set(k, ..)
            | Op::SetManifest(k, ..)
            | Op::Del(k)
            | Op::Exists(k)
            | Op::Read(k, _)
            | Op::Update(k, _) => k,
        }
    }

    /// Whether it may change the key (its answer then waits for the log under `--fsync
    /// always`).
    fn writes(&self) -> bool {
        matches!(self, Op::Set(..) | Op::SetManifest(..) | Op::Del(..) | Op::Update(..))
    }
}

// Batches move operations around: the rarer ones must not make every GET's larger.
const _: () = assert!(std::mem::size_of::<Op>() <= 64);

/// Bytes of a key kept inside a [`Key`] without a heap allocation.
const KEY_INLINE_BYTES: usize = 46;

/// A key of a GET: short keys (the common case) live inline, so queuing a GET allocates
/// nothing; longer ones go to the heap.
#[derive(Debug)]
pub enum Key {
    /// Up to [`KEY_INLINE_BYTES`] bytes.
    Inline(u8, [u8; KEY_INLINE_BYTES]),
    /// A longer key.
    Heap(Vec<u8>),
}

impl Key {
    /// A copy of `key`.
    pub fn new(key: &[u8]) -> Key {
        if key.len() <= KEY_INLINE_BYTES {
            let mut bytes = [0u8; KEY_INLINE_BYTES];
            bytes[..key.len()].copy_from_slice(key);
            Key::Inline(key.len() as u8, bytes)
        } else {
            Key::Heap(key.to_vec())
        }
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Key::Inline(len, bytes) => &bytes[..*len as usize],
            Key::Heap(v) => v,
        }
    }
}

/// An operation's result.
#[derive(Debug, PartialEq, Eq)]
pub enum OpOut {
    /// A value or nil.
    Value(Option<Vec<u8>>),
    /// A value found by a local GET, at this range of the connection's value buffer.
    Local(Range<usize>),
    /// A large value (or a range of one) the connection streams from its chunks.
    Large(Box<LargeRef>),
    /// Whether it took effect (set, deleted, exists).
    Done(bool),
    /// An integer reply.
    Int(i64),
    /// A status reply (`+string`).
    Status(&'static str),
    /// A key's value with its expiry (RENAME reads its source with this).
    Entry(Option<store::Entry>),
    /// An error message (with its `ERR` prefix).
    Err(String),
    /// The result, and a large value the operation removed (or wrote and did not keep): its
    /// chunks are freed once the result is answered.
    Freed(Box<OpOut>, Orphan),
    /// APPEND / SETRANGE that needs the large-value path ([`large::edit`]); never answered.
    Grow,
}

impl OpOut {
    /// `out`, and the chunks of `orphan` (if any) to free once it is answered.
    fn freeing(out: OpOut, orphan: Option<Manifest>, owner: usize) -> OpOut {
        match orphan {
            Some(manifest) => OpOut::Freed(Box::new(out), Orphan { manifest, owner }),
            None => out,
        }
    }

    /// The result without its chunks to free, and those.
    pub fn split(self) -> (OpOut, Option<Orphan>) {
        match self {
            OpOut::Freed(out, orphan) => (*out, Some(orphan)),
            out => (out, None),
        }
    }
}

/// A key as error messages show it: its first 128 bytes, lossily as text.
pub fn shown_key(key: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(&key[..key.len().min(128)])
}

/// The error for a manifest that does not decode.
pub fn damaged_manifest(key: &[u8]) -> String {
    format!("ERR the large value of key '{}' has a damaged manifest", shown_key(key))
}

/// Runs one operation on its owner (this shard) without an await, if it can be done so: a GET
/// or a plain SET of a key whose bucket is cached ([`KvShard::try_get_now`],
/// [`KvShard::try_set_now`]). `None`: nothing was done, [`run_op`] runs it.
fn run_now(kv: &KvShard, op: &Op, loc: &Loc, values: &mut Vec<u8>) -> Option<OpOut> {
    match op {
        Op::Get(k) => {
            let start = values.len();
            let got = kv.try_get_now(loc, k.as_bytes(), values)?;
            Some(get_out(k.as_bytes(), got, start, values))
        }
        Op::Set(k, v, cond, 0) => Some(match kv.try_set_now(loc, k, v, *cond)? {
            Ok(done) => OpOut::Done(done),
            Err(e) => OpOut::Err(e.to_string()),
        }),
        _ => None,
    }
}

/// The result of a GET of `key` that found `got`, its value (or manifest) at `values[start..]`.
fn get_out(key: &[u8], got: Got, start: usize, values: &mut Vec<u8>) -> OpOut {
    match got {
        Got::Value => OpOut::Local(start..values.len()),
        Got::Missing => OpOut::Value(None),
        Got::Manifest => {
            let m = Manifest::decode(&values[start..]);
            values.truncate(start);
            match m {
                Ok(m) => OpOut::Large(Box::new(LargeRef::whole(key.to_vec(), m))),
                Err(_) => OpOut::Err(damaged_manifest(key)),
            }
        }
    }
}

/// Runs one operation on its owner (this shard).
async fn run_op(kv: &Rc<KvShard>, op: Op, loc: &Loc, values: &mut Vec<u8>) -> OpOut {
    let me = kv.shard.id();
    let result = match op {
        Op::Get(k) => {
            let start = values.len();
            let got = kv.get_into_at(loc, k.as_bytes(), values).await;
            got.map(|got| get_out(k.as_bytes(), got, start, values))
        }
        Op::Set(k, v, c, e) => kv
            .set_full_at(loc, &k, &v, e, c, 0)
            .await
            .map(|(done, orphan)| OpOut::freeing(OpOut::Done(done), orphan, me)),
        Op::SetManifest(k, m, c, e, fresh) => {
            match kv.set_full_at(loc, &k, &m.encode(), e, c, rflags::MANIFEST).await {
                Ok((true, replaced)) => {
                    free_if_expired(kv, fresh.then_some(m), e);
                    Ok(OpOut::freeing(OpOut::Done(true), replaced, me))
                }
                // Chunks no manifest names: freed again.
                Ok((false, _)) => Ok(OpOut::freeing(OpOut::Done(false), fresh.then_some(m), me)),
                // After a failed log append the cached manifest names the chunks: kept.
                Err(e) => {
                    let fresh = fresh.then_some(m).filter(|_| !kept_after(kv, &e, &m));
                    Ok(OpOut::freeing(OpOut::Err(e.to_string()), fresh, me))
                }
            }
        }
        Op::Del(k) => kv
            .del_full(&k, Space::User)
            .await
            .map(|(done, orphan)| OpOut::freeing(OpOut::Done(done), orphan, me)),
        Op::Exists(k) => kv.exists(&k).await.map(OpOut::Done),
        Op::Read(k, r) => kv.get_entry(&k).await.map(|e| {
            let out = cmds::read(r, e.as_ref(), store::now_ms());
            with_key(out, &k)
        }),
        Op::Update(k, u) => return run_update(kv, k, u).await,
    };
    result.unwrap_or_else(|e| OpOut::Err(e.to_string()))
}

/// Whether the chunks of `m`, a large value whose write failed with `e`, must be kept: the
/// change was made in the cache before its log append failed, so the cached manifest names
/// them (and may reach the data file by write-back). Their space leaks, as after a crash
/// between a large value's chunks and its manifest; said on stderr.
pub(crate) fn kept_after(kv: &KvShard, e: &store::KvError, m: &Manifest) -> bool {
    if e.applied() {
        eprintln!(
            "corebuf-kv: shard {}: a large value's manifest is cached but its log append failed \
             ({e}); its chunks (tag {:#018x}) are kept, their space leaks",
            kv.shard.id(),
            m.tag
        );
    }
    e.applied()
}

/// Frees the chunks of `fresh`, a large value just SET with expiry `expires`, if that expiry
/// has passed: the SET then deleted the key rather than storing the manifest (an expiry
/// already past when it ran), so nothing else would ever free them. (If the manifest was
/// stored and expired since, no one can read it again, and its later removal frees nothing
/// more: freeing twice deletes nothing twice.)
fn free_if_expired(kv: &KvShard, fresh: Option<Manifest>, expires: u64) {
    if store::expired(expires, store::now_ms()) {
        kv.free_in_background(fresh);
    }
}

/// Names the key in a [`OpOut::Large`] the command code built without it.
fn with_key(out: OpOut, key: &[u8]) -> OpOut {
    match out {
        OpOut::Large(mut large) => {
            large.key = key.to_vec();
            OpOut::Large(large)
        }
        OpOut::Freed(out, orphan) => OpOut::Freed(Box::new(with_key(*out, key)), orphan),
        out => out,
    }
}

/// Runs a read-modify-write on its owner; one that grows past a record, or changes a large
/// value in place, takes the large-value path from here ([`large::edit`]).
async fn run_update(kv: &Rc<KvShard>, k: Vec<u8>, u: Box<Update>) -> OpOut {
    let me = kv.shard.id();
    let fresh = match &*u {
        Update::SetLarge { manifest, .. } => Some(*manifest),
        _ => None,
    };
    let out = match kv.update_full(&k, |live, now| cmds::apply(&u, live, now)).await {
        Ok((out, effects)) => {
            if let Update::SetLarge { manifest, ttl: cmds::Ttl::At(at), .. } = &*u {
                if effects.wrote {
                    free_if_expired(kv, Some(*manifest), (*at).max(1) as u64);
                }
            }
            // A fresh large value that was not written: its chunks go again.
            let orphan = effects.orphan.or(fresh.filter(|_| !effects.wrote));
            OpOut::freeing(with_key(out, &k), orphan, me)
        }
        Err(e) => {
            let fresh = fresh.filter(|m| !kept_after(kv, &e, m));
            OpOut::freeing(OpOut::Err(e.to_string()), fresh, me)
        }
    };
    if out != OpOut::Grow {
        return out;
    }
    match &*u {
        Update::Append(data) => large::edit(kv, &k, large::Edit::Append(data)).await,
        Update::SetRange(offset, data) => {
            large::edit(kv, &k, large::Edit::SetRange(*offset as u64, data)).await
        }
        _ => OpOut::Err("ERR internal: only APPEND and SETRANGE grow".into()),
    }
}

/// Under `--fsync always`, waits until the log holds this shard's writes durable; if that
/// fails, the answers of the writes (`wrote`: their indexes in `out`) become the error.
async fn commit_writes(kv: &KvShard, out: &mut [OpOut], wrote: &[usize]) {
    if wrote.is_empty() || kv.geo.fsync != Fsync::Always {
        return;
    }
    // One commit for the group, shared with every other group waiting on this shard.
    if let Err(e) = kv.log_commit().await {
        // Never acknowledge what may not be durable.
        eprintln!("corebuf-kv: shard {}: {e}", kv.shard.id());
        let failed = format!("ERR {e}");
        for &i in wrote {
            if !matches!(out[i], OpOut::Err(_)) {
                out[i] = OpOut::Err(failed.clone());
            }
        }
    }
}

/// Bytes of a bucket head [`warm_ahead`] asks the CPU for: the header and the first records.
const WARM_BYTES: usize = 256;
/// Operations whose bucket heads are asked of the CPU at a time. While one group runs, the
/// next one's frames are warmed and the one after's index slots: far enough ahead for the
/// lines to arrive, near enough for them to stay in the CPU's caches until used (warming a
/// whole 160-key MSET pipeline at once helped little).
const WARM_GROUP: usize = 16;

/// Before operation `done` of a batch whose keys are at `locs` runs: every [`WARM_GROUP`]
/// operations, asks the CPU for the frames of the next group's bucket heads and the index
/// slots of the group after (at the start, the first group's frames too). A hint: nothing is
/// read from the device and nothing changes.
fn warm_ahead(kv: &KvShard, locs: &[Loc], done: usize) {
    if !done.is_multiple_of(WARM_GROUP) {
        return;
    }
    let part = kv.shard.partition();
    // Group `k` after `done`: its bucket heads, in a buffer on the stack.
    let span = |k: usize, heads: &mut [u64; WARM_GROUP]| -> usize {
        let start = (done + k * WARM_GROUP).min(locs.len());
        let group = &locs[start..(start + WARM_GROUP).min(locs.len())];
        for (h, loc) in heads.iter_mut().zip(group) {
            *h = loc.head;
        }
        group.len()
    };
    let mut heads = [0u64; WARM_GROUP];
    if done == 0 {
        let n = span(0, &mut heads);
        part.warm(&heads[..n], WARM_BYTES);
    }
    let n = span(1, &mut heads);
    part.warm(&heads[..n], WARM_BYTES);
    let n = span(2, &mut heads);
    part.warm_index(&heads[..n]);
}

/// Runs operations in order on this shard (their owner); a GET's value comes as
/// [`OpOut::Value`].
pub async fn exec_ops(kv: Rc<KvShard>, ops: Vec<Op>) -> Vec<OpOut> {
    let locs = ops.iter().map(|op| kv.geo.locate(op.key())).collect();
    let (out, values) = exec_owned(kv, ops, locs).await;
    out.into_iter()
        .map(|out| match out {
            OpOut::Local(range) => OpOut::Value(Some(values[range].to_vec())),
            out => out,
        })
        .collect()
}

/// Runs operations (their keys at `locs`) in order on this shard, their owner: the results,
/// and the buffer their GET values ([`OpOut::Local`]) are in.
async fn exec_owned(kv: Rc<KvShard>, mut ops: Vec<Op>, locs: Vec<Loc>) -> (Vec<OpOut>, Vec<u8>) {
    let (mut out, mut values) = (Vec::with_capacity(ops.len()), Vec::new());
    exec_local(&kv, &mut ops, &locs, &mut out, &mut values).await;
    (out, values)
}

/// Runs one operation on its key's owner (with its log commit under `--fsync always`).
pub async fn run_one(kv: &Rc<KvShard>, op: Op) -> OpOut {
    let owner = kv.owner_of_key(op.key());
    let outs = if owner == kv.shard.id() {
        exec_ops(Rc::clone(kv), vec![op]).await
    } else {
        match kv
            .shard
            .run_on(owner, move |_| async move { exec_ops(KvShard::current(), vec![op]).await })
            .await
        {
            Ok(outs) => outs,
            Err(e) => return OpOut::Err(format!("ERR shard unavailable: {e}")),
        }
    };
    outs.into_iter().next().unwrap_or(OpOut::Err("ERR internal: no result".into()))
}

/// Runs the operations of a batch that this shard owns (for a connection of its own, or as one
/// message from another shard's), draining `ops` into `out` in order; `locs` are their keys'
/// places. GET values go to `values` (for a local group, the connection's buffer, reused from
/// batch to batch): a GET of an inline value whose blocks are cached allocates nothing.
async fn exec_local(
    kv: &Rc<KvShard>,
    ops: &mut Vec<Op>,
    locs: &[Loc],
    out: &mut Vec<OpOut>,
    values: &mut Vec<u8>,
) {
    // Empty (no allocation) unless the batch writes.
    let mut wrote = Vec::new();
    ops.reverse();
    let first = out.len();
    loop {
        let done = out.len() - first;
        warm_ahead(kv, locs, done);
        let Some(op) = ops.pop() else { break };
        if op.writes() {
            wrote.push(out.len());
        }
        let result = match run_now(kv, &op, &locs[done], values) {
            Some(result) => result,
            None => run_op(kv, op, &locs[done], values).await,
        };
        out.push(result);
    }
    commit_writes(kv, out, &wrote).await;
}

/// The operations of a batch that another shard owns: their places in the batch, and their
/// keys' places (computed when the batch was routed).
struct RemoteGroup {
    owner: usize,
    idx: Vec<usize>,
    ops: Vec<Op>,
    locs: Vec<Loc>,
}

/// How to render a reply from operation results.
#[derive(Debug)]
enum Item {
    Raw(Vec<u8>),
    SetReply(usize),
    Count(Range<usize>),
    AllOk(Range<usize>),
    /// The result as it is (bulk, nil, integer, status or error).
    Reply(usize),
}

/// Capacity of the local GET value buffer a connection keeps between batches at most.
const VALUES_KEEP: usize = 1 << 20;
/// Arguments of a command that are sliced on the stack rather than in a `Vec`.
const ARGV_INLINE: usize = 8;
/// Operations per batch before it runs (bounds the memory of gathered values).
const BATCH_OPS: usize = 256;
/// Reply bytes buffered before they are written out mid-batch.
const WRITE_HIGH: usize = 1 << 20;
/// Bytes read from the socket at a time (also the read buffer an idle connection keeps).
const READ_CHUNK: usize = 16 << 10;
/// Bytes read from the socket at a time at most, while a long request arrives.
const READ_LONG_MAX: usize = 1 << 20;
/// Times a read of a large value starts over when the value was replaced under it.
const LARGE_READ_ATTEMPTS_MAX: usize = 8;
/// Reply buffer capacity an idle connection keeps at most.
const WRITE_KEEP: usize = 64 << 10;

#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Close,
}

struct Conn {
    kv: Rc<KvShard>,
    stream: TcpStream,
    /// Bytes read from the socket: `rbuf[..rfill]` (the rest is room, zeroed once when the
    /// buffer grew, so that a read does not zero its room again every time).
    rbuf: Vec<u8>,
    rfill: usize,
    wbuf: Vec<u8>,
    ops: Vec<Op>,
    items: Vec<Item>,
    /// Buffers kept from batch to batch (cleared, capacity reused): a batch of local GETs
    /// allocates nothing once they have grown.
    args: Vec<Range<usize>>,
    results: Vec<Option<OpOut>>,
    local_idx: Vec<usize>,
    local_ops: Vec<Op>,
    /// The places of `local_ops`' keys, in order.
    local_locs: Vec<Loc>,
    local_out: Vec<OpOut>,
    /// Values of the local GETs of the current batch.
    values: Vec<u8>,
    /// CLIENT ID: unique in the process.
    id: u64,
    /// CLIENT SETNAME.
    name: Option<Vec<u8>>,
    /// The peer, for CLIENT INFO / LIST.
    peer: String,
    /// When the connection was accepted.
    since: std::time::Instant,
    /// A reply could not be completed (a large value's stream broke): the connection closes
    /// without answering more.
    broken: bool,
}

/// The last CLIENT ID given out (ids start at 1, as Redis's).
static CLIENT_IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Binds this shard's listener on `addr` (SO_REUSEPORT: every shard binds the same port) and
/// spawns its accept loop. Returns the bound address.
pub fn listen(kv: Rc<KvShard>, addr: &str) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).map_err(io::Error::from)?;
    let local = listener.local_addr().map_err(io::Error::from)?;
    // After the log replay, before the first client: the expiry sweep of this shard.
    kv.start_sweep();
    glommio::spawn_local(accept_loop(kv, listener)).detach();
    Ok(local)
}

async fn accept_loop(kv: Rc<KvShard>, listener: TcpListener) {
    loop {
        let stop = kv.stop.wait();
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            stop.await;
            None
        })
        .await;
        let stream = match accepted {
            None => break,
            Some(Ok(stream)) => stream,
            Some(Err(e)) => {
                eprintln!("corebuf-kv: shard {}: accept failed: {e}", kv.shard.id());
                // Out of descriptors, say: back off instead of spinning.
                glommio::timer::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let c = &kv.counters;
        if c.connections.get() >= kv.geo.max_clients_per_shard {
            c.rejected.set(c.rejected.get() + 1);
            let mut stream = stream;
            glommio::spawn_local(async move {
                let _ = stream.write_all(b"-ERR max number of clients reached\r\n").await;
            })
            .detach();
            continue;
        }
        c.connections.set(c.connections.get() + 1);
        c.connections_total.set(c.connections_total.get() + 1);
        let kv2 = Rc::clone(&kv);
        glommio::spawn_local(async move {
            let _ = stream.set_nodelay(true);
            let mut conn = Conn {
                kv: Rc::clone(&kv2),
                stream,
                rbuf: Vec::new(),
                rfill: 0,
                wbuf: Vec::new(),
                ops: Vec::new(),
                items: Vec::new(),
                args: Vec::new(),
                results: Vec::new(),
                local_idx: Vec::new(),
                local_ops: Vec::new(),
                local_locs: Vec::new(),
                local_out: Vec::new(),
                values: Vec::new(),
                id: CLIENT_IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1,
                name: None,
                peer: String::new(),
                since: std::time::Instant::now(),
                broken: false,
            };
            conn.peer = conn.stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            conn.serve().await;
            drop(conn);
            kv2.counters.connections.set(kv2.counters.connections.get() - 1);
            kv2.conns_closed.notify_all();
        })
        .detach();
    }
}

impl Conn {
    async fn serve(&mut self) {
        loop {
            let flow = self.process().await;
            if self.broken || self.flush().await.is_err() || flow == Flow::Close {
                return;
            }
            if self.kv.stop.is_set() {
                return;
            }
            // Read straight into the buffer's spare room: more at a time while a long request
            // (a large value) is arriving.
            let len = self.rfill;
            let want = len + READ_CHUNK.max(len.min(READ_LONG_MAX));
            if self.rbuf.len() < want {
                self.rbuf.resize(want, 0);
            }
            let kv = Rc::clone(&self.kv);
            let stream = &mut self.stream;
            let room = &mut self.rbuf[len..want];
            let read = futures_lite::future::or(async { Some(stream.read(room).await) }, async {
                kv.stop.wait().await;
                None
            })
            .await;
            match read {
                Some(Ok(n)) if n > 0 => self.rfill = len + n,
                // End of stream, an error, or the server stops: a half-read request costs
                // nothing more than its buffer, dropped here.
                _ => return,
            }
        }
    }

    /// Parses and executes every complete command in the read buffer.
    async fn process(&mut self) -> Flow {
        let mut rbuf = std::mem::take(&mut self.rbuf);
        let fill = self.rfill;
        let mut args = std::mem::take(&mut self.args);
        let mut pos = 0;
        let mut flow = Flow::Continue;
        while pos < fill {
            match resp::parse_into(&rbuf[pos..fill], &mut args) {
                Parsed::Incomplete => break,
                Parsed::Error(msg) => {
                    let c = &self.kv.counters;
                    c.protocol_errors.set(c.protocol_errors.get() + 1);
                    self.push_raw(|out| resp::error(out, &format!("ERR Protocol error: {msg}")));
                    flow = Flow::Close;
                    break;
                }
                Parsed::Command { consumed, .. } => {
                    let base = pos;
                    pos += consumed;
                    if args.is_empty() {
                        continue;
                    }
                    let c = &self.kv.counters;
                    c.commands.set(c.commands.get() + 1);
                    // Short commands (GET, SET) take their argument slices on the stack.
                    let mut small: [&[u8]; ARGV_INLINE] = [&[]; ARGV_INLINE];
                    let large: Vec<&[u8]>;
                    let slice = |r: &Range<usize>| &rbuf[base + r.start..base + r.end];
                    let argv: &[&[u8]] = if args.len() <= ARGV_INLINE {
                        for (slot, r) in small.iter_mut().zip(&args) {
                            *slot = slice(r);
                        }
                        &small[..args.len()]
                    } else {
                        large = args.iter().map(slice).collect();
                        &large
                    };
                    if self.command(argv).await == Flow::Close || self.broken {
                        flow = Flow::Close;
                        break;
                    }
                    if self.ops.len() >= BATCH_OPS {
                        self.run_batch().await;
                    }
                    if self.wbuf.len() >= WRITE_HIGH && self.flush().await.is_err() {
                        flow = Flow::Close;
                        break;
                    }
                }
            }
        }
        self.run_batch().await;
        self.args = args;
        let pos = pos.min(fill);
        rbuf.copy_within(pos..fill, 0);
        self.rfill = fill - pos;
        if rbuf.len() > 4 * READ_CHUNK && self.rfill < READ_CHUNK {
            // A long request has been served: do not keep its buffer for an idle connection.
            rbuf.truncate(2 * READ_CHUNK);
            rbuf.shrink_to_fit();
        }
        self.rbuf = rbuf;
        flow
    }

    /// Writes the buffered replies (under `--fsync always` their writes were committed to the
    /// log by their owners before the results came back).
    async fn flush(&mut self) -> Result<(), ()> {
        if self.broken {
            self.wbuf.clear();
            return Err(());
        }
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let result = self.stream.write_all(&self.wbuf).await;
        self.wbuf.clear();
        if self.wbuf.capacity() > WRITE_KEEP {
            self.wbuf.shrink_to(WRITE_KEEP);
        }
        result.map_err(|_| ())
    }

    fn push_raw(&mut self, render: impl FnOnce(&mut Vec<u8>)) {
        if self.items.is_empty() {
            render(&mut self.wbuf);
        } else {
            let mut bytes = Vec::new();
            render(&mut bytes);
            self.items.push(Item::Raw(bytes));
        }
    }

    fn push_op(&mut self, op: Op) -> usize {
        self.ops.push(op);
        self.ops.len() - 1
    }

    /// Runs the pending operations (grouped by owner, groups concurrently) and renders every
    /// pending reply in order. The local group runs in place on buffers the connection keeps
    /// (no allocation per batch); each remote group is one message.
    async fn run_batch(&mut self) {
        let mut results = std::mem::take(&mut self.results);
        results.clear();
        self.values.clear();
        if !self.ops.is_empty() {
            results.resize_with(self.ops.len(), || None);
            let kv = Rc::clone(&self.kv);
            let me = kv.shard.id();
            let mut remote_groups: Vec<RemoteGroup> = Vec::new();
            self.local_locs.clear();
            for (i, op) in self.ops.drain(..).enumerate() {
                let loc = kv.geo.locate(op.key());
                let owner = kv.owner_of_loc(&loc);
                if owner == me {
                    self.local_idx.push(i);
                    self.local_ops.push(op);
                    self.local_locs.push(loc);
                    continue;
                }
                match remote_groups.iter_mut().find(|g| g.owner == owner) {
                    Some(group) => {
                        group.idx.push(i);
                        group.ops.push(op);
                        group.locs.push(loc);
                    }
                    None => remote_groups.push(RemoteGroup {
                        owner,
                        idx: vec![i],
                        ops: vec![op],
                        locs: vec![loc],
                    }),
                }
            }
            let mut remote = Vec::new();
            for RemoteGroup { owner, idx, ops, locs } in remote_groups {
                kv.counters.remote_batches.set(kv.counters.remote_batches.get() + 1);
                let shard = Rc::clone(&kv.shard);
                let task = glommio::spawn_local(async move {
                    shard
                        .run_on(owner, move |_| async move {
                            // As the local group: GET values gathered in one buffer, so a
                            // remote GET allocates nothing of its own either.
                            exec_owned(KvShard::current(), ops, locs).await
                        })
                        .await
                });
                remote.push((idx, task));
            }
            if !self.local_ops.is_empty() {
                let locs = &self.local_locs;
                exec_local(&kv, &mut self.local_ops, locs, &mut self.local_out, &mut self.values)
                    .await;
                for (i, out) in self.local_idx.drain(..).zip(self.local_out.drain(..)) {
                    results[i] = Some(out);
                }
            }
            for (idx, task) in remote {
                match task.await {
                    Ok((outs, values)) => {
                        // Their values go after the local ones: rebase their ranges.
                        let base = self.values.len();
                        self.values.extend_from_slice(&values);
                        for (i, out) in idx.into_iter().zip(outs) {
                            results[i] = Some(match out {
                                OpOut::Local(r) => OpOut::Local(r.start + base..r.end + base),
                                out => out,
                            });
                        }
                    }
                    Err(e) => {
                        for i in idx {
                            results[i] = Some(OpOut::Err(format!("ERR shard unavailable: {e}")));
                        }
                    }
                }
            }
        }
        let mut items = std::mem::take(&mut self.items);
        for item in items.drain(..) {
            // Chunks that results of this reply free go after it is answered (and after any
            // large value before it has been streamed).
            let mut frees = Vec::new();
            let idx = match &item {
                Item::SetReply(i) | Item::Reply(i) => *i..*i + 1,
                Item::Count(range) | Item::AllOk(range) => range.clone(),
                Item::Raw(_) => 0..0,
            };
            for i in idx {
                if let Some(r) = results.get_mut(i) {
                    if let Some(OpOut::Freed(..)) = r {
                        let (out, orphan) = r.take().expect("just matched").split();
                        *r = Some(out);
                        frees.extend(orphan);
                    }
                }
            }
            let large = if self.broken { None } else { self.render(item, &results) };
            if let Some(large) = large {
                if self.stream_large(*large).await.is_err() {
                    // The connection is closed (or a chunk vanished mid-reply): the rest of
                    // this batch is not answered; the frees still run.
                    self.broken = true;
                }
            }
            for orphan in frees {
                large::free_chunks(&self.kv, orphan).await;
            }
        }
        self.items = items;
        results.clear();
        self.results = results;
        if self.values.capacity() > VALUES_KEEP {
            self.values = Vec::new(); // a batch of large values: do not keep 16 MiB per idle connection
        }
    }

    /// Renders one reply into the write buffer; a large value is returned to be streamed.
    fn render(&mut self, item: Item, results: &[Option<OpOut>]) -> Option<Box<LargeRef>> {
        let out = &mut self.wbuf;
        let values = &self.values;
        let get = |i: usize| results[i].as_ref().unwrap_or(&OpOut::Done(false));
        match item {
            Item::Raw(bytes) => out.extend_from_slice(&bytes),
            Item::SetReply(i) => match get(i) {
                OpOut::Done(true) => resp::simple(out, "OK"),
                OpOut::Done(false) => resp::null(out),
                OpOut::Err(e) => resp::error(out, e),
                _ => resp::error(out, "ERR internal: unexpected result"),
            },
            Item::Reply(i) => match get(i) {
                OpOut::Local(range) => resp::bulk(out, &values[range.clone()]),
                OpOut::Value(Some(v)) => resp::bulk(out, v),
                OpOut::Value(None) => resp::null(out),
                OpOut::Large(large) => return Some(large.clone()),
                OpOut::Done(b) => resp::integer(out, *b as i64),
                OpOut::Int(n) => resp::integer(out, *n),
                OpOut::Status(s) => resp::simple(out, s),
                OpOut::Err(e) => resp::error(out, e),
                OpOut::Entry(_) | OpOut::Freed(..) | OpOut::Grow => {
                    resp::error(out, "ERR internal: unexpected result")
                }
            },
            Item::Count(range) | Item::AllOk(range)
                if range.clone().any(|i| matches!(get(i), OpOut::Err(_))) =>
            {
                let Some(OpOut::Err(e)) = range.map(get).find(|o| matches!(o, OpOut::Err(_)))
                else {
                    unreachable!("an error was found just above")
                };
                resp::error(out, e);
            }
            Item::Count(range) => {
                let n = range.map(get).filter(|o| matches!(o, OpOut::Done(true))).count();
                resp::integer(out, n as i64);
            }
            Item::AllOk(_) => resp::simple(out, "OK"),
        }
        None
    }

    /// Streams a large value (or a range of one) as one bulk reply: the replies queued before
    /// it are written first, then its chunks window by window ([`large::WINDOW_BYTES_MAX`] in
    /// memory). Its chunks are pinned meanwhile, so a concurrent overwrite or DEL frees them
    /// only afterwards. A value replaced before the pin is read again; a chunk found missing
    /// before the reply starts gives an error naming the key. `Err`: the reply broke off (the
    /// connection closes).
    async fn stream_large(&mut self, mut large: LargeRef) -> Result<(), ()> {
        for _ in 0..LARGE_READ_ATTEMPTS_MAX {
            if large.len == 0 {
                resp::bulk(&mut self.wbuf, b"");
                return Ok(());
            }
            let m = large.manifest;
            let cs = m.chunk_bytes as u64;
            let chunks = (large.start / cs) as u32..((large.start + large.len - 1) / cs) as u32 + 1;
            let pin = match large::PinGuard::pin(&self.kv, &m).await {
                Ok(pin) => pin,
                Err(e) => {
                    resp::error(&mut self.wbuf, &e.to_string());
                    return Ok(());
                }
            };
            let missing = match &pin {
                None => Ok(Some(chunks.start)), // being freed: the value was replaced
                Some(_) => large::missing_chunk(&self.kv, &m, chunks.clone()).await,
            };
            match missing {
                Ok(None) => {}
                Ok(Some(index)) => {
                    if let Some(pin) = pin {
                        pin.release().await;
                    }
                    if !large.reread {
                        resp::error(&mut self.wbuf, &large::missing_error(&large.key, &m, index));
                        return Ok(());
                    }
                    match self.reread(&large).await {
                        Some(newer) if newer.manifest != m => large = newer,
                        Some(_) => {
                            resp::error(
                                &mut self.wbuf,
                                &large::missing_error(&large.key, &m, index),
                            );
                            return Ok(());
                        }
                        None => return Ok(()), // answered from the newer value
                    }
                    continue;
                }
                Err(e) => {
                    resp::error(&mut self.wbuf, &e.to_string());
                    return Ok(());
                }
            }
            let pin = pin.expect("pinned when no chunk is missing");
            let streamed = self.stream_chunks(&large, chunks).await;
            pin.release().await;
            return streamed;
        }
        let key = shown_key(&large.key).into_owned();
        resp::error(
            &mut self.wbuf,
            &format!("ERR the value of key '{key}' kept changing; try again"),
        );
        Ok(())
    }

    /// Writes `large`'s bulk reply from its (pinned) chunks `chunks`.
    async fn stream_chunks(
        &mut self,
        large: &LargeRef,
        chunks: std::ops::Range<u32>,
    ) -> Result<(), ()> {
        let m = &large.manifest;
        let cs = m.chunk_bytes as u64;
        let end = large.start + large.len;
        self.flush().await?;
        let header = format!("${}\r\n", large.len);
        self.stream.write_all(header.as_bytes()).await.map_err(|_| ())?;
        let window = large::window_chunks(m);
        let mut at = chunks.start;
        while at < chunks.end {
            let n = window.min(chunks.end - at);
            let got = large::read_window(&self.kv, m, at, n).await;
            let window = match got {
                Ok(w) => w,
                Err(e) => {
                    // Pinned chunks do not vanish: damage, or a failing device. The reply has
                    // begun, so only closing the connection keeps the client from wrong data.
                    eprintln!(
                        "corebuf-kv: shard {}: large value of key {:?} broke off mid-reply: \
                         {e:?}; closing the connection",
                        self.kv.shard.id(),
                        String::from_utf8_lossy(&large.key)
                    );
                    self.broken = true;
                    return Err(());
                }
            };
            for (j, chunk) in window.iter().enumerate() {
                let base = (at as u64 + j as u64) * cs;
                let a = large.start.max(base) - base;
                let b = end.min(base + chunk.len() as u64) - base;
                let part = &chunk[a as usize..b as usize];
                self.stream.write_all(part).await.map_err(|_| ())?;
            }
            at += n;
        }
        self.stream.write_all(b"\r\n").await.map_err(|_| ())
    }

    /// Reads the key of `large` again (its chunks were freed: another writer replaced it).
    /// Returns the newer large value, or `None` once the reply is rendered from a value that
    /// is not large (or an error).
    async fn reread(&mut self, large: &LargeRef) -> Option<LargeRef> {
        let op = match large.range {
            None => Op::Get(Key::new(&large.key)),
            Some((start, end)) => Op::Read(large.key.clone(), Read::GetRange(start, end)),
        };
        match run_one(&self.kv, op).await.split().0 {
            OpOut::Large(newer) => return Some(*newer),
            OpOut::Value(Some(v)) => resp::bulk(&mut self.wbuf, &v),
            OpOut::Value(None) => resp::null(&mut self.wbuf),
            OpOut::Err(e) => resp::error(&mut self.wbuf, &e),
            _ => resp::error(&mut self.wbuf, "ERR internal: unexpected result"),
        }
        None
    }

    /// A SET-family command with a value longer than one record, or APPEND / SETRANGE with an
    /// argument longer than one record; `None` if this is not one (the ordinary path runs).
    /// The values' chunks are written from the read buffer (never copied whole), then the
    /// command runs as usual with their manifests in the batch.
    async fn large_write(&mut self, name: &[u8], args: &[&[u8]]) -> Option<Flow> {
        let positions: Vec<usize> = match (name, args.len()) {
            (b"set", n) if n >= 2 => vec![1],
            (b"setnx" | b"getset", 2) | (b"append", 2) => vec![1],
            (b"setex" | b"psetex" | b"setrange", 3) => vec![2],
            (b"mset", n) if n >= 2 && n % 2 == 0 => (1..n).step_by(2).collect(),
            _ => return None,
        };
        let big: Vec<usize> =
            positions.into_iter().filter(|&i| args[i].len() > MAX_VALUE).collect();
        if big.is_empty() {
            return None;
        }
        if let Some(e) = args
            .iter()
            .step_by(if name == b"mset" { 2 } else { args.len() })
            .find_map(|k| check_key(k).err())
        {
            self.push_raw(|out| resp::error(out, &e));
            return Some(Flow::Continue);
        }
        if name == b"append" || name == b"setrange" {
            return Some(self.large_edit(name, args).await);
        }
        // Parse with empty stand-ins for the large values (the options are checked before any
        // chunk is written), then put the manifests in their place.
        let mut stand_in: Vec<&[u8]> = args.to_vec();
        for &i in &big {
            stand_in[i] = b"";
        }
        let parsed: Result<(Vec<Op>, Item), String> = match name {
            b"setnx" => {
                Ok((vec![Op::Set(args[0].to_vec(), Vec::new(), Cond::Nx, 0)], Item::Count(0..1)))
            }
            b"mset" => {
                let ops = stand_in
                    .chunks(2)
                    .map(|p| Op::Set(p[0].to_vec(), p[1].to_vec(), Cond::Always, 0))
                    .collect::<Vec<_>>();
                let n = ops.len();
                Ok((ops, Item::AllOk(0..n)))
            }
            _ => match cmds::parse(name, &stand_in, store::now_ms()) {
                Some(Ok((op, Shape::SetReply))) => Ok((vec![op], Item::SetReply(0))),
                Some(Ok((op, Shape::Reply))) => Ok((vec![op], Item::Reply(0))),
                Some(Err(e)) => Err(e),
                None => Err("ERR internal: not a SET command".into()),
            },
        };
        let (mut ops, item) = match parsed {
            Ok(parsed) => parsed,
            Err(e) => {
                self.push_raw(|out| resp::error(out, &e));
                return Some(Flow::Continue);
            }
        };
        let mut manifests = Vec::with_capacity(big.len());
        for &i in &big {
            match large::write_value(&self.kv, args[i]).await {
                Ok(m) => manifests.push((i, m)),
                Err(e) => {
                    for (_, m) in &manifests {
                        large::discard(&self.kv, m).await;
                    }
                    self.push_raw(|out| resp::error(out, &e.to_string()));
                    return Some(Flow::Continue);
                }
            }
        }
        for (i, m) in manifests {
            // The op of value argument `i`: MSET's pair i / 2, else the only one.
            let at = if name == b"mset" { i / 2 } else { 0 };
            ops[at] = match std::mem::replace(&mut ops[at], Op::Exists(Vec::new())) {
                Op::Set(k, _, cond, expires) => Op::SetManifest(k, m, cond, expires, true),
                Op::Update(k, u) => match *u {
                    Update::Set { cond, ttl, get, .. } => {
                        Op::Update(k, Box::new(Update::SetLarge { manifest: m, cond, ttl, get }))
                    }
                    u => Op::Update(k, Box::new(u)),
                },
                other => other,
            };
        }
        let base = self.ops.len();
        for op in ops {
            self.push_op(op);
        }
        self.items.push(match item {
            Item::Count(r) | Item::AllOk(r) if name == b"setnx" => {
                Item::Count(r.start + base..r.end + base)
            }
            Item::AllOk(r) => Item::AllOk(r.start + base..r.end + base),
            Item::SetReply(i) => Item::SetReply(i + base),
            Item::Reply(i) => Item::Reply(i + base),
            other => other,
        });
        Some(Flow::Continue)
    }

    /// APPEND / SETRANGE with an argument longer than one record: after the pending batch,
    /// the large-value edit from the read buffer.
    async fn large_edit(&mut self, name: &[u8], args: &[&[u8]]) -> Flow {
        let edit = if name == b"append" {
            large::Edit::Append(args[1])
        } else {
            let offset = match cmds::parse_int(args[1]) {
                Some(o) if o < 0 => Err("ERR offset is out of range".to_string()),
                Some(o) => {
                    match check_value_len((o as usize).saturating_add(args[2].len()), Growth::Grow)
                    {
                        Ok(()) => Ok(o as u64),
                        Err(e) => Err(e),
                    }
                }
                None => Err(cmds::NOT_INTEGER.to_string()),
            };
            match offset {
                Ok(o) => large::Edit::SetRange(o, args[2]),
                Err(e) => {
                    self.push_raw(|out| resp::error(out, &e));
                    return Flow::Continue;
                }
            }
        };
        self.run_batch().await;
        let (mut out, orphan) = large::edit(&self.kv, args[0], edit).await.split();
        if self.kv.geo.fsync == Fsync::Always && matches!(out, OpOut::Int(_)) {
            // The new manifest was logged on the key's owner, outside any batch: its commit,
            // as every other write's, comes before the answer.
            let owner = self.kv.owner_of_key(args[0]);
            let commit =
                large::on_shard(&self.kv, owner, |kv| async move { Ok(kv.log_commit().await) })
                    .await;
            match commit {
                Ok(Ok(())) => {}
                Ok(Err(e)) => out = OpOut::Err(format!("ERR {e}")),
                Err(e) => out = OpOut::Err(e.to_string()),
            }
        }
        match out {
            OpOut::Int(n) => resp::integer(&mut self.wbuf, n),
            OpOut::Err(e) => resp::error(&mut self.wbuf, &e),
            _ => resp::error(&mut self.wbuf, "ERR internal: unexpected result"),
        }
        if let Some(orphan) = orphan {
            large::free_chunks(&self.kv, orphan).await;
        }
        Flow::Continue
    }

    /// CLIENT subcommands: the ones clients send on connect, and a minimal INFO / LIST.
    fn client_command(&mut self, args: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        let sub = args[0].to_ascii_lowercase();
        let arity = |out: &mut Vec<u8>, sub: &[u8]| {
            let sub = String::from_utf8_lossy(sub);
            resp::error(out, &format!("ERR wrong number of arguments for 'client|{sub}' command"));
        };
        match (sub.as_slice(), args.len()) {
            (b"setname", 2) => {
                if args[1].iter().any(|&b| !(b'!'..=b'~').contains(&b)) {
                    resp::error(
                        &mut out,
                        "ERR Client names cannot contain spaces, newlines or special characters.",
                    );
                } else {
                    self.name = (!args[1].is_empty()).then(|| args[1].to_vec());
                    resp::simple(&mut out, "OK");
                }
            }
            (b"getname", 1) => match &self.name {
                Some(n) => resp::bulk(&mut out, n),
                None => resp::null(&mut out),
            },
            (b"id", 1) => resp::integer(&mut out, self.id as i64),
            (b"info", 1) => resp::bulk(&mut out, self.client_line().as_bytes()),
            // Only this connection's line: connections live on every shard.
            (b"list", _) => resp::bulk(&mut out, self.client_line().as_bytes()),
            (b"setinfo", 3) | (b"no-evict", 2) | (b"no-touch", 2) => resp::simple(&mut out, "OK"),
            (b"reply", 2) if args[1].eq_ignore_ascii_case(b"on") => resp::simple(&mut out, "OK"),
            (
                b"setname" | b"getname" | b"id" | b"info" | b"setinfo" | b"no-evict" | b"no-touch",
                _,
            ) => arity(&mut out, &sub),
            _ => resp::error(
                &mut out,
                &format!(
                    "ERR unknown subcommand '{}'. Try CLIENT HELP.",
                    String::from_utf8_lossy(args[0])
                ),
            ),
        }
        out
    }

    /// This connection as a CLIENT INFO line.
    fn client_line(&self) -> String {
        let name = self.name.as_deref().map(String::from_utf8_lossy).unwrap_or_default();
        format!(
            "id={} addr={} laddr= fd=0 name={name} age={} idle=0 flags=N db=0 sub=0 psub=0 \
             ssub=0 multi=-1 qbuf=0 qbuf-free=0 argv-mem=0 multi-mem=0 obl=0 oll=0 omem=0 \
             tot-mem=0 events=r cmd=client|info user=default redir=-1 resp=2 shard={}\n",
            self.id,
            self.peer,
            self.since.elapsed().as_secs(),
            self.kv.shard.id()
        )
    }

    /// HELLO [protover [AUTH user pass] [SETNAME name]]: RESP2 only; the server map as an
    /// array of pairs, as Redis answers in RESP2.
    fn hello(&mut self, args: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some(v) = args.first() {
            match cmds::parse_int(v) {
                Some(2) => {}
                Some(3) => {
                    resp::error(&mut out, "NOPROTO unsupported protocol version");
                    return out;
                }
                _ => {
                    resp::error(&mut out, "ERR Protocol version is not an integer or out of range");
                    return out;
                }
            }
        }
        let mut i = 1;
        let mut name = None;
        while i < args.len() {
            match args[i].to_ascii_lowercase().as_slice() {
                // No users or passwords: the default user takes any password, as a Redis
                // without requirepass does.
                b"auth" if i + 2 < args.len() => i += 3,
                b"setname" if i + 1 < args.len() => {
                    name = Some(args[i + 1].to_vec());
                    i += 2;
                }
                _ => {
                    let opt = String::from_utf8_lossy(args[i]);
                    resp::error(&mut out, &format!("ERR Syntax error in HELLO option '{opt}'"));
                    return out;
                }
            }
        }
        if let Some(n) = name {
            self.name = (!n.is_empty()).then_some(n);
        }
        resp::array(&mut out, 14);
        for (k, v) in [("server", "redis"), ("version", "7.0.0")] {
            resp::bulk(&mut out, k.as_bytes());
            resp::bulk(&mut out, v.as_bytes());
        }
        resp::bulk(&mut out, b"proto");
        resp::integer(&mut out, 2);
        resp::bulk(&mut out, b"id");
        resp::integer(&mut out, self.id as i64);
        for (k, v) in [("mode", crate::cluster::mode_name()), ("role", "master")] {
            resp::bulk(&mut out, k.as_bytes());
            resp::bulk(&mut out, v.as_bytes());
        }
        resp::bulk(&mut out, b"modules");
        resp::array(&mut out, 0);
        out
    }

    /// Handles one command.
    async fn command(&mut self, argv: &[&[u8]]) -> Flow {
        let mut name_buf = [0u8; 16];
        let raw = argv[0];
        let name: &[u8] = if raw.len() <= name_buf.len() {
            name_buf[..raw.len()].copy_from_slice(raw);
            name_buf[..raw.len()].make_ascii_lowercase();
            &name_buf[..raw.len()]
        } else {
            b"?"
        };
        let args = &argv[1..];
        // Cluster mode: a key of another node's slot is redirected, keys of several slots are
        // refused (before the command runs, as Redis does; large values included, before any
        // of their chunks is written here).
        if let Some(e) = crate::cluster::redirect(argv) {
            self.push_raw(|out| resp::error(out, &e));
            return Flow::Continue;
        }
        if let Some(flow) = self.large_write(name, args).await {
            return flow;
        }
        let arity_error_named = |this: &mut Self, n: &str| {
            this.push_raw(|out| {
                resp::error(out, &format!("ERR wrong number of arguments for '{n}' command"))
            });
            Flow::Continue
        };
        let arity_error = |this: &mut Self| {
            let n = String::from_utf8_lossy(name).into_owned();
            arity_error_named(this, &n)
        };
        match name {
            b"get" => {
                if args.len() != 1 {
                    return arity_error(self);
                }
                if let Err(e) = check_key(args[0]) {
                    self.push_raw(|out| resp::error(out, &e));
                    return Flow::Continue;
                }
                let i = self.push_op(Op::Get(Key::new(args[0])));
                self.items.push(Item::Reply(i));
            }
            b"setnx" => {
                if args.len() != 2 {
                    return arity_error(self);
                }
                let checked =
                    check_key(args[0]).and_then(|()| check_value_len(args[1].len(), Growth::Set));
                if let Err(e) = checked {
                    self.push_raw(|out| resp::error(out, &e));
                    return Flow::Continue;
                }
                let i = self.push_op(Op::Set(args[0].to_vec(), args[1].to_vec(), Cond::Nx, 0));
                self.items.push(Item::Count(i..i + 1));
            }
            b"del" | b"unlink" | b"exists" => {
                if args.is_empty() {
                    return arity_error(self);
                }
                if let Some(e) = args.iter().find_map(|k| check_key(k).err()) {
                    self.push_raw(|out| resp::error(out, &e));
                    return Flow::Continue;
                }
                let start = self.ops.len();
                for k in args {
                    let op = if name == b"exists" {
                        Op::Exists(k.to_vec())
                    } else {
                        Op::Del(k.to_vec())
                    };
                    self.push_op(op);
                }
                self.items.push(Item::Count(start..self.ops.len()));
            }
            b"mget" => {
                if args.is_empty() {
                    return arity_error(self);
                }
                if let Some(e) = args.iter().find_map(|k| check_key(k).err()) {
                    self.push_raw(|out| resp::error(out, &e));
                    return Flow::Continue;
                }
                self.push_raw(|out| resp::array(out, args.len()));
                for k in args {
                    if self.ops.len() >= BATCH_OPS {
                        // Large MGETs stream out in pieces: values never pile up unbounded.
                        self.run_batch().await;
                        if self.wbuf.len() >= WRITE_HIGH && self.flush().await.is_err() {
                            return Flow::Close;
                        }
                    }
                    let i = self.push_op(Op::Get(Key::new(k)));
                    self.items.push(Item::Reply(i));
                }
            }
            b"mset" => {
                if args.is_empty() || !args.len().is_multiple_of(2) {
                    return arity_error(self);
                }
                let bad = args.chunks(2).find_map(|kv| {
                    check_key(kv[0]).and_then(|()| check_value_len(kv[1].len(), Growth::Set)).err()
                });
                if let Some(e) = bad {
                    self.push_raw(|out| resp::error(out, &e));
                    return Flow::Continue;
                }
                let start = self.ops.len();
                for kv in args.chunks(2) {
                    self.push_op(Op::Set(kv[0].to_vec(), kv[1].to_vec(), Cond::Always, 0));
                }
                self.items.push(Item::AllOk(start..self.ops.len()));
            }
            b"ping" => match args {
                [] => self.push_raw(|out| resp::simple(out, "PONG")),
                [msg] => self.push_raw(|out| resp::bulk(out, msg)),
                _ => return arity_error(self),
            },
            b"echo" => match args {
                [msg] => self.push_raw(|out| resp::bulk(out, msg)),
                _ => return arity_error(self),
            },
            b"quit" => {
                self.push_raw(|out| resp::simple(out, "OK"));
                return Flow::Close;
            }
            b"select" => match args {
                [b"0"] => self.push_raw(|out| resp::simple(out, "OK")),
                [_] => self.push_raw(|out| resp::error(out, "ERR DB index is out of range")),
                _ => return arity_error(self),
            },
            b"command" => self.push_raw(|out| crate::cmdtable::reply(out, args)),
            b"cluster" | b"readonly" | b"readwrite" | b"asking" => {
                self.run_batch().await;
                let reply = crate::cluster::command(&self.kv, name, args).await;
                self.wbuf.extend_from_slice(&reply);
            }
            b"config" => {
                let sub = args.first().map(|s| s.to_ascii_lowercase());
                match sub.as_deref() {
                    Some(b"get") if args.len() >= 2 => {
                        let reply = keyspace::config_get(&self.kv.geo, &args[1..]);
                        self.push_raw(|out| out.extend_from_slice(&reply));
                    }
                    Some(b"get") => return arity_error_named(self, "config|get"),
                    Some(b"set") | Some(b"resetstat") | Some(b"rewrite") => self.push_raw(|out| {
                        resp::error(out, "ERR CONFIG SET is not supported by corebuf-kv")
                    }),
                    _ => self.push_raw(|out| resp::error(out, "ERR unknown CONFIG subcommand")),
                }
            }
            b"client" => {
                if args.is_empty() {
                    return arity_error(self);
                }
                let reply = self.client_command(args);
                self.push_raw(|out| out.extend_from_slice(&reply));
            }
            b"hello" => {
                let reply = self.hello(args);
                self.push_raw(|out| out.extend_from_slice(&reply));
            }
            b"time" => {
                if !args.is_empty() {
                    return arity_error(self);
                }
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                self.push_raw(|out| {
                    resp::array(out, 2);
                    resp::bulk(out, now.as_secs().to_string().as_bytes());
                    resp::bulk(out, now.subsec_micros().to_string().as_bytes());
                });
            }
            b"msetnx" | b"rename" | b"renamenx" | b"keys" | b"scan" | b"randomkey"
            | b"flushall" | b"flushdb" | b"save" => {
                // Commands that visit several shards one step after another: the pending
                // batch goes first, so replies stay in order.
                if !keyspace::arity_ok(name, args.len()) {
                    return arity_error(self);
                }
                self.run_batch().await;
                let reply = keyspace::run(&self.kv, name, args).await;
                self.push_raw(|out| out.extend_from_slice(&reply));
            }
            b"dbsize" => {
                if !args.is_empty() {
                    return arity_error(self);
                }
                self.run_batch().await;
                let reply = match dbsize(&self.kv).await {
                    Ok(n) => {
                        let mut b = Vec::new();
                        resp::integer(&mut b, n as i64);
                        b
                    }
                    Err(e) => {
                        let mut b = Vec::new();
                        resp::error(&mut b, &e);
                        b
                    }
                };
                self.wbuf.extend_from_slice(&reply);
            }
            b"info" => {
                self.run_batch().await;
                let section = args.first().map(|s| String::from_utf8_lossy(s).to_ascii_lowercase());
                let text = info(&self.kv, section.as_deref()).await;
                resp::bulk(&mut self.wbuf, text.as_bytes());
            }
            b"shutdown" => {
                self.run_batch().await;
                // Acknowledged writes of this connection are flushed before the server stops.
                let _ = self.flush().await;
                let _ = self.kv.stop_tx.send("SHUTDOWN command".into());
                return Flow::Close;
            }
            _ => {
                if let Some(parsed) = cmds::parse(name, args, store::now_ms()) {
                    match parsed {
                        Ok((op, shape)) => {
                            let i = self.push_op(op);
                            self.items.push(match shape {
                                Shape::SetReply => Item::SetReply(i),
                                Shape::Reply => Item::Reply(i),
                            });
                        }
                        Err(e) => self.push_raw(|out| resp::error(out, &e)),
                    }
                    return Flow::Continue;
                }
                let message = unknown_command(raw, args);
                self.push_raw(|out| resp::error(out, &message));
            }
        }
        Flow::Continue
    }
}

/// Redis 7's reply to an unknown command: the name and the first arguments (up to about 128
/// bytes), each quoted and followed by a space.
fn unknown_command(raw: &[u8], args: &[&[u8]]) -> String {
    let name = String::from_utf8_lossy(&raw[..raw.len().min(128)]).into_owned();
    let mut shown = String::new();
    for a in args {
        if shown.len() >= 128 {
            break;
        }
        let room = 128 - shown.len();
        shown.push_str(&format!("'{}' ", String::from_utf8_lossy(&a[..a.len().min(room)])));
    }
    format!("ERR unknown command '{name}', with args beginning with: {shown}")
}

/// Refuses a key longer than [`MAX_KEY`].
pub fn check_key(key: &[u8]) -> Result<(), String> {
    if key.len() > MAX_KEY {
        return Err(format!("ERR key too long ({} bytes; the limit is {MAX_KEY})", key.len()));
    }
    Ok(())
}

/// How a value reaches its length (the error wording differs, as Redis's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Growth {
    /// A value given whole (SET, MSET, GETSET, ...).
    Set,
    /// A value that grows in place (APPEND, SETRANGE): Redis's proto-max-bulk-len wording.
    Grow,
}

/// The one place that enforces the value size limit ([`PROTO_MAX_BULK`], Redis's
/// `proto-max-bulk-len`; a value longer than one record, [`MAX_VALUE`], is a large value).
pub fn check_value_len(len: usize, growth: Growth) -> Result<(), String> {
    if len <= PROTO_MAX_BULK {
        return Ok(());
    }
    Err(match growth {
        Growth::Set => format!("ERR value too large ({len} bytes; the limit is {PROTO_MAX_BULK})"),
        Growth::Grow => "ERR string exceeds maximum allowed size (proto-max-bulk-len)".into(),
    })
}

/// Runs `f` on every shard concurrently (locally for this one) and collects the results.
pub async fn on_every_shard<T, F, Fut>(kv: &Rc<KvShard>, f: F) -> Vec<Result<T, String>>
where
    T: Send + 'static,
    F: Fn(Rc<KvShard>) -> Fut + Send + Clone + 'static,
    Fut: std::future::Future<Output = T> + 'static,
{
    let me = kv.shard.id();
    let mut tasks = Vec::new();
    for s in 0..kv.shard.shard_count() {
        if s == me {
            continue;
        }
        let (shard, f) = (Rc::clone(&kv.shard), f.clone());
        tasks.push((
            s,
            glommio::spawn_local(async move {
                shard.run_on(s, move |_| async move { f(KvShard::current()).await }).await
            }),
        ));
    }
    let mut out: Vec<Option<Result<T, String>>> =
        (0..kv.shard.shard_count()).map(|_| None).collect();
    out[me] = Some(Ok(f(Rc::clone(kv)).await));
    for (s, task) in tasks {
        out[s] = Some(task.await.map_err(|e| e.to_string()));
    }
    out.into_iter().map(|o| o.expect("every shard answered")).collect()
}

async fn dbsize(kv: &Rc<KvShard>) -> Result<u64, String> {
    let parts =
        on_every_shard(kv, |kv| async move { kv.count_keys().await.map_err(|e| e.to_string()) })
            .await;
    let mut total = 0;
    for part in parts {
        total += part??;
    }
    Ok(total)
}

async fn info(kv: &Rc<KvShard>, section: Option<&str>) -> String {
    let parts: Vec<InfoPart> = on_every_shard(kv, |kv| async move { kv.info() })
        .await
        .into_iter()
        .filter_map(Result::ok)
        .collect();
    let sum = |f: fn(&InfoPart) -> u64| parts.iter().map(f).sum::<u64>();
    let geo = &kv.geo;
    let want = |name: &str| {
        matches!(section, None | Some("all") | Some("everything") | Some("default"))
            || section == Some(name)
    };
    let mut s = String::new();
    use std::fmt::Write as _;
    if want("server") {
        let _ = write!(
            s,
            "# Server\r\nredis_version:7.0.0\r\ncorebuf_kv_version:{}\r\nredis_mode:{}\r\n\
             process_id:{}\r\nuptime_in_seconds:{}\r\nshards:{}\r\nexecutor:glommio thread-per-core\r\n\r\n",
            env!("CARGO_PKG_VERSION"),
            crate::cluster::mode_name(),
            std::process::id(),
            geo.started.elapsed().as_secs(),
            parts.len()
        );
    }
    if want("clients") {
        let _ = write!(
            s,
            "# Clients\r\nconnected_clients:{}\r\nrejected_connections:{}\r\n\r\n",
            sum(|p| p.connections),
            sum(|p| p.rejected)
        );
    }
    if want("persistence") {
        let barriers = sum(|p| p.barriers);
        let mean = sum(|p| p.barrier_mean_us * p.barriers).checked_div(barriers).unwrap_or(0);
        let _ = write!(
            s,
            "# Persistence\r\naof_enabled:1\r\nappendfsync:{}\r\nbarriers:{}\r\nbarrier_mean_us:{}\r\n\
             commit_waits:{}\r\nlog_appends:{}\r\nlog_commits:{}\r\nlog_checkpoints:{}\r\n\
             log_used_bytes:{}\r\nlog_commit_mean_us:{}\r\nlog_flush_mean_us:{}\r\n\
             deferred_jobs_pending:{}\r\ndeferred_jobs_run:{}\r\nepoch:{}\r\n\r\n",
            geo.fsync,
            barriers,
            mean,
            sum(|p| p.commit_waiters),
            sum(|p| p.log_appends),
            sum(|p| p.log_commits),
            sum(|p| p.log_checkpoints),
            sum(|p| p.log_used_bytes),
            sum(|p| p.log_commit_us.0) / sum(|p| p.log_commits).max(1),
            sum(|p| p.log_commit_us.1) / sum(|p| p.log_commits).max(1),
            sum(|p| p.jobs.0),
            sum(|p| p.jobs.1),
            geo.epoch
        );
    }
    if want("stats") {
        let _ = write!(
            s,
            "# Stats\r\ntotal_connections_received:{}\r\ntotal_commands_processed:{}\r\n\
             keyspace_hits:{}\r\nkeyspace_misses:{}\r\nkey_operations:{}\r\nremote_batches:{}\r\n\
             protocol_errors:{}\r\nout_of_space_errors:{}\r\nexpired_keys:{}\r\n\
             expire_sweep_buckets:{}\r\nchunks_written:{}\r\nchunks_read:{}\r\n\
             chunks_deleted:{}\r\nlarge_values_pinned:{}\r\n\r\n",
            sum(|p| p.connections_total),
            sum(|p| p.commands),
            sum(|p| p.hits),
            sum(|p| p.misses),
            sum(|p| p.ops),
            sum(|p| p.remote_batches),
            sum(|p| p.protocol_errors),
            sum(|p| p.out_of_space),
            sum(|p| p.expired_keys),
            sum(|p| p.sweep_buckets),
            sum(|p| p.chunks.0),
            sum(|p| p.chunks.1),
            sum(|p| p.chunks.2),
            sum(|p| p.large_pins),
        );
    }
    if want("storage") {
        let _ = write!(
            s,
            "# Storage\r\ndata_file:{}\r\nblock_size:{}\r\nrange_blocks:{}\r\nbuckets_per_range:{}\r\n\
             ranges:{}\r\nmax_value_bytes:{}\r\nrecord_value_bytes_max:{}\r\nchunk_bytes:{}\r\n\
             ranges_loaded_trusted:{}\r\nranges_loaded_fresh:{}\r\n\
             ranges_rebuilt:{}\r\nrecords_repaired:{}\r\nfree_blocks_in_loaded_ranges:{}\r\n\r\n",
            geo.path,
            crate::format::BLOCK_SIZE,
            crate::format::RANGE_BLOCKS,
            crate::format::BUCKETS_PER_RANGE,
            geo.ranges,
            PROTO_MAX_BULK,
            MAX_VALUE,
            geo.chunk_bytes,
            sum(|p| p.ranges_loaded.0),
            sum(|p| p.ranges_loaded.1),
            sum(|p| p.ranges_loaded.2),
            sum(|p| p.records_repaired),
            sum(|p| p.free_blocks_loaded),
        );
    }
    if want("cluster") {
        s.push_str(&crate::cluster::info_section());
    }
    if want("cache") || want("corebuf") {
        let (hits, misses) = (sum(|p| p.cache_hits), sum(|p| p.cache_misses));
        let ratio = if hits + misses == 0 { 0.0 } else { hits as f64 / (hits + misses) as f64 };
        let _ = write!(
            s,
            "# Cache\r\ncache_frames:{}\r\ncache_hits:{hits}\r\ncache_misses:{misses}\r\n\
             cache_hit_ratio:{ratio:.4}\r\ncache_zero_fills:{}\r\ncache_evictions:{}\r\n\
             cache_writebacks:{}\r\ncache_dirty:{}\r\ndevice_reads:{}\r\ndevice_writes:{}\r\ndevice_flushes:{}\r\n\
             device_bytes_read:{}\r\ndevice_bytes_written:{}\r\nmessages_sent:{}\r\n\
             messages_received:{}\r\n",
            sum(|p| p.frames),
            sum(|p| p.zero_fills),
            sum(|p| p.evictions),
            sum(|p| p.writebacks),
            sum(|p| p.dirty),
            sum(|p| p.device_reads),
            sum(|p| p.device_writes),
            sum(|p| p.device_flushes),
            sum(|p| p.bytes_read),
            sum(|p| p.bytes_written),
            sum(|p| p.messages_sent),
            sum(|p| p.messages_received),
        );
        for p in &parts {
            let _ = write!(
                s,
                "shard{}:cache_hits={},cache_misses={},evictions={},frames={},key_ops={},\
                 commands={},connections={},barriers={},read_p99_us={}\r\n",
                p.shard,
                p.cache_hits,
                p.cache_misses,
                p.evictions,
                p.frames,
                p.ops,
                p.commands,
                p.connections,
                p.barriers,
                p.read_p99_us
            );
        }
        s.push_str("\r\n");
    }
    s
}
