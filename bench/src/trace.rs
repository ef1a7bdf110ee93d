//! Block traces: MSR Cambridge CSV and a plain `op,offset_bytes,size_bytes` CSV, split into
//! block operations.
//!
//! A request touches every block it overlaps. A read reads each of them; a write overwrites the
//! blocks it covers whole and read-modify-writes the blocks it covers in part.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;

use crate::args::{TraceFold, TraceFormat};
use crate::error::{BenchError, Result};
use crate::workload::{Op, OpKind};

/// One block operation of a trace, with the line it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceOp {
    /// The block number, as the trace addresses it.
    pub block: u64,
    /// What it does to the block.
    pub kind: OpKind,
    /// The 1-based line of the request.
    pub line: usize,
}

/// Reads and splits the trace at `path`, then fits it to the dataset.
pub fn load(
    path: &Path,
    format: TraceFormat,
    fold: TraceFold,
    block_size: u64,
    dataset_blocks: u64,
) -> Result<Vec<Op>> {
    let file = std::fs::File::open(path)
        .map_err(|e| BenchError::Trace(format!("{}: {e}", path.display())))?;
    let name = path.display().to_string();
    let ops = parse(std::io::BufReader::new(file), format, block_size, &name)?;
    if ops.is_empty() {
        return Err(BenchError::Trace(format!("{name}: no request in the trace")));
    }
    fit(ops, dataset_blocks, fold, &name)
}

/// Parses a trace into block operations. `name` prefixes error messages.
pub fn parse(
    reader: impl BufRead,
    format: TraceFormat,
    block_size: u64,
    name: &str,
) -> Result<Vec<TraceOp>> {
    let mut format = format;
    let mut ops = Vec::new();
    for (index, line) in reader.lines().enumerate() {
        let number = index + 1;
        let line = line.map_err(|e| BenchError::Trace(format!("{name} line {number}: {e}")))?;
        let text = line.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = text.split(',').map(str::trim).collect();
        if format == TraceFormat::Auto {
            format = match fields.len() {
                7 => TraceFormat::Msr,
                3 => TraceFormat::Plain,
                n => {
                    return Err(BenchError::Trace(format!(
                        "{name} line {number}: {n} fields; expected 7 (MSR Cambridge: \
                         Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime) or 3 \
                         (op,offset_bytes,size_bytes)"
                    )))
                }
            };
        }
        if number == 1 && is_header(&fields) {
            continue;
        }
        let request = match format {
            TraceFormat::Msr => msr(&fields),
            _ => plain(&fields),
        };
        let (write, offset, size) = request
            .map_err(|why| BenchError::Trace(format!("{name} line {number}: {why}: '{text}'")))?;
        split(write, offset, size, block_size, number, &mut ops);
    }
    Ok(ops)
}

/// A first line whose offset field is a word, not a number.
fn is_header(fields: &[&str]) -> bool {
    let offset = match fields.len() {
        7 => fields[4],
        3 => fields[1],
        _ => return false,
    };
    offset.chars().any(|c| c.is_ascii_alphabetic())
}

fn number(field: &str, what: &str) -> std::result::Result<u64, String> {
    field.parse::<u64>().map_err(|_| format!("{what} '{field}' is not a non-negative integer"))
}

/// `(is_write, offset, size)` of an MSR line.
fn msr(fields: &[&str]) -> std::result::Result<(bool, u64, u64), String> {
    if fields.len() != 7 {
        return Err(format!(
            "{} fields; MSR Cambridge has 7 (Timestamp,Hostname,DiskNumber,Type,Offset,Size,\
             ResponseTime)",
            fields.len()
        ));
    }
    number(fields[0], "Timestamp")?;
    number(fields[2], "DiskNumber")?;
    let write = match fields[3].to_ascii_lowercase().as_str() {
        "read" => false,
        "write" => true,
        other => return Err(format!("Type '{other}' is neither Read nor Write")),
    };
    let offset = number(fields[4], "Offset")?;
    let size = number(fields[5], "Size")?;
    number(fields[6], "ResponseTime")?;
    request(write, offset, size)
}

/// `(is_write, offset, size)` of a plain line.
fn plain(fields: &[&str]) -> std::result::Result<(bool, u64, u64), String> {
    if fields.len() != 3 {
        return Err(format!(
            "{} fields; the plain format has 3 (op,offset_bytes,size_bytes)",
            fields.len()
        ));
    }
    let write = match fields[0].to_ascii_lowercase().as_str() {
        "r" | "read" => false,
        "w" | "write" => true,
        other => return Err(format!("op '{other}' is neither r nor w")),
    };
    request(write, number(fields[1], "offset")?, number(fields[2], "size")?)
}

fn request(write: bool, offset: u64, size: u64) -> std::result::Result<(bool, u64, u64), String> {
    if size == 0 {
        return Err("size 0 touches no block".to_string());
    }
    if offset.checked_add(size).is_none() {
        return Err("offset + size overflows".to_string());
    }
    Ok((write, offset, size))
}

/// Appends the block operations of one request.
fn split(
    write: bool,
    offset: u64,
    size: u64,
    block_size: u64,
    line: usize,
    ops: &mut Vec<TraceOp>,
) {
    let end = offset + size;
    for block in offset / block_size..=(end - 1) / block_size {
        let whole = block * block_size >= offset && (block + 1) * block_size <= end;
        let kind = match (write, whole) {
            (false, _) => OpKind::Read,
            (true, true) => OpKind::Write,
            (true, false) => OpKind::Rmw,
        };
        ops.push(TraceOp { block, kind, line });
    }
}

/// Fits trace blocks to a dataset of `dataset_blocks` blocks.
pub fn fit(ops: Vec<TraceOp>, dataset_blocks: u64, fold: TraceFold, name: &str) -> Result<Vec<Op>> {
    match fold {
        TraceFold::Reject => ops
            .into_iter()
            .map(|op| {
                if op.block >= dataset_blocks {
                    Err(BenchError::Trace(format!(
                        "{name} line {}: block {} is beyond the dataset of {dataset_blocks} \
                         blocks; use a larger --dataset, or --trace-fold dense|modulo",
                        op.line, op.block
                    )))
                } else {
                    Ok(Op { block: op.block, kind: op.kind })
                }
            })
            .collect(),
        TraceFold::Modulo => Ok(ops
            .into_iter()
            .map(|op| Op { block: op.block % dataset_blocks, kind: op.kind })
            .collect()),
        TraceFold::Dense => {
            let mut renumbered: HashMap<u64, u64> = HashMap::new();
            let mut out = Vec::with_capacity(ops.len());
            for op in ops {
                let next = renumbered.len() as u64;
                let block = *renumbered.entry(op.block).or_insert(next);
                if block >= dataset_blocks {
                    return Err(BenchError::Trace(format!(
                        "{name} line {}: the trace touches more than the dataset's \
                         {dataset_blocks} distinct blocks even renumbered densely; use a larger \
                         --dataset or --trace-fold modulo",
                        op.line
                    )));
                }
                out.push(Op { block, kind: op.kind });
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str, format: TraceFormat) -> Result<Vec<TraceOp>> {
        parse(text.as_bytes(), format, 4096, "t.csv")
    }

    fn kinds(ops: &[TraceOp]) -> Vec<(u64, OpKind)> {
        ops.iter().map(|o| (o.block, o.kind)).collect()
    }

    #[test]
    fn msr_lines_split_into_blocks_and_partial_writes_are_rmw() {
        let text = "128166372003061629,hm,1,Read,8192,4096,1331\n\
                    128166372016382155,hm,1,Write,6144,8192,2000\n\
                    128166372026382245,hm,1,Read,4095,2,100\n";
        let ops = parse_str(text, TraceFormat::Auto).unwrap();
        use OpKind::*;
        // 6144..14336 covers block 1 in part, 2 whole, 3 in part.
        assert_eq!(
            kinds(&ops),
            vec![(2, Read), (1, Rmw), (2, Write), (3, Rmw), (0, Read), (1, Read)]
        );
        assert_eq!(ops[1].line, 2);
    }

    #[test]
    fn plain_lines_with_header_parse_and_unaligned_requests_split() {
        let text =
            "op,offset_bytes,size_bytes\nr,0,4096\nw,4096,4096\n# note\n\nw,100,50\nr,4000,200\n";
        let ops = parse_str(text, TraceFormat::Plain).unwrap();
        use OpKind::*;
        assert_eq!(kinds(&ops), vec![(0, Read), (1, Write), (0, Rmw), (0, Read), (1, Read)]);
        assert_eq!(ops[2].line, 6);
    }

    #[test]
    fn malformed_lines_are_named_by_number() {
        let cases = [
            ("r,0,4096\nr,zero,4096\n", "line 2", "offset"),
            ("r,0,4096\nx,0,4096\n", "line 2", "neither r nor w"),
            ("r,0,4096\nr,0\n", "line 2", "3 (op,offset_bytes,size_bytes)"),
            ("r,0,4096\n\nr,0,0\n", "line 3", "size 0"),
            ("1,hm,1,Read,0,4096,5\n1,hm,1,Trim,0,4096,5\n", "line 2", "Type 'trim'"),
            ("a,b\n", "line 1", "2 fields"),
        ];
        for (text, line, why) in cases {
            let e = parse_str(text, TraceFormat::Auto).unwrap_err().to_string();
            assert!(e.contains(line) && e.contains(why), "{text:?} gave: {e}");
        }
    }

    #[test]
    fn beyond_the_dataset_is_rejected_naming_the_line_or_folded() {
        let ops =
            parse_str("r,0,4096\nw,40960,4096\nr,81920,4096\nr,40960,4096\n", TraceFormat::Plain)
                .unwrap();
        let e = fit(ops.clone(), 8, TraceFold::Reject, "t.csv").unwrap_err().to_string();
        assert!(
            e.contains("line 2") && e.contains("block 10") && e.contains("--trace-fold"),
            "{e}"
        );
        let modulo = fit(ops.clone(), 8, TraceFold::Modulo, "t.csv").unwrap();
        assert_eq!(modulo.iter().map(|o| o.block).collect::<Vec<_>>(), vec![0, 2, 4, 2]);
        let dense = fit(ops.clone(), 8, TraceFold::Dense, "t.csv").unwrap();
        assert_eq!(dense.iter().map(|o| o.block).collect::<Vec<_>>(), vec![0, 1, 2, 1]);
        assert_eq!(dense[1].kind, OpKind::Write);
        let e = fit(ops, 2, TraceFold::Dense, "t.csv").unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("2 distinct blocks"), "{e}");
    }
}
