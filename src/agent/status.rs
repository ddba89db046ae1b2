//! What the agent tells about itself: the status line it logs every
//! [`STATUS_EVERY`], and on its optional `status` listener the same
//! figures as Prometheus text (`/metrics`) and the lines `postern status`
//! prints (`/status.txt`).
//!
//! ```text
//!  live session (Tunnel::stats, last heard) ─┐
//!  Record: sessions, ended totals, last error ┼─▶ Snapshot ─▶ metrics | text | log line
//!  reconnects, carrier shape and why         ─┘
//! ```

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use smol::net::TcpListener;

use super::{lock, Shared};
use crate::status::{ago, Exposition, Millis, Pages};
use crate::tunnel::Stats;

/// How often the agent logs a status line at info level.
const STATUS_EVERY: Duration = Duration::from_secs(300);

/// Longest last-error text kept: lane errors quote what a proxy said.
const MAX_ERROR_BYTES: usize = 512;

/// What the agent keeps for its status beyond the live session's figures.
pub(super) struct Record {
    started: SystemTime,
    sessions: AtomicU64,
    /// The live session: its short id and when it began.
    session: Mutex<Option<(String, SystemTime)>>,
    /// Stream bytes and resent packets of sessions that ended.
    ended: Mutex<Carried>,
    last_error: Mutex<Option<(SystemTime, String)>>,
    /// Reloads applied and refused: how many, and when the last was.
    reloads: Mutex<[(u64, Millis); 2]>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Carried {
    up: u64,
    down: u64,
    resent: u64,
}

impl Carried {
    fn of(stats: &Stats) -> Carried {
        Carried { up: stats.stream_out, down: stats.stream_in, resent: stats.resent }
    }

    fn plus(self, other: Carried) -> Carried {
        Carried {
            up: self.up + other.up,
            down: self.down + other.down,
            resent: self.resent + other.resent,
        }
    }
}

impl Record {
    pub(super) fn new() -> Record {
        Record {
            started: SystemTime::now(),
            sessions: AtomicU64::new(0),
            session: Mutex::new(None),
            ended: Mutex::new(Carried::default()),
            last_error: Mutex::new(None),
            reloads: Mutex::new([(0, Millis(0)); 2]),
        }
    }

    /// A reload (SIGHUP) was applied, or refused.
    pub(super) fn reloaded(&self, applied: bool) {
        let tally = &mut lock(&self.reloads)[usize::from(!applied)];
        tally.0 += 1;
        tally.1 = Millis::unix(SystemTime::now());
    }

    pub(super) fn session_began(&self, id: String) {
        self.sessions.fetch_add(1, Ordering::Relaxed);
        *lock(&self.session) = Some((id, SystemTime::now()));
    }

    pub(super) fn session_ended(&self, stats: &Stats) {
        let mut ended = lock(&self.ended);
        *ended = ended.plus(Carried::of(stats));
        *lock(&self.session) = None;
    }

    /// The latest thing that went wrong, as its warning said it.
    pub(super) fn error(&self, mut text: String) {
        if text.len() > MAX_ERROR_BYTES {
            let mut cut = MAX_ERROR_BYTES;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        *lock(&self.last_error) = Some((SystemTime::now(), text));
    }
}

/// The live session as the status shows it.
#[derive(Debug, Clone, PartialEq)]
struct Session {
    id: String,
    since: Millis,
    /// Since the station was last heard from.
    quiet_for: Millis,
    streams: usize,
}

/// Everything the pages show, taken at one moment.
#[derive(Debug, Clone, PartialEq)]
struct Snapshot {
    now: Millis,
    started: Millis,
    /// How the station is reached: `station HOST:PORT` or `proxy HOST:PORT`.
    route: String,
    carrier: &'static str,
    /// Why `auto` runs poll, once it fell back.
    carrier_why: Option<String>,
    lanes: &'static str,
    session: Option<Session>,
    sessions: u64,
    reconnects: u64,
    /// Since the agent started: ended sessions and the live one.
    carried: Carried,
    last_error: Option<(Millis, String)>,
    reloads: [(u64, Millis); 2],
}

fn snapshot(shared: &Shared) -> Snapshot {
    let record = &shared.record;
    let mut carried = *lock(&record.ended);
    let live = shared.tunnel().filter(|tunnel| tunnel.closed().is_none());
    let began = lock(&record.session).clone();
    let session = live.zip(began).map(|(tunnel, (id, since))| {
        carried = carried.plus(Carried::of(&tunnel.stats()));
        Session {
            id,
            since: Millis::unix(since),
            quiet_for: Millis::of(Instant::now().saturating_duration_since(tunnel.last_heard())),
            streams: tunnel.stream_count(),
        }
    });
    Snapshot {
        now: Millis::unix(SystemTime::now()),
        started: Millis::unix(record.started),
        route: shared.client.describe(),
        carrier: shared.shape.describe(shared.carrier),
        carrier_why: shared.shape.why(),
        lanes: shared.shape.lanes(shared.carrier),
        session,
        sessions: record.sessions.load(Ordering::Relaxed),
        reconnects: shared.reconnects.load(Ordering::Relaxed),
        carried,
        last_error: lock(&record.last_error).clone().map(|(at, text)| (Millis::unix(at), text)),
        reloads: *lock(&record.reloads),
    }
}

fn render_metrics(snap: &Snapshot) -> String {
    let mut out = Exposition::default();
    out.build_info("postern_agent_build_info");
    out.start_time("agent", snap.started);
    out.reloads("postern_agent_", snap.reloads[0], snap.reloads[1]);
    out.one(
        "postern_agent_connected",
        "gauge",
        "1 while the agent has a session with the station.",
        u8::from(snap.session.is_some()),
    );
    let (since, quiet, streams) = snap
        .session
        .as_ref()
        .map_or((Millis(0), Millis(0), 0), |s| (s.since, s.quiet_for, s.streams));
    out.one(
        "postern_agent_session_start_seconds",
        "gauge",
        "When the live session began, unix seconds; 0 without one.",
        since,
    );
    out.one(
        "postern_agent_station_quiet_seconds",
        "gauge",
        "Seconds since the station was last heard from in the live session; 0 without one.",
        quiet,
    );
    out.family(
        "postern_agent_carrier",
        "gauge",
        "The carrier shape in use: 1 for the one the agent runs.",
        &["stream", "poll"].map(|kind| {
            let on = (snap.lanes == "up + down") == (kind == "stream");
            (format!("{{kind=\"{kind}\"}}"), u8::from(on).to_string())
        }),
    );
    out.one("postern_agent_streams_open", "gauge", "Streams open in the live session.", streams);
    out.family(
        "postern_agent_stream_bytes_total",
        "counter",
        "Stream bytes carried since the agent started (up: to the station).",
        &[
            ("{direction=\"up\"}".into(), snap.carried.up.to_string()),
            ("{direction=\"down\"}".into(), snap.carried.down.to_string()),
        ],
    );
    out.one(
        "postern_agent_resent_packets_total",
        "counter",
        "Packets sent again after a carrier connection was lost.",
        snap.carried.resent,
    );
    out.one(
        "postern_agent_reconnects_total",
        "counter",
        "Carrier connections that failed and were made again.",
        snap.reconnects,
    );
    out.one(
        "postern_agent_sessions_total",
        "counter",
        "Sessions with the station begun since the agent started.",
        snap.sessions,
    );
    out.one(
        "postern_agent_last_error_seconds",
        "gauge",
        "When the agent last logged a warning about its link, unix seconds; 0 if never.",
        snap.last_error.as_ref().map_or(Millis(0), |(at, _)| *at),
    );
    out.finish()
}

/// What `postern status` prints.
fn render_text(snap: &Snapshot) -> String {
    let mut out = String::new();
    let _ = match &snap.session {
        Some(s) => writeln!(
            out,
            "agent: connected via {}, session {} for {}; the station was heard {} ago",
            snap.route,
            s.id,
            ago(snap.now.since(s.since).seconds()),
            ago(s.quiet_for.seconds())
        ),
        None => writeln!(out, "agent: no session with the station (via {})", snap.route),
    };
    let _ = write!(out, "carrier: {}, lanes {}", snap.carrier, snap.lanes);
    let _ = match &snap.carrier_why {
        Some(why) => writeln!(out, " (poll since: {why})"),
        None => writeln!(out),
    };
    let streams = snap.session.as_ref().map_or(0, |s| s.streams);
    let _ = writeln!(
        out,
        "streams: {streams} open; {} bytes up, {} down, {} packets resent since the start {} ago",
        snap.carried.up,
        snap.carried.down,
        snap.carried.resent,
        ago(snap.now.since(snap.started).seconds())
    );
    let _ = writeln!(out, "sessions: {}; carrier reconnects: {}", snap.sessions, snap.reconnects);
    let _ = match &snap.last_error {
        Some((at, text)) => {
            writeln!(out, "last error, {} ago: {text}", ago(snap.now.since(*at).seconds()))
        }
        None => writeln!(out, "last error: none"),
    };
    out
}

impl Pages for Snapshot {
    fn metrics(&self) -> String {
        render_metrics(self)
    }

    fn json(&self) -> Option<String> {
        None
    }

    fn text(&self) -> String {
        render_text(self)
    }
}

/// Serves the status pages until the agent stops.
pub(super) async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    crate::status::serve(listener, move || snapshot(&shared)).await;
}

/// Logs the status every [`STATUS_EVERY`]: what an operator reading the
/// journal wants to know without debug logging.
pub(super) async fn report(shared: Arc<Shared>) {
    loop {
        smol::Timer::after(STATUS_EVERY).await;
        for line in render_text(&snapshot(&shared)).lines() {
            log::info!("status: {line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            now: Millis(2_000_000),
            started: Millis(1_000_000),
            route: "proxy 10.0.0.1:3128".into(),
            carrier: "auto (poll)",
            carrier_why: Some("the path cut the streamed downlink 3 times".into()),
            lanes: "push + poll",
            session: Some(Session {
                id: "3f2a9c1e".into(),
                since: Millis(1_900_000),
                quiet_for: Millis(500),
                streams: 2,
            }),
            sessions: 2,
            reconnects: 3,
            carried: Carried { up: 1234, down: 5678, resent: 12 },
            last_error: Some((Millis(1_500_000), "down lane: \"timed out\"".into())),
            reloads: [(1, Millis(1_800_000)), (0, Millis(0))],
        }
    }

    #[test]
    fn metrics_name_every_figure() {
        let text = render_metrics(&sample());
        for line in [
            "postern_agent_connected 1",
            "postern_agent_session_start_seconds 1900.000",
            "postern_agent_station_quiet_seconds 0.500",
            "postern_agent_carrier{kind=\"stream\"} 0",
            "postern_agent_carrier{kind=\"poll\"} 1",
            "postern_agent_streams_open 2",
            "postern_agent_stream_bytes_total{direction=\"up\"} 1234",
            "postern_agent_stream_bytes_total{direction=\"down\"} 5678",
            "postern_agent_resent_packets_total 12",
            "postern_agent_reconnects_total 3",
            "postern_agent_sessions_total 2",
            "postern_agent_last_error_seconds 1500.000",
            "process_start_time_seconds 1000.000",
            "postern_agent_reloads_total{result=\"success\"} 1",
            "postern_agent_reloads_total{result=\"failure\"} 0",
            "postern_agent_last_reload_seconds{result=\"success\"} 1800.000",
            "postern_agent_last_reload_seconds{result=\"failure\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn text_for_people() {
        assert_eq!(
            render_text(&sample()),
            "agent: connected via proxy 10.0.0.1:3128, session 3f2a9c1e for 100 s; the station was heard 0 s ago\n\
             carrier: auto (poll), lanes push + poll (poll since: the path cut the streamed downlink 3 times)\n\
             streams: 2 open; 1234 bytes up, 5678 down, 12 packets resent since the start 16 min ago\n\
             sessions: 2; carrier reconnects: 3\n\
             last error, 8 min ago: down lane: \"timed out\"\n"
        );
        let idle = Snapshot { session: None, last_error: None, carrier_why: None, ..sample() };
        assert!(render_text(&idle).starts_with("agent: no session with the station (via proxy"));
    }

    #[test]
    fn long_errors_are_cut_at_a_character() {
        let record = Record::new();
        record.error("é".repeat(MAX_ERROR_BYTES));
        let kept = lock(&record.last_error).clone().expect("kept").1;
        assert!(kept.len() <= MAX_ERROR_BYTES && kept.chars().all(|c| c == 'é'));
    }
}
