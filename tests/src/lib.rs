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
    let parent = std::env::var_os("COREBUF_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-scratch"));
    std::fs::create_dir_all(&parent).expect("create the scratch parent directory");
    tempfile::tempdir_in(parent).expect("create a scratch directory")
}

/// Bytes of the header of a [`stamped_block`]: block number, version, checksum.
pub const STAMP_HEADER_BYTES: usize = 24;

/// A block that names itself: `[block u64][version u64][checksum u64][payload]`, the payload
/// derived from block and version, the checksum (FNV-1a) over everything but itself. A torn,
/// misplaced or stale block fails [`check_stamped_block`] or shows an old version.
pub fn stamped_block(block: u64, version: u64, block_size: usize) -> Vec<u8> {
    let mut data = vec![0u8; block_size];
    data[0..8].copy_from_slice(&block.to_le_bytes());
    data[8..16].copy_from_slice(&version.to_le_bytes());
    let seed = block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ version;
    for (i, chunk) in data[STAMP_HEADER_BYTES..].chunks_mut(8).enumerate() {
        let word = seed.wrapping_add(i as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        chunk.copy_from_slice(&word.to_le_bytes()[..chunk.len()]);
    }
    let sum = stamp_checksum(&data);
    data[16..24].copy_from_slice(&sum.to_le_bytes());
    data
}

fn stamp_checksum(data: &[u8]) -> u64 {
    let mut hash: u64 = 0xCBF2_9CE4_8422_2325;
    for (i, &byte) in data.iter().enumerate() {
        if (16..24).contains(&i) {
            continue;
        }
        hash ^= byte as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01B3);
    }
    hash
}

/// Checks a [`stamped_block`] read back as block `block`; returns its version.
pub fn check_stamped_block(block: u64, data: &[u8]) -> Result<u64, String> {
    let word = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().expect("8 bytes"));
    let (named, version, sum) = (word(0), word(8), word(16));
    if named != block {
        return Err(format!("block {block} holds data of block {named}"));
    }
    if sum != stamp_checksum(data) {
        return Err(format!("block {block} (version {version}) fails its checksum"));
    }
    Ok(version)
}

/// A fully written data file of stamped blocks, all at version 0.
pub fn stamped_file(dir: &Path, blocks: u64, block_size: usize) -> PathBuf {
    let path = dir.join("stamped");
    let mut bytes = Vec::with_capacity(blocks as usize * block_size);
    for b in 0..blocks {
        bytes.extend_from_slice(&stamped_block(b, 0, block_size));
    }
    std::fs::write(&path, bytes).expect("write the stamped file");
    path
}

/// Which blocks round `round` of a crash test writes, for a given seed: about a third of them,
/// the same in the child that writes and the parent that checks.
pub fn round_writes(seed: u64, round: u64, block: u64) -> bool {
    let mut x = seed
        ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ block.wrapping_mul(0xD1B5_4A32_D192_ED03);
    x ^= x >> 31;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 29;
    x.is_multiple_of(3)
}

/// Bytes of one stamped sector: the simulated device's torn-write granularity.
pub const STAMP_SECTOR_BYTES: usize = corebuf_shard::io::SECTOR_BYTES;

/// Fills one 512-byte sector so it names itself: `[block][version][sector index][checksum]`
/// then a payload derived from all three; the checksum covers every word but itself. A torn,
/// misplaced, zeroed or stale sector fails [`check_sector`] or shows another version.
pub fn stamp_sector(sector: &mut [u8], block: u64, index: u64, version: u64) {
    assert_eq!(sector.len(), STAMP_SECTOR_BYTES, "one sector at a time");
    let mut words = [0u64; STAMP_SECTOR_BYTES / 8];
    words[0] = block;
    words[1] = version;
    words[2] = index;
    let seed = block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ version.rotate_left(17) ^ index;
    for (i, word) in words.iter_mut().enumerate().skip(4) {
        *word = seed.wrapping_add(i as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    }
    words[3] = sector_checksum(&words);
    for (chunk, word) in sector.chunks_exact_mut(8).zip(words) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
}

fn sector_checksum(words: &[u64]) -> u64 {
    let mut hash: u64 = 0xCBF2_9CE4_8422_2325;
    for (i, &word) in words.iter().enumerate() {
        if i == 3 {
            continue;
        }
        hash = (hash ^ word).wrapping_mul(0x0000_0100_0000_01B3).rotate_left(29);
    }
    hash
}

/// Checks sector `index` of block `block` as read back; returns the version it carries.
pub fn check_sector(sector: &[u8], block: u64, index: u64) -> Result<u64, String> {
    let mut words = [0u64; STAMP_SECTOR_BYTES / 8];
    for (word, chunk) in words.iter_mut().zip(sector.chunks_exact(8)) {
        *word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
    }
    let (named, version, named_index, sum) = (words[0], words[1], words[2], words[3]);
    if sum != sector_checksum(&words) {
        return Err(format!(
            "block {block} sector {index} fails its checksum (it names block {named} sector \
             {named_index} version {version}): torn or garbage"
        ));
    }
    if named != block || named_index != index {
        return Err(format!(
            "block {block} sector {index} holds block {named} sector {named_index} (misplaced)"
        ));
    }
    Ok(version)
}
