//! The replay window against a model of what it promises: a counter is
//! accepted at most once, ever; a counter above every one seen is always
//! accepted; one within the window behind the newest is accepted if new.
//! Counters come from the peer; any u64 but the one Noise reserves
//! (u64::MAX, which snow refuses to open under) can authenticate.
#![no_main]

use std::collections::HashSet;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use postern::crypto::{ReplayWindow, REPLAY_WINDOW};

#[derive(Arbitrary, Debug)]
enum Step {
    /// A counter this far above the highest seen (wrapping).
    Ahead(u16),
    /// A counter this far below the highest seen (saturating), near the
    /// window's edge when large.
    Behind(u16),
    /// Any counter at all.
    Exact(u64),
}

fuzz_target!(|steps: Vec<Step>| {
    let mut window = ReplayWindow::default();
    let mut accepted = HashSet::new();
    let mut highest: Option<u64> = None;
    for step in steps {
        let top = highest.unwrap_or(0);
        let counter = match step {
            Step::Ahead(n) => top.wrapping_add(u64::from(n)),
            Step::Behind(n) => top.saturating_sub(u64::from(n) % (REPLAY_WINDOW + 2)),
            Step::Exact(c) => c,
        };
        let fresh = !accepted.contains(&counter);
        // u64::MAX is reserved by Noise and always refused.
        let in_window = counter != u64::MAX
            && match highest {
                None => true,
                Some(h) => counter > h || h - counter < REPLAY_WINDOW,
            };
        let got = window.accept(counter);
        if got {
            assert!(fresh, "counter {counter} accepted twice");
        }
        if fresh && in_window {
            assert!(got, "new counter {counter} refused (highest {highest:?})");
        }
        if got {
            accepted.insert(counter);
            highest = Some(highest.map_or(counter, |h| h.max(counter)));
        }
    }
});
