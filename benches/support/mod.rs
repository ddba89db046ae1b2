//! What the benchmark drivers share: their processes (killed on drop, CPU
//! time and memory read from /proc), temp dirs, and reading what a process
//! logs and what a station's /metrics says; and (path.rs) the delayed hop
//! of the -rtt routes.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

pub(crate) mod path;
// The tests' temp dirs and free ports: tests/middleboxes takes them from
// `crate::common`, which each bench points here.
#[path = "../../tests/common/scratch.rs"]
mod scratch;

pub(crate) use scratch::{refused_addr, TempDir};

/// Longest a process may take to report its listening port.
pub(crate) const START_LIMIT: Duration = Duration::from_secs(20);

/// Which end of a tunnel a process is: the device's (postern agent, htc,
/// rathole client, wstunnel client) or the central site's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Device = 0,
    Central = 1,
}

/// A process of a route, killed on drop.
pub(crate) struct Proc {
    pub name: String,
    pub side: Side,
    pub child: Child,
    /// The last lines it wrote to stderr, for error messages.
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Proc {
    /// Starts `command`; every stderr line also goes to `lines`.
    pub(crate) fn spawn(
        name: &str,
        side: Side,
        command: &mut Command,
        lines: mpsc::Sender<String>,
    ) -> Result<Proc, String> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {name} ({command:?}): {e}"))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let keep = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut kept = keep.lock().unwrap_or_else(|p| p.into_inner());
                if kept.len() >= 20 {
                    kept.remove(0);
                }
                kept.push(line.clone());
                drop(kept);
                let _ = lines.send(line);
            }
        });
        Ok(Proc { name: name.to_owned(), side, child, log })
    }

    pub(crate) fn stat_field(&self, file: &str) -> Option<String> {
        std::fs::read_to_string(format!("/proc/{}/{file}", self.child.id())).ok()
    }

    /// Whether the process still runs (not exited, not a zombie).
    pub(crate) fn is_running(&self) -> bool {
        let Some(stat) = self.stat_field("stat") else { return false };
        let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
        !matches!(state, None | Some("Z" | "X"))
    }

    /// Context switches of all the process's threads so far.
    pub(crate) fn context_switches(&self) -> u64 {
        let tasks = format!("/proc/{}/task", self.child.id());
        let Ok(tasks) = std::fs::read_dir(tasks) else { return 0 };
        tasks
            .flatten()
            .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
            .flat_map(|status| {
                status
                    .lines()
                    .filter_map(|l| l.split_once("ctxt_switches:"))
                    .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
                    .collect::<Vec<_>>()
            })
            .sum()
    }

    /// User plus system CPU seconds of the process so far.
    pub(crate) fn cpu_seconds(&self) -> f64 {
        let Some(stat) = self.stat_field("stat") else { return 0.0 };
        // Fields after the parenthesised command name; utime and stime are
        // fields 14 and 15 of the whole line.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: u64 = [11, 12].iter().filter_map(|&i| fields.get(i)?.parse::<u64>().ok()).sum();
        ticks as f64 / clock_ticks()
    }

    /// A size in bytes from /proc/PID/status (`VmRSS`, `VmHWM`, ...).
    pub(crate) fn status_bytes(&self, field: &str) -> u64 {
        let status = self.stat_field("status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    }

    /// Peak resident set size in bytes.
    pub(crate) fn peak_rss(&self) -> u64 {
        self.status_bytes("VmHWM")
    }

    /// Resident set size now, in bytes.
    pub(crate) fn rss(&self) -> u64 {
        self.status_bytes("VmRSS")
    }

    pub(crate) fn recent_log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).join("\n  ")
    }

    pub(crate) fn last_line_containing(&self, marker: &str) -> Option<String> {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.iter().rev().find(|l| l.contains(marker)).cloned()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Waits for stderr lines containing each of `markers` (in any order) and
/// returns what follows each marker.
pub(crate) fn wait_for_lines(
    lines: &mpsc::Receiver<String>,
    markers: &[&str],
    proc: &Proc,
) -> Result<Vec<String>, String> {
    let deadline = Instant::now() + START_LIMIT;
    let mut found: Vec<Option<String>> = vec![None; markers.len()];
    while found.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                for (marker, slot) in markers.iter().zip(&mut found) {
                    if let (None, Some((_, rest))) = (&slot, line.split_once(marker)) {
                        *slot = Some(rest.to_owned());
                    }
                }
            }
            Err(_) => {
                return Err(format!(
                    "{} did not log {markers:?} within {START_LIMIT:?}; its last lines:\n  {}",
                    proc.name,
                    proc.recent_log()
                ))
            }
        }
    }
    Ok(found.into_iter().flatten().collect())
}

/// Waits for a stderr line containing `marker` and returns what follows it.
pub(crate) fn wait_for_line(
    lines: &mpsc::Receiver<String>,
    marker: &str,
    proc: &Proc,
) -> Result<String, String> {
    Ok(wait_for_lines(lines, &[marker], proc)?.remove(0))
}

pub(crate) fn parse_port(text: &str) -> Option<u16> {
    let digits: String = text.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

pub(crate) fn parse_addr(text: &str) -> Option<SocketAddr> {
    text.split(|c: char| c.is_whitespace() || c == '/').next()?.parse().ok()
}

/// A value from the station's Prometheus text at `status`.
pub(crate) fn metric(status: SocketAddr, name: &str) -> Option<f64> {
    let mut socket = TcpStream::connect_timeout(&status, Duration::from_secs(2)).ok()?;
    socket.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    socket.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    socket.read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

pub(crate) fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(listener.local_addr().map_err(|e| e.to_string())?.port())
}
