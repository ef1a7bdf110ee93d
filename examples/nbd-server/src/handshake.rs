//! The fixed newstyle handshake: greeting, client flags, option haggling until
//! `NBD_OPT_EXPORT_NAME` or a successful `NBD_OPT_GO` enters transmission.
//!
//! Every option's data is bounded ([`OPTION_BYTES_MAX`]; longer data is read and dropped in
//! small pieces and answered `NBD_REP_ERR_TOO_BIG`), and so is the number of options one
//! client may send ([`OPTIONS_MAX`]), so a handshake holds a few KiB whatever the client does.
//! The whole handshake has a time limit ([`negotiate`]'s `limit`), so a client that stalls,
//! trickles, or stops reading the replies does not hold its connection slot for ever.

use std::time::Duration;

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::export::Export;
use crate::proto::*;

/// Largest option data read into memory (export names are at most 4096 bytes).
pub const OPTION_BYTES_MAX: u32 = 16 << 10;
/// Options one connection may send before the server gives up on it.
pub const OPTIONS_MAX: u32 = 1024;

/// How the handshake ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Enter the transmission phase.
    Transmission,
    /// The client aborted (empty reason), sent something invalid, or chose an unknown
    /// export: close.
    Close(&'static str),
}

/// Runs the handshake on `stream` for `export`, for at most `limit` (the same on TCP and
/// Unix sockets: glommio's Unix streams have no socket timeouts). I/O errors and the limit
/// end it as [`Outcome::Close`].
pub async fn negotiate<S>(
    stream: &mut S,
    export: &Export,
    stopping: bool,
    limit: Duration,
) -> Outcome
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let handshake = async {
        match run(stream, export, stopping).await {
            Ok(outcome) => outcome,
            Err(_) => Outcome::Close("connection error during the handshake"),
        }
    };
    let expired = async {
        glommio::timer::sleep(limit).await;
        Outcome::Close("the handshake took longer than --handshake-timeout-secs")
    };
    futures_lite::future::or(handshake, expired).await
}

async fn run<S>(stream: &mut S, export: &Export, stopping: bool) -> std::io::Result<Outcome>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(&greeting()).await?;
    stream.flush().await?;
    let mut flags = [0u8; 4];
    stream.read_exact(&mut flags).await?;
    let client_flags = be_u32(&flags);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Ok(Outcome::Close("unknown client flags"));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let mut out = Vec::with_capacity(256);
    for _ in 0..OPTIONS_MAX {
        let mut header = [0u8; 16];
        stream.read_exact(&mut header).await?;
        if be_u64(&header) != IHAVEOPT {
            return Ok(Outcome::Close("bad option magic"));
        }
        let option = be_u32(&header[8..12]);
        let length = be_u32(&header[12..16]);
        out.clear();
        if length > OPTION_BYTES_MAX {
            skip(stream, u64::from(length)).await?;
            if option == OPT_EXPORT_NAME {
                return Ok(Outcome::Close("export name too long"));
            }
            put_option_reply(&mut out, option, REP_ERR_TOO_BIG, b"option data too large");
            stream.write_all(&out).await?;
            continue;
        }
        let mut data = vec![0u8; length as usize];
        stream.read_exact(&mut data).await?;
        let outcome = option_reply(&mut out, option, &data, export, no_zeroes, stopping);
        stream.write_all(&out).await?;
        stream.flush().await?;
        if let Some(outcome) = outcome {
            return Ok(outcome);
        }
    }
    Ok(Outcome::Close("too many options"))
}

/// Writes the reply to one option into `out`; `Some` if the handshake ends with it.
fn option_reply(
    out: &mut Vec<u8>,
    option: u32,
    data: &[u8],
    export: &Export,
    no_zeroes: bool,
    stopping: bool,
) -> Option<Outcome> {
    if stopping && option != OPT_ABORT {
        if option == OPT_EXPORT_NAME {
            return Some(Outcome::Close("shutting down"));
        }
        put_option_reply(out, option, REP_ERR_SHUTDOWN, b"the server is shutting down");
        return None;
    }
    match option {
        OPT_EXPORT_NAME => {
            if !export.matches(data) {
                return Some(Outcome::Close("unknown export name"));
            }
            out.extend_from_slice(&export.size_bytes.to_be_bytes());
            out.extend_from_slice(&export.transmission_flags().to_be_bytes());
            if !no_zeroes {
                out.extend_from_slice(&[0u8; 124]);
            }
            Some(Outcome::Transmission)
        }
        OPT_ABORT => {
            put_option_reply(out, option, REP_ACK, &[]);
            Some(Outcome::Close("")) // an orderly end: nothing to report
        }
        OPT_LIST => {
            if !data.is_empty() {
                put_option_reply(out, option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
                return None;
            }
            let mut server = Vec::with_capacity(4 + export.name.len());
            server.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
            server.extend_from_slice(export.name.as_bytes());
            put_option_reply(out, option, REP_SERVER, &server);
            put_option_reply(out, option, REP_ACK, &[]);
            None
        }
        OPT_INFO | OPT_GO => info_or_go(out, option, data, export),
        _ => {
            put_option_reply(out, option, REP_ERR_UNSUP, b"option not supported");
            None
        }
    }
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO`: name length, name, count of info requests, the requests.
fn info_or_go(out: &mut Vec<u8>, option: u32, data: &[u8], export: &Export) -> Option<Outcome> {
    let Some((name, requests)) = parse_info_request(data) else {
        put_option_reply(out, option, REP_ERR_INVALID, b"malformed NBD_OPT_INFO / NBD_OPT_GO");
        return None;
    };
    if !export.matches(name) {
        put_option_reply(out, option, REP_ERR_UNKNOWN, b"no export of that name");
        return None;
    }
    let mut info = Vec::with_capacity(64);
    info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    info.extend_from_slice(&export.size_bytes.to_be_bytes());
    info.extend_from_slice(&export.transmission_flags().to_be_bytes());
    put_option_reply(out, option, REP_INFO, &info);
    for request in requests {
        info.clear();
        info.extend_from_slice(&request.to_be_bytes());
        match request {
            INFO_NAME => info.extend_from_slice(export.name.as_bytes()),
            INFO_DESCRIPTION => info.extend_from_slice(export.description().as_bytes()),
            INFO_BLOCK_SIZE => {
                // Any offset and length works (unaligned requests are read-modify-write).
                info.extend_from_slice(&1u32.to_be_bytes());
                info.extend_from_slice(&export.block_size.to_be_bytes());
                info.extend_from_slice(&PAYLOAD_BYTES_MAX.to_be_bytes());
            }
            _ => continue, // unknown information requests are ignored, as the spec says
        }
        put_option_reply(out, option, REP_INFO, &info);
    }
    put_option_reply(out, option, REP_ACK, &[]);
    (option == OPT_GO).then_some(Outcome::Transmission)
}

/// Splits `NBD_OPT_INFO` / `NBD_OPT_GO` data into the name and the information requests.
fn parse_info_request(data: &[u8]) -> Option<(&[u8], impl Iterator<Item = u16> + '_)> {
    let name_len = be_u32(data.get(0..4)?) as usize;
    let name = data.get(4..4usize.checked_add(name_len)?)?;
    let rest = &data[4 + name_len..];
    let count = be_u16(rest.get(0..2)?) as usize;
    let list = &rest[2..];
    if list.len() != count * 2 {
        return None;
    }
    Some((name, list.chunks_exact(2).map(be_u16)))
}

/// Reads and drops `length` bytes in small pieces.
async fn skip<S: AsyncRead + Unpin>(stream: &mut S, mut length: u64) -> std::io::Result<()> {
    let mut sink = [0u8; 4096];
    while length > 0 {
        let n = length.min(sink.len() as u64) as usize;
        stream.read_exact(&mut sink[..n]).await?;
        length -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export() -> Export {
        Export {
            name: "disk".into(),
            size_bytes: 1 << 20,
            block_size: 4096,
            read_only: false,
            writes_replied: Default::default(),
        }
    }

    #[test]
    fn info_request_parsing_rejects_inconsistent_lengths() {
        let mut data = 4u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"disk");
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        let (name, requests) = parse_info_request(&data).expect("valid");
        assert_eq!(name, b"disk");
        assert_eq!(requests.collect::<Vec<_>>(), vec![INFO_BLOCK_SIZE]);
        assert!(parse_info_request(&data[..data.len() - 1]).is_none());
        let mut huge = u32::MAX.to_be_bytes().to_vec();
        huge.extend_from_slice(b"disk\0\0");
        assert!(parse_info_request(&huge).is_none());
    }

    #[test]
    fn go_for_an_unknown_export_is_an_error_reply_not_a_transmission() {
        let mut data = 5u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"other\0\0");
        let mut out = Vec::new();
        assert_eq!(option_reply(&mut out, OPT_GO, &data, &export(), true, false), None);
        assert_eq!(be_u32(&out[12..16]), REP_ERR_UNKNOWN);
        out.clear();
        let unknown = option_reply(&mut out, 99, &[], &export(), true, false);
        assert_eq!((unknown, be_u32(&out[12..16])), (None, REP_ERR_UNSUP));
    }
}
