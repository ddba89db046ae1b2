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
//! Each suite uses a different subset of these helpers. [`pty`] adds
//! pseudo-terminal pairs for the serial suites; [`scratch`] the temp dirs
//! and free ports, which the benchmarks share.
#![allow(dead_code)]

pub(crate) mod pty;
mod scratch;

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

pub(crate) use postern::demo::{Digest, Pattern};
use postern::keys::{PrivateKey, PublicKey};

// Temp dirs and free ports, which the benches share (not every suite uses
// both).
#[allow(unused_imports)]
pub(crate) use scratch::{refused_addr, TempDir};

/// The binary under test, built by cargo for the integration tests.
pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_postern");

/// Longest wait for something we expect to happen soon: a process
/// printing a line (startup, a session, a log line after an event), a
/// short answer through the tunnel, a pty appearing. Generous: the machine
/// is shared and may be busy compiling.
pub(crate) const LOG_WAIT: Duration = Duration::from_secs(30);

/// Longest a socket operation may make no progress before the test fails.
pub(crate) const IO_STALL: Duration = Duration::from_secs(60);

/// Bytes per write of the test clients and servers.
const CHUNK: usize = 64 * 1024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Polls `done` until it holds or `limit` passes. For conditions that have
/// no wakeup to wait on (a child's exit, a counter in another thread); the
/// poll interval is short and the deadline is the bound.
pub(crate) fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        thread::sleep(Duration::from_millis(10));
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
pub(crate) struct Lines(Arc<(Mutex<LinesState>, Condvar)>);

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

    pub(crate) fn snapshot(&self) -> Vec<String> {
        lock(&self.0 .0).lines.clone()
    }

    /// Everything so far, one line each, for failure messages.
    pub(crate) fn text(&self) -> String {
        self.snapshot().join("\n")
    }

    /// How many lines so far contain `needle`.
    pub(crate) fn count(&self, needle: &str) -> usize {
        lock(&self.0 .0).lines.iter().filter(|l| l.contains(needle)).count()
    }

    /// Lines so far that contain every one of `needles`.
    pub(crate) fn matching(&self, needles: &[&str]) -> Vec<String> {
        lock(&self.0 .0)
            .lines
            .iter()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .cloned()
            .collect()
    }

    /// Waits until at least `n` lines contain every one of `needles`, and
    /// returns the `n`th. Panics after `limit` saying what was awaited.
    pub(crate) fn wait_for_nth(
        &self,
        who: &str,
        needles: &[&str],
        n: usize,
        limit: Duration,
    ) -> String {
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
    pub(crate) fn wait_for(&self, who: &str, needles: &[&str], limit: Duration) -> String {
        self.wait_for_nth(who, needles, 1, limit)
    }

    /// Waits until the pipe closes (the process exited or closed it).
    pub(crate) fn wait_closed(&self, who: &str, limit: Duration) {
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
pub(crate) struct Proc {
    name: String,
    child: Child,
    pub stdout: Lines,
    pub stderr: Lines,
}

/// Peak and current resident memory of a process, from /proc/PID/status.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Memory {
    /// VmHWM: the most the process has ever had resident.
    pub peak_kib: u64,
    /// VmRSS: resident now.
    pub now_kib: u64,
    /// RssAnon: the resident part of VmRSS that is heap and stacks.
    pub anon_kib: u64,
    /// RssFile: the resident part of VmRSS that maps files (the binary,
    /// shared libraries).
    pub file_kib: u64,
}

impl Proc {
    /// Starts `postern ARGS` with no stdin and a clean environment for
    /// what postern reads (no proxy, no log override).
    pub(crate) fn spawn(name: &str, args: &[&str]) -> Proc {
        Self::spawn_with(name, args, None)
    }

    /// As [`Proc::spawn`], writing `stdin` to the child and closing it.
    pub(crate) fn spawn_with(name: &str, args: &[&str], stdin: Option<&str>) -> Proc {
        Self::spawn_via(&[BIN], name, args, stdin)
    }

    /// As [`Proc::spawn_with`], running `program` (another build of
    /// postern, with any wrapper before it, e.g. `scripts/board-run BOARD`)
    /// instead of [`BIN`].
    pub(crate) fn spawn_via(
        program: &[&str],
        name: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Proc {
        let (first, wrapped) = program.split_first().expect("a program to run");
        let mut command = Command::new(first);
        command
            .args(wrapped)
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for var in [
            "POSTERN_LOG",
            "HTTP_PROXY",
            "http_proxy",
            "HTTPS_PROXY",
            "https_proxy",
            "NO_PROXY",
            "no_proxy",
        ] {
            command.env_remove(var);
        }
        let mut child =
            command.spawn().unwrap_or_else(|e| panic!("cannot start {first} for {name}: {e}"));
        if let Some(text) = stdin {
            let mut pipe = child.stdin.take().expect("stdin was requested piped");
            pipe.write_all(text.as_bytes())
                .unwrap_or_else(|e| panic!("cannot write stdin of {name}: {e}"));
        }
        let stdout = Lines::collect(child.stdout.take().expect("stdout was requested piped"));
        let stderr = Lines::collect(child.stderr.take().expect("stderr was requested piped"));
        Proc { name: name.to_owned(), child, stdout, stderr }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has not exited yet.
    pub(crate) fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for a line on stderr containing every one of `needles`.
    /// Sends the signal `name` (e.g. `HUP`) to the process.
    pub(crate) fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {} failed", self.pid());
    }

    pub(crate) fn wait_log(&self, needles: &[&str]) -> String {
        self.stderr.wait_for(&format!("{} stderr", self.name), needles, LOG_WAIT)
    }

    /// Waits for the `n`th such line.
    pub(crate) fn wait_log_nth(&self, needles: &[&str], n: usize, limit: Duration) -> String {
        self.stderr.wait_for_nth(&format!("{} stderr", self.name), needles, n, limit)
    }

    /// Waits for the process to exit and for both pipes to be read to the end.
    pub(crate) fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
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
    pub(crate) fn memory(&self) -> Memory {
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
        Memory {
            peak_kib: field("VmHWM:"),
            now_kib: field("VmRSS:"),
            anon_kib: field("RssAnon:"),
            file_kib: field("RssFile:"),
        }
    }

    /// Both logs, for failure messages.
    pub(crate) fn describe(&self) -> String {
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
pub(crate) struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `postern ARGS` to completion (bounded) and returns what it printed.
pub(crate) fn run(args: &[&str], stdin: Option<&str>, limit: Duration) -> Output {
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
pub(crate) struct Keys {
    pub station: PrivateKey,
    pub device: PrivateKey,
}

impl Keys {
    pub(crate) fn new() -> Keys {
        Keys { station: PrivateKey::generate(), device: PrivateKey::generate() }
    }

    /// [`station_toml`] with this station key and the one device, named
    /// `device` and allowed `allow`. The device's table comes last, so
    /// text appended (e.g. `[devices.expose]`) belongs to it.
    pub(crate) fn station_toml(
        &self,
        targets: &[(&str, String)],
        device: &str,
        allow: &[&str],
    ) -> String {
        station_toml(&self.station, targets, &[(device, self.device.public_key(), allow)])
    }

    /// [`agent_toml`] for the device, carrier auto, with a listener per
    /// target in `forwards`, then `tables` as written (serial forwards,
    /// `[services]`).
    pub(crate) fn agent_toml(
        &self,
        station: SocketAddr,
        forwards: &[&str],
        tables: &str,
    ) -> String {
        let toml = agent_toml(station, &self.station.public_key(), &self.device, "auto", forwards);
        format!("{toml}\n{tables}")
    }
}

/// `station.toml` listening on an ephemeral loopback port.
pub(crate) fn station_toml(
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
pub(crate) fn agent_toml(
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
pub(crate) fn start_station(dir: &TempDir, toml: &str) -> (Proc, SocketAddr) {
    let path = dir.write("station.toml", toml);
    let station = Proc::spawn("station", &["station", "-c", path.to_str().expect("utf-8 path")]);
    let line = station.wait_log(&["station listening on ", "(HTTP carrier)"]);
    let addr = addr_after(&line, "station listening on ")
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    (station, addr)
}

/// Starts an agent from `toml` (file `name`.toml) and returns it with its
/// forward addresses by target, parsed from
/// `forwarding ADDR to station target "NAME"`.
pub(crate) fn start_agent(
    dir: &TempDir,
    name: &str,
    toml: &str,
    forwards: &[&str],
) -> (Proc, HashMap<String, SocketAddr>) {
    start_agent_via(&[BIN], dir, name, toml, forwards)
}

/// As [`start_agent`], running `program` as [`Proc::spawn_via`] does.
pub(crate) fn start_agent_via(
    program: &[&str],
    dir: &TempDir,
    name: &str,
    toml: &str,
    forwards: &[&str],
) -> (Proc, HashMap<String, SocketAddr>) {
    let path = dir.write(&format!("{name}.toml"), toml);
    let agent =
        Proc::spawn_via(program, name, &["agent", "-c", path.to_str().expect("utf-8 path")], None);
    let mut addrs = HashMap::new();
    for target in forwards {
        let suffix = format!(" to station target \"{target}\"");
        // A serial forward to the same target logs `forwarding serial PATH`
        // with the same suffix; the listener is the line with an address.
        // The agent logs one line per forward, so the LOG_WAIT of the wait
        // after the last one bounds this.
        let addr = (1..)
            .find_map(|n| {
                let line = agent.wait_log_nth(&["forwarding ", &suffix], n, LOG_WAIT);
                addr_after(&line, "forwarding ")
            })
            .expect("an unbounded range ends only in a panic");
        addrs.insert((*target).to_owned(), addr);
    }
    (agent, addrs)
}

/// As [`start_agent`], and waits until the agent and `station` both have
/// the session of device `device`: the agent's `connected to the station`
/// and the station's `device DEVICE handshake from`.
pub(crate) fn start_agent_session(
    dir: &TempDir,
    station: &Proc,
    device: &str,
    toml: &str,
    forwards: &[&str],
) -> (Proc, HashMap<String, SocketAddr>) {
    let (agent, addrs) = start_agent(dir, "agent", toml, forwards);
    agent.wait_log(&["connected to the station"]);
    station.wait_log(&[&format!("device {device} handshake from")]);
    (agent, addrs)
}

/// `station.toml` text with a status listener on an ephemeral port.
pub(crate) fn with_status(toml: &str) -> String {
    toml.replacen('\n', "\nstatus = \"127.0.0.1:0\"\n", 1)
}

/// The address of `station`'s status listener, from its log.
pub(crate) fn status_addr(station: &Proc) -> SocketAddr {
    let line = station.wait_log(&["status on http://", "/metrics"]);
    let from = line.find("status on http://").expect("found above") + "status on http://".len();
    let to = line[from..].find('/').expect("a path follows") + from;
    line[from..to].parse().unwrap_or_else(|e| panic!("no address in {line:?}: {e}"))
}

/// The value of the sample named `series` (name and labels, as the
/// station writes them) in a /metrics body, if it has one.
pub(crate) fn metric(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// `GET path` on the status listener: (status line, body).
pub(crate) fn status_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut socket = TcpStream::connect(addr).expect("connect to status");
    socket.set_read_timeout(Some(LOG_WAIT)).expect("timeout");
    write!(socket, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
    let mut answer = String::new();
    socket.read_to_string(&mut answer).expect("read the answer");
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    (head.lines().next().unwrap_or("").to_owned(), body.to_owned())
}

/// The socket address right after `marker` in a log line, as in
/// `station listening on ADDR (HTTP carrier)`; `None` if the word there is
/// not one.
pub(crate) fn addr_after(line: &str, marker: &str) -> Option<SocketAddr> {
    let (_, rest) = line.split_once(marker)?;
    rest.split_whitespace().next()?.parse().ok()
}

/// A station and one connected agent with forwards, on loopback.
pub(crate) struct Tunnel {
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
    pub(crate) fn start(
        carrier: &str,
        targets: &[(&str, String)],
        allow: &[&str],
        forwards: &[&str],
    ) -> Tunnel {
        Self::start_via(&[BIN], carrier, targets, allow, forwards)
    }

    /// As [`Tunnel::start`], running the agent as `program` (see
    /// [`Proc::spawn_via`]); the station is always [`BIN`].
    pub(crate) fn start_via(
        program: &[&str],
        carrier: &str,
        targets: &[(&str, String)],
        allow: &[&str],
        forwards: &[&str],
    ) -> Tunnel {
        let dir = TempDir::new(carrier);
        let keys = Keys::new();
        let (station, station_addr) =
            start_station(&dir, &keys.station_toml(targets, "test-device", allow));
        let toml =
            agent_toml(station_addr, &keys.station.public_key(), &keys.device, carrier, forwards);
        let (agent, forwards) = start_agent_via(program, &dir, "agent", &toml, forwards);
        agent.wait_log(&["connected to the station"]);
        Tunnel { agent, station, station_addr, keys, forwards, _dir: dir }
    }

    /// The agent's listener for `target`.
    pub(crate) fn forward(&self, target: &str) -> SocketAddr {
        *self.forwards.get(target).unwrap_or_else(|| panic!("no forward to {target}"))
    }

    /// Both processes' logs, for failure messages.
    pub(crate) fn describe(&self) -> String {
        format!("{}\n{}", self.agent.describe(), self.station.describe())
    }
}

// ---------------------------------------------------------------------------
// Target servers in the test process.

/// A listener on an ephemeral loopback port that runs `handler` on a thread
/// per connection and counts the connections it accepted. Dropping it stops
/// accepting.
pub(crate) struct Server {
    pub addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    /// Bytes an [`Server::echo`] received, over all its connections.
    echoed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Server {
    pub(crate) fn start(handler: impl Fn(TcpStream) + Send + Sync + 'static) -> Server {
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
        Server { addr, accepts, echoed: Arc::default(), stop }
    }

    /// Sends back every byte it receives, then half-closes; counts the
    /// bytes in [`Server::echoed`].
    pub(crate) fn echo() -> Server {
        let echoed = Arc::new(AtomicU64::new(0));
        let count = echoed.clone();
        let mut server = Server::start(move |mut socket| {
            let _ = socket.set_read_timeout(Some(IO_STALL));
            let mut buf = vec![0u8; CHUNK];
            loop {
                match socket.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        // Counted before it goes back, so that a client
                        // that has its bytes back finds them counted.
                        count.fetch_add(n as u64, Ordering::AcqRel);
                        if socket.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = socket.shutdown(Shutdown::Write);
        });
        server.echoed = echoed;
        server
    }

    /// Accepts and counts connections, and closes them at once.
    pub(crate) fn recorder() -> Server {
        Server::start(drop)
    }

    /// Connections accepted so far.
    pub(crate) fn accepts(&self) -> usize {
        self.accepts.load(Ordering::Acquire)
    }

    /// Bytes an echo server received so far, over all connections; always
    /// 0 for other servers.
    pub(crate) fn echoed(&self) -> u64 {
        self.echoed.load(Ordering::Acquire)
    }

    /// The address as a `[targets]` value.
    pub(crate) fn target(&self) -> String {
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

// ---------------------------------------------------------------------------
// Bytes and hashes.

/// BLAKE2s of `len` bytes of `Pattern::new(seed)`.
pub(crate) fn pattern_hash(seed: u64, len: u64) -> String {
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
pub(crate) fn send_pattern(
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
pub(crate) struct Received {
    pub len: u64,
    pub hash: String,
    /// How the stream ended: `None` for a clean end of file, else the
    /// error (a reset, a stall past [`IO_STALL`]).
    pub error: Option<ErrorKind>,
}

impl Received {
    /// The bytes expected, ended by a clean end of file.
    pub(crate) fn expected(seed: u64, len: u64) -> Received {
        Received { len, hash: pattern_hash(seed, len), error: None }
    }
}

/// Reads until end of file or an error, hashing everything.
pub(crate) fn receive_all(socket: &mut TcpStream) -> Received {
    receive_until(socket, None)
}

/// As [`receive_all`], ending with `TimedOut` once `deadline` has passed.
fn receive_until(socket: &mut TcpStream, deadline: Option<Instant>) -> Received {
    let _ = socket.set_read_timeout(Some(IO_STALL));
    let mut digest = Digest::default();
    let mut buf = vec![0u8; CHUNK];
    let mut len = 0u64;
    let error = loop {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break Some(ErrorKind::TimedOut);
        }
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
pub(crate) fn echo_round_trip(addr: SocketAddr, seed: u64, len: u64) -> Received {
    let socket = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    echo_on(socket, seed, len)
}

/// As [`echo_round_trip`], with the whole round trip bounded by `limit`:
/// past it, what came back so far, ended by `TimedOut`.
pub(crate) fn echo_within(addr: SocketAddr, seed: u64, len: u64, limit: Duration) -> Received {
    let deadline = Instant::now() + limit;
    let socket = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    echo_until(socket, seed, len, Some(deadline))
}

/// As [`echo_round_trip`] on a connected socket.
pub(crate) fn echo_on(socket: TcpStream, seed: u64, len: u64) -> Received {
    echo_until(socket, seed, len, None)
}

fn echo_until(mut socket: TcpStream, seed: u64, len: u64, deadline: Option<Instant>) -> Received {
    let _ = socket.set_nodelay(true);
    let _ = socket.set_write_timeout(Some(IO_STALL));
    let mut writer = socket.try_clone().expect("clone a socket");
    let sender = thread::spawn(move || {
        let written = AtomicU64::new(0);
        let result = send_pattern(&mut writer, seed, len, &written);
        let _ = writer.shutdown(Shutdown::Write);
        result
    });
    let received = receive_until(&mut socket, deadline);
    if received.error == Some(ErrorKind::TimedOut) {
        // Unblocks a sender stuck on a full socket.
        let _ = socket.shutdown(Shutdown::Both);
    }
    let sent = sender.join().expect("sender thread does not panic");
    if let Err(e) = sent {
        panic!("sending {len} bytes failed after the echo returned {received:?}: {e}");
    }
    received
}

/// Bytes 0..n of a pattern in which every byte value occurs in every
/// 256-byte block, in an order that changes from block to block: what a
/// serial line must carry untouched (0x00, XON, XOFF, CR, LF, 0xFF).
pub(crate) fn every_byte_value(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| {
            let block = (i / 256) as u8;
            ((i % 256) as u8).wrapping_mul(167).wrapping_add(block.wrapping_mul(31)) ^ seed
        })
        .collect()
}

/// First offset where two byte strings differ, for failure messages.
pub(crate) fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y).or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

/// FNV-1a, to print a short digest of what was carried.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// Connects to `addr` with read and write deadlines of [`LOG_WAIT`], for
/// short exchanges.
pub(crate) fn connect(addr: SocketAddr) -> TcpStream {
    let socket = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    socket.set_read_timeout(Some(LOG_WAIT)).expect("set a read timeout");
    socket.set_write_timeout(Some(LOG_WAIT)).expect("set a write timeout");
    socket
}

/// Reads until `n` bytes or end of stream, each read within the socket's
/// read timeout.
pub(crate) fn read_n(socket: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut got = Vec::with_capacity(n);
    let mut buf = vec![0u8; CHUNK];
    while got.len() < n {
        let want = (n - got.len()).min(buf.len());
        match socket.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e) => panic!("read after {} of {n} bytes: {e}", got.len()),
        }
    }
    got
}

/// Asserts the peer closes `socket` within `limit` without sending data.
pub(crate) fn assert_closed_within(socket: &mut TcpStream, limit: Duration) {
    socket.set_read_timeout(Some(limit)).expect("set a read timeout");
    let started = Instant::now();
    let mut buf = [0u8; 64];
    match socket.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("expected the connection closed, got {n} bytes"),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("expected the connection closed within {limit:?}, got {e}"),
    }
    assert!(started.elapsed() < limit);
}

/// A channel for results that server threads report to the test.
pub(crate) fn report<T: Send + 'static>() -> (mpsc::Sender<T>, Reports<T>) {
    let (tx, rx) = mpsc::channel();
    (tx, Reports(rx))
}

/// The receiving end of [`report`].
pub(crate) struct Reports<T>(mpsc::Receiver<T>);

impl<T> Reports<T> {
    /// The next report, waiting at most [`LOG_WAIT`] + [`IO_STALL`].
    pub(crate) fn next(&self, what: &str) -> T {
        self.within(what, LOG_WAIT + IO_STALL)
    }

    /// The next report, waiting at most `limit`.
    pub(crate) fn within(&self, what: &str, limit: Duration) -> T {
        self.0
            .recv_timeout(limit)
            .unwrap_or_else(|e| panic!("no report of {what} within {limit:?}: {e}"))
    }
}
