//! Shared helpers for corebuf's cross-crate integration tests (the tests live in `tests/`).

use std::path::{Path, PathBuf};

/// A data file of `blocks` blocks of `block_size` bytes, fully written (no holes), each block
/// filled with a pattern derived from its number so stale or misplaced data is recognisable.
pub fn data_file(dir: &Path, blocks: u64, block_size: usize) -> PathBuf {
    let path = dir.join("data");
    let mut bytes = Vec::with_capacity(blocks as usize * block_size);
    for b in 0..blocks {
        bytes.extend_from_slice(&initial_block(b, block_size));
    }
    std::fs::write(&path, bytes).expect("write the data file");
    path
}

/// The initial content of block `b` in [`data_file`].
pub fn initial_block(b: u64, block_size: usize) -> Vec<u8> {
    let mut block = vec![0u8; block_size];
    for (i, chunk) in block.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(b ^ ((i as u64) << 40)).to_le_bytes());
    }
    block
}

/// A block whose every 8-byte word is `(block << 32) | version`: recognisable anywhere.
pub fn versioned_block(block: u64, version: u32, block_size: usize) -> Vec<u8> {
    let word = (block << 32) | version as u64;
    word.to_le_bytes().iter().copied().cycle().take(block_size).collect()
}

/// A scratch directory on a real file system, under the workspace's `target/` (never a tmpfs
/// `/tmp`: `O_DIRECT` needs a real one). `COREBUF_TEST_DIR` overrides the parent.
pub fn scratch_dir() -> tempfile::TempDir {
    let parent = std::env::var_os("COREBUF_TEST_DIR").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-scratch")
    });
    std::fs::create_dir_all(&parent).expect("create the scratch parent directory");
    tempfile::tempdir_in(parent).expect("create a scratch directory")
}
