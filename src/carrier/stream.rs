//! The stream shape: one long response down (`down`) and one long request
//! up (`up`), each a body of sealed records that lasts as long as its lane.
//! How such a body is written is here, once for both sides: the station
//! writes the downlink with it, the agent the uplink.
//!
//! ```text
//!  down: 200, chunked ─ [ack] [records…] [records…] … (0-chunk when the lane ends)
//!  up:   POST, chunked ─ [records…] [records…] …    (never ends while the lane lives)
//! ```
//!
//! Each piece holds whatever the session had to send when it was written
//! (up to [`STREAM_CHUNK`]), so a proxy that streams passes every piece on
//! at once; readers parse records regardless of chunk boundaries.

use super::http::{self, BodyKind, LAST_CHUNK};
use crate::tunnel::{LaneEnd, LaneToken, Tunnel};

/// Sealed bytes gathered into one chunk of a stream-shape body; one write
/// syscall per this many bytes.
pub const STREAM_CHUNK: usize = 256 * 1024;

/// How a long body is delimited: chunks, or, for a response through an
/// HTTP/1.0 hop (nginx's default upstream protocol), bare records until
/// the connection closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongBody {
    chunked: bool,
}

impl LongBody {
    /// A body that can end: chunked, or until the connection closes.
    pub fn new(chunked: bool) -> LongBody {
        LongBody { chunked }
    }

    /// What the head announces for this body.
    pub fn kind(self) -> BodyKind {
        if self.chunked {
            BodyKind::Chunked
        } else {
            BodyKind::UntilClose
        }
    }

    /// Appends one piece holding a sealed ack: the downlink's first, at
    /// once, so the agent can tell a path that streams from one that holds
    /// the response back.
    pub fn ack(self, tunnel: &Tunnel, out: &mut Vec<u8>) {
        let at = self.open(out);
        tunnel.seal_ack(out);
        self.close(out, at);
    }

    /// Waits until the session has records for `lane`, then appends them as
    /// one piece of about [`STREAM_CHUNK`] bytes. When the lane may send no
    /// more, `out` is left as it was.
    pub async fn records(
        self,
        tunnel: &Tunnel,
        lane: LaneToken,
        out: &mut Vec<u8>,
    ) -> Result<(), LaneEnd> {
        let start = out.len();
        let at = self.open(out);
        match tunnel.transmit(lane, out, STREAM_CHUNK).await {
            Ok(()) => {
                self.close(out, at);
                Ok(())
            }
            Err(end) => {
                out.truncate(start);
                Err(end)
            }
        }
    }

    /// Appends the body's end (a chunked body's last chunk; a bare one
    /// ends when the connection closes).
    pub fn end(self, out: &mut Vec<u8>) {
        if self.chunked {
            out.extend_from_slice(LAST_CHUNK);
        }
    }

    fn open(self, out: &mut Vec<u8>) -> usize {
        if self.chunked {
            http::open_chunk(out)
        } else {
            out.len()
        }
    }

    fn close(self, out: &mut Vec<u8>, at: usize) {
        if self.chunked {
            http::close_chunk(out, at);
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_lite::future::block_on;

    use super::*;
    use crate::carrier::harness::{decode_in_pieces, Outcome};
    use crate::core::session::{Lane, Limits};
    use crate::core::streams::Side;
    use crate::crypto::{session_pair, RecordReader};

    #[test]
    fn a_long_body_carries_each_piece_whole_and_ends_as_it_says() {
        for chunked in [true, false] {
            let (agent_keys, station_keys) = session_pair();
            let (agent, _) = Tunnel::new(Side::Agent, agent_keys, Limits::default());
            let (station, _) = Tunnel::new(Side::Station, station_keys, Limits::default());
            let lane = station.begin_lane(Lane::Data);
            let body = LongBody::new(chunked);
            let mut out = Vec::new();
            body.ack(&station, &mut out);
            station.probe();
            block_on(body.records(&station, lane, &mut out)).expect("the lane may send");
            // A lane that may send no more adds nothing, not even a frame.
            station.end(crate::tunnel::Ending::StationStopped);
            let written = out.clone();
            assert!(block_on(body.records(&station, lane, &mut out)).is_err());
            assert_eq!(out, written);
            body.end(&mut out);

            let records = if chunked {
                let (payload, outcome) = decode_in_pieces(&out, &[]);
                assert_eq!(outcome, Outcome::End(out.len()), "the last chunk ends it");
                payload
            } else {
                assert_eq!(body.kind(), BodyKind::UntilClose);
                out
            };
            // The ack and the probe, each authentic where the agent reads them.
            let opened = agent.receive(&records, &mut RecordReader::default(), &mut Vec::new());
            assert_eq!(opened, Ok(2), "chunked: {chunked}");
        }
    }
}
