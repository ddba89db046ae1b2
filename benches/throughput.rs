//! Throughput benchmark driver, run by `scripts/bench` (a benchmark, not a
//! test: nothing here asserts a speed).
//!
//! ```text
//!  source ─tcp─▶ entry ══ route ══▶ sink        "up":   client writes N bytes, the sink counts and hashes
//!  client ◀─tcp─ entry ══ route ══◀ source      "down": the target writes N bytes, the client counts and hashes
//!
//!  routes: direct      entry = the target itself (loopback, no tunnel)
//!          httptunnel  htc ══HTTP══▶ hts          (GNU httptunnel; one connection at a time)
//!          stream      postern agent ══HTTP══▶ postern station, carrier = "stream"
//!          poll        postern agent ══HTTP══▶ postern station, carrier = "poll"
//! ```
//!
//! "up" is agent to station (device to server), "down" the other way. Every
//! route runs as separate processes (the real `postern` binary, the real
//! `hts`/`htc`) on ephemeral loopback ports, all started once; then the
//! rows are measured round-robin, `--repeat` times, so load from other
//! work on the machine falls on every row alike, and the median is
//! reported. Alongside the rate the driver reads the CPU time the route's
//! processes used (`/proc/PID/stat`), which is steadier than the rate on a
//! busy machine, and their peak RSS.
//!
//! To add a route (a proxy in the path, rathole, wstunnel): a [`Route`]
//! variant and its arm in [`Route::start`]. To add a kind of measurement
//! (many streams, latency): a [`Test`] variant and its arm in [`measure`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use postern::keys::PrivateKey;

/// Bytes per application write and read: a common socket buffer size
/// (iperf3's default), so every route sees the same syscall pattern.
const IO_SIZE: usize = 128 * 1024;

/// Length of the pattern block the sources repeat. Not a power of two, so a
/// misplaced or repeated packet or chunk changes the hash.
const BLOCK: usize = (1 << 20) + 24;

/// Longest one transfer may take before the row is reported as failed.
const TRANSFER_LIMIT: Duration = Duration::from_secs(120);

/// Longest a process may take to report its listening port.
const START_LIMIT: Duration = Duration::from_secs(20);

/// Bytes of the warm-up transfer each route gets before it is measured:
/// sessions, connections and allocator pools are set up by then.
const WARM_UP: u64 = 4 << 20;

const MIB: u64 = 1 << 20;
const GIB: f64 = (1u64 << 30) as f64;

fn main() {
    let options = match Options::parse() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("throughput: {message}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(message) = run(&options) {
        eprintln!("throughput: {message}");
        std::process::exit(1);
    }
}

const USAGE: &str = "\
Usage: throughput [--mib N] [--repeat N] [--only NAME,...] [--postern PATH]
                  [--doc FILE] [--command TEXT]
  --mib N        MiB per transfer (default 256)
  --repeat N     measurements per row; the median is reported (default 3)
  --only NAMES   routes to run, comma-separated: direct, httptunnel, stream,
                 poll, and the same with -rtt (e.g. poll-rtt): with --rtt-ms
                 of latency on the hop that crosses the firewall
  --rtt-ms N     round trip the -rtt routes add (default 20)
  --rtt-mib N    MiB per transfer on the -rtt routes (default 16)
  --tests NAMES  tests to run, comma-separated: up,down
  --postern PATH the postern binary (default: the one cargo built with this driver)
  --baseline PATH another postern binary, measured beside the first (adds the
                 routes stream-baseline and poll-baseline)
  --pause SECS   after the warm-up, print the processes' pids and wait, e.g.
                 to attach perf or strace before the measurements
  --doc FILE     rewrite the Throughput section of this Markdown file
  --command TEXT the command line to record in the document";

struct Options {
    bytes: u64,
    repeat: usize,
    routes: Vec<Route>,
    tests: Vec<Test>,
    postern: PathBuf,
    baseline: Option<PathBuf>,
    pause: Option<Duration>,
    /// Round trip the delayed routes add, and the bytes they move per transfer.
    rtt: Duration,
    rtt_bytes: u64,
    doc: Option<PathBuf>,
    command: String,
}

impl Options {
    fn parse() -> Result<Options, String> {
        let mut options = Options {
            bytes: 256 * MIB,
            repeat: 3,
            routes: Route::ALL.to_vec(),
            tests: Test::ALL.to_vec(),
            postern: PathBuf::from(env!("CARGO_BIN_EXE_postern")),
            baseline: None,
            pause: None,
            rtt: Duration::from_millis(20),
            rtt_bytes: 16 * MIB,
            doc: None,
            command: String::from("cargo bench --bench throughput"),
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = || args.next().ok_or(format!("{arg} needs a value"));
            match arg.as_str() {
                // cargo bench passes this to every bench binary.
                "--bench" => {}
                "--mib" => {
                    let text = value()?;
                    let mib: u64 = text.parse().map_err(|_| format!("--mib {text:?}"))?;
                    options.bytes = mib.max(1) * MIB;
                }
                "--repeat" => {
                    let text = value()?;
                    options.repeat = text.parse().map_err(|_| format!("--repeat {text:?}"))?;
                    options.repeat = options.repeat.max(1);
                }
                "--only" => {
                    options.routes = value()?
                        .split(',')
                        .map(|name| Route::named(name).ok_or(format!("no route named {name:?}")))
                        .collect::<Result<_, _>>()?;
                }
                "--tests" => {
                    options.tests = value()?
                        .split(',')
                        .map(|name| Test::named(name).ok_or(format!("no test named {name:?}")))
                        .collect::<Result<_, _>>()?;
                }
                "--postern" => options.postern = value()?.into(),
                "--baseline" => options.baseline = Some(value()?.into()),
                "--rtt-ms" => {
                    let text = value()?;
                    let ms: u64 = text.parse().map_err(|_| format!("--rtt-ms {text:?}"))?;
                    options.rtt = Duration::from_millis(ms);
                }
                "--rtt-mib" => {
                    let text = value()?;
                    let mib: u64 = text.parse().map_err(|_| format!("--rtt-mib {text:?}"))?;
                    options.rtt_bytes = mib.max(1) * MIB;
                }
                "--pause" => {
                    let text = value()?;
                    let secs: f64 = text.parse().map_err(|_| format!("--pause {text:?}"))?;
                    options.pause = Some(Duration::from_secs_f64(secs.max(0.0)));
                }
                "--doc" => options.doc = Some(value()?.into()),
                "--command" => options.command = value()?,
                "-h" | "--help" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        if options.baseline.is_some() {
            for route in Route::BASELINES {
                let carrier =
                    if route == Route::StreamBaseline { Route::Stream } else { Route::Poll };
                if options.routes.contains(&carrier) && !options.routes.contains(&route) {
                    options.routes.push(route);
                }
            }
        }
        Ok(options)
    }
}

/// A way from the client to the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Route {
    Direct,
    Httptunnel,
    Stream,
    Poll,
    /// The carriers again with the `--baseline` binary, for before/after
    /// comparisons of a change measured in one run.
    StreamBaseline,
    PollBaseline,
    /// The routes again with `--rtt` of latency on the hop that crosses the
    /// firewall (client to target, htc to hts, agent to station), added by
    /// a [`DelayProxy`] in this driver: what round trips cost each carrier.
    DirectRtt,
    HttptunnelRtt,
    StreamRtt,
    PollRtt,
}

impl Route {
    const ALL: [Route; 8] = [
        Route::Direct,
        Route::Httptunnel,
        Route::Stream,
        Route::Poll,
        Route::DirectRtt,
        Route::HttptunnelRtt,
        Route::StreamRtt,
        Route::PollRtt,
    ];
    const BASELINES: [Route; 2] = [Route::StreamBaseline, Route::PollBaseline];

    fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Httptunnel => "httptunnel",
            Route::Stream => "stream",
            Route::Poll => "poll",
            Route::StreamBaseline => "stream-baseline",
            Route::PollBaseline => "poll-baseline",
            Route::DirectRtt => "direct-rtt",
            Route::HttptunnelRtt => "httptunnel-rtt",
            Route::StreamRtt => "stream-rtt",
            Route::PollRtt => "poll-rtt",
        }
    }

    /// Whether the route has the `--rtt` delay in it.
    fn delayed(self) -> bool {
        matches!(self, Route::DirectRtt | Route::HttptunnelRtt | Route::StreamRtt | Route::PollRtt)
    }

    /// The routes whose rates this one is compared with: those with the
    /// same delay.
    fn baselines(self) -> (Route, Route) {
        if self.delayed() {
            (Route::DirectRtt, Route::HttptunnelRtt)
        } else {
            (Route::Direct, Route::Httptunnel)
        }
    }

    fn label(self) -> &'static str {
        match self {
            Route::Direct => "direct loopback",
            Route::Httptunnel => "GNU httptunnel (hts/htc)",
            Route::Stream => "postern, carrier stream",
            Route::Poll => "postern, carrier poll",
            Route::StreamBaseline => "postern --baseline build, carrier stream",
            Route::PollBaseline => "postern --baseline build, carrier poll",
            Route::DirectRtt => "direct, with RTT",
            Route::HttptunnelRtt => "GNU httptunnel, with RTT",
            Route::StreamRtt => "postern, carrier stream, with RTT",
            Route::PollRtt => "postern, carrier poll, with RTT",
        }
    }

    fn named(name: &str) -> Option<Route> {
        Route::ALL.into_iter().chain(Route::BASELINES).find(|r| r.name() == name)
    }

    /// Starts the route's processes; the returned entries lead to `targets`.
    fn start(self, targets: &Targets, options: &Options) -> Result<Running, String> {
        let postern = options.postern.as_path();
        let baseline = || options.baseline.as_deref().ok_or("no --baseline binary given");
        let delay = self.delayed().then_some(options.rtt / 2);
        match self {
            Route::Direct | Route::DirectRtt => {
                let mut proxies = Vec::new();
                let mut entry = |target: SocketAddr| match delay {
                    Some(delay) => {
                        let proxy = DelayProxy::start(target, delay)?;
                        let addr = proxy.addr;
                        proxies.push(proxy);
                        Ok::<_, String>(addr)
                    }
                    None => Ok(target),
                };
                let (up, down) = (entry(targets.sink)?, entry(targets.source)?);
                Ok(Running { up, down, procs: Vec::new(), _proxies: proxies, _dir: None })
            }
            Route::Httptunnel | Route::HttptunnelRtt => start_httptunnel(targets, delay),
            Route::Stream | Route::StreamRtt => start_postern(targets, postern, "stream", delay),
            Route::Poll | Route::PollRtt => start_postern(targets, postern, "poll", delay),
            Route::StreamBaseline => start_postern(targets, baseline()?, "stream", None),
            Route::PollBaseline => start_postern(targets, baseline()?, "poll", None),
        }
    }
}

/// What is measured over a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Test {
    /// One connection, client to target ("up": agent to station).
    Up,
    /// One connection, target to client ("down": station to agent).
    Down,
}

impl Test {
    const ALL: [Test; 2] = [Test::Up, Test::Down];

    fn name(self) -> &'static str {
        match self {
            Test::Up => "up",
            Test::Down => "down",
        }
    }

    fn named(name: &str) -> Option<Test> {
        Test::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// A started route: where a client connects for each test, and the
/// processes that carry it (stopped on drop).
struct Running {
    up: SocketAddr,
    down: SocketAddr,
    procs: Vec<Proc>,
    /// Delays on the route, stopped on drop.
    _proxies: Vec<DelayProxy>,
    /// Config files, removed on drop.
    _dir: Option<TempDir>,
}

impl Running {
    /// Names the route's processes that are no longer running (something
    /// on the machine may kill processes by name), or nothing.
    fn exited(&self) -> String {
        let gone: Vec<&str> =
            self.procs.iter().filter(|p| !p.is_running()).map(|p| p.name.as_str()).collect();
        if gone.is_empty() {
            return String::new();
        }
        format!(" ({} no longer running)", gone.join(", "))
    }

    /// Context switches so far (voluntary and not) of all threads of the
    /// route's processes: each is a sleep and a wakeup.
    fn context_switches(&self) -> u64 {
        self.procs.iter().map(Proc::context_switches).sum()
    }

    /// CPU seconds used so far by the route's processes together.
    fn cpu_seconds(&self) -> f64 {
        self.procs.iter().map(|p| p.cpu_seconds()).sum()
    }
}

/// One measurement.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Bytes per second.
    rate: f64,
    /// CPU seconds of the route's processes per GiB moved.
    cpu_per_gib: f64,
    /// Context switches of the route's processes per MiB moved.
    switches_per_mib: f64,
}

fn run(options: &Options) -> Result<(), String> {
    let payload = Payload::new(options.bytes);
    let rtt_payload = Payload::new(options.rtt_bytes);
    let targets = Targets::start()?;
    let machine = Machine::describe();
    eprintln!(
        "{} MiB per transfer, {} repeats; {}",
        options.bytes / MIB,
        options.repeat,
        machine.summary()
    );

    let mut running = BTreeMap::new();
    for &route in &options.routes {
        let started = route.start(&targets, options)?;
        // A short transfer each way first: sessions, connections and pools
        // are set up outside the measurement.
        let warm = Payload::new(WARM_UP);
        for test in Test::ALL {
            measure(&started, test, &warm, &targets)
                .map_err(|e| format!("{} {} warm-up: {e}", route.name(), test.name()))?;
        }
        running.insert(route, started);
    }

    if let Some(pause) = options.pause {
        for (route, started) in &running {
            for proc in &started.procs {
                eprintln!("{}: {} is pid {}", route.name(), proc.name, proc.child.id());
            }
        }
        eprintln!("pausing {pause:?} before the measurements (--pause)");
        thread::sleep(pause);
    }
    let load_before = Machine::load();
    let mut samples: BTreeMap<(Route, Test), Vec<Sample>> = BTreeMap::new();
    let mut failures: BTreeMap<(Route, Test), String> = BTreeMap::new();
    for round in 1..=options.repeat {
        for (&route, started) in &running {
            for &test in &options.tests {
                if failures.contains_key(&(route, test)) {
                    continue;
                }
                let payload = if route.delayed() { &rtt_payload } else { &payload };
                match measure(started, test, payload, &targets) {
                    Ok(sample) => {
                        eprintln!(
                            "round {round}: {:<16} {:<4} {:>8.1} MB/s {:>6.2} CPU s/GiB {:>6.1} switches/MiB",
                            route.name(),
                            test.name(),
                            sample.rate / 1e6,
                            sample.cpu_per_gib,
                            sample.switches_per_mib,
                        );
                        samples.entry((route, test)).or_default().push(sample);
                    }
                    Err(e) => {
                        let e = format!("{e}{}", started.exited());
                        eprintln!("round {round}: {} {}: FAILED: {e}", route.name(), test.name());
                        for proc in &started.procs {
                            eprintln!("  last lines of {}:\n  {}", proc.name, proc.recent_log());
                        }
                        failures.insert((route, test), e);
                    }
                }
            }
        }
    }
    let load_after = Machine::load();
    let rss: BTreeMap<Route, Vec<(String, u64)>> = running
        .iter()
        .map(|(route, r)| {
            (*route, r.procs.iter().map(|p| (p.name.clone(), p.peak_rss())).collect())
        })
        .collect();
    drop(running);

    let report =
        Report { options, machine, load: (load_before, load_after), samples, failures, rss };
    let table = report.markdown();
    println!("{table}");
    if let Some(doc) = &options.doc {
        write_section(doc, &table)?;
        eprintln!("wrote {}", doc.display());
    }
    Ok(())
}

/// Runs one test over a started route.
fn measure(
    route: &Running,
    test: Test,
    payload: &Payload,
    targets: &Targets,
) -> Result<Sample, String> {
    targets.expect(test, payload);
    let cpu_before = route.cpu_seconds();
    let switches_before = route.context_switches();
    let elapsed = match test {
        Test::Up => send_up(route.up, payload, targets)?,
        Test::Down => receive_down(route.down, payload)?,
    };
    let cpu = route.cpu_seconds() - cpu_before;
    let switches = route.context_switches() - switches_before;
    let secs = elapsed.as_secs_f64().max(1e-9);
    Ok(Sample {
        rate: payload.len as f64 / secs,
        cpu_per_gib: cpu * GIB / payload.len as f64,
        switches_per_mib: switches as f64 * MIB as f64 / payload.len as f64,
    })
}

/// Writes the payload into `entry`; done when the sink has seen all of it
/// and the end of the stream.
fn send_up(entry: SocketAddr, payload: &Payload, targets: &Targets) -> Result<Duration, String> {
    let started = Instant::now();
    let mut socket = TcpStream::connect(entry).map_err(|e| format!("connect {entry}: {e}"))?;
    let _ = socket.set_nodelay(true);
    payload.write_to(&mut socket).map_err(|e| format!("write: {e}"))?;
    socket.shutdown(Shutdown::Write).map_err(|e| format!("shutdown: {e}"))?;
    let arrival = targets.arrival()?;
    check(arrival.received, payload)?;
    Ok(arrival.at - started)
}

/// Reads everything the source sends through `entry`.
fn receive_down(entry: SocketAddr, payload: &Payload) -> Result<Duration, String> {
    let started = Instant::now();
    let mut socket = TcpStream::connect(entry).map_err(|e| format!("connect {entry}: {e}"))?;
    let _ = socket.set_nodelay(true);
    socket.set_read_timeout(Some(TRANSFER_LIMIT)).map_err(|e| e.to_string())?;
    let received = Received::read_all(&mut socket).map_err(|e| format!("read: {e}"))?;
    let elapsed = started.elapsed();
    check(received, payload)?;
    Ok(elapsed)
}

fn check(received: Received, payload: &Payload) -> Result<(), String> {
    if received.bytes != payload.len || received.hash != payload.hash {
        return Err(format!(
            "received {} of {} bytes{}",
            received.bytes,
            payload.len,
            if received.hash != payload.hash { ", hash differs" } else { "" }
        ));
    }
    Ok(())
}

/// The bytes a transfer moves: a pattern block repeated to `len` bytes.
struct Payload {
    block: Vec<u8>,
    len: u64,
    /// [`StreamHash`] of all `len` bytes, computed before any transfer.
    hash: u64,
}

impl Payload {
    fn new(len: u64) -> Payload {
        let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ len;
        let mut block = vec![0u8; BLOCK];
        for chunk in block.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
        let mut payload = Payload { block, len, hash: 0 };
        let mut hash = StreamHash::default();
        payload
            .pieces(|piece| {
                hash.update(piece);
                Ok(())
            })
            .expect("hashing cannot fail");
        payload.hash = hash.finish();
        payload
    }

    /// Calls `each` with the payload in pieces of at most [`IO_SIZE`].
    fn pieces(&self, mut each: impl FnMut(&[u8]) -> std::io::Result<()>) -> std::io::Result<()> {
        let mut left = self.len;
        let mut at = 0;
        while left > 0 {
            let n = (BLOCK - at).min(IO_SIZE).min(usize::try_from(left).unwrap_or(usize::MAX));
            each(&self.block[at..at + n])?;
            at = (at + n) % BLOCK;
            left -= n as u64;
        }
        Ok(())
    }

    fn write_to(&self, socket: &mut TcpStream) -> std::io::Result<()> {
        self.pieces(|piece| socket.write_all(piece))
    }
}

/// A fast position-sensitive hash of a byte stream, whatever the read
/// sizes: four independent multiply lanes over 32-byte blocks, so it runs
/// at many GB/s and never limits direct loopback. It catches lost,
/// repeated, reordered and corrupted bytes; it is not cryptographic.
#[derive(Default)]
struct StreamHash {
    lanes: [u64; 4],
    tail: [u8; 32],
    tail_len: usize,
    total: u64,
}

impl StreamHash {
    const PRIME: u64 = 0x9e37_79b1_85eb_ca87;

    fn update(&mut self, mut bytes: &[u8]) {
        self.total += bytes.len() as u64;
        if self.tail_len > 0 {
            let take = (32 - self.tail_len).min(bytes.len());
            self.tail[self.tail_len..self.tail_len + take].copy_from_slice(&bytes[..take]);
            self.tail_len += take;
            bytes = &bytes[take..];
            if self.tail_len < 32 {
                return;
            }
            let tail = self.tail;
            self.mix(&tail);
            self.tail_len = 0;
        }
        let blocks = bytes.chunks_exact(32);
        let rest = blocks.remainder();
        for block in blocks {
            self.mix(block.try_into().expect("chunks_exact gives 32 bytes"));
        }
        self.tail[..rest.len()].copy_from_slice(rest);
        self.tail_len = rest.len();
    }

    fn mix(&mut self, block: &[u8; 32]) {
        for (i, lane) in self.lanes.iter_mut().enumerate() {
            let word = u64::from_le_bytes(block[8 * i..8 * i + 8].try_into().expect("8 bytes"));
            *lane = (*lane ^ word).wrapping_mul(Self::PRIME).rotate_left(29);
        }
    }

    fn finish(mut self) -> u64 {
        let mut last = [0u8; 32];
        last[..self.tail_len].copy_from_slice(&self.tail[..self.tail_len]);
        last[24..].copy_from_slice(&self.total.to_le_bytes());
        self.mix(&last);
        self.lanes.iter().fold(0, |acc, lane| (acc ^ lane).wrapping_mul(Self::PRIME))
    }
}

/// Byte count and hash of what one connection delivered.
#[derive(Debug, Clone, Copy)]
struct Received {
    bytes: u64,
    hash: u64,
}

impl Received {
    fn read_all(socket: &mut TcpStream) -> std::io::Result<Received> {
        let mut hash = StreamHash::default();
        let mut buf = vec![0u8; IO_SIZE];
        loop {
            let n = socket.read(&mut buf)?;
            if n == 0 {
                let bytes = hash.total;
                return Ok(Received { bytes, hash: hash.finish() });
            }
            hash.update(&buf[..n]);
        }
    }
}

/// What the sink reports when a connection ends.
struct Arrival {
    received: Received,
    at: Instant,
}

/// The two targets every route leads to: a sink that counts and hashes
/// what it is sent, and a source that sends the payload of the current test.
struct Targets {
    sink: SocketAddr,
    source: SocketAddr,
    arrivals: mpsc::Receiver<Arrival>,
    /// The payload the source sends to the next connection.
    next_download: mpsc::Sender<(u64, Vec<u8>)>,
}

impl Targets {
    fn start() -> Result<Targets, String> {
        let sink = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let source = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let (sink_addr, source_addr) = (
            sink.local_addr().map_err(|e| e.to_string())?,
            source.local_addr().map_err(|e| e.to_string())?,
        );
        let (arrived, arrivals) = mpsc::channel();
        thread::spawn(move || {
            for socket in sink.incoming().flatten() {
                let arrived = arrived.clone();
                thread::spawn(move || {
                    let mut socket = socket;
                    let _ = socket.set_nodelay(true);
                    if let Ok(received) = Received::read_all(&mut socket) {
                        let _ = arrived.send(Arrival { received, at: Instant::now() });
                    }
                });
            }
        });
        let (next_download, payloads) = mpsc::channel::<(u64, Vec<u8>)>();
        thread::spawn(move || {
            let mut current = std::sync::Arc::new(Payload { block: Vec::new(), len: 0, hash: 0 });
            for socket in source.incoming().flatten() {
                while let Ok((len, block)) = payloads.try_recv() {
                    current = std::sync::Arc::new(Payload { block, len, hash: 0 });
                }
                let payload = current.clone();
                thread::spawn(move || {
                    let mut socket = socket;
                    let _ = socket.set_nodelay(true);
                    if payload.write_to(&mut socket).is_ok() {
                        let _ = socket.shutdown(Shutdown::Write);
                        // Until the client closes, so its read sees a clean end.
                        let mut rest = [0u8; 64];
                        while matches!(socket.read(&mut rest), Ok(n) if n > 0) {}
                    }
                });
            }
        });
        Ok(Targets { sink: sink_addr, source: source_addr, arrivals, next_download })
    }

    /// Sets what the source sends next and forgets stray sink arrivals.
    fn expect(&self, test: Test, payload: &Payload) {
        while self.arrivals.try_recv().is_ok() {}
        if test == Test::Down {
            let _ = self.next_download.send((payload.len, payload.block.clone()));
        }
    }

    /// The sink's report on the transfer under way. Connections that carry
    /// nothing (a tunnel probing its target) are not transfers.
    fn arrival(&self) -> Result<Arrival, String> {
        let deadline = Instant::now() + TRANSFER_LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.arrivals.recv_timeout(left) {
                Ok(arrival) if arrival.received.bytes == 0 => continue,
                Ok(arrival) => return Ok(arrival),
                Err(_) => {
                    return Err(format!("nothing reached the sink within {TRANSFER_LIMIT:?}"))
                }
            }
        }
    }
}

/// A process of a route, killed on drop.
struct Proc {
    name: String,
    child: Child,
    /// The last lines it wrote to stderr, for error messages.
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Proc {
    /// Starts `command`; every stderr line also goes to `lines`.
    fn spawn(
        name: &str,
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
        Ok(Proc { name: name.to_owned(), child, log })
    }

    fn stat_field(&self, file: &str) -> Option<String> {
        std::fs::read_to_string(format!("/proc/{}/{file}", self.child.id())).ok()
    }

    /// Whether the process still runs (not exited, not a zombie).
    fn is_running(&self) -> bool {
        let Some(stat) = self.stat_field("stat") else { return false };
        let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
        !matches!(state, None | Some("Z" | "X"))
    }

    /// Context switches of all the process's threads so far.
    fn context_switches(&self) -> u64 {
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
    fn cpu_seconds(&self) -> f64 {
        let Some(stat) = self.stat_field("stat") else { return 0.0 };
        // Fields after the parenthesised command name; utime and stime are
        // fields 14 and 15 of the whole line.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: u64 = [11, 12].iter().filter_map(|&i| fields.get(i)?.parse::<u64>().ok()).sum();
        ticks as f64 / clock_ticks()
    }

    /// Peak resident set size in bytes.
    fn peak_rss(&self) -> u64 {
        let status = self.stat_field("status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    }

    fn recent_log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).join("\n  ")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn clock_ticks() -> f64 {
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

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Result<TempDir, String> {
        let path =
            std::env::temp_dir().join(format!("postern-bench-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits for a stderr line containing `marker` and returns what follows it.
fn wait_for_line(
    lines: &mpsc::Receiver<String>,
    marker: &str,
    proc: &Proc,
) -> Result<String, String> {
    let deadline = Instant::now() + START_LIMIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                if let Some((_, rest)) = line.split_once(marker) {
                    return Ok(rest.to_owned());
                }
            }
            Err(_) => {
                return Err(format!(
                    "{} did not log {marker:?} within {START_LIMIT:?}; its last lines:\n  {}",
                    proc.name,
                    proc.recent_log()
                ))
            }
        }
    }
}

fn parse_port(text: &str) -> Option<u16> {
    let digits: String = text.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn start_postern(
    targets: &Targets,
    postern: &Path,
    carrier: &str,
    delay: Option<Duration>,
) -> Result<Running, String> {
    let dir = TempDir::new(&format!("{carrier}-{}", delay.map_or(0, |d| d.as_micros())))?;
    let station_key = PrivateKey::generate();
    let agent_key = PrivateKey::generate();
    let station_toml = format!(
        "listen = \"127.0.0.1:0\"\nprivate_key = \"{}\"\n\n[targets]\nsink = \"{}\"\nsource = \"{}\"\n\n\
         [[devices]]\nname = \"bench\"\npublic_key = \"{}\"\nallow = [\"sink\", \"source\"]\n",
        station_key.to_base64(),
        targets.sink,
        targets.source,
        agent_key.public_key().to_base64(),
    );
    let station_path = dir.0.join("station.toml");
    std::fs::write(&station_path, station_toml).map_err(|e| e.to_string())?;
    let (tx, station_lines) = mpsc::channel();
    let station = Proc::spawn(
        &format!("postern station ({carrier})"),
        Command::new(postern).arg("station").arg("-c").arg(&station_path),
        tx,
    )?;
    let rest = wait_for_line(&station_lines, "station listening on 127.0.0.1:", &station)?;
    let mut port = parse_port(&rest).ok_or(format!("no port in station log line {rest:?}"))?;
    let mut proxies = Vec::new();
    if let Some(delay) = delay {
        let proxy = DelayProxy::start(SocketAddr::from(([127, 0, 0, 1], port)), delay)?;
        port = proxy.addr.port();
        proxies.push(proxy);
    }

    // The config refuses two forwards on port 0, so ask for free ports.
    let (up_port, down_port) = (free_port()?, free_port()?);
    let agent_toml = format!(
        "station = \"http://127.0.0.1:{port}/\"\nstation_public_key = \"{}\"\nprivate_key = \"{}\"\n\
         carrier = \"{carrier}\"\n\n[[forward]]\nlisten = \"127.0.0.1:{up_port}\"\ntarget = \"sink\"\n\n\
         [[forward]]\nlisten = \"127.0.0.1:{down_port}\"\ntarget = \"source\"\n",
        station_key.public_key().to_base64(),
        agent_key.to_base64(),
    );
    let agent_path = dir.0.join("agent.toml");
    std::fs::write(&agent_path, agent_toml).map_err(|e| e.to_string())?;
    let (tx, agent_lines) = mpsc::channel();
    let agent = Proc::spawn(
        &format!("postern agent ({carrier})"),
        Command::new(postern)
            .arg("agent")
            .arg("-c")
            .arg(&agent_path)
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy"),
        tx,
    )?;
    let mut entries = BTreeMap::new();
    for _ in 0..2 {
        let rest = wait_for_line(&agent_lines, "forwarding 127.0.0.1:", &agent)?;
        let port = parse_port(&rest).ok_or(format!("no port in agent log line {rest:?}"))?;
        let target = rest.rsplit('"').nth(1).unwrap_or_default().to_owned();
        entries.insert(target, SocketAddr::from(([127, 0, 0, 1], port)));
    }
    let entry =
        |name: &str| entries.get(name).copied().ok_or(format!("agent forwards no {name:?}"));
    Ok(Running {
        up: entry("sink")?,
        down: entry("source")?,
        procs: vec![station, agent],
        _proxies: proxies,
        _dir: Some(dir),
    })
}

/// A loopback port free at the time of asking, for programs that cannot
/// report the port they bound (hts, htc).
fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(listener.local_addr().map_err(|e| e.to_string())?.port())
}

/// Whether something listens on TCP `port`, from /proc/net/tcp, without
/// connecting (htc would take a connection as the one it carries).
fn listening(port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let local_port = fields.get(1).and_then(|a| a.rsplit(':').next());
        local_port.and_then(|p| u16::from_str_radix(p, 16).ok()) == Some(port)
            && fields.get(3) == Some(&"0A")
    })
}

fn wait_listening(port: u16, proc: &Proc) -> Result<(), String> {
    let deadline = Instant::now() + START_LIMIT;
    while !listening(port) {
        if Instant::now() > deadline {
            return Err(format!("{} is not listening on {port}: {}", proc.name, proc.recent_log()));
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// One hts/htc pair per target: httptunnel carries one connection at a
/// time to one fixed destination.
fn start_httptunnel(targets: &Targets, delay: Option<Duration>) -> Result<Running, String> {
    let mut procs = Vec::new();
    let mut proxies = Vec::new();
    let mut entries = Vec::new();
    for target in [targets.sink, targets.source] {
        let hts_port = free_port()?;
        let (tx, _) = mpsc::channel();
        let hts = Proc::spawn(
            "hts",
            Command::new("hts").args([
                "-w",
                "-F",
                &target.to_string(),
                &format!("127.0.0.1:{hts_port}"),
            ]),
            tx,
        )?;
        wait_listening(hts_port, &hts)?;
        let mut hts_addr = SocketAddr::from(([127, 0, 0, 1], hts_port));
        if let Some(delay) = delay {
            let proxy = DelayProxy::start(hts_addr, delay)?;
            hts_addr = proxy.addr;
            proxies.push(proxy);
        }
        let htc_port = free_port()?;
        let (tx, _) = mpsc::channel();
        let htc = Proc::spawn(
            "htc",
            Command::new("htc").args(["-w", "-F", &htc_port.to_string(), &hts_addr.to_string()]),
            tx,
        )?;
        wait_listening(htc_port, &htc)?;
        procs.extend([hts, htc]);
        entries.push(SocketAddr::from(([127, 0, 0, 1], htc_port)));
    }
    Ok(Running { up: entries[0], down: entries[1], procs, _proxies: proxies, _dir: None })
}

/// Where the numbers were measured.
struct Machine {
    cpus: usize,
    cpu_model: String,
    kernel: String,
    date: String,
}

impl Machine {
    fn describe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(|| "unknown CPU".to_owned(), |(_, m)| m.trim().to_owned());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".to_owned(), |k| k.trim().to_owned());
        let date = Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map_or_else(|| "unknown date".to_owned(), |d| d.trim().to_owned());
        Machine {
            cpus: thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            kernel,
            date,
        }
    }

    fn summary(&self) -> String {
        format!("{} CPUs ({}), Linux {}", self.cpus, self.cpu_model, self.kernel)
    }

    /// The 1-minute load average.
    fn load() -> String {
        std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next().map(str::to_owned))
            .unwrap_or_else(|| "?".to_owned())
    }
}

struct Report<'a> {
    options: &'a Options,
    machine: Machine,
    load: (String, String),
    samples: BTreeMap<(Route, Test), Vec<Sample>>,
    failures: BTreeMap<(Route, Test), String>,
    rss: BTreeMap<Route, Vec<(String, u64)>>,
}

/// A rate in MB/s, with a decimal where the number is small.
fn megabytes(rate: f64) -> String {
    let mb = rate / 1e6;
    if mb < 100.0 {
        format!("{mb:.1}")
    } else {
        format!("{mb:.0}")
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

impl Report<'_> {
    fn median_rate(&self, route: Route, test: Test) -> Option<f64> {
        let samples = self.samples.get(&(route, test))?;
        Some(median(&mut samples.iter().map(|s| s.rate).collect::<Vec<_>>()))
    }

    fn markdown(&self) -> String {
        let o = self.options;
        let mut out = String::new();
        let _ = writeln!(out, "Measured {} on {}.", self.machine.date, self.machine.summary());
        let _ = writeln!(
            out,
            "One TCP connection, {} MiB per transfer, median of {} (min–max in brackets); \
             MB/s is 10^6 bytes per second. Load average {} before the rounds, {} after.",
            o.bytes / MIB,
            o.repeat,
            self.load.0,
            self.load.1
        );
        if o.routes.iter().any(|r| r.delayed()) {
            let _ = writeln!(
                out,
                "Rows \"with RTT\" add {} ms of round trip on the hop that crosses the \
                 firewall (client–target, htc–hts, agent–station) with a relay in the bench \
                 driver that holds each byte {} ms each way (up to 4 MiB in flight per \
                 direction), and move {} MiB per transfer; their ratios are to the direct and \
                 httptunnel rows with the same delay.",
                o.rtt.as_millis(),
                o.rtt.as_millis() / 2,
                o.rtt_bytes / MIB
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "```sh\n{}\n```\n", o.command);
        let _ =
            writeln!(out, "| route | direction | MB/s | vs direct | vs httptunnel | CPU s/GiB |");
        let _ = writeln!(out, "|---|---|---:|---:|---:|---:|");
        for &route in &o.routes {
            for &test in &o.tests {
                let key = (route, test);
                let direction = match test {
                    Test::Up => "up (agent → station)",
                    Test::Down => "down (station → agent)",
                };
                if let Some(reason) = self.failures.get(&key) {
                    if !self.samples.contains_key(&key) {
                        let _ = writeln!(
                            out,
                            "| {} | {direction} | failed: {reason} | | | |",
                            route.label()
                        );
                        continue;
                    }
                }
                let Some(samples) = self.samples.get(&key) else { continue };
                let mut rates: Vec<f64> = samples.iter().map(|s| s.rate).collect();
                let rate = median(&mut rates);
                let (low, high) = (rates[0], rates[rates.len() - 1]);
                let ratio = |base: Route| {
                    self.median_rate(base, test)
                        .filter(|_| base != route)
                        .map_or_else(|| "".to_owned(), |b| format!("{:.2}×", rate / b))
                };
                let of_tunnel = |figure: fn(&Sample) -> f64, digits: usize| {
                    if matches!(route, Route::Direct | Route::DirectRtt) {
                        return "–".to_owned();
                    }
                    let value = median(&mut samples.iter().map(figure).collect::<Vec<_>>());
                    format!("{value:.digits$}")
                };
                let cpu = of_tunnel(|s| s.cpu_per_gib, 2);
                let _ = writeln!(
                    out,
                    "| {} | {direction} | {} ({}–{}) | {} | {} | {cpu} |",
                    route.label(),
                    megabytes(rate),
                    megabytes(low),
                    megabytes(high),
                    ratio(route.baselines().0),
                    ratio(route.baselines().1),
                );
            }
        }
        let with_procs: Vec<String> = self
            .rss
            .iter()
            .filter(|(_, procs)| !procs.is_empty())
            .map(|(route, procs)| {
                let each: Vec<String> = procs
                    .iter()
                    .map(|(name, rss)| format!("{name} {:.1} MiB", *rss as f64 / MIB as f64))
                    .collect();
                format!("{}: {}", route.name(), each.join(", "))
            })
            .collect();
        if !with_procs.is_empty() {
            let _ = writeln!(out, "\nPeak RSS over the whole run: {}.", with_procs.join("; "));
        }
        out
    }
}

const BEGIN: &str = "<!-- scripts/bench: throughput table begins -->";
const END: &str = "<!-- scripts/bench: throughput table ends -->";

/// Replaces the generated part of the Throughput section, leaving every
/// other part of the document as it is.
fn write_section(doc: &Path, table: &str) -> Result<(), String> {
    let text = std::fs::read_to_string(doc).unwrap_or_default();
    let generated = format!("{BEGIN}\n{table}{END}");
    let updated = match (text.find(BEGIN), text.find(END)) {
        (Some(begin), Some(end)) if begin < end => {
            format!("{}{generated}{}", &text[..begin], &text[end + END.len()..])
        }
        _ => {
            let mut text = if text.is_empty() { "# Benchmarks\n".to_owned() } else { text };
            if !text.ends_with('\n') {
                text.push('\n');
            }
            format!("{text}\n## Throughput\n\n{generated}\n")
        }
    };
    std::fs::write(doc, updated).map_err(|e| format!("{}: {e}", doc.display()))
}

/// Bytes a [`DelayProxy`] holds per direction: about what a TCP window
/// lets a sender have in flight on such a path.
const DELAY_BUFFER: usize = 4 << 20;

/// A TCP relay that delivers every byte `delay` after it arrived, each way:
/// latency on one hop of a route, without touching the machine's network
/// settings (netem on loopback would slow every other user of it). It
/// models a path's delay, not its bandwidth or loss.
struct DelayProxy {
    addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl DelayProxy {
    fn start(upstream: SocketAddr, delay: Duration) -> Result<DelayProxy, String> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        thread::spawn(move || {
            for client in listener.incoming() {
                if stopped.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(upstream) else { continue };
                for (from, to) in [(&client, &server), (&server, &client)] {
                    let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else { continue };
                    Self::relay(from, to, delay);
                }
            }
        });
        Ok(DelayProxy { addr, stop })
    }

    /// Moves bytes from `from` to `to` `delay` late; ends with a half-close.
    fn relay(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
        let _ = from.set_nodelay(true);
        let _ = to.set_nodelay(true);
        // The channel bound, in chunks of at most 64 KiB, is the relay's buffer.
        let (tx, rx) = mpsc::sync_channel::<(Instant, Vec<u8>)>(DELAY_BUFFER / (64 << 10));
        thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                }
            }
            // Dropping the sender tells the writer the stream ended.
        });
        thread::spawn(move || {
            while let Ok((due, bytes)) = rx.recv() {
                thread::sleep(due.saturating_duration_since(Instant::now()));
                if to.write_all(&bytes).is_err() {
                    return;
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        });
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}
