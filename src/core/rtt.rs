//! The round trip of a session's path, estimated from acknowledgements the
//! way RFC 9002 (QUIC loss detection, section 5) does it.
//!
//! A sample is the time from a packet's first send to the ack that covers
//! it; packets sent more than once give none (an ack cannot tell which copy
//! it answers). Acks carry no delay field, so a sample includes the time
//! the peer held its ack (at most its `ack_delay`, or the wait for the next
//! poll on a poll carrier): the estimate is the round trip the flow sees,
//! which is what flow control and anything waiting on the peer need.
//!
//! Sans I/O: samples come in as durations.

use std::time::Duration;

/// Assumed until the first sample, as RFC 9002 does.
pub const INITIAL_RTT: Duration = Duration::from_millis(333);

/// Smoothed round trip, its variation and the smallest sample seen.
#[derive(Debug, Clone, Copy)]
pub struct Rtt {
    smoothed: Duration,
    variation: Duration,
    min: Duration,
    latest: Option<Duration>,
    span: Span,
}

/// The samples of packets that travelled alone (nothing else of ours in
/// flight, so no queueing behind our own bytes) since a point in a
/// session's life (new carrier lanes, say): how many, and the least.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Span {
    pub samples: u32,
    pub least: Option<Duration>,
}

impl Default for Rtt {
    fn default() -> Self {
        Rtt {
            smoothed: INITIAL_RTT,
            variation: INITIAL_RTT / 2,
            min: INITIAL_RTT,
            latest: None,
            span: Span::default(),
        }
    }
}

impl Rtt {
    /// Folds one sample in: 1/8 of it into the smoothed value and 1/4 of
    /// its distance from that into the variation; a packet that travelled
    /// `alone` counts in the [`Span`] too.
    pub fn sample(&mut self, rtt: Duration, alone: bool) {
        if self.latest.is_none() {
            self.smoothed = rtt;
            self.variation = rtt / 2;
            self.min = rtt;
        } else {
            self.min = self.min.min(rtt);
            let distance = self.smoothed.max(rtt) - self.smoothed.min(rtt);
            self.variation = (self.variation * 3 + distance) / 4;
            self.smoothed = (self.smoothed * 7 + rtt) / 8;
        }
        self.latest = Some(rtt);
        if alone {
            self.span.samples = self.span.samples.saturating_add(1);
            self.span.least = Some(self.span.least.map_or(rtt, |least| least.min(rtt)));
        }
    }

    /// Starts a new [`Span`] of samples.
    pub fn restart_span(&mut self) {
        self.span = Span::default();
    }

    /// The samples since the last [`Rtt::restart_span`] (or the first).
    #[must_use]
    pub fn span(&self) -> Span {
        self.span
    }

    /// The smoothed round trip ([`INITIAL_RTT`] before any sample).
    #[must_use]
    pub fn smoothed(&self) -> Duration {
        self.smoothed
    }

    /// The mean deviation of the samples.
    #[must_use]
    pub fn variation(&self) -> Duration {
        self.variation
    }

    /// The smallest sample: the path's round trip without queueing.
    #[must_use]
    pub fn min(&self) -> Duration {
        self.min
    }

    /// Whether any sample came in yet.
    #[must_use]
    pub fn measured(&self) -> bool {
        self.latest.is_some()
    }

    /// How long an answer may take before it is late: the smoothed round
    /// trip plus four variations (RFC 9002's probe timeout, without the ack
    /// delay term, which the samples already hold).
    #[must_use]
    pub fn answer_within(&self) -> Duration {
        self.smoothed + 4 * self.variation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn first_sample_sets_everything() {
        let mut rtt = Rtt::default();
        assert!(!rtt.measured());
        assert_eq!(rtt.smoothed(), INITIAL_RTT);
        rtt.sample(60 * MS, true);
        assert_eq!((rtt.smoothed(), rtt.variation(), rtt.min()), (60 * MS, 30 * MS, 60 * MS));
        assert_eq!(rtt.answer_within(), 180 * MS);
    }

    #[test]
    fn steady_samples_converge_and_variation_decays() {
        let mut rtt = Rtt::default();
        rtt.sample(200 * MS, true);
        for _ in 0..100 {
            rtt.sample(20 * MS, true);
        }
        assert!(rtt.smoothed().abs_diff(20 * MS) < MS, "{:?}", rtt.smoothed());
        assert!(rtt.variation() < MS, "{:?}", rtt.variation());
        assert_eq!(rtt.min(), 20 * MS);
    }

    #[test]
    fn one_late_sample_moves_the_estimate_an_eighth() {
        let mut rtt = Rtt::default();
        rtt.sample(80 * MS, true);
        rtt.sample(80 * MS, true);
        rtt.sample(160 * MS, true);
        assert_eq!(rtt.smoothed(), 90 * MS);
        // (40 * 3 / 4 after the second sample) * 3 + 80, over 4.
        assert_eq!(rtt.variation(), (30 * MS * 3 + 80 * MS) / 4);
        assert_eq!(rtt.min(), 80 * MS);
    }

    #[test]
    fn a_span_counts_from_its_restart() {
        let mut rtt = Rtt::default();
        rtt.sample(5 * MS, true);
        rtt.sample(9 * MS, true);
        assert_eq!(rtt.span(), Span { samples: 2, least: Some(5 * MS) });
        rtt.restart_span();
        assert_eq!(rtt.span(), Span::default());
        rtt.sample(400 * MS, true);
        rtt.sample(410 * MS, true);
        // Queued behind our own packets: not a sample of the path's delay.
        rtt.sample(90 * MS, false);
        assert_eq!(rtt.span(), Span { samples: 2, least: Some(400 * MS) });
        assert_eq!(rtt.min(), 5 * MS, "the session's least is kept");
    }
}
