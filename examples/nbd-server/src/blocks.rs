//! Byte-range operations of the export on the engine: any offset and length.
//!
//! A range is cut into pieces of consecutive blocks with one owner shard each. A piece this
//! shard owns runs here on its partition, without a copy of whole blocks; a piece another
//! shard owns runs there through `run_on`, and the pieces of one request run at once and are
//! joined before the reply.
//!
//! Three rules make unaligned requests safe:
//! 1. A block that a request covers only in part is read-modify-written **on its owner**:
//!    the read is awaited, then the copy into the cached buffer and `mark_dirty_range` happen
//!    with no await in between. The owner's executor is single-threaded, so two such updates
//!    of one block, or an update and a read, never interleave: none is lost or torn.
//! 2. A block covered in full is written without reading it (`new_block`).
//! 3. Only the owner's partition caches a block, so every connection on every shard sees the
//!    same bytes.

use std::rc::Rc;

use corebuf::{Error, Result, Shard};
use glommio::task::JoinHandle;

use crate::server::NbdShard;

/// A run of consecutive blocks with one owner, as a byte range of the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    owner: usize,
    offset: u64,
    len: usize,
}

/// Cuts `offset..offset + len` into pieces by owner shard.
fn pieces(shard: &Shard, offset: u64, len: usize) -> Vec<Piece> {
    let block_size = shard.block_size() as u64;
    let end = offset + len as u64;
    let mut out: Vec<Piece> = Vec::new();
    let mut at = offset;
    while at < end {
        let block = at / block_size;
        let next = ((block + 1) * block_size).min(end);
        let owner = shard.owner_of(block);
        match out.last_mut() {
            Some(last) if last.owner == owner => last.len += (next - at) as usize,
            _ => out.push(Piece { owner, offset: at, len: (next - at) as usize }),
        }
        at = next;
    }
    out
}

/// One block's part of a piece: the block, and the byte range inside it.
fn block_parts(
    block_size: usize,
    offset: u64,
    len: usize,
) -> impl Iterator<Item = (u64, std::ops::Range<usize>)> {
    let bs = block_size as u64;
    let end = offset + len as u64;
    let first = offset / bs;
    let last = if len == 0 { first } else { (end - 1) / bs };
    (first..=last).filter(move |_| len > 0).map(move |block| {
        let start = offset.max(block * bs) - block * bs;
        let stop = end.min((block + 1) * bs) - block * bs;
        (block, start as usize..stop as usize)
    })
}

/// Reads `out.len()` bytes at `offset` into `out`.
pub async fn read(shard: &Rc<Shard>, offset: u64, out: &mut [u8]) -> Result<()> {
    let parts = pieces(shard, offset, out.len());
    let mut remote: Vec<(Piece, JoinHandle<Result<Vec<u8>>>)> = Vec::new();
    for &piece in parts.iter().filter(|p| p.owner != shard.id()) {
        let shard = Rc::clone(shard);
        let task = glommio::spawn_local(async move {
            shard
                .run_on(piece.owner, move |owner| async move {
                    let mut data = vec![0u8; piece.len];
                    read_here(&owner, piece.offset, &mut data).await.map(|()| data)
                })
                .await?
        })
        .detach();
        remote.push((piece, task));
    }
    let mut first_error = None;
    for piece in parts.iter().filter(|p| p.owner == shard.id()) {
        let at = (piece.offset - offset) as usize;
        if let Err(e) = read_here(shard, piece.offset, &mut out[at..at + piece.len]).await {
            first_error.get_or_insert(e);
        }
    }
    for (piece, task) in remote {
        let at = (piece.offset - offset) as usize;
        match task.await {
            Some(Ok(data)) => out[at..at + piece.len].copy_from_slice(&data),
            Some(Err(e)) => {
                first_error.get_or_insert(e);
            }
            None => {
                first_error.get_or_insert(Error::ShutDown);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Reads a range of blocks this shard owns.
async fn read_here(shard: &Shard, offset: u64, out: &mut [u8]) -> Result<()> {
    let partition = shard.partition();
    let block_size = shard.block_size();
    let blocks = block_parts(block_size, offset, out.len()).count() as u64;
    if blocks > 1 {
        // Start the misses' reads together; the loop below then mostly finds them cached or
        // in flight. Prefetch may skip blocks under pressure: the loop reads those itself.
        let _ = partition.prefetch(offset / block_size as u64, blocks);
    }
    let session = partition.session().await;
    let mut at = 0;
    for (block, range) in block_parts(block_size, offset, out.len()) {
        let buf = session.read(block).await?;
        let n = range.len();
        out[at..at + n].copy_from_slice(&buf.data()[range]);
        at += n;
    }
    Ok(())
}

/// What a write-like operation puts in the blocks.
#[derive(Clone, Copy, Debug)]
enum Fill<'a> {
    Data(&'a [u8]),
    Zeroes(usize),
}

impl Fill<'_> {
    fn len(&self) -> usize {
        match self {
            Fill::Data(data) => data.len(),
            Fill::Zeroes(len) => *len,
        }
    }
}

/// Writes `data` at `offset` (cached dirty on the owners when this returns).
pub async fn write(shard: &Rc<Shard>, offset: u64, data: Vec<u8>) -> Result<()> {
    let parts = pieces(shard, offset, data.len());
    if let [piece] = parts[..] {
        if piece.owner == shard.id() {
            return write_here(shard, offset, Fill::Data(&data)).await;
        }
        // One remote piece: the payload moves to the owner without another copy.
        return shard
            .run_on(piece.owner, move |owner| async move {
                write_here(&owner, offset, Fill::Data(&data)).await
            })
            .await?;
    }
    let mut tasks = Vec::new();
    for &piece in parts.iter().filter(|p| p.owner != shard.id()) {
        let at = (piece.offset - offset) as usize;
        let part = data[at..at + piece.len].to_vec();
        tasks.push(spawn_on(shard, piece.owner, move |owner| async move {
            write_here(&owner, piece.offset, Fill::Data(&part)).await
        }));
    }
    let mut first_error = None;
    for piece in parts.iter().filter(|p| p.owner == shard.id()) {
        let at = (piece.offset - offset) as usize;
        if let Err(e) = write_here(shard, piece.offset, Fill::Data(&data[at..at + piece.len])).await
        {
            first_error.get_or_insert(e);
        }
    }
    join(tasks, first_error).await
}

/// Writes zeroes over `len` bytes at `offset`.
pub async fn write_zeroes(shard: &Rc<Shard>, offset: u64, len: usize) -> Result<()> {
    let parts = pieces(shard, offset, len);
    let mut tasks = Vec::new();
    for &piece in parts.iter().filter(|p| p.owner != shard.id()) {
        tasks.push(spawn_on(shard, piece.owner, move |owner| async move {
            write_here(&owner, piece.offset, Fill::Zeroes(piece.len)).await
        }));
    }
    let mut first_error = None;
    for piece in parts.iter().filter(|p| p.owner == shard.id()) {
        if let Err(e) = write_here(shard, piece.offset, Fill::Zeroes(piece.len)).await {
            first_error.get_or_insert(e);
        }
    }
    join(tasks, first_error).await
}

/// Writes a range of blocks this shard owns: whole blocks without reading them, partial
/// blocks read-modify-write (rule 1 of the module: no await between the copy and the mark).
async fn write_here(shard: &Shard, offset: u64, fill: Fill<'_>) -> Result<()> {
    let partition = shard.partition();
    let block_size = shard.block_size();
    let session = partition.session().await;
    let mut at = 0;
    let mut dirtied = 0;
    for (block, range) in block_parts(block_size, offset, fill.len()) {
        let n = range.len();
        let buf = if n == block_size {
            session.new_block(block).await?
        } else {
            session.read(block).await?
        };
        // From here to mark_dirty_range nothing awaits: the update is atomic on this shard.
        let mut data = buf.try_data_mut()?;
        match fill {
            Fill::Data(bytes) => data[range.clone()].copy_from_slice(&bytes[at..at + n]),
            Fill::Zeroes(_) => data[range.clone()].fill(0),
        }
        drop(data);
        buf.mark_dirty_range(range);
        at += n;
        dirtied += 1;
    }
    if let Some(nbd) = NbdShard::current() {
        nbd.note_dirtied(dirtied);
    }
    Ok(())
}

/// Discards the whole blocks inside `len` bytes at `offset` (a trim is a hint: the partial
/// blocks at its ends are left as they are).
pub async fn trim(shard: &Rc<Shard>, offset: u64, len: usize) -> Result<()> {
    let parts = pieces(shard, offset, len);
    let mut tasks = Vec::new();
    for &piece in parts.iter().filter(|p| p.owner != shard.id()) {
        tasks.push(spawn_on(shard, piece.owner, move |owner| async move {
            trim_here(&owner, piece.offset, piece.len).await
        }));
    }
    let mut first_error = None;
    for piece in parts.iter().filter(|p| p.owner == shard.id()) {
        if let Err(e) = trim_here(shard, piece.offset, piece.len).await {
            first_error.get_or_insert(e);
        }
    }
    join(tasks, first_error).await
}

async fn trim_here(shard: &Shard, offset: u64, len: usize) -> Result<()> {
    let bs = shard.block_size() as u64;
    let first = offset.div_ceil(bs);
    let end = (offset + len as u64) / bs;
    if end <= first {
        return Ok(());
    }
    shard.partition().issue_discard(first, end - first).await
}

/// Runs `job` on shard `owner` as a task of this shard, so several owners work at once.
fn spawn_on<F, Fut>(shard: &Rc<Shard>, owner: usize, job: F) -> JoinHandle<Result<()>>
where
    F: FnOnce(Rc<Shard>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<()>> + 'static,
{
    let shard = Rc::clone(shard);
    glommio::spawn_local(async move { shard.run_on(owner, job).await? }).detach()
}

/// Waits for every task and returns the first error (`first_error` first).
async fn join(tasks: Vec<JoinHandle<Result<()>>>, mut first_error: Option<Error>) -> Result<()> {
    for task in tasks {
        match task.await {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                first_error.get_or_insert(e);
            }
            None => {
                first_error.get_or_insert(Error::ShutDown);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_parts_cover_unaligned_ranges_exactly() {
        let parts: Vec<_> = block_parts(4096, 4000, 5000).collect();
        assert_eq!(parts, vec![(0, 4000..4096), (1, 0..4096), (2, 0..808)]);
        let total: usize = parts.iter().map(|(_, r)| r.len()).sum();
        assert_eq!(total, 5000);
        assert_eq!(block_parts(4096, 8192, 4096).collect::<Vec<_>>(), vec![(2, 0..4096)]);
        assert_eq!(block_parts(4096, 10, 0).count(), 0);
        assert_eq!(block_parts(512, 511, 2).collect::<Vec<_>>(), vec![(0, 511..512), (1, 0..1)]);
    }
}
