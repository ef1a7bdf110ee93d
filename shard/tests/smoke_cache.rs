//! Quick proof the partition works: read, modify, write_dirty, evict, re-read.

use corebuf_shard::cache::{CacheConfig, Hooks, Partition};
use corebuf_shard::io::{Device, IoQueue, QueueConfig, SimDevice, SimOptions};

#[test]
fn write_evict_and_read_back() {
    glommio::LocalExecutor::default().run(async {
        let device = SimDevice::new(SimOptions::new(256 * 4096));
        let probe = device.clone();
        let queue = IoQueue::new(device, QueueConfig::default()).unwrap();
        let config = CacheConfig { cache_size_bytes: 32 * 4096, ..CacheConfig::default() };
        let part: Partition<SimDevice> = Partition::new(queue, config, Hooks::default()).unwrap();
        let s = part.session().await;
        for b in 0..200u64 {
            let buf = s.new_block(b).await.unwrap();
            buf.data_mut()[..8].copy_from_slice(&b.to_le_bytes());
            buf.mark_dirty();
        }
        part.write_dirty().await.unwrap();
        let durable = probe.durable_image();
        for b in 0..200u64 {
            let at = b as usize * 4096;
            assert_eq!(&durable[at..at + 8], &b.to_le_bytes());
        }
        for b in (0..200u64).rev() {
            let buf = s.read(b).await.unwrap();
            assert_eq!(&buf.data()[..8], &b.to_le_bytes());
        }
        let stats = part.stats();
        assert!(stats.evictions > 0 && stats.misses > 0, "{stats:?}");
        assert_eq!(probe.size_bytes(), 256 * 4096);
    });
}

#[test]
fn metadata_per_buffer_is_reported_and_at_most_64_bytes() {
    glommio::LocalExecutor::default().run(async {
        let device = SimDevice::new(SimOptions::new(4096 * 4096));
        let queue = IoQueue::new(device, QueueConfig::default()).unwrap();
        let config = CacheConfig { cache_size_bytes: 1024 * 4096, ..CacheConfig::default() };
        let part: Partition<SimDevice> = Partition::new(queue, config, Hooks::default()).unwrap();
        let meta = part.metadata_bytes_per_frame();
        let ghost = part.ghost_bytes_per_frame();
        println!("metadata per buffer: {meta} bytes, ghost history: {ghost} bytes");
        // DESIGN.md §6: at most 64 bytes per buffer, the block index included (dm-bufio's
        // struct dm_buffer alone is over 100 bytes).
        assert!(meta <= 64, "{meta} bytes of metadata per buffer");
        assert!(ghost > 0);
        // The index has two slots per frame for any frame count, not only powers of two.
        let device = SimDevice::new(SimOptions::new(4096 * 4096));
        let queue = IoQueue::new(device, QueueConfig::default()).unwrap();
        let config = CacheConfig { cache_size_bytes: 1500 * 4096, ..CacheConfig::default() };
        let part: Partition<SimDevice> = Partition::new(queue, config, Hooks::default()).unwrap();
        assert_eq!(part.metadata_bytes_per_frame(), meta, "1500 frames cost as much as 1024");
    });
}
