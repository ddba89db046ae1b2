//! Session and streams together, two ends over in-memory lanes with
//! simulated time: carriers are cut at random points, stale connections keep
//! delivering after a new one started, and every byte must arrive once.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::session::{CloseReason, Lane, Limits, Session};
use super::streams::{Event, Read, Side, StreamId};

/// Deterministic xorshift, so a failing seed can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Packets in flight one way: the live connection, plus an older connection
/// that was replaced but still has packets in the network.
#[derive(Default)]
struct Link {
    live: VecDeque<Vec<u8>>,
    stale: VecDeque<Vec<u8>>,
}

impl Link {
    /// Cuts the live connection after a random number of its packets; the
    /// survivors may still arrive later, interleaved with the next connection.
    fn cut(&mut self, rng: &mut Rng) {
        let keep = rng.below(self.live.len() as u64 + 1) as usize;
        self.live.truncate(keep);
        self.stale.extend(self.live.drain(..));
    }

    fn pop(&mut self, rng: &mut Rng) -> Option<Vec<u8>> {
        if !self.stale.is_empty() && rng.below(3) == 0 {
            return self.stale.pop_front();
        }
        self.live.pop_front().or_else(|| self.stale.pop_front())
    }
}

struct End {
    session: Session,
    out: Link,
}

impl End {
    fn new(side: Side, now: Instant) -> Self {
        End { session: Session::new(side, now, Limits::default()), out: Link::default() }
    }

    fn transmit(&mut self, now: Instant, max: usize) {
        let mut buf = Vec::new();
        for _ in 0..max {
            if !self.session.poll_transmit(now, Lane::Data, &mut buf) {
                break;
            }
            self.out.live.push_back(buf.clone());
        }
    }
}

fn pattern(offset: u64) -> u8 {
    (offset.wrapping_mul(2654435761) >> 13) as u8
}

/// Appends what stream `id` has to `got`; true once the peer's FIN is read.
fn read_available(session: &mut Session, id: StreamId, buf: &mut [u8], got: &mut Vec<u8>) -> bool {
    loop {
        match session.streams().read(id, buf) {
            Ok(Read::Data(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Read::Fin) => return true,
            Ok(Read::Blocked) => return false,
            Err(e) => panic!("{e}"),
        }
    }
}

/// Writes up to 40,000 more bytes of the pattern to stream `id`, and its
/// FIN once all `total` are written.
fn write_some(session: &mut Session, id: StreamId, rng: &mut Rng, written: &mut u64, total: u64) {
    if *written < total {
        let n = (rng.below(40_000) + 1).min(total - *written);
        let chunk: Vec<u8> = (*written..*written + n).map(pattern).collect();
        *written += session.streams().write(id, &chunk).unwrap() as u64;
        if *written == total {
            session.streams().finish(id).unwrap();
        }
    }
}

/// Sends `total` bytes agent → station over links cut with the given odds,
/// and returns what the station's reader got.
fn transfer(seed: u64, total: u64, cut_one_in: u64) -> (Vec<u8>, u64, u64) {
    let mut rng = Rng(seed);
    let start = Instant::now();
    let mut now = start;
    let mut agent = End::new(Side::Agent, now);
    let mut station = End::new(Side::Station, now);
    let id: StreamId = agent.session.streams().open("collector").unwrap();
    let mut written = 0u64;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 50_000];
    let mut cuts = 0;
    let mut opened = false;
    for _ in 0..200_000 {
        write_some(&mut agent.session, id, &mut rng, &mut written, total);
        agent.transmit(now, 1 + rng.below(4) as usize);
        station.transmit(now, 2);
        if rng.below(cut_one_in) == 0 {
            cuts += 1;
            agent.out.cut(&mut rng);
            agent.session.restart_transmit();
        }
        if rng.below(cut_one_in) == 0 {
            station.out.cut(&mut rng);
            station.session.restart_transmit();
        }
        for _ in 0..rng.below(5) {
            if let Some(p) = agent.out.pop(&mut rng) {
                station.session.handle_packet(now, &p).unwrap();
            }
        }
        for _ in 0..rng.below(5) {
            if let Some(p) = station.out.pop(&mut rng) {
                agent.session.handle_packet(now, &p).unwrap();
            }
        }
        while let Some(ev) = station.session.poll_event() {
            assert!(matches!(ev, Event::Opened { .. } | Event::Readable(_)), "{ev:?}");
            opened |= matches!(ev, Event::Opened { .. });
        }
        if opened && read_available(&mut station.session, id, &mut buf, &mut got) {
            return (got, cuts, agent.session.resent_packets());
        }
        now += Duration::from_millis(rng.below(10));
        agent.session.handle_timeout(now);
        station.session.handle_timeout(now);
        assert!(!agent.session.is_closed() && !station.session.is_closed());
    }
    panic!("transfer did not finish: {} of {total} bytes", got.len());
}

#[test]
fn every_byte_exactly_once_across_cut_carriers() {
    let mut all_cuts = 0;
    let mut all_resent = 0;
    for seed in 1..=12u64 {
        let total = 3 * 1024 * 1024 + seed * 777;
        let (got, cuts, resent) = transfer(seed.wrapping_mul(0x2545_f491_4f6c_dd1d), total, 20);
        all_cuts += cuts;
        all_resent += resent;
        assert_eq!(got.len() as u64, total, "seed {seed}");
        assert!(got.iter().enumerate().all(|(i, b)| *b == pattern(i as u64)), "seed {seed}");
    }
    assert!(all_cuts > 50, "the test must actually cut carriers: {all_cuts}");
    assert!(all_resent > 0, "cut carriers make the session resend");
}

#[test]
fn clean_link_delivers_without_resends() {
    let (got, cuts, resent) = transfer(7, 8 * 1024 * 1024, u64::MAX);
    assert_eq!((cuts, resent), (0, 0));
    assert_eq!(got.len(), 8 * 1024 * 1024);
}

#[test]
fn unacked_memory_is_bounded_when_the_peer_is_silent() {
    let now = Instant::now();
    let mut agent = End::new(Side::Agent, now);
    let mut ids = Vec::new();
    // Enough streams that their credit together passes the session window.
    for _ in 0..100 {
        ids.push(agent.session.streams().open("t").unwrap());
    }
    let chunk = vec![9u8; 64 * 1024];
    for _ in 0..100 {
        for id in &ids {
            let _ = agent.session.streams().write(*id, &chunk).unwrap();
        }
        agent.transmit(now, 1000);
        agent.out.live.clear();
    }
    let bound = super::session::SESSION_WINDOW + super::frame::MAX_PACKET;
    assert!(agent.session.unacked_bytes() <= bound, "{}", agent.session.unacked_bytes());
    assert!(agent.session.unacked_bytes() >= super::session::SESSION_WINDOW);
}

#[test]
fn idle_session_times_out_and_keepalives_prevent_it() {
    let start = Instant::now();
    let limits = Limits::default();
    let mut agent = End::new(Side::Agent, start);
    let mut station = End::new(Side::Station, start);
    // Both sides idle but connected: keepalives flow and nobody times out.
    let mut now = start;
    while now < start + 3 * limits.idle_timeout {
        now = agent.session.poll_timeout().unwrap().min(station.session.poll_timeout().unwrap());
        agent.session.handle_timeout(now);
        station.session.handle_timeout(now);
        agent.transmit(now, 10);
        station.transmit(now, 10);
        while let Some(p) = agent.out.live.pop_front() {
            station.session.handle_packet(now, &p).unwrap();
        }
        while let Some(p) = station.out.live.pop_front() {
            agent.session.handle_packet(now, &p).unwrap();
        }
    }
    assert!(!agent.session.is_closed());
    // Now the carrier is gone: the station hears nothing and gives up.
    while let Some(t) = station.session.poll_timeout() {
        station.session.handle_timeout(t);
        station.transmit(t, 10);
    }
    assert!(station.session.is_closed());
    assert_eq!(
        station.session.poll_event(),
        Some(Event::Closed { reason: CloseReason::Silent(Duration::from_secs(300)) })
    );
    assert!(station.session.poll_timeout().is_none());
}

/// A metered agent (keepalive 300 s, session_timeout 900 s) against a
/// station on its defaults that follows the agent's interval: idle for
/// three simulated hours, each side sends one keepalive per 300 s and
/// neither times out; cut off, the station gives up after two intervals.
#[test]
fn a_station_following_a_long_keepalive_stays_up_and_sends_at_its_interval() {
    let start = Instant::now();
    let keepalive = Duration::from_secs(300);
    let agent_limits =
        Limits { keepalive, idle_timeout: Duration::from_secs(900), ..Limits::default() };
    let station_limits = Limits::default().following(keepalive);
    assert_eq!(station_limits.idle_timeout, Duration::from_secs(600));
    let mut agent =
        End { session: Session::new(Side::Agent, start, agent_limits), out: Link::default() };
    let mut station =
        End { session: Session::new(Side::Station, start, station_limits), out: Link::default() };
    let mut now = start;
    let mut sent = [0u32; 2];
    while now < start + Duration::from_secs(3 * 3600) {
        now = agent.session.poll_timeout().unwrap().min(station.session.poll_timeout().unwrap());
        agent.session.handle_timeout(now);
        station.session.handle_timeout(now);
        agent.transmit(now, 10);
        station.transmit(now, 10);
        sent[0] += agent.out.live.len() as u32;
        sent[1] += station.out.live.len() as u32;
        while let Some(p) = agent.out.live.pop_front() {
            station.session.handle_packet(now, &p).unwrap();
        }
        while let Some(p) = station.out.live.pop_front() {
            agent.session.handle_packet(now, &p).unwrap();
        }
    }
    assert!(!agent.session.is_closed() && !station.session.is_closed());
    // 3 hours at one per 300 s: 36 each way (one more at the very end).
    assert!(sent.iter().all(|n| (36..=37).contains(n)), "keepalives sent {sent:?}");
    let cut = now;
    while let Some(t) = station.session.poll_timeout() {
        station.session.handle_timeout(t);
        station.transmit(t, 10);
        now = t;
    }
    assert!(station.session.is_closed());
    assert_eq!(now - cut, Duration::from_secs(600));
}

#[test]
fn acking_an_unsent_packet_is_a_peer_error() {
    use super::frame::{encode_header, Header};
    let now = Instant::now();
    let mut station = Session::new(Side::Station, now, Limits::default());
    let mut packet = Vec::new();
    encode_header(&Header { seq: 0, ack: 5 }, &mut packet);
    assert!(station.handle_packet(now, &packet).is_err());
}

#[test]
fn handled_deadlines_are_not_reported_again() {
    // A driver whose carrier is busy calls handle_timeout at each deadline
    // and cannot transmit yet; it must then sleep, not wake at once forever.
    let start = Instant::now();
    let mut agent = End::new(Side::Agent, start);
    let mut station = End::new(Side::Station, start);
    let id = agent.session.streams().open("t").unwrap();
    agent.session.streams().write(id, b"x").unwrap();
    agent.transmit(start, 10);
    for p in agent.out.live.drain(..) {
        station.session.handle_packet(start, &p).unwrap();
    }
    let mut now = start;
    // The ack deadline, then the keepalive deadline (the idle one is later).
    for _ in 0..2 {
        let due = station.session.poll_timeout().unwrap();
        assert!(due > now, "deadline {:?} already handled", due - start);
        now = due;
        station.session.handle_timeout(now);
    }
    // The ack and the keepalive are still owed, and go out at the next chance.
    let mut buf = Vec::new();
    assert!(station.session.poll_transmit(now, Lane::Data, &mut buf));
    assert!(!station.session.poll_transmit(now, Lane::Data, &mut buf));
}

#[test]
fn a_probe_is_acked_and_a_silent_path_shows_as_stalled() {
    let start = Instant::now();
    let mut agent = End::new(Side::Agent, start);
    let mut station = End::new(Side::Station, start);
    assert_eq!(agent.session.stalled_since(), None);
    agent.session.probe();
    agent.transmit(start, 10);
    assert_eq!(agent.out.live.len(), 1, "a probe is one packet, with no frames");
    assert_eq!(agent.session.stalled_since(), Some(start));
    // A path that swallows it: the stall keeps its start time.
    let lost = agent.out.live.pop_front().unwrap();
    let later = start + Duration::from_secs(7);
    agent.session.restart_transmit();
    agent.transmit(later, 10);
    assert_eq!(agent.session.stalled_since(), Some(start));
    // Delivered at last (the resend): the station acks it and the stall ends.
    drop(lost);
    for p in agent.out.live.drain(..) {
        station.session.handle_packet(later, &p).unwrap();
    }
    let acked = later + Duration::from_secs(1);
    station.transmit(acked, 10);
    for p in station.out.live.drain(..) {
        agent.session.handle_packet(acked, &p).unwrap();
    }
    assert_eq!(agent.session.stalled_since(), None);
    assert_eq!(agent.session.unacked_bytes(), 0);
}

/// Sends `total` bytes agent → station the way the poll carrier's
/// pipelined requests carry them: runs of 1 to 8 packets, up to `depth`
/// requests in flight, delivered in any order and one in `lose_one_in`
/// lost. A lost request is what a failed one is to the driver: the sender
/// restarts from its first unacknowledged packet. Returns what the
/// station's reader got and how many requests were lost.
fn pipelined_transfer(seed: u64, total: u64, depth: usize, lose_one_in: u64) -> (Vec<u8>, u64) {
    let mut rng = Rng(seed);
    let mut now = Instant::now();
    let mut agent = End::new(Side::Agent, now);
    let mut station = End::new(Side::Station, now);
    let id: StreamId = agent.session.streams().open("collector").unwrap();
    let (mut written, mut lost) = (0u64, 0u64);
    let mut got = Vec::new();
    let mut buf = vec![0u8; 50_000];
    let mut requests: Vec<Vec<Vec<u8>>> = Vec::new();
    let mut packet = Vec::new();
    for _ in 0..200_000 {
        write_some(&mut agent.session, id, &mut rng, &mut written, total);
        while requests.len() < depth {
            let mut request = Vec::new();
            for _ in 0..=rng.below(8) {
                if !agent.session.poll_transmit(now, Lane::Sequenced, &mut packet) {
                    break;
                }
                request.push(packet.clone());
            }
            if request.is_empty() {
                break;
            }
            requests.push(request);
        }
        if !requests.is_empty() {
            let request = requests.swap_remove(rng.below(requests.len() as u64) as usize);
            if rng.below(lose_one_in) == 0 {
                lost += 1;
                agent.session.restart_transmit();
            } else {
                for p in request {
                    station.session.handle_packet(now, &p).unwrap();
                }
            }
        }
        // Acks come back on the other lane's requests, whole.
        station.transmit(now, 2);
        while let Some(p) = station.out.live.pop_front() {
            agent.session.handle_packet(now, &p).unwrap();
        }
        while station.session.poll_event().is_some() {}
        if read_available(&mut station.session, id, &mut buf, &mut got) {
            return (got, lost);
        }
        now += Duration::from_millis(rng.below(10));
        agent.session.handle_timeout(now);
        station.session.handle_timeout(now);
    }
    panic!("transfer did not finish: {} of {total} bytes", got.len());
}

#[test]
fn pipelined_requests_deliver_every_byte_once_in_order() {
    let mut all_lost = 0;
    for seed in 1..=8u64 {
        let total = 2 * 1024 * 1024 + seed * 333;
        let (got, lost) =
            pipelined_transfer(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15), total, 4, 15);
        all_lost += lost;
        assert_eq!(got.len() as u64, total, "seed {seed}");
        assert!(got.iter().enumerate().all(|(i, b)| *b == pattern(i as u64)), "seed {seed}");
    }
    assert!(all_lost > 20, "the test must actually lose requests: {all_lost}");
    // Nothing lost: reordered requests alone need no resend.
    let (got, lost) = pipelined_transfer(3, 4 * 1024 * 1024, 6, u64::MAX);
    assert_eq!((got.len(), lost), (4 * 1024 * 1024, 0));
}

#[test]
fn packets_past_a_gap_wait_for_it_within_their_bound() {
    use super::frame::{decode_header, encode_header, Header};
    use super::session::AHEAD_MAX;
    let start = Instant::now();
    let mut station = Session::new(Side::Station, start, Limits::default());
    // Sequenced packets with no frames (probes): each holds 64 bytes ahead.
    let probe = |seq: u64| {
        let mut packet = Vec::new();
        encode_header(&Header { seq, ack: 0 }, &mut packet);
        packet
    };
    let acked = |station: &mut Session| {
        let mut ack = Vec::new();
        station.write_ack(start, &mut ack);
        decode_header(&ack).unwrap().0.ack
    };
    let room = (AHEAD_MAX / 64) as u64;
    let later = start + Duration::from_secs(1);
    for seq in 2..=room + 11 {
        station.handle_packet(later, &probe(seq)).unwrap();
    }
    // Held past the gap, none acknowledged, the gap dated from the first.
    assert_eq!(acked(&mut station), 0);
    assert_eq!(station.gap_since(), Some(later));
    // The gap fills: everything held goes on; what found no room did not.
    station.handle_packet(later, &probe(1)).unwrap();
    assert_eq!(acked(&mut station), room + 1);
    assert_eq!(station.gap_since(), None);
    // Sent again (the sender restarts), the dropped ones arrive too; a
    // packet seen before changes nothing.
    for seq in 1..=room + 11 {
        station.handle_packet(later, &probe(seq)).unwrap();
    }
    assert_eq!(acked(&mut station), room + 11);
}

/// One direction of a path with a round trip and a rate: a packet leaves
/// when the ones before it have, and lands half a round trip later. The
/// sender hands it a packet only when its queue is short (a socket buffer).
struct Pipe {
    one_way: Duration,
    bytes_per_sec: f64,
    free_at: Instant,
    queue: VecDeque<(Instant, Vec<u8>)>,
}

impl Pipe {
    fn new(now: Instant, rtt: Duration, bytes_per_sec: f64) -> Pipe {
        Pipe { one_way: rtt / 2, bytes_per_sec, free_at: now, queue: VecDeque::new() }
    }

    fn has_room(&self, now: Instant) -> bool {
        self.free_at <= now + TICK
    }

    fn send(&mut self, now: Instant, packet: Vec<u8>) {
        let start = self.free_at.max(now);
        self.free_at = start + Duration::from_secs_f64(packet.len() as f64 / self.bytes_per_sec);
        self.queue.push_back((self.free_at + self.one_way, packet));
    }

    fn deliver(&mut self, now: Instant, to: &mut Session) {
        while self.queue.front().is_some_and(|(at, _)| *at <= now) {
            let (_, packet) = self.queue.pop_front().unwrap();
            to.handle_packet(now, &packet).unwrap();
        }
    }
}

const TICK: Duration = Duration::from_millis(1);

/// Bulk transfers agent to station over a [`Pipe`] pair, in 1 ms steps of
/// simulated time.
struct Path {
    now: Instant,
    agent: Session,
    station: Session,
    up: Pipe,
    down: Pipe,
    /// Streams the agent writes to, with what each has written and what the
    /// station's reader got.
    streams: Vec<(StreamId, u64, u64)>,
    reading: bool,
    /// Bytes each reader takes per millisecond at most.
    read_per_tick: usize,
}

impl Path {
    fn new(rtt: Duration, bytes_per_sec: f64, streams: usize, limits: Limits) -> Path {
        let now = Instant::now();
        let mut agent = Session::new(Side::Agent, now, Limits::default());
        let ids = (0..streams).map(|_| (agent.streams().open("t").unwrap(), 0, 0)).collect();
        Path {
            now,
            agent,
            station: Session::new(Side::Station, now, limits),
            up: Pipe::new(now, rtt, bytes_per_sec),
            down: Pipe::new(now, rtt, bytes_per_sec),
            streams: ids,
            reading: true,
            read_per_tick: usize::MAX,
        }
    }

    fn run(&mut self, time: Duration) {
        let chunk: Vec<u8> = (0..64 * 1024).map(pattern).collect();
        let mut buf = vec![0u8; 256 * 1024];
        let end = self.now + time;
        while self.now < end {
            self.up.deliver(self.now, &mut self.station);
            self.down.deliver(self.now, &mut self.agent);
            while self.station.poll_event().is_some() {}
            while self.agent.poll_event().is_some() {}
            for (id, written, got) in &mut self.streams {
                while let Ok(n) = self.agent.streams().write(*id, &chunk) {
                    *written += n as u64;
                    if n < chunk.len() {
                        break;
                    }
                }
                // The station knows the stream once the Open lands.
                let mut quota = self.read_per_tick;
                while self.reading && quota > 0 && self.station.streams().contains(*id) {
                    let room = buf.len().min(quota);
                    match self.station.streams().read(*id, &mut buf[..room]) {
                        Ok(Read::Data(n)) => {
                            *got += n as u64;
                            quota -= n;
                        }
                        Ok(Read::Blocked) => break,
                        other => panic!("{other:?}"),
                    }
                }
            }
            self.agent.handle_timeout(self.now);
            self.station.handle_timeout(self.now);
            let mut packet = Vec::new();
            while self.up.has_room(self.now)
                && self.agent.poll_transmit(self.now, Lane::Data, &mut packet)
            {
                self.up.send(self.now, std::mem::take(&mut packet));
            }
            while self.down.has_room(self.now)
                && self.station.poll_transmit(self.now, Lane::Data, &mut packet)
            {
                self.down.send(self.now, std::mem::take(&mut packet));
            }
            self.now += TICK;
        }
    }

    fn received(&self) -> u64 {
        self.streams.iter().map(|s| s.2).sum()
    }

    /// Bytes per second the station's reader got over `time` from now on.
    fn rate_over(&mut self, time: Duration) -> f64 {
        let before = self.received();
        self.run(time);
        (self.received() - before) as f64 / time.as_secs_f64()
    }
}

use super::streams::STREAM_WINDOW;
use super::window::{Budget, MAX_STREAM_WINDOW};

#[test]
fn windows_grow_to_fill_a_long_path() {
    // 100 Mbit/s at 200 ms: 2.5 MB in flight, ten 256 KiB windows.
    let rate = 12.5e6;
    let mut path = Path::new(Duration::from_millis(200), rate, 1, Limits::default());
    path.run(Duration::from_secs(4));
    let got = path.rate_over(Duration::from_secs(2));
    let id = path.streams[0].0;
    assert!(got > 0.9 * rate, "{got:.0} B/s of {rate:.0}");
    let window = path.station.streams().window(id).unwrap();
    assert!(window >= 2_500_000, "window {window} below the path's bandwidth-delay product");
    assert!(window <= MAX_STREAM_WINDOW, "window {window}");
    assert!(path.agent.rtt().min() >= Duration::from_millis(200), "{:?}", path.agent.rtt());
}

#[test]
fn a_fast_long_path_grows_the_first_window_within_its_first_burst() {
    // 100 MB/s at 60 ms: the first 256 KiB land at 30 ms, all at once.
    let mut path = Path::new(Duration::from_millis(60), 100e6, 1, Limits::default());
    let id = path.streams[0].0;
    path.run(Duration::from_millis(40));
    // Judged once its reader took it, within the first burst: the grant
    // that leaves then is for a grown window, a round trip sooner than
    // judging it by the next burst would give.
    assert_eq!(path.station.streams().window(id), Some(4 * STREAM_WINDOW));
    // 8 MiB, a short transfer on such a path, within four round trips:
    // windows of 256 KiB, 1, 4 and 16 MiB.
    let mut rtts = 0;
    while path.received() < 8 << 20 {
        path.run(Duration::from_millis(60));
        rtts += 1;
    }
    assert!(rtts <= 4, "{rtts} round trips for 8 MiB");
}

#[test]
fn a_short_path_keeps_the_first_window() {
    // 20 Mbit/s at 60 ms, a cellular uplink: 150 KB in flight fits the
    // first window, which grows one step at most (the first epoch, judged
    // before the path's rate shows) and no further.
    let rate = 2.5e6;
    let mut path = Path::new(Duration::from_millis(60), rate, 1, Limits::default());
    path.run(Duration::from_secs(3));
    let got = path.rate_over(Duration::from_secs(2));
    assert!(got > 0.9 * rate, "{got:.0} B/s of {rate:.0}");
    let id = path.streams[0].0;
    assert!(path.station.streams().window(id).unwrap() <= 4 * STREAM_WINDOW);
}

#[test]
fn a_reader_that_slows_down_gives_its_window_back() {
    let budget = Budget::new(64 * 1024 * 1024);
    let limits = Limits { windows: budget.clone(), ..Limits::default() };
    let mut path = Path::new(Duration::from_millis(200), 12.5e6, 1, limits);
    path.run(Duration::from_secs(3));
    let id = path.streams[0].0;
    let grown = path.station.streams().window(id).unwrap();
    assert!(grown >= 4 * STREAM_WINDOW, "{grown}");
    // 1 MB/s: the window shrinks until the reader takes it within
    // SLOW_EPOCH round trips (16 x 200 ms x 1 MB/s = 3.2 MB).
    path.read_per_tick = 1000;
    path.run(Duration::from_secs(60));
    let window = path.station.streams().window(id).unwrap();
    assert!(window <= 3_200_000 && window < grown / 4, "{window} of {grown}");
    assert_eq!(budget.available(), 64 * 1024 * 1024 - (window - STREAM_WINDOW));
}

#[test]
fn a_stopped_reader_holds_no_more_than_its_window() {
    let mut path = Path::new(Duration::from_millis(200), 12.5e6, 1, Limits::default());
    path.run(Duration::from_secs(3));
    path.reading = false;
    path.run(Duration::from_secs(3));
    let id = path.streams[0].0;
    let window = path.station.streams().window(id).unwrap();
    let held = path.station.streams().buffered(id).unwrap();
    assert!(held as u64 <= window && window <= MAX_STREAM_WINDOW, "{held} of {window}");
    assert!(held as u64 >= window / 2, "the reader stopped, the window filled: {held}");
    let in_flight = path.agent.unacked_bytes();
    assert!(in_flight <= super::session::SESSION_WINDOW, "{in_flight}");
    // Reading again drains it and the transfer goes on.
    path.reading = true;
    let before = path.received();
    path.run(Duration::from_secs(1));
    assert!(path.received() > before + held as u64);
}

/// Runs 4 bulk streams over 200 ms at 100 Mbit/s; returns each stream's
/// bytes over the last 2 s and the path.
fn four_streams(limits: Limits) -> (Vec<u64>, Path) {
    let mut path = Path::new(Duration::from_millis(200), 12.5e6, 4, limits);
    path.run(Duration::from_secs(4));
    let before: Vec<u64> = path.streams.iter().map(|s| s.2).collect();
    path.run(Duration::from_secs(2));
    let shares = path.streams.iter().zip(&before).map(|(s, b)| s.2 - b).collect();
    (shares, path)
}

#[test]
fn streams_share_a_long_path_fairly() {
    let (shares, _) = four_streams(Limits::default());
    let (least, most) = (shares.iter().min().unwrap(), shares.iter().max().unwrap());
    assert!(*least as f64 > 0.8 * *most as f64, "unfair shares {shares:?}");
    let rate = shares.iter().sum::<u64>() as f64 / 2.0;
    assert!(rate > 0.9 * 12.5e6, "{rate:.0} B/s");
}

#[test]
fn a_tight_budget_bounds_the_windows_and_starves_no_stream() {
    let budget = Budget::new(1024 * 1024);
    let (shares, mut path) = four_streams(Limits { windows: budget.clone(), ..Limits::default() });
    let ids: Vec<StreamId> = path.streams.iter().map(|s| s.0).collect();
    let windows: u64 = ids.iter().map(|id| path.station.streams().window(*id).unwrap()).sum();
    assert!(windows <= 4 * STREAM_WINDOW + 1024 * 1024, "windows {windows}");
    assert_eq!(budget.available(), 4 * STREAM_WINDOW + 1024 * 1024 - windows);
    // Each stream keeps at least its first window: it moves at least
    // 256 KiB per round trip, 2.6 MB in 2 s.
    assert!(shares.iter().all(|s| *s > 2_000_000), "{shares:?}");
    // Ending the session gives every byte of room back.
    drop(path);
    assert_eq!(budget.available(), 1024 * 1024);
}
