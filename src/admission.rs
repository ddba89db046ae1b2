//! What the station lets in before anyone has proved who they are: how many
//! connections, how many handshakes per second, and how much it says in
//! the log about what it turned away.
//!
//! ```text
//!  accept ─▶ Slots::take (strangers ≤ MAX_STRANGERS, all ≤ max_connections) ─▶ 503 past it
//!  hello  ─▶ HandshakeBudget::take (token bucket) ─▶ 503 past it, before any Diffie-Hellman
//!  first authentic packet ─▶ Slot::promote (no longer a stranger)
//!  refusals ─▶ RejectLog: a line each, up to a budget a minute, then one summary
//!  a device's sessions replacing each other ─▶ CloneWatch: two agents share a key ─▶ 409
//! ```
//!
//! No I/O and no clock of its own: callers pass `now`, so tests drive time.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Concurrent connections that have not yet carried an authentic packet.
/// Each costs at most a small read buffer and a deadline; 256 is far above
/// what devices reconnecting at once need and bounds what garbage can pin.
pub const MAX_STRANGERS: usize = 256;

/// Handshakes (the Diffie-Hellman work unauthenticated traffic can cause)
/// per second, sustained: a few percent of one core, and a whole fleet of
/// a thousand devices reconnects within seconds.
pub const HANDSHAKES_PER_SECOND: f64 = 200.0;

/// Handshakes allowed in a burst above the sustained rate.
pub const HANDSHAKE_BURST: f64 = 400.0;

/// Refusals logged one by one per minute; the rest are counted and summed
/// up in one line, so garbage cannot flood the log.
pub const REJECTS_LOGGED_PER_MINUTE: u32 = 20;

const MINUTE: Duration = Duration::from_secs(60);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Debug, Default)]
struct Counts {
    strangers: usize,
    devices: usize,
}

/// The station's connection slots.
#[derive(Debug)]
pub struct Slots {
    counts: Arc<Mutex<Counts>>,
    /// Connections allowed at once, strangers and devices together.
    max: usize,
}

/// One connection's slot, given back on drop.
#[derive(Debug)]
pub struct Slot {
    counts: Arc<Mutex<Counts>>,
    proven: bool,
}

/// Why a connection got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Strangers,
    Connections,
}

impl Default for Slots {
    fn default() -> Self {
        Self::new(crate::config::DEFAULT_MAX_CONNECTIONS)
    }
}

impl Slots {
    /// Slots for `max` connections at once.
    pub fn new(max: usize) -> Self {
        Slots { counts: Arc::default(), max }
    }

    /// Connections allowed at once.
    pub fn max(&self) -> usize {
        self.max
    }

    /// A slot for a new connection, counted as a stranger.
    pub fn take(&self) -> Result<Slot, Full> {
        let mut counts = lock(&self.counts);
        if counts.strangers + counts.devices >= self.max {
            return Err(Full::Connections);
        }
        if counts.strangers >= MAX_STRANGERS {
            return Err(Full::Strangers);
        }
        counts.strangers += 1;
        Ok(Slot { counts: self.counts.clone(), proven: false })
    }

    /// Connections now: (strangers, devices).
    pub fn counts(&self) -> (usize, usize) {
        let counts = lock(&self.counts);
        (counts.strangers, counts.devices)
    }
}

impl Slot {
    /// The connection carried an authentic packet: it no longer counts
    /// against the strangers' bound.
    pub fn promote(&mut self) {
        if !self.proven {
            self.proven = true;
            let mut counts = lock(&self.counts);
            counts.strangers -= 1;
            counts.devices += 1;
        }
    }

    pub fn is_proven(&self) -> bool {
        self.proven
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = lock(&self.counts);
        if self.proven {
            counts.devices -= 1;
        } else {
            counts.strangers -= 1;
        }
    }
}

/// A token bucket for handshakes.
#[derive(Debug)]
pub struct HandshakeBudget {
    tokens: f64,
    last: Instant,
    /// The end of the queue of refused agents: each refusal is given the
    /// next free slot, a budget's token apart from the one before.
    horizon: Instant,
}

/// Longest wait told to a refused agent: a fleet of 24,000 returning at
/// [`HANDSHAKES_PER_SECOND`].
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);

impl HandshakeBudget {
    pub fn new(now: Instant) -> Self {
        HandshakeBudget { tokens: HANDSHAKE_BURST, last: now, horizon: now }
    }

    /// Spends one handshake if the budget allows it now; otherwise the
    /// whole seconds the agent should wait before it asks again.
    ///
    /// Refused agents queue without a queue: each is told the time of the
    /// next slot the budget will have (a token after the last one handed
    /// out), and comes back then, a little later, never sooner (the agent
    /// adds up to a fifth). A crowd of N returning at once (a station
    /// restart) is spread over N/rate seconds and asks about twice each,
    /// where agents backing off on their own knock over and over and the
    /// last waits far longer. Slots reach at most [`MAX_RETRY_AFTER`]
    /// ahead, so a flood of garbage hellos delays agents by no more.
    pub fn take(&mut self, now: Instant) -> Result<(), u64> {
        let earned = now.saturating_duration_since(self.last).as_secs_f64() * HANDSHAKES_PER_SECOND;
        self.tokens = (self.tokens + earned).min(HANDSHAKE_BURST);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        Err(self.defer(now))
    }

    /// The whole seconds until the next free slot, which this takes: for
    /// an agent refused before its handshake (every stranger's slot is
    /// taken), so that it queues with the others.
    pub fn defer(&mut self, now: Instant) -> u64 {
        let slot = Duration::from_secs_f64(1.0 / HANDSHAKES_PER_SECOND);
        self.horizon = (self.horizon.max(now) + slot).min(now + MAX_RETRY_AFTER);
        // Whole seconds, rounded up: Retry-After has no fractions.
        let wait = self.horizon.saturating_duration_since(now);
        wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
    }
}

/// Decides which refusals get a log line of their own.
#[derive(Debug)]
pub struct RejectLog {
    minute_started: Instant,
    logged: u32,
    suppressed: u64,
}

impl RejectLog {
    pub fn new(now: Instant) -> Self {
        RejectLog { minute_started: now, logged: 0, suppressed: 0 }
    }

    /// Whether this refusal gets its own line; when a new minute starts,
    /// also how many were left unlogged in the last one.
    pub fn admit(&mut self, now: Instant) -> (bool, Option<u64>) {
        let mut summary = None;
        if now.saturating_duration_since(self.minute_started) >= MINUTE {
            if self.suppressed > 0 {
                summary = Some(self.suppressed);
            }
            self.minute_started = now;
            self.logged = 0;
            self.suppressed = 0;
        }
        if self.logged < REJECTS_LOGGED_PER_MINUTE {
            self.logged += 1;
            (true, summary)
        } else {
            self.suppressed += 1;
            (false, summary)
        }
    }

    /// How many refusals went unlogged in a minute that is over, if any:
    /// called once a minute, so the count is told even when no refusal
    /// follows to carry it.
    pub fn flush(&mut self, now: Instant) -> Option<u64> {
        if now.saturating_duration_since(self.minute_started) < MINUTE || self.suppressed == 0 {
            return None;
        }
        let count = self.suppressed;
        *self = RejectLog::new(now);
        Some(count)
    }
}

/// Replacements of a live session within [`CLONE_WINDOW`] that mean two
/// agents share one device key: a restarting agent replaces its old
/// session once, two clones replace each other's every second or so.
const CLONE_REPLACEMENTS: usize = 3;
const CLONE_WINDOW: Duration = Duration::from_secs(60);

/// How long a device's new handshakes are refused once clones are seen,
/// doubling while they keep coming back, up to [`CLONE_REFUSAL_LAST`].
const CLONE_REFUSAL_FIRST: Duration = Duration::from_secs(60);
const CLONE_REFUSAL_LAST: Duration = Duration::from_secs(960);

/// Shortest time between two log lines about one device's clones.
const CLONE_LOG_EVERY: Duration = MINUTE;

/// Devices watched at once: the ones seen replacing sessions lately. A
/// bound on memory whatever the fleet does; the oldest entry goes first.
const CLONE_WATCHED: usize = 1024;

/// Tells two agents with one device key (a cloned SD card image, most
/// often) from an agent that restarted: a session replaced while still in
/// use, again and again. While it refuses, the session connected first
/// keeps working and the other agent is told why, so neither keeps
/// knocking and the other devices' handshakes are not crowded out.
#[derive(Debug, Default)]
pub struct CloneWatch {
    devices: HashMap<String, Clones>,
}

#[derive(Debug)]
struct Clones {
    /// When a new session replaced one still in use, newest last.
    replaced: VecDeque<Instant>,
    refusing_until: Option<Instant>,
    /// The next refusal period, doubling while clones come back.
    next_refusal: Duration,
    /// Where the sessions that replaced each other came from, last two.
    sources: [Option<SocketAddr>; 2],
    last_logged: Option<Instant>,
    last_seen: Instant,
}

/// A handshake to refuse because two agents share the device's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneRefusal {
    /// Seconds until handshakes are accepted again.
    pub retry_after: u64,
    /// The two sources, when this refusal should also be logged.
    pub log: Option<[Option<SocketAddr>; 2]>,
}

impl CloneWatch {
    /// A new session of `device` from `source` replaced one that was still
    /// in use. Returns whether this starts a refusal period.
    pub fn replaced(&mut self, device: &str, source: SocketAddr, now: Instant) -> bool {
        if !self.devices.contains_key(device) && self.devices.len() >= CLONE_WATCHED {
            let oldest =
                self.devices.iter().min_by_key(|(_, c)| c.last_seen).map(|(d, _)| d.clone());
            if let Some(oldest) = oldest {
                self.devices.remove(&oldest);
            }
        }
        let clones = self.devices.entry(device.to_owned()).or_insert_with(|| Clones {
            replaced: VecDeque::new(),
            refusing_until: None,
            next_refusal: CLONE_REFUSAL_FIRST,
            sources: [None, None],
            last_logged: None,
            last_seen: now,
        });
        clones.last_seen = now;
        clones.sources = [clones.sources[1], Some(source)];
        while clones
            .replaced
            .front()
            .is_some_and(|at| now.saturating_duration_since(*at) > CLONE_WINDOW)
        {
            clones.replaced.pop_front();
        }
        clones.replaced.push_back(now);
        if clones.replaced.len() < CLONE_REPLACEMENTS {
            return false;
        }
        clones.replaced.clear();
        clones.refusing_until = Some(now + clones.next_refusal);
        clones.next_refusal = (clones.next_refusal * 2).min(CLONE_REFUSAL_LAST);
        true
    }

    /// Whether a handshake for `device` is refused now.
    pub fn refusal(&mut self, device: &str, now: Instant) -> Option<CloneRefusal> {
        let clones = self.devices.get_mut(device)?;
        let until = clones.refusing_until.filter(|until| now < *until)?;
        let log = !clones
            .last_logged
            .is_some_and(|at| now.saturating_duration_since(at) < CLONE_LOG_EVERY);
        if log {
            clones.last_logged = Some(now);
        }
        Some(CloneRefusal {
            retry_after: until.saturating_duration_since(now).as_secs().max(1),
            log: log.then_some(clones.sources),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_are_told_from_a_restart_and_refused_for_growing_periods() {
        let (a, b): (SocketAddr, SocketAddr) =
            ("10.0.0.1:4000".parse().unwrap(), "10.0.0.2:5000".parse().unwrap());
        let start = Instant::now();
        let mut watch = CloneWatch::default();
        // An agent that restarts replaces its session once in a while.
        assert!(!watch.replaced("pump", a, start));
        assert!(!watch.replaced("pump", a, start + CLONE_WINDOW + Duration::from_secs(1)));
        assert_eq!(watch.refusal("pump", start + CLONE_WINDOW * 2), None);

        // Two clones replace each other within seconds.
        let t = start + CLONE_WINDOW * 3;
        assert!(!watch.replaced("pump", a, t));
        assert!(!watch.replaced("pump", b, t + Duration::from_secs(1)));
        assert!(watch.replaced("pump", a, t + Duration::from_secs(2)));
        let first = watch.refusal("pump", t + Duration::from_secs(3)).expect("refused");
        assert_eq!(first.retry_after, CLONE_REFUSAL_FIRST.as_secs() - 1);
        assert_eq!(first.log, Some([Some(b), Some(a)]), "both sources, logged");
        let again = watch.refusal("pump", t + Duration::from_secs(4)).expect("refused");
        assert_eq!(again.log, None, "logged once a minute");
        assert_eq!(watch.refusal("other", t + Duration::from_secs(4)), None);

        // After the period, the next round of clones is refused for twice as long.
        let later = t + Duration::from_secs(2) + CLONE_REFUSAL_FIRST;
        assert_eq!(watch.refusal("pump", later), None);
        for i in 0..3 {
            watch.replaced("pump", if i % 2 == 0 { b } else { a }, later + Duration::from_secs(i));
        }
        let second = watch.refusal("pump", later + Duration::from_secs(2)).expect("refused");
        assert_eq!(second.retry_after, 2 * CLONE_REFUSAL_FIRST.as_secs());
    }

    #[test]
    fn clone_watch_memory_is_bounded() {
        let mut watch = CloneWatch::default();
        let now = Instant::now();
        let source: SocketAddr = "10.0.0.1:1".parse().unwrap();
        for i in 0..(CLONE_WATCHED + 10) {
            watch.replaced(&format!("d{i}"), source, now + Duration::from_millis(i as u64));
        }
        assert_eq!(watch.devices.len(), CLONE_WATCHED);
        assert!(!watch.devices.contains_key("d0"), "the oldest went first");
    }

    #[test]
    fn unlogged_refusals_are_told_when_their_minute_is_over() {
        let start = Instant::now();
        let mut log = RejectLog::new(start);
        let logged = (0..200).filter(|_| log.admit(start).0).count() as u64;
        assert_eq!(logged, u64::from(REJECTS_LOGGED_PER_MINUTE));
        assert_eq!(log.flush(start + MINUTE / 2), None, "the minute is not over");
        assert_eq!(log.flush(start + MINUTE), Some(200 - logged));
        assert_eq!(log.flush(start + MINUTE * 3), None, "told once");
        // A refusal after the flush starts a fresh minute with its own line.
        assert_eq!(log.admit(start + MINUTE * 3), (true, None));
    }

    #[test]
    fn strangers_are_bounded_and_promotion_frees_their_room() {
        let slots = Slots::default();
        let mut held: Vec<Slot> = (0..MAX_STRANGERS).map(|_| slots.take().unwrap()).collect();
        assert_eq!(slots.take().unwrap_err(), Full::Strangers);
        held[0].promote();
        held[0].promote();
        assert_eq!(slots.counts(), (MAX_STRANGERS - 1, 1));
        let extra = slots.take().unwrap();
        assert_eq!(slots.counts(), (MAX_STRANGERS, 1));
        drop(extra);
        drop(held);
        assert_eq!(slots.counts(), (0, 0));
    }

    #[test]
    fn all_connections_are_bounded() {
        let slots = Slots::new(300);
        let mut held = Vec::new();
        while held.len() < 300 {
            let mut slot = slots.take().unwrap();
            slot.promote();
            held.push(slot);
        }
        assert_eq!(slots.take().unwrap_err(), Full::Connections);
    }

    #[test]
    fn handshake_budget_refills_at_its_rate() {
        let start = Instant::now();
        let mut budget = HandshakeBudget::new(start);
        let burst = (0..10_000).take_while(|_| budget.take(start).is_ok()).count();
        assert_eq!(burst, HANDSHAKE_BURST as usize);
        assert_eq!(budget.take(start), Err(1), "a lone refusal waits a second");
        let later = start + Duration::from_millis(100);
        let refilled = (0..10_000).take_while(|_| budget.take(later).is_ok()).count();
        assert_eq!(refilled, (HANDSHAKES_PER_SECOND / 10.0) as usize);
    }

    /// A fleet of 10,000 agents returning at once (a station restart), in
    /// simulated time: each refused agent waits what it was told plus up
    /// to a fifth, as the agent does. All are in within about N/rate
    /// seconds (48 s), each asking about twice, and the waits told stay
    /// within their bound.
    #[test]
    fn a_returning_fleet_is_spread_over_what_the_budget_admits() {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        const FLEET: u64 = 10_000;
        let start = Instant::now();
        let mut budget = HandshakeBudget::new(start);
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        // (time in ms, agent): every agent asks within the first second.
        let mut asks: BinaryHeap<Reverse<(u64, u64)>> =
            (0..FLEET).map(|agent| Reverse((next() % 1000, agent))).collect();
        let (mut admitted, mut asked, mut longest_wait, mut last_in) = (0, 0u64, 0, 0);
        while let Some(Reverse((at, agent))) = asks.pop() {
            asked += 1;
            match budget.take(start + Duration::from_millis(at)) {
                Ok(()) => {
                    admitted += 1;
                    last_in = at;
                }
                Err(wait) => {
                    longest_wait = longest_wait.max(wait);
                    let jittered = wait * 1000 + next() % (wait * 200);
                    asks.push(Reverse((at + jittered, agent)));
                }
            }
        }
        assert_eq!(admitted, FLEET);
        let ideal = (FLEET as f64 - HANDSHAKE_BURST) / HANDSHAKES_PER_SECOND;
        let took = last_in as f64 / 1000.0;
        assert!(
            took < ideal * 1.4,
            "all in after {took:.1} s; the budget admits them in {ideal:.0} s"
        );
        assert!(longest_wait <= MAX_RETRY_AFTER.as_secs(), "{longest_wait}");
        // Each agent asked about twice, not over and over.
        assert!(asked < FLEET * 3, "{asked} asks");
    }

    #[test]
    fn reject_log_lines_are_budgeted_and_summed_up() {
        let start = Instant::now();
        let mut log = RejectLog::new(start);
        let logged = (0..100).filter(|_| log.admit(start).0).count();
        assert_eq!(logged, REJECTS_LOGGED_PER_MINUTE as usize);
        assert_eq!(log.admit(start + MINUTE), (true, Some(80)));
        assert_eq!(log.admit(start + 2 * MINUTE), (true, None));
    }
}
