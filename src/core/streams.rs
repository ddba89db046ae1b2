//! Many byte streams multiplexed over one session, with per-stream credit.
//!
//! Each stream has a bounded send buffer (filled by the local socket, drained
//! into packets) and a bounded receive buffer (filled from packets, drained by
//! the local socket). A sender may only send bytes the receiver has granted
//! credit for, so a stream whose reader is slow fills its own window and
//! stops, while every other stream keeps moving. Memory per stream is at most
//! [`SEND_BUFFER`] + its receive window whatever the peer does; windows grow
//! with the path within the budgets [`super::window`] describes.
//!
//! This module does no I/O and reads no clock: the session passes the time
//! and the round trip in. The session layer below it makes delivery of
//! frames reliable and ordered, so nothing here resends.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

pub use super::frame::StreamId;
use super::frame::{self, encode_frame, Frame, FRAME_OVERHEAD, MAX_NAME, MAX_REASON};
use super::ring::Ring;
use super::session::CloseReason;
pub use super::window::STREAM_WINDOW;
use super::window::{self, Budget, Change, MAX_STREAM_WINDOW, SESSION_BUDGET};

/// Bytes a stream buffers from its local socket before the socket waits, to
/// begin with: two full packets, so a packet can be filled while the socket
/// refills.
pub const SEND_BUFFER: usize = 128 * 1024;

/// The most a stream's send buffer grows to while the peer's credit is
/// larger than it. A poll-shape carrier sends one push per round trip with
/// what the buffer holds then, so the buffer, not the credit, would cap it
/// at 128 KiB per round trip; 1 MiB covers two of its largest pushes.
/// Growth is room from the same budgets as the receive windows.
pub const MAX_SEND_BUFFER: usize = 1024 * 1024;

/// Bytes moved between two waits of a driver below which a stream is
/// carrying messages, and lets its small buffers go while it waits
/// ([`Streams::waits`]).
pub const SMALL_BURST: usize = 4 * 1024;

/// One of a stream's two buffers, as the driver sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buffer {
    /// Filled from the local socket, drained into packets: waits when the
    /// local socket has nothing to read.
    Send,
    /// Filled from the peer, drained into the local socket: waits when
    /// nothing has come from the peer.
    Receive,
}

/// Concurrent streams per session, each side counted together. Bounds the
/// memory a peer can pin to about `MAX_STREAMS * (SEND_BUFFER + STREAM_WINDOW)`
/// plus the session's window budget.
pub const MAX_STREAMS: usize = 256;

/// Which end of the session this is; decides stream id parity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Agent,
    Station,
}

/// Something the driver must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The peer opened stream `id` to the named target or service.
    Opened { id: StreamId, name: String },
    /// Bytes or end-of-stream can be read from `id`.
    Readable(StreamId),
    /// Space freed in the send buffer of `id`.
    Writable(StreamId),
    /// Stream `id` is gone; reading and writing it fail from now on.
    Reset { id: StreamId, reason: String },
    /// The session ended; every stream is gone.
    Closed { reason: CloseReason },
}

/// A stream operation the local side asked for could not be done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The stream was reset or closed (by either side) or never existed.
    #[error("stream {0} is closed")]
    Closed(StreamId),
    /// [`MAX_STREAMS`] streams are open already.
    #[error("too many streams open (limit {MAX_STREAMS})")]
    TooMany,
    /// The name is empty or longer than the wire format allows.
    #[error("stream name must be 1 to {MAX_NAME} bytes")]
    BadName,
}

/// What the authenticated peer did that its protocol forbids.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamViolation {
    /// Opened a stream with our parity, or an id it used before.
    #[error("peer opened stream {0} with an id it may not use")]
    BadId(StreamId),
    /// Sent more than the credit we granted.
    #[error("peer overran the flow-control window of stream {0}")]
    Overrun(StreamId),
    /// Opened a stream past [`MAX_STREAMS`] while [`MAX_STREAMS`] refusals
    /// were still waiting to be sent. A peer that counts its streams cannot:
    /// each one we refused still counts at its end until our reset arrives.
    #[error("peer kept opening streams past the limit of {MAX_STREAMS}")]
    TooManyStreams,
}

/// What [`Streams::received`] found: bytes to take without a copy, the
/// end of the stream, or nothing yet.
#[derive(Debug, PartialEq, Eq)]
pub enum Received<'a> {
    /// The received bytes, oldest first, in one or two slices (the second
    /// may be empty); [`Streams::consume`] says how many were taken.
    Data(&'a [u8], &'a [u8]),
    /// The peer finished sending; nothing more will come.
    Fin,
    /// Nothing yet; an [`Event::Readable`] follows when something arrives.
    Blocked,
}

/// What a read from a stream gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// `n` bytes were copied into the buffer.
    Data(usize),
    /// The peer finished sending; nothing more will come.
    Fin,
    /// Nothing yet; an [`Event::Readable`] follows when something arrives.
    Blocked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finish {
    Open,
    Queued,
    Sent,
}

#[derive(Debug)]
struct Stream {
    /// At most `send_limit` bytes.
    send_buf: Ring,
    /// [`SEND_BUFFER`], grown toward the peer's credit up to [`MAX_SEND_BUFFER`].
    send_limit: usize,
    /// Bytes of this stream put into packets so far.
    sent: u64,
    /// Total offset the peer lets us send up to.
    peer_limit: u64,
    finish: Finish,
    writable_wanted: bool,
    /// At most `granted - consumed` bytes: the peer may not send past the
    /// credit, and credit is never more than a window past `consumed`.
    recv_buf: Ring,
    /// Bytes of this stream taken by the local socket so far.
    consumed: u64,
    /// Total offset we let the peer send up to.
    granted: u64,
    /// How far past `consumed` the next grant reaches; the room it takes
    /// past [`STREAM_WINDOW`] is on loan from the budgets.
    window: u64,
    /// When the current epoch began and what `consumed` was then: the
    /// window is judged once the reader has taken a window since.
    epoch: Option<(Instant, u64)>,
    /// When credit last went out: a stream quiet for long gives room back.
    last_grant: Option<Instant>,
    credit_due: bool,
    peer_fin: bool,
    fin_delivered: bool,
    readable_wanted: bool,
    /// In the ready queue already.
    queued: bool,
}

impl Stream {
    fn new() -> Self {
        Stream {
            send_buf: Ring::new(SEND_BUFFER),
            send_limit: SEND_BUFFER,
            sent: 0,
            peer_limit: STREAM_WINDOW,
            finish: Finish::Open,
            writable_wanted: false,
            recv_buf: Ring::new(STREAM_WINDOW as usize),
            consumed: 0,
            granted: STREAM_WINDOW,
            window: STREAM_WINDOW,
            epoch: None,
            last_grant: None,
            credit_due: false,
            peer_fin: false,
            fin_delivered: false,
            // The driver learns of the first bytes through an event.
            readable_wanted: true,
            queued: false,
        }
    }

    fn has_output(&self) -> bool {
        self.credit_due
            || (!self.send_buf.is_empty() && self.sent < self.peer_limit)
            || (self.finish == Finish::Queued && self.send_buf.is_empty())
    }

    fn is_done(&self) -> bool {
        self.finish == Finish::Sent && self.fin_delivered
    }

    /// Room this stream holds past [`STREAM_WINDOW`] and [`SEND_BUFFER`].
    fn loan(&self) -> u64 {
        self.window_loan() + (self.send_limit - SEND_BUFFER) as u64
    }

    /// Room its receive window holds past [`STREAM_WINDOW`].
    fn window_loan(&self) -> u64 {
        self.window - STREAM_WINDOW
    }

    /// Sets the window; the receive buffer follows it, and always has
    /// room for every byte already granted.
    fn resize(&mut self, window: u64) {
        self.window = window;
        let outstanding = self.granted - self.consumed;
        let limit = window.max(outstanding);
        self.recv_buf.set_limit(usize::try_from(limit).unwrap_or(usize::MAX));
    }
}

/// A frame waiting to be sent that does not belong to a live stream's turn.
/// `Refuse` is a peer's open refused for the stream limit.
#[derive(Debug)]
enum Control {
    Open { id: StreamId, name: String },
    Reset { id: StreamId, reason: String },
    Refuse { id: StreamId },
    Close { reason: String },
}

/// The stream layer of one session.
#[derive(Debug)]
pub struct Streams {
    side: Side,
    streams: BTreeMap<StreamId, Stream>,
    next_local_id: StreamId,
    /// Highest id the peer has opened; ids only grow, so a reopened id is a violation.
    peer_id_floor: StreamId,
    /// Streams with something to send, served round-robin so none starves.
    ready: VecDeque<StreamId>,
    control: VecDeque<Control>,
    /// `Refuse` entries in `control`; at most MAX_STREAMS, so a peer that
    /// ignores the limit cannot grow the queue (and our memory) without end.
    refusals: usize,
    /// Streams the peer opened past [`MAX_STREAMS`] and had refused, ever:
    /// for the station's metrics.
    refused_total: u64,
    events: VecDeque<Event>,
    peer_closed: bool,
    /// Shared window room, and what is left of this session's.
    budget: Budget,
    session_room: u64,
}

impl Streams {
    /// Streams whose windows grow within `budget`, shared with other sessions.
    pub fn new(side: Side, budget: Budget) -> Self {
        Streams {
            side,
            streams: BTreeMap::new(),
            next_local_id: match side {
                Side::Agent => 1,
                Side::Station => 2,
            },
            peer_id_floor: 0,
            ready: VecDeque::new(),
            control: VecDeque::new(),
            refusals: 0,
            refused_total: 0,
            events: VecDeque::new(),
            peer_closed: false,
            budget,
            session_room: SESSION_BUDGET,
        }
    }

    /// Number of streams open now.
    pub fn len(&self) -> usize {
        self.streams.len()
    }

    /// Whether stream `id` is still open in either direction.
    pub fn contains(&self, id: StreamId) -> bool {
        self.streams.contains_key(&id)
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// Opens a stream to the peer's target or service `name`.
    pub fn open(&mut self, name: &str) -> Result<StreamId, StreamError> {
        if name.is_empty() || name.len() > MAX_NAME {
            return Err(StreamError::BadName);
        }
        if self.streams.len() >= MAX_STREAMS {
            return Err(StreamError::TooMany);
        }
        let id = self.next_local_id;
        // 2^31 streams per session; a session that lives that long is ended
        // by the caller, which treats TooMany as "open a new session".
        self.next_local_id = id.checked_add(2).ok_or(StreamError::TooMany)?;
        self.streams.insert(id, Stream::new());
        self.control.push_back(Control::Open { id, name: name.to_owned() });
        Ok(id)
    }

    /// The receive window of `id` now: how far past what the local reader
    /// took the peer may send.
    pub fn window(&self, id: StreamId) -> Option<u64> {
        self.streams.get(&id).map(|s| s.window)
    }

    /// Received bytes of `id` waiting for the local reader.
    pub fn buffered(&self, id: StreamId) -> Option<usize> {
        self.streams.get(&id).map(|s| s.recv_buf.len())
    }

    /// Copies as much of `bytes` as the send buffer takes; 0 means full, and
    /// an [`Event::Writable`] follows when space frees.
    pub fn write(&mut self, id: StreamId, bytes: &[u8]) -> Result<usize, StreamError> {
        let stream = self.streams.get_mut(&id).ok_or(StreamError::Closed(id))?;
        if stream.finish != Finish::Open {
            return Err(StreamError::Closed(id));
        }
        let n = stream.send_buf.push(bytes);
        if n < bytes.len() {
            stream.writable_wanted = true;
        }
        self.mark_ready(id);
        Ok(n)
    }

    /// Free space in the send buffer of `id`, at most `max` bytes in one or
    /// two slices, for a driver to read its socket straight into; then
    /// [`Streams::commit_send`] with the bytes it put there. Both slices
    /// are empty when the buffer is full, and an [`Event::Writable`]
    /// follows when space frees.
    pub fn send_space(
        &mut self,
        id: StreamId,
        max: usize,
    ) -> Result<(&mut [u8], &mut [u8]), StreamError> {
        let stream = self.streams.get_mut(&id).ok_or(StreamError::Closed(id))?;
        if stream.finish != Finish::Open {
            return Err(StreamError::Closed(id));
        }
        if stream.send_buf.room() == 0 {
            stream.writable_wanted = true;
        }
        Ok(stream.send_buf.free_mut(max))
    }

    /// The driver waits on stream `id`'s `buffer` after moving `moved`
    /// bytes through it since its last wait. Less than [`SMALL_BURST`] is
    /// a message, not a bulk transfer: the buffer is let go once it drains
    /// (an open stream that idles between messages holds none), while a
    /// busy one keeps it rather than reallocate at every wait.
    pub fn waits(&mut self, id: StreamId, buffer: Buffer, moved: usize) {
        if moved >= SMALL_BURST {
            return;
        }
        if let Some(stream) = self.streams.get_mut(&id) {
            match buffer {
                Buffer::Send => stream.send_buf.release_when_drained(),
                Buffer::Receive => stream.recv_buf.release_when_drained(),
            }
        }
    }

    /// Bytes allocated for stream `id`'s send and receive buffers.
    #[cfg(test)]
    pub fn allocated(&self, id: StreamId) -> (usize, usize) {
        self.streams.get(&id).map_or((0, 0), |s| (s.send_buf.allocated(), s.recv_buf.allocated()))
    }

    /// The first `n` bytes of what [`Streams::send_space`] gave were filled.
    pub fn commit_send(&mut self, id: StreamId, n: usize) -> Result<(), StreamError> {
        let stream = self.streams.get_mut(&id).ok_or(StreamError::Closed(id))?;
        stream.send_buf.commit(n);
        self.mark_ready(id);
        Ok(())
    }

    /// The local socket sent its last byte (half-close).
    pub fn finish(&mut self, id: StreamId) -> Result<(), StreamError> {
        let stream = self.streams.get_mut(&id).ok_or(StreamError::Closed(id))?;
        if stream.finish == Finish::Open {
            stream.finish = Finish::Queued;
            self.mark_ready(id);
        }
        Ok(())
    }

    /// Copies received bytes into `buf`.
    pub fn read(&mut self, id: StreamId, buf: &mut [u8]) -> Result<Read, StreamError> {
        let stream = self.streams.get_mut(&id).ok_or(StreamError::Closed(id))?;
        if !stream.recv_buf.is_empty() {
            let n = stream.recv_buf.pop_into(buf);
            self.consumed(id, n);
            return Ok(Read::Data(n));
        }
        Ok(match self.received(id)? {
            Received::Data(..) => unreachable!("the receive buffer is empty"),
            Received::Fin => Read::Fin,
            Received::Blocked => Read::Blocked,
        })
    }

    /// The received bytes of `id` in place, for a driver to write to its
    /// socket without a copy; then [`Streams::consume`] with how many it
    /// took. Like [`Streams::read`], reporting `Fin` ends this direction.
    pub fn received(&mut self, id: StreamId) -> Result<Received<'_>, StreamError> {
        let stream = self.streams.get_mut(&id).ok_or(StreamError::Closed(id))?;
        if stream.recv_buf.is_empty() {
            if stream.peer_fin {
                stream.fin_delivered = true;
                self.remove_if_done(id);
                return Ok(Received::Fin);
            }
            stream.readable_wanted = true;
            return Ok(Received::Blocked);
        }
        let stream = self.streams.get(&id).expect("looked up above");
        let (first, second) = stream.recv_buf.as_slices();
        Ok(Received::Data(first, second))
    }

    /// The local socket took the `n` oldest received bytes of `id`.
    pub fn consume(&mut self, id: StreamId, n: usize) -> Result<(), StreamError> {
        let stream = self.streams.get_mut(&id).ok_or(StreamError::Closed(id))?;
        stream.recv_buf.consume(n);
        self.consumed(id, n);
        Ok(())
    }

    /// Accounts for `n` bytes the local socket took from stream `id`.
    fn consumed(&mut self, id: StreamId, n: usize) {
        let Some(stream) = self.streams.get_mut(&id) else { return };
        stream.consumed += n as u64;
        // The grant itself is sized when it is sent, where the time is known.
        if window::credit_due(stream.granted - stream.consumed, stream.window) && !stream.peer_fin {
            stream.credit_due = true;
            self.mark_ready(id);
        }
    }

    /// Ends the stream on both sides at once; `reason` reaches the peer's log.
    pub fn reset(&mut self, id: StreamId, reason: &str) {
        if self.remove(id) {
            let reason = frame::truncate(reason, MAX_REASON).to_owned();
            self.control.push_back(Control::Reset { id, reason });
        }
    }

    /// Queues the frame that ends the session at the peer.
    pub fn close(&mut self, reason: &str) {
        let reason = frame::truncate(reason, MAX_REASON).to_owned();
        self.control.push_back(Control::Close { reason });
    }

    /// Drops every stream (the session ended) and tells the driver.
    pub fn clear(&mut self, reason: CloseReason) {
        let loans: u64 = self.streams.values().map(Stream::loan).sum();
        self.repay(loans);
        self.streams.clear();
        self.ready.clear();
        self.control.clear();
        self.refusals = 0;
        self.events.push_back(Event::Closed { reason });
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The peer sent a Close frame.
    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// Whether [`Streams::fill`] would write anything.
    pub fn has_output(&self) -> bool {
        !self.control.is_empty() || !self.ready.is_empty()
    }

    /// Applies one frame from the peer.
    pub fn handle_frame(&mut self, frame: Frame<'_>) -> Result<(), StreamViolation> {
        match frame {
            Frame::Open { id, name } => self.peer_open(id, name)?,
            Frame::Data { id, bytes } => {
                let Some(stream) = self.streams.get_mut(&id) else {
                    // Reset here while the bytes were on their way.
                    return Ok(());
                };
                let end = stream.consumed + (stream.recv_buf.len() + bytes.len()) as u64;
                if end > stream.granted {
                    self.reset(id, "flow-control window overrun");
                    return Err(StreamViolation::Overrun(id));
                }
                let taken = stream.recv_buf.push(bytes);
                debug_assert_eq!(taken, bytes.len(), "credit keeps the bytes within the window");
                self.wake_reader(id);
            }
            Frame::Fin { id } => {
                if let Some(stream) = self.streams.get_mut(&id) {
                    stream.peer_fin = true;
                    stream.credit_due = false;
                    self.wake_reader(id);
                }
            }
            Frame::Reset { id, reason } => {
                if self.remove(id) {
                    self.events.push_back(Event::Reset { id, reason: reason.to_owned() });
                }
            }
            Frame::Credit { id, limit } => {
                if let Some(stream) = self.streams.get_mut(&id) {
                    stream.peer_limit = stream.peer_limit.max(limit);
                    if stream.has_output() {
                        self.mark_ready(id);
                    }
                    self.size_send_buffer(id);
                }
            }
            Frame::Close { reason } => {
                self.peer_closed = true;
                self.clear(CloseReason::ByPeer(reason.to_owned()));
            }
        }
        Ok(())
    }

    /// Streams the peer opened past [`MAX_STREAMS`], refused with a reset.
    pub fn refused_total(&self) -> u64 {
        self.refused_total
    }

    fn peer_open(&mut self, id: StreamId, name: &str) -> Result<(), StreamViolation> {
        let peer_parity = match self.side {
            Side::Agent => 0,
            Side::Station => 1,
        };
        if id % 2 != peer_parity || id <= self.peer_id_floor {
            return Err(StreamViolation::BadId(id));
        }
        self.peer_id_floor = id;
        if self.streams.len() >= MAX_STREAMS {
            if self.refusals >= MAX_STREAMS {
                return Err(StreamViolation::TooManyStreams);
            }
            self.refusals += 1;
            self.refused_total += 1;
            self.control.push_back(Control::Refuse { id });
            return Ok(());
        }
        self.streams.insert(id, Stream::new());
        self.events.push_back(Event::Opened { id, name: name.to_owned() });
        Ok(())
    }

    /// Encodes frames into `out` until it holds `capacity` bytes or nothing
    /// is left to send. Control frames go first so an Open precedes its data.
    /// `now` and the path's round trip size the credit it grants.
    pub fn fill(&mut self, out: &mut Vec<u8>, capacity: usize, now: Instant, rtt: Duration) {
        let refused = format!("too many streams open (limit {MAX_STREAMS})");
        while let Some(control) = self.control.front() {
            let frame = match control {
                Control::Open { id, name } => Frame::Open { id: *id, name },
                Control::Reset { id, reason } => Frame::Reset { id: *id, reason },
                Control::Refuse { id } => Frame::Reset { id: *id, reason: &refused },
                Control::Close { reason } => Frame::Close { reason },
            };
            if out.len() + FRAME_OVERHEAD + MAX_NAME.max(MAX_REASON) > capacity {
                return;
            }
            encode_frame(&frame, out);
            if let Some(Control::Refuse { .. }) = self.control.pop_front() {
                self.refusals -= 1;
            }
        }
        // Each ready stream gets one turn per pass; a stream with more to send
        // goes to the back of the queue.
        let mut turns = self.ready.len();
        while turns > 0 && out.len() + 2 * FRAME_OVERHEAD < capacity {
            turns -= 1;
            let Some(id) = self.ready.pop_front() else { break };
            if self.streams.get(&id).is_some_and(|s| s.credit_due) {
                self.size_window(id, now, rtt);
            }
            let Some(stream) = self.streams.get_mut(&id) else { continue };
            stream.queued = false;
            if stream.credit_due {
                stream.credit_due = false;
                stream.granted = stream.granted.max(stream.consumed + stream.window);
                stream.last_grant = Some(now);
                encode_frame(&Frame::Credit { id, limit: stream.granted }, out);
            }
            let credit = usize::try_from(stream.peer_limit - stream.sent).unwrap_or(usize::MAX);
            let mut n = stream.send_buf.len().min(credit);
            let freed = n > 0;
            while n > 0 && out.len() + 2 * FRAME_OVERHEAD < capacity {
                let (head, _) = stream.send_buf.as_slices();
                let take = n.min(head.len()).min(capacity - out.len() - FRAME_OVERHEAD);
                encode_frame(&Frame::Data { id, bytes: &head[..take] }, out);
                stream.send_buf.consume(take);
                stream.sent += take as u64;
                n -= take;
            }
            if stream.finish == Finish::Queued && stream.send_buf.is_empty() {
                encode_frame(&Frame::Fin { id }, out);
                stream.finish = Finish::Sent;
            }
            if freed && stream.writable_wanted {
                stream.writable_wanted = false;
                self.events.push_back(Event::Writable(id));
            }
            if stream.has_output() {
                stream.queued = true;
                self.ready.push_back(id);
            }
            self.remove_if_done(id);
        }
    }

    fn mark_ready(&mut self, id: StreamId) {
        if let Some(stream) = self.streams.get_mut(&id) {
            if !stream.queued && stream.has_output() {
                stream.queued = true;
                self.ready.push_back(id);
            }
        }
    }

    fn wake_reader(&mut self, id: StreamId) {
        if let Some(stream) = self.streams.get_mut(&id) {
            if stream.readable_wanted {
                stream.readable_wanted = false;
                self.events.push_back(Event::Readable(id));
            }
        }
    }

    fn remove_if_done(&mut self, id: StreamId) {
        if self.streams.get(&id).is_some_and(Stream::is_done) {
            self.remove(id);
        }
    }

    /// Forgets stream `id` and repays its window's loan; false if unknown.
    fn remove(&mut self, id: StreamId) -> bool {
        let Some(stream) = self.streams.remove(&id) else { return false };
        self.repay(stream.loan());
        true
    }

    fn repay(&mut self, room: u64) {
        self.session_room += room;
        self.budget.give(room);
    }

    fn borrow(&mut self, room: u64) -> bool {
        if self.session_room < room || !self.budget.take(room) {
            return false;
        }
        self.session_room -= room;
        true
    }

    /// Grows or shrinks the window of `id` before its credit goes out, if
    /// its reader has taken a whole window since the epoch began; see
    /// [`super::window`].
    fn size_window(&mut self, id: StreamId, now: Instant, rtt: Duration) {
        let Some(stream) = self.streams.get_mut(&id) else { return };
        let Some((began, at)) = stream.epoch else {
            // The first epoch counts from the first byte on, though its
            // clock starts at the first grant: a stream's first window is
            // judged at the end of the first round trip, not the second.
            stream.epoch = Some((now, 0));
            return;
        };
        let window = stream.window;
        let took = now.saturating_duration_since(began);
        // A reader that took less than a window in a slow epoch's time is
        // judged now, not once it has finally taken all of it.
        if stream.consumed - at < window && took < rtt * window::SLOW_EPOCH {
            return;
        }
        stream.epoch = Some((now, stream.consumed));
        match window::judge(took, rtt) {
            Change::Keep => {}
            // A reader with bytes piled up is the limit, not the window:
            // more window would only pile up more (and memory with it).
            Change::Grow
                if window < MAX_STREAM_WINDOW && stream.recv_buf.len() as u64 <= window / 4 =>
            {
                let wanted = (window * window::GROWTH).min(MAX_STREAM_WINDOW);
                if self.borrow(wanted - window)
                    || (self.reclaim_quiet(id, now, rtt) && self.borrow(wanted - window))
                {
                    self.streams.get_mut(&id).expect("looked up above").resize(wanted);
                }
            }
            Change::Grow => {}
            Change::Shrink => {
                // Never below the credit already out: the bytes it lets
                // the peer send must fit.
                let outstanding = stream.granted - stream.consumed;
                let smaller = (window / 2).max(outstanding).max(STREAM_WINDOW);
                stream.resize(smaller);
                self.repay(window - smaller);
            }
        }
    }

    /// Grows the send buffer of `id` to hold the credit the peer gives, so
    /// one packet run (one push) can carry all of it.
    fn size_send_buffer(&mut self, id: StreamId) {
        let Some(stream) = self.streams.get(&id) else { return };
        let credit = usize::try_from(stream.peer_limit - stream.sent).unwrap_or(usize::MAX);
        let wanted = credit.min(MAX_SEND_BUFFER);
        let have = stream.send_limit;
        if wanted <= have || !self.borrow((wanted - have) as u64) {
            return;
        }
        let stream = self.streams.get_mut(&id).expect("looked up above");
        stream.send_limit = wanted;
        stream.send_buf.set_limit(wanted);
        if stream.writable_wanted {
            stream.writable_wanted = false;
            self.events.push_back(Event::Writable(id));
        }
    }

    /// Takes room back from streams other than `except` that granted
    /// nothing for [`window::SLOW_EPOCH`] round trips and have no more
    /// than [`STREAM_WINDOW`] outstanding; true if any gave some back.
    fn reclaim_quiet(&mut self, except: StreamId, now: Instant, rtt: Duration) -> bool {
        let mut freed = 0;
        for (id, stream) in &mut self.streams {
            let quiet = stream
                .last_grant
                .is_some_and(|at| now.saturating_duration_since(at) >= rtt * window::SLOW_EPOCH);
            if *id != except
                && stream.window > STREAM_WINDOW
                && quiet
                && stream.granted - stream.consumed <= STREAM_WINDOW
            {
                // Only the window goes back: the send buffer keeps its room.
                freed += stream.window_loan();
                stream.resize(STREAM_WINDOW);
            }
        }
        self.repay(freed);
        freed > 0
    }
}

impl Drop for Streams {
    fn drop(&mut self) {
        // The shared budget outlives this session; the session's own does not.
        let loans: u64 = self.streams.values().map(Stream::loan).sum();
        self.budget.give(loans);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::frame::Frames;

    /// Moves every frame `from` has to `to`, as a perfect link would.
    fn deliver(from: &mut Streams, to: &mut Streams) {
        loop {
            let mut packet = Vec::new();
            from.fill(&mut packet, frame::MAX_PACKET, Instant::now(), Duration::from_millis(20));
            if packet.is_empty() {
                return;
            }
            for frame in Frames::new(&packet) {
                to.handle_frame(frame.unwrap()).unwrap();
            }
        }
    }

    fn drain_events(s: &mut Streams) -> Vec<Event> {
        std::iter::from_fn(|| s.poll_event()).collect()
    }

    #[test]
    fn open_data_and_half_close_each_way() {
        let mut agent = Streams::new(Side::Agent, Budget::unlimited());
        let mut station = Streams::new(Side::Station, Budget::unlimited());
        let id = agent.open("collector").unwrap();
        assert_eq!(agent.write(id, b"hello").unwrap(), 5);
        agent.finish(id).unwrap();
        deliver(&mut agent, &mut station);
        assert_eq!(
            drain_events(&mut station),
            vec![Event::Opened { id, name: "collector".into() }, Event::Readable(id)]
        );
        let mut buf = [0u8; 16];
        assert_eq!(station.read(id, &mut buf).unwrap(), Read::Data(5));
        assert_eq!(&buf[..5], b"hello");
        assert_eq!(station.read(id, &mut buf).unwrap(), Read::Fin);
        // The station's direction is still open after the agent's FIN.
        assert_eq!(station.write(id, b"reply").unwrap(), 5);
        station.finish(id).unwrap();
        deliver(&mut station, &mut agent);
        assert_eq!(station.len(), 0, "both FINs done: the station forgets the stream");
        assert_eq!(agent.read(id, &mut buf).unwrap(), Read::Data(5));
        assert_eq!(agent.read(id, &mut buf).unwrap(), Read::Fin);
        assert_eq!(agent.len(), 0);
    }

    #[test]
    fn a_stream_waiting_between_messages_lets_its_buffers_go_and_a_busy_one_keeps_them() {
        let mut agent = Streams::new(Side::Agent, Budget::unlimited());
        let mut station = Streams::new(Side::Station, Budget::unlimited());
        let id = agent.open("collector").unwrap();
        let held = |s: &Streams, buffer: Buffer| {
            let (send, receive) = s.allocated(id);
            match buffer {
                Buffer::Send => send,
                Buffer::Receive => receive,
            }
        };
        let mut buf = [0u8; 16 * 1024];
        // A request: the agent's buffer goes once the bytes are sent, the
        // station's once they are read and the station waits for more.
        assert_eq!(agent.write(id, b"request").unwrap(), 7);
        agent.waits(id, Buffer::Send, 7);
        assert_eq!(held(&agent, Buffer::Send), Ring::FIRST, "kept while it holds bytes");
        deliver(&mut agent, &mut station);
        assert_eq!(held(&agent, Buffer::Send), 0);
        assert_eq!(station.read(id, &mut buf).unwrap(), Read::Data(7));
        assert_eq!(station.read(id, &mut buf).unwrap(), Read::Blocked);
        station.waits(id, Buffer::Receive, 7);
        assert_eq!(held(&station, Buffer::Receive), 0);
        // A bulk transfer: a wait after SMALL_BURST or more keeps both.
        assert_eq!(agent.write(id, &buf[..SMALL_BURST]).unwrap(), SMALL_BURST);
        deliver(&mut agent, &mut station);
        agent.waits(id, Buffer::Send, SMALL_BURST);
        assert_eq!(station.read(id, &mut buf).unwrap(), Read::Data(SMALL_BURST));
        station.waits(id, Buffer::Receive, SMALL_BURST);
        assert_eq!(held(&agent, Buffer::Send), Ring::FIRST);
        assert_eq!(held(&station, Buffer::Receive), Ring::FIRST);
    }

    #[test]
    fn in_place_writes_and_reads_move_the_same_bytes() {
        let mut agent = Streams::new(Side::Agent, Budget::unlimited());
        let mut station = Streams::new(Side::Station, Budget::unlimited());
        let id = agent.open("collector").unwrap();
        deliver(&mut agent, &mut station);
        drain_events(&mut station);
        let byte = |offset: usize| (offset % 251) as u8;
        // A socket read straight into the send buffer, in odd sizes,
        // until the buffer is full.
        let mut written = 0;
        loop {
            let (first, second) = agent.send_space(id, 10_007).unwrap();
            if first.is_empty() {
                break;
            }
            let n = first.len() + second.len();
            for (i, b) in first.iter_mut().chain(second.iter_mut()).enumerate() {
                *b = byte(written + i);
            }
            agent.commit_send(id, n).unwrap();
            written += n;
        }
        assert_eq!(written, SEND_BUFFER);
        agent.finish(id).unwrap();
        deliver(&mut agent, &mut station);
        assert_eq!(drain_events(&mut agent), vec![Event::Writable(id)]);
        // A socket write straight out of the receive buffer, taking part
        // of what is offered each time.
        let mut got = Vec::new();
        loop {
            match station.received(id).unwrap() {
                Received::Data(first, second) => {
                    let offered: Vec<u8> = first.iter().chain(second).copied().collect();
                    let take = offered.len().min(3001);
                    got.extend_from_slice(&offered[..take]);
                    station.consume(id, take).unwrap();
                }
                Received::Fin => break,
                Received::Blocked => panic!("everything was delivered"),
            }
        }
        assert_eq!(got, (0..SEND_BUFFER).map(byte).collect::<Vec<_>>());
        assert_eq!(agent.send_space(id, 1), Err(StreamError::Closed(id)), "finished");
    }

    /// Fills `id`'s send buffer; returns how many bytes it took.
    fn fill_send_buffer(s: &mut Streams, id: StreamId) -> usize {
        let chunk = vec![7u8; 64 * 1024];
        let mut total = 0;
        loop {
            let n = s.write(id, &chunk).unwrap();
            total += n;
            if n < chunk.len() {
                return total;
            }
        }
    }

    #[test]
    fn the_send_buffer_grows_to_the_credit_within_the_budget() {
        for (budget, grown) in [(u64::MAX, MAX_SEND_BUFFER), (0, SEND_BUFFER)] {
            let budget = Budget::new(budget);
            let mut agent = Streams::new(Side::Agent, budget.clone());
            let id = agent.open("t").unwrap();
            assert_eq!(fill_send_buffer(&mut agent, id), SEND_BUFFER);
            drain_events(&mut agent);
            // The peer grants far more than the buffer holds.
            agent.handle_frame(Frame::Credit { id, limit: 64 << 20 }).unwrap();
            let woken = drain_events(&mut agent).contains(&Event::Writable(id));
            assert_eq!(woken, grown > SEND_BUFFER, "a grown buffer wakes its writer");
            assert_eq!(fill_send_buffer(&mut agent, id), grown - SEND_BUFFER);
            agent.reset(id, "done");
            let before = if grown > SEND_BUFFER { u64::MAX } else { 0 };
            assert_eq!(budget.available(), before, "the stream repays its room");
        }
    }

    #[test]
    fn reclaiming_a_quiet_window_repays_its_room_once() {
        let room = 64 << 20;
        let budget = Budget::new(room);
        let mut agent = Streams::new(Side::Agent, budget.clone());
        let quiet = agent.open("a").unwrap();
        let busy = agent.open("b").unwrap();
        // The quiet stream holds room for a grown send buffer and a grown
        // window, and last granted credit long ago.
        agent.handle_frame(Frame::Credit { id: quiet, limit: 64 << 20 }).unwrap();
        let start = Instant::now();
        assert!(agent.borrow(3 * STREAM_WINDOW));
        let stream = agent.streams.get_mut(&quiet).unwrap();
        stream.resize(4 * STREAM_WINDOW);
        stream.last_grant = Some(start);
        let rtt = Duration::from_millis(20);
        assert!(agent.reclaim_quiet(busy, start + Duration::from_secs(10), rtt));
        assert_eq!(agent.window(quiet), Some(STREAM_WINDOW));
        let send_room = (MAX_SEND_BUFFER - SEND_BUFFER) as u64;
        assert_eq!(budget.available(), room - send_room, "the send buffer keeps its room");
        drop(agent);
        assert_eq!(budget.available(), room, "every byte of room back, none twice");
    }

    #[test]
    fn a_slow_reader_stops_its_own_stream_only() {
        let mut agent = Streams::new(Side::Agent, Budget::unlimited());
        let mut station = Streams::new(Side::Station, Budget::unlimited());
        let slow = agent.open("a").unwrap();
        let fast = agent.open("b").unwrap();
        let chunk = vec![1u8; 64 * 1024];
        let (mut slow_sent, mut fast_got) = (0u64, 0u64);
        let mut buf = vec![0u8; 64 * 1024];
        for _ in 0..200 {
            slow_sent += agent.write(slow, &chunk).unwrap() as u64;
            agent.write(fast, &chunk).unwrap();
            deliver(&mut agent, &mut station);
            // Nobody reads `slow` at the station; `fast` is read at once.
            while let Read::Data(n) = station.read(fast, &mut buf).unwrap() {
                fast_got += n as u64;
            }
            deliver(&mut station, &mut agent);
        }
        assert!(fast_got > 10 * STREAM_WINDOW, "fast stream moved {fast_got} bytes");
        // The slow stream filled the window plus the sender's buffer, no more.
        assert_eq!(slow_sent, STREAM_WINDOW + SEND_BUFFER as u64);
    }

    #[test]
    fn overrunning_credit_resets_the_stream() {
        let mut station = Streams::new(Side::Station, Budget::unlimited());
        station.handle_frame(Frame::Open { id: 1, name: "t" }).unwrap();
        let big = vec![0u8; STREAM_WINDOW as usize + 1];
        assert_eq!(
            station.handle_frame(Frame::Data { id: 1, bytes: &big }),
            Err(StreamViolation::Overrun(1))
        );
        assert_eq!(station.len(), 0);
    }

    #[test]
    fn peer_ids_must_have_its_parity_and_grow() {
        let mut station = Streams::new(Side::Station, Budget::unlimited());
        assert_eq!(
            station.handle_frame(Frame::Open { id: 2, name: "t" }),
            Err(StreamViolation::BadId(2))
        );
        station.handle_frame(Frame::Open { id: 3, name: "t" }).unwrap();
        assert_eq!(
            station.handle_frame(Frame::Open { id: 1, name: "t" }),
            Err(StreamViolation::BadId(1))
        );
    }

    #[test]
    fn stream_limit_refuses_with_a_reset() {
        let mut agent = Streams::new(Side::Agent, Budget::unlimited());
        let mut station = Streams::new(Side::Station, Budget::unlimited());
        for _ in 0..MAX_STREAMS {
            agent.open("t").unwrap();
        }
        assert_eq!(agent.open("t"), Err(StreamError::TooMany));
        // A peer that ignores the limit has its extra stream reset.
        for id in (1..).step_by(2).take(MAX_STREAMS + 1) {
            station.handle_frame(Frame::Open { id, name: "t" }).unwrap();
        }
        assert_eq!(station.len(), MAX_STREAMS);
        assert_eq!(station.refused_total(), 1);
        let mut packet = Vec::new();
        station.fill(&mut packet, frame::MAX_PACKET, Instant::now(), Duration::from_millis(20));
        let frames: Vec<_> = Frames::new(&packet).map(Result::unwrap).collect();
        assert_eq!(
            frames[0],
            Frame::Reset {
                id: 2 * MAX_STREAMS as u32 + 1,
                reason: "too many streams open (limit 256)"
            }
        );
    }

    /// Found by the session fuzz target: one packet train of 125,000 Opens
    /// past the limit, never acknowledged, queued a refusal (with its own
    /// reason string) for each, about 90 bytes apiece and without end. A
    /// peer counting its streams never has more than MAX_STREAMS refusals
    /// outstanding; one that does is ending the session.
    #[test]
    fn refusals_waiting_to_be_sent_are_bounded() {
        let mut station = Streams::new(Side::Station, Budget::unlimited());
        let mut ids = (1..).step_by(2);
        for id in ids.by_ref().take(2 * MAX_STREAMS) {
            station.handle_frame(Frame::Open { id, name: "t" }).unwrap();
        }
        let id = ids.next().unwrap();
        assert_eq!(
            station.handle_frame(Frame::Open { id, name: "t" }),
            Err(StreamViolation::TooManyStreams)
        );
        assert_eq!(station.control.len(), MAX_STREAMS);

        // Refusals that went out make room: a peer that hears them may
        // open (and be refused) again.
        let mut station = Streams::new(Side::Station, Budget::unlimited());
        for id in ids.by_ref().take(2 * MAX_STREAMS) {
            station.handle_frame(Frame::Open { id, name: "t" }).unwrap();
        }
        let mut packet = Vec::new();
        station.fill(&mut packet, frame::MAX_PACKET, Instant::now(), Duration::from_millis(20));
        assert_eq!(Frames::new(&packet).count(), MAX_STREAMS);
        let id = ids.next().unwrap();
        assert_eq!(station.handle_frame(Frame::Open { id, name: "t" }), Ok(()));
        assert_eq!(station.control.len(), 1);
    }

    #[test]
    fn reset_reaches_the_peer_with_its_reason() {
        let mut agent = Streams::new(Side::Agent, Budget::unlimited());
        let mut station = Streams::new(Side::Station, Budget::unlimited());
        let id = agent.open("collector").unwrap();
        deliver(&mut agent, &mut station);
        drain_events(&mut station);
        station.reset(id, "target collector (127.0.0.1:9): connection refused");
        deliver(&mut station, &mut agent);
        assert_eq!(
            drain_events(&mut agent),
            vec![Event::Reset {
                id,
                reason: "target collector (127.0.0.1:9): connection refused".into()
            }]
        );
        assert_eq!(agent.write(id, b"x"), Err(StreamError::Closed(id)));
    }
}
