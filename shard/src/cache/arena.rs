//! The frame arena: every buffer's bytes in one aligned allocation made when the partition
//! is built, plus a per-frame borrow flag (kept in the frame's [`Hot`] record, the cache line
//! a hit already touches) so that handing out `&[u8]` / `&mut [u8]` from it is sound.
//!
//! **Huge pages**: an arena of 2 MiB or more is 2 MiB aligned and advised `MADV_HUGEPAGE`,
//! so random hits over a large cache do not each pay a TLB miss and a page walk.
//!
//! (Colouring frames, shifting each by a multiple of 64 bytes so that block headers do not
//! all fall into the same few CPU cache sets, was measured too: it costs 64 bytes of padding
//! per frame, and with huge pages and tagged index slots it made no difference outside the
//! noise of this machine, so frames stay page-aligned.)

use std::alloc::{self, Layout};
use std::cell::Cell;
use std::ptr::NonNull;
use std::rc::Rc;

use super::frame::Hot;
use crate::io::ReadTarget;
use crate::wait::Changes;

/// Alignment of every frame: a page, so a device could DMA straight into one.
const FRAME_ALIGNMENT: usize = 4096;
/// The arena's alignment when it is at least this large: a huge page.
const HUGE_PAGE_BYTES: usize = 2 << 20;
/// Bytes per CPU cache line (the step of [`Arena::prefetch`]).
const CACHE_LINE: usize = 64;

/// `frame_count` frames of `frame_bytes` each.
///
/// Two invariants:
/// 1. The borrow flag of frame `i` (`hot[i]`) is 0 when the frame is not borrowed, `n > 0`
///    while `n` shared borrows are alive (at most `i16::MAX`), and -1 while one mutable borrow
///    is alive.
/// 2. Bytes of frame `i` are only reachable through a [`FrameRef`], a [`FrameMut`] or a loan
///    to a device read ([`Arena::lend`]), which maintain (1).
pub(crate) struct Arena {
    /// `memory`'s address, kept here so that a hit reaches a frame without a second load.
    base: NonNull<u8>,
    memory: Rc<Memory>,
    frame_bytes: usize,
    hot: Rc<[Hot]>,
}

/// The frames' allocation, shared with the loans of reads in flight ([`Arena::lend`]) so that
/// it outlives every read the kernel may still be doing into it.
struct Memory {
    base: NonNull<u8>,
    layout: Layout,
}

impl Drop for Memory {
    fn drop(&mut self) {
        // SAFETY: `base` came from `alloc` with exactly this layout and is freed once, when
        // neither the arena nor any loan refers to it any more.
        unsafe { alloc::dealloc(self.base.as_ptr(), self.layout) };
    }
}

/// A frame lent to a device read: the frame stays mutably borrowed (its flag -1, invariant 1)
/// until the device drops this, which it does once the kernel is done with the memory.
struct Loan {
    _memory: Rc<Memory>,
    hot: Rc<[Hot]>,
    index: u32,
    /// Notified when the loan ends: a task may wait for a frame, and an orphan is one.
    ended: Rc<Changes>,
}

impl Drop for Loan {
    fn drop(&mut self) {
        self.hot[self.index as usize].borrow_flag().set(0);
        self.ended.notify();
    }
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("frames", &self.hot.len())
            .field("frame_bytes", &self.frame_bytes)
            .finish()
    }
}

/// Why an arena could not be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ArenaError {
    /// The buffers' memory could not be allocated.
    Buffers,
    /// The per-frame records could not be allocated.
    Metadata,
}

impl Arena {
    /// The arena of `hot.len()` frames of `frame_bytes`, whose borrow
    /// flags live in `hot`; zeroed. `None` if the memory cannot be had (the caller turns that
    /// into a configuration error rather than letting the process abort).
    ///
    /// The buffers are allocated first and `make_hot` is called only once they are had: a
    /// cache size the machine cannot hold fails on the one big allocation, before any
    /// per-frame array is written (writing those would get the process killed instead).
    pub(crate) fn new(
        frame_count: usize,
        frame_bytes: usize,
        make_hot: impl FnOnce() -> Option<Rc<[Hot]>>,
    ) -> Result<Self, ArenaError> {
        assert!(frame_count > 0 && frame_bytes > 0, "an arena has at least one non-empty frame");
        let size = frame_count.checked_mul(frame_bytes).ok_or(ArenaError::Buffers)?;
        let align = if size >= HUGE_PAGE_BYTES { HUGE_PAGE_BYTES } else { FRAME_ALIGNMENT };
        let layout = Layout::from_size_align(size, align).map_err(|_| ArenaError::Buffers)?;
        // SAFETY: the layout has a non-zero size (both factors are positive).
        let base = NonNull::new(unsafe { alloc::alloc(layout) }).ok_or(ArenaError::Buffers)?;
        if align == HUGE_PAGE_BYTES {
            // A hint: where transparent huge pages are off, the kernel ignores it.
            // SAFETY: madvise on memory this arena owns; it changes no contents.
            unsafe { libc::madvise(base.as_ptr().cast(), size, libc::MADV_HUGEPAGE) };
        }
        // SAFETY: `base` points at `size` writable bytes just allocated; zeroing them after the
        // advice lets the first touch fault in huge pages.
        unsafe { std::ptr::write_bytes(base.as_ptr(), 0, size) };
        let Some(hot) = make_hot().filter(|hot| hot.len() == frame_count) else {
            // SAFETY: `base` came from `alloc` with this layout and is not used again.
            unsafe { alloc::dealloc(base.as_ptr(), layout) };
            return Err(ArenaError::Metadata);
        };
        Ok(Arena { base, memory: Rc::new(Memory { base, layout }), frame_bytes, hot })
    }

    /// The frames' hot records (the arena keeps their borrow flags).
    pub(crate) fn hot(&self) -> Rc<[Hot]> {
        Rc::clone(&self.hot)
    }

    #[inline]
    fn flag(&self, index: u32) -> &Cell<i16> {
        self.hot[index as usize].borrow_flag()
    }

    /// Whether frame `index` is mutably borrowed now.
    pub(crate) fn is_mut_borrowed(&self, index: u32) -> bool {
        self.flag(index).get() < 0
    }

    /// Whether frame `index` is borrowed at all now.
    pub(crate) fn is_borrowed(&self, index: u32) -> bool {
        self.flag(index).get() != 0
    }

    #[inline]
    fn frame_ptr(&self, index: u32) -> *mut u8 {
        assert!((index as usize) < self.hot.len(), "frame index in range");
        // SAFETY: index < frame_count, so the offset stays inside the allocation.
        unsafe { self.base.as_ptr().add(index as usize * self.frame_bytes) }
    }

    /// Asks the CPU to start loading the first `bytes` of frame `index` (a hint; an index out
    /// of range is ignored).
    #[inline]
    pub(crate) fn prefetch(&self, index: u32, bytes: usize) {
        if index as usize >= self.hot.len() {
            return;
        }
        let frame = self.frame_ptr(index);
        for offset in (0..bytes.min(self.frame_bytes)).step_by(CACHE_LINE) {
            super::prefetch_read(frame.wrapping_add(offset));
        }
    }

    /// A shared view of frame `index`, or `None` while it is mutably borrowed (or borrowed
    /// `i16::MAX` times already).
    #[inline]
    pub(crate) fn try_borrow(&self, index: u32) -> Option<FrameRef<'_>> {
        let flag = self.flag(index);
        if flag.get() < 0 || flag.get() == i16::MAX {
            return None;
        }
        flag.set(flag.get() + 1);
        // SAFETY: the flag now records a shared borrow, so no `FrameMut` of this frame exists
        // or can be made until this one is dropped (invariant 1); the pointer is in bounds and
        // the arena outlives the returned reference.
        let bytes = unsafe { std::slice::from_raw_parts(self.frame_ptr(index), self.frame_bytes) };
        Some(FrameRef { bytes, flag })
    }

    /// Records a shared borrow of frame `index` that no guard ends: [`Arena::unshare`] does.
    /// Returns the frame's first byte, or `None` while it is mutably borrowed (or borrowed
    /// `i16::MAX` times already). For a [`Lent`](super::Lent) buffer, whose bytes are read
    /// through the pointer, maybe on another thread, until the loan ends.
    pub(crate) fn share(&self, index: u32) -> Option<NonNull<u8>> {
        let flag = self.flag(index);
        if flag.get() < 0 || flag.get() == i16::MAX {
            return None;
        }
        flag.set(flag.get() + 1);
        NonNull::new(self.frame_ptr(index))
    }

    /// Ends a shared borrow recorded by [`Arena::share`].
    pub(crate) fn unshare(&self, index: u32) {
        let flag = self.flag(index);
        debug_assert!(flag.get() > 0, "unshare of a frame not shared");
        flag.set(flag.get() - 1);
    }

    /// An exclusive view of frame `index`, or `None` while it is borrowed.
    #[inline]
    pub(crate) fn try_borrow_mut(&self, index: u32) -> Option<FrameMut<'_>> {
        let flag = self.flag(index);
        if flag.get() != 0 {
            return None;
        }
        flag.set(-1);
        // SAFETY: the flag was 0 (no borrow alive) and now records this exclusive borrow, so no
        // other reference to these bytes exists until it is dropped (invariant 1).
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(self.frame_ptr(index), self.frame_bytes) };
        Some(FrameMut { bytes, flag })
    }

    /// Lends frame `index` to a device read, or `None` while it is borrowed. The frame counts
    /// as mutably borrowed until the device drops the loan, which may be after the read's
    /// future is gone (the kernel may still be writing the frame then).
    /// `ended` is notified when the loan ends.
    pub(crate) fn lend(&self, index: u32, ended: &Rc<Changes>) -> Option<ReadTarget> {
        let flag = self.flag(index);
        if flag.get() != 0 {
            return None;
        }
        flag.set(-1);
        let loan = Loan {
            _memory: Rc::clone(&self.memory),
            hot: Rc::clone(&self.hot),
            index,
            ended: Rc::clone(ended),
        };
        let ptr = NonNull::new(self.frame_ptr(index)).expect("frames are inside the arena");
        // SAFETY: the flag was 0 and now records an exclusive borrow that only the loan's drop
        // ends (invariant 1), so nothing else reaches these bytes while it lives; the loan
        // holds the allocation, so the bytes stay valid as long.
        Some(unsafe { ReadTarget::new(ptr, self.frame_bytes, Box::new(loan)) })
    }
}

/// A shared borrow of a frame's bytes.
#[derive(Debug)]
pub struct FrameRef<'a> {
    bytes: &'a [u8],
    flag: &'a Cell<i16>,
}

impl std::ops::Deref for FrameRef<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.bytes
    }
}

impl Drop for FrameRef<'_> {
    fn drop(&mut self) {
        self.flag.set(self.flag.get() - 1);
    }
}

/// An exclusive borrow of a frame's bytes.
#[derive(Debug)]
pub struct FrameMut<'a> {
    bytes: &'a mut [u8],
    flag: &'a Cell<i16>,
}

impl std::ops::Deref for FrameMut<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.bytes
    }
}

impl std::ops::DerefMut for FrameMut<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.bytes
    }
}

impl Drop for FrameMut<'_> {
    fn drop(&mut self) {
        self.flag.set(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: frames must not overlap (a colouring experiment once placed frame 64 over
    /// the tail of frame 63, and corrupted data only in caches of more than 64 frames).
    #[test]
    fn every_frame_keeps_its_own_bytes() {
        for (frames, bytes) in [(130, 4096), (3, 512), (600, 8192)] {
            let arena =
                Arena::new(frames, bytes, || crate::cache::frame::hot_array(frames)).unwrap();
            for i in 0..frames as u32 {
                let mut frame = arena.try_borrow_mut(i).unwrap();
                assert_eq!(frame.len(), bytes);
                assert!(frame.iter().all(|&b| b == 0), "frame {i} starts zeroed");
                frame.fill(i as u8 ^ 0x5a);
            }
            for i in 0..frames as u32 {
                let frame = arena.try_borrow(i).unwrap();
                assert!(frame.iter().all(|&b| b == i as u8 ^ 0x5a), "frame {i} of {frames}");
            }
        }
    }

    #[test]
    fn borrow_flags_exclude_a_writer_while_read_and_readers_while_written() {
        let arena = Arena::new(2, 512, || crate::cache::frame::hot_array(2)).unwrap();
        let shared = arena.try_borrow(0).unwrap();
        assert!(arena.try_borrow_mut(0).is_none() && arena.is_borrowed(0));
        assert!(arena.try_borrow_mut(1).is_some(), "frames are independent");
        drop(shared);
        let exclusive = arena.try_borrow_mut(0).unwrap();
        assert!(arena.try_borrow(0).is_none() && arena.is_mut_borrowed(0));
        drop(exclusive);
        assert!(!arena.is_borrowed(0));
    }
}
