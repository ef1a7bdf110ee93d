//! Bad input to the I/O layer: every mistake a user can make when opening a device, sizing a
//! queue or addressing blocks comes back as a typed error whose message names what is wrong,
//! before any I/O is done.

mod common;

use std::io::ErrorKind;

use common::{config, device_file, image, run, sim_device, BLOCK_BYTES};
use corebuf_shard::io::{Device, DmaDevice, IoBuf, IoQueue, QueueConfig, SimDevice, SimOptions};
use corebuf_shard::{Error, IoOp};

#[test]
fn opening_a_missing_path_is_an_open_error_that_names_the_path() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("create a temp dir");
    let missing = dir.path().join("no-such-device");
    let error = run(DmaDevice::open(&missing)).expect_err("a missing path cannot be opened");
    match &error {
        Error::Io { op: IoOp::Open, path, block: None, .. } => assert_eq!(path, &missing),
        other => panic!("expected an open error, got {other:?}"),
    }
    assert_eq!(error.io_kind(), Some(ErrorKind::NotFound));
    let message = error.to_string();
    assert!(message.contains(&*missing.to_string_lossy()), "{message}");
    assert!(message.starts_with("open"), "{message}");
}

#[test]
fn opening_a_directory_is_rejected_as_not_a_file_or_device() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("create a temp dir");
    let error = run(DmaDevice::open(dir.path())).expect_err("a directory is not a device");
    match &error {
        Error::NotAFileOrDevice { path, kind } => {
            assert_eq!(path, dir.path());
            assert_eq!(*kind, "directory");
        }
        other => panic!("expected NotAFileOrDevice, got {other:?}"),
    }
    let message = error.to_string();
    assert!(message.contains(&*dir.path().to_string_lossy()), "{message}");
    assert!(message.contains("directory"), "{message}");
}

#[test]
fn opening_a_character_device_is_rejected_as_a_special_file() {
    let error = run(DmaDevice::open("/dev/null")).expect_err("/dev/null is not a block device");
    match &error {
        Error::NotAFileOrDevice { path, kind } => {
            assert_eq!(path.as_os_str(), "/dev/null");
            assert_eq!(*kind, "special file");
        }
        other => panic!("expected NotAFileOrDevice, got {other:?}"),
    }
    let message = error.to_string();
    assert!(message.contains("/dev/null") && message.contains("special file"), "{message}");
}

#[test]
fn a_file_whose_size_is_not_a_multiple_of_the_block_size_is_rejected_by_the_queue() {
    // Ten blocks and one 512-byte sector: aligned for O_DIRECT, so only the size is wrong.
    let mut contents = image(10, 1);
    contents.extend_from_slice(&[7u8; 512]);
    let (_dir, path) = device_file(&contents);
    let file_path = path.clone();
    let error = run(async move {
        let device = DmaDevice::open(&file_path).await.expect("the file itself is fine");
        IoQueue::new(device, config(4, 2)).expect_err("the size is not whole blocks")
    });
    match &error {
        Error::InvalidConfig { setting, .. } => assert_eq!(*setting, "device size"),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    let message = error.to_string();
    assert!(message.contains(&*path.to_string_lossy()), "{message}");
    assert!(message.contains(&(10 * BLOCK_BYTES + 512).to_string()), "{message}");
    assert!(message.contains(&BLOCK_BYTES.to_string()), "{message}");
}

#[test]
fn an_empty_file_is_rejected_by_the_queue() {
    let (_dir, path) = device_file(&[]);
    let error = run(async move {
        let device = DmaDevice::open(&path).await.expect("an empty file opens");
        IoQueue::new(device, config(4, 2)).expect_err("an empty device holds no block")
    });
    match &error {
        Error::InvalidConfig { setting, .. } => assert_eq!(*setting, "device size"),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    assert!(error.to_string().contains("0 bytes"), "{error}");
}

#[test]
fn a_block_size_that_is_not_a_multiple_of_the_logical_block_size_is_rejected() {
    // 2048 is a power of two and divides the device size: only the 4096-byte sectors object.
    let mut options = SimOptions::new(1 << 20);
    options.alignment_bytes = 4096;
    let device = SimDevice::new(options);
    let queue_config = QueueConfig { block_size_bytes: 2048, ..QueueConfig::default() };
    let error = IoQueue::new(device, queue_config).expect_err("2048 < 4096-byte sectors");
    match &error {
        Error::InvalidConfig { setting, .. } => assert_eq!(*setting, "block_size_bytes"),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    let message = error.to_string();
    assert!(message.contains("2048") && message.contains("4096"), "{message}");
    assert!(message.contains("logical block size"), "{message}");
}

#[test]
fn a_block_size_below_the_files_logical_block_size_is_rejected() {
    let (_dir, path) = device_file(&image(4, 1));
    let error = run(async move {
        let device = DmaDevice::open(&path).await.expect("open the device file");
        let half = device.alignment_bytes() as usize / 2; // a power of two below the sector
        let queue_config = QueueConfig { block_size_bytes: half, ..QueueConfig::default() };
        IoQueue::new(device, queue_config).expect_err("a block smaller than a sector")
    });
    match &error {
        Error::InvalidConfig { setting, .. } => assert_eq!(*setting, "block_size_bytes"),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    assert!(error.to_string().contains("logical block size"), "{error}");
}

#[test]
fn a_block_size_that_is_not_a_power_of_two_is_rejected() {
    // 3072 is a multiple of the 512-byte sector and divides the device size: only the power of
    // two is missing.
    for block_size_bytes in [3072, 0] {
        let device = SimDevice::new(SimOptions::new(3072 * 100));
        let queue_config = QueueConfig { block_size_bytes, ..QueueConfig::default() };
        let error = IoQueue::new(device, queue_config).expect_err("not a power of two");
        match &error {
            Error::InvalidConfig { setting, .. } => assert_eq!(*setting, "block_size_bytes"),
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
        let message = error.to_string();
        assert!(
            message.contains(&format!("{block_size_bytes} is not a power of two")),
            "{message}"
        );
    }
}

#[test]
fn zero_writebacks_in_flight_max_is_rejected() {
    let error = IoQueue::new(sim_device(16, 0, 0), config(4, 0)).expect_err("no write-back slot");
    match &error {
        Error::InvalidConfig { setting, .. } => assert_eq!(*setting, "writebacks_in_flight_max"),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    assert!(error.to_string().contains("writebacks_in_flight_max"), "{error}");
}

#[test]
fn zero_io_depth_max_is_rejected() {
    let error = IoQueue::new(sim_device(16, 0, 0), config(0, 4)).expect_err("no request depth");
    match &error {
        Error::InvalidConfig { setting, .. } => assert_eq!(*setting, "io_depth_max"),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    assert!(error.to_string().contains("io_depth_max"), "{error}");
}

/// Checks that `result` is `Error::Unaligned` with these fields and a message that says so.
fn assert_unaligned(result: corebuf_shard::Result<()>, offset: u64, len: u64, alignment: u64) {
    let error = result.expect_err("an unaligned range must be refused");
    match &error {
        Error::Unaligned { offset: o, len: l, alignment: a } => {
            assert_eq!((*o, *l, *a), (offset, len, alignment), "{error}");
        }
        other => panic!("expected Unaligned, got {other:?}"),
    }
    let message = error.to_string();
    assert!(
        message.contains("not aligned") && message.contains(&alignment.to_string()),
        "{message}"
    );
}

/// Calls every `Device` operation with an unaligned offset, then an unaligned length, then an
/// empty length, on `device` (whose alignment must be above 100 bytes).
async fn check_unaligned_calls_are_refused<D: Device>(device: &D) {
    let alignment = device.alignment_bytes();
    let sector = alignment as usize;
    let mut buf = device.alloc_buf(sector);
    assert_unaligned(device.read_at(100, buf.as_bytes_mut()).await, 100, alignment, alignment);
    assert_unaligned(
        device.write_at(alignment + 1, &buf).await,
        alignment + 1,
        alignment,
        alignment,
    );
    assert_unaligned(device.discard(100, alignment).await, 100, alignment, alignment);
    let mut short = device.alloc_buf(sector - 100);
    let short_len = short.as_bytes().len() as u64;
    assert_unaligned(device.read_at(0, short.as_bytes_mut()).await, 0, short_len, alignment);
    assert_unaligned(device.write_at(0, &short).await, 0, short_len, alignment);
    assert_unaligned(device.discard(0, alignment + 100).await, 0, alignment + 100, alignment);
    assert_unaligned(device.discard(0, 0).await, 0, 0, alignment);
    let mut empty = device.alloc_buf(0);
    assert_unaligned(device.read_at(0, empty.as_bytes_mut()).await, 0, 0, alignment);
}

#[test]
fn unaligned_offsets_and_lengths_are_refused_by_the_sim_device() {
    let device = sim_device(16, 0, 0);
    run(check_unaligned_calls_are_refused(&device));
    let counters = device.counters();
    assert_eq!((counters.reads, counters.writes, counters.discards), (0, 0, 0), "no I/O was done");
    assert!(device.live_image().iter().all(|&b| b == 0), "the device is untouched");
}

#[test]
fn unaligned_offsets_and_lengths_are_refused_by_the_dma_device() {
    let contents = image(16, 1);
    let (_dir, path) = device_file(&contents);
    let file_path = path.clone();
    run(async move {
        let device = DmaDevice::open(&file_path).await.expect("open the device file");
        check_unaligned_calls_are_refused(&device).await;
    });
    assert!(std::fs::read(&path).expect("read the file") == contents, "the file is untouched");
}

/// Checks that `result` is `Error::BlockOutOfRange` with these fields and a message that names
/// both.
fn assert_out_of_range<T>(result: corebuf_shard::Result<T>, block: u64, device_blocks: u64) {
    let Err(error) = result else { panic!("block {block} of {device_blocks} must be refused") };
    match &error {
        Error::BlockOutOfRange { block: b, device_blocks: d } => {
            assert_eq!((*b, *d), (block, device_blocks), "{error}");
        }
        other => panic!("expected BlockOutOfRange, got {other:?}"),
    }
    let message = error.to_string();
    assert!(message.contains(&format!("block {block} ")), "{message}");
    assert!(message.contains(&format!("({device_blocks} blocks)")), "{message}");
}

#[test]
fn ranges_past_the_end_are_refused_by_the_devices() {
    let sim = sim_device(16, 0, 0);
    let contents = image(16, 1);
    let (_dir, path) = device_file(&contents);
    let file_path = path.clone();
    run(async move {
        let dma = DmaDevice::open(&file_path).await.expect("open the device file");
        let end = sim.size_bytes();
        assert_eq!(dma.size_bytes(), end, "both devices are 16 blocks");
        let mut buf = sim.alloc_buf(1024);
        let sectors = end / 512;
        // A range that starts inside and ends outside names its last sector.
        assert_out_of_range(sim.read_at(end - 512, buf.as_bytes_mut()).await, sectors, sectors);
        assert_out_of_range(sim.write_at(end, &buf).await, sectors + 1, sectors);
        assert_out_of_range(sim.discard(end, 512).await, sectors, sectors);
        assert_eq!(sim.counters(), Default::default(), "no I/O reached the sim device");

        let alignment = dma.alignment_bytes();
        let sectors = end / alignment;
        let mut buf = dma.alloc_buf(alignment as usize);
        assert_out_of_range(dma.read_at(end, buf.as_bytes_mut()).await, sectors, sectors);
        assert_out_of_range(dma.write_at(end, &buf).await, sectors, sectors);
        assert_out_of_range(dma.discard(end - alignment, 2 * alignment).await, sectors, sectors);
    });
    assert!(std::fs::read(&path).expect("read the file") == contents, "the file is untouched");
}

#[test]
fn blocks_beyond_the_device_are_refused_by_every_queue_operation() {
    const BLOCKS: u64 = 16;
    let device = sim_device(BLOCKS, 0, 0);
    let queue = IoQueue::new(device.clone(), config(2, 1)).expect("a valid queue");
    run(async {
        let mut request = queue.request().await;
        assert_out_of_range(queue.read(&mut request, BLOCKS).await, BLOCKS, BLOCKS);
        assert_out_of_range(queue.write(&request, BLOCKS).await, BLOCKS, BLOCKS);
        assert_out_of_range(queue.write(&request, u64::MAX).await, u64::MAX, BLOCKS);
        assert_out_of_range(queue.write_back(request, BLOCKS + 7).await, BLOCKS + 7, BLOCKS);
        // A discard that starts inside and runs past the end names its last block.
        assert_out_of_range(queue.discard(BLOCKS - 1, 2).await, BLOCKS, BLOCKS);
        assert_out_of_range(queue.discard(BLOCKS, 1).await, BLOCKS, BLOCKS);
        assert_out_of_range(queue.discard(3, u64::MAX).await, u64::MAX, BLOCKS);

        // Nothing was submitted, and the refused write-back gave its buffer back: all three
        // buffers (io_depth_max + writebacks_in_flight_max) can still be taken at once.
        queue.sync().await.expect("nothing failed in flight");
        let mut taken = Vec::new();
        for _ in 0..3 {
            let request = futures_lite::future::poll_once(queue.request()).await;
            taken.push(request.expect("a free buffer, without waiting"));
        }
        let stats = queue.stats();
        assert_eq!((stats.in_flight, stats.errors), (0, 0), "{stats:?}");
    });
    assert_eq!(device.counters(), Default::default(), "no I/O reached the device");
}

#[test]
fn a_tmpfs_file_is_refused_with_no_direct_io_or_opened_with_o_direct_in_effect() {
    let dir = match tempfile::tempdir_in("/dev/shm") {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("skipping: cannot create a directory on tmpfs /dev/shm: {e}");
            return;
        }
    };
    let path = dir.path().join("device");
    std::fs::write(&path, image(16, 1)).expect("write the tmpfs file");
    let file_path = path.clone();
    run(async move {
        match DmaDevice::open(&file_path).await {
            Err(error @ Error::NoDirectIo { .. }) => {
                let Error::NoDirectIo { path } = &error else { unreachable!() };
                assert_eq!(path, &file_path);
                let message = error.to_string();
                assert!(message.contains("O_DIRECT"), "{message}");
                assert!(message.contains(&*file_path.to_string_lossy()), "{message}");
            }
            Ok(device) => {
                // Since Linux 6.6 tmpfs accepts O_DIRECT. Then the promise to check is the
                // other half: the device never runs without it.
                assert!(device.direct_io_in_effect(), "opened without O_DIRECT in effect");
                eprintln!(
                    "tmpfs accepts O_DIRECT on this kernel, so NoDirectIo could not be \
                     exercised; checked that O_DIRECT is in effect on {} instead",
                    file_path.display()
                );
            }
            Err(other) => panic!("expected NoDirectIo or an O_DIRECT device, got {other}"),
        }
    });
}
