//! One shard's side of the server: its listener (TCP with `SO_REUSEPORT`, so the kernel
//! spreads connections over the shards; or one Unix-domain socket on shard 0, which hands the
//! connections it accepts to the shards in turn), its live connections, its group-commit
//! flusher, and the stop sequence.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, RawFd};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use corebuf::Shard;
use corebuf_shard::WaitList;
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::export::Export;
use crate::flush::Flusher;
use crate::handshake::{self, Outcome};
use crate::{conn, log};

/// A connected client: a TCP or a Unix-domain stream socket.
pub trait Socket: AsyncRead + AsyncWrite + AsRawFd + Unpin + 'static {
    /// The client, for the log.
    fn peer(&self) -> String;
}

impl Socket for TcpStream {
    fn peer(&self) -> String {
        self.peer_addr().map_or_else(|_| "?".to_string(), |a| a.to_string())
    }
}

impl Socket for UnixStream {
    fn peer(&self) -> String {
        "a Unix-socket client".to_string()
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<NbdShard>>> = const { RefCell::new(None) };
}

/// A listening socket on `addr` with `SO_REUSEPORT` (every shard binds the same port, and the
/// kernel spreads connections over them) and `SO_REUSEADDR` (connections of an earlier server
/// on the port may linger in TIME_WAIT).
fn bind(addr: &str) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::net::ToSocketAddrs;
    use std::os::fd::{FromRawFd, IntoRawFd};
    let addr = addr.to_socket_addrs()?.next().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("no address for {addr}"))
    })?;
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    // SAFETY: the descriptor is a bound, listening TCP socket whose ownership moves here.
    Ok(unsafe { TcpListener::from_raw_fd(socket.into_raw_fd()) })
}

/// The file of a Unix socket this server bound, removed when dropped if the path still
/// names that socket (a server started on the same path after this one stopped listening
/// replaces the file, and its socket must not be removed).
struct SocketFile {
    path: std::path::PathBuf,
    identity: (u64, u64),
}

impl SocketFile {
    fn new(path: &Path) -> io::Result<SocketFile> {
        Ok(SocketFile { path: path.to_path_buf(), identity: file_identity(path)? })
    }
}

/// A file's (device, inode).
fn file_identity(path: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if file_identity(&self.path).ok() != Some(self.identity) {
            return; // gone, or another server's socket now
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            log(format!("remove {}: {e}", self.path.display()));
        }
    }
}

/// Per-shard settings from the command line.
#[derive(Clone, Copy, Debug)]
pub struct ShardSettings {
    /// Most connections one shard serves at once.
    pub connections_max: usize,
    /// Blocks dirtied between background write-backs (0: none).
    pub write_behind_blocks: usize,
    /// How long a client may take over the whole handshake before it is dropped.
    pub handshake_timeout: Duration,
}

/// The server's state on one shard.
#[derive(Debug)]
pub struct NbdShard {
    /// The engine shard this executor runs.
    pub shard: Rc<Shard>,
    /// The export every connection serves.
    pub export: Arc<Export>,
    /// Group commit of this shard's flushes and FUA writes.
    pub flusher: Flusher,
    /// Most connections this shard serves at once; more are closed at accept.
    connections_max: usize,
    /// Blocks dirtied on this shard since the last write-behind started, and its trigger
    /// (0: no write-behind).
    dirtied_blocks: Cell<usize>,
    write_behind_blocks: usize,
    write_behind_running: Cell<bool>,
    handshake_timeout: Duration,
    stopping: Cell<bool>,
    stop_changed: WaitList,
    /// Live connections by id, with their socket (shut down for reading at stop).
    connections: RefCell<HashMap<u64, RawFd>>,
    next_connection: Cell<u64>,
    connections_changed: WaitList,
}

impl NbdShard {
    /// Creates this shard's server state and makes it [`NbdShard::current`].
    pub fn install(shard: Rc<Shard>, export: Arc<Export>, settings: ShardSettings) -> Rc<Self> {
        let nbd = Rc::new(NbdShard {
            shard,
            export,
            flusher: Flusher::default(),
            connections_max: settings.connections_max,
            dirtied_blocks: Cell::new(0),
            write_behind_blocks: settings.write_behind_blocks,
            write_behind_running: Cell::new(false),
            handshake_timeout: settings.handshake_timeout,
            stopping: Cell::new(false),
            stop_changed: WaitList::default(),
            connections: RefCell::new(HashMap::new()),
            next_connection: Cell::new(0),
            connections_changed: WaitList::default(),
        });
        CURRENT.with(|current| *current.borrow_mut() = Some(Rc::clone(&nbd)));
        nbd
    }

    /// This thread's server state, if [`NbdShard::install`] ran here.
    pub fn current() -> Option<Rc<Self>> {
        CURRENT.with(|current| current.borrow().clone())
    }

    /// Records `blocks` blocks dirtied on this shard, and starts writing the dirty blocks
    /// back in the background once `write_behind_blocks` have been dirtied since the last
    /// write-behind (one at a time). A flush then finds little left to write: the device
    /// works while the client is still sending, as the kernel's dirty-page write-back does
    /// for a page-cache server.
    pub fn note_dirtied(self: &Rc<Self>, blocks: usize) {
        if self.write_behind_blocks == 0 {
            return;
        }
        let dirtied = self.dirtied_blocks.get() + blocks;
        if dirtied < self.write_behind_blocks || self.write_behind_running.get() {
            self.dirtied_blocks.set(dirtied);
            return;
        }
        self.dirtied_blocks.set(0);
        self.write_behind_running.set(true);
        let nbd = Rc::clone(self);
        glommio::spawn_local(async move {
            // An error stays latched on its block and is reported by the next flush.
            let _ = nbd.shard.partition().write_back_dirty().await;
            nbd.write_behind_running.set(false);
        })
        .detach();
    }

    /// Whether the server is stopping (new connections and options are refused).
    pub fn stopping(&self) -> bool {
        self.stopping.get()
    }

    /// Binds `addr` (every shard binds the same port) and spawns the accept loop; returns the
    /// bound address.
    pub fn listen(self: &Rc<Self>, addr: &str) -> io::Result<SocketAddr> {
        let listener = bind(addr)?;
        let local = listener.local_addr().map_err(io::Error::from)?;
        let nbd = Rc::clone(self);
        glommio::spawn_local(async move {
            while let Some(stream) = nbd.accept_until_stop(|| listener.accept()).await {
                let _ = stream.set_nodelay(true);
                nbd.adopt(stream);
            }
        })
        .detach();
        Ok(local)
    }

    /// Binds the Unix-domain socket `path` (which must not exist) and spawns its accept
    /// loop: connection `i` is served by shard `i % shards`. Call it on one shard only. The
    /// socket file is removed when the loop ends (at stop), if it is still this server's.
    pub fn listen_unix(self: &Rc<Self>, path: &Path, shards: usize) -> io::Result<()> {
        let listener = UnixListener::bind(path).map_err(io::Error::from)?;
        let socket_file = SocketFile::new(path)?;
        let nbd = Rc::clone(self);
        glommio::spawn_local(async move {
            let mut accepted = 0usize;
            while let Some(stream) = nbd.accept_until_stop(|| listener.accept()).await {
                let target = accepted % shards;
                accepted = accepted.wrapping_add(1);
                if target == nbd.shard.id() {
                    nbd.adopt(stream);
                } else {
                    nbd.hand_over(stream, target);
                }
            }
            // Moved into this task so that the file goes when the loop ends, not now.
            drop(listener);
            drop(socket_file);
        })
        .detach();
        Ok(())
    }

    /// Sends an accepted Unix connection to shard `target`, which serves it. The socket
    /// travels as an owned descriptor (a close-on-exec duplicate: this shard's stream closes
    /// its own), so it is closed, not leaked, if `target` cannot take it.
    fn hand_over(self: &Rc<Self>, stream: UnixStream, target: usize) {
        // SAFETY: the descriptor is open for the life of `stream`, which outlives the borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) }.try_clone_to_owned();
        drop(stream);
        let fd = match fd {
            Ok(fd) => fd,
            Err(e) => {
                log(format!("shard {}: hand a connection over: dup: {e}", self.shard.id()));
                return;
            }
        };
        let nbd = Rc::clone(self);
        glommio::spawn_local(async move {
            let handed = nbd
                .shard
                .run_on(target, move |_| async move {
                    // SAFETY: `fd` is a connected Unix stream socket whose ownership moves
                    // into the stream.
                    let stream = unsafe { UnixStream::from_raw_fd(fd.into_raw_fd()) };
                    if let Some(nbd) = NbdShard::current() {
                        nbd.adopt(stream);
                    }
                })
                .await;
            if let Err(e) = handed {
                log(format!("shard {}: hand a connection to shard {target}: {e}", nbd.shard.id()));
            }
        })
        .detach();
    }

    /// The next connection `accept` yields, until the server stops (`None`). Failed accepts
    /// are logged and retried after a pause.
    async fn accept_until_stop<S, F, Fut, E>(&self, mut accept: F) -> Option<S>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<S, E>>,
        E: std::fmt::Display,
    {
        loop {
            let stop = self.stop_changed.wait_for(|| self.stopping.get().then_some(()));
            let accepted = futures_lite::future::or(async { Some(accept().await) }, async {
                stop.await;
                None
            })
            .await;
            match accepted {
                None => return None,
                Some(_) if self.stopping.get() => return None,
                Some(Ok(stream)) => return Some(stream),
                Some(Err(e)) => {
                    log(format!("shard {}: accept failed: {e}", self.shard.id()));
                    // Out of descriptors, say: back off instead of spinning.
                    glommio::timer::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Serves a new connection on this shard, unless the server is stopping or the shard
    /// has its most connections already (the socket is closed then).
    fn adopt<S: Socket>(self: &Rc<Self>, stream: S) {
        if self.stopping.get() {
            return;
        }
        if self.connections.borrow().len() >= self.connections_max {
            log(format!(
                "shard {}: {} connections already: closing a new one",
                self.shard.id(),
                self.connections_max
            ));
            return;
        }
        let id = self.next_connection.get();
        self.next_connection.set(id + 1);
        self.connections.borrow_mut().insert(id, stream.as_raw_fd());
        glommio::spawn_local(Rc::clone(self).serve(id, stream)).detach();
    }

    /// One connection from handshake to close.
    async fn serve<S: Socket>(self: Rc<Self>, id: u64, mut stream: S) {
        let peer = stream.peer();
        // A client that stalls in the handshake must not hold a connection slot for ever; in
        // transmission an idle connection is normal (a VM's disk), so the limit goes away.
        let limit = self.handshake_timeout;
        let outcome = handshake::negotiate(&mut stream, &self.export, self.stopping(), limit).await;
        let end = match outcome {
            Outcome::Transmission => conn::transmit(Rc::clone(&self), stream).await,
            Outcome::Close(reason) => {
                drop(stream);
                reason.to_string()
            }
        };
        // The socket is closed by now; no await separates the close from forgetting its
        // descriptor, so begin_stop never shuts down a descriptor reused by another socket.
        self.connections.borrow_mut().remove(&id);
        self.connections_changed.notify_all();
        if !end.is_empty() {
            log(format!("shard {}: connection from {peer} closed: {end}", self.shard.id()));
        }
    }

    /// Stops accepting and shuts down the reading side of every connection: each one finishes
    /// and answers the requests it has, then closes.
    pub fn begin_stop(&self) {
        self.stopping.set(true);
        self.stop_changed.notify_all();
        for &fd in self.connections.borrow().values() {
            // SAFETY: shutdown(2) on a socket this shard owns and has not closed (closed
            // sockets leave the map before any other task can run).
            unsafe { libc::shutdown(fd, libc::SHUT_RD) };
        }
    }

    /// Waits until every connection closed, or `limit` passed; returns how many are left.
    pub async fn wait_connections(&self, limit: Duration) -> usize {
        let idle = self
            .connections_changed
            .wait_for(|| self.connections.borrow().is_empty().then_some(()));
        futures_lite::future::or(idle, glommio::timer::sleep(limit)).await;
        self.connections.borrow().len()
    }
}
