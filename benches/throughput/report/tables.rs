//! The tables: throughput, latency, memory and binary sizes.

use std::fmt::Write as _;

use super::{mebibytes, median, megabytes, ms, spread, verdict, Report};
use crate::measure::millis;
use crate::measure::Test;
use crate::memory::SETTLE;
use crate::routes::Route;
use crate::support::path::{PathKind, DELAY_BUFFER, MTU, RATE_QUEUE};
use crate::transfer::{LATENCY_WARM_UP, MESSAGE};
use crate::MIB;

impl Report<'_> {
    pub(super) fn throughput(&self) -> String {
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

    pub(super) fn latency(&self) -> String {
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

    pub(super) fn memory(&self) -> String {
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

    pub(super) fn sizes(&self) -> String {
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
