//! Test helpers for tests/serial.rs and tests/reverse.rs: the real
//! `postern` binary with its stderr watched line by line, socat
//! pseudo-terminal pairs, a TCP echo target, configs in a temp dir.
//!
//! Named `serial_common` so that it merges beside the shared
//! `tests/common` harness being written elsewhere; fold it in then.
//! Every wait here is bounded by [`WAIT`] and polls a condition.
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use postern::keys::PrivateKey;

/// The longest any single condition is waited for. Generous because two
/// cores are shared with other builds; a passing run takes a fraction.
pub const WAIT: Duration = Duration::from_secs(30);

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("postern-{label}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("temp dir is writable");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("temp dir is writable");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

type Lines = Arc<(Mutex<Vec<String>>, Condvar)>;

/// A `postern` process, killed on drop, whose stderr lines are kept.
pub struct Postern {
    child: Child,
    lines: Lines,
    label: String,
}

impl Postern {
    /// `postern <command> -c <config>` with no proxy from the environment.
    pub fn start(label: &str, command: &str, config: &Path) -> Postern {
        Postern::start_with(label, command, config, &[])
    }

    /// As [`Postern::start`], with more arguments (e.g. `-v`).
    pub fn start_with(label: &str, command: &str, config: &Path, args: &[&str]) -> Postern {
        let mut child = Command::new(env!("CARGO_BIN_EXE_postern"))
            .arg(command)
            .arg("-c")
            .arg(config)
            .args(args)
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .env_remove("POSTERN_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the postern binary starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let lines: Lines = Arc::default();
        let sink = lines.clone();
        let tag = label.to_owned();
        thread::spawn(move || {
            let mut reader = io::BufReader::new(stderr);
            let mut line = String::new();
            while io::BufRead::read_line(&mut reader, &mut line).map(|n| n > 0).unwrap_or(false) {
                eprintln!("[{tag}] {}", line.trim_end());
                let (kept, changed) = &*sink;
                kept.lock().unwrap().push(line.trim_end().to_owned());
                changed.notify_all();
                line.clear();
            }
        });
        Postern { child, lines, label: label.to_owned() }
    }

    /// Waits for the `nth` (1-based) line containing `needle`.
    pub fn wait_nth(&self, needle: &str, nth: usize) -> String {
        let deadline = Instant::now() + WAIT;
        let (kept, changed) = &*self.lines;
        let mut lines = kept.lock().unwrap();
        loop {
            if let Some(line) = lines.iter().filter(|l| l.contains(needle)).nth(nth - 1) {
                return line.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{}: no line #{nth} containing {needle:?} within {WAIT:?}",
                self.label
            );
            lines = changed.wait_timeout(lines, left).unwrap().0;
        }
    }

    /// Waits for a line containing `needle`.
    pub fn wait_line(&self, needle: &str) -> String {
        self.wait_nth(needle, 1)
    }

    /// How many lines so far contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lines.0.lock().unwrap().iter().filter(|l| l.contains(needle)).count()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Postern {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address in a log line after `marker`, e.g. "listening on ".
pub fn addr_after(line: &str, marker: &str) -> SocketAddr {
    let rest = &line
        [line.find(marker).unwrap_or_else(|| panic!("{marker:?} in {line:?}")) + marker.len()..];
    let text: String =
        rest.chars().take_while(|c| c.is_ascii_hexdigit() || ":.[]".contains(*c)).collect();
    text.parse().unwrap_or_else(|_| panic!("an address after {marker:?} in {line:?}"))
}

/// A pair of pseudo-terminals joined by socat: what is written to one
/// comes out of the other. `agent_end` is for the agent, `test_end` for us.
pub struct PtyPair {
    socat: Option<Child>,
    pub agent_end: PathBuf,
    pub test_end: PathBuf,
}

impl PtyPair {
    pub fn start(dir: &Path, name: &str) -> PtyPair {
        let mut pair = PtyPair {
            socat: None,
            agent_end: dir.join(format!("{name}-agent")),
            test_end: dir.join(format!("{name}-test")),
        };
        pair.restart();
        pair
    }

    /// Starts socat (again) with the same link paths.
    pub fn restart(&mut self) {
        assert!(self.socat.is_none(), "socat already runs");
        let link = |p: &Path| format!("pty,raw,echo=0,link={}", p.display());
        let child = Command::new("socat")
            .arg(link(&self.agent_end))
            .arg(link(&self.test_end))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat is installed (scripts/test installs it)");
        self.socat = Some(child);
        let deadline = Instant::now() + WAIT;
        while !(self.agent_end.exists() && self.test_end.exists()) {
            assert!(Instant::now() < deadline, "socat made no ptys within {WAIT:?}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Ends socat the way a USB adapter goes away: the agent's end hangs
    /// up and its device node disappears.
    pub fn stop(&mut self) {
        let Some(mut child) = self.socat.take() else { return };
        // SIGTERM, so socat removes its links as a vanished node would be.
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let deadline = Instant::now() + WAIT;
        while matches!(child.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                let _ = child.kill();
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_file(&self.agent_end);
        let _ = std::fs::remove_file(&self.test_end);
    }

    /// Opens the test's end, raw, with a reader thread.
    pub fn open_test_end(&self) -> Tty {
        Tty::open(&self.test_end)
    }
}

impl Drop for PtyPair {
    fn drop(&mut self) {
        if let Some(mut child) = self.socat.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A terminal we write to directly and read through a thread, so reads
/// can have a deadline.
pub struct Tty {
    writer: File,
    chunks: Receiver<Vec<u8>>,
    pending: Vec<u8>,
}

impl Tty {
    pub fn open(path: &Path) -> Tty {
        let file = OpenOptions::new().read(true).write(true).open(path).expect("pty opens");
        // socat made it raw already; make sure, independently of postern.
        let mut settings = rustix::termios::tcgetattr(&file).expect("a terminal");
        settings.make_raw();
        rustix::termios::tcsetattr(&file, rustix::termios::OptionalActions::Now, &settings)
            .expect("raw mode");
        let mut reader = file.try_clone().expect("dup");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Tty { writer: file, chunks: rx, pending: Vec::new() }
    }

    pub fn write_all(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("write to pty");
    }

    /// A writer usable from another thread.
    pub fn writer(&self) -> File {
        self.writer.try_clone().expect("dup")
    }

    /// Exactly `n` bytes, or a panic after [`WAIT`].
    pub fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let deadline = Instant::now() + WAIT;
        while self.pending.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.chunks.recv_timeout(left) {
                Ok(chunk) => self.pending.extend_from_slice(&chunk),
                Err(RecvTimeoutError::Timeout) => {
                    panic!("only {} of {n} bytes from the pty within {WAIT:?}", self.pending.len())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("pty closed after {} of {n} bytes", self.pending.len())
                }
            }
        }
        self.pending.drain(..n).collect()
    }

    /// Whatever arrives within `quiet` (used to prove nothing arrives).
    pub fn read_for(&mut self, quiet: Duration) -> Vec<u8> {
        let deadline = Instant::now() + quiet;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.chunks.recv_timeout(left) {
                Ok(chunk) => self.pending.extend_from_slice(&chunk),
                Err(_) => return std::mem::take(&mut self.pending),
            }
        }
    }
}

/// A TCP echo server on 127.0.0.1:0 that counts its connections and bytes.
pub struct Echo {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    pub bytes: Arc<AtomicU64>,
}

impl Echo {
    pub fn start() -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().expect("bound");
        let connections = Arc::new(AtomicUsize::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let (count, total) = (connections.clone(), bytes.clone());
        // The thread ends with the test process; it holds only the listener.
        thread::spawn(move || {
            for socket in listener.incoming() {
                let Ok(mut socket) = socket else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                let total = total.clone();
                thread::spawn(move || {
                    let mut out = socket.try_clone().expect("dup");
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = socket.read(&mut buf) {
                        if n == 0 || out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        total.fetch_add(n as u64, Ordering::SeqCst);
                    }
                });
            }
        });
        Echo { addr, connections, bytes }
    }
}

/// Keys for one station and one device.
pub struct Keys {
    pub station: PrivateKey,
    pub device: PrivateKey,
}

impl Keys {
    pub fn new() -> Keys {
        Keys { station: PrivateKey::generate(), device: PrivateKey::generate() }
    }

    /// `station.toml` with one device "pump-17"; `extra` is appended to
    /// the device table (e.g. its `[devices.expose]`).
    pub fn station_toml(&self, listen: &str, targets: &str, allow: &str, extra: &str) -> String {
        format!(
            "listen = \"{listen}\"\nprivate_key = \"{}\"\n\n[targets]\n{targets}\n\n\
             [[devices]]\nname = \"pump-17\"\npublic_key = \"{}\"\nallow = [{allow}]\n{extra}\n",
            self.station.to_base64(),
            self.device.public_key().to_base64()
        )
    }

    /// `agent.toml` for a station at `station`; `extra` holds the forwards
    /// and services.
    pub fn agent_toml(&self, station: SocketAddr, extra: &str) -> String {
        format!(
            "station = \"http://{station}/\"\nstation_public_key = \"{}\"\nprivate_key = \"{}\"\n\n{extra}\n",
            self.station.public_key().to_base64(),
            self.device.to_base64()
        )
    }
}

/// Starts a station and waits for its carrier address.
pub fn start_station(dir: &TempDir, toml: &str) -> (Postern, SocketAddr) {
    let config = dir.write("station.toml", toml);
    let station = Postern::start("station", "station", &config);
    let line = station.wait_line("station listening on ");
    let addr = addr_after(&line, "station listening on ");
    (station, addr)
}

/// Starts an agent and waits until the station has its session.
pub fn start_agent(dir: &TempDir, toml: &str, station: &Postern) -> Postern {
    let config = dir.write("agent.toml", toml);
    let agent = Postern::start("agent", "agent", &config);
    agent.wait_line("connected to the station");
    station.wait_line("device pump-17 handshake from");
    agent
}

/// Bytes 0..n of a pattern in which every byte value occurs in every
/// 256-byte block, in an order that changes from block to block.
pub fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| {
            let block = (i / 256) as u8;
            ((i % 256) as u8).wrapping_mul(167).wrapping_add(block.wrapping_mul(31)) ^ seed
        })
        .collect()
}

/// First offset where two byte strings differ, for failure messages.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y).or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

/// FNV-1a, to print a short digest of what was carried.
pub fn digest(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// Connects to `addr` with read and write deadlines of [`WAIT`].
pub fn connect(addr: SocketAddr) -> TcpStream {
    let socket = TcpStream::connect(addr).expect("connect");
    socket.set_read_timeout(Some(WAIT)).expect("timeout");
    socket.set_write_timeout(Some(WAIT)).expect("timeout");
    socket
}

/// Reads until `n` bytes or end of stream, within [`WAIT`].
pub fn read_n(socket: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut got = Vec::with_capacity(n);
    let mut buf = vec![0u8; 64 * 1024];
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
pub fn assert_closed_within(socket: &mut TcpStream, limit: Duration) {
    socket.set_read_timeout(Some(limit)).expect("timeout");
    let started = Instant::now();
    let mut buf = [0u8; 64];
    match socket.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("expected the connection closed, got {n} bytes"),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("expected the connection closed within {limit:?}, got {e}"),
    }
    assert!(started.elapsed() < limit);
}
