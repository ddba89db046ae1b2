//! One end of a session (station or agent) driven by an authenticated but
//! hostile peer: any packet plaintext, well-formed or not, in any order,
//! interleaved with what the local driver does (open, write, read, finish,
//! reset, transmit, time passing).
//!
//! Beyond "no panic":
//! - every byte read from a stream is the byte the peer sent at that offset
//!   of that stream (no loss, duplication or mix-up while the session lives);
//! - what the session sends is a packet that decodes, within `MAX_PACKET`;
//! - the session's heap stays within a bound of what it legitimately holds
//!   (bytes received but not read, bytes written but not sent, unacked
//!   packets), so a peer cannot make it hoard memory. Measured with a
//!   counting allocator.
#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use postern::core::frame::{
    decode_header, encode_frame, encode_header, Frame, Frames, Header, StreamId, MAX_HEADER,
    MAX_PACKET,
};
use postern::core::ring::Ring;
use postern::core::session::{CloseReason, Ending, Lane, Limits, Session};
use postern::core::streams::{Event, Read, Side, MAX_STREAMS};

/// Live heap bytes allocated from Rust, for the memory bound.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Heap the session may use beyond what it holds for streams and resends:
/// fixed buffers (spare packet buffers, maps), a few packets' worth; and
/// the harness's own books, kept to live streams and KNOWN_MAX ids.
const HEAP_BASE: isize = 4 << 20;

/// Stream ids the harness remembers for `Id::Known` and local actions.
const KNOWN_MAX: usize = 1024;

/// Heap per live stream beyond its buffered bytes: its map entry, and the
/// first allocation of each of its two rings, made before a byte is held.
const HEAP_PER_STREAM: isize = 1024 + 2 * Ring::FIRST as isize;

/// Peer bytes one input may generate (Data payloads, burst Opens at 8 bytes
/// each). Enough to overflow any buffer many times over, while keeping an
/// input's run under a second, so a slow run means a slow session.
const GENERATE_MAX: u64 = 32 << 20;

#[derive(Arbitrary, Debug)]
struct Input {
    station: bool,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// A packet from the peer, built from frames (split into several packets
    /// if it grows past MAX_PACKET).
    Packet {
        seq: Seq,
        ack: Ack,
        frames: Vec<FrameSpec>,
    },
    /// Packet plaintext as the fuzzer wrote it.
    Raw(Vec<u8>),
    /// Local driver actions.
    Open {
        name_len: u8,
    },
    Write {
        stream: u8,
        len: u16,
    },
    Read {
        stream: u8,
        len: u16,
    },
    Finish {
        stream: u8,
    },
    Reset {
        stream: u8,
    },
    Transmit {
        sequenced: bool,
        packets: u8,
    },
    RestartTransmit,
    Advance {
        millis: u32,
    },
    Close,
}

#[derive(Arbitrary, Debug)]
enum Seq {
    /// The number the session expects next.
    Next,
    /// A number already delivered (a resend).
    Old(u8),
    /// Ack-only (0): frames in it are ignored.
    AckOnly,
    Any(u64),
}

#[derive(Arbitrary, Debug)]
enum Ack {
    /// The highest number the session has sent.
    Latest,
    /// That minus some.
    Behind(u8),
    Any(u64),
}

#[derive(Arbitrary, Debug)]
enum FrameSpec {
    Open {
        id: Id,
        name_len: u16,
    },
    /// `len` bytes of the stream's pattern, from where the peer is.
    Data {
        id: Id,
        len: u16,
    },
    Fin {
        id: Id,
    },
    Reset {
        id: Id,
        reason_len: u16,
    },
    Credit {
        id: Id,
        limit: u64,
    },
    Close {
        reason_len: u16,
    },
    /// This many Opens of fresh ids, as a peer ignoring the stream limit.
    OpenBurst {
        count: u16,
    },
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Id {
    /// A stream either side opened.
    Known(u8),
    /// The next id the peer may open.
    Fresh,
    Any(u32),
}

/// What the harness knows, as the peer and as the local driver.
struct Harness {
    session: Session,
    now: Instant,
    side: Side,
    /// Next sequence number the session expects from the peer.
    peer_seq: u64,
    /// Highest sequence number the session has sent.
    sent_seq: u64,
    /// Next stream id the peer may open (its parity).
    peer_next_id: StreamId,
    /// Ids of streams opened by either side, the latest KNOWN_MAX.
    known: VecDeque<StreamId>,
    /// Per live stream: bytes the peer has sent, bytes the driver has read,
    /// bytes the driver has written, bytes the session has sent.
    peer_sent: HashMap<StreamId, u64>,
    read: HashMap<StreamId, u64>,
    written: HashMap<StreamId, u64>,
    transmitted: HashMap<StreamId, u64>,
    /// Per live stream: the most bytes its receive and send rings have
    /// held; rings keep their capacity after draining, so this, not what
    /// they hold now, bounds their memory.
    high_water: HashMap<StreamId, (u64, u64)>,
    baseline: isize,
    /// Peer bytes generated so far, against GENERATE_MAX.
    generated: u64,
}

/// The byte at `offset` of stream `id`, so a misplaced byte is noticed.
fn pattern(id: StreamId, offset: u64) -> u8 {
    (offset.wrapping_mul(0x9e37_79b9) >> 11) as u8 ^ (id as u8).wrapping_mul(37)
}

fuzz_target!(|input: Input| {
    let side = if input.station { Side::Station } else { Side::Agent };
    let now = Instant::now();
    let mut harness = Harness {
        session: Session::new(side, now, Limits::default()),
        now,
        side,
        peer_seq: 1,
        sent_seq: 0,
        peer_next_id: if input.station { 1 } else { 2 },
        known: VecDeque::new(),
        peer_sent: HashMap::new(),
        read: HashMap::new(),
        written: HashMap::new(),
        transmitted: HashMap::new(),
        high_water: HashMap::new(),
        baseline: 0,
        generated: 0,
    };
    harness.baseline = LIVE.load(Ordering::Relaxed);
    for op in input.ops {
        harness.apply(op);
        harness.drain_events();
        harness.forget_gone_streams();
        harness.check_memory();
    }
});

impl Harness {
    fn apply(&mut self, op: Op) {
        match op {
            Op::Packet { seq, ack, frames } => self.peer_packets(seq, ack, &frames),
            Op::Raw(bytes) => self.deliver(&bytes),
            Op::Open { name_len } => {
                let name = "n".repeat(usize::from(name_len));
                if let Ok(id) = self.session.streams().open(&name) {
                    self.opened(id);
                }
            }
            Op::Write { stream, len } => {
                let Some(id) = self.known(stream) else { return };
                let from = self.written.get(&id).copied().unwrap_or(0);
                let bytes: Vec<u8> = (0..u64::from(len)).map(|i| pattern(id, from + i)).collect();
                if let Ok(n) = self.session.streams().write(id, &bytes) {
                    *self.written.entry(id).or_default() += n as u64;
                }
            }
            Op::Read { stream, len } => {
                let Some(id) = self.known(stream) else { return };
                let mut buf = vec![0u8; usize::from(len)];
                if let Ok(Read::Data(n)) = self.session.streams().read(id, &mut buf) {
                    let from = self.read.get(&id).copied().unwrap_or(0);
                    for (i, &byte) in buf[..n].iter().enumerate() {
                        let offset = from + i as u64;
                        assert_eq!(byte, pattern(id, offset), "stream {id} offset {offset}");
                    }
                    let total = from + n as u64;
                    assert!(total <= self.peer_sent[&id], "stream {id}: read more than sent");
                    self.read.insert(id, total);
                }
            }
            Op::Finish { stream } => {
                if let Some(id) = self.known(stream) {
                    let _ = self.session.streams().finish(id);
                }
            }
            Op::Reset { stream } => {
                if let Some(id) = self.known(stream) {
                    self.session.streams().reset(id, "fuzz");
                }
            }
            Op::Transmit { sequenced, packets } => {
                let lane = if sequenced { Lane::Sequenced } else { Lane::Data };
                let mut out = Vec::new();
                for _ in 0..packets {
                    if !self.session.poll_transmit(self.now, lane, &mut out) {
                        break;
                    }
                    self.sent(&out);
                }
            }
            Op::RestartTransmit => self.session.restart_transmit(),
            Op::Advance { millis } => {
                self.now += Duration::from_millis(u64::from(millis));
                self.session.handle_timeout(self.now);
                if let Some(next) = self.session.poll_timeout() {
                    // A deadline handled is not reported again.
                    assert!(next > self.now, "poll_timeout {next:?} not after {:?}", self.now);
                }
            }
            Op::Close => self.session.close(Ending::AgentStopping),
        }
    }

    /// Encodes the frames into as many packets as they need and delivers them.
    fn peer_packets(&mut self, seq: Seq, ack: Ack, specs: &[FrameSpec]) {
        let mut frames_buf = Vec::new();
        let mut packets = Vec::new();
        // What this packet's frames will do to the harness's books if the
        // session takes it; applied only then.
        let mut pending_sent: HashMap<StreamId, u64> = HashMap::new();
        let mut next_id = self.peer_next_id;
        let push_frame = |frame: Frame<'_>,
                          frames_buf: &mut Vec<u8>,
                          packets: &mut Vec<Vec<u8>>| {
            let mut encoded = Vec::new();
            encode_frame(&frame, &mut encoded);
            if frames_buf.len() + encoded.len() > MAX_PACKET - MAX_HEADER && !frames_buf.is_empty()
            {
                packets.push(std::mem::take(frames_buf));
            }
            frames_buf.extend_from_slice(&encoded);
        };
        for spec in specs {
            match *spec {
                FrameSpec::Open { id, name_len } => {
                    let id = self.id(id, &mut next_id);
                    let name = "s".repeat(usize::from(name_len) % 300);
                    push_frame(Frame::Open { id, name: &name }, &mut frames_buf, &mut packets);
                    // An accepted Open starts the stream's bytes afresh.
                    pending_sent.insert(id, 0);
                }
                FrameSpec::Data { id, len } => {
                    let id = self.id(id, &mut next_id);
                    let len = self.budget(len.into()) as u16;
                    let from = pending_sent
                        .get(&id)
                        .copied()
                        .unwrap_or_else(|| self.peer_sent.get(&id).copied().unwrap_or(0));
                    let bytes: Vec<u8> =
                        (0..u64::from(len)).map(|i| pattern(id, from + i)).collect();
                    push_frame(Frame::Data { id, bytes: &bytes }, &mut frames_buf, &mut packets);
                    pending_sent.insert(id, from + u64::from(len));
                }
                FrameSpec::Fin { id } => {
                    let id = self.id(id, &mut next_id);
                    push_frame(Frame::Fin { id }, &mut frames_buf, &mut packets);
                }
                FrameSpec::Reset { id, reason_len } => {
                    let id = self.id(id, &mut next_id);
                    let reason = "r".repeat(usize::from(reason_len) % 300);
                    push_frame(Frame::Reset { id, reason: &reason }, &mut frames_buf, &mut packets);
                }
                FrameSpec::Credit { id, limit } => {
                    let id = self.id(id, &mut next_id);
                    push_frame(Frame::Credit { id, limit }, &mut frames_buf, &mut packets);
                }
                FrameSpec::Close { reason_len } => {
                    let reason = "c".repeat(usize::from(reason_len) % 300);
                    push_frame(Frame::Close { reason: &reason }, &mut frames_buf, &mut packets);
                }
                FrameSpec::OpenBurst { count } => {
                    for _ in 0..self.budget(8 * u64::from(count)) / 8 {
                        let id = next_id;
                        next_id = next_id.wrapping_add(2);
                        push_frame(Frame::Open { id, name: "b" }, &mut frames_buf, &mut packets);
                    }
                }
            }
        }
        packets.push(frames_buf);

        for frames in packets {
            let seq = match seq {
                Seq::Next => self.peer_seq,
                Seq::Old(back) => self.peer_seq.saturating_sub(1 + u64::from(back)),
                Seq::AckOnly => 0,
                Seq::Any(n) => n,
            };
            let ack = match ack {
                Ack::Latest => self.sent_seq,
                Ack::Behind(n) => self.sent_seq.saturating_sub(u64::from(n)),
                Ack::Any(n) => n,
            };
            let mut packet = Vec::new();
            encode_header(&Header { seq, ack }, &mut packet);
            packet.extend_from_slice(&frames);
            self.deliver(&packet);
        }
        self.peer_next_id = self.peer_next_id.max(next_id);
    }

    /// Feeds one packet plaintext; when the session takes it, applies its
    /// frames to the books of the streams live after it (offsets restart
    /// at an Open).
    fn deliver(&mut self, packet: &[u8]) {
        let taken = !self.session.is_closed()
            && decode_header(packet).is_ok_and(|(h, _)| h.seq != 0 && h.seq == self.peer_seq);
        match self.session.handle_packet(self.now, packet) {
            Ok(()) => {}
            // What the tunnel does with a protocol violation.
            Err(error) => self.session.end(CloseReason::PeerBroke(error)),
        }
        if !taken {
            return;
        }
        self.peer_seq += 1;
        let (_, frames) = decode_header(packet).expect("decoded above");
        // Per stream: whether the packet opened it, and bytes it carried.
        let mut effects: HashMap<StreamId, (bool, u64)> = HashMap::new();
        for frame in Frames::new(frames) {
            let Ok(frame) = frame else { break };
            match frame {
                Frame::Open { id, .. } => {
                    effects.insert(id, (true, 0));
                }
                Frame::Data { id, bytes } => effects.entry(id).or_default().1 += bytes.len() as u64,
                _ => {}
            }
        }
        for (id, (opened, bytes)) in effects {
            if !self.session.streams().contains(id) {
                continue;
            }
            if opened {
                self.peer_sent.insert(id, 0);
                self.read.insert(id, 0);
            }
            *self.peer_sent.entry(id).or_default() += bytes;
        }
    }

    /// Records a packet the session sent and checks it decodes.
    fn sent(&mut self, packet: &[u8]) {
        assert!(packet.len() <= MAX_PACKET, "{} byte packet", packet.len());
        let (header, frames) = decode_header(packet).expect("the session's packets decode");
        // Resends carry bytes already counted.
        let new = header.seq > self.sent_seq;
        self.sent_seq = self.sent_seq.max(header.seq);
        for frame in Frames::new(frames) {
            if let Frame::Data { id, bytes } = frame.expect("the session's frames decode") {
                if new {
                    *self.transmitted.entry(id).or_default() += bytes.len() as u64;
                }
            }
        }
    }

    fn drain_events(&mut self) {
        while let Some(event) = self.session.poll_event() {
            if let Event::Opened { id, .. } = event {
                self.opened(id);
            }
        }
        assert!(self.session.streams().len() <= MAX_STREAMS);
    }

    fn opened(&mut self, id: StreamId) {
        if self.known.len() == KNOWN_MAX {
            self.known.pop_front();
        }
        self.known.push_back(id);
        self.read.entry(id).or_insert(0);
        self.peer_sent.entry(id).or_insert(0);
    }

    /// Takes up to `want` bytes from the generation budget; returns how many.
    fn budget(&mut self, want: u64) -> u64 {
        let granted = want.min(GENERATE_MAX.saturating_sub(self.generated));
        self.generated += granted;
        granted
    }

    fn known(&self, index: u8) -> Option<StreamId> {
        if self.known.is_empty() {
            return None;
        }
        Some(self.known[usize::from(index) % self.known.len()])
    }

    /// Drops the books of streams the session no longer has; their ids are
    /// never used again.
    fn forget_gone_streams(&mut self) {
        let streams = self.session.streams();
        for books in [&mut self.peer_sent, &mut self.read, &mut self.written, &mut self.transmitted]
        {
            books.retain(|&id, _| streams.contains(id));
        }
        self.high_water.retain(|&id, _| streams.contains(id));
    }

    fn id(&self, id: Id, next_id: &mut StreamId) -> StreamId {
        match id {
            Id::Known(index) => self.known(index).unwrap_or(*next_id),
            Id::Fresh => {
                let id = *next_id;
                *next_id = next_id.wrapping_add(2);
                id
            }
            Id::Any(id) => id,
        }
    }

    /// The session's heap against what it legitimately holds.
    fn check_memory(&mut self) {
        let live = LIVE.load(Ordering::Relaxed) - self.baseline;
        let open: Vec<StreamId> = self.peer_sent.keys().copied().collect();
        let mut held: u64 = 0;
        let mut count = 0;
        for id in open {
            count += 1;
            let get = |map: &HashMap<StreamId, u64>| map.get(&id).copied().unwrap_or(0);
            let received = get(&self.peer_sent).saturating_sub(get(&self.read));
            let unsent = get(&self.written).saturating_sub(get(&self.transmitted));
            let high = self.high_water.entry(id).or_default();
            *high = (high.0.max(received), high.1.max(unsent));
            held += high.0 + high.1;
        }
        held += self.session.unacked_bytes() as u64;
        // Rings grow by doubling, so a ring's capacity is at most twice the
        // most it held (or its first allocation): 4 times is ample.
        let bound = HEAP_BASE + 4 * held as isize + HEAP_PER_STREAM * count;
        assert!(
            live <= bound,
            "session heap {live} bytes, bound {bound} ({held} held, {count} streams, side {:?})",
            self.side
        );
    }
}
