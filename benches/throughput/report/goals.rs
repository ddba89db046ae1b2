//! The goals section: postern's figures against the goals it sets itself.

use std::fmt::Write as _;

use super::{mebibytes, megabytes, ms, verdict, Report};
use crate::measure::Test;
use crate::memory::Idle;
use crate::routes::Route;

impl Report<'_> {
    pub(super) fn goals(&self) -> String {
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
}
