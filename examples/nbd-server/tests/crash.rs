//! Durability across SIGKILL: what a client flushed (or wrote with FUA) is in the file after
//! the server dies without warning, and a restarted server serves it.
//!
//! The cache is large enough to hold every write, so nothing reaches the file by eviction:
//! only the barrier behind FLUSH / FUA can put it there, and a broken barrier fails these
//! tests.

mod common;

use std::process::Command;

use common::*;

#[test]
fn flushed_and_fua_writes_survive_sigkill() {
    let dir = scratch("crash");
    let path = dir.path().join("disk.img");
    let args = ["--shards", "2", "--cache-bytes", "64M"];
    let server = Server::start(&path, &[&["--size", "32M"][..], &args].concat());
    let mut nbd = Nbd::connect(server.port);
    // Pipelined unaligned writes over 8 MiB, then FLUSH.
    let data = random_bytes(3, 8 << 20);
    let mut at = 0usize;
    let mut cookie = 0u64;
    let mut step = 777usize;
    while at < data.len() {
        let n = step.min(data.len() - at);
        nbd.send(CMD_WRITE, 0, cookie, 1000 + at as u64, n as u32, &data[at..at + n]);
        cookie += 1;
        at += n;
        step = step * 7 % 300_007 + 1;
    }
    for _ in 0..cookie {
        assert_eq!(nbd.reply().expect("write reply").0, 0);
    }
    assert_eq!(nbd.command(CMD_FLUSH, 0, 0, 0), 0);
    // One FUA write after the flush.
    let fua = random_bytes(4, 100_000);
    assert_eq!(nbd.write(20 << 20, &fua, FLAG_FUA), 0);
    // Writes never flushed: the crash may keep or lose them, but they must not disturb the
    // flushed bytes.
    for i in 0..64u64 {
        nbd.send(CMD_WRITE, 0, 1_000 + i, (24 << 20) + i * 5000, 4096, &[0xee; 4096]);
    }
    let port = server.port;
    server.kill9();

    let file = std::fs::read(&path).expect("read the data file");
    assert_eq!(&file[1000..1000 + data.len()], &data[..], "flushed bytes lost");
    assert_eq!(&file[20 << 20..(20 << 20) + fua.len()], &fua[..], "FUA bytes lost");
    // On the same port at once: the killed server's listening sockets may still be there for
    // a few milliseconds, accepting but never greeting; the start-up check waits them out.
    let server = Server::try_start_on(&path, port, &args)
        .unwrap_or_else(|e| panic!("restart on port {port} after SIGKILL failed: {e}"));
    let mut nbd = Nbd::connect(server.port);
    assert_eq!(nbd.read(1000, data.len() as u32).as_deref(), Ok(&data[..]));
    server.stop();
}

/// The same through real clients: qemu-io writes and flushes, the server is killed, and
/// after a restart nbdcopy copies the export out and qemu-img compares it.
#[test]
fn a_qemu_io_flush_survives_sigkill_as_nbdcopy_and_qemu_img_see_it() {
    let test = "a_qemu_io_flush_survives_sigkill_as_nbdcopy_and_qemu_img_see_it";
    let (Some(qemu_io), Some(nbdcopy), Some(qemu_img)) =
        (tool("qemu-io", test), tool("nbdcopy", test), tool("qemu-img", test))
    else {
        return;
    };
    let dir = scratch("crash-qemu");
    let path = dir.path().join("disk.img");
    let args = ["--shards", "2", "--cache-bytes", "64M"];
    let server = Server::start(&path, &[&["--size", "16M"][..], &args].concat());
    run(Command::new(&qemu_io)
        .args(["-f", "raw", "--cache", "writeback"])
        .arg(server.uri())
        .args(["-c", "write -P 0xab 0 8M", "-c", "write -P 0xcd 12345 100000", "-c", "flush"]));
    server.kill9();

    let mut expected = vec![0u8; 16 << 20];
    expected[..8 << 20].fill(0xab);
    expected[12_345..112_345].fill(0xcd);
    let server = Server::start(&path, &args);
    let copy = dir.path().join("copy.raw");
    run(Command::new(&nbdcopy).arg(server.uri()).arg(&copy));
    assert!(std::fs::read(&copy).expect("the copy") == expected, "flushed bytes lost");
    let want = dir.path().join("want.raw");
    std::fs::write(&want, &expected).expect("write the expected image");
    run(Command::new(&qemu_img)
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&want)
        .arg(server.uri()));
    server.stop();
}

/// The export is multi-conn: a FLUSH on one connection covers the writes replied to on every
/// other connection, whichever shard each landed on. Flushes with no write in between (which
/// share a barrier) still cover the FUA write that follows them.
#[test]
fn a_flush_on_one_connection_covers_writes_on_the_others() {
    let dir = scratch("crash-multi");
    let path = dir.path().join("disk.img");
    let args = ["--shards", "2", "--cache-bytes", "64M"];
    let server = Server::start(&path, &[&["--size", "32M"][..], &args].concat());
    let mut conns: Vec<Nbd> = (0..6).map(|_| Nbd::connect(server.port)).collect();
    let mut expected = Vec::new();
    for round in 0..3u64 {
        for (c, conn) in conns.iter_mut().enumerate() {
            let offset = (c as u64 * 5 + round) << 20;
            let data = random_bytes(round * 10 + c as u64, 300_000);
            assert_eq!(conn.write(offset + 17, &data, 0), 0);
            expected.push((offset + 17, data));
        }
        let flusher = round as usize % conns.len();
        assert_eq!(conns[flusher].command(CMD_FLUSH, 0, 0, 0), 0);
        assert_eq!(conns[(flusher + 1) % 6].command(CMD_FLUSH, 0, 0, 0), 0);
    }
    let fua = random_bytes(99, 5000);
    assert_eq!(conns[3].write(31 << 20, &fua, FLAG_FUA), 0);
    expected.push((31 << 20, fua));
    server.kill9();
    let file = std::fs::read(&path).expect("read the data file");
    for (offset, data) in &expected {
        let at = *offset as usize;
        assert!(file[at..at + data.len()] == data[..], "bytes at {offset} lost");
    }
}
