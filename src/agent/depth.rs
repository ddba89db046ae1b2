//! How many requests a poll-shape lane keeps in flight: [`PIPELINE`] until
//! the path refuses one past some count (a proxy that limits connections
//! per client answers the extra one with an error page), then
//! that count, until it has gone [`DEPTH_RESET`] without refusing again.
//!
//! Sans I/O: time comes in as a parameter.

use std::time::{Duration, Instant};

/// Requests of one poll-shape lane in flight at most, each on its own
/// connection: eight requests of up to 512 KiB keep 4 MiB in flight, a
/// 60 ms path's worth at 70 MB/s, and both lanes busy open 16 connections,
/// under the 32 browsers open to one proxy, so proxies sized for browsers
/// pass them. Idle, a lane holds one.
pub(super) const PIPELINE: usize = 8;

/// After this long without a refusal, a lowered depth goes back to
/// [`PIPELINE`]: the proxy may have been replaced or its limit raised.
pub(super) const DEPTH_RESET: Duration = Duration::from_secs(3600);

#[derive(Debug)]
pub(super) struct Depth {
    allowed: usize,
    lowered_at: Option<Instant>,
}

impl Default for Depth {
    fn default() -> Self {
        Depth { allowed: PIPELINE, lowered_at: None }
    }
}

impl Depth {
    /// How many requests may be in flight now.
    pub(super) fn allowed(&mut self, now: Instant) -> usize {
        if self.lowered_at.is_some_and(|at| now.saturating_duration_since(at) >= DEPTH_RESET) {
            *self = Depth::default();
        }
        self.allowed
    }

    /// The request with index `n` (0 the first) failed while `n` others
    /// were allowed beside it: from now on at most `n` go, if that is
    /// fewer than before. Returns the new depth when it was lowered. The
    /// first request's failure lowers nothing: it is the path failing,
    /// not a limit.
    pub(super) fn refused(&mut self, n: usize, now: Instant) -> Option<usize> {
        if n == 0 || n >= self.allowed {
            return None;
        }
        self.allowed = n;
        self.lowered_at = Some(now);
        Some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_extra_request_lowers_the_depth_until_an_hour_passes_quietly() {
        let start = Instant::now();
        let mut depth = Depth::default();
        assert_eq!(depth.allowed(start), PIPELINE);
        assert_eq!(depth.refused(0, start), None, "the first request failing is no limit");
        assert_eq!(depth.refused(5, start), Some(5));
        assert_eq!(depth.refused(6, start), None, "past the depth already");
        let later = start + Duration::from_secs(600);
        assert_eq!(depth.refused(2, later), Some(2));
        assert_eq!(depth.allowed(later + DEPTH_RESET - Duration::from_secs(1)), 2);
        assert_eq!(depth.allowed(later + DEPTH_RESET), PIPELINE);
        assert_eq!(depth.refused(1, later + DEPTH_RESET), Some(1));
        assert_eq!(depth.allowed(later + DEPTH_RESET), 1);
    }
}
