//! Reliable, ordered packet delivery across carrier connections that may be
//! cut at any byte.
//!
//! ```text
//!  streams ──frames──▶ new packet (seq n) ──▶ unacked queue ──▶ poll_transmit ──▶ carrier
//!                                              ▲ dropped when the peer's ack ≥ n
//!  carrier ──▶ handle_packet: ack → trim unacked; seq == expected → frames → streams
//! ```
//!
//! Every packet with frames gets a sequence number and stays in the unacked
//! queue until the peer acknowledges it. A carrier lane sends packets in
//! sequence order; when a lane starts afresh (a new connection, or a poll
//! carrier whose request failed) the driver calls
//! [`Session::restart_transmit`] and sending goes back to the first
//! unacknowledged packet. Several requests of one lane may be in flight at
//! once (the poll carrier pipelines them), each with its own run of
//! consecutive numbers, and they may arrive in any order: the receiver
//! holds packets that arrive ahead of a gap (up to [`AHEAD_MAX`] bytes,
//! more than a sender keeps unacknowledged) and hands them on in order once
//! the gap fills, dropping every number it has seen. Acks are cumulative,
//! so a request lost on the way shows as a gap that only a restart fills:
//! a driver restarts after every failed request, and asks its peer to when
//! a gap lasts ([`Session::gap_since`]). Exactly-once, in-order delivery.
//!
//! Sans I/O: time comes in as a parameter and nothing here touches a socket.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use super::frame::{self, encode_header, Frames, Header, MAX_HEADER, MAX_PACKET};
use super::rtt::Rtt;
use super::streams::{Event, Side, StreamViolation, Streams};
use super::timer::Timer;
use super::window::{Budget, MAX_STREAM_WINDOW};

/// Bytes of unacknowledged packets a sender keeps before it stops making new
/// ones: the resend memory per session and the data in flight. The peer's
/// credit bounds stream data in flight already (each stream's window, which
/// grows to at most [`MAX_STREAM_WINDOW`]); this bound sits just above one
/// full-grown window so a single stream is never held back by it.
pub const SESSION_WINDOW: usize = MAX_STREAM_WINDOW as usize + 2 * 1024 * 1024;

/// Bytes of packets a receiver holds ahead of a gap: above what a sender
/// keeps unacknowledged ([`SESSION_WINDOW`] and the packet that crossed
/// it), so a conforming peer never has one dropped. Each held packet
/// counts [`AHEAD_OVERHEAD`] bytes more than its frames, bounding the
/// count of tiny ones too.
pub const AHEAD_MAX: usize = SESSION_WINDOW + 2 * MAX_PACKET;
const AHEAD_OVERHEAD: usize = 64;

/// Received bytes after which an ack goes out at once rather than after
/// [`Limits::ack_delay`], so the sender's window keeps moving.
pub const ACK_EVERY_BYTES: usize = 256 * 1024;

/// Timing a session runs with, and the window room it may take.
#[derive(Debug, Clone)]
pub struct Limits {
    /// No authentic packet from the peer for this long ends the session.
    pub idle_timeout: Duration,
    /// Nothing sent for this long sends an empty packet, so middleboxes and
    /// the peer see the tunnel is alive.
    pub keepalive: Duration,
    /// How long a received packet may wait for its ack to ride on data.
    pub ack_delay: Duration,
    /// Room its streams' receive windows may grow into, shared with the
    /// other sessions of this process (see [`super::window`]).
    pub windows: Budget,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            idle_timeout: Duration::from_secs(300),
            keepalive: Duration::from_secs(15),
            ack_delay: Duration::from_millis(20),
            windows: Budget::unlimited(),
        }
    }
}

impl Limits {
    /// These limits for a session whose peer keeps it alive every
    /// `keepalive`: send at the same interval (the peer's owner chose what
    /// an idle link costs), and live at least two of them without a word.
    #[must_use]
    pub fn following(mut self, keepalive: Duration) -> Limits {
        self.keepalive = keepalive;
        self.idle_timeout = self.idle_timeout.max(keepalive * 2);
        self
    }
}

/// What an authenticated peer sent that the protocol forbids. The session
/// ends: the peer runs different or broken code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    #[error(transparent)]
    Decode(#[from] frame::DecodeError),
    #[error(transparent)]
    Stream(#[from] StreamViolation),
    /// Acknowledged a packet that was never sent.
    #[error("peer acknowledged packet {ack} but only {sent} were sent")]
    AckFromFuture { ack: u64, sent: u64 },
}

/// Why a session ended. The text is what logs say and, for an end at this
/// side, what the Close frame tells the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloseReason {
    /// Nothing authentic came from the peer for this long.
    #[error("no packet from the peer for {} s", .0.as_secs())]
    Silent(Duration),
    /// The peer closed it, saying why.
    #[error("peer closed the session: {0}")]
    ByPeer(String),
    /// The peer sent what the protocol forbids: it runs different or
    /// broken code.
    #[error("the peer broke the protocol: {0}")]
    PeerBroke(PeerError),
    /// Ended at this side.
    #[error(transparent)]
    Here(#[from] Ending),
}

/// Why this side ends a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Ending {
    #[error("the agent is stopping")]
    AgentStopping,
    #[error("the station is stopping")]
    StationStopping,
    /// The station stopped at once (no drain): its sessions end unannounced.
    #[error("station stopping")]
    StationStopped,
    #[error("the device started a new session")]
    NewSession,
    #[error("the key of its session was removed from the station's config")]
    KeyRemoved,
    #[error("the device was removed from the station's config")]
    DeviceRemoved,
    /// The station answered that it does not know the session.
    #[error("the station does not know this session (it restarted or timed it out)")]
    UnknownToStation,
}

/// Which packets a lane may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Resends, new packets with frames, and acks and keepalives when due.
    Data,
    /// Resends and new packets only: a poll-shape lane, where each request
    /// costs a round trip and acks ride on the requests going the other way.
    Sequenced,
}

#[derive(Debug)]
struct Unacked {
    seq: u64,
    frames: Vec<u8>,
    /// When it was first sent, for a round-trip sample from its ack.
    sent_at: Instant,
    /// Sent more than once: its ack gives no sample.
    resent: bool,
    /// Sent with nothing else in flight: its round trip holds no queueing
    /// behind our own packets, which is what a path's delay is judged by.
    alone: bool,
}

/// One end of a session: streams plus reliable delivery.
#[derive(Debug)]
pub struct Session {
    streams: Streams,
    limits: Limits,
    /// Sequence number the next new packet gets; starts at 1, 0 means ack-only.
    next_seq: u64,
    unacked: VecDeque<Unacked>,
    unacked_bytes: usize,
    /// Next sequence number the current lane sends.
    send_cursor: u64,
    /// Next sequence number expected from the peer.
    recv_next: u64,
    /// Frames of packets that arrived past a gap, by sequence number.
    ahead: BTreeMap<u64, Vec<u8>>,
    /// What `ahead` holds, with [`AHEAD_OVERHEAD`] per packet.
    ahead_bytes: usize,
    /// Since when packets have waited past a gap with no progress.
    gap_since: Option<Instant>,
    /// Bytes received since the last ack went out.
    unacked_received: usize,
    ack_due: Option<Instant>,
    last_sent: Instant,
    /// An ack or keepalive deadline passed and `handle_timeout` saw it: the
    /// next transmit sends one. Kept apart from the deadlines so that
    /// `poll_timeout` never reports a deadline already handled (a driver
    /// would wake again at once, forever, while its carrier is busy).
    ack_pending: bool,
    keepalive_pending: bool,
    /// Since when the peer has acknowledged nothing new while packets wait
    /// for an ack; `None` when nothing waits. A driver reads it through
    /// [`Session::stalled_since`] to tell a dead or buffering carrier.
    waiting_since: Option<Instant>,
    /// Send a sequenced packet even with no frames, so the peer's ack
    /// proves the path carries packets both ways.
    probe_wanted: bool,
    /// Highest sequence number sent so far, to tell resends from first sends.
    highest_sent: u64,
    /// Packets sent more than once.
    resent: u64,
    last_received: Instant,
    rtt: Rtt,
    closed: bool,
    /// Frames buffers of acknowledged packets, reused for new ones.
    spare: Vec<Vec<u8>>,
}

impl Session {
    pub fn new(side: Side, now: Instant, limits: Limits) -> Self {
        Session {
            streams: Streams::new(side, limits.windows.clone()),
            limits,
            next_seq: 1,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            send_cursor: 1,
            recv_next: 1,
            ahead: BTreeMap::new(),
            ahead_bytes: 0,
            gap_since: None,
            unacked_received: 0,
            ack_due: None,
            last_sent: now,
            ack_pending: false,
            keepalive_pending: false,
            waiting_since: None,
            probe_wanted: false,
            highest_sent: 0,
            resent: 0,
            last_received: now,
            rtt: Rtt::default(),
            closed: false,
            spare: Vec::new(),
        }
    }

    /// The stream layer: open, read, write, finish, reset streams.
    pub fn streams(&mut self) -> &mut Streams {
        &mut self.streams
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Bytes held for resending.
    pub fn unacked_bytes(&self) -> usize {
        self.unacked_bytes
    }

    /// Feeds one authentic, decrypted packet from the peer.
    pub fn handle_packet(&mut self, now: Instant, packet: &[u8]) -> Result<(), PeerError> {
        if self.closed {
            return Ok(());
        }
        let (header, frames) = frame::decode_header(packet)?;
        self.last_received = now;
        self.handle_ack(now, header.ack)?;
        if header.seq == 0 {
            return Ok(());
        }
        if header.seq < self.recv_next || self.ahead.contains_key(&header.seq) {
            // Sent again after a carrier loss: ack at once so the peer
            // stops resending it.
            self.ack_due = Some(now);
            return Ok(());
        }
        if header.seq > self.recv_next {
            self.hold_ahead(now, header.seq, frames);
            return Ok(());
        }
        self.deliver(frames)?;
        let mut received = packet.len();
        while !self.closed {
            let Some(frames) = self.ahead.remove(&self.recv_next) else { break };
            self.ahead_bytes -= frames.len() + AHEAD_OVERHEAD;
            received += frames.len();
            let delivered = self.deliver(&frames);
            self.recycle(frames);
            delivered?;
        }
        self.gap_since = (!self.ahead.is_empty()).then_some(now);
        self.unacked_received += received;
        let delay = if self.unacked_received >= ACK_EVERY_BYTES {
            Duration::ZERO
        } else {
            self.limits.ack_delay
        };
        let due = now + delay;
        self.ack_due = Some(self.ack_due.map_or(due, |d| d.min(due)));
        Ok(())
    }

    /// Hands the frames of packet `recv_next` to the streams.
    fn deliver(&mut self, frames: &[u8]) -> Result<(), PeerError> {
        self.recv_next += 1;
        for frame in Frames::new(frames) {
            self.streams.handle_frame(frame?)?;
        }
        if self.streams.peer_closed() {
            self.closed = true;
        }
        Ok(())
    }

    /// Keeps a packet that arrived past a gap, if there is room. One that
    /// does not fit is dropped unseen: a sender past its own bound (see
    /// [`AHEAD_MAX`]) sends it again after a restart.
    fn hold_ahead(&mut self, now: Instant, seq: u64, frames: &[u8]) {
        let cost = frames.len() + AHEAD_OVERHEAD;
        if self.ahead_bytes + cost > AHEAD_MAX {
            return;
        }
        let mut held = self.spare.pop().unwrap_or_default();
        held.clear();
        held.extend_from_slice(frames);
        self.ahead.insert(seq, held);
        self.ahead_bytes += cost;
        self.gap_since.get_or_insert(now);
    }

    /// Since when packets have waited past a gap in the peer's sequence
    /// with none filling it, if any wait: a request lost on the way, which
    /// only the peer's restart from its first unacknowledged packet fills.
    #[must_use]
    pub fn gap_since(&self) -> Option<Instant> {
        self.gap_since
    }

    fn handle_ack(&mut self, now: Instant, ack: u64) -> Result<(), PeerError> {
        if ack >= self.next_seq {
            return Err(PeerError::AckFromFuture { ack, sent: self.next_seq - 1 });
        }
        let mut progress = false;
        let mut newest = None;
        while self.unacked.front().is_some_and(|p| p.seq <= ack) {
            let done = self.unacked.pop_front().expect("front exists");
            self.unacked_bytes -= done.frames.len();
            newest = Some((done.sent_at, done.resent, done.alone));
            self.recycle(done.frames);
            progress = true;
        }
        if let Some((sent_at, false, alone)) = newest {
            self.rtt.sample(now.saturating_duration_since(sent_at), alone);
        }
        if self.unacked.is_empty() {
            self.waiting_since = None;
        } else if progress {
            self.waiting_since = Some(now);
        }
        self.send_cursor = self.send_cursor.max(self.first_unacked());
        Ok(())
    }

    fn recycle(&mut self, mut frames: Vec<u8>) {
        // Keep a few full-size buffers so a busy stream allocates nothing per packet.
        if self.spare.len() < 8 && frames.capacity() >= MAX_PACKET / 2 {
            frames.clear();
            self.spare.push(frames);
        }
    }

    fn first_unacked(&self) -> u64 {
        self.unacked.front().map_or(self.next_seq, |p| p.seq)
    }

    /// Since when packets have waited for an ack with no progress, if any do.
    /// A path that buffers or has died shows as a time that grows old.
    #[must_use]
    pub fn stalled_since(&self) -> Option<Instant> {
        self.waiting_since
    }

    /// When the last authentic packet from the peer arrived (the start,
    /// before any).
    #[must_use]
    pub fn last_received(&self) -> Instant {
        self.last_received
    }

    /// The timing and room this session runs with.
    #[must_use]
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The path's round trip as the acks show it.
    #[must_use]
    pub fn rtt(&self) -> &Rtt {
        &self.rtt
    }

    /// The round trip estimate, to start a new span of its samples.
    pub fn rtt_mut(&mut self) -> &mut Rtt {
        &mut self.rtt
    }

    /// Packets sent again because a carrier lane restarted before their ack.
    #[must_use]
    pub fn resent_packets(&self) -> u64 {
        self.resent
    }

    /// How many of our packets the peer has acknowledged (acks are cumulative).
    #[must_use]
    pub fn acked(&self) -> u64 {
        self.first_unacked() - 1
    }

    /// Makes the next transmit send a sequenced packet even if no stream
    /// has anything to say: its ack shows the path works both ways.
    pub fn probe(&mut self) {
        self.probe_wanted = true;
    }

    /// A new carrier lane starts: send again from the first unacknowledged packet.
    pub fn restart_transmit(&mut self) {
        self.send_cursor = self.first_unacked();
    }

    /// Writes the next packet's plaintext into `out` (cleared first).
    /// Returns false when there is nothing to send now.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant, lane: Lane, out: &mut Vec<u8>) -> bool {
        out.clear();
        if self.closed {
            return false;
        }
        {
            if self.send_cursor < self.next_seq {
                let index = usize::try_from(self.send_cursor - self.first_unacked())
                    .expect("cursor lies within the unacked queue");
                let packet = &mut self.unacked[index];
                let seq = packet.seq;
                if seq <= self.highest_sent {
                    self.resent += 1;
                    packet.resent = true;
                }
                self.highest_sent = self.highest_sent.max(seq);
                encode_header(&Header { seq, ack: self.recv_next - 1 }, out);
                out.extend_from_slice(&packet.frames);
                self.send_cursor += 1;
                self.sent(now);
                return true;
            }
            let probe = std::mem::take(&mut self.probe_wanted);
            if self.unacked_bytes < SESSION_WINDOW && (probe || self.streams.has_output()) {
                let mut frames = self.spare.pop().unwrap_or_default();
                self.streams.fill(&mut frames, MAX_PACKET - MAX_HEADER, now, self.rtt.smoothed());
                if probe || !frames.is_empty() {
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    self.highest_sent = seq;
                    encode_header(&Header { seq, ack: self.recv_next - 1 }, out);
                    out.extend_from_slice(&frames);
                    self.unacked_bytes += frames.len();
                    let alone = self.unacked.is_empty();
                    self.unacked.push_back(Unacked {
                        seq,
                        frames,
                        sent_at: now,
                        resent: false,
                        alone,
                    });
                    self.waiting_since.get_or_insert(now);
                    self.send_cursor = self.next_seq;
                    self.sent(now);
                    return true;
                }
                self.spare.push(frames);
            }
        }
        if lane == Lane::Sequenced {
            return false;
        }
        let ack_wanted = self.ack_pending || self.ack_due.is_some_and(|due| due <= now);
        let keepalive_wanted =
            self.keepalive_pending || now >= self.last_sent + self.limits.keepalive;
        if ack_wanted || keepalive_wanted {
            self.write_ack(now, out);
            return true;
        }
        false
    }

    /// Writes an ack-only packet into `out` (cleared first), whether or not
    /// one is due: poll requests carry one to prove who sent them.
    pub fn write_ack(&mut self, now: Instant, out: &mut Vec<u8>) {
        out.clear();
        encode_header(&Header { seq: 0, ack: self.recv_next - 1 }, out);
        self.sent(now);
    }

    fn sent(&mut self, now: Instant) {
        self.last_sent = now;
        self.ack_due = None;
        self.ack_pending = false;
        self.keepalive_pending = false;
        self.unacked_received = 0;
    }

    /// The earliest time [`Session::handle_timeout`] or
    /// [`Session::poll_transmit`] has something to do.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed {
            return None;
        }
        Timer::ALL.iter().filter_map(|t| self.deadline(*t)).min()
    }

    fn deadline(&self, timer: Timer) -> Option<Instant> {
        match timer {
            Timer::Ack => self.ack_due,
            Timer::Keepalive => {
                (!self.keepalive_pending).then(|| self.last_sent + self.limits.keepalive)
            }
            Timer::Idle => Some(self.last_received + self.limits.idle_timeout),
        }
    }

    /// Expires timers. Harmless if called early or twice.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closed {
            return;
        }
        if self.deadline(Timer::Idle).is_some_and(|t| t <= now) {
            self.end(CloseReason::Silent(self.limits.idle_timeout));
            return;
        }
        // Ack and keepalive deadlines are served by the next poll_transmit;
        // here they only stop being deadlines.
        if self.ack_due.is_some_and(|due| due <= now) {
            self.ack_due = None;
            self.ack_pending = true;
        }
        if self.deadline(Timer::Keepalive).is_some_and(|due| due <= now) {
            self.keepalive_pending = true;
        }
    }

    /// Ends the session here and queues a Close frame for the peer.
    pub fn close(&mut self, reason: Ending) {
        if !self.closed {
            self.streams.close(&reason.to_string());
        }
    }

    /// Ends the session at once, without telling the peer.
    pub fn end(&mut self, reason: CloseReason) {
        if !self.closed {
            self.closed = true;
            self.streams.clear(reason);
        }
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.streams.poll_event()
    }
}
