//! The engine: one glommio executor per shard, started and stopped together.

use std::future::Future;
use std::rc::Rc;
use std::sync::{mpsc, Arc};

use glommio::{CpuSet, ExecutorJoinHandle, LocalExecutorBuilder, Placement};

use crate::builder::EngineBuilder;
use crate::client::Client;
use crate::router::Router;
use corebuf_shard::io::DmaDevice;

use crate::mesh::Mesh;
use crate::shard::{Shard, CURRENT};
use crate::stats::EngineStats;
use crate::{Error, Result};

/// A running corebuf engine: `shards` executor threads, each owning a cache partition and an
/// I/O queue over the same file or device.
///
/// Stop it with [`Engine::shutdown`], which flushes every shard and reports errors. Dropping it
/// without that does the same, but can only log the errors.
#[derive(Debug)]
pub struct Engine {
    client: Client,
    executors: Vec<ExecutorJoinHandle<Result<()>>>,
}

impl Engine {
    /// A builder with default settings; only the path is required.
    pub fn builder() -> EngineBuilder {
        EngineBuilder::default()
    }

    pub(crate) fn start(builder: EngineBuilder) -> Result<Engine> {
        let path = builder.validate()?;
        let shards = builder.shard_count();
        let mesh: Arc<Mesh<DmaDevice>> = Mesh::new(shards, builder.mesh_config());
        let cpus = allowed_cpus();
        let (started_tx, started_rx) = mpsc::channel::<(usize, Result<u64>)>();
        let mut executors = Vec::with_capacity(shards);
        for id in 0..shards {
            let placement = match (&cpus, builder.pin_threads) {
                (Some(cpus), true) => Placement::Fixed(cpus[id % cpus.len()]),
                _ => Placement::Unbound,
            };
            let (shard_builder, shard_path, shard_mesh, started) =
                (builder.clone(), path.clone(), Arc::clone(&mesh), started_tx.clone());
            let spawned = LocalExecutorBuilder::new(placement)
                .name(&format!("corebuf-shard-{id}"))
                .io_memory(builder.io_memory_bytes)
                .spin_before_park(builder.spin_before_park)
                .spawn(move || async move {
                    // A panic on this shard must fail its callers, not strand them.
                    let _death = DeathWatch { mesh: Arc::clone(&shard_mesh), shard: id };
                    let opened = match DmaDevice::open(&shard_path).await {
                        Ok(device) => Shard::open(id, &shard_builder, device, shard_mesh),
                        Err(e) => Err(e),
                    };
                    let shard = match opened {
                        Ok(shard) => shard,
                        Err(e) => {
                            let _ = started.send((id, Err(e)));
                            return Ok(());
                        }
                    };
                    CURRENT.with(|current| *current.borrow_mut() = Some(Rc::clone(&shard)));
                    let _ = started.send((id, Ok(shard.device_blocks())));
                    drop(started);
                    Rc::clone(&shard).serve().await;
                    let stopped = shard.stop().await;
                    // Close while the executor can still run the close; forget `current()`.
                    let closed = shard.partition().queue().device().close().await;
                    CURRENT.with(|current| current.borrow_mut().take());
                    stopped.and(closed)
                });
            match spawned {
                Ok(handle) => executors.push(handle),
                Err(e) => {
                    mesh.close();
                    // The spawn error is what the caller needs; shards that did start stop.
                    let _ = join_all(executors);
                    return Err(Error::io(corebuf_shard::IoOp::Open, &path, 0, e.into()));
                }
            }
        }
        drop(started_tx);
        let mut device_blocks = 0;
        let mut first_error = None;
        for _ in 0..shards {
            match started_rx.recv() {
                Ok((_, Ok(blocks))) => device_blocks = blocks,
                Ok((_, Err(e))) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => {
                    first_error.get_or_insert(Error::ShardFailed { shard: 0 });
                }
            }
        }
        if let Some(e) = first_error {
            mesh.close();
            // The startup error is what the caller needs; shards that did start stop.
            let _ = join_all(executors);
            return Err(e);
        }
        let router = Arc::new(Router::new(shards, builder.range_blocks));
        let client = Client { mesh, router, block_size: builder.block_size_bytes, device_blocks };
        Ok(Engine { client, executors })
    }

    /// A thread-safe client.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The number of shards.
    pub fn shard_count(&self) -> usize {
        self.client.shard_count()
    }

    /// Spawns `task(shard)` as a detached task on every shard (a server's accept loop, say).
    /// The tasks end when the engine shuts down.
    pub fn run_on_each<F, Fut>(&self, task: F) -> Result<()>
    where
        F: Fn(Rc<Shard>) -> Fut + Send + Clone + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        for shard in 0..self.shard_count() {
            let task = task.clone();
            futures_lite::future::block_on(self.client.run_on(shard, move |shard| async move {
                glommio::spawn_local(task(shard)).detach();
            }))?;
        }
        Ok(())
    }

    /// Every shard's statistics (blocks the calling thread).
    pub fn stats(&self) -> Result<EngineStats> {
        self.client.stats_blocking()
    }

    /// Stops accepting work, lets every shard finish what it has, writes back and flushes
    /// each shard, joins the threads, and returns the first error any shard reported.
    pub fn shutdown(mut self) -> Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> Result<()> {
        self.client.mesh.close();
        join_all(std::mem::take(&mut self.executors))
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if self.executors.is_empty() {
            return;
        }
        log::warn!("corebuf engine dropped without shutdown(): flushing and stopping shards");
        if let Err(e) = self.stop() {
            log::error!("corebuf engine stop after drop failed: {e}");
        }
    }
}

fn join_all(executors: Vec<ExecutorJoinHandle<Result<()>>>) -> Result<()> {
    let mut first_error = None;
    for (shard, handle) in executors.into_iter().enumerate() {
        let result = handle.join().map_err(|_| Error::ShardFailed { shard }).and_then(|r| r);
        if let Err(e) = result {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// The CPUs this process may run on, in order, or `None` if they cannot be read.
fn allowed_cpus() -> Option<Vec<usize>> {
    let online = CpuSet::online().ok()?;
    let mut cpus: Vec<usize> = online.iter().map(|location| location.cpu).collect();
    cpus.sort_unstable();
    cpus.dedup();
    (!cpus.is_empty()).then_some(cpus)
}

/// Marks its shard dead in the mesh if the shard's thread unwinds from a panic.
struct DeathWatch {
    mesh: Arc<Mesh<DmaDevice>>,
    shard: usize,
}

impl Drop for DeathWatch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.mesh.mark_dead(self.shard);
        }
    }
}
