//! The frame arena: every buffer's bytes in one aligned allocation made when the partition
//! is built, plus a per-frame borrow flag (kept in the frame's [`Hot`] record, the cache line
//! a hit already touches) so that handing out `&[u8]` / `&mut [u8]` from it is sound.

use std::alloc::{self, Layout};
use std::cell::Cell;
use std::ptr::NonNull;
use std::rc::Rc;

use super::frame::Hot;

/// Alignment of every frame: a page, so any device's `O_DIRECT` alignment is met.
const FRAME_ALIGNMENT: usize = 4096;

/// `frame_count` frames of `frame_bytes` each.
///
/// Two invariants:
/// 1. The borrow flag of frame `i` (`hot[i]`) is 0 when the frame is not borrowed, `n > 0`
///    while `n` shared borrows are alive (at most `i16::MAX`), and -1 while one mutable borrow
///    is alive.
/// 2. Bytes of frame `i` are only reachable through a [`FrameRef`] or [`FrameMut`], which
///    maintain (1).
pub(crate) struct Arena {
    base: NonNull<u8>,
    layout: Layout,
    frame_bytes: usize,
    hot: Rc<[Hot]>,
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("frames", &self.hot.len())
            .field("frame_bytes", &self.frame_bytes)
            .finish()
    }
}

impl Arena {
    /// Allocates the arena, or `None` if the memory cannot be had (the caller turns that into
    /// a configuration error rather than letting the process abort).
    /// The arena of `hot.len()` frames, whose borrow flags live in `hot`.
    pub(crate) fn new(hot: Rc<[Hot]>, frame_bytes: usize) -> Option<Self> {
        let frame_count = hot.len();
        assert!(frame_count > 0 && frame_bytes > 0, "an arena has at least one non-empty frame");
        let size = frame_count.checked_mul(frame_bytes)?;
        let layout = Layout::from_size_align(size, FRAME_ALIGNMENT).ok()?;
        // SAFETY: the layout has a non-zero size (both factors are positive).
        let base = NonNull::new(unsafe { alloc::alloc_zeroed(layout) })?;
        Some(Arena { base, layout, frame_bytes, hot })
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
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: `base` came from `alloc_zeroed` with exactly this layout and is freed once.
        unsafe { alloc::dealloc(self.base.as_ptr(), self.layout) };
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
