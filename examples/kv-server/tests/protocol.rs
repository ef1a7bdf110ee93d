//! Malformed and hostile input: protocol errors close the offending connection with a RESP
//! error, truncated requests and vanished clients cost nothing, and the server keeps serving.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::{bulk, encode, ok, pattern, scratch, Reply, Server};

#[test]
fn malformed_requests_get_a_protocol_error_and_a_closed_connection() {
    let dir = scratch("protocol");
    let server = Server::start(
        &dir.path().join("data"),
        &["--size", "4M", "--shards", "2", "--cache-bytes", "1M"],
    );
    let cases: &[(&str, &[u8])] = &[
        ("bad type byte", b"$3\r\nfoo\r\n"),
        ("integer at top level", b":12\r\n"),
        ("binary garbage", b"\x00\xff\xfe\r\n"),
        ("non-numeric count", b"*x\r\n"),
        ("huge count", b"*99999999999\r\n"),
        ("count past the limit", b"*10000000\r\n"),
        ("negative bulk length", b"*1\r\n$-5\r\n"),
        ("huge bulk length", b"*2\r\n$3\r\nGET\r\n$9999999999\r\n"),
        ("bulk past the limit", b"*2\r\n$3\r\nSET\r\n$536870913\r\n"),
        ("wrong element type", b"*2\r\n$3\r\nGET\r\n:1\r\n"),
        ("missing CRLF after a bulk", b"*1\r\n$4\r\nPINGxx\r\n"),
        ("endless count line", b"*111111111111111111111111111111111111111111"),
    ];
    for (what, bytes) in cases {
        let mut c = server.client();
        c.send_raw(bytes);
        match c.read_reply() {
            Reply::Error(e) => assert!(e.starts_with("ERR Protocol error"), "{what}: {e}"),
            other => panic!("{what}: {other:?}"),
        }
        assert!(c.is_closed(), "{what}: the connection is closed");
    }
    // Commands before the bad bytes in the same packet are answered first, in order.
    let mut c = server.client();
    c.send_raw(b"*3\r\n$3\r\nSET\r\n$1\r\na\r\n$1\r\n1\r\n*1\r\n$4\r\nPING\r\n!!!\r\n");
    assert_eq!(c.read_reply(), ok());
    assert_eq!(c.read_reply(), Reply::Simple("PONG".into()));
    assert!(c.read_reply().is_error_with("Protocol error"));
    assert!(c.is_closed());
    // The server is fine.
    assert_eq!(server.client().cmds(&["GET", "a"]), bulk("1"));
    server.shutdown();
}

#[test]
fn truncated_requests_and_vanishing_clients_cost_nothing() {
    let dir = scratch("truncated");
    let server = Server::start(
        &dir.path().join("data"),
        &["--size", "4M", "--shards", "2", "--cache-bytes", "1M"],
    );
    let partials: &[&[u8]] = &[
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhel",
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1000000\r\n",
        b"*2\r\n$3\r\nGET",
        b"*2",
        b"PING",
        b"*1000\r\n$3\r\nGET\r\n",
    ];
    for _ in 0..20 {
        for p in partials {
            let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
            s.write_all(p).unwrap();
            drop(s);
        }
    }
    // Clients that send half a request and stall do not block others.
    let stalled: Vec<TcpStream> = (0..50)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
            s.write_all(b"*3\r\n$3\r\nSET\r\n$1\r\nz\r\n$100\r\nabc").unwrap();
            s
        })
        .collect();
    let mut c = server.client();
    assert_eq!(c.cmds(&["SET", "k", "v"]), ok());
    assert_eq!(c.cmds(&["GET", "k"]), bulk("v"));
    assert_eq!(c.cmds(&["EXISTS", "z"]), Reply::Int(0), "a partial SET never applies");
    drop(stalled);
    // A request split into single bytes is still one request.
    let req = common::encode(&[b"SET", b"slow", b"value"]);
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    s.set_nodelay(true).unwrap();
    for b in &req {
        s.write_all(&[*b]).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut c2 = server.client();
    // The reply went to `s`; check the effect from another connection once it is there.
    let mut got = Reply::Bulk(None);
    for _ in 0..100 {
        got = c2.cmds(&["GET", "slow"]);
        if got != Reply::Bulk(None) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(got, bulk("value"));
    server.shutdown();
}

#[test]
fn random_garbage_never_takes_the_server_down() {
    let dir = scratch("garbage");
    let server = Server::start(
        &dir.path().join("data"),
        &["--size", "4M", "--shards", "2", "--cache-bytes", "1M"],
    );
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let alphabet = b"*$:+-\r\n0123456789-GETSETPINGDELMGET abc\x00\xff";
    for _ in 0..200 {
        let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = (x % 400) as usize;
        let bytes: Vec<u8> = (0..len)
            .map(|i| {
                let r = x.rotate_left((i % 64) as u32).wrapping_mul(i as u64 + 1);
                alphabet[(r >> 7) as usize % alphabet.len()]
            })
            .collect();
        let _ = s.write_all(&bytes);
    }
    let mut c = server.client();
    assert_eq!(c.cmds(&["PING"]), Reply::Simple("PONG".into()));
    assert_eq!(c.cmds(&["SET", "still", "here"]), ok());
    assert_eq!(c.cmds(&["GET", "still"]), bulk("here"));
    server.shutdown();
}

/// Pipelined commands that arrive a few bytes at a time, in pieces of every size, with long
/// requests (values larger than the read buffer's room, which it grows for and shrinks after)
/// among short ones: every reply comes back, in order, and every value reads back whole.
#[test]
fn pipelined_commands_split_across_reads_around_long_requests() {
    let dir = scratch("split-reads");
    let server = Server::start(
        &dir.path().join("data"),
        &["--size", "64M", "--shards", "1", "--cache-bytes", "8M"],
    );
    let big = pattern(1, 200 << 10);
    let mid = pattern(2, 40 << 10);
    let mut stream = Vec::new();
    let mut expected = Vec::new();
    for round in 0..3u8 {
        let a = format!("a{round}");
        let mut push = |args: &[&[u8]], reply: Reply| {
            stream.extend_from_slice(&encode(args));
            expected.push(reply);
        };
        push(&[b"SET", a.as_bytes(), b"1"], ok());
        push(&[b"SET", b"big", &big], ok());
        push(&[b"GET", a.as_bytes()], bulk("1"));
        push(&[b"SET", b"mid", &mid], ok());
        push(&[b"INCR", b"counter"], Reply::Int(round as i64 * 2 + 1));
        push(&[b"STRLEN", b"big"], Reply::Int(big.len() as i64));
        push(&[b"INCR", b"counter"], Reply::Int(round as i64 * 2 + 2));
        for k in 0..40 {
            let key = format!("k{round}:{k}");
            let value = format!("v{k}");
            push(&[b"SET", key.as_bytes(), value.as_bytes()], ok());
            push(&[b"GET", key.as_bytes()], bulk(value));
        }
        push(&[b"STRLEN", b"mid"], Reply::Int(mid.len() as i64));
    }
    let mut c = server.client();
    let mut at = 0;
    let mut piece = 0usize;
    while at < stream.len() {
        // 1 to 7 bytes at a time at first (every header split), then 1 to 37 KiB.
        let len = if at < 2000 { 1 + piece % 7 } else { 1 + (piece * 7919) % (37 << 10) };
        let end = (at + len).min(stream.len());
        c.send_raw(&stream[at..end]);
        at = end;
        piece += 1;
        std::thread::sleep(Duration::from_micros(300));
    }
    for (i, want) in expected.iter().enumerate() {
        assert_eq!(&c.read_reply(), want, "reply {i}");
    }
    assert_eq!(c.cmd(&[b"GET", b"big"]), bulk(&big));
    assert_eq!(c.cmd(&[b"GET", b"mid"]), bulk(&mid));
    server.shutdown();
}
