//! The cache partition: dm-bufio's operations over one shard's [`IoQueue`]. This file holds
//! the partition itself (construction, `get`, sessions, prefetch, forget, flush) and the miss
//! path (frame allocation and the device read); [`super::session`] holds the handles and
//! [`super::writeback`] the write path.

use std::cell::{Cell, RefCell, UnsafeCell};
use std::rc::Rc;

use super::arena::{Arena, ArenaError, FrameMut};
use super::config::{CacheConfig, Sizing};
use super::frame::{self, flag, Hot, SEQ_NONE};
use super::session::{AuxMut, BufRef, Session};
use super::stats::CacheStats;
use super::table::{Lookup, Table};
use crate::error::{Error, Result};
use crate::io::{Device, IoQueue};
use crate::wait::{Changes, FifoGate, WaitList};

/// Blocks [`Partition::warm`] asks the CPU for at a time.
const WARM_GROUP: usize = 16;

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

pub(super) struct Inner<D: Device, A> {
    pub(super) queue: Rc<IoQueue<D>>,
    pub(super) block_size: usize,
    pub(super) device_blocks: u64,
    pub(super) arena: Arena,
    /// The frames' hot records (shared with the table and the arena): here for the aux flag.
    hot: Rc<[Hot]>,
    /// The caller's aux data per frame, borrowed through the `AUX_BORROWED` bit of the frame's
    /// hot record (0 bytes per frame for `A = ()`).
    aux: Box<[UnsafeCell<A>]>,
    pub(super) table: RefCell<Table>,
    pub(super) hooks: Hooks<A>,
    pub(super) sizing: Sizing,
    pub(super) pins_per_session_max: usize,
    sessions_active: Cell<usize>,
    alloc_line: FifoGate,
    pub(super) background_writer_running: Cell<bool>,
    /// Bumped and notified whenever a frame's state changes in a way a waiter may care about:
    /// a read completes or fails, a pin drops to zero, a write ends, a data borrow ends, a
    /// device ends the loan of a frame (shared with the loans for that).
    pub(super) changes: Rc<Changes>,
    session_slots: WaitList,
}

/// One core's block cache over an [`IoQueue`], with dm-bufio's contract.
///
/// Pinning goes through a [`Session`], the unit of the deadlock rule: a session holds at most
/// `pins_per_session_max` buffers, and the partition admits at most
/// `(frames − 1) / (pins_per_session_max − 1)` sessions at once, so whenever every session
/// waits for one more buffer, some frame is unpinned and can be reused. [`Partition::get`]
/// pins without a session (it never waits, so it cannot take part in a deadlock itself).
///
/// `A` is the per-buffer aux data (dm-bufio's `aux_size` bytes), reset to `A::default()`
/// whenever a buffer is (re)initialised.
pub struct Partition<D: Device + 'static, A: 'static = ()> {
    pub(super) inner: Rc<Inner<D, A>>,
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
        let no_metadata = || {
            Error::config(
                "cache_size_bytes",
                format!("metadata for {frames} frames cannot be allocated"),
            )
        };
        // The buffers first: a size the machine cannot hold fails there, before any per-frame
        // array is written.
        let arena =
            Arena::new(frames, block_size, || frame::hot_array(frames)).map_err(|e| match e {
                ArenaError::Buffers => Error::config(
                    "cache_size_bytes",
                    format!("{} bytes of buffers cannot be allocated", config.cache_size_bytes),
                ),
                ArenaError::Metadata => no_metadata(),
            })?;
        let hot = arena.hot();
        let writes_max = queue.config().writebacks_in_flight_max;
        let table = Table::try_new(Rc::clone(&hot), writes_max).ok_or_else(no_metadata)?;
        let inner = Inner {
            device_blocks: queue.device_blocks(),
            queue,
            block_size,
            arena,
            hot,
            aux: (0..frames).map(|_| UnsafeCell::new(A::default())).collect(),
            table: RefCell::new(table),
            hooks,
            sizing,
            pins_per_session_max: config.pins_per_session_max,
            sessions_active: Cell::new(0),
            alloc_line: FifoGate::default(),
            background_writer_running: Cell::new(false),
            changes: Rc::new(Changes::with_capacity(64)),
            session_slots: WaitList::with_capacity(64),
        };
        Ok(Partition { inner: Rc::new(inner) })
    }
}

impl<D: Device + 'static, A: Default + 'static> Partition<D, A> {
    /// Waits until every read abandoned while the device was filling its frame has ended (its
    /// frame is then an orphan an allocation may take back). A shard's stop waits for this
    /// so that it frees its frames only once the kernel no longer writes them.
    pub async fn wait_abandoned_reads(&self) {
        loop {
            let seen = self.inner.changes.count();
            if self.inner.table.borrow().lent_orphans() == 0 {
                return;
            }
            self.inner.wait_change_since(seen).await;
        }
    }

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

    /// Bytes of metadata per buffer, the block index included: the hot record (block number,
    /// pin count, state bits, policy byte, data borrow flag), the cold record (write sequence
    /// numbers, dirty range, dirty-list slot), the dirty list, the policy's list links, the
    /// index's slots, and the aux data (0 bytes for `A = ()`). The ghost (block numbers of
    /// recently evicted blocks, policy history rather than per-buffer state) comes on top:
    /// see [`Partition::ghost_bytes_per_frame`] and docs/ARCHITECTURE.md.
    pub fn metadata_bytes_per_frame(&self) -> usize {
        Table::bytes_per_frame(self.frame_count()) + std::mem::size_of::<UnsafeCell<A>>()
    }

    /// Bytes per buffer of the ghost: its ring of block numbers and its lookup table.
    pub fn ghost_bytes_per_frame(&self) -> usize {
        self.inner.table.borrow().ghost_bytes() / self.frame_count()
    }

    /// The I/O queue under this partition.
    pub fn queue(&self) -> &Rc<IoQueue<D>> {
        &self.inner.queue
    }

    /// A snapshot of the statistics.
    pub fn stats(&self) -> CacheStats {
        self.inner.table.borrow().stats()
    }

    /// The cached buffer of `block`, pinned, or `None` if it is absent or still being read:
    /// dm-bufio's `dm_bufio_get`. Synchronous: no session, no future, never I/O, never waits.
    /// One index probe and one metadata record; nothing is allocated.
    ///
    /// The handle pins the buffer until it is dropped, outside any session's pin limit: hold
    /// it for the access, not across waits for other buffers (a task that pins every frame
    /// this way and then waits for a frame waits forever, as with dm-bufio).
    ///
    /// # Examples
    /// ```
    /// # use corebuf_shard::cache::{CacheConfig, Hooks, Partition};
    /// # use corebuf_shard::io::{IoQueue, QueueConfig, SimDevice, SimOptions};
    /// glommio::LocalExecutor::default().run(async {
    ///     let device = SimDevice::new(SimOptions::new(64 * 4096));
    ///     let queue = IoQueue::new(device, QueueConfig::default()).unwrap();
    ///     let config = CacheConfig { cache_size_bytes: 16 * 4096, ..CacheConfig::default() };
    ///     let part: Partition<SimDevice> = Partition::new(queue, config, Hooks::default()).unwrap();
    ///     assert!(part.get(7).is_none(), "not cached yet");
    ///     let session = part.session().await;
    ///     drop(session.read(7).await.unwrap()); // a miss reads the device
    ///     drop(session);
    ///     let buf = part.get(7).expect("cached now");
    ///     assert_eq!(buf.data().len(), 4096);
    /// });
    /// ```
    #[inline]
    pub fn get(&self, block: u64) -> Option<BufRef<'_, D, A>> {
        let frame = self.inner.table.borrow_mut().try_hit(block)?;
        Some(BufRef { inner: &self.inner, held: None, frame, block })
    }

    /// A hint to the CPU before a batch of lookups: starts loading the index slots of
    /// `blocks`, then the metadata (what a hit reads and what marking dirty writes) and the
    /// first `bytes` of the frames they are probably cached in, so that the lookups that
    /// follow find those lines loaded instead of waiting on memory one after another (a cache
    /// of many frames misses the CPU's caches on every probe). It reads no device, pins
    /// nothing and changes nothing: the lookups that follow still check everything. Blocks
    /// are taken 16 at a time (`WARM_GROUP`), so a long slice does not ask for more lines than
    /// the CPU can fetch at once.
    pub fn warm(&self, blocks: &[u64], bytes: usize) {
        for group in blocks.chunks(WARM_GROUP) {
            self.warm_index(group);
            let table = self.inner.table.borrow();
            for &block in group {
                if let Some(frame) = table.prefetch_likely_frame(block) {
                    self.inner.arena.prefetch(frame, bytes);
                }
            }
        }
    }

    /// The first half of [`Partition::warm`]: asks the CPU for the index slots of `blocks`
    /// only. Called a batch ahead of `warm` on the same blocks, it lets `warm` read slots
    /// already loaded instead of waiting for them.
    pub fn warm_index(&self, blocks: &[u64]) {
        let table = self.inner.table.borrow();
        for &block in blocks {
            table.prefetch_index(block);
        }
    }

    /// Opens a session, waiting while the deadlock rule's bound of sessions is reached.
    pub async fn session(&self) -> Session<D, A> {
        let inner = &self.inner;
        let max = inner.sizing.sessions_max;
        if inner.sessions_active.get() >= max {
            inner.table.borrow_mut().stats_mut().session_waits += 1;
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

    /// Declares that the device reads as zeroes in `block..block + count` until this
    /// partition writes there (a file just created full of zeroes, say): a miss on such a
    /// block, or a prefetch of it, zeroes the frame instead of reading the device, until the
    /// block is first marked dirty (counted in [`CacheStats::zero_fills`]). Nothing else may
    /// write those blocks meanwhile. Replaces an earlier declaration; blocks dirty or being
    /// written now are left out. Costs a bit of memory per block of the range.
    ///
    /// [`CacheStats::zero_fills`]: super::CacheStats::zero_fills
    pub fn assume_zeroed(&self, block: u64, count: u64) -> Result<()> {
        self.inner.check_range(block, count)?;
        self.inner.table.borrow_mut().assume_zeroed(block, block + count);
        Ok(())
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
                let guard = ReadGuard::new(&inner, frame);
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
        self.inner.write_back_dirty().await
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
        if !table.forgettable(frame) {
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

impl<D: Device, A> Inner<D, A> {
    /// A session ended: its slot is free for a waiter.
    pub(super) fn end_session(&self) {
        self.sessions_active.set(self.sessions_active.get() - 1);
        self.session_slots.notify_all();
    }
}

impl<D: Device + 'static, A: Default + 'static> Inner<D, A> {
    pub(super) fn check_range(&self, block: u64, count: u64) -> Result<()> {
        let last = block.saturating_add(count.max(1) - 1);
        if block >= self.device_blocks || last >= self.device_blocks {
            return Err(Error::BlockOutOfRange { block: last, device_blocks: self.device_blocks });
        }
        Ok(())
    }

    pub(super) fn notify(&self) {
        self.changes.notify();
    }

    /// Waits for the next state change notification.
    pub(super) async fn wait_change(&self) {
        self.wait_change_since(self.changes.count()).await;
    }

    /// Waits until a state change after the one numbered `seen` (resolves at once if there
    /// was one already).
    pub(super) async fn wait_change_since(&self, seen: u64) {
        self.changes.wait_since(seen).await;
    }

    /// The aux data of `frame`, borrowed mutably, or `None` while it is borrowed already.
    pub(super) fn try_aux_mut(&self, frame: u32) -> Option<AuxMut<'_, A>> {
        let hot = &self.hot[frame as usize];
        if hot.has(flag::AUX_BORROWED) {
            return None;
        }
        hot.add_flags(flag::AUX_BORROWED);
        // SAFETY: the AUX_BORROWED bit was clear, so no other `&mut A` of this frame is alive
        // (every one is an `AuxMut`, which holds the bit until dropped), and the bit is set now
        // until this guard drops; `aux` lives as long as `self`, which the guard borrows.
        let value = unsafe { &mut *self.aux[frame as usize].get() };
        Some(AuxMut { value, hot })
    }

    /// Whether the aux data of `frame` is borrowed now.
    pub(super) fn aux_borrowed(&self, frame: u32) -> bool {
        self.hot[frame as usize].has(flag::AUX_BORROWED)
    }

    /// A frame for a new block: a free one, else a clean idle one evicted (starting writes of
    /// dirty candidates on the way), else waits for a release or a write to finish.
    pub(super) async fn alloc_frame(self: &Rc<Self>) -> Result<u32> {
        // One allocation at a time, first come first served: a task that starts an operation
        // while others wait for a frame would otherwise take the frame a waiter was woken for,
        // and a waiter could lose that race for as long as operations keep coming.
        let _turn = self.alloc_line.pass().await;
        loop {
            // Taken before the scan: the writes it starts run right away and may complete (and
            // notify) before this task waits, and that change must end the wait.
            let seen = self.changes.count();
            let must_wait = {
                let mut table = self.table.borrow_mut();
                if let Some(frame) = table.take_free() {
                    return Ok(frame);
                }
                let must_wait = table.eviction_must_wait();
                if must_wait {
                    table.stats_mut().frame_waits += 1;
                }
                must_wait
            };
            if must_wait {
                self.wait_change_since(seen).await;
                continue;
            }
            {
                let victim = self.table.borrow_mut().evict();
                self.spawn_started_writes();
                if let Some(frame) = victim {
                    return Ok(frame);
                }
                let mut table = self.table.borrow_mut();
                if table.writing_count() == 0 {
                    if let Some(e) = table.first_write_error() {
                        // Every unpinned frame holds data whose write failed: no room can be
                        // made until the caller retries `write_dirty` or forgets blocks.
                        return Err(e);
                    }
                }
                table.stats_mut().frame_waits += 1;
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
            table.stats_mut().prefetch_skipped += 1;
            return None;
        }
        let frame = match table.take_free() {
            Some(frame) => frame,
            // A prefetch never starts writes: it only takes clean frames.
            None => match table.evict_clean() {
                Some(frame) => frame,
                None => {
                    table.stats_mut().prefetch_skipped += 1;
                    return None;
                }
            },
        };
        table.install(frame, block, flag::READING, false);
        table.stats_mut().prefetch_reads += 1;
        Some(frame)
    }

    /// Reads `block` from the device straight into the READING frame of `guard`, then makes
    /// it VALID. On error (or if this future is dropped) the guard uninstalls the frame.
    pub(super) async fn fill_from_device(
        &self,
        mut guard: ReadGuard<'_, D, A>,
        block: u64,
    ) -> Result<()> {
        let frame = guard.frame;
        let zero = self.table.borrow_mut().take_zero_fill(block);
        if !zero {
            // Nobody else borrows a READING frame's bytes: `get` and `read` do not hand it out
            // until it is VALID, and eviction, forget and release_move skip it. The device
            // reads straight into the frame; if this future is dropped first, the guard makes
            // the frame an orphan until the device gives it back.
            let target =
                self.arena.lend(frame, &self.changes).expect("a READING frame is not borrowed");
            if let Err(e) = self.queue.read_in_place(block, target).await {
                self.table.borrow_mut().stats_mut().read_errors += 1;
                return Err(e);
            }
        }
        // The device ended the loan with the read (or there was none).
        let mut data = self.arena.try_borrow_mut(frame).expect("a READING frame is not borrowed");
        if zero {
            data.fill(0);
        }
        if let Some(check) = &self.hooks.on_read {
            if let Err(e) = check(block, &data) {
                self.table.borrow_mut().stats_mut().read_errors += 1;
                return Err(e);
            }
        }
        self.run_on_alloc(frame, block, &mut data);
        drop(data);
        self.table.borrow_mut().set_valid(frame);
        guard.done = true;
        self.notify();
        Ok(())
    }

    pub(super) fn run_on_alloc(&self, frame: u32, block: u64, data: &mut FrameMut<'_>) {
        let mut aux = self.try_aux_mut(frame).expect("a frame being filled has no aux borrow");
        *aux = A::default();
        if let Some(hook) = &self.hooks.on_alloc {
            hook(block, data, &mut aux);
        }
    }
}

/// Uninstalls a READING frame unless the read completed (`done`): a failed or cancelled read
/// never leaves a frame that others would wait on forever.
pub(super) struct ReadGuard<'a, D: Device + 'static, A: Default + 'static> {
    inner: &'a Inner<D, A>,
    frame: u32,
    done: bool,
}

impl<'a, D: Device + 'static, A: Default + 'static> ReadGuard<'a, D, A> {
    pub(super) fn new(inner: &'a Inner<D, A>, frame: u32) -> Self {
        ReadGuard { inner, frame, done: false }
    }
}

impl<D: Device + 'static, A: Default + 'static> Drop for ReadGuard<'_, D, A> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.inner.table.borrow_mut().abandon_read(self.frame);
        self.inner.notify();
    }
}
