//! How many requests a poll-shape lane keeps in flight: [`PIPELINE`] until
//! the path refuses one past some count (a proxy that limits connections
//! per client answers the extra one with an error page), then that count
//! for a while: [`FIRST_HOLD`] at first, twice as long each time the full
//! depth is refused again soon after, up to [`MAX_HOLD`].
//!
//! A refusal is not always a limit: a balancer answers 503 while the
//! station behind it restarts. Such a one-off costs a minute of fewer
//! requests in flight; a proxy that keeps its limit is probed less and
//! less often, one refused request each time (the session resends what
//! it carried).
//!
//! Sans I/O: time comes in as a parameter.

use std::time::{Duration, Instant};

/// Requests of one poll-shape lane in flight at most, each on its own
/// connection: eight requests of up to 512 KiB keep 4 MiB in flight, a
/// 60 ms path's worth at 70 MB/s, and both lanes busy open 16 connections,
/// under the 32 browsers open to one proxy, so proxies sized for browsers
/// pass them. Idle, a lane holds one.
pub(super) const PIPELINE: usize = 8;

/// How long a first lowering lasts before the full depth is tried again.
pub(super) const FIRST_HOLD: Duration = Duration::from_secs(60);

/// The longest a lowering lasts: the proxy may have been replaced or its
/// limit raised, and finding out costs one refused request.
pub(super) const MAX_HOLD: Duration = Duration::from_secs(3600);

#[derive(Debug)]
pub(super) struct Depth {
    allowed: usize,
    /// When the depth was last lowered, and for how long.
    lowered: Option<(Instant, Duration)>,
}

impl Default for Depth {
    fn default() -> Self {
        Depth { allowed: PIPELINE, lowered: None }
    }
}

impl Depth {
    /// How many requests may be in flight now.
    pub(super) fn allowed(&mut self, now: Instant) -> usize {
        if self.lowered.is_some_and(|(at, hold)| now.saturating_duration_since(at) >= hold) {
            self.allowed = PIPELINE;
        }
        self.allowed
    }

    /// The request with index `n` (0 the first) failed while `n` others
    /// were allowed beside it: from now on at most `n` go, if that is
    /// fewer than before. Returns the new depth and how long it holds when
    /// it was lowered. The first request's failure lowers nothing: it is
    /// the path failing, not a limit.
    pub(super) fn refused(&mut self, n: usize, now: Instant) -> Option<(usize, Duration)> {
        if n == 0 || n >= self.allowed(now) {
            return None;
        }
        // Refused again within a hold of the last lowering's end: the
        // limit is the proxy's, so try less often. Refused deeper during
        // a lowering: the same limit, found more exactly.
        let hold = match self.lowered {
            Some((at, hold)) if now.saturating_duration_since(at) < hold => hold,
            Some((at, hold)) if now.saturating_duration_since(at) < hold * 2 => {
                (hold * 2).min(MAX_HOLD)
            }
            _ => FIRST_HOLD,
        };
        self.allowed = n;
        self.lowered = Some((now, hold));
        Some((n, hold))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn a_one_off_refusal_lowers_the_depth_for_a_minute() {
        let start = Instant::now();
        let mut depth = Depth::default();
        assert_eq!(depth.allowed(start), PIPELINE);
        assert_eq!(depth.refused(0, start), None, "the first request failing is no limit");
        assert_eq!(depth.refused(5, start), Some((5, FIRST_HOLD)));
        assert_eq!(depth.refused(6, start), None, "past the depth already");
        assert_eq!(depth.refused(2, start + MINUTE / 2), Some((2, FIRST_HOLD)));
        assert_eq!(depth.allowed(start + MINUTE / 2 + FIRST_HOLD - Duration::from_secs(1)), 2);
        assert_eq!(depth.allowed(start + MINUTE / 2 + FIRST_HOLD), PIPELINE);
        // Long after, a refusal is a new one-off.
        let later = start + 3 * MAX_HOLD;
        assert_eq!(depth.refused(3, later), Some((3, FIRST_HOLD)));
    }

    #[test]
    fn a_limit_that_stays_is_probed_less_and_less_often_up_to_an_hour() {
        let mut now = Instant::now();
        let mut depth = Depth::default();
        let mut holds = Vec::new();
        for _ in 0..9 {
            // Each probe of the full depth is refused at once.
            assert_eq!(depth.allowed(now), PIPELINE);
            let (allowed, hold) = depth.refused(4, now).expect("lowered");
            assert_eq!(allowed, 4);
            assert_eq!(depth.allowed(now + hold - Duration::from_secs(1)), 4);
            holds.push(hold.as_secs() / 60);
            now += hold;
        }
        assert_eq!(holds, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }
}
