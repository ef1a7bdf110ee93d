//! `corebuf-nbd`: a Network Block Device server that exports a corebuf engine.
//!
//! One data file (or block device) is the export. Every core runs a corebuf shard that
//! accepts NBD connections on the shared port (`SO_REUSEPORT`) and serves their requests:
//! each block is cached and written by its owner shard, requests on one connection run
//! concurrently and are answered out of order, and `NBD_CMD_FLUSH` / FUA are the engine's
//! global durability barrier. See README.md in this directory for how to run it and attach
//! fio, qemu and libnbd tools.
//!
//! ```text
//! corebuf-nbd --path /var/lib/disk.img --size 8G --cache-bytes 1G
//! qemu-io -f raw nbd://127.0.0.1:10809/corebuf -c 'write -P 7 0 1M' -c 'read -P 7 0 1M'
//! ```

mod blocks;
mod conn;
mod export;
mod flush;
mod handshake;
#[path = "../../common/port.rs"]
mod port;
mod proto;
mod server;

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use clap::Parser;

use crate::export::Export;
use crate::port::{host_port, probe_port, wait_out_listener};
use crate::server::NbdShard;

/// The engine's block size: the export's preferred block size.
const BLOCK_SIZE: usize = 4096;

/// Command-line options.
#[derive(Parser, Debug)]
#[command(name = "corebuf-nbd", version, about = "A Network Block Device server on corebuf")]
struct Args {
    /// The data file (or block device) to export. Created at --size if absent.
    #[arg(long)]
    path: PathBuf,
    /// Size of a new data file (suffixes K, M, G, T; powers of 1024), written in full with
    /// zeroes so that no read is answered from a hole. An existing file keeps its size;
    /// a different --size is refused. A multiple of 4K.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Address to listen on. Loopback by default: exposing a disk is a deliberate choice.
    #[arg(long, default_value = "127.0.0.1")]
    bind: String,
    /// TCP port (0: any free port; the chosen one is printed). 10809 is NBD's IANA port.
    #[arg(long, default_value_t = 10809)]
    port: u16,
    /// Listen on this Unix-domain socket instead of TCP (clients use
    /// `nbd+unix:///EXPORT?socket=PATH`). A stale socket file left by a server that died is
    /// replaced; any other existing file is refused. Removed when the server stops.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["bind", "port"])]
    unix: Option<PathBuf>,
    /// Refuse writes, trims and write-zeroes (`NBD_FLAG_READ_ONLY`).
    #[arg(long)]
    read_only: bool,
    /// Cache bytes of the whole server, split over the shards (suffixes K, M, G).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    cache_bytes: u64,
    /// Shards (executor threads, one per core). Default: one per online core.
    #[arg(long)]
    shards: Option<usize>,
    /// The export's name (the empty name, the default export, selects it too).
    #[arg(long, default_value = "corebuf")]
    export_name: String,
    /// Most client connections (split over the shards).
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Write-backs in flight per shard (see `EngineBuilder::writebacks_in_flight_max`): how
    /// deep a flush drives the device.
    #[arg(long, default_value_t = 32)]
    writebacks_max: usize,
    /// Start writing dirty blocks back in the background after this many blocks were
    /// written on a shard (0: only flushes, FUA and cache pressure write back), so a flush
    /// finds little left to write.
    #[arg(long, default_value_t = 256)]
    write_behind_blocks: usize,
    /// Seconds a client may take over the whole handshake before it is dropped.
    #[arg(long, default_value_t = 30)]
    handshake_timeout_secs: u64,
    /// How long an idle shard spins before it parks, in microseconds (see
    /// `EngineBuilder::spin_before_park`): trades CPU for cross-shard latency.
    #[arg(long, default_value_t = 0)]
    spin_us: u64,
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

/// Writes a line to stderr, prefixed with the program's name.
pub fn log(msg: impl std::fmt::Display) {
    eprintln!("corebuf-nbd: {msg}");
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

/// Creates the data file at `size` bytes, every byte written (zeroes), if it does not exist;
/// checks an existing one against `size`. Returns the export size.
fn prepare_file(path: &Path, size: Option<u64>) -> Result<u64, String> {
    if path.exists() {
        let len = file_size(path)?;
        if let Some(size) = size.filter(|&s| s != len) {
            return Err(format!(
                "{} exists with {len} bytes, not the --size {size}; drop --size to use it",
                path.display()
            ));
        }
        if len == 0 || !len.is_multiple_of(BLOCK_SIZE as u64) {
            return Err(format!(
                "{} has {len} bytes: an export needs a positive multiple of {BLOCK_SIZE}",
                path.display()
            ));
        }
        return Ok(len);
    }
    let Some(size) = size else {
        return Err(format!("{} does not exist: give --size to create it", path.display()));
    };
    if size == 0 || !size.is_multiple_of(BLOCK_SIZE as u64) {
        return Err(format!("--size {size}: a positive multiple of {BLOCK_SIZE} is needed"));
    }
    log(format!("creating {} ({} MiB, written with zeroes)", path.display(), size >> 20));
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
    Ok(size)
}

/// The size of a file or block device (a device node's metadata length reads 0).
fn file_size(path: &Path) -> Result<u64, String> {
    use std::io::{Seek, SeekFrom};
    let mut f = File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    f.seek(SeekFrom::End(0)).map_err(|e| format!("size of {}: {e}", path.display()))
}

/// Makes `path` free for a new Unix socket: nothing there, or a socket nobody listens on
/// (left by a server that died, waited out as a TCP port is), which is removed. Anything
/// else is an error.
fn free_unix_path(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else { return Ok(()) };
    if !meta.file_type().is_socket() {
        return Err(format!(
            "{} exists and is not a socket: refusing to replace it",
            path.display()
        ));
    }
    let connect = || std::os::unix::net::UnixStream::connect(path).ok();
    wait_out_listener(&path.display().to_string(), connect, &[])?;
    std::fs::remove_file(path)
        .map_err(|e| format!("remove the stale socket {}: {e}", path.display()))
}

fn run(args: Args) -> Result<(), String> {
    match &args.unix {
        Some(path) => free_unix_path(path)?,
        // Every shard binds the port with SO_REUSEPORT, which would also let a second
        // server share it silently: first make sure nobody listens there.
        None => probe_port(&args.bind, args.port, &[])?,
    }
    let size_bytes = prepare_file(&args.path, args.size)?;
    let lock = File::open(&args.path).map_err(|e| format!("open {}: {e}", args.path.display()))?;
    lock_exclusively(&lock, &args.path)?;
    raise_memlock_limit();
    let shards =
        args.shards.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let engine = corebuf::Engine::builder()
        .path(&args.path)
        .block_size_bytes(BLOCK_SIZE)
        .cache_size_bytes(args.cache_bytes)
        .shards(shards)
        .spin_before_park(Duration::from_micros(args.spin_us))
        .writebacks_in_flight_max(args.writebacks_max)
        .build()
        .map_err(|e| format!("start the engine: {e}"))?;
    let export = Arc::new(Export {
        name: args.export_name.clone(),
        size_bytes,
        block_size: BLOCK_SIZE as u32,
        read_only: args.read_only,
        writes_replied: Default::default(),
    });
    let client = engine.client();
    let (stop_tx, stop_rx) = mpsc::channel::<String>();
    let serving = (|| -> Result<signal_hook::iterator::Handle, String> {
        let settings = server::ShardSettings {
            connections_max: args.max_connections.div_ceil(shards).max(1),
            write_behind_blocks: args.write_behind_blocks,
            handshake_timeout: Duration::from_secs(args.handshake_timeout_secs.max(1)),
        };
        // TCP: shard 0 binds first (so --port 0 picks the port), then every other shard binds
        // it. Unix: every shard serves, shard 0 listens and hands connections round.
        let mut port = args.port;
        for s in 0..shards {
            let (addr, export) = (host_port(&args.bind, port), Arc::clone(&export));
            let unix = args.unix.clone();
            let bound = futures_lite::future::block_on(client.run_on(s, move |shard| async move {
                let nbd = NbdShard::install(shard, export, settings);
                match unix {
                    Some(path) if s == 0 => nbd
                        .listen_unix(&path, shards)
                        .map(|()| None)
                        .map_err(|e| format!("listen on {}: {e}", path.display())),
                    Some(_) => Ok(None),
                    None => {
                        nbd.listen(&addr).map(Some).map_err(|e| format!("listen on {addr}: {e}"))
                    }
                }
            }))
            .map_err(|e| e.to_string())??;
            if let Some(bound) = bound {
                port = bound.port();
            }
        }
        let signals = spawn_signal_thread(stop_tx.clone())?;
        let listening = match &args.unix {
            Some(path) => format!("unix:{}", path.display()),
            None => host_port(&args.bind, port),
        };
        println!(
            "corebuf-nbd listening on {listening} (export \"{}\", {size_bytes} bytes, shards \
             {shards}, cache {} MiB{}, data {})",
            export.name,
            args.cache_bytes >> 20,
            if args.read_only { ", read-only" } else { "" },
            args.path.display(),
        );
        let _ = std::io::stdout().flush();
        Ok(signals)
    })();
    let reason = match &serving {
        Ok(_) => stop_rx.recv().unwrap_or_else(|_| "all senders gone".into()),
        Err(e) => format!("startup failed: {e}"),
    };
    log(format!("stopping ({reason})"));
    for s in 0..shards {
        let stopped = futures_lite::future::block_on(client.run_on(s, |_| async move {
            if let Some(nbd) = NbdShard::current() {
                nbd.begin_stop();
                let left = nbd.wait_connections(Duration::from_secs(5)).await;
                if left > 0 {
                    log(format!("{left} connection(s) still open after 5 s; stopping anyway"));
                }
            }
        }));
        if let Err(e) = stopped {
            log(format!("stop shard {s}: {e}"));
        }
    }
    engine.shutdown().map_err(|e| format!("engine shutdown: {e}"))?;
    serving?;
    log("stopped cleanly");
    Ok(())
}

/// Takes an exclusive `flock` on the data file for the life of the process: two servers
/// caching one file would corrupt it.
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

/// glommio locks memory for its rings and DMA buffers: raise the soft RLIMIT_MEMLOCK to the
/// hard limit (a no-op when it already is; the engine reports it if it is still too low).
fn raise_memlock_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit / setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit);
        }
    }
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
        .name("corebuf-nbd-signals".into())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
