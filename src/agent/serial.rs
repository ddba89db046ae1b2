//! Serial lines in the agent: forward lines, which are one long stream to
//! a station target, and serial services, a console the station opens.
//!
//! ```text
//!  forward:  keep_line: open ─read─▶ backlog (≤ LINE_BACKLOG) ─▶ carry_line: first bytes ─▶ open stream ─▶ pump(LineLink)
//!              ▲ vanished: log once, reopen with backoff        └ target finished or refused: next bytes open a new stream
//!  service:  stream "console" ─▶ claim (one holder) ─▶ open ─▶ read ─▶ backlog ─▶ pump(LineLink) ─▶ close, release
//! ```
//!
//! A serial line has no connections: it is open for as long as the agent
//! runs, and its bytes are carried to the target in whatever stream is
//! current. Bytes the line sends while no stream takes them wait in the
//! backlog; past [`LINE_BACKLOG`] they are dropped and counted, because a
//! UART cannot be told to wait unless flow control is wired. While a stream
//! is attached and slow, the reader stops instead, so the kernel buffer
//! and then RTS/CTS or XON/XOFF (where configured) hold the device back.
//!
//! What this does not do: keep bytes that went into a stream the station
//! then refused (the protocol has no "target connected" signal; such a
//! stream ends at once and its byte count is logged), or share a line
//! between two users (config refuses that).

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use event_listener::{Event as Notify, EventListener};
use futures_lite::{future, AsyncRead, AsyncReadExt, AsyncWrite};

use super::{Shared, SESSION_WAIT};
use crate::config::{FlowControl, Parity, SerialConfig};
use crate::core::streams::StreamId;
use crate::endpoint::{self, serial::SerialPort};
use crate::tunnel::Tunnel;

/// Bytes a line keeps while no stream takes them. 64 KiB is 5.7 s of a
/// 115200 baud line and over a minute at 9600: enough to ride out a
/// carrier reconnect, small next to the agent's other buffers (a stream
/// starts at 128 KiB of send buffer plus a 256 KiB window).
pub(super) const LINE_BACKLOG: usize = 64 * 1024;

/// Bytes one read takes from the line. The kernel's N_TTY receive buffer
/// is 4 KiB, so a read rarely finds more.
const LINE_READ: usize = 4 * 1024;

/// First and longest wait between attempts to reopen a vanished line. A
/// USB adapter re-enumerates in about a second; polling a missing node
/// every few seconds costs nothing.
const REOPEN_FIRST: Duration = Duration::from_millis(100);
const REOPEN_LAST: Duration = Duration::from_secs(5);

/// A stream that ends sooner than this with no byte back from the target
/// counts as refused, and the next one waits (the station refuses at once
/// when the target is down or not allowed).
const QUICK_END: Duration = Duration::from_secs(1);

/// How long a console keeps reading its line to a client that finished
/// sending (`printf 'status\r' | nc -N`, the usual scripted question): a
/// serial line has no end of input, so the answer ends when the line has
/// been quiet this long, or when the client closes.
pub(super) const CONSOLE_LINGER: Duration = Duration::from_secs(3);

/// First and longest wait before opening a stream again after a refusal.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_LAST: Duration = Duration::from_secs(30);

/// One serial line and the bytes read from it that no stream took yet.
pub(super) struct Line {
    config: SerialConfig,
    /// Who the line's bytes go to, for log lines: `target "collector"`.
    peer: String,
    state: Mutex<LineState>,
    /// Bytes arrived or left the backlog, the port changed, or a stream
    /// attached or detached.
    changed: Notify,
}

struct LineState {
    /// The open device; `None` while it is missing.
    port: Option<SerialPort>,
    /// Bumped at every open, so a stream notices that its line went away
    /// even if it came back meanwhile.
    generation: u64,
    backlog: VecDeque<u8>,
    /// A stream takes the bytes now: the reader waits rather than drops.
    attached: bool,
    /// Bytes dropped since the backlog last had room.
    dropped: u64,
}

impl Line {
    pub(super) fn new(config: SerialConfig, peer: String) -> Arc<Line> {
        Arc::new(Line {
            config,
            peer,
            state: Mutex::new(LineState {
                port: None,
                generation: 0,
                backlog: VecDeque::new(),
                attached: false,
                dropped: 0,
            }),
            changed: Notify::new(),
        })
    }

    pub(super) fn path(&self) -> &str {
        &self.config.path
    }

    fn lock(&self) -> MutexGuard<'_, LineState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The new port (or none), returning the generation it starts.
    fn set_port(&self, port: Option<SerialPort>) -> u64 {
        let mut state = self.lock();
        state.generation += 1;
        state.port = port;
        let generation = state.generation;
        drop(state);
        self.changed.notify(usize::MAX);
        generation
    }

    /// Appends bytes read from the line. What does not fit is returned
    /// while a stream is attached (the reader waits for room), and dropped
    /// and counted while none is.
    fn push<'a>(&self, bytes: &'a [u8]) -> &'a [u8] {
        let mut state = self.lock();
        let room = LINE_BACKLOG - state.backlog.len();
        let (keep, rest) = bytes.split_at(room.min(bytes.len()));
        state.backlog.extend(keep);
        let attached = state.attached;
        if !attached && !rest.is_empty() {
            if state.dropped == 0 {
                log::warn!(
                    "serial {} -> {}: {LINE_BACKLOG} bytes wait for a stream; \
                     dropping what the line sends until one takes them",
                    self.config.path,
                    self.peer
                );
            }
            state.dropped += rest.len() as u64;
        }
        drop(state);
        self.changed.notify(usize::MAX);
        if attached {
            rest
        } else {
            &[]
        }
    }

    /// A stream starts taking the bytes; returns the port generation it
    /// is bound to.
    fn attach(&self) -> u64 {
        let mut state = self.lock();
        state.attached = true;
        if state.dropped > 0 {
            log::warn!(
                "serial {} -> {}: dropped {} bytes while no stream took them \
                 (backlog bound {LINE_BACKLOG} bytes)",
                self.config.path,
                self.peer,
                state.dropped
            );
            state.dropped = 0;
        }
        state.generation
    }

    fn detach(&self) {
        self.lock().attached = false;
        self.changed.notify(usize::MAX);
    }

    /// Resolves once the backlog holds a byte.
    async fn bytes_waiting(&self) {
        loop {
            let listener = self.changed.listen();
            if !self.lock().backlog.is_empty() {
                return;
            }
            listener.await;
        }
    }

    /// Resolves once the backlog has room or no stream is attached (then
    /// bytes that do not fit are dropped rather than waited for).
    async fn room(&self) {
        loop {
            let listener = self.changed.listen();
            {
                let state = self.lock();
                if !state.attached || state.backlog.len() < LINE_BACKLOG {
                    return;
                }
            }
            listener.await;
        }
    }
}

/// "115200 8N1", "9600 7E2 rts/cts" for log lines.
fn describe(config: &SerialConfig) -> String {
    let parity = match config.parity {
        Parity::None => 'N',
        Parity::Even => 'E',
        Parity::Odd => 'O',
    };
    let flow = match config.flow_control {
        FlowControl::None => "",
        FlowControl::Software => " xon/xoff",
        FlowControl::Hardware => " rts/cts",
    };
    format!("{} {}{parity}{}{flow}", config.baud, config.data_bits, config.stop_bits)
}

/// Reads the port into the line's backlog until it vanishes; returns why.
async fn read_line(line: &Line, mut port: SerialPort) -> String {
    let mut buf = vec![0u8; LINE_READ];
    loop {
        let n = match port.read(&mut buf).await {
            // A hung-up tty (USB adapter gone, pty master closed) reads as
            // end of file or EIO; either way this node is dead.
            Ok(0) => return "hung up".to_owned(),
            Ok(n) => n,
            Err(e) => return e.to_string(),
        };
        let mut rest = line.push(&buf[..n]);
        while !rest.is_empty() {
            // Not reading now lets the kernel buffer fill, and with flow
            // control configured, holds the device back.
            line.room().await;
            rest = line.push(rest);
        }
        // A read of a busy line is ready at once, every time: without a
        // yield this loop would hold the executor thread, and the task that
        // attaches a stream (and every other forward) would not run.
        future::yield_now().await;
    }
}

/// Keeps a forward line open for as long as the agent runs: opens it,
/// reads it, and when it vanishes logs once and reopens it with backoff.
pub(super) async fn keep_line(line: Arc<Line>) {
    let path = line.path().to_owned();
    let mut delay = REOPEN_FIRST;
    // Whether the operator has been told the line is missing.
    let mut missing = false;
    loop {
        let port = match SerialPort::open(&line.config) {
            Ok(port) => port,
            Err(e) => {
                if missing {
                    log::debug!("serial {path}: still cannot open: {e}");
                } else {
                    log::warn!(
                        "serial {path} -> {}: cannot open: {e}; retrying until it is back",
                        line.peer
                    );
                    missing = true;
                }
                smol::Timer::after(delay).await;
                delay = (delay * 2).min(REOPEN_LAST);
                continue;
            }
        };
        let was = if missing { "is back" } else { "open" };
        log::info!("serial {path} {was} ({})", describe(&line.config));
        delay = REOPEN_FIRST;
        line.set_port(Some(port.clone()));
        let why = read_line(&line, port).await;
        line.set_port(None);
        log::warn!(
            "serial {path} -> {}: line vanished ({why}); reopening when it is back",
            line.peer
        );
        // Told once: failed reopens from here on are debug lines.
        missing = true;
    }
}

/// Carries a forward line's bytes to its target: a stream opens when
/// bytes wait and none is open, and again after the target finishes.
pub(super) async fn carry_line(shared: Arc<Shared>, line: Arc<Line>, target: String) {
    let path = line.path().to_owned();
    let mut retry = RETRY_FIRST;
    loop {
        line.bytes_waiting().await;
        let tunnel = loop {
            if let Some(tunnel) = shared.session(SESSION_WAIT).await {
                break tunnel;
            }
            log::debug!("serial {path} -> {target}: still no session with the station");
        };
        // Attached from before the stream opens: with a session up, the
        // bytes are about to be taken, so the reader waits instead of
        // dropping (a fast line fills the backlog within the open).
        let generation = line.attach();
        let id = match tunnel.open(&target) {
            Ok(id) => id,
            Err(e) => {
                line.detach();
                log::warn!("serial {path} -> {target}: {e}; next try in {} ms", retry.as_millis());
                smol::Timer::after(retry).await;
                retry = (retry * 2).min(RETRY_LAST);
                continue;
            }
        };
        log::debug!("serial {path} -> {target}: stream {id}");
        let started = Instant::now();
        let link = LineLink::new(line.clone(), generation);
        let counts = link.counts.clone();
        endpoint::staged::pump(&tunnel, id, link).await;
        line.detach();
        let (sent, answered) = (counts.sent.load(Ordering::Relaxed), counts.answered());
        if !answered && started.elapsed() < QUICK_END {
            log::warn!(
                "serial {path} -> {target}: stream {id} ended at once with no answer \
                 ({sent} bytes sent on it may not have reached the target); next try in {} ms",
                retry.as_millis()
            );
            smol::Timer::after(retry).await;
            retry = (retry * 2).min(RETRY_LAST);
        } else {
            log::debug!("serial {path} -> {target}: stream {id} ended ({sent} bytes up)");
            retry = RETRY_FIRST;
        }
    }
}

/// Who holds a serial service, and since when.
pub(super) struct Holder {
    who: String,
    since: Instant,
}

/// Removes the claim on a serial service when its stream ends.
struct Claim<'a> {
    shared: &'a Shared,
    service: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.shared.consoles.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.service);
    }
}

/// Serves stream `id`, which the station opened to serial service
/// `service`, on behalf of `who`. One holder at a time: two users of a
/// console would each see part of its output.
pub(super) async fn serve_console(
    shared: &Shared,
    tunnel: &Tunnel,
    id: StreamId,
    service: &str,
    who: String,
    config: &SerialConfig,
) {
    let claim = {
        let mut consoles = shared.consoles.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(holder) = consoles.get(service) {
            let reason = format!(
                "service {service:?} is in use by {} (for {} s)",
                holder.who,
                holder.since.elapsed().as_secs()
            );
            log::warn!("{who} asked for serial {}: refused, {reason}", config.path);
            tunnel.reset(id, &reason);
            return;
        }
        consoles.insert(service.to_owned(), Holder { who: who.clone(), since: Instant::now() });
        Claim { shared, service: service.to_owned() }
    };
    let port = match SerialPort::open(config) {
        Ok(port) => port,
        Err(e) => {
            log::warn!("service {service} ({}): cannot open: {e}", config.path);
            tunnel.reset(id, &format!("service {service}: cannot open the serial line: {e}"));
            return;
        }
    };
    log::info!("service {service}: {who} holds serial {} ({})", config.path, describe(config));
    let line = Line::new(config.clone(), format!("service {service:?}"));
    let generation = line.set_port(Some(port.clone()));
    line.attach();
    let link = LineLink::lingering(line.clone(), generation, CONSOLE_LINGER);
    // The reader ends only when the line vanishes; the link then fails and
    // the pump resets the stream. Once the pump is over, the read is dropped.
    let read = async {
        let why = read_line(&line, port).await;
        log::warn!("service {service}: serial {} vanished ({why})", config.path);
        line.set_port(None);
        future::pending::<()>().await;
    };
    future::or(endpoint::staged::pump(tunnel, id, link), read).await;
    log::info!("service {service}: {who} released serial {}", config.path);
    drop(claim);
}

/// What a link did, kept after the pump consumed it.
#[derive(Default)]
struct LinkCounts {
    /// Bytes taken from the backlog into the stream.
    sent: AtomicU64,
    /// Bytes written to the line from the stream.
    received: AtomicU64,
    /// The stream's far end finished: the link reads as ended.
    finished: AtomicBool,
}

impl LinkCounts {
    fn answered(&self) -> bool {
        self.received.load(Ordering::Relaxed) > 0
    }
}

/// One stream's use of a line, shaped like a socket for [`endpoint::staged::pump`]:
/// reads take from the backlog, writes go to the port, and `close` (the
/// far end finished) ends reading too, so the stream completes and the
/// bytes still waiting go to the next one. Fails once the port it started
/// on is gone.
struct LineLink {
    line: Arc<Line>,
    generation: u64,
    counts: Arc<LinkCounts>,
    /// Registered while a read waits for the backlog.
    listener: Option<EventListener>,
    /// After the far end finished, reading goes on until the line is quiet
    /// this long (a console), instead of ending at once (a forward line,
    /// whose later bytes belong to the next conversation).
    linger: Option<Duration>,
    /// Running while a lingering read waits for the line.
    quiet: Option<async_io::Timer>,
}

impl LineLink {
    fn new(line: Arc<Line>, generation: u64) -> LineLink {
        LineLink {
            line,
            generation,
            counts: Arc::default(),
            listener: None,
            linger: None,
            quiet: None,
        }
    }

    /// A console's link: see [`CONSOLE_LINGER`].
    fn lingering(line: Arc<Line>, generation: u64, linger: Duration) -> LineLink {
        LineLink { linger: Some(linger), ..LineLink::new(line, generation) }
    }

    fn vanished(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::BrokenPipe,
            format!("serial line {} vanished", self.line.config.path),
        )
    }

    /// The port this link may use, unless it vanished since.
    fn port(&self, state: &LineState) -> Option<SerialPort> {
        state.port.clone().filter(|_| state.generation == self.generation)
    }
}

impl Clone for LineLink {
    fn clone(&self) -> Self {
        LineLink {
            line: self.line.clone(),
            generation: self.generation,
            counts: self.counts.clone(),
            listener: None,
            linger: self.linger,
            quiet: None,
        }
    }
}

impl AsyncRead for LineLink {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let finished = self.counts.finished.load(Ordering::Acquire);
            {
                let mut state = self.line.lock();
                if self.port(&state).is_none() {
                    return Poll::Ready(Err(self.vanished()));
                }
                if finished && self.linger.is_none() {
                    return Poll::Ready(Ok(0));
                }
                if !state.backlog.is_empty() {
                    let n = copy_out(&mut state.backlog, buf);
                    drop(state);
                    self.counts.sent.fetch_add(n as u64, Ordering::Relaxed);
                    self.line.changed.notify(usize::MAX);
                    self.quiet = None;
                    return Poll::Ready(Ok(n));
                }
            }
            if let (true, Some(linger)) = (finished, self.linger) {
                let quiet = self.quiet.get_or_insert_with(|| async_io::Timer::after(linger));
                if Pin::new(quiet).poll(cx).is_ready() {
                    return Poll::Ready(Ok(0));
                }
            }
            // Listen, then look again before sleeping, so a push between the
            // look and the listen is not missed.
            match self.listener.as_mut() {
                None => self.listener = Some(self.line.changed.listen()),
                Some(listener) => {
                    ready!(Pin::new(listener).poll(cx));
                    self.listener = None;
                }
            }
        }
    }
}

impl AsyncWrite for LineLink {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let port = self.port(&self.line.lock());
        let Some(mut port) = port else {
            return Poll::Ready(Err(self.vanished()));
        };
        let n = ready!(Pin::new(&mut port).poll_write(cx, buf))?;
        self.counts.received.fetch_add(n as u64, Ordering::Relaxed);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// The far end finished: this stream is over for the line.
    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.counts.finished.store(true, Ordering::Release);
        self.line.changed.notify(usize::MAX);
        Poll::Ready(Ok(()))
    }
}

fn copy_out(from: &mut VecDeque<u8>, to: &mut [u8]) -> usize {
    let (head, _) = from.as_slices();
    let n = head.len().min(to.len());
    to[..n].copy_from_slice(&head[..n]);
    from.drain(..n);
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line() -> Arc<Line> {
        let config = SerialConfig {
            path: "/dev/ttyTEST".to_owned(),
            baud: 9600,
            data_bits: 8,
            parity: Parity::None,
            stop_bits: 1,
            flow_control: FlowControl::None,
        };
        Line::new(config, "target \"t\"".to_owned())
    }

    #[test]
    fn without_a_stream_the_backlog_keeps_the_oldest_bytes_and_counts_the_rest() {
        let line = line();
        let first = vec![1u8; LINE_BACKLOG - 10];
        assert!(line.push(&first).is_empty());
        let second = [2u8; 25];
        // Nothing comes back to wait for: 10 kept, 15 dropped.
        assert!(line.push(&second).is_empty());
        {
            let state = line.lock();
            assert_eq!(state.backlog.len(), LINE_BACKLOG);
            assert_eq!(state.backlog.iter().rev().take(11).copied().collect::<Vec<_>>(), {
                let mut tail = vec![2u8; 10];
                tail.push(1);
                tail
            });
            assert_eq!(state.dropped, 15);
        }
        assert!(line.push(&[3u8; 100]).is_empty());
        assert_eq!(line.lock().dropped, 115);
        // Attaching reports the count and starts a new one.
        line.attach();
        assert_eq!(line.lock().dropped, 0);
    }

    #[test]
    fn with_a_stream_attached_what_does_not_fit_is_handed_back() {
        let line = line();
        line.attach();
        assert!(line.push(&vec![0u8; LINE_BACKLOG - 3]).is_empty());
        assert_eq!(line.push(b"abcdef"), b"def");
        assert_eq!(line.lock().dropped, 0);
        assert_eq!(line.lock().backlog.len(), LINE_BACKLOG);
        // Detached again, the same bytes would be dropped.
        line.detach();
        assert!(line.push(b"def").is_empty());
        assert_eq!(line.lock().dropped, 3);
    }

    #[test]
    fn a_link_fails_once_its_port_is_gone_and_keeps_the_backlog() {
        let line = line();
        line.push(b"kept for the next stream");
        let generation = line.attach();
        let mut link = LineLink::new(line.clone(), generation);
        let mut buf = [0u8; 64];
        let read = future::block_on(link.read(&mut buf));
        assert_eq!(read.map_err(|e| e.kind()), Err(io::ErrorKind::BrokenPipe));
        let written = future::block_on(futures_lite::AsyncWriteExt::write(&mut link, b"x"));
        assert_eq!(written.map_err(|e| e.kind()), Err(io::ErrorKind::BrokenPipe));
        assert_eq!(line.lock().backlog.len(), 24);
    }

    #[test]
    fn settings_read_like_a_datasheet() {
        let mut config = line().config.clone();
        assert_eq!(describe(&config), "9600 8N1");
        config.data_bits = 7;
        config.parity = Parity::Even;
        config.stop_bits = 2;
        config.flow_control = FlowControl::Hardware;
        assert_eq!(describe(&config), "9600 7E2 rts/cts");
        config.parity = Parity::Odd;
        config.flow_control = FlowControl::Software;
        assert_eq!(describe(&config), "9600 7O2 xon/xoff");
    }
}
