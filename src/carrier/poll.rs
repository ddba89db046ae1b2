//! The poll shape: `poll` requests the station holds until it has records
//! (or the hold ends), and `push` requests that carry the agent's records;
//! each a whole HTTP message, so it passes a proxy that buffers. An agent
//! keeps several of each in flight while busy (see [`poll_continues`]),
//! one held poll and no push while idle. What the requests say, and how
//! large their bodies get, is here, once for both sides.

use std::time::Duration;

use super::query_secs;

/// How long the station holds a poll request waiting for data unless the
/// agent asks otherwise (the default of its `poll_hold`). Under the 30 s
/// and 60 s idle timeouts common in proxies and load balancers.
pub const POLL_WAIT: Duration = Duration::from_secs(20);

/// Largest body of a poll-shape request or response, under nginx's default
/// 1 MiB `client_max_body_size` with room for the records' overhead.
pub const POLL_BODY_MAX: usize = 512 * 1024;

/// Query parameter of a poll request: the longest the agent wants it held,
/// in seconds (its `poll_hold`, shortened on paths that cut requests).
const POLL_WAIT_PARAM: &str = "w";

/// The longest a station holds a poll request, whatever the agent asks: an
/// hour, the longest `keepalive` (a held request is the session's sign of
/// life on a poll carrier, so holding one longer would starve liveness).
pub const MAX_POLL_WAIT: Duration = Duration::from_secs(3600);

/// Query parameter (`c=1`) of a poll request that goes on beside the
/// agent's other polls in flight: the station answers it from where its
/// sending is. Without it (the first poll after a failed one, or an agent
/// that does not pipeline) the station sends again from the first packet
/// the agent has not acknowledged, and older held polls end.
const POLL_CONTINUE_PARAM: &str = "c";

/// The query of a poll request asking for `wait` (whole seconds, at least
/// 1), going on beside the polls in flight if `continues`.
pub fn poll_query(wait: Duration, continues: bool) -> String {
    let wait = wait.as_secs().max(1);
    if continues {
        format!("{POLL_WAIT_PARAM}={wait}&{POLL_CONTINUE_PARAM}=1")
    } else {
        format!("{POLL_WAIT_PARAM}={wait}")
    }
}

/// Whether the poll request with target `target` goes on beside the polls
/// in flight rather than starting the station's sending again.
pub fn poll_continues(target: &str) -> bool {
    query_secs(target, POLL_CONTINUE_PARAM) == Some(1)
}

/// How long to hold the poll request with target `target`: what it asks
/// for ([`POLL_WAIT`] if nothing), never more than [`MAX_POLL_WAIT`].
pub fn poll_wait(target: &str) -> Duration {
    let asked = query_secs(target, POLL_WAIT_PARAM);
    asked.map_or(POLL_WAIT, |secs| Duration::from_secs(secs).min(MAX_POLL_WAIT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_wait_is_asked_for_and_capped() {
        assert_eq!(poll_wait("/p1/x/poll"), POLL_WAIT);
        assert_eq!(
            poll_wait(&format!("/p1/x/poll?{}", poll_query(Duration::from_secs(3), false))),
            Duration::from_secs(3)
        );
        assert_eq!(poll_wait("/p1/x/poll?a=b&w=0"), Duration::ZERO);
        assert_eq!(poll_wait("/p1/x/poll?w=300"), Duration::from_secs(300));
        assert_eq!(poll_wait("/p1/x/poll?w=99999"), MAX_POLL_WAIT);
        assert_eq!(poll_wait("/p1/x/poll?w=-1"), POLL_WAIT);
        assert_eq!(poll_query(Duration::from_millis(10), false), "w=1");
    }

    #[test]
    fn a_poll_continues_only_when_it_says_so() {
        let continued = format!("/p1/x/poll?{}", poll_query(Duration::from_secs(20), true));
        assert_eq!(continued, "/p1/x/poll?w=20&c=1");
        assert!(poll_continues(&continued));
        assert_eq!(poll_wait(&continued), Duration::from_secs(20));
        for target in
            ["/p1/x/poll", "/p1/x/poll?w=20", "/p1/x/poll?c=0", "/p1/x/poll?c=", "/p1/x/poll?cc=1"]
        {
            assert!(!poll_continues(target), "{target}");
        }
    }
}
