//! Receive windows that grow with the path, and the room they may take.
//!
//! A stream's window is how far past what its local reader took the peer
//! may send. Credit goes out each time the reader has taken a quarter of
//! the window, so a sender held by its credit sends nearly a window per
//! round trip, not half of one.
//!
//! A fixed window caps a stream at one window per round trip (256 KiB at
//! 20 ms is 12 MB/s), so each window starts at [`STREAM_WINDOW`] and is
//! judged each time the reader has taken a whole window (an epoch): taken
//! within two round trips, with no more than a quarter of the window
//! waiting for the reader, the window, not the reader or the path, may be
//! the limit, and it grows [`GROWTH`]-fold. A sender held by the window
//! sends one window per round trip, so its epochs last one round trip; a
//! sender held by the path makes them last the window over the rate, so
//! the window stops growing between two and eight bandwidth-delay
//! products. Fourfold rather than TCP's twofold reaches a 200 ms path's
//! 16 MiB in three round trips instead of six. The window is credit, not
//! memory: a reader that keeps up holds almost none of it. An epoch longer
//! than [`SLOW_EPOCH`] round trips (a reader slower than the path) halves
//! the window again.
//!
//! Growth past [`STREAM_WINDOW`] (and of send buffers past their first
//! size, `streams::SEND_BUFFER`) is room taken from two budgets: the
//! session's ([`SESSION_BUDGET`]) and a [`Budget`] shared by every session
//! of a process, so a few fast devices cannot drive a station holding
//! thousands out of memory. A stream gives its room back when it shrinks
//! or ends; a stream that wants to grow while the budget is spent first
//! takes back window room from streams of its session that went quiet.
//!
//! No I/O and no clock: time and the round trip come in as parameters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The window every stream starts with, and never goes below.
pub const STREAM_WINDOW: u64 = 256 * 1024;

/// The most one stream's window grows to: 16 MiB carries 80 MB/s across a
/// 200 ms round trip.
pub const MAX_STREAM_WINDOW: u64 = 16 * 1024 * 1024;

/// Room past their first sizes all windows and send buffers of one session
/// may take together.
pub const SESSION_BUDGET: u64 = 16 * 1024 * 1024;

/// How much a window grows at a time.
pub const GROWTH: u64 = 4;

/// A reader this many round trips or more per window halves the window.
pub const SLOW_EPOCH: u32 = 16;

/// Window and send-buffer room shared by sessions, in bytes past each
/// stream's first sizes. Clones share the same room.
#[derive(Debug, Clone)]
pub struct Budget {
    left: Arc<AtomicU64>,
}

impl Budget {
    pub fn new(bytes: u64) -> Budget {
        Budget { left: Arc::new(AtomicU64::new(bytes)) }
    }

    /// No room beyond what each session's own budget allows.
    pub fn unlimited() -> Budget {
        Budget::new(u64::MAX)
    }

    /// Room not taken now.
    #[must_use]
    pub fn available(&self) -> u64 {
        self.left.load(Ordering::Relaxed)
    }

    /// Takes `n` bytes of room if that much is left.
    pub(super) fn take(&self, n: u64) -> bool {
        self.left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| left.checked_sub(n))
            .is_ok()
    }

    pub(super) fn give(&self, n: u64) {
        self.left.fetch_add(n, Ordering::AcqRel);
    }
}

/// What a stream's window does at a credit grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Change {
    Grow,
    Keep,
    Shrink,
}

/// Judges a window by how long the reader took to use all of it (one
/// epoch) against the path's round trip.
pub(super) fn judge(epoch: Duration, rtt: Duration) -> Change {
    if epoch < rtt * 2 {
        Change::Grow
    } else if epoch >= rtt * SLOW_EPOCH {
        Change::Shrink
    } else {
        Change::Keep
    }
}

/// Whether a stream with `outstanding` bytes of credit left of `window`
/// grants more: once a quarter of the window is used.
pub(super) fn credit_due(outstanding: u64, window: u64) -> bool {
    outstanding <= window - window / 4
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_window_the_reader_outruns_grows_and_a_lagging_one_shrinks() {
        assert_eq!(judge(10 * MS, 20 * MS), Change::Grow);
        assert_eq!(judge(20 * MS, 20 * MS), Change::Grow, "one window per round trip");
        assert_eq!(judge(40 * MS, 20 * MS), Change::Keep);
        assert_eq!(judge(319 * MS, 20 * MS), Change::Keep);
        assert_eq!(judge(320 * MS, 20 * MS), Change::Shrink);
        assert!(!credit_due(STREAM_WINDOW, STREAM_WINDOW));
        assert!(credit_due(STREAM_WINDOW * 3 / 4, STREAM_WINDOW));
    }

    #[test]
    fn a_budget_is_shared_by_its_clones_and_never_overdrawn() {
        let budget = Budget::new(100);
        let other = budget.clone();
        assert!(budget.take(60));
        assert!(!other.take(41));
        assert!(other.take(40));
        assert_eq!(budget.available(), 0);
        other.give(60);
        assert_eq!(budget.available(), 60);
    }
}
