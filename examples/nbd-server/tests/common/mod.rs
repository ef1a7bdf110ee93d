//! Test harness: starts the `corebuf-nbd` binary on a free loopback port (or a Unix-domain
//! socket) with a data file in a scratch directory on a real file system, finds the client
//! tools, and speaks NBD itself with a small blocking client over either. Every server is
//! killed when its handle drops, so a failing test leaves no process behind.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

#[path = "../../../common/process.rs"]
mod process;
pub use process::Process;

/// A scratch directory under the target directory (never a tmpfs `/tmp`: O_DIRECT needs a
/// real file system), removed when dropped.
pub fn scratch(name: &str) -> tempfile::TempDir {
    let parent = Path::new(env!("CARGO_TARGET_TMPDIR")).join("corebuf-nbd-tests");
    std::fs::create_dir_all(&parent).expect("create the scratch parent");
    tempfile::Builder::new().prefix(name).tempdir_in(parent).expect("create a scratch dir")
}

/// The path of `tool` if it is installed; otherwise prints why the calling test skips.
pub fn tool(tool: &str, test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths).map(|dir| dir.join(tool)).find(|p| p.is_file())
    });
    if found.is_none() {
        // Straight to the stderr descriptor: libtest captures `eprintln!` of passing tests,
        // and a skip must be seen.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: `{tool}` is not installed (run \
             examples/nbd-server/scripts/install-clients.sh as root)"
        );
    }
    found
}

/// Runs a command to completion; panics with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{shown}: {e}"));
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{shown} failed with {:?}:\n{text}", out.status);
    text
}

/// A running `corebuf-nbd` (the process helpers, `stderr`, `wait_exit`, `signal`..., come
/// from [`Process`]).
pub struct Server {
    process: Process,
    /// Its port on 127.0.0.1 (0 for a server on a Unix socket).
    pub port: u16,
    /// Its Unix-domain socket, for a server started with [`Server::start_unix`].
    pub socket: Option<PathBuf>,
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
        let at = ["--port".to_string(), port.to_string(), "--bind".into(), "127.0.0.1".into()];
        Server::launch(path, &at, args)
    }

    /// Starts a server listening on the Unix socket `socket`; panics on failure.
    pub fn start_unix(path: &Path, socket: &Path, args: &[&str]) -> Server {
        Server::try_start_unix(path, socket, args)
            .unwrap_or_else(|e| panic!("the server did not start: {e}"))
    }

    /// Starts a server on the Unix socket `socket`; `Err(stderr)` if it exits before
    /// listening.
    pub fn try_start_unix(path: &Path, socket: &Path, args: &[&str]) -> Result<Server, String> {
        let at = ["--unix".to_string(), socket.display().to_string()];
        Server::launch(path, &at, args)
    }

    /// Starts the server with `--path path`, the listening options `at` and `args`.
    fn launch(path: &Path, at: &[String], args: &[&str]) -> Result<Server, String> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_corebuf-nbd"));
        cmd.arg("--path").arg(path).args(at).args(args);
        let (process, listening) = Process::start(&mut cmd)?;
        let mut server = Server { process, port: 0, socket: None, path: path.to_path_buf() };
        if let Some(rest) = listening.strip_prefix("unix:") {
            let socket = rest.split(" (export").next().unwrap_or("");
            server.socket = Some(PathBuf::from(socket));
        } else {
            let port = listening.strip_prefix("127.0.0.1:").and_then(|r| r.split(' ').next());
            server.port = port.and_then(|p| p.parse().ok()).expect("a port number");
        }
        Ok(server)
    }

    /// The export's URI for libnbd tools and fio (`nbd+unix://` for a Unix socket).
    pub fn uri(&self) -> String {
        match &self.socket {
            Some(socket) => format!("nbd+unix:///corebuf?socket={}", socket.display()),
            None => format!("nbd://127.0.0.1:{}/corebuf", self.port),
        }
    }

    /// SIGTERM, and a clean exit.
    pub fn stop(mut self) -> String {
        self.signal(libc::SIGTERM);
        self.expect_clean_exit("SIGTERM")
    }

    /// SIGKILL, and reap the process.
    pub fn kill9(mut self) {
        self.process.kill9();
    }
}

/// Deterministic pseudo-random bytes (xorshift), different for every seed.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

// The NBD constants the tests use (values from the protocol document).
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const FLAG_FUA: u16 = 1;
pub const EPERM: u32 = 1;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

/// A blocking NBD client speaking the protocol byte by byte, over TCP or a Unix socket.
pub struct Nbd<S = TcpStream> {
    /// The socket.
    pub stream: S,
    /// The export size from the handshake.
    pub size: u64,
    /// The transmission flags from the handshake.
    pub flags: u16,
}

/// One option reply: (option, reply type, data).
pub type OptionReply = (u32, u32, Vec<u8>);

/// A client socket: TCP or Unix-domain.
pub trait Socket: Read + Write {
    /// Limits each blocking read.
    fn read_limit(&self, limit: Duration);
}

impl Socket for TcpStream {
    fn read_limit(&self, limit: Duration) {
        self.set_read_timeout(Some(limit)).expect("timeout");
    }
}

impl Socket for UnixStream {
    fn read_limit(&self, limit: Duration) {
        self.set_read_timeout(Some(limit)).expect("timeout");
    }
}

impl Nbd<TcpStream> {
    /// Connects and reads the greeting; returns the socket ready for client flags.
    pub fn greet(port: u16) -> TcpStream {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        Nbd::read_greeting(stream)
    }

    /// Connects with `NBD_OPT_GO` on the default export and enters transmission.
    pub fn connect(port: u16) -> Nbd {
        Nbd::go(Nbd::greet(port))
    }
}

impl Nbd<UnixStream> {
    /// Connects to the Unix socket `path` and reads the greeting.
    pub fn greet_unix(path: &Path) -> UnixStream {
        Nbd::read_greeting(UnixStream::connect(path).expect("connect"))
    }

    /// Connects to the Unix socket `path` with `NBD_OPT_GO` on the default export.
    pub fn connect_unix(path: &Path) -> Nbd<UnixStream> {
        Nbd::go(Nbd::greet_unix(path))
    }
}

impl<S: Socket> Nbd<S> {
    /// Reads and checks the greeting on a new connection.
    pub fn read_greeting(mut stream: S) -> S {
        stream.read_limit(Duration::from_secs(60));
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting).expect("greeting");
        assert_eq!(u64::from_be_bytes(greeting[0..8].try_into().expect("8")), NBD_MAGIC);
        assert_eq!(u64::from_be_bytes(greeting[8..16].try_into().expect("8")), IHAVEOPT);
        assert_eq!(u16::from_be_bytes([greeting[16], greeting[17]]) & 1, 1, "fixed newstyle");
        stream
    }

    /// Sends one option.
    pub fn send_option(stream: &mut S, option: u32, data: &[u8]) {
        let mut msg = IHAVEOPT.to_be_bytes().to_vec();
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(data);
        stream.write_all(&msg).expect("send an option");
    }

    /// Reads one option reply.
    pub fn read_option_reply(stream: &mut S) -> std::io::Result<OptionReply> {
        let mut header = [0u8; 20];
        stream.read_exact(&mut header)?;
        assert_eq!(u64::from_be_bytes(header[0..8].try_into().expect("8")), OPTION_REPLY_MAGIC);
        let option = u32::from_be_bytes(header[8..12].try_into().expect("4"));
        let reply = u32::from_be_bytes(header[12..16].try_into().expect("4"));
        let len = u32::from_be_bytes(header[16..20].try_into().expect("4"));
        let mut data = vec![0u8; len as usize];
        stream.read_exact(&mut data)?;
        Ok((option, reply, data))
    }

    /// Sends `NBD_OPT_GO` for the default export on a greeted connection and enters
    /// transmission.
    pub fn go(mut stream: S) -> Nbd<S> {
        stream.write_all(&3u32.to_be_bytes()).expect("client flags");
        Nbd::send_option(&mut stream, OPT_GO, &go_data("", &[]));
        let (mut size, mut flags) = (None, 0);
        loop {
            let (option, reply, data) = Nbd::read_option_reply(&mut stream).expect("GO reply");
            assert_eq!(option, OPT_GO);
            match reply {
                REP_INFO if u16::from_be_bytes([data[0], data[1]]) == 0 => {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().expect("8")));
                    flags = u16::from_be_bytes([data[10], data[11]]);
                }
                REP_INFO => {}
                REP_ACK => break,
                other => panic!("GO failed with reply {other:#x}"),
            }
        }
        Nbd { stream, size: size.expect("NBD_INFO_EXPORT before ACK"), flags }
    }

    /// Sends a request header (and payload).
    pub fn send(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32, data: &[u8]) {
        let mut msg = Vec::with_capacity(28 + data.len());
        msg.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        msg.extend_from_slice(&flags.to_be_bytes());
        msg.extend_from_slice(&kind.to_be_bytes());
        msg.extend_from_slice(&cookie.to_be_bytes());
        msg.extend_from_slice(&offset.to_be_bytes());
        msg.extend_from_slice(&len.to_be_bytes());
        msg.extend_from_slice(data);
        self.stream.write_all(&msg).expect("send a request");
    }

    /// Reads one simple reply header: (error, cookie).
    pub fn reply(&mut self) -> std::io::Result<(u32, u64)> {
        let mut header = [0u8; 16];
        self.stream.read_exact(&mut header)?;
        assert_eq!(u32::from_be_bytes(header[0..4].try_into().expect("4")), SIMPLE_REPLY_MAGIC);
        Ok((
            u32::from_be_bytes(header[4..8].try_into().expect("4")),
            u64::from_be_bytes(header[8..16].try_into().expect("8")),
        ))
    }

    /// Reads `len` bytes at `offset`: the data, or the error value.
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.send(CMD_READ, 0, 1, offset, len, &[]);
        let (error, cookie) = self.reply().expect("read reply");
        assert_eq!(cookie, 1);
        if error != 0 {
            return Err(error);
        }
        let mut data = vec![0u8; len as usize];
        self.stream.read_exact(&mut data).expect("read data");
        Ok(data)
    }

    /// Writes `data` at `offset` with `flags`; returns the reply's error value.
    pub fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> u32 {
        self.send(CMD_WRITE, flags, 2, offset, data.len() as u32, data);
        let (error, cookie) = self.reply().expect("write reply");
        assert_eq!(cookie, 2);
        error
    }

    /// A command without payload (flush, trim, write zeroes); returns the error value.
    pub fn command(&mut self, kind: u16, flags: u16, offset: u64, len: u32) -> u32 {
        self.send(kind, flags, 3, offset, len, &[]);
        let (error, cookie) = self.reply().expect("reply");
        assert_eq!(cookie, 3);
        error
    }

    /// Whether the server closed the connection (EOF within a few seconds).
    pub fn is_closed(&mut self) -> bool {
        is_closed(&mut self.stream)
    }
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO` data for `name` with `requests`.
pub fn go_data(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        data.extend_from_slice(&r.to_be_bytes());
    }
    data
}

/// Whether the peer closed `stream` (EOF or reset within a few seconds).
pub fn is_closed<S: Socket>(stream: &mut S) -> bool {
    stream.read_limit(Duration::from_secs(10));
    let mut byte = [0u8; 256];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}
