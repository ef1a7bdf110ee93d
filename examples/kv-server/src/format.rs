//! The on-disk format, byte by byte (FORMAT.md is the prose version of this module).
//!
//! Everything is little-endian. The device is cut into *ranges* of [`RANGE_BLOCKS`] blocks of
//! [`BLOCK_SIZE`] bytes; range 0 holds the two superblock copies, every other range is a
//! self-contained piece of the hash table (a header, [`BUCKETS_PER_RANGE`] bucket head blocks
//! and a pool of blocks for overflow and large values). The engine routes whole ranges to
//! shards, so everything one key touches lives on one shard whatever the shard count.

use std::fmt;

/// Bytes per block (the engine's block size).
pub const BLOCK_SIZE: usize = 4096;
/// Blocks per range (also the engine's `range_blocks`, so a range has one owner shard).
pub const RANGE_BLOCKS: u64 = 256;
/// Bucket head blocks per range (blocks 1..=64 of the range).
pub const BUCKETS_PER_RANGE: u64 = 64;
/// First pool block of a range (relative): after the header and the bucket heads.
pub const POOL_START: u64 = 1 + BUCKETS_PER_RANGE;
/// Longest key, bytes.
pub const MAX_KEY: usize = 1024;
/// Longest value one record holds, bytes (written in the superblock's geometry). A longer
/// value is stored as chunks under a manifest (see [`Manifest`]).
pub const MAX_VALUE: usize = 64 << 10;
/// Longest value a client may store (Redis's `proto-max-bulk-len`): 512 MiB.
pub const PROTO_MAX_BULK: usize = 512 << 20;

/// The magic at offset 0 of every block the server writes.
pub const MAGIC: [u8; 4] = *b"CBKV";
/// The format version this build reads and writes (2: records may carry an expiry; version 1
/// files are refused with a message saying so).
pub const FORMAT_VERSION: u16 = 2;

/// Block kinds (byte 6 of the common header).
pub mod kind {
    /// A superblock copy (blocks 0 and 1).
    pub const SUPER: u8 = 1;
    /// A range header (block 0 of a range).
    pub const RANGE: u8 = 2;
    /// A bucket head (blocks 1..=64 of a range).
    pub const HEAD: u8 = 3;
    /// An overflow block of a bucket chain (pool).
    pub const OVERFLOW: u8 = 4;
    /// One block of a large value (pool).
    pub const EXTENT: u8 = 5;
}

/// Offset of the CRC32C field; the checksum covers the block with these 4 bytes as zero.
pub const CRC_AT: usize = 24;
/// Header bytes of a record block (head or overflow).
pub const RECORD_BLOCK_HEADER: usize = 64;
/// Bytes of a record block available to records.
pub const RECORD_AREA: usize = BLOCK_SIZE - RECORD_BLOCK_HEADER;
/// Header bytes of an extent block.
pub const EXTENT_HEADER: usize = 48;
/// Value bytes one extent block carries.
pub const EXTENT_PAYLOAD: usize = BLOCK_SIZE - EXTENT_HEADER;
/// Fixed bytes of a record before its expiry (if any) and key.
pub const RECORD_HEADER: usize = 16;
/// Bytes of a record's expiry field (present when [`rflags::EXPIRES`] is set).
pub const EXPIRY_BYTES: usize = 8;
/// An inline record (header + key + value) at most this long stays in the bucket chain;
/// a longer value goes to extent blocks.
pub const INLINE_RECORD_MAX: usize = RECORD_AREA / 2;

/// Record types (byte 0 of a record).
pub mod rtype {
    /// The value follows the key.
    pub const INLINE: u8 = 1;
    /// The value lives in extent blocks listed after the key.
    pub const EXTENTS: u8 = 2;
}

/// Record flags (byte 1 of a record).
pub mod rflags {
    /// An 8-byte absolute expiry (unix milliseconds) follows the record header, before the key.
    pub const EXPIRES: u8 = 1;
    /// The record's value is a large-value manifest ([`super::Manifest`]), not the value.
    pub const MANIFEST: u8 = 2;
    /// An internal chunk record of a large value: invisible to every user-facing lookup (its
    /// key is a chunk key, [`super::chunk_key`], in a name space of its own).
    pub const CHUNK: u8 = 4;
    /// The bits this build knows; the others make the record corrupt to this build.
    pub const KNOWN: u8 = EXPIRES | MANIFEST | CHUNK;
}

/// A format or integrity problem: what is wrong and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Corrupt {
    /// The block, when one is to blame.
    pub block: Option<u64>,
    /// What is wrong.
    pub what: String,
}

impl fmt::Display for Corrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.block {
            Some(b) => write!(f, "corrupt block {b}: {}", self.what),
            None => write!(f, "corrupt data: {}", self.what),
        }
    }
}

pub(crate) fn corrupt(block: u64, what: impl Into<String>) -> Corrupt {
    Corrupt { block: Some(block), what: what.into() }
}

// ---------------------------------------------------------------------------------------------
// Little-endian field access.

#[inline]
pub(crate) fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
#[inline]
pub(crate) fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
#[inline]
pub(crate) fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
#[inline]
pub(crate) fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
#[inline]
pub(crate) fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
#[inline]
pub(crate) fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

// ---------------------------------------------------------------------------------------------
// CRC32C (Castagnoli): the shard crate's, shared with the per-shard log (SSE4.2 when present).

pub use corebuf_shard::log::crc32c_append;

/// CRC32C of `data`.
#[cfg(test)]
fn crc32c(data: &[u8]) -> u32 {
    crc32c_append(0, data)
}

/// Bytes of a block its checksum covers: for record and extent blocks the header and the
/// bytes in use (what a reader ever interprets; the unused tail is not read, so a flipped bit
/// there is harmless), for other blocks all of it. The length comes from the header itself,
/// which the checksum covers: a damaged length makes the checksum fail.
pub fn covered_len(block: &[u8]) -> usize {
    match block[6] {
        kind::HEAD | kind::OVERFLOW => {
            RECORD_BLOCK_HEADER + (get_u16(block, rb::USED) as usize).min(RECORD_AREA)
        }
        kind::EXTENT => EXTENT_HEADER + (get_u32(block, eb::LEN) as usize).min(EXTENT_PAYLOAD),
        _ => block.len(),
    }
}

/// The checksum of a block: CRC32C over its [`covered_len`] bytes with the CRC field read as
/// zero.
pub fn block_crc(block: &[u8]) -> u32 {
    let end = covered_len(block).min(block.len());
    let c = crc32c_append(0, &block[..CRC_AT]);
    let c = crc32c_append(c, &[0; 4]);
    crc32c_append(c, &block[CRC_AT + 4..end])
}

/// Stores the block's checksum in its header.
pub fn seal(block: &mut [u8]) {
    let crc = block_crc(block);
    put_u32(block, CRC_AT, crc);
}

/// [`seal`]s a block that carries the format's magic (the engine's `seal_on_write` hook: the
/// server changes cached blocks without sealing them, and every write to the device seals
/// the bytes it writes). A block without the magic is left as it is: only a block of zeroes
/// (a freed or never-used one) is written without it.
pub fn seal_if_formatted(block: &mut [u8]) {
    if block[..4] == MAGIC {
        seal(block);
    }
}

/// Whether every byte is zero (a block never written).
pub fn is_zero(block: &[u8]) -> bool {
    let mut words = block.chunks_exact(8);
    words.by_ref().all(|w| w == [0u8; 8]) && words.remainder().iter().all(|&b| b == 0)
}

/// What the common header says, once magic, version and checksum are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The block kind.
    pub kind: u8,
    /// The block number the block names itself with.
    pub block: u64,
    /// The allocation tag (0 for fixed blocks).
    pub tag: u64,
}

/// Outcome of checking a block read from the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// All zeroes: never written.
    Zero,
    /// A valid block of this format.
    Valid(Header),
}

/// Checks the common header of `data` (read as block `block`): magic, version, checksum.
/// A block that is all zeroes is [`Check::Zero`]; anything else that fails is corrupt.
pub fn check_block(block: u64, data: &[u8]) -> Result<Check, Corrupt> {
    check_block_with(block, data, true)
}

/// [`check_block`] without the checksum, for a block already in the cache: its checksum was
/// verified when it was read from the device (the engine's `check_on_read` runs
/// [`check_block`]), and a cached block that changed is sealed again only as it is written
/// ([`seal_if_formatted`]). Computing the CRC of a whole block on every cache hit cost 13 %
/// of a GET.
pub fn check_block_cached(block: u64, data: &[u8]) -> Result<Check, Corrupt> {
    check_block_with(block, data, false)
}

fn check_block_with(block: u64, data: &[u8], verify_crc: bool) -> Result<Check, Corrupt> {
    if data[..4] != MAGIC {
        if is_zero(data) {
            return Ok(Check::Zero);
        }
        return Err(corrupt(block, "bad magic (not a corebuf-kv block)"));
    }
    let version = get_u16(data, 4);
    if version != FORMAT_VERSION {
        return Err(corrupt(block, format!("format version {version}, expected {FORMAT_VERSION}")));
    }
    if verify_crc {
        let stored = get_u32(data, CRC_AT);
        let computed = block_crc(data);
        if stored != computed {
            return Err(corrupt(
                block,
                format!("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"),
            ));
        }
    }
    let header = Header { kind: data[6], block: get_u64(data, 8), tag: get_u64(data, 16) };
    if header.block != block {
        return Err(corrupt(block, format!("block names itself {}", header.block)));
    }
    Ok(Check::Valid(header))
}

/// Writes the common header (the checksum is filled by [`seal`]).
pub fn write_header(data: &mut [u8], kind_byte: u8, block: u64, tag: u64) {
    data[..4].copy_from_slice(&MAGIC);
    put_u16(data, 4, FORMAT_VERSION);
    data[6] = kind_byte;
    data[7] = 0;
    put_u64(data, 8, block);
    put_u64(data, 16, tag);
    put_u32(data, CRC_AT, 0);
    put_u32(data, 28, 0);
}

// ---------------------------------------------------------------------------------------------
// SipHash-2-4, keyed with the 128-bit key stored in the superblock: a stable hash (the layout
// depends on it) that an attacker who does not know the key cannot flood one bucket with.

/// SipHash-2-4 of `data` under key `(k0, k1)`.
pub fn siphash24(k0: u64, k1: u64, data: &[u8]) -> u64 {
    let mut v0 = k0 ^ 0x736f_6d65_7073_6575;
    let mut v1 = k1 ^ 0x646f_7261_6e64_6f6d;
    let mut v2 = k0 ^ 0x6c79_6765_6e65_7261;
    let mut v3 = k1 ^ 0x7465_6462_7974_6573;
    #[inline(always)]
    fn round(v0: &mut u64, v1: &mut u64, v2: &mut u64, v3: &mut u64) {
        *v0 = v0.wrapping_add(*v1);
        *v1 = v1.rotate_left(13);
        *v1 ^= *v0;
        *v0 = v0.rotate_left(32);
        *v2 = v2.wrapping_add(*v3);
        *v3 = v3.rotate_left(16);
        *v3 ^= *v2;
        *v0 = v0.wrapping_add(*v3);
        *v3 = v3.rotate_left(21);
        *v3 ^= *v0;
        *v2 = v2.wrapping_add(*v1);
        *v1 = v1.rotate_left(17);
        *v1 ^= *v2;
        *v2 = v2.rotate_left(32);
    }
    let mut words = data.chunks_exact(8);
    for word in &mut words {
        let m = u64::from_le_bytes(word.try_into().expect("8 bytes"));
        v3 ^= m;
        round(&mut v0, &mut v1, &mut v2, &mut v3);
        round(&mut v0, &mut v1, &mut v2, &mut v3);
        v0 ^= m;
    }
    let mut last = (data.len() as u64 & 0xFF) << 56;
    for (i, &byte) in words.remainder().iter().enumerate() {
        last |= (byte as u64) << (8 * i);
    }
    v3 ^= last;
    round(&mut v0, &mut v1, &mut v2, &mut v3);
    round(&mut v0, &mut v1, &mut v2, &mut v3);
    v0 ^= last;
    v2 ^= 0xFF;
    for _ in 0..4 {
        round(&mut v0, &mut v1, &mut v2, &mut v3);
    }
    v0 ^ v1 ^ v2 ^ v3
}

/// A bijective 64-bit mixer (splitmix64's finaliser): distinct inputs give distinct tags.
pub fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

// ---------------------------------------------------------------------------------------------
// Large values: the manifest a user key's record holds, and the chunk keys.

/// Bytes of an encoded [`Manifest`].
pub const MANIFEST_BYTES: usize = 32;
/// The manifest layout version (byte 0 of a manifest).
pub const MANIFEST_VERSION: u8 = 1;
/// Bytes of a chunk key: the tag (8) and the chunk index (4).
pub const CHUNK_KEY_BYTES: usize = 12;

/// What a user key's record holds when its value is larger than one record ([`MAX_VALUE`]):
/// the value is cut into `count` chunks of `chunk_bytes` (the last one shorter), chunk `i`
/// stored as an internal chunk record under [`chunk_key`]`(tag, i)`. FORMAT.md, "Large values".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// The value's length in bytes.
    pub total_len: u64,
    /// The random per-write tag every chunk key of this value starts with.
    pub tag: u64,
    /// Bytes per chunk (the last chunk holds the rest).
    pub chunk_bytes: u32,
    /// Chunks: `ceil(total_len / chunk_bytes)`.
    pub count: u32,
}

impl Manifest {
    /// A manifest for a value of `total_len` bytes in chunks of `chunk_bytes`.
    pub fn new(total_len: u64, tag: u64, chunk_bytes: u32) -> Manifest {
        let count = total_len.div_ceil(chunk_bytes as u64) as u32;
        Manifest { total_len, tag, chunk_bytes, count }
    }

    /// The 32-byte encoding (the record's value).
    pub fn encode(&self) -> [u8; MANIFEST_BYTES] {
        let mut b = [0u8; MANIFEST_BYTES];
        b[0] = MANIFEST_VERSION;
        put_u32(&mut b, 4, self.chunk_bytes);
        put_u64(&mut b, 8, self.total_len);
        put_u64(&mut b, 16, self.tag);
        put_u32(&mut b, 24, self.count);
        b
    }

    /// Decodes a manifest record's value; an error says what is wrong with it.
    pub fn decode(b: &[u8]) -> Result<Manifest, String> {
        if b.len() != MANIFEST_BYTES || b[0] != MANIFEST_VERSION {
            return Err(format!(
                "a large-value manifest of {} bytes, version {:?}",
                b.len(),
                b.first()
            ));
        }
        let m = Manifest {
            chunk_bytes: get_u32(b, 4),
            total_len: get_u64(b, 8),
            tag: get_u64(b, 16),
            count: get_u32(b, 24),
        };
        let chunk_ok = (1..=MAX_VALUE as u32).contains(&m.chunk_bytes);
        if !chunk_ok
            || m.total_len > PROTO_MAX_BULK as u64
            || m.count as u64 != m.total_len.div_ceil(m.chunk_bytes.max(1) as u64)
        {
            return Err(format!("an inconsistent large-value manifest {m:?}"));
        }
        Ok(m)
    }

    /// The byte length of chunk `index`.
    pub fn chunk_len(&self, index: u32) -> usize {
        let start = index as u64 * self.chunk_bytes as u64;
        (self.total_len - start).min(self.chunk_bytes as u64) as usize
    }
}

/// The key of chunk `index` of the large value with `tag`: the tag and the index,
/// little-endian. It is hashed like any key (so chunks spread over ranges and shards), and it
/// names a record only together with [`rflags::CHUNK`]: a user key with the same bytes is
/// another key.
pub fn chunk_key(tag: u64, index: u32) -> [u8; CHUNK_KEY_BYTES] {
    let mut k = [0u8; CHUNK_KEY_BYTES];
    put_u64(&mut k, 0, tag);
    put_u32(&mut k, 8, index);
    k
}

// ---------------------------------------------------------------------------------------------
// Superblock.

/// The superblock's fields (both copies, blocks 0 and 1, hold one of these; the valid copy
/// with the highest sequence wins).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Bumped on every superblock write; the copy in block `sequence % 2` is written.
    pub sequence: u64,
    /// Blocks of the device when it was formatted.
    pub device_blocks: u64,
    /// Bumped on every open: versions and tags are `(epoch << 40) | counter`.
    pub epoch: u64,
    /// Range headers stamped with an epoch below this are not trusted (a crash happened
    /// after they were written).
    pub valid_from: u64,
    /// Whether the last session shut down cleanly (range headers written, all flushed).
    pub clean: bool,
    /// The SipHash key.
    pub hash_key: (u64, u64),
    /// Seconds since the Unix epoch at format time (informative).
    pub created_unix: u64,
}

/// Superblock field offsets.
mod sb {
    pub const SEQUENCE: usize = 32;
    pub const BLOCK_SIZE: usize = 40;
    pub const RANGE_BLOCKS: usize = 44;
    pub const BUCKETS: usize = 48;
    pub const MAX_VALUE: usize = 52;
    pub const DEVICE_BLOCKS: usize = 56;
    pub const EPOCH: usize = 64;
    pub const VALID_FROM: usize = 72;
    pub const CLEAN: usize = 80;
    pub const K0: usize = 88;
    pub const K1: usize = 96;
    pub const CREATED: usize = 104;
}

impl Superblock {
    /// The block image of this superblock (copy `sequence % 2`).
    pub fn encode(&self) -> Vec<u8> {
        let block = self.sequence % 2;
        let mut data = vec![0u8; BLOCK_SIZE];
        write_header(&mut data, kind::SUPER, block, 0);
        put_u64(&mut data, sb::SEQUENCE, self.sequence);
        put_u32(&mut data, sb::BLOCK_SIZE, BLOCK_SIZE as u32);
        put_u32(&mut data, sb::RANGE_BLOCKS, RANGE_BLOCKS as u32);
        put_u32(&mut data, sb::BUCKETS, BUCKETS_PER_RANGE as u32);
        put_u32(&mut data, sb::MAX_VALUE, MAX_VALUE as u32);
        put_u64(&mut data, sb::DEVICE_BLOCKS, self.device_blocks);
        put_u64(&mut data, sb::EPOCH, self.epoch);
        put_u64(&mut data, sb::VALID_FROM, self.valid_from);
        data[sb::CLEAN] = self.clean as u8;
        put_u64(&mut data, sb::K0, self.hash_key.0);
        put_u64(&mut data, sb::K1, self.hash_key.1);
        put_u64(&mut data, sb::CREATED, self.created_unix);
        seal(&mut data);
        data
    }

    /// Decodes one copy read from block `block` (0 or 1).
    pub fn decode(block: u64, data: &[u8]) -> Result<Option<Superblock>, String> {
        if data[..4] != MAGIC {
            if is_zero(data) {
                return Ok(None);
            }
            return Err(format!(
                "block {block} does not start with the corebuf-kv magic \"CBKV\": \
                 not a corebuf-kv data file"
            ));
        }
        let version = get_u16(data, 4);
        if version != FORMAT_VERSION {
            if version == 1 {
                return Err(format!(
                    "the data file has format version 1 (corebuf-kv before key expiry); this \
                     build reads version {FORMAT_VERSION} only: export the keys with the older \
                     build (e.g. SCAN + GET with redis-cli) and load them into a new file"
                ));
            }
            return Err(format!(
                "the data file has format version {version}; this build reads version \
                 {FORMAT_VERSION} only"
            ));
        }
        match check_block(block, data) {
            Ok(Check::Valid(h)) if h.kind == kind::SUPER => {}
            Ok(_) => return Err(format!("block {block} is not a superblock")),
            Err(e) => return Err(format!("superblock copy {block}: {e}")),
        }
        let geometry = (
            get_u32(data, sb::BLOCK_SIZE) as usize,
            get_u32(data, sb::RANGE_BLOCKS) as u64,
            get_u32(data, sb::BUCKETS) as u64,
            get_u32(data, sb::MAX_VALUE) as usize,
        );
        if geometry != (BLOCK_SIZE, RANGE_BLOCKS, BUCKETS_PER_RANGE, MAX_VALUE) {
            return Err(format!(
                "superblock geometry (block size, range blocks, buckets, max value) = \
                 {geometry:?}, this build uses {:?}",
                (BLOCK_SIZE, RANGE_BLOCKS, BUCKETS_PER_RANGE, MAX_VALUE)
            ));
        }
        let sequence = get_u64(data, sb::SEQUENCE);
        if sequence % 2 != block {
            return Err(format!("superblock copy {block} holds sequence {sequence}"));
        }
        Ok(Some(Superblock {
            sequence,
            device_blocks: get_u64(data, sb::DEVICE_BLOCKS),
            epoch: get_u64(data, sb::EPOCH),
            valid_from: get_u64(data, sb::VALID_FROM),
            clean: data[sb::CLEAN] == 1,
            hash_key: (get_u64(data, sb::K0), get_u64(data, sb::K1)),
            created_unix: get_u64(data, sb::CREATED),
        }))
    }
}

// ---------------------------------------------------------------------------------------------
// Range header.

/// Range header field offsets.
mod rh {
    pub const RANGE: usize = 32;
    pub const STAMP: usize = 40;
    pub const KEYS: usize = 48;
    pub const BITS: usize = 56;
    pub const BITMAP: usize = 64;
}

/// What a range header stores: the allocation bitmap and the key count, valid as of the clean
/// shutdown of epoch `stamp`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeHeader {
    /// The range index.
    pub range: u64,
    /// The epoch whose clean shutdown wrote it.
    pub stamp: u64,
    /// Live keys in the range.
    pub keys: u64,
    /// One bit per block of the range, 1 = in use (LSB-first words).
    pub bitmap: Vec<u64>,
}

impl RangeHeader {
    /// Fills a header block image.
    pub fn encode_into(&self, block: u64, data: &mut [u8]) {
        data.fill(0);
        write_header(data, kind::RANGE, block, 0);
        put_u64(data, rh::RANGE, self.range);
        put_u64(data, rh::STAMP, self.stamp);
        put_u64(data, rh::KEYS, self.keys);
        put_u32(data, rh::BITS, RANGE_BLOCKS as u32);
        for (i, word) in self.bitmap.iter().enumerate() {
            put_u64(data, rh::BITMAP + 8 * i, *word);
        }
        seal(data);
    }

    /// Decodes a checked header block; `None` if it is not a usable header of `range`.
    pub fn decode(range: u64, data: &[u8]) -> Option<RangeHeader> {
        if get_u64(data, rh::RANGE) != range || get_u32(data, rh::BITS) as u64 != RANGE_BLOCKS {
            return None;
        }
        let words = (RANGE_BLOCKS as usize).div_ceil(64);
        let bitmap = (0..words).map(|i| get_u64(data, rh::BITMAP + 8 * i)).collect();
        Some(RangeHeader {
            range,
            stamp: get_u64(data, rh::STAMP),
            keys: get_u64(data, rh::KEYS),
            bitmap,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Record blocks (bucket heads and overflow blocks).

/// Record block field offsets.
pub mod rb {
    /// Next block of the chain (absolute, 0 = none).
    pub const NEXT: usize = 32;
    /// The tag the next block must carry.
    pub const NEXT_TAG: usize = 40;
    /// The bucket id (`range * BUCKETS_PER_RANGE + bucket`).
    pub const BUCKET: usize = 48;
    /// Number of records.
    pub const COUNT: usize = 56;
    /// Bytes of the record area in use.
    pub const USED: usize = 58;
}

/// One record as found in a block: where it is and what it says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordRef {
    /// Offset in the block.
    pub offset: usize,
    /// Total length.
    pub len: usize,
    /// Record type.
    pub rtype: u8,
    /// Version (higher wins).
    pub version: u64,
    /// Key bytes (offset, length).
    pub key: (usize, usize),
    /// Value length.
    pub value_len: usize,
    /// Absolute expiry, unix milliseconds; 0 when the record has none.
    pub expires: u64,
    /// The flags byte ([`rflags`]).
    pub flags: u8,
    /// Inline value (offset) or extents (tag, block offsets within the range).
    pub body: Body,
}

impl RecordRef {
    /// Whether this is an internal chunk record ([`rflags::CHUNK`]).
    pub fn is_chunk(&self) -> bool {
        self.flags & rflags::CHUNK != 0
    }

    /// Whether its value is a large-value manifest ([`rflags::MANIFEST`]).
    pub fn is_manifest(&self) -> bool {
        self.flags & rflags::MANIFEST != 0
    }
}

/// Where a record's value is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    /// In the record, at this offset of the block.
    Inline(usize),
    /// In extent blocks with this tag, at these offsets within the range.
    Extents(u64, Vec<u16>),
}

/// The state of a record block, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordBlock {
    /// Next block and its tag (0, 0 = end of chain).
    pub next: (u64, u64),
    /// Record count.
    pub count: usize,
    /// Bytes used in the record area.
    pub used: usize,
}

/// Number of extent blocks for a value of `len` bytes.
pub fn extent_count(len: usize) -> usize {
    len.div_ceil(EXTENT_PAYLOAD)
}

/// Bytes of a record before its key: the header, and the expiry field if it has one
/// (`expires != 0`).
pub fn record_prefix_len(expires: u64) -> usize {
    RECORD_HEADER + if expires != 0 { EXPIRY_BYTES } else { 0 }
}

/// Length of an inline record.
pub fn inline_record_len(key: usize, value: usize, expires: u64) -> usize {
    record_prefix_len(expires) + key + value
}

/// Length of an extent record.
pub fn extent_record_len(key: usize, extents: usize, expires: u64) -> usize {
    record_prefix_len(expires) + key + 10 + 2 * extents
}

/// Reads the record block fields of a checked head or overflow block, validating the
/// record area (`bucket` is the bucket id it must belong to).
pub fn parse_record_block(block: u64, data: &[u8], bucket: u64) -> Result<RecordBlock, Corrupt> {
    let stored_bucket = get_u64(data, rb::BUCKET);
    if stored_bucket != bucket {
        return Err(corrupt(block, format!("belongs to bucket {stored_bucket}, not {bucket}")));
    }
    let count = get_u16(data, rb::COUNT) as usize;
    let used = get_u16(data, rb::USED) as usize;
    if used > RECORD_AREA {
        return Err(corrupt(block, format!("record area of {used} bytes")));
    }
    Ok(RecordBlock { next: (get_u64(data, rb::NEXT), get_u64(data, rb::NEXT_TAG)), count, used })
}

/// Iterates the records of a checked record block; a malformed record is an error.
pub fn records(block: u64, data: &[u8], rbk: &RecordBlock) -> Result<Vec<RecordRef>, Corrupt> {
    let mut out = Vec::with_capacity(rbk.count);
    let end = RECORD_BLOCK_HEADER + rbk.used;
    let mut at = RECORD_BLOCK_HEADER;
    while at < end {
        let rec = parse_record(block, data, at, end)?;
        at += rec.len;
        out.push(rec);
    }
    if out.len() != rbk.count {
        return Err(corrupt(block, format!("{} records, header says {}", out.len(), rbk.count)));
    }
    Ok(out)
}

/// Parses the record at `at` (which must end by `end`).
pub fn parse_record(block: u64, data: &[u8], at: usize, end: usize) -> Result<RecordRef, Corrupt> {
    if at + RECORD_HEADER > end {
        return Err(corrupt(block, format!("truncated record at offset {at}")));
    }
    let rtype = data[at];
    let flags = data[at + 1];
    let key_len = get_u16(data, at + 2) as usize;
    let value_len = get_u32(data, at + 4) as usize;
    let version = get_u64(data, at + 8);
    if flags & !rflags::KNOWN != 0 || flags & rflags::MANIFEST & (flags >> 1) != 0 {
        return Err(corrupt(block, format!("record at {at}: unknown flags {flags:#04x}")));
    }
    let expires = if flags & rflags::EXPIRES != 0 {
        if at + RECORD_HEADER + EXPIRY_BYTES > end {
            return Err(corrupt(block, format!("truncated record at offset {at}")));
        }
        match get_u64(data, at + RECORD_HEADER) {
            0 => return Err(corrupt(block, format!("record at {at}: expiry flag with time 0"))),
            t => t,
        }
    } else {
        0
    };
    let key_at = at + record_prefix_len(expires);
    let key = (key_at, key_len);
    if key_len > MAX_KEY || value_len > MAX_VALUE {
        return Err(corrupt(block, format!("record at {at}: key {key_len} / value {value_len}")));
    }
    let (len, body) = match rtype {
        rtype::INLINE => {
            (inline_record_len(key_len, value_len, expires), Body::Inline(key_at + key_len))
        }
        rtype::EXTENTS => {
            let meta = key_at + key_len;
            if meta + 10 > end {
                return Err(corrupt(block, format!("truncated extent record at {at}")));
            }
            let tag = get_u64(data, meta);
            let n = get_u16(data, meta + 8) as usize;
            if n != extent_count(value_len) || meta + 10 + 2 * n > end {
                return Err(corrupt(block, format!("extent record at {at}: {n} extents")));
            }
            let list = (0..n).map(|i| get_u16(data, meta + 10 + 2 * i)).collect();
            (extent_record_len(key_len, n, expires), Body::Extents(tag, list))
        }
        other => return Err(corrupt(block, format!("record type {other} at offset {at}"))),
    };
    if at + len > end {
        return Err(corrupt(block, format!("record at {at} overruns the record area")));
    }
    Ok(RecordRef { offset: at, len, rtype, version, key, value_len, expires, flags, body })
}

/// Writes a record's header, expiry field and key into `r`; returns where the key ends.
fn put_record_head(
    r: &mut [u8],
    rt: u8,
    key: &[u8],
    value_len: usize,
    version: u64,
    expires: u64,
    kind_flags: u8,
) -> usize {
    r[0] = rt;
    r[1] = kind_flags | if expires != 0 { rflags::EXPIRES } else { 0 };
    put_u16(r, 2, key.len() as u16);
    put_u32(r, 4, value_len as u32);
    put_u64(r, 8, version);
    if expires != 0 {
        put_u64(r, RECORD_HEADER, expires);
    }
    let key_at = record_prefix_len(expires);
    r[key_at..key_at + key.len()].copy_from_slice(key);
    key_at + key.len()
}

/// Encodes an inline record (`expires`: unix milliseconds, 0 for none).
#[cfg(test)]
pub fn encode_inline(key: &[u8], value: &[u8], version: u64, expires: u64) -> Vec<u8> {
    encode_inline_with(key, value, version, expires, 0)
}

/// Encodes an inline record with the kind flags `kind_flags` ([`rflags::MANIFEST`] or
/// [`rflags::CHUNK`], or 0; the expiry flag follows from `expires`).
#[cfg(test)]
pub fn encode_inline_with(
    key: &[u8],
    value: &[u8],
    version: u64,
    expires: u64,
    kind_flags: u8,
) -> Vec<u8> {
    let mut r = Vec::new();
    encode_inline_into(&mut r, key, value, version, expires, kind_flags);
    r
}

/// [`encode_inline_with`] into `out` (its bytes replaced, its capacity reused).
pub fn encode_inline_into(
    out: &mut Vec<u8>,
    key: &[u8],
    value: &[u8],
    version: u64,
    expires: u64,
    kind_flags: u8,
) {
    out.clear();
    out.resize(inline_record_len(key.len(), value.len(), expires), 0);
    let at = put_record_head(out, rtype::INLINE, key, value.len(), version, expires, kind_flags);
    out[at..].copy_from_slice(value);
}

/// Encodes an extent record (`expires`: unix milliseconds, 0 for none).
#[cfg(test)]
pub fn encode_extents(
    key: &[u8],
    value_len: usize,
    version: u64,
    expires: u64,
    tag: u64,
    list: &[u16],
) -> Vec<u8> {
    encode_extents_with(key, value_len, version, expires, tag, list, 0)
}

/// Encodes an extent record with the kind flags `kind_flags` (as [`encode_inline_with`]).
pub fn encode_extents_with(
    key: &[u8],
    value_len: usize,
    version: u64,
    expires: u64,
    tag: u64,
    list: &[u16],
    kind_flags: u8,
) -> Vec<u8> {
    let mut r = vec![0u8; extent_record_len(key.len(), list.len(), expires)];
    let meta =
        put_record_head(&mut r, rtype::EXTENTS, key, value_len, version, expires, kind_flags);
    put_u64(&mut r, meta, tag);
    put_u16(&mut r, meta + 8, list.len() as u16);
    for (i, &b) in list.iter().enumerate() {
        put_u16(&mut r, meta + 10 + 2 * i, b);
    }
    r
}

/// Initialises a record block image (head or overflow) with no records.
pub fn init_record_block(data: &mut [u8], kind_byte: u8, block: u64, tag: u64, bucket: u64) {
    data.fill(0);
    write_header(data, kind_byte, block, tag);
    put_u64(data, rb::BUCKET, bucket);
}

/// Appends an encoded record to a record block (the caller checked that it fits).
pub fn append_record(data: &mut [u8], record: &[u8]) {
    let count = get_u16(data, rb::COUNT);
    let used = get_u16(data, rb::USED) as usize;
    let at = RECORD_BLOCK_HEADER + used;
    data[at..at + record.len()].copy_from_slice(record);
    put_u16(data, rb::COUNT, count + 1);
    put_u16(data, rb::USED, (used + record.len()) as u16);
}

/// Removes the record at `offset` of length `len`, closing the gap.
pub fn remove_record(data: &mut [u8], offset: usize, len: usize) {
    let count = get_u16(data, rb::COUNT);
    let used = get_u16(data, rb::USED) as usize;
    let end = RECORD_BLOCK_HEADER + used;
    data.copy_within(offset + len..end, offset);
    data[end - len..end].fill(0);
    put_u16(data, rb::COUNT, count - 1);
    put_u16(data, rb::USED, (used - len) as u16);
}

/// Sets the chain link of a record block.
pub fn set_next(data: &mut [u8], next: u64, tag: u64) {
    put_u64(data, rb::NEXT, next);
    put_u64(data, rb::NEXT_TAG, tag);
}

// ---------------------------------------------------------------------------------------------
// Extent blocks.

/// Extent block field offsets.
mod eb {
    pub const BUCKET: usize = 32;
    pub const INDEX: usize = 40;
    pub const LEN: usize = 44;
}

/// Fills an extent block image: part `index` of a value with `tag`.
pub fn encode_extent(data: &mut [u8], block: u64, tag: u64, bucket: u64, index: u32, part: &[u8]) {
    data.fill(0);
    write_header(data, kind::EXTENT, block, tag);
    put_u64(data, eb::BUCKET, bucket);
    put_u32(data, eb::INDEX, index);
    put_u32(data, eb::LEN, part.len() as u32);
    data[EXTENT_HEADER..EXTENT_HEADER + part.len()].copy_from_slice(part);
    seal(data);
}

/// What an extent block holds, for a reader that expects part `index` of value `tag`.
#[derive(Debug, PartialEq, Eq)]
pub enum ExtentCheck<'a> {
    /// The expected part.
    Part(&'a [u8]),
    /// Something else (never written, or another value's block): the value this record
    /// describes never reached the device (a crash cut its write short).
    Missing,
}

/// Checks an extent block read as block `block` against what a record expects.
pub fn check_extent<'a>(
    block: u64,
    data: &'a [u8],
    tag: u64,
    bucket: u64,
    index: u32,
    expect_len: usize,
) -> Result<ExtentCheck<'a>, Corrupt> {
    let header = match check_block_cached(block, data)? {
        Check::Zero => return Ok(ExtentCheck::Missing),
        Check::Valid(h) => h,
    };
    if header.kind != kind::EXTENT
        || header.tag != tag
        || get_u64(data, eb::BUCKET) != bucket
        || get_u32(data, eb::INDEX) != index
    {
        return Ok(ExtentCheck::Missing);
    }
    let len = get_u32(data, eb::LEN) as usize;
    if len != expect_len {
        return Err(corrupt(block, format!("extent part of {len} bytes, expected {expect_len}")));
    }
    Ok(ExtentCheck::Part(&data[EXTENT_HEADER..EXTENT_HEADER + len]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_checksum_is_crc32c_as_format_md_says() {
        // The implementation is the shard crate's (tested there, both paths); this pins the
        // on-disk choice of FORMAT.md.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c_append(crc32c(b"1234"), b"56789"), 0xE306_9283);
    }

    #[test]
    fn siphash_matches_the_reference_vectors() {
        let (k0, k1) = (0x0706_0504_0302_0100, 0x0F0E_0D0C_0B0A_0908);
        assert_eq!(siphash24(k0, k1, b""), 0x726F_DB47_DD0E_0E31);
        let msg: Vec<u8> = (0..15).collect();
        assert_eq!(siphash24(k0, k1, &msg), 0xA129_CA61_49BE_45E5);
        #[allow(deprecated)]
        for len in 0..40 {
            use std::hash::Hasher;
            let data: Vec<u8> = (0..len as u8).map(|b| b.wrapping_mul(31)).collect();
            let mut std_hasher = std::hash::SipHasher::new_with_keys(k0 ^ 99, k1);
            std_hasher.write(&data);
            assert_eq!(siphash24(k0 ^ 99, k1, &data), std_hasher.finish(), "len {len}");
        }
    }

    #[test]
    fn superblock_round_trips_and_rejects_damage() {
        let sb = Superblock {
            sequence: 7,
            device_blocks: 4096,
            epoch: 3,
            valid_from: 2,
            clean: true,
            hash_key: (1, 2),
            created_unix: 5,
        };
        let mut data = sb.encode();
        assert_eq!(Superblock::decode(1, &data), Ok(Some(sb.clone())));
        assert!(Superblock::decode(0, &data).is_err(), "the copy names its block");
        data[200] ^= 1;
        assert!(Superblock::decode(1, &data).unwrap_err().contains("checksum"));
        assert_eq!(Superblock::decode(0, &vec![0u8; BLOCK_SIZE]), Ok(None));
        let mut other = vec![0u8; BLOCK_SIZE];
        other[..8].copy_from_slice(b"SQLite f");
        assert!(Superblock::decode(0, &other).unwrap_err().contains("not a corebuf-kv"));
        let mut future = sb.encode();
        put_u16(&mut future, 4, 3);
        assert!(Superblock::decode(1, &future).unwrap_err().contains("format version 3"));
        let mut old = sb.encode();
        put_u16(&mut old, 4, 1);
        assert!(Superblock::decode(1, &old).unwrap_err().contains("before key expiry"));
    }

    #[test]
    fn record_blocks_append_parse_and_remove() {
        let mut data = vec![0u8; BLOCK_SIZE];
        init_record_block(&mut data, kind::HEAD, 300, 0, 17);
        let a = encode_inline(b"alpha", b"one", 10, 0);
        let b = encode_extents(b"beta", 9000, 11, 0, 0xABCD, &[70, 71, 72]);
        append_record(&mut data, &a);
        append_record(&mut data, &b);
        seal(&mut data);
        assert_eq!(
            check_block(300, &data).unwrap(),
            Check::Valid(Header { kind: kind::HEAD, block: 300, tag: 0 })
        );
        let rbk = parse_record_block(300, &data, 17).unwrap();
        let recs = records(300, &data, &rbk).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(&data[recs[0].key.0..recs[0].key.0 + 5], b"alpha");
        assert_eq!(recs[1].body, Body::Extents(0xABCD, vec![70, 71, 72]));
        remove_record(&mut data, recs[0].offset, recs[0].len);
        seal(&mut data);
        let rbk = parse_record_block(300, &data, 17).unwrap();
        let recs = records(300, &data, &rbk).unwrap();
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].version, 11);
        assert!(parse_record_block(300, &data, 18).is_err(), "another bucket's block");
        let used_end = RECORD_BLOCK_HEADER + rbk.used;
        data[used_end + 10] ^= 0xFF;
        assert!(check_block(300, &data).is_ok(), "the unused tail is not interpreted");
        data[used_end - 1] ^= 0xFF;
        assert!(check_block(300, &data).is_err(), "the checksum catches a flipped byte");
        data[used_end - 1] ^= 0xFF;
        put_u16(&mut data, rb::USED, 40);
        assert!(check_block(300, &data).is_err(), "a damaged length fails the checksum");
    }

    #[test]
    fn extents_check_tag_index_and_checksum() {
        let mut data = vec![0u8; BLOCK_SIZE];
        encode_extent(&mut data, 900, 77, 5, 2, b"payload");
        assert_eq!(check_extent(900, &data, 77, 5, 2, 7).unwrap(), ExtentCheck::Part(b"payload"));
        assert_eq!(check_extent(900, &data, 78, 5, 2, 7).unwrap(), ExtentCheck::Missing);
        assert_eq!(check_extent(900, &data, 77, 5, 3, 7).unwrap(), ExtentCheck::Missing);
        assert_eq!(
            check_extent(900, &vec![0; BLOCK_SIZE], 77, 5, 2, 7).unwrap(),
            ExtentCheck::Missing
        );
        // A damaged payload is caught by the checksum when the block comes from the device
        // (check_block, the engine's check_on_read); check_extent sees cached blocks only.
        data[EXTENT_HEADER] ^= 1;
        assert!(check_block(900, &data).is_err());
        assert!(check_extent(900, &data, 77, 5, 2, 7).is_ok());
        // A wrong length with the right tag is corruption even in the cache.
        put_u32(&mut data, 44, 9000);
        assert!(check_extent(900, &data, 77, 5, 2, 7).is_err());
    }

    #[test]
    fn manifests_and_chunk_keys_are_pinned() {
        let m = Manifest::new(100 << 20, 0x0102_0304_0506_0708, 8096);
        assert_eq!(m.count, (100u64 << 20).div_ceil(8096) as u32);
        let b = m.encode();
        assert_eq!(b[0], MANIFEST_VERSION);
        assert_eq!(&b[1..4], &[0, 0, 0]);
        assert_eq!(get_u32(&b, 4), 8096);
        assert_eq!(get_u64(&b, 8), 100 << 20);
        assert_eq!(get_u64(&b, 16), 0x0102_0304_0506_0708);
        assert_eq!(get_u32(&b, 24), m.count);
        assert_eq!(&b[28..], &[0, 0, 0, 0]);
        assert_eq!(Manifest::decode(&b), Ok(m));
        assert_eq!(m.chunk_len(0), 8096);
        assert_eq!(m.chunk_len(m.count - 1), ((100 << 20) - 8096 * (m.count as u64 - 1)) as usize);
        let mut bad = b;
        put_u32(&mut bad, 24, m.count + 1);
        assert!(Manifest::decode(&bad).is_err(), "a count that does not match the length");
        assert!(Manifest::decode(&b[..31]).is_err());
        let k = chunk_key(0x0102_0304_0506_0708, 5);
        assert_eq!(k, [8, 7, 6, 5, 4, 3, 2, 1, 5, 0, 0, 0]);
        let r = encode_inline_with(&k, b"chunk", 9, 0, rflags::CHUNK);
        assert_eq!(r[1], rflags::CHUNK, "byte 1 bit 2: a chunk record");
        let r = encode_inline_with(b"user", &b, 9, 77, rflags::MANIFEST);
        assert_eq!(r[1], rflags::MANIFEST | rflags::EXPIRES, "bit 1: a manifest; bit 0: expiry");
    }

    #[test]
    fn records_with_an_expiry_carry_it_after_the_header() {
        let expires = 1_700_000_000_123u64;
        let r = encode_inline(b"key", b"value", 42, expires);
        assert_eq!(r.len(), 16 + 8 + 3 + 5);
        assert_eq!(r[0], rtype::INLINE);
        assert_eq!(r[1], rflags::EXPIRES, "byte 1 is the flags byte, bit 0 = expiry");
        assert_eq!(&r[16..24], &expires.to_le_bytes(), "little-endian unix ms at offset 16");
        assert_eq!(&r[24..27], b"key");
        assert_eq!(&r[27..], b"value");
        let plain = encode_inline(b"key", b"value", 42, 0);
        assert_eq!(plain.len(), 16 + 3 + 5);
        assert_eq!(plain[1], 0, "no expiry: no flag, no field");

        let mut data = vec![0u8; BLOCK_SIZE];
        init_record_block(&mut data, kind::HEAD, 300, 0, 17);
        append_record(&mut data, &r);
        append_record(&mut data, &plain);
        let ext = encode_extents(b"big", 9000, 43, expires + 1, 0xABCD, &[70, 71, 72]);
        append_record(&mut data, &ext);
        seal(&mut data);
        let rbk = parse_record_block(300, &data, 17).unwrap();
        let recs = records(300, &data, &rbk).unwrap();
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[0].expires, expires);
        let Body::Inline(at) = recs[0].body else { panic!("inline") };
        assert_eq!(&data[at..at + 5], b"value");
        assert_eq!(&data[recs[0].key.0..recs[0].key.0 + 3], b"key");
        assert_eq!(recs[1].expires, 0);
        assert_eq!(recs[2].expires, expires + 1);
        assert_eq!(&data[recs[2].key.0..recs[2].key.0 + 3], b"big");
        assert_eq!(recs[2].body, Body::Extents(0xABCD, vec![70, 71, 72]));

        // Flag bits this build does not know (bit 3 and up) are refused, and so is a record
        // that says it is a manifest and a chunk at once.
        let mut bad = data.clone();
        bad[RECORD_BLOCK_HEADER + 1] |= 8;
        assert!(parse_record(300, &bad, RECORD_BLOCK_HEADER, RECORD_BLOCK_HEADER + r.len())
            .unwrap_err()
            .what
            .contains("unknown flags"));
        let mut bad = data.clone();
        bad[RECORD_BLOCK_HEADER + 1] |= rflags::MANIFEST | rflags::CHUNK;
        assert!(parse_record(300, &bad, RECORD_BLOCK_HEADER, RECORD_BLOCK_HEADER + r.len())
            .unwrap_err()
            .what
            .contains("unknown flags"));
    }
}
