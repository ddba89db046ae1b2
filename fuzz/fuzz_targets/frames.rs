//! A packet's plaintext: header, then frames (postcard). Only an
//! authenticated peer can get bytes here, but a broken or hostile device
//! must still not crash the station.
//!
//! Every frame the decoder accepts is within the wire format's bounds, and
//! re-encodes to bytes that decode to the same frames.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern::core::frame::{
    decode_header, encode_frame, encode_header, Frame, Frames, MAX_HEADER, MAX_NAME, MAX_REASON,
};

fuzz_target!(|packet: &[u8]| {
    let Ok((header, rest)) = decode_header(packet) else { return };
    assert!(packet.len() - rest.len() <= MAX_HEADER);
    let mut decoded = Vec::new();
    for frame in Frames::new(rest) {
        let Ok(frame) = frame else { break };
        match &frame {
            Frame::Open { name, .. } => assert!(!name.is_empty() && name.len() <= MAX_NAME),
            Frame::Reset { reason, .. } | Frame::Close { reason } => {
                assert!(reason.len() <= MAX_REASON)
            }
            _ => {}
        }
        decoded.push(frame);
    }

    let mut encoded = Vec::new();
    encode_header(&header, &mut encoded);
    for frame in &decoded {
        encode_frame(frame, &mut encoded);
    }
    let (header_again, rest) = decode_header(&encoded).expect("our header decodes");
    assert_eq!(header_again, header);
    let again: Vec<Frame<'_>> =
        Frames::new(rest).collect::<Result<_, _>>().expect("our frames decode");
    assert_eq!(again, decoded);
});
