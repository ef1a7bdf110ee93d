//! The transmission phase of one connection.
//!
//! A reader task parses requests and starts each one as its own task (or answers a cache hit
//! of one block on this shard inline); requests run concurrently and their replies are
//! appended to an outbox in completion order. A writer task sends the outbox in batches:
//! whatever completed while the previous write was in flight goes out in one `send`.
//!
//! Memory is bounded per connection: a request is admitted only while fewer than
//! [`REQUESTS_IN_FLIGHT_MAX`] requests and [`PAYLOAD_BYTES_IN_FLIGHT_MAX`] payload bytes
//! (write data held, read data being gathered or queued) are in flight, counted from
//! admission until the reply has been written to the socket. The reader stops reading while
//! the budget is spent, which pushes back on the client through the socket.

use std::cell::{Cell, RefCell};
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;

use corebuf::Error;
use corebuf_shard::WaitList;
use futures_lite::io::{BufReader, WriteHalf};
use futures_lite::{AsyncReadExt, AsyncWriteExt};

use crate::blocks;
use crate::proto::*;
use crate::server::{NbdShard, Socket};

/// Requests one connection may have admitted and not yet answered.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 256;
/// Payload bytes one connection may hold in flight (at least one largest request fits).
pub const PAYLOAD_BYTES_IN_FLIGHT_MAX: usize = 2 * PAYLOAD_BYTES_MAX as usize;
/// The socket read buffer: a burst of small requests is parsed from one `recv`.
const READ_BUFFER_BYTES: usize = 128 << 10;
/// Outbox size at which the reader yields so that the writer sends what is ready.
const OUTBOX_YIELD_BYTES: usize = 256 << 10;
/// Outbox capacity kept between batches.
const OUTBOX_KEEP_BYTES: usize = 1 << 20;

/// Why a connection ended (an empty string for an orderly end).
type End = String;

struct Conn {
    nbd: Rc<NbdShard>,
    fd: RawFd,
    /// Replies ready to send, in completion order.
    outbox: RefCell<Vec<u8>>,
    /// Requests and payload bytes whose replies are in `outbox`.
    outbox_budget: Cell<(usize, usize)>,
    requests_in_flight: Cell<usize>,
    bytes_in_flight: Cell<usize>,
    /// Request tasks running.
    handlers: Cell<usize>,
    /// No more replies will be queued: the writer ends once the outbox is sent.
    closed: Cell<bool>,
    /// A socket write failed: replies are dropped and the reader stops.
    broken: Cell<bool>,
    changed: WaitList,
}

impl Conn {
    /// Queues a simple reply (with `data` only on success) for a request that held `bytes`
    /// of the budget.
    fn reply(&self, cookie: u64, error: u32, data: &[u8], bytes: usize) {
        if self.broken.get() {
            self.release(1, bytes);
            return;
        }
        let mut out = self.outbox.borrow_mut();
        put_simple_reply(&mut out, error, cookie);
        if error == 0 {
            out.extend_from_slice(data);
        }
        drop(out);
        let (requests, held) = self.outbox_budget.get();
        self.outbox_budget.set((requests + 1, held + bytes));
        self.changed.notify_all();
    }

    fn release(&self, requests: usize, bytes: usize) {
        self.requests_in_flight.set(self.requests_in_flight.get() - requests);
        self.bytes_in_flight.set(self.bytes_in_flight.get() - bytes);
        self.changed.notify_all();
    }

    /// Waits for room for a request holding `bytes`; false if the connection broke.
    async fn admit(&self, bytes: usize) -> bool {
        let fits = || {
            let (requests, held) = (self.requests_in_flight.get(), self.bytes_in_flight.get());
            requests == 0
                || (requests < REQUESTS_IN_FLIGHT_MAX
                    && held + bytes <= PAYLOAD_BYTES_IN_FLIGHT_MAX)
        };
        self.changed.wait_for(|| (fits() || self.broken.get()).then_some(())).await;
        if self.broken.get() {
            return false;
        }
        self.requests_in_flight.set(self.requests_in_flight.get() + 1);
        self.bytes_in_flight.set(self.bytes_in_flight.get() + bytes);
        true
    }
}

/// Serves requests on `stream` until the client disconnects, breaks the protocol, or the
/// server stops; answers everything admitted before returning. Returns why it ended.
pub async fn transmit<S: Socket>(nbd: Rc<NbdShard>, stream: S) -> End {
    let fd = stream.as_raw_fd();
    let (reader, writer) = futures_lite::io::split(stream);
    let conn = Rc::new(Conn {
        nbd,
        fd,
        outbox: RefCell::new(Vec::with_capacity(64 << 10)),
        outbox_budget: Cell::new((0, 0)),
        requests_in_flight: Cell::new(0),
        bytes_in_flight: Cell::new(0),
        handlers: Cell::new(0),
        closed: Cell::new(false),
        broken: Cell::new(false),
        changed: WaitList::default(),
    });
    let writer = glommio::spawn_local(write_loop(Rc::clone(&conn), writer)).detach();
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, reader);
    let end = read_loop(&conn, &mut reader).await;
    conn.changed.wait_for(|| (conn.handlers.get() == 0).then_some(())).await;
    conn.closed.set(true);
    conn.changed.notify_all();
    writer.await;
    end
}

async fn write_loop<S: Socket>(conn: Rc<Conn>, mut writer: WriteHalf<S>) {
    let mut batch = Vec::with_capacity(64 << 10);
    loop {
        let ready = || (!conn.outbox.borrow().is_empty() || conn.closed.get()).then_some(());
        conn.changed.wait_for(ready).await;
        if conn.outbox.borrow().is_empty() {
            break; // closed, and everything is sent
        }
        std::mem::swap(&mut batch, &mut *conn.outbox.borrow_mut());
        let (requests, bytes) = conn.outbox_budget.replace((0, 0));
        let written = writer.write_all(&batch).await;
        batch.clear();
        if batch.capacity() > OUTBOX_KEEP_BYTES {
            batch.shrink_to(OUTBOX_KEEP_BYTES);
        }
        conn.release(requests, bytes);
        if written.is_err() {
            conn.broken.set(true);
            let (requests, bytes) = conn.outbox_budget.replace((0, 0));
            conn.outbox.borrow_mut().clear();
            conn.release(requests, bytes);
            // Wake the reader if it waits on the socket: nobody reads the replies any more.
            // SAFETY: shutdown(2) on this connection's socket, which is open until both
            // halves drop (after this task ends).
            unsafe { libc::shutdown(conn.fd, libc::SHUT_RD) };
            return;
        }
    }
    let _ = writer.close().await;
}

async fn read_loop<R>(conn: &Rc<Conn>, reader: &mut R) -> End
where
    R: futures_lite::AsyncRead + Unpin,
{
    let export = &conn.nbd.export;
    loop {
        let mut header = [0u8; REQUEST_BYTES];
        if reader.read_exact(&mut header).await.is_err() {
            return String::new(); // end of stream (or stop), between or inside a header
        }
        let Some(request) = Request::decode(&header) else {
            return "bad request magic".into();
        };
        match request.kind {
            CMD_DISC => return String::new(),
            CMD_WRITE if request.length > PAYLOAD_BYTES_MAX => {
                return format!("write of {} bytes is over the 32 MiB limit", request.length);
            }
            _ => {}
        }
        let carries_data = matches!(request.kind, CMD_READ | CMD_WRITE);
        let bytes = if carries_data && request.length <= PAYLOAD_BYTES_MAX {
            request.length as usize
        } else {
            0
        };
        if !conn.admit(bytes).await {
            return "the client stopped reading replies".into();
        }
        let mut payload = Vec::new();
        if request.kind == CMD_WRITE {
            payload.resize(request.length as usize, 0);
            if reader.read_exact(&mut payload).await.is_err() {
                conn.release(1, bytes);
                return "connection closed inside a write payload".into();
            }
        }
        if let Some(error) = check(export, &request) {
            conn.reply(request.cookie, error, &[], bytes);
        } else if !answer_inline(conn, &request, &payload, bytes) {
            conn.handlers.set(conn.handlers.get() + 1);
            let conn = Rc::clone(conn);
            glommio::spawn_local(async move {
                let (error, data) = execute(&conn.nbd, &request, payload).await;
                conn.reply(request.cookie, error, &data, bytes);
                conn.handlers.set(conn.handlers.get() - 1);
                conn.changed.notify_all();
            })
            .detach();
        }
        if conn.outbox.borrow().len() >= OUTBOX_YIELD_BYTES {
            futures_lite::future::yield_now().await;
        }
    }
}

/// The spec's error for a request that cannot be served as sent, if any.
fn check(export: &crate::export::Export, request: &Request) -> Option<u32> {
    let known = matches!(
        request.kind,
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE | CMD_WRITE_ZEROES
    );
    if !known || request.flags & !export.allowed_flags(request.kind) != 0 {
        return Some(EINVAL);
    }
    let writes = matches!(request.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && export.read_only {
        return Some(EPERM);
    }
    if request.kind == CMD_FLUSH {
        return None;
    }
    if request.kind == CMD_READ && request.length > PAYLOAD_BYTES_MAX {
        return Some(EINVAL);
    }
    let end = request.offset.checked_add(u64::from(request.length));
    if end.is_none_or(|end| end > export.size_bytes) {
        let grows = matches!(request.kind, CMD_WRITE | CMD_WRITE_ZEROES);
        return Some(if grows { ENOSPC } else { EINVAL });
    }
    None
}

/// Answers a read, or a write without FUA, of part of one block this shard owns and has
/// cached, without a task: nothing here awaits. Returns false to take the general path.
fn answer_inline(conn: &Conn, request: &Request, payload: &[u8], bytes: usize) -> bool {
    let write = match request.kind {
        CMD_READ => false,
        CMD_WRITE if request.flags & CMD_FLAG_FUA == 0 => true,
        _ => return false,
    };
    let shard = &conn.nbd.shard;
    let block_size = shard.block_size() as u64;
    let block = request.offset / block_size;
    let start = (request.offset % block_size) as usize;
    let end = start + request.length as usize;
    if request.length == 0 || end as u64 > block_size || !shard.owns(block) {
        return false;
    }
    let Some(session) = shard.partition().try_session() else { return false };
    let Some(buf) = session.get(block) else { return false };
    if write {
        let Ok(mut data) = buf.try_data_mut() else { return false };
        data[start..end].copy_from_slice(payload);
        drop(data);
        buf.mark_dirty_range(start..end);
        conn.reply(request.cookie, 0, &[], bytes);
        conn.nbd.export.writes_replied.fetch_add(1, Ordering::SeqCst);
        conn.nbd.note_dirtied(1);
    } else {
        let Ok(data) = buf.try_data() else { return false };
        conn.reply(request.cookie, 0, &data[start..end], bytes);
    }
    true
}

/// Runs one checked request; returns the reply's error and, for a read, its data.
async fn execute(nbd: &NbdShard, request: &Request, payload: Vec<u8>) -> (u32, Vec<u8>) {
    let shard = &nbd.shard;
    let (offset, length) = (request.offset, request.length as usize);
    let fua = request.flags & CMD_FLAG_FUA != 0;
    let result = match request.kind {
        CMD_READ => {
            let mut data = vec![0u8; length];
            return match blocks::read(shard, offset, &mut data).await {
                Ok(()) => (0, data),
                Err(e) => (errno(&e), Vec::new()),
            };
        }
        CMD_WRITE => blocks::write(shard, offset, payload).await,
        CMD_FLUSH => Ok(()),
        CMD_TRIM => in_chunks(offset, length, |at, n| blocks::trim(shard, at, n)).await,
        CMD_WRITE_ZEROES => {
            in_chunks(offset, length, |at, n| blocks::write_zeroes(shard, at, n)).await
        }
        CMD_CACHE => {
            let block_size = shard.block_size() as u64;
            let first = offset / block_size;
            let end = (offset + length as u64).div_ceil(block_size);
            if end > first {
                shard.prefetch(first, end - first)
            } else {
                Ok(())
            }
        }
        _ => unreachable!("check() refused unknown commands"),
    };
    if matches!(request.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) {
        // Counted once the blocks are dirty and before the reply (or a FUA flush, which must
        // cover this write too) can happen: see the rules of `Flusher`.
        nbd.export.writes_replied.fetch_add(1, Ordering::SeqCst);
    }
    // A flush, and FUA on anything that wrote, is the engine's global barrier.
    let result = match result {
        Ok(()) if request.kind == CMD_FLUSH || fua => {
            nbd.flusher.flush(shard, &nbd.export.writes_replied).await
        }
        other => other,
    };
    match result {
        Ok(()) => (0, Vec::new()),
        Err(e) => (errno(&e), Vec::new()),
    }
}

/// Runs `op` over `offset..offset + length` in pieces of at most the payload limit, so a
/// trim or write-zeroes of a whole disk holds bounded memory.
async fn in_chunks<'a, F, Fut>(offset: u64, length: usize, mut op: F) -> corebuf::Result<()>
where
    F: FnMut(u64, usize) -> Fut + 'a,
    Fut: std::future::Future<Output = corebuf::Result<()>> + 'a,
{
    let mut at = 0;
    while at < length {
        let n = (length - at).min(PAYLOAD_BYTES_MAX as usize);
        op(offset + at as u64, n).await?;
        at += n;
    }
    Ok(())
}

/// The NBD error value for an engine error.
fn errno(e: &Error) -> u32 {
    match e {
        Error::BlockOutOfRange { .. } => EINVAL,
        Error::ShutDown | Error::ShardFailed { .. } => ESHUTDOWN,
        _ => EIO,
    }
}
