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
use crate::format::{MAX_KEY, MAX_VALUE};
use crate::keyspace;
use crate::resp::{self, Parsed};
use crate::store::{self, Cond, Fsync, InfoPart, KvShard};

/// Operations that run on a key's owner shard (everything in them is `Send`).
#[derive(Debug)]
pub enum Op {
    /// GET / MGET element.
    Get(Key),
    /// SET / MSET pair, with its condition and expiry (unix ms, 0 = none).
    Set(Vec<u8>, Vec<u8>, Cond, u64),
    /// DEL of one key.
    Del(Vec<u8>),
    /// EXISTS of one key.
    Exists(Vec<u8>),
    /// A read of one key (TTL, TYPE, STRLEN, GETRANGE, ...).
    Read(Vec<u8>, Read),
    /// A read-modify-write of one key, atomic under its bucket lock (INCR, APPEND, EXPIRE,
    /// SET ... GET, ...).
    Update(Vec<u8>, Update),
}

impl Op {
    /// The key the operation is for (its owner shard runs it).
    pub fn key(&self) -> &[u8] {
        match self {
            Op::Get(k) => k.as_bytes(),
            Op::Set(k, ..) | Op::Del(k) | Op::Exists(k) | Op::Read(k, _) | Op::Update(k, _) => k,
        }
    }

    /// Whether it may change the key (its answer then waits for the log under `--fsync
    /// always`).
    fn writes(&self) -> bool {
        matches!(self, Op::Set(..) | Op::Del(..) | Op::Update(..))
    }
}

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
}

/// Runs one operation on its owner (this shard). Returns its result and whether it wrote.
async fn run_op(kv: &KvShard, op: Op) -> OpOut {
    let result = match op {
        Op::Get(k) => kv.get(k.as_bytes()).await.map(OpOut::Value),
        Op::Set(k, v, c, e) => kv.set(&k, &v, e, c).await.map(OpOut::Done),
        Op::Del(k) => kv.del(&k).await.map(OpOut::Done),
        Op::Exists(k) => kv.exists(&k).await.map(OpOut::Done),
        Op::Read(k, r) => {
            kv.get_entry(&k).await.map(|e| cmds::read(r, e.as_ref(), store::now_ms()))
        }
        Op::Update(k, u) => kv.update(&k, |live, now| cmds::apply(&u, live, now)).await,
    };
    result.unwrap_or_else(|e| OpOut::Err(e.to_string()))
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

/// Runs operations in order on this shard (their owner).
pub async fn exec_ops(kv: Rc<KvShard>, ops: Vec<Op>) -> Vec<OpOut> {
    let mut out = Vec::with_capacity(ops.len());
    let mut wrote = Vec::new();
    for op in ops {
        if op.writes() {
            wrote.push(out.len());
        }
        out.push(run_op(&kv, op).await);
    }
    commit_writes(&kv, &mut out, &wrote).await;
    out
}

/// Runs this shard's own operations of a batch (it owns their keys), draining `ops` into `out`
/// in order. GET values go to `values` (the connection's buffer, reused from batch to batch):
/// a GET of an inline value whose blocks are cached allocates nothing.
async fn exec_local(kv: &KvShard, ops: &mut Vec<Op>, out: &mut Vec<OpOut>, values: &mut Vec<u8>) {
    // Empty (no allocation) unless the batch writes.
    let mut wrote = Vec::new();
    for op in ops.drain(..) {
        if op.writes() {
            wrote.push(out.len());
        }
        let result = match op {
            Op::Get(k) => {
                let start = values.len();
                kv.get_into(k.as_bytes(), values)
                    .await
                    .map(|found| match found {
                        true => OpOut::Local(start..values.len()),
                        false => OpOut::Value(None),
                    })
                    .unwrap_or_else(|e| OpOut::Err(e.to_string()))
            }
            op => run_op(kv, op).await,
        };
        out.push(result);
    }
    commit_writes(kv, out, &wrote).await;
}

/// How to render a reply from operation results.
#[derive(Debug)]
enum Item {
    Raw(Vec<u8>),
    Bulk(usize),
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
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    ops: Vec<Op>,
    items: Vec<Item>,
    /// Buffers kept from batch to batch (cleared, capacity reused): a batch of local GETs
    /// allocates nothing once they have grown.
    args: Vec<Range<usize>>,
    results: Vec<Option<OpOut>>,
    local_idx: Vec<usize>,
    local_ops: Vec<Op>,
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
                wbuf: Vec::new(),
                ops: Vec::new(),
                items: Vec::new(),
                args: Vec::new(),
                results: Vec::new(),
                local_idx: Vec::new(),
                local_ops: Vec::new(),
                local_out: Vec::new(),
                values: Vec::new(),
                id: CLIENT_IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1,
                name: None,
                peer: String::new(),
                since: std::time::Instant::now(),
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
            if self.flush().await.is_err() || flow == Flow::Close {
                return;
            }
            if self.kv.stop.is_set() {
                return;
            }
            // Read straight into the buffer's spare room.
            let len = self.rbuf.len();
            self.rbuf.resize(len + READ_CHUNK, 0);
            let kv = Rc::clone(&self.kv);
            let stream = &mut self.stream;
            let room = &mut self.rbuf[len..];
            let read = futures_lite::future::or(async { Some(stream.read(room).await) }, async {
                kv.stop.wait().await;
                None
            })
            .await;
            match read {
                Some(Ok(n)) if n > 0 => self.rbuf.truncate(len + n),
                // End of stream, an error, or the server stops: a half-read request costs
                // nothing more than its buffer, dropped here.
                _ => return,
            }
        }
    }

    /// Parses and executes every complete command in the read buffer.
    async fn process(&mut self) -> Flow {
        let rbuf = std::mem::take(&mut self.rbuf);
        let mut args = std::mem::take(&mut self.args);
        let mut pos = 0;
        let mut flow = Flow::Continue;
        while pos < rbuf.len() {
            match resp::parse_into(&rbuf[pos..], &mut args) {
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
                    if self.command(argv).await == Flow::Close {
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
        self.rbuf = rbuf;
        self.rbuf.drain(..pos.min(self.rbuf.len()));
        if self.rbuf.capacity() > 4 * READ_CHUNK && self.rbuf.len() < READ_CHUNK {
            self.rbuf.shrink_to(2 * READ_CHUNK);
        }
        flow
    }

    /// Writes the buffered replies (under `--fsync always` their writes were committed to the
    /// log by their owners before the results came back).
    async fn flush(&mut self) -> Result<(), ()> {
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
            let mut remote_groups: Vec<(usize, Vec<usize>, Vec<Op>)> = Vec::new();
            for (i, op) in self.ops.drain(..).enumerate() {
                let owner = kv.owner_of_key(op.key());
                if owner == me {
                    self.local_idx.push(i);
                    self.local_ops.push(op);
                    continue;
                }
                match remote_groups.iter_mut().find(|g| g.0 == owner) {
                    Some(group) => {
                        group.1.push(i);
                        group.2.push(op);
                    }
                    None => remote_groups.push((owner, vec![i], vec![op])),
                }
            }
            let mut remote = Vec::new();
            for (owner, idx, ops) in remote_groups {
                kv.counters.remote_batches.set(kv.counters.remote_batches.get() + 1);
                let shard = Rc::clone(&kv.shard);
                let task = glommio::spawn_local(async move {
                    shard
                        .run_on(
                            owner,
                            move |_| async move { exec_ops(KvShard::current(), ops).await },
                        )
                        .await
                });
                remote.push((idx, task));
            }
            if !self.local_ops.is_empty() {
                exec_local(&kv, &mut self.local_ops, &mut self.local_out, &mut self.values).await;
                for (i, out) in self.local_idx.drain(..).zip(self.local_out.drain(..)) {
                    results[i] = Some(out);
                }
            }
            for (idx, task) in remote {
                match task.await {
                    Ok(outs) => {
                        for (i, out) in idx.into_iter().zip(outs) {
                            results[i] = Some(out);
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
        let out = &mut self.wbuf;
        let values = &self.values;
        let get = |i: usize| results[i].as_ref().unwrap_or(&OpOut::Done(false));
        for item in self.items.drain(..) {
            match item {
                Item::Raw(bytes) => out.extend_from_slice(&bytes),
                Item::Bulk(i) => match get(i) {
                    OpOut::Local(range) => resp::bulk(out, &values[range.clone()]),
                    OpOut::Value(Some(v)) => resp::bulk(out, v),
                    OpOut::Value(None) => resp::null(out),
                    OpOut::Err(e) => resp::error(out, e),
                    _ => resp::error(out, "ERR internal: unexpected result"),
                },
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
                    OpOut::Done(b) => resp::integer(out, *b as i64),
                    OpOut::Int(n) => resp::integer(out, *n),
                    OpOut::Status(s) => resp::simple(out, s),
                    OpOut::Err(e) => resp::error(out, e),
                    OpOut::Entry(_) => resp::error(out, "ERR internal: unexpected result"),
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
        }
        results.clear();
        self.results = results;
        if self.values.capacity() > VALUES_KEEP {
            self.values = Vec::new(); // a batch of large values: do not keep 16 MiB per idle connection
        }
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
        for (k, v) in [("mode", "standalone"), ("role", "master")] {
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
                self.items.push(Item::Bulk(i));
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
                    self.items.push(Item::Bulk(i));
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
            b"command" => self.push_raw(|out| resp::array(out, 0)),
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

/// The one place that enforces the value size limit ([`MAX_VALUE`]).
pub fn check_value_len(len: usize, growth: Growth) -> Result<(), String> {
    if len <= MAX_VALUE {
        return Ok(());
    }
    Err(match growth {
        Growth::Set => {
            format!("ERR value too large ({len} bytes; the limit is {MAX_VALUE} bytes)")
        }
        Growth::Grow => format!(
            "ERR string exceeds maximum allowed size (proto-max-bulk-len): corebuf-kv values \
             are limited to {MAX_VALUE} bytes"
        ),
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
            "# Server\r\nredis_version:7.0.0\r\ncorebuf_kv_version:{}\r\nredis_mode:standalone\r\n\
             process_id:{}\r\nuptime_in_seconds:{}\r\nshards:{}\r\nexecutor:glommio thread-per-core\r\n\r\n",
            env!("CARGO_PKG_VERSION"),
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
             expire_sweep_buckets:{}\r\n\r\n",
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
        );
    }
    if want("storage") {
        let _ = write!(
            s,
            "# Storage\r\ndata_file:{}\r\nblock_size:{}\r\nrange_blocks:{}\r\nbuckets_per_range:{}\r\n\
             ranges:{}\r\nmax_value_bytes:{}\r\nranges_loaded_trusted:{}\r\nranges_loaded_fresh:{}\r\n\
             ranges_rebuilt:{}\r\nrecords_repaired:{}\r\nfree_blocks_in_loaded_ranges:{}\r\n\r\n",
            geo.path,
            crate::format::BLOCK_SIZE,
            crate::format::RANGE_BLOCKS,
            crate::format::BUCKETS_PER_RANGE,
            geo.ranges,
            MAX_VALUE,
            sum(|p| p.ranges_loaded.0),
            sum(|p| p.ranges_loaded.1),
            sum(|p| p.ranges_loaded.2),
            sum(|p| p.records_repaired),
            sum(|p| p.free_blocks_loaded),
        );
    }
    if want("cache") || want("corebuf") {
        let (hits, misses) = (sum(|p| p.cache_hits), sum(|p| p.cache_misses));
        let ratio = if hits + misses == 0 { 0.0 } else { hits as f64 / (hits + misses) as f64 };
        let _ = write!(
            s,
            "# Cache\r\ncache_frames:{}\r\ncache_hits:{hits}\r\ncache_misses:{misses}\r\n\
             cache_hit_ratio:{ratio:.4}\r\ncache_evictions:{}\r\ncache_writebacks:{}\r\n\
             cache_dirty:{}\r\ndevice_reads:{}\r\ndevice_writes:{}\r\ndevice_flushes:{}\r\n\
             device_bytes_read:{}\r\ndevice_bytes_written:{}\r\nmessages_sent:{}\r\n\
             messages_received:{}\r\n",
            sum(|p| p.frames),
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
