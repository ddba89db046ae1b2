//! One end of a session as the carrier sees it, without I/O: the core
//! [`Session`], the Noise keys that seal and open its records, their replay
//! windows, and which carrier lane may send. Records in, packets out, time
//! a parameter; `crate::tunnel` puts it under a lock and wakes tasks.
//!
//! ```text
//!  record ─▶ Openers::open (no lock needed) ─▶ Connection::accept ─▶ Session::handle_packet
//!  Connection::poll_transmit(lane) ─▶ packet + the keys to seal it ─▶ record
//!  begin_lane: a new lane sends from the first unacknowledged packet; older lanes get Superseded
//! ```
//!
//! Only one lane sends sequenced packets at a time: two lanes interleaving
//! sequence numbers would make each look like loss to the peer. A lane
//! that joins the one sending (the poll shape's pipelined requests) goes
//! on from where it is.
//!
//! Keys can be renewed while the session runs. The agent seals with new
//! keys at once ([`Connection::rekey`]); the station is offered them
//! ([`Connection::offer_keys`]) and moves with the first authentic record
//! they open, so neither side seals with keys the other may lack. The keys
//! before keep opening what was sealed with them.

use std::sync::Arc;
use std::time::Instant;

use super::session::{CloseReason, Lane, Limits, Session};
use super::streams::{Event, Side, Streams};
use crate::crypto::{CryptoError, ReplayWindow, Transport};

/// Why a lane may send no more.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LaneEnd {
    #[error("session closed: {0}")]
    Closed(#[from] CloseReason),
    /// A newer lane took over sending; this one must stop so the two never
    /// interleave sequence numbers.
    #[error("a newer carrier connection took over")]
    Superseded,
}

/// The right to send sequenced packets, held by one carrier lane at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneToken {
    generation: u64,
    kind: Lane,
}

/// Counters for reports and logs.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Plaintext packet bytes sent and received.
    pub sent: u64,
    pub received: u64,
    /// Records that failed authentication or were replays.
    pub rejected: u64,
    /// Stream bytes taken from local sockets, to go to the peer.
    pub stream_out: u64,
    /// Stream bytes from the peer handed to local sockets.
    pub stream_in: u64,
    /// Packets sent again after a carrier connection was lost.
    pub resent: u64,
    /// Streams the peer opened past the limit of open streams, refused.
    pub streams_refused: u64,
}

/// Session keys and the replay window of the records they open.
struct Keyed {
    transport: Arc<Transport>,
    replay: ReplayWindow,
}

impl Keyed {
    fn new(transport: Transport) -> Keyed {
        Keyed { transport: Arc::new(transport), replay: ReplayWindow::default() }
    }
}

/// Which keys opened a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opener {
    Current,
    Offered,
    Previous,
}

/// The keys of a session: one set seals, up to three open.
struct Keys {
    /// Seals everything sent; opens what the peer sealed with it.
    current: Keyed,
    /// Keys a renewal handshake made that the peer has not used yet
    /// (station side): they become current once a record opens with them.
    offered: Option<Keyed>,
    /// The keys before the last renewal: they open records the peer sealed
    /// before it moved, until the next renewal.
    previous: Option<Keyed>,
}

impl Keys {
    fn get(&mut self, which: Opener) -> Option<&mut Keyed> {
        match which {
            Opener::Current => Some(&mut self.current),
            Opener::Offered => self.offered.as_mut(),
            Opener::Previous => self.previous.as_mut(),
        }
    }

    /// Makes `new` the sealing keys; the current ones keep opening.
    fn advance(&mut self, new: Keyed) {
        let old = std::mem::replace(&mut self.current, new);
        self.previous = Some(old);
    }
}

/// The keys that open records now, taken out of the connection so that
/// records are opened without holding whatever guards it.
pub struct Openers([(Opener, Option<Arc<Transport>>); 3]);

/// A record some keys of the session opened, for [`Connection::accept`].
pub struct Opened {
    which: Opener,
    transport: Arc<Transport>,
}

impl Openers {
    /// Opens one record's ciphertext into `plain` with the first keys that
    /// authenticate it, if any.
    pub fn open(&self, counter: u64, ciphertext: &[u8], plain: &mut Vec<u8>) -> Option<Opened> {
        self.0.iter().find_map(|(which, transport)| {
            let transport = transport.as_ref()?;
            transport.open(counter, ciphertext, plain).ok()?;
            Some(Opened { which: *which, transport: transport.clone() })
        })
    }
}

/// What an accepted record did beside its packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Nothing more.
    Packet,
    /// The peer sealed it with the offered keys: they seal from now on, and
    /// the driver's [`Openers`] are out of date.
    KeysMoved,
}

/// One end of a session: see the module's documentation.
pub struct Connection {
    session: Session,
    keys: Keys,
    /// Generation of the lane that may send sequenced packets now; 0
    /// before the first.
    lane: u64,
    closed: Option<CloseReason>,
    stats: Stats,
}

impl Connection {
    /// A session on fresh keys, begun at `now`.
    pub fn new(side: Side, transport: Transport, now: Instant, limits: Limits) -> Connection {
        Connection {
            session: Session::new(side, now, limits),
            keys: Keys { current: Keyed::new(transport), offered: None, previous: None },
            lane: 0,
            closed: None,
            stats: Stats::default(),
        }
    }

    /// The session within: streams, round trips, timers.
    pub fn session(&self) -> &Session {
        &self.session
    }

    pub fn session_mut(&mut self) -> &mut Session {
        &mut self.session
    }

    /// Why the session is over, once it is (seen through
    /// [`Connection::poll_event`]).
    pub fn closed(&self) -> Option<&CloseReason> {
        self.closed.as_ref()
    }

    /// The counters, with the session's own.
    pub fn stats(&mut self) -> Stats {
        Stats {
            resent: self.session.resent_packets(),
            streams_refused: self.session.streams().refused_total(),
            ..self.stats
        }
    }

    /// The streams, and the counters a driver adds the bytes its pumps
    /// move to.
    pub fn streams_and_stats(&mut self) -> (&mut Streams, &mut Stats) {
        (self.session.streams(), &mut self.stats)
    }

    /// The keys that open records now, in the order to try them.
    pub fn openers(&self) -> Openers {
        let arc = |k: &Option<Keyed>| k.as_ref().map(|k| k.transport.clone());
        Openers([
            (Opener::Current, Some(self.keys.current.transport.clone())),
            (Opener::Offered, arc(&self.keys.offered)),
            (Opener::Previous, arc(&self.keys.previous)),
        ])
    }

    /// Takes a record that [`Openers::open`] gave as `opened` (`None`: no
    /// keys of ours authenticated it) with its `counter` and plaintext
    /// `packet`. A forged record, one whose keys were renewed away while
    /// it was opened, and a replay are refused and counted; the session
    /// goes on. A packet that breaks the protocol ends the session.
    pub fn accept(
        &mut self,
        now: Instant,
        opened: Option<Opened>,
        counter: u64,
        packet: &[u8],
    ) -> Result<Accepted, CryptoError> {
        let checked = match &opened {
            None => Err(CryptoError::Forged),
            // Keys may have moved since the driver took its openers: the
            // window is the one of the keys that opened it, if they remain.
            Some(opened) => match self.keys.get(opened.which) {
                Some(keyed) if Arc::ptr_eq(&keyed.transport, &opened.transport) => {
                    if keyed.replay.accept(counter) {
                        Ok(())
                    } else {
                        Err(CryptoError::Replay(counter))
                    }
                }
                _ => Err(CryptoError::Forged),
            },
        };
        if let Err(e) = checked {
            self.stats.rejected += 1;
            return Err(e);
        }
        let mut accepted = Accepted::Packet;
        if opened.is_some_and(|opened| opened.which == Opener::Offered) {
            // The peer sealed with the offered keys: it has them.
            if let Some(offered) = self.keys.offered.take() {
                self.keys.advance(offered);
                accepted = Accepted::KeysMoved;
            }
        }
        self.stats.received += packet.len() as u64;
        if let Err(e) = self.session.handle_packet(now, packet) {
            self.session.end(CloseReason::PeerBroke(e));
        }
        Ok(accepted)
    }

    /// A new carrier lane starts: it sends from the first unacknowledged
    /// packet, and any older lane stops.
    pub fn begin_lane(&mut self, kind: Lane) -> LaneToken {
        self.lane += 1;
        self.session.restart_transmit();
        LaneToken { generation: self.lane, kind }
    }

    /// Another request of the lane sending now: it goes on from where that
    /// lane is, beside the lane's other requests in flight (the poll
    /// carrier pipelines them; the peer reorders). Before any lane began,
    /// it begins one.
    pub fn join_lane(&mut self, kind: Lane) -> LaneToken {
        if self.lane == 0 {
            return self.begin_lane(kind);
        }
        LaneToken { generation: self.lane, kind }
    }

    /// Writes the next packet for `lane` into `plain` (replaced) and gives
    /// the keys to seal it with, or `None` when there is nothing to send.
    pub fn poll_transmit(
        &mut self,
        now: Instant,
        lane: LaneToken,
        plain: &mut Vec<u8>,
    ) -> Result<Option<Arc<Transport>>, LaneEnd> {
        if let Some(closed) = &self.closed {
            return Err(closed.clone().into());
        }
        if self.lane != lane.generation {
            return Err(LaneEnd::Superseded);
        }
        if !self.session.poll_transmit(now, lane.kind, plain) {
            return Ok(None);
        }
        self.stats.sent += plain.len() as u64;
        Ok(Some(self.keys.current.transport.clone()))
    }

    /// Writes an ack-only packet into `plain` (replaced) and gives the keys
    /// to seal it with: requests that must prove who sent them carry one.
    pub fn write_ack(&mut self, now: Instant, plain: &mut Vec<u8>) -> Arc<Transport> {
        self.session.write_ack(now, plain);
        self.keys.current.transport.clone()
    }

    /// Agent side of a key renewal: `transport` seals from now on; the keys
    /// before it keep opening what the station sealed before it moved.
    pub fn rekey(&mut self, transport: Transport) {
        self.keys.offered = None;
        self.keys.advance(Keyed::new(transport));
    }

    /// Station side of a key renewal: `transport` becomes the sealing keys
    /// once a record sealed with it arrives. A later offer replaces this one
    /// (the agent asked again because it never got the answer).
    pub fn offer_keys(&mut self, transport: Transport) {
        self.keys.offered = Some(Keyed::new(transport));
    }

    /// The next event for the driver. The session's end is remembered too:
    /// every lane gets it from then on.
    pub fn poll_event(&mut self) -> Option<Event> {
        let event = self.session.poll_event()?;
        if let Event::Closed { reason } = &event {
            self.closed = Some(reason.clone());
        }
        Some(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::session::Ending;
    use crate::core::streams::{Read, StreamId};
    use crate::crypto::{session_pair, RecordReader};

    /// An agent's and a station's connection on one session's keys.
    fn pair(now: Instant) -> (Connection, Connection) {
        let (agent_keys, station_keys) = session_pair();
        (
            Connection::new(Side::Agent, agent_keys, now, Limits::default()),
            Connection::new(Side::Station, station_keys, now, Limits::default()),
        )
    }

    /// Everything `lane` may send now, each packet sealed as its own record.
    fn records(from: &mut Connection, now: Instant, lane: LaneToken) -> Vec<Vec<u8>> {
        let mut plain = Vec::new();
        let mut out = Vec::new();
        while let Some(transport) = from.poll_transmit(now, lane, &mut plain).expect("may send") {
            let mut record = Vec::new();
            transport.seal(&plain, &mut record);
            out.push(record);
        }
        out
    }

    /// Opens and hands on one record, as a driver does.
    fn deliver(to: &mut Connection, now: Instant, record: &[u8]) -> Result<Accepted, CryptoError> {
        let openers = to.openers();
        let mut result = None;
        RecordReader::default()
            .feed(record, |counter, ciphertext| {
                let mut plain = Vec::new();
                let opened = openers.open(counter, ciphertext, &mut plain);
                result = Some(to.accept(now, opened, counter, &plain));
            })
            .expect("one whole record");
        result.expect("one record")
    }

    fn read_all(conn: &mut Connection, id: StreamId) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(Read::Data(n)) = conn.session_mut().streams().read(id, &mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    #[test]
    fn a_new_lane_takes_over_and_resends_what_the_old_one_lost() {
        let now = Instant::now();
        let (mut agent, mut station) = pair(now);
        let old = agent.begin_lane(Lane::Data);
        let id = agent.session_mut().streams().open("collector").expect("open");
        agent.session_mut().streams().write(id, b"sent on a lane that was cut").expect("write");
        let lost = records(&mut agent, now, old);
        assert!(!lost.is_empty());

        let new = agent.begin_lane(Lane::Data);
        let mut plain = Vec::new();
        assert_eq!(agent.poll_transmit(now, old, &mut plain).err(), Some(LaneEnd::Superseded));
        assert_eq!(agent.join_lane(Lane::Data), new, "a joining request goes on with it");
        for record in records(&mut agent, now, new) {
            deliver(&mut station, now, &record).expect("authentic and fresh");
        }
        assert_eq!(read_all(&mut station, id), b"sent on a lane that was cut");
        // The old lane's records turn up late: authentic, fresh counters,
        // packets the session already has. Nothing is delivered twice.
        for record in lost {
            deliver(&mut station, now, &record).expect("authentic and fresh");
        }
        assert_eq!(read_all(&mut station, id), b"");
    }

    #[test]
    fn replayed_tampered_and_foreign_records_are_refused_and_the_session_goes_on() {
        let now = Instant::now();
        let (mut agent, mut station) = pair(now);
        let lane = agent.begin_lane(Lane::Data);
        let id = agent.session_mut().streams().open("collector").expect("open");
        let first = records(&mut agent, now, lane);
        deliver(&mut station, now, &first[0]).expect("fresh");
        assert!(matches!(deliver(&mut station, now, &first[0]), Err(CryptoError::Replay(_))));

        agent.session_mut().streams().write(id, b"true bytes").expect("write");
        let mut record = records(&mut agent, now, lane).remove(0);
        let mut tampered = record.clone();
        *tampered.last_mut().expect("not empty") ^= 0x20;
        assert!(matches!(deliver(&mut station, now, &tampered), Err(CryptoError::Forged)));
        let (stranger, _) = session_pair();
        let mut foreign = Vec::new();
        stranger.seal(b"not a packet of this session", &mut foreign);
        assert!(matches!(deliver(&mut station, now, &foreign), Err(CryptoError::Forged)));
        assert_eq!(station.stats().rejected, 3);

        // The tampered record's counter was not taken: the true one passes.
        deliver(&mut station, now, &std::mem::take(&mut record)).expect("fresh");
        assert_eq!(read_all(&mut station, id), b"true bytes");
        assert!(station.closed().is_none());
    }

    #[test]
    fn renewed_keys_move_with_the_first_record_sealed_with_them() {
        let now = Instant::now();
        let (mut agent, mut station) = pair(now);
        let up = agent.begin_lane(Lane::Data);
        let id = agent.session_mut().streams().open("collector").expect("open");
        agent.session_mut().streams().write(id, b"old keys, ").expect("write");
        let in_flight = records(&mut agent, now, up);

        let (agent_new, station_new) = session_pair();
        agent.rekey(agent_new);
        station.offer_keys(station_new);
        agent.session_mut().streams().write(id, b"new keys").expect("write");
        let after = records(&mut agent, now, up);
        // The new keys' record first: the station moves to them, and still
        // opens what was sealed before with the keys before.
        assert_eq!(deliver(&mut station, now, &after[0]).ok(), Some(Accepted::KeysMoved));
        for record in in_flight.iter().chain(&after[1..]) {
            assert_eq!(deliver(&mut station, now, record).ok(), Some(Accepted::Packet));
        }
        assert_eq!(read_all(&mut station, id), b"old keys, new keys");
    }

    #[test]
    fn a_closed_session_ends_every_lane_with_its_reason() {
        let now = Instant::now();
        let (mut agent, _) = pair(now);
        let lane = agent.begin_lane(Lane::Data);
        agent.session_mut().end(Ending::NewSession.into());
        while agent.poll_event().is_some() {}
        let closed = CloseReason::Here(Ending::NewSession);
        assert_eq!(agent.closed(), Some(&closed));
        let mut plain = Vec::new();
        assert_eq!(agent.poll_transmit(now, lane, &mut plain).err(), Some(LaneEnd::Closed(closed)));
    }
}
