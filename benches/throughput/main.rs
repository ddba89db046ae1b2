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
//! add a kind of measurement: a [`Test`] variant and its arm in [`measure()`].
//!
//! Where things are: `args.rs` the options and `--help`; `routes.rs` what a
//! route is, how each starts and what a started one holds; `postern.rs` a
//! postern station and agent; `peers.rs` the other tools (hts/htc,
//! rathole, wstunnel); `targets.rs` the sink, source and echo every route
//! leads to; `payload.rs` the bytes moved and their hash; `measure.rs` the
//! tests and `transfer.rs` the client side of each; `memory.rs` the idle
//! memory figures; `machine.rs` where it ran; `report.rs` the Markdown.
//! This file starts the routes and runs the rounds ([`run`]). The process
//! guards, /proc readers and the delayed hop are in benches/support, shared
//! with benches/fleet.rs.

mod args;
mod machine;
mod measure;
mod memory;
mod payload;
mod peers;
mod postern;
mod report;
mod routes;
mod targets;
mod transfer;

// The integration tests' squid and nginx recipes, so the bench and the
// tests start the same middleboxes. That module takes `TempDir` and
// `refused_addr` from the tests' `common`; support has them from the same
// file (tests/common/scratch.rs).
#[path = "../../tests/middleboxes/mod.rs"]
mod middleboxes;
#[path = "../support/mod.rs"]
mod support;
mod common {
    pub(crate) use super::support::{refused_addr, TempDir};
}

use std::collections::BTreeMap;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use args::{Options, USAGE};
use machine::Machine;
use measure::{measure, millis, Latency, Outcome, Sample, Test};
use memory::{idle_memory, station_per_device};
use payload::Payload;
use report::{write_sections, Report};
use routes::Route;
use support::Proc;
use targets::Targets;

/// Longest one transfer may take before the row is reported as failed.
const TRANSFER_LIMIT: Duration = Duration::from_secs(120);

/// Longest a warm-up transfer may take: a route that cannot pass 4 MiB in
/// this time (a carrier a middlebox stops) is reported with the reason and
/// not measured.
pub(crate) const WARM_UP_LIMIT: Duration = Duration::from_secs(15);

/// Bytes of the warm-up transfer each route gets before it is measured:
/// sessions, connections and allocator pools are set up by then.
const WARM_UP: u64 = 4 << 20;

pub(crate) const MIB: u64 = 1 << 20;
pub(crate) const GIB: f64 = (1u64 << 30) as f64;

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
