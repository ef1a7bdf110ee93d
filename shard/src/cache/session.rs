//! Sessions (the deadlock rule's unit) and buffer handles: `read`, `get`, `new_block`,
//! `release_move`, and [`BufRef`] with its data, aux data and dirty marking.

use std::cell::Cell;
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use super::arena::{FrameMut, FrameRef};
use super::frame::flag;
use super::partition::{Inner, ReadGuard};
use super::table::Lookup;
use crate::error::{Error, Result};
use crate::io::Device;

/// A task's right to pin buffers: the unit of the deadlock rule. At most
/// `pins_per_session_max` buffers pinned through one session at once; a call that would pin
/// more fails with [`Error::PinLimit`] instead of risking a deadlock.
pub struct Session<D: Device + 'static, A: 'static = ()> {
    pub(super) inner: Rc<Inner<D, A>>,
    pub(super) held: Cell<usize>,
}

impl<D: Device, A> std::fmt::Debug for Session<D, A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("held", &self.held.get()).finish()
    }
}

impl<D: Device, A> Drop for Session<D, A> {
    fn drop(&mut self) {
        debug_assert_eq!(self.held.get(), 0, "handles borrow the session, so none outlives it");
        self.inner.end_session();
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

    /// The cached buffer of `block`, pinned, or `None` if it is absent or still being read.
    /// Never does I/O and never waits. Gets are not bounded by the session's pin limit (as in
    /// dm-bufio), but they are counted in [`Session::pinned`].
    #[inline]
    pub fn get(&self, block: u64) -> Option<BufRef<'_, D, A>> {
        let frame = self.inner.table.borrow_mut().try_hit(block)?;
        self.held.set(self.held.get() + 1);
        Some(BufRef { inner: &self.inner, held: Some(&self.held), frame, block })
    }

    /// The buffer of `block` with its data, pinned. A hit is served at the first poll, before
    /// anything asynchronous (one index probe, as [`Session::get`]). A miss reads the device;
    /// concurrent readers of one block share one read. Waits for a frame when every frame is
    /// busy.
    ///
    /// The future is small (a few words): the miss path's state machine, with the device
    /// read's, lives in a box made only on a miss, so awaiting a hit moves nothing large.
    pub fn read(&self, block: u64) -> impl Future<Output = Result<BufRef<'_, D, A>>> + '_ {
        ReadFuture { session: self, block, slow: None }
    }

    /// `read` past the fast path: checks, joins a read in flight, or reads the device.
    async fn read_slow(&self, block: u64) -> Result<BufRef<'_, D, A>> {
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
                        table.pin_hit(frame);
                        if !joined {
                            table.stats_mut().hits += 1;
                        }
                        drop(table);
                        return Ok(admission.into_handle(frame, block));
                    }
                    Lookup::Reading(_) if !joined => {
                        joined = true;
                        table.stats_mut().joins += 1;
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
                table.give_back(frame);
                return Ok(None);
            }
            table.install(frame, block, flag::READING, true);
            table.stats_mut().misses += 1;
        }
        let guard = ReadGuard::new(inner, frame);
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
                    table.pin_hit(frame);
                    table.stats_mut().hits += 1;
                    drop(table);
                    return Ok(admission.into_handle(frame, block));
                }
                Lookup::Reading(_) => inner.wait_change().await,
                Lookup::Absent => {
                    let frame = inner.alloc_frame().await?;
                    let mut table = inner.table.borrow_mut();
                    if table.lookup(block) != Lookup::Absent {
                        table.give_back(frame);
                        continue;
                    }
                    table.install(frame, block, flag::VALID, true);
                    table.stats_mut().news += 1;
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
        if inner.table.borrow().pins(frame) != 1 {
            return Err(Error::BufferBusy { block: old_block });
        }
        // Persist the old block's data, as dm-bufio does, before its frame changes identity.
        loop {
            let (writing, dirty) = {
                let table = inner.table.borrow();
                (table.has(frame, flag::WRITING), table.has(frame, flag::DIRTY))
            };
            if writing {
                inner.wait_change().await;
                continue;
            }
            if !dirty {
                break;
            }
            if let Some(e) = inner.table.borrow().write_error(old_block) {
                return Err(e.clone());
            }
            inner.table.borrow_mut().begin_write(frame);
            inner.write_frame(frame).await;
        }
        let mut table = inner.table.borrow_mut();
        // Checked again after the awaits above: a task that pinned the old block meanwhile
        // must not be left holding a handle of `old_block` on a buffer that now is `new_block`.
        if table.pins(frame) != 1 {
            return Err(Error::BufferBusy { block: old_block });
        }
        if let Lookup::Valid(other) | Lookup::Reading(other) = table.lookup(new_block) {
            if table.pins(other) > 0 || table.has(other, flag::READING | flag::WRITING) {
                return Err(Error::BufferBusy { block: new_block });
            }
            table.uninstall(other);
        }
        table.rehome(frame, new_block, inner.block_size);
        drop(table);
        drop(buf);
        inner.notify();
        Ok(())
    }
}

/// The future of [`Session::read`]: the hit path inline, the miss path boxed.
struct ReadFuture<'s, D: Device + 'static, A: Default + 'static> {
    session: &'s Session<D, A>,
    block: u64,
    slow: Option<SlowRead<'s, D, A>>,
}

type SlowRead<'s, D, A> = Pin<Box<dyn Future<Output = Result<BufRef<'s, D, A>>> + 's>>;

impl<'s, D: Device + 'static, A: Default + 'static> Future for ReadFuture<'s, D, A> {
    type Output = Result<BufRef<'s, D, A>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self; // Unpin: every field is
        let (session, block) = (this.session, this.block);
        if this.slow.is_none() && session.held.get() < session.inner.pins_per_session_max {
            if let Some(buf) = session.get(block) {
                return Poll::Ready(Ok(buf));
            }
        }
        let slow = this.slow.get_or_insert_with(|| Box::pin(session.read_slow(block)));
        slow.as_mut().poll(cx)
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
        BufRef { inner: &session.inner, held: Some(&session.held), frame, block }
    }
}

impl<D: Device + 'static, A: Default + 'static> Drop for Admission<'_, D, A> {
    fn drop(&mut self) {
        self.session.held.set(self.session.held.get() - 1);
    }
}

/// A pinned buffer: the block's bytes stay in memory, and are never evicted, while it lives.
/// Dropping it releases the pin. It borrows its [`Session`] (or, from
/// [`Partition::get`](super::Partition::get), its partition), so it cannot outlive it.
pub struct BufRef<'s, D: Device + 'static, A: Default + 'static = ()> {
    pub(super) inner: &'s Rc<Inner<D, A>>,
    /// The session's count of pins, or `None` for a session-less `Partition::get`.
    pub(super) held: Option<&'s Cell<usize>>,
    pub(super) frame: u32,
    pub(super) block: u64,
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
        self.inner.block_size
    }

    /// The buffer's bytes.
    ///
    /// # Panics
    /// If the bytes are borrowed mutably elsewhere (like `RefCell::borrow`); see
    /// [`BufRef::try_data`].
    #[inline]
    pub fn data(&self) -> FrameRef<'_> {
        self.try_data().expect("buffer data is mutably borrowed elsewhere")
    }

    /// The buffer's bytes, or [`Error::BufferBusy`] while they are borrowed mutably.
    #[inline]
    pub fn try_data(&self) -> Result<FrameRef<'_>> {
        self.inner.arena.try_borrow(self.frame).ok_or(Error::BufferBusy { block: self.block })
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
        let borrowed = self.inner.arena.try_borrow_mut(self.frame);
        borrowed.ok_or(Error::BufferBusy { block: self.block })
    }

    /// The caller's aux data of this buffer, borrowed mutably until the guard is dropped.
    ///
    /// # Panics
    /// If it is borrowed already (like `RefCell::borrow_mut`).
    pub fn aux(&self) -> AuxMut<'_, A> {
        self.inner.try_aux_mut(self.frame).expect("buffer aux data is borrowed elsewhere")
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
        let inner = self.inner;
        let dirty = {
            let mut table = inner.table.borrow_mut();
            table.mark_dirty(self.frame, range.start, range.end);
            table.dirty_count()
        };
        inner.maybe_start_background_writer(dirty);
    }

    /// Turns this pin into a [`Lent`]: the buffer stays pinned, and its bytes readable and
    /// unchanged, until the loan is dropped, however long that is. The pin leaves the session
    /// (as [`Partition::get`](super::Partition::get)'s pins are outside any). Fails with
    /// [`Error::BufferBusy`] while the bytes are borrowed mutably.
    pub fn lend(self) -> Result<Lent<D, A>> {
        let Some(ptr) = self.inner.arena.share(self.frame) else {
            return Err(Error::BufferBusy { block: self.block });
        };
        if let Some(held) = self.held {
            held.set(held.get() - 1);
        }
        let lent = Lent {
            inner: Rc::clone(self.inner),
            frame: self.frame,
            block: self.block,
            ptr,
            len: self.inner.block_size,
        };
        // The pin moves to the loan, which unpins on drop.
        std::mem::forget(self);
        Ok(lent)
    }

    /// Whether the buffer holds modifications not yet written.
    pub fn is_dirty(&self) -> bool {
        self.inner.table.borrow().has(self.frame, flag::DIRTY)
    }

    /// The recorded dirty byte range, if the buffer is dirty.
    pub fn dirty_range(&self) -> Option<Range<usize>> {
        self.inner.table.borrow().dirty_range(self.frame)
    }
}

impl<D: Device + 'static, A: Default + 'static> Drop for BufRef<'_, D, A> {
    #[inline]
    fn drop(&mut self) {
        let inner = self.inner;
        if let Some(held) = self.held {
            held.set(held.get() - 1);
        }
        let unpinned = inner.table.borrow_mut().unpin(self.frame);
        if unpinned && inner.changes.has_waiters() {
            inner.notify();
        }
    }
}

/// A buffer lent out by [`BufRef::lend`]: pinned, and its bytes shared-borrowed (so no
/// [`BufRef::try_data_mut`] succeeds and nothing rewrites them), until it is dropped. It owns
/// its hold on the partition, so it may outlive any session or borrow.
///
/// It is how a shard shows a block to a reader on another thread without copying it: the
/// owner keeps the `Lent` (it is not `Send`) and hands out [`Lent::as_ptr`]; the bytes stay
/// valid and unchanged until the owner drops the loan, which it must do only after the reader
/// is done (with the happens-before edges of a message each way).
pub struct Lent<D: Device + 'static, A: Default + 'static = ()> {
    inner: Rc<Inner<D, A>>,
    frame: u32,
    block: u64,
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

impl<D: Device, A: Default> std::fmt::Debug for Lent<D, A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lent").field("block", &self.block).finish()
    }
}

impl<D: Device + 'static, A: Default + 'static> Lent<D, A> {
    /// The block number.
    pub fn block(&self) -> u64 {
        self.block
    }

    /// The first of the block's bytes: valid for [`Lent::len`] bytes, and unchanged, while the
    /// loan lives.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// The block size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a block has bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The block's bytes.
    pub fn data(&self) -> &[u8] {
        // SAFETY: the loan holds a shared borrow of the frame (no mutable view of it exists
        // or can be made while it lives) and the partition's memory (via `inner`).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<D: Device + 'static, A: Default + 'static> Drop for Lent<D, A> {
    fn drop(&mut self) {
        let inner = &self.inner;
        inner.arena.unshare(self.frame);
        let unpinned = inner.table.borrow_mut().unpin(self.frame);
        if unpinned && inner.changes.has_waiters() {
            inner.notify();
        }
    }
}

/// A mutable borrow of a buffer's aux data (from [`BufRef::aux`]); the borrow ends when it is
/// dropped.
pub struct AuxMut<'a, A> {
    pub(super) value: &'a mut A,
    pub(super) hot: &'a super::frame::Hot,
}

impl<A: std::fmt::Debug> std::fmt::Debug for AuxMut<'_, A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.value.fmt(f)
    }
}

impl<A> std::ops::Deref for AuxMut<'_, A> {
    type Target = A;
    fn deref(&self) -> &A {
        self.value
    }
}

impl<A> std::ops::DerefMut for AuxMut<'_, A> {
    fn deref_mut(&mut self) -> &mut A {
        self.value
    }
}

impl<A> Drop for AuxMut<'_, A> {
    fn drop(&mut self) {
        self.hot.clear_flags(flag::AUX_BORROWED);
    }
}
