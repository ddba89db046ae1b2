//! The driver's options: what `--help` prints and how the command line
//! becomes [`Options`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::measure::Test;
use crate::routes::Route;
use crate::support::path::PathKind;
use crate::MIB;

pub(crate) const USAGE: &str = "\
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

pub(crate) struct Options {
    pub(crate) bytes: u64,
    pub(crate) repeat: usize,
    pub(crate) routes: Vec<Route>,
    pub(crate) tests: Vec<Test>,
    pub(crate) streams: usize,
    pub(crate) messages: usize,
    pub(crate) postern: PathBuf,
    /// Agent builds measured idle beside the release build, by label.
    pub(crate) device_agents: Vec<(String, PathBuf)>,
    /// The peers' binaries, or why there is none.
    rathole: Result<PathBuf, String>,
    wstunnel: Result<PathBuf, String>,
    /// Binaries for the sizes table, or why one is missing.
    pub(crate) sizes: Vec<(String, Result<PathBuf, String>)>,
    pub(crate) sizes_note: Option<String>,
    pub(crate) baseline: Option<PathBuf>,
    pub(crate) pause: Option<Duration>,
    /// Round trip the delayed routes add, and the bytes they move per transfer.
    pub(crate) rtt: Duration,
    pub(crate) rtt_bytes: u64,
    /// Bytes per second the delayed hop carries each way, if limited.
    pub(crate) rate: Option<f64>,
    /// What the delayed hop is; `None` until chosen after parsing.
    pub(crate) path: Option<PathKind>,
    pub(crate) devices: usize,
    pub(crate) memory: bool,
    pub(crate) doc: Option<PathBuf>,
    pub(crate) command: String,
    /// The commit measured, as the script describes it.
    pub(crate) revision: Option<String>,
    pub(crate) started: Option<u64>,
}

impl Options {
    pub(crate) fn parse() -> Result<Options, String> {
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
    pub(crate) fn rathole(&self) -> Result<&Path, String> {
        self.rathole.as_deref().map_err(|why| format!("not run: {why}"))
    }

    /// The wstunnel binary, or why the wstunnel rows are not run.
    pub(crate) fn wstunnel(&self) -> Result<&Path, String> {
        self.wstunnel.as_deref().map_err(|why| format!("not run: {why}"))
    }
}
