//! Serving on a Unix-domain socket (`--unix PATH`): connections spread over the shards and
//! see one disk, a stalled or trickling handshake is dropped, the socket file is checked
//! before it is replaced and removed at stop (only if it is still the server's own), and
//! libnbd's and fio's `nbd+unix://` URIs work.

mod common;

use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// A server on `disk.img` and `nbd.sock` in a new scratch directory, with `args`.
fn unix_server(name: &str, args: &[&str]) -> (tempfile::TempDir, std::path::PathBuf, Server) {
    let dir = scratch(name);
    let socket = dir.path().join("nbd.sock");
    let server = Server::start_unix(&dir.path().join("disk.img"), &socket, args);
    (dir, socket, server)
}

fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// Four connections on two shards with two connection slots each (shard 0 accepts and hands
/// every second connection to shard 1; were they all kept on shard 0, the third would be
/// refused): each is served, a write flushed on one is read on all the others, and a stop
/// with all four open ends them and removes the socket file.
#[test]
fn connections_on_a_unix_socket_are_spread_over_the_shards_and_share_the_disk() {
    let (_dir, socket, server) = unix_server(
        "unix-shards",
        &["--size", "16M", "--shards", "2", "--cache-bytes", "4M", "--max-connections", "4"],
    );
    let mut clients: Vec<_> = (0..4).map(|_| Nbd::connect_unix(&socket)).collect();
    for nbd in &clients {
        assert_eq!(nbd.size, 16 << 20);
    }
    // Writes that span blocks of both shards, from every connection.
    for (i, nbd) in clients.iter_mut().enumerate() {
        let data = random_bytes(i as u64 + 1, 3 * 4096 + 5);
        assert_eq!(nbd.write(i as u64 * (1 << 20) + 1000, &data, 0), 0);
    }
    assert_eq!(clients[3].command(CMD_FLUSH, 0, 0, 0), 0);
    for (reader, nbd) in clients.iter_mut().enumerate() {
        for i in 0..4u64 {
            let data = random_bytes(i + 1, 3 * 4096 + 5);
            let read = nbd.read(i * (1 << 20) + 1000, data.len() as u32);
            assert_eq!(read, Ok(data), "connection {reader} reads connection {i}'s write");
        }
    }
    let log = server.stop();
    assert!(!log.contains("connections already"), "a connection was refused:\n{log}");
    for nbd in &mut clients {
        assert!(nbd.is_closed(), "the stop ends every connection");
    }
    assert!(!socket.exists(), "a stop removes the socket file");
}

/// The handshake's time limit holds on a Unix socket too (glommio's Unix streams have no
/// timeouts of their own: the server's limit is a timer over the whole handshake), for a
/// client that stalls and for one that trickles a byte at a time.
#[test]
fn a_stalled_or_trickling_handshake_on_a_unix_socket_is_dropped() {
    use std::io::Write as _;
    let (_dir, socket, server) = unix_server(
        "unix-stall",
        &["--size", "4M", "--shards", "1", "--cache-bytes", "1M", "--handshake-timeout-secs", "1"],
    );
    let mut idle = Nbd::connect_unix(&socket);
    let mut stalled = Nbd::greet_unix(&socket);
    let started = Instant::now();
    assert!(is_closed(&mut stalled), "a stalled handshake is closed");
    assert!(started.elapsed() < Duration::from_secs(8));

    let mut trickling = Nbd::greet_unix(&socket);
    let started = Instant::now();
    let flags_and_option = [&3u32.to_be_bytes()[..], &IHAVEOPT.to_be_bytes()].concat();
    for byte in flags_and_option.iter().cycle() {
        if trickling.write_all(&[*byte]).is_err() || started.elapsed() > Duration::from_secs(6) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(is_closed(&mut trickling), "a trickling handshake is closed");
    assert!(started.elapsed() < Duration::from_secs(6), "closed by the 1 s limit");

    assert_eq!(idle.read(0, 512), Ok(vec![0u8; 512]), "an idle transmission stays open");
    drop(idle);
    server.stop();
}

/// What is at the socket's path decides whether the server starts: a regular file is never
/// replaced, a live server is never displaced, a stale socket (its server died) is.
#[test]
fn the_socket_path_is_checked_before_it_is_replaced() {
    let dir = scratch("unix-path");
    let (disk, other_disk) = (dir.path().join("disk.img"), dir.path().join("other.img"));
    let socket = dir.path().join("nbd.sock");
    let args = ["--size", "4M", "--shards", "1", "--cache-bytes", "1M"];

    std::fs::write(&socket, b"not a socket").expect("write a regular file");
    let refused = Server::try_start_unix(&disk, &socket, &args).err().expect("refused");
    assert!(refused.contains("is not a socket"), "{refused}");
    assert_eq!(std::fs::read(&socket).expect("the file"), b"not a socket", "left alone");
    assert!(!disk.exists(), "refused before the data file is created");
    std::fs::remove_file(&socket).expect("remove the file");

    // A socket whose listener is gone, as a killed server leaves it.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind a socket"));
    assert!(is_socket(&socket));
    let server = Server::start_unix(&disk, &socket, &args);
    let mut nbd = Nbd::connect_unix(&socket);
    assert_eq!(nbd.read(0, 4096), Ok(vec![0u8; 4096]));

    let second = Server::try_start_unix(&other_disk, &socket, &args).err().expect("refused");
    assert!(second.contains("another process is listening there"), "{second}");
    assert_eq!(nbd.read(4096, 4096), Ok(vec![0u8; 4096]), "the first server still serves");
    drop(nbd);
    server.stop();
    assert!(!socket.exists());

    // A server removes only its own socket file: here another listener took the path over
    // while the server ran, and the stop leaves that one alone.
    let server = Server::start_unix(&disk, &socket, &args);
    std::fs::remove_file(&socket).expect("unlink the server's socket");
    let other = std::os::unix::net::UnixListener::bind(&socket).expect("bind another socket");
    server.stop();
    assert!(is_socket(&socket), "another listener's socket stays");
    drop(other);
    std::fs::remove_file(&socket).expect("remove the other socket");

    // A SIGKILLed server leaves its socket behind; the next start replaces it.
    let server = Server::start_unix(&disk, &socket, &args);
    server.kill9();
    assert!(is_socket(&socket), "a killed server cannot remove its socket");
    let server = Server::start_unix(&disk, &socket, &args);
    assert_eq!(Nbd::connect_unix(&socket).size, 4 << 20);
    server.stop();
}

#[test]
fn unix_and_tcp_options_do_not_mix() {
    let dir = scratch("unix-args");
    let socket = dir.path().join("nbd.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_corebuf-nbd"))
        .arg("--path")
        .arg(dir.path().join("disk.img"))
        .args(["--size", "4M", "--port", "10999", "--unix"])
        .arg(&socket)
        .output()
        .expect("run corebuf-nbd");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot be used with"), "{err}");
    assert!(!socket.exists() && !dir.path().join("disk.img").exists());
}

/// libnbd's and fio's `nbd+unix://` URIs: nbdinfo sees the export, and fio's random
/// read-write with crc32c verification passes over two connections on two shards.
#[test]
fn nbdinfo_and_fio_work_over_the_unix_socket() {
    let test = "nbdinfo_and_fio_work_over_the_unix_socket";
    let (Some(nbdinfo), Some(fio)) = (tool("nbdinfo", test), tool("fio", test)) else { return };
    let (_dir, _, server) =
        unix_server("unix-clients", &["--size", "48M", "--shards", "2", "--cache-bytes", "8M"]);
    let info = run(Command::new(&nbdinfo).arg(server.uri()));
    assert!(info.contains("export-size: 50331648"), "{info}");
    assert!(info.contains("can_multi_conn: true"), "{info}");
    let out = run(Command::new(&fio)
        .args(["--name=verify", "--ioengine=nbd", "--bs=4k", "--iodepth=32", "--rw=randrw"])
        .arg(format!("--uri={}", server.uri()))
        .args(["--size=16M", "--numjobs=2", "--offset_increment=16M"])
        .args(["--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_backlog=4096"])
        .arg("--verify_state_save=0")
        .args(["--group_reporting", "--output-format=terse", "--terse-version=3"]));
    let line = out.lines().find(|l| l.starts_with("3;")).expect("fio's terse line");
    assert_eq!(line.split(';').nth(4), Some("0"), "fio reported an error:\n{out}");
    server.stop();
}
