//! What the station lets in before anyone has proved who they are: how many
//! connections, how many handshakes per second, and how much it says in
//! the log about what it turned away.
//!
//! ```text
//!  accept ─▶ Slots::take (strangers ≤ MAX_STRANGERS, all ≤ MAX_CONNECTIONS) ─▶ 503 past it
//!  hello  ─▶ HandshakeBudget::take (token bucket) ─▶ 503 past it, before any Diffie-Hellman
//!  first authentic packet ─▶ Slot::promote (no longer a stranger)
//!  refusals ─▶ RejectLog: a line each, up to a budget a minute, then one summary
//! ```
//!
//! No I/O and no clock of its own: callers pass `now`, so tests drive time.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Concurrent carrier connections, strangers and devices together. A
/// device keeps two or three; thousands of devices fit, and file
/// descriptors (often limited to 65536) stay ample.
pub const MAX_CONNECTIONS: usize = 8192;

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
#[derive(Debug, Default)]
pub struct Slots(Arc<Mutex<Counts>>);

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

impl Slots {
    /// A slot for a new connection, counted as a stranger.
    pub fn take(&self) -> Result<Slot, Full> {
        let mut counts = lock(&self.0);
        if counts.strangers + counts.devices >= MAX_CONNECTIONS {
            return Err(Full::Connections);
        }
        if counts.strangers >= MAX_STRANGERS {
            return Err(Full::Strangers);
        }
        counts.strangers += 1;
        Ok(Slot { counts: self.0.clone(), proven: false })
    }

    /// Connections now: (strangers, devices).
    pub fn counts(&self) -> (usize, usize) {
        let counts = lock(&self.0);
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
}

impl HandshakeBudget {
    pub fn new(now: Instant) -> Self {
        HandshakeBudget { tokens: HANDSHAKE_BURST, last: now }
    }

    /// Spends one handshake if the budget allows it now.
    pub fn take(&mut self, now: Instant) -> bool {
        let earned = now.saturating_duration_since(self.last).as_secs_f64() * HANDSHAKES_PER_SECOND;
        self.tokens = (self.tokens + earned).min(HANDSHAKE_BURST);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let slots = Slots::default();
        let mut held = Vec::new();
        while held.len() < MAX_CONNECTIONS {
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
        let burst = (0..10_000).take_while(|_| budget.take(start)).count();
        assert_eq!(burst, HANDSHAKE_BURST as usize);
        assert!(!budget.take(start));
        let later = start + Duration::from_millis(100);
        let refilled = (0..10_000).take_while(|_| budget.take(later)).count();
        assert_eq!(refilled, (HANDSHAKES_PER_SECOND / 10.0) as usize);
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
