//! The production device, `DmaDevice`, over real storage: a regular file on the target's file
//! system and, when the machine allows it, a loop block device. Data written through the queue
//! with `O_DIRECT` reads back through the queue and through the ordinary file API, discard
//! zeroes, and `O_DIRECT` is proven in effect from the kernel's own flags.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{block_of, config, device_file, image, pattern, run, version_of, BLOCK_BYTES};
use corebuf_shard::io::{Device, DmaDevice, IoQueue};
use corebuf_shard::IoOp;

/// The open-file flags the kernel reports for the descriptor this process has open on `path`
/// (from `/proc/self/fdinfo`), independently of what the device under test says.
fn kernel_open_flags(path: &Path) -> Option<i32> {
    let want = std::fs::canonicalize(path).ok()?;
    for entry in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        if std::fs::read_link(entry.path()).ok().as_deref() != Some(want.as_path()) {
            continue;
        }
        let fdinfo = Path::new("/proc/self/fdinfo").join(entry.file_name());
        let text = std::fs::read_to_string(fdinfo).ok()?;
        let flags = text.lines().find_map(|line| line.strip_prefix("flags:"))?;
        return i32::from_str_radix(flags.trim(), 8).ok();
    }
    None
}

#[test]
fn blocks_written_through_the_queue_read_back_through_the_queue_and_from_the_file() {
    const BLOCKS: u64 = 64;
    let (_dir, path) = device_file(&image(BLOCKS, 1));
    let written_blocks = [0, 5, 6, 31, 63]; // first, neighbours, middle, last
    let written_back_blocks = [10, 11, 12, 13, 40];
    let file_path = path.clone();
    run(async move {
        let device = DmaDevice::open(&file_path).await.expect("open the device file");
        assert!(device.direct_io_in_effect(), "the file must be open with O_DIRECT");
        let queue = IoQueue::new(device, config(8, 4)).expect("a valid queue");
        assert_eq!(queue.device_blocks(), BLOCKS);
        for block in written_blocks {
            let mut request = queue.request().await;
            common::fill(request.data_mut(), block, 2);
            queue.write(&request, block).await.expect("write");
        }
        for block in written_back_blocks {
            let mut request = queue.request().await;
            common::fill(request.data_mut(), block, 2);
            queue.write_back(request, block).await.expect("submit a write-back");
        }
        queue.sync().await.expect("no write-back failed");
        queue.flush().await.expect("flush");
        let mut request = queue.request().await;
        for block in 0..BLOCKS {
            request.data_mut().fill(0xEE); // a stale buffer must not pass for read data
            queue.read(&mut request, block).await.expect("read");
            let expected =
                if written_blocks.contains(&block) || written_back_blocks.contains(&block) {
                    2
                } else {
                    1
                };
            assert_eq!(version_of(request.data(), block), Some(expected), "block {block}");
        }
    });
    let bytes = std::fs::read(&path).expect("read the file after the executor exits");
    assert_eq!(bytes.len() as u64, BLOCKS * BLOCK_BYTES as u64, "the file keeps its size");
    for block in 0..BLOCKS {
        let expected = if written_blocks.contains(&block) || written_back_blocks.contains(&block) {
            2
        } else {
            1
        };
        assert_eq!(version_of(block_of(&bytes, block), block), Some(expected), "block {block}");
    }
}

#[test]
fn a_regular_file_is_open_with_o_direct_and_reports_its_geometry() {
    let (_dir, path) = device_file(&image(16, 1));
    run(async move {
        let device = DmaDevice::open(&path).await.expect("open the device file");
        assert!(device.direct_io_in_effect());
        assert!(!device.is_block_device());
        assert_eq!(device.size_bytes(), 16 * BLOCK_BYTES as u64);
        let alignment = device.alignment_bytes();
        assert!(alignment >= 512 && alignment.is_power_of_two(), "alignment {alignment}");
        assert_eq!(device.path(), path.as_path());
        let flags = kernel_open_flags(&path).expect("the device's descriptor is in /proc/self/fd");
        assert_ne!(flags & libc::O_DIRECT, 0, "kernel flags {flags:o} lack O_DIRECT");
        assert_eq!(flags & libc::O_ACCMODE, libc::O_RDWR, "kernel flags {flags:o}: not read-write");
    });
}

#[test]
fn discard_zeroes_exactly_the_discarded_blocks() {
    const BLOCKS: u64 = 16;
    let (_dir, path) = device_file(&image(BLOCKS, 1));
    let discarded = 4..7;
    let file_path = path.clone();
    let range = discarded.clone();
    run(async move {
        let device = DmaDevice::open(&file_path).await.expect("open the device file");
        let queue = IoQueue::new(device, config(4, 2)).expect("a valid queue");
        queue.discard(range.start, range.end - range.start).await.expect("discard");
        let mut request = queue.request().await;
        for block in 0..BLOCKS {
            request.data_mut().fill(0xEE);
            queue.read(&mut request, block).await.expect("read");
            if range.contains(&block) {
                assert!(request.data().iter().all(|&b| b == 0), "block {block} not zeroed");
            } else {
                assert_eq!(version_of(request.data(), block), Some(1), "block {block}");
            }
        }
    });
    let bytes = std::fs::read(&path).expect("read the file after the executor exits");
    assert_eq!(bytes.len() as u64, BLOCKS * BLOCK_BYTES as u64, "discard keeps the file's size");
    for block in 0..BLOCKS {
        if discarded.contains(&block) {
            assert!(block_of(&bytes, block).iter().all(|&b| b == 0), "block {block} not zeroed");
        } else {
            assert_eq!(version_of(block_of(&bytes, block), block), Some(1), "block {block}");
        }
    }
}

#[test]
fn two_shards_each_with_its_own_device_on_one_file_write_disjoint_blocks() {
    const BLOCKS: u64 = 32;
    const SHARDS: u64 = 2;
    let (_dir, path) = device_file(&image(BLOCKS, 1));
    let shards: Vec<_> = (0..SHARDS)
        .map(|shard| {
            let path = path.clone();
            std::thread::spawn(move || {
                run(async move {
                    let device = DmaDevice::open(&path).await.expect("open the device file");
                    let queue = IoQueue::new(device, config(4, 2)).expect("a valid queue");
                    for block in (shard..BLOCKS).step_by(SHARDS as usize) {
                        let mut request = queue.request().await;
                        common::fill(request.data_mut(), block, 2 + shard);
                        queue.write_back(request, block).await.expect("submit a write-back");
                    }
                    queue.sync().await.expect("no write-back failed");
                    queue.flush().await.expect("flush");
                })
            })
        })
        .collect();
    for shard in shards {
        shard.join().expect("a shard thread panicked");
    }
    let bytes = std::fs::read(&path).expect("read the file");
    for block in 0..BLOCKS {
        let expected = 2 + block % SHARDS;
        assert_eq!(version_of(block_of(&bytes, block), block), Some(expected), "block {block}");
    }
}

/// A loop device attached for one test and always detached again, even when the test fails.
struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    /// Attaches `backing` to a free loop device, or says why this machine does not allow it.
    fn attach(backing: &Path) -> Result<Self, String> {
        // SAFETY: geteuid takes no arguments, touches no memory and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root".into());
        }
        let output = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(backing)
            .output()
            .map_err(|e| format!("cannot run losetup: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "`losetup -f --show` failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        let path = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if path.is_empty() {
            return Err("`losetup -f --show` printed no device".into());
        }
        Ok(LoopDevice { path: PathBuf::from(path) })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        match Command::new("losetup").arg("-d").arg(&self.path).status() {
            Ok(status) if status.success() => {}
            Ok(status) => eprintln!("losetup -d {} failed: {status}", self.path.display()),
            Err(e) => eprintln!("cannot run losetup -d {}: {e}", self.path.display()),
        }
    }
}

#[test]
fn a_loop_block_device_is_open_with_o_direct_and_round_trips_blocks() {
    const BLOCKS: u64 = 2048; // 8 MiB
    let (_dir, backing) = device_file(&image(BLOCKS, 1));
    let loop_device = match LoopDevice::attach(&backing) {
        Ok(loop_device) => loop_device,
        Err(reason) => {
            eprintln!("skipping the loop-device test: {reason}");
            return;
        }
    };
    let device_path = loop_device.path.clone();
    let discard_supported = run(async move {
        let device = DmaDevice::open(&device_path).await.expect("open the loop device");
        assert!(device.is_block_device());
        // glommio opens block devices without O_DIRECT; the seam must have set it.
        assert!(device.direct_io_in_effect());
        let flags = kernel_open_flags(&device_path).expect("the device's descriptor is open");
        assert_ne!(flags & libc::O_DIRECT, 0, "kernel flags {flags:o} lack O_DIRECT");
        assert_eq!(device.size_bytes(), BLOCKS * BLOCK_BYTES as u64);
        let name = device_path.file_name().expect("a device name").to_string_lossy().into_owned();
        let sysfs = format!("/sys/block/{name}/queue/logical_block_size");
        if let Ok(text) = std::fs::read_to_string(&sysfs) {
            let logical: u64 = text.trim().parse().expect("a number in sysfs");
            assert_eq!(device.alignment_bytes(), logical, "alignment vs {sysfs}");
        }

        let queue = IoQueue::new(device, config(4, 2)).expect("a valid queue");
        let mut request = queue.request().await;
        common::fill(request.data_mut(), 3, 2);
        queue.write(&request, 3).await.expect("write");
        common::fill(request.data_mut(), 4, 2);
        queue.write_back(request, 4).await.expect("submit a write-back");
        queue.sync().await.expect("no write-back failed");
        queue.flush().await.expect("flush");
        let mut request = queue.request().await;
        for (block, version) in [(2, 1), (3, 2), (4, 2), (5, 1)] {
            request.data_mut().fill(0xEE);
            queue.read(&mut request, block).await.expect("read");
            assert_eq!(version_of(request.data(), block), Some(version), "block {block}");
        }

        match queue.discard(6, 2).await {
            Ok(()) => {
                for block in 6..8 {
                    queue.read(&mut request, block).await.expect("read");
                    assert!(request.data().iter().all(|&b| b == 0), "block {block} not zeroed");
                }
                true
            }
            Err(e @ corebuf_shard::Error::Io { op: IoOp::Discard, .. }) => {
                eprintln!("the loop device does not discard here, not checked: {e}");
                false
            }
            Err(e) => panic!("discard failed unexpectedly: {e}"),
        }
    });
    drop(loop_device);
    let bytes = std::fs::read(&backing).expect("read the backing file");
    assert_eq!(version_of(block_of(&bytes, 3), 3), Some(2), "write reached the backing file");
    assert_eq!(version_of(block_of(&bytes, 4), 4), Some(2), "write-back reached the backing file");
    assert_eq!(block_of(&bytes, 5), pattern(5, 1, BLOCK_BYTES).as_slice());
    if discard_supported {
        assert!(bytes[6 * BLOCK_BYTES..8 * BLOCK_BYTES].iter().all(|&b| b == 0));
    }
}
