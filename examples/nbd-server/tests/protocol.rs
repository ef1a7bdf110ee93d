//! The NBD protocol spoken byte by byte over raw TCP: option haggling as the spec sets it
//! out, the spec's error replies for bad requests, clean disconnects for malformed or hostile
//! input, and a server that keeps serving through all of it.

mod common;

use std::io::{Read, Write};

use common::*;

const SIZE: u64 = 16 << 20;

fn server(args: &[&str]) -> (tempfile::TempDir, Server) {
    let dir = scratch("protocol");
    let path = dir.path().join("disk.img");
    let mut all = vec!["--size", "16M", "--shards", "2", "--cache-bytes", "2M"];
    all.extend_from_slice(args);
    let server = Server::start(&path, &all);
    (dir, server)
}

fn u16_at(data: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([data[at], data[at + 1]])
}

fn u32_at(data: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(data[at..at + 4].try_into().expect("4 bytes"))
}

#[test]
fn option_haggling_answers_as_the_spec_says() {
    let (_dir, server) = server(&[]);
    let mut s = Nbd::greet(server.port);
    s.write_all(&1u32.to_be_bytes()).expect("client flags");

    Nbd::send_option(&mut s, OPT_LIST, &[]);
    let (option, reply, data) = Nbd::read_option_reply(&mut s).expect("LIST");
    assert_eq!((option, reply), (OPT_LIST, REP_SERVER));
    assert_eq!(u32_at(&data, 0), 7);
    assert_eq!(&data[4..], b"corebuf");
    assert_eq!(Nbd::read_option_reply(&mut s).expect("LIST end").1, REP_ACK);
    Nbd::send_option(&mut s, OPT_LIST, b"junk");
    assert_eq!(Nbd::read_option_reply(&mut s).expect("LIST").1, REP_ERR_INVALID);

    for unknown in [OPT_STRUCTURED_REPLY, 5, 1000, u32::MAX] {
        Nbd::send_option(&mut s, unknown, b"some data");
        let (option, reply, _) = Nbd::read_option_reply(&mut s).expect("reply");
        assert_eq!((option, reply), (unknown, REP_ERR_UNSUP), "option {unknown}");
    }
    Nbd::send_option(&mut s, 1000, &vec![7u8; 100_000]);
    assert_eq!(Nbd::read_option_reply(&mut s).expect("reply").1, REP_ERR_TOO_BIG);
    Nbd::send_option(&mut s, OPT_INFO, &[0, 0, 0, 9, 1]);
    assert_eq!(Nbd::read_option_reply(&mut s).expect("reply").1, REP_ERR_INVALID);

    // INFO with block size and name requests (and an unknown one, ignored).
    Nbd::send_option(&mut s, OPT_INFO, &go_data("corebuf", &[3, 1, 77]));
    let mut infos = Vec::new();
    loop {
        let (option, reply, data) = Nbd::read_option_reply(&mut s).expect("INFO");
        assert_eq!(option, OPT_INFO);
        if reply == REP_ACK {
            break;
        }
        assert_eq!(reply, REP_INFO);
        infos.push(data);
    }
    let export = infos.iter().find(|d| u16_at(d, 0) == 0).expect("NBD_INFO_EXPORT");
    assert_eq!(u64::from_be_bytes(export[2..10].try_into().expect("8")), SIZE);
    let flags = u16_at(export, 10);
    // HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES, CAN_MULTI_CONN.
    for bit in [0, 2, 3, 5, 6, 8] {
        assert!(flags & (1 << bit) != 0, "flag bit {bit} in {flags:#x}");
    }
    assert_eq!(flags & 2, 0, "not read-only");
    let sizes = infos.iter().find(|d| u16_at(d, 0) == 3).expect("NBD_INFO_BLOCK_SIZE");
    assert_eq!((u32_at(sizes, 2), u32_at(sizes, 6), u32_at(sizes, 10)), (1, 4096, 32 << 20));
    let name = infos.iter().find(|d| u16_at(d, 0) == 1).expect("NBD_INFO_NAME");
    assert_eq!(&name[2..], b"corebuf");

    Nbd::send_option(&mut s, OPT_GO, &go_data("no-such-export", &[]));
    assert_eq!(Nbd::read_option_reply(&mut s).expect("GO").1, REP_ERR_UNKNOWN);
    Nbd::send_option(&mut s, OPT_GO, &go_data("corebuf", &[]));
    loop {
        let (_, reply, _) = Nbd::read_option_reply(&mut s).expect("GO");
        if reply == REP_ACK {
            break;
        }
        assert_eq!(reply, REP_INFO);
    }
    let mut nbd = Nbd { stream: s, size: SIZE, flags };
    assert_eq!(nbd.read(0, 4096), Ok(vec![0u8; 4096]));

    // ABORT is acknowledged, then the server closes.
    let mut s = Nbd::greet(server.port);
    s.write_all(&1u32.to_be_bytes()).expect("client flags");
    Nbd::send_option(&mut s, OPT_ABORT, &[]);
    assert_eq!(Nbd::read_option_reply(&mut s).expect("ABORT").1, REP_ACK);
    assert!(is_closed(&mut s));
}

#[test]
fn export_name_enters_transmission_and_an_unknown_name_disconnects() {
    let (_dir, server) = server(&[]);
    for (client_flags, tail) in [(3u32, 10usize), (1, 134)] {
        let mut s = Nbd::greet(server.port);
        s.write_all(&client_flags.to_be_bytes()).expect("client flags");
        Nbd::send_option(&mut s, OPT_EXPORT_NAME, b"corebuf");
        let mut reply = vec![0u8; tail];
        s.read_exact(&mut reply).expect("export reply");
        assert_eq!(u64::from_be_bytes(reply[0..8].try_into().expect("8")), SIZE);
        assert!(reply[10..].iter().all(|&b| b == 0), "124 zero bytes without NO_ZEROES");
        let mut nbd = Nbd { stream: s, size: SIZE, flags: u16_at(&reply, 8) };
        assert_eq!(nbd.write(5, b"hello", 0), 0);
        assert_eq!(nbd.read(5, 5).as_deref(), Ok(&b"hello"[..]));
    }
    let mut s = Nbd::greet(server.port);
    s.write_all(&1u32.to_be_bytes()).expect("client flags");
    Nbd::send_option(&mut s, OPT_EXPORT_NAME, b"nope");
    assert!(is_closed(&mut s), "an unknown NBD_OPT_EXPORT_NAME ends the session");
}

#[test]
fn malformed_handshakes_close_the_connection_and_the_server_keeps_serving() {
    let (_dir, mut server) = server(&[]);
    // Unknown client flags.
    let mut s = Nbd::greet(server.port);
    s.write_all(&0x20u32.to_be_bytes()).expect("client flags");
    assert!(is_closed(&mut s));
    // A bad option magic.
    let mut s = Nbd::greet(server.port);
    s.write_all(&1u32.to_be_bytes()).expect("client flags");
    s.write_all(b"NOTMAGIC\0\0\0\x07\0\0\0\0").expect("garbage");
    assert!(is_closed(&mut s));
    // Garbage instead of client flags and options, then a hang-up mid-option.
    let mut s = Nbd::greet(server.port);
    s.write_all(&[0xff; 3]).expect("garbage");
    drop(s);
    let mut s = Nbd::greet(server.port);
    s.write_all(&1u32.to_be_bytes()).expect("client flags");
    s.write_all(&IHAVEOPT.to_be_bytes()).expect("half an option");
    s.write_all(&OPT_GO.to_be_bytes()).expect("half an option");
    s.write_all(&u32::MAX.to_be_bytes()).expect("a 4 GiB option");
    s.write_all(&[1u8; 1000]).expect("some of it");
    drop(s);
    // GO with a name length past the option's end.
    let mut s = Nbd::greet(server.port);
    s.write_all(&1u32.to_be_bytes()).expect("client flags");
    Nbd::send_option(&mut s, OPT_GO, &[0xff, 0xff, 0xff, 0xff, 0, 0]);
    assert_eq!(Nbd::read_option_reply(&mut s).expect("GO").1, REP_ERR_INVALID);
    drop(s);

    let mut nbd = Nbd::connect(server.port);
    assert_eq!(nbd.read(0, 512), Ok(vec![0u8; 512]));
    assert!(server.is_running());
}

#[test]
fn bad_requests_get_the_specs_errors_or_a_disconnect() {
    let (_dir, mut server) = server(&[]);
    let mut nbd = Nbd::connect(server.port);
    assert_eq!(nbd.size, SIZE);
    assert_eq!(nbd.read(SIZE, 1), Err(EINVAL), "read past the end");
    assert_eq!(nbd.read(SIZE - 4096, 4097), Err(EINVAL), "read spanning the end");
    assert_eq!(nbd.read(u64::MAX - 10, 100), Err(EINVAL), "offset + length overflows");
    assert_eq!(nbd.write(SIZE - 2, b"abc", 0), ENOSPC, "write spanning the end");
    assert_eq!(nbd.command(CMD_WRITE_ZEROES, 0, SIZE, 4096), ENOSPC);
    assert_eq!(nbd.command(CMD_TRIM, 0, SIZE - 4096, 8192), EINVAL);
    assert_eq!(nbd.read(0, (32 << 20) + 1), Err(EINVAL), "read over the payload limit");
    assert_eq!(nbd.command(99, 0, 0, 0), EINVAL, "unknown command");
    assert_eq!(nbd.command(CMD_READ, 1 << 7, 0, 0), EINVAL, "undocumented flag");
    assert_eq!(nbd.command(CMD_FLUSH, 0, 0, 0), 0);
    // Zero-length requests are harmless.
    assert_eq!(nbd.read(100, 0), Ok(Vec::new()));
    assert_eq!(nbd.write(100, b"", 0), 0);
    // The connection still works after every error.
    assert_eq!(nbd.write(SIZE - 3, b"end", FLAG_FUA), 0);
    assert_eq!(nbd.read(SIZE - 3, 3).as_deref(), Ok(&b"end"[..]));

    // A write whose payload is over the limit cannot be skipped safely: disconnect.
    nbd.send(CMD_WRITE, 0, 9, 0, 64 << 20, &[]);
    assert!(nbd.is_closed());
    // A bad request magic is a protocol violation: disconnect.
    let mut nbd = Nbd::connect(server.port);
    nbd.stream.write_all(&[0x55; 28]).expect("garbage request");
    assert!(nbd.is_closed());
    // A hang-up inside a write payload.
    let mut nbd = Nbd::connect(server.port);
    nbd.send(CMD_WRITE, 0, 9, 0, 1 << 20, &[1u8; 1000]);
    drop(nbd);

    let mut nbd = Nbd::connect(server.port);
    assert_eq!(nbd.read(SIZE - 3, 3).as_deref(), Ok(&b"end"[..]));
    assert!(server.is_running());
    let log = server.stop();
    assert!(log.contains("bad request magic"), "{log}");
}

#[test]
fn a_read_only_export_refuses_writes_with_eperm() {
    let (_dir, server) = server(&["--read-only"]);
    let mut nbd = Nbd::connect(server.port);
    assert!(nbd.flags & 2 != 0, "NBD_FLAG_READ_ONLY");
    assert_eq!(nbd.flags & (1 << 5), 0, "no trim on a read-only export");
    assert_eq!(nbd.write(0, b"nope", 0), EPERM);
    assert_eq!(nbd.command(CMD_TRIM, 0, 0, 4096), EPERM);
    assert_eq!(nbd.command(CMD_WRITE_ZEROES, 0, 0, 4096), EPERM);
    assert_eq!(nbd.read(0, 4), Ok(vec![0u8; 4]));
    assert_eq!(nbd.command(CMD_FLUSH, 0, 0, 0), 0);
}

/// Disjoint byte ranges that share blocks, written concurrently (pipelined on two
/// connections) must all land: a read-modify-write that raced another on the same block
/// would lose one of them. The range straddles routing-range boundaries, so the blocks
/// belong to both shards.
#[test]
fn concurrent_unaligned_writes_to_shared_blocks_all_land() {
    let (_dir, server) = server(&[]);
    let base: u64 = (256 << 10) - (40 << 10); // 40 KiB before a routing-range boundary
    let span: usize = 80 << 10;
    let mut cuts = vec![0usize, span];
    let mut x: u64 = 0x1234_5678;
    for _ in 0..600 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        cuts.push((x % span as u64) as usize);
    }
    cuts.sort_unstable();
    cuts.dedup();
    let model = random_bytes(7, span);
    let ranges: Vec<(usize, usize)> = cuts.windows(2).map(|w| (w[0], w[1])).collect();
    let mut conns = [Nbd::connect(server.port), Nbd::connect(server.port)];
    for (i, &(start, end)) in ranges.iter().enumerate() {
        let len = (end - start) as u32;
        conns[i % 2].send(CMD_WRITE, 0, i as u64, base + start as u64, len, &model[start..end]);
    }
    for (c, conn) in conns.iter_mut().enumerate() {
        let mut cookies: Vec<u64> =
            (0..ranges.len() as u64).filter(|i| i % 2 == c as u64).collect();
        let mut seen = Vec::new();
        for _ in 0..cookies.len() {
            let (error, cookie) = conn.reply().expect("a write reply");
            assert_eq!(error, 0);
            seen.push(cookie);
        }
        seen.sort_unstable();
        cookies.sort_unstable();
        assert_eq!(seen, cookies, "every request answered exactly once");
    }
    let back = conns[0].read(base, span as u32).expect("read back");
    let first_bad = back.iter().zip(&model).position(|(a, b)| a != b);
    assert_eq!(first_bad, None, "a byte written was lost");
}

/// One request spanning many blocks on both shards, at odd offsets, in and out.
#[test]
fn large_unaligned_requests_are_split_over_shards_and_joined() {
    let (_dir, server) = server(&[]);
    let mut nbd = Nbd::connect(server.port);
    let data = random_bytes(11, (3 << 20) + 333);
    assert_eq!(nbd.write(12_345, &data, 0), 0);
    assert_eq!(nbd.read(12_345, data.len() as u32).as_deref(), Ok(&data[..]));
    // Read it back in pieces that cut blocks and ranges differently.
    let mut at = 0;
    let mut step = 4095;
    while at < data.len() {
        let n = step.min(data.len() - at);
        let got = nbd.read(12_345 + at as u64, n as u32).expect("piece");
        assert_eq!(got, data[at..at + n], "piece at {at}");
        at += n;
        step = step * 3 % 700_001 + 1;
    }
    // Zeroes and trim over unaligned spans: zeroes read back as zeroes.
    assert_eq!(nbd.command(CMD_WRITE_ZEROES, 0, 100_000, 1_000_000), 0);
    let got = nbd.read(99_999, 1_000_002).expect("read");
    assert_eq!(got[0], data[99_999 - 12_345]);
    assert!(got[1..1_000_001].iter().all(|&b| b == 0));
    assert_eq!(got[1_000_001], data[1_100_000 - 12_345]);
    assert_eq!(nbd.command(CMD_TRIM, 0, 5000, 3 << 20), 0);
    // The largest read the spec's default allows, in one reply.
    let whole = nbd.read(0, (16 << 20) as u32).expect("a 16 MiB read");
    assert_eq!(whole.len(), 16 << 20);
    nbd.send(CMD_DISC, 0, 0, 0, 0, &[]);
    assert!(nbd.is_closed());
}

/// Requests on one connection run concurrently and are answered as they complete: a small
/// read of a cached block, sent after a 16 MiB read of blocks that are not cached, is
/// answered first.
#[test]
fn replies_come_back_in_completion_order_not_request_order() {
    let (_dir, server) = server(&[]);
    let mut nbd = Nbd::connect(server.port);
    assert_eq!(nbd.write(100, b"cached", 0), 0);
    // The cache holds 2 MiB: most of the 16 MiB read must come from the device.
    nbd.send(CMD_READ, 0, 1, 0, 16 << 20, &[]);
    nbd.send(CMD_READ, 0, 2, 100, 6, &[]);
    let (error, first) = nbd.reply().expect("a reply");
    assert_eq!((error, first), (0, 2), "the small read answers first");
    let mut small = [0u8; 6];
    std::io::Read::read_exact(&mut nbd.stream, &mut small).expect("its data");
    assert_eq!(&small, b"cached");
    let (error, second) = nbd.reply().expect("a reply");
    assert_eq!((error, second), (0, 1));
    let mut big = vec![0u8; 16 << 20];
    std::io::Read::read_exact(&mut nbd.stream, &mut big).expect("its data");
    assert_eq!(&big[100..106], b"cached");
}

/// A client that connects and stalls in the handshake is dropped after the timeout; one in
/// transmission may stay idle.
#[test]
fn a_stalled_handshake_is_dropped_but_an_idle_connection_is_not() {
    let (_dir, server) = server(&["--handshake-timeout-secs", "1"]);
    let mut idle = Nbd::connect(server.port);
    let mut stalled = Nbd::greet(server.port);
    let started = std::time::Instant::now();
    assert!(is_closed(&mut stalled), "a stalled handshake is closed");
    assert!(started.elapsed() < std::time::Duration::from_secs(8));
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(idle.read(0, 512), Ok(vec![0u8; 512]), "an idle transmission stays open");
}
