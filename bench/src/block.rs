//! The content of every block the bench writes: recognisable, versioned and checksummed.
//!
//! Layout (little-endian u64 words): `[magic, block number, version, checksum, payload...]`.
//! The payload is a pattern of the block number and version; the checksum covers every word
//! but itself. A stale block (an older version), a misplaced one (another block number) and a
//! torn or corrupted one (bad checksum) are all told apart.

/// Bytes of the header.
pub const HEADER_BYTES: usize = 32;

const MAGIC: u64 = u64::from_le_bytes(*b"CBUFBLK1");
const PATTERN: u64 = 0x9E37_79B9_7F4A_7C15;

#[inline]
fn word(buf: &[u8], index: usize) -> u64 {
    let bytes: [u8; 8] = buf[index * 8..index * 8 + 8].try_into().expect("eight bytes");
    u64::from_le_bytes(bytes)
}

/// Writes block `block`'s content at `version` into `buf` (a whole block).
pub fn stamp(buf: &mut [u8], block: u64, version: u64) {
    debug_assert!(buf.len() >= HEADER_BYTES && buf.len().is_multiple_of(8));
    let seed = block.rotate_left(32) ^ version;
    for (i, chunk) in buf.chunks_exact_mut(8).enumerate().skip(4) {
        let value = seed ^ (i as u64).wrapping_mul(PATTERN);
        chunk.copy_from_slice(&value.to_le_bytes());
    }
    buf[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    buf[8..16].copy_from_slice(&block.to_le_bytes());
    buf[16..24].copy_from_slice(&version.to_le_bytes());
    let sum = checksum(buf);
    buf[24..32].copy_from_slice(&sum.to_le_bytes());
}

/// The checksum of a block: every word but the checksum word, in four independent lanes.
pub fn checksum(buf: &[u8]) -> u64 {
    const K: u64 = 0xFF51_AFD7_ED55_8CCD;
    let mut lanes = [0x243F_6A88_85A3_08D3u64, 1, 2, 3];
    for (i, chunk) in buf.chunks_exact(8).enumerate() {
        let w = if i == 3 { 0 } else { u64::from_le_bytes(chunk.try_into().expect("eight")) };
        let lane = &mut lanes[i & 3];
        *lane = (*lane ^ w).wrapping_mul(K).rotate_left(29);
    }
    lanes.iter().fold(0u64, |h, &l| (h ^ l).wrapping_mul(K).rotate_left(31))
}

/// The block number recorded in a block's header (cheap: one word).
#[inline]
pub fn recorded_block(buf: &[u8]) -> u64 {
    word(buf, 1)
}

/// Checks that `buf` is block `block`'s content, intact; returns its version.
pub fn check(buf: &[u8], block: u64) -> Result<u64, String> {
    if word(buf, 0) != MAGIC {
        return Err(format!("block {block}: no block header (magic {:#018x})", word(buf, 0)));
    }
    let named = word(buf, 1);
    if named != block {
        return Err(format!("block {block}: holds the content of block {named}"));
    }
    let sum = checksum(buf);
    if sum != word(buf, 3) {
        return Err(format!(
            "block {block}: checksum mismatch (version {}, stored {:#018x}, computed {sum:#018x})",
            word(buf, 2),
            word(buf, 3)
        ));
    }
    Ok(word(buf, 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamped_blocks_check_and_damage_is_named() {
        let mut buf = vec![0u8; 4096];
        stamp(&mut buf, 77, 3);
        assert_eq!(check(&buf, 77), Ok(3));
        assert!(check(&buf, 78).unwrap_err().contains("content of block 77"));
        buf[1000] ^= 1;
        assert!(check(&buf, 77).unwrap_err().contains("checksum mismatch"));
        let zero = vec![0u8; 512];
        assert!(check(&zero, 0).unwrap_err().contains("no block header"));
        let mut other = vec![0u8; 4096];
        stamp(&mut other, 77, 4);
        assert_ne!(buf[HEADER_BYTES..], other[HEADER_BYTES..], "payload depends on the version");
    }
}
