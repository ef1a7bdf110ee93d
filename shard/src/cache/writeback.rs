//! The write path of a partition: write snapshots of single frames, the `write_dirty` driver
//! with its barrier sequence number, the background writer, and the writes the eviction scan
//! starts.

use std::rc::Rc;

use super::partition::Inner;
use crate::error::Result;
use crate::io::Device;

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
        let needs_exclusive = self.hooks.on_write.is_some();
        let busy = |inner: &Self| {
            if needs_exclusive {
                inner.arena.is_borrowed(frame) || inner.aux_borrowed(frame)
            } else {
                inner.arena.is_mut_borrowed(frame)
            }
        };
        // Borrows end without a notification (they are plain guards), so poll: this only
        // happens when a caller holds a data borrow across an await.
        while busy(self) {
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
    /// The dirty list is walked with a cursor, so a pass is O(dirty frames), not O(n²): frames
    /// whose write was scheduled stay listed (WRITING) and keep their places, but a completed
    /// write removes its frame by swapping the last one into its slot, which may move a frame
    /// behind the cursor. So a pass that reaches the end starts over once, and only a pass
    /// from the start that finds nothing ends the walk.
    async fn write_all_dirty_before(self: &Rc<Self>, barrier: u64, failures_at_start: u64) {
        let mut cursor = 0;
        loop {
            let next = self.table.borrow_mut().schedule_next_write(&mut cursor, |t, block, c| {
                c.oldest_dirty_seq < barrier && !t.failed_since(block, failures_at_start)
            });
            match next {
                Some(frame) => self.write_frame(frame).await,
                None if cursor == 0 => return,
                None => cursor = 0,
            }
        }
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
