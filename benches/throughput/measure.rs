//! The tests: what each measures over a started route, and what one
//! measurement gives.

use std::time::Duration;

use crate::args::Options;
use crate::payload::Payload;
use crate::routes::Running;
use crate::targets::Targets;
use crate::transfer::{receive_down, receive_down_many, round_trips, send_up, send_up_many};
use crate::{GIB, MIB};

/// What is measured over a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Test {
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
    pub(crate) const ALL: [Test; 5] =
        [Test::Up, Test::Down, Test::UpMany, Test::DownMany, Test::Latency];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Test::Up => "up",
            Test::Down => "down",
            Test::UpMany => "up-many",
            Test::DownMany => "down-many",
            Test::Latency => "latency",
        }
    }

    pub(crate) fn named(name: &str) -> Option<Test> {
        Test::ALL.into_iter().find(|t| t.name() == name)
    }

    pub(crate) fn label(self, streams: usize) -> String {
        match self {
            Test::Up => "up (agent → station)".to_owned(),
            Test::Down => "down (station → agent)".to_owned(),
            Test::UpMany => format!("{streams} streams up"),
            Test::DownMany => format!("{streams} streams down"),
            Test::Latency => "latency".to_owned(),
        }
    }
}

/// One throughput measurement.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    /// Bytes per second.
    pub(crate) rate: f64,
    /// CPU seconds of the route's processes per GiB moved, device side and
    /// central side.
    pub(crate) cpu_per_gib: [f64; 2],
    /// Context switches of the route's processes per MiB moved.
    pub(crate) switches_per_mib: f64,
}

/// One latency measurement: percentiles of `--messages` round trips.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Latency {
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
}

pub(crate) enum Outcome {
    Rate(Sample),
    Latency(Latency),
}

pub(crate) fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// Runs one test over a started route.
pub(crate) fn measure(
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
