//! corebuf-kv's records in the engine's per-shard log (FORMAT.md, "Log records"): one per
//! SET or DEL that took effect, appended on the key's owner after the change is in the cache.

use std::fmt;

/// What a record does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `SET key value`.
    Set = 1,
    /// `DEL key`.
    Del = 2,
}

/// Bytes before the key.
const HEADER: usize = 8;

/// Why a record's payload cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord(&'static str);

impl fmt::Display for BadRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "undecodable kv log record: {}", self.0)
    }
}

/// Encodes a record into `out` (cleared first; its capacity is reused).
pub fn encode(out: &mut Vec<u8>, op: Op, key: &[u8], value: &[u8]) {
    out.clear();
    out.push(op as u8);
    out.push(0);
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(value);
}

/// Decodes a record: the operation, the key and the value (empty for DEL).
pub fn decode(payload: &[u8]) -> Result<(Op, &[u8], &[u8]), BadRecord> {
    if payload.len() < HEADER {
        return Err(BadRecord("shorter than its header"));
    }
    let op = match payload[0] {
        1 => Op::Set,
        2 => Op::Del,
        _ => return Err(BadRecord("unknown operation")),
    };
    let key_len = u16::from_le_bytes([payload[2], payload[3]]) as usize;
    let value_len = u32::from_le_bytes(payload[4..8].try_into().expect("4 bytes")) as usize;
    if payload.len() != HEADER + key_len + value_len || (op == Op::Del && value_len != 0) {
        return Err(BadRecord("lengths do not match the payload"));
    }
    let key = &payload[HEADER..HEADER + key_len];
    Ok((op, key, &payload[HEADER + key_len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_the_layout_is_pinned() {
        let mut buf = Vec::new();
        encode(&mut buf, Op::Set, b"key", b"value");
        assert_eq!(&buf[..8], &[1, 0, 3, 0, 5, 0, 0, 0]);
        assert_eq!(decode(&buf), Ok((Op::Set, &b"key"[..], &b"value"[..])));
        encode(&mut buf, Op::Del, b"k", b"");
        assert_eq!(decode(&buf), Ok((Op::Del, &b"k"[..], &b""[..])));
        assert!(decode(&buf[..5]).is_err());
        buf[0] = 9;
        assert!(decode(&buf).is_err());
    }
}
