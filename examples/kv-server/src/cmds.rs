//! The single-key string and expiry commands: their arguments parsed into an [`Op`] on the
//! connection, and what the op does to the key's live value on its owner shard ([`apply`],
//! [`read`]), under the key's bucket lock. Replies and error texts are Redis 7's.

use crate::format::{Manifest, MAX_VALUE};
use crate::large::LargeRef;
use crate::server::{check_key, check_value_len, damaged_manifest, Growth, Op, OpOut};
use crate::store::{Cond, Entry, Write};

/// Redis's reply when an argument or a stored value is not a 64-bit integer.
pub const NOT_INTEGER: &str = "ERR value is not an integer or out of range";
/// Redis's reply when an argument or a stored value is not a float.
pub const NOT_FLOAT: &str = "ERR value is not a valid float";
/// Redis's reply for a malformed option list.
pub const SYNTAX: &str = "ERR syntax error";

/// How a write changes its key's expiry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ttl {
    /// Removes it (SET without KEEPTTL; GETEX PERSIST).
    Clear,
    /// Keeps it (SET ... KEEPTTL; GETEX without options).
    Keep,
    /// Sets this absolute time, unix milliseconds (may be past: the key is deleted).
    At(i64),
}

/// EXPIRE's conditions (all given must hold; no expiry counts as an infinite one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExpireCond {
    /// NX: only if the key has no expiry.
    pub nx: bool,
    /// XX: only if it has one.
    pub xx: bool,
    /// GT: only if the new expiry is later.
    pub gt: bool,
    /// LT: only if the new expiry is earlier.
    pub lt: bool,
}

/// A read of one key on its owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Read {
    /// TTL (seconds) or PTTL (`millis`).
    Ttl {
        /// PTTL.
        millis: bool,
    },
    /// EXPIRETIME (seconds) or PEXPIRETIME (`millis`).
    ExpireTime {
        /// PEXPIRETIME.
        millis: bool,
    },
    /// TYPE.
    Type,
    /// STRLEN.
    Strlen,
    /// GETRANGE start end.
    GetRange(i64, i64),
    /// The value with its expiry (RENAME's first step).
    Entry,
}

/// A read-modify-write of one key on its owner.
#[derive(Clone, Debug, PartialEq)]
pub enum Update {
    /// SET with KEEPTTL or GET (the plain SET is [`Op::Set`]).
    Set {
        /// The value.
        value: Vec<u8>,
        /// NX / XX.
        cond: Cond,
        /// Its expiry.
        ttl: Ttl,
        /// Answer the old value (GET) rather than OK / nil.
        get: bool,
    },
    /// SET of a large value (its chunks written): as [`Update::Set`] with the manifest.
    SetLarge {
        /// The new value's manifest.
        manifest: Manifest,
        /// NX / XX.
        cond: Cond,
        /// Its expiry.
        ttl: Ttl,
        /// Answer the old value (GET) rather than OK / nil.
        get: bool,
    },
    /// GETDEL.
    GetDel,
    /// GETEX.
    GetEx(Ttl),
    /// INCR, DECR, INCRBY, DECRBY.
    IncrBy(i64),
    /// INCRBYFLOAT.
    IncrByFloat(f64),
    /// APPEND.
    Append(Vec<u8>),
    /// SETRANGE offset value (the offset and the result length were checked).
    SetRange(usize, Vec<u8>),
    /// EXPIRE family: the absolute time in unix ms (past: delete), and the condition.
    Expire(i64, ExpireCond),
    /// PERSIST.
    Persist,
    /// Deletes the key if it still holds this value and expiry (RENAME's last step).
    DelIf(Vec<u8>, u64),
}

/// How the connection renders the op's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// `+OK` if it took effect, else nil (SET).
    SetReply,
    /// The result as it is: bulk, nil, integer, status or error.
    Reply,
}

/// Parses a single-key command (`name` lower case). `None`: not one of these commands.
/// `Err`: the error reply.
pub fn parse(name: &[u8], args: &[&[u8]], now: u64) -> Option<Result<(Op, Shape), String>> {
    let arity = |ok: bool| {
        if ok {
            Ok(())
        } else {
            Err(format!(
                "ERR wrong number of arguments for '{}' command",
                String::from_utf8_lossy(name)
            ))
        }
    };
    let key = |args: &[&[u8]]| -> Result<Vec<u8>, String> {
        check_key(args[0])?;
        Ok(args[0].to_vec())
    };
    let upd = |args: &[&[u8]], u: Update| Ok((Op::Update(key(args)?, Box::new(u)), Shape::Reply));
    let rd = |args: &[&[u8]], r: Read| Ok((Op::Read(key(args)?, r), Shape::Reply));
    let n = args.len();
    let parsed = match name {
        b"set" => arity(n >= 2).and_then(|()| parse_set(args, now)),
        b"setex" | b"psetex" => arity(n == 3).and_then(|()| {
            let unit = if name == b"setex" { 1000 } else { 1 };
            let at = relative_expiry(args[1], unit, now, name)?;
            check_value_len(args[2].len(), Growth::Set)?;
            Ok((Op::Set(key(args)?, args[2].to_vec(), Cond::Always, at as u64), Shape::SetReply))
        }),
        b"getset" => arity(n == 2).and_then(|()| {
            check_value_len(args[1].len(), Growth::Set)?;
            let value = args[1].to_vec();
            upd(args, Update::Set { value, cond: Cond::Always, ttl: Ttl::Clear, get: true })
        }),
        b"getdel" => arity(n == 1).and_then(|()| upd(args, Update::GetDel)),
        b"getex" => arity(n >= 1).and_then(|()| upd(args, Update::GetEx(parse_getex(args, now)?))),
        b"incr" => arity(n == 1).and_then(|()| upd(args, Update::IncrBy(1))),
        b"decr" => arity(n == 1).and_then(|()| upd(args, Update::IncrBy(-1))),
        b"incrby" => arity(n == 2).and_then(|()| upd(args, Update::IncrBy(int_arg(args[1])?))),
        b"decrby" => arity(n == 2).and_then(|()| {
            let by = int_arg(args[1])?;
            let by = by.checked_neg().ok_or("ERR decrement would overflow")?;
            upd(args, Update::IncrBy(by))
        }),
        b"incrbyfloat" => arity(n == 2).and_then(|()| {
            let by = parse_float(args[1]).ok_or(NOT_FLOAT)?;
            upd(args, Update::IncrByFloat(by))
        }),
        b"append" => arity(n == 2).and_then(|()| upd(args, Update::Append(args[1].to_vec()))),
        b"setrange" => arity(n == 3).and_then(|()| {
            let offset = int_arg(args[1])?;
            if offset < 0 {
                return Err("ERR offset is out of range".into());
            }
            if !args[2].is_empty() {
                let end = (offset as u64).saturating_add(args[2].len() as u64);
                check_value_len(usize::try_from(end).unwrap_or(usize::MAX), Growth::Grow)?;
            }
            upd(args, Update::SetRange(offset as usize, args[2].to_vec()))
        }),
        b"getrange" | b"substr" => arity(n == 3)
            .and_then(|()| rd(args, Read::GetRange(int_arg(args[1])?, int_arg(args[2])?))),
        b"strlen" => arity(n == 1).and_then(|()| rd(args, Read::Strlen)),
        b"type" => arity(n == 1).and_then(|()| rd(args, Read::Type)),
        b"ttl" | b"pttl" => {
            arity(n == 1).and_then(|()| rd(args, Read::Ttl { millis: name[0] == b'p' }))
        }
        b"expiretime" | b"pexpiretime" => {
            arity(n == 1).and_then(|()| rd(args, Read::ExpireTime { millis: name[0] == b'p' }))
        }
        b"persist" => arity(n == 1).and_then(|()| upd(args, Update::Persist)),
        b"expire" | b"pexpire" | b"expireat" | b"pexpireat" => {
            arity(n >= 2).and_then(|()| upd(args, parse_expire(name, args, now)?))
        }
        _ => return None,
    };
    Some(parsed)
}

/// A strict integer argument, as Redis's `string2ll`.
fn int_arg(arg: &[u8]) -> Result<i64, String> {
    parse_int(arg).ok_or_else(|| NOT_INTEGER.to_string())
}

/// Parses a decimal 64-bit integer exactly as Redis's `string2ll` does: an optional `-`, no
/// `+`, no spaces, no leading zeros, within `i64`.
pub fn parse_int(s: &[u8]) -> Option<i64> {
    let (neg, digits) = match s.split_first()? {
        (b'-', rest) => (true, rest),
        _ => (false, s),
    };
    match digits {
        [b'0'] if !neg => return Some(0),
        [b'1'..=b'9', rest @ ..] if rest.iter().all(u8::is_ascii_digit) && digits.len() <= 20 => {}
        _ => return None,
    }
    let mut v: i128 = 0;
    for d in digits {
        v = v * 10 + (d - b'0') as i128;
    }
    i64::try_from(if neg { -v } else { v }).ok()
}

/// Parses a float as Redis's `string2ld` accepts it: no leading space, the whole string, not
/// NaN (infinities parse; the result check refuses them).
pub fn parse_float(s: &[u8]) -> Option<f64> {
    let text = std::str::from_utf8(s).ok()?;
    if text.is_empty() || text.starts_with(|c: char| c.is_ascii_whitespace()) {
        return None;
    }
    text.parse::<f64>().ok().filter(|v| !v.is_nan())
}

/// Formats a float as INCRBYFLOAT answers it: plain decimal, no exponent, no trailing zeros.
/// (Redis computes in `long double`; corebuf-kv in `f64`, so the last digits of long
/// fractions may differ.)
pub fn format_float(v: f64) -> String {
    let s = format!("{v}");
    if s == "-0" {
        "0".into()
    } else {
        s
    }
}

/// `now + amount * unit_ms` as an absolute expiry, for SETEX and friends; Redis's errors.
fn relative_expiry(arg: &[u8], unit_ms: i64, now: u64, cmd: &[u8]) -> Result<i64, String> {
    let amount = int_arg(arg)?;
    let invalid =
        || format!("ERR invalid expire time in '{}' command", String::from_utf8_lossy(cmd));
    if amount <= 0 {
        return Err(invalid());
    }
    amount.checked_mul(unit_ms).and_then(|ms| ms.checked_add(now as i64)).ok_or_else(invalid)
}

/// The expiry options of SET (`EX`, `PX`, `EXAT`, `PXAT`) and GETEX: the absolute time.
fn expiry_option(opt: &[u8], arg: &[u8], now: u64, cmd: &[u8]) -> Result<i64, String> {
    let invalid =
        || format!("ERR invalid expire time in '{}' command", String::from_utf8_lossy(cmd));
    match opt {
        b"ex" => relative_expiry(arg, 1000, now, cmd),
        b"px" => relative_expiry(arg, 1, now, cmd),
        b"exat" => match int_arg(arg)? {
            s if s <= 0 => Err(invalid()),
            s => s.checked_mul(1000).ok_or_else(invalid),
        },
        _ => match int_arg(arg)? {
            ms if ms <= 0 => Err(invalid()),
            ms => Ok(ms),
        },
    }
}

/// `SET key value [NX|XX] [GET] [EX s|PX ms|EXAT s|PXAT ms|KEEPTTL]`.
fn parse_set(args: &[&[u8]], now: u64) -> Result<(Op, Shape), String> {
    check_key(args[0])?;
    check_value_len(args[1].len(), Growth::Set)?;
    let (mut cond, mut ttl, mut get) = (Cond::Always, Ttl::Clear, false);
    let mut expiry_kind: Option<Vec<u8>> = None;
    let mut i = 2;
    while i < args.len() {
        let opt = args[i].to_ascii_lowercase();
        match opt.as_slice() {
            b"nx" if cond != Cond::Xx => cond = Cond::Nx,
            b"xx" if cond != Cond::Nx => cond = Cond::Xx,
            b"get" => get = true,
            b"keepttl" if expiry_kind.as_deref().is_none_or(|k| k == b"keepttl") => {
                expiry_kind = Some(opt);
                ttl = Ttl::Keep;
            }
            b"ex" | b"px" | b"exat" | b"pxat"
                if i + 1 < args.len() && expiry_kind.as_deref().is_none_or(|k| k == opt) =>
            {
                ttl = Ttl::At(expiry_option(&opt, args[i + 1], now, b"set")?);
                expiry_kind = Some(opt);
                i += 1;
            }
            _ => return Err(SYNTAX.into()),
        }
        i += 1;
    }
    let (key, value) = (args[0].to_vec(), args[1].to_vec());
    Ok(match (ttl, get) {
        // The plain SET (with NX / XX / an expiry) needs no read of the old value.
        (Ttl::Clear, false) => (Op::Set(key, value, cond, 0), Shape::SetReply),
        (Ttl::At(at), false) => (Op::Set(key, value, cond, at.max(1) as u64), Shape::SetReply),
        (ttl, get) => {
            let shape = if get { Shape::Reply } else { Shape::SetReply };
            (Op::Update(key, Box::new(Update::Set { value, cond, ttl, get })), shape)
        }
    })
}

/// `GETEX key [EX s|PX ms|EXAT s|PXAT ms|PERSIST]`.
fn parse_getex(args: &[&[u8]], now: u64) -> Result<Ttl, String> {
    let mut ttl = Ttl::Keep;
    let mut i = 1;
    while i < args.len() {
        let opt = args[i].to_ascii_lowercase();
        match opt.as_slice() {
            b"persist" if ttl == Ttl::Keep => ttl = Ttl::Clear,
            b"ex" | b"px" | b"exat" | b"pxat" if i + 1 < args.len() && ttl == Ttl::Keep => {
                ttl = Ttl::At(expiry_option(&opt, args[i + 1], now, b"getex")?);
                i += 1;
            }
            _ => return Err(SYNTAX.into()),
        }
        i += 1;
    }
    Ok(ttl)
}

/// `EXPIRE key seconds [NX|XX|GT|LT]` and PEXPIRE, EXPIREAT, PEXPIREAT.
fn parse_expire(name: &[u8], args: &[&[u8]], now: u64) -> Result<Update, String> {
    let amount = int_arg(args[1])?;
    let invalid =
        || format!("ERR invalid expire time in '{}' command", String::from_utf8_lossy(name));
    let at = match name {
        b"expire" => amount.checked_mul(1000).and_then(|ms| ms.checked_add(now as i64)),
        b"pexpire" => amount.checked_add(now as i64),
        b"expireat" => amount.checked_mul(1000),
        _ => Some(amount),
    }
    .ok_or_else(invalid)?;
    let mut c = ExpireCond::default();
    for opt in &args[2..] {
        match opt.to_ascii_lowercase().as_slice() {
            b"nx" => c.nx = true,
            b"xx" => c.xx = true,
            b"gt" => c.gt = true,
            b"lt" => c.lt = true,
            _ => return Err(format!("ERR Unsupported option {}", String::from_utf8_lossy(opt))),
        }
    }
    if c.nx && (c.xx || c.gt || c.lt) {
        return Err("ERR NX and XX, GT or LT options at the same time are not compatible".into());
    }
    if c.gt && c.lt {
        return Err("ERR GT and LT options at the same time are not compatible".into());
    }
    Ok(Update::Expire(at, c))
}

/// What a read answers, from the key's live value. A large value's bytes are not here: its
/// length comes from its manifest, and GETRANGE answers a [`OpOut::Large`] range that the
/// connection streams (its key filled in by the caller).
pub fn read(r: Read, live: Option<&Entry>, now: u64) -> OpOut {
    match (r, live) {
        (Read::Ttl { .. } | Read::ExpireTime { .. }, None) => OpOut::Int(-2),
        (Read::Ttl { .. } | Read::ExpireTime { .. }, Some(e)) if e.expires == 0 => OpOut::Int(-1),
        (Read::Ttl { millis }, Some(e)) => {
            let ms = e.expires.saturating_sub(now) as i64;
            OpOut::Int(if millis { ms } else { (ms + 500) / 1000 })
        }
        (Read::ExpireTime { millis }, Some(e)) => {
            let ms = e.expires as i64;
            OpOut::Int(if millis { ms } else { (ms + 500) / 1000 })
        }
        (Read::Type, e) => OpOut::Status(if e.is_some() { "string" } else { "none" }),
        (Read::Strlen, e) => OpOut::Int(e.map_or(0, |e| e.len() as i64)),
        (Read::GetRange(start, end), Some(e)) if e.manifest => match e.large() {
            Some(m) => {
                let (from, len) = getrange_span(m.total_len, start, end);
                let mut large = LargeRef::whole(Vec::new(), m);
                (large.start, large.len, large.range) = (from, len, Some((start, end)));
                OpOut::Large(Box::new(large))
            }
            None => OpOut::Err(damaged_manifest(b"")),
        },
        (Read::GetRange(start, end), e) => {
            OpOut::Value(Some(e.map_or(&[][..], |e| getrange(&e.value, start, end)).to_vec()))
        }
        (Read::Entry, e) => OpOut::Entry(e.cloned()),
    }
}

/// The value of `live` as an answer: its bytes, or a large value to stream (whose chunks the
/// caller's own removal frees only after the reply, so it is not read again).
fn value_answer(live: Option<&Entry>) -> OpOut {
    match live {
        Some(e) if e.manifest => match e.large() {
            Some(m) => {
                let mut large = LargeRef::whole(Vec::new(), m);
                large.reread = false;
                OpOut::Large(Box::new(large))
            }
            None => OpOut::Err(damaged_manifest(b"")),
        },
        live => OpOut::Value(live.map(|e| e.value.clone())),
    }
}

/// The same value as `e` with expiry `expires` (a large value keeps its manifest).
fn retime(e: &Entry, expires: u64) -> Write {
    if e.manifest {
        Write::Large(e.value.clone(), expires)
    } else {
        Write::Set(e.value.clone(), expires)
    }
}

/// GETRANGE's span of a value of `len` bytes: (first byte, byte count), as [`getrange`].
pub fn getrange_span(len: u64, start: i64, end: i64) -> (u64, u64) {
    let len = len as i64;
    if start < 0 && end < 0 && start > end {
        return (0, 0);
    }
    let start = if start < 0 { (len + start).max(0) } else { start };
    let end = if end < 0 { (len + end).max(0) } else { end };
    let end = end.min(len - 1);
    if len == 0 || start > end {
        return (0, 0);
    }
    (start as u64, (end - start + 1) as u64)
}

/// GETRANGE's slice, as Redis 7 computes it (negative indexes count from the end).
pub fn getrange(value: &[u8], start: i64, end: i64) -> &[u8] {
    let (from, len) = getrange_span(value.len() as u64, start, end);
    &value[from as usize..(from + len) as usize]
}

/// What an update does to the key's live value (`None`: absent or expired) at `now`: the
/// write and the answer.
pub fn apply(u: &Update, live: Option<&Entry>, now: u64) -> (Write, OpOut) {
    let keep_ttl = live.map_or(0, |e| e.expires);
    let large = live.is_some_and(|e| e.manifest);
    match u {
        Update::SetLarge { manifest, cond, ttl, get } => {
            let set = Update::Set { value: Vec::new(), cond: *cond, ttl: *ttl, get: *get };
            match apply(&set, live, now) {
                (Write::Set(_, expires), answer) => {
                    (Write::Large(manifest.encode().to_vec(), expires), answer)
                }
                other => other,
            }
        }
        Update::Set { value, cond, ttl, get } => {
            let holds = cond.holds(live.is_some());
            let expires = match ttl {
                Ttl::Clear => 0,
                Ttl::Keep => keep_ttl,
                Ttl::At(at) => (*at).max(1) as u64,
            };
            let write = if holds { Write::Set(value.clone(), expires) } else { Write::Keep };
            let answer = if *get { value_answer(live) } else { OpOut::Done(holds) };
            (write, answer)
        }
        Update::GetDel => match live {
            Some(_) => (Write::Del, value_answer(live)),
            None => (Write::Keep, OpOut::Value(None)),
        },
        Update::GetEx(ttl) => match (live, ttl) {
            (None, _) => (Write::Keep, OpOut::Value(None)),
            (Some(_), Ttl::Keep) => (Write::Keep, value_answer(live)),
            (Some(e), Ttl::Clear) if e.expires == 0 => (Write::Keep, value_answer(live)),
            (Some(e), Ttl::Clear) => (retime(e, 0), value_answer(live)),
            (Some(e), Ttl::At(at)) => (retime(e, (*at).max(1) as u64), value_answer(live)),
        },
        // A large value is never a number (Redis's numbers are short strings).
        Update::IncrBy(_) if large => (Write::Keep, OpOut::Err(NOT_INTEGER.into())),
        Update::IncrByFloat(_) if large => (Write::Keep, OpOut::Err(NOT_FLOAT.into())),
        // Past one record, or changing a large value: the large-value path (`large::edit`).
        Update::Append(suffix)
            if large || live.map_or(0, |e| e.value.len()) + suffix.len() > MAX_VALUE =>
        {
            let len = live.map_or(0, Entry::len) + suffix.len() as u64;
            match check_value_len(usize::try_from(len).unwrap_or(usize::MAX), Growth::Grow) {
                Ok(()) => (Write::Keep, OpOut::Grow),
                Err(e) => (Write::Keep, OpOut::Err(e)),
            }
        }
        Update::SetRange(offset, data)
            if !data.is_empty()
                && (large
                    || live.map_or(0, |e| e.value.len()).max(offset + data.len()) > MAX_VALUE) =>
        {
            (Write::Keep, OpOut::Grow)
        }
        Update::SetRange(_, data) if data.is_empty() && large => {
            (Write::Keep, OpOut::Int(live.map_or(0, Entry::len) as i64))
        }
        Update::IncrBy(by) => {
            let current = match live {
                None => 0,
                Some(e) => match parse_int(&e.value) {
                    Some(v) => v,
                    None => return (Write::Keep, OpOut::Err(NOT_INTEGER.into())),
                },
            };
            match current.checked_add(*by) {
                Some(v) => (Write::Set(v.to_string().into_bytes(), keep_ttl), OpOut::Int(v)),
                None => {
                    (Write::Keep, OpOut::Err("ERR increment or decrement would overflow".into()))
                }
            }
        }
        Update::IncrByFloat(by) => {
            let current = match live {
                None => 0.0,
                Some(e) => match parse_float(&e.value) {
                    Some(v) => v,
                    None => return (Write::Keep, OpOut::Err(NOT_FLOAT.into())),
                },
            };
            let v = current + by;
            if !v.is_finite() {
                let e = "ERR increment would produce NaN or Infinity";
                return (Write::Keep, OpOut::Err(e.into()));
            }
            let text = format_float(v).into_bytes();
            (Write::Set(text.clone(), keep_ttl), OpOut::Value(Some(text)))
        }
        Update::Append(suffix) => {
            let old = live.map_or(&[][..], |e| &e.value);
            if let Err(e) = check_value_len(old.len() + suffix.len(), Growth::Grow) {
                return (Write::Keep, OpOut::Err(e));
            }
            let mut value = Vec::with_capacity(old.len() + suffix.len());
            value.extend_from_slice(old);
            value.extend_from_slice(suffix);
            let len = value.len() as i64;
            (Write::Set(value, keep_ttl), OpOut::Int(len))
        }
        Update::SetRange(offset, data) => {
            let old = live.map_or(&[][..], |e| &e.value);
            if data.is_empty() {
                // Nothing to write: the length as it is (0 for a missing key, not created).
                return (Write::Keep, OpOut::Int(old.len() as i64));
            }
            let mut value = old.to_vec();
            let end = offset + data.len();
            if value.len() < end {
                value.resize(end, 0);
            }
            value[*offset..end].copy_from_slice(data);
            debug_assert!(value.len() <= MAX_VALUE, "longer values take the large path");
            let len = value.len() as i64;
            (Write::Set(value, keep_ttl), OpOut::Int(len))
        }
        Update::Expire(at, cond) => {
            let Some(e) = live else { return (Write::Keep, OpOut::Int(0)) };
            let current = if e.expires == 0 { i64::MAX } else { e.expires as i64 };
            let holds = (!cond.nx || e.expires == 0)
                && (!cond.xx || e.expires != 0)
                && (!cond.gt || *at > current)
                && (!cond.lt || *at < current);
            if !holds {
                return (Write::Keep, OpOut::Int(0));
            }
            if *at <= now as i64 {
                return (Write::Del, OpOut::Int(1));
            }
            (retime(e, *at as u64), OpOut::Int(1))
        }
        Update::Persist => match live {
            Some(e) if e.expires != 0 => (retime(e, 0), OpOut::Int(1)),
            _ => (Write::Keep, OpOut::Int(0)),
        },
        // (A manifest names a random tag: no plain value equals one by chance.)
        Update::DelIf(value, expires) => match live {
            Some(e) if &e.value == value && e.expires == *expires => {
                (Write::Del, OpOut::Done(true))
            }
            _ => (Write::Keep, OpOut::Done(false)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_parse_as_redis_string2ll() {
        assert_eq!(parse_int(b"0"), Some(0));
        assert_eq!(parse_int(b"-12"), Some(-12));
        assert_eq!(parse_int(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_int(b"-9223372036854775808"), Some(i64::MIN));
        for bad in
            [&b""[..], b"9223372036854775808", b"+1", b" 1", b"1 ", b"01", b"-0", b"1.0", b"-"]
        {
            assert_eq!(parse_int(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn floats_parse_and_format_as_incrbyfloat_answers() {
        assert_eq!(parse_float(b"10.50"), Some(10.5));
        assert_eq!(parse_float(b"5.0e3"), Some(5000.0));
        assert_eq!(parse_float(b" 1"), None);
        assert_eq!(parse_float(b"nan"), None);
        assert_eq!(parse_float(b"abc"), None);
        assert_eq!(format_float(10.5 + 0.1), "10.6");
        assert_eq!(format_float(5200.0), "5200");
        assert_eq!(format_float(1e20), "100000000000000000000");
        assert_eq!(format_float(-0.0), "0");
    }

    #[test]
    fn getrange_counts_negative_indexes_from_the_end() {
        let v = b"This is a string";
        assert_eq!(getrange(v, 0, 3), b"This");
        assert_eq!(getrange(v, -3, -1), b"ing");
        assert_eq!(getrange(v, 0, -1), v);
        assert_eq!(getrange(v, 10, 100), b"string");
        assert_eq!(getrange(v, 5, 3), b"");
        assert_eq!(getrange(v, -1, -5), b"");
        assert_eq!(getrange(v, -100, 2), b"Thi");
        assert_eq!(getrange(b"", 0, -1), b"");
    }

    #[test]
    fn updates_keep_or_clear_the_ttl_as_redis() {
        let live = Entry { value: b"41".to_vec(), expires: 5000, manifest: false };
        let (w, out) = apply(&Update::IncrBy(1), Some(&live), 1000);
        assert_eq!(w, Write::Set(b"42".to_vec(), 5000), "INCR keeps the TTL");
        assert_eq!(out, OpOut::Int(42));
        let max = Entry { value: i64::MAX.to_string().into_bytes(), expires: 0, manifest: false };
        let (w, out) = apply(&Update::IncrBy(1), Some(&max), 1000);
        assert_eq!(w, Write::Keep);
        assert_eq!(out, OpOut::Err("ERR increment or decrement would overflow".into()));
        let set =
            Update::Set { value: b"x".to_vec(), cond: Cond::Always, ttl: Ttl::Clear, get: true };
        let (w, out) = apply(&set, Some(&live), 1000);
        assert_eq!(w, Write::Set(b"x".to_vec(), 0), "SET without KEEPTTL clears the TTL");
        assert_eq!(out, OpOut::Value(Some(b"41".to_vec())));
        let (w, out) = apply(&Update::SetRange(3, b"ab".to_vec()), None, 1000);
        assert_eq!(w, Write::Set(b"\0\0\0ab".to_vec(), 0), "padded with zero bytes");
        assert_eq!(out, OpOut::Int(5));
        let gt = ExpireCond { gt: true, ..ExpireCond::default() };
        let no_ttl = Entry { value: b"v".to_vec(), expires: 0, manifest: false };
        assert_eq!(apply(&Update::Expire(9000, gt), Some(&no_ttl), 1000).1, OpOut::Int(0));
        let lt = ExpireCond { lt: true, ..ExpireCond::default() };
        assert_eq!(apply(&Update::Expire(9000, lt), Some(&no_ttl), 1000).1, OpOut::Int(1));
        let (w, _) = apply(&Update::Expire(999, ExpireCond::default()), Some(&no_ttl), 1000);
        assert_eq!(w, Write::Del, "an expiry in the past deletes");
    }
}
