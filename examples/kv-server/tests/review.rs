//! Review findings: each test demonstrates a bug that was found (and fixed) in review.

mod common;

use common::{bulk, ok, pattern, scratch, Reply, Server};

const KIB: usize = 1 << 10;

/// APPEND / SETRANGE with an argument longer than one record take the connection's large-edit
/// path. Under `--fsync always` their answer must wait for the key owner's log commit, as every
/// other write's does: a SIGKILL right after the answer must not lose them.
#[test]
fn a_large_append_or_setrange_is_durable_once_answered() {
    let dir = scratch("rv-largeedit");
    let path = dir.path().join("data");
    let args = ["--size", "64M", "--shards", "2", "--cache-bytes", "8M", "--fsync", "always"];
    let server = Server::start(&path, &args);
    let mut c = server.client();
    let a = pattern(1, 100 * KIB);
    let b = pattern(2, 70 * KIB);
    // A missing key and a small one: nothing to free afterwards, so no other commit runs.
    assert_eq!(c.cmd(&[b"APPEND", b"fresh", &a]), Reply::Int(a.len() as i64));
    assert_eq!(c.cmd(&[b"SET", b"small", b"0123456789"]), ok());
    assert_eq!(c.cmd(&[b"APPEND", b"small", &b]), Reply::Int(10 + b.len() as i64));
    assert_eq!(c.cmd(&[b"SETRANGE", b"ranged", b"5", &b]), Reply::Int(5 + b.len() as i64));
    server.kill9();
    let server = Server::start(&path, &args);
    let mut c = server.client();
    assert!(c.cmd(&[b"GET", b"fresh"]) == bulk(&a), "APPEND of a missing key lost");
    let mut small = b"0123456789".to_vec();
    small.extend_from_slice(&b);
    assert!(c.cmd(&[b"GET", b"small"]) == bulk(&small), "APPEND of a small value lost");
    let mut ranged = vec![0u8; 5];
    ranged.extend_from_slice(&b);
    assert!(c.cmd(&[b"GET", b"ranged"]) == bulk(&ranged), "SETRANGE of a missing key lost");
    server.shutdown();
}
