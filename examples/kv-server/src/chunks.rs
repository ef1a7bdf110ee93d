//! One shard's side of large values: the chunk records it owns (written, read, checked and
//! deleted in per-shard batches), the tags it draws for new large values, and the pin table
//! that keeps a value's chunks alive while a connection streams them.
//!
//! The cross-shard orchestration (windows, manifests, frees) is in `large.rs`.

use std::cell::{Cell, RefCell};

use corebuf_shard::WaitList;
use hashbrown::HashMap;

use crate::format::{self, rflags, Manifest};
use crate::store::{Cond, KvError, KvResult, KvShard, Space};

/// Readers and frees of one tag ([`PinTable`]).
#[derive(Debug, Default, Clone, Copy)]
struct Pin {
    /// Connections streaming this value's chunks now.
    readers: u32,
    /// Frees of this value's chunks in progress (normally 0 or 1).
    doomed: u32,
}

/// The large values whose chunks are being read or freed, by tag, on the shard that owns the
/// tag's chunk 0 (whatever shard the key's manifest lives on, so RENAME does not move it).
///
/// Two invariants:
/// 1. A tag is never pinned and doomed at once: [`PinTable::doom`] waits until no reader is
///    left, and [`PinTable::pin`] refuses a doomed tag. So a reader that pinned sees every
///    chunk until it unpins.
/// 2. Entries exist only while a reader or a free is in progress: the table holds at most one
///    entry per streaming connection and per free in flight.
#[derive(Debug, Default)]
pub struct PinTable {
    pins: RefCell<HashMap<u64, Pin>>,
    changed: WaitList,
}

impl PinTable {
    /// Pins `tag` for a reader; `false` if its chunks are being freed (the reader re-reads
    /// the key's manifest).
    pub fn pin(&self, tag: u64) -> bool {
        let mut pins = self.pins.borrow_mut();
        let pin = pins.entry(tag).or_default();
        if pin.doomed > 0 {
            return false;
        }
        pin.readers += 1;
        true
    }

    /// Ends a reader's pin of `tag`.
    pub fn unpin(&self, tag: u64) {
        let mut pins = self.pins.borrow_mut();
        if let Some(pin) = pins.get_mut(&tag) {
            pin.readers = pin.readers.saturating_sub(1);
            if pin.readers == 0 && pin.doomed == 0 {
                pins.remove(&tag);
            }
        }
        drop(pins);
        self.changed.notify_all();
    }

    /// Waits until no reader pins `tag`, then marks it doomed (new pins are refused until
    /// [`PinTable::undoom`]).
    pub async fn doom(&self, tag: u64) {
        self.changed
            .wait_for(|| {
                let mut pins = self.pins.borrow_mut();
                let pin = pins.entry(tag).or_default();
                (pin.readers == 0).then(|| pin.doomed += 1)
            })
            .await;
    }

    /// Ends a free of `tag`'s chunks.
    pub fn undoom(&self, tag: u64) {
        let mut pins = self.pins.borrow_mut();
        if let Some(pin) = pins.get_mut(&tag) {
            pin.doomed = pin.doomed.saturating_sub(1);
            if pin.readers == 0 && pin.doomed == 0 {
                pins.remove(&tag);
            }
        }
    }

    /// Tags with an entry now (for INFO).
    pub fn len(&self) -> usize {
        self.pins.borrow().len()
    }
}

/// The per-shard source of large-value tags: a random base (per run and shard) plus a
/// counter, through a bijective mixer, so tags never repeat within a run and collide across
/// runs or shards only by chance (2^-64 per pair of tags).
#[derive(Debug)]
pub struct TagSource {
    base: u64,
    next: Cell<u64>,
}

impl TagSource {
    /// The source of shard `shard` in a run whose random seed is `seed`.
    pub fn new(seed: u64, shard: usize) -> TagSource {
        TagSource {
            base: format::mix64(seed ^ format::mix64(shard as u64 + 1)),
            next: Cell::new(0),
        }
    }

    /// A fresh tag.
    pub fn next(&self) -> u64 {
        let n = self.next.get();
        self.next.set(n + 1);
        format::mix64(self.base.wrapping_add(n << 8))
    }
}

impl KvShard {
    /// Whether this shard owns chunk `index` of the value with `tag`.
    pub fn owns_chunk(&self, tag: u64, index: u32) -> bool {
        self.owner_of_key(&format::chunk_key(tag, index)) == self.shard.id()
    }

    /// Writes chunk `index` of the value with `tag` (a record under its chunk key, logged).
    pub async fn put_chunk(&self, tag: u64, index: u32, data: &[u8]) -> KvResult<()> {
        let key = format::chunk_key(tag, index);
        self.set_full(&key, data, 0, Cond::Always, rflags::CHUNK).await?;
        self.counters.chunks_written.set(self.counters.chunks_written.get() + 1);
        Ok(())
    }

    /// Writes chunks of the value with `tag`, in order; stops at the first error.
    pub async fn put_chunks(&self, tag: u64, chunks: Vec<(u32, Vec<u8>)>) -> KvResult<()> {
        for (index, data) in chunks {
            self.put_chunk(tag, index, &data).await?;
        }
        Ok(())
    }

    /// Chunk `index` of `m`, checked for its length; `None` if it is missing.
    pub async fn get_chunk(&self, m: &Manifest, index: u32) -> KvResult<Option<Vec<u8>>> {
        let key = format::chunk_key(m.tag, index);
        let entry = self.get_entry_in(&key, Space::Chunk).await?;
        self.counters.chunks_read.set(self.counters.chunks_read.get() + 1);
        Ok(entry.map(|e| e.value).filter(|v| v.len() == m.chunk_len(index)))
    }

    /// Chunks `indexes` of `m` (as [`KvShard::get_chunk`]), in order; stops at the first error.
    pub async fn get_chunks(
        &self,
        m: Manifest,
        indexes: Vec<u32>,
    ) -> KvResult<Vec<Option<Vec<u8>>>> {
        let mut out = Vec::with_capacity(indexes.len());
        for index in indexes {
            out.push(self.get_chunk(&m, index).await?);
        }
        Ok(out)
    }

    /// The first of chunks `range` of `m` that this shard owns and that is missing or has the
    /// wrong length (the chunk records are looked up; their extents are not read).
    pub async fn missing_chunk(
        &self,
        m: Manifest,
        range: std::ops::Range<u32>,
    ) -> KvResult<Option<u32>> {
        for index in range {
            if !self.owns_chunk(m.tag, index) {
                continue;
            }
            let key = format::chunk_key(m.tag, index);
            if self.chunk_len(&key).await? != Some(m.chunk_len(index)) {
                return Ok(Some(index));
            }
        }
        Ok(None)
    }

    /// Deletes the chunks of `m` this shard owns (those that exist); returns how many.
    pub async fn del_chunks(&self, m: Manifest) -> KvResult<u64> {
        let mut deleted = 0;
        for index in 0..m.count {
            if !self.owns_chunk(m.tag, index) {
                continue;
            }
            let key = format::chunk_key(m.tag, index);
            if self.del_full(&key, Space::Chunk).await?.0 {
                deleted += 1;
            }
        }
        self.counters.chunks_deleted.set(self.counters.chunks_deleted.get() + deleted);
        Ok(deleted)
    }

    /// Frees `orphan`'s chunks in a task of its own (writes that have no connection to wait
    /// for it: the expiry sweep; not while the log is replayed, whose chunk deletions are
    /// records of their own).
    pub fn free_in_background(&self, orphan: Option<Manifest>) {
        let Some(m) = orphan else { return };
        if self.is_replaying() {
            return;
        }
        let owner = self.shard.id();
        glommio::spawn_local(async move {
            let kv = KvShard::current();
            crate::large::free_chunks(&kv, crate::large::Orphan { manifest: m, owner }).await;
        })
        .detach();
    }
}

/// Maps a remote shard's failure to run an operation into the store's error.
pub fn remote_error(e: impl std::fmt::Display) -> KvError {
    KvError::Engine(format!("shard unavailable: {e}"))
}
