//! Wire format of the plaintext inside one sealed packet.
//!
//! A packet is a [`Header`] followed by zero or more [`Frame`]s, each encoded
//! with postcard. Frames borrow from the packet buffer, so decoding copies
//! nothing. The encoding is private to postern; both ends are the same code.

use serde::{Deserialize, Serialize};

/// Largest plaintext of one packet: Noise's 65535-byte message limit less the
/// 16-byte AEAD tag.
pub const MAX_PACKET: usize = 65535 - 16;

/// Largest encoded header (two varint u64s: 10 bytes each).
pub const MAX_HEADER: usize = 20;

/// Bytes a frame costs beyond its payload: tag, stream id and length varints.
pub const FRAME_OVERHEAD: usize = 1 + 5 + 5;

/// Longest target or service name a peer may ask for.
pub const MAX_NAME: usize = 255;

/// Longest reason text carried by a reset or close.
pub const MAX_REASON: usize = 200;

/// Identifies a stream within a session. The agent's are odd, the station's even.
pub type StreamId = u32;

/// Sent at the start of every packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Sequence number of this packet; 0 marks an ack-only packet, which is
    /// never resent and never acknowledged.
    pub seq: u64,
    /// Highest sequence number the sender has received in order.
    pub ack: u64,
}

/// One instruction to the peer's stream layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame<'a> {
    /// Opens stream `id` to the named target (forward) or service (reverse).
    Open { id: StreamId, name: &'a str },
    /// Bytes of stream `id`, following the bytes sent before.
    Data {
        id: StreamId,
        // serde writes a plain `&[u8]` as a sequence, one call per byte;
        // as bytes it is one copy, with the same encoding on the wire
        // (length varint, then the bytes), and it decodes borrowed.
        #[serde(borrow, serialize_with = "as_bytes")]
        bytes: &'a [u8],
    },
    /// The sender will write no more on stream `id` (TCP half-close).
    Fin { id: StreamId },
    /// Stream `id` is gone on the sender's side; `reason` is for logs.
    Reset { id: StreamId, reason: &'a str },
    /// The receiver of stream `id` accepts bytes up to this total offset.
    Credit { id: StreamId, limit: u64 },
    /// The sender ends the session; `reason` is for logs.
    Close { reason: &'a str },
}

fn as_bytes<S: serde::Serializer>(bytes: &&[u8], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_bytes(bytes)
}

/// A packet's plaintext could not be decoded. The packet was authentic, so
/// this is a bug or version mismatch on the peer's side.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed packet from peer: {0}")]
pub struct DecodeError(&'static str);

/// Appends the encoding of `header` to `out`.
pub fn encode_header(header: &Header, out: &mut Vec<u8>) {
    let mut scratch = [0u8; MAX_HEADER];
    let used = postcard::to_slice(header, &mut scratch).expect("a header fits MAX_HEADER bytes");
    out.extend_from_slice(used);
}

/// Appends the encoding of `frame` to `out`.
pub fn encode_frame(frame: &Frame<'_>, out: &mut Vec<u8>) {
    // postcard's extend_from_slice flavour writes straight into `out`.
    let taken = std::mem::take(out);
    *out = postcard::to_extend(frame, taken).expect("encoding into a Vec cannot fail");
}

/// Splits a packet's plaintext into its header and the encoded frames.
pub fn decode_header(packet: &[u8]) -> Result<(Header, &[u8]), DecodeError> {
    postcard::take_from_bytes(packet).map_err(|_| DecodeError("bad header"))
}

/// Iterates over the frames that follow a header.
pub struct Frames<'a>(&'a [u8]);

impl<'a> Frames<'a> {
    pub fn new(encoded: &'a [u8]) -> Self {
        Frames(encoded)
    }
}

impl<'a> Iterator for Frames<'a> {
    type Item = Result<Frame<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        match postcard::take_from_bytes::<Frame<'a>>(self.0) {
            Ok((frame, rest)) => {
                self.0 = rest;
                Some(validate(frame))
            }
            Err(_) => {
                self.0 = &[];
                Some(Err(DecodeError("bad frame")))
            }
        }
    }
}

fn validate(frame: Frame<'_>) -> Result<Frame<'_>, DecodeError> {
    match &frame {
        Frame::Open { name, .. } if name.is_empty() || name.len() > MAX_NAME => {
            Err(DecodeError("stream name empty or too long"))
        }
        Frame::Reset { reason, .. } | Frame::Close { reason } if reason.len() > MAX_REASON => {
            Err(DecodeError("reason too long"))
        }
        _ => Ok(frame),
    }
}

/// Cuts `text` to at most `max` bytes on a character boundary, so reasons
/// built from error messages always fit their frame.
pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_frame() {
        let frames = [
            Frame::Open { id: 1, name: "collector" },
            Frame::Data { id: 3, bytes: &[0, 255, 17, 19] },
            Frame::Fin { id: 5 },
            Frame::Reset { id: 7, reason: "refused" },
            Frame::Credit { id: 9, limit: u64::MAX },
            Frame::Close { reason: "bye" },
        ];
        let mut packet = Vec::new();
        encode_header(&Header { seq: u64::MAX, ack: 12 }, &mut packet);
        for frame in &frames {
            encode_frame(frame, &mut packet);
        }
        let (header, rest) = decode_header(&packet).unwrap();
        assert_eq!(header, Header { seq: u64::MAX, ack: 12 });
        let decoded: Vec<_> = Frames::new(rest).collect::<Result<_, _>>().unwrap();
        assert_eq!(decoded, frames);
    }

    #[test]
    fn data_is_tag_id_length_then_the_bytes() {
        // The wire format of postcard's byte sequences: what earlier
        // builds sent, so both ends keep understanding each other.
        let bytes: Vec<u8> = (0..300u16).map(|i| i as u8).collect();
        let mut out = Vec::new();
        encode_frame(&Frame::Data { id: 129, bytes: &bytes }, &mut out);
        let mut expected = vec![1, 0x81, 0x01, 0xac, 0x02];
        expected.extend_from_slice(&bytes);
        assert_eq!(out, expected);
        assert_eq!(Frames::new(&out).next(), Some(Ok(Frame::Data { id: 129, bytes: &bytes })));
    }

    #[test]
    fn worst_case_overheads_hold() {
        let mut out = Vec::new();
        encode_header(&Header { seq: u64::MAX, ack: u64::MAX }, &mut out);
        assert!(out.len() <= MAX_HEADER);
        let bytes = vec![7u8; MAX_PACKET];
        out.clear();
        encode_frame(&Frame::Data { id: u32::MAX, bytes: &bytes }, &mut out);
        assert!(out.len() <= bytes.len() + FRAME_OVERHEAD);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..300 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            if let Ok((_, rest)) = decode_header(&bytes) {
                for frame in Frames::new(rest) {
                    let _ = frame;
                }
            }
        }
    }

    #[test]
    fn oversized_names_are_rejected() {
        let long = "x".repeat(MAX_NAME + 1);
        let mut out = Vec::new();
        encode_frame(&Frame::Open { id: 1, name: &long }, &mut out);
        assert_eq!(
            Frames::new(&out).next(),
            Some(Err(DecodeError("stream name empty or too long")))
        );
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
