//! The carrier lanes of one session, and the supervisor that picks their
//! shape and watches the path.
//!
//! ```text
//!  carry ─ stream shape: down (chunked response) + up (chunked request)
//!        │     the lanes report to a carrier::auto::Judge, asked every 100 ms while
//!        │     it judges a new path, then every second:
//!        │     path holds back bytes, or cuts lanes again and again ──▶ auto: poll
//!        │     silent but proven path ──▶ rebuild the lanes
//!        └ poll shape:   poll (long-poll) + push (one request per batch) until the session ends,
//!                        or, for auto, until a carrier::auto::Retry of stream is due and
//!                        nothing waits for an ack ──▶ stream shape, judged afresh;
//!                        each lane has up to PIPELINE requests in flight while busy, one
//!                        held poll and no push while idle
//! ```
//!
//! Lanes only move sealed records; the session below them resends whatever
//! a lost or rebuilt lane did not deliver, so switching shape loses nothing.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_lite::{future, AsyncWriteExt};

use super::client::{deadline, Backoff, CarrierError, Who, REPLY_TIMEOUT};
use super::depth::{Depth, PIPELINE};
use super::Shared;
use crate::carrier::auto::{self, Judge, Retry, Sighting, Verdict};
use crate::carrier::conn::HttpConn;
use crate::carrier::http::{BodyKind, HttpError};
use crate::carrier::link::Link;
use crate::carrier::poll::{self, POLL_BODY_MAX};
use crate::carrier::stream::{LongBody, STREAM_CHUNK};
use crate::carrier::Verb;
use crate::config::CarrierKind;
use crate::core::session::Lane;
use crate::crypto::{RecordReader, SessionId, MAX_RECORD};
use crate::task::Scope;
use crate::tunnel::{Ending, LaneEnd, LaneToken, Tunnel};

/// How often the supervisor looks at the stream lanes: often while it
/// judges a new path (a first command waits for the verdict), then rarely
/// (an idle agent should sleep).
const JUDGING_TICK: Duration = Duration::from_millis(100);
const WATCH_TICK: Duration = Duration::from_secs(1);

/// Stream lanes that lasted this long worked: the next rebuild starts its
/// backoff afresh.
const LANES_PROVEN: Duration = Duration::from_secs(60);

/// Shortest hold asked of a poll request when the path cuts them.
const POLL_WAIT_MIN: Duration = Duration::from_secs(1);

/// A poll reply this large says more may wait at the station: the extra
/// pollers join in until one brings less.
const BUSY_REPLY: usize = 16 * 1024;

/// An extra pusher idle this long lets its connection go.
const EXTRA_IDLE: Duration = Duration::from_secs(2);

/// A gap in what the station sent that lasts this long, past the polls in
/// flight, makes the next poll ask for everything unacknowledged again.
const GAP_PATIENCE: Duration = Duration::from_secs(10);

/// A poll cut sooner than this after it was sent is a failure, not a sign
/// that the path has a shorter timeout than our hold.
const POLL_CUT_MIN: Duration = Duration::from_secs(2);

/// Everything a lane needs.
#[derive(Clone)]
struct LaneCtx {
    shared: Arc<Shared>,
    tunnel: Arc<Tunnel>,
    session: SessionId,
    lost: Arc<LostReply>,
}

/// A push failed, so its answer, which may have carried packets of the
/// station, may be lost: the held poll gives way to one that asks the
/// station to send again from what we acknowledged, rather than leaving
/// the gap to [`GAP_PATIENCE`].
#[derive(Default)]
struct LostReply {
    lost: AtomicBool,
    event: event_listener::Event,
}

impl LostReply {
    fn set(&self) {
        self.lost.store(true, Ordering::Relaxed);
        self.event.notify(usize::MAX);
    }

    /// Resolves once a push's answer was lost.
    async fn wait(&self) {
        loop {
            let listener = self.event.listen();
            if self.lost.load(Ordering::Relaxed) {
                return;
            }
            listener.await;
        }
    }

    /// Whether one was lost since the last call.
    fn take(&self) -> bool {
        self.lost.swap(false, Ordering::Relaxed)
    }
}

/// The carrier shape of one agent, shared by its successive sessions.
pub(super) struct ShapeMemory {
    /// What `auto` saw when it fell back, for `postern status`.
    why: Mutex<Option<Sighting>>,
    /// Seconds a poll request may be held: `poll_hold`, shorter once a
    /// path cut held requests.
    poll_wait: AtomicU64,
    /// Milliseconds the last hello's exchange took; 0 before the first.
    hello_millis: AtomicU64,
    /// When `auto`, on poll, tries stream again.
    retry: Mutex<Retry>,
    /// How many requests a poll-shape lane keeps in flight.
    depth: Mutex<Depth>,
}

impl ShapeMemory {
    pub(super) fn new(poll_hold: Duration, stream_retry: Duration) -> ShapeMemory {
        ShapeMemory {
            why: Mutex::new(None),
            hello_millis: AtomicU64::new(0),
            poll_wait: AtomicU64::new(poll_hold.as_secs().max(1)),
            retry: Mutex::new(Retry::new(stream_retry)),
            depth: Mutex::new(Depth::default()),
        }
    }

    /// The shape in use, for status lines.
    pub(super) fn describe(&self, configured: CarrierKind) -> &'static str {
        match configured {
            CarrierKind::Stream => "stream",
            CarrierKind::Poll => "poll",
            CarrierKind::Auto if self.on_poll() => "auto (poll)",
            CarrierKind::Auto => "auto (stream)",
        }
    }

    /// How long a hello's exchange took: the path's cost of a new
    /// connection and one request, which the first judgement scales.
    pub(super) fn hello_took(&self, took: Duration) {
        self.hello_millis.store((took.as_millis() as u64).max(1), Ordering::Relaxed);
    }

    fn hello(&self) -> Option<Duration> {
        let millis = self.hello_millis.load(Ordering::Relaxed);
        (millis > 0).then(|| Duration::from_millis(millis))
    }

    /// Why `auto` uses poll, once it fell back.
    pub(super) fn why(&self) -> Option<String> {
        lock(&self.why).as_ref().map(Sighting::to_string)
    }

    /// The lanes the shape in use runs.
    pub(super) fn lanes(&self, configured: CarrierKind) -> &'static str {
        match self.describe(configured) {
            "stream" | "auto (stream)" => "up + down",
            _ => "push + poll",
        }
    }

    /// Whether request `n` (0 the first) of a poll-shape lane may go at `now`.
    fn in_depth(&self, n: usize, now: Instant) -> bool {
        n < lock(&self.depth).allowed(now)
    }

    /// Request `n` of a poll-shape lane failed with `error`: a refusal by
    /// a box on the path (its 403, 429 or 503 page; not a cut, a timeout
    /// or a refused connection, which a restarting station gives too) past
    /// the first request lowers how many go at once.
    fn failed(&self, n: usize, error: &CarrierError, now: Instant) {
        let refusal = matches!(
            error,
            CarrierError::Status { who, status: 403 | 429 | 503, .. } if *who != Who::Station
        );
        if !refusal {
            return;
        }
        if let Some((depth, hold)) = lock(&self.depth).refused(n, now) {
            log::warn!(
                "the path refused request {} of a lane's requests in flight ({error}): keeping \
                 {depth} in flight per lane for {} (a proxy's limit of connections per client?)",
                n + 1,
                auto::spoken(hold)
            );
        }
    }

    /// `auto` found that stream does not pass this path and has not tried
    /// it again yet: a try is due some time.
    fn on_poll(&self) -> bool {
        lock(&self.retry).due_at().is_some()
    }

    fn poll_wait(&self) -> Duration {
        Duration::from_secs(self.poll_wait.load(Ordering::Relaxed))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Carries the session over HTTP until it closes, in the configured shape.
pub(super) async fn carry(shared: Arc<Shared>, tunnel: Arc<Tunnel>, session: SessionId) {
    let ctx = LaneCtx { shared, tunnel, session, lost: Arc::default() };
    let shape = &ctx.shared.shape;
    // Rebuilding stream lanes backs off too: a path that refuses them at
    // once must not make the agent knock every second.
    let mut backoff = Backoff::new();
    loop {
        let poll = match ctx.shared.carrier {
            CarrierKind::Poll => true,
            CarrierKind::Stream => false,
            CarrierKind::Auto => shape.on_poll(),
        };
        if poll {
            let lanes = Scope::new();
            lanes.spawn(lane_loop(ctx.clone(), Verb::Poll, None));
            let push = lane_loop(ctx.clone(), Verb::Push, None);
            if ctx.shared.carrier == CarrierKind::Poll {
                return push.await;
            }
            let session_over = async {
                push.await;
                true
            };
            let retry = async {
                retry_due(&ctx).await;
                false
            };
            if future::or(session_over, retry).await {
                return;
            }
            // Dropping the poll lanes loses nothing: the session resends.
            drop(lanes);
            let since = lock(&shape.why).take().map(|why| why.to_string()).unwrap_or_default();
            log::info!("carrier auto: trying the stream lanes again (on poll because {since})");
        }
        let started = Instant::now();
        let through = Through::start(&ctx.tunnel, Direction::Acked);
        let verdict = run_stream(&ctx).await;
        if started.elapsed() >= LANES_PROVEN {
            backoff.reset();
            lock(&shape.retry).passed();
        } else if through.moved() {
            backoff.reset();
        }
        let delay = backoff.delay();
        let Some(verdict) = verdict else { return };
        match verdict {
            Verdict::PathBuffers(what) if ctx.shared.carrier == CarrierKind::Auto => {
                let wait = lock(&shape.retry).fell_back(Instant::now());
                log::warn!(
                    "carrier auto: {what}; switching to poll, and trying stream again in {}",
                    auto::spoken(wait)
                );
                ctx.shared.record.error(format!("carrier auto: {what}"));
                *lock(&shape.why) = Some(what);
                continue;
            }
            Verdict::PathBuffers(what) => {
                log::warn!(
                    "carrier stream: {what}; reconnecting in {:.1} s (carrier = \"auto\" or \"poll\" passes such paths)",
                    delay.as_secs_f32()
                );
                ctx.shared.record.error(format!("carrier stream: {what}"));
            }
            dead @ Verdict::Dead(_) => {
                log::warn!(
                    "stream lanes: {dead}; reconnecting them in {:.1} s",
                    delay.as_secs_f32()
                );
                ctx.shared.record.error(format!("stream lanes: {dead}"));
            }
        }
        smol::Timer::after(delay).await;
    }
}

/// Resolves when auto's [`Retry`] of the stream lanes is due and nothing
/// waits for an acknowledgement; sleeps until then, an idle agent's way.
async fn retry_due(ctx: &LaneCtx) {
    let Some(at) = lock(&ctx.shared.shape.retry).due_at() else {
        return future::pending().await;
    };
    smol::Timer::at(at).await;
    loop {
        let idle = ctx.tunnel.all_delivered();
        if lock(&ctx.shared.shape.retry).try_if_due(Instant::now(), idle) {
            return;
        }
        smol::Timer::after(WATCH_TICK).await;
    }
}

/// What one set of stream lanes has seen of the path, shared by the lanes
/// (which report) and [`run_stream`] (which asks for the verdict).
type Watch = Mutex<Judge>;

/// Runs one set of stream lanes until the session closes (`None`) or the
/// judge gives a verdict on the path.
async fn run_stream(ctx: &LaneCtx) -> Option<Verdict> {
    // The quick first judgement and the uplink's cuts serve `auto`'s choice
    // of shape. A configured stream has no other shape to move to: a
    // verdict only rebuilds its lanes and grows their backoff, so it is
    // judged as before (10 s, downlink cuts), not more often.
    let is_auto = ctx.shared.carrier == CarrierKind::Auto;
    let hello = ctx.shared.shape.hello().filter(|_| is_auto);
    let watch = Arc::new(Mutex::new(Judge::new(hello, ctx.tunnel.acked())));
    ctx.tunnel.restart_round_trips();
    let lanes = Scope::new();
    lanes.spawn(lane_loop(ctx.clone(), Verb::Down, Some(watch.clone())));
    lanes.spawn(lane_loop(ctx.clone(), Verb::Up, Some(watch.clone())));
    // A packet the station must acknowledge, sent now rather than with the
    // first user bytes, so the path is judged before anyone waits on it.
    ctx.tunnel.probe();
    let mut seen = ctx.tunnel.seen();
    loop {
        let judging = lock(&watch).judging(&seen);
        smol::Timer::after(if judging { JUDGING_TICK } else { WATCH_TICK }).await;
        if ctx.tunnel.closed().is_some() {
            return None;
        }
        seen = ctx.tunnel.seen();
        let mut judge = lock(&watch);
        if let Some(verdict) = judge.verdict(Instant::now(), &seen) {
            return Some(verdict);
        }
        if judge.wants_round_trips(&seen) && seen.stalled_since.is_none() {
            ctx.tunnel.probe();
        }
    }
}

/// Keeps one lane going, reconnecting with backoff, until the session ends.
async fn lane_loop(ctx: LaneCtx, verb: Verb, watch: Option<Arc<Watch>>) {
    let mut backoff = Backoff::new();
    while ctx.tunnel.closed().is_none() {
        let result = match (verb, &watch) {
            (Verb::Down, Some(watch)) => down_lane(&ctx, watch, &mut backoff).await,
            (Verb::Up, Some(watch)) => up_lane(&ctx, watch, &mut backoff).await,
            (Verb::Poll, _) => poll_lane(&ctx, &mut backoff).await,
            _ => push_lane(&ctx, &mut backoff).await,
        };
        match result {
            Err(CarrierError::SessionGone) => {
                ctx.tunnel.end(Ending::UnknownToStation);
                return;
            }
            Err(e) => {
                ctx.shared.reconnects.fetch_add(1, Ordering::Relaxed);
                let delay = backoff.delay();
                log::warn!(
                    "{} lane: {e}; reconnecting in {:.1} s",
                    verb.as_str(),
                    delay.as_secs_f32()
                );
                ctx.shared.record.error(format!("{} lane: {e}", verb.as_str()));
                smol::Timer::after(delay).await;
            }
            Ok(()) => {}
        }
    }
}

fn receive(
    tunnel: &Tunnel,
    bytes: &[u8],
    reader: &mut RecordReader,
    scratch: &mut Vec<u8>,
) -> Result<usize, CarrierError> {
    tunnel.receive(bytes, reader, scratch).map_err(CarrierError::BadBody)
}

/// Stream shape, station to agent: one long chunked (or close-delimited)
/// response.
async fn down_lane(
    ctx: &LaneCtx,
    watch: &Watch,
    backoff: &mut Backoff,
) -> Result<(), CarrierError> {
    let client = &ctx.shared.client;
    let mut conn = client.connect().await?;
    let mut proof = Vec::new();
    ctx.tunnel.seal_ack(&mut proof);
    let mut out = Vec::new();
    let path = client.path(&ctx.session, Verb::Down, None);
    client.head(&mut out, &path, BodyKind::Length(proof.len() as u64));
    out.extend_from_slice(&proof);
    conn.write_all(&out).await.map_err(HttpError::Io)?;
    lock(watch).down_asked(Instant::now());
    let ended = read_downlink(ctx, watch, backoff, &mut conn).await;
    let flowed = lock(watch).down_ended();
    if flowed && ctx.tunnel.closed().is_none() {
        lock(watch).cut(Instant::now(), auto::Lane::Down);
    }
    ended
}

/// Reads the downlink's reply into the session until it ends.
async fn read_downlink(
    ctx: &LaneCtx,
    watch: &Watch,
    backoff: &mut Backoff,
    conn: &mut HttpConn<Link>,
) -> Result<(), CarrierError> {
    let head =
        deadline(REPLY_TIMEOUT, async { conn.read_response(false).await.map_err(Into::into) })
            .await?;
    ctx.shared.client.check(&head)?;
    let mut reader = RecordReader::default();
    let mut scratch = Vec::new();
    let mut body = conn.body(head.body, None);
    // The station sends a keepalive at least this often; silence for
    // longer means the connection is dead even if TCP has not noticed.
    let silence = ctx.shared.limits.keepalive * 2 + Duration::from_secs(5);
    let mut flowing = false;
    while let Some(bytes) =
        deadline(silence, async { body.next().await.map_err(Into::into) }).await?
    {
        receive(&ctx.tunnel, bytes, &mut reader, &mut scratch)?;
        if !flowing {
            flowing = true;
            lock(watch).down_delivered();
            backoff.reset();
        }
    }
    Ok(())
}

/// Stream shape, agent to station: one long chunked request. The station
/// answers only when the body ends, which we never do, so any answer (or
/// the connection closing) is the path cutting the lane.
async fn up_lane(ctx: &LaneCtx, watch: &Watch, backoff: &mut Backoff) -> Result<(), CarrierError> {
    let client = &ctx.shared.client;
    let mut conn = client.connect().await?;
    let mut writer = conn.get_ref().clone();
    let mut out = Vec::with_capacity(STREAM_CHUNK + MAX_RECORD + 64);
    let path = client.path(&ctx.session, Verb::Up, None);
    let body = LongBody::new(true);
    client.head(&mut out, &path, body.kind());
    writer.write_all(&out).await.map_err(HttpError::Io)?;
    // A TLS link holds ciphertext until flushed (carrier/link.rs).
    writer.flush().await.map_err(HttpError::Io)?;
    let lane = ctx.tunnel.begin_lane(Lane::Data);
    let through = Through::start(&ctx.tunnel, Direction::Acked);
    // Whether a chunk went out: a lane cut after that is the path's doing
    // (a proxy that resets request bodies past a size, as squid's
    // request_body_max_size does), counted like a cut downlink.
    let sent_any = AtomicBool::new(false);
    let sending = async {
        loop {
            out.clear();
            match body.records(&ctx.tunnel, lane, &mut out).await {
                Ok(()) => {
                    writer.write_all(&out).await.map_err(HttpError::Io)?;
                    writer.flush().await.map_err(HttpError::Io)?;
                    sent_any.store(true, Ordering::Relaxed);
                }
                Err(LaneEnd::Superseded) | Err(LaneEnd::Closed(_)) => return Ok(()),
            }
        }
    };
    let answered = async {
        let head = conn.read_response(false).await?;
        let answer = client.check(&head).err().unwrap_or(CarrierError::Status {
            who: Who::Station,
            status: head.status,
            reason: head.reason.clone(),
        });
        if !matches!(answer, CarrierError::SessionGone) {
            lock(watch).refused(format!("{} {}", head.status, head.reason));
        }
        Err(answer)
    };
    let ended = future::or(sending, answered).await;
    if through.moved() {
        backoff.reset();
    }
    let gone = matches!(ended, Err(CarrierError::SessionGone));
    let is_auto = ctx.shared.carrier == CarrierKind::Auto;
    if is_auto
        && ended.is_err()
        && !gone
        && sent_any.load(Ordering::Relaxed)
        && ctx.tunnel.closed().is_none()
    {
        lock(watch).cut(Instant::now(), auto::Lane::Up);
    }
    ended
}

/// Poll shape, station to agent: a long poll, again and again; while
/// replies come full, more polls beside it (see [`poller`]).
async fn poll_lane(ctx: &LaneCtx, backoff: &mut Backoff) -> Result<(), CarrierError> {
    let (polls, answered) = (Polls::default(), AtomicBool::new(false));
    let pollers =
        (0..PIPELINE).map(|n| Box::pin(poller(ctx, &polls, &answered, n)) as LaneFuture<'_>);
    let through = Through::start(&ctx.tunnel, Direction::Received);
    pipelined(through, pollers.collect(), &answered, backoff).await
}

/// One of a lane's requests in flight together, on connections of their own.
type LaneFuture<'a> = std::pin::Pin<Box<dyn Future<Output = Result<(), CarrierError>> + Send + 'a>>;

/// Runs a lane's `requests` together until the first one ends, and returns
/// its result; the others are dropped (the session resends what they
/// carried). If any was `answered` meanwhile, the path works: the lane's
/// backoff starts over.
async fn pipelined(
    through: Through<'_>,
    mut requests: Vec<LaneFuture<'_>>,
    answered: &AtomicBool,
    backoff: &mut Backoff,
) -> Result<(), CarrierError> {
    let ended = future::poll_fn(|cx| {
        requests
            .iter_mut()
            .find_map(|request| match request.as_mut().poll(cx) {
                Poll::Ready(ended) => Some(ended),
                Poll::Pending => None,
            })
            .map_or(Poll::Pending, Poll::Ready)
    })
    .await;
    // A request that failed after packets got through worked too (Through).
    if answered.load(Ordering::Relaxed) || through.moved() {
        backoff.reset();
    }
    ended
}

/// The direction a lane carries, as the session counts it.
#[derive(Clone, Copy)]
enum Direction {
    /// Records from the station (a downlink or poll lane).
    Received,
    /// Our packets the station acknowledged (an uplink or push lane).
    Acked,
}

/// Whether packets got through a lane's direction since it started. A
/// lane that moved some before it failed worked: on a path that cuts or
/// mangles now and then, no request may end whole, and a growing backoff
/// would stall a flow that moves. Counted on the lane's own direction,
/// so a lane refused outright still backs off while the other moves.
struct Through<'a> {
    tunnel: &'a Tunnel,
    direction: Direction,
    at_start: u64,
}

impl<'a> Through<'a> {
    fn start(tunnel: &'a Tunnel, direction: Direction) -> Through<'a> {
        Through { tunnel, direction, at_start: Self::count(tunnel, direction) }
    }

    fn count(tunnel: &Tunnel, direction: Direction) -> u64 {
        match direction {
            Direction::Received => tunnel.stats().received,
            Direction::Acked => tunnel.acked(),
        }
    }

    fn moved(&self) -> bool {
        Self::count(self.tunnel, self.direction) > self.at_start
    }
}

/// What the pollers of one lane share.
#[derive(Default)]
struct Polls {
    /// The first poll went out: later ones go on beside it rather than
    /// starting the station's sending again.
    started: AtomicBool,
    /// Replies come full: the extra pollers poll too.
    busy: AtomicBool,
    /// `busy` became true.
    woken: event_listener::Event,
}

/// What an extra poller does after a reply.
#[derive(Debug, PartialEq)]
enum After {
    PollAgain,
    /// Rest until replies come full again.
    Rest,
}

impl Polls {
    /// Whether the next poll goes on where the station's sending stands
    /// (the first poll of a lane, or one that asks to fill a `gap`, starts
    /// it again from what we acknowledged).
    fn continues(&self, gap: bool) -> bool {
        self.started.swap(true, Ordering::Relaxed) && !gap
    }

    /// Poller `n` got a reply of `got` bytes: a full one wakes the extra
    /// pollers; one that brings less sends an extra poller to rest.
    fn replied(&self, n: usize, got: usize) -> After {
        let full = got >= BUSY_REPLY;
        if full && !self.busy.swap(true, Ordering::Relaxed) {
            self.woken.notify(usize::MAX);
        }
        if n > 0 && !full {
            self.busy.store(false, Ordering::Relaxed);
            return After::Rest;
        }
        After::PollAgain
    }
}

/// One poll request after another. Poller 0 always has one held at the
/// station (for `poll_hold`); the others poll only while replies come full,
/// each asking for the shortest hold, and stop (letting their connection
/// go) at the first reply that brings less than [`BUSY_REPLY`]: an idle
/// agent holds one poll, a busy one up to [`PIPELINE`].
async fn poller(
    ctx: &LaneCtx,
    polls: &Polls,
    answered: &AtomicBool,
    n: usize,
) -> Result<(), CarrierError> {
    if !ctx.shared.shape.in_depth(n, Instant::now()) {
        return future::pending().await;
    }
    let client = &ctx.shared.client;
    let max_reply = (POLL_BODY_MAX + MAX_RECORD) as u64;
    let mut conn = None;
    let mut reader = RecordReader::default();
    let mut scratch = Vec::new();
    while ctx.tunnel.closed().is_none() {
        if n > 0 {
            let listener = polls.woken.listen();
            if !polls.busy.load(Ordering::Relaxed) {
                // The connection outlives a lull of EXTRA_IDLE (a new one
                // costs the path's handshake and TCP's slow start, several
                // round trips of a busy lane), not longer: an idle agent
                // keeps one.
                if conn.is_none() {
                    listener.await;
                } else {
                    let lull = async {
                        smol::Timer::after(EXTRA_IDLE).await;
                        true
                    };
                    let woken = async {
                        listener.await;
                        false
                    };
                    if future::or(woken, lull).await {
                        conn = None;
                        (reader, scratch) = Default::default();
                    }
                }
                continue;
            }
        }
        loop {
            let mut proof = Vec::new();
            ctx.tunnel.seal_ack(&mut proof);
            let hold = if n == 0 { ctx.shared.shape.poll_wait() } else { POLL_WAIT_MIN };
            // A gap the polls in flight do not fill came from a reply lost
            // on the way (a failed poll restarts the lane anyway, a failed
            // push says so): ask the station to send again from what we
            // acknowledged.
            let gap = ctx.tunnel.gap_since().is_some_and(|since| since.elapsed() > GAP_PATIENCE)
                || (n == 0 && ctx.lost.take());
            let continues = polls.continues(gap);
            let query = poll::poll_query(hold, continues);
            let path = client.path(&ctx.session, Verb::Poll, Some(&query));
            let sent = Instant::now();
            let mut got = 0;
            let mut deliver = |bytes: &[u8]| {
                got += bytes.len();
                receive(&ctx.tunnel, bytes, &mut reader, &mut scratch).map(drop)
            };
            let exchange = client.exchange(
                &mut conn,
                &path,
                &proof,
                hold + REPLY_TIMEOUT,
                max_reply,
                &mut deliver,
            );
            let lost = async {
                if n > 0 {
                    return future::pending().await;
                }
                ctx.lost.wait().await;
                None
            };
            let exchanged = future::or(async { Some(exchange.await) }, lost).await;
            let Some(exchanged) = exchanged else {
                // Given up for a poll that asks for a resend: this one's
                // connection may still get its answer, so it goes.
                conn = None;
                reader = RecordReader::default();
                continue;
            };
            if let Err(e) = exchanged {
                if n == 0 {
                    shorten_poll_hold(ctx, &e, sent.elapsed(), hold);
                }
                ctx.shared.shape.failed(n, &e, Instant::now());
                return Err(e);
            }
            answered.store(true, Ordering::Relaxed);
            if polls.replied(n, got) == After::Rest {
                break;
            }
            if ctx.tunnel.closed().is_some() {
                break;
            }
        }
    }
    Ok(())
}

/// A path that cuts held requests (a proxy's or balancer's timeout shorter
/// than our hold) makes every poll fail; ask for shorter holds from now on.
fn shorten_poll_hold(ctx: &LaneCtx, error: &CarrierError, waited: Duration, hold: Duration) {
    if let Some(shorter) = hold_after_cut(error, waited, hold) {
        log::warn!(
            "a poll request was cut after {:.0} s ({error}); holding polls for {} s from now on",
            waited.as_secs_f32(),
            shorter.as_secs()
        );
        ctx.shared.shape.poll_wait.store(shorter.as_secs(), Ordering::Relaxed);
    }
}

/// The hold to ask for after a poll held for `hold` failed with `error`
/// once it `waited`: two thirds of the wait if the path cut it (a gateway's
/// or a proxy's timeout, or the connection dropped, while the station still
/// held it), `None` to keep the hold.
fn hold_after_cut(error: &CarrierError, waited: Duration, hold: Duration) -> Option<Duration> {
    let cut_by_path = match error {
        CarrierError::Status { status, .. } => matches!(status, 408 | 502 | 503 | 504),
        CarrierError::Http(e) => {
            matches!(e, HttpError::Timeout | HttpError::UnexpectedEof | HttpError::Io(_))
        }
        _ => false,
    };
    if !cut_by_path || waited < POLL_CUT_MIN || waited > hold + Duration::from_secs(1) {
        return None;
    }
    let shorter = Duration::from_secs((waited.as_secs() * 2 / 3).max(POLL_WAIT_MIN.as_secs()));
    (shorter < hold).then_some(shorter)
}

/// Poll shape, agent to station: a request whenever there is data, up to
/// [`PIPELINE`] in flight on connections of their own (the station
/// reorders what they carry).
async fn push_lane(ctx: &LaneCtx, backoff: &mut Backoff) -> Result<(), CarrierError> {
    let lane = ctx.tunnel.begin_lane(Lane::Sequenced);
    let answered = AtomicBool::new(false);
    let pushers =
        (0..PIPELINE).map(|n| Box::pin(pusher(ctx, &answered, lane, n)) as LaneFuture<'_>);
    let through = Through::start(&ctx.tunnel, Direction::Acked);
    pipelined(through, pushers.collect(), &answered, backoff).await
}

/// One push request after another, each as soon as the session has
/// packets. Pushers past the first let their connection and buffer go
/// when idle for [`EXTRA_IDLE`]: an idle agent keeps one connection.
async fn pusher(
    ctx: &LaneCtx,
    answered: &AtomicBool,
    lane: LaneToken,
    n: usize,
) -> Result<(), CarrierError> {
    if !ctx.shared.shape.in_depth(n, Instant::now()) {
        return future::pending().await;
    }
    let client = &ctx.shared.client;
    let mut conn = None;
    let mut reader = RecordReader::default();
    let mut scratch = Vec::new();
    let mut body = Vec::new();
    let path = client.path(&ctx.session, Verb::Push, None);
    // The station answers with what it has to send, as to a poll.
    let max_reply = (POLL_BODY_MAX + MAX_RECORD) as u64;
    loop {
        body.clear();
        let sealed = loop {
            let transmit =
                async { Some(ctx.tunnel.transmit(lane, &mut body, POLL_BODY_MAX).await) };
            let idle = async {
                smol::Timer::after(EXTRA_IDLE).await;
                None
            };
            let sealed = if n == 0 { transmit.await } else { future::or(transmit, idle).await };
            match sealed {
                Some(sealed) => break sealed,
                None => {
                    conn = None;
                    (reader, scratch, body) = Default::default();
                }
            }
        };
        if sealed.is_err() {
            return Ok(());
        }
        let mut deliver =
            |bytes: &[u8]| receive(&ctx.tunnel, bytes, &mut reader, &mut scratch).map(drop);
        let pushed =
            client.exchange(&mut conn, &path, &body, REPLY_TIMEOUT, max_reply, &mut deliver).await;
        if let Err(e) = pushed {
            ctx.lost.set();
            ctx.shared.shape.failed(n, &e, Instant::now());
            return Err(e);
        }
        answered.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::client::BACKOFF_FIRST;
    use crate::tunnel::testing::{carry, deliver, pair};

    const SEC: Duration = Duration::from_secs(1);

    fn refused_by(who: Who, status: u16) -> CarrierError {
        CarrierError::Status { who, status, reason: "No".into() }
    }

    #[test]
    fn a_box_refusing_extra_requests_lowers_the_depth_and_a_station_does_not() {
        let now = Instant::now();
        let shape = ShapeMemory::new(60 * SEC, 60 * SEC);
        assert!(shape.in_depth(PIPELINE - 1, now));
        assert!(!shape.in_depth(PIPELINE, now));
        // A restarting station refuses too, and a cut is no limit.
        shape.failed(3, &refused_by(Who::Station, 503), now);
        shape.failed(3, &CarrierError::Http(HttpError::UnexpectedEof), now);
        assert!(shape.in_depth(3, now));
        shape.failed(3, &refused_by(Who::Proxy, 429), now);
        assert!(shape.in_depth(2, now));
        assert!(!shape.in_depth(3, now));
        shape.failed(1, &refused_by(Who::InFront, 403), now);
        assert!(!shape.in_depth(1, now));
        // The first request failing is the path failing, not a limit.
        shape.failed(0, &refused_by(Who::Proxy, 503), now);
        assert!(shape.in_depth(0, now));
        assert!(shape.in_depth(PIPELINE - 1, now + 60 * SEC));
    }

    #[test]
    fn status_lines_say_the_shape_auto_is_on() {
        let now = Instant::now();
        let shape = ShapeMemory::new(60 * SEC, 60 * SEC);
        assert_eq!(shape.describe(CarrierKind::Auto), "auto (stream)");
        assert_eq!(shape.lanes(CarrierKind::Auto), "up + down");
        assert_eq!(shape.describe(CarrierKind::Poll), "poll");
        assert_eq!(shape.lanes(CarrierKind::Poll), "push + poll");
        lock(&shape.retry).fell_back(now);
        assert!(shape.on_poll());
        assert_eq!(shape.describe(CarrierKind::Auto), "auto (poll)");
        assert_eq!(shape.lanes(CarrierKind::Auto), "push + poll");
        assert_eq!(shape.describe(CarrierKind::Stream), "stream");
        assert_eq!(shape.lanes(CarrierKind::Stream), "up + down");
    }

    #[test]
    fn a_path_that_cuts_held_polls_gets_shorter_holds() {
        let hold = 60 * SEC;
        let gateway = refused_by(Who::InFront, 504);
        // A 30 s proxy timeout: two thirds of it from now on.
        assert_eq!(hold_after_cut(&gateway, 30 * SEC, hold), Some(20 * SEC));
        let cut = CarrierError::Http(HttpError::UnexpectedEof);
        assert_eq!(hold_after_cut(&cut, 45 * SEC, hold), Some(30 * SEC));
        // Never below the shortest hold, never longer than the hold.
        assert_eq!(hold_after_cut(&gateway, 2 * SEC, 30 * SEC), Some(POLL_WAIT_MIN));
        assert_eq!(hold_after_cut(&gateway, 2 * SEC, POLL_WAIT_MIN), None);
        // Failing at once is a failure, past the hold the station answered
        // late, and a refusal is no cut.
        assert_eq!(hold_after_cut(&gateway, SEC, hold), None);
        assert_eq!(hold_after_cut(&gateway, hold + 2 * SEC, hold), None);
        assert_eq!(hold_after_cut(&refused_by(Who::Proxy, 403), 30 * SEC, hold), None);
        assert_eq!(hold_after_cut(&CarrierError::SessionGone, 30 * SEC, hold), None);
    }

    #[test]
    fn extra_pollers_poll_while_replies_come_full_and_rest_at_the_first_short_one() {
        let polls = Polls::default();
        assert!(!polls.continues(false), "a lane's first poll starts the sending");
        assert!(polls.continues(false));
        assert!(!polls.continues(true), "a gap asks for a resend");
        let woken = polls.woken.listen();
        assert_eq!(polls.replied(0, BUSY_REPLY - 1), After::PollAgain);
        assert!(!polls.busy.load(Ordering::Relaxed));
        assert_eq!(polls.replied(0, BUSY_REPLY), After::PollAgain);
        assert!(polls.busy.load(Ordering::Relaxed));
        future::block_on(woken);
        assert_eq!(polls.replied(3, BUSY_REPLY), After::PollAgain);
        assert_eq!(polls.replied(3, 10), After::Rest);
        assert!(!polls.busy.load(Ordering::Relaxed));
        // The held poll never rests.
        assert_eq!(polls.replied(0, 0), After::PollAgain);
    }

    #[test]
    fn a_lost_push_answer_is_told_once() {
        let lost = LostReply::default();
        assert!(!lost.take());
        lost.set();
        future::block_on(lost.wait());
        assert!(lost.take());
        assert!(!lost.take());
    }

    #[test]
    fn a_lane_counts_what_got_through_its_own_direction() {
        let (agent, up, station, _opened) = pair();
        let down = station.begin_lane(Lane::Data);
        let received = Through::start(&agent, Direction::Received);
        let acked = Through::start(&agent, Direction::Acked);
        station.probe();
        assert!(matches!(carry(&station, down, &agent).1, Ok(n) if n > 0));
        assert!(received.moved());
        assert!(!acked.moved(), "the station's packets are no acknowledgement of ours");
        agent.open("s").expect("open");
        assert!(matches!(carry(&agent, up, &station).1, Ok(n) if n > 0));
        assert!(!acked.moved());
        let mut ack = Vec::new();
        station.seal_ack(&mut ack);
        assert!(matches!(deliver(&ack, &agent), Ok(n) if n > 0));
        assert!(acked.moved());
    }

    /// Requests that end at once, so no lane waits on anything.
    fn requests<'a>(results: Vec<Option<Result<(), CarrierError>>>) -> Vec<LaneFuture<'a>> {
        results
            .into_iter()
            .map(|result| {
                Box::pin(async move {
                    match result {
                        Some(result) => result,
                        None => future::pending().await,
                    }
                }) as LaneFuture<'a>
            })
            .collect()
    }

    /// Whether the backoff's next delay is a first one.
    fn starts_over(backoff: &mut Backoff) -> bool {
        backoff.delay() < BACKOFF_FIRST * 3 / 2
    }

    #[test]
    fn a_pipelined_lane_starts_its_backoff_over_only_if_it_got_through() {
        let (agent, _, _, _opened) = pair();
        let failed = || Some(Err(CarrierError::Http(HttpError::UnexpectedEof)));
        let run = |answered: bool, backoff: &mut Backoff| {
            let answered = AtomicBool::new(answered);
            let through = Through::start(&agent, Direction::Received);
            future::block_on(pipelined(through, requests(vec![None, failed()]), &answered, backoff))
        };
        let mut backoff = Backoff::new();
        for _ in 0..4 {
            backoff.delay();
        }
        let ended = run(false, &mut backoff);
        assert!(matches!(ended, Err(CarrierError::Http(HttpError::UnexpectedEof))));
        assert!(!starts_over(&mut backoff), "refused outright: the backoff grows on");
        let _ = run(true, &mut backoff);
        assert!(starts_over(&mut backoff), "answered before it failed: starts over");
    }
}
