//! An engine whose shards all run on the current glommio executor: the same [`Shard`], router,
//! messages and barrier as [`Engine`](crate::Engine), over any [`Device`]. This is what the
//! deterministic simulation drives (every shard on one thread, a simulated device underneath,
//! so a seed replays exactly); it also suits an application that wants several partitions on
//! one core.

use std::rc::Rc;
use std::sync::Arc;

use corebuf_shard::io::Device;
use glommio::task::JoinHandle;

use crate::builder::EngineBuilder;
use crate::client::Client;
use crate::mesh::Mesh;
use crate::router::Router;
use crate::shard::Shard;
use crate::{Error, Result};

/// Every shard of an engine, hosted as tasks on the executor that started it.
///
/// # Examples
/// ```
/// use corebuf::{Engine, LocalEngine};
/// use corebuf::io::{SimDevice, SimOptions};
///
/// glommio::LocalExecutorBuilder::default().make().unwrap().run(async {
///     let sim = SimDevice::new(SimOptions::new(1 << 20));
///     let devices = vec![sim.clone(), sim.clone()];
///     let builder = Engine::builder().cache_size_bytes(256 << 10).range_blocks(4);
///     let engine = LocalEngine::start(builder, devices).unwrap();
///     let shard = engine.shard(0);
///     shard.write(9, &vec![7u8; 4096]).await.unwrap(); // block 9 may live on shard 1
///     shard.flush().await.unwrap(); // the global barrier
///     assert_eq!(shard.read(9).await.unwrap()[0], 7);
///     engine.shutdown().await.unwrap();
/// });
/// ```
pub struct LocalEngine<D: Device + 'static> {
    shards: Vec<Rc<Shard<D>>>,
    client: Client<D>,
    serving: Vec<JoinHandle<()>>,
}

impl<D: Device + 'static> std::fmt::Debug for LocalEngine<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalEngine").field("shards", &self.shards.len()).finish_non_exhaustive()
    }
}

impl<D: Device + 'static> LocalEngine<D> {
    /// Starts one shard per device handle (all handles of the same device) on the current
    /// executor. The builder's path, shard count, thread pinning, I/O memory and
    /// `poll_before_sleep` are not used (idle shards sleep at once).
    ///
    /// Must be called inside a glommio executor.
    pub fn start(builder: EngineBuilder, devices: Vec<D>) -> Result<LocalEngine<D>> {
        // Shards sharing one thread never poll while idle: a spinning poller would only
        // delay the others (and make a simulated run depend on wall-clock time).
        let builder = builder.shards(devices.len()).poll_before_sleep(std::time::Duration::ZERO);
        builder.validate_settings()?;
        let shard_count = devices.len();
        let mesh = Mesh::new(shard_count, builder.mesh_config());
        let mut shards = Vec::with_capacity(shard_count);
        for (id, device) in devices.into_iter().enumerate() {
            shards.push(Shard::open(id, &builder, device, Arc::clone(&mesh))?);
        }
        let device_blocks = shards[0].device_blocks();
        if shards.iter().any(|s| s.device_blocks() != device_blocks) {
            return Err(Error::config("devices", "every handle must be of the same device"));
        }
        let serving = shards
            .iter()
            .map(|shard| glommio::spawn_local(Rc::clone(shard).serve()).detach())
            .collect();
        let router = Arc::new(Router::new(shard_count, builder.range_blocks));
        let client = Client { mesh, router, block_size: builder.block_size_bytes, device_blocks };
        Ok(LocalEngine { shards, client, serving })
    }

    /// Shard `id`.
    ///
    /// # Panics
    /// If there is no shard `id`.
    pub fn shard(&self, id: usize) -> &Rc<Shard<D>> {
        &self.shards[id]
    }

    /// Every shard, by index.
    pub fn shards(&self) -> &[Rc<Shard<D>>] {
        &self.shards
    }

    /// A client (it works from this executor's tasks; it is `Send` only when the device is).
    pub fn client(&self) -> Client<D> {
        self.client.clone()
    }

    /// Stops taking messages, lets every shard finish what it has, then writes back and
    /// flushes each shard; returns the first error.
    pub async fn shutdown(self) -> Result<()> {
        self.client.mesh.close();
        for serving in self.serving {
            serving.await;
        }
        let mut first_error = None;
        for shard in &self.shards {
            if let Err(e) = shard.stop().await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
