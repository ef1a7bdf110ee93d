//! Opening a log: the region header, the data area read into memory, and the scan that finds
//! the records to replay, cuts a torn tail and refuses a damaged durable record.

use super::*;
use crate::io::{Device, IoQueue};
use crate::log::error::LogError;
use crate::log::format::{
    decode_record_header, record_bytes, record_crc_ok, HeaderCheck, RecordHeader, RegionHeader,
    HEADER_BLOCKS, RECORD_ALIGN, RECORD_HEADER_BYTES,
};

pub(super) fn validate<D: Device>(
    queue: &IoQueue<D>,
    mut config: LogConfig,
) -> Result<LogConfig, LogError> {
    let bad =
        |setting: &'static str, reason: String| LogError::Io(crate::Error::config(setting, reason));
    let bs = queue.config().block_size_bytes as u64;
    if bs < 512 {
        return Err(bad("block_size_bytes", format!("{bs} is too small for a log (512 at least)")));
    }
    if config.region_blocks < HEADER_BLOCKS + 2 {
        return Err(bad(
            "log region",
            format!("{} blocks; at least 4 are needed", config.region_blocks),
        ));
    }
    let end = config.region_first_block.checked_add(config.region_blocks);
    if end.is_none_or(|end| end > queue.device_blocks()) {
        return Err(LogError::Io(crate::Error::BlockOutOfRange {
            block: config.region_first_block.saturating_add(config.region_blocks) - 1,
            device_blocks: queue.device_blocks(),
        }));
    }
    if config.staging_blocks < 2 {
        return Err(bad("log staging_blocks", "at least 2".into()));
    }
    let data_bytes = (config.region_blocks - HEADER_BLOCKS) * bs;
    let by_staging = (config.staging_blocks as u64 - 1) * bs - RECORD_HEADER_BYTES as u64;
    let by_region = data_bytes / 2 - RECORD_HEADER_BYTES as u64;
    config.record_bytes_max =
        (config.record_bytes_max as u64).min(by_staging).min(by_region) as usize;
    Ok(config)
}

pub(super) async fn read_header<D: Device>(
    queue: &IoQueue<D>,
    config: &LogConfig,
    block_bytes: u64,
) -> Result<RegionHeader, LogError> {
    let offset = config.region_first_block * block_bytes;
    let mut copies = Vec::with_capacity(2);
    for i in 0..HEADER_BLOCKS {
        let mut request = queue.request().await;
        queue.read(&mut request, config.region_first_block + i).await?;
        copies.push(RegionHeader::decode(request.data()));
    }
    let valid: Vec<RegionHeader> = copies
        .iter()
        .filter_map(|c| match c {
            HeaderCheck::Valid(h) => Some(*h),
            _ => None,
        })
        .collect();
    let region_bytes = config.region_blocks * block_bytes;
    let Some(header) = valid.into_iter().max_by_key(|h| h.sequence) else {
        if copies.iter().all(|c| *c == HeaderCheck::Zero) {
            // A blank region: a new, empty log.
            return Ok(RegionHeader {
                sequence: 0,
                start_lsn: 0,
                epoch: 0,
                region_bytes,
                block_bytes,
                clean: true,
            });
        }
        let reasons: Vec<&str> = copies
            .iter()
            .map(|c| match c {
                HeaderCheck::Invalid(why) => *why,
                _ => "blank",
            })
            .collect();
        return Err(LogError::BadHeader { offset, reason: reasons.join("; ") });
    };
    if header.region_bytes != region_bytes || header.block_bytes != block_bytes {
        return Err(LogError::LayoutMismatch {
            offset,
            reason: format!(
                "formatted as {} bytes in {}-byte blocks, opened as {region_bytes} in {block_bytes}",
                header.region_bytes, header.block_bytes
            ),
        });
    }
    Ok(header)
}

pub(super) async fn read_data_area<D: Device>(
    queue: &IoQueue<D>,
    config: &LogConfig,
    block_bytes: u64,
    data_bytes: u64,
) -> Result<Vec<u8>, LogError> {
    let device = queue.device();
    let first = (config.region_first_block + HEADER_BLOCKS) * block_bytes;
    let mut image = vec![0u8; data_bytes as usize];
    let mut at = 0;
    while at < data_bytes {
        let len = SCAN_CHUNK_BYTES.min(data_bytes - at);
        let chunk = &mut image[at as usize..(at + len) as usize];
        device.read_at(first + at, chunk).await?;
        at += len;
    }
    Ok(image)
}

/// `len` bytes of the stream at `lsn` from a data-area image (wrapping at its end).
pub(super) fn read_stream(image: &[u8], lsn: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut at = (lsn % image.len() as u64) as usize;
    while out.len() < len {
        let n = (len - out.len()).min(image.len() - at);
        out.extend_from_slice(&image[at..at + n]);
        at = 0;
    }
    out
}

/// The result of a scan.
#[derive(Debug)]
pub(super) struct Scanned {
    pub(super) records: Vec<LogRecord>,
    pub(super) end: u64,
    pub(super) tail_cut: bool,
}

/// The record at `lsn`, or why there is none.
pub(super) fn record_at(
    image: &[u8],
    lsn: u64,
    record_max: usize,
) -> Result<(RecordHeader, Vec<u8>), String> {
    let header_bytes = read_stream(image, lsn, RECORD_HEADER_BYTES);
    let Some((header, crc)) = decode_record_header(&header_bytes) else {
        return Err("no record magic".into());
    };
    if header.lsn != lsn {
        return Err(format!("record names position {}, not its own", header.lsn));
    }
    if header.len as usize > record_max {
        return Err(format!("length {} is beyond the maximum {record_max}", header.len));
    }
    let payload = read_stream(image, lsn + RECORD_HEADER_BYTES as u64, header.len as usize);
    if !record_crc_ok(&header_bytes, &payload, crc) {
        return Err("checksum mismatch".into());
    }
    Ok((header, payload))
}

/// Reads the records from `start` on; stops at the first position without a valid record of
/// this lap and of a non-decreasing epoch. If a valid record further on says the stop position
/// was already durable when it was written, the stop is corruption, not a torn tail.
pub(super) fn scan(
    image: &[u8],
    start: u64,
    epoch: u64,
    record_max: usize,
) -> Result<Scanned, (u64, String)> {
    let data_bytes = image.len() as u64;
    let limit = start + data_bytes;
    let mut records = Vec::new();
    let mut at = start;
    let mut last_epoch = 0u32;
    let why_stopped = loop {
        if at + RECORD_HEADER_BYTES as u64 > limit {
            break None;
        }
        match record_at(image, at, record_max) {
            Ok((header, payload)) => {
                let end = at + record_bytes(payload.len());
                if end > limit {
                    break Some("record runs past the end of the region".to_string());
                }
                if header.epoch < last_epoch || header.epoch as u64 > (epoch & 0xFFFF_FFFF) {
                    break Some(format!(
                        "record of epoch {} after epoch {last_epoch}",
                        header.epoch
                    ));
                }
                last_epoch = header.epoch;
                records.push(LogRecord { lsn: at, payload });
                at = end;
            }
            Err(why) => break Some(why),
        }
    };
    let Some(why) = why_stopped else {
        return Ok(Scanned { records, end: at, tail_cut: false });
    };
    // Anything valid further on that was written when `at` was already durable?
    let mut probe = at + RECORD_ALIGN;
    while probe + RECORD_HEADER_BYTES as u64 <= limit {
        let pos = (probe % data_bytes) as usize;
        let plausible = pos + 16 <= image.len()
            && image[pos..pos + 4] == crate::log::format::RECORD_MAGIC
            && u64::from_le_bytes(image[pos + 8..pos + 16].try_into().expect("8 bytes")) == probe;
        if plausible {
            if let Ok((header, _)) = record_at(image, probe, record_max) {
                if header.durable_lsn > at {
                    return Err((
                        at,
                        format!(
                            "{why}; the record at position {probe} was written after position \
                             {} was durable",
                            header.durable_lsn
                        ),
                    ));
                }
            }
        }
        probe += RECORD_ALIGN;
    }
    let tail_cut =
        image[(at % data_bytes) as usize..].iter().take(RECORD_HEADER_BYTES).any(|&b| b != 0);
    Ok(Scanned { records, end: at, tail_cut })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::format::encode_record_header;

    fn image_with(records: &[(&[u8], u64)], data_bytes: usize) -> Vec<u8> {
        let mut image = vec![0u8; data_bytes];
        let mut at = 0u64;
        for (payload, durable) in records {
            let header = RecordHeader {
                len: payload.len() as u32,
                lsn: at,
                durable_lsn: *durable,
                epoch: 1,
            };
            let h = encode_record_header(&header, payload);
            image[at as usize..at as usize + 32].copy_from_slice(&h);
            image[at as usize + 32..at as usize + 32 + payload.len()].copy_from_slice(payload);
            at += record_bytes(payload.len());
        }
        image
    }

    #[test]
    fn scan_reads_records_and_stops_at_zeroes() {
        let image = image_with(&[(b"one", 0), (b"two", 0)], 4096);
        let scanned = scan(&image, 0, 1, 1024).expect("valid log");
        assert_eq!(scanned.records.len(), 2);
        assert_eq!(scanned.records[1].payload, b"two");
        assert_eq!(scanned.end, 80);
        assert!(!scanned.tail_cut);
    }

    #[test]
    fn scan_cuts_a_damaged_last_record_but_refuses_a_damaged_durable_one() {
        // The second record was appended when the first was durable (durable_lsn 40).
        let mut image = image_with(&[(b"one", 0), (b"two", 40)], 4096);
        image[45] ^= 0xFF; // the second record's payload
        let scanned = scan(&image, 0, 1, 1024).expect("a torn tail is cut");
        assert_eq!(scanned.records.len(), 1);
        assert!(scanned.tail_cut);
        let mut image = image_with(&[(b"one", 0), (b"two", 40)], 4096);
        image[33] ^= 0xFF; // the first record's payload
        let (lsn, reason) = scan(&image, 0, 1, 1024).expect_err("corruption before the tail");
        assert_eq!(lsn, 0);
        assert!(reason.contains("checksum"), "{reason}");
    }

    #[test]
    fn scan_never_resurrects_a_torn_commits_leftover_of_an_earlier_epoch() {
        // Epoch 1 wrote records at 0 and 96 (the one at 48 was torn, then cut at 48 on open);
        // epoch 2 appended from 48 up to exactly 96, where the leftover still sits.
        let mut image = vec![0u8; 4096];
        let mut put = |lsn: u64, payload: &[u8], epoch: u32| {
            let header = RecordHeader { len: payload.len() as u32, lsn, durable_lsn: 0, epoch };
            let at = lsn as usize;
            image[at..at + 32].copy_from_slice(&encode_record_header(&header, payload));
            image[at + 32..at + 32 + payload.len()].copy_from_slice(payload);
        };
        put(0, b"epoch one", 1);
        put(48, b"epoch two", 2);
        put(96, b"leftover", 1);
        let scanned = scan(&image, 0, 2, 1024).expect("valid");
        let payloads: Vec<&[u8]> = scanned.records.iter().map(|r| &r.payload[..]).collect();
        assert_eq!(payloads, [&b"epoch one"[..], &b"epoch two"[..]]);
        assert_eq!(scanned.end, 96);
    }

    #[test]
    fn scan_ignores_records_of_an_earlier_lap() {
        let image = image_with(&[(b"one", 0), (b"two", 0)], 4096);
        // Start one lap later: the positions do not match the records' own.
        let scanned = scan(&image, 4096, 1, 1024).expect("stale data is not corruption");
        assert!(scanned.records.is_empty());
        assert_eq!(scanned.end, 4096);
    }
}
