//! Real NBD clients against the server: fio's nbd engine with crc32c verification, qemu-img
//! copying a 256 MiB random image in and out and comparing, nbdinfo reading the size and
//! flags. Each test prints why it is skipped when its client is not installed
//! (`scripts/install-clients.sh` installs them all).

mod common;

use std::process::Command;

use common::*;

/// fio with the nbd engine and crc32c verification: every block read back must carry the
/// checksum fio wrote into it.
fn fio_verify(server: &Server, fio: &std::path::Path, rw: &str, extra: &[&str]) {
    let out = run(Command::new(fio)
        .args(["--name=verify", "--ioengine=nbd", "--bs=4k", "--iodepth=32"])
        .arg(format!("--uri={}", server.uri()))
        .arg(format!("--rw={rw}"))
        .args(["--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_backlog=4096"])
        .arg("--verify_state_save=0")
        .args(["--group_reporting", "--output-format=terse", "--terse-version=3"])
        .args(extra));
    // Terse v3: field 5 is the error code of the group.
    let line = out.lines().find(|l| l.starts_with("3;")).expect("fio's terse line");
    assert_eq!(line.split(';').nth(4), Some("0"), "fio reported an error:\n{out}");
}

#[test]
fn fio_randwrite_and_randrw_verify_with_crc32c() {
    let Some(fio) = tool("fio", "fio_randwrite_and_randrw_verify_with_crc32c") else { return };
    let dir = scratch("fio");
    // A cache smaller than the data, so verification also reads blocks written back and
    // evicted, not only cached ones.
    let server = Server::start(
        &dir.path().join("disk.img"),
        &["--size", "48M", "--shards", "2", "--cache-bytes", "8M"],
    );
    fio_verify(&server, &fio, "randwrite", &["--size=32M"]);
    fio_verify(&server, &fio, "randrw", &["--size=32M", "--rwmixread=50"]);
    // Two jobs at once: two connections, spread over the shards, on disjoint halves, with
    // unaligned 3 KiB blocks (read-modify-write of shared 4 KiB blocks).
    fio_verify(
        &server,
        &fio,
        "randwrite",
        &["--size=24M", "--numjobs=2", "--offset_increment=24M", "--bs=3k"],
    );
    server.stop();
}

#[test]
fn qemu_img_convert_round_trips_a_256m_random_image() {
    let test = "qemu_img_convert_round_trips_a_256m_random_image";
    let Some(qemu_img) = tool("qemu-img", test) else { return };
    let dir = scratch("qemu");
    let image = dir.path().join("random.raw");
    let out = dir.path().join("out.raw");
    let size: usize = 256 << 20;
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&image).expect("create the image");
        for chunk in 0..size / (4 << 20) {
            f.write_all(&random_bytes(chunk as u64 + 1, 4 << 20)).expect("write the image");
        }
    }
    let server = Server::start(
        &dir.path().join("disk.img"),
        &["--size", "256M", "--shards", "2", "--cache-bytes", "32M"],
    );
    let uri = server.uri();
    run(Command::new(&qemu_img)
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&image)
        .arg(&uri));
    run(Command::new(&qemu_img).args(["compare", "-f", "raw", "-F", "raw"]).arg(&image).arg(&uri));
    run(Command::new(&qemu_img).args(["convert", "-f", "raw", "-O", "raw"]).arg(&uri).arg(&out));
    let same = run(Command::new(&qemu_img)
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&image)
        .arg(&out));
    assert!(same.contains("Images are identical"), "{same}");
    server.stop();
    // The clean stop wrote everything back: the data file itself is the image.
    assert_eq!(
        std::fs::read(dir.path().join("disk.img")).expect("data file"),
        std::fs::read(&image).expect("image")
    );
}

#[test]
fn nbdinfo_shows_the_size_and_flags() {
    let Some(nbdinfo) = tool("nbdinfo", "nbdinfo_shows_the_size_and_flags") else { return };
    let dir = scratch("nbdinfo");
    let path = dir.path().join("disk.img");
    let server = Server::start(&path, &["--size", "24M", "--shards", "2", "--cache-bytes", "2M"]);
    let info = run(Command::new(&nbdinfo).arg(server.uri()));
    for line in [
        "export-size: 25165824",
        "is_read_only: false",
        "can_flush: true",
        "can_fua: true",
        "can_multi_conn: true",
        "can_trim: true",
        "can_zero: true",
        "block_size_minimum: 1",
        "block_size_preferred: 4096",
    ] {
        assert!(info.contains(line), "no {line:?} in nbdinfo's output:\n{info}");
    }
    let list =
        run(Command::new(&nbdinfo).arg("--list").arg(format!("nbd://127.0.0.1:{}", server.port)));
    assert!(list.contains("export=\"corebuf\""), "{list}");
    server.stop();

    let server = Server::start(&path, &["--read-only", "--shards", "1", "--cache-bytes", "1M"]);
    let info = run(Command::new(&nbdinfo).arg(server.uri()));
    assert!(info.contains("is_read_only: true"), "{info}");
    assert!(info.contains("can_trim: false"), "{info}");
    server.stop();
}
