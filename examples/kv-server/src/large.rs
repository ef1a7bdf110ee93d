//! Large values: values longer than one record ([`MAX_VALUE`], 64 KiB) up to Redis's
//! `proto-max-bulk-len` ([`PROTO_MAX_BULK`], 512 MiB), stored as chunk records under chunk keys
//! derived from a random per-write tag (so they spread over ranges and shards like any keys),
//! with a small [`Manifest`] in the user key's record. FORMAT.md, "Large values", has the bytes.
//!
//! This module runs on whichever shard drives the operation (a connection's, or a key's owner)
//! and reaches the chunk owners with one message per owner per window of chunks.
//!
//! # Ordering (what makes a crash safe; reordering breaks it)
//! 1. Every chunk is written and its owner's log committed (whatever `--fsync` says) before the
//!    manifest naming it is written: a manifest that a crash kept never names a lost chunk.
//! 2. A manifest's removal (overwrite, DEL, expiry) is committed to its owner's log before any of
//!    its chunks is deleted: a crash never keeps a manifest whose chunks are gone.
//! 3. Chunks are deleted only once no connection streams them ([`crate::chunks::PinTable`]).
//!
//! A crash between 1 and the manifest, or between 2 and the deletes, leaks the chunks (space
//! that nothing names; README, "Limits").

use std::borrow::Cow;
use std::future::Future;
use std::rc::Rc;

use crate::chunks::remote_error;
use crate::format::{self, Manifest, MAX_VALUE, PROTO_MAX_BULK};
use crate::server::OpOut;
use crate::store::{Entry, KvError, KvResult, KvShard, Write};

/// Chunk bytes one large operation (a SET's writes, a GET's reads) has in flight at most: the
/// bound of its memory beyond the connection's buffers.
pub const WINDOW_BYTES_MAX: usize = 1 << 20;
/// Times APPEND / SETRANGE of a large value start over when another writer changed the key
/// while they copied it.
pub const EDIT_ATTEMPTS_MAX: usize = 8;

/// A large value whose manifest a write removed: its chunks are to be freed (after the removal,
/// on the key's owner `owner`, is durable).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Orphan {
    /// The removed manifest.
    pub manifest: Manifest,
    /// The shard that owns the key (whose log holds the removal).
    pub owner: usize,
}

/// A large value (or a byte range of one) that a reply streams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LargeRef {
    /// The user key (named in errors).
    pub key: Vec<u8>,
    /// Its manifest.
    pub manifest: Manifest,
    /// First byte of the reply.
    pub start: u64,
    /// Bytes of the reply.
    pub len: u64,
    /// GETRANGE's arguments (`None` for the whole value), to answer again from a newer value.
    pub range: Option<(i64, i64)>,
    /// Whether the reply may re-read the key when the chunks are gone (a read: another writer
    /// may have replaced the value since); `false` for a value the operation itself removed.
    pub reread: bool,
}

impl LargeRef {
    /// The whole value of `m` (a read of `key`).
    pub fn whole(key: Vec<u8>, manifest: Manifest) -> LargeRef {
        LargeRef { key, manifest, start: 0, len: manifest.total_len, range: None, reread: true }
    }
}

/// Chunks of `m` in one window.
pub fn window_chunks(m: &Manifest) -> u32 {
    (WINDOW_BYTES_MAX / m.chunk_bytes as usize).max(1) as u32
}

/// Runs `f` on shard `s`: in place when it is this one, else as one message.
pub async fn on_shard<T, F, Fut>(kv: &Rc<KvShard>, s: usize, f: F) -> KvResult<T>
where
    T: Send + 'static,
    F: FnOnce(Rc<KvShard>) -> Fut + Send + 'static,
    Fut: Future<Output = KvResult<T>> + 'static,
{
    if s == kv.shard.id() {
        return f(Rc::clone(kv)).await;
    }
    kv.shard
        .run_on(s, move |_| async move { f(KvShard::current()).await })
        .await
        .map_err(remote_error)?
}

/// Runs `f` on every shard concurrently; the first error, if any.
async fn on_all_shards<F, Fut>(kv: &Rc<KvShard>, f: F) -> KvResult<()>
where
    F: FnOnce(Rc<KvShard>) -> Fut + Send + Clone + 'static,
    Fut: Future<Output = KvResult<()>> + 'static,
{
    let tasks: Vec<_> = (0..kv.shard.shard_count())
        .map(|s| {
            let (kv, f) = (Rc::clone(kv), f.clone());
            glommio::spawn_local(async move { on_shard(&kv, s, f).await })
        })
        .collect();
    let mut result = Ok(());
    for task in tasks {
        if let Err(e) = task.await {
            result = result.and(Err(e));
        }
    }
    result
}

// ---------------------------------------------------------------------------------------------
// Writing.

/// Writes `value` (longer than one record) as the chunks of a new large value, in windows,
/// and commits the chunk owners' logs; returns the manifest to store under the key. On an
/// error (e.g. a range out of space) the chunks written so far are deleted again.
pub async fn write_value(kv: &Rc<KvShard>, value: &[u8]) -> KvResult<Manifest> {
    debug_assert!(value.len() <= PROTO_MAX_BULK);
    let m = Manifest::new(value.len() as u64, kv.tags.next(), kv.geo.chunk_bytes);
    let mut touched = vec![false; kv.shard.shard_count()];
    let window = window_chunks(&m);
    let mut written = Ok(());
    for first in (0..m.count).step_by(window as usize) {
        let chunks = (first..m.count.min(first + window))
            .map(|i| (i, Cow::Borrowed(&value[byte_range(&m, i)])))
            .collect();
        written = put_window(kv, &m, chunks, &mut touched).await;
        if written.is_err() {
            break;
        }
    }
    finish_chunks(kv, &m, &touched, written).await
}

/// The bytes of chunk `i` of `m` within the value.
fn byte_range(m: &Manifest, i: u32) -> std::ops::Range<usize> {
    let start = i as usize * m.chunk_bytes as usize;
    start..start + m.chunk_len(i)
}

/// After the last window: commits the logs of the shards that took chunks (rule 1 of the
/// module's ordering), or, after an error, deletes the chunks again.
async fn finish_chunks(
    kv: &Rc<KvShard>,
    m: &Manifest,
    touched: &[bool],
    written: KvResult<()>,
) -> KvResult<Manifest> {
    let committed = match written {
        Ok(()) => {
            let tasks: Vec<_> = (0..touched.len())
                .filter(|&s| touched[s])
                .map(|s| {
                    let kv = Rc::clone(kv);
                    glommio::spawn_local(async move {
                        on_shard(&kv, s, |kv| async move {
                            kv.log_commit().await.map_err(KvError::Engine)
                        })
                        .await
                    })
                })
                .collect();
            let mut result = Ok(());
            for task in tasks {
                result = result.and(task.await);
            }
            result
        }
        Err(e) => Err(e),
    };
    match committed {
        Ok(()) => Ok(*m),
        Err(e) => {
            discard(kv, m).await;
            Err(match e {
                KvError::OutOfSpace(r) => KvError::ChunkOutOfSpace(r),
                e => e,
            })
        }
    }
}

/// Chunks of one value for one owner: (index, bytes).
type Chunks = Vec<(u32, Vec<u8>)>;

/// Writes one window of chunks: each remote owner's share as one message (the chunks copied
/// into it), this shard's own from `chunks` in place. `touched` marks the owners.
async fn put_window(
    kv: &Rc<KvShard>,
    m: &Manifest,
    chunks: Vec<(u32, Cow<'_, [u8]>)>,
    touched: &mut [bool],
) -> KvResult<()> {
    let me = kv.shard.id();
    let mut local = Vec::new();
    let mut remote: Vec<(usize, Chunks)> = Vec::new();
    for (i, data) in chunks {
        let owner = kv.owner_of_key(&format::chunk_key(m.tag, i));
        touched[owner] = true;
        if owner == me {
            local.push((i, data));
            continue;
        }
        match remote.iter_mut().find(|g| g.0 == owner) {
            Some(g) => g.1.push((i, data.into_owned())),
            None => remote.push((owner, vec![(i, data.into_owned())])),
        }
    }
    let tag = m.tag;
    let tasks: Vec<_> = remote
        .into_iter()
        .map(|(owner, items)| {
            let kv = Rc::clone(kv);
            glommio::spawn_local(async move {
                on_shard(&kv, owner, move |kv| async move { kv.put_chunks(tag, items).await }).await
            })
        })
        .collect();
    let mut result = Ok(());
    for (i, data) in local {
        if let Err(e) = kv.put_chunk(tag, i, &data).await {
            result = Err(e);
            break;
        }
    }
    for task in tasks {
        result = result.and(task.await);
    }
    result
}

/// Deletes the chunks of a value no manifest names (a write that failed or did not take
/// effect): no reader can hold them, so no pin is checked.
pub async fn discard(kv: &Rc<KvShard>, m: &Manifest) {
    let m = *m;
    let deleted = on_all_shards(kv, move |kv| async move { kv.del_chunks(m).await.map(|_| ()) });
    if let Err(e) = deleted.await {
        eprintln!(
            "corebuf-kv: shard {}: deleting the chunks of an unfinished large value (tag \
             {:#018x}) failed, their space leaks: {e}",
            kv.shard.id(),
            m.tag
        );
    }
}

/// Frees the chunks of a large value whose manifest a write removed: once the removal is
/// durable on the key's owner and no connection streams the value. A failure leaks the
/// chunks (reported on stderr): the write it follows has taken effect.
pub async fn free_chunks(kv: &Rc<KvShard>, orphan: Orphan) {
    let m = orphan.manifest;
    let commit =
        on_shard(
            kv,
            orphan.owner,
            |kv| async move { kv.log_commit().await.map_err(KvError::Engine) },
        );
    if let Err(e) = commit.await {
        eprintln!(
            "corebuf-kv: shard {}: the chunks of a removed large value (tag {:#018x}) are \
             kept, their space leaks: {e}",
            kv.shard.id(),
            m.tag
        );
        return;
    }
    let home = pin_home(kv, &m);
    let tag = m.tag;
    let doomed = on_shard(kv, home, move |kv| async move {
        kv.pins.doom(tag).await;
        Ok(())
    });
    if let Err(e) = doomed.await {
        eprintln!("corebuf-kv: freeing large value {tag:#018x}: {e}; its space leaks");
        return;
    }
    discard(kv, &m).await;
    let undoomed = on_shard(kv, home, move |kv| async move {
        kv.pins.undoom(tag);
        Ok(())
    });
    if let Err(e) = undoomed.await {
        eprintln!("corebuf-kv: freeing large value {tag:#018x}: {e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Reading.

/// Why chunks could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// This chunk is missing (or has the wrong length).
    Missing(u32),
    /// The store failed.
    Kv(KvError),
}

impl From<KvError> for ReadError {
    fn from(e: KvError) -> Self {
        ReadError::Kv(e)
    }
}

/// The shard whose pin table guards `m`'s chunks: the owner of chunk 0.
fn pin_home(kv: &KvShard, m: &Manifest) -> usize {
    kv.owner_of_key(&format::chunk_key(m.tag, 0))
}

/// A reader's pin of a large value's chunks; released by [`PinGuard::release`], or, if the
/// reader is dropped first (its connection closed), by a task its `Drop` starts.
#[derive(Debug)]
pub struct PinGuard {
    kv: Rc<KvShard>,
    tag: u64,
    home: usize,
    held: bool,
}

impl PinGuard {
    /// Pins `m`'s chunks; `None` when they are being freed (the value was replaced).
    pub async fn pin(kv: &Rc<KvShard>, m: &Manifest) -> KvResult<Option<PinGuard>> {
        let (home, tag) = (pin_home(kv, m), m.tag);
        let pinned = on_shard(kv, home, move |kv| async move { Ok(kv.pins.pin(tag)) }).await?;
        Ok(pinned.then(|| PinGuard { kv: Rc::clone(kv), tag, home, held: true }))
    }

    /// Ends the pin.
    pub async fn release(mut self) {
        self.held = false;
        let tag = self.tag;
        let _ = on_shard(&self.kv, self.home, move |kv| async move {
            kv.pins.unpin(tag);
            Ok(())
        })
        .await;
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        if self.held {
            let (kv, home, tag) = (Rc::clone(&self.kv), self.home, self.tag);
            glommio::spawn_local(async move {
                let _ = on_shard(&kv, home, move |kv| async move {
                    kv.pins.unpin(tag);
                    Ok(())
                })
                .await;
            })
            .detach();
        }
    }
}

/// The first of chunks `range` of `m` that is missing, looked up on every shard at once
/// (records only; their extents are read when the chunks are).
pub async fn missing_chunk(
    kv: &Rc<KvShard>,
    m: &Manifest,
    range: std::ops::Range<u32>,
) -> KvResult<Option<u32>> {
    let tasks: Vec<_> = (0..kv.shard.shard_count())
        .map(|s| {
            let (kv, m, range) = (Rc::clone(kv), *m, range.clone());
            glommio::spawn_local(async move {
                on_shard(&kv, s, move |kv| async move { kv.missing_chunk(m, range).await }).await
            })
        })
        .collect();
    let mut first: KvResult<Option<u32>> = Ok(None);
    for task in tasks {
        match (task.await, &mut first) {
            (Err(e), Ok(_)) => first = Err(e),
            (Ok(Some(i)), Ok(found)) => *found = Some(found.map_or(i, |f| f.min(i))),
            _ => {}
        }
    }
    first
}

/// Chunks `first..first + n` of `m`, in order: one message per remote owner, this shard's
/// own read in place.
pub async fn read_window(
    kv: &Rc<KvShard>,
    m: &Manifest,
    first: u32,
    n: u32,
) -> Result<Vec<Vec<u8>>, ReadError> {
    let me = kv.shard.id();
    let mut owners = Vec::with_capacity(n as usize);
    let mut remote: Vec<(usize, Vec<u32>)> = Vec::new();
    for i in first..first + n {
        let owner = kv.owner_of_key(&format::chunk_key(m.tag, i));
        owners.push(owner);
        if owner != me {
            match remote.iter_mut().find(|g| g.0 == owner) {
                Some(g) => g.1.push(i),
                None => remote.push((owner, vec![i])),
            }
        }
    }
    let tasks: Vec<_> = remote
        .into_iter()
        .map(|(owner, indexes)| {
            let (kv, m) = (Rc::clone(kv), *m);
            let task = glommio::spawn_local(async move {
                on_shard(&kv, owner, move |kv| async move { kv.get_chunks(m, indexes).await }).await
            });
            (owner, task)
        })
        .collect();
    let mut local = Vec::new();
    for (i, &owner) in (first..first + n).zip(&owners) {
        if owner == me {
            local.push(kv.get_chunk(m, i).await?);
        }
    }
    let mut from: Vec<(usize, std::vec::IntoIter<Option<Vec<u8>>>)> = Vec::new();
    for (owner, task) in tasks {
        from.push((owner, task.await?.into_iter()));
    }
    let mut local = local.into_iter();
    let mut out = Vec::with_capacity(n as usize);
    for (i, owner) in (first..first + n).zip(owners) {
        let chunk = if owner == me {
            local.next()
        } else {
            from.iter_mut().find(|f| f.0 == owner).and_then(|f| f.1.next())
        };
        match chunk.flatten() {
            Some(bytes) => out.push(bytes),
            None => return Err(ReadError::Missing(i)),
        }
    }
    Ok(out)
}

/// Appends bytes `start..end` of `m`'s value to `out`, reading the chunks they cover.
async fn read_bytes_into(
    kv: &Rc<KvShard>,
    m: &Manifest,
    start: u64,
    end: u64,
    out: &mut Vec<u8>,
) -> Result<(), ReadError> {
    if start >= end {
        return Ok(());
    }
    let cs = m.chunk_bytes as u64;
    let (first, last) = ((start / cs) as u32, ((end - 1) / cs) as u32);
    let window = window_chunks(m);
    let mut at = first;
    while at <= last {
        let n = window.min(last + 1 - at);
        for (j, chunk) in read_window(kv, m, at, n).await?.into_iter().enumerate() {
            let base = (at as u64 + j as u64) * cs;
            let (a, b) = (start.max(base) - base, end.min(base + chunk.len() as u64) - base);
            out.extend_from_slice(&chunk[a as usize..b as usize]);
        }
        at += n;
    }
    Ok(())
}

/// The error a reply gives when a large value's chunk is missing: names the key.
pub fn missing_error(key: &[u8], m: &Manifest, index: u32) -> String {
    format!(
        "ERR the large value of key '{}' is damaged: chunk {index} of {} is missing",
        crate::server::shown_key(key),
        m.count
    )
}

// ---------------------------------------------------------------------------------------------
// APPEND and SETRANGE of large values.

/// An in-place change of a value ([`edit`]).
#[derive(Clone, Copy, Debug)]
pub enum Edit<'a> {
    /// APPEND these bytes.
    Append(&'a [u8]),
    /// SETRANGE at this offset.
    SetRange(u64, &'a [u8]),
}

/// APPEND / SETRANGE whose result is a large value (or whose old value is one): copies the
/// value into chunks of a new tag window by window with the change applied, then swaps the
/// manifest in if the key still holds what was copied (compare and set on its owner; else it
/// starts over, [`EDIT_ATTEMPTS_MAX`] times). So the change is atomic against other writers,
/// costs a copy of the whole value, and holds one window in memory. Answers the new length
/// (or an error) with the old value's chunks to free.
pub async fn edit(kv: &Rc<KvShard>, key: &[u8], edit: Edit<'_>) -> OpOut {
    for _ in 0..EDIT_ATTEMPTS_MAX {
        match edit_once(kv, key, edit).await {
            Ok(Some(out)) => return out,
            Ok(None) => continue,
            Err(e) => return OpOut::Err(e),
        }
    }
    OpOut::Err(format!(
        "ERR the value of key '{}' changed {EDIT_ATTEMPTS_MAX} times while it was copied; try again",
        crate::server::shown_key(key)
    ))
}

/// One attempt of [`edit`]: `None` when the key changed meanwhile.
async fn edit_once(kv: &Rc<KvShard>, key: &[u8], edit: Edit<'_>) -> Result<Option<OpOut>, String> {
    let owner = kv.owner_of_key(key);
    let k = key.to_vec();
    let entry = on_shard(kv, owner, move |kv| async move { kv.get_entry(&k).await })
        .await
        .map_err(|e| e.to_string())?;
    let old = entry.as_ref();
    if old.is_some_and(|e| e.manifest && e.large().is_none()) {
        return Err(crate::server::damaged_manifest(key));
    }
    let old_len = old.map_or(0, Entry::len);
    let (offset, data) = match edit {
        Edit::Append(d) => (old_len, d),
        Edit::SetRange(o, d) => (o, d),
    };
    if data.is_empty() {
        return Ok(Some(OpOut::Int(old_len as i64)));
    }
    let new_len = old_len.max(offset + data.len() as u64);
    if new_len > PROTO_MAX_BULK as u64 {
        return Err(crate::server::check_value_len(usize::MAX, crate::server::Growth::Grow)
            .expect_err("beyond the limit"));
    }
    let old_m = old.and_then(Entry::large);
    let pin = match &old_m {
        Some(m) => match PinGuard::pin(kv, m).await.map_err(|e| e.to_string())? {
            Some(pin) => Some(pin),
            None => return Ok(None), // being freed: the key holds another value now
        },
        None => None,
    };
    let m = Manifest::new(new_len, kv.tags.next(), kv.geo.chunk_bytes);
    let written = copy_edited(kv, key, old, old_m.as_ref(), &m, offset, data).await;
    if let Some(pin) = pin {
        pin.release().await;
    }
    let m = written?;
    // Compare and set: only if the key still holds what was copied (its TTL is kept).
    let (expect, k, new) = (entry.clone(), key.to_vec(), m.encode().to_vec());
    let swapped = on_shard(kv, owner, move |kv| async move {
        kv.update_full(&k, move |live, _| {
            let same = match (live, &expect) {
                (None, None) => true,
                (Some(l), Some(e)) => l.value == e.value && l.manifest == e.manifest,
                _ => false,
            };
            match (same, live) {
                (true, live) => (Write::Large(new.clone(), live.map_or(0, |e| e.expires)), true),
                (false, _) => (Write::Keep, false),
            }
        })
        .await
    })
    .await;
    match swapped {
        Ok((true, effects)) => {
            let out = OpOut::Int(new_len as i64);
            Ok(Some(match effects.orphan {
                Some(old) => OpOut::Freed(Box::new(out), Orphan { manifest: old, owner }),
                None => out,
            }))
        }
        Ok((false, _)) => {
            discard(kv, &m).await;
            Ok(None)
        }
        Err(e) => {
            if !crate::server::kept_after(kv, &e, &m) {
                discard(kv, &m).await;
            }
            Err(e.to_string())
        }
    }
}

/// A copy of the large value `old` (manifest `old_m`) of `key` in chunks of a new tag, one
/// window at a time (RENAME: the destination gets chunks of its own, so that no two keys ever
/// name the same chunks, whatever a crash or a concurrent overwrite of the source does).
/// `None` if the value is being freed (the key holds another value by now).
pub async fn copy(
    kv: &Rc<KvShard>,
    key: &[u8],
    old: &Entry,
    old_m: &Manifest,
) -> Result<Option<Manifest>, String> {
    let Some(pin) = PinGuard::pin(kv, old_m).await.map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let m = Manifest::new(old_m.total_len, kv.tags.next(), kv.geo.chunk_bytes);
    let written = copy_edited(kv, key, Some(old), Some(old_m), &m, 0, &[]).await;
    pin.release().await;
    written.map(Some)
}

/// Writes the chunks of `m`: the old value (`old`, small or large `old_m`) zero-extended to
/// `m`'s length, with `data` at `offset`; one window at a time.
async fn copy_edited(
    kv: &Rc<KvShard>,
    key: &[u8],
    old: Option<&Entry>,
    old_m: Option<&Manifest>,
    m: &Manifest,
    offset: u64,
    data: &[u8],
) -> Result<Manifest, String> {
    let old_len = old.map_or(0, Entry::len);
    let mut touched = vec![false; kv.shard.shard_count()];
    let window = window_chunks(m);
    let cs = m.chunk_bytes as u64;
    let mut buf = Vec::new();
    let mut written = Ok(());
    for first in (0..m.count).step_by(window as usize) {
        let last = m.count.min(first + window);
        let (a, b) = (first as u64 * cs, (last as u64 * cs).min(m.total_len));
        buf.clear();
        match (old, old_m) {
            (Some(_), Some(om)) => match read_bytes_into(kv, om, a, b.min(old_len), &mut buf).await
            {
                Ok(()) => {}
                Err(ReadError::Missing(i)) => {
                    written = Err(KvError::Engine(missing_error(key, om, i)));
                    break;
                }
                Err(ReadError::Kv(e)) => {
                    written = Err(e);
                    break;
                }
            },
            (Some(e), None) if a < old_len => {
                buf.extend_from_slice(&e.value[a as usize..b.min(old_len) as usize]);
            }
            _ => {}
        }
        buf.resize((b - a) as usize, 0);
        let (from, to) = (offset.max(a), (offset + data.len() as u64).min(b));
        if from < to {
            let src = &data[(from - offset) as usize..(to - offset) as usize];
            buf[(from - a) as usize..(to - a) as usize].copy_from_slice(src);
        }
        let chunks = (first..last)
            .map(|i| {
                let at = ((i - first) as u64 * cs) as usize;
                (i, Cow::Borrowed(&buf[at..at + m.chunk_len(i)]))
            })
            .collect();
        written = put_window(kv, m, chunks, &mut touched).await;
        if written.is_err() {
            break;
        }
    }
    debug_assert!(m.total_len > MAX_VALUE as u64 || old_m.is_some());
    finish_chunks(kv, m, &touched, written).await.map_err(|e| match e {
        KvError::Engine(msg) if msg.starts_with("ERR ") => msg,
        e => e.to_string(),
    })
}
