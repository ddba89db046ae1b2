//! The carrier lanes of one session, and the supervisor that picks their
//! shape and watches the path.
//!
//! ```text
//!  carry ─ stream shape: down (chunked response) + up (chunked request) ─ watch every second
//!        │     path holds back bytes, or cuts lanes again and again ──▶ auto: poll from now on
//!        │     silent but proven path ──▶ rebuild the lanes
//!        └ poll shape:   poll (long-poll) + push (one request per batch) until the session ends
//! ```
//!
//! Lanes only move sealed records; the session below them resends whatever
//! a lost or rebuilt lane did not deliver, so switching shape loses nothing.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_lite::{future, AsyncWriteExt};

use super::client::{deadline, Backoff, CarrierError, Who, REPLY_TIMEOUT};
use super::Shared;
use crate::carrier::conn::HttpConn;
use crate::carrier::http::{BodyKind, HttpError, CHUNK_END};
use crate::carrier::link::Link;
use crate::carrier::{self, Verb, DOWN_BODY_MAX, POLL_BODY_MAX, STREAM_CHUNK};
use crate::config::CarrierKind;
use crate::core::session::Lane;
use crate::crypto::{RecordReader, SessionId, MAX_RECORD};
use crate::task::Scope;
use crate::tunnel::{LaneEnd, Tunnel};

/// How often the supervisor looks at the stream lanes: often while it
/// judges a new path (a first command waits for the verdict), then rarely
/// (an idle agent should sleep).
const JUDGING_TICK: Duration = Duration::from_millis(100);
const WATCH_TICK: Duration = Duration::from_secs(1);

/// How long a path may hold back what the stream lanes carry before it is
/// judged to buffer them. A streaming path delivers within a round trip;
/// 10 s leaves room for a congested cellular link.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The first judgement of a path comes sooner: within this many times
/// the hello's exchange (a new connection, a request and its answer, on
/// the same path), and [`FIRST_JUDGEMENT_MIN`] at least. Behind a box that
/// buffers, the first connection's bytes wait for it (issue 18: a user's
/// first command must not time out while auto decides).
const FIRST_JUDGEMENT_HELLOS: u32 = 4;
const FIRST_JUDGEMENT_MIN: Duration = Duration::from_millis(1500);

/// How long the stream lanes get to prove a path they have not proven
/// yet, given how long the hello took (if known).
fn first_judgement(hello: Option<Duration>) -> Duration {
    hello.map_or(PROBE_TIMEOUT, |took| {
        (took * FIRST_JUDGEMENT_HELLOS).clamp(FIRST_JUDGEMENT_MIN, PROBE_TIMEOUT)
    })
}

/// Stream lanes that lasted this long worked: the next rebuild starts its
/// backoff afresh.
const LANES_PROVEN: Duration = Duration::from_secs(60);

/// A path that cuts an established downlink this many times within
/// [`CUT_WINDOW`] is judged to cut long requests.
const CUTS_TO_FALL_BACK: usize = 3;
const CUT_WINDOW: Duration = Duration::from_secs(600);

/// Shortest hold asked of a poll request when the path cuts them.
const POLL_WAIT_MIN: Duration = Duration::from_secs(1);

/// A poll cut sooner than this after it was sent is a failure, not a sign
/// that the path has a shorter timeout than our hold.
const POLL_CUT_MIN: Duration = Duration::from_secs(2);

/// What the stream lanes of one lane set have seen of the path.
#[derive(Default)]
struct StreamWatch {
    down: Mutex<DownState>,
    /// When established lanes were cut by the path, and which (`uplink`,
    /// `downlink`), newest last.
    cuts: Mutex<VecDeque<(Instant, &'static str)>>,
    /// The path answered the uplink itself (the station never does while
    /// the body is open): its status line.
    refused: Mutex<Option<String>>,
}

#[derive(Default)]
struct DownState {
    /// The current downlink's request went out at this time. The station
    /// answers it at once with a head and a first record.
    asked: Option<Instant>,
    /// A record arrived on the current downlink.
    flowing: bool,
}

/// Why a stream lane set was taken down.
enum Verdict {
    Closed,
    /// The path holds back or cuts streamed bodies.
    PathBuffers(String),
    /// The lanes were proven but went silent.
    Dead(String),
}

/// Everything a lane needs.
#[derive(Clone)]
struct LaneCtx {
    shared: Arc<Shared>,
    tunnel: Arc<Tunnel>,
    session: SessionId,
}

/// The carrier shape of one agent, shared by its successive sessions.
pub(super) struct ShapeMemory {
    /// `auto` found that stream does not pass this path.
    fell_back: AtomicBool,
    /// What `auto` saw when it fell back, for `postern status`.
    why: Mutex<Option<String>>,
    /// Seconds a poll request may be held: `poll_hold`, shorter once a
    /// path cut held requests.
    poll_wait: AtomicU64,
    /// Milliseconds the last hello's exchange took; 0 before the first.
    hello_millis: AtomicU64,
}

impl ShapeMemory {
    pub(super) fn new(poll_hold: Duration) -> ShapeMemory {
        ShapeMemory {
            fell_back: AtomicBool::new(false),
            why: Mutex::new(None),
            hello_millis: AtomicU64::new(0),
            poll_wait: AtomicU64::new(poll_hold.as_secs().max(1)),
        }
    }

    /// The shape in use, for status lines.
    pub(super) fn describe(&self, configured: CarrierKind) -> &'static str {
        match configured {
            CarrierKind::Stream => "stream",
            CarrierKind::Poll => "poll",
            CarrierKind::Auto if self.fell_back.load(Ordering::Relaxed) => "auto (poll)",
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
        lock(&self.why).clone()
    }

    /// The lanes the shape in use runs.
    pub(super) fn lanes(&self, configured: CarrierKind) -> &'static str {
        match self.describe(configured) {
            "stream" | "auto (stream)" => "up + down",
            _ => "push + poll",
        }
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
    let ctx = LaneCtx { shared, tunnel, session };
    // Rebuilding stream lanes backs off too: a path that refuses them at
    // once must not make the agent knock every second.
    let mut backoff = Backoff::new();
    loop {
        let poll = match ctx.shared.carrier {
            CarrierKind::Poll => true,
            CarrierKind::Stream => false,
            CarrierKind::Auto => ctx.shared.shape.fell_back.load(Ordering::Relaxed),
        };
        if poll {
            let lanes = Scope::new();
            lanes.spawn(lane_loop(ctx.clone(), Verb::Poll, None));
            lane_loop(ctx.clone(), Verb::Push, None).await;
            return;
        }
        let started = Instant::now();
        let verdict = run_stream(&ctx).await;
        if started.elapsed() >= LANES_PROVEN {
            backoff.reset();
        }
        let delay = backoff.delay();
        match verdict {
            Verdict::Closed => return,
            Verdict::PathBuffers(what) if ctx.shared.carrier == CarrierKind::Auto => {
                log::warn!("carrier auto: {what}; switching to poll for as long as the agent runs");
                ctx.shared.record.error(format!("carrier auto: {what}"));
                *lock(&ctx.shared.shape.why) = Some(what.to_string());
                ctx.shared.shape.fell_back.store(true, Ordering::Relaxed);
                continue;
            }
            Verdict::PathBuffers(what) => {
                log::warn!(
                    "carrier stream: {what}; reconnecting in {:.1} s (carrier = \"auto\" or \"poll\" passes such paths)",
                    delay.as_secs_f32()
                );
                ctx.shared.record.error(format!("carrier stream: {what}"));
            }
            Verdict::Dead(what) => {
                log::warn!(
                    "stream lanes: {what}; reconnecting them in {:.1} s",
                    delay.as_secs_f32()
                );
                ctx.shared.record.error(format!("stream lanes: {what}"));
            }
        }
        smol::Timer::after(delay).await;
    }
}

/// Runs one set of stream lanes until the session closes or the path is
/// judged unfit.
async fn run_stream(ctx: &LaneCtx) -> Verdict {
    let watch = Arc::new(StreamWatch::default());
    let lanes = Scope::new();
    lanes.spawn(lane_loop(ctx.clone(), Verb::Down, Some(watch.clone())));
    lanes.spawn(lane_loop(ctx.clone(), Verb::Up, Some(watch.clone())));
    let acked_before = ctx.tunnel.acked();
    // A packet the station must acknowledge, sent now rather than with the
    // first user bytes, so the path is judged before anyone waits on it.
    ctx.tunnel.probe();
    let first = first_judgement(ctx.shared.shape.hello());
    // Whether the downlink has delivered in this set of lanes: until it
    // has, it gets the first judgement's time, then PROBE_TIMEOUT.
    let mut down_proven = false;
    let seconds = |limit: Duration| format!("{:.1} s", limit.as_secs_f32());
    loop {
        let judging = !down_proven || ctx.tunnel.acked() == acked_before;
        smol::Timer::after(if judging { JUDGING_TICK } else { WATCH_TICK }).await;
        if ctx.tunnel.closed().is_some() {
            return Verdict::Closed;
        }
        let now = Instant::now();
        if let Some(answer) = lock(&watch.refused).take() {
            return Verdict::PathBuffers(format!(
                "the path answered the streamed uplink with {answer}"
            ));
        }
        let (asked, flowing) = {
            let down = lock(&watch.down);
            (down.asked, down.flowing)
        };
        down_proven |= flowing;
        let down_limit = if down_proven { PROBE_TIMEOUT } else { first };
        if asked.is_some_and(|at| !flowing && now - at >= down_limit) {
            return Verdict::PathBuffers(format!(
                "nothing of the streamed downlink arrived within {} of asking for it (the path buffers responses)",
                seconds(down_limit)
            ));
        }
        // Until the station acknowledged something sent on this uplink, it
        // too has the first judgement's time.
        let up_proven = ctx.tunnel.acked() != acked_before;
        let up_limit = if up_proven { PROBE_TIMEOUT } else { first };
        let stalled = ctx.tunnel.stalled_since().is_some_and(|since| now - since >= up_limit);
        if stalled && flowing {
            if !up_proven {
                return Verdict::PathBuffers(format!(
                    "the station acknowledged nothing sent on the streamed uplink within {} (the path buffers request bodies)",
                    seconds(up_limit)
                ));
            }
            return Verdict::Dead(format!(
                "no acknowledgement from the station for {}",
                seconds(up_limit)
            ));
        }
        let mut cuts = lock(&watch.cuts);
        while cuts.front().is_some_and(|(at, _)| now - *at > CUT_WINDOW) {
            cuts.pop_front();
        }
        for lane in ["downlink", "uplink"] {
            let count = cuts.iter().filter(|(_, cut)| *cut == lane).count();
            if count >= CUTS_TO_FALL_BACK {
                return Verdict::PathBuffers(format!(
                    "the path cut the streamed {lane} {count} times within {} minutes",
                    CUT_WINDOW.as_secs() / 60
                ));
            }
        }
    }
}

/// Keeps one lane going, reconnecting with backoff, until the session ends.
async fn lane_loop(ctx: LaneCtx, verb: Verb, watch: Option<Arc<StreamWatch>>) {
    let mut backoff = Backoff::new();
    while ctx.tunnel.closed().is_none() {
        let result = match (verb, &watch) {
            (Verb::Down, Some(watch)) => down_lane(&ctx, watch, &mut backoff).await,
            (Verb::Up, Some(watch)) => up_lane(&ctx, watch).await,
            (Verb::Poll, _) => poll_lane(&ctx, &mut backoff).await,
            _ => push_lane(&ctx, &mut backoff).await,
        };
        match result {
            Err(CarrierError::SessionGone) => {
                ctx.tunnel.end(&CarrierError::SessionGone.to_string());
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
    watch: &StreamWatch,
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
    *lock(&watch.down) = DownState { asked: Some(Instant::now()), flowing: false };
    let ended = read_downlink(ctx, watch, backoff, &mut conn).await;
    let flowed = std::mem::take(&mut *lock(&watch.down)).flowing;
    if flowed && ctx.tunnel.closed().is_none() {
        lock(&watch.cuts).push_back((Instant::now(), "downlink"));
    }
    ended
}

/// Reads the downlink's reply into the session until it ends.
async fn read_downlink(
    ctx: &LaneCtx,
    watch: &StreamWatch,
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
            lock(&watch.down).flowing = true;
            backoff.reset();
        }
    }
    Ok(())
}

/// Stream shape, agent to station: one long chunked request. The station
/// answers only when the body ends, which we never do, so any answer (or
/// the connection closing) is the path cutting the lane.
async fn up_lane(ctx: &LaneCtx, watch: &StreamWatch) -> Result<(), CarrierError> {
    let client = &ctx.shared.client;
    let mut conn = client.connect().await?;
    let mut writer = conn.get_ref().clone();
    let mut out = Vec::with_capacity(STREAM_CHUNK + MAX_RECORD + 64);
    let path = client.path(&ctx.session, Verb::Up, None);
    client.head(&mut out, &path, BodyKind::Chunked);
    writer.write_all(&out).await.map_err(HttpError::Io)?;
    // A TLS link holds ciphertext until flushed (carrier/link.rs).
    writer.flush().await.map_err(HttpError::Io)?;
    let lane = ctx.tunnel.begin_lane(Lane::Data);
    // Whether a chunk went out: a lane cut after that is the path's doing
    // (a proxy that resets request bodies past a size, as squid's
    // request_body_max_size does), counted like a cut downlink.
    let sent_any = AtomicBool::new(false);
    let sending = async {
        loop {
            out.clear();
            // Room for a fixed-width size line, filled in once the size is known.
            out.extend_from_slice(b"00000000\r\n");
            match ctx.tunnel.transmit(lane, &mut out, STREAM_CHUNK).await {
                Ok(()) => {
                    let size = format!("{:08x}", out.len() - 10);
                    out[..8].copy_from_slice(size.as_bytes());
                    out.extend_from_slice(CHUNK_END);
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
            *lock(&watch.refused) = Some(format!("{} {}", head.status, head.reason));
        }
        Err(answer)
    };
    let ended = future::or(sending, answered).await;
    let gone = matches!(ended, Err(CarrierError::SessionGone));
    if ended.is_err() && !gone && sent_any.load(Ordering::Relaxed) && ctx.tunnel.closed().is_none()
    {
        lock(&watch.cuts).push_back((Instant::now(), "uplink"));
    }
    ended
}

/// Poll shape, station to agent: a long poll, again and again.
async fn poll_lane(ctx: &LaneCtx, backoff: &mut Backoff) -> Result<(), CarrierError> {
    let client = &ctx.shared.client;
    let mut conn = None;
    let mut reader = RecordReader::default();
    let mut scratch = Vec::new();
    let max_reply = (POLL_BODY_MAX + MAX_RECORD) as u64;
    while ctx.tunnel.closed().is_none() {
        let mut proof = Vec::new();
        ctx.tunnel.seal_ack(&mut proof);
        let hold = ctx.shared.shape.poll_wait();
        let path = client.path(&ctx.session, Verb::Poll, Some(&carrier::poll_query(hold)));
        let sent = Instant::now();
        let deliver =
            |bytes: &[u8]| receive(&ctx.tunnel, bytes, &mut reader, &mut scratch).map(drop);
        let exchanged = client
            .exchange(&mut conn, &path, &proof, hold + REPLY_TIMEOUT, max_reply, deliver)
            .await;
        if let Err(e) = exchanged {
            shorten_poll_hold(ctx, &e, sent.elapsed(), hold);
            return Err(e);
        }
        backoff.reset();
    }
    Ok(())
}

/// A path that cuts held requests (a proxy's or balancer's timeout shorter
/// than our hold) makes every poll fail; ask for shorter holds from now on.
fn shorten_poll_hold(ctx: &LaneCtx, error: &CarrierError, waited: Duration, hold: Duration) {
    let cut_by_path = match error {
        CarrierError::Status { status, .. } => matches!(status, 408 | 502 | 503 | 504),
        CarrierError::Http(e) => {
            matches!(e, HttpError::Timeout | HttpError::UnexpectedEof | HttpError::Io(_))
        }
        _ => false,
    };
    if !cut_by_path || waited < POLL_CUT_MIN || waited > hold + Duration::from_secs(1) {
        return;
    }
    let shorter = Duration::from_secs((waited.as_secs() * 2 / 3).max(POLL_WAIT_MIN.as_secs()));
    if shorter < hold {
        log::warn!(
            "a poll request was cut after {:.0} s ({error}); holding polls for {} s from now on",
            waited.as_secs_f32(),
            shorter.as_secs()
        );
        ctx.shared.shape.poll_wait.store(shorter.as_secs(), Ordering::Relaxed);
    }
}

/// Poll shape, agent to station: a request whenever there is data.
async fn push_lane(ctx: &LaneCtx, backoff: &mut Backoff) -> Result<(), CarrierError> {
    let client = &ctx.shared.client;
    let mut conn = None;
    let mut reader = RecordReader::default();
    let mut scratch = Vec::new();
    let mut body = Vec::with_capacity(POLL_BODY_MAX + MAX_RECORD);
    let path = client.path(&ctx.session, Verb::Push, None);
    loop {
        let lane = ctx.tunnel.begin_lane(Lane::Sequenced);
        body.clear();
        if ctx.tunnel.transmit(lane, &mut body, POLL_BODY_MAX).await.is_err() {
            return Ok(());
        }
        let deliver =
            |bytes: &[u8]| receive(&ctx.tunnel, bytes, &mut reader, &mut scratch).map(drop);
        client.exchange(&mut conn, &path, &body, REPLY_TIMEOUT, DOWN_BODY_MAX, deliver).await?;
        backoff.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_judgement_scales_with_the_hello() {
        let ms = Duration::from_millis;
        // Unknown path: the full time.
        assert_eq!(first_judgement(None), PROBE_TIMEOUT);
        // Loopback or a LAN: the floor, not a few milliseconds.
        assert_eq!(first_judgement(Some(ms(2))), FIRST_JUDGEMENT_MIN);
        // Cellular, a hello of 800 ms: four of them.
        assert_eq!(first_judgement(Some(ms(800))), ms(3200));
        // A path slower than that: never longer than before.
        assert_eq!(first_judgement(Some(ms(4000))), PROBE_TIMEOUT);
    }
}
