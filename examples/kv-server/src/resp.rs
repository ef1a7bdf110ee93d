//! RESP2: an incremental request parser with hard limits, and reply encoders.
//!
//! Requests are multibulk arrays of bulk strings (`*2\r\n$3\r\nGET\r\n$1\r\nk\r\n`), as every
//! client library and `redis-benchmark` send, or inline commands (`PING\r\n`) as typed into
//! telnet. Anything else, and any length outside the limits, is a protocol error: the server
//! answers `-ERR Protocol error: ...` and closes the connection. The parser never allocates
//! in proportion to a length the client *claims*; it only indexes bytes it has received.

use std::ops::Range;

/// Most arguments in one command.
pub const MAX_ARGS: usize = 1 << 16;
/// Longest bulk string: Redis's `proto-max-bulk-len`, 512 MiB (longer: `invalid bulk
/// length`, a protocol error, as Redis answers).
pub const MAX_BULK: usize = crate::format::PROTO_MAX_BULK;
/// Longest single request, bytes: one value of the longest length plus 1 MiB of other
/// arguments (the read buffer never holds more than this plus one read).
pub const MAX_REQUEST: usize = MAX_BULK + (1 << 20);
/// Longest inline command line.
pub const MAX_INLINE: usize = 64 << 10;
/// Longest `*N` / `$N` line: the digits of any allowed count and then some.
const MAX_COUNT_LINE: usize = 24;

/// The outcome of parsing the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole command: its arguments as byte ranges of the buffer, and the bytes it took.
    Command {
        /// Argument ranges (may be empty: an empty line or `*0` is consumed silently).
        args: Vec<Range<usize>>,
        /// Bytes consumed from the front of the buffer.
        consumed: usize,
    },
    /// More bytes are needed.
    Incomplete,
    /// A protocol error: the message after "Protocol error: ".
    Error(String),
}

fn find_crlf(buf: &[u8], from: usize, max_line: usize) -> Result<Option<usize>, ()> {
    let end = buf.len().min(from + max_line + 2);
    match buf[from..end].windows(2).position(|w| w == b"\r\n") {
        Some(i) => Ok(Some(from + i)),
        None if buf.len() - from >= max_line + 2 => Err(()),
        None => Ok(None),
    }
}

/// Parses a signed decimal count strictly (no sign but '-', no spaces, at most 19 digits).
fn parse_count(line: &[u8]) -> Option<i64> {
    let (neg, digits) = match line.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, line),
    };
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let value = digits.iter().fold(0i64, |acc, d| acc * 10 + (d - b'0') as i64);
    Some(if neg { -value } else { value })
}

/// Parses one command from the front of `buf`.
#[cfg(test)]
pub fn parse(buf: &[u8]) -> Parsed {
    let mut args = Vec::new();
    match parse_into(buf, &mut args) {
        Parsed::Command { consumed, .. } => Parsed::Command { args, consumed },
        other => other,
    }
}

/// Parses one command from the front of `buf`, its argument ranges into `args` (cleared
/// first, its capacity reused: no allocation per command). A `Command` it returns has an
/// empty `args` of its own.
pub fn parse_into(buf: &[u8], args: &mut Vec<Range<usize>>) -> Parsed {
    args.clear();
    let Some(&first) = buf.first() else { return Parsed::Incomplete };
    match first {
        b'*' => parse_multibulk(buf, args),
        b'\r' | b'\n' => {
            // Blank lines between commands are ignored, as Redis does.
            let n = buf.iter().take_while(|&&b| b == b'\r' || b == b'\n').count();
            Parsed::Command { args: Vec::new(), consumed: n }
        }
        b if b.is_ascii_alphabetic() => parse_inline(buf, args),
        other => Parsed::Error(format!(
            "unexpected byte {} at the start of a request (expected '*' or a command name)",
            printable(other)
        )),
    }
}

fn printable(b: u8) -> String {
    if b.is_ascii_graphic() {
        format!("'{}'", b as char)
    } else {
        format!("0x{b:02x}")
    }
}

fn parse_multibulk(buf: &[u8], args: &mut Vec<Range<usize>>) -> Parsed {
    let line_end = match find_crlf(buf, 1, MAX_COUNT_LINE) {
        Err(()) => return Parsed::Error("invalid multibulk length".into()),
        Ok(None) => return Parsed::Incomplete,
        Ok(Some(i)) => i,
    };
    let count = match parse_count(&buf[1..line_end]) {
        Some(n) if n <= MAX_ARGS as i64 => n,
        _ => return Parsed::Error("invalid multibulk length".into()),
    };
    let mut at = line_end + 2;
    if count <= 0 {
        return Parsed::Command { args: Vec::new(), consumed: at };
    }
    for _ in 0..count {
        let Some(&ty) = buf.get(at) else { return Parsed::Incomplete };
        if ty != b'$' {
            return Parsed::Error(format!("expected '$', got {}", printable(ty)));
        }
        let line_end = match find_crlf(buf, at + 1, MAX_COUNT_LINE) {
            Err(()) => return Parsed::Error("invalid bulk length".into()),
            Ok(None) => return Parsed::Incomplete,
            Ok(Some(i)) => i,
        };
        let len = match parse_count(&buf[at + 1..line_end]) {
            Some(n) if (0..=MAX_BULK as i64).contains(&n) => n as usize,
            _ => return Parsed::Error("invalid bulk length".into()),
        };
        let start = line_end + 2;
        if start + len > MAX_REQUEST {
            return Parsed::Error(format!("request larger than {MAX_REQUEST} bytes"));
        }
        if buf.len() < start + len + 2 {
            return Parsed::Incomplete;
        }
        if &buf[start + len..start + len + 2] != b"\r\n" {
            return Parsed::Error("bulk string not terminated by CRLF".into());
        }
        args.push(start..start + len);
        at = start + len + 2;
    }
    Parsed::Command { args: Vec::new(), consumed: at }
}

fn parse_inline(buf: &[u8], args: &mut Vec<Range<usize>>) -> Parsed {
    let limit = buf.len().min(MAX_INLINE + 1);
    let Some(nl) = buf[..limit].iter().position(|&b| b == b'\n') else {
        return if buf.len() > MAX_INLINE {
            Parsed::Error("too big inline request".into())
        } else {
            Parsed::Incomplete
        };
    };
    let line_end = if nl > 0 && buf[nl - 1] == b'\r' { nl - 1 } else { nl };
    let mut i = 0;
    while i < line_end {
        while i < line_end && (buf[i] == b' ' || buf[i] == b'\t') {
            i += 1;
        }
        let start = i;
        while i < line_end && buf[i] != b' ' && buf[i] != b'\t' {
            i += 1;
        }
        if i > start {
            args.push(start..i);
        }
    }
    Parsed::Command { args: Vec::new(), consumed: nl + 1 }
}

// ---------------------------------------------------------------------------------------------
// Replies.

/// `+text\r\n`.
pub fn simple(out: &mut Vec<u8>, text: &str) {
    out.push(b'+');
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `-message\r\n` (line breaks in the message become spaces).
pub fn error(out: &mut Vec<u8>, message: &str) {
    out.push(b'-');
    out.extend(message.bytes().map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }));
    out.extend_from_slice(b"\r\n");
}

/// Appends the decimal digits of `n` (no allocation: replies are written per request).
fn decimal(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// `:n\r\n`.
pub fn integer(out: &mut Vec<u8>, n: i64) {
    out.push(b':');
    if n < 0 {
        out.push(b'-');
    }
    decimal(out, n.unsigned_abs());
    out.extend_from_slice(b"\r\n");
}

/// `$len\r\nbytes\r\n`.
pub fn bulk(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'$');
    decimal(out, bytes.len() as u64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
}

/// `$-1\r\n`, the null bulk string.
pub fn null(out: &mut Vec<u8>) {
    out.extend_from_slice(b"$-1\r\n");
}

/// `*n\r\n`.
pub fn array(out: &mut Vec<u8>, n: usize) {
    out.push(b'*');
    decimal(out, n as u64);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_render_numbers_without_allocating_and_exactly() {
        let mut out = Vec::new();
        integer(&mut out, 0);
        integer(&mut out, -42);
        integer(&mut out, i64::MIN);
        bulk(&mut out, b"hello");
        array(&mut out, 1234567);
        assert_eq!(
            out,
            b":0\r\n:-42\r\n:-9223372036854775808\r\n$5\r\nhello\r\n*1234567\r\n".to_vec()
        );
    }

    fn args(buf: &[u8]) -> Vec<&[u8]> {
        match parse(buf) {
            Parsed::Command { args, .. } => args.into_iter().map(|r| &buf[r]).collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_multibulk_inline_and_partial() {
        let req = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n*1\r\n$4\r\nPING\r\n";
        assert_eq!(args(req), vec![&b"SET"[..], b"k", b"hello"]);
        let Parsed::Command { consumed, .. } = parse(req) else { panic!() };
        assert_eq!(args(&req[consumed..]), vec![&b"PING"[..]]);
        for cut in 0..consumed {
            assert_eq!(parse(&req[..cut]), Parsed::Incomplete, "cut at {cut}");
        }
        assert_eq!(args(b"get  key\t x\r\n"), vec![&b"get"[..], b"key", b"x"]);
        assert_eq!(parse(b"PING"), Parsed::Incomplete);
        assert_eq!(args(b"*0\r\n"), Vec::<&[u8]>::new());
        assert_eq!(args(b"*-1\r\n"), Vec::<&[u8]>::new());
        assert_eq!(args(b"*1\r\n$0\r\n\r\n"), vec![&b""[..]]);
    }

    #[test]
    fn rejects_what_is_not_resp() {
        let errors: &[&[u8]] = &[
            b"$3\r\nfoo\r\n",
            b":1\r\n",
            b"\x00\x01",
            b"*abc\r\n",
            b"*99999999999999999999999\r\n",
            b"*1000000\r\n",
            b"*1\r\n$-1\r\n",
            b"*1\r\n$99999999999\r\n",
            b"*1\r\n$536870913\r\n",
            b"*1\r\n+OK\r\n",
            b"*1\r\n$3\r\nGETxx",
            b"*11111111111111111111111111111111111",
            b"*1\r\n$1111111111111111111111111111111111",
        ];
        for e in errors {
            assert!(matches!(parse(e), Parsed::Error(_)), "{:?} -> {:?}", e, parse(e));
        }
        let long_inline = vec![b'a'; MAX_INLINE + 10];
        assert!(matches!(parse(&long_inline), Parsed::Error(_)));
    }

    #[test]
    fn random_bytes_never_panic_or_overrun() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 40) as usize;
            let alphabet = b"*$\r\n0123456789-:+abcGET";
            let buf: Vec<u8> = (0..len)
                .map(|i| alphabet[((x >> (i % 50)) as usize + i * 7) % alphabet.len()])
                .collect();
            if let Parsed::Command { args, consumed } = parse(&buf) {
                assert!(consumed <= buf.len());
                assert!(args.iter().all(|r| r.end <= consumed));
            }
        }
    }
}
