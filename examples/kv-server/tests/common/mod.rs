//! Test harness: starts the `corebuf-kv` binary on a free loopback port with a data file in a
//! scratch directory on a real file system, and speaks RESP to it with a small blocking client.
//! Every server is killed when its handle drops, so a failing test leaves no process behind.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[path = "../../../common/process.rs"]
mod process;
pub use process::Process;

/// A scratch directory under the target directory (never a tmpfs `/tmp`: O_DIRECT needs a
/// real file system), removed when dropped.
pub fn scratch(name: &str) -> tempfile::TempDir {
    let parent = Path::new(env!("CARGO_TARGET_TMPDIR")).join("corebuf-kv-tests");
    std::fs::create_dir_all(&parent).expect("create the scratch parent");
    tempfile::Builder::new().prefix(name).tempdir_in(parent).expect("create a scratch dir")
}

/// A running `corebuf-kv` (the process helpers, `stderr`, `stderr_with`, `wait_exit`,
/// `signal`..., come from [`Process`]).
pub struct Server {
    process: Process,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its data file.
    pub path: PathBuf,
}

impl std::ops::Deref for Server {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.process
    }
}

impl std::ops::DerefMut for Server {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}

impl Server {
    /// Starts a server on `path` with `args` (plus `--port 0 --path PATH`); panics on failure.
    pub fn start(path: &Path, args: &[&str]) -> Server {
        match Server::try_start(path, args) {
            Ok(server) => server,
            Err(e) => panic!("the server did not start: {e}"),
        }
    }

    /// Starts a server; `Err(stderr)` if it exits before listening.
    pub fn try_start(path: &Path, args: &[&str]) -> Result<Server, String> {
        Server::try_start_on(path, 0, args)
    }

    /// Starts a server on 127.0.0.1:`port` (0: any free port); `Err(stderr)` if it exits
    /// before listening.
    pub fn try_start_on(path: &Path, port: u16, args: &[&str]) -> Result<Server, String> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_corebuf-kv"));
        cmd.arg("--path").arg(path);
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"]).args(args);
        let (process, listening) = Process::start(&mut cmd)?;
        let port = listening.strip_prefix("127.0.0.1:").and_then(|r| r.split_whitespace().next());
        let port = port.and_then(|p| p.parse().ok()).expect("a port number");
        Ok(Server { process, port, path: path.to_path_buf() })
    }

    /// A new connection.
    pub fn client(&self) -> Client {
        Client::connect(self.port)
    }

    /// Sends SHUTDOWN and waits for a clean exit.
    pub fn shutdown(mut self) -> String {
        let mut c = self.client();
        c.send_raw(b"*1\r\n$8\r\nSHUTDOWN\r\n");
        self.expect_clean_exit("SHUTDOWN")
    }

    /// SIGKILL, and reap the process.
    pub fn kill9(mut self) {
        self.process.kill9();
    }
}

/// A RESP2 reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `+...`
    Simple(String),
    /// `-...`
    Error(String),
    /// `:n`
    Int(i64),
    /// `$...` (None for the null bulk string)
    Bulk(Option<Vec<u8>>),
    /// `*...`
    Array(Vec<Reply>),
}

impl Reply {
    /// The bulk bytes, panicking otherwise.
    pub fn bytes(&self) -> Option<Vec<u8>> {
        match self {
            Reply::Bulk(b) => b.clone(),
            other => panic!("expected a bulk reply, got {other:?}"),
        }
    }

    /// Whether this is an error containing `text`.
    pub fn is_error_with(&self, text: &str) -> bool {
        matches!(self, Reply::Error(e) if e.contains(text))
    }
}

/// Shorthand for a simple-string reply.
pub fn ok() -> Reply {
    Reply::Simple("OK".into())
}

/// Shorthand for a bulk reply.
pub fn bulk(b: impl AsRef<[u8]>) -> Reply {
    Reply::Bulk(Some(b.as_ref().to_vec()))
}

/// Encodes a command as a RESP multibulk.
pub fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A blocking RESP client.
pub struct Client {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Client {
    /// Connects to 127.0.0.1:`port`.
    pub fn connect(port: u16) -> Client {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
        stream.set_nodelay(true).expect("nodelay");
        let reader = BufReader::new(stream.try_clone().expect("clone"));
        Client { stream, reader }
    }

    /// Sends raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    /// Sends raw bytes, reporting errors.
    pub fn try_send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads one reply.
    pub fn read_reply(&mut self) -> Reply {
        self.try_read_reply().expect("read a reply")
    }

    /// Reads one reply, or the I/O error (a closed connection is `UnexpectedEof`).
    pub fn try_read_reply(&mut self) -> std::io::Result<Reply> {
        let mut line = Vec::new();
        self.reader.read_until(b'\n', &mut line)?;
        if line.len() < 3 || !line.ends_with(b"\r\n") {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed"));
        }
        let text = String::from_utf8_lossy(&line[1..line.len() - 2]).into_owned();
        let bad =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
        Ok(match line[0] {
            b'+' => Reply::Simple(text),
            b'-' => Reply::Error(text),
            b':' => Reply::Int(text.parse().map_err(|_| bad("integer"))?),
            b'$' => {
                let n: i64 = text.parse().map_err(|_| bad("bulk length"))?;
                if n < 0 {
                    Reply::Bulk(None)
                } else {
                    let mut data = vec![0u8; n as usize + 2];
                    self.reader.read_exact(&mut data)?;
                    data.truncate(n as usize);
                    Reply::Bulk(Some(data))
                }
            }
            b'*' => {
                let n: i64 = text.parse().map_err(|_| bad("array length"))?;
                let mut items = Vec::new();
                for _ in 0..n.max(0) {
                    items.push(self.try_read_reply()?);
                }
                Reply::Array(items)
            }
            _ => return Err(bad("reply type")),
        })
    }

    /// Sends one command and reads its reply.
    pub fn cmd(&mut self, args: &[&[u8]]) -> Reply {
        self.send_raw(&encode(args));
        self.read_reply()
    }

    /// [`Client::cmd`] with string arguments.
    pub fn cmds(&mut self, args: &[&str]) -> Reply {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.cmd(&args)
    }

    /// Sends many commands in one write, then reads every reply.
    pub fn pipeline(&mut self, commands: &[Vec<Vec<u8>>]) -> Vec<Reply> {
        let mut out = Vec::new();
        for c in commands {
            let args: Vec<&[u8]> = c.iter().map(Vec::as_slice).collect();
            out.extend_from_slice(&encode(&args));
        }
        self.send_raw(&out);
        commands.iter().map(|_| self.read_reply()).collect()
    }

    /// Whether the server closed the connection (reads EOF within a few seconds).
    pub fn is_closed(&mut self) -> bool {
        self.stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut byte = [0u8; 1];
        loop {
            match self.reader.read(&mut byte) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

/// A deterministic value of `len` bytes derived from `seed` (recognisable if misplaced).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b'a' + (x % 26) as u8
        })
        .collect()
}

/// An integer field of an INFO reply.
pub fn info_field(info: &Reply, field: &str) -> u64 {
    let text = String::from_utf8(info.bytes().expect("INFO text")).expect("utf-8");
    let prefix = format!("{field}:");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {field} in INFO:\n{text}"))
        .trim()
        .parse()
        .expect("an integer field")
}

/// `n` distinct ports that were free a moment ago on 127.0.0.1 (bound to port 0 together,
/// then released), for servers that must know each other's port before they start. A port
/// is handed out once per test process: tests run in parallel, and two servers given the same
/// port before either listens would share it (SO_REUSEPORT) without noticing.
pub fn free_ports(n: usize) -> Vec<u16> {
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().expect("the port list");
    let mut held = Vec::new();
    let mut ports = Vec::new();
    while ports.len() < n {
        assert!(held.len() < 1000, "no free loopback ports left");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        let port = listener.local_addr().expect("local address").port();
        held.push(listener); // held until all are chosen: no port twice in this call
        if !handed_out.contains(&port) {
            handed_out.push(port);
            ports.push(port);
        }
    }
    ports
}

/// The path of an outside program (searched on PATH, then in the sbin directories where
/// Debian puts daemons such as nutcracker), or `None` after printing why the caller skips.
pub fn outside_tool(name: &str, why: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Some(candidate);
        }
    }
    eprintln!(
        "SKIPPED {why}: {name} is not installed (examples/kv-server/scripts/install-clients.sh \
         installs it)"
    );
    None
}

/// Three plain nodes, or the three nodes of a cluster (`--cluster-nodes` listing all three in
/// port order), on free loopback ports, each with `shards` shards and an 8 MiB data file in
/// `dir`. Returns the nodes and their ports.
pub fn three_nodes(dir: &Path, cluster: bool, shards: usize) -> (Vec<Server>, Vec<u16>) {
    let ports = free_ports(3);
    let list: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let list = list.join(",");
    let shards = shards.to_string();
    let nodes = ports
        .iter()
        .map(|&port| {
            let mut args = vec!["--size", "8M", "--shards", &shards, "--cache-bytes", "2M"];
            if cluster {
                args.extend(["--cluster-nodes", &list]);
            }
            Server::try_start_on(&dir.join(format!("node-{port}")), port, &args)
                .unwrap_or_else(|e| panic!("node {port} did not start: {e}"))
        })
        .collect();
    (nodes, ports)
}

/// Free pool blocks and loaded ranges (INFO storage).
pub fn free_and_loaded(c: &mut Client) -> (u64, u64) {
    let info = c.cmds(&["INFO", "storage"]);
    let loaded = info_field(&info, "ranges_loaded_trusted")
        + info_field(&info, "ranges_loaded_fresh")
        + info_field(&info, "ranges_rebuilt");
    (info_field(&info, "free_blocks_in_loaded_ranges"), loaded)
}

/// Waits until every loaded range's pool (191 blocks each) is free again (frees wait for a
/// barrier, which the server runs within a second or so when any are pending); panics with
/// `what` after 20 s.
pub fn wait_all_free(c: &mut Client, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (free, loaded) = free_and_loaded(c);
        if free == loaded * 191 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {free} blocks free of {} after 20 s",
            loaded * 191
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
