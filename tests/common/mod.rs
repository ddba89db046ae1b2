//! Shared helpers for the integration suites: real `postern` processes on
//! loopback, their logs, and the target servers and clients around them.
//!
//! ```text
//!  test client ─tcp─▶ agent process ══HTTP══▶ station process ─tcp─▶ Server (this process)
//!      │                  │ stderr                 │ stderr
//!      └─ hashes          └──────── Lines ◀────────┘  (wait_for a line, count lines)
//! ```
//!
//! Every wait here has a deadline and fails with a message that says what
//! was awaited and shows the logs; nothing sleeps to "let things settle".
//! Processes are killed when their [`Proc`] guard drops, temp dirs removed
//! when their [`TempDir`] drops, listeners closed when their [`Server`] drops.
//!
//! Each suite uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use postern::demo::{Digest, Pattern};
use postern::keys::{PrivateKey, PublicKey};

/// The binary under test, built by cargo for the integration tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_postern");

/// Longest wait for a process to print a line we expect (startup, a
/// session, a log line after an event). Generous: the machine is shared
/// and may be busy compiling.
pub const LOG_WAIT: Duration = Duration::from_secs(30);

/// Longest a socket operation may make no progress before the test fails.
pub const IO_STALL: Duration = Duration::from_secs(60);

/// Bytes per write of the test clients and servers.
const CHUNK: usize = 64 * 1024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Polls `done` until it holds or `limit` passes. For conditions that have
/// no wakeup to wait on (a child's exit, a counter in another thread); the
/// poll interval is short and the deadline is the bound.
pub fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------
// Temp dirs.

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "postern-test-{label}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create temp dir {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `text` to `name` in this dir and returns the full path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path.join(name);
        std::fs::write(&path, text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------
// Output of child processes.

#[derive(Default)]
struct LinesState {
    lines: Vec<String>,
    /// The pipe reached end of file: the process closed it or exited.
    closed: bool,
}

/// The lines a child wrote to one pipe, collected by a thread as they come.
#[derive(Clone, Default)]
pub struct Lines(Arc<(Mutex<LinesState>, Condvar)>);

impl Lines {
    fn collect(pipe: impl Read + Send + 'static) -> Lines {
        let lines = Lines::default();
        let sink = lines.clone();
        thread::spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&line).trim_end().to_owned();
                        let (state, changed) = &*sink.0;
                        lock(state).lines.push(text);
                        changed.notify_all();
                    }
                }
            }
            let (state, changed) = &*sink.0;
            lock(state).closed = true;
            changed.notify_all();
        });
        lines
    }

    pub fn snapshot(&self) -> Vec<String> {
        lock(&self.0 .0).lines.clone()
    }

    /// Everything so far, one line each, for failure messages.
    pub fn text(&self) -> String {
        self.snapshot().join("\n")
    }

    /// How many lines so far contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        lock(&self.0 .0).lines.iter().filter(|l| l.contains(needle)).count()
    }

    /// Lines so far that contain every one of `needles`.
    pub fn matching(&self, needles: &[&str]) -> Vec<String> {
        lock(&self.0 .0)
            .lines
            .iter()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .cloned()
            .collect()
    }

    /// Waits until at least `n` lines contain every one of `needles`, and
    /// returns the `n`th. Panics after `limit` saying what was awaited.
    pub fn wait_for_nth(&self, who: &str, needles: &[&str], n: usize, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        let (state, changed) = &*self.0;
        let mut guard = lock(state);
        loop {
            let found: Vec<&String> =
                guard.lines.iter().filter(|l| needles.iter().all(|x| l.contains(x))).collect();
            if found.len() >= n {
                return found[n - 1].clone();
            }
            let now = Instant::now();
            if now >= deadline || guard.closed {
                let why = if guard.closed { "it closed its output" } else { "timed out" };
                panic!(
                    "{why} after {:?} waiting for line #{n} of {who} containing {needles:?}; \
                     its output so far:\n{}",
                    limit - deadline.saturating_duration_since(now),
                    guard.lines.join("\n")
                );
            }
            guard = changed
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    /// Waits for the first line containing every one of `needles`.
    pub fn wait_for(&self, who: &str, needles: &[&str], limit: Duration) -> String {
        self.wait_for_nth(who, needles, 1, limit)
    }

    /// Waits until the pipe closes (the process exited or closed it).
    pub fn wait_closed(&self, who: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        let (state, changed) = &*self.0;
        let mut guard = lock(state);
        while !guard.closed {
            let now = Instant::now();
            assert!(now < deadline, "timed out after {limit:?} waiting for {who} to close");
            guard = changed
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }
}

// ---------------------------------------------------------------------------
// Child processes.

/// A running `postern` process, killed on drop.
pub struct Proc {
    name: String,
    child: Child,
    pub stdout: Lines,
    pub stderr: Lines,
}

/// Peak and current resident memory of a process, from /proc/PID/status.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    /// VmHWM: the most the process has ever had resident.
    pub peak_kib: u64,
    /// VmRSS: resident now.
    pub now_kib: u64,
}

impl Proc {
    /// Starts `postern ARGS` with no stdin and a clean environment for
    /// what postern reads (no proxy, no log override).
    pub fn spawn(name: &str, args: &[&str]) -> Proc {
        Self::spawn_with(name, args, None)
    }

    /// As [`Proc::spawn`], writing `stdin` to the child and closing it.
    pub fn spawn_with(name: &str, args: &[&str], stdin: Option<&str>) -> Proc {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for var in ["POSTERN_LOG", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"] {
            command.env_remove(var);
        }
        let mut child =
            command.spawn().unwrap_or_else(|e| panic!("cannot start {BIN} for {name}: {e}"));
        if let Some(text) = stdin {
            let mut pipe = child.stdin.take().expect("stdin was requested piped");
            pipe.write_all(text.as_bytes())
                .unwrap_or_else(|e| panic!("cannot write stdin of {name}: {e}"));
        }
        let stdout = Lines::collect(child.stdout.take().expect("stdout was requested piped"));
        let stderr = Lines::collect(child.stderr.take().expect("stderr was requested piped"));
        Proc { name: name.to_owned(), child, stdout, stderr }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a line on stderr containing every one of `needles`.
    pub fn wait_log(&self, needles: &[&str]) -> String {
        self.stderr.wait_for(&format!("{} stderr", self.name), needles, LOG_WAIT)
    }

    /// Waits for the `n`th such line.
    pub fn wait_log_nth(&self, needles: &[&str], n: usize, limit: Duration) -> String {
        self.stderr.wait_for_nth(&format!("{} stderr", self.name), needles, n, limit)
    }

    /// Waits for the process to exit and for both pipes to be read to the end.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(e) => panic!("cannot wait for {}: {e}", self.name),
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {limit:?}; stderr so far:\n{}",
                self.name,
                self.stderr.text()
            );
            thread::sleep(Duration::from_millis(10));
        };
        let rest = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(5));
        self.stdout.wait_closed(&format!("{} stdout", self.name), rest);
        self.stderr.wait_closed(&format!("{} stderr", self.name), rest);
        status
    }

    /// Resident memory now and at its peak.
    pub fn memory(&self) -> Memory {
        let path = format!("/proc/{}/status", self.pid());
        let status = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {path} of {}: {e}", self.name));
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or_else(|| panic!("no {name} in {path}:\n{status}"))
        };
        Memory { peak_kib: field("VmHWM:"), now_kib: field("VmRSS:") }
    }

    /// Both logs, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "--- {} stderr ---\n{}\n--- {} stdout ---\n{}",
            self.name,
            self.stderr.text(),
            self.name,
            self.stdout.text()
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a finished one-shot command printed.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `postern ARGS` to completion (bounded) and returns what it printed.
pub fn run(args: &[&str], stdin: Option<&str>, limit: Duration) -> Output {
    let mut proc = Proc::spawn_with(&format!("postern {}", args.join(" ")), args, stdin);
    let status = proc.wait_exit(limit);
    let join = |lines: &Lines| {
        let mut text = lines.snapshot().join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        text
    };
    Output { status, stdout: join(&proc.stdout), stderr: join(&proc.stderr) }
}

// ---------------------------------------------------------------------------
// Configs.

/// A station key and one device key, fresh for each test.
pub struct Keys {
    pub station: PrivateKey,
    pub device: PrivateKey,
}

impl Keys {
    pub fn new() -> Keys {
        Keys { station: PrivateKey::generate(), device: PrivateKey::generate() }
    }
}

/// `station.toml` listening on an ephemeral loopback port.
pub fn station_toml(
    key: &PrivateKey,
    targets: &[(&str, String)],
    devices: &[(&str, PublicKey, &[&str])],
) -> String {
    let mut text = format!("listen = \"127.0.0.1:0\"\nprivate_key = \"{}\"\n", key.to_base64());
    text.push_str("\n[targets]\n");
    for (name, address) in targets {
        text.push_str(&format!("{name} = \"{address}\"\n"));
    }
    for (name, public_key, allow) in devices {
        let allow: Vec<String> = allow.iter().map(|a| format!("\"{a}\"")).collect();
        text.push_str(&format!(
            "\n[[devices]]\nname = \"{name}\"\npublic_key = \"{}\"\nallow = [{}]\n",
            public_key.to_base64(),
            allow.join(", ")
        ));
    }
    text
}

/// `agent.toml` with one ephemeral loopback forward per target name.
pub fn agent_toml(
    station: SocketAddr,
    station_key: &PublicKey,
    key: &PrivateKey,
    carrier: &str,
    forwards: &[&str],
) -> String {
    let mut text = format!(
        "station = \"http://{station}/\"\nstation_public_key = \"{}\"\nprivate_key = \"{}\"\n\
         carrier = \"{carrier}\"\n",
        station_key.to_base64(),
        key.to_base64()
    );
    for target in forwards {
        text.push_str(&format!("\n[[forward]]\nlisten = \"127.0.0.1:0\"\ntarget = \"{target}\"\n"));
    }
    text
}

/// Starts a station from `toml` and returns it with its carrier address,
/// parsed from `station listening on ADDR (HTTP carrier)`.
pub fn start_station(dir: &TempDir, toml: &str) -> (Proc, SocketAddr) {
    let path = dir.write("station.toml", toml);
    let station = Proc::spawn("station", &["station", "-c", path.to_str().expect("utf-8 path")]);
    let line = station.wait_log(&["station listening on ", "(HTTP carrier)"]);
    let addr = between(&line, "station listening on ", " (HTTP carrier)")
        .parse()
        .unwrap_or_else(|e| panic!("no address in {line:?}: {e}"));
    (station, addr)
}

/// Starts an agent from `toml` (file `name`.toml) and returns it with its
/// forward addresses by target, parsed from
/// `forwarding ADDR to station target "NAME"`.
pub fn start_agent(
    dir: &TempDir,
    name: &str,
    toml: &str,
    forwards: &[&str],
) -> (Proc, HashMap<String, SocketAddr>) {
    let path = dir.write(&format!("{name}.toml"), toml);
    let agent = Proc::spawn(name, &["agent", "-c", path.to_str().expect("utf-8 path")]);
    let mut addrs = HashMap::new();
    for target in forwards {
        let suffix = format!(" to station target \"{target}\"");
        let line = agent.wait_log(&["forwarding ", &suffix]);
        let addr = between(&line, "forwarding ", &suffix)
            .parse()
            .unwrap_or_else(|e| panic!("no address in {line:?}: {e}"));
        addrs.insert((*target).to_owned(), addr);
    }
    (agent, addrs)
}

/// The text between `start` and the following `end` in `line`.
fn between<'a>(line: &'a str, start: &str, end: &str) -> &'a str {
    let from = line.find(start).map(|i| i + start.len()).expect("caller found `start` in line");
    let to = line[from..].find(end).map(|i| from + i).expect("caller found `end` in line");
    &line[from..to]
}

/// A station and one connected agent with forwards, on loopback.
pub struct Tunnel {
    pub agent: Proc,
    pub station: Proc,
    pub station_addr: SocketAddr,
    pub keys: Keys,
    forwards: HashMap<String, SocketAddr>,
    _dir: TempDir,
}

impl Tunnel {
    /// Starts a station with `targets`, one device allowed `allow`, and its
    /// agent with one forward per name in `forwards`; returns once the
    /// agent has a session.
    pub fn start(
        carrier: &str,
        targets: &[(&str, String)],
        allow: &[&str],
        forwards: &[&str],
    ) -> Tunnel {
        let dir = TempDir::new(carrier);
        let keys = Keys::new();
        let devices = [("test-device", keys.device.public_key(), allow)];
        let (station, station_addr) =
            start_station(&dir, &station_toml(&keys.station, targets, &devices));
        let toml =
            agent_toml(station_addr, &keys.station.public_key(), &keys.device, carrier, forwards);
        let (agent, forwards) = start_agent(&dir, "agent", &toml, forwards);
        agent.wait_log(&["connected to the station"]);
        Tunnel { agent, station, station_addr, keys, forwards, _dir: dir }
    }

    /// The agent's listener for `target`.
    pub fn forward(&self, target: &str) -> SocketAddr {
        *self.forwards.get(target).unwrap_or_else(|| panic!("no forward to {target}"))
    }

    /// Both processes' logs, for failure messages.
    pub fn describe(&self) -> String {
        format!("{}\n{}", self.agent.describe(), self.station.describe())
    }
}

// ---------------------------------------------------------------------------
// Target servers in the test process.

/// A listener on an ephemeral loopback port that runs `handler` on a thread
/// per connection and counts the connections it accepted. Dropping it stops
/// accepting.
pub struct Server {
    pub addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Server {
    pub fn start(handler: impl Fn(TcpStream) + Send + Sync + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback listener");
        let addr = listener.local_addr().expect("a bound listener has an address");
        let accepts = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let handler = Arc::new(handler);
        let (count, stopping) = (accepts.clone(), stop.clone());
        thread::spawn(move || {
            for socket in listener.incoming() {
                if stopping.load(Ordering::Acquire) {
                    return;
                }
                let Ok(socket) = socket else { continue };
                count.fetch_add(1, Ordering::AcqRel);
                let _ = socket.set_nodelay(true);
                let handler = handler.clone();
                thread::spawn(move || handler(socket));
            }
        });
        Server { addr, accepts, stop }
    }

    /// Sends back every byte it receives, then half-closes.
    pub fn echo() -> Server {
        Server::start(|mut socket| {
            let _ = socket.set_read_timeout(Some(IO_STALL));
            let mut reader = socket.try_clone().expect("clone a socket");
            let _ = io::copy(&mut reader, &mut socket);
            let _ = socket.shutdown(Shutdown::Write);
        })
    }

    /// Accepts and counts connections, and closes them at once.
    pub fn recorder() -> Server {
        Server::start(drop)
    }

    /// Connections accepted so far.
    pub fn accepts(&self) -> usize {
        self.accepts.load(Ordering::Acquire)
    }

    /// The address as a `[targets]` value.
    pub fn target(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept loop so it sees the flag and closes the listener.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

/// An address where nothing listens: connecting is refused.
pub fn refused_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback listener");
    listener.local_addr().expect("a bound listener has an address")
    // Dropped here: the port is closed; nothing else binds it this soon.
}

// ---------------------------------------------------------------------------
// Bytes and hashes.

/// BLAKE2s of `len` bytes of `Pattern::new(seed)`.
pub fn pattern_hash(seed: u64, len: u64) -> String {
    let mut pattern = Pattern::new(seed);
    let mut digest = Digest::default();
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        pattern.fill(&mut buf[..n]);
        digest.update(&buf[..n]);
        left -= n as u64;
    }
    digest.finish()
}

/// Writes `len` bytes of `Pattern::new(seed)`, counting progress in
/// `written` after each write.
pub fn send_pattern(
    socket: &mut TcpStream,
    seed: u64,
    len: u64,
    written: &AtomicU64,
) -> io::Result<()> {
    let mut pattern = Pattern::new(seed);
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        pattern.fill(&mut buf[..n]);
        socket.write_all(&buf[..n])?;
        written.fetch_add(n as u64, Ordering::AcqRel);
        left -= n as u64;
    }
    Ok(())
}

/// What a reader got before the end of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub len: u64,
    pub hash: String,
    /// How the stream ended: `None` for a clean end of file, else the
    /// error (a reset, a stall past [`IO_STALL`]).
    pub error: Option<ErrorKind>,
}

impl Received {
    /// The bytes expected, ended by a clean end of file.
    pub fn expected(seed: u64, len: u64) -> Received {
        Received { len, hash: pattern_hash(seed, len), error: None }
    }
}

/// Reads until end of file or an error, hashing everything.
pub fn receive_all(socket: &mut TcpStream) -> Received {
    let _ = socket.set_read_timeout(Some(IO_STALL));
    let mut digest = Digest::default();
    let mut buf = vec![0u8; CHUNK];
    let mut len = 0u64;
    let error = loop {
        match socket.read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => {
                digest.update(&buf[..n]);
                len += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => break Some(e.kind()),
        }
    };
    Received { len, hash: digest.finish(), error }
}

/// Connects to `addr`, sends `len` bytes of `Pattern::new(seed)`, half-closes
/// and reads until end of file; what came back. With an echo target at the
/// far end, a byte-exact tunnel returns `Received::expected(seed, len)`.
pub fn echo_round_trip(addr: SocketAddr, seed: u64, len: u64) -> Received {
    let socket = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    echo_on(socket, seed, len)
}

/// As [`echo_round_trip`] on a connected socket.
pub fn echo_on(mut socket: TcpStream, seed: u64, len: u64) -> Received {
    let _ = socket.set_nodelay(true);
    let _ = socket.set_write_timeout(Some(IO_STALL));
    let mut writer = socket.try_clone().expect("clone a socket");
    let sender = thread::spawn(move || {
        let written = AtomicU64::new(0);
        let result = send_pattern(&mut writer, seed, len, &written);
        let _ = writer.shutdown(Shutdown::Write);
        result
    });
    let received = receive_all(&mut socket);
    let sent = sender.join().expect("sender thread does not panic");
    if let Err(e) = sent {
        panic!("sending {len} bytes failed after the echo returned {received:?}: {e}");
    }
    received
}

/// A channel for results that server threads report to the test.
pub fn report<T: Send + 'static>() -> (mpsc::Sender<T>, Reports<T>) {
    let (tx, rx) = mpsc::channel();
    (tx, Reports(rx))
}

/// The receiving end of [`report`].
pub struct Reports<T>(mpsc::Receiver<T>);

impl<T> Reports<T> {
    /// The next report, waiting at most [`LOG_WAIT`] + [`IO_STALL`].
    pub fn next(&self, what: &str) -> T {
        self.0
            .recv_timeout(LOG_WAIT + IO_STALL)
            .unwrap_or_else(|e| panic!("no report of {what}: {e}"))
    }
}
