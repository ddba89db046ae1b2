//! A live session: the sans-I/O [`Connection`] under a lock, and the
//! wakeups that connect it to carrier tasks and stream tasks.
//!
//! ```text
//!  carrier reader ─records─▶ receive() ─open─▶ Connection::accept ─events─▶ stream wakeups
//!  carrier writer ◀─records─ transmit() ◀─seal─ Connection::poll_transmit ◀─ endpoint pumps
//!                          timer task ─▶ Session::handle_timeout
//! ```
//!
//! Encryption and decryption run outside the lock, so a carrier writer
//! sealing a packet never blocks a socket feeding its stream. Key renewal,
//! replay windows and which lane may send are the connection's
//! (core/connection.rs); this module only takes the lock, seals and
//! opens, and wakes whoever waits.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use event_listener::Event as Notify;
use futures_lite::future;
use smol::channel;

use crate::carrier::auto::Seen;
use crate::core::connection::{Accepted, Connection};
pub use crate::core::connection::{LaneEnd, LaneToken, Stats};
use crate::core::frame::MAX_PACKET;
pub use crate::core::session::{CloseReason, Ending};
use crate::core::session::{Lane, Limits};
use crate::core::streams::{Event, Side, StreamError, StreamId, Streams};
use crate::crypto::{BadRecord, RecordReader, Transport};
use crate::endpoint::PumpError;

/// A stream the peer opened, waiting for the driver to connect it.
#[derive(Debug)]
pub struct Incoming {
    pub id: StreamId,
    pub name: String,
}

/// A carrier body held something other than authentic, fresh records.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadBody {
    #[error(transparent)]
    Framing(#[from] BadRecord),
    /// Changed on the way, forged, or a replay of a captured request.
    #[error("{0} sealed packets failed authentication or were replays")]
    Rejected(usize),
}

struct State {
    conn: Connection,
    wakers: HashMap<StreamId, Arc<Notify>>,
    incoming: channel::Sender<Incoming>,
}

pub struct Tunnel {
    state: Mutex<State>,
    /// Something may be ready to send.
    transmit: Notify,
    /// The session's earliest deadline moved earlier.
    timer: Notify,
}

impl Tunnel {
    /// A session on fresh keys; the receiver yields streams the peer opens.
    pub fn new(
        side: Side,
        transport: Transport,
        limits: Limits,
    ) -> (Arc<Tunnel>, channel::Receiver<Incoming>) {
        let (tx, rx) = channel::unbounded();
        let state = State {
            conn: Connection::new(side, transport, Instant::now(), limits),
            wakers: HashMap::new(),
            incoming: tx,
        };
        let tunnel =
            Tunnel { state: Mutex::new(state), transmit: Notify::new(), timer: Notify::new() };
        (Arc::new(tunnel), rx)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug; keep serving the other
        // sessions rather than poisoning the whole station.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn stats(&self) -> Stats {
        self.lock().conn.stats()
    }

    /// How long the session lives without hearing from the peer: a carrier
    /// lane may be silent that long (keepalives come well within it).
    pub fn idle_timeout(&self) -> Duration {
        self.lock().conn.session().limits().idle_timeout
    }

    /// When the peer was last heard from (an authentic packet).
    pub fn last_heard(&self) -> Instant {
        self.lock().conn.session().last_received()
    }

    /// How many of our packets the peer has acknowledged.
    pub fn acked(&self) -> u64 {
        self.lock().conn.session().acked()
    }

    /// What the session shows of the path now, taken at one moment.
    pub fn seen(&self) -> Seen {
        let state = self.lock();
        Seen {
            acked: state.conn.session().acked(),
            stalled_since: state.conn.session().stalled_since(),
            round_trips: state.conn.session().rtt().span(),
        }
    }

    /// Starts counting round trips afresh: new lanes may take another path.
    pub fn restart_round_trips(&self) {
        self.lock().conn.session_mut().rtt_mut().restart_span();
    }

    /// Sends a packet that the peer must acknowledge, to prove the path.
    pub fn probe(&self) {
        let mut state = self.lock();
        state.conn.session_mut().probe();
        self.settle(&mut state);
    }

    pub fn closed(&self) -> Option<CloseReason> {
        self.lock().conn.closed().cloned()
    }

    pub fn stream_count(&self) -> usize {
        self.lock().conn.session_mut().streams().len()
    }

    /// Ends the session, telling the peer why (a Close frame); the peer
    /// then ends it at its side.
    pub fn close(&self, reason: Ending) {
        let mut state = self.lock();
        state.conn.session_mut().close(reason);
        self.settle(&mut state);
    }

    /// Everything queued has been sent and acknowledged by the peer.
    pub fn all_delivered(&self) -> bool {
        let mut state = self.lock();
        state.conn.session().unacked_bytes() == 0
            && !state.conn.session_mut().streams().has_output()
    }

    /// Ends the session here without telling the peer.
    pub fn end(&self, reason: Ending) {
        let mut state = self.lock();
        state.conn.session_mut().end(reason.into());
        self.settle(&mut state);
    }

    /// Wakes the timer task if the session's earliest deadline moved
    /// earlier than `before`, what it was when the task last read it: the
    /// task sleeps until then. Sending is such a move: a keepalive deadline
    /// that was due stops being one, and the next one (a keepalive period
    /// on) appears only once the keepalive is sent. Without this wakeup the
    /// task slept until the idle deadline and no further keepalive went out
    /// on an idle session (the stream carrier's downlink then looked dead).
    fn rearm(&self, state: &State, before: Option<Instant>) {
        if state.conn.session().poll_timeout() < before || before.is_none() {
            self.timer.notify(1);
        }
    }

    /// Routes the core's events to whoever waits on them. Call after every
    /// operation on the session, with the lock held.
    fn settle(&self, state: &mut State) {
        while let Some(event) = state.conn.poll_event() {
            match event {
                Event::Opened { id, name } => {
                    state.wakers.insert(id, Arc::new(Notify::new()));
                    // The receiver lives as long as the driver that owns us.
                    let _ = state.incoming.try_send(Incoming { id, name });
                }
                Event::Readable(id) | Event::Writable(id) => {
                    if let Some(waker) = state.wakers.get(&id) {
                        waker.notify(usize::MAX);
                    }
                }
                Event::Reset { id, reason } => {
                    log::info!("stream {id} reset by peer: {reason}");
                    if let Some(waker) = state.wakers.get(&id) {
                        waker.notify(usize::MAX);
                    }
                }
                Event::Closed { reason } => {
                    log::info!("session closed: {reason}");
                    state.incoming.close();
                    for waker in state.wakers.values() {
                        waker.notify(usize::MAX);
                    }
                    self.timer.notify(usize::MAX);
                }
            }
        }
        self.transmit.notify(usize::MAX);
    }

    /// Feeds carrier body bytes. Returns how many records were authentic
    /// and fresh. Forged and replayed ones are counted and dropped, and make
    /// this an error: the connection that carried them is not to be trusted
    /// further, and once it is closed the session resends on a new one.
    pub fn receive(
        &self,
        body: &[u8],
        reader: &mut RecordReader,
        scratch: &mut Vec<u8>,
    ) -> Result<usize, BadBody> {
        let mut authentic = 0;
        let mut rejected = 0;
        let mut openers = self.lock().conn.openers();
        reader.feed(body, |counter, ciphertext| {
            let opened = openers.open(counter, ciphertext, scratch);
            let mut state = self.lock();
            let before = state.conn.session().poll_timeout();
            match state.conn.accept(Instant::now(), opened, counter, scratch) {
                Ok(accepted) => {
                    authentic += 1;
                    if accepted == Accepted::KeysMoved {
                        openers = state.conn.openers();
                    }
                }
                Err(_) => {
                    rejected += 1;
                    return;
                }
            }
            self.rearm(&state, before);
            self.settle(&mut state);
        })?;
        if rejected > 0 {
            return Err(BadBody::Rejected(rejected));
        }
        Ok(authentic)
    }

    /// A new carrier lane starts: it sends from the first unacknowledged
    /// packet, and any older lane stops.
    pub fn begin_lane(&self, kind: Lane) -> LaneToken {
        let mut state = self.lock();
        let lane = state.conn.begin_lane(kind);
        self.settle(&mut state);
        lane
    }

    /// Another request of the lane sending now: it goes on from where that
    /// lane is, beside the lane's other requests in flight (the poll
    /// carrier pipelines them; the peer reorders). Before any lane began,
    /// it begins one.
    pub fn join_lane(&self, kind: Lane) -> LaneToken {
        let mut state = self.lock();
        let lane = state.conn.join_lane(kind);
        self.settle(&mut state);
        lane
    }

    /// Since when packets from the peer have waited past a gap that
    /// nothing fills, if any wait.
    pub fn gap_since(&self) -> Option<Instant> {
        self.lock().conn.session().gap_since()
    }

    /// Waits until the session has something for `lane`, then appends
    /// sealed records to `out` until it holds about `max` bytes.
    pub async fn transmit(
        &self,
        lane: LaneToken,
        out: &mut Vec<u8>,
        max: usize,
    ) -> Result<(), LaneEnd> {
        let mut plain = Vec::with_capacity(MAX_PACKET);
        loop {
            let listener = self.transmit.listen();
            if self.transmit_ready(lane, out, max, &mut plain)? {
                return Ok(());
            }
            listener.await;
        }
    }

    /// Like [`Tunnel::transmit`] but returns at once, possibly with nothing.
    pub fn transmit_now(
        &self,
        lane: LaneToken,
        out: &mut Vec<u8>,
        max: usize,
    ) -> Result<bool, LaneEnd> {
        let mut plain = Vec::with_capacity(MAX_PACKET);
        self.transmit_ready(lane, out, max, &mut plain)
    }

    fn transmit_ready(
        &self,
        lane: LaneToken,
        out: &mut Vec<u8>,
        max: usize,
        plain: &mut Vec<u8>,
    ) -> Result<bool, LaneEnd> {
        let start = out.len();
        while out.len() - start < max {
            let transport = {
                let mut state = self.lock();
                let before = state.conn.session().poll_timeout();
                let Some(transport) = state.conn.poll_transmit(Instant::now(), lane, plain)? else {
                    break;
                };
                self.rearm(&state, before);
                self.settle(&mut state);
                transport
            };
            transport.seal(plain, out);
        }
        if out.len() == start {
            // The caller waits now, maybe for hours (an idle device's held
            // poll or downlink): it holds no packet-sized scratch meanwhile.
            *plain = Vec::new();
        }
        Ok(out.len() > start)
    }

    /// Appends one sealed ack-only packet to `out`: poll requests carry one
    /// to prove who sent them.
    pub fn seal_ack(&self, out: &mut Vec<u8>) {
        let mut plain = Vec::new();
        let transport = {
            let mut state = self.lock();
            let before = state.conn.session().poll_timeout();
            let transport = state.conn.write_ack(Instant::now(), &mut plain);
            self.rearm(&state, before);
            transport
        };
        transport.seal(&plain, out);
    }

    /// Agent side of a key renewal: `transport` seals from now on; the keys
    /// before it keep opening what the station sealed before it moved.
    pub fn rekey(&self, transport: Transport) {
        self.lock().conn.rekey(transport);
    }

    /// Station side of a key renewal: `transport` becomes the sealing keys
    /// once a record sealed with it arrives. A later offer replaces this one
    /// (the agent asked again because it never got the answer).
    pub fn offer_keys(&self, transport: Transport) {
        self.lock().conn.offer_keys(transport);
    }

    /// Serves the session's deadlines until it closes. The owner of the
    /// tunnel runs this; it returns the reason the session ended.
    pub async fn run_timers(&self) -> CloseReason {
        loop {
            let listener = self.timer.listen();
            let deadline = {
                let mut state = self.lock();
                state.conn.session_mut().handle_timeout(Instant::now());
                self.settle(&mut state);
                if let Some(closed) = state.conn.closed() {
                    return closed.clone();
                }
                state.conn.session().poll_timeout()
            };
            match deadline {
                Some(at) => {
                    future::or(
                        async {
                            smol::Timer::at(at).await;
                        },
                        listener,
                    )
                    .await
                }
                None => listener.await,
            }
        }
    }

    /// Opens a stream to the peer's target or service `name`.
    pub fn open(&self, name: &str) -> Result<StreamId, StreamError> {
        let mut state = self.lock();
        if state.conn.closed().is_some() {
            return Err(StreamError::Closed(0));
        }
        let id = state.conn.session_mut().streams().open(name)?;
        state.wakers.insert(id, Arc::new(Notify::new()));
        self.settle(&mut state);
        Ok(id)
    }

    /// Ends stream `id` on both sides; `reason` goes to the peer's log.
    pub fn reset(&self, id: StreamId, reason: &str) {
        let mut state = self.lock();
        state.conn.session_mut().streams().reset(id, reason);
        if let Some(waker) = state.wakers.get(&id) {
            waker.notify(usize::MAX);
        }
        self.settle(&mut state);
    }

    fn waker(&self, id: StreamId) -> Option<Arc<Notify>> {
        self.lock().wakers.get(&id).cloned()
    }

    /// Carries stream `id` with `directions`, an endpoint's two pump
    /// directions given the stream's waker (see [`crate::endpoint`]),
    /// until both finish or the stream is gone; an endpoint's error resets
    /// the stream with it as the reason.
    pub async fn pump_with<F>(&self, id: StreamId, directions: impl FnOnce(Arc<Notify>) -> F)
    where
        F: Future<Output = Result<(), PumpError>>,
    {
        let Some(waker) = self.waker(id) else { return };
        let both = async {
            if let Err(e) = directions(waker.clone()).await {
                self.reset(id, &e.to_string());
            }
        };
        future::or(both, self.gone(id, &waker)).await;
        self.lock().wakers.remove(&id);
    }

    /// Runs `f` on the session's streams and the tunnel's counters, then
    /// routes the events it caused: how pumps move bytes in and out.
    pub(crate) fn with_streams<R>(&self, f: impl FnOnce(&mut Streams, &mut Stats) -> R) -> R {
        self.with_streams_if(|streams, stats| (f(streams, stats), true))
    }

    /// As [`Tunnel::with_streams`], routing events only when `f` says it
    /// changed something: a pump's pass that found nothing to move wakes
    /// no lane (on every message of an interactive stream, that would be
    /// a spurious wakeup of each lane waiting to send).
    pub(crate) fn with_streams_if<R>(
        &self,
        f: impl FnOnce(&mut Streams, &mut Stats) -> (R, bool),
    ) -> R {
        let mut guard = self.lock();
        let state = &mut *guard;
        let (streams, stats) = state.conn.streams_and_stats();
        let (result, changed) = f(streams, stats);
        if changed {
            self.settle(state);
        }
        result
    }

    /// Resolves when stream `id` no longer exists in the session.
    async fn gone(&self, id: StreamId, waker: &Notify) {
        loop {
            let listener = waker.listen();
            {
                let mut state = self.lock();
                if state.conn.closed().is_some() || !state.conn.session_mut().streams().contains(id)
                {
                    return;
                }
            }
            listener.await;
        }
    }
}

/// How often a drain looks whether the streams have ended.
const DRAIN_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// How long a drain waits for its closes to reach the peers: a courtesy,
/// so they reconnect elsewhere rather than wait for a timeout.
const CLOSE_FLUSH: std::time::Duration = std::time::Duration::from_secs(1);

/// A graceful end for `tunnels`: their open streams get up to `limit` to
/// finish, then each session is closed with `reason` for its peer.
pub async fn close_after_drain(
    tunnels: &[Arc<Tunnel>],
    limit: std::time::Duration,
    reason: Ending,
) {
    let open = || -> usize { tunnels.iter().map(|t| t.stream_count()).sum() };
    let deadline = Instant::now() + limit;
    if open() > 0 {
        log::info!("stopping: waiting up to {} s for {} streams to end", limit.as_secs(), open());
    }
    while open() > 0 && Instant::now() < deadline {
        smol::Timer::after(DRAIN_POLL).await;
    }
    if open() > 0 {
        log::warn!("stopping: closing {} streams that did not end in time", open());
    }
    for tunnel in tunnels {
        tunnel.close(reason);
    }
    let flush = Instant::now() + CLOSE_FLUSH;
    while tunnels.iter().any(|t| !t.all_delivered()) && Instant::now() < flush {
        smol::Timer::after(DRAIN_POLL).await;
    }
}

/// The unit tests' two ends of a session, here and for the pumps' tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::crypto::session_pair;

    /// Moves what `from` has to send into `to`, as one carrier body.
    pub(crate) fn carry(
        from: &Tunnel,
        lane: LaneToken,
        to: &Tunnel,
    ) -> (Vec<u8>, Result<usize, BadBody>) {
        let mut body = Vec::new();
        from.transmit_now(lane, &mut body, 1 << 20).expect("the session is open");
        let received = to.receive(&body, &mut RecordReader::default(), &mut Vec::new());
        (body, received)
    }

    /// An agent's and a station's tunnel on one session's keys, with the
    /// agent's sending lane and the station's receiver of opened streams.
    pub(crate) fn pair() -> (Arc<Tunnel>, LaneToken, Arc<Tunnel>, channel::Receiver<Incoming>) {
        let (agent_keys, station_keys) = session_pair();
        let (agent, _) = Tunnel::new(Side::Agent, agent_keys, Limits::default());
        let (station, opened) = Tunnel::new(Side::Station, station_keys, Limits::default());
        let up = agent.begin_lane(Lane::Data);
        (agent, up, station, opened)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{carry, pair};
    use super::*;
    use crate::crypto::session_pair;
    use std::time::Duration;

    fn deliver(body: &[u8], to: &Tunnel) -> Result<usize, BadBody> {
        to.receive(body, &mut RecordReader::default(), &mut Vec::new())
    }

    #[test]
    fn renewed_keys_take_over_without_losing_a_record() {
        let (agent, up, station, opened) = pair();
        let down = station.begin_lane(Lane::Data);

        agent.open("first").expect("open");
        assert!(matches!(carry(&agent, up, &station).1, Ok(n) if n > 0));
        assert_eq!(opened.try_recv().expect("opened at the station").name, "first");

        // Sealed with the old keys and still on its way when the keys change.
        agent.open("in-flight").expect("open");
        let mut in_flight = Vec::new();
        agent.transmit_now(up, &mut in_flight, 1 << 20).expect("open");

        let (agent_new, station_new) = session_pair();
        agent.rekey(agent_new);
        station.offer_keys(station_new);
        // The station seals with the old keys until the agent proves it has
        // the new ones; the agent still opens those.
        station.probe();
        assert!(matches!(carry(&station, down, &agent).1, Ok(n) if n > 0));

        assert!(matches!(deliver(&in_flight, &station), Ok(n) if n > 0));
        assert_eq!(opened.try_recv().expect("opened").name, "in-flight");

        agent.open("after").expect("open");
        assert!(matches!(carry(&agent, up, &station).1, Ok(n) if n > 0));
        assert_eq!(opened.try_recv().expect("opened").name, "after");
        // The station moved to the new keys with that record.
        station.probe();
        let (sealed, received) = carry(&station, down, &agent);
        assert!(matches!(received, Ok(n) if n > 0));

        // Replays fail under either keys, and so do keys never agreed.
        assert_eq!(deliver(&in_flight, &station), Err(BadBody::Rejected(1)));
        assert_eq!(deliver(&sealed, &agent), Err(BadBody::Rejected(1)));
        let (stranger, _) = session_pair();
        let mut forged = Vec::new();
        stranger.seal(b"not a packet of this session", &mut forged);
        assert_eq!(deliver(&forged, &station), Err(BadBody::Rejected(1)));
        assert_eq!(station.stats().rejected, 2);
    }

    /// An idle session keeps sending keepalives on its lane, one a period:
    /// the timer task must learn of each new keepalive deadline. (It once
    /// slept to the idle deadline after the first, and the stream carrier's
    /// downlink fell silent until the agent cut it.) Real time, with a
    /// keepalive period of milliseconds.
    #[test]
    fn an_idle_session_keeps_sending_keepalives() {
        let (_, station_keys) = session_pair();
        let period = Duration::from_millis(40);
        let limits = Limits { keepalive: period, ..Limits::default() };
        let (station, _) = Tunnel::new(Side::Station, station_keys, limits);
        let lane = station.begin_lane(Lane::Data);
        let watched = period * 15;
        let sent = smol::block_on(async {
            let end = Instant::now() + watched;
            let timers = async {
                station.run_timers().await;
                0
            };
            let lane_sends = async {
                let mut sends = 0;
                let mut out = Vec::new();
                loop {
                    out.clear();
                    let sent = future::or(
                        async { station.transmit(lane, &mut out, 1 << 20).await.is_ok() },
                        async {
                            smol::Timer::at(end).await;
                            false
                        },
                    )
                    .await;
                    if !sent {
                        return sends;
                    }
                    sends += 1;
                }
            };
            future::or(timers, lane_sends).await
        });
        // 15 periods: at least half of the 15 keepalives, whatever the
        // scheduling on a busy machine; the bug sent one.
        assert!(sent >= 7, "{sent} keepalives in {watched:?} with a period of {period:?}");
    }

    #[test]
    fn a_later_offer_replaces_one_the_agent_never_got() {
        let (agent, up, station, opened) = pair();
        // The agent's first renewal answer was lost: the station offered keys
        // the agent never had, then the agent asked again.
        let (_, lost) = session_pair();
        station.offer_keys(lost);
        let (agent_new, station_new) = session_pair();
        station.offer_keys(station_new);
        agent.rekey(agent_new);
        agent.open("s").expect("open");
        assert!(matches!(carry(&agent, up, &station).1, Ok(n) if n > 0));
        assert_eq!(opened.try_recv().expect("opened").name, "s");
    }
}
