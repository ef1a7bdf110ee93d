//! The write path of a partition: write snapshots of single frames, the `write_dirty` driver
//! with its barrier sequence number, the background writer, and the writes the eviction scan
//! starts.

use std::rc::Rc;

use super::frame::Cold;
use super::partition::Inner;
use super::table::Table;
use crate::error::Result;
use crate::io::{Device, IoBuf};

impl<D: Device + 'static, A: Default + 'static> Inner<D, A> {
    /// Writes every buffer dirtied before the call and waits for those writes (see
    /// `Partition::write_back_dirty`).
    pub(super) async fn write_back_dirty(self: &Rc<Self>) -> Result<()> {
        let (barrier, failures_at_start) = self.table.borrow().barrier_start();
        loop {
            self.write_all_dirty_before(barrier, failures_at_start).await;
            if !self.table.borrow().writes_pending_before(barrier, failures_at_start) {
                break;
            }
            self.wait_change().await;
        }
        match self.table.borrow().first_write_error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Spawns the writes an eviction scan scheduled. Must be called with no borrow of the
    /// table held: glommio runs a spawned task right away, inside this call.
    pub(super) fn spawn_started_writes(self: &Rc<Self>) {
        loop {
            let Some(frame) = self.table.borrow_mut().take_started_write() else { return };
            let inner = Rc::clone(self);
            glommio::spawn_local(async move { inner.write_frame(frame).await }).detach();
        }
    }

    /// Writes one frame whose write was scheduled (`WRITING` set). Returns once the write is
    /// submitted; its completion updates the table.
    ///
    /// If this future is dropped before the write is submitted, the guard below gives the frame
    /// back as dirty: a scheduled write that never starts must not leave it WRITING forever.
    pub(super) async fn write_frame(self: &Rc<Self>, frame: u32) {
        let mut guard = WriteGuard { inner: self, frame, submitted: false };
        let mut request = self.queue.request().await;
        // The snapshot needs the bytes not borrowed mutably (and, for `on_write`, neither the
        // bytes nor the aux data borrowed at all: the hook gets both mutably).
        // No await between this check and the copy below: if you add one, re-check after it.
        // Borrows end without a notification (they are plain guards), so poll: this only
        // happens when a caller holds a data borrow across an await.
        while self.write_busy(frame) {
            futures_lite::future::yield_now().await;
        }
        let block = self.table.borrow().block_of(frame);
        if let Some(hook) = &self.hooks.on_write {
            let mut data = self.arena.try_borrow_mut(frame).expect("checked not borrowed above");
            let mut aux = self.try_aux_mut(frame).expect("checked not borrowed above");
            hook(block, &mut data, &mut aux);
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
    /// The frames are taken in block order, and adjacent blocks (up to [`RUN_BLOCKS_MAX`]) go
    /// as one write: a flush of a cache whose dirty blocks are dense (a hash table's bucket
    /// heads, say) then costs the kernel and the device one request per run instead of one
    /// per block. A run takes only frames that can be copied at once (their bytes not
    /// borrowed) and is scheduled and copied without an await, so it never holds frames
    /// `WRITING` while it waits; a frame that must wait for a borrow goes alone, as before.
    /// Each frame is checked again when its turn comes, since the writes before it may have
    /// waited; passes repeat until one finds nothing to write (frames turn writable again
    /// meanwhile: a write that completed after a change, or failed).
    async fn write_all_dirty_before(self: &Rc<Self>, barrier: u64, failures_at_start: u64) {
        let wanted = |t: &Table, block: u64, c: &Cold| {
            c.oldest_dirty_seq < barrier && !t.failed_since(block, failures_at_start)
        };
        let mut run: Vec<u32> = Vec::with_capacity(RUN_BLOCKS_MAX);
        loop {
            let order = self.table.borrow().writable_in_block_order(wanted);
            if order.is_empty() {
                return;
            }
            self.write_in_block_order(&order, &mut run, wanted).await;
        }
    }

    /// One pass of [`Inner::write_all_dirty_before`] over `order` (writable frames in block
    /// order, as the pass began).
    async fn write_in_block_order(
        self: &Rc<Self>,
        order: &[(u64, u32)],
        run: &mut Vec<u32>,
        wanted: impl Fn(&Table, u64, &Cold) -> bool + Copy,
    ) {
        let mut at = 0;
        while at < order.len() {
            let first = order[at].0;
            run.clear();
            {
                let table = self.table.borrow();
                for &(block, frame) in &order[at..] {
                    if block != first + run.len() as u64
                        || run.len() == RUN_BLOCKS_MAX
                        || !table.writable(frame, block, wanted)
                        || self.write_busy(frame)
                    {
                        break;
                    }
                    run.push(frame);
                }
            }
            // (A closed device has no buffer to give: then each frame goes alone, and fails.)
            let buf = (run.len() > 1)
                .then(|| self.queue.device().try_alloc_buf(run.len() * self.block_size))
                .flatten();
            if let Some(buf) = buf {
                at += run.len();
                self.write_run(first, run, buf).await;
                continue;
            }
            // One frame, or one whose bytes are borrowed: the single write, which waits.
            let (block, frame) = order[at];
            at += 1;
            if self.table.borrow_mut().try_schedule_write(frame, block, wanted) {
                self.write_frame(frame).await;
            }
        }
    }

    /// Whether a write of `frame` must wait before it copies the bytes: they are borrowed
    /// mutably (or, with an `on_write` hook, which changes the bytes and the aux data, at all).
    fn write_busy(&self, frame: u32) -> bool {
        if self.hooks.on_write.is_some() {
            self.arena.is_borrowed(frame) || self.aux_borrowed(frame)
        } else {
            self.arena.is_mut_borrowed(frame)
        }
    }

    /// Writes `frames`, which hold the adjacent blocks from `first`, are writable and whose
    /// bytes are not borrowed (checked by the caller with no await since), as one write from
    /// `buf` (of their length):
    /// schedules and copies them all in one step, then submits the write (see
    /// [`Inner::write_frame`] for one frame). Its completion ends each frame's write with its
    /// block's result (a failed run is written again block by block).
    async fn write_run(self: &Rc<Self>, first: u64, frames: &[u32], mut buf: D::Buf) {
        let bs = self.block_size;
        for (i, &frame) in frames.iter().enumerate() {
            let block = first + i as u64;
            self.table.borrow_mut().begin_write(frame);
            if let Some(hook) = &self.hooks.on_write {
                let mut data = self.arena.try_borrow_mut(frame).expect("checked not borrowed");
                let mut aux = self.try_aux_mut(frame).expect("checked not borrowed");
                hook(block, &mut data, &mut aux);
            }
            {
                let data = self.arena.try_borrow(frame).expect("checked not mutably borrowed");
                buf.as_bytes_mut()[i * bs..(i + 1) * bs].copy_from_slice(&data);
            }
            self.table.borrow_mut().take_snapshot(frame);
        }
        let mut guard = RunGuard { inner: self, frames, submitted: false };
        let inner = Rc::clone(self);
        let owned: Vec<u32> = frames.to_vec();
        let done = move |results: Vec<Result<()>>| {
            let mut table = inner.table.borrow_mut();
            for (&frame, result) in owned.iter().zip(results) {
                table.end_write(frame, result);
            }
            drop(table);
            inner.notify();
        };
        let blocks = frames.len() as u64;
        let submitted = self.queue.write_back_run_then(buf, first, blocks, done).await;
        debug_assert!(submitted.is_ok(), "installed frames' blocks are inside the device");
        guard.submitted = submitted.is_ok();
    }

    pub(super) async fn write_all_dirty(self: &Rc<Self>, barrier: u64) {
        let failures = self.table.borrow().failures();
        self.write_all_dirty_before(barrier, failures).await;
    }

    pub(super) fn maybe_start_background_writer(self: &Rc<Self>, dirty: usize) {
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
                    if table.unscheduled_dirty_count() <= inner.sizing.dirty_low {
                        None
                    } else {
                        table.schedule_next_write(&mut cursor, |t, block, _| {
                            t.write_error(block).is_none()
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

/// Most blocks a flush writes as one request (256 KiB of 4 KiB blocks).
pub(super) const RUN_BLOCKS_MAX: usize = 64;

/// [`WriteGuard`] for the frames of a run: each is given back as dirty if the run's write is
/// never submitted.
struct RunGuard<'a, D: Device + 'static, A: Default + 'static> {
    inner: &'a Inner<D, A>,
    frames: &'a [u32],
    submitted: bool,
}

impl<D: Device + 'static, A: Default + 'static> Drop for RunGuard<'_, D, A> {
    fn drop(&mut self) {
        if self.submitted {
            return;
        }
        let mut table = self.inner.table.borrow_mut();
        for &frame in self.frames {
            table.cancel_write(frame);
        }
        drop(table);
        self.inner.notify();
    }
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
