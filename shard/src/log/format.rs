//! The byte layout of a log region (docs/LOG-FORMAT.md describes it for humans; this module is
//! the implementation and its tests pin it). All integers are little-endian.

use super::crc::crc32c_append;

/// Blocks at the start of a region that hold the two header copies.
pub const HEADER_BLOCKS: u64 = 2;
/// Magic of a region header: `"CBLH"`.
pub const HEADER_MAGIC: [u8; 4] = *b"CBLH";
/// Magic of a record: `"CBLR"`.
pub const RECORD_MAGIC: [u8; 4] = *b"CBLR";
/// Version of this format.
pub const VERSION: u16 = 1;
/// Bytes of a record header.
pub const RECORD_HEADER_BYTES: usize = 32;
/// Records start at multiples of this many bytes of the log stream.
pub const RECORD_ALIGN: u64 = 8;
/// Bytes of the header copy that its checksum covers (the checksum follows them).
const HEADER_COVERED: usize = 52;

/// A region header: where replay starts, and which open of the log this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionHeader {
    /// Bumped at every header write; copy `sequence % 2` holds it.
    pub sequence: u64,
    /// The log position replay starts at (everything before it is checkpointed).
    pub start_lsn: u64,
    /// Bumped at every open; records carry its low 32 bits.
    pub epoch: u64,
    /// Bytes of the region, header blocks included.
    pub region_bytes: u64,
    /// The block size the region was formatted with.
    pub block_bytes: u64,
    /// The log was closed cleanly: nothing follows `start_lsn`.
    pub clean: bool,
}

/// What a header block holds.
#[derive(Debug, PartialEq, Eq)]
pub enum HeaderCheck {
    /// Never written.
    Zero,
    /// A valid header.
    Valid(RegionHeader),
    /// Something else: why it is not a header.
    Invalid(&'static str),
}

impl RegionHeader {
    /// Writes the header into `block` (zeroing the rest).
    pub fn encode_into(&self, block: &mut [u8]) {
        block.fill(0);
        block[0..4].copy_from_slice(&HEADER_MAGIC);
        block[4..6].copy_from_slice(&VERSION.to_le_bytes());
        block[8..16].copy_from_slice(&self.sequence.to_le_bytes());
        block[16..24].copy_from_slice(&self.start_lsn.to_le_bytes());
        block[24..32].copy_from_slice(&self.epoch.to_le_bytes());
        block[32..40].copy_from_slice(&self.region_bytes.to_le_bytes());
        block[40..48].copy_from_slice(&self.block_bytes.to_le_bytes());
        block[48..52].copy_from_slice(&u32::from(self.clean).to_le_bytes());
        let crc = crc32c_append(0, &block[..HEADER_COVERED]);
        block[52..56].copy_from_slice(&crc.to_le_bytes());
    }

    /// Reads a header block.
    pub fn decode(block: &[u8]) -> HeaderCheck {
        if block.iter().all(|&b| b == 0) {
            return HeaderCheck::Zero;
        }
        if block[0..4] != HEADER_MAGIC {
            return HeaderCheck::Invalid("not a corebuf log region (bad magic)");
        }
        if get_u16(block, 4) != VERSION {
            return HeaderCheck::Invalid("unknown log format version");
        }
        if crc32c_append(0, &block[..HEADER_COVERED]) != get_u32(block, 52) {
            return HeaderCheck::Invalid("header checksum mismatch");
        }
        HeaderCheck::Valid(RegionHeader {
            sequence: get_u64(block, 8),
            start_lsn: get_u64(block, 16),
            epoch: get_u64(block, 24),
            region_bytes: get_u64(block, 32),
            block_bytes: get_u64(block, 40),
            clean: get_u32(block, 48) == 1,
        })
    }
}

/// The fixed part of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// Payload bytes.
    pub len: u32,
    /// The record's position in the log stream.
    pub lsn: u64,
    /// The durable end of the log when the record was appended: everything before it had been
    /// flushed. Tells a torn tail from a corrupt record on open.
    pub durable_lsn: u64,
    /// Low 32 bits of the epoch (the open) that wrote the record.
    pub epoch: u32,
}

/// Bytes a record with `payload_len` payload bytes takes in the stream, padding included.
pub fn record_bytes(payload_len: usize) -> u64 {
    (RECORD_HEADER_BYTES as u64 + payload_len as u64).next_multiple_of(RECORD_ALIGN)
}

/// The record's header bytes, with its checksum over them and `payload`.
pub fn encode_record_header(header: &RecordHeader, payload: &[u8]) -> [u8; RECORD_HEADER_BYTES] {
    let mut out = [0u8; RECORD_HEADER_BYTES];
    out[0..4].copy_from_slice(&RECORD_MAGIC);
    out[4..8].copy_from_slice(&header.len.to_le_bytes());
    out[8..16].copy_from_slice(&header.lsn.to_le_bytes());
    out[16..24].copy_from_slice(&header.durable_lsn.to_le_bytes());
    out[24..28].copy_from_slice(&header.epoch.to_le_bytes());
    let crc = crc32c_append(crc32c_append(0, &out[..28]), payload);
    out[28..32].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Parses the fixed part of a record header (without checking its checksum, which needs the
/// payload): `None` unless the magic is there.
pub fn decode_record_header(bytes: &[u8]) -> Option<(RecordHeader, u32)> {
    if bytes[0..4] != RECORD_MAGIC {
        return None;
    }
    let header = RecordHeader {
        len: get_u32(bytes, 4),
        lsn: get_u64(bytes, 8),
        durable_lsn: get_u64(bytes, 16),
        epoch: get_u32(bytes, 24),
    };
    Some((header, get_u32(bytes, 28)))
}

/// Whether `crc` is the checksum of a record with header bytes `header` and `payload`.
pub fn record_crc_ok(header: &[u8], payload: &[u8], crc: u32) -> bool {
    crc32c_append(crc32c_append(0, &header[..28]), payload) == crc
}

fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_damage_is_detected() {
        let header = RegionHeader {
            sequence: 3,
            start_lsn: 4096 * 7 + 40,
            epoch: 9,
            region_bytes: 1 << 20,
            block_bytes: 4096,
            clean: true,
        };
        let mut block = vec![0u8; 4096];
        header.encode_into(&mut block);
        assert_eq!(&block[0..4], b"CBLH");
        assert_eq!(block[4..6], [1, 0]);
        assert_eq!(block[16..24], (4096u64 * 7 + 40).to_le_bytes());
        assert_eq!(RegionHeader::decode(&block), HeaderCheck::Valid(header));
        block[20] ^= 1;
        assert!(matches!(RegionHeader::decode(&block), HeaderCheck::Invalid(_)));
        assert_eq!(RegionHeader::decode(&[0u8; 512]), HeaderCheck::Zero);
    }

    #[test]
    fn record_layout_is_pinned() {
        let header = RecordHeader { len: 5, lsn: 0x1122, durable_lsn: 0x10, epoch: 2 };
        let bytes = encode_record_header(&header, b"hello");
        assert_eq!(&bytes[0..4], b"CBLR");
        assert_eq!(bytes[4..8], [5, 0, 0, 0]);
        assert_eq!(bytes[8..10], [0x22, 0x11]);
        assert_eq!(bytes[16], 0x10);
        assert_eq!(bytes[24], 2);
        let (parsed, crc) = decode_record_header(&bytes).expect("magic present");
        assert_eq!(parsed, header);
        assert!(record_crc_ok(&bytes, b"hello", crc));
        assert!(!record_crc_ok(&bytes, b"hellp", crc));
        assert_eq!(record_bytes(5), 40);
        assert_eq!(record_bytes(8), 40);
        assert_eq!(record_bytes(9), 48);
    }
}
