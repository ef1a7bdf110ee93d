//! The dataset file: fully written with recognisable blocks before any timed run, reused when
//! `--path` names a file that is already right, removed after the run when it is temporary.
//!
//! Every block is written with data (no hole, no preallocated unwritten extent), because reads
//! of holes never reach the device and would flatter every number.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::args::human_bytes;
use crate::block;
use crate::error::{BenchError, Result};
use crate::sysinfo;

/// Blocks sampled when deciding whether an existing file can be reused.
const REUSE_SAMPLE_BLOCKS: u64 = 64;
/// Bytes written per `write` call when creating the file.
const WRITE_CHUNK_BYTES: usize = 1 << 20;

/// The dataset of a run.
#[derive(Debug)]
pub struct Dataset {
    /// The file.
    pub path: PathBuf,
    /// Blocks in it.
    pub blocks: u64,
    /// The block size.
    pub block_size: usize,
    /// Whether an existing file was reused.
    pub reused: bool,
    /// The temporary directory holding the file (removed on drop), if it is temporary.
    _dir: Option<tempfile::TempDir>,
}

impl Dataset {
    /// Creates (or reuses, with `path`) the dataset of `blocks` blocks of `block_size` bytes.
    /// Without `path` the file goes in a new temporary directory under `dir` (default: the
    /// current directory), which must not be tmpfs.
    pub fn prepare(
        path: Option<&Path>,
        dir: Option<&Path>,
        blocks: u64,
        block_size: usize,
    ) -> Result<Dataset> {
        if let Some(path) = path {
            let parent =
                path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            refuse_memory_fs(parent)?;
            let reused = is_right(path, blocks, block_size)?;
            if !reused {
                write(path, blocks, block_size)?;
            }
            return Ok(Dataset {
                path: path.to_path_buf(),
                blocks,
                block_size,
                reused,
                _dir: None,
            });
        }
        let dir = dir.map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let dir = dir
            .canonicalize()
            .map_err(|e| BenchError::io(format!("--dir {}", dir.display()), e))?;
        refuse_memory_fs(&dir)?;
        let temp = tempfile::Builder::new()
            .prefix("corebuf-bench-")
            .tempdir_in(&dir)
            .map_err(|e| BenchError::io(format!("creating a directory in {}", dir.display()), e))?;
        let path = temp.path().join("dataset.bin");
        write(&path, blocks, block_size)?;
        Ok(Dataset { path, blocks, block_size, reused: false, _dir: Some(temp) })
    }

    /// Bytes in the file.
    pub fn bytes(&self) -> u64 {
        self.blocks * self.block_size as u64
    }

    /// Writes back and drops the file's page cache, so the next side starts cold.
    pub fn drop_page_cache(&self) {
        if let Ok(file) = File::open(&self.path) {
            sysinfo::drop_page_cache(&file);
        }
    }
}

fn refuse_memory_fs(dir: &Path) -> Result<()> {
    if sysinfo::is_memory_fs(dir) {
        return Err(BenchError::Usage(format!(
            "{} is on tmpfs, which has no O_DIRECT and no device: choose a directory on a disk \
             with --dir (or --path)",
            dir.display()
        )));
    }
    Ok(())
}

/// Whether `path` has the right size and its sampled blocks are intact, numbered right.
fn is_right(path: &Path, blocks: u64, block_size: usize) -> Result<bool> {
    let Ok(file) = File::open(path) else { return Ok(false) };
    let len = file.metadata().map_err(|e| BenchError::io(path.display(), e))?.len();
    if len != blocks * block_size as u64 {
        return Ok(false);
    }
    let mut buf = vec![0u8; block_size];
    let step = (blocks / REUSE_SAMPLE_BLOCKS).max(1);
    let sample = (0..blocks).step_by(step as usize).chain(std::iter::once(blocks - 1));
    for b in sample {
        if file.read_exact_at(&mut buf, b * block_size as u64).is_err()
            || block::check(&buf, b).is_err()
        {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Writes every block at version 0, syncs, and drops the file's page cache.
fn write(path: &Path, blocks: u64, block_size: usize) -> Result<()> {
    let started = Instant::now();
    let io =
        |e: std::io::Error| BenchError::io(format!("writing the dataset {}", path.display()), e);
    let mut file =
        OpenOptions::new().create(true).write(true).truncate(true).open(path).map_err(io)?;
    let per_chunk = (WRITE_CHUNK_BYTES / block_size).max(1) as u64;
    let mut chunk = vec![0u8; per_chunk as usize * block_size];
    let mut next = 0u64;
    while next < blocks {
        let count = per_chunk.min(blocks - next);
        let bytes = &mut chunk[..count as usize * block_size];
        for (i, buf) in bytes.chunks_exact_mut(block_size).enumerate() {
            block::stamp(buf, next + i as u64, 0);
        }
        file.write_all(bytes).map_err(io)?;
        next += count;
    }
    file.sync_all().map_err(io)?;
    sysinfo::drop_page_cache(&file);
    let bytes = blocks * block_size as u64;
    eprintln!(
        "dataset: wrote {} ({blocks} blocks) to {} in {:.1} s",
        human_bytes(bytes),
        path.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_file_is_reused_and_a_damaged_one_rewritten() {
        let dir = tempfile::tempdir_in(".").unwrap();
        let path = dir.path().join("d.bin");
        let first = Dataset::prepare(Some(&path), None, 256, 4096).unwrap();
        assert!(!first.reused);
        let again = Dataset::prepare(Some(&path), None, 256, 4096).unwrap();
        assert!(again.reused);
        // A damaged sampled block (block 0 is always sampled) makes it rewrite.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0u8; 64], 0).unwrap();
        let third = Dataset::prepare(Some(&path), None, 256, 4096).unwrap();
        assert!(!third.reused);
        // Another size is not reused either.
        assert!(!Dataset::prepare(Some(&path), None, 128, 4096).unwrap().reused);
        let mut buf = vec![0u8; 4096];
        File::open(&path).unwrap().read_exact_at(&mut buf, 127 * 4096).unwrap();
        assert_eq!(block::check(&buf, 127), Ok(0));
    }

    #[test]
    fn a_temporary_dataset_is_removed_on_drop() {
        let dataset = Dataset::prepare(None, None, 16, 4096).unwrap();
        let path = dataset.path.clone();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 16 * 4096);
        drop(dataset);
        assert!(!path.exists());
    }
}
