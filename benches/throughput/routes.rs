//! The routes: what each is, which tests it runs and what it is compared
//! with, how it starts, and what a started one holds.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use crate::args::Options;
use crate::measure::Test;
use crate::middleboxes::Middlebox;
use crate::peers::{start_httptunnel, start_rathole, start_wstunnel};
use crate::postern::Postern;
use crate::support::path::{DelayedHop, Hop, PathKind};
use crate::support::Proc;
use crate::targets::Targets;

/// Where a postern agent reaches its station.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Via {
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
pub(crate) const NGINX_FOR_STREAM: &str =
    "proxy_http_version 1.1; proxy_request_buffering off; client_max_body_size 0;";

/// A way from the client to the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Route {
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
    pub(crate) const ALL: [Route; 24] = [
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
    pub(crate) const BASELINES: [Route; 2] = [Route::StreamBaseline, Route::PollBaseline];

    pub(crate) fn name(self) -> &'static str {
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

    pub(crate) fn label(self) -> &'static str {
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

    pub(crate) fn named(name: &str) -> Option<Route> {
        Route::ALL.into_iter().chain(Route::BASELINES).find(|r| r.name() == name)
    }

    /// Whether the route has the `--rtt` delay in it.
    pub(crate) fn delayed(self) -> bool {
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

    pub(crate) fn is_direct(self) -> bool {
        matches!(self, Route::Direct | Route::DirectRtt)
    }

    pub(crate) fn is_postern(self) -> bool {
        self.label().starts_with("postern")
    }

    /// The routes whose rates this one is compared with: direct loopback,
    /// httptunnel on the same path (with the same delay, through the same
    /// proxy), rathole's Noise transport.
    pub(crate) fn baselines(self) -> [Option<Route>; 3] {
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
    pub(crate) fn skips(self, test: Test) -> Option<Result<(), String>> {
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
    pub(crate) fn start(self, targets: &Targets, options: &Options) -> Result<Running, String> {
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

/// Where a client connects, per target, to go through a route.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Entries {
    pub(crate) up: Option<SocketAddr>,
    pub(crate) down: Option<SocketAddr>,
    pub(crate) echo: Option<SocketAddr>,
}

/// A started route: its entries and the processes that carry it (stopped
/// on drop).
pub(crate) struct Running {
    pub(crate) entries: Entries,
    pub(crate) procs: Vec<Proc>,
    /// Whatever else must live as long as the route: delay relays,
    /// middleboxes, config directories. Dropped (stopped, removed) with it.
    pub(crate) _keep: Vec<Box<dyn std::any::Any>>,
}

impl Running {
    /// Names the route's processes that are no longer running (something
    /// on the machine may kill processes by name), or nothing.
    pub(crate) fn exited(&self) -> String {
        let gone: Vec<&str> =
            self.procs.iter().filter(|p| !p.is_running()).map(|p| p.name.as_str()).collect();
        if gone.is_empty() {
            return String::new();
        }
        format!(" ({} no longer running)", gone.join(", "))
    }

    /// Context switches so far (voluntary and not) of all threads of the
    /// route's processes: each is a sleep and a wakeup.
    pub(crate) fn context_switches(&self) -> u64 {
        self.procs.iter().map(Proc::context_switches).sum()
    }

    /// CPU seconds used so far by the route's processes on each side.
    pub(crate) fn cpu_seconds(&self) -> [f64; 2] {
        let mut sides = [0.0; 2];
        for proc in &self.procs {
            sides[proc.side as usize] += proc.cpu_seconds();
        }
        sides
    }

    /// The largest of each side's current or peak RSS.
    pub(crate) fn rss(&self, of: fn(&Proc) -> u64) -> [u64; 2] {
        let mut sides = [0; 2];
        for proc in &self.procs {
            sides[proc.side as usize] = sides[proc.side as usize].max(of(proc));
        }
        sides
    }

    /// The route's last log line containing `marker` (a process's own
    /// account of why a transfer failed), or nothing.
    pub(crate) fn logged(&self, marker: &str) -> String {
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

/// The entries of a route that names them by target.
pub(crate) fn entries_of(by_target: &BTreeMap<String, SocketAddr>) -> Entries {
    let entry = |name: &str| by_target.get(name).copied();
    Entries { up: entry("sink"), down: entry("source"), echo: entry("echo") }
}

/// Runs `start`, turning a panic (the middlebox recipes panic on failure,
/// as tests do) into an error with its message.
pub(crate) fn catching<T>(start: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(start)).map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "panicked".to_owned())
    })
}
