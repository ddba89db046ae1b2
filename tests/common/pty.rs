//! Pseudo-terminal pairs for the serial suites: socat joins two ptys, the
//! agent opens one end as its serial line and the test the other, through
//! a [`Tty`] whose reads have deadlines. Needs socat (scripts/test
//! installs it). Every wait here is bounded by [`LOG_WAIT`].

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use super::{wait_until, LOG_WAIT};

/// A pair of pseudo-terminals joined by socat: what is written to one
/// comes out of the other. `agent_end` is for the agent, `test_end` for us.
pub(crate) struct PtyPair {
    socat: Option<Child>,
    pub agent_end: PathBuf,
    pub test_end: PathBuf,
}

impl PtyPair {
    pub(crate) fn start(dir: &Path, name: &str) -> PtyPair {
        let mut pair = PtyPair {
            socat: None,
            agent_end: dir.join(format!("{name}-agent")),
            test_end: dir.join(format!("{name}-test")),
        };
        pair.restart();
        pair
    }

    /// Starts socat (again) with the same link paths.
    pub(crate) fn restart(&mut self) {
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
        wait_until("socat to make its ptys", LOG_WAIT, || {
            self.agent_end.exists() && self.test_end.exists()
        });
    }

    /// Ends socat the way a USB adapter goes away: the agent's end hangs
    /// up and its device node disappears.
    pub(crate) fn stop(&mut self) {
        let Some(mut child) = self.socat.take() else { return };
        // SIGTERM, so socat removes its links as a vanished node would be.
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let deadline = Instant::now() + LOG_WAIT;
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
    pub(crate) fn open_test_end(&self) -> Tty {
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
pub(crate) struct Tty {
    writer: File,
    chunks: Receiver<Vec<u8>>,
    pending: Vec<u8>,
}

impl Tty {
    pub(crate) fn open(path: &Path) -> Tty {
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

    pub(crate) fn write_all(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("write to pty");
    }

    /// A writer usable from another thread.
    pub(crate) fn writer(&self) -> File {
        self.writer.try_clone().expect("dup")
    }

    /// Exactly `n` bytes, or a panic after [`LOG_WAIT`].
    pub(crate) fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let deadline = Instant::now() + LOG_WAIT;
        while self.pending.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.chunks.recv_timeout(left) {
                Ok(chunk) => self.pending.extend_from_slice(&chunk),
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "only {} of {n} bytes from the pty within {LOG_WAIT:?}",
                        self.pending.len()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("pty closed after {} of {n} bytes", self.pending.len())
                }
            }
        }
        self.pending.drain(..n).collect()
    }

    /// Whatever arrives within `quiet` (used to prove nothing arrives).
    pub(crate) fn read_for(&mut self, quiet: Duration) -> Vec<u8> {
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
