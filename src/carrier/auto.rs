//! The judge `carrier = "auto"` asks whether the stream shape serves a
//! path. Sans-I/O: the agent's stream lanes report what they see, with the
//! time; the judge answers with a verdict or none. Tested below in
//! simulated time, one path shape per test.
//!
//! ```text
//!  down lane: asked, a record arrived, cut ─┐
//!  up lane: refused by the path, cut       ─┼─▶ Judge::verdict(now, Seen) ─▶ None | PathBuffers | Dead
//!  session: Seen (acked, stalled since,    ─┘
//!           round trips on these lanes)
//! ```
//!
//! A path has a short first judgement (a few hellos' time) until each
//! lane has delivered once, then [`PROBE_TIMEOUT`]: a first command must
//! not wait 10 s behind a box that buffers, and a proven path must not be
//! given up on a slow moment.
//!
//! Once auto has moved to poll, [`Retry`] says when to try the stream
//! lanes again: paths change (a proxy reconfigured, a device moved to
//! another network), and the faster shape is not given up for good.
//!
//! A path may also deliver every byte, late: haproxy in `mode http`
//! without `option http-no-delay` holds each small write of a streamed
//! body back (about 200 ms each way), so every round trip on the stream
//! lanes costs 0.4 s where a whole request (the hello) took a few
//! milliseconds, and the flow crawls. The judge compares the least round
//! trip the lanes showed with the hello's: queueing under load raises the
//! typical sample, never the least, so a busy link is not mistaken for one.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::core::rtt::Span;

/// How long a path may hold back what the stream lanes carry before it is
/// judged to buffer them. A streaming path delivers within a round trip;
/// 10 s leaves room for a congested cellular link.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The first judgement comes within this many times the hello's exchange
/// (a new connection, a request and its answer, on the same path), and
/// [`FIRST_JUDGEMENT_MIN`] at least.
const FIRST_JUDGEMENT_HELLOS: u32 = 4;
const FIRST_JUDGEMENT_MIN: Duration = Duration::from_millis(1500);

/// Cuts of one lane within [`CUT_WINDOW`] that make a path one that cuts
/// long requests.
const CUTS_TO_FALL_BACK: usize = 3;
const CUT_WINDOW: Duration = Duration::from_secs(600);

/// Round trips on the stream lanes judged against the hello's: this many
/// samples, none of them under the hello's time this many times over and
/// [`DELAY_SLACK`] more. A hello costs at least one round trip (a new
/// connection, two), so a path has to add two round trips to every one
/// before it counts: jitter on a cellular link does not.
const DELAY_SAMPLES: u32 = 3;
const DELAY_TIMES: u32 = 3;
const DELAY_SLACK: Duration = Duration::from_millis(100);

/// How long the stream lanes get to prove a path they have not proven
/// yet, given how long the hello took (if known).
pub fn first_judgement(hello: Option<Duration>) -> Duration {
    hello.map_or(PROBE_TIMEOUT, |took| {
        (took * FIRST_JUDGEMENT_HELLOS).clamp(FIRST_JUDGEMENT_MIN, PROBE_TIMEOUT)
    })
}

/// A stream lane, as the judge counts its cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Up,
    Down,
}

impl Lane {
    fn as_str(self) -> &'static str {
        match self {
            Lane::Up => "uplink",
            Lane::Down => "downlink",
        }
    }
}

/// What the session shows of the path at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Seen {
    /// Packets the peer has acknowledged.
    pub acked: u64,
    /// Since when sent packets have waited for an ack with no progress.
    pub stalled_since: Option<Instant>,
    /// The round trips sampled since these lanes started.
    pub round_trips: Span,
}

/// Why the stream lanes should be taken down. Shown as the log line's
/// account of what the lanes saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The path holds back or cuts streamed bodies: `auto` moves to poll.
    PathBuffers(Sighting),
    /// The lanes were proven but the station acknowledged nothing for this
    /// long: make them again.
    Dead(Duration),
}

/// What the stream lanes saw of a path that does not pass them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sighting {
    /// The path answered the streamed uplink itself, with this status line.
    AnsweredUplink(String),
    /// Nothing of a streamed downlink arrived within this long of asking.
    DownlinkHeld(Duration),
    /// The station acknowledged nothing of a streamed uplink within this long.
    UplinkHeld(Duration),
    /// No round trip of `samples` took less than `least`, where a whole
    /// request (the hello) took `hello`: the path holds small writes back.
    HeldBack { least: Duration, samples: u32, hello: Duration },
    /// The path cut a streamed lane `count` times within [`CUT_WINDOW`].
    Cut { lane: Lane, count: usize },
}

/// A limit as the log lines give it: seconds with one decimal.
fn seconds(limit: Duration) -> String {
    format!("{:.1} s", limit.as_secs_f32())
}

impl std::fmt::Display for Sighting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sighting::AnsweredUplink(answer) => {
                write!(f, "the path answered the streamed uplink with {answer}")
            }
            Sighting::DownlinkHeld(limit) => write!(
                f,
                "nothing of the streamed downlink arrived within {} of asking for it (the path \
                 buffers responses)",
                seconds(*limit)
            ),
            Sighting::UplinkHeld(limit) => write!(
                f,
                "the station acknowledged nothing sent on the streamed uplink within {} (the path \
                 buffers request bodies)",
                seconds(*limit)
            ),
            Sighting::HeldBack { least, samples, hello } => write!(
                f,
                "no round trip on the stream lanes took less than {} ms ({samples} samples) where \
                 a whole request took {} ms (the path holds small writes back)",
                least.as_millis(),
                hello.as_millis()
            ),
            Sighting::Cut { lane, count } => write!(
                f,
                "the path cut the streamed {} {count} times within {} minutes",
                lane.as_str(),
                CUT_WINDOW.as_secs() / 60
            ),
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::PathBuffers(sighting) => sighting.fmt(f),
            Verdict::Dead(limit) => {
                write!(f, "no acknowledgement from the station for {}", seconds(*limit))
            }
        }
    }
}

/// What one set of stream lanes has shown of the path.
#[derive(Debug)]
pub struct Judge {
    first: Duration,
    /// What a whole request took on this path, when the lanes serve `auto`.
    hello: Option<Duration>,
    /// Packets the peer had acknowledged when the lanes started.
    acked_at_start: u64,
    /// The current downlink was asked for at this time.
    down_asked: Option<Instant>,
    /// A record arrived on the current downlink.
    down_flowing: bool,
    /// A record arrived on some downlink of this set.
    down_proven: bool,
    /// The path answered the uplink itself: its status line.
    refused: Option<String>,
    /// Cuts of established lanes, oldest first, within [`CUT_WINDOW`].
    cuts: VecDeque<(Instant, Lane)>,
}

impl Judge {
    /// A judge for lanes starting now, on a path whose hello took `hello`,
    /// when the peer has acknowledged `acked` packets.
    pub fn new(hello: Option<Duration>, acked: u64) -> Judge {
        Judge {
            first: first_judgement(hello),
            hello,
            acked_at_start: acked,
            down_asked: None,
            down_flowing: false,
            down_proven: false,
            refused: None,
            cuts: VecDeque::new(),
        }
    }

    /// A downlink request went out.
    pub fn down_asked(&mut self, now: Instant) {
        self.down_asked = Some(now);
        self.down_flowing = false;
    }

    /// A record arrived on the current downlink.
    pub fn down_delivered(&mut self) {
        self.down_flowing = true;
        self.down_proven = true;
    }

    /// The current downlink ended; returns whether it had delivered (a
    /// downlink that delivered and ended while the session lives was cut).
    pub fn down_ended(&mut self) -> bool {
        self.down_asked = None;
        std::mem::take(&mut self.down_flowing)
    }

    /// An established lane was cut by the path.
    pub fn cut(&mut self, now: Instant, lane: Lane) {
        self.prune(now);
        // Bounded by the window's verdict: more than this many never wait.
        if self.cuts.len() < 2 * CUTS_TO_FALL_BACK {
            self.cuts.push_back((now, lane));
        }
    }

    /// The path answered the streamed uplink itself with `status_line`.
    pub fn refused(&mut self, status_line: String) {
        self.refused = Some(status_line);
    }

    /// Whether a lane has yet to deliver, or the lanes' round trips have
    /// yet to be judged: the driver then looks often.
    pub fn judging(&self, seen: &Seen) -> bool {
        !self.down_proven || seen.acked == self.acked_at_start || self.wants_round_trips(seen)
    }

    /// Whether the judge needs a round trip it has not got: the driver
    /// sends a probe when nothing is in flight, so an idle path is judged
    /// within a few round trips rather than a few keepalives.
    pub fn wants_round_trips(&self, seen: &Seen) -> bool {
        self.hello.is_some() && seen.round_trips.samples < DELAY_SAMPLES
    }

    /// Whether the path holds the lanes' bytes back, by their round trips.
    fn held_back(&self, round_trips: Span) -> Option<Sighting> {
        let (hello, least) = (self.hello?, round_trips.least?);
        let bound = (hello * DELAY_TIMES).max(hello + DELAY_SLACK);
        let samples = round_trips.samples;
        (samples >= DELAY_SAMPLES && least > bound).then_some(Sighting::HeldBack {
            least,
            samples,
            hello,
        })
    }

    fn prune(&mut self, now: Instant) {
        while self
            .cuts
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > CUT_WINDOW)
        {
            self.cuts.pop_front();
        }
    }

    /// The verdict at `now`, given what the session has `seen`.
    pub fn verdict(&mut self, now: Instant, seen: &Seen) -> Option<Verdict> {
        let Seen { acked, stalled_since, round_trips } = *seen;
        if let Some(answer) = self.refused.take() {
            return Some(Verdict::PathBuffers(Sighting::AnsweredUplink(answer)));
        }
        let down_limit = if self.down_proven { PROBE_TIMEOUT } else { self.first };
        let waited = |since: Instant| now.saturating_duration_since(since);
        if self.down_asked.is_some_and(|at| !self.down_flowing && waited(at) >= down_limit) {
            return Some(Verdict::PathBuffers(Sighting::DownlinkHeld(down_limit)));
        }
        let up_proven = acked != self.acked_at_start;
        let up_limit = if up_proven { PROBE_TIMEOUT } else { self.first };
        if self.down_flowing && stalled_since.is_some_and(|since| waited(since) >= up_limit) {
            return Some(if up_proven {
                Verdict::Dead(up_limit)
            } else {
                Verdict::PathBuffers(Sighting::UplinkHeld(up_limit))
            });
        }
        if let Some(sighting) = self.held_back(round_trips) {
            return Some(Verdict::PathBuffers(sighting));
        }
        self.prune(now);
        for lane in [Lane::Down, Lane::Up] {
            let count = self.cuts.iter().filter(|(_, cut)| *cut == lane).count();
            if count >= CUTS_TO_FALL_BACK {
                return Some(Verdict::PathBuffers(Sighting::Cut { lane, count }));
            }
        }
        None
    }
}

/// A wait as a person says it: seconds under two minutes, then minutes.
pub fn spoken(wait: Duration) -> String {
    match wait.as_secs() {
        secs if secs < 120 => format!("{secs} s"),
        secs => format!("{} min", secs / 60),
    }
}

/// The wait before auto first tries the stream lanes again, unless the
/// config says (`stream_retry`).
pub const STREAM_RETRY: Duration = Duration::from_secs(600);

/// The longest wait between tries, however often the path was judged the
/// same way: a path that changed is found within a working day.
const RETRY_MAX: Duration = Duration::from_secs(8 * 3600);

/// When auto, on poll, tries the stream lanes again: `first` after the
/// first move to poll, twice as long after each try the path refused
/// again, and only while nothing waits for an acknowledgement, so no one's
/// bytes wait on the judgement of a path that may still buffer them.
#[derive(Debug)]
pub struct Retry {
    first: Duration,
    wait: Duration,
    at: Option<Instant>,
}

impl Retry {
    pub fn new(first: Duration) -> Retry {
        Retry { first, wait: first, at: None }
    }

    /// Auto moved to poll at `now`: returns how long until the next try.
    pub fn fell_back(&mut self, now: Instant) -> Duration {
        let wait = self.wait;
        self.at = Some(now + wait);
        self.wait = (wait * 2).min(RETRY_MAX.max(self.first));
        wait
    }

    /// When a try is due (checked again while the tunnel is busy).
    pub fn due_at(&self) -> Option<Instant> {
        self.at
    }

    /// Whether to try now, given whether anything waits for an ack; a
    /// try it allows is taken (the next waits for the next fall back).
    pub fn try_if_due(&mut self, now: Instant, idle: bool) -> bool {
        let due = idle && self.at.is_some_and(|at| now >= at);
        if due {
            self.at = None;
        }
        due
    }

    /// The stream lanes passed the path for long: a later move to poll
    /// waits `first` again.
    pub fn passed(&mut self) {
        self.wait = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Simulated time: the judge never reads a clock.
    struct Sim {
        now: Instant,
        judge: Judge,
        seen: Seen,
    }

    impl Sim {
        fn new(hello: Option<Duration>) -> Sim {
            Sim { now: Instant::now(), judge: Judge::new(hello, 0), seen: Seen::default() }
        }

        fn advance(&mut self, by: Duration) -> Option<Verdict> {
            self.now += by;
            self.judge.verdict(self.now, &self.seen)
        }

        /// A packet sent alone comes back after `took`.
        fn round_trip(&mut self, took: Duration) -> Option<Verdict> {
            let span = &mut self.seen.round_trips;
            span.samples += 1;
            span.least = Some(span.least.map_or(took, |least| least.min(took)));
            self.seen.acked += 1;
            self.advance(took)
        }

        /// Advances in 100 ms ticks until a verdict or `limit`.
        fn run(&mut self, limit: Duration) -> Option<(Duration, Verdict)> {
            let start = self.now;
            while self.now - start < limit {
                if let Some(verdict) = self.advance(ms(100)) {
                    return Some((self.now - start, verdict));
                }
            }
            None
        }
    }

    #[test]
    fn the_first_judgement_scales_with_the_hello() {
        assert_eq!(first_judgement(None), PROBE_TIMEOUT);
        assert_eq!(first_judgement(Some(ms(2))), FIRST_JUDGEMENT_MIN);
        assert_eq!(first_judgement(Some(ms(800))), ms(3200));
        assert_eq!(first_judgement(Some(ms(4000))), PROBE_TIMEOUT);
    }

    #[test]
    fn a_direct_path_idle_for_hours_gets_no_verdict() {
        let mut sim = Sim::new(Some(ms(1)));
        sim.judge.down_asked(sim.now);
        sim.advance(ms(1));
        sim.judge.down_delivered();
        for _ in 0..DELAY_SAMPLES {
            assert!(sim.judge.wants_round_trips(&sim.seen));
            assert_eq!(sim.round_trip(ms(21)), None);
        }
        assert!(!sim.judge.judging(&sim.seen));
        // Keepalives go and are acknowledged: nothing waits for long.
        for _ in 0..(6 * 3600) {
            sim.seen.stalled_since = Some(sim.now);
            assert_eq!(sim.advance(ms(200)), None);
            sim.seen.acked += 1;
            sim.seen.stalled_since = None;
            assert_eq!(sim.advance(ms(800)), None);
        }
    }

    #[test]
    fn a_path_that_buffers_responses_is_judged_within_the_first_judgement() {
        let mut sim = Sim::new(Some(ms(2)));
        sim.judge.down_asked(sim.now);
        sim.seen.stalled_since = Some(sim.now);
        let (at, verdict) = sim.run(PROBE_TIMEOUT).expect("a verdict");
        assert_eq!(at, FIRST_JUDGEMENT_MIN);
        assert_eq!(verdict, Verdict::PathBuffers(Sighting::DownlinkHeld(FIRST_JUDGEMENT_MIN)));
    }

    #[test]
    fn a_path_that_buffers_request_bodies_is_judged_by_the_missing_ack() {
        // Cellular: a hello of 700 ms gives 2.8 s.
        let mut sim = Sim::new(Some(ms(700)));
        sim.judge.down_asked(sim.now);
        sim.advance(ms(400));
        sim.judge.down_delivered();
        sim.seen.stalled_since = Some(sim.now);
        let (at, verdict) = sim.run(PROBE_TIMEOUT).expect("a verdict");
        assert_eq!(at, ms(2800));
        assert_eq!(verdict, Verdict::PathBuffers(Sighting::UplinkHeld(ms(2800))));
    }

    #[test]
    fn a_proven_path_that_goes_quiet_is_dead_after_the_full_time() {
        let mut sim = Sim::new(Some(ms(2)));
        sim.judge.down_asked(sim.now);
        sim.judge.down_delivered();
        sim.seen.acked = 3;
        sim.seen.stalled_since = Some(sim.now);
        let (at, verdict) = sim.run(2 * PROBE_TIMEOUT).expect("a verdict");
        assert_eq!(at, PROBE_TIMEOUT);
        assert_eq!(verdict, Verdict::Dead(PROBE_TIMEOUT));
        // A new downlink on a proven path also gets the full time.
        let mut sim = Sim::new(Some(ms(2)));
        sim.judge.down_asked(sim.now);
        sim.judge.down_delivered();
        assert!(sim.judge.down_ended(), "it had delivered");
        sim.judge.down_asked(sim.now);
        assert_eq!(sim.run(PROBE_TIMEOUT - ms(100)), None);
    }

    #[test]
    fn a_path_that_cuts_at_5_s_is_judged_at_the_third_cut() {
        for lane in [Lane::Down, Lane::Up] {
            let mut sim = Sim::new(Some(ms(2)));
            sim.judge.down_asked(sim.now);
            sim.judge.down_delivered();
            sim.seen.acked = 1;
            for cut in 1..=3 {
                assert_eq!(sim.advance(Duration::from_secs(5)), None, "{lane:?} before cut {cut}");
                sim.judge.cut(sim.now, lane);
            }
            let verdict = sim.advance(ms(100)).expect("a verdict");
            assert_eq!(verdict, Verdict::PathBuffers(Sighting::Cut { lane, count: 3 }));
        }
    }

    #[test]
    fn cuts_further_apart_than_the_window_are_forgiven() {
        let mut sim = Sim::new(Some(ms(2)));
        sim.judge.down_delivered();
        sim.seen.acked = 1;
        for _ in 0..10 {
            sim.judge.cut(sim.now, Lane::Up);
            assert_eq!(sim.advance(CUT_WINDOW / 2 + ms(1)), None);
        }
    }

    #[test]
    fn a_slow_machine_that_looks_late_still_judges_by_elapsed_time() {
        // The driver's ticks come seconds late: the verdict is the same.
        let mut sim = Sim::new(Some(ms(2)));
        sim.judge.down_asked(sim.now);
        assert!(sim.judge.judging(&sim.seen));
        let verdict = sim.advance(Duration::from_secs(7)).expect("a verdict");
        assert!(matches!(verdict, Verdict::PathBuffers(_)));
    }

    #[test]
    fn the_paths_own_answer_to_the_uplink_is_reported_once() {
        let mut sim = Sim::new(None);
        sim.judge.refused("413 Content Too Large".into());
        assert_eq!(
            sim.advance(ms(1)),
            Some(Verdict::PathBuffers(Sighting::AnsweredUplink("413 Content Too Large".into())))
        );
        assert_eq!(sim.advance(ms(1)), None);
    }

    #[test]
    fn a_path_that_holds_small_writes_back_is_judged_by_its_round_trips() {
        // haproxy without `option http-no-delay`: every byte arrives, 0.4 s late.
        let mut sim = Sim::new(Some(ms(3)));
        sim.judge.down_asked(sim.now);
        sim.judge.down_delivered();
        assert_eq!(sim.round_trip(ms(410)), None);
        assert_eq!(sim.round_trip(ms(402)), None);
        let verdict = sim.round_trip(ms(405)).expect("a verdict at the third");
        let least = ms(402);
        let held_back = Sighting::HeldBack { least, samples: 3, hello: ms(3) };
        assert_eq!(verdict, Verdict::PathBuffers(held_back));
    }

    /// The log lines operators (and the integration tests) read.
    #[test]
    fn verdicts_read_as_what_the_lanes_saw() {
        let lines = [
            (Verdict::Dead(PROBE_TIMEOUT), "no acknowledgement from the station for 10.0 s"),
            (
                Verdict::PathBuffers(Sighting::DownlinkHeld(ms(1500))),
                "nothing of the streamed downlink arrived within 1.5 s of asking for it (the path \
                 buffers responses)",
            ),
            (
                Verdict::PathBuffers(Sighting::UplinkHeld(ms(2800))),
                "the station acknowledged nothing sent on the streamed uplink within 2.8 s (the \
                 path buffers request bodies)",
            ),
            (
                Verdict::PathBuffers(Sighting::HeldBack {
                    least: ms(402),
                    samples: 3,
                    hello: ms(3),
                }),
                "no round trip on the stream lanes took less than 402 ms (3 samples) where a \
                 whole request took 3 ms (the path holds small writes back)",
            ),
            (
                Verdict::PathBuffers(Sighting::Cut { lane: Lane::Up, count: 3 }),
                "the path cut the streamed uplink 3 times within 10 minutes",
            ),
            (
                Verdict::PathBuffers(Sighting::AnsweredUplink("413 Content Too Large".into())),
                "the path answered the streamed uplink with 413 Content Too Large",
            ),
        ];
        for (verdict, line) in lines {
            assert_eq!(verdict.to_string(), line);
        }
    }

    #[test]
    fn a_slow_link_with_jitter_is_not_mistaken_for_one_that_holds_back() {
        // Cellular: the hello (a connection and a request) took 700 ms, one
        // round trip 350 ms, with up to half a second of jitter.
        let mut sim = Sim::new(Some(ms(700)));
        sim.judge.down_asked(sim.now);
        sim.judge.down_delivered();
        for took in [850, 600, 370, 900, 1200, 380] {
            assert_eq!(sim.round_trip(ms(took)), None, "{took} ms");
        }
        // A fast path whose hello was slow for once: also no verdict.
        let mut sim = Sim::new(Some(ms(40)));
        sim.judge.down_asked(sim.now);
        sim.judge.down_delivered();
        for took in [130, 141, 120] {
            assert_eq!(sim.round_trip(ms(took)), None, "{took} ms");
        }
    }

    #[test]
    fn a_configured_stream_is_not_judged_by_its_round_trips() {
        // No hello to compare with: `carrier = "stream"` has nowhere to go.
        let mut sim = Sim::new(None);
        sim.judge.down_asked(sim.now);
        sim.judge.down_delivered();
        assert!(!sim.judge.wants_round_trips(&sim.seen));
        for _ in 0..10 {
            assert_eq!(sim.round_trip(ms(400)), None);
        }
    }

    #[test]
    fn tries_come_twice_as_far_apart_up_to_a_working_day() {
        let start = Instant::now();
        let mut retry = Retry::new(STREAM_RETRY);
        assert!(!retry.try_if_due(start + RETRY_MAX, true), "nothing to retry before a fall back");
        let mut now = start;
        let mut waits = Vec::new();
        for _ in 0..8 {
            let wait = retry.fell_back(now);
            waits.push(wait.as_secs() / 60);
            assert!(!retry.try_if_due(now + wait - ms(1), true));
            assert!(!retry.try_if_due(now + wait, false), "a busy tunnel is not interrupted");
            now += wait + Duration::from_secs(5);
            assert!(retry.try_if_due(now, true));
            assert!(!retry.try_if_due(now, true), "one try per fall back");
        }
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 480, 480]);
        // Stream lanes that passed for long: the next fall back waits the
        // first time again.
        retry.passed();
        assert_eq!(retry.fell_back(now), STREAM_RETRY);
    }

    #[test]
    fn a_retry_longer_than_the_cap_is_kept() {
        let mut retry = Retry::new(Duration::from_secs(86_400));
        let now = Instant::now();
        assert_eq!(retry.fell_back(now), Duration::from_secs(86_400));
        assert_eq!(retry.fell_back(now), Duration::from_secs(86_400));
    }
}
