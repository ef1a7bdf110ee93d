//! The cache partition: dm-bufio's operations over one shard's [`IoQueue`].

use std::cell::{Cell, RefCell, RefMut};
use std::ops::Range;
use std::rc::Rc;

use super::arena::{Arena, FrameMut, FrameRef};
use super::config::{CacheConfig, Sizing};
use super::stats::CacheStats;
use super::table::{flag, FrameMeta, Lookup, Table, SEQ_NONE};
use crate::error::{Error, Result};
use crate::io::{Device, IoQueue};
use crate::wait::{FifoGate, WaitList};

/// A hook called with a buffer's block number, bytes and aux data.
pub type Hook<A> = Box<dyn Fn(u64, &mut [u8], &mut A)>;

/// A hook that checks a block's bytes as they arrive from the device; an error fails the read.
pub type ReadHook = Box<dyn Fn(u64, &[u8]) -> Result<()>>;

/// The caller's hooks, as dm-bufio's `alloc_callback` and `write_callback`.
pub struct Hooks<A> {
    /// Called when a buffer is (re)initialised for a block: after its read completes, or when
    /// `new` hands out a zeroed buffer. The aux data was just reset to `A::default()`.
    pub on_alloc: Option<Hook<A>>,
    /// Called just before each write of a buffer is submitted, with the bytes that will be
    /// written (a checksum written here goes to disk and stays in the cache).
    pub on_write: Option<Hook<A>>,
    /// Called when a read from the device completes, before anyone sees the bytes (checksum
    /// verification, as dm-verity does): an error fails the read, the buffer is not cached,
    /// and a later read tries the device again. Cache hits do not call it.
    pub on_read: Option<ReadHook>,
}

impl<A> Default for Hooks<A> {
    fn default() -> Self {
        Hooks { on_alloc: None, on_write: None, on_read: None }
    }
}

impl<A> std::fmt::Debug for Hooks<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("on_alloc", &self.on_alloc.is_some())
            .field("on_write", &self.on_write.is_some())
            .field("on_read", &self.on_read.is_some())
            .finish()
    }
}

struct Inner<D: Device, A> {
    queue: Rc<IoQueue<D>>,
    block_size: usize,
    device_blocks: u64,
    arena: Arena,
    aux: Box<[RefCell<A>]>,
    table: RefCell<Table>,
    hooks: Hooks<A>,
    sizing: Sizing,
    pins_per_session_max: usize,
    sessions_active: Cell<usize>,
    alloc_line: FifoGate,
    background_writer_running: Cell<bool>,
    /// Bumped and notified whenever a frame's state changes in a way a waiter may care about:
    /// a read completes or fails, a pin drops to zero, a write ends, a data borrow ends.
    changes: Cell<u64>,
    changed: WaitList,
    session_slots: WaitList,
}

/// One core's block cache over an [`IoQueue`], with dm-bufio's contract.
///
/// Pinning goes through a [`Session`], the unit of the deadlock rule: a session holds at most
/// `pins_per_session_max` buffers, and the partition admits at most
/// `(frames − 1) / (pins_per_session_max − 1)` sessions at once, so whenever every session
/// waits for one more buffer, some frame is unpinned and can be reused.
///
/// `A` is the per-buffer aux data (dm-bufio's `aux_size` bytes), reset to `A::default()`
/// whenever a buffer is (re)initialised.
pub struct Partition<D: Device + 'static, A: 'static = ()> {
    inner: Rc<Inner<D, A>>,
}

impl<D: Device, A> std::fmt::Debug for Partition<D, A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partition")
            .field("block_size", &self.inner.block_size)
            .field("frames", &self.inner.sizing.frame_count)
            .finish()
    }
}

impl<D: Device, A> Clone for Partition<D, A> {
    fn clone(&self) -> Self {
        Partition { inner: Rc::clone(&self.inner) }
    }
}

impl<D: Device + 'static, A: Default + 'static> Partition<D, A> {
    /// Builds a partition over `queue`: allocates every frame and all metadata now.
    pub fn new(queue: Rc<IoQueue<D>>, config: CacheConfig, hooks: Hooks<A>) -> Result<Self> {
        let block_size = queue.config().block_size_bytes;
        if block_size > 1 << 16 {
            return Err(Error::config("block_size_bytes", "at most 64 KiB in a cache partition"));
        }
        let sizing = config.sizing(block_size)?;
        let frames = sizing.frame_count;
        let arena = Arena::new(frames, block_size).ok_or_else(|| {
            Error::config(
                "cache_size_bytes",
                format!("{} bytes of buffers cannot be allocated", config.cache_size_bytes),
            )
        })?;
        let table = Table::try_new(frames).ok_or_else(|| {
            Error::config(
                "cache_size_bytes",
                format!("metadata for {frames} frames cannot be allocated"),
            )
        })?;
        let inner = Inner {
            device_blocks: queue.device_blocks(),
            queue,
            block_size,
            arena,
            aux: (0..frames).map(|_| RefCell::new(A::default())).collect(),
            table: RefCell::new(table),
            hooks,
            sizing,
            pins_per_session_max: config.pins_per_session_max,
            sessions_active: Cell::new(0),
            alloc_line: FifoGate::default(),
            background_writer_running: Cell::new(false),
            changes: Cell::new(0),
            changed: WaitList::with_capacity(64),
            session_slots: WaitList::with_capacity(64),
        };
        Ok(Partition { inner: Rc::new(inner) })
    }
}

impl<D: Device + 'static, A: Default + 'static> Partition<D, A> {
    /// The block size in bytes.
    pub fn block_size(&self) -> usize {
        self.inner.block_size
    }

    /// The device's size in blocks.
    pub fn device_blocks(&self) -> u64 {
        self.inner.device_blocks
    }

    /// The number of frames (buffers) in the partition.
    pub fn frame_count(&self) -> usize {
        self.inner.sizing.frame_count
    }

    /// How many sessions the deadlock rule admits at once.
    pub fn sessions_max(&self) -> usize {
        self.inner.sizing.sessions_max
    }

    /// Bytes of metadata per buffer: the frame table, the dirty and write lists, the policy's
    /// lists, the block index, the data borrow flag and the aux cell. The ghost (block numbers
    /// of recently evicted blocks, policy history rather than per-buffer state) comes on top:
    /// see [`Partition::ghost_bytes_per_frame`] and docs/ARCHITECTURE.md.
    pub fn metadata_bytes_per_frame(&self) -> usize {
        Table::bytes_per_frame(self.frame_count())
            + 4 /* data borrow flag */
            + std::mem::size_of::<RefCell<A>>()
    }

    /// Bytes per buffer of the ghost: its ring of block numbers and its lookup table.
    pub fn ghost_bytes_per_frame(&self) -> usize {
        self.inner.table.borrow().policy.ghost_bytes() / self.frame_count()
    }

    /// The I/O queue under this partition.
    pub fn queue(&self) -> &Rc<IoQueue<D>> {
        &self.inner.queue
    }

    /// A snapshot of the statistics.
    pub fn stats(&self) -> CacheStats {
        let table = self.inner.table.borrow();
        let mut stats = table.stats.clone();
        stats.pinned = table.pinned_frames as u64;
        stats.dirty = table.dirty_list.len() as u64;
        stats.frames = self.inner.sizing.frame_count as u64;
        stats
    }

    /// Opens a session, waiting while the deadlock rule's bound of sessions is reached.
    pub async fn session(&self) -> Session<D, A> {
        let inner = &self.inner;
        let max = inner.sizing.sessions_max;
        if inner.sessions_active.get() >= max {
            inner.table.borrow_mut().stats.session_waits += 1;
            inner
                .session_slots
                .wait_for(|| (inner.sessions_active.get() < max).then_some(()))
                .await;
        }
        inner.sessions_active.set(inner.sessions_active.get() + 1);
        Session { inner: Rc::clone(inner), held: Cell::new(0) }
    }

    /// Opens a session if the bound allows one now.
    pub fn try_session(&self) -> Option<Session<D, A>> {
        let inner = &self.inner;
        if inner.sessions_active.get() >= inner.sizing.sessions_max {
            return None;
        }
        inner.sessions_active.set(inner.sessions_active.get() + 1);
        Some(Session { inner: Rc::clone(inner), held: Cell::new(0) })
    }

    /// Starts reads of the uncached blocks of `block..block + count` and returns at once.
    /// It never waits, never pins, never evicts pinned or dirty data, and skips blocks when
    /// no clean frame or request buffer is free. Returns how many reads it started.
    pub fn prefetch(&self, block: u64, count: u64) -> Result<u64> {
        self.inner.check_range(block, count)?;
        let mut started = 0;
        for b in block..block + count {
            let Some(frame) = self.inner.prefetch_one(b) else { continue };
            started += 1;
            let inner = Rc::clone(&self.inner);
            glommio::spawn_local(async move {
                let guard = ReadGuard { inner: &inner, frame, done: false };
                // A failed prefetch just leaves the block uncached; the next read retries.
                let _ = inner.fill_from_device(guard, b).await;
            })
            .detach();
        }
        Ok(started)
    }

    /// Starts writing every dirty buffer and returns at once (the writes are submitted by a
    /// background task, at most `writebacks_in_flight_max` at a time).
    pub fn write_dirty_async(&self) {
        let inner = Rc::clone(&self.inner);
        glommio::spawn_local(async move { inner.write_all_dirty(SEQ_NONE).await }).detach();
    }

    /// Writes every buffer dirtied before the call, waits for those writes, then flushes the
    /// device. Returns the first latched write error (which stays latched until a write of
    /// that block succeeds or the block is forgotten), else the flush's error.
    pub async fn write_dirty(&self) -> Result<()> {
        let write_error = self.write_back_dirty().await.err();
        let flushed = self.inner.queue.flush().await;
        match write_error {
            Some(e) => Err(e),
            None => flushed,
        }
    }

    /// The first half of [`Partition::write_dirty`]: writes every buffer dirtied before the
    /// call and waits for those writes, without flushing the device. Returns the first latched
    /// write error. The engine's global barrier runs this on every shard, then flushes once.
    pub async fn write_back_dirty(&self) -> Result<()> {
        let inner = &self.inner;
        let (barrier, failures_at_start) = {
            let table = inner.table.borrow();
            (table.dirty_seq, table.failures)
        };
        loop {
            inner.write_all_dirty_before(barrier, failures_at_start).await;
            if !inner.writes_pending_before(barrier, failures_at_start) {
                break;
            }
            inner.wait_change().await;
        }
        match inner.table.borrow().first_write_error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Flushes the device's write cache (no buffer is written).
    pub async fn issue_flush(&self) -> Result<()> {
        self.inner.queue.flush().await
    }

    /// Discards `count` blocks from `block` on the device and forgets their clean, idle cached
    /// copies. Dirty cached copies stay and are written later (their data wins).
    pub async fn issue_discard(&self, block: u64, count: u64) -> Result<()> {
        self.inner.check_range(block, count)?;
        self.forget_range(block, count);
        self.inner.queue.discard(block, count).await
    }

    /// Drops the cached copy of `block` if it is idle (unpinned, not being read or written) and
    /// clean. A dirty copy whose last write failed is dropped too, with its latched error: the
    /// caller gives up on that data. A hint: anything else is left alone.
    pub fn forget(&self, block: u64) {
        let mut table = self.inner.table.borrow_mut();
        let Lookup::Valid(frame) = table.lookup(block) else { return };
        let m = table.meta[frame as usize];
        let errored = table.write_errors.contains_key(&block);
        if m.pins > 0 || m.has(flag::WRITING) || (m.has(flag::DIRTY) && !errored) {
            return;
        }
        table.uninstall(frame);
        drop(table);
        self.inner.notify();
    }

    /// [`Partition::forget`] for every block of `block..block + count`.
    pub fn forget_range(&self, block: u64, count: u64) {
        for b in block..block.saturating_add(count).min(self.inner.device_blocks) {
            self.forget(b);
        }
    }
}

impl<D: Device + 'static, A: Default + 'static> Inner<D, A> {
    fn check_range(&self, block: u64, count: u64) -> Result<()> {
        let last = block.saturating_add(count.max(1) - 1);
        if block >= self.device_blocks || last >= self.device_blocks {
            return Err(Error::BlockOutOfRange { block: last, device_blocks: self.device_blocks });
        }
        Ok(())
    }

    fn notify(&self) {
        self.changes.set(self.changes.get().wrapping_add(1));
        self.changed.notify_all();
    }

    /// Waits for the next state change notification.
    async fn wait_change(&self) {
        self.wait_change_since(self.changes.get()).await;
    }

    /// Waits until a state change after the one numbered `seen` (resolves at once if there
    /// was one already).
    async fn wait_change_since(&self, seen: u64) {
        self.changed.wait_for(|| (self.changes.get() != seen).then_some(())).await;
    }

    /// Spawns the writes an eviction scan scheduled. Must be called with no borrow of the
    /// table held: glommio runs a spawned task right away, inside this call.
    fn spawn_started_writes(self: &Rc<Self>) {
        loop {
            let Some(frame) = self.table.borrow_mut().writes_to_start.pop() else { return };
            let inner = Rc::clone(self);
            glommio::spawn_local(async move { inner.write_frame(frame).await }).detach();
        }
    }

    /// A frame for a new block: a free one, else a clean idle one evicted (starting writes of
    /// dirty candidates on the way), else waits for a release or a write to finish.
    async fn alloc_frame(self: &Rc<Self>) -> Result<u32> {
        // One allocation at a time, first come first served: a task that starts an operation
        // while others wait for a frame would otherwise take the frame a waiter was woken for,
        // and a waiter could lose that race for as long as operations keep coming.
        let _turn = self.alloc_line.pass().await;
        loop {
            // Taken before the scan: the writes it starts run right away and may complete (and
            // notify) before this task waits, and that change must end the wait.
            let seen = self.changes.get();
            let writes_max = self.queue.config().writebacks_in_flight_max;
            let must_wait = {
                let mut table = self.table.borrow_mut();
                if let Some(frame) = table.free.pop() {
                    return Ok(frame);
                }
                let must_wait = table.eviction_must_wait(writes_max);
                if must_wait {
                    table.stats.frame_waits += 1;
                }
                must_wait
            };
            if must_wait {
                self.wait_change_since(seen).await;
                continue;
            }
            {
                let victim = self.table.borrow_mut().evict(writes_max);
                self.spawn_started_writes();
                if let Some(frame) = victim {
                    return Ok(frame);
                }
                let mut table = self.table.borrow_mut();
                if table.writing_count == 0 {
                    if let Some(e) = table.first_write_error() {
                        // Every unpinned frame holds data whose write failed: no room can be
                        // made until the caller retries `write_dirty` or forgets blocks.
                        return Err(e);
                    }
                }
                table.stats.frame_waits += 1;
            }
            self.wait_change_since(seen).await;
        }
    }

    /// For prefetch: a free or clean idle frame installed as READING for `block`, or `None`.
    fn prefetch_one(&self, block: u64) -> Option<u32> {
        let mut table = self.table.borrow_mut();
        if table.lookup(block) != Lookup::Absent {
            return None;
        }
        if self.queue.in_flight() >= self.queue.config().io_depth_max {
            table.stats.prefetch_skipped += 1;
            return None;
        }
        let frame = match table.free.pop() {
            Some(frame) => frame,
            None => match table.evict(0) {
                Some(frame) => frame,
                None => {
                    table.stats.prefetch_skipped += 1;
                    return None;
                }
            },
        };
        table.install(frame, block, flag::READING);
        table.stats.prefetch_reads += 1;
        Some(frame)
    }

    /// Reads `block` from the device into the READING frame of `guard`, then makes it VALID.
    /// On error (or if this future is dropped) the guard uninstalls the frame.
    async fn fill_from_device(&self, mut guard: ReadGuard<'_, D, A>, block: u64) -> Result<()> {
        let frame = guard.frame;
        let mut request = self.queue.request().await;
        if let Err(e) = self.queue.read(&mut request, block).await {
            self.table.borrow_mut().stats.read_errors += 1;
            return Err(e);
        }
        if let Some(check) = &self.hooks.on_read {
            if let Err(e) = check(block, request.data()) {
                self.table.borrow_mut().stats.read_errors += 1;
                return Err(e);
            }
        }
        {
            let mut data = self.arena.try_borrow_mut(frame).expect("a READING frame is never lent");
            data.copy_from_slice(request.data());
            self.run_on_alloc(frame, block, &mut data);
        }
        self.table.borrow_mut().meta[frame as usize].flags = flag::VALID;
        guard.done = true;
        self.notify();
        Ok(())
    }

    fn run_on_alloc(&self, frame: u32, block: u64, data: &mut FrameMut<'_>) {
        let mut aux = self.aux[frame as usize].borrow_mut();
        *aux = A::default();
        if let Some(hook) = &self.hooks.on_alloc {
            hook(block, data, &mut aux);
        }
    }

    /// Writes one frame whose write was scheduled (`WRITING` set). Returns once the write is
    /// submitted; its completion updates the table.
    ///
    /// If this future is dropped before the write is submitted, the guard below gives the frame
    /// back as dirty: a scheduled write that never starts must not leave it WRITING forever.
    async fn write_frame(self: &Rc<Self>, frame: u32) {
        let mut guard = WriteGuard { inner: self, frame, submitted: false };
        let mut request = self.queue.request().await;
        // The snapshot needs the bytes not borrowed mutably (and, for `on_write`, neither the
        // bytes nor the aux data borrowed at all: the hook gets both mutably).
        // No await between this check and the copy below: if you add one, re-check after it.
        let needs_exclusive = self.hooks.on_write.is_some();
        let busy = |inner: &Self| {
            if needs_exclusive {
                inner.arena.is_borrowed(frame)
                    || inner.aux[frame as usize].try_borrow_mut().is_err()
            } else {
                inner.arena.is_mut_borrowed(frame)
            }
        };
        // Borrows end without a notification (they are plain guards), so poll: this only
        // happens when a caller holds a data borrow across an await.
        while busy(self) {
            futures_lite::future::yield_now().await;
        }
        let block = self.table.borrow().meta[frame as usize].block;
        if let Some(hook) = &self.hooks.on_write {
            let mut data = self.arena.try_borrow_mut(frame).expect("checked not borrowed above");
            hook(block, &mut data, &mut self.aux[frame as usize].borrow_mut());
        }
        {
            let data = self.arena.try_borrow(frame).expect("checked not mutably borrowed above");
            request.data_mut().copy_from_slice(&data);
        }
        self.table.borrow_mut().take_snapshot(frame);
        let inner = Rc::clone(self);
        let done = move |result: Result<()>| {
            inner.table.borrow_mut().end_write(frame, result);
            inner.notify();
        };
        let submitted = self.queue.write_back_then(request, block, Some(done)).await;
        debug_assert!(submitted.is_ok(), "an installed frame's block is inside the device");
        // From here the completion callback ends the write.
        guard.submitted = submitted.is_ok();
    }

    /// Schedules and submits writes of every dirty, idle-writer frame dirtied before `barrier`
    /// whose write has not failed since failure number `failures_at_start`.
    ///
    /// The dirty list is walked with a cursor, so a pass is O(dirty frames), not O(n²): frames
    /// whose write was scheduled stay listed (WRITING) and keep their places, but a completed
    /// write removes its frame by swapping the last one into its slot, which may move a frame
    /// behind the cursor. So a pass that reaches the end starts over once, and only a pass
    /// from the start that finds nothing ends the walk.
    async fn write_all_dirty_before(self: &Rc<Self>, barrier: u64, failures_at_start: u64) {
        let mut cursor = 0;
        loop {
            let next = schedule_next_write(&mut self.table.borrow_mut(), &mut cursor, |t, m| {
                m.oldest_dirty_seq < barrier && !failed_since(t, m.block, failures_at_start)
            });
            match next {
                Some(frame) => self.write_frame(frame).await,
                None if cursor == 0 => return,
                None => cursor = 0,
            }
        }
    }

    async fn write_all_dirty(self: &Rc<Self>, barrier: u64) {
        let failures = self.table.borrow().failures;
        self.write_all_dirty_before(barrier, failures).await;
    }

    /// Whether a modification made before `barrier` is not yet on the device (and has not
    /// failed to get there since `failures_at_start`).
    fn writes_pending_before(&self, barrier: u64, failures_at_start: u64) -> bool {
        let table = self.table.borrow();
        table.dirty_list.iter().any(|&f| {
            let m = &table.meta[f as usize];
            let in_flight = m.has(flag::WRITING) && m.writing_oldest_seq < barrier;
            let unwritten = m.has(flag::DIRTY)
                && m.oldest_dirty_seq < barrier
                && !failed_since(&table, m.block, failures_at_start);
            in_flight || unwritten
        })
    }

    fn maybe_start_background_writer(self: &Rc<Self>, dirty: usize) {
        if dirty <= self.sizing.dirty_high || self.background_writer_running.get() {
            return;
        }
        self.background_writer_running.set(true);
        let inner = Rc::clone(self);
        glommio::spawn_local(async move {
            let mut cursor = 0; // as in `write_all_dirty_before`: one O(n) walk, not O(n²)
            loop {
                let next = {
                    let mut table = inner.table.borrow_mut();
                    // Frames whose write is already scheduled or in flight will be clean: only
                    // the others count against the low mark, or the writer would write back
                    // every dirty buffer whenever its writes are slower than its loop.
                    let unscheduled = table.dirty_list.len() - table.writing_count;
                    if unscheduled <= inner.sizing.dirty_low {
                        None
                    } else {
                        schedule_next_write(&mut table, &mut cursor, |t, m| {
                            !t.write_errors.contains_key(&m.block)
                        })
                    }
                };
                match next {
                    Some(frame) => inner.write_frame(frame).await,
                    None if cursor == 0 => break,
                    None => cursor = 0,
                }
            }
            inner.background_writer_running.set(false);
        })
        .detach();
    }
}

/// Finds the next frame at or after `cursor` in the dirty list that is dirty, has no write
/// scheduled and passes `wanted`; schedules its write (`begin_write`) and moves the cursor past
/// it. `None` when the rest of the list has none.
fn schedule_next_write(
    table: &mut Table,
    cursor: &mut usize,
    wanted: impl Fn(&Table, &FrameMeta) -> bool,
) -> Option<u32> {
    let start = (*cursor).min(table.dirty_list.len());
    let at = table.dirty_list[start..].iter().position(|&f| {
        let m = &table.meta[f as usize];
        m.has(flag::DIRTY) && !m.has(flag::WRITING) && wanted(table, m)
    })?;
    let frame = table.dirty_list[start + at];
    table.begin_write(frame);
    *cursor = start + at + 1;
    Some(frame)
}

fn failed_since(table: &Table, block: u64, failures_at_start: u64) -> bool {
    table.write_errors.get(&block).is_some_and(|(_, n)| *n > failures_at_start)
}

/// Ends a scheduled write of `frame` that was never submitted (its future was dropped while it
/// waited for a request buffer, a data borrow or a write-back slot): the frame stops WRITING
/// and keeps its data dirty, to be written later, instead of blocking eviction, `forget` and
/// every later `write_dirty` forever.
struct WriteGuard<'a, D: Device + 'static, A: Default + 'static> {
    inner: &'a Inner<D, A>,
    frame: u32,
    submitted: bool,
}

impl<D: Device + 'static, A: Default + 'static> Drop for WriteGuard<'_, D, A> {
    fn drop(&mut self) {
        if self.submitted {
            return;
        }
        self.inner.table.borrow_mut().cancel_write(self.frame);
        self.inner.notify();
    }
}

/// Uninstalls a READING frame unless the read completed (`done`): a failed or cancelled read
/// never leaves a frame that others would wait on forever.
struct ReadGuard<'a, D: Device + 'static, A: Default + 'static> {
    inner: &'a Inner<D, A>,
    frame: u32,
    done: bool,
}

impl<D: Device + 'static, A: Default + 'static> Drop for ReadGuard<'_, D, A> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut table = self.inner.table.borrow_mut();
        let pins = table.meta[self.frame as usize].pins;
        for _ in 0..pins {
            table.unpin(self.frame);
        }
        table.uninstall(self.frame);
        drop(table);
        self.inner.notify();
    }
}

/// A task's right to pin buffers: the unit of the deadlock rule. At most
/// `pins_per_session_max` buffers pinned through one session at once; a call that would pin
/// more fails with [`Error::PinLimit`] instead of risking a deadlock.
pub struct Session<D: Device + 'static, A: 'static = ()> {
    inner: Rc<Inner<D, A>>,
    held: Cell<usize>,
}

impl<D: Device, A> std::fmt::Debug for Session<D, A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("held", &self.held.get()).finish()
    }
}

impl<D: Device, A> Drop for Session<D, A> {
    fn drop(&mut self) {
        debug_assert_eq!(self.held.get(), 0, "handles borrow the session, so none outlives it");
        self.inner.sessions_active.set(self.inner.sessions_active.get() - 1);
        self.inner.session_slots.notify_all();
    }
}

impl<D: Device + 'static, A: Default + 'static> Session<D, A> {
    /// Buffers pinned through this session now.
    pub fn pinned(&self) -> usize {
        self.held.get()
    }

    /// Reserves one of the session's pins for a call that may wait before it pins its frame,
    /// so that calls awaited together through one session cannot all pass the check and then
    /// pin more than the limit. The reservation is given back if the call fails or is dropped.
    fn admit(&self) -> Result<Admission<'_, D, A>> {
        if self.held.get() >= self.inner.pins_per_session_max {
            return Err(Error::PinLimit { requested: 1, limit: self.inner.pins_per_session_max });
        }
        self.held.set(self.held.get() + 1);
        Ok(Admission { session: self })
    }

    /// A handle for a pin `get` takes (gets are not bounded, as in dm-bufio).
    #[inline]
    fn handle(&self, frame: u32, block: u64) -> BufRef<'_, D, A> {
        self.held.set(self.held.get() + 1);
        BufRef { session: self, frame, block }
    }

    /// The cached buffer of `block`, pinned, or `None` if it is absent or still being read.
    /// Never does I/O and never waits.
    pub fn get(&self, block: u64) -> Option<BufRef<'_, D, A>> {
        let mut table = self.inner.table.borrow_mut();
        let Lookup::Valid(frame) = table.lookup(block) else { return None };
        table.pin(frame);
        table.policy.touch(frame);
        table.stats.hits += 1;
        drop(table);
        Some(self.handle(frame, block))
    }

    /// The buffer of `block` with its data, pinned. A miss reads the device; concurrent
    /// readers of one block share one read. Waits for a frame when every frame is busy.
    pub async fn read(&self, block: u64) -> Result<BufRef<'_, D, A>> {
        let inner = &self.inner;
        inner.check_range(block, 1)?;
        let admission = self.admit()?;
        let mut joined = false;
        loop {
            let lookup = {
                let mut table = inner.table.borrow_mut();
                let lookup = table.lookup(block);
                match lookup {
                    Lookup::Valid(frame) => {
                        table.pin(frame);
                        table.policy.touch(frame);
                        if !joined {
                            table.stats.hits += 1;
                        }
                        drop(table);
                        return Ok(admission.into_handle(frame, block));
                    }
                    Lookup::Reading(_) if !joined => {
                        joined = true;
                        table.stats.joins += 1;
                    }
                    _ => {}
                }
                lookup
            };
            match lookup {
                Lookup::Reading(_) => inner.wait_change().await,
                _ => {
                    if let Some(frame) = self.read_miss(block).await? {
                        return Ok(admission.into_handle(frame, block));
                    }
                }
            }
        }
    }

    /// A miss: takes a frame, installs it READING and pinned, reads; returns the frame. `None`
    /// if another task installed the block while this one waited for a frame (the caller looks
    /// up again).
    async fn read_miss(&self, block: u64) -> Result<Option<u32>> {
        let inner = &self.inner;
        let frame = inner.alloc_frame().await?;
        {
            let mut table = inner.table.borrow_mut();
            if table.lookup(block) != Lookup::Absent {
                table.free.push(frame);
                return Ok(None);
            }
            table.install(frame, block, flag::READING);
            table.pin(frame);
            table.stats.misses += 1;
        }
        let guard = ReadGuard { inner, frame, done: false };
        inner.fill_from_device(guard, block).await?;
        Ok(Some(frame))
    }

    /// A pinned buffer for `block` without reading the device: zeroed, for the caller to fill
    /// and mark dirty. If the block is cached, its cached buffer is returned as it is.
    pub async fn new_block(&self, block: u64) -> Result<BufRef<'_, D, A>> {
        let inner = &self.inner;
        inner.check_range(block, 1)?;
        let admission = self.admit()?;
        loop {
            let lookup = inner.table.borrow().lookup(block);
            match lookup {
                Lookup::Valid(frame) => {
                    let mut table = inner.table.borrow_mut();
                    table.pin(frame);
                    table.policy.touch(frame);
                    table.stats.hits += 1;
                    drop(table);
                    return Ok(admission.into_handle(frame, block));
                }
                Lookup::Reading(_) => inner.wait_change().await,
                Lookup::Absent => {
                    let frame = inner.alloc_frame().await?;
                    let mut table = inner.table.borrow_mut();
                    if table.lookup(block) != Lookup::Absent {
                        table.free.push(frame);
                        continue;
                    }
                    table.install(frame, block, flag::VALID);
                    table.pin(frame);
                    table.stats.news += 1;
                    drop(table);
                    let mut data =
                        inner.arena.try_borrow_mut(frame).expect("a fresh frame is not lent");
                    data.fill(0);
                    inner.run_on_alloc(frame, block, &mut data);
                    drop(data);
                    return Ok(admission.into_handle(frame, block));
                }
            }
        }
    }

    /// Re-homes the buffer's contents to `new_block` and marks it dirty there (dm-bufio 3.7's
    /// `release_move`). If the buffer is dirty, its data is first written to its old block.
    /// Whatever was cached for `new_block` is dropped. The handle is released.
    ///
    /// Fails with [`Error::BufferBusy`] if another handle pins either buffer.
    pub async fn release_move(&self, buf: BufRef<'_, D, A>, new_block: u64) -> Result<()> {
        let inner = &self.inner;
        inner.check_range(new_block, 1)?;
        let frame = buf.frame;
        let old_block = buf.block;
        if old_block == new_block {
            buf.mark_dirty();
            return Ok(());
        }
        if inner.table.borrow().meta[frame as usize].pins != 1 {
            return Err(Error::BufferBusy { block: old_block });
        }
        // Persist the old block's data, as dm-bufio does, before its frame changes identity.
        loop {
            let state = inner.table.borrow().meta[frame as usize];
            if state.has(flag::WRITING) {
                inner.wait_change().await;
                continue;
            }
            if !state.has(flag::DIRTY) {
                break;
            }
            if let Some(e) = inner.table.borrow().write_errors.get(&old_block) {
                return Err(e.0.clone());
            }
            inner.table.borrow_mut().begin_write(frame);
            inner.write_frame(frame).await;
        }
        let mut table = inner.table.borrow_mut();
        // Checked again after the awaits above: a task that pinned the old block meanwhile
        // must not be left holding a handle of `old_block` on a buffer that now is `new_block`.
        if table.meta[frame as usize].pins != 1 {
            return Err(Error::BufferBusy { block: old_block });
        }
        if let Lookup::Valid(other) | Lookup::Reading(other) = table.lookup(new_block) {
            let m = table.meta[other as usize];
            if m.pins > 0 || m.has(flag::READING | flag::WRITING) {
                return Err(Error::BufferBusy { block: new_block });
            }
            table.uninstall(other);
        }
        // The index reads keys from the frame table: remove under the old block number, insert
        // under the new one.
        let Table { index, meta, .. } = &mut *table;
        index.remove(old_block, meta);
        meta[frame as usize].block = new_block;
        index.insert(new_block, frame, meta);
        table.mark_dirty(frame, 0, inner.block_size);
        drop(table);
        drop(buf);
        inner.notify();
        Ok(())
    }
}

/// One pin of a session reserved by [`Session::admit`]: it becomes a [`BufRef`] or, when
/// dropped, gives the pin back.
struct Admission<'s, D: Device + 'static, A: Default + 'static> {
    session: &'s Session<D, A>,
}

impl<'s, D: Device + 'static, A: Default + 'static> Admission<'s, D, A> {
    /// The handle of the pinned `frame`, holding the reserved pin.
    fn into_handle(self, frame: u32, block: u64) -> BufRef<'s, D, A> {
        let session = self.session;
        std::mem::forget(self);
        BufRef { session, frame, block }
    }
}

impl<D: Device + 'static, A: Default + 'static> Drop for Admission<'_, D, A> {
    fn drop(&mut self) {
        self.session.held.set(self.session.held.get() - 1);
    }
}

/// A pinned buffer: the block's bytes stay in memory, and are never evicted, while it lives.
/// Dropping it releases the pin. It borrows its [`Session`], so it cannot outlive it.
pub struct BufRef<'s, D: Device + 'static, A: Default + 'static = ()> {
    session: &'s Session<D, A>,
    frame: u32,
    block: u64,
}

impl<D: Device, A: Default> std::fmt::Debug for BufRef<'_, D, A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufRef").field("block", &self.block).finish()
    }
}

impl<D: Device + 'static, A: Default + 'static> BufRef<'_, D, A> {
    /// The block number.
    pub fn block(&self) -> u64 {
        self.block
    }

    /// The block size in bytes.
    pub fn block_size(&self) -> usize {
        self.session.inner.block_size
    }

    /// The buffer's bytes.
    ///
    /// # Panics
    /// If the bytes are borrowed mutably elsewhere (like `RefCell::borrow`); see
    /// [`BufRef::try_data`].
    pub fn data(&self) -> FrameRef<'_> {
        self.try_data().expect("buffer data is mutably borrowed elsewhere")
    }

    /// The buffer's bytes, or [`Error::BufferBusy`] while they are borrowed mutably.
    pub fn try_data(&self) -> Result<FrameRef<'_>> {
        self.session
            .inner
            .arena
            .try_borrow(self.frame)
            .ok_or(Error::BufferBusy { block: self.block })
    }

    /// The buffer's bytes, mutably. Call [`BufRef::mark_dirty`] after changing them.
    ///
    /// # Panics
    /// If the bytes are borrowed elsewhere; see [`BufRef::try_data_mut`].
    pub fn data_mut(&self) -> FrameMut<'_> {
        self.try_data_mut().expect("buffer data is borrowed elsewhere")
    }

    /// The buffer's bytes mutably, or [`Error::BufferBusy`] while they are borrowed.
    pub fn try_data_mut(&self) -> Result<FrameMut<'_>> {
        let inner = &self.session.inner;
        let borrowed = inner.arena.try_borrow_mut(self.frame);
        borrowed.ok_or(Error::BufferBusy { block: self.block })
    }

    /// The caller's aux data of this buffer.
    pub fn aux(&self) -> RefMut<'_, A> {
        self.session.inner.aux[self.frame as usize].borrow_mut()
    }

    /// Marks the whole buffer dirty.
    pub fn mark_dirty(&self) {
        self.mark_dirty_range(0..self.block_size());
    }

    /// Marks `range` (bytes in the block) dirty; later calls widen the recorded range to the
    /// union. The whole block is written either way; the range is kept for the caller.
    pub fn mark_dirty_range(&self, range: Range<usize>) {
        assert!(
            range.start < range.end && range.end <= self.block_size(),
            "dirty range {range:?} outside the block of {} bytes",
            self.block_size()
        );
        let inner = &self.session.inner;
        let dirty = {
            let mut table = inner.table.borrow_mut();
            table.mark_dirty(self.frame, range.start, range.end);
            table.dirty_list.len()
        };
        inner.maybe_start_background_writer(dirty);
    }

    /// Whether the buffer holds modifications not yet written.
    pub fn is_dirty(&self) -> bool {
        self.session.inner.table.borrow().meta[self.frame as usize].has(flag::DIRTY)
    }

    /// The recorded dirty byte range, if the buffer is dirty.
    pub fn dirty_range(&self) -> Option<Range<usize>> {
        let table = self.session.inner.table.borrow();
        let m = &table.meta[self.frame as usize];
        m.has(flag::DIRTY).then(|| m.dirty_start as usize..m.dirty_last as usize + 1)
    }
}

impl<D: Device + 'static, A: Default + 'static> Drop for BufRef<'_, D, A> {
    fn drop(&mut self) {
        let inner = &self.session.inner;
        self.session.held.set(self.session.held.get() - 1);
        let unpinned = inner.table.borrow_mut().unpin(self.frame);
        if unpinned && inner.changed.has_waiters() {
            inner.notify();
        }
    }
}
