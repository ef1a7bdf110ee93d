//! corebuf-kv's records in the engine's per-shard log (FORMAT.md, "Log records"): one per
//! change that took effect (the key's resulting value and expiry, or its deletion), appended on
//! the key's owner after the change is in the cache.

use std::fmt;

/// What a record does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `SET key value`.
    Set = 1,
    /// `DEL key`.
    Del = 2,
}

/// Bytes before the expiry field and the key.
const HEADER: usize = 8;
/// Flag (byte 1): an 8-byte absolute expiry (unix ms) follows the header, before the key.
const FLAG_EXPIRES: u8 = 1;
/// Flags (byte 1) that say which record the change is about, as the record's own flags byte:
/// bit 1 the value is a large-value manifest, bit 2 the key is an internal chunk key
/// ([`crate::format::rflags`]).
pub const KIND_FLAGS: u8 = crate::format::rflags::MANIFEST | crate::format::rflags::CHUNK;

/// A decoded record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    /// What it does.
    pub op: Op,
    /// The key.
    pub key: &'a [u8],
    /// The value (empty for DEL).
    pub value: &'a [u8],
    /// The value's absolute expiry in unix milliseconds, 0 for none.
    pub expires: u64,
    /// [`KIND_FLAGS`] bits: a manifest value, or a chunk key.
    pub kind: u8,
}

/// Why a record's payload cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord(&'static str);

impl fmt::Display for BadRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "undecodable kv log record: {}", self.0)
    }
}

/// Encodes a record into `out` (cleared first; its capacity is reused). `expires` (unix ms,
/// 0 for none) is the expiry the value has after the change; `kind` its [`KIND_FLAGS`] bits.
pub fn encode(out: &mut Vec<u8>, op: Op, key: &[u8], value: &[u8], expires: u64, kind: u8) {
    debug_assert_eq!(kind & !KIND_FLAGS, 0);
    out.clear();
    out.push(op as u8);
    out.push(kind | if expires != 0 { FLAG_EXPIRES } else { 0 });
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    if expires != 0 {
        out.extend_from_slice(&expires.to_le_bytes());
    }
    out.extend_from_slice(key);
    out.extend_from_slice(value);
}

/// Decodes a record.
pub fn decode(payload: &[u8]) -> Result<Record<'_>, BadRecord> {
    if payload.len() < HEADER {
        return Err(BadRecord("shorter than its header"));
    }
    let op = match payload[0] {
        1 => Op::Set,
        2 => Op::Del,
        _ => return Err(BadRecord("unknown operation")),
    };
    let flags = payload[1];
    if flags & !(FLAG_EXPIRES | KIND_FLAGS) != 0 || flags & KIND_FLAGS == KIND_FLAGS {
        return Err(BadRecord("unknown flags"));
    }
    let key_len = u16::from_le_bytes([payload[2], payload[3]]) as usize;
    let value_len = u32::from_le_bytes(payload[4..8].try_into().expect("4 bytes")) as usize;
    let (expires, key_at) = if flags & FLAG_EXPIRES != 0 {
        let Some(field) = payload.get(HEADER..HEADER + 8) else {
            return Err(BadRecord("shorter than its header"));
        };
        (u64::from_le_bytes(field.try_into().expect("8 bytes")), HEADER + 8)
    } else {
        (0, HEADER)
    };
    if payload.len() != key_at + key_len + value_len
        || (op == Op::Del && (value_len != 0 || expires != 0))
        || (flags & FLAG_EXPIRES != 0 && expires == 0)
    {
        return Err(BadRecord("lengths do not match the payload"));
    }
    Ok(Record {
        op,
        key: &payload[key_at..key_at + key_len],
        value: &payload[key_at + key_len..],
        expires,
        kind: flags & KIND_FLAGS,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_the_layout_is_pinned() {
        let mut buf = Vec::new();
        encode(&mut buf, Op::Set, b"key", b"value", 0, 0);
        assert_eq!(&buf[..8], &[1, 0, 3, 0, 5, 0, 0, 0]);
        let rec = Record { op: Op::Set, key: b"key", value: b"value", expires: 0, kind: 0 };
        assert_eq!(decode(&buf), Ok(rec));
        encode(&mut buf, Op::Set, b"key", b"value", 0x0102_0304_0506_0708, 0);
        assert_eq!(&buf[..8], &[1, 1, 3, 0, 5, 0, 0, 0], "flag bit 0: an expiry follows");
        assert_eq!(&buf[8..16], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&buf[16..19], b"key");
        assert_eq!(decode(&buf), Ok(Record { expires: 0x0102_0304_0506_0708, ..rec }));
        encode(&mut buf, Op::Set, b"m", b"manifest", 0, crate::format::rflags::MANIFEST);
        assert_eq!(buf[1], 2, "flag bit 1: the value is a large-value manifest");
        assert_eq!(decode(&buf).map(|r| r.kind), Ok(crate::format::rflags::MANIFEST));
        encode(&mut buf, Op::Del, b"chunk", b"", 0, crate::format::rflags::CHUNK);
        assert_eq!(buf[1], 4, "flag bit 2: a chunk key");
        assert_eq!(decode(&buf).map(|r| r.kind), Ok(crate::format::rflags::CHUNK));
        encode(&mut buf, Op::Del, b"k", b"", 0, 0);
        let del = Record { op: Op::Del, key: b"k", value: b"", expires: 0, kind: 0 };
        assert_eq!(decode(&buf), Ok(del));
        assert!(decode(&buf[..5]).is_err());
        buf[1] = 8;
        assert!(decode(&buf).is_err(), "unknown flags");
        buf[1] = 6;
        assert!(decode(&buf).is_err(), "a manifest and a chunk at once");
        buf[1] = 0;
        buf[0] = 9;
        assert!(decode(&buf).is_err());
    }
}
