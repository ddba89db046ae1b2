//! Benchmark driver, run by `scripts/bench`: postern beside the tools users
//! would pick instead, every figure measured in one run (a benchmark, not a
//! test: nothing here asserts a speed).
//!
//! ```text
//!  source ─tcp─▶ entry ══ route ══▶ sink        "up":   client writes N bytes, the sink counts and hashes
//!  client ◀─tcp─ entry ══ route ══◀ source      "down": the target writes N bytes, the client counts and hashes
//!  client ◀─tcp─▶ entry ══ route ══▶ echo        "latency": 64-byte messages, one at a time
//!
//!  routes: direct         entry = the target itself (loopback, no tunnel)
//!          httptunnel     htc ══HTTP══▶ hts          (GNU httptunnel; one connection at a time)
//!          rathole-tcp    rathole server ══TCP══▶ rathole client
//!          rathole-noise  rathole server ══Noise over TCP══▶ rathole client
//!          wstunnel       wstunnel client ══WebSocket══▶ wstunnel server   (when a binary is given)
//!          stream, poll   postern agent ══HTTP══▶ postern station, carrier = "stream" / "poll"
//!          *-squid        ... agent (or htc) ══▶ squid (forward proxy, CONNECT denied) ══▶ station
//!          *-nginx        ... agent ══▶ nginx (reverse proxy, stock settings, /tunnel/) ══▶ station
//!          stream-nginx-tuned  the same with README.md's three lines for the stream carrier
//!          *-tls          ... agent ══https══▶ station terminating TLS (a test CA's certificate)
//!          *-nginx-tls    ... agent ══https══▶ nginx terminating TLS, set as README.md says ══▶ station
//!          wstunnel-wss   wstunnel over wss:// (its built-in certificate, unverified by its client)
//!          *-rtt          with 20 ms of round trip on the hop that crosses the firewall:
//!                         by default a real TCP path through two network namespaces
//!                         joined by TUN devices (`--path tun`, support/path.rs), else
//!                         a delaying TCP relay on loopback (`--path relay`)
//! ```
//!
//! "up" is agent to station (device to server), "down" the other way; the
//! `-many` tests run 32 connections at once and report their aggregate.
//! Every route runs as separate processes (the real `postern` binary, the
//! real `hts`/`htc`, `rathole`, `wstunnel`, `squid`, `nginx`) on ephemeral
//! loopback ports, all started once; then the tests are measured
//! round-robin, `--repeat` times, so load from other work on the machine
//! falls on every row alike, and the median is reported. Alongside the rate
//! the driver reads the CPU time of the route's processes
//! (`/proc/PID/stat`), which is steadier than the rate on a busy machine,
//! and their peak RSS. After the rounds, with the routes stopped: the
//! resident memory of a fresh agent (and its peers' device-side processes)
//! holding one idle stream, and the station's memory per connected idle
//! device, with `--devices` real agent processes.
//!
//! To add a route: a [`Route`] variant and its arm in [`Route::start`]. To
//! add a kind of measurement: a [`Test`] variant and its arm in [`measure`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use postern::keys::PrivateKey;

// The integration tests' squid and nginx recipes, so the bench and the
// tests start the same middleboxes. That module takes `TempDir` and
// `refused_addr` from the tests' `common`; ours have the same interfaces.
#[path = "../tests/middleboxes/mod.rs"]
mod middleboxes;
mod support;
use support::path::{DelayedHop, Hop, PathKind, DELAY_BUFFER, MTU, RATE_QUEUE};
use support::*;
mod common {
    pub(crate) use super::support::{refused_addr, TempDir};
}
use middleboxes::pki::Pki;
use middleboxes::Middlebox;

/// Bytes per application write and read: a common socket buffer size
/// (iperf3's default), so every route sees the same syscall pattern.
const IO_SIZE: usize = 128 * 1024;

/// Length of the pattern block the sources repeat. Not a power of two, so a
/// misplaced or repeated packet or chunk changes the hash.
const BLOCK: usize = (1 << 20) + 24;

/// Longest one transfer may take before the row is reported as failed.
const TRANSFER_LIMIT: Duration = Duration::from_secs(120);

/// Longest a warm-up transfer may take: a route that cannot pass 4 MiB in
/// this time (a carrier a middlebox stops) is reported with the reason and
/// not measured.
const WARM_UP_LIMIT: Duration = Duration::from_secs(15);

/// Bytes of the warm-up transfer each route gets before it is measured:
/// sessions, connections and allocator pools are set up by then.
const WARM_UP: u64 = 4 << 20;

/// Bytes of one latency message: a small telemetry record or request.
const MESSAGE: usize = 64;

/// Round trips made before the timed ones of each latency measurement.
const LATENCY_WARM_UP: usize = 20;

/// How long a process sits idle before its resident memory is read: long
/// enough for buffers of the set-up to be freed and the figure to settle.
const SETTLE: Duration = Duration::from_secs(2);

/// Longest the idle devices of the station memory test may take to connect.
const CONNECT_LIMIT: Duration = Duration::from_secs(90);

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
Usage: throughput [--mib N] [--repeat N] [--only NAME,...] [--tests NAME,...] ...
  --mib N          MiB per transfer, split over the connections of the -many
                   tests (default 128)
  --repeat N       measurements per row; the median is reported (default 4)
  --only NAMES     routes to run, comma-separated: direct, httptunnel,
                   rathole-tcp, rathole-noise, wstunnel, wstunnel-wss,
                   stream, poll, stream-squid, poll-squid, stream-nginx,
                   poll-nginx, stream-nginx-tuned, stream-tls, poll-tls
                   (https:// to the station), stream-nginx-tls,
                   poll-nginx-tls (https:// to nginx), and
                   direct-rtt, httptunnel-rtt, rathole-tcp-rtt,
                   rathole-noise-rtt, stream-rtt, poll-rtt: with --rtt-ms of
                   latency on the hop that crosses the firewall
  --tests NAMES    tests to run, comma-separated: up, down, up-many,
                   down-many, latency (default all)
  --streams N      connections of the -many tests (default 32)
  --messages N     timed round trips per latency measurement (default 1000)
  --rtt-ms N       round trip the -rtt routes add (default 20)
  --rtt-mib N      MiB per transfer on the -rtt routes, split over the
                   connections of the -many tests (default 16)
  --rate-mbit N    also limit that hop to N Mbit/s each way, behind a
                   bounded queue (256 KiB, a router's buffer)
  --path tun|relay what that hop is. tun: a real TCP path, two network
                   namespaces joined by TUN devices whose packets the driver
                   delays (and, with --rate-mbit, queues and drops when the
                   queue is full), so TCP meets the round trip, slow start
                   and losses; needs root, /dev/net/tun and ip. relay: a TCP
                   relay on loopback that delays bytes; TCP's own flow
                   control then sees only loopback, which flatters routes
                   that rely on it (direct, rathole). Default: tun where it
                   can be set up, else relay (saying why on stderr)
  --devices N      idle agents for the station memory test, 0 to skip (default 200)
  --no-memory      skip the idle memory and station memory tests
  --postern PATH   the postern binary (default: the one cargo built with this driver)
  --device-agent LABEL=PATH  another agent build (e.g. the device profile),
                   measured idle beside the release build (repeatable)
  --rathole PATH   the rathole binary (the rathole routes are reported as not
                   run without it; --rathole-missing TEXT says why)
  --wstunnel PATH  the wstunnel binary (likewise; --wstunnel-missing TEXT)
  --size LABEL=PATH  a binary whose size goes in the sizes table (repeatable)
  --size-failed LABEL=TEXT  a row of the sizes table for a binary that
                   could not be built, and why
  --sizes-note TEXT  a note printed under the sizes table
  --baseline PATH  another postern binary, measured beside the first (adds the
                   routes stream-baseline and poll-baseline)
  --pause SECS     after the warm-up, print the processes' pids and wait, e.g.
                   to attach perf or strace before the measurements
  --doc FILE       rewrite the generated parts of this Markdown file
  --command TEXT   the command line to record in the document
  --started SECS   Unix time the command started (to report its run time)
  --revision TEXT  the commit measured, for the document";

struct Options {
    bytes: u64,
    repeat: usize,
    routes: Vec<Route>,
    tests: Vec<Test>,
    streams: usize,
    messages: usize,
    postern: PathBuf,
    /// Agent builds measured idle beside the release build, by label.
    device_agents: Vec<(String, PathBuf)>,
    /// The peers' binaries, or why there is none.
    rathole: Result<PathBuf, String>,
    wstunnel: Result<PathBuf, String>,
    /// Binaries for the sizes table, or why one is missing.
    sizes: Vec<(String, Result<PathBuf, String>)>,
    sizes_note: Option<String>,
    baseline: Option<PathBuf>,
    pause: Option<Duration>,
    /// Round trip the delayed routes add, and the bytes they move per transfer.
    rtt: Duration,
    rtt_bytes: u64,
    /// Bytes per second the delayed hop carries each way, if limited.
    rate: Option<f64>,
    /// What the delayed hop is; `None` until chosen after parsing.
    path: Option<PathKind>,
    devices: usize,
    memory: bool,
    doc: Option<PathBuf>,
    command: String,
    /// The commit measured, as the script describes it.
    revision: Option<String>,
    started: Option<u64>,
}

impl Options {
    fn parse() -> Result<Options, String> {
        let mut options = Options {
            bytes: 128 * MIB,
            repeat: 4,
            routes: Route::ALL.to_vec(),
            tests: Test::ALL.to_vec(),
            streams: 32,
            messages: 1000,
            postern: PathBuf::from(env!("CARGO_BIN_EXE_postern")),
            device_agents: Vec::new(),
            rathole: Err("no binary given (scripts/bench builds it)".to_owned()),
            wstunnel: Err("no binary given (WSTUNNEL=/path; it is not on crates.io)".to_owned()),
            sizes: Vec::new(),
            sizes_note: None,
            baseline: None,
            pause: None,
            rtt: Duration::from_millis(20),
            rtt_bytes: 16 * MIB,
            rate: None,
            path: None,
            devices: 200,
            memory: true,
            doc: None,
            command: String::from("cargo bench --bench throughput"),
            revision: None,
            started: None,
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = || args.next().ok_or(format!("{arg} needs a value"));
            fn number<T: std::str::FromStr>(arg: &str, text: String) -> Result<T, String> {
                text.parse().map_err(|_| format!("{arg} {text:?}"))
            }
            match arg.as_str() {
                // cargo bench passes this to every bench binary.
                "--bench" => {}
                "--mib" => options.bytes = number::<u64>(&arg, value()?)?.max(1) * MIB,
                "--repeat" => options.repeat = number::<usize>(&arg, value()?)?.max(1),
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
                "--streams" => options.streams = number::<usize>(&arg, value()?)?.max(1),
                "--messages" => options.messages = number::<usize>(&arg, value()?)?.max(10),
                "--postern" => options.postern = value()?.into(),
                "--device-agent" => {
                    let text = value()?;
                    let (label, path) =
                        text.split_once('=').ok_or(format!("--device-agent {text:?}"))?;
                    options.device_agents.push((label.to_owned(), path.into()));
                }
                "--rathole" => options.rathole = Ok(value()?.into()),
                "--rathole-missing" => options.rathole = Err(value()?),
                "--wstunnel" => options.wstunnel = Ok(value()?.into()),
                "--wstunnel-missing" => options.wstunnel = Err(value()?),
                "--size" => {
                    let text = value()?;
                    let (label, path) = text.split_once('=').ok_or(format!("--size {text:?}"))?;
                    options.sizes.push((label.to_owned(), Ok(path.into())));
                }
                "--size-failed" => {
                    let text = value()?;
                    let (label, why) =
                        text.split_once('=').ok_or(format!("--size-failed {text:?}"))?;
                    options.sizes.push((label.to_owned(), Err(why.to_owned())));
                }
                "--sizes-note" => options.sizes_note = Some(value()?),
                "--baseline" => options.baseline = Some(value()?.into()),
                "--rtt-ms" => {
                    options.rtt = Duration::from_millis(number::<u64>(&arg, value()?)?);
                }
                "--rtt-mib" => options.rtt_bytes = number::<u64>(&arg, value()?)?.max(1) * MIB,
                "--rate-mbit" => {
                    options.rate = Some(number::<f64>(&arg, value()?)?.max(0.1) * 1e6 / 8.0);
                }
                "--path" => {
                    let text = value()?;
                    options.path = Some(
                        PathKind::named(&text).ok_or(format!("--path {text:?}: tun or relay"))?,
                    );
                }
                "--devices" => options.devices = number::<usize>(&arg, value()?)?,
                "--no-memory" => options.memory = false,
                "--pause" => {
                    let secs: f64 = number(&arg, value()?)?;
                    options.pause = Some(Duration::from_secs_f64(secs.max(0.0)));
                }
                "--doc" => options.doc = Some(value()?.into()),
                "--command" => options.command = value()?,
                "--started" => options.started = Some(number::<u64>(&arg, value()?)?),
                "--revision" => options.revision = Some(value()?),
                "-h" | "--help" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        if options.path.is_none() && options.routes.iter().any(|r| r.delayed()) {
            options.path = Some(PathKind::default_here().unwrap_or_else(|why| {
                eprintln!("throughput: the -rtt routes use --path relay: no TUN path here ({why})");
                PathKind::Relay
            }));
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

    /// The rathole binary, or why the rathole rows are not run.
    fn rathole(&self) -> Result<&Path, String> {
        self.rathole.as_deref().map_err(|why| format!("not run: {why}"))
    }

    /// The wstunnel binary, or why the wstunnel rows are not run.
    fn wstunnel(&self) -> Result<&Path, String> {
        self.wstunnel.as_deref().map_err(|why| format!("not run: {why}"))
    }
}

/// Where a postern agent reaches its station.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// Straight to the station's listener.
    Direct,
    /// Through squid as the agent's forward proxy (CONNECT denied).
    Squid,
    /// To nginx, which passes `/tunnel/` to the station with its stock
    /// proxy settings (buffering, HTTP/1.0 upstream, 1 MiB bodies).
    Nginx,
    /// The same with the three lines the README gives for the stream
    /// carrier (HTTP/1.1 upstream, no request buffering, no body limit).
    NginxTuned,
    /// `https://`, to the station terminating TLS itself.
    Tls,
    /// `https://`, to nginx terminating TLS, set as for `NginxTuned`.
    NginxTls,
}

/// The location settings README.md gives for the stream carrier behind nginx.
const NGINX_FOR_STREAM: &str =
    "proxy_http_version 1.1; proxy_request_buffering off; client_max_body_size 0;";

/// A way from the client to the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Route {
    Direct,
    Httptunnel,
    /// htc through squid (its `--proxy`): poll's peer on the same path.
    HttptunnelSquid,
    RatholeTcp,
    RatholeNoise,
    Wstunnel,
    /// wstunnel over `wss://`: its server's built-in certificate, which its
    /// client does not verify by default.
    WstunnelTls,
    Stream,
    Poll,
    StreamSquid,
    PollSquid,
    StreamNginx,
    PollNginx,
    StreamNginxTuned,
    StreamTls,
    PollTls,
    StreamNginxTls,
    PollNginxTls,
    /// The carriers again with the `--baseline` binary, for before/after
    /// comparisons of a change measured in one run.
    StreamBaseline,
    PollBaseline,
    /// The routes again with `--rtt` of latency on the hop that crosses the
    /// firewall (client to target, htc to hts, agent to station), added by
    /// a [`DelayedHop`] in this driver (`--path`): what round trips cost
    /// each carrier.
    DirectRtt,
    HttptunnelRtt,
    RatholeTcpRtt,
    RatholeNoiseRtt,
    StreamRtt,
    PollRtt,
}

impl Route {
    const ALL: [Route; 24] = [
        Route::Direct,
        Route::Httptunnel,
        Route::HttptunnelSquid,
        Route::RatholeTcp,
        Route::RatholeNoise,
        Route::Wstunnel,
        Route::WstunnelTls,
        Route::Stream,
        Route::Poll,
        Route::StreamSquid,
        Route::PollSquid,
        Route::StreamNginx,
        Route::PollNginx,
        Route::StreamNginxTuned,
        Route::StreamTls,
        Route::PollTls,
        Route::StreamNginxTls,
        Route::PollNginxTls,
        Route::DirectRtt,
        Route::HttptunnelRtt,
        Route::RatholeTcpRtt,
        Route::RatholeNoiseRtt,
        Route::StreamRtt,
        Route::PollRtt,
    ];
    const BASELINES: [Route; 2] = [Route::StreamBaseline, Route::PollBaseline];

    fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Httptunnel => "httptunnel",
            Route::HttptunnelSquid => "httptunnel-squid",
            Route::RatholeTcp => "rathole-tcp",
            Route::RatholeNoise => "rathole-noise",
            Route::Wstunnel => "wstunnel",
            Route::WstunnelTls => "wstunnel-wss",
            Route::Stream => "stream",
            Route::Poll => "poll",
            Route::StreamSquid => "stream-squid",
            Route::PollSquid => "poll-squid",
            Route::StreamNginx => "stream-nginx",
            Route::PollNginx => "poll-nginx",
            Route::StreamNginxTuned => "stream-nginx-tuned",
            Route::StreamTls => "stream-tls",
            Route::PollTls => "poll-tls",
            Route::StreamNginxTls => "stream-nginx-tls",
            Route::PollNginxTls => "poll-nginx-tls",
            Route::StreamBaseline => "stream-baseline",
            Route::PollBaseline => "poll-baseline",
            Route::DirectRtt => "direct-rtt",
            Route::HttptunnelRtt => "httptunnel-rtt",
            Route::RatholeTcpRtt => "rathole-tcp-rtt",
            Route::RatholeNoiseRtt => "rathole-noise-rtt",
            Route::StreamRtt => "stream-rtt",
            Route::PollRtt => "poll-rtt",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Route::Direct => "direct loopback",
            Route::Httptunnel => "GNU httptunnel (hts/htc)",
            Route::HttptunnelSquid => "GNU httptunnel, via squid",
            Route::RatholeTcp => "rathole, transport tcp",
            Route::RatholeNoise => "rathole, transport noise",
            Route::Wstunnel => "wstunnel (ws://)",
            Route::WstunnelTls => "wstunnel (wss://, certificate not verified)",
            Route::Stream => "postern, carrier stream",
            Route::Poll => "postern, carrier poll",
            Route::StreamSquid => "postern stream, via squid",
            Route::PollSquid => "postern poll, via squid",
            Route::StreamNginx => "postern stream, behind nginx",
            Route::PollNginx => "postern poll, behind nginx",
            Route::StreamNginxTuned => "postern stream, behind nginx set as the README says",
            Route::StreamTls => "postern stream, https:// to the station",
            Route::PollTls => "postern poll, https:// to the station",
            Route::StreamNginxTls => "postern stream, https:// to nginx (as the README says)",
            Route::PollNginxTls => "postern poll, https:// to nginx (as the README says)",
            Route::StreamBaseline => "postern --baseline build, carrier stream",
            Route::PollBaseline => "postern --baseline build, carrier poll",
            Route::DirectRtt => "direct, with RTT",
            Route::HttptunnelRtt => "GNU httptunnel, with RTT",
            Route::RatholeTcpRtt => "rathole, transport tcp, with RTT",
            Route::RatholeNoiseRtt => "rathole, transport noise, with RTT",
            Route::StreamRtt => "postern, carrier stream, with RTT",
            Route::PollRtt => "postern, carrier poll, with RTT",
        }
    }

    fn named(name: &str) -> Option<Route> {
        Route::ALL.into_iter().chain(Route::BASELINES).find(|r| r.name() == name)
    }

    /// Whether the route has the `--rtt` delay in it.
    fn delayed(self) -> bool {
        matches!(
            self,
            Route::DirectRtt
                | Route::HttptunnelRtt
                | Route::RatholeTcpRtt
                | Route::RatholeNoiseRtt
                | Route::StreamRtt
                | Route::PollRtt
        )
    }

    fn is_direct(self) -> bool {
        matches!(self, Route::Direct | Route::DirectRtt)
    }

    fn is_postern(self) -> bool {
        self.label().starts_with("postern")
    }

    /// The routes whose rates this one is compared with: direct loopback,
    /// httptunnel on the same path (with the same delay, through the same
    /// proxy), rathole's Noise transport.
    fn baselines(self) -> [Option<Route>; 3] {
        match self {
            _ if self.delayed() => {
                [Some(Route::DirectRtt), Some(Route::HttptunnelRtt), Some(Route::RatholeNoiseRtt)]
            }
            Route::StreamSquid | Route::PollSquid => {
                [Some(Route::Direct), Some(Route::HttptunnelSquid), Some(Route::RatholeNoise)]
            }
            _ => [Some(Route::Direct), Some(Route::Httptunnel), Some(Route::RatholeNoise)],
        }
    }

    /// Why `test` is not run over this route, or `None` if it is. `Err`
    /// leaves a row saying why; `Ok(())` leaves the test out silently.
    fn skips(self, test: Test) -> Option<Result<(), String>> {
        let many = matches!(test, Test::UpMany | Test::DownMany);
        if self.delayed() && test == Test::Latency {
            return Some(Ok(()));
        }
        if many && matches!(self, Route::Httptunnel | Route::HttptunnelSquid | Route::HttptunnelRtt)
        {
            return Some(Err("not run: httptunnel carries one connection at a time".to_owned()));
        }
        None
    }

    /// Starts the route's processes; the returned entries lead to `targets`.
    fn start(self, targets: &Targets, options: &Options) -> Result<Running, String> {
        let baseline = || options.baseline.as_deref().ok_or("no --baseline binary given");
        let delay = self.delayed().then_some(Hop {
            one_way: options.rtt / 2,
            rate: options.rate,
            path: options.path.unwrap_or(PathKind::Relay),
        });
        fn postern<'a>(
            binary: &'a Path,
            carrier: &'a str,
            via: Via,
            delay: Option<Hop>,
        ) -> Postern<'a> {
            Postern { station: binary, agent: binary, carrier, via, delay }
        }
        let all = targets.all();
        match self {
            Route::Direct | Route::DirectRtt => {
                let mut proxies = Vec::new();
                let mut entry = |target: SocketAddr| match delay {
                    Some(delay) => {
                        let proxy = DelayedHop::start(target, delay)?;
                        let addr = proxy.addr;
                        proxies.push(proxy);
                        Ok::<_, String>(addr)
                    }
                    None => Ok(target),
                };
                let entries = Entries {
                    up: Some(entry(targets.sink)?),
                    down: Some(entry(targets.source)?),
                    echo: Some(entry(targets.echo)?),
                };
                Ok(Running { entries, procs: Vec::new(), _keep: vec![Box::new(proxies)] })
            }
            Route::Httptunnel | Route::HttptunnelRtt => start_httptunnel(&all, delay, None),
            Route::HttptunnelSquid => {
                let squid = catching(|| Middlebox::squid_with(None, None))
                    .map_err(|e| format!("squid: {e}"))?;
                let mut running = start_httptunnel(&all, None, Some(squid.addr))?;
                running._keep.push(Box::new(squid));
                Ok(running)
            }
            Route::RatholeTcp | Route::RatholeTcpRtt => {
                start_rathole(&all, options.rathole()?, false, delay)
            }
            Route::RatholeNoise | Route::RatholeNoiseRtt => {
                start_rathole(&all, options.rathole()?, true, delay)
            }
            Route::Wstunnel => start_wstunnel(&all, options.wstunnel()?, "ws"),
            Route::WstunnelTls => start_wstunnel(&all, options.wstunnel()?, "wss"),
            Route::Stream | Route::StreamRtt => {
                postern(&options.postern, "stream", Via::Direct, delay).start(&all)
            }
            Route::Poll | Route::PollRtt => {
                postern(&options.postern, "poll", Via::Direct, delay).start(&all)
            }
            Route::StreamSquid => {
                postern(&options.postern, "stream", Via::Squid, delay).start(&all)
            }
            Route::PollSquid => postern(&options.postern, "poll", Via::Squid, delay).start(&all),
            Route::StreamNginx => {
                postern(&options.postern, "stream", Via::Nginx, delay).start(&all)
            }
            Route::PollNginx => postern(&options.postern, "poll", Via::Nginx, delay).start(&all),
            Route::StreamNginxTuned => {
                postern(&options.postern, "stream", Via::NginxTuned, delay).start(&all)
            }
            Route::StreamTls => postern(&options.postern, "stream", Via::Tls, delay).start(&all),
            Route::PollTls => postern(&options.postern, "poll", Via::Tls, delay).start(&all),
            Route::StreamNginxTls => {
                postern(&options.postern, "stream", Via::NginxTls, delay).start(&all)
            }
            Route::PollNginxTls => {
                postern(&options.postern, "poll", Via::NginxTls, delay).start(&all)
            }
            Route::StreamBaseline => postern(baseline()?, "stream", Via::Direct, delay).start(&all),
            Route::PollBaseline => postern(baseline()?, "poll", Via::Direct, delay).start(&all),
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
    /// `--streams` connections at once, each moving its share up.
    UpMany,
    /// `--streams` connections at once, each moving its share down.
    DownMany,
    /// Small messages to the echo target and back, one at a time.
    Latency,
}

impl Test {
    const ALL: [Test; 5] = [Test::Up, Test::Down, Test::UpMany, Test::DownMany, Test::Latency];

    fn name(self) -> &'static str {
        match self {
            Test::Up => "up",
            Test::Down => "down",
            Test::UpMany => "up-many",
            Test::DownMany => "down-many",
            Test::Latency => "latency",
        }
    }

    fn named(name: &str) -> Option<Test> {
        Test::ALL.into_iter().find(|t| t.name() == name)
    }

    fn label(self, streams: usize) -> String {
        match self {
            Test::Up => "up (agent → station)".to_owned(),
            Test::Down => "down (station → agent)".to_owned(),
            Test::UpMany => format!("{streams} streams up"),
            Test::DownMany => format!("{streams} streams down"),
            Test::Latency => "latency".to_owned(),
        }
    }
}

/// Where a client connects, per target, to go through a route.
#[derive(Debug, Clone, Copy)]
struct Entries {
    up: Option<SocketAddr>,
    down: Option<SocketAddr>,
    echo: Option<SocketAddr>,
}

/// A started route: its entries and the processes that carry it (stopped
/// on drop).
struct Running {
    entries: Entries,
    procs: Vec<Proc>,
    /// Whatever else must live as long as the route: delay relays,
    /// middleboxes, config directories. Dropped (stopped, removed) with it.
    _keep: Vec<Box<dyn std::any::Any>>,
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

    /// CPU seconds used so far by the route's processes on each side.
    fn cpu_seconds(&self) -> [f64; 2] {
        let mut sides = [0.0; 2];
        for proc in &self.procs {
            sides[proc.side as usize] += proc.cpu_seconds();
        }
        sides
    }

    /// The largest of each side's current or peak RSS.
    fn rss(&self, of: fn(&Proc) -> u64) -> [u64; 2] {
        let mut sides = [0; 2];
        for proc in &self.procs {
            sides[proc.side as usize] = sides[proc.side as usize].max(of(proc));
        }
        sides
    }

    /// The route's last log line containing `marker` (a process's own
    /// account of why a transfer failed), or nothing.
    fn logged(&self, marker: &str) -> String {
        self.procs.iter().find_map(|p| p.last_line_containing(marker)).map_or_else(
            String::new,
            |line| {
                // From the marker on, without the advice that follows.
                let from = line.find(marker).map_or(line.as_str(), |at| &line[at..]);
                let said = from.split("; reconnecting").next().unwrap_or(from);
                format!("; the agent logs \"{said}\"")
            },
        )
    }
}

/// One throughput measurement.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Bytes per second.
    rate: f64,
    /// CPU seconds of the route's processes per GiB moved, device side and
    /// central side.
    cpu_per_gib: [f64; 2],
    /// Context switches of the route's processes per MiB moved.
    switches_per_mib: f64,
}

/// One latency measurement: percentiles of `--messages` round trips.
#[derive(Debug, Clone, Copy)]
struct Latency {
    p50: Duration,
    p99: Duration,
}

enum Outcome {
    Rate(Sample),
    Latency(Latency),
}

fn run(options: &Options) -> Result<(), String> {
    let run_started = Instant::now();
    let payload = Payload::new(options.bytes);
    let share = Payload::new(options.bytes / options.streams as u64);
    let rtt_payload = Payload::new(options.rtt_bytes);
    let rtt_share = Payload::new(options.rtt_bytes / options.streams as u64);
    let targets = Targets::start()?;
    let machine = Machine::describe();
    eprintln!(
        "{} MiB per transfer, {} repeats; {}; load average {}",
        options.bytes / MIB,
        options.repeat,
        machine.summary(),
        Machine::load()
    );

    let mut failures: BTreeMap<(Route, Test), String> = BTreeMap::new();
    let mut running = BTreeMap::new();
    for &route in &options.routes {
        let fail_all = |failures: &mut BTreeMap<(Route, Test), String>, reason: &str| {
            for &test in &options.tests {
                if route.skips(test).is_none() {
                    failures.insert((route, test), reason.to_owned());
                }
            }
        };
        eprintln!("starting {}", route.name());
        let started = match route.start(&targets, options) {
            Ok(started) => started,
            Err(e) => {
                eprintln!("{}: {e}", route.name());
                let reason = if e.starts_with("not run") { e } else { format!("failed: {e}") };
                fail_all(&mut failures, &reason);
                continue;
            }
        };
        // A short transfer each way first: sessions, connections and pools
        // are set up outside the measurement. A direction the route cannot
        // carry is reported with the reason and not measured; a route that
        // carries neither is stopped.
        let warm = Payload::new(WARM_UP);
        let mut cold = 0;
        for (test, many) in [(Test::Up, Test::UpMany), (Test::Down, Test::DownMany)] {
            if let Err(e) = measure(&started, test, &warm, &targets, options, WARM_UP_LIMIT) {
                let why = format!("failed: {e} (warm-up){}", started.logged("carrier stream:"));
                eprintln!("{} {}: {why}", route.name(), test.name());
                for test in [test, many] {
                    failures.insert((route, test), why.clone());
                }
                cold += 1;
            }
        }
        if cold == 2 {
            let why = failures[&(route, Test::Up)].clone();
            fail_all(&mut failures, &why);
            continue;
        }
        for &test in &options.tests {
            if let Some(Err(reason)) = route.skips(test) {
                failures.insert((route, test), reason);
            }
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
    let mut latencies: BTreeMap<Route, Vec<Latency>> = BTreeMap::new();
    for round in 1..=options.repeat {
        let round_started = Instant::now();
        for (&route, started) in &running {
            for &test in &options.tests {
                if failures.contains_key(&(route, test)) || route.skips(test).is_some() {
                    continue;
                }
                let payload = match test {
                    Test::UpMany | Test::DownMany if route.delayed() => &rtt_share,
                    _ if route.delayed() => &rtt_payload,
                    Test::UpMany | Test::DownMany => &share,
                    _ => &payload,
                };
                match measure(started, test, payload, &targets, options, TRANSFER_LIMIT) {
                    Ok(Outcome::Rate(sample)) => {
                        eprintln!(
                            "round {round}: {:<14} {:<9} {:>8.1} MB/s {:>5.2}+{:<5.2} CPU s/GiB {:>6.1} switches/MiB",
                            route.name(),
                            test.name(),
                            sample.rate / 1e6,
                            sample.cpu_per_gib[0],
                            sample.cpu_per_gib[1],
                            sample.switches_per_mib,
                        );
                        samples.entry((route, test)).or_default().push(sample);
                    }
                    Ok(Outcome::Latency(latency)) => {
                        eprintln!(
                            "round {round}: {:<14} {:<9} p50 {:>8.3} ms p99 {:>8.3} ms",
                            route.name(),
                            test.name(),
                            millis(latency.p50),
                            millis(latency.p99),
                        );
                        latencies.entry(route).or_default().push(latency);
                    }
                    Err(e) => {
                        let e = format!("{e}{}", started.exited());
                        eprintln!("round {round}: {} {}: FAILED: {e}", route.name(), test.name());
                        for proc in &started.procs {
                            eprintln!("  last lines of {}:\n  {}", proc.name, proc.recent_log());
                        }
                        failures.insert((route, test), format!("failed: {e}"));
                    }
                }
            }
        }
        eprintln!("round {round} took {:.0} s", round_started.elapsed().as_secs_f64());
    }
    let load_after = Machine::load();
    let peak_rss: BTreeMap<Route, [u64; 2]> =
        running.iter().map(|(route, r)| (*route, r.rss(Proc::peak_rss))).collect();
    drop(running);

    let (idle, devices) = if options.memory {
        let idle = idle_memory(&targets, options);
        let devices = ["stream", "poll"]
            .into_iter()
            .filter(|_| options.devices > 0)
            .map(|carrier| {
                let result = station_per_device(&targets, options, carrier);
                if let Err(e) = &result {
                    eprintln!("station memory, carrier {carrier}: {e}");
                }
                (carrier, result)
            })
            .collect();
        (idle, devices)
    } else {
        (Vec::new(), Vec::new())
    };
    let sizes = options
        .sizes
        .iter()
        .map(|(label, path)| {
            let size = path.as_ref().map_err(String::clone).and_then(|path| {
                std::fs::metadata(path).map(|m| m.len()).map_err(|e| format!("{e}"))
            });
            (label.clone(), size)
        })
        .collect();

    let run_time = match options.started {
        Some(start) => {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            Duration::from_secs(now.saturating_sub(start))
        }
        None => run_started.elapsed(),
    };
    let report = Report {
        options,
        machine,
        load: (load_before, load_after),
        run_time,
        samples,
        latencies,
        failures,
        peak_rss,
        idle,
        devices,
        sizes,
    };
    let sections = report.sections();
    for (_, text) in &sections {
        println!("{text}");
    }
    if let Some(doc) = &options.doc {
        write_sections(doc, &sections)?;
        eprintln!("wrote {}", doc.display());
    }
    Ok(())
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// Runs one test over a started route.
fn measure(
    route: &Running,
    test: Test,
    payload: &Payload,
    targets: &Targets,
    options: &Options,
    limit: Duration,
) -> Result<Outcome, String> {
    if test == Test::Latency {
        let echo = route.entries.echo.ok_or("the route has no echo entry")?;
        return round_trips(echo, options.messages, limit).map(Outcome::Latency);
    }
    let up = || route.entries.up.ok_or("the route has no entry to the sink");
    let down = || route.entries.down.ok_or("the route has no entry to the source");
    targets.expect(test, payload);
    let cpu_before = route.cpu_seconds();
    let switches_before = route.context_switches();
    let (elapsed, moved) = match test {
        Test::Up => (send_up(up()?, payload, targets, limit)?, payload.len),
        Test::Down => (receive_down(down()?, payload, limit)?, payload.len),
        Test::UpMany => {
            let elapsed = send_up_many(up()?, options.streams, payload, targets, limit)?;
            (elapsed, payload.len * options.streams as u64)
        }
        Test::DownMany => {
            let elapsed = receive_down_many(down()?, options.streams, payload, limit)?;
            (elapsed, payload.len * options.streams as u64)
        }
        Test::Latency => unreachable!("handled above"),
    };
    let cpu_after = route.cpu_seconds();
    let switches = route.context_switches() - switches_before;
    let secs = elapsed.as_secs_f64().max(1e-9);
    let per_gib = |side: usize| (cpu_after[side] - cpu_before[side]) * GIB / moved as f64;
    Ok(Outcome::Rate(Sample {
        rate: moved as f64 / secs,
        cpu_per_gib: [per_gib(0), per_gib(1)],
        switches_per_mib: switches as f64 * MIB as f64 / moved as f64,
    }))
}

fn connect(entry: SocketAddr, limit: Duration) -> Result<TcpStream, String> {
    let socket = TcpStream::connect(entry).map_err(|e| format!("connect {entry}: {e}"))?;
    let _ = socket.set_nodelay(true);
    socket.set_read_timeout(Some(limit)).map_err(|e| e.to_string())?;
    socket.set_write_timeout(Some(limit)).map_err(|e| e.to_string())?;
    Ok(socket)
}

/// Writes the payload into `entry`; done when the sink has seen all of it
/// and the end of the stream.
fn send_up(
    entry: SocketAddr,
    payload: &Payload,
    targets: &Targets,
    limit: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    let mut socket = connect(entry, limit)?;
    payload.write_to(&mut socket).map_err(|e| format!("write: {e}"))?;
    socket.shutdown(Shutdown::Write).map_err(|e| format!("shutdown: {e}"))?;
    let arrival = targets.arrival(limit)?;
    check(arrival.received, payload)?;
    Ok(arrival.at - started)
}

/// Reads everything the source sends through `entry`.
fn receive_down(entry: SocketAddr, payload: &Payload, limit: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let mut socket = connect(entry, limit)?;
    let received = Received::read_all(&mut socket).map_err(|e| format!("read: {e}"))?;
    let elapsed = started.elapsed();
    check(received, payload)?;
    Ok(elapsed)
}

/// `streams` connections at once, each writing the payload; done when the
/// sink has seen all of them end.
fn send_up_many(
    entry: SocketAddr,
    streams: usize,
    payload: &Payload,
    targets: &Targets,
    limit: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    // The sockets stay open until every arrival is in: some tunnels take a
    // close as an abort.
    let sockets = thread::scope(|scope| {
        let writers: Vec<_> = (0..streams)
            .map(|_| {
                scope.spawn(|| {
                    let mut socket = connect(entry, limit)?;
                    payload.write_to(&mut socket).map_err(|e| format!("write: {e}"))?;
                    socket.shutdown(Shutdown::Write).map_err(|e| format!("shutdown: {e}"))?;
                    Ok::<_, String>(socket)
                })
            })
            .collect();
        writers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|_| Err("writer panicked".to_owned())))
            .collect::<Result<Vec<_>, _>>()
    })?;
    let mut last = started;
    for _ in 0..streams {
        let arrival = targets.arrival(limit)?;
        check(arrival.received, payload)?;
        last = last.max(arrival.at);
    }
    drop(sockets);
    Ok(last - started)
}

/// `streams` connections at once, each reading what the source sends.
fn receive_down_many(
    entry: SocketAddr,
    streams: usize,
    payload: &Payload,
    limit: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    thread::scope(|scope| {
        let readers: Vec<_> = (0..streams)
            .map(|_| {
                scope.spawn(|| {
                    let mut socket = connect(entry, limit)?;
                    let received =
                        Received::read_all(&mut socket).map_err(|e| format!("read: {e}"))?;
                    let done = Instant::now();
                    check(received, payload)?;
                    Ok::<_, String>(done)
                })
            })
            .collect();
        let mut last = started;
        for reader in readers {
            let done = reader.join().unwrap_or_else(|_| Err("reader panicked".to_owned()))?;
            last = last.max(done);
        }
        Ok(last - started)
    })
}

/// `messages` round trips of a [`MESSAGE`]-byte message through `entry` to
/// the echo target, one at a time on one connection, after a few untimed
/// ones; each reply is checked.
fn round_trips(entry: SocketAddr, messages: usize, limit: Duration) -> Result<Latency, String> {
    let mut socket = connect(entry, limit)?;
    let mut message = [0u8; MESSAGE];
    let mut reply = [0u8; MESSAGE];
    let mut times = Vec::with_capacity(messages);
    for i in 0..LATENCY_WARM_UP + messages {
        for (j, byte) in message.iter_mut().enumerate() {
            *byte = (i * 31 + j) as u8;
        }
        let sent = Instant::now();
        socket.write_all(&message).map_err(|e| format!("write: {e}"))?;
        socket.read_exact(&mut reply).map_err(|e| format!("read: {e}"))?;
        let time = sent.elapsed();
        if reply != message {
            return Err(format!("message {i} came back changed"));
        }
        if i >= LATENCY_WARM_UP {
            times.push(time);
        }
    }
    times.sort();
    let at = |fraction: f64| times[((times.len() as f64 * fraction) as usize).min(times.len() - 1)];
    Ok(Latency { p50: at(0.50), p99: at(0.99) })
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

/// The targets every route leads to: a sink that counts and hashes what it
/// is sent, a source that sends the payload of the current test, and an
/// echo server.
struct Targets {
    sink: SocketAddr,
    source: SocketAddr,
    echo: SocketAddr,
    arrivals: mpsc::Receiver<Arrival>,
    /// The payload the source sends to the next connections.
    next_download: mpsc::Sender<(u64, Vec<u8>)>,
}

impl Targets {
    fn start() -> Result<Targets, String> {
        let bind = || TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string());
        let (sink, source, echo) = (bind()?, bind()?, bind()?);
        let addr = |l: &TcpListener| l.local_addr().map_err(|e| e.to_string());
        let (sink_addr, source_addr, echo_addr) = (addr(&sink)?, addr(&source)?, addr(&echo)?);
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
        thread::spawn(move || {
            for socket in echo.incoming().flatten() {
                thread::spawn(move || {
                    let mut socket = socket;
                    let _ = socket.set_nodelay(true);
                    let mut buf = vec![0u8; 16 << 10];
                    while let Ok(n @ 1..) = socket.read(&mut buf) {
                        if socket.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Ok(Targets {
            sink: sink_addr,
            source: source_addr,
            echo: echo_addr,
            arrivals,
            next_download,
        })
    }

    /// The three targets by the names routes give them.
    fn all(&self) -> [(&'static str, SocketAddr); 3] {
        [("sink", self.sink), ("source", self.source), ("echo", self.echo)]
    }

    /// Sets what the source sends next and forgets stray sink arrivals.
    fn expect(&self, test: Test, payload: &Payload) {
        while self.arrivals.try_recv().is_ok() {}
        if matches!(test, Test::Down | Test::DownMany) {
            let _ = self.next_download.send((payload.len, payload.block.clone()));
        }
    }

    /// The sink's report on a transfer under way. Connections that carry
    /// nothing (a tunnel probing its target) are not transfers.
    fn arrival(&self, limit: Duration) -> Result<Arrival, String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.arrivals.recv_timeout(left) {
                Ok(arrival) if arrival.received.bytes == 0 => continue,
                Ok(arrival) => return Ok(arrival),
                Err(_) => return Err(format!("nothing reached the sink within {limit:?}")),
            }
        }
    }
}

/// Runs `start`, turning a panic (the middlebox recipes panic on failure,
/// as tests do) into an error with its message.
fn catching<T>(start: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(start)).map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "panicked".to_owned())
    })
}

/// One postern route: a station and an agent, the way between them.
struct Postern<'a> {
    station: &'a Path,
    agent: &'a Path,
    carrier: &'a str,
    via: Via,
    delay: Option<Hop>,
}

impl Postern<'_> {
    /// Starts the station with `targets`, the way, and the agent with one
    /// forward per target.
    fn start(&self, targets: &[(&str, SocketAddr)]) -> Result<Running, String> {
        let carrier = self.carrier;
        let dir = TempDir::new(carrier);
        let station_key = PrivateKey::generate();
        let agent_key = PrivateKey::generate();
        let names: Vec<String> = targets.iter().map(|(name, _)| format!("{name:?}")).collect();
        let mut station_toml =
            format!("listen = \"127.0.0.1:0\"\nprivate_key = \"{}\"\n", station_key.to_base64());
        let mut keep: Vec<Box<dyn std::any::Any>> = Vec::new();
        // A test CA and a certificate for 127.0.0.1, for the TLS ways.
        let pki = matches!(self.via, Via::Tls | Via::NginxTls)
            .then(|| catching(|| Pki::new("bench CA")).map_err(|e| format!("openssl: {e}")))
            .transpose()?;
        let leaf = pki.as_ref().map(|pki| pki.leaf("station", "IP:127.0.0.1", 1));
        if let (Via::Tls, Some(leaf)) = (self.via, &leaf) {
            let _ = writeln!(
                station_toml,
                "tls_cert_file = {:?}\ntls_key_file = {:?}",
                leaf.cert.display().to_string(),
                leaf.key.display().to_string()
            );
        }
        station_toml.push_str("\n[targets]\n");
        for (name, addr) in targets {
            let _ = writeln!(station_toml, "{name} = \"{addr}\"");
        }
        let _ = write!(
            station_toml,
            "\n[[devices]]\nname = \"bench\"\npublic_key = \"{}\"\nallow = [{}]\n",
            agent_key.public_key().to_base64(),
            names.join(", ")
        );
        let station_path = dir.write("station.toml", &station_toml);
        let (tx, station_lines) = mpsc::channel();
        let station = Proc::spawn(
            &format!("postern station ({carrier})"),
            Side::Central,
            Command::new(self.station).arg("station").arg("-c").arg(&station_path),
            tx,
        )?;
        let rest = wait_for_line(&station_lines, "station listening on ", &station)?;
        let mut station_addr =
            parse_addr(&rest).ok_or(format!("no address in station log line {rest:?}"))?;
        if let Some(delay) = self.delay {
            let proxy = DelayedHop::start(station_addr, delay)?;
            station_addr = proxy.addr;
            keep.push(Box::new(proxy));
        }
        let (url, proxy) = match self.via {
            Via::Direct => (format!("http://{station_addr}/"), None),
            Via::Tls => (format!("https://{station_addr}/"), None),
            Via::NginxTls => {
                let leaf = leaf.as_ref().expect("made above for TLS");
                let nginx = catching(|| {
                    Middlebox::nginx_tls(station_addr, "/tunnel/", NGINX_FOR_STREAM, leaf, None)
                })
                .map_err(|e| format!("nginx: {e}"))?;
                let url = format!("https://{}/tunnel/", nginx.addr);
                keep.push(Box::new(nginx));
                (url, None)
            }
            Via::Squid => {
                let squid = catching(|| Middlebox::squid_with(None, None))
                    .map_err(|e| format!("squid: {e}"))?;
                let proxy = format!("http://{}", squid.addr);
                keep.push(Box::new(squid));
                (format!("http://{station_addr}/"), Some(proxy))
            }
            Via::Nginx | Via::NginxTuned => {
                let extra = if self.via == Via::NginxTuned { NGINX_FOR_STREAM } else { "" };
                let nginx =
                    catching(|| Middlebox::nginx_with(station_addr, "/tunnel/", extra, None))
                        .map_err(|e| format!("nginx: {e}"))?;
                let url = format!("http://{}/tunnel/", nginx.addr);
                keep.push(Box::new(nginx));
                (url, None)
            }
        };

        let mut agent_toml = format!(
            "station = \"{url}\"\nstation_public_key = \"{}\"\nprivate_key = \"{}\"\n\
             carrier = \"{carrier}\"\n",
            station_key.public_key().to_base64(),
            agent_key.to_base64(),
        );
        if let Some(proxy) = proxy {
            let _ = writeln!(agent_toml, "proxy = \"{proxy}\"");
        }
        if let Some(pki) = pki {
            let _ = writeln!(agent_toml, "ca_file = {:?}", pki.ca.cert.display().to_string());
            keep.push(Box::new(pki));
        }
        // The config refuses two forwards on port 0, so ask for free ports.
        for (name, _) in targets {
            let _ = write!(
                agent_toml,
                "\n[[forward]]\nlisten = \"127.0.0.1:{}\"\ntarget = \"{name}\"\n",
                free_port()?
            );
        }
        let agent_path = dir.write("agent.toml", &agent_toml);
        let (tx, agent_lines) = mpsc::channel();
        let agent = Proc::spawn(
            &format!("postern agent ({carrier})"),
            Side::Device,
            Command::new(self.agent)
                .arg("agent")
                .arg("-c")
                .arg(&agent_path)
                .env_remove("HTTP_PROXY")
                .env_remove("http_proxy"),
            tx,
        )?;
        let mut entries = BTreeMap::new();
        for _ in targets {
            let rest = wait_for_line(&agent_lines, "forwarding 127.0.0.1:", &agent)?;
            let port = parse_port(&rest).ok_or(format!("no port in agent log line {rest:?}"))?;
            let target = rest.rsplit('"').nth(1).unwrap_or_default().to_owned();
            entries.insert(target, SocketAddr::from(([127, 0, 0, 1], port)));
        }
        keep.push(Box::new(dir));
        Ok(Running { entries: entries_of(&entries), procs: vec![station, agent], _keep: keep })
    }
}

/// The entries of a route that names them by target.
fn entries_of(by_target: &BTreeMap<String, SocketAddr>) -> Entries {
    let entry = |name: &str| by_target.get(name).copied();
    Entries { up: entry("sink"), down: entry("source"), echo: entry("echo") }
}

/// A loopback port free at the time of asking, for programs that cannot
/// report the port they bound (hts, htc, rathole, wstunnel).
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
        if !proc.is_running() || Instant::now() > deadline {
            return Err(format!("{} is not listening on {port}: {}", proc.name, proc.recent_log()));
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// One hts/htc pair per target: httptunnel carries one connection at a
/// time to one fixed destination. htc goes through `proxy` if given.
fn start_httptunnel(
    targets: &[(&str, SocketAddr)],
    delay: Option<Hop>,
    proxy: Option<SocketAddr>,
) -> Result<Running, String> {
    let mut procs = Vec::new();
    let mut proxies = Vec::new();
    let mut entries = BTreeMap::new();
    for &(name, target) in targets {
        let hts_port = free_port()?;
        let (tx, _) = mpsc::channel();
        let hts = Proc::spawn(
            "hts",
            Side::Central,
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
            let proxy = DelayedHop::start(hts_addr, delay)?;
            hts_addr = proxy.addr;
            proxies.push(proxy);
        }
        let htc_port = free_port()?;
        let mut htc = Command::new("htc");
        htc.args(["-w", "-F", &htc_port.to_string()]);
        if let Some(proxy) = proxy {
            htc.args(["-P", &proxy.to_string()]);
        }
        let (tx, _) = mpsc::channel();
        let htc = Proc::spawn("htc", Side::Device, htc.arg(hts_addr.to_string()), tx)?;
        wait_listening(htc_port, &htc)?;
        procs.extend([hts, htc]);
        entries.insert(name.to_owned(), SocketAddr::from(([127, 0, 0, 1], htc_port)));
    }
    Ok(Running { entries: entries_of(&entries), procs, _keep: vec![Box::new(proxies)] })
}

/// rathole with one service per target. rathole only forwards connections
/// that arrive at its server (the central side) to its client (the
/// device side), so here the client connects at the server and the
/// rathole client connects to the target: for "up" the bytes go server to
/// client. Noise uses rathole's default pattern, Noise_NK_25519_ChaChaPoly_BLAKE2s.
fn start_rathole(
    targets: &[(&str, SocketAddr)],
    rathole: &Path,
    noise: bool,
    delay: Option<Hop>,
) -> Result<Running, String> {
    let transport = if noise { "noise" } else { "tcp" };
    let dir = TempDir::new(&format!("rathole-{transport}"));
    let control = free_port()?;
    // The client reaches the server's control port, and opens its data
    // channels, through the relay when the route has one.
    let relay = delay
        .map(|hop| DelayedHop::start(SocketAddr::from(([127, 0, 0, 1], control)), hop))
        .transpose()?;
    let remote = relay.as_ref().map_or(SocketAddr::from(([127, 0, 0, 1], control)), |r| r.addr);
    let key = PrivateKey::generate();
    let (server_transport, client_transport) = if noise {
        (
            format!(
                "[server.transport]\ntype = \"noise\"\n[server.transport.noise]\n\
                 local_private_key = \"{}\"\n",
                key.to_base64()
            ),
            format!(
                "[client.transport]\ntype = \"noise\"\n[client.transport.noise]\n\
                 remote_public_key = \"{}\"\n",
                key.public_key().to_base64()
            ),
        )
    } else {
        (
            "[server.transport]\ntype = \"tcp\"\n".to_owned(),
            "[client.transport]\ntype = \"tcp\"\n".to_owned(),
        )
    };
    let mut server = format!(
        "[server]\nbind_addr = \"127.0.0.1:{control}\"\ndefault_token = \"postern-bench\"\n\
         {server_transport}"
    );
    let mut client = format!(
        "[client]\nremote_addr = \"{remote}\"\ndefault_token = \"postern-bench\"\n\
         {client_transport}"
    );
    let mut entries = BTreeMap::new();
    for &(name, target) in targets {
        let port = free_port()?;
        let _ = write!(server, "[server.services.{name}]\nbind_addr = \"127.0.0.1:{port}\"\n");
        let _ = write!(client, "[client.services.{name}]\nlocal_addr = \"{target}\"\n");
        entries.insert(name.to_owned(), SocketAddr::from(([127, 0, 0, 1], port)));
    }
    let server_path = dir.write("server.toml", &server);
    let client_path = dir.write("client.toml", &client);
    let spawn = |name: &str, side, config: &Path| {
        let (tx, _) = mpsc::channel();
        Proc::spawn(
            &format!("rathole {name} ({transport})"),
            side,
            Command::new(rathole).arg(config).env("RUST_LOG", "warn"),
            tx,
        )
    };
    let server = spawn("server", Side::Central, &server_path)?;
    wait_listening(control, &server)?;
    let client = spawn("client", Side::Device, &client_path)?;
    // The server binds a service's port once the client has registered it.
    for addr in entries.values() {
        wait_listening(addr.port(), &server)?;
    }
    Ok(Running {
        entries: entries_of(&entries),
        procs: vec![client, server],
        _keep: vec![Box::new(dir), Box::new(relay)],
    })
}

/// wstunnel (the Rust one, v7 and later): a client listening per target,
/// tunnelling over one ws:// server.
fn start_wstunnel(
    targets: &[(&str, SocketAddr)],
    wstunnel: &Path,
    scheme: &str,
) -> Result<Running, String> {
    let server_port = free_port()?;
    let (tx, _) = mpsc::channel();
    let server = Proc::spawn(
        "wstunnel server",
        Side::Central,
        Command::new(wstunnel).args(["server", &format!("{scheme}://127.0.0.1:{server_port}")]),
        tx,
    )?;
    wait_listening(server_port, &server)?;
    let mut command = Command::new(wstunnel);
    command.arg("client");
    let mut entries = BTreeMap::new();
    for &(name, target) in targets {
        let port = free_port()?;
        command.args(["-L", &format!("tcp://127.0.0.1:{port}:{target}")]);
        entries.insert(name.to_owned(), SocketAddr::from(([127, 0, 0, 1], port)));
    }
    command.arg(format!("{scheme}://127.0.0.1:{server_port}"));
    let (tx, _) = mpsc::channel();
    let client = Proc::spawn("wstunnel client", Side::Device, &mut command, tx)?;
    for addr in entries.values() {
        wait_listening(addr.port(), &client)?;
    }
    Ok(Running { entries: entries_of(&entries), procs: vec![client, server], _keep: Vec::new() })
}

/// The tunnels whose idle memory is measured.
enum IdleTunnel<'a> {
    /// A postern agent binary, and its carrier; the station is the release build.
    Postern(&'a Path, &'static str),
    Httptunnel,
    /// rathole, with the Noise transport or plain TCP.
    Rathole(bool),
    Wstunnel,
}

/// Resident memory of a tunnel's two ends with one open, idle stream.
struct Idle {
    label: String,
    /// Of the device side: VmRSS and RssAnon (its own pages, without the
    /// shared libraries' and the binary's file pages); VmRSS of the central
    /// side; or why not.
    rss: Result<[u64; 3], String>,
}

/// Starts a fresh instance of each tunnel, opens one stream to the echo
/// target through it, exchanges a few messages, waits for the processes to
/// settle and reads their VmRSS: what the device-side process costs a
/// board while a connection is open and quiet.
fn idle_memory(targets: &Targets, options: &Options) -> Vec<Idle> {
    let echo = [("echo", targets.echo)];
    let mut tunnels: Vec<(String, IdleTunnel)> = Vec::new();
    for (label, agent) in &options.device_agents {
        tunnels.push((format!("postern agent, {label}"), IdleTunnel::Postern(agent, "stream")));
    }
    tunnels.push((
        "postern agent, release build (agent and station, glibc, dynamic)".to_owned(),
        IdleTunnel::Postern(&options.postern, "stream"),
    ));
    tunnels.push(("GNU httptunnel htc".to_owned(), IdleTunnel::Httptunnel));
    for noise in [false, true] {
        let transport = if noise { "noise" } else { "tcp" };
        tunnels
            .push((format!("rathole client, transport {transport}"), IdleTunnel::Rathole(noise)));
    }
    tunnels.push(("wstunnel client".to_owned(), IdleTunnel::Wstunnel));
    let start = |tunnel: &IdleTunnel| match *tunnel {
        IdleTunnel::Postern(agent, carrier) => {
            Postern { station: &options.postern, agent, carrier, via: Via::Direct, delay: None }
                .start(&echo)
        }
        IdleTunnel::Httptunnel => start_httptunnel(&echo, None, None),
        IdleTunnel::Rathole(noise) => start_rathole(&echo, options.rathole()?, noise, None),
        IdleTunnel::Wstunnel => start_wstunnel(&echo, options.wstunnel()?, "ws"),
    };
    tunnels
        .into_iter()
        .map(|(label, tunnel)| {
            let rss = start(&tunnel).and_then(|route| {
                let echo = route.entries.echo.ok_or("no echo entry")?;
                let socket = connect(echo, WARM_UP_LIMIT)?;
                // A few messages through the open stream, then quiet.
                let mut socket = socket;
                for _ in 0..10 {
                    socket.write_all(&[7u8; MESSAGE]).map_err(|e| format!("write: {e}"))?;
                    socket.read_exact(&mut [0u8; MESSAGE]).map_err(|e| format!("read: {e}"))?;
                }
                thread::sleep(SETTLE);
                let [device, central] = route.rss(Proc::rss);
                let [anon, _] = route.rss(|p| p.status_bytes("RssAnon"));
                drop(socket);
                Ok([device, anon, central])
            });
            match &rss {
                Ok([device, anon, central]) => eprintln!(
                    "idle, one stream: {label}: {:.2} MiB, {:.2} MiB anonymous (other end {:.2} MiB)",
                    *device as f64 / MIB as f64,
                    *anon as f64 / MIB as f64,
                    *central as f64 / MIB as f64
                ),
                Err(e) => eprintln!("idle, one stream: {label}: {e}"),
            }
            (label, rss)
        })
        .map(|(label, rss)| Idle { label, rss })
        .collect()
}

/// The station's memory with `--devices` idle agents connected.
struct DeviceMemory {
    devices: usize,
    /// Station VmRSS with every device configured and none connected.
    before: u64,
    /// Station VmRSS with every device connected, settled.
    after: u64,
    /// Median VmRSS of the idle agents.
    agent: u64,
}

/// Starts a station with `--devices` devices, reads its memory, starts an
/// agent process for each (no streams, just the session held open on the
/// carrier), waits until the station's /metrics counts them all
/// connected, and reads its memory again.
fn station_per_device(
    targets: &Targets,
    options: &Options,
    carrier: &str,
) -> Result<DeviceMemory, String> {
    let n = options.devices;
    let dir = TempDir::new(&format!("devices-{carrier}"));
    let station_key = PrivateKey::generate();
    let keys: Vec<PrivateKey> = (0..n).map(|_| PrivateKey::generate()).collect();
    let mut toml = format!(
        "listen = \"127.0.0.1:0\"\nprivate_key = \"{}\"\nstatus = \"127.0.0.1:0\"\n\n\
         [targets]\necho = \"{}\"\n",
        station_key.to_base64(),
        targets.echo
    );
    for (i, key) in keys.iter().enumerate() {
        let _ = write!(
            toml,
            "\n[[devices]]\nname = \"device-{i}\"\npublic_key = \"{}\"\nallow = [\"echo\"]\n",
            key.public_key().to_base64()
        );
    }
    let station_path = dir.write("station.toml", &toml);
    let (tx, lines) = mpsc::channel();
    let station = Proc::spawn(
        "postern station",
        Side::Central,
        Command::new(&options.postern).arg("station").arg("-c").arg(&station_path),
        tx,
    )?;
    let found = wait_for_lines(&lines, &["station listening on ", "status on http://"], &station)?;
    let listen = parse_addr(&found[0]).ok_or(format!("no address in {:?}", found[0]))?;
    let status = parse_addr(&found[1]).ok_or(format!("no address in {:?}", found[1]))?;
    thread::sleep(SETTLE);
    let before = station.rss();

    let mut agents = Vec::with_capacity(n);
    for (i, key) in keys.iter().enumerate() {
        let path = dir.write(
            &format!("agent-{i}.toml"),
            &format!(
                "station = \"http://{listen}/\"\nstation_public_key = \"{}\"\nprivate_key = \"{}\"\n\
                 carrier = \"{carrier}\"\n\n[services]\necho = \"{}\"\n",
                station_key.public_key().to_base64(),
                key.to_base64(),
                targets.echo
            ),
        );
        let (tx, _) = mpsc::channel();
        agents.push(Proc::spawn(
            &format!("agent {i}"),
            Side::Device,
            Command::new(&options.postern)
                .arg("agent")
                .arg("-q")
                .arg("-c")
                .arg(&path)
                .env_remove("HTTP_PROXY")
                .env_remove("http_proxy"),
            tx,
        )?);
    }
    let deadline = Instant::now() + CONNECT_LIMIT;
    loop {
        let connected = metric(status, "postern_devices_connected").unwrap_or(0.0) as usize;
        if connected >= n {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("{connected} of {n} devices connected within {CONNECT_LIMIT:?}"));
        }
        thread::sleep(Duration::from_millis(200));
    }
    thread::sleep(SETTLE);
    let after = station.rss();
    let mut agent_rss: Vec<u64> = agents.iter().map(Proc::rss).collect();
    agent_rss.sort_unstable();
    eprintln!(
        "station memory, carrier {carrier}: {:.1} MiB with {n} devices configured, {:.1} MiB with \
         them connected: {:.1} KiB per device",
        before as f64 / MIB as f64,
        after as f64 / MIB as f64,
        after.saturating_sub(before) as f64 / 1024.0 / n as f64
    );
    Ok(DeviceMemory { devices: n, before, after, agent: agent_rss[n / 2] })
}

/// Where the numbers were measured.
struct Machine {
    cpus: usize,
    cpu_model: String,
    memory: String,
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
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or_else(
                || "unknown memory".to_owned(),
                |kib| format!("{:.0} GiB", kib as f64 / (1 << 20) as f64),
            );
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
            memory,
            kernel,
            date,
        }
    }

    fn summary(&self) -> String {
        format!("{} CPUs ({}), {}, Linux {}", self.cpus, self.cpu_model, self.memory, self.kernel)
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
    run_time: Duration,
    samples: BTreeMap<(Route, Test), Vec<Sample>>,
    latencies: BTreeMap<Route, Vec<Latency>>,
    failures: BTreeMap<(Route, Test), String>,
    peak_rss: BTreeMap<Route, [u64; 2]>,
    idle: Vec<Idle>,
    devices: Vec<(&'static str, Result<DeviceMemory, String>)>,
    sizes: Vec<(String, Result<u64, String>)>,
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

fn mebibytes(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / MIB as f64)
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

/// Median and range of some figures, as "median (min–max)".
fn spread(mut values: Vec<f64>, show: impl Fn(f64) -> String) -> String {
    let middle = median(&mut values);
    format!("{} ({}–{})", show(middle), show(values[0]), show(values[values.len() - 1]))
}

fn ms(value: f64) -> String {
    if value < 1.0 {
        format!("{value:.3}")
    } else {
        format!("{value:.2}")
    }
}

/// A ratio, with the verdict against a goal.
fn verdict(ratio: f64, goal: f64, at_least: bool) -> &'static str {
    if (at_least && ratio >= goal) || (!at_least && ratio <= goal) {
        "met"
    } else {
        "**missed**"
    }
}

impl Report<'_> {
    fn median_rate(&self, route: Route, test: Test) -> Option<f64> {
        let samples = self.samples.get(&(route, test))?;
        Some(median(&mut samples.iter().map(|s| s.rate).collect::<Vec<_>>()))
    }

    fn median_latency(&self, route: Route) -> Option<(f64, f64)> {
        let rounds = self.latencies.get(&route)?;
        let p50 = median(&mut rounds.iter().map(|l| millis(l.p50)).collect::<Vec<_>>());
        let p99 = median(&mut rounds.iter().map(|l| millis(l.p99)).collect::<Vec<_>>());
        Some((p50, p99))
    }

    /// The generated parts of the document, by marker name.
    fn sections(&self) -> Vec<(&'static str, String)> {
        vec![
            ("goals", self.goals()),
            ("throughput table", self.throughput()),
            ("latency table", self.latency()),
            ("memory table", self.memory()),
            ("sizes table", self.sizes()),
        ]
    }

    fn reference(&self) -> String {
        format!("Measured in the run of {} recorded under [Goals](#goals).\n\n", self.machine.date)
    }

    fn goals(&self) -> String {
        let o = self.options;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Measured {}{} on {}. Load average {} before the rounds, {} after. The whole \
             command took {} min {} s (builds included, when it made them).\n",
            self.machine.date,
            o.revision.as_ref().map_or_else(String::new, |r| format!(" at {r}")),
            self.machine.summary(),
            self.load.0,
            self.load.1,
            self.run_time.as_secs() / 60,
            self.run_time.as_secs() % 60
        );
        let _ = writeln!(out, "```sh\n{}\n```\n", o.command);
        let _ = writeln!(out, "| goal | measured in this run | verdict |");
        let _ = writeln!(out, "|---|---|---|");
        let rate = |route, test| self.median_rate(route, test);
        for test in [Test::Up, Test::Down] {
            let dir = if test == Test::Up { "up" } else { "down" };
            match (rate(Route::Stream, test), rate(Route::RatholeNoise, test)) {
                (Some(stream), Some(rathole)) => {
                    let ratio = stream / rathole;
                    let _ = writeln!(
                        out,
                        "| stream ≥ 2× rathole's Noise transport, one stream {dir} | {:.2}× \
                         ({} vs {} MB/s) | {} |",
                        ratio,
                        megabytes(stream),
                        megabytes(rathole),
                        verdict(ratio, 2.0, true)
                    );
                }
                _ => {
                    let why = self
                        .failures
                        .get(&(Route::RatholeNoise, test))
                        .or(self.failures.get(&(Route::Stream, test)))
                        .map_or("not measured", String::as_str);
                    let _ = writeln!(
                        out,
                        "| stream ≥ 2× rathole's Noise transport, one stream {dir} | {why} | – |"
                    );
                }
            }
            let peers = [Route::RatholeTcp, Route::Httptunnel, Route::Wstunnel];
            let fastest = peers
                .iter()
                .filter_map(|&p| Some((p, rate(p, test)?)))
                .max_by(|a, b| a.1.total_cmp(&b.1));
            if let (Some(stream), Some((peer, peer_rate))) = (rate(Route::Stream, test), fastest) {
                let ratio = stream / peer_rate;
                let _ = writeln!(
                    out,
                    "| stream ≥ ½ the fastest unencrypted peer, one stream {dir} | {:.2}× of {} \
                     ({} vs {} MB/s) | {} |",
                    ratio,
                    peer.label(),
                    megabytes(stream),
                    megabytes(peer_rate),
                    verdict(ratio, 0.5, true)
                );
            }
            for (poll, ht, path) in [
                (Route::Poll, Route::Httptunnel, ""),
                (Route::PollSquid, Route::HttptunnelSquid, ", both via squid"),
            ] {
                if let (Some(poll), Some(ht)) = (rate(poll, test), rate(ht, test)) {
                    let ratio = poll / ht;
                    let _ = writeln!(
                        out,
                        "| poll ≥ 2× GNU httptunnel, one stream {dir}{path} | {:.2}× ({} vs {} \
                         MB/s) | {} |",
                        ratio,
                        megabytes(poll),
                        megabytes(ht),
                        verdict(ratio, 2.0, true)
                    );
                }
            }
        }
        if let Some((d50, d99)) = self.median_latency(Route::Direct) {
            for route in [Route::Stream, Route::Poll] {
                let Some((p50, p99)) = self.median_latency(route) else { continue };
                for (name, value, direct) in [("p50", p50, d50), ("p99", p99, d99)] {
                    let bound = 2.0 * direct + 1.0;
                    let _ = writeln!(
                        out,
                        "| {} latency {name} ≤ 2× direct + 1 ms | {} ms vs a bound of {} ms \
                         (direct {} ms) | {} |",
                        route.label(),
                        ms(value),
                        ms(bound),
                        ms(direct),
                        verdict(value, bound, false)
                    );
                }
            }
        }
        let idle = |prefix: &str| {
            self.idle
                .iter()
                .find(|i| i.label.starts_with(prefix))
                .and_then(|i| i.rss.as_ref().ok().map(|rss| (i.label.as_str(), rss)))
        };
        let htc = idle("GNU httptunnel");
        // The agent the boards run: the device builds, if measured.
        let device = |i: &&Idle| i.label.starts_with("postern agent, device build");
        let agents: Vec<&Idle> = if self.idle.iter().any(|i| device(&i)) {
            self.idle.iter().filter(device).collect()
        } else {
            self.idle.iter().filter(|i| i.label.starts_with("postern agent")).collect()
        };
        for agent in agents {
            let (Ok(rss), Some((_, htc))) = (&agent.rss, htc) else { continue };
            for (what, i) in [("VmRSS", 0), ("RssAnon", 1)] {
                let _ = writeln!(
                    out,
                    "| agent RSS below httptunnel's (htc), one idle stream: {what}, {} | {} vs {} \
                     | {} |",
                    agent.label.trim_start_matches("postern agent, "),
                    mebibytes(rss[i]),
                    mebibytes(htc[i]),
                    if rss[i] < htc[i] { "met" } else { "**missed**" }
                );
            }
        }
        out
    }

    fn throughput(&self) -> String {
        let o = self.options;
        let mut out = self.reference();
        let _ = writeln!(
            out,
            "{} MiB per transfer (over {} connections at once in the \"{} streams\" rows), \
             median of {} (min–max in brackets); MB/s is 10^6 bytes per second. CPU s/GiB is \
             device side + central side.",
            o.bytes / MIB,
            o.streams,
            o.streams,
            o.repeat,
        );
        if o.routes.iter().any(|r| r.delayed()) {
            let path = o.path.unwrap_or(PathKind::Relay);
            let rate = o.rate.map(|rate| {
                format!(
                    ", at most {:.0} Mbit/s each way behind a {} KiB {}queue",
                    rate * 8.0 / 1e6,
                    RATE_QUEUE >> 10,
                    if path == PathKind::Tun { "drop-tail " } else { "" }
                )
            });
            let hop = match path {
                PathKind::Tun => format!(
                    "over a real TCP path (`--path tun`): two network namespaces joined by TUN \
                     devices, the bench driver holding each packet {} ms each way (MTU {MTU}{}), \
                     so the TCP connection that crosses it ({}, split at both ends like a \
                     satellite link's proxy) meets the round trip, slow start, its congestion \
                     window and losses",
                    o.rtt.as_millis() / 2,
                    rate.unwrap_or_default(),
                    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
                        .map_or("congestion control unknown".to_owned(), |cc| cc.trim().to_owned())
                ),
                PathKind::Relay => format!(
                    "with a relay in the bench driver (`--path relay`) that holds each byte {} ms \
                     each way{}; each side's TCP connection to it is on loopback, so routes whose \
                     only flow control is TCP's (direct, rathole) fill its buffer at loopback \
                     speed and never meet slow start or a congestion window, which flatters \
                     them beside postern",
                    o.rtt.as_millis() / 2,
                    rate.unwrap_or(format!(
                        " (up to {} MiB in flight per direction)",
                        DELAY_BUFFER >> 20
                    ))
                ),
            };
            let _ = writeln!(
                out,
                "Rows \"with RTT\" add {} ms of round trip on the hop that crosses the \
                 firewall (client–target, htc–hts, client–server, agent–station) {hop}, and move \
                 {} MiB per transfer (split over the connections of the many-stream tests); their \
                 ratios are to the direct, httptunnel and rathole rows with the same delay.",
                o.rtt.as_millis(),
                o.rtt_bytes / MIB
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "| route | test | MB/s | vs direct | vs httptunnel | vs rathole noise | CPU s/GiB |"
        );
        let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|");
        for &route in &o.routes {
            let rates: Vec<Test> =
                o.tests.iter().copied().filter(|&t| t != Test::Latency).collect();
            let reasons: Vec<Option<&String>> =
                rates.iter().map(|&t| self.failures.get(&(route, t))).collect();
            if rates.len() > 1 && reasons.iter().all(|r| r.is_some() && *r == reasons[0]) {
                let reason = reasons[0].expect("all are some");
                let _ = writeln!(out, "| {} | all | {reason} | | | | |", route.label());
                continue;
            }
            for test in rates {
                let key = (route, test);
                let what = test.label(o.streams);
                if let Some(reason) = self.failures.get(&key) {
                    if !self.samples.contains_key(&key) {
                        let _ = writeln!(out, "| {} | {what} | {reason} | | | | |", route.label());
                        continue;
                    }
                }
                let Some(samples) = self.samples.get(&key) else { continue };
                let rate = self.median_rate(route, test).expect("samples exist");
                let ratio = |base: Option<Route>| {
                    base.filter(|&b| b != route)
                        .and_then(|b| self.median_rate(b, test))
                        .map_or_else(String::new, |b| format!("{:.2}×", rate / b))
                };
                let cpu = if route.is_direct() {
                    "–".to_owned()
                } else {
                    let side = |i: usize| {
                        median(&mut samples.iter().map(|s| s.cpu_per_gib[i]).collect::<Vec<_>>())
                    };
                    format!("{:.2} ({:.2} + {:.2})", side(0) + side(1), side(0), side(1))
                };
                let [direct, httptunnel, rathole] = route.baselines();
                let _ = writeln!(
                    out,
                    "| {} | {what} | {} | {} | {} | {} | {cpu} |",
                    route.label(),
                    spread(samples.iter().map(|s| s.rate).collect(), megabytes),
                    ratio(direct),
                    ratio(httptunnel),
                    ratio(rathole),
                );
            }
        }
        out
    }

    fn latency(&self) -> String {
        let o = self.options;
        if !o.tests.contains(&Test::Latency) {
            return "Not measured in this run (--tests).\n".to_owned();
        }
        let mut out = self.reference();
        let _ = writeln!(
            out,
            "{} round trips of a {MESSAGE}-byte message to an echo target per measurement, one \
             at a time on one connection (after {LATENCY_WARM_UP} untimed), {} measurements \
             per route; the table gives the median of the measurements' p50 and p99, and \
             their range. The bound is the goal: 2× direct + 1 ms.\n",
            o.messages, o.repeat
        );
        let _ = writeln!(out, "| route | p50 ms | p99 ms | p50 vs bound | p99 vs bound |");
        let _ = writeln!(out, "|---|---:|---:|---:|---:|");
        let direct = self.median_latency(Route::Direct);
        for &route in &o.routes {
            if let Some(reason) = self.failures.get(&(route, Test::Latency)) {
                let _ = writeln!(out, "| {} | {reason} | | | |", route.label());
                continue;
            }
            let Some(rounds) = self.latencies.get(&route) else { continue };
            let (p50, p99) = self.median_latency(route).expect("rounds exist");
            let against = |value: f64, base: Option<f64>| {
                base.filter(|_| route.is_postern()).map_or_else(String::new, |d| {
                    let bound = 2.0 * d + 1.0;
                    format!("{} of {} ({})", ms(value), ms(bound), verdict(value, bound, false))
                })
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} |",
                route.label(),
                spread(rounds.iter().map(|l| millis(l.p50)).collect(), ms),
                spread(rounds.iter().map(|l| millis(l.p99)).collect(), ms),
                against(p50, direct.map(|d| d.0)),
                against(p99, direct.map(|d| d.1)),
            );
        }
        out
    }

    fn memory(&self) -> String {
        let mut out = self.reference();
        if !self.idle.is_empty() {
            let _ = writeln!(
                out,
                "**One idle stream.** A fresh tunnel per row, one connection to an echo target \
                 through it, 10 messages, then {} s idle; from /proc/PID/status of the \
                 device-side process: VmRSS, and RssAnon, its own pages (VmRSS less the file \
                 pages of the binary and the shared libraries, which a dynamically linked \
                 program shares with every other on the board); VmRSS of the other end.\n",
                SETTLE.as_secs()
            );
            let _ = writeln!(out, "| device-side process | VmRSS | RssAnon | other end's VmRSS |");
            let _ = writeln!(out, "|---|---:|---:|---:|");
            for idle in &self.idle {
                match &idle.rss {
                    Ok([device, anon, central]) => {
                        let _ = writeln!(
                            out,
                            "| {} | {} | {} | {} |",
                            idle.label,
                            mebibytes(*device),
                            mebibytes(*anon),
                            mebibytes(*central)
                        );
                    }
                    Err(e) => {
                        let what = if e.starts_with("not run") {
                            e.clone()
                        } else {
                            format!("failed: {e}")
                        };
                        let _ = writeln!(out, "| {} | {what} | | |", idle.label);
                    }
                }
            }
            let _ = writeln!(out);
        }
        for (carrier, result) in &self.devices {
            match result {
                Ok(m) => {
                    let _ = writeln!(
                        out,
                        "**Station memory per idle device, carrier {carrier}.** {} `postern \
                         agent` processes, each with its own key and session and no stream: \
                         station VmRSS {} with the devices configured and none connected, {} \
                         with all connected (counted by its /metrics): **{:.1} KiB per \
                         device**. Each idle agent: {} (median).\n",
                        m.devices,
                        mebibytes(m.before),
                        mebibytes(m.after),
                        m.after.saturating_sub(m.before) as f64 / 1024.0 / m.devices as f64,
                        mebibytes(m.agent),
                    );
                }
                Err(e) => {
                    let _ = writeln!(
                        out,
                        "**Station memory per idle device, carrier {carrier}:** failed: {e}\n"
                    );
                }
            }
        }
        if !self.peak_rss.is_empty() {
            let _ = writeln!(
                out,
                "**Peak RSS over the throughput rounds** (VmHWM; the largest process of each \
                 side):\n"
            );
            let _ = writeln!(out, "| route | device side | central side |");
            let _ = writeln!(out, "|---|---:|---:|");
            for (route, [device, central]) in &self.peak_rss {
                if route.is_direct() {
                    continue;
                }
                let _ = writeln!(
                    out,
                    "| {} | {} | {} |",
                    route.label(),
                    mebibytes(*device),
                    mebibytes(*central)
                );
            }
        }
        out
    }

    fn sizes(&self) -> String {
        let mut out = self.reference();
        let _ = writeln!(out, "| binary | bytes | MiB |");
        let _ = writeln!(out, "|---|---:|---:|");
        for (label, size) in &self.sizes {
            match size {
                Ok(bytes) => {
                    let _ =
                        writeln!(out, "| {label} | {bytes} | {:.2} |", *bytes as f64 / MIB as f64);
                }
                Err(e) => {
                    let _ = writeln!(out, "| {label} | {e} | |");
                }
            }
        }
        if let Some(note) = &self.options.sizes_note {
            let _ = writeln!(out, "\n{note}");
        }
        out
    }
}

/// Replaces the generated parts of the document (between the markers of
/// each section), leaving every other part as it is. A section whose
/// markers are missing is added at the end under its own heading.
fn write_sections(doc: &Path, sections: &[(&str, String)]) -> Result<(), String> {
    let mut text = std::fs::read_to_string(doc).unwrap_or_default();
    for (name, body) in sections {
        let begin = format!("<!-- scripts/bench: {name} begins -->");
        let end = format!("<!-- scripts/bench: {name} ends -->");
        let generated = format!("{begin}\n{body}{end}");
        text = match (text.find(&begin), text.find(&end)) {
            (Some(b), Some(e)) if b < e => {
                format!("{}{generated}{}", &text[..b], &text[e + end.len()..])
            }
            _ => {
                if text.is_empty() {
                    text.push_str("# Benchmarks\n");
                }
                if !text.ends_with('\n') {
                    text.push('\n');
                }
                format!("{text}\n## {name}\n\n{generated}\n")
            }
        };
    }
    std::fs::write(doc, text).map_err(|e| format!("{}: {e}", doc.display()))
}
