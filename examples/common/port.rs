//! The listening port's (or socket's) start-up check and address formatting, shared by
//! `corebuf-kv` and `corebuf-nbd` (each includes this file as its `port` module).

use std::io::Write;
use std::time::{Duration, Instant};

/// How long a probe waits for a server it connected to to answer.
const PROBE_ANSWER_WAIT: Duration = Duration::from_millis(300);
/// How long a probe waits for a listener that does not answer to go away.
const PROBE_SILENT_WAIT: Duration = Duration::from_secs(3);

/// Fails if a server already listens on `bind:port`. A plain test bind would not do: the
/// TIME_WAIT connections a previous run leaves on the port make it fail, while the
/// SO_REUSEPORT listeners themselves bind fine. So it connects: refused means the port is free.
/// The rest is [`wait_out_listener`]'s.
pub fn probe_port(bind: &str, port: u16, hello: &[u8]) -> Result<(), String> {
    use std::net::ToSocketAddrs;
    if port == 0 {
        return Ok(());
    }
    let host = match bind {
        "0.0.0.0" => "127.0.0.1",
        "::" | "[::]" => "::1",
        other => other.trim_start_matches('[').trim_end_matches(']'),
    };
    let addrs =
        (host, port).to_socket_addrs().map_err(|e| format!("address {bind}:{port}: {e}"))?;
    for addr in addrs {
        let connect = || std::net::TcpStream::connect_timeout(&addr, PROBE_ANSWER_WAIT).ok();
        wait_out_listener(&format!("{bind}:{port}"), connect, hello)?;
    }
    Ok(())
}

/// A socket [`wait_out_listener`] probes with.
pub trait ProbeSocket: std::io::Read + Write {
    /// Limits each read.
    fn read_limit(&self, limit: Duration);
}

impl ProbeSocket for std::net::TcpStream {
    fn read_limit(&self, limit: Duration) {
        let _ = self.set_read_timeout(Some(limit));
    }
}

impl ProbeSocket for std::os::unix::net::UnixStream {
    fn read_limit(&self, limit: Duration) {
        let _ = self.set_read_timeout(Some(limit));
    }
}

/// Fails if a live server listens where `connect` connects (`what`, for the message);
/// `connect` returning `None` (refused) means nobody does. A live server answers `hello` (or
/// greets unasked, as an NBD server does: `hello` empty) within [`PROBE_ANSWER_WAIT`]. A
/// listener that accepts the connection but never answers is what a server killed a moment
/// ago leaves: its listening sockets outlive the process for a few milliseconds (glommio's
/// rings hold them until the kernel tears the rings down; `ss -lnp` shows them owned by no
/// process), so the probe tries again until they are gone, for at most [`PROBE_SILENT_WAIT`].
pub fn wait_out_listener<S: ProbeSocket>(
    what: &str,
    mut connect: impl FnMut() -> Option<S>,
    hello: &[u8],
) -> Result<(), String> {
    let give_up = Instant::now() + PROBE_SILENT_WAIT;
    while let Some(stream) = connect() {
        if answers(stream, hello) {
            return Err(format!("cannot listen on {what}: another process is listening there"));
        }
        if Instant::now() >= give_up {
            return Err(format!(
                "cannot listen on {what}: a listener that does not answer holds it (still \
                 there after {PROBE_SILENT_WAIT:?})"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Whether the peer of `stream` sends anything within [`PROBE_ANSWER_WAIT`] after `hello`.
fn answers<S: ProbeSocket>(mut stream: S, hello: &[u8]) -> bool {
    stream.read_limit(PROBE_ANSWER_WAIT);
    if stream.write_all(hello).is_err() {
        return false;
    }
    matches!(stream.read(&mut [0u8; 64]), Ok(n) if n > 0)
}

/// `host:port`, with an IPv6 host in brackets.
pub fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn a_port_nobody_listens_on_passes_the_probe() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        assert_eq!(probe_port("127.0.0.1", port, b"PING\r\n"), Ok(()));
    }

    /// A server on a port answers `answer` to `hello` (nothing: it greets unasked): refused.
    fn refused_where_a_server_answers(hello: &'static [u8], answer: &'static [u8]) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            conn.write_all(answer).unwrap();
            conn
        });
        let err = probe_port("127.0.0.1", port, hello).unwrap_err();
        assert!(err.contains("another process is listening there"), "{err}");
        drop(server.join().unwrap());
    }

    /// A listener that accepts and never answers goes after 400 ms: the probe waits it out.
    fn silent_listener_waited_out(hello: &[u8]) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let start = Instant::now();
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(400));
            drop(listener);
        });
        assert_eq!(probe_port("127.0.0.1", port, hello), Ok(()));
        assert!(start.elapsed() >= Duration::from_millis(400), "the probe did not wait");
        closer.join().unwrap();
    }

    #[test]
    fn a_port_where_a_server_answers_is_refused() {
        refused_where_a_server_answers(b"PING\r\n", b"+PONG\r\n");
    }

    /// What a server killed a moment ago leaves: listening sockets that accept connections
    /// (in the kernel's backlog) and answer nothing, then go away.
    #[test]
    fn a_listener_that_never_answers_is_waited_out_until_it_goes() {
        silent_listener_waited_out(b"PING\r\n");
    }

    #[test]
    fn a_listener_that_stays_silent_is_refused_after_the_wait() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let err = probe_port("127.0.0.1", port, b"PING\r\n").unwrap_err();
        assert!(err.contains("does not answer"), "{err}");
        drop(listener);
    }

    /// An NBD server speaks first: the probe sends nothing and reads its greeting.
    #[test]
    fn a_port_where_a_server_greets_unasked_is_refused() {
        refused_where_a_server_answers(&[], b"NBDMAGICIHAVEOPT\x00\x03");
    }

    #[test]
    fn a_listener_that_never_greets_is_waited_out_until_it_goes() {
        silent_listener_waited_out(&[]);
    }

    /// A Unix socket's listener is waited out the same way: a killed server's socket that
    /// still accepts and never greets, until it goes; a server that greets is refused.
    #[test]
    fn a_unix_listener_is_waited_out_or_refused_as_a_port_is() {
        use std::os::unix::net::{UnixListener, UnixStream};
        let dir = std::env::temp_dir().join(format!("corebuf-port-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("probe.sock");
        let _ = std::fs::remove_file(&path);
        let connect = || UnixStream::connect(&path).ok();

        let listener = UnixListener::bind(&path).unwrap();
        let start = Instant::now();
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(400));
            drop(listener);
        });
        assert_eq!(wait_out_listener("probe.sock", connect, &[]), Ok(()));
        assert!(start.elapsed() >= Duration::from_millis(400), "the probe did not wait");
        closer.join().unwrap();

        std::fs::remove_file(&path).unwrap();
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            conn.write_all(b"NBDMAGICIHAVEOPT\x00\x03").unwrap();
            conn
        });
        let err = wait_out_listener("probe.sock", connect, &[]).unwrap_err();
        assert!(err.contains("another process is listening there"), "{err}");
        drop(server.join().unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
