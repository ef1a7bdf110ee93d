//! Per-frame metadata, split by temperature.
//!
//! - [`Hot`] (16 bytes, one per frame, 16-byte aligned so it never straddles a cache line):
//!   everything a cache hit reads or writes — the block number (the index's key), the pin
//!   count, the state bits, the policy's frequency and queue tag, and the data borrow flag.
//!   A hit touches one index slot and one `Hot`, nothing else.
//! - [`Cold`] (24 bytes): what only the write path needs — the modification sequence numbers,
//!   the dirty byte range and the slot in the dirty list.
//!
//! `Hot` is made of `Cell`s so that the table (state changes), the arena (the data borrow
//! flag) and the partition (the aux borrow bit) can share one array without aliasing `&mut`.
//! Who writes what:
//! 1. `block`, `pins`, the state bits of `flags`: only [`Table`](super::table::Table) methods.
//! 2. `policy`: only the eviction policy ([`S3Fifo`](super::policy::S3Fifo)).
//! 3. `borrow`: only the [`Arena`](super::arena::Arena)'s borrow guards.
//! 4. the `AUX_BORROWED` bit of `flags`: only the aux guard; the table never clears it by
//!    overwriting `flags` while it is set (it only overwrites the flags of unpinned frames,
//!    and an aux guard lives inside a pin).

use std::cell::Cell;

pub(crate) const NIL: u32 = u32::MAX;
pub(crate) const SEQ_NONE: u64 = u64::MAX;

/// Frame state bits.
pub(crate) mod flag {
    /// Installed and holding the block's data.
    pub(crate) const VALID: u8 = 1;
    /// Installed, the device read in flight: invisible to `get`, joined by `read`.
    pub(crate) const READING: u8 = 2;
    /// Modified since the last write snapshot.
    pub(crate) const DIRTY: u8 = 4;
    /// A write is scheduled or in flight (at most one per frame).
    pub(crate) const WRITING: u8 = 8;
    /// The write in flight was started by the eviction scan: the frame was a victim kept
    /// only because it was dirty.
    pub(crate) const EVICT_WRITE: u8 = 16;
    /// Listed in the ready victims: its eviction write completed and left it clean.
    pub(crate) const READY: u8 = 32;
    /// The caller's aux data of this frame is borrowed (by a `BufRef::aux` guard or a hook).
    pub(crate) const AUX_BORROWED: u8 = 64;
}

/// What a cache hit touches, and nothing more: 16 bytes.
#[derive(Debug)]
#[repr(C, align(16))]
pub(crate) struct Hot {
    block: Cell<u64>,
    pins: Cell<u32>,
    /// The data borrow flag: `n > 0` shared borrows, -1 one mutable borrow, 0 none.
    borrow: Cell<i16>,
    flags: Cell<u8>,
    /// The policy's byte: frequency in bits 0–1, queue tag in bits 2–3.
    policy: Cell<u8>,
}

const _: () = assert!(std::mem::size_of::<Hot>() == 16);

impl Hot {
    pub(crate) const fn empty() -> Hot {
        Hot {
            block: Cell::new(u64::MAX),
            pins: Cell::new(0),
            borrow: Cell::new(0),
            flags: Cell::new(0),
            policy: Cell::new(0),
        }
    }

    #[inline]
    pub(crate) fn block(&self) -> u64 {
        self.block.get()
    }

    #[inline]
    pub(crate) fn pins(&self) -> u32 {
        self.pins.get()
    }

    #[inline]
    pub(crate) fn flags(&self) -> u8 {
        self.flags.get()
    }

    #[inline]
    pub(crate) fn has(&self, bits: u8) -> bool {
        self.flags.get() & bits != 0
    }

    // Table-only writers (rule 1).

    #[inline]
    pub(super) fn set_block(&self, block: u64) {
        self.block.set(block);
    }

    #[inline]
    pub(super) fn set_pins(&self, pins: u32) {
        self.pins.set(pins);
    }

    #[inline]
    pub(super) fn set_flags(&self, flags: u8) {
        self.flags.set(flags);
    }

    #[inline]
    pub(super) fn add_flags(&self, bits: u8) {
        self.flags.set(self.flags.get() | bits);
    }

    #[inline]
    pub(super) fn clear_flags(&self, bits: u8) {
        self.flags.set(self.flags.get() & !bits);
    }

    // Policy-only (rule 2).

    #[inline]
    pub(super) fn policy(&self) -> u8 {
        self.policy.get()
    }

    #[inline]
    pub(super) fn set_policy(&self, value: u8) {
        self.policy.set(value);
    }

    // Arena-only (rule 3).

    #[inline]
    pub(super) fn borrow_flag(&self) -> &Cell<i16> {
        &self.borrow
    }
}

/// An array of `Hot` records, all empty.
pub(crate) fn hot_array(frame_count: usize) -> Option<std::rc::Rc<[Hot]>> {
    let mut v = Vec::new();
    v.try_reserve_exact(frame_count).ok()?;
    v.resize_with(frame_count, Hot::empty);
    Some(v.into())
}

/// What only the write path needs: 24 bytes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cold {
    /// The sequence number of the earliest modification not captured by a write snapshot
    /// (`SEQ_NONE` when clean).
    pub(crate) oldest_dirty_seq: u64,
    /// The earliest modification the write in flight carries (`SEQ_NONE` until its snapshot).
    pub(crate) writing_oldest_seq: u64,
    /// The frame's slot in the dirty list, or `NIL`.
    pub(crate) dirty_pos: u32,
    pub(crate) dirty_start: u16,
    /// End of the dirty range minus one (so a 64 KiB block fits in 16 bits).
    pub(crate) dirty_last: u16,
}

const _: () = assert!(std::mem::size_of::<Cold>() == 24);

impl Cold {
    pub(crate) const EMPTY: Cold = Cold {
        oldest_dirty_seq: SEQ_NONE,
        writing_oldest_seq: SEQ_NONE,
        dirty_pos: NIL,
        dirty_start: 0,
        dirty_last: 0,
    };
}
