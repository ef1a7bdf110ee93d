//! The NBD wire format (NetworkBlockDevice/nbd `doc/proto.md`): magic numbers, option and
//! command codes, flags, error values, and the fixed-size messages as plain encode / decode
//! functions with no I/O, so they are unit-tested on bytes.

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, also the start of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// The magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flag: fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the 124 zero bytes after `NBD_OPT_EXPORT_NAME` may be skipped.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client does fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client wants no zero padding.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: always set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: `NBD_CMD_TRIM` is supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` (and `NO_HOLE`) is supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: several connections may share the export (flush is global).
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: `NBD_CMD_CACHE` is supported.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;

/// Option: choose an export and enter transmission (no error reply possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end the negotiation.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;

/// Option reply: success / end of a list.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a list.
pub const REP_SERVER: u32 = 2;
/// Option reply: one piece of export information.
pub const REP_INFO: u32 = 3;
/// Option error: unknown option.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// Option error: syntactically or semantically invalid.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// Option error: no such export.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// Option error: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
/// Option error: the option's data is too large.
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// Information type: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Information type: the canonical export name.
pub const INFO_NAME: u16 = 1;
/// Information type: a human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Information type: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (a payload follows the header).
pub const CMD_WRITE: u16 = 1;
/// Command: soft disconnect.
pub const CMD_DISC: u16 = 2;
/// Command: flush (everything replied to before is durable when this is replied to).
pub const CMD_FLUSH: u16 = 3;
/// Command: trim (discard), a hint.
pub const CMD_TRIM: u16 = 4;
/// Command: cache (prefetch), a hint.
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;

/// Command flag: force unit access (durable before the reply).
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: write zeroes without making a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Error: operation not permitted (a write to a read-only export).
pub const EPERM: u32 = 1;
/// Error: input / output error.
pub const EIO: u32 = 5;
/// Error: invalid argument (bad flags, beyond the end of a read, unknown command).
pub const EINVAL: u32 = 22;
/// Error: no space (a write beyond the end).
pub const ENOSPC: u32 = 28;
/// Error: the server is shutting down.
pub const ESHUTDOWN: u32 = 108;

/// Largest read or write payload served: the spec's default maximum (32 MiB). A larger read
/// gets `EINVAL`; a larger write is a denial-of-service case and ends the connection.
pub const PAYLOAD_BYTES_MAX: u32 = 1 << 25;

/// Size of a transmission request header.
pub const REQUEST_BYTES: usize = 28;

/// A transmission request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type (`CMD_*`).
    pub kind: u16,
    /// The client's opaque cookie, echoed in the reply.
    pub cookie: u64,
    /// Byte offset in the export.
    pub offset: u64,
    /// Length in bytes.
    pub length: u32,
}

impl Request {
    /// Decodes a header; `None` if the magic is wrong (a protocol violation).
    pub fn decode(bytes: &[u8; REQUEST_BYTES]) -> Option<Request> {
        if be_u32(&bytes[0..4]) != REQUEST_MAGIC {
            return None;
        }
        Some(Request {
            flags: be_u16(&bytes[4..6]),
            kind: be_u16(&bytes[6..8]),
            cookie: be_u64(&bytes[8..16]),
            offset: be_u64(&bytes[16..24]),
            length: be_u32(&bytes[24..28]),
        })
    }

    /// Encodes a header (the client's side, for tests).
    #[cfg(test)]
    pub fn encode(&self) -> [u8; REQUEST_BYTES] {
        let mut out = [0u8; REQUEST_BYTES];
        out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.kind.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// Appends a simple reply header to `out`.
#[inline]
pub fn put_simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Appends an option reply (header and data) to `out`.
pub fn put_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    let len = u32::try_from(data.len()).expect("option replies are small");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
}

/// The server's first message: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut out = [0u8; 18];
    out[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// A big-endian `u16` from the first 2 bytes.
pub fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// A big-endian `u32` from the first 4 bytes.
pub fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// A big-endian `u64` from the first 8 bytes.
pub fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_and_bad_magic_is_refused() {
        let r = Request { flags: 1, kind: CMD_WRITE, cookie: 7, offset: 1 << 40, length: 512 };
        let bytes = r.encode();
        assert_eq!(Request::decode(&bytes), Some(r));
        let mut bad = bytes;
        bad[0] ^= 1;
        assert_eq!(Request::decode(&bad), None);
    }

    #[test]
    fn replies_have_the_spec_layout() {
        let mut out = Vec::new();
        put_simple_reply(&mut out, EINVAL, 0x0102_0304_0506_0708);
        assert_eq!(out, [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 1, 2, 3, 4, 5, 6, 7, 8]);
        out.clear();
        put_option_reply(&mut out, OPT_LIST, REP_ACK, &[]);
        assert_eq!(out.len(), 20);
        assert_eq!(be_u64(&out), OPTION_REPLY_MAGIC);
        assert_eq!(&greeting()[..8], b"NBDMAGIC");
        assert_eq!(&greeting()[8..16], b"IHAVEOPT");
    }
}
