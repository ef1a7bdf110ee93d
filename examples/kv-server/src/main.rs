//! `corebuf-kv`: a Redis-protocol (RESP2) key-value server on corebuf.
//!
//! A persistent hash table lives in the blocks of one data file; every core runs a corebuf
//! shard that owns a share of the table's ranges, accepts connections on the shared port
//! (`SO_REUSEPORT`) and routes each key to its owner shard. See README.md for how to run it
//! and the design, FORMAT.md for the on-disk format.
//!
//! ```text
//! corebuf-kv --path /var/lib/kv/data --size 1G --port 7379 --fsync always
//! redis-cli -p 7379 set greeting hello
//! ```

mod chunks;
mod cluster;
mod cmds;
mod cmdtable;
mod format;
mod glob;
mod keyspace;
mod large;
mod lock;
mod logrec;
#[path = "../../common/port.rs"]
mod port;
mod resp;
mod server;
mod stop;
mod store;

/// mimalloc as the global allocator (see Cargo.toml).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use clap::Parser;

use crate::format::{Superblock, BLOCK_SIZE, RANGE_BLOCKS};
use crate::port::{host_port, probe_port};
use crate::store::{Fsync, Geometry, KvShard};

/// Command-line options.
#[derive(Parser, Debug)]
#[command(name = "corebuf-kv", version, about = "A Redis-protocol key-value server on corebuf")]
struct Args {
    /// The data file (or block device). Created and filled with zeroes at --size if absent;
    /// formatted on first open.
    #[arg(long, default_value = "corebuf-kv.data")]
    path: PathBuf,
    /// Size of a new data file (suffixes K, M, G, T; powers of 1024). Ignored for an existing
    /// file. At least 2M; a multiple of 4K.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    size: u64,
    /// Address to listen on. Loopback by default: exposing the server is a deliberate choice.
    #[arg(long, default_value = "127.0.0.1")]
    bind: String,
    /// TCP port (0: any free port; the chosen one is printed).
    #[arg(long, default_value_t = 7379)]
    port: u16,
    /// Shards (executor threads, one per core). Default: one per online core.
    #[arg(long)]
    shards: Option<usize>,
    /// Cache bytes of the whole server, split over the shards (suffixes K, M, G).
    #[arg(long, default_value = "128M", value_parser = parse_size)]
    cache_bytes: u64,
    /// Durability, as Redis's appendfsync: `always` answers writes after their shard's log
    /// commit covering them (group commit), `everysec` commits each shard's log every second,
    /// `no` leaves the log to its write-behind and the checkpoints.
    #[arg(long, value_enum, default_value_t = Fsync::Everysec)]
    fsync: Fsync,
    /// Most client connections (split over the shards).
    #[arg(long, default_value_t = 10_000)]
    max_clients: usize,
    /// Write-ahead log bytes per shard, in `<path>.log` (suffixes K, M, G). A checkpoint (the
    /// engine's barrier) starts when a shard's log is half full; a full log makes writes wait.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    log_size: u64,
    /// The write-ahead log file (created full of zeroes). Default: `<path>.log`; give one for a
    /// block device, or to put the log on another device.
    #[arg(long)]
    log_path: Option<PathBuf>,
    /// Microseconds an idle shard spins before it parks its thread (the engine's
    /// `spin_before_park`): cross-shard messages to a parked shard wait for a thread wake-up.
    #[arg(long, default_value_t = 0)]
    spin_us: u64,
    /// Background write-back of each shard's cache starts when more than this percentage of
    /// its buffers is dirty. The log holds every change, so buffers need reach the data file
    /// only at checkpoints and evictions: write-backs in the middle of the load make each log
    /// commit's flush wait for them.
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u8).range(0..=100))]
    dirty_high_percent: u8,
    /// ... and stops when this percentage is left unwritten (at most --dirty-high-percent).
    #[arg(long, default_value_t = 80, value_parser = clap::value_parser!(u8).range(0..=100))]
    dirty_low_percent: u8,
    /// Cluster mode: every node of a static Redis Cluster, `HOST:PORT,HOST:PORT,...` (the same
    /// list on each node). The 16384 slots are split evenly over them in this order; this node
    /// is the one at --bind and --port (which must not be 0).
    #[arg(long)]
    cluster_nodes: Option<String>,
    /// Bytes per chunk of a value larger than one record (64 KiB): the chunk size new large
    /// values are written with (each manifest records its own, so it may change between
    /// runs). Multiples of 4048 (an extent block's payload) waste no pool space.
    #[arg(long, default_value_t = store::CHUNK_BYTES_DEFAULT)]
    chunk_bytes: u32,
}

fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix('B')).unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = digits.trim().parse().map_err(|_| format!("not a size: {text:?}"))?;
    n.checked_mul(1 << shift).ok_or_else(|| format!("size {text:?} is too large"))
}

fn log(msg: impl std::fmt::Display) {
    eprintln!("corebuf-kv: {msg}");
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log(format!("error: {e}"));
            ExitCode::FAILURE
        }
    }
}

/// Creates the data file at `size` bytes of zeroes if it does not exist; true if it did.
fn create_if_absent(path: &Path, size: u64) -> Result<bool, String> {
    if path.exists() {
        return Ok(false);
    }
    if size < 2 * RANGE_BLOCKS * BLOCK_SIZE as u64 || !size.is_multiple_of(BLOCK_SIZE as u64) {
        return Err(format!(
            "--size {size}: a new data file needs at least {} bytes and a multiple of {BLOCK_SIZE}",
            2 * RANGE_BLOCKS * BLOCK_SIZE as u64
        ));
    }
    log(format!("creating {} ({} MiB of zeroes)", path.display(), size >> 20));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| format!("create {}: {e}", path.display()))?;
    let zeroes = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(zeroes.len() as u64) as usize;
        file.write_all(&zeroes[..n]).map_err(|e| format!("write {}: {e}", path.display()))?;
        left -= n as u64;
    }
    file.sync_all().map_err(|e| format!("sync {}: {e}", path.display()))?;
    Ok(true)
}

fn read_block(file: &File, block: u64) -> Result<Vec<u8>, String> {
    let mut data = vec![0u8; BLOCK_SIZE];
    file.read_exact_at(&mut data, block * BLOCK_SIZE as u64)
        .map_err(|e| format!("read block {block}: {e}"))?;
    Ok(data)
}

fn write_superblock(file: &File, sb: &Superblock) -> Result<(), String> {
    let block = sb.sequence % 2;
    file.write_all_at(&sb.encode(), block * BLOCK_SIZE as u64)
        .and_then(|()| file.sync_data())
        .map_err(|e| format!("write superblock copy {block}: {e}"))
}

fn random_key() -> (u64, u64) {
    let mut bytes = [0u8; 16];
    let ok = File::open("/dev/urandom").and_then(|mut f| {
        use std::io::Read as _;
        f.read_exact(&mut bytes)
    });
    if ok.is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        bytes[..8].copy_from_slice(&format::mix64(t).to_le_bytes());
        bytes[8..].copy_from_slice(&format::mix64(t ^ std::process::id() as u64).to_le_bytes());
    }
    (
        u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")),
        u64::from_le_bytes(bytes[8..].try_into().expect("8 bytes")),
    )
}

/// Reads the superblock (formatting an all-zero file), then records this open: a new epoch,
/// `clean = false`, and after an unclean shutdown a new `valid_from` so that every range's
/// free space is rebuilt before it is used.
fn open_superblock(file: &File, file_blocks: u64) -> Result<Superblock, String> {
    let copies = [
        Superblock::decode(0, &read_block(file, 0)?),
        Superblock::decode(1, &read_block(file, 1)?),
    ];
    let mut newest: Option<Superblock> = None;
    for sb in copies.iter().flatten().flatten() {
        if newest.as_ref().is_none_or(|n| sb.sequence > n.sequence) {
            newest = Some(sb.clone());
        }
    }
    let sb = match newest {
        Some(sb) => {
            if let Some(Err(e)) = copies.iter().find(|c| c.is_err()) {
                log(format!("warning: one superblock copy is unusable ({e}); using the other"));
            }
            sb
        }
        None => {
            if let Some(Err(e)) = copies.iter().find(|c| c.is_err()) {
                return Err(e.clone());
            }
            let sb = Superblock {
                sequence: 0,
                device_blocks: file_blocks,
                epoch: 0,
                valid_from: 0,
                clean: true,
                hash_key: random_key(),
                created_unix: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            };
            write_superblock(file, &sb)?;
            log(format!(
                "formatted a new data file ({} ranges of 1 MiB)",
                file_blocks / RANGE_BLOCKS
            ));
            sb
        }
    };
    if sb.device_blocks > file_blocks {
        return Err(format!(
            "the data file has {file_blocks} blocks but was formatted with {}: it was truncated",
            sb.device_blocks
        ));
    }
    if sb.device_blocks / RANGE_BLOCKS < 2 {
        return Err("the data file is too small (needs at least 2 MiB)".into());
    }
    let mut open = sb.clone();
    open.sequence += 1;
    open.epoch += 1;
    open.clean = false;
    if !sb.clean {
        open.valid_from = open.epoch;
        // Whatever the crashed run got to the device is made durable before it is built upon.
        file.sync_all().map_err(|e| format!("sync the data file: {e}"))?;
        log("the previous run did not shut down cleanly: each range's free space is rebuilt from its chains on first use");
    }
    if open.epoch >= 1 << 24 {
        return Err(
            "the data file was opened 2^24 times; its version counters are exhausted".into()
        );
    }
    write_superblock(file, &open)?;
    Ok(open)
}

fn run(args: Args) -> Result<(), String> {
    let started = Instant::now();
    if args.log_size < 64 << 10 {
        // Without a log, acknowledged writes would not be durable.
        return Err(format!("--log-size {}: at least 64K", args.log_size));
    }
    if args.dirty_low_percent > args.dirty_high_percent {
        return Err(format!(
            "--dirty-low-percent {} is above --dirty-high-percent {}",
            args.dirty_low_percent, args.dirty_high_percent
        ));
    }
    if !(1024..=format::MAX_VALUE as u32).contains(&args.chunk_bytes) {
        return Err(format!("--chunk-bytes {}: 1024 to {}", args.chunk_bytes, format::MAX_VALUE));
    }
    // A chunk's log record (header, 12-byte key, the chunk) must fit the log's largest record:
    // at most half the region's data area (the engine's rule, corebuf_shard::log::LogConfig).
    let record_max =
        ((args.log_size / BLOCK_SIZE as u64).saturating_sub(2) * BLOCK_SIZE as u64) / 2 - 32;
    if args.chunk_bytes as u64 + 64 > record_max {
        return Err(format!(
            "--chunk-bytes {} does not fit a record of a --log-size {} log (at most {} bytes)",
            args.chunk_bytes,
            args.log_size,
            record_max - 64
        ));
    }
    // Every shard binds the port with SO_REUSEPORT, which would also let a second server
    // share it silently: first make sure nobody listens there.
    if let Some(list) = &args.cluster_nodes {
        let layout = cluster::Cluster::parse(list, &args.bind, args.port)?;
        let me = layout.myself();
        log(format!(
            "cluster mode: node {} of {}, slots {}-{}, id {}",
            layout.me + 1,
            layout.nodes.len(),
            me.slots.start,
            me.slots.end.saturating_sub(1),
            me.id
        ));
        cluster::install(layout)?;
    }
    probe_port(&args.bind, args.port, b"PING\r\n")?;
    let created = create_if_absent(&args.path, args.size)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&args.path)
        .map_err(|e| format!("open {}: {e}", args.path.display()))?;
    lock_exclusively(&file, &args.path)?;
    let len = file.metadata().map_err(|e| format!("stat {}: {e}", args.path.display()))?.len();
    let len = if len == 0 { block_device_size(&args.path).unwrap_or(0) } else { len };
    let sb = open_superblock(&file, len / BLOCK_SIZE as u64)?;

    let shards =
        args.shards.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let engine = corebuf::Engine::builder()
        .path(&args.path)
        .block_size_bytes(BLOCK_SIZE)
        .range_blocks(RANGE_BLOCKS)
        .cache_size_bytes(args.cache_bytes)
        .shards(shards)
        .log_size_bytes(args.log_size)
        .spin_before_park(Duration::from_micros(args.spin_us))
        .dirty_percent(args.dirty_high_percent, args.dirty_low_percent)
        .log_path(args.log_path.clone().unwrap_or_else(|| {
            let mut name = args.path.as_os_str().to_owned();
            name.push(".log");
            PathBuf::from(name)
        }))
        // Checksums are verified when a block comes from the device, not on every cache hit,
        // and computed when a block goes to the device, not on every change of a cached one.
        .check_on_read(|block, data| {
            format::check_block(block, data).map(|_| ()).map_err(|e| e.to_string())
        })
        .seal_on_write(|_block, data| format::seal_if_formatted(data))
        .build()
        .map_err(|e| format!("start the engine: {e}"))?;
    let client = engine.client();
    let geo = Arc::new(Geometry {
        ranges: sb.device_blocks / RANGE_BLOCKS,
        hash_key: sb.hash_key,
        epoch: sb.epoch,
        valid_from: sb.valid_from,
        fsync: args.fsync,
        max_clients_per_shard: args.max_clients.div_ceil(shards).max(1),
        started,
        path: args.path.display().to_string(),
        chunk_bytes: args.chunk_bytes,
        tag_seed: random_key().0,
    });

    let (stop_tx, stop_rx) = mpsc::channel::<String>();
    let serving = (|| -> Result<signal_hook::iterator::Handle, String> {
        // A file created by this run holds zeroes past its two superblock copies (written
        // around the engine): the first touch of a bucket needs no read. Declaring it costs
        // each shard a bit per block, so only while that stays within 1/64 of its share of
        // the cache (a file of up to 512 times that share).
        let bitmap_bytes = sb.device_blocks / 8;
        let zeroed = (created && bitmap_bytes <= args.cache_bytes / shards as u64 / 64)
            .then_some(sb.device_blocks);
        for s in 0..shards {
            let (geo, stop_tx) = (Arc::clone(&geo), stop_tx.clone());
            futures_lite::future::block_on(client.run_on(s, move |shard| async move {
                if let Some(blocks) = zeroed {
                    shard.partition().assume_zeroed(2, blocks - 2)?;
                }
                KvShard::install(shard, geo, stop_tx);
                Ok::<(), corebuf::Error>(())
            }))
            .map_err(|e| format!("start shard {s}: {e}"))?
            .map_err(|e| format!("start shard {s}: {e}"))?;
        }
        let replay_started = Instant::now();
        let mut replay = replay_logs(&client, shards)?;
        // Chunks of large values that expired while the server was down: freed once every
        // shard has replayed (no later replay can bring a freed chunk back).
        for s in 0..shards {
            let freed =
                futures_lite::future::block_on(client.run_on(s, |_| async move {
                    KvShard::current().free_expired_in_replay().await
                }))
                .map_err(|e| e.to_string())??;
            if freed > 0 {
                log(format!("shard {s}: freed the chunks of {freed} large values that expired"));
            }
        }
        // Only now the checkpoints that empty the logs: a start that stopped before (another
        // shard's replay failed, say) replays every log again, and the expired chunks' list
        // with it.
        if replay.records > 0 {
            for s in 0..shards {
                let took =
                    futures_lite::future::block_on(client.run_on(s, |_| async move {
                        KvShard::current().checkpoint_replayed().await
                    }))
                    .map_err(|e| e.to_string())??;
                replay.checkpoint += took;
            }
            log_replay(&replay, replay_started.elapsed());
        }
        // Shard 0 binds first (so --port 0 picks the port), then every other shard binds it.
        let mut port = args.port;
        for s in 0..shards {
            let addr = host_port(&args.bind, port);
            let bound = futures_lite::future::block_on(client.run_on(s, move |_| async move {
                server::listen(KvShard::current(), &addr)
                    .map_err(|e| format!("listen on {addr}: {e}"))
            }))
            .map_err(|e| e.to_string())??;
            port = bound.port();
        }
        let signals = spawn_signal_thread(stop_tx.clone())?;
        println!(
            "corebuf-kv listening on {} (shards {shards}, fsync {}, data {}, {} MiB, epoch {})",
            host_port(&args.bind, port),
            args.fsync,
            args.path.display(),
            (sb.device_blocks * BLOCK_SIZE as u64) >> 20,
            sb.epoch
        );
        let _ = std::io::stdout().flush();
        Ok(signals)
    })();
    let reason = match &serving {
        Ok(_) => stop_rx.recv().unwrap_or_else(|_| "all senders gone".into()),
        Err(e) => format!("startup failed: {e}"),
    };
    log(format!("stopping ({reason})"));

    // 1. Stop accepting and let connections finish what they have (bounded).
    let on_all = |what: &str, job: ShardJob| {
        let mut first = Ok(());
        for s in 0..shards {
            let r = futures_lite::future::block_on(client.run_on(s, move |_| async move {
                match KvShard::try_current() {
                    Some(kv) => job(kv).await,
                    None => Ok(()), // startup failed before this shard's store existed
                }
            }))
            .map_err(|e| e.to_string())
            .and_then(|r| r);
            if let Err(e) = r {
                log(format!("{what} on shard {s}: {e}"));
                if first.is_ok() {
                    first = Err(format!("{what} on shard {s}: {e}"));
                }
            }
        }
        first
    };
    let stopped = on_all("stop serving", |kv| {
        Box::pin(async move {
            kv.begin_stop();
            Ok(())
        })
    });
    let closed = on_all("close connections", |kv| {
        Box::pin(async move {
            let left = kv.wait_connections(Duration::from_secs(5)).await;
            if left > 0 {
                log(format!("{left} connection(s) still busy after 5 s; stopping anyway"));
            }
            Ok(())
        })
    });
    // 2. Finish deferred work, then write every loaded range's header.
    let drained =
        on_all("drain deferred jobs", |kv| Box::pin(async move { kv.drain_jobs().await }));
    let headers = on_all("write range headers", |kv| {
        Box::pin(async move { kv.write_range_headers().await.map(|_| ()) })
    });
    // 3. Flush and stop the engine; only then is the file marked clean.
    engine.shutdown().map_err(|e| format!("engine shutdown: {e}"))?;
    serving?;
    stopped?;
    closed?;
    drained?;
    headers?;
    let mut clean = sb.clone();
    clean.sequence += 1;
    clean.clean = true;
    write_superblock(&file, &clean)?;
    log("stopped cleanly");
    Ok(())
}

/// Applies every shard's log (concurrently, one thread per shard waiting for its shard) and
/// reports what it took.
fn replay_logs(
    client: &corebuf::Client,
    shards: usize,
) -> Result<crate::store::ReplayReport, String> {
    let waiters: Vec<_> = (0..shards)
        .map(|s| {
            let client = client.clone();
            std::thread::spawn(move || {
                futures_lite::future::block_on(
                    client.run_on(s, |_| async move { KvShard::current().replay_log().await }),
                )
                .map_err(|e| e.to_string())
                .and_then(|r| r)
                .map_err(|e| {
                    format!(
                        "replay the log of shard {s}: {e} (the log is kept: the next start \
                         replays it again)"
                    )
                })
            })
        })
        .collect();
    let mut total = crate::store::ReplayReport::default();
    for waiter in waiters {
        let report = waiter.join().map_err(|_| "a replay thread panicked".to_string())??;
        total.records += report.records;
        total.applied += report.applied;
        total.replaced_when_full += report.replaced_when_full;
        total.bytes += report.bytes;
        total.scan = total.scan.max(report.scan);
        total.apply = total.apply.max(report.apply);
    }
    Ok(total)
}

/// Prints what the replay took (`elapsed`: from the start of the replay to the end of its
/// checkpoints).
fn log_replay(total: &crate::store::ReplayReport, elapsed: Duration) {
    let mut notes = String::new();
    if total.applied < total.records {
        let superseded = total.records - total.applied;
        notes += &format!("; {superseded} superseded by a later record of their key");
    }
    if total.replaced_when_full > 0 {
        notes += &format!(
            "; {} SETs applied after removing the key, its region being full",
            total.replaced_when_full
        );
    }
    log(format!(
        "replayed {} log records ({} KiB{notes}) in {} ms (scan {} ms, apply {} ms, \
         checkpoint {} ms)",
        total.records,
        total.bytes >> 10,
        // The scan ran when the engine opened the logs, before `elapsed` began.
        (elapsed + total.scan).as_millis(),
        total.scan.as_millis(),
        total.apply.as_millis(),
        total.checkpoint.as_millis()
    ));
}

/// A step of the shutdown sequence, run on every shard.
type ShardJob = fn(Rc<KvShard>) -> Pin<Box<dyn Future<Output = Result<(), String>>>>;

/// Takes an exclusive `flock` on the data file for the life of the process: two servers on
/// one file would destroy it.
fn lock_exclusively(file: &File, path: &Path) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock(2) on a descriptor this function borrows; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!(
            "{} is in use by another process (flock: {e}); one server per data file",
            path.display()
        ));
    }
    Ok(())
}

/// Size of a block device (the file length of a device node reads 0).
fn block_device_size(path: &Path) -> Option<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = File::open(path).ok()?;
    f.seek(SeekFrom::End(0)).ok()
}

/// A thread that turns SIGTERM / SIGINT into a stop request (a second signal exits at once).
fn spawn_signal_thread(
    stop_tx: mpsc::Sender<String>,
) -> Result<signal_hook::iterator::Handle, String> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .map_err(|e| format!("signals: {e}"))?;
    let handle = signals.handle();
    std::thread::Builder::new()
        .name("corebuf-kv-signals".into())
        .spawn(move || {
            let mut seen = 0;
            for sig in signals.forever() {
                seen += 1;
                if seen > 1 {
                    log(format!("signal {sig} again: exiting without a clean shutdown"));
                    std::process::exit(130);
                }
                let _ = stop_tx.send(format!("signal {sig}"));
            }
        })
        .map_err(|e| format!("spawn the signal thread: {e}"))?;
    Ok(handle)
}
