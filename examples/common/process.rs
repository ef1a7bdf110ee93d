//! A server binary run by an integration test, shared by the `corebuf-kv` and `corebuf-nbd`
//! test harnesses (each includes this file as its `process` module): spawned with piped
//! output, its stderr collected by a thread, started once it prints `listening on` on stdout,
//! and killed when dropped, so a failing test leaves no process behind.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a server may take to start or stop.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running server process.
pub struct Process {
    child: Option<Child>,
    stderr: Arc<Mutex<String>>,
    /// The thread that copies the server's stderr into `stderr`; [`Process::wait_exit`] joins
    /// it, so that after an exit `stderr` holds everything.
    stderr_reader: Option<JoinHandle<()>>,
}

impl Process {
    /// Spawns `cmd` and waits for the stdout line that says it listens; returns the process
    /// and what follows `listening on ` on that line. `Err(stderr)` if it exits first or
    /// does not listen within [`START_TIMEOUT`].
    pub fn start(cmd: &mut Command) -> Result<(Process, String), String> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stderr = Arc::new(Mutex::new(String::new()));
        let err_pipe = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&stderr);
        let stderr_reader = std::thread::spawn(move || {
            for line in BufReader::new(err_pipe).lines().map_while(Result::ok) {
                let mut s = sink.lock().expect("stderr log");
                s.push_str(&line);
                s.push('\n');
            }
        });
        let out_pipe = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out_pipe).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut process =
            Process { child: Some(child), stderr, stderr_reader: Some(stderr_reader) };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    if let Some(rest) = line.split("listening on ").nth(1) {
                        return Ok((process, rest.to_string()));
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = process.wait_exit(START_TIMEOUT);
                    return Err(format!("exited with {status:?}; stderr:\n{}", process.stderr()));
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "not listening after {START_TIMEOUT:?}; stderr:\n{}",
                    process.stderr()
                ));
            }
        }
    }

    /// What the server wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr log").clone()
    }

    /// What the server wrote to stderr, once it holds `text` (or after 5 s without). Lines the
    /// server wrote before it listened may still be on their way: a thread reads stderr, and
    /// the "listening" line came on stdout.
    pub fn stderr_with(&self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let stderr = self.stderr();
            if stderr.contains(text) || Instant::now() > deadline {
                return stderr;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits for the process to exit (killing it after `limit`); then `stderr` holds all it
    /// wrote.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                // Exited: its end of the pipe is closed, so the reader ends once it has read
                // everything.
                if let Some(reader) = self.stderr_reader.take() {
                    let _ = reader.join();
                }
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let status = child.wait().ok();
                self.child = None;
                panic!("the server did not exit within {limit:?} (killed: {status:?})");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for a clean exit (status 0, `stopped cleanly` on stderr) after a stop request;
    /// returns stderr.
    pub fn expect_clean_exit(&mut self, what: &str) -> String {
        let status = self.wait_exit(START_TIMEOUT).expect("an exit status");
        let log = self.stderr();
        assert!(status.success(), "{what}: exit status {status:?}; stderr:\n{log}");
        assert!(log.contains("stopped cleanly"), "{what}: stderr:\n{log}");
        log
    }

    /// Sends a signal (SIGTERM, SIGKILL, ...) to the process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.pid() as i32, sig) };
        assert_eq!(rc, 0, "kill({}, {sig})", self.pid());
    }

    /// SIGKILL, and reap the process.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        let status = self.wait_exit(START_TIMEOUT);
        assert!(status.is_some_and(|s| !s.success()));
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
